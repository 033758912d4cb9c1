//! Video data ahead of compute for the vision-language trainers: each record keeps only its
//! tokens and its videos' plans ([`VlRecordPlan`]: path, grid from the header); the pixels are
//! decoded and preprocessed on worker threads ([`Prefetcher`]) in the order the step will ask for
//! them — the SFT sampler's micro-batches of one data-parallel replica ([`ReplicaOrder`]), or
//! GRPO's prompt order — at most `depth` records ahead, so memory holds a few videos' pixels
//! [t·h·w, C·T_p·P·P] however large the dataset.
//!
//! With a frozen tower a video whose merged embeddings are already in the [`EmbedCache`] is not
//! decoded at all: its cache key is the SHA-256 of the video's file bytes (as before, never of
//! decoded pixels; hashed once per path and remembered), the sampling settings and the tower's
//! weights fingerprint, so it is known before decoding. Should the entry be evicted before the
//! step reads it, the step decodes the video itself ([`FetchedVideo::pixels`], counted as a
//! late decode) — the numbers do not change.
//!
//! A video that fails to decode makes its record fail ([`FetchedItem::result`], naming the file);
//! the trainer skips the record with a warning and counts it once. With 0 workers the same jobs
//! run on the step's thread when it asks for the record, so prefetching changes when videos are
//! decoded, never what the step computes. [`FeedCounters`] count decoded videos, cache skips,
//! the pixel buffers alive (and their peak: at most `depth` records ahead plus the ones in use)
//! and the time the lead rank waited for data.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{bail, Result};
use reel_data::video::{load_and_process, Prefetcher, VideoResult};
use reel_data::{
    plan_vl_record, video_content_hash, BucketSampler, FrameSampling, ReasonFile, Tokenizer,
    VideoError, VideoProcessor, VideoSettings, VlRecordPlan, VlSkip, VlVideoPlan,
};
use reel_model::embed_cache::{EmbedCache, EmbedKey};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of a run's video feed, shared by its workers and consumers.
#[derive(Debug, Default)]
pub(crate) struct FeedCounters {
    /// Decoded pixel buffers alive now (being decoded, queued or in use).
    alive: AtomicUsize,
    /// The most ever alive at once.
    peak: AtomicUsize,
    decoded: AtomicU64,
    cache_skips: AtomicU64,
    late_decodes: AtomicU64,
    /// Nanoseconds the lead rank waited for data since the last [`FeedCounters::take_wait`].
    lead_wait_ns: AtomicU64,
    total_wait_ns: AtomicU64,
}

/// A snapshot of [`FeedCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FeedStats {
    /// Videos decoded and preprocessed.
    pub videos_decoded: u64,
    /// Videos not decoded because their embeddings were in the cache when prefetched.
    pub cache_skips: u64,
    /// Of those, videos decoded after all because the entry was evicted before use.
    pub late_decodes: u64,
    /// The most decoded videos' pixels held at once.
    pub peak_videos_in_memory: usize,
    /// Seconds the lead rank waited for video data.
    pub wait_secs: f64,
}

