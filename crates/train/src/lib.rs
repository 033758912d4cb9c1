//! reel-train: the SFT trainer's infrastructure.
//!
//! - [`config`]: [`SftConfig`], the TOML run configuration with `--set key=value` overrides.
//! - [`checkpoint`]: atomic checkpoint folders ([`CheckpointDir`], [`write_atomic`]), the
//!   trainer's resumable state ([`TrainerState`]) and AdamW state as safetensors bytes.
//! - [`sft`]: the training loop ([`run_sft`]), single-rank or on `dp × sp` in-process ranks,
//!   for the text decoder and for Qwen2.5-VL (detected from the checkpoint's config.json);
//!   [`eval`]: assistant-token NLL ([`eval_nll`]).
//! - [`grpo`]: the GRPO loop for the text decoder ([`run_grpo`], [`GrpoRunConfig`]; single-rank
//!   or on `dp × sp` in-process ranks) and the step pieces the VLM trainer shares, over
//!   [`prompts`] ([`PromptSet`]: LongVideo-Reason or plain prompt/answer JSONL);
//!   [`accuracy`]: greedy-answer accuracy overall and per `problem_type` ([`eval_accuracy`]).
//! - [`vl`]: the vision-language model: target NLL of LongVideo-Reason records
//!   ([`eval_vl_nll`]) and its family of the SFT loop (CoT-SFT on video with cached vision
//!   embeddings or a trained tower; [`run_vl_sft`], the older flat settings);
//!   [`vl_grpo`]: GRPO of Qwen2.5-VL on video prompts with MR-SP ([`run_vl_grpo`]);
//!   [`vl_shapes`]: random-weight Qwen2.5-VL folders at the published 3B/7B shapes
//!   ([`write_shaped_vl_model`]) for benchmarks.
//! - [`device`]: `train.device` ("auto", "cpu", "cuda") and its resolution; with the `cuda`
//!   feature the SFT loop trains one rank on the GPU (`reel_cuda::GpuQwen2`).
//! - [`metrics`]: `metrics.jsonl` ([`MetricsWriter`], truncated on resume) and the progress bar.

pub mod accuracy;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod eval;
pub mod grpo;
pub mod metrics;
pub mod prompts;
pub mod rl_memory;
pub mod sft;
pub mod vl;
pub mod vl_grpo;
pub mod vl_prefetch;
pub mod vl_shapes;

pub use checkpoint::{
    checkpoint_step, optimizer_state_from_bytes, optimizer_state_to_bytes, write_atomic,
    CheckpointDir, CheckpointError, TrainerState,
};
pub use config::{
    apply_override, model_kind_of, parse_toml, read_toml, ConfigError, DataConfig, GpuTowerMode,
    InitConfig, ModelConfig, ModelKind, OutputConfig, ParallelConfig, ScheduleKind, SftConfig,
    SpSchedule, TrainConfig, VideoConfig, ZeroStage,
};
pub use device::Device;
pub use metrics::{MetricsError, MetricsWriter, Progress, ProgressMode, StepReport};

pub use accuracy::{
    engine_config, eval_accuracy, grouped_engine_config, stop_token_ids, AccuracyOptions,
    AccuracyReport, Tally,
};
pub use eval::{eval_examples, eval_nll, tokenize_all};
pub use grpo::{
    run_grpo, GrpoOptions, GrpoRolloutConfig, GrpoRunConfig, GrpoSummary, VideoRlConfig,
};
pub use prompts::{PromptItem, PromptSet};
pub use sft::{run_sft, save_model_folder, EvalHook, RunOptions, SftSummary};
pub use vl::{centre_vl_merger, write_vl_model};
pub use vl::{
    eval_vl_accuracy, eval_vl_examples, eval_vl_nll, parse_sampling, run_vl_sft, sampling_text,
    video_pixels, vl_rollout_prompt, write_tiny_vl_model_with, VideoRunStats, VlInputs,
    VlSftConfig, VlSftSummary,
};
pub use vl_grpo::{run_vl_grpo, VlGrpoSummary};
pub use vl_shapes::{write_random_vl_model, write_shaped_vl_model, VlShape};
