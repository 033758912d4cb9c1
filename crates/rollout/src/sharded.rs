//! [`ShardedEngine`]: the rollout engine with sequence-parallel prefill and a KV cache that stays
//! sharded over the SP ranks of a communicator, so a prompt longer than one rank's block pool can
//! still be rolled out (issue 6; DESIGN.md "MR-SP and the RL step", step 2).
//!
//! Every rank of the group runs the same engine on the same requests (SPMD); its decisions
//! (admission, sampling, stops) are the same everywhere because every rank sees the same merged
//! attention and the same logits.
//!
//! - **Prefill** (once per group): the prompt of P tokens is cut with the schedule's
//!   [`Sharding`] (contiguous, or zigzag for balance); rank r runs `Qwen2::forward_step` on its
//!   L = P_pad / W rows only (each valid run of a chunk at its global positions, padding rows
//!   apart), attention going through the [`DistExecutor`] (DistAttn / ring / zigzag messages),
//!   and writes the keys and values of its valid rows into its own [`BlockPool`]. The rank that
//!   holds row P − 1 broadcasts its logits [V]; every rank samples each sample's first token.
//! - **Sharded KV**: the prompt's blocks on each rank are forked G times (shared, copy on write,
//!   as in [`crate::Engine`]). Each sample's generated tokens go to one *owner* rank, the least
//!   loaded (KV tokens committed on it) when the group is admitted, ties to the lowest rank.
//! - **Decode** (one token per running sample per step, batched): every rank runs the
//!   projections and MLP of the step's N rows (replicated; they are small), writes the new keys
//!   and values of the samples it owns, and attends every row over the KV it holds with
//!   [`paged_attention_forward`] → partial o [N, H, D], lse [N, H] (a rank holding no key of a
//!   sequence contributes o = 0, lse = −∞). The partials are all-gathered and merged in rank order
//!   in fp32 with `attention_merge` — the same bits on every rank.
//!
//! Admission is conservative (no preemption): a group is admitted, in arrival order, when every
//! rank has room for its prompt shard and for the full `max_new_tokens` of each sample it owns
//! (agreed by one all-reduce of a flag); the room is reserved at the fork, so a running step
//! never runs out of blocks. A group that fits nowhere even alone is [`RolloutError::PoolTooSmall`].
//! A prompt is prefilled in one pass (its per-rank rows are L, whatever `max_step_tokens`).
//! Communication is counted in [`ShardedStats`] (prefill attention, decode merges, control).

use crate::engine::{
    check_group, finish_before_start, finish_reason, sample_output, Detokenizer, EngineConfig,
    EngineStats, StepStats,
};
use crate::paged_attention::{paged_attention_forward, PagedSeq, PagedShape};
use crate::pool::{BlockPool, BlockTable, KvLayout};
use crate::request::{sample_seed, GenerationParams, GroupId, GroupOutput, Prompt, SeqState};
use crate::sample::{pick, RowLogits};
use crate::RolloutError;
use reel_comm::{Communicator, OpStats};
use reel_kernels::attention::{attention_merge, AttnShape};
use reel_model::decode::{
    DecodeScratch, HeadShape, KvError, KvStore, SeqStep, StepInput, StepPositions,
};
use reel_model::Qwen2;
use reel_parallel::{DistExecutor, Overlap, Schedule, ScheduleKind, Sharding};
use std::ops::Range;

/// Work and communication counters of one rank since the engine was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardedStats {
    /// Steps, prompt tokens prefilled (whole prompts, all ranks together), generated tokens run,
    /// tokens sampled, forks, this rank's copy-on-write copies (`preemptions` stays 0).
    pub engine: EngineStats,
    /// Prompt tokens whose keys and values this rank holds (its shards).
    pub local_prompt_tokens: u64,
    /// Generated tokens whose keys and values this rank holds (the samples it owns).
    pub local_decode_tokens: u64,
    /// Most KV blocks in use at once in this rank's pool.
    pub peak_blocks: usize,
    /// Prefill: the attention schedule's messages and the logits broadcast.
    pub prefill_comm: OpStats,
    /// Decode: the all-gathers of partial attention results.
    pub decode_comm: OpStats,
    /// Admission agreement (one flag all-reduce per attempt).
    pub control_comm: OpStats,
}

struct Sample {
    seed: u64,
    rng: reel_tensor::Rng,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    /// The rank that stores its generated tokens' keys and values.
    owner: usize,
    /// This rank's table: the prompt shard forked, plus its generated tokens if it is the owner.
    table: Option<BlockTable>,
    state: SeqState,
}

