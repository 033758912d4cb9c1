//! Choosing each sample's next token and its log-probability from a step's logits, given either
//! as full rows [S_l, V] or as each row's best candidates and the parts of its log-sum-exp (what a
//! GPU decoder downloads instead of the rows: reel-cuda's `topk_lse` kernel).
//!
//! For a row z at temperature τ (τ = 1 for greedy rows) the log-probability of token t is
//!
//!   log π(t) = (z_t − m)/τ − ln Σ_i exp((z_i − m)/τ),   m = max_i z_i,
//!
//! so a row is summarised by its candidates and the two parts (m, Σ) of its log-sum-exp
//! (lse = m/τ + ln Σ). The choice itself is `reel_model::generate`'s sampler: over a full row
//! [`sample_token`], over candidates [`sample_candidates`] — one implementation
//! ([`reel_model::generate::sample_sorted`] over the top-k ids in
//! [`reel_model::generate::rank_order`]), so both give the same token with the same generator
//! draws whenever the candidates hold the [`candidates_needed`] best ids: greedy (1), top-k with
//! k < V (k; top-p is applied within the top-k, exactly as over the full row), anything else V.
//! The log-probability then differs from the full row's only by the rounding of Σ (the device
//! sums in f32, the host in f64 per block of 1024: |Δ log π| ≤ 1e-5, `tests::*`).

use reel_model::generate::{
    candidates_needed, sample_candidates, sample_token, top_candidates, SamplingParams,
};

/// One logits row: the full row, or its best candidates (ids and logits sorted in
/// [`reel_model::generate::rank_order`]) with its max `m` and `sum` = Σ exp((z − m)/τ).
#[derive(Clone, Copy, Debug)]
pub enum RowLogits<'a> {
    Full(&'a [f32]),
    Top {
        ids: &'a [u32],
        values: &'a [f32],
        max: f32,
        sum: f32,
        /// The vocabulary size V.
        vocab: usize,
    },
}

/// Each logits row's `k` best candidates and the parts of its log-sum-exp at its temperature,
/// for S_l rows: `ids`, `values` [S_l, k] (sorted in `rank_order`), `max`, `sum` [S_l].
#[derive(Clone, Copy, Debug)]
pub struct TopRows<'a> {
    pub k: usize,
    pub ids: &'a [u32],
    pub values: &'a [f32],
    pub max: &'a [f32],
    pub sum: &'a [f32],
}

impl TopRows<'_> {
    /// Rows held (S_l).
    pub fn rows(&self) -> usize {
        self.max.len()
    }

    /// Whether the four arrays agree with S_l rows of k.
    pub fn is_consistent(&self) -> bool {
        let n = self.rows();
        self.sum.len() == n && self.ids.len() == n * self.k && self.values.len() == n * self.k
    }
}

/// A step's logits as the model returned them.
#[derive(Clone, Copy, Debug)]
pub enum StepLogits<'a> {
    /// [S_l, V].
    Full(&'a [f32]),
    /// Candidates of each row.
    Top(TopRows<'a>),
}

impl<'a> StepLogits<'a> {
    /// Rows held, for a vocabulary of `v`.
    pub fn rows(&self, v: usize) -> usize {
        match self {
            StepLogits::Full(z) => z.len() / v.max(1),
            StepLogits::Top(t) => t.rows(),
        }
    }

    /// Row r (in range: the caller checked [`StepLogits::rows`]).
    pub fn row(&self, r: usize, v: usize) -> RowLogits<'a> {
        match *self {
            StepLogits::Full(z) => RowLogits::Full(&z[r * v..(r + 1) * v]),
            StepLogits::Top(t) => RowLogits::Top {
                ids: &t.ids[r * t.k..(r + 1) * t.k],
                values: &t.values[r * t.k..(r + 1) * t.k],
                max: t.max[r],
                sum: t.sum[r],
                vocab: v,
            },
        }
    }
}

/// The temperature a row's log-probability is taken at: the sampling temperature, 1 when greedy.
pub fn logprob_temperature(p: &SamplingParams) -> f32 {
    if p.temperature > 0.0 {
        p.temperature
    } else {
        1.0
    }
}

/// How many candidates a step must return per row so that every row (its sampling parameters
/// `params`) can be chosen from them, over a vocabulary of `v`: the most [`candidates_needed`].
pub fn step_candidates(params: &[SamplingParams], v: usize) -> usize {
    params
        .iter()
        .map(|p| candidates_needed(p, v))
        .max()
        .unwrap_or(0)
}

