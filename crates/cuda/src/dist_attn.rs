//! Sequence-parallel attention on device buffers: a `reel_parallel::Schedule` (balanced
//! DistAttn, ring, zigzag ring) run by the ranks of a [`DeviceP2p`] world, each with its own
//! [`Gpu`] stream (feature `cudnn`): in-process ranks on one GPU ([`crate::DeviceComm`]), or one
//! process per GPU over NCCL ([`crate::NcclP2p`]: transfers on NCCL's stream, compute on the
//! rank's, ordered by events).
//!
//! The schedule, its validation, the per-rank message plan (steps, tags, when chunks are freed)
//! and the overlap modes are `reel_parallel::DistExecutor`'s ([`RankPlan`]); this executor only
//! carries them out on device buffers, in the same order of work (DistExecutor's module docs):
//! overlapped, step t+1's chunks are posted before step t's compute; blocking, right before
//! step t's. Blocks run through cuDNN: a `Diagonal` block is causal with equal offsets, every other
//! block is a full (unmasked) call; partial results merge in f32 (`Gpu::attention_merge`).
//!
//! Shapes per rank (L = `Sharding::local_len`, rows in the layout's order): q, out, dout, dq
//! `[B, L, H, D]` bf16; k, v, dk, dv `[B, L, H_kv, D]` bf16; lse `[B, L, H]` f32. Padded rows get
//! out = 0, lse = −∞, dq = dk = dv = 0.
//!
//! Messages (device buffers, only a chunk's valid rows):
//! - `Kv { c }`: K ‖ V bf16.
//! - `Query { c }`: forward Q bf16; backward Q ‖ dO ‖ O bf16 and lse f32 (cuDNN's backward forms
//!   D = rowsum(dO ∘ O) itself, so a helper gets the global O rows instead of D).
//! - `Partial { q, kv }`: forward o ‖ lse f32, merged at the owner; backward dQ bf16, added into
//!   the owner's f32 dQ.
//! - `KvGrad { c }`: f32 dK ‖ dV, added where it lands.
//!
//! Gradients accumulate in f32 (cuDNN's backward overwrites bf16 block gradients, which are
//! added); outputs are rounded to bf16 once at the end.
//!
//! Every buffer of a pass (chunks, messages sent and received, accumulators, block outputs) is
//! lent by the rank's scratch pool (`Gpu::scratch`) and given back when the pass lets go of it:
//! a receive buffer only after `DeviceP2p::complete` has ordered the rank's stream after the
//! copy into it, a send's after the copy out of it, so the pool's stream-order rule holds across
//! the ranks' streams and a warm pass makes no device allocation. Buffers that must start at
//! zero (accumulators, a helper's empty partials) are zeroed explicitly.

use std::collections::HashMap;
use std::rc::Rc;

use half::bf16;
use reel_kernels::attention::{AttnMask, AttnShape};
use reel_parallel::{
    BlockMask, DistExecutor, Message, Overlap, Pass, Payload, RankPlan, Schedule, Sharding, Work,
};

use crate::buffer::{DView, DViewMut, DevRead, DevWrite};
use crate::devcomm::{DevOp, DevPart, DeviceP2p};
use crate::{shape_err, Gpu, GpuError, Result, Scratch};

/// What one pass did on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuSpStats {
    /// Block products computed (empty ones, from all-padding chunks, included).
    pub blocks: usize,
    pub messages_sent: usize,
    pub bytes_sent: u64,
}

/// A schedule carried out on device buffers (module docs).
#[derive(Clone, Debug)]
pub struct GpuDistAttn {
    exec: DistExecutor,
}

/// A message's device buffers: bf16 and f32 parts (either may be absent), lent by the rank's
/// scratch pool.
#[derive(Default)]
struct Msg<'g> {
    bf: Option<Scratch<'g, bf16>>,
    f: Option<Scratch<'g, f32>>,
}

impl<'g> Msg<'g> {
    /// Parts of `bf` and `f` elements, contents undefined (a receive, or a buffer written whole).
    fn alloc(gpu: &'g Gpu, bf: usize, f: usize) -> Result<Msg<'g>> {
        Ok(Msg {
            bf: if bf > 0 { Some(gpu.scratch(bf)?) } else { None },
            f: if f > 0 { Some(gpu.scratch(f)?) } else { None },
        })
    }

    /// [`Msg::alloc`] zeroed.
    fn zeros(gpu: &'g Gpu, bf: usize, f: usize) -> Result<Msg<'g>> {
        let mut m = Msg::alloc(gpu, bf, f)?;
        if let Some(b) = m.bf.as_mut() {
            gpu.zero(b)?;
        }
        if let Some(x) = m.f.as_mut() {
            gpu.zero(x)?;
        }
        Ok(m)
    }

    fn parts(&self) -> Vec<DevPart> {
        let mut p = Vec::new();
        if let Some(b) = &self.bf {
            p.push(DevPart::of(b));
        }
        if let Some(f) = &self.f {
            p.push(DevPart::of(f));
        }
        p
    }

    fn bf(&self) -> &Scratch<'g, bf16> {
        self.bf.as_ref().expect("non-empty chunk")
    }

    fn f(&self) -> &Scratch<'g, f32> {
        self.f.as_ref().expect("non-empty chunk")
    }
}

