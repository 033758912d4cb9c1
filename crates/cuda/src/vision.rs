//! The frozen Qwen2.5-VL vision tower's forward on the GPU (`reel_model::vision`'s math, on the
//! device): [`GpuVisionTower`], and the two ops it adds to the crate, exact GELU
//! ([`Gpu::gelu_forward`], `reel_kernels::gelu`) and bidirectional attention within segments
//! ([`Gpu::segment_attention_forward`] over [`GpuSegments`]: windows, or whole frames in the
//! full-attention blocks; `reel_kernels::attention` with a full mask on each segment).
//!
//! Per chunk of temporal slices (P patches of K = C·T_p·p·p values, d the tower width, H heads
//! of D, u = m² patches per merge unit):
//! 1. on the host, the window permutation of the pixel rows and each row's 2-D RoPE angles
//!    (`VisionPlan::window_inputs`, the CPU tower's own code), uploaded as T and f32;
//! 2. patch embedding x = pixels · W_peᵀ [P, d] (cuBLASLt, f32 accumulation);
//! 3. per block: RMSNorm, qkv GEMM with bias, split, q/k turned by the per-row angles (a
//!    per-call [`GpuRopeTable`] whose row r is patch r, as `GpuQwen2` applies M-RoPE),
//!    segment attention, proj GEMM with bias + residual, RMSNorm, gate/up GEMM with bias,
//!    SwiGLU, down GEMM with bias + residual;
//! 4. merger: RMSNorm, the u rows of a merge unit read as one row [P/u, u·d], GEMM + bias,
//!    GELU, GEMM + bias → [P/u, d_out], downloaded and un-permuted on the host.
//!
//! Storage T is bf16 (the speed path; weights cast once from the f32 master copy) or f32 (the
//! CPU tower's numbers to f32 rounding); arithmetic and accumulation are f32 either way. Every
//! token-mixing op stays within one temporal slice, so the tower runs chunks of at most
//! [`GpuVisionTower::max_chunk_patches`] patches one after another and concatenates: exact, and
//! activation memory stays bounded for videos of any length. Forward only: a trained tower's
//! backward stays on the CPU.

use std::sync::Mutex;

use reel_kernels::rope::RopeTable;
use reel_model::vision::{VisionLayout, VisionPlan, VISION_NORM_EPS};
use reel_model::{ModelError, TowerForward, VideoGrid, VisionConfig, VisionTower};

use crate::buffer::{DView, DevRead, DevWrite};
use crate::ops::{as_i32, cfg, check, elementwise_grid, launch};
use crate::{shape_err, DeviceBuf, Gpu, GpuFloat, GpuRopeTable, Result};

/// Query rows of one segment-attention tile (warps per block; `SEG_WARPS` in kernels.cu).
const SEG_TILE_ROWS: usize = 8;
/// Largest head dimension the segment-attention kernel holds (`SEG_MAX_D` in kernels.cu).
pub const SEG_MAX_HEAD_DIM: usize = 128;
/// Patches per tower chunk by default (activations of a 1280-wide tower: about 1 GiB in bf16).
pub const DEFAULT_CHUNK_PATCHES: usize = 16384;

/// The segments of one attention pattern on the device: tiles of at most 8 query rows, each
/// (first row, segment start, segment end), from cumulative bounds `cu` (0 first, rows last).
pub struct GpuSegments {
    tiles: DeviceBuf<u32>,
    n_tiles: usize,
    rows: usize,
}

impl GpuSegments {
    /// Tiles of the segments `cu` bounds (strictly increasing from 0; transformers'
    /// `cu_seqlens`, `cu_window_seqlens`).
    pub fn new(gpu: &Gpu, cu: &[usize]) -> Result<Self> {
        if cu.first() != Some(&0) {
            return shape_err(format!(
                "segment bounds must start at 0 (got {:?})",
                cu.first()
            ));
        }
        let mut tiles = Vec::new();
        for w in cu.windows(2) {
            let (s, e) = (w[0], w[1]);
            if e <= s {
                return shape_err(format!(
                    "segment bounds must increase strictly ({s} then {e})"
                ));
            }
            for q0 in (s..e).step_by(SEG_TILE_ROWS) {
                for x in [q0, s, e] {
                    tiles.push(u32::try_from(x).map_err(|_| {
                        crate::GpuError::Shape(format!("segment row {x} exceeds 32 bits"))
                    })?);
                }
            }
        }
        let n_tiles = tiles.len() / 3;
        if tiles.is_empty() {
            tiles.push(0);
        }
        Ok(GpuSegments {
            tiles: gpu.upload(&tiles)?,
            n_tiles,
            rows: *cu.last().expect("checked non-empty"),
        })
    }

