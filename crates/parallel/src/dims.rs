//! Data × sequence parallel dimensions over a world of ranks.
//!
//! `world = dp · sp`. Rank `rank = dp_rank · sp + sp_rank`, so each sequence-parallel group (the
//! ranks that share one sequence and exchange KV chunks every layer) is a run of `sp` contiguous
//! ranks — on one host these are neighbouring GPUs — and each data-parallel group (the ranks that
//! all-reduce gradients) takes one rank from every sp group, with stride `sp`. Validated once at
//! construction; every accessor after that is infallible except for out-of-range indices.

use serde::Serialize;
use thiserror::Error;

/// Why a `dp × sp` split or a rank index was refused; each variant names the numbers.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DimsError {
    #[error("parallel dims: {name} = 0, but it must be at least 1")]
    Zero { name: &'static str },
    #[error("parallel dims: dp × sp = {dp} × {sp} = {product}, but the world has {world} ranks")]
    WorldMismatch {
        dp: usize,
        sp: usize,
        product: u128,
        world: usize,
    },
    #[error("parallel dims: {name} {index} is out of range 0..{bound}")]
    OutOfRange {
        name: &'static str,
        index: usize,
        bound: usize,
    },
}

/// A rank's place in the grid: which data-parallel replica and which sequence shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RankCoords {
    /// Index of the sp group (the data-parallel replica), `0..dp`.
    pub dp_rank: usize,
    /// Position inside the sp group (which sequence shard), `0..sp`.
    pub sp_rank: usize,
}

/// `dp` data-parallel replicas × `sp` sequence-parallel ranks; `dp · sp` is the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ParallelDims {
    dp: usize,
    sp: usize,
}

impl ParallelDims {
    /// Checks `dp ≥ 1`, `sp ≥ 1` and `dp · sp == world`.
    pub fn new(dp: usize, sp: usize, world: usize) -> Result<Self, DimsError> {
        if dp == 0 {
            return Err(DimsError::Zero { name: "dp" });
        }
        if sp == 0 {
            return Err(DimsError::Zero { name: "sp" });
        }
        if dp.checked_mul(sp) != Some(world) {
            return Err(DimsError::WorldMismatch {
                dp,
                sp,
                product: dp as u128 * sp as u128,
                world,
            });
        }
        Ok(ParallelDims { dp, sp })
    }

    pub fn dp(&self) -> usize {
        self.dp
    }

    pub fn sp(&self) -> usize {
        self.sp
    }

    pub fn world(&self) -> usize {
        self.dp * self.sp
    }

    /// `rank → (dp_rank, sp_rank)` with `rank = dp_rank · sp + sp_rank`.
    pub fn coords(&self, rank: usize) -> Result<RankCoords, DimsError> {
        check("rank", rank, self.world())?;
        Ok(RankCoords {
            dp_rank: rank / self.sp,
            sp_rank: rank % self.sp,
        })
    }

    /// The inverse of [`ParallelDims::coords`].
    pub fn rank(&self, coords: RankCoords) -> Result<usize, DimsError> {
        check("dp_rank", coords.dp_rank, self.dp)?;
        check("sp_rank", coords.sp_rank, self.sp)?;
        Ok(coords.dp_rank * self.sp + coords.sp_rank)
    }

    /// Ranks of sequence-parallel group `dp_rank`, in sp order: `dp_rank·sp .. (dp_rank+1)·sp`.
    pub fn sp_group(&self, dp_rank: usize) -> Result<Vec<usize>, DimsError> {
        check("dp_rank", dp_rank, self.dp)?;
        Ok((dp_rank * self.sp..(dp_rank + 1) * self.sp).collect())
    }

    /// Ranks of data-parallel group `sp_rank`, in dp order: `sp_rank, sp_rank + sp, …`.
    pub fn dp_group(&self, sp_rank: usize) -> Result<Vec<usize>, DimsError> {
        check("sp_rank", sp_rank, self.sp)?;
        Ok((0..self.dp).map(|d| d * self.sp + sp_rank).collect())
    }

    /// Every sp group, indexed by dp_rank.
    pub fn sp_groups(&self) -> Vec<Vec<usize>> {
        (0..self.dp)
            .map(|d| (d * self.sp..(d + 1) * self.sp).collect())
            .collect()
    }

    /// Every dp group, indexed by sp_rank.
    pub fn dp_groups(&self) -> Vec<Vec<usize>> {
        (0..self.sp)
            .map(|s| (0..self.dp).map(|d| d * self.sp + s).collect())
            .collect()
    }
}

fn check(name: &'static str, index: usize, bound: usize) -> Result<(), DimsError> {
    if index < bound {
        Ok(())
    } else {
        Err(DimsError::OutOfRange { name, index, bound })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_splits_naming_the_numbers() {
        assert_eq!(
            ParallelDims::new(0, 4, 4),
            Err(DimsError::Zero { name: "dp" })
        );
        assert_eq!(
            ParallelDims::new(2, 0, 0),
            Err(DimsError::Zero { name: "sp" })
        );
        let e = ParallelDims::new(2, 3, 8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parallel dims: dp × sp = 2 × 3 = 6, but the world has 8 ranks"
        );
        let e = ParallelDims::new(usize::MAX, 2, 4).unwrap_err();
        assert!(
            matches!(e, DimsError::WorldMismatch { world: 4, .. }),
            "{e}"
        );
        let d = ParallelDims::new(2, 4, 8).unwrap();
        assert_eq!(
            d.coords(8).unwrap_err().to_string(),
            "parallel dims: rank 8 is out of range 0..8"
        );
        assert!(d.sp_group(2).is_err());
        assert!(d.dp_group(4).is_err());
        assert!(d
            .rank(RankCoords {
                dp_rank: 0,
                sp_rank: 4
            })
            .is_err());
    }

    #[test]
    fn coords_and_groups_partition_the_world() {
        for world in 1..=12 {
            for dp in (1..=world).filter(|d| world % d == 0) {
                let sp = world / dp;
                let d = ParallelDims::new(dp, sp, world).unwrap();
                assert_eq!((d.dp(), d.sp(), d.world()), (dp, sp, world));
                for rank in 0..world {
                    let c = d.coords(rank).unwrap();
                    assert_eq!(d.rank(c).unwrap(), rank);
                    assert!(d.sp_group(c.dp_rank).unwrap().contains(&rank));
                    assert!(d.dp_group(c.sp_rank).unwrap().contains(&rank));
                    assert_eq!(d.sp_group(c.dp_rank).unwrap()[c.sp_rank], rank);
                    assert_eq!(d.dp_group(c.sp_rank).unwrap()[c.dp_rank], rank);
                }
                // Each family of groups covers every rank exactly once.
                for groups in [d.sp_groups(), d.dp_groups()] {
                    let mut all: Vec<usize> = groups.concat();
                    all.sort_unstable();
                    assert_eq!(all, (0..world).collect::<Vec<_>>());
                }
                // sp groups are runs of contiguous ranks.
                for g in d.sp_groups() {
                    assert!(g.windows(2).all(|w| w[1] == w[0] + 1), "{g:?}");
                    assert_eq!(g.len(), sp);
                }
            }
        }
        let d = ParallelDims::new(2, 4, 8).unwrap();
        assert_eq!(d.sp_groups(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(
            d.dp_groups(),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
        );
        assert_eq!(
            d.coords(6).unwrap(),
            RankCoords {
                dp_rank: 1,
                sp_rank: 2
            }
        );
    }
}
