//! reel-rollout: the generation engine of the RL loop (the role vLLM plays for Python systems).
//!
//! - [`pool`]: the paged KV cache — a reference-counted [`BlockPool`] of fixed-size blocks and
//!   the per-sequence [`BlockTable`]; forks share a prompt's blocks, copy on write.
//! - [`paged_attention`]: attention of new tokens over a sequence's blocks (CPU reference).
//! - [`kv`]: the pool as the decoder's [`reel_model::decode::KvStore`] for one step.
//! - [`request`]: what a caller asks for (prompt, [`GenerationParams`]) and gets back.
//! - [`engine`]: [`Engine`] — groups of G samples that share a prefilled prompt, a scheduler
//!   that fills each step's token budget with decode tokens and prefill chunks (continuous
//!   batching, preemption when the pool runs out), sampling with a seed per sample.
//! - [`step`]: [`StepModel`], what the engine runs each step — [`CpuStep`] (the CPU model over
//!   a host pool) or reel-cuda's `GpuDecoder` (the same step on a GPU, block data on the device).
//! - [`sample`]: the next token and its log-probability from a step's full logits rows or from
//!   each row's best candidates and log-sum-exp parts (what a GPU decoder downloads instead).
//! - [`shared_prefill`]: how a long prompt's prefill splits over a model's peers
//!   ([`Engine::add_group_shared`], [`StepModel::prefill_shared`]; every peer's cache ends
//!   whole): a GPU decoder's prefill group, or [`shared_prefill::CpuPeerStep`], the CPU
//!   reference over a `Communicator`.
//! - [`sharded`]: [`ShardedEngine`] — the same over sequence-parallel ranks: prompts prefilled
//!   sequence-parallel, their KV kept sharded over the ranks' pools, decode attention merged
//!   from per-rank partials.
//!
//! The engine borrows the model (`&Qwen2`): it reads the current weights, never copies them
//! (a GPU decoder holds its own bf16 copy, made once).

pub mod engine;
pub mod kv;
pub mod paged_attention;
pub mod pool;
pub mod request;
pub mod sample;
pub mod sharded;
pub mod shared_prefill;
pub mod step;

pub use engine::{Engine, EngineConfig, EngineStats, StepStats};
pub use pool::{BlockCopy, BlockPool, BlockTable, KvLayout};
pub use request::{
    sample_seed, FinishReason, GenerationParams, GroupId, GroupOutput, MRopePrompt, Prompt,
    SampleOutput, SeqState,
};
pub use sample::{RowLogits, StepLogits, TopRows};
pub use sharded::{ShardedEngine, ShardedStats};
pub use shared_prefill::{sample_share, PrefillSplit};
pub use step::{CpuStep, StepModel};

/// Errors of the rollout engine; messages name the request, sequence or pool sizes.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("KV block pool exhausted: {needed} blocks needed, {free} of {total} free")]
    PoolExhausted {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error(
        "group {group} cannot run even alone: it needs more than the pool's {total} KV blocks \
         (raise num_blocks or lower the group size)"
    )]
    PoolTooSmall { group: u64, total: usize },
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] reel_model::ModelError),
    #[error(transparent)]
    Comm(#[from] reel_comm::CommError),
    /// The device that runs the step failed (a GPU decoder's error, say).
    #[error("decode step on the device: {0}")]
    Device(String),
}
