//! Attention schedules as data: which block product `Q_i · KV_j` each of P ranks computes at each
//! step, and which messages each step needs.
//!
//! Chunks are those of [`Layout`]: P chunks (contiguous, rank r holds chunk r of Q, K and V) or 2P
//! half-size chunks (zigzag, rank r holds chunks r and 2P−1−r). Chunk order is position order, so
//! under a causal mask `Q_i` needs `KV_j` for every `j ≤ i`, with a causal mask only when `j == i`
//! ([`BlockMask::Diagonal`]); under full attention it needs every `j`. Every block is exact given the
//! merge rule and the global lse (DESIGN.md "Attention math"), so a schedule is correct iff it
//! computes each needed block once and its data dependencies hold; [`Schedule::validate`] checks
//! both by simulating what every rank holds at every step.
//!
//! Message timing. `Step::recv` lists what must have arrived before the step's compute. Chunks
//! (`Kv`, `Query`) come from a rank that holds them at the end of the previous step, so they can be
//! issued a step early and double-buffered under the previous compute. Results (`Partial`,
//! `KvGrad`) exist only after the step that computed them and arrive for the next step (or for
//! [`Schedule::finish`], after the last step). The forward ignores `KvGrad`; in the backward the same
//! work runs with `Query` carrying (Q, dO, lse, D) and `Partial` returning dQ. Payloads name chunks,
//! so for GQA a `Kv`/`KvGrad` message carries only the H_kv heads.
//!
//! Schedules (`t` = step, `r` = rank; counts below are at P = 8, a diagonal block counting one):
//! - [`ring_full`]: P steps, `r` computes `Q_r · KV_{(r−t) mod P}`; KV is passed to the next rank.
//!   Counts 8 each.
//! - [`ring_causal`]: the same with only `r − t ≥ 0`. Rank r does r + 1 blocks: 1…8, balance 1.78.
//! - [`distattn_causal`]: LightSeq's balanced schedule (DESIGN.md table), steps `t = 0 ..= ⌊P/2⌋`.
//!   At t = 0 every rank does its diagonal. At t ≥ 1 rank r computes `Q_r · KV_{r−t}` if `r ≥ t`,
//!   and otherwise, if `2t < P`, *helps*: it receives `Q_{r−t+P}` and computes `Q_{r−t+P} · KV_r`,
//!   sending the partial back to rank r−t+P, which merges it at the next step. KV and queries are
//!   sent by their home rank directly, so at step t every rank sends one chunk to `(r + t) mod P`.
//!   Even P is exactly the paper's table (ranks `< P/2` idle at t = P/2): counts 4,4,4,4,5,5,5,5,
//!   balance 1.11. **Odd P**: the same rule, which then has `(P+1)/2` steps with helping at every
//!   step (`2t < P` always holds), so every rank computes exactly `(P+1)/2` blocks — perfect
//!   balance; the partials of the last step are merged in [`Schedule::finish`].
//! - [`zigzag_ring_causal`]: zigzag layout, P steps; rank r holds the KV of rank `s = (r−t) mod P`
//!   (chunks s and 2P−1−s, passed to the next rank) and computes every causal pair of its chunks
//!   {r, 2P−1−r} with them: 3 blocks at t = 0 (two diagonals), 2 at every later step. Counts 17 each
//!   (half-size blocks), balance 1.0 for every P.
//!
//! KV gradients travel back to their home directly in DistAttn and hop along the ring behind the KV
//! in the ring schedules (the accumulator visits each user in step order, then goes home).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::shard::Layout;

/// The schedules this crate builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    RingCausal,
    RingFull,
    DistAttnCausal,
    ZigzagRingCausal,
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 4] = [
        ScheduleKind::RingCausal,
        ScheduleKind::RingFull,
        ScheduleKind::DistAttnCausal,
        ScheduleKind::ZigzagRingCausal,
    ];

    pub fn build(self, ranks: usize) -> Result<Schedule, ScheduleError> {
        match self {
            ScheduleKind::RingCausal => ring_causal(ranks),
            ScheduleKind::RingFull => ring_full(ranks),
            ScheduleKind::DistAttnCausal => distattn_causal(ranks),
            ScheduleKind::ZigzagRingCausal => zigzag_ring_causal(ranks),
        }
    }

    pub fn layout(self) -> Layout {
        match self {
            ScheduleKind::ZigzagRingCausal => Layout::Zigzag,
            _ => Layout::Contiguous,
        }
    }

    pub fn is_causal(self) -> bool {
        self != ScheduleKind::RingFull
    }
}

