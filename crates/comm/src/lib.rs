//! reel-comm: the communication layer. One [`Communicator`] trait that rank code is written
//! against once, generic over the backend, and its first backend, [`InProcess`] (one OS thread per
//! rank, host buffers). Multi-process backends (NCCL, in `reel-cuda`) start from [`bootstrap`] (a TCP
//! rendezvous) and [`launch`] (one process per GPU).
//!
//! # Operations
//!
//! Buffers are `f32` slices. `P` is the group size, `r` this rank's position in the group.
//!
//! - [`Communicator::all_reduce_sum`]: `buf[i] = Σ_ranks buf[i]`, in place; every rank ends with
//!   bit-identical values.
//! - [`Communicator::all_gather`]: `send` is `[n]`, `recv` is `[P, n]` rank-major (`recv[q·n..]` is
//!   rank q's `send`).
//! - [`Communicator::reduce_scatter_sum`]: `send` is `[P, n]`, `recv` is `[n]` = `Σ_ranks send[r·n..]`.
//! - [`Communicator::all_to_all`]: `send` and `recv` are `[P, n]`; chunk q of `send` goes to rank q
//!   and arrives there as chunk r.
//! - [`Communicator::broadcast`]: `buf` of `root` is copied to every rank.
//! - [`Communicator::barrier`]: returns once every rank of the group has entered it.
//! - [`Communicator::start`]: posts a batch of point-to-point sends (owned data) and receives
//!   (peer, length) and returns at once with a [`Pending`] handle; [`Pending::wait`] returns the
//!   received buffers in the order of the batch's receives. Sends are buffered (they never wait for
//!   the receiver to post), and messages match by (source, destination, tag) in posting order, so a
//!   caller can post step t+1's messages, compute step t, then wait, and may wait on batches in any
//!   order.
//! - [`Communicator::split`]: a sub-group communicator (MPI_Comm_split / ncclCommSplit semantics);
//!   data-parallel and sequence-parallel groups (dp × sp) each get one.
//! - [`Communicator::stats`]: per-operation bytes sent and received; the counting convention is in
//!   [`stats`](mod@stats).
//!
//! Every collective must be called by every rank of its group in the same order with consistent
//! sizes; a disagreement that shows in the messages (another operation, another length) is
//! reported as [`CommError::Mismatch`].
//!
//! # Failure
//!
//! Every blocking wait has a deadline (the communicator's timeout, counted from the start of the
//! call, or of [`Pending::wait`]). Any error, in any rank — a failed call, a rank's code returning
//! an error, a panic — aborts the whole world: every blocked call on every rank returns
//! [`CommError::PeerFailed`] promptly and every later call fails the same way. A rank whose code
//! returns normally while others still expect messages from it makes those waits fail with
//! [`CommError::PeerExited`] (and the world abort). No call hangs forever. The one thing a timeout
//! cannot undo is a rank stuck in its own computation: `InProcess::spawn` joins every thread, so
//! it returns when that rank's code does.
//!
//! # Buffers on devices and NCCL (the plan; callers do not change)
//!
//! - Buffers: today the methods take `&[f32]` / `&mut [f32]` and point-to-point data moves as
//!   `Vec<f32>`. A device backend adds an associated buffer type to the trait (`type Buf:
//!   ?Sized`, `[f32]` on the host, a device slice — `reel-tensor` storage on `Device::Cuda(n)` — on
//!   the GPU) and the methods take `&Self::Buf` / `&mut Self::Buf`; `P2pOp` becomes generic over
//!   the owned buffer and [`Pending::wait`] returns those. Rank code that is generic over
//!   `C: Communicator` keeps its shape; the host backend stays as it is (`Buf = [f32]`). bf16
//!   payloads come the same way, through an element type parameter (sums still accumulate in f32).
//! - NCCL (implemented: `reel_cuda::NcclComm`, whose module docs are the reference): one
//!   communicator per process and GPU, created from a unique id that [`bootstrap`] shares over
//!   TCP, [`launch`] passing rank and world size. The collectives map one to one (ncclAllReduce,
//!   ncclAllGather, ncclReduceScatter, ncclBroadcast; all-to-all as grouped ncclSend/ncclRecv;
//!   barrier as a one-element all-reduce). `start` is ncclGroupStart, the sends and receives,
//!   ncclGroupEnd on the communicator's stream, then an event; `wait` polls the event and
//!   ncclCommGetAsyncError until the deadline and calls ncclCommAbort on timeout or error. NCCL
//!   has no tags and matches sends and receives per peer in issue order, and does not buffer
//!   sends, so that backend asks more of rank code than the trait: messages between two ranks are
//!   received in the order they were sent whatever their tags, and a send's receive must be
//!   posted in a batch that runs at the same time. Each message carries a header (tag, length,
//!   sequence number) that the receiver checks, so breaking the rule is a
//!   [`CommError::Mismatch`], never wrong data. `split` is ncclCommSplit. The byte counters keep
//!   this crate's convention ([`stats::convention_bytes`]), not measured on the wire.