    /// Rows the segments cover.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

impl Gpu {
    /// Exact GELU as `reel_kernels::gelu::gelu_forward` (erf in f32 here): out = gelu(inp),
    /// same length; overwrites `out`.
    pub fn gelu_forward<T: GpuFloat>(
        &self,
        out: &mut impl DevWrite<T>,
        inp: &impl DevRead<T>,
    ) -> Result<()> {
        let n = inp.dlen();
        check("gelu_forward", "out", out.dlen(), n)?;
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let (o, i, n64) = (out.dptr(), inp.dptr(), n as i64);
        launch!(
            self,
            &self.kernels.gelu_fwd[T::INDEX],
            cfg((elementwise_grid(n), 1, 1), (256, 1, 1)),
            &o,
            &i,
            &n64
        )
    }

    /// Bidirectional attention within each segment of `segs`, as
    /// `reel_kernels::attention::attention_forward` with a full mask run on every segment
    /// alone: out [N, H, D] and lse [N, H] (f32, natural log) from q, k, v [N, H, D], scale
    /// 1/√D, f32 softmax and accumulation. D ≤ [`SEG_MAX_HEAD_DIM`]. Overwrites out and lse.
    #[allow(clippy::too_many_arguments)]
    pub fn segment_attention_forward<T: GpuFloat>(
        &self,
        out: &mut impl DevWrite<T>,
        lse: &mut impl DevWrite<f32>,
        q: &impl DevRead<T>,
        k: &impl DevRead<T>,
        v: &impl DevRead<T>,
        segs: &GpuSegments,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "segment_attention_forward";
        if head_dim == 0 || head_dim > SEG_MAX_HEAD_DIM {
            return shape_err(format!(
                "{op}: head dimension {head_dim} is outside 1..={SEG_MAX_HEAD_DIM}"
            ));
        }
        let n = segs.rows;
        for (what, len) in [
            ("q", q.dlen()),
            ("k", k.dlen()),
            ("v", v.dlen()),
            ("out", out.dlen()),
        ] {
            check(op, what, len, n * heads * head_dim)?;
        }
        check(op, "lse", lse.dlen(), n * heads)?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let h32 = as_i32(op, "heads", heads)?;
        let d32 = as_i32(op, "head_dim", head_dim)?;
        let tiles = u32::try_from(segs.n_tiles)
            .map_err(|_| crate::GpuError::Shape(format!("{op}: too many tiles")))?;
        let hy = u32::try_from(heads)
            .ok()
            .filter(|&h| h <= 65535)
            .ok_or_else(|| crate::GpuError::Shape(format!("{op}: {heads} heads > 65535")))?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        self.bind()?;
        let (o, l, qp, kp, vp, t) = (
            out.dptr(),
            lse.dptr(),
            q.dptr(),
            k.dptr(),
            v.dptr(),
            segs.tiles.ptr(),
        );
        launch!(
            self,
            &self.kernels.seg_attn_fwd[T::INDEX],
            cfg((tiles, hy, 1), ((SEG_TILE_ROWS * 32) as u32, 1, 1)),
            &o,
            &l,
            &qp,
            &kp,
            &vp,
            &t,
            &h32,
            &d32,
            &scale
        )
    }
}

/// The frozen vision tower resident on one GPU: its weights in `VisionLayout`'s flat order,
/// stored as T (bf16 or f32), and the forward of the module docs. As a [`TowerForward`] it is
/// what the MR-SP encoder runs instead of the CPU tower when a run's tower is frozen and the run
/// is on the GPU; the ranks of an in-process sequence-parallel group may share it (`&self`
/// methods; calls take turns on its stream).
pub struct GpuVisionTower<T: GpuFloat = half::bf16> {
    gpu: Gpu,
    config: VisionConfig,
    layout: VisionLayout,
    weights: DeviceBuf<T>,
    /// 2-D RoPE table of D/2 dims, as the CPU tower's.
    rope: RopeTable,
    max_chunk: usize,
    turn: Mutex<()>,
}

impl<T: GpuFloat> GpuVisionTower<T> {
    /// Uploads `tower`'s weights to `gpu` (cast to T once).
    pub fn new(gpu: Gpu, tower: &VisionTower) -> Result<Self> {
        let c = tower.config.clone();
        let hd = c.head_dim();
        if hd > SEG_MAX_HEAD_DIM {
            return shape_err(format!(
                "GpuVisionTower: head dimension {hd} exceeds the segment-attention kernel's \
                 {SEG_MAX_HEAD_DIM}"
            ));
        }
        let mut weights = gpu.alloc_zeros::<T>(tower.params.len().max(1))?;
        gpu.upload_cast(&mut weights, &tower.params)?;
        Ok(GpuVisionTower {
            rope: RopeTable::new(hd / 2, 1 << 16, c.rope_theta),
            layout: tower.layout.clone(),
            config: c,
            gpu,
            weights,
            max_chunk: DEFAULT_CHUNK_PATCHES,
            turn: Mutex::new(()),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Patches one forward chunk holds at most (whole temporal slices; a slice larger than this
    /// runs alone).
    pub fn max_chunk_patches(&self) -> usize {
        self.max_chunk
    }

    /// Sets [`Self::max_chunk_patches`] (at least 1).
    pub fn set_max_chunk_patches(&mut self, patches: usize) {
        self.max_chunk = patches.max(1);
    }

    fn w(&self, r: &std::ops::Range<usize>) -> Result<DView<'_, T>> {
        self.weights.view(r.clone())
    }

    /// Merged features [P/u, d_out] (input order, f32) of `pixels` [P, K] for `grids`: the
    /// CPU `VisionTower::forward`'s output, computed on the device chunk by chunk.
    pub fn forward(&self, pixels: &[f32], grids: &[VideoGrid]) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        reel_model::vision::check_grids(c, grids)?;
        let kk = c.patch_len();
        let total: usize = grids.iter().map(VideoGrid::patches).sum();
        if pixels.len() != total * kk {
            return Err(ModelError::Invalid(format!(
                "pixel_values_videos has {} values; the grids need {total} patches of {kk}",
                pixels.len()
            )));
        }
        if let Some(i) = pixels.iter().position(|x| !x.is_finite()) {
            return Err(ModelError::NonFinite(format!(
                "pixel_values_videos value {i} (patch {}) is not finite",
                i / kk
            )));
        }
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(total / c.merge_unit() * c.out_hidden_size);
        let gpu_err =
            |e: crate::GpuError| ModelError::Invalid(format!("vision tower on the GPU: {e}"));
        for (chunk, rows) in chunks(grids, self.max_chunk) {
            let px = &pixels[rows.start * kk..rows.end * kk];
            out.extend(self.forward_chunk(px, &chunk).map_err(gpu_err)?);
        }
        Ok(out)
    }

    /// One chunk's forward (module docs).
    fn forward_chunk(&self, pixels: &[f32], grids: &[VideoGrid]) -> Result<Vec<f32>> {
        let c = &self.config;
        let g = &self.gpu;
        let plan = VisionPlan::new(c, grids).map_err(|e| crate::GpuError::Shape(e.to_string()))?;
        let (n, kk, d, u) = (plan.patches, c.patch_len(), c.hidden_size, c.merge_unit());
        let (hd, heads, iw, d_out) = (
            c.head_dim(),
            c.num_heads,
            c.intermediate_size,
            c.out_hidden_size,
        );
        let (mut px, mut cos, mut sin) = (Vec::new(), Vec::new(), Vec::new());
        plan.window_inputs(c, &self.rope, pixels, &mut px, &mut cos, &mut sin);
        let px_t: Vec<T> = px.iter().map(|&x| T::from_f32(x)).collect();
        let px_d = g.scratch_from(&px_t)?;
        let mut table = GpuRopeTable::zeroed(g, hd, n)?;
        table.load_angles(g, &cos, &sin)?;
        let positions: Vec<u32> = (0..n as u32).collect();
        let pos_d = g.scratch_from(&positions)?;
        let windows = GpuSegments::new(g, &plan.cu_window_seqlens)?;
        let frames = GpuSegments::new(g, &plan.cu_seqlens)?;

        let mut x = g.scratch::<T>(n * d)?;
        let mut h = g.scratch::<T>(n * d)?;
        let mut xn = g.scratch::<T>(n * d)?;
        let mut qkv = g.scratch::<T>(n * 3 * d)?;
        let mut q = g.scratch::<T>(n * d)?;
        let mut k = g.scratch::<T>(n * d)?;
        let mut v = g.scratch::<T>(n * d)?;
        let mut attn = g.scratch::<T>(n * d)?;
        let mut lse = g.scratch::<f32>(n * heads)?;
        let mut rstd = g.scratch::<f32>(n)?;
        let mut gate_up = g.scratch::<T>(n * 2 * iw)?;
        let mut act = g.scratch::<T>(n * iw)?;
        let l = &self.layout;
        g.matmul_forward::<T, T>(&mut x, &px_d, &self.w(&l.patch_embed)?, None, n, kk, d)?;
        for (b, r) in l.blocks.iter().enumerate() {
            g.rmsnorm_forward(
                &mut xn,
                &mut rstd,
                &x,
                &self.w(&r.norm1)?,
                n,
                d,
                VISION_NORM_EPS,
            )?;
            let qkv_b = self.w(&r.qkv_b)?;
            g.matmul_forward::<T, T>(&mut qkv, &xn, &self.w(&r.qkv_w)?, Some(&qkv_b), n, d, 3 * d)?;
            g.split_qkv(&mut q, &mut k, &mut v, &qkv, n, d, d)?;
            g.rope_forward(&mut q, &pos_d, &table, heads)?;
            g.rope_forward(&mut k, &pos_d, &table, heads)?;
            let segs = if c.fullatt_block_indexes.contains(&b) {
                &frames
            } else {
                &windows
            };
            g.segment_attention_forward(&mut attn, &mut lse, &q, &k, &v, segs, heads, hd)?;
            let proj_b = self.w(&r.proj_b)?;
            g.matmul_forward::<T, T>(&mut h, &attn, &self.w(&r.proj_w)?, Some(&proj_b), n, d, d)?;
            g.add_inplace(&mut h, &x)?;
            g.rmsnorm_forward(
                &mut xn,
                &mut rstd,
                &h,
                &self.w(&r.norm2)?,
                n,
                d,
                VISION_NORM_EPS,
            )?;
            let gu_b = self.w(&r.gate_up_b)?;
            g.matmul_forward::<T, T>(
                &mut gate_up,
                &xn,
                &self.w(&r.gate_up_w)?,
                Some(&gu_b),
                n,
                d,
                2 * iw,
            )?;
            g.swiglu_forward(&mut act, &gate_up, n, iw)?;
            let down_b = self.w(&r.down_b)?;
            g.matmul_forward::<T, T>(&mut x, &act, &self.w(&r.down_w)?, Some(&down_b), n, iw, d)?;
            g.add_inplace(&mut x, &h)?;
        }
        // Merger: each merge unit's u consecutive rows are one row of u·d.
        let (nu, ud) = (n / u, u * d);
        g.rmsnorm_forward(
            &mut xn,
            &mut rstd,
            &x,
            &self.w(&l.ln_q)?,
            n,
            d,
            VISION_NORM_EPS,
        )?;
        let mut h0 = g.scratch::<T>(nu * ud)?;
        let mut g0 = g.scratch::<T>(nu * ud)?;
        let mut o = g.scratch::<T>(nu * d_out)?;
        let b0 = self.w(&l.mlp0_b)?;
        g.matmul_forward::<T, T>(&mut h0, &xn, &self.w(&l.mlp0_w)?, Some(&b0), nu, ud, ud)?;
        g.gelu_forward(&mut g0, &h0)?;
        let b2 = self.w(&l.mlp2_b)?;
        g.matmul_forward::<T, T>(&mut o, &g0, &self.w(&l.mlp2_w)?, Some(&b2), nu, ud, d_out)?;
        let mut o32 = g.scratch::<f32>(nu * d_out)?;
        g.to_f32(&mut o32, &o)?;
        let perm = g.download(&o32)?;
        let mut out = Vec::new();
        plan.unpermute(&perm, d_out, &mut out);
        Ok(out)
    }
}

/// The grids cut into chunks of whole temporal slices, at most `max` patches each (a slice
/// larger than `max` alone), with the pixel rows each chunk covers; in input order.
fn chunks(grids: &[VideoGrid], max: usize) -> Vec<(Vec<VideoGrid>, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let (mut cur, mut start, mut at) = (Vec::<VideoGrid>::new(), 0usize, 0usize);
    for g in grids {
        let per = g.h * g.w;
        let mut t = 0;
        while t < g.t {
            let used = at - start;
            let room = max.saturating_sub(used) / per;
            if room == 0 && used > 0 {
                out.push((std::mem::take(&mut cur), start..at));
                start = at;
                continue;
            }
            let take = room.max(1).min(g.t - t);
            cur.push(VideoGrid {
                t: take,
                h: g.h,
                w: g.w,
            });
            t += take;
            at += take * per;
        }
    }
    if !cur.is_empty() {
        out.push((cur, start..at));
    }
    out
}

impl<T: GpuFloat> TowerForward for GpuVisionTower<T> {
    fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn forward_features(
        &mut self,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, ModelError> {
        self.forward(pixels, grids)
    }
}

/// A shared tower as a [`TowerForward`] (the ranks of an in-process group each hold one).
impl<T: GpuFloat> TowerForward for &GpuVisionTower<T> {
    fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn forward_features(
        &mut self,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, ModelError> {
        GpuVisionTower::forward(self, pixels, grids)
    }
}

// The ranks of an in-process group share one tower (`&GpuVisionTower` across threads).
const _: fn() = || {
    fn sync_send<X: Sync + Send>() {}
    sync_send::<GpuVisionTower>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_slice_in_order() {
        let grids = [
            VideoGrid { t: 5, h: 4, w: 6 },
            VideoGrid { t: 1, h: 2, w: 2 },
            VideoGrid { t: 3, h: 6, w: 4 },
        ];
        for max in [1usize, 24, 50, 100, 1000] {
            let cs = chunks(&grids, max);
            let mut at = 0;
            let mut per_video: Vec<(usize, usize, usize)> = Vec::new();
            for (gs, rows) in &cs {
                assert_eq!(rows.start, at, "max {max}");
                let n: usize = gs.iter().map(VideoGrid::patches).sum();
                assert_eq!(rows.len(), n, "max {max}");
                // A chunk exceeds `max` only when it is one slice.
                assert!(
                    n <= max || (gs.len() == 1 && gs[0].t == 1),
                    "max {max}: {gs:?}"
                );
                at = rows.end;
                for g in gs {
                    per_video.push((g.t, g.h, g.w));
                }
            }
            assert_eq!(at, grids.iter().map(VideoGrid::patches).sum::<usize>());
            // Slices of the same video size add up, in order.
            let mut merged: Vec<(usize, usize, usize)> = Vec::new();
            let mut bounds = vec![5usize, 1, 3].into_iter();
            let mut want = bounds.next();
            let mut acc = 0;
            for (t, h, w) in per_video {
                acc += t;
                if Some(acc) == want {
                    merged.push((acc, h, w));
                    acc = 0;
                    want = bounds.next();
                }
            }
            let expect: Vec<_> = grids.iter().map(|g| (g.t, g.h, g.w)).collect();
            assert_eq!(merged, expect, "max {max}");
        }
        assert!(chunks(&[], 10).is_empty());
    }
}
