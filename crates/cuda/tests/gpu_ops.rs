//! Every GPU op against its CPU reference in reel-kernels, at several shapes (odd ones included),
//! for f32 and bf16 storage. Opt-in, since CI has no GPU:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --release --test gpu_ops -- --nocapture
//!
//! Without `REEL_GPU_TESTS=1` each test prints "skipped" and passes; with it, a machine without a
//! usable GPU fails them. Outputs are poisoned with NaN before each op (an element the kernel
//! skips fails the comparison); inputs are random, never zeros. `--nocapture` prints one line per
//! case: the largest difference and ‖gpu − cpu‖ / ‖cpu‖.

use rand::Rng as _;
use reel_cuda::{DevRead, Gpu, GpuError, GpuFloat, GpuRopeTable};
use reel_kernels::{embedding, matmul, rmsnorm, rope, swiglu};
use reel_tensor::{bf16, rng, uniform_vec, Rng, Tolerance};

mod common;
use common::*;

// ---------------------------------------------------------------------------------------------

fn rmsnorm_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, n: usize, d: usize) {
    let eps = 1e-6;
    let inp: Vec<T> = rand_t(r, n * d, 2.0);
    let weight: Vec<T> = rand_t(r, d, 1.5);
    let dout: Vec<T> = rand_t(r, n * d, 1.0);
    let dw0: Vec<T> = rand_t(r, d, 1.0);

    let (mut out_c, mut rstd_c) = (poison::<T>(n * d), vec![f32::NAN; n]);
    rmsnorm::rmsnorm_forward(&mut out_c, &mut rstd_c, &inp, &weight, n, d, eps);
    let (mut dinp_c, mut dw_c) = (poison::<T>(n * d), dw0.clone());
    rmsnorm::rmsnorm_backward(&mut dinp_c, &mut dw_c, &dout, &inp, &weight, &rstd_c, n, d);

    let (inp_g, weight_g, dout_g) = (
        g.upload(&inp).unwrap(),
        g.upload(&weight).unwrap(),
        g.upload(&dout).unwrap(),
    );
    let mut out_g = g.upload(&poison::<T>(n * d)).unwrap();
    let mut rstd_g = g.upload(&vec![f32::NAN; n]).unwrap();
    g.rmsnorm_forward(&mut out_g, &mut rstd_g, &inp_g, &weight_g, n, d, eps)
        .unwrap();
    let mut dinp_g = g.upload(&poison::<T>(n * d)).unwrap();
    let mut dw_g = g.upload(&dw0).unwrap();
    g.rmsnorm_backward(
        &mut dinp_g,
        &mut dw_g,
        &dout_g,
        &inp_g,
        &weight_g,
        &rstd_g,
        n,
        d,
    )
    .unwrap();

    let s = format!("{} n={n} d={d}", name::<T>());
    let (t, rn) = tol::<T>(3.0);
    compare(
        &format!("rmsnorm out {s}"),
        &widen(&g.download(&out_g).unwrap()),
        &widen(&out_c),
        t,
        rn,
    );
    compare(
        &format!("rmsnorm rstd {s}"),
        &g.download(&rstd_g).unwrap(),
        &rstd_c,
        Tolerance::new(0.0, 1e-5),
        1e-5,
    );
    compare(
        &format!("rmsnorm dinp {s}"),
        &widen(&g.download(&dinp_g).unwrap()),
        &widen(&dinp_c),
        t,
        rn,
    );
    let sum_scale = (n as f32).sqrt();
    let (t, rn) = if T::INDEX == 0 {
        (Tolerance::new(1e-5 * sum_scale, 1e-4), 1e-5)
    } else {
        (Tolerance::new(2e-2, 1e-2), 1e-2)
    };
    let dw_first = g.download(&dw_g).unwrap();
    compare(
        &format!("rmsnorm dweight (+=) {s}"),
        &widen(&dw_first),
        &widen(&dw_c),
        t,
        rn,
    );

    // Deterministic: the same backward again gives the same bits.
    let mut dw_again = g.upload(&dw0).unwrap();
    let mut dinp_again = g.upload(&poison::<T>(n * d)).unwrap();
    g.rmsnorm_backward(
        &mut dinp_again,
        &mut dw_again,
        &dout_g,
        &inp_g,
        &weight_g,
        &rstd_g,
        n,
        d,
    )
    .unwrap();
    assert_eq!(
        widen(&g.download(&dw_again).unwrap()),
        widen(&dw_first),
        "rmsnorm dweight not deterministic"
    );
}

