//! Shared-prefix scoring and update: a micro-batch's samples packed by prompt, for both GRPO
//! trainers.
//!
//! A group's G samples share their prompt, so the old-policy, reference and update passes need it
//! once, not G times. Each run of consecutive samples with the same prompt becomes one packed row
//! `prompt[..P-1] ; (prompt[P-1] ++ response_1[..-1]) ; … ; (prompt[P-1] ++ response_G[..-1])`,
//! right-padded to the micro-batch's longest packed row T'. Every sample's first target (its
//! first response token) is predicted from the prompt's last token, so each segment starts with
//! a copy of that token; the attention mask lets a segment see the prefix and itself only
//! ([`SharedPrefixAttention`]; under sequence parallelism the schedule's blocks refine into the
//! same mask, `SpAttention::set_packed`). Every labelled position then computes exactly what it
//! does in the sample's own row, and the passes cost P + Σ L_s tokens instead of Σ (P + L_s).
//!
//! The loss keeps its per-sample layout [B, T] (`prompt ++ response[..-1]` rows): [`Packing`]
//! maps labelled positions between the two, and [`LossLayout`] is a rank's view of them (the
//! positions its shard of the packed rows holds).

use anyhow::Result;
use reel_model::{PackedRow, SharedPrefixAttention};
use reel_parallel::Sharding;

use super::Sample;

/// A micro-batch packed by prompt (module docs).
pub(crate) struct Packing {
    /// Packed rows B' and their length T'.
    pub b: usize,
    pub t: usize,
    pub layout: Vec<PackedRow>,
    /// The one-rank attention over the packed rows.
    pub attn: SharedPrefixAttention,
    /// For each packed position (row'·T' + j): the sample of the micro-batch and the index into
    /// its ids of the token it holds; None for padding.
    pub source: Vec<Option<(usize, usize)>>,
    /// (per-sample index k·T + i, packed index) of every labelled position: sample k's
    /// prediction of `ids[i + 1]`.
    pub index: Vec<(usize, usize)>,
}

impl Packing {
    /// Packs `samples`, whose per-sample rows are `t_rows` long.
    pub fn new(samples: &[&Sample], t_rows: usize) -> Self {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (k, s) in samples.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if samples[r.start].prompt == s.prompt => r.end = k + 1,
                _ => runs.push(k..k + 1),
            }
        }
        let layout: Vec<PackedRow> = runs
            .iter()
            .map(|r| {
                let p = samples[r.start].prompt_len.max(1);
                PackedRow {
                    prefix: p - 1,
                    segments: samples[r.clone()].iter().map(|s| s.ids.len() - p).collect(),
                }
            })
            .collect();
        let b = runs.len();
        let t = layout.iter().map(PackedRow::used).max().unwrap_or(1).max(1);
        let mut source = vec![None; b * t];
        let mut index = Vec::new();
        for (row, run) in runs.iter().enumerate() {
            let p = samples[run.start].prompt_len.max(1);
            for (i, src) in source[row * t..row * t + p - 1].iter_mut().enumerate() {
                *src = Some((run.start, i));
            }
            let mut at = row * t + p - 1;
            for k in run.clone() {
                for i in p - 1..samples[k].ids.len() - 1 {
                    source[at] = Some((k, i));
                    index.push((k * t_rows + i, at));
                    at += 1;
                }
            }
        }
        Packing {
            b,
            t,
            attn: SharedPrefixAttention::new(layout.clone()),
            layout,
            source,
            index,
        }
    }

    /// The packed rows' tokens [B'·T'] (`pad` in padding).
    pub fn tokens(&self, samples: &[&Sample], pad: u32) -> Vec<u32> {
        self.source
            .iter()
            .map(|s| s.map_or(pad, |(k, i)| samples[k].ids[i]))
            .collect()
    }

    /// The packed rows' targets [B'·T'] (`ignore` where unlabelled) and labelled positions.
    pub fn targets(
        &self,
        samples: &[&Sample],
        t_rows: usize,
        ignore: i32,
    ) -> (Vec<i32>, Vec<bool>) {
        let mut targets = vec![ignore; self.b * self.t];
        let mut mask = vec![false; self.b * self.t];
        for &(ki, j) in &self.index {
            let (k, i) = (ki / t_rows, ki % t_rows);
            targets[j] = samples[k].ids[i + 1] as i32;
            mask[j] = true;
        }
        (targets, mask)
    }

    /// Every labelled position, for the whole (unsharded) packed rows.
    pub fn whole(&self, samples: usize, t_rows: usize) -> LossLayout {
        LossLayout::new(samples, t_rows, self.index.clone())
    }

    /// The rank's view of the labelled positions: with `sh`, the positions its shard of the
    /// packed rows holds (at their index in the shard); unsharded, all of them.
    pub fn layout_for(
        &self,
        sh: Option<&Sharding>,
        rank: usize,
        samples: usize,
        t_rows: usize,
    ) -> Result<LossLayout> {
        let held = match sh {
            None => return Ok(self.whole(samples, t_rows)),
            Some(sh) => {
                let global: Vec<usize> = (0..self.b * sh.seq_len()).collect();
                let local = sh.shard(&global, self.b, 1, rank, usize::MAX)?;
                let mut at = vec![usize::MAX; global.len()];
                for (l, &g) in local.iter().enumerate() {
                    if g != usize::MAX {
                        at[g] = l;
                    }
                }
                self.index
                    .iter()
                    .filter(|&&(_, j)| at[j] != usize::MAX)
                    .map(|&(i, j)| (i, at[j]))
                    .collect()
            }
        };
        Ok(LossLayout::new(samples, t_rows, held))
    }
}

