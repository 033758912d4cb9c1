//! Distributed executor of a [`Schedule`] over a [`Communicator`]: every rank holds only its own
//! shard and runs the same code; the schedule's messages are real point-to-point messages.
//!
//! Shapes, per rank (L = `Sharding::local_len`, rows in the layout's order: one chunk, or for
//! zigzag chunks r and 2P−1−r concatenated): q, out, dout, dq `[B, L, H, D]`; k, v, dk, dv
//! `[B, L, H_kv, D]`; lse `[B, L, H]`, all f32. Padded rows (global row ≥ T, always the tail of a
//! chunk) are never read; outputs get out = 0, lse = −inf, dq = dk = dv = 0 there.
//!
//! Messages (only a chunk's valid rows travel; payloads are f32):
//! - `Kv { c }`: K ‖ V of chunk c, H_kv heads only (GQA).
//! - `Query { c }`: forward Q; backward Q ‖ dO ‖ lse ‖ D with D = rowsum(dO ∘ O), never O.
//! - `Partial { q, kv }`: forward o ‖ lse of the block, merged at the owner with
//!   `attention_merge` in f32; backward the block's dQ, added at the owner.
//! - `KvGrad { c }`: backward only, the sender's accumulated dK ‖ dV of chunk c, added where it
//!   lands (summed at home, or carried on along a ring).
//!
//! Order of work on a rank at step t: the step's chunks (`Kv`, `Query`) must be in hand; its
//! block products run in work order; then the results that arrive for step t (`Partial`,
//! `KvGrad`, computed at step t−1) are merged in message order; results of step t+1 are then
//! sent. After the last step the schedule's `finish` results are merged. This order is the same in
//! both [`Overlap`] modes, so they give bit-identical results; only when messages are posted and
//! waited for differs:
//! - [`Overlap::Overlapped`] (DESIGN.md "DistAttn"): step t+1's chunks are posted (sends and
//!   receives) before step t's compute and waited for after it, double-buffered; results computed at
//!   step t are sent right after it and waited for after step t+1's compute.
//! - [`Overlap::Blocking`]: each step's messages are posted and waited for right before its
//!   compute.
//!
//! Received chunks are freed after their last use on this rank, so a ring holds O(2) foreign
//! chunks, not O(P). Tags are [`SP_TAG_BASE`] + pass + the message's index in the schedule, so
//! every message has its own tag and matching does not depend on posting order.
//!
//! Backward, each rank computes D = rowsum(dO ∘ O) of its own query chunks once, from its rows of
//! the global out, and every block product, at home or at a helper, runs
//! `attention_backward_with_delta` with that D: a helper uses the D it received and never sees O,
//! so its blocks are bit-identical to the owner computing them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Add;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reel_comm::{CommError, Communicator, P2pOp, Pending};
use reel_kernels::attention::AttnShape;
use reel_model::PackedRow;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::blocks::{add, merge, Blocks, OutLse};
use crate::schedule::{block_counts, Message, Payload, Schedule, ScheduleError, Work};
use crate::shard::{ShardError, Sharding};

/// First tag of this executor's point-to-point messages; tags `SP_TAG_BASE .. SP_TAG_BASE + 2³³`
/// are its own (other users of the same communicator should pick tags outside that range).
pub const SP_TAG_BASE: u64 = 0x5350_0000_0000_0000;

/// When the messages of a step are posted and waited for (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Step t+1's chunks are posted before step t's compute and waited for after it.
    #[default]
    Overlapped,
    /// Each step's messages are posted and waited for right before its compute.
    Blocking,
}

/// Forward or backward attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Pass {
    Forward,
    Backward,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
        })
    }
}

/// Where in a schedule a communication failed: the step whose messages were being posted or
/// waited for, or `Finish` (the results that arrive after the last step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Stage {
    Step(usize),
    Finish,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Step(t) => write!(f, "step {t}"),
            Stage::Finish => f.write_str("finish"),
        }
    }
}

/// Why distributed attention failed.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum DistExecError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The shape, sharding or schedule do not fit together.
    #[error("distributed attention: {0}")]
    Shape(String),
    #[error(
        "distributed attention on rank {rank}: {name} has {len} elements, expected {expected}"
    )]
    Length {
        rank: usize,
        name: &'static str,
        len: usize,
        expected: usize,
    },
    #[error(
        "distributed attention: the communicator has {size} ranks, the schedule or grid {ranks}"
    )]
    WorldSize { size: usize, ranks: usize },
    /// A message of the schedule could not be posted or did not arrive (a peer failed, timed out
    /// or exited); the communicator's world is aborted.
    #[error("distributed attention {pass}, {stage}, rank {rank}: {source}")]
    CommAt {
        pass: Pass,
        stage: Stage,
        rank: usize,
        #[source]
        source: CommError,
    },
    /// A communication failure outside the executor (e.g. `InProcess::spawn` reporting a panic).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Ulysses attention behind `SpAttention` refused or failed.
    #[error(transparent)]
    Ulysses(#[from] crate::ulysses::UlyssesError),
}

impl DistExecError {
    /// The communication error underneath, if this is one.
    pub fn comm_error(&self) -> Option<&CommError> {
        match self {
            DistExecError::CommAt { source, .. } | DistExecError::Comm(source) => Some(source),
            DistExecError::Ulysses(
                crate::ulysses::UlyssesError::CommAt { source, .. }
                | crate::ulysses::UlyssesError::Comm(source),
            ) => Some(source),
            _ => None,
        }
    }
}