struct Group {
    id: GroupId,
    prompt: Prompt,
    pos_base: usize,
    max_pos: usize,
    params: GenerationParams,
    sharding: Sharding,
    /// Generated tokens each sample may store (room reserved on its owner).
    room: usize,
    /// Whether its prompt is prefilled and its samples forked.
    admitted: bool,
    samples: Vec<Sample>,
}

impl Group {
    fn done(&self) -> bool {
        self.samples
            .iter()
            .all(|s| matches!(s.state, SeqState::Finished { .. }))
    }

    /// Valid prompt rows rank `r` holds.
    fn shard_tokens(&self, r: usize) -> usize {
        let sh = &self.sharding;
        let cpr = sh.layout().chunks_per_rank();
        (0..cpr)
            .map(|slot| sh.chunk_valid_len(sh.layout().chunk_at(sh.ranks(), r, slot)))
            .sum()
    }
}

/// The rollout engine over SP ranks (module docs). Every rank of `comm` makes the same calls.
pub struct ShardedEngine<'m, 'c, C: Communicator> {
    model: &'m Qwen2,
    comm: &'c C,
    config: EngineConfig,
    schedule: Schedule,
    pool: BlockPool,
    scratch: DecodeScratch,
    groups: Vec<Group>,
    finished: Vec<GroupOutput>,
    next_id: u64,
    /// KV tokens committed on each rank (prompt shards and reserved sample room).
    load: Vec<usize>,
    /// A waiting group did not fit and nothing was freed since.
    blocked: bool,
    stats: ShardedStats,
    detokenizer: Option<Detokenizer>,
}

fn delta(after: OpStats, before: OpStats) -> OpStats {
    OpStats {
        calls: after.calls - before.calls,
        bytes_sent: after.bytes_sent - before.bytes_sent,
        bytes_recv: after.bytes_recv - before.bytes_recv,
    }
}

impl<'m, 'c, C: Communicator> ShardedEngine<'m, 'c, C> {
    /// An engine over `comm`'s ranks reading `model`'s weights in place; `config.num_blocks` is
    /// the pool of *each* rank; `schedule` (causal) runs the prefill attention.
    pub fn new(
        model: &'m Qwen2,
        comm: &'c C,
        config: EngineConfig,
        schedule: ScheduleKind,
    ) -> Result<Self, RolloutError> {
        if config.max_step_tokens == 0 || config.max_step_seqs == 0 {
            return Err(RolloutError::Config(format!(
                "max_step_tokens and max_step_seqs must be positive: {config:?}"
            )));
        }
        if !schedule.is_causal() {
            return Err(RolloutError::Config(format!(
                "prefill attention is causal; the {schedule:?} schedule is not"
            )));
        }
        let w = comm.world_size();
        let schedule = schedule
            .build(w)
            .map_err(|e| RolloutError::Config(format!("{schedule:?} over {w} ranks: {e}")))?;
        let c = &model.config;
        let pool = BlockPool::new(KvLayout {
            layers: c.num_hidden_layers,
            h_kv: c.num_key_value_heads,
            d: c.head_dim,
            block_size: config.block_size,
            num_blocks: config.num_blocks,
        })?;
        Ok(ShardedEngine {
            model,
            comm,
            config,
            schedule,
            pool,
            scratch: DecodeScratch::default(),
            groups: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            load: vec![0; w],
            blocked: false,
            stats: ShardedStats::default(),
            detokenizer: None,
        })
    }

    /// Sets the detokenizer that stop strings are matched with.
    pub fn with_detokenizer(mut self, f: Detokenizer) -> Self {
        self.detokenizer = Some(f);
        self
    }

    pub fn stats(&self) -> ShardedStats {
        let mut s = self.stats;
        s.engine.cow_copies = self.pool.cow_copies();
        s
    }

