//! GRPO's scoring and update on the GPU against the CPU. `GpuQwen2::token_logprobs` (policy and
//! reference weights, τ ≠ 1, entropy) and `backward_logprobs` from per-token `g_t`, token and
//! input-embedding forms, against `reel_model::Qwen2::token_logprobs`/`backward_logprobs` (and
//! their `_embeds` variants) at odd shapes under two checkpoint policies; then whole `reel grpo`
//! runs with `train.device = "cuda"` (f32 rollouts, bf16 scoring and update, a reference pass,
//! two mini-batches × two epochs: four updates a step, ratios away from 1) against the CPU run — per-step loss, KL and gradient norm within bf16
//! tolerance wherever the two runs drew the same samples (always step 1) — a bf16 run's finite
//! metrics, and a GPU run resumed from its checkpoint against the uninterrupted one. Needs the
//! `cuda` feature and a GPU; opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-train --features cuda --release --test gpu_grpo_update -- --nocapture
#![cfg(feature = "cuda")]

mod common;

use common::text_grpo::model as run_model;
use common::{gpu_tests_enabled as enabled, metric as num, rel_norm_err};

use rand::{Rng, SeedableRng};
use reel_cuda::{Gpu, GpuEmbedsBatch, GpuQwen2, Weights};
use reel_model::{
    CheckpointPolicy, EmbedsBatch, LocalAttention, Qwen2, Qwen2Config, Rotary, TokenBatch,
    Workspace,
};
use reel_optim::AdamWConfig;
use reel_train::{run_grpo, Device, GrpoOptions, GrpoRunConfig, GrpoSummary, ProgressMode};
use std::path::Path;

fn config(tied: bool) -> Qwen2Config {
    let mut c = Qwen2Config::tiny(211);
    c.tie_word_embeddings = tied;
    c.num_hidden_layers = 2;
    c.head_dim = 32;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.hidden_size = 96;
    c.intermediate_size = 160;
    c
}

/// A [B, T] batch whose rows are labelled from an odd point on (a prompt then a response),
/// with a few holes, and the per-token `g_t` of a loss.
struct Case {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    positions: Vec<u32>,
    dlogp: Vec<f32>,
    b: usize,
    t: usize,
}

impl Case {
    fn new(seed: u64, v: usize, b: usize, t: usize) -> Case {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = b * t;
        let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let mut targets = vec![-100i32; n];
        let mut dlogp = vec![0.0f32; n];
        for row in 0..b {
            let start = (t / 3 + 2 * row + 1).min(t - 1);
            for i in start..t {
                if (i * 7 + row) % 11 == 3 {
                    continue;
                }
                targets[row * t + i] = rng.random_range(0..v as i32);
                dlogp[row * t + i] = rng.random_range(-1.0f32..1.0);
            }
        }
        Case {
            tokens,
            targets,
            positions: (0..b).flat_map(|_| 0..t as u32).collect(),
            dlogp,
            b,
            t,
        }
    }
    fn batch(&self) -> TokenBatch<'_> {
        TokenBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            positions: &self.positions,
            b: self.b,
            t: self.t,
        }
    }
}

/// Log-probs agree within bf16's error (activations rounded per layer); entropy likewise.
fn check_rows(what: &str, gpu: &[f32], cpu: &[f32], targets: &[i32], atol: f32, rtol: f32) {
    let mut worst = 0.0f32;
    for (i, ((&g, &c), &t)) in gpu.iter().zip(cpu).zip(targets).enumerate() {
        if t < 0 {
            assert_eq!(g, 0.0, "{what}[{i}] is {g} on an unlabelled row");
            continue;
        }
        let err = (g - c).abs();
        worst = worst.max(err);
        assert!(
            g.is_finite() && err <= atol + rtol * c.abs(),
            "{what}[{i}]: GPU {g} CPU {c}"
        );
    }
    eprintln!("  {what}: worst |GPU − CPU| {worst:.3e}");
}

