//! The Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`) with
//! explicit forward and backward.
//!
//! Input: the patches of one or more videos, P rows of K = C·T_p·p·p values (the order in which
//! the processor flattens `pixel_values_videos`), and each video's grid (t, h, w) in patches, with
//! h and w multiples of the spatial merge size m (u = m² patches per merge unit). Per video and
//! frame, patches come merge block by merge block (row-major blocks, row-major inside a block).
//!
//! 1. Patch embedding: the Conv3d with kernel = stride = [T_p, p, p] and no bias is a linear map
//!    of each flattened patch: x = pixels · W_peᵀ, [P, d].
//! 2. Window order: merge units are permuted so each attention window (window_size pixels a side,
//!    i.e. window_size / m / p merge units) is contiguous (`window_index`, exactly as transformers
//!    computes it, windows padded at the bottom/right edges); `cu_window_seqlens` bounds them.
//! 3. Blocks (depth of them): x += proj(attn(rope(qkv(rmsnorm(x))))), x += down(silu(gate)·up)
//!    with biases everywhere; attention is bidirectional within each segment: windows, or whole
//!    frames (`cu_seqlens`) at the `fullatt_block_indexes`. 2-D RoPE: head dims [0, D/4) turn with
//!    the patch's row, [D/4, D/2) with its column (frequencies of a D/2-dim table), rotate_half
//!    layout.
//! 4. Merger: ln_q RMSNorm, each merge unit's u rows concatenated [P/u, u·d], Linear-GELU-Linear to
//!    the LM width, then the window permutation undone: output [P/u, d_out] in the input order.
//!
//! Every RMSNorm here uses eps 1e-6 (transformers hard-codes it for the vision tower).

use crate::model::{add_into, two_mut};
use crate::params::{Builder, ParamEntry};
use crate::ModelError;
use rayon::prelude::*;
use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};
use reel_kernels::gelu::{gelu_backward, gelu_forward};
use reel_kernels::matmul::{matmul_backward, matmul_forward};
use reel_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use reel_kernels::rope::{rope_backward_angles, rope_forward_angles, RopeTable};
use reel_kernels::swiglu::{swiglu_backward, swiglu_forward};
use serde_json::{json, Value};
use std::ops::Range;

/// RMSNorm epsilon of every vision norm.
pub const VISION_NORM_EPS: f32 = 1e-6;

/// Hyper-parameters of the vision tower (HF `vision_config`). Defaults are transformers 5.17's.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Number of blocks (default 32).
    pub depth: usize,
    /// Width d of the tower (default 3584; the published 3B/7B checkpoints use 1280).
    pub hidden_size: usize,
    /// SwiGLU MLP width (default 3420).
    pub intermediate_size: usize,
    /// Attention heads; head size D = hidden_size / num_heads, a multiple of 4 (default 16).
    pub num_heads: usize,
    /// Colour channels C (default 3; `in_chans` in older configs).
    pub in_channels: usize,
    /// Patch side p in pixels (default 14).
    pub patch_size: usize,
    /// Side m of the square of patches the merger concatenates (default 2).
    pub spatial_merge_size: usize,
    /// Frames per patch T_p (default 2).
    pub temporal_patch_size: usize,
    /// Temporal rotary positions per second of video for the LM's M-RoPE (default 4).
    pub tokens_per_second: usize,
    /// Attention window side in pixels (default 112).
    pub window_size: usize,
    /// Output width: the LM's hidden size (default 3584).
    pub out_hidden_size: usize,
    /// Blocks that attend over whole frames instead of windows (default [7, 15, 23, 31]).
    pub fullatt_block_indexes: Vec<usize>,
    /// 2-D RoPE base (`rope_parameters.rope_theta`, default 10000).
    pub rope_theta: f32,
}

impl VisionConfig {
    /// A small config for tests.
    pub fn tiny() -> Self {
        VisionConfig {
            depth: 4,
            hidden_size: 32,
            intermediate_size: 48,
            num_heads: 2,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            tokens_per_second: 2,
            window_size: 56,
            out_hidden_size: 64,
            fullatt_block_indexes: vec![1, 3],
            rope_theta: 10000.0,
        }
    }

