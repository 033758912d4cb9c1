//! `reel data`: the video datasets.
//!
//! - `reel data synth --out DIR [--videos N] [--frames F] [--size WxH] [--seed S]`: the synthetic
//!   long-video reasoning dataset (Motion-JPEG AVIs + LongVideo-Reason `train.jsonl` and
//!   `heldout.jsonl`), byte-identical for the same settings.
//! - `reel data validate FILE`: every record of a LongVideo-Reason JSONL file checked (fields,
//!   answer format, the video exists and decodes); each bad one printed as `file:line: what is
//!   wrong`; exit status 1 when any is bad.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use reel_data::{validate_reason_file, write_synth_dataset, SynthVideoConfig, VideoCheck};

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate the synthetic long-video reasoning dataset (the embedded default data).
    Synth {
        /// Output folder: videos/, train.jsonl, heldout.jsonl.
        #[arg(long)]
        out: PathBuf,
        /// Videos (`--questions-per-video` questions each).
        #[arg(long, default_value_t = 64)]
        videos: usize,
        /// Frames per video (at least 8).
        #[arg(long, default_value_t = 32)]
        frames: usize,
        /// Frame size, WIDTHxHEIGHT.
        #[arg(long, default_value = "112x112", value_parser = parse_size)]
        size: (usize, usize),
        /// Frames per second of the videos.
        #[arg(long, default_value_t = 4.0)]
        fps: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fraction of records written to heldout.jsonl (by a seeded hash of problem_id).
        #[arg(long, default_value_t = 0.125)]
        held_out: f64,
        /// Objects keep one colour each and are named by it ("the red shape"); no colour-change
        /// questions.
        #[arg(long)]
        colour_names: bool,
        /// Questions per video, each its own record sharing the video (1–8).
        #[arg(long, default_value_t = 1)]
        questions_per_video: usize,
    },
    /// Check every record of a LongVideo-Reason JSONL file; exit status 1 if any is bad.
    Validate {
        file: PathBuf,
        /// Only check that each video exists (do not decode).
        #[arg(long, conflicts_with = "full")]
        no_decode: bool,
        /// Decode every frame of each video (default: 4 frames spread over it).
        #[arg(long)]
        full: bool,
    },
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("size `{s}` is not WIDTHxHEIGHT"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("size `{s}` is not WIDTHxHEIGHT"))
    };
    Ok((p(w)?, p(h)?))
}

pub fn run(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Synth {
            out,
            videos,
            frames,
            size: (width, height),
            fps,
            seed,
            held_out,
            colour_names,
            questions_per_video,
        } => {
            let cfg = SynthVideoConfig {
                videos,
                frames,
                width,
                height,
                fps,
                seed,
                held_out,
                colour_names,
                questions_per_video,
                ..SynthVideoConfig::default()
            };
            let t = std::time::Instant::now();
            let s = write_synth_dataset(&cfg, &out)
                .with_context(|| format!("writing the synthetic dataset to {}", out.display()))?;
            println!(
                "wrote {} videos ({} frames, {width}x{height}, {:.1} MiB) and {} train + {} held-out \
                 records to {} in {:.1}s",
                videos,
                s.frames,
                s.video_bytes as f64 / (1 << 20) as f64,
                s.train,
                s.held_out,
                out.display(),
                t.elapsed().as_secs_f64()
            );
        }
        DataCommand::Validate {
            file,
            no_decode,
            full,
        } => {
            let check = if no_decode {
                VideoCheck::Exists
            } else if full {
                VideoCheck::Full
            } else {
                VideoCheck::Sample
            };
            let (records, errors) = validate_reason_file(&file, check)?;
            for e in &errors {
                println!("{e}");
            }
            let bad: std::collections::BTreeSet<usize> = errors
                .iter()
                .map(|e| match e {
                    reel_data::DataError::Jsonl { line, .. } => *line,
                    _ => 0,
                })
                .collect();
            if !bad.is_empty() {
                let good = records.lines.iter().filter(|l| !bad.contains(l)).count();
                bail!(
                    "{}: {} bad record(s), {good} good",
                    file.display(),
                    bad.len()
                );
            }
            println!(
                "{}: all {} records are good",
                file.display(),
                records.records.len()
            );
        }
    }
    Ok(())
}
