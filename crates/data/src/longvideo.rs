//! LongVideo-Reason JSONL: one video question per line, with a reasoning trace for SFT.
//!
//! ```json
//! {"problem_id": "synth-00012", "problem": "Which shape appeared first?\nA. the circle\nB. …",
//!  "data_type": "video", "problem_type": "temporal", "reasoning": "At t=0.5s a red circle …",
//!  "videos": ["videos/synth-00012.avi"], "answer": "<answer>A</answer>"}
//! ```
//!
//! Fields: `problem_id` (string or integer, unique in the file), `problem` (the question; a
//! multiple-choice one lists its options on lines `A. …`, `B. …`), `problem_type` (temporal,
//! counting, spatial, plot, goal, …), `videos` (one path or a list; relative paths are relative
//! to the JSONL file's folder), `answer` (`<answer>X</answer>`; with options, X is one of their
//! letters). Optional: `data_type` (default `"video"`), `reasoning` (the chain of thought; needed
//! only for SFT). Unknown fields are ignored.
//!
//! Prompt ([`ReasonRecord::prompt`]): one [`VIDEO_PLACEHOLDER`] per video, then the problem,
//! then [`REASONING_INSTRUCTION`] on its own line. SFT target ([`ReasonRecord::sft_target`]):
//! `<think>{reasoning}</think><answer>{X}</answer>`, the format the GRPO format reward checks.
//!
//! Train/held-out split: a record is held out when a seeded SHA-256 of its `problem_id` falls
//! under the held-out fraction ([`is_held_out`]) — independent of file order, stable as the file
//! grows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::chat::Message;
use crate::video::{FrameSampling, Video};
use crate::{DataError, Result};

/// Stands for one video in the prompt: Qwen2.5-VL's rendering of a `{"type": "video"}` content
/// item. The model expands `<|video_pad|>` into the video's tokens.
pub const VIDEO_PLACEHOLDER: &str = "<|vision_start|><|video_pad|><|vision_end|>";

/// The instruction after each question: think first, then answer in tags.
pub const REASONING_INSTRUCTION: &str = "Watch the whole video, think step by step inside \
<think> </think> tags, then give the letter of the correct option inside <answer> </answer> tags.";

/// One LongVideo-Reason record (see the module docs for the fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasonRecord {
    pub problem_id: String,
    pub problem: String,
    pub data_type: String,
    pub problem_type: String,
    /// Empty when the record has none (fine for evaluation and RL, not for SFT).
    pub reasoning: String,
    /// Video paths as written in the file.
    pub videos: Vec<String>,
    /// What is inside `<answer>…</answer>` (an option letter for multiple choice).
    pub answer: String,
}

/// The letters of the options a problem lists on lines `A. …`, `B) …`, `(C) …` or `D: …`.
pub fn option_letters(problem: &str) -> Vec<char> {
    let mut out = Vec::new();
    for line in problem.lines() {
        let l = line.trim_start().as_bytes();
        let letter = match l {
            [b'(', c, b')', ..] if c.is_ascii_uppercase() => Some(*c),
            [c, b'.' | b')' | b':', rest @ ..]
                if c.is_ascii_uppercase() && (rest.is_empty() || rest[0] == b' ') =>
            {
                Some(*c)
            }
            _ => None,
        };
        if let Some(c) = letter {
            if !out.contains(&(c as char)) {
                out.push(c as char);
            }
        }
    }
    out
}

/// The text inside `<answer>…</answer>` (surrounding whitespace allowed), trimmed.
pub fn parse_answer_tag(s: &str) -> Option<&str> {
    let inner = s
        .trim()
        .strip_prefix("<answer>")?
        .strip_suffix("</answer>")?
        .trim();
    (!inner.is_empty() && !inner.contains("<answer>")).then_some(inner)
}

