//! What the device sequence-parallel attention tests share (in-process ranks in
//! `gpu_dist_attn.rs`, NCCL processes in `gpu_nccl_dist_attn.rs`): one case's inputs, single-GPU
//! cuDNN attention over the whole sequence as the reference, one rank's forward + backward
//! through `GpuDistAttn` or `GpuUlysses` ([`DeviceSp`]) over any `DeviceP2p`, and the comparison
//! of the gathered results.

use reel_cuda::{DeviceP2p, Gpu, GpuDistAttn, GpuSpStats, GpuUlysses};
use reel_kernels::attention::{AttnMask, AttnShape};
use reel_parallel::{Overlap, Pass, ScheduleKind, Sharding, UlyssesGrid};
use reel_tensor::{bf16, rng, uniform_vec, Tolerance};

use super::{compare, poison, to_t, widen};

/// The whole sequence's q, dout `[B, T, H, D]` and k, v `[B, T, H_kv, D]`.
pub struct SpInputs {
    pub q: Vec<bf16>,
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    pub dout: Vec<bf16>,
}

impl SpInputs {
    pub fn new(shape: AttnShape, seed: u64) -> SpInputs {
        let AttnShape {
            b,
            tq: t,
            h,
            h_kv,
            d,
            ..
        } = shape;
        let mut r = rng(seed);
        SpInputs {
            q: to_t(&uniform_vec(&mut r, b * t * h * d, 1.5)),
            k: to_t(&uniform_vec(&mut r, b * t * h_kv * d, 1.5)),
            v: to_t(&uniform_vec(&mut r, b * t * h_kv * d, 1.0)),
            dout: to_t(&uniform_vec(&mut r, b * t * h * d, 1.0)),
        }
    }
}

/// out, lse, dq, dk, dv of the whole sequence (or gathered from the ranks), widened to f32.
pub type SpOutputs = [Vec<f32>; 5];

/// Single-GPU cuDNN attention over the whole sequence.
pub fn reference(g: &Gpu, shape: AttnShape, causal: bool, x: &SpInputs) -> SpOutputs {
    let mask = if causal {
        AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        }
    } else {
        AttnMask::Full
    };
    let (qd, kd, vd, dod) = (
        g.upload(&x.q).unwrap(),
        g.upload(&x.k).unwrap(),
        g.upload(&x.v).unwrap(),
        g.upload(&x.dout).unwrap(),
    );
    let mut out = g.alloc_zeros::<bf16>(x.q.len()).unwrap();
    let mut lse = g.alloc_zeros::<f32>(shape.b * shape.tq * shape.h).unwrap();
    g.attention_forward(&mut out, &mut lse, &qd, &kd, &vd, shape, mask)
        .unwrap();
    let mut dq = g.alloc_zeros::<bf16>(x.q.len()).unwrap();
    let mut dk = g.alloc_zeros::<bf16>(x.k.len()).unwrap();
    let mut dv = g.alloc_zeros::<bf16>(x.k.len()).unwrap();
    g.attention_backward(
        &mut dq, &mut dk, &mut dv, &dod, &qd, &kd, &vd, &out, &lse, shape, mask,
    )
    .unwrap();
    [
        widen(&g.download(&out).unwrap()),
        g.download(&lse).unwrap(),
        widen(&g.download(&dq).unwrap()),
        widen(&g.download(&dk).unwrap()),
        widen(&g.download(&dv).unwrap()),
    ]
}

/// The executor of `kind` over `p` ranks for the whole-sequence `shape`, and its sharding.
pub fn executor(
    kind: ScheduleKind,
    p: usize,
    shape: AttnShape,
    overlap: Overlap,
) -> (GpuDistAttn, Sharding) {
    let sh = Sharding::new(shape.tq, p, kind.layout()).unwrap();
    let l = sh.local_len();
    let local = AttnShape {
        tq: l,
        tk: l,
        ..shape
    };
    let exec = GpuDistAttn::new(kind.build(p).unwrap(), sh, local, overlap).unwrap();
    (exec, sh)
}

