//! `reel`: train long-context transformers. Commands: sft, grpo, eval, generate, plot, bench,
//! data, demo, launch.

mod bench;
mod bench_data;
mod bench_rl;
mod bench_rollout;
mod bench_sp;
mod bench_sp_train;
mod data_cmd;
mod demo;
mod demo_vl;
mod plot;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use reel_data::{Message, SftFile, Tokenizer};
use reel_model::generate::SamplingParams;
use reel_model::load_checkpoint;
use reel_train::{
    eval_accuracy, eval_nll, run_grpo, run_sft, stop_token_ids, AccuracyOptions, AccuracyReport,
    GrpoOptions, GrpoRunConfig, PromptSet, RunOptions, SftConfig,
};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "reel",
    version,
    about = "Train long-context transformers (SFT, then RL) in Rust"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// `reel sft` of a Qwen2.5-VL model on LongVideo-Reason records (CoT-SFT on video).
#[derive(clap::Args)]
struct VlSftArgs {
    /// Qwen2.5-VL checkpoint folder to train (instead of --config; the --vl-* flags become
    /// the run config, which --set, --sp, --dp and --resume then apply to).
    #[arg(long, requires = "vl_data")]
    vl_model: Option<PathBuf>,
    /// LongVideo-Reason JSONL with reasoning (`reel data synth` writes one).
    #[arg(long)]
    vl_data: Option<PathBuf>,
    /// Write a tiny random Qwen2.5-VL to --vl-model first (demo).
    #[arg(long)]
    vl_init_tiny: bool,
    /// Generate N synthetic 56×56 videos (8 frames) with records first; --vl-data names the
    /// JSONL written (its folder gets videos/).
    #[arg(long, value_name = "N")]
    vl_synth: Option<usize>,
    /// Output folder (config.toml, metrics.jsonl, checkpoints/).
    #[arg(long, default_value = "runs/vl-sft")]
    vl_out: PathBuf,
    #[arg(long, default_value_t = 20)]
    vl_steps: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 4)]
    vl_batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    vl_lr: f32,
    /// Frame sampling: all, uniform:N or fps:F.
    #[arg(long, default_value = "uniform:8")]
    vl_sample: String,
    /// Train the vision tower too (bypasses the embedding cache).
    #[arg(long)]
    vl_train_vision: bool,
    /// On-disk tier of the vision-embedding cache.
    #[arg(long)]
    vl_cache_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Supervised fine-tuning from a TOML config.
    Sft {
        /// The run's TOML config (`reel sft --print-config` shows every field and default).
        #[arg(long, required_unless_present_any = ["print_config", "vl_model"], conflicts_with = "vl_model")]
        config: Option<PathBuf>,
        #[command(flatten)]
        vl: VlSftArgs,
        /// Override a config field, e.g. `--set train.lr=3e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Sequence-parallel ranks per sequence (`--set parallel.sp=N`; applied after --set).
        #[arg(long, value_name = "N")]
        sp: Option<usize>,
        /// Data-parallel replicas (`--set parallel.dp=M`; applied after --set).
        #[arg(long, value_name = "M")]
        dp: Option<usize>,
        /// Where to train: auto (the GPU when this build has the `cuda` feature and one opens,
        /// else the CPU), cpu or cuda (`--set train.device=…`; applied after --set).
        #[arg(long, value_name = "DEVICE")]
        device: Option<reel_train::Device>,
        /// Continue from the newest checkpoint in the output folder.
        #[arg(long)]
        resume: bool,
        /// Print the documented default config and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// GRPO from an SFT checkpoint on a prompt JSONL: a text decoder, or a Qwen2.5-VL model
    /// (model_type qwen2_5_vl) on LongVideo-Reason records with videos (MR-SP, `parallel.sp`).
    Grpo {
        /// The run's TOML config (`reel grpo --print-config` shows every field and default).
        #[arg(long, required_unless_present = "print_config")]
        config: Option<PathBuf>,
        /// Override a config field, e.g. `--set grpo.lr=1e-5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue from the newest checkpoint in the output folder.
        #[arg(long)]
        resume: bool,
        /// Print the default config and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Mean NLL of the assistant tokens of an SFT JSONL file; with --accuracy, greedy-answer
    /// accuracy (overall, per problem_type, and format rate) on a prompt JSONL (LongVideo-Reason
    /// or {"prompt"|"messages", "answer", "problem_type"}).
    Eval {
        /// HF checkpoint folder (config.json, safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// SFT JSONL (`messages` or `prompt`/`response` per line).
        #[arg(long)]
        data: PathBuf,
        /// Print one JSON object {"mean_nll": …, "tokens": …}.
        #[arg(long)]
        json: bool,
        /// Longest sequence (at most the model's max_position_embeddings); longer conversations
        /// are truncated.
        #[arg(long, default_value_t = 4096)]
        max_len: usize,
        /// Generate greedy answers and report their accuracy instead of the NLL.
        #[arg(long)]
        accuracy: bool,
        /// With --accuracy: most tokens per answer.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// With --accuracy: prompts decoded together.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Frame sampling for a Qwen2.5-VL model's videos: all, uniform:N or fps:F.
        #[arg(long, default_value = "fps:2")]
        sample: String,
        /// With --accuracy: also print every greedy response (stderr), one per record.
        #[arg(long)]
        show_responses: bool,
        /// With --accuracy: where the answers are generated: auto (the GPU decoder when this
        /// build has the `cuda` feature, a GPU opens and the model's head dimension fits, else
        /// the CPU, saying why), cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: reel_train::Device,
        /// With --accuracy on the GPU: f32 weights and KV cache (the CPU's answers) instead of
        /// bf16.
        #[arg(long)]
        gpu_f32: bool,
    },
    /// Generate a reply with the KV cache (greedy unless --temperature > 0).
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// The user message (wrapped in the model's chat template unless --raw).
        #[arg(long)]
        prompt: String,
        /// Feed the prompt as-is, without the chat template.
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 = no top-k cut.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// PNG curves of metrics (one panel per key) against step from a metrics.jsonl.
    Plot {
        /// The metrics JSONL (e.g. runs/grpo/metrics.jsonl).
        metrics: PathBuf,
        /// Output PNG. Default: beside the metrics file, `metrics.png`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Comma-separated keys. Default: those of loss, reward_mean, accuracy, format_rate, kl,
        /// entropy, response_len_mean, eval_loss that the file has.
        #[arg(long, value_delimiter = ',')]
        keys: Vec<String>,
        /// Image width in pixels.
        #[arg(long, default_value_t = 900)]
        width: u32,
        /// Image height in pixels. Default: 260 per panel.
        #[arg(long)]
        height: Option<u32>,
    },
    /// CPU throughput: GEMM vs the gemm crate alone, attention, training tokens/s per policy.
    Bench {
        #[arg(value_enum, default_value_t = bench::BenchWhat::All)]
        what: bench::BenchWhat,
        /// Sequence length for the attention and training benchmarks.
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Timed repetitions (the best is reported; sp-nccl and sp-train: the median).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Sections of `bench gpu`, comma-separated: gemm, attention, adamw, ce, decode, sp
        /// (DistAttn on in-process ranks), or all.
        #[arg(long, default_value = "all")]
        gpu_sections: String,
        /// `bench sp-nccl` and `bench sp-train`: sequence lengths (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "32768,65536,131072")]
        sp_seqs: Vec<usize>,
        #[arg(long)]
        json: bool,
        /// `bench rl`: frame counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
        rl_frames: Vec<usize>,
        /// `bench rl`: square frame side in pixels (multiple of 28; 448 = full size).
        #[arg(long, default_value_t = 56)]
        rl_side: usize,
        /// `bench rl`: samples per prompt G (the published recipe uses 8).
        #[arg(long, default_value_t = 4)]
        rl_group: usize,
        /// `bench rl`: tokens generated per sample.
        #[arg(long, default_value_t = 16)]
        rl_response: usize,
        /// `bench rl`: a Qwen2.5-VL folder instead of the tiny random model.
        #[arg(long)]
        rl_model: Option<PathBuf>,
        /// `bench rl`: sequence-parallel ranks (in process; under `reel launch --nproc N` with
        /// `--rl-sp N`, one process per GPU).
        #[arg(long, default_value_t = 1)]
        rl_sp: usize,
        /// `bench rl`: keep the random `--rl-shape` model in this folder (written when it holds
        /// none, with positions for at least 4096 frames; reused as is when it does), so later
        /// runs, such as each process of a launched one, read it instead of writing their own.
        #[arg(long)]
        rl_model_dir: Option<PathBuf>,
        /// `bench rl`: only write the random `--rl-shape` model into `--rl-model-dir` (kept as is
        /// when it holds one) and exit: what a launched run's processes then read.
        #[arg(long)]
        rl_write_model: bool,
        /// `bench rl`: only estimate each `--rl-frames` count's GPU memory a GPU for the
        /// `--rl-shape`, `--rl-sp`, `--rl-shard-optimizer`, `--rl-checkpoint`, group and response
        /// (`reel_train::rl_memory`), no run; against `--rl-gpu-gib`.
        #[arg(long)]
        rl_plan: bool,
        /// `bench rl --rl-plan`: GiB a GPU offers (an H200's 139.8 by default).
        #[arg(long, default_value_t = 139.8)]
        rl_gpu_gib: f64,
        #[command(flatten)]
        sp_train: bench_sp_train::SpTrainArgs,
        /// `bench rl`: the random model's shape: tiny, or the published Qwen2.5-VL 3b / 7b
        /// (random bf16 weights, written once; use `--rl-side 448`).
        #[arg(long, default_value = "tiny")]
        rl_shape: reel_train::VlShape,
        /// `bench rl`: where the run trains and rolls out (`train.device`): auto, cpu, cuda.
        #[arg(long, default_value = "auto")]
        rl_device: reel_train::Device,
        /// `bench rl`: activation checkpointing of the update: none, layer, remat.
        #[arg(long, default_value = "remat")]
        rl_checkpoint: reel_model::CheckpointPolicy,
        /// `bench rl`: rows per scoring/update micro-batch (default: G).
        #[arg(long)]
        rl_micro: Option<usize>,
        /// `bench rl`: shard the fp32 master weights and AdamW moments over the launched ranks
        /// (`parallel.shard_optimizer`).
        #[arg(long)]
        rl_shard_optimizer: bool,
        /// `bench rl`: shard the fp32 gradients too (`parallel.shard_gradients`, ZeRO-2; implies
        /// --rl-shard-optimizer).
        #[arg(long)]
        rl_shard_gradients: bool,
        /// `bench rl`: `parallel.shared_prefill_tokens` (prompts this long prefilled by the
        /// launched sp processes together; 0 = each on its owner alone; default the config's,
        /// 8192).
        #[arg(long)]
        rl_shared_prefill: Option<usize>,
        /// `bench rl`: GRPO steps per run; the last (warm) one is reported.
        #[arg(long, default_value_t = 1)]
        rl_steps: u64,
        /// `bench rl`: reuse modes to run: on, off (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "on,off")]
        rl_reuse: Vec<String>,
        /// `bench rl`: search the most frames one step takes (reuse on), doubling from this
        /// count, each trial a child process.
        #[arg(long)]
        rl_max_frames: Option<usize>,
        /// `bench rl --rl-max-frames`: bisection granularity in frames.
        #[arg(long, default_value_t = 64)]
        rl_frames_step: usize,
        /// `bench rl --rl-max-frames`: the most frames tried.
        #[arg(long, default_value_t = 8192)]
        rl_frames_limit: usize,
        /// `bench rl --rl-max-frames`: seconds before a trial is killed (and counted failed).
        #[arg(long, default_value_t = 900)]
        rl_trial_timeout: u64,
    },
    /// Video datasets: generate the synthetic long-video set, validate LongVideo-Reason JSONL.
    Data(data_cmd::DataArgs),
    /// The main job on the embedded default: synthetic tasks, a tiny model trained from
    /// scratch, held-out accuracy before and after.
    Demo(demo::DemoArgs),
    /// Run a command as N processes on this machine, one per GPU: each gets RANK, LOCAL_RANK,
    /// WORLD_SIZE and REEL_RENDEZVOUS (`reel launch --nproc 2 -- reel <subcommand…>`; `reel`
    /// there means this executable). Fails, naming the ranks, when any rank fails.
    Launch {
        /// Processes on this machine.
        #[arg(long)]
        nproc: usize,
        /// `host:port` where global rank 0 listens for the others.
        #[arg(long, default_value = "127.0.0.1:29533")]
        rendezvous: String,
        /// Global rank of this machine's first process (other machines: their own launcher).
        #[arg(long, default_value_t = 0)]
        base_rank: usize,
        /// Ranks over all machines (default: --nproc).
        #[arg(long)]
        world: Option<usize>,
        /// Seconds the other ranks may take to fail by themselves after one fails, before they
        /// are killed.
        #[arg(long, default_value_t = 60)]
        grace_secs: u64,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

/// `reel sft --vl-model DIR --vl-data FILE`: the flags as a run config (CoT-SFT of a
/// Qwen2.5-VL model), after writing the demo model and data they ask for.
fn vl_flags_config(a: &VlSftArgs) -> Result<SftConfig> {
    let model = a.vl_model.clone().context("--vl-model is required")?;
    let data = a.vl_data.clone().context("--vl-data is required")?;
    if a.vl_init_tiny {
        reel_train::vl::write_tiny_vl_model(&model, 0)?;
    }
    if let Some(n) = a.vl_synth {
        let dir = data.parent().unwrap_or(std::path::Path::new("."));
        let cfg = reel_data::SynthVideoConfig {
            videos: n,
            frames: 8,
            width: 56,
            height: 56,
            held_out: 0.0,
            ..Default::default()
        };
        reel_data::write_synth_dataset(&cfg, dir)?;
        let written = dir.join("train.jsonl");
        if written != data {
            std::fs::rename(&written, &data)
                .with_context(|| format!("moving {} to {}", written.display(), data.display()))?;
        }
    }
    let mut cfg = reel_train::VlSftConfig::new(model, data, a.vl_out.clone());
    cfg.steps = a.vl_steps;
    cfg.batch = a.vl_batch;
    cfg.lr = a.vl_lr;
    cfg.sampling = reel_train::parse_sampling(&a.vl_sample)?;
    cfg.vision_freeze = !a.vl_train_vision;
    cfg.cache_dir = a.vl_cache_dir.clone();
    Ok(cfg.to_sft_config())
}

/// `reel eval` on a Qwen2.5-VL checkpoint and LongVideo-Reason records.
fn eval_vl(
    model: &std::path::Path,
    data: &std::path::Path,
    sample: &str,
    json: bool,
) -> Result<()> {
    let m = reel_model::load_vl_checkpoint(model)?;
    let tok = Tokenizer::from_dir(model)?;
    let settings = reel_data::VideoSettings {
        sampling: reel_train::parse_sampling(sample)?,
        processor: reel_data::VideoProcessorConfig::from_dir(model)?,
    };
    let (stats, report) = reel_train::eval_vl_nll(&m, &tok, data, &settings)?;
    let skipped = report.bad_records.len() + report.skipped_videos.len();
    if json {
        println!(
            "{}",
            serde_json::json!({"mean_nll": stats.mean(), "tokens": stats.n_tokens,
                               "skipped_records": skipped})
        );
    } else {
        println!(
            "mean NLL {:.6} over {} target tokens ({skipped} records skipped)",
            stats.mean(),
            stats.n_tokens
        );
    }
    Ok(())
}

/// Prints an accuracy report: one JSON object, or overall and per-type lines.
fn print_accuracy(report: &AccuracyReport, json: bool, skipped: Option<usize>) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(report)?;
        if let Some(n) = skipped {
            v["skipped_records"] = n.into();
        }
        println!("{v}");
        return Ok(());
    }
    let o = &report.overall;
    println!(
        "accuracy {:.1}% ({} / {}), format {:.1}%{}; answers decoded on {}",
        100.0 * o.accuracy,
        o.correct,
        o.total,
        100.0 * o.format_rate,
        skipped.map_or(String::new(), |n| format!(" ({n} records skipped)")),
        report.device
    );
    for (ty, t) in &report.per_type {
        let name = if ty.is_empty() { "(none)" } else { ty };
        println!(
            "  {name:<24} {:5.1}% ({} / {}), format {:.1}%",
            100.0 * t.accuracy,
            t.correct,
            t.total,
            100.0 * t.format_rate
        );
    }
    Ok(())
}

/// With `--show-responses`: every greedy response on stderr, numbered in record order.
fn show(report: &AccuracyReport, on: bool) -> Result<()> {
    if on {
        for (i, r) in report.responses.iter().enumerate() {
            eprintln!("[{}] {r:?}", i + 1);
        }
    }
    Ok(())
}

/// `reel eval --accuracy` on a Qwen2.5-VL checkpoint: greedy answers through the rollout engine
/// from cached video embeddings (`opts` given the checkpoint's stop tokens); returns the report
/// it printed.
fn eval_vl_accuracy(
    model: &std::path::Path,
    data: &std::path::Path,
    sample: &str,
    json: bool,
    opts: impl FnOnce(Vec<u32>) -> AccuracyOptions,
) -> Result<AccuracyReport> {
    let m = reel_model::load_vl_checkpoint(model)?;
    let tok = Tokenizer::from_dir(model)?;
    let settings = reel_data::VideoSettings {
        sampling: reel_train::parse_sampling(sample)?,
        processor: reel_data::VideoProcessorConfig::from_dir(model)?,
    };
    let opts = opts(stop_token_ids(&tok, &m.lm));
    let cache = reel_model::embed_cache::EmbedCache::new(1 << 30);
    let (report, load) = reel_train::eval_vl_accuracy(&m, &tok, data, &settings, &cache, &opts)?;
    let skipped = load.bad_records.len() + load.skipped_videos.len();
    print_accuracy(&report, json, Some(skipped))?;
    Ok(report)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting the thread count")?;
    }
    match cli.command {
        Command::Sft {
            config,
            vl,
            overrides,
            sp,
            dp,
            device,
            resume,
            print_config,
        } => {
            if print_config {
                print!("{}", SftConfig::documented_default());
                return Ok(());
            }
            let mut cfg = match config {
                Some(path) => SftConfig::from_file(&path)?,
                None => vl_flags_config(&vl)?,
            };
            for o in &overrides {
                cfg.apply_override(o)?;
            }
            for (key, n) in [("sp", sp), ("dp", dp)] {
                if let Some(n) = n {
                    cfg.apply_override(&format!("parallel.{key}={n}"))?;
                }
            }
            if let Some(d) = device {
                cfg.train.device = d;
            }
            // Under `reel launch` every process is one rank of the run (one GPU each, NCCL);
            // only rank 0 reports.
            let rank = std::env::var(reel_comm::launch::ENV_RANK).ok();
            #[cfg(feature = "cuda")]
            if rank.is_some() {
                // NCCL is opened by the name libnccl.so: make pip's libnccl.so.2 reachable under it.
                if let Err(e) = reel_cuda::libs::reexec_with_library_path() {
                    eprintln!("sft: {e}");
                }
            }
            let summary = run_sft(
                &cfg,
                RunOptions {
                    resume,
                    ..RunOptions::default()
                },
            )?;
            if rank.as_deref().is_some_and(|r| r != "0") {
                return Ok(());
            }
            println!(
                "trained {} steps; final loss {:.4}; model saved to {}",
                summary.steps,
                summary.final_loss,
                summary.final_model_dir.display()
            );
            if let Some(v) = &summary.video {
                println!(
                    "{} videos; tower runs {}; cache hits {} misses {}; skipped {} malformed \
                     records, {} records with a bad video",
                    v.videos,
                    v.encode.tower_forwards,
                    v.cache.hits + v.cache.disk_hits,
                    v.cache.misses,
                    v.skipped_records,
                    v.skipped_videos
                );
            }
        }
        Command::Grpo {
            config,
            overrides,
            resume,
            print_config,
        } => {
            if print_config {
                print!("{}", GrpoRunConfig::documented_default());
                return Ok(());
            }
            let path = config.expect("clap requires --config");
            let mut cfg = GrpoRunConfig::from_file(&path)?;
            for o in &overrides {
                cfg.apply_override(o)?;
            }
            let opts = GrpoOptions {
                resume,
                ..GrpoOptions::default()
            };
            let summary =
                if reel_train::model_kind_of(&cfg.model.path)? == reel_train::ModelKind::Qwen25VL {
                    let s = reel_train::run_vl_grpo(&cfg, opts)?;
                    println!(
                        "videos: {} encoded by the tower, {} served from the cache; {} records \
                     skipped",
                        s.encode.videos_encoded, s.encode.videos_cached, s.skipped_records
                    );
                    s.run
                } else {
                    run_grpo(&cfg, opts)?
                };
            let last = summary.records.last();
            let get = |k: &str| last.and_then(|r| r[k].as_f64()).unwrap_or(f64::NAN);
            println!(
                "ran {} GRPO steps; last step: reward {:.3}, accuracy {:.3}; model saved to {}",
                summary.steps,
                get("reward_mean"),
                get("accuracy"),
                summary.final_model_dir.display()
            );
        }
        Command::Eval {
            model,
            data,
            json,
            max_len: _,
            accuracy: true,
            max_new_tokens,
            batch,
            sample,
            show_responses,
            device,
            gpu_f32,
        } => {
            let opts = |stop_token_ids| AccuracyOptions {
                max_new_tokens,
                batch,
                stop_token_ids,
                device,
                gpu_f32,
                ..AccuracyOptions::default()
            };
            if reel_train::model_kind_of(&model)? == reel_train::ModelKind::Qwen25VL {
                let report = eval_vl_accuracy(&model, &data, &sample, json, opts)?;
                return show(&report, show_responses);
            }
            let m = load_checkpoint(&model)?;
            let tok = Tokenizer::from_dir(&model)?;
            let set = PromptSet::read(&data, &tok, m.config.max_position_embeddings)?;
            if set.ignored_videos > 0 {
                eprintln!(
                    "note: {} records name videos; the text model answers from the question alone",
                    set.ignored_videos
                );
            }
            let opts = opts(stop_token_ids(&tok, &m));
            let decode = |ids: &[u32]| -> Result<String> { Ok(tok.decode(ids, true)?) };
            let report = eval_accuracy(&m, &set.items, &decode, &opts)?;
            print_accuracy(&report, json, None)?;
            show(&report, show_responses)?;
        }
        Command::Eval {
            model,
            data,
            json,
            max_len,
            sample,
            ..
        } => {
            if reel_train::model_kind_of(&model)? == reel_train::ModelKind::Qwen25VL {
                return eval_vl(&model, &data, &sample, json);
            }
            let m = load_checkpoint(&model)?;
            let tok = Tokenizer::from_dir(&model)?;
            let file = SftFile::read(&data)?;
            let stats = eval_nll(&m, &tok, &file, max_len)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"mean_nll": stats.mean(), "tokens": stats.n_tokens})
                );
            } else {
                println!(
                    "mean NLL {:.6} over {} assistant tokens ({} conversations)",
                    stats.mean(),
                    stats.n_tokens,
                    file.conversations.len()
                );
            }
        }
        Command::Generate {
            model,
            prompt,
            raw,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
        } => {
            let m = load_checkpoint(&model)?;
            let tok = Tokenizer::from_dir(&model)?;
            let ids = if raw {
                tok.encode(&prompt)?
            } else {
                reel_data::prompt_ids(&tok, &[Message::user(prompt)])?
            };
            // Stop at the end of the assistant turn whichever way the checkpoint spells it.
            let stop = stop_token_ids(&tok, &m);
            let params = SamplingParams {
                temperature,
                top_p,
                top_k,
                seed,
            };
            let out = m.generate(&ids, max_new_tokens, &stop, &params)?;
            println!("{}", tok.decode(&out, true)?);
        }
        Command::Plot {
            metrics,
            out,
            keys,
            width,
            height,
        } => {
            let keys = if keys.is_empty() {
                plot::default_keys(&metrics)?
            } else {
                keys
            };
            let out = out.unwrap_or_else(|| metrics.with_extension("png"));
            let height = height.unwrap_or(260 * keys.len() as u32);
            plot::plot(&metrics, &keys, &out, width, height)?;
            println!("wrote {} ({})", out.display(), keys.join(", "));
        }
        Command::Bench {
            what,
            seq,
            reps,
            gpu_sections,
            sp_seqs,
            json,
            rl_frames,
            rl_side,
            rl_group,
            rl_response,
            rl_model,
            rl_model_dir,
            rl_write_model,
            rl_plan,
            rl_gpu_gib,
            rl_sp,
            sp_train,
            rl_shape,
            rl_device,
            rl_checkpoint,
            rl_micro,
            rl_shard_optimizer,
            rl_shard_gradients,
            rl_shared_prefill,
            rl_steps,
            rl_reuse,
            rl_max_frames,
            rl_frames_step,
            rl_frames_limit,
            rl_trial_timeout,
        } => {
            if what == bench::BenchWhat::SpTrain {
                let report = bench_sp_train::run(&sp_train, &sp_seqs, reps, json)?;
                if json && !report.is_null() {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
            } else if what == bench::BenchWhat::Rl {
                let modes = rl_reuse
                    .iter()
                    .map(|m| match m.as_str() {
                        "on" => Ok(true),
                        "off" => Ok(false),
                        _ => anyhow::bail!("--rl-reuse: unknown mode `{m}` (on, off)"),
                    })
                    .collect::<Result<Vec<bool>>>()?;
                let args = bench_rl::RlBenchArgs {
                    frames: rl_frames,
                    side: rl_side,
                    group: rl_group,
                    response: rl_response,
                    model: rl_model,
                    write_model_only: rl_write_model,
                    plan: rl_plan,
                    gpu_gib: rl_gpu_gib,
                    model_dir: rl_model_dir,
                    shape: rl_shape,
                    sp: rl_sp,
                    shard_optimizer: rl_shard_optimizer || rl_shard_gradients,
                    shard_gradients: rl_shard_gradients,
                    shared_prefill: rl_shared_prefill,
                    reps,
                    device: rl_device,
                    checkpoint: rl_checkpoint,
                    micro: rl_micro,
                    steps: rl_steps,
                    modes,
                    search: rl_max_frames.map(|start| bench_rl::SearchArgs {
                        start,
                        step: rl_frames_step,
                        limit: rl_frames_limit,
                        timeout_s: rl_trial_timeout,
                    }),
                };
                let report = bench_rl::run(&args, json)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
                // A table whose runs failed is not a result: a nonzero exit, after the rows.
                let failed = bench_rl::failed_runs(&report);
                anyhow::ensure!(failed == 0, "bench rl: {failed} run(s) failed (rows above)");
            } else {
                bench::run(what, seq, reps, &gpu_sections, &sp_seqs, json)?
            }
        }
        Command::Data(args) => data_cmd::run(args)?,
        Command::Demo(args) => demo::run(args)?,
        Command::Launch {
            nproc,
            rendezvous,
            base_rank,
            world,
            grace_secs,
            command,
        } => {
            let mut args = command.into_iter();
            let first = args.next().context("launch: no command given after --")?;
            let program = if first == "reel" {
                std::env::current_exe().context("launch: finding this executable")?
            } else {
                PathBuf::from(first)
            };
            let mut l = reel_comm::launch::Launch::local(program, args.collect(), nproc);
            l.rendezvous = rendezvous;
            l.base_rank = base_rank;
            l.world = world.unwrap_or(nproc);
            l.grace = std::time::Duration::from_secs(grace_secs);
            reel_comm::launch::run(&l)?;
        }
    }
    Ok(())
}
