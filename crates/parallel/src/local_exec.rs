//! Single-process executor of a [`Schedule`] with the real kernels: the proof that a schedule is
//! exact before any communication exists.
//!
//! q `[B, T, H, D]`, k and v `[B, T, H_kv, D]` (f32) are sharded over the schedule's P ranks with
//! its [`Layout`](crate::shard::Layout) (padded to a multiple of P or 2P), cut into chunks, and each step's block products
//! run in order. "Sending" is indexing: a rank reads any chunk from its home's shard. What the
//! schedule returns is honoured, though: helpers' partials stay with the helper until their
//! `Partial` message is delivered, and off-home dK/dV accumulators move only with `KvGrad`
//! messages, so the result depends on the schedule's messages and not only on its work lists
//! (a schedule missing one is refused up front by [`Schedule::validate`]).
//!
//! Forward: each block gives f32 `(o_b, lse_b)` from `attention_forward`; the owner folds them into
//! its running `(o, lse)` with `attention_merge` (DESIGN.md "Attention math"). Backward: D =
//! rowsum(dO ∘ O) of each query chunk is computed once from the global out (`attention_delta`);
//! each block calls `attention_backward_with_delta` with it and the global lse, accumulating dQ at
//! the computing rank and dK/dV (H_kv heads only) at the rank holding the KV. Blocks see only the
//! valid prefix of each chunk (padding is the tail of the sequence), with
//! `AttnMask::Causal { q_offset, k_offset }` at global offsets for diagonal blocks.
//!
//! Bf16 would need the kernel to write f32 partials; this executor is f32 only.
//!
//! Block products, masks, merges and chunk rows are `blocks.rs`'s, shared with
//! [`DistExecutor`](crate::dist_exec::DistExecutor).

use std::collections::HashMap;

use reel_kernels::attention::AttnShape;
use thiserror::Error;

use crate::blocks::{add, merge, Blocks, OutLse};
use crate::schedule::{Message, Payload, Schedule, ScheduleError};
use crate::shard::{ShardError, Sharding};

/// Why the executor refused its inputs.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ExecError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("local executor: {0}")]
    Shape(String),
    #[error("local executor: {name} has {len} elements, expected {expected}")]
    Length {
        name: &'static str,
        len: usize,
        expected: usize,
    },
}

/// dq `[B, T, H, D]`, dk and dv `[B, T, H_kv, D]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Runs one validated schedule over sequences of `shape.tq == shape.tk` tokens.
#[derive(Clone, Debug)]
pub struct LocalExecutor {
    schedule: Schedule,
    sharding: Sharding,
    shape: AttnShape,
    blocks: Blocks,
}

/// A tensor cut into its chunks' valid rows: `chunks[c]` is `[B, valid_len(c), width]`.
struct Chunked {
    chunks: Vec<Vec<f32>>,
}

