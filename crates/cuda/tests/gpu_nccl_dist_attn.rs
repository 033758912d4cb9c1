//! Sequence-parallel attention across GPUs: `GpuDistAttn` over NCCL (`NcclP2p`), one process per
//! GPU (each test re-executes this binary once per rank through `reel_comm::launch`, as
//! `gpu_nccl.rs` does). Every schedule the device executor runs (balanced DistAttn, ring causal
//! and full, zigzag ring), forward and backward, overlapped and blocking, at odd lengths (padded
//! chunks), GQA, D 64 and 128, B 1 and 2: every rank's out, lse, dq, dk, dv, gathered over NCCL,
//! match single-GPU cuDNN attention over the whole sequence within bf16 tolerance, and each
//! rank's blocks and bytes sent are its plan's. A second test kills one rank in the middle of a
//! pass: the other fails with an error within the communicator's timeout. A third runs
//! `GpuUlysses` (pure Ulysses and every hybrid grid of the world, causal and full, GQA) over NCCL
//! against the same reference. A fourth checks that warm passes allocate nothing over NCCL: after
//! two warm-up passes, a third and fourth forward + backward (ring, balanced DistAttn, pure Ulysses
//! where u | H_kv) make no device allocation on any rank and still match the reference. Opt-in:
//!
//!     REEL_GPU_TESTS=1 NCCL_NVLS_ENABLE=0 cargo test -p reel-cuda --features cudnn --release --test gpu_nccl_dist_attn -- --test-threads=1 --nocapture
//!
//! `REEL_NCCL_WORLDS` (default `1,2`) lists the world sizes (one GPU per rank: `4`, `8` on such
//! machines).
#![cfg(feature = "cudnn")]

mod common;
use common::launch::{launch_or_run, local_rank, worlds};
use common::sp::{
    check_gathered, check_stats, executor, reference, run_rank, run_rank_warm, ulysses,
    ulysses_cases, DeviceSp, SpInputs, SpOutputs,
};

use std::cell::Cell;
use std::time::{Duration, Instant};

use reel_comm::{CommError, Communicator};
use reel_cuda::{DevOp, DeviceP2p, Gpu, GpuError, NcclComm, NcclP2p};
use reel_kernels::attention::AttnShape;
use reel_parallel::{Overlap, ScheduleKind, UlyssesGrid};

fn open(timeout: Duration) -> (NcclComm, Gpu) {
    let c = NcclComm::from_env(timeout).unwrap_or_else(|e| panic!("NCCL init: {e}"));
    let g = Gpu::open_on_new_stream(local_rank()).unwrap_or_else(|e| panic!("GPU: {e}"));
    (c, g)
}

#[test]
fn nccl_sp_attention_matches_single_gpu_attention() {
    if !launch_or_run(
        "nccl_sp_attention_matches_single_gpu_attention",
        29710,
        &worlds(),
    ) {
        return;
    }
    let (c, g) = open(Duration::from_secs(120));
    let p2p = c.device_p2p(&g).unwrap();
    let (p, rank) = (c.world_size(), c.rank());
    eprintln!("rank {rank} of {p}: {}", g.info());
    let mut failed = Vec::new();
    let mut seed = 1;
    for kind in ScheduleKind::ALL {
        for (b, t, h, h_kv, d) in [(1, 1000 + p, 8, 2, 128), (2, 333, 4, 4, 64)] {
            for overlap in [Overlap::Overlapped, Overlap::Blocking] {
                let shape = AttnShape {
                    b,
                    tq: t,
                    tk: t,
                    h,
                    h_kv,
                    d,
                };
                seed += 1;
                let what = format!("NCCL {kind:?} P {p} {overlap:?} b{b} T{t} h{h}/{h_kv} d{d}");
                // Every rank compares the same gathered values, so a failing comparison fails
                // on every rank alike and the ranks stay in step for the next case.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    nccl_case(&c, &p2p, &g, kind, overlap, shape, seed, &what)
                }));
                if r.is_err() {
                    failed.push(what);
                }
            }
        }
    }
    assert!(failed.is_empty(), "rank {rank}: failing cases: {failed:?}");
}

