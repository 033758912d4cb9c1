//! The in-process backend: `P` ranks as `P` OS threads of one process, exchanging host buffers.
//!
//! Each rank owns a mailbox (a map from message key to message, a mutex and a condvar). A message
//! key is (communicator context, source, channel, sequence number): the sender numbers its
//! messages per (destination, channel), the receiver numbers the receives it posts per (source,
//! channel), so the k-th receive posted matches the k-th message sent whatever order the waits
//! come in. Channels are the user's tags and one internal channel for collectives, so collectives
//! and point-to-point traffic never mix; each sub-group has its own context.
//!
//! A shared world state holds the abort flag (with the first failure's rank and reason) and one
//! "exited" flag per rank. Raising either wakes every mailbox under its lock, so no waiter misses
//! it; every wait loops on: aborted → `PeerFailed`, message there → take it, peer exited →
//! `PeerExited`, deadline passed → `Timeout`.

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::algo::{self, Links};
use crate::{CommError, CommStats, Communicator, Op, P2pOp, Pending};

/// Stack size of each rank's thread (the usual size of a main thread).
const RANK_STACK_BYTES: usize = 8 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Rank code never runs while one of these locks is held, so a poisoned lock still holds
    // consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Channel {
    Tag(u64),
    Collective,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    ctx: u64,
    /// Global rank of the sender.
    src: usize,
    channel: Channel,
    seq: u64,
}

struct Message {
    /// The operation the sender was running (`Send` for point-to-point).
    op: Op,
    data: Vec<f32>,
}

#[derive(Default)]
struct Mailbox {
    messages: Mutex<HashMap<Key, Message>>,
    arrived: Condvar,
}

struct World {
    timeout: Duration,
    mailboxes: Vec<Mailbox>,
    aborted: AtomicBool,
    /// The first failure: (global rank, reason). Set before `aborted` is raised.
    abort_info: Mutex<Option<(usize, String)>>,
    exited: Vec<AtomicBool>,
    /// Sub-group contexts by (parent context, parent's split count, color).
    contexts: Mutex<HashMap<(u64, u64, usize), u64>>,
}

impl World {
    fn new(size: usize, timeout: Duration) -> Self {
        World {
            timeout,
            mailboxes: (0..size).map(|_| Mailbox::default()).collect(),
            aborted: AtomicBool::new(false),
            abort_info: Mutex::new(None),
            exited: (0..size).map(|_| AtomicBool::new(false)).collect(),
            contexts: Mutex::new(HashMap::new()),
        }
    }

    fn wake_all(&self) {
        for mb in &self.mailboxes {
            let _held = lock(&mb.messages);
            mb.arrived.notify_all();
        }
    }