/// Chunk geometry of one rank's shard.
#[derive(Clone, Copy)]
struct Geo {
    sh: Sharding,
    shape: AttnShape,
}

impl Geo {
    fn n(&self, c: usize) -> usize {
        self.sh.chunk_valid_len(c)
    }
    /// Rows B·n of a chunk's tensors.
    fn rows(&self, c: usize) -> usize {
        self.shape.b * self.n(c)
    }
    fn qw(&self) -> usize {
        self.shape.h * self.shape.d
    }
    fn kw(&self) -> usize {
        self.shape.h_kv * self.shape.d
    }
    fn home(&self, c: usize) -> usize {
        self.sh.layout().chunk_home(self.sh.ranks(), c)
    }
    fn own_chunks(&self, rank: usize) -> Vec<usize> {
        let l = self.sh.layout();
        (0..l.chunks_per_rank())
            .map(|s| l.chunk_at(self.sh.ranks(), rank, s))
            .collect()
    }
    fn block_shape(&self, w: &Work) -> AttnShape {
        AttnShape {
            tq: self.n(w.q_chunk),
            tk: self.n(w.kv_chunk),
            ..self.shape
        }
    }
    fn mask(&self, w: &Work) -> AttnMask {
        match w.mask {
            BlockMask::Diagonal => AttnMask::Causal {
                q_offset: self.sh.chunk_start(w.q_chunk),
                k_offset: self.sh.chunk_start(w.kv_chunk),
            },
            BlockMask::Full => AttnMask::Full,
        }
    }
    /// For each batch row: (shard element offset, chunk element offset, elements) of `chunk`'s
    /// valid rows at `width` elements a row.
    fn spans(&self, chunk: usize, width: usize) -> Vec<(usize, usize, usize)> {
        let (l, n) = (self.sh.local_len(), self.n(chunk));
        let row0 = self.sh.layout().slot_of(self.sh.ranks(), chunk) * self.sh.chunk_len();
        (0..self.shape.b)
            .map(|bi| ((bi * l + row0) * width, bi * n * width, n * width))
            .collect()
    }
}

/// Copies `chunk`'s rows of `shard` into `dst` at element `at` (`[B, n, width]`).
fn gather<T: crate::DeviceElem>(
    gpu: &Gpu,
    geo: &Geo,
    dst: &mut impl DevWrite<T>,
    at: usize,
    shard: &impl DevRead<T>,
    width: usize,
    chunk: usize,
) -> Result<()> {
    for (s, c, len) in geo.spans(chunk, width) {
        let mut d = DViewMut::of(dst, at + c..at + c + len)?;
        gpu.copy(&mut d, &DView::of(shard, s..s + len)?)?;
    }
    Ok(())
}

/// One posted batch, the buffers its sends need alive, and the messages it receives.
struct Posted<'g, P> {
    batch: Option<P>,
    sends: Vec<Rc<Msg<'g>>>,
    recvs: Vec<(Message, Msg<'g>)>,
}

impl<P> Default for Posted<'_, P> {
    fn default() -> Self {
        Posted {
            batch: None,
            sends: Vec::new(),
            recvs: Vec::new(),
        }
    }
}

/// What a pass does with messages and blocks on one rank (the device twin of DistExecutor's).
trait RankPass<'g> {
    fn pack(&mut self, p: Payload) -> Result<Rc<Msg<'g>>>;
    fn alloc_recv(&mut self, p: Payload) -> Result<Msg<'g>>;
    fn accept(&mut self, m: &Message, data: Msg<'g>) -> Result<()>;
    fn compute(&mut self, w: &Work) -> Result<()>;
    fn free(&mut self, chunks: &[(bool, usize)]);
}

impl GpuDistAttn {
    /// As [`DistExecutor::new`]: validates the schedule, the sharding and the per-rank shape.
    pub fn new(
        schedule: Schedule,
        sharding: Sharding,
        local: AttnShape,
        overlap: Overlap,
    ) -> Result<Self> {
        let exec = DistExecutor::new(schedule, sharding, local, overlap)
            .map_err(|e| GpuError::Shape(e.to_string()))?;
        Ok(GpuDistAttn { exec })
    }

    pub fn executor(&self) -> &DistExecutor {
        &self.exec
    }

    pub fn set_overlap(&mut self, overlap: Overlap) {
        self.exec.set_overlap(overlap);
    }

    fn geo(&self) -> Geo {
        Geo {
            sh: self.exec.sharding(),
            shape: self.exec.local_shape(),
        }
    }

    fn lens(&self) -> (usize, usize, usize) {
        let AttnShape {
            b, tq, h, h_kv, d, ..
        } = self.exec.local_shape();
        (b * tq * h * d, b * tq * h_kv * d, b * tq * h)
    }

