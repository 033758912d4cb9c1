//! [`GrpoConfig`]: the `[grpo]` section of an RL run's TOML (with `[grpo.reward]` inside), every
//! field optional with the default stated on it, unknown keys refused, values checked by
//! [`GrpoConfig::validate`] with the offending key named (`grpo.clip_low`, `grpo.reward.…`).
//!
//! Defaults are LongVILA-R1's release (DESIGN.md, "MR-SP and the RL step"): group size 5,
//! ε_lo 0.2, ε_hi 0.28, dual clip 3, β 1e-2, lr 1e-6, weight decay 1e-2, grad clip 1.0,
//! temperature 1.0, top-p 0.99, token-mean aggregation, reward 0.9·accuracy + 0.1·format.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::loss::PolicyLossConfig;
use crate::reward::{AccuracyReward, CommandReward, FormatReward, Reward, WeightedReward};
use crate::RlError;

/// How rewards become advantages within a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageScaling {
    /// `(r − mean_g)/(std_g + 1e-6)`, std unbiased (n − 1), as TRL and verl compute it.
    #[default]
    GroupStd,
    /// `r − mean_g` (Dr.GRPO: no division by the group's std).
    None,
}

/// How per-token losses of a mini-batch become one scalar (verl's `loss_agg_mode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LossAggregation {
    /// Σ over every response token of the mini-batch / their global count (DAPO).
    #[default]
    #[serde(rename = "token-mean")]
    TokenMean,
    /// Mean over sequences of each sequence's token mean (the original GRPO).
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    /// Mean over sequences of each sequence's token sum / `max_response_tokens`, a constant
    /// (Dr.GRPO's formula: no length bias). verl's mode of this name divides the sum over
    /// sequences by the padded length only, without the 1/N_seqs: a constant factor apart.
    #[serde(rename = "seq-mean-token-sum-norm")]
    SeqMeanTokenSumNorm,
}

impl std::fmt::Display for LossAggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossAggregation::TokenMean => "token-mean",
            LossAggregation::SeqMeanTokenMean => "seq-mean-token-mean",
            LossAggregation::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        })
    }
}

/// `[grpo]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Samples rolled out per prompt (G); advantages are normalised within each group.
    /// At least 2. Default 5 (LongVILA-R1; TRL uses 8).
    pub group_size: usize,
    /// ε_lo: the ratio is clipped below at 1 − clip_low. In (0, 1). Default 0.2.
    pub clip_low: f32,
    /// ε_hi: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher). > 0. Default 0.28.
    pub clip_high: f32,
    /// Dual clip c: for A < 0 the token loss is at most −c·A. > 1, or 0 to turn it off.
    /// Default 3.
    pub dual_clip: f32,
    /// β, weight of the k3 KL to the frozen reference as a loss term. ≥ 0; 0 means no reference
    /// model and no reference pass. Default 1e-2.
    pub kl_coef: f32,
    /// "group_std" (`(r − mean)/(std + 1e-6)`) or "none" (`r − mean`, Dr.GRPO).
    /// Default "group_std".
    pub advantage_scaling: AdvantageScaling,
    /// "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm". Default "token-mean".
    pub loss_aggregation: LossAggregation,
    /// Most tokens a response may have (the rollout's limit), and the constant normaliser of
    /// "seq-mean-token-sum-norm". ≥ 1. Default 1024.
    pub max_response_tokens: usize,
    /// AdamW learning rate (constant). > 0. Default 1e-6.
    pub lr: f32,
    /// AdamW decoupled weight decay (2-D weights only). ≥ 0. Default 1e-2.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this; 0 = no clipping. Default 1.0.
    pub grad_clip: f32,
    /// Sampling temperature of the rollouts (and of the log-probabilities scored for them). > 0.
    /// Default 1.0.
    pub temperature: f32,
    /// Nucleus sampling of the rollouts: keep the smallest set of tokens whose probability
    /// reaches top_p. In (0, 1]. Default 0.99.
    pub top_p: f32,
    /// Top-k sampling of the rollouts: keep the k most likely tokens; 0 = off. Default 0.
    pub top_k: usize,
    /// DAPO dynamic sampling: drop groups whose rewards are all equal (they have zero advantage
    /// and give no gradient) and roll out more prompts until the batch is full. Default false.
    pub dynamic_sampling: bool,
    /// With dynamic sampling, the most rollout rounds per step; after that the step trains on
    /// the groups it kept. ≥ 1. Default 3.
    pub dynamic_sampling_max_rounds: usize,
    /// `[grpo.reward]`: how a response is scored.
    pub reward: RewardConfig,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            group_size: 5,
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: 3.0,
            kl_coef: 1e-2,
            advantage_scaling: AdvantageScaling::GroupStd,
            loss_aggregation: LossAggregation::TokenMean,
            max_response_tokens: 1024,
            lr: 1e-6,
            weight_decay: 1e-2,
            grad_clip: 1.0,
            temperature: 1.0,
            top_p: 0.99,
            top_k: 0,
            dynamic_sampling: false,
            dynamic_sampling_max_rounds: 3,
            reward: RewardConfig::default(),
        }
    }
}

