//! GELU, exact form (Hendrycks & Gimpel 2016; torch `nn.GELU()` default): x [N] → out [N].
//!
//! `gelu(x) = x · Φ(x) = ½·x·(1 + erf(x/√2))`; backward (overwrites)
//! `dx = dout · (Φ(x) + x·φ(x))`, `φ(x) = e^{−x²/2}/√(2π)`. erf is evaluated in f64 (libm), the
//! result rounded to the element type.

mod cpu;

use reel_tensor::Float;

/// `out = gelu(inp)` elementwise. Overwrites `out`.
pub fn gelu_forward<T: Float>(out: &mut [T], inp: &[T]) {
    assert_eq!(
        out.len(),
        inp.len(),
        "gelu_forward: out has {} elements, inp {}",
        out.len(),
        inp.len()
    );
    cpu::gelu_forward(out, inp);
}

/// `dinp = dout · gelu'(inp)`. Overwrites `dinp`.
pub fn gelu_backward<T: Float>(dinp: &mut [T], dout: &[T], inp: &[T]) {
    assert!(
        dinp.len() == inp.len() && dout.len() == inp.len(),
        "gelu_backward: dinp {}, dout {} and inp {} elements must agree",
        dinp.len(),
        dout.len(),
        inp.len()
    );
    cpu::gelu_backward(dinp, dout, inp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{check_close, rng, uniform_vec, Tolerance};

    #[test]
    fn hand_computed_values() {
        // torch.nn.functional.gelu(torch.tensor([-3., -1., 0., 0.5, 2.])) in float64.
        let x = [-3.0f32, -1.0, 0.0, 0.5, 2.0];
        let expected = [-0.004049694_f32, -0.15865525, 0.0, 0.34573123, 1.9544997];
        let mut y = [9.0f32; 5];
        gelu_forward(&mut y, &x);
        check_close("gelu", &y, &expected, Tolerance::new(1e-7, 1e-6)).unwrap();
    }

    #[test]
    fn backward_matches_numeric_grad() {
        let mut r = rng(40);
        for n in [1usize, 7, 130] {
            let x = uniform_vec(&mut r, n, 4.0);
            let probe = uniform_vec(&mut r, n, 1.0);
            let mut dx = vec![f32::NAN; n];
            gelu_backward(&mut dx, &probe, &x);
            let g = numeric_grad(&x, 1e-2, |x| {
                let mut y = vec![0.0; x.len()];
                gelu_forward(&mut y, x);
                probe_loss(&y, &probe)
            });
            check_close(&format!("dgelu n={n}"), &dx, &g, Tolerance::new(2e-3, 1e-2)).unwrap();
        }
    }
}
