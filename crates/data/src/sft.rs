//! Supervised fine-tuning data: JSONL conversations and their tokenization with a loss mask.
//!
//! Each non-blank line is `{"messages": [{"role": ..., "content": ...}, ...]}` or
//! `{"prompt": ..., "response": ...}` (= `[user: prompt, assistant: response]`).
//!
//! Loss mask rule (shared with the Python fixture script, keep the two identical): the text is
//! `render(messages, add_generation_prompt=false)`; assistant message `i` owns the byte span
//! `[len(render(messages[..i], true)), len(render(messages[..=i], false)))` — its content and the
//! `<|im_end|>\n` after it — and a token is trained on iff its start offset lies in such a span.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::Message;
use crate::tokenizer::Tokenizer;
use crate::{DataError, Result};

/// Roles a conversation may use.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One tokenized conversation: `loss_mask[k]` says whether token `k` is trained on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens in the loss mask.
    pub fn n_loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// The conversations of an SFT JSONL file with the (1-based) line each came from, so that later
/// errors (a template that fails on one conversation) can name `path:line` too.
#[derive(Clone, Debug, PartialEq)]
pub struct SftFile {
    pub path: std::path::PathBuf,
    pub lines: Vec<usize>,
    pub conversations: Vec<Vec<Message>>,
}

impl SftFile {
    /// Reads the file; the first malformed line is an error naming `path:line`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let mut file = SftFile {
            path: path.to_path_buf(),
            lines: Vec::new(),
            conversations: Vec::new(),
        };
        for (k, line) in text.lines().enumerate() {
            if let Some(conv) = parse_line(path, k + 1, line)? {
                file.lines.push(k + 1);
                file.conversations.push(conv);
            }
        }
        Ok(file)
    }

    /// `path:line` of conversation `i`.
    pub fn origin(&self, i: usize) -> String {
        format!("{}:{}", self.path.display(), self.lines[i])
    }
}

/// Read an SFT JSONL file; the first malformed line is an error naming `path:line`.
pub fn read_sft_jsonl(path: &Path) -> Result<Vec<Vec<Message>>> {
    SftFile::read(path).map(|f| f.conversations)
}

/// Like [`read_sft_jsonl`] but skips malformed lines, returning their errors beside the good
/// conversations (for a caller that warns and goes on). Only an unreadable file is an error.
pub fn read_sft_jsonl_lenient(path: &Path) -> Result<(Vec<Vec<Message>>, Vec<DataError>)> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (k, line) in text.lines().enumerate() {
        match parse_line(path, k + 1, line) {
            Ok(Some(conv)) => out.push(conv),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    Ok((out, errors))
}

/// One JSONL line (1-based `line`): `None` for a blank line.
fn parse_line(path: &Path, line: usize, text: &str) -> Result<Option<Vec<Message>>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    parse_conversation(text)
        .map(Some)
        .map_err(|msg| DataError::Jsonl {
            path: path.to_path_buf(),
            line,
            msg,
        })
}

fn parse_conversation(text: &str) -> std::result::Result<Vec<Message>, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object".into());
    };
    let messages = if let Some(list) = obj.get("messages") {
        let Value::Array(list) = list else {
            return Err("`messages` must be a list".into());
        };
        let mut messages = Vec::with_capacity(list.len());
        for (k, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) => messages.push(Message::new(role, content)),
                _ => {
                    return Err(format!(
                        "messages[{k}] needs string `role` and `content` fields"
                    ))
                }
            }
        }
        messages
    } else {
        let prompt = obj.get("prompt").and_then(Value::as_str);
        let response = obj.get("response").and_then(Value::as_str);
        match (prompt, response) {
            (Some(p), Some(r)) => vec![Message::user(p), Message::assistant(r)],
            _ => return Err("expected `messages` or string `prompt` and `response` fields".into()),
        }
    };
    if let Some(m) = messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
        return Err(format!(
            "unknown role `{}` (expected one of {})",
            m.role,
            ROLES.join(", ")
        ));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant message".into());
    }
    Ok(messages)
}

/// Render `messages` with the tokenizer's chat template, tokenize, and mask in the assistant
/// turns (content plus the end-of-turn marker), by the rule in this module's doc.
pub fn tokenize_conversation(tok: &Tokenizer, messages: &[Message]) -> Result<TokenizedExample> {
    let template = tok.chat_template();
    let text = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prefix = template.render(&messages[..i], true)?;
        if !text.starts_with(&prefix) {
            return Err(DataError::Conversation(format!(
                "message {i}: the template's rendering of the turns before it plus the \
                 generation prompt is not a prefix of the whole conversation, so its assistant \
                 span is undefined"
            )));
        }
        let through = template.render(&messages[..=i], false)?;
        if !text.starts_with(&through) {
            return Err(DataError::Conversation(format!(
                "message {i}: the template renders the conversation up to this assistant turn \
                 differently from the whole conversation (e.g. it rewrites earlier turns), so \
                 where the turn ends is undefined; refusing rather than training on the wrong \
                 tokens"
            )));
        }
        spans.push((prefix.len(), through.len()));
    }
    let (input_ids, offsets) = tok.encode_with_offsets(&text)?;
    let loss_mask = offsets
        .iter()
        .map(|&(start, _)| spans.iter().any(|&(a, b)| a <= start && start < b))
        .collect();
    Ok(TokenizedExample {
        input_ids,
        loss_mask,
    })
}