/// What one forward or backward call did on this rank, for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ExecStats {
    /// Block products computed (equals `block_counts(schedule)[rank]`; an empty block, from
    /// chunks that are all padding, counts without running a kernel).
    pub blocks: usize,
    /// Point-to-point messages sent.
    pub messages_sent: usize,
    /// Payload bytes sent and received, from the communicator's counters (`comm.stats()`).
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    /// Time in block products and merges.
    pub compute: Duration,
    /// Time blocked waiting for messages (what overlap hides).
    pub wait: Duration,
}

impl Add for ExecStats {
    type Output = ExecStats;
    fn add(self, o: ExecStats) -> ExecStats {
        ExecStats {
            blocks: self.blocks + o.blocks,
            messages_sent: self.messages_sent + o.messages_sent,
            bytes_sent: self.bytes_sent + o.bytes_sent,
            bytes_recv: self.bytes_recv + o.bytes_recv,
            compute: self.compute + o.compute,
            wait: self.wait + o.wait,
        }
    }
}

/// Runs one validated schedule on this rank's shard, exchanging the schedule's messages through a
/// communicator whose group is the schedule's ranks (`comm.rank()` is the schedule rank).
#[derive(Clone, Debug)]
pub struct DistExecutor {
    schedule: Schedule,
    blocks: Blocks,
    overlap: Overlap,
}

/// One rank's share of a schedule in one pass: its messages per step, split into chunks (needed
/// before the step's compute) and results (merged after it), each with its tag, and when received
/// chunks can be freed. Every executor of the schedule (this one on host slices, reel-cuda's on
/// device buffers) follows the same plan, so tags and timing agree between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankPlan {
    /// `chunks[t]`: `Kv` / `Query` messages of step t to or from this rank. Overlapped, they are
    /// posted during step t − 1 (step 0's before it); blocking, right before step t.
    pub chunks: Vec<Vec<(u64, Message)>>,
    /// `results[t]`: `Partial` / `KvGrad` messages of step t (`t = steps` is `finish`), computed
    /// at step t − 1 (`KvGrad` only in the backward).
    pub results: Vec<Vec<(u64, Message)>>,
    /// Received chunks to free after step t: (is a query chunk, chunk).
    pub drops: Vec<Vec<(bool, usize)>>,
}

type Plan = RankPlan;