    /// Aborts the world; the first call's rank and reason are kept.
    fn abort(&self, rank: usize, reason: String) {
        {
            let mut info = lock(&self.abort_info);
            if info.is_none() {
                *info = Some((rank, reason));
            }
        }
        self.aborted.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn exit(&self, rank: usize) {
        self.exited[rank].store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// `PeerFailed` for `op` on `rank`, if the world is aborted.
    fn check_aborted(&self, op: Op, rank: usize) -> Result<(), CommError> {
        if !self.aborted.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (peer, reason) = lock(&self.abort_info)
            .clone()
            .unwrap_or((rank, String::from("unknown")));
        Err(CommError::PeerFailed {
            op,
            rank,
            peer,
            reason,
        })
    }

    fn context(&self, parent: u64, split: u64, color: usize) -> u64 {
        let mut contexts = lock(&self.contexts);
        let next = contexts.len() as u64 + 1;
        *contexts.entry((parent, split, color)).or_insert(next)
    }
}

#[derive(Default)]
struct Sequences {
    /// Next sequence number per (destination group rank, channel).
    sent: HashMap<(usize, Channel), u64>,
    /// Next sequence number per (source group rank, channel).
    posted: HashMap<(usize, Channel), u64>,
    /// Splits done so far (part of a sub-group's context key).
    splits: u64,
}

/// One rank's communicator of the in-process backend (the world, or a sub-group from
/// [`Communicator::split`]). Start ranks with [`InProcess::spawn`].
pub struct InProcess {
    world: Arc<World>,
    ctx: u64,
    /// Global rank of each group rank.
    members: Arc<[usize]>,
    rank: usize,
    seqs: Mutex<Sequences>,
    stats: Mutex<CommStats>,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess")
            .field("ctx", &self.ctx)
            .field("rank", &self.rank)
            .field("members", &self.members)
            .finish()
    }
}

impl InProcess {
    /// Runs `rank_fn` on `world_size` ranks, one OS thread each (named `reel-rank-{r}`), each with
    /// its world communicator, and returns every rank's result in rank order once all have
    /// returned. `timeout` bounds every blocking wait of every call (use the longest compute skew
    /// between ranks you accept; 2 s is plenty in tests).
    ///
    /// A rank that returns an error or panics aborts the world (its result is its error, or
    /// [`CommError::Panicked`]); the other ranks' pending and later calls fail with
    /// [`CommError::PeerFailed`]. `rank_fn` may borrow from the caller. `world_size` 0 runs nothing.
    pub fn spawn<T, E, F>(world_size: usize, timeout: Duration, rank_fn: F) -> Vec<Result<T, E>>
    where
        T: Send,
        E: From<CommError> + fmt::Display + Send,
        F: Fn(InProcess) -> Result<T, E> + Sync,
    {
        let world = Arc::new(World::new(world_size, timeout));
        let members: Arc<[usize]> = (0..world_size).collect();
        thread::scope(|scope| {
            let handles: Vec<_> = (0..world_size)
                .map(|r| {
                    let comm = InProcess::new(world.clone(), 0, members.clone(), r);
                    let (world, rank_fn) = (&world, &rank_fn);
                    let started = thread::Builder::new()
                        .name(format!("reel-rank-{r}"))
                        .stack_size(RANK_STACK_BYTES)
                        .spawn_scoped(scope, move || run_rank(world, r, comm, rank_fn));
                    started.map_err(|e| {
                        let detail = format!("cannot start the rank's thread: {e}");
                        world.abort(r, detail.clone());
                        world.exit(r);
                        CommError::Backend { rank: r, detail }
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| match h {
                    Ok(h) => h.join().unwrap_or_else(|payload| {
                        Err(E::from(CommError::Panicked {
                            rank: r,
                            message: panic_message(payload.as_ref()),
                        }))
                    }),
                    Err(e) => Err(E::from(e)),
                })
                .collect()
        })
    }

    fn new(world: Arc<World>, ctx: u64, members: Arc<[usize]>, rank: usize) -> Self {
        InProcess {
            world,
            ctx,
            members,
            rank,
            seqs: Mutex::new(Sequences::default()),
            stats: Mutex::new(CommStats::default()),
        }
    }

    /// This rank's position in the world (the rank errors name).
    pub fn global_rank(&self) -> usize {
        self.members[self.rank]
    }

    /// The global ranks of this communicator's group, in group order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The timeout of every blocking wait.
    pub fn timeout(&self) -> Duration {
        self.world.timeout
    }

    fn deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.world.timeout)
    }

    /// Puts a message for group rank `peer` in its mailbox; never blocks on the receiver.
    fn deposit(
        &self,
        op: Op,
        peer: usize,
        channel: Channel,
        data: Vec<f32>,
    ) -> Result<(), CommError> {
        let me = self.global_rank();
        self.world.check_aborted(op, me)?;
        let dst = self.members[peer];
        if dst != me && self.world.exited[dst].load(Ordering::SeqCst) {
            return Err(CommError::PeerExited {
                op,
                rank: me,
                peer: dst,
            });
        }
        let seq = {
            let mut seqs = lock(&self.seqs);
            let next = seqs.sent.entry((peer, channel)).or_insert(0);
            *next += 1;
            *next - 1
        };
        let key = Key {
            ctx: self.ctx,
            src: me,
            channel,
            seq,
        };
        let mb = &self.world.mailboxes[dst];
        lock(&mb.messages).insert(key, Message { op, data });
        mb.arrived.notify_all();
        Ok(())
    }

    /// Reserves the key of the next message from group rank `peer` on `channel`.
    fn post_recv(&self, peer: usize, channel: Channel) -> Key {
        let mut seqs = lock(&self.seqs);
        let next = seqs.posted.entry((peer, channel)).or_insert(0);
        *next += 1;
        Key {
            ctx: self.ctx,
            src: self.members[peer],
            channel,
            seq: *next - 1,
        }
    }

    /// Blocks until the message `key` arrives (it must come from operation `expect` and hold
    /// `len` values), the world aborts, its sender exits, or `deadline` passes.
    fn take(
        &self,
        op: Op,
        expect: Op,
        key: Key,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<f32>, CommError> {
        let me = self.global_rank();
        let peer = key.src;
        let mb = &self.world.mailboxes[me];
        let mut messages = lock(&mb.messages);
        let msg = loop {
            self.world.check_aborted(op, me)?;
            if let Some(msg) = messages.remove(&key) {
                break msg;
            }
            if peer != me && self.world.exited[peer].load(Ordering::SeqCst) {
                return Err(CommError::PeerExited { op, rank: me, peer });
            }
            messages = match deadline {
                None => mb.arrived.wait(messages).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        // Counted from the start of the call, like the deadline.
                        return Err(CommError::Timeout {
                            op,
                            rank: me,
                            peer,
                            waited: now - deadline + self.world.timeout,
                        });
                    }
                    mb.arrived
                        .wait_timeout(messages, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        };
        drop(messages);
        if msg.op != expect {
            return Err(CommError::Mismatch {
                op,
                rank: me,
                peer,
                detail: format!("expected a message of {expect}, got one of {}", msg.op),
            });
        }
        if msg.data.len() != len {
            return Err(CommError::Mismatch {
                op,
                rank: me,
                peer,
                detail: format!("expected {len} values, got {}", msg.data.len()),
            });
        }
        Ok(msg.data)
    }

    /// Aborts the world on `err` (every error is fatal) and returns it.
    fn fail(&self, err: CommError) -> CommError {
        self.world.abort(self.global_rank(), err.to_string());
        err
    }

    fn invalid(&self, op: Op, detail: String) -> CommError {
        CommError::InvalidArgument {
            op,
            rank: self.global_rank(),
            detail,
        }
    }

    /// Runs one collective: checks the world, runs `body` with this call's links and deadline,
    /// then records its bytes (on success) or aborts the world (on failure).
    fn collective<'s, R>(
        &'s self,
        op: Op,
        body: impl FnOnce(&Call<'s>) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let call = Call {
            comm: self,
            op,
            deadline: self.deadline(),
            bytes_sent: Default::default(),
            bytes_recv: Default::default(),
        };
        let out = self
            .world
            .check_aborted(op, self.global_rank())
            .and_then(|()| body(&call));
        match out {
            Ok(r) => {
                lock(&self.stats).record(op, call.bytes_sent.get(), call.bytes_recv.get());
                Ok(r)
            }
            Err(e) => Err(self.fail(e)),
        }
    }
}

fn run_rank<T, E, F>(world: &World, r: usize, comm: InProcess, rank_fn: &F) -> Result<T, E>
where
    E: From<CommError> + fmt::Display,
    F: Fn(InProcess) -> Result<T, E>,
{
    let out = match catch_unwind(AssertUnwindSafe(|| rank_fn(comm))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            world.abort(r, e.to_string());
            Err(e)
        }
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            world.abort(r, format!("panicked: {message}"));
            Err(E::from(CommError::Panicked { rank: r, message }))
        }
    };
    world.exit(r);
    out
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::from("(non-string panic payload)")
    }
}