/// A device sequence-parallel attention: `GpuDistAttn` or `GpuUlysses`.
pub trait DeviceSp {
    /// The per-rank shape.
    fn local(&self) -> AttnShape;
    fn blocks(&self, rank: usize) -> usize;
    fn bytes(&self, rank: usize, pass: Pass) -> u64;
    #[allow(clippy::too_many_arguments)]
    fn fwd<C: DeviceP2p + ?Sized>(
        &self,
        g: &Gpu,
        comm: &C,
        out: &mut reel_cuda::DeviceBuf<bf16>,
        lse: &mut reel_cuda::DeviceBuf<f32>,
        q: &reel_cuda::DeviceBuf<bf16>,
        k: &reel_cuda::DeviceBuf<bf16>,
        v: &reel_cuda::DeviceBuf<bf16>,
    ) -> reel_cuda::Result<GpuSpStats>;
    #[allow(clippy::too_many_arguments)]
    fn bwd<C: DeviceP2p + ?Sized>(
        &self,
        g: &Gpu,
        comm: &C,
        dq: &mut reel_cuda::DeviceBuf<bf16>,
        dk: &mut reel_cuda::DeviceBuf<bf16>,
        dv: &mut reel_cuda::DeviceBuf<bf16>,
        dout: &reel_cuda::DeviceBuf<bf16>,
        q: &reel_cuda::DeviceBuf<bf16>,
        k: &reel_cuda::DeviceBuf<bf16>,
        v: &reel_cuda::DeviceBuf<bf16>,
        out: &reel_cuda::DeviceBuf<bf16>,
        lse: &reel_cuda::DeviceBuf<f32>,
    ) -> reel_cuda::Result<GpuSpStats>;
}

macro_rules! device_sp {
    ($t:ty, $local:expr, $blocks:expr) => {
        impl DeviceSp for $t {
            fn local(&self) -> AttnShape {
                $local(self)
            }
            fn blocks(&self, rank: usize) -> usize {
                $blocks(self, rank)
            }
            fn bytes(&self, rank: usize, pass: Pass) -> u64 {
                self.planned_bytes_sent(rank, pass)
            }
            fn fwd<C: DeviceP2p + ?Sized>(
                &self,
                g: &Gpu,
                comm: &C,
                out: &mut reel_cuda::DeviceBuf<bf16>,
                lse: &mut reel_cuda::DeviceBuf<f32>,
                q: &reel_cuda::DeviceBuf<bf16>,
                k: &reel_cuda::DeviceBuf<bf16>,
                v: &reel_cuda::DeviceBuf<bf16>,
            ) -> reel_cuda::Result<GpuSpStats> {
                self.forward(g, comm, out, lse, q, k, v)
            }
            fn bwd<C: DeviceP2p + ?Sized>(
                &self,
                g: &Gpu,
                comm: &C,
                dq: &mut reel_cuda::DeviceBuf<bf16>,
                dk: &mut reel_cuda::DeviceBuf<bf16>,
                dv: &mut reel_cuda::DeviceBuf<bf16>,
                dout: &reel_cuda::DeviceBuf<bf16>,
                q: &reel_cuda::DeviceBuf<bf16>,
                k: &reel_cuda::DeviceBuf<bf16>,
                v: &reel_cuda::DeviceBuf<bf16>,
                out: &reel_cuda::DeviceBuf<bf16>,
                lse: &reel_cuda::DeviceBuf<f32>,
            ) -> reel_cuda::Result<GpuSpStats> {
                self.backward(g, comm, dq, dk, dv, dout, q, k, v, out, lse)
            }
        }
    };
}

device_sp!(
    GpuDistAttn,
    |e: &GpuDistAttn| e.executor().local_shape(),
    |e: &GpuDistAttn, r| e.executor().planned_blocks(r)
);
device_sp!(
    GpuUlysses,
    |e: &GpuUlysses| e.layout().local_shape(),
    |e: &GpuUlysses, r| e.planned_blocks(r)
);

/// Ulysses over `grid` for the whole-sequence `shape` (`kind`: the ring's schedule, or the
/// causality when r = 1), and its token sharding.
pub fn ulysses(
    grid: UlyssesGrid,
    kind: ScheduleKind,
    shape: AttnShape,
    overlap: Overlap,
) -> (GpuUlysses, Sharding) {
    let u = GpuUlysses::new(grid, shape, kind, overlap).unwrap();
    let sh = u.layout().sharding();
    (u, sh)
}

