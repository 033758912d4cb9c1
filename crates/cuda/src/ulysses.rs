//! Ulysses sequence-parallel attention (DeepSpeed-Ulysses, Jacobs et al. 2023) and its 2-D hybrid
//! with a ring (USP, Fang & Zhao 2024) on device buffers: the device twin of
//! `reel_parallel::UlyssesAttention`, over any [`DeviceP2p`] world (in-process ranks on one GPU,
//! or one process per GPU over NCCL).
//!
//! # Layout (as the CPU path's)
//!
//! P = u × r ranks ([`UlyssesGrid`]); rank `p = g·u + i` is member i of Ulysses group g (u
//! contiguous ranks) and position g of ring i. Tokens are cut contiguously over the P ranks
//! ([`UlyssesLayout::sharding`], padded at the end): rank p holds rows `[p·L, (p+1)·L)`, so group g
//! holds the contiguous rows `[g·U, (g+1)·U)`, `U = u·L` — exactly ring rank g's rows under
//! [`UlyssesLayout::ring_sharding`] (contiguous over r ranks, chunks a multiple of u).
//!
//! Per rank: q, out, dout, dq `[B, L, H, D]` bf16; k, v, dk, dv `[B, L, H_kv, D]` bf16; lse
//! `[B, L, H]` f32. Padded rows get out = 0, lse = −∞, dq = dk = dv = 0.
//!
//! # Passes
//!
//! 1. All-to-all in the group (one grouped batch of point-to-point sends and receives): member j
//!    receives from every member i its L rows of query heads `[j·H/u, (j+1)·H/u)` and KV heads
//!    `[j·H_kv/u, (j+1)·H_kv/u)` (a strided copy packs each head slice), and places them at group
//!    rows `[i·L, (i+1)·L)`: `[B, n, H/u, D]` with n = T for pure Ulysses (padding dropped, one
//!    cuDNN call on the whole sequence) or n = U for the hybrid (padding kept: the ring executor
//!    skips it). GQA stays intact as on the CPU: member j's query heads read only its own KV heads,
//!    which needs u | H_kv ([`UlyssesError::KvHeads`], whose message suggests the hybrid's u).
//! 2. Attention on the head shard: r = 1, one cuDNN call (causal or full); r > 1, `GpuDistAttn`
//!    over the ring of the r groups (a contiguous-layout schedule: balanced DistAttn, ring causal
//!    or full), on a [`SubP2p`] view of the world.
//! 3. All-to-all back: out ‖ lse in the forward, dq ‖ dk ‖ dv in the backward (whose first
//!    all-to-all moves q ‖ k ‖ v ‖ out ‖ dO ‖ lse; cuDNN forms D = rowsum(dO ∘ O) itself).
//!
//! Bytes one rank sends in the all-to-alls of a pass ([`UlyssesLayout::all_to_all_bytes`]; to
//! each of its u − 1 peers B·L rows of that peer's heads, bf16 2 bytes and f32 4):
//! forward `(u−1)·B·L·(2·(2·H·D + 2·H_kv·D) + 4·H) / u`, backward
//! `(u−1)·B·L·(2·(4·H·D + 4·H_kv·D) + 4·H) / u`; the hybrid adds its ring's messages
//! (`GpuDistAttn::planned_bytes_sent` over the head shards).
//!
//! Packed slices, receive buffers, head shards and the attention's outputs are lent by the rank's
//! scratch pool, as in `GpuDistAttn`: a warm pass makes no device allocation.

use std::ops::Range;

use reel_kernels::attention::AttnShape;
use reel_parallel::{Layout, Pass, ScheduleKind, Sharding, UlyssesError, UlyssesGrid};

use crate::devcomm::{DevOp, DeviceP2p};
use crate::{GpuError, Result};

fn ulysses_err(e: UlyssesError) -> GpuError {
    GpuError::Shape(format!("device {e}"))
}

/// Where heads and rows go in the device Ulysses / hybrid attention (module docs): host-side
/// geometry, no device needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UlyssesLayout {
    grid: UlyssesGrid,
    /// The whole sequence's shape (`tq == tk == T`).
    shape: AttnShape,
    /// The attention schedule of the ring (r > 1); for r = 1 only its causality counts.
    kind: ScheduleKind,
    sharding: Sharding,
    ring_sharding: Sharding,
}

