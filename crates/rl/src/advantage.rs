//! Group-relative advantages and DAPO dynamic sampling.
//!
//! Rewards are [B] with B = groups × G, each group's G samples contiguous (one prompt each).
//! GRPO's outcome advantage of sample i in group g (DeepSeekMath eq. for outcome supervision):
//!   `A_i = (r_i − mean_g) / (std_g + 1e-6)`, std_g the unbiased (n − 1) standard deviation —
//!   `torch.std`'s default, which TRL (`rewards.view(-1, G).std(dim=1)`) and verl
//!   (`compute_grpo_outcome_advantage`, `torch.std`) both use;
//!   or `A_i = r_i − mean_g` with [`AdvantageScaling::None`] (Dr.GRPO).
//! Every token of a response gets its sequence's advantage.
//!
//! Dynamic sampling (DAPO §3.2): a group whose rewards are all equal has zero advantage
//! everywhere and gives no gradient; it is dropped and more prompts are rolled out until the batch
//! holds the wanted number of groups. "All equal" is the criterion (verl's DAPO recipe keeps
//! groups whose metric std > 0), not "mean strictly between 0 and 1": with a weighted reward
//! (0.9·accuracy + 0.1·format) the two differ, and only "not all equal" guarantees a non-zero
//! advantage; for 0/1 rewards they coincide.

use crate::config::AdvantageScaling;
use crate::RlError;

/// Added to the group's std before dividing (TRL and verl use 1e-6 as well).
pub const ADVANTAGE_EPS: f32 = 1e-6;

/// Advantages [B] of rewards [B] in groups of `group_size` contiguous samples.
pub fn group_advantages(
    rewards: &[f32],
    group_size: usize,
    scaling: AdvantageScaling,
) -> Result<Vec<f32>, RlError> {
    if group_size < 2 {
        return Err(RlError::Invalid(format!(
            "group size {group_size}: group advantages need at least 2 samples per group"
        )));
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(RlError::Invalid(format!(
            "{} rewards do not split into groups of {group_size}",
            rewards.len()
        )));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(RlError::Invalid(format!(
            "reward of sample {i} is {}",
            rewards[i]
        )));
    }
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks_exact(group_size) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        let var = g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let denom = match scaling {
            AdvantageScaling::GroupStd => var.sqrt() + ADVANTAGE_EPS as f64,
            AdvantageScaling::None => 1.0,
        };
        out.extend(g.iter().map(|&r| ((r as f64 - mean) / denom) as f32));
    }
    Ok(out)
}

/// Whether a group's rewards differ (it has a non-zero advantage somewhere): DAPO's filter.
pub fn group_is_informative(rewards: &[f32]) -> bool {
    rewards.windows(2).any(|w| w[0] != w[1])
}

/// Collects informative groups over rollout rounds until `target_groups` are kept or
/// `max_rounds` rounds have run (DAPO's dynamic sampling with top-up).
///
/// ```text
/// let mut s = DynamicSampler::new(target, max_rounds);
/// while s.needs_more() { s.add_round(roll_out_more_prompts()); }
/// let batch = s.finish();
/// ```
#[derive(Debug, Clone)]
pub struct DynamicSampler<G> {
    target_groups: usize,
    max_rounds: usize,
    kept: Vec<(G, Vec<f32>)>,
    rounds: usize,
    dropped: usize,
}

/// What dynamic sampling produced for one step.
#[derive(Debug, Clone)]
pub struct DynamicBatch<G> {
    /// At most `target_groups` groups with their rewards, in the order they were kept.
    pub groups: Vec<(G, Vec<f32>)>,
    /// Rollout rounds used.
    pub rounds: usize,
    /// Groups dropped because their rewards were all equal.
    pub dropped: usize,
    /// Informative groups beyond the target, left out of this step.
    pub surplus: usize,
}

impl<G> DynamicSampler<G> {
    /// A sampler that wants `target_groups` groups and allows `max_rounds` rounds (both ≥ 1).
    pub fn new(target_groups: usize, max_rounds: usize) -> Self {
        DynamicSampler {
            target_groups: target_groups.max(1),
            max_rounds: max_rounds.max(1),
            kept: Vec::new(),
            rounds: 0,
            dropped: 0,
        }
    }

    /// Offers one round of rolled-out groups (payload, rewards); keeps the informative ones.
    pub fn add_round(&mut self, groups: impl IntoIterator<Item = (G, Vec<f32>)>) {
        self.rounds += 1;
        for (g, r) in groups {
            if group_is_informative(&r) {
                self.kept.push((g, r));
            } else {
                self.dropped += 1;
            }
        }
    }

