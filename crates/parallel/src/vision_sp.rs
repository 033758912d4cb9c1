//! MR-SP stage 1 (LongVILA-R1, "Multi-modal Reinforcement Sequence Parallelism"): the frames of
//! each video are split across the P sequence-parallel ranks, each rank runs the vision tower on
//! its share, and the merged embeddings are all-gathered in order, so every rank holds the whole
//! video's embeddings [tokens, d_lm] for its decoder pass. With an [`EmbedCache`] a video is
//! encoded once and reused by every rollout of a group and by the old-policy, reference and
//! update passes.
//!
//! Split unit: the temporal patch (one of the grid's t slices of h·w patches, T_p frames). This is
//! exact, not an approximation: in Qwen2.5-VL's tower (reel_model::vision) every token-mixing
//! operation stays inside one temporal slice —
//! - windowed attention: `VisionPlan::new` builds the windows per temporal slice (`for tt in
//!   0..g.t`, windows of merge units of that slice only), as transformers' `get_window_index`
//!   does;
//! - full-attention blocks (`fullatt_block_indexes`): their segments are `cu_seqlens`, one per
//!   temporal slice (h·w patches each), as transformers' `repeat_interleave(h·w, t)`;
//! - the 2-D RoPE uses (row, column) only, never the slice index;
//! - patch embedding, norms, MLPs and the merger (m×m spatial units) are per patch or per unit.
//!
//! So the tower over slices [a, b) of a video equals rows [a·h·w/m², b·h·w/m²) of the tower over
//! the whole video, and its parameter gradients for the matching rows of ∂L/∂features are that
//! slice's share of the whole-video gradient: summing the ranks' gradients (the trainer's
//! gradient all-reduce) gives the single-rank backward.
//!
//! Slices are split contiguously and as evenly as possible ([`temporal_split`]: rank r gets
//! ⌊r·t/P⌋..⌊(r+1)·t/P⌋; a rank may get none when t < P). The all-gather pads every rank's share
//! to the largest one. Several videos are encoded in one tower call per rank (each rank's slices
//! of every video, as separate grids).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use reel_comm::{CommError, Communicator};
use reel_model::embed_cache::{EmbedCache, EmbedKey, VideoEmbeds};
use reel_model::{CpuTower, ModelError, TowerForward, VideoGrid, VisionTower, VisionWorkspace};

