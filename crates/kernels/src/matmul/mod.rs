//! Matmul in the nn.Linear layout: inp [M, K], weight [N, K], bias [N] → out [M, N].
//!
//! Forward `out = inp · weightᵀ + bias`; backward `dinp = dout · weight`,
//! `dweight += doutᵀ · inp`, `dbias += Σ_rows dout`. f32 runs on the `gemm` crate (threaded with
//! rayon above 64³ multiply-adds); bf16 widens to f32, multiplies and rounds back.

mod cpu;

use reel_tensor::Float;

/// `out[m,n] = inp[m,k] · weight[n,k]ᵀ (+ bias[n])`. Overwrites `out`.
pub fn matmul_forward<T: Float>(
    out: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    m: usize,
    k: usize,
    n: usize,
) {
    check_shapes(
        "matmul_forward",
        out.len(),
        inp.len(),
        weight.len(),
        bias.map(|b| b.len()),
        m,
        k,
        n,
    );
    cpu::matmul_forward(out, inp, weight, bias, m, k, n);
}

/// `dinp[m,k] = dout · weight` (overwrites; skipped when `None`), `dweight[n,k] += doutᵀ · inp`,
/// `dbias[n] +=` column sums of `dout`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<T: Float>(
    dinp: Option<&mut [T]>,
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    weight: &[T],
    m: usize,
    k: usize,
    n: usize,
) {
    check_shapes(
        "matmul_backward",
        dout.len(),
        inp.len(),
        weight.len(),
        dbias.as_ref().map(|b| b.len()),
        m,
        k,
        n,
    );
    assert_eq!(
        dweight.len(),
        n * k,
        "matmul_backward: dweight has {} elements, expected n·k = {n}·{k}",
        dweight.len()
    );
    if let Some(di) = &dinp {
        assert_eq!(
            di.len(),
            m * k,
            "matmul_backward: dinp has {} elements, expected m·k = {m}·{k}",
            di.len()
        );
    }
    cpu::matmul_backward(dinp, dweight, dbias, dout, inp, weight, m, k, n);
}

/// Plain triple loop with f64 accumulation: the reference tests compare against.
pub fn matmul_forward_ref(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    check_shapes(
        "matmul_forward_ref",
        out.len(),
        inp.len(),
        weight.len(),
        bias.map(|b| b.len()),
        m,
        k,
        n,
    );
    cpu::matmul_forward_ref(out, inp, weight, bias, m, k, n);
}

