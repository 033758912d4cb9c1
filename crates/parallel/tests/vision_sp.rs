//! MR-SP stage 1 against one rank: at P = 1…4 the gathered embeddings equal the single-rank
//! tower's, the ranks' parameter gradients sum to the single-rank backward, and with the
//! embedding cache the tower runs once per video however many passes reuse it; the cache is
//! keyed by content, never by row position; the `_on` forms run whatever tower they are given.

use std::time::Duration;

use reel_comm::InProcess;
use reel_model::embed_cache::{EmbedCache, EmbedKey};
use reel_model::{VideoGrid, VisionConfig, VisionTower, VisionWorkspace};
use reel_parallel::{temporal_split, SpVisionEncoder, VisionSpError};
use reel_tensor::{check_close, Tolerance};

const TIMEOUT: Duration = Duration::from_secs(20);

fn tower() -> VisionTower {
    let c = VisionConfig::tiny();
    let n = reel_model::vision::VisionLayout::new(&c).total();
    let mut rng = reel_tensor::rng(11);
    let mut p = reel_tensor::uniform_vec(&mut rng, n, 0.08);
    // RMSNorm weights near one, as trained towers have them.
    let layout = reel_model::vision::VisionLayout::new(&c);
    for b in &layout.blocks {
        for r in [b.norm1.clone(), b.norm2.clone()] {
            p[r].iter_mut().for_each(|x| *x += 1.0);
        }
    }
    p[layout.ln_q.clone()].iter_mut().for_each(|x| *x += 1.0);
    VisionTower::from_params(c, p).unwrap()
}

fn pixels(tower: &VisionTower, grids: &[VideoGrid], seed: u64) -> Vec<f32> {
    let n: usize = grids.iter().map(VideoGrid::patches).sum();
    let mut rng = reel_tensor::rng(seed);
    reel_tensor::uniform_vec(&mut rng, n * tower.config.patch_len(), 1.0)
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

#[test]
fn split_is_contiguous_balanced_and_complete() {
    for t in 1..9 {
        for p in 1..6 {
            let s = temporal_split(t, p);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[p - 1].end, t);
            for w in s.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            let (lo, hi) = (
                s.iter().map(|r| r.len()).min().unwrap(),
                s.iter().map(|r| r.len()).max().unwrap(),
            );
            assert!(hi - lo <= 1, "t {t} p {p}: {s:?}");
        }
    }
}

#[test]
fn sp_encode_forward_and_backward_equal_one_rank() {
    let tower = tower();
    // Two videos: t = 5 (uneven over 2, 3, 4 ranks) with partial windows (h 6 w 4 in patches =
    // 3×2 merge units, windows of 2×2 units), and t = 2 (fewer slices than ranks at P = 3, 4).
    let grids = [
        VideoGrid { t: 5, h: 6, w: 4 },
        VideoGrid { t: 2, h: 4, w: 4 },
    ];
    let px = pixels(&tower, &grids, 5);
    let mut ws = VisionWorkspace::new();
    let want = tower.forward(&mut ws, &px, &grids).unwrap().to_vec();
    let mut rng = reel_tensor::rng(9);
    let dfeat = reel_tensor::uniform_vec(&mut rng, want.len(), 1.0);
    let mut want_g = vec![0.0f32; tower.params.len()];
    tower.backward(&mut want_g, &mut ws, &dfeat).unwrap();
    for p in 1..=4 {
        let enc = SpVisionEncoder::new();
        let res = InProcess::spawn(p, TIMEOUT, |comm| -> Result<_, VisionSpError> {
            let mut ws = VisionWorkspace::new();
            let got = enc.encode(&comm, &tower, &mut ws, &px, &grids)?;
            let mut g = vec![0.0f32; tower.params.len()];
            enc.backward(&comm, &tower, &mut ws, &mut g, &grids, &dfeat)?;
            reel_comm::Communicator::all_reduce_sum(&comm, &mut g)?;
            Ok((got, g))
        });
        for (r, out) in res.into_iter().enumerate() {
            let (got, g) = out.unwrap_or_else(|e| panic!("P {p} rank {r}: {e}"));
            check_close(
                &format!("P {p} rank {r} embeddings"),
                &got,
                &want,
                Tolerance::new(1e-5 * max_abs(&want), 1e-4),
            )
            .unwrap();
            check_close(
                &format!("P {p} rank {r} summed tower gradients"),
                &g,
                &want_g,
                Tolerance::new(1e-5 * max_abs(&want_g), 1e-3),
            )
            .unwrap();
        }
        // Every rank with slices runs the tower once: min(P, 5) ranks hold some of video 0.
        assert_eq!(enc.counters.snapshot().tower_forwards, p.min(5) as u64);
    }
}

fn key(video: &str) -> EmbedKey {
    EmbedKey {
        video: video.into(),
        settings: "uniform:10".into(),
        weights: 1,
    }
}

