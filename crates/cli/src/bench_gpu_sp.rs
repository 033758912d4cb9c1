//! Two sections of `reel bench gpu`:
//!
//! - `decode`: paged decode attention (`Gpu::paged_attention_forward`), bf16 KV cache in blocks of
//!   16 tokens with shuffled block tables, one new token per sequence. Bytes counted: K and V of
//!   every cached token read once, plus q and out; GB/s against the H200's 4.8 TB/s (datasheet)
//!   and the ~4.3 TB/s a device-to-device copy reaches there. PyTorch's side
//!   (scripts/bench_gpu_torch.py `--decode`): `F.scaled_dot_product_attention` over K/V gathered
//!   through the same kind of block tables (`k_cache[tables]`, the gather timed with it), and over
//!   an already contiguous cache (the gather left out: a lower bound for a dense-cache engine).
//! - `sp`: DistAttn on in-process ranks of this one GPU (`GpuDistAttn` over `DeviceRanks`: one
//!   thread and stream per rank, device-to-device messages on each sender's communication
//!   stream): one forward + backward step, B 1, H 32 / H_kv 8, D 128, causal, with communication
//!   overlapped and blocking in the same run (their ratio), beside one unsplit cuDNN call over the
//!   whole sequence. All ranks share one GPU, so the step cannot beat the unsplit call; what it
//!   shows is the cost of the messages and how much of it overlap hides.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::Result;
use reel_cuda::{DeviceRanks, Gpu, GpuDistAttn, GpuPagedBatch};
use reel_kernels::attention::{AttnMask, AttnShape};
use reel_parallel::{Overlap, ScheduleKind, Sharding};
use reel_rollout::paged_attention::{PagedSeq, PagedShape};
use reel_tensor::bf16;
use serde_json::{json, Value};

use super::{median, uniform_bf16};

/// (sequences, context, H, H_kv, D, block size): as `--decode` passes PyTorch.
const DECODE: &[(usize, usize, usize, usize, usize, usize)] = &[
    (64, 4096, 32, 8, 128, 16),
    (8, 32768, 32, 8, 128, 16),
    (1, 131072, 32, 8, 128, 16),
    (64, 4096, 14, 2, 64, 16),
];

/// The H200's HBM3e bandwidth by its datasheet, bytes/s.
const H200_BYTES_PER_S: f64 = 4.8e12;

/// (schedule, ranks) of the DistAttn step; shape (B, T, H, H_kv, D).
const SP: &[(ScheduleKind, usize)] = &[
    (ScheduleKind::DistAttnCausal, 2),
    (ScheduleKind::DistAttnCausal, 4),
    (ScheduleKind::ZigzagRingCausal, 4),
];
const SP_SHAPE: (usize, usize, usize, usize, usize) = (1, 32768, 32, 8, 128);

pub fn decode_arg() -> String {
    Value::Array(
        DECODE
            .iter()
            .map(|&(b, c, h, hk, d, bs)| json!([b, c, h, hk, d, bs]))
            .collect(),
    )
    .to_string()
}

fn decode_bytes(b: usize, ctx: usize, h: usize, h_kv: usize, d: usize) -> f64 {
    (2 * b * ctx * h_kv * d * 2 + 2 * b * h * d * 2) as f64
}

/// One row per `DECODE` shape (an error in its row).
pub fn decode_rows(gpu: &Gpu) -> Vec<Value> {
    DECODE
        .iter()
        .map(|&(b, ctx, h, h_kv, d, bs)| {
            decode_row(gpu, b, ctx, h, h_kv, d, bs).unwrap_or_else(|e| {
                eprintln!("decode b {b} ctx {ctx}: {e:#}");
                json!({"b": b, "ctx": ctx, "h": h, "h_kv": h_kv, "d": d, "bs": bs,
                       "error": format!("{e:#}")})
            })
        })
        .collect()
}

