//! Sequence-parallel attention on device buffers (`GpuDistAttn`): in-process ranks on one GPU,
//! each with its own stream, exchanging device buffers through a `DeviceWorld`, run every
//! schedule (balanced DistAttn, ring causal and full, zigzag ring) at world 2, 3 and 4, forward
//! and backward, overlapped and blocking; the gathered out, lse, dq, dk, dv match single-GPU
//! cuDNN attention over the whole sequence within bf16 tolerance. Lengths are not multiples of
//! the world (padded chunks), GQA, D 64 and 128, B 1 and 2. Opt-in:
//!
//!
//! `GpuUlysses` the same way: pure Ulysses (all-to-all over heads, one cuDNN call on the gathered
//! sequence) and the hybrid (Ulysses groups × a ring schedule over the groups) at every grid of
//! world 2–4, causal and full, GQA.
//!
//! Warm passes allocate nothing: after two warm-up passes, a third and fourth forward + backward of
//! a ring-family schedule, balanced DistAttn, pure Ulysses and the hybrid (sp 2, 3 and 4) make no
//! device allocation on any rank (every buffer from the rank's scratch pool, the pool's cached
//! blocks filled with NaN before each warm pass), and still match single-GPU attention.
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --features cudnn --release --test gpu_dist_attn -- --nocapture
#![cfg(feature = "cudnn")]

mod common;
use common::sp::{
    check_gathered, check_stats, executor, reference, run_rank, run_rank_warm, ulysses,
    ulysses_cases, DeviceSp, SpInputs, WarmCounts,
};
use common::*;

use std::time::Duration;

use reel_cuda::{DeviceRanks, Gpu};
use reel_kernels::attention::AttnShape;
use reel_parallel::{Overlap, ScheduleKind, Sharding, UlyssesGrid};

fn case(
    g: &Gpu,
    ranks: &mut DeviceRanks,
    kind: ScheduleKind,
    overlap: Overlap,
    shape: AttnShape,
    seed: u64,
) {
    let p = ranks.world_size();
    let x = SpInputs::new(shape, seed);
    let full = reference(g, shape, kind.is_causal(), &x);
    let (exec, sh) = executor(kind, p, shape, overlap);
    let per_rank = ranks
        .run(|_, rg, comm| run_rank(&exec, &sh, rg, comm, &x))
        .unwrap_or_else(|e| panic!("{kind:?} P {p}: {e}"));
    for (rank, (_, fs, bs)) in per_rank.iter().enumerate() {
        check_stats(&exec, rank, fs, bs);
    }
    let AttnShape {
        b,
        tq: t,
        h,
        h_kv,
        d,
        ..
    } = shape;
    let outs: Vec<_> = per_rank.iter().map(|(o, _, _)| o).collect();
    check_gathered(
        &format!("{kind:?} P {p} {overlap:?} b{b} T{t} h{h}/{h_kv} d{d}"),
        &sh,
        shape,
        &outs,
        &full,
    );
}

#[test]
fn device_sp_attention_matches_single_gpu_attention() {
    let Some(g) = gpu() else { return };
    let mut failed = Vec::new();
    let mut seed = 1;
    for p in [2usize, 3, 4] {
        let mut ranks = DeviceRanks::open(0, p, Duration::from_secs(60)).unwrap();
        for kind in ScheduleKind::ALL {
            for (b, t, h, h_kv, d, overlap) in [
                (1, 1000 + p, 8, 2, 128, Overlap::Overlapped),
                (2, 333, 4, 4, 64, Overlap::Blocking),
            ] {
                let shape = AttnShape {
                    b,
                    tq: t,
                    tk: t,
                    h,
                    h_kv,
                    d,
                };
                seed += 1;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    case(&g, &mut ranks, kind, overlap, shape, seed)
                }));
                if r.is_err() {
                    failed.push(format!("{kind:?} P {p} {overlap:?} T {t}"));
                    // A failed rank aborts its world: start a fresh one for the next case.
                    ranks = DeviceRanks::open(0, p, Duration::from_secs(60)).unwrap();
                }
            }
        }
    }
    assert!(failed.is_empty(), "failing cases: {failed:?}");
}

#[test]
fn device_ulysses_matches_single_gpu_attention() {
    let Some(g) = gpu() else { return };
    let mut failed = Vec::new();
    let mut seed = 100;
    for p in [2usize, 3, 4] {
        let mut ranks = DeviceRanks::open(0, p, Duration::from_secs(60)).unwrap();
        for (grid, kind, shape, overlap) in ulysses_cases(p) {
            seed += 1;
            let AttnShape {
                b,
                tq: t,
                h,
                h_kv,
                d,
                ..
            } = shape;
            let what = format!(
                "Ulysses {}x{} {kind:?} {overlap:?} b{b} T{t} h{h}/{h_kv} d{d}",
                grid.ulysses(),
                grid.ring()
            );
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let x = SpInputs::new(shape, seed);
                let full = reference(&g, shape, kind.is_causal(), &x);
                let (att, sh) = ulysses(grid, kind, shape, overlap);
                let per_rank = ranks
                    .run(|_, rg, comm| run_rank(&att, &sh, rg, comm, &x))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                for (rank, (_, fs, bs)) in per_rank.iter().enumerate() {
                    check_stats(&att, rank, fs, bs);
                }
                let outs: Vec<_> = per_rank.iter().map(|(o, _, _)| o).collect();
                check_gathered(&what, &sh, shape, &outs, &full);
            }));
            if r.is_err() {
                failed.push(what);
                ranks = DeviceRanks::open(0, p, Duration::from_secs(60)).unwrap();
            }
        }
    }
    assert!(failed.is_empty(), "failing cases: {failed:?}");
}

