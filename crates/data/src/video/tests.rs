//! Tests of video input: AVI round trip and damage, frame folders, ffmpeg, content hash, the
//! prefetcher, and the golden fixture from transformers' Qwen2VLVideoProcessor.

use std::path::{Path, PathBuf};

use super::avi::{write_mjpeg_avi, AviReader};
use super::ffmpeg::{ffmpeg_available, FfmpegVideo};
use super::folder::FrameFolder;
use super::prefetch::Prefetcher;
use super::process::resize_bicubic;
use super::*;

/// Smooth frames (JPEG keeps them within a few levels): a moving gradient, frame `t` shifted.
fn smooth_frames(n: usize, w: usize, h: usize) -> VideoFrames {
    let mut f = VideoFrames::new(w, h);
    for t in 0..n {
        for y in 0..h {
            for x in 0..w {
                f.data.extend_from_slice(&[
                    (40 + 4 * x + 10 * t).min(255) as u8,
                    (30 + 5 * y).min(255) as u8,
                    (200 - 2 * (x + y) as i64 - 7 * t as i64).max(0) as u8,
                ]);
            }
        }
    }
    f
}

/// (mean, max) absolute difference of two equal-length byte slices.
fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let mut sum = 0u64;
    let mut max = 0u8;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.len() as f64, max)
}

fn assert_frames_close(got: &VideoFrames, want: &VideoFrames, idx: &[usize], mean: f64, max: u8) {
    assert_eq!((got.width, got.height), (want.width, want.height));
    assert_eq!(got.num_frames(), idx.len());
    for (k, &i) in idx.iter().enumerate() {
        let (m, x) = diff(got.frame(k), want.frame(i));
        assert!(
            m <= mean && x <= max,
            "frame {i}: mean diff {m:.2}, max {x}"
        );
    }
}

#[test]
fn avi_write_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.avi");
    // Odd size (not a multiple of the 8/16-pixel JPEG blocks).
    let frames = smooth_frames(5, 37, 23);
    write_mjpeg_avi(&path, &frames, 7.5, 95).unwrap();
    assert_eq!(VideoSource::detect(&path).unwrap(), VideoSource::MjpegAvi);
    let v = Video::open(&path).unwrap();
    let m = v.meta();
    assert_eq!((m.num_frames, m.width, m.height), (5, 37, 23));
    assert!((m.fps - 7.5).abs() < 1e-9, "fps {}", m.fps);
    let idx = [4, 0, 2, 2];
    let got = v.decode(&idx).unwrap();
    assert_frames_close(&got, &frames, &idx, 2.0, 24);
    // Sampling goes through the same decode.
    let s = v.sample(&FrameSampling::Uniform { frames: 4 }).unwrap();
    assert_eq!(s.indices, vec![0, 1, 2, 3]);
    assert!((s.sampled_fps() - 4.0 / 5.0 * 7.5).abs() < 1e-12);
    let err = v.decode(&[5]).unwrap_err().to_string();
    assert!(
        err.contains("frame 5 requested, the video has 5 frames"),
        "{err}"
    );
}

#[test]
fn avi_writer_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let frames = smooth_frames(3, 16, 16);
    let (a, b) = (dir.path().join("a.avi"), dir.path().join("b.avi"));
    write_mjpeg_avi(&a, &frames, 4.0, 90).unwrap();
    write_mjpeg_avi(&b, &frames, 4.0, 90).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(
        video_content_hash(&a).unwrap(),
        video_content_hash(&b).unwrap()
    );
}

