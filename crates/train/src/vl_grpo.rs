//! GRPO for Qwen2.5-VL on LongVideo-Reason prompts with MR-SP (LongVILA-R1, "Scaling RL to Long
//! Videos"; DESIGN.md "MR-SP and the RL step"). The same step as the text trainer
//! ([`crate::grpo`], whose config, prompt order, rewards, dynamic sampling, optimizer step,
//! metrics record and checkpoints it shares), with videos:
//!
//! 0. **Decode.** The drawn records are planned and their videos read, sampled and preprocessed
//!    ahead of the step, in the prompt order, on `[video] prefetch_workers` threads at most
//!    `prefetch_depth` prompts ahead ([`PromptFeed`]; a video whose embeddings are cached is not
//!    decoded); a malformed record or a missing/undecodable video is skipped with a warning
//!    naming it, counted (`skipped_records`), and another prompt is drawn.
//! 1. **Encode once.** Every video of the round goes through the frozen tower once, through the
//!    content-addressed [`EmbedCache`] (key: video content hash, sampling settings, weights
//!    fingerprint); with `parallel.sp = P > 1` its temporal patches are split over P in-process
//!    ranks and the embeddings all-gathered ([`SpVisionEncoder::encode_cached`]). The features
//!    [Σ tokens, d] serve every rollout of the group and the old-policy, reference and update
//!    passes.
//! 2. **Roll out.** The engine runs the decoder with each group's prompt given as input
//!    embeddings (video rows = the cached features) and M-RoPE positions [P, 3]
//!    ([`Prompt::vl`]: `mrope_positions`, as transformers' `get_rope_index`); the prompt is
//!    prefilled once per group and the G samples fork from it. A response token the policy
//!    samples as `<|video_pad|>` is an ordinary token there (table embedding, 1-D position), and
//!    so it is in scoring; it takes no embedding-table gradient. With `train.device` on a GPU
//!    ([`crate::device::rollout_gpu`], at any dp × sp: one engine runs every group) the engine
//!    steps one [`crate::device::RolloutDecoder`] of the language model (bf16, or f32 with
//!    `rollout.gpu_f32`) kept for the run, its weights refreshed after each step's updates; the
//!    frozen tower encodes on the GPU too (`video.gpu_tower`).
//! 3. **Score.** Rewards and group advantages; rows `prompt ++ response[..-1]` [B, T] as input
//!    embeddings (table lookup of the current weights, video rows from the cache) with M-RoPE
//!    angles (response tokens continue 1-D after the prompt's largest position), targets at the
//!    response tokens only; `log π_old` (more than one update per batch) and `log π_ref`
//!    (β > 0; a frozen copy of the initial decoder, none at β = 0) with
//!    [`Qwen2::token_logprobs_embeds`] (fused LM head, logits only at labelled rows, chunked).
//! 4. **Update.** Per mini-batch: `token_logprobs_embeds` → [`grpo_loss`] →
//!    `backward_logprobs_embeds` → the embedding table's share of ∂L/∂embeddings (video rows
//!    skipped: the tower is frozen) → clip, AdamW on the decoder.
//!
//! With reuse, passes 3 and 4 pack each group's samples behind ONE copy of their prompt
//! ([`Packing`], `reel_model::SharedPrefixAttention`; with sp > 1 the schedule's blocks refine into the
//! packed rows' sub-blocks, [`SpAttention::set_packed`]): the video prompt runs once per group
//! instead of once per sample, so these passes cost P + Σ L_s tokens instead of G·P + Σ L_s;
//! the loss reads the log-probabilities back in the per-sample layout, so nothing else changes.
//!
//! With `sp > 1` passes 3 and 4 run on P in-process ranks: every rank takes its token shard of
//! the rows (the schedule's balanced layout, `parallel.schedule`), runs the decoder with
//! [`SpAttention`], and the decoder gradients are all-reduced; `seq_tokens` gives the loss the
//! whole sequences' token counts. Log-probabilities are gathered back to [B, T], so they and the
//! update match sp = 1 within float tolerance.
//!
//! On the GPU (`train.device` resolved to it, `train.gpu_update`) passes 3 and 4 run on the
//! device policy ([`GpuPolicy`]: one `reel_cuda::GpuQwen2` per rank — `token_logprobs_embeds`
//! with the policy's or the reference's weights, `backward_logprobs_embeds`, the embedding
//! table's text rows on the device too, clipping and AdamW there), each sample its own row (the
//! feature rows marked, so a video token the policy sampled in a response stays a table row).
//! With dp × sp > 1 the ranks are in-process threads sharing GPU 0 (each its stream): each
//! replica scores and updates its micro-batches on its sp ranks' token shards ([`GpuRows`], cut
//! as the CPU ranks cut theirs), log-probabilities scattered into the whole layout and summed
//! over the ranks on the device (exact: one rank holds each position), gradients all-reduced
//! over the replica's ranks and then the replicas, loss and metrics gathered exactly
//! ([`GrpoMetrics::packed`]), and every rank takes the same AdamW step.
//!
//! The decoder takes the new weights device to device (from the first rank); the host copy's
//! embedding table is refreshed after each step as well (prompt embedding rows for the rollouts
//! are formed on the host from it; every weight when the CPU engine rolls out) and all weights
//! and the optimizer state before checkpoints. The reference is the loaded model's own weights
//! (uploaded once; a host copy only when the CPU scores).
//!
//! Under `reel launch` (one process per GPU, dp · sp = the world size) each process is one of
//! those ranks on its own GPU, its groups over NCCL ([`crate::device::gpu_proc`]): every process
//! draws the same records and computes the same rewards; a round's groups are split over the
//! processes (group k to rank k mod world), each rolled out on that process's decoder and the
//! responses gathered ([`gather_rollouts`]); each video's frames are split over the processes for
//! the tower through the world's host communicator (MR-SP's encode, [`EncodeComm`]); rank 0
//! writes metrics and checkpoints, and at the end the ranks' weights are compared.
//!
//! `[video] reuse = false` (benchmarks) turns MR-SP's reuse off: the video is encoded again for
//! every sample in every pass (cache bypassed), every sample's prompt is prefilled on its own and
//! scored and updated in its own row.
//! Samples are seeded per sample either way, so the responses are the same.
//!
//! Metrics per step add to the text trainer's record: `rollout_device` (`cpu`, `cuda-bf16`,
//! `cuda-f32`), `update_device` (`cpu`, `cuda-bf16`), `tower_device` (the same names: with the
//! rollouts on the GPU the frozen tower encodes there too, `video.gpu_tower`), `decode_s` (drawing the records), `data_wait_s` (of that, waiting for prefetched
//! videos), `videos_decoded`, `decode_cache_skips`, `videos_in_memory_peak`, `encode_s` (and
//! `rollout_s` without them), `shared_prefill_s` (of `rollout_s`, the prefills shared with the
//! sp group's processes), `rollout_preemptions` and `rollout_shared_preemptions` (this process's
//! engine: groups preempted for lack of KV blocks, and those of them whose prompt was prefilled
//! with the sp group, recomputed alone; both 0 when the pool is sized for the round),
//! `cache_hits`, `cache_misses`, `cache_bytes`, `tower_forwards` (cumulative),
//! `videos_encoded`, `skipped_records`. Checkpoints are Qwen2.5-VL folders (tower unchanged) with
//! the optimizer and trainer state; `--resume` continues the same curve.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reel_comm::{Communicator, InProcess};
use reel_data::{
    ReasonFile, Tokenizer, VideoProcessor, VideoProcessorConfig, VideoSettings, VlSkip,
    IGNORE_INDEX, REASONING_INSTRUCTION,
};
use reel_model::embed_cache::{weights_fingerprint, CacheStats, EmbedCache, EmbedKey, VideoEmbeds};
use reel_model::{
    load_vl_checkpoint, AttentionOp, EmbedsBatch, LocalAttention, Qwen2, Qwen25VL, Qwen2Config,
    Rotary, VideoGrid, Workspace,
};
use reel_parallel::{EncodeStats, Overlap, Sharding, SpAttention, SpVisionEncoder, VisionSpError};
use reel_rl::{
    grpo_loss, u64_words, words_u64, GrpoMetrics, LossScale, PolicyLossConfig, PolicyTokens,
};
use reel_rollout::{sample_seed, sample_share, GroupId, GroupOutput, Prompt};
use serde_json::json;

use crate::accuracy::{engine_config, grouped_engine_config};
use crate::device::{
    grpo_policy_ranks, rollout_decoder, rollout_device, rollout_gpu, update_device, GpuEmbedsBatch,
    GpuPolicy, PolicyRanks, Weights,
};
use crate::grpo::{
    adamw_for, clip_and_step, detokenizer, generation_params, gpu_clip_and_step,
    grpo_trainer_state, is_save_step, load_resume_state, open_run, rows_len, step_record,
    steps_to_run, with_last_good, GrpoOptions, GrpoRunConfig, GrpoSummary, Packing, PromptSampler,
    Reporter, RolledGroup, RoundWork, Sample, Scorer, UpdateOutcome, ROLLOUTS,
};
use crate::vl::{parse_sampling, VlInputs};
use crate::vl_prefetch::{DecodeCtx, FeedStats, FetchedRecord, PromptFeed};

/// What a VLM GRPO run did: the text trainer's summary and the video counters.
#[derive(Clone, Debug)]
pub struct VlGrpoSummary {
    pub run: GrpoSummary,
    /// The embedding cache's counters at the end.
    pub cache: CacheStats,
    /// Tower runs (per rank and call), videos encoded and videos served from the cache.
    pub encode: EncodeStats,
    /// Records skipped (malformed, or a missing/undecodable video), counting the file's
    /// malformed lines once and every failed draw.
    pub skipped_records: usize,
    /// The prompt feed: videos decoded, cache hits not decoded, the most held at once, the
    /// step's wait for decoded videos.
    pub prefetch: FeedStats,
}

/// A drawn record, decoded and encoded: the prompt as the model takes it.
struct VlPrompt {
    /// Prompt tokens [P] (each video's placeholder run expanded), generation prompt included.
    ids: Vec<u32>,
    /// Its videos (pixels, grids, seconds, cache keys): re-encoded per sample with `reuse = false`.
    inputs: VlInputs,
    /// The videos' merged features [Σ tokens, d], in placeholder order (shared by the rows
    /// that hold the prompt).
    features: Arc<Vec<f32>>,
    /// The engine's prompt: input embeddings (video rows = `features`) and M-RoPE positions
    /// ([`Prompt::vl`]).
    rollout: Prompt,
    /// M-RoPE positions of the prompt tokens, (t, h, w) each.
    positions: Vec<[u32; 3]>,
    /// The first response token's position (one past the largest prompt component).
    next_pos: u32,
    text: String,
    answer: String,
    problem_id: String,
}

/// What a step's video work cost.
#[derive(Default)]
struct VideoTimes {
    /// Stage 0: drawing records (their videos decoded ahead by the prompt feed).
    decode_s: f64,
    /// Of that, waiting for the feed's decoded videos.
    wait_s: f64,
    encode_s: f64,
    /// The rollout's shared prefills (launched, sp > 1): part of its time.
    shared_prefill_s: f64,
    /// This process's engine: groups preempted for lack of KV blocks, and of them the ones
    /// whose prompt it had prefilled with its sp group (recomputed alone).
    preemptions: u64,
    shared_preemptions: u64,
}

/// The run's fixed parts.
struct VlCtx<'a> {
    cfg: &'a GrpoRunConfig,
    file: &'a ReasonFile,
    /// The drawn records, planned and decoded ahead in the prompt order.
    feed: Mutex<PromptFeed>,
    cache: &'a EmbedCache,
    enc: &'a SpVisionEncoder,
    /// In-process ranks that split each video's frames (one process).
    sp: usize,
    /// A launched world's host communicator: each video's frames split over its processes
    /// instead.
    host: Option<&'a Mutex<crate::device::HostComm>>,
    /// Scoring and update run on the GPU policy (rows unpacked).
    gpu: bool,
    /// The frozen tower's GPU copy when the rollouts decode on the GPU (`video.gpu_tower`);
    /// `None`: the CPU tower.
    gpu_tower: Option<&'a crate::device::GpuTower>,
}

