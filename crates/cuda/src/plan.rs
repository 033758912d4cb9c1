//! Sizes of the device-resident model's buffers, computed without a GPU: the LM head's
//! vocabulary chunk for a batch, and the activation bytes each checkpoint policy keeps
//! (`model.rs`; N tokens, d hidden, H/H_kv heads of size D, I intermediate, L layers).

use reel_model::{CheckpointPolicy, Qwen2Config};

/// Bytes the chunked LM head may use for one chunk's f32 logits and bf16 logit gradients.
const CE_SCRATCH_BYTES: usize = 1 << 30;

/// Vocabulary columns per LM-head chunk for `n` rows: as many as fit [`CE_SCRATCH_BYTES`]
/// (f32 logits + bf16 dz = 6 bytes an element), between 1024 and 32768, a multiple of 256.
pub fn ce_chunk(n: usize, v: usize) -> usize {
    let fit = CE_SCRATCH_BYTES / (6 * n.max(1));
    (fit.clamp(1024, 32768) / 256 * 256).min(v.max(1))
}

/// Activation bytes a step of `n` tokens keeps on the device under `policy` (what depends on the
/// policy: residual streams, kept layers, saved attention outputs and one recomputation layer;
/// the backward scratch and the LM head's chunk scratch come on top, the same for every policy).
pub fn activation_bytes(c: &Qwen2Config, policy: CheckpointPolicy, n: usize) -> usize {
    let (d, qw, kvw, i, h) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
        c.num_attention_heads,
    );
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