    /// Payload bytes `rank` sends in one `pass` (bf16 parts 2 bytes an element, f32 parts 4),
    /// from the rank's plan and the chunk sizes: what [`GpuSpStats::bytes_sent`] measures.
    pub fn planned_bytes_sent(&self, rank: usize, pass: Pass) -> u64 {
        let plan = self.exec.rank_plan(rank, pass);
        let g = self.geo();
        plan.chunks
            .iter()
            .chain(&plan.results)
            .flatten()
            .filter(|(_, m)| m.from == rank && m.to != rank)
            .map(|(_, m)| {
                let (bf, f) = message_elems(&g, pass, m.payload);
                (2 * bf + 4 * f) as u64
            })
            .sum()
    }

    fn check<C: DeviceP2p + ?Sized>(
        &self,
        comm: &C,
        lens: &[(&str, usize, usize)],
    ) -> Result<usize> {
        if comm.world_size() != self.exec.schedule().ranks {
            return shape_err(format!(
                "device DistAttn: the world has {} ranks, the schedule {}",
                comm.world_size(),
                self.exec.schedule().ranks
            ));
        }
        for &(name, got, want) in lens {
            if got != want {
                return shape_err(format!(
                    "device DistAttn on rank {}: {name} has {got} elements, expected {want}",
                    comm.rank()
                ));
            }
        }
        Ok(comm.rank())
    }

    /// This rank's out `[B, L, H, D]` and lse `[B, L, H]` (overwritten) from its q, k, v
    /// (device buffers or views of exactly these lengths); every rank of the world calls it,
    /// each on its thread with its `Gpu`. Returns once the work is enqueued on `gpu`'s stream.
    /// Every working buffer comes from `gpu`'s scratch pool, so a warm pass allocates nothing.
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
        let mut st = Fwd::new(gpu, self.geo(), rank, q, k, v)?;
        let stats = self.run(gpu, comm, Pass::Forward, &mut st)?;
        st.write(out, lse)?;
        Ok(stats)
    }

    /// Gradients of this rank's q, k, v (overwritten) from dout and its rows of the forward's out
    /// and lse.
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
        let bf = [
            DView::all(q),
            DView::all(k),
            DView::all(v),
            DView::all(out),
            DView::all(dout),
        ];
        let mut st = Bwd::new(gpu, self.geo(), rank, bf, &DView::all(lse))?;
        let stats = self.run(gpu, comm, Pass::Backward, &mut st)?;
        st.write(dq, dk, dv)?;
        Ok(stats)
    }

    /// DistExecutor's step loop over the rank's [`RankPlan`], on the device.
    fn run<'g, C: DeviceP2p + ?Sized, S: RankPass<'g>>(
        &self,
        gpu: &'g Gpu,
        comm: &C,
        pass: Pass,
        st: &mut S,
    ) -> Result<GpuSpStats> {
        let rank = comm.rank();
        let plan: RankPlan = self.exec.rank_plan(rank, pass);
        comm.next_epoch();
        let before = comm.sent();
        let mut blocks = 0;
        let steps = &self.exec.schedule().steps;
        let n = steps.len();
        let io = Io { gpu, comm, rank };
        let mut compute = |st: &mut S, t: usize| -> Result<()> {
            for w in &steps[t].work[rank] {
                st.compute(w)?;
                blocks += 1;
            }
            Ok(())
        };
        let result = (|| -> Result<()> {
            match self.exec.overlap() {
                Overlap::Overlapped => {
                    let mut chunks = io.post(st, &plan.chunks[0])?;
                    let mut results = io.post(st, &plan.results[0])?;
                    for t in 0..n {
                        for (m, data) in io.wait(chunks)? {
                            st.accept(&m, data)?;
                        }
                        chunks = if t + 1 < n {
                            io.post(st, &plan.chunks[t + 1])?
                        } else {
                            Posted::default()
                        };
                        compute(st, t)?;
                        for (m, data) in io.wait(results)? {
                            st.accept(&m, data)?;
                        }
                        results = io.post(st, &plan.results[t + 1])?;
                        st.free(&plan.drops[t]);
                    }
                    for (m, data) in io.wait(results)? {
                        st.accept(&m, data)?;
                    }
                }
                Overlap::Blocking => {
                    for t in 0..n {
                        let msgs = [plan.chunks[t].as_slice(), &plan.results[t]].concat();
                        let got = io.wait(io.post(st, &msgs)?)?;
                        let mut results = Vec::new();
                        for (m, data) in got {
                            match m.payload {
                                Payload::Kv { .. } | Payload::Query { .. } => {
                                    st.accept(&m, data)?
                                }
                                _ => results.push((m, data)),
                            }
                        }
                        compute(st, t)?;
                        for (m, data) in results {
                            st.accept(&m, data)?;
                        }
                        st.free(&plan.drops[t]);
                    }
                    for (m, data) in io.wait(io.post(st, &plan.results[n])?)? {
                        st.accept(&m, data)?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = &result {
            comm.abort(&e.to_string());
        }
        result?;
        let after = comm.sent();
        Ok(GpuSpStats {
            blocks,
            messages_sent: (after.1 - before.1) as usize,
            bytes_sent: after.0 - before.0,
        })
    }
}

struct Io<'a, C: ?Sized> {
    gpu: &'a Gpu,
    comm: &'a C,
    rank: usize,
}

/// Buffer lifetimes across streams: a receive buffer is lent by the receiving rank's pool and
/// handed to the pass only after `complete` has ordered its stream after the transfer, a send's
/// buffer is held until then; a block given back is therefore reused only by work that the
/// rank's stream runs after the copy into or out of it (the pool's stream-order rule).
impl<C: DeviceP2p + ?Sized> Io<'_, C> {
    /// Posts `msgs` as one batch: this rank's sends packed, its receive buffers lent.
    fn post<'g, S: RankPass<'g>>(
        &self,
        st: &mut S,
        msgs: &[(u64, Message)],
    ) -> Result<Posted<'g, C::Posted>> {
        let mut p = Posted::default();
        let mut ops = Vec::with_capacity(msgs.len());
        for &(tag, m) in msgs {
            if m.from == self.rank {
                let data = st.pack(m.payload)?;
                ops.push((true, m, tag, data.parts()));
                p.sends.push(data);
            } else {
                let data = st.alloc_recv(m.payload)?;
                ops.push((false, m, tag, data.parts()));
                p.recvs.push((m, data));
            }
        }
        let ops: Vec<DevOp<'_>> = ops
            .iter()
            .map(|(send, m, tag, parts)| {
                if *send {
                    DevOp::Send {
                        to: m.to,
                        tag: *tag,
                        parts,
                    }
                } else {
                    DevOp::Recv {
                        from: m.from,
                        tag: *tag,
                        parts,
                    }
                }
            })
            .collect();
        if !ops.is_empty() {
            p.batch = Some(self.comm.post(self.gpu, &ops)?);
        }
        Ok(p)
    }

    fn wait<'g>(&self, p: Posted<'g, C::Posted>) -> Result<Vec<(Message, Msg<'g>)>> {
        if let Some(b) = p.batch {
            self.comm.complete(self.gpu, b)?;
        }
        drop(p.sends);
        Ok(p.recvs)
    }
}