#[test]
fn truncated_corrupt_and_missing_avi_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.avi");
    write_mjpeg_avi(&good, &smooth_frames(4, 32, 32), 4.0, 90).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    // Cut in the middle of the frame data.
    let cut = dir.path().join("cut.avi");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = Video::open(&cut).unwrap_err().to_string();
    assert!(e.starts_with(&cut.display().to_string()), "{e}");
    assert!(e.contains("truncated"), "{e}");

    // Cut inside the header.
    let head = dir.path().join("head.avi");
    std::fs::write(&head, &bytes[..100]).unwrap();
    let e = Video::open(&head).unwrap_err().to_string();
    assert!(
        e.starts_with(&head.display().to_string()) && e.contains("truncated"),
        "{e}"
    );

    // Not an AVI at all.
    let junk = dir.path().join("junk.avi");
    std::fs::write(&junk, b"hello, this is not a video").unwrap();
    let e = Video::open(&junk).unwrap_err().to_string();
    assert!(
        e.starts_with(&junk.display().to_string()) && e.contains("not an AVI"),
        "{e}"
    );

    // Frame 2's JPEG overwritten with garbage: open works, decoding frame 2 fails, naming it.
    let r = AviReader::open(&good).unwrap();
    let mut f = std::fs::File::open(&good).unwrap();
    let jpeg2 = r.read_jpeg(&mut f, 2).unwrap();
    let at = bytes
        .windows(jpeg2.len())
        .position(|w| w == &jpeg2[..])
        .unwrap();
    let mut damaged = bytes.clone();
    for b in &mut damaged[at..at + jpeg2.len()] {
        *b = 0x5a;
    }
    let bad = dir.path().join("bad.avi");
    std::fs::write(&bad, &damaged).unwrap();
    let v = Video::open(&bad).unwrap();
    assert!(v.decode(&[0, 1, 3]).is_ok());
    let e = v.decode(&[2]).unwrap_err().to_string();
    assert!(
        e.starts_with(&bad.display().to_string()) && e.contains("frame 2"),
        "{e}"
    );

    // Missing.
    let missing = dir.path().join("missing.avi");
    let e = Video::open(&missing).unwrap_err();
    assert!(
        matches!(&e, VideoError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    );
    assert!(e.to_string().starts_with(&missing.display().to_string()));
    let e = load_video(&missing, &FrameSampling::All)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.avi"), "{e}");
}

fn save_png(path: &Path, frames: &VideoFrames, i: usize) {
    image::RgbImage::from_raw(
        frames.width as u32,
        frames.height as u32,
        frames.frame(i).to_vec(),
    )
    .unwrap()
    .save(path)
    .unwrap();
}

#[test]
fn frame_folder_sorted_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let frames = smooth_frames(3, 20, 12);
    // Names sort as frame 0, 1, 2; written out of order, plus files that are not frames.
    save_png(&dir.path().join("f_002.png"), &frames, 2);
    save_png(&dir.path().join("f_000.png"), &frames, 0);
    save_png(&dir.path().join("f_001.PNG"), &frames, 1);
    std::fs::write(dir.path().join("notes.txt"), "not a frame").unwrap();
    assert_eq!(
        VideoSource::detect(dir.path()).unwrap(),
        VideoSource::Folder
    );
    let v = Video::open(dir.path()).unwrap();
    let m = v.meta();
    assert_eq!(
        (m.num_frames, m.width, m.height, m.fps),
        (3, 20, 12, FOLDER_FPS)
    );
    let got = v.decode(&[0, 1, 2]).unwrap();
    assert_eq!(got, frames, "PNG frames are lossless");
    // A JPEG frame of a different size is refused, naming the file.
    let odd = smooth_frames(1, 8, 8);
    let jpg = dir.path().join("f_003.jpg");
    std::fs::write(&jpg, encode_jpeg(odd.frame(0), 8, 8, 90).unwrap()).unwrap();
    let v = FrameFolder::open(dir.path()).unwrap();
    assert_eq!(v.meta().num_frames, 4);
    let e = v.decode(&[3]).unwrap_err().to_string();
    assert!(
        e.starts_with(&jpg.display().to_string()) && e.contains("8x8"),
        "{e}"
    );
    // An empty folder is refused.
    let empty = tempfile::tempdir().unwrap();
    let e = Video::open(empty.path()).unwrap_err().to_string();
    assert!(e.contains("no frames"), "{e}");
    // The folder's content hash follows its frames.
    let h1 = video_content_hash(dir.path()).unwrap();
    std::fs::remove_file(&jpg).unwrap();
    let h2 = video_content_hash(dir.path()).unwrap();
    assert_ne!(h1, h2);
    assert_eq!(h2.len(), 64);
}