/// The next token of a sample and its log-probability under softmax(z/τ) (module docs), with
/// the sample's generator: the one sampling path of both engines.
pub fn pick(row: RowLogits, p: &SamplingParams, rng: &mut reel_tensor::Rng) -> (u32, f32) {
    let t = logprob_temperature(p);
    match row {
        RowLogits::Full(z) => {
            let tok = sample_token(z, p, rng);
            (tok, log_prob(z, tok, p.temperature))
        }
        RowLogits::Top {
            ids,
            values,
            max,
            sum,
            vocab,
        } => {
            let tok = sample_candidates(ids, values, vocab, p, rng);
            let j = ids
                .iter()
                .position(|&i| i == tok)
                .expect("chosen among ids");
            (tok, log_prob_from(values[j], max, sum as f64, t))
        }
    }
}

/// `log softmax(logits / T)[tok]` (T = 1 when greedy) over a full row: [`exp_sum`], then
/// [`log_prob_from`].
pub fn log_prob(logits: &[f32], tok: u32, temperature: f32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let (max, sum) = exp_sum(logits, t);
    log_prob_from(logits[tok as usize], max, sum, t)
}

/// log π of a token whose logit is `z` in a row of max `max` and Σ exp((z_i − max)/t) = `sum`:
/// (z − max)/t − ln sum, in f64, rounded once.
pub fn log_prob_from(z: f32, max: f32, sum: f64, t: f32) -> f32 {
    (((z - max) as f64) / t as f64 - sum.ln()) as f32
}

/// The two parts of a row's log-sum-exp at temperature `t` > 0: m = max z (NaN ignored) and
/// Σ exp((z − m)/t). The exponentials are f32 ([`exp_nonpos`], relative error < 1e-6), summed
/// over 16 lanes per block of 1024 and the blocks in f64, so the pass over the vocabulary
/// vectorises (relative error of the sum ~1e-6).
pub fn exp_sum(logits: &[f32], t: f32) -> (f32, f64) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let inv_t = 1.0 / t;
    let mut sum = 0f64;
    for block in logits.chunks(1024) {
        let mut lanes = [0f32; 16];
        let mut rows = block.chunks_exact(16);
        for row in &mut rows {
            for (a, &x) in lanes.iter_mut().zip(row) {
                *a += exp_nonpos((x - max) * inv_t);
            }
        }
        for (a, &x) in lanes.iter_mut().zip(rows.remainder()) {
            *a += exp_nonpos((x - max) * inv_t);
        }
        sum += lanes.iter().map(|&a| a as f64).sum::<f64>();
    }
    (max, sum)
}

/// The CPU reference of a step's candidates (what reel-cuda's `topk_lse` computes): each row of
/// `logits` [rows, v] summarised by its `k` ≤ v best ids and logits ([`top_candidates`]), its max
/// and Σ exp((z − max)/τ_r) ([`exp_sum`], in f64 here).
pub fn top_rows_reference(
    logits: &[f32],
    v: usize,
    k: usize,
    temperatures: &[f32],
) -> (Vec<u32>, Vec<f32>, Vec<f32>, Vec<f64>) {
    let rows = temperatures.len();
    assert!(
        k <= v && logits.len() == rows * v,
        "top_rows_reference: shapes"
    );
    let (mut ids, mut values) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    let (mut max, mut sum) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for (z, &t) in logits.chunks(v.max(1)).zip(temperatures) {
        let top = top_candidates(z, k);
        values.extend(top.iter().map(|&i| z[i as usize]));
        ids.extend(top);
        let (m, s) = exp_sum(z, t);
        max.push(m);
        sum.push(s);
    }
    (ids, values, max, sum)
}

