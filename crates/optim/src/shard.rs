//! ZeRO-1 partition of the optimizer state over a dp × sp world: each rank keeps the fp32 master
//! weights and both AdamW moments of one contiguous shard of the flat parameter buffer, so the
//! replicated 16 bytes a parameter (master, m, v, fp32 gradients) become 4 + 12 / W.
//!
//! The shard follows how the two-level device collectives cut a buffer: the flat buffer of
//! `total` values, padded with zeros to a multiple of W = sp · dp (`padded`), is reduce-scattered
//! over the sequence-parallel group (sp rank s keeps chunk s of sp equal chunks), and that chunk
//! over the data-parallel group (dp rank d keeps sub-chunk d). So rank (d, s) owns
//!
//! ```text
//! [s · padded/sp + d · padded/W,  + padded/W)
//! ```
//!
//! and the all-gather that brings the updated weights back runs the two levels in reverse (dp
//! within the chunk, then sp). AdamW is element-wise with one decay flag a tensor, so a rank steps
//! its shard as the pieces of the layout's tensors that fall in it ([`OptShard::segments`]), and
//! the W ranks together take exactly the replicated step.

use std::ops::Range;

use crate::AdamWStateRef;

/// Rank (dp_rank, sp_rank)'s shard of a flat buffer of `total` values (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptShard {
    /// Values of the unpadded buffer.
    pub total: usize,
    /// `total` rounded up to a multiple of the world (the device buffers' length).
    pub padded: usize,
    pub sp: usize,
    pub dp: usize,
    pub sp_rank: usize,
    pub dp_rank: usize,
    /// This rank's values of the padded buffer; `padded / (sp · dp)` of them.
    pub range: Range<usize>,
}

/// A piece of [`OptShard::owner_pieces`]: values of the padded buffer inside sequence-parallel
/// rank `sp_rank`'s chunk, and their parts by data-parallel shard (`(dp_rank, range)`, in
/// order, tiling `range`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerPiece {
    pub sp_rank: usize,
    pub range: Range<usize>,
    pub parts: Vec<(usize, Range<usize>)>,
}

/// The part of one layout tensor inside a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSegment {
    /// Index of the tensor in the layout's order.
    pub entry: usize,
    /// Its values in the flat buffer.
    pub global: Range<usize>,
    /// The same values in the shard's own buffers (`global` minus the shard's start).
    pub local: Range<usize>,
    pub decay: bool,
}

impl OptShard {
    /// The shard of rank (`dp_rank`, `sp_rank`) of a `dp` × `sp` world.
    ///
    /// # Panics
    /// If a group size is zero or a rank is outside its group (a programming error).
    pub fn new(total: usize, sp: usize, dp: usize, sp_rank: usize, dp_rank: usize) -> Self {
        assert!(
            sp > 0 && dp > 0 && sp_rank < sp && dp_rank < dp,
            "OptShard::new: rank (dp {dp_rank}, sp {sp_rank}) of a {dp} × {sp} world"
        );
        let world = sp * dp;
        let padded = total.div_ceil(world) * world;
        let c = padded / world;
        let start = sp_rank * (padded / sp) + dp_rank * c;
        OptShard {
            total,
            padded,
            sp,
            dp,
            sp_rank,
            dp_rank,
            range: start..start + c,
        }
    }

    /// Values a rank keeps.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Where the shard of rank (`dp_rank`, `sp_rank`) of this plan's world starts in the padded
    /// buffer (each shard `len()` values).
    pub fn start_of(&self, sp_rank: usize, dp_rank: usize) -> usize {
        sp_rank * (self.padded / self.sp) + dp_rank * self.len()
    }

