//! The Qwen2 decoder resident on one GPU: forward, backward under the three checkpoint policies,
//! gradient clipping and AdamW, the same math as `reel_model::Qwen2` (see its module docs for the
//! per-layer equations; N = B·T tokens, d hidden, H/H_kv heads of size D, I intermediate, V vocab).
//!
//! Precision (mixed, as the GPU design says): fp32 master parameters and AdamW moments in the
//! flat `ParamLayout` (so loading, saving and the optimizer address tensors by their checkpoint
//! names, and [`GpuQwen2::params_host`] is the CPU model's buffer); a bf16 copy of the weights
//! made after each update; bf16 activations; f32 accumulation inside every GEMM and reduction;
//! f32 RMSNorm statistics, attention lse and cross-entropy. Each micro-batch's parameter
//! gradients are formed in bf16 (one rounding per tensor) and added into the step's fp32
//! gradients, which clipping and AdamW read: a layer's as soon as its backward is done (one
//! layer-sized bf16 buffer serves every layer), the embedding, final norm and LM head at the end
//! of the pass (`G16`), so the bf16 gradients take about one layer and the ends, not a second
//! copy of the model. The optimizer state can be sharded over a dp × sp world (ZeRO-1,
//! [`GpuQwen2::new_sharded`]).
//!
//! Kernels: cuBLASLt GEMMs (bias fused into the q/k/v projection), cuDNN fused attention with lse
//! (causal), and reel's own RMSNorm, RoPE, SwiGLU, embedding, chunked LM head + cross-entropy
//! (the [N, V] logits never exist) and AdamW.
//!
//! Input: token ids ([`GpuQwen2::forward`], RoPE by position) or, for the vision-language
//! decoder, input-embedding rows with per-token rotary angles ([`GpuQwen2::forward_embeds`],
//! [`GpuEmbedsBatch`]): text rows are looked up in the device embedding table, the rows of the
//! feature token (`<|video_pad|>`) take the given merged vision features, and q/k turn by the
//! batch's M-RoPE angles [N, D/2] (`reel_model::vl::mrope_angles`), loaded into a per-batch
//! rotary table whose row k is token k. Its backward ([`GpuQwen2::backward_embeds`]) is the CPU
//! `Qwen2::backward_embeds` plus `Qwen25VL::text_embedding_backward`: decoder gradients, the
//! embedding table's text rows, and optionally ∂L/∂embeddings [N, d] for the vision tower.
//!
//! Attention is pluggable ([`GpuAttention`]): cuDNN over the whole local sequence, or, when the
//! model is one rank of a sequence-parallel group on in-process device ranks, the group's
//! schedule through `GpuDistAttn` on this rank's token shard (`Sharding::shard_tokens`: the
//! layout's rows, global RoPE positions, the shard's targets). Each rank then holds its share of
//! the loss and gradients; [`GpuQwen2::all_reduce_grads`] sums both over the group on the device,
//! after which every rank clips by the global norm and takes the same AdamW step. Under `Remat`
//! the kept out and lse let DistAttn's backward run without re-running its forward.
//!
//! Memory: every activation buffer is sized once for the largest batch seen (`capacity` tokens)
//! and viewed at the batch's size; per-op scratch comes from the Gpu's caching pool
//! ([`crate::arena`]), so after the first step of the largest shape a training step makes no
//! device allocation ([`crate::Gpu::alloc_stats`] counts them). Activations kept per policy
//! ([`crate::activation_bytes`]): `None` every layer's; `Layer` each layer's input; `Remat` each layer's
//! input, attention output and lse (attention runs forward once per layer per step).

use half::bf16;
use reel_kernels::attention::{AttnMask, AttnShape};
use reel_model::params::LayerRanges;
use reel_model::{
    validate_token_batch, CheckpointPolicy, LossStats, ParamLayout, Qwen2Config, TokenBatch,
};
use reel_optim::{AdamWConfig, AdamWState, OptShard, ShardSegment};

use crate::buffer::{DView, DViewMut, DevRead, DevWrite};
use crate::sp_attn::GpuSpRank;
use crate::{shape_err, DeviceBuf, Gpu, GpuError, GpuRopeTable, Result};
use reel_model::plan::ce_chunk;

/// One micro-batch as input-embedding rows (module docs): B sequences of T rows, row-major.
#[derive(Clone, Copy, Debug)]
pub struct GpuEmbedsBatch<'a> {
    /// Token id of every row [B·T]: rows that are not feature rows (below) take (and give their
    /// gradient to) that embedding-table row.
    pub tokens: &'a [u32],
    /// Next-token targets per row; negative = no loss.
    pub targets: &'a [i32],
    /// The id whose rows take `features` instead of a table row (`<|video_pad|>`).
    pub feature_token: u32,
    /// Which rows take `features` when not every row of `feature_token` does ([B·T]; each such
    /// row must hold `feature_token`): a sampled response may hold the video token as an
    /// ordinary token, which takes its table row. `None`: every row of `feature_token`.
    pub feature_rows: Option<&'a [bool]>,
    /// The feature rows [R, d], R = the feature rows, in row order (the merged vision
    /// features; zeros for sequence-parallel padding rows).
    pub features: &'a [f32],
    /// Per-row rotary angles cos, sin [B·T, D/2] (M-RoPE).
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub b: usize,
    pub t: usize,
}

impl GpuEmbedsBatch<'_> {
    /// Whether row `i` takes a feature row.
    fn is_feature(&self, i: usize) -> bool {
        self.tokens[i] == self.feature_token && self.feature_rows.is_none_or(|f| f[i])
    }

    /// Row ranges of the feature runs.
    fn feature_runs(&self) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for i in 0..self.tokens.len() {
            if !self.is_feature(i) {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }
}

/// What a forward or backward pass reads: token ids with RoPE positions, or embedding rows.
#[derive(Clone, Copy)]
enum Input<'a> {
    Tokens(&'a TokenBatch<'a>),
    Embeds(&'a GpuEmbedsBatch<'a>),
}

impl<'a> Input<'a> {
    fn tokens(&self) -> &'a [u32] {
        match self {
            Input::Tokens(b) => b.tokens,
            Input::Embeds(e) => e.tokens,
        }
    }
    fn targets(&self) -> &'a [i32] {
        match self {
            Input::Tokens(b) => b.targets,
            Input::Embeds(e) => e.targets,
        }
    }
    fn bt(&self) -> (usize, usize) {
        match self {
            Input::Tokens(b) => (b.b, b.t),
            Input::Embeds(e) => (e.b, e.t),
        }
    }
    fn is_embeds(&self) -> bool {
        matches!(self, Input::Embeds(_))
    }
}

/// Which weights a scoring forward runs: the trained policy's, or the frozen reference copy
/// ([`GpuQwen2::set_reference`]; GRPO's KL anchor). Only a policy forward has a backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    Policy,
    Reference,
}

/// What the LM head computes after the final norm: the cross-entropy loss (τ = 1, no entropy),
/// or log-probabilities of softmax(z/τ) — `z/τ = (h/τ)·Wᵀ`, so the final normed rows are scaled
/// by 1/τ and so is their gradient — with the entropy when asked.
#[derive(Clone, Copy)]
struct Head {
    temperature: f32,
    entropy: bool,
}

const CE_HEAD: Head = Head {
    temperature: 1.0,
    entropy: false,
};

/// Sums each of `bufs` element-wise over the sequence-parallel group (when `attn` is one) and
/// then over the data-parallel group `dp`, on the device, every rank the same buffers in the
/// same order (every rank then holds the sums).
fn sum_over_groups(
    attn: &GpuAttention,
    dp: Option<&dyn GpuDpGroup>,
    gpu: &Gpu,
    bufs: &mut [&mut DeviceBuf<f32>],
) -> Result<()> {
    if let GpuAttention::Sp(sp) = attn {
        for b in bufs.iter_mut() {
            sp.all_reduce_sum_dev(gpu, b)?;
        }
    }
    if let Some(dp) = dp {
        for b in bufs.iter_mut() {
            dp.dp_all_reduce(gpu, b)?;
        }
    }
    Ok(())
}

/// The sequence-parallel chunk of `plan`'s padded buffer that this rank's dp group cuts again.
fn sp_chunk(plan: &OptShard) -> std::ops::Range<usize> {
    let c = plan.padded / plan.sp;
    plan.sp_rank * c..(plan.sp_rank + 1) * c
}

/// Reduce-scatters `buf` (`plan.padded` values) over the sequence-parallel group, then its chunk
/// over the data-parallel group: this rank's `plan.range` ends with the sum over the world
/// (`reel_optim::shard`'s order).
fn scatter_over_groups(
    attn: &GpuAttention,
    dp: Option<&dyn GpuDpGroup>,
    gpu: &Gpu,
    buf: &mut DeviceBuf<f32>,
    plan: &OptShard,
) -> Result<()> {
    if let GpuAttention::Sp(sp) = attn {
        sp.reduce_scatter_sum_dev(gpu, &mut buf.view_mut(0..plan.padded)?)?;
    }
    if let Some(dp) = dp {
        dp.dp_reduce_scatter(gpu, &mut buf.view_mut(sp_chunk(plan))?)?;
    }
    Ok(())
}

/// The reverse of [`scatter_over_groups`]: every rank's `plan.range` of `buf` to every rank
/// (all-gather over dp within the sequence-parallel chunk, then over sp).
fn gather_over_groups(
    attn: &GpuAttention,
    dp: Option<&dyn GpuDpGroup>,
    gpu: &Gpu,
    buf: &mut DeviceBuf<f32>,
    plan: &OptShard,
) -> Result<()> {
    if let Some(dp) = dp {
        dp.dp_all_gather(gpu, &mut buf.view_mut(sp_chunk(plan))?)?;
    }
    if let GpuAttention::Sp(sp) = attn {
        sp.all_gather_dev(gpu, &mut buf.view_mut(0..plan.padded)?)?;
    }
    Ok(())
}

/// Values a sharded-gradient reduce widens to f32 at a time (128 MiB of scratch).
const REDUCE_CHUNK: usize = 1 << 25;

/// Values of each rank's shard a chunked gather stages at a time (the staging buffer holds the
/// world's pieces: 64 MiB of f32 a rank).
const GATHER_CHUNK: usize = 1 << 24;

/// Sharded gradients (ZeRO-2, [`GpuQwen2::shard_gradients`]): the bf16 gradients `src` of the
/// flat range `flat` summed over the world in f32, each value onto the rank whose shard holds it,
/// which adds it into its shard `grads` (`plan.range`'s values). A piece of at most
/// [`REDUCE_CHUNK`] values at a time: reduced over the sequence-parallel group onto the owner of
/// its sp chunk, and there over the data-parallel group onto the shard's owner — the order of
/// [`scatter_over_groups`], so every rank's shard ends the sum over the world.
#[allow(clippy::too_many_arguments)]
fn reduce_into_shard(
    attn: &GpuAttention,
    dp: Option<&dyn GpuDpGroup>,
    gpu: &Gpu,
    plan: &OptShard,
    grads: &mut DeviceBuf<f32>,
    src: &DView<'_, bf16>,
    flat: std::ops::Range<usize>,
) -> Result<()> {
    if src.dlen() != flat.len() {
        return shape_err(format!(
            "sharded gradients: {} values for a range of {}",
            src.dlen(),
            flat.len()
        ));
    }
    let mut tmp = gpu.scratch::<f32>(REDUCE_CHUNK.min(flat.len()))?;
    for piece in plan.owner_pieces(flat.clone(), REDUCE_CHUNK) {
        let a = piece.range.start;
        let mut buf = tmp.view_mut(0..piece.range.len())?;
        let from = a - flat.start..piece.range.end - flat.start;
        gpu.to_f32(&mut buf, &DView::of(src, from)?)?;
        if let GpuAttention::Sp(sp) = attn {
            sp.reduce_sum_dev(gpu, &mut buf, piece.sp_rank)?;
        }
        if piece.sp_rank != plan.sp_rank {
            continue;
        }
        for (d, part) in piece.parts {
            let mut sub = tmp.view_mut(part.start - a..part.end - a)?;
            if let Some(dp) = dp {
                dp.dp_reduce(gpu, &mut sub, d)?;
            }
            if d == plan.dp_rank {
                let at = part.start - plan.range.start..part.end - plan.range.start;
                gpu.accum_f32(&mut grads.view_mut(at)?, &sub)?;
            }
        }
    }
    Ok(())
}

