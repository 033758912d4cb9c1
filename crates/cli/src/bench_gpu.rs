//! `reel bench gpu`: reel's GPU ops beside PyTorch on the same GPU, in the same run.
//!
//! - GEMMs: cuBLASLt bf16 TFLOP/s at Qwen2-0.5B's projection shapes (8192 tokens) and a square
//!   8192³: `Gpu::matmul_forward` (bf16 in and out, fp32 accumulation) and, for the "bwd" rows,
//!   `Gpu::matmul_backward` (dinp and dweight +=, 4mkn FLOPs), against `torch.matmul`.
//! - Attention: cuDNN fused attention (`Gpu::attention_forward` / `attention_backward`), bf16,
//!   B = 1, H = 32, H_kv = 8 (GQA), D = 128, T = 8192 and 32768, causal and full, against PyTorch
//!   SDPA's flash, cudnn and efficient backends (each, and the best). FLOPs: forward 4·B·H·T²·D,
//!   backward 2.5× that, causal counted as half. PyTorch's backward is its forward+backward time
//!   minus its forward time; the ratios are reel / best backend.
//! - AdamW over one 494M-element fp32 tensor (Qwen2-0.5B's parameter count) against
//!   `torch.optim.AdamW(fused=True)`, and the LM head + cross-entropy (8192 labelled rows, D 896,
//!   V 151936, bf16, 32768-column chunks) against `F.cross_entropy` on materialised logits.
//!
//! - Paged decode attention (`Gpu::paged_attention_forward`, bf16 KV in blocks of 16, shuffled
//!   block tables): GB/s of K/V read against the H200's 4.8 TB/s, beside PyTorch SDPA over the
//!   cache gathered through the block tables (and over an already contiguous cache).
//! - DistAttn on in-process ranks on this one GPU (`GpuDistAttn`, `DeviceRanks`): forward +
//!   backward step time with communication overlapped and blocking, in the same run
//!   (`bench_gpu_sp.rs`).
//! - The frozen vision tower at the 3B/7B tower's shape on 448×448 frames: frames/s of
//!   `GpuVisionTower` (bf16, f32) beside the CPU `VisionTower` (`bench_gpu_vision.rs`; no
//!   PyTorch side). `--gpu-sections` picks sections.
//! - `reel bench sp-nccl` (`bench_gpu_sp_nccl.rs`, under `reel launch`): the same schedules across
//!   GPUs over NCCL, one process per GPU, at 7B-layer shapes from 32k tokens up.
//!
//! Method on both sides: warm-up runs, then CUDA events around each timed run, the median.
//! PyTorch's side is `scripts/bench_gpu_torch.py` (embedded here), run when
//! `python3 -c 'import torch'` works (`REEL_PYTHON` names another interpreter;
//! `REEL_BENCH_NO_TORCH=1` skips it). To run it by hand in the same session:
//! `python3 scripts/bench_gpu_torch.py`. GEMM ratios are reel / torch: against eager
//! `torch.matmul` (host overhead included, what a Python training loop gets) and against the same
//! calls replayed from one CUDA graph (the GPU's time alone).
//!
//! Needs the `cuda` feature (`cargo build --release -p reel-cli --features cuda`); on a machine
//! without a GPU it says why and measures nothing.

use anyhow::Result;
#[cfg(feature = "cuda")]
use serde_json::json;

#[cfg(feature = "cuda")]
#[path = "bench_gpu_sp.rs"]
mod bench_gpu_sp;
#[cfg(feature = "cuda")]
#[path = "bench_gpu_sp_nccl.rs"]
mod bench_gpu_sp_nccl;
#[cfg(feature = "cuda")]
#[path = "bench_gpu_vision.rs"]
mod bench_gpu_vision;
use serde_json::Value;

/// (name, kind, m, k, n): as `DEFAULT_SHAPES` in scripts/bench_gpu_torch.py.
#[cfg(feature = "cuda")]
const SHAPES: &[(&str, &str, usize, usize, usize)] = &[
    ("qkv", "fwd", 8192, 896, 1152),
    ("o_proj", "fwd", 8192, 896, 896),
    ("gate_up", "fwd", 8192, 896, 9728),
    ("down", "fwd", 8192, 4864, 896),
    ("lm_head", "fwd", 8192, 896, 151936),
    ("gate_up", "bwd", 8192, 896, 9728),
    ("down", "bwd", 8192, 4864, 896),
    ("square", "fwd", 8192, 8192, 8192),
];

