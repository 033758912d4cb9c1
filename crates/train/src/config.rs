//! The SFT run configuration: one TOML file with `[model]`, `[data]`, `[train]`, `[parallel]`,
//! `[output]` and (for a Qwen2.5-VL model) `[video]` sections, every field optional with the default stated on it, unknown keys refused.
//!
//! `reel sft --config run.toml --set train.lr=3e-4 --set output.dir=runs/x` is
//! [`SftConfig::from_file`], then [`SftConfig::apply_override`] per `--set` (the value is parsed as
//! TOML, falling back to a bare string), then [`SftConfig::validate`].
//! [`SftConfig::documented_default`] is the commented example `reel sft --print-config` prints.
//! Relative paths are relative to the working directory, not to the config file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::Device;
use reel_data::Batching;
use reel_model::CheckpointPolicy;
use reel_optim::{AdamWConfig, LrSchedule};
use reel_parallel::{
    Overlap, ParallelDims, ScheduleKind as AttnScheduleKind, SpMethod, UlyssesError, UlyssesGrid,
};
use serde::{Deserialize, Serialize};

/// Errors from reading, overriding or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A `key=value` override could not be applied.
    #[error("override `{key}`: {message}")]
    Override { key: String, message: String },
    /// The config parsed but a value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A whole SFT run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Which model to start from and its tokenizer.
    pub model: ModelConfig,
    /// Training (and evaluation) data and how it is batched.
    pub data: DataConfig,
    /// Optimisation: steps, learning rate, schedule, AdamW, clipping, checkpointing.
    pub train: TrainConfig,
    /// Sequence- and data-parallel ranks (in-process threads today).
    pub parallel: ParallelConfig,
    /// Where the run writes checkpoints, metrics and logs, and how often.
    pub output: OutputConfig,
    /// Video input and the vision tower, read when the model is a Qwen2.5-VL.
    pub video: VideoConfig,
}

/// Which model family a run trains, detected from the `model.path` checkpoint's config.json
/// (`model_type` `qwen2_5_vl` → [`ModelKind::Qwen25VL`]; anything else, or `[model.init]`, →
/// the text decoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// The Qwen2 text decoder on chat JSONL.
    Qwen2,
    /// Qwen2.5-VL on LongVideo-Reason records (`data.train`, `data.eval`).
    Qwen25VL,
}

/// `[video]`: how videos become the vision-language model's input, and whether its tower
/// trains. Read only when `model.path` is a Qwen2.5-VL checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoConfig {
    /// Frame sampling: "all", "uniform:N" (N frames evenly spread) or "fps:F" (F frames per
    /// second). Default "uniform:8".
    pub sampling: String,
    /// Train the vision tower too (its embeddings are then computed every step, not cached).
    /// Default false (frozen tower, embeddings from the cache: one tower run per video).
    pub train_vision: bool,
    /// Memory of the vision-embedding cache in MiB. Default 1024.
    pub cache_mb: usize,
    /// Folder of the cache's on-disk tier (safetensors files, memory-mapped). Default: none.
    pub cache_dir: Option<PathBuf>,
    /// Threads per data-parallel replica that decode and preprocess the coming records' videos
    /// (in the sampler's order) while the step computes; 0 decodes each on the step's thread
    /// when it is needed. Either way the numbers are the same. Default 2.
    pub prefetch_workers: usize,
    /// Records (one micro-batch each) decoded or being decoded ahead of the step, per
    /// replica: the bound on the videos held in memory besides the one in use. ≥ 1. Default 4.
    pub prefetch_depth: usize,
    /// Where a GPU run's frozen tower encodes the videos ([`GpuTowerMode`]). Default "bf16".
    pub gpu_tower: GpuTowerMode,
}

/// `video.gpu_tower`: where the frozen vision tower runs when the run's model is on the GPU
/// (SFT's decoder, GRPO's rollout decoder, greedy accuracy's decoder). A trained tower
/// (`video.train_vision`) and a CPU run keep the CPU tower whatever this says; the cache key's
/// weights version is the same for all three (the weights are), so entries made by one serve
/// the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuTowerMode {
    /// The GPU, bf16 storage with f32 accumulation (`reel_cuda::GpuVisionTower`). The default.
    #[default]
    Bf16,
    /// The GPU, f32 storage: the CPU tower's features to f32 rounding.
    F32,
    /// The CPU tower.
    Off,
}

impl Default for VideoConfig {
    fn default() -> Self {
        Self {
            sampling: "uniform:8".to_string(),
            train_vision: false,
            cache_mb: 1024,
            cache_dir: None,
            prefetch_workers: 2,
            prefetch_depth: 4,
            gpu_tower: GpuTowerMode::Bf16,
        }
    }
}

/// `[model]`: exactly one of `path` and `init`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hugging Face checkpoint folder (config.json + *.safetensors) to start from. Default: none.
    pub path: Option<PathBuf>,
    /// A fresh, randomly initialised Qwen2 model of this shape instead of `path`. Default: none.
    pub init: Option<InitConfig>,
    /// Folder holding tokenizer.json (and tokenizer_config.json for the chat template).
    /// Default: the model `path`.
    pub tokenizer: Option<PathBuf>,
}

/// `[model.init]`: the shape of a fresh Qwen2 model (names as in HF config.json). The vocabulary
/// size is taken from the tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InitConfig {
    /// Width of the residual stream. Default 64.
    pub hidden_size: usize,
    /// Number of decoder layers. Default 2.
    pub num_hidden_layers: usize,
    /// Query heads; must divide `hidden_size`. Default 4.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); must divide `num_attention_heads`. Default 2.
    pub num_key_value_heads: usize,
    /// Width of the SwiGLU MLP. Default 128.
    pub intermediate_size: usize,
    /// RoPE base. Default 1e6 (Qwen2).
    pub rope_theta: f64,
    /// RMSNorm epsilon. Default 1e-6.
    pub rms_norm_eps: f64,
    /// Longest position the model is meant for. Default 4096.
    pub max_position_embeddings: usize,
    /// Share the input embedding with the LM head. Default true.
    pub tie_word_embeddings: bool,
    /// Seed of the weight initialisation. Default 0.
    pub seed: u64,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            seed: 0,
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// SFT JSONL file to train on. Required (default: empty, which `validate` refuses).
    pub train: PathBuf,
    /// SFT JSONL file to evaluate on every `output.eval_every` steps. Default: none.
    pub eval: Option<PathBuf>,
    /// Longest sequence in tokens; longer samples are truncated. Default 512.
    pub max_len: usize,
    /// Token budget of a micro-batch: samples are right-padded to the longest, and count ×
    /// longest stays within this. Default 4096.
    pub tokens_per_batch: usize,
    /// How samples are grouped into micro-batches: "random" (a fresh random grouping each
    /// epoch) or "bucket" (similar lengths together: least padding, less mixed batches).
    /// Default "random".
    pub batching: Batching,
    /// Seed of the sampler's shuffling. Default 0.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            max_len: 512,
            tokens_per_batch: 4096,
            batching: Batching::Random,
            seed: 0,
        }
    }
}

