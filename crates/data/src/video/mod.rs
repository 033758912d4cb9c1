//! Video input: decode a video into RGB u8 frames, sample frames, and turn them into the
//! vision tower's `pixel_values_videos` exactly as transformers' Qwen2-VL video processor does.
//!
//! Sources ([`VideoSource::detect`]):
//! - Motion-JPEG AVI, read and written natively ([`avi`]); the synthetic generator writes these,
//!   so the default data needs no external program. An AVI with another codec goes to ffmpeg.
//! - a folder of frames (`.jpg`/`.jpeg`/`.png`, sorted by file name; [`folder`]), taken at
//!   [`FOLDER_FPS`] frames per second.
//! - every other container (mp4, mkv, webm, …) through the `ffprobe`/`ffmpeg` programs ([`ffmpeg`]).
//!
//! Frames are `[N, H, W, 3]` RGB u8 ([`VideoFrames`]). [`sample`] picks frame indices (uniform N
//! or frames per second with a cap), [`process`] resizes, normalises and patchifies them into
//! `[grid_t·grid_h·grid_w, 3·T_p·P·P]` rows, [`prefetch`] decodes on worker threads ahead of
//! compute ([`plan_video`]: a video's grid from its header alone, before decoding).
//! [`video_content_hash`] is the content key of a video (file bytes, or a folder's frame names
//! and bytes): known without decoding.

pub mod avi;
pub mod ffmpeg;
pub mod folder;
pub mod prefetch;
pub mod process;
pub mod sample;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use prefetch::{
    load_and_process, plan_video, LoadedVideo, PrefetchStats, Prefetcher, VideoPlan,
};
pub use process::{smart_resize, VideoInputs, VideoProcessor, VideoProcessorConfig};
pub use sample::{sample_indices, FrameSampling};

/// Frames per second assumed for a folder of frames (folders carry no timing).
pub const FOLDER_FPS: f64 = 1.0;

/// Everything that can go wrong reading a video. Every message starts with the video's path.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The file or folder could not be opened or read (missing, permissions, …).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The data is damaged: a truncated container, a chunk that runs past the end, a frame that
    /// does not decode.
    #[error("{}: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    /// A well-formed file reel cannot use (an AVI without a video stream, frames of mixed sizes, …).
    #[error("{}: {msg}", path.display())]
    Unsupported { path: PathBuf, msg: String },
    /// `ffmpeg`/`ffprobe` is needed for this container and is not installed.
    #[error(
        "{}: decoding this container needs `{program}`, which is not on PATH; install FFmpeg \
         (Debian/Ubuntu: `apt-get install ffmpeg`, macOS: `brew install ffmpeg`, others: \
         https://ffmpeg.org/download.html), or convert the video to Motion-JPEG AVI or a folder \
         of frames",
        path.display()
    )]
    FfmpegMissing { path: PathBuf, program: String },
    /// `ffmpeg`/`ffprobe` ran and failed; `msg` holds what it said.
    #[error("{}: {msg}", path.display())]
    Ffmpeg { path: PathBuf, msg: String },
    /// The requested sampling does not fit the video (no frames, an index past the end, …).
    #[error("{}: {msg}", path.display())]
    Sampling { path: PathBuf, msg: String },
    /// A bad processor setting (not tied to a video file).
    #[error("video processor: {0}")]
    Config(String),
}

impl VideoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        VideoError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, msg: impl std::fmt::Display) -> Self {
        VideoError::Corrupt {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }

    pub(crate) fn unsupported(path: &Path, msg: impl std::fmt::Display) -> Self {
        VideoError::Unsupported {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }
}

/// Result with [`VideoError`].
pub type VideoResult<T> = std::result::Result<T, VideoError>;

/// What a video holds: frame count, frame rate and frame size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VideoMeta {
    /// Frames in the video.
    pub num_frames: usize,
    /// Frames per second (> 0).
    pub fps: f64,
    pub width: usize,
    pub height: usize,
}