    /// Parses an HF `vision_config` object (transformers 4 and 5 spellings).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let get = |k: &str, default: usize| -> Result<usize, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| format!("vision_config.{k} must be a non-negative integer")),
            }
        };
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(format!(
                    "vision_config.hidden_act `{act}` is not supported (expected silu)"
                ));
            }
        }
        let in_channels = match v.get("in_channels") {
            Some(_) => get("in_channels", 3)?,
            None => get("in_chans", 3)?,
        };
        let fullatt_block_indexes = match v.get("fullatt_block_indexes") {
            None | Some(Value::Null) => vec![7, 15, 23, 31],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or("vision_config.fullatt_block_indexes must be a list of integers")?,
            Some(_) => return Err("vision_config.fullatt_block_indexes must be a list".into()),
        };
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0) as f32;
        let c = VisionConfig {
            depth: get("depth", 32)?,
            hidden_size: get("hidden_size", 3584)?,
            intermediate_size: get("intermediate_size", 3420)?,
            num_heads: get("num_heads", 16)?,
            in_channels,
            patch_size: get("patch_size", 14)?,
            spatial_merge_size: get("spatial_merge_size", 2)?,
            temporal_patch_size: get("temporal_patch_size", 2)?,
            tokens_per_second: get("tokens_per_second", 4)?,
            window_size: get("window_size", 112)?,
            out_hidden_size: get("out_hidden_size", 3584)?,
            fullatt_block_indexes,
            rope_theta,
        };
        c.validate()?;
        Ok(c)
    }

    /// The HF `vision_config` object.
    pub fn to_json(&self) -> Value {
        json!({
            "model_type": "qwen2_5_vl_vision",
            "depth": self.depth,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "in_channels": self.in_channels,
            "in_chans": self.in_channels,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "out_hidden_size": self.out_hidden_size,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "tokens_per_second": self.tokens_per_second,
            "window_size": self.window_size,
            "fullatt_block_indexes": self.fullatt_block_indexes,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        })
    }

    /// Checks the dimensions fit together.
    pub fn validate(&self) -> Result<(), String> {
        for (name, x) in [
            ("depth", self.depth),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("spatial_merge_size", self.spatial_merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("out_hidden_size", self.out_hidden_size),
        ] {
            if x == 0 {
                return Err(format!("vision_config.{name} must be positive"));
            }
            if x > 1 << 20 {
                return Err(format!(
                    "vision_config.{name} ({x}) is larger than reel supports (2^20)"
                ));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads)
            || !(self.hidden_size / self.num_heads).is_multiple_of(4)
        {
            return Err(format!(
                "vision_config: hidden_size ({}) / num_heads ({}) must be a whole multiple of 4 \
                 (2-D RoPE splits each head in four)",
                self.hidden_size, self.num_heads
            ));
        }
        if self.window_size < self.spatial_merge_size * self.patch_size {
            return Err(format!(
                "vision_config.window_size ({}) must be at least spatial_merge_size · patch_size ({})",
                self.window_size,
                self.spatial_merge_size * self.patch_size
            ));
        }
        if let Some(&i) = self
            .fullatt_block_indexes
            .iter()
            .find(|&&i| i >= self.depth)
        {
            return Err(format!(
                "vision_config.fullatt_block_indexes names block {i}; depth is {}",
                self.depth
            ));
        }
        Ok(())
    }

    /// Head size D.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per flattened patch: C·T_p·p·p.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches per merge unit: m².
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Merge units per window side.
    pub fn window_units(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }
}

/// One video's grid in patches: t temporal patches, h rows, w columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VideoGrid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl VideoGrid {
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }
}

/// The ranges of one block's weights (gate/up weights and biases fused, each HF tensor still
/// one contiguous range).
#[derive(Clone, Debug)]
pub struct BlockRanges {
    pub norm1: Range<usize>,
    pub qkv_w: Range<usize>,
    pub qkv_b: Range<usize>,
    pub proj_w: Range<usize>,
    pub proj_b: Range<usize>,
    pub norm2: Range<usize>,
    pub gate_up_w: Range<usize>,
    pub gate_up_b: Range<usize>,
    pub down_w: Range<usize>,
    pub down_b: Range<usize>,
}

/// Where every vision weight lives in the tower's flat buffer (names as HF saves them).
#[derive(Clone, Debug)]
pub struct VisionLayout {
    pub entries: Vec<ParamEntry>,
    pub patch_embed: Range<usize>,
    pub blocks: Vec<BlockRanges>,
    pub ln_q: Range<usize>,
    pub mlp0_w: Range<usize>,
    pub mlp0_b: Range<usize>,
    pub mlp2_w: Range<usize>,
    pub mlp2_b: Range<usize>,
    total: usize,
}