/// Refuses a host slice whose length is not the flat range's (`what` names the values).
fn check_host_range(what: &str, range: &std::ops::Range<usize>, dst: &[f32]) -> Result<()> {
    if range.len() != dst.len() {
        return shape_err(format!(
            "{what} range of {} values into a host slice of {}",
            range.len(),
            dst.len()
        ));
    }
    Ok(())
}

/// Adds a finished tensor's bf16 gradients `done` (the flat range `flat`) into the fp32
/// gradients: into the whole copy, or with sharded gradients (`zero2`: the plan) summed onto
/// their owners' shards ([`reduce_into_shard`]).
fn add_finished_grads(
    zero2: Option<&OptShard>,
    attn: &GpuAttention,
    dp: Option<&dyn GpuDpGroup>,
    gpu: &Gpu,
    grads: &mut DeviceBuf<f32>,
    done: &DView<'_, bf16>,
    flat: std::ops::Range<usize>,
) -> Result<()> {
    match zero2 {
        Some(plan) => reduce_into_shard(attn, dp, gpu, plan, grads, done, flat),
        None => gpu.accum_f32(&mut grads.view_mut(flat)?, done),
    }
}

/// Every rank's shard of a flat buffer held sharded (`shard`: this rank's `plan.range` values),
/// gathered [`GATHER_CHUNK`] values a rank at a time through one staging buffer (over dp within
/// the sp chunk, then over sp, as [`gather_over_groups`]): `each(flat range, values)` is called
/// for every rank's piece in turn, on every rank, the values on the device; padding past
/// `plan.total` is left out.
fn gather_chunked(
    attn: &GpuAttention,
    dp: Option<&dyn GpuDpGroup>,
    gpu: &Gpu,
    plan: &OptShard,
    shard: &DeviceBuf<f32>,
    mut each: impl FnMut(std::ops::Range<usize>, DView<'_, f32>) -> Result<()>,
) -> Result<()> {
    let c = plan.len();
    let world = plan.sp * plan.dp;
    let me = plan.sp_rank * plan.dp + plan.dp_rank;
    let k = GATHER_CHUNK.min(c).max(1);
    let mut stage = gpu.scratch::<f32>(world * k)?;
    let mut off = 0;
    while off < c {
        let len = k.min(c - off);
        gpu.copy(
            &mut stage.view_mut(me * len..(me + 1) * len)?,
            &shard.view(off..off + len)?,
        )?;
        if let Some(dp) = dp {
            let block = plan.sp_rank * plan.dp * len..(plan.sp_rank + 1) * plan.dp * len;
            dp.dp_all_gather(gpu, &mut stage.view_mut(block)?)?;
        }
        if let GpuAttention::Sp(sp) = attn {
            sp.all_gather_dev(gpu, &mut stage.view_mut(0..world * len)?)?;
        }
        for rank in 0..world {
            let start = plan.start_of(rank / plan.dp, rank % plan.dp) + off;
            let real = (start + len).min(plan.total).saturating_sub(start);
            if real > 0 {
                let at = rank * len;
                each(start..start + real, stage.view(at..at + real)?)?;
            }
        }
        off += len;
    }
    Ok(())
}

/// How a [`GpuQwen2`] computes causal self-attention over the tokens it holds.
pub enum GpuAttention {
    /// cuDNN over the whole local sequence (the model holds every token of its batch).
    Local,
    /// The model is one rank of a sequence-parallel group and holds its token shard; attention
    /// runs the group's schedule through [`crate::GpuDistAttn`] (a [`crate::GpuSpAttention`]
    /// over in-process ranks or NCCL), and the gradients are summed over the same group.
    Sp(Box<dyn GpuSpRank>),
}

/// The data-parallel group of a [`GpuQwen2`] replica: the ranks holding the same token shard
/// (the same sequence-parallel rank) of different replicas, each training on its own
/// micro-batches. [`GpuQwen2::all_reduce_grads`] sums the gradients and loss statistics over it
/// after the sequence-parallel group's sum, so every rank of the world steps alike. Any
/// [`DeviceGroup`](crate::DeviceGroup) is one: in-process ranks of one GPU
/// ([`DeviceComm`](crate::DeviceComm)) or one process per GPU ([`NcclP2p`](crate::NcclP2p)).
pub trait GpuDpGroup: Send {
    fn dp_rank(&self) -> usize;
    fn dp_size(&self) -> usize;
    /// Sums `buf` over the group, in place.
    fn dp_all_reduce(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()>;
    /// [`crate::DeviceGroup::reduce_scatter_sum_dev`] over the group.
    fn dp_reduce_scatter(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()>;
    /// [`crate::DeviceGroup::all_gather_dev`] over the group.
    fn dp_all_gather(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()>;
    /// [`crate::DeviceGroup::reduce_sum_dev`] over the group.
    fn dp_reduce(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>, root: usize) -> Result<()>;
    /// Fails this rank's later exchanges and, as far as the backend can, its peers'.
    fn dp_abort(&self, why: &str);
}

impl<C: crate::DeviceGroup + Send> GpuDpGroup for C {
    fn dp_rank(&self) -> usize {
        crate::DeviceP2p::rank(self)
    }

    fn dp_size(&self) -> usize {
        crate::DeviceP2p::world_size(self)
    }

    fn dp_all_reduce(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()> {
        self.all_reduce_sum_dev(gpu, buf)
    }

    fn dp_reduce_scatter(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        self.reduce_scatter_sum_dev(gpu, buf)
    }

    fn dp_all_gather(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        self.all_gather_dev(gpu, buf)
    }

    fn dp_reduce(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>, root: usize) -> Result<()> {
        self.reduce_sum_dev(gpu, buf, root)
    }

    fn dp_abort(&self, why: &str) {
        crate::DeviceP2p::abort(self, why)
    }
}

impl GpuAttention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        g: &Gpu,
        out: &mut DViewMut<'_, bf16>,
        lse: &mut DViewMut<'_, f32>,
        q: &DView<'_, bf16>,
        k: &DView<'_, bf16>,
        v: &DView<'_, bf16>,
        shape: AttnShape,
    ) -> Result<()> {
        match self {
            GpuAttention::Local => g.attention_forward(out, lse, q, k, v, shape, CAUSAL),
            GpuAttention::Sp(sp) => sp.forward(g, out, lse, q, k, v, shape),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        g: &Gpu,
        dq: &mut DViewMut<'_, bf16>,
        dk: &mut DViewMut<'_, bf16>,
        dv: &mut DViewMut<'_, bf16>,
        dout: &DView<'_, bf16>,
        q: &DView<'_, bf16>,
        k: &DView<'_, bf16>,
        v: &DView<'_, bf16>,
        out: &DView<'_, bf16>,
        lse: &DView<'_, f32>,
        shape: AttnShape,
    ) -> Result<()> {
        match self {
            GpuAttention::Local => {
                g.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, shape, CAUSAL)
            }
            GpuAttention::Sp(sp) => sp.backward(g, dq, dk, dv, dout, q, k, v, out, lse, shape),
        }
    }
}

/// One layer's activations other than attention's output and lse.
struct Acts {
    rstd1: DeviceBuf<f32>,
    xn1: DeviceBuf<bf16>,
    q: DeviceBuf<bf16>,
    k: DeviceBuf<bf16>,
    v: DeviceBuf<bf16>,
    h: DeviceBuf<bf16>,
    rstd2: DeviceBuf<f32>,
    xn2: DeviceBuf<bf16>,
    gate_up: DeviceBuf<bf16>,
    act: DeviceBuf<bf16>,
}

/// Dimensions of one batch.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    b: usize,
    t: usize,
    d: usize,
    h: usize,
    h_kv: usize,
    hd: usize,
    i: usize,
    v: usize,
}

impl Dims {
    fn new(c: &Qwen2Config, b: usize, t: usize) -> Self {
        Dims {
            n: b * t,
            b,
            t,
            d: c.hidden_size,
            h: c.num_attention_heads,
            h_kv: c.num_key_value_heads,
            hd: c.head_dim,
            i: c.intermediate_size,
            v: c.vocab_size,
        }
    }
    fn qw(&self) -> usize {
        self.h * self.hd
    }
    fn kvw(&self) -> usize {
        self.h_kv * self.hd
    }
    fn width(&self) -> usize {
        self.qw() + 2 * self.kvw()
    }
    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            tq: self.t,
            tk: self.t,
            h: self.h,
            h_kv: self.h_kv,
            d: self.hd,
        }
    }
}

const CAUSAL: AttnMask = AttnMask::Causal {
    q_offset: 0,
    k_offset: 0,
};

fn zeros<T: crate::DeviceElem>(gpu: &Gpu, len: usize) -> Result<DeviceBuf<T>> {
    gpu.alloc_zeros::<T>(len.max(1))
}

impl Acts {
    fn new(gpu: &Gpu, m: &Dims) -> Result<Self> {
        let n = m.n;
        Ok(Acts {
            rstd1: zeros(gpu, n)?,
            xn1: zeros(gpu, n * m.d)?,
            q: zeros(gpu, n * m.qw())?,
            k: zeros(gpu, n * m.kvw())?,
            v: zeros(gpu, n * m.kvw())?,
            h: zeros(gpu, n * m.d)?,
            rstd2: zeros(gpu, n)?,
            xn2: zeros(gpu, n * m.d)?,
            gate_up: zeros(gpu, n * 2 * m.i)?,
            act: zeros(gpu, n * m.i)?,
        })
    }
}

/// Gradient scratch of one layer's backward. The MLP's gradients take the places of the
/// layer's activations they come from (`act`, `gate_up`) and the packed q/k/v gradient the
/// packed q/k/v rows (`Ws::qkv`), each dead by then, so only these remain.
struct Bw {
    dxn: DeviceBuf<bf16>,
    dh: DeviceBuf<bf16>,
    dattn: DeviceBuf<bf16>,
    dq: DeviceBuf<bf16>,
    dk: DeviceBuf<bf16>,
    dv: DeviceBuf<bf16>,
}

/// Every activation buffer, sized for `cap` tokens.
struct Ws {
    cap: usize,
    xs: Vec<DeviceBuf<bf16>>,
    acts: Vec<Acts>,
    attn: Vec<DeviceBuf<bf16>>,
    lse: Vec<DeviceBuf<f32>>,
    /// The packed q/k/v rows of the layer running (split into `Acts::q`, `k`, `v`); in the
    /// backward, their gradient.
    qkv: DeviceBuf<bf16>,
    rstd_f: DeviceBuf<f32>,
    xn_f: DeviceBuf<bf16>,
    ce_losses: DeviceBuf<f32>,
    ce_lse: DeviceBuf<f32>,
    ce_entropy: DeviceBuf<f32>,
    dloss: DeviceBuf<f32>,
    dxn_f: DeviceBuf<bf16>,
    dx: [DeviceBuf<bf16>; 2],
    bw: Bw,
    tokens: DeviceBuf<u32>,
    positions: DeviceBuf<u32>,
    /// The per-token rotary angles of an embeddings batch, row k for token k.
    angles: GpuRopeTable,
    /// The last forward: (B, T), whether it took embeddings, and which weights it ran.
    last: Option<(usize, usize, bool, Weights)>,
    /// 1/temperature the last forward scaled the final normed rows by (1 for the CE loss).
    head_scale: f32,
}

