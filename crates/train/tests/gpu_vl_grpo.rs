//! Qwen2.5-VL GRPO with its rollouts on the GPU, and greedy VLM accuracy on the GPU, against the
//! same work on the CPU: a tiny random Qwen2.5-VL (`write_tiny_vl_model`, re-headed to head
//! dimension 32, the paged decode kernel's smallest, M-RoPE sections [4, 6, 6]) on synthetic
//! videos (`write_synth_dataset`).
//!
//! - Three GRPO steps at a learning rate that moves the policy (so steps 2 and 3 roll out with
//!   refreshed weights; two mini-batches, so the old-policy pass runs; β > 0, so the reference
//!   pass runs): with the f32 decoder (`rollout.gpu_f32`) every step's rewards, response lengths,
//!   decode tokens and last batch (ids and advantages) are the CPU run's, and so are the losses,
//!   KL, gradient norms and final weights, bit for bit (`train.gpu_update = false`: scoring and
//!   update run on the CPU from the same samples; `video.gpu_tower = "off"`: the CPU tower
//!   encodes); the bf16 decoder's run (its videos encoded by the bf16 GPU tower, scoring and
//!   update on the GPU) completes with finite metrics; `parallel.sp = 2` rolls out on the same
//!   decoder (step 1: the same samples), its CPU ranks scoring and updating.
//! - Scoring and update on the GPU (`train.gpu_update`, the default): with f32 rollouts, step 1
//!   (the same samples) has the CPU run's loss, KL, gradient norm and entropy within bf16
//!   tolerance (the CPU packing rows by prompt, the GPU one row per sample); a run stopped after
//!   step 1 and resumed gives the uninterrupted run's step 2.
//! - Scoring and update on in-process GPU ranks (dp × sp on one GPU: sp 2 zigzag and DistAttn,
//!   sp 3 ring, dp 2, dp 2 × sp 2; sp 3 and dp 2 × sp 2 again with the optimizer sharded,
//!   `parallel.shard_optimizer`, and dp 2 × sp 2 with the gradients sharded too,
//!   `parallel.shard_gradients`): step 1 draws the one-rank run's samples and follows its
//!   loss, KL, gradient norm and entropy within bf16 tolerance; step 2 and the checkpoint are
//!   finite, the checkpoint's optimizer state whole.
//! - One process per GPU (`nccl_vl_grpo_processes_follow_one_gpu`, 2 GPUs): the same at sp 2,
//!   dp 2, and sp 2 with the optimizer sharded and with the gradients too, over NCCL, the
//!   groups' rollouts split over the processes and gathered.
//! - `eval_vl_accuracy` with `device = cuda`, f32: every greedy response and the report equal the
//!   CPU's; bf16 answers every record.
//!
//! Needs the `cuda` feature and a GPU; opt-in:
//!
//!     REEL_GPU_TESTS=1 NCCL_NVLS_ENABLE=0 cargo test -p reel-train --features cuda --release --test gpu_vl_grpo -- --test-threads=1 --nocapture
#![cfg(feature = "cuda")]

mod common;

use common::launch::{assert_failed_in_time, die_now, is_rank_of, launch, CONFIG};
use common::{gpu_tests_enabled as enabled, metric as num};

use reel_data::{
    write_synth_dataset, FrameSampling, SynthVideoConfig, Tokenizer, VideoProcessorConfig,
    VideoSettings,
};
use reel_model::embed_cache::EmbedCache;
use reel_model::{load_vl_checkpoint, save_vl_checkpoint, Qwen25VL};
use reel_train::vl::write_tiny_vl_model;
use reel_train::{
    eval_vl_accuracy, run_vl_grpo, stop_token_ids, AccuracyOptions, Device, GpuTowerMode,
    GrpoOptions, GrpoRunConfig, ProgressMode, SpSchedule, VlGrpoSummary,
};
use std::path::{Path, PathBuf};

/// Reward: the length of the JSON line the command reads (it varies with the response).
const LEN_REWARD: &str = r#"read l; echo ${#l}"#;

