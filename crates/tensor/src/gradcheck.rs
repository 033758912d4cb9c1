//! Finite-difference gradient checks for kernel tests.
//!
//! `numeric_grad` perturbs each input element by ±eps and takes the central difference of a scalar
//! loss computed in f64. Kernel tests compare it with the analytic backward at odd shapes.

/// Central-difference gradient of `loss` with respect to every element of `x`.
/// `loss` must be a pure function of its argument (it is called 2·len(x) times).
pub fn numeric_grad(x: &[f32], eps: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut xp = x.to_vec();
    let mut grad = vec![0.0f32; x.len()];
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + eps;
        let up = loss(&xp);
        xp[i] = orig - eps;
        let down = loss(&xp);
        xp[i] = orig;
        grad[i] = ((up - down) / (2.0 * eps as f64)) as f32;
    }
    grad
}

/// A scalar probe loss `sum_i w_i * y_i` with fixed pseudo-random weights `w`: its gradient with
/// respect to `y` is `w`, which makes every output element matter in a gradient check.
pub fn probe_loss(y: &[f32], w: &[f32]) -> f64 {
    y.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_of_a_cubic() {
        let x = [0.5f32, -1.25, 2.0];
        let g = numeric_grad(&x, 1e-3, |v| v.iter().map(|&a| (a as f64).powi(3)).sum());
        for (gi, xi) in g.iter().zip(x) {
            assert!(
                (gi - 3.0 * xi * xi).abs() < 1e-3,
                "{gi} vs {}",
                3.0 * xi * xi
            );
        }
    }
}
