//! `reel sft` with `parallel.sp > 1` on the GPU (in-process ranks on one GPU, each its own
//! stream and token shard, attention through the device DistAttn executor or device Ulysses,
//! gradients all-reduced on the device) against the CPU run with sp = 1 on the same data: every
//! step's loss agrees within bf16 tolerance under each checkpoint policy and schedule (ring
//! family, Ulysses at sp = 2, the hybrid u = 2 × r = 2 at sp = 4), the replicas end identical,
//! the loss falls, the checkpoint loads, and an interrupted sp run resumes on the GPU. Data
//! parallelism on the same GPU (dp 2 × sp 1 and dp 2 × sp 2: replicas taking alternate
//! micro-batches, gradients summed over the replicas on the device; and dp 2 × sp 2 with the
//! optimizer sharded over the four ranks) follows the CPU run with twice the gradient
//! accumulation. Needs the `cuda` feature and a GPU; opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-train --features cuda --release --test gpu_sp_sft -- --nocapture
#![cfg(feature = "cuda")]

mod common;

use std::time::Instant;

use reel_model::CheckpointPolicy;
use reel_train::{run_sft, Device, RunOptions, SftSummary, SpSchedule};

fn close_to_cpu(what: &str, gpu: &[f32], cpu: &[f32]) -> f32 {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    let mut worst = 0.0f32;
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let rel = (g - c).abs() / c.abs();
        worst = worst.max(rel);
        assert!(rel <= 2e-2, "{what}: step {} loss GPU {g} CPU {c}", i + 1);
    }
    worst
}

fn same_replicas(what: &str, s: &SftSummary, world: usize) {
    assert_eq!(s.param_checksums.len(), world, "{what}");
    assert!(
        s.param_checksums.iter().all(|&c| c == s.param_checksums[0]),
        "{what}: replicas differ: {:x?}",
        s.param_checksums
    );
}

/// Runs `cfg` on the GPU (`world` in-process ranks) and asserts that every step's loss is
/// within bf16 tolerance of `cpu`'s, the replicas end identical and the run learns.
fn follows_cpu(what: &str, cfg: &reel_train::SftConfig, cpu: &[f32], world: usize) -> SftSummary {
    let t0 = Instant::now();
    let gpu = run_sft(cfg, common::quiet()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let secs = t0.elapsed().as_secs_f64();
    let worst = close_to_cpu(what, &gpu.losses, cpu);
    same_replicas(what, &gpu, world);
    eprintln!(
        "{what}: {secs:.2} s, GPU losses {:?}, worst relative difference {worst:.2e}",
        gpu.losses
    );
    assert!(
        gpu.losses.last() < gpu.losses.first(),
        "{what}: the run learns"
    );
    gpu
}

#[test]
fn gpu_sp_loss_curve_matches_the_cpu_single_rank_run() {
    if !common::gpu_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cpu_cfg = common::gpu_setup(dir.path(), 8);
    cpu_cfg.output.dir = dir.path().join("cpu");
    let t0 = Instant::now();
    let cpu = run_sft(&cpu_cfg, common::quiet()).unwrap();
    eprintln!(
        "CPU sp 1: {:.2} s, losses {:?}",
        t0.elapsed().as_secs_f64(),
        cpu.losses
    );
    for (sp, policy, schedule) in [
        (2, CheckpointPolicy::None, SpSchedule::Distattn),
        (2, CheckpointPolicy::Layer, SpSchedule::Ring),
        (2, CheckpointPolicy::Remat, SpSchedule::Zigzag),
        (3, CheckpointPolicy::Remat, SpSchedule::Distattn),
        (2, CheckpointPolicy::Layer, SpSchedule::Ulysses),
        (4, CheckpointPolicy::Remat, SpSchedule::Hybrid),
    ] {
        let what = format!("sp {sp} {policy} {schedule}");
        let mut cfg = cpu_cfg.clone();
        cfg.train.device = Device::Cuda;
        cfg.train.checkpoint = policy;
        cfg.parallel.sp = sp;
        cfg.parallel.schedule = schedule;
        cfg.output.dir = dir.path().join(format!("gpu-sp{sp}-{policy}-{schedule}"));
        let gpu = follows_cpu(&what, &cfg, &cpu.losses, sp);
        let m = reel_model::load_checkpoint(&gpu.final_model_dir).unwrap();
        assert!(m.params.iter().all(|x| x.is_finite()), "{what}");
    }

    // Interrupted after 4 steps (checkpoint at step 3) and resumed: the sp GPU run carries on
    // from the checkpoint and still follows the CPU curve.
    let mut cfg = cpu_cfg.clone();
    cfg.train.device = Device::Cuda;
    cfg.parallel.sp = 2;
    cfg.output.dir = dir.path().join("gpu-resume");
    let part = run_sft(
        &cfg,
        RunOptions {
            stop_after: Some(4),
            ..common::quiet()
        },
    )
    .unwrap();
    assert_eq!(part.steps, 4);
    let resumed = run_sft(
        &cfg,
        RunOptions {
            resume: true,
            ..common::quiet()
        },
    )
    .unwrap();
    assert_eq!(resumed.steps, cpu_cfg.train.steps);
    let tail = &cpu.losses[3..];
    close_to_cpu("resumed sp 2", &resumed.losses, tail);
    same_replicas("resumed sp 2", &resumed, 2);
}

#[test]
fn gpu_dp_loss_curve_matches_the_cpu_run_with_the_same_micro_batches() {
    if !common::gpu_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cpu_cfg = common::gpu_setup(dir.path(), 8);
    // dp replicas take dp × grad_accum micro-batches a step: one CPU rank with twice the
    // accumulation runs the same step.
    let dp = 2;
    cpu_cfg.train.grad_accum *= dp as u32;
    cpu_cfg.output.dir = dir.path().join("cpu");
    let cpu = run_sft(&cpu_cfg, common::quiet()).unwrap();
    eprintln!(
        "CPU, grad_accum {}: losses {:?}",
        cpu_cfg.train.grad_accum, cpu.losses
    );
    for (sp, policy, schedule, shard) in [
        (1, CheckpointPolicy::Remat, SpSchedule::Distattn, false),
        (2, CheckpointPolicy::Layer, SpSchedule::Zigzag, false),
        (2, CheckpointPolicy::Remat, SpSchedule::Zigzag, true),
    ] {
        let sharded = if shard { ", optimizer sharded" } else { "" };
        let what = format!("dp {dp} × sp {sp} {policy} {schedule}{sharded}");
        let mut cfg = cpu_cfg.clone();
        cfg.train.grad_accum /= dp as u32;
        cfg.train.device = Device::Cuda;
        cfg.train.checkpoint = policy;
        cfg.parallel.dp = dp;
        cfg.parallel.sp = sp;
        cfg.parallel.schedule = schedule;
        cfg.parallel.shard_optimizer = shard;
        cfg.output.dir = dir.path().join(format!("gpu-dp{dp}-sp{sp}-{shard}"));
        follows_cpu(&what, &cfg, &cpu.losses, dp * sp);
    }
}
