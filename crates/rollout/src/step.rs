//! What the engine runs each step: one continuous-batching forward of the model over the KV
//! block pool (`Qwen2::forward_step`'s contract: stacked rows of every sequence, prefill chunks and
//! decode tokens; logits [S_l, V] of the sequences that ask for them, in step order).
//!
//! [`StepModel`] is the one seam between the engine's scheduling and sampling and the device
//! that runs the model: [`CpuStep`] runs the CPU model over a host pool ([`crate::kv::PagedKv`]);
//! reel-cuda's `GpuDecoder` runs the same step on a GPU, the pool's block data on the device
//! (the pool keeps tables and reference counts on the host; its copies on write are queued and
//! carried out on the device before the step writes).

use crate::kv::PagedKv;
use crate::pool::{BlockPool, BlockTable, KvLayout};
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
