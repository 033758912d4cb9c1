//! In-process ranks on device buffers: several ranks of one process, each a thread with its own
//! [`Gpu`] (its own stream, [`Gpu::open_on_new_stream`]) on one device, exchanging device
//! buffers point to point. Used to run and time sequence-parallel attention schedules on one GPU.
//!
//! A message is a list of device byte ranges ([`DevPart`]) sent by rank `from` to rank `to` under
//! a tag. Both sides post (`send` / `recv`) without blocking: posting records an event on the
//! poster's stream (the source is written, or the destination allocated, up to here). When both
//! sides have posted, the copies are enqueued on the SENDER's communication stream (a second
//! stream of the sender), after both events, and one "copied" event is recorded; `wait` blocks
//! the host only until the peer has posted (a host rendezvous, with a timeout), then makes the
//! waiting rank's stream wait for "copied" on the device. So a transfer overlaps whatever the
//! ranks' streams do meanwhile, as NCCL's point-to-point would across GPUs; on one GPU the copy
//! is a device-to-device memcpy.
//!
//! Matching is by (from, to, epoch, tag): every rank starts each collective call (a forward or
//! backward pass) with [`DeviceComm::next_epoch`], in the same order, so tags may repeat across
//! calls. A failing rank calls [`DeviceComm::abort`]; every wait then fails at once.
//!
//! Lifetimes: the sender keeps its source alive until its `wait`, the receiver its destination
//! (allocated on its own stream) until after its `wait`; then both are ordered after "copied".
//!
//! [`DeviceP2p`] is what a device schedule needs of any such communicator (`GpuDistAttn` is
//! generic over it): post a batch of tagged sends and receives of device parts from the caller's
//! stream, complete it onto the caller's stream, rank and world, abort. Two implementations:
//! [`DeviceComm`] (in-process ranks, here) and `NcclP2p` (one process per GPU, `nccl.rs`).
//! [`DeviceGroup`] adds the sum all-reduce of a device buffer, what a sequence-parallel
//! `GpuQwen2` rank needs besides attention (its gradients): `DeviceComm`'s ring over its own
//! transfers (`collective.rs`), or ncclAllReduce for `NcclP2p`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{result as dres, CudaEvent, CudaStream};

use crate::buffer::DevRead;
use crate::{Gpu, GpuError, Result};

/// A device byte range of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPart {
    pub ptr: u64,
    pub bytes: usize,
}

impl DevPart {
    /// All of `buf` (a [`crate::DeviceBuf`] or a view).
    pub fn of<T>(buf: &impl DevRead<T>) -> DevPart {
        DevPart {
            ptr: buf.dptr(),
            bytes: buf.dlen() * size_of::<T>(),
        }
    }
}

/// One operation of a batch posted through [`DeviceP2p::post`].
#[derive(Clone, Copy, Debug)]
pub enum DevOp<'a> {
    /// Send `parts` (written by the caller's stream up to the post) to rank `to`.
    Send {
        to: usize,
        tag: u64,
        parts: &'a [DevPart],
    },
    /// Receive rank `from`'s message `tag` into `parts` (sizes equal the sender's, part by part).
    Recv {
        from: usize,
        tag: u64,
        parts: &'a [DevPart],
    },
}

impl DevOp<'_> {
    pub fn tag(&self) -> u64 {
        match self {
            DevOp::Send { tag, .. } | DevOp::Recv { tag, .. } => *tag,
        }
    }
}

