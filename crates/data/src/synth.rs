//! The demo's built-in data: tiny string tasks generated from a seed, and a character tokenizer.
//!
//! Tasks (user prompt → assistant answer): `reverse: abcd` → `dcba` (lowercase letters),
//! `sort: 3142` → `1234` (digits, ascending), `add: 23+58` → `81` (decimal operands). A small
//! transformer learns them in minutes on a CPU. [`char_tokenizer`] is a real Hugging Face
//! tokenizer (saved with [`Tokenizer::save`] it loads in `transformers`): one token per
//! printable ASCII character or newline plus the Qwen chat markers.

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message, SpecialTokens};
use crate::tokenizer::Tokenizer;
use crate::{DataError, Result};

/// Which task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthKind {
    Reverse,
    Sort,
    Add,
}

impl SynthKind {
    /// The prompt prefix, e.g. `"reverse"` for `reverse: abcd`.
    pub fn name(self) -> &'static str {
        match self {
            SynthKind::Reverse => "reverse",
            SynthKind::Sort => "sort",
            SynthKind::Add => "add",
        }
    }
}

impl FromStr for SynthKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "reverse" => Ok(SynthKind::Reverse),
            "sort" => Ok(SynthKind::Sort),
            "add" => Ok(SynthKind::Add),
            _ => Err(format!(
                "unknown synthetic task `{s}` (expected reverse, sort or add)"
            )),
        }
    }
}

/// A task and its size: string length for `reverse`/`sort`, digits per operand for `add`
/// (inclusive range; out-of-range values are clamped to `1..=max`, `add` to at most 18 digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthTask {
    pub kind: SynthKind,
    pub min_len: usize,
    pub max_len: usize,
}

impl SynthTask {
    /// Default sizes: 3–6 characters for `reverse`/`sort`, 1–2 digit operands for `add`.
    pub fn new(kind: SynthKind) -> Self {
        match kind {
            SynthKind::Reverse | SynthKind::Sort => SynthTask {
                kind,
                min_len: 3,
                max_len: 6,
            },
            SynthKind::Add => SynthTask {
                kind,
                min_len: 1,
                max_len: 2,
            },
        }
    }

    pub fn with_lengths(self, min_len: usize, max_len: usize) -> Self {
        SynthTask {
            min_len,
            max_len,
            ..self
        }
    }

    /// One (prompt, answer) pair.
    fn sample(&self, rng: &mut ChaCha8Rng) -> (String, String) {
        let cap = if self.kind == SynthKind::Add {
            18
        } else {
            usize::MAX
        };
        let lo = self.min_len.clamp(1, cap);
        let hi = self.max_len.clamp(lo, cap);
        let name = self.kind.name();
        match self.kind {
            SynthKind::Reverse => {
                let n = rng.random_range(lo..=hi);
                let s: String = (0..n)
                    .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                    .collect();
                (format!("{name}: {s}"), s.chars().rev().collect())
            }
            SynthKind::Sort => {
                let n = rng.random_range(lo..=hi);
                let s: String = (0..n)
                    .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                    .collect();
                let mut sorted: Vec<char> = s.chars().collect();
                sorted.sort_unstable();
                (format!("{name}: {s}"), sorted.into_iter().collect())
            }
            SynthKind::Add => {
                let operand = |rng: &mut ChaCha8Rng| {
                    let digits = rng.random_range(lo..=hi) as u32;
                    let low = if digits == 1 {
                        0
                    } else {
                        10u64.pow(digits - 1)
                    };
                    rng.random_range(low..10u64.pow(digits))
                };
                let (a, b) = (operand(rng), operand(rng));
                (format!("{name}: {a}+{b}"), (a + b).to_string())
            }
        }
    }
}

/// `n` conversations `[user: prompt, assistant: answer]` of `task`, reproducible from `seed`.
pub fn synth_examples(task: SynthTask, n: usize, seed: u64) -> Vec<Vec<Message>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (prompt, answer) = task.sample(&mut rng);
            vec![Message::user(prompt), Message::assistant(answer)]
        })
        .collect()
}

/// The correct answer to a synthetic prompt (`reverse: ...`, `sort: ...`, `add: a+b`), or
/// `None` if it is not one: for scoring generations.
pub fn solve(prompt: &str) -> Option<String> {
    let (name, arg) = prompt.split_once(": ")?;
    match name.parse::<SynthKind>().ok()? {
        SynthKind::Reverse => Some(arg.chars().rev().collect()),
        SynthKind::Sort => {
            let mut c: Vec<char> = arg.chars().collect();
            c.sort_unstable();
            Some(c.into_iter().collect())
        }
        SynthKind::Add => {
            let (a, b) = arg.split_once('+')?;
            let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
            Some(a.checked_add(b)?.to_string())
        }
    }
}

