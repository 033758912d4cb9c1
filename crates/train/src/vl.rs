//! The vision-language model in training and evaluation: LongVideo-Reason examples
//! ([`reel_data::vl_data`]) through Qwen2.5-VL ([`reel_model::Qwen25VL`]), with each video's
//! merged embeddings from the content-addressed [`EmbedCache`] (encode once, reuse) while the
//! tower is frozen, and through the tower (forward and backward, cache bypassed) when it trains.
//!
//! One example is one sequence (B = 1): tokens [T], next-token targets [T] (−100 off the
//! assistant turn), the example's videos' pixels [Σ t·h·w, C·T_p·p·p], grids and
//! second_per_grid_ts. Loss: the global token mean over an optimizer step's examples.
//!
//! `reel sft` with a Qwen2.5-VL config (`[vl]` table of [`VlSftConfig`]) runs [`run_vl_sft`]:
//! AdamW on the decoder (and on the tower when `vision_freeze = false`), warmup + cosine LR,
//! global-norm clipping, a JSON line per step in `metrics.jsonl` (loss, lr, grad norm, tokens/s,
//! cache hits/misses/bytes, tower forward runs), and a final HF folder. With `sp > 1` (frozen
//! tower) each step runs on in-process ranks: MR-SP stage 1 encodes each video's temporal
//! patches across the ranks ([`SpVisionEncoder`], cache first), every rank takes its token shard
//! of the input embeddings, M-RoPE angles and targets, and the decoder runs with `SpAttention`
//! (DistAttn); gradients and loss sums are all-reduced. A trained tower with `sp > 1` is refused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use reel_comm::InProcess;
use reel_data::{
    load_vl_examples, FrameSampling, Tokenizer, VideoProcessorConfig, VideoSettings, VlExample,
    VlLoadReport, IGNORE_INDEX,
};
use reel_model::embed_cache::{weights_fingerprint, CacheStats, EmbedCache, EmbedKey};
use reel_model::{
    save_vl_checkpoint, CheckpointPolicy, LocalAttention, LossStats, Qwen25VL, VideoBatch,
    VideoGrid, VlBatch,
};
use reel_optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use reel_parallel::{EncodeStats, SpVisionEncoder};
use reel_rollout::{Engine, GenerationParams, Prompt};
use reel_tensor::DType;

use crate::accuracy::{engine_config, AccuracyOptions, AccuracyReport};

/// One example as the model takes it.
pub struct VlInputs {
    pub tokens: Vec<u32>,
    pub targets: Vec<i32>,
    pub pixels: Vec<f32>,
    pub grids: Vec<VideoGrid>,
    pub seconds: Vec<f32>,
    /// Embedding-cache key of each video.
    pub keys: Vec<EmbedKey>,
}

