//! cuDNN's fused attention (feature `cudnn`) against reel-kernels' CPU attention, forward (out,
//! lse) and backward (dq, dk, dv), causal and full, GQA, odd lengths, D 64 and 128. Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --features cudnn --release --test gpu_attention -- --nocapture
//!
//! Inputs are random bf16; the CPU reference runs in f32 on the same (widened) values; GPU
//! outputs are poisoned with NaN first. Tolerances are bf16's: the GPU stores out and the
//! gradients in bf16 and feeds P to its second GEMM in bf16.
#![cfg(feature = "cudnn")]

mod common;
use common::*;

use reel_cuda::{Gpu, GpuError};
use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};
use reel_tensor::{bf16, rng, uniform_vec, Tolerance};

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Elementwise within 2% of the reference's largest magnitude plus 2% relative, and within 1.5%
/// in norm.
fn bf16_grad_tol(reference: &[f32]) -> (Tolerance, f64) {
    (Tolerance::new(0.02 * max_abs(reference), 0.02), 1.5e-2)
}

fn case(g: &Gpu, seed: u64, shape: AttnShape, mask: AttnMask) {
    let AttnShape {
        b,
        tq,
        tk,
        h,
        h_kv,
        d,
    } = shape;
    let (nq, nk, nl) = (b * tq * h * d, b * tk * h_kv * d, b * tq * h);
    let mut r = rng(seed);
    let q: Vec<bf16> = to_t(&uniform_vec(&mut r, nq, 1.5));
    let k: Vec<bf16> = to_t(&uniform_vec(&mut r, nk, 1.5));
    let v: Vec<bf16> = to_t(&uniform_vec(&mut r, nk, 1.0));
    let dout: Vec<bf16> = to_t(&uniform_vec(&mut r, nq, 1.0));
    let (qw, kw, vw, dow) = (widen(&q), widen(&k), widen(&v), widen(&dout));

    // CPU reference in f32 on the widened inputs; its backward accumulates into zeros.
    let (mut out_c, mut lse_c) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
    attention_forward(&mut out_c, &mut lse_c, &qw, &kw, &vw, shape, mask);
    let (mut dq_c, mut dk_c, mut dv_c) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
    attention_backward(
        &mut dq_c, &mut dk_c, &mut dv_c, &dow, &qw, &kw, &vw, &out_c, &lse_c, shape, mask,
    );

    let (q_g, k_g, v_g, do_g) = (
        g.upload(&q).unwrap(),
        g.upload(&k).unwrap(),
        g.upload(&v).unwrap(),
        g.upload(&dout).unwrap(),
    );
    let mut out_g = g.upload(&poison::<bf16>(nq)).unwrap();
    let mut lse_g = g.upload(&vec![f32::NAN; nl]).unwrap();
    g.attention_forward(&mut out_g, &mut lse_g, &q_g, &k_g, &v_g, shape, mask)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut dq_g = g.upload(&poison::<bf16>(nq)).unwrap();
    let mut dk_g = g.upload(&poison::<bf16>(nk)).unwrap();
    let mut dv_g = g.upload(&poison::<bf16>(nk)).unwrap();
    let bwd = g.attention_backward(
        &mut dq_g, &mut dk_g, &mut dv_g, &do_g, &q_g, &k_g, &v_g, &out_g, &lse_g, shape, mask,
    );
    // cuDNN runs no backward at Tq = Tk = 1: refused up front, with a Shape error.
    let backward_runs = !(tq == 1 && tk == 1);
    match (&bwd, backward_runs) {
        (Ok(()), true) => {}
        (Err(GpuError::Shape(m)), false) => assert!(m.contains("Tq = Tk = 1"), "{m}"),
        (r, _) => panic!("attention_backward at tq={tq} tk={tk}: {r:?}"),
    }

    let m = match mask {
        AttnMask::Full => "full",
        AttnMask::Causal { .. } => "causal",
    };
    let s = format!("b={b} tq={tq} tk={tk} H={h} H_kv={h_kv} D={d} {m}");
    let lse = g.download(&lse_g).unwrap();
    // cuDNN's stats must be reel's lse: the natural-log logsumexp of the scaled scores. Say which
    // convention they follow when they are not.
    let log2e = std::f32::consts::LOG2_E;
    let err_ln = reel_tensor::max_abs_diff(&lse, &lse_c);
    let as_log2: Vec<f32> = lse_c.iter().map(|x| x * log2e).collect();
    let err_log2 = reel_tensor::max_abs_diff(&lse, &as_log2);
    eprintln!(
        "  lse convention {s}: max|gpu − ln-lse| {err_ln:.3e}, max|gpu − log2-lse| {err_log2:.3e}"
    );
    compare(
        &format!("attention lse {s}"),
        &lse,
        &lse_c,
        Tolerance::new(2e-3, 1e-3),
        1e-3,
    );
    compare(
        &format!("attention out {s}"),
        &widen(&g.download(&out_g).unwrap()),
        &out_c,
        Tolerance::new(1e-2, 2e-2),
        1e-2,
    );
    if !backward_runs {
        return;
    }
    for (name, got, want) in [
        ("dq", &dq_g, &dq_c),
        ("dk", &dk_g, &dk_c),
        ("dv", &dv_g, &dv_c),
    ] {
        let (t, rn) = bf16_grad_tol(want);
        compare(
            &format!("attention {name} {s}"),
            &widen(&g.download(got).unwrap()),
            want,
            t,
            rn,
        );
    }
}

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

