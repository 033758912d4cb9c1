//! The GRPO loop for the text decoder (Qwen2): rollouts with the paged-KV engine, rewards,
//! group-normalised advantages, DAPO dynamic sampling, the clipped policy loss with a k3 KL to a
//! frozen reference, AdamW — with the SFT trainer's config overrides, atomic checkpoints,
//! metrics JSONL and progress display.
//!
//! One step (DeepSeekMath's GRPO as verl runs it; DESIGN.md "MR-SP and the RL step"):
//!
//! 1. **Rollout.** Draw `data.prompts_per_step` prompts (a seeded shuffle per epoch, resumable),
//!    and roll out `grpo.group_size` samples of each with the engine over the current weights
//!    (the prompt prefilled once per group, samples forked); sample seeds are a hash of
//!    `(train.seed, step, round, group)`, so a run is reproducible and resumes exactly.
//! 2. **Scoring.** The configured reward on each decoded response against the record's answer;
//!    advantages within each group. With `grpo.dynamic_sampling`, groups whose rewards are all
//!    equal are dropped and more prompts are rolled out (at most
//!    `grpo.dynamic_sampling_max_rounds` rounds). Sequence rows are `prompt ++ response[..-1]`
//!    [B, T] with targets at the response tokens only.
//! 3. **Old and reference log-probabilities.** When a rollout batch gets more than one optimizer
//!    update (`train.mini_batches · train.ppo_epochs > 1`), `log π_old` is scored with
//!    [`Qwen2::token_logprobs`] in training mode before any update, on exactly the micro-batches
//!    the update uses, so the first update's ratio is 1 bit for bit. With a single update the
//!    old policy *is* the current one: that pass is skipped and `log π_old` is the update pass's
//!    own (detached) `log π`. `log π_ref` comes from a frozen copy of the initial weights
//!    (`model.path`), scored once per step; with β = `grpo.kl_coef` = 0 there is no reference
//!    model and no reference pass (counted in `ref_passes`).
//! 4. **Update.** For each of `ppo_epochs` epochs, for each of `mini_batches` contiguous
//!    mini-batches: every micro-batch (`train.micro_batch_seqs` rows) runs `token_logprobs` →
//!    [`grpo_loss`] (token counts global over the mini-batch) → `backward_logprobs`; then the
//!    gradient is clipped and AdamW steps at `grpo.lr`.
//!
//! `[parallel] dp · sp > 1` runs the same loop on that many in-process ranks ([`dist`]): groups
//! rolled out per replica (sequence-parallel prefill and sharded KV over the sp ranks), scoring
//! and update on balanced token shards through `SpAttention`, replicas splitting the
//! micro-batches, gradients all-reduced, identical AdamW. Videos in LongVideo-Reason prompt
//! records are ignored (text model; see [`crate::prompts`]).

mod dist;

use crate::checkpoint::{
    optimizer_state_from_bytes, CheckpointDir, TrainerState, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use crate::config::{
    apply_override, hash_hex, read_toml, ConfigError, OutputConfig, ParallelConfig,
};
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepReport};
use crate::prompts::PromptSet;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use reel_comm::{Communicator, InProcess};
use reel_data::{Tokenizer, IGNORE_INDEX};
use reel_model::generate::SamplingParams;
use reel_model::{load_checkpoint, CheckpointPolicy, Qwen2, TokenBatch, Workspace};
use reel_optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use reel_rl::{
    group_advantages, grpo_loss, AccuracyReward, DynamicSampler, FormatReward, GrpoConfig,
    GrpoMetrics, LossScale, PolicyTokens, Reward, RewardInput,
};
use reel_rollout::engine::Detokenizer;
use reel_rollout::{EngineConfig, GenerationParams};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A whole GRPO run: `[model]`, `[data]`, `[train]`, `[grpo]` (reel-rl's [`GrpoConfig`]),
/// `[parallel]` and `[output]` (the SFT trainer's sections).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoRunConfig {
    /// The policy's starting checkpoint (also the frozen reference).
    pub model: GrpoModelConfig,
    /// The prompt set and how prompts are drawn.
    pub data: PromptDataConfig,
    /// Steps, optimizer updates per rollout batch, micro-batching, AdamW moments.
    pub train: GrpoTrainConfig,
    /// GRPO: group size, clipping, KL, aggregation, sampling, rewards, learning rate.
    pub grpo: GrpoConfig,
    /// Rollout: stop strings.
    pub rollout: GrpoRolloutConfig,
    /// Data-parallel replicas × sequence-parallel ranks (in-process), the sp schedule and the
    /// ranks' timeout. Default dp = sp = 1.
    pub parallel: ParallelConfig,
    /// Run folder and checkpoint cadence. Default dir "runs/grpo".
    pub output: OutputConfig,
}