impl VisionLayout {
    pub fn new(c: &VisionConfig) -> Self {
        let (d, i, u) = (c.hidden_size, c.intermediate_size, c.merge_unit());
        let mut b = Builder::default();
        let patch_embed = b.push(
            "visual.patch_embed.proj.weight".into(),
            vec![
                d,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
        );
        let mut blocks = Vec::with_capacity(c.depth);
        for l in 0..c.depth {
            let p = format!("visual.blocks.{l}");
            let norm1 = b.push(format!("{p}.norm1.weight"), vec![d]);
            let qkv_w = b.push(format!("{p}.attn.qkv.weight"), vec![3 * d, d]);
            let qkv_b = b.push(format!("{p}.attn.qkv.bias"), vec![3 * d]);
            let proj_w = b.push(format!("{p}.attn.proj.weight"), vec![d, d]);
            let proj_b = b.push(format!("{p}.attn.proj.bias"), vec![d]);
            let norm2 = b.push(format!("{p}.norm2.weight"), vec![d]);
            let g = b.push(format!("{p}.mlp.gate_proj.weight"), vec![i, d]);
            let u_ = b.push(format!("{p}.mlp.up_proj.weight"), vec![i, d]);
            let gb = b.push(format!("{p}.mlp.gate_proj.bias"), vec![i]);
            let ub = b.push(format!("{p}.mlp.up_proj.bias"), vec![i]);
            let down_w = b.push(format!("{p}.mlp.down_proj.weight"), vec![d, i]);
            let down_b = b.push(format!("{p}.mlp.down_proj.bias"), vec![d]);
            blocks.push(BlockRanges {
                norm1,
                qkv_w,
                qkv_b,
                proj_w,
                proj_b,
                norm2,
                gate_up_w: g.start..u_.end,
                gate_up_b: gb.start..ub.end,
                down_w,
                down_b,
            });
        }
        let ln_q = b.push("visual.merger.ln_q.weight".into(), vec![d]);
        let mlp0_w = b.push("visual.merger.mlp.0.weight".into(), vec![u * d, u * d]);
        let mlp0_b = b.push("visual.merger.mlp.0.bias".into(), vec![u * d]);
        let mlp2_w = b.push(
            "visual.merger.mlp.2.weight".into(),
            vec![c.out_hidden_size, u * d],
        );
        let mlp2_b = b.push("visual.merger.mlp.2.bias".into(), vec![c.out_hidden_size]);
        VisionLayout {
            entries: b.entries,
            patch_embed,
            blocks,
            ln_q,
            mlp0_w,
            mlp0_b,
            mlp2_w,
            mlp2_b,
            total: b.offset,
        }
    }

    /// Number of f32 values in the flat buffer.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn entry(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// The token geometry of a set of videos: window permutation, attention segments, 2-D positions.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionPlan {
    /// Total patches P.
    pub patches: usize,
    /// Window order of merge units: unit i of the permuted sequence is unit window_index[i] of
    /// the input (transformers' `window_index`).
    pub window_index: Vec<usize>,
    /// Window boundaries in patches, 0 first (transformers' `cu_window_seqlens`, duplicates
    /// removed).
    pub cu_window_seqlens: Vec<usize>,
    /// Frame boundaries in patches, 0 first (`cu_seqlens`).
    pub cu_seqlens: Vec<usize>,
    /// (row, column) of every patch in input order.
    pub pos_hw: Vec<(u32, u32)>,
}

impl VisionPlan {
    /// Checks the grids against the config and lays out windows, segments and positions.
    pub fn new(c: &VisionConfig, grids: &[VideoGrid]) -> Result<Self, ModelError> {
        let m = c.spatial_merge_size;
        let u = c.merge_unit();
        let ws = c.window_units();
        let mut plan = VisionPlan {
            patches: 0,
            window_index: Vec::new(),
            cu_window_seqlens: vec![0],
            cu_seqlens: vec![0],
            pos_hw: Vec::new(),
        };
        let mut base = 0usize;
        check_grids(c, grids)?;
        for g in grids {
            let (lh, lw) = (g.h / m, g.w / m);
            let pad_h = ws - lh % ws;
            let pad_w = ws - lw % ws;
            let (nwh, nww) = ((lh + pad_h) / ws, (lw + pad_w) / ws);
            for tt in 0..g.t {
                for wy in 0..nwh {
                    for wx in 0..nww {
                        let mut count = 0;
                        for i in 0..ws {
                            for j in 0..ws {
                                let (y, x) = (wy * ws + i, wx * ws + j);
                                if y < lh && x < lw {
                                    plan.window_index.push(base + (tt * lh + y) * lw + x);
                                    count += 1;
                                }
                            }
                        }
                        let last = *plan.cu_window_seqlens.last().expect("starts with 0");
                        if count > 0 {
                            plan.cu_window_seqlens.push(last + count * u);
                        }
                    }
                }
                let last = *plan.cu_seqlens.last().expect("starts with 0");
                plan.cu_seqlens.push(last + g.h * g.w);
                for bh in 0..lh {
                    for bw in 0..lw {
                        for i in 0..m {
                            for j in 0..m {
                                plan.pos_hw.push(((bh * m + i) as u32, (bw * m + j) as u32));
                            }
                        }
                    }
                }
            }
            base += g.t * lh * lw;
            plan.patches += g.patches();
        }
        Ok(plan)
    }