fn decode_row(
    gpu: &Gpu,
    b: usize,
    ctx: usize,
    h: usize,
    h_kv: usize,
    d: usize,
    bs: usize,
) -> Result<Value> {
    let per_seq = ctx.div_ceil(bs);
    let num_blocks = b * per_seq;
    // Shuffled block ids (an LCG permutation): sequences' blocks interleave in the pool.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..ids.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ids.swap(i, (s >> 33) as usize % (i + 1));
    }
    let seqs: Vec<PagedSeq> = (0..b)
        .map(|i| PagedSeq {
            block_table: &ids[i * per_seq..(i + 1) * per_seq],
            past: ctx - 1,
            rows: i..i + 1,
        })
        .collect();
    let n_kv = num_blocks * bs * h_kv * d;
    let k = gpu.upload(&uniform_bf16(n_kv, 41))?;
    let v = gpu.upload(&uniform_bf16(n_kv, 42))?;
    let q = gpu.upload(&uniform_bf16(b * h * d, 43))?;
    let mut out = gpu.alloc_zeros::<bf16>(b * h * d)?;
    let mut lse = gpu.alloc_zeros::<f32>(b * h)?;
    let batch = GpuPagedBatch::new(gpu, &seqs, bs)?;
    let shape = PagedShape {
        h,
        h_kv,
        d,
        block_size: bs,
    };
    let split = batch.default_split_keys(
        h,
        reel_cuda::paged_head_group(h, h_kv),
        gpu.info().multiprocessors as usize,
    );
    let ms = median(gpu.time_ms(5, 20, || {
        gpu.paged_attention_forward(&mut out, &mut lse, &q, &k, &v, &batch, shape, None)
    })?);
    let bytes = decode_bytes(b, ctx, h, h_kv, d);
    let gbps = bytes / (ms * 1e-3) / 1e9;
    Ok(json!({
        "b": b, "ctx": ctx, "h": h, "h_kv": h_kv, "d": d, "bs": bs,
        "splits": ctx.div_ceil(split), "bytes": bytes,
        "reel_ms": ms, "reel_gbps": gbps,
        "reel_frac_of_hbm": gbps * 1e9 / H200_BYTES_PER_S,
    }))
}

/// Adds PyTorch's columns to a decode row.
pub fn merge_decode_row(r: &mut Value, tr: &Value) {
    let bytes = r["bytes"].as_f64().unwrap_or(f64::NAN);
    let reel = r["reel_ms"].as_f64().unwrap_or(f64::NAN);
    for (key, out) in [
        ("gather_sdpa_ms", "torch_gather_sdpa"),
        ("sdpa_contiguous_ms", "torch_sdpa_contiguous"),
    ] {
        if let Some(ms) = tr[key].as_f64() {
            r[format!("{out}_ms")] = json!(ms);
            r[format!("{out}_gbps")] = json!(bytes / (ms * 1e-3) / 1e9);
            r[format!("speedup_vs_{out}")] = json!(ms / reel);
        }
    }
    if let Some(e) = tr["error"].as_str() {
        r["torch_error"] = json!(e);
    }
}

pub fn print_decode(rows: &[Value]) {
    let f = |v: &Value, p: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.p$}"));
    println!(
        "\npaged decode attention, bf16 KV, one new token per sequence; GB/s = (K+V read + q + out) / time; \
         H200 HBM 4800 GB/s; torch = SDPA over k_cache[tables] (gather timed) | over a contiguous cache"
    );
    for r in rows {
        if let Some(e) = r["error"].as_str() {
            println!("seqs {} ctx {}: {e}", r["b"], r["ctx"]);
            continue;
        }
        println!(
            "seqs {:>3} ctx {:>6} H {}/{} D {:>3} bs {} splits {:>3}: reel {:>7} ms {:>6} GB/s ({}% of HBM) | torch gather+SDPA {:>7} ms {:>6} GB/s, speed-up {} | contiguous SDPA {:>7} ms {:>6} GB/s, speed-up {}",
            r["b"],
            r["ctx"],
            r["h"],
            r["h_kv"],
            r["d"],
            r["bs"],
            r["splits"],
            f(&r["reel_ms"], 3),
            f(&r["reel_gbps"], 0),
            f(&json!(r["reel_frac_of_hbm"].as_f64().map(|x| 100.0 * x)), 0),
            f(&r["torch_gather_sdpa_ms"], 3),
            f(&r["torch_gather_sdpa_gbps"], 0),
            f(&r["speedup_vs_torch_gather_sdpa"], 2),
            f(&r["torch_sdpa_contiguous_ms"], 3),
            f(&r["torch_sdpa_contiguous_gbps"], 0),
            f(&r["speedup_vs_torch_sdpa_contiguous"], 2),
        );
    }
}

