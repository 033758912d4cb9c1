//! A `GpuQwen2`'s attention when it is one rank of a sequence-parallel group (feature `cudnn`):
//! the device twin of `reel_parallel::SpAttention`. The rank's model runs its layers on its token
//! shard (`[B, L]`, rows in the schedule's layout order, RoPE at global positions); attention
//! goes through [`GpuDistAttn`] (a ring-family `Schedule`) or [`GpuUlysses`] (Ulysses and its
//! 2-D hybrid: contiguous token shards, u | H_kv; the hybrid's ring over the r groups runs
//! balanced DistAttn) over the rank's device communicator, as `SpMethod` says, so every rank of
//! the group must make the same calls in the same order. The communicator is any [`DeviceGroup`]:
//! [`DeviceComm`] (in-process ranks sharing one GPU) or `NcclP2p` owning its `NcclComm` (one
//! process per GPU); it also carries the group's gradient all-reduce
//! ([`DeviceGroup::all_reduce_sum_dev`]). The model holds its rank as a [`GpuSpRank`], the
//! object-safe face of [`GpuSpAttention`] over either communicator.
//!
//! As with `SpAttention`, the model's shape does not say how many of the L local rows are
//! padding, so the caller announces each batch's global length with
//! [`GpuSpAttention::set_seq_len`], which returns the `Sharding` to cut tokens, targets and
//! positions with (`Sharding::shard_tokens`).
//!
//! Shapes: q, out, dout, dq `[B, L, H, D]` bf16; k, v, dk, dv `[B, L, H_kv, D]` bf16; lse
//! `[B, L, H]` f32. The model's operands (views of activation buffers sized for its largest
//! batch) are handed to the executor as views of exactly these lengths, no copy; the executors
//! take every working buffer from the rank's scratch pool, so a warm step allocates nothing.

use half::bf16;
use reel_kernels::attention::AttnShape;
use reel_parallel::{Overlap, Schedule, ScheduleKind, Sharding, SpMethod};

use crate::buffer::{DView, DViewMut, DevRead, DevWrite};
use crate::devcomm::{DeviceComm, DeviceGroup};
use crate::{shape_err, DeviceBuf, Gpu, GpuDistAttn, GpuSpStats, GpuUlysses, Result};

/// The device executor of the method for one sharding and local shape.
enum Exec {
    Dist(GpuDistAttn),
    Ulysses(GpuUlysses),
}

/// Elements of (q, k, lse) of a local shape.
fn lens(shape: AttnShape) -> (usize, usize, usize) {
    let AttnShape {
        b, tq, h, h_kv, d, ..
    } = shape;
    (b * tq * h * d, b * tq * h_kv * d, b * tq * h)
}

/// Totals of this rank's attention calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuSpTotals {
    pub forward_calls: usize,
    pub backward_calls: usize,
    pub forward: GpuSpStats,
    pub backward: GpuSpStats,
}

fn add(a: &mut GpuSpStats, b: GpuSpStats) {
    a.blocks += b.blocks;
    a.messages_sent += b.messages_sent;
    a.bytes_sent += b.bytes_sent;
}

/// Refuses a non-causal or invalid schedule, or a method over another number of ranks than the
/// group's `world`.
fn check_method(world: usize, method: &SpMethod) -> Result<()> {
    if let SpMethod::Schedule(schedule) = method {
        schedule
            .validate()
            .map_err(|e| crate::GpuError::Shape(format!("sequence-parallel schedule: {e}")))?;
        if !schedule.causal() {
            return shape_err(format!(
                "the model's attention is causal; the {:?} schedule is not",
                schedule.kind
            ));
        }
    }
    if world != method.ranks() {
        return shape_err(format!(
            "the sequence-parallel group has {world} ranks, the {} {}",
            match method {
                SpMethod::Schedule(_) => "schedule",
                SpMethod::Ulysses(_) => "Ulysses grid",
            },
            method.ranks()
        ));
    }
    Ok(())
}

