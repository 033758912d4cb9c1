//! Batches for next-token training and a length-bucketing sampler.
//!
//! A [`Batch`] is `[B, T]` row-major: `input_ids[b*T + t]`, `targets[b*T + t] = input_ids[b*T + t
//! + 1]` when that next token is in the loss mask, else [`IGNORE_INDEX`] (the last position
//! always), and `positions[b*T + t] = t` (RoPE positions; they continue through the padding,
//! whose targets are ignored). Rows are right-padded with the pad id to the longest example,
//! truncated to `max_len`.
//!
//! [`BucketSampler`] sorts examples by length and cuts them into batches with `B * T <= budget`
//! (T = the longest in the batch), then visits the batches in a fresh seeded order each epoch.
//! Its [`SamplerState`] (epoch, position, seed) restores the exact sequence.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sft::TokenizedExample;
use crate::{DataError, Result};

/// Target of a position that is not trained on (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// `[B, T]` token ids, shifted targets and positions, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub targets: Vec<i32>,
    pub positions: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

impl Batch {
    /// Positions with a target (not [`IGNORE_INDEX`]): the loss's denominator.
    pub fn n_label_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }
}

/// Right-pad `examples` with `pad_id` to the longest (at most `max_len`) and shift the targets.
pub fn make_batch(examples: &[&TokenizedExample], pad_id: u32, max_len: usize) -> Batch {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.input_ids.len().min(max_len))
        .max()
        .unwrap_or(0);
    let mut input_ids = vec![pad_id; b * t];
    let mut targets = vec![IGNORE_INDEX; b * t];
    let mut positions = Vec::with_capacity(b * t);
    for (row, ex) in examples.iter().enumerate() {
        let n = ex.input_ids.len().min(t);
        let base = row * t;
        input_ids[base..base + n].copy_from_slice(&ex.input_ids[..n]);
        for j in 0..n.saturating_sub(1) {
            if ex.loss_mask.get(j + 1).copied().unwrap_or(false) {
                targets[base + j] = ex.input_ids[j + 1] as i32;
            }
        }
        positions.extend(0..t as u32);
    }
    Batch {
        input_ids,
        targets,
        positions,
        b,
        t,
    }
}

/// Where a [`BucketSampler`] is: the epoch, the next batch within it, and the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
    pub seed: u64,
}

/// How examples are grouped into batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// A fresh random grouping every epoch (iid batches; some padding). The default.
    #[default]
    Random,
    /// Examples of similar length together (least padding), batches visited in random order.
    /// Batches then differ systematically (e.g. one task per batch when tasks differ in
    /// length), which can slow optimisation.
    Bucket,
}

/// Batches under a token budget (`count × longest ≤ budget`), in a seeded order per epoch.
#[derive(Clone, Debug)]
pub struct BucketSampler {
    lengths: Vec<usize>,
    token_budget: usize,
    batching: Batching,
    /// Example indices of each batch of the current epoch.
    batches: Vec<Vec<usize>>,
    /// The visiting order of `batches` in the current epoch.
    order: Vec<usize>,
    state: SamplerState,
}

/// Cuts `idx` (in order) into batches with `count × longest ≤ budget`; an example longer than
/// the budget gets a batch to itself.
fn greedy_batches(idx: &[usize], lengths: &[usize], token_budget: usize) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0usize;
    for &i in idx {
        let l = longest.max(lengths[i].max(1));
        if !cur.is_empty() && (cur.len() + 1) * l > token_budget {
            batches.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(lengths[i].max(1));
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

impl BucketSampler {
    /// Length-bucketed batches ([`Batching::Bucket`]). `lengths[i]` is example `i`'s length in
    /// tokens (already clipped to the max length).
    pub fn new(lengths: &[usize], token_budget: usize, seed: u64) -> Self {
        Self::with_batching(lengths, token_budget, seed, Batching::Bucket)
    }

    /// Batches grouped as `batching` says.
    pub fn with_batching(
        lengths: &[usize],
        token_budget: usize,
        seed: u64,
        batching: Batching,
    ) -> Self {
        let mut s = BucketSampler {
            lengths: lengths.to_vec(),
            token_budget,
            batching,
            batches: Vec::new(),
            order: Vec::new(),
            state: SamplerState {
                epoch: 0,
                position: 0,
                seed,
            },
        };
        s.start_epoch(0);
        s
    }

    /// Lays out the batches and their order for `epoch` (a pure function of the seed).
    fn start_epoch(&mut self, epoch: u64) {
        let n = self.lengths.len();
        let seed = self.state.seed;
        match self.batching {
            Batching::Bucket => {
                if self.batches.is_empty() {
                    let mut idx: Vec<usize> = (0..n).collect();
                    idx.sort_by_key(|&i| (self.lengths[i], i));
                    self.batches = greedy_batches(&idx, &self.lengths, self.token_budget);
                }
                self.order = epoch_order(self.batches.len(), seed, epoch);
            }
            Batching::Random => {
                let idx = epoch_order(n, seed, epoch);
                self.batches = greedy_batches(&idx, &self.lengths, self.token_budget);
                self.order = (0..self.batches.len()).collect();
            }
        }
        self.state.epoch = epoch;
        self.state.position = 0;
    }

    /// The example indices of the next batch (empty only when there are no examples). Wraps
    /// into the next epoch, with a new order, after the last batch.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.batches.is_empty() {
            return Vec::new();
        }
        if self.state.position >= self.batches.len() {
            self.start_epoch(self.state.epoch + 1);
        }
        let batch = self.batches[self.order[self.state.position]].clone();
        self.state.position += 1;
        batch
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Continue from `state` (taken from a sampler built on the same lengths and budget).
    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        let mut next = self.clone();
        next.state.seed = state.seed;
        next.start_epoch(state.epoch);
        if state.position > next.batches.len() {
            return Err(DataError::Sampler(format!(
                "state position {} is past the {} batches of this data",
                state.position,
                next.batches.len()
            )));
        }
        next.state.position = state.position;
        *self = next;
        Ok(())
    }

    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }
}