/// Errors of the sequence-parallel encode.
#[derive(Debug, thiserror::Error)]
pub enum VisionSpError {
    #[error("vision tower: {0}")]
    Model(#[from] ModelError),
    #[error("vision encode communication: {0}")]
    Comm(#[from] CommError),
    #[error("vision encode: {0}")]
    Invalid(String),
    /// The pixels of a video to encode could not be had ([`SpVisionEncoder::encode_cached_with`]'s
    /// source failed: a video that does not decode).
    #[error("{0}")]
    Pixels(String),
}

/// Temporal slices [start, end) of a video of `t` slices for each of `p` ranks: contiguous,
/// in rank order, sizes differing by at most one (empty ranges when t < p).
pub fn temporal_split(t: usize, p: usize) -> Vec<Range<usize>> {
    (0..p).map(|r| r * t / p..(r + 1) * t / p).collect()
}

/// Counters of an encoder (shared by the ranks that use it).
#[derive(Debug, Default)]
pub struct EncodeCounters {
    /// Calls of the tower's forward (one per rank per encode with work on that rank).
    pub tower_forwards: AtomicU64,
    /// Videos encoded by the tower (each counted once per encode, by rank 0).
    pub videos_encoded: AtomicU64,
    /// Videos served from the cache without running the tower (counted by rank 0).
    pub videos_cached: AtomicU64,
}

/// A snapshot of [`EncodeCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStats {
    pub tower_forwards: u64,
    pub videos_encoded: u64,
    pub videos_cached: u64,
}

impl EncodeCounters {
    pub fn snapshot(&self) -> EncodeStats {
        EncodeStats {
            tower_forwards: self.tower_forwards.load(Ordering::Relaxed),
            videos_encoded: self.videos_encoded.load(Ordering::Relaxed),
            videos_cached: self.videos_cached.load(Ordering::Relaxed),
        }
    }
}

/// Where this rank's share of each video lies: (video, slice range, rows of the rank's pixels).
struct LocalPlan {
    /// Per video: this rank's temporal slices.
    slices: Vec<Range<usize>>,
    /// The grids the rank's tower call runs (non-empty shares only).
    grids: Vec<VideoGrid>,
    /// The rank's pixels, its share of each video in video order.
    pixel_rows: Vec<Range<usize>>,
}

fn local_plan(grids: &[VideoGrid], p: usize, rank: usize) -> LocalPlan {
    let mut plan = LocalPlan {
        slices: Vec::new(),
        grids: Vec::new(),
        pixel_rows: Vec::new(),
    };
    let mut base = 0;
    for g in grids {
        let s = temporal_split(g.t, p)[rank].clone();
        let per = g.h * g.w;
        if !s.is_empty() {
            plan.grids.push(VideoGrid {
                t: s.len(),
                h: g.h,
                w: g.w,
            });
            plan.pixel_rows
                .push(base + s.start * per..base + s.end * per);
        }
        plan.slices.push(s);
        base += g.patches();
    }
    plan
}

/// The sequence-parallel vision encoder of one SP group (module docs). Every rank of the group
/// calls the same methods in the same order with the same arguments (its own workspace).
#[derive(Debug, Default)]
pub struct SpVisionEncoder {
    pub counters: EncodeCounters,
}

impl SpVisionEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `grids` (pixels [Σ t·h·w, C·T_p·p·p], videos one after another) across the ranks
    /// of `comm`; returns every video's merged embeddings [Σ tokens, d_out] in order, the same on
    /// every rank. `ws` keeps this rank's activations for [`SpVisionEncoder::backward`].
    pub fn encode<C: Communicator>(
        &self,
        comm: &C,
        tower: &VisionTower,
        ws: &mut VisionWorkspace,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, VisionSpError> {
        self.encode_on(comm, &mut CpuTower { tower, ws }, pixels, grids)
    }

    /// [`Self::encode`] with the tower's forward on any [`TowerForward`] (the CPU tower, or a
    /// frozen tower's device copy); no backward follows unless it is a [`CpuTower`].
    pub fn encode_on<C: Communicator>(
        &self,
        comm: &C,
        tower: &mut dyn TowerForward,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, VisionSpError> {
        let c = tower.config().clone();
        let c = &c;
        reel_model::vision::check_grids(c, grids)?;
        let (kk, u, d) = (c.patch_len(), c.merge_unit(), c.out_hidden_size);
        let total: usize = grids.iter().map(VideoGrid::patches).sum();
        if pixels.len() != total * kk {
            return Err(VisionSpError::Invalid(format!(
                "pixel_values_videos has {} values; the grids need {total} patches of {kk}",
                pixels.len()
            )));
        }
        let (p, rank) = (comm.world_size(), comm.rank());
        let plan = local_plan(grids, p, rank);
        let mut local_pixels = Vec::new();
        for r in &plan.pixel_rows {
            local_pixels.extend_from_slice(&pixels[r.start * kk..r.end * kk]);
        }
        let local: Vec<f32> = if plan.grids.is_empty() {
            Vec::new()
        } else {
            self.counters.tower_forwards.fetch_add(1, Ordering::Relaxed);
            tower.forward_features(&local_pixels, &plan.grids)?
        };
        if rank == 0 {
            self.counters
                .videos_encoded
                .fetch_add(grids.len() as u64, Ordering::Relaxed);
        }
        // Tokens each rank holds, from the deterministic split.
        let tokens_of = |r: usize| -> usize {
            local_plan(grids, p, r)
                .grids
                .iter()
                .map(VideoGrid::patches)
                .sum::<usize>()
                / u
        };
        let max = (0..p).map(tokens_of).max().unwrap_or(0);
        let mut send = local;
        send.resize(max * d, 0.0);
        let mut recv = vec![0.0f32; p * max * d];
        comm.all_gather(&send, &mut recv)?;
        // Reassemble video by video, slice range by slice range (rank order).
        let mut out = Vec::with_capacity(total / u * d);
        let mut cursor = vec![0usize; p];
        for g in grids {
            let per = g.h * g.w / u;
            for (r, s) in temporal_split(g.t, p).iter().enumerate() {
                let n = s.len() * per;
                let at = r * max * d + cursor[r] * d;
                out.extend_from_slice(&recv[at..at + n * d]);
                cursor[r] += n;
            }
        }
        Ok(out)
    }

    /// Backward of the last [`SpVisionEncoder::encode`] on this rank: `d_features` is
    /// ∂L/∂features for all videos [Σ tokens, d_out] (every rank passes the whole, or at least
    /// correct rows for its own slices); this rank's rows run through the tower's backward and
    /// its parameter gradients accumulate into `grads`. The sum of `grads` over the ranks is the
    /// single-rank gradient.
    pub fn backward<C: Communicator>(
        &self,
        comm: &C,
        tower: &VisionTower,
        ws: &mut VisionWorkspace,
        grads: &mut [f32],
        grids: &[VideoGrid],
        d_features: &[f32],
    ) -> Result<(), VisionSpError> {
        let c = &tower.config;
        let (u, d) = (c.merge_unit(), c.out_hidden_size);
        let tokens: usize = grids.iter().map(VideoGrid::patches).sum::<usize>() / u;
        if d_features.len() != tokens * d {
            return Err(VisionSpError::Invalid(format!(
                "∂L/∂features has {} values; {tokens} tokens of width {d} need {}",
                d_features.len(),
                tokens * d
            )));
        }
        let plan = local_plan(grids, comm.world_size(), comm.rank());
        if plan.grids.is_empty() {
            return Ok(());
        }
        let mut local = Vec::new();
        let mut base = 0;
        for (g, s) in grids.iter().zip(&plan.slices) {
            let per = g.h * g.w / u;
            local.extend_from_slice(
                &d_features[(base + s.start * per) * d..(base + s.end * per) * d],
            );
            base += g.patches() / u;
        }
        tower.backward(grads, ws, &local)?;
        Ok(())
    }

    /// The embeddings of each video of `keys` (pixels and grids as in [`Self::encode`], with
    /// `seconds` per temporal patch), from `cache` where every rank of the group has them, else
    /// encoded (all missing videos in one sequence-parallel encode) and inserted. A video counts
    /// as cached only when every rank hits, so all ranks run the same collectives.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_cached<C: Communicator>(
        &self,
        comm: &C,
        tower: &VisionTower,
        ws: &mut VisionWorkspace,
        cache: &EmbedCache,
        keys: &[EmbedKey],
        pixels: &[f32],
        grids: &[VideoGrid],
        seconds: &[f32],
    ) -> Result<Vec<Arc<VideoEmbeds>>, VisionSpError> {
        let mut cpu = CpuTower { tower, ws };
        self.encode_cached_on(comm, &mut cpu, cache, keys, pixels, grids, seconds)
    }

    /// [`Self::encode_cached`] with the tower's forward on any [`TowerForward`] (see
    /// [`Self::encode_cached_with_on`]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_cached_on<C: Communicator>(
        &self,
        comm: &C,
        tower: &mut dyn TowerForward,
        cache: &EmbedCache,
        keys: &[EmbedKey],
        pixels: &[f32],
        grids: &[VideoGrid],
        seconds: &[f32],
    ) -> Result<Vec<Arc<VideoEmbeds>>, VisionSpError> {
        let kk = tower.config().patch_len();
        let mut starts = Vec::with_capacity(grids.len());
        let mut at = 0;
        for g in grids {
            starts.push(at);
            at += g.patches();
        }
        let stack = |todo: &[usize]| {
            if pixels.len() != at * kk {
                return Err(VisionSpError::Invalid(format!(
                    "pixel_values_videos has {} values; the grids need {at} patches of {kk}",
                    pixels.len()
                )));
            }
            Ok(match todo {
                [k] => {
                    Cow::Borrowed(&pixels[starts[*k] * kk..(starts[*k] + grids[*k].patches()) * kk])
                }
                _ => Cow::Owned(
                    todo.iter()
                        .flat_map(|&k| {
                            &pixels[starts[k] * kk..(starts[k] + grids[k].patches()) * kk]
                        })
                        .copied()
                        .collect(),
                ),
            })
        };
        self.encode_cached_with_on(comm, tower, cache, keys, grids, seconds, stack)
    }

