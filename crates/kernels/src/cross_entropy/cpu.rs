//! CPU fused LM head + cross-entropy over vocabulary chunks: h [N, D], weight [V, D].
//!
//! Only the M labelled rows are gathered (hl [M, D]). Forward: parallel over vocabulary chunks,
//! each computing logits [rows, C] = hl·W_cᵀ a row block at a time and folding them into per-row
//! (max, Σe^{z−max}) that merge across chunks as an online log-sum-exp; `loss = lse − z_target`.
//! Where entropy is asked for, each row also carries Σe^{z−max}(z−max) relative to the same running
//! max, so `entropy = ln Σe^{z−max} − Σe^{z−max}(z−max) / Σe^{z−max}` without cancellation.
//! Backward: per chunk, recompute logits, `dz = (e^{z−lse} − 1[target])·dloss`,
//! `dW_c += dzᵀ hl` (the chunk's own rows of dweight, no race) and a per-task `dhl += dz W_c`,
//! summed across tasks.

use rayon::prelude::*;
use reel_tensor::Float;

use crate::gemm::{gemm_strided, Parallelism};

/// Rows of hl multiplied against a chunk at once (bounds the temporary logits to ROWS·chunk).
const ROWS: usize = 256;

/// The labelled rows: their indices and targets (checked against `v`).
fn labelled(targets: &[i32], v: usize) -> (Vec<usize>, Vec<usize>) {
    let mut idx = Vec::new();
    let mut tgt = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        if t < 0 {
            continue;
        }
        assert!(
            (t as usize) < v,
            "lm_head_ce: target {t} at row {i} is outside the vocabulary of {v}"
        );
        idx.push(i);
        tgt.push(t as usize);
    }
    (idx, tgt)
}

fn gather<T: Float>(src: &[T], idx: &[usize], d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; idx.len() * d];
    out.par_chunks_mut(d.max(1))
        .zip(idx.par_iter())
        .for_each(|(row, &i)| {
            for (x, y) in row.iter_mut().zip(&src[i * d..(i + 1) * d]) {
                *x = y.to_f32();
            }
        });
    out
}

fn widen<T: Float>(src: &[T]) -> Vec<f32> {
    src.iter().map(|x| x.to_f32()).collect()
}

/// logits[rows, cw] = hl[rows, d] · w_c[cw, d]ᵀ.
fn chunk_logits(logits: &mut [f32], hl: &[f32], w_c: &[f32], rows: usize, cw: usize, d: usize) {
    gemm_strided(
        logits,
        cw,
        false,
        hl,
        d,
        1,
        w_c,
        1,
        d,
        1.0,
        rows,
        cw,
        d,
        Parallelism::None,
    );
}

/// Per-row running (max, Σ e^{z − max}, target logit) for the labelled rows, and where entropy is
/// asked for, `ent` = Σ e^{z − max}·(z − max) (empty otherwise).
#[derive(Clone)]
struct Stats {
    max: Vec<f32>,
    sum: Vec<f32>,
    target: Vec<f32>,
    ent: Vec<f32>,
}

/// `ent` of a partial (max m, sum s, ent e) re-expressed relative to a larger max m1, scaled:
/// Σ e^{z−m1}(z−m1) = e^{m−m1}·(e + (m − m1)·s). An empty partial (s = 0) contributes 0.
fn rebase_ent(m: f32, s: f32, e: f32, m1: f32) -> f32 {
    if s == 0.0 {
        0.0
    } else {
        (m - m1).exp() * (e + (m - m1) * s)
    }
}

impl Stats {
    fn new(m: usize, entropy: bool) -> Self {
        Stats {
            max: vec![f32::NEG_INFINITY; m],
            sum: vec![0.0; m],
            target: vec![0.0; m],
            ent: vec![0.0; if entropy { m } else { 0 }],
        }
    }

    fn add(&mut self, r: usize, max: f32, sum: f32, ent: f32) {
        let (m0, s0) = (self.max[r], self.sum[r]);
        let m1 = m0.max(max);
        if m1 == f32::NEG_INFINITY {
            return;
        }
        if !self.ent.is_empty() {
            self.ent[r] = rebase_ent(m0, s0, self.ent[r], m1) + rebase_ent(max, sum, ent, m1);
        }
        self.sum[r] = s0 * (m0 - m1).exp() + sum * (max - m1).exp();
        self.max[r] = m1;
    }

