//! The device memory one GPU needs for a Qwen2.5-VL GRPO step on the GPU (`reel grpo` on a
//! video dataset, or `reel bench rl --rl-device cuda`), estimated without a GPU:
//! `reel bench rl --rl-plan`. Two peaks, whichever is larger:
//!
//! - **The update** (and the scoring passes, which size the same buffers): the policy state
//!   ([`state_bytes`]), the frozen tower's bf16 weights, the model's whole workspace for the
//!   tokens a GPU holds (`reel_model::plan::workspace_bytes`, counted buffer by buffer from what
//!   `GpuQwen2` allocates), the sequence-parallel attention's per-call blocks and cuDNN's backward
//!   workspace (both per local token), and a fixed part.
//! - **The rollout**: the same state and tower, the whole prompt's KV cache on every process of
//!   the sp group (the shared prefill leaves each one holding it) with the group's responses,
//!   and the decoder's step buffers; the update's workspace is freed by then
//!   (`GpuQwen2::release_workspace`).
//!
//! Two figures are measured rather than counted: DistAttn's scratch (blocks cached in the
//! device's scratch pool, size-class rounding included: [`SP_SCRATCH_PER_QUERY_VALUE`]) and the
//! fixed part ([`FIXED_BYTES`]: CUDA and library contexts, NCCL, the LM head's vocabulary chunk,
//! the tower's scratch, rotary tables). Both come from the 7B rows of BENCHMARKS.md ("The RL step
//! at the 7B shape over 2 GPUs"); the tests hold the estimate to the rows measured since
//! ("Sharded gradients and a leaner backward": ZeRO-1 and ZeRO-2, remat and layer, 33k to 164k
//! prompt tokens), which it predicted within 0.75 GiB.

use reel_model::plan::{decoder_step_bytes, workspace_bytes};
use reel_model::{CheckpointPolicy, ParamLayout, Qwen2Config};

use crate::config::ZeroStage;

/// What a GRPO step's memory depends on.
#[derive(Clone, Debug)]
pub struct RlMemoryConfig {
    /// The decoder.
    pub lm: Qwen2Config,
    /// The frozen vision tower's parameters (bf16 on the GPU).
    pub tower_params: usize,
    /// Sequence-parallel ranks a row's tokens are split over.
    pub sp: usize,
    /// Ranks the optimizer state is sharded over (dp × sp) when `shard_optimizer`.
    pub world: usize,
    pub shard_optimizer: bool,
    /// With `shard_optimizer`, the fp32 gradients sharded too (ZeRO-2).
    pub shard_gradients: bool,
    /// Whether the frozen reference copy is kept (β > 0).
    pub reference: bool,
    pub policy: CheckpointPolicy,
    /// Tokens of the longest prompt.
    pub prompt_tokens: usize,
    /// Tokens each sample generates, and the samples of a group.
    pub response_tokens: usize,
    pub group: usize,
}

/// Bytes one GPU needs, by part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RlMemory {
    /// Policy state: bf16 weights, fp32 gradients, fp32 master weights and AdamW moments
    /// (sharded or whole), the bf16 reference.
    pub state: u64,
    pub tower: u64,
    /// The update's buffers for the local tokens: workspace, attention scratch, cuDNN.
    pub workspace: u64,
    pub attention_scratch: u64,
    /// The rollout's KV cache and decoder step buffers.
    pub rollout_cache: u64,
    pub fixed: u64,
}

impl RlMemory {
    /// The update's peak.
    pub fn update(&self) -> u64 {
        self.state + self.tower + self.workspace + self.attention_scratch + self.fixed
    }

    /// The rollout's peak.
    pub fn rollout(&self) -> u64 {
        self.state + self.tower + self.rollout_cache + self.fixed
    }

    pub fn peak(&self) -> u64 {
        self.update().max(self.rollout())
    }
}

/// DistAttn's per-call scratch a local token, per query value (H·D): 84 kB at Qwen2-7B's 3584
/// measured as the pool holds it at sp 2 (a count of its blocks, checked against the 7B slope).
pub const SP_SCRATCH_PER_QUERY_VALUE: f64 = 84_000.0 / 3584.0;

/// The fixed part of a GPU's peak: the 7B rows' measured peaks less everything counted, 7.1,
/// 7.4 and 7.5 GiB at 33k, 66k and 99k prompt tokens; 7.4 GiB (7.9 at the 3B shape's 262k).
pub const FIXED_BYTES: u64 = 7_950_000_000;

/// Rows the decoder's step buffers hold during a shared prefill (`reel_cuda::SHARED_PREFILL_ROWS`).
const DECODER_ROWS: usize = 16_384;

/// The policy state one GPU holds: 2 bytes a parameter of bf16 weights, 4 of fp32 gradients
/// (over `world` ranks when `zero` shards them), 12 of fp32 master weights and AdamW moments
/// (over `world` ranks when sharded), 2 of the reference when kept.
pub fn state_bytes(params: usize, world: usize, zero: ZeroStage, reference: bool) -> u64 {
    let w = world.max(1) as f64;
    let (grads, opt) = match zero {
        ZeroStage::Replicated => (4.0, 12.0),
        ZeroStage::Optimizer => (4.0, 12.0 / w),
        ZeroStage::Gradients => (4.0 / w, 12.0 / w),
    };
    let per = 2.0 + grads + opt + if reference { 2.0 } else { 0.0 };
    (params as f64 * per) as u64
}

