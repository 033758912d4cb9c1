//! `reel bench rl`: one GRPO step of a Qwen2.5-VL model on one synthetic video of 64, 256 and
//! 1024 frames (`--rl-frames`), with MR-SP's reuse on and off (`--rl-reuse`), through the trainer
//! itself (`reel_train::run_vl_grpo`, `[video] reuse`):
//!
//! - **on**: the video is encoded once (through the embedding cache) and its features serve the
//!   G rollouts and the reference and update passes; the group's prompt is prefilled once and
//!   the G samples fork from it;
//! - **off**: the video is encoded again for every sample of every pass, and every sample's
//!   prompt is prefilled on its own.
//!
//! A step is: decode the video, encode it, roll out G samples, rewards, a reference pass (β > 0),
//! one update. Printed per frame count: video and prompt tokens, step time and its split
//! (decode / encode / rollout / scoring / update), videos through the tower, prefilled tokens,
//! the peak device memory (GPU runs: `reel_cuda::MemWatch`, the device's used memory sampled
//! every 10 ms) and the speed-up of on over off (the fastest of `--reps` runs of each; with
//! `--rl-steps N` each run takes N steps and reports the last, a warm one).
//!
//! The model: a tiny random one by default (scaled down to finish in a few minutes on a CPU:
//! 56×56 frames, G = 4, 16 response tokens); `--rl-shape 3b|7b` a random-weight one at the
//! published Qwen2.5-VL-3B/-7B shapes ([`reel_train::VlShape`], written once, bf16), with
//! `--rl-side 448` the published frame size; `--rl-model DIR` a real Qwen2.5-VL folder.
//! `--rl-model-dir DIR` keeps the random model in DIR (written once, then read). Under `reel
//! launch --nproc N` with `--rl-sp N` each process runs one rank of the step on its own GPU
//! (`run_vl_grpo`'s launched path); give them one `--rl-model-dir` written beforehand.
//! `--rl-device` sets `train.device` (default "auto"), `--rl-checkpoint` the update's activation
//! checkpointing (`train.checkpoint`, default "remat": each layer's input, attention output and
//! lse kept, the rest recomputed — what lets a long row fit), `--rl-shard-optimizer` shards the
//! fp32 master weights and AdamW moments over the launched ranks (`parallel.shard_optimizer`),
//! `--rl-micro` the rows per
//! micro-batch of the scoring and update passes (default G; one row per micro-batch holds the
//! least activations).
//!
//! `--rl-max-frames START` searches instead for the most frames one step can take (reuse on):
//! each trial is this binary run again on one frame count (a child process, so an out-of-memory
//! failure cannot poison the next trial), doubling from START until a trial fails or
//! `--rl-frames-limit` is reached, then bisecting between the largest count that ran and the
//! smallest that failed to `--rl-frames-step` frames ([`search_max`]). Reported: every trial
//! (its step split and peak memory, or its error line), the largest count that ran and the
//! smallest that failed with its error. A trial running past `--rl-trial-timeout` seconds is
//! killed and counts as failed.

use anyhow::{bail, Context, Result};
use reel_data::{write_synth_dataset, SynthVideoConfig};
use reel_model::CheckpointPolicy;
use reel_train::{
    run_vl_grpo, write_shaped_vl_model, Device, GrpoOptions, GrpoRunConfig, ProgressMode, VlShape,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `reel bench rl` measures.
#[derive(Clone, Debug)]
pub struct RlBenchArgs {
    /// Frame counts, one step each way per count. Default 64, 256, 1024.
    pub frames: Vec<usize>,
    /// Square frame side in pixels (multiple of 28). Default 56.
    pub side: usize,
    /// Samples per prompt G. Default 4.
    pub group: usize,
    /// Tokens generated per sample. Default 16.
    pub response: usize,
    /// A Qwen2.5-VL folder to run instead of a random model.
    pub model: Option<PathBuf>,
    /// Only write the random shaped model into `model_dir` (`--rl-write-model`), no step.
    pub write_model_only: bool,
    /// Only estimate each frame count's GPU memory (`--rl-plan`; `reel_train::rl_memory`), no
    /// run; against `gpu_gib` GiB a GPU.
    pub plan: bool,
    pub gpu_gib: f64,
    /// Where the random shaped model is kept (written when the folder holds none, reused when it
    /// does); default a temporary folder.
    pub model_dir: Option<PathBuf>,
    /// The random model's shape when `model` is not given. Default tiny.
    pub shape: VlShape,
    /// Sequence-parallel ranks. Default 1.
    pub sp: usize,
    /// `parallel.shard_optimizer`: the fp32 master weights and AdamW moments sharded over the
    /// launched ranks. Default off.
    pub shard_optimizer: bool,
    /// `parallel.shard_gradients` (with `shard_optimizer`): the fp32 gradients sharded too
    /// (ZeRO-2). Default off.
    pub shard_gradients: bool,
    /// `parallel.shared_prefill_tokens` (launched sp > 1: long prompts prefilled by the
    /// processes together). Default: the config's.
    pub shared_prefill: Option<usize>,
    /// Runs of each mode; the fastest step is reported. Default 3.
    pub reps: usize,
    /// `train.device`. Default auto.
    pub device: Device,
    /// `train.checkpoint` of the update. Default remat.
    pub checkpoint: CheckpointPolicy,
    /// Rows per scoring/update micro-batch (`train.micro_batch_seqs`). Default: G.
    pub micro: Option<usize>,
    /// Steps per run; the last is reported. Default 1.
    pub steps: u64,
    /// Reuse modes measured (true = on). Default on and off.
    pub modes: Vec<bool>,
    /// The max-frames search: start, granularity, limit and a trial's timeout in seconds.
    pub search: Option<SearchArgs>,
}

/// `--rl-max-frames START --rl-frames-step S --rl-frames-limit L --rl-trial-timeout SECS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchArgs {
    /// First frame count tried. No default (the option turns the search on).
    pub start: usize,
    /// Bisection stops when the largest success and the smallest failure are this close; every
    /// count tried is a multiple of it. Default 64.
    pub step: usize,
    /// Doubling stops here (tried at most once). Default 8192.
    pub limit: usize,
    /// A trial running longer is killed and counts as failed. Default 900 s.
    pub timeout_s: u64,
}

