//! KV-cached decoding of one sequence: prefill a prompt, then one token at a time, with greedy
//! or sampled choice (temperature, top-k, top-p, seed). [`KvCache`] holds each layer's rotated
//! keys and values, [max_len, H_kv, D], contiguously: the single-sequence [`KvStore`] of the one
//! decoding implementation, [`Qwen2::forward_step`] (batched and paged stores: reel-rollout).

use crate::decode::{
    DecodeScratch, HeadShape, KvError, KvStore, SeqStep, StepInput, StepPositions,
};
use crate::model::Qwen2;
use crate::ModelError;
use reel_kernels::attention::{attention_forward, AttnMask, AttnShape};
use std::ops::Range;

/// Keys and values of one sequence for every layer, plus decode scratch.
pub struct KvCache {
    kv: ContiguousKv,
    scratch: DecodeScratch,
}

/// Layer l's keys and values of positions 0..max_len, [max_len, H_kv, D] each.
struct ContiguousKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    max_len: usize,
    kv_width: usize,
}

impl KvCache {
    pub fn new(model: &Qwen2, max_len: usize) -> Self {
        let c = &model.config;
        let kvw = c.num_key_value_heads * c.head_dim;
        let layers = c.num_hidden_layers;
        KvCache {
            kv: ContiguousKv {
                k: vec![vec![0.0; max_len * kvw]; layers],
                v: vec![vec![0.0; max_len * kvw]; layers],
                len: 0,
                max_len,
                kv_width: kvw,
            },
            scratch: DecodeScratch::default(),
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.kv.len
    }

    pub fn is_empty(&self) -> bool {
        self.kv.len == 0
    }

    pub fn clear(&mut self) {
        self.kv.len = 0;
    }
}

impl KvStore for ContiguousKv {
    fn write(
        &mut self,
        layer: usize,
        rows: &[Range<usize>],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let [r] = rows else {
            return Err(
                format!("a KvCache holds one sequence, the step has {}", rows.len()).into(),
            );
        };
        let (w, start) = (self.kv_width, self.len);
        let end = start + r.len();
        if end > self.max_len {
            return Err(format!("{end} tokens exceed the cache ({})", self.max_len).into());
        }
        self.k[layer][start * w..end * w].copy_from_slice(&k[r.start * w..r.end * w]);
        self.v[layer][start * w..end * w].copy_from_slice(&v[r.start * w..r.end * w]);
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        rows: &[Range<usize>],
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        heads: HeadShape,
    ) -> Result<(), KvError> {
        let [r] = rows else {
            return Err(
                format!("a KvCache holds one sequence, the step has {}", rows.len()).into(),
            );
        };
        let total = self.len + r.len();
        let shape = AttnShape {
            b: 1,
            tq: r.len(),
            tk: total,
            h: heads.h,
            h_kv: heads.h_kv,
            d: heads.d,
        };
        attention_forward(
            out,
            lse,
            q,
            &self.k[layer][..total * self.kv_width],
            &self.v[layer][..total * self.kv_width],
            shape,
            AttnMask::Causal {
                q_offset: self.len,
                k_offset: 0,
            },
        );
        Ok(())
    }
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Chooses a token from logits.
pub fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut reel_tensor::Rng) -> u32 {
    use rand::Rng;
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if p.temperature <= 0.0 {
        return argmax();
    }
    let desc = |&a: &usize, &b: &usize| logits[b].total_cmp(&logits[a]);
    let mut idx = if p.top_k > 0 && p.top_k < logits.len() {
        top_k_indices(logits, p.top_k)
    } else {
        (0..logits.len()).collect()
    };
    idx.sort_unstable_by(desc);
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, &q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
    }
    let mut r: f64 = rng.random_range(0.0..1.0);
    for (j, &q) in probs.iter().enumerate() {
        if r < q {
            return idx[j] as u32;
        }
        r -= q;
    }
    idx[probs.len() - 1] as u32
}

/// Indices of the `k` largest logits (0 < k < len), in no particular order: one pass that keeps
/// candidates above a running threshold in a buffer of 4k, cut back to the k largest whenever it
/// fills (linear time, no vocabulary-sized allocation). Ties at the k-th value are broken
/// arbitrarily, as a sort would.
fn top_k_indices(logits: &[f32], k: usize) -> Vec<usize> {
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    let cap = 4 * k;
    let mut buf: Vec<usize> = Vec::with_capacity(cap + 1);
    let mut threshold = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > threshold || buf.len() < k {
            buf.push(i);
            if buf.len() > cap {
                buf.select_nth_unstable_by(k - 1, desc);
                buf.truncate(k);
                threshold = buf.iter().map(|&j| logits[j]).fold(f32::INFINITY, f32::min);
            }
        }
    }
    if buf.len() > k {
        buf.select_nth_unstable_by(k - 1, desc);
        buf.truncate(k);
    }
    buf
}

