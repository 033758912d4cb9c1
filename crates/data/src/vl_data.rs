//! The vision-language data path: a LongVideo-Reason record → token ids with the video
//! placeholder runs expanded, an assistant-only loss mask, and each video's processed pixels.
//!
//! As Qwen2.5-VL's processor does, the k-th `<|video_pad|>` of the rendered prompt becomes N_k
//! copies, N_k = t·h·w / m² (the video's merged vision tokens), between `<|vision_start|>` and
//! `<|vision_end|>`; the tokenizer must know these as special tokens (one id each). The SFT target
//! is `<think>reasoning</think><answer>X</answer>` ([`ReasonRecord::sft_target`]) with the loss on
//! the assistant turn only (the rule of [`crate::sft`]). `second_per_grid_ts` of a video is
//! T_p / sampled fps ([`VideoInputs::second_per_grid_ts`]).
//!
//! Failures: a malformed record is reported as `path:line: what is wrong` and skipped; a missing
//! or undecodable video skips its record with a warning naming the video and the record's
//! `path:line`, counted in [`VlLoadReport`].

use std::path::{Path, PathBuf};

use crate::longvideo::{ReasonFile, ReasonRecord};
use crate::sft::{prompt_ids, tokenize_conversation, TokenizedExample};
use crate::tokenizer::Tokenizer;
use crate::video::{
    load_and_process, plan_video, video_content_hash, FrameSampling, VideoInputs, VideoPlan,
};
use crate::video::{VideoProcessor, VideoProcessorConfig};
use crate::{DataError, Result};

/// Qwen2.5-VL's video placeholder token.
pub const VIDEO_PAD: &str = "<|video_pad|>";
/// The special tokens a Qwen2.5-VL tokenizer has for vision input.
pub const VISION_SPECIAL_TOKENS: [&str; 4] = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
];

/// How videos become pixels: frame sampling and the processor settings.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoSettings {
    pub sampling: FrameSampling,
    pub processor: VideoProcessorConfig,
}

impl VideoSettings {
    /// A stable text of every setting that changes the pixels (part of the embedding cache key).
    pub fn key_text(&self) -> String {
        format!("{:?}|{:?}", self.sampling, self.processor)
    }
}

/// One video of an example, processed.
#[derive(Clone, Debug)]
pub struct VlVideo {
    pub path: PathBuf,
    /// [`video_content_hash`] of the video.
    pub content_hash: String,
    pub inputs: VideoInputs,
}

/// One record ready for the model.
#[derive(Clone, Debug)]
pub struct VlExample {
    /// `path:line` of the record.
    pub origin: String,
    pub problem_id: String,
    /// The record's `problem_type` and bare `answer` (the letter), for accuracy.
    pub problem_type: String,
    pub answer: String,
    pub tokens: TokenizedExample,
    /// The videos in the order of their placeholder runs.
    pub videos: Vec<VlVideo>,
}

/// What a load skipped.
#[derive(Debug, Default)]
pub struct VlLoadReport {
    /// Malformed records (`path:line: …`).
    pub bad_records: Vec<DataError>,
    /// Records skipped for a missing or undecodable video: (`path:line`, the video's error).
    pub skipped_videos: Vec<(String, String)>,
}