fn gpu_model(c: &Qwen2Config, params: &[f32], policy: CheckpointPolicy) -> GpuQwen2 {
    let gpu = Gpu::open(0).expect("REEL_GPU_TESTS=1 but no GPU");
    GpuQwen2::new(gpu, c.clone(), params, policy, AdamWConfig::default()).unwrap()
}

/// Every tensor's gradient within a relative-norm error `tol`; returns the worst.
fn check_grads(what: &str, model: &Qwen2, gpu: &[f32], cpu: &[f32], tol: f64) -> f64 {
    let mut worst = 0.0f64;
    for e in &model.layout.entries {
        let (a, w) = (&gpu[e.range.clone()], &cpu[e.range.clone()]);
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{what}: {} non-finite",
            e.name
        );
        let rel = rel_norm_err(a, w);
        worst = worst.max(rel);
        assert!(
            rel <= tol,
            "{what}: gradient of {} off by {rel:.3e}",
            e.name
        );
    }
    eprintln!("  {what}: worst gradient rel-norm error {worst:.3e}");
    worst
}

#[test]
fn gpu_logprobs_and_their_gradients_match_the_cpu() {
    if !enabled() {
        return;
    }
    for (tied, b, t, tau, policy) in [
        (true, 2, 37, 0.7f32, CheckpointPolicy::Remat),
        (false, 3, 61, 1.0, CheckpointPolicy::None),
        (false, 1, 129, 1.3, CheckpointPolicy::Layer),
    ] {
        eprintln!("tied {tied}, B {b} T {t}, τ {tau}, {policy}");
        let c = config(tied);
        let model = Qwen2::new_random(c.clone(), 3).unwrap();
        let reference = Qwen2::new_random(c.clone(), 4).unwrap();
        let case = Case::new(9 + t as u64, c.vocab_size, b, t);
        let n = b * t;
        // CPU: policy log-probs with entropy, the backward of g_t, reference log-probs.
        let mut ws = Workspace::new(&c, policy);
        let (mut lp_c, mut ent_c, mut ref_c) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let count = model
            .token_logprobs(
                &mut ws,
                &case.batch(),
                &LocalAttention,
                tau,
                &mut lp_c,
                Some(&mut ent_c),
            )
            .unwrap();
        let mut g_c = vec![0.0f32; model.params.len()];
        model
            .backward_logprobs(
                &mut g_c,
                &mut ws,
                &case.batch(),
                &case.dlogp,
                &LocalAttention,
            )
            .unwrap();
        reference
            .token_logprobs(
                &mut ws,
                &case.batch(),
                &LocalAttention,
                tau,
                &mut ref_c,
                None,
            )
            .unwrap();

        let mut gm = gpu_model(&c, &model.params, policy);
        let mut lp_g = vec![f32::NAN; n];
        let mut ent_g = vec![f32::NAN; n];
        // A reference pass needs the reference weights first.
        assert!(gm
            .token_logprobs(&case.batch(), Weights::Reference, tau, &mut lp_g, None)
            .is_err());
        gm.set_reference(&reference.params).unwrap();
        let got = gm
            .token_logprobs(
                &case.batch(),
                Weights::Policy,
                tau,
                &mut lp_g,
                Some(&mut ent_g),
            )
            .unwrap();
        assert_eq!(got, count);
        check_rows("logp", &lp_g, &lp_c, &case.targets, 3e-2, 1e-2);
        check_rows("entropy", &ent_g, &ent_c, &case.targets, 3e-2, 1e-2);
        gm.zero_grads().unwrap();
        gm.backward_logprobs(&case.batch(), &case.dlogp).unwrap();
        let g_g = gm.grads_host().unwrap();
        check_grads("policy gradient", &model, &g_g, &g_c, 3e-2);
        let mut ref_g = vec![f32::NAN; n];
        gm.token_logprobs(&case.batch(), Weights::Reference, tau, &mut ref_g, None)
            .unwrap();
        check_rows("reference logp", &ref_g, &ref_c, &case.targets, 3e-2, 1e-2);
        // No backward through the reference's forward; a bad g_t is refused by name.
        let e = gm
            .backward_logprobs(&case.batch(), &case.dlogp)
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy forward"), "{e}");
        let mut bad = case.dlogp.clone();
        let i = case.targets.iter().position(|&x| x >= 0).unwrap();
        bad[i] = f32::NAN;
        gm.token_logprobs(&case.batch(), Weights::Policy, tau, &mut lp_g, None)
            .unwrap();
        let e = gm
            .backward_logprobs(&case.batch(), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("dlogp[{i}]")), "{e}");
        // τ must be positive.
        assert!(gm
            .token_logprobs(&case.batch(), Weights::Policy, 0.0, &mut lp_g, None)
            .is_err());
    }
}