/// `[grpo.reward]`: reward = accuracy_weight·accuracy + format_weight·format
/// (+ command_weight·command when `command` is set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Weight of the accuracy reward (1 when the answer matches, else 0). ≥ 0. Default 0.9.
    pub accuracy_weight: f32,
    /// Weight of the format reward (1 when the response is `<think>…</think>\s*<answer>…</answer>`,
    /// else 0). ≥ 0. Default 0.1.
    pub format_weight: f32,
    /// Numeric answers match when |pred − answer| ≤ number_abs_tol + number_rel_tol·|answer|.
    /// ≥ 0. Default 1e-2.
    pub number_rel_tol: f64,
    /// See `number_rel_tol`. ≥ 0. Default 1e-6.
    pub number_abs_tol: f64,
    /// An external reward program and its arguments, e.g. ["python3", "my_reward.py"]: it gets
    /// `{"prompt", "response", "answer", "problem_id"}` as JSON on stdin and prints one number.
    /// Empty = none. Default [].
    pub command: Vec<String>,
    /// Weight of the command's reward; must be > 0 when `command` is set. Default 1.0.
    pub command_weight: f32,
    /// Seconds the command may run per sample before it is killed (reward 0, a warning). > 0.
    /// Default 10.
    pub command_timeout_s: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            accuracy_weight: 0.9,
            format_weight: 0.1,
            number_rel_tol: 1e-2,
            number_abs_tol: 1e-6,
            command: Vec::new(),
            command_weight: 1.0,
            command_timeout_s: 10.0,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> RlError {
    RlError::Config {
        key,
        message: message.into(),
    }
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A TOML document whose `[grpo]` section (optional: defaults) is read; other sections are
/// left to their owners.
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    grpo: GrpoConfig,
}

impl GrpoConfig {
    /// The `[grpo]` section of TOML text (defaults when absent), validated; `origin` names the
    /// text in errors (with line and column for parse errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, RlError> {
        let doc: Document = toml::from_str(text).map_err(|e| parse_error(text, origin, e))?;
        doc.grpo.validate()?;
        Ok(doc.grpo)
    }

    /// Reads a TOML file and returns its validated `[grpo]` section.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, RlError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| RlError::Parse {
            origin: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Checks every value's range and their consistency; the error names the key.
    pub fn validate(&self) -> Result<(), RlError> {
        let finite = |key: &'static str, x: f64| -> Result<(), RlError> {
            if x.is_finite() {
                Ok(())
            } else {
                Err(invalid(key, format!("{x} is not a finite number")))
            }
        };
        if self.group_size < 2 {
            return Err(invalid(
                "grpo.group_size",
                format!(
                    "{} samples per prompt: group advantages need at least 2",
                    self.group_size
                ),
            ));
        }
        finite("grpo.clip_low", self.clip_low as f64)?;
        if !(self.clip_low > 0.0 && self.clip_low < 1.0) {
            return Err(invalid(
                "grpo.clip_low",
                format!("{} must be in (0, 1)", self.clip_low),
            ));
        }
        finite("grpo.clip_high", self.clip_high as f64)?;
        if self.clip_high <= 0.0 {
            return Err(invalid(
                "grpo.clip_high",
                format!("{} must be > 0", self.clip_high),
            ));
        }
        finite("grpo.dual_clip", self.dual_clip as f64)?;
        if self.dual_clip != 0.0 && self.dual_clip <= 1.0 {
            return Err(invalid(
                "grpo.dual_clip",
                format!("{} must be > 1, or 0 to turn dual clip off", self.dual_clip),
            ));
        }
        finite("grpo.kl_coef", self.kl_coef as f64)?;
        if self.kl_coef < 0.0 {
            return Err(invalid(
                "grpo.kl_coef",
                format!("{} must be ≥ 0", self.kl_coef),
            ));
        }
        if self.max_response_tokens == 0 {
            return Err(invalid("grpo.max_response_tokens", "must be ≥ 1"));
        }
        finite("grpo.lr", self.lr as f64)?;
        if self.lr <= 0.0 {
            return Err(invalid("grpo.lr", format!("{} must be > 0", self.lr)));
        }
        finite("grpo.weight_decay", self.weight_decay as f64)?;
        if self.weight_decay < 0.0 {
            return Err(invalid(
                "grpo.weight_decay",
                format!("{} must be ≥ 0", self.weight_decay),
            ));
        }
        finite("grpo.grad_clip", self.grad_clip as f64)?;
        if self.grad_clip < 0.0 {
            return Err(invalid(
                "grpo.grad_clip",
                format!("{} must be ≥ 0 (0 = no clipping)", self.grad_clip),
            ));
        }
        finite("grpo.temperature", self.temperature as f64)?;
        if self.temperature <= 0.0 {
            return Err(invalid(
                "grpo.temperature",
                format!("{} must be > 0", self.temperature),
            ));
        }
        finite("grpo.top_p", self.top_p as f64)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(
                "grpo.top_p",
                format!("{} must be in (0, 1]", self.top_p),
            ));
        }
        if self.dynamic_sampling_max_rounds == 0 {
            return Err(invalid("grpo.dynamic_sampling_max_rounds", "must be ≥ 1"));
        }
        self.reward.validate()
    }

    /// The per-token loss settings of [`crate::grpo_loss`].
    pub fn policy_loss(&self) -> PolicyLossConfig {
        PolicyLossConfig {
            clip_low: self.clip_low,
            clip_high: self.clip_high,
            dual_clip: (self.dual_clip != 0.0).then_some(self.dual_clip),
            kl_coef: self.kl_coef,
            aggregation: self.loss_aggregation,
            max_response_tokens: self.max_response_tokens,
        }
    }

    /// Whether a frozen reference model must be kept and scored (β > 0).
    pub fn needs_reference(&self) -> bool {
        self.kl_coef > 0.0
    }
}

