//! What a caller hands the engine (a [`Prompt`] and [`GenerationParams`] for a group of G
//! samples) and what it gets back ([`GroupOutput`]); a sample's life is a [`SeqState`].

use crate::RolloutError;
use reel_model::generate::SamplingParams;
use reel_model::{Qwen25VL, VideoGrid};

/// Identifies a group (a prompt with its G samples) within one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A prompt: token ids [P], optionally with input embeddings and multimodal positions (a VLM's
/// prompt with video rows). Plain token prompts convert from `Vec<u32>`.
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    /// Token ids [P] (placeholders where `embeddings` carries video rows). Required.
    pub ids: Vec<u32>,
    /// Input embeddings [P, d] used instead of looking `ids` up. Default: none.
    pub embeddings: Option<Vec<f32>>,
    /// 3-D rotary positions of the prompt. Default: none (positions 0..P).
    pub mrope: Option<MRopePrompt>,
}

/// Multimodal rotary positions of a prompt (Qwen2-VL's M-RoPE).
#[derive(Clone, Debug)]
pub struct MRopePrompt {
    /// (temporal, height, width) position of each prompt token, [P].
    pub positions: Vec<[u32; 3]>,
    /// How many of the D/2 rotary frequencies each component turns (sums to D/2).
    pub sections: [usize; 3],
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt {
            ids,
            ..Prompt::default()
        }
    }
}

impl From<&[u32]> for Prompt {
    fn from(ids: &[u32]) -> Self {
        ids.to_vec().into()
    }
}

impl Prompt {
    /// A Qwen2.5-VL prompt: token ids [P] with each video's `<|video_pad|>` run, the videos'
    /// merged features [Σ video tokens, d] from outside (the embedding cache or an SP encode;
    /// the tower does not run here), their grids and seconds per temporal patch. The prompt
    /// carries the input embeddings (placeholder rows = the features) and the 3-D M-RoPE
    /// positions `get_rope_index` gives; generated tokens continue at max(position) + 1 on all
    /// three components, as transformers' `rope_deltas` make them. Run it with an engine over
    /// the model's decoder ([`crate::Engine::new_vl`]).
    pub fn vl(
        model: &Qwen25VL,
        ids: Vec<u32>,
        grids: &[VideoGrid],
        second_per_grid_ts: &[f32],
        features: &[f32],
    ) -> Result<Prompt, RolloutError> {
        let (embeddings, positions) =
            model.sequence_inputs(&ids, grids, second_per_grid_ts, features)?;
        Ok(Prompt {
            ids,
            embeddings: Some(embeddings),
            mrope: Some(MRopePrompt {
                positions,
                sections: model.config.mrope_section,
            }),
        })
    }

    /// Position of the first generated token: P for 1-D prompts; one past the largest
    /// component with M-RoPE (generated tokens then take equal components, i.e. 1-D RoPE).
    pub fn next_position(&self) -> usize {
        match &self.mrope {
            None => self.ids.len(),
            Some(m) => m
                .positions
                .iter()
                .flatten()
                .map(|&p| p as usize + 1)
                .max()
                .unwrap_or(0),
        }
    }
}

/// How a group's samples are generated.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    /// Temperature (0 = greedy), top-p, top-k, and the seed of sample 0; sample j draws from its
    /// own generator seeded with [`sample_seed`]`(seed, j)`. Default: greedy, seed 0.
    pub sampling: SamplingParams,
    /// Most tokens generated per sample. Default 256.
    pub max_new_tokens: usize,
    /// Token ids that end a sample (kept in its output). Default: none.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a sample once its detokenized output contains one (the engine needs a
    /// detokenizer). Default: none.
    pub stop_strings: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// The seed of sample `j` of a group seeded `seed`: `seed + j·φ` (φ = 2⁶⁴/golden ratio), so
/// sample 0 uses `seed` itself (as `Qwen2::generate` does) and samples of a group differ. A sample's
/// draws depend only on its seed and its own logits, never on what else shares the batch.
pub fn sample_seed(seed: u64, j: usize) -> u64 {
    seed.wrapping_add((j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Why a sample stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced this stop token (the last output token).
    StopToken(u32),
    /// Its text contains `stop_strings[i]`.
    StopString(usize),
    /// It reached `max_new_tokens`.
    MaxTokens,
    /// Its sequence reached the model's `max_position_embeddings`.
    ContextFull,
}

/// Where a sample is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqState {
    /// Not holding KV blocks: not admitted yet, or preempted (to be recomputed).
    Waiting,
    /// Holding KV blocks; prefilling or decoding.
    Running,
    Finished {
        reason: FinishReason,
    },
}

/// One sample's result.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    /// Generated token ids (a stop token included).
    pub ids: Vec<u32>,
    /// Per generated token, `log π(token)` with `π = softmax(logits / T)` over the whole
    /// vocabulary (T = 1 when greedy): the sampling policy before top-k/top-p truncation, the
    /// quantity a trainer recomputes as the old policy's log-probability.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
    /// The seed its draws came from.
    pub seed: u64,
}

/// A finished group: its samples in order.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupOutput {
    pub id: GroupId,
    pub prompt_len: usize,
    pub samples: Vec<SampleOutput>,
}