/// One warm-pass case on `ranks`: the last pass's gathered outputs against the reference, and
/// each rank's counts (a failure message when a warm pass allocated).
#[allow(clippy::too_many_arguments)]
fn warm_case<E: DeviceSp + Sync>(
    g: &Gpu,
    ranks: &mut DeviceRanks,
    what: &str,
    exec: &E,
    sh: &Sharding,
    causal: bool,
    shape: AttnShape,
    seed: u64,
) -> Result<(), String> {
    let x = SpInputs::new(shape, seed);
    let full = reference(g, shape, causal, &x);
    let per_rank = ranks
        .run(|_, rg, comm| run_rank_warm(exec, sh, rg, comm, &x, 4))
        .map_err(|e| format!("{what}: {e}"))?;
    let counts: Vec<WarmCounts> = per_rank.iter().map(|(_, c)| *c).collect();
    eprintln!("{what}: per rank {counts:?}");
    let outs: Vec<_> = per_rank.iter().map(|(o, _)| o).collect();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_gathered(what, sh, shape, &outs, &full)
    }))
    .map_err(|_| format!("{what}: the warm passes' results differ from the reference"))?;
    if counts.iter().any(|c| c.warm_allocs != 0) {
        return Err(format!("{what}: warm passes allocated: {counts:?}"));
    }
    Ok(())
}

#[test]
fn warm_device_sp_passes_allocate_nothing() {
    let Some(g) = gpu() else { return };
    let mut failed = Vec::new();
    let mut seed = 500;
    let shapes = |p: usize, u: usize| {
        [
            (1, 600 + p, 4 * u, u, 128, Overlap::Overlapped),
            (2, 203, 2 * u, 2 * u, 64, Overlap::Blocking),
        ]
    };
    let mk = |(b, t, h, h_kv, d, o): (usize, usize, usize, usize, usize, Overlap)| {
        (
            AttnShape {
                b,
                tq: t,
                tk: t,
                h,
                h_kv,
                d,
            },
            o,
        )
    };
    for p in [2usize, 3, 4] {
        let mut ranks = DeviceRanks::open(0, p, Duration::from_secs(60)).unwrap();
        let mut record = |r: Result<(), String>, ranks: &mut DeviceRanks| {
            if let Err(e) = r {
                failed.push(e);
                *ranks = DeviceRanks::open(0, p, Duration::from_secs(60)).unwrap();
            }
        };
        if p < 4 {
            for kind in [
                ScheduleKind::RingCausal,
                ScheduleKind::DistAttnCausal,
                ScheduleKind::ZigzagRingCausal,
            ] {
                for sh in shapes(p, 1) {
                    let (shape, overlap) = mk(sh);
                    seed += 1;
                    let (exec, shd) = executor(kind, p, shape, overlap);
                    let what = format!("{kind:?} P {p} {overlap:?} T {}", shape.tq);
                    let r = warm_case(&g, &mut ranks, &what, &exec, &shd, true, shape, seed);
                    record(r, &mut ranks);
                }
            }
        }
        // Pure Ulysses (u = p) and the hybrid (2 × 2 at P 4, 1 × p: the ring through the same
        // code).
        let grids: Vec<UlyssesGrid> = if p == 4 {
            vec![UlyssesGrid::new(2, 2).unwrap()]
        } else {
            vec![
                UlyssesGrid::new(p, 1).unwrap(),
                UlyssesGrid::new(1, p).unwrap(),
            ]
        };
        for grid in grids {
            let kind = if grid.ring() == 1 {
                ScheduleKind::RingCausal
            } else {
                ScheduleKind::DistAttnCausal
            };
            for sh in shapes(p, grid.ulysses()) {
                let (shape, overlap) = mk(sh);
                seed += 1;
                let (att, shd) = ulysses(grid, kind, shape, overlap);
                let what = format!(
                    "Ulysses {}x{} {kind:?} {overlap:?} T {}",
                    grid.ulysses(),
                    grid.ring(),
                    shape.tq
                );
                let r = warm_case(&g, &mut ranks, &what, &att, &shd, true, shape, seed);
                record(r, &mut ranks);
            }
        }
    }
    assert!(failed.is_empty(), "failing cases: {failed:?}");
}