impl RewardConfig {
    /// Checks weights, tolerances and the command; the error names the key.
    pub fn validate(&self) -> Result<(), RlError> {
        for (key, w) in [
            ("grpo.reward.accuracy_weight", self.accuracy_weight),
            ("grpo.reward.format_weight", self.format_weight),
            ("grpo.reward.command_weight", self.command_weight),
        ] {
            if !w.is_finite() || w < 0.0 {
                return Err(invalid(key, format!("{w} must be a finite number ≥ 0")));
            }
        }
        for (key, t) in [
            ("grpo.reward.number_rel_tol", self.number_rel_tol),
            ("grpo.reward.number_abs_tol", self.number_abs_tol),
        ] {
            if !t.is_finite() || t < 0.0 {
                return Err(invalid(key, format!("{t} must be a finite number ≥ 0")));
            }
        }
        if !self.command.is_empty() {
            if self.command[0].trim().is_empty() {
                return Err(invalid(
                    "grpo.reward.command",
                    "the program name (first element) is empty",
                ));
            }
            if self.command_weight == 0.0 {
                return Err(invalid(
                    "grpo.reward.command_weight",
                    "must be > 0 when grpo.reward.command is set",
                ));
            }
            if !(self.command_timeout_s.is_finite() && self.command_timeout_s > 0.0) {
                return Err(invalid(
                    "grpo.reward.command_timeout_s",
                    format!("{} must be > 0 seconds", self.command_timeout_s),
                ));
            }
        }
        let total = self.accuracy_weight
            + self.format_weight
            + if self.command.is_empty() {
                0.0
            } else {
                self.command_weight
            };
        if total <= 0.0 {
            return Err(invalid(
                "grpo.reward.accuracy_weight",
                "every reward weight is 0: the reward would be constant",
            ));
        }
        Ok(())
    }

    /// The weighted reward this config describes (components of weight 0 left out).
    pub fn build(&self) -> WeightedReward {
        let mut parts: Vec<(f32, Box<dyn Reward>)> = Vec::new();
        if self.accuracy_weight > 0.0 {
            parts.push((
                self.accuracy_weight,
                Box::new(AccuracyReward {
                    rel_tol: self.number_rel_tol,
                    abs_tol: self.number_abs_tol,
                }),
            ));
        }
        if self.format_weight > 0.0 {
            parts.push((self.format_weight, Box::new(FormatReward)));
        }
        if !self.command.is_empty() {
            parts.push((
                self.command_weight,
                Box::new(CommandReward {
                    program: PathBuf::from(&self.command[0]),
                    args: self.command[1..].to_vec(),
                    timeout: Duration::from_secs_f64(self.command_timeout_s),
                }),
            ));
        }
        WeightedReward::new(parts)
    }
}

