//! The GRPO loss: per-token clipped policy loss and k3 KL, each with its exact derivative with
//! respect to log π, aggregated over a micro-batch into the loss and the per-token coefficients
//! `g_t = ∂L/∂log π_t` that the model's backward (`Qwen2::backward_logprobs`) consumes.
//!
//! Per response token t of sequence i with advantage A = A_i (inputs [B·T], advantages [B]):
//!   ρ = exp(clamp(log π − log π_old, ±20))
//!   ℓ_pg = max(−A·ρ, −A·clip(ρ, 1 − ε_lo, 1 + ε_hi))           (PPO, DAPO's decoupled clip)
//!   ℓ_pg = min(ℓ_pg, −c·A)  when A < 0                          (dual clip, c = 3)
//!   k3   = e^x − x − 1,  x = clamp(log π_ref − log π, ±20)      (Schulman's k3, verl low_var_kl)
//!   ℓ    = ℓ_pg + β·k3
//! Derivatives (a clamp passes the gradient only inside its bounds, bounds included, as torch):
//!   ∂ℓ_pg/∂log π = −A·ρ on the unclipped branch, 0 on a clipped branch or where |Δ| > 20;
//!   ∂k3/∂log π = 1 − e^x inside the clamp, 0 outside.
//! Aggregation, with weights that make micro-batches and data-parallel ranks add up to the
//! mini-batch's gradient (global counts passed in [`LossScale`]):
//!   token-mean               L = Σ_{i,t} ℓ / N_tokens
//!   seq-mean-token-mean      L = Σ_i (Σ_t ℓ / |o_i|) / N_seqs
//!   seq-mean-token-sum-norm  L = Σ_i (Σ_t ℓ / L_max) / N_seqs       (Dr.GRPO; L_max constant;
//!                            verl's mode omits the 1/N_seqs, a constant factor)
//! so `L = Σ w_t·ℓ_t` and `g_t = w_t·∂ℓ_t/∂log π_t`.

use serde::Serialize;

use crate::config::LossAggregation;
use crate::RlError;

/// Bound on log-ratios before exponentiating (ratio and KL), as verl clamps.
pub const LOG_RATIO_CLAMP: f64 = 20.0;

/// The per-token loss settings (from [`crate::GrpoConfig::policy_loss`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    /// ε_lo: lower clip of the ratio at 1 − clip_low.
    pub clip_low: f32,
    /// ε_hi: upper clip of the ratio at 1 + clip_high.
    pub clip_high: f32,
    /// Dual-clip bound c (> 1) for A < 0; None = off.
    pub dual_clip: Option<f32>,
    /// β of the k3 KL term; 0 = no KL (no reference needed).
    pub kl_coef: f32,
    /// How token losses become the scalar loss.
    pub aggregation: LossAggregation,
    /// L_max of seq-mean-token-sum-norm.
    pub max_response_tokens: usize,
}

/// A per-token loss term and its derivative with respect to log π.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenTerm {
    pub value: f64,
    pub dlogp: f64,
}

/// Which branch of the clipped policy loss a token took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipBranch {
    /// −A·ρ: the gradient flows.
    Unclipped,
    /// A < 0 and ρ < 1 − ε_lo: the clipped constant won.
    Low,
    /// A > 0 and ρ > 1 + ε_hi: the clipped constant won.
    High,
    /// A < 0 and the dual-clip bound −c·A won (ρ > c).
    Dual,
}

/// The clipped policy loss of one token: its term, the branch it took and the ratio ρ.
pub fn policy_loss_token(
    logp: f64,
    old_logp: f64,
    advantage: f64,
    cfg: &PolicyLossConfig,
) -> (TokenTerm, ClipBranch, f64) {
    let delta = logp - old_logp;
    let rho = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp();
    let drho = if delta.abs() <= LOG_RATIO_CLAMP {
        rho
    } else {
        0.0
    };
    let (lo, hi) = (1.0 - cfg.clip_low as f64, 1.0 + cfg.clip_high as f64);
    let unclipped = -advantage * rho;
    let clipped = -advantage * rho.clamp(lo, hi);
    let (mut term, mut branch) = if clipped > unclipped {
        // ρ is outside [lo, hi] (else the two are equal): the clipped term is constant in log π.
        let side = if rho < lo {
            ClipBranch::Low
        } else {
            ClipBranch::High
        };
        (
            TokenTerm {
                value: clipped,
                dlogp: 0.0,
            },
            side,
        )
    } else {
        (
            TokenTerm {
                value: unclipped,
                dlogp: -advantage * drho,
            },
            ClipBranch::Unclipped,
        )
    };
    if let Some(c) = cfg.dual_clip {
        let bound = -(c as f64) * advantage;
        if advantage < 0.0 && bound < term.value {
            term = TokenTerm {
                value: bound,
                dlogp: 0.0,
            };
            branch = ClipBranch::Dual;
        }
    }
    (term, branch, rho)
}

