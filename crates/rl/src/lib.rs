//! reel-rl: the math of GRPO (group relative policy optimisation) and its rewards.
//!
//! - [`reward`]: the [`Reward`] trait; format, accuracy, weighted-sum and external-command
//!   rewards; the reward placed on the last response token.
//! - [`advantage`]: group-normalised advantages (and Dr.GRPO's no-std option); DAPO dynamic
//!   sampling with top-up.
//! - [`loss`]: the per-token clipped policy loss (separate low/high clip, dual clip) and k3 KL,
//!   each with its exact derivative with respect to log π; aggregation modes; [`grpo_loss`] over a
//!   micro-batch, which returns the loss, the per-token coefficients `g_t = ∂L/∂log π_t` that
//!   `reel_model::Qwen2::backward_logprobs` consumes, and metrics.
//! - [`config`]: [`GrpoConfig`], the `[grpo]` TOML section.
//!
//! Tensors here are flat per-token slices in the model's [B, T] row-major layout; advantages and
//! rewards are per sequence [B]. Formulas and defaults follow DeepSeekMath's GRPO as TRL and verl
//! implement it, with DAPO's decoupled clip and dynamic sampling, Dr.GRPO's unscaled advantages and
//! constant length normaliser, and dual clip (Ye et al., 2020).

pub mod advantage;
pub mod config;
pub mod loss;
pub mod reward;

pub use advantage::{group_advantages, group_is_informative, DynamicBatch, DynamicSampler};
pub use config::{AdvantageScaling, GrpoConfig, LossAggregation, RewardConfig};
pub use loss::{
    grpo_loss, k3_kl_token, policy_loss_token, u64_words, words_u64, ClipBranch, GrpoMetrics,
    LossScale, MetricsSummary, PolicyLossConfig, PolicyTokens, TokenTerm,
};
pub use reward::{
    place_on_last_token, AccuracyReward, CommandReward, FormatReward, Reward, RewardInput,
    RewardOutput, WeightedReward,
};

/// Errors from GRPO code; messages name the config key, tensor or sequence.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// The config TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A config value is out of range or inconsistent with another.
    #[error("config key `{key}`: {message}")]
    Config { key: &'static str, message: String },
    /// Inputs of a GRPO function disagree in shape or hold invalid values.
    #[error("{0}")]
    Invalid(String),
}
