//! What the engine runs each step: one continuous-batching forward of the model over the KV
//! block pool (`Qwen2::forward_step`'s contract: stacked rows of every sequence, prefill chunks and
//! decode tokens; logits [S_l, V] of the sequences that ask for them, in step order).
//!
//! [`StepModel`] is the one seam between the engine's scheduling and sampling and the device
//! that runs the model: [`CpuStep`] runs the CPU model over a host pool ([`crate::kv::PagedKv`]);
//! reel-cuda's `GpuDecoder` runs the same step on a GPU, the pool's block data on the device
//! (the pool keeps tables and reference counts on the host; its copies on write are queued and
//! carried out on the device before the step writes). A model may also return each logits row's
//! best candidates instead of the row ([`StepModel::forward_step_top`]; the engine asks when its
//! sampling allows, `crate::sample`).

use crate::kv::PagedKv;
use crate::pool::{BlockPool, BlockTable, KvLayout};
use crate::sample::TopRows;
use crate::RolloutError;
use reel_model::decode::{DecodeScratch, SeqStep};
use reel_model::{Qwen2, Qwen2Config};

/// A model the engine can step (module docs).
pub trait StepModel {
    /// The decoder's configuration (vocabulary, context, heads).
    fn config(&self) -> &Qwen2Config;

    /// The block pool for `layout` (a host pool, or a pool of tables whose data this model keeps
    /// on its device, allocated here).
    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError>;

    /// Runs one step: sequence s feeds `steps[s]`, its keys and values go after `tables[s]`'s
    /// length (room reserved by the caller, who advances the tables afterwards). Returns the
    /// logits [S_l, V] of the sequences with `logits: true`, in their order.
    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError>;

    /// The most candidates per row [`StepModel::forward_step_top`] returns; 0 (the default)
    /// when the model returns full rows only.
    fn max_candidates(&self) -> usize {
        0
    }

    /// Runs one step as [`StepModel::forward_step`] but returns, of each logits row r, only its
    /// `k` best ids and logits (sorted in `reel_model::generate::rank_order`), its max m and
    /// Σ exp((z − m)/τ_r) with τ_r = `temperatures[r]` > 0 (one per logits row, in step order).
    /// k ≤ [`StepModel::max_candidates`] and k ≤ V.
    fn forward_step_top(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
        k: usize,
        temperatures: &[f32],
    ) -> Result<TopRows<'_>, RolloutError> {
        let _ = (pool, steps, tables, k, temperatures);
        Err(RolloutError::Invalid(
            "this model returns full logits rows only (max_candidates is 0)".into(),
        ))
    }

    /// Frees what the model holds for the pool it made and the steps over it (a GPU decoder's
    /// KV blocks and step buffers); the engine that asked for the pool calls it when dropped, so
    /// a trainer's passes after the rollout find that memory free. Nothing by default.
    fn release_pool(&mut self) {}

    /// The peers this model prefills prompts with ([`StepModel::prefill_shared`]): its rank
    /// and their number; `None` (the default) when it has none.
    fn prefill_peers(&self) -> Option<(usize, usize)> {
        None
    }

    /// Readies the model for a shared prefill of `rows` rows (a GPU decoder's step buffers,
    /// say), before the peers agree to run it (`crate::shared_prefill`, "Agreement"); returns
    /// the rows a rank runs per segment ([`crate::shared_prefill::segments`]), which every
    /// peer must use alike. Not a collective.
    fn prepare_shared(&mut self, rows: usize) -> Result<usize, RolloutError> {
        let _ = rows;
        Err(RolloutError::Invalid(
            "this model has no peers to prefill a prompt with".into(),
        ))
    }

    /// Gives every peer each peer's `values` (the same length on every peer), concatenated in
    /// rank order: the shared prefill's agreement. A collective over the prefill peers.
    fn gather_peers(&mut self, values: &[f32]) -> Result<Vec<f32>, RolloutError> {
        let _ = values;
        Err(RolloutError::Invalid(
            "this model has no peers to prefill a prompt with".into(),
        ))
    }

    /// Prefills `step` — a prompt's rows from its first, into `table` (empty, room reserved
    /// for them) — together with the model's peers, split as
    /// [`crate::shared_prefill::PrefillSplit`]: afterwards the table's blocks hold every row's
    /// keys and values (the caller advances it). No logits. A collective: every peer calls it
    /// with the same rows, its calls in the same order as every other peer's.
    fn prefill_shared(
        &mut self,
        pool: &mut BlockPool,
        step: &SeqStep,
        table: &BlockTable,
    ) -> Result<(), RolloutError> {
        let _ = (pool, step, table);
        Err(RolloutError::Invalid(
            "this model has no peers to prefill a prompt with".into(),
        ))
    }
}

impl<T: StepModel + ?Sized> StepModel for &mut T {
    fn config(&self) -> &Qwen2Config {
        (**self).config()
    }

    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
        (**self).new_pool(layout)
    }

    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError> {
        (**self).forward_step(pool, steps, tables)
    }

    fn max_candidates(&self) -> usize {
        (**self).max_candidates()
    }

    fn forward_step_top(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
        k: usize,
        temperatures: &[f32],
    ) -> Result<TopRows<'_>, RolloutError> {
        (**self).forward_step_top(pool, steps, tables, k, temperatures)
    }

    fn release_pool(&mut self) {
        (**self).release_pool()
    }

    fn prefill_peers(&self) -> Option<(usize, usize)> {
        (**self).prefill_peers()
    }

    fn prepare_shared(&mut self, rows: usize) -> Result<usize, RolloutError> {
        (**self).prepare_shared(rows)
    }

    fn gather_peers(&mut self, values: &[f32]) -> Result<Vec<f32>, RolloutError> {
        (**self).gather_peers(values)
    }

    fn prefill_shared(
        &mut self,
        pool: &mut BlockPool,
        step: &SeqStep,
        table: &BlockTable,
    ) -> Result<(), RolloutError> {
        (**self).prefill_shared(pool, step, table)
    }
}

/// The CPU model over a host pool: `Qwen2::forward_step` with [`PagedKv`] as its store.
pub struct CpuStep<'m> {
    model: &'m Qwen2,
    scratch: DecodeScratch,
}

impl<'m> CpuStep<'m> {
    /// Steps `model`, reading its weights in place.
    pub fn new(model: &'m Qwen2) -> Self {
        CpuStep {
            model,
            scratch: DecodeScratch::default(),
        }
    }
}

impl StepModel for CpuStep<'_> {
    fn config(&self) -> &Qwen2Config {
        &self.model.config
    }

    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
        BlockPool::new(layout)
    }

    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError> {
        let mut kv = PagedKv {
            pool,
            tables: tables.to_vec(),
        };
        Ok(self.model.forward_step(&mut self.scratch, steps, &mut kv)?)
    }
}