    /// Input patch row of permuted row r (u patches per merge unit).
    pub fn source_row(&self, r: usize, u: usize) -> usize {
        self.window_index[r / u] * u + r % u
    }

    /// The tower's inputs in window order: `px` [P, K] the rows of `pixels` [P, K] permuted, and
    /// each permuted row's 2-D RoPE angles `cos`, `sin` [P, D/2] (dims [0, D/4) from its row,
    /// [D/4, D/2) from its column, out of `rope`, a table of D/2 dims). Overwrites all three.
    pub fn window_inputs(
        &self,
        c: &VisionConfig,
        rope: &RopeTable,
        pixels: &[f32],
        px: &mut Vec<f32>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let (n, kk, u, hd) = (self.patches, c.patch_len(), c.merge_unit(), c.head_dim());
        let q4 = hd / 4;
        px.resize(n * kk, 0.0);
        cos.resize(n * hd / 2, 0.0);
        sin.resize(n * hd / 2, 0.0);
        for r in 0..n {
            let src = self.source_row(r, u);
            px[r * kk..(r + 1) * kk].copy_from_slice(&pixels[src * kk..(src + 1) * kk]);
            let (y, x) = self.pos_hw[src];
            let (cy, sy) = rope.row(y as usize);
            let (cx, sx) = rope.row(x as usize);
            let cr = &mut cos[r * hd / 2..(r + 1) * hd / 2];
            cr[..q4].copy_from_slice(cy);
            cr[q4..].copy_from_slice(cx);
            let sr = &mut sin[r * hd / 2..(r + 1) * hd / 2];
            sr[..q4].copy_from_slice(sy);
            sr[q4..].copy_from_slice(sx);
        }
    }

    /// Undoes the window permutation of merged rows: `out` [P/u, d_out] in input order from
    /// `perm` [P/u, d_out] in window order. Overwrites `out`.
    pub fn unpermute(&self, perm: &[f32], d_out: usize, out: &mut Vec<f32>) {
        out.resize(self.window_index.len() * d_out, 0.0);
        for (i, &src) in self.window_index.iter().enumerate() {
            out[src * d_out..(src + 1) * d_out].copy_from_slice(&perm[i * d_out..(i + 1) * d_out]);
        }
    }
}

/// The frozen tower's forward as the MR-SP encoder runs it: the merged features [P/u, d_out]
/// (input order) of pixels [P, C·T_p·p·p] laid out by `grids`. Implemented by the CPU tower with
/// its workspace ([`CpuTower`]) and by reel-cuda's device copy of the weights (`GpuVisionTower`);
/// both give the same numbers within their storage type's rounding.
pub trait TowerForward {
    /// The tower's hyper-parameters.
    fn config(&self) -> &VisionConfig;
    /// Merged features [P/u, d_out] of `pixels` for `grids`.
    fn forward_features(
        &mut self,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, ModelError>;
}

/// The CPU tower as a [`TowerForward`]: `ws` keeps the activations, so a trained tower's
/// backward can follow.
pub struct CpuTower<'a> {
    pub tower: &'a VisionTower,
    pub ws: &'a mut VisionWorkspace,
}

impl TowerForward for CpuTower<'_> {
    fn config(&self) -> &VisionConfig {
        &self.tower.config
    }