/// (bf16, f32) elements of a message's parts: the buffers [`RankPass::alloc_recv`] makes.
fn message_elems(g: &Geo, pass: Pass, p: Payload) -> (usize, usize) {
    let (qw, kw, h) = (g.qw(), g.kw(), g.shape.h);
    match (pass, p) {
        (_, Payload::Kv { chunk }) => (2 * g.rows(chunk) * kw, 0),
        (Pass::Forward, Payload::Query { chunk }) => (g.rows(chunk) * qw, 0),
        (Pass::Backward, Payload::Query { chunk }) => (3 * g.rows(chunk) * qw, g.rows(chunk) * h),
        (Pass::Forward, Payload::Partial { q_chunk, .. }) => (0, g.rows(q_chunk) * (qw + h)),
        (Pass::Backward, Payload::Partial { q_chunk, .. }) => (g.rows(q_chunk) * qw, 0),
        (Pass::Forward, Payload::KvGrad { .. }) => (0, 0),
        (Pass::Backward, Payload::KvGrad { chunk }) => (0, 2 * g.rows(chunk) * kw),
    }
}

fn held<'m, K: std::hash::Hash + Eq + std::fmt::Debug, V>(
    m: &'m HashMap<K, V>,
    key: &K,
) -> Result<&'m V> {
    m.get(key)
        .ok_or_else(|| GpuError::Shape(format!("device DistAttn: {key:?} is not held")))
}

/// Forward state of one rank.
struct Fwd<'g> {
    gpu: &'g Gpu,
    geo: Geo,
    rank: usize,
    q: HashMap<usize, Rc<Msg<'g>>>,
    kv: HashMap<usize, Rc<Msg<'g>>>,
    /// Running f32 o ‖ lse of this rank's own query chunks.
    acc: HashMap<usize, Scratch<'g, f32>>,
    /// Partials computed here for other ranks' queries: o ‖ lse f32.
    partials: HashMap<(usize, usize), Msg<'g>>,
    o_b: Scratch<'g, bf16>,
    o_f: Scratch<'g, f32>,
    lse_b: Scratch<'g, f32>,
}

/// Elements of the largest chunk's rows at `width`.
fn max_rows(geo: &Geo) -> usize {
    geo.shape.b * geo.sh.chunk_len()
}

/// An f32 o ‖ lse buffer of `rows` query rows in its "nothing seen yet" state: o = 0, lse = −∞.
fn empty_partial(gpu: &Gpu, buf: &mut Scratch<'_, f32>, rows: usize, qw: usize) -> Result<()> {
    let len = buf.len();
    gpu.zero(&mut buf.view_mut(0..rows * qw)?)?;
    gpu.fill_f32(&mut buf.view_mut(rows * qw..len)?, f32::NEG_INFINITY)
}