/// (B, T, H, H_kv, D, causal): as the `--attention` list reel passes scripts/bench_gpu_torch.py.
#[cfg(feature = "cuda")]
const ATTENTION: &[(usize, usize, usize, usize, usize, bool)] = &[
    (1, 8192, 32, 8, 128, true),
    (1, 8192, 32, 8, 128, false),
    (1, 32768, 32, 8, 128, true),
    (1, 32768, 32, 8, 128, false),
];

/// AdamW tensor length: Qwen2-0.5B's parameter count.
#[cfg(feature = "cuda")]
const ADAMW_N: usize = 494_032_768;

/// LM head + cross-entropy: (rows, D, V, chunk).
#[cfg(feature = "cuda")]
const CE: (usize, usize, usize, usize) = (8192, 896, 151_936, 32_768);

#[cfg(feature = "cuda")]
const WARMUP: usize = 5;
#[cfg(feature = "cuda")]
const ITERS: usize = 20;

/// `reel bench sp-nccl` (`bench_gpu_sp_nccl.rs`): SP attention across GPUs over NCCL, one
/// process per GPU; rank 0 returns the report, the others `Null`.
#[cfg(feature = "cuda")]
pub fn run_sp_nccl(seqs: &[usize], reps: usize, as_json: bool) -> Result<Value> {
    bench_gpu_sp_nccl::run(seqs, reps, as_json)
}

#[cfg(not(feature = "cuda"))]
pub fn run_sp_nccl(_seqs: &[usize], _reps: usize, _as_json: bool) -> Result<Value> {
    run(false, "")
}

#[cfg(not(feature = "cuda"))]
pub fn run(_as_json: bool, _sections: &str) -> Result<Value> {
    anyhow::bail!(
        "this reel was built without the `cuda` feature; build it with \
         `cargo build --release -p reel-cli --features cuda` (no CUDA toolkit needed)"
    )
}