#[test]
fn cache_makes_the_tower_run_once_per_video_and_is_keyed_by_content() {
    let tower = tower();
    let grids = [
        VideoGrid { t: 3, h: 4, w: 4 },
        VideoGrid { t: 2, h: 4, w: 6 },
        VideoGrid { t: 4, h: 4, w: 4 },
    ];
    let videos: Vec<Vec<f32>> = (0..3)
        .map(|k| pixels(&tower, &grids[k..k + 1], 100 + k as u64))
        .collect();
    // Each video alone, one rank, no cache: the reference.
    let alone: Vec<Vec<f32>> = (0..3)
        .map(|k| {
            let mut ws = VisionWorkspace::new();
            tower
                .forward(&mut ws, &videos[k], &grids[k..k + 1])
                .unwrap()
                .to_vec()
        })
        .collect();
    for p in [1usize, 2] {
        let cache = EmbedCache::new(1 << 24);
        let enc = SpVisionEncoder::new();
        // Order of a batch: rows -> video; a shuffled second batch with a repeat.
        let orders: [&[usize]; 2] = [&[0, 1, 2], &[2, 0, 1, 0]];
        let res = InProcess::spawn(p, TIMEOUT, |comm| -> Result<_, VisionSpError> {
            let mut ws = VisionWorkspace::new();
            let mut outs = Vec::new();
            for order in orders {
                // A group of 4 rollouts plus old-policy, reference and update passes: 7 uses.
                for _pass in 0..7 {
                    let keys: Vec<EmbedKey> =
                        order.iter().map(|&k| key(&format!("video-{k}"))).collect();
                    let g: Vec<VideoGrid> = order.iter().map(|&k| grids[k]).collect();
                    let px: Vec<f32> = order.iter().flat_map(|&k| videos[k].clone()).collect();
                    let secs = vec![0.5f32; order.len()];
                    let e =
                        enc.encode_cached(&comm, &tower, &mut ws, &cache, &keys, &px, &g, &secs)?;
                    outs.push((order.to_vec(), e));
                }
            }
            Ok(outs)
        });
        for out in res {
            for (order, embeds) in out.unwrap() {
                for (row, &k) in order.iter().enumerate() {
                    assert_eq!(embeds[row].grid, grids[k]);
                    check_close(
                        &format!("P {p}: row {row} has video {k}'s embeddings"),
                        &embeds[row].data,
                        &alone[k],
                        Tolerance::new(1e-5 * max_abs(&alone[k]), 1e-4),
                    )
                    .unwrap();
                }
            }
        }
        let s = enc.counters.snapshot();
        // Three distinct videos, encoded once (all in the first pass's one tower call per rank).
        assert_eq!(s.videos_encoded, 3, "P {p}: {s:?}");
        assert_eq!(s.tower_forwards, p as u64, "P {p}: {s:?}");
        assert_eq!(s.videos_cached, 3 * 6 + 4 * 7, "P {p}: {s:?}");
        let cs = cache.stats();
        assert_eq!(cs.entries, 3);
        assert_eq!(cs.misses, 3 * p as u64);
    }
}

/// `encode_cached_with` asks for pixels only of the videos that miss (on every rank, the same
/// ones), not at all when all hit, and an error from the pixel source comes back before any
/// encode, on every rank.
#[test]
fn lazy_pixels_are_asked_for_only_for_the_missing_videos() {
    use std::borrow::Cow;
    use std::sync::Mutex;
    let tower = tower();
    let grids = [
        VideoGrid { t: 2, h: 4, w: 4 },
        VideoGrid { t: 3, h: 4, w: 4 },
    ];
    let videos: Vec<Vec<f32>> = (0..2)
        .map(|k| pixels(&tower, &grids[k..k + 1], 7 + k as u64))
        .collect();
    for p in [1usize, 2] {
        let cache = EmbedCache::new(1 << 24);
        let enc = SpVisionEncoder::new();
        let asked = Mutex::new(Vec::new());
        let keys = [key("lazy-0"), key("lazy-1")];
        let secs = [0.5f32; 2];
        let res = InProcess::spawn(p, TIMEOUT, |comm| -> Result<_, VisionSpError> {
            let mut ws = VisionWorkspace::new();
            let source = |todo: &[usize]| {
                asked.lock().unwrap().push(todo.to_vec());
                let px: Vec<f32> = todo.iter().flat_map(|&k| videos[k].clone()).collect();
                Ok(Cow::Owned(px))
            };
            // Video 1 cached first; then both: only video 0 is asked for; then both hit.
            let first = |_: &[usize]| Ok(Cow::Borrowed(videos[1].as_slice()));
            let one = enc.encode_cached_with(
                &comm,
                &tower,
                &mut ws,
                &cache,
                &keys[1..],
                &grids[1..],
                &secs[1..],
                first,
            )?;
            let both = enc
                .encode_cached_with(&comm, &tower, &mut ws, &cache, &keys, &grids, &secs, source)?;
            let again = enc
                .encode_cached_with(&comm, &tower, &mut ws, &cache, &keys, &grids, &secs, source)?;
            assert_eq!(both[1].data, one[0].data);
            assert_eq!(again[0].data, both[0].data);
            // A failing source: an error on every rank, nothing encoded.
            let e = enc
                .encode_cached_with(
                    &comm,
                    &tower,
                    &mut ws,
                    &cache,
                    &[key("lazy-bad")],
                    &grids[..1],
                    &secs[..1],
                    |_: &[usize]| Err(VisionSpError::Pixels("bad.avi: frame 2".into())),
                )
                .unwrap_err();
            assert!(e.to_string().contains("bad.avi"), "{e}");
            Ok(both)
        });
        for out in res {
            let both = out.unwrap();
            let mut ws = VisionWorkspace::new();
            let want = tower.forward(&mut ws, &videos[0], &grids[..1]).unwrap();
            check_close(
                "lazily encoded video 0",
                &both[0].data,
                want,
                Tolerance::new(1e-5 * max_abs(want), 1e-4),
            )
            .unwrap();
        }
        let asked = asked.into_inner().unwrap();
        assert_eq!(asked, vec![vec![0usize]; p], "P {p}");
        assert_eq!(enc.counters.snapshot().videos_encoded, 2, "P {p}");
    }
}