impl<'g> Fwd<'g> {
    fn new(
        gpu: &'g Gpu,
        geo: Geo,
        rank: usize,
        q: &impl DevRead<bf16>,
        k: &impl DevRead<bf16>,
        v: &impl DevRead<bf16>,
    ) -> Result<Self> {
        let (qw, kw, h) = (geo.qw(), geo.kw(), geo.shape.h);
        let mr = max_rows(&geo).max(1);
        let mut st = Fwd {
            gpu,
            geo,
            rank,
            q: HashMap::new(),
            kv: HashMap::new(),
            acc: HashMap::new(),
            partials: HashMap::new(),
            o_b: gpu.scratch(mr * qw)?,
            o_f: gpu.scratch(mr * qw)?,
            lse_b: gpu.scratch(mr * h)?,
        };
        for c in geo.own_chunks(rank) {
            let rows = geo.rows(c);
            let mut qm = Msg::alloc(gpu, rows * qw, 0)?;
            let mut kvm = Msg::alloc(gpu, 2 * rows * kw, 0)?;
            if let (Some(qb), Some(kvb)) = (qm.bf.as_mut(), kvm.bf.as_mut()) {
                gather(gpu, &geo, qb, 0, q, qw, c)?;
                gather(gpu, &geo, kvb, 0, k, kw, c)?;
                gather(gpu, &geo, kvb, rows * kw, v, kw, c)?;
            }
            st.q.insert(c, Rc::new(qm));
            st.kv.insert(c, Rc::new(kvm));
            let mut acc = gpu.scratch::<f32>(rows * (qw + h))?;
            empty_partial(gpu, &mut acc, rows, qw)?;
            st.acc.insert(c, acc);
        }
        Ok(st)
    }

    /// Merges a block's f32 o ‖ lse into its owner's running value.
    fn merge_into_acc(
        &mut self,
        qc: usize,
        o: &impl DevRead<f32>,
        l: &impl DevRead<f32>,
    ) -> Result<()> {
        let (rows, qw, h, d) = (
            self.geo.rows(qc),
            self.geo.qw(),
            self.geo.shape.h,
            self.geo.shape.d,
        );
        let acc = self
            .acc
            .get_mut(&qc)
            .ok_or_else(|| GpuError::Shape(format!("device DistAttn: own chunk {qc} missing")))?;
        // The o and lse parts of the one accumulator, held mutably here.
        let p = acc.dptr();
        let mut ao = RawMut {
            ptr: p,
            len: rows * qw,
        };
        let mut al = RawMut {
            ptr: p + (rows * qw * size_of::<f32>()) as u64,
            len: rows * h,
        };
        self.gpu
            .attention_merge(&mut ao, &mut al, o, l, rows * h, d)
    }

    fn write(self, out: &mut impl DevWrite<bf16>, lse: &mut impl DevWrite<f32>) -> Result<()> {
        let (qw, h) = (self.geo.qw(), self.geo.shape.h);
        self.gpu.zero(out)?;
        self.gpu.fill_f32(lse, f32::NEG_INFINITY)?;
        for (c, acc) in &self.acc {
            let rows = self.geo.rows(*c);
            for ((so, co, len), (sl, cl, llen)) in self
                .geo
                .spans(*c, qw)
                .into_iter()
                .zip(self.geo.spans(*c, h))
            {
                if len == 0 {
                    continue;
                }
                self.gpu.cast_from_f32(
                    &mut DViewMut::of(out, so..so + len)?,
                    &acc.view(co..co + len)?,
                )?;
                let base = rows * qw;
                self.gpu.copy(
                    &mut DViewMut::of(lse, sl..sl + llen)?,
                    &acc.view(base + cl..base + cl + llen)?,
                )?;
            }
        }
        Ok(())
    }
}

/// A writable device range inside a buffer the caller holds mutably.
struct RawMut {
    ptr: u64,
    len: usize,
}
impl crate::buffer::DevRead<f32> for RawMut {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn dlen(&self) -> usize {
        self.len
    }
}
impl crate::buffer::DevWrite<f32> for RawMut {}