impl Default for GrpoRunConfig {
    fn default() -> Self {
        GrpoRunConfig {
            model: GrpoModelConfig::default(),
            data: PromptDataConfig::default(),
            train: GrpoTrainConfig::default(),
            grpo: GrpoConfig::default(),
            rollout: GrpoRolloutConfig::default(),
            parallel: ParallelConfig::default(),
            output: OutputConfig {
                dir: PathBuf::from("runs/grpo"),
                ..OutputConfig::default()
            },
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoModelConfig {
    /// Hugging Face checkpoint folder to start from (the SFT output); the reference model is
    /// this folder's weights, frozen. Required (default: empty).
    pub path: PathBuf,
    /// Folder holding tokenizer.json. Default: `path`.
    pub tokenizer: Option<PathBuf>,
}

/// `[rollout]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoRolloutConfig {
    /// Strings that end a response once its decoded text contains one (the response keeps it),
    /// besides the end-of-sequence tokens, e.g. `["</answer>"]`. Default: none.
    pub stop: Vec<String>,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptDataConfig {
    /// Prompt JSONL: LongVideo-Reason records or `{"prompt"|"messages", "answer",
    /// "problem_type"?}`. Required (default: empty).
    pub prompts: PathBuf,
    /// Prompts (groups) per step. ≥ 1. Default 8.
    pub prompts_per_step: usize,
    /// Longest prompt in tokens; longer ones are refused with their line. Default 1024.
    pub max_prompt_len: usize,
    /// Seed of the prompt order (reshuffled each epoch). Default 0.
    pub seed: u64,
}

impl Default for PromptDataConfig {
    fn default() -> Self {
        PromptDataConfig {
            prompts: PathBuf::new(),
            prompts_per_step: 8,
            max_prompt_len: 1024,
            seed: 0,
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoTrainConfig {
    /// RL steps (rollout batches). ≥ 1. Default 100.
    pub steps: u64,
    /// Optimizer updates per epoch over a rollout batch (contiguous mini-batches). ≥ 1.
    /// Default 1.
    pub mini_batches: usize,
    /// Passes over each rollout batch. ≥ 1. Default 1.
    pub ppo_epochs: usize,
    /// Sequences per forward/backward micro-batch. ≥ 1. Default 8.
    pub micro_batch_seqs: usize,
    /// Seed of the rollouts' sampling. Default 0.
    pub seed: u64,
    /// AdamW first-moment decay. Default 0.9.
    pub beta1: f32,
    /// AdamW second-moment decay. Default 0.999.
    pub beta2: f32,
    /// AdamW epsilon. Default 1e-8.
    pub eps: f32,
    /// Activation checkpointing: "none", "layer" or "remat". Default "remat".
    pub checkpoint: CheckpointPolicy,
}

impl Default for GrpoTrainConfig {
    fn default() -> Self {
        GrpoTrainConfig {
            steps: 100,
            mini_batches: 1,
            ppo_epochs: 1,
            micro_batch_seqs: 8,
            seed: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            checkpoint: CheckpointPolicy::Remat,
        }
    }
}

impl GrpoRunConfig {
    /// Reads a TOML file; errors name the path, line and column.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        read_toml(path.as_ref())
    }

    /// One `section.key=value` override (as `reel sft --set`).
    pub fn apply_override(&mut self, spec: &str) -> Result<(), ConfigError> {
        apply_override(self, spec)
    }

    /// Checks ranges and consistency; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, message: &str| -> Result<()> {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            }
            .into())
        };
        if self.model.path.as_os_str().is_empty() {
            return bad(
                "model.path",
                "required: the checkpoint folder to start from",
            );
        }
        if self.data.prompts.as_os_str().is_empty() {
            return bad("data.prompts", "required: the prompt JSONL");
        }
        if self.data.prompts_per_step == 0 {
            return bad("data.prompts_per_step", "must be at least 1");
        }
        if self.data.max_prompt_len == 0 {
            return bad("data.max_prompt_len", "must be at least 1");
        }
        let t = &self.train;
        for (key, n) in [
            ("train.steps", t.steps as usize),
            ("train.mini_batches", t.mini_batches),
            ("train.ppo_epochs", t.ppo_epochs),
            ("train.micro_batch_seqs", t.micro_batch_seqs),
        ] {
            if n == 0 {
                return bad(key, "must be at least 1");
            }
        }
        for (key, beta) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(key, "must be in [0, 1)");
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return bad("train.eps", "must be a positive number");
        }
        self.grpo.validate()?;
        if self.rollout.stop.iter().any(String::is_empty) {
            return bad("rollout.stop", "a stop string must not be empty");
        }
        self.parallel.dims()?;
        if self.output.dir.as_os_str().is_empty() {
            return bad("output.dir", "must not be empty");
        }
        Ok(())
    }

    /// The tokenizer folder.
    pub fn tokenizer_dir(&self) -> &Path {
        self.model.tokenizer.as_deref().unwrap_or(&self.model.path)
    }

    /// The config as TOML (saved as `config.toml` in the run folder).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("GrpoRunConfig always serialises to TOML")
    }