#[test]
fn a_new_weights_version_misses() {
    let tower = tower();
    let grids = [VideoGrid { t: 2, h: 4, w: 4 }];
    let px = pixels(&tower, &grids, 1);
    let cache = EmbedCache::new(1 << 24);
    let enc = SpVisionEncoder::new();
    let res = InProcess::spawn(1, TIMEOUT, |comm| -> Result<(), VisionSpError> {
        let mut ws = VisionWorkspace::new();
        for w in [1u64, 1, 2, 2] {
            let mut k = key("v");
            k.weights = w;
            enc.encode_cached(&comm, &tower, &mut ws, &cache, &[k], &px, &grids, &[1.0])?;
        }
        Ok(())
    });
    res.into_iter().for_each(|r| r.unwrap());
    assert_eq!(enc.counters.snapshot().tower_forwards, 2);
}

/// A tower that records the grids of each forward it runs and hands back the CPU tower's
/// features plus an offset (as a device copy of the weights would, with its own rounding).
struct Recording<'a> {
    tower: &'a VisionTower,
    calls: &'a std::sync::Mutex<Vec<Vec<VideoGrid>>>,
}

impl reel_model::TowerForward for Recording<'_> {
    fn config(&self) -> &VisionConfig {
        &self.tower.config
    }

    fn forward_features(
        &mut self,
        pixels: &[f32],
        grids: &[VideoGrid],
    ) -> Result<Vec<f32>, reel_model::ModelError> {
        self.calls.lock().unwrap().push(grids.to_vec());
        let mut ws = VisionWorkspace::new();
        let f = self.tower.forward(&mut ws, pixels, grids)?;
        Ok(f.iter().map(|x| x + 1000.0).collect())
    }
}

/// The `_on` forms run the tower they are given (each rank its share, the cache filled with its
/// features under the same keys), so a GPU copy of a frozen tower slots in for the CPU one.
#[test]
fn the_on_forms_encode_with_the_given_tower() {
    let tower = tower();
    let grids = [
        VideoGrid { t: 3, h: 4, w: 4 },
        VideoGrid { t: 1, h: 2, w: 4 },
    ];
    let px = pixels(&tower, &grids, 5);
    let mut ws = VisionWorkspace::new();
    let want: Vec<f32> = tower
        .forward(&mut ws, &px, &grids)
        .unwrap()
        .iter()
        .map(|x| x + 1000.0)
        .collect();
    for p in [1usize, 2] {
        let cache = EmbedCache::new(1 << 24);
        let enc = SpVisionEncoder::new();
        let calls = std::sync::Mutex::new(Vec::new());
        let keys = [key("a"), key("b")];
        let res = InProcess::spawn(p, TIMEOUT, |comm| {
            let mut t = Recording {
                tower: &tower,
                calls: &calls,
            };
            let a = enc.encode_cached_on(&comm, &mut t, &cache, &keys, &px, &grids, &[1.0, 2.0])?;
            // The second pass is served by the cache: no forward.
            let b = enc.encode_cached_on(&comm, &mut t, &cache, &keys, &px, &grids, &[1.0, 2.0])?;
            Ok::<_, VisionSpError>((a, b))
        });
        for r in res {
            let (a, b) = r.unwrap();
            let got: Vec<f32> = a.iter().flat_map(|e| e.data.iter().copied()).collect();
            check_close("on-form features", &got, &want, Tolerance::new(1e-3, 1e-5)).unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    std::sync::Arc::ptr_eq(x, y),
                    "P {p}: the cache serves the second pass"
                );
            }
        }
        let calls = calls.into_inner().unwrap();
        // One forward per rank with work, each on its temporal share of both videos.
        assert_eq!(calls.len(), p, "P {p}: {calls:?}");
        let slices: usize = calls.iter().flatten().map(|g| g.t).sum();
        assert_eq!(slices, 4, "P {p}: {calls:?}");
        assert_eq!(enc.counters.snapshot().tower_forwards, p as u64);
    }
}
