//! A folder of frames as a video: every `.jpg`/`.jpeg`/`.png` file (case-insensitive), sorted by
//! file name (byte order, so name frames with zero-padded numbers: `frame_0001.jpg`, …), taken
//! at [`FOLDER_FPS`](super::FOLDER_FPS) frames per second. Other files are ignored. Every frame
//! must have the first frame's size.

use std::path::{Path, PathBuf};

use super::{decode_image, VideoError, VideoFrames, VideoMeta, VideoResult, FOLDER_FPS};

/// The frame files of `dir`, sorted by name.
pub fn frame_files(dir: &Path) -> VideoResult<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| VideoError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| VideoError::io(dir, e))?;
        let p = entry.path();
        let is_frame = p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["jpg", "jpeg", "png"]
                .iter()
                .any(|x| e.eq_ignore_ascii_case(x))
        });
        if is_frame && p.is_file() {
            files.push(p);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// An opened frame folder: its files listed and the first one decoded for the frame size.
#[derive(Debug)]
pub struct FrameFolder {
    path: PathBuf,
    files: Vec<PathBuf>,
    meta: VideoMeta,
}

impl FrameFolder {
    pub fn open(dir: &Path) -> VideoResult<Self> {
        let files = frame_files(dir)?;
        let Some(first) = files.first() else {
            return Err(VideoError::unsupported(
                dir,
                "folder holds no frames (.jpg, .jpeg or .png files)",
            ));
        };
        let (width, height, _) = read_frame(first)?;
        Ok(FrameFolder {
            path: dir.to_path_buf(),
            meta: VideoMeta {
                num_frames: files.len(),
                fps: FOLDER_FPS,
                width,
                height,
            },
            files,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> VideoMeta {
        self.meta
    }

    /// Decodes the frames at `indices` (each `< num_frames`), in that order.
    pub fn decode(&self, indices: &[usize]) -> VideoResult<VideoFrames> {
        let mut out = VideoFrames::new(self.meta.width, self.meta.height);
        for &i in indices {
            let f = &self.files[i];
            let (w, h, rgb) = read_frame(f)?;
            if (w, h) != (self.meta.width, self.meta.height) {
                return Err(VideoError::unsupported(
                    f,
                    format!(
                        "frame is {w}x{h}, the folder's first frame is {}x{}",
                        self.meta.width, self.meta.height
                    ),
                ));
            }
            out.push(&rgb);
        }
        Ok(out)
    }
}

fn read_frame(path: &Path) -> VideoResult<(usize, usize, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| VideoError::io(path, e))?;
    decode_image(&bytes, path)
}