/// k3 KL estimate of one token, `e^x − x − 1` with `x = clamp(log π_ref − log π, ±20)`.
pub fn k3_kl_token(logp: f64, ref_logp: f64) -> TokenTerm {
    let x = ref_logp - logp;
    let xc = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
    let e = xc.exp();
    TokenTerm {
        value: e - xc - 1.0,
        dlogp: if x.abs() <= LOG_RATIO_CLAMP {
            1.0 - e
        } else {
            0.0
        },
    }
}

/// One micro-batch of scored responses: per-token slices [B·T] in the model's layout.
#[derive(Debug, Clone, Copy)]
pub struct PolicyTokens<'a> {
    pub b: usize,
    pub t: usize,
    /// log π_θ(target) under the current policy (`Qwen2::token_logprobs`).
    pub logp: &'a [f32],
    /// log π_old(target), scored before the update (the rollout policy).
    pub old_logp: &'a [f32],
    /// log π_ref(target) of the frozen reference; required when β > 0.
    pub ref_logp: Option<&'a [f32]>,
    /// Entropy of the policy at each position, for metrics only.
    pub entropy: Option<&'a [f32]>,
    /// True at response tokens (the positions that carry loss).
    pub mask: &'a [bool],
    /// Advantage of each sequence [B].
    pub advantages: &'a [f32],
    /// Response tokens of each whole sequence [B], when these rows hold only a shard of their
    /// sequences (sequence parallelism); None = count the mask of each row. Used by
    /// seq-mean-token-mean.
    pub seq_tokens: Option<&'a [usize]>,
}

/// The mini-batch totals the aggregation divides by, summed over every micro-batch and
/// data-parallel rank of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossScale {
    /// Response tokens in the mini-batch (token-mean).
    pub global_tokens: usize,
    /// Sequences in the mini-batch (seq-mean modes).
    pub global_seqs: usize,
}

/// Sums over response tokens, mergeable across micro-batches and ranks; [`GrpoMetrics::summary`]
/// turns them into means and fractions.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoMetrics {
    /// Response tokens seen.
    pub tokens: usize,
    /// Σ ℓ_pg (unweighted).
    pub pg_loss_sum: f64,
    /// Σ k3 over tokens with a reference, and their count.
    pub kl_sum: f64,
    pub kl_tokens: usize,
    /// Σ entropy over tokens with an entropy, and their count.
    pub entropy_sum: f64,
    pub entropy_tokens: usize,
    /// Tokens on each clipped branch.
    pub clipped_low: usize,
    pub clipped_high: usize,
    pub dual_clipped: usize,
    /// Σ ρ, min ρ, max ρ.
    pub ratio_sum: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

impl Default for GrpoMetrics {
    fn default() -> Self {
        GrpoMetrics {
            tokens: 0,
            pg_loss_sum: 0.0,
            kl_sum: 0.0,
            kl_tokens: 0,
            entropy_sum: 0.0,
            entropy_tokens: 0,
            clipped_low: 0,
            clipped_high: 0,
            dual_clipped: 0,
            ratio_sum: 0.0,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
        }
    }
}

/// `x` as four 16-bit integers (low first), each exact in an f32.
pub fn u64_words(x: u64) -> [f32; 4] {
    std::array::from_fn(|i| ((x >> (16 * i)) & 0xffff) as f32)
}

/// The u64 of [`u64_words`]; `None` when a word is not an integer in 0..65536.
pub fn words_u64(w: &[f32]) -> Option<u64> {
    if w.len() != 4 {
        return None;
    }
    let mut x = 0u64;
    for (i, &v) in w.iter().enumerate() {
        if !(0.0..65536.0).contains(&v) || v.fract() != 0.0 {
            return None;
        }
        x |= (v as u64) << (16 * i);
    }
    Some(x)
}

/// Per-token means and fractions of a step (what the metrics JSONL records).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsSummary {
    pub tokens: usize,
    pub pg_loss: f64,
    pub kl: Option<f64>,
    pub entropy: Option<f64>,
    pub clip_frac_low: f64,
    pub clip_frac_high: f64,
    pub dual_clip_frac: f64,
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

impl GrpoMetrics {
    /// Adds another micro-batch's (or rank's) sums.
    pub fn merge(&mut self, o: &GrpoMetrics) {
        self.tokens += o.tokens;
        self.pg_loss_sum += o.pg_loss_sum;
        self.kl_sum += o.kl_sum;
        self.kl_tokens += o.kl_tokens;
        self.entropy_sum += o.entropy_sum;
        self.entropy_tokens += o.entropy_tokens;
        self.clipped_low += o.clipped_low;
        self.clipped_high += o.clipped_high;
        self.dual_clipped += o.dual_clipped;
        self.ratio_sum += o.ratio_sum;
        self.ratio_min = self.ratio_min.min(o.ratio_min);
        self.ratio_max = self.ratio_max.max(o.ratio_max);
    }

    /// Values in [`GrpoMetrics::packed`]'s form.
    pub const PACKED_LEN: usize = 12 * 4;