/// Mask of one block product: `Diagonal` is the causal mask of a chunk with itself (global offsets
/// equal), `Full` lets every query see every key (off-diagonal causal blocks and full attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum BlockMask {
    Diagonal,
    Full,
}

/// One block product `Q_{q_chunk} · KV_{kv_chunk}` computed by `computed_by` for the queries of
/// `owner` (the home of `q_chunk`). `computed_by != owner` means a helper computes it and returns the
/// partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Work {
    pub q_chunk: usize,
    pub kv_chunk: usize,
    pub computed_by: usize,
    pub owner: usize,
    pub mask: BlockMask,
}

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Payload {
    /// K and V of a chunk (H_kv heads).
    Kv { chunk: usize },
    /// A chunk's queries for a helper: Q forward; Q, dO, lse and D = rowsum(dO ∘ O) backward.
    Query { chunk: usize },
    /// A helper's result for block (q_chunk, kv_chunk) back to the queries' owner: (o, lse) in f32
    /// forward, to merge; dQ backward, to add.
    Partial { q_chunk: usize, kv_chunk: usize },
    /// Backward only: the sender's accumulated dK/dV of a chunk (every contribution it holds),
    /// towards the chunk's home.
    KvGrad { chunk: usize },
}

/// `payload` goes from rank `from` to rank `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Message {
    pub payload: Payload,
    pub from: usize,
    pub to: usize,
}

/// One step: messages that arrive before it, then each rank's block products (`work[rank]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub recv: Vec<Message>,
    pub work: Vec<Vec<Work>>,
}

/// A whole schedule over `ranks` ranks. `finish` lists the results that arrive after the last step
/// (merged/added before the output is final).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub ranks: usize,
    pub steps: Vec<Step>,
    pub finish: Vec<Message>,
}

/// Why a schedule could not be built or is wrong.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("a schedule needs at least one rank (P = 0)")]
    NoRanks,
    #[error("{kind:?} schedule over P = {ranks}, {at}: {what}")]
    Invalid {
        kind: ScheduleKind,
        ranks: usize,
        at: String,
        what: String,
    },
}

impl Schedule {
    pub fn layout(&self) -> Layout {
        self.kind.layout()
    }

    pub fn causal(&self) -> bool {
        self.kind.is_causal()
    }

    pub fn num_chunks(&self) -> usize {
        self.layout().num_chunks(self.ranks)
    }

    pub fn chunk_home(&self, chunk: usize) -> usize {
        self.layout().chunk_home(self.ranks, chunk)
    }

    /// Every block `(q_chunk, kv_chunk)` attention needs: `kv ≤ q` causal, all pairs full.
    pub fn required_pairs(&self) -> Vec<(usize, usize)> {
        let c = self.num_chunks();
        (0..c)
            .flat_map(|q| (0..c).map(move |kv| (q, kv)))
            .filter(|&(q, kv)| !self.causal() || kv <= q)
            .collect()
    }

    /// Every block product with its step, in step then rank order.
    pub fn works(&self) -> impl Iterator<Item = (usize, &Work)> {
        self.steps
            .iter()
            .enumerate()
            .flat_map(|(t, s)| s.work.iter().flatten().map(move |w| (t, w)))
    }

    /// Checks that each needed block is computed exactly once (and nothing else), with the right
    /// mask, owner and rank, and that the messages make it computable and complete: a rank only
    /// computes with Q/KV chunks it holds (its own, or received at this or an earlier step), only
    /// sends what it holds at the end of the previous step, and at the end every owner has merged
    /// every block of its queries and every home holds every dK/dV contribution of its chunks.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if self.ranks == 0 {
            return Err(ScheduleError::NoRanks);
        }
        let mut sim = Sim::new(self);
        for (t, step) in self.steps.iter().enumerate() {
            let at = format!("step {t}");
            if step.work.len() != self.ranks {
                return Err(sim.err(&at, format!("work lists {} ranks", step.work.len())));
            }
            sim.deliver(&at, &step.recv)?;
            for (rank, works) in step.work.iter().enumerate() {
                for w in works {
                    sim.compute(&at, rank, w)?;
                }
            }
        }
        sim.deliver("finish", &self.finish)?;
        sim.check_complete()
    }
}

