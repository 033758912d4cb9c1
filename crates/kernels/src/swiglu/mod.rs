//! SwiGLU (Shazeer 2020) on the fused gate/up projection: gate_up [N, 2I] → out [N, I].
//!
//! Columns [0, I) are the gate, [I, 2I) the up projection (the model fuses gate_proj and up_proj
//! in that order). `out = silu(gate) · up`, `silu(g) = g · σ(g)`. Backward (overwrites):
//! `dgate = dout · up · σ(g) · (1 + g · (1 − σ(g)))`, `dup = dout · silu(g)`.

mod cpu;

use reel_tensor::Float;

/// `out[n, i] = silu(gate_up[n, :i]) · gate_up[n, i:]`. Overwrites `out`.
pub fn swiglu_forward<T: Float>(out: &mut [T], gate_up: &[T], n: usize, i: usize) {
    check("swiglu_forward", out.len(), gate_up.len(), n, i);
    if n == 0 || i == 0 {
        return;
    }
    cpu::swiglu_forward(out, gate_up, i);
}

/// `dgate_up[n, 2i]` from `dout[n, i]`; overwrites.
pub fn swiglu_backward<T: Float>(
    dgate_up: &mut [T],
    dout: &[T],
    gate_up: &[T],
    n: usize,
    i: usize,
) {
    check("swiglu_backward", dout.len(), gate_up.len(), n, i);
    assert_eq!(
        dgate_up.len(),
        2 * n * i,
        "swiglu_backward: dgate_up has {} elements, expected n·2i = {n}·2·{i}",
        dgate_up.len()
    );
    if n == 0 || i == 0 {
        return;
    }
    cpu::swiglu_backward(dgate_up, dout, gate_up, i);
}

fn check(op: &str, out: usize, gate_up: usize, n: usize, i: usize) {
    assert!(
        out == n * i && gate_up == 2 * n * i,
        "{op}: out/dout has {out} elements (expected n·i = {n}·{i}), gate_up {gate_up} (expected n·2i = {})",
        2 * n * i
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{bf16, check_close, rng, uniform_vec, Tolerance};

    fn reference(gate_up: &[f32], n: usize, i: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * i];
        for r in 0..n {
            for j in 0..i {
                let g = gate_up[r * 2 * i + j] as f64;
                let u = gate_up[r * 2 * i + i + j] as f64;
                out[r * i + j] = (g / (1.0 + (-g).exp()) * u) as f32;
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference() {
        let mut r = rng(40);
        for &(n, i) in &[(1, 1), (3, 5), (7, 13), (64, 100)] {
            let gate_up = uniform_vec(&mut r, n * 2 * i, 6.0);
            let mut out = vec![f32::NAN; n * i];
            swiglu_forward(&mut out, &gate_up, n, i);
            check_close(
                &format!("out n={n} i={i}"),
                &out,
                &reference(&gate_up, n, i),
                Tolerance::new(1e-6, 1e-5),
            )
            .unwrap();
        }
    }

    #[test]
    fn hand_computed_value() {
        // silu(1) = 1 / (1 + e^-1) = 0.7310586; silu(-2) = -2 / (1 + e^2) = -0.2384058.
        let mut out = [0.0f32; 2];
        swiglu_forward(&mut out, &[1.0, -2.0, 3.0, 0.5], 1, 2);
        check_close(
            "swiglu",
            &out,
            &[2.1931758, -0.1192029],
            Tolerance::new(1e-6, 1e-6),
        )
        .unwrap();
    }

    #[test]
    fn backward_matches_numeric_grad() {
        let mut r = rng(41);
        for &(n, i) in &[(1, 1), (3, 5), (4, 7)] {
            let gate_up = uniform_vec(&mut r, n * 2 * i, 3.0);
            let probe = uniform_vec(&mut r, n * i, 1.0);
            let mut dgate_up = vec![f32::NAN; n * 2 * i];
            swiglu_backward(&mut dgate_up, &probe, &gate_up, n, i);
            let g = numeric_grad(&gate_up, 1e-3, |x| probe_loss(&reference(x, n, i), &probe));
            check_close(
                &format!("dgate_up n={n} i={i}"),
                &dgate_up,
                &g,
                Tolerance::new(2e-3, 2e-2),
            )
            .unwrap();
        }
    }

    #[test]
    fn bf16_matches_f32() {
        let (n, i) = (9, 37);
        let mut r = rng(42);
        let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let gate_up = round(&uniform_vec(&mut r, n * 2 * i, 4.0));
        let dout = round(&uniform_vec(&mut r, n * i, 1.0));
        let tol = Tolerance::new(1e-2, 1e-2);
        let mut out = vec![bf16::from_f32(f32::NAN); n * i];
        swiglu_forward(&mut out, &gate_up, n, i);
        let mut out32 = vec![0.0; n * i];
        swiglu_forward(&mut out32, &widen(&gate_up), n, i);
        check_close("bf16 out", &widen(&out), &out32, tol).unwrap();
        let mut dgu = vec![bf16::from_f32(f32::NAN); n * 2 * i];
        swiglu_backward(&mut dgu, &dout, &gate_up, n, i);
        let mut dgu32 = vec![0.0; n * 2 * i];
        swiglu_backward(&mut dgu32, &widen(&dout), &widen(&gate_up), n, i);
        check_close("bf16 dgate_up", &widen(&dgu), &dgu32, tol).unwrap();
    }

    #[test]
    fn large_negative_gate_is_finite() {
        let mut out = [f32::NAN; 2];
        swiglu_forward(&mut out, &[-200.0, 200.0, 1.0, 1.0], 1, 2);
        assert_eq!(out[0], -0.0);
        assert_eq!(out[1], 200.0);
        let mut d = [f32::NAN; 4];
        swiglu_backward(&mut d, &[1.0, 1.0], &[-200.0, 200.0, 1.0, 1.0], 1, 2);
        assert!(d.iter().all(|v| v.is_finite()), "{d:?}");
    }
}