    /// The sums as f32 words that survive an exact transfer (a device all-gather of f32s): each
    /// field's 64 bits (f64, or the count as u64) as four 16-bit integers, each exact in an f32.
    /// [`GrpoMetrics::from_packed`] is its inverse, bit for bit.
    pub fn packed(&self) -> Vec<f32> {
        let fields = [
            self.tokens as u64,
            self.pg_loss_sum.to_bits(),
            self.kl_sum.to_bits(),
            self.kl_tokens as u64,
            self.entropy_sum.to_bits(),
            self.entropy_tokens as u64,
            self.clipped_low as u64,
            self.clipped_high as u64,
            self.dual_clipped as u64,
            self.ratio_sum.to_bits(),
            self.ratio_min.to_bits(),
            self.ratio_max.to_bits(),
        ];
        fields.iter().flat_map(|&x| u64_words(x)).collect()
    }

    /// The metrics [`GrpoMetrics::packed`] made; `None` when `w` is not [`Self::PACKED_LEN`]
    /// words of 16-bit integers.
    pub fn from_packed(w: &[f32]) -> Option<GrpoMetrics> {
        if w.len() != Self::PACKED_LEN {
            return None;
        }
        let v: Vec<u64> = w.chunks(4).map(words_u64).collect::<Option<_>>()?;
        let f = f64::from_bits;
        Some(GrpoMetrics {
            tokens: v[0] as usize,
            pg_loss_sum: f(v[1]),
            kl_sum: f(v[2]),
            kl_tokens: v[3] as usize,
            entropy_sum: f(v[4]),
            entropy_tokens: v[5] as usize,
            clipped_low: v[6] as usize,
            clipped_high: v[7] as usize,
            dual_clipped: v[8] as usize,
            ratio_sum: f(v[9]),
            ratio_min: f(v[10]),
            ratio_max: f(v[11]),
        })
    }

    /// Means over tokens (0 and ratios of 1 when there were none).
    pub fn summary(&self) -> MetricsSummary {
        let n = self.tokens.max(1) as f64;
        let mean = |s: f64, c: usize| (c > 0).then(|| s / c as f64);
        MetricsSummary {
            tokens: self.tokens,
            pg_loss: self.pg_loss_sum / n,
            kl: mean(self.kl_sum, self.kl_tokens),
            entropy: mean(self.entropy_sum, self.entropy_tokens),
            clip_frac_low: self.clipped_low as f64 / n,
            clip_frac_high: self.clipped_high as f64 / n,
            dual_clip_frac: self.dual_clipped as f64 / n,
            ratio_mean: if self.tokens > 0 {
                self.ratio_sum / n
            } else {
                1.0
            },
            ratio_min: if self.tokens > 0 { self.ratio_min } else { 1.0 },
            ratio_max: if self.tokens > 0 { self.ratio_max } else { 1.0 },
        }
    }
}

fn check_len(name: &str, len: usize, want: usize) -> Result<(), RlError> {
    if len == want {
        Ok(())
    } else {
        Err(RlError::Invalid(format!(
            "{name} has {len} values, expected {want}"
        )))
    }
}

