//! `reel sft` with one process per GPU (`reel launch`, sp = the world size): each process one
//! sequence-parallel rank on its own GPU, attention's messages and the gradient all-reduce over
//! NCCL. Each test re-executes this binary once per rank through `reel_comm::launch` (RANK,
//! WORLD_SIZE, LOCAL_RANK, REEL_RENDEZVOUS), as the NCCL tests of reel-cuda do.
//!
//! - `nccl_sp_sft_loss_curve_matches_one_gpu`: for each world size of `REEL_NCCL_WORLDS` (≥ 2;
//!   default `2`) and each case (DistAttn with every activation kept, zigzag under remat,
//!   DistAttn under remat, the Ulysses hybrid under remat with u = gcd(world, H_kv); then data
//!   parallelism: dp = world × sp 1, and dp 2 × sp world/2 from 4 processes; then the optimizer
//!   sharded over the world, `parallel.shard_optimizer`: zigzag at sp = world, and DistAttn at
//!   dp 2 × sp world/2 from 4 processes), every step's loss
//!   of the multi-process run matches the single-GPU one-rank run of the same policy (with dp ×
//!   the gradient accumulation) within bf16 tolerance, the replicas end identical (checked over
//!   NCCL by the run), and rank 0's checkpoint loads.
//! - `nccl_sp_sft_rank_killed_mid_step_fails_the_other_and_the_checkpoint_resumes`: rank 1 exits
//!   in the middle of step 5 (after its first forward pass); rank 0 fails with an error within
//!   the configured timeout (10 s) naming the last good checkpoint, step 3, which loads; a
//!   relaunch with `resume` carries the run to its end on the single-GPU curve.
//!
//! Needs the `cuda` feature and at least 2 GPUs; opt-in:
//!
//!     REEL_GPU_TESTS=1 NCCL_NVLS_ENABLE=0 cargo test -p reel-train --features cuda --release --test gpu_nccl_sft -- --test-threads=1 --nocapture
#![cfg(feature = "cuda")]

mod common;

use common::gpu_tests_enabled as enabled;
use common::launch::{assert_failed_in_time, die_now, is_rank_of, launch, CONFIG};
use reel_comm::launch::LaunchError;

use std::path::{Path, PathBuf};
use std::time::Instant;

use reel_model::CheckpointPolicy;
use reel_train::{run_sft, Device, RunOptions, SftConfig, SftSummary, SpSchedule};

/// Where the killed rank writes the time it died (milliseconds since the epoch).
const STAMP: &str = "REEL_SFT_TEST_STAMP";
/// Set for the relaunch that resumes.
const RESUME: &str = "REEL_SFT_TEST_RESUME";
/// The step in whose middle rank 1 exits.
const KILL_STEP: u64 = 5;
/// `parallel.timeout_s` of the fault test.
const TIMEOUT_S: u64 = 10;

