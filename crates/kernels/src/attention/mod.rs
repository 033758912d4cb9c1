//! Scaled dot-product attention, flash style: q [B, Tq, H, D], k/v [B, Tk, H_kv, D] → out
//! [B, Tq, H, D] and lse [B, Tq, H] (f32).
//!
//! `out_i = Σ_j softmax_j(s·q_i·k_j) v_j`, `lse_i = ln Σ_j e^{s·q_i·k_j}`, `s = 1/√D`, over the
//! keys the mask lets row i see (FlashAttention-2, Dao 2023). Query head `hh` reads KV head
//! `hh / (H / H_kv)` (GQA/MQA). Tiles of 64 queries × 64 keys: extra memory is O(T·D), never
//! Tq×Tk. The causal mask takes global offsets, so any block of queries pairs with any block of
//! keys; partial results from key blocks combine exactly with [`attention_merge`] and the backward
//! of every block pair, given the global lse and `D = rowsum(dO ∘ O)` of the global out, sums to
//! the full gradient (DESIGN.md "Attention math").
//!
//! Backward comes in two forms with one implementation: [`attention_backward`] takes the forward's
//! out and computes D itself; [`attention_backward_with_delta`] takes D (from [`attention_delta`],
//! one f32 a row, laid out like lse), for callers that hold D but not out, e.g. a sequence-parallel
//! rank helping with another rank's queries, which is sent D instead of O.

pub(crate) mod cpu;

use reel_tensor::Float;

/// Batch, query length, key length, query heads, KV heads, head dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
}

/// Which (query, key) pairs may interact. Causal uses global positions so that a block of queries
/// can be paired with any block of keys (sequence parallelism): query i (global q_offset+i) sees
/// key j (global k_offset+j) iff k_offset+j <= q_offset+i.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnMask {
    Full,
    Causal { q_offset: usize, k_offset: usize },
}

fn check_shape(what: &str, shape: AttnShape) {
    let AttnShape { h, h_kv, d, .. } = shape;
    assert!(d > 0, "{what}: head dimension d must be positive");
    assert!(
        h_kv > 0 && h.is_multiple_of(h_kv),
        "{what}: h = {h} must be a positive multiple of h_kv = {h_kv}"
    );
}

fn check_len(what: &str, name: &str, len: usize, expected: usize) {
    assert_eq!(
        len, expected,
        "{what}: {name} has {len} elements, expected {expected}"
    );
}

/// q: [b, tq, h, d]; k, v: [b, tk, h_kv, d] (query head hh uses kv head hh / (h / h_kv));
/// out: [b, tq, h, d]; lse: [b, tq, h] in f32 — natural-log sum of exp of the scaled scores,
/// -inf for a row that sees no key (its out row is 0). scale = 1/sqrt(d). Overwrites out and lse.
pub fn attention_forward<T: Float>(
    out: &mut [T],
    lse: &mut [f32],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    mask: AttnMask,
) {
    attention_forward_tiled(out, lse, q, k, v, shape, mask, cpu::DEFAULT_TILES);
}

#[allow(clippy::too_many_arguments)]
fn attention_forward_tiled<T: Float>(
    out: &mut [T],
    lse: &mut [f32],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    mask: AttnMask,
    tiles: cpu::Tiles,
) {
    let w = "attention_forward";
    check_shape(w, shape);
    let AttnShape {
        b,
        tq,
        tk,
        h,
        h_kv,
        d,
    } = shape;
    check_len(w, "out", out.len(), b * tq * h * d);
    check_len(w, "lse", lse.len(), b * tq * h);
    check_len(w, "q", q.len(), b * tq * h * d);
    check_len(w, "k", k.len(), b * tk * h_kv * d);
    check_len(w, "v", v.len(), b * tk * h_kv * d);
    cpu::forward(out, lse, q, k, v, shape, mask, tiles);
}