/// The links of one collective call: the collective channel, the call's deadline, its bytes.
struct Call<'a> {
    comm: &'a InProcess,
    op: Op,
    deadline: Option<Instant>,
    bytes_sent: std::cell::Cell<u64>,
    bytes_recv: std::cell::Cell<u64>,
}

impl Links for Call<'_> {
    fn rank(&self) -> usize {
        self.comm.rank
    }

    fn size(&self) -> usize {
        self.comm.members.len()
    }

    fn send(&self, peer: usize, data: Vec<f32>) -> Result<(), CommError> {
        let bytes = 4 * data.len() as u64;
        self.comm
            .deposit(self.op, peer, Channel::Collective, data)?;
        if peer != self.comm.rank {
            self.bytes_sent.set(self.bytes_sent.get() + bytes);
        }
        Ok(())
    }

    fn recv(&self, peer: usize, len: usize) -> Result<Vec<f32>, CommError> {
        let key = self.comm.post_recv(peer, Channel::Collective);
        let data = self.comm.take(self.op, self.op, key, len, self.deadline)?;
        if peer != self.comm.rank {
            self.bytes_recv.set(self.bytes_recv.get() + 4 * len as u64);
        }
        Ok(data)
    }
}

/// A posted batch of the in-process backend: the keys of its receives.
#[derive(Debug)]
pub struct InProcessBatch<'a> {
    comm: &'a InProcess,
    /// (group rank of the source, key, length) per receive, in batch order.
    recvs: Vec<(usize, Key, usize)>,
}

impl Pending for InProcessBatch<'_> {
    fn wait(self) -> Result<Vec<Vec<f32>>, CommError> {
        let comm = self.comm;
        let deadline = comm.deadline();
        let mut out = Vec::with_capacity(self.recvs.len());
        for (peer, key, len) in self.recvs {
            let data = comm
                .take(Op::Recv, Op::Send, key, len, deadline)
                .map_err(|e| comm.fail(e))?;
            let bytes = if peer == comm.rank { 0 } else { 4 * len as u64 };
            lock(&comm.stats).record(Op::Recv, 0, bytes);
            out.push(data);
        }
        Ok(out)
    }
}

/// `(color, key)` as four f32 bit patterns, for the exchange inside `split` (moved and copied,
/// never computed on, so the bits survive).
fn encode_split(color: usize, key: usize) -> [f32; 4] {
    let (c, k) = (color as u64, key as u64);
    [c, c >> 32, k, k >> 32].map(|x| f32::from_bits(x as u32))
}

