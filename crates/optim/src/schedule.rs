//! Learning-rate schedules, Hugging Face convention (`get_cosine_with_min_lr_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` with a floor).
//!
//! `step` counts optimizer steps from 0: the first update uses `lr_at(base, 0)`. With `W` warmup
//! steps, `T` total steps and floor ratio `r`:
//!
//! ```text
//! step < W:  lr = base · step / W                         (0 at step 0, like HF)
//! else:      progress = clamp((step - W) / max(1, T - W), 0, 1)
//!            cosine:  lr = base · (r + (1 - r) · ½(1 + cos(π · progress)))
//!            linear:  lr = base · (r + (1 - r) · (1 - progress))
//! ```
//!
//! Unlike HF the progress is clamped, so steps past `T` stay at `base · r` instead of the cosine
//! rising again.

use serde::{Deserialize, Serialize};

/// How the learning rate moves over training; serialised with a `kind` tag
/// (`kind = "warmup_cosine"`, `warmup_steps = 10`, …).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate at every step.
    Constant,
    /// Linear warmup from 0, then a half cosine from the base rate down to `base · min_lr_ratio`
    /// at `total_steps`.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f32,
    },
    /// Linear warmup from 0, then a straight line from the base rate down to
    /// `base · min_lr_ratio` at `total_steps`.
    WarmupLinear {
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f32,
    },
}

impl LrSchedule {
    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, base_lr: f32, step: u64) -> f32 {
        let (warmup, total, min_ratio, cosine) = match *self {
            LrSchedule::Constant => return base_lr,
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => (warmup_steps, total_steps, min_lr_ratio as f64, true),
            LrSchedule::WarmupLinear {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => (warmup_steps, total_steps, min_lr_ratio as f64, false),
        };
        let base = base_lr as f64;
        if step < warmup {
            return (base * step as f64 / warmup as f64) as f32;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
        let shape = if cosine {
            0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        } else {
            1.0 - progress
        };
        (base * (min_ratio + (1.0 - min_ratio) * shape)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-7 + 1e-6 * b.abs()
    }

    #[test]
    fn constant_is_constant() {
        for step in [0, 1, 1000] {
            assert_eq!(LrSchedule::Constant.lr_at(3e-4, step), 3e-4);
        }
    }

    #[test]
    fn warmup_cosine_boundaries() {
        let s = LrSchedule::WarmupCosine {
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.1,
        };
        let base = 1e-3;
        assert_eq!(s.lr_at(base, 0), 0.0);
        assert!(close(s.lr_at(base, 1), 1e-4));
        assert!(close(s.lr_at(base, 5), 5e-4));
        assert!(close(s.lr_at(base, 9), 9e-4));
        assert!(
            close(s.lr_at(base, 10), 1e-3),
            "warmup ends at the base rate"
        );
        // Halfway through the decay: the mean of base and floor.
        assert!(close(s.lr_at(base, 60), 0.55e-3), "{}", s.lr_at(base, 60));
        assert!(close(s.lr_at(base, 110), 1e-4), "ends at the floor");
        assert!(
            close(s.lr_at(base, 500), 1e-4),
            "stays at the floor past the end"
        );
        // Monotone decay after warmup.
        let lrs: Vec<f32> = (10..=110).map(|t| s.lr_at(base, t)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn warmup_linear_boundaries() {
        let s = LrSchedule::WarmupLinear {
            warmup_steps: 4,
            total_steps: 14,
            min_lr_ratio: 0.0,
        };
        let base = 2.0;
        assert_eq!(s.lr_at(base, 0), 0.0);
        assert!(close(s.lr_at(base, 2), 1.0));
        assert!(close(s.lr_at(base, 4), 2.0));
        assert!(close(s.lr_at(base, 9), 1.0));
        assert_eq!(s.lr_at(base, 14), 0.0);
        assert_eq!(s.lr_at(base, 20), 0.0);
    }

    #[test]
    fn no_warmup_starts_at_base_and_degenerate_totals_do_not_divide_by_zero() {
        let s = LrSchedule::WarmupCosine {
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.5,
        };
        assert!(close(s.lr_at(1.0, 0), 1.0));
        assert!(close(s.lr_at(1.0, 1), 0.5));
        let s = LrSchedule::WarmupLinear {
            warmup_steps: 0,
            total_steps: 10,
            min_lr_ratio: 0.0,
        };
        assert_eq!(s.lr_at(1.0, 0), 1.0);
    }

    #[test]
    fn serde_is_tagged() {
        let s: LrSchedule = toml::from_str(
            "kind = \"warmup_cosine\"\nwarmup_steps = 10\ntotal_steps = 100\nmin_lr_ratio = 0.1",
        )
        .unwrap();
        assert_eq!(
            s,
            LrSchedule::WarmupCosine {
                warmup_steps: 10,
                total_steps: 100,
                min_lr_ratio: 0.1
            }
        );
        let c: LrSchedule = toml::from_str("kind = \"constant\"").unwrap();
        assert_eq!(c, LrSchedule::Constant);
    }
}