/// The tiny VLM (width 64) with 2 query heads and 1 KV head of dimension 32 (the same weight
/// shapes as its 4 × 16 / 2 × 16 heads), and 8 synthetic videos' records.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    write_tiny_vl_model(&model, 3).unwrap();
    let m = load_vl_checkpoint(&model).unwrap();
    let mut config = m.config.clone();
    config.text.num_attention_heads = 2;
    config.text.num_key_value_heads = 1;
    config.text.head_dim = 32;
    config.mrope_section = [4, 6, 6];
    let m = Qwen25VL::from_params(config, m.lm.params, m.vision.params).unwrap();
    save_vl_checkpoint(&m, &model, reel_tensor::DType::F32, usize::MAX).unwrap();
    assert_eq!(load_vl_checkpoint(&model).unwrap().lm.config.head_dim, 32);
    let data = dir.join("data");
    let cfg = SynthVideoConfig {
        videos: 8,
        frames: 8,
        width: 56,
        height: 56,
        held_out: 0.0,
        ..Default::default()
    };
    write_synth_dataset(&cfg, &data).unwrap();
    (model, data.join("train.jsonl"))
}

fn config(model: &Path, data: &Path, out: PathBuf, device: Device, f32: bool) -> GrpoRunConfig {
    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = model.to_path_buf();
    cfg.data.prompts = data.to_path_buf();
    cfg.data.prompts_per_step = 2;
    cfg.train.steps = 3;
    cfg.train.micro_batch_seqs = 4;
    cfg.train.mini_batches = 2;
    cfg.train.device = device;
    cfg.rollout.gpu_f32 = f32;
    // The bit-for-bit comparison with the CPU run needs the CPU tower's features (the GPU
    // tower's differ by float rounding, and scoring reads them); the bf16 run encodes on the GPU.
    cfg.video.gpu_tower = if f32 {
        GpuTowerMode::Off
    } else {
        GpuTowerMode::Bf16
    };
    cfg.grpo.group_size = 4;
    cfg.grpo.max_response_tokens = 12;
    cfg.grpo.lr = 2e-2;
    cfg.grpo.kl_coef = 0.05;
    cfg.grpo.reward.accuracy_weight = 0.0;
    cfg.grpo.reward.format_weight = 0.0;
    cfg.grpo.reward.command = vec!["sh".into(), "-c".into(), LEN_REWARD.into()];
    cfg.video.sampling = "uniform:8".into();
    cfg.output.dir = out;
    cfg.output.save_every = 0;
    // The f32 comparison keeps scoring and the update on the CPU (f32, as the CPU run).
    cfg.train.gpu_update = !f32;
    cfg
}

fn run(cfg: &GrpoRunConfig) -> VlGrpoSummary {
    let opts = GrpoOptions {
        progress: Some(ProgressMode::Log),
        ..GrpoOptions::default()
    };
    run_vl_grpo(cfg, opts).unwrap()
}