impl VlCtx<'_> {
    fn feed_stats(&self) -> FeedStats {
        let feed = self.feed.lock().unwrap_or_else(|e| e.into_inner());
        feed.ctx().counters.snapshot()
    }

    /// Whether the scoring and update passes pack each group's samples behind one copy of their
    /// prompt ([`Packing`]): with reuse and `train.share_prompt`.
    fn packs(&self) -> bool {
        self.cfg.video.reuse && self.cfg.train.share_prompt && !self.gpu
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.parallel.timeout_s.max(1))
    }

    /// The merged features of each input's videos [Σ tokens, d]: through the cache, the pixels
    /// of missing videos taken from their fetched records (`cached`: one per input), or
    /// straight through the tower from the inputs' pixels; frames split over `sp` ranks.
    fn encode(
        &self,
        model: &Qwen25VL,
        inputs: &[&VlInputs],
        cached: Option<(&[&FetchedRecord], &DecodeCtx)>,
    ) -> Result<Vec<Vec<f32>>> {
        let mut keys = Vec::new();
        let (mut pixels, mut grids, mut seconds) = (Vec::new(), Vec::new(), Vec::new());
        for inp in inputs {
            keys.extend(inp.keys.iter().cloned());
            pixels.extend_from_slice(&inp.pixels);
            grids.extend_from_slice(&inp.grids);
            seconds.extend_from_slice(&inp.seconds);
        }
        // (input, video) of each video, in order.
        let at: Vec<(usize, usize)> = inputs
            .iter()
            .enumerate()
            .flat_map(|(j, inp)| (0..inp.grids.len()).map(move |k| (j, k)))
            .collect();
        let run = |comm: &dyn EncodeComm| -> Result<Vec<Arc<VideoEmbeds>>> {
            comm.encode(self, model, cached, &keys, &pixels, &grids, &seconds, &at)
        };
        let first = match self.host {
            Some(h) => {
                let h = h.lock().unwrap_or_else(|e| e.into_inner());
                Some(run(&*h).context("vision encode over the processes")?)
            }
            None => {
                let results = InProcess::spawn(self.sp, self.timeout(), |comm| run(&comm));
                let mut first = None;
                for (r, res) in results.into_iter().enumerate() {
                    let v = res.with_context(|| format!("vision encode, rank {r}"))?;
                    first.get_or_insert(v);
                }
                first
            }
        };
        let mut embeds = first.context("no rank ran")?.into_iter();
        Ok(inputs
            .iter()
            .map(|inp| {
                (0..inp.grids.len())
                    .flat_map(|_| embeds.next().map(|e| e.data.clone()).unwrap_or_default())
                    .collect()
            })
            .collect())
    }

    /// The rows of a mini-batch's micro-batches under `lm`'s embedding table (the video encoded
    /// again for each sample when reuse is off, its time added to `encode_s`).
    fn rows(
        &self,
        vlm: &Qwen25VL,
        lm: &Qwen2,
        mb: &[Vec<&Sample>],
        prompts: &HashMap<usize, VlPrompt>,
        pad: u32,
        encode_s: &mut f64,
    ) -> Result<Vec<VlRows>> {
        mb.iter()
            .map(|micro| {
                let feats = if self.cfg.video.reuse {
                    None
                } else {
                    let t0 = Instant::now();
                    let inputs: Vec<&VlInputs> =
                        micro.iter().map(|s| &prompts[&s.prompt].inputs).collect();
                    let f = self.encode(vlm, &inputs, None)?;
                    *encode_s += t0.elapsed().as_secs_f64();
                    Some(f)
                };
                let embeds = if self.gpu {
                    RowEmbeds::Features
                } else {
                    RowEmbeds::Whole
                };
                Ok(VlRows::new(
                    vlm,
                    lm,
                    micro,
                    prompts,
                    feats.as_deref(),
                    pad,
                    self.packs(),
                    embeds,
                ))
            })
            .collect()
    }

    /// Draws prompts until `want` records are prepared (skipping and counting bad ones) and
    /// encodes their videos once. The records come from the prompt feed, decoded ahead on its
    /// workers (a video whose embeddings are cached is not decoded).
    fn draw(
        &self,
        model: &Qwen25VL,
        want: usize,
        sampler: &mut PromptSampler,
        skipped: &mut usize,
        times: &mut VideoTimes,
    ) -> Result<Vec<(usize, VlPrompt)>> {
        let t0 = Instant::now();
        let mut drawn = Vec::with_capacity(want);
        let mut failures = 0;
        let max_prompt = self
            .cfg
            .data
            .max_prompt_len
            .min(model.config.text.max_position_embeddings.saturating_sub(1));
        let mut feed = self.feed.lock().unwrap_or_else(|e| e.into_inner());
        let dec = feed.ctx().clone();
        while drawn.len() < want {
            let i = sampler.next();
            let (draw, waited) = feed.next(i)?;
            times.wait_s += waited;
            let draw = draw.and_then(|(plan, fetched)| {
                // A cached video evicted since it was prefetched is decoded now.
                for v in &fetched.videos {
                    if v.key.as_ref().is_some_and(|k| !self.cache.contains(k)) {
                        v.pixels(&dec)
                            .map_err(|e| VlSkip::Video(plan.origin.clone(), e).to_string())?;
                    }
                }
                Ok((plan, fetched))
            });
            match draw {
                Ok((plan, _)) if plan.tokens.input_ids.len() > max_prompt => {
                    tracing::warn!(
                        "{}: skipping the record: the prompt has {} tokens, more than \
                         data.max_prompt_len = {} or the model's positions allow",
                        plan.origin,
                        plan.tokens.input_ids.len(),
                        self.cfg.data.max_prompt_len
                    );
                    *skipped += 1;
                    failures += 1;
                }
                Ok((plan, fetched)) => {
                    // Without reuse every pass re-encodes from the pixels, so they are kept.
                    let pixels = if self.cfg.video.reuse {
                        Vec::new()
                    } else {
                        let all: Vec<usize> = (0..fetched.videos.len()).collect();
                        fetched
                            .stacked(&all, &dec)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", plan.origin))?
                            .into_owned()
                    };
                    let inputs = VlInputs::from_plan(&plan, pixels, fetched.keys());
                    drawn.push((i, plan, inputs, fetched));
                }
                Err(skip) => {
                    tracing::warn!("{skip}");
                    *skipped += 1;
                    failures += 1;
                }
            }
            if failures > self.file.records.len() + want {
                bail!(
                    "{}: no usable record among {} draws ({} skipped)",
                    self.file.path.display(),
                    failures + drawn.len(),
                    failures
                );
            }
        }
        drop(feed);
        times.decode_s += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let refs: Vec<&VlInputs> = drawn.iter().map(|(_, _, inp, _)| inp).collect();
        let fetched: Vec<&FetchedRecord> = drawn.iter().map(|(_, _, _, f)| f).collect();
        let cached = self.cfg.video.reuse.then_some((fetched.as_slice(), &*dec));
        let features = self.encode(model, &refs, cached)?;
        times.encode_s += t1.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(drawn.len());
        for ((i, ex, inputs, _), features) in drawn.into_iter().zip(features) {
            let ids = inputs.tokens.clone();
            let rollout = Prompt::vl(
                model,
                ids.clone(),
                &inputs.grids,
                &inputs.seconds,
                &features,
            )
            .with_context(|| ex.origin.clone())?;
            let positions = rollout
                .mrope
                .as_ref()
                .map(|m| m.positions.clone())
                .unwrap_or_default();
            let next_pos = rollout.next_position() as u32;
            let record = &self.file.records[i];
            out.push((
                i,
                VlPrompt {
                    ids,
                    inputs,
                    features: Arc::new(features),
                    rollout,
                    positions,
                    next_pos,
                    text: format!("{}\n{}", record.problem.trim_end(), REASONING_INSTRUCTION),
                    answer: record.answer_field(),
                    problem_id: record.problem_id.clone(),
                },
            ));
        }
        Ok(out)
    }
}

/// A micro-batch: the loss's per-sample layout (`prompt ++ response[..-1]` rows [B, T]
/// right-padded, labelled at response tokens) and the rows the decoder runs ([`LocalRows`]:
/// tokens, targets, input embeddings (current table, video rows = features) and M-RoPE angles),
/// either those same rows or, with `packing`, the micro-batch packed by prompt.
struct VlRows {
    /// The decoder's rows, `model_b` of them (`model.embeds` as `embeds` says).
    model: LocalRows,
    embeds: RowEmbeds,
    /// With `RowEmbeds::Features`: each row's video features [tokens, d] (its prompt's, shared,
    /// or the row's own re-encoding), in placeholder order.
    features: Vec<Arc<Vec<f32>>>,
    /// The decoder's hidden size d.
    hidden: usize,
    model_b: usize,
    /// How per-sample positions map into `model` when it is packed by prompt.
    packing: Option<Packing>,
    /// Per-sample layout [B, T]: labelled positions.
    mask: Vec<bool>,
    advantages: Vec<f32>,
    /// Response tokens of each row (the whole sequence's, for sharded rows).
    seq_tokens: Vec<usize>,
    b: usize,
    t: usize,
}

/// What a [`VlRows`]'s `model.embeds` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowEmbeds {
    /// Every row's input embedding [B·T, d]: the CPU passes' input.
    Whole,
    /// None (`model.embeds` empty): each row's video features are referenced
    /// (`VlRows::features`) and the GPU policy looks the text rows up in its own table, so the
    /// host forms no [B·T, d] buffer and copies only a rank's shard of the features.
    Features,
}

/// The decoder's rows of a micro-batch packed by prompt ([`Packing`], `grpo/pack.rs`): tokens,
/// targets, M-RoPE positions (the prompt's, then each response continuing in 1-D as in its own
/// row) and input embeddings (the prompt's video rows = its features), sharing one copy of each
/// prompt in the scoring and update passes.
fn packed_rows(
    vlm: &Qwen25VL,
    lm: &Qwen2,
    samples: &[&Sample],
    prompts: &HashMap<usize, VlPrompt>,
    pad: u32,
    t_rows: usize,
) -> (Packing, LocalRows) {
    let d = lm.config.hidden_size;
    let vid = vlm.config.video_token_id;
    let pk = Packing::new(samples, t_rows);
    let (b, t) = (pk.b, pk.t);
    let tokens = pk.tokens(samples, pad);
    let (targets, mask) = pk.targets(samples, t_rows, IGNORE_INDEX);
    // The feature row of each prompt position that is a video placeholder, per prompt.
    let mut features_of: HashMap<usize, Vec<Option<usize>>> = HashMap::new();
    let mut pos = vec![0u32; 3 * b * t];
    let mut video_rows: Vec<(usize, usize, usize)> = Vec::new();
    for (at, src) in pk.source.iter().enumerate() {
        let Some((k, i)) = *src else { continue };
        let s = samples[k];
        let pr = &prompts[&s.prompt];
        let q = if i < s.prompt_len {
            let feats = features_of.entry(s.prompt).or_insert_with(|| {
                let mut f = 0;
                s.ids[..s.prompt_len]
                    .iter()
                    .map(|&x| {
                        (x == vid).then(|| {
                            f += 1;
                            f - 1
                        })
                    })
                    .collect()
            });
            if let Some(f) = feats[i] {
                video_rows.push((at, s.prompt, f));
            }
            pr.positions[i]
        } else {
            [pr.next_pos + (i - s.prompt_len) as u32; 3]
        };
        for (axis, &v) in q.iter().enumerate() {
            pos[axis * b * t + at] = v;
        }
    }
    let mut embeds = vec![0.0f32; b * t * d];
    reel_kernels::embedding::embedding_forward(
        &mut embeds,
        &tokens,
        &lm.params[lm.layout.embed.clone()],
        d,
    );
    for (at, prompt, f) in video_rows {
        let feats = &prompts[&prompt].features;
        embeds[at * d..(at + 1) * d].copy_from_slice(&feats[f * d..(f + 1) * d]);
    }
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    vlm.mrope_angles(&pos, &mut cos, &mut sin);
    let rows = LocalRows {
        tokens,
        targets,
        mask,
        embeds,
        cos,
        sin,
        t,
    };
    (pk, rows)
}

impl VlRows {
    /// Rows of `samples` with the embedding table of `lm` and each sample's video features
    /// (`features[k]`, or its prompt's); with `pack`, the model's rows are packed by prompt
    /// ([`Packing`]; whole embeddings only). `embeds` says what `model.embeds` holds.
    #[allow(clippy::too_many_arguments)]
    fn new(
        vlm: &Qwen25VL,
        lm: &Qwen2,
        samples: &[&Sample],
        prompts: &HashMap<usize, VlPrompt>,
        features: Option<&[Vec<f32>]>,
        pad: u32,
        pack: bool,
        embeds: RowEmbeds,
    ) -> Self {
        let b = samples.len();
        let t = rows_len(samples.iter().copied());
        let d = lm.config.hidden_size;
        let vid = vlm.config.video_token_id;
        let advantages = samples.iter().map(|s| s.advantage).collect();
        // Response tokens of each sample: `prompt_len - 1 ..= ids.len() - 2` are labelled.
        let seq_tokens = samples.iter().map(|s| s.ids.len() - s.prompt_len).collect();
        if pack {
            let (packing, model) = packed_rows(vlm, lm, samples, prompts, pad, t);
            return VlRows {
                model,
                embeds: RowEmbeds::Whole,
                features: Vec::new(),
                hidden: d,
                model_b: packing.b,
                mask: packing.whole(b, t).mask,
                packing: Some(packing),
                advantages,
                seq_tokens,
                b,
                t,
            };
        }
        let mut tokens = vec![pad; b * t];
        let mut targets = vec![IGNORE_INDEX; b * t];
        let mut mask = vec![false; b * t];
        let mut pos = vec![0u32; 3 * b * t];
        for (row, s) in samples.iter().enumerate() {
            let pr = &prompts[&s.prompt];
            let n = s.ids.len() - 1;
            tokens[row * t..row * t + n].copy_from_slice(&s.ids[..n]);
            for i in s.prompt_len.saturating_sub(1)..n {
                targets[row * t + i] = s.ids[i + 1] as i32;
                mask[row * t + i] = true;
            }
            for i in 0..t {
                let p = if i < s.prompt_len {
                    pr.positions[i]
                } else {
                    // Response (and padding, at the last real position) continue in 1-D.
                    let k = pr.next_pos + (i.min(n - 1) - s.prompt_len) as u32;
                    [k; 3]
                };
                for (axis, &v) in p.iter().enumerate() {
                    pos[axis * b * t + row * t + i] = v;
                }
            }
        }
        // Each row's video features: its own re-encoding, or its prompt's.
        let feats_of = |row: usize| -> &[f32] {
            match features {
                Some(f) => &f[row],
                None => &prompts[&samples[row].prompt].features,
            }
        };
        let mut rows_out = Vec::new();
        let mut row_features = Vec::new();
        if embeds == RowEmbeds::Features {
            // Referred to (a prompt's shared), copied only for a row's own re-encoding.
            row_features = samples
                .iter()
                .enumerate()
                .map(|(row, s)| match features {
                    Some(f) => Arc::new(f[row].clone()),
                    None => prompts[&s.prompt].features.clone(),
                })
                .collect();
        } else {
            rows_out = vec![0.0f32; b * t * d];
            let table = &lm.params[lm.layout.embed.clone()];
            reel_kernels::embedding::embedding_forward(&mut rows_out, &tokens, table, d);
            for (row, s) in samples.iter().enumerate() {
                // The prompt's video rows (a placeholder the policy sampled in its response is
                // a token like any other there, as the engine ran it).
                let rows = tokens[row * t..row * t + s.prompt_len]
                    .iter()
                    .enumerate()
                    .filter(|(_, &x)| x == vid);
                for ((i, _), v) in rows.zip(feats_of(row).chunks_exact(d)) {
                    let r = row * t + i;
                    rows_out[r * d..(r + 1) * d].copy_from_slice(v);
                }
            }
        }
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        vlm.mrope_angles(&pos, &mut cos, &mut sin);
        VlRows {
            model: LocalRows {
                tokens,
                targets,
                mask: mask.clone(),
                embeds: rows_out,
                cos,
                sin,
                t,
            },
            embeds,
            features: row_features,
            hidden: d,
            model_b: b,
            packing: None,
            mask,
            advantages,
            seq_tokens,
            b,
            t,
        }
    }

    fn n_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

/// Rows as the decoder takes them: [B, T] tokens and targets, input embeddings [B·T, d] and
/// M-RoPE angles [B·T, D/2]; a [`VlRows`]'s whole, or one rank's shard of it.
#[derive(Clone)]
struct LocalRows {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    mask: Vec<bool>,
    embeds: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
}

/// One rank's share of [`VlCtx::encode`] over its communicator (in-process ranks, or a launched
/// world's processes): a trait object so both kinds run the one generic body.
trait EncodeComm {
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        ctx: &VlCtx,
        model: &Qwen25VL,
        cached: Option<(&[&FetchedRecord], &DecodeCtx)>,
        keys: &[EmbedKey],
        pixels: &[f32],
        grids: &[VideoGrid],
        seconds: &[f32],
        at: &[(usize, usize)],
    ) -> Result<Vec<Arc<VideoEmbeds>>>;
}

impl<C: Communicator> EncodeComm for C {
    fn encode(
        &self,
        ctx: &VlCtx,
        model: &Qwen25VL,
        cached: Option<(&[&FetchedRecord], &DecodeCtx)>,
        keys: &[EmbedKey],
        pixels: &[f32],
        grids: &[VideoGrid],
        seconds: &[f32],
        at: &[(usize, usize)],
    ) -> Result<Vec<Arc<VideoEmbeds>>> {
        let d = model.config.text.hidden_size;
        if grids.is_empty() {
            return Ok(Vec::new());
        }
        let mut vws = reel_model::VisionWorkspace::new();
        // The frozen tower: its GPU copy when the rollouts are on the GPU, else the CPU's.
        let (mut boxed, mut cpu);
        let tower: &mut dyn reel_model::TowerForward = match ctx.gpu_tower {
            Some(t) => {
                boxed = t.forward();
                &mut *boxed
            }
            None => {
                cpu = reel_model::CpuTower {
                    tower: &model.vision,
                    ws: &mut vws,
                };
                &mut cpu
            }
        };
        if let Some((fetched, dec)) = cached {
            let lazy = |todo: &[usize]| {
                let mut px = Vec::new();
                for &v in todo {
                    let (j, k) = at[v];
                    let p = fetched[j].videos[k].pixels(dec);
                    px.extend_from_slice(p.map_err(VisionSpError::Pixels)?);
                }
                Ok(Cow::Owned(px))
            };
            return Ok(ctx
                .enc
                .encode_cached_with_on(self, tower, ctx.cache, keys, grids, seconds, lazy)?);
        }
        let f = ctx.enc.encode_on(self, tower, pixels, grids)?;
        let u = model.config.vision.merge_unit();
        let mut off = 0;
        Ok(grids
            .iter()
            .zip(seconds)
            .map(|(g, &s)| {
                let n = g.patches() / u;
                let e = VideoEmbeds {
                    data: f[off * d..(off + n) * d].to_vec(),
                    tokens: n,
                    d,
                    grid: *g,
                    second_per_grid_t: s,
                };
                off += n;
                Arc::new(e)
            })
            .collect())
    }
}