    /// This rank's block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Whether any group is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Queues a prompt with `g` samples (checked as [`crate::Engine::add_group`] checks it).
    pub fn add_group(
        &mut self,
        prompt: impl Into<Prompt>,
        g: usize,
        params: GenerationParams,
    ) -> Result<GroupId, RolloutError> {
        let prompt = prompt.into();
        let id = GroupId(self.next_id);
        let c = &self.model.config;
        let pos_base = check_group(c, id, &prompt, g, &params, self.detokenizer.is_some())?;
        let sharding = Sharding::new(
            prompt.ids.len(),
            self.comm.world_size(),
            self.schedule.layout(),
        )
        .map_err(|e| RolloutError::Invalid(format!("group {id}: {e}")))?;
        self.next_id += 1;
        let w = self.comm.world_size();
        let samples = (0..g)
            .map(|j| {
                let seed = sample_seed(params.sampling.seed, j);
                Sample {
                    seed,
                    rng: reel_tensor::rng(seed),
                    ids: Vec::new(),
                    logprobs: Vec::new(),
                    owner: w,
                    table: None,
                    state: SeqState::Waiting,
                }
            })
            .collect();
        let max_pos = c.max_position_embeddings;
        let mut group = Group {
            id,
            room: params.max_new_tokens.min(max_pos.saturating_sub(pos_base)),
            prompt,
            pos_base,
            max_pos,
            params,
            sharding,
            admitted: false,
            samples,
        };
        if let Some(reason) = finish_before_start(&group.params, pos_base, max_pos) {
            for s in &mut group.samples {
                s.state = SeqState::Finished {
                    reason: reason.clone(),
                };
            }
        }
        self.groups.push(group);
        self.collect_finished();
        Ok(id)
    }

    /// Finished groups' outputs since the last call, in the order they finished.
    pub fn take_finished(&mut self) -> Vec<GroupOutput> {
        std::mem::take(&mut self.finished)
    }

    /// Steps until every queued group is finished; returns all finished outputs by group id.
    pub fn run(&mut self) -> Result<Vec<GroupOutput>, RolloutError> {
        while self.has_work() {
            if self.step()?.seqs == 0 {
                return Err(RolloutError::Invalid(
                    "the scheduler found nothing to run while groups wait".into(),
                ));
            }
        }
        let mut out = self.take_finished();
        out.sort_by_key(|o| o.id);
        Ok(out)
    }