/// Write conversations as SFT JSONL (`{"messages": [...]}` per line).
pub fn write_jsonl(path: &Path, conversations: &[Vec<Message>]) -> Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        messages: &'a [Message],
    }
    let mut text = String::new();
    for messages in conversations {
        let line =
            serde_json::to_string(&Line { messages }).map_err(|e| DataError::config(path, e))?;
        let _ = writeln!(text, "{line}");
    }
    std::fs::write(path, text).map_err(|e| DataError::io(path, e))
}

/// Pad / end-of-text token of [`char_tokenizer`].
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Start-of-turn marker.
pub const IM_START: &str = "<|im_start|>";
/// End-of-turn marker, the EOS of [`char_tokenizer`].
pub const IM_END: &str = "<|im_end|>";

/// A character-level Hugging Face tokenizer: a BPE model whose vocabulary is the 95 printable
/// ASCII characters (ids 0–94, from `' '` to `'~'`) and `'\n'` (id 95), with no merges, no
/// normalizer or pre-tokenizer and a `Fuse` decoder; then the added special tokens
/// `<|endoftext|>` (96, pad), `<|im_start|>` (97) and `<|im_end|>` (98, EOS); the default Qwen
/// chat template. Characters outside the vocabulary are dropped when encoding.
pub fn char_tokenizer() -> Tokenizer {
    char_tokenizer_with(&[])
}

