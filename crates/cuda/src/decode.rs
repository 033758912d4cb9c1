//! The rollout engine's decoding step on one GPU: `reel_model::Qwen2::forward_step` (continuous
//! batching over a paged KV cache; see its module docs for the equations) with the weights, the
//! KV blocks and the activations on the device.
//!
//! One step runs, for each sequence s, n_s new tokens (a prompt chunk or one decoded token)
//! after what its block table holds, stacked into N = Σ n_s rows:
//!
//!   x [N, d] = embed(tokens), or the sequence's input-embedding rows where given (VLM prompts)
//!   per layer: qkv [N, (H + 2·H_kv)·D] = rmsnorm(x)·W_qkvᵀ + b      (cuBLASLt, bias fused)
//!              q rotated; k rotated and v stored at each row's slot   (`decode_qkv_store`)
//!              attn [N, H·D] = paged attention over each table       (`paged_attention_forward`)
//!                 — or, for a long prompt chunk (≥ [`CUDNN_PREFILL_ROWS`] rows, bf16 storage),
//!                 cuDNN's fused attention: the chunk's keys and values gathered from the pool,
//!                 the chunk against itself (causal) and, after earlier chunks, against the
//!                 keys before it (full), the two merged by their lse in f32; the chunk's rows
//!                 are padded to a multiple of [`PREFILL_PAD`] so few plans serve every length
//!              x += attn·W_oᵀ; x += swiglu(rmsnorm(x)·W_guᵀ)·W_dᵀ     (β = 1 GEMMs)
//!   logits [S_l, V] f32 = rmsnorm(x[last rows])·W_lmᵀ, downloaded ([`GpuDecoder::step`]);
//!   or, when the engine's sampling needs only each row's k best entries ([`GpuDecoder::step_top`]:
//!   greedy, or top-k with k ≤ [`TOPK_CAP`]), those k ids and logits and the two parts of the
//!   row's log-sum-exp at its temperature, found on the device ([`Gpu::topk_lse`]) and
//!   downloaded instead: 8k + 8 bytes a row in place of 4V (V = 151,936: 608 KB).
//!
//! Storage T is bf16 (the speed path) or f32 (exact comparison with the CPU); arithmetic is f32
//! in every GEMM, norm and softmax. The KV cache is one device buffer of 2·L planes (layer l's K
//! is plane 2l, its V plane 2l + 1), each `BlockPool`'s [num_blocks, block_size, H_kv, D]. The
//! block tables and reference counts stay on the host in a `BlockPool::new_device` pool; the
//! copies on write it queues are carried out on the device at the start of the next step, before
//! any write. Rotations: 1-D positions read the device RoPE table; M-RoPE rows (Qwen2.5-VL's
//! 3-D positions) turn by per-row angles computed on the host by `reel_model::vl::mrope_angles`
//! (the CPU step's function) and uploaded with the step. Any mix of token/embedding inputs and
//! 1-D/M-RoPE positions may share a step.
//!
//! A shared prefill ([`GpuDecoder::prefill_shared`], MR-SP's sequence-parallel prefill) runs a
//! long prompt over a group of decoders, one per GPU, each with its own pool: the prompt in
//! segments of P · [`SHARED_PREFILL_ROWS`] rows, each segment's rows in 2P chunks of which rank
//! r runs chunks r and 2P − 1 − r (`reel_rollout::shared_prefill`) as two sequences placed at
//! their offsets in the prompt's table. After each layer stores its rows' keys and values, they
//! are gathered from the pool into the rank's part of one buffer, the parts all-gathered in
//! place, and every other rank's rows put at their slots (`put_kv_rows`), so attention (paged, or
//! cuDNN for long chunks) sees every earlier key; the last layer stops after the exchange. Each
//! rank computes 1/P of the prompt's rows and of its causal attention, and every rank's cache
//! ends holding the whole prompt: the owner decodes from it, the others drop it.

use cudarc::driver::PinnedHostSlice;
use half::bf16;
use reel_kernels::rope::RopeTable;
use reel_model::decode::{SeqStep, StepInput, StepPositions};
use reel_model::vl::mrope_angles;
use reel_model::{ParamLayout, Qwen2Config};
use reel_rollout::paged_attention::{PagedSeq, PagedShape};
use reel_rollout::shared_prefill::{segment_steps, segments, step_rows, PrefillSplit, NO_SLOT};
use reel_rollout::{BlockCopy, BlockPool, BlockTable, KvLayout, RolloutError, StepModel, TopRows};

use crate::buffer::{DView, DViewMut, DevRead};
use crate::ops::{as_i32, cfg, elementwise_grid, launch, row_threads};
use crate::{
    shape_err, DeviceBuf, Gpu, GpuError, GpuFloat, GpuPagedBatch, GpuRopeTable, Result, TOPK_CAP,
};

/// The fewest rows of a sequence's chunk that take cuDNN's attention instead of the paged
/// kernel (which reads every earlier key once per query row: fine for decoding, quadratic
/// memory traffic for a long prompt). [`GpuDecoder::set_cudnn_prefill_rows`] changes it.
pub const CUDNN_PREFILL_ROWS: usize = 1024;

/// Rows each rank computes per segment of a shared prefill ([`GpuDecoder::prefill_shared`]): a
/// 262k-token prompt over 2 GPUs runs in 8 segments of 32,768 rows, each rank's two chunks of
/// 8,192 rows attending through cuDNN; the step buffers stay the size of a 16k-row step.
pub const SHARED_PREFILL_ROWS: usize = 16_384;

/// A long chunk's rows (and its own keys) are padded to a multiple of this for cuDNN, so plans
/// are made per bucket of lengths, not per length.
pub const PREFILL_PAD: usize = 256;

/// A long prompt chunk of a step: its rows, the keys cached before it, and where the slots of
/// all its keys (earlier and own) start in the step's slot upload.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
struct LongChunk {
    rows: std::ops::Range<usize>,
    past: usize,
    slots_at: usize,
}

/// The KV blocks of a pool on the device: 2·L planes of [num_blocks, block_size, H_kv, D].
struct DeviceKv<T: GpuFloat> {
    layout: KvLayout,
    data: DeviceBuf<T>,
}

impl<T: GpuFloat> DeviceKv<T> {
    fn plane(&self) -> usize {
        let l = &self.layout;
        l.num_blocks * l.block_size * l.h_kv * l.d
    }
}

/// Step buffers, sized for `cap` rows.
struct StepBufs<T: GpuFloat> {
    cap: usize,
    x: DeviceBuf<T>,
    xn: DeviceBuf<T>,
    rstd: DeviceBuf<f32>,
    qkv: DeviceBuf<T>,
    q: DeviceBuf<T>,
    attn: DeviceBuf<T>,
    lse: DeviceBuf<f32>,
    gate_up: DeviceBuf<T>,
    act: DeviceBuf<T>,
}

impl<T: GpuFloat> StepBufs<T> {
    fn new(gpu: &Gpu, c: &Qwen2Config, cap: usize) -> Result<Self> {
        let (d, qw) = (c.hidden_size, c.num_attention_heads * c.head_dim);
        let width = qw + 2 * c.num_key_value_heads * c.head_dim;
        let z = |n: usize| gpu.alloc_zeros::<T>(n.max(1));
        Ok(StepBufs {
            cap,
            x: z(cap * d)?,
            xn: z(cap * d)?,
            rstd: gpu.alloc_zeros(cap)?,
            qkv: z(cap * width)?,
            q: z(cap * qw)?,
            attn: z(cap * qw)?,
            lse: gpu.alloc_zeros(cap * c.num_attention_heads)?,
            gate_up: z(cap * 2 * c.intermediate_size)?,
            act: z(cap * c.intermediate_size)?,
        })
    }
}

