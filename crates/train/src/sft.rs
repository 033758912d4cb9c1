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
//! rank; the error is the first failing rank's, naming it and the step. A single-rank text run
//! uses the same step function on this thread, with no communicator (the VLM, whose vision
//! encode speaks through one, runs as a world of one in-process rank).
//!
//! Under `reel launch` (one process per GPU, `parallel.dp · parallel.sp` = the world size) each
//! process is one rank of the dp × sp grid on its own GPU (its local rank), joined to the others
//! by NCCL (`device::gpu_proc`: the world split into its replica's sequence-parallel group and
//! its shard's data-parallel group): the same step as the in-process GPU ranks, with attention's
//! messages and the gradient all-reduces going over NCCL instead of between streams of one GPU.
//! Every
//! process loads the run (data, tokenizer, checkpoint on resume) itself; rank 0 alone writes
//! metrics and checkpoints (weights and moments copied back from its GPU), and at the end the
//! replicas' checksums are compared over NCCL. A process that dies makes the others fail within
//! `parallel.timeout_s` (NCCL's waits are bounded), leaving the last checkpoint intact.
//!
//! The loop is generic over the model family ([`SftTask`]): the text decoder ([`TextTask`],
//! chat JSONL) and Qwen2.5-VL ([`crate::vl::VlTask`], LongVideo-Reason records with videos)
//! share all of the above; a task supplies its examples, micro-batches, the forward/backward
//! of one micro-batch on a rank, its trainable tensors, evaluation and checkpoint files.

use crate::checkpoint::{
    optimizer_state_from_bytes, optimizer_state_to_bytes, CheckpointDir, TrainerState,
    OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use crate::config::{ModelKind, SftConfig};
use crate::device::{
    describe, gpu_count, gpu_model, gpu_proc, gpu_sp_group, gpu_unsupported, open_gpu, process_gpu,
    resolve, Chosen, GpuHandle, GpuModel, GpuPlace, Launched, BUILT_WITH_CUDA,
};
use crate::eval::{eval_examples, tokenize_all};
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepReport};
use crate::vl::VideoRunStats;
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
use reel_optim::{clip_grad_norm, global_grad_norm, AdamW};
use reel_parallel::{ParallelDims, RankCoords, SpAttention, SpMethod};
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

/// Test hook called in the middle of every optimizer step (after the first micro-batch's forward
/// pass) with the step number (1-based); a fault test kills its process there.
#[doc(hidden)]
pub type MidStepHook<'a> = Box<dyn FnMut(u64) + Send + 'a>;

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
    /// Test hook: see [`MidStepHook`] (single-rank and one-process-per-GPU runs).
    #[doc(hidden)]
    pub mid_step_hook: Option<MidStepHook<'a>>,
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
    /// Video counters of a vision-language run (none for the text model).
    pub video: Option<VideoRunStats>,
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

