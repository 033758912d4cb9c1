//! CPU RMSNorm (HF Qwen2RMSNorm): inp [N, D], weight [D] → out [N, D], rstd [N];
//! `out = weight · x · rstd`, `rstd = 1 / sqrt(mean(x²) + eps)`, all in f32.

use rayon::prelude::*;
use reel_tensor::Float;

/// Columns of `dweight` one rayon task sums over all rows.
const DWEIGHT_COLS: usize = 128;

pub(super) fn rmsnorm_forward<T: Float>(
    out: &mut [T],
    rstd: &mut [f32],
    inp: &[T],
    weight: &[T],
    d: usize,
    eps: f32,
) {
    out.par_chunks_mut(d)
        .zip(rstd.par_iter_mut())
        .zip(inp.par_chunks(d))
        .for_each(|((y, rs), x)| {
            let ss: f32 = x.iter().map(|v| v.to_f32() * v.to_f32()).sum();
            let r = 1.0 / (ss / d as f32 + eps).sqrt();
            *rs = r;
            for ((y, x), w) in y.iter_mut().zip(x).zip(weight) {
                *y = T::from_f32(w.to_f32() * (x.to_f32() * r));
            }
        });
}

/// With `x̂ = x · rstd` and `g = dout · weight`: `dx = rstd · (g − x̂ · mean(g · x̂))`,
/// `dweight += Σ_rows dout · x̂`.
#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_backward<T: Float>(
    dinp: &mut [T],
    dweight: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    rstd: &[f32],
    n: usize,
    d: usize,
) {
    dinp.par_chunks_mut(d)
        .zip(dout.par_chunks(d))
        .zip(inp.par_chunks(d))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), x), &r)| {
            let dot: f32 = dy
                .iter()
                .zip(x)
                .zip(weight)
                .map(|((g, x), w)| g.to_f32() * w.to_f32() * x.to_f32() * r)
                .sum();
            let mean = dot / d as f32;
            for (((dx, g), x), w) in dx.iter_mut().zip(dy).zip(x).zip(weight) {
                let xhat = x.to_f32() * r;
                *dx = T::from_f32(r * (g.to_f32() * w.to_f32() - xhat * mean));
            }
        });
    dweight
        .par_chunks_mut(DWEIGHT_COLS)
        .enumerate()
        .for_each(|(blk, dw)| {
            let c0 = blk * DWEIGHT_COLS;
            let cols = c0..c0 + dw.len();
            let mut acc: Vec<f32> = dw.iter().map(|v| v.to_f32()).collect();
            for row in 0..n {
                let r = rstd[row];
                let dy = &dout[row * d..][cols.clone()];
                let x = &inp[row * d..][cols.clone()];
                for ((a, g), x) in acc.iter_mut().zip(dy).zip(x) {
                    *a += g.to_f32() * x.to_f32() * r;
                }
            }
            dw.iter_mut()
                .zip(&acc)
                .for_each(|(w, &a)| *w = T::from_f32(a));
        });
}