impl DistExecutor {
    /// Validates the schedule, that `sharding` is over its ranks and layout, and the per-rank
    /// shape: `local.tq == local.tk == sharding.local_len()`, `h` a positive multiple of `h_kv`,
    /// `d > 0`.
    pub fn new(
        schedule: Schedule,
        sharding: Sharding,
        local: AttnShape,
        overlap: Overlap,
    ) -> Result<Self, DistExecError> {
        schedule.validate()?;
        if sharding.ranks() != schedule.ranks || sharding.layout() != schedule.layout() {
            return Err(DistExecError::Shape(format!(
                "sharding over {} ranks ({:?}) for a {:?} schedule over {} ranks ({:?})",
                sharding.ranks(),
                sharding.layout(),
                schedule.kind,
                schedule.ranks,
                schedule.layout()
            )));
        }
        let l = sharding.local_len();
        if local.tq != l || local.tk != l {
            return Err(DistExecError::Shape(format!(
                "local tq = {}, tk = {}; T = {} over {} ranks gives {l} rows per rank",
                local.tq,
                local.tk,
                sharding.seq_len(),
                sharding.ranks()
            )));
        }
        if local.d == 0 || local.h_kv == 0 || !local.h.is_multiple_of(local.h_kv) {
            return Err(DistExecError::Shape(format!(
                "h = {} must be a positive multiple of h_kv = {}, d = {} positive",
                local.h, local.h_kv, local.d
            )));
        }
        Ok(DistExecutor {
            schedule,
            blocks: Blocks::new(sharding, local),
            overlap,
        })
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn sharding(&self) -> Sharding {
        self.blocks.sharding
    }

    /// The per-rank shape `[B, L, H, D]` the executor was built for.
    pub fn local_shape(&self) -> AttnShape {
        self.blocks.shape
    }

    pub fn overlap(&self) -> Overlap {
        self.overlap
    }

    /// Rows packed by prompt: batch row b follows `rows[b]` (segments see the shared prefix
    /// and themselves, [`PackedRow::sub_blocks`]) instead of plain causal attention; None for
    /// plain rows. Every rank must set the same layout.
    pub fn set_packed(&mut self, rows: Option<Arc<[PackedRow]>>) -> Result<(), DistExecError> {
        if let Some(rows) = &rows {
            if rows.len() != self.blocks.shape.b {
                return Err(DistExecError::Shape(format!(
                    "{} packed rows for a batch of {}",
                    rows.len(),
                    self.blocks.shape.b
                )));
            }
            for (b, row) in rows.iter().enumerate() {
                row.check(self.blocks.sharding.seq_len())
                    .map_err(|e| DistExecError::Shape(format!("packed row {b}: {e}")))?;
            }
        }
        self.blocks.packed = rows;
        Ok(())
    }

    pub fn set_overlap(&mut self, overlap: Overlap) {
        self.overlap = overlap;
    }

    /// Block products `rank` computes per pass (`block_counts` of the schedule).
    pub fn planned_blocks(&self, rank: usize) -> usize {
        block_counts(&self.schedule).get(rank).copied().unwrap_or(0)
    }

    /// Payload bytes `rank` sends in one `pass`, from the schedule and the chunk sizes.
    pub fn planned_bytes_sent(&self, rank: usize, pass: Pass) -> u64 {
        let plan = self.plan(rank, pass);
        plan.chunks
            .iter()
            .chain(&plan.results)
            .flatten()
            .filter(|(_, m)| m.from == rank)
            .map(|(_, m)| 4 * self.message_len(pass, m.payload) as u64)
            .sum()
    }

    /// `(out, lse)` of this rank's query rows: out `[B, L, H, D]`, lse `[B, L, H]` (overwritten),
    /// from this rank's q `[B, L, H, D]`, k and v `[B, L, H_kv, D]`. Every rank of the group must
    /// call it, with the same executor, in the same order as its other calls on `comm`.
    pub fn forward<C: Communicator>(
        &self,
        comm: &C,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<ExecStats, DistExecError> {
        let rank = self.check_comm(comm)?;
        let (nq, nk, nl) = self.lens();
        for (name, len, expected) in [
            ("out", out.len(), nq),
            ("lse", lse.len(), nl),
            ("q", q.len(), nq),
            ("k", k.len(), nk),
            ("v", v.len(), nk),
        ] {
            self.check_len(rank, name, len, expected)?;
        }
        let mut st = ForwardRank::new(&self.blocks, rank, q, k, v);
        let stats = self.run(comm, Pass::Forward, &mut st)?;
        st.write(out, lse);
        Ok(stats)
    }

    /// Gradients of this rank's q, k, v (dq `[B, L, H, D]`, dk and dv `[B, L, H_kv, D]`,
    /// overwritten) given dout and this rank's rows of the forward's out and lse.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<C: Communicator>(
        &self,
        comm: &C,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
    ) -> Result<ExecStats, DistExecError> {
        let rank = self.check_comm(comm)?;
        let (nq, nk, nl) = self.lens();
        for (name, len, expected) in [
            ("dq", dq.len(), nq),
            ("dk", dk.len(), nk),
            ("dv", dv.len(), nk),
            ("dout", dout.len(), nq),
            ("q", q.len(), nq),
            ("k", k.len(), nk),
            ("v", v.len(), nk),
            ("out", out.len(), nq),
            ("lse", lse.len(), nl),
        ] {
            self.check_len(rank, name, len, expected)?;
        }
        let mut st = BackwardRank::new(&self.blocks, rank, [q, k, v, out, lse, dout]);
        let stats = self.run(comm, Pass::Backward, &mut st)?;
        st.write(dq, dk, dv);
        Ok(stats)
    }

    fn check_comm<C: Communicator>(&self, comm: &C) -> Result<usize, DistExecError> {
        if comm.world_size() != self.schedule.ranks {
            return Err(DistExecError::WorldSize {
                size: comm.world_size(),
                ranks: self.schedule.ranks,
            });
        }
        Ok(comm.rank())
    }

    /// Elements of a q-like, a kv-like and an lse-like local tensor.
    fn lens(&self) -> (usize, usize, usize) {
        let AttnShape { b, tq, h, .. } = self.blocks.shape;
        let (qw, kw) = self.blocks.widths();
        (b * tq * qw, b * tq * kw, b * tq * h)
    }

    fn check_len(
        &self,
        rank: usize,
        name: &'static str,
        len: usize,
        expected: usize,
    ) -> Result<(), DistExecError> {
        if len == expected {
            Ok(())
        } else {
            Err(DistExecError::Length {
                rank,
                name,
                len,
                expected,
            })
        }
    }

    /// Values in the message carrying `payload` in `pass` (both ends compute it).
    fn message_len(&self, pass: Pass, payload: Payload) -> usize {
        let bl = &self.blocks;
        let (qw, kw) = bl.widths();
        let h = bl.shape.h;
        match (pass, payload) {
            (_, Payload::Kv { chunk }) | (Pass::Backward, Payload::KvGrad { chunk }) => {
                2 * bl.rows(chunk) * kw
            }
            (Pass::Forward, Payload::Query { chunk }) => bl.rows(chunk) * qw,
            (Pass::Backward, Payload::Query { chunk }) => bl.rows(chunk) * 2 * (qw + h),
            (Pass::Forward, Payload::Partial { q_chunk, .. }) => bl.rows(q_chunk) * (qw + h),
            (Pass::Backward, Payload::Partial { q_chunk, .. }) => bl.rows(q_chunk) * qw,
            (Pass::Forward, Payload::KvGrad { .. }) => 0,
        }
    }

    /// `rank`'s plan for `pass` under this executor's overlap mode ([`RankPlan`]).
    pub fn rank_plan(&self, rank: usize, pass: Pass) -> RankPlan {
        self.plan(rank, pass)
    }

    fn plan(&self, rank: usize, pass: Pass) -> Plan {
        let s = &self.schedule;
        let n = s.steps.len();
        let pass_bit = match pass {
            Pass::Forward => 0,
            Pass::Backward => 1u64 << 32,
        };
        let mut plan = Plan {
            chunks: vec![Vec::new(); n],
            results: vec![Vec::new(); n + 1],
            drops: vec![Vec::new(); n],
        };
        // Last step each received chunk is needed on this rank: (is query, chunk) → step.
        let mut last: HashMap<(bool, usize), usize> = HashMap::new();
        let mut bump = |key: (bool, usize), t: usize| {
            let e = last.entry(key).or_insert(t);
            *e = (*e).max(t);
        };
        let all = s
            .steps
            .iter()
            .map(|st| st.recv.as_slice())
            .chain([s.finish.as_slice()]);
        let mut index = 0u64;
        for (t, msgs) in all.enumerate() {
            for m in msgs {
                let tag = SP_TAG_BASE | pass_bit | index;
                index += 1;
                if m.from != rank && m.to != rank {
                    continue;
                }
                match m.payload {
                    Payload::Kv { chunk } | Payload::Query { chunk } => {
                        let key = (matches!(m.payload, Payload::Query { .. }), chunk);
                        if m.to == rank {
                            bump(key, t);
                        } else if self.overlap == Overlap::Overlapped {
                            // Posted during the previous step.
                            bump(key, t.saturating_sub(1));
                        } else {
                            bump(key, t);
                        }
                        plan.chunks[t].push((tag, *m));
                    }
                    Payload::KvGrad { .. } if pass == Pass::Forward => {}
                    Payload::Partial { .. } | Payload::KvGrad { .. } => {
                        plan.results[t].push((tag, *m));
                    }
                }
            }
        }
        for (t, st) in s.steps.iter().enumerate() {
            for w in &st.work[rank] {
                bump((true, w.q_chunk), t);
                bump((false, w.kv_chunk), t);
            }
        }
        let received: HashSet<(bool, usize)> = plan
            .chunks
            .iter()
            .flatten()
            .filter(|(_, m)| m.to == rank)
            .map(|(_, m)| match m.payload {
                Payload::Query { chunk } => (true, chunk),
                Payload::Kv { chunk } => (false, chunk),
                _ => unreachable!("chunk messages only"),
            })
            .collect();
        let mut received: Vec<(bool, usize)> = received.into_iter().collect();
        received.sort_unstable();
        for key in received {
            if s.chunk_home(key.1) != rank {
                plan.drops[last[&key]].push(key);
            }
        }
        plan
    }

    /// The step loop shared by both passes (see the module docs for the order of work).
    fn run<C: Communicator, S: RankPass>(
        &self,
        comm: &C,
        pass: Pass,
        st: &mut S,
    ) -> Result<ExecStats, DistExecError> {
        let rank = comm.rank();
        let plan = self.plan(rank, pass);
        let before = comm.stats();
        let mut stats = ExecStats::default();
        let n = self.schedule.steps.len();
        let at = |stage: Stage| {
            move |source: CommError| DistExecError::CommAt {
                pass,
                stage,
                rank,
                source,
            }
        };
        let stage = |t: usize| {
            if t < n {
                Stage::Step(t)
            } else {
                Stage::Finish
            }
        };
        let mut io = Io {
            exec: self,
            comm,
            pass,
            rank,
            stats: &mut stats,
        };
        match self.overlap {
            Overlap::Overlapped => {
                let mut chunks = match plan.chunks.first() {
                    Some(msgs) => io.post(st, msgs).map_err(at(stage(0)))?,
                    None => None,
                };
                let mut results = io.post(st, &plan.results[0]).map_err(at(stage(0)))?;
                for t in 0..n {
                    for (m, data) in io.wait(chunks.take()).map_err(at(stage(t)))? {
                        st.accept(&m, data);
                    }
                    if t + 1 < n {
                        chunks = io.post(st, &plan.chunks[t + 1]).map_err(at(stage(t + 1)))?;
                    }
                    io.compute(st, &self.schedule.steps[t].work[rank]);
                    let got = io.wait(results.take()).map_err(at(stage(t)))?;
                    io.accept_results(st, got);
                    results = io
                        .post(st, &plan.results[t + 1])
                        .map_err(at(stage(t + 1)))?;
                    st.free(&plan.drops[t]);
                }
                let got = io.wait(results).map_err(at(stage(n)))?;
                io.accept_results(st, got);
            }
            Overlap::Blocking => {
                for t in 0..n {
                    let msgs = [plan.chunks[t].as_slice(), &plan.results[t]].concat();
                    let posted = io.post(st, &msgs).map_err(at(stage(t)))?;
                    let mut results = Vec::new();
                    for (m, data) in io.wait(posted).map_err(at(stage(t)))? {
                        match m.payload {
                            Payload::Kv { .. } | Payload::Query { .. } => st.accept(&m, data),
                            _ => results.push((m, data)),
                        }
                    }
                    io.compute(st, &self.schedule.steps[t].work[rank]);
                    io.accept_results(st, results);
                    st.free(&plan.drops[t]);
                }
                let posted = io.post(st, &plan.results[n]).map_err(at(stage(n)))?;
                let got = io.wait(posted).map_err(at(stage(n)))?;
                io.accept_results(st, got);
            }
        }
        let after = comm.stats();
        stats.bytes_sent = after.send.bytes_sent - before.send.bytes_sent;
        stats.bytes_recv = after.recv.bytes_recv - before.recv.bytes_recv;
        Ok(stats)
    }
}

/// A posted batch and the messages its receives stand for, in order.
type Posted<B> = Option<(B, Vec<Message>)>;

/// Posting, waiting and computing for one call, with its counters.
struct Io<'a, C> {
    exec: &'a DistExecutor,
    comm: &'a C,
    pass: Pass,
    rank: usize,
    stats: &'a mut ExecStats,
}

