//! `reel`: train long-context transformers. Commands: sft, eval, generate, bench, data, demo,
//! launch.

mod bench;
mod bench_data;
mod bench_rollout;
mod bench_sp;
mod data_cmd;
mod demo;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use reel_data::{Message, SftFile, Tokenizer};
use reel_model::generate::SamplingParams;
use reel_model::load_checkpoint;
use reel_train::{eval_nll, run_sft, RunOptions, SftConfig};
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

#[derive(Subcommand)]
enum Command {
    /// Supervised fine-tuning from a TOML config.
    Sft {
        /// The run's TOML config (`reel sft --print-config` shows every field and default).
        #[arg(long, required_unless_present = "print_config")]
        config: Option<PathBuf>,
        /// Override a config field, e.g. `--set train.lr=3e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Sequence-parallel ranks per sequence (`--set parallel.sp=N`; applied after --set).
        #[arg(long, value_name = "N")]
        sp: Option<usize>,
        /// Data-parallel replicas (`--set parallel.dp=M`; applied after --set).
        #[arg(long, value_name = "M")]
        dp: Option<usize>,
        /// Continue from the newest checkpoint in the output folder.
        #[arg(long)]
        resume: bool,
        /// Print the documented default config and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Mean negative log-likelihood of the assistant tokens of an SFT JSONL file.
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
    /// CPU throughput: GEMM vs the gemm crate alone, attention, training tokens/s per policy.
    Bench {
        #[arg(value_enum, default_value_t = bench::BenchWhat::All)]
        what: bench::BenchWhat,
        /// Sequence length for the attention and training benchmarks.
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Timed repetitions (the best is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json: bool,
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
            overrides,
            sp,
            dp,
            resume,
            print_config,
        } => {
            if print_config {
                print!("{}", SftConfig::documented_default());
                return Ok(());
            }
            let path = config.expect("clap requires --config");
            let mut cfg = SftConfig::from_file(&path)?;
            for o in &overrides {
                cfg.apply_override(o)?;
            }
            for (key, n) in [("sp", sp), ("dp", dp)] {
                if let Some(n) = n {
                    cfg.apply_override(&format!("parallel.{key}={n}"))?;
                }
            }
            let summary = run_sft(
                &cfg,
                RunOptions {
                    resume,
                    ..RunOptions::default()
                },
            )?;
            println!(
                "trained {} steps; final loss {:.4}; model saved to {}",
                summary.steps,
                summary.final_loss,
                summary.final_model_dir.display()
            );
        }
        Command::Eval {
            model,
            data,
            json,
            max_len,
        } => {
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
            let mut stop: Vec<u32> = [
                tok.eos_token_id(),
                m.config.eos_token_id,
                tok.token_to_id("<|im_end|>"),
            ]
            .into_iter()
            .flatten()
            .collect();
            stop.dedup();
            let params = SamplingParams {
                temperature,
                top_p,
                top_k,
                seed,
            };
            let out = m.generate(&ids, max_new_tokens, &stop, &params)?;
            println!("{}", tok.decode(&out, true)?);
        }
        Command::Bench {
            what,
            seq,
            reps,
            json,
        } => bench::run(what, seq, reps, json)?,
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