/// One rank's sequence-parallel causal attention on device buffers (module docs), over the
/// device communicator `C`.
pub struct GpuSpAttention<C: DeviceGroup = DeviceComm> {
    comm: C,
    method: SpMethod,
    overlap: Overlap,
    sharding: Option<Sharding>,
    /// The executor of the current sharding and local shape.
    exec: Option<(Sharding, AttnShape, Exec)>,
    totals: GpuSpTotals,
}

impl<C: DeviceGroup> GpuSpAttention<C> {
    /// `comm` is this rank's endpoint of the sequence-parallel group; `schedule` must be causal
    /// (the model's attention is), valid, and over `comm.world_size()` ranks.
    pub fn new(comm: C, schedule: Schedule, overlap: Overlap) -> Result<Self> {
        Self::with_method(comm, SpMethod::Schedule(schedule), overlap)
    }

    /// `comm` is this rank's endpoint of a group of `method.ranks()` ranks; a schedule must be
    /// causal and valid; a Ulysses grid's heads are checked against the model's on the first
    /// call (u | H_kv). `overlap` is the ring-family executor's (the hybrid's ring too).
    pub fn with_method(comm: C, method: SpMethod, overlap: Overlap) -> Result<Self> {
        check_method(comm.world_size(), &method)?;
        Ok(GpuSpAttention {
            comm,
            method,
            overlap,
            sharding: None,
            exec: None,
            totals: GpuSpTotals::default(),
        })
    }

    /// Switches the group to `method` and `overlap` (checked as [`GpuSpAttention::with_method`]
    /// checks them), keeping the communicator and the totals; the next batch needs
    /// [`GpuSpAttention::set_seq_len`] again. Every rank must switch alike, between steps.
    pub fn set_method(&mut self, method: SpMethod, overlap: Overlap) -> Result<()> {
        check_method(self.comm.world_size(), &method)?;
        self.method = method;
        self.overlap = overlap;
        self.sharding = None;
        self.exec = None;
        Ok(())
    }

    pub fn comm(&self) -> &C {
        &self.comm
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    pub fn method(&self) -> &SpMethod {
        &self.method
    }

    /// Announces the global (unpadded) length T of the coming batch's sequences; returns the
    /// sharding its tokens, targets and positions must be cut with (`local_len()` is the model's
    /// T on this rank).
    pub fn set_seq_len(&mut self, seq_len: usize) -> Result<Sharding> {
        let sh = self
            .method
            .sharding(seq_len)
            .map_err(|e| crate::GpuError::Shape(e.to_string()))?;
        self.sharding = Some(sh);
        Ok(sh)
    }

    /// The sharding of the last [`GpuSpAttention::set_seq_len`].
    pub fn sharding(&self) -> Option<Sharding> {
        self.sharding
    }

    /// Calls and traffic since creation.
    pub fn totals(&self) -> GpuSpTotals {
        self.totals
    }

    /// The executor for `shape` under the current sharding.
    fn prepare(&mut self, shape: AttnShape) -> Result<()> {
        let Some(sh) = self.sharding else {
            return shape_err(
                "sequence-parallel attention: set_seq_len was not called for this batch".into(),
            );
        };
        if shape.tq != sh.local_len() || shape.tk != sh.local_len() {
            return shape_err(format!(
                "sequence-parallel attention: the model's {} local tokens per row are not the \
                 shard length {} of a length-{} sequence over {} ranks",
                shape.tq,
                sh.local_len(),
                sh.seq_len(),
                sh.ranks()
            ));
        }
        if !matches!(&self.exec, Some((s, a, _)) if *s == sh && *a == shape) {
            let exec = match &self.method {
                SpMethod::Schedule(schedule) => {
                    Exec::Dist(GpuDistAttn::new(schedule.clone(), sh, shape, self.overlap)?)
                }
                SpMethod::Ulysses(grid) => {
                    let global = AttnShape {
                        tq: sh.seq_len(),
                        tk: sh.seq_len(),
                        ..shape
                    };
                    Exec::Ulysses(GpuUlysses::new(
                        *grid,
                        global,
                        ScheduleKind::DistAttnCausal,
                        self.overlap,
                    )?)
                }
            };
            self.exec = Some((sh, shape, exec));
        }
        Ok(())
    }

    /// This rank's out and lse (overwritten) from its q, k, v.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &mut self,
        gpu: &Gpu,
        out: &mut impl DevWrite<bf16>,
        lse: &mut impl DevWrite<f32>,
        q: &impl DevRead<bf16>,
        k: &impl DevRead<bf16>,
        v: &impl DevRead<bf16>,
        shape: AttnShape,
    ) -> Result<()> {
        let (nq, nk, nl) = lens(shape);
        let (mut out, mut lse) = (DViewMut::of(out, 0..nq)?, DViewMut::of(lse, 0..nl)?);
        let (q, k, v) = (
            DView::of(q, 0..nq)?,
            DView::of(k, 0..nk)?,
            DView::of(v, 0..nk)?,
        );
        self.prepare(shape)?;
        let Some((_, _, exec)) = &self.exec else {
            return shape_err("sequence-parallel attention: no executor was prepared".into());
        };
        let c = &self.comm;
        let s = match exec {
            Exec::Dist(e) => e.forward(gpu, c, &mut out, &mut lse, &q, &k, &v)?,
            Exec::Ulysses(e) => e.forward(gpu, c, &mut out, &mut lse, &q, &k, &v)?,
        };
        self.totals.forward_calls += 1;
        add(&mut self.totals.forward, s);
        Ok(())
    }