    /// Hash of what shapes the run's numbers (everything but `[output]`).
    pub fn config_hash(&self) -> String {
        let mut c = self.clone();
        c.output = OutputConfig::default();
        hash_hex(&c.to_toml())
    }

    /// The defaults as a TOML config, with a header saying how to use it.
    pub fn documented_default() -> String {
        format!(
            "# reel GRPO run configuration; every key is optional except model.path and \
             data.prompts.\n# Values shown are the defaults (each documented on its field in \
             reel-train's grpo.rs\n# and reel-rl's config.rs). Override: --set grpo.lr=1e-5\n\n{}",
            GrpoRunConfig::default().to_toml()
        )
    }
}

/// How a run is driven (beyond its config).
#[derive(Default)]
pub struct GrpoOptions {
    /// Continue from the newest checkpoint in `output.dir`.
    pub resume: bool,
    /// Progress display; default: a bar on a terminal, log lines otherwise.
    pub progress: Option<ProgressMode>,
    /// Stop after this many steps of this invocation.
    pub stop_after: Option<u64>,
    /// Test hook: make the loss of this (1-based) step non-finite.
    #[doc(hidden)]
    pub poison_step: Option<u64>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct GrpoSummary {
    /// Steps completed (counting those before a resume).
    pub steps: u64,
    /// The metrics record of every step this invocation ran.
    pub records: Vec<serde_json::Value>,
    /// Reference-model scoring passes run (0 when β = 0).
    pub ref_passes: u64,
    /// Old-policy scoring passes run (0 with a single update per rollout batch).
    pub old_passes: u64,
    /// The last checkpoint (an HF model folder).
    pub final_model_dir: PathBuf,
    /// The last step's trained samples: (prompt ++ response ids, prompt length, advantage).
    pub last_batch: Vec<(Vec<u32>, usize, f32)>,
}

/// The prompt order: a seeded shuffle per epoch; its state is (epoch, position).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct PromptSampler {
    n: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    #[serde(skip)]
    order: Vec<usize>,
}

impl PromptSampler {
    fn new(n: usize, seed: u64) -> Self {
        let mut s = PromptSampler {
            n,
            seed,
            epoch: 0,
            pos: 0,
            order: Vec::new(),
        };
        s.shuffle();
        s
    }
    fn shuffle(&mut self) {
        self.order = (0..self.n).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(self.seed, self.epoch, 0, 0));
        self.order.shuffle(&mut rng);
    }
    fn next(&mut self) -> usize {
        if self.pos == self.n {
            self.epoch += 1;
            self.pos = 0;
            self.shuffle();
        }
        self.pos += 1;
        self.order[self.pos - 1]
    }
}

