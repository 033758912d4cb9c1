//! Motion-JPEG AVI, read and written natively (RIFF container, one JPEG per video frame).
//!
//! Layout (little-endian; every chunk is `fourcc, u32 size, data`, padded to an even size):
//!
//! ```text
//! RIFF 'AVI '
//!   LIST 'hdrl'
//!     'avih'  MainAVIHeader (56 bytes: µs per frame, …, total frames, streams, width, height)
//!     LIST 'strl'  (one per stream)
//!       'strh'  AVIStreamHeader (56 bytes: 'vids', handler, …, scale, rate, start, length, …)
//!       'strf'  BITMAPINFOHEADER (40 bytes: width, height, planes, bit count, compression 'MJPG')
//!   LIST 'movi'
//!     '00dc' JPEG bytes   (stream 0, compressed video; 'db' also accepted, 'rec ' lists walked)
//!     …
//!   'idx1'  16 bytes a frame: '00dc', AVIIF_KEYFRAME, offset from the 'movi' fourcc, size
//! [RIFF 'AVIX' LIST 'movi' …]   (OpenDML continuation of files over 1 GiB; read, never written)
//! ```
//!
//! The reader walks the `movi` lists (not `idx1`, which damaged files lack) and checks that every
//! chunk lies inside the file, so a truncated file is refused with its path and the byte offset.
//! A zero-length frame chunk (a dropped frame) repeats the previous frame, as players do.
//! Frame rate is `rate / scale` from the video stream header.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{decode_image, encode_jpeg, VideoError, VideoFrames, VideoMeta, VideoResult};

/// Codec tags (`biCompression` / `fccHandler`) taken as Motion-JPEG.
const MJPEG_TAGS: [&[u8; 4]; 5] = [b"MJPG", b"mjpg", b"AVRn", b"JPEG", b"jpeg"];

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn fourcc(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

/// The video stream's headers and where its frames are.
#[derive(Debug, Default)]
struct Parsed {
    /// Stream number of the first video stream (`vids`), if any.
    video_stream: Option<usize>,
    /// Its codec tag (`biCompression`).
    codec: [u8; 4],
    width: usize,
    height: usize,
    /// From `strh` (`rate / scale`), else from `avih` (µs per frame).
    fps: f64,
    /// `(file offset of the JPEG bytes, length)` per frame; zero lengths already resolved to the
    /// previous frame's chunk.
    frames: Vec<(u64, u32)>,
}

struct Parser<'a> {
    f: &'a mut File,
    path: &'a Path,
    len: u64,
    parsed: Parsed,
    /// Streams seen so far in `hdrl`.
    n_streams: usize,
    us_per_frame: u32,
}