    /// Gradients of this rank's q, k, v (overwritten) from dout and its rows of the forward's
    /// out and lse.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        gpu: &Gpu,
        dq: &mut impl DevWrite<bf16>,
        dk: &mut impl DevWrite<bf16>,
        dv: &mut impl DevWrite<bf16>,
        dout: &impl DevRead<bf16>,
        q: &impl DevRead<bf16>,
        k: &impl DevRead<bf16>,
        v: &impl DevRead<bf16>,
        out: &impl DevRead<bf16>,
        lse: &impl DevRead<f32>,
        shape: AttnShape,
    ) -> Result<()> {
        let (nq, nk, nl) = lens(shape);
        let (mut dq, mut dk, mut dv) = (
            DViewMut::of(dq, 0..nq)?,
            DViewMut::of(dk, 0..nk)?,
            DViewMut::of(dv, 0..nk)?,
        );
        let (dout, q, k, v, out, lse) = (
            DView::of(dout, 0..nq)?,
            DView::of(q, 0..nq)?,
            DView::of(k, 0..nk)?,
            DView::of(v, 0..nk)?,
            DView::of(out, 0..nq)?,
            DView::of(lse, 0..nl)?,
        );
        self.prepare(shape)?;
        let Some((_, _, exec)) = &self.exec else {
            return shape_err("sequence-parallel attention: no executor was prepared".into());
        };
        let c = &self.comm;
        let s = match exec {
            Exec::Dist(e) => e.backward(
                gpu, c, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
            )?,
            Exec::Ulysses(e) => e.backward(
                gpu, c, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
            )?,
        };
        self.totals.backward_calls += 1;
        add(&mut self.totals.backward, s);
        Ok(())
    }

    /// Fails every rank's pending and later exchanges (a rank that errs outside attention).
    pub fn abort(&self, why: &str) {
        self.comm.abort(why);
    }
}

