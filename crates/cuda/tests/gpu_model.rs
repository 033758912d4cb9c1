//! The device-resident Qwen2 (`GpuQwen2`, bf16 activations, fp32 master weights) against the
//! CPU model (`reel_model::Qwen2`, f32) at tiny configs: the loss and the gradient of every
//! parameter tensor, by checkpoint name, under each checkpoint policy; a warm training step
//! makes no device allocation; optimizer state and parameters round-trip. Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --features cudnn --release --test gpu_model -- --nocapture
#![cfg(feature = "cudnn")]

mod common;
use common::model::{enabled, Case};
use common::rel_norm_err;

use reel_cuda::{Gpu, GpuQwen2, Profile};
use reel_model::{CheckpointPolicy, LocalAttention, Qwen2, Qwen2Config, Workspace};
use reel_optim::{AdamW, AdamWConfig};

fn config(tied: bool) -> Qwen2Config {
    let mut c = Qwen2Config::tiny(200);
    c.tie_word_embeddings = tied;
    c.num_hidden_layers = 3;
    c.head_dim = 32;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.hidden_size = 96;
    c.intermediate_size = 160;
    c
}

/// Loss and gradients of the CPU model (f32) on `case`, loss scaled by 1 / labelled.
fn cpu_reference(model: &Qwen2, case: &Case) -> (f64, Vec<f32>) {
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::None);
    let s = model
        .forward(&mut ws, &case.batch(), &LocalAttention)
        .unwrap();
    let mut g = vec![0.0f32; model.params.len()];
    let scale = 1.0 / s.n_tokens as f32;
    model
        .backward(&mut g, &mut ws, &case.batch(), scale, &LocalAttention)
        .unwrap();
    (s.mean(), g)
}

#[test]
fn loss_and_every_gradient_match_the_cpu_model_under_each_policy() {
    if !enabled() {
        return;
    }
    for (tied, b, t) in [(true, 2, 100), (false, 1, 257)] {
        let c = config(tied);
        let model = Qwen2::new_random(c.clone(), 7).unwrap();
        let case = Case::new(11, c.vocab_size, b, t, 5);
        let (cpu_loss, cpu_g) = cpu_reference(&model, &case);
        for policy in [
            CheckpointPolicy::None,
            CheckpointPolicy::Layer,
            CheckpointPolicy::Remat,
        ] {
            let gpu = Gpu::open(0).expect("REEL_GPU_TESTS=1 but no GPU");
            let mut gm = GpuQwen2::new(
                gpu,
                c.clone(),
                &model.params,
                policy,
                AdamWConfig::default(),
            )
            .unwrap();
            gm.zero_grads().unwrap();
            let s = gm.forward(&case.batch()).unwrap();
            gm.backward(&case.batch(), 1.0 / s.n_tokens as f32).unwrap();
            let g = gm.grads_host().unwrap();
            let loss = s.mean();
            eprintln!("tied {tied}, B {b} T {t}, {policy}: loss GPU {loss:.6} CPU {cpu_loss:.6}");
            assert!(
                (loss - cpu_loss).abs() <= 1e-2 * cpu_loss.abs(),
                "{policy}: loss {loss} vs CPU {cpu_loss}"
            );
            let mut worst = 0.0f64;
            for e in &model.layout.entries {
                let (a, w) = (&g[e.range.clone()], &cpu_g[e.range.clone()]);
                assert!(a.iter().all(|x| x.is_finite()), "{}: non-finite", e.name);
                let rel = rel_norm_err(a, w);
                worst = worst.max(rel);
                assert!(
                    rel <= 3e-2,
                    "{policy}: gradient of {} off by relative norm {rel:.3e}",
                    e.name
                );
            }
            eprintln!(
                "  {} tensors, worst gradient rel-norm error {worst:.3e}",
                model.layout.entries.len()
            );
        }
    }
}