#[cfg(feature = "cuda")]
pub fn run(as_json: bool, sections: &str) -> Result<Value> {
    use reel_cuda::Gpu;

    const KNOWN: [&str; 7] = ["gemm", "attention", "adamw", "ce", "decode", "sp", "vision"];
    let picked: Vec<&str> = sections.split(',').map(str::trim).collect();
    if let Some(bad) = picked.iter().find(|s| **s != "all" && !KNOWN.contains(s)) {
        anyhow::bail!(
            "bench gpu: unknown section `{bad}` (known: all, {})",
            KNOWN.join(", ")
        );
    }
    let want = |s: &str| picked.contains(&"all") || picked.contains(&s);

    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!(
                "reel bench gpu: no usable GPU ({e}). reel runs on the CPU here; \
                 `reel bench gemm|attention|train` measures that."
            );
            return Ok(json!({"available": false, "reason": e.to_string()}));
        }
    };
    let info = gpu.info().clone();
    let cudnn = gpu.cudnn_version();
    if !as_json {
        println!("{info}");
        println!(
            "libraries from: {}",
            info.lib_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "kernels compiled by NVRTC in {:.2}s (include {:?})",
            info.compile_secs, info.include_dirs
        );
        match &cudnn {
            Ok(v) => println!("cuDNN {}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
            Err(e) => println!("cuDNN unavailable: {e}"),
        }
    }
    let mut rows = Vec::new();
    for &(name, kind, m, k, n) in SHAPES.iter().filter(|_| want("gemm")) {
        let (ms, flops) = reel_gemm(&gpu, kind, m, k, n)?;
        rows.push(json!({
            "name": name, "kind": kind, "m": m, "k": k, "n": n,
            "reel_ms": ms, "reel_tflops": flops / (ms * 1e-3) / 1e12,
        }));
    }
    // A failure here is reported in its row and the rest still runs.
    let mut attn_rows = Vec::new();
    for &(b, t, h, h_kv, d, causal) in ATTENTION.iter().filter(|_| want("attention")) {
        attn_rows.push(
            reel_attention(&gpu, b, t, h, h_kv, d, causal).unwrap_or_else(|e| {
                eprintln!("attention T {t} causal {causal}: {e:#}");
                json!({"b": b, "t": t, "h": h, "h_kv": h_kv, "d": d, "causal": causal,
                       "error": format!("{e:#}")})
            }),
        );
    }
    let adamw_ms = if want("adamw") {
        reel_adamw(&gpu, ADAMW_N).unwrap_or_else(|e| {
            eprintln!("adamw: {e:#}");
            f64::NAN
        })
    } else {
        f64::NAN
    };
    let (ce_fwd_ms, ce_bwd_ms) = if want("ce") {
        reel_ce(&gpu, CE).unwrap_or_else(|e| {
            eprintln!("cross-entropy: {e:#}");
            (f64::NAN, f64::NAN)
        })
    } else {
        (f64::NAN, f64::NAN)
    };
    let mut decode_rows = if want("decode") {
        bench_gpu_sp::decode_rows(&gpu)
    } else {
        Vec::new()
    };
    drop(gpu);
    let sp_rows = if want("sp") {
        bench_gpu_sp::sp_rows()
    } else {
        Vec::new()
    };
    let vision_rows = if want("vision") {
        bench_gpu_vision::vision_rows()
    } else {
        Vec::new()
    };
    let torch_sections: Vec<&str> = KNOWN
        .iter()
        .copied()
        .filter(|s| *s != "sp" && *s != "vision" && want(s))
        .collect();
    let torch = if torch_sections.is_empty() {
        Err("no section with a PyTorch side".to_string())
    } else {
        torch_rows(&torch_sections.join(","))
    };
    if let Ok(t) = &torch {
        if let Some(trows) = t["decode"].as_array() {
            for (r, tr) in decode_rows.iter_mut().zip(trows) {
                bench_gpu_sp::merge_decode_row(r, tr);
            }
        }
    }
    let torch_note = match &torch {
        Ok(v) => format!(
            "torch {} on {}",
            v["torch"].as_str().unwrap_or("?"),
            v["device"].as_str().unwrap_or("?")
        ),
        Err(e) => format!("torch column skipped: {e}"),
    };
    if let Ok(t) = &torch {
        if let Some(trows) = t["rows"].as_array() {
            for (r, tr) in rows.iter_mut().zip(trows) {
                let reel = r["reel_tflops"].as_f64().unwrap_or(f64::NAN);
                let (tt, tg) = (tr["tflops"].as_f64(), tr["graph_tflops"].as_f64());
                r["torch_ms"] = tr["ms"].clone();
                r["torch_tflops"] = json!(tt);
                r["torch_graph_ms"] = tr["graph_ms"].clone();
                r["torch_graph_tflops"] = json!(tg);
                r["ratio"] = json!(tt.map(|t| reel / t));
                r["ratio_graph"] = json!(tg.map(|t| reel / t));
            }
        }
    }
    if let Ok(t) = &torch {
        if let Some(trows) = t["attention"].as_array() {
            for (r, tr) in attn_rows.iter_mut().zip(trows) {
                merge_attention_row(r, tr);
            }
        }
    }
    let adamw_bytes = 28.0 * ADAMW_N as f64;
    let mut extras = json!({
        "adamw": {"n": ADAMW_N, "reel_ms": adamw_ms, "reel_gbps": adamw_bytes / (adamw_ms * 1e-3) / 1e9},
        "ce": {"rows": CE.0, "d": CE.1, "v": CE.2, "chunk": CE.3,
               "reel_fwd_ms": ce_fwd_ms, "reel_fwd_bwd_ms": ce_fwd_ms + ce_bwd_ms},
    });
    if let Ok(t) = &torch {
        if let Some(ms) = t["adamw"]["ms"].as_f64() {
            extras["adamw"]["torch_ms"] = json!(ms);
            extras["adamw"]["ratio"] = json!(ms / adamw_ms);
        }
        if let (Some(f), Some(fb)) = (t["ce"]["fwd_ms"].as_f64(), t["ce"]["fwd_bwd_ms"].as_f64()) {
            extras["ce"]["torch_fwd_ms"] = json!(f);
            extras["ce"]["torch_fwd_bwd_ms"] = json!(fb);
            extras["ce"]["ratio_fwd"] = json!(f / ce_fwd_ms);
            extras["ce"]["ratio_fwd_bwd"] = json!(fb / (ce_fwd_ms + ce_bwd_ms));
        }
    }
    if !as_json && want("gemm") {
        println!(
            "\nbf16 GEMM (fp32 accumulate), nn.Linear layout; median of {ITERS} after {WARMUP} warm-up; {torch_note}"
        );
        println!(
            "torch: eager torch.matmul as a Python caller gets it; graph: the same calls in one CUDA graph (GPU time alone)"
        );
        println!(
            "{:<8} {:<4} {:>5} {:>5} {:>6} {:>8} {:>9} {:>9} {:>9} {:>7} {:>7}",
            "shape",
            "kind",
            "m",
            "k",
            "n",
            "reel ms",
            "reel TF/s",
            "torch TF/s",
            "graph TF/s",
            "ratio",
            "r/graph"
        );
        for r in &rows {
            let f = |key: &str, p: usize| {
                r[key]
                    .as_f64()
                    .map_or("-".to_string(), |v| format!("{v:.p$}"))
            };
            println!(
                "{:<8} {:<4} {:>5} {:>5} {:>6} {:>8} {:>9} {:>9} {:>9} {:>7} {:>7}",
                r["name"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
                r["m"],
                r["k"],
                r["n"],
                f("reel_ms", 3),
                f("reel_tflops", 1),
                f("torch_tflops", 1),
                f("torch_graph_tflops", 1),
                f("ratio", 3),
                f("ratio_graph", 3)
            );
        }
    }
    if !as_json {
        if want("attention") {
            print_attention(&attn_rows);
        }
        let a = &extras["adamw"];
        let c = &extras["ce"];
        let f = |v: &Value, p: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.p$}"));
        if want("adamw") {
            println!(
            "\nAdamW, {ADAMW_N} fp32 elements: reel {} ms ({} GB/s at 28 B/element), torch fused {} ms; speed-up {}",
            f(&a["reel_ms"], 2),
            f(&a["reel_gbps"], 0),
            f(&a["torch_ms"], 2),
            f(&a["ratio"], 2)
        );
        }
        if want("ce") {
            println!(
            "LM head + cross-entropy, {} rows, D {}, V {}, bf16: reel fwd {} ms, fwd+bwd {} ms (chunks of {}); \
             torch (materialised logits) fwd {} ms, fwd+bwd {} ms; speed-up fwd {}, fwd+bwd {}",
            CE.0,
            CE.1,
            CE.2,
            f(&c["reel_fwd_ms"], 2),
            f(&c["reel_fwd_bwd_ms"], 2),
            CE.3,
            f(&c["torch_fwd_ms"], 2),
            f(&c["torch_fwd_bwd_ms"], 2),
            f(&c["ratio_fwd"], 2),
            f(&c["ratio_fwd_bwd"], 2)
        );
        }
        if want("decode") {
            bench_gpu_sp::print_decode(&decode_rows);
        }
        if want("sp") {
            bench_gpu_sp::print_sp(&sp_rows);
        }
        if want("vision") {
            bench_gpu_vision::print_vision(&vision_rows);
        }
    }
    Ok(json!({
        "available": true,
        "device": info.to_string(),
        "cudnn": cudnn.as_ref().ok(),
        "torch": torch_note,
        "rows": rows,
        "attention": attn_rows,
        "adamw": extras["adamw"],
        "ce": extras["ce"],
        "decode": decode_rows,
        "sp": sp_rows,
        "vision": vision_rows,
    }))
}