fn decode_split(v: &[f32]) -> (u64, u64) {
    let w = |i: usize| u64::from(v[i].to_bits());
    (w(0) | (w(1) << 32), w(2) | (w(3) << 32))
}

impl Communicator for InProcess {
    type Batch<'a> = InProcessBatch<'a>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.collective(Op::AllReduce, |l| algo::all_reduce_sum(l, buf))
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        let p = self.world_size();
        self.collective(Op::AllGather, |l| {
            let n = send.len();
            if recv.len() != p * n {
                return Err(self.invalid(
                    Op::AllGather,
                    format!("recv holds {} values, expected {p} × {n}", recv.len()),
                ));
            }
            recv[self.rank * n..(self.rank + 1) * n].copy_from_slice(send);
            algo::ring_all_gather(l, recv)
        })
    }

    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        let p = self.world_size();
        self.collective(Op::ReduceScatter, |l| {
            let n = recv.len();
            if send.len() != p * n {
                return Err(self.invalid(
                    Op::ReduceScatter,
                    format!("send holds {} values, expected {p} × {n}", send.len()),
                ));
            }
            recv.copy_from_slice(&algo::ring_reduce_scatter(l, send)?);
            Ok(())
        })
    }

    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        let p = self.world_size();
        self.collective(Op::AllToAll, |l| {
            if send.len() != recv.len() || !send.len().is_multiple_of(p) {
                return Err(self.invalid(
                    Op::AllToAll,
                    format!(
                        "send holds {} and recv {} values; both must be the same multiple of {p}",
                        send.len(),
                        recv.len()
                    ),
                ));
            }
            algo::all_to_all(l, send, recv)
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let p = self.world_size();
        self.collective(Op::Broadcast, |l| {
            if root >= p {
                return Err(self.invalid(
                    Op::Broadcast,
                    format!("root {root} is not a rank of a group of {p}"),
                ));
            }
            algo::broadcast(l, buf, root)
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.collective(Op::Barrier, algo::barrier)
    }

    fn start(&self, ops: Vec<P2pOp>) -> Result<InProcessBatch<'_>, CommError> {
        let me = self.global_rank();
        let p = self.world_size();
        let first_op = match ops.first() {
            Some(P2pOp::Recv { .. }) => Op::Recv,
            _ => Op::Send,
        };
        self.world
            .check_aborted(first_op, me)
            .map_err(|e| self.fail(e))?;
        for op in &ops {
            let (kind, peer) = match op {
                P2pOp::Send { peer, .. } => (Op::Send, *peer),
                P2pOp::Recv { peer, .. } => (Op::Recv, *peer),
            };
            if peer >= p {
                let e = self.invalid(kind, format!("peer {peer} is not a rank of a group of {p}"));
                return Err(self.fail(e));
            }
        }
        let mut recvs = Vec::new();
        for op in ops {
            match op {
                P2pOp::Send { peer, tag, data } => {
                    let bytes = if peer == self.rank {
                        0
                    } else {
                        4 * data.len() as u64
                    };
                    self.deposit(Op::Send, peer, Channel::Tag(tag), data)
                        .map_err(|e| self.fail(e))?;
                    lock(&self.stats).record(Op::Send, bytes, 0);
                }
                P2pOp::Recv { peer, tag, len } => {
                    recvs.push((peer, self.post_recv(peer, Channel::Tag(tag)), len));
                }
            }
        }
        Ok(InProcessBatch { comm: self, recvs })
    }

    fn split(&self, color: usize, key: usize) -> Result<InProcess, CommError> {
        let p = self.world_size();
        self.collective(Op::Split, |l| {
            let mut all = vec![0.0f32; 4 * p];
            all[4 * self.rank..4 * self.rank + 4].copy_from_slice(&encode_split(color, key));
            algo::ring_all_gather(l, &mut all)?;
            let entries: Vec<(u64, u64)> = all.chunks_exact(4).map(decode_split).collect();
            let mine = color as u64;
            let mut group: Vec<usize> = (0..p).filter(|&q| entries[q].0 == mine).collect();
            group.sort_by_key(|&q| (entries[q].1, q));
            let rank = group.iter().position(|&q| q == self.rank).unwrap_or(0);
            let members: Arc<[usize]> = group.iter().map(|&q| self.members[q]).collect();
            let split = {
                let mut seqs = lock(&self.seqs);
                seqs.splits += 1;
                seqs.splits - 1
            };
            let ctx = self.world.context(self.ctx, split, color);
            Ok(InProcess::new(self.world.clone(), ctx, members, rank))
        })
    }

    fn stats(&self) -> CommStats {
        *lock(&self.stats)
    }

    fn reset_stats(&self) {
        *lock(&self.stats) = CommStats::default();
    }
}