/// The GRPO loss of one micro-batch: writes `dlogp` [B·T] (`g_t = ∂L/∂log π_t`, 0 off the
/// mask) and returns this micro-batch's share of the mini-batch loss (the shares of all
/// micro-batches and ranks add up to L) and its metric sums.
pub fn grpo_loss(
    x: &PolicyTokens,
    cfg: &PolicyLossConfig,
    scale: LossScale,
    dlogp: &mut [f32],
) -> Result<(f64, GrpoMetrics), RlError> {
    let n = x.b * x.t;
    check_len("logp", x.logp.len(), n)?;
    check_len("old_logp", x.old_logp.len(), n)?;
    check_len("mask", x.mask.len(), n)?;
    check_len("dlogp", dlogp.len(), n)?;
    check_len("advantages", x.advantages.len(), x.b)?;
    if let Some(r) = x.ref_logp {
        check_len("ref_logp", r.len(), n)?;
    }
    if let Some(e) = x.entropy {
        check_len("entropy", e.len(), n)?;
    }
    if let Some(s) = x.seq_tokens {
        check_len("seq_tokens", s.len(), x.b)?;
    }
    let beta = cfg.kl_coef as f64;
    if beta > 0.0 && x.ref_logp.is_none() {
        return Err(RlError::Invalid(format!(
            "kl_coef is {beta} but no reference log-probabilities were given"
        )));
    }
    if let Some(i) = x.advantages.iter().position(|a| !a.is_finite()) {
        return Err(RlError::Invalid(format!(
            "advantage of sequence {i} is {}",
            x.advantages[i]
        )));
    }
    for (name, v) in [("logp", Some(x.logp)), ("old_logp", Some(x.old_logp))]
        .into_iter()
        .chain([("ref_logp", x.ref_logp)])
    {
        let Some(v) = v else { continue };
        if let Some(i) = (0..n).find(|&i| x.mask[i] && !v[i].is_finite()) {
            return Err(RlError::Invalid(format!(
                "{name}[{i}] (sequence {}, position {}) is {}",
                i / x.t.max(1),
                i % x.t.max(1),
                v[i]
            )));
        }
    }
    let row_tokens: Vec<usize> = (0..x.b)
        .map(|i| {
            x.mask[i * x.t..(i + 1) * x.t]
                .iter()
                .filter(|&&m| m)
                .count()
        })
        .collect();
    let local_tokens: usize = row_tokens.iter().sum();
    let local_seqs = row_tokens.iter().filter(|&&c| c > 0).count();
    match cfg.aggregation {
        LossAggregation::TokenMean if scale.global_tokens < local_tokens => {
            return Err(RlError::Invalid(format!(
                "global token count {} is below this micro-batch's {local_tokens} response tokens",
                scale.global_tokens
            )));
        }
        LossAggregation::SeqMeanTokenMean | LossAggregation::SeqMeanTokenSumNorm
            if scale.global_seqs < local_seqs =>
        {
            return Err(RlError::Invalid(format!(
                "global sequence count {} is below this micro-batch's {local_seqs} sequences",
                scale.global_seqs
            )));
        }
        LossAggregation::SeqMeanTokenSumNorm if cfg.max_response_tokens == 0 => {
            return Err(RlError::Invalid(
                "max_response_tokens is 0: seq-mean-token-sum-norm has no normaliser".into(),
            ));
        }
        _ => {}
    }

    let mut metrics = GrpoMetrics::default();
    let mut loss = 0.0f64;
    dlogp.fill(0.0);
    for i in 0..x.b {
        if row_tokens[i] == 0 {
            continue;
        }
        let w = match cfg.aggregation {
            LossAggregation::TokenMean => 1.0 / scale.global_tokens as f64,
            LossAggregation::SeqMeanTokenMean => {
                let len = x.seq_tokens.map_or(row_tokens[i], |s| s[i]);
                if len < row_tokens[i] {
                    return Err(RlError::Invalid(format!(
                        "seq_tokens[{i}] = {len} but the row holds {} response tokens",
                        row_tokens[i]
                    )));
                }
                1.0 / (scale.global_seqs as f64 * len as f64)
            }
            LossAggregation::SeqMeanTokenSumNorm => {
                1.0 / (scale.global_seqs as f64 * cfg.max_response_tokens as f64)
            }
        };
        let adv = x.advantages[i] as f64;
        for j in i * x.t..(i + 1) * x.t {
            if !x.mask[j] {
                continue;
            }
            let lp = x.logp[j] as f64;
            let (pg, branch, rho) = policy_loss_token(lp, x.old_logp[j] as f64, adv, cfg);
            let mut value = pg.value;
            let mut d = pg.dlogp;
            if let Some(r) = x.ref_logp {
                let kl = k3_kl_token(lp, r[j] as f64);
                metrics.kl_sum += kl.value;
                metrics.kl_tokens += 1;
                if beta > 0.0 {
                    value += beta * kl.value;
                    d += beta * kl.dlogp;
                }
            }
            if let Some(e) = x.entropy {
                metrics.entropy_sum += e[j] as f64;
                metrics.entropy_tokens += 1;
            }
            loss += w * value;
            dlogp[j] = (w * d) as f32;
            metrics.tokens += 1;
            metrics.pg_loss_sum += pg.value;
            match branch {
                ClipBranch::Unclipped => {}
                ClipBranch::Low => metrics.clipped_low += 1,
                ClipBranch::High => metrics.clipped_high += 1,
                ClipBranch::Dual => metrics.dual_clipped += 1,
            }
            metrics.ratio_sum += rho;
            metrics.ratio_min = metrics.ratio_min.min(rho);
            metrics.ratio_max = metrics.ratio_max.max(rho);
        }
    }
    Ok((loss, metrics))
}

#[cfg(test)]
mod tests {
    #[test]
    fn packed_metrics_come_back_bit_for_bit() {
        let m = GrpoMetrics {
            tokens: 123_456_789,
            pg_loss_sum: -0.1234567890123,
            kl_sum: 1e-300,
            kl_tokens: 7,
            entropy_sum: 3.5,
            entropy_tokens: 9,
            clipped_low: 1,
            clipped_high: 2,
            dual_clipped: 3,
            ratio_sum: 1.0 / 3.0,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
        };
        let w = m.packed();
        assert_eq!(w.len(), GrpoMetrics::PACKED_LEN);
        let back = GrpoMetrics::from_packed(&w).unwrap();
        assert_eq!(back.pg_loss_sum.to_bits(), m.pg_loss_sum.to_bits());
        assert_eq!(back, m);
        assert_eq!(words_u64(&u64_words(u64::MAX - 5)).unwrap(), u64::MAX - 5);
        // Not words: a fraction, out of range, the wrong length.
        let mut bad = w.clone();
        bad[3] = 0.5;
        assert!(GrpoMetrics::from_packed(&bad).is_none());
        bad[3] = 65536.0;
        assert!(GrpoMetrics::from_packed(&bad).is_none());
        assert!(GrpoMetrics::from_packed(&w[1..]).is_none());
    }