impl VideoMeta {
    /// Duration in seconds.
    pub fn duration(&self) -> f64 {
        self.num_frames as f64 / self.fps
    }
}

/// Decoded frames, `[N, H, W, 3]` RGB u8 in one buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoFrames {
    pub width: usize,
    pub height: usize,
    /// `len() == num_frames() · height · width · 3`.
    pub data: Vec<u8>,
}

impl VideoFrames {
    /// An empty set of `width × height` frames.
    pub fn new(width: usize, height: usize) -> Self {
        VideoFrames {
            width,
            height,
            data: Vec::new(),
        }
    }

    /// Bytes in one frame (`H · W · 3`).
    pub fn frame_len(&self) -> usize {
        self.width * self.height * 3
    }

    pub fn num_frames(&self) -> usize {
        self.data.len().checked_div(self.frame_len()).unwrap_or(0)
    }

    /// Frame `i` as `[H, W, 3]`.
    pub fn frame(&self, i: usize) -> &[u8] {
        let n = self.frame_len();
        &self.data[i * n..(i + 1) * n]
    }

    /// Appends one `[H, W, 3]` frame.
    pub fn push(&mut self, frame: &[u8]) {
        debug_assert_eq!(frame.len(), self.frame_len());
        self.data.extend_from_slice(frame);
    }
}

/// Where a video's frames come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoSource {
    /// Motion-JPEG AVI, decoded natively.
    MjpegAvi,
    /// A folder of JPEG/PNG frames.
    Folder,
    /// Any container, through ffprobe/ffmpeg.
    Ffmpeg,
}

impl VideoSource {
    /// Folder → [`Folder`](Self::Folder); `.avi` holding Motion-JPEG → [`MjpegAvi`](Self::MjpegAvi);
    /// everything else (an AVI with another codec included) → [`Ffmpeg`](Self::Ffmpeg).
    pub fn detect(path: &Path) -> VideoResult<Self> {
        let md = std::fs::metadata(path).map_err(|e| VideoError::io(path, e))?;
        if md.is_dir() {
            return Ok(VideoSource::Folder);
        }
        let is_avi = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("avi"));
        if is_avi && avi::is_mjpeg_avi(path)? {
            return Ok(VideoSource::MjpegAvi);
        }
        Ok(VideoSource::Ffmpeg)
    }
}

/// An opened video: its metadata, ready to decode any frames.
#[derive(Debug)]
pub enum Video {
    Avi(avi::AviReader),
    Folder(folder::FrameFolder),
    Ffmpeg(ffmpeg::FfmpegVideo),
}

impl Video {
    /// Opens `path` with the source [`VideoSource::detect`] picks (reads headers only).
    pub fn open(path: &Path) -> VideoResult<Self> {
        Ok(match VideoSource::detect(path)? {
            VideoSource::MjpegAvi => Video::Avi(avi::AviReader::open(path)?),
            VideoSource::Folder => Video::Folder(folder::FrameFolder::open(path)?),
            VideoSource::Ffmpeg => Video::Ffmpeg(ffmpeg::FfmpegVideo::open(path)?),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Video::Avi(v) => v.path(),
            Video::Folder(v) => v.path(),
            Video::Ffmpeg(v) => v.path(),
        }
    }

    pub fn meta(&self) -> VideoMeta {
        match self {
            Video::Avi(v) => v.meta(),
            Video::Folder(v) => v.meta(),
            Video::Ffmpeg(v) => v.meta(),
        }
    }

    /// Decodes the frames at `indices` (each `< num_frames`, any order, repeats allowed), in
    /// that order.
    pub fn decode(&self, indices: &[usize]) -> VideoResult<VideoFrames> {
        let meta = self.meta();
        if let Some(&bad) = indices.iter().find(|&&i| i >= meta.num_frames) {
            return Err(VideoError::Sampling {
                path: self.path().to_path_buf(),
                msg: format!(
                    "frame {bad} requested, the video has {} frames",
                    meta.num_frames
                ),
            });
        }
        match self {
            Video::Avi(v) => v.decode(indices),
            Video::Folder(v) => v.decode(indices),
            Video::Ffmpeg(v) => v.decode(indices),
        }
    }

    /// Samples frames with `sampling` and decodes them.
    pub fn sample(&self, sampling: &FrameSampling) -> VideoResult<SampledVideo> {
        let meta = self.meta();
        let indices = sample_indices(&meta, sampling).map_err(|msg| VideoError::Sampling {
            path: self.path().to_path_buf(),
            msg,
        })?;
        let frames = self.decode(&indices)?;
        Ok(SampledVideo {
            meta,
            indices,
            frames,
        })
    }
}

/// Frames sampled from a video, with where they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledVideo {
    pub meta: VideoMeta,
    /// Frame index of each decoded frame.
    pub indices: Vec<usize>,
    pub frames: VideoFrames,
}