impl Parser<'_> {
    fn read_at(&mut self, pos: u64, n: usize) -> VideoResult<Vec<u8>> {
        if pos + n as u64 > self.len {
            return Err(VideoError::corrupt(
                self.path,
                format!(
                    "AVI truncated: {n} bytes needed at byte {pos}, the file has {}",
                    self.len
                ),
            ));
        }
        let mut buf = vec![0u8; n];
        self.f
            .seek(SeekFrom::Start(pos))
            .and_then(|_| self.f.read_exact(&mut buf))
            .map_err(|e| VideoError::io(self.path, e))?;
        Ok(buf)
    }

    /// Chunk header at `pos` inside `[.., end)`: `(fourcc, size)`, checked to fit.
    fn chunk(&mut self, pos: u64, end: u64) -> VideoResult<([u8; 4], u32)> {
        let h = self.read_at(pos, 8)?;
        let id = [h[0], h[1], h[2], h[3]];
        let size = le32(&h, 4);
        if pos + 8 + size as u64 > end {
            return Err(VideoError::corrupt(
                self.path,
                format!(
                    "AVI truncated or corrupt: chunk '{}' at byte {pos} holds {size} bytes but its \
                     container ends at byte {end} (file size {})",
                    fourcc(&id),
                    self.len
                ),
            ));
        }
        Ok((id, size))
    }

    /// Walks the chunks of `[pos, end)`.
    fn walk(&mut self, mut pos: u64, end: u64, headers_only: bool) -> VideoResult<bool> {
        while pos + 8 <= end {
            let (id, size) = self.chunk(pos, end)?;
            let data = pos + 8;
            match &id {
                b"LIST" => {
                    if size < 4 {
                        return Err(VideoError::corrupt(
                            self.path,
                            format!("AVI corrupt: LIST at byte {pos} is too short"),
                        ));
                    }
                    let kind = self.read_at(data, 4)?;
                    match &kind[..] {
                        b"movi" => {
                            if headers_only {
                                return Ok(true);
                            }
                            self.walk_movi(data + 4, data + size as u64)?;
                        }
                        b"strl" => {
                            self.walk(data + 4, data + size as u64, headers_only)?;
                            self.n_streams += 1;
                        }
                        _ => {
                            if self.walk(data + 4, data + size as u64, headers_only)? {
                                return Ok(true);
                            }
                        }
                    }
                }
                b"avih" => {
                    let b = self.read_at(data, (size as usize).min(56))?;
                    if b.len() >= 4 {
                        self.us_per_frame = le32(&b, 0);
                    }
                }
                b"strh" => {
                    let b = self.read_at(data, (size as usize).min(56))?;
                    if b.len() >= 32 && &b[0..4] == b"vids" && self.parsed.video_stream.is_none() {
                        self.parsed.video_stream = Some(self.n_streams);
                        let (scale, rate) = (le32(&b, 20), le32(&b, 24));
                        if scale > 0 && rate > 0 {
                            self.parsed.fps = rate as f64 / scale as f64;
                        }
                        self.parsed.codec.copy_from_slice(&b[4..8]);
                    }
                }
                b"strf" if self.parsed.video_stream == Some(self.n_streams) => {
                    let b = self.read_at(data, (size as usize).min(40))?;
                    if b.len() < 20 {
                        return Err(VideoError::corrupt(
                            self.path,
                            "AVI corrupt: video stream format (strf) shorter than 20 bytes",
                        ));
                    }
                    self.parsed.width = (le32(&b, 4) as i32).unsigned_abs() as usize;
                    self.parsed.height = (le32(&b, 8) as i32).unsigned_abs() as usize;
                    // biCompression names the codec; the stream handler may be blank.
                    if b[16..20] != [0, 0, 0, 0] {
                        self.parsed.codec.copy_from_slice(&b[16..20]);
                    }
                }
                b"RIFF" => {
                    // OpenDML continuation: RIFF 'AVIX' with its own movi list.
                    let kind = self.read_at(data, 4)?;
                    if &kind[..] == b"AVIX" && !headers_only {
                        self.walk(data + 4, data + size as u64, headers_only)?;
                    }
                }
                _ => {}
            }
            pos = data + size as u64 + (size as u64 & 1);
        }
        Ok(false)
    }

    fn walk_movi(&mut self, mut pos: u64, end: u64) -> VideoResult<()> {
        let Some(stream) = self.parsed.video_stream else {
            return Ok(());
        };
        let tag = format!("{stream:02}");
        while pos + 8 <= end {
            let (id, size) = self.chunk(pos, end)?;
            let data = pos + 8;
            if &id == b"LIST" {
                // 'rec ' groups: walk their chunks.
                self.walk_movi(data + 4, data + size as u64)?;
            } else if id[..2] == *tag.as_bytes() && (&id[2..] == b"dc" || &id[2..] == b"db") {
                if size > 0 {
                    self.parsed.frames.push((data, size));
                } else if let Some(&prev) = self.parsed.frames.last() {
                    self.parsed.frames.push(prev);
                } else {
                    return Err(VideoError::corrupt(
                        self.path,
                        "AVI corrupt: the first video frame is empty",
                    ));
                }
            }
            pos = data + size as u64 + (size as u64 & 1);
        }
        Ok(())
    }
}

