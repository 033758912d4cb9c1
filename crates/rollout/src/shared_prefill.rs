//! How a prompt's prefill is split over a model's peers (MR-SP's sequence-parallel prefill, with
//! the cache kept whole): [`StepModel::prefill_shared`](crate::StepModel::prefill_shared).
//!
//! The prompt's n rows are cut into 2P chunks of ⌈n / 2P⌉ rows (the last ones shorter or empty);
//! rank r computes chunks r and 2P − 1 − r (zigzag: a chunk near the start, whose queries see few
//! keys, with one near the end, whose queries see many, so causal attention costs every rank
//! about the same). Layer by layer each rank computes its rows' keys and values, every rank's
//! are gathered to every rank (each rank's part padded to [`PrefillSplit::rows_per_rank`] rows)
//! and put at their cache slots, and each rank's queries attend over the keys before them. After
//! the last layer every peer's table holds every row's keys and values: each peer decodes its
//! [`sample_share`] of the group's samples from them (all of them on the prompt's owner, when
//! the caller keeps decoding on one peer), and a peer with none drops them.

use std::ops::Range;

/// The split of an n-row prompt over `world` peers (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillSplit {
    pub rows: usize,
    pub world: usize,
}

/// The slot a padding row of the gathered buffer is put at: nowhere.
pub const NO_SLOT: u32 = u32::MAX;

impl PrefillSplit {
    pub fn new(rows: usize, world: usize) -> Self {
        PrefillSplit {
            rows,
            world: world.max(1),
        }
    }

    /// Rows of each of the 2P chunks (the last ones may hold fewer).
    pub fn chunk(&self) -> usize {
        self.rows.div_ceil(2 * self.world)
    }

    /// Chunk j's rows, clamped to the prompt.
    fn chunk_rows(&self, j: usize) -> Range<usize> {
        let c = self.chunk();
        (j * c).min(self.rows)..((j + 1) * c).min(self.rows)
    }

    /// Rank r's two chunks in row order: chunk r, then chunk 2P − 1 − r (either may be empty).
    pub fn parts(&self, rank: usize) -> [Range<usize>; 2] {
        [
            self.chunk_rows(rank),
            self.chunk_rows(2 * self.world - 1 - rank),
        ]
    }

    /// Rows each rank's part of the gathered buffer holds (its rows, then padding).
    pub fn rows_per_rank(&self) -> usize {
        2 * self.chunk()
    }

    /// The row of the prompt each row of the gathered buffer holds ([world · rows_per_rank],
    /// rank-major; `None` for padding).
    pub fn gathered_rows(&self) -> Vec<Option<usize>> {
        let m = self.rows_per_rank();
        let mut out = Vec::with_capacity(self.world * m);
        for q in 0..self.world {
            let at = out.len();
            for r in self.parts(q) {
                out.extend(r.map(Some));
            }
            out.resize(at + m, None);
        }
        out
    }

    /// Rank r's causal attention work in query-key pairs (each query row sees the keys up to
    /// its own): what the zigzag balances.
    pub fn attention_pairs(&self, rank: usize) -> u64 {
        self.parts(rank)
            .iter()
            .flat_map(|r| r.clone())
            .map(|p| p as u64 + 1)
            .sum()
    }
}

/// The samples of a group of `g` that peer `rank` of `world` decodes after a shared prefill
/// (every peer holds the whole prompt): contiguous shares in rank order, the first `g mod world`
/// peers one more; empty where `g < world` leaves a peer none.
pub fn sample_share(g: usize, world: usize, rank: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (g / world, g % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_shares_tile_the_group_in_rank_order() {
        for world in 1..=8 {
            for g in 0..=17 {
                let shares: Vec<Range<usize>> =
                    (0..world).map(|r| sample_share(g, world, r)).collect();
                let all: Vec<usize> = shares.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(all, (0..g).collect::<Vec<_>>(), "g {g} world {world}");
                let (lo, hi) = (
                    shares.iter().map(|r| r.len()).min().unwrap(),
                    shares.iter().map(|r| r.len()).max().unwrap(),
                );
                assert!(hi - lo <= 1, "g {g} world {world}: {shares:?}");
            }
        }
    }

    #[test]
    fn parts_tile_the_prompt_once_and_the_gathered_rows_name_each_row_once() {
        for world in 1..=8 {
            for rows in [1, 2, 7, 15, 16, 17, 100, 1001] {
                let s = PrefillSplit::new(rows, world);
                let mut seen = vec![0u32; rows];
                for r in 0..world {
                    let parts = s.parts(r);
                    assert!(
                        parts[0].end <= parts[1].start || parts[1].is_empty(),
                        "{parts:?}"
                    );
                    let own: usize = parts.iter().map(|p| p.len()).sum();
                    assert!(own <= s.rows_per_rank());
                    for p in parts.iter().flat_map(|p| p.clone()) {
                        seen[p] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "rows {rows} world {world}");
                let g = s.gathered_rows();
                assert_eq!(g.len(), world * s.rows_per_rank());
                let mut named: Vec<usize> = g.iter().flatten().copied().collect();
                named.sort_unstable();
                assert_eq!(named, (0..rows).collect::<Vec<_>>());
                // Rank q's part lists its own rows first, in order.
                for q in 0..world {
                    let m = s.rows_per_rank();
                    let want: Vec<usize> = s.parts(q).iter().flat_map(|p| p.clone()).collect();
                    let got: Vec<usize> = g[q * m..(q + 1) * m].iter().flatten().copied().collect();
                    assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn zigzag_balances_causal_attention_where_contiguous_shards_do_not() {
        for world in [2, 4, 8] {
            let s = PrefillSplit::new(262_144, world);
            let work: Vec<u64> = (0..world).map(|r| s.attention_pairs(r)).collect();
            let (lo, hi) = (*work.iter().min().unwrap(), *work.iter().max().unwrap());
            // Exactly balanced up to the chunk size's rounding.
            assert!((hi - lo) as f64 / (hi as f64) < 1e-3, "{work:?}");
            let total: u64 = work.iter().sum();
            assert_eq!(total, 262_144u64 * 262_145 / 2);
            // Contiguous shards of n / P rows: the last rank does 2P − 1 times the first's.
            let n = 262_144u64 / world as u64;
            let first = n * (n + 1) / 2;
            let last: u64 = ((world as u64 - 1) * n..world as u64 * n)
                .map(|p| p + 1)
                .sum();
            assert!(last as f64 / first as f64 > (2 * world - 1) as f64 * 0.99);
        }
    }
}
