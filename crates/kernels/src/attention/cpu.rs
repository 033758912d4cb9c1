//! CPU flash attention (FlashAttention-2 tiling): q [B, Tq, H, D], k/v [B, Tk, H_kv, D].
//!
//! Forward, per query tile and KV head, rows = (query, query head of the group) stacked so the
//! group shares every K/V tile: `S = s·Q Kᵀ` (masked), online softmax
//! `m' = max(m, rowmax S)`, `l' = l·e^{m−m'} + Σ e^{S−m'}`, `acc' = acc·e^{m−m'} + e^{S−m'} V`;
//! finally `O = acc / l`, `lse = m + ln l`. Backward per (B, KV head, interleaved key-tile split)
//! with the saved lse and the caller's `D = rowsum(dO ∘ O)` ([`delta`]): `P = e^{S−lse}`,
//! `dV += Pᵀ dO`, `dS = P∘(dO Vᵀ − D)`, `dQ += s·dS K`, `dK += s·dSᵀ Q`. Extra memory is O(T·D);
//! no Tq×Tk matrix exists.

use rayon::prelude::*;
use reel_tensor::Float;

use super::{AttnMask, AttnShape};
use crate::gemm::{gemm_strided, Parallelism};

/// Query and key tile sizes (rows of Q and K per block product).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiles {
    pub q: usize,
    pub k: usize,
}

pub(crate) const DEFAULT_TILES: Tiles = Tiles { q: 64, k: 64 };

/// Number of keys (from 0) that any of the queries `[q0, q1)` may see.
fn key_end(mask: AttnMask, q1: usize, tk: usize) -> usize {
    match mask {
        AttnMask::Full => tk,
        AttnMask::Causal { q_offset, k_offset } => (q_offset + q1).saturating_sub(k_offset).min(tk),
    }
}

/// First query that sees key `k0` (tq when none does).
fn query_start(mask: AttnMask, k0: usize, tq: usize) -> usize {
    match mask {
        AttnMask::Full => 0,
        AttnMask::Causal { q_offset, k_offset } => (k_offset + k0).saturating_sub(q_offset).min(tq),
    }
}

/// Sets `s[r, j] = -inf` where query `q0 + r / group` may not see key `k0 + j`. A no-op for
/// `Full` and for tiles entirely below the diagonal.
fn apply_mask(s: &mut [f32], mask: AttnMask, q0: usize, k0: usize, nk: usize, group: usize) {
    let AttnMask::Causal { q_offset, k_offset } = mask else {
        return;
    };
    if k_offset + k0 + nk <= q_offset + q0 + 1 {
        return;
    }
    for (r, row) in s.chunks_exact_mut(nk).enumerate() {
        // Keys j with k_offset + k0 + j <= q_offset + q0 + i are visible.
        let visible = (q_offset + q0 + r / group + 1).saturating_sub(k_offset + k0);
        if visible < nk {
            row[visible..].fill(f32::NEG_INFINITY);
        }
    }
}

/// Copies rows `[i0, i0 + n)` of head `head` from a `[T, heads, d]` slab into `dst[n, d]` as f32.
fn gather_rows<T: Float>(
    dst: &mut [f32],
    src: &[T],
    i0: usize,
    n: usize,
    heads: usize,
    head: usize,
    d: usize,
) {
    for (i, row) in dst[..n * d].chunks_exact_mut(d).enumerate() {
        let base = ((i0 + i) * heads + head) * d;
        for (x, y) in row.iter_mut().zip(&src[base..base + d]) {
            *x = y.to_f32();
        }
    }
}