impl VlInputs {
    /// Shifts the loss mask into next-token targets and stacks the videos.
    pub fn new(ex: &VlExample, settings_key: &str, weights: u64) -> Self {
        let ids = &ex.tokens.input_ids;
        let n = ids.len();
        let targets = (0..n)
            .map(|i| {
                if i + 1 < n && ex.tokens.loss_mask[i + 1] {
                    ids[i + 1] as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        let mut pixels = Vec::new();
        let (mut grids, mut seconds, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        for v in &ex.videos {
            let [t, h, w] = v.inputs.video_grid_thw;
            pixels.extend_from_slice(&v.inputs.pixel_values_videos);
            grids.push(VideoGrid { t, h, w });
            seconds.push(v.inputs.second_per_grid_ts as f32);
            keys.push(EmbedKey {
                video: v.content_hash.clone(),
                settings: settings_key.to_string(),
                weights,
            });
        }
        VlInputs {
            tokens: ids.clone(),
            targets,
            pixels,
            grids,
            seconds,
            keys,
        }
    }

    pub fn batch(&self) -> VlBatch<'_> {
        VlBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            b: 1,
            t: self.tokens.len(),
            videos: VideoBatch {
                pixels: &self.pixels,
                grids: &self.grids,
                second_per_grid_ts: &self.seconds,
            },
        }
    }
}

/// Frame sampling from a command-line spelling: `all`, `uniform:N` or `fps:F`.
pub fn parse_sampling(s: &str) -> Result<FrameSampling> {
    if s == "all" {
        return Ok(FrameSampling::All);
    }
    if let Some(n) = s.strip_prefix("uniform:") {
        let frames = n
            .parse()
            .with_context(|| format!("sampling `{s}`: bad frame count"))?;
        return Ok(FrameSampling::Uniform { frames });
    }
    if let Some(f) = s.strip_prefix("fps:") {
        let fps: f64 = f
            .parse()
            .with_context(|| format!("sampling `{s}`: bad fps"))?;
        if !(fps.is_finite() && fps > 0.0) {
            bail!("sampling `{s}`: fps must be positive");
        }
        return Ok(FrameSampling::fps(fps));
    }
    bail!("sampling `{s}`: expected all, uniform:N or fps:F")
}

/// Encodes a whole example's videos through the cache (one rank); returns their merged
/// embeddings [Σ tokens, d] in order.
fn cached_features(
    model: &Qwen25VL,
    enc: &SpVisionEncoder,
    ws: &mut reel_model::VisionWorkspace,
    cache: &EmbedCache,
    inp: &VlInputs,
) -> Result<Vec<f32>> {
    let ws = std::sync::Mutex::new(ws);
    let out = InProcess::spawn(1, std::time::Duration::from_secs(600), |comm| {
        let mut ws = ws.lock().unwrap_or_else(|e| e.into_inner());
        enc.encode_cached(
            &comm,
            &model.vision,
            &mut ws,
            cache,
            &inp.keys,
            &inp.pixels,
            &inp.grids,
            &inp.seconds,
        )
    });
    let embeds = out
        .into_iter()
        .next()
        .expect("one rank")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(embeds.iter().flat_map(|e| e.data.iter().copied()).collect())
}

/// Mean NLL of the target tokens of a LongVideo-Reason file under a Qwen2.5-VL model; bad
/// records and videos are skipped and reported.
pub fn eval_vl_nll(
    model: &Qwen25VL,
    tok: &Tokenizer,
    data: &Path,
    settings: &VideoSettings,
) -> Result<(LossStats, VlLoadReport)> {
    let (examples, report) = load_vl_examples(data, tok, settings, true)?;
    if examples.is_empty() {
        bail!("{}: no usable record", data.display());
    }
    let mut ws = model.workspace(CheckpointPolicy::Layer);
    let mut total = LossStats::default();
    for ex in &examples {
        let inp = VlInputs::new(ex, &settings.key_text(), 0);
        let s = model
            .forward(&mut ws, &inp.batch(), &LocalAttention)
            .with_context(|| ex.origin.clone())?;
        total.loss_sum += s.loss_sum;
        total.n_tokens += s.n_tokens;
    }
    Ok((total, report))
}

/// The rollout-engine prompt of a prompt example ([`load_vl_examples`] with
/// `with_target = false`): its videos' merged embeddings from the content-addressed cache
/// (a miss runs the tower once per video; `weights` is the tower's version in the cache key,
/// [`weights_fingerprint`] of its parameters), scattered into the `<|video_pad|>` rows, with the
/// M-RoPE positions ([`Prompt::vl`]).
pub fn vl_rollout_prompt(
    model: &Qwen25VL,
    cache: &EmbedCache,
    vws: &mut reel_model::VisionWorkspace,
    ex: &VlExample,
    settings_key: &str,
    weights: u64,
) -> Result<Prompt> {
    let inp = VlInputs::new(ex, settings_key, weights);
    let enc = SpVisionEncoder::new();
    let features = cached_features(model, &enc, vws, cache, &inp)?;
    Prompt::vl(model, inp.tokens, &inp.grids, &inp.seconds, &features)
        .with_context(|| ex.origin.clone())
}

/// Greedy answers of a Qwen2.5-VL model to the LongVideo-Reason records of `data` through the
/// rollout engine (prompts prefilled from cached video embeddings, `opts.batch` prompts per
/// engine run), scored like the accuracy reward: accuracy overall and per `problem_type`, and
/// the `<think>/<answer>` format rate. Bad records and videos are skipped and reported.
pub fn eval_vl_accuracy(
    model: &Qwen25VL,
    tok: &Tokenizer,
    data: &Path,
    settings: &VideoSettings,
    cache: &EmbedCache,
    opts: &AccuracyOptions,
) -> Result<(AccuracyReport, VlLoadReport)> {
    let (examples, load) = load_vl_examples(data, tok, settings, false)?;
    if examples.is_empty() {
        bail!("{}: no usable record", data.display());
    }
    let key = settings.key_text();
    let weights = weights_fingerprint(&model.vision.params);
    let mut vws = reel_model::VisionWorkspace::new();
    let mut report = AccuracyReport::default();
    let max_ctx = model.config.text.max_position_embeddings;
    for chunk in examples.chunks(opts.batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|ex| vl_rollout_prompt(model, cache, &mut vws, ex, &key, weights))
            .collect::<Result<Vec<_>>>()?;
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let config = engine_config(chunk.len(), longest, opts.max_new_tokens, max_ctx);
        let mut engine = Engine::new_vl(model, config)?;
        for p in prompts {
            engine.add_request(
                p,
                GenerationParams {
                    max_new_tokens: opts.max_new_tokens,
                    stop_token_ids: opts.stop_token_ids.clone(),
                    ..GenerationParams::default()
                },
            )?;
        }
        for (ex, out) in chunk.iter().zip(engine.run()?) {
            let text = tok.decode(&out.samples[0].ids, true)?;
            report.add(text, &ex.answer, &ex.problem_type, &opts.accuracy);
        }
    }
    Ok((report, load))
}

/// Settings of a VLM SFT run (the `[vl]` table; CLI `reel sft --vl`).
#[derive(Clone, Debug)]
pub struct VlSftConfig {
    /// Qwen2.5-VL checkpoint folder (config.json, safetensors, tokenizer, video preprocessor).
    pub model: PathBuf,
    /// LongVideo-Reason JSONL with reasoning.
    pub data: PathBuf,
    /// Output folder (metrics.jsonl, final model).
    pub out: PathBuf,
    /// Frame sampling; default uniform:8.
    pub sampling: FrameSampling,
    /// Optimizer steps; default 20.
    pub steps: usize,
    /// Examples per optimizer step; default 4.
    pub batch: usize,
    /// Peak learning rate; default 1e-3.
    pub lr: f32,
    /// Warmup steps; default 2.
    pub warmup: usize,
    /// Gradient clipping norm; default 1.0.
    pub clip: f32,
    /// Keep the vision tower fixed and serve its embeddings from the cache; default true.
    pub vision_freeze: bool,
    /// Memory of the embedding cache in bytes; default 1 GiB.
    pub cache_bytes: usize,
    /// Optional folder for the on-disk cache tier; default none.
    pub cache_dir: Option<PathBuf>,
    /// Sequence-parallel ranks; default 1 (more needs the frozen tower, see the module docs).
    pub sp: usize,
    /// Shuffle seed; default 0.
    pub seed: u64,
}

impl VlSftConfig {
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf) -> Self {
        VlSftConfig {
            model,
            data,
            out,
            sampling: FrameSampling::Uniform { frames: 8 },
            steps: 20,
            batch: 4,
            lr: 1e-3,
            warmup: 2,
            clip: 1.0,
            vision_freeze: true,
            cache_bytes: 1 << 30,
            cache_dir: None,
            sp: 1,
            seed: 0,
        }
    }
}

