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
//!    model and no reference pass (counted in `ref_passes`). Rewards and these passes are the
//!    step's `scoring_s`.
//! 4. **Update.** For each of `ppo_epochs` epochs, for each of `mini_batches` contiguous
//!    mini-batches: every micro-batch (`train.micro_batch_seqs` rows) runs `token_logprobs` →
//!    [`grpo_loss`] (token counts global over the mini-batch) → `backward_logprobs`; then the
//!    gradient is clipped and AdamW steps at `grpo.lr`.
//!
//! Passes 3 and 4 run each micro-batch packed by prompt (`train.share_prompt`, default on;
//! [`pack`]): a group's samples sit behind one copy of their prompt, each seeing the prompt and
//! itself, so the prompt runs once per group; the loss reads the same per-sample layout.
//!
//! On one GPU (`train.device`, dp = sp = 1, `train.gpu_update`) passes 3 and 4 run on the device
//! policy ([`GpuModel`]: `token_logprobs` with the policy's or the reference's weights,
//! `backward_logprobs`, clipping and AdamW there), each sample its own row; the rollout decoder
//! takes the updated weights device to device and the host model and optimizer are refreshed
//! before checkpoints ([`sync_host`]), so checkpoints and resume are the CPU run's.
//!
//! `[parallel] dp · sp > 1` runs the same loop on that many in-process ranks ([`dist`]): groups
//! rolled out per replica (sequence-parallel prefill and sharded KV over the sp ranks), scoring
//! and update on balanced token shards through `SpAttention`, replicas splitting the
//! micro-batches, gradients all-reduced, identical AdamW; only rank 0 writes. `[rollout] stop`
//! strings end responses (both trainers). Videos in LongVideo-Reason prompt records are ignored
//! (text model; see [`crate::prompts`]). The Qwen2.5-VL trainer ([`crate::vl_grpo`]) runs the same step on video
//! prompts with MR-SP, through the shared pieces here: the prompt order ([`PromptSampler`]),
//! rollout rounds with rewards, advantages and dynamic sampling ([`Scorer::collect`]), run
//! folder and resume ([`open_run`], [`load_resume_state`]), the optimizer step
//! ([`clip_and_step`]), the metrics record ([`step_record`]) and the trainer state.

mod dist;
mod pack;

pub(crate) use pack::{LossLayout, Packing};

use crate::checkpoint::{
    optimizer_state_from_bytes, CheckpointDir, TrainerState, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use crate::config::{
    apply_override, hash_hex, read_toml, ConfigError, OutputConfig, ParallelConfig,
};
use crate::device::{
    gpu_rollout_unsupported, grpo_policy_gpu, rollout_decoder, rollout_device, rollout_gpu,
    update_device, Device, GpuHandle, GpuModel, Weights,
};
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepReport};
use crate::prompts::PromptSet;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use reel_comm::{Communicator, InProcess};
use reel_data::{Tokenizer, IGNORE_INDEX};
use reel_model::generate::SamplingParams;
use reel_model::{load_checkpoint, CheckpointPolicy, ParamLayout, Qwen2, TokenBatch, Workspace};
use reel_optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use reel_rl::{
    group_advantages, grpo_loss, AccuracyReward, DynamicSampler, FormatReward, GrpoConfig,
    GrpoMetrics, LossScale, PolicyTokens, Reward, RewardInput,
};
use reel_rollout::engine::Detokenizer;
use reel_rollout::GenerationParams;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A whole GRPO run: `[model]`, `[data]`, `[train]`, `[grpo]` (reel-rl's [`GrpoConfig`]),
/// `[rollout]`, `[video]` (Qwen2.5-VL runs only), `[parallel]` and `[output]` (the SFT trainer's
/// sections).
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
    /// Videos of a Qwen2.5-VL run: frame sampling, the embedding cache (ignored by text runs).
    pub video: VideoRlConfig,
    /// Data-parallel replicas × sequence-parallel ranks (in-process), the sp schedule and the
    /// ranks' timeout. Default dp = sp = 1. A text run takes dp × sp; a Qwen2.5-VL run takes
    /// `sp > 1` (MR-SP: encode, scoring and update over sequence-parallel ranks) with dp = 1.
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
            video: VideoRlConfig::default(),
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
    /// GPU rollouts (`train.device`) keep the decoder's weights and KV cache in f32 instead of
    /// bf16: the CPU engine's samples up to f32 rounding, at a slower speed (for comparisons).
    /// Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gpu_f32: bool,
}

/// `[video]`: how a Qwen2.5-VL run reads and encodes its prompts' videos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoRlConfig {
    /// Frame sampling: "all", "uniform:N" or "fps:F". Default "uniform:8".
    pub sampling: String,
    /// Memory of the vision-embedding cache in bytes. Default 1 GiB.
    pub cache_bytes: usize,
    /// Folder of the cache's on-disk tier. Default: none (memory only).
    pub cache_dir: Option<PathBuf>,
    /// MR-SP reuse: each video encoded once through the cache, each group's prompt prefilled
    /// once (samples forked) and scored and updated once (samples packed behind it). `false` (for benchmarks) re-encodes the video for every sample and every pass and
    /// prefills, scores and updates every sample separately. Default true.
    pub reuse: bool,
    /// Threads that decode and preprocess the videos of the prompts coming next in the prompt
    /// order while the step rolls out and updates; 0 decodes each when it is drawn, on the
    /// step's thread. The numbers are the same either way. Default 2.
    pub prefetch_workers: usize,
    /// Prompts decoded or being decoded ahead of the step (the bound on prefetched videos in
    /// memory); at least `data.prompts_per_step` to have a whole next step ready. ≥ 1.
    /// Default 8.
    pub prefetch_depth: usize,
    /// Where the frozen tower encodes the videos when the rollouts decode on the GPU
    /// ([`crate::config::GpuTowerMode`]: "bf16", "f32" or "off" for the CPU). Default "bf16".
    pub gpu_tower: crate::config::GpuTowerMode,
}