#[test]
fn rmsnorm_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(100);
    for &(n, d) in &[
        (1, 1),
        (3, 7),
        (17, 100),
        (33, 896),
        (64, 1000),
        (5, 4097),
        (1025, 33),
        (2048, 896),
    ] {
        rmsnorm_case::<f32>(&g, &mut r, n, d);
        rmsnorm_case::<bf16>(&g, &mut r, n, d);
    }
}

// ---------------------------------------------------------------------------------------------

fn swiglu_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, n: usize, i: usize) {
    let gate_up: Vec<T> = rand_t(r, n * 2 * i, 6.0);
    let dout: Vec<T> = rand_t(r, n * i, 1.0);
    let mut out_c = poison::<T>(n * i);
    swiglu::swiglu_forward(&mut out_c, &gate_up, n, i);
    let mut dgu_c = poison::<T>(n * 2 * i);
    swiglu::swiglu_backward(&mut dgu_c, &dout, &gate_up, n, i);

    let (gu_g, dout_g) = (g.upload(&gate_up).unwrap(), g.upload(&dout).unwrap());
    let mut out_g = g.upload(&poison::<T>(n * i)).unwrap();
    g.swiglu_forward(&mut out_g, &gu_g, n, i).unwrap();
    let mut dgu_g = g.upload(&poison::<T>(n * 2 * i)).unwrap();
    g.swiglu_backward(&mut dgu_g, &dout_g, &gu_g, n, i).unwrap();

    let s = format!("{} n={n} i={i}", name::<T>());
    let (t, rn) = tol::<T>(6.0);
    compare(
        &format!("swiglu out {s}"),
        &widen(&g.download(&out_g).unwrap()),
        &widen(&out_c),
        t,
        rn,
    );
    compare(
        &format!("swiglu dgate_up {s}"),
        &widen(&g.download(&dgu_g).unwrap()),
        &widen(&dgu_c),
        t,
        rn,
    );
    // In place: the gradient over gate_up, the same values bit for bit.
    let mut inplace = g.upload(&gate_up).unwrap();
    g.swiglu_backward_in_place(&mut inplace, &dout_g, n, i)
        .unwrap();
    assert_eq!(
        widen(&g.download(&inplace).unwrap()),
        widen(&g.download(&dgu_g).unwrap()),
        "swiglu_backward_in_place {s}"
    );
}

#[test]
fn swiglu_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(101);
    for &(n, i) in &[
        (1, 1),
        (3, 5),
        (7, 13),
        (64, 100),
        (257, 1031),
        (2048, 4864),
    ] {
        swiglu_case::<f32>(&g, &mut r, n, i);
        swiglu_case::<bf16>(&g, &mut r, n, i);
    }
}

// ---------------------------------------------------------------------------------------------