/// What a VLM SFT run did.
#[derive(Clone, Debug)]
pub struct VlSftSummary {
    /// Mean loss of each step.
    pub losses: Vec<f64>,
    pub cache: CacheStats,
    pub encode: EncodeStats,
    /// Distinct videos of the training set.
    pub videos: usize,
    pub skipped_records: usize,
    pub wall_secs: f64,
    pub final_model_dir: PathBuf,
}

/// CoT-SFT of a Qwen2.5-VL model on LongVideo-Reason records (module docs).
pub fn run_vl_sft(cfg: &VlSftConfig) -> Result<VlSftSummary> {
    if cfg.sp > 1 && !cfg.vision_freeze {
        bail!(
            "sequence parallelism (sp = {}) for the vision-language model needs the frozen tower \
             (vision_freeze): the gradient of a sharded encode into a trained tower is not wired \
             into training yet; run with sp = 1 or a frozen tower",
            cfg.sp
        );
    }
    let start = Instant::now();
    let mut model = reel_model::load_vl_checkpoint(&cfg.model)
        .with_context(|| format!("loading {}", cfg.model.display()))?;
    let tok = Tokenizer::from_dir(&cfg.model)?;
    let settings = VideoSettings {
        sampling: cfg.sampling,
        processor: VideoProcessorConfig::from_dir(&cfg.model)?,
    };
    let (examples, report) = load_vl_examples(&cfg.data, &tok, &settings, true)?;
    if examples.is_empty() {
        bail!("{}: no usable record", cfg.data.display());
    }
    let videos = {
        let mut h: Vec<&str> = examples
            .iter()
            .flat_map(|e| e.videos.iter().map(|v| v.content_hash.as_str()))
            .collect();
        h.sort_unstable();
        h.dedup();
        h.len()
    };
    std::fs::create_dir_all(&cfg.out).with_context(|| cfg.out.display().to_string())?;
    let cache = match &cfg.cache_dir {
        Some(d) => EmbedCache::with_dir(cfg.cache_bytes, d)?,
        None => EmbedCache::new(cfg.cache_bytes),
    };
    let enc = SpVisionEncoder::new();
    let settings_key = settings.key_text();
    let mut weights_version = weights_fingerprint(&model.vision.params);
    let adamw = AdamWConfig {
        lr: cfg.lr,
        ..AdamWConfig::default()
    };
    let sizes: Vec<usize> = if cfg.vision_freeze {
        vec![model.lm.params.len()]
    } else {
        vec![model.lm.params.len(), model.vision.params.len()]
    };
    let mut opt = AdamW::new(&sizes, &vec![true; sizes.len()], adamw);
    let schedule = LrSchedule::WarmupCosine {
        warmup_steps: cfg.warmup as u64,
        total_steps: cfg.steps as u64,
        min_lr_ratio: 0.1,
    };
    let mut lm_grads = vec![0.0f32; model.lm.params.len()];
    let mut vis_grads = vec![0.0f32; model.vision.params.len()];
    let mut ws = model.workspace(CheckpointPolicy::Layer);
    let mut vws = reel_model::VisionWorkspace::new();
    let mut metrics = std::fs::File::create(cfg.out.join("metrics.jsonl"))?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = reel_tensor::rng(cfg.seed);
    let mut cursor = order.len();
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let t0 = Instant::now();
        lm_grads.fill(0.0);
        vis_grads.fill(0.0);
        let mut picked = Vec::with_capacity(cfg.batch);
        for _ in 0..cfg.batch.min(examples.len()) {
            if cursor == order.len() {
                use rand::seq::SliceRandom;
                order.shuffle(&mut rng);
                cursor = 0;
            }
            picked.push(order[cursor]);
            cursor += 1;
        }
        let inputs: Vec<VlInputs> = picked
            .iter()
            .map(|&i| VlInputs::new(&examples[i], &settings_key, weights_version))
            .collect();
        let total_tokens: usize = inputs
            .iter()
            .map(|x| x.targets.iter().filter(|&&t| t >= 0).count())
            .sum();
        let scale = 1.0 / total_tokens.max(1) as f32;
        let mut stats = LossStats::default();
        if cfg.sp > 1 {
            stats = sp_step(&model, &enc, &cache, &inputs, scale, cfg.sp, &mut lm_grads)?;
        }
        for (inp, &i) in inputs.iter().zip(&picked).filter(|_| cfg.sp == 1) {
            let origin = &examples[i].origin;
            let s = if cfg.vision_freeze {
                let feats = cached_features(&model, &enc, &mut vws, &cache, inp)?;
                let s = model
                    .forward_with_features(&mut ws, &inp.batch(), &feats, &LocalAttention)
                    .with_context(|| origin.clone())?;
                model
                    .backward_features(&mut lm_grads, &mut ws, &inp.batch(), scale, &LocalAttention)
                    .with_context(|| origin.clone())?;
                s
            } else {
                enc.counters
                    .tower_forwards
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let s = model
                    .forward(&mut ws, &inp.batch(), &LocalAttention)
                    .with_context(|| origin.clone())?;
                model
                    .backward(
                        &mut lm_grads,
                        &mut vis_grads,
                        &mut ws,
                        &inp.batch(),
                        scale,
                        &LocalAttention,
                    )
                    .with_context(|| origin.clone())?;
                s
            };
            stats.loss_sum += s.loss_sum;
            stats.n_tokens += s.n_tokens;
        }
        let loss = stats.mean();
        if !loss.is_finite() {
            bail!("step {step}: loss is not finite ({loss})");
        }
        let lr = schedule.lr_at(cfg.lr, step as u64);
        let grad_norm = if cfg.vision_freeze {
            let n = clip_grad_norm(&mut [&mut lm_grads[..]], cfg.clip);
            opt.step(&mut [&mut model.lm.params[..]], &[&lm_grads[..]], lr);
            n
        } else {
            let n = clip_grad_norm(&mut [&mut lm_grads[..], &mut vis_grads[..]], cfg.clip);
            opt.step(
                &mut [&mut model.lm.params[..], &mut model.vision.params[..]],
                &[&lm_grads[..], &vis_grads[..]],
                lr,
            );
            // The tower changed: embeddings of the old weights must not be served.
            weights_version = weights_version.wrapping_add(1);
            n
        };
        let secs = t0.elapsed().as_secs_f64();
        let c = cache.stats();
        let e = enc.counters.snapshot();
        let line = serde_json::json!({
            "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_sec": stats.n_tokens as f64 / secs,
            "cache_hits": c.hits + c.disk_hits, "cache_misses": c.misses,
            "cache_bytes": c.bytes, "cache_evictions": c.evictions,
            "tower_forwards": e.tower_forwards,
        });
        use std::io::Write;
        writeln!(metrics, "{line}")?;
        tracing::info!(
            "step {:>3}  loss {loss:.4}  lr {lr:.2e}  cache hits {} misses {}  tower runs {}",
            step + 1,
            c.hits + c.disk_hits,
            c.misses,
            e.tower_forwards
        );
        losses.push(loss);
    }
    let final_model_dir = cfg.out.join("final");
    save_vl_checkpoint(&model, &final_model_dir, DType::F32, usize::MAX)?;
    tok.save(&final_model_dir)?;
    for f in ["video_preprocessor_config.json", "preprocessor_config.json"] {
        let src = cfg.model.join(f);
        if src.is_file() {
            std::fs::copy(&src, final_model_dir.join(f))?;
        }
    }
    Ok(VlSftSummary {
        losses,
        cache: cache.stats(),
        encode: enc.counters.snapshot(),
        videos,
        skipped_records: report.bad_records.len() + report.skipped_videos.len(),
        wall_secs: start.elapsed().as_secs_f64(),
        final_model_dir,
    })
}

