//! Content-addressed cache of merged vision embeddings (LongVILA-R1's MR-SP stage 1: encode each
//! video once, reuse the embeddings for every rollout of a group and for the old-policy,
//! reference and update passes).
//!
//! Key ([`EmbedKey`]): the video's content hash (`reel_data::video::video_content_hash`: file
//! bytes, or a frame folder's names and bytes), a string naming the frame sampling and
//! preprocessing settings, and the vision weights' version ([`weights_fingerprint`] of the tower's
//! parameters, or any counter the trainer bumps at every update of the tower). Never a row or
//! batch position: the same video at two positions, or two batches in another order, map to the
//! same entry, and two videos never share one.
//!
//! Value ([`VideoEmbeds`]): the tower's merged output [tokens, d_lm] (tokens = t·h·w / m²), the
//! video's grid (t, h, w) in patches and its seconds per temporal patch.
//!
//! Tiers: memory, least-recently-used eviction by bytes (`capacity_bytes`); optionally a folder
//! on disk, one safetensors file per key (`<sha256 of the key>.safetensors`, written atomically
//! with [`crate::io::write_atomic`], memory-mapped and copied into the memory tier on read).
//! [`EmbedCache`] is shared by reference across threads (one mutex around the memory tier).
//! [`CacheStats`] (hits in memory and on disk, misses, resident bytes, evictions) go to metrics.

use crate::io::{safetensors_bytes, write_atomic};
use crate::vision::VideoGrid;
use crate::ModelError;
use reel_tensor::DType;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What identifies one video's embeddings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EmbedKey {
    /// Hex content hash of the video.
    pub video: String,
    /// Frame sampling and preprocessing settings, written out (any stable text: two settings
    /// that give different pixels must give different text).
    pub settings: String,
    /// Version of the vision weights the embeddings came from.
    pub weights: u64,
}

impl EmbedKey {
    /// Hex SHA-256 of the key's three parts (the on-disk file name).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for part in [self.video.as_bytes(), self.settings.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(self.weights.to_le_bytes());
        hex(&h.finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A version of the tower's weights from their values: the first 8 bytes of the SHA-256 of the
/// parameters' f32 bits. Equal weights give equal versions; any change of any value changes it
/// (with overwhelming probability).
pub fn weights_fingerprint(params: &[f32]) -> u64 {
    let mut h = Sha256::new();
    for chunk in params.chunks(1 << 14) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("32-byte digest"))
}

/// One video's merged vision embeddings.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoEmbeds {
    /// [tokens, d] row-major.
    pub data: Vec<f32>,
    pub tokens: usize,
    pub d: usize,
    pub grid: VideoGrid,
    /// Seconds per temporal patch.
    pub second_per_grid_t: f32,
}

impl VideoEmbeds {
    /// Bytes the embeddings occupy.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// Counters of an [`EmbedCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from memory.
    pub hits: u64,
    /// Lookups answered from the disk folder (then kept in memory).
    pub disk_hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Entries inserted.
    pub inserts: u64,
    /// Entries dropped from memory to stay within capacity.
    pub evictions: u64,
    /// Bytes of embeddings held in memory now.
    pub bytes: u64,
    /// Entries held in memory now.
    pub entries: u64,
}

impl CacheStats {
    /// hits / lookups (memory and disk), 0 with no lookups.
    pub fn hit_rate(&self) -> f64 {
        let hits = self.hits + self.disk_hits;
        let all = hits + self.misses;
        if all == 0 {
            0.0
        } else {
            hits as f64 / all as f64
        }
    }
}

struct Slot {
    value: Arc<VideoEmbeds>,
    last_use: u64,
}

struct Inner {
    map: HashMap<EmbedKey, Slot>,
    clock: u64,
    stats: CacheStats,
}