/// Rows of one step as the kernels read them (built and checked on the host).
struct StepRows {
    /// Per row: token id (0 for rows given as embeddings), rotary row, cache slot
    /// (block · block_size + offset). The rotary row is the 1-D position p (< max_pos) of the
    /// shared table, or max_pos + k for row k of the step's M-RoPE angles.
    tokens: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    /// Rows whose logits are wanted (each such sequence's last row), in step order.
    last: Vec<u32>,
    /// Each sequence's rows.
    rows: Vec<std::ops::Range<usize>>,
    /// Sequences given as input embeddings: (their rows, the sequence's index).
    embedded: Vec<(std::ops::Range<usize>, usize)>,
    /// The M-RoPE rows' angles, cos then sin, each [rows, D/2] (`vl::mrope_angles`).
    mrope_cos: Vec<f32>,
    mrope_sin: Vec<f32>,
}

/// The cache slots (block · block_size + offset) of a sequence's positions `ps` under its block
/// table `blocks`.
fn cache_slots(
    blocks: &[u32],
    bs: usize,
    ps: std::ops::Range<usize>,
) -> impl Iterator<Item = u32> + '_ {
    ps.map(move |p| cache_slot(blocks, bs, p))
}

/// The cache slot of position `p` under the block table `blocks`.
fn cache_slot(blocks: &[u32], bs: usize, p: usize) -> u32 {
    blocks[p / bs] * bs as u32 + (p % bs) as u32
}

/// Where a sequence's new rows go: its blocks, and the keys cached before them.
#[derive(Clone, Copy)]
struct Place<'t> {
    blocks: &'t [u32],
    past: usize,
}

impl<'t> Place<'t> {
    fn of(table: &'t BlockTable) -> Self {
        Place {
            blocks: table.block_ids(),
            past: table.len(),
        }
    }
}

/// Checks the step against the model and the places and lays out its rows; M-RoPE angles come
/// from `rope` (the 1-D table of the model's head_dim, max_position_embeddings and theta).
fn plan_rows(
    c: &Qwen2Config,
    steps: &[SeqStep],
    places: &[Place],
    bs: usize,
    rope: &mut Option<RopeTable>,
) -> Result<StepRows> {
    if steps.len() != places.len() {
        return shape_err(format!(
            "decode step: {} sequences but {} block tables",
            steps.len(),
            places.len()
        ));
    }
    let (d, max_pos) = (c.hidden_size, c.max_position_embeddings);
    let mut r = StepRows {
        tokens: Vec::new(),
        positions: Vec::new(),
        slots: Vec::new(),
        last: Vec::new(),
        rows: Vec::with_capacity(steps.len()),
        embedded: Vec::new(),
        mrope_cos: Vec::new(),
        mrope_sin: Vec::new(),
    };
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for (s, (step, place)) in steps.iter().zip(places).enumerate() {
        let at = r.tokens.len();
        let n = match step.input {
            StepInput::Tokens(ids) => {
                if let Some(&t) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
                    return shape_err(format!(
                        "decode step: sequence {s}: token id {t} is outside the vocabulary ({})",
                        c.vocab_size
                    ));
                }
                r.tokens.extend_from_slice(ids);
                ids.len()
            }
            StepInput::Embeddings(e) => {
                if !e.len().is_multiple_of(d) {
                    return shape_err(format!(
                        "decode step: sequence {s}: {} input-embedding values are not rows of \
                         hidden_size {d}",
                        e.len()
                    ));
                }
                let n = e.len() / d;
                r.tokens.extend(std::iter::repeat_n(0, n));
                if n > 0 {
                    r.embedded.push((at..at + n, s));
                }
                n
            }
        };
        if n == 0 {
            return shape_err(format!("decode step: sequence {s} has no new tokens"));
        }
        match step.positions {
            StepPositions::Linear { start } => {
                if start + n > max_pos {
                    return shape_err(format!(
                        "decode step: sequence {s} reaches position {} but \
                         max_position_embeddings is {max_pos}",
                        start + n - 1
                    ));
                }
                r.positions.extend(start as u32..(start + n) as u32);
            }
            StepPositions::MRope { ids, sections } => {
                if ids.len() != n {
                    return shape_err(format!(
                        "decode step: sequence {s} has {n} new tokens but {} M-RoPE positions",
                        ids.len()
                    ));
                }
                if sections.iter().sum::<usize>() != c.head_dim / 2 {
                    return shape_err(format!(
                        "decode step: sequence {s}: M-RoPE sections {sections:?} must sum to \
                         head_dim / 2 = {}",
                        c.head_dim / 2
                    ));
                }
                if let Some(p) = ids.iter().flatten().find(|&&p| p as usize >= max_pos) {
                    return shape_err(format!(
                        "decode step: sequence {s}: M-RoPE position {p} exceeds \
                         max_position_embeddings ({max_pos})"
                    ));
                }
                let k0 = r.mrope_cos.len() / (c.head_dim / 2).max(1);
                if max_pos + k0 + n > u32::MAX as usize {
                    return shape_err(format!(
                        "decode step: {} M-RoPE rows overflow the row index",
                        k0 + n
                    ));
                }
                let table =
                    rope.get_or_insert_with(|| RopeTable::new(c.head_dim, max_pos, c.rope_theta));
                mrope_angles(table, sections, n, |k, a| ids[k][a], &mut cos, &mut sin);
                r.mrope_cos.extend_from_slice(&cos);
                r.mrope_sin.extend_from_slice(&sin);
                r.positions
                    .extend((max_pos + k0) as u32..(max_pos + k0 + n) as u32);
            }
        }
        let Place { blocks, past } = *place;
        if (past + n).div_ceil(bs) > blocks.len() {
            return shape_err(format!(
                "decode step: sequence {s} needs room for {} tokens, its table has {} blocks \
                 of {bs}",
                past + n,
                blocks.len()
            ));
        }
        r.slots.extend(cache_slots(blocks, bs, past..past + n));
        if step.logits {
            r.last.push((at + n - 1) as u32);
        }
        r.rows.push(at..at + n);
    }
    Ok(r)
}

/// Attention of one long prompt chunk through cuDNN (module docs): its keys and values (`keys =
/// past + rows` of them, slots `slots[ch.slots_at..]`) gathered from the layer's cache planes;
/// the chunk's rows, padded to a multiple of [`PREFILL_PAD`], against its own keys (causal;
/// padded keys come after every real query) and, when `past > 0`, against the earlier keys
/// (full), merged by lse in f32. Writes the chunk's rows of `b.attn` and `b.lse`. bf16 only.
#[cfg(feature = "cudnn")]
fn chunk_attention<T: GpuFloat>(
    g: &Gpu,
    b: &mut StepBufs<T>,
    kc: &DView<'_, T>,
    vc: &DView<'_, T>,
    slots: &crate::Scratch<'_, u32>,
    ch: &LongChunk,
    (h, h_kv, hd): (usize, usize, usize),
) -> Result<()> {
    use reel_kernels::attention::{AttnMask, AttnShape};
    let (qw, kvw) = (h * hd, h_kv * hd);
    let (c, past) = (ch.rows.len(), ch.past);
    let cp = c.next_multiple_of(PREFILL_PAD);
    let keys = past + c;
    let idx = DView::of(slots, ch.slots_at..ch.slots_at + keys)?;
    // Gathered keys and values, the own part padded with zero rows.
    let gather = |cache: &DView<'_, T>| -> Result<crate::Scratch<'_, T>> {
        let mut all = g.scratch::<T>((past + cp) * kvw)?;
        g.gather_into(&mut all, cache, &idx, kvw)?;
        g.zero(&mut all.view_mut(keys * kvw..(past + cp) * kvw)?)?;
        Ok(all)
    };
    let (kall, vall) = (gather(kc)?, gather(vc)?);
    let mut q = g.scratch::<T>(cp * qw)?;
    g.copy(
        &mut q.view_mut(0..c * qw)?,
        &b.q.view(ch.rows.start * qw..ch.rows.end * qw)?,
    )?;
    g.zero(&mut q.view_mut(c * qw..cp * qw)?)?;
    let q16 = q.view(0..cp * qw)?.retype::<bf16>();
    let mut out = g.scratch::<T>(cp * qw)?;
    let mut lse = g.scratch::<f32>(cp * h)?;
    let own_k = kall.view(past * kvw..(past + cp) * kvw)?.retype::<bf16>();
    let own_v = vall.view(past * kvw..(past + cp) * kvw)?.retype::<bf16>();
    g.attention_forward(
        &mut out.view_mut(0..cp * qw)?.retype::<bf16>(),
        &mut lse.view_mut(0..cp * h)?,
        &q16,
        &own_k,
        &own_v,
        AttnShape {
            b: 1,
            tq: cp,
            tk: cp,
            h,
            h_kv,
            d: hd,
        },
        AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        },
    )?;
    let rows = ch.rows.start..ch.rows.end;
    if past == 0 {
        g.copy(
            &mut b.attn.view_mut(rows.start * qw..rows.end * qw)?,
            &out.view(0..c * qw)?,
        )?;
        return g.copy(
            &mut b.lse.view_mut(rows.start * h..rows.end * h)?,
            &lse.view(0..c * h)?,
        );
    }
    // Against the earlier keys, then the merge: o' = o − σ(lse_b − lse)·(o − o_b).
    let mut prior = g.scratch::<T>(cp * qw)?;
    let mut lse_b = g.scratch::<f32>(cp * h)?;
    g.attention_forward(
        &mut prior.view_mut(0..cp * qw)?.retype::<bf16>(),
        &mut lse_b.view_mut(0..cp * h)?,
        &q16,
        &kall.view(0..past * kvw)?.retype::<bf16>(),
        &vall.view(0..past * kvw)?.retype::<bf16>(),
        AttnShape {
            b: 1,
            tq: cp,
            tk: past,
            h,
            h_kv,
            d: hd,
        },
        AttnMask::Full,
    )?;
    let mut o32 = g.scratch::<f32>(c * qw)?;
    let mut p32 = g.scratch::<f32>(c * qw)?;
    g.to_f32(&mut o32, &out.view(0..c * qw)?)?;
    g.to_f32(&mut p32, &prior.view(0..c * qw)?)?;
    let mut lse_c = lse.view_mut(0..c * h)?;
    g.attention_merge(
        &mut o32,
        &mut lse_c,
        &p32,
        &lse_b.view(0..c * h)?,
        c * h,
        hd,
    )?;
    g.cast_from_f32(&mut b.attn.view_mut(rows.start * qw..rows.end * qw)?, &o32)?;
    g.copy(
        &mut b.lse.view_mut(rows.start * h..rows.end * h)?,
        &lse.view(0..c * h)?,
    )
}