/// The shape of the learning-rate curve; `warmup_steps` and `min_lr_ratio` configure it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `lr` at every step (warmup and floor ignored).
    Constant,
    /// Linear warmup from 0, then cosine down to `lr · min_lr_ratio` at the last step.
    WarmupCosine,
    /// Linear warmup from 0, then linear down to `lr · min_lr_ratio` at the last step.
    WarmupLinear,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps to run. Default 100.
    pub steps: u64,
    /// Micro-batches whose gradients are summed into one optimizer step. Default 1.
    pub grad_accum: u32,
    /// Peak (base) learning rate. Default 1e-3.
    pub lr: f32,
    /// Learning-rate curve: "constant", "warmup_cosine" or "warmup_linear". Default "warmup_cosine".
    pub schedule: ScheduleKind,
    /// Steps of linear warmup from 0 (step 0 runs at lr 0, HF convention). Default 10.
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of `lr`. Default 0.1.
    pub min_lr_ratio: f32,
    /// AdamW decoupled weight decay, applied to 2-D weights only. Default 0.01.
    pub weight_decay: f32,
    /// AdamW first-moment decay. Default 0.9.
    pub beta1: f32,
    /// AdamW second-moment decay. Default 0.95.
    pub beta2: f32,
    /// AdamW epsilon. Default 1e-8.
    pub eps: f32,
    /// Clip the global gradient norm to this; 0 = no clipping. Default 1.0.
    pub grad_clip: f32,
    /// Activation checkpointing: "none", "layer" or "remat". Default "remat".
    pub checkpoint: CheckpointPolicy,
    /// Where to train: "auto" (GPU 0 when this build has the `cuda` feature and a GPU opens,
    /// else the CPU with a message), "cpu" or "cuda". Default "auto". On the GPU, `parallel.dp
    /// = M`, `parallel.sp = N` runs M·N in-process ranks sharing GPU 0 (under `reel launch`:
    /// one process per GPU); a Qwen2.5-VL run that trains its tower trains on the CPU. Not part
    /// of the config hash while "auto" (it changes rounding, not the run).
    #[serde(skip_serializing_if = "Device::is_auto")]
    pub device: Device,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let adamw = AdamWConfig::default();
        Self {
            steps: 100,
            grad_accum: 1,
            lr: 1e-3,
            schedule: ScheduleKind::WarmupCosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: adamw.weight_decay,
            beta1: adamw.beta1,
            beta2: adamw.beta2,
            eps: adamw.eps,
            grad_clip: 1.0,
            checkpoint: CheckpointPolicy::Remat,
            device: Device::Auto,
        }
    }
}

impl TrainConfig {
    /// The schedule over `steps` optimizer steps.
    pub fn lr_schedule(&self) -> LrSchedule {
        let (warmup_steps, total_steps, min_lr_ratio) =
            (self.warmup_steps, self.steps, self.min_lr_ratio);
        match self.schedule {
            ScheduleKind::Constant => LrSchedule::Constant,
            ScheduleKind::WarmupCosine => LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            },
            ScheduleKind::WarmupLinear => LrSchedule::WarmupLinear {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            },
        }
    }

    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// The attention schedule of the sequence-parallel ranks (`parallel.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpSchedule {
    /// LightSeq's load-balanced DistAttn; contiguous shards (rank r holds chunk r).
    #[default]
    Distattn,
    /// Plain causal ring; contiguous shards (the last rank does the most work).
    Ring,
    /// Zigzag ring; rank r holds chunks r and 2P−1−r, which balances the causal work.
    Zigzag,
    /// DeepSpeed-Ulysses: all-to-all over heads across all sp ranks (u = sp), then attention of
    /// whole sequences on H/sp heads each; needs sp | H_kv. Contiguous shards.
    Ulysses,
    /// Ulysses groups of `parallel.ulysses_degree` ranks × a ring over the sp / u groups (USP's
    /// 2-D attention); needs u | H_kv. Contiguous shards.
    Hybrid,
}

impl std::fmt::Display for SpSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpSchedule::Distattn => "distattn",
            SpSchedule::Ring => "ring",
            SpSchedule::Zigzag => "zigzag",
            SpSchedule::Ulysses => "ulysses",
            SpSchedule::Hybrid => "hybrid",
        })
    }
}

impl SpSchedule {
    /// The ring-family schedule it names (its sharding layout follows from it); `None` for
    /// Ulysses and the hybrid.
    pub fn kind(self) -> Option<AttnScheduleKind> {
        match self {
            SpSchedule::Distattn => Some(AttnScheduleKind::DistAttnCausal),
            SpSchedule::Ring => Some(AttnScheduleKind::RingCausal),
            SpSchedule::Zigzag => Some(AttnScheduleKind::ZigzagRingCausal),
            SpSchedule::Ulysses | SpSchedule::Hybrid => None,
        }
    }

    /// Ulysses or the hybrid.
    pub fn is_ulysses(self) -> bool {
        self.kind().is_none()
    }
}

/// `[parallel]`: `dp` data-parallel replicas × `sp` sequence-parallel ranks, `dp · sp` ranks in
/// all (one thread each today). Each optimizer step draws `dp · train.grad_accum` micro-batches;
/// replica d takes micro-batches d, d + dp, …, and the `sp` ranks of a replica each take their
/// token shard of the same micro-batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Sequence-parallel ranks sharing each sequence. Default 1.
    pub sp: usize,
    /// Data-parallel replicas. Default 1.
    pub dp: usize,
    /// Attention across the sp ranks: "distattn", "ring", "zigzag" (ring-family schedules),
    /// "ulysses" (all-to-all over heads, u = sp; needs sp | H_kv) or "hybrid" (Ulysses groups of
    /// `ulysses_degree` ranks × a ring over the groups). Default "distattn".
    pub schedule: SpSchedule,
    /// u, the ranks of each Ulysses all-to-all group under `schedule = "hybrid"` (r = sp / u
    /// groups form the ring); must divide sp and the model's H_kv. 0 picks the largest u that
    /// divides both sp and H_kv. Only "hybrid" reads it. Default 0.
    pub ulysses_degree: usize,
    /// Overlap the KV/query exchange of the next schedule step with this step's compute.
    /// Default true.
    pub overlap: bool,
    /// Seconds any rank waits on another before the run fails; must exceed the longest gap
    /// between two ranks (rank 0 evaluates and writes checkpoints while the others wait).
    /// Default 60.
    pub timeout_s: u64,
    /// On GPUs, shard the fp32 master weights and AdamW moments over the dp × sp ranks
    /// (ZeRO-1: 12 bytes a parameter become 12 / (dp · sp)); gradients are reduce-scattered
    /// and the updated weights all-gathered, the same bytes as the replicated all-reduce. Read
    /// by GPU SFT and VLM GRPO; ignored at one rank, and a warning where ranks train on the
    /// CPU. Default false.
    pub shard_optimizer: bool,
    /// With `shard_optimizer`, shard the fp32 gradients too (ZeRO-2: 4 bytes a parameter
    /// become 4 / (dp · sp); 15 GB a GPU at 7B over 2): each layer's gradients are summed onto
    /// their shard's owner as soon as its backward is done, once per micro-batch instead of
    /// once per step. Needs `shard_optimizer`; the whole fp32 weights are then only ever
    /// gathered to the host (checkpoints). Default false.
    pub shard_gradients: bool,
    /// VLM GRPO under `reel launch` with sp > 1 and rollouts on the GPUs: a prompt of at least
    /// this many tokens is prefilled by its replica's sp processes together (MR-SP's
    /// sequence-parallel prefill: each computes a zigzag 1/sp of the rows, every layer's keys
    /// and values are gathered over NCCL, so each holds the whole cache), and each of them then
    /// decodes its share of the group's samples. 0 rolls every prompt out on its owner alone.
    /// Default 8192.
    pub shared_prefill_tokens: usize,
}