    fn forward_features(
        &mut self,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, ModelError> {
        Ok(self.tower.forward(self.ws, pixels, grids)?.to_vec())
    }
}

/// Checks every grid: positive, h and w multiples of the merge size, within reel's limits.
pub fn check_grids(c: &VisionConfig, grids: &[VideoGrid]) -> Result<(), ModelError> {
    let m = c.spatial_merge_size;
    for (k, g) in grids.iter().enumerate() {
        if g.t == 0 || g.h == 0 || g.w == 0 || g.h % m != 0 || g.w % m != 0 {
            return Err(ModelError::Invalid(format!(
                "video {k}: grid (t {}, h {}, w {}) must be positive with h and w multiples \
                 of spatial_merge_size {m}",
                g.t, g.h, g.w
            )));
        }
        if g.h.max(g.w) > 1 << 16 || g.patches() > 1 << 26 {
            return Err(ModelError::Invalid(format!(
                "video {k}: grid (t {}, h {}, w {}) is larger than reel supports",
                g.t, g.h, g.w
            )));
        }
    }
    Ok(())
}

/// One block's activations (everything its backward reads).
#[derive(Default)]
struct BlockActs {
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    h: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// The tower's step buffers, reused across steps (resized within capacity).
#[derive(Default)]
pub struct VisionWorkspace {
    plan: Option<VisionPlan>,
    /// Patches in window order [P, K].
    pixels: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    blocks: Vec<BlockActs>,
    qkv: Vec<f32>,
    /// Residual stream after the last block [P, d].
    x_last: Vec<f32>,
    rstd_m: Vec<f32>,
    xn_m: Vec<f32>,
    h0: Vec<f32>,
    g0: Vec<f32>,
    out_perm: Vec<f32>,
    /// Merged features in input order [P/u, d_out].
    out: Vec<f32>,
    // Backward scratch.
    dx: [Vec<f32>; 2],
    dperm: Vec<f32>,
    dg0: Vec<f32>,
    dh0: Vec<f32>,
    dxn: Vec<f32>,
    dh: Vec<f32>,
    dattn: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dqkv: Vec<f32>,
    dact: Vec<f32>,
    dgate_up: Vec<f32>,
}

impl VisionWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan of the last forward.
    pub fn plan(&self) -> Option<&VisionPlan> {
        self.plan.as_ref()
    }
}

/// The vision tower with its weights in one flat f32 buffer.
pub struct VisionTower {
    pub config: VisionConfig,
    pub layout: VisionLayout,
    pub params: Vec<f32>,
    /// cos/sin of the 2-D RoPE: a table of D/2 dims (D/4 frequencies) over row/column indices.
    rope: RopeTable,
}

/// One segment of self-attention: len tokens, `heads` heads of size `hd` (no GQA in the tower).
fn segment_shape(len: usize, heads: usize, hd: usize) -> AttnShape {
    AttnShape {
        b: 1,
        tq: len,
        tk: len,
        h: heads,
        h_kv: heads,
        d: hd,
    }
}

/// Splits rows of `width` values into the segments `cu` bounds (cu[0] = 0, last = all rows).
fn split_rows<'a>(mut x: &'a mut [f32], cu: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(cu.len().saturating_sub(1));
    for (s, e) in segments(cu) {
        let (head, tail) = std::mem::take(&mut x).split_at_mut((e - s) * width);
        out.push(head);
        x = tail;
    }
    out
}

/// Segment bounds [start, end) from cumulative lengths.
fn segments(cu: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    cu.windows(2).map(|w| (w[0], w[1]))
}

impl VisionTower {
    /// A tower with the given weights; the length must match the config's layout.
    pub fn from_params(config: VisionConfig, params: Vec<f32>) -> Result<Self, ModelError> {
        config
            .validate()
            .map_err(|msg| ModelError::Invalid(format!("config: {msg}")))?;
        let layout = VisionLayout::new(&config);
        if params.len() != layout.total() {
            return Err(ModelError::Invalid(format!(
                "vision parameter buffer has {} values, config needs {}",
                params.len(),
                layout.total()
            )));
        }
        let rope = RopeTable::new(config.head_dim() / 2, 1 << 16, config.rope_theta);
        Ok(VisionTower {
            config,
            layout,
            params,
            rope,
        })
    }

    /// Number of merged output tokens for these grids: Σ t·h·w / m².
    pub fn output_tokens(&self, grids: &[VideoGrid]) -> usize {
        grids.iter().map(VideoGrid::patches).sum::<usize>() / self.config.merge_unit()
    }