/// ACCUMULATES (+=) into dq [b,tq,h,d], dk, dv [b,tk,h_kv,d] (so block pairs of a schedule can add
/// up; the caller zeroes first). Uses the forward's out and lse: D_i = rowsum(dout_i ∘ out_i);
/// P = exp(s·q kᵀ − lse); dV += Pᵀ dO; dP = dO Vᵀ; dS = P∘(dP − D); dQ += s·dS K;
/// dK += s·dSᵀ Q. Rows with lse = -inf contribute nothing. With a block of keys, pass the GLOBAL
/// out and lse (after merging every key block).
///
/// Equivalent, bit for bit, to [`attention_delta`] followed by [`attention_backward_with_delta`]
/// (which is what it does); call those two directly to compute D once for several key blocks.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
    shape: AttnShape,
    mask: AttnMask,
) {
    attention_backward_tiled(
        dq,
        dk,
        dv,
        dout,
        q,
        k,
        v,
        out,
        lse,
        shape,
        mask,
        cpu::DEFAULT_TILES,
    );
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_tiled<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
    shape: AttnShape,
    mask: AttnMask,
    tiles: cpu::Tiles,
) {
    let w = "attention_backward";
    check_shape(w, shape);
    let AttnShape { b, tq, h, d, .. } = shape;
    check_len(w, "dout", dout.len(), b * tq * h * d);
    check_len(w, "out", out.len(), b * tq * h * d);
    let mut delta = vec![0.0f32; b * tq * h];
    cpu::delta(&mut delta, dout, out, d);
    attention_backward_with_delta_tiled(
        w, dq, dk, dv, dout, q, k, v, &delta, lse, shape, mask, tiles,
    );
}

/// `D = rowsum(dout ∘ out)`: delta `[b, tq, h]` (f32, laid out like lse, overwritten) from dout and
/// the forward's out `[b, tq, h, d]` (`shape.tk` and `shape.h_kv` are not read). Products and sums
/// in f32, in the order [`attention_backward`] uses, so [`attention_backward_with_delta`] given this
/// D equals [`attention_backward`] given out bit for bit. With sequence parallelism, compute D of
/// a query block once, from its GLOBAL out, and reuse it for every key block.
pub fn attention_delta<T: Float>(delta: &mut [f32], dout: &[T], out: &[T], shape: AttnShape) {
    let w = "attention_delta";
    assert!(shape.d > 0, "{w}: head dimension d must be positive");
    let AttnShape { b, tq, h, d, .. } = shape;
    check_len(w, "delta", delta.len(), b * tq * h);
    check_len(w, "dout", dout.len(), b * tq * h * d);
    check_len(w, "out", out.len(), b * tq * h * d);
    cpu::delta(delta, dout, out, d);
}

/// [`attention_backward`] given `D = rowsum(dout ∘ out)` instead of out: delta `[b, tq, h]` (f32,
/// laid out like lse; from [`attention_delta`], or received from the rank that holds out).
/// ACCUMULATES (+=) into dq [b,tq,h,d], dk, dv [b,tk,h_kv,d] exactly as [`attention_backward`]
/// does; with a block of keys, pass the D and lse of the GLOBAL out. Rows with lse = -inf
/// contribute nothing whatever their D.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with_delta<T: Float>(
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
) {
    attention_backward_with_delta_tiled(
        "attention_backward_with_delta",
        dq,
        dk,
        dv,
        dout,
        q,
        k,
        v,
        delta,
        lse,
        shape,
        mask,
        cpu::DEFAULT_TILES,
    );
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_with_delta_tiled<T: Float>(
    w: &str,
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
    tiles: cpu::Tiles,
) {
    check_shape(w, shape);
    let AttnShape {
        b,
        tq,
        tk,
        h,
        h_kv,
        d,
    } = shape;
    let (nq, nk) = (b * tq * h * d, b * tk * h_kv * d);
    check_len(w, "dq", dq.len(), nq);
    check_len(w, "dk", dk.len(), nk);
    check_len(w, "dv", dv.len(), nk);
    check_len(w, "dout", dout.len(), nq);
    check_len(w, "q", q.len(), nq);
    check_len(w, "k", k.len(), nk);
    check_len(w, "v", v.len(), nk);
    check_len(w, "delta", delta.len(), b * tq * h);
    check_len(w, "lse", lse.len(), b * tq * h);
    cpu::backward(dq, dk, dv, dout, q, k, v, delta, lse, shape, mask, tiles);
}

/// Merge a partial (o_b, lse_b) into the running (o, lse), fp32, per DESIGN.md:
/// lse' = lse − logsigmoid(lse − lse_b); o' = o − sigmoid(lse_b − lse)·(o − o_b); rows where both
/// are -inf stay (0, -inf). o, o_b: [rows, d]; lse, lse_b: [rows]. A row with lse = -inf takes
/// (o_b, lse_b) as is.
pub fn attention_merge(
    o: &mut [f32],
    lse: &mut [f32],
    o_b: &[f32],
    lse_b: &[f32],
    rows: usize,
    d: usize,
) {
    let w = "attention_merge";
    check_len(w, "o", o.len(), rows * d);
    check_len(w, "o_b", o_b.len(), rows * d);
    check_len(w, "lse", lse.len(), rows);
    check_len(w, "lse_b", lse_b.len(), rows);
    cpu::merge(o, lse, o_b, lse_b, d);
}

/// Naive reference that materialises the scores (tests only, f64 softmax): returns (out, lse).
pub fn attention_forward_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    mask: AttnMask,
) -> (Vec<f32>, Vec<f32>) {
    check_shape("attention_forward_ref", shape);
    cpu::forward_ref(q, k, v, shape, mask)
}