/// Tokenizes `record` with its k-th video placeholder expanded to `video_tokens[k]` copies of
/// `<|video_pad|>`; with `with_target`, the assistant turn is the SFT target and carries the
/// loss mask; without, the result is the prompt for generation (the user turn and the template's
/// generation prompt, nothing labelled), as RL rolls it out. Errors when the tokenizer does not
/// make each copy one token.
pub fn tokenize_vl_record(
    tok: &Tokenizer,
    record: &ReasonRecord,
    video_tokens: &[usize],
    with_target: bool,
) -> std::result::Result<TokenizedExample, String> {
    let pad = tok
        .token_to_id(VIDEO_PAD)
        .ok_or("the tokenizer has no <|video_pad|> token (not a Qwen2.5-VL tokenizer)")?;
    let mut messages = record.messages(with_target)?;
    let prompt = &messages[0].content;
    let parts: Vec<&str> = prompt.split(VIDEO_PAD).collect();
    if parts.len() != video_tokens.len() + 1 {
        return Err(format!(
            "the prompt has {} video placeholders for {} videos",
            parts.len() - 1,
            video_tokens.len()
        ));
    }
    let mut expanded = String::from(parts[0]);
    for (n, rest) in video_tokens.iter().zip(&parts[1..]) {
        expanded.push_str(&VIDEO_PAD.repeat(*n));
        expanded.push_str(rest);
    }
    messages[0].content = expanded;
    let ex = if with_target {
        tokenize_conversation(tok, &messages).map_err(|e| e.to_string())?
    } else {
        let input_ids = prompt_ids(tok, &messages).map_err(|e| e.to_string())?;
        TokenizedExample {
            loss_mask: vec![false; input_ids.len()],
            input_ids,
        }
    };
    let want: usize = video_tokens.iter().sum();
    let got = ex.input_ids.iter().filter(|&&t| t == pad).count();
    if got != want {
        return Err(format!(
            "{got} <|video_pad|> tokens after tokenization, expected {want} (the tokenizer must \
             treat <|video_pad|> as one special token)"
        ));
    }
    Ok(ex)
}

/// Why one record could not be prepared.
#[derive(Debug)]
pub enum VlSkip {
    /// The record is malformed (`path:line: …`).
    Record(DataError),
    /// A video of the record is missing or undecodable: (`path:line`, the video's error).
    Video(String, String),
}

impl std::fmt::Display for VlSkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VlSkip::Record(e) => write!(f, "skipping malformed record: {e}"),
            VlSkip::Video(origin, e) => write!(f, "{origin}: skipping the record: video {e}"),
        }
    }
}

/// Prepares record `i` of `file`: loads and processes its videos (frame sampling and processor of
/// `settings`, `processor` built from them) and tokenizes it ([`tokenize_vl_record`]).
pub fn prepare_vl_record(
    file: &ReasonFile,
    i: usize,
    tok: &Tokenizer,
    settings: &VideoSettings,
    processor: &VideoProcessor,
    with_target: bool,
) -> std::result::Result<VlExample, VlSkip> {
    let origin = file.origin(i);
    let mut videos = Vec::new();
    for p in file.video_paths(i) {
        let loaded = load_and_process(&p, &settings.sampling, processor)
            .and_then(|v| Ok((video_content_hash(&p)?, v)));
        match loaded {
            Ok((hash, v)) => videos.push(VlVideo {
                path: p,
                content_hash: hash,
                inputs: v.inputs,
            }),
            Err(e) => return Err(VlSkip::Video(origin, e.to_string())),
        }
    }
    let merge = settings.processor.merge_size;
    let counts: Vec<usize> = videos
        .iter()
        .map(|v| v.inputs.num_video_tokens(merge))
        .collect();
    let tokens = tokenize_record(file, i, tok, &counts, with_target)?;
    let record = &file.records[i];
    Ok(VlExample {
        origin,
        problem_id: record.problem_id.clone(),
        problem_type: record.problem_type.clone(),
        answer: record.answer.clone(),
        tokens,
        videos,
    })
}

/// Record `i` of `file` tokenized with `counts[k]` tokens for its k-th video, or why not.
fn tokenize_record(
    file: &ReasonFile,
    i: usize,
    tok: &Tokenizer,
    counts: &[usize],
    with_target: bool,
) -> std::result::Result<TokenizedExample, VlSkip> {
    tokenize_vl_record(tok, &file.records[i], counts, with_target).map_err(|msg| {
        VlSkip::Record(DataError::Jsonl {
            path: file.path.clone(),
            line: file.lines[i],
            msg,
        })
    })
}

/// One video of a [`VlRecordPlan`]: its path and what it will decode to ([`plan_video`]).
#[derive(Clone, Debug)]
pub struct VlVideoPlan {
    pub path: PathBuf,
    pub plan: VideoPlan,
}