#[test]
fn gpu_vl_rollouts_give_the_cpu_runs_samples_and_loss() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let at = |name: &str| dir.path().join(name);
    let cpu = run(&config(&m, &data, at("cpu"), Device::Cpu, false));
    let gpu = run(&config(&m, &data, at("f32"), Device::Cuda, true));
    assert_eq!(cpu.run.records.len(), 3);
    assert_eq!(gpu.run.records.len(), 3);
    for (c, g) in cpu.run.records.iter().zip(&gpu.run.records) {
        assert_eq!(c["rollout_device"], "cpu");
        assert_eq!(g["rollout_device"], "cuda-f32");
        assert_eq!(g["update_device"], "cpu");
        for k in [
            "reward_mean",
            "reward_std",
            "response_len_mean",
            "response_len_max",
            "decode_tokens",
            "prefill_tokens",
            "videos_encoded",
        ] {
            assert_eq!(c[k], g[k], "step {}: {k}", c["step"]);
        }
        // Scoring and update run on the CPU from the same samples: the same bits.
        for k in ["loss", "grad_norm", "kl"] {
            assert_eq!(c[k], g[k], "step {}: {k}", c["step"]);
        }
        eprintln!(
            "step {}: reward_mean {} loss CPU {} GPU {}; rollout_s CPU {:.3} GPU {:.3}",
            c["step"], c["reward_mean"], c["loss"], g["loss"], c["rollout_s"], g["rollout_s"]
        );
    }
    assert_eq!(cpu.run.last_batch, gpu.run.last_batch, "step 3's samples");
    let (wc, wg) = (
        load_vl_checkpoint(&cpu.run.final_model_dir).unwrap(),
        load_vl_checkpoint(&gpu.run.final_model_dir).unwrap(),
    );
    assert!(wc.lm.params == wg.lm.params, "final weights");
    let len = |s: &VlGrpoSummary, i: usize| s.run.records[i]["response_len_mean"].as_f64().unwrap();
    eprintln!(
        "response_len_mean by step: {:?}",
        (0..3).map(|i| len(&cpu, i)).collect::<Vec<_>>()
    );

    let bf16 = run(&config(&m, &data, at("bf16"), Device::Cuda, false));
    assert_eq!(bf16.run.records.len(), 3);
    for r in &bf16.run.records {
        assert_eq!(r["rollout_device"], "cuda-bf16");
        assert_eq!(r["update_device"], "cuda-bf16");
        assert_eq!(r["tower_device"], "cuda-bf16");
        for k in [
            "loss",
            "reward_mean",
            "grad_norm",
            "rollout_s",
            "kl",
            "entropy",
        ] {
            let x = r[k].as_f64().unwrap();
            assert!(x.is_finite(), "bf16 step {}: {k} = {x}", r["step"]);
        }
        assert!(r["decode_tokens"].as_u64().unwrap() > 0);
    }
    let w = load_vl_checkpoint(&bf16.run.final_model_dir).unwrap();
    assert!(w.lm.params.iter().all(|x| x.is_finite()));

    // Sequence parallelism rolls out on the same decoder (one engine for every group): step 1
    // draws the one-rank run's samples; its CPU ranks score and update them.
    let mut sp = config(&m, &data, at("sp"), Device::Cuda, true);
    sp.parallel.sp = 2;
    sp.train.steps = 1;
    let s = run(&sp);
    let (r, g1) = (&s.run.records[0], &gpu.run.records[0]);
    assert_eq!(r["rollout_device"], "cuda-f32");
    assert_eq!(r["update_device"], "cpu");
    for k in ["reward_mean", "decode_tokens", "response_len_max"] {
        assert_eq!(r[k], g1[k], "sp 2 step 1: {k}");
    }
}

/// The scoring-and-update runs of the rank tests: f32 rollouts and the CPU tower (so every run
/// draws the same samples at step 1), scoring and update on the GPU policy, two steps, two rows
/// per micro-batch (two micro-batches a mini-batch, one per replica at dp = 2).
fn ranks_config(model: &Path, data: &Path, out: PathBuf) -> GrpoRunConfig {
    let mut cfg = config(model, data, out, Device::Cuda, true);
    cfg.train.gpu_update = true;
    cfg.train.steps = 2;
    cfg.train.micro_batch_seqs = 2;
    cfg.grpo.lr = 1e-3;
    cfg.grpo.temperature = 0.9;
    cfg
}

/// Asserts that `got`'s step (a run on several ranks) drew `want`'s samples (the one-rank run's
/// step) and has its loss, KL, gradient norm and entropy within bf16 tolerance; every value of
/// `got` finite.
fn follows(what: &str, want: &serde_json::Value, got: &serde_json::Value) {
    assert_eq!(got["update_device"], "cuda-bf16", "{what}");
    for k in ["reward_mean", "decode_tokens", "response_len_max"] {
        assert_eq!(want[k], got[k], "{what}: the same samples ({k})");
    }
    let (lw, lg) = (num(want, "loss"), num(got, "loss"));
    let (kw, kg) = (num(want, "kl"), num(got, "kl"));
    let (nw, ng) = (num(want, "grad_norm"), num(got, "grad_norm"));
    let (ew, eg) = (num(want, "entropy"), num(got, "entropy"));
    eprintln!(
        "{what}: loss {lg:.6} (one rank {lw:.6}); kl {kg:.3e} ({kw:.3e}); grad_norm {ng:.5} \
         ({nw:.5}); entropy {eg:.4} ({ew:.4}); scoring_s {:.3} update_s {:.3}",
        num(got, "scoring_s"),
        num(got, "update_s")
    );
    assert!((lw - lg).abs() <= 2e-3 + 2e-2 * lw.abs(), "{what}: loss");
    assert!((kw - kg).abs() <= 1e-4 + 0.3 * kw.abs(), "{what}: kl");
    assert!((nw - ng).abs() <= 5e-2 * nw, "{what}: grad_norm");
    assert!((ew - eg).abs() <= 2e-2 * ew.abs(), "{what}: entropy");
}

