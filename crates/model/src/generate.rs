//! KV-cached decoding: prefill a prompt, then one token at a time, with greedy or sampled
//! choice (temperature, top-k, top-p, seed). The cache holds each layer's rotated keys and
//! values, [max_len, H_kv, D], for one sequence.

use crate::model::{Dims, LayerActs, Qwen2, Rotary};
use crate::ModelError;
use reel_kernels::attention::{attention_forward, AttnMask, AttnShape};
use reel_kernels::matmul::matmul_forward;
use reel_kernels::rmsnorm::rmsnorm_forward;

/// Keys and values of one sequence for every layer, plus decode scratch.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    max_len: usize,
    acts: LayerActs,
    qkv: Vec<f32>,
    x: [Vec<f32>; 2],
}

impl KvCache {
    pub fn new(model: &Qwen2, max_len: usize) -> Self {
        let c = &model.config;
        let kvw = c.num_key_value_heads * c.head_dim;
        let layers = c.num_hidden_layers;
        KvCache {
            k: vec![vec![0.0; max_len * kvw]; layers],
            v: vec![vec![0.0; max_len * kvw]; layers],
            len: 0,
            max_len,
            acts: LayerActs::default(),
            qkv: Vec::new(),
            x: [Vec::new(), Vec::new()],
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
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
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
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

impl Qwen2 {
    /// Runs `tokens` (a prompt chunk or one new token) after what the cache holds and returns
    /// the logits [V] of the last one.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        let start = cache.len;
        if n == 0 {
            return Err(ModelError::Invalid("no tokens to run".into()));
        }
        if start + n > cache.max_len || start + n > self.config.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds the cache ({}) or max_position_embeddings ({})",
                start + n,
                cache.max_len,
                self.config.max_position_embeddings
            )));
        }
        let v = self.config.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(ModelError::Invalid(format!(
                "token id {t} is outside the vocabulary ({v})"
            )));
        }
        let m = Dims::new(&self.config, 1, n);
        let positions: Vec<u32> = (start as u32..(start + n) as u32).collect();
        cache.acts.resize(&m);
        cache.qkv.resize(n * (m.q_width() + 2 * m.kv_width()), 0.0);
        for x in &mut cache.x {
            x.resize(n * m.d, 0.0);
        }
        reel_kernels::embedding::embedding_forward(
            &mut cache.x[0],
            tokens,
            &self.params[self.layout.embed.clone()],
            m.d,
        );
        let kvw = m.kv_width();
        let total = start + n;
        for l in 0..self.config.num_hidden_layers {
            let w = self.layer_weights(l);
            let [x_in, x_out] = &mut cache.x;
            let a = &mut cache.acts;
            self.qkv_forward(
                &w,
                a,
                &mut cache.qkv,
                x_in,
                Rotary::Positions(&positions),
                &m,
            );
            cache.k[l][start * kvw..total * kvw].copy_from_slice(&a.k);
            cache.v[l][start * kvw..total * kvw].copy_from_slice(&a.v);
            let shape = AttnShape {
                b: 1,
                tq: n,
                tk: total,
                h: m.h,
                h_kv: m.h_kv,
                d: m.hd,
            };
            attention_forward(
                &mut a.attn,
                &mut a.lse,
                &a.q,
                &cache.k[l][..total * kvw],
                &cache.v[l][..total * kvw],
                shape,
                AttnMask::Causal {
                    q_offset: start,
                    k_offset: 0,
                },
            );
            self.post_attention_forward(&w, a, x_in, x_out, &m);
            cache.x.swap(0, 1);
        }
        cache.len = total;
        let last = &cache.x[0][(n - 1) * m.d..n * m.d];
        let mut xn = vec![0.0f32; m.d];
        let mut rstd = [0.0f32];
        rmsnorm_forward(
            &mut xn,
            &mut rstd,
            last,
            &self.params[self.layout.final_norm.clone()],
            1,
            m.d,
            self.config.rms_norm_eps,
        );
        let mut logits = vec![0.0f32; v];
        matmul_forward(
            &mut logits,
            &xn,
            &self.params[self.layout.lm_head.clone()],
            None,
            1,
            m.d,
            v,
        );
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