/// e^x for x ≤ 0 in f32 (Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln 2 / 2, a degree-6
/// polynomial for e^r, 2^n put into the exponent bits; relative error < 1e-6). Below −87 it
/// returns e^−87 (≈ 1.6e-38, nothing next to the maximum's 1), NaN stays NaN. Branch-free and
/// free of library calls, so loops over it vectorise.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by the 1.5·2^23 trick (|x·log2 e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_log_prob_matches_f64_within_1e_6() {
        let mut r = reel_tensor::rng(9);
        for &(v, scale) in &[
            (1usize, 1.0f32),
            (17, 3.0),
            (1024, 10.0),
            (151_936, 8.0),
            (5000, 80.0),
        ] {
            let z = reel_tensor::uniform_vec(&mut r, v, scale);
            for &t in &[0.0f32, 0.3, 1.0, 1.7] {
                let tt = if t > 0.0 { t } else { 1.0 } as f64;
                let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let lse = z
                    .iter()
                    .map(|&x| ((x as f64 - max) / tt).exp())
                    .sum::<f64>()
                    .ln();
                for tok in [0, v / 2, v - 1] {
                    let want = (z[tok] as f64 - max) / tt - lse;
                    let got = log_prob(&z, tok as u32, t) as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "V {v} scale {scale} T {t} token {tok}: {got} vs {want}"
                    );
                }
            }
        }
        for x in [0.0f32, -1e-8, -0.5, -1.0, -10.0, -50.0, -86.9] {
            let rel = ((exp_nonpos(x) as f64) / (x as f64).exp() - 1.0).abs();
            assert!(rel < 1e-6, "e^{x}: relative error {rel}");
        }
        assert!(exp_nonpos(-1000.0) < 1e-37 && exp_nonpos(f32::NAN).is_nan());
    }

    /// A row with ties on a coarse grid, −inf entries and both zeros, or plain uniform values.
    fn row(r: &mut reel_tensor::Rng, v: usize, tied: bool) -> Vec<f32> {
        let mut z = reel_tensor::uniform_vec(r, v, 6.0);
        if tied {
            for (i, x) in z.iter_mut().enumerate() {
                *x = x.round();
                if i % 5 == 2 {
                    *x = f32::NEG_INFINITY;
                } else if i % 13 == 1 {
                    *x = -0.0;
                }
            }
        }
        z
    }

    /// Candidates with the device's f32 sum (here: the f64 sum rounded to f32 and perturbed by
    /// a relative 1e-6, more than the device's rounding) give the full row's tokens with the same
    /// seed, and log-probabilities within 1e-5.
    #[test]
    fn candidates_pick_what_the_full_rows_pick() {
        let mut r = reel_tensor::rng(4);
        let params = [
            SamplingParams::default(),
            SamplingParams {
                temperature: 1.0,
                top_k: 50,
                top_p: 1.0,
                seed: 1,
            },
            SamplingParams {
                temperature: 0.6,
                top_k: 20,
                top_p: 0.8,
                seed: 2,
            },
            SamplingParams {
                temperature: 1.4,
                top_k: 0,
                top_p: 0.95,
                seed: 3,
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                top_p: 1.0,
                seed: 4,
            },
        ];
        let mut worst = 0f64;
        for &v in &[1usize, 7, 300, 4099] {
            let rows = 6;
            let tied: Vec<bool> = (0..rows).map(|i| i % 2 == 1).collect();
            let logits: Vec<f32> = tied.iter().flat_map(|&t| row(&mut r, v, t)).collect();
            for p in &params {
                let k = step_candidates(std::slice::from_ref(p), v);
                let temps = vec![logprob_temperature(p); rows];
                // A step's k is its rows' most: ask for a few more than this row needs.
                let kk = (k + 5).min(v);
                let (ids, values, max, sum) = top_rows_reference(&logits, v, kk, &temps);
                let sum32: Vec<f32> = sum.iter().map(|&s| (s * (1.0 + 1e-6)) as f32).collect();
                let top = StepLogits::Top(TopRows {
                    k: kk,
                    ids: &ids,
                    values: &values,
                    max: &max,
                    sum: &sum32,
                });
                let full = StepLogits::Full(&logits);
                assert_eq!((top.rows(v), full.rows(v)), (rows, rows));
                for i in 0..rows {
                    let (mut a, mut b) = (reel_tensor::rng(i as u64), reel_tensor::rng(i as u64));
                    for draw in 0..5 {
                        let (ta, la) = pick(top.row(i, v), p, &mut a);
                        let (tb, lb) = pick(full.row(i, v), p, &mut b);
                        assert_eq!(ta, tb, "V {v} {p:?} row {i} draw {draw}");
                        let d = (la as f64 - lb as f64).abs();
                        worst = worst.max(d);
                        assert!(d <= 1e-5, "V {v} {p:?} row {i}: log π {la} vs {lb}");
                    }
                }
            }
        }
        eprintln!("largest |Δ log π| {worst:.2e}");
    }

    #[test]
    fn a_step_needs_its_rows_most_candidates() {
        let g = SamplingParams::default();
        let k = |top_k| SamplingParams {
            temperature: 1.0,
            top_k,
            ..g
        };
        assert_eq!(step_candidates(&[], 100), 0);
        assert_eq!(step_candidates(&[g, g], 100), 1);
        assert_eq!(step_candidates(&[g, k(40), k(7)], 100), 40);
        assert_eq!(step_candidates(&[g, k(0)], 100), 100);
        assert_eq!(step_candidates(&[k(150)], 100), 100);
        assert_eq!(logprob_temperature(&g), 1.0);
        assert_eq!(logprob_temperature(&k(3)), 1.0);
    }
}
