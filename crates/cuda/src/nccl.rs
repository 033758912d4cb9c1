//! NCCL as a [`reel_comm::Communicator`] backend: one process per GPU, started by a launcher
//! (`reel launch`, [`reel_comm::launch`]) and joined by a TCP rendezvous
//! ([`reel_comm::bootstrap`]: rank 0 sends NCCL's 128-byte unique id to every other rank), so a
//! world spans nodes.
//!
//! - Host buffers (`&[f32]`, the trait) are staged: upload, the collective on the communicator's
//!   stream, wait, download. The `*_dev` methods take [`DeviceBuf`]s and skip the staging (the
//!   communicator's stream first waits for the buffer's stream).
//! - Collectives map one to one (ncclAllReduce, ncclAllGather, ncclReduceScatter, ncclBroadcast);
//!   all-to-all is a group of ncclSend/ncclRecv (the own chunk a device copy); barrier is a
//!   one-element all-reduce. Layouts are those of the trait (rank-major `[P, n]`).
//! - The communicator is non-blocking (`ncclConfig_t.blocking = 0`): every NCCL call returns at
//!   once and every wait — init, enqueue, completion of the stream — polls
//!   `ncclCommGetAsyncError` and a CUDA event until the communicator's deadline. On a timeout or
//!   an NCCL error the communicator calls `ncclCommAbort`, reports [`CommError::Timeout`] or
//!   [`CommError::PeerFailed`], and every later call fails the same way; a rank whose peer exited
//!   therefore fails within its timeout instead of hanging. NCCL does not say which rank is late in
//!   a collective: there `peer` is this rank's ring successor.
//! - Point-to-point ([`Communicator::start`]): one NCCL group per batch. NCCL has no tags and
//!   matches messages between two ranks in posting order, and a send completes only once the
//!   receive is posted (no buffering). The rule here: **messages between two ranks are received in
//!   the order they were sent, whatever their tags** (a strengthening of the trait's per-tag order),
//!   and a batch's sends need their receives posted in a batch that can run at the same time (post
//!   both directions of an exchange in one batch each, as ring code does). The rule is checked:
//!   every message carries a 4-word header (tag, length, sequence number per ordered pair of
//!   ranks) and a receive that gets another tag, length or message reports
//!   [`CommError::Mismatch`] rather than delivering the wrong data.
//! - [`Communicator::split`] is ncclCommSplit (plus an all-gather of global ranks, so errors name
//!   global ranks). Byte counters follow `reel_comm::stats` via
//!   [`reel_comm::stats::convention_bytes`] (NCCL's ring moves those bytes; nothing is measured).
//!
//! NCCL is loaded by cudarc as `libnccl.so`; pip's NCCL has only `libnccl.so.2`, so programs start
//! through [`crate::libs::reexec_with_library_path`] (its shim links the name). Where no driver,
//! device or NCCL is found, [`NcclComm::init`] returns [`CommError::Backend`] saying which.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{result as dres, CudaContext, CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::sys as nsys;
use reel_comm::stats::convention_bytes;
use reel_comm::{bootstrap, CommError, CommStats, Communicator, Op, P2pOp, Pending};

use crate::buffer::{DViewMut, DevRead, DeviceBuf};
use crate::devcomm::{DevOp, DeviceGroup, DeviceP2p};
use crate::{catch, libs, Gpu, GpuError};

/// Words in front of every point-to-point message: tag (2 words), length, sequence number.
pub const HEADER_WORDS: usize = 4;

/// The header of the `seq`-th message from one rank to another (bit patterns in f32 words; NCCL
/// moves them as bytes).
pub fn encode_header(tag: u64, len: usize, seq: u64) -> [f32; HEADER_WORDS] {
    [
        f32::from_bits(tag as u32),
        f32::from_bits((tag >> 32) as u32),
        f32::from_bits(len as u32),
        f32::from_bits(seq as u32),
    ]
}

/// Checks a received header against what the receive expected; the error says what differs.
pub fn check_header(h: &[f32], tag: u64, len: usize, seq: u64) -> Result<(), String> {
    if h.len() < HEADER_WORDS {
        return Err(format!("message of {} words has no header", h.len()));
    }
    let got_tag = u64::from(h[0].to_bits()) | (u64::from(h[1].to_bits()) << 32);
    let got_len = h[2].to_bits() as usize;
    let got_seq = h[3].to_bits();
    if got_seq != seq as u32 {
        return Err(format!(
            "expected message {seq} from this peer, got message {got_seq}"
        ));
    }
    if got_tag != tag {
        return Err(format!(
            "expected tag {tag}, the peer sent tag {got_tag}: NCCL delivers messages between two \
             ranks in posting order, so post them in the same order on both sides"
        ));
    }
    if got_len != len {
        return Err(format!("expected {len} values, the peer sent {got_len}"));
    }
    Ok(())
}

/// Sequence numbers of point-to-point messages per (peer, direction): the n-th message one rank
/// sends another is the n-th that one receives from it.
#[derive(Debug, Default)]
pub struct SeqCounters {
    next: HashMap<(usize, bool), u64>,
}

impl SeqCounters {
    /// The number of the next message to (`send`) or from `peer`, counted.
    pub fn take(&mut self, peer: usize, send: bool) -> u64 {
        let n = self.next.entry((peer, send)).or_insert(0);
        *n += 1;
        *n - 1
    }
}

enum Failure {
    Timeout,
    Nccl(nsys::ncclResult_t, String),
    Cuda(String),
    Mismatch(String),
}

fn nccl_name(r: nsys::ncclResult_t) -> String {
    // SAFETY: returns a static string.
    let p = unsafe { nsys::ncclGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: NUL-terminated static string from NCCL.
        format!("{r:?} ({})", unsafe { CStr::from_ptr(p) }.to_string_lossy())
    }
}