    /// Whether another round should run: too few groups kept and rounds left.
    pub fn needs_more(&self) -> bool {
        self.kept.len() < self.target_groups && self.rounds < self.max_rounds
    }

    /// Groups kept so far.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// The step's groups: the first `target_groups` kept (fewer when the rounds ran out).
    pub fn finish(mut self) -> DynamicBatch<G> {
        let surplus = self.kept.len().saturating_sub(self.target_groups);
        self.kept.truncate(self.target_groups);
        DynamicBatch {
            groups: self.kept,
            rounds: self.rounds,
            dropped: self.dropped,
            surplus,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "[{i}] {x} vs {y}");
        }
    }

    #[test]
    fn advantages_by_hand() {
        // Group 1: [1, 0, 0, 1]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std 0.57735.
        // Group 2: [0.9, 0.1, 0.1, 0.1]: mean 0.3, var = (0.36 + 3·0.04)/3 = 0.16, std 0.4.
        let r = [1.0, 0.0, 0.0, 1.0, 0.9, 0.1, 0.1, 0.1];
        let a = group_advantages(&r, 4, AdvantageScaling::GroupStd).unwrap();
        let s1 = (1.0f32 / 3.0).sqrt() + 1e-6;
        let s2 = 0.4 + 1e-6;
        close(
            &a,
            &[
                0.5 / s1,
                -0.5 / s1,
                -0.5 / s1,
                0.5 / s1,
                0.6 / s2,
                -0.2 / s2,
                -0.2 / s2,
                -0.2 / s2,
            ],
        );
        // Dr.GRPO: centred only.
        let a = group_advantages(&r, 4, AdvantageScaling::None).unwrap();
        close(&a, &[0.5, -0.5, -0.5, 0.5, 0.6, -0.2, -0.2, -0.2]);
        // Two samples: std of [3, 1] is √2 (unbiased), so A = ±1/√2.
        let a = group_advantages(&[3.0, 1.0], 2, AdvantageScaling::GroupStd).unwrap();
        close(&a, &[1.0 / 2f32.sqrt(), -1.0 / 2f32.sqrt()]);
    }

    #[test]
    fn equal_rewards_give_zero_advantage() {
        let a = group_advantages(&[0.7; 5], 5, AdvantageScaling::GroupStd).unwrap();
        assert!(a.iter().all(|&x| x == 0.0), "{a:?}");
    }

    #[test]
    fn bad_groups_are_refused() {
        let e = group_advantages(&[1.0; 5], 2, AdvantageScaling::GroupStd).unwrap_err();
        assert!(e.to_string().contains("groups of 2"), "{e}");
        assert!(group_advantages(&[1.0; 4], 1, AdvantageScaling::None).is_err());
        let e = group_advantages(&[1.0, f32::NAN], 2, AdvantageScaling::None).unwrap_err();
        assert!(e.to_string().contains("sample 1"), "{e}");
    }

    #[test]
    fn dynamic_sampling_keeps_informative_groups_and_tops_up() {
        assert!(!group_is_informative(&[1.0, 1.0, 1.0]));
        assert!(!group_is_informative(&[0.1; 4]));
        assert!(group_is_informative(&[0.1, 0.1, 1.0]));
        // Mean strictly inside (0, 1) is not the criterion: these are all equal, dropped.
        assert!(!group_is_informative(&[0.5, 0.5]));

        let mut s = DynamicSampler::new(3, 4);
        assert!(s.needs_more());
        s.add_round([
            ("a", vec![1.0, 1.0]),
            ("b", vec![0.0, 1.0]),
            ("c", vec![0.0, 0.0]),
        ]);
        assert_eq!(s.kept(), 1);
        assert!(s.needs_more());
        s.add_round([
            ("d", vec![0.1, 1.0]),
            ("e", vec![0.0, 0.0]),
            ("f", vec![1.0, 0.0]),
            ("g", vec![0.3, 0.0]),
        ]);
        assert!(!s.needs_more());
        let b = s.finish();
        let names: Vec<&str> = b.groups.iter().map(|(g, _)| *g).collect();
        assert_eq!(names, ["b", "d", "f"]);
        assert_eq!((b.rounds, b.dropped, b.surplus), (2, 3, 1));

        // Rounds run out: the step gets what was kept.
        let mut s = DynamicSampler::new(2, 2);
        s.add_round([(0, vec![1.0, 1.0])]);
        s.add_round([(1, vec![1.0, 0.0])]);
        assert!(!s.needs_more());
        let b = s.finish();
        assert_eq!(b.groups.len(), 1);
        assert_eq!((b.rounds, b.dropped, b.surplus), (2, 1, 0));
    }
}
