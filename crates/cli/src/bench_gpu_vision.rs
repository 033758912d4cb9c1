//! `reel bench gpu --gpu-sections vision`: the frozen Qwen2.5-VL vision tower's forward at the
//! published 3B/7B tower's shape (width 1280, 32 blocks, 16 heads of 80, MLP 3420, output 2048,
//! windows of 112 pixels, full attention at blocks 7, 15, 23, 31; random weights) on 448×448
//! frames: frames per second of `reel_cuda::GpuVisionTower` (bf16 and f32 storage) beside the
//! CPU `VisionTower` on the same machine, and the GPU's bf16 TFLOP/s over the tower's GEMM and
//! attention FLOPs. GPU: one warm-up, then the median of a few runs (host to host: the pixels'
//! permutation and upload, the features' download); CPU: one run of one temporal patch.

use std::time::Instant;

use anyhow::Result;
use reel_cuda::{Gpu, GpuFloat, GpuVisionTower};
use reel_model::{VideoGrid, VisionConfig, VisionTower, VisionWorkspace};
use serde_json::{json, Value};

/// Frames the GPU encodes per call, at 448×448 (2 frames per temporal patch).
const GPU_FRAMES: [usize; 2] = [16, 128];
/// Frames the CPU encodes (one temporal patch).
const CPU_FRAMES: usize = 2;
/// Frame side in pixels.
const SIDE: usize = 448;

/// The Qwen2.5-VL-3B tower (32 blocks, 1280 wide, merged to the 2048-wide decoder).
fn config() -> VisionConfig {
    reel_train::VlShape::Qwen3b
        .configs(4096)
        .expect("the 3B shape has published configs")
        .1
}

/// FLOPs of one forward over `grid` (GEMMs 2·m·k·n; attention 4·len²·d per segment).
fn flops(c: &VisionConfig, grid: VideoGrid) -> f64 {
    let n = grid.patches() as f64;
    let (d, i, kk, u) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.patch_len() as f64,
        c.merge_unit() as f64,
    );
    let per_block = 2.0 * n * d * (3.0 * d + d + 2.0 * i) + 2.0 * n * i * d;
    let frame = (grid.h * grid.w) as f64;
    let window = ((c.window_units() * c.window_units()) as f64 * u).min(frame);
    let full = c.fullatt_block_indexes.len() as f64;
    let attn = 4.0 * n * d * (full * frame + (c.depth as f64 - full) * window);
    let merger = 2.0 * (n / u) * (u * d) * (u * d + c.out_hidden_size as f64);
    2.0 * n * kk * d + c.depth as f64 * per_block + attn + merger
}

fn pixels(n: usize, seed: u64) -> Vec<f32> {
    let mut r = reel_tensor::rng(seed);
    reel_tensor::uniform_vec(&mut r, n, 2.0)
}

fn gpu_row<T: GpuFloat>(tower: &VisionTower, frames: usize) -> Result<Value> {
    let c = &tower.config;
    let side = SIDE / c.patch_size;
    let grid = VideoGrid {
        t: frames / c.temporal_patch_size,
        h: side,
        w: side,
    };
    let px = pixels(grid.patches() * c.patch_len(), 7);
    let gt = GpuVisionTower::<T>::new(Gpu::open(0)?, tower)?;
    gt.forward(&px, &[grid])?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = gt.forward(&px, &[grid])?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(out.iter().all(|x| x.is_finite()), "non-finite features");
    }
    times.sort_by(f64::total_cmp);
    let s = times[times.len() / 2];
    Ok(json!({
        "device": format!("cuda-{}", T::SUFFIX), "frames": frames, "patches": grid.patches(),
        "seconds": s, "frames_per_s": frames as f64 / s,
        "tflops": flops(c, grid) / s / 1e12,
    }))
}