fn embedding_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, n: usize, vocab: usize, d: usize) {
    // Few distinct ids for small vocabularies: many repeats in the backward sums.
    let tokens: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
    let table: Vec<T> = rand_t(r, vocab * d, 1.0);
    let dout: Vec<T> = rand_t(r, n * d, 1.0);
    let dt0: Vec<T> = rand_t(r, vocab * d, 1.0);
    let mut out_c = poison::<T>(n * d);
    embedding::embedding_forward(&mut out_c, &tokens, &table, d);
    let mut dt_c = dt0.clone();
    embedding::embedding_backward(&mut dt_c, &dout, &tokens, d);

    let tok_g = g.upload_tokens(&tokens, vocab).unwrap();
    let (table_g, dout_g) = (g.upload(&table).unwrap(), g.upload(&dout).unwrap());
    let mut out_g = g.upload(&poison::<T>(n * d)).unwrap();
    g.embedding_forward(&mut out_g, &tok_g, &table_g, d)
        .unwrap();
    let mut dt_g = g.upload(&dt0).unwrap();
    g.embedding_backward(&mut dt_g, &dout_g, &tokens, d)
        .unwrap();

    let s = format!("{} n={n} V={vocab} d={d}", name::<T>());
    compare(
        &format!("embedding out {s}"),
        &widen(&g.download(&out_g).unwrap()),
        &widen(&out_c),
        Tolerance::new(0.0, 0.0),
        0.0,
    );
    let (t, rn) = if T::INDEX == 0 {
        (Tolerance::new(1e-5, 1e-5), 1e-5)
    } else {
        (Tolerance::new(1e-6, 8e-3), 1e-2)
    };
    let dt_first = g.download(&dt_g).unwrap();
    compare(
        &format!("embedding dtable (+=) {s}"),
        &widen(&dt_first),
        &widen(&dt_c),
        t,
        rn,
    );
    let mut dt_again = g.upload(&dt0).unwrap();
    g.embedding_backward(&mut dt_again, &dout_g, &tokens, d)
        .unwrap();
    assert_eq!(
        widen(&g.download(&dt_again).unwrap()),
        widen(&dt_first),
        "embedding backward not deterministic"
    );
}

#[test]
fn embedding_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(102);
    for &(n, vocab, d) in &[
        (1, 1, 1),
        (5, 4, 3),
        (17, 11, 8),
        (64, 7, 33),
        (1000, 50, 129),
        (4096, 151936, 896),
    ] {
        embedding_case::<f32>(&g, &mut r, n, vocab, d);
        embedding_case::<bf16>(&g, &mut r, n, vocab, d);
    }
}

#[test]
fn embedding_refuses_ids_outside_the_table() {
    let Some(g) = gpu() else { return };
    let e = g.upload_tokens(&[0, 4], 4).err().expect("id 4 of 4 rows");
    assert!(e.to_string().contains("token id 4 at index 1"), "{e}");
    let mut dt = g.upload(&[0.0f32; 8]).unwrap();
    let dout = g.upload(&[1.0f32; 4]).unwrap();
    let e = g
        .embedding_backward(&mut dt, &dout, &[1, 9], 2)
        .expect_err("id 9 of 4 rows");
    assert!(matches!(e, GpuError::Shape(_)), "{e:?}");
    // The forward kernel itself turns an unchecked bad id into a NaN row, never a wild read.
    let toks = g.upload(&[1u32, 7]).unwrap();
    let table = g.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let mut out = g.upload(&[0.0f32; 4]).unwrap();
    g.embedding_forward(&mut out, &toks, &table, 2).unwrap();
    let got = g.download(&out).unwrap();
    assert_eq!(&got[..2], &[3.0, 4.0]);
    assert!(got[2].is_nan() && got[3].is_nan(), "{got:?}");
}

// ---------------------------------------------------------------------------------------------