impl Ws {
    fn new(gpu: &Gpu, c: &Qwen2Config, policy: CheckpointPolicy, cap: usize) -> Result<Self> {
        let m = Dims::new(c, 1, cap);
        let l = c.num_hidden_layers;
        let (n_acts, n_attn) = match policy {
            CheckpointPolicy::None => (l, l),
            CheckpointPolicy::Layer => (1, 1),
            CheckpointPolicy::Remat => (1, l),
        };
        let nd = cap * m.d;
        Ok(Ws {
            cap,
            xs: (0..=l).map(|_| zeros(gpu, nd)).collect::<Result<_>>()?,
            acts: (0..n_acts)
                .map(|_| Acts::new(gpu, &m))
                .collect::<Result<_>>()?,
            attn: (0..n_attn)
                .map(|_| zeros(gpu, cap * m.qw()))
                .collect::<Result<_>>()?,
            lse: (0..n_attn)
                .map(|_| zeros(gpu, cap * m.h))
                .collect::<Result<_>>()?,
            qkv: zeros(gpu, cap * m.width())?,
            rstd_f: zeros(gpu, cap)?,
            xn_f: zeros(gpu, nd)?,
            ce_losses: zeros(gpu, cap)?,
            ce_lse: zeros(gpu, cap)?,
            ce_entropy: zeros(gpu, cap)?,
            dloss: zeros(gpu, cap)?,
            dxn_f: zeros(gpu, nd)?,
            dx: [zeros(gpu, nd)?, zeros(gpu, nd)?],
            bw: Bw {
                dxn: zeros(gpu, nd)?,
                dh: zeros(gpu, nd)?,
                dattn: zeros(gpu, cap * m.qw())?,
                dq: zeros(gpu, cap * m.qw())?,
                dk: zeros(gpu, cap * m.kvw())?,
                dv: zeros(gpu, cap * m.kvw())?,
            },
            tokens: zeros(gpu, cap)?,
            positions: zeros(gpu, cap)?,
            angles: GpuRopeTable::zeroed(gpu, c.head_dim, cap)?,
            last: None,
            head_scale: 1.0,
        })
    }
}

/// Device bytes of `b`.
fn nbytes<T: crate::DeviceElem>(b: &DeviceBuf<T>) -> usize {
    b.len() * std::mem::size_of::<T>()
}

impl Acts {
    fn bytes(&self) -> usize {
        let a = self;
        nbytes(&a.rstd1)
            + nbytes(&a.rstd2)
            + [&a.xn1, &a.q, &a.k, &a.v, &a.h, &a.xn2, &a.gate_up, &a.act]
                .into_iter()
                .map(nbytes)
                .sum::<usize>()
    }
}

impl Ws {
    /// Device bytes of every buffer ([`crate::workspace_bytes`] computes the same without
    /// a GPU).
    fn bytes(&self) -> usize {
        let (w, b) = (self, &self.bw);
        let bf: usize =
            w.xs.iter()
                .chain(&w.attn)
                .chain([&w.qkv, &w.xn_f, &w.dxn_f, &w.dx[0], &w.dx[1]])
                .chain([&b.dxn, &b.dh, &b.dattn, &b.dq, &b.dk, &b.dv])
                .map(nbytes)
                .sum();
        let f: usize = w
            .lse
            .iter()
            .chain([
                &w.rstd_f,
                &w.ce_losses,
                &w.ce_lse,
                &w.ce_entropy,
                &w.dloss,
                &w.angles.cos,
                &w.angles.sin,
            ])
            .map(nbytes)
            .sum();
        bf + f
            + nbytes(&w.tokens)
            + nbytes(&w.positions)
            + w.acts.iter().map(Acts::bytes).sum::<usize>()
    }
}

/// First `len` elements, read-only.
fn r<T: crate::DeviceElem>(b: &DeviceBuf<T>, len: usize) -> Result<DView<'_, T>> {
    b.view(0..len)
}

/// First `len` elements, writable.
fn w<T: crate::DeviceElem>(b: &mut DeviceBuf<T>, len: usize) -> Result<DViewMut<'_, T>> {
    b.view_mut(0..len)
}

/// Views of one layer's bf16 weights.
struct LayerW<'a> {
    input_norm: DView<'a, bf16>,
    qkv_w: DView<'a, bf16>,
    qkv_b: DView<'a, bf16>,
    o_w: DView<'a, bf16>,
    post_norm: DView<'a, bf16>,
    gate_up_w: DView<'a, bf16>,
    down_w: DView<'a, bf16>,
}

fn layer_w<'a>(w16: &'a DeviceBuf<bf16>, r: &LayerRanges) -> Result<LayerW<'a>> {
    Ok(LayerW {
        input_norm: w16.view(r.input_norm.clone())?,
        qkv_w: w16.view(r.qkv_w.clone())?,
        qkv_b: w16.view(r.qkv_b.clone())?,
        o_w: w16.view(r.o_w.clone())?,
        post_norm: w16.view(r.post_norm.clone())?,
        gate_up_w: w16.view(r.gate_up_w.clone())?,
        down_w: w16.view(r.down_w.clone())?,
    })
}

/// Read-only things every layer op needs.
struct Ctx<'a> {
    gpu: &'a Gpu,
    rope: &'a GpuRopeTable,
    positions: DView<'a, u32>,
    m: Dims,
    eps: f32,
}

/// One layer forward (x_in → x_out); with `run_attn = false`, attn and lse already hold this
/// layer's attention (Remat's recomputation) and attention does not run. Without `x_out` (a
/// backward's recomputation, whose layer output is kept already) it stops at the activations
/// the backward reads: the down projection and the residual add are skipped.
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    cx: &Ctx,
    at: &mut GpuAttention,
    wt: &LayerW,
    a: &mut Acts,
    attn: &mut DeviceBuf<bf16>,
    lse: &mut DeviceBuf<f32>,
    qkv: &mut DeviceBuf<bf16>,
    x_in: &DeviceBuf<bf16>,
    x_out: Option<&mut DeviceBuf<bf16>>,
    run_attn: bool,
) -> Result<()> {
    let (g, m) = (cx.gpu, cx.m);
    let (n, d, i) = (m.n, m.d, m.i);
    let (qw, kvw, width) = (m.qw(), m.kvw(), m.width());
    let x_in = r(x_in, n * d)?;
    g.rmsnorm_forward(
        &mut w(&mut a.xn1, n * d)?,
        &mut w(&mut a.rstd1, n)?,
        &x_in,
        &wt.input_norm,
        n,
        d,
        cx.eps,
    )?;
    g.matmul_forward::<bf16, bf16>(
        &mut w(qkv, n * width)?,
        &r(&a.xn1, n * d)?,
        &wt.qkv_w,
        Some(&wt.qkv_b as &dyn DevRead<bf16>),
        n,
        d,
        width,
    )?;
    let (mut q, mut k) = (w(&mut a.q, n * qw)?, w(&mut a.k, n * kvw)?);
    g.split_qkv(
        &mut q,
        &mut k,
        &mut w(&mut a.v, n * kvw)?,
        &r(qkv, n * width)?,
        n,
        qw,
        kvw,
    )?;
    g.rope_forward(&mut q, &cx.positions, cx.rope, m.h)?;
    g.rope_forward(&mut k, &cx.positions, cx.rope, m.h_kv)?;
    if run_attn {
        at.forward(
            g,
            &mut w(attn, n * qw)?,
            &mut w(lse, n * m.h)?,
            &r(&a.q, n * qw)?,
            &r(&a.k, n * kvw)?,
            &r(&a.v, n * kvw)?,
            m.attn_shape(),
        )?;
    }
    let mut h = w(&mut a.h, n * d)?;
    g.matmul_forward::<bf16, bf16>(&mut h, &r(attn, n * qw)?, &wt.o_w, None, n, qw, d)?;
    g.add_inplace(&mut h, &x_in)?;
    g.rmsnorm_forward(
        &mut w(&mut a.xn2, n * d)?,
        &mut w(&mut a.rstd2, n)?,
        &r(&a.h, n * d)?,
        &wt.post_norm,
        n,
        d,
        cx.eps,
    )?;
    g.matmul_forward::<bf16, bf16>(
        &mut w(&mut a.gate_up, n * 2 * i)?,
        &r(&a.xn2, n * d)?,
        &wt.gate_up_w,
        None,
        n,
        d,
        2 * i,
    )?;
    g.swiglu_forward(&mut w(&mut a.act, n * i)?, &r(&a.gate_up, n * 2 * i)?, n, i)?;
    let Some(x_out) = x_out else {
        return Ok(());
    };
    let mut xo = w(x_out, n * d)?;
    g.matmul_forward::<bf16, bf16>(&mut xo, &r(&a.act, n * i)?, &wt.down_w, None, n, i, d)?;
    g.add_inplace(&mut xo, &r(&a.h, n * d)?)
}

/// The per-micro-batch bf16 gradients (module docs): one layer's at a time in `layer` (the
/// largest layer's span; the layer's ranges shifted to its start) and the layout's ends in
/// `ends` (embedding, final norm, an untied LM head, packed in that order; a tied head shares
/// the embedding's range, so both contributions meet there as before). Each is added into the
/// fp32 gradients once complete, so a rank holds one layer's and the ends' bf16 gradients
/// instead of the whole model's (the same values, added once each).
struct G16 {
    layer: DeviceBuf<bf16>,
    ends: DeviceBuf<bf16>,
    /// Where each end lives in `ends`.
    embed: std::ops::Range<usize>,
    final_norm: std::ops::Range<usize>,
    lm_head: std::ops::Range<usize>,
}

impl G16 {
    fn new(gpu: &Gpu, layout: &ParamLayout) -> Result<Self> {
        let widest = layout
            .layers
            .iter()
            .map(|l| l.span().len())
            .max()
            .unwrap_or(0);
        let (e, f) = (layout.embed.len(), layout.final_norm.len());
        let tied = layout.lm_head == layout.embed;
        let h = if tied { 0 } else { layout.lm_head.len() };
        Ok(G16 {
            layer: gpu.alloc_zeros(widest)?,
            ends: gpu.alloc_zeros(e + f + h)?,
            embed: 0..e,
            final_norm: e..e + f,
            lm_head: if tied { 0..e } else { e + f..e + f + h },
        })
    }

    /// The ends' (range in `ends`, flat range) pairs, each tensor once.
    fn ends_in(&self, layout: &ParamLayout) -> Vec<[std::ops::Range<usize>; 2]> {
        let mut v = vec![
            [self.embed.clone(), layout.embed.clone()],
            [self.final_norm.clone(), layout.final_norm.clone()],
        ];
        if layout.lm_head != layout.embed {
            v.push([self.lm_head.clone(), layout.lm_head.clone()]);
        }
        v
    }
}