/// The ranks a decoder prefills long prompts with ([`GpuDecoder::set_prefill_group`]): any
/// device group (in-process ranks, or NCCL across processes) seen through the one collective a
/// shared prefill needs.
pub trait PrefillGroup: Send {
    fn prefill_rank(&self) -> usize;
    fn prefill_world(&self) -> usize;
    /// Gives every rank each rank r's chunk r of `buf` (P equal chunks), in place
    /// ([`crate::DeviceGroup::all_gather_dev`]).
    fn gather_parts(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()>;
}

impl<C: crate::DeviceGroup + Send> PrefillGroup for C {
    fn prefill_rank(&self) -> usize {
        crate::DeviceP2p::rank(self)
    }

    fn prefill_world(&self) -> usize {
        crate::DeviceP2p::world_size(self)
    }

    fn gather_parts(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        crate::DeviceGroup::all_gather_dev(self, gpu, buf)
    }
}

/// A shared prefill's host plan: where each gathered row's key and value go ([P · m] slots,
/// part-major, `NO_SLOT` for rows not put) and m, the rows of each rank's part.
struct SharedRows {
    put: Vec<u32>,
    m: usize,
}

/// One shared prefill's device side: the put lists and the gather buffer of P parts, each a
/// rank's m key rows then m value rows (padding undefined), reused by every layer.
struct Exchange<'g> {
    put: crate::Scratch<'g, u32>,
    buf: crate::Scratch<'g, f32>,
    m: usize,
    kvw: usize,
}

impl<'g> Exchange<'g> {
    fn new<T: GpuFloat>(
        g: &'g Gpu,
        group: &dyn PrefillGroup,
        x: &SharedRows,
        kvw: usize,
    ) -> Result<Self> {
        let world = group.prefill_world();
        if x.put.len() != world * x.m {
            return shape_err(format!(
                "shared prefill: {} put slots for {world} parts of {} rows",
                x.put.len(),
                x.m
            ));
        }
        let words = Self::words::<T>(x.m, kvw);
        Ok(Exchange {
            put: g.scratch_from(&x.put)?,
            buf: g.scratch::<f32>((world * words).max(1))?,
            m: x.m,
            kvw,
        })
    }

    /// f32 words of one rank's part (2·m rows of H_kv·D values of T; H_kv·D is even).
    fn words<T: GpuFloat>(m: usize, kvw: usize) -> usize {
        (2 * m * kvw * std::mem::size_of::<T>()).div_ceil(4)
    }

    /// One layer: this rank's `own` rows (slots at `own_slots`) gathered from the K and V
    /// planes into its part, the parts all-gathered, every other rank's rows put at their
    /// slots.
    fn run<T: GpuFloat>(
        &mut self,
        g: &Gpu,
        group: &dyn PrefillGroup,
        (kp, vp): (u64, u64),
        own_slots: u64,
        own: usize,
    ) -> Result<()> {
        let (rank, world) = (group.prefill_rank(), group.prefill_world());
        let (m, kvw) = (self.m, self.kvw);
        let words = Self::words::<T>(m, kvw);
        let sz = std::mem::size_of::<T>() as u64;
        let d32 = as_i32("shared prefill", "H_kv·D", kvw)?;
        let base = self.buf.dptr() + (rank * words * 4) as u64;
        g.bind()?;
        if own > 0 {
            let idx = own_slots;
            for (dst, src) in [(base, kp), (base + m as u64 * kvw as u64 * sz, vp)] {
                launch!(
                    g,
                    &g.kernels.gather_rows[T::INDEX],
                    cfg((own as u32, 1, 1), (row_threads(kvw), 1, 1)),
                    &dst,
                    &src,
                    &idx,
                    &d32
                )?;
            }
        }
        group.gather_parts(g, &mut self.buf.view_mut(0..world * words)?)?;
        let (src, list) = (self.buf.dptr(), self.put.dptr());
        let m32 = as_i32("shared prefill", "rows a part", m)?;
        g.bind()?;
        launch!(
            g,
            &g.kernels.put_kv_rows[T::INDEX],
            cfg(((world * m) as u32, 1, 1), (row_threads(kvw), 1, 1)),
            &kp,
            &vp,
            &src,
            &list,
            &m32,
            &d32
        )?;
        Ok(())
    }
}

/// A Qwen2 decoder for the rollout engine on one GPU (module docs): weights in T, the KV blocks
/// of the pool it made ([`StepModel::new_pool`]) on the device.
pub struct GpuDecoder<T: GpuFloat = bf16> {
    config: Qwen2Config,
    layout: ParamLayout,
    weights: DecoderWeights<T>,
    rope: GpuRopeTable,
    /// The same table on the host, made on the first M-RoPE step (its angles are computed
    /// there, as the CPU step does).
    host_rope: Option<RopeTable>,
    kv: Option<DeviceKv<T>>,
    bufs: Option<StepBufs<T>>,
    batch: Option<GpuPagedBatch>,
    /// Device logits [rows, V], grown to the most rows that asked for logits in one step.
    dev_logits: Option<DeviceBuf<f32>>,
    /// Their host copy, in page-locked memory (the download runs at the link's full rate).
    logits: Option<PinnedHostSlice<f32>>,
    /// What [`GpuDecoder::step_top`] downloaded: the ids [S_l, k]; the values [S_l, k], max
    /// [S_l] and sum [S_l].
    top_ids: Vec<u32>,
    top_f: Vec<f32>,
    /// The most candidates per row offered to the engine (module docs).
    max_candidates: usize,
    /// Chunks of at least this many rows attend through cuDNN (module docs).
    cudnn_prefill_rows: usize,
    /// Rows whose attention ran through cuDNN so far.
    cudnn_rows_run: u64,
    /// The peers long prompts are prefilled with ([`GpuDecoder::set_prefill_group`]).
    prefill: Option<Box<dyn PrefillGroup>>,
    /// Rows a rank computes per segment of a shared prefill.
    shared_prefill_rows: usize,
    gpu: Gpu,
}