impl UlyssesLayout {
    /// `shape` is the GLOBAL shape. Refuses `u ∤ H_kv` (the CPU path's [`UlyssesError::KvHeads`]
    /// message) and, when r > 1, a ring schedule whose layout is not contiguous (the zigzag ring:
    /// its chunks do not cut into the group members' contiguous token rows).
    pub fn new(grid: UlyssesGrid, shape: AttnShape, kind: ScheduleKind) -> Result<Self> {
        if shape.tq != shape.tk {
            return Err(ulysses_err(UlyssesError::Shape(format!(
                "self-attention needs tq == tk, got {} and {}",
                shape.tq, shape.tk
            ))));
        }
        if shape.d == 0 || shape.b == 0 {
            return Err(ulysses_err(UlyssesError::Shape(format!(
                "b = {} and d = {} must be positive",
                shape.b, shape.d
            ))));
        }
        grid.check_heads(shape.h, shape.h_kv).map_err(ulysses_err)?;
        if grid.ring() > 1 && kind.layout() != Layout::Contiguous {
            return Err(GpuError::Shape(format!(
                "device Ulysses hybrid: the ring over r = {} groups runs a contiguous-layout \
                 schedule (distattn_causal, ring_causal, ring_full), not {kind:?}",
                grid.ring()
            )));
        }
        let t = shape.tq;
        let sh = |r: usize| {
            Sharding::new(t, r, Layout::Contiguous).map_err(|e| GpuError::Shape(e.to_string()))
        };
        let sharding = sh(grid.ranks())?;
        let ring_sharding = sh(grid.ring())?.with_chunk_multiple(grid.ulysses());
        debug_assert_eq!(
            ring_sharding.local_len(),
            grid.ulysses() * sharding.local_len()
        );
        Ok(UlyssesLayout {
            grid,
            shape,
            kind,
            sharding,
            ring_sharding,
        })
    }

    pub fn grid(&self) -> UlyssesGrid {
        self.grid
    }

    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    pub fn causal(&self) -> bool {
        self.kind.is_causal()
    }

    /// The global shape.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// How tokens (targets, positions) are cut over the P ranks: contiguous, padded at the end.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// The ring's sharding over the r groups: group g's U rows are ring rank g's local rows.
    pub fn ring_sharding(&self) -> Sharding {
        self.ring_sharding
    }

    /// L, rows per rank (padding included).
    pub fn local_len(&self) -> usize {
        self.sharding.local_len()
    }

    /// The per-rank shape: `tq = tk = L`, all heads.
    pub fn local_shape(&self) -> AttnShape {
        let l = self.local_len();
        AttnShape {
            tq: l,
            tk: l,
            ..self.shape
        }
    }

    /// Rows n of the head shard after the all-to-all: T for pure Ulysses (padding dropped), U for
    /// the hybrid (the ring sharding's local rows, padding kept).
    pub fn gathered_len(&self) -> usize {
        if self.grid.ring() == 1 {
            self.shape.tq
        } else {
            self.ring_sharding.local_len()
        }
    }

    /// The head shard's shape: `[B, n]` rows, H/u query and H_kv/u KV heads.
    pub fn head_shape(&self) -> AttnShape {
        let (n, u) = (self.gathered_len(), self.grid.ulysses());
        AttnShape {
            tq: n,
            tk: n,
            h: self.shape.h / u,
            h_kv: self.shape.h_kv / u,
            ..self.shape
        }
    }

    /// World ranks of `rank`'s Ulysses group (u contiguous ranks), in member order.
    pub fn group_members(&self, rank: usize) -> Vec<usize> {
        let (g, _) = self.grid.coords(rank);
        let u = self.grid.ulysses();
        (g * u..(g + 1) * u).collect()
    }

    /// World ranks of `rank`'s ring (r ranks of stride u), in group order.
    pub fn ring_members(&self, rank: usize) -> Vec<usize> {
        let (_, i) = self.grid.coords(rank);
        let u = self.grid.ulysses();
        (0..self.grid.ring()).map(|g| g * u + i).collect()
    }

    /// Query and KV heads member `j` of a group holds after the all-to-all.
    pub fn heads_of(&self, j: usize) -> (Range<usize>, Range<usize>) {
        let u = self.grid.ulysses();
        let (hq, hk) = (self.shape.h / u, self.shape.h_kv / u);
        (j * hq..(j + 1) * hq, j * hk..(j + 1) * hk)
    }

    /// Rows of the head shard that member `j`'s L token rows fill: `j·L ..` clipped to n.
    pub fn rows_of(&self, j: usize) -> Range<usize> {
        let (l, n) = (self.local_len(), self.gathered_len());
        (j * l).min(n)..((j + 1) * l).min(n)
    }

    /// Payload bytes one rank sends in the two all-to-alls of `pass` (to its u − 1 peers).
    pub fn all_to_all_bytes(&self, pass: Pass) -> u64 {
        let AttnShape { b, h, h_kv, d, .. } = self.shape;
        let u = self.grid.ulysses();
        let (hq, hk) = (h / u, h_kv / u);
        let per_row = match pass {
            // in: q, k, v; out: o (bf16), lse (f32).
            Pass::Forward => 2 * (hq * d + 2 * hk * d) + 2 * hq * d + 4 * hq,
            // in: q, k, v, out, dO, lse; out: dq, dk, dv.
            Pass::Backward => 2 * (3 * hq * d + 2 * hk * d) + 4 * hq + 2 * (hq * d + 2 * hk * d),
        };
        ((u - 1) * b * self.local_len() * per_row) as u64
    }

