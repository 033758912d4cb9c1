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
//!
//! With `[parallel] dp · sp > 1` the run goes on that many in-process ranks (`InProcess::spawn`,
//! one thread each; rank = dp_rank · sp + sp_rank). Every rank builds the same replica and draws
//! the same `dp · grad_accum` micro-batches per step from its copy of the one sampler sequence
//! (so resume stays exact); replica d takes micro-batches d, d + dp, …, and the sp ranks of a
//! replica each take their token shard of each (`SpAttention` over the sp group, its layout set
//! by the schedule). Losses and gradients are partial sums over each rank's tokens: every rank
//! scales by 1 / (labelled tokens of the whole step), the gradients (with the loss sums and
//! token counts riding along) are summed over the whole world in one all-reduce, and every rank
//! then clips and steps identically, so the replicas stay bit-identical (checked at the end).
//! Only rank 0 writes metrics, progress and checkpoints. A failure on any rank aborts every
//! rank; the error is the first failing rank's, naming it and the step. A single-rank run uses
//! the same step function on this thread, with no communicator.

use crate::checkpoint::{
    optimizer_state_from_bytes, optimizer_state_to_bytes, CheckpointDir, TrainerState,
    OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use crate::config::SftConfig;
use crate::eval::{eval_examples, tokenize_all};
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepReport};
use anyhow::{bail, Context, Result};
use reel_comm::{CommError, Communicator, InProcess};
use reel_data::{
    make_batch, Batch, BucketSampler, SamplerState, SftFile, TokenizedExample, Tokenizer,
    IGNORE_INDEX,
};
use reel_model::io::model_files;
use reel_model::{
    load_checkpoint, save_checkpoint, LocalAttention, LossStats, Qwen2, Qwen2Config, TokenBatch,
    Workspace,
};
use reel_optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWState};
use reel_parallel::{ParallelDims, RankCoords, SpAttention};
use reel_tensor::DType;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Called every `output.eval_every` steps and after the last step with the current model; its
/// JSON object is merged into the metrics line of that evaluation and printed.
/// Under data or sequence parallelism it runs on rank 0's thread, hence `Send`.
pub type EvalHook<'a> =
    Box<dyn FnMut(u64, &Qwen2, &Tokenizer) -> Result<serde_json::Value> + Send + 'a>;

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
    /// Test hook: the rank whose gradients `poison_step` poisons (default 0).
    #[doc(hidden)]
    pub poison_rank: usize,
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
    /// A checksum of each rank's final parameters, in rank order (one entry for a single-rank
    /// run); `run_sft` has already refused replicas that differ.
    pub param_checksums: Vec<u64>,
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
pub(crate) fn checkpoint_files(
    model: &Qwen2,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<Vec<(String, Vec<u8>)>> {
    // Weights stay f32 (the master copy); config.json says so.
    let files = model_files(model, DType::F32, usize::MAX)?;
    checkpoint_files_with(files, tok, opt, state)
}

/// The files of a checkpoint folder from a model folder's `files`: those, the tokenizer's,
/// optimizer and trainer state.
pub(crate) fn checkpoint_files_with(
    mut files: Vec<(String, Vec<u8>)>,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<Vec<(String, Vec<u8>)>> {
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

/// What every rank starts from, read-only: tokenizer, data, optimizer and sampler state.
struct Shared {
    tok: Tokenizer,
    ckpts: CheckpointDir,
    train: Vec<TokenizedExample>,
    /// The eval set, tokenized once (truncated to `data.max_len`).
    eval_set: Option<Vec<TokenizedExample>>,
    /// The sampler at the run's first step.
    sampler: BucketSampler,
    pad: u32,
    opt_state: Option<AdamWState>,
    start_step: u64,
    recent_losses: Vec<f32>,
}

impl Shared {
    /// Loads everything and the starting model (fresh, or the newest checkpoint's on resume).
    fn load(cfg: &SftConfig, resume: bool) -> Result<(Self, Qwen2)> {
        let tok_dir = cfg.tokenizer_dir().context("no tokenizer folder")?;
        let tok = Tokenizer::from_dir(tok_dir)
            .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
        let out = &cfg.output.dir;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        crate::checkpoint::write_atomic(out.join("config.toml"), cfg.to_toml().as_bytes())?;
        let ckpts = CheckpointDir::open(out, cfg.output.keep_last)?;
        if !resume {
            if let Some(old) = ckpts.latest() {
                bail!(
                    "{} holds checkpoints of an earlier run (newest {}); pass --resume to \
                     continue it, or choose another output.dir",
                    ckpts.root().display(),
                    old.display()
                );
            }
        }

        // Data.
        let train_file = SftFile::read(&cfg.data.train)?;
        let train = tokenize_all(&tok, &train_file, cfg.data.max_len)?;
        if train.is_empty() {
            bail!(
                "{}: no conversation has an assistant token within max_len = {}",
                cfg.data.train.display(),
                cfg.data.max_len
            );
        }
        let eval_set = match &cfg.data.eval {
            Some(p) => Some(SftFile::read(p)?),
            None => None,
        };
        let lengths: Vec<usize> = train.iter().map(|e| e.len()).collect();
        let sampler = BucketSampler::with_batching(
            &lengths,
            cfg.data.tokens_per_batch,
            cfg.data.seed,
            cfg.data.batching,
        );
        let pad = tok
            .pad_token_id()
            .context("the tokenizer has neither a pad nor an eos token")?;

        // Model, optimizer state, and where we start.
        let resumed = if resume {
            ckpts.latest().map(|d| load_resume(&d)).transpose()?
        } else {
            None
        };
        let (model, resumed) = match resumed {
            Some(Resumed {
                model,
                opt_state,
                state,
                dir,
            }) => (model, Some((opt_state, state, dir))),
            None => (init_model(cfg, &tok)?, None),
        };
        if tok.vocab_size() > model.config.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                model.config.vocab_size
            );
        }
        if cfg.data.max_len > model.config.max_position_embeddings {
            bail!(
                "data.max_len = {} exceeds the model's max_position_embeddings ({})",
                cfg.data.max_len,
                model.config.max_position_embeddings
            );
        }
        let eval_set = match eval_set {
            Some(file) => {
                let examples = tokenize_all(&tok, &file, cfg.data.max_len)?;
                if examples.is_empty() {
                    bail!(
                        "{}: no conversation has an assistant token within max_len = {}",
                        file.path.display(),
                        cfg.data.max_len
                    );
                }
                Some(examples)
            }
            None => None,
        };
        let mut shared = Shared {
            tok,
            ckpts,
            train,
            eval_set,
            sampler,
            pad,
            opt_state: None,
            start_step: 0,
            recent_losses: Vec::new(),
        };
        if let Some((opt_state, state, dir)) = resumed {
            let s: SamplerState = serde_json::from_value(state.data.clone())
                .context("trainer_state.json: bad sampler state")?;
            shared.sampler.restore(s)?;
            if state.config_hash != cfg.config_hash() {
                tracing::warn!(
                    "resuming {} with a config that differs from the one it was written with",
                    dir.display()
                );
            }
            shared.opt_state = Some(opt_state);
            shared.start_step = state.step;
            shared.recent_losses = state.losses;
            tracing::info!(
                "resuming from {} at step {}",
                dir.display(),
                shared.start_step
            );
        }
        Ok((shared, model))
    }
}

/// Trailing slots of the gradient buffer that ride along its all-reduce: this rank's loss sum
/// (as two f32, high and low part) and its labelled-token count.
const STATS: usize = 3;

/// One rank's model replica and everything it updates.
struct Replica {
    model: Qwen2,
    opt: AdamW,
    ws: Workspace,
    /// Parameter gradients (`model.params.len()`), then [`STATS`] slots.
    grads: Vec<f32>,
    sampler: BucketSampler,
    /// Token id of padding (batch padding and shard padding).
    pad: u32,
}

impl Replica {
    fn new(model: Qwen2, shared: &Shared, cfg: &SftConfig) -> Result<Self> {
        let sizes: Vec<usize> = model.layout.entries.iter().map(|e| e.range.len()).collect();
        let decay: Vec<bool> = model.layout.entries.iter().map(|e| e.decay).collect();
        let mut opt = AdamW::new(&sizes, &decay, cfg.train.adamw());
        if let Some(state) = &shared.opt_state {
            opt.load_state(state.clone())?;
        }
        Ok(Replica {
            ws: Workspace::new(&model.config, cfg.train.checkpoint),
            grads: vec![0.0; model.params.len() + STATS],
            opt,
            model,
            sampler: shared.sampler.clone(),
            pad: shared.pad,
        })
    }
}

/// A rank's place among the others: the world (gradients are all-reduced over all of it) and,
/// when `sp > 1`, its sequence-parallel attention over its sp group.
struct Peers<'a, C: Communicator> {
    rank: usize,
    dims: ParallelDims,
    coords: RankCoords,
    world: &'a C,
    sp: Option<&'a SpAttention<C>>,
}

