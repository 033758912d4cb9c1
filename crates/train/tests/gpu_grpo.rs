//! `reel grpo` with its rollouts on the GPU against the same run on the CPU engine: a random
//! model of the fixture's shape (fixtures/qwen2-tiny) with head dimension 32 (the paged
//! attention kernel's smallest), three steps at a learning rate that moves the policy, so steps 2
//! and 3 roll out with refreshed weights. With the f32 decoder (`rollout.gpu_f32`) and scoring
//! and update kept on the CPU (`train.gpu_update = false`) every step's rewards, response lengths
//! and last batch (ids and advantages) are the CPU run's and the loss agrees within 1e-5
//! relative; the bf16 decoder's run (scoring and update on the GPU) completes with finite
//! metrics (`gpu_grpo_update.rs` compares the GPU update with the CPU's). Greedy
//! accuracy (`eval_accuracy`) with `device = cuda` in f32 gives the CPU's answers. Needs the
//! `cuda` feature and a GPU; opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-train --features cuda --release --test gpu_grpo -- --nocapture
#![cfg(feature = "cuda")]

mod common;

use common::text_grpo::{fixture, model, setup};
use reel_data::Tokenizer;
use reel_train::{
    eval_accuracy, run_grpo, stop_token_ids, AccuracyOptions, Device, GrpoOptions, GrpoSummary,
    ProgressMode, PromptSet,
};
use std::path::Path;

fn run(dir: &Path, model: &Path, device: Device, f32: bool) -> GrpoSummary {
    let opts = GrpoOptions {
        progress: Some(ProgressMode::Log),
        ..GrpoOptions::default()
    };
    let mut cfg = setup(dir, model, device, f32);
    // The f32 comparison keeps scoring and the update on the CPU (f32, as the CPU run).
    cfg.train.gpu_update = !f32;
    run_grpo(&cfg, opts).unwrap()
}

#[test]
fn gpu_rollouts_give_the_cpu_runs_samples_and_loss() {
    if std::env::var("REEL_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set REEL_GPU_TESTS=1 to run the GPU tests");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let cpu = run(&dir.path().join("cpu"), &m, Device::Cpu, false);
    let gpu = run(&dir.path().join("f32"), &m, Device::Cuda, true);
    assert_eq!(cpu.records.len(), 3);
    assert_eq!(gpu.records.len(), 3);
    for (c, g) in cpu.records.iter().zip(&gpu.records) {
        assert_eq!(c["rollout_device"], "cpu");
        assert_eq!(g["rollout_device"], "cuda-f32");
        assert_eq!(g["update_device"], "cpu");
        for k in [
            "reward_mean",
            "reward_std",
            "response_len_mean",
            "response_len_max",
            "decode_tokens",
        ] {
            assert_eq!(c[k], g[k], "step {}: {k}", c["step"]);
        }
        let (lc, lg) = (c["loss"].as_f64().unwrap(), g["loss"].as_f64().unwrap());
        let rel = (lc - lg).abs() / lc.abs().max(1e-12);
        assert!(rel <= 1e-5, "step {}: loss CPU {lc} GPU {lg}", c["step"]);
        eprintln!(
            "step {}: reward_mean {} loss CPU {lc:.8} GPU {lg:.8} (rel {rel:.1e}); rollout_s CPU {:.3} GPU {:.3}",
            c["step"], c["reward_mean"], c["rollout_s"], g["rollout_s"]
        );
    }
    assert_eq!(cpu.last_batch, gpu.last_batch, "step 3's samples");
    // How far the policy moved (responses of steps 2 and 3 come from refreshed weights).
    let len = |s: &GrpoSummary, i: usize| s.records[i]["response_len_mean"].as_f64().unwrap();
    eprintln!(
        "response_len_mean by step: {:?}",
        (0..3).map(|i| len(&cpu, i)).collect::<Vec<_>>()
    );

    let bf16 = run(&dir.path().join("bf16"), &m, Device::Cuda, false);
    // The fixture itself (head dimension 16) has no GPU decoder: "cuda" says so.
    let mut tiny = setup(&dir.path().join("d16"), &fixture(), Device::Cuda, false);
    tiny.train.steps = 1;
    let e = format!("{:#}", run_grpo(&tiny, GrpoOptions::default()).unwrap_err());
    assert!(e.contains("head dimensions"), "{e}");
    assert_eq!(bf16.records.len(), 3);
    for r in &bf16.records {
        assert_eq!(r["rollout_device"], "cuda-bf16");
        assert_eq!(r["update_device"], "cuda-bf16");
        for k in ["loss", "reward_mean", "grad_norm", "rollout_s"] {
            let x = r[k].as_f64().unwrap();
            assert!(x.is_finite(), "bf16 step {}: {k} = {x}", r["step"]);
        }
        assert!(r["decode_tokens"].as_u64().unwrap() > 0);
    }
    let m = reel_model::load_checkpoint(&bf16.final_model_dir).unwrap();
    assert!(m.params.iter().all(|x| x.is_finite()));
}

#[test]
fn gpu_greedy_accuracy_gives_the_cpu_answers_in_f32() {
    if std::env::var("REEL_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set REEL_GPU_TESTS=1 to run the GPU tests");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let cfg = setup(&dir.path().join("p"), &m, Device::Cpu, false);
    let policy = reel_model::load_checkpoint(&m).unwrap();
    let tok = Tokenizer::from_dir(&m).unwrap();
    let set = PromptSet::read(&cfg.data.prompts, &tok, 256).unwrap();
    let decode = |ids: &[u32]| -> anyhow::Result<String> { Ok(tok.decode(ids, true)?) };
    let eval = |device: Device, gpu_f32: bool| {
        let opts = AccuracyOptions {
            max_new_tokens: 24,
            batch: 4,
            stop_token_ids: stop_token_ids(&tok, &policy),
            device,
            gpu_f32,
            ..AccuracyOptions::default()
        };
        eval_accuracy(&policy, &set.items, &decode, &opts).unwrap()
    };
    let cpu = eval(Device::Cpu, false);
    let f32 = eval(Device::Cuda, true);
    assert_eq!(
        (cpu.device.as_str(), f32.device.as_str()),
        ("cpu", "cuda-f32")
    );
    assert_eq!(cpu.overall.total, 6);
    assert_eq!(f32.responses, cpu.responses, "f32 GPU greedy answers");
    assert_eq!(f32.overall, cpu.overall);
    let bf16 = eval(Device::Auto, false);
    assert_eq!(bf16.device, "cuda-bf16");
    let same = bf16
        .responses
        .iter()
        .zip(&cpu.responses)
        .filter(|(a, b)| a == b)
        .count();
    eprintln!(
        "greedy answers: f32 GPU 6 of 6 equal to the CPU's, bf16 {same} of 6; e.g. {:?}",
        cpu.responses.first()
    );
}