#[test]
fn content_hash_follows_bytes_not_path() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.avi"), dir.path().join("sub.avi"));
    write_mjpeg_avi(&a, &smooth_frames(2, 16, 16), 4.0, 90).unwrap();
    std::fs::copy(&a, &b).unwrap();
    let ha = video_content_hash(&a).unwrap();
    assert_eq!(ha, video_content_hash(&b).unwrap());
    write_mjpeg_avi(&b, &smooth_frames(3, 16, 16), 4.0, 90).unwrap();
    assert_ne!(ha, video_content_hash(&b).unwrap());
    // SHA-256 of known bytes.
    let c = dir.path().join("abc");
    std::fs::write(&c, b"abc").unwrap();
    assert_eq!(
        video_content_hash(&c).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(video_content_hash(&dir.path().join("nope"))
        .unwrap_err()
        .to_string()
        .contains("nope"));
}

/// Whether the ffmpeg tests can run: skipped with a note locally without ffmpeg, a failure
/// under CI (CI=true), which installs it.
fn have_ffmpeg(test: &str) -> bool {
    if ffmpeg_available() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: ffmpeg/ffprobe are not installed, and CI must run this test");
    }
    eprintln!("skipping {test}: ffmpeg/ffprobe not installed");
    false
}

fn ffmpeg(args: &[&str]) {
    let out = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ffmpeg_decodes_mp4_and_agrees_with_the_native_reader() {
    if !have_ffmpeg("ffmpeg_decodes_mp4_and_agrees_with_the_native_reader") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let avi = dir.path().join("src.avi");
    let frames = smooth_frames(10, 48, 32);
    write_mjpeg_avi(&avi, &frames, 5.0, 95).unwrap();

    // ffmpeg reads reel's AVI: same metadata, nearly the same pixels (another JPEG decoder).
    let fv = FfmpegVideo::open(&avi).unwrap();
    let m = fv.meta();
    assert_eq!((m.num_frames, m.width, m.height), (10, 48, 32));
    assert!((m.fps - 5.0).abs() < 1e-6, "fps {}", m.fps);
    let idx = [9, 3, 0, 3];
    let native = Video::open(&avi).unwrap().decode(&idx).unwrap();
    let via = fv.decode(&idx).unwrap();
    let (mean, _) = diff(&native.data, &via.data);
    assert!(mean < 2.0, "ffmpeg vs native JPEG decode: mean diff {mean}");

    // An mp4 goes through ffmpeg.
    let mp4 = dir.path().join("v.mp4");
    let avi_s = avi.to_str().unwrap();
    ffmpeg(&[
        "-i",
        avi_s,
        "-c:v",
        "mpeg4",
        "-q:v",
        "2",
        "-pix_fmt",
        "yuv420p",
        mp4.to_str().unwrap(),
    ]);
    assert_eq!(VideoSource::detect(&mp4).unwrap(), VideoSource::Ffmpeg);
    let v = Video::open(&mp4).unwrap();
    let m = v.meta();
    assert_eq!((m.num_frames, m.width, m.height), (10, 48, 32));
    assert!((m.fps - 5.0).abs() < 1e-6, "fps {}", m.fps);
    let s = v.sample(&FrameSampling::Uniform { frames: 4 }).unwrap();
    assert_eq!(s.indices, vec![0, 2, 5, 7]);
    assert_frames_close(&s.frames, &frames, &s.indices, 6.0, 80);

    // An MJPEG AVI written by ffmpeg is read natively.
    let ff_avi = dir.path().join("ff.avi");
    ffmpeg(&[
        "-i",
        mp4.to_str().unwrap(),
        "-c:v",
        "mjpeg",
        "-q:v",
        "2",
        ff_avi.to_str().unwrap(),
    ]);
    assert_eq!(VideoSource::detect(&ff_avi).unwrap(), VideoSource::MjpegAvi);
    let v = Video::open(&ff_avi).unwrap();
    assert_eq!(v.meta().num_frames, 10);
    let got = v.decode(&[1, 8]).unwrap();
    assert_frames_close(&got, &frames, &[1, 8], 8.0, 90);

    // An AVI with another codec falls back to ffmpeg.
    let mpeg_avi = dir.path().join("mpeg4.avi");
    ffmpeg(&[
        "-i",
        avi_s,
        "-c:v",
        "mpeg4",
        "-q:v",
        "2",
        mpeg_avi.to_str().unwrap(),
    ]);
    assert_eq!(VideoSource::detect(&mpeg_avi).unwrap(), VideoSource::Ffmpeg);
    assert_eq!(
        Video::open(&mpeg_avi)
            .unwrap()
            .decode(&[0, 9])
            .unwrap()
            .num_frames(),
        2
    );

    // A damaged mp4 is an error naming it.
    let broken = dir.path().join("broken.mp4");
    std::fs::write(&broken, b"\x00\x00\x00\x18ftypmp42 definitely not a movie").unwrap();
    let e = Video::open(&broken).unwrap_err().to_string();
    assert!(e.starts_with(&broken.display().to_string()), "{e}");
}

#[test]
fn missing_ffmpeg_says_how_to_install_it() {
    let e = VideoError::FfmpegMissing {
        path: PathBuf::from("clip.mp4"),
        program: "ffprobe".into(),
    }
    .to_string();
    assert!(e.starts_with("clip.mp4: "), "{e}");
    assert!(e.contains("apt-get install ffmpeg"), "{e}");
}

#[test]
fn prefetcher_skips_bad_videos_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..6 {
        let p = dir.path().join(format!("v{i}.avi"));
        write_mjpeg_avi(&p, &smooth_frames(2 + i, 28, 28), 4.0, 90).unwrap();
        paths.push(p);
    }
    std::fs::write(&paths[2], b"RIFF garbage").unwrap();
    std::fs::remove_file(&paths[4]).unwrap();
    let cfg = VideoProcessorConfig {
        min_pixels: 28 * 28,
        max_pixels: 28 * 28,
        ..Default::default()
    };
    for (workers, capacity) in [(1, 1), (3, 2), (8, 16)] {
        let proc = VideoProcessor::new(cfg.clone()).unwrap();
        let mut pf = Prefetcher::videos(paths.clone(), FrameSampling::All, proc, workers, capacity);
        let got: Vec<(usize, usize)> = pf.by_ref().map(|(i, v)| (i, v.indices.len())).collect();
        assert_eq!(got, vec![(0, 2), (1, 3), (3, 5), (5, 7)]);
        let s = pf.stats();
        assert_eq!((s.ok, s.skipped), (4, 2));
        assert_eq!(s.errors[0].0, 2);
        assert!(s.errors[0].1.contains("v2.avi"), "{:?}", s.errors);
        assert!(s.errors[1].1.contains("v4.avi"), "{:?}", s.errors);
    }
    // A job that panics is skipped like a failure; dropping a prefetcher midway joins its workers.
    let mut pf = Prefetcher::new((0..5).collect::<Vec<usize>>(), 2, 2, |&i| {
        if i == 1 {
            panic!("boom");
        }
        Ok(i * 10)
    });
    assert_eq!(pf.next(), Some((0, 0)));
    assert_eq!(pf.next(), Some((2, 20)));
    assert_eq!(pf.stats().skipped, 1);
    drop(pf);
}

