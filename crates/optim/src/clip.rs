//! Gradient clipping by global L2 norm, torch.nn.utils.clip_grad_norm_ semantics:
//! `norm = sqrt(Σ_i Σ_j g_ij²)` over every gradient, `scale = max_norm / (norm + 1e-6)`, and the
//! gradients are multiplied by `scale` only when it is below 1.
//!
//! Squares are summed in f64 (per chunk, in parallel for large tensors), so the norm of billions
//! of elements does not drift.

use rayon::prelude::*;

use crate::PAR_CHUNK;

fn sum_squares(g: &[f32]) -> f64 {
    let serial = |c: &[f32]| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    if g.len() >= PAR_CHUNK {
        g.par_chunks(PAR_CHUNK).map(serial).sum()
    } else {
        serial(g)
    }
}

/// The L2 norm of all gradients together, accumulated in f64. Non-finite when any element is.
pub fn global_grad_norm(grads: &[&[f32]]) -> f32 {
    grads.iter().map(|g| sum_squares(g)).sum::<f64>().sqrt() as f32
}

/// Scales `grads` in place so their global norm is at most about `max_norm`; returns the norm
/// before clipping. A NaN norm leaves the gradients untouched and an infinite one zeroes them
/// (torch's arithmetic): check the returned norm with `is_finite` before stepping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let norm = {
        let shared: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        global_grad_norm(&shared)
    };
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for g in grads.iter_mut() {
            if g.len() >= PAR_CHUNK {
                g.par_chunks_mut(PAR_CHUNK)
                    .for_each(|c| c.iter_mut().for_each(|x| *x *= scale));
            } else {
                g.iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_over_several_tensors() {
        let a = [3.0f32, 0.0];
        let b = [4.0f32];
        assert_eq!(global_grad_norm(&[&a, &b]), 5.0);
        assert_eq!(global_grad_norm(&[]), 0.0);
    }

    #[test]
    fn norm_of_a_large_tensor_is_accurate() {
        // 2^20 elements of 1e-3 (+ tail): f32 running sums would drift; f64 chunks do not.
        let n = (1 << 20) + 3;
        let g = vec![1e-3f32; n];
        let want = ((n as f64) * (1e-3f32 as f64).powi(2)).sqrt();
        let got = global_grad_norm(&[&g]) as f64;
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn clips_when_above_max_norm() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let pre = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(pre, 5.0);
        let scale = 1.0f32 / (5.0 + 1e-6);
        assert_eq!(a, vec![3.0 * scale, 0.0]);
        assert_eq!(b, vec![4.0 * scale]);
        let post = global_grad_norm(&[&a, &b]);
        assert!((post - 1.0).abs() < 1e-6, "{post}");
    }

    #[test]
    fn leaves_small_gradients_alone() {
        let mut a = vec![0.3f32, -0.4];
        let pre = clip_grad_norm(&mut [&mut a], 1.0);
        assert!((pre - 0.5).abs() < 1e-7);
        assert_eq!(a, vec![0.3, -0.4]);
        // Exactly at max_norm the scale is just below 1 (the 1e-6): torch clips, and so do we.
        let mut b = vec![1.0f32];
        clip_grad_norm(&mut [&mut b], 1.0);
        assert_eq!(b[0], 1.0f32 / (1.0 + 1e-6));
    }

    #[test]
    fn non_finite_norm_is_reported() {
        let mut a = vec![f32::NAN, 1.0];
        assert!(clip_grad_norm(&mut [&mut a], 1.0).is_nan());
        assert_eq!(a[1], 1.0);
        let mut b = vec![f32::INFINITY, 1.0];
        assert!(clip_grad_norm(&mut [&mut b], 1.0).is_infinite());
    }
}
