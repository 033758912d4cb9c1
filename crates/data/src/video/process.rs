//! Frames → the vision tower's input, exactly as transformers' `Qwen2VLVideoProcessor` (which
//! Qwen2.5-VL uses) does:
//!
//! 1. `smart_resize`: the frame size `(H, W)` becomes `(H', W')`, both multiples of
//!    `factor = patch_size · merge_size` (28), aspect kept, `H'·W'` within `[min_pixels,
//!    max_pixels]`.
//! 2. Bicubic resize with antialiasing, as torchvision's `resize(..., BICUBIC, antialias=True)`
//!    runs on uint8 frames on CPU: the separable cubic filter with a = −0.5 stretched by the scale
//!    when shrinking, int16 fixed-point weights, width pass then height pass, each rounded to u8
//!    ([`resize_bicubic`]). Frames already `(H', W')` are left untouched.
//! 3. Rescale and normalise, fused as transformers does: `x' = (x − 255·mean_c) / (255·std_c)` in
//!    f32, with the OpenAI CLIP mean and std.
//! 4. Temporal padding: the frame count is made a multiple of `temporal_patch_size` (T_p = 2) by
//!    repeating the last frame.
//! 5. Patchify into `pixel_values_videos` `[grid_t·grid_h·grid_w, 3·T_p·P·P]`, grid_t = N/T_p,
//!    grid_h = H'/P, grid_w = W'/P. Rows go `(t, h/m, w/m, m_h, m_w)` — each 2×2 block of
//!    patches the merger fuses is four consecutive rows; columns go `(c, t_p, p_y, p_x)`
//!    (transformers' `permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)`).
//!
//! `video_grid_thw = [grid_t, grid_h, grid_w]`; `second_per_grid_ts = T_p / sampled_fps`
//! (Qwen2.5-VL's processor), the seconds one temporal patch spans. The language model sees
//! `grid_t·grid_h·grid_w / merge_size²` video tokens.

use std::path::Path;

use super::{SampledVideo, VideoError, VideoFrames, VideoResult};

/// The OpenAI CLIP normalisation (`OPENAI_CLIP_MEAN`, `OPENAI_CLIP_STD` in transformers).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)] // transformers' literals, kept as written
pub const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Preprocessing settings; defaults are transformers' `Qwen2VLVideoProcessor` defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoProcessorConfig {
    /// Fewest pixels per resized frame (`size.shortest_edge`); default 128·28·28 = 100352.
    pub min_pixels: usize,
    /// Most pixels per resized frame (`size.longest_edge`); default 768·28·28 = 602112.
    pub max_pixels: usize,
    /// Spatial patch side P; default 14.
    pub patch_size: usize,
    /// Frames per temporal patch T_p; default 2.
    pub temporal_patch_size: usize,
    /// Patches merged per side by the merger m; default 2.
    pub merge_size: usize,
    /// Per-channel mean after rescaling; default [`OPENAI_CLIP_MEAN`].
    pub image_mean: [f32; 3],
    /// Per-channel std after rescaling; default [`OPENAI_CLIP_STD`].
    pub image_std: [f32; 3],
    /// Multiplies u8 values before normalising; default 1/255.
    pub rescale_factor: f64,
}