impl ReasonRecord {
    /// The user turn: a video placeholder per video, the problem, the reasoning instruction.
    pub fn prompt(&self) -> String {
        format!(
            "{}{}\n{}",
            VIDEO_PLACEHOLDER.repeat(self.videos.len().max(1)),
            self.problem.trim_end(),
            REASONING_INSTRUCTION
        )
    }

    /// The assistant turn SFT trains on: `<think>{reasoning}</think><answer>{answer}</answer>`.
    /// Errors when the record has no reasoning.
    pub fn sft_target(&self) -> std::result::Result<String, String> {
        if self.reasoning.trim().is_empty() {
            return Err(format!(
                "record {} has no reasoning to train on",
                self.problem_id
            ));
        }
        Ok(format!(
            "<think>{}</think><answer>{}</answer>",
            self.reasoning.trim(),
            self.answer
        ))
    }

    /// `[user: prompt]`, plus `[assistant: sft_target]` when `with_target`.
    pub fn messages(&self, with_target: bool) -> std::result::Result<Vec<Message>, String> {
        let mut m = vec![Message::user(self.prompt())];
        if with_target {
            m.push(Message::assistant(self.sft_target()?));
        }
        Ok(m)
    }

    /// The `answer` field as written (`<answer>X</answer>`).
    pub fn answer_field(&self) -> String {
        format!("<answer>{}</answer>", self.answer)
    }

    /// Parses one JSON line; `Err` lists every problem with the record, joined by `; `.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let Some(obj) = v.as_object() else {
            return Err("a record must be a JSON object".into());
        };
        let mut errs: Vec<String> = Vec::new();
        let mut text = |k: &str, required: bool| -> String {
            match obj.get(k) {
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                Some(Value::String(_)) if !required => String::new(),
                None | Some(Value::Null) if !required => String::new(),
                None | Some(Value::Null) => {
                    errs.push(format!("missing `{k}`"));
                    String::new()
                }
                Some(Value::String(_)) => {
                    errs.push(format!("`{k}` is empty"));
                    String::new()
                }
                Some(other) => {
                    errs.push(format!("`{k}` must be a string, got {}", kind(other)));
                    String::new()
                }
            }
        };
        let problem = text("problem", true);
        let problem_type = text("problem_type", true);
        let reasoning = text("reasoning", false);
        let mut data_type = text("data_type", false);
        if data_type.is_empty() {
            data_type = "video".into();
        }
        let answer_raw = text("answer", true);
        let problem_id = match obj.get("problem_id") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            None | Some(Value::Null) => {
                errs.push("missing `problem_id`".into());
                String::new()
            }
            Some(other) => {
                errs.push(format!(
                    "`problem_id` must be a non-empty string or an integer, got {}",
                    kind(other)
                ));
                String::new()
            }
        };
        let videos = match obj.get("videos") {
            Some(Value::String(s)) if !s.trim().is_empty() => vec![s.clone()],
            Some(Value::Array(a))
                if !a.is_empty()
                    && a.iter()
                        .all(|x| x.as_str().is_some_and(|s| !s.trim().is_empty())) =>
            {
                a.iter()
                    .map(|x| x.as_str().unwrap_or_default().to_string())
                    .collect()
            }
            None | Some(Value::Null) => {
                errs.push("missing `videos`".into());
                Vec::new()
            }
            Some(_) => {
                errs.push("`videos` must be a path or a non-empty list of paths".into());
                Vec::new()
            }
        };
        let mut answer = String::new();
        if !answer_raw.is_empty() {
            match parse_answer_tag(&answer_raw) {
                None => errs.push(format!(
                    "`answer` must be `<answer>X</answer>`, got {answer_raw:?}"
                )),
                Some(a) => {
                    let opts = option_letters(&problem);
                    let letter = a.chars().next().filter(|_| a.chars().count() == 1);
                    if !opts.is_empty() && !letter.is_some_and(|c| opts.contains(&c)) {
                        let opts: String = opts.iter().collect();
                        errs.push(format!(
                            "answer {a:?} is not one of the problem's options ({opts})"
                        ));
                    }
                    answer = a.to_string();
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs.join("; "));
        }
        Ok(ReasonRecord {
            problem_id,
            problem,
            data_type,
            problem_type,
            reasoning,
            videos,
            answer,
        })
    }

    /// The JSON object written for this record (fields in the documented order).
    pub fn to_json_line(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            problem_id: &'a str,
            problem: &'a str,
            data_type: &'a str,
            problem_type: &'a str,
            reasoning: &'a str,
            videos: &'a [String],
            answer: String,
        }
        serde_json::to_string(&Line {
            problem_id: &self.problem_id,
            problem: &self.problem,
            data_type: &self.data_type,
            problem_type: &self.problem_type,
            reasoning: &self.reasoning,
            videos: &self.videos,
            answer: self.answer_field(),
        })
        .expect("strings always serialise")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The records of a LongVideo-Reason file, each with its 1-based line.
