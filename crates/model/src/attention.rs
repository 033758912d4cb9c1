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

/// Attention over packed rows whose segments share a prefix (module docs). Batch row `b` of the
/// step follows `rows[b]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedPrefixAttention {
    pub rows: Vec<PackedRow>,
}

/// A segment of a packed row: its first row, its length and whether it sees the prefix.
struct Seg {
    start: usize,
    len: usize,
    sees_prefix: bool,
}

impl SharedPrefixAttention {
    pub fn new(rows: Vec<PackedRow>) -> Self {
        SharedPrefixAttention { rows }
    }

    /// Checks the layout against the step's shape and lists each row's segments.
    fn plan(&self, shape: AttnShape) -> Result<Vec<(usize, Vec<Seg>)>, AttentionError> {
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
        self.rows
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let used = row.prefix + row.segments.iter().sum::<usize>();
                if used > shape.tq {
                    return Err(format!(
                        "packed row {b} needs {used} positions, the batch has {}",
                        shape.tq
                    )
                    .into());
                }
                let mut segs = Vec::with_capacity(row.segments.len() + 1);
                let mut at = row.prefix;
                for &len in row.segments.iter().filter(|&&l| l > 0) {
                    segs.push(Seg {
                        start: at,
                        len,
                        sees_prefix: row.prefix > 0,
                    });
                    at += len;
                }
                if at < shape.tq {
                    segs.push(Seg {
                        start: at,
                        len: shape.tq - at,
                        sees_prefix: false,
                    });
                }
                Ok((row.prefix, segs))
            })
            .collect()
    }
}

/// The [1, n, heads, D] block of rows `start..start + n` of batch row `b` of a [B, T, heads, D]
/// tensor laid out flat.
fn rows_of(t: usize, heads: usize, d: usize, b: usize, start: usize, n: usize) -> Range<usize> {
    let w = heads * d;
    (b * t + start) * w..(b * t + start + n) * w
}

fn block_shape(shape: AttnShape, tq: usize, tk: usize) -> AttnShape {
    AttnShape {
        b: 1,
        tq,
        tk,
        ..shape
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
        let (t, h, h_kv, d) = (shape.tq, shape.h, shape.h_kv, shape.d);
        let mut o2 = Vec::new();
        let mut l2 = Vec::new();
        for (b, (p, segs)) in self.plan(shape)?.into_iter().enumerate() {
            let (kp, vp) = (
                &k[rows_of(t, h_kv, d, b, 0, p)],
                &v[rows_of(t, h_kv, d, b, 0, p)],
            );
            if p > 0 {
                let qr = rows_of(t, h, d, b, 0, p);
                attention_forward(
                    &mut out[qr.clone()],
                    &mut lse[rows_of(t, h, 1, b, 0, p)],
                    &q[qr],
                    kp,
                    vp,
                    block_shape(shape, p, p),
                    CAUSAL,
                );
            }
            for s in segs {
                let qr = rows_of(t, h, d, b, s.start, s.len);
                let lr = rows_of(t, h, 1, b, s.start, s.len);
                let kr = rows_of(t, h_kv, d, b, s.start, s.len);
                let own = block_shape(shape, s.len, s.len);
                if !s.sees_prefix {
                    attention_forward(
                        &mut out[qr.clone()],
                        &mut lse[lr],
                        &q[qr],
                        &k[kr.clone()],
                        &v[kr],
                        own,
                        CAUSAL,
                    );
                    continue;
                }
                attention_forward(
                    &mut out[qr.clone()],
                    &mut lse[lr.clone()],
                    &q[qr.clone()],
                    kp,
                    vp,
                    block_shape(shape, s.len, p),
                    AttnMask::Full,
                );
                o2.resize(qr.len(), 0.0);
                l2.resize(lr.len(), 0.0);
                attention_forward(
                    &mut o2,
                    &mut l2,
                    &q[qr.clone()],
                    &k[kr.clone()],
                    &v[kr],
                    own,
                    CAUSAL,
                );
                attention_merge(&mut out[qr], &mut lse[lr], &o2, &l2, s.len * h, d);
            }
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
        let plan = self.plan(shape)?;
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        let (t, h, h_kv, d) = (shape.tq, shape.h, shape.h_kv, shape.d);
        let mut delta = vec![0.0f32; lse.len()];
        attention_delta(&mut delta, dout, out, shape);
        for (b, (p, segs)) in plan.into_iter().enumerate() {
            // dk/dv of this row: the prefix block, then the segments after it.
            let row = rows_of(t, h_kv, d, b, 0, t);
            let split = p * h_kv * d;
            let (dk_p, dk_s) = dk[row.clone()].split_at_mut(split);
            let (dv_p, dv_s) = dv[row.clone()].split_at_mut(split);
            let (kp, vp) = (
                &k[row.start..row.start + split],
                &v[row.start..row.start + split],
            );
            if p > 0 {
                let qr = rows_of(t, h, d, b, 0, p);
                let lr = rows_of(t, h, 1, b, 0, p);
                attention_backward_with_delta(
                    &mut dq[qr.clone()],
                    dk_p,
                    dv_p,
                    &dout[qr.clone()],
                    &q[qr],
                    kp,
                    vp,
                    &delta[lr.clone()],
                    &lse[lr],
                    block_shape(shape, p, p),
                    CAUSAL,
                );
            }
            for s in segs {
                let qr = rows_of(t, h, d, b, s.start, s.len);
                let lr = rows_of(t, h, 1, b, s.start, s.len);
                let kr = rows_of(t, h_kv, d, b, s.start, s.len);
                // The segment's keys within this row's dk_s/dv_s (which start at the prefix's end).
                let local = (s.start - p) * h_kv * d..(s.start - p + s.len) * h_kv * d;
                if s.sees_prefix {
                    attention_backward_with_delta(
                        &mut dq[qr.clone()],
                        dk_p,
                        dv_p,
                        &dout[qr.clone()],
                        &q[qr.clone()],
                        kp,
                        vp,
                        &delta[lr.clone()],
                        &lse[lr.clone()],
                        block_shape(shape, s.len, p),
                        AttnMask::Full,
                    );
                }
                attention_backward_with_delta(
                    &mut dq[qr.clone()],
                    &mut dk_s[local.clone()],
                    &mut dv_s[local],
                    &dout[qr.clone()],
                    &q[qr],
                    &k[kr.clone()],
                    &v[kr],
                    &delta[lr.clone()],
                    &lse[lr],
                    block_shape(shape, s.len, s.len),
                    CAUSAL,
                );
            }
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
                check_close(
                    &what("out"),
                    &take(&out, wq, seg.clone()),
                    &o[prefix * wq..],
                    tol,
                )
                .unwrap();
                check_close(
                    &what("lse"),
                    &take(&lse, h, seg.clone()),
                    &l[prefix * h..],
                    tol,
                )
                .unwrap();
                check_close(
                    &what("dq"),
                    &take(&dq, wq, seg.clone()),
                    &gq[prefix * wq..],
                    tol,
                )
                .unwrap();
                check_close(
                    &what("dk"),
                    &take(&dk, wk, seg.clone()),
                    &gk[prefix * wk..],
                    tol,
                )
                .unwrap();
                check_close(
                    &what("dv"),
                    &take(&dv, wk, seg.clone()),
                    &gv[prefix * wk..],
                    tol,
                )
                .unwrap();
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