/// A non-blocking config (every other field NCCL's default).
fn config() -> nsys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    nsys::ncclConfig_t {
        size: std::mem::size_of::<nsys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `comm`'s state until it leaves `ncclInProgress` or `deadline` passes.
fn settle(comm: nsys::ncclComm_t, deadline: Instant) -> Result<(), Failure> {
    let mut spins = 0u32;
    loop {
        let mut st = nsys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator; `st` a local.
        let r = unsafe { nsys::ncclCommGetAsyncError(comm, &mut st) };
        if r != nsys::ncclResult_t::ncclSuccess {
            return Err(Failure::Nccl(r, "ncclCommGetAsyncError".into()));
        }
        match st {
            nsys::ncclResult_t::ncclSuccess => return Ok(()),
            nsys::ncclResult_t::ncclInProgress => {}
            e => return Err(Failure::Nccl(e, last_error(comm))),
        }
        if Instant::now() > deadline {
            return Err(Failure::Timeout);
        }
        spin(&mut spins);
    }
}

fn spin(spins: &mut u32) {
    *spins += 1;
    if *spins < 1000 {
        std::hint::spin_loop();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn last_error(comm: nsys::ncclComm_t) -> String {
    // SAFETY: NCCL returns a NUL-terminated string owned by the communicator (or null).
    let p = unsafe { nsys::ncclGetLastError(comm) };
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: as above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn ok_or_progress(r: nsys::ncclResult_t) -> Result<(), nsys::ncclResult_t> {
    match r {
        nsys::ncclResult_t::ncclSuccess | nsys::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(e),
    }
}

const F32: nsys::ncclDataType_t = nsys::ncclDataType_t::ncclFloat32;

/// One NCCL group of sends and receives `(is_send, peer, device pointer, count)` of `dtype` on
/// `stream`: the first failing call's result, else `ncclGroupEnd`'s. The group is closed
/// before returning.
///
/// # Safety
/// Every pointer is a live device range of `count` elements of `dtype` on the communicator's
/// device, kept until the group's work has completed on `stream`.
unsafe fn grouped_p2p(
    calls: &[(bool, usize, u64, usize)],
    dtype: nsys::ncclDataType_t,
    comm: nsys::ncclComm_t,
    stream: nsys::cudaStream_t,
) -> nsys::ncclResult_t {
    let mut res = nsys::ncclGroupStart();
    for &(send, peer, ptr, n) in calls {
        if ok_or_progress(res).is_err() {
            break;
        }
        res = if send {
            nsys::ncclSend(ptr as *const c_void, n, dtype, peer as i32, comm, stream)
        } else {
            nsys::ncclRecv(ptr as *mut c_void, n, dtype, peer as i32, comm, stream)
        };
    }
    let end = nsys::ncclGroupEnd();
    if ok_or_progress(res).is_err() {
        res
    } else {
        end
    }
}

/// One rank's NCCL communicator on one GPU (see the module docs).
pub struct NcclComm {
    comm: nsys::ncclComm_t,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    rank: usize,
    world: usize,
    /// Global rank of each member of this group.
    members: Vec<usize>,
    timeout: Duration,
    stats: Mutex<CommStats>,
    seq: Mutex<SeqCounters>,
    /// Why the communicator was aborted, once it was.
    failed: Mutex<Option<(usize, String)>>,
    /// A one-element device buffer for barriers.
    scratch: Mutex<CudaSlice<f32>>,
}

// SAFETY: the raw communicator is used from one thread at a time (`&self` methods serialise on
// the stream; the trait needs `Send` only).
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // Every call of this communicator has completed or been aborted; abort frees it without
        // waiting for peers.
        if lock(&self.failed).is_none() {
            // SAFETY: live communicator, not used after this.
            unsafe { nsys::ncclCommAbort(self.comm) };
        }
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, global {})",
            self.rank,
            self.world,
            self.global_rank()
        )
    }
}

