//! The one attention entry point the model calls.
//!
//! The model never knows how attention is computed or parallelised: it hands q/k/v for its tokens
//! to an [`AttentionOp`]. [`LocalAttention`] runs the tiled kernel over the whole sequence on this
//! process; sequence-parallel schedules implement the same trait over their shard.
//!
//! [`SharedPrefixAttention`] scores a group of G responses to one prompt as one packed row,
//! `[prefix ; seg_1 ; … ; seg_G]`: prefix rows attend causally among themselves, and each segment's
//! rows attend to the whole prefix and causally to their own segment, never to another segment.
//! Each segment's rows then compute exactly what they would as `prefix ++ seg_s` on their own,
//! but the prefix (a long video prompt) runs once instead of G times: GRPO's scoring and update
//! passes cost P + Σ L_s tokens instead of Σ (P + L_s), and attention P²/2 + Σ (P·L_s + L_s²/2)
//! instead of Σ (P + L_s)²/2. A segment's attention is two blocks, (seg, prefix) full and
//! (seg, seg) causal, merged by their lse ([`attention_merge`]); the backward runs each block
//! with the merged lse and `D = rowsum(dO ∘ O)` (DESIGN.md "Attention math"), so the prefix's
//! dK/dV sum over every segment that read it.

use std::ops::Range;

use reel_kernels::attention::{
    attention_backward, attention_backward_with_delta, attention_delta, attention_forward,
    attention_merge, AttnMask, AttnShape,
};

/// Why an attention implementation failed (a distributed one: a peer failed or timed out).
pub type AttentionError = Box<dyn std::error::Error + Send + Sync>;

/// Causal self-attention over the tokens of a batch: q [B, T, H, D], k/v [B, T, H_kv, D],
/// out [B, T, H, D], lse [B, T, H] (f32). Under sequence parallelism T is this rank's shard and
/// the implementation exchanges what it needs with the other ranks.
pub trait AttentionOp: Send + Sync {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError>;

    /// Overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError>;
}

/// Attention over the whole local sequence with the tiled CPU kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAttention;

const CAUSAL: AttnMask = AttnMask::Causal {
    q_offset: 0,
    k_offset: 0,
};

impl AttentionOp for LocalAttention {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        attention_forward(out, lse, q, k, v, shape, CAUSAL);
        Ok(())
    }

    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        attention_backward(dq, dk, dv, dout, q, k, v, out, lse, shape, CAUSAL);
        Ok(())
    }
}

/// The layout of one packed row of a [`SharedPrefixAttention`] batch: `prefix` shared rows, then
/// segments of the given lengths. Rows after the last segment (padding up to T) form one more
/// causal segment that does not see the prefix, so they neither read nor disturb real rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedRow {
    pub prefix: usize,
    pub segments: Vec<usize>,
}

/// Where queries `q` meet keys `k` (global positions of one packed row) under its mask: `Full`,
/// or `Causal` at the ranges' global starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubBlock {
    pub q: Range<usize>,
    pub k: Range<usize>,
    pub mask: AttnMask,
}

fn meet(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end).max(a.start.max(b.start))
}

impl PackedRow {
    /// Positions the prefix and segments take (padding excluded).
    pub fn used(&self) -> usize {
        self.prefix + self.segments.iter().sum::<usize>()
    }

    /// Checks that the row fits a sequence of `t` positions.
    pub fn check(&self, t: usize) -> Result<(), String> {
        match self.used() {
            u if u > t => Err(format!(
                "the packed row needs {u} positions, the batch has {t}"
            )),
            _ => Ok(()),
        }
    }

    /// The row's causal segments over `0..t` and whether each sees the prefix: the prefix, each
    /// non-empty segment, then the padding.
    fn parts(&self, t: usize) -> Vec<(Range<usize>, bool)> {
        let mut parts = Vec::with_capacity(self.segments.len() + 2);
        if self.prefix > 0 {
            parts.push((0..self.prefix, false));
        }
        let mut at = self.prefix;
        for &len in self.segments.iter().filter(|&&l| l > 0) {
            parts.push((at..at + len, self.prefix > 0));
            at += len;
        }
        if at < t {
            parts.push((at..t, false));
        }
        parts
    }