/// World sizes from `REEL_NCCL_WORLDS` (comma-separated) of at least 2 ranks; default `2`.
fn worlds() -> Vec<usize> {
    std::env::var("REEL_NCCL_WORLDS")
        .unwrap_or_else(|_| "2".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .filter(|&w| w >= 2)
        .collect()
}

/// The tiny run of the SFT tests with head dimension 16 (cuDNN takes multiples of 8), on the GPU.
fn base_config(dir: &Path) -> SftConfig {
    let mut cfg = common::gpu_setup(dir, 8);
    cfg.train.device = Device::Cuda;
    cfg
}

fn write_config(cfg: &SftConfig, path: &Path) {
    std::fs::write(path, cfg.to_toml()).unwrap();
}

/// The config a rank process was given.
fn rank_config() -> SftConfig {
    let path = PathBuf::from(std::env::var(CONFIG).expect("the launcher names the config"));
    SftConfig::from_file(&path).unwrap()
}

/// Losses by step from a run's metrics.jsonl.
fn metrics_losses(out: &Path) -> Vec<(u64, f32)> {
    common::metrics_in(out)
        .iter()
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

/// Asserts every (step, loss) is within bf16 tolerance of the one-GPU run's loss of that step;
/// returns the worst relative difference.
fn close_to(what: &str, got: &[(u64, f32)], want: &[f32]) -> f32 {
    assert!(!got.is_empty(), "{what}: no steps");
    let mut worst = 0.0f32;
    for &(step, g) in got {
        let w = want[step as usize - 1];
        let rel = (g - w).abs() / w.abs();
        worst = worst.max(rel);
        assert!(rel <= 2e-2, "{what}: step {step} loss {g}, one GPU {w}");
    }
    worst
}

/// The one-rank run of `cfg` on GPU 0 (dp = sp = 1; a dp > 1 config takes dp × its gradient
/// accumulation: the same micro-batches per step).
fn one_gpu(cfg: &SftConfig, out: PathBuf) -> SftSummary {
    let mut c = cfg.clone();
    c.train.grad_accum *= c.parallel.dp as u32;
    c.parallel.dp = 1;
    c.parallel.sp = 1;
    c.output.dir = out;
    let t = Instant::now();
    let s = run_sft(&c, common::quiet()).unwrap_or_else(|e| panic!("one GPU: {e:#}"));
    eprintln!(
        "one GPU {}: {:.2} s, losses {:?}",
        c.train.checkpoint,
        t.elapsed().as_secs_f64(),
        s.losses
    );
    s
}

#[test]
fn nccl_sp_sft_loss_curve_matches_one_gpu() {
    const NAME: &str = "nccl_sp_sft_loss_curve_matches_one_gpu";
    match is_rank_of(NAME) {
        Some(false) => return,
        Some(true) => {
            let cfg = rank_config();
            let s = run_sft(&cfg, common::quiet()).unwrap_or_else(|e| panic!("{e:#}"));
            let world = cfg.parallel.dp * cfg.parallel.sp;
            assert_eq!(s.param_checksums.len(), world);
            assert!(s.param_checksums.iter().all(|&c| c == s.param_checksums[0]));
            assert_eq!(s.steps, cfg.train.steps);
            return;
        }
        None => {}
    }
    if !enabled() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = base_config(dir);
    let mut reference = std::collections::HashMap::new();
    for (i, &w) in worlds().iter().enumerate() {
        // (policy, schedule, dp, optimizer sharded); sp = w / dp.
        let mut cases = vec![
            (CheckpointPolicy::None, SpSchedule::Distattn, 1, false),
            (CheckpointPolicy::Remat, SpSchedule::Zigzag, 1, false),
            (CheckpointPolicy::Remat, SpSchedule::Distattn, 1, false),
            // u = gcd(world, H_kv = 2): pure Ulysses at world 2, 2 × 2 at world 4.
            (CheckpointPolicy::Remat, SpSchedule::Hybrid, 1, false),
            // Data parallelism: one replica per GPU, then replicas of sp groups.
            (CheckpointPolicy::Remat, SpSchedule::Distattn, w, false),
            // The optimizer state sharded over the world (ZeRO-1).
            (CheckpointPolicy::Remat, SpSchedule::Zigzag, 1, true),
        ];
        if w >= 4 && w % 2 == 0 {
            cases.push((CheckpointPolicy::Layer, SpSchedule::Zigzag, 2, false));
            cases.push((CheckpointPolicy::Remat, SpSchedule::Distattn, 2, true));
        }
        for (j, &(policy, schedule, dp, shard)) in cases.iter().enumerate() {
            let sp = w / dp;
            let sharded = if shard { ", optimizer sharded" } else { "" };
            let what = format!("world {w} dp {dp} × sp {sp} {policy} {schedule}{sharded}");
            let mut cfg = base.clone();
            cfg.train.checkpoint = policy;
            cfg.parallel.shard_optimizer = shard;
            cfg.parallel.dp = dp;
            let want = reference
                .entry(format!("{policy}-dp{dp}"))
                .or_insert_with(|| one_gpu(&cfg, dir.join(format!("one-{policy}-dp{dp}"))).losses)
                .clone();
            cfg.parallel.sp = sp;
            cfg.parallel.schedule = schedule;
            cfg.output.dir = dir.join(format!("nccl-w{w}-dp{dp}-{policy}-{schedule}-{shard}"));
            let path = dir.join(format!("w{w}-{j}.toml"));
            write_config(&cfg, &path);
            let t = Instant::now();
            let port = 29800 + (i * 8 + j) as u16 * 3;
            launch(NAME, w, port, &[(CONFIG, path.display().to_string())])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let secs = t.elapsed().as_secs_f64();
            let got = metrics_losses(&cfg.output.dir);
            assert_eq!(got.len() as u64, cfg.train.steps, "{what}");
            let worst = close_to(&what, &got, &want);
            eprintln!(
                "{what}: {secs:.1} s (launch included), losses {:?}, worst relative difference \
                 to one GPU {worst:.2e}",
                got.iter().map(|g| g.1).collect::<Vec<_>>()
            );
            assert!(got.last().unwrap().1 < got[0].1, "{what}: the run learns");
            let ckpt = cfg.output.dir.join("checkpoints/step-8");
            let m = reel_model::load_checkpoint(&ckpt).unwrap();
            assert!(m.params.iter().all(|x| x.is_finite()), "{what}");
            if j == 0 {
                if let Ok(bin) = std::env::var("REEL_BIN") {
                    cli_run(Path::new(&bin), &path, w, dir, &want);
                }
            }
        }
    }
}

/// With `REEL_BIN` (a `reel` built with `--features cuda`): `reel launch --nproc w -- reel sft
/// --config … --sp w --device cuda` follows the one-GPU curve too, and one process more than
/// the machine has GPUs is refused at once, naming both counts.
fn cli_run(bin: &Path, config: &Path, w: usize, dir: &Path, want: &[f32]) {
    let out = dir.join(format!("cli-w{w}"));
    let run = |nproc: usize, out: &Path| {
        let t = Instant::now();
        let o = std::process::Command::new(bin)
            .args(["launch", "--nproc", &nproc.to_string(), "--rendezvous"])
            .arg(format!("127.0.0.1:{}", 29950 + nproc))
            .args([
                "--",
                "reel",
                "sft",
                "--device",
                "cuda",
                "--sp",
                &nproc.to_string(),
            ])
            .arg("--config")
            .arg(config)
            .arg("--set")
            .arg(format!("output.dir={:?}", out.display().to_string()))
            .env("NCCL_NVLS_ENABLE", "0")
            .env("CI", "true")
            .output()
            .unwrap();
        eprintln!(
            "reel launch --nproc {nproc} -- reel sft: {:.1?}, {}\n{}",
            t.elapsed(),
            o.status,
            String::from_utf8_lossy(&o.stdout)
        );
        o
    };
    let o = run(w, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.matches("trained 8 steps").count(),
        1,
        "rank 0 alone reports"
    );
    let worst = close_to("reel launch", &metrics_losses(&out), want);
    eprintln!("reel launch -- reel sft: worst relative difference to one GPU {worst:.2e}");
    let gpus = reel_cuda::Gpu::device_count().unwrap();
    let o = run(gpus + 1, &dir.join("cli-too-many"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "started {} processes on this machine, which has {gpus} GPU(s)",
            gpus + 1
        )),
        "{err}"
    );
}

#[test]
fn nccl_sp_sft_rank_killed_mid_step_fails_the_other_and_the_checkpoint_resumes() {
    const NAME: &str =
        "nccl_sp_sft_rank_killed_mid_step_fails_the_other_and_the_checkpoint_resumes";
    match is_rank_of(NAME) {
        Some(false) => return,
        Some(true) => return killed_rank_process(),
        None => {}
    }
    if !enabled() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cfg = base_config(dir);
    cfg.train.checkpoint = CheckpointPolicy::Remat;
    let want = one_gpu(&cfg, dir.join("one")).losses;
    cfg.parallel.sp = 2;
    cfg.parallel.timeout_s = TIMEOUT_S;
    cfg.output.dir = dir.join("nccl");
    let path = dir.join("run.toml");
    write_config(&cfg, &path);
    let stamp = dir.join("died-at");
    let env = [
        (CONFIG, path.display().to_string()),
        (STAMP, stamp.display().to_string()),
    ];
    // Rank 1 exits with status 9 in the middle of step 5; rank 0 checks its own error and
    // timing and exits 0.
    match launch(NAME, 2, 29900, &env) {
        Err(LaunchError::Failed(f)) => {
            assert_eq!(f.len(), 1, "only the killed rank fails: {f:?}");
            assert_eq!(f[0].0, 1, "{f:?}");
            assert!(f[0].1.contains("status 9"), "{f:?}");
        }
        r => panic!("expected rank 1 to die: {r:?}"),
    }
    // The last checkpoint written before the kill is step 3, and it loads.
    let ckpts = cfg.output.dir.join("checkpoints");
    let latest = std::fs::read_to_string(ckpts.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-3");
    assert!(!ckpts.join("step-6").exists());
    let m = reel_model::load_checkpoint(&ckpts.join("step-3")).unwrap();
    assert!(m.params.iter().all(|x| x.is_finite()));
    // Steps 1–4 were logged; resuming from step 3 carries the run to its end on the one-GPU
    // curve.
    let before = metrics_losses(&cfg.output.dir);
    assert_eq!(before.len(), 4, "{before:?}");
    close_to("before the kill", &before, &want);
    launch(NAME, 2, 29910, &[env[0].clone(), (RESUME, "1".into())])
        .unwrap_or_else(|e| panic!("resume: {e}"));
    let after = metrics_losses(&cfg.output.dir);
    assert_eq!(
        after.iter().map(|a| a.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<u64>>()
    );
    let worst = close_to("resumed", &after[3..], &want);
    eprintln!(
        "resumed from step 3: losses {:?}, worst relative difference to one GPU {worst:.2e}",
        after.iter().map(|a| a.1).collect::<Vec<_>>()
    );
    reel_model::load_checkpoint(&ckpts.join("step-8")).unwrap();
}

/// A rank process of the fault test (module docs).
fn killed_rank_process() {
    let cfg = rank_config();
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    if std::env::var_os(RESUME).is_some() {
        let s = run_sft(
            &cfg,
            RunOptions {
                resume: true,
                ..common::quiet()
            },
        )
        .unwrap_or_else(|e| panic!("rank {rank}: resume: {e:#}"));
        assert_eq!(s.steps, cfg.train.steps);
        assert_eq!(s.losses.len(), 5, "steps 4–8 after resuming from step 3");
        return;
    }
    let stamp = PathBuf::from(std::env::var(STAMP).unwrap());
    let mut opts = common::quiet();
    if rank == 1 {
        let stamp = stamp.clone();
        opts.mid_step_hook = Some(Box::new(move |step| {
            if step == KILL_STEP {
                die_now(&stamp, step);
            }
        }));
    }
    let e = match run_sft(&cfg, opts) {
        Ok(s) => panic!("rank {rank} finished {} steps without its peer", s.steps),
        Err(e) => e,
    };
    assert_failed_in_time(&stamp, TIMEOUT_S, &format!("{e:#}"), KILL_STEP, "step-3");
}