/// A decoder's weights (flat `ParamLayout`): its own copy, or a trainer's compute copy of the
/// same values on the same device, read in place ([`GpuDecoder::read_weights_in_place`]).
enum DecoderWeights<T: GpuFloat> {
    Own(DeviceBuf<T>),
    InPlace {
        ptr: u64,
        len: usize,
    },
    /// None for now ([`GpuDecoder::release_weights`]).
    Released,
}

impl<T: GpuFloat> DecoderWeights<T> {
    fn view(&self, r: std::ops::Range<usize>) -> Result<DView<'_, T>> {
        match self {
            DecoderWeights::Own(b) => b.view(r),
            DecoderWeights::InPlace { ptr, len } => {
                if r.start > r.end || r.end > *len {
                    return shape_err(format!("weights range {r:?} of {len}"));
                }
                let at = ptr + (r.start * std::mem::size_of::<T>()) as u64;
                // SAFETY: inside the buffer `read_weights_in_place`'s caller keeps alive.
                Ok(unsafe { DView::from_raw(at, r.len()) })
            }
            DecoderWeights::Released => shape_err(
                "the decoder's weights were released (release_weights) and not given back".into(),
            ),
        }
    }

    /// The decoder's own copy, to be overwritten; an error for weights read in place.
    fn own(&mut self) -> Result<&mut DeviceBuf<T>> {
        match self {
            DecoderWeights::Own(b) => Ok(b),
            DecoderWeights::InPlace { .. } => shape_err(
                "the decoder reads its trainer's weights in place: they change with the trainer's"
                    .into(),
            ),
            DecoderWeights::Released => {
                shape_err("the decoder's weights were released (release_weights)".into())
            }
        }
    }
}

impl<T: GpuFloat> GpuDecoder<T> {
    /// Uploads `params` (the CPU model's flat f32 buffer in `ParamLayout`) as T weights.
    pub fn new(gpu: Gpu, config: Qwen2Config, params: &[f32]) -> Result<Self> {
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
        let weights = {
            let mut w = gpu.alloc_zeros::<T>(params.len())?;
            gpu.upload_cast(&mut w, params)?;
            w
        };
        let rope = GpuRopeTable::new(
            &gpu,
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        )?;
        Ok(GpuDecoder {
            config,
            layout,
            weights: DecoderWeights::Own(weights),
            rope,
            host_rope: None,
            kv: None,
            bufs: None,
            batch: None,
            dev_logits: None,
            logits: None,
            top_ids: Vec::new(),
            top_f: Vec::new(),
            max_candidates: TOPK_CAP,
            cudnn_prefill_rows: CUDNN_PREFILL_ROWS,
            cudnn_rows_run: 0,
            prefill: None,
            shared_prefill_rows: SHARED_PREFILL_ROWS,
            gpu,
        })
    }

    /// The decoder of a CPU model (its weights uploaded once).
    pub fn from_model(gpu: Gpu, model: &reel_model::Qwen2) -> Result<Self> {
        Self::new(gpu, model.config.clone(), &model.params)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Replaces the weights (after an optimizer step) from the flat f32 buffer.
    pub fn load_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.layout.total() {
            return shape_err(format!(
                "parameter buffer has {} values, the config needs {}",
                params.len(),
                self.layout.total()
            ));
        }
        self.write_weights(|g, w| g.upload_cast(w, params))
    }

    /// Overwrites the decoder's own weights with `fill`; after [`GpuDecoder::release_weights`]
    /// it fills a new buffer and keeps it only once filled, so a failed fill leaves the weights
    /// released, never zeros.
    fn write_weights(
        &mut self,
        fill: impl FnOnce(&Gpu, &mut DeviceBuf<T>) -> Result<()>,
    ) -> Result<()> {
        if !self.weights_released() {
            return fill(&self.gpu, self.weights.own()?);
        }
        let mut w = self.gpu.alloc_zeros::<T>(self.layout.total())?;
        fill(&self.gpu, &mut w)?;
        self.weights = DecoderWeights::Own(w);
        Ok(())
    }

    /// Frees the decoder's own copy of the weights until [`GpuDecoder::load_params`] or
    /// [`GpuDecoder::read_weights_in_place`] gives it weights again (a step before then is an
    /// error): room for a trainer's state on the same device before the decoder reads the
    /// trainer's weights in place, so the two copies never sit there together.
    pub fn release_weights(&mut self) -> Result<()> {
        self.gpu.synchronize()?;
        self.weights = DecoderWeights::Released;
        Ok(())
    }

    /// Drops the decoder's own copy of the weights and reads `weights` (the same flat layout and
    /// storage type: a `GpuQwen2`'s bf16 compute copy, `GpuQwen2::weights_device`) in place
    /// from now on: one copy of the model on the device instead of two, and no refresh after
    /// the trainer's update, whose weights the next step reads.
    ///
    /// # Safety
    /// `weights` must stay allocated while this decoder steps, live on this decoder's device,
    /// and hold complete weights whenever it steps: the caller orders the trainer's writes to it
    /// (its update) before the decoder's next step (synchronising the trainer's stream), and the
    /// decoder's steps before the next write (each step waits for its logits).
    pub unsafe fn read_weights_in_place(&mut self, weights: &impl DevRead<T>) -> Result<()> {
        if weights.dlen() != self.layout.total() {
            return shape_err(format!(
                "weights of {} values, the config needs {}",
                weights.dlen(),
                self.layout.total()
            ));
        }
        self.gpu.synchronize()?;
        self.weights = DecoderWeights::InPlace {
            ptr: weights.dptr(),
            len: weights.dlen(),
        };
        Ok(())
    }

    /// Whether the decoder's weights are released ([`GpuDecoder::release_weights`]).
    pub fn weights_released(&self) -> bool {
        matches!(self.weights, DecoderWeights::Released)
    }

    /// Whether the decoder reads a trainer's weights in place.
    pub fn weights_in_place(&self) -> bool {
        matches!(self.weights, DecoderWeights::InPlace { .. })
    }

    /// Replaces the weights from fp32 parameters already on this device (a `GpuQwen2`'s master
    /// copy after its optimizer step, `GpuQwen2::params_device`): one cast on the device, no
    /// host copy. The source must live on the same device (its context is the device's primary
    /// one) and be complete: the caller synchronises the stream that wrote it first.
    pub fn load_params_device(&mut self, params: &impl DevRead<f32>) -> Result<()> {
        if params.dlen() != self.layout.total() {
            return shape_err(format!(
                "device parameter buffer has {} values, the config needs {}",
                params.dlen(),
                self.layout.total()
            ));
        }
        self.write_weights(|g, w| {
            g.cast_from_f32(w, params)?;
            g.synchronize()
        })
    }

