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

/// The order every selection of the sampler follows: larger logit first (IEEE total order,
/// `f32::total_cmp`, so +0 > −0 and −inf is below every finite value), equal logits by the
/// smaller vocabulary id first. Greedy decoding takes the first token of this order, top-k its
/// first k: so the choice never depends on how the candidates were found (a full sort, the
/// linear selection below, or the device's `topk_lse` kernel in reel-cuda, which follows the
/// same order).
pub fn rank_order(logits: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
}

/// How many of a row's best candidates (in [`rank_order`]) choosing from `p` reads, over a
/// vocabulary of `v`: 1 when greedy, `top_k` when it keeps fewer than `v`, else all `v` (top-p is
/// applied within these, so it needs no more).
pub fn candidates_needed(p: &SamplingParams, v: usize) -> usize {
    if p.temperature <= 0.0 {
        1.min(v)
    } else if p.top_k > 0 && p.top_k < v {
        p.top_k
    } else {
        v
    }
}

/// Chooses a token from logits: the row's [`candidates_needed`] best ids in [`rank_order`]
/// ([`top_candidates`]), then [`sample_sorted`] over their logits.
pub fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut reel_tensor::Rng) -> u32 {
    let ids = top_candidates(logits, candidates_needed(p, logits.len()));
    let values: Vec<f32> = ids.iter().map(|&i| logits[i as usize]).collect();
    ids[sample_sorted(&values, p, rng)]
}

/// Chooses a token from a row's best candidates, ids and their logits sorted in
/// [`rank_order`] (at least [`candidates_needed`] of them; more are ignored): the same token as
/// [`sample_token`] over the full row, with the same generator draws.
pub fn sample_candidates(
    ids: &[u32],
    values: &[f32],
    v: usize,
    p: &SamplingParams,
    rng: &mut reel_tensor::Rng,
) -> u32 {
    let n = candidates_needed(p, v);
    debug_assert!(ids.len() >= n && values.len() >= n);
    ids[sample_sorted(&values[..n], p, rng)]
}

/// The choice among sorted candidates (their logits `values`, best first, all of them kept by
/// top-k): position 0 when greedy (no draw); else softmax of values / T in f64, cut to the
/// smallest prefix whose probability reaches `top_p` and renormalised, then one uniform draw.
/// Returns the position of the chosen candidate.
pub fn sample_sorted(values: &[f32], p: &SamplingParams, rng: &mut reel_tensor::Rng) -> usize {
    use rand::Rng;
    if p.temperature <= 0.0 || values.len() <= 1 {
        return 0;
    }
    let max = values[0];
    let mut probs: Vec<f64> = values
        .iter()
        .map(|&x| (((x - max) / p.temperature) as f64).exp())
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
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
    }
    let mut r: f64 = rng.random_range(0.0..1.0);
    for (j, &q) in probs.iter().enumerate() {
        if r < q {
            return j;
        }
        r -= q;
    }
    probs.len() - 1
}

/// The ids of the `k` best logits in [`rank_order`], sorted (k ≥ len: every id). The CPU
/// reference of reel-cuda's `topk_lse` candidates.
pub fn top_candidates(logits: &[f32], k: usize) -> Vec<u32> {
    let (n, k) = (logits.len(), k.min(logits.len()));
    if k == 0 {
        return Vec::new();
    }
    if k == 1 {
        // The first of the order: a scan.
        let best = (1..n).fold(0, |b, i| {
            if rank_order(logits, i, b).is_lt() {
                i
            } else {
                b
            }
        });
        return vec![best as u32];
    }
    let mut idx = if k < n {
        top_k_indices(logits, k)
    } else {
        (0..n).collect()
    };
    idx.sort_unstable_by(|&a, &b| rank_order(logits, a, b));
    idx.into_iter().map(|i| i as u32).collect()
}

