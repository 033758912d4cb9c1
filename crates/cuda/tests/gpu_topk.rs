//! Sampling candidates on the GPU (`Gpu::topk_lse`) against the CPU reference
//! (`reel_rollout::sample::top_rows_reference`: the sampler's own `top_candidates` and the
//! log-probability's `exp_sum`). Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --release --test gpu_topk -- --nocapture
//!
//! Shapes: V from 1 to 151,936 (odd ones among them), 1 to 300 rows (more rows than the GPU has
//! multiprocessors), k = 1, k = V, k = the cap (1024); rows of uniform values, rows full of ties
//! on a coarse grid with −inf entries and both zeros, a constant row (the k smallest ids), an
//! all −inf row (ids 0..k, sum NaN on both sides), a row whose candidates are all −inf but a
//! few; a different temperature per row. Ids and values must be equal bit for bit, the max equal,
//! Σ exp((z − m)/τ) within a relative 1e-5 (the device sums in f32). Outputs are poisoned first.
//! Also times the kernel on the rollout benchmark's shape (256 rows of 151,936, k = 50) and
//! checks that bad k is refused.

mod common;
use common::*;

use reel_cuda::{Gpu, TOPK_CAP};
use reel_rollout::sample::top_rows_reference;
use reel_tensor::{rng, uniform_vec, Rng};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Uniform,
    Tied,
    /// Row 0 constant, row 1 all −inf, row 2 −inf but for 3 entries, the rest tied.
    Special,
}

fn rows_of(r: &mut Rng, rows: usize, v: usize, kind: Kind) -> Vec<f32> {
    let mut z = uniform_vec(r, rows * v, 8.0);
    if let Kind::Uniform = kind {
        return z;
    }
    for (i, x) in z.iter_mut().enumerate() {
        *x = (*x * 2.0).round() / 2.0;
        if i % 7 == 3 {
            *x = f32::NEG_INFINITY;
        } else if i % 11 == 5 {
            *x = if i % 2 == 0 { 0.0 } else { -0.0 };
        }
    }
    if let Kind::Special = kind {
        for (row, chunk) in z.chunks_mut(v).enumerate().take(3) {
            match row {
                0 => chunk.iter_mut().for_each(|x| *x = 1.25),
                1 => chunk.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                _ => {
                    chunk.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                    for j in [v / 3, v - 1, 0] {
                        chunk[j] = -2.0 + j as f32 * 1e-3;
                    }
                }
            }
        }
    }
    z
}

/// Runs one case; returns the largest relative error of the sum.
fn check(g: &Gpu, rows: usize, v: usize, k: usize, kind: Kind, seed: u64) -> f64 {
    let mut r = rng(seed);
    let z = rows_of(&mut r, rows, v, kind);
    let temps: Vec<f32> = (0..rows).map(|i| [1.0, 0.3, 1.7, 0.9][i % 4]).collect();
    let (want_ids, want_vals, want_max, want_sum) = top_rows_reference(&z, v, k, &temps);
    let dz = g.upload(&z).unwrap();
    let dt = g.upload(&temps).unwrap();
    let mut ids = g.upload(&vec![u32::MAX; rows * k]).unwrap();
    let mut out = g.upload(&poison::<f32>(rows * (k + 2))).unwrap();
    g.topk_lse(&mut ids, &mut out, &dz, &dt, rows, v, k)
        .unwrap();
    let ids = g.download(&ids).unwrap();
    let out = g.download(&out).unwrap();
    let what = format!("rows {rows} V {v} k {k} {kind:?}");
    let (vals, rest) = out.split_at(rows * k);
    let (max, sum) = rest.split_at(rows);
    for row in 0..rows {
        let s = row * k..(row + 1) * k;
        assert_eq!(ids[s.clone()], want_ids[s.clone()], "{what}: row {row} ids");
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&vals[s.clone()]),
            bits(&want_vals[s]),
            "{what}: row {row} values"
        );
        assert!(
            max[row] == want_max[row] || (max[row].is_nan() && want_max[row].is_nan()),
            "{what}: row {row} max {} vs {}",
            max[row],
            want_max[row]
        );
    }
    let mut worst = 0f64;
    for row in 0..rows {
        let (a, b) = (sum[row] as f64, want_sum[row]);
        if b.is_nan() {
            assert!(
                a.is_nan(),
                "{what}: row {row} sum {a}, the reference's is NaN"
            );
            continue;
        }
        let rel = (a - b).abs() / b.abs();
        worst = worst.max(rel);
        assert!(
            rel <= 1e-5,
            "{what}: row {row} sum {a} vs {b} (rel {rel:.2e})"
        );
    }
    eprintln!("  {what:<40} ids, values, max equal; sum rel err ≤ {worst:.2e}");
    worst
}