    /// One step: admits and prefills the first waiting group if every rank has room, then
    /// decodes one token of every running sample. Returns what it ran (`seqs` counts the
    /// prefilled prompt and the decoded samples).
    pub fn step(&mut self) -> Result<StepStats, RolloutError> {
        let mut st = StepStats::default();
        if let Some(g) = self.groups.iter().position(|g| !g.admitted) {
            if !self.blocked {
                if self.try_admit(g)? {
                    self.prefill(g)?;
                    st.seqs += 1;
                    st.prefill_tokens += self.groups[g].prompt.ids.len();
                } else {
                    self.blocked = true;
                }
            }
        }
        let units: Vec<(usize, usize)> = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.admitted)
            .flat_map(|(gi, g)| {
                g.samples
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.state == SeqState::Running)
                    .map(move |(j, _)| (gi, j))
            })
            .collect();
        if !units.is_empty() {
            self.decode(&units)?;
            st.seqs += units.len();
            st.decode_tokens += units.len();
        }
        if st.seqs > 0 {
            self.stats.engine.steps += 1;
        }
        let used = self.pool.total_blocks() - self.pool.free_blocks();
        self.stats.peak_blocks = self.stats.peak_blocks.max(used);
        self.collect_finished();
        Ok(st)
    }

    /// Picks the owners of group g's samples and asks every rank whether the group fits; admits
    /// it (commits the load) when all agree. Errors when it cannot fit even alone.
    fn try_admit(&mut self, g: usize) -> Result<bool, RolloutError> {
        let (rank, w) = (self.comm.rank(), self.comm.world_size());
        let gr = &self.groups[g];
        let mut load = self.load.clone();
        for (r, l) in load.iter_mut().enumerate() {
            *l += gr.shard_tokens(r);
        }
        let mut owners = Vec::with_capacity(gr.samples.len());
        for _ in &gr.samples {
            let o = (0..w).min_by_key(|&r| (load[r], r)).expect("w ≥ 1");
            load[o] += gr.room;
            owners.push(o);
        }
        let owned = owners.iter().filter(|&&o| o == rank).count();
        let need = self.pool.blocks_for(gr.shard_tokens(rank))
            + owned * (self.pool.blocks_for(gr.room) + 1);
        let resident: usize = self
            .groups
            .iter()
            .filter(|g| g.admitted)
            .map(|g| g.samples.len())
            .sum();
        let alone = resident == 0;
        let fits = need <= self.pool.free_blocks()
            && (alone || resident + gr.samples.len() <= self.config.max_step_seqs);
        let before = self.comm.stats().total();
        let mut flag = [f32::from(!fits)];
        self.comm.all_reduce_sum(&mut flag)?;
        let after = self.comm.stats().total();
        self.stats.control_comm = self.stats.control_comm + delta(after, before);
        if flag[0] != 0.0 {
            if alone {
                return Err(RolloutError::PoolTooSmall {
                    group: gr.id.0,
                    total: self.pool.total_blocks(),
                });
            }
            return Ok(false);
        }
        self.load = load;
        let gr = &mut self.groups[g];
        gr.admitted = true;
        for (s, o) in gr.samples.iter_mut().zip(owners) {
            s.owner = o;
            if s.state == SeqState::Waiting {
                s.state = SeqState::Running;
            }
        }
        Ok(true)
    }

    /// Sequence-parallel prefill of group g's prompt, first tokens, forks (module docs).
    fn prefill(&mut self, g: usize) -> Result<(), RolloutError> {
        let (rank, w) = (self.comm.rank(), self.comm.world_size());
        let ShardedEngine {
            model,
            comm,
            schedule,
            pool,
            scratch,
            groups,
            stats,
            detokenizer,
            ..
        } = self;
        let before = comm.stats().total();
        let gr = &mut groups[g];
        let c = &model.config;
        let (d, p) = (c.hidden_size, gr.prompt.ids.len());
        let sh = gr.sharding;
        let cl = sh.chunk_len();
        let pad_ids = vec![0u32; cl];
        let mut steps = Vec::new();
        let mut real_rows = Vec::new();
        let mut logits_here = false;
        for slot in 0..sh.layout().chunks_per_rank() {
            let chunk = sh.layout().chunk_at(w, rank, slot);
            let (start, valid) = (sh.chunk_start(chunk), sh.chunk_valid_len(chunk));
            if valid > 0 {
                let r = start..start + valid;
                let input = match &gr.prompt.embeddings {
                    Some(e) => StepInput::Embeddings(&e[r.start * d..r.end * d]),
                    None => StepInput::Tokens(&gr.prompt.ids[r.clone()]),
                };
                let positions = match &gr.prompt.mrope {
                    Some(m) => StepPositions::MRope {
                        ids: &m.positions[r.clone()],
                        sections: m.sections,
                    },
                    None => StepPositions::Linear { start },
                };
                let last = r.end == p;
                logits_here |= last;
                steps.push(SeqStep {
                    input,
                    positions,
                    logits: last,
                });
                real_rows.push(slot * cl..slot * cl + valid);
            }
            if valid < cl {
                // Padding rows: never read by the executor; any input and positions do.
                steps.push(SeqStep {
                    input: StepInput::Tokens(&pad_ids[..cl - valid]),
                    positions: StepPositions::Linear { start: 0 },
                    logits: false,
                });
            }
        }
        let local: usize = real_rows.iter().map(Range::len).sum();
        let mut table = pool.new_table();
        pool.reserve(&mut table, local)?;
        let shape = AttnShape {
            b: 1,
            tq: sh.local_len(),
            tk: sh.local_len(),
            h: c.num_attention_heads,
            h_kv: c.num_key_value_heads,
            d: c.head_dim,
        };
        let exec = DistExecutor::new(schedule.clone(), sh, shape, Overlap::Overlapped)
            .map_err(|e| RolloutError::Invalid(format!("group {}: prefill: {e}", gr.id)))?;
        let mut kv = PrefillKv {
            pool,
            table: &table,
            real_rows: &real_rows,
            k: Vec::new(),
            v: Vec::new(),
            exec: &exec,
            comm: *comm,
        };
        let v = c.vocab_size;
        let mut row = vec![0.0f32; v];
        let result = model.forward_step(scratch, &steps, &mut kv);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                pool.release(table);
                return Err(e.into());
            }
        };
        if logits_here {
            row.copy_from_slice(&logits[..v]);
        }
        drop(steps);
        pool.advance(&mut table, local);
        let root = sh.local_row(p - 1).0;
        comm.broadcast(&mut row, root)?;
        stats.engine.prefill_tokens += p as u64;
        stats.local_prompt_tokens += local as u64;
        for j in 0..gr.samples.len() {
            if gr.samples[j].state != SeqState::Running {
                continue;
            }
            sample_next(gr, j, &row, detokenizer, &mut stats.engine);
            if gr.samples[j].state == SeqState::Running {
                let mut t = pool.fork(&table);
                stats.engine.forks += 1;
                if gr.samples[j].owner == rank {
                    pool.reserve(&mut t, gr.room)?;
                }
                gr.samples[j].table = Some(t);
            }
        }
        pool.release(table);
        let after = comm.stats().total();
        stats.prefill_comm = stats.prefill_comm + delta(after, before);
        Ok(())
    }

    /// One decode token of each (group, sample) in `units` (module docs).
    fn decode(&mut self, units: &[(usize, usize)]) -> Result<(), RolloutError> {
        let rank = self.comm.rank();
        let ShardedEngine {
            model,
            comm,
            pool,
            scratch,
            groups,
            stats,
            detokenizer,
            ..
        } = self;
        let before = comm.stats().total();
        for &(g, j) in units {
            let s = &mut groups[g].samples[j];
            if s.owner == rank {
                pool.reserve(s.table.as_mut().expect("running sample's table"), 1)?;
            }
        }
        let mut steps = Vec::with_capacity(units.len());
        let mut seqs = Vec::with_capacity(units.len());
        for &(g, j) in units {
            let gr = &groups[g];
            let s = &gr.samples[j];
            let k = s.ids.len() - 1;
            steps.push(SeqStep {
                input: StepInput::Tokens(&s.ids[k..]),
                positions: StepPositions::Linear {
                    start: gr.pos_base + k,
                },
                logits: true,
            });
            seqs.push((
                s.table.as_ref().expect("running sample's table"),
                s.owner == rank,
            ));
        }
        let mut kv = DecodeKv {
            pool,
            seqs,
            comm: *comm,
            world: comm.world_size(),
        };
        let logits = model.forward_step(scratch, &steps, &mut kv)?;
        drop(steps);
        let v = model.config.vocab_size;
        let rows: Vec<f32> = logits.to_vec();
        for (i, &(g, j)) in units.iter().enumerate() {
            let gr = &mut groups[g];
            stats.engine.decode_tokens += 1;
            if gr.samples[j].owner == rank {
                let t = gr.samples[j].table.as_mut().expect("sample table");
                pool.advance(t, 1);
                stats.local_decode_tokens += 1;
            }
            sample_next(
                gr,
                j,
                &rows[i * v..(i + 1) * v],
                detokenizer,
                &mut stats.engine,
            );
        }
        let after = comm.stats().total();
        stats.decode_comm = stats.decode_comm + delta(after, before);
        Ok(())
    }

    /// Gives back the tables of finished samples and the load of finished groups.
    fn release_finished(&mut self) {
        for gr in &mut self.groups {
            for s in &mut gr.samples {
                if matches!(s.state, SeqState::Finished { .. }) {
                    if let Some(t) = s.table.take() {
                        self.pool.release(t);
                        self.blocked = false;
                    }
                }
            }
            if gr.admitted && gr.done() {
                for (r, l) in self.load.iter_mut().enumerate() {
                    *l -= gr.shard_tokens(r);
                }
                for s in &gr.samples {
                    self.load[s.owner] -= gr.room;
                }
                gr.admitted = false;
                self.blocked = false;
            }
        }
    }

    /// Moves finished groups' outputs to `finished`.
    fn collect_finished(&mut self) {
        self.release_finished();
        let mut g = 0;
        while g < self.groups.len() {
            if !self.groups[g].done() {
                g += 1;
                continue;
            }
            let gr = self.groups.remove(g);
            let samples = gr
                .samples
                .into_iter()
                .map(|s| sample_output(s.ids, s.logprobs, s.state, s.seed))
                .collect();
            self.finished.push(GroupOutput {
                id: gr.id,
                prompt_len: gr.prompt.ids.len(),
                samples,
            });
        }
    }
}