/// What every rank holds while a schedule runs (see [`Schedule::validate`]).
struct Sim<'s> {
    s: &'s Schedule,
    q_held: Vec<BTreeSet<usize>>,
    kv_held: Vec<BTreeSet<usize>>,
    /// Block partials computed off-owner and not yet delivered, per holding rank.
    partials: Vec<BTreeSet<(usize, usize)>>,
    /// KV chunks merged into each q chunk's output at its owner.
    merged: Vec<BTreeSet<usize>>,
    /// Off-home dK/dV accumulators: rank → kv chunk → q chunks contributed.
    grads: Vec<BTreeMap<usize, BTreeSet<usize>>>,
    /// q chunks whose dK/dV contribution reached each kv chunk's home.
    home_grads: Vec<BTreeSet<usize>>,
    computed: BTreeMap<(usize, usize), usize>,
}

impl<'s> Sim<'s> {
    fn new(s: &'s Schedule) -> Self {
        let (p, c) = (s.ranks, s.num_chunks());
        let own: Vec<BTreeSet<usize>> = (0..p)
            .map(|r| (0..c).filter(|&ch| s.chunk_home(ch) == r).collect())
            .collect();
        Sim {
            s,
            q_held: own.clone(),
            kv_held: own,
            partials: vec![BTreeSet::new(); p],
            merged: vec![BTreeSet::new(); c],
            grads: vec![BTreeMap::new(); p],
            home_grads: vec![BTreeSet::new(); c],
            computed: BTreeMap::new(),
        }
    }

    fn err(&self, at: &str, what: String) -> ScheduleError {
        ScheduleError::Invalid {
            kind: self.s.kind,
            ranks: self.s.ranks,
            at: at.to_string(),
            what,
        }
    }

    fn check_chunk(
        &self,
        at: &str,
        chunk: usize,
        m: &dyn std::fmt::Debug,
    ) -> Result<(), ScheduleError> {
        if chunk < self.s.num_chunks() {
            Ok(())
        } else {
            Err(self.err(
                at,
                format!("{m:?} names chunk {chunk} of {}", self.s.num_chunks()),
            ))
        }
    }

    /// Sends are checked against the state at the end of the previous step, then applied.
    fn deliver(&mut self, at: &str, msgs: &[Message]) -> Result<(), ScheduleError> {
        let (q0, kv0, partials0, grads0) = (
            self.q_held.clone(),
            self.kv_held.clone(),
            self.partials.clone(),
            self.grads.clone(),
        );
        let mut seen = BTreeSet::new();
        for m in msgs {
            let (from, to) = (m.from, m.to);
            if from >= self.s.ranks || to >= self.s.ranks || from == to {
                return Err(self.err(at, format!("{m:?}: bad ranks")));
            }
            if !seen.insert((from, m.payload)) {
                return Err(self.err(at, format!("{m:?} sent twice")));
            }
            match m.payload {
                Payload::Kv { chunk } => {
                    self.check_chunk(at, chunk, m)?;
                    if !kv0[from].contains(&chunk) {
                        return Err(self.err(at, format!("{m:?}: rank {from} lacks KV{chunk}")));
                    }
                    self.kv_held[to].insert(chunk);
                }
                Payload::Query { chunk } => {
                    self.check_chunk(at, chunk, m)?;
                    if !q0[from].contains(&chunk) {
                        return Err(self.err(at, format!("{m:?}: rank {from} lacks Q{chunk}")));
                    }
                    self.q_held[to].insert(chunk);
                }
                Payload::Partial { q_chunk, kv_chunk } => {
                    self.check_chunk(at, q_chunk, m)?;
                    self.check_chunk(at, kv_chunk, m)?;
                    let block = (q_chunk, kv_chunk);
                    if !partials0[from].contains(&block) {
                        return Err(
                            self.err(at, format!("{m:?}: rank {from} holds no such partial"))
                        );
                    }
                    self.partials[from].remove(&block);
                    if to == self.s.chunk_home(q_chunk) {
                        if !self.merged[q_chunk].insert(kv_chunk) {
                            return Err(self.err(at, format!("{m:?}: merged twice")));
                        }
                    } else {
                        self.partials[to].insert(block);
                    }
                }
                Payload::KvGrad { chunk } => {
                    self.check_chunk(at, chunk, m)?;
                    let Some(acc) = grads0[from].get(&chunk).filter(|a| !a.is_empty()) else {
                        return Err(
                            self.err(at, format!("{m:?}: rank {from} holds no dK/dV of it"))
                        );
                    };
                    let live = self.grads[from].entry(chunk).or_default();
                    live.retain(|q| !acc.contains(q));
                    let dst = if to == self.s.chunk_home(chunk) {
                        &mut self.home_grads[chunk]
                    } else {
                        self.grads[to].entry(chunk).or_default()
                    };
                    dst.extend(acc.iter().copied());
                }
            }
        }
        Ok(())
    }