#[test]
fn candidates_and_sums_match_the_cpu_sampler() {
    let Some(g) = gpu() else { return };
    let cases: &[(usize, usize, usize, Kind)] = &[
        (1, 1, 1, Kind::Uniform),
        (3, 7, 7, Kind::Tied),
        (5, 1000, 1, Kind::Uniform),
        (5, 1000, 1, Kind::Tied),
        (4, 33, 20, Kind::Tied),
        (6, 5001, 64, Kind::Special),
        (5, 3001, 300, Kind::Special),
        (7, 4099, TOPK_CAP, Kind::Uniform),
        (3, 4099, TOPK_CAP, Kind::Tied),
        (2, 1024, 1024, Kind::Tied),
        (300, 2048, 40, Kind::Uniform),
        (2, 151_936, 50, Kind::Uniform),
        (3, 151_936, 50, Kind::Tied),
        (2, 151_936, TOPK_CAP, Kind::Uniform),
        (3, 151_936, 1, Kind::Special),
    ];
    let mut worst = 0f64;
    for (i, &(rows, v, k, kind)) in cases.iter().enumerate() {
        worst = worst.max(check(&g, rows, v, k, kind, i as u64 + 1));
    }
    eprintln!("largest relative error of the sum: {worst:.2e}");
}

#[test]
fn bad_k_is_refused() {
    let Some(g) = gpu() else { return };
    let dz = g.upload(&[0.0f32; 10]).unwrap();
    let dt = g.upload(&[1.0f32; 2]).unwrap();
    for (k, want) in [(0usize, "k = 0"), (6, "k = 6"), (TOPK_CAP + 1, "k = 1025")] {
        let mut ids = g.alloc_zeros::<u32>(2 * k.max(1)).unwrap();
        let mut out = g.alloc_zeros::<f32>(2 * (k + 2)).unwrap();
        let v = if k > TOPK_CAP { 5000 } else { 5 };
        let e = g
            .topk_lse(&mut ids, &mut out, &dz, &dt, 2, v, k)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// The rollout benchmark's shape: 256 rows of 151,936 logits, k = 50 (prints the time).
#[test]
fn kernel_time_at_the_benchmark_shape() {
    let Some(g) = gpu() else { return };
    let (rows, v, k) = (256usize, 151_936usize, 50usize);
    let mut r = rng(3);
    let z = uniform_vec(&mut r, rows * v, 8.0);
    let dz = g.upload(&z).unwrap();
    let dt = g.upload(&vec![1.0f32; rows]).unwrap();
    let mut ids = g.alloc_zeros::<u32>(rows * k).unwrap();
    let mut out = g.alloc_zeros::<f32>(rows * (k + 2)).unwrap();
    for _ in 0..3 {
        g.topk_lse(&mut ids, &mut out, &dz, &dt, rows, v, k)
            .unwrap();
    }
    g.synchronize().unwrap();
    let reps = 20;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        g.topk_lse(&mut ids, &mut out, &dz, &dt, rows, v, k)
            .unwrap();
    }
    g.synchronize().unwrap();
    let per = t.elapsed().as_secs_f64() / reps as f64;
    let bytes = (rows * v * 4) as f64;
    eprintln!(
        "topk_lse {rows} × {v}, k {k}: {:.3} ms a call ({:.0} GB/s of logits read once)",
        per * 1e3,
        bytes / per / 1e9
    );
    let mut host = vec![0f32; rows * v];
    let t = std::time::Instant::now();
    g.download_into(&mut host, &dz).unwrap();
    eprintln!(
        "for comparison, downloading those logits (pageable memory): {:.3} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}