fn parse(path: &Path, headers_only: bool) -> VideoResult<Parsed> {
    let mut f = File::open(path).map_err(|e| VideoError::io(path, e))?;
    let len = f.metadata().map_err(|e| VideoError::io(path, e))?.len();
    let mut p = Parser {
        f: &mut f,
        path,
        len,
        parsed: Parsed::default(),
        n_streams: 0,
        us_per_frame: 0,
    };
    let head = p.read_at(0, 12).map_err(|_| {
        VideoError::corrupt(
            path,
            format!("not an AVI file: {len} bytes, no RIFF header"),
        )
    })?;
    if &head[0..4] != b"RIFF" || &head[8..12] != b"AVI " {
        return Err(VideoError::corrupt(
            path,
            format!(
                "not an AVI file: starts with '{}' … '{}', expected 'RIFF' … 'AVI '",
                fourcc(&head[0..4]),
                fourcc(&head[8..12])
            ),
        ));
    }
    let riff_end = 8 + le32(&head, 4) as u64;
    if riff_end > len {
        return Err(VideoError::corrupt(
            path,
            format!("AVI truncated: the RIFF header says {riff_end} bytes, the file has {len}"),
        ));
    }
    let saw_movi = p.walk(12, riff_end, headers_only)?;
    if !headers_only && riff_end + 8 <= len {
        // OpenDML: further RIFF 'AVIX' chunks after the first.
        p.walk(riff_end + (riff_end & 1), len, false)?;
    }
    let us = p.us_per_frame;
    let mut parsed = std::mem::take(&mut p.parsed);
    if parsed.fps <= 0.0 && us > 0 {
        parsed.fps = 1e6 / us as f64;
    }
    if headers_only && !saw_movi && parsed.video_stream.is_none() {
        return Err(VideoError::unsupported(path, "AVI has no video stream"));
    }
    Ok(parsed)
}

/// Whether `path` is an AVI whose first video stream is Motion-JPEG (headers only). Errors when
/// it is not a readable AVI at all.
pub fn is_mjpeg_avi(path: &Path) -> VideoResult<bool> {
    let p = parse(path, true)?;
    Ok(p.video_stream.is_some() && MJPEG_TAGS.iter().any(|t| **t == p.codec))
}

/// An opened Motion-JPEG AVI: headers parsed and every frame chunk located.
#[derive(Debug)]
pub struct AviReader {
    path: PathBuf,
    meta: VideoMeta,
    frames: Vec<(u64, u32)>,
}