/// One layer backward: dx_in from dx_out; the layer's parameter gradients accumulate into g16
/// (addressed by `rg`). Consumes the layer's activations: `a.act` and `a.gate_up` end holding
/// their gradients, and `qkv` (scratch) the packed q/k/v gradient.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    cx: &Ctx,
    at: &mut GpuAttention,
    wt: &LayerW,
    rg: &LayerRanges,
    a: &mut Acts,
    attn: &DeviceBuf<bf16>,
    lse: &DeviceBuf<f32>,
    qkv: &mut DeviceBuf<bf16>,
    x_in: &DeviceBuf<bf16>,
    dx_out: &DeviceBuf<bf16>,
    dx_in: &mut DeviceBuf<bf16>,
    g16: &mut DeviceBuf<bf16>,
    bw: &mut Bw,
) -> Result<()> {
    let (g, m) = (cx.gpu, cx.m);
    let (n, d, i) = (m.n, m.d, m.i);
    let (qw, kvw, width) = (m.qw(), m.kvw(), m.width());
    let dx_out = r(dx_out, n * d)?;
    // MLP: ∂L/∂act over act once the down projection's weight gradient has read it, then
    // ∂L/∂gate_up over gate_up.
    g.matmul_backward_into_input::<bf16>(
        &mut w(&mut a.act, n * i)?,
        &mut g16.view_mut(rg.down_w.clone())?,
        &dx_out,
        &wt.down_w,
        n,
        i,
        d,
    )?;
    g.swiglu_backward_in_place(&mut w(&mut a.gate_up, n * 2 * i)?, &r(&a.act, n * i)?, n, i)?;
    let mut dxn = w(&mut bw.dxn, n * d)?;
    g.matmul_backward::<bf16>(
        Some(&mut dxn as &mut dyn DevWrite<bf16>),
        &mut g16.view_mut(rg.gate_up_w.clone())?,
        None,
        &r(&a.gate_up, n * 2 * i)?,
        &r(&a.xn2, n * d)?,
        &wt.gate_up_w,
        n,
        d,
        2 * i,
    )?;
    g.rmsnorm_backward(
        &mut w(&mut bw.dh, n * d)?,
        &mut g16.view_mut(rg.post_norm.clone())?,
        &r(&bw.dxn, n * d)?,
        &r(&a.h, n * d)?,
        &wt.post_norm,
        &r(&a.rstd2, n)?,
        n,
        d,
    )?;
    g.add_inplace(&mut w(&mut bw.dh, n * d)?, &dx_out)?;
    // Attention.
    let mut dattn = w(&mut bw.dattn, n * qw)?;
    g.matmul_backward::<bf16>(
        Some(&mut dattn as &mut dyn DevWrite<bf16>),
        &mut g16.view_mut(rg.o_w.clone())?,
        None,
        &r(&bw.dh, n * d)?,
        &r(attn, n * qw)?,
        &wt.o_w,
        n,
        qw,
        d,
    )?;
    at.backward(
        g,
        &mut w(&mut bw.dq, n * qw)?,
        &mut w(&mut bw.dk, n * kvw)?,
        &mut w(&mut bw.dv, n * kvw)?,
        &r(&bw.dattn, n * qw)?,
        &r(&a.q, n * qw)?,
        &r(&a.k, n * kvw)?,
        &r(&a.v, n * kvw)?,
        &r(attn, n * qw)?,
        &r(lse, n * m.h)?,
        m.attn_shape(),
    )?;
    g.rope_backward(&mut w(&mut bw.dq, n * qw)?, &cx.positions, cx.rope, m.h)?;
    g.rope_backward(&mut w(&mut bw.dk, n * kvw)?, &cx.positions, cx.rope, m.h_kv)?;
    g.merge_qkv(
        &mut w(qkv, n * width)?,
        &r(&bw.dq, n * qw)?,
        &r(&bw.dk, n * kvw)?,
        &r(&bw.dv, n * kvw)?,
        n,
        qw,
        kvw,
    )?;
    {
        let (mut gw, mut gb) = g16.views_mut2(rg.qkv_w.clone(), rg.qkv_b.clone())?;
        let mut dxn = w(&mut bw.dxn, n * d)?;
        g.matmul_backward::<bf16>(
            Some(&mut dxn as &mut dyn DevWrite<bf16>),
            &mut gw,
            Some(&mut gb as &mut dyn DevWrite<bf16>),
            &r(qkv, n * width)?,
            &r(&a.xn1, n * d)?,
            &wt.qkv_w,
            n,
            d,
            width,
        )?;
    }
    let mut dxi = w(dx_in, n * d)?;
    g.rmsnorm_backward(
        &mut dxi,
        &mut g16.view_mut(rg.input_norm.clone())?,
        &r(&bw.dxn, n * d)?,
        &r(x_in, n * d)?,
        &wt.input_norm,
        &r(&a.rstd1, n)?,
        n,
        d,
    )?;
    g.add_inplace(&mut dxi, &r(&bw.dh, n * d)?)
}

/// The per-row weights of the LM head's backward.
#[derive(Clone, Copy)]
enum Dloss<'a> {
    /// The loss `scale · Σ token losses` (cross-entropy).
    Scale(f32),
    /// `∂L/∂log π` per row (a policy-gradient loss): `dloss = −dlogp` on labelled rows.
    Logprob(&'a [f32]),
}

impl Dloss<'_> {
    /// The [N] weights (0 on unlabelled rows); refuses a wrong length or a non-finite
    /// coefficient on a labelled row.
    fn per_row(self, targets: &[i32]) -> Result<Vec<f32>> {
        let n = targets.len();
        match self {
            Dloss::Scale(s) => Ok(targets
                .iter()
                .map(|&t| if t >= 0 { s } else { 0.0 })
                .collect()),
            Dloss::Logprob(g) => {
                if g.len() != n {
                    return shape_err(format!("dlogp has {} values, the batch needs {n}", g.len()));
                }
                if let Some(i) = (0..n).find(|&i| targets[i] >= 0 && !g[i].is_finite()) {
                    return Err(GpuError::NonFinite(format!("dlogp[{i}] is {}", g[i])));
                }
                Ok(targets
                    .iter()
                    .zip(g)
                    .map(|(&t, &x)| if t >= 0 { -x } else { 0.0 })
                    .collect())
            }
        }
    }
}

/// A Qwen2 decoder, its optimizer state and its activations, on one GPU.
pub struct GpuQwen2 {
    pub config: Qwen2Config,
    pub layout: ParamLayout,
    policy: CheckpointPolicy,
    adamw: AdamWConfig,
    /// AdamW steps taken.
    step: u64,
    ws: Option<Ws>,
    master: DeviceBuf<f32>,
    w16: DeviceBuf<bf16>,
    /// The frozen reference weights (bf16, as the policy computes), when set.
    ref16: Option<DeviceBuf<bf16>>,
    g16: G16,
    /// The step's fp32 gradients in the flat layout (padded to the shard plan's length when
    /// the optimizer is sharded; then, between an update and the next
    /// [`GpuQwen2::zero_grads`], the gathered fp32 master weights). With sharded gradients
    /// ([`GpuQwen2::shard_gradients`]) only this rank's shard of them.
    grads: DeviceBuf<f32>,
    m: DeviceBuf<f32>,
    v: DeviceBuf<f32>,
    /// ZeRO-1 ([`GpuQwen2::new_sharded`]): `master`, `m` and `v` hold this rank's shard only.
    shard: Option<Zero>,
    rope: GpuRopeTable,
    attn: GpuAttention,
    /// The data-parallel group this replica's gradients are also summed over (none: one
    /// replica).
    dp: Option<Box<dyn GpuDpGroup>>,
    /// The loss statistics summed over the sequence-parallel and data-parallel groups each
    /// step: (loss sum's high part, its remainder, labelled tokens).
    loss_stats: DeviceBuf<f32>,
    gpu: Gpu,
}

/// Which of a sharded optimizer's per-rank buffers a gather reads.
#[derive(Clone, Copy)]
enum Held {
    Master,
    M,
    V,
}

/// A sharded optimizer's plan and what `grads` holds now.
struct Zero {
    plan: OptShard,
    /// The layout's tensors inside the shard (AdamW's per-tensor decay).
    segments: Vec<ShardSegment>,
    /// `grads[..total]` holds the gathered fp32 master weights (after construction or an
    /// update, until [`GpuQwen2::zero_grads`]).
    gathered: bool,
    /// ZeRO-2: `grads` is this rank's shard only ([`GpuQwen2::shard_gradients`]).
    grads_sharded: bool,
}

impl GpuQwen2 {
    /// Uploads `params` (the CPU model's flat f32 buffer) as the fp32 master copy and makes the
    /// bf16 copy, zero gradients and zero AdamW moments.
    pub fn new(
        gpu: Gpu,
        config: Qwen2Config,
        params: &[f32],
        policy: CheckpointPolicy,
        adamw: AdamWConfig,
    ) -> Result<Self> {
        Self::new_sharded(gpu, config, params, policy, adamw, None)
    }