/// Point-to-point exchange of device buffers between the ranks of a world, ordered on the
/// callers' streams (module docs). The rules every implementation keeps:
///
/// - Every rank starts each pass with [`DeviceP2p::next_epoch`] and posts its batches in the same
///   order as its peers (the k-th batch of one rank holding its messages with the k-th batch of
///   each peer), with tags unique within a pass per ordered pair of ranks.
/// - [`DeviceP2p::post`] returns without waiting for the peers; the transfers start once the
///   caller's stream has reached the post (sources written, destinations allocated).
/// - [`DeviceP2p::complete`] returns once the batch's transfers are done or ordered before
///   whatever the caller's stream runs next; sources and destinations stay allocated and
///   untouched until it returns. It fails, instead of hanging, when a peer does not take part
///   within the communicator's timeout or the world was aborted.
/// - Byte counters count payload bytes sent to other ranks.
pub trait DeviceP2p {
    /// A posted batch, to give back to [`DeviceP2p::complete`].
    type Posted;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Starts a new pass; returns its number.
    fn next_epoch(&self) -> u64;
    /// (bytes, messages) this rank has sent so far.
    fn sent(&self) -> (u64, u64);
    /// Posts `ops` from `gpu`'s stream.
    fn post(&self, gpu: &Gpu, ops: &[DevOp<'_>]) -> Result<Self::Posted>;
    /// Completes a posted batch onto `gpu`'s stream.
    fn complete(&self, gpu: &Gpu, posted: Self::Posted) -> Result<()>;
    /// Fails this rank's later calls and, as far as the backend can, its peers'.
    fn abort(&self, why: &str);
}

/// A [`DeviceP2p`] world that can also sum a device buffer over its ranks: what a
/// sequence-parallel `GpuQwen2` rank runs over (attention through `GpuDistAttn`, gradients
/// through [`DeviceGroup::all_reduce_sum_dev`]).
pub trait DeviceGroup: DeviceP2p {
    /// Sums `buf` over every rank, in place; every rank calls it with its `Gpu` in the same order
    /// as its other calls, and every rank ends with bit-identical values. Ordered after the work
    /// `gpu`'s stream holds; the result is ready for whatever `gpu`'s stream runs next. A failure
    /// aborts the world.
    fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut crate::DeviceBuf<f32>) -> Result<()>;

    /// Sums `buf` over every rank and leaves rank r the sum of its chunk r of P equal chunks
    /// (the length a multiple of P), in place; the other chunks are left undefined. The same
    /// ordering and failure rules as [`DeviceGroup::all_reduce_sum_dev`].
    fn reduce_scatter_sum_dev(
        &self,
        gpu: &Gpu,
        buf: &mut crate::buffer::DViewMut<'_, f32>,
    ) -> Result<()>;

    /// Gives every rank each rank r's chunk r of `buf` (P equal chunks), in place.
    fn all_gather_dev(&self, gpu: &Gpu, buf: &mut crate::buffer::DViewMut<'_, f32>) -> Result<()>;

    /// Sums `buf` over every rank onto rank `root`, in place: the root's `buf` ends holding the
    /// sum, the others' are left undefined. The same ordering and failure rules as
    /// [`DeviceGroup::all_reduce_sum_dev`].
    fn reduce_sum_dev(
        &self,
        gpu: &Gpu,
        buf: &mut crate::buffer::DViewMut<'_, f32>,
        root: usize,
    ) -> Result<()>;

    /// The collective counters of the communicator under the group (its
    /// [`reel_comm::Communicator::stats`]: the gradient all-reduces), where it keeps them;
    /// `None` by default (point-to-point traffic is [`DeviceP2p::sent`]).
    fn collective_stats(&self) -> Option<reel_comm::CommStats> {
        None
    }
}

type Key = (usize, usize, u64, u64);

struct SendSide {
    parts: Vec<DevPart>,
    ready: CudaEvent,
    stream: Arc<CudaStream>,
}

struct RecvSide {
    parts: Vec<DevPart>,
    ready: CudaEvent,
}

#[derive(Default)]
struct Slot {
    send: Option<SendSide>,
    recv: Option<RecvSide>,
    copied: Option<Arc<CudaEvent>>,
    error: Option<String>,
    collected: u8,
}

#[derive(Default)]
struct State {
    slots: HashMap<Key, Slot>,
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// The ranks of one in-process world; [`DeviceWorld::comm`] makes each rank's endpoint.
#[derive(Clone)]
pub struct DeviceWorld {
    shared: Arc<Shared>,
}

impl DeviceWorld {
    /// A world of `world` ranks; a `wait` whose peer has not posted within `timeout` fails.
    pub fn new(world: usize, timeout: Duration) -> DeviceWorld {
        DeviceWorld {
            shared: Arc::new(Shared {
                world,
                timeout,
                state: Mutex::new(State::default()),
                cv: Condvar::new(),
            }),
        }
    }

    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Rank `rank`'s endpoint, sending on a new communication stream of `gpu`'s device.
    pub fn comm(&self, rank: usize, gpu: &Gpu) -> Result<DeviceComm> {
        if rank >= self.shared.world {
            return Err(GpuError::Comm(format!(
                "rank {rank} outside a world of {}",
                self.shared.world
            )));
        }
        gpu.bind()?;
        Ok(DeviceComm {
            rank,
            shared: self.shared.clone(),
            stream: gpu.ctx.new_stream()?,
            epoch: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
        })
    }
}

/// One rank's endpoint (module docs). Use it from the rank's thread, with the rank's `Gpu`.
pub struct DeviceComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Where this rank's sends are copied.
    stream: Arc<CudaStream>,
    epoch: AtomicU64,
    bytes_sent: AtomicU64,
    messages_sent: AtomicU64,
}

/// A posted send or receive; give it back to [`DeviceComm::wait`].
#[must_use = "a posted transfer must be waited for"]
pub struct Transfer {
    key: Key,
}

impl DeviceComm {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Starts a new call (module docs): every rank calls it once per pass, in the same order.
    pub fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn epoch_now(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// (bytes, messages) this rank has sent so far.
    pub fn sent(&self) -> (u64, u64) {
        (
            self.bytes_sent.load(Ordering::Relaxed),
            self.messages_sent.load(Ordering::Relaxed),
        )
    }

    /// Fails every rank's pending and later waits with `why`.
    pub fn abort(&self, why: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.aborted.is_none() {
            st.aborted = Some(format!("rank {} aborted: {why}", self.rank));
        }
        self.shared.cv.notify_all();
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.shared.world || peer == self.rank {
            return Err(GpuError::Comm(format!(
                "rank {}: peer {peer} is not another rank of a world of {}",
                self.rank, self.shared.world
            )));
        }
        Ok(())
    }

    /// Posts `parts` (written by `gpu`'s stream up to now) to rank `to` under `tag`. The parts
    /// must stay allocated and unchanged until [`DeviceComm::wait`] returns.
    pub fn send(&self, gpu: &Gpu, to: usize, tag: u64, parts: &[DevPart]) -> Result<Transfer> {
        self.check_peer(to)?;
        gpu.bind()?;
        let ready = gpu.stream.record_event(None)?;
        let key = (self.rank, to, self.epoch_now(), tag);
        let bytes: usize = parts.iter().map(|p| p.bytes).sum();
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.post(
            key,
            Some(SendSide {
                parts: parts.to_vec(),
                ready,
                stream: self.stream.clone(),
            }),
            None,
        )
    }

    /// Posts receive buffers `parts` (allocated on `gpu`'s stream) for rank `from`'s message
    /// `tag`; sizes must equal the sender's, part by part.
    pub fn recv(&self, gpu: &Gpu, from: usize, tag: u64, parts: &[DevPart]) -> Result<Transfer> {
        self.check_peer(from)?;
        gpu.bind()?;
        let ready = gpu.stream.record_event(None)?;
        let key = (from, self.rank, self.epoch_now(), tag);
        self.post(
            key,
            None,
            Some(RecvSide {
                parts: parts.to_vec(),
                ready,
            }),
        )
    }

    fn post(&self, key: Key, send: Option<SendSide>, recv: Option<RecvSide>) -> Result<Transfer> {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.aborted {
            return Err(GpuError::Comm(why.clone()));
        }
        let slot = st.slots.entry(key).or_default();
        let dup =
            (send.is_some() && slot.send.is_some()) || (recv.is_some() && slot.recv.is_some());
        if dup {
            return Err(GpuError::Comm(format!(
                "message {} → {} tag {:#x} posted twice in one call",
                key.0, key.1, key.3
            )));
        }
        if send.is_some() {
            slot.send = send;
        }
        if recv.is_some() {
            slot.recv = recv;
        }
        if let (Some(s), Some(r)) = (&slot.send, &slot.recv) {
            match enqueue_copy(s, r) {
                Ok(ev) => slot.copied = Some(Arc::new(ev)),
                Err(e) => {
                    slot.error = Some(format!(
                        "message {} → {} tag {:#x}: {e}",
                        key.0, key.1, key.3
                    ))
                }
            }
            // The sides' events and part lists are no longer needed.
            slot.send = None;
            slot.recv = None;
            slot.collected = 0;
            self.shared.cv.notify_all();
        }
        Ok(Transfer { key })
    }

    /// Blocks until the peer has posted its side, then makes `gpu`'s stream wait (on the device)
    /// until the copy is done. Fails on a size mismatch, an abort, or after the world's timeout.
    pub fn wait(&self, gpu: &Gpu, t: Transfer) -> Result<()> {
        let deadline = Instant::now() + self.shared.timeout;
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let ev = loop {
            if let Some(why) = &st.aborted {
                return Err(GpuError::Comm(why.clone()));
            }
            let slot = st
                .slots
                .get_mut(&t.key)
                .ok_or_else(|| GpuError::Comm(format!("transfer {:?} waited twice", t.key)))?;
            if let Some(e) = &slot.error {
                return Err(GpuError::Comm(e.clone()));
            }
            if let Some(ev) = &slot.copied {
                let ev = ev.clone();
                slot.collected += 1;
                if slot.collected == 2 {
                    st.slots.remove(&t.key);
                }
                break ev;
            }
            let now = Instant::now();
            if now >= deadline {
                let (from, to, _, tag) = t.key;
                let missing = if from == self.rank { to } else { from };
                return Err(GpuError::Comm(format!(
                    "rank {}: message {from} → {to} tag {tag:#x}: rank {missing} did not post its side within {:?}",
                    self.rank, self.shared.timeout
                )));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(st);
        gpu.bind()?;
        gpu.stream.wait(&ev)?;
        Ok(())
    }
}

impl DeviceP2p for DeviceComm {
    /// Each operation's transfer, in batch order.
    type Posted = Vec<Transfer>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn next_epoch(&self) -> u64 {
        DeviceComm::next_epoch(self)
    }

    fn sent(&self) -> (u64, u64) {
        DeviceComm::sent(self)
    }

    fn post(&self, gpu: &Gpu, ops: &[DevOp<'_>]) -> Result<Vec<Transfer>> {
        ops.iter()
            .map(|op| match *op {
                DevOp::Send { to, tag, parts } => self.send(gpu, to, tag, parts),
                DevOp::Recv { from, tag, parts } => self.recv(gpu, from, tag, parts),
            })
            .collect()
    }

    fn complete(&self, gpu: &Gpu, posted: Vec<Transfer>) -> Result<()> {
        for t in posted {
            self.wait(gpu, t)?;
        }
        Ok(())
    }

    fn abort(&self, why: &str) {
        DeviceComm::abort(self, why)
    }
}

/// Enqueues the copies of a matched message on the sender's communication stream, after both
/// sides' events; the event recorded after them.
fn enqueue_copy(s: &SendSide, r: &RecvSide) -> Result<CudaEvent> {
    if s.parts.len() != r.parts.len()
        || s.parts
            .iter()
            .zip(&r.parts)
            .any(|(a, b)| a.bytes != b.bytes)
    {
        let sizes = |p: &[DevPart]| p.iter().map(|x| x.bytes).collect::<Vec<_>>();
        return Err(GpuError::Comm(format!(
            "sent parts of {:?} bytes, receive buffers of {:?}",
            sizes(&s.parts),
            sizes(&r.parts)
        )));
    }
    s.stream.context().bind_to_thread()?;
    s.stream.wait(&s.ready)?;
    s.stream.wait(&r.ready)?;
    for (src, dst) in s.parts.iter().zip(&r.parts) {
        if src.bytes > 0 {
            // SAFETY: both ranges are live device allocations of `bytes` bytes (the posters keep
            // them until their waits, which come after this copy on the device).
            unsafe { dres::memcpy_dtod_async(dst.ptr, src.ptr, src.bytes, s.stream.cu_stream()) }?;
        }
    }
    Ok(s.stream.record_event(None)?)
}

/// `world` in-process ranks on device `ordinal`: one [`Gpu`] (own stream) and one
/// [`DeviceComm`] each, run on one thread per rank by [`DeviceRanks::run`].
pub struct DeviceRanks {
    gpus: Vec<Gpu>,
    comms: Vec<DeviceComm>,
}

impl DeviceRanks {
    pub fn open(ordinal: usize, world: usize, timeout: Duration) -> Result<DeviceRanks> {
        let w = DeviceWorld::new(world, timeout);
        let mut gpus = Vec::with_capacity(world);
        let mut comms = Vec::with_capacity(world);
        for r in 0..world {
            let g = Gpu::open_on_new_stream(ordinal)?;
            comms.push(w.comm(r, &g)?);
            gpus.push(g);
        }
        Ok(DeviceRanks { gpus, comms })
    }

    pub fn world_size(&self) -> usize {
        self.gpus.len()
    }

    /// Rank `r`'s `Gpu` (to upload its inputs from this thread, say).
    pub fn gpu(&self, r: usize) -> &Gpu {
        &self.gpus[r]
    }

    /// Runs `f(rank, gpu, comm)` on one thread per rank and waits for all; a rank's error aborts
    /// the world (the others fail at their next wait) and the first error that is not an abort
    /// is returned.
    pub fn run<R: Send>(
        &mut self,
        f: impl Fn(usize, &Gpu, &DeviceComm) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        let f = &f;
        let results: Vec<Result<R>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .gpus
                .iter_mut()
                .zip(&self.comms)
                .enumerate()
                .map(|(r, (g, c))| {
                    s.spawn(move || {
                        let out = f(r, g, c);
                        if let Err(e) = &out {
                            c.abort(&e.to_string());
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join()
                        .unwrap_or_else(|_| Err(GpuError::Comm(format!("rank {r} panicked"))))
                })
                .collect()
        });
        let mut first_abort = None;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(v) => out.push(v),
                Err(e) => {
                    let is_abort = matches!(&e, GpuError::Comm(m) if m.contains("aborted"));
                    if !is_abort {
                        return Err(e);
                    }
                    first_abort.get_or_insert(e);
                }
            }
        }
        match first_abort {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}
