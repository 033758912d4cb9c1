//! `reel bench gpu`: cuBLASLt bf16 GEMM TFLOP/s at Qwen2-0.5B's projection shapes (8192 tokens)
//! and a square 8192³, beside PyTorch's `torch.matmul` on the same GPU in the same run.
//!
//! reel's side: `Gpu::matmul_forward` (bf16 in and out, fp32 accumulation) and, for the "bwd" rows,
//! `Gpu::matmul_backward` (dinp and dweight +=, 4mkn FLOPs); 5 warm-up runs, then CUDA events
//! around each of 20 runs, the median. PyTorch's side: `scripts/bench_gpu_torch.py` (embedded
//! here), the same shapes and method; run when `python3 -c 'import torch'` works (`REEL_PYTHON`
//! names another interpreter; `REEL_BENCH_NO_TORCH=1` skips it). To run it by hand in the same
//! session: `python3 scripts/bench_gpu_torch.py`. Ratios are reel / torch: against eager
//! `torch.matmul` (host overhead included, what a Python training loop gets) and against the same
//! calls replayed from one CUDA graph (the GPU's time alone).
//!
//! Needs the `cuda` feature (`cargo build --release -p reel-cli --features cuda`); on a machine
//! without a GPU it says why and measures nothing.

use anyhow::Result;
#[cfg(feature = "cuda")]
use serde_json::json;
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

#[cfg(feature = "cuda")]
const WARMUP: usize = 5;
#[cfg(feature = "cuda")]
const ITERS: usize = 20;

#[cfg(not(feature = "cuda"))]
pub fn run(_as_json: bool) -> Result<Value> {
    anyhow::bail!(
        "this reel was built without the `cuda` feature; build it with \
         `cargo build --release -p reel-cli --features cuda` (no CUDA toolkit needed)"
    )
}

#[cfg(feature = "cuda")]
pub fn run(as_json: bool) -> Result<Value> {
    use reel_cuda::Gpu;

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
    }
    let mut rows = Vec::new();
    for &(name, kind, m, k, n) in SHAPES {
        let (ms, flops) = reel_gemm(&gpu, kind, m, k, n)?;
        rows.push(json!({
            "name": name, "kind": kind, "m": m, "k": k, "n": n,
            "reel_ms": ms, "reel_tflops": flops / (ms * 1e-3) / 1e12,
        }));
    }
    drop(gpu);
    let torch = torch_rows();
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
    if !as_json {
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
    Ok(json!({
        "available": true,
        "device": info.to_string(),
        "torch": torch_note,
        "rows": rows,
    }))
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
    let median = |mut t: Vec<f32>| {
        t.sort_by(f32::total_cmp);
        t[t.len() / 2] as f64
    };
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
fn torch_rows() -> Result<Value, String> {
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