#[cfg(test)]
mod tests {
    use super::cpu::Tiles;
    use super::*;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{bf16, check_close, convert, rng, uniform_vec, Tolerance};

    const F32_TOL: Tolerance = Tolerance::new(1e-5, 1e-4);

    fn shape(b: usize, tq: usize, tk: usize, h: usize, h_kv: usize, d: usize) -> AttnShape {
        AttnShape {
            b,
            tq,
            tk,
            h,
            h_kv,
            d,
        }
    }

    fn causal(q_offset: usize, k_offset: usize) -> AttnMask {
        AttnMask::Causal { q_offset, k_offset }
    }

    fn inputs(s: AttnShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut r = rng(seed);
        let q = uniform_vec(&mut r, s.b * s.tq * s.h * s.d, 1.5);
        let k = uniform_vec(&mut r, s.b * s.tk * s.h_kv * s.d, 1.5);
        let v = uniform_vec(&mut r, s.b * s.tk * s.h_kv * s.d, 1.0);
        (q, k, v)
    }

    /// lse may hold -inf: the pattern of -inf must match exactly, the rest within `tol`.
    fn check_lse(what: &str, actual: &[f32], expected: &[f32], tol: Tolerance) {
        assert_eq!(actual.len(), expected.len(), "{what}: length");
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert_eq!(
                *a == f32::NEG_INFINITY,
                *e == f32::NEG_INFINITY,
                "{what}[{i}]: {a} vs {e}"
            );
        }
        let finite = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .map(|&v| if v == f32::NEG_INFINITY { 0.0 } else { v })
                .collect()
        };
        check_close(what, &finite(actual), &finite(expected), tol).unwrap();
    }

    fn forward_f32(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
        mask: AttnMask,
        tiles: Tiles,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; s.b * s.tq * s.h * s.d];
        let mut lse = vec![f32::NAN; s.b * s.tq * s.h];
        attention_forward_tiled(&mut out, &mut lse, q, k, v, s, mask, tiles);
        (out, lse)
    }

    #[test]
    fn forward_matches_reference() {
        let small = Tiles { q: 4, k: 8 };
        let odd = Tiles { q: 7, k: 5 };
        let big = Tiles { q: 128, k: 128 };
        let cases = [
            (shape(1, 16, 16, 4, 4, 8), causal(0, 0)),
            (shape(1, 16, 16, 4, 2, 8), AttnMask::Full),
            (shape(1, 16, 16, 4, 1, 8), causal(0, 0)),
            (shape(1, 37, 37, 4, 2, 8), causal(0, 0)),
            (shape(1, 37, 37, 4, 1, 8), AttnMask::Full),
            (shape(2, 37, 37, 4, 4, 8), causal(0, 0)),
            (shape(2, 5, 19, 4, 2, 16), causal(14, 0)),
            (shape(1, 5, 19, 4, 1, 8), causal(7, 3)),
            (shape(2, 5, 19, 4, 4, 8), AttnMask::Full),
            (shape(1, 19, 5, 2, 1, 8), causal(0, 6)),
            (shape(2, 70, 70, 2, 1, 16), causal(0, 0)),
        ];
        for (ci, (s, mask)) in cases.into_iter().enumerate() {
            let (q, k, v) = inputs(s, 100 + ci as u64);
            let (out_r, lse_r) = attention_forward_ref(&q, &k, &v, s, mask);
            assert!(out_r.iter().any(|&x| x != 0.0));
            for tiles in [small, odd, cpu::DEFAULT_TILES, big] {
                let what = format!("case {ci} {s:?} {mask:?} {tiles:?}");
                let (out, lse) = forward_f32(&q, &k, &v, s, mask, tiles);
                check_close(&format!("{what} out"), &out, &out_r, F32_TOL).unwrap();
                check_lse(&format!("{what} lse"), &lse, &lse_r, F32_TOL);
            }
        }
    }

    #[test]
    fn rows_without_keys_give_neg_inf_lse_and_zero_out() {
        // Every key lies after every query.
        let s = shape(2, 5, 8, 4, 2, 8);
        let (q, k, v) = inputs(s, 7);
        let mut out = vec![f32::NAN; s.b * s.tq * s.h * s.d];
        let mut lse = vec![f32::NAN; s.b * s.tq * s.h];
        attention_forward(&mut out, &mut lse, &q, &k, &v, s, causal(0, 10));
        assert!(lse.iter().all(|&l| l == f32::NEG_INFINITY), "{lse:?}");
        assert!(out.iter().all(|&o| o == 0.0), "{out:?}");
        // Its backward adds nothing, even with a nonzero dout.
        let mut r = rng(8);
        let dout = uniform_vec(&mut r, out.len(), 1.0);
        let mut dq = vec![0.0f32; q.len()];
        let mut dk = vec![0.0f32; k.len()];
        let mut dv = vec![0.0f32; v.len()];
        attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            &q,
            &k,
            &v,
            &out,
            &lse,
            s,
            causal(0, 10),
        );
        assert!(dq.iter().chain(&dk).chain(&dv).all(|&x| x == 0.0));
    }

    /// The analytic backward (accumulating onto random initial values) against central
    /// differences of a probe loss through the f64 reference.
    #[test]
    fn backward_matches_numeric_grad() {
        let tol = Tolerance::new(2e-3, 2e-2);
        let cases = [
            (shape(1, 6, 6, 2, 2, 4), causal(0, 0), Tiles { q: 4, k: 4 }),
            (
                shape(1, 5, 7, 4, 2, 4),
                AttnMask::Full,
                Tiles { q: 2, k: 3 },
            ),
            (shape(2, 5, 7, 4, 1, 4), causal(1, 0), Tiles { q: 3, k: 2 }),
            // Rows 0..2 see no key at all.
            (shape(1, 6, 5, 2, 1, 4), causal(0, 3), cpu::DEFAULT_TILES),
        ];
        for (ci, (s, mask, tiles)) in cases.into_iter().enumerate() {
            let (q, k, v) = inputs(s, 200 + ci as u64);
            let mut r = rng(300 + ci as u64);
            let w = uniform_vec(&mut r, s.b * s.tq * s.h * s.d, 1.0);
            let (out, lse) = forward_f32(&q, &k, &v, s, mask, tiles);
            let dq0 = uniform_vec(&mut r, q.len(), 1.0);
            let dk0 = uniform_vec(&mut r, k.len(), 1.0);
            let dv0 = uniform_vec(&mut r, v.len(), 1.0);
            let (mut dq, mut dk, mut dv) = (dq0.clone(), dk0.clone(), dv0.clone());
            attention_backward_tiled(
                &mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &out, &lse, s, mask, tiles,
            );
            let sub = |a: &[f32], b: &[f32]| -> Vec<f32> {
                a.iter().zip(b).map(|(x, y)| x - y).collect()
            };
            let loss = |q: &[f32], k: &[f32], v: &[f32]| {
                probe_loss(&attention_forward_ref(q, k, v, s, mask).0, &w)
            };
            let eps = 1e-2;
            let nq = numeric_grad(&q, eps, |x| loss(x, &k, &v));
            let nk = numeric_grad(&k, eps, |x| loss(&q, x, &v));
            let nv = numeric_grad(&v, eps, |x| loss(&q, &k, x));
            assert!(nq.iter().any(|&x| x.abs() > 1e-3), "case {ci}: dq all ~0");
            let what = format!("case {ci} {s:?} {mask:?}");
            check_close(&format!("{what} dq"), &sub(&dq, &dq0), &nq, tol).unwrap();
            check_close(&format!("{what} dk"), &sub(&dk, &dk0), &nk, tol).unwrap();
            check_close(&format!("{what} dv"), &sub(&dv, &dv0), &nv, tol).unwrap();
        }
    }

    /// Rows `range` of a `[b, t, heads, d]` tensor along t.
    fn slice_t(x: &[f32], b: usize, t: usize, w: usize, range: std::ops::Range<usize>) -> Vec<f32> {
        (0..b)
            .flat_map(|bi| {
                x[(bi * t + range.start) * w..(bi * t + range.end) * w]
                    .iter()
                    .copied()
            })
            .collect()
    }

    /// Writes `src` (rows `range` along t) back into `dst`.
    fn place_t(
        dst: &mut [f32],
        src: &[f32],
        b: usize,
        t: usize,
        w: usize,
        range: std::ops::Range<usize>,
    ) {
        let n = range.len() * w;
        for bi in 0..b {
            dst[(bi * t + range.start) * w..(bi * t + range.end) * w]
                .copy_from_slice(&src[bi * n..(bi + 1) * n]);
        }
    }

    /// Sequence parallelism in miniature: queries and keys cut into blocks at `cuts`; each query
    /// block merges its partials over every key block (fully masked pairs included), and the block
    /// backwards with the merged (global) lse and the D of the merged out add up to the one-shot
    /// gradient.
    #[test]
    fn key_blocks_merge_and_block_backwards_sum_to_one_shot() {
        let cases = [
            (shape(2, 37, 37, 4, 2, 8), true, vec![0, 13, 37]),
            (shape(1, 40, 40, 4, 1, 8), true, vec![0, 10, 20, 30, 40]),
            (shape(1, 21, 33, 4, 4, 8), false, vec![0, 20, 33]),
        ];
        let tiles = Tiles { q: 8, k: 8 };
        for (ci, (s, is_causal, cuts)) in cases.into_iter().enumerate() {
            let (q, k, v) = inputs(s, 400 + ci as u64);
            let mut r = rng(500 + ci as u64);
            let dout = uniform_vec(&mut r, s.b * s.tq * s.h * s.d, 1.0);
            let mask_for = |q0: usize, k0: usize| {
                if is_causal {
                    causal(q0, k0)
                } else {
                    AttnMask::Full
                }
            };
            let (qw, kw) = (s.h * s.d, s.h_kv * s.d);
            let (out1, lse1) = forward_f32(&q, &k, &v, s, mask_for(0, 0), tiles);
            let mut dq1 = vec![0.0f32; q.len()];
            let mut dk1 = vec![0.0f32; k.len()];
            let mut dv1 = vec![0.0f32; v.len()];
            attention_backward_tiled(
                &mut dq1,
                &mut dk1,
                &mut dv1,
                &dout,
                &q,
                &k,
                &v,
                &out1,
                &lse1,
                s,
                mask_for(0, 0),
                tiles,
            );

            // Query blocks: q cut at the same places when tq == tk, else one block.
            let q_cuts = if s.tq == s.tk {
                cuts.clone()
            } else {
                vec![0, s.tq]
            };
            let k_blocks: Vec<_> = cuts.windows(2).map(|c| c[0]..c[1]).collect();
            let mut out2 = vec![0.0f32; out1.len()];
            let mut lse2 = vec![0.0f32; lse1.len()];
            let mut dq2 = vec![0.0f32; q.len()];
            let mut dk2 = vec![0.0f32; k.len()];
            let mut dv2 = vec![0.0f32; v.len()];
            for qr in q_cuts.windows(2).map(|c| c[0]..c[1]) {
                let qb = slice_t(&q, s.b, s.tq, qw, qr.clone());
                let dob = slice_t(&dout, s.b, s.tq, qw, qr.clone());
                let mut o = vec![0.0f32; qb.len()];
                let mut l = vec![f32::NEG_INFINITY; s.b * qr.len() * s.h];
                let kv_of = |kr: &std::ops::Range<usize>| {
                    let sb = AttnShape {
                        tq: qr.len(),
                        tk: kr.len(),
                        ..s
                    };
                    let kb = slice_t(&k, s.b, s.tk, kw, kr.clone());
                    let vb = slice_t(&v, s.b, s.tk, kw, kr.clone());
                    (sb, kb, vb)
                };
                for kr in &k_blocks {
                    let (sb, kb, vb) = kv_of(kr);
                    let (ob, lb) =
                        forward_f32(&qb, &kb, &vb, sb, mask_for(qr.start, kr.start), tiles);
                    attention_merge(&mut o, &mut l, &ob, &lb, lb.len(), s.d);
                }
                place_t(&mut out2, &o, s.b, s.tq, qw, qr.clone());
                place_t(&mut lse2, &l, s.b, s.tq, s.h, qr.clone());
                // Backward of each block pair with this query block's global lse and the D of its
                // global out, computed once.
                let mut delta = vec![0.0f32; l.len()];
                attention_delta(&mut delta, &dob, &o, kv_of(&k_blocks[0]).0);
                let mut dqb = vec![0.0f32; qb.len()];
                for kr in &k_blocks {
                    let (sb, kb, vb) = kv_of(kr);
                    let mut dkb = slice_t(&dk2, s.b, s.tk, kw, kr.clone());
                    let mut dvb = slice_t(&dv2, s.b, s.tk, kw, kr.clone());
                    attention_backward_with_delta_tiled(
                        "block",
                        &mut dqb,
                        &mut dkb,
                        &mut dvb,
                        &dob,
                        &qb,
                        &kb,
                        &vb,
                        &delta,
                        &l,
                        sb,
                        mask_for(qr.start, kr.start),
                        tiles,
                    );
                    place_t(&mut dk2, &dkb, s.b, s.tk, kw, kr.clone());
                    place_t(&mut dv2, &dvb, s.b, s.tk, kw, kr.clone());
                }
                place_t(&mut dq2, &dqb, s.b, s.tq, qw, qr);
            }
            let what = format!("case {ci} {s:?} causal={is_causal}");
            check_close(&format!("{what} out"), &out2, &out1, F32_TOL).unwrap();
            check_lse(&format!("{what} lse"), &lse2, &lse1, F32_TOL);
            let tol = Tolerance::new(1e-5, 1e-4);
            check_close(&format!("{what} dq"), &dq2, &dq1, tol).unwrap();
            check_close(&format!("{what} dk"), &dk2, &dk1, tol).unwrap();
            check_close(&format!("{what} dv"), &dv2, &dv1, tol).unwrap();
        }
    }

    #[test]
    fn merge_handles_neg_inf_rows() {
        let d = 3;
        let o = vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0];
        let lse = vec![0.5, f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY];
        let o_b = vec![-1.0, 0.5, 2.0, 7.0, 8.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let lse_b = vec![1.5, -0.25, f32::NEG_INFINITY, f32::NEG_INFINITY];
        let (mut om, mut lm) = (o.clone(), lse.clone());
        attention_merge(&mut om, &mut lm, &o_b, &lse_b, 4, d);
        // Row 0 by direct weighting in f64.
        let (a, b) = (0.5f64.exp(), 1.5f64.exp());
        let expect0: Vec<f32> = (0..d)
            .map(|p| ((a * o[p] as f64 + b * o_b[p] as f64) / (a + b)) as f32)
            .collect();
        check_close("row 0 o", &om[..d], &expect0, F32_TOL).unwrap();
        check_close("row 0 lse", &lm[..1], &[(a + b).ln() as f32], F32_TOL).unwrap();
        assert_eq!(&om[d..2 * d], &o_b[d..2 * d]);
        assert_eq!(lm[1], -0.25);
        assert_eq!(&om[2 * d..3 * d], &o[2 * d..3 * d]);
        assert_eq!(lm[2], 2.0);
        assert_eq!(&om[3 * d..], &[0.0; 3]);
        assert_eq!(lm[3], f32::NEG_INFINITY);
        // Far-apart lse values stay finite and pick the larger side.
        let (mut o2, mut l2) = (vec![1.0f32], vec![-200.0f32]);
        attention_merge(&mut o2, &mut l2, &[3.0], &[200.0], 1, 1);
        assert_eq!((o2[0], l2[0]), (3.0, 200.0));
    }

    #[test]
    fn bf16_matches_f32() {
        let s = shape(2, 37, 37, 4, 2, 16);
        let mask = causal(0, 0);
        let (q, k, v) = inputs(s, 600);
        let (qb, kb, vb): (Vec<bf16>, Vec<bf16>, Vec<bf16>) =
            (convert(&q), convert(&k), convert(&v));
        let (qr, kr, vr): (Vec<f32>, Vec<f32>, Vec<f32>) =
            (convert(&qb), convert(&kb), convert(&vb));
        let (out_r, lse_r) = forward_f32(&qr, &kr, &vr, s, mask, cpu::DEFAULT_TILES);
        let mut out = vec![bf16::from_f32(f32::NAN); out_r.len()];
        let mut lse = vec![f32::NAN; lse_r.len()];
        attention_forward(&mut out, &mut lse, &qb, &kb, &vb, s, mask);
        let bf_tol = Tolerance::new(1e-2, 1e-2);
        check_close("bf16 out", &convert(&out), &out_r, bf_tol).unwrap();
        check_lse("bf16 lse", &lse, &lse_r, F32_TOL);

        let mut r = rng(601);
        let dout = uniform_vec(&mut r, out_r.len(), 1.0);
        let dout_b: Vec<bf16> = convert(&dout);
        let mut dq = vec![0.0f32; q.len()];
        let mut dk = vec![0.0f32; k.len()];
        let mut dv = vec![0.0f32; v.len()];
        let dout_r: Vec<f32> = convert(&dout_b);
        attention_backward(
            &mut dq, &mut dk, &mut dv, &dout_r, &qr, &kr, &vr, &out_r, &lse_r, s, mask,
        );
        let mut dqb = vec![bf16::ZERO; q.len()];
        let mut dkb = vec![bf16::ZERO; k.len()];
        let mut dvb = vec![bf16::ZERO; v.len()];
        attention_backward(
            &mut dqb, &mut dkb, &mut dvb, &dout_b, &qb, &kb, &vb, &out, &lse, s, mask,
        );
        let grad_tol = Tolerance::new(3e-2, 3e-2);
        check_close("bf16 dq", &convert(&dqb), &dq, grad_tol).unwrap();
        check_close("bf16 dk", &convert(&dkb), &dk, grad_tol).unwrap();
        check_close("bf16 dv", &convert(&dvb), &dv, grad_tol).unwrap();
    }

    /// `attention_delta` + `attention_backward_with_delta` is `attention_backward`, bit for bit, in
    /// f32 and bf16 (GQA, offsets, rows without keys, accumulating onto nonzero gradients); D is
    /// rowsum(dO ∘ O) and is what the with-delta entry reads.
    #[test]
    fn backward_with_delta_equals_backward_bit_for_bit() {
        fn run<T: Float>(
            s: AttnShape,
            mask: AttnMask,
            ci: usize,
            conv: impl Fn(&[f32]) -> Vec<T>,
        ) -> Vec<f32> {
            let (q, k, v) = inputs(s, 800 + ci as u64);
            let mut r = rng(900 + ci as u64);
            let dout = conv(&uniform_vec(&mut r, q.len(), 1.0));
            let (dq0, dk0, dv0) = (
                conv(&uniform_vec(&mut r, q.len(), 1.0)),
                conv(&uniform_vec(&mut r, k.len(), 1.0)),
                conv(&uniform_vec(&mut r, v.len(), 1.0)),
            );
            let (q, k, v) = (conv(&q), conv(&k), conv(&v));
            let mut out = conv(&vec![f32::NAN; q.len()]);
            let mut lse = vec![f32::NAN; s.b * s.tq * s.h];
            attention_forward(&mut out, &mut lse, &q, &k, &v, s, mask);

            let (mut dq1, mut dk1, mut dv1) = (dq0.clone(), dk0.clone(), dv0.clone());
            attention_backward(
                &mut dq1, &mut dk1, &mut dv1, &dout, &q, &k, &v, &out, &lse, s, mask,
            );
            let mut delta = vec![f32::NAN; lse.len()];
            attention_delta(&mut delta, &dout, &out, s);
            let (mut dq2, mut dk2, mut dv2) = (dq0.clone(), dk0.clone(), dv0.clone());
            attention_backward_with_delta(
                &mut dq2, &mut dk2, &mut dv2, &dout, &q, &k, &v, &delta, &lse, s, mask,
            );
            let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
            let what = format!("case {ci} {s:?} {mask:?} {}", std::any::type_name::<T>());
            assert_eq!(bits(&dq2), bits(&dq1), "{what} dq");
            assert_eq!(bits(&dk2), bits(&dk1), "{what} dk");
            assert_eq!(bits(&dv2), bits(&dv1), "{what} dv");
            assert!(bits(&dq1) != bits(&dq0), "{what}: dq unchanged");

            // D is rowsum(dO ∘ O) (f64 check).
            let expect: Vec<f32> = dout
                .chunks_exact(s.d)
                .zip(out.chunks_exact(s.d))
                .map(|(g, o)| {
                    g.iter()
                        .zip(o)
                        .map(|(g, o)| g.to_f32() as f64 * o.to_f32() as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            check_close(&format!("{what} delta"), &delta, &expect, F32_TOL).unwrap();

            // The with-delta entry reads the D it is given: another D changes dq (and dk where a
            // row sees keys) but not dv, which does not depend on D.
            let shifted: Vec<f32> = delta.iter().map(|x| x + 0.5).collect();
            let (mut dq3, mut dk3, mut dv3) = (dq0.clone(), dk0.clone(), dv0.clone());
            attention_backward_with_delta(
                &mut dq3, &mut dk3, &mut dv3, &dout, &q, &k, &v, &shifted, &lse, s, mask,
            );
            assert_eq!(bits(&dv3), bits(&dv1), "{what} dv with another D");
            assert!(bits(&dq3) != bits(&dq1), "{what}: dq ignores D");
            delta
        }
        let cases = [
            (shape(1, 16, 16, 4, 4, 8), causal(0, 0)),
            (shape(2, 37, 37, 4, 2, 8), causal(0, 0)),
            (shape(1, 70, 70, 4, 1, 16), AttnMask::Full),
            (shape(2, 5, 19, 4, 2, 16), causal(14, 0)),
            // Rows 0..2 see no key at all.
            (shape(1, 6, 5, 2, 1, 4), causal(0, 3)),
            (shape(2, 130, 70, 2, 1, 8), causal(0, 60)),
        ];
        for (ci, (s, mask)) in cases.into_iter().enumerate() {
            let d32 = run::<f32>(s, mask, ci, |x| x.to_vec());
            let d16 = run::<bf16>(s, mask, ci, convert);
            check_close("bf16 delta vs f32", &d16, &d32, Tolerance::new(3e-2, 3e-2)).unwrap();
        }
    }

    /// attention_delta refuses a delta of the wrong length.
    #[test]
    #[should_panic(expected = "attention_delta: delta has 3 elements, expected 4")]
    fn delta_checks_lengths() {
        let s = shape(1, 2, 2, 2, 1, 3);
        let x = vec![0.0f32; 12];
        attention_delta(&mut [0.0; 3], &x, &x, s);
    }

    /// `cargo test --release -p reel-kernels attention_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn attention_timing() {
        let s = shape(1, 512, 512, 8, 2, 64);
        let mask = causal(0, 0);
        let (q, k, v) = inputs(s, 700);
        let mut out = vec![0.0f32; q.len()];
        let mut lse = vec![0.0f32; s.b * s.tq * s.h];
        let dout = uniform_vec(&mut rng(701), q.len(), 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        for it in 0..6 {
            let t0 = std::time::Instant::now();
            attention_forward(&mut out, &mut lse, &q, &k, &v, s, mask);
            let t1 = std::time::Instant::now();
            attention_backward(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, s, mask,
            );
            let t2 = std::time::Instant::now();
            println!(
                "iter {it}: forward {:.2} ms, backward {:.2} ms ({} threads)",
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3,
                rayon::current_num_threads()
            );
        }
    }
}
