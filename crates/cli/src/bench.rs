//! `reel bench`: CPU throughput figures, measured side by side in one run.
//!
//! - `gemm`: reel's matmul (nn.Linear layout, bias epilogue) against a direct call of the `gemm`
//!   crate on the same shapes and threads; the ratio is what reel's wrapper costs.
//! - `attention`: the tiled causal attention kernel, forward and backward GFLOP/s.
//! - `train`: a Qwen2-shaped model's training step (forward + backward) in tokens/s and the
//!   activation memory each checkpoint policy keeps.
//! - `rollout`: the rollout engine's decode tokens/s and prefix sharing (`bench_rollout.rs`).
//! - `data`: video decode frames/s, preprocessing and the prefetching loader (`bench_data.rs`).
//! - `gpu` (feature `cuda`): reel's GPU ops beside PyTorch on the same GPU, and DistAttn on
//!   in-process ranks of one GPU (`bench_gpu.rs`, `bench_gpu_sp.rs`); `--gpu-sections` picks.
//! - `gpu-train` (feature `cuda`): a Qwen2-0.5B-shaped training step beside transformers, and the
//!   longest trainable sequence (`bench_gpu_train.rs`).
//! - `sp-train` (feature `cuda`, under `reel launch`): training steps of a 7B-shaped layer stack
//!   with sequence parallelism over NCCL, and the longest sequence each schedule trains
//!   (`bench_sp_train.rs`, dispatched from `main.rs`).
//! - `gpu-rollout` (feature `cuda`): the rollout engine on the GPU beside transformers' `generate`
//!   (`bench_gpu_rollout.rs`).

#[path = "bench_gpu.rs"]
mod bench_gpu;
#[path = "bench_gpu_rollout.rs"]
mod bench_gpu_rollout;
#[path = "bench_gpu_train.rs"]
mod bench_gpu_train;
#[cfg(feature = "cuda")]
pub(crate) use bench_gpu_train::step_flops;

use anyhow::Result;
use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};
use reel_kernels::matmul::matmul_forward;
use reel_model::{CheckpointPolicy, LocalAttention, Qwen2, Qwen2Config, TokenBatch, Workspace};
use serde_json::json;
use std::time::Instant;

/// Best wall time over `reps` runs after one warm-up, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn raw_gemm(out: &mut [f32], inp: &[f32], weight: &[f32], m: usize, k: usize, n: usize) {
    // SAFETY: the slices hold m·n, m·k and n·k elements; strides describe row-major layouts.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            inp.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

/// GEMM GFLOP/s at Qwen2-0.5B's projection shapes (2048 tokens) and a square one.
pub fn gemm_bench(reps: usize) -> Vec<serde_json::Value> {
    let shapes = [
        ("qkv 0.5B", 2048, 896, 1152),
        ("mlp up 0.5B", 2048, 896, 9728),
        ("mlp down 0.5B", 2048, 4864, 896),
        ("square", 1024, 1024, 1024),
    ];
    let mut rows = Vec::new();
    let mut rng = reel_tensor::rng(0);
    for (name, m, k, n) in shapes {
        let inp = reel_tensor::uniform_vec(&mut rng, m * k, 1.0);
        let w = reel_tensor::uniform_vec(&mut rng, n * k, 1.0);
        let bias = reel_tensor::uniform_vec(&mut rng, n, 1.0);
        let mut out = vec![0.0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let t_raw = best_of(reps, || raw_gemm(&mut out, &inp, &w, m, k, n));
        let t_reel = best_of(reps, || {
            matmul_forward(&mut out, &inp, &w, Some(&bias), m, k, n)
        });
        rows.push(json!({
            "shape": name, "m": m, "k": k, "n": n,
            "reel_gflops": flops / t_reel / 1e9,
            "gemm_crate_gflops": flops / t_raw / 1e9,
            "ratio": t_raw / t_reel,
        }));
    }
    rows
}

/// Causal attention forward/backward GFLOP/s (counting the causal half of 4·T²·D per head).
pub fn attention_bench(t: usize, reps: usize) -> serde_json::Value {
    let shape = AttnShape {
        b: 1,
        tq: t,
        tk: t,
        h: 8,
        h_kv: 2,
        d: 64,
    };
    let mut rng = reel_tensor::rng(1);
    let q = reel_tensor::uniform_vec(&mut rng, t * shape.h * shape.d, 1.0);
    let k = reel_tensor::uniform_vec(&mut rng, t * shape.h_kv * shape.d, 1.0);
    let v = reel_tensor::uniform_vec(&mut rng, t * shape.h_kv * shape.d, 1.0);
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; t * shape.h];
    let mask = AttnMask::Causal {
        q_offset: 0,
        k_offset: 0,
    };
    let fwd = best_of(reps, || {
        attention_forward(&mut out, &mut lse, &q, &k, &v, shape, mask)
    });
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let bwd = best_of(reps, || {
        attention_backward(
            &mut dq, &mut dk, &mut dv, &out, &q, &k, &v, &out, &lse, shape, mask,
        )
    });
    let flops_fwd = 2.0 * (t * t * shape.h * shape.d) as f64; // 4·T²·D·H / 2 (causal)
    json!({
        "t": t, "h": shape.h, "h_kv": shape.h_kv, "d": shape.d,
        "fwd_gflops": flops_fwd / fwd / 1e9,
        "bwd_gflops": 2.5 * flops_fwd / bwd / 1e9,
        "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3,
    })
}

