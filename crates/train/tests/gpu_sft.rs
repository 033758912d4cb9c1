//! `reel sft` on the GPU against the same run on the CPU: the tiny run of the SFT tests, trained
//! once with `train.device = "cpu"` and once with "cuda" under each checkpoint policy; every
//! step's loss agrees within bf16 tolerance, the loss falls, and the GPU run's checkpoint loads.
//! Needs the `cuda` feature and a GPU; opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-train --features cuda --release --test gpu_sft -- --nocapture
#![cfg(feature = "cuda")]

mod common;

use reel_model::CheckpointPolicy;
use reel_train::{run_sft, Device};

#[test]
fn gpu_loss_curve_matches_the_cpu_run() {
    if !common::gpu_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cpu_cfg = common::gpu_setup(dir.path(), 12);
    cpu_cfg.output.dir = dir.path().join("cpu");
    let cpu = run_sft(&cpu_cfg, common::quiet()).unwrap();
    for policy in [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ] {
        let mut cfg = cpu_cfg.clone();
        cfg.train.device = Device::Cuda;
        cfg.train.checkpoint = policy;
        cfg.output.dir = dir.path().join(format!("gpu-{policy}"));
        let gpu = run_sft(&cfg, common::quiet()).unwrap();
        assert_eq!(gpu.losses.len(), cpu.losses.len());
        let mut worst = 0.0f32;
        for (i, (g, c)) in gpu.losses.iter().zip(&cpu.losses).enumerate() {
            let rel = (g - c).abs() / c.abs();
            worst = worst.max(rel);
            assert!(rel <= 2e-2, "{policy}: step {} loss GPU {g} CPU {c}", i + 1);
        }
        eprintln!(
            "{policy}: GPU losses {:?}\n      CPU losses {:?}\n      worst relative difference {worst:.2e}",
            gpu.losses, cpu.losses
        );
        assert!(gpu.losses.last() < gpu.losses.first(), "the GPU run learns");
        let m = reel_model::load_checkpoint(&gpu.final_model_dir).unwrap();
        assert!(m.params.iter().all(|x| x.is_finite()));
    }
}