#[derive(Clone, Debug, PartialEq)]
pub struct ReasonFile {
    pub path: PathBuf,
    pub lines: Vec<usize>,
    pub records: Vec<ReasonRecord>,
}

impl ReasonFile {
    /// Reads `path`; the first bad record is an error naming `path:line`.
    pub fn read(path: &Path) -> Result<Self> {
        let (file, mut errors) = Self::read_lenient(path)?;
        if errors.is_empty() {
            Ok(file)
        } else {
            Err(errors.swap_remove(0))
        }
    }

    /// Reads `path`, keeping the good records and returning one `path:line: what is wrong`
    /// error per bad record (bad JSON, missing or mistyped fields, a malformed answer, an answer
    /// that is not an option, a repeated `problem_id`). Only an unreadable file is an `Err`.
    pub fn read_lenient(path: &Path) -> Result<(Self, Vec<DataError>)> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let mut file = ReasonFile {
            path: path.to_path_buf(),
            lines: Vec::new(),
            records: Vec::new(),
        };
        let mut errors = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let err = |line, msg: String| DataError::Jsonl {
            path: path.to_path_buf(),
            line,
            msg,
        };
        for (k, line) in text.lines().enumerate() {
            let ln = k + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(err(ln, format!("not valid JSON: {e}")));
                    continue;
                }
            };
            match ReasonRecord::from_json(&v) {
                Err(msg) => errors.push(err(ln, msg)),
                Ok(r) => {
                    if let Some(first) = seen.get(&r.problem_id) {
                        errors.push(err(
                            ln,
                            format!("problem_id {:?} already used on line {first}", r.problem_id),
                        ));
                        continue;
                    }
                    seen.insert(r.problem_id.clone(), ln);
                    file.lines.push(ln);
                    file.records.push(r);
                }
            }
        }
        Ok((file, errors))
    }

    /// `path:line` of record `i`.
    pub fn origin(&self, i: usize) -> String {
        format!("{}:{}", self.path.display(), self.lines[i])
    }

    /// The folder relative video paths are taken from.
    pub fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Record `i`'s video paths, resolved against [`base_dir`](Self::base_dir).
    pub fn video_paths(&self, i: usize) -> Vec<PathBuf> {
        let base = self.base_dir();
        self.records[i]
            .videos
            .iter()
            .map(|v| resolve(&base, v))
            .collect()
    }

    /// Indices of `(train, held_out)` records under [`is_held_out`].
    pub fn split(&self, held_out_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        (0..self.records.len())
            .partition(|&i| !is_held_out(&self.records[i].problem_id, held_out_fraction, seed))
    }
}