/// Attention FLOPs of the forward (4·B·H·T²·D, causal half); the backward counts 2.5× that.
#[cfg(feature = "cuda")]
fn attention_fwd_flops(b: usize, t: usize, h: usize, d: usize, causal: bool) -> f64 {
    4.0 * (b * h) as f64 * (t as f64).powi(2) * d as f64 * if causal { 0.5 } else { 1.0 }
}

/// Times reel's attention forward and backward at one shape: a JSON row.
#[cfg(feature = "cuda")]
fn reel_attention(
    gpu: &reel_cuda::Gpu,
    b: usize,
    t: usize,
    h: usize,
    h_kv: usize,
    d: usize,
    causal: bool,
) -> Result<Value> {
    use reel_kernels::attention::{AttnMask, AttnShape};
    use reel_tensor::bf16;
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
    let q = gpu.upload(&uniform_bf16(nq, 11))?;
    let k = gpu.upload(&uniform_bf16(nk, 12))?;
    let v = gpu.upload(&uniform_bf16(nk, 13))?;
    let dout = gpu.upload(&uniform_bf16(nq, 14))?;
    let mut out = gpu.alloc_zeros::<bf16>(nq)?;
    let mut lse = gpu.alloc_zeros::<f32>(b * t * h)?;
    let (mut dq, mut dk, mut dv) = (
        gpu.alloc_zeros::<bf16>(nq)?,
        gpu.alloc_zeros::<bf16>(nk)?,
        gpu.alloc_zeros::<bf16>(nk)?,
    );
    let (warm, iters) = (3, 10);
    let fwd = median(gpu.time_ms(warm, iters, || {
        gpu.attention_forward(&mut out, &mut lse, &q, &k, &v, shape, mask)
    })?);
    let bwd = median(gpu.time_ms(warm, iters, || {
        gpu.attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, shape, mask,
        )
    })?);
    let ff = attention_fwd_flops(b, t, h, d, causal);
    Ok(json!({
        "b": b, "t": t, "h": h, "h_kv": h_kv, "d": d, "causal": causal,
        "reel_fwd_ms": fwd, "reel_bwd_ms": bwd,
        "reel_fwd_tflops": ff / (fwd * 1e-3) / 1e12,
        "reel_bwd_tflops": 2.5 * ff / (bwd * 1e-3) / 1e12,
        "reel_fwd_bwd_tflops": 3.5 * ff / ((fwd + bwd) * 1e-3) / 1e12,
    }))
}

