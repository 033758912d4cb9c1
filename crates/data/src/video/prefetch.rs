//! Decoding ahead of compute: worker threads run a job (decode + sample + preprocess) for each
//! item of a list while the consumer works on earlier ones.
//!
//! Items come out in list order. At most `capacity` items are in flight or finished-but-unread
//! at a time (a bounded queue), so memory stays bounded however slow the consumer is. A job that
//! fails (a missing or undecodable video) — or panics — is skipped: a warning naming it is logged,
//! it is counted in [`PrefetchStats`], and iteration goes on with the next item.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{
    FrameSampling, Video, VideoError, VideoInputs, VideoMeta, VideoProcessor, VideoResult,
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
    /// Seconds the consumer spent waiting for the next item (0 when decoding keeps ahead).
    pub wait_secs: f64,
    /// Seconds the workers spent in jobs, summed over workers.
    pub busy_secs: f64,
}

struct State<T> {
    next_job: usize,
    consumed: usize,
    done: BTreeMap<usize, VideoResult<T>>,
    stop: bool,
    busy_secs: f64,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    work: Condvar,
    ready: Condvar,
}

/// Runs `job` over `items` on worker threads, yielding `(index, output)` in order and skipping
/// failures (see the module docs).
pub struct Prefetcher<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    n: usize,
    next: usize,
    stats: PrefetchStats,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts `workers` threads (at least 1) over `items`, at most `capacity` (≥ 1) items ahead
    /// of the consumer.
    pub fn new<I, F>(items: Vec<I>, workers: usize, capacity: usize, job: F) -> Self
    where
        I: Send + Sync + 'static,
        F: Fn(&I) -> VideoResult<T> + Send + Sync + 'static,
    {
        let n = items.len();
        let capacity = capacity.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_job: 0,
                consumed: 0,
                done: BTreeMap::new(),
                stop: false,
                busy_secs: 0.0,
            }),
            work: Condvar::new(),
            ready: Condvar::new(),
        });
        let items = Arc::new(items);
        let job = Arc::new(job);
        let workers = (0..workers.max(1).min(n.max(1)))
            .map(|_| {
                let (shared, items, job) = (shared.clone(), items.clone(), job.clone());
                std::thread::spawn(move || worker(&shared, &items, &*job, capacity))
            })
            .collect();
        Prefetcher {
            shared,
            workers,
            n,
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking job is caught before it can poison the lock; recover anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker<I, T, F>(shared: &Shared<T>, items: &[I], job: &F, capacity: usize)
where
    F: Fn(&I) -> VideoResult<T>,
{
    loop {
        let j = {
            let mut s = lock(&shared.state);
            loop {
                if s.stop || s.next_job >= items.len() {
                    return;
                }
                if s.next_job < s.consumed + capacity {
                    break;
                }
                s = shared.work.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.next_job += 1;
            s.next_job - 1
        };
        let t = Instant::now();
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| job(&items[j])))
            .unwrap_or_else(|_| Err(VideoError::Config(format!("item {j}: the job panicked"))));
        let mut s = lock(&shared.state);
        s.busy_secs += t.elapsed().as_secs_f64();
        s.done.insert(j, out);
        shared.ready.notify_all();
    }
}

impl<T: Send + 'static> Iterator for Prefetcher<T> {
    type Item = (usize, T);

    fn next(&mut self) -> Option<(usize, T)> {
        while self.next < self.n {
            let i = self.next;
            let t = Instant::now();
            let out = {
                let mut s = lock(&self.shared.state);
                loop {
                    if let Some(out) = s.done.remove(&i) {
                        break out;
                    }
                    s = self.shared.ready.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.stats.wait_secs += t.elapsed().as_secs_f64();
            self.next += 1;
            lock(&self.shared.state).consumed = self.next;
            self.shared.work.notify_all();
            match out {
                Ok(v) => {
                    self.stats.ok += 1;
                    return Some((i, v));
                }
                Err(e) => {
                    tracing::warn!("skipping video {i}: {e}");
                    self.stats.skipped += 1;
                    self.stats.errors.push((i, e.to_string()));
                }
            }
        }
        None
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