    fn merge(mut self, other: Stats) -> Stats {
        for r in 0..self.max.len() {
            let e = other.ent.get(r).copied().unwrap_or(0.0);
            self.add(r, other.max[r], other.sum[r], e);
            self.target[r] += other.target[r];
        }
        self
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Float>(
    losses: &mut [f32],
    lse: &mut [f32],
    mut entropy: Option<&mut [f32]>,
    h: &[T],
    weight: &[T],
    targets: &[i32],
    d: usize,
    v: usize,
    chunk: usize,
) -> (f64, usize) {
    losses.fill(0.0);
    lse.fill(0.0);
    if let Some(e) = entropy.as_deref_mut() {
        e.fill(0.0);
    }
    let want_entropy = entropy.is_some();
    let (idx, tgt) = labelled(targets, v);
    let m = idx.len();
    if m == 0 {
        return (0.0, 0);
    }
    let hl = gather(h, &idx, d);
    let n_chunks = v.div_ceil(chunk);
    let stats = (0..n_chunks)
        .into_par_iter()
        .fold(
            || Stats::new(m, want_entropy),
            |mut st, ci| {
                let c0 = ci * chunk;
                let cw = chunk.min(v - c0);
                let w_c = widen(&weight[c0 * d..(c0 + cw) * d]);
                let mut logits = vec![0.0f32; ROWS.min(m) * cw];
                for r0 in (0..m).step_by(ROWS) {
                    let rows = ROWS.min(m - r0);
                    let z = &mut logits[..rows * cw];
                    chunk_logits(z, &hl[r0 * d..(r0 + rows) * d], &w_c, rows, cw, d);
                    for (ri, zr) in z.chunks_exact(cw).enumerate() {
                        let r = r0 + ri;
                        let mx = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let (sum, ent) = if want_entropy {
                            zr.iter().fold((0.0f32, 0.0f32), |(s, e), &x| {
                                let p = (x - mx).exp();
                                (s + p, e + p * (x - mx))
                            })
                        } else {
                            (zr.iter().map(|&x| (x - mx).exp()).sum(), 0.0)
                        };
                        st.add(r, mx, sum, ent);
                        if (c0..c0 + cw).contains(&tgt[r]) {
                            st.target[r] = zr[tgt[r] - c0];
                        }
                    }
                }
                st
            },
        )
        .reduce(|| Stats::new(m, want_entropy), Stats::merge);

    let mut total = 0.0f64;
    for (r, &i) in idx.iter().enumerate() {
        let l = stats.max[r] + stats.sum[r].ln();
        lse[i] = l;
        losses[i] = l - stats.target[r];
        total += losses[i] as f64;
        if let Some(e) = entropy.as_deref_mut() {
            e[i] = stats.sum[r].ln() - stats.ent[r] / stats.sum[r];
        }
    }
    (total, m)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Float>(
    dh: &mut [T],
    dweight: &mut [T],
    h: &[T],
    weight: &[T],
    targets: &[i32],
    lse: &[f32],
    dloss: &[f32],
    d: usize,
    v: usize,
    chunk: usize,
) {
    dh.fill(T::from_f32(0.0));
    let (idx, tgt) = labelled(targets, v);
    let m = idx.len();
    if m == 0 || d == 0 {
        return;
    }
    let hl = gather(h, &idx, d);
    let lse_l: Vec<f32> = idx.iter().map(|&i| lse[i]).collect();
    let dloss_l: Vec<f32> = idx.iter().map(|&i| dloss[i]).collect();

    let dhl = dweight
        .par_chunks_mut(chunk * d)
        .enumerate()
        .fold(
            || vec![0.0f32; m * d],
            |mut dhl, (ci, dw_chunk)| {
                let c0 = ci * chunk;
                let cw = dw_chunk.len() / d;
                let w_c = widen(&weight[c0 * d..(c0 + cw) * d]);
                let mut dw = vec![0.0f32; cw * d];
                let mut dz = vec![0.0f32; ROWS.min(m) * cw];
                for r0 in (0..m).step_by(ROWS) {
                    let rows = ROWS.min(m - r0);
                    let z = &mut dz[..rows * cw];
                    let hl_b = &hl[r0 * d..(r0 + rows) * d];
                    chunk_logits(z, hl_b, &w_c, rows, cw, d);
                    for (ri, zr) in z.chunks_exact_mut(cw).enumerate() {
                        let r = r0 + ri;
                        let (l, g) = (lse_l[r], dloss_l[r]);
                        for x in zr.iter_mut() {
                            *x = (*x - l).exp() * g;
                        }
                        if (c0..c0 + cw).contains(&tgt[r]) {
                            zr[tgt[r] - c0] -= g;
                        }
                    }
                    // dW_c += dzᵀ hl: lhs (c, r) = z[r·cw + c].
                    gemm_strided(
                        &mut dw,
                        d,
                        true,
                        z,
                        1,
                        cw,
                        hl_b,
                        d,
                        1,
                        1.0,
                        cw,
                        d,
                        rows,
                        Parallelism::None,
                    );
                    // dhl += dz W_c.
                    let dst = &mut dhl[r0 * d..(r0 + rows) * d];
                    gemm_strided(
                        dst,
                        d,
                        true,
                        z,
                        cw,
                        1,
                        &w_c,
                        d,
                        1,
                        1.0,
                        rows,
                        d,
                        cw,
                        Parallelism::None,
                    );
                }
                for (x, y) in dw_chunk.iter_mut().zip(&dw) {
                    *x = T::from_f32(x.to_f32() + y);
                }
                dhl
            },
        )
        .reduce(
            || vec![0.0f32; m * d],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );

    for (r, &i) in idx.iter().enumerate() {
        for (x, y) in dh[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&dhl[r * d..(r + 1) * d])
        {
            *x = T::from_f32(*y);
        }
    }
}

/// Naive reference: full logits in f64. Returns (losses, lse, entropy) with 0 on unlabelled rows.
pub(crate) fn forward_ref(
    h: &[f32],
    weight: &[f32],
    targets: &[i32],
    n: usize,
    d: usize,
    v: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut losses = vec![0.0f32; n];
    let mut lse = vec![0.0f32; n];
    let mut entropy = vec![0.0f32; n];
    for i in 0..n {
        if targets[i] < 0 {
            continue;
        }
        let z: Vec<f64> = (0..v)
            .map(|c| {
                (0..d)
                    .map(|p| h[i * d + p] as f64 * weight[c * d + p] as f64)
                    .sum()
            })
            .collect();
        let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = mx + z.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        lse[i] = l as f32;
        losses[i] = (l - z[targets[i] as usize]) as f32;
        entropy[i] = -z.iter().map(|&x| (x - l).exp() * (x - l)).sum::<f64>() as f32;
    }
    (losses, lse, entropy)
}
