//! The rollout engine: groups of G samples of one prompt, scheduled step by step over a paged
//! KV cache with continuous batching.
//!
//! A group's life: Waiting → its prompt is prefilled once, in chunks, into one block table →
//! the last prompt logits give each sample its first token, and the table is forked G times
//! (blocks shared, reference-counted; a shared partial last block is copied on a sample's first
//! append) → each sample decodes one token a step until a stop token, a stop string, its
//! `max_new_tokens` or the context limit → the group's output is ready once every sample is done.
//! So prefill work is P tokens per group, whatever G (counted in [`EngineStats`]).
//!
//! Each [`Engine::step`] the scheduler walks resident groups in admission order and gives every
//! running sample its pending tokens (one when decoding) and every prefilling prompt its next
//! chunk, within `max_step_tokens` and `max_step_seqs`; then admits waiting groups in arrival
//! order while the budget and free blocks allow. If the pool cannot hold a step's tokens, the
//! most recently admitted group is preempted (one whose prompt was prefilled with the model's
//! peers, [`Engine::add_group_shared`], only when every resident group was: this engine would
//! recompute alone what they computed together): its blocks go back and it waits to be recomputed
//! (its prompt prefilled again, its samples' generated tokens re-run; sampled tokens and the
//! samples' generators are kept, so the outputs do not change). All scheduled tokens then run
//! as one step of the [`StepModel`] (the CPU model's [`Qwen2::forward_step`], or a GPU decoder):
//! every GEMM batched over the step's N rows. The logits rows are then sampled in parallel (one
//! generator per sample, so the outputs do not depend on the thread count) by
//! [`crate::sample::pick`]. When every row of the step can be chosen from its k best candidates
//! (greedy, or top-k with k < V; `reel_model::generate::candidates_needed`) and the model offers
//! that many ([`StepModel::max_candidates`]: a GPU decoder), the step returns only those and the
//! parts of each row's log-sum-exp ([`StepModel::forward_step_top`]), not the [S_l, V] rows; the
//! tokens are the same and the log-probabilities equal within the sum's rounding
//! ([`crate::sample`]).

use crate::pool::{BlockPool, BlockTable, KvLayout};
use crate::request::{
    sample_seed, FinishReason, GenerationParams, GroupId, GroupOutput, Prompt, SampleOutput,
    SeqState,
};
use crate::sample::{logprob_temperature, pick, step_candidates, StepLogits};
use crate::shared_prefill::{agree, fingerprint, PrefillVote, Refusal};
use crate::step::{CpuStep, StepModel};
use crate::RolloutError;
use rayon::prelude::*;
use reel_model::decode::{SeqStep, StepInput, StepPositions};
use reel_model::generate::SamplingParams;
use reel_model::{Qwen2, Qwen25VL, Qwen2Config};
use std::sync::Arc;

/// Engine sizes. Every field has a default ([`EngineConfig::default`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block. Default 16.
    pub block_size: usize,
    /// KV blocks in the pool (memory: `num_blocks · KvLayout::block_bytes`). Default 1024.
    pub num_blocks: usize,
    /// Most tokens (decode tokens + prefill chunks) one step runs. Default 512.
    pub max_step_tokens: usize,
    /// Most sequences one step runs; also bounds the samples resident at once. Default 256.
    pub max_step_seqs: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_blocks: 1024,
            max_step_tokens: 512,
            max_step_seqs: 256,
        }
    }
}

/// Work counters since the engine was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Steps run.
    pub steps: u64,
    /// Prompt tokens run through the model (prefill; again after a preemption).
    pub prefill_tokens: u64,
    /// Generated tokens run through the model (decode; again after a preemption).
    pub decode_tokens: u64,
    /// Tokens sampled.
    pub sampled_tokens: u64,
    /// Sample tables forked from a prefilled prompt.
    pub forks: u64,
    /// Shared partial blocks copied on write.
    pub cow_copies: u64,
    /// Groups preempted for lack of KV blocks.
    pub preemptions: u64,
    /// Of them, groups whose prompt was prefilled with the model's peers
    /// ([`Engine::add_group_shared`]), which this engine then recomputes alone: preempted only
    /// when every resident group was shared (a sign the pool is too small for the round).
    pub shared_preemptions: u64,
}

/// What one step ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Sequences (prompts and samples) in the step.
    pub seqs: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
}

/// Turns generated ids into text, for stop strings.
pub type Detokenizer = Arc<dyn Fn(&[u32]) -> String + Send + Sync>;

struct Sample {
    seed: u64,
    rng: reel_tensor::Rng,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    /// Prompt and generated tokens whose keys and values it holds; None while not resident.
    table: Option<BlockTable>,
    state: SeqState,
}