impl<'a, C: Communicator> Io<'a, C> {
    /// Posts this rank's sends (packed now) and receives of `msgs`; `None` when there are none.
    fn post<S: RankPass>(
        &mut self,
        st: &mut S,
        msgs: &[(u64, Message)],
    ) -> Result<Posted<C::Batch<'a>>, CommError> {
        let mut ops = Vec::new();
        let mut recvs = Vec::new();
        for &(tag, m) in msgs {
            if m.from == self.rank {
                ops.push(P2pOp::send(m.to, tag, st.pack(m.payload)));
                self.stats.messages_sent += 1;
            } else {
                let len = self.exec.message_len(self.pass, m.payload);
                ops.push(P2pOp::recv(m.from, tag, len));
                recvs.push(m);
            }
        }
        if ops.is_empty() {
            return Ok(None);
        }
        Ok(Some((self.comm.start(ops)?, recvs)))
    }

    fn wait(
        &mut self,
        posted: Posted<C::Batch<'a>>,
    ) -> Result<Vec<(Message, Vec<f32>)>, CommError> {
        let Some((batch, recvs)) = posted else {
            return Ok(Vec::new());
        };
        let t0 = Instant::now();
        let got = batch.wait();
        self.stats.wait += t0.elapsed();
        Ok(recvs.into_iter().zip(got?).collect())
    }

    fn compute<S: RankPass>(&mut self, st: &mut S, works: &[Work]) {
        let t0 = Instant::now();
        for w in works {
            st.compute(w);
            self.stats.blocks += 1;
        }
        self.stats.compute += t0.elapsed();
    }

    fn accept_results<S: RankPass>(&mut self, st: &mut S, got: Vec<(Message, Vec<f32>)>) {
        let t0 = Instant::now();
        for (m, data) in got {
            st.accept(&m, data);
        }
        self.stats.compute += t0.elapsed();
    }
}