impl LocalExecutor {
    /// Validates the schedule and the shape (`tq == tk`, `h` a positive multiple of `h_kv`, `d > 0`).
    pub fn new(schedule: Schedule, shape: AttnShape) -> Result<Self, ExecError> {
        schedule.validate()?;
        if shape.tq != shape.tk {
            return Err(ExecError::Shape(format!(
                "self-attention needs tq == tk, got {} and {}",
                shape.tq, shape.tk
            )));
        }
        if shape.d == 0 || shape.h_kv == 0 || !shape.h.is_multiple_of(shape.h_kv) {
            return Err(ExecError::Shape(format!(
                "h = {} must be a positive multiple of h_kv = {}, d = {} positive",
                shape.h, shape.h_kv, shape.d
            )));
        }
        let sharding = Sharding::new(shape.tq, schedule.ranks, schedule.layout())?;
        Ok(LocalExecutor {
            schedule,
            sharding,
            shape,
            blocks: Blocks::new(sharding, shape),
        })
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// `(out [B, T, H, D], lse [B, T, H])`, as one `attention_forward` call on the whole sequence
    /// with the schedule's mask would give.
    pub fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), ExecError> {
        let (qw, kw) = self.widths();
        let qc = self.chunked("q", q, qw)?;
        let kc = self.chunked("k", k, kw)?;
        let vc = self.chunked("v", v, kw)?;
        let (b, h, d) = (self.shape.b, self.shape.h, self.shape.d);
        let mut st = ForwardState {
            schedule: &self.schedule,
            d,
            acc: (0..self.sharding.num_chunks())
                .map(|c| {
                    let rows = b * self.sharding.chunk_valid_len(c) * h;
                    (vec![0.0; rows * d], vec![f32::NEG_INFINITY; rows])
                })
                .collect(),
            partials: HashMap::new(),
        };
        for step in &self.schedule.steps {
            st.deliver(&step.recv);
            for w in step.work.iter().flatten() {
                let (o_b, lse_b) = self.blocks.forward(
                    w,
                    &qc.chunks[w.q_chunk],
                    &kc.chunks[w.kv_chunk],
                    &vc.chunks[w.kv_chunk],
                );
                if w.computed_by == w.owner {
                    st.merge(w.q_chunk, &(o_b, lse_b));
                } else {
                    st.partials
                        .insert((w.computed_by, w.q_chunk, w.kv_chunk), (o_b, lse_b));
                }
            }
        }
        st.deliver(&self.schedule.finish);
        debug_assert!(st.partials.is_empty());
        let (o, l): (Vec<Vec<f32>>, Vec<Vec<f32>>) = st.acc.into_iter().unzip();
        let out = self.unchunked(Chunked { chunks: o }, h * d, 0.0)?;
        let lse = self.unchunked(Chunked { chunks: l }, h, f32::NEG_INFINITY)?;
        Ok((out, lse))
    }