/// The rank's attention and, with sp > 1, how rows are cut.
enum RankAttn<'a> {
    Local,
    Sp(&'a SpAttention<InProcess>, usize),
}

impl RankAttn<'_> {
    fn rank(&self) -> usize {
        match self {
            RankAttn::Local => 0,
            RankAttn::Sp(_, rank) => *rank,
        }
    }

    /// The attention the decoder runs `r`'s rows with (the rank's `SpAttention`, told the
    /// packed layout by [`RankAttn::local`], when sharded).
    fn op<'a>(&'a self, r: &'a VlRows) -> &'a dyn AttentionOp {
        match (self, &r.packing) {
            (RankAttn::Local, Some(p)) => &p.attn,
            (RankAttn::Local, None) => &LocalAttention,
            (RankAttn::Sp(sp, _), _) => *sp,
        }
    }

    /// The rank's share of `r`'s decoder rows, and the sharding they were cut with (None at
    /// sp = 1, where the rows are `r.model` itself).
    fn local<'r>(&self, r: &'r VlRows, vid: u32) -> Result<(Cow<'r, LocalRows>, Option<Sharding>)> {
        if r.embeds != RowEmbeds::Whole {
            bail!("a CPU pass was given the GPU policy's rows (video features only)");
        }
        let RankAttn::Sp(sp, rank) = self else {
            return Ok((Cow::Borrowed(&r.model), None));
        };
        let (rank, m, b) = (*rank, &r.model, r.model_b);
        let sh = sp.set_seq_len(m.t)?;
        if let Some(p) = &r.packing {
            sp.set_packed(p.layout.clone())?;
        }
        let d = m.embeds.len() / (b * m.t);
        let half = m.cos.len() / (b * m.t);
        Ok((
            Cow::Owned(LocalRows {
                // Padding rows take no embedding gradient (marked as video rows).
                tokens: sh.shard(&m.tokens, b, 1, rank, vid)?,
                targets: sh.shard(&m.targets, b, 1, rank, IGNORE_INDEX)?,
                mask: sh.shard(&m.mask, b, 1, rank, false)?,
                embeds: sh.shard(&m.embeds, b, d, rank, 0.0)?,
                cos: sh.shard(&m.cos, b, half, rank, 1.0)?,
                sin: sh.shard(&m.sin, b, half, rank, 0.0)?,
                t: sh.local_len(),
            }),
            Some(sh),
        ))
    }
}

impl LocalRows {
    fn batch(&self, b: usize) -> EmbedsBatch<'_> {
        EmbedsBatch {
            embeds: &self.embeds,
            targets: &self.targets,
            rotary: Rotary::Angles {
                cos: &self.cos,
                sin: &self.sin,
            },
            b,
            t: self.t,
        }
    }
}

/// Runs `body(replica, rank attention)` on `dp × sp` in-process ranks (the caller's thread when
/// both are 1): rank `replica · sp + sp_rank`, each replica's sp ranks a sequence-parallel group
/// of their own. Results in that (world) order.
fn on_ranks<T: Send>(
    cfg: &GrpoRunConfig,
    lm: &Qwen2Config,
    body: impl Fn(usize, &RankAttn) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let (dp, p) = (cfg.parallel.dp.max(1), cfg.parallel.sp.max(1));
    if dp * p == 1 {
        return Ok(vec![body(0, &RankAttn::Local)?]);
    }
    let timeout = Duration::from_secs(cfg.parallel.timeout_s.max(1));
    let method = cfg
        .parallel
        .sp_method(lm.num_attention_heads, lm.num_key_value_heads)?;
    let overlap = if cfg.parallel.overlap {
        Overlap::Overlapped
    } else {
        Overlap::Blocking
    };
    let results = InProcess::spawn(dp * p, timeout, |comm| {
        let (replica, rank) = (comm.rank() / p, comm.rank() % p);
        if p == 1 {
            return body(replica, &RankAttn::Local);
        }
        let group = comm.split(replica, rank)?;
        let sp = SpAttention::with_method(group, method.clone(), overlap)?;
        body(replica, &RankAttn::Sp(&sp, rank))
    });
    results
        .into_iter()
        .enumerate()
        .map(|(r, res)| {
            res.with_context(|| {
                format!(
                    "rank {r} (replica {}, sequence-parallel rank {})",
                    r / p,
                    r % p
                )
            })
        })
        .collect()
}

/// The micro-batches replica `replica` of `dp` takes: `replica, replica + dp, …`, with their
/// indices.
fn replica_rows(
    rows: &[VlRows],
    replica: usize,
    dp: usize,
) -> impl Iterator<Item = (usize, &VlRows)> {
    rows.iter().enumerate().skip(replica).step_by(dp.max(1))
}

/// `log π(target)` [B·T] of every micro-batch under `lm` (old policy or reference), in the
/// per-sample layout, gathered from the shards of the replica that scored it.
fn logprob_pass(
    cfg: &GrpoRunConfig,
    lm: &Qwen2,
    rows: &[VlRows],
    vid: u32,
) -> Result<Vec<Vec<f32>>> {
    let (dp, p) = (cfg.parallel.dp.max(1), cfg.parallel.sp.max(1));
    let per_rank = on_ranks(cfg, &lm.config, |replica, ra| {
        let mut ws = Workspace::new(&lm.config, cfg.train.checkpoint);
        let mut out = Vec::with_capacity(rows.len());
        for (_, r) in replica_rows(rows, replica, dp) {
            let (loc, sh) = ra.local(r, vid)?;
            let mut lp = vec![0.0f32; r.model_b * loc.t];
            lm.token_logprobs_embeds(
                &mut ws,
                &loc.batch(r.model_b),
                ra.op(r),
                cfg.grpo.temperature,
                &mut lp,
                None,
            )?;
            out.push((lp, sh));
        }
        Ok(out)
    })?;
    let mut gathered = Vec::with_capacity(rows.len());
    for (j, r) in rows.iter().enumerate() {
        // Row j is the (j / dp)-th of replica j mod dp, whose ranks hold its shards.
        let (ranks, k) = (&per_rank[(j % dp) * p..(j % dp + 1) * p], j / dp);
        let model = match ranks[0][k].1 {
            None => ranks[0][k].0.clone(),
            Some(sh) => {
                let shards: Vec<&[f32]> = ranks.iter().map(|v| v[k].0.as_slice()).collect();
                sh.unshard(&shards, r.model_b, 1)?
            }
        };
        gathered.push(match &r.packing {
            None => model,
            Some(p) => p.whole(r.b, r.t).to_samples(&model),
        });
    }
    Ok(gathered)
}

/// One mini-batch's gradient: every rank's micro-batches (its replica's, sharded over the
/// replica's sp ranks) through `token_logprobs_embeds` → [`grpo_loss`] →
/// `backward_logprobs_embeds` → the embedding table; gradients summed over each replica's ranks
/// and then over the replicas, loss and metrics over every rank. `olds`/`refs` are the gathered [B·T] log-probabilities.
#[allow(clippy::too_many_arguments)]
fn minibatch_grads(
    cfg: &GrpoRunConfig,
    vlm: &Qwen25VL,
    rows: &[VlRows],
    olds: Option<&[Vec<f32>]>,
    refs: Option<&[Vec<f32>]>,
    loss_cfg: &PolicyLossConfig,
    scale: LossScale,
) -> Result<(Vec<f32>, f64, GrpoMetrics)> {
    let lm = &vlm.lm;
    let vid = vlm.config.video_token_id;
    let sharded = cfg.parallel.sp > 1;
    let (dp, p) = (cfg.parallel.dp.max(1), cfg.parallel.sp.max(1));
    let per_rank = on_ranks(cfg, &lm.config, |replica, ra| {
        let mut ws = Workspace::new(&lm.config, cfg.train.checkpoint);
        let mut grads = vec![0.0f32; lm.params.len()];
        let mut loss = 0.0f64;
        let mut metrics = GrpoMetrics::default();
        for (j, r) in replica_rows(rows, replica, dp) {
            let (loc, sh) = ra.local(r, vid)?;
            let nm = r.model_b * loc.t;
            let eb = loc.batch(r.model_b);
            let (mut lp, mut ent) = (vec![0.0f32; nm], vec![0.0f32; nm]);
            lm.token_logprobs_embeds(
                &mut ws,
                &eb,
                ra.op(r),
                cfg.grpo.temperature,
                &mut lp,
                Some(&mut ent),
            )?;
            // The loss reads the rank's labelled positions in a per-sample layout: the rank's
            // shard of plain rows, or the per-sample [B, T] layout with only the positions the
            // rank holds of packed rows (whole sequences' token counts in `seq_tokens`).
            let held = match &r.packing {
                Some(p) => Some(p.layout_for(sh.as_ref(), ra.rank(), r.b, r.t)?),
                None => None,
            };
            let (t, mask, lp, ent) = match &held {
                None => (loc.t, loc.mask.as_slice(), lp, ent),
                Some(l) => (
                    r.t,
                    l.mask.as_slice(),
                    l.to_samples(&lp),
                    l.to_samples(&ent),
                ),
            };
            let cut = |full: &[f32]| -> Result<Vec<f32>> {
                Ok(match (&sh, &held) {
                    (Some(sh), None) => sh.shard(full, r.b, 1, ra.rank(), 0.0)?,
                    _ => full.to_vec(),
                })
            };
            let old = match olds {
                Some(o) => cut(&o[j])?,
                None => lp.clone(),
            };
            let rf = refs.map(|r| cut(&r[j])).transpose()?;
            let x = PolicyTokens {
                b: r.b,
                t,
                logp: &lp,
                old_logp: &old,
                ref_logp: rf.as_deref(),
                entropy: Some(&ent),
                mask,
                advantages: &r.advantages,
                seq_tokens: sharded.then_some(r.seq_tokens.as_slice()),
            };
            let mut dlogp = vec![0.0f32; r.b * t];
            let (l, m) = grpo_loss(&x, loss_cfg, scale, &mut dlogp)?;
            loss += l;
            metrics.merge(&m);
            if let Some(l) = &held {
                dlogp = l.to_model(&dlogp, nm);
            }
            let dx = lm
                .backward_logprobs_embeds(&mut grads, &mut ws, &eb, &dlogp, ra.op(r))?
                .to_vec();
            vlm.text_embedding_backward(&mut grads, &dx, &loc.tokens)?;
        }
        if let RankAttn::Sp(sp, _) = ra {
            sp.with_comm(|c| c.all_reduce_sum(&mut grads))?;
        }
        Ok((grads, loss, metrics))
    })?;
    // Every rank of a replica holds its replica's sum; the first rank of each is added in.
    let mut it = per_rank.into_iter().enumerate();
    let (_, (mut grads, mut loss, mut metrics)) = it.next().context("no rank ran")?;
    for (rank, (g, l, m)) in it {
        if rank % p == 0 {
            grads.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
        loss += l;
        metrics.merge(&m);
    }
    Ok((grads, loss, metrics))
}

/// One rank's rows of a micro-batch as the GPU policy takes them: the whole unpacked rows, or
/// under sequence parallelism the rank's token shard of them (cut as the CPU ranks cut theirs;
/// padding rows are feature rows of zeros, so they take no embedding-table gradient). The
/// feature rows are a sample's prompt rows holding the video token (a response's video token
/// is an ordinary table row), their features copied out of the rows' input embeddings.
#[derive(Debug, PartialEq)]
struct GpuRows {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    mask: Vec<bool>,
    feature_rows: Vec<bool>,
    features: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
}

impl GpuRows {
    /// `r`'s rows (samples `micro`), whole or rank `rank`'s shard under `sh`.
    fn new(
        r: &VlRows,
        micro: &[&Sample],
        vid: u32,
        sh: Option<Sharding>,
        rank: usize,
    ) -> Result<GpuRows> {
        let (m, b, t) = (&r.model, r.model_b, r.model.t);
        let d = r.hidden;
        let mut feature = vec![false; m.tokens.len()];
        for (k, s) in micro.iter().enumerate() {
            for i in 0..s.prompt_len.min(t) {
                feature[k * t + i] = m.tokens[k * t + i] == vid;
            }
        }
        // Whole row i's features: row i of whole embeddings, or of features-only rows the n-th
        // video row of its sequence, the n-th row of that sequence's features.
        let nth: Vec<usize> = match r.embeds {
            RowEmbeds::Whole => Vec::new(),
            RowEmbeds::Features => {
                for (k, s) in micro.iter().enumerate() {
                    let (have, need) = (r.features[k].len(), feature[k * t..(k + 1) * t].iter());
                    let need = need.filter(|&&f| f).count() * d;
                    if have != need {
                        bail!(
                            "sample {k} (prompt {}): {} video tokens but features for {}",
                            s.prompt,
                            need / d.max(1),
                            have / d.max(1)
                        );
                    }
                }
                feature
                    .chunks(t)
                    .flat_map(|row| {
                        row.iter().scan(0, |n, &f| {
                            *n += f as usize;
                            Some(*n - f as usize)
                        })
                    })
                    .collect()
            }
        };
        let row = |i: usize| -> &[f32] {
            match r.embeds {
                RowEmbeds::Whole => &m.embeds[i * d..(i + 1) * d],
                RowEmbeds::Features => {
                    let n = nth[i];
                    &r.features[i / t][n * d..(n + 1) * d]
                }
            }
        };
        let Some(sh) = sh else {
            let features = feature
                .iter()
                .enumerate()
                .filter(|(_, &f)| f)
                .flat_map(|(i, _)| row(i))
                .copied()
                .collect();
            return Ok(GpuRows {
                tokens: m.tokens.clone(),
                targets: m.targets.clone(),
                mask: m.mask.clone(),
                feature_rows: feature,
                features,
                cos: m.cos.clone(),
                sin: m.sin.clone(),
                t,
            });
        };
        let half = m.cos.len() / (b * t);
        // Which whole row each shard row is (padding: none), to copy only the shard's features.
        let all: Vec<u32> = (0..(b * t) as u32).collect();
        let src = sh.shard(&all, b, 1, rank, u32::MAX)?;
        let feature_rows = sh.shard(&feature, b, 1, rank, true)?;
        let mut features = Vec::new();
        for (&f, &i) in feature_rows.iter().zip(&src) {
            match (f, i) {
                (false, _) => {}
                (true, u32::MAX) => features.extend(std::iter::repeat_n(0.0, d)),
                (true, i) => features.extend_from_slice(row(i as usize)),
            }
        }
        Ok(GpuRows {
            tokens: sh.shard(&m.tokens, b, 1, rank, vid)?,
            targets: sh.shard(&m.targets, b, 1, rank, IGNORE_INDEX)?,
            mask: sh.shard(&m.mask, b, 1, rank, false)?,
            feature_rows,
            features,
            cos: sh.shard(&m.cos, b, half, rank, 1.0)?,
            sin: sh.shard(&m.sin, b, half, rank, 0.0)?,
            t: sh.local_len(),
        })
    }

    fn batch(&self, vid: u32, b: usize) -> GpuEmbedsBatch<'_> {
        GpuEmbedsBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            feature_token: vid,
            feature_rows: Some(&self.feature_rows),
            features: &self.features,
            cos: &self.cos,
            sin: &self.sin,
            b,
            t: self.t,
        }
    }
}