impl FeedCounters {
    pub(crate) fn snapshot(&self) -> FeedStats {
        FeedStats {
            videos_decoded: self.decoded.load(Ordering::Relaxed),
            cache_skips: self.cache_skips.load(Ordering::Relaxed),
            late_decodes: self.late_decodes.load(Ordering::Relaxed),
            peak_videos_in_memory: self.peak.load(Ordering::Relaxed),
            wait_secs: self.total_wait_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// Adds the lead rank's wait.
    pub(crate) fn add_wait(&self, secs: f64) {
        let ns = (secs * 1e9) as u64;
        self.lead_wait_ns.fetch_add(ns, Ordering::Relaxed);
        self.total_wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Seconds the lead rank waited since the last call.
    pub(crate) fn take_wait(&self) -> f64 {
        self.lead_wait_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9
    }
}

/// One video's preprocessed pixels [t·h·w, C·T_p·P·P], counted in [`FeedCounters`] while alive.
pub(crate) struct Pixels {
    pub(crate) data: Vec<f32>,
    counters: Arc<FeedCounters>,
}

impl Drop for Pixels {
    fn drop(&mut self) {
        self.counters.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What decoding needs, shared by the workers: sampling, processor, and the cache key's parts.
pub(crate) struct DecodeCtx {
    pub(crate) sampling: FrameSampling,
    pub(crate) processor: VideoProcessor,
    /// [`reel_data::VideoSettings::key_text`].
    pub(crate) settings_key: String,
    /// The frozen tower's weights fingerprint.
    pub(crate) weights: u64,
    /// The embedding cache, when the tower is frozen (cached videos are not decoded); `None`
    /// decodes every video and makes no keys.
    pub(crate) cache: Option<Arc<EmbedCache>>,
    pub(crate) counters: Arc<FeedCounters>,
    /// Content hash of each video path seen.
    hashes: Mutex<HashMap<PathBuf, String>>,
    /// Videos that failed to decode, with the error (not decoded again).
    bad: Mutex<HashMap<PathBuf, String>>,
}

impl DecodeCtx {
    pub(crate) fn new(
        sampling: FrameSampling,
        processor: VideoProcessor,
        settings_key: String,
        weights: u64,
        cache: Option<Arc<EmbedCache>>,
    ) -> Self {
        DecodeCtx {
            sampling,
            processor,
            settings_key,
            weights,
            cache,
            counters: Arc::default(),
            hashes: Mutex::default(),
            bad: Mutex::default(),
        }
    }

    /// The cache key of a video (its file bytes hashed on first sight).
    fn key(&self, v: &VlVideoPlan) -> VideoResult<EmbedKey> {
        let known = lock(&self.hashes).get(&v.path).cloned();
        let video = match known {
            Some(h) => h,
            None => {
                let h = video_content_hash(&v.path)?;
                lock(&self.hashes).insert(v.path.clone(), h.clone());
                h
            }
        };
        Ok(EmbedKey {
            video,
            settings: self.settings_key.clone(),
            weights: self.weights,
        })
    }

    /// Decodes and preprocesses one video, checking it against its plan.
    pub(crate) fn decode(&self, v: &VlVideoPlan) -> Result<Arc<Pixels>, String> {
        if let Some(e) = lock(&self.bad).get(&v.path) {
            return Err(e.clone());
        }
        let c = &self.counters;
        let alive = c.alive.fetch_add(1, Ordering::Relaxed) + 1;
        c.peak.fetch_max(alive, Ordering::Relaxed);
        // Counted from here: a failure below drops it.
        let mut px = Pixels {
            data: Vec::new(),
            counters: c.clone(),
        };
        let out = load_and_process(&v.path, &self.sampling, &self.processor).and_then(|l| {
            let got = (l.inputs.video_grid_thw, l.inputs.second_per_grid_ts);
            let want = (v.plan.video_grid_thw, v.plan.second_per_grid_ts);
            if got != want {
                return Err(VideoError::Corrupt {
                    path: v.path.clone(),
                    msg: format!(
                        "decodes to grid {:?} ({} s per temporal patch), its header promised \
                         {:?} ({} s)",
                        got.0, got.1, want.0, want.1
                    ),
                });
            }
            Ok(l.inputs.pixel_values_videos)
        });
        match out {
            Ok(data) => {
                c.decoded.fetch_add(1, Ordering::Relaxed);
                px.data = data;
                Ok(Arc::new(px))
            }
            Err(e) => {
                let e = e.to_string();
                lock(&self.bad).insert(v.path.clone(), e.clone());
                Err(e)
            }
        }
    }

    /// A record's videos: keys (frozen tower), and pixels decoded unless the cache holds the
    /// video's embeddings. Fails on the first video that does not decode.
    pub(crate) fn fetch(&self, plan: &VlRecordPlan) -> Result<FetchedRecord, String> {
        let mut videos = Vec::with_capacity(plan.videos.len());
        for v in &plan.videos {
            let key = match &self.cache {
                Some(_) => Some(self.key(v).map_err(|e| e.to_string())?),
                None => None,
            };
            let cached = match (&self.cache, &key) {
                (Some(c), Some(k)) => c.contains(k),
                _ => false,
            };
            let pixels = OnceLock::new();
            if cached {
                self.counters.cache_skips.fetch_add(1, Ordering::Relaxed);
            } else {
                let _ = pixels.set(Ok(self.decode(v)?));
            }
            videos.push(FetchedVideo {
                plan: v.clone(),
                key,
                pixels,
            });
        }
        Ok(FetchedRecord { videos })
    }
}

/// One video of a fetched record.
pub(crate) struct FetchedVideo {
    plan: VlVideoPlan,
    /// Its cache key (frozen tower only).
    pub(crate) key: Option<EmbedKey>,
    /// Decoded by the worker, or on first need ([`FetchedVideo::pixels`]) when it was cached.
    pixels: OnceLock<Result<Arc<Pixels>, String>>,
}

impl FetchedVideo {
    /// The video's pixels, decoding it now (once, whichever rank asks first) if the worker
    /// skipped it for a cache entry that has since gone.
    pub(crate) fn pixels(&self, ctx: &DecodeCtx) -> Result<&[f32], String> {
        let px = self.pixels.get_or_init(|| {
            ctx.counters.late_decodes.fetch_add(1, Ordering::Relaxed);
            ctx.decode(&self.plan)
        });
        match px {
            Ok(p) => Ok(&p.data),
            Err(e) => Err(e.clone()),
        }
    }
}

/// A record's videos, ready for the step.
pub(crate) struct FetchedRecord {
    pub(crate) videos: Vec<FetchedVideo>,
}

impl FetchedRecord {
    /// The pixels of videos `which`, one after another: borrowed for one video, stacked for
    /// several.
    pub(crate) fn stacked(
        &self,
        which: &[usize],
        ctx: &DecodeCtx,
    ) -> Result<Cow<'_, [f32]>, String> {
        match which {
            [k] => Ok(Cow::Borrowed(self.videos[*k].pixels(ctx)?)),
            _ => {
                let mut out = Vec::new();
                for &k in which {
                    out.extend_from_slice(self.videos[k].pixels(ctx)?);
                }
                Ok(Cow::Owned(out))
            }
        }
    }

    /// The cache keys of its videos (frozen tower).
    pub(crate) fn keys(&self) -> Vec<EmbedKey> {
        self.videos.iter().filter_map(|v| v.key.clone()).collect()
    }
}

/// One item of a feed: the record index it is for and its videos, or why they failed.
pub(crate) struct FetchedItem {
    pub(crate) record: usize,
    pub(crate) result: Result<FetchedRecord, String>,
}

/// A feed's prefetcher over `order`, fetching each record of `plans` through `ctx`.
pub(crate) fn record_prefetcher<It>(
    order: It,
    plans: Arc<Vec<VlRecordPlan>>,
    ctx: Arc<DecodeCtx>,
    workers: usize,
    depth: usize,
) -> Prefetcher<FetchedItem>
where
    It: Iterator<Item = usize> + Send + 'static,
{
    Prefetcher::from_iter(order, workers, depth, move |&record: &usize| {
        Ok(FetchedItem {
            record,
            result: ctx.fetch(&plans[record]),
        })
    })
}

/// The records one data-parallel replica of the SFT loop steps through, in order: from a copy
/// of the loop's sampler, each step's `dp · grad_accum` micro-batches of which the replica takes
/// `d, d + dp, …`, for `steps` steps.
pub(crate) struct ReplicaOrder {
    sampler: BucketSampler,
    dp: usize,
    replica: usize,
    per_step: usize,
    /// Micro-batch index within the step.
    k: usize,
    steps_left: u64,
    pending: VecDeque<usize>,
}

impl ReplicaOrder {
    pub(crate) fn new(
        sampler: BucketSampler,
        dp: usize,
        replica: usize,
        grad_accum: usize,
        steps: u64,
    ) -> Self {
        ReplicaOrder {
            sampler,
            dp,
            replica,
            per_step: dp * grad_accum,
            k: 0,
            steps_left: steps,
            pending: VecDeque::new(),
        }
    }
}

impl Iterator for ReplicaOrder {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(r);
            }
            if self.steps_left == 0 || self.per_step == 0 {
                return None;
            }
            let batch = self.sampler.next_batch();
            if self.k % self.dp == self.replica {
                self.pending.extend(batch);
            }
            self.k += 1;
            if self.k == self.per_step {
                self.k = 0;
                self.steps_left -= 1;
            }
        }
    }
}

/// A replica's feed, shared by its `consumers` sequence-parallel ranks: each takes every item
/// in order; an item is let go once all have taken it.
pub(crate) struct ReplicaFeed {
    puller: Mutex<Prefetcher<FetchedItem>>,
    taken: Mutex<Taken>,
}

struct Taken {
    /// Sequence position of `items[0]`.
    base: usize,
    /// Items pulled and not yet taken by every consumer, with how many still have to.
    items: VecDeque<(Arc<FetchedItem>, usize)>,
    /// Each consumer's next position.
    cursors: Vec<usize>,
}

impl Taken {
    /// Consumer `c`'s next item, if pulled.
    fn take(&mut self, c: usize) -> Option<Arc<FetchedItem>> {
        let at = self.cursors[c].checked_sub(self.base)?;
        let (item, left) = self.items.get_mut(at)?;
        let item = item.clone();
        *left -= 1;
        self.cursors[c] += 1;
        while self.items.front().is_some_and(|(_, left)| *left == 0) {
            self.items.pop_front();
            self.base += 1;
        }
        Some(item)
    }
}

impl ReplicaFeed {
    pub(crate) fn new(prefetcher: Prefetcher<FetchedItem>, consumers: usize) -> Self {
        ReplicaFeed {
            puller: Mutex::new(prefetcher),
            taken: Mutex::new(Taken {
                base: 0,
                items: VecDeque::new(),
                cursors: vec![0; consumers.max(1)],
            }),
        }
    }

