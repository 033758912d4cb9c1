//! `reel bench sp-nccl`: sequence-parallel attention across GPUs, one process per GPU over NCCL
//! (`GpuDistAttn` over `NcclP2p`), started as `reel launch --nproc P -- reel bench sp-nccl`.
//!
//! One attention layer of a 7B-shaped model (B 1, H 32 / H_kv 8, D 128, bf16), for each sequence
//! length (`--sp-seqs`, default 32k, 64k, 128k) and each schedule (ring causal, ring full,
//! balanced DistAttn, zigzag ring): the forward + backward step time with communication
//! overlapped and blocking (a NCCL barrier, then the pass on every rank, the slowest rank's wall
//! time; median of `--reps` after one warm-up), beside one unsplit cuDNN call over the whole
//! sequence on one GPU; bytes each GPU sends per step (measured by the communicator's counters,
//! the plan's count, and the ring formula 16·N·d_kv·(P−1)/P: K‖V bf16 to every other rank in
//! the forward and again in the backward, dK‖dV f32 back); and the longest sequence that ran.
//! Then the same for `GpuUlysses`: pure Ulysses (all-to-all over heads, causal and full) where
//! P divides H_kv, and the hybrid u × r (Ulysses groups × balanced DistAttn over the groups) for
//! the largest u with 1 < u < P dividing both P and H_kv.
//! A failing row (out of memory, say) ends the run: the ranks' communicator is aborted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reel_comm::Communicator;
use reel_cuda::{Gpu, GpuDistAttn, GpuSpStats, GpuUlysses, NcclComm, NcclP2p};
use reel_kernels::attention::AttnShape;
use reel_parallel::{Overlap, Pass, ScheduleKind, Sharding, UlyssesGrid};
use reel_tensor::bf16;
use serde_json::{json, Value};

use super::bench_gpu_sp::single_gpu_ms;
use super::{median, uniform_bf16};

/// (H, H_kv, D) of the layer.
const HEADS: (usize, usize, usize) = (32, 8, 128);

/// Rank 0's report (the other ranks return `Value::Null` and print nothing).
pub fn run(seqs: &[usize], reps: usize, as_json: bool) -> Result<Value> {
    if std::env::var_os(reel_comm::launch::ENV_RANK).is_none() {
        anyhow::bail!(
            "bench sp-nccl runs one process per GPU: start it as \
             `reel launch --nproc 2 -- reel bench sp-nccl`"
        );
    }
    // NCCL is opened by the name libnccl.so: make pip's libnccl.so.2 reachable under it.
    if let Err(e) = reel_cuda::libs::reexec_with_library_path() {
        eprintln!("bench sp-nccl: {e}");
    }
    let comm = NcclComm::from_env(Duration::from_secs(300)).context("NCCL init")?;
    let local = std::env::var(reel_comm::launch::ENV_LOCAL_RANK)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(comm.rank());
    let gpu = Gpu::open_on_new_stream(local)?;
    let p2p = comm.device_p2p(&gpu)?;
    let (p, rank) = (comm.world_size(), comm.rank());
    let lead = rank == 0;
    let (h, h_kv, d) = HEADS;
    let iters = reps.max(1);
    if lead && !as_json {
        println!("{} — {p} processes, one GPU each, NCCL", gpu.info());
        println!(
            "\nSP attention over NCCL, forward + backward of one layer, B 1, H {h}/{h_kv}, D {d}, bf16; \
             step = slowest rank's wall time, median of {iters} after 1 warm-up; \
             bytes per GPU per step: measured | planned | ring formula 16·N·d_kv·(P−1)/P"
        );
    }
    let mut rows = Vec::new();
    let mut longest: Vec<(String, usize)> = Vec::new();
    'seqs: for &t in seqs {
        // One GPU, the whole sequence: every rank measures it at once (rank 0's is reported).
        let single_causal = single_gpu_ms(&gpu, (1, t, h, h_kv, d), true, 1, iters).ok();
        let single_full = single_gpu_ms(&gpu, (1, t, h, h_kv, d), false, 1, iters).ok();
        comm.barrier()?;
        for (name, kind, grid) in variants(p, h_kv) {
            let single = if kind.is_causal() {
                single_causal
            } else {
                single_full
            };
            match row(&comm, &p2p, &gpu, (&name, kind, grid), t, iters, single) {
                Ok(r) => {
                    if lead && !as_json {
                        print_row(&r);
                    }
                    match longest.iter_mut().find(|(k, _)| *k == name) {
                        Some(e) => e.1 = t,
                        None => longest.push((name, t)),
                    }
                    rows.push(r);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if lead {
                        eprintln!("{name} T {t}: {msg} (the run stops here)");
                    }
                    rows.push(json!({"schedule": name, "ranks": p, "t": t,
                                     "error": msg}));
                    break 'seqs;
                }
            }
        }
    }
    if lead && !as_json {
        for (k, t) in &longest {
            println!("longest sequence run by {k}: {t}");
        }
    }
    Ok(if lead {
        json!({"ranks": p, "device": gpu.info().name, "h": h, "h_kv": h_kv, "d": d,
               "rows": rows, "longest": longest.iter().map(|(k, t)| json!({"schedule": k, "t": t})).collect::<Vec<_>>()})
    } else {
        Value::Null
    })
}