/// Samples sample j's next token from its logits row (as [`crate::Engine`] does).
fn sample_next(
    gr: &mut Group,
    j: usize,
    logits: &[f32],
    detok: &Option<Detokenizer>,
    stats: &mut EngineStats,
) {
    let params = &gr.params;
    let s = &mut gr.samples[j];
    let (tok, logprob) = pick(RowLogits::Full(logits), &params.sampling, &mut s.rng);
    s.ids.push(tok);
    s.logprobs.push(logprob);
    stats.sampled_tokens += 1;
    if let Some(reason) = finish_reason(params, &s.ids, gr.pos_base, gr.max_pos, detok) {
        s.state = SeqState::Finished { reason };
    }
}

/// The prefill's key/value store: this rank's valid rows go into its prompt table; attention of
/// its L rows runs through the distributed executor with the layer's local k/v.
struct PrefillKv<'a, C: Communicator> {
    pool: &'a mut BlockPool,
    table: &'a BlockTable,
    /// Local rows that are real prompt tokens, in order.
    real_rows: &'a [Range<usize>],
    k: Vec<f32>,
    v: Vec<f32>,
    exec: &'a DistExecutor,
    comm: &'a C,
}

impl<C: Communicator> KvStore for PrefillKv<'_, C> {
    fn write(
        &mut self,
        layer: usize,
        _rows: &[Range<usize>],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        self.k.clear();
        self.k.extend_from_slice(k);
        self.v.clear();
        self.v.extend_from_slice(v);
        let l = self.pool.layout();
        let w = l.h_kv * l.d;
        let mut at = 0;
        for r in self.real_rows {
            let (k, v) = (&k[r.start * w..r.end * w], &v[r.start * w..r.end * w]);
            self.pool.write(self.table, layer, at, k, v)?;
            at += r.len();
        }
        Ok(())
    }

    fn attend(
        &self,
        _layer: usize,
        _rows: &[Range<usize>],
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        _heads: HeadShape,
    ) -> Result<(), KvError> {
        self.exec
            .forward(self.comm, out, lse, q, &self.k, &self.v)?;
        Ok(())
    }
}