/// The name `Device`'s `FromStr` reads.
fn device_name(d: Device) -> &'static str {
    match d {
        Device::Auto => "auto",
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
    }
}

/// Runs the benchmark; returns its JSON report (printed as a table unless `as_json`).
pub fn run(args: &RlBenchArgs, as_json: bool) -> Result<serde_json::Value> {
    if args.side == 0 || !args.side.is_multiple_of(28) {
        bail!("--rl-side {} must be a positive multiple of 28", args.side);
    }
    if args.write_model_only {
        return write_model_only(args);
    }
    if args.plan {
        return plan(args, as_json);
    }
    if args.frames.is_empty() && args.search.is_none() {
        bail!("--rl-frames: give at least one frame count");
    }
    if args.group == 0 || args.response == 0 || args.steps == 0 {
        bail!("--rl-group, --rl-response and --rl-steps must be at least 1");
    }
    if args.micro == Some(0) {
        bail!("--rl-micro must be at least 1");
    }
    match args.search {
        Some(s) => run_search(args, s, as_json),
        None => run_fixed(args, as_json),
    }
}

/// Tokens of the video at `frames` frames of `side` pixels: (side/28)² merged tokens per 2
/// frames.
fn video_tokens_at(frames: usize, side: usize) -> usize {
    frames.div_ceil(2) * (side / 28).pow(2)
}

/// Positions the random model needs for `frames` frames: the video, the text around it and
/// the response.
fn positions_for(frames: usize, args: &RlBenchArgs) -> usize {
    video_tokens_at(frames, args.side) + 1024 + args.response
}

/// The fewest frames a model kept in `--rl-model-dir` has positions for.
const KEPT_MODEL_FRAMES: usize = 4096;

