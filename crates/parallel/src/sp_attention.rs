//! [`SpAttention`]: sequence-parallel attention behind the model's [`AttentionOp`], so a model
//! replica on each rank runs its layers unchanged on its token shard.
//!
//! Two methods ([`SpMethod`]): a ring-family [`Schedule`] (DistAttn, ring, zigzag) carried out by
//! a [`DistExecutor`], or Ulysses and its 2-D hybrid ([`UlyssesGrid`], u × r ranks: all-to-all
//! over heads inside groups of u, a ring over the r groups) carried out by
//! [`UlyssesAttention`]. Under Ulysses tokens are cut contiguously over the P ranks (padding at
//! the end) and the model's heads must split over u (`u | H_kv`, refused otherwise with the
//! hybrid's u suggested); packed rows ([`SpAttention::set_packed`]) take a ring-family schedule.
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
use crate::shard::{Layout, Sharding};
use crate::ulysses::{Causality, UlyssesAttention, UlyssesGrid, UlyssesGroups};

/// How a sequence-parallel group computes attention.
#[derive(Clone, Debug, PartialEq)]
pub enum SpMethod {
    /// A ring-family schedule over the group (its layout cuts the tokens), run by a
    /// [`DistExecutor`].
    Schedule(Schedule),
    /// Ulysses (`u = P`, r = 1) or its hybrid (`u × r = P`): contiguous token shards.
    Ulysses(UlyssesGrid),
}

impl SpMethod {
    /// P, the ranks of the group.
    pub fn ranks(&self) -> usize {
        match self {
            SpMethod::Schedule(s) => s.ranks,
            SpMethod::Ulysses(g) => g.ranks(),
        }
    }

    /// How tokens are cut over the ranks.
    pub fn layout(&self) -> Layout {
        match self {
            SpMethod::Schedule(s) => s.layout(),
            SpMethod::Ulysses(_) => Layout::Contiguous,
        }
    }

    /// The sharding of a length-`seq_len` batch.
    pub fn sharding(&self, seq_len: usize) -> Result<Sharding, DistExecError> {
        Ok(Sharding::new(seq_len, self.ranks(), self.layout())?)
    }
}

/// Totals of this rank's calls since creation or [`SpAttention::reset_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SpStats {
    pub forward_calls: usize,
    pub backward_calls: usize,
    pub forward: ExecStats,
    pub backward: ExecStats,
}

/// The executor of the method, built for the current sharding and shape on first use.
enum Engine<C> {
    Dist(Option<DistExecutor>),
    Ulysses {
        groups: UlyssesGroups<C>,
        attn: Option<UlyssesAttention>,
    },
}

struct SpState<C> {
    comm: C,
    sharding: Option<Sharding>,
    /// The announced batch's packed-row layout (None: plain causal rows).
    packed: Option<Arc<[PackedRow]>>,
    engine: Engine<C>,
    stats: SpStats,
}

/// One rank's distributed causal attention (see the module docs).
pub struct SpAttention<C: Communicator> {
    method: SpMethod,
    overlap: Overlap,
    state: Mutex<SpState<C>>,
}

impl<C: Communicator> SpAttention<C> {
    /// `comm` is this rank's sequence-parallel group; `schedule` must be causal (the model's
    /// attention is) and over `comm.world_size()` ranks.
    pub fn new(comm: C, schedule: Schedule, overlap: Overlap) -> Result<Self, DistExecError> {
        Self::with_method(comm, SpMethod::Schedule(schedule), overlap)
    }