/// One step's forward and backward on `p` in-process sequence-parallel ranks with the tower
/// frozen: each example's videos through the stage-1 encode (temporal patches split over the
/// ranks, embeddings all-gathered, the cache consulted first), then every rank takes its token
/// shard of the input embeddings, M-RoPE angles and targets and runs the decoder with
/// `SpAttention` (DistAttn); decoder gradients and loss sums are all-reduced. Adds the summed
/// decoder gradients to `lm_grads` and returns the step's loss stats.
fn sp_step(
    model: &Qwen25VL,
    enc: &SpVisionEncoder,
    cache: &EmbedCache,
    inputs: &[VlInputs],
    scale: f32,
    p: usize,
    lm_grads: &mut [f32],
) -> Result<LossStats> {
    use reel_comm::Communicator;
    use reel_model::{EmbedsBatch, Rotary, Workspace};
    use reel_parallel::{Overlap, ScheduleKind, SpAttention};
    let c = &model.config.text;
    let (d, half) = (c.hidden_size, c.head_dim / 2);
    let vid = model.config.video_token_id;
    let results = InProcess::spawn(p, std::time::Duration::from_secs(600), |comm| {
        let rank = comm.rank();
        let enc_comm = comm.split(0, rank)?;
        let schedule = ScheduleKind::DistAttnCausal
            .build(p)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let sp = SpAttention::new(comm, schedule, Overlap::Overlapped)?;
        let mut vws = reel_model::VisionWorkspace::new();
        let mut vl_ws = model.workspace(CheckpointPolicy::Layer);
        let mut ws = Workspace::new(c, CheckpointPolicy::Layer);
        let mut grads = vec![0.0f32; model.lm.params.len()];
        let mut sums = [0.0f32; 2];
        for inp in inputs {
            let embeds = enc.encode_cached(
                &enc_comm,
                &model.vision,
                &mut vws,
                cache,
                &inp.keys,
                &inp.pixels,
                &inp.grids,
                &inp.seconds,
            )?;
            let feats: Vec<f32> = embeds.iter().flat_map(|e| e.data.iter().copied()).collect();
            model.prepare_with_features(&mut vl_ws, &inp.batch(), &feats)?;
            let (emb, cos, sin) = Qwen25VL::prepared(&vl_ws);
            let t = inp.tokens.len();
            let sh = sp.set_seq_len(t)?;
            let l_emb = sh.shard(emb, 1, d, rank, 0.0)?;
            let l_cos = sh.shard(cos, 1, half, rank, 1.0)?;
            let l_sin = sh.shard(sin, 1, half, rank, 0.0)?;
            let l_tgt = sh.shard(&inp.targets, 1, 1, rank, IGNORE_INDEX)?;
            // Video rows and padding take no embedding-table gradient (the tower is frozen).
            let l_tok = sh.shard(&inp.tokens, 1, 1, rank, vid)?;
            let eb = EmbedsBatch {
                embeds: &l_emb,
                targets: &l_tgt,
                rotary: Rotary::Angles {
                    cos: &l_cos,
                    sin: &l_sin,
                },
                b: 1,
                t: sh.local_len(),
            };
            let st = model.lm.forward_embeds(&mut ws, &eb, &sp)?;
            let dx = model
                .lm
                .backward_embeds(&mut grads, &mut ws, &eb, scale, &sp)?
                .to_vec();
            model.text_embedding_backward(&mut grads, &dx, &l_tok)?;
            sums[0] += st.loss_sum as f32;
            sums[1] += st.n_tokens as f32;
        }
        sp.with_comm(|c| -> Result<(), reel_comm::CommError> {
            c.all_reduce_sum(&mut grads)?;
            c.all_reduce_sum(&mut sums)
        })?;
        Ok::<_, anyhow::Error>((grads, sums))
    });
    let mut out = None;
    for (r, res) in results.into_iter().enumerate() {
        let (g, sums) = res.with_context(|| format!("sequence-parallel rank {r}"))?;
        if out.is_none() {
            out = Some((g, sums));
        }
    }
    let (g, sums) = out.context("no rank ran")?;
    lm_grads.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
    Ok(LossStats {
        loss_sum: sums[0] as f64,
        n_tokens: sums[1].round() as usize,
    })
}

