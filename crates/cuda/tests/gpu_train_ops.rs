//! The partial-attention merge, the LM head + cross-entropy and AdamW on the GPU against their CPU
//! references (reel-kernels, reel-optim), at several shapes, odd ones included. Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --release --test gpu_train_ops -- --nocapture
//!
//! Inputs are random, outputs poisoned with NaN first (accumulated outputs start random).

mod common;
use common::*;

use reel_cuda::{Gpu, GpuError, GpuFloat};
use reel_kernels::attention::attention_merge;
use reel_kernels::cross_entropy::{
    lm_head_ce_backward, lm_head_ce_entropy_forward, lm_head_ce_forward, IGNORE_INDEX,
};
use reel_optim::{AdamW, AdamWConfig, LrSchedule};
use reel_tensor::{bf16, rng, uniform_vec, Rng, Tolerance};

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

// ---------------------------------------------------------------------------------------------

/// lse vectors hold −∞: the pattern must match exactly, the rest within `tol`.
fn compare_lse(what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            *a == f32::NEG_INFINITY,
            *b == f32::NEG_INFINITY,
            "{what}[{i}]: {a} vs {b}"
        );
    }
    let fin = |x: &[f32]| -> Vec<f32> {
        x.iter()
            .map(|&v| if v == f32::NEG_INFINITY { 0.0 } else { v })
            .collect()
    };
    compare(what, &fin(got), &fin(want), tol, tol.rtol as f64);
}

fn merge_case(g: &Gpu, r: &mut Rng, rows: usize, d: usize) {
    let o = uniform_vec(r, rows * d, 1.0);
    let o_b = uniform_vec(r, rows * d, 1.0);
    let mut lse = uniform_vec(r, rows, 8.0);
    let mut lse_b = uniform_vec(r, rows, 8.0);
    // Rows that saw no key on one side, the other, or both; and far-apart lse values.
    for i in 0..rows {
        match i % 7 {
            1 => lse[i] = f32::NEG_INFINITY,
            3 => lse_b[i] = f32::NEG_INFINITY,
            5 if i % 14 == 5 => {
                lse[i] = f32::NEG_INFINITY;
                lse_b[i] = f32::NEG_INFINITY;
            }
            6 => lse_b[i] = lse[i] + 60.0,
            _ => {}
        }
    }
    let (mut o_c, mut lse_c) = (o.clone(), lse.clone());
    attention_merge(&mut o_c, &mut lse_c, &o_b, &lse_b, rows, d);
    let mut o_g = g.upload(&o).unwrap();
    let mut lse_g = g.upload(&lse).unwrap();
    let (ob_g, lb_g) = (g.upload(&o_b).unwrap(), g.upload(&lse_b).unwrap());
    g.attention_merge(&mut o_g, &mut lse_g, &ob_g, &lb_g, rows, d)
        .unwrap();
    let s = format!("rows={rows} d={d}");
    compare(
        &format!("attention_merge o {s}"),
        &g.download(&o_g).unwrap(),
        &o_c,
        Tolerance::new(1e-6, 1e-5),
        1e-5,
    );
    compare_lse(
        &format!("attention_merge lse {s}"),
        &g.download(&lse_g).unwrap(),
        &lse_c,
        Tolerance::new(1e-6, 1e-6),
    );
}

#[test]
fn attention_merge_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(300);
    for &(rows, d) in &[(1, 1), (7, 3), (14, 64), (127, 64), (1000, 128), (4099, 33)] {
        merge_case(&g, &mut r, rows, d);
    }
}

// ---------------------------------------------------------------------------------------------

/// Targets spread over the vocabulary; every 4th row unlabelled (IGNORE_INDEX or −1).
fn targets(n: usize, v: usize) -> Vec<i32> {
    (0..n)
        .map(|i| match i % 4 {
            1 => IGNORE_INDEX,
            3 if i % 8 == 3 => -1,
            _ => ((i * 7919 + 3) % v) as i32,
        })
        .collect()
}

