//! The tiny run every SFT test trains: synthetic reverse and sort tasks, a 2-layer Qwen2.

#![allow(dead_code)]

use reel_data::{char_tokenizer, synth_examples, write_jsonl, SynthKind, SynthTask};
use reel_data::{write_synth_dataset, SynthVideoConfig};
use reel_model::load_checkpoint;
use reel_train::vl::write_tiny_vl_model;
use reel_train::{run_sft, Device, InitConfig, ProgressMode, RunOptions, SftConfig};
use std::path::Path;

/// [`setup`]'s run with head dimension 16 (cuDNN takes multiples of 8), for the GPU tests.
pub fn gpu_setup(dir: &Path, steps: u64) -> SftConfig {
    let mut cfg = setup(dir, steps);
    if let Some(init) = cfg.model.init.as_mut() {
        init.hidden_size = 64;
        init.intermediate_size = 128;
    }
    cfg
}

pub fn setup(dir: &Path, steps: u64) -> SftConfig {
    let tok = char_tokenizer();
    tok.save(&dir.join("tok")).unwrap();
    let mut convs = synth_examples(SynthTask::new(SynthKind::Reverse), 60, 1);
    convs.extend(synth_examples(SynthTask::new(SynthKind::Sort), 60, 2));
    write_jsonl(&dir.join("train.jsonl"), &convs).unwrap();
    write_jsonl(&dir.join("eval.jsonl"), &convs[..8]).unwrap();
    let mut cfg = SftConfig::default();
    cfg.model.init = Some(InitConfig {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        max_position_embeddings: 128,
        ..InitConfig::default()
    });
    cfg.model.tokenizer = Some(dir.join("tok"));
    cfg.data.train = dir.join("train.jsonl");
    cfg.data.eval = Some(dir.join("eval.jsonl"));
    cfg.data.max_len = 64;
    cfg.data.tokens_per_batch = 512;
    cfg.train.steps = steps;
    cfg.train.lr = 3e-3;
    // The CPU path, whatever the build (its resume tests compare losses to the bit).
    cfg.train.device = Device::Cpu;
    cfg.train.warmup_steps = 2;
    cfg.output.dir = dir.join("run");
    cfg.output.save_every = 3;
    cfg.output.keep_last = 0;
    cfg
}

pub fn quiet<'a>() -> RunOptions<'a> {
    RunOptions {
        progress: Some(ProgressMode::Log),
        ..RunOptions::default()
    }
}

/// Runs `straight` through, then `cfg` (the same run in another folder) interrupted after
/// `stop_after` steps and resumed; asserts the resumed run continues from checkpoint
/// `resumed_from` with exactly the uninterrupted losses and ends with identical weights.
pub fn assert_resume_continues(
    straight: &SftConfig,
    cfg: &SftConfig,
    stop_after: u64,
    resumed_from: u64,
) {
    let total = straight.train.steps;
    let full = run_sft(straight, quiet()).unwrap();
    let part = run_sft(
        cfg,
        RunOptions {
            stop_after: Some(stop_after),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(part.steps, stop_after);
    let resumed = run_sft(
        cfg,
        RunOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(resumed.steps, total);
    assert_eq!(
        resumed.losses.len() as u64,
        total - resumed_from,
        "resumed from step {resumed_from}"
    );
    assert_eq!(
        &full.losses[resumed_from as usize..],
        &resumed.losses[..],
        "loss curve after resume"
    );
    let a = load_checkpoint(&full.final_model_dir).unwrap();
    let b = load_checkpoint(&resumed.final_model_dir).unwrap();
    assert_eq!(a.params, b.params);
}

/// A tiny Qwen2.5-VL, 6 synthetic videos with records (`data/train.jsonl`) and a held-out file
/// of 2 of them; a config training it for `steps` steps of 2 records into `dir/run`.
pub fn vl_setup(dir: &Path, steps: u64) -> SftConfig {
    let model = dir.join("model");
    write_tiny_vl_model(&model, 1).unwrap();
    let data = dir.join("data");
    let synth = SynthVideoConfig {
        videos: 6,
        frames: 8,
        width: 56,
        height: 56,
        held_out: 0.0,
        ..Default::default()
    };
    write_synth_dataset(&synth, &data).unwrap();
    let train = std::fs::read_to_string(data.join("train.jsonl")).unwrap();
    let eval: Vec<&str> = train.lines().take(2).collect();
    std::fs::write(data.join("eval.jsonl"), eval.join("\n") + "\n").unwrap();
    let mut cfg = SftConfig::default();
    cfg.model.path = Some(model);
    cfg.data.train = data.join("train.jsonl");
    cfg.data.eval = Some(data.join("eval.jsonl"));
    cfg.data.max_len = 1024;
    cfg.data.tokens_per_batch = 1024;
    cfg.train.steps = steps;
    cfg.train.grad_accum = 2;
    cfg.train.lr = 3e-3;
    cfg.train.warmup_steps = 1;
    // The CPU path, whatever the build (its resume and rank tests compare losses closely).
    cfg.train.device = Device::Cpu;
    cfg.output.dir = dir.join("run");
    cfg.output.save_every = 2;
    cfg.output.keep_last = 0;
    cfg
}

/// Every record of a run's metrics.jsonl.
pub fn metrics(cfg: &SftConfig) -> Vec<serde_json::Value> {
    metrics_in(&cfg.output.dir)
}

/// Every record of the metrics.jsonl in a run's output folder `out`.
pub fn metrics_in(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub mod text_grpo;

#[cfg(feature = "cuda")]
pub mod launch;

/// Whether the opt-in GPU tests run (`REEL_GPU_TESTS=1`); says how to turn them on when not.
pub fn gpu_tests_enabled() -> bool {
    let on = std::env::var("REEL_GPU_TESTS").as_deref() == Ok("1");
    if !on {
        eprintln!("skipped: set REEL_GPU_TESTS=1 to run the GPU tests");
    }
    on
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero).
pub fn rel_norm_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Metric `k` of a metrics record, as a number (a panic naming the step and key otherwise).
pub fn metric(r: &serde_json::Value, k: &str) -> f64 {
    r[k].as_f64()
        .unwrap_or_else(|| panic!("step {}: {k} = {}", r["step"], r[k]))
}