/// [`logprob_pass`] on the GPU policy: `log π(target)` [B·T] of every micro-batch with
/// `weights` (the policy's, or the reference's). Each rank scores its replica's micro-batches
/// (its token shard of them), scatters its log-probabilities into the whole [B·T] layout
/// (zeros where another rank holds the position) and the layouts are summed over the ranks,
/// so every rank ends with every micro-batch's, exactly.
fn gpu_logprob_pass(
    cfg: &GrpoRunConfig,
    gp: &mut GpuPolicy,
    weights: Weights,
    rows: &[VlRows],
    micros: &[Vec<&Sample>],
    vid: u32,
) -> Result<Vec<Vec<f32>>> {
    let mut per_rank = gp.each(|_, g| {
        let ((replica, dp), rank) = (g.dp_coords(), g.sp_rank());
        let mut all: Vec<Vec<f32>> = rows.iter().map(|r| vec![0.0; r.b * r.t]).collect();
        for (j, r) in replica_rows(rows, replica, dp) {
            let sh = g.set_seq_len(r.t)?;
            let loc = GpuRows::new(r, &micros[j], vid, sh, rank)?;
            let mut lp = vec![0.0f32; r.b * loc.t];
            g.token_logprobs_embeds(
                &loc.batch(vid, r.b),
                weights,
                cfg.grpo.temperature,
                &mut lp,
                None,
            )?;
            all[j] = match sh {
                None => lp,
                Some(sh) => {
                    let zeros = vec![0.0f32; lp.len()];
                    let shards: Vec<&[f32]> = (0..sh.ranks())
                        .map(|k| if k == rank { &lp[..] } else { &zeros[..] })
                        .collect();
                    sh.unshard(&shards, r.b, 1)?
                }
            };
        }
        let mut flat = all.concat();
        g.all_reduce_sum_host(&mut flat)?;
        let mut at = 0;
        Ok(all
            .iter()
            .map(|a| {
                at += a.len();
                flat[at - a.len()..at].to_vec()
            })
            .collect::<Vec<_>>())
    })?;
    Ok(per_rank.swap_remove(0))
}

/// [`minibatch_grads`] on the GPU policy: every rank's micro-batches (its replica's, its token
/// shard of them) through `token_logprobs_embeds` → [`grpo_loss`] →
/// `backward_logprobs_embeds` (decoder and embedding-table gradients added on the device), the
/// gradients then summed over every rank on the device; returns the loss and metrics of every
/// rank, merged in world order (gathered exactly, so every rank returns the same).
#[allow(clippy::too_many_arguments)]
fn gpu_minibatch(
    cfg: &GrpoRunConfig,
    gp: &mut GpuPolicy,
    rows: &[VlRows],
    micros: &[Vec<&Sample>],
    olds: Option<&[Vec<f32>]>,
    refs: Option<&[Vec<f32>]>,
    loss_cfg: &PolicyLossConfig,
    scale: LossScale,
    vid: u32,
) -> Result<(f64, GrpoMetrics)> {
    let mut per_rank = gp.each(|_, g| {
        let ((replica, dp), rank) = (g.dp_coords(), g.sp_rank());
        let mut loss = 0.0f64;
        let mut metrics = GrpoMetrics::default();
        for (j, r) in replica_rows(rows, replica, dp) {
            let sh = g.set_seq_len(r.t)?;
            let loc = GpuRows::new(r, &micros[j], vid, sh, rank)?;
            let eb = loc.batch(vid, r.b);
            let n = r.b * loc.t;
            let (mut lp, mut ent) = (vec![0.0f32; n], vec![0.0f32; n]);
            g.token_logprobs_embeds(
                &eb,
                Weights::Policy,
                cfg.grpo.temperature,
                &mut lp,
                Some(&mut ent),
            )?;
            let cut = |full: &[f32]| -> Result<Vec<f32>> {
                Ok(match sh {
                    Some(sh) => sh.shard(full, r.b, 1, rank, 0.0)?,
                    None => full.to_vec(),
                })
            };
            let old = match olds {
                Some(o) => cut(&o[j])?,
                None => lp.clone(),
            };
            let rf = refs.map(|x| cut(&x[j])).transpose()?;
            let x = PolicyTokens {
                b: r.b,
                t: loc.t,
                logp: &lp,
                old_logp: &old,
                ref_logp: rf.as_deref(),
                entropy: Some(&ent),
                mask: &loc.mask,
                advantages: &r.advantages,
                seq_tokens: sh.is_some().then_some(r.seq_tokens.as_slice()),
            };
            let mut dlogp = vec![0.0f32; n];
            let (l, m) = grpo_loss(&x, loss_cfg, scale, &mut dlogp)?;
            loss += l;
            metrics.merge(&m);
            g.backward_logprobs_embeds(&eb, &dlogp, false)?;
        }
        // Sharded gradients meet in every backward: a replica short of a micro-batch this
        // mini-batch joins the others' last one with nothing.
        let had = replica_rows(rows, replica, dp).count();
        for _ in had..rows.len().div_ceil(dp.max(1)) {
            g.skip_backward()?;
        }
        g.all_reduce_grads(reel_model::LossStats::default())?;
        let mut mine = u64_words(loss.to_bits()).to_vec();
        mine.extend(metrics.packed());
        let words = mine.len();
        let all = g.all_gather_f32(&mine)?;
        let (mut loss, mut metrics) = (0.0f64, GrpoMetrics::default());
        for w in all.chunks(words) {
            let bad = || anyhow::anyhow!("the ranks' gathered loss statistics are not words");
            loss += f64::from_bits(words_u64(&w[..4]).ok_or_else(bad)?);
            metrics.merge(&GrpoMetrics::from_packed(&w[4..]).ok_or_else(bad)?);
        }
        Ok((loss, metrics))
    })?;
    Ok(per_rank.swap_remove(0))
}

/// Whether a launched run asks for the rollout decoders' shared prefill (`parallel.
/// shared_prefill_tokens` > 0, sp > 1, one prefill per group: `video.reuse`); every process
/// decides alike.
fn shares_prefill(cfg: &GrpoRunConfig) -> bool {
    cfg.parallel.shared_prefill_tokens > 0 && cfg.parallel.sp > 1 && cfg.video.reuse
}

/// The process of a launched world (`world` processes) that rolls out a round's prompt `k`.
fn rollout_owner(k: usize, world: usize) -> usize {
    k % world
}

/// The groups process `rank`'s rollout pool must hold at once: each prompt it decodes samples
/// of (its own, or its share of a shared one), and one more while it helps a peer's shared
/// prefill without samples of its own (that table is given back at once).
fn pool_groups(holders: &[Vec<usize>], rank: usize, sp: usize, g: usize) -> usize {
    let (mut decodes, mut helps) = (0, false);
    for h in holders.iter().filter(|h| h.contains(&rank)) {
        if h.len() == 1 || !sample_share(g, sp, rank % sp).is_empty() {
            decodes += 1;
        } else {
            helps = true;
        }
    }
    decodes + usize::from(helps)
}

/// The processes holding prompt k's responses, in sample order: its owner alone, or, for a
/// prompt prefilled by the owner's sp group together (`shared`, sp > 1), every process of that
/// group (ranks dp_rank · sp + 0..sp), each decoding its `sample_share` of the samples.
fn rollout_holders(k: usize, world: usize, sp: usize, shared: bool) -> Vec<usize> {
    let owner = rollout_owner(k, world);
    match shared && sp > 1 {
        true => {
            let first = owner / sp * sp;
            (first..first + sp).collect()
        }
        false => vec![owner],
    }
}

/// Every prompt's responses (per prompt, per sample, the token ids) and the engines' prefill and
/// decode token counts.
type Rollouts = (Vec<Vec<Vec<u32>>>, u64, u64);

/// Every process's rollouts of a launched world, in prompt order: `mine` holds this process's
/// shares of the prompts it holds (`holders`: its own, and its share of the samples of its sp
/// group's shared prompts), each process's packed as f32
/// words ([`pack_rollouts`]) and gathered over NCCL by the policy's groups; the engines' prefill
/// and decode token counts summed.
fn gather_rollouts(
    gp: &GpuPolicy,
    mine: &[Vec<Vec<u32>>],
    prefill: u64,
    decode: u64,
    holders: &[Vec<usize>],
) -> Result<Rollouts> {
    let mut w = pack_rollouts(mine, prefill, decode)?;
    let lens = gp.lead().all_gather_f32(&[w.len() as f32])?;
    let width = lens.iter().fold(0.0f32, |a, &b| a.max(b)) as usize;
    w.resize(width, 0.0);
    let all = gp.lead().all_gather_f32(&w)?;
    unpack_rollouts(&all, width, lens.len(), holders)
}

/// One process's rollouts as f32 words, each exact: the prefill and decode counts (four 16-bit
/// words each), the number of prompts, then per prompt its samples and per sample its length
/// and token ids (below 2^24, as is the whole length).
fn pack_rollouts(mine: &[Vec<Vec<u32>>], prefill: u64, decode: u64) -> Result<Vec<f32>> {
    let mut w: Vec<f32> = Vec::new();
    w.extend(u64_words(prefill));
    w.extend(u64_words(decode));
    w.push(mine.len() as f32);
    for group in mine {
        w.push(group.len() as f32);
        for r in group {
            w.push(r.len() as f32);
            w.extend(r.iter().map(|&t| t as f32));
        }
    }
    if w.len() >= 1 << 24 || mine.iter().flatten().flatten().any(|&t| t >= 1 << 24) {
        bail!("rollouts too large to gather as f32 words");
    }
    Ok(w)
}

/// The inverse of [`pack_rollouts`] over `world` processes' words, `width` each (padded), in
/// rank order: every prompt's responses in prompt order (prompt k's from the processes
/// `holders[k]`, their shares put together in that order) and the summed counts.
fn unpack_rollouts(
    all: &[f32],
    width: usize,
    world: usize,
    holders: &[Vec<usize>],
) -> Result<Rollouts> {
    let (mut pre, mut dec) = (0u64, 0u64);
    let mut per_rank: Vec<std::vec::IntoIter<Vec<Vec<u32>>>> = Vec::with_capacity(world);
    for r in 0..world {
        let chunk = all.get(r * width..(r + 1) * width).unwrap_or(&[]);
        let bad = || anyhow::anyhow!("rank {r}'s rollouts arrived malformed");
        let mut it = chunk.iter().copied();
        let mut word = || it.next().ok_or_else(bad);
        let mut u64_of = || -> Result<u64> {
            let q = [word()?, word()?, word()?, word()?];
            words_u64(&q).ok_or_else(bad)
        };
        pre += u64_of()?;
        dec += u64_of()?;
        let n = word()? as usize;
        let mut groups = Vec::with_capacity(n);
        for _ in 0..n {
            let samples = word()? as usize;
            let mut group = Vec::with_capacity(samples);
            for _ in 0..samples {
                let len = word()? as usize;
                group.push(
                    (0..len)
                        .map(|_| Ok(word()? as u32))
                        .collect::<Result<Vec<u32>>>()?,
                );
            }
            groups.push(group);
        }
        per_rank.push(groups.into_iter());
    }
    let mut every = Vec::with_capacity(holders.len());
    for (k, hs) in holders.iter().enumerate() {
        let mut responses = Vec::new();
        for &q in hs {
            let from = per_rank.get_mut(q).context("no rank holds a prompt")?;
            responses.extend(
                from.next()
                    .with_context(|| format!("prompt {k}'s rollouts from rank {q} are missing"))?,
            );
        }
        every.push(responses);
    }
    Ok((every, pre, dec))
}

