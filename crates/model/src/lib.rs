//! reel-model: the Qwen2-family decoder with explicit forward and backward.
//!
//! - [`config`]: HF `config.json` ⇄ [`Qwen2Config`].
//! - [`params`]: the flat parameter buffer and where each HF tensor lives in it.
//! - [`model`]: forward, backward, checkpoint policies, the step [`Workspace`].
//! - [`attention`]: the one attention entry point ([`AttentionOp`]); parallel schedules plug in here.
//! - [`io`]: safetensors checkpoint folders (single file or sharded with an index).
//! - [`decode`]: incremental decoding of a batch of sequences over a [`decode::KvStore`].
//! - [`generate`]: single-sequence KV-cached decoding and sampling.
//! - [`vision`]: the Qwen2.5-VL vision tower (patch embedding, windowed attention, merger).
//! - [`vl`]: Qwen2.5-VL: the tower feeding the decoder with multimodal RoPE; its checkpoints.
//! - [`embed_cache`]: content-addressed cache of merged vision embeddings (memory LRU + disk).
//! - [`logprob`]: per-token log π and entropy at labelled positions, and the backward for
//!   per-token coefficients ∂L/∂log π (the policy-gradient update).

pub mod attention;
pub mod config;
pub mod decode;
pub mod embed_cache;
pub mod generate;
pub mod io;
pub mod logprob;
pub mod model;
pub mod params;
pub mod plan;
pub mod vision;
pub mod vl;

pub use attention::{
    packed_backward, packed_forward, AttentionError, AttentionOp, LocalAttention, PackedRow,
    SharedPrefixAttention, SubBlock,
};
pub use config::Qwen2Config;
pub use io::{load_checkpoint, save_checkpoint};
pub use model::{
    default_positions, validate_token_batch, CheckpointPolicy, EmbedsBatch, LossStats, Qwen2,
    Rotary, TokenBatch, Workspace, CE_CHUNK,
};
pub use params::ParamLayout;
pub use vision::{CpuTower, TowerForward, VideoGrid, VisionConfig, VisionTower, VisionWorkspace};
pub use vl::{
    load_vl_checkpoint, save_vl_checkpoint, Qwen25VL, Qwen25VLConfig, VideoBatch, VlBatch,
    VlWorkspace,
};

use std::path::Path;

/// Errors from model code; messages name the file, tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {msg}")]
    Config { path: String, msg: String },
    #[error("{path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("non-finite value: {0}")]
    NonFinite(String),
    #[error("attention: {0}")]
    Attention(#[source] attention::AttentionError),
    #[error("kv cache: {0}")]
    Kv(#[source] decode::KvError),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