/// What a pass does with messages and blocks on one rank.
trait RankPass {
    /// The data of an outgoing message (results leave this rank with it).
    fn pack(&mut self, payload: Payload) -> Vec<f32>;
    /// An arrived message: store a chunk, or merge / add a result.
    fn accept(&mut self, m: &Message, data: Vec<f32>);
    /// One block product.
    fn compute(&mut self, w: &Work);
    /// Frees received chunks: (is a query chunk, chunk).
    fn free(&mut self, chunks: &[(bool, usize)]);
}

/// The chunks whose home is `rank`.
fn own_chunks(bl: &Blocks, rank: usize) -> Vec<usize> {
    let sh = &bl.sharding;
    (0..sh.layout().chunks_per_rank())
        .map(|slot| sh.layout().chunk_at(sh.ranks(), rank, slot))
        .collect()
}

fn home(bl: &Blocks, chunk: usize) -> usize {
    bl.sharding.layout().chunk_home(bl.sharding.ranks(), chunk)
}

fn held<'m, K: std::hash::Hash + Eq + fmt::Debug, V>(m: &'m HashMap<K, V>, key: &K) -> &'m V {
    m.get(key)
        .unwrap_or_else(|| panic!("validated schedule: {key:?} is held"))
}

/// Forward state of one rank.
struct ForwardRank<'a> {
    bl: &'a Blocks,
    rank: usize,
    /// Query chunks held: `[B, n, H, D]`.
    q: HashMap<usize, Vec<f32>>,
    /// KV chunks held: K ‖ V, each `[B, n, H_kv, D]`.
    kv: HashMap<usize, Vec<f32>>,
    /// Running f32 `(o, lse)` of this rank's own query chunks.
    acc: HashMap<usize, OutLse>,
    /// Off-owner partials held here, by (q chunk, kv chunk).
    partials: HashMap<(usize, usize), OutLse>,
}

impl<'a> ForwardRank<'a> {
    fn new(bl: &'a Blocks, rank: usize, q: &[f32], k: &[f32], v: &[f32]) -> Self {
        let (qw, kw) = bl.widths();
        let (h, d) = (bl.shape.h, bl.shape.d);
        let mut st = ForwardRank {
            bl,
            rank,
            q: HashMap::new(),
            kv: HashMap::new(),
            acc: HashMap::new(),
            partials: HashMap::new(),
        };
        for c in own_chunks(bl, rank) {
            st.q.insert(c, bl.chunk_of(q, qw, c));
            let mut kv = bl.chunk_of(k, kw, c);
            kv.extend(bl.chunk_of(v, kw, c));
            st.kv.insert(c, kv);
            let rows = bl.rows(c) * h;
            st.acc
                .insert(c, (vec![0.0; rows * d], vec![f32::NEG_INFINITY; rows]));
        }
        st
    }

    /// Writes the merged rows into this rank's out and lse; padded rows get 0 and −inf.
    fn write(self, out: &mut [f32], lse: &mut [f32]) {
        let (qw, _) = self.bl.widths();
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        for (c, (o, l)) in &self.acc {
            self.bl.put_chunk(out, qw, *c, o);
            self.bl.put_chunk(lse, self.bl.shape.h, *c, l);
        }
    }

    fn take_partial(&mut self, block: (usize, usize), data: OutLse) {
        if home(self.bl, block.0) == self.rank {
            let acc = self.acc.get_mut(&block.0).expect("own query chunk");
            merge(acc, (&data.0, &data.1), self.bl.shape.d);
        } else {
            self.partials.insert(block, data);
        }
    }
}