impl Qwen2 {
    /// Runs `tokens` (a prompt chunk or one new token) after what the cache holds and returns
    /// the logits [V] of the last one: [`Qwen2::forward_step`] with one sequence.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        let start = cache.kv.len;
        if n == 0 {
            return Err(ModelError::Invalid("no tokens to run".into()));
        }
        if start + n > cache.kv.max_len || start + n > self.config.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds the cache ({}) or max_position_embeddings ({})",
                start + n,
                cache.kv.max_len,
                self.config.max_position_embeddings
            )));
        }
        let step = [SeqStep {
            input: StepInput::Tokens(tokens),
            positions: StepPositions::Linear { start },
            logits: true,
        }];
        let logits = self
            .forward_step(&mut cache.scratch, &step, &mut cache.kv)?
            .to_vec();
        cache.kv.len = start + n;
        Ok(logits)
    }

    /// Generates up to `max_new` tokens after `prompt`, stopping after any token in `stop`
    /// (which is included in the output) or at `max_position_embeddings`, whichever comes first.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        params: &SamplingParams,
    ) -> Result<Vec<u32>, ModelError> {
        let max_pos = self.config.max_position_embeddings;
        if prompt.is_empty() || prompt.len() > max_pos {
            return Err(ModelError::Invalid(format!(
                "the prompt has {} tokens; the model takes 1 to {max_pos}",
                prompt.len()
            )));
        }
        let temperature_ok = params.temperature.is_finite() && params.temperature >= 0.0;
        let top_p_ok = params.top_p > 0.0 && params.top_p <= 1.0;
        if !temperature_ok || !top_p_ok {
            return Err(ModelError::Invalid(format!(
                "temperature must be finite and ≥ 0 and top_p in (0, 1]; got {} and {}",
                params.temperature, params.top_p
            )));
        }
        let max_new = max_new.min(max_pos - prompt.len());
        let mut cache = KvCache::new(self, prompt.len() + max_new);
        let mut rng = reel_tensor::rng(params.seed);
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        let mut logits = self.forward_cached(&mut cache, prompt)?;
        loop {
            let tok = sample_token(&logits, params, &mut rng);
            out.push(tok);
            if out.len() == max_new || stop.contains(&tok) {
                return Ok(out);
            }
            logits = self.forward_cached(&mut cache, &[tok])?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler as it was before the top-k selection: a full sort of the vocabulary.
    fn sample_by_full_sort(logits: &[f32], p: &SamplingParams, rng: &mut reel_tensor::Rng) -> u32 {
        use rand::Rng;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(p.top_k);
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (j, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= total);
        }
        let mut r: f64 = rng.random_range(0.0..1.0);
        for (j, &q) in probs.iter().enumerate() {
            if r < q {
                return idx[j] as u32;
            }
            r -= q;
        }
        idx[probs.len() - 1] as u32
    }

    #[test]
    fn top_k_selection_samples_as_the_full_sort_did() {
        let mut r = reel_tensor::rng(5);
        for (case, &(v, k, top_p)) in [
            (1000usize, 50usize, 1.0f32),
            (1000, 1, 1.0),
            (97, 96, 0.9),
            (5000, 7, 0.5),
            (300, 200, 1.0),
        ]
        .iter()
        .enumerate()
        {
            for trial in 0..20u64 {
                let logits = reel_tensor::uniform_vec(&mut r, v, 4.0);
                let mut want = top_k_indices(&logits, k);
                want.sort_unstable();
                let mut all: Vec<usize> = (0..v).collect();
                all.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                let mut top: Vec<usize> = all[..k].to_vec();
                top.sort_unstable();
                assert_eq!(want, top, "case {case} trial {trial}: the k largest");
                let p = SamplingParams {
                    temperature: 0.8,
                    top_p,
                    top_k: k,
                    seed: trial,
                };
                let (mut a, mut b) = (reel_tensor::rng(trial), reel_tensor::rng(trial));
                for _ in 0..5 {
                    assert_eq!(
                        sample_token(&logits, &p, &mut a),
                        sample_by_full_sort(&logits, &p, &mut b),
                        "case {case} trial {trial}"
                    );
                }
            }
        }
    }
}