/// [`char_tokenizer`] with `extra` special tokens after its own (ids 99, 100, … in order), e.g.
/// a vision-language model's `<|vision_start|>`, `<|video_pad|>`, `<|vision_end|>`.
pub fn char_tokenizer_with(extra: &[&str]) -> Tokenizer {
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::AddedToken;

    let vocab: Vocab = (0x20u8..=0x7e)
        .chain(std::iter::once(b'\n'))
        .enumerate()
        .map(|(id, c)| (char::from(c).to_string(), id as u32))
        .collect();
    // Infallible for this fixed vocabulary (no merges to resolve); covered by the tests.
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .expect("a merge-free BPE builds");
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_decoder(Some(Fuse::new()));
    inner.add_special_tokens(&[
        AddedToken::from(ENDOFTEXT, true),
        AddedToken::from(IM_START, true),
        AddedToken::from(IM_END, true),
    ]);
    let extra: Vec<AddedToken> = extra.iter().map(|t| AddedToken::from(*t, true)).collect();
    inner.add_special_tokens(&extra);
    let special = SpecialTokens {
        eos_token: Some(IM_END.into()),
        pad_token: Some(ENDOFTEXT.into()),
        ..Default::default()
    };
    Tokenizer::new(inner, ChatTemplate::default_qwen(), special)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sft::{read_sft_jsonl, tokenize_conversation};

    #[test]
    fn synth_answers_are_right() {
        for kind in [SynthKind::Reverse, SynthKind::Sort, SynthKind::Add] {
            let task = SynthTask::new(kind);
            let convs = synth_examples(task, 200, 3);
            assert_eq!(convs.len(), 200);
            for conv in &convs {
                let (prompt, answer) = (&conv[0].content, &conv[1].content);
                assert_eq!(
                    (conv[0].role.as_str(), conv[1].role.as_str()),
                    ("user", "assistant")
                );
                let arg = prompt.strip_prefix(&format!("{}: ", kind.name())).unwrap();
                match kind {
                    SynthKind::Reverse => {
                        assert!((3..=6).contains(&arg.len()), "{prompt}");
                        assert!(arg.bytes().all(|b| b.is_ascii_lowercase()));
                        let back: String = answer.chars().rev().collect();
                        assert_eq!(back, arg);
                    }
                    SynthKind::Sort => {
                        assert!((3..=6).contains(&arg.len()), "{prompt}");
                        let a: Vec<u8> = answer.bytes().collect();
                        assert!(a.windows(2).all(|w| w[0] <= w[1]), "{answer}");
                        let (mut x, mut y) = (arg.as_bytes().to_vec(), a.clone());
                        x.sort();
                        y.sort();
                        assert_eq!(x, y, "{prompt} -> {answer}");
                    }
                    SynthKind::Add => {
                        let (a, b) = arg.split_once('+').unwrap();
                        assert!(a.len() <= 2 && b.len() <= 2, "{prompt}");
                        let sum: u64 = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
                        assert_eq!(answer.parse::<u64>().unwrap(), sum, "{prompt}");
                    }
                }
                assert_eq!(solve(prompt).as_deref(), Some(answer.as_str()));
            }
            // Reproducible from the seed, different across seeds.
            assert_eq!(synth_examples(task, 200, 3), convs);
            assert_ne!(synth_examples(task, 200, 4), convs);
        }
        assert_eq!(solve("add: 23+58").as_deref(), Some("81"));
        assert_eq!(solve("sort: 3142").as_deref(), Some("1234"));
        assert_eq!(solve("reverse: abcd").as_deref(), Some("dcba"));
        assert_eq!(solve("hello"), None);
    }

    #[test]
    fn configurable_lengths() {
        let task = SynthTask::new(SynthKind::Add).with_lengths(3, 3);
        for conv in synth_examples(task, 50, 1) {
            let arg = conv[0].content.strip_prefix("add: ").unwrap();
            let (a, b) = arg.split_once('+').unwrap();
            assert_eq!((a.len(), b.len()), (3, 3), "{arg}");
        }
        // Degenerate ranges are clamped rather than panicking.
        let odd = SynthTask::new(SynthKind::Reverse).with_lengths(0, 0);
        assert_eq!(
            synth_examples(odd, 5, 1)[0][0].content.len(),
            "reverse: ".len() + 1
        );
        assert_eq!("sort".parse::<SynthKind>(), Ok(SynthKind::Sort));
        assert!("mul".parse::<SynthKind>().is_err());
    }

    #[test]
    fn write_then_read_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("synth.jsonl");
        let convs = synth_examples(SynthTask::new(SynthKind::Sort), 20, 9);
        write_jsonl(&path, &convs).unwrap();
        assert_eq!(read_sft_jsonl(&path).unwrap(), convs);
    }

    #[test]
    fn char_tokenizer_round_trip_and_special_tokens() {
        let tok = char_tokenizer();
        assert_eq!(tok.vocab_size(), 99);
        let text = "reverse: abcd\n{~} 0+9=9!";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(ids[0], u32::from(b'r' - 0x20));
        assert_eq!(tok.decode(&ids, false).unwrap(), text);

        let im_end = tok.token_to_id(IM_END).unwrap();
        assert_eq!(im_end, 98);
        assert_eq!(tok.encode(IM_END).unwrap(), vec![im_end]);
        assert_eq!(tok.eos_token_id(), Some(98));
        assert_eq!(tok.pad_token_id(), Some(96));
        assert_eq!(tok.token_to_id(IM_START), Some(97));
        assert_eq!(tok.token_to_id("\n"), Some(95));
        assert_eq!(tok.bos_token_id(), None);
    }

    #[test]
    fn char_tokenizer_save_from_dir_round_trip() {
        let tok = char_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        tok.save(dir.path()).unwrap();
        let back = Tokenizer::from_dir(dir.path()).unwrap();

        assert_eq!(back.vocab_size(), tok.vocab_size());
        assert_eq!(back.chat_template(), tok.chat_template());
        assert_eq!(back.eos_token_id(), tok.eos_token_id());
        assert_eq!(back.pad_token_id(), tok.pad_token_id());
        assert_eq!(back.inner().get_vocab(true), tok.inner().get_vocab(true));
        let conv = synth_examples(SynthTask::new(SynthKind::Add), 3, 2);
        for c in &conv {
            assert_eq!(
                tokenize_conversation(&back, c).unwrap(),
                tokenize_conversation(&tok, c).unwrap()
            );
        }
        let text = "<|im_start|>user\nsort: 3142<|im_end|>\n";
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(
            back.decode(&back.encode(text).unwrap(), false).unwrap(),
            text
        );

        // The config carries what transformers needs.
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["eos_token"], IM_END);
        assert_eq!(config["pad_token"], ENDOFTEXT);
        assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(config["chat_template"], crate::chat::DEFAULT_QWEN_TEMPLATE);
        // Saving the loaded copy gives the same files.
        let dir2 = tempfile::tempdir().unwrap();
        back.save(dir2.path()).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(f)).unwrap(),
                std::fs::read_to_string(dir2.path().join(f)).unwrap(),
                "{f}"
            );
        }
    }
}