/// Rank `rank`'s forward and backward on its shards of `x` (outputs poisoned first); its
/// out, lse, dq, dk, dv and the two passes' stats.
pub fn run_rank<E: DeviceSp, C: DeviceP2p + ?Sized>(
    exec: &E,
    sh: &Sharding,
    g: &Gpu,
    comm: &C,
    x: &SpInputs,
) -> reel_cuda::Result<(SpOutputs, GpuSpStats, GpuSpStats)> {
    let rank = comm.rank();
    let AttnShape { b, h, h_kv, d, .. } = exec.local();
    let (qw, kw, l) = (h * d, h_kv * d, sh.local_len());
    let zero = bf16::from_f32(0.0);
    let up = |v: &[bf16], w: usize| g.upload(&sh.shard(v, b, w, rank, zero).unwrap());
    let (qd, kd, vd, dod) = (
        up(&x.q, qw)?,
        up(&x.k, kw)?,
        up(&x.v, kw)?,
        up(&x.dout, qw)?,
    );
    let mut out = g.upload(&poison::<bf16>(b * l * qw))?;
    let mut lse = g.upload(&poison::<f32>(b * l * h))?;
    let fs = exec.fwd(g, comm, &mut out, &mut lse, &qd, &kd, &vd)?;
    let mut dq = g.upload(&poison::<bf16>(b * l * qw))?;
    let mut dk = g.upload(&poison::<bf16>(b * l * kw))?;
    let mut dv = g.upload(&poison::<bf16>(b * l * kw))?;
    let bs = exec.bwd(
        g, comm, &mut dq, &mut dk, &mut dv, &dod, &qd, &kd, &vd, &out, &lse,
    )?;
    Ok((
        [
            widen(&g.download(&out)?),
            g.download(&lse)?,
            widen(&g.download(&dq)?),
            widen(&g.download(&dk)?),
            widen(&g.download(&dv)?),
        ],
        fs,
        bs,
    ))
}