    /// Gradients of attention given the GLOBAL `out` `[B, T, H, D]` and `lse` `[B, T, H]` (from
    /// [`LocalExecutor::forward`] or one whole-sequence call) and `dout`; overwrites nothing, returns
    /// fresh buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
    ) -> Result<AttnGrads, ExecError> {
        let (qw, kw) = self.widths();
        let qc = self.chunked("q", q, qw)?;
        let kc = self.chunked("k", k, kw)?;
        let vc = self.chunked("v", v, kw)?;
        let oc = self.chunked("out", out, qw)?;
        let lc = self.chunked("lse", lse, self.shape.h)?;
        let doc = self.chunked("dout", dout, qw)?;
        // D of each query chunk, once; out is not read again.
        let deltas: Vec<Vec<f32>> = (0..oc.chunks.len())
            .map(|c| self.blocks.delta(c, &doc.chunks[c], &oc.chunks[c]))
            .collect();
        let zeros = |c: &Chunked| -> Vec<Vec<f32>> {
            c.chunks.iter().map(|x| vec![0.0; x.len()]).collect()
        };
        let s = &self.schedule;
        let mut st = BackwardState {
            schedule: s,
            dq: zeros(&qc),
            dk: zeros(&kc),
            dv: zeros(&vc),
            dq_part: HashMap::new(),
            dkv_acc: HashMap::new(),
        };
        for step in &s.steps {
            st.deliver(&step.recv);
            for w in step.work.iter().flatten() {
                let (qi, ki) = (w.q_chunk, w.kv_chunk);
                let mut dq_help = Vec::new();
                let dq_t: &mut Vec<f32> = if w.computed_by == w.owner {
                    &mut st.dq[qi]
                } else {
                    dq_help = vec![0.0; qc.chunks[qi].len()];
                    &mut dq_help
                };
                let (dk_t, dv_t) = if w.computed_by == s.chunk_home(ki) {
                    (&mut st.dk[ki], &mut st.dv[ki])
                } else {
                    let n = kc.chunks[ki].len();
                    let e = st
                        .dkv_acc
                        .entry((w.computed_by, ki))
                        .or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
                    (&mut e.0, &mut e.1)
                };
                self.blocks.backward(
                    w,
                    dq_t,
                    dk_t,
                    dv_t,
                    &doc.chunks[qi],
                    &qc.chunks[qi],
                    &kc.chunks[ki],
                    &vc.chunks[ki],
                    &deltas[qi],
                    &lc.chunks[qi],
                );
                if w.computed_by != w.owner {
                    st.dq_part.insert((w.computed_by, qi, ki), dq_help);
                }
            }
        }
        st.deliver(&s.finish);
        debug_assert!(st.dq_part.is_empty() && st.dkv_acc.is_empty());
        let (dq, dk, dv) = (st.dq, st.dk, st.dv);
        Ok(AttnGrads {
            dq: self.unchunked(Chunked { chunks: dq }, qw, 0.0)?,
            dk: self.unchunked(Chunked { chunks: dk }, kw, 0.0)?,
            dv: self.unchunked(Chunked { chunks: dv }, kw, 0.0)?,
        })
    }

    fn widths(&self) -> (usize, usize) {
        self.blocks.widths()
    }

    /// Shards `x` `[B, T, width]` over the ranks (padding with NaN, which no block may read), then
    /// takes each chunk's valid rows from its home's shard.
    fn chunked(&self, name: &'static str, x: &[f32], width: usize) -> Result<Chunked, ExecError> {
        let (b, t) = (self.shape.b, self.shape.tq);
        if x.len() != b * t * width {
            return Err(ExecError::Length {
                name,
                len: x.len(),
                expected: b * t * width,
            });
        }
        let sh = &self.sharding;
        let shards = (0..sh.ranks())
            .map(|r| sh.shard(x, b, width, r, f32::NAN))
            .collect::<Result<Vec<_>, _>>()?;
        let chunks = (0..sh.num_chunks())
            .map(|chunk| {
                let shard = &shards[sh.layout().chunk_home(sh.ranks(), chunk)];
                self.blocks.chunk_of(shard, width, chunk)
            })
            .collect();
        Ok(Chunked { chunks })
    }

    /// The inverse of [`LocalExecutor::chunked`]: chunks into per-rank shards (padding `pad`), then
    /// unsharded to `[B, T, width]`.
    fn unchunked(&self, x: Chunked, width: usize, pad: f32) -> Result<Vec<f32>, ExecError> {
        let sh = &self.sharding;
        let mut shards = vec![vec![pad; self.shape.b * sh.local_len() * width]; sh.ranks()];
        for (chunk, data) in x.chunks.iter().enumerate() {
            let shard = &mut shards[sh.layout().chunk_home(sh.ranks(), chunk)];
            self.blocks.put_chunk(shard, width, chunk, data);
        }
        Ok(sh.unshard(&shards, self.shape.b, width)?)
    }
}

/// A block computed off its owner, keyed by (holding rank, q chunk, kv chunk).
type BlockKey = (usize, usize, usize);
/// `(dK, dV)` accumulators of one chunk.
type DkDv = (Vec<f32>, Vec<f32>);

/// Forward: each q chunk's running `(o, lse)` at its owner, and helpers' undelivered partials.
struct ForwardState<'a> {
    schedule: &'a Schedule,
    d: usize,
    acc: Vec<OutLse>,
    partials: HashMap<BlockKey, OutLse>,
}

impl ForwardState<'_> {
    fn merge(&mut self, q_chunk: usize, (o_b, lse_b): &OutLse) {
        merge(&mut self.acc[q_chunk], (o_b, lse_b), self.d);
    }

    /// Partials merge at their owner (or move on); other payloads are data the executor indexes.
    fn deliver(&mut self, msgs: &[Message]) {
        for m in msgs {
            if let Payload::Partial { q_chunk, kv_chunk } = m.payload {
                let p = self
                    .partials
                    .remove(&(m.from, q_chunk, kv_chunk))
                    .expect("validated schedule");
                if m.to == self.schedule.chunk_home(q_chunk) {
                    self.merge(q_chunk, &p);
                } else {
                    self.partials.insert((m.to, q_chunk, kv_chunk), p);
                }
            }
        }
    }
}