/// A record ready for the model but for its videos' pixels ([`plan_vl_record`]): what a
/// trainer keeps per record when it decodes videos only as its batches need them.
#[derive(Clone, Debug)]
pub struct VlRecordPlan {
    /// `path:line` of the record.
    pub origin: String,
    pub problem_id: String,
    pub problem_type: String,
    pub answer: String,
    pub tokens: TokenizedExample,
    /// The videos in the order of their placeholder runs.
    pub videos: Vec<VlVideoPlan>,
}

/// [`prepare_vl_record`] without decoding: each video's header is read for its grid
/// ([`plan_video`]), and the record tokenized with those token counts. A missing video or an
/// unreadable container skips the record here; a frame that does not decode shows only when
/// the video is decoded.
pub fn plan_vl_record(
    file: &ReasonFile,
    i: usize,
    tok: &Tokenizer,
    settings: &VideoSettings,
    processor: &VideoProcessor,
    with_target: bool,
) -> std::result::Result<VlRecordPlan, VlSkip> {
    let origin = file.origin(i);
    let mut videos = Vec::new();
    for path in file.video_paths(i) {
        match plan_video(&path, &settings.sampling, processor) {
            Ok(plan) => videos.push(VlVideoPlan { path, plan }),
            Err(e) => return Err(VlSkip::Video(origin, e.to_string())),
        }
    }
    let merge = settings.processor.merge_size;
    let counts: Vec<usize> = videos
        .iter()
        .map(|v| v.plan.num_video_tokens(merge))
        .collect();
    let tokens = tokenize_record(file, i, tok, &counts, with_target)?;
    let record = &file.records[i];
    Ok(VlRecordPlan {
        origin,
        problem_id: record.problem_id.clone(),
        problem_type: record.problem_type.clone(),
        answer: record.answer.clone(),
        tokens,
        videos,
    })
}

/// Reads a LongVideo-Reason file and prepares every good record (module docs; `with_target` as
/// in [`tokenize_vl_record`]: SFT examples, or prompts for generation): malformed
/// records and records whose videos fail are skipped, each with a warning on stderr, and listed
/// in the report.
pub fn load_vl_examples(
    path: &Path,
    tok: &Tokenizer,
    settings: &VideoSettings,
    with_target: bool,
) -> Result<(Vec<VlExample>, VlLoadReport)> {
    collect(|f| stream_vl_examples(path, tok, settings, with_target, 0, 1, f))
}

/// [`load_vl_examples`] that hands each good record to `f` in file order as soon as it is ready
/// instead of holding them all: records are prepared (videos decoded and processed) on `workers`
/// threads (0: on the caller's), at most `depth` ahead of `f`, so about `depth + workers`
/// records' pixels at most are in memory at once. Skips are warned about and reported as there;
/// an error from `f` stops the stream and is returned.
pub fn stream_vl_examples<E: From<DataError>>(
    path: &Path,
    tok: &Tokenizer,
    settings: &VideoSettings,
    with_target: bool,
    workers: usize,
    depth: usize,
    f: impl FnMut(VlExample) -> std::result::Result<(), E>,
) -> std::result::Result<VlLoadReport, E> {
    stream_records(
        path,
        tok,
        settings,
        (workers, depth),
        move |file, i, tok, settings, processor| {
            prepare_vl_record(file, i, tok, settings, processor, with_target)
        },
        f,
    )
}

/// [`load_vl_examples`] with [`plan_vl_record`]: every good record's tokens and video plans,
/// no pixels (bad records and videos whose header fails are skipped and reported alike).
pub fn load_vl_plans(
    path: &Path,
    tok: &Tokenizer,
    settings: &VideoSettings,
    with_target: bool,
) -> Result<(Vec<VlRecordPlan>, VlLoadReport)> {
    collect(|f| {
        stream_records(
            path,
            tok,
            settings,
            (0, 1),
            move |file, i, tok, settings, processor| {
                plan_vl_record(file, i, tok, settings, processor, with_target)
            },
            f,
        )
    })
}

