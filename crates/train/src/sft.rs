//! The SFT loop: tokenized conversations, length-bucketed batches, gradient accumulation with a
//! global token-mean loss, clipping, a warmup + cosine schedule, AdamW, atomic checkpoints and
//! exact resume.
//!
//! Each optimizer step draws `grad_accum` micro-batches, scales every token's loss by
//! 1 / (labelled tokens of the whole step), so the gradient is that of the token-mean loss over
//! the step whatever the micro-batching. A checkpoint folder is a complete HF model folder
//! (config.json, model.safetensors, tokenizer files) plus `optimizer.safetensors` and
//! `trainer_state.json` (step, sampler position, recent losses); resuming from it replays the
//! same batches with the same weights and moments, so the loss curve continues unchanged.

use crate::checkpoint::{
    optimizer_state_from_bytes, optimizer_state_to_bytes, CheckpointDir, TrainerState,
    OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use crate::config::SftConfig;
use crate::eval::{eval_nll, tokenize_all};
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepReport};
use anyhow::{bail, Context, Result};
use reel_data::{make_batch, read_sft_jsonl, Batch, BucketSampler, SamplerState, Tokenizer};
use reel_model::io::safetensors_bytes;
use reel_model::{
    load_checkpoint, save_checkpoint, LocalAttention, Qwen2, Qwen2Config, TokenBatch, Workspace,
};
use reel_optim::{clip_grad_norm, global_grad_norm, AdamW};
use reel_tensor::DType;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Called every `output.eval_every` steps and after the last step with the current model; its
/// JSON object is merged into the metrics line of that evaluation and printed.
pub type EvalHook<'a> = Box<dyn FnMut(u64, &Qwen2, &Tokenizer) -> Result<serde_json::Value> + 'a>;

/// How a run is driven (beyond its config).
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Continue from the newest checkpoint in `output.dir` (a fresh start if there is none).
    pub resume: bool,
    /// Progress display; default: a bar on a terminal, log lines otherwise.
    pub progress: Option<ProgressMode>,
    /// Extra evaluation, e.g. generation accuracy.
    pub eval_hook: Option<EvalHook<'a>>,
    /// Stop after this many steps of this invocation (an "interrupt" for tests and demos).
    pub stop_after: Option<u64>,
    /// Test hook: make the gradients of this (1-based) step non-finite.
    #[doc(hidden)]
    pub poison_step: Option<u64>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct SftSummary {
    /// Optimizer steps completed (counting those before a resume).
    pub steps: u64,
    /// Loss of the last step.
    pub final_loss: f32,
    /// Loss of every step this invocation ran.
    pub losses: Vec<f32>,
    /// HF folder of the final weights (the last checkpoint).
    pub final_model_dir: PathBuf,
}

/// The starting model of a fresh run: the `[model] path` checkpoint, or `[model.init]` weights.
pub fn init_model(cfg: &SftConfig, tok: &Tokenizer) -> Result<Qwen2> {
    if let Some(path) = &cfg.model.path {
        return load_checkpoint(path).with_context(|| format!("loading {}", path.display()));
    }
    let init = cfg
        .model
        .init
        .as_ref()
        .context("[model] needs `path` or [model.init]")?;
    let head_dim = init.hidden_size / init.num_attention_heads.max(1);
    let config = Qwen2Config {
        vocab_size: tok.vocab_size(),
        hidden_size: init.hidden_size,
        intermediate_size: init.intermediate_size,
        num_hidden_layers: init.num_hidden_layers,
        num_attention_heads: init.num_attention_heads,
        num_key_value_heads: init.num_key_value_heads,
        head_dim,
        max_position_embeddings: init.max_position_embeddings,
        rms_norm_eps: init.rms_norm_eps as f32,
        rope_theta: init.rope_theta as f32,
        tie_word_embeddings: init.tie_word_embeddings,
        dtype: DType::F32,
        bos_token_id: tok.bos_token_id(),
        eos_token_id: tok.eos_token_id(),
    };
    Ok(Qwen2::new_random(config, init.seed)?)
}

/// The files of a checkpoint folder: the HF model folder, the tokenizer, optimizer and state.
fn checkpoint_files(
    model: &Qwen2,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let cfg = serde_json::to_string_pretty(&model.config.to_json())?;
    files.push(("config.json".to_string(), cfg.into_bytes()));
    let tensors: Vec<(String, Vec<usize>, &[f32])> = model
        .layout
        .entries
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.shape.clone(),
                &model.params[e.range.clone()],
            )
        })
        .collect();
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    files.push((
        "model.safetensors".to_string(),
        safetensors_bytes(&tensors, DType::F32, meta)?,
    ));
    // The tokenizer writes a folder; carry its files into the checkpoint.
    let tmp = tempfile::tempdir()?;
    tok.save(tmp.path())?;
    for entry in std::fs::read_dir(tmp.path())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        files.push((name, std::fs::read(entry.path())?));
    }
    files.push((
        OPTIMIZER_FILE.to_string(),
        optimizer_state_to_bytes(&opt.state())?,
    ));
    files.push((TRAINER_STATE_FILE.to_string(), state.to_json_bytes()));
    Ok(files)
}