/// How much of the fp32 training state the GPU ranks shard over the dp × sp world
/// ([`ParallelConfig::zero_stage`]; one rank keeps everything whatever it says).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroStage {
    /// Every rank keeps the master weights, moments and gradients whole.
    #[default]
    Replicated,
    /// ZeRO-1: master weights and AdamW moments sharded (`parallel.shard_optimizer`).
    Optimizer,
    /// ZeRO-2: the gradients too (`parallel.shard_gradients`).
    Gradients,
}

impl ZeroStage {
    /// The stage of `parallel.shard_optimizer` and `parallel.shard_gradients` (the latter only
    /// counts with the former).
    pub fn from_flags(shard_optimizer: bool, shard_gradients: bool) -> Self {
        match (shard_optimizer, shard_gradients) {
            (false, _) => ZeroStage::Replicated,
            (true, false) => ZeroStage::Optimizer,
            (true, true) => ZeroStage::Gradients,
        }
    }

    /// Whether the optimizer state is sharded (either stage).
    pub fn sharded(self) -> bool {
        self != ZeroStage::Replicated
    }
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            sp: 1,
            dp: 1,
            schedule: SpSchedule::Distattn,
            ulysses_degree: 0,
            overlap: true,
            timeout_s: 60,
            shard_optimizer: false,
            shard_gradients: false,
            shared_prefill_tokens: 8192,
        }
    }
}

impl ParallelConfig {
    /// Logs, once at the start of a run whose ranks keep the whole optimizer state, that
    /// `shard_optimizer` is set but not applied there (`why`: where the run trains); returns
    /// whether it did (set, over several ranks).
    pub fn note_unsharded(&self, why: &str) -> bool {
        let unapplied = self.shard_optimizer && self.world() > 1;
        if unapplied {
            tracing::warn!(
                "parallel.shard_optimizer = true is not applied: {why}; every rank keeps the \
                 whole optimizer state"
            );
        }
        unapplied
    }

    /// What a GPU rank keeps of the fp32 training state: `shard_optimizer` and
    /// `shard_gradients` as one value.
    pub fn zero_stage(&self) -> ZeroStage {
        ZeroStage::from_flags(self.shard_optimizer, self.shard_gradients)
    }

    /// `dp · sp`, the number of ranks (saturating; `validate` refuses an overflow).
    pub fn world(&self) -> usize {
        self.dp.saturating_mul(self.sp)
    }

    /// The validated `dp × sp` grid.
    pub fn dims(&self) -> Result<ParallelDims, ConfigError> {
        let world = self.dp.checked_mul(self.sp).ok_or(ConfigError::Invalid {
            key: "parallel.sp",
            message: format!("dp × sp = {} × {} overflows", self.dp, self.sp),
        })?;
        ParallelDims::new(self.dp, self.sp, world).map_err(|e| ConfigError::Invalid {
            key: if self.dp == 0 {
                "parallel.dp"
            } else {
                "parallel.sp"
            },
            message: e.to_string(),
        })
    }

    /// Checks `schedule` and `ulysses_degree` against sp (the model's heads are checked by
    /// [`ParallelConfig::sp_method`]); errors name the key.
    pub fn check_schedule(&self) -> Result<(), ConfigError> {
        let bad = |key, message: String| Err(ConfigError::Invalid { key, message });
        let sp = self.sp;
        match self.schedule.kind() {
            Some(kind) => {
                if let Err(e) = kind.build(sp) {
                    return bad("parallel.schedule", e.to_string());
                }
                if self.ulysses_degree != 0 {
                    return bad(
                        "parallel.ulysses_degree",
                        format!(
                            "is read by schedule = \"hybrid\" only, not \"{}\"; remove it or \
                             set parallel.schedule = \"hybrid\"",
                            self.schedule
                        ),
                    );
                }
            }
            None if self.schedule == SpSchedule::Ulysses && self.ulysses_degree != 0 => {
                return bad(
                    "parallel.ulysses_degree",
                    format!(
                        "pure Ulysses all-to-alls over all sp = {sp} ranks; to choose u = {}, \
                         set parallel.schedule = \"hybrid\"",
                        self.ulysses_degree
                    ),
                );
            }
            None => {
                let u = self.ulysses_degree;
                if u != 0 && !sp.is_multiple_of(u) {
                    return bad(
                        "parallel.ulysses_degree",
                        format!("u = {u} must divide parallel.sp = {sp} (r = sp / u groups)"),
                    );
                }
            }
        }
        Ok(())
    }

    /// The attention method of the sp ranks for a decoder with `h` query and `h_kv` KV heads:
    /// the ring-family schedule, or the Ulysses grid (u = sp for "ulysses"; `ulysses_degree`, or
    /// the largest u dividing sp and H_kv, for "hybrid"). Refuses u ∤ H_kv naming the key and
    /// the u that would work.
    pub fn sp_method(&self, h: usize, h_kv: usize) -> Result<SpMethod, ConfigError> {
        self.check_schedule()?;
        let sp = self.sp.max(1);
        let invalid = |key, message| ConfigError::Invalid { key, message };
        if let Some(kind) = self.schedule.kind() {
            let s = kind
                .build(sp)
                .map_err(|e| invalid("parallel.schedule", e.to_string()))?;
            return Ok(SpMethod::Schedule(s));
        }
        let (key, u) = match (self.schedule, self.ulysses_degree) {
            (SpSchedule::Ulysses, _) => ("parallel.schedule", sp),
            (_, 0) => ("parallel.ulysses_degree", gcd(sp, h_kv.max(1))),
            (_, u) => ("parallel.ulysses_degree", u),
        };
        let grid = UlyssesGrid::new(u, sp / u).map_err(|e| invalid(key, e.to_string()))?;
        match grid.check_heads(h, h_kv) {
            Ok(()) => Ok(SpMethod::Ulysses(grid)),
            Err(e @ UlyssesError::KvHeads { .. }) => {
                let best = gcd(sp, h_kv.max(1));
                Err(invalid(
                    key,
                    format!(
                        "u = {u} ranks per all-to-all group must divide the model's H_kv = \
                         {h_kv} KV heads ({e}); set parallel.schedule = \"hybrid\" with \
                         parallel.ulysses_degree = {best} (r = {} groups in the ring), or a \
                         ring-family schedule",
                        sp / best
                    ),
                ))
            }
            Err(e) => Err(invalid(key, e.to_string())),
        }
    }