/// Copies query rows `[i0, i0 + n)` of the query heads of KV head `g` (`group` consecutive heads)
/// from a `[T, h, d]` slab into `dst[n·group, d]`, row `i·group + hi`.
#[allow(clippy::too_many_arguments)]
fn gather_group<T: Float>(
    dst: &mut [f32],
    src: &[T],
    i0: usize,
    n: usize,
    h: usize,
    group: usize,
    g: usize,
    d: usize,
) {
    let w = group * d;
    for i in 0..n {
        let base = ((i0 + i) * h + g * group) * d;
        for (x, y) in dst[i * w..(i + 1) * w].iter_mut().zip(&src[base..base + w]) {
            *x = y.to_f32();
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Float>(
    out: &mut [T],
    lse: &mut [f32],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    mask: AttnMask,
    tiles: Tiles,
) {
    let AttnShape {
        tq, tk, h, h_kv, d, ..
    } = shape;
    if out.is_empty() {
        return;
    }
    let group = h / h_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let (bq, bk) = (tiles.q, tiles.k);
    let q_batch = tq * h * d;
    let k_batch = tk * h_kv * d;

    out.par_chunks_mut(q_batch)
        .zip(lse.par_chunks_mut(tq * h))
        .enumerate()
        .for_each(|(bi, (out_b, lse_b))| {
            let q_b = &q[bi * q_batch..(bi + 1) * q_batch];
            let k_b = &k[bi * k_batch..(bi + 1) * k_batch];
            let v_b = &v[bi * k_batch..(bi + 1) * k_batch];
            out_b
                .par_chunks_mut(bq * h * d)
                .zip(lse_b.par_chunks_mut(bq * h))
                .enumerate()
                .for_each(|(ti, (out_t, lse_t))| {
                    let q0 = ti * bq;
                    let nq = lse_t.len() / h;
                    let rows = nq * group;
                    let mut qt = vec![0.0f32; rows * d];
                    let mut kt = vec![0.0f32; bk * d];
                    let mut vt = vec![0.0f32; bk * d];
                    let mut s = vec![0.0f32; rows * bk];
                    let mut acc = vec![0.0f32; rows * d];
                    let mut m = vec![0.0f32; rows];
                    let mut l = vec![0.0f32; rows];
                    let k_end = key_end(mask, q0 + nq, tk);
                    for g in 0..h_kv {
                        gather_group(&mut qt, q_b, q0, nq, h, group, g, d);
                        acc.fill(0.0);
                        m.fill(f32::NEG_INFINITY);
                        l.fill(0.0);
                        for k0 in (0..k_end).step_by(bk) {
                            let nk = bk.min(k_end - k0);
                            gather_rows(&mut kt, k_b, k0, nk, h_kv, g, d);
                            gather_rows(&mut vt, v_b, k0, nk, h_kv, g, d);
                            let s = &mut s[..rows * nk];
                            // S = scale · Q Kᵀ: rhs (p, j) = kt[j·d + p].
                            gemm_strided(
                                s,
                                nk,
                                false,
                                &qt,
                                d,
                                1,
                                &kt,
                                1,
                                d,
                                scale,
                                rows,
                                nk,
                                d,
                                Parallelism::None,
                            );
                            apply_mask(s, mask, q0, k0, nk, group);
                            for (r, row) in s.chunks_exact_mut(nk).enumerate() {
                                let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                if mx == f32::NEG_INFINITY {
                                    row.fill(0.0);
                                    continue;
                                }
                                let m_new = m[r].max(mx);
                                let corr = (m[r] - m_new).exp();
                                let mut sum = 0.0f32;
                                for x in row.iter_mut() {
                                    *x = (*x - m_new).exp();
                                    sum += *x;
                                }
                                l[r] = l[r] * corr + sum;
                                m[r] = m_new;
                                if corr != 1.0 {
                                    for a in &mut acc[r * d..(r + 1) * d] {
                                        *a *= corr;
                                    }
                                }
                            }
                            // acc += P V.
                            gemm_strided(
                                &mut acc,
                                d,
                                true,
                                s,
                                nk,
                                1,
                                &vt,
                                d,
                                1,
                                1.0,
                                rows,
                                d,
                                nk,
                                Parallelism::None,
                            );
                        }
                        for r in 0..rows {
                            let (i, hh) = (r / group, g * group + r % group);
                            let dst = &mut out_t[(i * h + hh) * d..(i * h + hh + 1) * d];
                            if l[r] == 0.0 {
                                dst.fill(T::from_f32(0.0));
                                lse_t[i * h + hh] = f32::NEG_INFINITY;
                            } else {
                                let inv = 1.0 / l[r];
                                for (o, a) in dst.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                                    *o = T::from_f32(a * inv);
                                }
                                lse_t[i * h + hh] = m[r] + l[r].ln();
                            }
                        }
                    }
                });
        });
}

/// One backward task's result: dQ for the group's rows `[tq·group, d]` (f32) and dK/dV for the
/// key tiles it owns.
struct BackwardPart {
    dq: Vec<f32>,
    /// (first key, dK tile [nk, d], dV tile [nk, d])
    dkv: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

#[allow(clippy::too_many_arguments)]
fn backward_part<T: Float>(
    dout_b: &[T],
    q_b: &[T],
    k_b: &[T],
    v_b: &[T],
    delta_b: &[f32],
    lse_b: &[f32],
    g: usize,
    split: usize,
    nsplit: usize,
    shape: AttnShape,
    mask: AttnMask,
    tiles: Tiles,
) -> BackwardPart {
    let AttnShape {
        tq, tk, h, h_kv, d, ..
    } = shape;
    let group = h / h_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let (bq, bk) = (tiles.q, tiles.k);
    let nrows = tq * group;

    // The group's queries, dO, lse and D, rows (i, hi) → i·group + hi.
    let mut qg = vec![0.0f32; nrows * d];
    let mut dog = vec![0.0f32; nrows * d];
    gather_group(&mut qg, q_b, 0, tq, h, group, g, d);
    gather_group(&mut dog, dout_b, 0, tq, h, group, g, d);
    let mut lg = vec![0.0f32; nrows];
    let mut dg = vec![0.0f32; nrows];
    for i in 0..tq {
        for hi in 0..group {
            let (r, hh) = (i * group + hi, g * group + hi);
            lg[r] = lse_b[i * h + hh];
            dg[r] = delta_b[i * h + hh];
        }
    }

    let mut dq = vec![0.0f32; nrows * d];
    let mut kt = vec![0.0f32; bk * d];
    let mut vt = vec![0.0f32; bk * d];
    let rows_max = bq * group;
    let mut p = vec![0.0f32; rows_max * bk];
    let mut ds = vec![0.0f32; rows_max * bk];
    let mut dkv = Vec::new();
    for k0 in (0..tk).step_by(bk).skip(split).step_by(nsplit) {
        let nk = bk.min(tk - k0);
        let i_lo = query_start(mask, k0, tq);
        if i_lo >= tq {
            continue;
        }
        gather_rows(&mut kt, k_b, k0, nk, h_kv, g, d);
        gather_rows(&mut vt, v_b, k0, nk, h_kv, g, d);
        let mut dk_t = vec![0.0f32; nk * d];
        let mut dv_t = vec![0.0f32; nk * d];
        for q0 in (i_lo..tq).step_by(bq) {
            let nq = bq.min(tq - q0);
            let (rows, rb) = (nq * group, q0 * group);
            let q_t = &qg[rb * d..(rb + rows) * d];
            let do_t = &dog[rb * d..(rb + rows) * d];
            let p = &mut p[..rows * nk];
            let ds = &mut ds[..rows * nk];
            gemm_strided(
                p,
                nk,
                false,
                q_t,
                d,
                1,
                &kt,
                1,
                d,
                scale,
                rows,
                nk,
                d,
                Parallelism::None,
            );
            apply_mask(p, mask, q0, k0, nk, group);
            for (r, row) in p.chunks_exact_mut(nk).enumerate() {
                let l = lg[rb + r];
                if l == f32::NEG_INFINITY {
                    row.fill(0.0);
                } else {
                    for x in row.iter_mut() {
                        *x = (*x - l).exp();
                    }
                }
            }
            // dV += Pᵀ dO: lhs (j, r) = p[r·nk + j].
            gemm_strided(
                &mut dv_t,
                d,
                true,
                p,
                1,
                nk,
                do_t,
                d,
                1,
                1.0,
                nk,
                d,
                rows,
                Parallelism::None,
            );
            // dP = dO Vᵀ.
            gemm_strided(
                ds,
                nk,
                false,
                do_t,
                d,
                1,
                &vt,
                1,
                d,
                1.0,
                rows,
                nk,
                d,
                Parallelism::None,
            );
            for (r, (dsr, pr)) in ds.chunks_exact_mut(nk).zip(p.chunks_exact(nk)).enumerate() {
                let dr = dg[rb + r];
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = pv * (*x - dr);
                }
            }
            // dQ += s·dS K; dK += s·dSᵀ Q.
            gemm_strided(
                &mut dq[rb * d..(rb + rows) * d],
                d,
                true,
                ds,
                nk,
                1,
                &kt,
                d,
                1,
                scale,
                rows,
                d,
                nk,
                Parallelism::None,
            );
            gemm_strided(
                &mut dk_t,
                d,
                true,
                ds,
                1,
                nk,
                q_t,
                d,
                1,
                scale,
                nk,
                d,
                rows,
                Parallelism::None,
            );
        }
        dkv.push((k0, dk_t, dv_t));
    }
    BackwardPart { dq, dkv }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    delta: &[f32],
    lse: &[f32],
    shape: AttnShape,
    mask: AttnMask,
    tiles: Tiles,
) {
    let AttnShape {
        b,
        tq,
        tk,
        h,
        h_kv,
        d,
    } = shape;
    if dq.is_empty() || dk.is_empty() {
        return;
    }
    let group = h / h_kv;
    let q_batch = tq * h * d;
    let k_batch = tk * h_kv * d;
    // Split each (batch, KV head) over interleaved key tiles so that small B·H_kv still fills the
    // pool; each split owns its key tiles and a private dQ, summed below.
    let k_tiles = tk.div_ceil(tiles.k);
    let nsplit = (2 * rayon::current_num_threads())
        .div_ceil(b * h_kv)
        .clamp(1, k_tiles);
    let parts: Vec<BackwardPart> = (0..b * h_kv * nsplit)
        .into_par_iter()
        .map(|t| {
            let (bi, g, split) = (t / (h_kv * nsplit), (t / nsplit) % h_kv, t % nsplit);
            let qs = bi * q_batch..(bi + 1) * q_batch;
            let ks = bi * k_batch..(bi + 1) * k_batch;
            backward_part(
                &dout[qs.clone()],
                &q[qs],
                &k[ks.clone()],
                &v[ks],
                &delta[bi * tq * h..(bi + 1) * tq * h],
                &lse[bi * tq * h..(bi + 1) * tq * h],
                g,
                split,
                nsplit,
                shape,
                mask,
                tiles,
            )
        })
        .collect();

    let per_batch = h_kv * nsplit;
    dq.par_chunks_mut(q_batch)
        .zip(dk.par_chunks_mut(k_batch))
        .zip(dv.par_chunks_mut(k_batch))
        .zip(parts.par_chunks(per_batch))
        .for_each(|(((dq_b, dk_b), dv_b), parts_b)| {
            for (pi, part) in parts_b.iter().enumerate() {
                let g = pi / nsplit;
                for i in 0..tq {
                    let base = (i * h + g * group) * d;
                    let src = &part.dq[i * group * d..(i + 1) * group * d];
                    for (x, y) in dq_b[base..base + group * d].iter_mut().zip(src) {
                        *x = T::from_f32(x.to_f32() + y);
                    }
                }
                for (k0, dk_t, dv_t) in &part.dkv {
                    for (j, (dkr, dvr)) in
                        dk_t.chunks_exact(d).zip(dv_t.chunks_exact(d)).enumerate()
                    {
                        let base = ((k0 + j) * h_kv + g) * d;
                        for (x, y) in dk_b[base..base + d].iter_mut().zip(dkr) {
                            *x = T::from_f32(x.to_f32() + y);
                        }
                        for (x, y) in dv_b[base..base + d].iter_mut().zip(dvr) {
                            *x = T::from_f32(x.to_f32() + y);
                        }
                    }
                }
            }
        });
}

/// `D = rowsum(dO ∘ O)` per row of `d` values, products and sum in f32, left to right.
pub(crate) fn delta<T: Float>(delta: &mut [f32], dout: &[T], out: &[T], d: usize) {
    delta
        .par_iter_mut()
        .zip(dout.par_chunks(d).zip(out.par_chunks(d)))
        .with_min_len(256)
        .for_each(|(dl, (g, o))| {
            *dl = o.iter().zip(g).map(|(o, g)| o.to_f32() * g.to_f32()).sum();
        });
}

/// Merges `(o_b, lse_b)` into `(o, lse)` row by row, in f32 (DESIGN.md "Attention math").
pub(crate) fn merge(o: &mut [f32], lse: &mut [f32], o_b: &[f32], lse_b: &[f32], d: usize) {
    if d == 0 {
        return;
    }
    o.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .zip(o_b.par_chunks(d).zip(lse_b.par_iter()))
        .with_min_len(64)
        .for_each(|((o, l), (ob, &lb))| {
            if lb == f32::NEG_INFINITY {
                return;
            }
            if *l == f32::NEG_INFINITY {
                o.copy_from_slice(ob);
                *l = lb;
                return;
            }
            let x = *l - lb;
            *l -= log_sigmoid(x);
            let w = sigmoid(-x);
            for (a, &bv) in o.iter_mut().zip(ob) {
                *a -= w * (*a - bv);
            }
        });
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `ln σ(x) = −softplus(−x)`, stable for large |x|.
fn log_sigmoid(x: f32) -> f32 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

/// Naive attention with the full score matrix and an f64 softmax.
pub(crate) fn forward_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    mask: AttnMask,
) -> (Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        tq,
        tk,
        h,
        h_kv,
        d,
    } = shape;
    let group = h / h_kv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f32; b * tq * h * d];
    let mut lse = vec![f32::NEG_INFINITY; b * tq * h];
    let mut s = vec![0.0f64; tk];
    for bi in 0..b {
        for i in 0..tq {
            for hh in 0..h {
                let g = hh / group;
                let qr = &q[((bi * tq + i) * h + hh) * d..][..d];
                let mut mx = f64::NEG_INFINITY;
                for (j, sj) in s.iter_mut().enumerate() {
                    let visible = match mask {
                        AttnMask::Full => true,
                        AttnMask::Causal { q_offset, k_offset } => k_offset + j <= q_offset + i,
                    };
                    *sj = if visible {
                        let kr = &k[((bi * tk + j) * h_kv + g) * d..][..d];
                        scale
                            * qr.iter()
                                .zip(kr)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                    } else {
                        f64::NEG_INFINITY
                    };
                    mx = mx.max(*sj);
                }
                if mx == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let row = (bi * tq + i) * h + hh;
                lse[row] = (mx + sum.ln()) as f32;
                for p in 0..d {
                    let acc: f64 = (0..tk)
                        .map(|j| (s[j] - mx).exp() * v[((bi * tk + j) * h_kv + g) * d + p] as f64)
                        .sum();
                    out[row * d + p] = (acc / sum) as f32;
                }
            }
        }
    }
    (out, lse)
}