impl NcclComm {
    /// Joins a world of `world` processes as `rank`, on CUDA device `ordinal`: rendezvous at
    /// `rendezvous` (`host:port` where rank 0 listens), then ncclCommInitRankConfig. `timeout`
    /// bounds the rendezvous, the init and every later wait.
    pub fn init(
        rank: usize,
        world: usize,
        rendezvous: &str,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let backend = |detail: String| CommError::Backend { rank, detail };
        if rank >= world {
            return Err(backend(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        let start = Instant::now();
        let deadline = start + timeout;
        let ctx = open_device(ordinal).map_err(|e| backend(e.to_string()))?;
        nccl_present().map_err(backend)?;
        let mut payload = vec![0u8; 128];
        if rank == 0 {
            let mut id = nsys::ncclUniqueId { internal: [0; 128] };
            // SAFETY: writes the id into a local.
            let r = unsafe { nsys::ncclGetUniqueId(&mut id) };
            ok_or_progress(r).map_err(|e| backend(format!("ncclGetUniqueId: {}", nccl_name(e))))?;
            payload = id.internal.iter().map(|&c| c as u8).collect();
        }
        let id = bootstrap::exchange(rank, world, rendezvous, &payload, timeout)
            .map_err(|e| backend(e.to_string()))?;
        if id.len() != 128 {
            return Err(backend(format!(
                "rank 0 sent a {}-byte id, NCCL's is 128",
                id.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id) {
            *d = *s as std::ffi::c_char;
        }
        ctx.bind_to_thread()
            .map_err(|e| backend(format!("CUDA: {e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| backend(format!("CUDA stream: {e:?}")))?;
        let mut comm: nsys::ncclComm_t = std::ptr::null_mut();
        let mut cfg = config();
        // SAFETY: valid out-pointer and config; the id came from rank 0's ncclGetUniqueId.
        let r = unsafe {
            nsys::ncclCommInitRankConfig(
                &mut comm,
                world as i32,
                nsys::ncclUniqueId { internal },
                rank as i32,
                &mut cfg,
            )
        };
        if let Err(e) = ok_or_progress(r) {
            return Err(backend(format!("ncclCommInitRankConfig: {}", nccl_name(e))));
        }
        if let Err(f) = settle(comm, deadline) {
            // SAFETY: abort a communicator that failed to initialise.
            unsafe { nsys::ncclCommAbort(comm) };
            return Err(match f {
                Failure::Timeout => backend(format!(
                    "NCCL init of rank {rank} of {world} timed out after {:?}",
                    start.elapsed()
                )),
                Failure::Nccl(e, msg) => {
                    backend(format!("NCCL init failed: {} {msg}", nccl_name(e)))
                }
                Failure::Cuda(m) | Failure::Mismatch(m) => backend(m),
            });
        }
        let scratch = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| backend(format!("CUDA alloc: {e:?}")))?;
        Ok(NcclComm {
            comm,
            stream,
            ctx,
            rank,
            world,
            members: (0..world).collect(),
            timeout,
            stats: Mutex::new(CommStats::default()),
            seq: Mutex::new(SeqCounters::default()),
            failed: Mutex::new(None),
            scratch: Mutex::new(scratch),
        })
    }

    /// Joins the world a launcher described (`RANK`, `WORLD_SIZE`, `REEL_RENDEZVOUS`; see
    /// [`reel_comm::launch`]) on device `LOCAL_RANK`.
    pub fn from_env(timeout: Duration) -> Result<Self, CommError> {
        let bad = |detail: String| CommError::Backend { rank: 0, detail };
        let (rank, world, rdv) = reel_comm::launch::from_env()
            .map_err(bad)?
            .ok_or_else(|| bad("RANK is not set: start the ranks with `reel launch`".into()))?;
        let local = std::env::var(reel_comm::launch::ENV_LOCAL_RANK)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(rank);
        Self::init(rank, world, &rdv, local, timeout)
    }

    /// This rank's position in the world.
    pub fn global_rank(&self) -> usize {
        self.members[self.rank]
    }

    /// The deadline of every wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Copies host values to a new device buffer on this communicator's device.
    pub fn upload(&self, host: &[f32]) -> Result<DeviceBuf<f32>, CommError> {
        self.bind(Op::Broadcast)?;
        let slice = self
            .stream
            .clone_htod(host)
            .map_err(|e| self.backend(format!("upload: {e:?}")))?;
        Ok(DeviceBuf { slice })
    }

    /// Copies a device buffer to the host (waits for this communicator's stream).
    pub fn download(&self, buf: &DeviceBuf<f32>) -> Result<Vec<f32>, CommError> {
        self.bind(Op::Broadcast)?;
        self.stream
            .join(buf.slice.stream())
            .and_then(|_| self.stream.clone_dtoh(&buf.slice))
            .map_err(|e| self.backend(format!("download: {e:?}")))
    }

    fn backend(&self, detail: String) -> CommError {
        CommError::Backend {
            rank: self.global_rank(),
            detail,
        }
    }

    fn bind(&self, op: Op) -> Result<(), CommError> {
        if let Some((peer, reason)) = lock(&self.failed).clone() {
            return Err(CommError::PeerFailed {
                op,
                rank: self.global_rank(),
                peer,
                reason,
            });
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.backend(format!("CUDA: {e:?}")))
    }

    /// Aborts the communicator (once) and turns `f` into the error of `op`.
    fn fail(&self, op: Op, peer: Option<usize>, f: Failure) -> CommError {
        let me = self.global_rank();
        let peer_g = self.members[peer.unwrap_or((self.rank + 1) % self.world)];
        let err = match f {
            Failure::Timeout => CommError::Timeout {
                op,
                rank: me,
                peer: peer_g,
                waited: self.timeout,
            },
            Failure::Nccl(e, msg) => CommError::PeerFailed {
                op,
                rank: me,
                peer: peer_g,
                reason: format!("NCCL reports {} {msg}", nccl_name(e)),
            },
            Failure::Cuda(m) => CommError::Backend {
                rank: me,
                detail: format!("{op}: {m}"),
            },
            Failure::Mismatch(detail) => CommError::Mismatch {
                op,
                rank: me,
                peer: peer_g,
                detail,
            },
        };
        let mut failed = lock(&self.failed);
        if failed.is_none() {
            *failed = Some((peer_g, err.to_string()));
            // SAFETY: live communicator; aborting unblocks its kernels and, through NCCL's
            // connections, its peers.
            unsafe { nsys::ncclCommAbort(self.comm) };
        }
        err
    }

    /// Runs `enqueue` (NCCL calls on the stream), then waits for the stream until the deadline.
    fn run(
        &self,
        op: Op,
        peer: Option<usize>,
        enqueue: impl FnOnce(nsys::ncclComm_t, nsys::cudaStream_t) -> nsys::ncclResult_t,
    ) -> Result<(), CommError> {
        self.bind(op)?;
        let deadline = Instant::now() + self.timeout;
        let r = enqueue(self.comm, self.stream.cu_stream() as nsys::cudaStream_t);
        if let Err(e) = ok_or_progress(r) {
            return Err(self.fail(op, peer, Failure::Nccl(e, last_error(self.comm))));
        }
        settle(self.comm, deadline).map_err(|f| self.fail(op, peer, f))?;
        let ev = self
            .stream
            .record_event(None)
            .map_err(|e| self.fail(op, peer, Failure::Cuda(format!("{e:?}"))))?;
        self.wait_event(op, peer, &ev, deadline)
    }

    fn wait_event(
        &self,
        op: Op,
        peer: Option<usize>,
        ev: &CudaEvent,
        deadline: Instant,
    ) -> Result<(), CommError> {
        let mut spins = 0u32;
        loop {
            match ev.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(op, peer, Failure::Cuda(format!("{e:?}")))),
            }
            let mut st = nsys::ncclResult_t::ncclSuccess;
            // SAFETY: live communicator; `st` a local.
            unsafe { nsys::ncclCommGetAsyncError(self.comm, &mut st) };
            if ok_or_progress(st).is_err() {
                return Err(self.fail(op, peer, Failure::Nccl(st, last_error(self.comm))));
            }
            if Instant::now() > deadline {
                return Err(self.fail(op, peer, Failure::Timeout));
            }
            spin(&mut spins);
        }
    }

    fn invalid(&self, op: Op, detail: String) -> CommError {
        CommError::InvalidArgument {
            op,
            rank: self.global_rank(),
            detail,
        }
    }

    fn record(&self, op: Op, n: usize, root: usize) {
        let (s, r) = convention_bytes(op, n, self.world, self.rank, root);
        lock(&self.stats).record(op, s, r);
    }

    /// Makes this communicator's stream wait for work already queued on `s`.
    fn after(&self, op: Op, s: &CudaStream) -> Result<(), CommError> {
        self.stream
            .join(s)
            .map_err(|e| self.fail(op, None, Failure::Cuda(format!("{e:?}"))))
    }

    fn stage(&self, op: Op, host: &[f32]) -> Result<CudaSlice<f32>, CommError> {
        self.stream
            .clone_htod(host)
            .map_err(|e| self.fail(op, None, Failure::Cuda(format!("upload: {e:?}"))))
    }

    /// A device buffer for a collective's output, which the collective overwrites whole (no
    /// upload of the host buffer's old contents).
    fn stage_out(&self, op: Op, len: usize) -> Result<CudaSlice<f32>, CommError> {
        self.stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| self.fail(op, None, Failure::Cuda(format!("alloc: {e:?}"))))
    }

    fn unstage(&self, op: Op, dev: &CudaSlice<f32>, host: &mut [f32]) -> Result<(), CommError> {
        self.stream
            .memcpy_dtoh(dev, host)
            .map_err(|e| self.fail(op, None, Failure::Cuda(format!("download: {e:?}"))))
    }

    fn ar_raw(&self, ptr: u64, n: usize) -> Result<(), CommError> {
        self.run(Op::AllReduce, None, |c, s| {
            // SAFETY: `ptr` holds `n` f32 on this device; in place.
            unsafe {
                nsys::ncclAllReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    n,
                    F32,
                    nsys::ncclRedOp_t::ncclSum,
                    c,
                    s,
                )
            }
        })
    }

    fn ag_raw(&self, send: u64, recv: u64, m: usize) -> Result<(), CommError> {
        self.run(Op::AllGather, None, |c, s| {
            // SAFETY: `send` holds m, `recv` P·m f32 on this device.
            unsafe { nsys::ncclAllGather(send as *const c_void, recv as *mut c_void, m, F32, c, s) }
        })
    }

    fn rs_raw(&self, send: u64, recv: u64, m: usize) -> Result<(), CommError> {
        self.run(Op::ReduceScatter, None, |c, s| {
            // SAFETY: `send` holds P·m, `recv` m f32 on this device.
            unsafe {
                nsys::ncclReduceScatter(
                    send as *const c_void,
                    recv as *mut c_void,
                    m,
                    F32,
                    nsys::ncclRedOp_t::ncclSum,
                    c,
                    s,
                )
            }
        })
    }

    fn a2a_raw(&self, send: u64, recv: u64, m: usize) -> Result<(), CommError> {
        let (p, r) = (self.world, self.rank);
        let bytes = (m * 4) as u64;
        self.bind(Op::AllToAll)?;
        // SAFETY: both buffers hold P·m f32 on this device.
        unsafe {
            dres::memcpy_dtod_async(
                recv + r as u64 * bytes,
                send + r as u64 * bytes,
                m * 4,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| self.fail(Op::AllToAll, None, Failure::Cuda(format!("{e:?}"))))?;
        self.run(Op::AllToAll, None, |c, s| {
            // SAFETY: chunk q of each buffer lies at q·m; the group is closed before returning.
            unsafe {
                let mut res = nsys::ncclGroupStart();
                for q in (0..p).filter(|&q| q != r) {
                    if ok_or_progress(res).is_err() {
                        break;
                    }
                    res = nsys::ncclSend(
                        (send + q as u64 * bytes) as *const c_void,
                        m,
                        F32,
                        q as i32,
                        c,
                        s,
                    );
                    if ok_or_progress(res).is_err() {
                        break;
                    }
                    res = nsys::ncclRecv(
                        (recv + q as u64 * bytes) as *mut c_void,
                        m,
                        F32,
                        q as i32,
                        c,
                        s,
                    );
                }
                let end = nsys::ncclGroupEnd();
                if ok_or_progress(res).is_err() {
                    res
                } else {
                    end
                }
            }
        })
    }

    fn bc_raw(&self, ptr: u64, n: usize, root: usize) -> Result<(), CommError> {
        self.run(Op::Broadcast, Some(root), |c, s| {
            // SAFETY: `ptr` holds n f32 on this device; in place.
            unsafe {
                nsys::ncclBroadcast(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    n,
                    F32,
                    root as i32,
                    c,
                    s,
                )
            }
        })
    }

    fn check_root(&self, op: Op, root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(self.invalid(
                op,
                format!("root {root} is outside a group of {}", self.world),
            ));
        }
        Ok(())
    }

    fn check_gather(&self, op: Op, small: usize, big: usize) -> Result<(), CommError> {
        if big != small * self.world {
            return Err(self.invalid(
                op,
                format!(
                    "buffers of {small} and {big} values: the larger must be {} × the smaller",
                    self.world
                ),
            ));
        }
        Ok(())
    }

    /// The steps every `*_dev` collective shares: refuse after a failure, bind, make this
    /// communicator's stream wait for the buffers' streams, run `call` unless there is nothing
    /// to move, count `n` values under the byte convention.
    fn dev_collective(
        &self,
        op: Op,
        bufs: &[&CudaStream],
        n: usize,
        root: usize,
        call: impl FnOnce() -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        self.bind(op)?;
        for s in bufs {
            self.after(op, s)?;
        }
        if n > 0 {
            call()?;
        }
        self.record(op, n, root);
        Ok(())
    }

    /// [`Communicator::all_reduce_sum`] on a device buffer, no staging.
    pub fn all_reduce_sum_dev(&self, buf: &mut DeviceBuf<f32>) -> Result<(), CommError> {
        let (ptr, n) = (buf.ptr(), buf.len());
        self.dev_collective(Op::AllReduce, &[buf.slice.stream()], n, 0, || {
            self.ar_raw(ptr, n)
        })
    }

    /// [`Communicator::all_gather`] on device buffers.
    pub fn all_gather_dev(
        &self,
        send: &DeviceBuf<f32>,
        recv: &mut DeviceBuf<f32>,
    ) -> Result<(), CommError> {
        self.check_gather(Op::AllGather, send.len(), recv.len())?;
        let streams = [send.slice.stream().as_ref(), recv.slice.stream()];
        let (s, r, m) = (send.ptr(), recv.ptr(), send.len());
        self.dev_collective(Op::AllGather, &streams, recv.len(), 0, || {
            self.ag_raw(s, r, m)
        })
    }

    /// [`Communicator::reduce_scatter_sum`] on device buffers.
    pub fn reduce_scatter_sum_dev(
        &self,
        send: &DeviceBuf<f32>,
        recv: &mut DeviceBuf<f32>,
    ) -> Result<(), CommError> {
        self.check_gather(Op::ReduceScatter, recv.len(), send.len())?;
        let streams = [send.slice.stream().as_ref(), recv.slice.stream()];
        let (s, r, m) = (send.ptr(), recv.ptr(), recv.len());
        self.dev_collective(Op::ReduceScatter, &streams, send.len(), 0, || {
            self.rs_raw(s, r, m)
        })
    }

    /// In-place reduce-scatter of the `n` f32 at `ptr` (n a multiple of the world; NCCL's
    /// in-place form, the receive buffer at chunk `rank`): afterwards chunk `rank` holds the sum
    /// over every rank. Ordered after the work queued on `after`.
    pub fn reduce_scatter_sum_in_place_dev(
        &self,
        after: &CudaStream,
        ptr: u64,
        n: usize,
    ) -> Result<(), CommError> {
        self.in_place(Op::ReduceScatter, after, ptr, n, |mine, m| {
            self.rs_raw(ptr, mine, m)
        })
    }

    /// In-place all-gather of the `n` f32 at `ptr` (n a multiple of the world): every rank's
    /// chunk `rank` to every rank. Ordered after the work queued on `after`.
    pub fn all_gather_in_place_dev(
        &self,
        after: &CudaStream,
        ptr: u64,
        n: usize,
    ) -> Result<(), CommError> {
        self.in_place(Op::AllGather, after, ptr, n, |mine, m| {
            self.ag_raw(mine, ptr, m)
        })
    }

    /// An in-place collective over the `n` f32 at `ptr`: `call(address of this rank's chunk,
    /// chunk length)` through [`NcclComm::dev_collective`], refused unless the world divides n.
    fn in_place(
        &self,
        op: Op,
        after: &CudaStream,
        ptr: u64,
        n: usize,
        call: impl FnOnce(u64, usize) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        if !n.is_multiple_of(self.world) {
            return Err(self.invalid(
                op,
                format!(
                    "{n} values in place: must be a multiple of the world, {}",
                    self.world
                ),
            ));
        }
        let m = n / self.world;
        let mine = ptr + (self.rank * m * 4) as u64;
        self.dev_collective(op, &[after], n, 0, || call(mine, m))
    }

    /// In-place sum of the `n` f32 at `ptr` onto `root` (ncclReduce): the root's values end
    /// holding the sum over every rank, the others' are left undefined. Ordered after the work
    /// queued on `after`.
    pub fn reduce_sum_in_place_dev(
        &self,
        after: &CudaStream,
        ptr: u64,
        n: usize,
        root: usize,
    ) -> Result<(), CommError> {
        self.check_root(Op::Reduce, root)?;
        self.dev_collective(Op::Reduce, &[after], n, root, || {
            self.run(Op::Reduce, Some(root), |c, s| {
                // SAFETY: `ptr` holds n f32 on this device; in place (the receive buffer is
                // read only at the root, where it is the send buffer).
                unsafe {
                    nsys::ncclReduce(
                        ptr as *const c_void,
                        ptr as *mut c_void,
                        n,
                        F32,
                        nsys::ncclRedOp_t::ncclSum,
                        root as i32,
                        c,
                        s,
                    )
                }
            })
        })
    }

    /// [`Communicator::all_to_all`] on device buffers.
    pub fn all_to_all_dev(
        &self,
        send: &DeviceBuf<f32>,
        recv: &mut DeviceBuf<f32>,
    ) -> Result<(), CommError> {
        if send.len() != recv.len() || !send.len().is_multiple_of(self.world) {
            return Err(self.invalid(
                Op::AllToAll,
                format!(
                    "send {} and recv {} values must be equal and a multiple of {}",
                    send.len(),
                    recv.len(),
                    self.world
                ),
            ));
        }
        let streams = [send.slice.stream().as_ref(), recv.slice.stream()];
        let (s, r, n) = (send.ptr(), recv.ptr(), send.len());
        self.dev_collective(Op::AllToAll, &streams, n, 0, || {
            self.a2a_raw(s, r, n / self.world)
        })
    }

    /// [`Communicator::broadcast`] on a device buffer.
    pub fn broadcast_dev(&self, buf: &mut DeviceBuf<f32>, root: usize) -> Result<(), CommError> {
        self.check_root(Op::Broadcast, root)?;
        let (ptr, n) = (buf.ptr(), buf.len());
        self.dev_collective(Op::Broadcast, &[buf.slice.stream()], n, root, || {
            self.bc_raw(ptr, n, root)
        })
    }

    /// Aborts the communicator (ncclCommAbort, once): this rank's later calls fail with `why`,
    /// and peers blocked on it fail within their timeout.
    pub fn abort(&self, why: &str) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.fail(Op::Send, None, Failure::Cuda(format!("aborted: {why}")));
    }

    /// This communicator as a [`DeviceP2p`] for `gpu`'s stream (`GpuDistAttn` over NCCL),
    /// borrowed. `gpu` must be the same device.
    pub fn device_p2p(&self, gpu: &Gpu) -> Result<NcclP2p<&NcclComm>, GpuError> {
        NcclP2p::new(self, gpu)
    }

    /// [`NcclComm::device_p2p`] owning the communicator: what a sequence-parallel `GpuQwen2`
    /// rank keeps for its attention and gradient all-reduce (`GpuSpAttention`).
    pub fn into_device_p2p(self, gpu: &Gpu) -> Result<NcclP2p<NcclComm>, GpuError> {
        NcclP2p::new(self, gpu)
    }
}

/// An [`NcclComm`] (borrowed or owned: `C` is `&NcclComm` or `NcclComm`) as a [`DeviceP2p`]:
/// each posted batch is one NCCL group of ncclSend/ncclRecv
/// (one call per device part, bytes as `ncclUint8`) on the communicator's stream, which first
/// waits for an event of the caller's stream; completing waits (host-side, against the
/// communicator's deadline, polling NCCL's async error) for the group's event and makes the
/// caller's stream wait for it. Compute on the caller's stream therefore runs while a batch is
/// in flight. NCCL matches messages between two ranks in posting order, so a batch's operations
/// are issued sorted by tag (the peers' batches hold the same messages, so the orders agree).
/// A timeout or NCCL error aborts the communicator; payloads carry no header (sizes come from
/// the same plan on both sides). As a [`DeviceGroup`], its all-reduce is
/// [`NcclComm::all_reduce_sum_dev`].
pub struct NcclP2p<C: Borrow<NcclComm>> {
    comm: C,
    epoch: AtomicU64,
    bytes: AtomicU64,
    messages: AtomicU64,
}

/// A posted batch of an [`NcclP2p`].
pub struct NcclPosted {
    /// Recorded after the group; `None` when the batch moved no bytes.
    done: Option<CudaEvent>,
    deadline: Instant,
    peer: Option<usize>,
}

impl<C: Borrow<NcclComm>> NcclP2p<C> {
    fn new(comm: C, gpu: &Gpu) -> Result<Self, GpuError> {
        let c: &NcclComm = comm.borrow();
        let (mine, theirs) = (c.ctx.ordinal(), gpu.ctx.ordinal());
        if mine != theirs {
            return Err(GpuError::Comm(format!(
                "NCCL rank {} is on device {mine}, its Gpu on device {theirs}",
                c.global_rank()
            )));
        }
        Ok(NcclP2p {
            comm,
            epoch: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        })
    }

    pub fn comm(&self) -> &NcclComm {
        self.comm.borrow()
    }

    fn err(&self, e: CommError) -> GpuError {
        GpuError::Comm(e.to_string())
    }

    fn check_peer(&self, peer: usize) -> Result<(), GpuError> {
        let c = self.comm();
        if peer >= c.world || peer == c.rank {
            return Err(GpuError::Comm(format!(
                "rank {}: peer {peer} is not another rank of a world of {}",
                c.rank, c.world
            )));
        }
        Ok(())
    }
}

impl<C: Borrow<NcclComm>> DeviceGroup for NcclP2p<C> {
    fn all_reduce_sum_dev(&self, _gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<(), GpuError> {
        // NCCL's stream waits for the buffer's stream; the call returns once the sum is done.
        self.comm().all_reduce_sum_dev(buf).map_err(|e| self.err(e))
    }

    fn reduce_scatter_sum_dev(
        &self,
        gpu: &Gpu,
        buf: &mut DViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        self.comm()
            .reduce_scatter_sum_in_place_dev(&gpu.stream, buf.dptr(), buf.dlen())
            .map_err(|e| self.err(e))
    }

    fn all_gather_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<(), GpuError> {
        self.comm()
            .all_gather_in_place_dev(&gpu.stream, buf.dptr(), buf.dlen())
            .map_err(|e| self.err(e))
    }

    fn reduce_sum_dev(
        &self,
        gpu: &Gpu,
        buf: &mut DViewMut<'_, f32>,
        root: usize,
    ) -> Result<(), GpuError> {
        self.comm()
            .reduce_sum_in_place_dev(&gpu.stream, buf.dptr(), buf.dlen(), root)
            .map_err(|e| self.err(e))
    }

    fn collective_stats(&self) -> Option<CommStats> {
        Some(self.comm().stats())
    }
}

impl<C: Borrow<NcclComm>> DeviceP2p for NcclP2p<C> {
    type Posted = NcclPosted;

    fn rank(&self) -> usize {
        self.comm().rank
    }

    fn world_size(&self) -> usize {
        self.comm().world
    }

    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn sent(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.messages.load(Ordering::Relaxed),
        )
    }

    fn post(&self, gpu: &Gpu, ops: &[DevOp<'_>]) -> Result<NcclPosted, GpuError> {
        let c = self.comm();
        let mut order: Vec<&DevOp<'_>> = ops.iter().collect();
        order.sort_by_key(|o| o.tag());
        // (is send, peer, pointer, bytes) in issue order.
        let mut calls = Vec::new();
        let (mut bytes, mut messages) = (0u64, 0u64);
        for op in order {
            let (send, peer, parts) = match *op {
                DevOp::Send { to, parts, .. } => (true, to, parts),
                DevOp::Recv { from, parts, .. } => (false, from, parts),
            };
            self.check_peer(peer)?;
            if send {
                messages += 1;
                bytes += parts.iter().map(|p| p.bytes as u64).sum::<u64>();
            }
            calls.extend(
                parts
                    .iter()
                    .filter(|p| p.bytes > 0)
                    .map(|p| (send, peer, p.ptr, p.bytes)),
            );
        }
        let op = Op::Send;
        c.bind(op).map_err(|e| self.err(e))?;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.messages.fetch_add(messages, Ordering::Relaxed);
        let deadline = Instant::now() + c.timeout;
        let peer = calls.first().map(|x| x.1);
        if calls.is_empty() {
            return Ok(NcclPosted {
                done: None,
                deadline,
                peer,
            });
        }
        let cuda = |e: cudarc::driver::DriverError| {
            self.err(c.fail(op, peer, Failure::Cuda(format!("{e:?}"))))
        };
        let ready = gpu.stream.record_event(None).map_err(cuda)?;
        c.stream.wait(&ready).map_err(cuda)?;
        let cs = c.stream.cu_stream() as nsys::cudaStream_t;
        let u8t = nsys::ncclDataType_t::ncclUint8;
        // SAFETY: every pointer is a live device range of `n` bytes on this device, kept by the
        // caller until `complete`.
        let r = unsafe { grouped_p2p(&calls, u8t, c.comm, cs) };
        if let Err(e) = ok_or_progress(r) {
            return Err(self.err(c.fail(op, peer, Failure::Nccl(e, last_error(c.comm)))));
        }
        settle(c.comm, deadline).map_err(|f| self.err(c.fail(op, peer, f)))?;
        let done = c.stream.record_event(None).map_err(cuda)?;
        Ok(NcclPosted {
            done: Some(done),
            deadline,
            peer,
        })
    }

    fn complete(&self, gpu: &Gpu, posted: NcclPosted) -> Result<(), GpuError> {
        let c = self.comm();
        let Some(done) = posted.done else {
            return Ok(());
        };
        c.bind(Op::Recv).map_err(|e| self.err(e))?;
        c.wait_event(Op::Recv, posted.peer, &done, posted.deadline)
            .map_err(|e| self.err(e))?;
        gpu.stream.wait(&done)?;
        Ok(())
    }

    fn abort(&self, why: &str) {
        self.comm().abort(why);
    }
}

fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, GpuError> {
    let _ = libs::preload();
    catch("CUDA driver", || {
        let count = match dres::init().and_then(|_| dres::device::get_count()) {
            Ok(c) => c.max(0) as usize,
            Err(e) => {
                return Err(GpuError::NoDevice {
                    ordinal,
                    detail: format!("the driver reports {e:?}"),
                })
            }
        };
        if ordinal >= count {
            return Err(GpuError::NoDevice {
                ordinal,
                detail: format!("this machine has {count} CUDA device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: this communicator orders its own streams explicitly (`after`).
        unsafe { ctx.disable_event_tracking() };
        Ok(ctx)
    })
}

fn nccl_present() -> Result<(), String> {
    // SAFETY: only tries to dlopen.
    let ok = std::panic::catch_unwind(|| unsafe { nsys::is_culib_present() }).unwrap_or(false);
    if ok {
        return Ok(());
    }
    let found = libs::find_library(libs::lib_dirs(), libs::NCCL);
    Err(match found {
        Some(p) => format!(
            "NCCL is at {} but cannot be opened as libnccl.so: start the program through \
             reel_cuda::libs::reexec_with_library_path (reel's commands and tests do), or put a \
             libnccl.so link to it on LD_LIBRARY_PATH",
            p.display()
        ),
        None => "NCCL (libnccl.so.2) was not found: install the nvidia-nccl-cu13 wheel or set \
                 REEL_CUDA_LIB_DIRS"
            .into(),
    })
}

/// A posted point-to-point batch of an [`NcclComm`].
pub struct NcclBatch<'a> {
    comm: &'a NcclComm,
    /// (peer, tag, len, seq, buffer with header) of each receive, in batch order.
    recvs: Vec<(usize, u64, usize, u64, CudaSlice<f32>)>,
    /// Kept alive until the batch completes.
    _sends: Vec<CudaSlice<f32>>,
    done: CudaEvent,
}

impl Pending for NcclBatch<'_> {
    fn wait(self) -> Result<Vec<Vec<f32>>, CommError> {
        let c = self.comm;
        let first_peer = self.recvs.first().map(|r| r.0);
        c.bind(Op::Recv)?;
        let deadline = Instant::now() + c.timeout;
        c.wait_event(Op::Recv, first_peer, &self.done, deadline)?;
        let mut out = Vec::with_capacity(self.recvs.len());
        for (peer, tag, len, seq, buf) in &self.recvs {
            let mut host = vec![0f32; len + HEADER_WORDS];
            c.unstage(Op::Recv, buf, &mut host)?;
            check_header(&host, *tag, *len, *seq)
                .map_err(|d| c.fail(Op::Recv, Some(*peer), Failure::Mismatch(d)))?;
            // A message from itself is not counted as bytes (crate convention).
            let b = if *peer == c.rank {
                0
            } else {
                (*len * 4) as u64
            };
            lock(&c.stats).record(Op::Recv, 0, b);
            out.push(host.split_off(HEADER_WORDS));
        }
        Ok(out)
    }
}

impl Communicator for NcclComm {
    type Batch<'a> = NcclBatch<'a>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.bind(Op::AllReduce)?;
        if !buf.is_empty() {
            let d = self.stage(Op::AllReduce, buf)?;
            self.ar_raw(d.raw_ptr(), buf.len())?;
            self.unstage(Op::AllReduce, &d, buf)?;
        }
        self.record(Op::AllReduce, buf.len(), 0);
        Ok(())
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.check_gather(Op::AllGather, send.len(), recv.len())?;
        self.bind(Op::AllGather)?;
        if !send.is_empty() {
            let s = self.stage(Op::AllGather, send)?;
            let r = self.stage_out(Op::AllGather, recv.len())?;
            self.ag_raw(s.raw_ptr(), r.raw_ptr(), send.len())?;
            self.unstage(Op::AllGather, &r, recv)?;
        }
        self.record(Op::AllGather, recv.len(), 0);
        Ok(())
    }

    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.check_gather(Op::ReduceScatter, recv.len(), send.len())?;
        self.bind(Op::ReduceScatter)?;
        if !recv.is_empty() {
            let s = self.stage(Op::ReduceScatter, send)?;
            let r = self.stage_out(Op::ReduceScatter, recv.len())?;
            self.rs_raw(s.raw_ptr(), r.raw_ptr(), recv.len())?;
            self.unstage(Op::ReduceScatter, &r, recv)?;
        }
        self.record(Op::ReduceScatter, send.len(), 0);
        Ok(())
    }

    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        if send.len() != recv.len() || !send.len().is_multiple_of(self.world) {
            return Err(self.invalid(
                Op::AllToAll,
                format!(
                    "send {} and recv {} values must be equal and a multiple of {}",
                    send.len(),
                    recv.len(),
                    self.world
                ),
            ));
        }
        self.bind(Op::AllToAll)?;
        if !send.is_empty() {
            let s = self.stage(Op::AllToAll, send)?;
            let r = self.stage_out(Op::AllToAll, recv.len())?;
            self.a2a_raw(s.raw_ptr(), r.raw_ptr(), send.len() / self.world)?;
            self.unstage(Op::AllToAll, &r, recv)?;
        }
        self.record(Op::AllToAll, send.len(), 0);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.check_root(Op::Broadcast, root)?;
        self.bind(Op::Broadcast)?;
        if !buf.is_empty() {
            let d = self.stage(Op::Broadcast, buf)?;
            self.bc_raw(d.raw_ptr(), buf.len(), root)?;
            self.unstage(Op::Broadcast, &d, buf)?;
        }
        self.record(Op::Broadcast, buf.len(), root);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.bind(Op::Barrier)?;
        let ptr = lock(&self.scratch).raw_ptr();
        // A one-element all-reduce, reported as the barrier.
        self.run(Op::Barrier, None, |c, s| {
            // SAFETY: the scratch element lives as long as the communicator.
            unsafe {
                nsys::ncclAllReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    1,
                    F32,
                    nsys::ncclRedOp_t::ncclSum,
                    c,
                    s,
                )
            }
        })?;
        self.record(Op::Barrier, 0, 0);
        Ok(())
    }

    fn start(&self, ops: Vec<P2pOp>) -> Result<NcclBatch<'_>, CommError> {
        for op in &ops {
            let (peer, kind) = match op {
                P2pOp::Send { peer, .. } => (*peer, Op::Send),
                P2pOp::Recv { peer, .. } => (*peer, Op::Recv),
            };
            if peer >= self.world {
                return Err(self.invalid(
                    kind,
                    format!("peer {peer} is outside a group of {}", self.world),
                ));
            }
        }
        self.bind(Op::Send)?;
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        // (is_send, peer, device pointer, words) in batch order.
        let mut plan = Vec::with_capacity(ops.len());
        {
            let mut seq = lock(&self.seq);
            for op in ops {
                match op {
                    P2pOp::Send { peer, tag, data } => {
                        let mut msg = encode_header(tag, data.len(), seq.take(peer, true)).to_vec();
                        msg.extend_from_slice(&data);
                        let d = self.stage(Op::Send, &msg)?;
                        plan.push((true, peer, d.raw_ptr(), msg.len()));
                        sends.push((peer, data.len(), d));
                    }
                    P2pOp::Recv { peer, tag, len } => {
                        let s = seq.take(peer, false);
                        let d =
                            self.stream
                                .alloc_zeros::<f32>(len + HEADER_WORDS)
                                .map_err(|e| {
                                    self.fail(Op::Recv, Some(peer), Failure::Cuda(format!("{e:?}")))
                                })?;
                        plan.push((false, peer, d.raw_ptr(), len + HEADER_WORDS));
                        recvs.push((peer, tag, len, s, d));
                    }
                }
            }
        }
        let first_peer = plan.first().map(|p| p.1);
        self.bind(Op::Send)?;
        let deadline = Instant::now() + self.timeout;
        let cs = self.stream.cu_stream() as nsys::cudaStream_t;
        // SAFETY: every pointer is a live device buffer of `words` f32 kept by the batch.
        let r = unsafe { grouped_p2p(&plan, F32, self.comm, cs) };
        if let Err(e) = ok_or_progress(r) {
            return Err(self.fail(
                Op::Send,
                first_peer,
                Failure::Nccl(e, last_error(self.comm)),
            ));
        }
        settle(self.comm, deadline).map_err(|f| self.fail(Op::Send, first_peer, f))?;
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.fail(Op::Send, first_peer, Failure::Cuda(format!("{e:?}"))))?;
        {
            let mut st = lock(&self.stats);
            for (peer, len, _) in &sends {
                // A message to itself is not counted as bytes (crate convention).
                let b = if *peer == self.rank {
                    0
                } else {
                    (*len * 4) as u64
                };
                st.record(Op::Send, b, 0);
            }
        }
        Ok(NcclBatch {
            comm: self,
            recvs,
            _sends: sends.into_iter().map(|s| s.2).collect(),
            done,
        })
    }