impl<'g> RankPass<'g> for Fwd<'g> {
    fn pack(&mut self, p: Payload) -> Result<Rc<Msg<'g>>> {
        match p {
            Payload::Kv { chunk } => Ok(held(&self.kv, &chunk)?.clone()),
            Payload::Query { chunk } => Ok(held(&self.q, &chunk)?.clone()),
            Payload::Partial { q_chunk, kv_chunk } => self
                .partials
                .remove(&(q_chunk, kv_chunk))
                .map(Rc::new)
                .ok_or_else(|| GpuError::Shape(format!("partial {q_chunk},{kv_chunk} not held"))),
            Payload::KvGrad { .. } => shape_err("the forward sends no dK/dV".into()),
        }
    }

    fn alloc_recv(&mut self, p: Payload) -> Result<Msg<'g>> {
        if let Payload::KvGrad { .. } = p {
            return shape_err("the forward receives no dK/dV".into());
        }
        let (bf, f) = message_elems(&self.geo, Pass::Forward, p);
        Msg::alloc(self.gpu, bf, f)
    }

    fn accept(&mut self, m: &Message, data: Msg<'g>) -> Result<()> {
        match m.payload {
            Payload::Kv { chunk } => {
                self.kv.insert(chunk, Rc::new(data));
            }
            Payload::Query { chunk } => {
                self.q.insert(chunk, Rc::new(data));
            }
            Payload::Partial { q_chunk, kv_chunk } => {
                let rows = self.geo.rows(q_chunk);
                if rows == 0 {
                    return Ok(());
                }
                if self.geo.home(q_chunk) == self.rank {
                    let f = data.f();
                    let ol = rows * self.geo.qw();
                    let (o, l) = (f.view(0..ol)?, f.view(ol..f.len())?);
                    self.merge_into_acc(q_chunk, &o, &l)?;
                } else {
                    self.partials.insert((q_chunk, kv_chunk), data);
                }
            }
            Payload::KvGrad { .. } => {}
        }
        Ok(())
    }

    fn compute(&mut self, w: &Work) -> Result<()> {
        let shape = self.geo.block_shape(w);
        let (tq, tk) = (shape.tq, shape.tk);
        let rows = self.geo.rows(w.q_chunk);
        let (qw, h) = (self.geo.qw(), self.geo.shape.h);
        let own = self.geo.home(w.q_chunk) == self.rank;
        if tq == 0 || tk == 0 {
            if !own {
                let mut m = Msg::alloc(self.gpu, 0, rows * (qw + h))?;
                if let Some(f) = m.f.as_mut() {
                    empty_partial(self.gpu, f, rows, qw)?;
                }
                self.partials.insert((w.q_chunk, w.kv_chunk), m);
            }
            return Ok(());
        }
        let q = held(&self.q, &w.q_chunk)?.clone();
        let kv = held(&self.kv, &w.kv_chunk)?.clone();
        let kl = self.geo.shape.b * tk * self.geo.kw();
        let (k, v) = (kv.bf().view(0..kl)?, kv.bf().view(kl..2 * kl)?);
        let (ol, ll) = (rows * qw, rows * h);
        if own {
            {
                let mut o_b = self.o_b.view_mut(0..ol)?;
                let mut lse_b = self.lse_b.view_mut(0..ll)?;
                self.gpu.attention_forward(
                    &mut o_b,
                    &mut lse_b,
                    q.bf(),
                    &k,
                    &v,
                    shape,
                    self.geo.mask(w),
                )?;
            }
            self.gpu
                .to_f32(&mut self.o_f.view_mut(0..ol)?, &self.o_b.view(0..ol)?)?;
            let (o_f, l_b) = (
                RawMut {
                    ptr: self.o_f.dptr(),
                    len: ol,
                },
                RawMut {
                    ptr: self.lse_b.dptr(),
                    len: ll,
                },
            );
            self.merge_into_acc(w.q_chunk, &o_f, &l_b)?;
        } else {
            // The partial for the owner: lse straight into the message, o widened into it.
            let mut m = Msg::alloc(self.gpu, 0, ol + ll)?;
            let f = m.f.as_mut().expect("non-empty");
            {
                let mut o_b = self.o_b.view_mut(0..ol)?;
                let mut lse_m = f.view_mut(ol..ol + ll)?;
                self.gpu.attention_forward(
                    &mut o_b,
                    &mut lse_m,
                    q.bf(),
                    &k,
                    &v,
                    shape,
                    self.geo.mask(w),
                )?;
            }
            self.gpu
                .to_f32(&mut f.view_mut(0..ol)?, &self.o_b.view(0..ol)?)?;
            self.partials.insert((w.q_chunk, w.kv_chunk), m);
        }
        Ok(())
    }

    fn free(&mut self, chunks: &[(bool, usize)]) {
        for &(is_q, c) in chunks {
            if is_q {
                self.q.remove(&c);
            } else {
                self.kv.remove(&c);
            }
        }
    }
}

/// Backward state of one rank.
struct Bwd<'g> {
    gpu: &'g Gpu,
    geo: Geo,
    rank: usize,
    /// Query chunks: bf = Q ‖ dO ‖ O, f = lse.
    q: HashMap<usize, Rc<Msg<'g>>>,
    kv: HashMap<usize, Rc<Msg<'g>>>,
    /// f32 dQ of this rank's own query chunks.
    dq: HashMap<usize, Scratch<'g, f32>>,
    /// Helpers' bf16 dQ of one block.
    dq_part: HashMap<(usize, usize), Msg<'g>>,
    /// f32 dK ‖ dV of own chunks, and of other ranks' chunks accumulated here (sent as they
    /// are: exactly the message's length).
    dkv: HashMap<usize, Scratch<'g, f32>>,
    dkv_acc: HashMap<usize, Scratch<'g, f32>>,
    dq_b: Scratch<'g, bf16>,
    dk_b: Scratch<'g, bf16>,
    dv_b: Scratch<'g, bf16>,
}

/// A zeroed f32 accumulator of `len` elements from the pool.
fn zeroed(gpu: &Gpu, len: usize) -> Result<Scratch<'_, f32>> {
    let mut s = gpu.scratch::<f32>(len)?;
    gpu.zero(&mut s)?;
    Ok(s)
}