impl Default for VideoProcessorConfig {
    fn default() -> Self {
        VideoProcessorConfig {
            min_pixels: 128 * 28 * 28,
            max_pixels: 768 * 28 * 28,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl VideoProcessorConfig {
    /// Reads a checkpoint folder's `video_preprocessor_config.json`, else its
    /// `preprocessor_config.json`; fields it lacks keep their defaults. Reads `min_pixels` /
    /// `max_pixels` or `size.shortest_edge` / `size.longest_edge`, `patch_size`,
    /// `temporal_patch_size`, `merge_size`, `image_mean`, `image_std`, `rescale_factor`.
    pub fn from_dir(dir: &Path) -> crate::Result<Self> {
        let mut cfg = VideoProcessorConfig::default();
        let Some(path) = ["video_preprocessor_config.json", "preprocessor_config.json"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        else {
            return Ok(cfg);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| crate::DataError::io(&path, e))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| crate::DataError::config(&path, e))?;
        let bad = |k: &str| crate::DataError::config(&path, format!("`{k}` is not a valid value"));
        let uint = |v: &serde_json::Value, k: &str| -> crate::Result<Option<usize>> {
            match v {
                serde_json::Value::Null => Ok(None),
                v => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| bad(k)),
            }
        };
        if let Some(v) = uint(&j["size"]["shortest_edge"], "size.shortest_edge")? {
            cfg.min_pixels = v;
        }
        if let Some(v) = uint(&j["size"]["longest_edge"], "size.longest_edge")? {
            cfg.max_pixels = v;
        }
        if let Some(v) = uint(&j["min_pixels"], "min_pixels")? {
            cfg.min_pixels = v;
        }
        if let Some(v) = uint(&j["max_pixels"], "max_pixels")? {
            cfg.max_pixels = v;
        }
        for (k, field) in [
            ("patch_size", &mut cfg.patch_size),
            ("temporal_patch_size", &mut cfg.temporal_patch_size),
            ("merge_size", &mut cfg.merge_size),
        ] {
            if let Some(v) = uint(&j[k], k)? {
                *field = v;
            }
        }
        for (k, field) in [
            ("image_mean", &mut cfg.image_mean),
            ("image_std", &mut cfg.image_std),
        ] {
            match &j[k] {
                serde_json::Value::Null => {}
                serde_json::Value::Array(a) if a.len() == 3 => {
                    for (c, v) in a.iter().enumerate() {
                        field[c] = v.as_f64().ok_or_else(|| bad(k))? as f32;
                    }
                }
                _ => return Err(bad(k)),
            }
        }
        if let Some(v) = j["rescale_factor"].as_f64() {
            cfg.rescale_factor = v;
        }
        VideoProcessor::new(cfg.clone()).map_err(|e| crate::DataError::config(&path, e))?;
        Ok(cfg)
    }

    /// `patch_size · merge_size`: resized sides are multiples of this.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Columns of `pixel_values_videos`: `3 · T_p · P · P`.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// transformers' `smart_resize`: the `(H', W')` a `height × width` frame is resized to. Both are
/// multiples of `factor`, the aspect ratio is kept as well as can be, and `H'·W'` lies within
/// `[min_pixels, max_pixels]`. Rounding is Python's (half to even). Errors for an aspect ratio
/// over 200 or an empty result.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), String> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(format!(
            "cannot resize a {width}x{height} frame to multiples of {factor}"
        ));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(format!(
            "absolute aspect ratio must be smaller than 200, got {}",
            h.max(w) / h.min(w)
        ));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < f || w_bar < f {
        return Err(format!(
            "a {width}x{height} frame resizes to {w_bar}x{h_bar} (min_pixels {min_pixels})"
        ));
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One video's vision-tower input.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoInputs {
    /// `[grid_t·grid_h·grid_w, 3·T_p·P·P]` row-major.
    pub pixel_values_videos: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]` in patches.
    pub video_grid_thw: [usize; 3],
    /// Seconds spanned by one temporal patch: `T_p / sampled_fps`.
    pub second_per_grid_ts: f64,
    /// Columns of `pixel_values_videos` (`3·T_p·P·P`).
    pub patch_dim: usize,
}

impl VideoInputs {
    /// Rows of `pixel_values_videos` (`grid_t·grid_h·grid_w`).
    pub fn num_patches(&self) -> usize {
        self.video_grid_thw.iter().product()
    }

    /// Video tokens the language model sees: `num_patches / merge_size²`.
    pub fn num_video_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// Applies a [`VideoProcessorConfig`] to frames.
#[derive(Clone, Debug)]
pub struct VideoProcessor {
    pub config: VideoProcessorConfig,
}

impl VideoProcessor {
    /// Checks the config: positive sizes, `min_pixels ≤ max_pixels`, positive std.
    pub fn new(config: VideoProcessorConfig) -> VideoResult<Self> {
        let c = &config;
        if c.patch_size == 0 || c.temporal_patch_size == 0 || c.merge_size == 0 {
            return Err(VideoError::Config(
                "patch_size, temporal_patch_size and merge_size must be > 0".into(),
            ));
        }
        if c.min_pixels > c.max_pixels || c.max_pixels == 0 {
            return Err(VideoError::Config(format!(
                "need 0 < min_pixels ≤ max_pixels, got {} and {}",
                c.min_pixels, c.max_pixels
            )));
        }
        let not_positive = |x: f64| x.is_nan() || x <= 0.0;
        if c.image_std.iter().any(|&s| not_positive(s as f64)) || not_positive(c.rescale_factor) {
            return Err(VideoError::Config(
                "image_std and rescale_factor must be > 0".into(),
            ));
        }
        Ok(VideoProcessor { config })
    }

    /// The `(H', W')` frames of `height × width` are resized to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), String> {
        let c = &self.config;
        smart_resize(height, width, c.factor(), c.min_pixels, c.max_pixels)
    }

    /// `[grid_t, grid_h, grid_w]` of `n_frames` frames of `height × width`: the resized size
    /// in patches, the frame count padded to a multiple of T_p in temporal patches.
    pub fn grid(&self, height: usize, width: usize, n_frames: usize) -> Result<[usize; 3], String> {
        let c = &self.config;
        let (rh, rw) = self.target_size(height, width)?;
        let tp = c.temporal_patch_size;
        Ok([n_frames.div_ceil(tp), rh / c.patch_size, rw / c.patch_size])
    }

    /// Preprocesses sampled frames (their `sampled_fps` gives `second_per_grid_ts`).
    pub fn process_sampled(&self, video: &SampledVideo, path: &Path) -> VideoResult<VideoInputs> {
        self.process(&video.frames, video.sampled_fps(), path)
    }

    /// Preprocesses `frames` sampled at `sampled_fps`; `path` names the video in errors.
    pub fn process(
        &self,
        frames: &VideoFrames,
        sampled_fps: f64,
        path: &Path,
    ) -> VideoResult<VideoInputs> {
        let c = &self.config;
        let n = frames.num_frames();
        if n == 0 {
            return Err(VideoError::Sampling {
                path: path.to_path_buf(),
                msg: "no frames to preprocess".into(),
            });
        }
        let (rh, rw) = self
            .target_size(frames.height, frames.width)
            .map_err(|msg| VideoError::Unsupported {
                path: path.to_path_buf(),
                msg,
            })?;
        let resized;
        let frames = if (rh, rw) == (frames.height, frames.width) {
            frames
        } else {
            resized = resize_bicubic(frames, rh, rw);
            &resized
        };
        let (p, tp, m) = (c.patch_size, c.temporal_patch_size, c.merge_size);
        let [gt, gh, gw] =
            self.grid(frames.height, frames.width, n)
                .map_err(|msg| VideoError::Unsupported {
                    path: path.to_path_buf(),
                    msg,
                })?;
        let patch_dim = c.patch_dim();

        // Fused rescale + normalise, as transformers: (x - mean/r) / (std/r) in f32.
        let inv = (1.0 / c.rescale_factor) as f32;
        let mean: [f32; 3] = std::array::from_fn(|k| c.image_mean[k] * inv);
        let std: [f32; 3] = std::array::from_fn(|k| c.image_std[k] * inv);
        let lut: [[f32; 256]; 3] =
            std::array::from_fn(|k| std::array::from_fn(|v| (v as f32 - mean[k]) / std[k]));

        let mut out = vec![0.0f32; gt * gh * gw * patch_dim];
        let mut row = 0usize;
        for t in 0..gt {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let dst = &mut out[row * patch_dim..(row + 1) * patch_dim];
                            let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            let mut col = 0;
                            for (ch, lut) in lut.iter().enumerate() {
                                for tt in 0..tp {
                                    // Padding repeats the last frame.
                                    let f = frames.frame((t * tp + tt).min(n - 1));
                                    for py in 0..p {
                                        let src = ((y0 + py) * rw + x0) * 3 + ch;
                                        for px in 0..p {
                                            dst[col] = lut[f[src + 3 * px] as usize];
                                            col += 1;
                                        }
                                    }
                                }
                            }
                            row += 1;
                        }
                    }
                }
            }
        }
        Ok(VideoInputs {
            pixel_values_videos: out,
            video_grid_thw: [gt, gh, gw],
            second_per_grid_ts: tp as f64 / sampled_fps,
            patch_dim,
        })
    }
}

/// Antialiased bicubic filter taps for one axis, as torch's uint8 CPU kernel makes them: the
/// float weights of `_upsample_bicubic2d_aa` (cubic with a = −0.5, support 2·scale when
/// shrinking, normalised to sum 1), then scaled to int16 with the most fractional bits
/// (`precision`) that keep the largest weight in range. Output `i` reads inputs
/// `start[i] .. start[i] + weights[i].len()`.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let (support, invscale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let mut start = Vec::with_capacity(out_size);
    let mut float_weights = Vec::with_capacity(out_size);
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let mut w: Vec<f64> = (lo..hi)
            .map(|j| cubic((j as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|x| *x /= total);
        }
        start.push(lo);
        float_weights.push(w);
    }
    let w_max = float_weights
        .iter()
        .flatten()
        .fold(0.0f64, |m, &w| m.max(w));
    let mut precision = 0u32;
    while precision < 22 && ((0.5 + w_max * (1u64 << (precision + 1)) as f64) as i64) < (1 << 15) {
        precision += 1;
    }
    let one = (1u64 << precision) as f64;
    let weights = float_weights
        .iter()
        .map(|ws| {
            ws.iter()
                .map(|&w| {
                    let v = w * one;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect()
        })
        .collect();
    Taps {
        start,
        weights,
        precision,
    }
}

/// `Σ w·x` in fixed point, rounded and saturated to u8.
fn fixed_to_u8(acc: i32, precision: u32) -> u8 {
    let half = if precision > 0 {
        1 << (precision - 1)
    } else {
        0
    };
    ((acc + half) >> precision).clamp(0, 255) as u8
}

/// Resizes every frame to `out_h × out_w` with the antialiased bicubic filter, as
/// torchvision's `resize(uint8, BICUBIC, antialias=True)` runs on CPU (torch's
/// `upsample_avx_bilinear_bicubic_uint8`): int16 fixed-point weights, a width pass into a u8
/// image, then a height pass; each result rounded and saturated. A side that keeps its size
/// skips its pass.
pub fn resize_bicubic(frames: &VideoFrames, out_h: usize, out_w: usize) -> VideoFrames {
    let (h, w) = (frames.height, frames.width);
    let mut out = VideoFrames::new(out_w, out_h);
    out.data.reserve(frames.num_frames() * out_h * out_w * 3);
    let tx = (out_w != w).then(|| taps(w, out_w));
    let ty = (out_h != h).then(|| taps(h, out_h));
    let mut tmp = vec![0u8; h * out_w * 3];
    let mut dst = vec![0u8; out_h * out_w * 3];
    for i in 0..frames.num_frames() {
        let src = frames.frame(i);
        let horizontal: &[u8] = match &tx {
            None => src,
            Some(tx) => {
                for y in 0..h {
                    let row = &src[y * w * 3..(y + 1) * w * 3];
                    for x in 0..out_w {
                        let mut acc = [0i32; 3];
                        for (k, &wt) in tx.weights[x].iter().enumerate() {
                            let s = (tx.start[x] + k) * 3;
                            for c in 0..3 {
                                acc[c] += wt * row[s + c] as i32;
                            }
                        }
                        for c in 0..3 {
                            tmp[(y * out_w + x) * 3 + c] = fixed_to_u8(acc[c], tx.precision);
                        }
                    }
                }
                &tmp
            }
        };
        match &ty {
            None => out.push(horizontal),
            Some(ty) => {
                for y in 0..out_h {
                    for x in 0..out_w {
                        let mut acc = [0i32; 3];
                        for (k, &wt) in ty.weights[y].iter().enumerate() {
                            let s = ((ty.start[y] + k) * out_w + x) * 3;
                            for c in 0..3 {
                                acc[c] += wt * horizontal[s + c] as i32;
                            }
                        }
                        for c in 0..3 {
                            dst[(y * out_w + x) * 3 + c] = fixed_to_u8(acc[c], ty.precision);
                        }
                    }
                }
                out.push(&dst);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_hand_computed() {
        // Already multiples of 28 and within bounds: unchanged.
        assert_eq!(smart_resize(224, 224, 28, 3136, 1003520), Ok((224, 224)));
        // 50/28 = 1.79 → 2; 70/28 = 2.5 → 2 (half to even).
        assert_eq!(smart_resize(50, 70, 28, 784, 4704), Ok((56, 56)));
        // Too many pixels: beta = sqrt(480·640 / 50176) = 2.474; 480/beta/28 = 6.93 → 6,
        // 640/beta/28 = 9.24 → 9.
        assert_eq!(smart_resize(480, 640, 28, 3136, 50176), Ok((168, 252)));
        // Too few: beta = sqrt(12544 / 600) = 4.572; 20·beta/28 = 3.27 → 4, 30·beta/28 = 4.90 → 5.
        assert_eq!(smart_resize(20, 30, 28, 12544, 1 << 30), Ok((112, 140)));
        // transformers' video defaults on a 112×112 frame: beta = sqrt(8); 316.8/28 → 12.
        let d = VideoProcessorConfig::default();
        assert_eq!(
            smart_resize(112, 112, d.factor(), d.min_pixels, d.max_pixels),
            Ok((336, 336))
        );
        assert!(smart_resize(10, 2100, 28, 3136, 1 << 30).is_err());
        assert!(smart_resize(0, 10, 28, 3136, 1 << 30).is_err());
    }

    #[test]
    fn config_from_checkpoint_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            VideoProcessorConfig::from_dir(dir.path()).unwrap(),
            VideoProcessorConfig::default()
        );
        let p = dir.path().join("preprocessor_config.json");
        std::fs::write(
            &p,
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5]}"#,
        )
        .unwrap();
        let c = VideoProcessorConfig::from_dir(dir.path()).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 12845056));
        assert_eq!(c.image_mean, [0.5; 3]);
        assert_eq!(c.image_std, OPENAI_CLIP_STD);
        // The video file wins over the image one; size.* is read too.
        std::fs::write(
            dir.path().join("video_preprocessor_config.json"),
            r#"{"size": {"shortest_edge": 4096, "longest_edge": 8192}}"#,
        )
        .unwrap();
        let c = VideoProcessorConfig::from_dir(dir.path()).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (4096, 8192));
        std::fs::write(&p, r#"{"min_pixels": "many"}"#).unwrap();
        std::fs::remove_file(dir.path().join("video_preprocessor_config.json")).unwrap();
        let e = VideoProcessorConfig::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("min_pixels"),
            "{e}"
        );
    }

    #[test]
    fn resize_to_same_size_is_identity_and_constant_stays_constant() {
        let mut f = VideoFrames::new(9, 7);
        let mut rng = 12345u32;
        for _ in 0..2 * 9 * 7 * 3 {
            rng = rng.wrapping_mul(1664525).wrapping_add(1013904223);
            f.data.push((rng >> 24) as u8);
        }
        assert_eq!(resize_bicubic(&f, 7, 9), f);
        let mut c = VideoFrames::new(13, 11);
        c.data = vec![77u8; 13 * 11 * 3];
        for (oh, ow) in [(5, 6), (28, 30), (11, 4)] {
            let r = resize_bicubic(&c, oh, ow);
            assert_eq!((r.height, r.width, r.num_frames()), (oh, ow, 1));
            assert!(r.data.iter().all(|&v| v == 77), "{oh}x{ow}");
        }
    }

    #[test]
    fn patchify_layout_by_hand() {
        // 3 frames (padded to 4) of 56×28 with P = 14, m = 2: grid (2, 4, 2).
        let (h, w) = (56, 28);
        let mut f = VideoFrames::new(w, h);
        for t in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    f.data
                        .extend_from_slice(&[(t * 50 + y) as u8, x as u8, (y + x) as u8]);
                }
            }
        }
        let cfg = VideoProcessorConfig {
            min_pixels: 28 * 28,
            max_pixels: 56 * 56,
            image_mean: [0.0; 3],
            image_std: [1.0; 3],
            rescale_factor: 1.0,
            ..Default::default()
        };
        let pr = VideoProcessor::new(cfg).unwrap();
        let out = pr.process(&f, 2.0, Path::new("x")).unwrap();
        assert_eq!(out.video_grid_thw, [2, 4, 2]);
        assert_eq!(out.patch_dim, 3 * 2 * 14 * 14);
        assert_eq!(out.second_per_grid_ts, 1.0);
        assert_eq!(out.num_video_tokens(2), 4);
        let d = out.patch_dim;
        // Row index = ((t·(gh/m) + bh)·(gw/m) + bw)·m² + mh·m + mw; column = ((c·T_p + tt)·P + py)·P + px.
        for (t, bh, mh, mw, c, tt, py, px) in [
            (0, 0, 0, 0, 0, 0, 0, 0),
            (1, 1, 1, 0, 0, 1, 3, 5),
            (1, 0, 0, 1, 2, 0, 13, 2),
            (0, 1, 1, 1, 1, 1, 7, 13),
        ] {
            let row = (t * 2 + bh) * 4 + mh * 2 + mw;
            let col = ((c * 2 + tt) * 14 + py) * 14 + px;
            let (y, x) = ((bh * 2 + mh) * 14 + py, mw * 14 + px);
            let frame = (t * 2 + tt).min(2);
            let want = [(frame * 50 + y) as f32, x as f32, (y + x) as f32][c];
            assert_eq!(
                out.pixel_values_videos[row * d + col],
                want,
                "row {row} col {col}"
            );
        }
    }
}