    fn split(&self, color: usize, key: usize) -> Result<Self, CommError> {
        self.bind(Op::Split)?;
        let deadline = Instant::now() + self.timeout;
        let mut newcomm: nsys::ncclComm_t = std::ptr::null_mut();
        let mut cfg = config();
        // SAFETY: live parent communicator; out-pointer and config are locals.
        let r = unsafe {
            nsys::ncclCommSplit(self.comm, color as i32, key as i32, &mut newcomm, &mut cfg)
        };
        if let Err(e) = ok_or_progress(r) {
            return Err(self.fail(Op::Split, None, Failure::Nccl(e, last_error(self.comm))));
        }
        settle(self.comm, deadline).map_err(|f| self.fail(Op::Split, None, f))?;
        if newcomm.is_null() {
            return Err(self.fail(
                Op::Split,
                None,
                Failure::Cuda("ncclCommSplit returned no communicator".into()),
            ));
        }
        settle(newcomm, deadline).map_err(|f| self.fail(Op::Split, None, f))?;
        let mut n = 0i32;
        let mut me = 0i32;
        // SAFETY: live new communicator; locals.
        unsafe {
            nsys::ncclCommCount(newcomm, &mut n);
            nsys::ncclCommUserRank(newcomm, &mut me);
        }
        let scratch = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| self.fail(Op::Split, None, Failure::Cuda(format!("{e:?}"))))?;
        let sub = NcclComm {
            comm: newcomm,
            stream: self.stream.clone(),
            ctx: self.ctx.clone(),
            rank: me as usize,
            world: n as usize,
            members: vec![self.global_rank(); n as usize],
            timeout: self.timeout,
            stats: Mutex::new(CommStats::default()),
            seq: Mutex::new(SeqCounters::default()),
            failed: Mutex::new(None),
            scratch: Mutex::new(scratch),
        };
        // Global ranks of the members, so that errors name processes (exact in f32 below 2^24).
        let mut g = vec![0f32; sub.world];
        sub.all_gather(&[self.global_rank() as f32], &mut g)?;
        let mut sub = sub;
        sub.members = g.iter().map(|&x| x as usize).collect();
        *lock(&sub.stats) = CommStats::default();
        Ok(sub)
    }

    fn stats(&self) -> CommStats {
        *lock(&self.stats)
    }

    fn reset_stats(&self) {
        *lock(&self.stats) = CommStats::default();
    }
}

