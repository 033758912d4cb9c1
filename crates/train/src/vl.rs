//! The vision-language model in training and evaluation: LongVideo-Reason examples
//! ([`reel_data::vl_data`]) through Qwen2.5-VL ([`reel_model::Qwen25VL`]), with each video's
//! merged embeddings from the content-addressed [`EmbedCache`] (encode once, reuse) while the
//! tower is frozen, and through the tower (forward and backward, cache bypassed) when it trains.
//!
//! One example is one sequence (B = 1): tokens [T], next-token targets [T] (−100 off the
//! assistant turn), the example's videos' pixels [Σ t·h·w, C·T_p·p·p], grids and
//! second_per_grid_ts. Loss: the global token mean over an optimizer step's examples.
//!
//! Training is the one SFT trainer's ([`crate::sft`], `reel sft --config`): [`VlTask`] is the
//! vision-language family of its loop, chosen when `model.path` is a Qwen2.5-VL checkpoint
//! (config.json `model_type` = `qwen2_5_vl`), with the `[video]` table of [`SftConfig`]. It runs
//! on in-process ranks (`[parallel] dp × sp`, a world of one by default): MR-SP stage 1 encodes
//! each video's temporal patches across the rank's sp group ([`SpVisionEncoder`], cache first
//! with a frozen tower), every rank takes its token shard of the input embeddings, M-RoPE
//! angles and targets through the decoder with `SpAttention`, and with a trained tower the
//! video rows' ∂L/∂features are all-gathered from the shards and each rank runs the tower's
//! backward of its own frames; the loop's all-reduce sums every gradient. [`run_vl_sft`] is
//! the same trainer behind the older [`VlSftConfig`] settings (`reel sft --vl-model`).
//!
//! On the GPU (`train.device`, frozen tower only) the decoder lives on the device
//! ([`crate::device::GpuModel`]): per record the features still come from the cache on the CPU,
//! the input embeddings and M-RoPE angles are prepared and sharded on the host as above, and the
//! rank's shard goes through `forward_embeds`/`backward_embeds` (text rows from the device's
//! embedding table, which also takes their gradient there).

use std::borrow::Cow;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use reel_comm::{Communicator, InProcess};
use reel_data::video::Prefetcher;
use reel_data::{
    load_vl_plans, stream_vl_examples, BucketSampler, FrameSampling, TokenizedExample, Tokenizer,
    VideoProcessor, VideoProcessorConfig, VideoSettings, VlExample, VlLoadReport, VlRecordPlan,
    IGNORE_INDEX,
};
use reel_model::embed_cache::{weights_fingerprint, CacheStats, EmbedCache, EmbedKey};
use reel_model::vl::vl_model_files;
use reel_model::{
    load_vl_checkpoint, save_vl_checkpoint, AttentionOp, CheckpointPolicy, CpuTower, EmbedsBatch,
    LocalAttention, LossStats, Qwen2, Qwen25VL, Rotary, TowerForward, VideoBatch, VideoGrid,
    VlBatch, VlWorkspace,
};
use reel_parallel::{EncodeStats, SpVisionEncoder, VisionSpError};
use reel_rollout::{GenerationParams, Prompt};
use reel_tensor::DType;