    /// The blocks in which queries `q` see keys `k` (global ranges within `0..t`): each part's
    /// queries with its own keys (causal) and, for segments, with the prefix's keys (full).
    /// Every allowed pair is in exactly one block, and every pair of a block is allowed under
    /// its mask, so a sequence-parallel block of a causal schedule refines into these.
    pub fn sub_blocks(&self, t: usize, q: Range<usize>, k: Range<usize>) -> Vec<SubBlock> {
        let mut out = Vec::new();
        for (part, sees_prefix) in self.parts(t) {
            let qs = meet(&part, &q);
            if qs.is_empty() {
                continue;
            }
            if sees_prefix {
                let kp = meet(&(0..self.prefix), &k);
                if !kp.is_empty() {
                    out.push(SubBlock {
                        q: qs.clone(),
                        k: kp,
                        mask: AttnMask::Full,
                    });
                }
            }
            let ks = meet(&part, &k);
            // Some key at or before the last query.
            if !ks.is_empty() && ks.start < qs.end {
                out.push(SubBlock {
                    mask: AttnMask::Causal {
                        q_offset: qs.start,
                        k_offset: ks.start,
                    },
                    q: qs,
                    k: ks,
                });
            }
        }
        out
    }
}

/// Attention over packed rows whose segments share a prefix (module docs). Batch row `b` of the
/// step follows `rows[b]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedPrefixAttention {
    pub rows: Vec<PackedRow>,
}

impl SharedPrefixAttention {
    pub fn new(rows: Vec<PackedRow>) -> Self {
        SharedPrefixAttention { rows }
    }

    /// Checks the layout against the step's shape.
    fn check(&self, shape: AttnShape) -> Result<(), AttentionError> {
        if shape.tq != shape.tk {
            return Err(format!(
                "shared-prefix attention is self-attention, got {} queries and {} keys",
                shape.tq, shape.tk
            )
            .into());
        }
        if self.rows.len() != shape.b {
            return Err(format!(
                "shared-prefix attention has {} packed rows, the batch has {}",
                self.rows.len(),
                shape.b
            )
            .into());
        }
        for (b, row) in self.rows.iter().enumerate() {
            row.check(shape.tq)
                .map_err(|e| format!("packed row {b}: {e}"))?;
        }
        Ok(())
    }
}

/// The flat range of rows `r` of a [n, heads, D] tensor (one batch row's block).
fn flat(r: &Range<usize>, heads: usize, d: usize) -> Range<usize> {
    r.start * heads * d..r.end * heads * d
}

/// [`AttnShape`] of one sub-block of a single batch row.
fn sub_shape(shape: AttnShape, sb: &SubBlock) -> AttnShape {
    AttnShape {
        b: 1,
        tq: sb.q.len(),
        tk: sb.k.len(),
        ..shape
    }
}

/// Forward of one batch row's sub-blocks: q `[n_q, H, D]`, k/v `[n_k, H_kv, D]` of the row's
/// query and key ranges starting at `q0` and `k0` (global); out `[n_q, H, D]` and lse `[n_q, H]`
/// are overwritten (rows no block reaches stay at (0, −inf)).
#[allow(clippy::too_many_arguments)]
pub fn packed_forward(
    blocks: &[SubBlock],
    (q0, k0): (usize, usize),
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
) {
    let (h, h_kv, d) = (shape.h, shape.h_kv, shape.d);
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
    let (mut o_b, mut l_b) = (Vec::new(), Vec::new());
    for sb in blocks {
        let (qs, ks) = (
            sb.q.start - q0..sb.q.end - q0,
            sb.k.start - k0..sb.k.end - k0,
        );
        o_b.resize(qs.len() * h * d, 0.0);
        l_b.resize(qs.len() * h, 0.0);
        attention_forward(
            &mut o_b,
            &mut l_b,
            &q[flat(&qs, h, d)],
            &k[flat(&ks, h_kv, d)],
            &v[flat(&ks, h_kv, d)],
            sub_shape(shape, sb),
            sb.mask,
        );
        attention_merge(
            &mut out[flat(&qs, h, d)],
            &mut lse[flat(&qs, h, 1)],
            &o_b,
            &l_b,
            qs.len() * h,
            d,
        );
    }
}