    /// Forward over the patches of `grids` (pixels [P, K]); returns the merged features
    /// [P/u, d_out] in input order, keeping every activation for [`VisionTower::backward`].
    pub fn forward<'w>(
        &self,
        ws: &'w mut VisionWorkspace,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<&'w [f32], ModelError> {
        let c = &self.config;
        let plan = VisionPlan::new(c, grids)?;
        let (n, kk, d, u) = (plan.patches, c.patch_len(), c.hidden_size, c.merge_unit());
        if pixels.len() != n * kk {
            return Err(ModelError::Invalid(format!(
                "pixel_values_videos has {} values; the grids need {n} patches of {kk}",
                pixels.len()
            )));
        }
        if let Some(i) = pixels.iter().position(|x| !x.is_finite()) {
            return Err(ModelError::NonFinite(format!(
                "pixel_values_videos value {i} (patch {}) is not finite",
                i / kk
            )));
        }
        let (hd, i_w, d_out) = (c.head_dim(), c.intermediate_size, c.out_hidden_size);
        let heads = c.num_heads;
        let p = &self.params;
        // Patches and angles in window order.
        plan.window_inputs(
            c,
            &self.rope,
            pixels,
            &mut ws.pixels,
            &mut ws.cos,
            &mut ws.sin,
        );
        ws.blocks.resize_with(c.depth, BlockActs::default);
        ws.qkv.resize(n * 3 * d, 0.0);
        let mut x = std::mem::take(&mut ws.x_last);
        x.resize(n * d, 0.0);
        matmul_forward(
            &mut x,
            &ws.pixels,
            &p[self.layout.patch_embed.clone()],
            None,
            n,
            kk,
            d,
        );
        for (l, r) in self.layout.blocks.iter().enumerate() {
            let a = &mut ws.blocks[l];
            a.x_in.clear();
            a.x_in.extend_from_slice(&x);
            for (buf, len) in [
                (&mut a.rstd1, n),
                (&mut a.xn1, n * d),
                (&mut a.q, n * d),
                (&mut a.k, n * d),
                (&mut a.v, n * d),
                (&mut a.attn, n * d),
                (&mut a.lse, n * heads),
                (&mut a.h, n * d),
                (&mut a.rstd2, n),
                (&mut a.xn2, n * d),
                (&mut a.gate_up, n * 2 * i_w),
                (&mut a.act, n * i_w),
            ] {
                buf.resize(len, 0.0);
            }
            rmsnorm_forward(
                &mut a.xn1,
                &mut a.rstd1,
                &a.x_in,
                &p[r.norm1.clone()],
                n,
                d,
                VISION_NORM_EPS,
            );
            matmul_forward(
                &mut ws.qkv,
                &a.xn1,
                &p[r.qkv_w.clone()],
                Some(&p[r.qkv_b.clone()]),
                n,
                d,
                3 * d,
            );
            for (row, src) in ws.qkv.chunks_exact(3 * d).enumerate() {
                a.q[row * d..(row + 1) * d].copy_from_slice(&src[..d]);
                a.k[row * d..(row + 1) * d].copy_from_slice(&src[d..2 * d]);
                a.v[row * d..(row + 1) * d].copy_from_slice(&src[2 * d..]);
            }
            rope_forward_angles(&mut a.q, &ws.cos, &ws.sin, heads, hd);
            rope_forward_angles(&mut a.k, &ws.cos, &ws.sin, heads, hd);
            let cu = if c.fullatt_block_indexes.contains(&l) {
                &plan.cu_seqlens
            } else {
                &plan.cu_window_seqlens
            };
            // Segments are independent: run them in parallel (each is often one tile).
            let (outs, lses) = (
                split_rows(&mut a.attn, cu, d),
                split_rows(&mut a.lse, cu, heads),
            );
            let (q, k, v) = (&a.q, &a.k, &a.v);
            outs.into_par_iter()
                .zip(lses)
                .zip(segments(cu).collect::<Vec<_>>())
                .for_each(|((out, lse), (s, e))| {
                    attention_forward(
                        out,
                        lse,
                        &q[s * d..e * d],
                        &k[s * d..e * d],
                        &v[s * d..e * d],
                        segment_shape(e - s, heads, hd),
                        AttnMask::Full,
                    );
                });
            matmul_forward(
                &mut a.h,
                &a.attn,
                &p[r.proj_w.clone()],
                Some(&p[r.proj_b.clone()]),
                n,
                d,
                d,
            );
            add_into(&mut a.h, &a.x_in);
            rmsnorm_forward(
                &mut a.xn2,
                &mut a.rstd2,
                &a.h,
                &p[r.norm2.clone()],
                n,
                d,
                VISION_NORM_EPS,
            );
            matmul_forward(
                &mut a.gate_up,
                &a.xn2,
                &p[r.gate_up_w.clone()],
                Some(&p[r.gate_up_b.clone()]),
                n,
                d,
                2 * i_w,
            );
            swiglu_forward(&mut a.act, &a.gate_up, n, i_w);
            matmul_forward(
                &mut x,
                &a.act,
                &p[r.down_w.clone()],
                Some(&p[r.down_b.clone()]),
                n,
                i_w,
                d,
            );
            add_into(&mut x, &a.h);
        }
        // Merger.
        let (nu, ud) = (n / u, u * d);
        ws.rstd_m.resize(n, 0.0);
        ws.xn_m.resize(n * d, 0.0);
        ws.h0.resize(nu * ud, 0.0);
        ws.g0.resize(nu * ud, 0.0);
        ws.out_perm.resize(nu * d_out, 0.0);
        rmsnorm_forward(
            &mut ws.xn_m,
            &mut ws.rstd_m,
            &x,
            &p[self.layout.ln_q.clone()],
            n,
            d,
            VISION_NORM_EPS,
        );
        matmul_forward(
            &mut ws.h0,
            &ws.xn_m,
            &p[self.layout.mlp0_w.clone()],
            Some(&p[self.layout.mlp0_b.clone()]),
            nu,
            ud,
            ud,
        );
        gelu_forward(&mut ws.g0, &ws.h0);
        matmul_forward(
            &mut ws.out_perm,
            &ws.g0,
            &p[self.layout.mlp2_w.clone()],
            Some(&p[self.layout.mlp2_b.clone()]),
            nu,
            ud,
            d_out,
        );
        plan.unpermute(&ws.out_perm, d_out, &mut ws.out);
        ws.x_last = x;
        ws.plan = Some(plan);
        Ok(&ws.out)
    }

