//! Prompt sets for RL and accuracy evaluation: one JSONL line per question, with its answer.
//!
//! Two forms are accepted on any line:
//!
//! - a LongVideo-Reason record (`problem`, `answer` as `<answer>X</answer>`, `problem_id`,
//!   `problem_type`, `data_type`, `videos`, …; see `reel_data::ReasonRecord`). The text decoder
//!   sees `problem` followed by the `<think>/<answer>` instruction; its `videos` are **ignored**
//!   (counted in [`PromptSet::ignored_videos`], and the CLI says so), since a text model has no
//!   vision tower;
//! - a plain record `{"prompt": "…"}` or `{"messages": [{"role", "content"}, …]}` with
//!   `"answer"` (a string or a number) and optional `"problem_type"` and `"problem_id"`.
//!
//! The prompt is the chat template's rendering with the generation prompt appended, tokenized.
//! Errors name the file and line.

use anyhow::{bail, Context, Result};
use reel_data::{prompt_ids, Message, ReasonRecord, Tokenizer, REASONING_INSTRUCTION};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One question: its tokenized prompt and what the reward compares a response with.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptItem {
    /// The prompt's text (the last user turn), given to reward commands.
    pub text: String,
    /// Token ids of the rendered prompt (generation prompt included).
    pub ids: Vec<u32>,
    /// The reference answer (`<answer>X</answer>` or bare).
    pub answer: String,
    /// Category for per-type accuracy ("" when the record has none).
    pub problem_type: String,
    /// The record's id, or `line N`.
    pub problem_id: String,
}

/// A prompt file, read and tokenized.
#[derive(Clone, Debug)]
pub struct PromptSet {
    pub path: PathBuf,
    pub items: Vec<PromptItem>,
    /// LongVideo-Reason records whose `videos` were ignored (the text model cannot see them).
    pub ignored_videos: usize,
}

fn plain_record(v: &Value) -> std::result::Result<(Vec<Message>, String, String, String), String> {
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    let messages = if let Some(p) = obj.get("prompt") {
        let p = p.as_str().ok_or("`prompt` must be a string")?;
        vec![Message::user(p)]
    } else if let Some(m) = obj.get("messages") {
        serde_json::from_value::<Vec<Message>>(m.clone()).map_err(|e| format!("`messages`: {e}"))?
    } else {
        return Err("needs `problem` (LongVideo-Reason), `prompt` or `messages`".into());
    };
    if messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    let answer = match obj.get("answer") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("`answer` must be a string or a number".into()),
        None => return Err("missing `answer`".into()),
    };
    let field = |k: &str| -> std::result::Result<String, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(_) => Err(format!("`{k}` must be a string")),
        }
    };
    Ok((
        messages,
        answer,
        field("problem_type")?,
        field("problem_id")?,
    ))
}

impl PromptSet {
    /// Reads and tokenizes `path`; prompts longer than `max_prompt_len` tokens are refused
    /// (naming the line), as is an empty file.
    pub fn read(path: &Path, tok: &Tokenizer, max_prompt_len: usize) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut items = Vec::new();
        let mut ignored_videos = 0;
        for (i, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", path.display(), i + 1);
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{}: bad JSON", at()))?;
            let (messages, answer, problem_type, problem_id) = if v.get("problem").is_some() {
                let r =
                    ReasonRecord::from_json(&v).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
                if !r.videos.is_empty() {
                    ignored_videos += 1;
                }
                let prompt = format!("{}\n{}", r.problem.trim_end(), REASONING_INSTRUCTION);
                (
                    vec![Message::user(prompt)],
                    r.answer_field(),
                    r.problem_type,
                    r.problem_id,
                )
            } else {
                plain_record(&v).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?
            };
            let ids = prompt_ids(tok, &messages).with_context(|| format!("{}: prompt", at()))?;
            if ids.is_empty() || ids.len() > max_prompt_len {
                bail!(
                    "{}: the prompt has {} tokens; 1 to {max_prompt_len} allowed \
                     (data.max_prompt_len)",
                    at(),
                    ids.len()
                );
            }
            let text = messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map_or_else(String::new, |m| m.content.clone());
            items.push(PromptItem {
                text,
                ids,
                answer,
                problem_type,
                problem_id: if problem_id.is_empty() {
                    format!("line {}", i + 1)
                } else {
                    problem_id
                },
            });
        }
        if items.is_empty() {
            bail!("{}: no prompts", path.display());
        }
        Ok(PromptSet {
            path: path.to_path_buf(),
            items,
            ignored_videos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_forms_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let tok = reel_data::char_tokenizer();
        let p = dir.path().join("p.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"add: 1+2\", \"answer\": 3, \"problem_type\": \"add\"}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"reverse: ab\"}], \"answer\": \"ba\"}\n\
             {\"problem_id\": \"q1\", \"problem\": \"what? A. x B. y\", \"answer\": \"<answer>B</answer>\", \
              \"problem_type\": \"mc\", \"data_type\": \"video\", \"videos\": [\"v.avi\"]}\n",
        )
        .unwrap();
        let set = PromptSet::read(&p, &tok, 512).unwrap();
        assert_eq!(set.items.len(), 3);
        assert_eq!(set.items[0].answer, "3");
        assert_eq!(set.items[0].problem_type, "add");
        assert_eq!(set.items[1].problem_id, "line 2");
        assert_eq!(set.items[2].answer, "<answer>B</answer>");
        assert_eq!(set.ignored_videos, 1);
        assert!(set.items[2].text.contains("<think>"));

        std::fs::write(&p, "{\"prompt\": \"x\"}\n").unwrap();
        let e = format!("{:#}", PromptSet::read(&p, &tok, 512).unwrap_err());
        assert!(e.contains("p.jsonl:1") && e.contains("answer"), "{e}");
        std::fs::write(&p, "{\"prompt\": \"xxxxxxxx\", \"answer\": \"1\"}\n").unwrap();
        let e = format!("{:#}", PromptSet::read(&p, &tok, 4).unwrap_err());
        assert!(e.contains("max_prompt_len"), "{e}");
    }
}
