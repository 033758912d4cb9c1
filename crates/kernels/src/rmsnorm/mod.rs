//! RMSNorm as HF Qwen2RMSNorm: inp [N, D], weight [D] → out [N, D], saving rstd [N].
//!
//! `rstd = 1 / sqrt(mean(x²) + eps)`, `out = weight · (x · rstd)`, computed in f32 (Zhang &
//! Sennrich 2019). Backward, with `x̂ = x · rstd` and `g = dout · weight`:
//! `dinp = rstd · (g − x̂ · mean(g · x̂))` (overwrites), `dweight += Σ_rows dout · x̂`.

mod cpu;

use reel_tensor::Float;

/// `out[n, d] = weight · x · rstd`; writes `rstd[n]` for the backward pass.
pub fn rmsnorm_forward<T: Float>(
    out: &mut [T],
    rstd: &mut [f32],
    inp: &[T],
    weight: &[T],
    n: usize,
    d: usize,
    eps: f32,
) {
    check(
        "rmsnorm_forward",
        out.len(),
        rstd.len(),
        inp.len(),
        weight.len(),
        n,
        d,
    );
    if n == 0 || d == 0 {
        return;
    }
    cpu::rmsnorm_forward(out, rstd, inp, weight, d, eps);
}

/// `dinp = rstd · (dout·weight − x̂ · mean(dout·weight·x̂))` (overwrites),
/// `dweight += Σ_rows dout · x̂` with `x̂ = inp · rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: Float>(
    dinp: &mut [T],
    dweight: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    rstd: &[f32],
    n: usize,
    d: usize,
) {
    check(
        "rmsnorm_backward",
        dinp.len(),
        rstd.len(),
        inp.len(),
        weight.len(),
        n,
        d,
    );
    assert!(
        dout.len() == n * d && dweight.len() == d,
        "rmsnorm_backward: dout has {} elements (expected n·d = {n}·{d}), dweight {} (expected {d})",
        dout.len(),
        dweight.len()
    );
    if n == 0 || d == 0 {
        return;
    }
    cpu::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, n, d);
}