mod algo;
pub mod bootstrap;
mod error;
mod in_process;
pub mod launch;
pub mod stats;

pub use error::{CommError, Op};
pub use in_process::{InProcess, InProcessBatch};
pub use stats::{CommStats, OpStats};

/// One point-to-point operation of a batch ([`Communicator::start`]). `peer` is a rank of the
/// communicator's group; `tag` keeps unrelated streams of messages between the same two ranks apart.
#[derive(Clone, Debug, PartialEq)]
pub enum P2pOp {
    /// Send `data` (owned, so the call can return before the peer receives it).
    Send {
        peer: usize,
        tag: u64,
        data: Vec<f32>,
    },
    /// Receive the next message from `peer` with `tag`; it must hold exactly `len` values.
    Recv { peer: usize, tag: u64, len: usize },
}

impl P2pOp {
    /// A send of `data` to `peer`.
    pub fn send(peer: usize, tag: u64, data: Vec<f32>) -> Self {
        P2pOp::Send { peer, tag, data }
    }

    /// A receive of `len` values from `peer`.
    pub fn recv(peer: usize, tag: u64, len: usize) -> Self {
        P2pOp::Recv { peer, tag, len }
    }
}

/// A posted batch of point-to-point operations. Dropping a batch without waiting discards its
/// receives: their messages still match them, so later receives are unaffected.
pub trait Pending {
    /// Blocks until every receive of the batch has arrived (or the deadline passes, or the world
    /// aborts) and returns the received buffers in the order of the batch's `Recv` ops.
    fn wait(self) -> Result<Vec<Vec<f32>>, CommError>;
}

/// A group of ranks that communicate. Rank code is written once as
/// `fn step<C: Communicator>(comm: &C) -> Result<_, CommError>` and runs on every backend.
/// Ranks and peers are positions in this communicator's group (`0..world_size()`).
pub trait Communicator: Send + Sized {
    /// The handle of a posted point-to-point batch.
    type Batch<'a>: Pending
    where
        Self: 'a;

    /// This rank's position in the group.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// `buf[i] = Σ_ranks buf[i]` in place; every rank ends with identical values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;

    /// `recv[q·n .. (q+1)·n] = send of rank q`, with `n = send.len()` and
    /// `recv.len() = world_size·n`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError>;

    /// `recv = Σ_q (send of rank q)[r·n .. (r+1)·n]` for this rank r, with `n = recv.len()` and
    /// `send.len() = world_size·n`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError>;

    /// Chunk q of `send` goes to rank q; `recv` chunk q is what rank q sent to this rank.
    /// `send.len() = recv.len()`, a multiple of `world_size`.
    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError>;

    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;

    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<(), CommError>;

    /// Posts `ops` and returns without waiting for any receive: sends are buffered.
    fn start(&self, ops: Vec<P2pOp>) -> Result<Self::Batch<'_>, CommError>;

    /// A communicator for the ranks that pass the same `color`, ordered by `(key, rank)`.
    /// Collective over this communicator: every rank calls it, in the same order as other calls.
    fn split(&self, color: usize, key: usize) -> Result<Self, CommError>;

    /// This communicator's counters since creation or the last [`Self::reset_stats`].
    fn stats(&self) -> CommStats;

    /// Zeroes the counters.
    fn reset_stats(&self);

    /// Sends `data` to `peer` (buffered: returns before the peer receives it).
    fn send(&self, peer: usize, tag: u64, data: Vec<f32>) -> Result<(), CommError> {
        self.start(vec![P2pOp::send(peer, tag, data)])?.wait()?;
        Ok(())
    }

    /// Receives the next message of `len` values from `peer` with `tag`.
    fn recv(&self, peer: usize, tag: u64, len: usize) -> Result<Vec<f32>, CommError> {
        let mut got = self.start(vec![P2pOp::recv(peer, tag, len)])?.wait()?;
        Ok(got.pop().unwrap_or_default())
    }
}
