//! Sequence sharding: a length-T sequence over P ranks.
//!
//! The sequence is padded at its end to `T_pad`, the next multiple of `P` ([`Layout::Contiguous`])
//! or `2P` ([`Layout::Zigzag`]), and cut into equal chunks of `T_pad / chunks` tokens:
//!
//! - contiguous: P chunks, rank r holds chunk r (local rows `[r·L, (r+1)·L)`, `L = T_pad / P`);
//! - zigzag: 2P chunks of `c = T_pad / 2P`, rank r holds chunk r then chunk `2P−1−r`, so every rank
//!   holds as much early (cheap under a causal mask) as late (expensive) work.
//!
//! [`Sharding::with_chunk_multiple`] rounds the chunk length up to a multiple of m (more padding at
//! the end): the device Ulysses hybrid cuts each ring chunk evenly over its u group members.
//!
//! Global rows `≥ T` are padding. Because padding sits at the end of the sequence, within a chunk
//! the valid tokens are always a prefix (`chunk_valid_len`); a causal query never sees a padded key,
//! and executors hand the kernels only the valid prefix of each chunk. Tensors are `[B, T, W]`
//! (tokens × width, per batch row) globally and `[B, L, W]` per rank.
//!
//! RoPE must see global positions: [`Sharding::positions`] gives each local token its global
//! position; a padded token gets `T − 1`, a position the RoPE table certainly holds, and is masked
//! out by [`Sharding::valid_mask`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How a sequence is cut over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// P chunks; rank r holds chunk r.
    Contiguous,
    /// 2P chunks; rank r holds chunks r and 2P−1−r (in that local order).
    Zigzag,
}

impl Layout {
    /// Chunks each rank holds: 1 (contiguous) or 2 (zigzag).
    pub fn chunks_per_rank(self) -> usize {
        match self {
            Layout::Contiguous => 1,
            Layout::Zigzag => 2,
        }
    }

    /// Chunks the padded sequence is cut into: P or 2P.
    pub fn num_chunks(self, ranks: usize) -> usize {
        ranks * self.chunks_per_rank()
    }

    /// The rank that holds `chunk` (its home).
    pub fn chunk_home(self, ranks: usize, chunk: usize) -> usize {
        match self {
            Layout::Contiguous => chunk,
            Layout::Zigzag if chunk < ranks => chunk,
            Layout::Zigzag => 2 * ranks - 1 - chunk,
        }
    }

    /// The chunk in local slot `slot` (`0..chunks_per_rank`) of `rank`.
    pub fn chunk_at(self, ranks: usize, rank: usize, slot: usize) -> usize {
        match (self, slot) {
            (_, 0) => rank,
            (Layout::Zigzag, 1) => 2 * ranks - 1 - rank,
            _ => panic!("{self:?} has no local slot {slot}"),
        }
    }

    /// The local slot of `chunk` on its home rank.
    pub fn slot_of(self, ranks: usize, chunk: usize) -> usize {
        usize::from(chunk >= ranks)
    }
}

/// Why a sharding request was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ShardError {
    #[error("sharding: P = 0 ranks; at least one is needed")]
    NoRanks,
    #[error("sharding: rank {rank} is out of range 0..{ranks}")]
    RankOutOfRange { rank: usize, ranks: usize },
    #[error("sharding: {what} has {len} elements, expected {expected} ({detail})")]
    Length {
        what: &'static str,
        len: usize,
        expected: usize,
        detail: String,
    },
    #[error("sharding: {got} shards given for {ranks} ranks")]
    ShardCount { got: usize, ranks: usize },
    #[error("sharding: padded length {padded_len} does not fit u32 positions")]
    PositionOverflow { padded_len: usize },
}

/// A length-`seq_len` sequence cut over `ranks` ranks with `layout`, padded as the layout needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sharding {
    seq_len: usize,
    ranks: usize,
    layout: Layout,
    /// Chunk lengths are a multiple of this (default 1: no extra padding).
    #[serde(skip_serializing_if = "is_one")]
    chunk_multiple: usize,
}

