//! `CommError` and `Op`: every failure of a communication call names the operation, this rank and
//! (where there is one) the peer. Ranks in errors are global ranks (positions in the world), so a
//! message from a sub-group still says which thread or process to look at.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kind of a communication operation; the key of the byte counters and part of every error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Send,
    Recv,
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    Broadcast,
    Barrier,
    /// A sum onto one root (device groups: a sharded gradient's owner).
    Reduce,
    /// Creating a sub-group communicator ([`crate::Communicator::split`]).
    Split,
}

impl Op {
    /// The snake_case name used in errors and in serialised statistics.
    pub fn name(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Recv => "recv",
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllToAll => "all_to_all",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::Reduce => "reduce",
            Op::Split => "split",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a communication call failed. Any of these leaves the whole world aborted (see the crate
/// docs, "Failure"): the caller should stop and return the error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// The peer did not deliver in time and nobody reported a failure. `waited` counts from the
    /// start of the call (or of `Pending::wait`), as the deadline does.
    #[error("{op} on rank {rank}: timed out after {waited:?} waiting for rank {peer}")]
    Timeout {
        op: Op,
        rank: usize,
        peer: usize,
        waited: Duration,
    },
    /// Some rank (`peer`) failed, panicked or hit an error; every pending and later call fails.
    #[error("{op} on rank {rank}: aborted because rank {peer} failed: {reason}")]
    PeerFailed {
        op: Op,
        rank: usize,
        peer: usize,
        reason: String,
    },
    /// The peer's rank code returned while this rank still expected a message from (or was sending
    /// to) it.
    #[error("{op} on rank {rank}: rank {peer} has exited")]
    PeerExited { op: Op, rank: usize, peer: usize },
    /// The peer sent something this call did not expect (another collective, another length):
    /// ranks called different operations or passed inconsistent sizes.
    #[error("{op} on rank {rank}: mismatch with rank {peer}: {detail}")]
    Mismatch {
        op: Op,
        rank: usize,
        peer: usize,
        detail: String,
    },
    /// The arguments are wrong on this rank alone (buffer lengths, a peer or root out of range).
    #[error("{op} on rank {rank}: {detail}")]
    InvalidArgument { op: Op, rank: usize, detail: String },
    /// The backend itself failed on this rank (a thread could not be started, a library call
    /// failed).
    #[error("rank {rank}: backend failure: {detail}")]
    Backend { rank: usize, detail: String },
    /// The rank's code panicked (reported by `InProcess::spawn` as that rank's result).
    #[error("rank {rank} panicked: {message}")]
    Panicked { rank: usize, message: String },
}

impl CommError {
    /// The operation that failed (`None` for a backend failure or a panic outside any call).
    pub fn op(&self) -> Option<Op> {
        match self {
            CommError::Timeout { op, .. }
            | CommError::PeerFailed { op, .. }
            | CommError::PeerExited { op, .. }
            | CommError::Mismatch { op, .. }
            | CommError::InvalidArgument { op, .. } => Some(*op),
            CommError::Backend { .. } | CommError::Panicked { .. } => None,
        }
    }

    /// The global rank that reports the error.
    pub fn rank(&self) -> usize {
        match self {
            CommError::Timeout { rank, .. }
            | CommError::PeerFailed { rank, .. }
            | CommError::PeerExited { rank, .. }
            | CommError::Mismatch { rank, .. }
            | CommError::InvalidArgument { rank, .. }
            | CommError::Backend { rank, .. }
            | CommError::Panicked { rank, .. } => *rank,
        }
    }

    /// The global rank of the peer involved, where there is one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::Timeout { peer, .. }
            | CommError::PeerFailed { peer, .. }
            | CommError::PeerExited { peer, .. }
            | CommError::Mismatch { peer, .. } => Some(*peer),
            CommError::InvalidArgument { .. }
            | CommError::Backend { .. }
            | CommError::Panicked { .. } => None,
        }
    }
}