impl Default for VideoRlConfig {
    fn default() -> Self {
        VideoRlConfig {
            sampling: "uniform:8".into(),
            cache_bytes: 1 << 30,
            cache_dir: None,
            reuse: true,
            prefetch_workers: 2,
            prefetch_depth: 8,
            gpu_tower: crate::config::GpuTowerMode::Bf16,
        }
    }
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
    /// The scoring and update passes pack each group's samples behind one copy of their prompt
    /// (shared-prefix attention, also under sequence parallelism): the same log-probabilities
    /// and gradients for P + Σ L_s tokens instead of Σ (P + L_s). `false` runs every sample in
    /// its own row. A Qwen2.5-VL run packs only with `[video] reuse`; scoring and update on the
    /// GPU (`gpu_update`) do not pack. Default true.
    pub share_prompt: bool,
    /// Where a text run's rollouts decode: "auto" (one GPU decoder, kept for the run, when this
    /// build has the `cuda` feature, a GPU opens and dp = sp = 1; else the CPU engine with a
    /// message saying why; also for a head dimension the decoder's paged attention lacks),
    /// "cpu", or "cuda" (an error naming what is missing). On the GPU a run also scores and
    /// updates there (`gpu_update`). Not part of the config hash while "auto".
    /// Default "auto".
    #[serde(skip_serializing_if = "Device::is_auto")]
    pub device: Device,
    /// When `device` resolves to the GPU (a text run): the old-policy and reference scoring and
    /// the update run there too — the policy on the device (bf16 compute, fp32 master weights,
    /// clipping and AdamW there, the reference's weights in bf16 beside it), each sample its own
    /// row (no prompt packing), the decoder's weights refreshed device to device after each
    /// step's updates, host weights and optimizer state copied back for checkpoints. `false`
    /// keeps scoring and the update on the CPU (f32; the decoder's weights uploaded from the
    /// host policy). Qwen2.5-VL runs take the decoder's policy there the same way (the tower
    /// stays on the CPU). Not part of the config hash while true. Default true.
    #[serde(skip_serializing_if = "is_true")]
    pub gpu_update: bool,
}