fn is_one(m: &usize) -> bool {
    *m == 1
}

impl Sharding {
    pub fn new(seq_len: usize, ranks: usize, layout: Layout) -> Result<Self, ShardError> {
        if ranks == 0 {
            return Err(ShardError::NoRanks);
        }
        Ok(Sharding {
            seq_len,
            ranks,
            layout,
            chunk_multiple: 1,
        })
    }

    /// The same sharding with every chunk's length rounded up to a multiple of `m` (padding at
    /// the end of the sequence, as always); `m = 0` is treated as 1.
    pub fn with_chunk_multiple(self, m: usize) -> Self {
        Sharding {
            chunk_multiple: m.max(1),
            ..self
        }
    }

    /// What chunk lengths are a multiple of (1 unless [`Sharding::with_chunk_multiple`]).
    pub fn chunk_multiple(&self) -> usize {
        self.chunk_multiple
    }

    /// T, the unpadded length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn num_chunks(&self) -> usize {
        self.layout.num_chunks(self.ranks)
    }

    /// T rounded up to a multiple of the chunk count (times the chunk multiple).
    pub fn padded_len(&self) -> usize {
        let n = self.num_chunks() * self.chunk_multiple;
        self.seq_len.div_ceil(n) * n
    }

    /// L: rows each rank holds, padding included.
    pub fn local_len(&self) -> usize {
        self.padded_len() / self.ranks
    }

    /// Rows per chunk, padding included.
    pub fn chunk_len(&self) -> usize {
        self.padded_len() / self.num_chunks()
    }

    /// First global row of `chunk`.
    pub fn chunk_start(&self, chunk: usize) -> usize {
        chunk * self.chunk_len()
    }

    /// Valid (unpadded) rows of `chunk`: a prefix of it, possibly empty.
    pub fn chunk_valid_len(&self, chunk: usize) -> usize {
        self.chunk_len()
            .min(self.seq_len.saturating_sub(self.chunk_start(chunk)))
    }

    /// Global (padded) row of local row `local` on `rank`; `≥ T` means padding.
    /// Panics if `rank` or `local` is out of range (a programming error, not input).
    pub fn global_row(&self, rank: usize, local: usize) -> usize {
        assert!(
            rank < self.ranks && local < self.local_len(),
            "global_row: rank {rank} / local row {local} outside {} ranks × {} rows",
            self.ranks,
            self.local_len()
        );
        let c = self.chunk_len();
        let chunk = self.layout.chunk_at(self.ranks, rank, local / c);
        self.chunk_start(chunk) + local % c
    }

    /// `(rank, local row)` holding global (padded) row `global`. Panics past the padded length.
    pub fn local_row(&self, global: usize) -> (usize, usize) {
        assert!(
            global < self.padded_len(),
            "local_row: global row {global} outside padded length {}",
            self.padded_len()
        );
        let c = self.chunk_len();
        let chunk = global / c;
        let slot = self.layout.slot_of(self.ranks, chunk);
        (
            self.layout.chunk_home(self.ranks, chunk),
            slot * c + global % c,
        )
    }

    /// Global (padded) rows of `rank`'s local rows, in local order.
    pub fn global_rows(&self, rank: usize) -> Result<Vec<usize>, ShardError> {
        self.check_rank(rank)?;
        Ok((0..self.local_len())
            .map(|i| self.global_row(rank, i))
            .collect())
    }

    /// Which of `rank`'s local rows are real tokens (`false` for padding).
    pub fn valid_mask(&self, rank: usize) -> Result<Vec<bool>, ShardError> {
        Ok(self
            .global_rows(rank)?
            .into_iter()
            .map(|g| g < self.seq_len)
            .collect())
    }

    /// Global RoPE position of each of `rank`'s local tokens; padding gets `T − 1`.
    pub fn positions(&self, rank: usize) -> Result<Vec<u32>, ShardError> {
        if self.padded_len() > u32::MAX as usize {
            return Err(ShardError::PositionOverflow {
                padded_len: self.padded_len(),
            });
        }
        let last = self.seq_len.saturating_sub(1);
        Ok(self
            .global_rows(rank)?
            .into_iter()
            .map(|g| g.min(last) as u32)
            .collect())
    }

    /// `rank`'s shard of `x` `[batch, T, width]`: `[batch, L, width]`, padded rows filled with `pad`.
    pub fn shard<E: Copy>(
        &self,
        x: &[E],
        batch: usize,
        width: usize,
        rank: usize,
        pad: E,
    ) -> Result<Vec<E>, ShardError> {
        self.check_rank(rank)?;
        let t = self.seq_len;
        self.check_len("x", x.len(), batch * t * width, batch, t, width)?;
        let l = self.local_len();
        let mut out = Vec::with_capacity(batch * l * width);
        for b in 0..batch {
            for i in 0..l {
                let g = self.global_row(rank, i);
                if g < t {
                    out.extend_from_slice(&x[(b * t + g) * width..(b * t + g + 1) * width]);
                } else {
                    out.extend(std::iter::repeat_n(pad, width));
                }
            }
        }
        Ok(out)
    }

    /// Gathers one shard per rank (`[batch, L, width]` each) back into `[batch, T, width]`,
    /// dropping the padding.
    pub fn unshard<E: Copy, S: AsRef<[E]>>(
        &self,
        shards: &[S],
        batch: usize,
        width: usize,
    ) -> Result<Vec<E>, ShardError> {
        if shards.len() != self.ranks {
            return Err(ShardError::ShardCount {
                got: shards.len(),
                ranks: self.ranks,
            });
        }
        let (t, l) = (self.seq_len, self.local_len());
        for s in shards {
            self.check_len(
                "shard",
                s.as_ref().len(),
                batch * l * width,
                batch,
                l,
                width,
            )?;
        }
        let Some(first) = shards.iter().find_map(|s| s.as_ref().first().copied()) else {
            return Ok(Vec::new());
        };
        let mut out = vec![first; batch * t * width];
        for (rank, s) in shards.iter().enumerate() {
            let s = s.as_ref();
            for b in 0..batch {
                for i in 0..l {
                    let g = self.global_row(rank, i);
                    if g < t {
                        out[(b * t + g) * width..(b * t + g + 1) * width]
                            .copy_from_slice(&s[(b * l + i) * width..(b * l + i + 1) * width]);
                    }
                }
            }
        }
        Ok(out)
    }

    fn check_rank(&self, rank: usize) -> Result<(), ShardError> {
        if rank < self.ranks {
            Ok(())
        } else {
            Err(ShardError::RankOutOfRange {
                rank,
                ranks: self.ranks,
            })
        }
    }

    fn check_len(
        &self,
        what: &'static str,
        len: usize,
        expected: usize,
        batch: usize,
        rows: usize,
        width: usize,
    ) -> Result<(), ShardError> {
        if len == expected {
            Ok(())
        } else {
            Err(ShardError::Length {
                what,
                len,
                expected,
                detail: format!("batch {batch} × rows {rows} × width {width}"),
            })
        }
    }
}