    /// Backward of the last [`VisionTower::forward`] given ∂L/∂features [P/u, d_out] (input
    /// order); parameter gradients accumulate into `grads` (this tower's layout).
    pub fn backward(
        &self,
        grads: &mut [f32],
        ws: &mut VisionWorkspace,
        d_features: &[f32],
    ) -> Result<(), ModelError> {
        let plan = ws
            .plan
            .take()
            .ok_or_else(|| ModelError::Invalid("vision backward needs its forward first".into()))?;
        let res = self.backward_with(grads, ws, &plan, d_features);
        ws.plan = Some(plan);
        res
    }

    fn backward_with(
        &self,
        grads: &mut [f32],
        ws: &mut VisionWorkspace,
        plan: &VisionPlan,
        d_features: &[f32],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (n, kk, d, u) = (plan.patches, c.patch_len(), c.hidden_size, c.merge_unit());
        let (hd, i_w, d_out, heads) = (
            c.head_dim(),
            c.intermediate_size,
            c.out_hidden_size,
            c.num_heads,
        );
        let (nu, ud) = (n / u, u * d);
        if d_features.len() != nu * d_out {
            return Err(ModelError::Invalid(format!(
                "vision feature gradient has {} values, expected {nu}·{d_out}",
                d_features.len()
            )));
        }
        if grads.len() != self.params.len() {
            return Err(ModelError::Invalid(format!(
                "vision gradient buffer has {} values, the tower {}",
                grads.len(),
                self.params.len()
            )));
        }
        let p = &self.params;
        let lay = &self.layout;
        // Merger, in window order.
        ws.dperm.resize(nu * d_out, 0.0);
        for (i, &src) in plan.window_index.iter().enumerate() {
            ws.dperm[i * d_out..(i + 1) * d_out]
                .copy_from_slice(&d_features[src * d_out..(src + 1) * d_out]);
        }
        ws.dg0.resize(nu * ud, 0.0);
        ws.dh0.resize(nu * ud, 0.0);
        ws.dxn.resize(n * d, 0.0);
        for b in &mut ws.dx {
            b.resize(n * d, 0.0);
        }
        {
            let (gw, gb) = two_mut(grads, lay.mlp2_w.clone(), lay.mlp2_b.clone());
            matmul_backward(
                Some(&mut ws.dg0),
                gw,
                Some(gb),
                &ws.dperm,
                &ws.g0,
                &p[lay.mlp2_w.clone()],
                nu,
                ud,
                d_out,
            );
        }
        gelu_backward(&mut ws.dh0, &ws.dg0, &ws.h0);
        {
            let (gw, gb) = two_mut(grads, lay.mlp0_w.clone(), lay.mlp0_b.clone());
            matmul_backward(
                Some(&mut ws.dxn),
                gw,
                Some(gb),
                &ws.dh0,
                &ws.xn_m,
                &p[lay.mlp0_w.clone()],
                nu,
                ud,
                ud,
            );
        }
        let [dx_a, dx_b] = &mut ws.dx;
        rmsnorm_backward(
            dx_a,
            &mut grads[lay.ln_q.clone()],
            &ws.dxn,
            &ws.x_last,
            &p[lay.ln_q.clone()],
            &ws.rstd_m,
            n,
            d,
        );
        let (mut dx_cur, mut dx_next) = (dx_a, dx_b);
        for buf in [
            &mut ws.dh,
            &mut ws.dattn,
            &mut ws.dq,
            &mut ws.dk,
            &mut ws.dv,
        ] {
            buf.resize(n * d, 0.0);
        }
        ws.dqkv.resize(n * 3 * d, 0.0);
        ws.dact.resize(n * i_w, 0.0);
        ws.dgate_up.resize(n * 2 * i_w, 0.0);
        for (l, r) in lay.blocks.iter().enumerate().rev() {
            let a = &ws.blocks[l];
            // MLP.
            {
                let (gw, gb) = two_mut(grads, r.down_w.clone(), r.down_b.clone());
                matmul_backward(
                    Some(&mut ws.dact),
                    gw,
                    Some(gb),
                    dx_cur,
                    &a.act,
                    &p[r.down_w.clone()],
                    n,
                    i_w,
                    d,
                );
            }
            swiglu_backward(&mut ws.dgate_up, &ws.dact, &a.gate_up, n, i_w);
            {
                let (gw, gb) = two_mut(grads, r.gate_up_w.clone(), r.gate_up_b.clone());
                matmul_backward(
                    Some(&mut ws.dxn),
                    gw,
                    Some(gb),
                    &ws.dgate_up,
                    &a.xn2,
                    &p[r.gate_up_w.clone()],
                    n,
                    d,
                    2 * i_w,
                );
            }
            rmsnorm_backward(
                &mut ws.dh,
                &mut grads[r.norm2.clone()],
                &ws.dxn,
                &a.h,
                &p[r.norm2.clone()],
                &a.rstd2,
                n,
                d,
            );
            add_into(&mut ws.dh, dx_cur);
            // Attention.
            {
                let (gw, gb) = two_mut(grads, r.proj_w.clone(), r.proj_b.clone());
                matmul_backward(
                    Some(&mut ws.dattn),
                    gw,
                    Some(gb),
                    &ws.dh,
                    &a.attn,
                    &p[r.proj_w.clone()],
                    n,
                    d,
                    d,
                );
            }
            ws.dq.fill(0.0);
            ws.dk.fill(0.0);
            ws.dv.fill(0.0);
            let cu = if c.fullatt_block_indexes.contains(&l) {
                &plan.cu_seqlens
            } else {
                &plan.cu_window_seqlens
            };
            let dqs = split_rows(&mut ws.dq, cu, d);
            let dks = split_rows(&mut ws.dk, cu, d);
            let dvs = split_rows(&mut ws.dv, cu, d);
            let dattn = &ws.dattn;
            dqs.into_par_iter()
                .zip(dks)
                .zip(dvs)
                .zip(segments(cu).collect::<Vec<_>>())
                .for_each(|(((dq, dk), dv), (s, e))| {
                    attention_backward(
                        dq,
                        dk,
                        dv,
                        &dattn[s * d..e * d],
                        &a.q[s * d..e * d],
                        &a.k[s * d..e * d],
                        &a.v[s * d..e * d],
                        &a.attn[s * d..e * d],
                        &a.lse[s * heads..e * heads],
                        segment_shape(e - s, heads, hd),
                        AttnMask::Full,
                    );
                });
            rope_backward_angles(&mut ws.dq, &ws.cos, &ws.sin, heads, hd);
            rope_backward_angles(&mut ws.dk, &ws.cos, &ws.sin, heads, hd);
            for (row, dst) in ws.dqkv.chunks_exact_mut(3 * d).enumerate() {
                dst[..d].copy_from_slice(&ws.dq[row * d..(row + 1) * d]);
                dst[d..2 * d].copy_from_slice(&ws.dk[row * d..(row + 1) * d]);
                dst[2 * d..].copy_from_slice(&ws.dv[row * d..(row + 1) * d]);
            }
            {
                let (gw, gb) = two_mut(grads, r.qkv_w.clone(), r.qkv_b.clone());
                matmul_backward(
                    Some(&mut ws.dxn),
                    gw,
                    Some(gb),
                    &ws.dqkv,
                    &a.xn1,
                    &p[r.qkv_w.clone()],
                    n,
                    d,
                    3 * d,
                );
            }
            rmsnorm_backward(
                dx_next,
                &mut grads[r.norm1.clone()],
                &ws.dxn,
                &a.x_in,
                &p[r.norm1.clone()],
                &a.rstd1,
                n,
                d,
            );
            add_into(dx_next, &ws.dh);
            std::mem::swap(&mut dx_cur, &mut dx_next);
        }
        matmul_backward(
            None,
            &mut grads[lay.patch_embed.clone()],
            None,
            dx_cur,
            &ws.pixels,
            &p[lay.patch_embed.clone()],
            n,
            kk,
            d,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One frame of 4×6 patches: 2×3 merge units, windows of 2×2 units. Rows need no padding
    /// but transformers pads a whole empty window row anyway; the empty windows are dropped.
    #[test]
    fn window_plan_by_hand() {
        let c = VisionConfig::tiny();
        let plan = VisionPlan::new(&c, &[VideoGrid { t: 1, h: 4, w: 6 }]).unwrap();
        assert_eq!(plan.window_index, [0, 1, 3, 4, 2, 5]);
        assert_eq!(plan.cu_window_seqlens, [0, 16, 24]);
        assert_eq!(plan.cu_seqlens, [0, 24]);
        assert_eq!(
            &plan.pos_hw[..6],
            &[(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]
        );
        // Two frames and a second video: frames are their own full-attention segments and
        // window indices continue across videos.
        let grids = [
            VideoGrid { t: 2, h: 2, w: 2 },
            VideoGrid { t: 1, h: 2, w: 4 },
        ];
        let plan = VisionPlan::new(&c, &grids).unwrap();
        assert_eq!(plan.window_index, [0, 1, 2, 3]);
        assert_eq!(plan.cu_seqlens, [0, 4, 8, 16]);
        assert_eq!(plan.cu_window_seqlens, [0, 4, 8, 16]);
        assert!(VisionPlan::new(&c, &[VideoGrid { t: 1, h: 3, w: 4 }]).is_err());
    }
}