fn resolve(base: &Path, v: &str) -> PathBuf {
    let p = Path::new(v);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Whether `problem_id` belongs to the held-out split: the first 8 bytes of
/// `SHA-256(seed as u64 little-endian ‖ problem_id)`, read as a fraction of 2⁶⁴, fall below
/// `held_out_fraction`.
pub fn is_held_out(problem_id: &str, held_out_fraction: f64, seed: u64) -> bool {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(problem_id.as_bytes());
    let d = h.finalize();
    let u = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    ((u >> 11) as f64 / (1u64 << 53) as f64) < held_out_fraction
}

/// Writes records as LongVideo-Reason JSONL (one [`ReasonRecord::to_json_line`] a line).
pub fn write_reason_jsonl(path: &Path, records: &[ReasonRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_json_line());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| DataError::io(path, e))
}

/// How far [`validate_reason_file`] checks each record's videos.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoCheck {
    /// Fields only.
    None,
    /// The video file or folder exists.
    Exists,
    /// It opens and 4 frames spread over it decode.
    Sample,
    /// It opens and every frame decodes.
    Full,
}

/// Checks every record of `path` (fields, answer format) and, per `check`, its videos (each
/// distinct video once). Returns the records read and one `path:line: …` error per bad record;
/// only an unreadable file is an `Err`.
pub fn validate_reason_file(
    path: &Path,
    check: VideoCheck,
) -> Result<(ReasonFile, Vec<DataError>)> {
    let (file, mut errors) = ReasonFile::read_lenient(path)?;
    let mut verdicts: HashMap<PathBuf, Option<String>> = HashMap::new();
    for i in 0..file.records.len() {
        if check == VideoCheck::None {
            break;
        }
        for v in file.video_paths(i) {
            let verdict = verdicts
                .entry(v.clone())
                .or_insert_with(|| check_video(&v, check).err());
            if let Some(msg) = verdict {
                errors.push(DataError::Jsonl {
                    path: path.to_path_buf(),
                    line: file.lines[i],
                    msg: format!("video {msg}"),
                });
            }
        }
    }
    errors.sort_by_key(|e| match e {
        DataError::Jsonl { line, .. } => *line,
        _ => 0,
    });
    Ok((file, errors))
}