/// The batch order of `epoch`: a permutation from a generator seeded by `seed`, stream `epoch`.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ids: &[u32], mask: &[bool]) -> TokenizedExample {
        TokenizedExample {
            input_ids: ids.to_vec(),
            loss_mask: mask.to_vec(),
        }
    }

    #[test]
    fn targets_shift_and_padding() {
        let a = example(&[10, 11, 12, 13], &[false, false, true, true]);
        let b = example(&[20, 21], &[false, true]);
        let batch = make_batch(&[&a, &b], 0, 16);
        assert_eq!((batch.b, batch.t), (2, 4));
        assert_eq!(batch.input_ids, vec![10, 11, 12, 13, 20, 21, 0, 0]);
        assert_eq!(
            batch.targets,
            vec![-100, 12, 13, -100, 21, -100, -100, -100]
        );
        assert_eq!(batch.positions, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(batch.n_label_tokens(), 3);
    }

    #[test]
    fn truncation_to_max_len() {
        let a = example(&[1, 2, 3, 4, 5], &[false, true, true, true, true]);
        let batch = make_batch(&[&a], 9, 3);
        assert_eq!((batch.b, batch.t), (1, 3));
        assert_eq!(batch.input_ids, vec![1, 2, 3]);
        // The target of the last kept position would be token 4, which was cut: ignored.
        assert_eq!(batch.targets, vec![2, 3, -100]);
        assert_eq!(make_batch(&[], 0, 8).input_ids, Vec::<u32>::new());
    }

    fn lengths() -> Vec<usize> {
        (0..37).map(|i| 3 + (i * 7919) % 29).collect()
    }

    #[test]
    fn buckets_respect_budget_and_cover_every_example() {
        let lens = lengths();
        let mut s = BucketSampler::new(&lens, 64, 5);
        let mut seen = vec![0; lens.len()];
        for _ in 0..s.num_batches() {
            let batch = s.next_batch();
            let longest = batch.iter().map(|&i| lens[i]).max().unwrap();
            assert!(batch.len() * longest <= 64, "{batch:?}");
            for i in batch {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        assert_eq!(s.epoch(), 0);
    }

    #[test]
    fn sampler_resume_equals_uninterrupted() {
        for batching in [Batching::Bucket, Batching::Random] {
            resume_equals_uninterrupted(batching);
        }
    }

    #[test]
    fn random_batches_mix_lengths_and_cover_every_example_once_per_epoch() {
        let lens: Vec<usize> = (0..60).map(|i| 5 + (i % 3) * 10).collect();
        let mut s = BucketSampler::with_batching(&lens, 100, 3, Batching::Random);
        let n = s.num_batches();
        let epoch: Vec<Vec<usize>> = (0..n).map(|_| s.next_batch()).collect();
        let mut all: Vec<usize> = epoch.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..60).collect::<Vec<_>>());
        for b in &epoch {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() * longest <= 100, "{b:?}");
        }
        // Some batch mixes lengths (bucketing never would here).
        assert!(epoch
            .iter()
            .any(|b| b.iter().any(|&i| lens[i] != lens[b[0]])));
        // The next epoch groups differently.
        let next: Vec<Vec<usize>> = (0..s.num_batches()).map(|_| s.next_batch()).collect();
        assert_ne!(epoch, next);
    }

    fn resume_equals_uninterrupted(batching: Batching) {
        let lens = lengths();
        let mut full = BucketSampler::with_batching(&lens, 48, 7, batching);
        let n = full.num_batches();
        assert!(n > 3);
        let want: Vec<Vec<usize>> = (0..3 * n + 2).map(|_| full.next_batch()).collect();

        let mut first = BucketSampler::with_batching(&lens, 48, 7, batching);
        let mut got: Vec<Vec<usize>> = (0..n + 2).map(|_| first.next_batch()).collect();
        let saved = serde_json::to_string(&first.state()).unwrap();
        let mut resumed = BucketSampler::with_batching(&lens, 48, 0, batching);
        resumed
            .restore(serde_json::from_str(&saved).unwrap())
            .unwrap();
        got.extend((0..2 * n).map(|_| resumed.next_batch()));
        assert_eq!(got, want);

        // Epochs are shuffled differently, and the order depends on the seed.
        assert_ne!(want[..n], want[n..2 * n]);
        let mut other = BucketSampler::with_batching(&lens, 48, 8, batching);
        let other: Vec<Vec<usize>> = (0..n).map(|_| other.next_batch()).collect();
        assert_ne!(other, want[..n]);

        let bad = SamplerState {
            epoch: 0,
            position: n + 1,
            seed: 7,
        };
        assert!(resumed.restore(bad).is_err());
    }

    #[test]
    fn empty_sampler_yields_empty_batches() {
        let mut s = BucketSampler::new(&[], 64, 1);
        assert!(s.next_batch().is_empty());
    }
}
