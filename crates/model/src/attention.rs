//! The one attention entry point the model calls.
//!
//! The model never knows how attention is computed or parallelised: it hands q/k/v for its tokens
//! to an [`AttentionOp`]. [`LocalAttention`] runs the tiled kernel over the whole sequence on this
//! process; sequence-parallel schedules implement the same trait over their shard.

use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};

/// Why an attention implementation failed (a distributed one: a peer failed or timed out).
pub type AttentionError = Box<dyn std::error::Error + Send + Sync>;

/// Causal self-attention over the tokens of a batch: q [B, T, H, D], k/v [B, T, H_kv, D],
/// out [B, T, H, D], lse [B, T, H] (f32). Under sequence parallelism T is this rank's shard and
/// the implementation exchanges what it needs with the other ranks.
pub trait AttentionOp: Send + Sync {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError>;

    /// Overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError>;
}

/// Attention over the whole local sequence with the tiled CPU kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAttention;

const CAUSAL: AttnMask = AttnMask::Causal {
    q_offset: 0,
    k_offset: 0,
};

impl AttentionOp for LocalAttention {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        attention_forward(out, lse, q, k, v, shape, CAUSAL);
        Ok(())
    }

    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        attention_backward(dq, dk, dv, dout, q, k, v, out, lse, shape, CAUSAL);
        Ok(())
    }
}
