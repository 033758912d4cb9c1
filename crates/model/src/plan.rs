//! Sizes of the GPU model's buffers (reel-cuda's `GpuQwen2`), computed without a GPU: the LM
//! head's vocabulary chunk for a batch, the activation bytes each checkpoint policy keeps, the
//! whole workspace, and a rollout decoder's step buffers (N tokens, d hidden, H/H_kv heads of
//! size D, I intermediate, L layers).
//! Here rather than in reel-cuda so that planners build without the GPU crate.

use crate::{CheckpointPolicy, Qwen2Config};

/// Bytes the chunked LM head may use for one chunk's f32 logits and bf16 logit gradients.
const CE_SCRATCH_BYTES: usize = 1 << 30;

/// Vocabulary columns per LM-head chunk for `n` rows: as many as fit [`CE_SCRATCH_BYTES`]
/// (f32 logits + bf16 dz = 6 bytes an element), between 1024 and 32768, a multiple of 256.
pub fn ce_chunk(n: usize, v: usize) -> usize {
    let fit = CE_SCRATCH_BYTES / (6 * n.max(1));
    (fit.clamp(1024, 32768) / 256 * 256).min(v.max(1))
}

/// A token's row widths: hidden d, queries H·D, keys (and values) H_kv·D, intermediate I.
fn widths(c: &Qwen2Config) -> (usize, usize, usize, usize) {
    (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    )
}

/// Activation bytes a step of `n` tokens keeps on the device under `policy` (what depends on the
/// policy: residual streams, kept layers, saved attention outputs and one recomputation layer;
/// the backward scratch and the LM head's chunk scratch come on top, the same for every policy).
pub fn activation_bytes(c: &Qwen2Config, policy: CheckpointPolicy, n: usize) -> usize {
    let (d, qw, kvw, i) = widths(c);
    let h = c.num_attention_heads;
    let l = c.num_hidden_layers;
    // bf16 storage, f32 statistics.
    let layer_no_attn = 2 * n * (d + qw + 2 * kvw + d + d + 2 * i + i) + 4 * 2 * n;
    let attn = 2 * n * qw + 4 * n * h;
    let xs = (l + 1) * 2 * n * d;
    xs + match policy {
        CheckpointPolicy::None => l * (layer_no_attn + attn),
        CheckpointPolicy::Layer => layer_no_attn + attn,
        CheckpointPolicy::Remat => layer_no_attn + l * attn,
    }
}

/// Bytes of a `GpuQwen2`'s whole workspace for `n` tokens, as it allocates them: the policy's
/// [`activation_bytes`] plus what every policy holds beside them — one layer's gradient scratch
/// (`dxn`, `dh`, `dattn`, `dq`, `dk`, `dv`; the MLP's gradients overwrite the layer's `act` and
/// `gate_up`, the packed q/k/v gradient the packed q/k/v), the packed q/k/v, the final norm's
/// rows and their gradient, two residual-gradient buffers, the loss rows' statistics, token ids
/// and positions, and the per-token rotary angles. What
/// comes on top is per-call scratch (the sequence-parallel attention's blocks, cuDNN's backward
/// workspace, the LM head's chunk; BENCHMARKS.md, "The RL step at the 7B shape").
pub fn workspace_bytes(c: &Qwen2Config, policy: CheckpointPolicy, n: usize) -> usize {
    let (d, qw, kvw, _) = widths(c);
    let hd = c.head_dim;
    let width = qw + 2 * kvw;
    // bf16: the layer gradient scratch, qkv, xn_f, dxn_f, dx[2].
    let bf16 = (2 * d + 2 * qw + 2 * kvw) + width + 4 * d;
    // f32: rstd_f, ce_losses, ce_lse, ce_entropy, dloss, the angles' cos and sin; u32 ids and
    // positions.
    let f32 = 5 + hd;
    let u32 = 2;
    activation_bytes(c, policy, n) + n * (2 * bf16 + 4 * f32 + 4 * u32)
}

/// Bytes of a rollout decoder's step buffers (reel-cuda's `GpuDecoder`, `StepBufs`) for `rows`
/// rows of `elem` bytes a value: the residual and normed rows, packed q/k/v, queries, the
/// attention output, the MLP's gate/up and activation, and f32 norm and lse statistics.
pub fn decoder_step_bytes(c: &Qwen2Config, rows: usize, elem: usize) -> usize {
    let (d, qw, kvw, i) = widths(c);
    let values = 2 * d + (qw + 2 * kvw) + 2 * qw + 3 * i;
    rows * (elem * values + 4 * (1 + c.num_attention_heads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_chunks_fit_the_budget_and_the_vocabulary() {
        assert_eq!(ce_chunk(8192, 151_936), 21_760);
        assert_eq!(ce_chunk(1, 151_936), 32_768);
        assert_eq!(ce_chunk(1 << 20, 151_936), 1024);
        assert_eq!(ce_chunk(4, 50), 50);
        for n in [1usize, 100, 16_384, 32_768, 300_000] {
            let c = ce_chunk(n, 151_936);
            assert_eq!(c % 256, 0);
            assert!(c * n * 6 <= CE_SCRATCH_BYTES || c == 1024, "{n} → {c}");
        }
    }

    #[test]
    fn the_7b_workspace_a_token_is_the_counted_buffers() {
        // Qwen2-7B's layer shape (d 3584, H 28 / H_kv 4, D 128, I 18944, 28 layers): 556,104
        // bytes a token of activations under remat and 69,148 beside them (199,196 before the
        // MLP's and q/k/v's gradients took the places of their activations; BENCHMARKS.md).
        let c = Qwen2Config {
            hidden_size: 3584,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            ..Qwen2Config::tiny(64)
        };
        assert_eq!(activation_bytes(&c, CheckpointPolicy::Remat, 1), 556_104);
        assert_eq!(activation_bytes(&c, CheckpointPolicy::Layer, 1), 359_544);
        for p in [
            CheckpointPolicy::None,
            CheckpointPolicy::Layer,
            CheckpointPolicy::Remat,
        ] {
            let extra = workspace_bytes(&c, p, 1000) - activation_bytes(&c, p, 1000);
            assert_eq!(extra, 69_148_000, "{p:?}");
        }
    }

    #[test]
    fn remat_keeps_less_than_none_and_more_than_layer() {
        let c = Qwen2Config::tiny(64);
        let n = 1000;
        let none = activation_bytes(&c, CheckpointPolicy::None, n);
        let layer = activation_bytes(&c, CheckpointPolicy::Layer, n);
        let remat = activation_bytes(&c, CheckpointPolicy::Remat, n);
        assert!(layer < remat && remat < none, "{layer} {remat} {none}");
        // Remat keeps exactly L − 1 more attention outputs and lse than Layer.
        let l = c.num_hidden_layers;
        let attn = 2 * n * c.num_attention_heads * c.head_dim + 4 * n * c.num_attention_heads;
        assert_eq!(remat - layer, (l - 1) * attn);
        assert_eq!(
            activation_bytes(&c, CheckpointPolicy::None, 2 * n),
            2 * none
        );
    }
}