    fn compute(&mut self, at: &str, rank: usize, w: &Work) -> Result<(), ScheduleError> {
        let s = self.s;
        let (q, kv) = (w.q_chunk, w.kv_chunk);
        self.check_chunk(at, q, w)?;
        self.check_chunk(at, kv, w)?;
        if w.computed_by != rank || w.owner != s.chunk_home(q) {
            return Err(self.err(at, format!("{w:?} listed for rank {rank}: wrong ranks")));
        }
        let mask = if s.causal() && q == kv {
            BlockMask::Diagonal
        } else {
            BlockMask::Full
        };
        if w.mask != mask || (s.causal() && kv > q) {
            return Err(self.err(at, format!("{w:?}: mask should be {mask:?}, kv ≤ q")));
        }
        if !self.q_held[rank].contains(&q) || !self.kv_held[rank].contains(&kv) {
            return Err(self.err(at, format!("{w:?}: rank {rank} lacks Q{q} or KV{kv}")));
        }
        *self.computed.entry((q, kv)).or_default() += 1;
        if rank == w.owner {
            self.merged[q].insert(kv);
        } else {
            self.partials[rank].insert((q, kv));
        }
        if rank == s.chunk_home(kv) {
            self.home_grads[kv].insert(q);
        } else {
            self.grads[rank].entry(kv).or_default().insert(q);
        }
        Ok(())
    }

    fn check_complete(&self) -> Result<(), ScheduleError> {
        let at = "end";
        let required = self.s.required_pairs();
        for pair in &required {
            let n = self.computed.get(pair).copied().unwrap_or(0);
            if n != 1 {
                return Err(self.err(
                    at,
                    format!("block Q{}·KV{} computed {n} times", pair.0, pair.1),
                ));
            }
        }
        if let Some(extra) = self.computed.keys().find(|k| !required.contains(k)) {
            return Err(self.err(
                at,
                format!("block Q{}·KV{} is not needed", extra.0, extra.1),
            ));
        }
        for q in 0..self.s.num_chunks() {
            let want: BTreeSet<usize> = required.iter().filter(|p| p.0 == q).map(|p| p.1).collect();
            if self.merged[q] != want {
                return Err(self.err(
                    at,
                    format!("Q{q} merged KV {:?}, needs {want:?}", self.merged[q]),
                ));
            }
            let want: BTreeSet<usize> = required.iter().filter(|p| p.1 == q).map(|p| p.0).collect();
            if self.home_grads[q] != want {
                return Err(self.err(
                    at,
                    format!(
                        "dK/dV of chunk {q} got Q {:?}, needs {want:?}",
                        self.home_grads[q]
                    ),
                ));
            }
        }
        for r in 0..self.s.ranks {
            if let Some(p) = self.partials[r].first() {
                return Err(self.err(at, format!("rank {r} never returned partial {p:?}")));
            }
            if let Some((c, _)) = self.grads[r].iter().find(|(_, a)| !a.is_empty()) {
                return Err(self.err(at, format!("rank {r} never returned dK/dV of chunk {c}")));
            }
        }
        Ok(())
    }
}