/// What one optimizer step did (the same on every rank).
struct StepOut {
    loss: f32,
    grad_norm: f32,
    /// Labelled and total tokens of the whole step (every rank's micro-batches).
    labelled: usize,
    tokens: usize,
}

/// Forward and backward of one micro-batch (this rank's token shard of it under sequence
/// parallelism); gradients accumulate into `grads`.
fn micro_step<C: Communicator>(
    rep: &mut Replica,
    b: &Batch,
    scale: f32,
    sp: Option<(&SpAttention<C>, usize)>,
) -> Result<LossStats> {
    let n = rep.model.params.len();
    let grads = &mut rep.grads[..n];
    let Some((sp, r)) = sp else {
        let tb = token_batch(b);
        let stats = rep.model.forward(&mut rep.ws, &tb, &LocalAttention)?;
        rep.model
            .backward(grads, &mut rep.ws, &tb, scale, &LocalAttention)?;
        return Ok(stats);
    };
    let sh = sp.set_seq_len(b.t)?;
    let tokens = sh.shard(&b.input_ids, b.b, 1, r, rep.pad)?;
    let targets = sh.shard(&b.targets, b.b, 1, r, IGNORE_INDEX)?;
    let row = sh.positions(r)?;
    let positions: Vec<u32> = (0..b.b).flat_map(|_| row.iter().copied()).collect();
    let tb = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b: b.b,
        t: sh.local_len(),
    };
    let stats = rep.model.forward(&mut rep.ws, &tb, sp)?;
    rep.model.backward(grads, &mut rep.ws, &tb, scale, sp)?;
    Ok(stats)
}

