//! reel-optim: the optimizer side of a training step.
//!
//! Parameters and gradients are plain `f32` slices addressed by index (parameter `i` is the
//! i-th slice the model hands over), so this crate knows no model:
//! - [`AdamW`]: torch.optim.AdamW (decoupled weight decay, bias-corrected moments) with fp32
//!   moments and a per-parameter decay mask; its state exports to [`AdamWState`] for checkpoints.
//! - [`LrSchedule`]: constant, linear warmup + cosine, linear warmup + linear decay (HF convention).
//! - [`global_grad_norm`] / [`clip_grad_norm`]: torch.nn.utils.clip_grad_norm_ semantics.
//! - [`OptShard`]: ZeRO-1, the optimizer state of one rank's shard of a dp × sp world.

mod adamw;
mod clip;
mod schedule;
pub mod shard;

pub use adamw::{AdamW, AdamWConfig, AdamWScalars, AdamWState, AdamWStateRef, OptimError};
pub use clip::{clip_grad_norm, global_grad_norm};
pub use schedule::LrSchedule;
pub use shard::{OptShard, OwnerPiece, ShardSegment};

/// Tensors with at least this many elements are processed in parallel chunks of this size;
/// smaller ones run on the calling thread (rayon's overhead would dominate).
pub(crate) const PAR_CHUNK: usize = 1 << 15;