/// Raw device address of a slice (event tracking is off on this communicator's context).
trait RawPtr {
    fn raw_ptr(&self) -> u64;
}

impl RawPtr for CudaSlice<f32> {
    fn raw_ptr(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let (p, _guard) = self.device_ptr(self.stream());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_name_what_differs() {
        for (tag, len, seq) in [
            (0u64, 0usize, 0u64),
            (7, 5, 3),
            (u64::MAX, 1 << 20, 1 << 31),
        ] {
            let h = encode_header(tag, len, seq);
            check_header(&h, tag, len, seq).unwrap();
        }
        let h = encode_header(3, 10, 2);
        assert!(check_header(&h, 4, 10, 2)
            .unwrap_err()
            .contains("expected tag 4, the peer sent tag 3"));
        assert!(check_header(&h, 3, 11, 2)
            .unwrap_err()
            .contains("expected 11 values, the peer sent 10"));
        assert!(check_header(&h, 3, 10, 1)
            .unwrap_err()
            .contains("expected message 1"));
        assert!(check_header(&h[..2], 3, 10, 2).is_err());
    }

    #[test]
    fn sequence_numbers_count_per_peer_and_direction() {
        let mut s = SeqCounters::default();
        assert_eq!(s.take(1, true), 0);
        assert_eq!(s.take(1, true), 1);
        assert_eq!(s.take(1, false), 0);
        assert_eq!(s.take(2, true), 0);
        assert_eq!(s.take(1, true), 2);
    }

    #[test]
    fn init_without_a_gpu_or_nccl_is_an_error_not_a_panic() {
        if std::env::var_os("REEL_GPU_TESTS").is_some() {
            return; // on a GPU machine this would try a real init
        }
        let e = NcclComm::init(0, 1, "127.0.0.1:1", 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CommError::Backend { rank: 0, .. }), "{e}");
        let e = NcclComm::init(2, 1, "127.0.0.1:1", 0, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("outside a world of 1"), "{e}");
    }
}