#[allow(clippy::too_many_arguments)]
fn nccl_case(
    c: &NcclComm,
    p2p: &NcclP2p<&NcclComm>,
    g: &Gpu,
    kind: ScheduleKind,
    overlap: Overlap,
    shape: AttnShape,
    seed: u64,
    what: &str,
) {
    let p = c.world_size();
    let x = SpInputs::new(shape, seed);
    let full = reference(g, shape, kind.is_causal(), &x);
    let (exec, sh) = executor(kind, p, shape, overlap);
    run_and_gather(c, p2p, g, &exec, &sh, shape, &x, &full, what);
}

/// Runs this rank's forward and backward, gathers every rank's outputs over NCCL and compares
/// them with `full`.
#[allow(clippy::too_many_arguments)]
fn run_and_gather<E: DeviceSp>(
    c: &NcclComm,
    p2p: &NcclP2p<&NcclComm>,
    g: &Gpu,
    exec: &E,
    sh: &reel_parallel::Sharding,
    shape: AttnShape,
    x: &SpInputs,
    full: &SpOutputs,
    what: &str,
) {
    let rank = c.rank();
    let (mine, fs, bs) =
        run_rank(exec, sh, g, p2p, x).unwrap_or_else(|e| panic!("{what}: rank {rank}: {e}"));
    check_stats(exec, rank, &fs, &bs);
    gather_and_check(c, sh, shape, &mine, full, what);
}

/// Gathers every rank's outputs over NCCL and compares them with `full`.
fn gather_and_check(
    c: &NcclComm,
    sh: &reel_parallel::Sharding,
    shape: AttnShape,
    mine: &SpOutputs,
    full: &SpOutputs,
    what: &str,
) {
    let p = c.world_size();
    // Every rank's outputs, gathered over NCCL (rank-major, equal lengths).
    let gathered: Vec<Vec<Vec<f32>>> = mine
        .iter()
        .map(|v| {
            let mut all = vec![f32::NAN; p * v.len()];
            c.all_gather(v, &mut all).unwrap();
            all.chunks(v.len().max(1)).map(|x| x.to_vec()).collect()
        })
        .collect();
    let per_rank: Vec<SpOutputs> = (0..p)
        .map(|r| std::array::from_fn(|i| gathered[i].get(r).cloned().unwrap_or_default()))
        .collect();
    let refs: Vec<&SpOutputs> = per_rank.iter().collect();
    check_gathered(what, sh, shape, &refs, full);
}

#[test]
fn nccl_ulysses_matches_single_gpu_attention() {
    if !launch_or_run(
        "nccl_ulysses_matches_single_gpu_attention",
        29750,
        &worlds(),
    ) {
        return;
    }
    let (c, g) = open(Duration::from_secs(120));
    let p2p = c.device_p2p(&g).unwrap();
    let (p, rank) = (c.world_size(), c.rank());
    let mut failed = Vec::new();
    for (seed, (grid, kind, shape, overlap)) in (101..).zip(ulysses_cases(p)) {
        let AttnShape {
            b,
            tq: t,
            h,
            h_kv,
            d,
            ..
        } = shape;
        let what = format!(
            "NCCL Ulysses {}x{} {kind:?} {overlap:?} b{b} T{t} h{h}/{h_kv} d{d}",
            grid.ulysses(),
            grid.ring()
        );
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let x = SpInputs::new(shape, seed);
            let full = reference(&g, shape, kind.is_causal(), &x);
            let (att, sh) = ulysses(grid, kind, shape, overlap);
            run_and_gather(&c, &p2p, &g, &att, &sh, shape, &x, &full, &what);
        }));
        if r.is_err() {
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "rank {rank}: failing cases: {failed:?}");
}