    /// Consumer `c`'s next item (blocking until it is decoded) and the seconds waited.
    pub(crate) fn take(&self, c: usize) -> Result<(Arc<FetchedItem>, f64)> {
        let t = Instant::now();
        loop {
            if let Some(item) = lock(&self.taken).take(c) {
                return Ok((item, t.elapsed().as_secs_f64()));
            }
            let mut pf = lock(&self.puller);
            // Another consumer may have pulled it while this one waited for the puller.
            if let Some(item) = lock(&self.taken).take(c) {
                return Ok((item, t.elapsed().as_secs_f64()));
            }
            let item = match pf.next_result() {
                Some((_, Ok(item))) => item,
                Some((i, Err(e))) => bail!("video feed item {i}: {e}"),
                None => bail!("the video feed ended before the sampler did"),
            };
            let consumers = {
                let g = lock(&self.taken);
                g.cursors.len()
            };
            lock(&self.taken)
                .items
                .push_back((Arc::new(item), consumers));
        }
    }
}

/// Records already counted as skipped for a video that failed in training or evaluation, so
/// each is counted once however often it is drawn.
#[derive(Default)]
pub(crate) struct FailedRecords {
    seen: Mutex<HashSet<(bool, usize)>>,
    count: AtomicUsize,
}

impl FailedRecords {
    /// Notes record `i` (of the eval set when `eval`) as failed; true the first time (then
    /// warn and count).
    pub(crate) fn first(&self, eval: bool, i: usize) -> bool {
        let new = lock(&self.seen).insert((eval, i));
        if new {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// What a drawn GRPO prompt gives: its plan (prompt tokens, video grids) and its videos, or the
/// warning for a record that is skipped (malformed, a video missing or undecodable).
pub(crate) type PromptDraw = Result<(VlRecordPlan, FetchedRecord), String>;

/// GRPO's feed: the prompt order (a copy of the run's prompt sampler, endless), each record
/// planned ([`plan_vl_record`]) and its videos fetched `depth` prompts ahead.
pub(crate) struct PromptFeed {
    prefetcher: Prefetcher<(usize, PromptDraw)>,
    ctx: Arc<DecodeCtx>,
}

impl PromptFeed {
    /// `order` yields the record indices the run will draw, in order.
    pub(crate) fn new<It>(
        order: It,
        file: Arc<ReasonFile>,
        tok: Arc<Tokenizer>,
        settings: Arc<VideoSettings>,
        ctx: Arc<DecodeCtx>,
        workers: usize,
        depth: usize,
    ) -> Self
    where
        It: Iterator<Item = usize> + Send + 'static,
    {
        let job_ctx = ctx.clone();
        let prefetcher = Prefetcher::from_iter(order, workers, depth, move |&i: &usize| {
            let plan = plan_vl_record(&file, i, &tok, &settings, &job_ctx.processor, false)
                .map_err(|skip| skip.to_string());
            let draw = plan.and_then(|plan| match job_ctx.fetch(&plan) {
                Ok(f) => Ok((plan, f)),
                Err(e) => Err(VlSkip::Video(file.origin(i), e).to_string()),
            });
            Ok((i, draw))
        });
        PromptFeed { prefetcher, ctx }
    }

    /// The decoder the feed fetches with.
    pub(crate) fn ctx(&self) -> &Arc<DecodeCtx> {
        &self.ctx
    }

    /// The next drawn record, which must be record `expected`, and the seconds waited for it.
    pub(crate) fn next(&mut self, expected: usize) -> Result<(PromptDraw, f64)> {
        let t = Instant::now();
        let (i, draw) = match self.prefetcher.next_result() {
            Some((_, Ok(item))) => item,
            Some((k, Err(e))) => bail!("prompt feed item {k}: {e}"),
            None => bail!("the prompt feed ended"),
        };
        if i != expected {
            bail!("the prompt feed is out of step with the prompt order ({i}, not {expected})");
        }
        let waited = t.elapsed().as_secs_f64();
        self.ctx.counters.add_wait(waited);
        Ok((draw, waited))
    }
}