/// The cache (module docs). `capacity_bytes` bounds the memory tier; an entry larger than it is
/// not kept in memory (disk only, when there is a folder).
pub struct EmbedCache {
    capacity_bytes: usize,
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl EmbedCache {
    /// A memory-only cache of at most `capacity_bytes` of embeddings.
    pub fn new(capacity_bytes: usize) -> Self {
        EmbedCache {
            capacity_bytes,
            dir: None,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                clock: 0,
                stats: CacheStats::default(),
            }),
        }
    }

    /// A cache that also keeps every entry under `dir` (created if missing).
    pub fn with_dir(capacity_bytes: usize, dir: &Path) -> Result<Self, ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut c = Self::new(capacity_bytes);
        c.dir = Some(dir.to_path_buf());
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters half-updated: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters now.
    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    fn file(&self, key: &EmbedKey) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}.safetensors", key.digest())))
    }

    /// The embeddings of `key` from memory, else from disk; `None` (a miss) otherwise. A disk
    /// file that does not read back is an error naming it.
    pub fn get(&self, key: &EmbedKey) -> Result<Option<Arc<VideoEmbeds>>, ModelError> {
        {
            let mut g = self.lock();
            g.clock += 1;
            let now = g.clock;
            if let Some(slot) = g.map.get_mut(key) {
                slot.last_use = now;
                let v = slot.value.clone();
                g.stats.hits += 1;
                return Ok(Some(v));
            }
        }
        if let Some(path) = self.file(key).filter(|p| p.is_file()) {
            let v = Arc::new(read_entry(&path)?);
            let mut g = self.lock();
            g.stats.disk_hits += 1;
            self.keep(&mut g, key.clone(), v.clone());
            return Ok(Some(v));
        }
        self.lock().stats.misses += 1;
        Ok(None)
    }

    /// Whether `key` is held (in memory, or as a file of the disk folder), without counting a
    /// lookup or refreshing its recency: a data loader asks this to skip decoding a video whose
    /// embeddings are already there (the entry may still be evicted before it is read).
    pub fn contains(&self, key: &EmbedKey) -> bool {
        self.lock().map.contains_key(key) || self.file(key).is_some_and(|p| p.is_file())
    }

    /// Stores `value` under `key` (memory, and disk when the cache has a folder) and returns
    /// the entry now held. A key already held in memory keeps its entry, which is returned
    /// instead: keys name their content (video, settings, weights), and the ranks of a
    /// sequence-parallel encode that share one cache each insert the same videos, so the first
    /// insert serves them all (one copy in memory, one file written).
    pub fn insert(
        &self,
        key: EmbedKey,
        value: VideoEmbeds,
    ) -> Result<Arc<VideoEmbeds>, ModelError> {
        if value.data.len() != value.tokens * value.d {
            return Err(ModelError::Invalid(format!(
                "embeddings of {} values for {} tokens of width {}",
                value.data.len(),
                value.tokens,
                value.d
            )));
        }
        if let Some(held) = self.held(&key) {
            return Ok(held);
        }
        if let Some(path) = self.file(&key) {
            write_entry(&path, &key, &value)?;
        }
        let v = Arc::new(value);
        let mut g = self.lock();
        // Another thread may have inserted it while the file was written.
        if let Some(slot) = g.map.get(&key) {
            return Ok(slot.value.clone());
        }
        g.stats.inserts += 1;
        self.keep(&mut g, key, v.clone());
        Ok(v)
    }

    /// The entry held in memory under `key`, without counting a lookup or refreshing its
    /// recency.
    fn held(&self, key: &EmbedKey) -> Option<Arc<VideoEmbeds>> {
        self.lock().map.get(key).map(|s| s.value.clone())
    }

    /// Puts an entry in the memory tier and evicts least-recently-used ones past capacity.
    fn keep(&self, g: &mut Inner, key: EmbedKey, value: Arc<VideoEmbeds>) {
        let bytes = value.bytes() as u64;
        if bytes > self.capacity_bytes as u64 {
            return;
        }
        g.clock += 1;
        let now = g.clock;
        if let Some(old) = g.map.insert(
            key,
            Slot {
                value,
                last_use: now,
            },
        ) {
            g.stats.bytes -= old.value.bytes() as u64;
            g.stats.entries -= 1;
        }
        g.stats.bytes += bytes;
        g.stats.entries += 1;
        while g.stats.bytes > self.capacity_bytes as u64 {
            let Some(victim) = g
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let s = g.map.remove(&victim).expect("just found");
            g.stats.bytes -= s.value.bytes() as u64;
            g.stats.entries -= 1;
            g.stats.evictions += 1;
        }
    }

    /// Drops every entry from memory (the disk folder stays); counters other than bytes and
    /// entries are kept.
    pub fn clear_memory(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.stats.bytes = 0;
        g.stats.entries = 0;
    }
}

