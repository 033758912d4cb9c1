//! The one SFT trainer on a Qwen2.5-VL checkpoint (a tiny random one) and synthetic
//! LongVideo-Reason videos: `run_sft` detects the model from its config.json, the loss falls,
//! checkpoints are Qwen2.5-VL folders that resume onto the same curve, the held-out NLL and the
//! video counters are in the metrics, `dp × sp` ranks reproduce one rank with the frozen tower
//! and with a trained tower (frames split over the ranks by MR-SP stage 1), and a corrupt video
//! and a malformed record are skipped and counted while the run finishes; a non-finite step
//! stops the run with the last checkpoint intact.

mod common;

use common::{metrics, quiet, vl_setup as setup};
use reel_model::load_vl_checkpoint;
use reel_train::{run_sft, ModelKind, RunOptions, SftConfig, SftSummary};
use std::path::Path;

fn column(cfg: &SftConfig, key: &str) -> Vec<f64> {
    metrics(cfg)
        .iter()
        .map(|m| m[key].as_f64().unwrap_or_else(|| panic!("no {key} in {m}")))
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rtol * w.abs(),
            "{what}: step {} differs: {g} vs {w}\n{got:?}\nvs\n{want:?}",
            step + 1
        );
    }
}

fn losses(s: &SftSummary) -> Vec<f64> {
    s.losses.iter().map(|&x| x as f64).collect()
}

#[test]
fn a_vl_config_trains_with_checkpoints_eval_and_video_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path(), 10);
    cfg.apply_override("video.sampling=uniform:8").unwrap();
    cfg.apply_override("train.lr=1e-2").unwrap();
    assert_eq!(cfg.model_kind().unwrap(), ModelKind::Qwen25VL);
    let before = load_vl_checkpoint(cfg.model.path.as_ref().unwrap()).unwrap();
    let s = run_sft(&cfg, quiet()).unwrap();
    assert_eq!(s.steps, 10);
    let first = (s.losses[0] + s.losses[1]) / 2.0;
    let last = (s.losses[8] + s.losses[9]) / 2.0;
    assert!(last < 0.8 * first, "loss {first} → {last}: {:?}", s.losses);

    // Every checkpoint is a loadable Qwen2.5-VL folder with tokenizer, preprocessor config,
    // optimizer state and trainer state; the frozen tower did not move, the decoder did.
    assert!(s.final_model_dir.ends_with("step-10"), "{s:?}");
    for f in [
        "config.json",
        "tokenizer.json",
        "video_preprocessor_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(s.final_model_dir.join(f).is_file(), "checkpoint lacks {f}");
    }
    let after = load_vl_checkpoint(&s.final_model_dir).unwrap();
    assert_eq!(
        after.vision.params, before.vision.params,
        "frozen tower moved"
    );
    assert_ne!(after.lm.params, before.lm.params);

    // Metrics: the step's numbers and the video counters, the held-out NLL at the end.
    let lines = metrics(&cfg);
    assert_eq!(lines.len(), 10);
    for key in [
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "cache_hits",
        "cache_misses",
        "cache_bytes",
        "tower_forwards",
        "skipped_records",
        "skipped_videos",
    ] {
        assert!(
            lines[3].get(key).is_some(),
            "metrics lack {key}: {}",
            lines[3]
        );
    }
    let end = &lines[9];
    assert!(end["eval_loss"].as_f64().unwrap() < first as f64, "{end}");
    // Frozen tower: one tower run per distinct video; every later use is a cache hit.
    let v = s.video.unwrap();
    assert_eq!(v.videos, 6);
    assert_eq!(v.encode.tower_forwards, 6, "{v:?}");
    assert_eq!(v.cache.misses, 6);
    assert_eq!(v.cache.hits, 10 * 2 - 6);
    assert_eq!(end["tower_forwards"], 6);
    assert_eq!(end["cache_hits"], 14);
    assert!(end["cache_bytes"].as_u64().unwrap() > 0);
    assert_eq!((v.skipped_records, v.skipped_videos), (0, 0));
}

#[test]
fn an_interrupted_and_resumed_vl_run_reproduces_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    for train_vision in [false, true] {
        let root = tmp.path().join(format!("tower-{train_vision}"));
        let mut straight = setup(&root.join("a"), 5);
        straight.video.train_vision = train_vision;
        let mut cfg = straight.clone();
        cfg.output.dir = root.join("b");
        let full = run_sft(&straight, quiet()).unwrap();
        let part = run_sft(
            &cfg,
            RunOptions {
                stop_after: Some(3),
                ..quiet()
            },
        )
        .unwrap();
        assert_eq!(part.steps, 3);
        let resumed = run_sft(
            &cfg,
            RunOptions {
                resume: true,
                ..quiet()
            },
        )
        .unwrap();
        // The newest checkpoint of the interrupted run is step 2.
        assert_eq!(resumed.steps, 5);
        assert_eq!(
            resumed.losses,
            full.losses[2..],
            "tower trained: {train_vision}"
        );
        let a = load_vl_checkpoint(&full.final_model_dir).unwrap();
        let b = load_vl_checkpoint(&resumed.final_model_dir).unwrap();
        assert_eq!(a.lm.params, b.lm.params);
        assert_eq!(a.vision.params, b.vision.params);
        assert_eq!(
            column(&cfg, "step"),
            (1..=5).map(f64::from).collect::<Vec<_>>()
        );
    }
}