fn cpu_row(tower: &VisionTower) -> Result<Value> {
    let c = &tower.config;
    let side = SIDE / c.patch_size;
    let grid = VideoGrid {
        t: CPU_FRAMES / c.temporal_patch_size,
        h: side,
        w: side,
    };
    let px = pixels(grid.patches() * c.patch_len(), 7);
    let mut ws = VisionWorkspace::new();
    let t = Instant::now();
    tower.forward(&mut ws, &px, &[grid])?;
    let s = t.elapsed().as_secs_f64();
    Ok(json!({
        "device": format!("cpu ({} threads)", rayon::current_num_threads()),
        "frames": CPU_FRAMES, "patches": grid.patches(), "seconds": s,
        "frames_per_s": CPU_FRAMES as f64 / s, "tflops": flops(c, grid) / s / 1e12,
    }))
}

/// The section's rows (a failing row reports its error and the rest still runs).
pub fn vision_rows() -> Vec<Value> {
    let c = config();
    let layout = reel_model::vision::VisionLayout::new(&c);
    // Unit variance over each matrix's fan-in; norm weights 1.
    let mut r = reel_tensor::rng(3);
    let mut params = vec![0.0f32; layout.total()];
    for e in &layout.entries {
        if e.shape.len() == 1 {
            if e.name.contains("norm") || e.name.contains("ln_q") {
                params[e.range.clone()].fill(1.0);
            }
        } else {
            let fan_in: usize = e.shape[1..].iter().product();
            let b = (3.0 / fan_in as f32).sqrt();
            params[e.range.clone()].copy_from_slice(&reel_tensor::uniform_vec(
                &mut r,
                e.range.len(),
                b,
            ));
        }
    }
    let tower = match VisionTower::from_params(c, params) {
        Ok(t) => t,
        Err(e) => return vec![json!({"error": e.to_string()})],
    };
    let mut rows = Vec::new();
    let mut push = |what: String, r: Result<Value>| {
        rows.push(r.unwrap_or_else(|e| {
            eprintln!("vision tower {what}: {e:#}");
            json!({"device": what, "error": format!("{e:#}")})
        }))
    };
    for f in GPU_FRAMES {
        push(
            format!("cuda-bf16 {f}"),
            gpu_row::<reel_tensor::bf16>(&tower, f),
        );
    }
    push(
        format!("cuda-f32 {}", GPU_FRAMES[0]),
        gpu_row::<f32>(&tower, GPU_FRAMES[0]),
    );
    push("cpu".into(), cpu_row(&tower));
    rows
}

pub fn print_vision(rows: &[Value]) {
    println!(
        "\nVision tower forward, Qwen2.5-VL 3B/7B shape (1280 wide, 32 blocks, 16 heads of 80), \
         {SIDE}×{SIDE} frames:"
    );
    println!(
        "  {:<22} {:>7} {:>8} {:>10} {:>10} {:>8}",
        "device", "frames", "patches", "seconds", "frames/s", "TFLOP/s"
    );
    let cpu = rows
        .iter()
        .find(|r| r["device"].as_str().is_some_and(|d| d.starts_with("cpu")))
        .and_then(|r| r["frames_per_s"].as_f64());
    for r in rows {
        if let Some(e) = r["error"].as_str() {
            println!("  {:<22} error: {e}", r["device"].as_str().unwrap_or("?"));
            continue;
        }
        let fps = r["frames_per_s"].as_f64().unwrap_or(f64::NAN);
        let vs = cpu.map_or(String::new(), |c| format!("  ({:.0}× the CPU)", fps / c));
        println!(
            "  {:<22} {:>7} {:>8} {:>10.3} {:>10.1} {:>8.1}{vs}",
            r["device"].as_str().unwrap_or("?"),
            r["frames"],
            r["patches"],
            r["seconds"].as_f64().unwrap_or(f64::NAN),
            fps,
            r["tflops"].as_f64().unwrap_or(f64::NAN),
        );
    }
}