/// One rank's share of a `[B, T]` token batch under sequence parallelism: what a model replica
/// on that rank runs its layers on (`t` = [`Sharding::local_len`], rows in the layout's order).
/// Padded rows hold the pad token and no target, so they add nothing to the loss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenShard {
    /// `[B, L]` token ids.
    pub tokens: Vec<u32>,
    /// `[B, L]` targets; padded rows get `ignore`.
    pub targets: Vec<i32>,
    /// `[B, L]` global RoPE positions ([`Sharding::positions`], the same for every batch row).
    pub positions: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

impl TokenShard {
    /// The shard as the model's batch.
    pub fn batch(&self) -> reel_model::TokenBatch<'_> {
        reel_model::TokenBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            positions: &self.positions,
            b: self.b,
            t: self.t,
        }
    }
}

impl Sharding {
    /// `rank`'s [`TokenShard`] of `tokens`/`targets` (`[batch, T]` each, T = `seq_len`):
    /// padding rows get token `pad` and target `ignore`, positions are the global rows'.
    pub fn shard_tokens(
        &self,
        tokens: &[u32],
        targets: &[i32],
        batch: usize,
        rank: usize,
        pad: u32,
        ignore: i32,
    ) -> Result<TokenShard, ShardError> {
        let tokens = self.shard(tokens, batch, 1, rank, pad)?;
        let targets = self.shard(targets, batch, 1, rank, ignore)?;
        let row = self.positions(rank)?;
        let positions = (0..batch).flat_map(|_| row.iter().copied()).collect();
        Ok(TokenShard {
            tokens,
            targets,
            positions,
            b: batch,
            t: self.local_len(),
        })
    }
}