fn rope_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, n: usize, h: usize, d: usize, theta: f32) {
    let max_pos = 4096;
    let positions: Vec<u32> = (0..n).map(|_| r.random_range(0..max_pos as u32)).collect();
    let x: Vec<T> = rand_t(r, n * h * d, 2.0);
    let table = rope::RopeTable::new(d, max_pos, theta);
    let mut fwd_c = x.clone();
    rope::rope_forward(&mut fwd_c, &positions, &table, h);
    let mut bwd_c = x.clone();
    rope::rope_backward(&mut bwd_c, &positions, &table, h);

    let table_g = GpuRopeTable::new(g, d, max_pos, theta).unwrap();
    let pos_g = g.upload(&positions).unwrap();
    let mut fwd_g = g.upload(&x).unwrap();
    g.rope_forward(&mut fwd_g, &pos_g, &table_g, h).unwrap();
    let mut bwd_g = g.upload(&x).unwrap();
    g.rope_backward(&mut bwd_g, &pos_g, &table_g, h).unwrap();

    let s = format!("{} n={n} H={h} D={d} theta={theta}", name::<T>());
    let (t, rn) = tol::<T>(3.0);
    compare(
        &format!("rope forward {s}"),
        &widen(&g.download(&fwd_g).unwrap()),
        &widen(&fwd_c),
        t,
        rn,
    );
    compare(
        &format!("rope backward {s}"),
        &widen(&g.download(&bwd_g).unwrap()),
        &widen(&bwd_c),
        t,
        rn,
    );
}

#[test]
fn rope_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(103);
    for &(n, h, d, theta) in &[
        (5, 3, 6, 10000.0f32),
        (1, 1, 2, 10000.0),
        (17, 2, 64, 1_000_000.0),
        (33, 14, 64, 1_000_000.0),
        (100, 2, 128, 500.0),
        (2048, 14, 64, 1_000_000.0),
    ] {
        rope_case::<f32>(&g, &mut r, n, h, d, theta);
        rope_case::<bf16>(&g, &mut r, n, h, d, theta);
    }
}