/// The estimate (module docs).
pub fn estimate(c: &RlMemoryConfig) -> RlMemory {
    let lm = &c.lm;
    let params = ParamLayout::new(lm).total();
    let local = (c.prompt_tokens + c.response_tokens).div_ceil(c.sp.max(1));
    let qw = lm.num_attention_heads * lm.head_dim;
    let kvw = lm.num_key_value_heads * lm.head_dim;
    // cuDNN's backward: an f32 dQ accumulator and the softmax sums, for the local rows.
    let cudnn = local * (4 * qw + 4 * lm.num_attention_heads);
    let workspace = workspace_bytes(lm, c.policy, local) + cudnn;
    let attention_scratch = match c.sp > 1 {
        true => (local as f64 * qw as f64 * SP_SCRATCH_PER_QUERY_VALUE) as u64,
        false => 0,
    };
    let cached = c.prompt_tokens + c.group * c.response_tokens;
    let kv = cached * lm.num_hidden_layers * 2 * kvw * 2;
    RlMemory {
        state: state_bytes(
            params,
            c.world,
            ZeroStage::from_flags(c.shard_optimizer, c.shard_gradients),
            c.reference,
        ),
        tower: 2 * c.tower_params as u64,
        workspace: workspace as u64,
        attention_scratch,
        rollout_cache: (kv + decoder_step_bytes(lm, DECODER_ROWS, 2)) as u64,
        fixed: FIXED_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VlShape;
    use reel_model::vision::VisionLayout;

    const GIB: f64 = (1u64 << 30) as f64;

    fn config(shape: VlShape, prompt: usize, policy: CheckpointPolicy, zero: u8) -> RlMemoryConfig {
        let (lm, vision) = shape.configs(0).unwrap();
        RlMemoryConfig {
            lm,
            tower_params: VisionLayout::new(&vision).total(),
            sp: 2,
            world: 2,
            shard_optimizer: zero > 0,
            shard_gradients: zero > 1,
            reference: true,
            policy,
            prompt_tokens: prompt,
            response_tokens: 16,
            group: 2,
        }
    }

    /// Every measured row of BENCHMARKS.md ("Sharded gradients and a leaner backward") with
    /// this layout (the 7B shape, sp 2 over 2 H200s, G = 2, 16 response tokens, one row a
    /// micro-batch, the decoder reading the policy's weights in place; `zero` 1: the optimizer
    /// sharded, 2: the gradients too): the estimated peak against the measured one (the fuller
    /// GPU), and the runs that ran out of memory above the card's 139.8 GiB.
    #[test]
    fn the_estimate_holds_to_the_measured_rows() {
        use CheckpointPolicy::{Layer, Remat};
        let rows = [
            // (prompt tokens, policy, zero, measured peak GiB)
            (33_035, Remat, 1, 118.8),
            (65_797, Remat, 1, 130.1),
            (33_035, Remat, 2, 104.6),
            (65_797, Remat, 2, 115.9),
            (98_594, Remat, 2, 127.1),
            (131_308, Remat, 2, 138.6),
            (131_308, Layer, 2, 126.6),
            (164_076, Layer, 2, 134.8),
        ];
        for (prompt, policy, zero, measured) in rows {
            let m = estimate(&config(VlShape::Qwen7b, prompt, policy, zero));
            let got = m.peak() as f64 / GIB;
            eprintln!(
                "{prompt} {policy:?} ZeRO-{zero}: estimated {got:.1} GiB, measured {measured}"
            );
            // The count runs low by up to 0.75 GiB at the longest rows (≈ 5 kB a local token).
            assert!(
                (got - measured).abs() <= 0.8,
                "{prompt} tokens ({policy:?}, ZeRO-{zero}): estimated {got:.2} GiB, measured \
                 {measured} ({m:?})"
            );
            assert!(m.update() > m.rollout(), "the update is the peak here");
        }
        // Out of memory with the optimizer sharded alone (the previous section's runs, whose
        // backward held more scratch a token: these are over the card by more still).
        for (prompt, policy) in [(98_594, Remat), (131_308, Remat)] {
            let got = estimate(&config(VlShape::Qwen7b, prompt, policy, 1)).peak() as f64 / GIB;
            assert!(
                got > 139.8,
                "{prompt}: ran out of memory, estimated {got:.1}"
            );
        }
    }

    #[test]
    fn state_shards_the_optimizer_and_drops_the_reference_when_asked() {
        use ZeroStage::{Gradients, Optimizer, Replicated};
        let p = 1_000_000;
        assert_eq!(state_bytes(p, 1, Replicated, true), 20 * p as u64);
        assert_eq!(state_bytes(p, 8, Optimizer, true), 9_500_000);
        assert_eq!(state_bytes(p, 2, Optimizer, false), 12 * p as u64);
        // ZeRO-2 over 8: 2 + 4/8 + 12/8 + 2.
        assert_eq!(state_bytes(p, 8, Gradients, true), 6_000_000);
        assert_eq!(state_bytes(p, 2, Gradients, false), 10 * p as u64);
        // Sharding over one rank keeps everything.
        for z in [Optimizer, Gradients] {
            assert_eq!(
                state_bytes(p, 1, z, true),
                state_bytes(p, 1, Replicated, true)
            );
        }
    }
}
