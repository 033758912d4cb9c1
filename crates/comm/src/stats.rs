//! Per-operation byte counters of one communicator.
//!
//! Convention: a counter holds the payload bytes that actually cross between two different ranks
//! under the algorithm the backend runs, as seen by this rank (`bytes_sent` leave it,
//! `bytes_recv` arrive at it). A rank's own chunk, copied locally, is not counted, nor is a
//! message a rank sends to itself. With `n` elements of 4 bytes and `P` ranks in the group:
//!
//! | op | bytes_sent | bytes_recv |
//! |---|---|---|
//! | `send` / `recv` | payload | payload |
//! | `all_reduce_sum` (ring: reduce-scatter, then all-gather) | `2·(P−1)/P·n·4` | same |
//! | `all_gather` (ring; `n` = recv length) | `(P−1)/P·n·4` | same |
//! | `reduce_scatter_sum` (ring; `n` = send length) | `(P−1)/P·n·4` | same |
//! | `all_to_all` (direct) | `(P−1)/P·n·4` | same |
//! | `broadcast` (direct from the root) | root `(P−1)·n·4`, others 0 | root 0, others `n·4` |
//! | `reduce` (direct to the root; device groups only) | root 0, others `n·4` | root `(P−1)·n·4`, others 0 |
//! | `barrier` | 0 | 0 |
//!
//! (`all_reduce_sum` splits `n` into `P` chunks that differ by at most one element; each ring phase
//! moves every chunk but one, so the formula is exact when `P` divides `n`.)
//!
//! `calls` counts successful calls (each send or receive of a batch is one call). Counters are per
//! communicator: a sub-group has its own, so data-parallel and sequence-parallel traffic are read
//! apart; `+` adds two sets. The exchange inside `split` is not counted.

use std::ops::Add;

use serde::{Deserialize, Serialize};

use crate::Op;

/// Counters of one operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStats {
    /// Successful calls.
    pub calls: u64,
    /// Payload bytes this rank sent to other ranks.
    pub bytes_sent: u64,
    /// Payload bytes this rank received from other ranks.
    pub bytes_recv: u64,
}

impl Add for OpStats {
    type Output = OpStats;
    fn add(self, o: OpStats) -> OpStats {
        OpStats {
            calls: self.calls + o.calls,
            bytes_sent: self.bytes_sent + o.bytes_sent,
            bytes_recv: self.bytes_recv + o.bytes_recv,
        }
    }
}

/// Counters of every operation kind of one communicator (see the module docs for what counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommStats {
    pub send: OpStats,
    pub recv: OpStats,
    pub all_reduce: OpStats,
    pub all_gather: OpStats,
    pub reduce_scatter: OpStats,
    pub all_to_all: OpStats,
    pub broadcast: OpStats,
    pub barrier: OpStats,
    /// Sums to one root (a device group's sharded gradients; absent in older serialisations).
    #[serde(default)]
    pub reduce: OpStats,
}

impl CommStats {
    /// The counters of `op` (`None` for [`Op::Split`], which is not counted).
    pub fn get(&self, op: Op) -> Option<&OpStats> {
        Some(match op {
            Op::Send => &self.send,
            Op::Recv => &self.recv,
            Op::AllReduce => &self.all_reduce,
            Op::AllGather => &self.all_gather,
            Op::ReduceScatter => &self.reduce_scatter,
            Op::AllToAll => &self.all_to_all,
            Op::Broadcast => &self.broadcast,
            Op::Barrier => &self.barrier,
            Op::Reduce => &self.reduce,
            Op::Split => return None,
        })
    }

    /// Mutable counters of `op` (`None` for [`Op::Split`]).
    pub fn get_mut(&mut self, op: Op) -> Option<&mut OpStats> {
        Some(match op {
            Op::Send => &mut self.send,
            Op::Recv => &mut self.recv,
            Op::AllReduce => &mut self.all_reduce,
            Op::AllGather => &mut self.all_gather,
            Op::ReduceScatter => &mut self.reduce_scatter,
            Op::AllToAll => &mut self.all_to_all,
            Op::Broadcast => &mut self.broadcast,
            Op::Barrier => &mut self.barrier,
            Op::Reduce => &mut self.reduce,
            Op::Split => return None,
        })
    }

    /// The sum over every operation kind.
    pub fn total(&self) -> OpStats {
        self.send
            + self.recv
            + self.all_reduce
            + self.all_gather
            + self.reduce_scatter
            + self.all_to_all
            + self.broadcast
            + self.barrier
            + self.reduce
    }

    /// Adds one successful call of `op` that moved the given bytes (ignored for `Split`).
    pub fn record(&mut self, op: Op, bytes_sent: u64, bytes_recv: u64) {
        if let Some(s) = self.get_mut(op) {
            s.calls += 1;
            s.bytes_sent += bytes_sent;
            s.bytes_recv += bytes_recv;
        }
    }
}

impl Add for CommStats {
    type Output = CommStats;
    fn add(self, o: CommStats) -> CommStats {
        CommStats {
            send: self.send + o.send,
            recv: self.recv + o.recv,
            all_reduce: self.all_reduce + o.all_reduce,
            all_gather: self.all_gather + o.all_gather,
            reduce_scatter: self.reduce_scatter + o.reduce_scatter,
            all_to_all: self.all_to_all + o.all_to_all,
            broadcast: self.broadcast + o.broadcast,
            barrier: self.barrier + o.barrier,
            reduce: self.reduce + o.reduce,
        }
    }
}

/// `(bytes_sent, bytes_recv)` of one call of `op` on `rank` of `p` ranks under this module's
/// convention, for backends that do not count on the wire (NCCL): `n` is the element count the
/// table names (the buffer for `all_reduce_sum`/`broadcast`, the recv length for `all_gather`,
/// the send length for `reduce_scatter_sum` and `all_to_all`, the payload for `send`/`recv`).
pub fn convention_bytes(op: Op, n: usize, p: usize, rank: usize, root: usize) -> (u64, u64) {
    let b = |elems: usize| (elems * 4) as u64;
    let not_own = |n: usize| b(n - crate::algo::chunk_range(n, p, rank).len());
    match op {
        Op::Send => (b(n), 0),
        Op::Recv => (0, b(n)),
        Op::AllReduce => {
            let (sent, recv) = if p <= 1 {
                (0, 0)
            } else {
                let c = |i: usize| b(crate::algo::chunk_range(n, p, i % p).len());
                let total = b(n);
                // Reduce-scatter sends every chunk but r and receives every chunk but r−1;
                // the all-gather sends every chunk but r+1 and receives every chunk but r.
                let rs_sent = total - c(rank);
                let rs_recv = total - c(rank + p - 1);
                let ag_sent = total - c(rank + 1);
                let ag_recv = total - c(rank);
                (rs_sent + ag_sent, rs_recv + ag_recv)
            };
            (sent, recv)
        }
        Op::AllGather | Op::ReduceScatter | Op::AllToAll => {
            if p <= 1 {
                (0, 0)
            } else {
                (not_own(n), not_own(n))
            }
        }
        Op::Broadcast => {
            if p <= 1 {
                (0, 0)
            } else if rank == root {
                (b(n) * (p as u64 - 1), 0)
            } else {
                (0, b(n))
            }
        }
        Op::Reduce => {
            if p <= 1 {
                (0, 0)
            } else if rank == root {
                (0, b(n) * (p as u64 - 1))
            } else {
                (b(n), 0)
            }
        }
        Op::Barrier | Op::Split => (0, 0),
    }
}