/// Writes a tiny random Qwen2.5-VL folder for demos and tests: config.json and weights (decoder
/// of `Qwen2Config::tiny`, tower of `VisionConfig::tiny`), a character tokenizer with the vision
/// special tokens, and a video_preprocessor_config.json that keeps 56×56 frames as they are.
pub fn write_tiny_vl_model(dir: &Path, seed: u64) -> Result<()> {
    write_tiny_vl_model_with(dir, seed, 1024, 56)
}

/// [`write_tiny_vl_model`] with the decoder's `max_position_embeddings` and the square frame
/// side (pixels, a multiple of 28) the preprocessor keeps (long videos make long prompts).
pub fn write_tiny_vl_model_with(
    dir: &Path,
    seed: u64,
    max_positions: usize,
    frame_side: usize,
) -> Result<()> {
    write_vl_model(dir, seed, 64, 2, max_positions, frame_side)
}

/// [`write_tiny_vl_model_with`] with a decoder of width `hidden` (a multiple of 32: heads of
/// 16, half as many key/value heads, MLP 11/4 as wide) and `layers` layers; the tower's output
/// width follows `hidden`.
pub fn write_vl_model(
    dir: &Path,
    seed: u64,
    hidden: usize,
    layers: usize,
    max_positions: usize,
    frame_side: usize,
) -> Result<()> {
    if frame_side == 0 || !frame_side.is_multiple_of(28) {
        bail!("frame side {frame_side} must be a positive multiple of 28 (patch 14, merge 2)");
    }
    use reel_model::vision::VisionLayout;
    use reel_model::{Qwen25VLConfig, Qwen2Config, VisionConfig};
    if hidden == 0 || !hidden.is_multiple_of(32) || layers == 0 {
        bail!("a VLM of width {hidden} and {layers} layers: the width must be a positive multiple of 32");
    }
    let tok = reel_data::char_tokenizer_with(&reel_data::VISION_SPECIAL_TOKENS);
    let id = |t: &str| tok.token_to_id(t).context("tokenizer lacks a vision token");
    let mut text = Qwen2Config::tiny(tok.vocab_size().next_multiple_of(8));
    text.hidden_size = hidden;
    text.num_attention_heads = hidden / 16;
    text.num_key_value_heads = hidden / 32;
    text.intermediate_size = hidden * 11 / 4;
    text.num_hidden_layers = layers;
    text.tie_word_embeddings = false;
    text.eos_token_id = tok.eos_token_id();
    text.max_position_embeddings = max_positions;
    let mut vision = VisionConfig::tiny();
    vision.out_hidden_size = hidden;
    let config = Qwen25VLConfig {
        text: text.clone(),
        vision,
        mrope_section: [2, 3, 3],
        image_token_id: id("<|image_pad|>")?,
        video_token_id: id("<|video_pad|>")?,
        vision_start_token_id: id("<|vision_start|>")?,
        vision_end_token_id: id("<|vision_end|>")?,
    };
    let lm = reel_model::Qwen2::new_random(text, seed)?;
    let layout = VisionLayout::new(&config.vision);
    let mut rng = reel_tensor::rng(seed ^ 0x5eed);
    let mut vis = reel_tensor::uniform_vec(&mut rng, layout.total(), 0.05);
    let norms = layout
        .blocks
        .iter()
        .flat_map(|b| [b.norm1.clone(), b.norm2.clone()])
        .chain([layout.ln_q.clone()]);
    for r in norms {
        vis[r].iter_mut().for_each(|x| *x = 1.0);
    }
    let model = Qwen25VL::from_params(config, lm.params, vis)?;
    save_vl_checkpoint(&model, dir, DType::F32, usize::MAX)?;
    tok.save(dir)?;
    let proc = serde_json::json!({
        "size": {"shortest_edge": frame_side * frame_side, "longest_edge": frame_side * frame_side},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    });
    std::fs::write(
        dir.join("video_preprocessor_config.json"),
        serde_json::to_string_pretty(&proc)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_data::{write_synth_dataset, SynthVideoConfig};

    fn setup(tmp: &Path) -> (PathBuf, PathBuf) {
        let model = tmp.join("model");
        write_tiny_vl_model(&model, 1).unwrap();
        let data = tmp.join("data");
        let cfg = SynthVideoConfig {
            videos: 6,
            frames: 8,
            width: 56,
            height: 56,
            held_out: 0.0,
            ..Default::default()
        };
        write_synth_dataset(&cfg, &data).unwrap();
        (model, data.join("train.jsonl"))
    }

    #[test]
    fn cot_sft_on_synthetic_video_lowers_the_loss_and_encodes_each_video_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path());
        let mut cfg = VlSftConfig::new(model.clone(), data.clone(), tmp.path().join("run"));
        cfg.steps = 12;
        cfg.batch = 3;
        cfg.lr = 3e-3;
        cfg.sampling = FrameSampling::Uniform { frames: 8 };
        let before = reel_model::load_vl_checkpoint(&model).unwrap();
        let s = run_vl_sft(&cfg).unwrap();
        let first = s.losses[..2].iter().sum::<f64>() / 2.0;
        let last = s.losses[s.losses.len() - 2..].iter().sum::<f64>() / 2.0;
        assert!(
            last < 0.8 * first,
            "loss {first:.3} → {last:.3}: {:?}",
            s.losses
        );
        // Frozen tower: one tower run per distinct video, every later use is a cache hit.
        assert_eq!(s.videos, 6);
        assert_eq!(s.encode.tower_forwards, 6, "{:?}", s.encode);
        assert_eq!(s.cache.misses, 6);
        assert_eq!(s.cache.hits, 12 * 3 - 6);
        // The saved folder evaluates.
        let m = reel_model::load_vl_checkpoint(&s.final_model_dir).unwrap();
        assert_eq!(m.vision.params, before.vision.params, "frozen tower moved");
        assert_ne!(m.lm.params, before.lm.params);
        let tok = Tokenizer::from_dir(&s.final_model_dir).unwrap();
        let settings = VideoSettings {
            sampling: cfg.sampling,
            processor: VideoProcessorConfig::from_dir(&s.final_model_dir).unwrap(),
        };
        let (st, _) = eval_vl_nll(&m, &tok, &data, &settings).unwrap();
        assert!(st.mean() < first, "{} vs {first}", st.mean());
    }

    #[test]
    fn vl_accuracy_answers_are_greedy_full_recomputation_and_videos_encode_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (model_dir, data) = setup(tmp.path());
        let m = reel_model::load_vl_checkpoint(&model_dir).unwrap();
        let tok = Tokenizer::from_dir(&model_dir).unwrap();
        let settings = VideoSettings {
            sampling: FrameSampling::Uniform { frames: 8 },
            processor: VideoProcessorConfig::from_dir(&model_dir).unwrap(),
        };
        let eos = tok.eos_token_id().unwrap();
        let opts = AccuracyOptions {
            max_new_tokens: 12,
            batch: 4,
            stop_token_ids: vec![eos],
            ..AccuracyOptions::default()
        };
        let cache = EmbedCache::new(1 << 26);
        let (report, load) = eval_vl_accuracy(&m, &tok, &data, &settings, &cache, &opts).unwrap();
        assert_eq!(load.bad_records.len() + load.skipped_videos.len(), 0);
        assert_eq!(report.overall.total, 6);
        assert_eq!(report.per_type.values().map(|t| t.total).sum::<usize>(), 6);
        assert_eq!(cache.stats().misses, 6, "one tower run per video");
        // Each answer is the greedy continuation by full recomputation (tower on the pixels).
        let (examples, _) = load_vl_examples(&data, &tok, &settings, false).unwrap();
        let mut ws = m.workspace(CheckpointPolicy::None);
        let v = m.config.text.vocab_size;
        let mut want = AccuracyReport::default();
        for (ex, got) in examples.iter().zip(&report.responses) {
            let inp = VlInputs::new(ex, "", 0);
            let mut seq = inp.tokens.clone();
            for _ in 0..opts.max_new_tokens {
                let targets = vec![IGNORE_INDEX; seq.len()];
                let batch = VlBatch {
                    tokens: &seq,
                    targets: &targets,
                    t: seq.len(),
                    ..inp.batch()
                };
                let logits = m.logits(&mut ws, &batch, &LocalAttention).unwrap();
                let last = &logits[logits.len() - v..];
                let best = (0..v).fold(0, |b, i| if last[i] > last[b] { i } else { b }) as u32;
                seq.push(best);
                if best == eos {
                    break;
                }
            }
            let text = tok.decode(&seq[inp.tokens.len()..], true).unwrap();
            assert_eq!(got, &text, "{}", ex.origin);
            want.add(text, &ex.answer, &ex.problem_type, &opts.accuracy);
        }
        assert_eq!(report.overall, want.overall);
        assert_eq!(report.per_type, want.per_type);
        // A second evaluation is served from the cache.
        eval_vl_accuracy(&m, &tok, &data, &settings, &cache, &opts).unwrap();
        assert_eq!(cache.stats().misses, 6);
        assert!(cache.stats().hits >= 6);
    }

    #[test]
    fn a_trained_tower_bypasses_the_cache_and_gets_gradients() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path());
        let before = reel_model::load_vl_checkpoint(&model).unwrap();
        let mut cfg = VlSftConfig::new(model, data, tmp.path().join("run"));
        cfg.steps = 2;
        cfg.batch = 2;
        cfg.vision_freeze = false;
        let s = run_vl_sft(&cfg).unwrap();
        assert_eq!(s.cache.hits + s.cache.misses, 0);
        assert_eq!(s.encode.tower_forwards, 4);
        let after = reel_model::load_vl_checkpoint(&s.final_model_dir).unwrap();
        assert_ne!(before.vision.params, after.vision.params);
        // sp > 1 is refused with a clear message.
        cfg.sp = 2;
        let e = run_vl_sft(&cfg).unwrap_err().to_string();
        assert!(e.contains("sp = 2"), "{e}");
    }

    #[test]
    fn sequence_parallel_sft_follows_the_single_rank_loss_curve() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path());
        let run = |sp: usize| {
            let mut cfg = VlSftConfig::new(
                model.clone(),
                data.clone(),
                tmp.path().join(format!("sp{sp}")),
            );
            cfg.steps = 4;
            cfg.batch = 3;
            cfg.lr = 3e-3;
            cfg.sp = sp;
            run_vl_sft(&cfg).unwrap()
        };
        let one = run(1);
        for sp in [2, 3] {
            let s = run(sp);
            for (k, (a, b)) in one.losses.iter().zip(&s.losses).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4 * a.abs(),
                    "sp {sp} step {k}: {a} vs {b}"
                );
            }
            // The stage-1 encode ran on every rank once per distinct video batch.
            assert!(s.encode.tower_forwards > 0);
            assert_eq!(s.cache.misses, (sp * 6) as u64, "{:?}", s.cache);
        }
    }
}