impl<'g> Bwd<'g> {
    /// `bf` = [q, k, v, out, dout] shards.
    fn new(
        gpu: &'g Gpu,
        geo: Geo,
        rank: usize,
        bf: [DView<'_, bf16>; 5],
        lse: &DView<'_, f32>,
    ) -> Result<Self> {
        let [q, k, v, out, dout] = bf;
        let (qw, kw, h) = (geo.qw(), geo.kw(), geo.shape.h);
        let mr = max_rows(&geo).max(1);
        let mut st = Bwd {
            gpu,
            geo,
            rank,
            q: HashMap::new(),
            kv: HashMap::new(),
            dq: HashMap::new(),
            dq_part: HashMap::new(),
            dkv: HashMap::new(),
            dkv_acc: HashMap::new(),
            dq_b: gpu.scratch(mr * qw)?,
            dk_b: gpu.scratch(mr * kw)?,
            dv_b: gpu.scratch(mr * kw)?,
        };
        for c in geo.own_chunks(rank) {
            let rows = geo.rows(c);
            let mut qm = Msg::alloc(gpu, 3 * rows * qw, rows * h)?;
            let mut kvm = Msg::alloc(gpu, 2 * rows * kw, 0)?;
            if let (Some(qb), Some(lb), Some(kvb)) =
                (qm.bf.as_mut(), qm.f.as_mut(), kvm.bf.as_mut())
            {
                gather(gpu, &geo, qb, 0, &q, qw, c)?;
                gather(gpu, &geo, qb, rows * qw, &dout, qw, c)?;
                gather(gpu, &geo, qb, 2 * rows * qw, &out, qw, c)?;
                gather(gpu, &geo, lb, 0, lse, h, c)?;
                gather(gpu, &geo, kvb, 0, &k, kw, c)?;
                gather(gpu, &geo, kvb, rows * kw, &v, kw, c)?;
            }
            st.q.insert(c, Rc::new(qm));
            st.kv.insert(c, Rc::new(kvm));
            st.dq.insert(c, zeroed(gpu, rows * qw)?);
            st.dkv.insert(c, zeroed(gpu, 2 * rows * kw)?);
        }
        Ok(st)
    }

    /// The f32 dK ‖ dV accumulator of `chunk` (`len` elements): the rank's own, or one for
    /// another rank's chunk (zeroed on first use).
    fn kv_grad_dst(&mut self, chunk: usize, len: usize) -> Result<&mut Scratch<'g, f32>> {
        let gpu = self.gpu;
        if self.geo.home(chunk) == self.rank {
            self.dkv
                .get_mut(&chunk)
                .ok_or_else(|| GpuError::Shape(format!("own kv chunk {chunk} missing")))
        } else {
            match self.dkv_acc.entry(chunk) {
                std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
                std::collections::hash_map::Entry::Vacant(e) => Ok(e.insert(zeroed(gpu, len)?)),
            }
        }
    }

    fn write(
        self,
        dq: &mut impl DevWrite<bf16>,
        dk: &mut impl DevWrite<bf16>,
        dv: &mut impl DevWrite<bf16>,
    ) -> Result<()> {
        let (qw, kw) = (self.geo.qw(), self.geo.kw());
        let g = self.gpu;
        g.zero(dq)?;
        g.zero(dk)?;
        g.zero(dv)?;
        for (c, acc) in &self.dq {
            for (s, o, len) in self.geo.spans(*c, qw) {
                if len > 0 {
                    g.cast_from_f32(&mut DViewMut::of(dq, s..s + len)?, &acc.view(o..o + len)?)?;
                }
            }
        }
        for (c, acc) in &self.dkv {
            let half = self.geo.rows(*c) * kw;
            for (s, o, len) in self.geo.spans(*c, kw) {
                if len > 0 {
                    g.cast_from_f32(&mut DViewMut::of(dk, s..s + len)?, &acc.view(o..o + len)?)?;
                    g.cast_from_f32(
                        &mut DViewMut::of(dv, s..s + len)?,
                        &acc.view(half + o..half + o + len)?,
                    )?;
                }
            }
        }
        Ok(())
    }
}