struct Group {
    id: GroupId,
    prompt: Prompt,
    /// Position of the first generated token.
    pos_base: usize,
    /// The model's max_position_embeddings.
    max_pos: usize,
    params: GenerationParams,
    /// Admission stamp while resident (holding blocks).
    stamp: Option<u64>,
    /// The prompt's table while it is prefilled (before the samples fork from it).
    prompt_table: Option<BlockTable>,
    /// Whether the samples hold tables (the prompt is prefilled and forked).
    forked: bool,
    /// Whether its prompt was prefilled with the model's peers ([`Engine::add_group_shared`]):
    /// preempted last, since this engine would recompute alone what the peers computed together.
    shared: bool,
    samples: Vec<Sample>,
}

impl Group {
    fn p(&self) -> usize {
        self.prompt.ids.len()
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        self.samples
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SeqState::Running)
            .map(|(j, _)| j)
    }

    fn live_samples(&self) -> usize {
        self.samples
            .iter()
            .filter(|s| !matches!(s.state, SeqState::Finished { .. }))
            .count()
    }

    fn done(&self) -> bool {
        self.live_samples() == 0
    }

    /// Makes the group resident with its prompt's table (admission stamp `stamp`): its waiting
    /// samples start running.
    fn admit(&mut self, table: BlockTable, stamp: u64) {
        self.prompt_table = Some(table);
        self.stamp = Some(stamp);
        for s in &mut self.samples {
            if s.state == SeqState::Waiting {
                s.state = SeqState::Running;
            }
        }
    }
}

/// One scheduled piece of work: `n` tokens of a group's prompt, or of sample `j`.
#[derive(Clone, Copy, Debug)]
enum Unit {
    Prompt { g: usize, n: usize },
    Sample { g: usize, j: usize, n: usize },
}

/// The rollout engine over a borrowed model (module docs).
pub struct Engine<'m> {
    model: Box<dyn StepModel + 'm>,
    config: EngineConfig,
    pool: BlockPool,
    /// Live groups in arrival order.
    groups: Vec<Group>,
    finished: Vec<GroupOutput>,
    next_id: u64,
    next_stamp: u64,
    stats: EngineStats,
    detokenizer: Option<Detokenizer>,
}

impl Drop for Engine<'_> {
    /// The model's memory for this engine's pool goes with it ([`StepModel::release_pool`]).
    fn drop(&mut self) {
        self.model.release_pool();
    }
}

impl<'m> Engine<'m> {
    /// An engine reading `model`'s weights in place, with its KV pool allocated up front.
    pub fn new(model: &'m Qwen2, config: EngineConfig) -> Result<Self, RolloutError> {
        Self::with_model(Box::new(CpuStep::new(model)), config)
    }

    /// An engine stepping `model` (the CPU model, or a GPU decoder: `Box::new(&mut decoder)`),
    /// whose KV pool it asks for up front ([`StepModel::new_pool`]).
    pub fn with_model(
        mut model: Box<dyn StepModel + 'm>,
        config: EngineConfig,
    ) -> Result<Self, RolloutError> {
        if config.max_step_tokens == 0 || config.max_step_seqs == 0 {
            return Err(RolloutError::Config(format!(
                "max_step_tokens and max_step_seqs must be positive: {config:?}"
            )));
        }
        let c = model.config();
        let layout = KvLayout {
            layers: c.num_hidden_layers,
            h_kv: c.num_key_value_heads,
            d: c.head_dim,
            block_size: config.block_size,
            num_blocks: config.num_blocks,
        };
        let pool = model.new_pool(layout)?;
        Ok(Engine {
            model,
            config,
            pool,
            groups: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            next_stamp: 0,
            stats: EngineStats::default(),
            detokenizer: None,
        })
    }

    /// An engine over a Qwen2.5-VL model's decoder (its weights read in place, the tower
    /// unused): prompts come from [`Prompt::vl`] with the videos' features already encoded.
    /// On a GPU: `Engine::with_model(Box::new(&mut decoder), config)` with a decoder of
    /// `model.lm` (`reel_cuda::GpuDecoder::from_model`), which takes the same prompts.
    pub fn new_vl(model: &'m Qwen25VL, config: EngineConfig) -> Result<Self, RolloutError> {
        Self::new(&model.lm, config)
    }

