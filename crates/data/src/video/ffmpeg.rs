//! Any container FFmpeg reads (mp4, mkv, webm, mov, AVI with other codecs, …), through the
//! `ffprobe` and `ffmpeg` command-line programs.
//!
//! - Probe: `ffprobe -count_packets` on the first video stream gives width, height, frame rate
//!   (`avg_frame_rate`, else `r_frame_rate`) and the exact frame count (packets read; falls back
//!   to the header's `nb_frames`, then duration × fps).
//! - Decode: `ffmpeg -vf select=eq(n,i)+… -fps_mode passthrough -f rawvideo -pix_fmt rgb24 pipe:1`
//!   decodes the stream once and pipes only the chosen frames, `H·W·3` bytes each, in order
//!   (`-vsync passthrough` for FFmpeg older than 5.1, which lacks `-fps_mode`).
//!   Rotation metadata is ignored (`-noautorotate`) so frames keep the probed size.
//!
//! A missing program is [`VideoError::FfmpegMissing`], whose message says how to install it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{VideoError, VideoFrames, VideoMeta, VideoResult};

/// The option that keeps frames as decoded (no duplicates or drops): `-fps_mode` from FFmpeg 5.1
/// on, `-vsync` before (read once from `ffmpeg -version`; unknown versions count as new).
fn passthrough_option() -> &'static str {
    static OPT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    OPT.get_or_init(|| {
        let out = Command::new("ffmpeg").arg("-version").output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if ffmpeg_older_than_5_1(&text) {
            "-vsync"
        } else {
            "-fps_mode"
        }
    })
}

/// Parses `ffmpeg version 5.1.9-0+deb12u1 …` / `ffmpeg version n4.4.2 …`.
fn ffmpeg_older_than_5_1(version_text: &str) -> bool {
    let Some(v) = version_text.split_whitespace().nth(2) else {
        return false;
    };
    let v = v.trim_start_matches('n');
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: Option<u32> = parts.next().and_then(|x| x.parse().ok());
    let minor: u32 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    matches!(major, Some(m) if m < 5 || (m == 5 && minor < 1))
}

/// Whether `ffmpeg` and `ffprobe` both run.
pub fn ffmpeg_available() -> bool {
    ["ffmpeg", "ffprobe"].iter().all(|p| {
        Command::new(p)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run(program: &str, args: &[OsString], path: &Path) -> VideoResult<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VideoError::FfmpegMissing {
                    path: path.to_path_buf(),
                    program: program.to_string(),
                }
            } else {
                VideoError::Ffmpeg {
                    path: path.to_path_buf(),
                    msg: format!("could not run {program}: {e}"),
                }
            }
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(VideoError::Ffmpeg {
            path: path.to_path_buf(),
            msg: format!(
                "{program} failed ({}): {}",
                out.status,
                if tail.is_empty() {
                    "no message".to_string()
                } else {
                    tail.join(" | ")
                }
            ),
        });
    }
    Ok(out)
}

/// `"30000/1001"` or `"25"` → frames per second; `None` for `0/0` and the like.
fn parse_rate(s: &str) -> Option<f64> {
    let v = match s.split_once('/') {
        Some((n, d)) => n.trim().parse::<f64>().ok()? / d.trim().parse::<f64>().ok()?,
        None => s.trim().parse::<f64>().ok()?,
    };
    (v.is_finite() && v > 0.0).then_some(v)
}