    /// Messages one rank sends in the two all-to-alls of a pass.
    pub fn all_to_all_messages(&self) -> u64 {
        2 * (self.grid.ulysses() as u64 - 1)
    }
}

/// A sub-world of a [`DeviceP2p`] world: ranks `members[0..]` of the parent renumbered 0.. (a
/// Ulysses hybrid's ring). Epochs, counters and aborts are the parent's; every rank of the parent
/// must still start its passes in the same order.
pub struct SubP2p<'a, C: ?Sized> {
    parent: &'a C,
    members: Vec<usize>,
    rank: usize,
}

impl<'a, C: DeviceP2p + ?Sized> SubP2p<'a, C> {
    /// The sub-world of `members` (parent ranks); the parent's rank must be one of them.
    pub fn new(parent: &'a C, members: Vec<usize>) -> Result<Self> {
        let me = parent.rank();
        let rank = members.iter().position(|&m| m == me).ok_or_else(|| {
            GpuError::Shape(format!("sub-world {members:?} does not hold rank {me}"))
        })?;
        if let Some(&m) = members.iter().find(|&&m| m >= parent.world_size()) {
            return Err(GpuError::Shape(format!(
                "sub-world member {m} outside the world of {}",
                parent.world_size()
            )));
        }
        Ok(SubP2p {
            parent,
            members,
            rank,
        })
    }

    fn parent_rank(&self, r: usize) -> Result<usize> {
        self.members.get(r).copied().ok_or_else(|| {
            GpuError::Comm(format!(
                "rank {r} outside the sub-world of {}",
                self.members.len()
            ))
        })
    }
}