use crate::accuracy::{engine_config, AccuracyOptions, AccuracyReport};
use crate::config::{ModelKind, SftConfig, VideoConfig};
use crate::device::{GpuEmbedsBatch, GpuModel};
use crate::sft::{
    param_checksum, param_checksum_from, run_sft, split_sizes, tokenizer_files, Peers, RunOptions,
    SftTask,
};
use crate::vl_prefetch::{
    record_prefetcher, DecodeCtx, FailedRecords, FeedStats, FetchedRecord, ReplicaFeed,
    ReplicaOrder,
};

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
        let mut inp = Self::without_pixels(ex, settings_key, weights);
        inp.pixels = video_pixels(ex).into_owned();
        inp
    }

    /// [`VlInputs::new`] but for the pixels, left empty: for passes that take the videos'
    /// features from elsewhere (the embedding cache, a sequence-parallel encode), which read
    /// the pixels through [`video_pixels`] when they need them.
    pub fn without_pixels(ex: &VlExample, settings_key: &str, weights: u64) -> Self {
        let ids = &ex.tokens.input_ids;
        let targets = next_token_targets(&ex.tokens);
        let (mut grids, mut seconds, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        for v in &ex.videos {
            let [t, h, w] = v.inputs.video_grid_thw;
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
            pixels: Vec::new(),
            grids,
            seconds,
            keys,
        }
    }

    /// A planned record's inputs ([`VlRecordPlan`]: tokens, grids, seconds) with the pixels and
    /// cache keys of its fetched videos.
    pub(crate) fn from_plan(plan: &VlRecordPlan, pixels: Vec<f32>, keys: Vec<EmbedKey>) -> Self {
        let (grids, seconds) = plan
            .videos
            .iter()
            .map(|v| {
                let [t, h, w] = v.plan.video_grid_thw;
                (VideoGrid { t, h, w }, v.plan.second_per_grid_ts as f32)
            })
            .unzip();
        VlInputs {
            tokens: plan.tokens.input_ids.clone(),
            targets: next_token_targets(&plan.tokens),
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

/// The loss mask shifted into next-token targets (−100 where the next token is unlabelled).
fn next_token_targets(ex: &TokenizedExample) -> Vec<i32> {
    let (ids, n) = (&ex.input_ids, ex.input_ids.len());
    (0..n)
        .map(|i| {
            if i + 1 < n && ex.loss_mask[i + 1] {
                ids[i + 1] as i32
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// The pixels of an example's videos, one after another [Σ t·h·w, C·T_p·p·p]: borrowed when it
/// has one video, stacked when it has several.
pub fn video_pixels(ex: &VlExample) -> Cow<'_, [f32]> {
    match ex.videos.as_slice() {
        [v] => Cow::Borrowed(&v.inputs.pixel_values_videos),
        vs => Cow::Owned(
            vs.iter()
                .flat_map(|v| v.inputs.pixel_values_videos.iter().copied())
                .collect(),
        ),
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

/// Mean NLL of the target tokens of a LongVideo-Reason file under a Qwen2.5-VL model; bad
/// records and videos are skipped and reported.
pub fn eval_vl_nll(
    model: &Qwen25VL,
    tok: &Tokenizer,
    data: &Path,
    settings: &VideoSettings,
) -> Result<(LossStats, VlLoadReport)> {
    // Records decoded ahead on worker threads, a few at a time: the set need not fit in memory.
    let mut ws = model.workspace(CheckpointPolicy::Layer);
    let mut total = LossStats::default();
    let mut seen = 0usize;
    let report =
        stream_vl_examples::<anyhow::Error>(data, tok, settings, true, EVAL_WORKERS, 4, |ex| {
            seen += 1;
            let s = eval_one(model, &mut ws, &ex)?;
            total.loss_sum += s.loss_sum;
            total.n_tokens += s.n_tokens;
            Ok(())
        })?;
    if seen == 0 {
        bail!("{}: no usable record", data.display());
    }
    Ok((total, report))
}

/// What the device messages call greedy VLM evaluation.
const GREEDY_VL: &str = "greedy answers";

/// Worker threads that decode an evaluation's videos ahead of the model.
const EVAL_WORKERS: usize = 2;

/// Target NLL (sum and count) of one prepared record, the tower run on its videos.
fn eval_one(model: &Qwen25VL, ws: &mut VlWorkspace, ex: &VlExample) -> Result<LossStats> {
    let inp = VlInputs::new(ex, "", 0);
    model
        .forward(ws, &inp.batch(), &LocalAttention)
        .with_context(|| ex.origin.clone())
}

/// Encodes a whole example's videos through the cache (one rank, `tower`: the CPU tower or its
/// GPU copy); returns their merged embeddings [Σ tokens, d] in order.
fn cached_features(
    tower: &mut (dyn TowerForward + Send),
    enc: &SpVisionEncoder,
    cache: &EmbedCache,
    inp: &VlInputs,
) -> Result<Vec<f32>> {
    let tower = std::sync::Mutex::new(tower);
    let out = InProcess::spawn(1, std::time::Duration::from_secs(600), |comm| {
        let mut tower = tower.lock().unwrap_or_else(|e| e.into_inner());
        enc.encode_cached_on(
            &comm,
            &mut **tower,
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

/// The rollout-engine prompt of a prompt example ([`load_vl_examples`] with
/// `with_target = false`): its videos' merged embeddings from the content-addressed cache
/// (a miss runs `tower` once per video: `model.vision` as a [`CpuTower`], or its GPU copy;
/// `weights` is the tower's version in the cache key,
/// [`weights_fingerprint`] of its parameters), scattered into the `<|video_pad|>` rows, with the
/// M-RoPE positions ([`Prompt::vl`]).
pub fn vl_rollout_prompt(
    model: &Qwen25VL,
    cache: &EmbedCache,
    tower: &mut (dyn TowerForward + Send),
    ex: &VlExample,
    settings_key: &str,
    weights: u64,
) -> Result<Prompt> {
    let inp = VlInputs::new(ex, settings_key, weights);
    let enc = SpVisionEncoder::new();
    let features = cached_features(tower, &enc, cache, &inp)?;
    Prompt::vl(model, inp.tokens, &inp.grids, &inp.seconds, &features)
        .with_context(|| ex.origin.clone())
}

/// Greedy answers of a Qwen2.5-VL model to the LongVideo-Reason records of `data` through the
/// rollout engine (prompts prefilled from cached video embeddings, `opts.batch` prompts per
/// engine run), scored like the accuracy reward: accuracy overall and per `problem_type`, and
/// the `<think>/<answer>` format rate. Bad records and videos are skipped and reported. The
/// language model decodes where `opts.device` says; with the decoder on the GPU the tower
/// encodes there too (bf16, or f32 with `opts.gpu_f32`), else on the CPU.
pub fn eval_vl_accuracy(
    model: &Qwen25VL,
    tok: &Tokenizer,
    data: &Path,
    settings: &VideoSettings,
    cache: &EmbedCache,
    opts: &AccuracyOptions,
) -> Result<(AccuracyReport, VlLoadReport)> {
    let key = settings.key_text();
    let weights = weights_fingerprint(&model.vision.params);
    let mut vws = reel_model::VisionWorkspace::new();
    let mut decoder = opts.decoder(&model.lm)?;
    let gpu_tower = decoder.as_ref().and_then(|_| {
        let mode = if opts.gpu_f32 {
            crate::config::GpuTowerMode::F32
        } else {
            crate::config::GpuTowerMode::Bf16
        };
        crate::device::gpu_tower(mode, &model.vision, GREEDY_VL)
    });
    let mut report = AccuracyReport {
        device: crate::device::rollout_device(decoder.as_ref()).into(),
        ..AccuracyReport::default()
    };
    let max_ctx = model.config.text.max_position_embeddings;
    // Records decoded ahead on worker threads; one engine run per `opts.batch` of them.
    let batch = opts.batch.max(1);
    let mut chunk: Vec<VlExample> = Vec::with_capacity(batch);
    let mut seen = 0usize;
    let mut run = |chunk: &mut Vec<VlExample>, report: &mut AccuracyReport| -> Result<()> {
        let prompts = chunk
            .iter()
            .map(|ex| {
                let (mut boxed, mut cpu);
                let tower: &mut (dyn TowerForward + Send) = match &gpu_tower {
                    Some(t) => {
                        boxed = t.forward();
                        &mut *boxed
                    }
                    None => {
                        cpu = CpuTower {
                            tower: &model.vision,
                            ws: &mut vws,
                        };
                        &mut cpu
                    }
                };
                vl_rollout_prompt(model, cache, tower, ex, &key, weights)
            })
            .collect::<Result<Vec<_>>>()?;
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let config = engine_config(chunk.len(), longest, opts.max_new_tokens, max_ctx);
        let mut engine = crate::device::rollout_engine(decoder.as_mut(), &model.lm, config)?;
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
        chunk.clear();
        Ok(())
    };
    let load = stream_vl_examples::<anyhow::Error>(
        data,
        tok,
        settings,
        false,
        EVAL_WORKERS,
        batch,
        |ex| {
            seen += 1;
            chunk.push(ex);
            if chunk.len() == batch {
                run(&mut chunk, &mut report)?;
            }
            Ok(())
        },
    )?;
    if !chunk.is_empty() {
        run(&mut chunk, &mut report)?;
    }
    if seen == 0 {
        bail!("{}: no usable record", data.display());
    }
    Ok((report, load))
}

/// Settings of a VLM SFT run in the older flat form (CLI `reel sft --vl-model`), mapped onto an
/// [`SftConfig`] by [`VlSftConfig::to_sft_config`].
#[derive(Clone, Debug)]
pub struct VlSftConfig {
    /// Qwen2.5-VL checkpoint folder (config.json, safetensors, tokenizer, video preprocessor).
    pub model: PathBuf,
    /// LongVideo-Reason JSONL with reasoning.
    pub data: PathBuf,
    /// Output folder (config.toml, metrics.jsonl, checkpoints/).
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
    /// Sequence-parallel ranks; default 1.
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
    /// Records skipped: malformed, or with a missing or undecodable video.
    pub skipped_records: usize,
    pub wall_secs: f64,
    /// The last checkpoint: a Qwen2.5-VL HF folder with tokenizer and preprocessor config.
    pub final_model_dir: PathBuf,
}

impl VlSftConfig {
    /// The same run as an [`SftConfig`] (what `run_vl_sft` trains): `batch` records per step
    /// as `train.grad_accum`, warmup + cosine to 0.1 × `lr`, a checkpoint after the last step.
    pub fn to_sft_config(&self) -> SftConfig {
        let mut c = SftConfig::default();
        c.model.path = Some(self.model.clone());
        c.data.train = self.data.clone();
        // Records are never cut short here (one record per micro-batch).
        c.data.max_len = 1 << 24;
        c.data.tokens_per_batch = 1 << 24;
        c.data.seed = self.seed;
        c.train.steps = self.steps as u64;
        c.train.grad_accum = self.batch as u32;
        c.train.lr = self.lr;
        c.train.warmup_steps = self.warmup as u64;
        c.train.grad_clip = self.clip;
        c.parallel.sp = self.sp;
        c.output.dir = self.out.clone();
        c.output.save_every = 0;
        c.video = VideoConfig {
            sampling: sampling_text(&self.sampling),
            train_vision: !self.vision_freeze,
            cache_mb: (self.cache_bytes >> 20).max(1),
            cache_dir: self.cache_dir.clone(),
            ..VideoConfig::default()
        };
        c
    }
}

/// The spelling [`parse_sampling`] reads.
pub fn sampling_text(s: &FrameSampling) -> String {
    match s {
        FrameSampling::All => "all".to_string(),
        FrameSampling::Uniform { frames } => format!("uniform:{frames}"),
        FrameSampling::Fps { fps, .. } => format!("fps:{fps}"),
    }
}

/// CoT-SFT of a Qwen2.5-VL model on LongVideo-Reason records: [`VlSftConfig::to_sft_config`]
/// trained by [`run_sft`] (checkpoints under `out/checkpoints/`, the last one the final model).
/// As this entry point always did, a fresh run replaces an earlier run's results in `out`
/// (its `checkpoints/` folder goes, with a warning); resuming is `run_sft`'s.
pub fn run_vl_sft(cfg: &VlSftConfig) -> Result<VlSftSummary> {
    let start = Instant::now();
    let sft = cfg.to_sft_config();
    if sft.model_kind()? != ModelKind::Qwen25VL {
        bail!(
            "{}: config.json does not name model_type qwen2_5_vl",
            cfg.model.display()
        );
    }
    let old = cfg.out.join("checkpoints");
    if old.is_dir() {
        tracing::warn!(
            "replacing the earlier run's checkpoints in {}",
            old.display()
        );
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    let s = run_sft(&sft, RunOptions::default())?;
    let v = s
        .video
        .context("a vision-language run reports video counters")?;
    Ok(VlSftSummary {
        losses: s.losses.iter().map(|&x| x as f64).collect(),
        cache: v.cache,
        encode: v.encode,
        videos: v.videos,
        skipped_records: v.skipped_records + v.skipped_videos,
        wall_secs: start.elapsed().as_secs_f64(),
        final_model_dir: s.final_model_dir,
    })
}

/// Video counters of a vision-language SFT run.
#[derive(Clone, Debug, Default)]
pub struct VideoRunStats {
    /// The embedding cache (shared by every rank).
    pub cache: CacheStats,
    /// The stage-1 encoder: tower runs, videos encoded and served from the cache.
    pub encode: EncodeStats,
    /// Distinct videos (paths) of the training set.
    pub videos: usize,
    /// Malformed records skipped (training and held-out files).
    pub skipped_records: usize,
    /// Records skipped for a missing or undecodable video: at load (the file missing or its
    /// container unreadable), or when first decoded (a frame that does not decode), each
    /// record counted once.
    pub skipped_videos: usize,
    /// Records skipped because `data.max_len` would cut a video's tokens or leave no target.
    pub skipped_long: usize,
    /// The video feed: videos decoded, cache hits not decoded, the most held at once, the lead
    /// rank's wait for data.
    pub prefetch: FeedStats,
}

/// The vision-language family of the SFT loop ([`crate::sft`]): Qwen2.5-VL on LongVideo-Reason
/// records, one record per micro-batch (B = 1). Per record on each rank: the videos' merged
/// embeddings from MR-SP stage 1 over the rank's sequence-parallel group (frozen tower: through
/// the cache, a video encoded once; trained tower: encoded every time), the input embeddings
/// and M-RoPE angles, this rank's token shard of them through the decoder (`SpAttention` when
/// sp > 1), then backward: embedding-table rows for text tokens, and for a trained tower the
/// video rows' ∂L/∂features gathered from every shard into the tower's backward of this rank's
/// frames. The loop's world all-reduce sums decoder and tower gradients over ranks.
///
/// Records hold tokens and video plans only; pixels come from each data-parallel replica's
/// [`ReplicaFeed`] ([`crate::vl_prefetch`]), decoded `video.prefetch_workers` threads ahead in
/// the sampler's order (a cached video not decoded at all), shared by the replica's sp ranks.
/// A record whose video fails to decode there is dropped from its step (warned about and
/// counted once; the step's loss is the mean over the other records' tokens).
pub(crate) struct VlTask {
    train: Arc<Vec<VlRecordPlan>>,
    eval_set: Option<Vec<VlRecordPlan>>,
    settings: VideoSettings,
    train_vision: bool,
    cache: Arc<EmbedCache>,
    enc: SpVisionEncoder,
    /// Fingerprint of the frozen tower's weights (part of the cache key), taken on first use.
    weights: OnceLock<u64>,
    /// `video.prefetch_workers`, `video.prefetch_depth`.
    prefetch: (usize, usize),
    /// The decoder shared by the feeds and evaluation, and one feed per data-parallel replica;
    /// made by [`SftTask::follow_sampler`].
    decode: OnceLock<Arc<DecodeCtx>>,
    feeds: OnceLock<Vec<ReplicaFeed>>,
    /// Records skipped when their video failed to decode (training and eval).
    failed: FailedRecords,
    /// The source folder's preprocessor config files, carried into every checkpoint.
    processor_files: Vec<(String, Vec<u8>)>,
    stats: VideoRunStats,
    /// `video.gpu_tower`, and the frozen tower's device copy, made by the first GPU step (shared
    /// by the run's ranks; `None`: the CPU tower encodes).
    gpu_tower_mode: crate::config::GpuTowerMode,
    gpu_tower: OnceLock<Option<crate::device::GpuTower>>,
}

/// One micro-batch: its records, and the labelled tokens this rank dropped from it.
pub(crate) struct VlMicro {
    records: Vec<usize>,
    dropped: Cell<usize>,
}

/// `tokens` cut to `max_len`, or false when it cannot be (a video's placeholder run would be
/// cut, or no target token would remain).
fn fit_to_len(tokens: &mut TokenizedExample, max_len: usize, video_token: u32) -> bool {
    let ids = &tokens.input_ids;
    if ids.len() <= max_len {
        return true;
    }
    if ids[max_len..].contains(&video_token) {
        return false;
    }
    tokens.input_ids.truncate(max_len);
    tokens.loss_mask.truncate(max_len);
    tokens.loss_mask.iter().skip(1).any(|&m| m)
}

impl VlTask {
    /// Reads a LongVideo-Reason file and plans its records (tokens, video headers; nothing
    /// decoded); bad records and videos are skipped and counted.
    fn load(
        path: &Path,
        tok: &Tokenizer,
        settings: &VideoSettings,
        max_len: usize,
        stats: &mut VideoRunStats,
    ) -> Result<Vec<VlRecordPlan>> {
        let (records, report) = load_vl_plans(path, tok, settings, true)?;
        stats.skipped_records += report.bad_records.len();
        stats.skipped_videos += report.skipped_videos.len();
        let video_token = tok
            .token_to_id(reel_data::VIDEO_PAD)
            .context("the tokenizer has no <|video_pad|> token")?;
        let mut out = Vec::with_capacity(records.len());
        for mut r in records {
            if fit_to_len(&mut r.tokens, max_len, video_token) {
                out.push(r);
            } else {
                tracing::warn!(
                    "{}: skipping the record: data.max_len = {max_len} would cut its video \
                     tokens or leave no target",
                    r.origin
                );
                stats.skipped_long += 1;
            }
        }
        if out.is_empty() {
            bail!("{}: no usable record", path.display());
        }
        Ok(out)
    }

    /// The decoder of [`SftTask::follow_sampler`] (or a fresh one when the loop never called
    /// it, for evaluation).
    fn decoder(&self, model: &Qwen25VL) -> Result<Arc<DecodeCtx>> {
        if let Some(d) = self.decode.get() {
            return Ok(d.clone());
        }
        let weights = *self
            .weights
            .get_or_init(|| weights_fingerprint(&model.vision.params));
        let processor = VideoProcessor::new(self.settings.processor.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let cache = (!self.train_vision).then(|| self.cache.clone());
        let ctx = Arc::new(DecodeCtx::new(
            self.settings.sampling,
            processor,
            self.settings.key_text(),
            weights,
            cache,
        ));
        Ok(self.decode.get_or_init(|| ctx).clone())
    }
}

impl SftTask for VlTask {
    type Model = Qwen25VL;
    type Ws = VlWorkspace;
    type Micro = VlMicro;
    const NEEDS_COMM: bool = true;

    fn build(cfg: &SftConfig, tok: &Tokenizer) -> Result<Self> {
        let dir = cfg
            .model
            .path
            .as_deref()
            .context("[model] path: a Qwen2.5-VL run starts from a checkpoint folder")?;
        let settings = VideoSettings {
            sampling: parse_sampling(&cfg.video.sampling)?,
            processor: VideoProcessorConfig::from_dir(dir)?,
        };
        let mut stats = VideoRunStats::default();
        let max_len = cfg.data.max_len;
        let train = Self::load(&cfg.data.train, tok, &settings, max_len, &mut stats)?;
        let eval_set = cfg
            .data
            .eval
            .as_deref()
            .map(|p| Self::load(p, tok, &settings, max_len, &mut stats))
            .transpose()?;
        stats.videos = {
            let mut h: Vec<&Path> = train
                .iter()
                .flat_map(|e| e.videos.iter().map(|v| v.path.as_path()))
                .collect();
            h.sort_unstable();
            h.dedup();
            h.len()
        };
        let bytes = cfg.video.cache_mb << 20;
        let cache = match &cfg.video.cache_dir {
            Some(d) => EmbedCache::with_dir(bytes, d)?,
            None => EmbedCache::new(bytes),
        };
        let mut processor_files = Vec::new();
        for f in ["video_preprocessor_config.json", "preprocessor_config.json"] {
            let src = dir.join(f);
            if src.is_file() {
                let bytes =
                    std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
                processor_files.push((f.to_string(), bytes));
            }
        }
        Ok(VlTask {
            train: Arc::new(train),
            eval_set,
            settings,
            train_vision: cfg.video.train_vision,
            cache: Arc::new(cache),
            enc: SpVisionEncoder::new(),
            weights: OnceLock::new(),
            prefetch: (cfg.video.prefetch_workers, cfg.video.prefetch_depth.max(1)),
            decode: OnceLock::new(),
            feeds: OnceLock::new(),
            failed: FailedRecords::default(),
            processor_files,
            stats,
            gpu_tower_mode: cfg.video.gpu_tower,
            gpu_tower: OnceLock::new(),
        })
    }

    fn sampler(&self, cfg: &SftConfig) -> BucketSampler {
        // One record per micro-batch: unit lengths under a budget of one.
        let ones = vec![1; self.train.len()];
        BucketSampler::with_batching(&ones, 1, cfg.data.seed, cfg.data.batching)
    }

    fn follow_sampler(
        &self,
        sampler: &BucketSampler,
        model: &Qwen25VL,
        cfg: &SftConfig,
        steps: u64,
    ) -> Result<()> {
        let ctx = self.decoder(model)?;
        let (workers, depth) = self.prefetch;
        let dp = cfg.parallel.dp.max(1);
        let feeds = (0..dp)
            .map(|d| {
                let order =
                    ReplicaOrder::new(sampler.clone(), dp, d, cfg.train.grad_accum as usize, steps);
                let pf = record_prefetcher(order, self.train.clone(), ctx.clone(), workers, depth);
                ReplicaFeed::new(pf, cfg.parallel.sp.max(1))
            })
            .collect();
        if self.feeds.set(feeds).is_err() {
            bail!("the video feeds were already started");
        }
        Ok(())
    }

    fn init(&self, cfg: &SftConfig, _tok: &Tokenizer) -> Result<Qwen25VL> {
        let dir = cfg.model.path.as_deref().context("[model] path")?;
        self.load(dir)
    }

    fn load(&self, dir: &Path) -> Result<Qwen25VL> {
        load_vl_checkpoint(dir).with_context(|| format!("loading checkpoint {}", dir.display()))
    }

    fn check(&self, model: &Qwen25VL, _cfg: &SftConfig, tok: &Tokenizer) -> Result<()> {
        if tok.vocab_size() > model.config.text.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                model.config.text.vocab_size
            );
        }
        Ok(())
    }

    fn replica(&self, model: &Qwen25VL) -> Result<Qwen25VL> {
        Ok(Qwen25VL::from_params(
            model.config.clone(),
            model.lm.params.clone(),
            model.vision.params.clone(),
        )?)
    }

    fn workspace(&self, model: &Qwen25VL, cfg: &SftConfig) -> VlWorkspace {
        model.workspace(cfg.train.checkpoint)
    }

    fn param_groups(&self, model: &Qwen25VL) -> Vec<(usize, bool)> {
        let lm = model.lm.layout.entries.iter();
        let vision = model.vision.layout.entries.iter();
        lm.chain(vision.filter(|_| self.train_vision))
            .map(|e| (e.range.len(), e.decay))
            .collect()
    }

    fn params_mut<'m>(&self, model: &'m mut Qwen25VL) -> Vec<&'m mut [f32]> {
        let Qwen25VL { lm, vision, .. } = model;
        let mut out = lm.layout.split_mut(&mut lm.params);
        if self.train_vision {
            let sizes: Vec<usize> = vision
                .layout
                .entries
                .iter()
                .map(|e| e.range.len())
                .collect();
            out.extend(split_sizes(&mut vision.params, &sizes));
        }
        out
    }

    fn checksum(&self, model: &Qwen25VL) -> u64 {
        param_checksum_from(param_checksum(&model.lm.params), &model.vision.params)
    }

    fn micro(&self, idx: &[usize], _cfg: &SftConfig) -> VlMicro {
        VlMicro {
            records: idx.to_vec(),
            dropped: Cell::new(0),
        }
    }

    fn counts(&self, mb: &VlMicro) -> (usize, usize) {
        mb.records.iter().fold((0, 0), |(l, t), &i| {
            let ex = &self.train[i].tokens;
            (l + labelled(ex), t + ex.input_ids.len())
        })
    }

    fn dropped_labels(&self, mb: &VlMicro) -> usize {
        mb.dropped.get()
    }

    fn micro_step<C: Communicator>(
        &self,
        model: &Qwen25VL,
        ws: &mut VlWorkspace,
        grads: &mut [f32],
        mb: &VlMicro,
        scale: f32,
        peers: Option<&Peers<'_, C>>,
    ) -> Result<LossStats> {
        let p = peers.context("the vision-language step runs on a communicator")?;
        self.each_record(model, mb, p, |_, ex, fetched, ctx| {
            self.record_step(model, ws, grads, ex, fetched, ctx, scale, p)
        })
    }

    fn eval(&self, model: &Qwen25VL) -> Result<Option<LossStats>> {
        let Some(set) = &self.eval_set else {
            return Ok(None);
        };
        // Decoded ahead like the training records, the tower run on each (no cache).
        let ctx = self.decoder(model)?;
        let (workers, depth) = self.prefetch;
        let plans = Arc::new(set.clone());
        let jobs = {
            let (ctx, plans) = (ctx.clone(), plans.clone());
            Prefetcher::new(
                (0..set.len()).collect(),
                workers,
                depth,
                move |&i: &usize| {
                    let plan = &plans[i];
                    let mut pixels = Vec::new();
                    for v in &plan.videos {
                        let px = ctx
                            .decode(v)
                            .map_err(|msg| reel_data::VideoError::Corrupt {
                                path: v.path.clone(),
                                msg,
                            })?;
                        pixels.extend_from_slice(&px.data);
                    }
                    Ok(VlInputs::from_plan(plan, pixels, Vec::new()))
                },
            )
        };
        let mut ws = model.workspace(CheckpointPolicy::Layer);
        let mut total = LossStats::default();
        let mut jobs = jobs;
        while let Some((i, inp)) = jobs.next_result() {
            let inp = match inp {
                Ok(inp) => inp,
                Err(e) => {
                    if self.failed.first(true, i) {
                        tracing::warn!("{}: skipping the record: video {e}", set[i].origin);
                    }
                    continue;
                }
            };
            let s = model
                .forward(&mut ws, &inp.batch(), &LocalAttention)
                .with_context(|| set[i].origin.clone())?;
            total.loss_sum += s.loss_sum;
            total.n_tokens += s.n_tokens;
        }
        Ok(Some(total))
    }

    fn model_files(&self, model: &Qwen25VL, tok: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>> {
        // Weights stay f32 (the master copy); config.json says so.
        let mut files = vl_model_files(model, DType::F32, usize::MAX)?;
        files.extend(tokenizer_files(tok)?);
        files.extend(self.processor_files.iter().cloned());
        Ok(files)
    }

    fn step_metrics(&self, record: &mut serde_json::Value) {
        let s = self.video_stats().unwrap_or_default();
        let (c, e, f) = (s.cache, s.encode, s.prefetch);
        let wait = self.decode.get().map_or(0.0, |d| d.counters.take_wait());
        let fields = serde_json::json!({
            "cache_hits": c.hits + c.disk_hits, "cache_misses": c.misses,
            "cache_bytes": c.bytes, "cache_evictions": c.evictions,
            "tower_forwards": e.tower_forwards, "videos_encoded": e.videos_encoded,
            "videos_cached": e.videos_cached, "skipped_records": s.skipped_records,
            "skipped_videos": s.skipped_videos, "skipped_long": s.skipped_long,
            "data_wait_s": wait, "videos_decoded": f.videos_decoded,
            "decode_cache_skips": f.cache_skips,
            "videos_in_memory_peak": f.peak_videos_in_memory,
            "tower_device": crate::device::tower_device(self.gpu_tower.get().and_then(Option::as_ref)),
        });
        if let (Some(r), Some(f)) = (record.as_object_mut(), fields.as_object()) {
            r.extend(f.clone());
        }
    }

    fn text_model(_model: &Qwen25VL) -> Option<&Qwen2> {
        None
    }

    fn decoder(model: &Qwen25VL) -> &Qwen2 {
        &model.lm
    }

    fn decoder_mut(model: &mut Qwen25VL) -> &mut Qwen2 {
        &mut model.lm
    }

    fn gpu_micro_step<C: Communicator>(
        &self,
        model: &Qwen25VL,
        ws: &mut VlWorkspace,
        gm: &mut GpuModel,
        mb: &VlMicro,
        scale: f32,
        peers: Option<&Peers<'_, C>>,
        mid: &mut dyn FnMut(),
    ) -> Result<LossStats> {
        let p = peers.context("the vision-language step runs on a communicator")?;
        let mut nop = || {};
        self.each_record(model, mb, p, |k, ex, fetched, ctx| {
            let m: &mut dyn FnMut() = if k == 0 { &mut *mid } else { &mut nop };
            self.gpu_record_step(model, ws, gm, ex, fetched, ctx, scale, p, m)
        })
    }

    fn video_stats(&self) -> Option<VideoRunStats> {
        Some(VideoRunStats {
            cache: self.cache.stats(),
            encode: self.enc.counters.snapshot(),
            skipped_videos: self.stats.skipped_videos + self.failed.count(),
            prefetch: self
                .decode
                .get()
                .map(|d| d.counters.snapshot())
                .unwrap_or_default(),
            ..self.stats.clone()
        })
    }
}

/// This rank's share of a prepared record (the whole record without sequence parallelism): input
/// embeddings [T_l, d], M-RoPE cos/sin [T_l, D/2], targets and tokens [T_l] (shard padding
/// carries the video token: no embedding-table gradient).
struct LocalInputs {
    emb: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    targets: Vec<i32>,
    tokens: Vec<u32>,
    t: usize,
}

impl LocalInputs {
    /// Cuts the prepared inputs in `ws` with `sharding` for rank `r`.
    fn new(
        model: &Qwen25VL,
        ws: &VlWorkspace,
        inp: &VlInputs,
        sharding: Option<&reel_parallel::Sharding>,
        r: usize,
    ) -> Result<Self> {
        let c = &model.config;
        let (d, half, vid) = (c.text.hidden_size, c.text.head_dim / 2, c.video_token_id);
        let (emb, cos, sin) = Qwen25VL::prepared(ws);
        Ok(match sharding {
            Some(sh) => LocalInputs {
                emb: sh.shard(emb, 1, d, r, 0.0)?,
                cos: sh.shard(cos, 1, half, r, 1.0)?,
                sin: sh.shard(sin, 1, half, r, 0.0)?,
                targets: sh.shard(&inp.targets, 1, 1, r, IGNORE_INDEX)?,
                tokens: sh.shard(&inp.tokens, 1, 1, r, vid)?,
                t: sh.local_len(),
            },
            None => LocalInputs {
                emb: emb.to_vec(),
                cos: cos.to_vec(),
                sin: sin.to_vec(),
                targets: inp.targets.clone(),
                tokens: inp.tokens.clone(),
                t: inp.tokens.len(),
            },
        })
    }
}

/// Labelled tokens of an example (targets of positions 0..T−1).
fn labelled(ex: &TokenizedExample) -> usize {
    ex.loss_mask.iter().skip(1).filter(|&&m| m).count()
}

impl VlTask {
    /// Runs `step` (k-th record, its plan, its prefetched videos) on each record of `mb` in the
    /// sampler's order, taking the records from this replica's video feed; sums the losses. A
    /// record whose video does not decode is skipped with a warning (counted once, its labelled
    /// tokens reported as dropped), and the step goes on.
    fn each_record<C: Communicator>(
        &self,
        model: &Qwen25VL,
        mb: &VlMicro,
        p: &Peers<'_, C>,
        mut step: impl FnMut(
            usize,
            &VlRecordPlan,
            &FetchedRecord,
            &DecodeCtx,
        ) -> Result<std::result::Result<LossStats, String>>,
    ) -> Result<LossStats> {
        let feed = self
            .feeds
            .get()
            .and_then(|f| f.get(p.coords.dp_rank))
            .context("the video feed was not started (SftTask::follow_sampler)")?;
        let ctx = self.decoder(model)?;
        let mut total = LossStats::default();
        for (k, &i) in mb.records.iter().enumerate() {
            let ex = &self.train[i];
            let (item, waited) = feed.take(p.coords.sp_rank)?;
            if p.rank == 0 {
                ctx.counters.add_wait(waited);
            }
            if item.record != i {
                bail!(
                    "{}: the video feed is out of step with the sampler (it holds record {})",
                    ex.origin,
                    item.record
                );
            }
            let stepped = match &item.result {
                Ok(fetched) => step(k, ex, fetched, &ctx).with_context(|| ex.origin.clone())?,
                Err(e) => Err(e.clone()),
            };
            match stepped {
                Ok(s) => {
                    total.loss_sum += s.loss_sum;
                    total.n_tokens += s.n_tokens;
                }
                Err(e) => {
                    // Every sp rank of the replica sees the same failure; one counts it.
                    if self.failed.first(false, i) {
                        tracing::warn!("{}: skipping the record: video {e}", ex.origin);
                    }
                    if p.coords.sp_rank == 0 {
                        mb.dropped.set(mb.dropped.get() + labelled(&ex.tokens));
                    }
                }
            }
        }
        Ok(total)
    }

    /// The videos' merged features [Σ tokens, d] of `inp` through MR-SP stage 1 over `group`:
    /// from the cache (a video encoded once; pixels asked of `fetched` only for the videos the
    /// cache lacks) with a frozen tower, encoded every time when the tower trains. `Ok(Err(why))`
    /// when a video the step had to decode itself does not decode.
    #[allow(clippy::too_many_arguments)]
    fn features<C: Communicator>(
        &self,
        model: &Qwen25VL,
        ws: &mut VlWorkspace,
        group: &C,
        inp: &VlInputs,
        fetched: &FetchedRecord,
        ctx: &DecodeCtx,
        gpu: Option<&crate::device::GpuTower>,
    ) -> Result<std::result::Result<Vec<f32>, String>> {
        if self.train_vision {
            let all: Vec<usize> = (0..fetched.videos.len()).collect();
            let pixels = match fetched.stacked(&all, ctx) {
                Ok(px) => px,
                Err(e) => return Ok(Err(e)),
            };
            return Ok(Ok(self.enc.encode(
                group,
                &model.vision,
                &mut ws.vision,
                &pixels,
                &inp.grids,
            )?));
        }
        // The frozen tower: on the GPU when the run's model is there (`video.gpu_tower`).
        let (mut boxed, mut cpu);
        let tower: &mut dyn TowerForward = match gpu {
            Some(t) => {
                boxed = t.forward();
                &mut *boxed
            }
            None => {
                cpu = CpuTower {
                    tower: &model.vision,
                    ws: &mut ws.vision,
                };
                &mut cpu
            }
        };
        let encoded = self.enc.encode_cached_with_on(
            group,
            tower,
            &self.cache,
            &inp.keys,
            &inp.grids,
            &inp.seconds,
            |todo| fetched.stacked(todo, ctx).map_err(VisionSpError::Pixels),
        );
        match encoded {
            Ok(embeds) => Ok(Ok(embeds
                .iter()
                .flat_map(|e| e.data.iter().copied())
                .collect())),
            Err(VisionSpError::Pixels(e)) => Ok(Err(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Forward and backward of one record on this rank (see [`VlTask`]); decoder gradients
    /// then tower gradients (when trained) accumulate into `grads`. `Ok(Err(why))` when a
    /// video the step had to decode itself (its cache entry evicted since the prefetch) does
    /// not decode: nothing was computed, on any rank of the group.
    #[allow(clippy::too_many_arguments)]
    fn record_step<C: Communicator>(
        &self,
        model: &Qwen25VL,
        ws: &mut VlWorkspace,
        grads: &mut [f32],
        ex: &VlRecordPlan,
        fetched: &FetchedRecord,
        ctx: &DecodeCtx,
        scale: f32,
        p: &Peers<'_, C>,
    ) -> Result<std::result::Result<LossStats, String>> {
        let c = &model.config;
        let (d, vid) = (c.text.hidden_size, c.video_token_id);
        let inp = VlInputs::from_plan(ex, Vec::new(), fetched.keys());
        let (lm_grads, vision_grads) = grads.split_at_mut(model.lm.params.len());

        // MR-SP stage 1 over the sequence-parallel group.
        let features = match self.features(model, ws, p.group, &inp, fetched, ctx, None)? {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        model.prepare_with_features(ws, &inp.batch(), &features)?;

        // This rank's token shard of the input embeddings, angles, targets and tokens.
        let t = inp.tokens.len();
        let (sharding, attn): (_, &dyn AttentionOp) = match p.sp {
            Some(sp) => (Some(sp.set_seq_len(t)?), sp),
            None => (None, &LocalAttention),
        };
        let l = LocalInputs::new(model, ws, &inp, sharding.as_ref(), p.coords.sp_rank)?;
        let eb = EmbedsBatch {
            embeds: &l.emb,
            targets: &l.targets,
            rotary: Rotary::Angles {
                cos: &l.cos,
                sin: &l.sin,
            },
            b: 1,
            t: l.t,
        };
        let stats = model.lm.forward_embeds(&mut ws.lm, &eb, attn)?;
        let dx = model
            .lm
            .backward_embeds(lm_grads, &mut ws.lm, &eb, scale, attn)?
            .to_vec();

        if self.train_vision && !inp.grids.is_empty() {
            // ∂L/∂features of the whole sequence: every rank's shard rows, gathered.
            let full = match &sharding {
                Some(sh) => {
                    let mut all = vec![0.0f32; sh.ranks() * dx.len()];
                    p.group
                        .all_gather(&dx, &mut all)
                        .context("gathering ∂L/∂embeddings")?;
                    let shards: Vec<&[f32]> = all.chunks_exact(dx.len()).collect();
                    sh.unshard(&shards, 1, d)?
                }
                None => dx.clone(),
            };
            let d_features: Vec<f32> = inp
                .tokens
                .iter()
                .zip(full.chunks_exact(d))
                .filter(|(&tok, _)| tok == vid)
                .flat_map(|(_, row)| row.iter().copied())
                .collect();
            self.enc.backward(
                p.group,
                &model.vision,
                &mut ws.vision,
                vision_grads,
                &inp.grids,
                &d_features,
            )?;
        }
        model.text_embedding_backward(lm_grads, &dx, &l.tokens)?;
        Ok(Ok(stats))
    }

    /// [`VlTask::record_step`] with the decoder on the GPU (`gm`; the tower frozen on the CPU,
    /// [`crate::device::gpu_unsupported`]): the videos' features from the cache as on the CPU,
    /// the M-RoPE angles from the host, this rank's shard of rows (text rows looked up in the
    /// device's embedding table, the video rows' features uploaded) through
    /// [`GpuModel::forward_embeds`] and its backward, which also gives the table's text rows
    /// their gradient on the device.
    #[allow(clippy::too_many_arguments)]
    fn gpu_record_step<C: Communicator>(
        &self,
        model: &Qwen25VL,
        ws: &mut VlWorkspace,
        gm: &mut GpuModel,
        ex: &VlRecordPlan,
        fetched: &FetchedRecord,
        ctx: &DecodeCtx,
        scale: f32,
        p: &Peers<'_, C>,
        mid: &mut dyn FnMut(),
    ) -> Result<std::result::Result<LossStats, String>> {
        if self.train_vision {
            bail!("the GPU step keeps the vision tower frozen (video.train_vision = false)");
        }
        let c = &model.config;
        let (d, vid) = (c.text.hidden_size, c.video_token_id);
        let inp = VlInputs::from_plan(ex, Vec::new(), fetched.keys());
        let tower = self
            .gpu_tower
            .get_or_init(|| crate::device::gpu_tower(self.gpu_tower_mode, &model.vision, "SFT"))
            .as_ref();
        let features = match self.features(model, ws, p.group, &inp, fetched, ctx, tower)? {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        // The host's text rows are stale (the weights live on the GPU); only the video rows and
        // the angles are read from here.
        model.prepare_with_features(ws, &inp.batch(), &features)?;
        let sharding = gm.set_seq_len(inp.tokens.len())?;
        let l = LocalInputs::new(model, ws, &inp, sharding.as_ref(), gm.sp_rank())?;
        let rows: Vec<f32> = l
            .tokens
            .iter()
            .zip(l.emb.chunks_exact(d))
            .filter(|(&tok, _)| tok == vid)
            .flat_map(|(_, row)| row.iter().copied())
            .collect();
        let eb = GpuEmbedsBatch {
            tokens: &l.tokens,
            targets: &l.targets,
            feature_token: vid,
            feature_rows: None,
            features: &rows,
            cos: &l.cos,
            sin: &l.sin,
            b: 1,
            t: l.t,
        };
        let stats = gm.forward_embeds(&eb)?;
        mid();
        gm.backward_embeds(&eb, scale, false)?;
        Ok(Ok(stats))
    }
}

/// Sum and count of the target-token NLL of prepared records, the tower run on each.
pub fn eval_vl_examples(model: &Qwen25VL, examples: &[VlExample]) -> Result<LossStats> {
    let mut ws = model.workspace(CheckpointPolicy::Layer);
    let mut total = LossStats::default();
    for ex in examples {
        let s = eval_one(model, &mut ws, ex)?;
        total.loss_sum += s.loss_sum;
        total.n_tokens += s.n_tokens;
    }
    Ok(total)
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
    write_vl_model(dir, seed, 64, 2, max_positions, frame_side, 10000.0)
}

/// [`write_tiny_vl_model_with`] with a decoder of width `hidden` (a multiple of 32: heads of
/// 16, half as many key/value heads, MLP 11/4 as wide), `layers` layers and the decoder's
/// `rope_theta` (M-RoPE sections [2, 3, 3] of the 8 frequencies of a head of 16: the height axis
/// turns with frequencies θ^(-2/8), θ^(-3/8), θ^(-4/8), the width axis with the three slowest,
/// down to θ^(-7/8) — at θ = 10⁴ that is 3·10⁻⁴ rad per grid column, a video token's column is
/// then all but invisible to the decoder; at θ = 10 it is 0.13 rad); the tower's output width
/// follows `hidden`.
pub fn write_vl_model(
    dir: &Path,
    seed: u64,
    hidden: usize,
    layers: usize,
    max_positions: usize,
    frame_side: usize,
    rope_theta: f32,
) -> Result<()> {
    if frame_side == 0 || !frame_side.is_multiple_of(28) {
        bail!("frame side {frame_side} must be a positive multiple of 28 (patch 14, merge 2)");
    }
    use reel_model::{Qwen25VLConfig, Qwen2Config, VisionConfig};
    if hidden == 0 || !hidden.is_multiple_of(32) || layers == 0 {
        bail!("a VLM of width {hidden} and {layers} layers: the width must be a positive multiple of 32");
    }
    if !(rope_theta.is_finite() && rope_theta > 1.0) {
        bail!("rope_theta {rope_theta} must be a finite number above 1");
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
    text.rope_theta = rope_theta;
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
    let vis = random_tower(&config.vision, seed ^ 0x5eed);
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

/// Centres a frozen random tower's merged output on the videos of `data`: sets the merger's last
/// bias (`visual.merger.mlp.2.bias`) to minus the mean merged feature over every token of the
/// first `videos` records' videos (sampled with `sampling`) and saves the checkpoint in `dir` again;
/// returns that mean's norm over the mean token norm before (how much of each feature the common
/// part was). A random tower's features share one large common part (cosine ≈ 0.95 between any
/// two tokens of the demo's videos; a small shape moves a token by a fifth of its norm), and the
/// decoder's RMSNorm keeps it at full scale, so the part that tells videos apart reaches the
/// decoder small: on one static 13-pixel square per video asked for its colour, held-out
/// accuracy after 150 SFT steps is 23% uncentred (another video's frames: 23%) and 92.5% centred
/// (28.5%). A pretrained tower has no such common part; this is a stand-in's initialisation.
pub fn centre_vl_merger(
    dir: &Path,
    data: &Path,
    sampling: FrameSampling,
    videos: usize,
) -> Result<f32> {
    if videos == 0 {
        bail!(
            "centring the merger of {} needs at least one video",
            dir.display()
        );
    }
    let mut m = reel_model::load_vl_checkpoint(dir)
        .with_context(|| format!("loading {}", dir.display()))?;
    let tok = Tokenizer::from_dir(dir)?;
    let settings = VideoSettings {
        sampling,
        processor: VideoProcessorConfig::from_dir(dir)?,
    };
    let d = m.config.vision.out_hidden_size;
    let (mut sum, mut tokens, mut norms, mut seen) = (vec![0f64; d], 0usize, 0f64, 0usize);
    let mut ws = reel_model::VisionWorkspace::new();
    // The stream stops through its callback's error; `Enough` is the wanted stop, not a failure.
    enum Stop {
        Enough,
        Failed(anyhow::Error),
    }
    impl From<reel_data::DataError> for Stop {
        fn from(e: reel_data::DataError) -> Self {
            Stop::Failed(e.into())
        }
    }
    let r = reel_data::stream_vl_examples(data, &tok, &settings, false, 0, 1, |e| {
        if seen == videos {
            return Err(Stop::Enough);
        }
        seen += 1;
        let inp = VlInputs::new(&e, "", 0);
        let f = m
            .vision
            .forward(&mut ws, &inp.pixels, &inp.grids)
            .map_err(|e| Stop::Failed(e.into()))?;
        for row in f.chunks_exact(d) {
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += x as f64;
            }
            norms += row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            tokens += 1;
        }
        Ok(())
    });
    if let Err(Stop::Failed(e)) = r {
        return Err(e.context(format!("encoding the videos of {}", data.display())));
    }
    if tokens == 0 {
        bail!(
            "{} has no readable video to centre the merger on",
            data.display()
        );
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / tokens as f64) as f32).collect();
    let b = m.vision.layout.mlp2_b.clone();
    for (p, mu) in m.vision.params[b].iter_mut().zip(&mean) {
        *p -= mu;
    }
    save_vl_checkpoint(&m, dir, DType::F32, usize::MAX)?;
    let mean_norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    Ok(mean_norm / (norms / tokens as f64) as f32)
}

/// Random vision-tower weights: each weight matrix uniform with unit variance over its fan-in
/// (±√(3/fan_in)), biases zero, norms one. Different videos' merged features differ by about a
/// quarter to a third of their norm (`the_random_tower_tells_videos_apart`), as they did with the
/// earlier draw of every value from ±0.05.
pub fn random_tower(c: &reel_model::VisionConfig, seed: u64) -> Vec<f32> {
    use reel_model::vision::VisionLayout;
    let layout = VisionLayout::new(c);
    let (d, i, u) = (c.hidden_size, c.intermediate_size, c.merge_unit());
    let mut rng = reel_tensor::rng(seed);
    let mut p = vec![0.0f32; layout.total()];
    let mut fill = |r: &std::ops::Range<usize>, fan_in: usize, p: &mut [f32]| {
        let bound = (3.0 / fan_in as f32).sqrt();
        p[r.clone()].copy_from_slice(&reel_tensor::uniform_vec(&mut rng, r.len(), bound));
    };
    fill(&layout.patch_embed, c.patch_len(), &mut p);
    for b in &layout.blocks {
        fill(&b.qkv_w, d, &mut p);
        fill(&b.proj_w, d, &mut p);
        fill(&b.gate_up_w, d, &mut p);
        fill(&b.down_w, i, &mut p);
        for r in [&b.norm1, &b.norm2] {
            p[r.clone()].fill(1.0);
        }
    }
    fill(&layout.mlp0_w, d * u, &mut p);
    fill(&layout.mlp2_w, d * u, &mut p);
    p[layout.ln_q.clone()].fill(1.0);
    p
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
    fn rope_theta_sets_how_far_a_grid_column_turns_the_width_bands() {
        // Two tokens one grid column apart (same t and h): the width axis's rotary bands (the
        // last 3 of 8 at heads of 16) turn by θ^(-j/8) rad, j = 5..7.
        let tmp = tempfile::tempdir().unwrap();
        let column_turns = |theta: f32| -> Vec<f32> {
            let dir = tmp.path().join(format!("m{theta}"));
            write_vl_model(&dir, 1, 64, 1, 64, 28, theta).unwrap();
            let m = reel_model::load_vl_checkpoint(&dir).unwrap();
            assert_eq!(m.config.text.rope_theta, theta);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            // [3, 2]: t row, h row, w row.
            m.mrope_angles(&[5, 5, 5, 5, 5, 6], &mut cos, &mut sin);
            let half = cos.len() / 2;
            (half - 3..half)
                .map(|j| {
                    let a = |k: usize| sin[k * half + j].atan2(cos[k * half + j]);
                    (a(1) - a(0)).abs()
                })
                .collect()
        };
        let slow = column_turns(10000.0);
        let fast = column_turns(10.0);
        for (j, (&s, &f)) in (5..8).zip(slow.iter().zip(&fast)) {
            let want = |t: f32| t.powf(-(j as f32) / 8.0);
            assert!((s - want(10000.0)).abs() < 1e-4, "band {j} at 1e4: {s}");
            assert!((f - want(10.0)).abs() < 1e-4, "band {j} at 10: {f}");
            assert!(s < 4e-3 && f > 0.1, "band {j}: {s} vs {f}");
        }
        let err = write_vl_model(&tmp.path().join("bad"), 1, 64, 1, 64, 28, 0.5).unwrap_err();
        assert!(err.to_string().contains("rope_theta"), "{err}");
    }

    #[test]
    fn centring_the_merger_removes_the_common_part_of_the_features() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path());
        let sampling = FrameSampling::Uniform { frames: 8 };
        let feats = |dir: &Path| -> Vec<Vec<f32>> {
            let m = reel_model::load_vl_checkpoint(dir).unwrap();
            let tok = Tokenizer::from_dir(dir).unwrap();
            let settings = VideoSettings {
                sampling,
                processor: VideoProcessorConfig::from_dir(dir).unwrap(),
            };
            let (ex, _) = reel_data::load_vl_examples(&data, &tok, &settings, false).unwrap();
            let d = m.config.vision.out_hidden_size;
            ex.iter()
                .flat_map(|e| {
                    let inp = VlInputs::new(e, "", 0);
                    let mut ws = reel_model::VisionWorkspace::new();
                    let f = m.vision.forward(&mut ws, &inp.pixels, &inp.grids).unwrap();
                    f.chunks_exact(d).map(<[f32]>::to_vec).collect::<Vec<_>>()
                })
                .collect()
        };
        let norm = |x: &[f32]| x.iter().map(|v| v * v).sum::<f32>().sqrt();
        // (mean token's norm / mean token norm, mean cosine of every token to the mean token)
        let stats = |f: &[Vec<f32>]| {
            let d = f[0].len();
            let mean: Vec<f32> = (0..d)
                .map(|i| f.iter().map(|r| r[i]).sum::<f32>() / f.len() as f32)
                .collect();
            let tn = f.iter().map(|r| norm(r)).sum::<f32>() / f.len() as f32;
            let cos = f
                .iter()
                .map(|r| {
                    r.iter().zip(&mean).map(|(a, b)| a * b).sum::<f32>() / (norm(r) * norm(&mean))
                })
                .sum::<f32>()
                / f.len() as f32;
            (norm(&mean) / tn, cos)
        };
        let before = feats(&model);
        let (share, cos) = stats(&before);
        assert!(share > 0.5 && cos > 0.5, "uncentred: {share} {cos}");
        // Centred on the first 4 of the 6 videos: the reported share is theirs, the mean over all
        // six is small and the tokens point every way.
        let reported = centre_vl_merger(&model, &data, sampling, 4).unwrap();
        assert!(reported > 0.5, "{reported}");
        let after = feats(&model);
        assert_eq!(after.len(), before.len());
        let (share, cos) = stats(&after);
        assert!(share < 0.2 && cos.abs() < 0.2, "centred: {share} {cos}");
        // The tokens' differences are those of before: only the offset moved.
        let diff = |f: &[Vec<f32>]| {
            f[0].iter()
                .zip(&f[1])
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>()
        };
        reel_tensor::check_close(
            "token 0 - token 1",
            &diff(&after),
            &diff(&before),
            reel_tensor::Tolerance::new(1e-4, 1e-4),
        )
        .unwrap();
        let err = centre_vl_merger(&model, &data, sampling, 0).unwrap_err();
        assert!(err.to_string().contains("at least one video"), "{err}");
    }

    #[test]
    fn the_random_tower_tells_videos_apart() {
        // Six videos' merged features: each differs from their mean by a real share of its
        // norm (about 0.2–0.35 here; a tower collapsed to one output for every video gives ~0).
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path());
        let m = reel_model::load_vl_checkpoint(&model).unwrap();
        let tok = Tokenizer::from_dir(&model).unwrap();
        let settings = VideoSettings {
            sampling: FrameSampling::Uniform { frames: 8 },
            processor: VideoProcessorConfig::from_dir(&model).unwrap(),
        };
        let (ex, _) = reel_data::load_vl_examples(&data, &tok, &settings, false).unwrap();
        assert_eq!(ex.len(), 6);
        let feats: Vec<Vec<f32>> = ex
            .iter()
            .map(|e| {
                let inp = VlInputs::new(e, "", 0);
                let mut ws = reel_model::VisionWorkspace::new();
                m.vision
                    .forward(&mut ws, &inp.pixels, &inp.grids)
                    .unwrap()
                    .to_vec()
            })
            .collect();
        let n = feats[0].len() as f32;
        let mean: Vec<f32> = (0..feats[0].len())
            .map(|i| feats.iter().map(|f| f[i]).sum::<f32>() / feats.len() as f32)
            .collect();
        let norm = |x: &[f32]| x.iter().map(|v| v * v).sum::<f32>().sqrt();
        for (k, f) in feats.iter().enumerate() {
            assert!(f.iter().all(|v| v.is_finite()), "video {k}");
            let dev: Vec<f32> = f.iter().zip(&mean).map(|(a, b)| a - b).collect();
            let share = norm(&dev) / norm(f);
            assert!(
                share > 0.05,
                "video {k}: {share:.4} of its norm ({n} values)"
            );
        }
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
        assert_eq!(report.device, "cpu");
        assert_eq!(report.overall.total, 6);
        assert_eq!(report.per_type.values().map(|t| t.total).sum::<usize>(), 6);
        assert_eq!(cache.stats().misses, 6, "one tower run per video");
        // Each answer is the greedy continuation by full recomputation (tower on the pixels).
        let (examples, _) = reel_data::load_vl_examples(&data, &tok, &settings, false).unwrap();
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
        // A second run into the same folder replaces the first, as a fresh run.
        let again = run_vl_sft(&cfg).unwrap();
        assert_eq!(again.losses, s.losses);
    }

    #[test]
    fn long_records_lose_their_tail_unless_a_video_or_every_target_would_go() {
        // Tokens: text, 3 video tokens (99), text, then the target (labelled) from index 6.
        let ex = |n: usize| reel_data::TokenizedExample {
            input_ids: (0..n as u32)
                .map(|i| if (2..5).contains(&i) { 99 } else { i })
                .collect(),
            loss_mask: (0..n).map(|i| i >= 6).collect(),
        };
        let fit = |n, max| {
            let mut t = ex(n);
            fit_to_len(&mut t, max, 99).then_some(t.input_ids.len())
        };
        assert_eq!(fit(10, 10), Some(10));
        assert_eq!(fit(10, 12), Some(10));
        assert_eq!(fit(10, 8), Some(8));
        // Cutting at 6 leaves no target; at 4 it would cut the video run.
        assert_eq!(fit(10, 6), None);
        assert_eq!(fit(10, 4), None);
    }

    #[test]
    fn flat_settings_map_onto_the_run_config() {
        let mut v = VlSftConfig::new("m".into(), "d.jsonl".into(), "o".into());
        v.sampling = FrameSampling::fps(2.0);
        v.vision_freeze = false;
        v.batch = 3;
        v.sp = 2;
        let c = v.to_sft_config();
        c.validate().unwrap();
        assert_eq!(c.video.sampling, "fps:2");
        assert_eq!(parse_sampling(&c.video.sampling).unwrap(), v.sampling);
        assert!(c.video.train_vision);
        assert_eq!((c.train.grad_accum, c.parallel.sp), (3, 2));
        assert_eq!(c.video.cache_mb, 1024);
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