/// (row name, schedule, Ulysses grid) of every row: the DistAttn-family schedules, then pure
/// Ulysses where P | H_kv and the hybrid with the largest u, 1 < u < P, dividing P and H_kv.
fn variants(p: usize, h_kv: usize) -> Vec<(String, ScheduleKind, Option<UlyssesGrid>)> {
    let mut v: Vec<_> = ScheduleKind::ALL
        .iter()
        .map(|&k| (format!("{k:?}"), k, None))
        .collect();
    if h_kv.is_multiple_of(p) && p > 1 {
        let g = UlyssesGrid::new(p, 1).ok();
        v.push(("UlyssesCausal".into(), ScheduleKind::RingCausal, g));
        v.push(("UlyssesFull".into(), ScheduleKind::RingFull, g));
    }
    if let Some(u) = (2..p)
        .rev()
        .find(|&u| p.is_multiple_of(u) && h_kv.is_multiple_of(u))
    {
        let g = UlyssesGrid::new(u, p / u).ok();
        let name = format!("Hybrid{u}x{}DistAttn", p / u);
        v.push((name, ScheduleKind::DistAttnCausal, g));
    }
    v
}

/// The attention a row times.
enum Sp {
    Dist(GpuDistAttn),
    Ulysses(GpuUlysses),
}