fn ce_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, n: usize, d: usize, v: usize, chunk: usize) {
    let h: Vec<T> = to_t(&uniform_vec(r, n * d, 1.0));
    let w: Vec<T> = to_t(&uniform_vec(r, v * d, 1.0));
    let dw0: Vec<T> = to_t(&uniform_vec(r, v * d, 0.01));
    let tg = targets(n, v);
    let count = tg.iter().filter(|&&t| t >= 0).count();
    let dloss: Vec<f32> = (0..n)
        .map(|i| (1.0 + (i % 3) as f32) / count.max(1) as f32)
        .collect();

    let (mut loss_c, mut lse_c) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    let (sum_c, count_c) = lm_head_ce_forward(&mut loss_c, &mut lse_c, &h, &w, &tg, n, d, v, chunk);
    let (mut dh_c, mut dw_c) = (poison::<T>(n * d), dw0.clone());
    lm_head_ce_backward(
        &mut dh_c, &mut dw_c, &h, &w, &tg, &lse_c, &dloss, n, d, v, chunk,
    );

    let (h_g, w_g, dl_g) = (
        g.upload(&h).unwrap(),
        g.upload(&w).unwrap(),
        g.upload(&dloss).unwrap(),
    );
    let mut loss_g = g.upload(&vec![f32::NAN; n]).unwrap();
    let mut lse_g = g.upload(&vec![f32::NAN; n]).unwrap();
    let count_g = g
        .lm_head_ce_forward(&mut loss_g, &mut lse_g, &h_g, &w_g, &tg, n, d, v, chunk)
        .unwrap();
    let mut dh_g = g.upload(&poison::<T>(n * d)).unwrap();
    let mut dw_g = g.upload(&dw0).unwrap();
    g.lm_head_ce_backward(
        &mut dh_g, &mut dw_g, &h_g, &w_g, &tg, &lse_g, &dl_g, n, d, v, chunk,
    )
    .unwrap();

    let s = format!("{} n={n} d={d} V={v} chunk={chunk}", T::SUFFIX);
    assert_eq!(count_g, count_c, "{s}: labelled rows");
    let loss = g.download(&loss_g).unwrap();
    let sum_g: f64 = loss.iter().map(|&x| x as f64).sum();
    // Logits are f32 sums over d products either way; the order differs.
    let lt = Tolerance::new(2e-5 * (d as f32).sqrt(), 1e-5);
    compare(&format!("ce losses {s}"), &loss, &loss_c, lt, 1e-5);
    compare(
        &format!("ce lse {s}"),
        &g.download(&lse_g).unwrap(),
        &lse_c,
        lt,
        1e-5,
    );
    assert!(
        (sum_g - sum_c).abs() <= 1e-4 * sum_c.abs().max(1.0),
        "{s}: loss sum {sum_g} vs {sum_c}"
    );
    // The entropy from the same chunk fold (0 on unlabelled rows), with the same losses.
    let (mut l2_c, mut lse2_c, mut ent_c) = (vec![0.0; n], vec![0.0; n], vec![f32::NAN; n]);
    lm_head_ce_entropy_forward(
        &mut l2_c,
        &mut lse2_c,
        &mut ent_c,
        &h,
        &w,
        &tg,
        n,
        d,
        v,
        chunk,
    );
    let mut loss2_g = g.upload(&vec![f32::NAN; n]).unwrap();
    let mut ent_g = g.upload(&vec![f32::NAN; n]).unwrap();
    let count2 = g
        .lm_head_ce_entropy_forward(
            &mut loss2_g,
            &mut lse_g,
            &mut ent_g,
            &h_g,
            &w_g,
            &tg,
            n,
            d,
            v,
            chunk,
        )
        .unwrap();
    assert_eq!(count2, count_c, "{s}: labelled rows (entropy)");
    compare(
        &format!("ce entropy {s}"),
        &g.download(&ent_g).unwrap(),
        &ent_c,
        lt,
        1e-5,
    );
    compare(
        &format!("ce losses with entropy {s}"),
        &g.download(&loss2_g).unwrap(),
        &loss_c,
        lt,
        1e-5,
    );
    let (rt, rn) = if T::INDEX == 0 {
        (1e-4, 1e-4)
    } else {
        (1e-2, 1e-2)
    };
    let dh_cw = widen(&dh_c);
    compare(
        &format!("ce dh {s}"),
        &widen(&g.download(&dh_g).unwrap()),
        &dh_cw,
        Tolerance::new(rt * max_abs(&dh_cw), rt),
        rn,
    );
    let dw_cw = widen(&dw_c);
    compare(
        &format!("ce dweight (+=) {s}"),
        &widen(&g.download(&dw_g).unwrap()),
        &dw_cw,
        Tolerance::new(rt * max_abs(&dw_cw), rt),
        rn,
    );
}

