//! `reel demo`: the long-video main job on the embedded default data, end to end on CPU.
//!
//! 1. Generates the synthetic long-video reasoning dataset ([`reel_data::write_synth_dataset`],
//!    as `reel data synth` does): Motion-JPEG videos of shapes that appear, move and disappear,
//!    each keeping one colour that names it (`--names colour`, the default; `--names shape`: named
//!    by shape, colours that change), one four-option question each, split into `train.jsonl`
//!    and a held-out `heldout.jsonl` by a seeded hash of the problem id. The demo asks for brief reasoning
//!    traces (the conclusion, then the answer) and options in a fixed order (the letter follows
//!    from the answer), so that a tiny model can learn the task in minutes.
//! 2. Writes a tiny random Qwen2.5-VL (`--hidden`, `--layers`; the vision tower stays frozen),
//!    its decoder's `rope_theta` [`DEMO_ROPE_THETA`] and its merged features centred on 64
//!    training videos ([`reel_train::centre_vl_merger`]; `--uncentred` keeps them as drawn).
//! 3. Held-out accuracy of the untrained model: greedy answers through the rollout engine from
//!    the embedding cache, scored by the accuracy reward's answer extraction (per `problem_type`,
//!    with the `<think>/<answer>` format rate).
//! 4. CoT-SFT on the training videos ([`reel_train::run_vl_sft`]) with MR-SP over `--sp`
//!    in-process ranks (each video encoded once, split over the ranks; decoder shards through
//!    DistAttn), the loss curve printed; held-out accuracy after SFT.
//! 5. GRPO from the SFT model (`--grpo-steps`; 0 skips it) on the questions of fresh videos
//!    (`--rl-videos`, in neither the SFT nor the held-out set; by default counting, the kind the
//!    SFT model reads from the video, `--rl-problem-types`), then the held-out accuracy after RL.
//!
//! Accuracies before SFT, after SFT and after GRPO are printed side by side, per problem type,
//! with a control: the same questions each asked of another held-out video (`other video`; a
//! model that reads the video loses accuracy there, one that answers from the question alone
//! does not), and the runs' metrics are plotted. Everything lands in `--out` (default `runs/demo`): `data/`
//! (`rl/` the GRPO questions),
//! `model/` (the initial VLM), `sft/` (metrics.jsonl, metrics.png, checkpoints/), `grpo/`, and
//! `accuracy.json` with every evaluation.

use crate::demo::{loss_chart, DemoArgs};
use anyhow::{Context, Result};
use reel_data::{FrameSampling, SynthVideoConfig, Tokenizer, VideoProcessorConfig, VideoSettings};
use reel_model::embed_cache::EmbedCache;
use reel_train::{
    eval_vl_accuracy, run_vl_grpo, run_vl_sft, stop_token_ids, AccuracyOptions, AccuracyReport,
    GrpoOptions, GrpoRunConfig, VlSftConfig,
};
use std::path::Path;
use std::time::Instant;

/// The demo decoder's `rope_theta`. Its heads of 16 have 8 rotary frequencies, M-RoPE gives the
/// height axis 3 and the width axis the 3 slowest: at Qwen2's 10⁴ a video token one grid column
/// over turns by 3·10⁻⁴–3·10⁻³ rad, too little for the decoder to tell where in the frame a token
/// lies. On one static shape per video asked for its quadrant (800 videos, 300 SFT steps) held-out
/// accuracy is 30.5% at 10⁴, the same as with another video's frames; at 10 (the width axis
/// turns 0.13–0.24 rad per column) it is 59% (another video: 31.5%); at 3 and 100 (150 steps)
/// 27.5% and 22.5%, against 39.5% at 10.
pub const DEMO_ROPE_THETA: f32 = 10.0;