/// A rank's labelled positions in the loss's per-sample layout [B, T] and where each sits in the
/// model's (packed, possibly sharded) rows.
#[derive(Clone, Debug)]
pub(crate) struct LossLayout {
    pub b: usize,
    pub t: usize,
    /// Per-sample [B·T]: the positions this rank scores.
    pub mask: Vec<bool>,
    /// (per-sample index, index in the model's rows).
    held: Vec<(usize, usize)>,
}

impl LossLayout {
    fn new(b: usize, t: usize, held: Vec<(usize, usize)>) -> Self {
        let mut mask = vec![false; b * t];
        for &(i, _) in &held {
            mask[i] = true;
        }
        LossLayout { b, t, mask, held }
    }

    /// Model-layout values (log-probabilities, entropies) in the per-sample layout, 0 elsewhere.
    pub fn to_samples(&self, model: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; self.b * self.t];
        for &(i, k) in &self.held {
            out[i] = model[k];
        }
        out
    }

    /// Per-sample values (∂L/∂log π) in the model's layout of `n` positions, 0 elsewhere.
    pub fn to_model(&self, per_sample: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n];
        for &(i, k) in &self.held {
            out[k] = per_sample[i];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_parallel::{Layout, Sharding};

    fn sample(prompt: usize, ids: &[u32], prompt_len: usize) -> Sample {
        Sample {
            ids: ids.to_vec(),
            prompt_len,
            advantage: 0.0,
            prompt,
        }
    }

    #[test]
    fn samples_of_one_prompt_share_one_copy_of_it() {
        // Prompt 7 = [1 2 3] with responses [4 5], [6], [] ; prompt 9 = [8 8] with [5 5 5].
        let s = [
            sample(7, &[1, 2, 3, 4, 5], 3),
            sample(7, &[1, 2, 3, 6], 3),
            sample(7, &[1, 2, 3], 3),
            sample(9, &[8, 8, 5, 5, 5], 2),
        ];
        let refs: Vec<&Sample> = s.iter().collect();
        let t_rows = 4; // longest ids.len() - 1
        let p = Packing::new(&refs, t_rows);
        assert_eq!(p.b, 2);
        assert_eq!(
            p.layout,
            vec![
                PackedRow {
                    prefix: 2,
                    segments: vec![2, 1, 0]
                },
                PackedRow {
                    prefix: 1,
                    segments: vec![3]
                }
            ]
        );
        assert_eq!(p.t, 5);
        // Row 0: [1 2 | 3 4 | 3 | pad pad]; row 1: [8 | 8 5 5 | pad].
        assert_eq!(p.tokens(&refs, 0), vec![1, 2, 3, 4, 3, 8, 8, 5, 5, 0]);
        let (targets, mask) = p.targets(&refs, t_rows, -100);
        assert_eq!(targets, vec![-100, -100, 4, 5, 6, -100, 5, 5, 5, -100]);
        assert_eq!(mask.iter().filter(|&&m| m).count(), 6);
        // The per-sample positions the packed ones stand for: sample 1's only target (ids[3])
        // is predicted at its index 2, packed position 4.
        assert!(p.index.contains(&(t_rows + 2, 4)));
        // Round trip through the loss layout.
        let all = p.whole(4, t_rows);
        let model: Vec<f32> = (0..10).map(|x| x as f32 + 0.5).collect();
        let per_sample = all.to_samples(&model);
        assert_eq!(per_sample.iter().filter(|&&x| x != 0.0).count(), 6);
        let back = all.to_model(&per_sample, 10);
        for (j, (&a, &m)) in back.iter().zip(&mask).enumerate() {
            assert_eq!(a, if m { model[j] } else { 0.0 }, "{j}");
        }
        // Sharded over 2 ranks: each labelled position is held by exactly one rank.
        let sh = Sharding::new(p.t, 2, Layout::Zigzag).unwrap();
        let mut seen = vec![0; 4 * t_rows];
        for rank in 0..2 {
            let l = p.layout_for(Some(&sh), rank, 4, t_rows).unwrap();
            for (i, &m) in l.mask.iter().enumerate() {
                seen[i] += u32::from(m);
            }
        }
        assert_eq!(
            seen,
            all.mask.iter().map(|&m| u32::from(m)).collect::<Vec<_>>()
        );
    }
}