#[test]
fn gpu_vl_sequence_and_data_parallel_ranks_follow_one_gpu_rank() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let one = run(&ranks_config(&m, &data, dir.path().join("one")));
    let one_updates = updates_of(&one);
    for (dp, sp, schedule, zero) in [
        (1, 2, SpSchedule::Zigzag, 0),
        (1, 2, SpSchedule::Distattn, 0),
        (1, 3, SpSchedule::Ring, 0),
        (2, 1, SpSchedule::Distattn, 0),
        (2, 2, SpSchedule::Zigzag, 0),
        (1, 3, SpSchedule::Ring, 1),
        (2, 2, SpSchedule::Zigzag, 1),
        (2, 2, SpSchedule::Zigzag, 2),
    ] {
        let sharded = sharded_what(zero);
        let what = format!("dp {dp} × sp {sp} ({schedule}{sharded})");
        let mut cfg = ranks_config(
            &m,
            &data,
            dir.path().join(format!("dp{dp}-sp{sp}-{schedule}-{zero}")),
        );
        cfg.parallel.dp = dp;
        cfg.parallel.sp = sp;
        cfg.parallel.schedule = schedule;
        cfg.parallel.shard_optimizer = zero > 0;
        cfg.parallel.shard_gradients = zero > 1;
        let s = run(&cfg);
        assert_eq!(s.run.records.len(), 2, "{what}");
        follows(&what, &one.run.records[0], &s.run.records[0]);
        for k in ["loss", "grad_norm", "kl", "entropy"] {
            let x = num(&s.run.records[1], k);
            assert!(x.is_finite(), "{what} step 2: {k} = {x}");
        }
        let w = load_vl_checkpoint(&s.run.final_model_dir).unwrap();
        assert!(w.lm.params.iter().all(|x| x.is_finite()), "{what}");
        let n = check_optimizer_state(&what, &s.run.final_model_dir, w.lm.params.len());
        assert_eq!(n, one_updates, "{what}: the one-rank run's optimizer steps");
    }
}

/// How a case shards the fp32 state (`zero`: 0 replicated, 1 the optimizer, 2 the gradients
/// too), for its name.
fn sharded_what(zero: u8) -> &'static str {
    match zero {
        0 => "",
        1 => ", optimizer sharded",
        _ => ", optimizer and gradients sharded",
    }
}

/// The optimizer steps in a run's final checkpoint ([`check_optimizer_state`]).
fn updates_of(s: &VlGrpoSummary) -> u64 {
    let dir = &s.run.final_model_dir;
    let n = load_vl_checkpoint(dir).unwrap().lm.params.len();
    check_optimizer_state("the reference run", dir, n)
}

/// The checkpoint's optimizer state is whole (a sharded run gathers it): one moment per
/// parameter, finite, not all zero; returns its optimizer step count (mini-batch updates).
fn check_optimizer_state(what: &str, dir: &Path, params: usize) -> u64 {
    let bytes = std::fs::read(dir.join(reel_train::checkpoint::OPTIMIZER_FILE)).unwrap();
    let st = reel_train::optimizer_state_from_bytes(&bytes)
        .unwrap_or_else(|e| panic!("{what}: the checkpoint's optimizer state: {e}"));
    assert!(st.step > 0, "{what}: optimizer steps");
    for (name, x) in [("m", &st.m), ("v", &st.v)] {
        let n: usize = x.iter().map(Vec::len).sum();
        assert_eq!(n, params, "{what}: {name} values");
        assert!(
            x.iter().flatten().all(|v| v.is_finite()),
            "{what}: {name} finite"
        );
        assert!(
            x.iter().flatten().any(|&v| v != 0.0),
            "{what}: {name} all zero"
        );
    }
    st.step
}