/// Settings of the video demo (`reel demo`); the shared ones (steps, width, GRPO) are in
/// [`DemoArgs`].
#[derive(clap::Args, Debug)]
pub struct VideoDemoArgs {
    /// Synthetic videos (`--questions-per-video` questions each) for SFT and the held-out set.
    #[arg(long, default_value_t = 1600)]
    pub videos: usize,
    /// Frames per video (all of them are sampled). 16 gives 8 temporal patches, so objects that
    /// appear in the first half mostly fall in different ones and "which appeared first" can be
    /// read.
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Frame side in pixels (square frames; a multiple of 28).
    #[arg(long, default_value_t = 56)]
    pub side: usize,
    /// Fraction of the videos held out for accuracy.
    #[arg(long, default_value_t = 0.2)]
    pub held_out: f64,
    /// Question kinds (problem types), comma-separated: temporal, counting, before_after,
    /// spatial.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "temporal,counting,spatial"
    )]
    pub problem_types: Vec<String>,
    /// Examples per SFT step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Sequence-parallel ranks (in-process) for SFT: MR-SP stage-1 encode and the decoder's
    /// token shards.
    #[arg(long, default_value_t = 2)]
    pub sp: usize,
    /// Fresh videos (in neither the SFT nor the held-out set) whose questions GRPO trains on.
    #[arg(long, default_value_t = 600)]
    pub rl_videos: usize,
    /// Problem types of the GRPO questions, comma-separated. Default counting, the kind the SFT
    /// model reads from the video (order and place stay near chance, so their rewards are mostly
    /// noise); the kinds left out may drift a little under its updates (format 97.6% in the run
    /// the README quotes).
    #[arg(long, value_delimiter = ',', default_value = "counting")]
    pub rl_problem_types: Vec<String>,
    /// Most tokens of a greedy answer (and of a GRPO sample).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Train the vision tower too during CoT-SFT (each video encoded every step, its gradients
    /// through the tower); GRPO keeps it frozen either way.
    #[arg(long)]
    pub train_vision: bool,
    /// How questions name the objects: `colour` (each object keeps one colour and is named by it,
    /// "the red shape", `reel data synth --colour-names`; a patch's mean colour carries it, so the
    /// tiny model can read it) or `shape` (named by shape, colours that change, and the
    /// `before_after` kind possible; this random tower barely shows an 11-pixel object's shape).
    #[arg(long, value_enum, default_value_t = ObjectNames::Colour)]
    pub names: ObjectNames,
    /// Questions asked of each video (each its own record; the split keeps a video's questions
    /// together).
    #[arg(long, default_value_t = 1)]
    pub questions_per_video: usize,
    /// Keep the random tower's merged features as drawn instead of centring them on the first
    /// 64 training videos ([`reel_train::centre_vl_merger`]; uncentred, their mean is 97% of a
    /// feature's norm and a small shape barely moves what the decoder's RMSNorm passes on).
    #[arg(long)]
    pub uncentred: bool,
}

/// How the demo's questions name objects ([`VideoDemoArgs::names`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectNames {
    Colour,
    Shape,
}

/// The held-out evaluation: greedy answers through the engine, videos from one cache.
struct Judge {
    tok: Tokenizer,
    settings: VideoSettings,
    heldout: std::path::PathBuf,
    /// The held-out questions, each with the next record's video (the control: what accuracy
    /// owes to the video).
    swapped: std::path::PathBuf,
    cache: EmbedCache,
    max_new_tokens: usize,
}

impl Judge {
    fn accuracy(&self, model_dir: &Path) -> Result<AccuracyReport> {
        self.accuracy_on(&Self::load(model_dir)?, &self.heldout)
    }

    /// [`Judge::accuracy`] and, of the same model, the accuracy on the held-out questions asked
    /// of other videos ([`swap_videos`]).
    fn with_control(&self, model_dir: &Path) -> Result<(AccuracyReport, AccuracyReport)> {
        let m = Self::load(model_dir)?;
        Ok((
            self.accuracy_on(&m, &self.heldout)?,
            self.accuracy_on(&m, &self.swapped)?,
        ))
    }