    /// The ring-family schedule the sharded rollout's prefill runs: this one, or balanced
    /// DistAttn under Ulysses and the hybrid (the rollout engine's KV stays sharded by tokens).
    pub fn rollout_schedule(&self) -> AttnScheduleKind {
        self.schedule
            .kind()
            .unwrap_or(AttnScheduleKind::DistAttnCausal)
    }

    /// The communicator's timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    /// The executor's overlap mode.
    pub fn overlap_mode(&self) -> Overlap {
        if self.overlap {
            Overlap::Overlapped
        } else {
            Overlap::Blocking
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `[output]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Run folder: checkpoints/, metrics.jsonl, config.toml. Default "runs/sft".
    pub dir: PathBuf,
    /// Save a checkpoint every this many steps (and after the last); 0 = only after the last.
    /// Default 50.
    pub save_every: u64,
    /// Evaluate on `data.eval` every this many steps, and after the last step; 0 = only after
    /// the last step. Default 0.
    pub eval_every: u64,
    /// Complete checkpoints to keep (the newest is never deleted); 0 = keep all. Default 2.
    pub keep_last: usize,
    /// Log a line (or refresh the progress bar) every this many steps; 0 = never. Default 1.
    pub log_every: u64,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/sft"),
            save_every: 50,
            eval_every: 0,
            keep_last: 2,
            log_every: 1,
        }
    }
}

/// The commented example config; parses to `SftConfig::default()`.
const DOCUMENTED_DEFAULT: &str = r#"# reel SFT run configuration. Every key is optional; the values shown are the defaults.
# Unknown keys are errors. Override any key on the command line: --set train.lr=3e-4

[model]
# Hugging Face checkpoint folder (config.json + *.safetensors) to start from.
# Exactly one of `path` and [model.init] must be given.
# path = "models/Qwen2-0.5B-Instruct"
# Folder holding tokenizer.json. Default: the model path.
# tokenizer = "models/Qwen2-0.5B-Instruct"

# A fresh, randomly initialised Qwen2 model instead of `path` (vocabulary size from the tokenizer):
# [model.init]
# hidden_size = 64
# num_hidden_layers = 2
# num_attention_heads = 4         # must divide hidden_size
# num_key_value_heads = 2         # must divide num_attention_heads
# intermediate_size = 128
# rope_theta = 1000000.0
# rms_norm_eps = 1e-6
# max_position_embeddings = 4096
# tie_word_embeddings = true
# seed = 0                        # weight initialisation

[data]
# SFT JSONL to train on (required).
train = ""
# SFT JSONL to evaluate on every output.eval_every steps.
# eval = "data/eval.jsonl"
# Longest sequence in tokens; longer samples are truncated.
max_len = 512
# Token budget of a micro-batch: samples are right-padded to the longest, count × longest ≤ this.
tokens_per_batch = 4096
# "random" (a fresh random grouping each epoch) or "bucket" (similar lengths together: least
# padding, but batches then differ systematically).
batching = "random"
# Seed of the sampler's shuffling.
seed = 0

[train]
# Optimizer steps to run.
steps = 100
# Micro-batches summed into one optimizer step.
grad_accum = 1
# Peak learning rate.
lr = 1e-3
# "constant", "warmup_cosine" or "warmup_linear".
schedule = "warmup_cosine"
# Linear warmup from 0 over this many steps (step 0 runs at lr 0).
warmup_steps = 10
# Final learning rate as a fraction of lr.
min_lr_ratio = 0.1
# AdamW; weight decay applies to 2-D weights only.
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
# Clip the global gradient norm to this; 0 = no clipping.
grad_clip = 1.0
# Activation checkpointing: "none", "layer" (recompute whole layers) or "remat"
# (keep attention outputs, recompute only the rest).
checkpoint = "remat"
# Where to train: "auto" (the GPU when this build has the cuda feature and one opens, else
# the CPU with a message), "cpu" or "cuda".
device = "auto"

[parallel]
# dp data-parallel replicas x sp sequence-parallel ranks (one thread each). Each optimizer step
# draws dp * grad_accum micro-batches; replica d takes micro-batches d, d+dp, ...; the sp ranks of
# a replica each take their shard of the tokens of the same micro-batch.
sp = 1
dp = 1
# Attention across the sp ranks: "distattn" (LightSeq's balanced schedule), "ring", "zigzag",
# "ulysses" (all-to-all over heads; sp must divide the model's KV heads) or "hybrid" (Ulysses
# groups of ulysses_degree ranks x a ring over the sp / ulysses_degree groups).
schedule = "distattn"
# Ranks per Ulysses group under schedule = "hybrid"; must divide sp and the KV heads. 0 = the
# largest that divides both.
ulysses_degree = 0
# Overlap the next schedule step's messages with this step's compute.
overlap = true
# Seconds a rank waits on another before the run fails; must exceed the longest gap between
# ranks (rank 0 evaluates and writes checkpoints while the others wait).
timeout_s = 60
# On GPUs, shard the fp32 master weights and AdamW moments over the dp x sp ranks (ZeRO-1).
shard_optimizer = false
# With shard_optimizer, shard the fp32 gradients too (ZeRO-2): each layer's gradients summed
# onto their owner as its backward ends, once per micro-batch.
shard_gradients = false
# VLM GRPO launched over GPUs with sp > 1: prompts of at least this many tokens are prefilled
# by the replica's sp processes together, each then decoding a share of the samples; 0 = each
# prompt rolled out on its owner alone.
shared_prefill_tokens = 8192

[output]
# Run folder: checkpoints/, metrics.jsonl, config.toml.
dir = "runs/sft"
# Checkpoint every this many steps (and after the last); 0 = only after the last.
save_every = 50
# Evaluate on data.eval every this many steps and after the last; 0 = only after the last.
eval_every = 0
# Complete checkpoints to keep (the newest is never deleted); 0 = keep all.
keep_last = 2
# Log every this many steps; 0 = never.
log_every = 1

# Read when model.path is a Qwen2.5-VL checkpoint (config.json model_type "qwen2_5_vl"): then
# data.train and data.eval are LongVideo-Reason JSONL (reasoning + answer as the target), one
# record (its videos and tokens, one sequence) per micro-batch; data.tokens_per_batch does not
# apply and a record longer than data.max_len loses its tail (skipped when a video would be cut).
[video]
# Frame sampling: "all", "uniform:N" or "fps:F".
sampling = "uniform:8"
# Train the vision tower too (embeddings computed every step); false = frozen tower, embeddings
# served from the content-addressed cache (one tower run per video).
train_vision = false
# Memory of the vision-embedding cache in MiB.
cache_mb = 1024
# On-disk tier of the cache.
# cache_dir = "runs/embed-cache"
# Threads per data-parallel replica decoding the coming records' videos (sampler order) while
# the step computes; 0 = decode on the step's thread when needed (same numbers either way).
prefetch_workers = 2
# Records decoded or being decoded ahead of the step, per replica (bounds the videos in memory).
prefetch_depth = 4
# On a GPU run with a frozen tower: encode videos on the GPU ("bf16", "f32") or the CPU ("off").
gpu_tower = "bf16"
"#;

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// 64-bit FNV-1a: a hash that is the same on every machine and Rust version.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Parses a run config of any trainer from TOML text; `origin` names it in errors (with line and
/// column).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| line_column(text, s.start));
        ConfigError::Parse {
            path: origin.to_path_buf(),
            line,
            column,
            message: e.message().to_string(),
        }
    })
}

/// Reads and parses a run config file of any trainer.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Applies one `section.key=value` override to a run config of any trainer (the value is parsed
/// as a TOML value, or taken as a string when it is not one). On error the config is unchanged
/// and the error names the key.
pub fn apply_override<T: Serialize + serde::de::DeserializeOwned>(
    cfg: &mut T,
    spec: &str,
) -> Result<(), ConfigError> {
    let err = |key: &str, message: String| ConfigError::Override {
        key: key.to_string(),
        message,
    };
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| err(spec, "expected key=value".into()))?;
    let (key, raw) = (key.trim(), raw.trim());
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(key, "empty key segment".into()));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));

    let mut root = toml::Table::try_from(&*cfg).map_err(|e| err(key, e.to_string()))?;
    let (last, parents) = parts.split_last().expect("split yields at least one part");
    let mut table = &mut root;
    for (depth, part) in parents.iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Table::new().into());
        table = entry.as_table_mut().ok_or_else(|| {
            err(
                key,
                format!("`{}` is a value, not a section", parts[..=depth].join(".")),
            )
        })?;
    }
    table.insert(last.to_string(), value);
    *cfg = root
        .try_into()
        .map_err(|e: toml::de::Error| err(key, e.message().to_string()))?;
    Ok(())
}

/// The family of the checkpoint folder `dir`: Qwen2.5-VL when its config.json says
/// `model_type` = `qwen2_5_vl`, else the text decoder. An unreadable config.json is an error
/// naming it.
pub fn model_kind_of(dir: &Path) -> Result<ModelKind, ConfigError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    Ok(
        match v.get("model_type").and_then(serde_json::Value::as_str) {
            Some("qwen2_5_vl") => ModelKind::Qwen25VL,
            _ => ModelKind::Qwen2,
        },
    )
}

/// 64-bit FNV-1a of a config's TOML, as 16 hex digits.
pub(crate) fn hash_hex(text: &str) -> String {
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

impl SftConfig {
    /// Reads and parses a TOML file; errors name the path and the line and column.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        parse_toml(text, origin)
    }

    /// Applies one `section.key=value` override (`train.lr=3e-4`, `model.init.hidden_size=128`,
    /// `output.dir=runs/x`). The value is parsed as a TOML value, or taken as a string when it is
    /// not one. On error the config is unchanged and the error names the key.
    pub fn apply_override(&mut self, spec: &str) -> Result<(), ConfigError> {
        apply_override(self, spec)
    }

    /// Checks what types cannot: required keys, ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        match (&self.model.path, &self.model.init) {
            (None, None) => {
                return bad(
                    "model.path",
                    "give a checkpoint `path` or a [model.init] table",
                )
            }
            (Some(_), Some(_)) => {
                return bad("model.init", "give either `path` or [model.init], not both")
            }
            _ => {}
        }
        if self.model.path.is_none() && self.model.tokenizer.is_none() {
            return bad(
                "model.tokenizer",
                "required when the model is initialised fresh",
            );
        }
        if let Some(init) = &self.model.init {
            let sizes = [
                ("model.init.hidden_size", init.hidden_size),
                ("model.init.num_hidden_layers", init.num_hidden_layers),
                ("model.init.num_attention_heads", init.num_attention_heads),
                ("model.init.num_key_value_heads", init.num_key_value_heads),
                ("model.init.intermediate_size", init.intermediate_size),
            ];
            for (key, n) in sizes {
                if n == 0 {
                    return bad(key, "must be at least 1");
                }
            }
            if init.hidden_size % init.num_attention_heads != 0 {
                return bad("model.init.num_attention_heads", "must divide hidden_size");
            }
            if (init.hidden_size / init.num_attention_heads) % 2 != 0 {
                return bad(
                    "model.init.num_attention_heads",
                    "head dim (hidden_size / heads) must be even for RoPE",
                );
            }
            if init.num_attention_heads % init.num_key_value_heads != 0 {
                return bad(
                    "model.init.num_key_value_heads",
                    "must divide num_attention_heads",
                );
            }
        }
        if self.data.train.as_os_str().is_empty() {
            return bad("data.train", "required: the SFT JSONL file to train on");
        }
        if self.data.max_len == 0 {
            return bad("data.max_len", "must be at least 1");
        }
        if self.data.tokens_per_batch < self.data.max_len {
            return bad(
                "data.tokens_per_batch",
                "must be at least data.max_len (one whole sequence)",
            );
        }
        let t = &self.train;
        if t.steps == 0 {
            return bad("train.steps", "must be at least 1");
        }
        if t.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1");
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("train.lr", "must be a positive number");
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad("train.min_lr_ratio", "must be in [0, 1]");
        }
        for (key, beta) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(key, "must be in [0, 1)");
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return bad("train.eps", "must be a positive number");
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad("train.weight_decay", "must be >= 0");
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return bad("train.grad_clip", "must be >= 0 (0 = no clipping)");
        }
        let p = &self.parallel;
        p.dims()?;
        p.check_schedule()?;
        if p.timeout_s == 0 {
            return bad("parallel.timeout_s", "must be at least 1");
        }
        if p.shard_gradients && !p.shard_optimizer {
            return bad(
                "parallel.shard_gradients",
                "needs parallel.shard_optimizer = true (the gradients are sharded as the \
                 optimizer state is)",
            );
        }
        if self.output.dir.as_os_str().is_empty() {
            return bad("output.dir", "must not be empty");
        }
        if self.output.eval_every > 0 && self.data.eval.is_none() {
            return bad("output.eval_every", "needs data.eval");
        }
        if let Err(e) = crate::vl::parse_sampling(&self.video.sampling) {
            return Err(ConfigError::Invalid {
                key: "video.sampling",
                message: format!("{e:#}"),
            });
        }
        if self.video.cache_mb == 0 {
            return bad("video.cache_mb", "must be at least 1");
        }
        if self.video.prefetch_depth == 0 {
            return bad("video.prefetch_depth", "must be at least 1");
        }
        Ok(())
    }

    /// The model family: Qwen2.5-VL when `model.path`'s config.json says `model_type` =
    /// `qwen2_5_vl`, else the text decoder. An unreadable config.json is an error naming it.
    pub fn model_kind(&self) -> Result<ModelKind, ConfigError> {
        match &self.model.path {
            Some(dir) => model_kind_of(dir),
            None => Ok(ModelKind::Qwen2),
        }
    }

    /// The tokenizer folder: `model.tokenizer`, else `model.path`.
    pub fn tokenizer_dir(&self) -> Option<&Path> {
        self.model
            .tokenizer
            .as_deref()
            .or(self.model.path.as_deref())
    }

    /// The config as TOML (what a run saves as `config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("SftConfig always serialises to TOML")
    }

    /// A hash of everything that shapes the run's numbers (`[model]`, `[data]`, `[train]`,
    /// `parallel.dp`, which sets the micro-batches per step, and `[video]` but its cache
    /// settings; not `[output]`, nor `sp`, the schedule or the timeout, which change only
    /// rounding), as 16 hex digits; a resumed run compares it with the checkpoint's. With
    /// `dp = 1` and the default video settings it is the hash of runs made before `[parallel]`
    /// and `[video]` existed.
    pub fn config_hash(&self) -> String {
        #[derive(Serialize)]
        struct Shaping<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            dp: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            video: Option<(&'a str, bool)>,
            model: &'a ModelConfig,
            data: &'a DataConfig,
            train: &'a TrainConfig,
        }
        let text = toml::to_string(&Shaping {
            dp: (self.parallel.dp != 1).then_some(self.parallel.dp),
            video: (self.video.sampling != VideoConfig::default().sampling
                || self.video.train_vision)
                .then_some((self.video.sampling.as_str(), self.video.train_vision)),
            model: &self.model,
            data: &self.data,
            train: &self.train,
        })
        .expect("SftConfig always serialises to TOML");
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }

    /// A complete example config with a comment on every key, showing the defaults.
    pub fn documented_default() -> String {
        DOCUMENTED_DEFAULT.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shard_optimizer` set over several ranks that keep the whole state is reported; unset,
    /// or at one rank (where there is nothing to shard), it is not.
    #[test]
    fn an_unapplied_shard_optimizer_is_reported_only_where_it_matters() {
        let mut p = ParallelConfig::default();
        assert!(!p.note_unsharded("test"), "unset");
        p.shard_optimizer = true;
        assert!(!p.note_unsharded("test"), "one rank");
        p.sp = 2;
        assert!(p.note_unsharded("test"), "sp 2");
        p.sp = 1;
        p.dp = 3;
        assert!(p.note_unsharded("test"), "dp 3");
        p.shard_optimizer = false;
        assert!(!p.note_unsharded("test"), "unset at dp 3");
    }

    /// `shard_gradients` alone is refused naming the key; with `shard_optimizer` it is ZeRO-2.
    #[test]
    fn sharded_gradients_need_a_sharded_optimizer() {
        let mut c = SftConfig::default();
        c.model.path = Some("ckpt".into());
        c.data.train = "t.jsonl".into();
        c.validate().unwrap();
        c.parallel.shard_gradients = true;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("parallel.shard_gradients"), "{err}");
        assert_eq!(c.parallel.zero_stage(), ZeroStage::Replicated);
        c.parallel.shard_optimizer = true;
        c.validate().unwrap();
        assert_eq!(c.parallel.zero_stage(), ZeroStage::Gradients);
        c.parallel.shard_gradients = false;
        assert_eq!(c.parallel.zero_stage(), ZeroStage::Optimizer);
        assert!(c.parallel.zero_stage().sharded());
    }

    fn parse(text: &str) -> Result<SftConfig, ConfigError> {
        SftConfig::parse(text, Path::new("run.toml"))
    }

    #[test]
    fn parses_a_config() {
        let cfg = parse(
            r#"
[model]
init = { hidden_size = 32, num_hidden_layers = 1 }
tokenizer = "tok"
[data]
train = "train.jsonl"
max_len = 128
[train]
lr = 3e-4
steps = 7
schedule = "warmup_linear"
checkpoint = "layer"
[output]
dir = "runs/x"
"#,
        )
        .unwrap();
        let init = cfg.model.init.as_ref().unwrap();
        assert_eq!(
            (
                init.hidden_size,
                init.num_hidden_layers,
                init.num_attention_heads
            ),
            (32, 1, 4)
        );
        assert_eq!(cfg.tokenizer_dir(), Some(Path::new("tok")));
        assert_eq!(cfg.data.train, PathBuf::from("train.jsonl"));
        assert_eq!((cfg.data.max_len, cfg.data.tokens_per_batch), (128, 4096));
        assert_eq!((cfg.train.lr, cfg.train.steps), (3e-4, 7));
        assert_eq!(cfg.train.checkpoint, CheckpointPolicy::Layer);
        assert_eq!(
            cfg.train.lr_schedule(),
            LrSchedule::WarmupLinear {
                warmup_steps: 10,
                total_steps: 7,
                min_lr_ratio: 0.1
            }
        );
        assert_eq!(
            cfg.train.adamw(),
            AdamWConfig {
                lr: 3e-4,
                ..Default::default()
            }
        );
        assert_eq!(cfg.output.dir, PathBuf::from("runs/x"));
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_an_error_naming_it_with_line_and_column() {
        let err = parse("[train]\nsteps = 3\nlrr = 1e-3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("lrr"), "{msg}");
        assert!(msg.starts_with("run.toml:3:1:"), "{msg}");

        let err = parse("[trian]\n").unwrap_err().to_string();
        assert!(err.contains("trian"), "{err}");
        let err = parse("[train]\nsteps = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("run.toml:2:9:"), "{err}");
    }

    #[test]
    fn from_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let msg = SftConfig::from_file(&missing).unwrap_err().to_string();
        assert!(msg.contains("nope.toml"), "{msg}");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[data]\nmax_len = \n").unwrap();
        let msg = SftConfig::from_file(&bad).unwrap_err().to_string();
        assert!(msg.contains("bad.toml:2:"), "{msg}");
    }

    #[test]
    fn overrides_set_nested_keys() {
        let mut cfg = SftConfig::default();
        cfg.apply_override("train.lr=3e-4").unwrap();
        cfg.apply_override("train.steps = 250").unwrap();
        cfg.apply_override("train.lr_unused_check=1").unwrap_err();
        cfg.apply_override("output.dir=runs/x y").unwrap();
        cfg.apply_override("data.train=\"a.jsonl\"").unwrap();
        cfg.apply_override("train.schedule=constant").unwrap();
        cfg.apply_override("train.grad_clip=2").unwrap();
        cfg.apply_override("model.init.hidden_size=128").unwrap();
        cfg.apply_override("model.path=ckpt").unwrap();
        assert_eq!(cfg.train.lr, 3e-4);
        assert_eq!(cfg.train.steps, 250);
        assert_eq!(cfg.output.dir, PathBuf::from("runs/x y"));
        assert_eq!(cfg.data.train, PathBuf::from("a.jsonl"));
        assert_eq!(cfg.train.schedule, ScheduleKind::Constant);
        assert_eq!(cfg.train.grad_clip, 2.0);
        assert_eq!(
            cfg.model.init,
            Some(InitConfig {
                hidden_size: 128,
                ..Default::default()
            })
        );
        assert_eq!(cfg.model.path, Some(PathBuf::from("ckpt")));
        // Everything else keeps its default.
        assert_eq!(cfg.train.beta2, 0.95);
        assert_eq!(cfg.output.keep_last, 2);
    }

    #[test]
    fn override_errors_name_the_key_and_change_nothing() {
        let mut cfg = SftConfig::default();
        for (spec, key) in [
            ("train.lrr=1", "train.lrr"),
            ("trian.lr=1", "trian.lr"),
            ("train.steps=many", "train.steps"),
            ("train.lr.x=1", "train.lr.x"),
            ("train..lr=1", "train..lr"),
        ] {
            let err = cfg.apply_override(spec).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Override { key: k, .. } if k == key),
                "{spec}: {err}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
        assert!(cfg.apply_override("train.lr").is_err());
        assert_eq!(cfg, SftConfig::default());
    }

    #[test]
    fn documented_default_round_trips() {
        let parsed = parse(&SftConfig::documented_default()).unwrap();
        assert_eq!(parsed, SftConfig::default());
        assert_eq!(
            parse(&SftConfig::default().to_toml()).unwrap(),
            SftConfig::default()
        );
    }

    /// Every key of every section appears in the documented default (commented out for the
    /// optional ones), so a new field cannot be forgotten there.
    #[test]
    fn documented_default_mentions_every_field() {
        let mut full = SftConfig::default();
        full.model.path = Some("p".into());
        full.model.tokenizer = Some("t".into());
        full.model.init = Some(InitConfig::default());
        full.data.eval = Some("e".into());
        full.video.cache_dir = Some("c".into());
        let table = toml::Table::try_from(&full).unwrap();
        let doc = SftConfig::documented_default();
        fn walk(prefix: &str, t: &toml::Table, doc: &str) {
            for (k, v) in t {
                if let Some(sub) = v.as_table() {
                    let header = format!("[{prefix}{k}]");
                    assert!(doc.contains(&header), "documented default lacks {header}");
                    walk(&format!("{prefix}{k}."), sub, doc);
                } else {
                    let found = doc.lines().any(|l| {
                        let l = l.trim_start_matches(['#', ' ']);
                        l.starts_with(&format!("{k} =")) || l.starts_with(&format!("{k}="))
                    });
                    assert!(found, "documented default lacks `{prefix}{k}`");
                }
            }
        }
        walk("", &table, &doc);
    }

    #[test]
    fn validate_catches_inconsistencies() {
        let mut cfg = SftConfig::default();
        let key = |cfg: &SftConfig| match cfg.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        };
        assert_eq!(key(&cfg), "model.path");
        cfg.model.path = Some("ckpt".into());
        assert_eq!(key(&cfg), "data.train");
        cfg.data.train = "t.jsonl".into();
        cfg.validate().unwrap();
        cfg.data.tokens_per_batch = 100;
        assert_eq!(key(&cfg), "data.tokens_per_batch");
        cfg.data.tokens_per_batch = 4096;
        cfg.model.init = Some(InitConfig::default());
        assert_eq!(key(&cfg), "model.init");
        cfg.model.path = None;
        assert_eq!(key(&cfg), "model.tokenizer");
        cfg.model.tokenizer = Some("tok".into());
        cfg.validate().unwrap();
        cfg.model.init.as_mut().unwrap().num_key_value_heads = 3;
        assert_eq!(key(&cfg), "model.init.num_key_value_heads");
        cfg.model.init.as_mut().unwrap().num_key_value_heads = 2;
        cfg.output.eval_every = 10;
        assert_eq!(key(&cfg), "output.eval_every");
        cfg.output.eval_every = 0;
        cfg.validate().unwrap();
        cfg.parallel.sp = 0;
        assert_eq!(key(&cfg), "parallel.sp");
        cfg.parallel.sp = 2;
        cfg.parallel.dp = 0;
        assert_eq!(key(&cfg), "parallel.dp");
        cfg.parallel.dp = usize::MAX;
        assert_eq!(key(&cfg), "parallel.sp");
        cfg.parallel.dp = 3;
        cfg.validate().unwrap();
        cfg.parallel.timeout_s = 0;
        assert_eq!(key(&cfg), "parallel.timeout_s");
    }

    /// "ulysses" and "hybrid" parse into Ulysses grids for the model's heads; u ∤ H_kv is refused
    /// naming the key and suggesting the hybrid's u; `ulysses_degree` is checked against sp and
    /// refused where it is not read.
    #[test]
    fn ulysses_and_hybrid_schedules() {
        let grid = |u, r| SpMethod::Ulysses(UlyssesGrid::new(u, r).unwrap());
        let cfg = parse("[parallel]\nsp = 4\nschedule = \"ulysses\"\n").unwrap();
        assert_eq!(cfg.parallel.schedule, SpSchedule::Ulysses);
        assert!(cfg.parallel.schedule.is_ulysses() && cfg.parallel.schedule.kind().is_none());
        assert_eq!(cfg.parallel.sp_method(8, 4).unwrap(), grid(4, 1));
        assert_eq!(
            cfg.parallel.rollout_schedule(),
            AttnScheduleKind::DistAttnCausal
        );
        let e = cfg.parallel.sp_method(12, 6).unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "parallel.schedule",
                    ..
                }
            ) && m.contains("H_kv = 6")
                && m.contains("\"hybrid\" with parallel.ulysses_degree = 2")
                && m.contains("r = 2 groups"),
            "{m}"
        );
        // The hybrid: u given, or the largest dividing sp and H_kv.
        let cfg = parse("[parallel]\nsp = 4\nschedule = \"hybrid\"\nulysses_degree = 2\n").unwrap();
        assert_eq!(cfg.parallel.sp_method(12, 6).unwrap(), grid(2, 2));
        let e = cfg.parallel.sp_method(3, 1).unwrap_err().to_string();
        assert!(
            e.contains("parallel.ulysses_degree") && e.contains("ulysses_degree = 1"),
            "{e}"
        );
        let mut cfg = SftConfig::default();
        cfg.apply_override("parallel.sp=6").unwrap();
        cfg.apply_override("parallel.schedule=hybrid").unwrap();
        cfg.parallel.check_schedule().unwrap();
        assert_eq!(cfg.parallel.sp_method(8, 4).unwrap(), grid(2, 3));
        assert_eq!(cfg.parallel.sp_method(12, 6).unwrap(), grid(6, 1));
        cfg.apply_override("parallel.ulysses_degree=4").unwrap();
        let key = |c: &SftConfig| match c.parallel.check_schedule() {
            Err(ConfigError::Invalid { key, message }) => format!("{key}: {message}"),
            other => panic!("{other:?}"),
        };
        assert!(key(&cfg).starts_with("parallel.ulysses_degree: u = 4 must divide parallel.sp = 6"));
        cfg.parallel.schedule = SpSchedule::Ring;
        assert!(key(&cfg).contains("\"hybrid\" only"), "{}", key(&cfg));
        cfg.parallel.schedule = SpSchedule::Ulysses;
        assert!(key(&cfg).contains("set parallel.schedule = \"hybrid\""));
        cfg.parallel.ulysses_degree = 0;
        cfg.parallel.check_schedule().unwrap();
        // The ring family still maps to its schedules.
        cfg.parallel.schedule = SpSchedule::Zigzag;
        assert!(matches!(
            cfg.parallel.sp_method(4, 2).unwrap(),
            SpMethod::Schedule(s) if s.kind == AttnScheduleKind::ZigzagRingCausal && s.ranks == 6
        ));
    }

    #[test]
    fn parallel_section_parses_and_overrides() {
        let cfg =
            parse("[parallel]\nsp = 4\ndp = 2\nschedule = \"zigzag\"\noverlap = false\n").unwrap();
        assert_eq!((cfg.parallel.sp, cfg.parallel.dp), (4, 2));
        assert_eq!(cfg.parallel.world(), 8);
        assert_eq!(
            cfg.parallel.schedule.kind(),
            Some(AttnScheduleKind::ZigzagRingCausal)
        );
        assert_eq!(cfg.parallel.overlap_mode(), Overlap::Blocking);
        assert_eq!(cfg.parallel.timeout(), Duration::from_secs(60));
        let err = parse("[parallel]\nsp = 2\ntp = 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tp") && err.starts_with("run.toml:3:1:"),
            "{err}"
        );
        let err = parse("[parallel]\nschedule = \"ulysses2\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ulysses2"), "{err}");
        let mut cfg = SftConfig::default();
        cfg.apply_override("parallel.sp=2").unwrap();
        cfg.apply_override("parallel.schedule=ring").unwrap();
        assert_eq!(cfg.parallel.sp, 2);
        assert_eq!(cfg.parallel.schedule, SpSchedule::Ring);
        let dims = cfg.parallel.dims().unwrap();
        assert_eq!((dims.dp(), dims.sp(), dims.world()), (1, 2, 2));
    }

    #[test]
    fn video_section_parses_overrides_validates_and_model_kind_is_detected() {
        let cfg = parse("[video]\nsampling = \"fps:2\"\ntrain_vision = true\n").unwrap();
        assert_eq!(cfg.video.sampling, "fps:2");
        assert!(cfg.video.train_vision);
        let mut cfg = SftConfig::default();
        cfg.model.path = Some("ckpt".into());
        cfg.data.train = "t.jsonl".into();
        cfg.apply_override("video.cache_mb=64").unwrap();
        cfg.apply_override("video.cache_dir=runs/cache").unwrap();
        assert_eq!(cfg.video.cache_mb, 64);
        assert_eq!(cfg.video.cache_dir, Some(PathBuf::from("runs/cache")));
        cfg.validate().unwrap();
        cfg.apply_override("video.sampling=sometimes").unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                key: "video.sampling",
                ..
            })
        ));
        assert!(parse("[video]\nframes = 8\n")
            .unwrap_err()
            .to_string()
            .contains("frames"));
        // Where a GPU run's frozen tower encodes: bf16 by default, f32, off; nothing else.
        assert_eq!(SftConfig::default().video.gpu_tower, GpuTowerMode::Bf16);
        let t = parse("[video]\ngpu_tower = \"f32\"\n").unwrap();
        assert_eq!(t.video.gpu_tower, GpuTowerMode::F32);
        let mut o = SftConfig::default();
        o.apply_override("video.gpu_tower=off").unwrap();
        assert_eq!(o.video.gpu_tower, GpuTowerMode::Off);
        let e = parse("[video]\ngpu_tower = \"fp8\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp8"), "{e}");
        // The family comes from the checkpoint's config.json.
        let dir = tempfile::tempdir().unwrap();
        cfg.model.path = Some(dir.path().to_path_buf());
        let err = cfg.model_kind().unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        for (text, kind) in [
            (r#"{"model_type": "qwen2_5_vl"}"#, ModelKind::Qwen25VL),
            (r#"{"model_type": "qwen2"}"#, ModelKind::Qwen2),
        ] {
            std::fs::write(dir.path().join("config.json"), text).unwrap();
            assert_eq!(cfg.model_kind().unwrap(), kind);
        }
        cfg.model.path = None;
        assert_eq!(cfg.model_kind().unwrap(), ModelKind::Qwen2);
        // Frame sampling and the tower shape the numbers; the cache does not.
        let mut a = SftConfig::default();
        let h = a.config_hash();
        a.video.cache_mb = 1;
        assert_eq!(a.config_hash(), h);
        a.video.train_vision = true;
        assert_ne!(a.config_hash(), h);
    }

    #[test]
    fn config_hash_ignores_output_only() {
        let a = SftConfig::default();
        let mut b = a.clone();
        b.output.dir = "elsewhere".into();
        b.output.log_every = 7;
        assert_eq!(a.config_hash(), b.config_hash());
        // sp and the schedule change rounding only; dp changes the batches of a step.
        b.parallel.sp = 4;
        b.parallel.schedule = SpSchedule::Zigzag;
        assert_eq!(a.config_hash(), b.config_hash());
        b.parallel.dp = 2;
        assert_ne!(a.config_hash(), b.config_hash());
        b.parallel.dp = 1;
        b.train.lr = 2e-3;
        assert_ne!(a.config_hash(), b.config_hash());
        assert_eq!(a.config_hash().len(), 16);
    }
}