/// The model files of a text checkpoint folder: the HF model folder and the tokenizer.
fn text_model_files(model: &Qwen2, tok: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>> {
    // Weights stay f32 (the master copy); config.json says so.
    let mut files = model_files(model, DType::F32, usize::MAX)?;
    files.extend(tokenizer_files(tok)?);
    Ok(files)
}

/// The tokenizer's files (it writes a folder; they are carried into a checkpoint).
pub(crate) fn tokenizer_files(tok: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>> {
    let tmp = tempfile::tempdir()?;
    tok.save(tmp.path())?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(tmp.path())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        files.push((name, std::fs::read(entry.path())?));
    }
    Ok(files)
}

/// The files of a checkpoint folder: the model's files, optimizer and trainer state.
fn with_trainer_files(
    mut files: Vec<(String, Vec<u8>)>,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<Vec<(String, Vec<u8>)>> {
    files.push((
        OPTIMIZER_FILE.to_string(),
        optimizer_state_to_bytes(&opt.state())?,
    ));
    files.push((TRAINER_STATE_FILE.to_string(), state.to_json_bytes()));
    Ok(files)
}

/// The files of a text checkpoint folder: the HF model folder, the tokenizer, optimizer and
/// state.
pub(crate) fn checkpoint_files(
    model: &Qwen2,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<Vec<(String, Vec<u8>)>> {
    with_trainer_files(text_model_files(model, tok)?, opt, state)
}

/// The files of a checkpoint folder from a model folder's `files`: those, the tokenizer's,
/// optimizer and trainer state.
pub(crate) fn checkpoint_files_with(
    mut files: Vec<(String, Vec<u8>)>,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<Vec<(String, Vec<u8>)>> {
    files.extend(tokenizer_files(tok)?);
    with_trainer_files(files, opt, state)
}

/// What the one SFT loop needs of a model family; everything else (sampler, accumulation,
/// global token-mean scaling, the gradient all-reduce, clipping, AdamW, schedule, NaN stop,
/// metrics, evaluation cadence, checkpoints, resume, ranks) is the loop's own. Implemented by
/// [`TextTask`] (Qwen2 on chat JSONL) and [`crate::vl::VlTask`] (Qwen2.5-VL on
/// LongVideo-Reason records). A task holds the run's read-only data, shared by every rank.
pub(crate) trait SftTask: Sync + Sized {
    /// The model (its weights are the parameters the optimizer updates).
    type Model: Send + Sync;
    /// One rank's step buffers.
    type Ws: Send;
    /// One micro-batch, ready for [`SftTask::micro_step`].
    type Micro;
    /// Whether a single-rank run needs a communicator all the same (it then runs as a world of
    /// one in-process rank).
    const NEEDS_COMM: bool;

    /// Reads and prepares the data of `cfg`.
    fn build(cfg: &SftConfig, tok: &Tokenizer) -> Result<Self>;
    /// The training data's sampler at step 0.
    fn sampler(&self, cfg: &SftConfig) -> BucketSampler;
    /// The starting model of a fresh run.
    fn init(&self, cfg: &SftConfig, tok: &Tokenizer) -> Result<Self::Model>;
    /// The model of a checkpoint folder.
    fn load(&self, dir: &Path) -> Result<Self::Model>;
    /// Refuses a model that does not fit the tokenizer or the data.
    fn check(&self, model: &Self::Model, cfg: &SftConfig, tok: &Tokenizer) -> Result<()>;
    /// A copy of `model` for another rank.
    fn replica(&self, model: &Self::Model) -> Result<Self::Model>;
    fn workspace(&self, model: &Self::Model, cfg: &SftConfig) -> Self::Ws;
    /// (size, weight decay) of every trainable tensor, in the order of
    /// [`SftTask::params_mut`] and of the flat gradient buffer.
    fn param_groups(&self, model: &Self::Model) -> Vec<(usize, bool)>;
    /// The trainable tensors, as [`SftTask::param_groups`] lists them.
    fn params_mut<'m>(&self, model: &'m mut Self::Model) -> Vec<&'m mut [f32]>;
    /// [`param_checksum`] of every weight (trained or not).
    fn checksum(&self, model: &Self::Model) -> u64;
    /// The micro-batch of training examples `idx`.
    fn micro(&self, idx: &[usize], cfg: &SftConfig) -> Self::Micro;
    /// Labelled and total tokens of a micro-batch.
    fn counts(&self, mb: &Self::Micro) -> (usize, usize);
    /// Forward and backward of this rank's share of `mb` for the loss
    /// `scale · Σ token losses`; gradients accumulate into `grads` (the flat trainable layout).
    fn micro_step<C: Communicator>(
        &self,
        model: &Self::Model,
        ws: &mut Self::Ws,
        grads: &mut [f32],
        mb: &Self::Micro,
        scale: f32,
        peers: Option<&Peers<'_, C>>,
    ) -> Result<LossStats>;
    /// NLL of the held-out set (`data.eval`), if there is one.
    fn eval(&self, model: &Self::Model) -> Result<Option<LossStats>>;
    /// The model folder's files (config, weights, tokenizer, preprocessor).
    fn model_files(&self, model: &Self::Model, tok: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>>;
    /// Adds the task's own fields to a step's metrics line.
    fn step_metrics(&self, _record: &mut serde_json::Value) {}
    /// The text decoder, for the evaluation hook (none for other families).
    fn text_model(model: &Self::Model) -> Option<&Qwen2>;
    /// The decoder the GPU path trains (the whole model, or Qwen2.5-VL's language model).
    fn decoder(model: &Self::Model) -> &Qwen2;
    /// [`SftTask::decoder`], mutable (the GPU path writes its weights back into it).
    fn decoder_mut(model: &mut Self::Model) -> &mut Qwen2;
    /// [`SftTask::micro_step`] with the decoder on the GPU (`gm`, this rank's device model):
    /// forward and backward of this rank's share of `mb`, gradients added into the device's;
    /// `mid` runs once, after the first forward pass (tests).
    #[allow(clippy::too_many_arguments)]
    fn gpu_micro_step<C: Communicator>(
        &self,
        model: &Self::Model,
        ws: &mut Self::Ws,
        gm: &mut GpuModel,
        mb: &Self::Micro,
        scale: f32,
        peers: Option<&Peers<'_, C>>,
        mid: &mut dyn FnMut(),
    ) -> Result<LossStats>;
    /// Video counters of the run, for the summary.
    fn video_stats(&self) -> Option<VideoRunStats> {
        None
    }
    /// Called once before the first step with the sampler where the run starts (after a
    /// resume's restore) and the steps left: a task that loads its data ahead follows the
    /// batches this sampler will give.
    fn follow_sampler(
        &self,
        _sampler: &BucketSampler,
        _model: &Self::Model,
        _cfg: &SftConfig,
        _steps: u64,
    ) -> Result<()> {
        Ok(())
    }
    /// Labelled tokens of `mb` that this rank's [`SftTask::micro_step`] dropped (a record whose
    /// video failed to decode when the step reached it), counted by one rank per replica; the
    /// step's loss is then the token mean over the tokens that remained.
    fn dropped_labels(&self, _mb: &Self::Micro) -> usize {
        0
    }
}

/// The text family: Qwen2 on chat JSONL, micro-batches of right-padded sequences.
pub(crate) struct TextTask {
    train: Vec<TokenizedExample>,
    /// The eval set, tokenized once (truncated to `data.max_len`).
    eval_set: Option<Vec<TokenizedExample>>,
    pad: u32,
}

impl SftTask for TextTask {
    type Model = Qwen2;
    type Ws = Workspace;
    type Micro = Batch;
    const NEEDS_COMM: bool = false;

    fn build(cfg: &SftConfig, tok: &Tokenizer) -> Result<Self> {
        let train_file = SftFile::read(&cfg.data.train)?;
        let train = tokenize_all(tok, &train_file, cfg.data.max_len)?;
        if train.is_empty() {
            bail!(
                "{}: no conversation has an assistant token within max_len = {}",
                cfg.data.train.display(),
                cfg.data.max_len
            );
        }
        let eval_set = match &cfg.data.eval {
            Some(p) => {
                let file = SftFile::read(p)?;
                let examples = tokenize_all(tok, &file, cfg.data.max_len)?;
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
        let pad = tok
            .pad_token_id()
            .context("the tokenizer has neither a pad nor an eos token")?;
        Ok(TextTask {
            train,
            eval_set,
            pad,
        })
    }

    fn sampler(&self, cfg: &SftConfig) -> BucketSampler {
        let lengths: Vec<usize> = self.train.iter().map(|e| e.len()).collect();
        BucketSampler::with_batching(
            &lengths,
            cfg.data.tokens_per_batch,
            cfg.data.seed,
            cfg.data.batching,
        )
    }

    fn init(&self, cfg: &SftConfig, tok: &Tokenizer) -> Result<Qwen2> {
        init_model(cfg, tok)
    }

    fn load(&self, dir: &Path) -> Result<Qwen2> {
        load_checkpoint(dir).with_context(|| format!("loading checkpoint {}", dir.display()))
    }

    fn check(&self, model: &Qwen2, cfg: &SftConfig, tok: &Tokenizer) -> Result<()> {
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
        Ok(())
    }

    fn replica(&self, model: &Qwen2) -> Result<Qwen2> {
        Ok(Qwen2::from_params(
            model.config.clone(),
            model.params.clone(),
        )?)
    }

    fn workspace(&self, model: &Qwen2, cfg: &SftConfig) -> Workspace {
        Workspace::new(&model.config, cfg.train.checkpoint)
    }

    fn param_groups(&self, model: &Qwen2) -> Vec<(usize, bool)> {
        model
            .layout
            .entries
            .iter()
            .map(|e| (e.range.len(), e.decay))
            .collect()
    }

    fn params_mut<'m>(&self, model: &'m mut Qwen2) -> Vec<&'m mut [f32]> {
        model.layout.split_mut(&mut model.params)
    }

    fn checksum(&self, model: &Qwen2) -> u64 {
        param_checksum(&model.params)
    }

    fn micro(&self, idx: &[usize], cfg: &SftConfig) -> Batch {
        let ex: Vec<_> = idx.iter().map(|&i| &self.train[i]).collect();
        make_batch(&ex, self.pad, cfg.data.max_len)
    }

    fn counts(&self, b: &Batch) -> (usize, usize) {
        (b.n_label_tokens(), b.b * b.t)
    }

    fn micro_step<C: Communicator>(
        &self,
        model: &Qwen2,
        ws: &mut Workspace,
        grads: &mut [f32],
        b: &Batch,
        scale: f32,
        peers: Option<&Peers<'_, C>>,
    ) -> Result<LossStats> {
        let Some((sp, r)) = peers.and_then(|p| p.sp.map(|sp| (sp, p.coords.sp_rank))) else {
            let tb = token_batch(b);
            let stats = model.forward(ws, &tb, &LocalAttention)?;
            model.backward(grads, ws, &tb, scale, &LocalAttention)?;
            return Ok(stats);
        };
        let sh = sp.set_seq_len(b.t)?;
        let shard = sh.shard_tokens(&b.input_ids, &b.targets, b.b, r, self.pad, IGNORE_INDEX)?;
        let tb = shard.batch();
        let stats = model.forward(ws, &tb, sp)?;
        model.backward(grads, ws, &tb, scale, sp)?;
        Ok(stats)
    }

    fn eval(&self, model: &Qwen2) -> Result<Option<LossStats>> {
        self.eval_set
            .as_ref()
            .map(|set| eval_examples(model, set, self.pad))
            .transpose()
    }

    fn model_files(&self, model: &Qwen2, tok: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>> {
        text_model_files(model, tok)
    }

    fn text_model(model: &Qwen2) -> Option<&Qwen2> {
        Some(model)
    }

    fn decoder(model: &Qwen2) -> &Qwen2 {
        model
    }

    fn decoder_mut(model: &mut Qwen2) -> &mut Qwen2 {
        model
    }

    fn gpu_micro_step<C: Communicator>(
        &self,
        _model: &Qwen2,
        _ws: &mut Workspace,
        gm: &mut GpuModel,
        b: &Batch,
        scale: f32,
        _peers: Option<&Peers<'_, C>>,
        mid: &mut dyn FnMut(),
    ) -> Result<LossStats> {
        let sp_rank = gm.sp_rank();
        let s = match gm.set_seq_len(b.t)? {
            None => {
                let tb = token_batch(b);
                let s = gm.forward(&tb)?;
                mid();
                gm.backward(&tb, scale)?;
                s
            }
            Some(sh) => {
                // Padded rows sit after every real token, so no real token attends to them and
                // their targets are ignored: any in-vocabulary id will do.
                let shard =
                    sh.shard_tokens(&b.input_ids, &b.targets, b.b, sp_rank, 0, IGNORE_INDEX)?;
                let tb = shard.batch();
                let s = gm.forward(&tb)?;
                mid();
                gm.backward(&tb, scale)?;
                s
            }
        };
        Ok(s)
    }
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
struct Shared<T> {
    tok: Tokenizer,
    ckpts: CheckpointDir,
    task: T,
    /// The sampler at the run's first step.
    sampler: BucketSampler,
    /// The optimizer state file of the checkpoint a resumed run starts from.
    resume_opt: Option<PathBuf>,
    start_step: u64,
    recent_losses: Vec<f32>,
}

impl<T: SftTask> Shared<T> {
    /// Loads everything and the starting model (fresh, or the newest checkpoint's on resume).
    fn load(cfg: &SftConfig, resume: bool) -> Result<(Self, T::Model)> {
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
        let task = T::build(cfg, &tok)?;
        let sampler = task.sampler(cfg);

        // Model, optimizer state, and where we start.
        let latest = if resume { ckpts.latest() } else { None };
        let (model, resumed) = match latest {
            Some(dir) => {
                let model = task.load(&dir)?;
                // Read by each replica: whole on the CPU, a GPU rank's part only (`Replica::new`).
                let opt_path = dir.join(OPTIMIZER_FILE);
                if !opt_path.is_file() {
                    bail!("{}: no optimizer state to resume from", opt_path.display());
                }
                let st_path = dir.join(TRAINER_STATE_FILE);
                let state = TrainerState::from_json_bytes(
                    &std::fs::read(&st_path)
                        .with_context(|| format!("reading {}", st_path.display()))?,
                )?;
                (model, Some((opt_path, state, dir)))
            }
            None => (task.init(cfg, &tok)?, None),
        };
        task.check(&model, cfg, &tok)?;
        let mut shared = Shared {
            tok,
            ckpts,
            task,
            sampler,
            resume_opt: None,
            start_step: 0,
            recent_losses: Vec::new(),
        };
        if let Some((opt_path, state, dir)) = resumed {
            let s: SamplerState = serde_json::from_value(state.data.clone())
                .context("trainer_state.json: bad sampler state")?;
            shared.sampler.restore(s)?;
            if state.config_hash != cfg.config_hash() {
                tracing::warn!(
                    "resuming {} with a config that differs from the one it was written with",
                    dir.display()
                );
            }
            shared.resume_opt = Some(opt_path);
            shared.start_step = state.step;
            shared.recent_losses = state.losses;
            tracing::info!(
                "resuming from {} at step {}",
                dir.display(),
                shared.start_step
            );
        }
        let steps = cfg.train.steps.saturating_sub(shared.start_step);
        shared
            .task
            .follow_sampler(&shared.sampler, &model, cfg, steps)?;
        Ok((shared, model))
    }
}

/// Trailing slots of the gradient buffer that ride along its all-reduce: this rank's loss sum
/// (as two f32, high and low part), its labelled-token count and the labelled tokens it dropped
/// ([`SftTask::dropped_labels`]).
const STATS: usize = 4;

/// One rank's model replica and everything it updates.
struct Replica<T: SftTask> {
    model: T::Model,
    opt: AdamW,
    ws: T::Ws,
    /// Sizes of the trainable tensors, in the gradient buffer's order.
    sizes: Vec<usize>,
    /// Gradients of the trainable tensors (Σ `sizes`), then [`STATS`] slots.
    grads: Vec<f32>,
    sampler: BucketSampler,
    /// When training on the GPU (the decoder, [`SftTask::decoder`]; one rank, or one of the sp
    /// ranks sharing GPU 0): the device-resident model, its fp32 master weights and AdamW moments. The host model's
    /// weights and `opt` are then refreshed from it by [`Replica::sync_host`] before
    /// evaluations, checkpoints and the end of the run.
    gpu: Option<GpuModel>,
}

impl<T: SftTask> Replica<T> {
    fn new(
        model: T::Model,
        shared: &Shared<T>,
        cfg: &SftConfig,
        gpu: Option<GpuPlace>,
    ) -> Result<Self> {
        let groups = shared.task.param_groups(&model);
        let sizes: Vec<usize> = groups.iter().map(|g| g.0).collect();
        let decay: Vec<bool> = groups.iter().map(|g| g.1).collect();
        let mut opt = AdamW::new(&sizes, &decay, cfg.train.adamw());
        let gpu = match gpu {
            Some(place) => {
                let q = T::decoder(&model);
                let mut gm = gpu_model(
                    place,
                    q.config.clone(),
                    &q.params,
                    cfg.train.checkpoint,
                    cfg.train.adamw(),
                    cfg.parallel.zero_stage(),
                )
                .context("putting the model on the GPU")?;
                // A resumed GPU rank reads only its part of the moments (its shard, or all of
                // them replicated) from the file; the host optimizer takes the whole state only
                // when `sync_host` gathers it.
                if let Some(path) = &shared.resume_opt {
                    let entries = q.layout.entry_ranges();
                    let (step, m, v) =
                        crate::checkpoint::optimizer_state_part(path, &entries, gm.opt_part())?;
                    gm.load_opt_moments(step, &m, &v)?;
                }
                Some(gm)
            }
            None => {
                if let Some(path) = &shared.resume_opt {
                    let bytes = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    opt.load_state(optimizer_state_from_bytes(&bytes)?)?;
                }
                None
            }
        };
        let n: usize = sizes.iter().sum();
        // On the GPU the host keeps no gradients.
        let grads = match gpu {
            Some(_) => Vec::new(),
            None => vec![0.0; n + STATS],
        };
        Ok(Replica {
            ws: shared.task.workspace(&model, cfg),
            grads,
            sizes,
            opt,
            model,
            sampler: shared.sampler.clone(),
            gpu,
        })
    }

    /// Copies the GPU's weights and optimizer state into `model.params` and `opt` when `keep`
    /// (no-op on the CPU). Every rank calls it at the same point: a sharded optimizer gathers
    /// its state over all of them, also where this rank keeps nothing.
    fn sync_host(&mut self, keep: bool) -> Result<()> {
        let Some(gm) = &mut self.gpu else {
            return Ok(());
        };
        if !keep && gm.opt_shard().is_none() {
            return Ok(());
        }
        if let Some((params, state)) = gm.gather_state(keep)? {
            T::decoder_mut(&mut self.model).params = params;
            self.opt.load_state(state)?;
        }
        Ok(())
    }
}

/// One optimizer step on the GPU: every micro-batch of this replica (r, r + dp, … for replica
/// r of dp, as the CPU ranks take them) forward and backward into the fp32 gradients (loss
/// scaled by 1 / labelled tokens of the whole step; [`SftTask::gpu_micro_step`]), clipping and
/// AdamW there. Under sequence parallelism (the model's rank of its group) each micro-batch is
/// cut like the CPU ranks cut it
/// ([`Sharding::shard_tokens`](reel_parallel::Sharding::shard_tokens)) and this rank runs its
/// shard. The gradients, loss and token count are summed over the sequence-parallel group and
/// then the data-parallel group on the device before clipping, so every rank clips by the
/// global norm and steps alike.
#[allow(clippy::too_many_arguments)]
fn gpu_train_step<T: SftTask, C: Communicator>(
    task: &T,
    rep: &mut Replica<T>,
    batches: &[T::Micro],
    peers: Option<&Peers<'_, C>>,
    cfg: &SftConfig,
    lr: f32,
    at: &str,
    mid: &mut dyn FnMut(),
) -> Result<StepOut> {
    let Replica { model, ws, gpu, .. } = rep;
    let gm = gpu.as_mut().context("the GPU step needs a device model")?;
    let (labelled, tokens) = batches
        .iter()
        .map(|b| task.counts(b))
        .fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
    let scale = 1.0 / labelled.max(1) as f32;
    gm.zero_grads()?;
    let mut local = LossStats::default();
    let mut nop = || {};
    let (dp_rank, dp) = gm.dp_coords();
    for (i, b) in batches.iter().skip(dp_rank).step_by(dp).enumerate() {
        let m: &mut dyn FnMut() = if i == 0 { &mut *mid } else { &mut nop };
        let s = task
            .gpu_micro_step(model, ws, gm, b, scale, peers, m)
            .with_context(|| at.to_string())?;
        local.loss_sum += s.loss_sum;
        local.n_tokens += s.n_tokens;
    }
    let global = gm
        .all_reduce_grads(local)
        .with_context(|| format!("{at}: gradient all-reduce"))?;
    if global.n_tokens != labelled {
        bail!(
            "{at}: the ranks' shards hold {} labelled tokens, the step {labelled}",
            global.n_tokens
        );
    }
    let loss_sum = global.loss_sum;
    let grad_norm = gm.clip_grad_norm(cfg.train.grad_clip.max(0.0))?;
    let loss = (loss_sum / labelled.max(1) as f64) as f32;
    if !loss.is_finite() || !grad_norm.is_finite() {
        bail!("{at}: non-finite loss ({loss}) or gradient norm ({grad_norm})");
    }
    gm.adamw_step(lr)?;
    Ok(StepOut {
        loss,
        grad_norm,
        labelled,
        tokens,
    })
}

/// Splits a flat buffer into consecutive slices of `sizes`.
pub(crate) fn split_sizes<'a>(flat: &'a mut [f32], sizes: &[usize]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut rest = flat;
    for &n in sizes {
        let (head, tail) = rest.split_at_mut(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// A rank's place among the others: the world (gradients are all-reduced over all of it), its
/// sequence-parallel group (the vision encoder's MR-SP stage 1 runs over it; a group of one
/// when `sp = 1`) and, when `sp > 1`, its sequence-parallel attention over that group.
pub(crate) struct Peers<'a, C: Communicator> {
    pub(crate) rank: usize,
    pub(crate) dims: ParallelDims,
    pub(crate) coords: RankCoords,
    pub(crate) world: &'a C,
    pub(crate) group: &'a C,
    pub(crate) sp: Option<&'a SpAttention<C>>,
}

/// What one optimizer step did (the same on every rank).
struct StepOut {
    loss: f32,
    grad_norm: f32,
    /// Labelled and total tokens of the whole step (every rank's micro-batches).
    labelled: usize,
    tokens: usize,
}

/// One optimizer step over `batches`, all the micro-batches of the step (the same on every
/// rank): this rank's share forward and backward with the loss scaled by 1 / (labelled tokens of
/// the whole step), gradients summed over the world, clipped, and AdamW at `lr`. `at` names the
/// rank and step in errors; `poison` makes the local gradients non-finite (tests); `mid` runs
/// after the first micro-batch's forward pass (tests).
#[allow(clippy::too_many_arguments)]
fn train_step<T: SftTask, C: Communicator>(
    task: &T,
    rep: &mut Replica<T>,
    batches: &[T::Micro],
    peers: Option<&Peers<'_, C>>,
    cfg: &SftConfig,
    lr: f32,
    at: &str,
    poison: bool,
    mid: &mut dyn FnMut(),
) -> Result<StepOut> {
    if rep.gpu.is_some() {
        if poison {
            bail!("{at}: non-finite loss (NaN) or gradient norm (NaN) (poisoned step)");
        }
        return gpu_train_step(task, rep, batches, peers, cfg, lr, at, mid);
    }
    let (labelled, tokens) = batches
        .iter()
        .map(|b| task.counts(b))
        .fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
    let scale = 1.0 / labelled.max(1) as f32;
    let n = rep.grads.len() - STATS;
    rep.grads.fill(0.0);
    let (dp, dp_rank) = peers.map_or((1, 0), |p| (p.dims.dp(), p.coords.dp_rank));
    let mut local = LossStats::default();
    let mut dropped = 0;
    for (i, b) in batches.iter().skip(dp_rank).step_by(dp).enumerate() {
        let s = task
            .micro_step(
                &rep.model,
                &mut rep.ws,
                &mut rep.grads[..n],
                b,
                scale,
                peers,
            )
            .with_context(|| at.to_string())?;
        if i == 0 {
            mid();
        }
        local.loss_sum += s.loss_sum;
        local.n_tokens += s.n_tokens;
        dropped += task.dropped_labels(b);
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
            rep.grads[n + 3] = dropped as f32;
            p.world
                .all_reduce_sum(&mut rep.grads)
                .with_context(|| format!("{at}: gradient all-reduce"))?;
            let counted = rep.grads[n + 2] as f64;
            dropped = rep.grads[n + 3] as usize;
            // Exact below 2^24; a mismatch means the shards lost or duplicated tokens.
            if counted < (1u64 << 24) as f64 && counted as usize + dropped != labelled {
                bail!(
                    "{at}: the ranks' shards hold {counted} labelled tokens ({dropped} dropped), \
                     the step {labelled}"
                );
            }
            rep.grads[n] as f64 + rep.grads[n + 1] as f64
        }
    };
    // Records dropped mid-step: the loss is the mean over the tokens that remained, so the
    // gradients (scaled by 1 / all the step's tokens) are rescaled to 1 / the kept ones.
    let kept = labelled - dropped.min(labelled);
    if dropped > 0 && kept > 0 {
        let r = labelled as f32 / kept as f32;
        rep.grads[..n].iter_mut().for_each(|g| *g *= r);
    }
    let labelled = kept;
    let grads = &mut rep.grads[..n];
    let grad_norm = {
        let mut g = split_sizes(grads, &rep.sizes);
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
        let mut p = task.params_mut(&mut rep.model);
        let g = split_sizes(grads, &rep.sizes);
        let ro: Vec<&[f32]> = g.iter().map(|s| &**s).collect();
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
    /// Every process's `checksum`, in rank order, when the rank is one process of a launched
    /// world (gathered over NCCL).
    world_checksums: Option<Vec<u64>>,
}

/// FNV-1a over the parameters' bit patterns, a word at a time: equal iff the replicas are
/// (bit-)identical, up to hash collisions. `seed` chains buffers (start from [`FNV_SEED`]).
pub(crate) fn param_checksum_from(seed: u64, params: &[f32]) -> u64 {
    params.iter().fold(seed, |h, &x| {
        (h ^ x.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The FNV-1a offset basis, where [`param_checksum_from`] starts.
pub(crate) const FNV_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// [`param_checksum_from`] of one buffer.
pub(crate) fn param_checksum(params: &[f32]) -> u64 {
    param_checksum_from(FNV_SEED, params)
}

/// The training loop of one rank (the only rank when `peers` is `None`). Every rank draws the
/// same micro-batches from its copy of the sampler, so all stay in step; only the lead writes.
/// With `gpu`, the rank trains on the GPU (the only rank, one of a sequence-parallel group of
/// in-process ranks, or this process's rank of a launched world). `mid_step` is the test hook
/// of [`MidStepHook`].
#[allow(clippy::too_many_arguments)]
fn rank_loop<T: SftTask, C: Communicator>(
    model: T::Model,
    shared: &Shared<T>,
    cfg: &SftConfig,
    peers: Option<&Peers<'_, C>>,
    lead: Option<Lead<'_, '_>>,
    stop_after: Option<u64>,
    poison_step: Option<u64>,
    gpu: Option<GpuPlace>,
    mut mid_step: Option<&mut MidStepHook<'_>>,
) -> Result<RankOut> {
    let task = &shared.task;
    let proc_rank = gpu.as_ref().and_then(GpuPlace::process_rank);
    let world_rank = peers.map(|p| p.rank).or(proc_rank);
    let at_rank = world_rank.map_or(String::new(), |r| format!("rank {r}: "));
    let mut rep = Replica::new(model, shared, cfg, gpu)?;
    // A device rank that fails aborts its sequence-parallel group, so the others stop at their
    // next exchange instead of waiting for it until the timeout.
    let result = (|| -> Result<RankOut> {
        let schedule = cfg.train.lr_schedule();
        let total = cfg.train.steps;
        let start_step = shared.start_step;
        // Replicas: the in-process grid's, else (one process of a launched grid) the device
        // model's data-parallel group's.
        let dp = match (peers, &rep.gpu) {
            (Some(p), _) => p.dims.dp(),
            (None, Some(gm)) => gm.dp_coords().1,
            (None, None) => 1,
        };
        let micro_batches = dp * cfg.train.grad_accum as usize;
        let mut lead = match lead {
            Some(l) => Some((
                MetricsWriter::open(&cfg.output.dir, start_step + 1)?,
                match l.progress {
                    Some(mode) => {
                        Progress::with_mode(mode, total, start_step, cfg.output.log_every)
                    }
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
            let at = match (peers, proc_rank) {
                (Some(p), _) if p.dims.world() > 1 => format!("rank {}, step {done}", p.rank),
                (_, Some(r)) => format!("rank {r}, step {done}"),
                _ => format!("step {done}"),
            };
            let t0 = Instant::now();
            let batches: Vec<T::Micro> = (0..micro_batches)
                .map(|_| task.micro(&rep.sampler.next_batch(), cfg))
                .collect();
            let lr = schedule.lr_at(cfg.train.lr, step);
            let poison = poison_step == Some(done);
            let mut mid = || {
                if let Some(h) = mid_step.as_mut() {
                    h(done)
                }
            };
            let out = train_step(
                task, &mut rep, &batches, peers, cfg, lr, &at, poison, &mut mid,
            )?;
            let loss = out.loss;
            ran += 1;
            let secs = t0.elapsed().as_secs_f64();
            let tokens_per_s = out.tokens as f64 / secs;
            losses.push(loss);
            recent_losses.push(loss);
            if recent_losses.len() > 100 {
                recent_losses.remove(0);
            }
            let last = done == total;
            let evaluate = (cfg.output.eval_every > 0 && done % cfg.output.eval_every == 0) || last;
            let save = (cfg.output.save_every > 0 && done % cfg.output.save_every == 0) || last;
            if evaluate || save {
                // The lead evaluates and saves from the host copy; the others take part in a
                // sharded optimizer's gather.
                rep.sync_host(lead.is_some())
                    .with_context(|| format!("{at}: reading the weights back from the GPU"))?;
            }
            let Some((metrics, progress, hook)) = lead.as_mut() else {
                continue;
            };
            let mut record = json!({
                "step": done, "loss": loss, "lr": lr, "grad_norm": out.grad_norm,
                "tokens": out.tokens, "label_tokens": out.labelled, "tokens_per_s": tokens_per_s,
                "step_s": secs, "epoch": rep.sampler.epoch(),
            });
            task.step_metrics(&mut record);
            progress.update(&StepReport {
                step: done,
                loss,
                lr,
                tokens_per_s,
            });

            if evaluate {
                let mut parts = Vec::new();
                if let Some(s) = task
                    .eval(&rep.model)
                    .with_context(|| format!("{at}: evaluation"))?
                {
                    record["eval_loss"] = json!(s.mean());
                    parts.push(format!("eval loss {:.4}", s.mean()));
                }
                if let (Some(hook), Some(m)) = (hook.as_mut(), T::text_model(&rep.model)) {
                    let extra = hook(done, m, &shared.tok)
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

            if save {
                let state = TrainerState {
                    step: done,
                    data: serde_json::to_value(rep.sampler.state())?,
                    rng: cfg.data.seed,
                    losses: recent_losses.clone(),
                    config_hash: cfg.config_hash(),
                };
                let files = with_trainer_files(
                    task.model_files(&rep.model, &shared.tok)?,
                    &rep.opt,
                    &state,
                )?;
                shared
                    .ckpts
                    .save(done, &files)
                    .with_context(|| format!("{at}: saving the checkpoint"))?;
            }
        }
        if let Some((_, progress, _)) = &lead {
            progress.finish();
        }
        rep.sync_host(true)
            .context("reading the weights back from the GPU")?;
        let checksum = task.checksum(&rep.model);
        let world_checksums = match (&rep.gpu, proc_rank) {
            (Some(gm), Some(_)) => Some(
                gm.all_gather_u64(checksum)
                    .context("comparing the replicas' checksums")?,
            ),
            _ => None,
        };
        Ok(RankOut {
            final_loss: losses
                .last()
                .or(recent_losses.last())
                .copied()
                .unwrap_or(f32::NAN),
            losses,
            ran,
            checksum,
            world_checksums,
        })
    })();
    if let (Err(e), Some(gm)) = (&result, &rep.gpu) {
        gm.abort_peers(&format!("{at_rank}{e:#}"));
    }
    result
}

/// Every rank's result in rank order, or, when any failed, the error that names the cause: the
/// first rank's own failure rather than a peer's report that another rank failed first
/// ([`is_secondary`]), else the first error.
pub(crate) fn all_ranks_ok<T>(results: impl IntoIterator<Item = Result<T>>) -> Result<Vec<T>> {
    let mut outs = Vec::new();
    let mut errors = Vec::new();
    for res in results {
        match res {
            Ok(o) => outs.push(o),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(outs);
    }
    let first = errors.iter().position(|e| !is_secondary(e)).unwrap_or(0);
    Err(errors.swap_remove(first))
}

/// Whether `e` only reports that another rank failed first.
pub(crate) fn is_secondary(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<CommError>(),
            Some(CommError::PeerFailed { .. } | CommError::PeerExited { .. })
        )
    }) || {
        let m = format!("{e:#}");
        // The host communicator's abort, or the device ranks' (`DeviceComm::abort`).
        m.contains("aborted because rank")
            || (m.contains("device communicator: rank") && m.contains(" aborted: "))
    }
}

/// The sp ranks' attention method for `model`'s decoder heads (`parallel.schedule`; Ulysses
/// needs u | H_kv, refused naming the key).
fn sp_method<T: SftTask>(cfg: &SftConfig, model: &T::Model) -> Result<SpMethod> {
    let c = &T::decoder(model).config;
    Ok(cfg
        .parallel
        .sp_method(c.num_attention_heads, c.num_key_value_heads)?)
}

/// The ranks of a `dp × sp` run, one thread each: every rank builds the same replica, rank
/// `dp_rank · sp + sp_rank` takes micro-batches `dp_rank, dp_rank + dp, …` and its token shard
/// of each; rank 0 writes. The first rank to fail (not one that only saw another fail) gives the
/// error. With `gpu`, the dp × sp ranks train on that GPU, each on its own stream.
fn run_ranks<T: SftTask>(
    model: &T::Model,
    shared: &Shared<T>,
    cfg: &SftConfig,
    opts: &mut RunOptions,
    dims: ParallelDims,
    gpu: Option<GpuHandle>,
) -> Result<Vec<RankOut>> {
    let par = &cfg.parallel;
    if dims.world() > 1 {
        tracing::info!(
            "training on {} in-process ranks{}: dp {} × sp {} ({} attention, overlap {})",
            dims.world(),
            if gpu.is_some() { " of one GPU" } else { "" },
            dims.dp(),
            dims.sp(),
            par.schedule,
            par.overlap
        );
    }
    // A world of one (the VLM's single rank) takes the GPU itself; sp ranks share it.
    let gpu_one = Mutex::new(None);
    let gpu_group = match gpu {
        Some(g) if dims.world() == 1 => {
            *gpu_one.lock().unwrap_or_else(|e| e.into_inner()) = Some(g);
            None
        }
        Some(g) => Some(gpu_sp_group(
            g,
            dims,
            sp_method::<T>(cfg, model)?,
            par.overlap_mode(),
            par.timeout(),
        )),
        None => None,
    };
    let (stop_after, poison_step, poison_rank, progress) = (
        opts.stop_after,
        opts.poison_step,
        opts.poison_rank,
        opts.progress,
    );
    let hook = Mutex::new(opts.eval_hook.as_mut());
    let method = sp_method::<T>(cfg, model)?;
    let results = InProcess::spawn(dims.world(), par.timeout(), |comm| -> Result<RankOut> {
        let rank = comm.rank();
        let coords = dims.coords(rank)?;
        let group = comm
            .split(coords.dp_rank, coords.sp_rank)
            .with_context(|| format!("rank {rank}: forming its sequence-parallel group"))?;
        let sp = if dims.sp() > 1 {
            let attn_group = comm
                .split(coords.dp_rank, coords.sp_rank)
                .with_context(|| format!("rank {rank}: forming its sequence-parallel group"))?;
            Some(
                SpAttention::with_method(attn_group, method.clone(), par.overlap_mode())
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
            group: &group,
            sp: sp.as_ref(),
        };
        let lead = (rank == 0).then(|| Lead {
            hook: hook.lock().unwrap_or_else(|e| e.into_inner()).take(),
            progress,
        });
        let poison = poison_step.filter(|_| rank == poison_rank);
        let replica = shared.task.replica(model)?;
        let gpu = match gpu_group.clone() {
            Some(group) => Some(GpuPlace::Sp {
                group,
                dp_rank: coords.dp_rank,
                sp_rank: coords.sp_rank,
            }),
            None => gpu_one
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .map(|g| GpuPlace::One(Box::new(g))),
        };
        rank_loop(
            replica,
            shared,
            cfg,
            Some(&peers),
            lead,
            stop_after,
            poison,
            gpu,
            None,
        )
    });
    let outs = all_ranks_ok(results)?;
    if let Some(r) = outs.iter().position(|o| o.checksum != outs[0].checksum) {
        bail!(
            "rank {r}'s parameters differ from rank 0's at the end of the run (replicas diverged)"
        );
    }
    Ok(outs)
}

/// Runs (or resumes) an SFT run described by `cfg`: the text decoder or, when `model.path` is a
/// Qwen2.5-VL checkpoint (config.json `model_type` = `qwen2_5_vl`), the vision-language model
/// on LongVideo-Reason records ([`crate::vl`]). On this thread when `parallel.dp ·
/// parallel.sp = 1` (the VLM: one in-process rank), else on that many in-process ranks.
pub fn run_sft(cfg: &SftConfig, opts: RunOptions) -> Result<SftSummary> {
    cfg.validate()?;
    match cfg.model_kind()? {
        ModelKind::Qwen2 => run::<TextTask>(cfg, opts),
        ModelKind::Qwen25VL => {
            if opts.eval_hook.is_some() {
                bail!("the evaluation hook takes a text model; this run trains a Qwen2.5-VL");
            }
            run::<crate::vl::VlTask>(cfg, opts)
        }
    }
}

fn run<T: SftTask>(cfg: &SftConfig, mut opts: RunOptions) -> Result<SftSummary> {
    let dims = cfg.parallel.dims()?;
    if let Some(l) = Launched::from_env()
        .map_err(anyhow::Error::msg)?
        .filter(|l| l.world > 1)
    {
        return run_process::<T>(cfg, opts, dims, &l);
    }
    let trained_tower = cfg.model_kind()? == ModelKind::Qwen25VL && cfg.video.train_vision;
    let cpu_only = gpu_unsupported(trained_tower);
    let gpu = match resolve(
        cfg.train.device,
        "train.device",
        BUILT_WITH_CUDA,
        cpu_only,
        open_gpu,
    )
    .map_err(anyhow::Error::msg)?
    {
        Chosen::Cuda(g) => {
            tracing::info!("training on the GPU: {}", describe(&g));
            Some(g)
        }
        Chosen::Cpu { note } => {
            if let Some(n) = note {
                tracing::info!("training on the CPU: {n}");
            }
            cfg.parallel.note_unsharded("the run trains on the CPU");
            None
        }
    };
    let (shared, model) = Shared::<T>::load(cfg, opts.resume)?;
    let outs = if dims.world() == 1 && !T::NEEDS_COMM {
        let lead = Lead {
            hook: opts.eval_hook.as_mut(),
            progress: opts.progress,
        };
        rank_loop::<T, InProcess>(
            model,
            &shared,
            cfg,
            None,
            Some(lead),
            opts.stop_after,
            opts.poison_step,
            gpu.map(|g| GpuPlace::One(Box::new(g))),
            opts.mid_step_hook.as_mut(),
        )
        .map(|o| vec![o])
    } else {
        run_ranks(&model, &shared, cfg, &mut opts, dims, gpu)
    };
    summarize(cfg, &shared, outs)
}

/// This process's rank of a world started by `reel launch`: one sequence-parallel rank on GPU
/// `LOCAL_RANK`, joined to the others over NCCL (module docs). Rank 0 writes; every process
/// returns the run's summary.
fn run_process<T: SftTask>(
    cfg: &SftConfig,
    mut opts: RunOptions,
    dims: ParallelDims,
    l: &Launched,
) -> Result<SftSummary> {
    let ordinal = process_gpu(
        "sft",
        l,
        dims,
        cfg.train.device,
        T::NEEDS_COMM,
        BUILT_WITH_CUDA,
        gpu_count,
    )
    .map_err(anyhow::Error::msg)?;
    let par = &cfg.parallel;
    let (shared, model) = Shared::<T>::load(cfg, opts.resume)?;
    let method = sp_method::<T>(cfg, &model)?;
    let proc = gpu_proc(
        l,
        dims,
        ordinal,
        method,
        par.overlap_mode(),
        par.timeout(),
        crate::device::ProcComms::default(),
    )?;
    tracing::info!(
        "rank {} of {} processes, one GPU each over NCCL: dp {} × sp {} ({} attention, overlap \
         {}) on {}",
        l.rank,
        l.world,
        dims.dp(),
        dims.sp(),
        par.schedule,
        par.overlap,
        proc.describe()
    );
    let lead = (l.rank == 0).then_some(Lead {
        hook: opts.eval_hook.as_mut(),
        progress: opts.progress,
    });
    let poison = opts.poison_step.filter(|_| l.rank == opts.poison_rank);
    let out = rank_loop::<T, InProcess>(
        model,
        &shared,
        cfg,
        None,
        lead,
        opts.stop_after,
        poison,
        Some(GpuPlace::Proc(Box::new(proc))),
        opts.mid_step_hook.as_mut(),
    )
    .with_context(|| format!("rank {} of {}", l.rank, l.world));
    let out = out.and_then(|o| {
        let all = o
            .world_checksums
            .clone()
            .unwrap_or_else(|| vec![o.checksum]);
        if let Some(r) = all.iter().position(|&c| c != all[0]) {
            bail!(
                "rank {r}'s parameters differ from rank 0's at the end of the run (replicas \
                 diverged)"
            );
        }
        Ok(vec![o])
    });
    summarize(cfg, &shared, out)
}

/// The summary of a run from its ranks' results (the first is rank 0's), or its error with the
/// last good checkpoint named.
fn summarize<T: SftTask>(
    cfg: &SftConfig,
    shared: &Shared<T>,
    outs: Result<Vec<RankOut>>,
) -> Result<SftSummary> {
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
        param_checksums: match &lead.world_checksums {
            Some(all) => all.clone(),
            None => outs.iter().map(|o| o.checksum).collect(),
        },
        video: shared.task.video_stats(),
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