impl<'g> RankPass<'g> for Bwd<'g> {
    fn pack(&mut self, p: Payload) -> Result<Rc<Msg<'g>>> {
        match p {
            Payload::Kv { chunk } => Ok(held(&self.kv, &chunk)?.clone()),
            Payload::Query { chunk } => Ok(held(&self.q, &chunk)?.clone()),
            Payload::Partial { q_chunk, kv_chunk } => self
                .dq_part
                .remove(&(q_chunk, kv_chunk))
                .map(Rc::new)
                .ok_or_else(|| {
                    GpuError::Shape(format!("dQ partial {q_chunk},{kv_chunk} not held"))
                }),
            Payload::KvGrad { chunk } => {
                let len = 2 * self.geo.rows(chunk) * self.geo.kw();
                let acc = self
                    .dkv_acc
                    .remove(&chunk)
                    .ok_or_else(|| GpuError::Shape(format!("dK/dV of chunk {chunk} not held")))?;
                // The accumulator is the message: exactly `len` elements.
                Ok(Rc::new(Msg {
                    bf: None,
                    f: (len > 0).then_some(acc),
                }))
            }
        }
    }

    fn alloc_recv(&mut self, p: Payload) -> Result<Msg<'g>> {
        let (bf, f) = message_elems(&self.geo, Pass::Backward, p);
        Msg::alloc(self.gpu, bf, f)
    }

    fn accept(&mut self, m: &Message, data: Msg<'g>) -> Result<()> {
        match m.payload {
            Payload::Kv { chunk } => {
                self.kv.insert(chunk, Rc::new(data));
            }
            Payload::Query { chunk } => {
                self.q.insert(chunk, Rc::new(data));
            }
            Payload::Partial { q_chunk, kv_chunk } => {
                let len = self.geo.rows(q_chunk) * self.geo.qw();
                if len == 0 {
                    return Ok(());
                }
                if self.geo.home(q_chunk) == self.rank {
                    let dst = self.dq.get_mut(&q_chunk).ok_or_else(|| {
                        GpuError::Shape(format!("own query chunk {q_chunk} missing"))
                    })?;
                    self.gpu.accum_f32(dst, data.bf())?;
                } else {
                    self.dq_part.insert((q_chunk, kv_chunk), data);
                }
            }
            Payload::KvGrad { chunk } => {
                if let Some(f) = &data.f {
                    let len = 2 * self.geo.rows(chunk) * self.geo.kw();
                    let gpu = self.gpu;
                    let dst = self.kv_grad_dst(chunk, len)?;
                    gpu.accum_f32(dst, &f.view(0..len)?)?;
                }
            }
        }
        Ok(())
    }

    fn compute(&mut self, w: &Work) -> Result<()> {
        let shape = self.geo.block_shape(w);
        let (tq, tk) = (shape.tq, shape.tk);
        let (qi, ki) = (w.q_chunk, w.kv_chunk);
        let own_q = w.owner == self.rank;
        let (qw, kw) = (self.geo.qw(), self.geo.kw());
        let ql = self.geo.shape.b * tq * qw;
        let kl = self.geo.shape.b * tk * kw;
        if tq == 0 || tk == 0 {
            if !own_q {
                self.dq_part.insert((qi, ki), Msg::zeros(self.gpu, ql, 0)?);
            }
            if self.geo.home(ki) != self.rank {
                self.kv_grad_dst(ki, 2 * kl)?;
            }
            return Ok(());
        }
        let qm = held(&self.q, &qi)?.clone();
        let kvm = held(&self.kv, &ki)?.clone();
        let (qb, lse) = (qm.bf(), qm.f());
        let (q, dout, out) = (
            qb.view(0..ql)?,
            qb.view(ql..2 * ql)?,
            qb.view(2 * ql..3 * ql)?,
        );
        let (k, v) = (kvm.bf().view(0..kl)?, kvm.bf().view(kl..2 * kl)?);
        // A helper's dQ goes straight into the message for the owner.
        let mut part = if own_q {
            None
        } else {
            Some(Msg::alloc(self.gpu, ql, 0)?)
        };
        {
            let mut dq_b = match part.as_mut().and_then(|m| m.bf.as_mut()) {
                Some(b) => b.view_mut(0..ql)?,
                None => self.dq_b.view_mut(0..ql)?,
            };
            let mut dk_b = self.dk_b.view_mut(0..kl)?;
            let mut dv_b = self.dv_b.view_mut(0..kl)?;
            self.gpu.attention_backward(
                &mut dq_b,
                &mut dk_b,
                &mut dv_b,
                &dout,
                &q,
                &k,
                &v,
                &out,
                lse,
                shape,
                self.geo.mask(w),
            )?;
        }
        match part {
            Some(m) => {
                self.dq_part.insert((qi, ki), m);
            }
            None => {
                let dst = self
                    .dq
                    .get_mut(&qi)
                    .ok_or_else(|| GpuError::Shape(format!("own query chunk {qi} missing")))?;
                self.gpu
                    .accum_f32(&mut dst.view_mut(0..ql)?, &self.dq_b.view(0..ql)?)?;
            }
        }
        let gpu = self.gpu;
        let (dk_b, dv_b) = (
            RawRead {
                ptr: self.dk_b.dptr(),
                len: kl,
            },
            RawRead {
                ptr: self.dv_b.dptr(),
                len: kl,
            },
        );
        let dst = self.kv_grad_dst(ki, 2 * kl)?;
        gpu.accum_f32(&mut dst.view_mut(0..kl)?, &dk_b)?;
        gpu.accum_f32(&mut dst.view_mut(kl..2 * kl)?, &dv_b)
    }

    fn free(&mut self, chunks: &[(bool, usize)]) {
        for &(is_q, c) in chunks {
            if is_q {
                self.q.remove(&c);
            } else {
                self.kv.remove(&c);
            }
        }
    }
}

/// A read-only device range of a buffer held elsewhere in the same state.
struct RawRead {
    ptr: u64,
    len: usize,
}
impl DevRead<bf16> for RawRead {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn dlen(&self) -> usize {
        self.len
    }
}