impl Sp {
    fn planned(&self, rank: usize, pass: Pass) -> u64 {
        match self {
            Sp::Dist(e) => e.planned_bytes_sent(rank, pass),
            Sp::Ulysses(e) => e.planned_bytes_sent(rank, pass),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        gpu: &Gpu,
        p2p: &NcclP2p<&NcclComm>,
        [out, dq, dk, dv]: [&mut reel_cuda::DeviceBuf<bf16>; 4],
        lse: &mut reel_cuda::DeviceBuf<f32>,
        [q, k, v, dout]: [&reel_cuda::DeviceBuf<bf16>; 4],
    ) -> reel_cuda::Result<(GpuSpStats, GpuSpStats)> {
        Ok(match self {
            Sp::Dist(e) => (
                e.forward(gpu, p2p, out, lse, q, k, v)?,
                e.backward(gpu, p2p, dq, dk, dv, dout, q, k, v, out, lse)?,
            ),
            Sp::Ulysses(e) => (
                e.forward(gpu, p2p, out, lse, q, k, v)?,
                e.backward(gpu, p2p, dq, dk, dv, dout, q, k, v, out, lse)?,
            ),
        })
    }
}

/// The largest value of `x` over the ranks.
fn max_over_ranks(comm: &NcclComm, x: f64) -> Result<f64> {
    let mut all = vec![0f32; comm.world_size()];
    comm.all_gather(&[x as f32], &mut all)?;
    Ok(all.into_iter().fold(f64::MIN, |m, v| m.max(v as f64)))
}

#[allow(clippy::too_many_arguments)]
fn row(
    comm: &NcclComm,
    p2p: &NcclP2p<&NcclComm>,
    gpu: &Gpu,
    (name, kind, grid): (&str, ScheduleKind, Option<UlyssesGrid>),
    t: usize,
    iters: usize,
    single_ms: Option<f64>,
) -> Result<Value> {
    let (p, rank) = (comm.world_size(), comm.rank());
    let (h, h_kv, d) = HEADS;
    let whole = AttnShape {
        b: 1,
        tq: t,
        tk: t,
        h,
        h_kv,
        d,
    };
    let make = |overlap| -> Result<Sp> {
        Ok(match grid {
            Some(g) => Sp::Ulysses(GpuUlysses::new(g, whole, kind, overlap)?),
            None => {
                let sh = Sharding::new(t, p, kind.layout())?;
                let l = sh.local_len();
                let local = AttnShape {
                    tq: l,
                    tk: l,
                    ..whole
                };
                Sp::Dist(GpuDistAttn::new(kind.build(p)?, sh, local, overlap)?)
            }
        })
    };
    let l = match grid {
        Some(g) => reel_cuda::UlyssesLayout::new(g, whole, kind)?.local_len(),
        None => Sharding::new(t, p, kind.layout())?.local_len(),
    };
    let (nq, nk, nl) = (l * h * d, l * h_kv * d, l * h);
    let r = rank as u64;
    let q = gpu.upload(&uniform_bf16(nq, 60 + 4 * r))?;
    let k = gpu.upload(&uniform_bf16(nk, 61 + 4 * r))?;
    let v = gpu.upload(&uniform_bf16(nk, 62 + 4 * r))?;
    let dout = gpu.upload(&uniform_bf16(nq, 63 + 4 * r))?;
    let mut out = gpu.alloc_zeros::<bf16>(nq)?;
    let mut lse = gpu.alloc_zeros::<f32>(nl)?;
    let mut dq = gpu.alloc_zeros::<bf16>(nq)?;
    let mut dk = gpu.alloc_zeros::<bf16>(nk)?;
    let mut dv = gpu.alloc_zeros::<bf16>(nk)?;
    let exec = make(Overlap::Overlapped)?;
    let planned = exec.planned(rank, Pass::Forward) + exec.planned(rank, Pass::Backward);
    let mut res = json!({"schedule": name, "ranks": p, "t": t, "h": h,
                         "h_kv": h_kv, "d": d, "single_gpu_ms": single_ms});
    // Pure Ulysses has no ring to overlap: it runs once, as "overlapped" and "blocking" alike.
    let modes: &[Overlap] = match grid {
        Some(g) if g.ring() == 1 => &[Overlap::Overlapped],
        _ => &[Overlap::Overlapped, Overlap::Blocking],
    };
    for &mode in modes {
        let exec = make(mode)?;
        let mut times = Vec::with_capacity(iters);
        let mut bytes = 0u64;
        for it in 0..1 + iters {
            comm.barrier()?;
            let t0 = Instant::now();
            let (fs, bs) = exec.step(
                gpu,
                p2p,
                [&mut out, &mut dq, &mut dk, &mut dv],
                &mut lse,
                [&q, &k, &v, &dout],
            )?;
            gpu.synchronize()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let slowest = max_over_ranks(comm, ms)?;
            if it > 0 {
                times.push(slowest as f32);
            }
            bytes = fs.bytes_sent + bs.bytes_sent;
        }
        let key = match mode {
            Overlap::Overlapped => "overlapped",
            Overlap::Blocking => "blocking",
        };
        res[format!("{key}_ms")] = json!(median(times.clone()));
        if modes.len() == 1 {
            res["blocking_ms"] = json!(median(times));
        }
        res["bytes_sent_per_gpu"] = json!(max_over_ranks(comm, bytes as f64)?);
    }
    let n = t as f64;
    let d_kv = (h_kv * d) as f64;
    res["planned_bytes_per_gpu"] = json!(max_over_ranks(comm, planned as f64)?);
    res["ring_formula_bytes"] = json!(16.0 * n * d_kv * (p as f64 - 1.0) / p as f64);
    let (o, b) = (
        res["overlapped_ms"].as_f64().unwrap_or(f64::NAN),
        res["blocking_ms"].as_f64().unwrap_or(f64::NAN),
    );
    res["blocking_over_overlapped"] = json!(b / o);
    if let Some(s) = single_ms {
        res["speedup_over_one_gpu"] = json!(s / o);
    }
    // Attention FLOPs of the step (forward 4·T²·H·D, backward 2.5×; causal half), per GPU.
    let causal = if kind.is_causal() { 0.5 } else { 1.0 };
    let flops = 3.5 * 4.0 * n * n * (h * d) as f64 * causal;
    res["tflops_per_gpu"] = json!(flops / p as f64 / (o * 1e-3) / 1e12);
    Ok(res)
}

fn print_row(r: &Value) {
    let f = |v: &Value, p: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.p$}"));
    let mb = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{:.1}", x / 1e6))
    };
    println!(
        "{:<16} P {} T {:>7}: overlapped {:>9} ms, blocking {:>9} ms (blocking/overlapped {}) | one GPU {:>9} ms, speed-up {} | {} TFLOP/s per GPU | MB sent per GPU {} | planned {} | ring formula {}",
        r["schedule"].as_str().unwrap_or(""),
        r["ranks"],
        r["t"],
        f(&r["overlapped_ms"], 2),
        f(&r["blocking_ms"], 2),
        f(&r["blocking_over_overlapped"], 3),
        f(&r["single_gpu_ms"], 2),
        f(&r["speedup_over_one_gpu"], 2),
        f(&r["tflops_per_gpu"], 0),
        mb(&r["bytes_sent_per_gpu"]),
        mb(&r["planned_bytes_per_gpu"]),
        mb(&r["ring_formula_bytes"]),
    );
}