    /// `flat` (a range of the padded buffer) cut by owner, in order, for sums that reach each
    /// value's owner in two levels, as sharded gradients do: pieces of at most `max` values,
    /// each inside one sequence-parallel chunk (summed over sp onto `sp_rank`), each cut again
    /// into that chunk's data-parallel shards (summed over dp onto `parts`' rank).
    pub fn owner_pieces(&self, flat: Range<usize>, max: usize) -> Vec<OwnerPiece> {
        let chunk = self.padded / self.sp;
        let c = self.len();
        let mut out = Vec::new();
        let mut a = flat.start;
        while a < flat.end.min(self.padded) {
            let sp_rank = a / chunk;
            let b = flat.end.min((sp_rank + 1) * chunk).min(a + max.max(1));
            let mut parts = Vec::new();
            let mut x = a;
            while x < b {
                let dp_rank = (x - sp_rank * chunk) / c;
                let y = b.min(self.start_of(sp_rank, dp_rank) + c);
                parts.push((dp_rank, x..y));
                x = y;
            }
            out.push(OwnerPiece {
                sp_rank,
                range: a..b,
                parts,
            });
            a = b;
        }
        out
    }

    /// The shard's values that are real parameters (the rest is padding past `total`).
    pub fn real(&self) -> Range<usize> {
        self.range.start.min(self.total)..self.range.end.min(self.total)
    }

    /// The pieces of the layout's tensors (`entries`: each tensor's flat range and decay flag,
    /// in layout order) that fall in this shard, in order.
    pub fn segments(
        &self,
        entries: impl IntoIterator<Item = (Range<usize>, bool)>,
    ) -> Vec<ShardSegment> {
        entries
            .into_iter()
            .enumerate()
            .filter_map(|(entry, (r, decay))| {
                let global = r.start.max(self.range.start)..r.end.min(self.range.end);
                (global.start < global.end).then(|| ShardSegment {
                    entry,
                    local: global.start - self.range.start..global.end - self.range.start,
                    global,
                    decay,
                })
            })
            .collect()
    }

    /// This shard's part of `state`'s moments (one vector a layout tensor, `entries` their
    /// ranges): (m, v) as shard-length vectors, zeros for padding.
    pub fn slice_state(
        &self,
        state: AdamWStateRef<'_>,
        entries: &[Range<usize>],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut m = vec![0.0; self.len()];
        let mut v = vec![0.0; self.len()];
        for seg in self.segments(entries.iter().map(|r| (r.clone(), false))) {
            let at = seg.global.start - entries[seg.entry].start;
            let src = at..at + seg.global.len();
            m[seg.local.clone()].copy_from_slice(&state.m[seg.entry][src.clone()]);
            v[seg.local].copy_from_slice(&state.v[seg.entry][src]);
        }
        (m, v)
    }
}