/// One optimizer step over `batches`, all the micro-batches of the step (the same on every
/// rank): this rank's share forward and backward with the loss scaled by 1 / (labelled tokens of
/// the whole step), gradients summed over the world, clipped, and AdamW at `lr`. `at` names the
/// rank and step in errors; `poison` makes the local gradients non-finite (tests).
fn train_step<C: Communicator>(
    rep: &mut Replica,
    batches: &[Batch],
    peers: Option<&Peers<'_, C>>,
    cfg: &SftConfig,
    lr: f32,
    at: &str,
    poison: bool,
) -> Result<StepOut> {
    let labelled: usize = batches.iter().map(Batch::n_label_tokens).sum();
    let tokens: usize = batches.iter().map(|b| b.b * b.t).sum();
    let scale = 1.0 / labelled.max(1) as f32;
    let n = rep.model.params.len();
    rep.grads.fill(0.0);
    let (dp, dp_rank) = peers.map_or((1, 0), |p| (p.dims.dp(), p.coords.dp_rank));
    let sp = peers.and_then(|p| p.sp.map(|sp| (sp, p.coords.sp_rank)));
    let mut local = LossStats::default();
    for b in batches.iter().skip(dp_rank).step_by(dp) {
        let s = micro_step(rep, b, scale, sp).with_context(|| at.to_string())?;
        local.loss_sum += s.loss_sum;
        local.n_tokens += s.n_tokens;
    }
    if poison {
        rep.grads[0] = f32::NAN;
    }
    let loss_sum = match peers {
        None => local.loss_sum,
        Some(p) => {
            // Name the rank a non-finite value comes from before the sum spreads it everywhere.
            if let Some(i) = rep.grads[..n].iter().position(|g| !g.is_finite()) {
                bail!(
                    "{at}: non-finite gradient ({} at parameter index {i}) before the all-reduce",
                    rep.grads[i]
                );
            }
            let hi = local.loss_sum as f32;
            rep.grads[n] = hi;
            rep.grads[n + 1] = (local.loss_sum - hi as f64) as f32;
            rep.grads[n + 2] = local.n_tokens as f32;
            p.world
                .all_reduce_sum(&mut rep.grads)
                .with_context(|| format!("{at}: gradient all-reduce"))?;
            let counted = rep.grads[n + 2] as f64;
            // Exact below 2^24; a mismatch means the shards lost or duplicated tokens.
            if counted < (1u64 << 24) as f64 && counted as usize != labelled {
                bail!(
                    "{at}: the ranks' shards hold {counted} labelled tokens, the step {labelled}"
                );
            }
            rep.grads[n] as f64 + rep.grads[n + 1] as f64
        }
    };
    let layout = rep.model.layout.clone();
    let grads = &mut rep.grads[..n];
    let grad_norm = {
        let mut g = layout.split_mut(grads);
        if cfg.train.grad_clip > 0.0 {
            clip_grad_norm(&mut g, cfg.train.grad_clip)
        } else {
            let ro: Vec<&[f32]> = g.iter().map(|s| &**s).collect();
            global_grad_norm(&ro)
        }
    };
    let loss = (loss_sum / labelled.max(1) as f64) as f32;
    if !loss.is_finite() || !grad_norm.is_finite() {
        bail!("{at}: non-finite loss ({loss}) or gradient norm ({grad_norm})");
    }
    {
        let mut p = layout.split_mut(&mut rep.model.params);
        let mut g = layout.split_mut(grads);
        let ro: Vec<&[f32]> = g.iter_mut().map(|s| &**s).collect();
        rep.opt.step(&mut p, &ro, lr);
    }
    Ok(StepOut {
        loss,
        grad_norm,
        labelled,
        tokens,
    })
}