#[test]
fn cross_entropy_matches_cpu() {
    let Some(g) = gpu() else { return };
    let g = &*g;
    let mut runs: Vec<(String, Box<dyn FnOnce() + '_>)> = Vec::new();
    for (i, &(n, d, v, chunk)) in [
        (9, 6, 13, 4),
        (1, 1, 1, 1),
        (8, 5, 3, 7),
        (33, 64, 1000, 256),
        (127, 96, 5003, 1024),
        (300, 256, 32000, 8192),
        (64, 896, 151936, 32768),
    ]
    .iter()
    .enumerate()
    {
        let s = format!("n={n} d={d} v={v} chunk={chunk}");
        runs.push((
            format!("f32 {s}"),
            Box::new(move || ce_case::<f32>(g, &mut rng(301 + i as u64), n, d, v, chunk)),
        ));
        runs.push((
            format!("bf16 {s}"),
            Box::new(move || ce_case::<bf16>(g, &mut rng(401 + i as u64), n, d, v, chunk)),
        ));
    }
    run_all("cross_entropy_matches_cpu", runs);
}

#[test]
fn cross_entropy_refuses_targets_outside_the_vocabulary() {
    let Some(g) = gpu() else { return };
    let (n, d, v) = (4, 3, 13);
    let h = g.upload(&vec![0.5f32; n * d]).unwrap();
    let w = g.upload(&vec![0.5f32; v * d]).unwrap();
    let mut loss = g.upload(&vec![0.0f32; n]).unwrap();
    let mut lse = g.upload(&vec![0.0f32; n]).unwrap();
    let e = g
        .lm_head_ce_forward(&mut loss, &mut lse, &h, &w, &[0, 1, 13, -100], n, d, v, 4)
        .expect_err("target 13 of 13");
    assert!(
        matches!(e, GpuError::Shape(_)) && e.to_string().contains("target 13 at row 2"),
        "{e}"
    );
    // Every row unlabelled: no loss, zero outputs, count 0.
    let c = g
        .lm_head_ce_forward(&mut loss, &mut lse, &h, &w, &[-100; 4], n, d, v, 4)
        .unwrap();
    assert_eq!(c, 0);
    assert!(g.download(&loss).unwrap().iter().all(|&x| x == 0.0));
}

// ---------------------------------------------------------------------------------------------

/// Several steps of AdamW over tensors of odd sizes, with and without decay, at scheduled
/// learning rates: the GPU's params and moments equal the CPU's bit for bit.
#[test]
fn adamw_matches_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut r = rng(302);
    let sizes = [1usize, 7, 1000, 33_333, (1 << 17) + 5];
    let decay = [true, false, true, false, true];
    let cfg = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.1,
        ..Default::default()
    };
    let schedule = LrSchedule::WarmupCosine {
        warmup_steps: 2,
        total_steps: 10,
        min_lr_ratio: 0.1,
    };
    let mut cpu = AdamW::new(&sizes, &decay, cfg);
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform_vec(&mut r, n, 1.0)).collect();
    let mut p_g: Vec<_> = params.iter().map(|p| g.upload(p).unwrap()).collect();
    let mut m_g: Vec<_> = sizes
        .iter()
        .map(|&n| g.alloc_zeros::<f32>(n).unwrap())
        .collect();
    let mut v_g: Vec<_> = sizes
        .iter()
        .map(|&n| g.alloc_zeros::<f32>(n).unwrap())
        .collect();
    for step in 1..=5u64 {
        let grads: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| uniform_vec(&mut r, n, 10f32.powi(step as i32 % 3 - 2)))
            .collect();
        let lr = schedule.lr_at(cfg.lr, step);
        {
            let mut pr: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            let gr: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
            cpu.step(&mut pr, &gr, lr);
        }
        let scalars = cfg.scalars(step, lr);
        for i in 0..sizes.len() {
            let gb = g.upload(&grads[i]).unwrap();
            g.adamw_step(
                &mut p_g[i],
                &gb,
                &mut m_g[i],
                &mut v_g[i],
                &scalars,
                decay[i],
            )
            .unwrap();
        }
        let state = cpu.state();
        for i in 0..sizes.len() {
            for (what, got, want) in [
                ("param", g.download(&p_g[i]).unwrap(), &params[i]),
                ("m", g.download(&m_g[i]).unwrap(), &state.m[i]),
                ("v", g.download(&v_g[i]).unwrap(), &state.v[i]),
            ] {
                let bad = got
                    .iter()
                    .zip(want.iter())
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(
                    bad.is_none(),
                    "adamw step {step} tensor {i} (n={}) {what}[{}]: gpu {} cpu {}",
                    sizes[i],
                    bad.unwrap_or(0),
                    got[bad.unwrap_or(0)],
                    want[bad.unwrap_or(0)]
                );
            }
        }
        eprintln!("  adamw step {step} lr {lr:.3e}: params, m, v equal to the bit");
    }
    let one = g.upload(&[1.0f32]).unwrap();
    let mut two = g.upload(&[1.0f32, 2.0]).unwrap();
    let (mut m, mut v) = (g.upload(&[0.0f32]).unwrap(), g.upload(&[0.0f32]).unwrap());
    let e = g
        .adamw_step(&mut two, &one, &mut m, &mut v, &cfg.scalars(1, 1e-3), true)
        .expect_err("lengths differ");
    assert!(
        e.to_string().contains("grad has 1 elements, expected 2"),
        "{e}"
    );
}