#[test]
fn a_warm_training_step_allocates_nothing_and_state_round_trips() {
    if !enabled() {
        return;
    }
    let c = config(true);
    let model = Qwen2::new_random(c.clone(), 3).unwrap();
    let gpu = Gpu::open(0).unwrap();
    let opt_cfg = AdamWConfig::default();
    let mut gm = GpuQwen2::new(
        gpu,
        c.clone(),
        &model.params,
        CheckpointPolicy::Remat,
        opt_cfg,
    )
    .unwrap();
    assert_eq!(gm.params_host().unwrap(), model.params);
    let step = |gm: &mut GpuQwen2, case: &Case| {
        gm.zero_grads().unwrap();
        let s = gm.forward(&case.batch()).unwrap();
        gm.backward(&case.batch(), 1.0 / s.n_tokens as f32).unwrap();
        let norm = gm.clip_grad_norm(1.0).unwrap();
        gm.adamw_step(1e-3).unwrap();
        gm.gpu().synchronize().unwrap();
        (s.mean(), norm)
    };
    // Warm-up: every shape of the run twice (attention plans, activation capacity, scratch
    // classes), nearly every token labelled (the largest cross-entropy scratch).
    let shapes = [(2usize, 128usize), (1, 200), (2, 100)];
    let mut losses = Vec::new();
    let mut n0 = 0.0;
    for (k, &(b, t)) in shapes.iter().chain(&shapes).enumerate() {
        let (l, n) = step(
            &mut gm,
            &Case::new(100 + k as u64, c.vocab_size, b, t, 1000),
        );
        losses.push(l);
        n0 = n;
    }
    let before = gm.gpu().alloc_stats();
    for (i, &(b, t)) in shapes.iter().enumerate() {
        let (l, n) = step(&mut gm, &Case::new(2 + i as u64, c.vocab_size, b, t, 3 + i));
        assert!(l.is_finite() && n.is_finite() && n > 0.0);
        losses.push(l);
    }
    let after = gm.gpu().alloc_stats();
    eprintln!("warm steps: {before:?} → {after:?}; losses {losses:?}, a norm {n0}");
    assert_eq!(
        after.device_allocs, before.device_allocs,
        "a warm step allocated device memory"
    );
    assert!(
        after.pool_hits > before.pool_hits,
        "the pool served the scratch"
    );

    // A profiled step: every kind of op a step runs shows up, each with device time, and
    // together they fit inside the step's wall time; off again, nothing is recorded.
    let case = Case::new(7, c.vocab_size, 2, 128, 1000);
    gm.gpu().profile_begin();
    let t0 = std::time::Instant::now();
    step(&mut gm, &case);
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let prof = gm.gpu().profile_end().unwrap();
    let rows = &prof.by_category;
    eprintln!(
        "profiled step ({wall_ms:.2} ms wall): {rows:?}\n  by op: {:?}",
        prof.by_op
    );
    for op in [
        "matmul_backward",
        "attention_forward",
        "swiglu_fwd",
        "rmsnorm_bwd",
    ] {
        assert!(
            prof.by_op.iter().any(|r| r.category.starts_with(op)),
            "{op} missing from {:?}",
            prof.by_op
        );
    }
    assert!((prof.by_op.iter().map(|r| r.ms).sum::<f64>() - prof.total_ms()).abs() < 1e-6);
    for cat in ["gemm", "attention", "lm_head_ce", "optimizer", "kernels"] {
        let r = rows.iter().find(|r| r.category == cat);
        assert!(
            r.is_some_and(|r| r.ops > 0 && r.ms > 0.0),
            "{cat} missing from {rows:?}"
        );
    }
    let total: f64 = rows.iter().map(|r| r.ms).sum();
    assert!(total <= wall_ms, "{total} ms of ops in a {wall_ms} ms step");
    step(&mut gm, &case);
    gm.gpu().profile_begin();
    assert_eq!(gm.gpu().profile_end().unwrap(), Profile::default());

    // The GPU's AdamW state is reel-optim's layout: load it into a CPU AdamW and back.
    let st = gm.opt_state().unwrap();
    assert_eq!(st.step, 11);
    let sizes: Vec<usize> = model.layout.entries.iter().map(|e| e.range.len()).collect();
    let decay: Vec<bool> = model.layout.entries.iter().map(|e| e.decay).collect();
    let mut cpu_opt = AdamW::new(&sizes, &decay, opt_cfg);
    cpu_opt.load_state(st.clone()).unwrap();
    gm.load_opt_state(cpu_opt.state_ref()).unwrap();
    assert_eq!(gm.opt_state().unwrap(), st);
    assert_ne!(
        gm.params_host().unwrap(),
        model.params,
        "the steps moved the weights"
    );

    // Released between updates (room for a GRPO rollout), the activation buffers go back to
    // the device, and the next pass sizes them again and computes as before.
    let case = Case::new(9, c.vocab_size, 2, 128, 1000);
    let loss = gm.forward(&case.batch()).unwrap().mean();
    assert!(gm.capacity() > 0);
    // What the workspace holds is what the plan counts, to the byte.
    assert_eq!(
        gm.workspace_bytes(),
        reel_cuda::workspace_bytes(&c, CheckpointPolicy::Remat, gm.capacity())
    );
    gm.release_workspace().unwrap();
    assert_eq!((gm.capacity(), gm.workspace_bytes()), (0, 0));
    // (The driver's bytes in use need not drop for buffers this small: it keeps small
    // allocations' pages. That the buffers went is seen by the next pass allocating them.)
    let before = gm.gpu().alloc_stats().device_allocs;
    assert_eq!(gm.forward(&case.batch()).unwrap().mean(), loss);
    assert!(gm.capacity() > 0);
    let after = gm.gpu().alloc_stats().device_allocs;
    assert!(
        after > before,
        "the next pass allocated nothing: {before} → {after}"
    );
}