/// One row per `SP` configuration (an error in its row).
pub fn sp_rows() -> Vec<Value> {
    let single = Gpu::open(0)
        .map_err(anyhow::Error::from)
        .and_then(|g| single_gpu_ms(&g, SP_SHAPE, true, 2, 5))
        .unwrap_or_else(|e| {
            eprintln!("single-GPU attention: {e:#}");
            f64::NAN
        });
    SP.iter()
        .map(|&(kind, p)| {
            sp_row(kind, p, single).unwrap_or_else(|e| {
                eprintln!("sp {kind:?} P {p}: {e:#}");
                json!({"schedule": format!("{kind:?}"), "ranks": p, "error": format!("{e:#}")})
            })
        })
        .collect()
}

/// One unsplit cuDNN forward + backward over the whole sequence `(B, T, H, H_kv, D)` on `gpu`,
/// median ms of `iters` after `warm` runs.
pub(super) fn single_gpu_ms(
    gpu: &Gpu,
    (b, t, h, h_kv, d): (usize, usize, usize, usize, usize),
    causal: bool,
    warm: usize,
    iters: usize,
) -> Result<f64> {
    let shape = AttnShape {
        b,
        tq: t,
        tk: t,
        h,
        h_kv,
        d,
    };
    let mask = if causal {
        AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        }
    } else {
        AttnMask::Full
    };
    let (nq, nk) = (b * t * h * d, b * t * h_kv * d);
    let q = gpu.upload(&uniform_bf16(nq, 51))?;
    let k = gpu.upload(&uniform_bf16(nk, 52))?;
    let v = gpu.upload(&uniform_bf16(nk, 53))?;
    let dout = gpu.upload(&uniform_bf16(nq, 54))?;
    let mut out = gpu.alloc_zeros::<bf16>(nq)?;
    let mut lse = gpu.alloc_zeros::<f32>(b * t * h)?;
    let mut dq = gpu.alloc_zeros::<bf16>(nq)?;
    let mut dk = gpu.alloc_zeros::<bf16>(nk)?;
    let mut dv = gpu.alloc_zeros::<bf16>(nk)?;
    Ok(median(gpu.time_ms(warm, iters, || {
        gpu.attention_forward(&mut out, &mut lse, &q, &k, &v, shape, mask)?;
        gpu.attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, shape, mask,
        )
    })?))
}