const CAUSAL: AttnMask = AttnMask::Causal {
    q_offset: 0,
    k_offset: 0,
};

#[test]
fn attention_matches_cpu() {
    let Some(g) = gpu() else { return };
    eprintln!("cuDNN {}", g.cudnn_version().unwrap());
    let cases = [
        (shape(1, 127, 127, 4, 2, 64), CAUSAL),
        (shape(1, 127, 127, 4, 4, 128), AttnMask::Full),
        (shape(2, 64, 64, 2, 1, 64), CAUSAL),
        (shape(1, 1000, 1000, 8, 2, 128), CAUSAL),
        (shape(1, 1000, 1000, 4, 1, 64), AttnMask::Full),
        (shape(2, 256, 256, 6, 3, 128), CAUSAL),
        (shape(1, 100, 300, 4, 2, 64), AttnMask::Full),
        (shape(3, 1, 1, 2, 1, 64), CAUSAL),
    ];
    let g = &*g;
    let mut runs: Vec<(String, Box<dyn FnOnce() + '_>)> = cases
        .iter()
        .enumerate()
        .map(|(i, &(s, m))| {
            let f: Box<dyn FnOnce() + '_> = Box::new(move || case(g, 200 + i as u64, s, m));
            (format!("{s:?} {m:?}"), f)
        })
        .collect();
    // The first shape again: its cached plans.
    let (s0, m0) = cases[0];
    runs.push(("cached plan".into(), Box::new(move || case(g, 200, s0, m0))));
    run_all("attention_matches_cpu", runs);
}

#[test]
fn attention_refuses_what_it_cannot_run() {
    let Some(g) = gpu() else { return };
    let s = shape(1, 8, 8, 4, 3, 64);
    let buf = |n: usize| g.upload(&vec![bf16::from_f32(0.5); n]).unwrap();
    let (q, k, v) = (buf(8 * 4 * 64), buf(8 * 3 * 64), buf(8 * 3 * 64));
    let mut out = buf(8 * 4 * 64);
    let mut lse = g.upload(&[0.0f32; 32]).unwrap();
    let e = g
        .attention_forward(&mut out, &mut lse, &q, &k, &v, s, CAUSAL)
        .expect_err("H = 4 is no multiple of H_kv = 3");
    assert!(
        matches!(e, GpuError::Shape(_)) && e.to_string().contains("H_kv = 3"),
        "{e}"
    );
    let s = shape(1, 8, 8, 4, 2, 64);
    let e = g
        .attention_forward(&mut out, &mut lse, &q, &k, &v, s, CAUSAL)
        .expect_err("k has 8·3·64 elements, not 8·2·64");
    assert!(
        e.to_string().contains("k has 1536 elements, expected 1024"),
        "{e}"
    );
    let (k, v) = (buf(8 * 2 * 64), buf(8 * 2 * 64));
    let e = g
        .attention_forward(
            &mut out,
            &mut lse,
            &q,
            &k,
            &v,
            s,
            AttnMask::Causal {
                q_offset: 8,
                k_offset: 0,
            },
        )
        .expect_err("offset causal masks are CPU-only");
    assert!(matches!(e, GpuError::Shape(_)), "{e}");
    g.attention_forward(&mut out, &mut lse, &q, &k, &v, s, CAUSAL)
        .unwrap();
    // Constant inputs: every row's out is v's constant, its lse ln(#keys seen) + 0.25·64/8.
    let lse_h = g.download(&lse).unwrap();
    for (i, &l) in lse_h.iter().enumerate() {
        let t = i / 4;
        let want = ((t + 1) as f32).ln() + 0.25 * 64.0 / 8.0;
        assert!((l - want).abs() < 1e-3, "lse[{i}] = {l}, want {want}");
    }
}
