//! Videos decoded ahead of compute in the VLM trainers (`[video] prefetch_workers`,
//! `prefetch_depth`): SFT and GRPO give the same numbers with worker threads decoding ahead as
//! with decoding on the step's thread; a video with a frame that does not decode (its header
//! fine, so it passes the load) is skipped and counted when reached, the run going on; the
//! decoded videos held at once stay within depth + workers; and a video whose embeddings are in
//! the cache is never decoded.

mod common;

use common::{metrics, quiet};
use reel_data::{write_synth_dataset, SynthVideoConfig};
use reel_train::vl::write_tiny_vl_model;
use reel_train::{
    run_sft, run_vl_grpo, GrpoOptions, GrpoRunConfig, ProgressMode, SftConfig, SftSummary,
};
use std::path::{Path, PathBuf};

/// A tiny Qwen2.5-VL and `videos` synthetic videos with their records; returns (model, data
/// folder).
fn data(dir: &Path, videos: usize) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    write_tiny_vl_model(&model, 1).unwrap();
    let data = dir.join("data");
    let synth = SynthVideoConfig {
        videos,
        frames: 8,
        width: 56,
        height: 56,
        held_out: 0.0,
        ..Default::default()
    };
    write_synth_dataset(&synth, &data).unwrap();
    (model, data)
}

/// Adds to `jsonl` a copy of its first record whose video is a copy of the first video with
/// frame 3's JPEG marker broken: the container parses (the record loads), the frame does not
/// decode.
fn add_corrupt_frame_record(jsonl: &Path) {
    let dir = jsonl.parent().unwrap();
    let text = std::fs::read_to_string(jsonl).unwrap();
    let mut rec: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let first = rec["videos"][0].as_str().unwrap().to_string();
    let mut bytes = std::fs::read(dir.join(&first)).unwrap();
    let at = bytes
        .windows(3)
        .enumerate()
        .filter(|(_, w)| *w == [0xff, 0xd8, 0xff])
        .map(|(i, _)| i)
        .nth(3)
        .unwrap();
    bytes[at..at + 3].copy_from_slice(&[0, 0, 0]);
    std::fs::write(dir.join("videos/broken-frame.avi"), bytes).unwrap();
    rec["problem_id"] = "broken-frame".into();
    rec["videos"] = serde_json::json!(["videos/broken-frame.avi"]);
    std::fs::write(jsonl, format!("{text}{rec}\n")).unwrap();
}

fn sft_config(model: &Path, train: &Path, out: PathBuf, steps: u64) -> SftConfig {
    let mut cfg = SftConfig::default();
    cfg.model.path = Some(model.to_path_buf());
    cfg.data.train = train.to_path_buf();
    cfg.data.max_len = 1024;
    cfg.data.tokens_per_batch = 1024;
    cfg.train.steps = steps;
    cfg.train.grad_accum = 2;
    cfg.train.lr = 3e-3;
    cfg.train.warmup_steps = 1;
    cfg.output.dir = out;
    cfg.output.save_every = 0;
    cfg.output.keep_last = 0;
    cfg
}

fn run(cfg: &SftConfig, workers: usize, depth: usize, name: &str) -> SftSummary {
    let mut c = cfg.clone();
    c.video.prefetch_workers = workers;
    c.video.prefetch_depth = depth;
    c.output.dir = cfg.output.dir.join(name);
    run_sft(&c, quiet()).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
fn sft_with_prefetch_matches_decoding_on_the_step_thread_and_skips_a_broken_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = data(tmp.path(), 5);
    let train = data.join("train.jsonl");
    add_corrupt_frame_record(&train);
    for (sp, dp, train_vision) in [(1, 1, false), (2, 2, false), (1, 1, true)] {
        let name = format!("sp{sp}-dp{dp}-tower{train_vision}");
        let mut cfg = sft_config(&model, &train, tmp.path().join(&name), 4);
        (cfg.parallel.sp, cfg.parallel.dp) = (sp, dp);
        cfg.video.train_vision = train_vision;
        let off = run(&cfg, 0, 1, "off");
        let on = run(&cfg, 2, 2, "on");
        assert_eq!(on.losses, off.losses, "{name}");
        assert_eq!(on.param_checksums, off.param_checksums, "{name}");
        assert!(on.losses.iter().all(|l| l.is_finite()), "{name}");
        // 6 records of which the broken one is drawn (each epoch) and skipped, counted once.
        for s in [&on, &off] {
            let v = s.video.as_ref().unwrap();
            assert_eq!(v.skipped_videos, 1, "{name}: {v:?}");
            assert_eq!(v.videos, 6);
        }
        let mut c = cfg.clone();
        c.output.dir = cfg.output.dir.join("on");
        let end = metrics(&c).pop().unwrap();
        assert_eq!(end["skipped_videos"], 1, "{end}");
        for key in ["data_wait_s", "videos_decoded", "videos_in_memory_peak"] {
            assert!(end.get(key).is_some(), "metrics lack {key}: {end}");
        }
    }
}