impl AviReader {
    /// Parses the container and locates every frame; decodes nothing yet.
    pub fn open(path: &Path) -> VideoResult<Self> {
        let p = parse(path, false)?;
        if p.video_stream.is_none() {
            return Err(VideoError::unsupported(path, "AVI has no video stream"));
        }
        if !MJPEG_TAGS.iter().any(|t| **t == p.codec) {
            return Err(VideoError::unsupported(
                path,
                format!(
                    "AVI video codec is '{}', not Motion-JPEG (decode it through ffmpeg)",
                    fourcc(&p.codec)
                ),
            ));
        }
        if p.width == 0 || p.height == 0 {
            return Err(VideoError::corrupt(
                path,
                format!("AVI frame size is {}x{}", p.width, p.height),
            ));
        }
        if p.frames.is_empty() {
            return Err(VideoError::corrupt(path, "AVI holds no video frames"));
        }
        if !(p.fps.is_finite() && p.fps > 0.0) {
            return Err(VideoError::corrupt(path, "AVI has no frame rate"));
        }
        Ok(AviReader {
            path: path.to_path_buf(),
            meta: VideoMeta {
                num_frames: p.frames.len(),
                fps: p.fps,
                width: p.width,
                height: p.height,
            },
            frames: p.frames,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> VideoMeta {
        self.meta
    }

    /// The JPEG bytes of frame `i` (`i < num_frames`).
    pub fn read_jpeg(&self, file: &mut File, i: usize) -> VideoResult<Vec<u8>> {
        let (off, len) = self.frames[i];
        let mut buf = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(off))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| VideoError::io(&self.path, e))?;
        Ok(buf)
    }

    /// Decodes the frames at `indices` (each `< num_frames`), in that order.
    pub fn decode(&self, indices: &[usize]) -> VideoResult<VideoFrames> {
        let mut file = File::open(&self.path).map_err(|e| VideoError::io(&self.path, e))?;
        let mut out = VideoFrames::new(self.meta.width, self.meta.height);
        out.data.reserve(indices.len() * out.frame_len());
        for &i in indices {
            let jpeg = self.read_jpeg(&mut file, i)?;
            let (w, h, rgb) = decode_image(&jpeg, &self.path).map_err(|e| match e {
                VideoError::Corrupt { path, msg } => VideoError::Corrupt {
                    path,
                    msg: format!("frame {i}: {msg}"),
                },
                other => other,
            })?;
            if (w, h) != (self.meta.width, self.meta.height) {
                return Err(VideoError::corrupt(
                    &self.path,
                    format!(
                        "frame {i} is {w}x{h}, the header says {}x{}",
                        self.meta.width, self.meta.height
                    ),
                ));
            }
            out.push(&rgb);
        }
        Ok(out)
    }
}

/// Offsets of the header fields the writer patches in [`AviWriter::finish`].
mod at {
    pub const RIFF_SIZE: u64 = 4;
    pub const AVIH_MAX_BYTES_PER_SEC: u64 = 36;
    pub const AVIH_TOTAL_FRAMES: u64 = 48;
    pub const AVIH_SUGGESTED_BUFFER: u64 = 60;
    pub const STRH_LENGTH: u64 = 140;
    pub const STRH_SUGGESTED_BUFFER: u64 = 144;
    pub const MOVI_SIZE: u64 = 216;
    /// The 'movi' fourcc; idx1 offsets count from here.
    pub const MOVI_FOURCC: u64 = 220;
    pub const FIRST_FRAME: u64 = 224;
}

/// Writes a Motion-JPEG AVI frame by frame. The output depends only on the frames, the frame
/// rate and the quality (same input → same bytes).
pub struct AviWriter {
    path: PathBuf,
    out: BufWriter<File>,
    width: usize,
    height: usize,
    fps: f64,
    quality: u8,
    pos: u64,
    /// `(offset from the 'movi' fourcc, size)` per frame, for idx1.
    index: Vec<(u32, u32)>,
    max_chunk: u32,
}

impl AviWriter {
    /// Creates `path` for `width × height` frames at `fps` frames per second, JPEG `quality`
    /// (1–100; 90 keeps colours within a few levels).
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        fps: f64,
        quality: u8,
    ) -> VideoResult<Self> {
        if width == 0 || height == 0 || width > 65535 || height > 65535 {
            return Err(VideoError::Config(format!(
                "AVI frames must be 1..=65535 pixels a side, got {width}x{height}"
            )));
        }
        if !(fps.is_finite() && fps > 0.0 && fps <= 1e6) {
            return Err(VideoError::Config(format!(
                "AVI frame rate must be in (0, 1e6], got {fps}"
            )));
        }
        let file = File::create(path).map_err(|e| VideoError::io(path, e))?;
        let mut w = AviWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            width,
            height,
            fps,
            quality,
            pos: 0,
            index: Vec::new(),
            max_chunk: 0,
        };
        let header = w.header();
        debug_assert_eq!(header.len() as u64, at::FIRST_FRAME);
        w.put(&header)?;
        Ok(w)
    }

    fn header(&self) -> Vec<u8> {
        let (wd, ht) = (self.width as u32, self.height as u32);
        let scale = 1000u32;
        let rate = (self.fps * 1000.0).round().max(1.0) as u32;
        let us_per_frame = (1e6 / self.fps).round() as u32;
        let mut h = Vec::with_capacity(at::FIRST_FRAME as usize);
        let mut put = |b: &[u8]| h.extend_from_slice(b);
        put(b"RIFF");
        put(&0u32.to_le_bytes()); // patched
        put(b"AVI ");
        put(b"LIST");
        put(&192u32.to_le_bytes());
        put(b"hdrl");
        put(b"avih");
        put(&56u32.to_le_bytes());
        for v in [
            us_per_frame,
            0,
            0,
            0x10, /* AVIF_HASINDEX */
            0,
            0,
            1,
            0,
            wd,
            ht,
        ] {
            put(&v.to_le_bytes());
        }
        put(&[0u8; 16]);
        put(b"LIST");
        put(&116u32.to_le_bytes());
        put(b"strl");
        put(b"strh");
        put(&56u32.to_le_bytes());
        put(b"vids");
        put(b"MJPG");
        for v in [
            0u32,
            0,
            0,
            scale,
            rate,
            0,
            0,
            0,
            u32::MAX, /* quality: default */
            0,
        ] {
            put(&v.to_le_bytes());
        }
        for v in [0u16, 0, wd as u16, ht as u16] {
            put(&v.to_le_bytes());
        }
        put(b"strf");
        put(&40u32.to_le_bytes());
        for v in [40u32, wd, ht] {
            put(&v.to_le_bytes());
        }
        put(&1u16.to_le_bytes());
        put(&24u16.to_le_bytes());
        put(b"MJPG");
        for v in [wd * ht * 3, 0, 0, 0, 0] {
            put(&v.to_le_bytes());
        }
        put(b"LIST");
        put(&0u32.to_le_bytes()); // patched
        put(b"movi");
        h
    }

    fn put(&mut self, b: &[u8]) -> VideoResult<()> {
        self.out
            .write_all(b)
            .map_err(|e| VideoError::io(&self.path, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Appends one `[H, W, 3]` RGB frame.
    pub fn write_frame(&mut self, rgb: &[u8]) -> VideoResult<()> {
        let jpeg = encode_jpeg(rgb, self.width, self.height, self.quality)?;
        self.write_jpeg(&jpeg)
    }

    /// Appends one frame already encoded as JPEG.
    pub fn write_jpeg(&mut self, jpeg: &[u8]) -> VideoResult<()> {
        let size = u32::try_from(jpeg.len())
            .map_err(|_| VideoError::Config("a JPEG frame over 4 GiB".into()))?;
        if self.pos + 8 + size as u64 + 64 > u32::MAX as u64 {
            return Err(VideoError::Config(format!(
                "{}: AVI files written by reel stop at 4 GiB",
                self.path.display()
            )));
        }
        let off = (self.pos - at::MOVI_FOURCC) as u32;
        self.put(b"00dc")?;
        self.put(&size.to_le_bytes())?;
        self.put(jpeg)?;
        if size & 1 == 1 {
            self.put(&[0])?;
        }
        self.index.push((off, size));
        self.max_chunk = self.max_chunk.max(size);
        Ok(())
    }

    /// Writes the index, fills in the header's counts and sizes, and flushes.
    pub fn finish(mut self) -> VideoResult<()> {
        let movi_end = self.pos;
        let mut idx = Vec::with_capacity(8 + 16 * self.index.len());
        idx.extend_from_slice(b"idx1");
        idx.extend_from_slice(&((16 * self.index.len()) as u32).to_le_bytes());
        for &(off, size) in &self.index {
            idx.extend_from_slice(b"00dc");
            idx.extend_from_slice(&0x10u32.to_le_bytes()); // AVIIF_KEYFRAME
            idx.extend_from_slice(&off.to_le_bytes());
            idx.extend_from_slice(&size.to_le_bytes());
        }
        self.put(&idx)?;
        let n = self.index.len() as u32;
        let bytes_per_sec = (self.max_chunk as f64 * self.fps).min(u32::MAX as f64) as u32;
        let patches = [
            (at::RIFF_SIZE, (self.pos - 8) as u32),
            (at::AVIH_MAX_BYTES_PER_SEC, bytes_per_sec),
            (at::AVIH_TOTAL_FRAMES, n),
            (at::AVIH_SUGGESTED_BUFFER, self.max_chunk + 8),
            (at::STRH_LENGTH, n),
            (at::STRH_SUGGESTED_BUFFER, self.max_chunk + 8),
            (at::MOVI_SIZE, (movi_end - at::MOVI_FOURCC) as u32),
        ];
        let path = self.path.clone();
        let io = |e| VideoError::io(&path, e);
        let mut file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        for (pos, v) in patches {
            file.seek(SeekFrom::Start(pos)).map_err(io)?;
            file.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        file.sync_all().map_err(io)
    }
}

/// Writes `frames` as a Motion-JPEG AVI at `fps` and JPEG `quality`.
pub fn write_mjpeg_avi(
    path: &Path,
    frames: &VideoFrames,
    fps: f64,
    quality: u8,
) -> VideoResult<()> {
    let mut w = AviWriter::create(path, frames.width, frames.height, fps, quality)?;
    for i in 0..frames.num_frames() {
        w.write_frame(frames.frame(i))?;
    }
    w.finish()
}