impl RankPass for ForwardRank<'_> {
    fn pack(&mut self, payload: Payload) -> Vec<f32> {
        match payload {
            Payload::Kv { chunk } => held(&self.kv, &chunk).clone(),
            Payload::Query { chunk } => held(&self.q, &chunk).clone(),
            Payload::Partial { q_chunk, kv_chunk } => {
                let (mut o, l) = self
                    .partials
                    .remove(&(q_chunk, kv_chunk))
                    .expect("validated schedule: partial held");
                o.extend(l);
                o
            }
            Payload::KvGrad { .. } => unreachable!("the forward sends no dK/dV"),
        }
    }

    fn accept(&mut self, m: &Message, mut data: Vec<f32>) {
        match m.payload {
            Payload::Kv { chunk } => {
                self.kv.insert(chunk, data);
            }
            Payload::Query { chunk } => {
                self.q.insert(chunk, data);
            }
            Payload::Partial { q_chunk, kv_chunk } => {
                let l = data.split_off(self.bl.rows(q_chunk) * self.bl.widths().0);
                self.take_partial((q_chunk, kv_chunk), (data, l));
            }
            Payload::KvGrad { .. } => {}
        }
    }

    fn compute(&mut self, w: &Work) {
        let kv = held(&self.kv, &w.kv_chunk);
        let (k, v) = kv.split_at(kv.len() / 2);
        let q: &Vec<f32> = held(&self.q, &w.q_chunk);
        let part = self.bl.forward(w, q, k, v);
        self.take_partial((w.q_chunk, w.kv_chunk), part);
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

/// A query chunk's backward inputs: q and dout `[B, n, H, D]`, lse and D = rowsum(dO ∘ O)
/// `[B, n, H]` (computed at home, received at a helper).
struct QueryChunk {
    q: Vec<f32>,
    dout: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
}

/// Backward state of one rank.
struct BackwardRank<'a> {
    bl: &'a Blocks,
    rank: usize,
    q: HashMap<usize, QueryChunk>,
    /// KV chunks held: K ‖ V.
    kv: HashMap<usize, Vec<f32>>,
    /// dQ of this rank's own query chunks.
    dq: HashMap<usize, Vec<f32>>,
    /// Helpers' dQ of one block, by (q chunk, kv chunk).
    dq_part: HashMap<(usize, usize), Vec<f32>>,
    /// dK ‖ dV of this rank's own chunks.
    dkv: HashMap<usize, Vec<f32>>,
    /// dK ‖ dV accumulated here for other ranks' chunks.
    dkv_acc: HashMap<usize, Vec<f32>>,
}

impl<'a> BackwardRank<'a> {
    /// `local` = [q, k, v, out, lse, dout], this rank's shards.
    fn new(bl: &'a Blocks, rank: usize, local: [&[f32]; 6]) -> Self {
        let [q, k, v, out, lse, dout] = local;
        let (qw, kw) = bl.widths();
        let mut st = BackwardRank {
            bl,
            rank,
            q: HashMap::new(),
            kv: HashMap::new(),
            dq: HashMap::new(),
            dq_part: HashMap::new(),
            dkv: HashMap::new(),
            dkv_acc: HashMap::new(),
        };
        for c in own_chunks(bl, rank) {
            let dout = bl.chunk_of(dout, qw, c);
            let chunk = QueryChunk {
                q: bl.chunk_of(q, qw, c),
                delta: bl.delta(c, &dout, &bl.chunk_of(out, qw, c)),
                dout,
                lse: bl.chunk_of(lse, bl.shape.h, c),
            };
            st.dq.insert(c, vec![0.0; chunk.q.len()]);
            st.q.insert(c, chunk);
            let mut kv = bl.chunk_of(k, kw, c);
            kv.extend(bl.chunk_of(v, kw, c));
            st.dkv.insert(c, vec![0.0; kv.len()]);
            st.kv.insert(c, kv);
        }
        st
    }

    /// Writes this rank's dq, dk, dv; padded rows get 0.
    fn write(self, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (qw, kw) = self.bl.widths();
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        for (c, g) in &self.dq {
            self.bl.put_chunk(dq, qw, *c, g);
        }
        for (c, g) in &self.dkv {
            let (gk, gv) = g.split_at(g.len() / 2);
            self.bl.put_chunk(dk, kw, *c, gk);
            self.bl.put_chunk(dv, kw, *c, gv);
        }
    }

    /// Adds a dK ‖ dV contribution of `chunk`: at home into its gradient, elsewhere into the
    /// accumulator that travels on.
    fn take_kv_grad(&mut self, chunk: usize, g: &[f32]) {
        let dst = if home(self.bl, chunk) == self.rank {
            self.dkv.get_mut(&chunk).expect("own kv chunk")
        } else {
            self.dkv_acc
                .entry(chunk)
                .or_insert_with(|| vec![0.0; g.len()])
        };
        add(dst, g);
    }
}