/// The decode step's key/value store: new keys and values of owned samples into this rank's
/// pool, partial attention over the local KV, all-gathered and merged in fp32.
struct DecodeKv<'a, C: Communicator> {
    pool: &'a mut BlockPool,
    /// Per step sequence: this rank's table and whether this rank owns its new token.
    seqs: Vec<(&'a BlockTable, bool)>,
    comm: &'a C,
    world: usize,
}

impl<C: Communicator> KvStore for DecodeKv<'_, C> {
    fn write(
        &mut self,
        layer: usize,
        rows: &[Range<usize>],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let l = self.pool.layout();
        let w = l.h_kv * l.d;
        for (&(t, owned), r) in self.seqs.iter().zip(rows) {
            if owned {
                let (k, v) = (&k[r.start * w..r.end * w], &v[r.start * w..r.end * w]);
                self.pool.write(t, layer, t.len(), k, v)?;
            }
        }
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        rows: &[Range<usize>],
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        heads: HeadShape,
    ) -> Result<(), KvError> {
        let l = self.pool.layout();
        let HeadShape { h, h_kv, d } = heads;
        if (h_kv, d) != (l.h_kv, l.d) || rows.len() != self.seqs.len() {
            return Err(format!(
                "decode attention over {} sequences with H_kv {h_kv}, D {d}; the step has {} \
                 over a pool of H_kv {}, D {}",
                rows.len(),
                self.seqs.len(),
                l.h_kv,
                l.d
            )
            .into());
        }
        let n = rows.last().map_or(0, |r| r.end);
        let (no, nl) = (n * h * d, n * h);
        // This rank's partial: [o ‖ lse]; rows with no local key stay (0, −∞).
        let mut part = vec![0.0f32; no + nl];
        part[no..].fill(f32::NEG_INFINITY);
        let mut paged = Vec::with_capacity(rows.len());
        for (&(t, owned), r) in self.seqs.iter().zip(rows) {
            if r.len() != 1 {
                return Err(format!(
                    "a sharded decode step runs one token per sequence, got {}",
                    r.len()
                )
                .into());
            }
            // Owner: its keys and the new token's; others: every key they hold (all earlier).
            let past = if owned {
                t.len()
            } else {
                t.len().wrapping_sub(1)
            };
            if owned || !t.is_empty() {
                paged.push(PagedSeq {
                    block_table: t.block_ids(),
                    past,
                    rows: r.clone(),
                });
            }
        }
        let (kc, vc) = self.pool.layer(layer);
        let shape = PagedShape {
            h,
            h_kv,
            d,
            block_size: l.block_size,
        };
        {
            let (po, pl) = part.split_at_mut(no);
            paged_attention_forward(po, pl, q, kc, vc, &paged, shape);
        }
        let mut all = vec![0.0f32; self.world * (no + nl)];
        self.comm.all_gather(&part, &mut all)?;
        let (o, l0) = (&mut out[..no], &mut lse[..nl]);
        o.copy_from_slice(&all[..no]);
        l0.copy_from_slice(&all[no..no + nl]);
        for r in 1..self.world {
            let p = &all[r * (no + nl)..(r + 1) * (no + nl)];
            attention_merge(o, l0, &p[..no], &p[no..], nl, d);
        }
        Ok(())
    }
}