    /// [`Self::encode_cached`] with the pixels asked for only when some video misses:
    /// `pixels(todo)` gives the stacked pixels of videos `todo` (indices into `keys`, in order),
    /// called on every rank with the same `todo`; an error from it (say, a video that does not
    /// decode) returns before any collective of the encode, on every rank that gets it. A loader
    /// that skipped decoding a cached video passes its pixels here for the case where the entry
    /// was evicted meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_cached_with<'p, C, P>(
        &self,
        comm: &C,
        tower: &VisionTower,
        ws: &mut VisionWorkspace,
        cache: &EmbedCache,
        keys: &[EmbedKey],
        grids: &[VideoGrid],
        seconds: &[f32],
        pixels: P,
    ) -> Result<Vec<Arc<VideoEmbeds>>, VisionSpError>
    where
        C: Communicator,
        P: FnOnce(&[usize]) -> Result<Cow<'p, [f32]>, VisionSpError>,
    {
        let mut cpu = CpuTower { tower, ws };
        self.encode_cached_with_on(comm, &mut cpu, cache, keys, grids, seconds, pixels)
    }

    /// [`Self::encode_cached_with`] with the tower's forward on any [`TowerForward`]: a frozen
    /// tower's device copy gives the same cache entries (same keys: its weights are the CPU
    /// tower's) within its storage type's rounding.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_cached_with_on<'p, C, P>(
        &self,
        comm: &C,
        tower: &mut dyn TowerForward,
        cache: &EmbedCache,
        keys: &[EmbedKey],
        grids: &[VideoGrid],
        seconds: &[f32],
        pixels: P,
    ) -> Result<Vec<Arc<VideoEmbeds>>, VisionSpError>
    where
        C: Communicator,
        P: FnOnce(&[usize]) -> Result<Cow<'p, [f32]>, VisionSpError>,
    {
        if keys.len() != grids.len() || seconds.len() != grids.len() {
            return Err(VisionSpError::Invalid(format!(
                "{} keys and {} seconds for {} videos",
                keys.len(),
                seconds.len(),
                grids.len()
            )));
        }
        let kk = tower.config().patch_len();
        let mut found = Vec::with_capacity(keys.len());
        let mut missing = vec![0.0f32; keys.len()];
        for (k, key) in keys.iter().enumerate() {
            let hit = cache.get(key)?;
            if hit.is_none() {
                missing[k] = 1.0;
            }
            found.push(hit);
        }
        comm.all_reduce_sum(&mut missing)?;
        let todo: Vec<usize> = (0..keys.len()).filter(|&k| missing[k] > 0.0).collect();
        if comm.rank() == 0 {
            self.counters
                .videos_cached
                .fetch_add((keys.len() - todo.len()) as u64, Ordering::Relaxed);
        }
        if !todo.is_empty() {
            let px = pixels(&todo)?;
            let want: usize = todo.iter().map(|&k| grids[k].patches() * kk).sum();
            if px.len() != want {
                return Err(VisionSpError::Invalid(format!(
                    "{} pixel values for the missing videos; their grids need {want}",
                    px.len()
                )));
            }
            let sub: Vec<VideoGrid> = todo.iter().map(|&k| grids[k]).collect();
            let feats = self.encode_on(comm, tower, &px, &sub)?;
            let (u, d) = (tower.config().merge_unit(), tower.config().out_hidden_size);
            let mut off = 0;
            for &k in &todo {
                let n = grids[k].patches() / u;
                let e = VideoEmbeds {
                    data: feats[off * d..(off + n) * d].to_vec(),
                    tokens: n,
                    d,
                    grid: grids[k],
                    second_per_grid_t: seconds[k],
                };
                off += n;
                found[k] = Some(cache.insert(keys[k].clone(), e)?);
            }
        }
        Ok(found
            .into_iter()
            .map(|f| f.expect("every video found or encoded"))
            .collect())
    }
}