fn is_true(b: &bool) -> bool {
    *b
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
            share_prompt: true,
            device: Device::Auto,
            gpu_update: true,
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

    /// Checks ranges and consistency for a text-decoder run (any `dp × sp`); errors name the
    /// key.
    pub fn validate(&self) -> Result<()> {
        self.validate_common()?;
        self.parallel.dims()?;
        self.check_packing(self.train.share_prompt)
    }

    /// Packed rows (one copy of each prompt) run through ring-family schedules only: under
    /// Ulysses or the hybrid with sp > 1 a packing run is refused, naming the key.
    fn check_packing(&self, packs: bool) -> Result<()> {
        let p = &self.parallel;
        if packs && p.sp > 1 && p.schedule.is_ulysses() {
            return Err(ConfigError::Invalid {
                key: "train.share_prompt",
                message: format!(
                    "rows packed by prompt run through ring-family schedules only; with \
                     parallel.schedule = \"{}\" set train.share_prompt = false, or choose \
                     \"distattn\", \"ring\" or \"zigzag\"",
                    p.schedule
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Checks ranges and consistency for a Qwen2.5-VL run (`dp, sp ≥ 1`, a valid frame
    /// sampling); errors name the key.
    pub fn validate_vl(&self) -> Result<()> {
        self.validate_common()?;
        let bad = |key: &'static str, message: String| -> Result<()> {
            Err(ConfigError::Invalid { key, message }.into())
        };
        if self.parallel.sp == 0 {
            return bad("parallel.sp", "must be at least 1".into());
        }
        self.parallel.dims()?;
        if let Err(e) = crate::vl::parse_sampling(&self.video.sampling) {
            return bad("video.sampling", format!("{e:#}"));
        }
        if self.video.cache_bytes == 0 {
            return bad("video.cache_bytes", "must be positive".into());
        }
        if self.video.prefetch_depth == 0 {
            return bad("video.prefetch_depth", "must be at least 1".into());
        }
        self.check_packing(self.video.reuse && self.train.share_prompt)
    }

    /// The checks every run shares.
    fn validate_common(&self) -> Result<()> {
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
        if self.output.dir.as_os_str().is_empty() {
            return bad("output.dir", "must not be empty");
        }
        self.parallel.check_schedule()?;
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
        // Prefetching changes when videos are decoded, not the numbers; the tower's device is
        // a device choice, as the rollout's is (its features differ by storage rounding only).
        let d = VideoRlConfig::default();
        (c.video.prefetch_workers, c.video.prefetch_depth) = (d.prefetch_workers, d.prefetch_depth);
        c.video.gpu_tower = d.gpu_tower;
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
    /// Write no checkpoint, not even the last step's (benchmarks, where saving the whole model
    /// and optimizer is not what is measured; `final_model_dir` then stays empty).
    pub no_checkpoints: bool,
    /// Test hook: make the loss of this (1-based) step non-finite.
    #[doc(hidden)]
    pub poison_step: Option<u64>,
    /// Test hook (the VLM trainer): called with the (1-based) step between its scoring passes
    /// and its update, e.g. to kill a launched rank in the middle of a step.
    #[doc(hidden)]
    pub mid_step_hook: Option<Box<dyn FnMut(u64) + Send + Sync>>,
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

impl GrpoSummary {
    /// A run's summary before its first step this invocation (`dir`: the model it starts from).
    pub(crate) fn starting(start_step: u64, dir: &Path) -> Self {
        GrpoSummary {
            steps: start_step,
            records: Vec::new(),
            ref_passes: 0,
            old_passes: 0,
            final_model_dir: dir.to_path_buf(),
            last_batch: Vec::new(),
        }
    }

    /// Closes step `done` after its updates `u`: the last batch and step count, and the mean
    /// loss into the window of recent losses (100); returns `u`.
    pub(crate) fn close_step(
        &mut self,
        done: u64,
        samples: &[Sample],
        recent: &mut Vec<f32>,
        u: UpdateOutcome,
    ) -> UpdateOutcome {
        self.last_batch = samples
            .iter()
            .map(|s| (s.ids.clone(), s.prompt_len, s.advantage))
            .collect();
        self.steps = done;
        recent.push(u.loss());
        if recent.len() > 100 {
            recent.remove(0);
        }
        u
    }
}

/// The (1-based) steps this invocation runs: from after `start_step` to `train.steps`, at most
/// `stop_after` of them.
pub(crate) fn steps_to_run(
    cfg: &GrpoRunConfig,
    opts: &GrpoOptions,
    start_step: u64,
) -> impl Iterator<Item = u64> {
    let n = opts.stop_after.unwrap_or(u64::MAX);
    (start_step + 1..=cfg.train.steps).take(usize::try_from(n).unwrap_or(usize::MAX))
}

/// The prompt order: a seeded shuffle per epoch; its state is (epoch, position).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct PromptSampler {
    n: usize,
    seed: u64,
    pub(crate) epoch: u64,
    pos: usize,
    #[serde(skip)]
    order: Vec<usize>,
}

impl PromptSampler {
    pub(crate) fn new(n: usize, seed: u64) -> Self {
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
    pub(crate) fn next(&mut self) -> usize {
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
pub(crate) fn mix(seed: u64, a: u64, b: u64, c: u64) -> u64 {
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
pub(crate) struct Sample {
    /// Prompt then response tokens.
    pub(crate) ids: Vec<u32>,
    pub(crate) prompt_len: usize,
    pub(crate) advantage: f32,
    /// Which prompt of the step's prompt table it came from.
    pub(crate) prompt: usize,
}

/// One prompt's rolled-out responses and what the reward compares them with.
pub(crate) struct RolledGroup {
    /// Index of the prompt in the trainer's prompt table (a [`Sample::prompt`]).
    pub(crate) prompt: usize,
    pub(crate) prompt_ids: Vec<u32>,
    /// The question's text (given to reward commands).
    pub(crate) text: String,
    pub(crate) answer: String,
    pub(crate) problem_id: String,
    /// The G responses' token ids.
    pub(crate) responses: Vec<Vec<u32>>,
}

/// One rollout round: its groups and the engine's prefill/decode token counts.
pub(crate) struct RoundWork {
    pub(crate) groups: Vec<RolledGroup>,
    pub(crate) prefill: u64,
    pub(crate) decode: u64,
}

/// A step's rollouts after rewards, group advantages and dynamic sampling.
pub(crate) struct Collected {
    /// The kept groups' samples, advantages set, group by group.
    pub(crate) samples: Vec<Sample>,
    /// Every rolled-out sample's reward (dropped groups included).
    pub(crate) rewards: Vec<f32>,
    pub(crate) correct: usize,
    pub(crate) formatted: usize,
    pub(crate) len_sum: usize,
    pub(crate) len_max: usize,
    pub(crate) groups_rolled: usize,
    pub(crate) groups_kept: usize,
    pub(crate) groups_dropped: usize,
    pub(crate) rounds: usize,
    /// Seconds inside the rollout callback, and scoring rewards and advantages.
    pub(crate) rollout_s: f64,
    pub(crate) scoring_s: f64,
    pub(crate) prefill: u64,
    pub(crate) decode: u64,
}

/// What scores a step's responses.
pub(crate) struct Scorer<'a> {
    pub(crate) cfg: &'a GrpoRunConfig,
    pub(crate) tok: &'a Tokenizer,
    pub(crate) reward: &'a dyn Reward,
    pub(crate) accuracy: AccuracyReward,
    /// Whether this rank logs the reward's warnings (rank 0 of a multi-rank run).
    pub(crate) lead: bool,
}

impl<'a> Scorer<'a> {
    pub(crate) fn new(cfg: &'a GrpoRunConfig, tok: &'a Tokenizer, reward: &'a dyn Reward) -> Self {
        Scorer {
            cfg,
            tok,
            reward,
            accuracy: AccuracyReward {
                rel_tol: cfg.grpo.reward.number_rel_tol,
                abs_tol: cfg.grpo.reward.number_abs_tol,
            },
            lead: true,
        }
    }

    /// Rolls out rounds (`roll(want, round, sampler)` draws `want` prompts and returns their
    /// groups) until `data.prompts_per_step` groups are kept (DAPO dynamic sampling) or one
    /// round without it; rewards every response and sets group-normalised advantages.
    pub(crate) fn collect(
        &self,
        at: &str,
        sampler: &mut PromptSampler,
        mut roll: impl FnMut(usize, u64, &mut PromptSampler) -> Result<RoundWork>,
    ) -> Result<Collected> {
        let cfg = self.cfg;
        let g = cfg.grpo.group_size;
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
        let mut c = Collected {
            samples: Vec::new(),
            rewards: Vec::new(),
            correct: 0,
            formatted: 0,
            len_sum: 0,
            len_max: 0,
            groups_rolled: 0,
            groups_kept: 0,
            groups_dropped: 0,
            rounds: 0,
            rollout_s: 0.0,
            scoring_s: 0.0,
            prefill: 0,
            decode: 0,
        };
        let mut round = 0u64;
        loop {
            let kept = dyn_s.as_ref().map_or(0, |d| d.kept());
            let want = cfg.data.prompts_per_step - kept.min(cfg.data.prompts_per_step);
            let t0 = Instant::now();
            let work = roll(want, round, sampler)?;
            c.rollout_s += t0.elapsed().as_secs_f64();
            c.prefill += work.prefill;
            c.decode += work.decode;
            let t1 = Instant::now();
            let mut groups = Vec::new();
            for grp in work.groups {
                let mut samples = Vec::with_capacity(g);
                let mut rewards = Vec::with_capacity(g);
                for resp in grp.responses {
                    let text = self.tok.decode(&resp, true)?;
                    let r = self.reward.score(&RewardInput {
                        prompt: &grp.text,
                        response: &text,
                        answer: &grp.answer,
                        problem_id: &grp.problem_id,
                    });
                    if let Some(w) = r.warning.as_ref().filter(|_| self.lead) {
                        tracing::warn!("{at}: reward of {}: {w}", grp.problem_id);
                    }
                    c.correct += self.accuracy.is_correct(&text, &grp.answer) as usize;
                    c.formatted += FormatReward::matches(&text) as usize;
                    c.len_sum += resp.len();
                    c.len_max = c.len_max.max(resp.len());
                    let mut ids = grp.prompt_ids.clone();
                    ids.extend_from_slice(&resp);
                    rewards.push(r.value);
                    samples.push(Sample {
                        ids,
                        prompt_len: grp.prompt_ids.len(),
                        advantage: 0.0,
                        prompt: grp.prompt,
                    });
                }
                c.rewards.extend_from_slice(&rewards);
                groups.push((samples, rewards));
            }
            c.groups_rolled += groups.len();
            match &mut dyn_s {
                Some(d) => d.add_round(groups),
                // Every group is kept (an all-equal group has zero advantage).
                None => plain.extend(groups),
            }
            c.scoring_s += t1.elapsed().as_secs_f64();
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
        let t1 = Instant::now();
        c.groups_kept = kept.len();
        c.groups_dropped = dropped;
        c.rounds = rounds;
        for (group, rewards) in kept {
            let adv = group_advantages(&rewards, g, cfg.grpo.advantage_scaling)?;
            for (mut s, a) in group.into_iter().zip(adv) {
                s.advantage = a;
                c.samples.push(s);
            }
        }
        c.scoring_s += t1.elapsed().as_secs_f64();
        Ok(c)
    }
}

/// The engine's generation settings for group `k` of rollout round `round` of step `done`.
pub(crate) fn generation_params(
    cfg: &GrpoRunConfig,
    done: u64,
    round: u64,
    k: usize,
    stop: &[u32],
) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: cfg.grpo.temperature,
            top_p: cfg.grpo.top_p,
            top_k: cfg.grpo.top_k,
            seed: mix(cfg.train.seed, done, round, k as u64),
        },
        max_new_tokens: cfg.grpo.max_response_tokens,
        stop_token_ids: stop.to_vec(),
        stop_strings: cfg.rollout.stop.clone(),
    }
}

/// The detokenizer the engine matches `[rollout] stop` strings with (special tokens skipped).
pub(crate) fn detokenizer(tok: &Tokenizer) -> Detokenizer {
    let tok = tok.clone();
    Arc::new(move |ids: &[u32]| tok.decode(ids, true).unwrap_or_default())
}

/// Creates the run folder and (when `lead`, the writing rank) its config.toml and opens its
/// checkpoints; the newest one to resume from with `resume`, and a refusal to overwrite an
/// earlier run without it.
pub(crate) fn open_run(
    cfg: &GrpoRunConfig,
    resume: bool,
    lead: bool,
) -> Result<(CheckpointDir, Option<PathBuf>)> {
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if lead {
        crate::checkpoint::write_atomic(out.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    let ckpts = CheckpointDir::open(out, cfg.output.keep_last)?;
    if !resume {
        if let Some(old) = ckpts.latest() {
            bail!(
                "{} holds checkpoints of an earlier run (newest {}); pass --resume to continue \
                 it, or choose another output.dir",
                ckpts.root().display(),
                old.display()
            );
        }
    }
    let resumed = if resume { ckpts.latest() } else { None };
    Ok((ckpts, resumed))
}

/// AdamW over a decoder's parameters (weight decay where its layout says), `[grpo]`/`[train]`
/// settings.
pub(crate) fn adamw_for(cfg: &GrpoRunConfig, layout: &ParamLayout) -> AdamW {
    let sizes: Vec<usize> = layout.entries.iter().map(|e| e.range.len()).collect();
    let decay: Vec<bool> = layout.entries.iter().map(|e| e.decay).collect();
    AdamW::new(
        &sizes,
        &decay,
        AdamWConfig {
            lr: cfg.grpo.lr,
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.grpo.weight_decay,
        },
    )
}

/// Reads checkpoint `dir`'s optimizer state whole into `opt`.
pub(crate) fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<()> {
    let p = dir.join(OPTIMIZER_FILE);
    opt.load_state(optimizer_state_from_bytes(
        &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
    )?)?;
    Ok(())
}

/// Where a resumed run continues.
pub(crate) struct ResumePoint {
    pub(crate) sampler: PromptSampler,
    pub(crate) step: u64,
    pub(crate) recent: Vec<f32>,
    /// The trainer state's `data` object (trainer-specific counters ride along).
    pub(crate) data: serde_json::Value,
}

/// Reads checkpoint `dir`'s optimizer state into `opt`, when given (a GPU policy's ranks read
/// their own parts of it instead: [`crate::checkpoint::optimizer_state_part`]), and its
/// trainer state (prompt order over `n_prompts` prompts of `prompts_path`, step, recent
/// losses).
pub(crate) fn load_resume_state(
    cfg: &GrpoRunConfig,
    dir: &Path,
    opt: Option<&mut AdamW>,
    n_prompts: usize,
    prompts_path: &Path,
) -> Result<ResumePoint> {
    if let Some(opt) = opt {
        load_optimizer(dir, opt)?;
    }
    let p = dir.join(TRAINER_STATE_FILE);
    let st = TrainerState::from_json_bytes(
        &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
    )?;
    let s: PromptSampler = serde_json::from_value(st.data["prompts"].clone())
        .with_context(|| format!("{}: bad prompt sampler state", p.display()))?;
    if s.n != n_prompts {
        bail!(
            "{}: the checkpoint was written for {} prompts, {} has {n_prompts}",
            p.display(),
            s.n,
            prompts_path.display(),
        );
    }
    let mut sampler = PromptSampler {
        order: Vec::new(),
        ..s
    };
    sampler.shuffle();
    let init_dir = &cfg.model.path;
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
    tracing::info!("resuming from {} at step {}", dir.display(), st.step);
    Ok(ResumePoint {
        sampler,
        step: st.step,
        recent: st.losses,
        data: st.data,
    })
}

/// The trainer state of a checkpoint after step `done`: prompt order, reference folder and
/// `extra` keys in `data`.
pub(crate) fn grpo_trainer_state(
    cfg: &GrpoRunConfig,
    done: u64,
    sampler: &PromptSampler,
    recent: &[f32],
    extra: serde_json::Value,
) -> TrainerState {
    let mut data = json!({
        "prompts": sampler,
        "reference": cfg.model.path.display().to_string(),
    });
    if let (Some(d), serde_json::Value::Object(e)) = (data.as_object_mut(), extra) {
        d.extend(e);
    }
    TrainerState {
        step: done,
        data,
        rng: cfg.train.seed,
        losses: recent.to_vec(),
        config_hash: cfg.config_hash(),
    }
}

/// Clips the gradient (`grpo.grad_clip`, 0 = off), refuses a non-finite loss or norm, and takes
/// one AdamW step at `grpo.lr`; returns the norm before clipping.
pub(crate) fn clip_and_step(
    cfg: &GrpoRunConfig,
    layout: &ParamLayout,
    params: &mut [f32],
    grads: &mut [f32],
    opt: &mut AdamW,
    loss: f64,
    at: &str,
) -> Result<f32> {
    let grad_norm = {
        let mut gs = layout.split_mut(grads);
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
    let mut p = layout.split_mut(params);
    let mut gs = layout.split_mut(grads);
    let ro: Vec<&[f32]> = gs.iter_mut().map(|s| &**s).collect();
    opt.step(&mut p, &ro, cfg.grpo.lr);
    Ok(grad_norm)
}

/// What a step's updates produced, tallied update by update.
#[derive(Default)]
pub(crate) struct UpdateOutcome {
    /// The updates' losses, summed.
    pub(crate) loss_sum: f64,
    /// The last update's gradient norm (before clipping).
    pub(crate) grad_norm: f32,
    pub(crate) updates: usize,
    pub(crate) metrics: GrpoMetrics,
}

impl UpdateOutcome {
    /// Counts one optimizer update.
    pub(crate) fn add(&mut self, loss: f64, grad_norm: f32) {
        self.loss_sum += loss;
        self.grad_norm = grad_norm;
        self.updates += 1;
    }

    /// The mean loss over the updates run (0 when none ran: no group was kept).
    pub(crate) fn loss(&self) -> f32 {
        (self.loss_sum / self.updates.max(1) as f64) as f32
    }
}

/// The metrics record every GRPO step writes (trainers add their own keys to it).
pub(crate) fn step_record(
    cfg: &GrpoRunConfig,
    done: u64,
    c: &Collected,
    u: &UpdateOutcome,
    summary: &GrpoSummary,
    times: [(&str, f64); 3],
    epoch: u64,
) -> serde_json::Value {
    let s = u.metrics.summary();
    let (r_mean, r_std) = mean_std(&c.rewards);
    let n_samples = c.rewards.len().max(1) as f64;
    let mut record = json!({
        "step": done, "loss": u.loss(), "lr": cfg.grpo.lr, "grad_norm": u.grad_norm,
        "reward_mean": r_mean, "reward_std": r_std,
        "accuracy": c.correct as f64 / n_samples, "format_rate": c.formatted as f64 / n_samples,
        "pg_loss": s.pg_loss, "kl": s.kl, "entropy": s.entropy,
        "clip_frac_low": s.clip_frac_low, "clip_frac_high": s.clip_frac_high,
        "dual_clip_frac": s.dual_clip_frac, "ratio_mean": s.ratio_mean,
        "ratio_min": s.ratio_min, "ratio_max": s.ratio_max,
        "response_len_mean": c.len_sum as f64 / n_samples, "response_len_max": c.len_max,
        "response_tokens": s.tokens,
        "groups_rolled": c.groups_rolled, "groups_kept": c.groups_kept,
        "groups_dropped": c.groups_dropped, "rollout_rounds": c.rounds,
        "prefill_tokens": c.prefill, "decode_tokens": c.decode,
        "ref_passes": summary.ref_passes, "old_passes": summary.old_passes,
        "updates": u.updates,
        "epoch": epoch,
    });
    for (k, v) in times {
        record[k] = json!(v);
    }
    record
}

/// Rank 0's reporting of a run: `metrics.jsonl` (truncated after the resumed step) and the
/// progress display.
pub(crate) struct Reporter {
    metrics: MetricsWriter,
    progress: Progress,
}

impl Reporter {
    /// Opens both for a run that starts after `start_step`.
    pub(crate) fn open(cfg: &GrpoRunConfig, opts: &GrpoOptions, start_step: u64) -> Result<Self> {
        let (steps, every) = (cfg.train.steps, cfg.output.log_every);
        Ok(Reporter {
            metrics: MetricsWriter::open(&cfg.output.dir, start_step + 1)?,
            progress: match opts.progress {
                Some(mode) => Progress::with_mode(mode, steps, start_step, every),
                None => Progress::new(steps, start_step, every),
            },
        })
    }

    /// Shows a finished step (its `record["step"]`) and appends its record.
    pub(crate) fn step(
        &mut self,
        cfg: &GrpoRunConfig,
        record: &serde_json::Value,
        loss: f32,
        tokens_per_s: f64,
    ) -> Result<()> {
        self.progress.update(&StepReport {
            step: record["step"].as_u64().unwrap_or(0),
            loss,
            lr: cfg.grpo.lr,
            tokens_per_s,
        });
        Ok(self.metrics.write(record)?)
    }

    pub(crate) fn finish(&self) {
        self.progress.finish();
    }
}

/// Whether step `done` writes a checkpoint (`output.save_every`, and the last step).
pub(crate) fn is_save_step(cfg: &GrpoRunConfig, done: u64) -> bool {
    (cfg.output.save_every > 0 && done.is_multiple_of(cfg.output.save_every))
        || done == cfg.train.steps
}

/// Turns a run's error into one that names the last good checkpoint.
pub(crate) fn with_last_good(ckpts: &CheckpointDir, result: Result<()>) -> Result<()> {
    result.map_err(|e| {
        let kept = match ckpts.latest() {
            Some(d) => d.display().to_string(),
            None => format!("none written yet in {}", ckpts.root().display()),
        };
        anyhow::anyhow!("{e:#}; stopping with the last good checkpoint intact ({kept})")
    })
}

/// A micro-batch of samples as model rows: `prompt ++ response[..-1]`, targets at response
/// tokens only, right-padded (or one rank's token shard of them, [`dist::shard_rows`]).
#[derive(Clone)]
struct Rows {
    /// The model's rows [b, t] (per sample, or packed by prompt), or this rank's shard of them.
    tokens: Vec<u32>,
    targets: Vec<i32>,
    positions: Vec<u32>,
    mask: Vec<bool>,
    /// Per sample.
    advantages: Vec<f32>,
    b: usize,
    t: usize,
    /// T of the whole rows (= t unless sharded).
    global_t: usize,
    /// Response tokens of each whole sequence when these rows are a shard; None otherwise.
    seq_tokens: Option<Vec<usize>>,
    /// Rows packed by prompt: the packing, and this rank's labelled positions in the loss's
    /// per-sample layout.
    packed: Option<(Arc<Packing>, LossLayout)>,
}

impl Rows {
    /// The rows of `samples`: one per sample, or with `pack` one per run of samples sharing a
    /// prompt ([`Packing`]; positions continue each sample's own row).
    fn new(samples: &[Sample], pad: u32, pack: bool) -> Self {
        let b = samples.len();
        let t = rows_len(samples);
        let advantages: Vec<f32> = samples.iter().map(|s| s.advantage).collect();
        if pack {
            let refs: Vec<&Sample> = samples.iter().collect();
            let pk = Packing::new(&refs, t);
            let (targets, mask) = pk.targets(&refs, t, IGNORE_INDEX);
            let loss = pk.whole(b, t);
            return Rows {
                tokens: pk.tokens(&refs, pad),
                targets,
                positions: pk
                    .source
                    .iter()
                    .map(|s| s.map_or(0, |(_, i)| i as u32))
                    .collect(),
                mask,
                advantages,
                b: pk.b,
                t: pk.t,
                global_t: pk.t,
                seq_tokens: None,
                packed: Some((Arc::new(pk), loss)),
            };
        }
        let mut r = Rows {
            tokens: vec![pad; b * t],
            targets: vec![IGNORE_INDEX; b * t],
            positions: (0..b).flat_map(|_| 0..t as u32).collect(),
            mask: vec![false; b * t],
            advantages,
            b,
            t,
            global_t: t,
            seq_tokens: None,
            packed: None,
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
    /// Labelled positions of the whole rows (not of a shard).
    fn n_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
    /// The loss's layout: (B, T) and labelled positions (per sample).
    fn loss_rows(&self) -> (usize, usize, &[bool]) {
        match &self.packed {
            Some((_, l)) => (l.b, l.t, &l.mask),
            None => (self.b, self.t, &self.mask),
        }
    }
    /// Model-layout values in the loss's layout.
    fn to_loss(&self, v: Vec<f32>) -> Vec<f32> {
        match &self.packed {
            Some((_, l)) => l.to_samples(&v),
            None => v,
        }
    }
    /// Loss-layout values (∂L/∂log π) in the model's layout.
    fn to_model(&self, v: Vec<f32>) -> Vec<f32> {
        match &self.packed {
            Some((_, l)) => l.to_model(&v, self.b * self.t),
            None => v,
        }
    }
}

/// T of a micro-batch's rows: its longest `prompt ++ response[..-1]` (at least 1).
pub(crate) fn rows_len<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> usize {
    samples
        .into_iter()
        .map(|s| s.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1)
}

pub(crate) fn mean_std(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// What the GRPO trainers' rollout device messages call the rollouts.
pub(crate) const ROLLOUTS: &str = "GRPO rollouts";

/// Runs (or resumes) a GRPO run of a text decoder described by `cfg`: on this thread when
/// `parallel.dp · parallel.sp = 1`, else on that many in-process ranks.
pub fn run_grpo(cfg: &GrpoRunConfig, opts: GrpoOptions) -> Result<GrpoSummary> {
    let launched = crate::device::Launched::from_env().map_err(anyhow::Error::msg)?;
    crate::device::one_process_only("grpo", launched.as_ref()).map_err(anyhow::Error::msg)?;
    cfg.validate()?;
    let cpu_only = gpu_rollout_unsupported(cfg.parallel.dims()?);
    let gpu = rollout_gpu(cfg.train.device, cpu_only, "train.device", ROLLOUTS)?;
    if cfg.parallel.world() > 1 {
        cfg.parallel
            .note_unsharded("a text decoder's GRPO ranks update on the CPU");
        return dist::run_ranks(cfg, &opts);
    }
    Ok(grpo_rank::<InProcess>(cfg, &opts, None, gpu)?.0)
}

/// The GRPO loop of one rank (the only one when `peers` is None); only rank 0 writes. With
/// `gpu` (one rank only) the rollouts decode there. Returns the summary and the final policy.
fn grpo_rank<C: Communicator>(
    cfg: &GrpoRunConfig,
    opts: &GrpoOptions,
    peers: Option<&dist::Peers<'_, C>>,
    gpu: Option<GpuHandle>,
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
    let (ckpts, resumed) = open_run(cfg, opts.resume, lead)?;
    let init_dir = &cfg.model.path;
    let load = |d: &Path| load_checkpoint(d).with_context(|| format!("loading {}", d.display()));
    let mut reference = if cfg.grpo.needs_reference() {
        Some(load(init_dir)?)
    } else {
        None
    };
    let mut model = load(resumed.as_deref().unwrap_or(init_dir))?;
    let have_gpu = gpu.is_some();
    // The rollouts' GPU decoder, kept for the run (weights refreshed after each step).
    let mut decoder = rollout_decoder(
        gpu,
        cfg.train.device,
        &model,
        cfg.rollout.gpu_f32,
        "train.device",
        ROLLOUTS,
    )?;
    let rollout_device = rollout_device(decoder.as_ref());
    let mut opt = adamw_for(cfg, &model.layout);
    let (mut sampler, start_step, mut recent) = match &resumed {
        Some(dir) => {
            let r =
                load_resume_state(cfg, dir, Some(&mut opt), prompts.items.len(), &prompts.path)?;
            (r.sampler, r.step, r.recent)
        }
        None => (
            PromptSampler::new(prompts.items.len(), cfg.data.seed),
            0,
            Vec::new(),
        ),
    };
    if let (Some(d), true) = (decoder.as_mut(), have_gpu && cfg.train.gpu_update) {
        // Room for the policy: the decoder reads its weights in place afterwards.
        d.release_for_policy()?;
    }
    // Scoring and the update on the GPU (one rank): the policy, its optimizer state and the
    // reference weights on the device; the host copies are refreshed for checkpoints.
    let mut gm: Option<GpuModel> = grpo_policy_gpu(
        have_gpu,
        cfg.train.gpu_update,
        cfg.train.device,
        &model,
        reference.as_ref().map(|r| r.params.as_slice()),
        cfg.train.checkpoint,
        &opt,
        "train.device",
    )?;
    if let Some(d) = decoder.as_mut() {
        // SAFETY: the policy lives for the whole run, longer than the decoder's steps, and
        // each step's update reaches the decoder through `load_from_policy` before the next
        // rollout.
        unsafe { d.attach_policy(gm.as_ref(), &model.params) }?;
    }
    if gm.is_some() {
        // The reference lives on the device now.
        reference = None;
    }
    let update_device = update_device(gm.as_ref());
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
    let detok = detokenizer(&tok);
    let reward = cfg.grpo.reward.build();
    let scorer = Scorer {
        lead,
        ..Scorer::new(cfg, &tok, &reward)
    };
    let g = cfg.grpo.group_size;
    let loss_cfg = cfg.grpo.policy_loss();
    let updates = cfg.train.mini_batches * cfg.train.ppo_epochs;
    let mut ws = Workspace::new(&model.config, cfg.train.checkpoint);
    // On the GPU the host keeps no gradients.
    let mut grads = match gm {
        Some(_) => Vec::new(),
        None => vec![0.0f32; model.params.len()],
    };
    // Packing by prompt needs the CPU's shared-prefix attention: on the GPU each sample is
    // its own row.
    let pack = cfg.train.share_prompt && gm.is_none();
    let mut reporter = lead
        .then(|| Reporter::open(cfg, opts, start_step))
        .transpose()?;
    let mut summary = GrpoSummary::starting(start_step, resumed.as_deref().unwrap_or(init_dir));
    let result: Result<()> = (|| {
        for done in steps_to_run(cfg, opts, start_step) {
            let at = format!("step {done}");
            let t_step = Instant::now();

            // 1–2. Rollout and rewards, round by round under dynamic sampling.
            let c = scorer.collect(&at, &mut sampler, |want, round, sampler| {
                let drawn: Vec<usize> = (0..want).map(|_| sampler.next()).collect();
                let longest = drawn
                    .iter()
                    .map(|&i| prompts.items[i].ids.len())
                    .max()
                    .unwrap_or(0);
                let ecfg = crate::accuracy::grouped_engine_config(
                    drawn.len(),
                    g,
                    longest,
                    cfg.grpo.max_response_tokens,
                    model.config.max_position_embeddings,
                );
                let requests: Vec<dist::Request> = drawn
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| dist::Request {
                        ids: &prompts.items[i].ids,
                        params: generation_params(cfg, done, round, k, &stop),
                        name: &prompts.items[i].problem_id,
                    })
                    .collect();
                let (outs, prefill, decode) = dist::rollout(
                    &model,
                    decoder.as_mut(),
                    peers,
                    ecfg,
                    g,
                    &requests,
                    &detok,
                    &at,
                )?;
                let groups = drawn
                    .iter()
                    .zip(outs)
                    .map(|(&i, responses)| {
                        let item = &prompts.items[i];
                        RolledGroup {
                            prompt: i,
                            prompt_ids: item.ids.clone(),
                            text: item.text.clone(),
                            answer: item.answer.clone(),
                            problem_id: item.problem_id.clone(),
                            responses,
                        }
                    })
                    .collect();
                Ok(RoundWork {
                    groups,
                    prefill,
                    decode,
                })
            })?;
            let samples = &c.samples;

            // 3. Old/reference log-probabilities.
            let t2 = Instant::now();
            let per_mini = samples.len().div_ceil(cfg.train.mini_batches).max(1);
            let minis: Vec<Vec<Rows>> = samples
                .chunks(per_mini)
                .map(|mb| {
                    mb.chunks(cfg.train.micro_batch_seqs)
                        .map(|c| Rows::new(c, pad, pack))
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
            // The same pass on the GPU policy (or its reference weights).
            let score_gpu = |g: &mut GpuModel, w: Weights, rows: &Rows| -> Result<Vec<f32>> {
                let mut lp = vec![0.0; rows.b * rows.t];
                g.token_logprobs(&rows.batch(), w, cfg.grpo.temperature, &mut lp, None)?;
                Ok(lp)
            };
            let mut refs: Vec<Vec<Vec<f32>>> = Vec::new();
            if cfg.grpo.needs_reference() {
                for mb in &locals {
                    refs.push(
                        mb.iter()
                            .map(|rows| match (gm.as_mut(), &reference) {
                                (Some(g), _) => score_gpu(g, Weights::Reference, rows),
                                (None, Some(r)) => score(r, &mut ws, rows),
                                (None, None) => unreachable!("the reference is loaded"),
                            })
                            .collect::<Result<_>>()
                            .with_context(|| format!("{at}: reference scoring"))?,
                    );
                }
                summary.ref_passes += 1;
            }
            let mut olds: Vec<Vec<Vec<f32>>> = Vec::new();
            if updates > 1 {
                for mb in &locals {
                    olds.push(
                        mb.iter()
                            .map(|rows| match gm.as_mut() {
                                Some(g) => score_gpu(g, Weights::Policy, rows),
                                None => score(&model, &mut ws, rows),
                            })
                            .collect::<Result<_>>()
                            .with_context(|| format!("{at}: old-policy scoring"))?,
                    );
                }
                summary.old_passes += 1;
            }
            let logprob_s = t2.elapsed().as_secs_f64();

            // 4. The updates.
            let t3 = Instant::now();
            let mut tally = UpdateOutcome::default();
            let layout = model.layout.clone();
            for _epoch in 0..cfg.train.ppo_epochs {
                for (k, mb) in minis.iter().enumerate() {
                    let scale = LossScale {
                        global_tokens: mb.iter().map(Rows::n_tokens).sum(),
                        global_seqs: mb.iter().map(|r| r.advantages.len()).sum(),
                    };
                    grads.fill(0.0);
                    if let Some(g) = gm.as_mut() {
                        g.zero_grads()?;
                    }
                    let mut loss = 0.0f64;
                    for (j, rows) in locals[k].iter().enumerate() {
                        let n = rows.b * rows.t;
                        let tb = rows.batch();
                        let mut lp = vec![0.0; n];
                        let mut ent = vec![0.0; n];
                        let t = cfg.grpo.temperature;
                        match gm.as_mut() {
                            Some(g) => g
                                .token_logprobs(&tb, Weights::Policy, t, &mut lp, Some(&mut ent))
                                .map(|_| ())
                                .map_err(anyhow::Error::from),
                            None => model
                                .token_logprobs(
                                    &mut ws,
                                    &tb,
                                    dist::attention(rows, peers)?,
                                    t,
                                    &mut lp,
                                    Some(&mut ent),
                                )
                                .map(|_| ())
                                .map_err(anyhow::Error::from),
                        }
                        .with_context(|| format!("{at}: scoring"))?;
                        // The loss reads the per-sample layout (packed rows mapped back).
                        let (lb, lt, mask) = rows.loss_rows();
                        let lp = rows.to_loss(lp);
                        let ent = rows.to_loss(ent);
                        let old = if updates > 1 {
                            rows.to_loss(olds[k][j].clone())
                        } else {
                            lp.clone()
                        };
                        let rf = refs.get(k).map(|r| rows.to_loss(r[j].clone()));
                        let x = PolicyTokens {
                            b: lb,
                            t: lt,
                            logp: &lp,
                            old_logp: &old,
                            ref_logp: rf.as_deref(),
                            entropy: Some(&ent),
                            mask,
                            advantages: &rows.advantages,
                            seq_tokens: rows.seq_tokens.as_deref(),
                        };
                        let mut dlogp = vec![0.0; lb * lt];
                        let (l, m) = grpo_loss(&x, &loss_cfg, scale, &mut dlogp)?;
                        loss += l;
                        tally.metrics.merge(&m);
                        let dlogp = rows.to_model(dlogp);
                        match gm.as_mut() {
                            Some(g) => g
                                .backward_logprobs(&tb, &dlogp)
                                .map_err(anyhow::Error::from),
                            None => model
                                .backward_logprobs(
                                    &mut grads,
                                    &mut ws,
                                    &tb,
                                    &dlogp,
                                    dist::attention(rows, peers)?,
                                )
                                .map_err(anyhow::Error::from),
                        }
                        .with_context(|| format!("{at}: backward"))?;
                    }
                    if opts.poison_step == Some(done) {
                        loss = f64::NAN;
                    }
                    let grad_norm = match gm.as_mut() {
                        Some(g) => gpu_clip_and_step(cfg, g, loss, &at)?,
                        None => {
                            loss = dist::reduce_update(peers, &mut grads, loss, &at)?;
                            clip_and_step(
                                cfg,
                                &layout,
                                &mut model.params,
                                &mut grads,
                                &mut opt,
                                loss,
                                &at,
                            )?
                        }
                    };
                    tally.add(loss, grad_norm);
                }
            }
            tally.metrics = dist::merge_metrics(peers, std::mem::take(&mut tally.metrics), &at)?;
            match (decoder.as_mut(), gm.as_ref()) {
                (Some(d), Some(g)) => d.load_from_policy(g),
                (Some(d), None) => d.load_params(&model.params),
                // The CPU engine rolls out from the host weights.
                (None, Some(g)) => g
                    .params_host()
                    .map(|p| model.params = p)
                    .map_err(anyhow::Error::from),
                (None, None) => Ok(()),
            }
            .with_context(|| format!("{at}: refreshing the rollout weights"))?;
            if let (Some(_), Some(g)) = (decoder.as_ref(), gm.as_mut()) {
                // The next rollout's cache and buffers in place of the update's activations.
                g.release_workspace()
                    .with_context(|| format!("{at}: freeing the update's activations"))?;
            }
            let update_s = t3.elapsed().as_secs_f64();
            let outcome = summary.close_step(done, samples, &mut recent, tally);
            let record = step_record(
                cfg,
                done,
                &c,
                &outcome,
                &summary,
                [
                    ("rollout_s", c.rollout_s),
                    ("scoring_s", c.scoring_s + logprob_s),
                    ("update_s", update_s),
                ],
                sampler.epoch,
            );
            let mut record = record;
            record["step_s"] = json!(t_step.elapsed().as_secs_f64());
            record["rollout_device"] = json!(rollout_device);
            record["update_device"] = json!(update_device);
            if let Some(r) = &mut reporter {
                r.step(
                    cfg,
                    &record,
                    outcome.loss(),
                    c.decode as f64 / c.rollout_s.max(1e-9),
                )?;
            }
            summary.records.push(record);
            if lead && !opts.no_checkpoints && is_save_step(cfg, done) {
                sync_host(gm.as_mut(), &mut model, &mut opt)
                    .with_context(|| format!("{at}: copying the GPU policy to the host"))?;
                let state = grpo_trainer_state(cfg, done, &sampler, &recent, json!({}));
                let files = crate::sft::checkpoint_files(&model, &tok, &opt, &state)?;
                summary.final_model_dir = ckpts
                    .save(done, &files)
                    .with_context(|| format!("{at}: saving the checkpoint"))?;
            }
        }
        Ok(())
    })();
    if let Some(r) = &reporter {
        r.finish();
    }
    with_last_good(&ckpts, result)?;
    sync_host(gm.as_mut(), &mut model, &mut opt)
        .context("copying the GPU policy to the host at the end of the run")?;
    Ok((summary, model))
}

/// [`clip_and_step`] on the GPU policy: the norm (clipped at `grpo.grad_clip`, 0 = off), a
/// non-finite loss or norm refused before the step, AdamW at `grpo.lr` on the device.
pub(crate) fn gpu_clip_and_step(
    cfg: &GrpoRunConfig,
    g: &mut GpuModel,
    loss: f64,
    at: &str,
) -> Result<f32> {
    let grad_norm = g.clip_grad_norm(cfg.grpo.grad_clip.max(0.0))?;
    if !loss.is_finite() || !grad_norm.is_finite() {
        bail!("{at}: non-finite loss ({loss}) or gradient norm ({grad_norm})");
    }
    g.adamw_step(cfg.grpo.lr)?;
    Ok(grad_norm)
}

/// Copies the GPU policy's weights and AdamW state into the host model and optimizer (no-op
/// without one): before checkpoints and at the end of a run.
pub(crate) fn sync_host(
    gm: Option<&mut GpuModel>,
    model: &mut Qwen2,
    opt: &mut AdamW,
) -> Result<()> {
    let Some(g) = gm else { return Ok(()) };
    if let Some((params, state)) = g.gather_state(true)? {
        model.params = params;
        opt.load_state(state)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_model::PackedRow;

    /// Packed rows hold each prompt once and label the same targets as one row per sample.
    #[test]
    fn packed_rows_hold_each_prompt_once() {
        let s = |prompt: usize, resp: &[u32]| {
            let mut ids: Vec<u32> = (1..=6).map(|x| x + 10 * prompt as u32).collect();
            ids.extend_from_slice(resp);
            Sample {
                ids,
                prompt_len: 6,
                advantage: prompt as f32,
                prompt,
            }
        };
        let samples = [
            s(1, &[7, 8, 9]),
            s(1, &[5]),
            s(1, &[4, 4]),
            s(2, &[3, 3, 3]),
        ];
        let plain = Rows::new(&samples, 0, false);
        let packed = Rows::new(&samples, 0, true);
        assert_eq!((plain.b, plain.t), (4, 8));
        assert_eq!(packed.b, 2);
        // 19 positions (prompt 1 once: 5 + 3 + 1 + 2; prompt 2: 5 + 3) against 29.
        let (pk, _) = packed.packed.as_ref().unwrap();
        let used: usize = pk.layout.iter().map(PackedRow::used).sum();
        let real: usize = samples.iter().map(|s| s.ids.len() - 1).sum();
        assert_eq!((used, real), (19, 29));
        assert_eq!(packed.n_tokens(), plain.n_tokens());
        let (lb, lt, mask) = packed.loss_rows();
        assert_eq!((lb, lt, mask), (plain.b, plain.t, plain.mask.as_slice()));
        // Every labelled position's target and position are its own row's.
        let targets: Vec<f32> = packed.targets.iter().map(|&x| x as f32).collect();
        let positions: Vec<f32> = packed.positions.iter().map(|&x| x as f32).collect();
        for (i, &m) in plain.mask.iter().enumerate() {
            if m {
                assert_eq!(packed.to_loss(targets.clone())[i], plain.targets[i] as f32);
                assert_eq!(
                    packed.to_loss(positions.clone())[i],
                    plain.positions[i] as f32
                );
            }
        }
    }
}