    use super::*;

    const CFG: PolicyLossConfig = PolicyLossConfig {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: Some(3.0),
        kl_coef: 0.0,
        aggregation: LossAggregation::TokenMean,
        max_response_tokens: 8,
    };

    /// Clip bounds are f32 (0.2f32 is 0.2000000030 in f64): agreement to 1e-7.
    fn close(a: f64, b: f64, what: &str) {
        assert!((a - b).abs() <= 1e-7 + 1e-7 * b.abs(), "{what}: {a} vs {b}");
    }

    /// Each branch by hand: (A, ρ) → (loss, ∂/∂log π, branch).
    #[test]
    fn policy_loss_branches_by_hand() {
        let no_dual = PolicyLossConfig {
            dual_clip: None,
            ..CFG
        };
        #[rustfmt::skip]
        let cases: [(f64, f64, PolicyLossConfig, f64, f64, ClipBranch); 9] = [
            // Inside the clip range: −Aρ, derivative −Aρ.
            (1.0, 1.1, CFG, -1.1, -1.1, ClipBranch::Unclipped),
            (-1.0, 0.9, CFG, 0.9, 0.9, ClipBranch::Unclipped),
            // A > 0, ρ above 1 + ε_hi: the constant −A(1 + ε_hi).
            (1.0, 1.5, CFG, -1.28, 0.0, ClipBranch::High),
            // A > 0, ρ below 1 − ε_lo: max picks −Aρ, the gradient flows.
            (2.0, 0.5, CFG, -1.0, -1.0, ClipBranch::Unclipped),
            // A < 0, ρ below 1 − ε_lo: the constant −A(1 − ε_lo).
            (-1.0, 0.5, CFG, 0.8, 0.0, ClipBranch::Low),
            // A < 0, ρ above 1 + ε_hi but below c: −Aρ (PPO's max does not clip this side).
            (-1.0, 1.5, CFG, 1.5, 1.5, ClipBranch::Unclipped),
            // A < 0, ρ above c = 3: dual clip's constant −cA.
            (-0.5, 4.0, CFG, 1.5, 0.0, ClipBranch::Dual),
            // The same without dual clip: −Aρ.
            (-0.5, 4.0, no_dual, 2.0, 2.0, ClipBranch::Unclipped),
            // A = 0: zero loss and gradient.
            (0.0, 1.7, CFG, 0.0, 0.0, ClipBranch::Unclipped),
        ];
        for (a, rho, cfg, value, d, branch) in cases {
            let old = -1.3;
            let (t, b, r) = policy_loss_token(old + rho.ln(), old, a, &cfg);
            let what = format!("A {a} ρ {rho}");
            close(r, rho, &what);
            close(t.value, value, &what);
            close(t.dlogp, d, &what);
            assert_eq!(b, branch, "{what}");
        }
    }

    #[test]
    fn ratio_is_clamped_at_20() {
        let no_dual = PolicyLossConfig {
            dual_clip: None,
            ..CFG
        };
        // Δ = 25 clamps to 20: ρ = e^20 and no gradient through the clamp.
        let (t, b, r) = policy_loss_token(-1.0 + 25.0, -1.0, -2.0, &no_dual);
        close(r, 20f64.exp(), "ρ");
        close(t.value, 2.0 * 20f64.exp(), "loss");
        assert_eq!((t.dlogp, b), (0.0, ClipBranch::Unclipped));
        // Δ = −25: ρ = e^−20, A > 0 keeps −Aρ (tiny), gradient 0.
        let (t, _, r) = policy_loss_token(-26.0, -1.0, 1.0, &CFG);
        close(r, (-20f64).exp(), "ρ");
        assert_eq!(t.dlogp, 0.0);
        // At exactly the bound the gradient still flows (torch's clamp includes its bounds).
        let (t, _, _) = policy_loss_token(19.0, -1.0, -1.0, &no_dual);
        close(t.dlogp, 20f64.exp(), "bound");
    }

    #[test]
    fn k3_kl_by_hand() {
        let t = k3_kl_token(-1.0, -1.0);
        assert_eq!((t.value, t.dlogp), (0.0, 0.0));
        // x = log π_ref − log π = 0.5: e^0.5 − 1.5, derivative 1 − e^0.5.
        let t = k3_kl_token(-2.0, -1.5);
        close(t.value, 0.5f64.exp() - 1.5, "x 0.5");
        close(t.dlogp, 1.0 - 0.5f64.exp(), "x 0.5 d");
        close(t.value, 0.148_721_270_700_128_2, "x 0.5 number");
        // x = −0.5: e^−0.5 − 0.5.
        let t = k3_kl_token(-1.0, -1.5);
        close(t.value, 0.106_530_659_712_633_4, "x −0.5");
        close(t.dlogp, 1.0 - (-0.5f64).exp(), "x −0.5 d");
        // x = 25 clamps to 20; no gradient.
        let t = k3_kl_token(-30.0, -5.0);
        close(t.value, 20f64.exp() - 21.0, "x 25");
        assert_eq!(t.dlogp, 0.0);
        // k3 ≥ 0 everywhere.
        for x in [-19.0, -3.0, -0.1, 0.1, 3.0, 19.0] {
            assert!(k3_kl_token(0.0, x).value > 0.0);
        }
    }

