//! Decoding ahead of compute: worker threads run a job (decode + sample + preprocess) for each
//! item of a sequence while the consumer works on earlier ones.
//!
//! Items come out in sequence order. At most `capacity` items are in flight or finished-but-unread
//! at a time (a bounded queue), so memory stays bounded however slow the consumer is. The
//! sequence may be a list ([`Prefetcher::new`]) or any iterator, endless ones included
//! ([`Prefetcher::from_iter`]: a trainer's sampler order), pulled only as far as the queue
//! allows. With 0 workers nothing runs ahead: each job runs on the consumer's thread when it
//! asks for the item (the same results, in the same order). As an iterator, a job that fails (a
//! missing or undecodable video) — or panics — is skipped: a warning naming it is logged, it is
//! counted in [`PrefetchStats`], and iteration goes on with the next item;
//! [`Prefetcher::next_result`] hands failures to the consumer instead.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{
    sample_indices, sampled_fps, FrameSampling, Video, VideoError, VideoInputs, VideoMeta,
    VideoProcessor, VideoResult,
};

/// Counts of a prefetcher's work so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefetchStats {
    /// Items whose job succeeded and were handed out.
    pub ok: usize,
    /// Items skipped because their job failed.
    pub skipped: usize,
    /// `(item index, error)` of each skipped item.
    pub errors: Vec<(usize, String)>,
    /// Seconds the consumer spent waiting for the next item (0 when decoding keeps ahead; with
    /// 0 workers, the jobs' own time).
    pub wait_secs: f64,
    /// Seconds the workers spent in jobs, summed over workers.
    pub busy_secs: f64,
}

/// One item's job, ready to run.
type Task<T> = Box<dyn FnOnce() -> VideoResult<T> + Send>;

struct State<T> {
    /// The items still to start, as jobs.
    source: Box<dyn Iterator<Item = Task<T>> + Send>,
    /// Jobs pulled from `source` so far (the next job's index).
    next_job: usize,
    /// `source` has ended: `next_job` is the number of items.
    exhausted: bool,
    consumed: usize,
    done: BTreeMap<usize, VideoResult<T>>,
    stop: bool,
    busy_secs: f64,
}