impl RankPass for BackwardRank<'_> {
    fn pack(&mut self, payload: Payload) -> Vec<f32> {
        match payload {
            Payload::Kv { chunk } => held(&self.kv, &chunk).clone(),
            Payload::Query { chunk } => {
                let qc = held(&self.q, &chunk);
                [qc.q.as_slice(), &qc.dout, &qc.lse, &qc.delta].concat()
            }
            Payload::Partial { q_chunk, kv_chunk } => self
                .dq_part
                .remove(&(q_chunk, kv_chunk))
                .expect("validated schedule: dQ partial held"),
            Payload::KvGrad { chunk } => self
                .dkv_acc
                .remove(&chunk)
                .expect("validated schedule: dK/dV held"),
        }
    }

    fn accept(&mut self, m: &Message, data: Vec<f32>) {
        match m.payload {
            Payload::Kv { chunk } => {
                self.kv.insert(chunk, data);
            }
            Payload::Query { chunk } => {
                let (qw, h) = (self.bl.widths().0, self.bl.shape.h);
                let rows = self.bl.rows(chunk);
                let (q, rest) = data.split_at(rows * qw);
                let (dout, rest) = rest.split_at(rows * qw);
                let (lse, delta) = rest.split_at(rows * h);
                let qc = QueryChunk {
                    q: q.to_vec(),
                    dout: dout.to_vec(),
                    lse: lse.to_vec(),
                    delta: delta.to_vec(),
                };
                self.q.insert(chunk, qc);
            }
            Payload::Partial { q_chunk, kv_chunk } => {
                if home(self.bl, q_chunk) == self.rank {
                    add(self.dq.get_mut(&q_chunk).expect("own query chunk"), &data);
                } else {
                    self.dq_part.insert((q_chunk, kv_chunk), data);
                }
            }
            Payload::KvGrad { chunk } => self.take_kv_grad(chunk, &data),
        }
    }

    fn compute(&mut self, w: &Work) {
        let (qi, ki) = (w.q_chunk, w.kv_chunk);
        let qc = held(&self.q, &qi);
        let kv = held(&self.kv, &ki);
        let (k, v) = kv.split_at(kv.len() / 2);
        let own_q = w.owner == self.rank;
        let mut dq_help = Vec::new();
        let dq = if own_q {
            self.dq.get_mut(&qi).expect("own query chunk")
        } else {
            dq_help = vec![0.0; qc.q.len()];
            &mut dq_help
        };
        let dkv = if home(self.bl, ki) == self.rank {
            self.dkv.get_mut(&ki).expect("own kv chunk")
        } else {
            self.dkv_acc
                .entry(ki)
                .or_insert_with(|| vec![0.0; kv.len()])
        };
        let (dk, dv) = dkv.split_at_mut(kv.len() / 2);
        self.bl
            .backward(w, dq, dk, dv, &qc.dout, &qc.q, k, v, &qc.delta, &qc.lse);
        if !own_q {
            self.dq_part.insert((qi, ki), dq_help);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::distattn_causal;
    use crate::shard::Layout;
    use reel_kernels::attention::{
        attention_backward, attention_backward_with_delta, attention_forward, AttnMask,
    };
    use reel_tensor::{rng, uniform_vec};

    /// A DistAttn helper runs its block with the D it receives in the `Query` message: with the
    /// owner's D its dQ partial and dK/dV equal, bit for bit, the kernel given the real O; with
    /// another D it gives the kernel's result for that D (it is not recomputed from anything).
    #[test]
    fn helper_uses_received_delta() {
        let (b, t, h, h_kv, d, p) = (2, 18, 4, 2, 8, 4);
        let schedule = distattn_causal(p).unwrap();
        let sh = Sharding::new(t, p, Layout::Contiguous).unwrap();
        let l = sh.local_len();
        let shape = AttnShape {
            b,
            tq: t,
            tk: t,
            h,
            h_kv,
            d,
        };
        let local = AttnShape {
            tq: l,
            tk: l,
            ..shape
        };
        let ex = DistExecutor::new(schedule.clone(), sh, local, Overlap::Blocking).unwrap();
        let bl = &ex.blocks;
        let (qw, kw) = bl.widths();
        let mut r = rng(11);
        let q = uniform_vec(&mut r, b * t * qw, 1.5);
        let k = uniform_vec(&mut r, b * t * kw, 1.5);
        let v = uniform_vec(&mut r, b * t * kw, 1.0);
        let dout = uniform_vec(&mut r, b * t * qw, 1.0);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; b * t * h];
        let mask = AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        };
        attention_forward(&mut out, &mut lse, &q, &k, &v, shape, mask);
        let shards: Vec<[Vec<f32>; 6]> = (0..p)
            .map(|rank| {
                let cut = |x: &[f32], w: usize| sh.shard(x, b, w, rank, f32::NAN).unwrap();
                [
                    cut(&q, qw),
                    cut(&k, kw),
                    cut(&v, kw),
                    cut(&out, qw),
                    cut(&lse, h),
                    cut(&dout, qw),
                ]
            })
            .collect();
        let rank_state = |rank: usize| {
            let s = &shards[rank];
            BackwardRank::new(bl, rank, [&s[0], &s[1], &s[2], &s[3], &s[4], &s[5]])
        };

        // A block a helper computes with its own KV, and the Query message that brings its rows.
        let w = *schedule
            .works()
            .map(|(_, w)| w)
            .find(|w| w.computed_by != w.owner)
            .expect("DistAttn at P = 4 has helpers");
        let (qi, ki, helper) = (w.q_chunk, w.kv_chunk, w.computed_by);
        assert_eq!(home(bl, ki), helper);
        let msg = Message {
            payload: Payload::Query { chunk: qi },
            from: w.owner,
            to: helper,
        };
        let sent = rank_state(w.owner).pack(msg.payload);
        assert_eq!(sent.len(), ex.message_len(Pass::Backward, msg.payload));

        // What the helper computes for the block from a Query payload: (dQ partial, dK ‖ dV).
        let help = |payload: Vec<f32>| {
            let mut st = rank_state(helper);
            st.accept(&msg, payload);
            st.compute(&w);
            let dq = st.dq_part.remove(&(qi, ki)).expect("helper's dQ partial");
            (dq, st.dkv.remove(&ki).expect("helper's own dK/dV"))
        };
        // The kernel on the same block, from the chunks' rows.
        let own = &shards[w.owner];
        let hs = &shards[helper];
        let (qc, oc, lc, dc) = (
            bl.chunk_of(&own[0], qw, qi),
            bl.chunk_of(&own[3], qw, qi),
            bl.chunk_of(&own[4], h, qi),
            bl.chunk_of(&own[5], qw, qi),
        );
        let (kc, vc) = (bl.chunk_of(&hs[1], kw, ki), bl.chunk_of(&hs[2], kw, ki));
        let block = AttnShape {
            tq: sh.chunk_valid_len(qi),
            tk: sh.chunk_valid_len(ki),
            ..shape
        };
        let kernel = |delta: Option<&[f32]>| {
            let mut dq = vec![0.0; qc.len()];
            let (mut dk, mut dv) = (vec![0.0; kc.len()], vec![0.0; vc.len()]);
            match delta {
                None => attention_backward(
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &dc,
                    &qc,
                    &kc,
                    &vc,
                    &oc,
                    &lc,
                    block,
                    bl.mask(&w),
                ),
                Some(delta) => attention_backward_with_delta(
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &dc,
                    &qc,
                    &kc,
                    &vc,
                    delta,
                    &lc,
                    block,
                    bl.mask(&w),
                ),
            }
            dk.extend(dv);
            (dq, dk)
        };

        // The owner's D: exactly the kernel with the real O (no O ever reached the helper).
        let (dq_help, dkv_help) = help(sent.clone());
        let (dq_ref, dkv_ref) = kernel(None);
        assert!(dq_ref.iter().any(|&x| x != 0.0));
        assert_eq!(dq_help, dq_ref);
        assert_eq!(dkv_help, dkv_ref);

        // Another D in the message: the helper's result follows it.
        let n_delta = bl.rows(qi) * h;
        let mut other = sent.clone();
        let at = other.len() - n_delta;
        for x in &mut other[at..] {
            *x += 0.25;
        }
        let (dq_other, dkv_other) = help(other.clone());
        let (dq_exp, dkv_exp) = kernel(Some(&other[at..]));
        assert_eq!(dq_other, dq_exp);
        assert_eq!(dkv_other, dkv_exp);
        assert_ne!(dq_other, dq_ref);
    }

    /// The per-rank plans other executors follow: every message of the schedule (KvGrad only
    /// backward) is in exactly its sender's and its receiver's plan, at the same step and tag,
    /// tags are distinct, and a received chunk is freed once, after its last use on the rank.
    #[test]
    fn rank_plans_agree_between_sender_and_receiver() {
        use crate::schedule::ScheduleKind;
        for kind in ScheduleKind::ALL {
            for p in [2, 3, 4, 5] {
                for overlap in [Overlap::Overlapped, Overlap::Blocking] {
                    let schedule = kind.build(p).unwrap();
                    let sh = Sharding::new(13 * p, p, kind.layout()).unwrap();
                    let l = sh.local_len();
                    let local = AttnShape {
                        b: 1,
                        tq: l,
                        tk: l,
                        h: 2,
                        h_kv: 1,
                        d: 4,
                    };
                    let ex = DistExecutor::new(schedule.clone(), sh, local, overlap).unwrap();
                    for pass in [Pass::Forward, Pass::Backward] {
                        let plans: Vec<RankPlan> = (0..p).map(|r| ex.rank_plan(r, pass)).collect();
                        let mut seen: HashMap<u64, (usize, Message, usize)> = HashMap::new();
                        for (r, plan) in plans.iter().enumerate() {
                            let all = plan
                                .chunks
                                .iter()
                                .enumerate()
                                .chain(plan.results.iter().enumerate());
                            for (t, msgs) in all {
                                for &(tag, m) in msgs {
                                    assert!(m.from == r || m.to == r, "{kind:?} rank {r}: {m:?}");
                                    let e = seen.entry(tag).or_insert((t, m, 0));
                                    assert_eq!((e.0, e.1), (t, m), "{kind:?} P {p} tag {tag:#x}");
                                    e.2 += 1;
                                }
                            }
                            let mut dropped = HashSet::new();
                            for d in plan.drops.iter().flatten() {
                                assert!(dropped.insert(*d), "{kind:?} rank {r} frees {d:?} twice");
                            }
                        }
                        assert!(seen.values().all(|e| e.2 == 2), "{kind:?} P {p} {pass}");
                        let expected = schedule
                            .steps
                            .iter()
                            .flat_map(|s| &s.recv)
                            .chain(&schedule.finish)
                            .filter(|m| {
                                pass == Pass::Backward
                                    || !matches!(m.payload, Payload::KvGrad { .. })
                            })
                            .count();
                        assert_eq!(seen.len(), expected, "{kind:?} P {p} {pass}");
                    }
                }
            }
        }
    }
}
