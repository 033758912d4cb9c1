//! CPU GELU (exact, erf form): `y = ½·x·(1 + erf(x/√2))`, `dy/dx = Φ(x) + x·φ(x)`.

use rayon::prelude::*;
use reel_tensor::Float;

const MIN_PAR: usize = 1 << 14;

#[inline]
fn cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

pub(super) fn gelu_forward<T: Float>(out: &mut [T], inp: &[T]) {
    out.par_iter_mut()
        .with_min_len(MIN_PAR)
        .zip(inp.par_iter())
        .for_each(|(y, x)| {
            let x = x.to_f32() as f64;
            *y = T::from_f32((x * cdf(x)) as f32);
        });
}

pub(super) fn gelu_backward<T: Float>(dinp: &mut [T], dout: &[T], inp: &[T]) {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    dinp.par_iter_mut()
        .with_min_len(MIN_PAR)
        .zip(dout.par_iter().zip(inp.par_iter()))
        .for_each(|(dx, (dy, x))| {
            let x = x.to_f32() as f64;
            let pdf = (-0.5 * x * x).exp() * inv_sqrt_2pi;
            *dx = T::from_f32((dy.to_f32() as f64 * (cdf(x) + x * pdf)) as f32);
        });
}