/// How off-home dK/dV contributions get home.
#[derive(Clone, Copy)]
enum GradRoute {
    /// Each contributor sends its own straight home after the step.
    Direct,
    /// One accumulator visits the chunk's users in step order, then goes home.
    Chain,
}

struct Builder {
    s: Schedule,
}

impl Builder {
    fn new(kind: ScheduleKind, ranks: usize, steps: usize) -> Result<Self, ScheduleError> {
        if ranks == 0 {
            return Err(ScheduleError::NoRanks);
        }
        let step = Step {
            recv: Vec::new(),
            work: vec![Vec::new(); ranks],
        };
        Ok(Builder {
            s: Schedule {
                kind,
                ranks,
                steps: vec![step; steps],
                finish: Vec::new(),
            },
        })
    }

    fn work(&mut self, step: usize, rank: usize, q_chunk: usize, kv_chunk: usize) {
        let mask = if self.s.causal() && q_chunk == kv_chunk {
            BlockMask::Diagonal
        } else {
            BlockMask::Full
        };
        let owner = self.s.chunk_home(q_chunk);
        self.s.steps[step].work[rank].push(Work {
            q_chunk,
            kv_chunk,
            computed_by: rank,
            owner,
            mask,
        });
    }

    /// A message needed at `step`; `step == steps.len()` means after the last step.
    fn send(&mut self, step: usize, payload: Payload, from: usize, to: usize) {
        let m = Message { payload, from, to };
        match self.s.steps.get_mut(step) {
            Some(s) => s.recv.push(m),
            None => self.s.finish.push(m),
        }
    }

    /// Helpers' partials go straight back to the owner for the next step.
    fn return_partials(&mut self) {
        let off_owner: Vec<(usize, Work)> = self
            .s
            .works()
            .filter(|(_, w)| w.computed_by != w.owner)
            .map(|(t, w)| (t, *w))
            .collect();
        for (t, w) in off_owner {
            let payload = Payload::Partial {
                q_chunk: w.q_chunk,
                kv_chunk: w.kv_chunk,
            };
            self.send(t + 1, payload, w.computed_by, w.owner);
        }
    }

    fn return_kv_grads(&mut self, route: GradRoute) {
        // Off-home uses (step, rank) of each KV chunk, in step order, one per (step, rank).
        let mut uses: BTreeMap<usize, BTreeSet<(usize, usize)>> = BTreeMap::new();
        for (t, w) in self.s.works() {
            if w.computed_by != self.s.chunk_home(w.kv_chunk) {
                uses.entry(w.kv_chunk)
                    .or_default()
                    .insert((t, w.computed_by));
            }
        }
        for (chunk, uses) in uses {
            let home = self.s.chunk_home(chunk);
            let payload = Payload::KvGrad { chunk };
            let uses: Vec<(usize, usize)> = uses.into_iter().collect();
            match route {
                GradRoute::Direct => {
                    for (t, r) in uses {
                        self.send(t + 1, payload, r, home);
                    }
                }
                GradRoute::Chain => {
                    for pair in uses.windows(2) {
                        let ((_, a), (t, b)) = (pair[0], pair[1]);
                        if a != b {
                            self.send(t, payload, a, b);
                        }
                    }
                    let (t, last) = uses[uses.len() - 1];
                    self.send(t + 1, payload, last, home);
                }
            }
        }
    }

    fn build(self) -> Schedule {
        self.s
    }
}

/// Plain ring, causal: P steps; at step t rank r ≥ t computes `Q_r · KV_{r−t}`, having received
/// `KV_{r−t}` from rank r−1 (which used it at step t−1).
pub fn ring_causal(ranks: usize) -> Result<Schedule, ScheduleError> {
    let mut b = Builder::new(ScheduleKind::RingCausal, ranks, ranks)?;
    for t in 0..ranks {
        for r in t..ranks {
            b.work(t, r, r, r - t);
            if t > 0 {
                b.send(t, Payload::Kv { chunk: r - t }, r - 1, r);
            }
        }
    }
    b.return_kv_grads(GradRoute::Chain);
    Ok(b.build())
}