fn sp_row(kind: ScheduleKind, p: usize, single_ms: f64) -> Result<Value> {
    let (b, t, h, h_kv, d) = SP_SHAPE;
    let sh = Sharding::new(t, p, kind.layout())?;
    let l = sh.local_len();
    let local = AttnShape {
        b,
        tq: l,
        tk: l,
        h,
        h_kv,
        d,
    };
    let (nq, nk, nl) = (b * l * h * d, b * l * h_kv * d, b * l * h);
    let inputs: Vec<[Vec<bf16>; 4]> = (0..p as u64)
        .map(|r| {
            [
                uniform_bf16(nq, 60 + 4 * r),
                uniform_bf16(nk, 61 + 4 * r),
                uniform_bf16(nk, 62 + 4 * r),
                uniform_bf16(nq, 63 + 4 * r),
            ]
        })
        .collect();
    let mut ranks = DeviceRanks::open(0, p, Duration::from_secs(120))?;
    let mut exec = GpuDistAttn::new(kind.build(p)?, sh, local, Overlap::Overlapped)?;
    let (warm, iters) = (3, 10);
    let mut res = json!({"schedule": format!("{kind:?}"), "ranks": p, "b": b, "t": t, "h": h,
                         "h_kv": h_kv, "d": d, "single_gpu_ms": single_ms});
    for mode in [Overlap::Overlapped, Overlap::Blocking] {
        exec.set_overlap(mode);
        let barrier = Barrier::new(p);
        let ex = &exec;
        let per_rank = ranks.run(|r, g, comm| {
            let [q, k, v, dout] = &inputs[r];
            let (q, k, v, dout) = (g.upload(q)?, g.upload(k)?, g.upload(v)?, g.upload(dout)?);
            let mut out = g.alloc_zeros::<bf16>(nq)?;
            let mut lse = g.alloc_zeros::<f32>(nl)?;
            let mut dq = g.alloc_zeros::<bf16>(nq)?;
            let mut dk = g.alloc_zeros::<bf16>(nk)?;
            let mut dv = g.alloc_zeros::<bf16>(nk)?;
            g.synchronize()?;
            let mut times = Vec::with_capacity(iters);
            let mut bytes = 0;
            for it in 0..warm + iters {
                barrier.wait();
                let t0 = Instant::now();
                let fs = ex.forward(g, comm, &mut out, &mut lse, &q, &k, &v)?;
                let bs = ex.backward(
                    g, comm, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
                )?;
                g.synchronize()?;
                barrier.wait();
                if it >= warm {
                    times.push(t0.elapsed().as_secs_f32() * 1e3);
                }
                bytes = fs.bytes_sent + bs.bytes_sent;
            }
            Ok((times, bytes))
        })?;
        let ms = median(per_rank[0].0.clone());
        let bytes: u64 = per_rank.iter().map(|x| x.1).max().unwrap_or(0);
        let key = match mode {
            Overlap::Overlapped => "overlapped",
            Overlap::Blocking => "blocking",
        };
        res[format!("{key}_ms")] = json!(ms);
        res["max_bytes_sent_per_rank"] = json!(bytes);
    }
    let (o, bl) = (
        res["overlapped_ms"].as_f64().unwrap_or(f64::NAN),
        res["blocking_ms"].as_f64().unwrap_or(f64::NAN),
    );
    res["blocking_over_overlapped"] = json!(bl / o);
    res["overlapped_over_single_gpu"] = json!(o / single_ms);
    Ok(res)
}

pub fn print_sp(rows: &[Value]) {
    let f = |v: &Value, p: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.p$}"));
    println!(
        "\nDistAttn on in-process ranks of one GPU (own stream per rank, device-to-device messages), \
         forward + backward step, B 1, T 32768, H 32/8, D 128, causal; median of 10 after 3 warm-up"
    );
    for r in rows {
        if let Some(e) = r["error"].as_str() {
            println!("{} P {}: {e}", r["schedule"], r["ranks"]);
            continue;
        }
        println!(
            "{:<18} P {}: overlapped {:>7} ms, blocking {:>7} ms, blocking/overlapped {} | one unsplit call {:>7} ms (SP/unsplit {}) | {:.1} MB sent by the busiest rank",
            r["schedule"].as_str().unwrap_or(""),
            r["ranks"],
            f(&r["overlapped_ms"], 2),
            f(&r["blocking_ms"], 2),
            f(&r["blocking_over_overlapped"], 3),
            f(&r["single_gpu_ms"], 2),
            f(&r["overlapped_over_single_gpu"], 2),
            r["max_bytes_sent_per_rank"].as_f64().unwrap_or(0.0) / 1e6,
        );
    }
}