/// Adds PyTorch's columns (per backend, and the best) and the ratios to a reel attention row.
#[cfg(feature = "cuda")]
fn merge_attention_row(r: &mut Value, tr: &Value) {
    let ff = attention_fwd_flops(
        r["b"].as_u64().unwrap_or(0) as usize,
        r["t"].as_u64().unwrap_or(0) as usize,
        r["h"].as_u64().unwrap_or(0) as usize,
        r["d"].as_u64().unwrap_or(0) as usize,
        r["causal"].as_bool().unwrap_or(false),
    );
    let mut best: (f64, f64, f64) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut backends = serde_json::Map::new();
    if let Some(bs) = tr["backends"].as_object() {
        for (name, b) in bs {
            let (Some(f), Some(fb)) = (b["fwd_ms"].as_f64(), b["fwd_bwd_ms"].as_f64()) else {
                backends.insert(name.clone(), json!({"error": b["error"].clone()}));
                continue;
            };
            let bw = fb - f;
            best.0 = best.0.min(f);
            best.1 = best.1.min(bw);
            best.2 = best.2.min(fb);
            backends.insert(
                name.clone(),
                json!({
                    "fwd_ms": f, "bwd_ms": bw, "fwd_bwd_ms": fb,
                    "fwd_tflops": ff / (f * 1e-3) / 1e12,
                    "bwd_tflops": 2.5 * ff / (bw * 1e-3) / 1e12,
                    "note": b["note"].clone(),
                }),
            );
        }
    }
    r["torch"] = Value::Object(backends);
    if best.0.is_finite() {
        let (rf, rb) = (
            r["reel_fwd_ms"].as_f64().unwrap_or(f64::NAN),
            r["reel_bwd_ms"].as_f64().unwrap_or(f64::NAN),
        );
        r["torch_best_fwd_tflops"] = json!(ff / (best.0 * 1e-3) / 1e12);
        r["torch_best_bwd_tflops"] = json!(2.5 * ff / (best.1 * 1e-3) / 1e12);
        r["ratio_fwd"] = json!(best.0 / rf);
        r["ratio_bwd"] = json!(best.1 / rb);
        r["ratio_fwd_bwd"] = json!(best.2 / (rf + rb));
    }
}