/// Plain ring, full attention: P steps; at step t rank r computes `Q_r · KV_{(r−t) mod P}`,
/// received from rank r−1.
pub fn ring_full(ranks: usize) -> Result<Schedule, ScheduleError> {
    let mut b = Builder::new(ScheduleKind::RingFull, ranks, ranks)?;
    for t in 0..ranks {
        for r in 0..ranks {
            let s = (r + ranks - t) % ranks;
            b.work(t, r, r, s);
            if t > 0 {
                b.send(t, Payload::Kv { chunk: s }, (r + ranks - 1) % ranks, r);
            }
        }
    }
    b.return_kv_grads(GradRoute::Chain);
    Ok(b.build())
}

/// LightSeq's DistAttn balanced causal schedule; the rule and the odd-P choice are in the module
/// docs. Steps `0 ..= ⌊P/2⌋`.
pub fn distattn_causal(ranks: usize) -> Result<Schedule, ScheduleError> {
    let p = ranks;
    let mut b = Builder::new(ScheduleKind::DistAttnCausal, p, p / 2 + 1)?;
    for t in 0..=p / 2 {
        for r in 0..p {
            if r >= t {
                b.work(t, r, r, r - t);
                if t > 0 {
                    b.send(t, Payload::Kv { chunk: r - t }, r - t, r);
                }
            } else if 2 * t < p {
                let q = r + p - t;
                b.work(t, r, q, r);
                b.send(t, Payload::Query { chunk: q }, q, r);
            }
        }
    }
    b.return_partials();
    b.return_kv_grads(GradRoute::Direct);
    Ok(b.build())
}

/// Ring attention on the zigzag layout: P steps; rank r holds the KV chunks {s, 2P−1−s} of rank
/// `s = (r−t) mod P` (received from rank r−1) and computes every causal pair of its Q chunks
/// {r, 2P−1−r} with them.
pub fn zigzag_ring_causal(ranks: usize) -> Result<Schedule, ScheduleError> {
    let p = ranks;
    let mut b = Builder::new(ScheduleKind::ZigzagRingCausal, p, p)?;
    for t in 0..p {
        for r in 0..p {
            let s = (r + p - t) % p;
            let kv_chunks = [s, 2 * p - 1 - s];
            if t > 0 {
                for chunk in kv_chunks {
                    b.send(t, Payload::Kv { chunk }, (r + p - 1) % p, r);
                }
            }
            for q in [r, 2 * p - 1 - r] {
                for kv in kv_chunks {
                    if kv <= q {
                        b.work(t, r, q, kv);
                    }
                }
            }
        }
    }
    b.return_kv_grads(GradRoute::Chain);
    Ok(b.build())
}

/// Block products per rank (a diagonal block counts as one; zigzag blocks are half-size).
pub fn block_counts(schedule: &Schedule) -> Vec<usize> {
    let mut counts = vec![0; schedule.ranks];
    for (_, w) in schedule.works() {
        counts[w.computed_by] += 1;
    }
    counts
}