/// Runs `cfg` and the single-rank run with the same global batch; their loss and gradient-norm
/// curves agree and every replica ends identical.
fn matches_one_rank(root: &Path, name: &str, cfg: SftConfig) -> SftSummary {
    let mut one = cfg.clone();
    one.output.dir = root.join(format!("{name}-single"));
    one.parallel.sp = 1;
    one.parallel.dp = 1;
    one.train.grad_accum = cfg.train.grad_accum * cfg.parallel.dp as u32;
    let want = run_sft(&one, quiet()).unwrap();
    let got = run_sft(&cfg, quiet()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let world = cfg.parallel.sp * cfg.parallel.dp;
    assert_eq!(got.param_checksums.len(), world, "{name}");
    assert!(
        got.param_checksums
            .iter()
            .all(|&c| c == got.param_checksums[0]),
        "{name}: replicas differ"
    );
    assert_close(&format!("{name} loss"), &losses(&got), &losses(&want), 1e-4);
    assert_close(
        &format!("{name} grad norm"),
        &column(&cfg, "grad_norm"),
        &column(&one, "grad_norm"),
        1e-4,
    );
    assert!(want.losses.first() != want.losses.last(), "{name}");
    // The final weights agree too.
    let a = load_vl_checkpoint(&want.final_model_dir).unwrap();
    let b = load_vl_checkpoint(&got.final_model_dir).unwrap();
    for (what, x, y) in [
        ("decoder", &a.lm.params, &b.lm.params),
        ("tower", &a.vision.params, &b.vision.params),
    ] {
        let worst = x
            .iter()
            .zip(y.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{name}: {what} weights differ by {worst}");
    }
    got
}

#[test]
fn sp2_dp2_and_both_match_one_rank_with_the_frozen_tower() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for (sp, dp) in [(2, 1), (1, 2), (2, 2)] {
        let name = format!("sp{sp}-dp{dp}");
        let mut cfg = setup(&root.join(&name), 3);
        cfg.train.grad_accum = 1;
        cfg.parallel.sp = sp;
        cfg.parallel.dp = dp;
        let s = matches_one_rank(root, &name, cfg);
        let v = s.video.unwrap();
        assert!(v.encode.tower_forwards > 0 && v.cache.hits + v.cache.misses > 0);
    }
}

#[test]
fn a_trained_tower_at_sp2_and_sp3_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for (sp, dp) in [(2, 1), (3, 1), (2, 2)] {
        let name = format!("tower-sp{sp}-dp{dp}");
        let mut cfg = setup(&root.join(&name), 3);
        cfg.video.train_vision = true;
        cfg.train.grad_accum = 1;
        cfg.parallel.sp = sp;
        cfg.parallel.dp = dp;
        let before = load_vl_checkpoint(cfg.model.path.as_ref().unwrap()).unwrap();
        let s = matches_one_rank(root, &name, cfg);
        // The tower trained and the cache was bypassed.
        let after = load_vl_checkpoint(&s.final_model_dir).unwrap();
        assert_ne!(after.vision.params, before.vision.params);
        let v = s.video.unwrap();
        assert_eq!(v.cache.hits + v.cache.misses, 0);
        assert!(v.encode.tower_forwards > 0);
    }
}

#[test]
fn a_corrupt_video_and_a_malformed_record_are_skipped_and_the_run_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 3);
    let data_dir = cfg.data.train.parent().unwrap().to_path_buf();
    // A video file of garbage, referenced by a copy of the first record (line 7), and a
    // malformed record (line 8).
    std::fs::write(
        data_dir.join("videos/corrupt.avi"),
        b"RIFF\x10\0\0\0AVI junk",
    )
    .unwrap();
    let text = std::fs::read_to_string(&cfg.data.train).unwrap();
    let mut rec: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    rec["problem_id"] = "corrupt".into();
    rec["videos"] = serde_json::json!(["videos/corrupt.avi"]);
    let text = format!("{text}{rec}\n{{\"problem_id\": \"broken\", \"problem\": 3}}\n");
    std::fs::write(&cfg.data.train, text).unwrap();
    let s = run_sft(&cfg, quiet()).unwrap();
    assert_eq!(s.steps, 3);
    let v = s.video.unwrap();
    assert_eq!((v.skipped_videos, v.skipped_records), (1, 1), "{v:?}");
    assert_eq!(v.videos, 6);
    let end = metrics(&cfg).pop().unwrap();
    assert_eq!(end["skipped_videos"], 1);
    assert_eq!(end["skipped_records"], 1);
}

#[test]
fn a_non_finite_step_stops_the_vl_run_with_the_last_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 5);
    let err = run_sft(
        &cfg,
        RunOptions {
            poison_step: Some(3),
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 3") && err.contains("non-finite") && err.contains("step-2"),
        "{err}"
    );
    let m = load_vl_checkpoint(&cfg.output.dir.join("checkpoints/step-2")).unwrap();
    assert!(m.lm.params.iter().all(|x| x.is_finite()));
    assert!(!cfg.output.dir.join("checkpoints/step-3").exists());
}