    /// Central differences in f64 at random points, away from the branch kinks.
    #[test]
    fn token_derivatives_match_finite_differences() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = |lo: f64, hi: f64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            lo + (hi - lo) * (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let h = 1e-6;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let lp = uniform(-6.0, -0.01);
            let old = lp + uniform(-1.6, 1.6);
            let adv = uniform(-2.0, 2.0);
            let (_, b_lo, _) = policy_loss_token(lp - h, old, adv, &CFG);
            let (t, b, _) = policy_loss_token(lp, old, adv, &CFG);
            let (_, b_hi, _) = policy_loss_token(lp + h, old, adv, &CFG);
            if b_lo != b || b_hi != b {
                continue; // a kink lies within h
            }
            seen.insert(format!("{b:?}"));
            let up = policy_loss_token(lp + h, old, adv, &CFG).0.value;
            let down = policy_loss_token(lp - h, old, adv, &CFG).0.value;
            let numeric = (up - down) / (2.0 * h);
            assert!(
                (numeric - t.dlogp).abs() < 1e-6 * (1.0 + t.dlogp.abs()),
                "lp {lp} old {old} A {adv}: {numeric} vs {}",
                t.dlogp
            );
            let rf = lp + uniform(-3.0, 3.0);
            let k = k3_kl_token(lp, rf);
            let numeric =
                (k3_kl_token(lp + h, rf).value - k3_kl_token(lp - h, rf).value) / (2.0 * h);
            assert!((numeric - k.dlogp).abs() < 1e-5 * (1.0 + k.dlogp.abs()));
        }
        assert_eq!(seen.len(), 4, "every branch visited: {seen:?}");
    }

    /// Two sequences of T = 4: row 0 has 2 response tokens with A = 1, row 1 has 4 with
    /// A = −0.25; on-policy (ρ = 1, ℓ = −A, ∂ℓ/∂log π = −A), β = 0.
    fn two_rows() -> (Vec<f32>, Vec<bool>, Vec<f32>) {
        let logp = vec![-1.0, -2.0, 0.0, 0.0, -0.5, -0.7, -0.9, -1.1];
        let mask = vec![true, true, false, false, true, true, true, true];
        (logp, mask, vec![1.0, -0.25])
    }

    #[test]
    fn aggregation_modes_by_hand() {
        let (logp, mask, adv) = two_rows();
        let x = PolicyTokens {
            b: 2,
            t: 4,
            logp: &logp,
            old_logp: &logp,
            ref_logp: None,
            entropy: None,
            mask: &mask,
            advantages: &adv,
            seq_tokens: None,
        };
        let scale = LossScale {
            global_tokens: 6,
            global_seqs: 2,
        };
        // (mode, loss, g on row 0's tokens, g on row 1's tokens)
        let cases = [
            // (2·(−1) + 4·0.25) / 6
            (
                LossAggregation::TokenMean,
                -1.0 / 6.0,
                -1.0 / 6.0,
                0.25 / 6.0,
            ),
            // ((2·(−1))/2 + (4·0.25)/4) / 2
            (LossAggregation::SeqMeanTokenMean, -0.375, -0.25, 0.03125),
            // ((2·(−1))/8 + (4·0.25)/8) / 2, L_max = 8
            (
                LossAggregation::SeqMeanTokenSumNorm,
                -1.0 / 16.0,
                -1.0 / 16.0,
                0.25 / 16.0,
            ),
        ];
        for (mode, want_loss, g0, g1) in cases {
            let cfg = PolicyLossConfig {
                aggregation: mode,
                ..CFG
            };
            let mut g = vec![f32::NAN; 8];
            let (loss, m) = grpo_loss(&x, &cfg, scale, &mut g).unwrap();
            close(loss, want_loss, &format!("{mode}"));
            let want = [g0, g0, 0.0, 0.0, g1, g1, g1, g1];
            for (j, (&a, &b)) in g.iter().zip(&want).enumerate() {
                assert!((a as f64 - b).abs() < 1e-7, "{mode} g[{j}] {a} vs {b}");
            }
            assert_eq!(m.tokens, 6);
            let s = m.summary();
            assert_eq!((s.ratio_mean, s.ratio_min, s.ratio_max), (1.0, 1.0, 1.0));
            assert_eq!(s.clip_frac_low + s.clip_frac_high + s.dual_clip_frac, 0.0);
            close(s.pg_loss, (-2.0 + 1.0) / 6.0, "pg mean");
            assert_eq!((s.kl, s.entropy), (None, None));
        }
    }

    fn random_problem(b: usize, t: usize, seed: u64) -> [Vec<f32>; 4] {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut uniform = |lo: f32, hi: f32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            lo + (hi - lo) * (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let n = b * t;
        let logp: Vec<f32> = (0..n).map(|_| uniform(-4.0, -0.05)).collect();
        let old: Vec<f32> = logp.iter().map(|&l| l + uniform(-0.5, 0.5)).collect();
        let rf: Vec<f32> = logp.iter().map(|&l| l + uniform(-1.0, 1.0)).collect();
        let adv: Vec<f32> = (0..b).map(|_| uniform(-1.5, 1.5)).collect();
        [logp, old, rf, adv]
    }

    fn mask_of(b: usize, t: usize) -> Vec<bool> {
        (0..b * t).map(|j| j % t >= 2 + j / t % 3).collect()
    }

    /// The whole micro-batch loss: g_t against central differences of L in each log π_t, every
    /// aggregation mode, with KL and dual clip on.
    #[test]
    fn grpo_loss_gradient_matches_finite_differences() {
        let (b, t) = (3, 7);
        let [logp, old, rf, adv] = random_problem(b, t, 5);
        let mask = mask_of(b, t);
        let tokens = mask.iter().filter(|&&m| m).count();
        let scale = LossScale {
            global_tokens: tokens + 5,
            global_seqs: b + 1,
        };
        for mode in [
            LossAggregation::TokenMean,
            LossAggregation::SeqMeanTokenMean,
            LossAggregation::SeqMeanTokenSumNorm,
        ] {
            let cfg = PolicyLossConfig {
                aggregation: mode,
                kl_coef: 0.1,
                clip_low: 0.1,
                clip_high: 0.1,
                dual_clip: Some(1.2),
                ..CFG
            };
            let loss_at = |lp: &[f32]| -> (f64, Vec<f32>) {
                let x = PolicyTokens {
                    b,
                    t,
                    logp: lp,
                    old_logp: &old,
                    ref_logp: Some(&rf),
                    entropy: None,
                    mask: &mask,
                    advantages: &adv,
                    seq_tokens: None,
                };
                let mut g = vec![0.0f32; b * t];
                let (l, _) = grpo_loss(&x, &cfg, scale, &mut g).unwrap();
                (l, g)
            };
            let (_, g) = loss_at(&logp);
            let h = 1e-3f32;
            let mut nonzero = 0;
            for j in 0..b * t {
                let mut p = logp.clone();
                p[j] += h;
                let up = loss_at(&p).0;
                p[j] -= 2.0 * h;
                let down = loss_at(&p).0;
                let numeric = (up - down) / (2.0 * h as f64);
                if !mask[j] {
                    assert_eq!(g[j], 0.0);
                    continue;
                }
                nonzero += (g[j] != 0.0) as usize;
                assert!(
                    (numeric - g[j] as f64).abs() < 2e-4 * (1e-2 + g[j].abs() as f64),
                    "{mode} token {j}: analytic {} vs numeric {numeric}",
                    g[j]
                );
            }
            assert!(nonzero > 3, "{mode}: too few tokens with a gradient");
        }
    }

    /// Splitting a mini-batch into micro-batches (and rows into sequence shards) with global
    /// counts gives the same per-token coefficients, and the losses add up.
    #[test]
    fn micro_batches_and_shards_add_up_to_the_whole() {
        let (b, t) = (4, 6);
        let [logp, old, rf, adv] = random_problem(b, t, 9);
        let mask = mask_of(b, t);
        let ent: Vec<f32> = (0..b * t).map(|j| 0.1 * j as f32).collect();
        let scale = LossScale {
            global_tokens: mask.iter().filter(|&&m| m).count(),
            global_seqs: b,
        };
        let seq_tokens: Vec<usize> = (0..b)
            .map(|i| mask[i * t..(i + 1) * t].iter().filter(|&&m| m).count())
            .collect();
        for mode in [
            LossAggregation::TokenMean,
            LossAggregation::SeqMeanTokenMean,
            LossAggregation::SeqMeanTokenSumNorm,
        ] {
            let cfg = PolicyLossConfig {
                aggregation: mode,
                kl_coef: 0.05,
                ..CFG
            };
            let whole = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
                // Rows `rows`, positions `cols` of each: a micro-batch, or a shard of each row.
                let (rb, ct) = (rows.len(), cols.len());
                let pick = |v: &[f32]| -> Vec<f32> {
                    rows.clone()
                        .flat_map(|i| cols.clone().map(move |c| (i, c)))
                        .map(|(i, c)| v[i * t + c])
                        .collect()
                };
                let m: Vec<bool> = rows
                    .clone()
                    .flat_map(|i| cols.clone().map(move |c| (i, c)))
                    .map(|(i, c)| mask[i * t + c])
                    .collect();
                let (lp, o, r, e) = (pick(&logp), pick(&old), pick(&rf), pick(&ent));
                let x = PolicyTokens {
                    b: rb,
                    t: ct,
                    logp: &lp,
                    old_logp: &o,
                    ref_logp: Some(&r),
                    entropy: Some(&e),
                    mask: &m,
                    advantages: &adv[rows.clone()],
                    seq_tokens: Some(&seq_tokens[rows.clone()]),
                };
                let mut g = vec![0.0f32; rb * ct];
                let (l, met) = grpo_loss(&x, &cfg, scale, &mut g).unwrap();
                (l, g, met)
            };
            let (l_all, g_all, m_all) = whole(0..b, 0..t);
            let (l0, g0, m0) = whole(0..1, 0..t);
            let (l1, g1, m1) = whole(1..b, 0..t);
            assert!((l0 + l1 - l_all).abs() < 1e-7, "{mode}: micro-batch losses");
            let joined: Vec<f32> = g0.into_iter().chain(g1).collect();
            assert_eq!(joined, g_all, "{mode}: micro-batch coefficients");
            let mut merged = m0;
            merged.merge(&m1);
            assert_eq!(merged.tokens, m_all.tokens);
            assert!((merged.kl_sum - m_all.kl_sum).abs() < 1e-9);
            // Sequence shards: first and second half of every row (as SP ranks hold them).
            let (la, ga, _) = whole(0..b, 0..t / 2);
            let (lb, gb, _) = whole(0..b, t / 2..t);
            assert!((la + lb - l_all).abs() < 1e-7, "{mode}: shard losses");
            for i in 0..b {
                for c in 0..t {
                    let g = if c < t / 2 {
                        ga[i * (t / 2) + c]
                    } else {
                        gb[i * (t - t / 2) + c - t / 2]
                    };
                    assert_eq!(g, g_all[i * t + c], "{mode}: shard coefficient ({i}, {c})");
                }
            }
            let s = m_all.summary();
            assert!(s.kl.unwrap() > 0.0 && s.entropy.unwrap() > 0.0);
            assert!(s.ratio_min < 1.0 && s.ratio_max > 1.0);
        }
    }

    #[test]
    fn clip_fractions_count_branches() {
        // Four tokens: unclipped, high (A > 0, ρ 1.5), low (A < 0, ρ 0.5), dual (A < 0, ρ 4).
        let old = [-1.0f32; 4];
        let logp: Vec<f32> = [1.0f32, 1.5, 0.5, 4.0]
            .iter()
            .map(|r| -1.0 + r.ln())
            .collect();
        let mask = [true; 4];
        let x = PolicyTokens {
            b: 4,
            t: 1,
            logp: &logp,
            old_logp: &old,
            ref_logp: None,
            entropy: None,
            mask: &mask,
            advantages: &[1.0, 1.0, -1.0, -1.0],
            seq_tokens: None,
        };
        let mut g = [0.0f32; 4];
        let scale = LossScale {
            global_tokens: 4,
            global_seqs: 4,
        };
        let (_, m) = grpo_loss(&x, &CFG, scale, &mut g).unwrap();
        assert_eq!((m.clipped_low, m.clipped_high, m.dual_clipped), (1, 1, 1));
        let s = m.summary();
        assert_eq!(
            (s.clip_frac_low, s.clip_frac_high, s.dual_clip_frac),
            (0.25, 0.25, 0.25)
        );
        assert!((s.ratio_max - 4.0).abs() < 1e-5 && (s.ratio_min - 0.5).abs() < 1e-6);
        assert_eq!(g[1..], [0.0, 0.0, 0.0]);
        assert!((g[0] + 0.25).abs() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_refused_with_names() {
        let (logp, mask, adv) = two_rows();
        let x = PolicyTokens {
            b: 2,
            t: 4,
            logp: &logp,
            old_logp: &logp,
            ref_logp: None,
            entropy: None,
            mask: &mask,
            advantages: &adv,
            seq_tokens: None,
        };
        let scale = LossScale {
            global_tokens: 6,
            global_seqs: 2,
        };
        let mut g = vec![0.0f32; 8];
        let with_kl = PolicyLossConfig {
            kl_coef: 0.01,
            ..CFG
        };
        let e = grpo_loss(&x, &with_kl, scale, &mut g).unwrap_err();
        assert!(e.to_string().contains("no reference"), "{e}");
        let short = LossScale {
            global_tokens: 5,
            ..scale
        };
        let e = grpo_loss(&x, &CFG, short, &mut g).unwrap_err();
        assert!(e.to_string().contains("global token count 5"), "{e}");
        let e = grpo_loss(&x, &CFG, scale, &mut g[..7]).unwrap_err();
        assert!(e.to_string().contains("dlogp has 7"), "{e}");
        let mut bad = logp.clone();
        bad[5] = f32::NAN;
        let y = PolicyTokens { logp: &bad, ..x };
        let e = grpo_loss(&y, &CFG, scale, &mut g).unwrap_err();
        assert!(
            e.to_string().contains("logp[5] (sequence 1, position 1)"),
            "{e}"
        );
        // NaN off the mask is ignored.
        bad[5] = -1.0;
        bad[2] = f32::NAN;
        let y = PolicyTokens { logp: &bad, ..x };
        grpo_loss(&y, &CFG, scale, &mut g).unwrap();
    }
}