fn parse_error(text: &str, origin: &Path, e: toml::de::Error) -> RlError {
    let (line, column) = e.span().map_or((0, 0), |s| line_column(text, s.start));
    RlError::Parse {
        origin: origin.display().to_string(),
        line,
        column,
        message: e.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GrpoConfig, RlError> {
        GrpoConfig::parse(text, Path::new("run.toml"))
    }

    #[test]
    fn defaults_are_the_published_ones() {
        let c = GrpoConfig::default();
        assert_eq!(c.group_size, 5);
        assert_eq!((c.clip_low, c.clip_high, c.dual_clip), (0.2, 0.28, 3.0));
        assert_eq!(
            (c.kl_coef, c.lr, c.weight_decay, c.grad_clip),
            (1e-2, 1e-6, 1e-2, 1.0)
        );
        assert_eq!((c.temperature, c.top_p), (1.0, 0.99));
        assert_eq!(c.loss_aggregation, LossAggregation::TokenMean);
        assert!(!c.dynamic_sampling);
        assert_eq!(
            (c.reward.accuracy_weight, c.reward.format_weight),
            (0.9, 0.1)
        );
        c.validate().unwrap();
        // An absent section, and an empty one, are the defaults.
        assert_eq!(parse("[other]\nx = 1\n").unwrap(), c);
        assert_eq!(parse("[grpo]\n").unwrap(), c);
        assert!(c.needs_reference());
        assert_eq!(c.policy_loss().dual_clip, Some(3.0));
    }

    #[test]
    fn section_values_are_read() {
        let c = parse(
            "[grpo]\ngroup_size = 8\nclip_high = 0.3\ndual_clip = 0\nkl_coef = 0\n\
             loss_aggregation = \"seq-mean-token-sum-norm\"\nadvantage_scaling = \"none\"\n\
             dynamic_sampling = true\n[grpo.reward]\naccuracy_weight = 1.0\nformat_weight = 0\n\
             command = [\"python3\", \"r.py\"]\ncommand_weight = 0.5\n",
        )
        .unwrap();
        assert_eq!(c.group_size, 8);
        assert_eq!(c.clip_high, 0.3);
        assert_eq!(c.policy_loss().dual_clip, None);
        assert!(!c.needs_reference());
        assert_eq!(c.loss_aggregation, LossAggregation::SeqMeanTokenSumNorm);
        assert_eq!(c.advantage_scaling, AdvantageScaling::None);
        assert!(c.dynamic_sampling);
        assert_eq!(c.reward.command, ["python3", "r.py"]);
        let names: Vec<String> = c.reward.build().names();
        assert_eq!(names, ["accuracy", "command"]);
    }

    #[test]
    fn errors_name_the_key_or_the_line() {
        let cases = [
            ("[grpo]\ngroup_size = 1\n", "grpo.group_size"),
            ("[grpo]\nclip_low = 1.5\n", "grpo.clip_low"),
            ("[grpo]\nclip_high = -0.1\n", "grpo.clip_high"),
            ("[grpo]\ndual_clip = 0.5\n", "grpo.dual_clip"),
            ("[grpo]\nkl_coef = -1e-3\n", "grpo.kl_coef"),
            ("[grpo]\nlr = 0\n", "grpo.lr"),
            ("[grpo]\ntop_p = 0\n", "grpo.top_p"),
            ("[grpo]\ntemperature = nan\n", "grpo.temperature"),
            (
                "[grpo]\nmax_response_tokens = 0\n",
                "grpo.max_response_tokens",
            ),
            (
                "[grpo]\ndynamic_sampling_max_rounds = 0\n",
                "grpo.dynamic_sampling_max_rounds",
            ),
            (
                "[grpo.reward]\nformat_weight = -1\n",
                "grpo.reward.format_weight",
            ),
            (
                "[grpo.reward]\naccuracy_weight = 0\nformat_weight = 0\n",
                "grpo.reward.accuracy_weight",
            ),
            (
                "[grpo.reward]\ncommand = [\"x\"]\ncommand_timeout_s = 0\n",
                "grpo.reward.command_timeout_s",
            ),
            (
                "[grpo.reward]\ncommand = [\"x\"]\ncommand_weight = 0\n",
                "grpo.reward.command_weight",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text:?}: {e}");
        }
        let e = parse("[grpo]\n\ngroup_sise = 4\n").unwrap_err().to_string();
        assert!(
            e.starts_with("run.toml:3:1:") && e.contains("group_sise"),
            "{e}"
        );
        let e = parse("[grpo]\nloss_aggregation = \"mean\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("run.toml:2:") && e.contains("token-mean"),
            "{e}"
        );
    }
}