fn check_video(path: &Path, check: VideoCheck) -> std::result::Result<(), String> {
    if !path.exists() {
        return Err(format!("{}: not found", path.display()));
    }
    let sampling = match check {
        VideoCheck::None | VideoCheck::Exists => return Ok(()),
        VideoCheck::Sample => FrameSampling::Uniform { frames: 4 },
        VideoCheck::Full => FrameSampling::All,
    };
    Video::open(path)
        .and_then(|v| v.sample(&sampling))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Value {
        serde_json::json!({
            "problem_id": "q1",
            "problem": "Which shape appeared first?\nA. the circle\nB. the square\nC. the triangle\nD. the star",
            "data_type": "video",
            "problem_type": "temporal",
            "reasoning": "The circle appeared at t=0.5s, before the others.",
            "videos": ["v/q1.avi"],
            "answer": "<answer>A</answer>",
        })
    }

    #[test]
    fn options_and_answer_tags() {
        assert_eq!(
            option_letters("Q?\nA. x\nB) y\n(C) z\nD: w\nAnd more"),
            vec!['A', 'B', 'C', 'D']
        );
        assert_eq!(parse_answer_tag(" <answer> B </answer>\n"), Some("B"));
        assert_eq!(parse_answer_tag("B"), None);
        assert_eq!(parse_answer_tag("<answer></answer>"), None);
    }

    #[test]
    fn record_round_trip_prompt_and_target() {
        let r = ReasonRecord::from_json(&good()).unwrap();
        assert_eq!(r.answer, "A");
        let back = ReasonRecord::from_json(&serde_json::from_str(&r.to_json_line()).unwrap());
        assert_eq!(back.unwrap(), r);
        let p = r.prompt();
        assert!(p.starts_with(VIDEO_PLACEHOLDER));
        assert!(p.contains("D. the star\n"));
        assert!(p.ends_with(REASONING_INSTRUCTION));
        assert_eq!(
            r.sft_target().unwrap(),
            "<think>The circle appeared at t=0.5s, before the others.</think><answer>A</answer>"
        );
        let m = r.messages(true).unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[1].role.as_str()),
            ("user", "assistant")
        );
        // Integer ids and a single path are accepted; reasoning is optional (not for SFT).
        let mut v = good();
        v["problem_id"] = serde_json::json!(17);
        v["videos"] = serde_json::json!("a.mp4");
        v.as_object_mut().unwrap().remove("reasoning");
        let r = ReasonRecord::from_json(&v).unwrap();
        assert_eq!((r.problem_id.as_str(), r.videos.len()), ("17", 1));
        assert!(r.sft_target().is_err());
    }

    #[test]
    fn every_problem_of_a_record_is_named() {
        let mut v = good();
        v["answer"] = serde_json::json!("B");
        v.as_object_mut().unwrap().remove("problem_type");
        v["videos"] = serde_json::json!([]);
        let e = ReasonRecord::from_json(&v).unwrap_err();
        assert!(e.contains("missing `problem_type`"), "{e}");
        assert!(e.contains("`videos` must be"), "{e}");
        assert!(e.contains("`answer` must be `<answer>X</answer>`"), "{e}");
        let mut v = good();
        v["answer"] = serde_json::json!("<answer>E</answer>");
        let e = ReasonRecord::from_json(&v).unwrap_err();
        assert!(e.contains("not one of the problem's options (ABCD)"), "{e}");
    }

    #[test]
    fn bad_lines_reported_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let good_line = good().to_string();
        let mut no_answer = good();
        no_answer.as_object_mut().unwrap().remove("answer");
        no_answer["problem_id"] = "q2".into();
        let mut two = good();
        two["problem_id"] = "q3".into();
        let text = [
            good_line.as_str(),
            "",
            "{not json",
            &no_answer.to_string(),
            &good_line, // duplicate id
            &two.to_string(),
        ]
        .join("\n");
        std::fs::write(&path, text).unwrap();
        let (f, errs) = ReasonFile::read_lenient(&path).unwrap();
        assert_eq!(f.lines, vec![1, 6]);
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let p = path.display();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(
            msgs[0].starts_with(&format!("{p}:3: not valid JSON")),
            "{msgs:?}"
        );
        assert_eq!(msgs[1], format!("{p}:4: missing `answer`"));
        assert_eq!(
            msgs[2],
            format!("{p}:5: problem_id \"q1\" already used on line 1")
        );
        let e = ReasonFile::read(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{p}:3:")), "{e}");
        assert_eq!(f.video_paths(0), vec![dir.path().join("v/q1.avi")]);
        // Videos: missing ones are named with the record's line.
        let (_, errs) = validate_reason_file(&path, VideoCheck::Exists).unwrap();
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 5, "{msgs:?}");
        assert!(msgs[0].starts_with(&format!("{p}:1: video ")), "{msgs:?}");
        assert!(msgs[0].ends_with("q1.avi: not found"), "{msgs:?}");
        assert!(msgs[4].starts_with(&format!("{p}:6: video ")), "{msgs:?}");
    }

    #[test]
    fn split_is_seeded_stable_and_near_the_fraction() {
        let ids: Vec<String> = (0..2000).map(|i| format!("id-{i}")).collect();
        let held: Vec<bool> = ids.iter().map(|i| is_held_out(i, 0.1, 7)).collect();
        let n = held.iter().filter(|&&h| h).count();
        assert!((150..250).contains(&n), "{n} of 2000 held out at 10%");
        // Same seed → same split; another seed → another split.
        assert_eq!(
            held,
            ids.iter()
                .map(|i| is_held_out(i, 0.1, 7))
                .collect::<Vec<_>>()
        );
        assert_ne!(
            held,
            ids.iter()
                .map(|i| is_held_out(i, 0.1, 8))
                .collect::<Vec<_>>()
        );
        assert!(!ids.iter().any(|i| is_held_out(i, 0.0, 7)));
        assert!(ids.iter().all(|i| is_held_out(i, 1.0, 7)));
    }
}