/// A small Qwen2 shape for CPU training throughput.
pub fn bench_config() -> Qwen2Config {
    Qwen2Config {
        vocab_size: 8192,
        hidden_size: 256,
        intermediate_size: 704,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 32,
        max_position_embeddings: 4096,
        ..Qwen2Config::tiny(8192)
    }
}

/// Training step tokens/s and kept activation bytes for each checkpoint policy.
pub fn train_bench(t: usize, reps: usize) -> Result<Vec<serde_json::Value>> {
    let config = bench_config();
    let model = Qwen2::new_random(config.clone(), 0)?;
    let mut rng = reel_tensor::rng(2);
    use rand::Rng;
    let tokens: Vec<u32> = (0..t)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    let targets: Vec<i32> = tokens[1..]
        .iter()
        .map(|&x| x as i32)
        .chain([-100])
        .collect();
    let positions = reel_model::default_positions(1, t);
    let batch = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b: 1,
        t,
    };
    let mut grads = vec![0.0f32; model.params.len()];
    let flops_per_token = 6.0 * model.params.len() as f64;
    let mut rows = Vec::new();
    for policy in [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ] {
        let mut ws = Workspace::new(&config, policy);
        let mut err = None;
        let secs = best_of(reps, || {
            let r = model
                .forward(&mut ws, &batch, &LocalAttention)
                .and_then(|s| {
                    model.backward(
                        &mut grads,
                        &mut ws,
                        &batch,
                        1.0 / s.n_tokens as f32,
                        &LocalAttention,
                    )
                });
            if let Err(e) = r {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        rows.push(json!({
            "policy": policy.to_string(), "tokens": t, "params": model.params.len(),
            "tokens_per_s": t as f64 / secs,
            "gflops": flops_per_token * t as f64 / secs / 1e9,
            "saved_activation_mib": ws.saved_activation_bytes() as f64 / (1 << 20) as f64,
        }));
    }
    Ok(rows)
}

/// Which benchmarks `reel bench` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchWhat {
    /// gemm, attention and train (not sp).
    All,
    Gemm,
    Attention,
    Train,
    /// Sequence-parallel attention schedules on in-process ranks.
    Sp,
    /// reel's GPU ops beside PyTorch on the same GPU: GEMMs, attention, AdamW, cross-entropy,
    /// paged decode attention, DistAttn on in-process ranks (needs the `cuda` feature).
    Gpu,
    /// Sequence-parallel attention across GPUs over NCCL, one process per GPU (run it under
    /// `reel launch --nproc P -- reel bench sp-nccl`; needs `cuda`): step time per schedule and
    /// sequence length, overlapped vs blocking, bytes per GPU beside the formula.
    SpNccl,
    /// Training steps of a Qwen2-7B-shaped layer stack with sequence parallelism across GPUs
    /// over NCCL (run it under `reel launch --nproc P -- reel bench sp-train`; needs `cuda`):
    /// step time per schedule and length, overlapped vs blocking, the one-GPU step, bytes per
    /// GPU beside the formulas, peak memory; `--sp-longest` searches the longest sequence.
    SpTrain,
    /// A Qwen2-0.5B-shaped training step on the GPU (16k and 32k tokens: tokens/s, MFU) beside
    /// transformers on the same GPU, and the longest sequence each trains (needs `cuda`).
    GpuTrain,
    /// The rollout engine on the GPU (bf16 `GpuDecoder`) for a Qwen2-0.5B-shaped model: decode
    /// tokens/s beside transformers' `generate` on the same GPU (needs `cuda`).
    GpuRollout,
    /// Rollout engine: decode tokens/s at batch 1/8/64, prefill with and without prefix sharing.
    Rollout,
    /// Video input: frames decoded per second (native MJPEG, ffmpeg), preprocessing, the loader.
    Data,
    /// A VLM GRPO step at 64/256/1024 frames with MR-SP reuse (encode once, shared-prefix
    /// prefill) on and off.
    Rl,
}

pub fn run(
    what: BenchWhat,
    seq: usize,
    reps: usize,
    gpu_sections: &str,
    sp_seqs: &[usize],
    as_json: bool,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    let mut report = json!({"threads": threads});
    if matches!(what, BenchWhat::All | BenchWhat::Gemm) {
        let rows = gemm_bench(reps);
        if !as_json {
            println!(
                "GEMM (f32, {threads} threads): reel matmul vs the gemm crate called directly"
            );
            println!(
                "{:<16} {:>6} {:>6} {:>6} {:>12} {:>12} {:>7}",
                "shape", "m", "k", "n", "reel GF/s", "gemm GF/s", "ratio"
            );
            for r in &rows {
                println!(
                    "{:<16} {:>6} {:>6} {:>6} {:>12.1} {:>12.1} {:>7.3}",
                    r["shape"].as_str().unwrap_or(""),
                    r["m"],
                    r["k"],
                    r["n"],
                    r["reel_gflops"].as_f64().unwrap_or(0.0),
                    r["gemm_crate_gflops"].as_f64().unwrap_or(0.0),
                    r["ratio"].as_f64().unwrap_or(0.0)
                );
            }
        }
        report["gemm"] = json!(rows);
    }
    if matches!(what, BenchWhat::All | BenchWhat::Attention) {
        let r = attention_bench(seq, reps);
        if !as_json {
            println!(
                "\nattention (causal, T={seq}, H=8, H_kv=2, D=64): fwd {:.1} GF/s ({:.1} ms), bwd {:.1} GF/s ({:.1} ms)",
                r["fwd_gflops"].as_f64().unwrap_or(0.0),
                r["fwd_ms"].as_f64().unwrap_or(0.0),
                r["bwd_gflops"].as_f64().unwrap_or(0.0),
                r["bwd_ms"].as_f64().unwrap_or(0.0)
            );
        }
        report["attention"] = r;
    }
    if matches!(what, BenchWhat::All | BenchWhat::Train) {
        let rows = train_bench(seq, reps)?;
        if !as_json {
            let c = bench_config();
            println!(
                "\ntraining step (Qwen2 shape d={} L={} H={}/{} I={} V={}, {} tokens, f32)",
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.intermediate_size,
                c.vocab_size,
                seq
            );
            println!(
                "{:<8} {:>12} {:>10} {:>22}",
                "policy", "tokens/s", "GFLOP/s", "saved activations MiB"
            );
            for r in &rows {
                println!(
                    "{:<8} {:>12.0} {:>10.1} {:>22.2}",
                    r["policy"].as_str().unwrap_or(""),
                    r["tokens_per_s"].as_f64().unwrap_or(0.0),
                    r["gflops"].as_f64().unwrap_or(0.0),
                    r["saved_activation_mib"].as_f64().unwrap_or(0.0)
                );
            }
        }
        report["train"] = json!(rows);
    }
    if what == BenchWhat::Sp {
        let shape = crate::bench_sp::SpShape {
            n: seq,
            h: 8,
            h_kv: 2,
            d: 64,
        };
        report["sp"] = crate::bench_sp::run(shape, &[2, 4, 8], as_json)?;
    }
    if what == BenchWhat::Gpu {
        report["gpu"] = bench_gpu::run(as_json, gpu_sections)?;
    }
    if what == BenchWhat::SpNccl {
        report["sp_nccl"] = bench_gpu::run_sp_nccl(sp_seqs, reps, as_json)?;
        if report["sp_nccl"].is_null() {
            return Ok(()); // not rank 0: rank 0 reports
        }
    }
    if what == BenchWhat::GpuTrain {
        report["gpu_train"] = bench_gpu_train::run(as_json)?;
    }
    if what == BenchWhat::GpuRollout {
        report["gpu_rollout"] = bench_gpu_rollout::run(as_json)?;
    }
    if what == BenchWhat::Rollout {
        let model = Qwen2::new_random(bench_config(), 0)?;
        report["rollout"] = crate::bench_rollout::run(&model, as_json)?;
    }
    if what == BenchWhat::Data {
        report["data"] = crate::bench_data::run(as_json)?;
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
