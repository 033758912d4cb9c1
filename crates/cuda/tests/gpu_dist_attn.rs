//! Sequence-parallel attention on device buffers (`GpuDistAttn`): in-process ranks on one GPU,
//! each with its own stream, exchanging device buffers through a `DeviceWorld`, run every
//! schedule (balanced DistAttn, ring causal and full, zigzag ring) at world 2, 3 and 4, forward
//! and backward, overlapped and blocking; the gathered out, lse, dq, dk, dv match single-GPU
//! cuDNN attention over the whole sequence within bf16 tolerance. Lengths are not multiples of
//! the world (padded chunks), GQA, D 64 and 128, B 1 and 2. Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --features cudnn --release --test gpu_dist_attn -- --nocapture
#![cfg(feature = "cudnn")]

mod common;
use common::*;

use std::time::Duration;

use reel_cuda::{DeviceRanks, Gpu, GpuDistAttn};
use reel_kernels::attention::{AttnMask, AttnShape};
use reel_parallel::{Overlap, ScheduleKind, Sharding};
use reel_tensor::{bf16, rng, uniform_vec, Tolerance};

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

struct Full {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Single-GPU cuDNN attention over the whole sequence.
#[allow(clippy::too_many_arguments)]
fn reference(
    g: &Gpu,
    shape: AttnShape,
    causal: bool,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    dout: &[bf16],
) -> Full {
    let mask = if causal {
        AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        }
    } else {
        AttnMask::Full
    };
    let (qd, kd, vd, dod) = (
        g.upload(q).unwrap(),
        g.upload(k).unwrap(),
        g.upload(v).unwrap(),
        g.upload(dout).unwrap(),
    );
    let mut out = g.alloc_zeros::<bf16>(q.len()).unwrap();
    let mut lse = g.alloc_zeros::<f32>(shape.b * shape.tq * shape.h).unwrap();
    g.attention_forward(&mut out, &mut lse, &qd, &kd, &vd, shape, mask)
        .unwrap();
    let mut dq = g.alloc_zeros::<bf16>(q.len()).unwrap();
    let mut dk = g.alloc_zeros::<bf16>(k.len()).unwrap();
    let mut dv = g.alloc_zeros::<bf16>(k.len()).unwrap();
    g.attention_backward(
        &mut dq, &mut dk, &mut dv, &dod, &qd, &kd, &vd, &out, &lse, shape, mask,
    )
    .unwrap();
    Full {
        out: widen(&g.download(&out).unwrap()),
        lse: g.download(&lse).unwrap(),
        dq: widen(&g.download(&dq).unwrap()),
        dk: widen(&g.download(&dk).unwrap()),
        dv: widen(&g.download(&dv).unwrap()),
    }
}

#[allow(clippy::too_many_arguments)]
fn case(
    g: &Gpu,
    ranks: &mut DeviceRanks,
    kind: ScheduleKind,
    overlap: Overlap,
    shape: AttnShape,
    seed: u64,
) {
    let p = ranks.world_size();
    let AttnShape {
        b,
        tq: t,
        h,
        h_kv,
        d,
        ..
    } = shape;
    let (qw, kw) = (h * d, h_kv * d);
    let mut r = rng(seed);
    let q: Vec<bf16> = to_t(&uniform_vec(&mut r, b * t * qw, 1.5));
    let k: Vec<bf16> = to_t(&uniform_vec(&mut r, b * t * kw, 1.5));
    let v: Vec<bf16> = to_t(&uniform_vec(&mut r, b * t * kw, 1.0));
    let dout: Vec<bf16> = to_t(&uniform_vec(&mut r, b * t * qw, 1.0));
    let full = reference(g, shape, kind.is_causal(), &q, &k, &v, &dout);

    let sh = Sharding::new(t, p, kind.layout()).unwrap();
    let l = sh.local_len();
    let local = AttnShape {
        tq: l,
        tk: l,
        ..shape
    };
    let exec = GpuDistAttn::new(kind.build(p).unwrap(), sh, local, overlap).unwrap();
    let zero = bf16::from_f32(0.0);
    let shard = |x: &[bf16], w: usize, rank: usize| sh.shard(x, b, w, rank, zero).unwrap();
    let per_rank = ranks
        .run(|rank, rg, comm| {
            let up = |x: &[bf16], w: usize| rg.upload(&shard(x, w, rank));
            let (qd, kd, vd, dod) = (up(&q, qw)?, up(&k, kw)?, up(&v, kw)?, up(&dout, qw)?);
            let mut out = rg.upload(&poison::<bf16>(b * l * qw))?;
            let mut lse = rg.upload(&poison::<f32>(b * l * h))?;
            let fs = exec.forward(rg, comm, &mut out, &mut lse, &qd, &kd, &vd)?;
            let mut dq = rg.upload(&poison::<bf16>(b * l * qw))?;
            let mut dk = rg.upload(&poison::<bf16>(b * l * kw))?;
            let mut dv = rg.upload(&poison::<bf16>(b * l * kw))?;
            let bs = exec.backward(
                rg, comm, &mut dq, &mut dk, &mut dv, &dod, &qd, &kd, &vd, &out, &lse,
            )?;
            Ok((
                [
                    widen(&rg.download(&out)?),
                    rg.download(&lse)?,
                    widen(&rg.download(&dq)?),
                    widen(&rg.download(&dk)?),
                    widen(&rg.download(&dv)?),
                ],
                fs,
                bs,
            ))
        })
        .unwrap_or_else(|e| panic!("{kind:?} P {p}: {e}"));
    for (rank, (_, fs, bs)) in per_rank.iter().enumerate() {
        let planned = exec.executor().planned_blocks(rank);
        assert_eq!(fs.blocks, planned, "rank {rank} forward blocks");
        assert_eq!(bs.blocks, planned, "rank {rank} backward blocks");
    }
    let gather = |i: usize, w: usize| {
        let parts: Vec<&Vec<f32>> = per_rank.iter().map(|(x, _, _)| &x[i]).collect();
        sh.unshard(&parts, b, w).unwrap()
    };
    let what = format!("{kind:?} P {p} {overlap:?} b{b} T{t} h{h}/{h_kv} d{d}");
    compare(
        &format!("{what} out"),
        &gather(0, qw),
        &full.out,
        Tolerance::new(1e-2, 2e-2),
        1e-2,
    );
    compare(
        &format!("{what} lse"),
        &gather(1, h),
        &full.lse,
        Tolerance::new(2e-3, 1e-3),
        1e-3,
    );
    for (i, name, w, want) in [
        (2, "dq", qw, &full.dq),
        (3, "dk", kw, &full.dk),
        (4, "dv", kw, &full.dv),
    ] {
        compare(
            &format!("{what} {name}"),
            &gather(i, w),
            want,
            Tolerance::new(0.02 * max_abs(want), 0.02),
            1.5e-2,
        );
    }
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
