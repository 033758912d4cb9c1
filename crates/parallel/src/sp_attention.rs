//! [`SpAttention`]: sequence-parallel attention behind the model's [`AttentionOp`], so a model
//! replica on each rank runs its layers unchanged on its token shard.
//!
//! Per rank: the model calls `forward(out, lse, q, k, v, shape)` with its local q `[B, L, H, D]`,
//! k and v `[B, L, H_kv, D]` (`shape.tq = shape.tk = L`, rows in the layout's order, RoPE already
//! applied at global positions by the caller) and gets its local out and lse; `backward` gives its
//! local dq, dk, dv. The adapter owns this rank's communicator (the sequence-parallel group) behind
//! a mutex, because `AttentionOp` is `Send + Sync` with `&self` methods and a communicator is only
//! `Send`; one call runs at a time, and every rank must make the same calls in the same order.
//!
//! The model's shape does not say how many of the L local rows are padding, so the trainer
//! announces each batch's global length with [`SpAttention::set_seq_len`], which also returns the
//! [`Sharding`] to cut tokens, targets and positions with. Executors are cached per (T, shape).

use std::sync::{Arc, Mutex, MutexGuard};

use reel_comm::Communicator;
use reel_kernels::attention::AttnShape;
use reel_model::{AttentionError, AttentionOp, PackedRow};

use crate::dist_exec::{DistExecError, DistExecutor, ExecStats, Overlap};
use crate::schedule::Schedule;
use crate::shard::Sharding;

/// Totals of this rank's calls since creation or [`SpAttention::reset_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SpStats {
    pub forward_calls: usize,
    pub backward_calls: usize,
    pub forward: ExecStats,
    pub backward: ExecStats,
}

struct SpState<C> {
    comm: C,
    sharding: Option<Sharding>,
    /// The announced batch's packed-row layout (None: plain causal rows).
    packed: Option<Arc<[PackedRow]>>,
    exec: Option<DistExecutor>,
    stats: SpStats,
}

/// One rank's distributed causal attention (see the module docs).
pub struct SpAttention<C: Communicator> {
    schedule: Schedule,
    overlap: Overlap,
    state: Mutex<SpState<C>>,
}

impl<C: Communicator> SpAttention<C> {
    /// `comm` is this rank's sequence-parallel group; `schedule` must be causal (the model's
    /// attention is) and over `comm.world_size()` ranks.
    pub fn new(comm: C, schedule: Schedule, overlap: Overlap) -> Result<Self, DistExecError> {
        schedule.validate()?;
        if !schedule.causal() {
            return Err(DistExecError::Shape(format!(
                "the model's attention is causal; {:?} is not",
                schedule.kind
            )));
        }
        if comm.world_size() != schedule.ranks {
            return Err(DistExecError::WorldSize {
                size: comm.world_size(),
                ranks: schedule.ranks,
            });
        }
        Ok(SpAttention {
            schedule,
            overlap,
            state: Mutex::new(SpState {
                comm,
                sharding: None,
                packed: None,
                exec: None,
                stats: SpStats::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SpState<C>> {
        // A panic inside a call leaves nothing half-written that a later call reads.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Announces the global (unpadded) length T of the coming batch's sequences; returns the
    /// sharding the batch's tokens, targets and positions must be cut with (`local_len()` is the
    /// model's T on this rank, `positions(rank)` its RoPE positions, `valid_mask(rank)` its real
    /// tokens).
    pub fn set_seq_len(&self, seq_len: usize) -> Result<Sharding, DistExecError> {
        let sharding = Sharding::new(seq_len, self.schedule.ranks, self.schedule.layout())?;
        let mut st = self.lock();
        st.sharding = Some(sharding);
        st.packed = None;
        Ok(sharding)
    }

    /// Announces that the batch of the last [`SpAttention::set_seq_len`] holds rows packed by
    /// prompt, batch row b laid out as `rows[b]` over its global positions (segments see the
    /// shared prefix and themselves; `reel_model::SharedPrefixAttention` is the one-rank
    /// equivalent). The next `set_seq_len` returns to plain causal rows.
    pub fn set_packed(&self, rows: Vec<PackedRow>) -> Result<(), DistExecError> {
        let mut st = self.lock();
        let Some(sharding) = st.sharding else {
            return Err(DistExecError::Shape(
                "call SpAttention::set_seq_len before set_packed".into(),
            ));
        };
        for (b, row) in rows.iter().enumerate() {
            row.check(sharding.seq_len())
                .map_err(|e| DistExecError::Shape(format!("packed row {b}: {e}")))?;
        }
        st.packed = Some(rows.into());
        Ok(())
    }

    /// The sharding of the last [`SpAttention::set_seq_len`].
    pub fn sharding(&self) -> Option<Sharding> {
        self.lock().sharding
    }

    pub fn stats(&self) -> SpStats {
        self.lock().stats
    }

    pub fn reset_stats(&self) {
        self.lock().stats = SpStats::default();
    }

    /// Runs `f` with the communicator (e.g. to read its byte counters); not while a call runs.
    pub fn with_comm<R>(&self, f: impl FnOnce(&C) -> R) -> R {
        f(&self.lock().comm)
    }

    /// Gives the communicator back.
    pub fn into_comm(self) -> C {
        self.state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .comm
    }

    /// The executor for the current sharding and `shape`, built on first use.
    fn executor<'s>(
        &self,
        exec: &'s mut Option<DistExecutor>,
        sharding: Option<Sharding>,
        packed: &Option<Arc<[PackedRow]>>,
        shape: AttnShape,
    ) -> Result<&'s DistExecutor, DistExecError> {
        let Some(sharding) = sharding else {
            return Err(DistExecError::Shape(
                "call SpAttention::set_seq_len with the batch's global length first".into(),
            ));
        };
        let fresh = exec
            .as_ref()
            .is_none_or(|e| e.sharding() != sharding || e.local_shape() != shape);
        if fresh {
            *exec = Some(DistExecutor::new(
                self.schedule.clone(),
                sharding,
                shape,
                self.overlap,
            )?);
        }
        let e = exec.as_mut().expect("just built");
        e.set_packed(packed.clone())?;
        Ok(e)
    }
}

impl<C: Communicator> AttentionOp for SpAttention<C> {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let exec = self.executor(&mut st.exec, st.sharding, &st.packed, shape)?;
        let s = exec.forward(&st.comm, out, lse, q, k, v)?;
        st.stats.forward_calls += 1;
        st.stats.forward = st.stats.forward + s;
        Ok(())
    }

    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let exec = self.executor(&mut st.exec, st.sharding, &st.packed, shape)?;
        let s = exec.backward(&st.comm, dq, dk, dv, dout, q, k, v, out, lse)?;
        st.stats.backward_calls += 1;
        st.stats.backward = st.stats.backward + s;
        Ok(())
    }
}