#[test]
fn rope_marks_positions_past_the_table() {
    let Some(g) = gpu() else { return };
    let table = GpuRopeTable::new(&g, 4, 16, 10000.0).unwrap();
    let pos = g.upload(&[3u32, 16]).unwrap();
    let mut x = g.upload(&[0.5f32; 8]).unwrap();
    g.rope_forward(&mut x, &pos, &table, 1).unwrap();
    let got = g.download(&x).unwrap();
    assert!(
        got[..4].iter().all(|v| v.is_finite()) && got[4..].iter().all(|v| v.is_nan()),
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------------------------

/// GEMM tolerances for inputs in [-1, 1): f32 accumulation over k terms.
fn gemm_tol(out_bf16: bool, k: usize) -> (Tolerance, f64) {
    let sk = (k as f32).sqrt();
    if out_bf16 {
        // Elementwise: one bf16 step. In norm: the CPU rounds the f32 result once; on an H100
        // (cuBLASLt 13.0) the kernels picked for a bf16 output with the bias epilogue at small
        // shapes, and for dweight's β = 1 at m = 333 and 1024, gave ≈1 step on about half the
        // elements (rel-norm up to 2.9e-3; the same shapes with an f32 output: 1e-7), as if they
        // rounded to bf16 before adding the bias or C. Other bf16 GEMMs: ≤ 1.6e-4.
        (Tolerance::new(1e-3 * sk, 1e-2), 5e-3)
    } else {
        (Tolerance::new(1e-4 * sk, 1e-4), 1e-4)
    }
}

/// bf16 inputs: the GPU with bf16 and f32 outputs against the CPU's bf16 op and its f32 op on
/// the widened inputs; with and without bias. f32 inputs: f32 output against the CPU's f32 op.
fn matmul_forward_case(g: &Gpu, r: &mut Rng, m: usize, k: usize, n: usize, offset: usize) {
    let inp32 = uniform_vec(r, m * k, 1.0);
    let w32 = uniform_vec(r, n * k, 1.0);
    let bias32 = uniform_vec(r, n, 1.0);
    let (inp16, w16, bias16): (Vec<bf16>, Vec<bf16>, Vec<bf16>) =
        (to_t(&inp32), to_t(&w32), to_t(&bias32));
    let (inpw, ww, biasw) = (widen(&inp16), widen(&w16), widen(&bias16));
    let s = format!("m={m} k={k} n={n} offset={offset}");

    // Inputs placed `offset` elements into larger buffers: views, at odd alignments when offset > 0.
    let padded = |v: &[bf16]| {
        let mut p = vec![bf16::from_f32(7.0); offset];
        p.extend_from_slice(v);
        p.push(bf16::from_f32(7.0));
        p
    };
    let inp_b = g.upload(&padded(&inp16)).unwrap();
    let w_b = g.upload(&padded(&w16)).unwrap();
    let inp_g = inp_b.view(offset..offset + m * k).unwrap();
    let w_g = w_b.view(offset..offset + n * k).unwrap();
    let bias16_g = g.upload(&bias16).unwrap();
    let biasw_g = g.upload(&biasw).unwrap();

    for with_bias in [false, true] {
        let bs = if with_bias { " +bias" } else { "" };
        // bf16 → bf16
        let mut out_c = poison::<bf16>(m * n);
        matmul::matmul_forward(
            &mut out_c,
            &inp16,
            &w16,
            with_bias.then_some(&bias16[..]),
            m,
            k,
            n,
        );
        let mut out_g = g.upload(&poison::<bf16>(m * n)).unwrap();
        let b: Option<&dyn DevRead<bf16>> = if with_bias { Some(&bias16_g) } else { None };
        g.matmul_forward(&mut out_g, &inp_g, &w_g, b, m, k, n)
            .unwrap();
        let (t, rn) = gemm_tol(true, k);
        compare(
            &format!("matmul bf16->bf16{bs} {s}"),
            &widen(&g.download(&out_g).unwrap()),
            &widen(&out_c),
            t,
            rn,
        );

        // bf16 → f32 against the f32 op on the same (widened) values.
        let mut out_c = vec![f32::NAN; m * n];
        matmul::matmul_forward(
            &mut out_c,
            &inpw,
            &ww,
            with_bias.then_some(&biasw[..]),
            m,
            k,
            n,
        );
        let mut out_g = g.upload(&vec![f32::NAN; m * n]).unwrap();
        let b: Option<&dyn DevRead<f32>> = if with_bias { Some(&biasw_g) } else { None };
        g.matmul_forward(&mut out_g, &inp_g, &w_g, b, m, k, n)
            .unwrap();
        let (t, rn) = gemm_tol(false, k);
        compare(
            &format!("matmul bf16->f32{bs} {s}"),
            &g.download(&out_g).unwrap(),
            &out_c,
            t,
            rn,
        );
    }

    // f32 throughout (f32 compute, no TF32).
    let mut out_c = vec![f32::NAN; m * n];
    matmul::matmul_forward(&mut out_c, &inp32, &w32, Some(&bias32), m, k, n);
    let (inp_g, w_g, bias_g) = (
        g.upload(&inp32).unwrap(),
        g.upload(&w32).unwrap(),
        g.upload(&bias32).unwrap(),
    );
    let mut out_g = g.upload(&vec![f32::NAN; m * n]).unwrap();
    g.matmul_forward(
        &mut out_g,
        &inp_g,
        &w_g,
        Some(&bias_g as &dyn DevRead<f32>),
        m,
        k,
        n,
    )
    .unwrap();
    let (t, rn) = gemm_tol(false, k);
    compare(
        &format!("matmul f32->f32 +bias {s}"),
        &g.download(&out_g).unwrap(),
        &out_c,
        t,
        rn,
    );
}

#[test]
fn matmul_forward_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(104);
    for &(m, k, n, offset) in &[
        (1, 1, 1, 0),
        (3, 5, 7, 0),
        (17, 33, 65, 1),
        (64, 896, 1152, 0),
        (127, 257, 129, 3),
        (256, 4864, 896, 0),
        (512, 896, 4864, 8),
    ] {
        matmul_forward_case(&g, &mut r, m, k, n, offset);
    }
}

fn matmul_backward_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, m: usize, k: usize, n: usize) {
    let dout: Vec<T> = rand_t(r, m * n, 1.0);
    let inp: Vec<T> = rand_t(r, m * k, 1.0);
    let w: Vec<T> = rand_t(r, n * k, 1.0);
    let dw0: Vec<T> = rand_t(r, n * k, 1.0);
    let db0: Vec<T> = rand_t(r, n, 1.0);
    let (mut dinp_c, mut dw_c, mut db_c) = (poison::<T>(m * k), dw0.clone(), db0.clone());
    matmul::matmul_backward(
        Some(&mut dinp_c),
        &mut dw_c,
        Some(&mut db_c),
        &dout,
        &inp,
        &w,
        m,
        k,
        n,
    );

    let (dout_g, inp_g, w_g) = (
        g.upload(&dout).unwrap(),
        g.upload(&inp).unwrap(),
        g.upload(&w).unwrap(),
    );
    let mut dinp_g = g.upload(&poison::<T>(m * k)).unwrap();
    let mut dw_g = g.upload(&dw0).unwrap();
    let mut db_g = g.upload(&db0).unwrap();
    g.matmul_backward(
        Some(&mut dinp_g),
        &mut dw_g,
        Some(&mut db_g),
        &dout_g,
        &inp_g,
        &w_g,
        m,
        k,
        n,
    )
    .unwrap();

    let s = format!("{} m={m} k={k} n={n}", name::<T>());
    let bf = T::INDEX == 1;
    let (t, rn) = gemm_tol(bf, n);
    compare(
        &format!("matmul dinp {s}"),
        &widen(&g.download(&dinp_g).unwrap()),
        &widen(&dinp_c),
        t,
        rn,
    );
    let (t, rn) = gemm_tol(bf, m);
    compare(
        &format!("matmul dweight (+=) {s}"),
        &widen(&g.download(&dw_g).unwrap()),
        &widen(&dw_c),
        t,
        rn,
    );
    compare(
        &format!("matmul dbias (+=) {s}"),
        &widen(&g.download(&db_g).unwrap()),
        &widen(&db_c),
        t,
        rn,
    );
    // dinp over inp: the weight gradient read inp first; both equal the separate form's.
    let mut x_g = g.upload(&inp).unwrap();
    let mut dw2_g = g.upload(&dw0).unwrap();
    g.matmul_backward_into_input(&mut x_g, &mut dw2_g, &dout_g, &w_g, m, k, n)
        .unwrap();
    assert_eq!(
        widen(&g.download(&x_g).unwrap()),
        widen(&g.download(&dinp_g).unwrap()),
        "matmul_backward_into_input dinp {s}"
    );
    assert_eq!(
        widen(&g.download(&dw2_g).unwrap()),
        widen(&g.download(&dw_g).unwrap()),
        "matmul_backward_into_input dweight {s}"
    );
}