struct Resumed {
    model: Qwen2,
    opt_state: reel_optim::AdamWState,
    state: TrainerState,
    dir: PathBuf,
}

fn load_resume(dir: &Path) -> Result<Resumed> {
    let model =
        load_checkpoint(dir).with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt_state = optimizer_state_from_bytes(
        &std::fs::read(&opt_path).with_context(|| format!("reading {}", opt_path.display()))?,
    )?;
    let st_path = dir.join(TRAINER_STATE_FILE);
    let state = TrainerState::from_json_bytes(
        &std::fs::read(&st_path).with_context(|| format!("reading {}", st_path.display()))?,
    )?;
    Ok(Resumed {
        model,
        opt_state,
        state,
        dir: dir.to_path_buf(),
    })
}

fn token_batch(b: &Batch) -> TokenBatch<'_> {
    TokenBatch {
        tokens: &b.input_ids,
        targets: &b.targets,
        positions: &b.positions,
        b: b.b,
        t: b.t,
    }
}

/// Runs (or resumes) an SFT run described by `cfg`.
pub fn run_sft(cfg: &SftConfig, mut opts: RunOptions) -> Result<SftSummary> {
    cfg.validate()?;
    let tok_dir = cfg.tokenizer_dir().context("no tokenizer folder")?;
    let tok = Tokenizer::from_dir(tok_dir)
        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::checkpoint::write_atomic(out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let ckpts = CheckpointDir::open(out, cfg.output.keep_last)?;

    // Data.
    let convs = read_sft_jsonl(&cfg.data.train)?;
    let train = tokenize_all(&tok, &convs, cfg.data.max_len)
        .with_context(|| format!("tokenizing {}", cfg.data.train.display()))?;
    if train.is_empty() {
        bail!(
            "{}: no conversation has an assistant token within max_len = {}",
            cfg.data.train.display(),
            cfg.data.max_len
        );
    }
    let eval_set = match &cfg.data.eval {
        Some(p) => Some(read_sft_jsonl(p)?),
        None => None,
    };
    let lengths: Vec<usize> = train.iter().map(|e| e.len()).collect();
    let mut sampler = BucketSampler::with_batching(
        &lengths,
        cfg.data.tokens_per_batch,
        cfg.data.seed,
        cfg.data.batching,
    );
    let pad = tok
        .pad_token_id()
        .or(tok.eos_token_id())
        .context("the tokenizer has neither a pad nor an eos token")?;

    // Model, optimizer, and where we start.
    let resumed = if opts.resume {
        ckpts.latest().map(|d| load_resume(&d)).transpose()?
    } else {
        None
    };
    let mut model = match &resumed {
        Some(r) => Qwen2::from_params(r.model.config.clone(), r.model.params.clone())?,
        None => init_model(cfg, &tok)?,
    };
    if tok.vocab_size() > model.config.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tok.vocab_size(),
            model.config.vocab_size
        );
    }
    let sizes: Vec<usize> = model.layout.entries.iter().map(|e| e.range.len()).collect();
    let decay: Vec<bool> = model.layout.entries.iter().map(|e| e.decay).collect();
    let mut opt = AdamW::new(&sizes, &decay, cfg.train.adamw());
    let mut start_step = 0u64;
    let mut recent_losses: Vec<f32> = Vec::new();
    if let Some(r) = resumed {
        opt.load_state(r.opt_state)?;
        let s: SamplerState = serde_json::from_value(r.state.data.clone())
            .context("trainer_state.json: bad sampler state")?;
        sampler.restore(s)?;
        if r.state.config_hash != cfg.config_hash() {
            tracing::warn!(
                "resuming {} with a config that differs from the one it was written with",
                r.dir.display()
            );
        }
        start_step = r.state.step;
        recent_losses = r.state.losses;
        tracing::info!("resuming from {} at step {start_step}", r.dir.display());
    }

    let schedule = cfg.train.lr_schedule();
    let policy = cfg.train.checkpoint;
    let mut ws = Workspace::new(&model.config, policy);
    let mut grads = vec![0.0f32; model.params.len()];
    let mut metrics = MetricsWriter::open(out, start_step + 1)?;
    let total = cfg.train.steps;
    let progress = match opts.progress {
        Some(mode) => Progress::with_mode(mode, total, start_step, cfg.output.log_every),
        None => Progress::new(total, start_step, cfg.output.log_every),
    };
    let attn = LocalAttention;
    let mut losses = Vec::new();
    let mut final_model_dir = ckpts.latest().unwrap_or_else(|| out.to_path_buf());
    let mut ran = 0u64;

    for step in start_step..total {
        if opts.stop_after.is_some_and(|n| ran >= n) {
            break;
        }
        let t0 = Instant::now();
        let batches: Vec<Batch> = (0..cfg.train.grad_accum)
            .map(|_| {
                let idx = sampler.next_batch();
                let ex: Vec<_> = idx.iter().map(|&i| &train[i]).collect();
                make_batch(&ex, pad, cfg.data.max_len)
            })
            .collect();
        let labelled: usize = batches.iter().map(Batch::n_label_tokens).sum();
        let tokens: usize = batches.iter().map(|b| b.b * b.t).sum();
        let scale = 1.0 / labelled.max(1) as f32;
        grads.fill(0.0);
        let mut loss_sum = 0.0f64;
        for b in &batches {
            let tb = token_batch(b);
            let stats = model.forward(&mut ws, &tb, &attn).map_err(|e| {
                anyhow::anyhow!(
                    "step {}: {e}; stopping with the last good checkpoint intact ({})",
                    step + 1,
                    final_model_dir.display()
                )
            })?;
            loss_sum += stats.loss_sum;
            model.backward(&mut grads, &mut ws, &tb, scale, &attn)?;
        }
        if opts.poison_step == Some(step + 1) {
            grads[0] = f32::NAN;
        }
        let grad_norm = {
            let layout = &model.layout;
            let mut g = layout.split_mut(&mut grads);
            if cfg.train.grad_clip > 0.0 {
                clip_grad_norm(&mut g, cfg.train.grad_clip)
            } else {
                let ro: Vec<&[f32]> = g.iter().map(|s| &**s).collect();
                global_grad_norm(&ro)
            }
        };
        let loss = (loss_sum / labelled.max(1) as f64) as f32;
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "step {}: non-finite loss ({loss}) or gradient norm ({grad_norm}); stopping with \
                 the last good checkpoint intact ({})",
                step + 1,
                final_model_dir.display()
            );
        }
        let lr = schedule.lr_at(cfg.train.lr, step);
        {
            let layout = model.layout.clone();
            let mut p = layout.split_mut(&mut model.params);
            let mut g = layout.split_mut(&mut grads);
            let ro: Vec<&[f32]> = g.iter_mut().map(|s| &**s).collect();
            opt.step(&mut p, &ro, lr);
        }
        let done = step + 1;
        ran += 1;
        let secs = t0.elapsed().as_secs_f64();
        let tokens_per_s = tokens as f64 / secs;
        losses.push(loss);
        recent_losses.push(loss);
        if recent_losses.len() > 100 {
            recent_losses.remove(0);
        }
        let mut record = json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "label_tokens": labelled, "tokens_per_s": tokens_per_s,
            "step_s": secs, "epoch": sampler.epoch(),
        });
        progress.update(&StepReport {
            step: done,
            loss,
            lr,
            tokens_per_s,
        });

        let last = done == total;
        if (cfg.output.eval_every > 0 && done % cfg.output.eval_every == 0) || last {
            let mut parts = Vec::new();
            if let Some(set) = &eval_set {
                let s = eval_nll(&model, &tok, set, cfg.data.max_len)?;
                record["eval_loss"] = json!(s.mean());
                parts.push(format!("eval loss {:.4}", s.mean()));
            }
            if let Some(hook) = opts.eval_hook.as_mut() {
                let extra = hook(done, &model, &tok)?;
                if let Some(obj) = extra.as_object() {
                    for (k, v) in obj {
                        record[k] = v.clone();
                        parts.push(format!("{k} {v}"));
                    }
                }
            }
            if !parts.is_empty() {
                progress.println(format!("step {done}: loss {loss:.4}, {}", parts.join(", ")));
            }
        }
        metrics.write(&record)?;

        if (cfg.output.save_every > 0 && done % cfg.output.save_every == 0) || last {
            let state = TrainerState {
                step: done,
                data: serde_json::to_value(sampler.state())?,
                rng: cfg.data.seed,
                losses: recent_losses.clone(),
                config_hash: cfg.config_hash(),
            };
            let files = checkpoint_files(&model, &tok, &opt, &state)?;
            final_model_dir = ckpts.save(done, &files)?;
        }
    }
    progress.finish();
    let steps = start_step + ran;
    Ok(SftSummary {
        steps,
        final_loss: losses
            .last()
            .copied()
            .or(recent_losses.last().copied())
            .unwrap_or(f32::NAN),
        losses,
        final_model_dir,
    })
}

/// Saves `model` with its tokenizer as a plain HF folder (no optimizer state).
pub fn save_model_folder(model: &Qwen2, tok: &Tokenizer, dir: &Path) -> Result<()> {
    save_checkpoint(
        model,
        dir,
        DType::F32,
        reel_model::io::DEFAULT_MAX_SHARD_BYTES,
    )?;
    tok.save(dir)?;
    Ok(())
}