#[test]
fn decoded_videos_held_at_once_stay_within_depth_plus_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = data(tmp.path(), 6);
    let mut cfg = sft_config(&model, &data.join("train.jsonl"), tmp.path().join("run"), 6);
    // A trained tower bypasses the cache: every drawn record is decoded.
    cfg.video.train_vision = true;
    for (workers, depth) in [(1, 1), (2, 2), (3, 1)] {
        let s = run(&cfg, workers, depth, &format!("w{workers}-d{depth}"));
        let p = s.video.unwrap().prefetch;
        assert_eq!(p.videos_decoded, 12, "{p:?}");
        assert_eq!(p.cache_skips, 0);
        assert!(p.peak_videos_in_memory >= 1, "{p:?}");
        assert!(
            p.peak_videos_in_memory <= depth + workers,
            "{workers} workers, depth {depth}: {p:?}"
        );
    }
}

#[test]
fn a_video_whose_embeddings_are_cached_is_not_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = data(tmp.path(), 4);
    let mut cfg = sft_config(&model, &data.join("train.jsonl"), tmp.path().join("run"), 4);
    cfg.video.cache_dir = Some(tmp.path().join("cache"));
    // A cold cache: each video decoded once, its embeddings cached (later draws of it are
    // prefetched after that and not decoded, or, prefetched before, decoded again).
    let cold = run(&cfg, 2, 2, "cold");
    let p = cold.video.unwrap().prefetch;
    assert!(
        p.videos_decoded >= 4 && p.videos_decoded + p.cache_skips == 8,
        "{p:?}"
    );
    // A warm one (the disk tier of the first run): nothing decoded, the same losses.
    for workers in [0, 2] {
        let warm = run(&cfg, workers, 2, &format!("warm{workers}"));
        let v = warm.video.unwrap();
        assert_eq!(v.prefetch.videos_decoded, 0, "{workers} workers: {v:?}");
        assert_eq!(v.prefetch.cache_skips, 8);
        assert_eq!(v.prefetch.peak_videos_in_memory, 0);
        assert_eq!(v.encode.tower_forwards, 0);
        assert_eq!(warm.losses, cold.losses);
    }
}

fn grpo_config(model: &Path, prompts: &Path, out: PathBuf) -> GrpoRunConfig {
    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = model.to_path_buf();
    cfg.data.prompts = prompts.to_path_buf();
    cfg.data.prompts_per_step = 2;
    cfg.train.steps = 3;
    cfg.train.micro_batch_seqs = 3;
    cfg.train.mini_batches = 2;
    cfg.grpo.group_size = 3;
    cfg.grpo.max_response_tokens = 5;
    cfg.grpo.lr = 1e-3;
    cfg.grpo.kl_coef = 0.05;
    cfg.grpo.reward.accuracy_weight = 0.0;
    cfg.grpo.reward.format_weight = 0.0;
    // Reward: the length of the JSON line the command reads (varies with the response).
    cfg.grpo.reward.command = vec!["sh".into(), "-c".into(), "read l; echo ${#l}".into()];
    cfg.output.dir = out;
    cfg.output.save_every = 0;
    cfg
}

#[test]
fn grpo_with_prefetch_matches_decoding_when_drawn_and_skips_a_broken_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = data(tmp.path(), 4);
    let prompts = data.join("train.jsonl");
    add_corrupt_frame_record(&prompts);
    let run = |workers: usize, depth: usize, reuse: bool| {
        let mut cfg = grpo_config(
            &model,
            &prompts,
            tmp.path().join(format!("{workers}-{reuse}")),
        );
        cfg.video.prefetch_workers = workers;
        cfg.video.prefetch_depth = depth;
        cfg.video.reuse = reuse;
        let opts = GrpoOptions {
            progress: Some(ProgressMode::Log),
            ..GrpoOptions::default()
        };
        run_vl_grpo(&cfg, opts).unwrap()
    };
    for reuse in [true, false] {
        let off = run(0, 1, reuse);
        let on = run(2, 2, reuse);
        assert_eq!(on.run.records.len(), 3);
        for (a, b) in on.run.records.iter().zip(&off.run.records) {
            for key in ["loss", "reward_mean", "kl", "grad_norm", "skipped_records"] {
                assert_eq!(a[key], b[key], "reuse {reuse}: {key}: {a} vs {b}");
            }
            assert!(a
                .get("data_wait_s")
                .is_some_and(|w| w.as_f64().unwrap() >= 0.0));
        }
        // Three steps of two prompts over five records draw the broken one at least once.
        assert!(on.skipped_records >= 1, "{:?}", on.skipped_records);
        assert_eq!(on.skipped_records, off.skipped_records);
        assert!(on.prefetch.videos_decoded > 0);
        // Depth 2 ahead, plus the prompts a round holds until their encode (2 per step).
        assert!(
            on.prefetch.peak_videos_in_memory <= 2 + 2,
            "{:?}",
            on.prefetch
        );
    }
}