    /// [`GpuQwen2::new`] with the optimizer state sharded ZeRO-1 style when `shard` is given
    /// (`reel_optim::OptShard`: this rank's place in its dp × sp world, which the groups set
    /// later must match): the rank keeps the fp32 master weights and AdamW moments of its shard
    /// only, 12 bytes a parameter becoming 12 / W. [`GpuQwen2::all_reduce_grads`] then
    /// reduce-scatters the gradients (sp, then dp), clipping sums the shards' squares over the
    /// world, AdamW steps the shard, and the updated master shards are all-gathered (dp, then
    /// sp) into the gradient buffer, from which the bf16 weights are cast; the same bytes moved
    /// as the replicated all-reduce. The full master weights are on hand between an update and
    /// the next [`GpuQwen2::zero_grads`] ([`GpuQwen2::params_host`]); the optimizer state is
    /// gathered by [`GpuQwen2::gather_state`], which every rank of the world calls.
    pub fn new_sharded(
        gpu: Gpu,
        config: Qwen2Config,
        params: &[f32],
        policy: CheckpointPolicy,
        adamw: AdamWConfig,
        shard: Option<OptShard>,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|e| GpuError::Shape(format!("config: {e}")))?;
        let layout = ParamLayout::new(&config);
        if params.len() != layout.total() {
            return shape_err(format!(
                "parameter buffer has {} values, the config needs {}",
                params.len(),
                layout.total()
            ));
        }
        let p = params.len();
        if let Some(plan) = &shard {
            if plan.total != p {
                return shape_err(format!(
                    "optimizer shard planned over {} values, the model has {p}",
                    plan.total
                ));
            }
        }
        let mut w16 = gpu.alloc_zeros::<bf16>(p)?;
        // Sharded: the gradient buffer (padded) holds the whole master copy until the first
        // step, and the rank keeps its shard of it.
        let (master, grads, moments) = match &shard {
            None => {
                let master = gpu.upload(params)?;
                gpu.cast_from_f32(&mut w16, &master)?;
                (master, gpu.alloc_zeros(p)?, p)
            }
            Some(plan) => {
                let mut grads = gpu.alloc_zeros::<f32>(plan.padded)?;
                gpu.upload_into(&mut grads.view_mut(0..p)?, params)?;
                gpu.cast_from_f32(&mut w16, &grads.view(0..p)?)?;
                let mut master = gpu.alloc_zeros::<f32>(plan.len())?;
                gpu.copy(&mut master, &grads.view(plan.range.clone())?)?;
                (master, grads, plan.len())
            }
        };
        let rope = GpuRopeTable::new(
            &gpu,
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        )?;
        Ok(GpuQwen2 {
            g16: G16::new(&gpu, &layout)?,
            grads,
            m: gpu.alloc_zeros(moments)?,
            v: gpu.alloc_zeros(moments)?,
            shard: shard.map(|plan| Zero {
                segments: plan.segments(layout.entries.iter().map(|e| (e.range.clone(), e.decay))),
                plan,
                gathered: true,
                grads_sharded: false,
            }),
            config,
            layout,
            policy,
            adamw,
            step: 0,
            ws: None,
            master,
            w16,
            ref16: None,
            rope,
            attn: GpuAttention::Local,
            dp: None,
            loss_stats: gpu.alloc_zeros(3)?,
            gpu,
        })
    }

    /// ZeRO-2 on top of a sharded optimizer: the fp32 gradients too become this rank's shard
    /// only (4 bytes a parameter become 4 / W; at 7B over 2 GPUs, 15 GB freed). Each layer's
    /// bf16 gradients, once its backward is done, are summed over the world in f32 onto the
    /// ranks whose shards hold them (a reduce per owner, over sp then dp) and added into the
    /// shard, instead of being added into a whole fp32 copy reduce-scattered at the step's end:
    /// the same bytes a micro-batch as one reduce-scatter, but once per backward call rather
    /// than once per step. The updated master shards reach the bf16 weights through a chunked
    /// gather (no whole fp32 copy anywhere), so the whole fp32 master weights are gathered to
    /// the host by [`GpuQwen2::gather_params`], which every rank calls, and
    /// [`GpuQwen2::params_device`]/[`GpuQwen2::params_host`] refuse. Since the reduces meet in
    /// every backward, every rank of the world runs the same number of backward passes a step:
    /// a rank without a micro-batch for one calls [`GpuQwen2::skip_backward`] instead. Call
    /// before the first backward; the gradients start at zero.
    pub fn shard_gradients(&mut self) -> Result<()> {
        let Some(z) = &mut self.shard else {
            return shape_err("shard_gradients needs a sharded optimizer (new_sharded)".into());
        };
        if !z.grads_sharded {
            // Free the whole buffer before the shard's is allocated.
            self.grads = self.gpu.alloc_zeros(1)?;
            self.grads = self.gpu.alloc_zeros(z.plan.len())?;
            z.grads_sharded = true;
            z.gathered = false;
        }
        Ok(())
    }

    /// Whether the gradients are sharded ([`GpuQwen2::shard_gradients`]).
    pub fn grads_sharded(&self) -> bool {
        self.shard.as_ref().is_some_and(|z| z.grads_sharded)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn policy(&self) -> CheckpointPolicy {
        self.policy
    }

    /// Tokens the activation buffers hold now (they grow to the largest batch seen).
    pub fn capacity(&self) -> usize {
        self.ws.as_ref().map_or(0, |w| w.cap)
    }

    /// Sizes the activation buffers for batches of up to `tokens` tokens now (a warm-up that
    /// keeps the first step from allocating them).
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        if self.capacity() < tokens {
            // Free the old buffers first.
            self.ws = None;
            self.gpu.synchronize()?;
            self.ws = Some(Ws::new(&self.gpu, &self.config, self.policy, tokens)?);
        }
        Ok(())
    }

    /// Device bytes the activation buffers hold now ([`crate::workspace_bytes`] of
    /// [`GpuQwen2::capacity`] tokens).
    pub fn workspace_bytes(&self) -> usize {
        self.ws.as_ref().map_or(0, Ws::bytes)
    }

    /// Frees the activation buffers ([`GpuQwen2::reserve`]; the next pass sizes them again)
    /// and the device's cached scratch: the memory a rollout between two updates needs (a
    /// GRPO step's prompt cache and decoder buffers would otherwise come on top of the last
    /// update's activations).
    pub fn release_workspace(&mut self) -> Result<()> {
        self.gpu.synchronize()?;
        self.ws = None;
        self.gpu.release_cached()?;
        Ok(())
    }

    fn check(&self, input: Input) -> Result<()> {
        let e = match input {
            Input::Tokens(b) => {
                return validate_token_batch(&self.config, b)
                    .map_err(|e| GpuError::Shape(e.to_string()))
            }
            Input::Embeds(e) => e,
        };
        let c = &self.config;
        let (n, d, half) = (e.b * e.t, c.hidden_size, c.head_dim / 2);
        if n == 0 || e.tokens.len() != n || e.targets.len() != n {
            return shape_err(format!(
                "embeddings batch of {}×{} needs {n} > 0 tokens and targets; got {}, {}",
                e.b,
                e.t,
                e.tokens.len(),
                e.targets.len()
            ));
        }
        if e.cos.len() != n * half || e.sin.len() != n * half {
            return shape_err(format!(
                "embeddings batch: rotary angles cos {} and sin {} values, expected {n} × {half}",
                e.cos.len(),
                e.sin.len()
            ));
        }
        if let Some(f) = e.feature_rows {
            if f.len() != n {
                return shape_err(format!(
                    "embeddings batch: feature_rows has {} values, expected {n}",
                    f.len()
                ));
            }
            if let Some(i) = (0..n).find(|&i| f[i] && e.tokens[i] != e.feature_token) {
                return shape_err(format!(
                    "embeddings batch: feature row {i} holds token {}, not {}",
                    e.tokens[i], e.feature_token
                ));
            }
        }
        let rows = (0..n).filter(|&i| e.is_feature(i)).count();
        if e.features.len() != rows * d {
            return shape_err(format!(
                "embeddings batch: {} feature values for {rows} rows of token {} (width {d})",
                e.features.len(),
                e.feature_token
            ));
        }
        let v = c.vocab_size;
        if let Some((i, t)) = e.tokens.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return shape_err(format!(
                "embeddings batch: token id {t} at index {i} is outside the vocabulary of {v}"
            ));
        }
        if let Some((i, t)) = e
            .targets
            .iter()
            .enumerate()
            .find(|(_, &t)| t as i64 >= v as i64)
        {
            return shape_err(format!(
                "embeddings batch: target {t} at index {i} is outside the vocabulary of {v}"
            ));
        }
        Ok(())
    }

    /// Forward pass and loss (sum over labelled tokens), keeping what the policy says for
    /// [`GpuQwen2::backward`]. Waits for the GPU (the loss is read back). Under sequence
    /// parallelism `batch` is this rank's shard (`Sharding::shard_tokens` of the sharding
    /// [`GpuQwen2::set_seq_len`] returned) and the loss is this rank's share; a failure aborts
    /// the group.
    pub fn forward(&mut self, batch: &TokenBatch) -> Result<LossStats> {
        let out = self.forward_inner(Input::Tokens(batch), CE_HEAD, Weights::Policy);
        self.abort_on_err(out)
    }

    /// [`GpuQwen2::forward`] of a batch given as input-embedding rows with per-token rotary
    /// angles (module docs; under sequence parallelism this rank's shard of rows, angles and
    /// targets, cut like the CPU ranks cut them).
    pub fn forward_embeds(&mut self, batch: &GpuEmbedsBatch) -> Result<LossStats> {
        let out = self.forward_inner(Input::Embeds(batch), CE_HEAD, Weights::Policy);
        self.abort_on_err(out)
    }

    /// Backward of the last [`GpuQwen2::forward`] on the same batch, for the loss
    /// `loss_scale · Σ token losses`; parameter gradients are added into the fp32 gradients.
    /// Under sequence parallelism these are this rank's share until
    /// [`GpuQwen2::all_reduce_grads`].
    pub fn backward(&mut self, batch: &TokenBatch, loss_scale: f32) -> Result<()> {
        let out = self.backward_inner(Input::Tokens(batch), Dloss::Scale(loss_scale), false);
        self.abort_on_err(out).map(|_| ())
    }

    /// Backward of the last [`GpuQwen2::forward_embeds`] on the same batch: decoder gradients
    /// added into the fp32 gradients, the embedding table's share from the rows that are not
    /// `feature_token` (as `Qwen25VL::text_embedding_backward`); with `d_embeds`, also returns
    /// ∂L/∂embeddings [B·T, d] of every row (the feature rows' share is what the vision
    /// tower's backward takes).
    pub fn backward_embeds(
        &mut self,
        batch: &GpuEmbedsBatch,
        loss_scale: f32,
        d_embeds: bool,
    ) -> Result<Option<Vec<f32>>> {
        let out = self.backward_inner(Input::Embeds(batch), Dloss::Scale(loss_scale), d_embeds);
        self.abort_on_err(out)
    }

    /// Uploads `params` (flat `ParamLayout`, f32) as the frozen reference weights (kept in bf16,
    /// the precision the policy's forward computes in) for [`Weights::Reference`] scoring.
    pub fn set_reference(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.layout.total() {
            return shape_err(format!(
                "reference parameters: {} values, the config needs {}",
                params.len(),
                self.layout.total()
            ));
        }
        let mut r = match self.ref16.take() {
            Some(r) => r,
            None => self.gpu.alloc_zeros::<bf16>(params.len())?,
        };
        self.gpu.upload_cast(&mut r, params)?;
        self.ref16 = Some(r);
        Ok(())
    }

    /// Forward of `batch` through `weights`, then `logp[i] = log π(targets[i] | tokens ≤ i)` at
    /// every labelled position (0 elsewhere), π = softmax(logits / temperature), and, if given,
    /// `entropy[i]` of that distribution (an output only); both [B·T], as the CPU
    /// `Qwen2::token_logprobs` (the same fused, vocabulary-chunked LM head as the loss). A
    /// policy forward keeps what the checkpoint policy keeps for
    /// [`GpuQwen2::backward_logprobs`]. Returns the number of labelled positions.
    pub fn token_logprobs(
        &mut self,
        batch: &TokenBatch,
        weights: Weights,
        temperature: f32,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
    ) -> Result<usize> {
        let out = self.logprobs_inner(Input::Tokens(batch), weights, temperature, logp, entropy);
        self.abort_on_err(out)
    }

    /// [`GpuQwen2::token_logprobs`] of a batch of input-embedding rows with per-token rotary
    /// angles (as `Qwen2::token_logprobs_embeds`); [`GpuQwen2::backward_logprobs_embeds`]
    /// follows.
    pub fn token_logprobs_embeds(
        &mut self,
        batch: &GpuEmbedsBatch,
        weights: Weights,
        temperature: f32,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
    ) -> Result<usize> {
        let out = self.logprobs_inner(Input::Embeds(batch), weights, temperature, logp, entropy);
        self.abort_on_err(out)
    }

    /// Backward of the last policy [`GpuQwen2::token_logprobs`] on the same batch for a loss L
    /// with `dlogp[i] = ∂L/∂log π(targets[i])` ([B·T]; ignored where unlabelled): the LM head
    /// takes per-row `dloss = −dlogp` (`Qwen2::backward_logprobs`); parameter gradients are
    /// added into the fp32 gradients.
    pub fn backward_logprobs(&mut self, batch: &TokenBatch, dlogp: &[f32]) -> Result<()> {
        let out = self.backward_inner(Input::Tokens(batch), Dloss::Logprob(dlogp), false);
        self.abort_on_err(out).map(|_| ())
    }

    /// [`GpuQwen2::backward_logprobs`] after [`GpuQwen2::token_logprobs_embeds`]: decoder and
    /// embedding-table (text rows) gradients, and with `d_embeds` ∂L/∂embeddings [B·T, d] (as
    /// [`GpuQwen2::backward_embeds`]).
    pub fn backward_logprobs_embeds(
        &mut self,
        batch: &GpuEmbedsBatch,
        dlogp: &[f32],
        d_embeds: bool,
    ) -> Result<Option<Vec<f32>>> {
        let out = self.backward_inner(Input::Embeds(batch), Dloss::Logprob(dlogp), d_embeds);
        self.abort_on_err(out)
    }

    fn logprobs_inner(
        &mut self,
        input: Input,
        weights: Weights,
        temperature: f32,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
    ) -> Result<usize> {
        let (b, t) = input.bt();
        let n = b * t;
        if !(temperature.is_finite() && temperature > 0.0) {
            return shape_err(format!(
                "temperature {temperature} must be a finite number > 0"
            ));
        }
        for (name, len) in [
            ("logp", Some(logp.len())),
            ("entropy", entropy.as_deref().map(<[f32]>::len)),
        ] {
            if let Some(len) = len.filter(|&l| l != n) {
                return shape_err(format!(
                    "{name} buffer has {len} values, the batch needs {n}"
                ));
            }
        }
        let head = Head {
            temperature,
            entropy: entropy.is_some(),
        };
        let stats = self.forward_inner(input, head, weights)?;
        let ws = self.ws.as_ref().expect("forward ran");
        let losses = self.gpu.download(&r(&ws.ce_losses, n)?)?;
        for (lp, l) in logp.iter_mut().zip(losses) {
            *lp = -l;
        }
        if let Some(e) = entropy {
            self.gpu.download_into(e, &r(&ws.ce_entropy, n)?)?;
        }
        Ok(stats.n_tokens)
    }

    /// Passes `r` on; an error first aborts the sequence-parallel group, so the other ranks
    /// fail at their next exchange instead of waiting for this one.
    fn abort_on_err<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.abort_peers(&e.to_string());
        }
        r
    }

    /// Replaces how attention is computed (module docs of [`GpuAttention`]).
    pub fn set_attention(&mut self, attn: GpuAttention) {
        self.attn = attn;
    }

    pub fn attention(&self) -> &GpuAttention {
        &self.attn
    }

    /// Under sequence parallelism: switches the group's attention to `method` and `overlap`
    /// between steps (`GpuSpAttention::set_method`; every rank alike). An error with local
    /// attention.
    pub fn set_sp_method(
        &mut self,
        method: reel_parallel::SpMethod,
        overlap: reel_parallel::Overlap,
    ) -> Result<()> {
        match &mut self.attn {
            GpuAttention::Local => shape_err(
                "set_sp_method: the model's attention is local, not sequence-parallel".into(),
            ),
            GpuAttention::Sp(sp) => sp.set_method(method, overlap),
        }
    }

    /// Under sequence parallelism: announces the global length T of the coming batch and
    /// returns the sharding to cut it with (`None` with local attention: the model takes whole
    /// batches).
    pub fn set_seq_len(&mut self, seq_len: usize) -> Result<Option<reel_parallel::Sharding>> {
        match &mut self.attn {
            GpuAttention::Local => Ok(None),
            GpuAttention::Sp(sp) => sp.set_seq_len(seq_len).map(Some),
        }
    }

    /// Makes this model one replica of a data-parallel group (module docs of [`GpuDpGroup`]).
    pub fn set_dp_group(&mut self, dp: Box<dyn GpuDpGroup>) {
        self.dp = Some(dp);
    }

    /// (this replica's index, replicas): (0, 1) without a data-parallel group. Replica `r`
    /// trains micro-batches r, r + dp, … of each step.
    pub fn dp_coords(&self) -> (usize, usize) {
        self.dp
            .as_ref()
            .map_or((0, 1), |d| (d.dp_rank(), d.dp_size()))
    }

    /// Sums the fp32 gradients and `local` (this rank's loss sum and labelled-token count) over
    /// the sequence-parallel group and then the data-parallel group, on the device, so every
    /// rank of the world holds the global gradients (then identical bit for bit, so clipping
    /// sees the global norm and every rank's AdamW step is the same) and returns the global loss
    /// statistics. With local attention and one replica, `local` unchanged.
    ///
    /// With a sharded optimizer the gradients are reduce-scattered instead: afterwards this
    /// rank's shard of them holds the global sum (the rest is undefined). Sharded gradients
    /// were summed during the backward: only the loss statistics are.
    pub fn all_reduce_grads(&mut self, local: LossStats) -> Result<LossStats> {
        if let Some(z) = &self.shard {
            self.check_shard_groups(&z.plan)?;
        }
        if !self.has_groups() {
            return Ok(local);
        }
        // The loss sum as two f32s (high part, remainder), as the CPU trainer's all-reduce.
        let hi = local.loss_sum as f32;
        let lo = (local.loss_sum - hi as f64) as f32;
        let stats = &mut self.loss_stats;
        self.gpu
            .upload_into(stats, &[hi, lo, local.n_tokens as f32])?;
        match &self.shard {
            None => sum_over_groups(
                &self.attn,
                self.dp.as_deref(),
                &self.gpu,
                &mut [&mut self.grads, stats],
            )?,
            Some(z) if z.grads_sharded => {
                sum_over_groups(&self.attn, self.dp.as_deref(), &self.gpu, &mut [stats])?
            }
            Some(z) => {
                sum_over_groups(&self.attn, self.dp.as_deref(), &self.gpu, &mut [stats])?;
                let out = scatter_over_groups(
                    &self.attn,
                    self.dp.as_deref(),
                    &self.gpu,
                    &mut self.grads,
                    &z.plan,
                );
                self.abort_on_err(out)?;
            }
        }
        let s = self.gpu.download(&self.loss_stats)?;
        Ok(LossStats {
            loss_sum: s[0] as f64 + s[1] as f64,
            n_tokens: s[2].round() as usize,
        })
    }

    /// This rank's place in its sequence-parallel group (0 with local attention): the shard of
    /// each batch it trains on.
    pub fn sp_rank(&self) -> usize {
        match &self.attn {
            GpuAttention::Local => 0,
            GpuAttention::Sp(sp) => sp.rank(),
        }
    }

    /// Every rank's `x`, gathered over the sequence-parallel group and then the data-parallel
    /// group (`[x]` with neither), in world order (replica-major: rank dp_rank · sp + sp_rank),
    /// as the bytes of each value gathered by [`GpuQwen2::all_gather_f32`]. Used to compare the
    /// replicas' checksums.
    pub fn all_gather_u64(&self, x: u64) -> Result<Vec<u64>> {
        let bytes: Vec<f32> = x.to_le_bytes().into_iter().map(f32::from).collect();
        Ok(self
            .all_gather_f32(&bytes)?
            .chunks(8)
            .map(|c| u64::from_le_bytes(std::array::from_fn(|i| c[i].round() as u8)))
            .collect())
    }

    /// Every rank's `xs` (the same length on every rank), concatenated in world order over the
    /// sequence-parallel group and then the data-parallel group (`xs` with neither). Each level
    /// is an all-reduce of a `[P, n]` buffer in which each rank writes its values in its own
    /// row and zeros elsewhere, so the gather is exact (x + 0 = x).
    pub fn all_gather_f32(&self, xs: &[f32]) -> Result<Vec<f32>> {
        let mut all = xs.to_vec();
        if let GpuAttention::Sp(sp) = &self.attn {
            all = self.gather_level(&all, sp.rank(), sp.world_size(), |g, b| {
                sp.all_reduce_sum_dev(g, b)
            })?;
        }
        if let Some(dp) = &self.dp {
            all = self.gather_level(&all, dp.dp_rank(), dp.dp_size(), |g, b| {
                dp.dp_all_reduce(g, b)
            })?;
        }
        Ok(all)
    }

    /// Sums `xs` element-wise over the sequence-parallel group and then the data-parallel group
    /// (in place; unchanged with neither), through the device all-reduce the gradients take.
    /// Where exactly one rank holds a nonzero value (log-probabilities scattered by the ranks
    /// that own each position) the sum is that value, exactly.
    pub fn all_reduce_sum_host(&self, xs: &mut [f32]) -> Result<()> {
        if !self.has_groups() {
            return Ok(());
        }
        let mut buf = self.gpu.upload(xs)?;
        let out = sum_over_groups(&self.attn, self.dp.as_deref(), &self.gpu, &mut [&mut buf])
            .and_then(|_| self.gpu.download_into(xs, &buf));
        self.abort_on_err(out)
    }

    /// Whether this rank is one of a sequence-parallel or data-parallel group.
    fn has_groups(&self) -> bool {
        matches!(self.attn, GpuAttention::Sp(_)) || self.dp.is_some()
    }

    /// One level of [`GpuQwen2::all_gather_f32`]: `xs` of rank `r` of `p`, summed by `reduce`.
    fn gather_level(
        &self,
        xs: &[f32],
        r: usize,
        p: usize,
        reduce: impl Fn(&Gpu, &mut DeviceBuf<f32>) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let n = xs.len();
        let mut host = vec![0f32; p * n];
        host[r * n..(r + 1) * n].copy_from_slice(xs);
        let mut buf = self.gpu.upload(&host)?;
        let out = reduce(&self.gpu, &mut buf).and_then(|_| self.gpu.download(&buf));
        self.abort_on_err(out)
    }

    /// Aborts the sequence-parallel and data-parallel groups (no-op with neither): every rank's
    /// pending and later exchanges fail with `why`.
    pub fn abort_peers(&self, why: &str) {
        if let GpuAttention::Sp(sp) = &self.attn {
            sp.abort(why);
        }
        if let Some(dp) = &self.dp {
            dp.dp_abort(why);
        }
    }

    fn forward_inner(&mut self, input: Input, head: Head, weights: Weights) -> Result<LossStats> {
        self.check(input)?;
        if weights == Weights::Reference && self.ref16.is_none() {
            return shape_err("a reference forward needs set_reference first".into());
        }
        let (b, t) = input.bt();
        let m = Dims::new(&self.config, b, t);
        let n = m.n;
        self.reserve(n)?;
        let GpuQwen2 {
            config,
            layout,
            policy,
            ws,
            w16,
            ref16,
            rope,
            attn,
            gpu,
            ..
        } = self;
        let w16: &DeviceBuf<bf16> = match weights {
            Weights::Policy => w16,
            Weights::Reference => ref16.as_ref().expect("checked above"),
        };
        let ws = ws.as_mut().expect("reserved");
        let g: &Gpu = gpu;
        g.upload_into(&mut w(&mut ws.tokens, n)?, input.tokens())?;
        match input {
            Input::Tokens(b) => g.upload_into(&mut w(&mut ws.positions, n)?, b.positions)?,
            Input::Embeds(e) => {
                // Position k reads row k of the batch's own angle table.
                let iota: Vec<u32> = (0..n as u32).collect();
                g.upload_into(&mut w(&mut ws.positions, n)?, &iota)?;
                ws.angles.load_angles(g, e.cos, e.sin)?;
            }
        }
        g.embedding_forward(
            &mut w(&mut ws.xs[0], n * m.d)?,
            &r(&ws.tokens, n)?,
            &w16.view(layout.embed.clone())?,
            m.d,
        )?;
        if let Input::Embeds(e) = input {
            // The feature rows replace the table rows, one copy per run.
            let f16: Vec<bf16> = e.features.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut k = 0;
            for run in e.feature_runs() {
                let (a, z) = (run.start * m.d, run.end * m.d);
                g.upload_into(&mut ws.xs[0].view_mut(a..z)?, &f16[k..k + z - a])?;
                k += z - a;
            }
        }
        let rope: &GpuRopeTable = if input.is_embeds() { &ws.angles } else { rope };
        let cx = Ctx {
            gpu: g,
            rope,
            positions: r(&ws.positions, n)?,
            m,
            eps: config.rms_norm_eps,
        };
        let layers = config.num_hidden_layers;
        for l in 0..layers {
            let (before, after) = ws.xs.split_at_mut(l + 1);
            let (ai, ti) = match policy {
                CheckpointPolicy::None => (l, l),
                CheckpointPolicy::Layer => (0, 0),
                CheckpointPolicy::Remat => (0, l),
            };
            layer_forward(
                &cx,
                attn,
                &layer_w(w16, &layout.layers[l])?,
                &mut ws.acts[ai],
                &mut ws.attn[ti],
                &mut ws.lse[ti],
                &mut ws.qkv,
                &before[l],
                Some(&mut after[0]),
                true,
            )?;
        }
        g.rmsnorm_forward(
            &mut w(&mut ws.xn_f, n * m.d)?,
            &mut w(&mut ws.rstd_f, n)?,
            &r(&ws.xs[layers], n * m.d)?,
            &w16.view(layout.final_norm.clone())?,
            n,
            m.d,
            config.rms_norm_eps,
        )?;
        ws.head_scale = 1.0 / head.temperature;
        if head.temperature != 1.0 {
            g.scale_inplace(&mut w(&mut ws.xn_f, n * m.d)?, ws.head_scale)?;
        }
        let head_w = w16.view(layout.lm_head.clone())?;
        let count = if head.entropy {
            g.lm_head_ce_entropy_forward(
                &mut w(&mut ws.ce_losses, n)?,
                &mut w(&mut ws.ce_lse, n)?,
                &mut w(&mut ws.ce_entropy, n)?,
                &r(&ws.xn_f, n * m.d)?,
                &head_w,
                input.targets(),
                n,
                m.d,
                m.v,
                ce_chunk(n, m.v),
            )?
        } else {
            g.lm_head_ce_forward(
                &mut w(&mut ws.ce_losses, n)?,
                &mut w(&mut ws.ce_lse, n)?,
                &r(&ws.xn_f, n * m.d)?,
                &head_w,
                input.targets(),
                n,
                m.d,
                m.v,
                ce_chunk(n, m.v),
            )?
        };
        let losses = g.download(&r(&ws.ce_losses, n)?)?;
        let loss_sum: f64 = losses.iter().map(|&x| x as f64).sum();
        ws.last = Some((b, t, input.is_embeds(), weights));
        if !loss_sum.is_finite() {
            return Err(GpuError::NonFinite(format!(
                "loss {loss_sum} over {count} tokens"
            )));
        }
        Ok(LossStats {
            loss_sum,
            n_tokens: count,
        })
    }

    fn backward_inner(
        &mut self,
        input: Input,
        dloss: Dloss,
        d_embeds: bool,
    ) -> Result<Option<Vec<f32>>> {
        self.check(input)?;
        let (b, t) = input.bt();
        let last = (b, t, input.is_embeds(), Weights::Policy);
        if self.ws.as_ref().and_then(|w| w.last) != Some(last) {
            return shape_err("backward needs the policy forward of the same batch first".into());
        }
        let m = Dims::new(&self.config, b, t);
        let n = m.n;
        let GpuQwen2 {
            config,
            layout,
            policy,
            ws,
            w16,
            g16,
            grads,
            rope,
            attn,
            gpu,
            shard,
            dp,
            ..
        } = self;
        // Where a finished tensor's bf16 gradients go: added into the whole fp32 copy, or with
        // sharded gradients summed onto their owners' shards.
        let zero2 = shard.as_ref().filter(|z| z.grads_sharded).map(|z| &z.plan);
        let dp = dp.as_deref();
        let ws = ws.as_mut().expect("forward ran");
        // The backward consumes the layers' activations (their gradients take their places):
        // another backward needs another forward.
        ws.last = None;
        let g: &Gpu = gpu;
        let targets = input.targets();
        let dloss = dloss.per_row(targets)?;
        g.upload_into(&mut w(&mut ws.dloss, n)?, &dloss)?;
        g.zero(&mut g16.ends)?;
        g.lm_head_ce_backward(
            &mut w(&mut ws.dxn_f, n * m.d)?,
            &mut g16.ends.view_mut(g16.lm_head.clone())?,
            &r(&ws.xn_f, n * m.d)?,
            &w16.view(layout.lm_head.clone())?,
            targets,
            &r(&ws.ce_lse, n)?,
            &r(&ws.dloss, n)?,
            n,
            m.d,
            m.v,
            ce_chunk(n, m.v),
        )?;
        if ws.head_scale != 1.0 {
            // ∂L/∂xn = (1/τ)·∂L/∂(xn/τ).
            g.scale_inplace(&mut w(&mut ws.dxn_f, n * m.d)?, ws.head_scale)?;
        }
        let layers = config.num_hidden_layers;
        let [dx_a, dx_b] = &mut ws.dx;
        g.rmsnorm_backward(
            &mut w(dx_a, n * m.d)?,
            &mut g16.ends.view_mut(g16.final_norm.clone())?,
            &r(&ws.dxn_f, n * m.d)?,
            &r(&ws.xs[layers], n * m.d)?,
            &w16.view(layout.final_norm.clone())?,
            &r(&ws.rstd_f, n)?,
            n,
            m.d,
        )?;
        let rope: &GpuRopeTable = if input.is_embeds() { &ws.angles } else { rope };
        let cx = Ctx {
            gpu: g,
            rope,
            positions: r(&ws.positions, n)?,
            m,
            eps: config.rms_norm_eps,
        };
        let (mut dx_cur, mut dx_next) = (dx_a, dx_b);
        for l in (0..layers).rev() {
            let wt = layer_w(w16, &layout.layers[l])?;
            let (ai, ti) = match policy {
                CheckpointPolicy::None => (l, l),
                CheckpointPolicy::Layer => (0, 0),
                CheckpointPolicy::Remat => (0, l),
            };
            if *policy != CheckpointPolicy::None {
                layer_forward(
                    &cx,
                    attn,
                    &wt,
                    &mut ws.acts[ai],
                    &mut ws.attn[ti],
                    &mut ws.lse[ti],
                    &mut ws.qkv,
                    &ws.xs[l],
                    None,
                    *policy == CheckpointPolicy::Layer,
                )?;
            }
            let span = layout.layers[l].span();
            g.zero(&mut g16.layer)?;
            layer_backward(
                &cx,
                attn,
                &wt,
                &layout.layers[l].shifted(span.start),
                &mut ws.acts[ai],
                &ws.attn[ti],
                &ws.lse[ti],
                &mut ws.qkv,
                &ws.xs[l],
                &*dx_cur,
                &mut *dx_next,
                &mut g16.layer,
                &mut ws.bw,
            )?;
            let done = g16.layer.view(0..span.len())?;
            add_finished_grads(zero2, attn, dp, g, grads, &done, span)?;
            std::mem::swap(&mut dx_cur, &mut dx_next);
        }
        let mut d_rows = None;
        if let Input::Embeds(e) = input {
            if d_embeds {
                let dx: Vec<bf16> = g.download(&r(&*dx_cur, n * m.d)?)?;
                d_rows = Some(dx.iter().map(|x| x.to_f32()).collect());
            }
            // The feature rows give the table nothing.
            for run in e.feature_runs() {
                g.zero(&mut dx_cur.view_mut(run.start * m.d..run.end * m.d)?)?;
            }
        }
        g.embedding_backward(
            &mut g16.ends.view_mut(g16.embed.clone())?,
            &r(&*dx_cur, n * m.d)?,
            input.tokens(),
            m.d,
        )?;
        for [packed, flat] in g16.ends_in(layout) {
            add_finished_grads(zero2, attn, dp, g, grads, &g16.ends.view(packed)?, flat)?;
        }
        Ok(d_rows)
    }

    /// With sharded gradients, takes part in the gradient reduces of a backward this rank has
    /// no micro-batch for (a data-parallel replica with fewer micro-batches than the others this
    /// step), adding nothing, so the ranks that have one are not left waiting in them; nothing
    /// without sharded gradients (their sums meet once, in [`GpuQwen2::all_reduce_grads`]).
    pub fn skip_backward(&mut self) -> Result<()> {
        let out = self.skip_backward_inner();
        self.abort_on_err(out)
    }

    fn skip_backward_inner(&mut self) -> Result<()> {
        let GpuQwen2 {
            layout,
            g16,
            grads,
            attn,
            gpu,
            shard,
            dp,
            ..
        } = self;
        let Some(plan) = shard.as_ref().filter(|z| z.grads_sharded).map(|z| &z.plan) else {
            return Ok(());
        };
        let dp = dp.as_deref();
        // The same reduces, in the same order, as a backward: the layers last to first, then
        // the ends.
        gpu.zero(&mut g16.layer)?;
        for l in (0..layout.layers.len()).rev() {
            let span = layout.layers[l].span();
            let none = g16.layer.view(0..span.len())?;
            reduce_into_shard(attn, dp, gpu, plan, grads, &none, span)?;
        }
        gpu.zero(&mut g16.ends)?;
        for [packed, flat] in g16.ends_in(layout) {
            reduce_into_shard(attn, dp, gpu, plan, grads, &g16.ends.view(packed)?, flat)?;
        }
        Ok(())
    }

    /// Zeroes the fp32 gradients (start of an optimizer step). With a sharded optimizer the
    /// gathered master weights in the same buffer are gone until the next update.
    pub fn zero_grads(&mut self) -> Result<()> {
        if let Some(z) = &mut self.shard {
            z.gathered = false;
        }
        self.gpu.zero(&mut self.grads)
    }

    /// The fp32 gradients in the flat layout (with a sharded optimizer, after
    /// [`GpuQwen2::all_reduce_grads`], only this rank's shard holds the global sum); with
    /// sharded gradients, this rank's shard ([`OptShard::range`]'s values, padding included).
    pub fn grads_host(&self) -> Result<Vec<f32>> {
        match self.grads_sharded() {
            true => self.gpu.download(&self.grads),
            false => self.gpu.download(&self.grads.view(0..self.layout.total())?),
        }
    }

    /// This rank's optimizer shard, when the optimizer is sharded ([`GpuQwen2::new_sharded`]).
    pub fn opt_shard(&self) -> Option<&OptShard> {
        self.shard.as_ref().map(|z| &z.plan)
    }

    /// The fp32 master parameters on the device (flat layout), e.g. for a rollout decoder on
    /// the same device to take its weights from without a host copy. A sharded optimizer has
    /// them between an update and the next [`GpuQwen2::zero_grads`], else this is an error.
    pub fn params_device(&self) -> Result<DView<'_, f32>> {
        match &self.shard {
            None => Ok(DView::all(&self.master)),
            Some(z) if z.grads_sharded => shape_err(
                "the gradients are sharded: no GPU holds the whole fp32 master weights; every \
                 rank gathers them to the host with gather_params"
                    .into(),
            ),
            Some(z) if z.gathered => self.grads.view(0..self.layout.total()),
            Some(_) => shape_err(
                "the optimizer is sharded: the whole fp32 master weights are on hand only \
                 between an update and the next zero_grads"
                    .into(),
            ),
        }
    }

    /// The bf16 compute copy of the weights (flat layout), remade after every update: what a
    /// bf16 rollout decoder on the same device can read in place
    /// (`GpuDecoder::read_weights_in_place`).
    pub fn weights_device(&self) -> &DeviceBuf<bf16> {
        &self.w16
    }

    /// The fp32 master parameters in the flat layout (sharded: as [`GpuQwen2::params_device`]).
    pub fn params_host(&self) -> Result<Vec<f32>> {
        self.gpu.download(&self.params_device()?)
    }

    /// The fp32 master parameters in the flat layout, on the host of a rank with `keep`
    /// (`None` elsewhere). With sharded gradients a collective every rank of the world calls
    /// (the shards gathered a piece at a time, [`GATHER_CHUNK`] values a rank); otherwise
    /// [`GpuQwen2::params_host`] on the ranks that keep them.
    pub fn gather_params(&mut self, keep: bool) -> Result<Option<Vec<f32>>> {
        if !self.grads_sharded() {
            return keep.then(|| self.params_host()).transpose();
        }
        let out = self.gather_sharded_host(Held::Master, keep);
        self.abort_on_err(out)
    }

    /// A sharded-gradient rank's `what` (shard-sized) gathered to the host of a rank with
    /// `keep` (every rank takes part).
    fn gather_sharded_host(&self, what: Held, keep: bool) -> Result<Option<Vec<f32>>> {
        let Some(z) = &self.shard else {
            return shape_err("gather_sharded_host: the optimizer is not sharded".into());
        };
        let src = match what {
            Held::Master => &self.master,
            Held::M => &self.m,
            Held::V => &self.v,
        };
        let p = self.layout.total();
        let mut host = vec![0f32; if keep { p } else { 0 }];
        let g = &self.gpu;
        gather_chunked(
            &self.attn,
            self.dp.as_deref(),
            g,
            &z.plan,
            src,
            |at, v| match keep {
                true => g.download_into(&mut host[at], &v),
                false => Ok(()),
            },
        )?;
        Ok(keep.then_some(host))
    }

    /// The bf16 weights of `range` (flat layout) widened into `dst` (its length): what the
    /// forward computes with, on hand on every rank however the fp32 state is sharded.
    pub fn weights_range_into(&self, range: std::ops::Range<usize>, dst: &mut [f32]) -> Result<()> {
        check_host_range("weight", &range, dst)?;
        let w: Vec<bf16> = self.gpu.download(&self.w16.view(range)?)?;
        for (d, x) in dst.iter_mut().zip(w) {
            *d = x.to_f32();
        }
        Ok(())
    }

    /// The fp32 master parameters of `range` (flat layout) into `dst` (its length): one tensor
    /// refreshed on the host without copying the whole model.
    pub fn params_range_into(&self, range: std::ops::Range<usize>, dst: &mut [f32]) -> Result<()> {
        check_host_range("parameter", &range, dst)?;
        self.gpu
            .download_into(dst, &DView::of(&self.params_device()?, range)?)
    }

    /// Global L2 norm of the gradients; when `max_norm > 0` and the norm exceeds it, the
    /// gradients are scaled by `max_norm / (norm + 1e-6)` (torch's `clip_grad_norm_`, as
    /// `reel_optim::clip_grad_norm`). Returns the norm before clipping. With a sharded
    /// optimizer the shards' sums of squares are summed over the world and each rank scales its
    /// shard.
    pub fn clip_grad_norm(&mut self, max_norm: f32) -> Result<f32> {
        let out = self.clip_inner(max_norm);
        self.abort_on_err(out)
    }

    fn clip_inner(&mut self, max_norm: f32) -> Result<f32> {
        let GpuQwen2 {
            gpu,
            grads,
            shard,
            attn,
            dp,
            loss_stats,
            ..
        } = self;
        // The rank's part of the summed gradients: the shard's range of a whole buffer, or
        // all of a sharded (or replicated) one.
        let range = match shard {
            Some(z) if !z.grads_sharded => z.plan.range.clone(),
            _ => 0..grads.len(),
        };
        gpu.timed("optimizer", "clip_grad_norm", || {
            let mut grads = grads.view_mut(range)?;
            let mut sq = gpu.sum_squares(&[&grads])?;
            if shard.is_some() {
                // The sum as two f32s (high part, remainder), summed over the world.
                let hi = sq as f32;
                gpu.upload_into(loss_stats, &[hi, (sq - hi as f64) as f32, 0.0])?;
                sum_over_groups(attn, dp.as_deref(), gpu, &mut [loss_stats])?;
                let s = gpu.download(loss_stats)?;
                sq = s[0] as f64 + s[1] as f64;
            }
            let norm = sq.sqrt() as f32;
            if max_norm > 0.0 && norm.is_finite() {
                let scale = max_norm / (norm + 1e-6);
                if scale < 1.0 {
                    gpu.scale_f32(&mut grads, scale)?;
                }
            }
            Ok(norm)
        })
    }

    /// One AdamW step at `lr` over every tensor (weight decay where the layout says), bit-exact
    /// with `reel_optim::AdamW`; then the bf16 copy is remade. Sharded: the step over this
    /// rank's shard, the master shards all-gathered into the gradient buffer, the bf16 copy cast
    /// from there.
    pub fn adamw_step(&mut self, lr: f32) -> Result<()> {
        self.step += 1;
        let k = self.adamw.scalars(self.step, lr);
        let Some(z) = &self.shard else {
            for e in &self.layout.entries {
                let rg = e.range.clone();
                self.gpu.adamw_step(
                    &mut self.master.view_mut(rg.clone())?,
                    &self.grads.view(rg.clone())?,
                    &mut self.m.view_mut(rg.clone())?,
                    &mut self.v.view_mut(rg)?,
                    &k,
                    e.decay,
                )?;
            }
            return self.gpu.cast_from_f32(&mut self.w16, &self.master);
        };
        for seg in &z.segments {
            let l = seg.local.clone();
            let g = match z.grads_sharded {
                true => l.clone(),
                false => seg.global.clone(),
            };
            self.gpu.adamw_step(
                &mut self.master.view_mut(l.clone())?,
                &self.grads.view(g)?,
                &mut self.m.view_mut(l.clone())?,
                &mut self.v.view_mut(l)?,
                &k,
                seg.decay,
            )?;
        }
        if z.grads_sharded {
            // The master shards straight into the bf16 weights, a piece at a time.
            let GpuQwen2 {
                gpu,
                attn,
                dp,
                master,
                w16,
                ..
            } = self;
            let out = gather_chunked(attn, dp.as_deref(), gpu, &z.plan, master, |at, v| {
                gpu.cast_from_f32(&mut w16.view_mut(at)?, &v)
            });
            return self.abort_on_err(out);
        }
        let out = self.gather_shard(Held::Master);
        self.abort_on_err(out)?;
        let p = self.layout.total();
        self.gpu
            .cast_from_f32(&mut self.w16, &self.grads.view(0..p)?)?;
        if let Some(z) = &mut self.shard {
            z.gathered = true;
        }
        Ok(())
    }

    /// Copies this rank's shard of `what` into its range of the gradient buffer and all-gathers
    /// the world's shards there (sharded optimizer only).
    fn gather_shard(&mut self, what: Held) -> Result<()> {
        let Some(z) = &self.shard else {
            return shape_err("gather_shard: the optimizer is not sharded".into());
        };
        let src = match what {
            Held::Master => &self.master,
            Held::M => &self.m,
            Held::V => &self.v,
        };
        self.gpu
            .copy(&mut self.grads.view_mut(z.plan.range.clone())?, src)?;
        gather_over_groups(
            &self.attn,
            self.dp.as_deref(),
            &self.gpu,
            &mut self.grads,
            &z.plan,
        )
    }

    /// Refuses a sharded optimizer's collectives when the groups set differ from its plan.
    fn check_shard_groups(&self, plan: &OptShard) -> Result<()> {
        let (sp_rank, sp) = match &self.attn {
            GpuAttention::Local => (0, 1),
            GpuAttention::Sp(s) => (s.rank(), s.world_size()),
        };
        let (dp_rank, dp) = self.dp_coords();
        if (sp_rank, sp, dp_rank, dp) != (plan.sp_rank, plan.sp, plan.dp_rank, plan.dp) {
            return shape_err(format!(
                "optimizer shard planned for rank (dp {}, sp {}) of {} × {}, the model is rank \
                 (dp {dp_rank}, sp {sp_rank}) of {dp} × {sp}",
                plan.dp_rank, plan.sp_rank, plan.dp, plan.sp
            ));
        }
        Ok(())
    }

    /// The optimizer state in `reel_optim::AdamW`'s form (one vector per layout entry). A
    /// sharded optimizer refuses: its state is gathered by [`GpuQwen2::gather_state`].
    pub fn opt_state(&self) -> Result<AdamWState> {
        if self.shard.is_some() {
            return shape_err(
                "the optimizer is sharded: gather its state with gather_state on every rank".into(),
            );
        }
        let (m, v) = (self.gpu.download(&self.m)?, self.gpu.download(&self.v)?);
        Ok(self.flat_state(&m, &v))
    }

    /// The optimizer state in `reel_optim::AdamW`'s form from whole flat moments.
    fn flat_state(&self, m: &[f32], v: &[f32]) -> AdamWState {
        let ranges = self.layout.entry_ranges();
        AdamWState {
            step: self.step,
            m: reel_optim::shard::per_entry(m, &ranges),
            v: reel_optim::shard::per_entry(v, &ranges),
        }
    }

    /// The fp32 master parameters and the optimizer state, whole: [`GpuQwen2::params_host`] and
    /// [`GpuQwen2::opt_state`], or with a sharded optimizer their gathers over the world, which
    /// every rank calls (after an update; the gradient buffer carries each gather and holds the
    /// master weights again afterwards). Only a rank with `keep` downloads them (`None`
    /// elsewhere), so the ranks of one process need not each hold a host copy.
    pub fn gather_state(&mut self, keep: bool) -> Result<Option<(Vec<f32>, AdamWState)>> {
        if self.shard.is_none() {
            return Ok(if keep {
                Some((self.params_host()?, self.opt_state()?))
            } else {
                None
            });
        }
        if self.grads_sharded() {
            let mut got = Vec::with_capacity(3);
            for what in [Held::Master, Held::M, Held::V] {
                let out = self.gather_sharded_host(what, keep);
                got.push(self.abort_on_err(out)?);
            }
            let [Some(params), Some(m), Some(v)] = <[_; 3]>::try_from(got).expect("three") else {
                return Ok(None);
            };
            return Ok(Some((params, self.flat_state(&m, &v))));
        }
        let params = if keep {
            Some(self.params_host()?)
        } else {
            None
        };
        let p = self.layout.total();
        let mut moments = Vec::with_capacity(2);
        for what in [Held::M, Held::V] {
            let out = self.gather_shard(what);
            self.abort_on_err(out)?;
            if keep {
                moments.push(self.gpu.download(&self.grads.view(0..p)?)?);
            }
        }
        let out = self.gather_shard(Held::Master);
        self.abort_on_err(out)?;
        let (Some(params), [m, v]) = (params, moments.as_slice()) else {
            return Ok(None);
        };
        Ok(Some((params, self.flat_state(m, v))))
    }

    /// Replaces the optimizer state (from [`GpuQwen2::opt_state`], [`GpuQwen2::gather_state`]
    /// or a checkpoint: the whole state; a sharded optimizer keeps its shard of it).
    pub fn load_opt_state(&mut self, s: reel_optim::AdamWStateRef<'_>) -> Result<()> {
        let n = self.layout.entries.len();
        if s.m.len() != n || s.v.len() != n {
            return shape_err(format!(
                "optimizer state has {} / {} tensors, the model {n}",
                s.m.len(),
                s.v.len()
            ));
        }
        for (i, e) in self.layout.entries.iter().enumerate() {
            if s.m[i].len() != e.range.len() || s.v[i].len() != e.range.len() {
                return shape_err(format!(
                    "optimizer state for {} has the wrong length",
                    e.name
                ));
            }
        }
        // The entries tile the flat layout in order; a shard takes only its part.
        let (m, v) = match &self.shard {
            Some(z) => z.plan.slice_state(s, &self.layout.entry_ranges()),
            None => (s.m.concat(), s.v.concat()),
        };
        self.load_opt_moments(s.step, &m, &v)
    }

    /// The part of the flat layout whose AdamW moments this rank keeps: its shard (padding
    /// included) with a sharded optimizer, else all of it. What
    /// [`GpuQwen2::load_opt_moments`] takes.
    pub fn opt_part(&self) -> std::ops::Range<usize> {
        match &self.shard {
            Some(z) => z.plan.range.clone(),
            None => 0..self.layout.total(),
        }
    }

    /// Replaces the optimizer state with this rank's part of it ([`GpuQwen2::opt_part`]): the
    /// step count and the moments of that part, flat (e.g. read from a checkpoint's file
    /// without the rest).
    pub fn load_opt_moments(&mut self, step: u64, m: &[f32], v: &[f32]) -> Result<()> {
        let n = self.opt_part().len();
        if m.len() != n || v.len() != n {
            return shape_err(format!(
                "optimizer moments of {} / {} values for a part of {n}",
                m.len(),
                v.len()
            ));
        }
        self.gpu.upload_into(&mut self.m, m)?;
        self.gpu.upload_into(&mut self.v, v)?;
        self.step = step;
        Ok(())
    }
}