/// `path` with the JPEG start marker of frame `k` overwritten: the container still parses, that
/// frame no longer decodes.
fn corrupt_frame(path: &Path, k: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(3)
        .enumerate()
        .filter(|(_, w)| *w == [0xff, 0xd8, 0xff])
        .map(|(i, _)| i)
        .nth(k)
        .expect("frame k exists");
    bytes[at..at + 3].copy_from_slice(&[0, 0, 0]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_plan_from_the_header_is_what_decoding_gives() {
    let dir = tempfile::tempdir().unwrap();
    let proc = VideoProcessor::new(VideoProcessorConfig {
        min_pixels: 28 * 28,
        max_pixels: 56 * 84,
        ..Default::default()
    })
    .unwrap();
    // Odd sizes (resized), frame counts that need temporal padding, every sampling mode.
    for (n, w, h, fps) in [(5, 30, 22, 4.0), (9, 70, 44, 25.0), (2, 28, 28, 1.0)] {
        let p = dir.path().join(format!("v{n}.avi"));
        write_mjpeg_avi(&p, &smooth_frames(n, w, h), fps, 90).unwrap();
        for sampling in [
            FrameSampling::All,
            FrameSampling::Uniform { frames: 3 },
            FrameSampling::fps(2.0),
        ] {
            let plan = plan_video(&p, &sampling, &proc).unwrap();
            let got = load_and_process(&p, &sampling, &proc).unwrap();
            assert_eq!(plan.indices, got.indices, "{n} frames, {sampling:?}");
            assert_eq!(plan.video_grid_thw, got.inputs.video_grid_thw);
            assert_eq!(plan.second_per_grid_ts, got.inputs.second_per_grid_ts);
            assert_eq!(plan.num_video_tokens(2), got.inputs.num_video_tokens(2));
        }
    }
    // A missing file or a damaged container fails the plan, naming it; a frame that does not
    // decode passes the plan (headers only) and fails the decode.
    let bad = dir.path().join("bad.avi");
    std::fs::write(&bad, b"RIFF garbage").unwrap();
    let e = plan_video(&bad, &FrameSampling::All, &proc).unwrap_err();
    assert!(e.to_string().contains("bad.avi"), "{e}");
    assert!(plan_video(&dir.path().join("nope.avi"), &FrameSampling::All, &proc).is_err());
    let frame = dir.path().join("frame.avi");
    write_mjpeg_avi(&frame, &smooth_frames(4, 28, 28), 4.0, 90).unwrap();
    corrupt_frame(&frame, 2);
    plan_video(&frame, &FrameSampling::All, &proc).unwrap();
    let e = load_and_process(&frame, &FrameSampling::All, &proc).unwrap_err();
    assert!(e.to_string().contains("frame.avi"), "{e}");
}

#[test]
fn prefetcher_over_an_endless_sequence_stays_bounded_and_inline_gives_the_same() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for (workers, capacity) in [(0, 1), (1, 1), (2, 3), (4, 2)] {
        // Jobs started so far: never more than `capacity` ahead of what was taken.
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let mut pf = Prefetcher::from_iter(0usize.., workers, capacity, move |&i: &usize| {
            s.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(1));
            if i % 4 == 3 {
                Err(VideoError::Config(format!("item {i} is bad")))
            } else {
                Ok(i * i)
            }
        });
        for taken in 0..12 {
            let (i, out) = pf.next_result().unwrap();
            assert_eq!(i, taken);
            match out {
                Ok(v) => assert_eq!(v, i * i),
                Err(e) => assert!(i % 4 == 3 && e.to_string().contains("is bad"), "{e}"),
            }
            let ahead = started.load(Ordering::SeqCst) - (taken + 1);
            assert!(
                ahead <= capacity,
                "{workers} workers: {ahead} ahead of {taken}"
            );
        }
        let st = pf.stats();
        assert_eq!((st.ok, st.skipped), (9, 3), "{workers} workers");
        if workers == 0 {
            // Inline: nothing runs ahead, and the wait is the jobs' own time.
            assert_eq!(started.load(Ordering::SeqCst), 12);
            assert!(st.wait_secs >= 0.012, "{st:?}");
        }
        drop(pf);
    }
    // A finite sequence ends, inline or not.
    for workers in [0, 2] {
        let mut pf = Prefetcher::from_iter(0..3usize, workers, 2, |&i: &usize| Ok(i));
        assert_eq!(pf.by_ref().map(|(_, v)| v).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(pf.next_result().is_none());
    }
}

// ---- Golden fixture: transformers' Qwen2VLVideoProcessor (scripts/make_video_fixture.py) ----

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/video")
}