/// The prompt for generation: `encode(render(messages, add_generation_prompt=true))`.
pub fn prompt_ids(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    tok.encode(&tok.chat_template().render(messages, true)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused() {
        // The last assistant turn is rendered with an extra marker that earlier renderings lack.
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last and \
                   m.role == 'assistant' %}[final]{% endif %}{{ m.content }}<|im_end|>\n\
                   {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let mut tok = crate::synth::char_tokenizer();
        tok.set_chat_template(crate::chat::ChatTemplate::new(src).unwrap());
        let conv = vec![
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
            Message::assistant("d"),
        ];
        let err = tokenize_conversation(&tok, &conv).unwrap_err().to_string();
        assert!(err.contains("message 1"), "{err}");
    }
    use crate::chat::ChatTemplate;
    use crate::synth::char_tokenizer;

    /// The masked tokens, decoded run by run.
    fn masked_runs(tok: &Tokenizer, ex: &TokenizedExample) -> Vec<String> {
        let mut runs = Vec::new();
        let mut cur = Vec::new();
        for (&id, &m) in ex.input_ids.iter().zip(&ex.loss_mask) {
            if m {
                cur.push(id);
            } else if !cur.is_empty() {
                runs.push(tok.decode(&cur, false).unwrap());
                cur.clear();
            }
        }
        if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
        }
        runs
    }

    fn two_rounds() -> Vec<Message> {
        vec![
            Message::system("be terse"),
            Message::user("reverse: abc"),
            Message::assistant("cba"),
            Message::user("sort: 312"),
            Message::assistant("123"),
        ]
    }

    #[test]
    fn loss_mask_covers_assistant_content_and_end_marker() {
        let tok = char_tokenizer();
        let ex = tokenize_conversation(&tok, &two_rounds()).unwrap();
        assert_eq!(ex.input_ids.len(), ex.loss_mask.len());
        assert_eq!(
            masked_runs(&tok, &ex),
            vec!["cba<|im_end|>\n".to_string(), "123<|im_end|>\n".to_string()]
        );
        // Everything decodes back to the rendered text, and the unmasked part is the rest.
        let text = tok.chat_template().render(&two_rounds(), false).unwrap();
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), text);
        assert_eq!(ex.n_loss_tokens(), 2 * (3 + 2));
    }

    #[test]
    fn loss_mask_with_a_template_that_adds_a_system_turn() {
        // A template that inserts a default system message when there is none: the span rule
        // still picks exactly the assistant turns.
        let src = "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nsys<|im_end|>\n{% endif %}\
                   {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                   {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let mut tok = char_tokenizer();
        tok.set_chat_template(ChatTemplate::new(src).unwrap());
        let msgs = vec![Message::user("add: 1+2"), Message::assistant("3")];
        let ex = tokenize_conversation(&tok, &msgs).unwrap();
        assert_eq!(masked_runs(&tok, &ex), vec!["3<|im_end|>\n".to_string()]);
    }

    #[test]
    fn non_prefix_template_is_an_error() {
        // The generation prompt differs from what the full rendering puts before the answer.
        let src = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}\
                   {% if add_generation_prompt %}<gen>{% endif %}";
        let mut tok = char_tokenizer();
        tok.set_chat_template(ChatTemplate::new(src).unwrap());
        let msgs = vec![Message::user("a"), Message::assistant("b")];
        let err = tokenize_conversation(&tok, &msgs).unwrap_err().to_string();
        assert!(err.contains("message 1"), "{err}");
    }

    #[test]
    fn prompt_ids_end_with_the_assistant_header() {
        let tok = char_tokenizer();
        let ids = prompt_ids(&tok, &[Message::user("sort: 21")]).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>user\nsort: 21<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
        std::fs::write(&path, format!("{good}\n\n{{\"messages\": [oops\n{good}\n")).unwrap();
        let err = read_sft_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("train.jsonl:3"), "{err}");
        assert!(err.contains(":3:"), "{err}");

        let (convs, errors) = read_sft_jsonl_lenient(&path).unwrap();
        assert_eq!(convs.len(), 2);
        assert_eq!(errors.len(), 1);
        assert!(matches!(errors[0], DataError::Jsonl { line: 3, .. }));
    }

    #[test]
    fn jsonl_rejects_bad_conversations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        let cases = [
            (
                r#"{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
                "unknown role",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                "no assistant",
            ),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0]"),
            (r#"{"prompt": "x"}"#, "prompt"),
            (r#"[1, 2]"#, "object"),
        ];
        for (line, want) in cases {
            std::fs::write(&path, format!("\n{line}\n")).unwrap();
            let err = read_sft_jsonl(&path).unwrap_err().to_string();
            assert!(err.contains("bad.jsonl:2: ") && err.contains(want), "{err}");
        }
        let err = read_sft_jsonl(&dir.path().join("missing.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.jsonl"), "{err}");
    }

    #[test]
    fn prompt_response_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pr.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"add: 2+2\", \"response\": \"4\"}\r\n   \n",
        )
        .unwrap();
        let convs = read_sft_jsonl(&path).unwrap();
        assert_eq!(
            convs,
            vec![vec![Message::user("add: 2+2"), Message::assistant("4")]]
        );
    }
}
