//! reel-parallel: sequence parallelism — layouts and schedules as data, and their execution.
//!
//! - [`dims`]: [`ParallelDims`] (dp × sp over a world of ranks, validated once; sp groups are
//!   contiguous ranks).
//! - [`shard`]: cutting a length-T sequence over P ranks ([`Layout::Contiguous`] or
//!   [`Layout::Zigzag`]), padding to a multiple of P (or 2P) with a validity mask, global RoPE
//!   positions, shard / unshard.
//! - [`schedule`]: attention schedules as data (LightSeq's DistAttn, plain ring, zigzag ring):
//!   which block product each rank computes at each step and which KV chunks, queries and partial
//!   results move before it; [`Schedule::validate`] proves coverage and data dependencies.
//! - [`local_exec`]: runs a schedule in one process with the real kernels, to show that every
//!   schedule reproduces single-call attention (forward and backward) before any communication
//!   exists.
//! - [`dist_exec`]: [`DistExecutor`] runs a schedule over a `Communicator`, each rank holding only
//!   its shard, with communication overlapped with compute (or blocking, to compare).
//! - [`sp_attention`]: [`SpAttention`], the model's `AttentionOp` over a `DistExecutor` or
//!   `UlyssesAttention` ([`SpMethod`]), so model replicas on each rank's token shard run unchanged.
//! - [`ulysses`]: [`UlyssesAttention`], DeepSpeed-Ulysses all-to-all attention over heads and its
//!   2-D hybrid (u-rank all-to-all groups × a ring over r groups), forward and backward.
//! - [`vision_sp`]: MR-SP stage 1: a video's temporal patches split across the ranks, each
//!   encodes its share with the vision tower, embeddings all-gathered in order; encode once per
//!   video through the content-addressed embedding cache.
//!
//! Vocabulary: B batch, T sequence length, H query heads, H_kv KV heads, D head dimension,
//! P sequence-parallel ranks.

mod blocks;
pub mod dims;
pub mod dist_exec;
pub mod local_exec;
pub mod schedule;
pub mod shard;
pub mod sp_attention;
pub mod ulysses;
pub mod vision_sp;

pub use dims::{DimsError, ParallelDims, RankCoords};
pub use dist_exec::{
    DistExecError, DistExecutor, ExecStats, Overlap, Pass, RankPlan, Stage, SP_TAG_BASE,
};
pub use local_exec::{AttnGrads, ExecError, LocalExecutor};
pub use schedule::{
    balance, block_counts, distattn_causal, ring_causal, ring_full, zigzag_ring_causal, BlockMask,
    Message, Payload, Schedule, ScheduleError, ScheduleKind, Step, Work,
};
pub use shard::{shard_positions, Layout, ShardError, Sharding, TokenShard};
pub use sp_attention::{SpAttention, SpMethod, SpStats};
pub use ulysses::{
    Causality, Phase, UlyssesAttention, UlyssesBytes, UlyssesError, UlyssesGrid, UlyssesGroups,
};
pub use vision_sp::{temporal_split, EncodeCounters, EncodeStats, SpVisionEncoder, VisionSpError};
