//! Which frames of a video to decode: transformers' `Qwen2VLVideoProcessor.sample_frames`.
//!
//! Both modes pick a frame count `n` (a multiple of [`FRAME_MULTIPLE`], Qwen2-VL's temporal
//! patch size) and then the indices `torch.arange(0, N, N / n).int()` (N = frames in the video):
//! evenly spaced, starting at frame 0. Computed as torch does on CPU (the step and each
//! `i · step` in f64, stored as f32, truncated), so indices match transformers exactly.
//!
//! - [`FrameSampling::Uniform`]`{ frames }`: `n = round(frames / 2) · 2` (Python's round, half to
//!   even). Where transformers raises because `n > N`, reel takes every frame instead (`n = N`).
//! - [`FrameSampling::Fps`]`{ fps, min_frames, max_frames }`: `n = N / video_fps · fps`, clamped
//!   to `[min_frames, min(max_frames, N) rounded down to a multiple of 2]` and to `N`, then rounded
//!   down to a multiple of 2.
//!
//! A result of 0 frames becomes `min(2, N)`.

use super::VideoMeta;

/// Frame counts are rounded to a multiple of this (Qwen2-VL's `temporal_patch_size`).
pub const FRAME_MULTIPLE: usize = 2;

/// How to pick frames.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FrameSampling {
    /// Every frame.
    All,
    /// About `frames` frames, evenly spaced over the whole video.
    Uniform { frames: usize },
    /// `fps` frames per second of video, at least `min_frames` (transformers: 4) and at most
    /// `max_frames` (transformers: 768).
    Fps {
        fps: f64,
        min_frames: usize,
        max_frames: usize,
    },
}

impl FrameSampling {
    /// `fps` frames per second with transformers' bounds (4 to 768 frames).
    pub fn fps(fps: f64) -> Self {
        FrameSampling::Fps {
            fps,
            min_frames: 4,
            max_frames: 768,
        }
    }
}

/// Python's `round` (half to even) of `x / m`, times `m`.
fn round_to_multiple(x: usize, m: usize) -> usize {
    ((x as f64 / m as f64).round_ties_even() as usize) * m
}

/// Frame indices for `sampling` over a video described by `meta`. Errors (a message, no path)
/// for an empty video or a bad frame rate.
pub fn sample_indices(meta: &VideoMeta, sampling: &FrameSampling) -> Result<Vec<usize>, String> {
    let total = meta.num_frames;
    if total == 0 {
        return Err("the video has no frames".into());
    }
    let tp = FRAME_MULTIPLE;
    let n = match *sampling {
        FrameSampling::All => return Ok((0..total).collect()),
        FrameSampling::Uniform { frames } => {
            if frames == 0 {
                return Err("uniform sampling of 0 frames".into());
            }
            round_to_multiple(frames, tp).min(total)
        }
        FrameSampling::Fps {
            fps,
            min_frames,
            max_frames,
        } => {
            if !(fps.is_finite() && fps > 0.0) {
                return Err(format!(
                    "sampling rate must be > 0 frames per second, got {fps}"
                ));
            }
            if !(meta.fps.is_finite() && meta.fps > 0.0) {
                return Err(format!("the video's frame rate is {}", meta.fps));
            }
            let cap = (max_frames.min(total) / tp) * tp;
            let want = total as f64 / meta.fps * fps;
            let n = want
                .max(min_frames as f64)
                .min(cap as f64)
                .min(total as f64);
            ((n / tp as f64).floor() as usize) * tp
        }
    };
    let n = if n == 0 { tp.min(total) } else { n };
    Ok(arange_int(total, n))
}

/// `torch.arange(0, total, total / n).int()` on CPU.
fn arange_int(total: usize, n: usize) -> Vec<usize> {
    let step = total as f64 / n as f64;
    let len = (total as f64 / step).ceil() as usize;
    (0..len)
        .map(|i| ((i as f64 * step) as f32) as usize)
        .filter(|&i| i < total)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(n: usize, fps: f64) -> VideoMeta {
        VideoMeta {
            num_frames: n,
            fps,
            width: 8,
            height: 8,
        }
    }

    #[test]
    fn uniform_indices_hand_computed() {
        let s = |frames| sample_indices(&meta(10, 25.0), &FrameSampling::Uniform { frames });
        assert_eq!(s(4).unwrap(), vec![0, 2, 5, 7]);
        assert_eq!(s(10).unwrap(), (0..10).collect::<Vec<_>>());
        // 5 → round(2.5) = 2 (half to even) → 4 frames, as transformers.
        assert_eq!(s(5).unwrap(), vec![0, 2, 5, 7]);
        // 7 → round(3.5) = 4 → 8 frames of 10: step 1.25.
        assert_eq!(s(7).unwrap(), vec![0, 1, 2, 3, 5, 6, 7, 8]);
        // More than the video holds: every frame.
        assert_eq!(s(64).unwrap(), (0..10).collect::<Vec<_>>());
        // 1 → round(0.5) = 0 → at least 2.
        assert_eq!(s(1).unwrap(), vec![0, 5]);
        assert!(s(0).is_err());
        let one = sample_indices(&meta(1, 25.0), &FrameSampling::Uniform { frames: 8 }).unwrap();
        assert_eq!(one, vec![0]);
    }

    #[test]
    fn fps_indices_hand_computed() {
        // 100 frames at 25 fps = 4 s; 2 fps → 8 frames, step 12.5.
        let idx = sample_indices(&meta(100, 25.0), &FrameSampling::fps(2.0)).unwrap();
        assert_eq!(idx, vec![0, 12, 25, 37, 50, 62, 75, 87]);
        // 1 fps → 4 frames (also the minimum).
        let idx = sample_indices(&meta(100, 25.0), &FrameSampling::fps(1.0)).unwrap();
        assert_eq!(idx, vec![0, 25, 50, 75]);
        // Cap: 30 fps of a 100-frame video capped at 6 frames.
        let capped = FrameSampling::Fps {
            fps: 30.0,
            min_frames: 4,
            max_frames: 7,
        };
        let idx = sample_indices(&meta(100, 25.0), &capped).unwrap();
        assert_eq!(idx.len(), 6);
        assert_eq!(idx, vec![0, 16, 33, 50, 66, 83]);
        // Below the minimum: min_frames (4) of a 3-frame video → 2 (floor to a multiple of 2).
        let idx = sample_indices(&meta(3, 25.0), &FrameSampling::fps(0.1)).unwrap();
        assert_eq!(idx, vec![0, 1]);
        assert!(sample_indices(&meta(3, 25.0), &FrameSampling::fps(0.0)).is_err());
        assert!(sample_indices(&meta(0, 25.0), &FrameSampling::fps(1.0)).is_err());
    }
}