#[cfg(feature = "cuda")]
fn print_attention(rows: &[Value]) {
    println!(
        "\nattention, bf16 (fp32 softmax), B 1, GQA; reel = cuDNN fused attention; torch = SDPA per backend \
         (bwd = fwd+bwd − fwd); TFLOP/s with causal counted as half, bwd as 2.5× fwd; ratio = reel / best backend"
    );
    let f = |v: &Value, p: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.p$}"));
    for r in rows {
        println!(
            "T {:>5} H {}/{} D {} {:<6}  reel fwd {:>5} bwd {:>5} TF/s | best torch fwd {:>5} bwd {:>5} | ratio fwd {} bwd {} fwd+bwd {}",
            r["t"],
            r["h"],
            r["h_kv"],
            r["d"],
            if r["causal"].as_bool() == Some(true) { "causal" } else { "full" },
            f(&r["reel_fwd_tflops"], 0),
            f(&r["reel_bwd_tflops"], 0),
            f(&r["torch_best_fwd_tflops"], 0),
            f(&r["torch_best_bwd_tflops"], 0),
            f(&r["ratio_fwd"], 3),
            f(&r["ratio_bwd"], 3),
            f(&r["ratio_fwd_bwd"], 3),
        );
        if let Some(bs) = r["torch"].as_object() {
            for (name, b) in bs {
                if b["error"].is_null() {
                    println!(
                        "    torch {name:<9} fwd {:>5} bwd {:>5} TF/s {}",
                        f(&b["fwd_tflops"], 0),
                        f(&b["bwd_tflops"], 0),
                        b["note"].as_str().unwrap_or("")
                    );
                } else {
                    println!("    torch {name:<9} unavailable: {}", b["error"]);
                }
            }
        }
    }
}

/// Median milliseconds of one AdamW step over `n` fp32 elements (with decay).
#[cfg(feature = "cuda")]
fn reel_adamw(gpu: &reel_cuda::Gpu, n: usize) -> Result<f64> {
    let widen = |v: Vec<reel_tensor::bf16>| v.into_iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let mut p = gpu.upload(&widen(uniform_bf16(n, 21)))?;
    let g = gpu.upload(&widen(uniform_bf16(n, 22)))?;
    let mut m = gpu.alloc_zeros::<f32>(n)?;
    let mut v = gpu.alloc_zeros::<f32>(n)?;
    let s = reel_optim::AdamWConfig::default().scalars(10, 1e-4);
    Ok(median(gpu.time_ms(3, 10, || {
        gpu.adamw_step(&mut p, &g, &mut m, &mut v, &s, true)
    })?))
}

/// Median milliseconds of the LM head + cross-entropy forward and backward (all rows labelled).
#[cfg(feature = "cuda")]
fn reel_ce(
    gpu: &reel_cuda::Gpu,
    (n, d, v, chunk): (usize, usize, usize, usize),
) -> Result<(f64, f64)> {
    use reel_tensor::bf16;
    let h = gpu.upload(&uniform_bf16(n * d, 31))?;
    let w = gpu.upload(&uniform_bf16(v * d, 32))?;
    let targets: Vec<i32> = (0..n).map(|i| ((i * 7919) % v) as i32).collect();
    let mut losses = gpu.alloc_zeros::<f32>(n)?;
    let mut lse = gpu.alloc_zeros::<f32>(n)?;
    let dloss = gpu.upload(&vec![1.0f32 / n as f32; n])?;
    let mut dh = gpu.alloc_zeros::<bf16>(n * d)?;
    let mut dw = gpu.alloc_zeros::<bf16>(v * d)?;
    let fwd = median(gpu.time_ms(2, 5, || {
        gpu.lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, chunk)
            .map(|_| ())
    })?);
    let bwd = median(gpu.time_ms(2, 5, || {
        gpu.lm_head_ce_backward(
            &mut dh, &mut dw, &h, &w, &targets, &lse, &dloss, n, d, v, chunk,
        )
    })?);
    Ok((fwd, bwd))
}