/// `reel grpo` of a Qwen2.5-VL with one process per GPU (`reel launch`): each process one rank
/// of the dp × sp grid on its own GPU, the round's groups split over the processes and their
/// responses gathered, the scoring and update passes' attention and gradients over NCCL. Step
/// 1 of sp = 2 (zigzag), of dp = 2 and of sp = 2 with the optimizer sharded over the two
/// processes and every prompt's prefill shared by them (`parallel.shared_prefill_tokens`) draws
/// the one-GPU run's samples and follows its loss,
/// KL, gradient norm and entropy within bf16 tolerance; the run ends with the replicas
/// identical (checked by the run over NCCL) and rank 0's checkpoint loads. Needs 2 GPUs.
#[test]
fn nccl_vl_grpo_processes_follow_one_gpu() {
    const NAME: &str = "nccl_vl_grpo_processes_follow_one_gpu";
    match is_rank_of(NAME) {
        Some(false) => return,
        Some(true) => {
            let path = std::env::var(CONFIG).expect("the launcher names the config");
            let cfg = GrpoRunConfig::from_file(&path).unwrap();
            let s = run_vl_grpo(&cfg, GrpoOptions::default()).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(s.run.records.len() as u64, cfg.train.steps);
            return;
        }
        None => {}
    }
    if !enabled() {
        return;
    }
    let gpus = reel_cuda::Gpu::device_count().unwrap_or(0);
    if gpus < 2 {
        eprintln!("nccl_vl_grpo_processes_follow_one_gpu: {gpus} GPU(s), needs 2; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let one = run(&ranks_config(&m, &data, dir.path().join("one")));
    let one_updates = updates_of(&one);
    for (j, (dp, sp, zero, shared)) in [
        (1, 2, 0, false),
        (2, 1, 0, false),
        (1, 2, 1, true),
        (1, 2, 2, true),
    ]
    .into_iter()
    .enumerate()
    {
        let sharded = sharded_what(zero);
        let prefill = if shared { ", every prefill shared" } else { "" };
        let what = format!("2 processes, dp {dp} × sp {sp}{sharded}{prefill}");
        let mut cfg = ranks_config(&m, &data, dir.path().join(format!("nccl-{j}")));
        cfg.parallel.dp = dp;
        cfg.parallel.sp = sp;
        cfg.parallel.shard_optimizer = zero > 0;
        cfg.parallel.shard_gradients = zero > 1;
        // Every prompt prefilled by both processes together (each then decoding half of its
        // samples), or each rolled out by its owner alone.
        cfg.parallel.shared_prefill_tokens = if shared { 1 } else { 0 };
        cfg.parallel.schedule = SpSchedule::Zigzag;
        let path = dir.path().join(format!("nccl-{j}.toml"));
        std::fs::write(&path, cfg.to_toml()).unwrap();
        launch(
            NAME,
            2,
            29900 + 3 * j as u16,
            &[(CONFIG, path.display().to_string())],
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let records = common::metrics_in(&cfg.output.dir);
        assert_eq!(records.len(), 2, "{what}: rank 0's metrics");
        follows(&what, &one.run.records[0], &records[0]);
        let latest = cfg.output.dir.join("checkpoints/step-2");
        let w = load_vl_checkpoint(&latest).unwrap();
        assert!(w.lm.params.iter().all(|x| x.is_finite()), "{what}");
        let n = check_optimizer_state(&what, &latest, w.lm.params.len());
        assert_eq!(n, one_updates, "{what}: the one-GPU run's optimizer steps");
    }
}

#[test]
fn gpu_vl_scoring_and_update_match_the_cpu_run() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let at = |name: &str| dir.path().join(name);
    let setup = |name: &str, device: Device| {
        let mut cfg = config(&m, &data, at(name), device, true);
        cfg.train.gpu_update = true;
        cfg.train.steps = 2;
        cfg.grpo.lr = 1e-3;
        cfg.grpo.temperature = 0.9;
        cfg.output.save_every = 1;
        cfg
    };
    let cpu = run(&setup("cpu", Device::Cpu));
    let gcfg = setup("gpu", Device::Cuda);
    let gpu = run(&gcfg);
    assert_eq!((cpu.run.ref_passes, gpu.run.ref_passes), (2, 2));
    assert_eq!((cpu.run.old_passes, gpu.run.old_passes), (2, 2));
    for (c, g) in cpu.run.records.iter().zip(&gpu.run.records) {
        assert_eq!(c["update_device"], "cpu");
        assert_eq!(g["update_device"], "cuda-bf16");
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
            "VLM step {step}: same samples {same}; loss CPU {lc:.6} GPU {lg:.6}; kl CPU {kc:.3e} \
             GPU {kg:.3e}; grad_norm CPU {nc:.5} GPU {ng:.5}; entropy CPU {ec:.4} GPU {eg:.4}; \
             update_s CPU {:.3} GPU {:.3}",
            num(c, "update_s"),
            num(g, "update_s")
        );
        if same {
            assert!(
                (lc - lg).abs() <= 2e-3 + 2e-2 * lc.abs(),
                "step {step}: loss"
            );
            assert!((kc - kg).abs() <= 1e-4 + 0.3 * kc.abs(), "step {step}: kl");
            assert!((nc - ng).abs() <= 5e-2 * nc, "step {step}: grad_norm");
            assert!((ec - eg).abs() <= 2e-2 * ec.abs(), "step {step}: entropy");
        }
    }
    // Stopped after step 1 and resumed: step 2 as the uninterrupted run's.
    let rcfg = setup("resumed", Device::Cuda);
    let opts = |resume: bool, stop_after: Option<u64>| GrpoOptions {
        progress: Some(ProgressMode::Log),
        resume,
        stop_after,
        ..GrpoOptions::default()
    };
    let first = run_vl_grpo(&rcfg, opts(false, Some(1))).unwrap();
    assert_eq!(first.run.records.len(), 1);
    let resumed = run_vl_grpo(&rcfg, opts(true, None)).unwrap();
    assert_eq!(resumed.run.records.len(), 1);
    let (a, b) = (&gpu.run.records[1], &resumed.run.records[0]);
    eprintln!(
        "VLM resumed step 2: loss {} vs uninterrupted {} (bit-identical: {})",
        b["loss"],
        a["loss"],
        a["loss"] == b["loss"]
    );
    assert_eq!(
        a["reward_mean"], b["reward_mean"],
        "resumed step 2's samples"
    );
    let (la, lb) = (num(a, "loss"), num(b, "loss"));
    assert!(
        (la - lb).abs() <= 1e-4 + 1e-3 * la.abs(),
        "resumed step 2's loss"
    );
}

#[test]
fn gpu_greedy_vl_accuracy_gives_the_cpu_answers_in_f32() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let model = load_vl_checkpoint(&m).unwrap();
    let tok = Tokenizer::from_dir(&m).unwrap();
    let settings = VideoSettings {
        sampling: FrameSampling::Uniform { frames: 8 },
        processor: VideoProcessorConfig::from_dir(&m).unwrap(),
    };
    let cache = EmbedCache::new(1 << 26);
    let eval = |device: Device, gpu_f32: bool| {
        let opts = AccuracyOptions {
            max_new_tokens: 24,
            batch: 3,
            stop_token_ids: stop_token_ids(&tok, &model.lm),
            device,
            gpu_f32,
            ..AccuracyOptions::default()
        };
        eval_vl_accuracy(&model, &tok, &data, &settings, &cache, &opts)
            .unwrap()
            .0
    };
    let cpu = eval(Device::Cpu, false);
    let f32 = eval(Device::Cuda, true);
    assert_eq!(cpu.device, "cpu");
    assert_eq!(f32.device, "cuda-f32");
    assert_eq!(cpu.overall.total, 8);
    assert_eq!(f32.responses, cpu.responses, "f32 GPU greedy answers");
    assert_eq!((&f32.overall, &f32.per_type), (&cpu.overall, &cpu.per_type));
    let chars: std::collections::BTreeSet<char> =
        cpu.responses.iter().flat_map(|r| r.chars()).collect();
    assert!(chars.len() > 3, "degenerate answers {:?}", cpu.responses);
    let bf16 = eval(Device::Auto, false);
    assert_eq!(bf16.device, "cuda-bf16");
    assert_eq!(bf16.overall.total, 8);
    let same = bf16
        .responses
        .iter()
        .zip(&cpu.responses)
        .filter(|(a, b)| a == b)
        .count();
    eprintln!(
        "VLM greedy accuracy: CPU {:.3}, GPU f32 {:.3} (8 of 8 answers equal), GPU bf16 {:.3} ({same} of 8 equal)",
        cpu.overall.accuracy, f32.overall.accuracy, bf16.overall.accuracy
    );
}