/// Indices of the `k` best logits in [`rank_order`] (0 < k < len), in no particular order: one
/// pass that keeps candidates above a running threshold in a buffer of 4k, cut back to the k best
/// whenever it fills (linear time, no vocabulary-sized allocation). A logit equal to the
/// threshold is dropped: ids come in increasing order, so it ranks below every kept one of that
/// value.
fn top_k_indices(logits: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| rank_order(logits, *a, *b);
    let cap = 4 * k;
    let mut buf: Vec<usize> = Vec::with_capacity(cap + 1);
    // The worst kept logit, once the buffer has been cut.
    let mut threshold: Option<f32> = None;
    for (i, &x) in logits.iter().enumerate() {
        if buf.len() < k || threshold.is_none_or(|t| x.total_cmp(&t).is_gt()) {
            buf.push(i);
            if buf.len() > cap {
                buf.select_nth_unstable_by(k - 1, order);
                buf.truncate(k);
                threshold = Some(logits[buf[k - 1]]);
            }
        }
    }
    if buf.len() > k {
        buf.select_nth_unstable_by(k - 1, order);
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

    /// Every id sorted in [`rank_order`] by a full sort (the selection's reference).
    fn full_sort(logits: &[f32]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then_with(|| a.cmp(&b)));
        idx
    }

    /// The sampler as it was before the top-k selection: a full sort of the vocabulary (ties
    /// by id), top-k, softmax, top-p, one draw.
    fn sample_by_full_sort(logits: &[f32], p: &SamplingParams, rng: &mut reel_tensor::Rng) -> u32 {
        use rand::Rng;
        let mut idx = full_sort(logits);
        if p.temperature <= 0.0 {
            return idx[0] as u32;
        }
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
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

    /// Rows with many ties (values on a coarse grid), −inf entries and both zeros.
    fn tied_row(r: &mut reel_tensor::Rng, v: usize) -> Vec<f32> {
        let mut z = reel_tensor::uniform_vec(r, v, 3.0);
        for (i, x) in z.iter_mut().enumerate() {
            *x = (*x * 2.0).round() / 2.0;
            if i % 7 == 3 {
                *x = f32::NEG_INFINITY;
            } else if i % 11 == 5 {
                *x = if i % 2 == 0 { 0.0 } else { -0.0 };
            }
        }
        z
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
            (300, 0, 0.7),
            (40, 64, 1.0),
        ]
        .iter()
        .enumerate()
        {
            for trial in 0..20u64 {
                // Half the trials on rows full of ties.
                let logits = if trial % 2 == 0 {
                    reel_tensor::uniform_vec(&mut r, v, 4.0)
                } else {
                    tied_row(&mut r, v)
                };
                let all = full_sort(&logits);
                let kk = if k == 0 { v } else { k.min(v) };
                let want: Vec<u32> = all[..kk].iter().map(|&i| i as u32).collect();
                assert_eq!(
                    top_candidates(&logits, kk),
                    want,
                    "case {case} trial {trial}: the k best in order"
                );
                assert_eq!(top_candidates(&logits, 1), want[..1], "case {case}: k = 1");
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

    #[test]
    fn ties_go_to_the_smaller_id_and_zeros_follow_the_total_order() {
        let greedy = SamplingParams::default();
        let mut r = reel_tensor::rng(0);
        assert_eq!(sample_token(&[1.0, 3.0, 2.0, 3.0], &greedy, &mut r), 1);
        assert_eq!(sample_token(&[-0.0, 0.0, -1.0], &greedy, &mut r), 1);
        let z = [f32::NEG_INFINITY; 5];
        assert_eq!(sample_token(&z, &greedy, &mut r), 0);
        assert_eq!(top_candidates(&z, 3), vec![0, 1, 2]);
        assert_eq!(
            top_candidates(&[2.0, 5.0, 2.0, 5.0, f32::NEG_INFINITY, 2.0], 4),
            vec![1, 3, 0, 2]
        );
        // A selection over more than 4k ids that cuts its buffer several times among ties.
        let z: Vec<f32> = (0..1000).map(|i| (i % 3) as f32).collect();
        let top = top_candidates(&z, 10);
        assert_eq!(top, (0..10).map(|j| 2 + 3 * j).collect::<Vec<u32>>());
    }

    #[test]
    fn candidates_sample_as_the_full_row() {
        let mut r = reel_tensor::rng(8);
        for &(v, temperature, top_k, top_p) in &[
            (1000usize, 0.0f32, 0usize, 1.0f32),
            (1000, 1.0, 50, 1.0),
            (1000, 0.7, 50, 0.8),
            (77, 1.3, 0, 0.9),
            (77, 1.0, 200, 1.0),
            (5000, 0.5, 1, 1.0),
        ] {
            let p = SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: 3,
            };
            let n = candidates_needed(&p, v);
            assert!(n >= 1 && n <= v);
            for trial in 0..30u64 {
                let z = if trial % 3 == 0 {
                    tied_row(&mut r, v)
                } else {
                    reel_tensor::uniform_vec(&mut r, v, 5.0)
                };
                // More candidates than needed (a step asks for its rows' most).
                let ids = top_candidates(&z, (n + 13).min(v));
                let values: Vec<f32> = ids.iter().map(|&i| z[i as usize]).collect();
                let (mut a, mut b) = (reel_tensor::rng(trial), reel_tensor::rng(trial));
                for _ in 0..4 {
                    assert_eq!(
                        sample_candidates(&ids, &values, v, &p, &mut a),
                        sample_token(&z, &p, &mut b),
                        "V {v} T {temperature} top-k {top_k} top-p {top_p} trial {trial}"
                    );
                }
            }
        }
    }
}