/// Runs (or resumes) GRPO of a Qwen2.5-VL checkpoint (`model.path`, model_type `qwen2_5_vl`)
/// on LongVideo-Reason prompts (`data.prompts`) with MR-SP (module docs).
pub fn run_vl_grpo(cfg: &GrpoRunConfig, mut opts: GrpoOptions) -> Result<VlGrpoSummary> {
    // Under `reel launch`: this process is one rank of the dp × sp grid on its own GPU (module
    // docs); rank 0 writes.
    let launched = crate::device::Launched::from_env()
        .map_err(anyhow::Error::msg)?
        .filter(|l| l.world > 1);
    let lead = launched.as_ref().is_none_or(|l| l.rank == 0);
    let dims = cfg.parallel.dims()?;
    let ordinal = match &launched {
        Some(l) => {
            let o = crate::device::process_gpu(
                "grpo",
                l,
                dims,
                cfg.train.device,
                false,
                crate::device::BUILT_WITH_CUDA,
                crate::device::gpu_count,
            )
            .map_err(anyhow::Error::msg)?;
            crate::device::set_process_gpu_ordinal(o);
            Some(o)
        }
        None => None,
    };
    // A launched process has no CPU path: "auto" means its GPU.
    let device = match launched {
        Some(_) => crate::Device::Cuda,
        None => cfg.train.device,
    };
    cfg.validate_vl()?;
    let tok_dir = cfg.tokenizer_dir();
    let tok = Tokenizer::from_dir(tok_dir)
        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let init_dir = &cfg.model.path;
    let settings = VideoSettings {
        sampling: parse_sampling(&cfg.video.sampling)?,
        processor: VideoProcessorConfig::from_dir(init_dir)?,
    };
    let processor = VideoProcessor::new(settings.processor.clone())
        .map_err(|e| anyhow::anyhow!("{}: {e}", init_dir.display()))?;
    let (file, bad) = ReasonFile::read_lenient(&cfg.data.prompts)?;
    for e in &bad {
        tracing::warn!("skipping malformed record: {e}");
    }
    if file.records.is_empty() {
        bail!(
            "{}: no usable record ({} malformed)",
            cfg.data.prompts.display(),
            bad.len()
        );
    }
    let (ckpts, resumed) = open_run(cfg, opts.resume, lead)?;
    let load = |d: &Path| load_vl_checkpoint(d).with_context(|| format!("loading {}", d.display()));
    let mut model = load(resumed.as_deref().unwrap_or(init_dir))?;
    // The reference is the initial weights: the model's own unless the run resumed (a copy is
    // made below only if the CPU scores with it).
    let mut reference = match (cfg.grpo.needs_reference(), &resumed) {
        (true, Some(_)) => Some(load(init_dir)?.lm),
        _ => None,
    };
    // The rollouts' GPU decoder of the language model, kept for the run (weights refreshed
    // after each step): one engine rolls out every group whatever dp × sp the passes run on.
    let gpu = rollout_gpu(device, None, "train.device", ROLLOUTS)?;
    let have_gpu = gpu.is_some();
    let mut decoder = rollout_decoder(
        gpu,
        device,
        &model.lm,
        cfg.rollout.gpu_f32,
        "train.device",
        ROLLOUTS,
    )?;
    let rollout_device = rollout_device(decoder.as_ref());
    // With the rollouts on the GPU, the frozen tower encodes there too.
    let gpu_tower = decoder
        .as_ref()
        .and_then(|_| crate::device::gpu_tower(cfg.video.gpu_tower, &model.vision, ROLLOUTS));
    let tower_device = crate::device::tower_device(gpu_tower.as_ref());
    let mut opt = adamw_for(cfg, &model.lm.layout);
    let mut skipped = bad.len();
    // A GPU policy's ranks read their own parts of a resumed optimizer state (below); the host
    // optimizer takes it whole only when the update stays on the CPU.
    let gpu_policy = (have_gpu || launched.is_some()) && cfg.train.gpu_update;
    let (mut sampler, start_step, mut recent) = match &resumed {
        Some(dir) => {
            let host_opt = (!gpu_policy).then_some(&mut opt);
            let r = load_resume_state(cfg, dir, host_opt, file.records.len(), &file.path)?;
            skipped = r.data["skipped_records"].as_u64().unwrap_or(0) as usize;
            (r.sampler, r.step, r.recent)
        }
        None => (
            PromptSampler::new(file.records.len(), cfg.data.seed),
            0,
            Vec::new(),
        ),
    };
    // Scoring and the update on the GPU (sp = 1): the decoder's policy, its optimizer state and
    // the reference weights on the device.
    let reference_params = match (&reference, cfg.grpo.needs_reference()) {
        (Some(r), _) => Some(r.params.as_slice()),
        (None, true) => Some(model.lm.params.as_slice()),
        (None, false) => None,
    };
    let (method, timeout) = (
        cfg.parallel.sp_method(
            model.lm.config.num_attention_heads,
            model.lm.config.num_key_value_heads,
        )?,
        Duration::from_secs(cfg.parallel.timeout_s.max(1)),
    );
    let overlap = if cfg.parallel.overlap {
        Overlap::Overlapped
    } else {
        Overlap::Blocking
    };
    // A launched world's host communicator: MR-SP's encoding splits each video over the
    // processes through it.
    let mut host: Option<Mutex<crate::device::HostComm>> = None;
    // Whether the rollout decoder prefills long prompts with its sp group (launched, below).
    let mut shared_prefill_on = false;
    let ranks = match (&launched, ordinal) {
        (Some(l), Some(o)) => {
            let comms = crate::device::ProcComms {
                host: true,
                prefill: shares_prefill(cfg),
            };
            let mut p = crate::device::gpu_proc(l, dims, o, method, overlap, timeout, comms)?;
            host = p.take_host().map(Mutex::new);
            if let (Some(comm), Some(d)) = (p.take_prefill(), decoder.as_mut()) {
                d.set_prefill_group(comm)
                    .context("the rollout decoder's prefill group")?;
                shared_prefill_on = true;
                tracing::info!(
                    "prompts of {} tokens or more are prefilled by the {} processes of this \
                     replica together",
                    cfg.parallel.shared_prefill_tokens,
                    dims.sp()
                );
            }
            tracing::info!(
                "rank {} of {} processes, one GPU each over NCCL: dp {} × sp {} ({} attention) on \
                 {}",
                l.rank,
                l.world,
                dims.dp(),
                dims.sp(),
                cfg.parallel.schedule,
                p.describe()
            );
            PolicyRanks::Proc(Box::new(p))
        }
        _ if dims.world() == 1 => PolicyRanks::One,
        _ => PolicyRanks::InProcess {
            dims,
            method,
            overlap,
            timeout,
        },
    };
    let resume_opt = resumed
        .as_ref()
        .filter(|_| gpu_policy)
        .map(|d| d.join(crate::checkpoint::OPTIMIZER_FILE));
    if let (Some(d), true) = (decoder.as_mut(), gpu_policy) {
        // Room for the policy: the decoder reads its weights in place afterwards.
        d.release_for_policy()?;
    }
    let mut gm: Option<GpuPolicy> = grpo_policy_ranks(
        have_gpu,
        cfg.train.gpu_update,
        device,
        &model.lm,
        reference_params,
        cfg.train.checkpoint,
        &opt,
        "train.device",
        ranks,
        cfg.parallel.zero_stage(),
        resume_opt.as_deref(),
    )?;
    if let (None, Some(dir), true) = (&gm, &resumed, gpu_policy) {
        // "auto" fell back to the CPU: the host optimizer takes the state after all.
        crate::grpo::load_optimizer(dir, &mut opt)?;
    }
    if let Some(d) = decoder.as_mut() {
        // SAFETY: the policy lives for the whole run, longer than the decoder's steps, and
        // each step's update reaches the decoder through `load_from_policy` before the next
        // rollout.
        unsafe { d.attach_policy(gm.as_ref().map(GpuPolicy::lead), &model.lm.params) }?;
    }
    if gm.is_some() {
        reference = None;
    } else {
        cfg.parallel
            .note_unsharded("scoring and the update run on the CPU");
        if cfg.grpo.needs_reference() && reference.is_none() {
            // Scoring on the CPU: a frozen copy of the initial weights.
            reference = Some(Qwen2::from_params(
                model.lm.config.clone(),
                model.lm.params.clone(),
            )?);
        }
    }
    let update_device = update_device(gm.as_ref().map(GpuPolicy::lead));
    if tok.vocab_size() > model.config.text.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tok.vocab_size(),
            model.config.text.vocab_size
        );
    }
    let pad = tok
        .pad_token_id()
        .context("the tokenizer has neither a pad nor an eos token")?;
    let stop = crate::accuracy::stop_token_ids(&tok, &model.lm);
    let detok = detokenizer(&tok);
    // A launched run's files are rank 0's: the other processes keep their caches in memory.
    let cache = Arc::new(match &cfg.video.cache_dir {
        Some(d) if lead => EmbedCache::with_dir(cfg.video.cache_bytes, d)?,
        _ => EmbedCache::new(cfg.video.cache_bytes),
    });
    let enc = SpVisionEncoder::new();
    let weights = weights_fingerprint(&model.vision.params);
    let feed = prompt_feed(
        cfg, &file, &tok, &settings, processor, &cache, weights, &sampler,
    );
    let ctx = VlCtx {
        cfg,
        file: &file,
        feed: Mutex::new(feed),
        cache: &cache,
        enc: &enc,
        sp: cfg.parallel.sp,
        host: host.as_ref(),
        gpu: gm.is_some(),
        gpu_tower: gpu_tower.as_ref(),
    };
    let reward = cfg.grpo.reward.build();
    let scorer = Scorer::new(cfg, &tok, &reward);
    let g = cfg.grpo.group_size;
    let loss_cfg = cfg.grpo.policy_loss();
    let updates = cfg.train.mini_batches * cfg.train.ppo_epochs;
    let vid = model.config.video_token_id;
    let mut reporter = lead
        .then(|| Reporter::open(cfg, &opts, start_step))
        .transpose()?;
    // A launched world splits each round's groups over its processes (group k to rank k mod
    // world) and gathers the responses.
    let (wrank, world) = launched.as_ref().map_or((0, 1), |l| (l.rank, l.world));
    let mut summary = GrpoSummary::starting(start_step, resumed.as_deref().unwrap_or(init_dir));
    let result: Result<()> = (|| {
        for done in steps_to_run(cfg, &opts, start_step) {
            let at = format!("step {done}");
            let t_step = Instant::now();
            let mut times = VideoTimes::default();
            let mut prompts: HashMap<usize, VlPrompt> = HashMap::new();

            // 0–2. Decode, encode once, roll out; rewards and advantages.
            let c = scorer.collect(&at, &mut sampler, |want, round, sampler| {
                let drawn = ctx.draw(&model, want, sampler, &mut skipped, &mut times)?;
                let longest = drawn.iter().map(|(_, p)| p.ids.len()).max().unwrap_or(0);
                let max_pos = model.config.text.max_position_embeddings;
                // Who holds each prompt's responses: its owner, or for a long prompt every
                // process of the owner's sp group (prefilled together, each decoding its share
                // of the samples); every process works this out alike.
                let sp = dims.sp();
                let holders: Vec<Vec<usize>> = drawn
                    .iter()
                    .enumerate()
                    .map(|(k, (_, pr))| {
                        let shared =
                            shared_prefill_on && pr.ids.len() >= cfg.parallel.shared_prefill_tokens;
                        rollout_holders(k, world, sp, shared)
                    })
                    .collect();
                // With reuse each group's prompt is prefilled once and its samples fork from
                // it; without, every sample holds its own prompt. The pool holds what this
                // process rolls out (and, helping a peer's prefill, one prompt at a time).
                let held = pool_groups(&holders, wrank, sp, g);
                let ecfg = if cfg.video.reuse {
                    grouped_engine_config(held, g, longest, cfg.grpo.max_response_tokens, max_pos)
                } else {
                    engine_config(
                        held * (g + 2),
                        longest,
                        cfg.grpo.max_response_tokens,
                        max_pos,
                    )
                };
                let mut engine = crate::device::rollout_engine(decoder.as_mut(), &model.lm, ecfg)?
                    .with_detokenizer(detok.clone());
                let mut extra_encode = 0.0;
                // The group (or, reuse off, one group a sample) holding this process's share
                // of each prompt.
                let mut group_of: Vec<Vec<GroupId>> = vec![Vec::new(); drawn.len()];
                // Shared prompts first, in prompt order on every process of the group.
                let t_shared = Instant::now();
                for (k, (_, pr)) in drawn.iter().enumerate() {
                    if holders[k].len() < 2 || !holders[k].contains(&wrank) {
                        continue;
                    }
                    let named = || format!("{at}: prompt {} (shared prefill)", pr.problem_id);
                    let share = sample_share(g, sp, wrank % sp);
                    let params = generation_params(cfg, done, round, k, &stop);
                    let id = engine
                        .add_group_shared(&pr.rollout, share, params)
                        .with_context(named)?;
                    group_of[k].extend(id);
                }
                if holders.iter().any(|h| h.len() > 1) {
                    times.shared_prefill_s += t_shared.elapsed().as_secs_f64();
                }
                for (k, (_, pr)) in drawn.iter().enumerate() {
                    if holders[k] != [wrank] {
                        continue;
                    }
                    let params = generation_params(cfg, done, round, k, &stop);
                    let named = || format!("{at}: prompt {}", pr.problem_id);
                    if cfg.video.reuse {
                        let id = engine
                            .add_group(pr.rollout.clone(), g, params)
                            .with_context(named)?;
                        group_of[k].push(id);
                    } else {
                        // One group per sample (seeded as sample j of the group would be), its
                        // video encoded again for it.
                        for j in 0..g {
                            let t0 = Instant::now();
                            let f = ctx.encode(&model, &[&pr.inputs], None)?.remove(0);
                            extra_encode += t0.elapsed().as_secs_f64();
                            let mut p = params.clone();
                            p.sampling.seed = sample_seed(params.sampling.seed, j);
                            let (grids, secs) = (&pr.inputs.grids, &pr.inputs.seconds);
                            let prompt = Prompt::vl(&model, pr.ids.clone(), grids, secs, &f)?;
                            group_of[k].push(engine.add_group(prompt, 1, p).with_context(named)?);
                        }
                    }
                }
                times.encode_s += extra_encode;
                let outs = engine.run().with_context(|| format!("{at}: rollout"))?;
                let st = engine.stats();
                times.preemptions += st.preemptions;
                times.shared_preemptions += st.shared_preemptions;
                let mut outs: HashMap<GroupId, GroupOutput> =
                    outs.into_iter().map(|o| (o.id, o)).collect();
                // This process's shares of the prompts it holds, in prompt order, then
                // (launched) every process's.
                let mut mine: Vec<Vec<Vec<u32>>> = Vec::new();
                for k in (0..drawn.len()).filter(|&k| holders[k].contains(&wrank)) {
                    let mut responses = Vec::new();
                    for id in &group_of[k] {
                        let o = outs.remove(id).context("a group without output")?;
                        responses.extend(o.samples.into_iter().map(|s| s.ids));
                    }
                    mine.push(responses);
                }
                let (mut every, prefill, decode) = match (world, gm.as_ref()) {
                    (1, _) => (mine, st.prefill_tokens, st.decode_tokens),
                    (_, Some(gp)) => {
                        gather_rollouts(gp, &mine, st.prefill_tokens, st.decode_tokens, &holders)
                            .with_context(|| format!("{at}: gathering the processes' rollouts"))?
                    }
                    (_, None) => bail!("a launched run holds its policy on the GPU"),
                };
                let mut groups = Vec::with_capacity(drawn.len());
                for (i, pr) in drawn {
                    let responses = std::mem::take(&mut every[groups.len()]);
                    groups.push(RolledGroup {
                        prompt: i,
                        prompt_ids: pr.ids.clone(),
                        text: pr.text.clone(),
                        answer: pr.answer.clone(),
                        problem_id: pr.problem_id.clone(),
                        responses,
                    });
                    prompts.insert(i, pr);
                }
                Ok(RoundWork {
                    groups,
                    prefill,
                    decode,
                })
            })?;
            let rollout_s = c.rollout_s - times.decode_s - times.encode_s;
            let samples = &c.samples;
            let per_mini = samples.len().div_ceil(cfg.train.mini_batches).max(1);
            let minis: Vec<Vec<Vec<&Sample>>> = samples
                .chunks(per_mini)
                .map(|mb| {
                    mb.chunks(cfg.train.micro_batch_seqs)
                        .map(|c| c.iter().collect())
                        .collect()
                })
                .collect();
            let mut encode_s = 0.0;

            // 3. Old/reference log-probabilities.
            let t2 = Instant::now();
            let mut refs: Vec<Vec<Vec<f32>>> = Vec::new();
            if cfg.grpo.needs_reference() {
                for mb in &minis {
                    let lp = match (gm.as_mut(), &reference) {
                        (Some(g), _) => {
                            let rows =
                                ctx.rows(&model, &model.lm, mb, &prompts, pad, &mut encode_s)?;
                            gpu_logprob_pass(cfg, g, Weights::Reference, &rows, mb, vid)
                        }
                        (None, Some(r)) => {
                            let rows = ctx.rows(&model, r, mb, &prompts, pad, &mut encode_s)?;
                            logprob_pass(cfg, r, &rows, vid)
                        }
                        (None, None) => unreachable!("the reference is loaded"),
                    };
                    refs.push(lp.with_context(|| format!("{at}: reference"))?);
                }
                summary.ref_passes += 1;
            }
            let mut olds: Vec<Vec<Vec<f32>>> = Vec::new();
            if updates > 1 {
                for mb in &minis {
                    let rows = ctx.rows(&model, &model.lm, mb, &prompts, pad, &mut encode_s)?;
                    let lp = match gm.as_mut() {
                        Some(g) => gpu_logprob_pass(cfg, g, Weights::Policy, &rows, mb, vid),
                        None => logprob_pass(cfg, &model.lm, &rows, vid),
                    };
                    olds.push(lp.with_context(|| format!("{at}: old policy"))?);
                }
                summary.old_passes += 1;
            }
            // Re-encoding (reuse off) is counted in encode_s, not in the pass it served.
            let scoring_s = t2.elapsed().as_secs_f64() - encode_s;
            let encode_before_update = encode_s;

            if let Some(hook) = opts.mid_step_hook.as_mut() {
                hook(done);
            }

            // 4. The updates.
            let t3 = Instant::now();
            let mut tally = UpdateOutcome::default();
            let layout = model.lm.layout.clone();
            for _epoch in 0..cfg.train.ppo_epochs {
                for (k, mb) in minis.iter().enumerate() {
                    let rows = ctx.rows(&model, &model.lm, mb, &prompts, pad, &mut encode_s)?;
                    let scale = LossScale {
                        global_tokens: rows.iter().map(VlRows::n_tokens).sum(),
                        global_seqs: rows.iter().map(|r| r.b).sum(),
                    };
                    let (olds_k, refs_k) = (
                        olds.get(k).map(Vec::as_slice),
                        refs.get(k).map(Vec::as_slice),
                    );
                    let poison = opts.poison_step == Some(done);
                    let (loss, grad_norm) = match gm.as_mut() {
                        Some(g) => {
                            g.each(|_, g| Ok(g.zero_grads()?))?;
                            let (loss, m) = gpu_minibatch(
                                cfg, g, &rows, mb, olds_k, refs_k, &loss_cfg, scale, vid,
                            )
                            .with_context(|| format!("{at}: update"))?;
                            tally.metrics.merge(&m);
                            let loss = if poison { f64::NAN } else { loss };
                            let norms = g.each(|_, g| gpu_clip_and_step(cfg, g, loss, &at))?;
                            (loss, norms[0])
                        }
                        None => {
                            let (mut grads, loss, m) = minibatch_grads(
                                cfg, &model, &rows, olds_k, refs_k, &loss_cfg, scale,
                            )
                            .with_context(|| format!("{at}: update"))?;
                            tally.metrics.merge(&m);
                            let loss = if poison { f64::NAN } else { loss };
                            let n = clip_and_step(
                                cfg,
                                &layout,
                                &mut model.lm.params,
                                &mut grads,
                                &mut opt,
                                loss,
                                &at,
                            )?;
                            (loss, n)
                        }
                    };
                    tally.add(loss, grad_norm);
                }
            }
            // The host weights: the prompts' embedding rows are formed from its table; only
            // that table is copied back while the GPU decoder rolls out (the CPU engine reads
            // every weight, and so does an f32 decoder when no GPU holds the whole fp32
            // weights: sharded gradients).
            let via_host = decoder.as_ref().is_some_and(|d| d.is_f32())
                && gm.as_ref().is_some_and(|g| g.lead().grads_sharded());
            if let Some(g) = gm.as_mut() {
                let copied = if decoder.is_some() && !via_host {
                    let e = model.lm.layout.embed.clone();
                    g.decoder_range_into(e.clone(), &mut model.lm.params[e])
                } else {
                    g.params_host().map(|p| model.lm.params = p)
                };
                copied.with_context(|| format!("{at}: copying the GPU policy to the host"))?;
            }
            match (decoder.as_mut(), gm.as_ref().map(GpuPolicy::lead)) {
                (Some(d), Some(_)) if via_host => d.load_params(&model.lm.params),
                (Some(d), Some(g)) => d.load_from_policy(g),
                (Some(d), None) => d.load_params(&model.lm.params),
                (None, _) => Ok(()),
            }
            .with_context(|| format!("{at}: refreshing the GPU decoder's weights"))?;
            if let (Some(_), Some(g)) = (decoder.as_ref(), gm.as_mut()) {
                // The next rollout's cache and buffers in place of the update's activations.
                g.each(|_, m| Ok(m.release_workspace()?))
                    .with_context(|| format!("{at}: freeing the update's activations"))?;
            }
            let update_s = t3.elapsed().as_secs_f64() - (encode_s - encode_before_update);
            let outcome = summary.close_step(done, samples, &mut recent, tally);
            let mut record = step_record(
                cfg,
                done,
                &c,
                &outcome,
                &summary,
                [
                    ("rollout_s", rollout_s),
                    ("scoring_s", c.scoring_s + scoring_s),
                    ("update_s", update_s),
                ],
                sampler.epoch,
            );
            let cs = cache.stats();
            let es = enc.counters.snapshot();
            let fs = ctx.feed_stats();
            for (k, v) in [
                ("decode_s", json!(times.decode_s)),
                ("data_wait_s", json!(times.wait_s)),
                ("videos_decoded", json!(fs.videos_decoded)),
                ("decode_cache_skips", json!(fs.cache_skips)),
                ("videos_in_memory_peak", json!(fs.peak_videos_in_memory)),
                ("encode_s", json!(times.encode_s + encode_s)),
                ("shared_prefill_s", json!(times.shared_prefill_s)),
                ("rollout_preemptions", json!(times.preemptions)),
                (
                    "rollout_shared_preemptions",
                    json!(times.shared_preemptions),
                ),
                ("step_s", json!(t_step.elapsed().as_secs_f64())),
                ("rollout_device", json!(rollout_device)),
                ("update_device", json!(update_device)),
                ("tower_device", json!(tower_device)),
                ("cache_hits", json!(cs.hits + cs.disk_hits)),
                ("cache_misses", json!(cs.misses)),
                ("cache_bytes", json!(cs.bytes)),
                ("tower_forwards", json!(es.tower_forwards)),
                ("videos_encoded", json!(es.videos_encoded)),
                ("skipped_records", json!(skipped)),
            ] {
                record[k] = v;
            }
            if let Some(r) = reporter.as_mut() {
                r.step(
                    cfg,
                    &record,
                    outcome.loss(),
                    c.decode as f64 / rollout_s.max(1e-9),
                )?;
            }
            summary.records.push(record);
            let save = !opts.no_checkpoints && is_save_step(cfg, done);
            // Every rank gathers (a sharded optimizer's state is spread over them); the lead
            // keeps it.
            if let (true, Some(gp)) = (save, gm.as_mut()) {
                if let Some((params, state)) = gp
                    .gather_state(lead)
                    .with_context(|| format!("{at}: copying the GPU policy to the host"))?
                {
                    model.lm.params = params;
                    opt.load_state(state)?;
                }
            }
            if lead && save {
                let state = grpo_trainer_state(
                    cfg,
                    done,
                    &sampler,
                    &recent,
                    json!({ "skipped_records": skipped }),
                );
                let mut files =
                    reel_model::vl::vl_model_files(&model, reel_tensor::DType::F32, usize::MAX)?;
                for f in ["video_preprocessor_config.json", "preprocessor_config.json"] {
                    let src = init_dir.join(f);
                    if src.is_file() {
                        files.push((
                            f.to_string(),
                            std::fs::read(&src).with_context(|| src.display().to_string())?,
                        ));
                    }
                }
                let files = crate::sft::checkpoint_files_with(files, &tok, &opt, &state)?;
                summary.final_model_dir = ckpts
                    .save(done, &files)
                    .with_context(|| format!("{at}: saving the checkpoint"))?;
            }
        }
        // The replicas of a launched world end identical (each process's own weights, compared
        // over NCCL).
        if let (Some(_), Some(gp)) = (&launched, gm.as_mut()) {
            let sum = gp.weights_checksum()?;
            let all = gp.lead().all_gather_u64(sum)?;
            if let Some(r) = all.iter().position(|&c| c != all[0]) {
                bail!("rank {r}'s parameters differ from rank 0's at the end of the run (replicas diverged)");
            }
        }
        Ok(())
    })();
    if let Some(r) = reporter {
        r.finish();
    }
    let result = match &launched {
        Some(l) => result.with_context(|| format!("rank {} of {}", l.rank, l.world)),
        None => result,
    };
    with_last_good(&ckpts, result)?;
    Ok(VlGrpoSummary {
        run: summary,
        cache: cache.stats(),
        encode: enc.counters.snapshot(),
        skipped_records: skipped,
        prefetch: ctx.feed_stats(),
    })
}

