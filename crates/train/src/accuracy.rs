//! Answer accuracy of a model on a prompt set: greedy answers from the rollout engine (many
//! prompts per batched decoding step), scored with the accuracy reward's comparison (choice
//! letter, number within tolerance, normalised string; the `<answer>…</answer>` content when the
//! response has one) and the format check, overall and per `problem_type`. The same for a
//! Qwen2.5-VL model on LongVideo-Reason records: [`crate::vl::eval_vl_accuracy`]. Both decode
//! on the CPU or, with [`AccuracyOptions::device`], through the GPU rollout decoder
//! ([`crate::device::RolloutDecoder`], bf16 or f32) the GRPO trainers roll out with.

use crate::device::{rollout_decoder, rollout_device, rollout_gpu, Device, RolloutDecoder};
use crate::prompts::PromptItem;
use anyhow::Result;
use reel_model::Qwen2;
use reel_rl::{AccuracyReward, FormatReward};
use reel_rollout::{EngineConfig, GenerationParams};
use serde::Serialize;
use std::collections::BTreeMap;

/// Right answers and well-formed responses out of a count.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    pub total: usize,
    pub correct: usize,
    pub formatted: usize,
    /// correct / total (0 when empty).
    pub accuracy: f64,
    /// formatted / total (0 when empty).
    pub format_rate: f64,
}

impl Tally {
    fn add(&mut self, correct: bool, formatted: bool) {
        self.total += 1;
        self.correct += correct as usize;
        self.formatted += formatted as usize;
        let n = self.total as f64;
        self.accuracy = self.correct as f64 / n;
        self.format_rate = self.formatted as f64 / n;
    }
}

/// What [`eval_accuracy`] measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AccuracyReport {
    pub overall: Tally,
    /// By `problem_type` ("" for records without one).
    pub per_type: BTreeMap<String, Tally>,
    /// The greedy responses, in the order of the items.
    #[serde(skip)]
    pub responses: Vec<String>,
    /// Where they were generated: "cpu", "cuda-bf16" or "cuda-f32" (empty until a run).
    pub device: String,
}

/// How [`eval_accuracy`] generates.
#[derive(Clone, Debug)]
pub struct AccuracyOptions {
    /// Most tokens per answer. Default 256.
    pub max_new_tokens: usize,
    /// Prompts queued in the engine at once. Default 64.
    pub batch: usize,
    /// Stop tokens (the tokenizer's EOS, typically).
    pub stop_token_ids: Vec<u32>,
    /// The comparison of answers.
    pub accuracy: AccuracyReward,
    /// Where the answers are generated (`reel eval --device`): "cpu" (the default here), "auto"
    /// (the GPU decoder when this build has the `cuda` feature, a GPU opens and the model's head
    /// dimension fits it, else the CPU with a log line saying why) or "cuda" (an error when it
    /// cannot). The engine, its scheduler and greedy choice are the same either way.
    pub device: Device,
    /// On the GPU, keep the decoder's weights and KV cache in f32 (the CPU's answers up to
    /// float rounding) instead of bf16. Default false.
    pub gpu_f32: bool,
}

impl Default for AccuracyOptions {
    fn default() -> Self {
        AccuracyOptions {
            max_new_tokens: 256,
            batch: 64,
            stop_token_ids: Vec::new(),
            accuracy: AccuracyReward::default(),
            device: Device::Cpu,
            gpu_f32: false,
        }
    }
}

impl AccuracyOptions {
    /// The decoder these options ask for on `model` (the language model of a VLM), or `None`
    /// for the CPU (see [`AccuracyOptions::device`]).
    pub fn decoder(&self, model: &Qwen2) -> Result<Option<RolloutDecoder>> {
        let gpu = rollout_gpu(self.device, None, "device", GREEDY)?;
        rollout_decoder(gpu, self.device, model, self.gpu_f32, "device", GREEDY)
    }
}

/// What the device messages call the evaluation's decoding.
const GREEDY: &str = "greedy answers";

impl AccuracyReport {
    /// Scores one response against its reference answer, under `problem_type`.
    pub fn add(&mut self, text: String, answer: &str, problem_type: &str, acc: &AccuracyReward) {
        let ok = acc.is_correct(&text, answer);
        let formatted = FormatReward::matches(&text);
        self.overall.add(ok, formatted);
        self.per_type
            .entry(problem_type.to_string())
            .or_default()
            .add(ok, formatted);
        self.responses.push(text);
    }
}

/// An engine sized for `n` prompts of at most `longest` tokens with `max_new_tokens` each
/// (within the model's context).
pub fn engine_config(
    n: usize,
    longest: usize,
    max_new_tokens: usize,
    max_ctx: usize,
) -> EngineConfig {
    let per_seq = (longest + max_new_tokens).min(max_ctx);
    let block_size = 16;
    EngineConfig {
        block_size,
        num_blocks: n * per_seq.div_ceil(block_size) + 8,
        ..EngineConfig::default()
    }
}