impl SampledVideo {
    /// Frames per second of the sampled frames, as transformers' `VideoMetadata.sampled_fps`:
    /// `len(indices) / num_frames · fps`.
    pub fn sampled_fps(&self) -> f64 {
        sampled_fps(&self.meta, self.indices.len())
    }
}

/// Frames per second of `n` frames sampled from a video of `meta`: `n / num_frames · fps`.
pub fn sampled_fps(meta: &VideoMeta, n: usize) -> f64 {
    n as f64 / meta.num_frames as f64 * meta.fps
}

/// Opens, samples and decodes `path` in one call.
pub fn load_video(path: &Path, sampling: &FrameSampling) -> VideoResult<SampledVideo> {
    Video::open(path)?.sample(sampling)
}

/// Hex SHA-256 of a video's content: the file's bytes, or for a folder of frames each frame's
/// file name and bytes in order. Two copies of the same video at different paths hash alike; a
/// re-encoded video does not. (The key of the vision-embedding cache.)
pub fn video_content_hash(path: &Path) -> VideoResult<String> {
    let md = std::fs::metadata(path).map_err(|e| VideoError::io(path, e))?;
    let mut h = Sha256::new();
    if md.is_dir() {
        h.update(b"reel-frame-folder\0");
        for f in folder::frame_files(path)? {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            h.update(name.unwrap_or_default().as_bytes());
            h.update(b"\0");
            hash_file(&mut h, &f)?;
        }
    } else {
        hash_file(&mut h, path)?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn hash_file(h: &mut Sha256, path: &Path) -> VideoResult<()> {
    let mut f = std::fs::File::open(path).map_err(|e| VideoError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| VideoError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// Decodes one JPEG or PNG image (format from its bytes) to `(width, height, RGB u8)`.
pub(crate) fn decode_image(bytes: &[u8], what: &Path) -> VideoResult<(usize, usize, Vec<u8>)> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| VideoError::corrupt(what, format!("image does not decode: {e}")))?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    Ok((w as usize, h as usize, rgb.into_raw()))
}

/// Encodes one `[H, W, 3]` RGB frame as baseline JPEG at `quality` (1–100). Refuses frames
/// JPEG cannot hold (a side of 0 or over 65535) or a buffer of the wrong size.
pub fn encode_jpeg(rgb: &[u8], width: usize, height: usize, quality: u8) -> VideoResult<Vec<u8>> {
    if width == 0 || height == 0 || width > 65535 || height > 65535 {
        return Err(VideoError::Config(format!(
            "a JPEG frame must be 1..=65535 pixels a side, got {width}x{height}"
        )));
    }
    if rgb.len() != width * height * 3 {
        return Err(VideoError::Config(format!(
            "a {width}x{height} RGB frame has {} bytes, got {}",
            width * height * 3,
            rgb.len()
        )));
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode(
            rgb,
            width as u32,
            height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| VideoError::Config(format!("JPEG encoding failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