fn write_entry(path: &Path, key: &EmbedKey, v: &VideoEmbeds) -> Result<(), ModelError> {
    let g = v.grid;
    let meta = HashMap::from([
        ("video".to_string(), key.video.clone()),
        ("settings".to_string(), key.settings.clone()),
        ("weights".to_string(), key.weights.to_string()),
        ("grid_thw".to_string(), format!("{} {} {}", g.t, g.h, g.w)),
        (
            "second_per_grid_t".to_string(),
            v.second_per_grid_t.to_string(),
        ),
    ]);
    let bytes = safetensors_bytes(
        &[("embeds".to_string(), vec![v.tokens, v.d], &v.data)],
        DType::F32,
        Some(meta),
    )?;
    write_atomic(path, &bytes).map_err(|e| ModelError::io(path, e))
}

fn read_entry(path: &Path) -> Result<VideoEmbeds, ModelError> {
    let bad = |msg: String| ModelError::Checkpoint {
        path: path.display().to_string(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: cache files are written once, atomically (rename), and never modified in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let (_, header) =
        SafeTensors::read_metadata(&map).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let t = st
        .tensor("embeds")
        .map_err(|_| bad("no tensor `embeds`".into()))?;
    let shape = t.shape();
    if t.dtype() != safetensors::Dtype::F32 || shape.len() != 2 {
        return Err(bad(format!(
            "`embeds` must be f32 [tokens, d]; is {:?} {shape:?}",
            t.dtype()
        )));
    }
    let meta = header.metadata().clone().unwrap_or_default();
    let grid: Vec<usize> = meta
        .get("grid_thw")
        .map(|s| s.split(' ').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let [gt, gh, gw] = grid[..] else {
        return Err(bad("metadata `grid_thw` missing or malformed".into()));
    };
    let secs = meta
        .get("second_per_grid_t")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("metadata `second_per_grid_t` missing or malformed".into()))?;
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(VideoEmbeds {
        data,
        tokens: shape[0],
        d: shape[1],
        grid: VideoGrid {
            t: gt,
            h: gh,
            w: gw,
        },
        second_per_grid_t: secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(video: &str, weights: u64) -> EmbedKey {
        EmbedKey {
            video: video.into(),
            settings: "uniform:8 max_pixels:12544".into(),
            weights,
        }
    }

    fn embeds(seed: f32, tokens: usize) -> VideoEmbeds {
        VideoEmbeds {
            data: (0..tokens * 4).map(|i| seed + i as f32).collect(),
            tokens,
            d: 4,
            grid: VideoGrid {
                t: tokens,
                h: 2,
                w: 2,
            },
            second_per_grid_t: 0.5,
        }
    }

    #[test]
    fn hits_misses_and_every_key_part_matters() {
        let c = EmbedCache::new(1 << 20);
        assert!(c.get(&key("a", 1)).unwrap().is_none());
        c.insert(key("a", 1), embeds(1.0, 3)).unwrap();
        assert_eq!(*c.get(&key("a", 1)).unwrap().unwrap(), embeds(1.0, 3));
        // Another video, other weights, other settings: misses.
        assert!(c.get(&key("b", 1)).unwrap().is_none());
        assert!(c.get(&key("a", 2)).unwrap().is_none());
        let mut k = key("a", 1);
        k.settings.push('x');
        assert!(c.get(&k).unwrap().is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.inserts, s.entries), (1, 4, 1, 1));
        assert_eq!(s.bytes, 48);
        assert!((s.hit_rate() - 0.2).abs() < 1e-12);
        assert_ne!(key("a", 1).digest(), key("a", 2).digest());
    }

    #[test]
    fn a_key_inserted_twice_keeps_its_first_entry() {
        let c = EmbedCache::new(1 << 20);
        let a = c.insert(key("a", 1), embeds(1.0, 3)).unwrap();
        let b = c.insert(key("a", 1), embeds(1.0, 3)).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second insert returns the held entry"
        );
        let s = c.stats();
        assert_eq!((s.inserts, s.entries, s.bytes), (1, 1, 48));
        // Ranks sharing the cache, inserting at once: every one gets the same entry.
        let got: Vec<Arc<VideoEmbeds>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| c.insert(key("b", 1), embeds(2.0, 2)).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| Arc::ptr_eq(g, &got[0])));
        assert_eq!(c.stats().entries, 2);
    }

    #[test]
    fn lru_by_bytes() {
        // Room for two entries of 48 bytes.
        let c = EmbedCache::new(100);
        c.insert(key("a", 0), embeds(0.0, 3)).unwrap();
        c.insert(key("b", 0), embeds(1.0, 3)).unwrap();
        c.get(&key("a", 0)).unwrap(); // a is now the most recent
        let before = c.stats();
        assert!(
            c.contains(&key("b", 0)),
            "contains neither counts nor refreshes b"
        );
        assert_eq!(c.stats(), before);
        c.insert(key("c", 0), embeds(2.0, 3)).unwrap(); // evicts b
        assert!(!c.contains(&key("b", 0)));
        assert!(c.get(&key("a", 0)).unwrap().is_some());
        assert!(c.get(&key("b", 0)).unwrap().is_none());
        assert!(c.get(&key("c", 0)).unwrap().is_some());
        let s = c.stats();
        assert_eq!((s.evictions, s.entries, s.bytes), (1, 2, 96));
        // Too big for memory at all: not kept.
        c.insert(key("big", 0), embeds(0.0, 9)).unwrap();
        assert!(c.get(&key("big", 0)).unwrap().is_none());
    }

    #[test]
    fn disk_tier_round_trips_and_survives_a_new_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let c = EmbedCache::with_dir(1 << 20, &dir).unwrap();
        c.insert(key("a", 7), embeds(3.0, 5)).unwrap();
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1, "one file, no temp file left");
        let fresh = EmbedCache::with_dir(1 << 20, &dir).unwrap();
        // `contains` sees the disk tier and counts nothing.
        assert!(fresh.contains(&key("a", 7)) && !fresh.contains(&key("a", 8)));
        assert_eq!(fresh.stats(), CacheStats::default());
        let got = fresh.get(&key("a", 7)).unwrap().unwrap();
        assert_eq!(*got, embeds(3.0, 5));
        assert!(fresh.get(&key("a", 7)).unwrap().is_some());
        let s = fresh.stats();
        assert_eq!((s.disk_hits, s.hits, s.misses), (1, 1, 0));
        // A damaged file is an error naming it.
        let path = dir.join(format!("{}.safetensors", key("a", 7).digest()));
        std::fs::write(&path, b"garbage").unwrap();
        let e = EmbedCache::with_dir(1 << 20, &dir)
            .unwrap()
            .get(&key("a", 7))
            .unwrap_err();
        assert!(e.to_string().contains(&key("a", 7).digest()), "{e}");
    }

    #[test]
    fn fingerprint_follows_the_weights() {
        let w = vec![0.5f32; 40_000];
        let mut w2 = w.clone();
        assert_eq!(weights_fingerprint(&w), weights_fingerprint(&w2));
        w2[39_999] = 0.5000001;
        assert_ne!(weights_fingerprint(&w), weights_fingerprint(&w2));
    }
}