fn check(op: &str, out: usize, rstd: usize, inp: usize, weight: usize, n: usize, d: usize) {
    assert!(
        out == n * d && inp == n * d && rstd == n && weight == d,
        "{op}: lengths out/dinp {out}, rstd {rstd}, inp {inp}, weight {weight} do not fit n={n}, d={d}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{bf16, check_close, rng, uniform_vec, Tolerance};

    const EPS: f32 = 1e-6;

    /// Plain f64 reference.
    fn reference(
        inp: &[f32],
        weight: &[f32],
        n: usize,
        d: usize,
        eps: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; n * d];
        let mut rstd = vec![0.0; n];
        for i in 0..n {
            let x = &inp[i * d..(i + 1) * d];
            let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            rstd[i] = r as f32;
            for j in 0..d {
                out[i * d + j] = (weight[j] as f64 * x[j] as f64 * r) as f32;
            }
        }
        (out, rstd)
    }

    #[test]
    fn forward_matches_reference() {
        let mut r = rng(20);
        for &(n, d) in &[(1, 1), (4, 3), (7, 64), (33, 100), (2, 896)] {
            let inp = uniform_vec(&mut r, n * d, 2.0);
            let weight = uniform_vec(&mut r, d, 1.5);
            let mut out = vec![f32::NAN; n * d];
            let mut rstd = vec![f32::NAN; n];
            rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, n, d, EPS);
            let (out_ref, rstd_ref) = reference(&inp, &weight, n, d, EPS);
            let tol = Tolerance::new(1e-5, 1e-5);
            check_close(&format!("out n={n} d={d}"), &out, &out_ref, tol).unwrap();
            check_close(&format!("rstd n={n} d={d}"), &rstd, &rstd_ref, tol).unwrap();
        }
    }

    #[test]
    fn eps_matters_for_small_rows() {
        let inp = [1e-3f32, -2e-3, 3e-3];
        let weight = [1.0f32, 2.0, -1.0];
        let mut out = [0.0f32; 3];
        let mut rstd = [0.0f32; 1];
        rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, 1, 3, 1e-5);
        let (out_ref, _) = reference(&inp, &weight, 1, 3, 1e-5);
        check_close("out eps", &out, &out_ref, Tolerance::new(1e-6, 1e-5)).unwrap();
        // mean(x²) = 4.67e-6, so eps = 1e-5 changes rstd by more than half.
        assert!((rstd[0] - 1.0 / (14e-6f32 / 3.0 + 1e-5).sqrt()).abs() < 1e-2);
    }

    #[test]
    fn backward_matches_numeric_grad() {
        let mut r = rng(21);
        for &(n, d) in &[(3, 1), (4, 3), (5, 8), (2, 17)] {
            let inp = uniform_vec(&mut r, n * d, 1.0);
            let weight = uniform_vec(&mut r, d, 1.5);
            let probe = uniform_vec(&mut r, n * d, 1.0);
            let loss = |x: &[f32], w: &[f32]| probe_loss(&reference(x, w, n, d, EPS).0, &probe);

            let mut out = vec![0.0; n * d];
            let mut rstd = vec![0.0; n];
            rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, n, d, EPS);
            let mut dinp = vec![f32::NAN; n * d];
            let dw_prev = uniform_vec(&mut r, d, 1.0);
            let mut dweight = dw_prev.clone();
            rmsnorm_backward(&mut dinp, &mut dweight, &probe, &inp, &weight, &rstd, n, d);

            let tol = Tolerance::new(2e-3, 2e-2);
            let g = numeric_grad(&inp, 1e-3, |x| loss(x, &weight));
            check_close(&format!("dinp n={n} d={d}"), &dinp, &g, tol).unwrap();
            let g = numeric_grad(&weight, 1e-3, |w| loss(&inp, w));
            let expected: Vec<f32> = dw_prev.iter().zip(&g).map(|(a, b)| a + b).collect();
            check_close(&format!("dweight n={n} d={d}"), &dweight, &expected, tol).unwrap();
        }
    }

    #[test]
    fn bf16_matches_f32() {
        let (n, d) = (9, 70);
        let mut r = rng(22);
        let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let inp = round(&uniform_vec(&mut r, n * d, 2.0));
        let weight = round(&uniform_vec(&mut r, d, 1.5));
        let dout = round(&uniform_vec(&mut r, n * d, 1.0));
        let (inp32, weight32, dout32) = (widen(&inp), widen(&weight), widen(&dout));
        let tol = Tolerance::new(1e-2, 1e-2);

        let mut out = vec![bf16::from_f32(f32::NAN); n * d];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, n, d, EPS);
        let mut out32 = vec![0.0; n * d];
        let mut rstd32 = vec![0.0; n];
        rmsnorm_forward(&mut out32, &mut rstd32, &inp32, &weight32, n, d, EPS);
        check_close("bf16 out", &widen(&out), &out32, tol).unwrap();
        check_close("bf16 rstd", &rstd, &rstd32, Tolerance::new(0.0, 0.0)).unwrap();

        let mut dinp = vec![bf16::from_f32(f32::NAN); n * d];
        let mut dweight = round(&uniform_vec(&mut r, d, 1.0));
        let mut dinp32 = vec![0.0; n * d];
        let mut dweight32 = widen(&dweight);
        rmsnorm_backward(&mut dinp, &mut dweight, &dout, &inp, &weight, &rstd, n, d);
        rmsnorm_backward(
            &mut dinp32,
            &mut dweight32,
            &dout32,
            &inp32,
            &weight32,
            &rstd32,
            n,
            d,
        );
        check_close("bf16 dinp", &widen(&dinp), &dinp32, tol).unwrap();
        check_close("bf16 dweight", &widen(&dweight), &dweight32, tol).unwrap();
    }

    #[test]
    #[should_panic(expected = "rmsnorm_forward")]
    fn wrong_length_names_the_op() {
        let mut out = vec![0.0f32; 6];
        let mut rstd = vec![0.0f32; 2];
        rmsnorm_forward(&mut out, &mut rstd, &[1.0; 6], &[1.0; 2], 2, 3, EPS);
    }
}