/// The step in whose middle rank 1 of the GRPO fault test exits.
const KILL_STEP: u64 = 3;
/// `parallel.timeout_s` of the fault test.
const TIMEOUT_S: u64 = 10;
/// Set for the relaunch that resumes.
const RESUME: &str = "REEL_VL_GRPO_TEST_RESUME";

/// A launched VLM GRPO run (2 processes, sp 2, the optimizer sharded over them) whose rank 1
/// exits in the middle of step 3 (after the scoring passes, before the update): rank 0 fails
/// within the collective timeout (10 s) with an error naming the step and the last good
/// checkpoint (step 2: weights and optimizer state gathered from both shards), which loads; a
/// relaunch with `resume` (each process taking its shard of the saved state) carries the run to
/// step 4. Needs 2 GPUs.
#[test]
fn nccl_vl_grpo_rank_killed_mid_step_fails_the_other_and_the_checkpoint_resumes() {
    const NAME: &str =
        "nccl_vl_grpo_rank_killed_mid_step_fails_the_other_and_the_checkpoint_resumes";
    match is_rank_of(NAME) {
        Some(false) => return,
        Some(true) => return killed_grpo_rank(),
        None => {}
    }
    if !enabled() {
        return;
    }
    let gpus = reel_cuda::Gpu::device_count().unwrap_or(0);
    if gpus < 2 {
        eprintln!("{NAME}: {gpus} GPU(s), needs 2; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let mut cfg = ranks_config(&m, &data, dir.path().join("killed"));
    cfg.train.steps = 4;
    cfg.output.save_every = 1;
    cfg.parallel.sp = 2;
    cfg.parallel.shard_optimizer = true;
    cfg.parallel.timeout_s = TIMEOUT_S;
    let path = dir.path().join("killed.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let stamp = dir.path().join("died-at");
    let env = [
        (CONFIG, path.display().to_string()),
        (STAMP, stamp.display().to_string()),
    ];
    let r = launch(NAME, 2, 29930, &env);
    eprintln!("the killed run's launcher: {r:?}");
    assert!(r.is_err(), "the launch reports the failed world");
    let ckpts = cfg.output.dir.join("checkpoints");
    let w = load_vl_checkpoint(&ckpts.join("step-2")).unwrap();
    let at2 = check_optimizer_state("the killed run", &ckpts.join("step-2"), w.lm.params.len());
    assert!(
        !ckpts.join("step-3").exists(),
        "no checkpoint of the killed step"
    );
    let relaunch = [env[0].clone(), (RESUME, "1".into())];
    launch(NAME, 2, 29933, &relaunch).unwrap_or_else(|e| panic!("resume: {e}"));
    let steps: Vec<u64> = common::metrics_in(&cfg.output.dir)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4],
        "steps before the kill, then the resumed ones"
    );
    let w = load_vl_checkpoint(&ckpts.join("step-4")).unwrap();
    assert!(w.lm.params.iter().all(|x| x.is_finite()));
    let at4 = check_optimizer_state("the resumed run", &ckpts.join("step-4"), w.lm.params.len());
    assert_eq!(
        at4,
        2 * at2,
        "the resumed run carries on the optimizer's step count"
    );
}

/// Where the killed rank writes the time it died (milliseconds since the epoch).
const STAMP: &str = "REEL_VL_GRPO_TEST_STAMP";

/// A rank process of the GRPO fault test.
fn killed_grpo_rank() {
    let path = std::env::var(CONFIG).expect("the launcher names the config");
    let cfg = GrpoRunConfig::from_file(&path).unwrap();
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    if std::env::var_os(RESUME).is_some() {
        let opts = GrpoOptions {
            resume: true,
            ..GrpoOptions::default()
        };
        let s = run_vl_grpo(&cfg, opts).unwrap_or_else(|e| panic!("rank {rank}: resume: {e:#}"));
        assert_eq!(
            s.run.records.len(),
            2,
            "steps 3 and 4 after resuming from step 2"
        );
        return;
    }
    let stamp = PathBuf::from(std::env::var(STAMP).unwrap());
    let mut opts = GrpoOptions::default();
    if rank == 1 {
        let stamp = stamp.clone();
        opts.mid_step_hook = Some(Box::new(move |step| {
            if step == KILL_STEP {
                die_now(&stamp, step);
            }
        }));
    }
    let e = match run_vl_grpo(&cfg, opts) {
        Ok(s) => panic!(
            "rank {rank} finished {} steps without its peer",
            s.run.steps
        ),
        Err(e) => e,
    };
    assert_failed_in_time(&stamp, TIMEOUT_S, &format!("{e:#}"), KILL_STEP, "step-2");
}