    fn load(model_dir: &Path) -> Result<reel_model::Qwen25VL> {
        reel_model::load_vl_checkpoint(model_dir)
            .with_context(|| format!("loading {}", model_dir.display()))
    }

    fn accuracy_on(&self, m: &reel_model::Qwen25VL, questions: &Path) -> Result<AccuracyReport> {
        let opts = AccuracyOptions {
            max_new_tokens: self.max_new_tokens,
            batch: 64,
            stop_token_ids: stop_token_ids(&self.tok, &m.lm),
            // The GPU decoder when this build and machine have one (f32: the CPU's answers).
            device: reel_train::Device::Auto,
            gpu_f32: true,
            ..AccuracyOptions::default()
        };
        let (report, _) =
            eval_vl_accuracy(m, &self.tok, questions, &self.settings, &self.cache, &opts)?;
        Ok(report)
    }
}

/// Writes `to`: the records of `from` with each record's videos replaced by the next different
/// record's (the last takes the first's), in the same folder so the relative video paths still resolve.
/// A model that reads the video loses accuracy on it; one that answers from the question alone
/// scores the same.
fn swap_videos(from: &Path, to: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let mut records: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", from.display()))?;
    // The distinct video lists in order (a video may carry several questions); each record
    // takes the one after its own.
    let mut videos: Vec<serde_json::Value> = Vec::new();
    for r in &records {
        if !videos.contains(&r["videos"]) {
            videos.push(r["videos"].clone());
        }
    }
    for r in records.iter_mut() {
        let own = videos.iter().position(|v| *v == r["videos"]).unwrap_or(0);
        r["videos"] = videos[(own + 1) % videos.len()].clone();
    }
    let mut out = String::new();
    for r in &records {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    reel_train::write_atomic(to, out.as_bytes())?;
    Ok(())
}

fn pct(r: &AccuracyReport, ty: Option<&str>) -> String {
    let t = match ty {
        None => Some(&r.overall),
        Some(k) => r.per_type.get(k),
    };
    t.map_or("-".into(), |t| format!("{:5.1}%", 100.0 * t.accuracy))
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    let v = &args.video;
    let out = args.out();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // The demo regenerates everything: an earlier demo's folders go.
    for d in ["data", "model", "sft", "grpo"] {
        let p = out.join(d);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("removing the earlier demo's {}", p.display()))?;
        }
    }
    println!(
        "reel demo: a tiny Qwen2.5-VL learns to answer questions about synthetic videos \
         (CoT-SFT, then GRPO) on {} CPU threads",
        rayon::current_num_threads()
    );

    // 1. Data.
    let data = out.join("data");
    let synth = SynthVideoConfig {
        videos: v.videos,
        frames: v.frames,
        width: v.side,
        height: v.side,
        seed: args.seed,
        held_out: v.held_out,
        problem_types: v.problem_types.clone(),
        brief_reasoning: true,
        ordered_options: true,
        colour_names: v.names == ObjectNames::Colour,
        questions_per_video: v.questions_per_video,
        ..SynthVideoConfig::default()
    };
    let s = reel_data::write_synth_dataset(&synth, &data)
        .with_context(|| format!("writing the synthetic dataset to {}", data.display()))?;
    // GRPO's questions: fresh videos of another seed, all in one file.
    let rl = SynthVideoConfig {
        videos: v.rl_videos,
        seed: args.seed + 1,
        held_out: 0.0,
        problem_types: v.rl_problem_types.clone(),
        ..synth.clone()
    };
    if args.grpo_steps() > 0 {
        reel_data::write_synth_dataset(&rl, &data.join("rl"))
            .with_context(|| format!("writing the GRPO questions to {}", data.display()))?;
    }
    println!(
        "data: {} videos of {} frames at {}×{} ({:.1} MiB), {} train + {} held-out questions \
         ({}) in {}",
        v.videos,
        v.frames,
        v.side,
        v.side,
        s.video_bytes as f64 / (1 << 20) as f64,
        s.train,
        s.held_out,
        v.problem_types.join(", "),
        data.display()
    );
    if args.grpo_steps() > 0 {
        println!(
            "      {} more videos with {} questions for GRPO in {}",
            v.rl_videos,
            v.rl_problem_types.join(", "),
            data.join("rl").display()
        );
    }

    // 2. Model.
    let model_dir = out.join("model");
    reel_train::write_vl_model(
        &model_dir,
        args.seed,
        args.hidden(),
        args.layers(),
        1024,
        v.side,
        DEMO_ROPE_THETA,
    )?;
    let sampling = FrameSampling::Uniform { frames: v.frames };
    let centred = if v.uncentred {
        None
    } else {
        let train = data.join("train.jsonl");
        Some(
            reel_train::centre_vl_merger(&model_dir, &train, sampling, 64)
                .with_context(|| format!("centring the tower's merger on {}", train.display()))?,
        )
    };
    let judge = Judge {
        tok: Tokenizer::from_dir(&model_dir)?,
        settings: VideoSettings {
            sampling,
            processor: VideoProcessorConfig::from_dir(&model_dir)?,
        },
        heldout: data.join("heldout.jsonl"),
        swapped: data.join("heldout-swapped.jsonl"),
        cache: EmbedCache::new(1 << 30),
        max_new_tokens: v.max_new_tokens,
    };
    swap_videos(&judge.heldout, &judge.swapped)?;
    let m0 = reel_model::load_vl_checkpoint(&model_dir)?;
    println!(
        "model: Qwen2.5-VL, decoder {} wide × {} layers ({:.2} M parameters), vision tower {:.2} M \
         (random, {}; {})",
        args.hidden(),
        args.layers(),
        m0.lm.params.len() as f64 / 1e6,
        m0.vision.params.len() as f64 / 1e6,
        if v.train_vision {
            "trained in SFT, frozen in GRPO"
        } else {
            "frozen"
        },
        centred.map_or("merged features as drawn".to_string(), |r| format!(
            "merged features centred on 64 training videos: their mean was {:.0}% of a feature's norm",
            100.0 * r
        ))
    );
    drop(m0);

    // 3. Before training.
    let t = Instant::now();
    let before = judge.accuracy(&model_dir)?;
    println!(
        "held-out accuracy before SFT: {} (format {:.0}%), {:.1} s",
        pct(&before, None),
        100.0 * before.overall.format_rate,
        t.elapsed().as_secs_f64()
    );

    // 4. CoT-SFT with sequence parallelism.
    let mut sft = VlSftConfig::new(model_dir.clone(), data.join("train.jsonl"), out.join("sft"));
    sft.sampling = sampling;
    sft.steps = args.steps() as usize;
    sft.batch = v.batch;
    sft.lr = args.lr();
    sft.warmup = (sft.steps / 20).max(1);
    sft.sp = v.sp;
    sft.seed = args.seed;
    sft.vision_freeze = !v.train_vision;
    println!(
        "\nCoT-SFT: {} steps × {} videos, lr {}, sequence parallel over {} in-process ranks",
        sft.steps, sft.batch, sft.lr, sft.sp
    );
    let t = Instant::now();
    let summary = run_vl_sft(&sft)?;
    let losses: Vec<f32> = summary.losses.iter().map(|&x| x as f32).collect();
    print!("{}", loss_chart(&losses, 40, 8));
    println!(
        "{} steps in {:.0} s; loss {:.3} → {:.3}; {} videos, tower runs {}, cache hits {} misses {}",
        summary.losses.len(),
        t.elapsed().as_secs_f64(),
        summary.losses.first().copied().unwrap_or(f64::NAN),
        summary.losses.last().copied().unwrap_or(f64::NAN),
        summary.videos,
        summary.encode.tower_forwards,
        summary.cache.hits + summary.cache.disk_hits,
        summary.cache.misses
    );
    let sft_metrics = sft.out.join("metrics.jsonl");
    crate::plot::plot(
        &sft_metrics,
        &["loss".to_string(), "grad_norm".to_string()],
        &sft.out.join("metrics.png"),
        900,
        520,
    )?;
    let (after_sft, sft_swapped) = judge.with_control(&summary.final_model_dir)?;
    println!(
        "held-out accuracy after SFT: {} (format {:.0}%); {} with each question asked of another \
         video",
        pct(&after_sft, None),
        100.0 * after_sft.overall.format_rate,
        pct(&sft_swapped, None)
    );

    // 5. GRPO.
    let (after_grpo, grpo_swapped) = match grpo_stage(args, &out, &summary.final_model_dir, &judge)?
    {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };

    // Side by side.
    let mut types: Vec<&str> = after_sft.per_type.keys().map(String::as_str).collect();
    types.dedup();
    println!(
        "\nheld-out accuracy (greedy answers, {} questions):",
        after_sft.overall.total
    );
    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "problem type", "before SFT", "after SFT", "after GRPO"
    );
    let grpo_cell = |ty: Option<&str>| after_grpo.as_ref().map_or("-".into(), |r| pct(r, ty));
    for ty in &types {
        println!(
            "{:<14} {:>10} {:>10} {:>10}",
            ty,
            pct(&before, Some(ty)),
            pct(&after_sft, Some(ty)),
            grpo_cell(Some(ty))
        );
    }
    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "all",
        pct(&before, None),
        pct(&after_sft, None),
        grpo_cell(None)
    );
    let fmt = |r: &AccuracyReport| format!("{:5.1}%", 100.0 * r.overall.format_rate);
    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "format",
        fmt(&before),
        fmt(&after_sft),
        after_grpo.as_ref().map_or("-".into(), fmt)
    );
    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "other video",
        "-",
        pct(&sft_swapped, None),
        grpo_swapped.as_ref().map_or("-".into(), |r| pct(r, None))
    );
    println!(
        "(\"other video\": every held-out question asked of the next question's video; the gap to \
         \"all\" is what the answers owe to the video)"
    );
    let record = serde_json::json!({
        "before_sft": before,
        "after_sft": after_sft,
        "after_grpo": after_grpo,
        "after_sft_other_video": sft_swapped,
        "after_grpo_other_video": grpo_swapped,
    });
    reel_train::write_atomic(
        out.join("accuracy.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    println!(
        "demo finished in {:.0} s; runs in {} (sft/metrics.png{})",
        start.elapsed().as_secs_f64(),
        out.display(),
        if after_grpo.is_some() {
            ", grpo/metrics.png"
        } else {
            ""
        }
    );
    Ok(())
}