#[test]
fn matmul_backward_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(105);
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (127, 257, 129),
        (1024, 896, 1152),
        (333, 4864, 896),
    ] {
        matmul_backward_case::<f32>(&g, &mut r, m, k, n);
        matmul_backward_case::<bf16>(&g, &mut r, m, k, n);
    }
}

#[test]
fn shapes_that_do_not_fit_are_refused() {
    let Some(g) = gpu() else { return };
    let a = g.upload(&[1.0f32; 6]).unwrap();
    let w = g.upload(&[1.0f32; 6]).unwrap();
    let mut out = g.upload(&[0.0f32; 5]).unwrap();
    let e = g
        .matmul_forward::<f32, f32>(&mut out, &a, &w, None, 2, 3, 2)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("out has 5 elements, expected 4"),
        "{e}"
    );
    let mut o16 = g.upload(&[bf16::ZERO; 4]).unwrap();
    let e = g
        .matmul_forward::<f32, bf16>(&mut o16, &a, &w, None, 2, 3, 2)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("f32 inputs need an f32 output"),
        "{e}"
    );
    let mut rstd = g.upload(&[0.0f32; 2]).unwrap();
    let mut o = g.upload(&[0.0f32; 6]).unwrap();
    let e = g
        .rmsnorm_forward(&mut o, &mut rstd, &a, &w, 2, 3, 1e-6)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("weight has 6 elements, expected 3"),
        "{e}"
    );
    assert!(a.view(4..7).is_err());
    assert!(g.open_again_is_cheap());
}