/// Asserts the [m, n] output, [m, k] input, [n, k] weight and [n] bias lengths.
#[allow(clippy::too_many_arguments)]
fn check_shapes(
    op: &str,
    out: usize,
    inp: usize,
    weight: usize,
    bias: Option<usize>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(
        out == m * n && inp == m * k && weight == n * k && bias.is_none_or(|b| b == n),
        "{op}: lengths out/dout {out}, inp {inp}, weight {weight}, bias {bias:?} do not fit \
         m={m}, k={k}, n={n} (expected {}, {}, {}, {n})",
        m * n,
        m * k,
        n * k
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{bf16, check_close, rng, uniform_vec, Tolerance};

    const SHAPES: [(usize, usize, usize); 5] =
        [(1, 1, 1), (7, 13, 5), (3, 1, 9), (16, 32, 8), (33, 17, 65)];
    const GRAD_TOL: Tolerance = Tolerance::new(2e-3, 2e-2);

    fn reference(
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        matmul_forward_ref(&mut out, inp, weight, bias, m, k, n);
        out
    }

    #[test]
    fn forward_matches_reference() {
        let mut r = rng(1);
        for &(m, k, n) in &SHAPES {
            for with_bias in [false, true] {
                let inp = uniform_vec(&mut r, m * k, 1.0);
                let weight = uniform_vec(&mut r, n * k, 1.0);
                let bias = uniform_vec(&mut r, n, 1.0);
                let bias = with_bias.then_some(bias.as_slice());
                let mut out = vec![f32::NAN; m * n];
                matmul_forward(&mut out, &inp, &weight, bias, m, k, n);
                let expected = reference(&inp, &weight, bias, m, k, n);
                check_close(
                    &format!("out m={m} k={k} n={n} bias={with_bias}"),
                    &out,
                    &expected,
                    Tolerance::new(1e-5, 1e-5),
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn reference_by_hand() {
        // [1 2; 3 4] · [5 6; 7 8; 9 10]ᵀ + [1, 0, -1]
        let mut out = [0.0f32; 6];
        matmul_forward_ref(
            &mut out,
            &[1., 2., 3., 4.],
            &[5., 6., 7., 8., 9., 10.],
            Some(&[1., 0., -1.]),
            2,
            2,
            3,
        );
        assert_eq!(out, [18., 23., 28., 40., 53., 66.]);
    }

    #[test]
    fn large_forward_uses_threaded_gemm() {
        let (m, k, n) = (256, 384, 320);
        let mut r = rng(2);
        let inp = uniform_vec(&mut r, m * k, 1.0);
        let weight = uniform_vec(&mut r, n * k, 1.0);
        let bias = uniform_vec(&mut r, n, 1.0);
        let mut out = vec![f32::NAN; m * n];
        matmul_forward(&mut out, &inp, &weight, Some(&bias), m, k, n);
        let expected = reference(&inp, &weight, Some(&bias), m, k, n);
        check_close("large out", &out, &expected, Tolerance::new(1e-4, 1e-4)).unwrap();
    }

    #[test]
    fn large_backward_matches_loops() {
        let (m, k, n) = (96, 80, 112);
        let mut r = rng(3);
        let inp = uniform_vec(&mut r, m * k, 1.0);
        let weight = uniform_vec(&mut r, n * k, 1.0);
        let dout = uniform_vec(&mut r, m * n, 1.0);
        let mut dinp = vec![f32::NAN; m * k];
        let mut dweight = vec![0.0; n * k];
        matmul_backward(
            Some(&mut dinp),
            &mut dweight,
            None,
            &dout,
            &inp,
            &weight,
            m,
            k,
            n,
        );
        let mut dinp_ref = vec![0.0; m * k];
        let mut dweight_ref = vec![0.0; n * k];
        for i in 0..m {
            for kk in 0..k {
                dinp_ref[i * k + kk] = (0..n)
                    .map(|j| dout[i * n + j] as f64 * weight[j * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
        for j in 0..n {
            for kk in 0..k {
                dweight_ref[j * k + kk] = (0..m)
                    .map(|i| dout[i * n + j] as f64 * inp[i * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
        check_close("large dinp", &dinp, &dinp_ref, Tolerance::new(1e-4, 1e-4)).unwrap();
        check_close(
            "large dweight",
            &dweight,
            &dweight_ref,
            Tolerance::new(1e-4, 1e-4),
        )
        .unwrap();
    }

    #[test]
    fn backward_matches_numeric_grad() {
        let mut r = rng(4);
        for &(m, k, n) in &[(7, 13, 5), (1, 3, 2), (4, 1, 6)] {
            let inp = uniform_vec(&mut r, m * k, 1.0);
            let weight = uniform_vec(&mut r, n * k, 1.0);
            let bias = uniform_vec(&mut r, n, 1.0);
            let probe = uniform_vec(&mut r, m * n, 1.0);
            let loss = |inp: &[f32], weight: &[f32], bias: &[f32]| {
                probe_loss(&reference(inp, weight, Some(bias), m, k, n), &probe)
            };

            let mut dinp = vec![f32::NAN; m * k];
            let mut dweight = vec![0.0; n * k];
            let mut dbias = vec![0.0; n];
            matmul_backward(
                Some(&mut dinp),
                &mut dweight,
                Some(&mut dbias),
                &probe,
                &inp,
                &weight,
                m,
                k,
                n,
            );

            let eps = 1e-2;
            let what = format!("m={m} k={k} n={n}");
            let g = numeric_grad(&inp, eps, |x| loss(x, &weight, &bias));
            check_close(&format!("dinp {what}"), &dinp, &g, GRAD_TOL).unwrap();
            let g = numeric_grad(&weight, eps, |w| loss(&inp, w, &bias));
            check_close(&format!("dweight {what}"), &dweight, &g, GRAD_TOL).unwrap();
            let g = numeric_grad(&bias, eps, |b| loss(&inp, &weight, b));
            check_close(&format!("dbias {what}"), &dbias, &g, GRAD_TOL).unwrap();
        }
    }

    #[test]
    fn backward_accumulates_parameter_grads_and_overwrites_dinp() {
        let (m, k, n) = (5, 7, 3);
        let mut r = rng(5);
        let inp = uniform_vec(&mut r, m * k, 1.0);
        let weight = uniform_vec(&mut r, n * k, 1.0);
        let dout = uniform_vec(&mut r, m * n, 1.0);

        let mut dinp0 = vec![0.0; m * k];
        let mut dw0 = vec![0.0; n * k];
        let mut db0 = vec![0.0; n];
        matmul_backward(
            Some(&mut dinp0),
            &mut dw0,
            Some(&mut db0),
            &dout,
            &inp,
            &weight,
            m,
            k,
            n,
        );

        let dw_prev = uniform_vec(&mut r, n * k, 1.0);
        let db_prev = uniform_vec(&mut r, n, 1.0);
        let mut dinp = vec![123.0; m * k];
        let mut dw = dw_prev.clone();
        let mut db = db_prev.clone();
        matmul_backward(
            Some(&mut dinp),
            &mut dw,
            Some(&mut db),
            &dout,
            &inp,
            &weight,
            m,
            k,
            n,
        );

        let tol = Tolerance::new(1e-6, 1e-6);
        check_close("dinp overwritten", &dinp, &dinp0, tol).unwrap();
        let dw_sum: Vec<f32> = dw_prev.iter().zip(&dw0).map(|(a, b)| a + b).collect();
        check_close("dweight accumulated", &dw, &dw_sum, tol).unwrap();
        let db_sum: Vec<f32> = db_prev.iter().zip(&db0).map(|(a, b)| a + b).collect();
        check_close("dbias accumulated", &db, &db_sum, tol).unwrap();

        // Without dinp, the parameter gradients still accumulate.
        let mut dw2 = dw_prev.clone();
        matmul_backward::<f32>(None, &mut dw2, None, &dout, &inp, &weight, m, k, n);
        check_close("dweight without dinp", &dw2, &dw_sum, tol).unwrap();
    }

    #[test]
    fn bf16_matches_f32() {
        let mut r = rng(6);
        for &(m, k, n) in &[(7, 13, 5), (33, 70, 65)] {
            let inp = uniform_vec(&mut r, m * k, 1.0);
            let weight = uniform_vec(&mut r, n * k, 1.0);
            let bias = uniform_vec(&mut r, n, 1.0);
            let dout = uniform_vec(&mut r, m * n, 1.0);
            let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let (inp_h, weight_h, bias_h, dout_h) =
                (round(&inp), round(&weight), round(&bias), round(&dout));
            // f32 on the bf16-rounded inputs, so only output rounding differs.
            let (inp_r, weight_r, bias_r, dout_r) = (
                widen(&inp_h),
                widen(&weight_h),
                widen(&bias_h),
                widen(&dout_h),
            );
            let tol = Tolerance::new(1e-2, 1e-2);

            let mut out = vec![bf16::from_f32(f32::NAN); m * n];
            matmul_forward(&mut out, &inp_h, &weight_h, Some(&bias_h), m, k, n);
            let expected = reference(&inp_r, &weight_r, Some(&bias_r), m, k, n);
            check_close("bf16 out", &widen(&out), &expected, tol).unwrap();

            let mut dinp = vec![bf16::from_f32(f32::NAN); m * k];
            let mut dw = round(&uniform_vec(&mut r, n * k, 1.0));
            let mut db = round(&uniform_vec(&mut r, n, 1.0));
            let (mut dinp32, mut dw32, mut db32) = (vec![0.0f32; m * k], widen(&dw), widen(&db));
            matmul_backward(
                Some(&mut dinp),
                &mut dw,
                Some(&mut db),
                &dout_h,
                &inp_h,
                &weight_h,
                m,
                k,
                n,
            );
            matmul_backward(
                Some(&mut dinp32),
                &mut dw32,
                Some(&mut db32),
                &dout_r,
                &inp_r,
                &weight_r,
                m,
                k,
                n,
            );
            check_close("bf16 dinp", &widen(&dinp), &dinp32, tol).unwrap();
            check_close("bf16 dweight", &widen(&dw), &dw32, tol).unwrap();
            check_close("bf16 dbias", &widen(&db), &db32, tol).unwrap();
        }
    }

    #[test]
    fn empty_dimensions_do_not_panic() {
        let mut out = vec![0.0f32; 0];
        matmul_forward(&mut out, &[], &[1.0, 2.0], None, 0, 1, 2);
        // k = 0: out is the bias alone.
        let mut out = vec![f32::NAN; 3 * 2];
        matmul_forward(&mut out, &[], &[], Some(&[1.0, -2.0]), 3, 0, 2);
        assert_eq!(out, [1.0, -2.0, 1.0, -2.0, 1.0, -2.0]);
        let mut out = vec![f32::NAN; 2];
        matmul_forward(&mut out, &[], &[], None, 1, 0, 2);
        assert_eq!(out, [0.0, 0.0]);
    }

    #[test]
    #[should_panic(expected = "matmul_forward")]
    fn wrong_length_names_the_op() {
        let mut out = vec![0.0f32; 4];
        matmul_forward(&mut out, &[0.0; 6], &[0.0; 6], None, 2, 3, 3);
    }
}