#[test]
fn nccl_warm_sp_passes_allocate_nothing() {
    if !launch_or_run("nccl_warm_sp_passes_allocate_nothing", 29770, &worlds()) {
        return;
    }
    let (c, g) = open(Duration::from_secs(120));
    let p2p = c.device_p2p(&g).unwrap();
    let (p, rank) = (c.world_size(), c.rank());
    let shape = AttnShape {
        b: 2,
        tq: 203 + p,
        tk: 203 + p,
        h: 4 * p,
        h_kv: 2 * p,
        d: 64,
    };
    let mut failed = Vec::new();
    for (seed, case) in (300..).zip(0..3) {
        let x = SpInputs::new(shape, seed);
        let full = reference(&g, shape, true, &x);
        let (what, r) = match case {
            0 | 1 => {
                let kind = [ScheduleKind::RingCausal, ScheduleKind::DistAttnCausal][case];
                let (exec, sh) = executor(kind, p, shape, Overlap::Overlapped);
                let r = run_rank_warm(&exec, &sh, &g, &p2p, &x, 4);
                (format!("NCCL warm {kind:?} P {p}"), r.map(|o| (o, sh)))
            }
            _ => {
                let grid = UlyssesGrid::new(p, 1).unwrap();
                let (att, sh) = ulysses(grid, ScheduleKind::RingCausal, shape, Overlap::Blocking);
                let r = run_rank_warm(&att, &sh, &g, &p2p, &x, 4);
                (format!("NCCL warm Ulysses {p}x1 P {p}"), r.map(|o| (o, sh)))
            }
        };
        let ((mine, counts), sh) = r.unwrap_or_else(|e| panic!("{what}: rank {rank}: {e}"));
        eprintln!("{what}: rank {rank} {counts:?}");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gather_and_check(&c, &sh, shape, &mine, &full, &what)
        }));
        if r.is_err() || counts.warm_allocs != 0 {
            failed.push(format!("{what}: {counts:?}"));
        }
    }
    assert!(failed.is_empty(), "rank {rank}: failing cases: {failed:?}");
}

/// An `NcclP2p` whose process exits (as if killed) at its `posts`-th post.
struct DiesAt<'c> {
    inner: NcclP2p<&'c NcclComm>,
    posts: Cell<usize>,
}

impl DeviceP2p for DiesAt<'_> {
    type Posted = <NcclP2p<NcclComm> as DeviceP2p>::Posted;
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn next_epoch(&self) -> u64 {
        self.inner.next_epoch()
    }
    fn sent(&self) -> (u64, u64) {
        self.inner.sent()
    }
    fn post(&self, gpu: &Gpu, ops: &[DevOp<'_>]) -> reel_cuda::Result<Self::Posted> {
        let left = self.posts.get();
        if left == 0 {
            eprintln!("rank {} exits in the middle of a pass", self.rank());
            std::process::exit(0);
        }
        self.posts.set(left - 1);
        self.inner.post(gpu, ops)
    }
    fn complete(&self, gpu: &Gpu, posted: Self::Posted) -> reel_cuda::Result<()> {
        self.inner.complete(gpu, posted)
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
}

#[test]
fn nccl_sp_rank_dying_mid_pass_fails_the_others_in_time() {
    if !launch_or_run(
        "nccl_sp_rank_dying_mid_pass_fails_the_others_in_time",
        29730,
        &[2],
    ) {
        return;
    }
    let timeout = Duration::from_secs(5);
    let (c, g) = open(timeout);
    let rank = c.rank();
    let shape = AttnShape {
        b: 1,
        tq: 4096,
        tk: 4096,
        h: 8,
        h_kv: 2,
        d: 128,
    };
    let x = SpInputs::new(shape, 7);
    let (exec, sh) = executor(ScheduleKind::DistAttnCausal, 2, shape, Overlap::Overlapped);
    // One whole pass first: the world works.
    let p2p = c.device_p2p(&g).unwrap();
    run_rank(&exec, &sh, &g, &p2p, &x).unwrap();
    c.barrier().unwrap();
    let dies = DiesAt {
        inner: c.device_p2p(&g).unwrap(),
        // Rank 1 leaves at its third post of the next forward + backward; rank 0 never does.
        posts: Cell::new(if rank == 1 { 2 } else { usize::MAX }),
    };
    let t = Instant::now();
    let e = run_rank(&exec, &sh, &g, &dies, &x).unwrap_err();
    let waited = t.elapsed();
    eprintln!("rank {rank} failed after {waited:.1?}: {e}");
    assert!(matches!(e, GpuError::Comm(_)), "{e}");
    assert!(waited < timeout + Duration::from_secs(5), "{waited:?}");
    // The communicator is aborted: later calls fail at once.
    let e = c.barrier().unwrap_err();
    assert!(matches!(e, CommError::PeerFailed { .. }), "{e}");
}