/// The random `shape` model in `m`, written there with positions for `frames` frames unless
/// the folder holds one already.
fn keep_model(m: &Path, shape: VlShape, frames: usize, args: &RlBenchArgs) -> Result<()> {
    if m.join("config.json").is_file() {
        tracing::info!("the random {} model of {}", shape.name(), m.display());
        return Ok(());
    }
    let t0 = Instant::now();
    write_shaped_vl_model(m, shape, 0, positions_for(frames, args), args.side)?;
    tracing::info!(
        "wrote the random {} model in {:.1} s",
        shape.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--rl-write-model`: the random `--rl-shape` model written into `--rl-model-dir` (kept as is
/// when it holds one), no step: what a launched benchmark's processes then read, without a
/// one-process run that may not fit one GPU.
fn write_model_only(args: &RlBenchArgs) -> Result<serde_json::Value> {
    let Some(dir) = &args.model_dir else {
        bail!("--rl-write-model needs --rl-model-dir (where to keep the model)");
    };
    if args.shape == VlShape::Tiny || args.model.is_some() {
        bail!(
            "--rl-write-model writes a published shape: give --rl-shape 3b or 7b, not --rl-model"
        );
    }
    let longest = args.frames.iter().copied().max().unwrap_or(0);
    keep_model(dir, args.shape, longest.max(KEPT_MODEL_FRAMES), args)?;
    Ok(json!([{"model_dir": dir.display().to_string(), "shape": args.shape.name()}]))
}

/// Prompt tokens beside the video's in the benchmark's prompts (the question and the chat
/// template: 236 to 290 in the measured runs).
const PROMPT_TEXT_TOKENS: usize = 270;

/// `--rl-plan`: each frame count's estimated memory a GPU (module docs of
/// `reel_train::rl_memory`), no run.
fn plan(args: &RlBenchArgs, as_json: bool) -> Result<serde_json::Value> {
    use reel_train::rl_memory::{estimate, RlMemoryConfig};
    let Some((lm, vision)) = args.shape.configs(0) else {
        bail!("--rl-plan estimates a published shape: give --rl-shape 3b or 7b");
    };
    if args.frames.is_empty() {
        bail!("--rl-frames: give at least one frame count");
    }
    let gib = |b: u64| b as f64 / GIB;
    if !as_json {
        println!(
            "GPU memory of one GRPO step, estimated (Qwen2.5-VL {}, {}-pixel frames, G = {}, {} \
             response tokens, one row a micro-batch, checkpoint {}, sp = {}, optimizer {}, \
             reference kept; reel_train::rl_memory), against {:.1} GiB a GPU",
            args.shape.name(),
            args.side,
            args.group,
            args.response,
            args.checkpoint,
            args.sp,
            match (args.shard_optimizer, args.shard_gradients) {
                (true, true) => "and gradients sharded",
                (true, false) => "sharded",
                _ => "whole",
            },
            args.gpu_gib
        );
        println!(
            "{:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}  fits",
            "frames", "prompt", "state", "workspace", "attention", "KV+dec", "update", "rollout"
        );
    }
    let mut rows = Vec::new();
    for &frames in &args.frames {
        let prompt = video_tokens_at(frames, args.side) + PROMPT_TEXT_TOKENS;
        let m = estimate(&RlMemoryConfig {
            lm: lm.clone(),
            tower_params: reel_model::vision::VisionLayout::new(&vision).total(),
            sp: args.sp,
            world: args.sp,
            shard_optimizer: args.shard_optimizer,
            shard_gradients: args.shard_gradients,
            reference: true,
            policy: args.checkpoint,
            prompt_tokens: prompt,
            response_tokens: args.response,
            group: args.group,
        });
        let fits = gib(m.peak()) <= args.gpu_gib;
        if !as_json {
            println!(
                "{frames:>6} {prompt:>8} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {}",
                gib(m.state + m.tower),
                gib(m.workspace),
                gib(m.attention_scratch),
                gib(m.rollout_cache),
                gib(m.update()),
                gib(m.rollout()),
                if fits { "yes" } else { "no" }
            );
        }
        rows.push(json!({
            "frames": frames,
            "prompt_tokens": prompt,
            "state_bytes": m.state + m.tower,
            "workspace_bytes": m.workspace,
            "attention_scratch_bytes": m.attention_scratch,
            "rollout_cache_bytes": m.rollout_cache,
            "fixed_bytes": m.fixed,
            "update_peak_bytes": m.update(),
            "rollout_peak_bytes": m.rollout(),
            "fits": fits,
        }));
    }
    Ok(json!(rows))
}

/// The frame counts' fixed benchmark (module docs).
fn run_fixed(args: &RlBenchArgs, as_json: bool) -> Result<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let micro = args.micro.unwrap_or(args.group);
    if !as_json {
        println!(
            "RL step (GRPO, Qwen2.5-VL {}, {}-pixel frames, G = {}, {} response tokens, micro-batch \
             {micro} rows, checkpoint {}, sp = {}, device {}, {} threads, best of {}): MR-SP \
             reuse on vs off",
            args.model
                .as_ref()
                .map_or(args.shape.name().to_string(), |m| m.display().to_string()),
            args.side,
            args.group,
            args.response,
            args.checkpoint,
            args.sp,
            device_name(args.device),
            rayon::current_num_threads(),
            args.reps.max(1)
        );
        println!(
            "{:>6} {:>7} {:>7} {:>4} {:>8} {:>7} {:>7} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8}",
            "frames",
            "vid tok",
            "prompt",
            "mode",
            "step s",
            "decode",
            "encode",
            "rollout",
            "scoring",
            "update",
            "tower",
            "prefill",
            "peak GiB"
        );
    }
    // A published shape is written once, with room for the longest video.
    let shared_model = match (&args.model, args.shape) {
        (Some(m), _) => Some(m.clone()),
        (None, VlShape::Tiny) => None,
        (None, shape) => {
            let longest = args.frames.iter().copied().max().unwrap_or(0);
            let (m, frames) = match &args.model_dir {
                // A kept model serves later runs of more frames too.
                Some(d) => (d.clone(), longest.max(KEPT_MODEL_FRAMES)),
                None => (tmp.path().join("model"), longest),
            };
            keep_model(&m, shape, frames, args)?;
            Some(m)
        }
    };
    let mut rows = Vec::new();
    for &frames in &args.frames {
        let dir = tmp.path().join(format!("f{frames}"));
        let data = dir.join("data");
        write_synth_dataset(
            &SynthVideoConfig {
                videos: 1,
                frames,
                width: args.side,
                height: args.side,
                held_out: 0.0,
                ..Default::default()
            },
            &data,
        )?;
        let model = match &shared_model {
            Some(m) => m.clone(),
            None => {
                let m = dir.join("model");
                write_shaped_vl_model(
                    &m,
                    VlShape::Tiny,
                    0,
                    positions_for(frames, args),
                    args.side,
                )?;
                m
            }
        };
        let vid = reel_model::Qwen25VLConfig::from_file(&model.join("config.json"))?.video_token_id;
        let mut modes = Vec::new();
        for &reuse in &args.modes {
            let mode = if reuse { "on" } else { "off" };
            let mut best: Option<serde_json::Value> = None;
            let mut failed = None;
            for rep in 0..args.reps.max(1) {
                let out = dir.join(format!("{mode}-{rep}"));
                match one_run(args, micro, &model, &data, frames, reuse, &out, vid) {
                    Ok(r) => {
                        if !as_json {
                            // Each run as it ends (a later one may not finish).
                            print_row(&r);
                        }
                        let faster = best
                            .as_ref()
                            .is_none_or(|b| r["step_s"].as_f64() < b["step_s"].as_f64());
                        if faster {
                            best = Some(r);
                        }
                    }
                    Err(e) => {
                        failed = Some(format!("{e:#}"));
                        break;
                    }
                }
                // Runs leave checkpoints of the whole model: not kept.
                let _ = std::fs::remove_dir_all(&out);
            }
            match (best, failed) {
                (Some(r), None) => modes.push((reuse, r)),
                (_, Some(e)) => {
                    if !as_json {
                        println!("{frames:>6} {:>7} {:>7} {mode:>4} failed: {e}", "", "");
                    }
                    rows.push(json!({"frames": frames, "reuse": reuse, "error": e}));
                }
                (None, None) => unreachable!("at least one rep runs"),
            }
        }
        let step_of = |reuse: bool| {
            modes
                .iter()
                .find(|(r, _)| *r == reuse)
                .and_then(|(_, x)| x["step_s"].as_f64())
        };
        let speedup = match (step_of(true), step_of(false)) {
            (Some(on), Some(off)) => Some(off / on),
            _ => None,
        };
        if let (Some(x), false) = (speedup, as_json) {
            println!("{frames:>6} frames: reuse on is {x:.2}× faster than off");
        }
        for (reuse, mut r) in modes {
            r["speedup"] = if reuse { json!(speedup) } else { json!(null) };
            rows.push(r);
        }
    }
    Ok(json!(rows))
}

/// The runs of a report (`run`'s rows) that failed; 0 for a search's report, whose failed
/// trials are its findings.
pub fn failed_runs(report: &serde_json::Value) -> usize {
    report.as_array().map_or(0, |rows| {
        rows.iter().filter(|r| r.get("error").is_some()).count()
    })
}

/// One table row of a run's record.
fn print_row(r: &serde_json::Value) {
    let g = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    let peak = r["peak_mem_bytes"]
        .as_u64()
        .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / GIB));
    println!(
        "{:>6} {:>7} {:>7} {:>4} {:>8.3} {:>7.3} {:>7.3} {:>8.3} {:>8.3} {:>7.3} {:>6} {:>8} {:>8}",
        u("frames"),
        u("video_tokens"),
        u("prompt_tokens"),
        if r["reuse"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        g("step_s"),
        g("decode_s"),
        g("encode_s"),
        g("rollout_s"),
        g("scoring_s"),
        g("update_s"),
        u("videos_through_tower"),
        g("prefill_tokens"),
        peak,
    );
    // A launched run's processes each print their row: which one, and its GPU's peak.
    if let Some(rank) = r["rank"].as_u64() {
        let shared = match r["shared_prefill_s"].as_f64() {
            Some(s) if s > 0.0 => format!("; of its rollout, {s:.3} s in shared prefills"),
            _ => String::new(),
        };
        println!("       (the row above: rank {rank} of a launched world{shared})");
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The device's memory watch of a run that may use GPU 0, or a launched process's GPU (`None`
/// on the CPU or without one).
#[cfg(feature = "cuda")]
struct Watch(Option<reel_cuda::MemWatch>);

#[cfg(feature = "cuda")]
impl Watch {
    fn start(device: Device) -> Self {
        if device == Device::Cpu {
            return Watch(None);
        }
        // Under `reel launch`, this process's GPU.
        let ordinal = launched().map_or(0, |l| l.local_rank);
        Watch(reel_cuda::MemWatch::start(ordinal, Duration::from_millis(10)).ok())
    }
    /// Peak used and total bytes.
    fn stop(self) -> Option<(usize, usize)> {
        self.0.and_then(|w| w.stop().ok())
    }
}

#[cfg(not(feature = "cuda"))]
struct Watch;

#[cfg(not(feature = "cuda"))]
impl Watch {
    fn start(_: Device) -> Self {
        Watch
    }
    fn stop(self) -> Option<(usize, usize)> {
        None
    }
}

/// One GRPO run of `args.steps` steps on `data` at `frames` frames; the last step's record with
/// the bench's columns.
#[allow(clippy::too_many_arguments)]
fn one_run(
    args: &RlBenchArgs,
    micro: usize,
    model: &Path,
    data: &Path,
    frames: usize,
    reuse: bool,
    out: &Path,
    vid: u32,
) -> Result<serde_json::Value> {
    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = model.to_path_buf();
    cfg.data.prompts = data.join("train.jsonl");
    cfg.data.prompts_per_step = 1;
    cfg.data.max_prompt_len = usize::MAX / 2;
    cfg.train.steps = args.steps;
    cfg.train.micro_batch_seqs = micro;
    cfg.train.checkpoint = args.checkpoint;
    cfg.train.device = args.device;
    cfg.grpo.group_size = args.group;
    cfg.grpo.max_response_tokens = args.response;
    cfg.grpo.kl_coef = 0.01;
    cfg.video.sampling = format!("uniform:{frames}");
    cfg.video.reuse = reuse;
    // Room for the video's features at the widest published decoder (3584), so a second step
    // finds them cached as a shorter video's would be.
    cfg.video.cache_bytes = cfg
        .video
        .cache_bytes
        .max(2 * video_tokens_at(frames, args.side) * 3584 * 4);
    cfg.parallel.sp = args.sp;
    cfg.parallel.shard_optimizer = args.shard_optimizer;
    cfg.parallel.shard_gradients = args.shard_gradients;
    if let Some(t) = args.shared_prefill {
        cfg.parallel.shared_prefill_tokens = t;
    }
    cfg.output.dir = out.to_path_buf();
    cfg.output.save_every = 0;
    let watch = Watch::start(args.device);
    let s = run_vl_grpo(
        &cfg,
        GrpoOptions {
            progress: Some(ProgressMode::Log),
            // Saving the whole model and optimizer is not what is measured (minutes at 3B).
            no_checkpoints: true,
            ..GrpoOptions::default()
        },
    )
    .with_context(|| {
        format!(
            "{frames} frames, reuse {}",
            if reuse { "on" } else { "off" }
        )
    });
    let peak = watch.stop();
    let s = s?;
    let r = s.run.records.last().context("no step ran")?;
    let prompt = s.run.last_batch.first().map_or(0, |b| b.1);
    let video_tokens = s
        .run
        .last_batch
        .first()
        .map_or(0, |b| b.0[..b.1].iter().filter(|&&t| t == vid).count());
    let g = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let rank = launched().filter(|l| l.world > 1).map(|l| l.rank);
    Ok(json!({
        "rank": rank,
        "frames": frames, "video_tokens": video_tokens, "prompt_tokens": prompt,
        "reuse": reuse, "step_s": g("step_s"), "decode_s": g("decode_s"),
        "encode_s": g("encode_s"), "rollout_s": g("rollout_s"),
        "shared_prefill_s": g("shared_prefill_s"),
        "scoring_s": g("scoring_s"), "update_s": g("update_s"),
        "videos_through_tower": s.encode.videos_encoded, "prefill_tokens": g("prefill_tokens"),
        "rollout_device": r["rollout_device"], "update_device": r["update_device"],
        "tower_device": r["tower_device"],
        "peak_mem_bytes": peak.map(|p| p.0), "device_mem_bytes": peak.map(|p| p.1),
    }))
}

/// This process's place when `reel launch` started it (a malformed environment counts as not
/// launched here: the run itself reports it).
fn launched() -> Option<reel_train::device::Launched> {
    reel_train::device::Launched::from_env().ok().flatten()
}

/// What [`search_max`] found: every trial in the order run, the largest count that ran and
/// the smallest that failed (with its error).
#[derive(Debug, PartialEq)]
pub struct SearchOutcome<T> {
    pub trials: Vec<(usize, Result<T, String>)>,
    pub largest_ok: Option<usize>,
    pub smallest_failed: Option<(usize, String)>,
}

/// The most frames `trial` takes: doubling from `s.start` (capped at `s.limit`, tried once)
/// until a trial fails, then bisection between the largest success and the smallest failure
/// until they are `s.step` apart (every count tried a multiple of `s.step`, `start` excepted).
/// Assumes a count that fails makes every larger one fail.
pub fn search_max<T>(
    s: SearchArgs,
    mut trial: impl FnMut(usize) -> Result<T, String>,
) -> SearchOutcome<T> {
    let mut out = SearchOutcome {
        trials: Vec::new(),
        largest_ok: None,
        smallest_failed: None,
    };
    let mut n = s.start;
    loop {
        let r = trial(n);
        let ok = r.is_ok();
        if let Err(e) = &r {
            out.smallest_failed = Some((n, e.clone()));
        }
        out.trials.push((n, r));
        if !ok {
            break;
        }
        out.largest_ok = Some(n);
        if n >= s.limit {
            return out;
        }
        n = (n * 2).min(s.limit);
    }
    let Some(mut lo) = out.largest_ok else {
        return out;
    };
    let mut hi = n;
    while hi - lo > s.step {
        let mid = ((lo + hi) / 2 / s.step * s.step).max(lo.next_multiple_of(s.step));
        if mid <= lo || mid >= hi {
            break;
        }
        let r = trial(mid);
        match &r {
            Ok(_) => {
                lo = mid;
                out.largest_ok = Some(mid);
            }
            Err(e) => {
                hi = mid;
                out.smallest_failed = Some((mid, e.clone()));
            }
        }
        out.trials.push((mid, r));
    }
    out
}

/// The max-frames search (module docs): the model written once, every trial a child process.
fn run_search(args: &RlBenchArgs, s: SearchArgs, as_json: bool) -> Result<serde_json::Value> {
    if s.start < 2 || s.step == 0 || s.limit < s.start {
        bail!(
            "--rl-max-frames {} --rl-frames-step {} --rl-frames-limit {}: need start ≥ 2, step ≥ 1 \
             and limit ≥ start",
            s.start,
            s.step,
            s.limit
        );
    }
    let tmp = tempfile::tempdir()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let m = tmp.path().join("model");
            write_shaped_vl_model(&m, args.shape, 0, positions_for(s.limit, args), args.side)?;
            m
        }
    };
    let exe = std::env::current_exe().context("finding this executable to run trials")?;
    let micro = args.micro.unwrap_or(args.group);
    if !as_json {
        println!(
            "Most frames in one GRPO step (reuse on, {} model, {}-pixel frames, G = {}, {} response \
             tokens, micro-batch {micro} rows, checkpoint {}, device {}): doubling from {}, then \
             bisection to {} frames, limit {}",
            args.model
                .as_ref()
                .map_or(args.shape.name().to_string(), |m| m.display().to_string()),
            args.side,
            args.group,
            args.response,
            args.checkpoint,
            device_name(args.device),
            s.start,
            s.step,
            s.limit
        );
    }
    let outcome = search_max(s, |frames| {
        let t0 = Instant::now();
        let r = run_trial(&exe, args, micro, &model, frames, s.timeout_s, tmp.path());
        let secs = t0.elapsed().as_secs_f64();
        if !as_json {
            match &r {
                Ok(row) => {
                    print!("trial {frames} frames ({secs:.0} s): ran  ");
                    print_row(row);
                }
                Err(e) => println!("trial {frames} frames ({secs:.0} s): FAILED: {e}"),
            }
        }
        r
    });
    if !as_json {
        match outcome.largest_ok {
            Some(n) => println!(
                "largest that ran: {n} frames ({} video tokens)",
                video_tokens_at(n, args.side)
            ),
            None => println!("no trial ran (the first, {} frames, failed)", s.start),
        }
        match &outcome.smallest_failed {
            Some((n, e)) => println!("smallest that failed: {n} frames: {e}"),
            None => println!("none failed up to the limit ({} frames)", s.limit),
        }
    }
    Ok(json!({
        "trials": outcome.trials.iter().map(|(n, r)| match r {
            Ok(row) => json!({"frames": n, "ok": true, "row": row}),
            Err(e) => json!({"frames": n, "ok": false, "error": e}),
        }).collect::<Vec<_>>(),
        "largest_ok": outcome.largest_ok,
        "largest_ok_video_tokens": outcome.largest_ok.map(|n| video_tokens_at(n, args.side)),
        "smallest_failed": outcome.smallest_failed.as_ref().map(|(n, e)| json!({"frames": n, "error": e})),
    }))
}

/// Runs this binary on one frame count (reuse on, JSON out) and returns its row, or the
/// failure: the child's error row, its last `error:` line, or how it ended.
fn run_trial(
    exe: &Path,
    args: &RlBenchArgs,
    micro: usize,
    model: &Path,
    frames: usize,
    timeout_s: u64,
    tmp: &Path,
) -> Result<serde_json::Value, String> {
    let (out_path, err_path) = (
        tmp.join(format!("trial-{frames}.out")),
        tmp.join(format!("trial-{frames}.err")),
    );
    let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "rl", "--json", "--reps", "1", "--rl-reuse", "on"])
        .arg("--rl-frames")
        .arg(frames.to_string())
        .arg("--rl-model")
        .arg(model)
        .args(["--rl-side", &args.side.to_string()])
        .args(["--rl-group", &args.group.to_string()])
        .args(["--rl-response", &args.response.to_string()])
        .args(["--rl-sp", &args.sp.to_string()])
        .args(["--rl-device", device_name(args.device)])
        .args(["--rl-checkpoint", &args.checkpoint.to_string()])
        .args(["--rl-micro", &micro.to_string()])
        .args(["--rl-steps", &args.steps.to_string()])
        .args(args.shard_optimizer.then_some("--rl-shard-optimizer"))
        .args(args.shard_gradients.then_some("--rl-shard-gradients"))
        .args(
            args.shared_prefill
                .map(|t| format!("--rl-shared-prefill={t}")),
        )
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t0.elapsed().as_secs() >= timeout_s => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {timeout_s} s (killed)"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for the trial: {e}")),
        }
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    trial_result(status.success(), &status.to_string(), &stdout, &stderr)
}

/// A trial's row from its exit, stdout (the JSON rows) and stderr (logs; `error: …` last on
/// failure).
fn trial_result(
    success: bool,
    status: &str,
    stdout: &str,
    stderr: &str,
) -> Result<serde_json::Value, String> {
    // The report is the last JSON array printed (anything a library printed before it is
    // skipped).
    let starts: Vec<usize> = std::iter::once(0)
        .chain(stdout.match_indices("\n[").map(|(i, _)| i + 1))
        .collect();
    let rows: Option<serde_json::Value> = starts
        .iter()
        .rev()
        .find_map(|&i| serde_json::from_str(&stdout[i..]).ok());
    let row = rows
        .as_ref()
        .and_then(|v| v.as_array())
        .and_then(|a| a.first())
        .cloned();
    match row {
        Some(r) if success && r.get("error").is_none() => Ok(r),
        Some(r) if r.get("error").is_some() => Err(r["error"].as_str().unwrap_or("?").to_string()),
        _ => Err(stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("error: "))
            .map(|l| l.trim_start_matches("error: ").to_string())
            .unwrap_or_else(|| {
                let last = stderr.lines().last().unwrap_or("").trim();
                format!("the trial ended with {status} (last log line: {last:?})")
            })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(start: usize, step: usize, limit: usize) -> SearchArgs {
        SearchArgs {
            start,
            step,
            limit,
            timeout_s: 1,
        }
    }

    #[test]
    fn the_plan_gives_each_frame_count_its_peak_and_whether_it_fits() {
        let args = RlBenchArgs {
            frames: vec![256, 1024],
            side: 448,
            group: 2,
            response: 16,
            model: None,
            write_model_only: false,
            plan: true,
            gpu_gib: 139.8,
            model_dir: None,
            shape: VlShape::Qwen7b,
            sp: 2,
            shard_optimizer: true,
            shard_gradients: false,
            shared_prefill: None,
            reps: 1,
            device: Device::Cuda,
            checkpoint: CheckpointPolicy::Remat,
            micro: Some(1),
            steps: 1,
            modes: vec![true],
            search: None,
        };
        let rows = run(&args, true).unwrap();
        let peak = |r: &serde_json::Value| r["update_peak_bytes"].as_f64().unwrap() / GIB;
        // As measured: 256 frames fit 2 H200s (120.7 GiB), 1024 ran out of memory.
        assert_eq!(
            (rows[0]["fits"].as_bool(), rows[1]["fits"].as_bool()),
            (Some(true), Some(false))
        );
        assert!(peak(&rows[0]) < peak(&rows[1]));
        assert_eq!(failed_runs(&rows), 0);
        // A bigger card, and sp 8 (the optimizer sharded 8 ways, 1/8 of the tokens a GPU).
        let big = run(
            &RlBenchArgs {
                gpu_gib: 200.0,
                ..args.clone()
            },
            true,
        )
        .unwrap();
        assert_eq!(big[1]["fits"].as_bool(), Some(true));
        let sp8 = run(
            &RlBenchArgs {
                sp: 8,
                ..args.clone()
            },
            true,
        )
        .unwrap();
        assert!(peak(&sp8[1]) < peak(&rows[1]) - 40.0, "{sp8}");
        let e = run(
            &RlBenchArgs {
                shape: VlShape::Tiny,
                ..args
            },
            true,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--rl-shape 3b or 7b"), "{e}");
    }

    #[test]
    fn failed_runs_count_error_rows_of_a_table_not_a_search() {
        let rows = json!([
            {"frames": 8, "reuse": true, "step_s": 1.0},
            {"frames": 16, "reuse": true, "error": "out of memory"},
        ]);
        assert_eq!(failed_runs(&rows), 1);
        assert_eq!(failed_runs(&json!([{"frames": 8, "step_s": 1.0}])), 0);
        assert_eq!(failed_runs(&json!({"smallest_failed": {"frames": 16}})), 0);
    }

    /// A fake GPU taking at most `max` frames; the error names the count.
    fn fits(max: usize) -> impl FnMut(usize) -> Result<usize, String> {
        move |n| {
            if n <= max {
                Ok(n)
            } else {
                Err(format!("out of memory at {n}"))
            }
        }
    }

    fn counts<T>(o: &SearchOutcome<T>) -> Vec<usize> {
        o.trials.iter().map(|t| t.0).collect()
    }

    #[test]
    fn search_doubles_then_bisects_to_the_step() {
        let o = search_max(s(64, 64, 8192), fits(1500));
        // 64 … 1024 run, 2048 fails; then 1536 fails, 1280 runs, 1408 runs, 1472 runs.
        assert_eq!(
            counts(&o),
            vec![64, 128, 256, 512, 1024, 2048, 1536, 1280, 1408, 1472]
        );
        assert_eq!(o.largest_ok, Some(1472));
        let (n, e) = o.smallest_failed.clone().unwrap();
        assert_eq!(n, 1536);
        assert_eq!(e, "out of memory at 1536");
        // The first failure (2048) stays in the trial list with its error.
        assert_eq!(o.trials[5].1, Err("out of memory at 2048".to_string()));
        // Every count tried is a multiple of the step; the answer is within one step.
        assert!(o.trials.iter().all(|t| t.0 % 64 == 0));
        assert!(1500 - o.largest_ok.unwrap() < 64);
    }

    #[test]
    fn search_stops_at_the_limit_and_when_the_start_fails() {
        let o = search_max(s(100, 50, 700), fits(10_000));
        assert_eq!(counts(&o), vec![100, 200, 400, 700]);
        assert_eq!(o.largest_ok, Some(700));
        assert_eq!(o.smallest_failed, None);

        let o = search_max(s(256, 64, 8192), fits(100));
        assert_eq!(counts(&o), vec![256]);
        assert_eq!(o.largest_ok, None);
        assert_eq!(
            o.smallest_failed,
            Some((256, "out of memory at 256".into()))
        );

        // A failure at the first doubling: bisection between start and 2·start.
        let o = search_max(s(512, 128, 8192), fits(700));
        assert_eq!(counts(&o), vec![512, 1024, 768, 640]);
        assert_eq!(o.largest_ok, Some(640));
        assert_eq!(o.smallest_failed.unwrap().0, 768);
        // A start that is not a multiple of the step: bisection still ends within one step.
        let o = search_max(s(100, 64, 8192), fits(300));
        assert_eq!(o.largest_ok, Some(256));
        assert_eq!(o.smallest_failed.unwrap().0, 320);
    }

    #[test]
    fn bad_options_are_refused_by_name() {
        let args = RlBenchArgs {
            frames: vec![64],
            side: 56,
            group: 2,
            response: 4,
            model: None,
            write_model_only: false,
            plan: false,
            gpu_gib: 139.8,
            model_dir: None,
            shape: VlShape::Tiny,
            sp: 1,
            shard_optimizer: false,
            shard_gradients: false,
            shared_prefill: None,
            reps: 1,
            device: Device::Cpu,
            checkpoint: CheckpointPolicy::Remat,
            micro: None,
            steps: 1,
            modes: vec![true],
            search: Some(s(1, 64, 8192)),
        };
        let e = run(&args, true).unwrap_err().to_string();
        assert!(e.contains("--rl-max-frames 1"), "{e}");
        // Writing the model alone needs the folder and a published shape; a folder that holds
        // one already is kept as is (nothing written, nothing run).
        let only = RlBenchArgs {
            write_model_only: true,
            search: None,
            ..args.clone()
        };
        let e = run(&only, true).unwrap_err().to_string();
        assert!(e.contains("--rl-model-dir"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let only = RlBenchArgs {
            model_dir: Some(dir.path().to_path_buf()),
            ..only
        };
        let e = run(&only, true).unwrap_err().to_string();
        assert!(e.contains("--rl-shape 3b or 7b"), "{e}");
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let only = RlBenchArgs {
            shape: VlShape::Qwen7b,
            ..only
        };
        let out = run(&only, true).unwrap();
        assert_eq!(out[0]["shape"], "7b");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing written"
        );
        let e = run(
            &RlBenchArgs {
                search: Some(s(512, 64, 256)),
                ..args.clone()
            },
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limit ≥ start"), "{e}");
        let e = run(
            &RlBenchArgs {
                side: 100,
                ..args.clone()
            },
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--rl-side 100"), "{e}");
        let e = run(
            &RlBenchArgs {
                micro: Some(0),
                ..args
            },
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--rl-micro"), "{e}");
    }

    #[test]
    fn a_trials_failure_is_its_error_row_its_error_line_or_how_it_ended() {
        let ok = "[\n  {\"frames\": 64, \"step_s\": 1.5}\n]\n";
        assert_eq!(trial_result(true, "exit 0", ok, "").unwrap()["step_s"], 1.5);
        let noisy = format!("a line [not json]\n{ok}");
        assert_eq!(
            trial_result(true, "exit 0", &noisy, "").unwrap()["frames"],
            64
        );
        let row = r#"[{"frames": 64, "reuse": true, "error": "64 frames, reuse on: CUDA out of memory"}]"#;
        assert_eq!(
            trial_result(true, "exit 0", row, "").unwrap_err(),
            "64 frames, reuse on: CUDA out of memory"
        );
        let err = "INFO step 1\nerror: 64 frames: the GPU: out of memory\n";
        assert_eq!(
            trial_result(false, "exit status: 1", "", err).unwrap_err(),
            "64 frames: the GPU: out of memory"
        );
        let killed = trial_result(false, "signal: 9 (SIGKILL)", "", "INFO rolling out\n");
        let e = killed.unwrap_err();
        assert!(e.contains("signal: 9") && e.contains("rolling out"), "{e}");
    }
}