    /// Sets the detokenizer that stop strings are matched with.
    pub fn with_detokenizer(mut self, f: Detokenizer) -> Self {
        self.detokenizer = Some(f);
        self
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            cow_copies: self.pool.cow_copies(),
            ..self.stats
        }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Whether any group is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.groups.is_empty()
    }

    /// A sample's state; None for an unknown group or one whose output was already taken.
    pub fn state(&self, id: GroupId, sample: usize) -> Option<SeqState> {
        if let Some(g) = self.groups.iter().find(|g| g.id == id) {
            return g.samples.get(sample).map(|s| s.state.clone());
        }
        let out = self.finished.iter().find(|o| o.id == id)?;
        let s = out.samples.get(sample)?;
        Some(SeqState::Finished {
            reason: s.finish.clone(),
        })
    }

    /// Queues one request (a group of one sample).
    pub fn add_request(
        &mut self,
        prompt: impl Into<Prompt>,
        params: GenerationParams,
    ) -> Result<GroupId, RolloutError> {
        self.add_group(prompt, 1, params)
    }

    /// Queues a prompt with `g` samples; its prompt is prefilled once and the samples fork from
    /// it. Everything is checked here, so a bad request never fails a later step.
    pub fn add_group(
        &mut self,
        prompt: impl Into<Prompt>,
        g: usize,
        params: GenerationParams,
    ) -> Result<GroupId, RolloutError> {
        self.add_samples(prompt.into(), 0..g, params)
    }

    /// [`Engine::add_group`] for samples `samples` of a group (each seeded as that sample of
    /// the whole group is), in their order.
    fn add_samples(
        &mut self,
        prompt: Prompt,
        samples: std::ops::Range<usize>,
        params: GenerationParams,
    ) -> Result<GroupId, RolloutError> {
        let id = GroupId(self.next_id);
        let c = self.model.config();
        let p = prompt.ids.len();
        let g = samples.len();
        let pos_base = check_group(c, id, &prompt, g, &params, self.detokenizer.is_some())?;
        if self.pool.blocks_for(p) + 1 > self.pool.total_blocks() {
            return Err(RolloutError::PoolTooSmall {
                group: id.0,
                total: self.pool.total_blocks(),
            });
        }
        self.next_id += 1;
        let samples = samples
            .map(|j| {
                let seed = sample_seed(params.sampling.seed, j);
                Sample {
                    seed,
                    rng: reel_tensor::rng(seed),
                    ids: Vec::new(),
                    logprobs: Vec::new(),
                    table: None,
                    state: SeqState::Waiting,
                }
            })
            .collect();
        let mut group = Group {
            id,
            prompt,
            pos_base,
            max_pos: c.max_position_embeddings,
            params,
            stamp: None,
            prompt_table: None,
            forked: false,
            shared: false,
            samples,
        };
        // Nothing to generate: finished without running.
        if let Some(reason) =
            finish_before_start(&group.params, pos_base, c.max_position_embeddings)
        {
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

    /// Queues samples `samples` of a group of a prompt (each seeded as that sample of the whole
    /// group is: `0..G` for all of them) as [`Engine::add_group`] does, but prefills all the
    /// prompt's tokens but the last now, together with the model's peers
    /// ([`StepModel::prefill_shared`]: each computes a share, every peer's cache ends whole);
    /// the last token runs in the engine's next step, whose logits start the samples. Every peer
    /// calls this with the same prompt and parameters, at the same point of their calls, and
    /// its share of the samples (all of them on one peer, or
    /// [`crate::shared_prefill::sample_share`]); a peer given none only computes its share of
    /// the prefill, gives the table back and returns `None`. The request is checked before the
    /// prefill, alike on every peer, so a bad one fails on all of them. The pool must have room
    /// for the prompt now (nothing is preempted for it). Before any collective work the peers
    /// agree (`crate::shared_prefill`, "Agreement"): a peer whose request fails its checks,
    /// whose pool has no room, or whose model cannot ready itself fails every peer at once,
    /// the error naming it and why; only a device error inside the prefill (a GPU out of memory
    /// for a segment's scratch, say) leaves the others to fail at their collective's timeout.
    /// A model without prefill peers is refused, even for a one-token prompt.
    pub fn add_group_shared(
        &mut self,
        prompt: &Prompt,
        samples: std::ops::Range<usize>,
        params: GenerationParams,
    ) -> Result<Option<GroupId>, RolloutError> {
        let checked = check_group(
            self.model.config(),
            GroupId(self.next_id),
            prompt,
            samples.len().max(1),
            &params,
            self.detokenizer.is_some(),
        );
        let table = self.shared_prefill(prompt, checked.map(|_| ()))?;
        if samples.is_empty() {
            if let Some(t) = table {
                self.pool.release(t);
            }
            return Ok(None);
        }
        // The shared rows count once over the peers: on the one that decodes sample 0.
        let n = match samples.start {
            0 => table.as_ref().map_or(0, BlockTable::len),
            _ => 0,
        };
        let id = match self.add_samples(prompt.clone(), samples, params) {
            Ok(id) => id,
            Err(e) => {
                if let Some(t) = table {
                    self.pool.release(t);
                }
                return Err(e);
            }
        };
        let Some(table) = table else {
            return Ok(Some(id));
        };
        self.stats.prefill_tokens += n as u64;
        match self.groups.iter_mut().find(|gr| gr.id == id) {
            Some(gr) => {
                // Resident with its prompt cached but for the last token, which the scheduler
                // runs next (a prompt unit of one row, logits on).
                gr.admit(table, self.next_stamp);
                gr.shared = true;
                self.next_stamp += 1;
            }
            // Finished before it started (nothing to generate).
            None => self.pool.release(table),
        }
        Ok(Some(id))
    }

    /// The shared prefill of all of `prompt`'s tokens but the last into a new table (none for a
    /// one-token prompt, on every peer alike), after the peers' agreement
    /// (`crate::shared_prefill`, "Agreement"): `checked` is this peer's verdict on the request;
    /// room for the rows is reserved and the model readied, and every peer's vote gathered,
    /// before anything is computed.
    fn shared_prefill(
        &mut self,
        prompt: &Prompt,
        checked: Result<(), RolloutError>,
    ) -> Result<Option<BlockTable>, RolloutError> {
        if self.model.prefill_peers().is_none() {
            return Err(RolloutError::Invalid(
                "a shared prefill needs a model with prefill peers (a GPU decoder given its \
                 group)"
                    .into(),
            ));
        }
        let n = prompt.ids.len().saturating_sub(1);
        let d = self.model.config().hidden_size;
        let mut table = self.pool.new_table();
        // This peer's vote: what stops it, if anything, and what it is about to run.
        let mut vote = PrefillVote {
            refusal: None,
            rows: n as u64,
            rows_per_rank: 0,
            prompt: fingerprint(&prompt.ids, prompt.embeddings.as_ref().map_or(0, Vec::len)),
        };
        let local = match checked.and_then(|()| shared_step(prompt, n, d)) {
            Err(e) => Err((e, Refusal::Request)),
            Ok(step) => match self.pool.reserve(&mut table, n) {
                Err(e) => {
                    let needed = self.pool.blocks_needed(&table, n) as u64;
                    let free = self.pool.free_blocks() as u64;
                    Err((e, Refusal::NoRoom { needed, free }))
                }
                Ok(()) => match self.model.prepare_shared(n) {
                    Ok(rows) => Ok((rows, step)),
                    Err(e) => Err((e, Refusal::Model)),
                },
            },
        };
        match &local {
            Ok((rows, _)) => vote.rows_per_rank = *rows as u64,
            Err((_, why)) => vote.refusal = Some(*why),
        }
        let agreed = self.model.gather_peers(&vote.encode()).and_then(|all| {
            let votes = all
                .chunks(PrefillVote::VALUES)
                .map(PrefillVote::decode)
                .collect::<Result<Vec<_>, _>>()?;
            agree(&votes)
        });
        let step = match (agreed, local) {
            (Ok(()), Ok((_, step))) => Ok(step),
            // This peer's own reason in full beside the agreement's summary.
            (Err(e), Err((own, _))) => Err(RolloutError::Invalid(format!("{e} (here: {own})"))),
            (Err(e), Ok(_)) => Err(e),
            // Its own refusal was in its vote, so the agreement cannot pass; kept for safety.
            (Ok(()), Err((own, _))) => Err(own),
        };
        let step = match step {
            Ok(step) if n > 0 => step,
            // Agreed, with nothing to prefill (a one-token prompt), or refused.
            done => {
                self.pool.release(table);
                return done.map(|_| None);
            }
        };
        if let Err(e) = self.model.prefill_shared(&mut self.pool, &step, &table) {
            self.pool.release(table);
            return Err(e);
        }
        self.pool.advance(&mut table, n);
        Ok(Some(table))
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

    /// Schedules and runs one step (module docs); returns what it ran.
    pub fn step(&mut self) -> Result<StepStats, RolloutError> {
        let plan = self.schedule()?;
        if plan.is_empty() {
            return Ok(StepStats::default());
        }
        self.run_plan(&plan)?;
        self.stats.steps += 1;
        let mut st = StepStats {
            seqs: plan.len(),
            ..StepStats::default()
        };
        for u in &plan {
            match *u {
                Unit::Prompt { n, .. } => st.prefill_tokens += n,
                Unit::Sample { n, .. } => st.decode_tokens += n,
            }
        }
        self.collect_finished();
        Ok(st)
    }

    /// Pending tokens of sample j of group g (not yet in its table).
    fn pending(&self, g: usize, j: usize) -> usize {
        let gr = &self.groups[g];
        let s = &gr.samples[j];
        gr.p() + s.ids.len() - s.table.as_ref().map_or(0, BlockTable::len)
    }

    /// Decides this step's units, reserving their KV room; preempts on exhaustion.
    fn schedule(&mut self) -> Result<Vec<Unit>, RolloutError> {
        'retry: loop {
            let mut plan = Vec::new();
            let mut tokens = self.config.max_step_tokens;
            let mut seqs = self.config.max_step_seqs;
            let mut resident: Vec<usize> = (0..self.groups.len())
                .filter(|&g| self.groups[g].stamp.is_some())
                .collect();
            resident.sort_by_key(|&g| self.groups[g].stamp);
            for &g in &resident {
                let units: Vec<Unit> = if self.groups[g].forked {
                    self.groups[g]
                        .running()
                        .map(|j| Unit::Sample {
                            g,
                            j,
                            n: self.pending(g, j),
                        })
                        .collect()
                } else {
                    let gr = &self.groups[g];
                    let cached = gr.prompt_table.as_ref().map_or(0, BlockTable::len);
                    vec![Unit::Prompt {
                        g,
                        n: gr.p() - cached,
                    }]
                };
                for u in units {
                    if tokens == 0 || seqs == 0 {
                        break;
                    }
                    let u = match u {
                        Unit::Prompt { g, n } => Unit::Prompt {
                            g,
                            n: n.min(tokens),
                        },
                        Unit::Sample { g, j, n } => Unit::Sample {
                            g,
                            j,
                            n: n.min(tokens),
                        },
                    };
                    if let Err(e) = self.reserve(u) {
                        let RolloutError::PoolExhausted { .. } = e else {
                            return Err(e);
                        };
                        // The most recently admitted group, but one whose prompt was prefilled
                        // with the peers only when every resident group was.
                        let victim = *resident
                            .iter()
                            .rev()
                            .find(|&&v| !self.groups[v].shared)
                            .or(resident.last())
                            .expect("g is resident");
                        if resident.len() == 1 {
                            return Err(RolloutError::PoolTooSmall {
                                group: self.groups[g].id.0,
                                total: self.pool.total_blocks(),
                            });
                        }
                        self.preempt(victim);
                        continue 'retry;
                    }
                    let n = match u {
                        Unit::Prompt { n, .. } | Unit::Sample { n, .. } => n,
                    };
                    tokens -= n;
                    seqs -= 1;
                    plan.push(u);
                }
            }
            // Admit waiting groups in arrival order while room remains.
            let mut resident_samples: usize = resident
                .iter()
                .map(|&g| self.groups[g].live_samples())
                .sum();
            for g in 0..self.groups.len() {
                if tokens == 0 || seqs == 0 {
                    break;
                }
                let gr = &self.groups[g];
                if gr.stamp.is_some() || gr.done() {
                    continue;
                }
                let alone = resident.is_empty() && plan.is_empty();
                let need = self.pool.blocks_for(gr.p()) + gr.live_samples();
                let fits = need <= self.pool.free_blocks()
                    && resident_samples + gr.live_samples() <= self.config.max_step_seqs;
                if !fits && !alone {
                    break;
                }
                let n = gr.p().min(tokens);
                let mut table = self.pool.new_table();
                if let Err(e) = self.pool.reserve(&mut table, n) {
                    self.pool.release(table);
                    if alone {
                        return Err(RolloutError::PoolTooSmall {
                            group: self.groups[g].id.0,
                            total: self.pool.total_blocks(),
                        });
                    }
                    let RolloutError::PoolExhausted { .. } = e else {
                        return Err(e);
                    };
                    break;
                }
                let gr = &mut self.groups[g];
                gr.admit(table, self.next_stamp);
                self.next_stamp += 1;
                resident_samples += gr.live_samples();
                tokens -= n;
                seqs -= 1;
                plan.push(Unit::Prompt { g, n });
            }
            return Ok(plan);
        }
    }

    fn reserve(&mut self, u: Unit) -> Result<(), RolloutError> {
        let (table, n) = match u {
            Unit::Prompt { g, n } => (self.groups[g].prompt_table.as_mut(), n),
            Unit::Sample { g, j, n } => (self.groups[g].samples[j].table.as_mut(), n),
        };
        let table = table.expect("a scheduled unit holds a table");
        self.pool.reserve(table, n)
    }

    /// Gives back every block of group g; it waits to be recomputed.
    fn preempt(&mut self, g: usize) {
        let gr = &mut self.groups[g];
        if let Some(t) = gr.prompt_table.take() {
            self.pool.release(t);
        }
        for s in &mut gr.samples {
            if let Some(t) = s.table.take() {
                self.pool.release(t);
            }
            if s.state == SeqState::Running {
                s.state = SeqState::Waiting;
            }
        }
        gr.stamp = None;
        gr.forked = false;
        self.stats.preemptions += 1;
        self.stats.shared_preemptions += u64::from(gr.shared);
        // Recomputed alone from now on: no longer a group the peers computed together.
        gr.shared = false;
    }

    /// Runs the planned units as one batched step, then samples (in parallel) and forks.
    fn run_plan(&mut self, plan: &[Unit]) -> Result<(), RolloutError> {
        let Engine {
            model,
            pool,
            groups,
            stats,
            detokenizer,
            ..
        } = self;
        let (d, v) = (model.config().hidden_size, model.config().vocab_size);
        let mut steps = Vec::with_capacity(plan.len());
        let mut tables = Vec::with_capacity(plan.len());
        // The sampling parameters of each logits row, in step order.
        let mut row_params: Vec<SamplingParams> = Vec::new();
        for u in plan {
            let (step, table) = match *u {
                Unit::Prompt { g, n } => {
                    let gr = &groups[g];
                    let t = gr.prompt_table.as_ref().expect("prefilling prompt's table");
                    let r = t.len()..t.len() + n;
                    let input = match &gr.prompt.embeddings {
                        Some(e) => StepInput::Embeddings(&e[r.start * d..r.end * d]),
                        None => StepInput::Tokens(&gr.prompt.ids[r.clone()]),
                    };
                    let positions = match &gr.prompt.mrope {
                        Some(m) => StepPositions::MRope {
                            ids: &m.positions[r.clone()],
                            sections: m.sections,
                        },
                        None => StepPositions::Linear { start: r.start },
                    };
                    let step = SeqStep {
                        input,
                        positions,
                        logits: r.end == gr.p(),
                    };
                    (step, t)
                }
                Unit::Sample { g, j, n } => {
                    let gr = &groups[g];
                    let s = &gr.samples[j];
                    let t = s.table.as_ref().expect("running sample's table");
                    let k = t.len() - gr.p();
                    let step = SeqStep {
                        input: StepInput::Tokens(&s.ids[k..k + n]),
                        positions: StepPositions::Linear {
                            start: gr.pos_base + k,
                        },
                        logits: k + n == s.ids.len(),
                    };
                    (step, t)
                }
            };
            if step.logits {
                let g = match *u {
                    Unit::Prompt { g, .. } | Unit::Sample { g, .. } => g,
                };
                row_params.push(groups[g].params.sampling);
            }
            steps.push(step);
            tables.push(table);
        }
        // Every row's candidates instead of the full rows when the model offers enough of them.
        let k = step_candidates(&row_params, v);
        let logits = if k > 0 && k <= model.max_candidates() {
            let temps: Vec<f32> = row_params.iter().map(logprob_temperature).collect();
            let top = model.forward_step_top(pool, &steps, &tables, k, &temps)?;
            if top.k != k || !top.is_consistent() || top.rows() != row_params.len() {
                return Err(RolloutError::Invalid(format!(
                    "the step returned {} rows of {} candidates, {} rows of {k} expected",
                    top.rows(),
                    top.k,
                    row_params.len()
                )));
            }
            StepLogits::Top(top)
        } else {
            StepLogits::Full(model.forward_step(pool, &steps, &tables)?)
        };
        drop((steps, tables));
        // Advance the tables; list the draws (group, sample, logits row) in plan order: every
        // new sample of a finished prompt draws from its last row, a caught-up sample from its.
        let mut draws: Vec<(usize, usize, usize)> = Vec::new();
        let mut row = 0;
        for u in plan {
            match *u {
                Unit::Prompt { g, n } => {
                    let gr = &mut groups[g];
                    let t = gr.prompt_table.as_mut().expect("prompt table");
                    pool.advance(t, n);
                    stats.prefill_tokens += n as u64;
                    if t.len() < gr.p() {
                        continue;
                    }
                    for (j, s) in gr.samples.iter().enumerate() {
                        if s.state == SeqState::Running && s.ids.is_empty() {
                            draws.push((g, j, row));
                        }
                    }
                    row += 1;
                }
                Unit::Sample { g, j, n } => {
                    let gr = &mut groups[g];
                    let t = gr.samples[j].table.as_mut().expect("sample table");
                    pool.advance(t, n);
                    stats.decode_tokens += n as u64;
                    if t.len() < gr.p() + gr.samples[j].ids.len() {
                        continue;
                    }
                    draws.push((g, j, row));
                    row += 1;
                }
            }
        }
        let full_rows_ok = match logits {
            StepLogits::Full(z) => z.len() == row * v,
            StepLogits::Top(_) => true,
        };
        if !full_rows_ok || logits.rows(v) != row || row != row_params.len() {
            return Err(RolloutError::Invalid(format!(
                "the step returned {} logits rows, {row} rows of {v} expected",
                logits.rows(v)
            )));
        }
        // Draw in parallel, each sample with its own generator (taken out and put back).
        let mut jobs: Vec<(reel_tensor::Rng, SamplingParams, usize)> = draws
            .iter()
            .map(|&(g, j, row)| {
                let gr = &mut groups[g];
                let rng = std::mem::replace(&mut gr.samples[j].rng, reel_tensor::rng(0));
                (rng, gr.params.sampling, row)
            })
            .collect();
        let picked: Vec<(u32, f32)> = jobs
            .par_iter_mut()
            .map(|(rng, p, row)| pick(logits.row(*row, v), p, rng))
            .collect();
        for (&(g, j, _), (rng, _, _)) in draws.iter().zip(jobs) {
            groups[g].samples[j].rng = rng;
        }
        let mut picked = picked.into_iter();
        for u in plan {
            match *u {
                Unit::Prompt { g, .. } => {
                    let gr = &mut groups[g];
                    let t = gr.prompt_table.as_ref().expect("prompt table");
                    if t.len() < gr.p() {
                        continue;
                    }
                    let table = gr.prompt_table.take().expect("prompt table");
                    for j in 0..gr.samples.len() {
                        if gr.samples[j].state != SeqState::Running {
                            continue;
                        }
                        if gr.samples[j].ids.is_empty() {
                            let (tok, lp) = picked.next().expect("a draw per new sample");
                            record_token(gr, j, tok, lp, detokenizer, stats);
                        }
                        if gr.samples[j].state == SeqState::Running {
                            gr.samples[j].table = Some(pool.fork(&table));
                            stats.forks += 1;
                        }
                    }
                    pool.release(table);
                    gr.forked = true;
                }
                Unit::Sample { g, j, .. } => {
                    let gr = &mut groups[g];
                    let s = &gr.samples[j];
                    let t = s.table.as_ref().expect("sample table");
                    if t.len() < gr.p() + s.ids.len() {
                        continue;
                    }
                    let (tok, lp) = picked.next().expect("a draw per caught-up sample");
                    record_token(gr, j, tok, lp, detokenizer, stats);
                    if gr.samples[j].state != SeqState::Running {
                        let t = gr.samples[j].table.take().expect("sample table");
                        pool.release(t);
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves finished groups' outputs to `finished`.
    fn collect_finished(&mut self) {
        let mut g = 0;
        while g < self.groups.len() {
            if !self.groups[g].done() {
                g += 1;
                continue;
            }
            let gr = self.groups.remove(g);
            debug_assert!(gr.prompt_table.is_none());
            let samples = gr
                .samples
                .into_iter()
                .map(|s| {
                    debug_assert!(s.table.is_none());
                    sample_output(s.ids, s.logprobs, s.state, s.seed)
                })
                .collect();
            self.finished.push(GroupOutput {
                id: gr.id,
                prompt_len: gr.prompt.ids.len(),
                samples,
            });
        }
    }
}

/// Checks a group's request against the model before it is queued (sizes, token ids, prompt
/// embeddings and M-RoPE positions, sampling parameters, stop strings), so a bad request never
/// fails a later step; returns the position of its first generated token. Shared by [`Engine`]
/// and [`crate::sharded::ShardedEngine`].
/// The step of a shared prefill of `prompt`'s first `n` rows (`d` values an embedding row).
fn shared_step(prompt: &Prompt, n: usize, d: usize) -> Result<SeqStep<'_>, RolloutError> {
    let input = match &prompt.embeddings {
        Some(e) if e.len() >= n * d => StepInput::Embeddings(&e[..n * d]),
        Some(e) => {
            return Err(RolloutError::Invalid(format!(
                "prompt of {} tokens has {} input-embedding values, not rows of {d}",
                prompt.ids.len(),
                e.len()
            )))
        }
        None => StepInput::Tokens(&prompt.ids[..n]),
    };
    let positions = match &prompt.mrope {
        Some(m) if m.positions.len() > n => StepPositions::MRope {
            ids: &m.positions[..n],
            sections: m.sections,
        },
        Some(m) => {
            return Err(RolloutError::Invalid(format!(
                "prompt of {} tokens has {} M-RoPE positions",
                prompt.ids.len(),
                m.positions.len()
            )))
        }
        None => StepPositions::Linear { start: 0 },
    };
    Ok(SeqStep {
        input,
        positions,
        logits: false,
    })
}

pub(crate) fn check_group(
    c: &Qwen2Config,
    id: GroupId,
    prompt: &Prompt,
    g: usize,
    params: &GenerationParams,
    has_detokenizer: bool,
) -> Result<usize, RolloutError> {
    let bad = |msg: String| RolloutError::Invalid(format!("group {id}: {msg}"));
    let p = prompt.ids.len();
    if g == 0 {
        return Err(bad("a group needs at least one sample".into()));
    }
    if p == 0 || p > c.max_position_embeddings {
        return Err(bad(format!(
            "the prompt has {p} tokens; the model takes 1 to {}",
            c.max_position_embeddings
        )));
    }
    if let Some(&t) = prompt.ids.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(bad(format!(
            "token id {t} is outside the vocabulary ({})",
            c.vocab_size
        )));
    }
    if let Some(e) = &prompt.embeddings {
        if e.len() != p * c.hidden_size {
            return Err(bad(format!(
                "prompt embeddings have {} values, [{p}, {}] needs {}",
                e.len(),
                c.hidden_size,
                p * c.hidden_size
            )));
        }
    }
    if let Some(m) = &prompt.mrope {
        if m.positions.len() != p {
            return Err(bad(format!(
                "{} M-RoPE positions for {p} prompt tokens",
                m.positions.len()
            )));
        }
        if m.sections.iter().sum::<usize>() != c.head_dim / 2 {
            return Err(bad(format!(
                "M-RoPE sections {:?} must sum to head_dim / 2 = {}",
                m.sections,
                c.head_dim / 2
            )));
        }
        if let Some(q) = m
            .positions
            .iter()
            .flatten()
            .find(|&&q| q as usize >= c.max_position_embeddings)
        {
            return Err(bad(format!(
                "M-RoPE position {q} exceeds max_position_embeddings ({})",
                c.max_position_embeddings
            )));
        }
    }
    let pos_base = prompt.next_position();
    if pos_base > c.max_position_embeddings {
        return Err(bad(format!(
            "prompt positions reach {} but max_position_embeddings is {}",
            pos_base - 1,
            c.max_position_embeddings
        )));
    }
    let s = &params.sampling;
    if !(s.temperature.is_finite() && s.temperature >= 0.0 && s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(bad(format!(
            "temperature must be finite and ≥ 0 and top_p in (0, 1]; got {} and {}",
            s.temperature, s.top_p
        )));
    }
    if !params.stop_strings.is_empty() && !has_detokenizer {
        return Err(bad(
            "stop strings need a detokenizer (Engine::with_detokenizer)".into(),
        ));
    }
    if params.stop_strings.iter().any(String::is_empty) {
        return Err(bad("an empty stop string".into()));
    }
    Ok(pos_base)
}

/// Records sample j's drawn token and its log-probability and checks the stop conditions (in
/// order: stop token, stop string, max_new_tokens, context).
fn record_token(
    gr: &mut Group,
    j: usize,
    tok: u32,
    logprob: f32,
    detok: &Option<Detokenizer>,
    stats: &mut EngineStats,
) {
    let params = &gr.params;
    let s = &mut gr.samples[j];
    s.ids.push(tok);
    s.logprobs.push(logprob);
    stats.sampled_tokens += 1;
    if let Some(reason) = finish_reason(params, &s.ids, gr.pos_base, gr.max_pos, detok) {
        s.state = SeqState::Finished { reason };
    }
}

/// Why a group stops before generating anything, if it does: nothing to generate
/// (`max_new_tokens` 0), or its first generated token would be past the context (`pos_base` is
/// that token's position, `max_pos` the model's max_position_embeddings).
pub(crate) fn finish_before_start(
    params: &GenerationParams,
    pos_base: usize,
    max_pos: usize,
) -> Option<FinishReason> {
    if params.max_new_tokens == 0 {
        Some(FinishReason::MaxTokens)
    } else if pos_base >= max_pos {
        Some(FinishReason::ContextFull)
    } else {
        None
    }
}

/// The output of a finished sample (its state must be `Finished`: a done group's samples are).
pub(crate) fn sample_output(
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    state: SeqState,
    seed: u64,
) -> SampleOutput {
    let SeqState::Finished { reason } = state else {
        unreachable!("a done group's samples are finished")
    };
    SampleOutput {
        ids,
        logprobs,
        finish: reason,
        seed,
    }
}

/// Why a sample whose generated ids are `ids` (the newest last) stops now, if it does; checked
/// in order: stop token, stop string, max_new_tokens, context (`pos_base` is the position of its
/// first generated token, `max_pos` the model's max_position_embeddings).
pub(crate) fn finish_reason(
    params: &GenerationParams,
    ids: &[u32],
    pos_base: usize,
    max_pos: usize,
    detok: &Option<Detokenizer>,
) -> Option<FinishReason> {
    let tok = *ids.last()?;
    if params.stop_token_ids.contains(&tok) {
        Some(FinishReason::StopToken(tok))
    } else if let Some(i) = stop_string_hit(ids, &params.stop_strings, detok) {
        Some(FinishReason::StopString(i))
    } else if ids.len() >= params.max_new_tokens {
        Some(FinishReason::MaxTokens)
    } else if pos_base + ids.len() >= max_pos {
        Some(FinishReason::ContextFull)
    } else {
        None
    }
}

/// Index of the first stop string in the text of the last generated tokens. The window holds
/// one more token than the longest stop string has bytes (every token decodes to ≥ 1 byte but
/// special ones), so a stop string ending in the newest token is always inside it.
fn stop_string_hit(ids: &[u32], stops: &[String], detok: &Option<Detokenizer>) -> Option<usize> {
    let f = detok.as_ref()?;
    let longest = stops.iter().map(String::len).max()?;
    let text = f(&ids[ids.len().saturating_sub(longest + 1)..]);
    stops.iter().position(|s| text.contains(s.as_str()))
}