    /// Allocates the device KV blocks for `layout` (replacing any earlier pool's) and returns
    /// the host pool of tables that indexes them.
    pub fn make_pool(&mut self, layout: KvLayout) -> Result<BlockPool> {
        let c = &self.config;
        if (layout.layers, layout.h_kv, layout.d)
            != (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        {
            return shape_err(format!(
                "KV layout {layout:?} does not fit the model (L {}, H_kv {}, D {})",
                c.num_hidden_layers, c.num_key_value_heads, c.head_dim
            ));
        }
        let pool =
            BlockPool::new_device(layout).map_err(|e| GpuError::Shape(format!("KV pool: {e}")))?;
        self.kv = None;
        self.batch = None;
        let per_plane = layout.num_blocks * layout.block_size * layout.h_kv * layout.d;
        let data = self.gpu.alloc_zeros::<T>(2 * layout.layers * per_plane)?;
        self.kv = Some(DeviceKv { layout, data });
        Ok(pool)
    }

    /// Frees the KV blocks of the pool this decoder made and the step buffers (the next
    /// engine's `make_pool` and first step make them again): the engine does it when dropped
    /// ([`StepModel::release_pool`]), so a trainer's passes after a rollout have that memory.
    /// The scratch blocks its device handle caches (a shared prefill's gather buffers, cuDNN's
    /// gathered keys) go too. Frees them whatever happens; returns the error of the wait for
    /// the decoder's work.
    pub fn free_buffers(&mut self) -> Result<()> {
        let synced = self.gpu.synchronize();
        self.kv = None;
        self.bufs = None;
        self.batch = None;
        self.dev_logits = None;
        self.logits = None;
        synced?;
        self.gpu.release_cached().map(|_| ())
    }

    /// Whether the decoder holds a pool's KV blocks (made by [`GpuDecoder::make_pool`], not yet
    /// freed).
    pub fn holds_pool(&self) -> bool {
        self.kv.is_some()
    }

    /// Sizes the step buffers for steps of up to `rows` rows now (else the first larger step
    /// grows them).
    pub fn reserve(&mut self, rows: usize) -> Result<()> {
        if self.bufs.as_ref().is_none_or(|b| b.cap < rows) {
            self.bufs = None;
            self.gpu.synchronize()?;
            self.bufs = Some(StepBufs::new(&self.gpu, &self.config, rows)?);
        }
        Ok(())
    }

    /// Carries out the pool's queued copies on write.
    fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<()> {
        let Some(kv) = self.kv.as_mut() else {
            return shape_err("decode step: no KV pool (make_pool first)".into());
        };
        if copies.is_empty() {
            return Ok(());
        }
        let l = kv.layout;
        let w = l.h_kv * l.d;
        let mut host = Vec::with_capacity(3 * copies.len());
        for c in copies {
            if c.src as usize >= l.num_blocks
                || c.dst as usize >= l.num_blocks
                || c.tokens > l.block_size
            {
                return shape_err(format!("KV copy {c:?} outside the pool {l:?}"));
            }
        }
        host.extend(copies.iter().map(|c| c.src));
        host.extend(copies.iter().map(|c| c.dst));
        host.extend(copies.iter().map(|c| (c.tokens * w) as u32));
        let g = &self.gpu;
        let dev = g.scratch_from(&host)?;
        let n = copies.len();
        let (src, dst, elems) = (
            dev.dptr(),
            dev.dptr() + 4 * n as u64,
            dev.dptr() + 8 * n as u64,
        );
        let (plane, block_elems) = (kv.plane() as i64, (l.block_size * w) as i64);
        let planes = 2 * l.layers;
        if n > i32::MAX as usize || planes > 65_535 {
            return shape_err(format!(
                "{n} KV copies over {planes} planes exceed the grid"
            ));
        }
        let data = kv.data.dptr();
        g.bind()?;
        launch!(
            g,
            &g.kernels.kv_copy_blocks[T::INDEX],
            cfg((n as u32, planes as u32, 1), (256, 1, 1)),
            &data,
            &src,
            &dst,
            &elems,
            &plane,
            &block_elems
        )
    }

    /// One step (module docs); the logits [S_l, V] of the sequences that ask for them.
    pub fn step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32]> {
        let n_l = self.run(pool, steps, tables)?;
        let v = self.config.vocab_size;
        if n_l == 0 {
            return Ok(&[]);
        }
        if self.logits.as_ref().is_none_or(|l| l.len() < n_l * v) {
            self.logits = None;
            // SAFETY: plain page-locked memory (not write-combined: the host reads it); only
            // the first n_l·V elements are read, after the download below writes them.
            self.logits = Some(unsafe {
                self.gpu
                    .ctx
                    .alloc_pinned_with_flags::<f32>((n_l * v).max(1), 0)
            }?);
        }
        let host = &mut self.logits.as_mut().expect("sized above").as_mut_slice()?[..n_l * v];
        let dev = self.dev_logits.as_ref().expect("written by the step");
        self.gpu.download_into(host, &dev.view(0..n_l * v)?)?;
        Ok(host)
    }

    /// Rows each rank computes per segment of a shared prefill ([`GpuDecoder::prefill_shared`];
    /// default [`SHARED_PREFILL_ROWS`]): its step buffers' size.
    pub fn set_shared_prefill_rows(&mut self, rows: usize) {
        self.shared_prefill_rows = rows.max(1);
    }

    /// Chunks of at least `rows` rows attend through cuDNN (bf16 storage, `cudnn` feature;
    /// module docs); `usize::MAX` keeps every row on the paged kernel. Default
    /// [`CUDNN_PREFILL_ROWS`].
    pub fn set_cudnn_prefill_rows(&mut self, rows: usize) {
        self.cudnn_prefill_rows = rows.max(1);
    }

    /// Rows (of long chunks) whose attention has run through cuDNN since the decoder was made.
    pub fn cudnn_rows_run(&self) -> u64 {
        self.cudnn_rows_run
    }

    /// The most candidates per row [`GpuDecoder::step_top`] returns: [`TOPK_CAP`] unless
    /// lowered by [`GpuDecoder::set_max_candidates`].
    pub fn max_candidates(&self) -> usize {
        self.max_candidates
    }

    /// Caps the candidates per row the engine may ask for (0: always full rows, as before the
    /// device selection; a benchmark's baseline). At most [`TOPK_CAP`].
    pub fn set_max_candidates(&mut self, k: usize) {
        self.max_candidates = k.min(TOPK_CAP);
    }

