//! `reel bench rl`: one GRPO step of a Qwen2.5-VL model on one synthetic video of 64, 256 and
//! 1024 frames (`--rl-frames`), with MR-SP's reuse on and off, through the trainer itself
//! (`reel_train::run_vl_grpo`, `[video] reuse`):
//!
//! - **on**: the video is encoded once (through the embedding cache) and its features serve the
//!   G rollouts and the reference and update passes; the group's prompt is prefilled once and
//!   the G samples fork from it;
//! - **off**: the video is encoded again for every sample of every pass, and every sample's
//!   prompt is prefilled on its own.
//!
//! A step is: decode the video, encode it, roll out G samples, rewards, a reference pass (β > 0),
//! one update. Printed per frame count: video and prompt tokens, step time and its split
//! (decode / encode / rollout / scoring / update), videos through the tower, prefilled tokens,
//! and the speed-up of on over off (the fastest of `--reps` runs of each). Defaults are scaled
//! down to finish in a few minutes on a CPU (a tiny random model, 56×56 frames, G = 4, 16
//! response tokens); `--rl-model DIR`, `--rl-side`, `--rl-group` and `--rl-response` give the
//! full sizes (a real Qwen2.5-VL folder, 448-pixel frames, G = 8).

use anyhow::{Context, Result};
use reel_data::{write_synth_dataset, SynthVideoConfig};
use reel_train::{run_vl_grpo, GrpoOptions, GrpoRunConfig, ProgressMode};
use serde_json::json;
use std::path::PathBuf;

/// What `reel bench rl` measures.
#[derive(Clone, Debug)]
pub struct RlBenchArgs {
    /// Frame counts, one step each way per count. Default 64, 256, 1024.
    pub frames: Vec<usize>,
    /// Square frame side in pixels (multiple of 28). Default 56.
    pub side: usize,
    /// Samples per prompt G. Default 4.
    pub group: usize,
    /// Tokens generated per sample. Default 16.
    pub response: usize,
    /// A Qwen2.5-VL folder to run instead of the tiny random model.
    pub model: Option<PathBuf>,
    /// Sequence-parallel ranks. Default 1.
    pub sp: usize,
    /// Runs of each mode; the fastest step is reported. Default 3.
    pub reps: usize,
}

/// Runs the benchmark; returns its JSON report (printed as a table unless `as_json`).
pub fn run(args: &RlBenchArgs, as_json: bool) -> Result<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    if !as_json {
        println!(
            "RL step (GRPO, Qwen2.5-VL, G = {}, {} response tokens, sp = {}, {} threads, best of \
             {}): MR-SP reuse on vs off",
            args.group,
            args.response,
            args.sp,
            rayon::current_num_threads(),
            args.reps.max(1)
        );
        println!(
            "{:>6} {:>7} {:>7} {:>4} {:>8} {:>7} {:>7} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8}",
            "frames",
            "vid tok",
            "prompt",
            "mode",
            "step s",
            "decode",
            "encode",
            "rollout",
            "scoring",
            "update",
            "tower",
            "prefill",
            "speed-up"
        );
    }
    for &frames in &args.frames {
        let dir = tmp.path().join(format!("f{frames}"));
        let data = dir.join("data");
        write_synth_dataset(
            &SynthVideoConfig {
                videos: 1,
                frames,
                width: args.side,
                height: args.side,
                held_out: 0.0,
                ..Default::default()
            },
            &data,
        )?;
        // The tiny model keeps side×side frames: (side/28)² merged tokens per 2 frames.
        let expected_tokens = frames.div_ceil(2) * (args.side / 28).pow(2);
        let model = match &args.model {
            Some(m) => m.clone(),
            None => {
                let m = dir.join("model");
                let positions = (expected_tokens + 1024 + args.response).next_power_of_two();
                reel_train::write_tiny_vl_model_with(&m, 0, positions, args.side)?;
                m
            }
        };
        let vid = reel_model::Qwen25VLConfig::from_file(&model.join("config.json"))?.video_token_id;
        let mut video_tokens = 0;
        let mut modes = Vec::new();
        for reuse in [true, false] {
            let mut best: Option<(serde_json::Value, usize, u64)> = None;
            for rep in 0..args.reps.max(1) {
                let mut cfg = GrpoRunConfig::default();
                cfg.model.path = model.clone();
                cfg.data.prompts = data.join("train.jsonl");
                cfg.data.prompts_per_step = 1;
                cfg.data.max_prompt_len = usize::MAX / 2;
                cfg.train.steps = 1;
                cfg.train.micro_batch_seqs = args.group;
                cfg.grpo.group_size = args.group;
                cfg.grpo.max_response_tokens = args.response;
                cfg.grpo.kl_coef = 0.01;
                cfg.video.sampling = format!("uniform:{frames}");
                cfg.video.reuse = reuse;
                cfg.parallel.sp = args.sp;
                let mode = if reuse { "on" } else { "off" };
                cfg.output.dir = dir.join(format!("{mode}-{rep}"));
                let s = run_vl_grpo(
                    &cfg,
                    GrpoOptions {
                        progress: Some(ProgressMode::Log),
                        ..GrpoOptions::default()
                    },
                )
                .with_context(|| format!("{frames} frames, reuse {reuse}"))?;
                let r = s.run.records.last().context("no step ran")?.clone();
                let prompt = s.run.last_batch.first().map_or(0, |b| b.1);
                video_tokens = s
                    .run
                    .last_batch
                    .first()
                    .map_or(0, |b| b.0[..b.1].iter().filter(|&&t| t == vid).count());
                let faster = best
                    .as_ref()
                    .is_none_or(|(b, _, _)| r["step_s"].as_f64() < b["step_s"].as_f64());
                if faster {
                    best = Some((r, prompt, s.encode.videos_encoded));
                }
            }
            let (r, prompt, videos) = best.context("no run")?;
            modes.push((reuse, r, prompt, videos));
        }
        let step_of = |r: &serde_json::Value| r["step_s"].as_f64().unwrap_or(f64::NAN);
        let speedup = step_of(&modes[1].1) / step_of(&modes[0].1);
        for (reuse, r, prompt, videos) in &modes {
            let g = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            if !as_json {
                println!(
                    "{:>6} {:>7} {:>7} {:>4} {:>8.3} {:>7.3} {:>7.3} {:>8.3} {:>8.3} {:>7.3} {:>6} \
                     {:>8} {:>8}",
                    frames,
                    video_tokens,
                    prompt,
                    if *reuse { "on" } else { "off" },
                    g("step_s"),
                    g("decode_s"),
                    g("encode_s"),
                    g("rollout_s"),
                    g("scoring_s"),
                    g("update_s"),
                    videos,
                    g("prefill_tokens"),
                    if *reuse {
                        format!("{speedup:.2}×")
                    } else {
                        String::new()
                    },
                );
            }
            rows.push(json!({
                "frames": frames, "video_tokens": video_tokens, "prompt_tokens": prompt,
                "reuse": reuse, "step_s": g("step_s"), "decode_s": g("decode_s"),
                "encode_s": g("encode_s"), "rollout_s": g("rollout_s"),
                "scoring_s": g("scoring_s"), "update_s": g("update_s"),
                "videos_through_tower": videos, "prefill_tokens": g("prefill_tokens"),
                "speedup": if *reuse { json!(speedup) } else { json!(null) },
            }));
        }
    }
    Ok(json!(rows))
}