/// Rank 0's duties: metrics, progress, evaluation, checkpoints.
struct Lead<'h, 'a> {
    hook: Option<&'h mut EvalHook<'a>>,
    progress: Option<ProgressMode>,
}

/// What a rank's loop returns.
struct RankOut {
    /// Loss of every step this invocation ran.
    losses: Vec<f32>,
    /// The last loss known (this invocation's, else the checkpoint's), NaN if none.
    final_loss: f32,
    ran: u64,
    /// [`param_checksum`] of the final weights.
    checksum: u64,
}

/// FNV-1a over the parameters' bit patterns, a word at a time: equal iff the replicas are
/// (bit-)identical, up to hash collisions.
fn param_checksum(params: &[f32]) -> u64 {
    params.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The training loop of one rank (the only rank when `peers` is `None`). Every rank draws the
/// same micro-batches from its copy of the sampler, so all stay in step; only the lead writes.
fn rank_loop<C: Communicator>(
    model: Qwen2,
    shared: &Shared,
    cfg: &SftConfig,
    peers: Option<&Peers<'_, C>>,
    lead: Option<Lead<'_, '_>>,
    stop_after: Option<u64>,
    poison_step: Option<u64>,
) -> Result<RankOut> {
    let mut rep = Replica::new(model, shared, cfg)?;
    let schedule = cfg.train.lr_schedule();
    let total = cfg.train.steps;
    let start_step = shared.start_step;
    let dp = peers.map_or(1, |p| p.dims.dp());
    let micro_batches = dp * cfg.train.grad_accum as usize;
    let mut lead = match lead {
        Some(l) => Some((
            MetricsWriter::open(&cfg.output.dir, start_step + 1)?,
            match l.progress {
                Some(mode) => Progress::with_mode(mode, total, start_step, cfg.output.log_every),
                None => Progress::new(total, start_step, cfg.output.log_every),
            },
            l.hook,
        )),
        None => None,
    };
    let mut losses = Vec::new();
    let mut recent_losses = shared.recent_losses.clone();
    let mut ran = 0u64;

    for step in start_step..total {
        if stop_after.is_some_and(|n| ran >= n) {
            break;
        }
        let done = step + 1;
        let at = match peers {
            Some(p) => format!("rank {}, step {done}", p.rank),
            None => format!("step {done}"),
        };
        let t0 = Instant::now();
        let batches: Vec<Batch> = (0..micro_batches)
            .map(|_| {
                let idx = rep.sampler.next_batch();
                let ex: Vec<_> = idx.iter().map(|&i| &shared.train[i]).collect();
                make_batch(&ex, shared.pad, cfg.data.max_len)
            })
            .collect();
        let lr = schedule.lr_at(cfg.train.lr, step);
        let poison = poison_step == Some(done);
        let out = train_step(&mut rep, &batches, peers, cfg, lr, &at, poison)?;
        let loss = out.loss;
        ran += 1;
        let secs = t0.elapsed().as_secs_f64();
        let tokens_per_s = out.tokens as f64 / secs;
        losses.push(loss);
        recent_losses.push(loss);
        if recent_losses.len() > 100 {
            recent_losses.remove(0);
        }
        let Some((metrics, progress, hook)) = lead.as_mut() else {
            continue;
        };
        let mut record = json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": out.grad_norm,
            "tokens": out.tokens, "label_tokens": out.labelled, "tokens_per_s": tokens_per_s,
            "step_s": secs, "epoch": rep.sampler.epoch(),
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
            if let Some(set) = &shared.eval_set {
                let s = eval_examples(&rep.model, set, shared.pad)
                    .with_context(|| format!("{at}: evaluation"))?;
                record["eval_loss"] = json!(s.mean());
                parts.push(format!("eval loss {:.4}", s.mean()));
            }
            if let Some(hook) = hook.as_mut() {
                let extra = hook(done, &rep.model, &shared.tok)
                    .with_context(|| format!("{at}: evaluation hook"))?;
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
                data: serde_json::to_value(rep.sampler.state())?,
                rng: cfg.data.seed,
                losses: recent_losses.clone(),
                config_hash: cfg.config_hash(),
            };
            let files = checkpoint_files(&rep.model, &shared.tok, &rep.opt, &state)?;
            shared
                .ckpts
                .save(done, &files)
                .with_context(|| format!("{at}: saving the checkpoint"))?;
        }
    }
    if let Some((_, progress, _)) = &lead {
        progress.finish();
    }
    Ok(RankOut {
        final_loss: losses
            .last()
            .or(recent_losses.last())
            .copied()
            .unwrap_or(f32::NAN),
        losses,
        ran,
        checksum: param_checksum(&rep.model.params),
    })
}