/// Backward: dQ per q chunk at its owner, dK/dV per chunk at its home, helpers' dQ of one block,
/// and off-home dK/dV accumulators keyed by (holding rank, kv chunk).
struct BackwardState<'a> {
    schedule: &'a Schedule,
    dq: Vec<Vec<f32>>,
    dk: Vec<Vec<f32>>,
    dv: Vec<Vec<f32>>,
    dq_part: HashMap<BlockKey, Vec<f32>>,
    dkv_acc: HashMap<(usize, usize), DkDv>,
}

impl BackwardState<'_> {
    fn deliver(&mut self, msgs: &[Message]) {
        for m in msgs {
            match m.payload {
                Payload::Partial { q_chunk, kv_chunk } => {
                    let p = self
                        .dq_part
                        .remove(&(m.from, q_chunk, kv_chunk))
                        .expect("validated schedule");
                    if m.to == self.schedule.chunk_home(q_chunk) {
                        add(&mut self.dq[q_chunk], &p);
                    } else {
                        self.dq_part.insert((m.to, q_chunk, kv_chunk), p);
                    }
                }
                Payload::KvGrad { chunk } => {
                    let (gk, gv) = self
                        .dkv_acc
                        .remove(&(m.from, chunk))
                        .expect("validated schedule");
                    let (dk, dv) = if m.to == self.schedule.chunk_home(chunk) {
                        (&mut self.dk[chunk], &mut self.dv[chunk])
                    } else {
                        let e = self
                            .dkv_acc
                            .entry((m.to, chunk))
                            .or_insert_with(|| (vec![0.0; gk.len()], vec![0.0; gv.len()]));
                        (&mut e.0, &mut e.1)
                    };
                    add(dk, &gk);
                    add(dv, &gv);
                }
                Payload::Kv { .. } | Payload::Query { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use reel_kernels::attention::{attention_backward, attention_forward, AttnMask};
    use reel_tensor::{check_close, rng, uniform_vec, Tolerance};

    const TOL: Tolerance = Tolerance::new(1e-5, 1e-5);

    struct Case {
        shape: AttnShape,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dout: Vec<f32>,
    }

    fn case(b: usize, t: usize, h: usize, h_kv: usize, d: usize, seed: u64) -> Case {
        let shape = AttnShape {
            b,
            tq: t,
            tk: t,
            h,
            h_kv,
            d,
        };
        let mut r = rng(seed);
        Case {
            shape,
            q: uniform_vec(&mut r, b * t * h * d, 1.5),
            k: uniform_vec(&mut r, b * t * h_kv * d, 1.5),
            v: uniform_vec(&mut r, b * t * h_kv * d, 1.0),
            dout: uniform_vec(&mut r, b * t * h * d, 1.0),
        }
    }

    /// One whole-sequence call of each kernel.
    fn reference(c: &Case, causal: bool) -> (Vec<f32>, Vec<f32>, AttnGrads) {
        let s = c.shape;
        let mask = if causal {
            AttnMask::Causal {
                q_offset: 0,
                k_offset: 0,
            }
        } else {
            AttnMask::Full
        };
        let mut out = vec![f32::NAN; c.q.len()];
        let mut lse = vec![f32::NAN; s.b * s.tq * s.h];
        attention_forward(&mut out, &mut lse, &c.q, &c.k, &c.v, s, mask);
        let mut g = AttnGrads {
            dq: vec![0.0; c.q.len()],
            dk: vec![0.0; c.k.len()],
            dv: vec![0.0; c.v.len()],
        };
        attention_backward(
            &mut g.dq, &mut g.dk, &mut g.dv, &c.dout, &c.q, &c.k, &c.v, &out, &lse, s, mask,
        );
        (out, lse, g)
    }

    /// Every schedule, P ∈ {1, 2, 3, 4, 6, 8}, GQA ratios 1, 2, 4, T divisible and not divisible by
    /// P (and 2P), including T < P (empty chunks): out, lse, dq, dk, dv match one whole call.
    #[test]
    fn every_schedule_matches_one_call() {
        let mut seed = 0;
        for (b, t) in [(1, 48), (2, 37), (1, 5)] {
            for h_kv in [4, 2, 1] {
                seed += 1;
                let c = case(b, t, 4, h_kv, 8, seed);
                for causal in [true, false] {
                    let (out_r, lse_r, g_r) = reference(&c, causal);
                    assert!(g_r.dk.iter().any(|&x| x.abs() > 1e-3));
                    for kind in ScheduleKind::ALL
                        .into_iter()
                        .filter(|k| k.is_causal() == causal)
                    {
                        for p in [1, 2, 3, 4, 6, 8] {
                            let what = format!("{kind:?} P={p} B={b} T={t} H_kv={h_kv}");
                            let ex = LocalExecutor::new(kind.build(p).unwrap(), c.shape).unwrap();
                            let (out, lse) = ex.forward(&c.q, &c.k, &c.v).unwrap();
                            check_close(&format!("{what} out"), &out, &out_r, TOL).unwrap();
                            check_close(&format!("{what} lse"), &lse, &lse_r, TOL).unwrap();
                            // Backward from the executor's own forward: the whole chain.
                            let g = ex.backward(&c.q, &c.k, &c.v, &out, &lse, &c.dout).unwrap();
                            check_close(&format!("{what} dq"), &g.dq, &g_r.dq, TOL).unwrap();
                            check_close(&format!("{what} dk"), &g.dk, &g_r.dk, TOL).unwrap();
                            check_close(&format!("{what} dv"), &g.dv, &g_r.dv, TOL).unwrap();
                        }
                    }
                }
            }
        }
    }

    /// A schedule whose dK/dV never goes home is refused before it runs.
    #[test]
    fn refuses_a_schedule_missing_messages() {
        let c = case(1, 32, 2, 1, 8, 99);
        let (out_r, _, g_r) = reference(&c, true);
        let good = crate::schedule::distattn_causal(4).unwrap();
        let ex = LocalExecutor::new(good.clone(), c.shape).unwrap();
        let (out, lse) = ex.forward(&c.q, &c.k, &c.v).unwrap();
        check_close("out", &out, &out_r, TOL).unwrap();
        let g = ex.backward(&c.q, &c.k, &c.v, &out, &lse, &c.dout).unwrap();
        check_close("dk", &g.dk, &g_r.dk, TOL).unwrap();
        // The same schedule without its KvGrad messages no longer validates.
        let mut broken = good;
        for st in &mut broken.steps {
            st.recv
                .retain(|m| !matches!(m.payload, Payload::KvGrad { .. }));
        }
        broken.finish.clear();
        assert!(matches!(
            LocalExecutor::new(broken, c.shape),
            Err(ExecError::Schedule(_))
        ));
    }

    #[test]
    fn refuses_bad_inputs() {
        let c = case(1, 8, 4, 2, 8, 5);
        let s = crate::schedule::ring_causal(2).unwrap();
        let bad = AttnShape { tk: 7, ..c.shape };
        assert!(matches!(
            LocalExecutor::new(s.clone(), bad),
            Err(ExecError::Shape(_))
        ));
        let gqa = AttnShape { h_kv: 3, ..c.shape };
        assert!(matches!(
            LocalExecutor::new(s.clone(), gqa),
            Err(ExecError::Shape(_))
        ));
        let ex = LocalExecutor::new(s, c.shape).unwrap();
        let e = ex.forward(&c.q[1..], &c.k, &c.v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "local executor: q has 255 elements, expected 256"
        );
    }
}