/// Load balance: the busiest rank's block count over the mean (1.0 is perfect).
pub fn balance(schedule: &Schedule) -> f64 {
    let counts = block_counts(schedule);
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let mean = counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64;
    if mean == 0.0 {
        1.0
    } else {
        max / mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: usize) -> Vec<Schedule> {
        ScheduleKind::ALL
            .iter()
            .map(|k| k.build(p).unwrap())
            .collect()
    }

    #[test]
    fn every_schedule_is_exact_and_computable() {
        for p in 1..=9 {
            for s in all(p) {
                s.validate().unwrap_or_else(|e| panic!("{e}"));
                let blocks: usize = block_counts(&s).iter().sum();
                assert_eq!(blocks, s.required_pairs().len(), "{:?} P={p}", s.kind);
                // Each step lists work for every rank.
                assert!(s.steps.iter().all(|st| st.work.len() == p));
            }
        }
        assert_eq!(ring_causal(0), Err(ScheduleError::NoRanks));
        assert_eq!(distattn_causal(0), Err(ScheduleError::NoRanks));
    }

    #[test]
    fn validate_catches_broken_schedules() {
        let s = distattn_causal(8).unwrap();
        // A block computed twice.
        let mut twice = s.clone();
        let w = twice.steps[1].work[3][0];
        twice.steps[2].work[3].push(w);
        let e = twice.validate().unwrap_err().to_string();
        assert!(e.contains("computed 2 times") || e.contains("lacks"), "{e}");
        // A missing KV message.
        let mut no_kv = s.clone();
        no_kv.steps[2]
            .recv
            .retain(|m| m.to != 5 || !matches!(m.payload, Payload::Kv { .. }));
        let e = no_kv.validate().unwrap_err().to_string();
        assert!(e.contains("step 2") && e.contains("rank 5 lacks"), "{e}");
        // A helper partial never returned.
        let mut lost = s.clone();
        lost.steps[2]
            .recv
            .retain(|m| !matches!(m.payload, Payload::Partial { .. }));
        let e = lost.validate().unwrap_err().to_string();
        assert!(e.contains("merged"), "{e}");
        // A partial returned before it exists.
        let mut early = s.clone();
        let m = early.steps[2]
            .recv
            .iter()
            .copied()
            .find(|m| matches!(m.payload, Payload::Partial { .. }))
            .unwrap();
        early.steps[1].recv.push(m);
        let e = early.validate().unwrap_err().to_string();
        assert!(e.contains("step 1") && e.contains("no such partial"), "{e}");
        // A lost dK/dV.
        let mut no_grad = ring_causal(4).unwrap();
        no_grad.steps[2]
            .recv
            .retain(|m| !matches!(m.payload, Payload::KvGrad { .. }));
        let e = no_grad.validate().unwrap_err().to_string();
        assert!(e.contains("dK/dV"), "{e}");
        // A wrong mask.
        let mut mask = ring_causal(3).unwrap();
        mask.steps[1].work[2][0].mask = BlockMask::Diagonal;
        assert!(mask.validate().unwrap_err().to_string().contains("mask"));
        // A block that is not needed.
        let mut extra = ring_causal(3).unwrap();
        extra.steps[0].work[0].push(Work {
            q_chunk: 0,
            kv_chunk: 1,
            computed_by: 0,
            owner: 0,
            mask: BlockMask::Full,
        });
        assert!(extra.validate().is_err());
    }

    /// One cell of DESIGN.md's table: the rank's work at step t plus the partials it merges.
    fn cell(s: &Schedule, t: usize, r: usize) -> String {
        let step = &s.steps[t];
        let mut parts: Vec<String> = step.work[r]
            .iter()
            .map(|w| match (w.mask, w.computed_by == w.owner) {
                (BlockMask::Diagonal, _) => "diag".to_string(),
                (_, true) => format!("Q{}·KV{}", w.q_chunk, w.kv_chunk),
                (_, false) => format!("help Q{}·KV{}", w.q_chunk, w.kv_chunk),
            })
            .collect();
        for m in step.recv.iter().filter(|m| m.to == r) {
            if let Payload::Partial { q_chunk, kv_chunk } = m.payload {
                parts.push(format!("merge Q{q_chunk}·KV{kv_chunk}"));
            }
        }
        if parts.is_empty() {
            "idle".to_string()
        } else {
            parts.join(" + ")
        }
    }

    #[test]
    fn distattn_p8_matches_design_table() {
        let table = [
            ["diag", "help Q7·KV0", "help Q6·KV0", "help Q5·KV0", "idle"],
            ["diag", "Q1·KV0", "help Q7·KV1", "help Q6·KV1", "idle"],
            ["diag", "Q2·KV1", "Q2·KV0", "help Q7·KV2", "idle"],
            ["diag", "Q3·KV2", "Q3·KV1", "Q3·KV0", "idle"],
            ["diag", "Q4·KV3", "Q4·KV2", "Q4·KV1", "Q4·KV0"],
            [
                "diag",
                "Q5·KV4",
                "Q5·KV3",
                "Q5·KV2",
                "Q5·KV1 + merge Q5·KV0",
            ],
            [
                "diag",
                "Q6·KV5",
                "Q6·KV4",
                "Q6·KV3 + merge Q6·KV0",
                "Q6·KV2 + merge Q6·KV1",
            ],
            [
                "diag",
                "Q7·KV6",
                "Q7·KV5 + merge Q7·KV0",
                "Q7·KV4 + merge Q7·KV1",
                "Q7·KV3 + merge Q7·KV2",
            ],
        ];
        let s = distattn_causal(8).unwrap();
        assert_eq!(s.steps.len(), 5);
        assert!(s
            .finish
            .iter()
            .all(|m| matches!(m.payload, Payload::KvGrad { .. })));
        for (r, row) in table.iter().enumerate() {
            for (t, want) in row.iter().enumerate() {
                assert_eq!(cell(&s, t, r), *want, "rank {r}, t={t}");
            }
        }
    }

    /// At each step t ≥ 1 of DistAttn, every rank sends exactly one chunk (KV or Q), to
    /// (r + t) mod P: a cyclic shift, so no link carries two.
    #[test]
    fn distattn_sends_one_chunk_per_rank_per_step() {
        for p in 2..=9 {
            let s = distattn_causal(p).unwrap();
            for (t, step) in s.steps.iter().enumerate().skip(1) {
                let chunks: Vec<&Message> = step
                    .recv
                    .iter()
                    .filter(|m| matches!(m.payload, Payload::Kv { .. } | Payload::Query { .. }))
                    .collect();
                let mut senders: Vec<usize> = chunks.iter().map(|m| m.from).collect();
                senders.sort_unstable();
                senders.dedup();
                assert_eq!(senders.len(), chunks.len(), "P={p} t={t}");
                assert!(
                    chunks.iter().all(|m| m.to == (m.from + t) % p),
                    "P={p} t={t}"
                );
            }
        }
    }

    #[test]
    fn balance_of_each_schedule() {
        for p in 1..=9 {
            let dist = distattn_causal(p).unwrap();
            assert_eq!(dist.steps.len(), p / 2 + 1);
            let counts = block_counts(&dist);
            if p % 2 == 1 {
                // Odd P: every rank does (P+1)/2 blocks.
                assert!(
                    counts.iter().all(|&c| c == p.div_ceil(2)),
                    "P={p}: {counts:?}"
                );
            } else {
                // Even P: ranks < P/2 do P/2, the rest P/2 + 1.
                let want: Vec<usize> = (0..p).map(|r| p / 2 + usize::from(r >= p / 2)).collect();
                assert_eq!(counts, want, "P={p}");
            }
            let zig = zigzag_ring_causal(p).unwrap();
            assert_eq!(block_counts(&zig), vec![2 * p + 1; p]);
            assert_eq!(balance(&zig), 1.0);
            assert_eq!(balance(&ring_full(p).unwrap()), 1.0);
            assert_eq!(
                block_counts(&ring_causal(p).unwrap()),
                (1..=p).collect::<Vec<_>>()
            );
        }
        let d8 = balance(&distattn_causal(8).unwrap());
        let r8 = balance(&ring_causal(8).unwrap());
        assert!(d8 <= 1.15, "DistAttn P=8 balance {d8}");
        assert!(r8 > 1.6, "ring P=8 balance {r8}");
        assert_eq!(
            block_counts(&distattn_causal(8).unwrap()),
            [4, 4, 4, 4, 5, 5, 5, 5]
        );
    }

    /// The ring schedules only ever talk to neighbours, except the final hop of a causal-ring
    /// dK/dV accumulator home.
    #[test]
    fn rings_pass_chunks_to_the_next_rank() {
        for p in 1..=9 {
            for s in [ring_causal(p), ring_full(p), zigzag_ring_causal(p)] {
                let s = s.unwrap();
                for m in s.steps.iter().flat_map(|st| &st.recv).chain(&s.finish) {
                    let next = m.to == (m.from + 1) % p;
                    let home = matches!(m.payload, Payload::KvGrad { chunk } if s.chunk_home(chunk) == m.to);
                    assert!(
                        next || (home && s.kind == ScheduleKind::RingCausal),
                        "{:?} {m:?}",
                        s.kind
                    );
                }
            }
        }
    }
}