/// Every item a stream hands out, in order, with its report.
fn collect<T>(
    stream: impl FnOnce(&mut dyn FnMut(T) -> Result<()>) -> Result<VlLoadReport>,
) -> Result<(Vec<T>, VlLoadReport)> {
    let mut out = Vec::new();
    let report = stream(&mut |x| {
        out.push(x);
        Ok(())
    })?;
    Ok((out, report))
}

/// Every record of `path` through `prepare` on `workers` threads, at most `depth` ahead (see
/// [`stream_vl_examples`]), handed to `f` in file order; the skipped ones warned about and
/// reported.
fn stream_records<T: Send + 'static, E: From<DataError>>(
    path: &Path,
    tok: &Tokenizer,
    settings: &VideoSettings,
    (workers, depth): (usize, usize),
    prepare: impl Fn(
            &ReasonFile,
            usize,
            &Tokenizer,
            &VideoSettings,
            &VideoProcessor,
        ) -> std::result::Result<T, VlSkip>
        + Send
        + Sync
        + 'static,
    mut f: impl FnMut(T) -> std::result::Result<(), E>,
) -> std::result::Result<VlLoadReport, E> {
    let (file, bad) = ReasonFile::read_lenient(path)?;
    let mut report = VlLoadReport {
        bad_records: bad,
        ..Default::default()
    };
    for e in &report.bad_records {
        eprintln!("warning: skipping malformed record: {e}");
    }
    let processor = VideoProcessor::new(settings.processor.clone())
        .map_err(|e| DataError::config(path, e.to_string()))?;
    let file = std::sync::Arc::new(file);
    let n = file.records.len();
    let (origins, tok, settings) = (file.clone(), tok.clone(), settings.clone());
    let mut jobs = crate::video::Prefetcher::new((0..n).collect(), workers, depth, move |&i| {
        Ok(prepare(&file, i, &tok, &settings, &processor))
    });
    while let Some((i, prepared)) = jobs.next_result() {
        // A skip is the job's value; an error here is the job failing outright (a panic).
        let prepared = prepared.map_err(|e| VlSkip::Video(origins.origin(i), e.to_string()));
        match prepared.and_then(|p| p) {
            Ok(x) => f(x)?,
            Err(skip) => {
                eprintln!("warning: {skip}");
                match skip {
                    VlSkip::Record(e) => report.bad_records.push(e),
                    VlSkip::Video(origin, e) => report.skipped_videos.push((origin, e)),
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::char_tokenizer_with;
    use crate::video_synth::{write_synth_dataset, SynthVideoConfig};

    fn tok() -> Tokenizer {
        char_tokenizer_with(&VISION_SPECIAL_TOKENS)
    }

    fn record() -> ReasonRecord {
        ReasonRecord {
            problem_id: "p1".into(),
            problem: "Which?\nA. x\nB. y".into(),
            data_type: "video".into(),
            problem_type: "temporal".into(),
            reasoning: "saw x".into(),
            videos: vec!["v.avi".into()],
            answer: "B".into(),
        }
    }

    #[test]
    fn placeholder_run_is_expanded_and_only_the_target_is_labelled() {
        let tok = tok();
        let ex = tokenize_vl_record(&tok, &record(), &[6], true).unwrap();
        let pad = tok.token_to_id(VIDEO_PAD).unwrap();
        let start = tok.token_to_id("<|vision_start|>").unwrap();
        let end = tok.token_to_id("<|vision_end|>").unwrap();
        let at = ex.input_ids.iter().position(|&t| t == start).unwrap();
        assert_eq!(&ex.input_ids[at + 1..at + 7], &[pad; 6]);
        assert_eq!(ex.input_ids[at + 7], end);
        // The labelled tokens decode to the target and the end-of-turn marker.
        let labelled: Vec<u32> = ex
            .input_ids
            .iter()
            .zip(&ex.loss_mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        let text = tok.decode(&labelled, false).unwrap();
        assert_eq!(text, "<think>saw x</think><answer>B</answer><|im_end|>\n");
        // No video tokens are labelled.
        assert!(ex
            .input_ids
            .iter()
            .zip(&ex.loss_mask)
            .all(|(&t, &m)| !(m && t == pad)));
        // Without the target: the generation prompt, the SFT example's unlabelled prefix.
        let p = tokenize_vl_record(&tok, &record(), &[6], false).unwrap();
        assert!(p.loss_mask.iter().all(|&m| !m));
        let text = tok.decode(&p.input_ids, false).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
        assert!(ex.input_ids.starts_with(&p.input_ids));
        assert!(ex.loss_mask[..p.input_ids.len()].iter().all(|&m| !m));
        assert!(ex.loss_mask[p.input_ids.len()]);
        // Wrong number of videos: refused.
        assert!(tokenize_vl_record(&tok, &record(), &[3, 4], true)
            .unwrap_err()
            .contains("placeholders"));
        // A tokenizer without the token: refused.
        let e = tokenize_vl_record(&crate::synth::char_tokenizer(), &record(), &[6], true);
        assert!(e.unwrap_err().contains("video_pad"));
    }

    #[test]
    fn synth_data_loads_and_bad_records_and_videos_are_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SynthVideoConfig {
            videos: 3,
            frames: 8,
            width: 56,
            height: 56,
            held_out: 0.0,
            ..Default::default()
        };
        write_synth_dataset(&cfg, tmp.path()).unwrap();
        let jsonl = tmp.path().join("train.jsonl");
        let mut text = std::fs::read_to_string(&jsonl).unwrap();
        // A malformed line (line 4) and a record whose video is missing (line 5).
        text.push_str("{\"problem_id\": 1}\n");
        let mut r = record();
        r.problem_id = "missing".into();
        r.videos = vec!["videos/nope.avi".into()];
        text.push_str(&r.to_json_line());
        text.push('\n');
        std::fs::write(&jsonl, text).unwrap();
        let settings = VideoSettings {
            sampling: FrameSampling::Uniform { frames: 4 },
            processor: VideoProcessorConfig {
                min_pixels: 28 * 28,
                max_pixels: 56 * 56,
                ..Default::default()
            },
        };
        let (ex, report) = load_vl_examples(&jsonl, &tok(), &settings, true).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(report.bad_records.len(), 1);
        assert!(report.bad_records[0].to_string().contains(":4:"));
        assert_eq!(report.skipped_videos.len(), 1);
        assert!(report.skipped_videos[0].0.ends_with(":5"));
        assert!(report.skipped_videos[0].1.contains("nope.avi"));
        let pad = tok().token_to_id(VIDEO_PAD).unwrap();
        for e in &ex {
            let v = &e.videos[0].inputs;
            let n = e.tokens.input_ids.iter().filter(|&&t| t == pad).count();
            assert_eq!(n, v.num_video_tokens(2));
            assert_eq!(v.video_grid_thw[0], 2);
            assert!(v.second_per_grid_ts > 0.0);
            assert_eq!(e.videos[0].content_hash.len(), 64);
        }
        // Streamed on worker threads: the same records in the same order, the same report, and
        // an error from the consumer stops the stream.
        for (workers, depth) in [(0, 1), (2, 1), (3, 2)] {
            let mut got = Vec::new();
            let rep = stream_vl_examples::<DataError>(
                &jsonl,
                &tok(),
                &settings,
                true,
                workers,
                depth,
                |e| {
                    got.push(e);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(got.len(), ex.len(), "workers {workers}");
            for (a, b) in got.iter().zip(&ex) {
                assert_eq!(a.problem_id, b.problem_id);
                assert_eq!(a.tokens.input_ids, b.tokens.input_ids);
                assert_eq!(
                    a.videos[0].inputs.pixel_values_videos,
                    b.videos[0].inputs.pixel_values_videos
                );
            }
            assert_eq!(rep.bad_records.len(), 1);
            assert_eq!(rep.skipped_videos, report.skipped_videos);
            let mut calls = 0;
            let stopped =
                stream_vl_examples(&jsonl, &tok(), &settings, true, workers, depth, |_| {
                    calls += 1;
                    Err(DataError::config(&jsonl, "stop".to_string()))
                });
            assert!(stopped.unwrap_err().to_string().contains("stop"));
            assert_eq!(calls, 1);
        }
    }
}