/// Backward of [`packed_forward`]'s blocks given the GLOBAL lse and D = rowsum(dout ∘ out) of
/// the query rows: ACCUMULATES into dq `[n_q, H, D]` and dk, dv `[n_k, H_kv, D]`.
#[allow(clippy::too_many_arguments)]
pub fn packed_backward(
    blocks: &[SubBlock],
    (q0, k0): (usize, usize),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    delta: &[f32],
    lse: &[f32],
    shape: AttnShape,
) {
    let (h, h_kv, d) = (shape.h, shape.h_kv, shape.d);
    for sb in blocks {
        let (qs, ks) = (
            sb.q.start - q0..sb.q.end - q0,
            sb.k.start - k0..sb.k.end - k0,
        );
        let (fq, fk) = (flat(&qs, h, d), flat(&ks, h_kv, d));
        attention_backward_with_delta(
            &mut dq[fq.clone()],
            &mut dk[fk.clone()],
            &mut dv[fk.clone()],
            &dout[fq.clone()],
            &q[fq],
            &k[fk.clone()],
            &v[fk],
            &delta[flat(&qs, h, 1)],
            &lse[flat(&qs, h, 1)],
            sub_shape(shape, sb),
            sb.mask,
        );
    }
}

impl AttentionOp for SharedPrefixAttention {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        self.check(shape)?;
        let (t, h, h_kv, d) = (shape.tq, shape.h, shape.h_kv, shape.d);
        for (b, row) in self.rows.iter().enumerate() {
            let all = b * t..(b + 1) * t;
            packed_forward(
                &row.sub_blocks(t, 0..t, 0..t),
                (0, 0),
                &mut out[flat(&all, h, d)],
                &mut lse[flat(&all, h, 1)],
                &q[flat(&all, h, d)],
                &k[flat(&all, h_kv, d)],
                &v[flat(&all, h_kv, d)],
                shape,
            );
        }
        Ok(())
    }

    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        self.check(shape)?;
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        let (t, h, h_kv, d) = (shape.tq, shape.h, shape.h_kv, shape.d);
        let mut delta = vec![0.0f32; lse.len()];
        attention_delta(&mut delta, dout, out, shape);
        for (b, row) in self.rows.iter().enumerate() {
            let all = b * t..(b + 1) * t;
            let (fq, fk) = (flat(&all, h, d), flat(&all, h_kv, d));
            packed_backward(
                &row.sub_blocks(t, 0..t, 0..t),
                (0, 0),
                &mut dq[fq.clone()],
                &mut dk[fk.clone()],
                &mut dv[fk.clone()],
                &dout[fq.clone()],
                &q[fq],
                &k[fk.clone()],
                &v[fk],
                &delta[flat(&all, h, 1)],
                &lse[flat(&all, h, 1)],
                shape,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use reel_tensor::{check_close, Tolerance};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Rows `r` of every head of a [1, T, heads, D] tensor.
    fn take(x: &[f32], w: usize, r: Range<usize>) -> Vec<f32> {
        x[r.start * w..r.end * w].to_vec()
    }

    /// Each segment of a packed row computes what `prefix ++ segment` computes alone, and the
    /// gradients are those of the G unpacked sequences summed (the prefix's dout counted once).
    #[test]
    fn packed_segments_match_their_unpacked_sequences() {
        let mut rng = reel_tensor::rng(7);
        for (prefix, segments, pad, h, h_kv, d) in [
            (5usize, vec![3usize, 1, 4], 2usize, 4usize, 2usize, 8usize),
            (70, vec![66, 2], 0, 2, 1, 16),
            (0, vec![3, 5], 1, 2, 2, 4),
            (1, vec![1], 3, 3, 1, 5),
        ] {
            let t = prefix + segments.iter().sum::<usize>() + pad;
            let (wq, wk) = (h * d, h_kv * d);
            let q = random(t * wq, &mut rng);
            let k = random(t * wk, &mut rng);
            let v = random(t * wk, &mut rng);
            let dout = random(t * wq, &mut rng);
            let shape = AttnShape {
                b: 1,
                tq: t,
                tk: t,
                h,
                h_kv,
                d,
            };
            let op = SharedPrefixAttention::new(vec![PackedRow {
                prefix,
                segments: segments.clone(),
            }]);
            let (mut out, mut lse) = (vec![0.0; t * wq], vec![0.0; t * h]);
            op.forward(&mut out, &mut lse, &q, &k, &v, shape).unwrap();
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; t * wq], vec![0.0; t * wk], vec![0.0; t * wk]);
            op.backward(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, shape,
            )
            .unwrap();

            let mut dk_prefix = vec![0.0f32; prefix * wk];
            let mut dv_prefix = vec![0.0f32; prefix * wk];
            let mut at = prefix;
            let tol = Tolerance::new(1e-5, 1e-4);
            for (s, &len) in segments.iter().enumerate() {
                let seg = at..at + len;
                let cat = |x: &[f32], w: usize| {
                    let mut c = take(x, w, 0..prefix);
                    c.extend(take(x, w, seg.clone()));
                    c
                };
                let n = prefix + len;
                let (qs, ks, vs) = (cat(&q, wq), cat(&k, wk), cat(&v, wk));
                let mut ds = cat(&dout, wq);
                if s > 0 {
                    // The prefix's own loss counted once, in the first sequence.
                    ds[..prefix * wq].fill(0.0);
                }
                let sh = AttnShape {
                    tq: n,
                    tk: n,
                    ..shape
                };
                let (mut o, mut l) = (vec![0.0; n * wq], vec![0.0; n * h]);
                LocalAttention
                    .forward(&mut o, &mut l, &qs, &ks, &vs, sh)
                    .unwrap();
                let (mut gq, mut gk, mut gv) =
                    (vec![0.0; n * wq], vec![0.0; n * wk], vec![0.0; n * wk]);
                LocalAttention
                    .backward(&mut gq, &mut gk, &mut gv, &ds, &qs, &ks, &vs, &o, &l, sh)
                    .unwrap();
                let what = |x: &str| format!("prefix {prefix} segment {s}: {x}");
                for (name, packed, alone, w) in [
                    ("out", &out, &o, wq),
                    ("lse", &lse, &l, h),
                    ("dq", &dq, &gq, wq),
                    ("dk", &dk, &gk, wk),
                    ("dv", &dv, &gv, wk),
                ] {
                    let got = take(packed, w, seg.clone());
                    check_close(&what(name), &got, &alone[prefix * w..], tol).unwrap();
                }
                if s == 0 {
                    check_close(
                        &what("prefix out"),
                        &out[..prefix * wq],
                        &o[..prefix * wq],
                        tol,
                    )
                    .unwrap();
                    check_close(
                        &what("prefix dq"),
                        &dq[..prefix * wq],
                        &gq[..prefix * wq],
                        tol,
                    )
                    .unwrap();
                }
                for (a, b) in dk_prefix.iter_mut().zip(&gk) {
                    *a += b;
                }
                for (a, b) in dv_prefix.iter_mut().zip(&gv) {
                    *a += b;
                }
                at += len;
            }
            check_close("prefix dk", &dk[..prefix * wk], &dk_prefix, tol).unwrap();
            check_close("prefix dv", &dv[..prefix * wk], &dv_prefix, tol).unwrap();
            // Padding rows attend among themselves only, and nothing real attends to them.
            let pad_rows = at..t;
            let n = pad_rows.len();
            if n > 0 {
                let sh = AttnShape {
                    tq: n,
                    tk: n,
                    ..shape
                };
                let (mut o, mut l) = (vec![0.0; n * wq], vec![0.0; n * h]);
                let (qs, ks, vs) = (
                    take(&q, wq, pad_rows.clone()),
                    take(&k, wk, pad_rows.clone()),
                    take(&v, wk, pad_rows.clone()),
                );
                LocalAttention
                    .forward(&mut o, &mut l, &qs, &ks, &vs, sh)
                    .unwrap();
                check_close("padding out", &take(&out, wq, pad_rows), &o, tol).unwrap();
            }
        }
    }

    /// Cut into q/k chunks of any size, the sub-blocks cover every allowed (query, key) pair
    /// exactly once and no other: the mask a sequence-parallel schedule's blocks refine into.
    #[test]
    fn sub_blocks_of_any_chunking_cover_exactly_the_mask() {
        let row = PackedRow {
            prefix: 4,
            segments: vec![3, 0, 5, 1],
        };
        let t = 16;
        let seg_of = |i: usize| -> (usize, usize) {
            // (segment id, start); 0 = prefix, then the segments, then padding.
            let mut at = row.prefix;
            if i < at {
                return (0, 0);
            }
            for (s, &l) in row.segments.iter().enumerate() {
                if i < at + l {
                    return (s + 1, at);
                }
                at += l;
            }
            (usize::MAX, at)
        };
        let allowed = |i: usize, j: usize| {
            let (si, _) = seg_of(i);
            let (sj, _) = seg_of(j);
            (si == sj && j <= i) || (si != 0 && si != usize::MAX && sj == 0)
        };
        for c in [1usize, 3, 4, 7, 16] {
            let mut seen = vec![0u32; t * t];
            for q0 in (0..t).step_by(c) {
                for k0 in (0..t).step_by(c) {
                    let (q, k) = (q0..(q0 + c).min(t), k0..(k0 + c).min(t));
                    for sb in row.sub_blocks(t, q.clone(), k.clone()) {
                        assert!(sb.q.start >= q.start && sb.q.end <= q.end);
                        assert!(sb.k.start >= k.start && sb.k.end <= k.end);
                        for i in sb.q.clone() {
                            for j in sb.k.clone() {
                                let on = match sb.mask {
                                    AttnMask::Full => true,
                                    AttnMask::Causal { q_offset, k_offset } => {
                                        k_offset + (j - sb.k.start) <= q_offset + (i - sb.q.start)
                                    }
                                };
                                if on {
                                    seen[i * t + j] += 1;
                                }
                            }
                        }
                    }
                }
            }
            for i in 0..t {
                for j in 0..t {
                    let want = u32::from(allowed(i, j));
                    assert_eq!(seen[i * t + j], want, "chunk {c}: query {i} key {j}");
                }
            }
        }
    }

    #[test]
    fn a_layout_that_does_not_fit_the_batch_is_an_error() {
        let shape = AttnShape {
            b: 1,
            tq: 4,
            tk: 4,
            h: 1,
            h_kv: 1,
            d: 2,
        };
        let x = vec![0.0f32; 8];
        let (mut out, mut lse) = (vec![0.0; 8], vec![0.0; 4]);
        let too_long = SharedPrefixAttention::new(vec![PackedRow {
            prefix: 2,
            segments: vec![2, 1],
        }]);
        let e = too_long
            .forward(&mut out, &mut lse, &x, &x, &x, shape)
            .unwrap_err();
        assert!(e.to_string().contains("needs 5 positions"), "{e}");
        let two_rows = SharedPrefixAttention::new(vec![PackedRow::default(); 2]);
        let e = two_rows
            .forward(&mut out, &mut lse, &x, &x, &x, shape)
            .unwrap_err();
        assert!(e.to_string().contains("2 packed rows"), "{e}");
    }
}