struct Fixture {
    bytes: Vec<u8>,
    meta: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixture_dir();
        Fixture {
            bytes: std::fs::read(dir.join("qwen2vl_video.safetensors")).unwrap(),
            meta: serde_json::from_str(
                &std::fs::read_to_string(dir.join("qwen2vl_video.json")).unwrap(),
            )
            .unwrap(),
        }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn frames(&self, name: &str) -> VideoFrames {
        let (shape, data) = self.tensor(name);
        assert_eq!(shape.len(), 4);
        VideoFrames {
            width: shape[2],
            height: shape[1],
            data,
        }
    }

    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data) = self.tensor(name);
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (shape, v)
    }

    fn processor(&self) -> VideoProcessor {
        VideoProcessor::new(VideoProcessorConfig {
            min_pixels: self.meta["min_pixels"].as_u64().unwrap() as usize,
            max_pixels: self.meta["max_pixels"].as_u64().unwrap() as usize,
            ..Default::default()
        })
        .unwrap()
    }

    fn grid(&self, key: &str) -> [usize; 3] {
        let g: Vec<usize> = self.meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        [g[0], g[1], g[2]]
    }
}

#[test]
fn golden_patchify_and_normalise_match_transformers_exactly() {
    let fx = Fixture::load();
    let frames = fx.frames("exact_frames");
    let (shape, want) = fx.f32s("exact_pixels");
    let out = fx
        .processor()
        .process(&frames, 2.0, Path::new("exact"))
        .unwrap();
    assert_eq!(out.video_grid_thw, fx.grid("exact_grid_thw"));
    assert_eq!(vec![out.num_patches(), out.patch_dim], shape);
    // Same f32 operations in the same order: bit for bit.
    reel_tensor::check_close(
        "pixel_values_videos (no resize)",
        &out.pixel_values_videos,
        &want,
        reel_tensor::Tolerance::new(0.0, 0.0),
    )
    .unwrap();
}