trait OpenAgain {
    fn open_again_is_cheap(&self) -> bool;
}

impl OpenAgain for Gpu {
    /// A second `Gpu` on the same device reuses the process's compiled kernels.
    fn open_again_is_cheap(&self) -> bool {
        let g2 = Gpu::open(self.info().ordinal).unwrap();
        g2.info().compile_secs == 0.0
    }
}

#[test]
fn a_device_past_the_last_is_a_clear_error() {
    let Some(g) = gpu() else { return };
    let count = g.info().device_count;
    let e = Gpu::open(count).err().expect("no such device");
    assert!(
        e.to_string().contains(&format!("no CUDA device {count}")),
        "{e}"
    );
}

/// The re-exec route for NCCL: with `LD_LIBRARY_PATH` = shim + library folders (as
/// `libs::reexec_with_library_path` sets it), a child process (this test binary again) reaches
/// pip's `libnccl.so.2` through cudarc's names.
#[test]
fn nccl_is_reachable_through_the_shim_path() {
    use reel_cuda::libs;
    if std::env::var_os(libs::REEXEC_MARK).is_some() {
        let v = libs::nccl_version().expect("NCCL not reachable in the child");
        eprintln!("child: NCCL {}.{}.{} reachable", v.0, v.1, v.2);
        return;
    }
    let Some(_g) = gpu() else { return };
    let dirs = libs::lib_dirs();
    if libs::find_library(dirs, libs::NCCL).is_none() {
        eprintln!("no NCCL library on this machine: nothing to check");
        return;
    }
    let shim = std::env::temp_dir().join(format!("reel-cuda-test-shim-{}", std::process::id()));
    let made = libs::make_nccl_shim(dirs, &shim).unwrap();
    let path = libs::library_path(made.then_some(shim.as_path()), dirs, None);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "nccl_is_reachable_through_the_shim_path",
            "--nocapture",
        ])
        .env("LD_LIBRARY_PATH", &path)
        .env(libs::REEXEC_MARK, "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "shim made: {made}; {}",
        err.lines()
            .find(|l| l.contains("child:"))
            .unwrap_or("(no child line)")
    );
    assert!(out.status.success(), "child failed: {err}");
    let _ = std::fs::remove_dir_all(&shim);
}

/// `upload_cast` stages through chunks yet writes every value, rounded as `cast_from_f32`
/// rounds them (a length past one chunk, and into a longer buffer whose tail it leaves alone).
#[test]
fn upload_cast_writes_every_value_across_chunks() {
    let Some(g) = gpu() else { return };
    let n = reel_cuda::UPLOAD_CAST_CHUNK + 1001;
    let host: Vec<f32> = (0..n).map(|i| (i % 9973) as f32 * 0.37 - 1234.5).collect();
    let mut dst = g.alloc_zeros::<bf16>(n + 7).unwrap();
    g.upload_cast(&mut dst, &host).unwrap();
    let got = g.download(&dst).unwrap();
    for (i, (a, b)) in got.iter().zip(&host).enumerate() {
        assert_eq!(*a, bf16::from_f32(*b), "value {i}");
    }
    assert!(
        got[n..].iter().all(|x| x.to_f32() == 0.0),
        "the tail untouched"
    );
    let mut short = g.alloc_zeros::<bf16>(5).unwrap();
    assert!(g.upload_cast(&mut short, &host[..6]).is_err());
}