/// ffprobe prints numbers as JSON strings or numbers depending on the field.
fn num(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Probes `path` with ffprobe.
pub fn probe(path: &Path) -> VideoResult<VideoMeta> {
    let mut args = strs(&[
        "-v",
        "error",
        "-select_streams",
        "v:0",
        "-count_packets",
        "-show_entries",
        "stream=width,height,avg_frame_rate,r_frame_rate,nb_frames,nb_read_packets,duration\
         :format=duration",
        "-of",
        "json",
    ]);
    args.push(arg_path(path).into_os_string());
    let out = run("ffprobe", &args, path)?;
    let bad = |msg: String| VideoError::Ffmpeg {
        path: path.to_path_buf(),
        msg,
    };
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| bad(format!("ffprobe printed something that is not JSON: {e}")))?;
    let Some(s) = j["streams"].as_array().and_then(|a| a.first()) else {
        return Err(VideoError::unsupported(path, "no video stream (ffprobe)"));
    };
    let width = num(&s["width"]).unwrap_or(0.0) as usize;
    let height = num(&s["height"]).unwrap_or(0.0) as usize;
    if width == 0 || height == 0 {
        return Err(VideoError::unsupported(
            path,
            format!("ffprobe reports a {width}x{height} video stream"),
        ));
    }
    let fps = ["avg_frame_rate", "r_frame_rate"]
        .iter()
        .find_map(|k| s[*k].as_str().and_then(parse_rate))
        .ok_or_else(|| VideoError::unsupported(path, "ffprobe reports no frame rate"))?;
    let duration = num(&s["duration"]).or_else(|| num(&j["format"]["duration"]));
    let num_frames = num(&s["nb_read_packets"])
        .or_else(|| num(&s["nb_frames"]))
        .or_else(|| duration.map(|d| (d * fps).round()))
        .unwrap_or(0.0) as usize;
    if num_frames == 0 {
        return Err(VideoError::corrupt(path, "no video frames (ffprobe)"));
    }
    Ok(VideoMeta {
        num_frames,
        fps,
        width,
        height,
    })
}

fn strs(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

/// ffmpeg reads "-"-prefixed names as options; "./" keeps a relative path a path.
fn arg_path(path: &Path) -> PathBuf {
    if path.is_relative() {
        Path::new(".").join(path)
    } else {
        path.to_path_buf()
    }
}

/// A video FFmpeg decodes.
#[derive(Debug)]
pub struct FfmpegVideo {
    path: PathBuf,
    meta: VideoMeta,
}

impl FfmpegVideo {
    /// Probes `path` (runs ffprobe; decodes nothing).
    pub fn open(path: &Path) -> VideoResult<Self> {
        Ok(FfmpegVideo {
            path: path.to_path_buf(),
            meta: probe(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> VideoMeta {
        self.meta
    }

    /// Decodes the frames at `indices` (each `< num_frames`), in that order, in one ffmpeg run.
    pub fn decode(&self, indices: &[usize]) -> VideoResult<VideoFrames> {
        let mut out = VideoFrames::new(self.meta.width, self.meta.height);
        if indices.is_empty() {
            return Ok(out);
        }
        let mut wanted: Vec<usize> = indices.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let all = wanted.len() == self.meta.num_frames;
        let select = wanted
            .iter()
            .map(|i| format!("eq(n\\,{i})"))
            .collect::<Vec<_>>()
            .join("+");
        let filter = format!("select='{select}'");
        let mut args = strs(&["-nostdin", "-v", "error", "-noautorotate", "-i"]);
        args.push(arg_path(&self.path).into_os_string());
        args.extend(strs(&["-map", "0:v:0"]));
        if !all {
            args.extend(strs(&["-vf", &filter]));
        }
        args.extend(strs(&[
            passthrough_option(),
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:1",
        ]));
        let res = run("ffmpeg", &args, &self.path)?;
        let n = out.frame_len();
        let got = res.stdout.len() / n;
        if got < wanted.len() || res.stdout.len() % n != 0 {
            return Err(VideoError::corrupt(
                &self.path,
                format!(
                    "ffmpeg decoded {got} of the {} frames asked for ({} bytes; a frame is {n}): \
                     the video is shorter than probed or damaged",
                    wanted.len(),
                    res.stdout.len()
                ),
            ));
        }
        out.data.reserve(indices.len() * n);
        for &i in indices {
            let k = wanted
                .binary_search(&i)
                .expect("every index is in `wanted`");
            out.push(&res.stdout[k * n..(k + 1) * n]);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_parsing() {
        use super::ffmpeg_older_than_5_1 as old;
        assert!(!old(
            "ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2025"
        ));
        assert!(!old("ffmpeg version 7.1 Copyright"));
        assert!(!old("ffmpeg version N-112233-gabcdef Copyright"));
        assert!(old("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright"));
        assert!(old("ffmpeg version n5.0.1 Copyright"));
        assert!(!old(""));
    }
}