/// Global RoPE positions of `rank`'s local tokens for a length-`seq_len` sequence over `ranks`
/// ranks (see [`Sharding::positions`]).
pub fn shard_positions(
    seq_len: usize,
    ranks: usize,
    rank: usize,
    layout: Layout,
) -> Result<Vec<u32>, ShardError> {
    Sharding::new(seq_len, ranks, layout)?.positions(rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: [usize; 6] = [0, 1, 5, 16, 17, 100];
    const PS: [usize; 6] = [1, 2, 3, 4, 6, 8];
    const LAYOUTS: [Layout; 2] = [Layout::Contiguous, Layout::Zigzag];

    #[test]
    fn chunk_multiple_pads_each_chunk_to_a_multiple() {
        // T = 10 over 2 ranks, chunks a multiple of 3: chunk 6, padded 12.
        let s = Sharding::new(10, 2, Layout::Contiguous)
            .unwrap()
            .with_chunk_multiple(3);
        assert_eq!((s.padded_len(), s.local_len(), s.chunk_len()), (12, 6, 6));
        assert_eq!((s.chunk_valid_len(0), s.chunk_valid_len(1)), (6, 4));
        // Equal to the contiguous sharding over 2 × 3 = 6 ranks, grouped by 3.
        let fine = Sharding::new(10, 6, Layout::Contiguous).unwrap();
        for t in TS {
            for (r, u) in [(1, 2), (2, 2), (3, 4), (2, 3)] {
                let g = Sharding::new(t, r, Layout::Contiguous)
                    .unwrap()
                    .with_chunk_multiple(u);
                let f = Sharding::new(t, r * u, Layout::Contiguous).unwrap();
                assert_eq!(g.local_len(), u * f.local_len(), "T {t} r {r} u {u}");
                assert_eq!(g.padded_len(), f.padded_len(), "T {t} r {r} u {u}");
            }
        }
        assert_eq!(fine.local_len() * 3, s.local_len());
        assert_eq!(
            Sharding::new(10, 2, Layout::Zigzag)
                .unwrap()
                .chunk_multiple(),
            1
        );
    }

    #[test]
    fn geometry_of_small_cases() {
        let s = Sharding::new(10, 2, Layout::Zigzag).unwrap();
        assert_eq!((s.padded_len(), s.local_len(), s.chunk_len()), (12, 6, 3));
        assert_eq!(s.global_rows(0).unwrap(), vec![0, 1, 2, 9, 10, 11]);
        assert_eq!(s.global_rows(1).unwrap(), vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(
            s.valid_mask(0).unwrap(),
            vec![true, true, true, true, false, false]
        );
        assert_eq!(s.positions(0).unwrap(), vec![0, 1, 2, 9, 9, 9]);
        assert_eq!(
            (s.chunk_valid_len(3), s.chunk_valid_len(2)),
            (1, 3),
            "chunk 3 holds rows 9..12, only 9 is real"
        );
        let c = Sharding::new(5, 3, Layout::Contiguous).unwrap();
        assert_eq!(c.padded_len(), 6);
        assert_eq!(c.global_rows(2).unwrap(), vec![4, 5]);
        assert_eq!(
            shard_positions(5, 3, 2, Layout::Contiguous).unwrap(),
            vec![4, 4]
        );
        assert_eq!(
            shard_positions(5, 3, 3, Layout::Contiguous),
            Err(ShardError::RankOutOfRange { rank: 3, ranks: 3 })
        );
        assert_eq!(
            Sharding::new(5, 0, Layout::Zigzag),
            Err(ShardError::NoRanks)
        );
    }

    #[test]
    fn shard_unshard_round_trip() {
        for t in TS {
            for p in PS {
                for layout in LAYOUTS {
                    let s = Sharding::new(t, p, layout).unwrap();
                    let m = layout.num_chunks(p);
                    assert_eq!(s.padded_len() % m, 0);
                    assert!(s.padded_len() >= t && s.padded_len() < t + m);
                    for (batch, width) in [(1, 1), (2, 3)] {
                        let x: Vec<u32> = (0..(batch * t * width) as u32).map(|i| i + 7).collect();
                        let shards: Vec<Vec<u32>> = (0..p)
                            .map(|r| s.shard(&x, batch, width, r, u32::MAX).unwrap())
                            .collect();
                        for (r, sh) in shards.iter().enumerate() {
                            assert_eq!(sh.len(), batch * s.local_len() * width);
                            // Padded rows hold the pad value, real rows their global row.
                            let mask = s.valid_mask(r).unwrap();
                            for b in 0..batch {
                                for (i, &valid) in mask.iter().enumerate() {
                                    let row = &sh[(b * s.local_len() + i) * width..][..width];
                                    let g = s.global_row(r, i);
                                    if valid {
                                        assert_eq!(row[0] as usize, (b * t + g) * width + 7);
                                    } else {
                                        assert!(row.iter().all(|&e| e == u32::MAX));
                                    }
                                }
                            }
                        }
                        let back = s.unshard(&shards, batch, width).unwrap();
                        assert_eq!(back, x, "T={t} P={p} {layout:?} b={batch} w={width}");
                    }
                }
            }
        }
    }

    #[test]
    fn local_and_global_rows_are_inverse() {
        for t in TS {
            for p in PS {
                for layout in LAYOUTS {
                    let s = Sharding::new(t, p, layout).unwrap();
                    let mut seen = vec![false; s.padded_len()];
                    for r in 0..p {
                        for (i, g) in s.global_rows(r).unwrap().into_iter().enumerate() {
                            assert_eq!(s.local_row(g), (r, i));
                            assert!(!seen[g]);
                            seen[g] = true;
                        }
                    }
                    assert!(seen.iter().all(|&x| x));
                    // Valid rows of each chunk are a prefix, and they add up to T.
                    let total: usize = (0..s.num_chunks()).map(|c| s.chunk_valid_len(c)).sum();
                    assert_eq!(total, t);
                }
            }
        }
    }

    #[test]
    fn token_shards_cover_every_target_once_at_its_global_position() {
        for t in TS {
            for p in PS {
                for layout in LAYOUTS {
                    let s = Sharding::new(t, p, layout).unwrap();
                    let batch = 2;
                    // Token and target of global row g in batch row b encode (b, g).
                    let tokens: Vec<u32> = (0..batch * t).map(|i| 1000 + i as u32).collect();
                    let targets: Vec<i32> = (0..batch * t)
                        .map(|i| if i % 3 == 0 { -100 } else { i as i32 })
                        .collect();
                    let mut seen = vec![0usize; batch * t];
                    for r in 0..p {
                        let sh = s
                            .shard_tokens(&tokens, &targets, batch, r, 7, -100)
                            .unwrap();
                        let l = s.local_len();
                        assert_eq!((sh.b, sh.t), (batch, l));
                        assert_eq!(sh.batch().tokens.len(), batch * l);
                        for b in 0..batch {
                            for i in 0..l {
                                let (k, g) = (b * l + i, s.global_row(r, i));
                                if g < t {
                                    assert_eq!(sh.tokens[k], 1000 + (b * t + g) as u32);
                                    assert_eq!(sh.targets[k], targets[b * t + g]);
                                    assert_eq!(sh.positions[k] as usize, g);
                                    seen[b * t + g] += 1;
                                } else {
                                    assert_eq!((sh.tokens[k], sh.targets[k]), (7, -100));
                                    assert_eq!(sh.positions[k] as usize, t.saturating_sub(1));
                                }
                            }
                        }
                    }
                    assert!(seen.iter().all(|&n| n == 1), "T={t} P={p} {layout:?}");
                }
            }
        }
        // A batch of the wrong length is refused, naming the tensor.
        let s = Sharding::new(10, 2, Layout::Zigzag).unwrap();
        let e = s
            .shard_tokens(&[0; 9], &[0; 10], 1, 0, 0, -100)
            .unwrap_err();
        assert!(matches!(e, ShardError::Length { len: 9, .. }), "{e}");
        assert!(s.shard_tokens(&[0; 10], &[0; 10], 1, 2, 0, -100).is_err());
    }

    #[test]
    fn positions_are_a_permutation_plus_masked_padding() {
        for t in TS {
            for p in PS {
                for layout in LAYOUTS {
                    let s = Sharding::new(t, p, layout).unwrap();
                    let mut real = Vec::new();
                    let mut n_pad = 0;
                    for r in 0..p {
                        let pos = shard_positions(t, p, r, layout).unwrap();
                        let mask = s.valid_mask(r).unwrap();
                        assert_eq!(pos.len(), s.local_len());
                        for (&q, &valid) in pos.iter().zip(&mask) {
                            assert!((q as usize) < t.max(1), "position {q} outside the table");
                            if valid {
                                real.push(q as usize);
                            } else {
                                n_pad += 1;
                            }
                        }
                    }
                    real.sort_unstable();
                    assert_eq!(real, (0..t).collect::<Vec<_>>(), "T={t} P={p} {layout:?}");
                    assert_eq!(n_pad, s.padded_len() - t);
                }
            }
        }
    }

    /// Causal work of a rank ∝ Σ (position + 1) over its tokens. Zigzag equalises it exactly over
    /// the padded sequence, hence exactly over the real tokens when 2P divides T, and otherwise up
    /// to the padding's share; contiguous does not balance at all.
    #[test]
    fn zigzag_balances_causal_work() {
        let work = |s: &Sharding, r: usize, real_only: bool| -> usize {
            s.global_rows(r)
                .unwrap()
                .into_iter()
                .filter(|&g| !real_only || g < s.seq_len())
                .map(|g| g + 1)
                .sum()
        };
        for p in PS {
            for t in [2 * p * 8, 2 * p * 8 + 3, 17, 100] {
                let s = Sharding::new(t, p, Layout::Zigzag).unwrap();
                let padded: Vec<usize> = (0..p).map(|r| work(&s, r, false)).collect();
                assert!(
                    padded.iter().all(|&w| w == padded[0]),
                    "P={p} T={t}: {padded:?}"
                );
                let real: Vec<usize> = (0..p).map(|r| work(&s, r, true)).collect();
                let (lo, hi) = (*real.iter().min().unwrap(), *real.iter().max().unwrap());
                if t % (2 * p) == 0 {
                    assert_eq!(lo, hi, "P={p} T={t}: {real:?}");
                } else {
                    let pad_work: usize = (t..s.padded_len()).map(|g| g + 1).sum();
                    assert!(hi - lo <= pad_work, "P={p} T={t}: {real:?}");
                }
                if p > 1 && t % (2 * p) == 0 {
                    let c = Sharding::new(t, p, Layout::Contiguous).unwrap();
                    let wc: Vec<usize> = (0..p).map(|r| work(&c, r, true)).collect();
                    assert!(wc[p - 1] > wc[0] * 2, "contiguous is unbalanced: {wc:?}");
                }
            }
        }
    }

    #[test]
    fn length_errors_name_the_shape() {
        let s = Sharding::new(5, 2, Layout::Contiguous).unwrap();
        let e = s.shard(&[0u8; 9], 1, 2, 0, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sharding: x has 9 elements, expected 10 (batch 1 × rows 5 × width 2)"
        );
        let e = s.unshard(&[vec![0u8; 6]], 1, 2).unwrap_err();
        assert_eq!(e, ShardError::ShardCount { got: 1, ranks: 2 });
    }
}