/// One vector a layout tensor (`entries` their flat ranges) from a full flat vector: the form of
/// [`crate::AdamWState`]'s moments.
pub fn per_entry(full: &[f32], entries: &[Range<usize>]) -> Vec<Vec<f32>> {
    entries.iter().map(|r| full[r.clone()].to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdamW, AdamWConfig};

    /// `shard`'s values of a full flat vector (zeros for padding).
    fn slice_of(shard: &OptShard, full: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; shard.len()];
        let real = shard.real();
        out[..real.len()].copy_from_slice(&full[real]);
        out
    }

    fn all_shards(total: usize, sp: usize, dp: usize) -> Vec<OptShard> {
        (0..dp)
            .flat_map(|d| (0..sp).map(move |s| OptShard::new(total, sp, dp, s, d)))
            .collect()
    }

    /// `owner_pieces` tiles any range in order, pieces no longer than asked and inside one sp
    /// chunk, every part inside the shard of the rank it names.
    #[test]
    fn owner_pieces_cut_a_range_by_the_shards_that_own_it() {
        for (total, sp, dp) in [
            (7, 1, 1),
            (10, 2, 1),
            (10, 1, 3),
            (101, 2, 2),
            (37, 3, 2),
            (64, 2, 4),
        ] {
            let probe = OptShard::new(total, sp, dp, 0, 0);
            let padded = probe.padded;
            for (flat, max) in [
                (0..padded, 1000),
                (0..padded, 3),
                (padded / 3..padded - 1, 5),
                (1..2, 7),
                (padded / 2..padded / 2, 4),
            ] {
                let pieces = probe.owner_pieces(flat.clone(), max);
                let mut at = flat.start;
                for p in &pieces {
                    assert_eq!(p.range.start, at, "{total} {sp}×{dp} {flat:?}: in order");
                    assert!(p.range.len() <= max && !p.range.is_empty());
                    let chunk = padded / sp;
                    assert!(
                        p.range.start / chunk == p.sp_rank
                            && (p.range.end - 1) / chunk == p.sp_rank
                    );
                    let mut x = p.range.start;
                    for (d, part) in &p.parts {
                        assert_eq!(part.start, x);
                        let own = OptShard::new(total, sp, dp, p.sp_rank, *d).range;
                        assert!(
                            own.start <= part.start && part.end <= own.end,
                            "{part:?} in {own:?}"
                        );
                        assert_eq!(probe.start_of(p.sp_rank, *d), own.start);
                        x = part.end;
                    }
                    assert_eq!(x, p.range.end);
                    at = p.range.end;
                }
                assert_eq!(at, flat.end, "{total} {sp}×{dp} {flat:?}: covered");
            }
        }
    }

    /// Every value of the padded buffer belongs to exactly one rank, shards are equal, and the
    /// shard is what the two-level reduce-scatter (sp, then dp within the chunk) leaves a rank.
    #[test]
    fn shards_cover_the_buffer_once_as_the_two_level_reduce_scatter_leaves_it() {
        for (total, sp, dp) in [
            (0, 1, 1),
            (7, 1, 1),
            (10, 2, 1),
            (10, 1, 3),
            (101, 2, 2),
            (37, 3, 2),
        ] {
            let shards = all_shards(total, sp, dp);
            let padded = shards[0].padded;
            assert!(padded >= total && padded.is_multiple_of(sp * dp) && padded < total + sp * dp);
            let mut owner = vec![usize::MAX; padded];
            for (k, s) in shards.iter().enumerate() {
                assert_eq!(s.len(), padded / (sp * dp));
                for i in s.range.clone() {
                    assert_eq!(owner[i], usize::MAX, "value {i} owned twice");
                    owner[i] = k;
                }
            }
            assert!(owner.iter().all(|&o| o != usize::MAX));
            // The two levels on host vectors, as the device runs them: rank k = d·sp + s starts
            // with value i = i + 1000·k; reduce-scatter over sp (chunk s), then over dp within the
            // chunk (sub-chunk d): the rank's shard holds the sum over every rank.
            let w = sp * dp;
            let mut bufs: Vec<Vec<f64>> = (0..w)
                .map(|k| (0..padded).map(|i| (i + 1000 * k) as f64).collect())
                .collect();
            let want: Vec<f64> = (0..padded)
                .map(|i| (0..w).map(|k| (i + 1000 * k) as f64).sum())
                .collect();
            let chunk = |s: usize| s * padded / sp..(s + 1) * padded / sp;
            let sub = |s: usize, d: usize| {
                let c = chunk(s);
                let n = c.len() / dp;
                c.start + d * n..c.start + (d + 1) * n
            };
            for d in 0..dp {
                for s in 0..sp {
                    for i in chunk(s) {
                        bufs[d * sp + s][i] = (0..sp).map(|t| bufs[d * sp + t][i]).sum();
                    }
                }
            }
            for s in 0..sp {
                for d in 0..dp {
                    for i in sub(s, d) {
                        bufs[d * sp + s][i] = (0..dp).map(|e| bufs[e * sp + s][i]).sum();
                    }
                }
            }
            for sh in &shards {
                let k = sh.dp_rank * sp + sh.sp_rank;
                assert_eq!(sub(sh.sp_rank, sh.dp_rank), sh.range);
                assert_eq!(bufs[k][sh.range.clone()], want[sh.range.clone()]);
            }
        }
    }

    /// The ranks stepping their shards' segments with AdamW (one optimizer per rank over its
    /// segments) take exactly the replicated step, bit for bit, decay flags included; and the
    /// state sliced per shard comes back whole.
    #[test]
    fn sharded_adamw_over_segments_is_the_replicated_step_to_the_bit() {
        let sizes = [5usize, 12, 1, 30, 7];
        let decay = [true, false, true, true, false];
        let mut entries = Vec::new();
        let mut at = 0;
        for &n in &sizes {
            entries.push(at..at + n);
            at += n;
        }
        let total = at;
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let init: Vec<f32> = (0..total)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let grad = |step: usize| -> Vec<f32> {
            (0..total)
                .map(|i| ((i * 13 + step * 7) % 17) as f32 * 0.01 - 0.08)
                .collect()
        };
        // Replicated.
        let mut full = init.clone();
        let mut opt = AdamW::new(&sizes, &decay, cfg);
        for step in 0..3 {
            let g = grad(step);
            let mut ps: Vec<&mut [f32]> = Vec::new();
            let mut rest = full.as_mut_slice();
            for &n in &sizes {
                let (a, b) = rest.split_at_mut(n);
                ps.push(a);
                rest = b;
            }
            let gs: Vec<&[f32]> = entries.iter().map(|r| &g[r.clone()]).collect();
            opt.step(&mut ps, &gs, 1e-2);
        }
        for (sp, dp) in [(2, 1), (1, 2), (2, 2), (3, 2)] {
            let mut gathered = vec![f32::NAN; total];
            for shard in all_shards(total, sp, dp) {
                let segs = shard.segments(entries.iter().cloned().zip(decay));
                let seg_sizes: Vec<usize> = segs.iter().map(|s| s.local.len()).collect();
                let seg_decay: Vec<bool> = segs.iter().map(|s| s.decay).collect();
                let mut mine = slice_of(&shard, &init);
                let mut o = AdamW::new(&seg_sizes, &seg_decay, cfg);
                for step in 0..3 {
                    let g = slice_of(&shard, &grad(step));
                    let mut ps: Vec<&mut [f32]> = Vec::new();
                    let mut rest = mine.as_mut_slice();
                    let mut at = 0;
                    for s in &segs {
                        let (_, tail) = rest.split_at_mut(s.local.start - at);
                        let (a, b) = tail.split_at_mut(s.local.len());
                        ps.push(a);
                        rest = b;
                        at = s.local.end;
                    }
                    let gs: Vec<&[f32]> = segs.iter().map(|s| &g[s.local.clone()]).collect();
                    o.step(&mut ps, &gs, 1e-2);
                }
                let real = shard.real();
                gathered[real.clone()].copy_from_slice(&mine[..real.len()]);
                // The replicated state sliced to this shard is this rank's state.
                let (m, v) = shard.slice_state(opt.state_ref(), &entries);
                let st = o.state();
                for (k, s) in segs.iter().enumerate() {
                    assert_eq!(st.m[k], m[s.local.clone()], "m of segment {k}");
                    assert_eq!(st.v[k], v[s.local.clone()], "v of segment {k}");
                }
            }
            assert_eq!(
                gathered.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                full.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "sp {sp} × dp {dp}"
            );
        }
    }

    #[test]
    fn per_entry_cuts_a_flat_vector_by_the_layout() {
        let full: Vec<f32> = (0..6).map(|i| i as f32).collect();
        assert_eq!(
            per_entry(&full, &[0..2, 2..3, 3..6]),
            vec![vec![0.0, 1.0], vec![2.0], vec![3.0, 4.0, 5.0]]
        );
    }
}