#[test]
fn gpu_logprobs_from_embeddings_and_their_gradients_match_the_cpu() {
    if !enabled() {
        return;
    }
    let c = config(false);
    let (d, half) = (c.hidden_size, c.head_dim / 2);
    let model = Qwen2::new_random(c.clone(), 5).unwrap();
    let feature: u32 = 7;
    for (b, t, tau) in [(2usize, 45usize, 0.8f32), (1, 70, 1.0)] {
        eprintln!("embeddings: B {b} T {t}, τ {tau}");
        let mut case = Case::new(31 + t as u64, c.vocab_size, b, t);
        let n = b * t;
        let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
        // A run of feature rows in each sequence (no other row holds the feature token).
        for x in case.tokens.iter_mut() {
            if *x == feature {
                *x = feature + 1;
            }
        }
        let mut is_feature = vec![false; n];
        for row in 0..b {
            for i in 3 + row..12 + row {
                case.tokens[row * t + i] = feature;
                is_feature[row * t + i] = true;
            }
            // The feature token sampled in a response: an ordinary table row.
            case.tokens[row * t + t - 4] = feature;
        }
        let rows = is_feature.iter().filter(|&&f| f).count();
        let features: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-0.5..0.5)).collect();
        let table = &model.params[model.layout.embed.clone()];
        let mut embeds = vec![0.0f32; n * d];
        let mut k = 0;
        for (i, &tok) in case.tokens.iter().enumerate() {
            let src = if is_feature[i] {
                k += 1;
                &features[(k - 1) * d..k * d]
            } else {
                &table[tok as usize * d..(tok as usize + 1) * d]
            };
            embeds[i * d..(i + 1) * d].copy_from_slice(src);
        }
        // Per-token angles (as M-RoPE gives): arbitrary, different on every row.
        let angles: Vec<f32> = (0..n * half).map(|_| rng.random_range(0.0..6.3)).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();

        let policy = CheckpointPolicy::Remat;
        let mut ws = Workspace::new(&c, policy);
        let eb = EmbedsBatch {
            embeds: &embeds,
            targets: &case.targets,
            rotary: Rotary::Angles {
                cos: &cos,
                sin: &sin,
            },
            b,
            t,
        };
        let mut lp_c = vec![0.0; n];
        model
            .token_logprobs_embeds(&mut ws, &eb, &LocalAttention, tau, &mut lp_c, None)
            .unwrap();
        let mut g_c = vec![0.0f32; model.params.len()];
        let dx_c = model
            .backward_logprobs_embeds(&mut g_c, &mut ws, &eb, &case.dlogp, &LocalAttention)
            .unwrap()
            .to_vec();
        // The text rows' share goes into the embedding table (as the VLM's lookup backward).
        let e0 = model.layout.embed.start;
        for (i, &tok) in case.tokens.iter().enumerate() {
            if !is_feature[i] {
                let at = e0 + tok as usize * d;
                for j in 0..d {
                    g_c[at + j] += dx_c[i * d + j];
                }
            }
        }

        let mut gm = gpu_model(&c, &model.params, policy);
        let gb = GpuEmbedsBatch {
            tokens: &case.tokens,
            targets: &case.targets,
            feature_token: feature,
            feature_rows: Some(&is_feature),
            features: &features,
            cos: &cos,
            sin: &sin,
            b,
            t,
        };
        let mut lp_g = vec![f32::NAN; n];
        gm.token_logprobs_embeds(&gb, Weights::Policy, tau, &mut lp_g, None)
            .unwrap();
        check_rows("logp", &lp_g, &lp_c, &case.targets, 3e-2, 1e-2);
        gm.zero_grads().unwrap();
        let dx_g = gm
            .backward_logprobs_embeds(&gb, &case.dlogp, true)
            .unwrap()
            .unwrap();
        let rel = rel_norm_err(&dx_g, &dx_c);
        eprintln!("  ∂L/∂embeddings rel-norm error {rel:.3e}");
        assert!(rel <= 3e-2, "∂L/∂embeddings off by {rel:.3e}");
        let g_g = gm.grads_host().unwrap();
        check_grads("gradient", &model, &g_g, &g_c, 3e-2);
        // A feature row must hold the feature token.
        let mut wrong = is_feature.clone();
        wrong[0] = true;
        let bad = GpuEmbedsBatch {
            feature_rows: Some(&wrong),
            ..gb
        };
        let e = gm
            .token_logprobs_embeds(&bad, Weights::Policy, tau, &mut lp_g, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("feature row 0"), "{e}");
    }
}