/// Asserts that `rank`'s stats are the plan's: every block computed, every planned byte sent.
pub fn check_stats<E: DeviceSp>(exec: &E, rank: usize, fs: &GpuSpStats, bs: &GpuSpStats) {
    let planned = exec.blocks(rank);
    assert_eq!(fs.blocks, planned, "rank {rank} forward blocks");
    assert_eq!(bs.blocks, planned, "rank {rank} backward blocks");
    assert_eq!(
        fs.bytes_sent,
        exec.bytes(rank, Pass::Forward),
        "rank {rank} forward bytes"
    );
    assert_eq!(
        bs.bytes_sent,
        exec.bytes(rank, Pass::Backward),
        "rank {rank} backward bytes"
    );
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Unshards every rank's outputs and compares them with the reference within bf16 tolerance.
pub fn check_gathered(
    what: &str,
    sh: &Sharding,
    shape: AttnShape,
    per_rank: &[&SpOutputs],
    full: &SpOutputs,
) {
    let AttnShape { b, h, h_kv, d, .. } = shape;
    let (qw, kw) = (h * d, h_kv * d);
    let gather = |i: usize, w: usize| {
        let parts: Vec<&Vec<f32>> = per_rank.iter().map(|x| &x[i]).collect();
        sh.unshard(&parts, b, w).unwrap()
    };
    compare(
        &format!("{what} out"),
        &gather(0, qw),
        &full[0],
        Tolerance::new(1e-2, 2e-2),
        1e-2,
    );
    compare(
        &format!("{what} lse"),
        &gather(1, h),
        &full[1],
        Tolerance::new(2e-3, 1e-3),
        1e-3,
    );
    for (i, name, w) in [(2, "dq", qw), (3, "dk", kw), (4, "dv", kw)] {
        let want = &full[i];
        compare(
            &format!("{what} {name}"),
            &gather(i, w),
            want,
            Tolerance::new(0.02 * max_abs(want), 0.02),
            1.5e-2,
        );
    }
}

/// The Ulysses grids, ring schedules and shapes a world of `p` ranks runs: pure Ulysses
/// (causal and full), every factorisation u × r with r > 1 (the hybrid: balanced DistAttn, ring
/// causal and full; u = 1 is the plain ring through the same code), each on a GQA shape with an
/// odd length (padding) and D 128, and a B 2, D 64 shape without GQA.
pub fn ulysses_cases(p: usize) -> Vec<(UlyssesGrid, ScheduleKind, AttnShape, Overlap)> {
    let mut cases = Vec::new();
    for u in (1..=p).filter(|u| p.is_multiple_of(*u)) {
        let grid = UlyssesGrid::new(u, p / u).unwrap();
        let kinds: &[ScheduleKind] = if p / u == 1 {
            &[ScheduleKind::RingCausal, ScheduleKind::RingFull]
        } else {
            &[
                ScheduleKind::DistAttnCausal,
                ScheduleKind::RingCausal,
                ScheduleKind::RingFull,
            ]
        };
        for &kind in kinds {
            for (b, t, h, h_kv, d, overlap) in [
                (1, 1000 + p, 4 * u, u, 128, Overlap::Overlapped),
                (2, 333, 2 * u, 2 * u, 64, Overlap::Blocking),
            ] {
                let shape = AttnShape {
                    b,
                    tq: t,
                    tk: t,
                    h,
                    h_kv,
                    d,
                };
                cases.push((grid, kind, shape, overlap));
            }
        }
    }
    cases
}

/// Passes [`run_rank_warm`] counts as warm-up: the pool serves a request from a cached block up
/// to twice its size, so which block each buffer lands in settles over two passes, not one.
pub const WARMUP_PASSES: usize = 2;

/// What a rank's `Gpu` did over the warm passes of [`run_rank_warm`].
#[derive(Clone, Copy, Debug)]
pub struct WarmCounts {
    /// Device allocations of the warm-up passes ([`WARMUP_PASSES`]); of them the first.
    pub cold_allocs: u64,
    /// Device allocations of the later passes (a warm pass must make none).
    pub warm_allocs: u64,
    /// Scratch requests served by the pool per warm pass: the buffers a pass takes.
    pub hits_per_pass: u64,
}

/// Rank `rank`'s forward and backward `passes` (> [`WARMUP_PASSES`]) times on the same device buffers (inputs
/// uploaded and outputs made once, outputs poisoned before every pass, and every cached scratch
/// block filled with NaN before every warm pass, so a buffer read before it is written shows);
/// its outputs of the last pass and the device allocations of the warm-up and the warm passes.
pub fn run_rank_warm<E: DeviceSp, C: DeviceP2p + ?Sized>(
    exec: &E,
    sh: &Sharding,
    g: &Gpu,
    comm: &C,
    x: &SpInputs,
    passes: usize,
) -> reel_cuda::Result<(SpOutputs, WarmCounts)> {
    assert!(passes > WARMUP_PASSES);
    let rank = comm.rank();
    let AttnShape { b, h, h_kv, d, .. } = exec.local();
    let (qw, kw, l) = (h * d, h_kv * d, sh.local_len());
    let zero = bf16::from_f32(0.0);
    let up = |v: &[bf16], w: usize| g.upload(&sh.shard(v, b, w, rank, zero).unwrap());
    let (qd, kd, vd, dod) = (
        up(&x.q, qw)?,
        up(&x.k, kw)?,
        up(&x.v, kw)?,
        up(&x.dout, qw)?,
    );
    let mut out = g.alloc_zeros::<bf16>(b * l * qw)?;
    let mut lse = g.alloc_zeros::<f32>(b * l * h)?;
    let mut dq = g.alloc_zeros::<bf16>(b * l * qw)?;
    let mut dk = g.alloc_zeros::<bf16>(b * l * kw)?;
    let mut dv = g.alloc_zeros::<bf16>(b * l * kw)?;
    let mut counts = WarmCounts {
        cold_allocs: 0,
        warm_allocs: 0,
        hits_per_pass: 0,
    };
    for pass in 0..passes {
        g.upload_into(&mut out, &poison::<bf16>(b * l * qw))?;
        g.upload_into(&mut lse, &poison::<f32>(b * l * h))?;
        g.upload_into(&mut dq, &poison::<bf16>(b * l * qw))?;
        g.upload_into(&mut dk, &poison::<bf16>(b * l * kw))?;
        g.upload_into(&mut dv, &poison::<bf16>(b * l * kw))?;
        if pass >= WARMUP_PASSES {
            g.scribble_cached(0xFF)?;
        }
        let before = g.alloc_stats();
        exec.fwd(g, comm, &mut out, &mut lse, &qd, &kd, &vd)?;
        exec.bwd(
            g, comm, &mut dq, &mut dk, &mut dv, &dod, &qd, &kd, &vd, &out, &lse,
        )?;
        g.synchronize()?;
        let after = g.alloc_stats();
        let made = after.device_allocs - before.device_allocs;
        if pass < WARMUP_PASSES {
            counts.cold_allocs += made;
        } else {
            counts.warm_allocs += made;
            counts.hits_per_pass = after.pool_hits - before.pool_hits;
        }
    }
    Ok((
        [
            widen(&g.download(&out)?),
            g.download(&lse)?,
            widen(&g.download(&dq)?),
            widen(&g.download(&dk)?),
            widen(&g.download(&dv)?),
        ],
        counts,
    ))
}