/// SplitMix64 over the parts: a seed per (run seed, step, round, group).
fn mix(seed: u64, a: u64, b: u64, c: u64) -> u64 {
    let mut x = seed;
    for v in [a, b, c] {
        x = x.wrapping_add(v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    }
    x
}

/// One rolled-out sample.
#[derive(Clone, Debug)]
struct Sample {
    /// Prompt then response tokens.
    ids: Vec<u32>,
    prompt_len: usize,
    advantage: f32,
}

/// A micro-batch of samples as model rows: `prompt ++ response[..-1]`, targets at response
/// tokens only, right-padded (or one rank's token shard of them, [`dist::shard_rows`]).
#[derive(Clone)]
struct Rows {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    positions: Vec<u32>,
    mask: Vec<bool>,
    advantages: Vec<f32>,
    b: usize,
    t: usize,
    /// T of the whole rows (= t unless sharded).
    global_t: usize,
    /// Response tokens of each whole sequence when these rows are a shard; None otherwise.
    seq_tokens: Option<Vec<usize>>,
}

impl Rows {
    fn new(samples: &[&Sample], pad: u32) -> Self {
        let b = samples.len();
        let t = samples
            .iter()
            .map(|s| s.ids.len() - 1)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut r = Rows {
            tokens: vec![pad; b * t],
            targets: vec![IGNORE_INDEX; b * t],
            positions: (0..b).flat_map(|_| 0..t as u32).collect(),
            mask: vec![false; b * t],
            advantages: samples.iter().map(|s| s.advantage).collect(),
            b,
            t,
            global_t: t,
            seq_tokens: None,
        };
        for (row, s) in samples.iter().enumerate() {
            let n = s.ids.len() - 1;
            r.tokens[row * t..row * t + n].copy_from_slice(&s.ids[..n]);
            for i in s.prompt_len.saturating_sub(1)..n {
                r.targets[row * t + i] = s.ids[i + 1] as i32;
                r.mask[row * t + i] = true;
            }
        }
        r
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
    fn n_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

fn adamw(cfg: &GrpoRunConfig) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.grpo.lr,
        beta1: cfg.train.beta1,
        beta2: cfg.train.beta2,
        eps: cfg.train.eps,
        weight_decay: cfg.grpo.weight_decay,
    }
}

fn mean_std(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Runs (or resumes) a GRPO run described by `cfg`: on this thread when `parallel.dp ·
/// parallel.sp = 1`, else on that many in-process ranks.
pub fn run_grpo(cfg: &GrpoRunConfig, opts: GrpoOptions) -> Result<GrpoSummary> {
    cfg.validate()?;
    if cfg.parallel.world() > 1 {
        return dist::run_ranks(cfg, &opts);
    }
    Ok(grpo_rank::<InProcess>(cfg, &opts, None)?.0)
}

/// The GRPO loop of one rank (the only one when `peers` is None); only rank 0 writes. Returns
/// the summary and the final policy.
fn grpo_rank<C: Communicator>(
    cfg: &GrpoRunConfig,
    opts: &GrpoOptions,
    peers: Option<&dist::Peers<'_, C>>,
) -> Result<(GrpoSummary, Qwen2)> {
    let lead = peers.is_none_or(|p| p.rank == 0);
    let tok_dir = cfg.tokenizer_dir();
    let tok = Tokenizer::from_dir(tok_dir)
        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let prompts = PromptSet::read(&cfg.data.prompts, &tok, cfg.data.max_prompt_len)?;
    if prompts.ignored_videos > 0 && lead {
        tracing::warn!(
            "{}: {} records name videos; the text decoder sees only their questions (videos \
             ignored)",
            prompts.path.display(),
            prompts.ignored_videos
        );
    }
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if lead {
        crate::checkpoint::write_atomic(out.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    let ckpts = CheckpointDir::open(out, cfg.output.keep_last)?;
    if !opts.resume {
        if let Some(old) = ckpts.latest() {
            bail!(
                "{} holds checkpoints of an earlier run (newest {}); pass --resume to continue \
                 it, or choose another output.dir",
                ckpts.root().display(),
                old.display()
            );
        }
    }
    let init_dir = &cfg.model.path;
    let load = |d: &Path| load_checkpoint(d).with_context(|| format!("loading {}", d.display()));
    let reference = if cfg.grpo.needs_reference() {
        Some(load(init_dir)?)
    } else {
        None
    };
    let sizes_of = |m: &Qwen2| -> (Vec<usize>, Vec<bool>) {
        (
            m.layout.entries.iter().map(|e| e.range.len()).collect(),
            m.layout.entries.iter().map(|e| e.decay).collect(),
        )
    };
    let mut sampler = PromptSampler::new(prompts.items.len(), cfg.data.seed);
    let mut start_step = 0;
    let mut recent: Vec<f32> = Vec::new();
    let resumed = if opts.resume { ckpts.latest() } else { None };
    let (mut model, mut opt) = match &resumed {
        Some(dir) => {
            let model = load(dir)?;
            let (sizes, decay) = sizes_of(&model);
            let mut opt = AdamW::new(&sizes, &decay, adamw(cfg));
            let p = dir.join(OPTIMIZER_FILE);
            opt.load_state(optimizer_state_from_bytes(
                &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            )?)?;
            let p = dir.join(TRAINER_STATE_FILE);
            let st = TrainerState::from_json_bytes(
                &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            )?;
            let s: PromptSampler = serde_json::from_value(st.data["prompts"].clone())
                .with_context(|| format!("{}: bad prompt sampler state", p.display()))?;
            if s.n != prompts.items.len() {
                bail!(
                    "{}: the checkpoint was written for {} prompts, {} has {}",
                    p.display(),
                    s.n,
                    prompts.path.display(),
                    prompts.items.len()
                );
            }
            sampler = PromptSampler {
                order: Vec::new(),
                ..s
            };
            sampler.shuffle();
            if st.data["reference"].as_str() != Some(&init_dir.display().to_string()) {
                tracing::warn!(
                    "{} was written with reference {}, resuming with {}",
                    dir.display(),
                    st.data["reference"],
                    init_dir.display()
                );
            }
            if st.config_hash != cfg.config_hash() {
                tracing::warn!("resuming {} with a different config", dir.display());
            }
            start_step = st.step;
            recent = st.losses;
            tracing::info!("resuming from {} at step {start_step}", dir.display());
            (model, opt)
        }
        None => {
            let model = load(init_dir)?;
            let (sizes, decay) = sizes_of(&model);
            let opt = AdamW::new(&sizes, &decay, adamw(cfg));
            (model, opt)
        }
    };
    if tok.vocab_size() > model.config.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tok.vocab_size(),
            model.config.vocab_size
        );
    }
    let pad = tok
        .pad_token_id()
        .context("the tokenizer has neither a pad nor an eos token")?;
    let stop = crate::accuracy::stop_token_ids(&tok, &model);
    let detok: Detokenizer = {
        let tok = tok.clone();
        Arc::new(move |ids: &[u32]| tok.decode(ids, true).unwrap_or_default())
    };
    let reward = cfg.grpo.reward.build();
    let acc_check = AccuracyReward {
        rel_tol: cfg.grpo.reward.number_rel_tol,
        abs_tol: cfg.grpo.reward.number_abs_tol,
    };
    let g = cfg.grpo.group_size;
    let loss_cfg = cfg.grpo.policy_loss();
    let updates = cfg.train.mini_batches * cfg.train.ppo_epochs;
    let mut ws = Workspace::new(&model.config, cfg.train.checkpoint);
    let mut grads = vec![0.0f32; model.params.len()];
    let mut metrics = if lead {
        Some(MetricsWriter::open(out, start_step + 1)?)
    } else {
        None
    };
    let progress = lead.then(|| match opts.progress {
        Some(mode) => Progress::with_mode(mode, cfg.train.steps, start_step, cfg.output.log_every),
        None => Progress::new(cfg.train.steps, start_step, cfg.output.log_every),
    });
    let mut summary = GrpoSummary {
        steps: start_step,
        records: Vec::new(),
        ref_passes: 0,
        old_passes: 0,
        final_model_dir: resumed.clone().unwrap_or_else(|| init_dir.clone()),
        last_batch: Vec::new(),
    };
    let mut ran = 0u64;
    let result: Result<()> = (|| {
        for step in start_step..cfg.train.steps {
            if opts.stop_after.is_some_and(|n| ran >= n) {
                break;
            }
            let done = step + 1;
            let at = format!("step {done}");
            let t_step = Instant::now();

            // 1–2. Rollout and scoring, round by round under dynamic sampling.
            let mut rollout_s = 0.0;
            let mut scoring_s = 0.0;
            let (mut prefill, mut decode) = (0u64, 0u64);
            let mut all_rewards = Vec::new();
            let (mut acc_n, mut fmt_n) = (0usize, 0usize);
            let (mut len_sum, mut len_max) = (0usize, 0usize);
            let max_rounds = if cfg.grpo.dynamic_sampling {
                cfg.grpo.dynamic_sampling_max_rounds
            } else {
                1
            };
            let mut dyn_s: Option<DynamicSampler<Vec<Sample>>> = cfg
                .grpo
                .dynamic_sampling
                .then(|| DynamicSampler::new(cfg.data.prompts_per_step, max_rounds));
            let mut plain: Vec<(Vec<Sample>, Vec<f32>)> = Vec::new();
            let mut rolled_groups = 0usize;
            let mut round = 0u64;
            loop {
                let kept = dyn_s.as_ref().map_or(0, |d| d.kept());
                let want = cfg.data.prompts_per_step - kept.min(cfg.data.prompts_per_step);
                let drawn: Vec<usize> = (0..want).map(|_| sampler.next()).collect();
                let t0 = Instant::now();
                let longest = drawn
                    .iter()
                    .map(|&i| prompts.items[i].ids.len())
                    .max()
                    .unwrap_or(0);
                let per_seq = (longest + cfg.grpo.max_response_tokens)
                    .min(model.config.max_position_embeddings);
                let block_size = 16;
                let ecfg = EngineConfig {
                    block_size,
                    num_blocks: drawn.len() * (g + 1) * (per_seq.div_ceil(block_size) + 1) + 8,
                    ..EngineConfig::default()
                };
                let mut requests = Vec::with_capacity(drawn.len());
                for (k, &i) in drawn.iter().enumerate() {
                    let params = GenerationParams {
                        sampling: SamplingParams {
                            temperature: cfg.grpo.temperature,
                            top_p: cfg.grpo.top_p,
                            top_k: cfg.grpo.top_k,
                            seed: mix(cfg.train.seed, done, round, k as u64),
                        },
                        max_new_tokens: cfg.grpo.max_response_tokens,
                        stop_token_ids: stop.clone(),
                        stop_strings: cfg.rollout.stop.clone(),
                    };
                    requests.push(dist::Request {
                        ids: &prompts.items[i].ids,
                        params,
                        name: &prompts.items[i].problem_id,
                    });
                }
                let (outs, pre, dec) =
                    dist::rollout(&model, peers, ecfg, g, &requests, &detok, &at)?;
                prefill += pre;
                decode += dec;
                rollout_s += t0.elapsed().as_secs_f64();

                let t1 = Instant::now();
                let mut groups = Vec::new();
                for (&i, out) in drawn.iter().zip(&outs) {
                    let item = &prompts.items[i];
                    let mut samples = Vec::with_capacity(g);
                    let mut rewards = Vec::with_capacity(g);
                    for s_ids in out {
                        let text = tok.decode(s_ids, true)?;
                        let r = reward.score(&RewardInput {
                            prompt: &item.text,
                            response: &text,
                            answer: &item.answer,
                            problem_id: &item.problem_id,
                        });
                        if let Some(w) = r.warning.as_ref().filter(|_| lead) {
                            tracing::warn!("{at}: reward of {}: {w}", item.problem_id);
                        }
                        acc_n += acc_check.is_correct(&text, &item.answer) as usize;
                        fmt_n += FormatReward::matches(&text) as usize;
                        len_sum += s_ids.len();
                        len_max = len_max.max(s_ids.len());
                        let mut ids = item.ids.clone();
                        ids.extend_from_slice(s_ids);
                        rewards.push(r.value);
                        samples.push(Sample {
                            ids,
                            prompt_len: item.ids.len(),
                            advantage: 0.0,
                        });
                    }
                    all_rewards.extend_from_slice(&rewards);
                    groups.push((samples, rewards));
                }
                rolled_groups += groups.len();
                match &mut dyn_s {
                    Some(d) => d.add_round(groups),
                    // Every group is kept (an all-equal group has zero advantage).
                    None => plain.extend(groups),
                }
                scoring_s += t1.elapsed().as_secs_f64();
                round += 1;
                if !dyn_s.as_ref().is_some_and(|d| d.needs_more()) {
                    break;
                }
            }
            let (kept, dropped, rounds) = match dyn_s {
                Some(d) => {
                    let b = d.finish();
                    (b.groups, b.dropped, b.rounds)
                }
                None => (plain, 0, 1),
            };
            let groups_kept = kept.len();
            let t1 = Instant::now();
            let mut samples: Vec<Sample> = Vec::new();
            for (group, rewards) in kept {
                let adv = group_advantages(&rewards, g, cfg.grpo.advantage_scaling)?;
                for (mut s, a) in group.into_iter().zip(adv) {
                    s.advantage = a;
                    samples.push(s);
                }
            }
            scoring_s += t1.elapsed().as_secs_f64();

            // 3–4. Old/reference log-probabilities, then the updates.
            let t2 = Instant::now();
            let per_mini = samples.len().div_ceil(cfg.train.mini_batches).max(1);
            let minis: Vec<Vec<Rows>> = samples
                .chunks(per_mini)
                .map(|mb| {
                    mb.chunks(cfg.train.micro_batch_seqs)
                        .map(|c| Rows::new(&c.iter().collect::<Vec<_>>(), pad))
                        .collect()
                })
                .collect();
            // This rank's micro-batches (every dp-th), each its token shard under sp.
            let locals: Vec<Vec<Rows>> = minis
                .iter()
                .map(|mb| {
                    mb.iter()
                        .enumerate()
                        .filter(|(j, _)| dist::is_mine(*j, peers))
                        .map(|(_, rows)| dist::shard_rows(rows, peers, pad))
                        .collect::<Result<_>>()
                })
                .collect::<Result<_>>()?;
            let score = |m: &Qwen2, ws: &mut Workspace, rows: &Rows| -> Result<Vec<f32>> {
                let mut lp = vec![0.0; rows.b * rows.t];
                m.token_logprobs(
                    ws,
                    &rows.batch(),
                    dist::attention(rows, peers)?,
                    cfg.grpo.temperature,
                    &mut lp,
                    None,
                )?;
                Ok(lp)
            };
            let mut refs: Vec<Vec<Vec<f32>>> = Vec::new();
            if let Some(r) = &reference {
                for mb in &locals {
                    refs.push(
                        mb.iter()
                            .map(|rows| score(r, &mut ws, rows))
                            .collect::<Result<_>>()?,
                    );
                }
                summary.ref_passes += 1;
            }
            let mut olds: Vec<Vec<Vec<f32>>> = Vec::new();
            if updates > 1 {
                for mb in &locals {
                    olds.push(
                        mb.iter()
                            .map(|rows| score(&model, &mut ws, rows))
                            .collect::<Result<_>>()?,
                    );
                }
                summary.old_passes += 1;
            }
            let mut m_all = GrpoMetrics::default();
            let mut loss_sum = 0.0f64;
            let mut n_updates = 0usize;
            let mut grad_norm = 0.0f32;
            let layout = model.layout.clone();
            for _epoch in 0..cfg.train.ppo_epochs {
                for (k, mb) in minis.iter().enumerate() {
                    let scale = LossScale {
                        global_tokens: mb.iter().map(Rows::n_tokens).sum(),
                        global_seqs: mb.iter().map(|r| r.b).sum(),
                    };
                    grads.fill(0.0);
                    let mut loss = 0.0f64;
                    for (j, rows) in locals[k].iter().enumerate() {
                        let n = rows.b * rows.t;
                        let tb = rows.batch();
                        let mut lp = vec![0.0; n];
                        let mut ent = vec![0.0; n];
                        model
                            .token_logprobs(
                                &mut ws,
                                &tb,
                                dist::attention(rows, peers)?,
                                cfg.grpo.temperature,
                                &mut lp,
                                Some(&mut ent),
                            )
                            .with_context(|| format!("{at}: scoring"))?;
                        let old = if updates > 1 { &olds[k][j] } else { &lp };
                        let x = PolicyTokens {
                            b: rows.b,
                            t: rows.t,
                            logp: &lp,
                            old_logp: old,
                            ref_logp: refs.get(k).map(|r| r[j].as_slice()),
                            entropy: Some(&ent),
                            mask: &rows.mask,
                            advantages: &rows.advantages,
                            seq_tokens: rows.seq_tokens.as_deref(),
                        };
                        let mut dlogp = vec![0.0; n];
                        let (l, m) = grpo_loss(&x, &loss_cfg, scale, &mut dlogp)?;
                        loss += l;
                        m_all.merge(&m);
                        model
                            .backward_logprobs(
                                &mut grads,
                                &mut ws,
                                &tb,
                                &dlogp,
                                dist::attention(rows, peers)?,
                            )
                            .with_context(|| format!("{at}: backward"))?;
                    }
                    if opts.poison_step == Some(done) {
                        loss = f64::NAN;
                    }
                    let loss = dist::reduce_update(peers, &mut grads, loss, &at)?;
                    grad_norm = {
                        let mut gs = layout.split_mut(&mut grads);
                        if cfg.grpo.grad_clip > 0.0 {
                            clip_grad_norm(&mut gs, cfg.grpo.grad_clip)
                        } else {
                            let ro: Vec<&[f32]> = gs.iter().map(|s| &**s).collect();
                            global_grad_norm(&ro)
                        }
                    };
                    if !loss.is_finite() || !grad_norm.is_finite() {
                        bail!("{at}: non-finite loss ({loss}) or gradient norm ({grad_norm})");
                    }
                    loss_sum += loss;
                    n_updates += 1;
                    let mut p = layout.split_mut(&mut model.params);
                    let mut gs = layout.split_mut(&mut grads);
                    let ro: Vec<&[f32]> = gs.iter_mut().map(|s| &**s).collect();
                    opt.step(&mut p, &ro, cfg.grpo.lr);
                }
            }
            let m_all = dist::merge_metrics(peers, m_all, &at)?;
            let update_s = t2.elapsed().as_secs_f64();
            summary.last_batch = samples
                .iter()
                .map(|s| (s.ids.clone(), s.prompt_len, s.advantage))
                .collect();
            ran += 1;
            summary.steps = done;
            // Mean over the updates run (none when no group was kept).
            let loss = (loss_sum / n_updates.max(1) as f64) as f32;
            recent.push(loss);
            if recent.len() > 100 {
                recent.remove(0);
            }
            let s = m_all.summary();
            let (r_mean, r_std) = mean_std(&all_rewards);
            let n_samples = all_rewards.len().max(1) as f64;
            let step_s = t_step.elapsed().as_secs_f64();
            let record = json!({
                "step": done, "loss": loss, "lr": cfg.grpo.lr, "grad_norm": grad_norm,
                "reward_mean": r_mean, "reward_std": r_std,
                "accuracy": acc_n as f64 / n_samples, "format_rate": fmt_n as f64 / n_samples,
                "pg_loss": s.pg_loss, "kl": s.kl, "entropy": s.entropy,
                "clip_frac_low": s.clip_frac_low, "clip_frac_high": s.clip_frac_high,
                "dual_clip_frac": s.dual_clip_frac, "ratio_mean": s.ratio_mean,
                "ratio_min": s.ratio_min, "ratio_max": s.ratio_max,
                "response_len_mean": len_sum as f64 / n_samples, "response_len_max": len_max,
                "response_tokens": s.tokens,
                "groups_rolled": rolled_groups, "groups_kept": groups_kept,
                "groups_dropped": dropped, "rollout_rounds": rounds,
                "rollout_s": rollout_s, "scoring_s": scoring_s, "update_s": update_s,
                "step_s": step_s, "prefill_tokens": prefill, "decode_tokens": decode,
                "ref_passes": summary.ref_passes, "old_passes": summary.old_passes,
                "updates": n_updates,
                "epoch": sampler.epoch,
            });
            if let Some(progress) = &progress {
                progress.update(&StepReport {
                    step: done,
                    loss,
                    lr: cfg.grpo.lr,
                    tokens_per_s: decode as f64 / rollout_s.max(1e-9),
                });
            }
            if let Some(metrics) = &mut metrics {
                metrics.write(&record)?;
            }
            summary.records.push(record);
            let last = done == cfg.train.steps;
            if lead && ((cfg.output.save_every > 0 && done % cfg.output.save_every == 0) || last) {
                let state = TrainerState {
                    step: done,
                    data: json!({
                        "prompts": sampler,
                        "reference": init_dir.display().to_string(),
                    }),
                    rng: cfg.train.seed,
                    losses: recent.clone(),
                    config_hash: cfg.config_hash(),
                };
                let files = crate::sft::checkpoint_files(&model, &tok, &opt, &state)?;
                summary.final_model_dir = ckpts
                    .save(done, &files)
                    .with_context(|| format!("{at}: saving the checkpoint"))?;
            }
        }
        Ok(())
    })();
    if let Some(progress) = &progress {
        progress.finish();
    }
    result.map_err(|e| {
        let kept = match ckpts.latest() {
            Some(d) => d.display().to_string(),
            None => format!("none written yet in {}", out.display()),
        };
        anyhow::anyhow!("{e:#}; stopping with the last good checkpoint intact ({kept})")
    })?;
    Ok((summary, model))
}