    /// One step (module docs) that returns, of each logits row r, its `k` best ids and logits
    /// (sorted in `reel_model::generate::rank_order`), its max and Σ exp((z − max)/τ_r) with
    /// τ_r = `temperatures[r]` ([`Gpu::topk_lse`]): k·8 + 8 bytes a row downloaded, not V·4.
    pub fn step_top(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
        k: usize,
        temperatures: &[f32],
    ) -> Result<TopRows<'_>> {
        let v = self.config.vocab_size;
        if k == 0 || k > v.min(self.max_candidates) {
            return shape_err(format!(
                "decode step: {k} candidates per row asked, 1 to {} offered (V = {v})",
                v.min(self.max_candidates)
            ));
        }
        let wanted = steps.iter().filter(|s| s.logits).count();
        if temperatures.len() != wanted {
            return shape_err(format!(
                "decode step: {} temperatures for {wanted} logits rows",
                temperatures.len()
            ));
        }
        if let Some(t) = temperatures.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
            return shape_err(format!(
                "decode step: temperature {t} (each row's must be finite and > 0)"
            ));
        }
        let n_l = self.run(pool, steps, tables)?;
        debug_assert_eq!(n_l, wanted);
        let (a, b) = (n_l * k, n_l * (k + 1));
        self.top_ids.resize(a, 0);
        self.top_f.resize(n_l * (k + 2), 0.0);
        if n_l > 0 {
            let g = &self.gpu;
            let temps = g.scratch_from(temperatures)?;
            let mut ids = g.scratch::<u32>(a)?;
            let mut out = g.scratch::<f32>(n_l * (k + 2))?;
            let logits = self.dev_logits.as_ref().expect("written by the step");
            g.topk_lse(
                &mut ids,
                &mut out,
                &logits.view(0..n_l * v)?,
                &temps,
                n_l,
                v,
                k,
            )?;
            g.download_into(&mut self.top_ids, &ids)?;
            g.download_into(&mut self.top_f, &out)?;
        }
        let f = &self.top_f;
        Ok(TopRows {
            k,
            ids: &self.top_ids,
            values: &f[..a],
            max: &f[a..b],
            sum: &f[b..],
        })
    }

    /// The block size of `pool`, which must be the one this decoder made.
    fn pool_block_size(&self, pool: &BlockPool) -> Result<usize> {
        match &self.kv {
            Some(kv) if pool.is_device() && pool.layout() == kv.layout => Ok(kv.layout.block_size),
            _ => shape_err("decode step: the pool was not made by this decoder (make_pool)".into()),
        }
    }

    /// Runs one step's layers and LM head, leaving the logits [S_l, V] in `dev_logits`; S_l.
    fn run(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<usize> {
        let bs = self.pool_block_size(pool)?;
        let places: Vec<Place> = tables.iter().map(|t| Place::of(t)).collect();
        self.copy_blocks(&pool.take_copies())?;
        self.forward(steps, &places, bs, None)
    }

    /// Sets the peers this decoder prefills long prompts with ([`GpuDecoder::prefill_shared`];
    /// the engine's [`reel_rollout::Engine::add_group_shared`]): a group of one rank per GPU
    /// (one process each over NCCL, or in-process ranks of a `DeviceWorld`), each with its own
    /// decoder of the same model.
    pub fn set_prefill_group(&mut self, group: Box<dyn PrefillGroup>) {
        self.prefill = Some(group);
    }

    /// This decoder's rank in its prefill group and the group's size, when it has one.
    pub fn prefill_peers(&self) -> Option<(usize, usize)> {
        self.prefill
            .as_ref()
            .map(|g| (g.prefill_rank(), g.prefill_world()))
    }

    /// Readies a shared prefill of `rows` rows before the peers agree to run it
    /// (`reel_rollout::shared_prefill`, "Agreement"): checks it has weights and a pool, and sizes
    /// the step buffers for the most rows this rank runs in one segment, so that a decoder
    /// without them, or a device short of memory for them, refuses here, on its own, instead of
    /// failing after the others entered the first layer's all-gather. The smaller per-segment
    /// scratch (row data, the input-embedding rows, the exchange's gather buffer) is taken
    /// later; running out of memory there still leaves the peers to their timeout. Returns the
    /// rows a rank runs per segment ([`GpuDecoder::set_shared_prefill_rows`]), which the peers
    /// compare.
    pub fn prepare_shared(&mut self, rows: usize) -> Result<usize> {
        let Some((_, world)) = self.prefill_peers() else {
            return shape_err("shared prefill: the decoder has no prefill group".into());
        };
        if self.kv.is_none() {
            return shape_err("shared prefill: no KV pool (make_pool first)".into());
        }
        if self.weights_released() {
            return shape_err("shared prefill: the decoder's weights were released".into());
        }
        let seg = rows.min(world * self.shared_prefill_rows);
        if seg > 0 {
            self.reserve(PrefillSplit::new(seg, world).rows_per_rank())?;
        }
        Ok(self.shared_prefill_rows)
    }

    /// Gives every rank of the prefill group each rank's `values` (equal lengths), in rank
    /// order: the shared prefill's agreement, one small all-gather on the device.
    pub fn gather_peers(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        let Some(group) = self.prefill.as_deref() else {
            return shape_err("shared prefill: the decoder has no prefill group".into());
        };
        let (rank, world, n) = (group.prefill_rank(), group.prefill_world(), values.len());
        let g = &self.gpu;
        let mut buf = g.scratch::<f32>((world * n).max(1))?;
        g.upload_into(&mut buf.view_mut(rank * n..(rank + 1) * n)?, values)?;
        group.gather_parts(g, &mut buf.view_mut(0..world * n)?)?;
        g.download(&buf.view(0..world * n)?)
    }

    /// Prefills `step` (a prompt's rows from its first) into `table` (empty; room reserved)
    /// together with the prefill group (`reel_rollout::shared_prefill`): this rank computes its
    /// two zigzag chunks; per layer every rank's keys and values are all-gathered and put at
    /// their slots, so the table ends holding every row's. A collective over the group; every
    /// rank passes the same rows. No logits.
    pub fn prefill_shared(
        &mut self,
        pool: &mut BlockPool,
        step: &SeqStep,
        table: &BlockTable,
    ) -> Result<()> {
        let bs = self.pool_block_size(pool)?;
        let Some((rank, world)) = self.prefill_peers() else {
            return shape_err("shared prefill: the decoder has no prefill group".into());
        };
        let n = step_rows(&self.config, step).map_err(|e| GpuError::Shape(e.to_string()))?;
        let blocks = table.block_ids();
        if !table.is_empty() || n.div_ceil(bs) > blocks.len() {
            return shape_err(format!(
                "shared prefill: {n} rows need an empty table with room for them (it holds {} \
                 tokens in {} blocks of {bs})",
                table.len(),
                blocks.len()
            ));
        }
        self.copy_blocks(&pool.take_copies())?;
        // Segments of P · shared_prefill_rows rows, one after another: a segment's queries
        // attend over every earlier segment's keys, which every rank holds by then.
        for span in segments(n, world, self.shared_prefill_rows) {
            self.prefill_segment(step, span, blocks, bs, (rank, world))?;
        }
        Ok(())
    }

    /// Rows `span` of a shared prefill (`step`'s rows from its first), split over the group as
    /// [`PrefillSplit`] within the span.
    fn prefill_segment(
        &mut self,
        step: &SeqStep,
        span: std::ops::Range<usize>,
        blocks: &[u32],
        bs: usize,
        (rank, world): (usize, usize),
    ) -> Result<()> {
        let split = PrefillSplit::new(span.len(), world);
        let parts = segment_steps(step, span.clone(), world, rank, self.config.hidden_size);
        let (steps, places): (Vec<SeqStep>, Vec<Place>) = parts
            .into_iter()
            .map(|(sub, past)| (sub, Place { blocks, past }))
            .unzip();
        // Where each gathered row's key and value go: every other rank's rows at their slots;
        // this rank's own rows and padding nowhere (one entry a row of each part).
        let m = split.rows_per_rank();
        let put: Vec<u32> = split
            .gathered_rows()
            .into_iter()
            .enumerate()
            .map(|(i, p)| match p {
                Some(p) if i / m != rank => cache_slot(blocks, bs, span.start + p),
                _ => NO_SLOT,
            })
            .collect();
        let shared = SharedRows { put, m };
        if steps.is_empty() {
            // No rows of its own (a span shorter than 2P chunks): it still takes part in
            // every layer's gather.
            return self.exchange_only(&shared);
        }
        self.forward(&steps, &places, bs, Some(&shared))?;
        Ok(())
    }

    /// A shared prefill's layers for a rank without rows: each layer's gather (nothing of its
    /// own) and the other ranks' keys and values put at their slots.
    fn exchange_only(&mut self, shared: &SharedRows) -> Result<()> {
        let GpuDecoder {
            config: c,
            kv,
            prefill,
            gpu: g,
            ..
        } = self;
        let (Some(kv), Some(group)) = (kv.as_ref(), prefill.as_deref()) else {
            return shape_err("shared prefill: no KV pool or group".into());
        };
        let kvw = c.num_key_value_heads * c.head_dim;
        let mut x = Exchange::new::<T>(g, group, shared, kvw)?;
        let plane = kv.plane() as u64 * std::mem::size_of::<T>() as u64;
        for l in 0..c.num_hidden_layers as u64 {
            let k = kv.data.dptr() + 2 * l * plane;
            x.run::<T>(g, group, (k, k + plane), 0, 0)?;
        }
        Ok(())
    }

    /// Runs a step's layers (and LM head for the rows that want logits) over `places`; with
    /// `shared`, a shared prefill's: each layer's keys and values exchanged with the prefill
    /// group before attention, the last layer stopping after its exchange.
    fn forward(
        &mut self,
        steps: &[SeqStep],
        places: &[Place],
        bs: usize,
        shared: Option<&SharedRows>,
    ) -> Result<usize> {
        let rows = plan_rows(&self.config, steps, places, bs, &mut self.host_rope)?;
        let n = rows.tokens.len();
        if n == 0 {
            return shape_err("decode step: no sequences".into());
        }
        self.reserve(n)?;
        // Long chunks (bf16 with cuDNN) leave the paged batch; the slots of all their keys go
        // up once for the step.
        let cudnn = cfg!(feature = "cudnn") && T::INDEX == <bf16 as GpuFloat>::INDEX;
        let mut long = Vec::new();
        let mut long_slots: Vec<u32> = Vec::new();
        let mut seqs = Vec::with_capacity(places.len());
        for (p, r) in places.iter().zip(&rows.rows) {
            if cudnn && r.len() >= self.cudnn_prefill_rows {
                long.push(LongChunk {
                    rows: r.clone(),
                    past: p.past,
                    slots_at: long_slots.len(),
                });
                long_slots.extend(cache_slots(p.blocks, bs, 0..p.past + r.len()));
            } else {
                seqs.push(PagedSeq {
                    block_table: p.blocks,
                    past: p.past,
                    rows: r.clone(),
                });
            }
        }
        self.cudnn_rows_run += long.iter().map(|c| c.rows.len() as u64).sum::<u64>();
        // The paged kernel's rows: up to the last row a paged sequence owns.
        let n_paged = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
        match self.batch.as_mut() {
            Some(b) => b.refill(&self.gpu, &seqs)?,
            None => self.batch = Some(GpuPagedBatch::new(&self.gpu, &seqs, bs)?),
        }
        let (n_l, v) = (rows.last.len(), self.config.vocab_size);
        if self.dev_logits.as_ref().is_none_or(|l| l.len() < n_l * v) {
            self.dev_logits = None;
            self.dev_logits = Some(self.gpu.alloc_zeros::<f32>((n_l * v).max(1))?);
        }
        let GpuDecoder {
            config: c,
            layout: pl,
            weights,
            rope,
            host_rope: _,
            kv,
            bufs,
            batch,
            dev_logits,
            prefill,
            gpu: g,
            ..
        } = self;
        let kv = kv.as_mut().expect("checked above");
        let b = bufs.as_mut().expect("reserved");
        let batch = batch.as_ref().expect("filled");
        let (d, h, h_kv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let (qw, kvw, i) = (h * hd, h_kv * hd, c.intermediate_size);
        let width = qw + 2 * kvw;
        let dev_logits = dev_logits.as_mut().expect("sized above");
        // Row data in one upload: tokens, positions, slots, last rows.
        let mut host = Vec::with_capacity(3 * n + n_l);
        host.extend_from_slice(&rows.tokens);
        host.extend_from_slice(&rows.positions);
        host.extend_from_slice(&rows.slots);
        host.extend_from_slice(&rows.last);
        let dev = g.scratch_from(&host)?;
        #[cfg_attr(not(feature = "cudnn"), allow(unused_variables))]
        let long_slots = match long_slots.is_empty() {
            true => None,
            false => Some(g.scratch_from(&long_slots)?),
        };
        let tokens = DView::of(&dev, 0..n)?;
        let (positions, slots) = (dev.dptr() + 4 * n as u64, dev.dptr() + 8 * n as u64);
        let last = DView::of(&dev, 3 * n..3 * n + n_l)?;
        let wv = |r: std::ops::Range<usize>| weights.view(r);
        g.embedding_forward(
            &mut b.x.view_mut(0..n * d)?,
            &tokens,
            &wv(pl.embed.clone())?,
            d,
        )?;
        // Rows given as input embeddings replace their (token 0) lookups.
        for (r, s) in &rows.embedded {
            let StepInput::Embeddings(e) = steps[*s].input else {
                unreachable!("planned as embeddings")
            };
            let up = g.scratch_from(e)?;
            g.cast_from_f32(&mut b.x.view_mut(r.start * d..r.end * d)?, &up)?;
        }
        // The M-RoPE rows' angles, cos then sin (rotary rows max_pos + k).
        let n_mrope = rows.mrope_cos.len() / (hd / 2);
        let mrope = if n_mrope > 0 {
            let mut host = Vec::with_capacity(2 * rows.mrope_cos.len());
            host.extend_from_slice(&rows.mrope_cos);
            host.extend_from_slice(&rows.mrope_sin);
            Some(g.scratch_from(&host)?)
        } else {
            None
        };
        let (xcos, xsin) = match &mrope {
            Some(m) => (m.dptr(), m.dptr() + 4 * rows.mrope_cos.len() as u64),
            None => (rope.cos.dptr(), rope.sin.dptr()),
        };
        let n_extra = n_mrope as u32;
        let shape = PagedShape {
            h,
            h_kv,
            d: hd,
            block_size: bs,
        };
        let plane = kv.plane();
        let (n64, h32, hkv32, hd32) = (
            n as i64,
            as_i32("decode", "H", h)?,
            as_i32("decode", "H_kv", h_kv)?,
            as_i32("decode", "D", hd)?,
        );
        let max_pos = u32::try_from(rope.max_positions()).unwrap_or(u32::MAX);
        let eps = c.rms_norm_eps;
        let mut exchange = match (shared, prefill.as_deref()) {
            (Some(x), Some(group)) => Some((Exchange::new::<T>(g, group, x, kvw)?, group)),
            (Some(_), None) => return shape_err("shared prefill: no prefill group".into()),
            (None, _) => None,
        };
        for (l, lw) in pl.layers.iter().enumerate() {
            let (kc, vc) = (
                DView::of(&kv.data, 2 * l * plane..(2 * l + 1) * plane)?,
                DView::of(&kv.data, (2 * l + 1) * plane..(2 * l + 2) * plane)?,
            );
            g.rmsnorm_forward(
                &mut b.xn.view_mut(0..n * d)?,
                &mut b.rstd.view_mut(0..n)?,
                &b.x.view(0..n * d)?,
                &wv(lw.input_norm.clone())?,
                n,
                d,
                eps,
            )?;
            let bias = wv(lw.qkv_b.clone())?;
            g.matmul_forward::<T, T>(
                &mut b.qkv.view_mut(0..n * width)?,
                &b.xn.view(0..n * d)?,
                &wv(lw.qkv_w.clone())?,
                Some(&bias as &dyn DevRead<T>),
                n,
                d,
                width,
            )?;
            {
                let (qp, kp, vp, src) = (b.q.dptr(), kc.dptr(), vc.dptr(), b.qkv.dptr());
                let (cs, sn) = (rope.cos.dptr(), rope.sin.dptr());
                g.bind()?;
                launch!(
                    g,
                    &g.kernels.decode_qkv_store[T::INDEX],
                    cfg(
                        (elementwise_grid(n * (h + 2 * h_kv) * hd / 2), 1, 1),
                        (256, 1, 1)
                    ),
                    &qp,
                    &kp,
                    &vp,
                    &src,
                    &positions,
                    &slots,
                    &cs,
                    &sn,
                    &xcos,
                    &xsin,
                    &n_extra,
                    &n64,
                    &h32,
                    &hkv32,
                    &hd32,
                    &max_pos
                )?;
            }
            if let Some((x, group)) = exchange.as_mut() {
                x.run::<T>(g, *group, (kc.dptr(), vc.dptr()), slots, n)?;
                if l + 1 == pl.layers.len() {
                    // The last layer's keys and values are all a prefill leaves.
                    break;
                }
            }
            g.paged_attention_forward(
                &mut b.attn.view_mut(0..n_paged * qw)?,
                &mut b.lse.view_mut(0..n_paged * h)?,
                &b.q.view(0..n_paged * qw)?,
                &kc,
                &vc,
                batch,
                shape,
                None,
            )?;
            #[cfg(feature = "cudnn")]
            for ch in &long {
                let slots = long_slots.as_ref().expect("uploaded with the long chunks");
                chunk_attention(g, b, &kc, &vc, slots, ch, (h, h_kv, hd))?;
            }
            g.matmul_forward_accumulate::<T, T>(
                &mut b.x.view_mut(0..n * d)?,
                &b.attn.view(0..n * qw)?,
                &wv(lw.o_w.clone())?,
                n,
                qw,
                d,
            )?;
            g.rmsnorm_forward(
                &mut b.xn.view_mut(0..n * d)?,
                &mut b.rstd.view_mut(0..n)?,
                &b.x.view(0..n * d)?,
                &wv(lw.post_norm.clone())?,
                n,
                d,
                eps,
            )?;
            g.matmul_forward::<T, T>(
                &mut b.gate_up.view_mut(0..n * 2 * i)?,
                &b.xn.view(0..n * d)?,
                &wv(lw.gate_up_w.clone())?,
                None,
                n,
                d,
                2 * i,
            )?;
            g.swiglu_forward(
                &mut b.act.view_mut(0..n * i)?,
                &b.gate_up.view(0..n * 2 * i)?,
                n,
                i,
            )?;
            g.matmul_forward_accumulate::<T, T>(
                &mut b.x.view_mut(0..n * d)?,
                &b.act.view(0..n * i)?,
                &wv(lw.down_w.clone())?,
                n,
                i,
                d,
            )?;
        }
        if n_l == 0 {
            return Ok(0);
        }
        // The last rows (into xn's first n_l rows), final norm (into qkv's), LM head.
        {
            let (dst, src, idx, d32) = (b.xn.dptr(), b.x.dptr(), last.dptr(), as_i32("", "d", d)?);
            g.bind()?;
            launch!(
                g,
                &g.kernels.gather_rows[T::INDEX],
                cfg((n_l as u32, 1, 1), (row_threads(d), 1, 1)),
                &dst,
                &src,
                &idx,
                &d32
            )?;
        }
        let mut normed: DViewMut<T> = b.qkv.view_mut(0..n_l * d)?;
        g.rmsnorm_forward(
            &mut normed,
            &mut b.rstd.view_mut(0..n_l)?,
            &b.xn.view(0..n_l * d)?,
            &wv(pl.final_norm.clone())?,
            n_l,
            d,
            eps,
        )?;
        g.matmul_forward::<T, f32>(
            &mut dev_logits.view_mut(0..n_l * v)?,
            &b.qkv.view(0..n_l * d)?,
            &wv(pl.lm_head.clone())?,
            None,
            n_l,
            d,
            v,
        )?;
        Ok(n_l)
    }
}

impl<T: GpuFloat> StepModel for GpuDecoder<T> {
    fn config(&self) -> &Qwen2Config {
        &self.config
    }

    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
        self.make_pool(layout)
            .map_err(|e| RolloutError::Device(e.to_string()))
    }

    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError> {
        self.step(pool, steps, tables)
            .map_err(|e| RolloutError::Device(e.to_string()))
    }

    fn max_candidates(&self) -> usize {
        GpuDecoder::max_candidates(self)
    }

    fn forward_step_top(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
        k: usize,
        temperatures: &[f32],
    ) -> Result<TopRows<'_>, RolloutError> {
        self.step_top(pool, steps, tables, k, temperatures)
            .map_err(|e| RolloutError::Device(e.to_string()))
    }

    fn release_pool(&mut self) {
        // A device error here surfaces at the decoder's next call.
        let _ = self.free_buffers();
    }

    fn prefill_peers(&self) -> Option<(usize, usize)> {
        GpuDecoder::prefill_peers(self)
    }

    fn prepare_shared(&mut self, rows: usize) -> std::result::Result<usize, RolloutError> {
        GpuDecoder::prepare_shared(self, rows).map_err(|e| RolloutError::Device(e.to_string()))
    }

    fn gather_peers(&mut self, values: &[f32]) -> std::result::Result<Vec<f32>, RolloutError> {
        GpuDecoder::gather_peers(self, values).map_err(|e| RolloutError::Device(e.to_string()))
    }

    fn prefill_shared(
        &mut self,
        pool: &mut BlockPool,
        step: &SeqStep,
        table: &BlockTable,
    ) -> std::result::Result<(), RolloutError> {
        GpuDecoder::prefill_shared(self, pool, step, table)
            .map_err(|e| RolloutError::Device(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_slots_and_last_rows_follow_the_tables() {
        // The plan needs no device: check it through a pool of tables.
        let c = Qwen2Config {
            head_dim: 32,
            hidden_size: 128,
            ..Qwen2Config::tiny(50)
        };
        let layout = KvLayout {
            layers: c.num_hidden_layers,
            h_kv: c.num_key_value_heads,
            d: c.head_dim,
            block_size: 4,
            num_blocks: 8,
        };
        let mut pool = BlockPool::new_device(layout).unwrap();
        let mut a = pool.new_table();
        pool.reserve(&mut a, 6).unwrap();
        pool.advance(&mut a, 5);
        let mut b = pool.new_table();
        pool.reserve(&mut b, 3).unwrap();
        let steps = [
            SeqStep {
                input: StepInput::Tokens(&[7]),
                positions: StepPositions::Linear { start: 5 },
                logits: true,
            },
            SeqStep {
                input: StepInput::Tokens(&[1, 2, 3]),
                positions: StepPositions::Linear { start: 0 },
                logits: false,
            },
        ];
        let mut rope = None;
        let r = plan_rows(&c, &steps, &[Place::of(&a), Place::of(&b)], 4, &mut rope).unwrap();
        let (ba, bb) = (a.block_ids(), b.block_ids());
        assert_eq!(r.tokens, vec![7, 1, 2, 3]);
        assert_eq!(r.positions, vec![5, 0, 1, 2]);
        assert_eq!(
            r.slots,
            vec![ba[1] * 4 + 1, bb[0] * 4, bb[0] * 4 + 1, bb[0] * 4 + 2]
        );
        assert_eq!(r.last, vec![0]);
        assert!(r.embedded.is_empty() && r.mrope_cos.is_empty() && rope.is_none());
        // Embedding rows with M-RoPE beside token rows: token 0, rotary rows max_pos + k, the
        // angles of `mrope_angles`, the embedded rows and their sequence.
        let emb = [0.5f32; 2 * 128];
        let ids = [[3u32, 4, 5], [3, 6, 7]];
        let sections = [4, 6, 6];
        let mixed = [
            SeqStep {
                input: StepInput::Tokens(&[9]),
                positions: StepPositions::MRope {
                    ids: &ids[..1],
                    sections,
                },
                logits: false,
            },
            SeqStep {
                input: StepInput::Embeddings(&emb),
                positions: StepPositions::MRope {
                    ids: &ids,
                    sections,
                },
                logits: true,
            },
        ];
        let r = plan_rows(&c, &mixed, &[Place::of(&a), Place::of(&b)], 4, &mut rope).unwrap();
        let mp = c.max_position_embeddings as u32;
        assert_eq!(r.tokens, vec![9, 0, 0]);
        assert_eq!(r.positions, vec![mp, mp + 1, mp + 2]);
        assert_eq!(r.embedded, vec![(1..3, 1)]);
        assert_eq!(r.last, vec![2]);
        let table = RopeTable::new(c.head_dim, c.max_position_embeddings, c.rope_theta);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let all = [ids[0], ids[0], ids[1]];
        mrope_angles(&table, sections, 3, |k, x| all[k][x], &mut cos, &mut sin);
        assert_eq!((r.mrope_cos, r.mrope_sin), (cos, sin));
        // Too little room, ragged embeddings, bad M-RoPE and bad ids are refused, naming the
        // sequence.
        let long = [SeqStep {
            input: StepInput::Tokens(&[1, 2, 3, 4, 5]),
            positions: StepPositions::Linear { start: 0 },
            logits: true,
        }];
        let e = plan_rows(&c, &long, &[Place::of(&b)], 4, &mut rope)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sequence 0 needs room for 5 tokens"), "{e}");
        let bad = [SeqStep {
            input: StepInput::Embeddings(&emb[..100]),
            positions: StepPositions::Linear { start: 0 },
            logits: true,
        }];
        let e = plan_rows(&c, &bad, &[Place::of(&b)], 4, &mut rope)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("100 input-embedding values"), "{e}");
        for (sec, ids, want) in [
            ([4, 6, 5], &ids[..1], "must sum to head_dim / 2 = 16"),
            ([4, 6, 6], &ids[..], "1 new tokens but 2 M-RoPE positions"),
            (
                [4, 6, 6],
                &[[0, mp, 0]][..],
                "exceeds max_position_embeddings",
            ),
        ] {
            let bad = [SeqStep {
                input: StepInput::Tokens(&[1]),
                positions: StepPositions::MRope { ids, sections: sec },
                logits: true,
            }];
            let e = plan_rows(&c, &bad, &[Place::of(&b)], 4, &mut rope)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let bad = [SeqStep {
            input: StepInput::Tokens(&[50]),
            positions: StepPositions::Linear { start: 0 },
            logits: true,
        }];
        let e = plan_rows(&c, &bad, &[Place::of(&b)], 4, &mut rope)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("token id 50"), "{e}");
        pool.release(a);
        pool.release(b);
    }
}