/// Whether `e` only reports that another rank failed first.
fn is_secondary(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<CommError>(),
            Some(CommError::PeerFailed { .. } | CommError::PeerExited { .. })
        )
    }) || format!("{e:#}").contains("aborted because rank")
}

/// The ranks of a `dp × sp` run, one thread each: every rank builds the same replica, rank
/// `dp_rank · sp + sp_rank` takes micro-batches `dp_rank, dp_rank + dp, …` and its token shard
/// of each; rank 0 writes. The first rank to fail (not one that only saw another fail) gives the
/// error.
fn run_ranks(
    model: &Qwen2,
    shared: &Shared,
    cfg: &SftConfig,
    opts: &mut RunOptions,
    dims: ParallelDims,
) -> Result<Vec<RankOut>> {
    let par = &cfg.parallel;
    tracing::info!(
        "training on {} in-process ranks: dp {} × sp {} ({} attention, overlap {})",
        dims.world(),
        dims.dp(),
        dims.sp(),
        par.schedule,
        par.overlap
    );
    let (stop_after, poison_step, poison_rank, progress) = (
        opts.stop_after,
        opts.poison_step,
        opts.poison_rank,
        opts.progress,
    );
    let hook = Mutex::new(opts.eval_hook.as_mut());
    let results = InProcess::spawn(dims.world(), par.timeout(), |comm| -> Result<RankOut> {
        let rank = comm.rank();
        let coords = dims.coords(rank)?;
        let sp = if dims.sp() > 1 {
            let group = comm
                .split(coords.dp_rank, coords.sp_rank)
                .with_context(|| format!("rank {rank}: forming its sequence-parallel group"))?;
            let schedule = par.schedule.kind().build(dims.sp())?;
            Some(
                SpAttention::new(group, schedule, par.overlap_mode())
                    .with_context(|| format!("rank {rank}: sequence-parallel attention"))?,
            )
        } else {
            None
        };
        let peers = Peers {
            rank,
            dims,
            coords,
            world: &comm,
            sp: sp.as_ref(),
        };
        let lead = (rank == 0).then(|| Lead {
            hook: hook.lock().unwrap_or_else(|e| e.into_inner()).take(),
            progress,
        });
        let poison = poison_step.filter(|_| rank == poison_rank);
        let replica = Qwen2::from_params(model.config.clone(), model.params.clone())?;
        rank_loop(replica, shared, cfg, Some(&peers), lead, stop_after, poison)
    });
    let mut outs = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for res in results {
        match res {
            Ok(o) => outs.push(o),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        let first = errors.iter().position(|e| !is_secondary(e)).unwrap_or(0);
        return Err(errors.swap_remove(first));
    }
    if let Some(r) = outs.iter().position(|o| o.checksum != outs[0].checksum) {
        bail!(
            "rank {r}'s parameters differ from rank 0's at the end of the run (replicas diverged)"
        );
    }
    Ok(outs)
}

/// Runs (or resumes) an SFT run described by `cfg`: on this thread when `parallel.dp ·
/// parallel.sp = 1`, else on that many in-process ranks.
pub fn run_sft(cfg: &SftConfig, mut opts: RunOptions) -> Result<SftSummary> {
    cfg.validate()?;
    let dims = cfg.parallel.dims()?;
    let (shared, model) = Shared::load(cfg, opts.resume)?;
    let outs = if dims.world() == 1 {
        let lead = Lead {
            hook: opts.eval_hook.as_mut(),
            progress: opts.progress,
        };
        rank_loop::<InProcess>(
            model,
            &shared,
            cfg,
            None,
            Some(lead),
            opts.stop_after,
            opts.poison_step,
        )
        .map(|o| vec![o])
    } else {
        run_ranks(&model, &shared, cfg, &mut opts, dims)
    };
    let last_good = shared.ckpts.latest();
    let outs = outs.map_err(|e| {
        let kept = match &last_good {
            Some(d) => d.display().to_string(),
            None => format!("none written yet in {}", cfg.output.dir.display()),
        };
        anyhow::anyhow!("{e:#}; stopping with the last good checkpoint intact ({kept})")
    })?;
    let lead = &outs[0];
    Ok(SftSummary {
        steps: shared.start_step + lead.ran,
        final_loss: lead.final_loss,
        losses: lead.losses.clone(),
        final_model_dir: last_good.unwrap_or_else(|| cfg.output.dir.clone()),
        param_checksums: outs.iter().map(|o| o.checksum).collect(),
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