/// The run's prompt feed: a copy of `sampler` (where the run starts) gives the order; videos
/// decoded `video.prefetch_workers` threads, `video.prefetch_depth` prompts ahead (a video whose
/// embeddings `cache` holds is not decoded while MR-SP reuse is on).
#[allow(clippy::too_many_arguments)]
fn prompt_feed(
    cfg: &GrpoRunConfig,
    file: &ReasonFile,
    tok: &Tokenizer,
    settings: &VideoSettings,
    processor: VideoProcessor,
    cache: &Arc<EmbedCache>,
    weights: u64,
    sampler: &PromptSampler,
) -> PromptFeed {
    let dec = DecodeCtx::new(
        settings.sampling,
        processor,
        settings.key_text(),
        weights,
        cfg.video.reuse.then(|| cache.clone()),
    );
    let mut order = sampler.clone();
    PromptFeed::new(
        std::iter::from_fn(move || Some(order.next())),
        Arc::new(file.clone()),
        Arc::new(tok.clone()),
        Arc::new(settings.clone()),
        Arc::new(dec),
        cfg.video.prefetch_workers,
        cfg.video.prefetch_depth.max(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ProgressMode;
    use crate::vl::write_tiny_vl_model;
    use reel_data::{write_synth_dataset, SynthVideoConfig};
    use std::path::PathBuf;

    /// Reward: the length of the JSON line the command reads (varies with the response).
    const LEN_REWARD: &str = r#"read l; echo ${#l}"#;

    fn setup(tmp: &Path, videos: usize) -> (PathBuf, PathBuf) {
        let model = tmp.join("model");
        if !model.exists() {
            write_tiny_vl_model(&model, 1).unwrap();
        }
        let data = tmp.join("data");
        let cfg = SynthVideoConfig {
            videos,
            frames: 8,
            width: 56,
            height: 56,
            held_out: 0.0,
            ..Default::default()
        };
        write_synth_dataset(&cfg, &data).unwrap();
        (model, data.join("train.jsonl"))
    }

    fn config(model: &Path, data: &Path, out: PathBuf) -> GrpoRunConfig {
        let mut cfg = GrpoRunConfig::default();
        cfg.model.path = model.to_path_buf();
        cfg.data.prompts = data.to_path_buf();
        cfg.data.prompts_per_step = 2;
        cfg.train.steps = 2;
        cfg.train.micro_batch_seqs = 3;
        cfg.train.mini_batches = 2;
        cfg.grpo.group_size = 3;
        cfg.grpo.max_response_tokens = 5;
        cfg.grpo.lr = 1e-3;
        cfg.grpo.kl_coef = 0.05;
        cfg.grpo.reward.accuracy_weight = 0.0;
        cfg.grpo.reward.format_weight = 0.0;
        cfg.grpo.reward.command = vec!["sh".into(), "-c".into(), LEN_REWARD.into()];
        cfg.video.sampling = "uniform:8".into();
        cfg.output.dir = out;
        cfg.output.save_every = 1;
        cfg.output.keep_last = 0;
        cfg
    }

    fn quiet() -> GrpoOptions {
        GrpoOptions {
            progress: Some(ProgressMode::Log),
            ..GrpoOptions::default()
        }
    }

    fn f(r: &serde_json::Value, k: &str) -> f64 {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    }

    #[test]
    fn vl_grpo_steps_encode_each_video_once_and_match_the_unshared_run() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path(), 6);
        let cfg = config(&model, &data, tmp.path().join("on"));
        let on = run_vl_grpo(&cfg, quiet()).unwrap();
        assert_eq!(on.run.steps, 2);
        assert_eq!((on.run.ref_passes, on.run.old_passes), (2, 2));
        let (p, g, steps) = (2u64, 3u64, 2u64);
        // Encode once: each drawn video through the tower once (later draws of it are cache
        // hits), however many samples and passes use it.
        let drawn = p * steps;
        assert_eq!(on.encode.videos_encoded + on.encode.videos_cached, drawn);
        assert_eq!(on.cache.misses, on.encode.videos_encoded);
        assert!(on.encode.tower_forwards <= steps, "{:?}", on.encode);
        for (k, r) in on.run.records.iter().enumerate() {
            for key in [
                "loss",
                "reward_mean",
                "reward_std",
                "accuracy",
                "format_rate",
                "kl",
                "clip_frac_low",
                "clip_frac_high",
                "entropy",
                "response_len_mean",
                "decode_s",
                "encode_s",
                "rollout_s",
                "shared_prefill_s",
                "rollout_preemptions",
                "rollout_shared_preemptions",
                "scoring_s",
                "update_s",
                "cache_hits",
                "cache_misses",
                "tower_forwards",
                "skipped_records",
            ] {
                assert!(
                    r.get(key).is_some_and(|v| !v.is_null()),
                    "step {k}: {key} in {r}"
                );
            }
            assert!(f(r, "reward_std") > 0.0, "{r}");
            assert!(f(r, "kl") >= 0.0 && f(r, "entropy") > 0.0, "{r}");
            // Head dimension 16 has no GPU decoder: "auto" rolls out with the CPU engine, and
            // one process shares no prefill.
            assert_eq!(r["rollout_device"], "cpu");
            assert_eq!(f(r, "shared_prefill_s"), 0.0, "{r}");
            // The pool is sized for the round's groups: nothing preempted.
            assert_eq!(f(r, "rollout_preemptions"), 0.0, "{r}");
            assert_eq!(f(r, "rollout_shared_preemptions"), 0.0, "{r}");
            // The prompt was prefilled once per group: prefill work is P·prompt tokens.
            assert!(f(r, "prefill_tokens") < 2.0 * f(r, "decode_tokens") + 2000.0);
        }
        let ckpt = &on.run.final_model_dir;
        let trained = load_vl_checkpoint(ckpt).unwrap();
        let init = load_vl_checkpoint(&model).unwrap();
        assert_ne!(trained.lm.params, init.lm.params);
        assert_eq!(
            trained.vision.params, init.vision.params,
            "the tower is frozen"
        );
        assert!(ckpt.join("video_preprocessor_config.json").is_file());

        // Reuse off: the video is encoded again for every sample of every pass and every sample
        // prefilled alone; the samples and the training are the same.
        let mut off_cfg = config(&model, &data, tmp.path().join("off"));
        off_cfg.video.reuse = false;
        let off = run_vl_grpo(&off_cfg, quiet()).unwrap();
        // Per step: the draw, the rollout (G), reference, old policy and update passes (G each).
        assert_eq!(off.encode.videos_encoded, steps * (p + 4 * p * g));
        assert_eq!(off.cache.hits + off.cache.misses, 0);
        for (a, b) in on.run.records.iter().zip(&off.run.records) {
            for key in ["reward_mean", "response_len_mean", "decode_tokens"] {
                assert_eq!(f(a, key), f(b, key), "{key}: {a} vs {b}");
            }
            for key in ["loss", "kl", "entropy"] {
                assert!(
                    (f(a, key) - f(b, key)).abs() < 1e-4 * (1.0 + f(a, key).abs()),
                    "{key}"
                );
            }
            assert!(f(b, "prefill_tokens") > f(a, "prefill_tokens") * (g as f64 - 0.5));
        }
    }

    /// Draws the run's first prompts and makes G responses for each of tokens from the vocab.
    /// What the rows and encode tests build their contexts from: the tiny model, its tokenizer
    /// and video settings, and 4 videos' records.
    struct Fixture {
        _tmp: tempfile::TempDir,
        cfg: GrpoRunConfig,
        model: Qwen25VL,
        tok: Tokenizer,
        settings: VideoSettings,
        file: ReasonFile,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let (model_dir, data) = setup(tmp.path(), 4);
            Fixture {
                cfg: config(&model_dir, &data, tmp.path().join("x")),
                model: load_vl_checkpoint(&model_dir).unwrap(),
                tok: Tokenizer::from_dir(&model_dir).unwrap(),
                settings: VideoSettings {
                    sampling: parse_sampling("uniform:8").unwrap(),
                    processor: VideoProcessorConfig::from_dir(&model_dir).unwrap(),
                },
                file: ReasonFile::read(&data).unwrap(),
                _tmp: tmp,
            }
        }

        /// A context of `cfg` (this fixture's, changed) over `cache` and `enc`, its feed in
        /// the order of `sampler` from where it stands.
        #[allow(clippy::too_many_arguments)]
        fn ctx<'a>(
            &'a self,
            cfg: &'a GrpoRunConfig,
            cache: &'a Arc<EmbedCache>,
            enc: &'a SpVisionEncoder,
            sampler: &PromptSampler,
            sp: usize,
            host: Option<&'a Mutex<crate::device::HostComm>>,
            gpu: bool,
        ) -> VlCtx<'a> {
            let weights = weights_fingerprint(&self.model.vision.params);
            let processor = VideoProcessor::new(self.settings.processor.clone()).unwrap();
            let feed = prompt_feed(
                cfg,
                &self.file,
                &self.tok,
                &self.settings,
                processor,
                cache,
                weights,
                sampler,
            );
            VlCtx {
                cfg,
                file: &self.file,
                feed: Mutex::new(feed),
                cache,
                enc,
                sp,
                host,
                gpu,
                gpu_tower: None,
            }
        }
    }

    fn fake_samples(
        ctx: &VlCtx,
        model: &Qwen25VL,
        sampler: &mut PromptSampler,
    ) -> (HashMap<usize, VlPrompt>, Vec<Sample>) {
        let mut skipped = 0;
        let drawn = ctx
            .draw(model, 2, sampler, &mut skipped, &mut VideoTimes::default())
            .unwrap();
        let mut prompts = HashMap::new();
        let mut samples = Vec::new();
        for (k, (i, pr)) in drawn.into_iter().enumerate() {
            for j in 0..3 {
                let mut ids = pr.ids.clone();
                let n = 3 + (k * 3 + j) % 5;
                ids.extend((0..n).map(|x| (40 + 7 * x + 3 * j + k) as u32 % 90 + 5));
                samples.push(Sample {
                    prompt_len: pr.ids.len(),
                    ids,
                    advantage: j as f32 - 1.0 + 0.3 * k as f32,
                    prompt: i,
                });
            }
            prompts.insert(i, pr);
        }
        (prompts, samples)
    }

    /// A launched world's processes draw through MR-SP's encode over their host communicator
    /// (here in-process ranks standing in for it, the type a CPU build gives it), each with its
    /// own cache: every rank's prompts hold the features one rank alone encodes.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn an_encode_over_the_host_communicator_gives_every_process_one_ranks_features() {
        let fx = Fixture::new();
        // One rank's prompts, or rank `host`'s of a world over its host communicator.
        let draw = |host: Option<InProcess>| -> (Vec<Vec<f32>>, EncodeStats) {
            let cache = Arc::new(EmbedCache::new(1 << 26));
            let enc = SpVisionEncoder::new();
            let mut sampler = PromptSampler::new(fx.file.records.len(), 0);
            let host = host.map(Mutex::new);
            let ctx = fx.ctx(&fx.cfg, &cache, &enc, &sampler, 1, host.as_ref(), false);
            let drawn = ctx
                .draw(
                    &fx.model,
                    3,
                    &mut sampler,
                    &mut 0,
                    &mut VideoTimes::default(),
                )
                .unwrap();
            let feats = drawn
                .into_iter()
                .map(|(_, p)| Arc::unwrap_or_clone(p.features))
                .collect();
            (feats, enc.counters.snapshot())
        };
        let (want, one) = draw(None);
        assert_eq!(want.len(), 3);
        let per_rank = InProcess::spawn(2, Duration::from_secs(60), |comm| {
            Ok::<_, anyhow::Error>(draw(Some(comm)))
        });
        for (rank, got) in per_rank.into_iter().enumerate() {
            let (got, stats) = got.unwrap();
            // A world counts its videos once, on its first rank.
            let want_count = if rank == 0 { one.videos_encoded } else { 0 };
            assert_eq!(stats.videos_encoded, want_count, "rank {rank}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.len(), w.len(), "rank {rank}");
                let worst = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(worst <= 1e-5, "rank {rank}: features differ by {worst}");
            }
        }
    }

    /// The GPU policy's rows of a micro-batch: whole, the feature rows are exactly the prompts'
    /// video tokens with their features; a rank's shard (contiguous and zigzag, 2 and 3 ranks)
    /// holds each real row's token, target, mask, rotary angles and feature exactly as the whole
    /// rows do, its padding rows are zero feature rows of the video token, and the shards
    /// together hold every row once.
    #[test]
    fn gpu_rows_shard_every_row_and_its_features_as_the_whole_rows_hold_them() {
        use reel_parallel::shard::Layout;
        let fx = Fixture::new();
        let (model, tok) = (&fx.model, &fx.tok);
        let cache = Arc::new(EmbedCache::new(1 << 26));
        let enc = SpVisionEncoder::new();
        let vid = model.config.video_token_id;
        let mut sampler = PromptSampler::new(fx.file.records.len(), 0);
        let ctx = fx.ctx(&fx.cfg, &cache, &enc, &sampler, 1, None, true);
        let (prompts, mut samples) = fake_samples(&ctx, model, &mut sampler);
        // A response that samples the video token keeps it a table row.
        samples[1].ids.push(vid);
        samples[1].ids.push(7);
        let micro: Vec<&Sample> = samples.iter().take(4).collect();
        let pad = tok.pad_token_id().unwrap();
        let rows = ctx
            .rows(
                model,
                &model.lm,
                std::slice::from_ref(&micro),
                &prompts,
                pad,
                &mut 0.0,
            )
            .unwrap();
        let r = &rows[0];
        assert!(
            r.packing.is_none(),
            "the GPU policy takes one row per sample"
        );
        assert_eq!(r.embeds, RowEmbeds::Features, "the GPU policy's rows");
        // The same rows with every row's embedding, as the CPU passes take them.
        let full = VlRows::new(
            model,
            &model.lm,
            &micro,
            &prompts,
            None,
            pad,
            false,
            RowEmbeds::Whole,
        );
        let (b, t, d) = (r.model_b, r.model.t, model.lm.config.hidden_size);
        let half = r.model.cos.len() / (b * t);
        let whole = GpuRows::new(r, &micro, vid, None, 0).unwrap();
        assert_eq!(
            whole,
            GpuRows::new(&full, &micro, vid, None, 0).unwrap(),
            "features-only rows give the whole rows' GPU rows"
        );
        // Whole rows: the prompts' video tokens, each with its own features.
        let mut want_feature = vec![false; b * t];
        for (k, s) in micro.iter().enumerate() {
            for i in 0..s.prompt_len {
                want_feature[k * t + i] = s.ids[i] == vid;
            }
        }
        assert_eq!(whole.feature_rows, want_feature);
        assert!(whole
            .tokens
            .iter()
            .zip(&whole.feature_rows)
            .any(|(&x, &f)| x == vid && !f));
        let n_feat = want_feature.iter().filter(|&&f| f).count();
        assert!(n_feat > 0);
        assert_eq!(whole.features.len(), n_feat * d);
        assert!(r.model.embeds.is_empty(), "no [B·T, d] buffer on the host");
        for (k, s) in micro.iter().enumerate() {
            assert!(
                Arc::ptr_eq(&r.features[k], &prompts[&s.prompt].features),
                "row {k} refers to its prompt's features, no copy"
            );
        }
        // Rows re-encoded per sample (reuse off) hold their own; one short of its video tokens
        // is refused by name.
        let own: Vec<Vec<f32>> = micro
            .iter()
            .map(|s| prompts[&s.prompt].features.to_vec())
            .collect();
        let args = |f: &[Vec<f32>]| {
            VlRows::new(
                model,
                &model.lm,
                &micro,
                &prompts,
                Some(f),
                pad,
                false,
                RowEmbeds::Features,
            )
        };
        assert_eq!(
            GpuRows::new(&args(&own), &micro, vid, None, 0).unwrap(),
            GpuRows::new(r, &micro, vid, None, 0).unwrap()
        );
        let mut short = own.clone();
        let keep = short[2].len() - d;
        short[2].truncate(keep);
        let e = GpuRows::new(&args(&short), &micro, vid, None, 0).unwrap_err();
        assert!(e.to_string().contains("sample 2"), "{e}");
        // Feature vector of each whole row.
        let mut whole_feat: Vec<Option<&[f32]>> = vec![None; b * t];
        let mut at = 0;
        for (i, &f) in whole.feature_rows.iter().enumerate() {
            if f {
                whole_feat[i] = Some(&whole.features[at * d..(at + 1) * d]);
                at += 1;
                assert_eq!(
                    whole_feat[i].unwrap(),
                    &full.model.embeds[i * d..(i + 1) * d]
                );
            }
        }
        for ranks in [2, 3] {
            for layout in [Layout::Contiguous, Layout::Zigzag] {
                let sh = Sharding::new(t, ranks, layout).unwrap();
                let mut seen = vec![0usize; b * t];
                for rank in 0..ranks {
                    let loc = GpuRows::new(r, &micro, vid, Some(sh), rank).unwrap();
                    assert_eq!(
                        loc,
                        GpuRows::new(&full, &micro, vid, Some(sh), rank).unwrap(),
                        "{ranks} ranks {layout:?} rank {rank}: from features-only rows"
                    );
                    let l = loc.t;
                    assert_eq!(l, sh.local_len());
                    let mut at = 0;
                    for k in 0..b {
                        for j in 0..l {
                            let (i, g) = (k * l + j, sh.global_row(rank, j));
                            let feat = loc.feature_rows[i].then(|| {
                                at += 1;
                                &loc.features[(at - 1) * d..at * d]
                            });
                            if g >= t {
                                // Padding: a zero feature row of the video token, no target.
                                assert_eq!(loc.tokens[i], vid);
                                assert!(feat.unwrap().iter().all(|&x| x == 0.0));
                                assert!(loc.targets[i] < 0 && !loc.mask[i]);
                                continue;
                            }
                            let w = k * t + g;
                            seen[w] += 1;
                            let what = format!("{ranks} ranks {layout:?}: rank {rank} row {i}");
                            assert_eq!(loc.tokens[i], whole.tokens[w], "{what}");
                            assert_eq!(loc.targets[i], whole.targets[w], "{what}");
                            assert_eq!(loc.mask[i], whole.mask[w], "{what}");
                            assert_eq!(feat, whole_feat[w], "{what}");
                            assert_eq!(
                                &loc.cos[i * half..(i + 1) * half],
                                &whole.cos[w * half..(w + 1) * half],
                                "{what}"
                            );
                            assert_eq!(
                                &loc.sin[i * half..(i + 1) * half],
                                &whole.sin[w * half..(w + 1) * half],
                                "{what}"
                            );
                        }
                    }
                    assert_eq!(at * d, loc.features.len(), "every feature row read");
                }
                assert!(seen.iter().all(|&n| n == 1), "every row held once");
            }
        }
    }

    /// sp = 1 with plain rows is the reference; the same rows packed by prompt (reuse), sharded
    /// over 2 ranks, and packed and sharded over 2 and 3 ranks give the same log-probabilities,
    /// loss, gradients and update.
    #[test]
    fn packed_and_sequence_parallel_scoring_and_update_match_one_rank() {
        let fx = Fixture::new();
        let (model, tok, file) = (&fx.model, &fx.tok, &fx.file);
        let mut cfg = fx.cfg.clone();
        let cache = Arc::new(EmbedCache::new(1 << 26));
        let enc = SpVisionEncoder::new();
        let pad = tok.pad_token_id().unwrap();
        let vid = model.config.video_token_id;
        let loss_cfg = cfg.grpo.policy_loss();
        // sp = 1's log-probabilities, loss, gradients and updated parameters.
        type OneRank = (Vec<Vec<f32>>, f64, Vec<f32>, Vec<f32>);
        let mut want: Option<OneRank> = None;
        for (dp, sp, reuse) in [
            (1usize, 1usize, false),
            (1, 1, true),
            (1, 2, false),
            (1, 2, true),
            (1, 3, true),
            (2, 1, false),
            (2, 2, true),
        ] {
            cfg.parallel.dp = dp;
            cfg.parallel.sp = sp;
            cfg.video.reuse = reuse;
            let mut sampler = PromptSampler::new(file.records.len(), 0);
            let ctx = fx.ctx(&cfg, &cache, &enc, &sampler, sp, None, false);
            let (prompts, samples) = fake_samples(&ctx, model, &mut sampler);
            let refs: Vec<&Sample> = samples.iter().collect();
            let mb: Vec<Vec<&Sample>> = refs.chunks(4).map(<[_]>::to_vec).collect();
            let rows = ctx
                .rows(model, &model.lm, &mb, &prompts, pad, &mut 0.0)
                .unwrap();
            let packed = rows.iter().filter(|r| r.packing.is_some()).count();
            assert_eq!(packed, if reuse { rows.len() } else { 0 });
            if reuse {
                // 4 samples of 2 prompts (3 + 1): two packed rows, each prompt once.
                let r = &rows[0];
                assert_eq!(r.model_b, 2);
                assert!(
                    r.model_b * r.model.t * 10 < r.b * r.t * 6,
                    "{} {}",
                    r.model.t,
                    r.t
                );
            }
            let lp = logprob_pass(&cfg, &model.lm, &rows, vid).unwrap();
            // Every response token scored, nothing else.
            for (r, l) in rows.iter().zip(&lp) {
                assert!(r.mask.iter().zip(l).all(|(&m, &x)| m == (x != 0.0)));
            }
            let scale = LossScale {
                global_tokens: rows.iter().map(VlRows::n_tokens).sum(),
                global_seqs: samples.len(),
            };
            // Old = the scored log-probs perturbed, so ratios and clipping are exercised.
            let olds: Vec<Vec<f32>> = lp
                .iter()
                .map(|l| {
                    l.iter()
                        .enumerate()
                        .map(|(i, &x)| x + 0.1 * ((i % 7) as f32 - 3.0) / 3.0)
                        .collect()
                })
                .collect();
            let (mut grads, loss, m) =
                minibatch_grads(&cfg, model, &rows, Some(&olds), Some(&lp), &loss_cfg, scale)
                    .unwrap();
            assert_eq!(m.tokens, scale.global_tokens);
            let raw = grads.clone();
            let mut params = model.lm.params.clone();
            let mut opt = adamw_for(&cfg, &model.lm.layout);
            clip_and_step(
                &cfg,
                &model.lm.layout,
                &mut params,
                &mut grads,
                &mut opt,
                loss,
                "t",
            )
            .unwrap();
            match &want {
                None => want = Some((lp, loss, raw, params)),
                Some((lp1, loss1, g1, p1)) => {
                    for (a, b) in lp1.iter().zip(&lp) {
                        reel_tensor::check_close(
                            &format!("dp {dp} sp {sp} reuse {reuse} log-probs"),
                            b,
                            a,
                            reel_tensor::Tolerance::new(1e-5, 1e-5),
                        )
                        .unwrap();
                    }
                    assert!(
                        (loss - loss1).abs() < 1e-5 * (1.0 + loss1.abs()),
                        "dp {dp} sp {sp} reuse {reuse}"
                    );
                    reel_tensor::check_close(
                        &format!("dp {dp} sp {sp} reuse {reuse} gradients"),
                        &raw,
                        g1,
                        reel_tensor::Tolerance::new(1e-6, 1e-4),
                    )
                    .unwrap();
                    // AdamW's first step is about lr·g/|g|: where |g| is tiny, float noise of
                    // the sum order (within the gradients' tolerance above) moves the step by a
                    // fraction of lr (1e-3 here). Those parameters are held to lr; the others
                    // to the step's float noise.
                    let tiny = |i: usize| g1[i].abs() < 1e-6;
                    let pick = |x: &[f32], keep: bool| -> Vec<f32> {
                        (0..x.len())
                            .filter(|&i| tiny(i) != keep)
                            .map(|i| x[i])
                            .collect()
                    };
                    reel_tensor::check_close(
                        &format!("dp {dp} sp {sp} reuse {reuse} parameters after one update"),
                        &pick(&params, true),
                        &pick(p1, true),
                        reel_tensor::Tolerance::new(2e-5, 1e-5),
                    )
                    .unwrap();
                    reel_tensor::check_close(
                        &format!("dp {dp} sp {sp} reuse {reuse} parameters of tiny gradients"),
                        &pick(&params, false),
                        &pick(p1, false),
                        reel_tensor::Tolerance::new(cfg.grpo.lr, 0.0),
                    )
                    .unwrap();
                    assert_ne!(&params, &model.lm.params);
                }
            }
        }
    }

    #[test]
    fn sequence_and_data_parallel_runs_follow_the_single_rank_run() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path(), 4);
        let mut cfg = config(&model, &data, tmp.path().join("sp1"));
        cfg.train.steps = 1;
        let one = run_vl_grpo(&cfg, quiet()).unwrap();
        cfg.parallel.sp = 2;
        cfg.output.dir = tmp.path().join("sp2");
        let two = run_vl_grpo(&cfg, quiet()).unwrap();
        let (a, b) = (&one.run.records[0], &two.run.records[0]);
        assert_eq!(f(a, "reward_mean"), f(b, "reward_mean"));
        for key in ["loss", "kl", "entropy", "pg_loss"] {
            assert!(
                (f(a, key) - f(b, key)).abs() < 1e-4 * (1.0 + f(a, key).abs()),
                "{key}: {a} vs {b}"
            );
        }
        // Stage 1 ran on both ranks.
        assert_eq!(two.encode.tower_forwards, 2 * one.encode.tower_forwards);
        // Two data-parallel replicas split the scoring and update passes: the same step.
        cfg.parallel.sp = 1;
        cfg.parallel.dp = 2;
        cfg.train.micro_batch_seqs = 2;
        cfg.output.dir = tmp.path().join("dp2");
        let dp2 = run_vl_grpo(&cfg, quiet()).unwrap();
        cfg.parallel.dp = 1;
        cfg.output.dir = tmp.path().join("dp1");
        let dp1 = run_vl_grpo(&cfg, quiet()).unwrap();
        let (a, b) = (&dp1.run.records[0], &dp2.run.records[0]);
        assert_eq!(f(a, "reward_mean"), f(b, "reward_mean"));
        for key in ["loss", "kl", "entropy", "pg_loss", "grad_norm"] {
            assert!(
                (f(a, key) - f(b, key)).abs() < 1e-4 * (1.0 + f(a, key).abs()),
                "dp {key}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn an_interrupted_and_resumed_run_equals_the_uninterrupted_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path(), 4);
        let mut cfg = config(&model, &data, tmp.path().join("whole"));
        cfg.train.steps = 3;
        let whole = run_vl_grpo(&cfg, quiet()).unwrap();
        cfg.output.dir = tmp.path().join("parts");
        let first = run_vl_grpo(
            &cfg,
            GrpoOptions {
                stop_after: Some(2),
                ..quiet()
            },
        )
        .unwrap();
        assert_eq!(first.run.steps, 2);
        // Without --resume an earlier run is not overwritten.
        let e = run_vl_grpo(&cfg, quiet()).unwrap_err().to_string();
        assert!(e.contains("--resume"), "{e}");
        let rest = run_vl_grpo(
            &cfg,
            GrpoOptions {
                resume: true,
                ..quiet()
            },
        )
        .unwrap();
        assert_eq!(rest.run.steps, 3);
        let joined: Vec<_> = first.run.records.iter().chain(&rest.run.records).collect();
        assert_eq!(joined.len(), whole.run.records.len());
        for (a, b) in whole.run.records.iter().zip(joined) {
            for key in [
                "loss",
                "reward_mean",
                "kl",
                "entropy",
                "grad_norm",
                "decode_tokens",
            ] {
                assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
            }
        }
        let w = load_vl_checkpoint(&whole.run.final_model_dir).unwrap();
        let r = load_vl_checkpoint(&rest.run.final_model_dir).unwrap();
        assert_eq!(w.lm.params, r.lm.params);
    }

    #[test]
    fn bad_records_and_missing_videos_are_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path(), 3);
        let mut text = std::fs::read_to_string(&data).unwrap();
        text.push_str("{\"problem_id\": 1}\n");
        let first = text.lines().next().unwrap();
        let mut v: serde_json::Value = serde_json::from_str(first).unwrap();
        v["problem_id"] = json!("missing-video");
        v["videos"] = json!(["videos/nope.avi"]);
        text.push_str(&format!("{v}\n"));
        std::fs::write(&data, text).unwrap();
        let mut cfg = config(&model, &data, tmp.path().join("run"));
        cfg.data.prompts_per_step = 4;
        cfg.train.steps = 1;
        let s = run_vl_grpo(&cfg, quiet()).unwrap();
        // The malformed line at load, the missing video when drawn; the step still has 4 groups.
        assert_eq!(s.skipped_records, 2);
        assert_eq!(s.run.records[0]["skipped_records"], json!(2));
        assert_eq!(s.run.records[0]["groups_rolled"], json!(4));
        // β = 0 and one update per batch: no reference model, no old-policy pass.
        assert_eq!((s.run.ref_passes, s.run.old_passes), (1, 1));
        cfg.grpo.kl_coef = 0.0;
        cfg.train.mini_batches = 1;
        cfg.output.dir = tmp.path().join("beta0");
        let s = run_vl_grpo(&cfg, quiet()).unwrap();
        assert_eq!((s.run.ref_passes, s.run.old_passes), (0, 0));
        assert!(s.run.records[0]["kl"].is_null());
        // Bad configs are refused by key.
        cfg.video.sampling = "every:3".into();
        let e = format!("{:#}", run_vl_grpo(&cfg, quiet()).unwrap_err());
        assert!(e.contains("video.sampling"), "{e}");
    }

    #[test]
    fn rollout_stop_strings_end_vl_responses_where_they_first_appear() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path(), 2);
        let tok = Tokenizer::from_dir(&model).unwrap();
        let mut cfg = config(&model, &data, tmp.path().join("free"));
        cfg.train.steps = 1;
        cfg.grpo.max_response_tokens = 10;
        let free = run_vl_grpo(&cfg, quiet()).unwrap().run;
        let response = |b: &(Vec<u32>, usize, f32)| b.0[b.1..].to_vec();
        // A stop string: the text of the third token of the first full-length response.
        let long = free
            .last_batch
            .iter()
            .map(response)
            .find(|r| r.len() == 10 && !tok.decode(&r[2..3], true).unwrap().is_empty())
            .expect("a response that ran to max_response_tokens");
        let stop = tok.decode(&long[2..3], true).unwrap();
        cfg.rollout.stop = vec![stop.clone()];
        cfg.output.dir = tmp.path().join("stopped");
        let stopped = run_vl_grpo(&cfg, quiet()).unwrap().run;
        assert_eq!(stopped.last_batch.len(), free.last_batch.len());
        let mut shortened = 0;
        for (a, b) in stopped.last_batch.iter().zip(&free.last_batch) {
            let (a, b) = (response(a), response(b));
            // The same draws up to the stop: a prefix of the free response.
            assert_eq!(a[..], b[..a.len()], "{a:?} vs {b:?}");
            if a.len() < b.len() {
                shortened += 1;
                let text = tok.decode(&a, true).unwrap();
                assert!(text.contains(&stop), "{text:?} stopped without {stop:?}");
            }
            let before = tok.decode(&a[..a.len() - 1], true).unwrap();
            assert!(!before.contains(&stop), "{before:?} ran past {stop:?}");
        }
        assert!(shortened > 0, "the stop string ended some response");
    }

    /// The processes' packed words as `gather_rollouts` receives them: each padded to the
    /// widest, in rank order; and that width.
    fn as_gathered(packed: &[Vec<f32>]) -> (Vec<f32>, usize) {
        let width = packed.iter().map(Vec::len).max().unwrap();
        let all = packed
            .iter()
            .flat_map(|w| {
                w.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, width - w.len()))
            })
            .collect();
        (all, width)
    }

    #[test]
    fn rollouts_packed_by_three_processes_come_back_in_prompt_order() {
        // 5 prompts over 3 ranks: rank 0 holds prompts 0 and 3, rank 1 prompts 1 and 4, rank 2
        // prompt 2; responses of different lengths, an empty one, ids near 2^24.
        let prompt = |k: u32| -> Vec<Vec<u32>> {
            (0..2)
                .map(|j| (0..(k + j)).map(|i| k * 1000 + i).collect())
                .collect()
        };
        let mut big = prompt(2);
        big[1].push((1 << 24) - 1);
        let mine = [
            vec![prompt(0), prompt(3)],
            vec![prompt(1), prompt(4)],
            vec![big.clone()],
        ];
        let packed: Vec<Vec<f32>> = mine
            .iter()
            .enumerate()
            .map(|(r, m)| pack_rollouts(m, 10 + r as u64, (1 << 40) + r as u64).unwrap())
            .collect();
        let (all, width) = as_gathered(&packed);
        let owners = |n: usize| -> Vec<Vec<usize>> {
            (0..n).map(|k| rollout_holders(k, 3, 1, false)).collect()
        };
        let (every, pre, dec) = unpack_rollouts(&all, width, 3, &owners(5)).unwrap();
        assert_eq!(every, vec![prompt(0), prompt(1), big, prompt(3), prompt(4)]);
        assert_eq!((pre, dec), (33, 3 * (1 << 40) + 3));
        // A prompt no rank sent, a truncated buffer, an id that no f32 holds exactly.
        assert!(unpack_rollouts(&all, width, 3, &owners(6)).is_err());
        assert!(unpack_rollouts(&all[..2 * width], width, 3, &owners(5)).is_err());
        assert!(pack_rollouts(&[vec![vec![1 << 24]]], 0, 0).is_err());
    }

    #[test]
    fn a_rollout_pool_holds_the_groups_its_process_decodes() {
        // 2 replicas of sp 2 (ranks 0, 1 | 2, 3), 5 prompts: prompts 0 and 3 shared.
        let shared = [true, false, false, true, false];
        let holders: Vec<Vec<usize>> = (0..5)
            .map(|k| rollout_holders(k, 4, 2, shared[k]))
            .collect();
        assert_eq!(holders[0], vec![0, 1]);
        assert_eq!(holders[3], vec![2, 3]);
        // G = 4: every member decodes 2 samples of its group's shared prompt; ranks 0 and 1
        // also own prompts 4 and 1, rank 2 prompt 2.
        assert_eq!(
            (0..4)
                .map(|r| pool_groups(&holders, r, 2, 4))
                .collect::<Vec<_>>(),
            vec![2, 2, 2, 1]
        );
        // G = 1: the second members (ranks 1, 3) only help with the prefill (one transient
        // table each).
        assert_eq!(
            (0..4)
                .map(|r| pool_groups(&holders, r, 2, 1))
                .collect::<Vec<_>>(),
            vec![2, 2, 2, 1]
        );
        let unshared: Vec<Vec<usize>> = (0..5).map(|k| rollout_holders(k, 4, 2, false)).collect();
        assert_eq!(
            (0..4)
                .map(|r| pool_groups(&unshared, r, 2, 4))
                .collect::<Vec<_>>(),
            vec![2, 1, 1, 1]
        );
        // One process holds every group.
        let one: Vec<Vec<usize>> = (0..5).map(|k| rollout_holders(k, 1, 1, true)).collect();
        assert_eq!(pool_groups(&one, 0, 1, 8), 5);
    }

    #[test]
    fn shared_prompts_come_back_with_every_group_members_share_in_sample_order() {
        // dp 2 × sp 2 (ranks 0, 1 | 2, 3), 4 prompts, G = 5: prompts 0 and 3 shared (owners 0
        // and 3: groups {0, 1} and {2, 3}), prompts 1 and 2 each on its owner.
        let (world, sp, g) = (4, 2, 5);
        let shared = [true, false, false, true];
        let holders: Vec<Vec<usize>> = (0..4)
            .map(|k| rollout_holders(k, world, sp, shared[k]))
            .collect();
        assert_eq!(holders, vec![vec![0, 1], vec![1], vec![2], vec![2, 3]]);
        let sample = |k: usize, j: usize| vec![(k * 100 + j) as u32; j + 1];
        let whole = |k: usize| (0..g).map(|j| sample(k, j)).collect::<Vec<_>>();
        // What each process packs: per prompt it holds, its share (rank order within a group).
        let mine: Vec<Vec<Vec<Vec<u32>>>> = (0..world)
            .map(|r| {
                (0..4)
                    .filter(|&k| holders[k].contains(&r))
                    .map(|k| match holders[k].len() {
                        1 => whole(k),
                        _ => sample_share(g, sp, r % sp).map(|j| sample(k, j)).collect(),
                    })
                    .collect()
            })
            .collect();
        let packed: Vec<Vec<f32>> = mine
            .iter()
            .map(|m| pack_rollouts(m, 1, 2).unwrap())
            .collect();
        let (all, width) = as_gathered(&packed);
        let (every, pre, dec) = unpack_rollouts(&all, width, world, &holders).unwrap();
        assert_eq!(every, (0..4).map(whole).collect::<Vec<_>>());
        assert_eq!((pre, dec), (4, 8));
        // Holders read in another order put the samples out of order.
        let mut swapped = holders.clone();
        swapped[0].reverse();
        let (bad, _, _) = unpack_rollouts(&all, width, world, &swapped).unwrap();
        assert_ne!(bad[0], whole(0));
    }

    #[test]
    fn cuda_rollouts_the_gpu_cannot_run_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = setup(tmp.path(), 2);
        let mut cfg = config(&model, &data, tmp.path().join("run"));
        cfg.train.device = crate::Device::Cuda;
        // At any dp × sp: the head dimension (16) the GPU decoder lacks, or no GPU, is named
        // (a sequence-parallel run rolls out on the one decoder too).
        let why = if crate::device::BUILT_WITH_CUDA {
            "head dimensions"
        } else {
            "`cuda` feature"
        };
        for sp in [2, 1] {
            cfg.parallel.sp = sp;
            let e = format!("{:#}", run_vl_grpo(&cfg, quiet()).unwrap_err());
            assert!(
                e.contains("train.device = \"cuda\"") && e.contains(why),
                "sp {sp}: {e}"
            );
        }
    }
}