#[cfg(feature = "cuda")]
fn median(mut t: Vec<f32>) -> f64 {
    t.sort_by(f32::total_cmp);
    t[t.len() / 2] as f64
}

/// Uniform bf16 in [-1, 1) from a fast LCG (the GEMM's speed must not depend on zeros).
#[cfg(feature = "cuda")]
fn uniform_bf16(n: usize, seed: u64) -> Vec<reel_tensor::bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            reel_tensor::bf16::from_f32(u * 2.0 - 1.0)
        })
        .collect()
}

/// Median milliseconds and FLOPs of one reel GEMM row.
#[cfg(feature = "cuda")]
fn reel_gemm(gpu: &reel_cuda::Gpu, kind: &str, m: usize, k: usize, n: usize) -> Result<(f64, f64)> {
    use reel_tensor::bf16;
    let inp = gpu.upload(&uniform_bf16(m * k, 1))?;
    let w = gpu.upload(&uniform_bf16(n * k, 2))?;
    if kind == "fwd" {
        let mut out = gpu.alloc_zeros::<bf16>(m * n)?;
        let t = gpu.time_ms(WARMUP, ITERS, || {
            gpu.matmul_forward::<bf16, bf16>(&mut out, &inp, &w, None, m, k, n)
        })?;
        Ok((median(t), 2.0 * (m * k * n) as f64))
    } else {
        let dout = gpu.upload(&uniform_bf16(m * n, 3))?;
        let mut dinp = gpu.alloc_zeros::<bf16>(m * k)?;
        let mut dw = gpu.upload(&uniform_bf16(n * k, 4))?;
        let t = gpu.time_ms(WARMUP, ITERS, || {
            gpu.matmul_backward::<bf16>(Some(&mut dinp), &mut dw, None, &dout, &inp, &w, m, k, n)
        })?;
        Ok((median(t), 4.0 * (m * k * n) as f64))
    }
}

/// Runs the embedded scripts/bench_gpu_torch.py with reel's shapes; its JSON answer.
#[cfg(feature = "cuda")]
fn torch_rows(sections: &str) -> Result<Value, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if std::env::var("REEL_BENCH_NO_TORCH").as_deref() == Ok("1") {
        return Err("REEL_BENCH_NO_TORCH=1".into());
    }
    let py = std::env::var("REEL_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!(
            "`{py} -c 'import torch'` failed; run scripts/bench_gpu_torch.py by hand where torch is"
        ));
    }
    let shapes: Vec<Value> = SHAPES
        .iter()
        .map(|&(name, kind, m, k, n)| json!([name, kind, m, k, n]))
        .collect();
    let mut child = Command::new(&py)
        .arg("-")
        .arg("--json")
        .arg("--shapes")
        .arg(Value::Array(shapes).to_string())
        .arg("--attention")
        .arg(
            Value::Array(
                ATTENTION
                    .iter()
                    .map(|&(b, t, h, hk, d, c)| json!([b, t, h, hk, d, c]))
                    .collect(),
            )
            .to_string(),
        )
        .arg("--adamw")
        .arg(ADAMW_N.to_string())
        .arg("--ce")
        .arg(json!([CE.0, CE.1, CE.2]).to_string())
        .arg("--decode")
        .arg(bench_gpu_sp::decode_arg())
        .arg("--sections")
        .arg(sections)
        .arg("--warmup")
        .arg(WARMUP.to_string())
        .arg("--iters")
        .arg(ITERS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {py}: {e}"))?;
    const SCRIPT: &str = include_str!("../../../scripts/bench_gpu_torch.py");
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(SCRIPT.as_bytes())
        .map_err(|e| format!("writing the script to {py}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {py}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "bench_gpu_torch.py failed ({}): {tail}",
            out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).map_err(|e| format!("bench_gpu_torch.py printed no JSON ({e})"))
}