impl<C: DeviceP2p + ?Sized> DeviceP2p for SubP2p<'_, C> {
    type Posted = C::Posted;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn next_epoch(&self) -> u64 {
        self.parent.next_epoch()
    }

    fn sent(&self) -> (u64, u64) {
        self.parent.sent()
    }

    fn post(&self, gpu: &crate::Gpu, ops: &[DevOp<'_>]) -> Result<Self::Posted> {
        let ops = ops
            .iter()
            .map(|op| {
                Ok(match *op {
                    DevOp::Send { to, tag, parts } => DevOp::Send {
                        to: self.parent_rank(to)?,
                        tag,
                        parts,
                    },
                    DevOp::Recv { from, tag, parts } => DevOp::Recv {
                        from: self.parent_rank(from)?,
                        tag,
                        parts,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.parent.post(gpu, &ops)
    }

    fn complete(&self, gpu: &crate::Gpu, posted: Self::Posted) -> Result<()> {
        self.parent.complete(gpu, posted)
    }

    fn abort(&self, why: &str) {
        self.parent.abort(why)
    }
}

#[cfg(feature = "cudnn")]
pub use exec::GpuUlysses;

#[cfg(feature = "cudnn")]
mod exec {
    use half::bf16;
    use reel_kernels::attention::{AttnMask, AttnShape};
    use reel_parallel::{Overlap, Pass, UlyssesGrid};

    use super::{SubP2p, UlyssesLayout};
    use crate::buffer::{DView, DViewMut, DevRead, DevWrite};
    use crate::devcomm::{DevOp, DevPart, DeviceP2p};
    use crate::{Gpu, GpuDistAttn, GpuError, GpuSpStats, Result, Scratch};

    /// Tags of the all-to-alls (outside `reel_parallel::SP_TAG_BASE`'s range).
    const TAG_IN: u64 = 0x554c_5953_0000_0000;
    const TAG_OUT: u64 = TAG_IN + 1;

    /// Ulysses / hybrid attention on device buffers (module docs): the layout and, for r > 1,
    /// the ring's executor over the r groups.
    #[derive(Clone, Debug)]
    pub struct GpuUlysses {
        lay: UlyssesLayout,
        ring: Option<GpuDistAttn>,
    }

    /// One all-to-all message: bf16 and f32 tensors' slices, lent by the rank's scratch pool
    /// (a receive buffer is handed on only after `complete` ordered the rank's stream after the
    /// transfer, so a block goes back to the pool only once the copy into it is done).
    #[derive(Default)]
    struct Parts<'g> {
        bf: Vec<Scratch<'g, bf16>>,
        f: Vec<Scratch<'g, f32>>,
    }

    impl<'g> Parts<'g> {
        /// Buffers of the same lengths, contents undefined (a receive for these parts).
        fn like(&self, gpu: &'g Gpu) -> Result<Parts<'g>> {
            Ok(Parts {
                bf: self
                    .bf
                    .iter()
                    .map(|x| gpu.scratch(x.len()))
                    .collect::<Result<_>>()?,
                f: self
                    .f
                    .iter()
                    .map(|x| gpu.scratch(x.len()))
                    .collect::<Result<_>>()?,
            })
        }

        fn parts(&self) -> Vec<DevPart> {
            let mut p: Vec<DevPart> = self.bf.iter().map(DevPart::of).collect();
            p.extend(self.f.iter().map(DevPart::of));
            p
        }
    }

    /// A tensor moved by an all-to-all: its buffer, heads (all of them) and elements a head.
    type Col<'a, T> = (DView<'a, T>, usize, usize);

    impl GpuUlysses {
        /// `shape` is the global shape; `kind` the ring's schedule (r > 1) or just the
        /// causality (r = 1, where `RingFull` means full attention, every other kind causal);
        /// `overlap` the ring's.
        pub fn new(
            grid: UlyssesGrid,
            shape: AttnShape,
            kind: reel_parallel::ScheduleKind,
            overlap: Overlap,
        ) -> Result<Self> {
            let lay = UlyssesLayout::new(grid, shape, kind)?;
            let ring = if grid.ring() > 1 {
                let schedule = kind
                    .build(grid.ring())
                    .map_err(|e| GpuError::Shape(e.to_string()))?;
                Some(GpuDistAttn::new(
                    schedule,
                    lay.ring_sharding(),
                    lay.head_shape(),
                    overlap,
                )?)
            } else {
                None
            };
            Ok(GpuUlysses { lay, ring })
        }

        pub fn layout(&self) -> &UlyssesLayout {
            &self.lay
        }

        /// The ring's executor (r > 1).
        pub fn ring(&self) -> Option<&GpuDistAttn> {
            self.ring.as_ref()
        }

        /// Attention calls (cuDNN blocks) `rank` makes a pass.
        pub fn planned_blocks(&self, rank: usize) -> usize {
            let (g, _) = self.lay.grid().coords(rank);
            match &self.ring {
                Some(e) => e.executor().planned_blocks(g),
                None => usize::from(self.lay.shape().tq > 0),
            }
        }

        /// Payload bytes `rank` sends in one `pass`: the all-to-alls and the ring's messages.
        pub fn planned_bytes_sent(&self, rank: usize, pass: Pass) -> u64 {
            let (g, _) = self.lay.grid().coords(rank);
            self.lay.all_to_all_bytes(pass)
                + self
                    .ring
                    .as_ref()
                    .map_or(0, |e| e.planned_bytes_sent(g, pass))
        }

        fn check<C: DeviceP2p + ?Sized>(
            &self,
            comm: &C,
            lens: &[(&str, usize, usize)],
        ) -> Result<usize> {
            let p = self.lay.grid().ranks();
            if comm.world_size() != p {
                return Err(GpuError::Shape(format!(
                    "device Ulysses: the world has {} ranks, the grid {} × {} = {p}",
                    comm.world_size(),
                    self.lay.grid().ulysses(),
                    self.lay.grid().ring()
                )));
            }
            for &(name, got, want) in lens {
                if got != want {
                    return Err(GpuError::Shape(format!(
                        "device Ulysses on rank {}: {name} has {got} elements, expected {want}",
                        comm.rank()
                    )));
                }
            }
            Ok(comm.rank())
        }

        fn lens(&self) -> (usize, usize, usize) {
            let AttnShape {
                b, tq, h, h_kv, d, ..
            } = self.lay.local_shape();
            (b * tq * h * d, b * tq * h_kv * d, b * tq * h)
        }

        fn mask(&self) -> AttnMask {
            if self.lay.causal() {
                AttnMask::Causal {
                    q_offset: 0,
                    k_offset: 0,
                }
            } else {
                AttnMask::Full
            }
        }

        /// Runs `body` between a fresh epoch and the pass's stats; a failure aborts the world.
        fn pass<C: DeviceP2p + ?Sized>(
            &self,
            comm: &C,
            body: impl FnOnce() -> Result<usize>,
        ) -> Result<GpuSpStats> {
            comm.next_epoch();
            let before = comm.sent();
            let blocks = body().inspect_err(|e| comm.abort(&e.to_string()))?;
            let after = comm.sent();
            Ok(GpuSpStats {
                blocks,
                messages_sent: (after.1 - before.1) as usize,
                bytes_sent: after.0 - before.0,
            })
        }

        /// This rank's out `[B, L, H, D]` and lse `[B, L, H]` (overwritten) from its q, k, v
        /// (device buffers or views of exactly these lengths); every rank of the world calls it,
        /// each with its `Gpu`. Returns once the work is enqueued on `gpu`'s stream. Every
        /// working buffer comes from `gpu`'s scratch pool, so a warm pass allocates nothing.
        #[allow(clippy::too_many_arguments)]
        pub fn forward<C: DeviceP2p + ?Sized>(
            &self,
            gpu: &Gpu,
            comm: &C,
            out: &mut impl DevWrite<bf16>,
            lse: &mut impl DevWrite<f32>,
            q: &impl DevRead<bf16>,
            k: &impl DevRead<bf16>,
            v: &impl DevRead<bf16>,
        ) -> Result<GpuSpStats> {
            let (nq, nk, nl) = self.lens();
            let rank = self.check(
                comm,
                &[
                    ("out", out.dlen(), nq),
                    ("lse", lse.dlen(), nl),
                    ("q", q.dlen(), nq),
                    ("k", k.dlen(), nk),
                    ("v", v.dlen(), nk),
                ],
            )?;
            let AttnShape { h, h_kv, d, .. } = self.lay.shape();
            let hs = self.lay.head_shape();
            self.pass(comm, || {
                let Parts { bf, .. } = self.tokens_to_heads(
                    gpu,
                    comm,
                    rank,
                    &[
                        (DView::all(q), h, d),
                        (DView::all(k), h_kv, d),
                        (DView::all(v), h_kv, d),
                    ],
                    &[],
                )?;
                let mut bf = bf.into_iter();
                let mut next = || bf.next().expect("one gathered buffer a tensor");
                let (qg, kg, vg) = (next(), next(), next());
                // Written whole by the attention (padded rows included).
                let mut og = gpu.scratch::<bf16>(qg.len())?;
                let mut lg = gpu.scratch::<f32>(hs.b * hs.tq * hs.h)?;
                let blocks = match &self.ring {
                    None => {
                        if hs.tq > 0 {
                            gpu.attention_forward(
                                &mut og,
                                &mut lg,
                                &qg,
                                &kg,
                                &vg,
                                hs,
                                self.mask(),
                            )?;
                        }
                        self.planned_blocks(rank)
                    }
                    Some(e) => {
                        let sub = SubP2p::new(comm, self.lay.ring_members(rank))?;
                        e.forward(gpu, &sub, &mut og, &mut lg, &qg, &kg, &vg)?
                            .blocks
                    }
                };
                self.heads_to_tokens(
                    gpu,
                    comm,
                    rank,
                    &[(DView::all(&og), h, d)],
                    &[(DView::all(&lg), h, 1, f32::NEG_INFINITY)],
                    &mut [DViewMut::all(out)],
                    &mut [DViewMut::all(lse)],
                )?;
                Ok(blocks)
            })
        }

        /// Gradients of this rank's q, k, v (overwritten) from dout and its rows of the
        /// forward's out and lse.
        #[allow(clippy::too_many_arguments)]
        pub fn backward<C: DeviceP2p + ?Sized>(
            &self,
            gpu: &Gpu,
            comm: &C,
            dq: &mut impl DevWrite<bf16>,
            dk: &mut impl DevWrite<bf16>,
            dv: &mut impl DevWrite<bf16>,
            dout: &impl DevRead<bf16>,
            q: &impl DevRead<bf16>,
            k: &impl DevRead<bf16>,
            v: &impl DevRead<bf16>,
            out: &impl DevRead<bf16>,
            lse: &impl DevRead<f32>,
        ) -> Result<GpuSpStats> {
            let (nq, nk, nl) = self.lens();
            let rank = self.check(
                comm,
                &[
                    ("dq", dq.dlen(), nq),
                    ("dk", dk.dlen(), nk),
                    ("dv", dv.dlen(), nk),
                    ("dout", dout.dlen(), nq),
                    ("q", q.dlen(), nq),
                    ("k", k.dlen(), nk),
                    ("v", v.dlen(), nk),
                    ("out", out.dlen(), nq),
                    ("lse", lse.dlen(), nl),
                ],
            )?;
            let AttnShape { h, h_kv, d, .. } = self.lay.shape();
            let hs = self.lay.head_shape();
            self.pass(comm, || {
                let Parts { bf, f } = self.tokens_to_heads(
                    gpu,
                    comm,
                    rank,
                    &[
                        (DView::all(q), h, d),
                        (DView::all(k), h_kv, d),
                        (DView::all(v), h_kv, d),
                        (DView::all(out), h, d),
                        (DView::all(dout), h, d),
                    ],
                    &[(DView::all(lse), h, 1)],
                )?;
                let mut bf = bf.into_iter();
                let mut next = || bf.next().expect("one gathered buffer a tensor");
                let (qg, kg, vg, og, dog) = (next(), next(), next(), next(), next());
                let lg = &f[0];
                // Written whole by the attention's backward.
                let mut dqg = gpu.scratch::<bf16>(qg.len())?;
                let mut dkg = gpu.scratch::<bf16>(kg.len())?;
                let mut dvg = gpu.scratch::<bf16>(kg.len())?;
                let blocks = match &self.ring {
                    None => {
                        if hs.tq > 0 {
                            gpu.attention_backward(
                                &mut dqg,
                                &mut dkg,
                                &mut dvg,
                                &dog,
                                &qg,
                                &kg,
                                &vg,
                                &og,
                                lg,
                                hs,
                                self.mask(),
                            )?;
                        }
                        self.planned_blocks(rank)
                    }
                    Some(e) => {
                        let sub = SubP2p::new(comm, self.lay.ring_members(rank))?;
                        e.backward(
                            gpu, &sub, &mut dqg, &mut dkg, &mut dvg, &dog, &qg, &kg, &vg, &og, lg,
                        )?
                        .blocks
                    }
                };
                self.heads_to_tokens(
                    gpu,
                    comm,
                    rank,
                    &[
                        (DView::all(&dqg), h, d),
                        (DView::all(&dkg), h_kv, d),
                        (DView::all(&dvg), h_kv, d),
                    ],
                    &[],
                    &mut [DViewMut::all(dq), DViewMut::all(dk), DViewMut::all(dv)],
                    &mut [],
                )?;
                Ok(blocks)
            })
        }

        /// Posts one batch: a send of `sends[j]` to and a receive into `recvs[j]` from each
        /// other member j of the group, then completes it onto `gpu`'s stream.
        fn exchange<C: DeviceP2p + ?Sized>(
            &self,
            gpu: &Gpu,
            comm: &C,
            rank: usize,
            tag: u64,
            sends: &[Parts<'_>],
            recvs: &[Parts<'_>],
        ) -> Result<()> {
            let members = self.lay.group_members(rank);
            let parts: Vec<(usize, Vec<DevPart>, Vec<DevPart>)> = members
                .iter()
                .enumerate()
                .filter(|&(_, &m)| m != rank)
                .map(|(j, &m)| (m, sends[j].parts(), recvs[j].parts()))
                .collect();
            let mut ops = Vec::with_capacity(2 * parts.len());
            for (m, s, r) in &parts {
                ops.push(DevOp::Send {
                    to: *m,
                    tag,
                    parts: s,
                });
                ops.push(DevOp::Recv {
                    from: *m,
                    tag,
                    parts: r,
                });
            }
            if !ops.is_empty() {
                let posted = comm.post(gpu, &ops)?;
                comm.complete(gpu, posted)?;
            }
            Ok(())
        }

        /// Token shards `[B, L, heads·w]` → head shards `[B, n, heads/u·w]` (module docs, 1).
        fn tokens_to_heads<'g, C: DeviceP2p + ?Sized>(
            &self,
            gpu: &'g Gpu,
            comm: &C,
            rank: usize,
            bf: &[Col<'_, bf16>],
            f: &[Col<'_, f32>],
        ) -> Result<Parts<'g>> {
            let u = self.lay.grid().ulysses();
            let (_, me) = self.lay.grid().coords(rank);
            let rows = self.lay.shape().b * self.lay.local_len();
            // Member j's slice of every tensor, packed `[B·L, heads/u·w]`.
            fn slice<'g, T: crate::DeviceElem>(
                gpu: &'g Gpu,
                (src, heads, w): Col<'_, T>,
                u: usize,
                j: usize,
                rows: usize,
            ) -> Result<Scratch<'g, T>> {
                let (all, mine) = (heads * w, heads / u * w);
                let mut dst = gpu.scratch::<T>(rows * mine)?;
                gpu.copy_2d(&mut dst, 0, mine, &src, j * mine, all, mine, rows)?;
                Ok(dst)
            }
            let mut sends = Vec::with_capacity(u);
            let mut recvs = Vec::with_capacity(u);
            for j in 0..u {
                let p = Parts {
                    bf: bf
                        .iter()
                        .map(|&c| slice(gpu, c, u, j, rows))
                        .collect::<Result<_>>()?,
                    f: f.iter()
                        .map(|&c| slice(gpu, c, u, j, rows))
                        .collect::<Result<_>>()?,
                };
                let r = if j == me {
                    Parts::default()
                } else {
                    p.like(gpu)?
                };
                sends.push(p);
                recvs.push(r);
            }
            self.exchange(gpu, comm, rank, TAG_IN, &sends, &recvs)?;
            // My own slices are the message I would have received from myself.
            recvs[me] = std::mem::take(&mut sends[me]);
            let (b, n) = (self.lay.shape().b, self.lay.gathered_len());
            let l = self.lay.local_len();
            // The members' rows tile [0, n) (u·L ≥ n), so `dst` is written whole.
            fn place<'g, T: crate::DeviceElem>(
                gpu: &'g Gpu,
                lay: &UlyssesLayout,
                msgs: &[&Scratch<'g, T>],
                w: usize,
                b: usize,
                n: usize,
                l: usize,
            ) -> Result<Scratch<'g, T>> {
                let mut dst = gpu.scratch::<T>(b * n * w)?;
                for (j, m) in msgs.iter().enumerate() {
                    let rs = lay.rows_of(j);
                    gpu.copy_2d(&mut dst, rs.start * w, n * w, *m, 0, l * w, rs.len() * w, b)?;
                }
                Ok(dst)
            }
            let gb = bf
                .iter()
                .enumerate()
                .map(|(t, &(_, heads, w))| {
                    let msgs: Vec<_> = recvs.iter().map(|r| &r.bf[t]).collect();
                    place(gpu, &self.lay, &msgs, heads / u * w, b, n, l)
                })
                .collect::<Result<_>>()?;
            let gf = f
                .iter()
                .enumerate()
                .map(|(t, &(_, heads, w))| {
                    let msgs: Vec<_> = recvs.iter().map(|r| &r.f[t]).collect();
                    place(gpu, &self.lay, &msgs, heads / u * w, b, n, l)
                })
                .collect::<Result<_>>()?;
            Ok(Parts { bf: gb, f: gf })
        }

        /// Head shards `[B, n, heads/u·w]` → token shards `[B, L, heads·w]` written into `dst_bf`
        /// and `dst_f` (module docs, 3); rows past n get 0 (bf16) or the f32 tensor's pad.
        #[allow(clippy::too_many_arguments)]
        fn heads_to_tokens<C: DeviceP2p + ?Sized>(
            &self,
            gpu: &Gpu,
            comm: &C,
            rank: usize,
            bf: &[Col<'_, bf16>],
            f: &[(DView<'_, f32>, usize, usize, f32)],
            dst_bf: &mut [DViewMut<'_, bf16>],
            dst_f: &mut [DViewMut<'_, f32>],
        ) -> Result<()> {
            let u = self.lay.grid().ulysses();
            let (_, me) = self.lay.grid().coords(rank);
            let (b, n, l) = (
                self.lay.shape().b,
                self.lay.gathered_len(),
                self.lay.local_len(),
            );
            // Member j's rows of a head shard into `dst` `[B, L, heads/u·w]` (rows past n kept).
            fn rows_for<'g, T: crate::DeviceElem>(
                gpu: &Gpu,
                lay: &UlyssesLayout,
                mut dst: Scratch<'g, T>,
                src: &DView<'_, T>,
                w: usize,
                j: usize,
                (b, n, l): (usize, usize, usize),
            ) -> Result<Scratch<'g, T>> {
                let rs = lay.rows_of(j);
                gpu.copy_2d(
                    &mut dst,
                    0,
                    l * w,
                    src,
                    rs.start * w,
                    n * w,
                    rs.len() * w,
                    b,
                )?;
                Ok(dst)
            }
            let geo = (b, n, l);
            let mut sends = Vec::with_capacity(u);
            let mut recvs = Vec::with_capacity(u);
            for j in 0..u {
                let p = Parts {
                    bf: bf
                        .iter()
                        .map(|&(s, heads, w)| {
                            let w = heads / u * w;
                            let mut dst = gpu.scratch::<bf16>(b * l * w)?;
                            if self.lay.rows_of(j).len() < l {
                                // Rows past n (padding) are sent as zeros.
                                gpu.zero(&mut dst)?;
                            }
                            rows_for(gpu, &self.lay, dst, &s, w, j, geo)
                        })
                        .collect::<Result<_>>()?,
                    f: f.iter()
                        .map(|&(s, heads, w, pad)| {
                            let w = heads / u * w;
                            let mut dst = gpu.scratch::<f32>(b * l * w)?;
                            if self.lay.rows_of(j).len() < l {
                                gpu.fill_f32(&mut dst, pad)?;
                            }
                            rows_for(gpu, &self.lay, dst, &s, w, j, geo)
                        })
                        .collect::<Result<_>>()?,
                };
                let r = if j == me {
                    Parts::default()
                } else {
                    p.like(gpu)?
                };
                sends.push(p);
                recvs.push(r);
            }
            self.exchange(gpu, comm, rank, TAG_OUT, &sends, &recvs)?;
            recvs[me] = std::mem::take(&mut sends[me]);
            let rows = b * l;
            for (j, r) in recvs.iter().enumerate() {
                for (t, &(_, heads, w)) in bf.iter().enumerate() {
                    let (all, mine) = (heads * w, heads / u * w);
                    gpu.copy_2d(&mut dst_bf[t], j * mine, all, &r.bf[t], 0, mine, mine, rows)?;
                }
                for (t, &(_, heads, w, _)) in f.iter().enumerate() {
                    let (all, mine) = (heads * w, heads / u * w);
                    gpu.copy_2d(&mut dst_f[t], j * mine, all, &r.f[t], 0, mine, mine, rows)?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(b: usize, t: usize, h: usize, h_kv: usize, d: usize) -> AttnShape {
        AttnShape {
            b,
            tq: t,
            tk: t,
            h,
            h_kv,
            d,
        }
    }

    /// The all-to-all in, simulated on the host with the layout's index functions exactly as the
    /// device code uses them (pack `heads_of(j)` columns of every row, place at `rows_of(i)`):
    /// every member's head shard holds the global rows the attention needs, of its heads.
    #[test]
    fn all_to_all_moves_every_row_and_head_to_its_place() {
        for (u, r) in [
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 1),
            (1, 2),
            (2, 2),
            (2, 3),
            (4, 2),
        ] {
            for t in [1, 5, 16, 17, 50] {
                let (b, h, h_kv, w): (usize, usize, usize, usize) = (2, 24, 12, 1);
                if !h_kv.is_multiple_of(u) {
                    continue;
                }
                let grid = UlyssesGrid::new(u, r).unwrap();
                let lay =
                    UlyssesLayout::new(grid, shape(b, t, h, h_kv, w), ScheduleKind::RingCausal)
                        .unwrap();
                let sh = lay.sharding();
                let l = lay.local_len();
                // Global `[B, T, H]`, each value naming its (b, row, head).
                let x: Vec<usize> = (0..b * t * h).collect();
                let shards: Vec<Vec<usize>> = (0..grid.ranks())
                    .map(|p| sh.shard(&x, b, h, p, usize::MAX).unwrap())
                    .collect();
                let (n, hq) = (lay.gathered_len(), h / u);
                for p in 0..grid.ranks() {
                    let (g, me) = grid.coords(p);
                    let members = lay.group_members(p);
                    assert_eq!(members[me], p);
                    let mut got = vec![usize::MAX; b * n * hq];
                    for (i, &m) in members.iter().enumerate() {
                        let heads = lay.heads_of(me).0;
                        let rows = lay.rows_of(i);
                        for bi in 0..b {
                            for (k, row) in rows.clone().enumerate() {
                                for (c, hh) in heads.clone().enumerate() {
                                    got[(bi * n + row) * hq + c] = shards[m][(bi * l + k) * h + hh];
                                }
                            }
                        }
                    }
                    let heads = lay.heads_of(me).0;
                    for bi in 0..b {
                        for row in 0..n {
                            // Global row of head-shard row `row`: the ring sharding's (r > 1),
                            // the row itself (pure Ulysses).
                            let gr = if r == 1 {
                                row
                            } else {
                                lay.ring_sharding().global_row(g, row)
                            };
                            for (c, hh) in heads.clone().enumerate() {
                                let want = if gr < t {
                                    (bi * t + gr) * h + hh
                                } else {
                                    usize::MAX
                                };
                                assert_eq!(
                                    got[(bi * n + row) * hq + c],
                                    want,
                                    "u {u} r {r} T {t} rank {p} b {bi} row {row} head {hh}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn groups_rings_heads_and_bytes() {
        let grid = UlyssesGrid::new(2, 3).unwrap();
        let lay =
            UlyssesLayout::new(grid, shape(1, 10, 8, 2, 4), ScheduleKind::DistAttnCausal).unwrap();
        assert_eq!(lay.group_members(3), vec![2, 3]);
        assert_eq!(lay.ring_members(3), vec![1, 3, 5]);
        assert_eq!(lay.heads_of(1), (4..8, 1..2));
        // T = 10 over 6 ranks: L = 2; the ring's chunks U = 4 (padded 12).
        assert_eq!((lay.local_len(), lay.gathered_len()), (2, 4));
        assert_eq!(lay.rows_of(1), 2..4);
        assert_eq!(
            (
                lay.head_shape().h,
                lay.head_shape().h_kv,
                lay.head_shape().tq
            ),
            (4, 1, 4)
        );
        // Pure Ulysses drops the padding: T = 10 over 4 ranks, L = 3, rows of member 3 are 9..10.
        let pure = UlyssesLayout::new(
            UlyssesGrid::new(4, 1).unwrap(),
            shape(1, 10, 8, 4, 4),
            ScheduleKind::RingFull,
        )
        .unwrap();
        assert_eq!((pure.gathered_len(), pure.rows_of(3)), (10, 9..10));
        assert!(!pure.causal());
        // Forward: 3 peers × B·L = 3 rows × (2·(2·4 + 2·1·4) + 2·2·4 + 4·2) bytes.
        assert_eq!(
            pure.all_to_all_bytes(Pass::Forward),
            (3 * 3 * (32 + 16 + 8)) as u64
        );
        assert_eq!(
            pure.all_to_all_bytes(Pass::Backward),
            (3 * 3 * (2 * (3 * 8 + 2 * 4) + 8 + 2 * (8 + 2 * 4))) as u64
        );
        assert_eq!(lay.all_to_all_messages(), 2);
    }

    #[test]
    fn refuses_split_kv_groups_and_zigzag_rings() {
        let e = UlyssesLayout::new(
            UlyssesGrid::new(4, 1).unwrap(),
            shape(1, 64, 8, 2, 16),
            ScheduleKind::DistAttnCausal,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("h_kv = 2") && e.contains("UlyssesGrid::new(2, 2)"),
            "{e}"
        );
        let e = UlyssesLayout::new(
            UlyssesGrid::new(2, 2).unwrap(),
            shape(1, 64, 8, 2, 16),
            ScheduleKind::ZigzagRingCausal,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("contiguous-layout"), "{e}");
        // Pure Ulysses takes any causal kind.
        UlyssesLayout::new(
            UlyssesGrid::new(2, 1).unwrap(),
            shape(1, 64, 8, 2, 16),
            ScheduleKind::ZigzagRingCausal,
        )
        .unwrap();
        let e = UlyssesLayout::new(
            UlyssesGrid::new(2, 1).unwrap(),
            shape(1, 64, 8, 3, 16),
            ScheduleKind::RingCausal,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of h_kv"), "{e}");
    }
}