/// The common run with two mini-batches of two PPO epochs, a KL term, τ = 0.9 and a checkpoint
/// every step (for the resume check).
fn setup(dir: &Path, model: &Path, device: Device, f32: bool) -> GrpoRunConfig {
    let mut cfg = common::text_grpo::setup(dir, model, device, f32);
    cfg.train.micro_batch_seqs = 3;
    cfg.train.mini_batches = 2;
    cfg.train.ppo_epochs = 2;
    cfg.grpo.lr = 1e-3;
    cfg.grpo.kl_coef = 0.05;
    cfg.grpo.temperature = 0.9;
    cfg.output.save_every = 1;
    cfg.output.keep_last = 0;
    cfg
}

fn run(cfg: &GrpoRunConfig, resume: bool, stop_after: Option<u64>) -> GrpoSummary {
    let opts = GrpoOptions {
        progress: Some(ProgressMode::Log),
        resume,
        stop_after,
        ..GrpoOptions::default()
    };
    run_grpo(cfg, opts).unwrap()
}

#[test]
fn gpu_scoring_and_update_match_the_cpu_run() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = run_model(dir.path());
    let cpu = run(
        &setup(&dir.path().join("cpu"), &m, Device::Cpu, false),
        false,
        None,
    );
    let gcfg = setup(&dir.path().join("gpu"), &m, Device::Cuda, true);
    let gpu = run(&gcfg, false, None);
    assert_eq!((cpu.records.len(), gpu.records.len()), (3, 3));
    assert_eq!((cpu.ref_passes, gpu.ref_passes), (3, 3));
    assert_eq!((cpu.old_passes, gpu.old_passes), (3, 3));
    let mut compared = 0;
    for (c, g) in cpu.records.iter().zip(&gpu.records) {
        assert_eq!(c["update_device"], "cpu");
        assert_eq!(g["update_device"], "cuda-bf16");
        assert_eq!(g["rollout_device"], "cuda-f32");
        for k in [
            "loss",
            "kl",
            "grad_norm",
            "entropy",
            "pg_loss",
            "ratio_mean",
        ] {
            assert!(num(g, k).is_finite(), "GPU step {}: {k}", g["step"]);
        }
        let same = ["reward_mean", "decode_tokens", "response_len_max"]
            .iter()
            .all(|k| c[k] == g[k]);
        let step = num(c, "step");
        assert!(same || step > 1.0, "step 1 rolls out from the same weights");
        let (lc, lg) = (num(c, "loss"), num(g, "loss"));
        let (kc, kg) = (num(c, "kl"), num(g, "kl"));
        let (nc, ng) = (num(c, "grad_norm"), num(g, "grad_norm"));
        let (ec, eg) = (num(c, "entropy"), num(g, "entropy"));
        eprintln!(
            "step {step}: same samples {same}; loss CPU {lc:.6} GPU {lg:.6}; kl CPU {kc:.3e} GPU \
             {kg:.3e}; grad_norm CPU {nc:.5} GPU {ng:.5}; entropy CPU {ec:.4} GPU {eg:.4}; \
             update_s CPU {:.3} GPU {:.3}",
            num(c, "update_s"),
            num(g, "update_s")
        );
        if !same {
            continue;
        }
        compared += 1;
        assert!(
            (lc - lg).abs() <= 2e-3 + 2e-2 * lc.abs(),
            "step {step}: loss"
        );
        assert!((kc - kg).abs() <= 1e-4 + 0.3 * kc.abs(), "step {step}: kl");
        assert!((nc - ng).abs() <= 5e-2 * nc, "step {step}: grad_norm");
        assert!((ec - eg).abs() <= 2e-2 * ec.abs(), "step {step}: entropy");
    }
    eprintln!("{compared} of 3 steps drew the same samples and were compared");
    // The weights moved alike: step 1's four updates (the same samples), GPU against CPU. Adam's
    // first steps are about lr·sign(g), so gradients near 0 may flip sign in bf16.
    let init = reel_model::load_checkpoint(&m).unwrap();
    let step1 = |s: &GrpoSummary| s.final_model_dir.parent().unwrap().join("step-1");
    let pc = reel_model::load_checkpoint(&step1(&cpu)).unwrap();
    let pg = reel_model::load_checkpoint(&step1(&gpu)).unwrap();
    let du = |p: &Qwen2| -> Vec<f32> {
        p.params
            .iter()
            .zip(&init.params)
            .map(|(a, b)| a - b)
            .collect()
    };
    let rel = rel_norm_err(&du(&pg), &du(&pc));
    eprintln!("step 1's update: GPU vs CPU rel-norm error {rel:.3e}");
    assert!(rel < 0.35, "the GPU run's update differs: {rel}");

    // Resume: stop the GPU run after step 2, resume it for step 3 (weights, AdamW moments and
    // the prompt order from the checkpoint).
    let rcfg = setup(&dir.path().join("resumed"), &m, Device::Cuda, true);
    let first = run(&rcfg, false, Some(2));
    assert_eq!(first.records.len(), 2);
    let resumed = run(&rcfg, true, None);
    assert_eq!(resumed.records.len(), 1);
    let (a, b) = (&gpu.records[2], &resumed.records[0]);
    let (la, lb) = (num(a, "loss"), num(b, "loss"));
    let identical = a["loss"] == b["loss"] && a["grad_norm"] == b["grad_norm"];
    eprintln!(
        "resumed step 3: loss {lb:.8} vs uninterrupted {la:.8} (bit-identical: {identical}); \
         same samples {}",
        a["decode_tokens"] == b["decode_tokens"]
    );
    assert_eq!(
        a["reward_mean"], b["reward_mean"],
        "resumed step 3's samples"
    );
    assert!(
        (la - lb).abs() <= 1e-4 + 1e-3 * la.abs(),
        "resumed step 3's loss"
    );

    // bf16 rollouts with the GPU update: finite, and the checkpoint loads.
    let mut bcfg = setup(&dir.path().join("bf16"), &m, Device::Auto, false);
    bcfg.train.share_prompt = false;
    let bf16 = run(&bcfg, false, None);
    for r in &bf16.records {
        assert_eq!(r["rollout_device"], "cuda-bf16");
        assert_eq!(r["update_device"], "cuda-bf16");
        for k in ["loss", "kl", "grad_norm", "entropy"] {
            assert!(num(r, k).is_finite(), "bf16 step {}: {k}", r["step"]);
        }
    }
    let p = reel_model::load_checkpoint(&bf16.final_model_dir).unwrap();
    assert!(p.params.iter().all(|x| x.is_finite()));
}