/// What a `GpuQwen2` asks of its sequence-parallel attention rank, whatever the device
/// communicator under it (object safe: `GpuAttention::Sp` holds a `Box<dyn GpuSpRank>`).
/// Implemented by every [`GpuSpAttention`].
pub trait GpuSpRank: Send {
    /// This rank's place in its group.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The ring-family schedule or Ulysses grid the group runs.
    fn method(&self) -> &SpMethod;
    /// [`GpuSpAttention::set_seq_len`].
    fn set_seq_len(&mut self, seq_len: usize) -> Result<Sharding>;
    /// [`GpuSpAttention::totals`].
    fn totals(&self) -> GpuSpTotals;
    /// [`GpuSpAttention::set_method`].
    fn set_method(&mut self, method: SpMethod, overlap: Overlap) -> Result<()>;
    /// The communicator's collective counters (the gradient all-reduces), where it keeps them
    /// ([`DeviceGroup::collective_stats`]).
    fn collective_stats(&self) -> Option<reel_comm::CommStats>;
    /// This rank's out and lse (overwritten) from its q, k, v.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        gpu: &Gpu,
        out: &mut DViewMut<'_, bf16>,
        lse: &mut DViewMut<'_, f32>,
        q: &DView<'_, bf16>,
        k: &DView<'_, bf16>,
        v: &DView<'_, bf16>,
        shape: AttnShape,
    ) -> Result<()>;
    /// Gradients of this rank's q, k, v (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        gpu: &Gpu,
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
    ) -> Result<()>;
    /// Sums `buf` over the group, in place (the gradients; [`DeviceGroup::all_reduce_sum_dev`]).
    fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()>;
    /// [`DeviceGroup::reduce_scatter_sum_dev`] over the group (a sharded optimizer's gradients).
    fn reduce_scatter_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()>;
    /// [`DeviceGroup::all_gather_dev`] over the group (a sharded optimizer's weights).
    fn all_gather_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()>;
    /// [`DeviceGroup::reduce_sum_dev`] over the group (sharded gradients, to their owner).
    fn reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>, root: usize) -> Result<()>;
    /// [`GpuSpAttention::abort`].
    fn abort(&self, why: &str);
}

impl<C: DeviceGroup + Send> GpuSpRank for GpuSpAttention<C> {
    fn rank(&self) -> usize {
        GpuSpAttention::rank(self)
    }

    fn world_size(&self) -> usize {
        GpuSpAttention::world_size(self)
    }

    fn method(&self) -> &SpMethod {
        GpuSpAttention::method(self)
    }

    fn set_seq_len(&mut self, seq_len: usize) -> Result<Sharding> {
        GpuSpAttention::set_seq_len(self, seq_len)
    }

    fn totals(&self) -> GpuSpTotals {
        GpuSpAttention::totals(self)
    }

    fn set_method(&mut self, method: SpMethod, overlap: Overlap) -> Result<()> {
        GpuSpAttention::set_method(self, method, overlap)
    }

    fn collective_stats(&self) -> Option<reel_comm::CommStats> {
        self.comm.collective_stats()
    }

    fn forward(
        &mut self,
        gpu: &Gpu,
        out: &mut DViewMut<'_, bf16>,
        lse: &mut DViewMut<'_, f32>,
        q: &DView<'_, bf16>,
        k: &DView<'_, bf16>,
        v: &DView<'_, bf16>,
        shape: AttnShape,
    ) -> Result<()> {
        GpuSpAttention::forward(self, gpu, out, lse, q, k, v, shape)
    }

    fn backward(
        &mut self,
        gpu: &Gpu,
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
        GpuSpAttention::backward(self, gpu, dq, dk, dv, dout, q, k, v, out, lse, shape)
    }

    fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()> {
        self.comm.all_reduce_sum_dev(gpu, buf)
    }

    fn reduce_scatter_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        self.comm.reduce_scatter_sum_dev(gpu, buf)
    }

    fn all_gather_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        self.comm.all_gather_dev(gpu, buf)
    }

    fn reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>, root: usize) -> Result<()> {
        self.comm.reduce_sum_dev(gpu, buf, root)
    }

    fn abort(&self, why: &str) {
        GpuSpAttention::abort(self, why)
    }
}