impl<T> State<T> {
    /// The next job and its index, if the sequence has one.
    fn pull(&mut self) -> Option<(usize, Task<T>)> {
        if self.exhausted {
            return None;
        }
        match self.source.next() {
            Some(task) => {
                self.next_job += 1;
                Some((self.next_job - 1, task))
            }
            None => {
                self.exhausted = true;
                None
            }
        }
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    work: Condvar,
    ready: Condvar,
}

/// Runs a job over a sequence of items on worker threads, yielding `(index, output)` in order
/// and skipping failures (see the module docs).
pub struct Prefetcher<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    /// No worker threads: jobs run in [`Prefetcher::next_result`].
    inline: bool,
    next: usize,
    stats: PrefetchStats,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts `workers` threads (0: jobs run on the consumer's thread) over `items`, at most
    /// `capacity` (≥ 1) items ahead of the consumer.
    pub fn new<I, F>(items: Vec<I>, workers: usize, capacity: usize, job: F) -> Self
    where
        I: Send + 'static,
        F: Fn(&I) -> VideoResult<T> + Send + Sync + 'static,
    {
        let workers = workers.min(items.len().max(1));
        Self::from_iter(items.into_iter(), workers, capacity, job)
    }

    /// [`Prefetcher::new`] over the items of an iterator, pulled (on a worker, under the
    /// prefetcher's lock: it should be cheap) only as far as `capacity` allows; it may be endless.
    pub fn from_iter<It, I, F>(items: It, workers: usize, capacity: usize, job: F) -> Self
    where
        It: Iterator<Item = I> + Send + 'static,
        I: Send + 'static,
        F: Fn(&I) -> VideoResult<T> + Send + Sync + 'static,
    {
        let capacity = capacity.max(1);
        let job = Arc::new(job);
        let source = items.map(move |item| {
            let job = job.clone();
            Box::new(move || job(&item)) as Task<T>
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                source: Box::new(source),
                next_job: 0,
                exhausted: false,
                consumed: 0,
                done: BTreeMap::new(),
                stop: false,
                busy_secs: 0.0,
            }),
            work: Condvar::new(),
            ready: Condvar::new(),
        });
        let handles = (0..workers)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || worker(&shared, capacity))
            })
            .collect();
        Prefetcher {
            shared,
            workers: handles,
            inline: workers == 0,
            next: 0,
            stats: PrefetchStats::default(),
        }
    }

    /// Counts so far (`busy_secs` up to date with finished jobs).
    pub fn stats(&self) -> PrefetchStats {
        let mut s = self.stats.clone();
        s.busy_secs = lock(&self.shared.state).busy_secs;
        s
    }

    /// The next item's index and its job's result, failures included (counted in the stats but
    /// not logged: the consumer reports them); `None` once the sequence has ended.
    pub fn next_result(&mut self) -> Option<(usize, VideoResult<T>)> {
        let i = self.next;
        let t = Instant::now();
        let out = if self.inline {
            let (j, task) = lock(&self.shared.state).pull()?;
            debug_assert_eq!(j, i);
            let out = run_task(task, j);
            lock(&self.shared.state).busy_secs += t.elapsed().as_secs_f64();
            out
        } else {
            let mut s = lock(&self.shared.state);
            loop {
                if let Some(out) = s.done.remove(&i) {
                    break out;
                }
                if s.exhausted && i >= s.next_job {
                    return None;
                }
                s = self.shared.ready.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        self.stats.wait_secs += t.elapsed().as_secs_f64();
        self.next += 1;
        lock(&self.shared.state).consumed = self.next;
        self.shared.work.notify_all();
        match &out {
            Ok(_) => self.stats.ok += 1,
            Err(e) => {
                self.stats.skipped += 1;
                self.stats.errors.push((i, e.to_string()));
            }
        }
        Some((i, out))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking job is caught before it can poison the lock; recover anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs job `j`, a panic turned into an error.
fn run_task<T>(task: Task<T>, j: usize) -> VideoResult<T> {
    std::panic::catch_unwind(AssertUnwindSafe(task))
        .unwrap_or_else(|_| Err(VideoError::Config(format!("item {j}: the job panicked"))))
}

fn worker<T>(shared: &Shared<T>, capacity: usize) {
    loop {
        let (j, task) = {
            let mut s = lock(&shared.state);
            loop {
                if s.stop {
                    return;
                }
                if s.next_job < s.consumed + capacity {
                    match s.pull() {
                        Some(job) => break job,
                        None => {
                            shared.ready.notify_all();
                            return;
                        }
                    }
                }
                s = shared.work.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        let t = Instant::now();
        let out = run_task(task, j);
        let mut s = lock(&shared.state);
        s.busy_secs += t.elapsed().as_secs_f64();
        s.done.insert(j, out);
        shared.ready.notify_all();
    }
}

impl<T: Send + 'static> Iterator for Prefetcher<T> {
    type Item = (usize, T);

    fn next(&mut self) -> Option<(usize, T)> {
        loop {
            match self.next_result()? {
                (i, Ok(v)) => return Some((i, v)),
                (i, Err(e)) => tracing::warn!("skipping video {i}: {e}"),
            }
        }
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// What a video will give before any frame is decoded (its container's header, the frame
/// sampling and the processor's resize rule): the frame indices, the grid in patches and the
/// seconds per temporal patch — exactly what [`load_and_process`] then produces.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoPlan {
    pub meta: VideoMeta,
    /// Frame indices to sample.
    pub indices: Vec<usize>,
    /// `[grid_t, grid_h, grid_w]` in patches.
    pub video_grid_thw: [usize; 3],
    /// Seconds spanned by one temporal patch.
    pub second_per_grid_ts: f64,
}

impl VideoPlan {
    /// Video tokens the language model will see: `t·h·w / merge_size²`.
    pub fn num_video_tokens(&self, merge_size: usize) -> usize {
        self.video_grid_thw.iter().product::<usize>() / (merge_size * merge_size)
    }
}

/// Opens `path` (headers only: an AVI's index, a folder's first frame, ffprobe), samples frame
/// indices and computes the grid the processor will give; decodes no frame. A missing file or an
/// unreadable container fails here as it would in [`load_and_process`].
pub fn plan_video(
    path: &Path,
    sampling: &FrameSampling,
    processor: &VideoProcessor,
) -> VideoResult<VideoPlan> {
    let meta = Video::open(path)?.meta();
    let indices = sample_indices(&meta, sampling).map_err(|msg| VideoError::Sampling {
        path: path.to_path_buf(),
        msg,
    })?;
    let grid = processor
        .grid(meta.height, meta.width, indices.len())
        .map_err(|msg| VideoError::Unsupported {
            path: path.to_path_buf(),
            msg,
        })?;
    let tp = processor.config.temporal_patch_size;
    Ok(VideoPlan {
        meta,
        second_per_grid_ts: tp as f64 / sampled_fps(&meta, indices.len()),
        indices,
        video_grid_thw: grid,
    })
}

/// A video decoded, sampled and preprocessed, with the time each stage took.
#[derive(Clone, Debug)]
pub struct LoadedVideo {
    pub path: PathBuf,
    pub meta: VideoMeta,
    /// Frame indices sampled.
    pub indices: Vec<usize>,
    pub inputs: VideoInputs,
    /// Seconds to open, sample and decode.
    pub decode_secs: f64,
    /// Seconds to resize, normalise and patchify.
    pub process_secs: f64,
}

/// Opens `path`, samples frames, decodes and preprocesses them.
pub fn load_and_process(
    path: &Path,
    sampling: &FrameSampling,
    processor: &VideoProcessor,
) -> VideoResult<LoadedVideo> {
    let t = Instant::now();
    let sampled = Video::open(path)?.sample(sampling)?;
    let decode_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let inputs = processor.process_sampled(&sampled, path)?;
    Ok(LoadedVideo {
        path: path.to_path_buf(),
        meta: sampled.meta,
        indices: sampled.indices,
        inputs,
        decode_secs,
        process_secs: t.elapsed().as_secs_f64(),
    })
}

impl Prefetcher<LoadedVideo> {
    /// Loads `paths` with [`load_and_process`] on `workers` threads, `capacity` videos ahead.
    pub fn videos(
        paths: Vec<PathBuf>,
        sampling: FrameSampling,
        processor: VideoProcessor,
        workers: usize,
        capacity: usize,
    ) -> Self {
        Prefetcher::new(paths, workers, capacity, move |p: &PathBuf| {
            load_and_process(p, &sampling, &processor)
        })
    }
}