    /// `comm` is this rank's sequence-parallel group of `method.ranks()` ranks. Under
    /// [`SpMethod::Ulysses`] it is split once here into the rank's all-to-all group and ring
    /// (collective: every rank of `comm` calls this together); `overlap` is the ring-family
    /// executor's (the Ulysses ring always posts its next message before computing).
    pub fn with_method(comm: C, method: SpMethod, overlap: Overlap) -> Result<Self, DistExecError> {
        if comm.world_size() != method.ranks() {
            return Err(DistExecError::WorldSize {
                size: comm.world_size(),
                ranks: method.ranks(),
            });
        }
        let engine = match &method {
            SpMethod::Schedule(schedule) => {
                schedule.validate()?;
                if !schedule.causal() {
                    return Err(DistExecError::Shape(format!(
                        "the model's attention is causal; {:?} is not",
                        schedule.kind
                    )));
                }
                Engine::Dist(None)
            }
            SpMethod::Ulysses(grid) => Engine::Ulysses {
                groups: UlyssesGroups::split(&comm, *grid)?,
                attn: None,
            },
        };
        Ok(SpAttention {
            method,
            overlap,
            state: Mutex::new(SpState {
                comm,
                sharding: None,
                packed: None,
                engine,
                stats: SpStats::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SpState<C>> {
        // A panic inside a call leaves nothing half-written that a later call reads.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn method(&self) -> &SpMethod {
        &self.method
    }

    /// Announces the global (unpadded) length T of the coming batch's sequences; returns the
    /// sharding the batch's tokens, targets and positions must be cut with (`local_len()` is the
    /// model's T on this rank, `positions(rank)` its RoPE positions, `valid_mask(rank)` its real
    /// tokens).
    pub fn set_seq_len(&self, seq_len: usize) -> Result<Sharding, DistExecError> {
        let sharding = self.method.sharding(seq_len)?;
        let mut st = self.lock();
        st.sharding = Some(sharding);
        st.packed = None;
        Ok(sharding)
    }

    /// Announces that the batch of the last [`SpAttention::set_seq_len`] holds rows packed by
    /// prompt, batch row b laid out as `rows[b]` over its global positions (segments see the
    /// shared prefix and themselves; `reel_model::SharedPrefixAttention` is the one-rank
    /// equivalent). The next `set_seq_len` returns to plain causal rows.
    /// Ulysses refuses packed rows (its all-to-all and ring run plain causal blocks).
    pub fn set_packed(&self, rows: Vec<PackedRow>) -> Result<(), DistExecError> {
        if let SpMethod::Ulysses(grid) = self.method {
            return Err(DistExecError::Shape(format!(
                "rows packed by prompt need a ring-family schedule; Ulysses ({} × {}) runs \
                 plain causal rows",
                grid.ulysses(),
                grid.ring()
            )));
        }
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
        let SpMethod::Schedule(schedule) = &self.method else {
            unreachable!("a ring-family engine runs a schedule");
        };
        let sharding = announced(sharding)?;
        let fresh = exec
            .as_ref()
            .is_none_or(|e| e.sharding() != sharding || e.local_shape() != shape);
        if fresh {
            *exec = Some(DistExecutor::new(
                schedule.clone(),
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

fn announced(sharding: Option<Sharding>) -> Result<Sharding, DistExecError> {
    sharding.ok_or_else(|| {
        DistExecError::Shape(
            "call SpAttention::set_seq_len with the batch's global length first".into(),
        )
    })
}

/// The Ulysses attention of the current sharding and the model's local `shape` (`tq = tk = L`),
/// built on first use.
fn ulysses_attn(
    attn: &mut Option<UlyssesAttention>,
    grid: UlyssesGrid,
    sharding: Option<Sharding>,
    shape: AttnShape,
) -> Result<UlyssesAttention, DistExecError> {
    let sharding = announced(sharding)?;
    let l = sharding.local_len();
    if shape.tq != l || shape.tk != l {
        return Err(DistExecError::Shape(format!(
            "Ulysses: the model's {} × {} local tokens are not the {l} rows per rank of a \
             length-{} sequence over {} ranks",
            shape.tq,
            shape.tk,
            sharding.seq_len(),
            sharding.ranks()
        )));
    }
    let global = AttnShape {
        tq: sharding.seq_len(),
        tk: sharding.seq_len(),
        ..shape
    };
    match attn {
        Some(a) if a.local_shape() == shape && a.sharding() == sharding => Ok(*a),
        _ => {
            let a = UlyssesAttention::new(grid, global, Causality::Causal)?;
            *attn = Some(a);
            Ok(a)
        }
    }
}

/// This pass's traffic from the groups' counters (`before` read at its start); Ulysses counts
/// messages and bytes, not blocks or time.
fn ulysses_stats(before: reel_comm::CommStats, after: reel_comm::CommStats) -> ExecStats {
    let d = |f: fn(&reel_comm::CommStats) -> u64| f(&after) - f(&before);
    ExecStats {
        messages_sent: d(|s| s.send.calls + s.all_to_all.calls) as usize,
        bytes_sent: d(|s| s.total().bytes_sent),
        bytes_recv: d(|s| s.total().bytes_recv),
        ..ExecStats::default()
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
        let s = match &mut st.engine {
            Engine::Dist(exec) => {
                let exec = self.executor(exec, st.sharding, &st.packed, shape)?;
                exec.forward(&st.comm, out, lse, q, k, v)?
            }
            Engine::Ulysses { groups, attn } => {
                let a = ulysses_attn(attn, groups.grid(), st.sharding, shape)?;
                let before = groups.stats();
                a.forward(groups, out, lse, q, k, v)
                    .map_err(DistExecError::from)?;
                ulysses_stats(before, groups.stats())
            }
        };
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
        let s = match &mut st.engine {
            Engine::Dist(exec) => {
                let exec = self.executor(exec, st.sharding, &st.packed, shape)?;
                exec.backward(&st.comm, dq, dk, dv, dout, q, k, v, out, lse)?
            }
            Engine::Ulysses { groups, attn } => {
                let a = ulysses_attn(attn, groups.grid(), st.sharding, shape)?;
                let before = groups.stats();
                a.backward(groups, dq, dk, dv, dout, q, k, v, out, lse)
                    .map_err(DistExecError::from)?;
                ulysses_stats(before, groups.stats())
            }
        };
        st.stats.backward_calls += 1;
        st.stats.backward = st.stats.backward + s;
        Ok(())
    }
}
