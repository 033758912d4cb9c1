//! `reel bench data`: video input throughput on synthetic videos generated for the run.
//!
//! Writes 8 synthetic Motion-JPEG videos (64 frames, 224×224) to a temporary folder, then
//! measures: native MJPEG decode of every frame (one thread), the same through ffmpeg (when
//! installed), preprocessing of 32 uniformly sampled frames per video with transformers' default
//! Qwen2-VL video settings (smart_resize, bicubic resize, normalise, patchify), and the
//! prefetching loader (decode + preprocess on worker threads) end to end.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use reel_data::video::ffmpeg::{ffmpeg_available, FfmpegVideo};
use reel_data::video::{load_and_process, Prefetcher};
use reel_data::{
    write_synth_dataset, FrameSampling, SynthVideoConfig, Video, VideoProcessor,
    VideoProcessorConfig,
};
use serde_json::json;

const VIDEOS: usize = 8;
const FRAMES: usize = 64;
const SIDE: usize = 224;
const SAMPLED: usize = 32;

/// Removes the folder when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(as_json: bool) -> Result<serde_json::Value> {
    let dir = TempDir(std::env::temp_dir().join(format!("reel-bench-data-{}", std::process::id())));
    let cfg = SynthVideoConfig {
        videos: VIDEOS,
        frames: FRAMES,
        width: SIDE,
        height: SIDE,
        fps: 8.0,
        held_out: 0.0,
        ..SynthVideoConfig::default()
    };
    let t = Instant::now();
    write_synth_dataset(&cfg, &dir.0).context("writing the benchmark videos")?;
    let encode_s = t.elapsed().as_secs_f64();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.0.join("videos"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    paths.sort();
    let total_frames = (VIDEOS * FRAMES) as f64;
    let all: Vec<usize> = (0..FRAMES).collect();

    let t = Instant::now();
    for p in &paths {
        Video::open(p)?.decode(&all)?;
    }
    let native_fps = total_frames / t.elapsed().as_secs_f64();

    let ffmpeg_fps = if ffmpeg_available() {
        let t = Instant::now();
        for p in &paths {
            FfmpegVideo::open(p)?.decode(&all)?;
        }
        Some(total_frames / t.elapsed().as_secs_f64())
    } else {
        None
    };

    let config = VideoProcessorConfig::default();
    let processor = VideoProcessor::new(config.clone())?;
    let sampling = FrameSampling::Uniform { frames: SAMPLED };
    let (mut decode_s, mut process_s) = (0.0, 0.0);
    let mut tokens = 0;
    for p in &paths {
        let v = load_and_process(p, &sampling, &processor)?;
        decode_s += v.decode_secs;
        process_s += v.process_secs;
        tokens = v.inputs.num_video_tokens(config.merge_size);
    }
    let (rh, rw) = processor
        .target_size(SIDE, SIDE)
        .map_err(anyhow::Error::msg)?;

    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let t = Instant::now();
    let mut pf = Prefetcher::videos(paths.clone(), sampling, processor, workers, 2 * workers);
    let loaded = pf.by_ref().count();
    let loader_s = t.elapsed().as_secs_f64();
    let stats = pf.stats();

    let r = json!({
        "videos": VIDEOS, "frames_per_video": FRAMES, "size": [SIDE, SIDE],
        "encode_frames_per_s": total_frames / encode_s,
        "native_mjpeg_decode_frames_per_s": native_fps,
        "ffmpeg_decode_frames_per_s": ffmpeg_fps,
        "sampled_frames": SAMPLED,
        "resized_to": [rh, rw],
        "video_tokens": tokens,
        "decode_ms_per_video": 1e3 * decode_s / VIDEOS as f64,
        "preprocess_ms_per_video": 1e3 * process_s / VIDEOS as f64,
        "loader_workers": workers,
        "loader_videos_per_s": loaded as f64 / loader_s,
        "loader_frames_per_s": (loaded * SAMPLED) as f64 / loader_s,
        "loader_skipped": stats.skipped,
    });
    if !as_json {
        println!("video input ({VIDEOS} synthetic MJPEG videos, {FRAMES} frames of {SIDE}x{SIDE})");
        println!(
            "  encode (synth + JPEG)      {:>10.0} frames/s",
            total_frames / encode_s
        );
        println!("  decode, native MJPEG       {native_fps:>10.0} frames/s (1 thread)");
        match ffmpeg_fps {
            Some(f) => println!("  decode, ffmpeg (rgb24 pipe) {f:>9.0} frames/s"),
            None => println!("  decode, ffmpeg             not installed"),
        }
        println!(
            "  {SAMPLED} frames/video → {rh}x{rw}, {tokens} video tokens: decode {:.1} ms, \
             preprocess {:.1} ms per video",
            1e3 * decode_s / VIDEOS as f64,
            1e3 * process_s / VIDEOS as f64
        );
        println!(
            "  prefetching loader, {workers} workers: {:.1} videos/s ({:.0} sampled frames/s), \
             {} skipped",
            loaded as f64 / loader_s,
            (loaded * SAMPLED) as f64 / loader_s,
            stats.skipped
        );
    }
    Ok(r)
}