#[test]
fn golden_resize_matches_transformers_exactly() {
    let fx = Fixture::load();
    let frames = fx.frames("resize_frames");
    let torch_resized = fx.frames("resize_resized");
    let ours = resize_bicubic(&frames, torch_resized.height, torch_resized.width);
    let (mean, max) = diff(&ours.data, &torch_resized.data);
    assert!(
        max == 0 && mean == 0.0,
        "bicubic resize vs torchvision: mean {mean:.3}, max {max}"
    );
    let (shape, want) = fx.f32s("resize_pixels");
    let out = fx
        .processor()
        .process(&frames, 2.0, Path::new("resize"))
        .unwrap();
    assert_eq!(out.video_grid_thw, fx.grid("resize_grid_thw"));
    assert_eq!(vec![out.num_patches(), out.patch_dim], shape);
    // The resize is torch's own fixed-point arithmetic, so everything after it is exact too.
    reel_tensor::check_close(
        "pixel_values_videos (resized)",
        &out.pixel_values_videos,
        &want,
        reel_tensor::Tolerance::new(0.0, 0.0),
    )
    .unwrap();
}

#[test]
fn golden_smart_resize_and_sampling_match_transformers() {
    let fx = Fixture::load();
    for case in fx.meta["smart_resize"].as_array().unwrap() {
        let i: Vec<usize> = case["in"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let o = &case["out"];
        let want = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        assert_eq!(
            smart_resize(i[0], i[1], i[2], i[3], i[4]),
            Ok(want),
            "{case}"
        );
    }
    let cases = fx.meta["sample_frames"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let meta = VideoMeta {
            num_frames: case["total"].as_u64().unwrap() as usize,
            fps: case["fps"].as_f64().unwrap(),
            width: 8,
            height: 8,
        };
        let sampling = match case.get("uniform") {
            Some(n) => FrameSampling::Uniform {
                frames: n.as_u64().unwrap() as usize,
            },
            None => FrameSampling::Fps {
                fps: case["sample_fps"].as_f64().unwrap(),
                min_frames: case["min_frames"].as_u64().unwrap() as usize,
                max_frames: case["max_frames"].as_u64().unwrap() as usize,
            },
        };
        let want: Vec<usize> = case["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(sample_indices(&meta, &sampling).unwrap(), want, "{case}");
    }
}