/// An engine for `groups` groups of `g` samples each forked from its group's prompt (at most
/// `longest` tokens, prefilled once) with `max_new_tokens` each, within the model's context
/// `max_ctx`: each group's prompt blocks once, and per sample its response's blocks plus the
/// prompt's partial last block copied on write; 8 blocks spare. A 131k-token prompt with G = 8
/// then holds one copy of its KV, not G + 2 (what [`engine_config`] for `groups · (G + 2)`
/// sequences reserved).
pub fn grouped_engine_config(
    groups: usize,
    g: usize,
    longest: usize,
    max_new_tokens: usize,
    max_ctx: usize,
) -> EngineConfig {
    let block_size = 16;
    let prompt = longest.min(max_ctx).div_ceil(block_size);
    let sample = max_new_tokens.min(max_ctx).div_ceil(block_size) + 1;
    EngineConfig {
        block_size,
        num_blocks: groups * (prompt + g * sample) + 8,
        ..EngineConfig::default()
    }
}

/// Greedy answers to every item, scored; `decode` turns response ids into text (special
/// tokens skipped).
pub fn eval_accuracy(
    model: &Qwen2,
    items: &[PromptItem],
    decode: &dyn Fn(&[u32]) -> Result<String>,
    opts: &AccuracyOptions,
) -> Result<AccuracyReport> {
    let mut decoder = opts.decoder(model)?;
    let mut report = AccuracyReport {
        device: rollout_device(decoder.as_ref()).into(),
        ..AccuracyReport::default()
    };
    let max_ctx = model.config.max_position_embeddings;
    for chunk in items.chunks(opts.batch.max(1)) {
        let longest = chunk.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        let config = engine_config(chunk.len(), longest, opts.max_new_tokens, max_ctx);
        let mut engine = crate::device::rollout_engine(decoder.as_mut(), model, config)?;
        for item in chunk {
            engine.add_request(
                item.ids.clone(),
                GenerationParams {
                    max_new_tokens: opts.max_new_tokens,
                    stop_token_ids: opts.stop_token_ids.clone(),
                    ..GenerationParams::default()
                },
            )?;
        }
        let outs = engine.run()?;
        for (item, out) in chunk.iter().zip(&outs) {
            let text = decode(&out.samples[0].ids)?;
            report.add(text, &item.answer, &item.problem_type, &opts.accuracy);
        }
    }
    Ok(report)
}

/// The tokens that end an assistant turn, whichever way the checkpoint spells it: the
/// tokenizer's EOS, the model config's EOS, and `<|im_end|>` when the vocabulary has it.
pub fn stop_token_ids(tok: &reel_data::Tokenizer, model: &Qwen2) -> Vec<u32> {
    let mut stop: Vec<u32> = [
        tok.eos_token_id(),
        model.config.eos_token_id,
        tok.token_to_id("<|im_end|>"),
    ]
    .into_iter()
    .flatten()
    .collect();
    stop.sort_unstable();
    stop.dedup();
    stop
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_model::Qwen2Config;

    /// Two groups of 4 samples from 100-token prompts fit a pool holding each prompt once (7
    /// blocks of 16) and each sample's 20 tokens (2 blocks + 1 copied on write): 46 blocks
    /// where `engine_config` for 2·(4 + 2) sequences reserves 96, and nothing is preempted.
    #[test]
    fn a_grouped_engine_holds_each_prompt_once_without_preemption() {
        let model = Qwen2::new_random(Qwen2Config::tiny(64), 3).unwrap();
        let (p, g, new) = (100, 4, 20);
        let ecfg = grouped_engine_config(2, g, p, new, 1024);
        assert_eq!(ecfg.num_blocks, 2 * (7 + 4 * 3) + 8);
        assert_eq!(
            engine_config(2 * (g + 2), p, new, 1024).num_blocks,
            12 * 8 + 8
        );
        let mut e = reel_rollout::Engine::new(&model, ecfg).unwrap();
        for k in 0..2u32 {
            let ids: Vec<u32> = (0..p as u32).map(|i| (i * 7 + k) % 64).collect();
            let params = GenerationParams {
                max_new_tokens: new,
                ..GenerationParams::default()
            };
            e.add_group(ids, g, params).unwrap();
        }
        let outs = e.run().unwrap();
        assert_eq!(outs.len(), 2);
        for o in &outs {
            assert_eq!(o.samples.len(), g);
            assert!(o.samples.iter().all(|s| s.ids.len() == new));
        }
        assert_eq!(e.stats().preemptions, 0);
        assert_eq!(e.stats().prefill_tokens, 2 * p as u64);
    }
}