#[test]
fn one_gpu_step_matches_one_cpu_step() {
    if !enabled() {
        return;
    }
    let c = config(false);
    let mut model = Qwen2::new_random(c.clone(), 5).unwrap();
    let case = Case::new(9, c.vocab_size, 2, 64, 4);
    let opt_cfg = AdamWConfig::default();
    let gpu = Gpu::open(0).unwrap();
    let mut gm = GpuQwen2::new(
        gpu,
        c.clone(),
        &model.params,
        CheckpointPolicy::Layer,
        opt_cfg,
    )
    .unwrap();
    gm.zero_grads().unwrap();
    let s = gm.forward(&case.batch()).unwrap();
    gm.backward(&case.batch(), 1.0 / s.n_tokens as f32).unwrap();
    let gn = gm.clip_grad_norm(1.0).unwrap();
    gm.adamw_step(1e-3).unwrap();
    let gp = gm.params_host().unwrap();

    let (_, mut g) = cpu_reference(&model, &case);
    let layout = model.layout.clone();
    let cn = {
        let mut gs = layout.split_mut(&mut g);
        reel_optim::clip_grad_norm(&mut gs, 1.0)
    };
    let sizes: Vec<usize> = layout.entries.iter().map(|e| e.range.len()).collect();
    let decay: Vec<bool> = layout.entries.iter().map(|e| e.decay).collect();
    let mut opt = AdamW::new(&sizes, &decay, opt_cfg);
    let before = model.params.clone();
    {
        let mut p = layout.split_mut(&mut model.params);
        let gs: Vec<&[f32]> = layout.entries.iter().map(|e| &g[e.range.clone()]).collect();
        opt.step(&mut p, &gs, 1e-3);
    }
    eprintln!("grad norm GPU {gn} CPU {cn}");
    assert!((gn - cn).abs() <= 2e-2 * cn, "grad norm {gn} vs {cn}");
    // The update (new − old) agrees within bf16 tolerance (Adam's first step is ~lr·sign(g)).
    let du_g: Vec<f32> = gp.iter().zip(&before).map(|(a, b)| a - b).collect();
    let du_c: Vec<f32> = model
        .params
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let rel = rel_norm_err(&du_g, &du_c);
    eprintln!("update rel-norm error {rel:.3e}");
    assert!(rel < 0.35, "update differs: {rel}");
}