/// The GRPO stage on the SFT model (`run_vl_grpo`: prompts of the training questions, groups
/// rolled out from the cached video embeddings, MR-SP over `--sp` ranks), then its held-out
/// accuracy; None when `--grpo-steps 0`.
fn grpo_stage(
    args: &DemoArgs,
    out: &Path,
    sft_model: &Path,
    judge: &Judge,
) -> Result<Option<(AccuracyReport, AccuracyReport)>> {
    if args.grpo_steps() == 0 {
        println!("\nGRPO stage skipped (--grpo-steps 0)");
        return Ok(None);
    }
    let v = &args.video;
    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = sft_model.to_path_buf();
    cfg.data.prompts = out.join("data").join("rl").join("train.jsonl");
    cfg.data.prompts_per_step = args.grpo_prompts();
    cfg.data.seed = args.seed;
    cfg.train.steps = args.grpo_steps();
    cfg.train.micro_batch_seqs = 16;
    cfg.train.seed = args.seed;
    cfg.grpo.group_size = args.grpo_group();
    cfg.grpo.max_response_tokens = v.max_new_tokens;
    cfg.grpo.lr = args.grpo_lr();
    // A k3 KL to the SFT model keeps the question kinds GRPO does not train on from drifting.
    cfg.grpo.kl_coef = args.grpo_kl.unwrap_or(0.05);
    cfg.grpo.top_p = 1.0;
    cfg.grpo.dynamic_sampling = true;
    cfg.grpo.dynamic_sampling_max_rounds = 2;
    cfg.video.sampling = format!("uniform:{}", v.frames);
    cfg.parallel.sp = v.sp;
    cfg.output.dir = out.join("grpo");
    cfg.output.save_every = 0;
    cfg.output.log_every = 5;
    reel_train::write_atomic(out.join("grpo.toml"), cfg.to_toml().as_bytes())?;
    println!(
        "\nGRPO on fresh {} questions: {} steps, {} questions × {} samples, lr {}, reward \
         {}·accuracy + {}·format, dynamic sampling, sequence parallel over {} ranks",
        v.rl_problem_types.join("/"),
        cfg.train.steps,
        cfg.data.prompts_per_step,
        cfg.grpo.group_size,
        cfg.grpo.lr,
        cfg.grpo.reward.accuracy_weight,
        cfg.grpo.reward.format_weight,
        cfg.parallel.sp
    );
    let t = Instant::now();
    let s = run_vl_grpo(&cfg, GrpoOptions::default())?;
    let rewards: Vec<f64> = s
        .run
        .records
        .iter()
        .filter_map(|r| r["reward_mean"].as_f64())
        .collect();
    let span = (rewards.len() / 4).max(1);
    let avg = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    println!(
        "{} steps in {:.0} s; training reward {:.3} over the first {span} steps → {:.3} over the \
         last {span}; tower runs {}, cache hits {} misses {}",
        s.run.steps,
        t.elapsed().as_secs_f64(),
        avg(&rewards[..span.min(rewards.len())]),
        avg(&rewards[rewards.len().saturating_sub(span)..]),
        s.encode.tower_forwards,
        s.cache.hits + s.cache.disk_hits,
        s.cache.misses
    );
    let metrics = cfg.output.dir.join("metrics.jsonl");
    let keys: Vec<String> = ["reward_mean", "accuracy", "format_rate", "loss", "entropy"]
        .iter()
        .filter(|k| s.run.records.iter().any(|r| r[**k].is_number()))
        .map(|k| k.to_string())
        .collect();
    crate::plot::plot(
        &metrics,
        &keys,
        &cfg.output.dir.join("metrics.png"),
        900,
        260 * keys.len() as u32,
    )?;
    let (report, swapped) = judge.with_control(&s.run.final_model_dir)?;
    println!(
        "held-out accuracy after GRPO: {} (format {:.0}%); {} with each question asked of another \
         video",
        pct(&report, None),
        100.0 * report.overall.format_rate,
        pct(&swapped, None)
    );
    Ok(Some((report, swapped)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_gives_every_question_another_video() {
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("h.jsonl"), tmp.path().join("s.jsonl"));
        // Videos a, a, b, c, c, c: questions of one video sit next to each other.
        let vids = ["a", "a", "b", "c", "c", "c"];
        let text: String = vids
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{{\"problem_id\":\"p{i}\",\"videos\":[\"{v}.avi\"]}}\n"))
            .collect();
        std::fs::write(&from, text).unwrap();
        swap_videos(&from, &to).unwrap();
        let got: Vec<String> = std::fs::read_to_string(&to)
            .unwrap()
            .lines()
            .map(|l| {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                r["videos"][0]
                    .as_str()
                    .unwrap()
                    .trim_end_matches(".avi")
                    .to_string()
            })
            .collect();
        assert_eq!(got, ["b", "b", "c", "a", "a", "a"]);
    }
}
