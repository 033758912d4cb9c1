//! Rewards: a response (and its record's answer) → one number and a breakdown by component.
//!
//! - [`FormatReward`]: 1 when the whole response is `<think>…</think>\s*<answer>…</answer>`
//!   (Python's `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", s, re.DOTALL)`, as
//!   Video-R1 and LongVILA-R1 score it), else 0.
//! - [`AccuracyReward`]: 1 when the predicted answer (inside the last `<answer>…</answer>`, or the
//!   whole response when there is none) matches the record's answer (`<answer>B</answer>` or bare),
//!   else 0. The answer's form picks the comparison: a single capital letter (`B`, `(B)`, `B.`) is
//!   multiple choice (the prediction's leading letter, or "answer is B"); a number matches within
//!   `abs_tol + rel_tol·|answer|`; anything else is compared as a normalised string (lower case,
//!   whitespace collapsed, surrounding quotes and a final period dropped).
//! - [`WeightedReward`]: Σ w_k·r_k (0.9·accuracy + 0.1·format by default).
//! - [`CommandReward`]: an external program gets `{"prompt", "response", "answer", "problem_id"}`
//!   as JSON on stdin and prints one number; a program that cannot start, exits non-zero, runs
//!   past its timeout or prints anything but one finite number gives reward 0 for that sample
//!   and a warning naming the sample and the reason (never an error that stops the run).
//!
//! The sequence's reward is placed on its last response token ([`place_on_last_token`]), as verl
//! writes `token_level_scores`; GRPO's outcome advantage is the sum over a row.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use regex::Regex;

use crate::RlError;

/// One sample to score.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The prompt text the response was sampled for.
    pub prompt: &'a str,
    /// The sampled response, decoded (special tokens skipped).
    pub response: &'a str,
    /// The record's answer, e.g. `<answer>B</answer>`.
    pub answer: &'a str,
    /// The record's `problem_id` (names the sample in warnings).
    pub problem_id: &'a str,
}

/// A reward and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardOutput {
    /// The reward of the sample.
    pub value: f32,
    /// Each component's name and unweighted value (one entry for a simple reward).
    pub parts: Vec<(String, f32)>,
    /// Why a component fell back to 0 (e.g. a reward command that failed), if it did.
    pub warning: Option<String>,
}

impl RewardOutput {
    fn simple(name: &str, value: f32) -> Self {
        RewardOutput {
            value,
            parts: vec![(name.to_string(), value)],
            warning: None,
        }
    }

    /// The unweighted value of the component `name`, if it took part.
    pub fn part(&self, name: &str) -> Option<f32> {
        self.parts.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }
}

/// A reward function. Implementations never fail: a sample that cannot be scored gets 0 and a
/// warning in [`RewardOutput::warning`].
pub trait Reward: Send + Sync {
    /// Short name used in breakdowns and metrics ("accuracy", "format", …).
    fn name(&self) -> &str;
    /// Scores one sample.
    fn score(&self, input: &RewardInput) -> RewardOutput;
}

fn regex(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("the pattern is a valid regex"))
}

/// `<think>…</think>\s*<answer>…</answer>` over the whole response.
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatReward;

impl FormatReward {
    /// Whether `response` has the think-then-answer format, as a whole.
    pub fn matches(response: &str) -> bool {
        static RE: OnceLock<Regex> = OnceLock::new();
        regex(&RE, r"(?s)\A<think>.*?</think>\s*<answer>.*?</answer>\z").is_match(response)
    }
}

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, input: &RewardInput) -> RewardOutput {
        RewardOutput::simple("format", Self::matches(input.response) as u8 as f32)
    }
}

/// The text inside the last `<answer>…</answer>` of `text`, trimmed; the whole text trimmed
/// when there is none.
pub fn extract_answer(text: &str) -> &str {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = regex(&RE, r"(?s)<answer>(.*?)</answer>");
    re.captures_iter(text)
        .last()
        .and_then(|c| c.get(1))
        .map_or(text, |m| m.as_str())
        .trim()
}

/// How the record's answer is compared.
#[derive(Debug, Clone, PartialEq)]
enum AnswerKind {
    Letter(char),
    Number(f64),
    Text(String),
}

fn parse_number(s: &str) -> Option<f64> {
    let cleaned: String = s
        .chars()
        .filter(|c| *c != ',' && !c.is_whitespace())
        .collect();
    cleaned.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn normalise_text(s: &str) -> String {
    let lower = s.to_lowercase();
    let collapsed = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    let trimmed = collapsed
        .trim_end_matches('.')
        .trim_matches(|c| c == '"' || c == '\'' || c == '`')
        .trim();
    trimmed.to_string()
}

fn answer_kind(answer: &str) -> AnswerKind {
    static LETTER: OnceLock<Regex> = OnceLock::new();
    let letter = regex(&LETTER, r"\A\(?([A-Z])\)?\.?\z");
    if let Some(c) = letter.captures(answer) {
        return AnswerKind::Letter(c[1].chars().next().unwrap_or('A'));
    }
    if let Some(x) = parse_number(answer) {
        return AnswerKind::Number(x);
    }
    AnswerKind::Text(normalise_text(answer))
}

/// The option letter a prediction names: its leading letter (`B`, `(B)`, `B.`, `B: red`), or
/// the letter after "answer is" / "answer:".
fn predicted_letter(pred: &str) -> Option<char> {
    static LEAD: OnceLock<Regex> = OnceLock::new();
    static SAID: OnceLock<Regex> = OnceLock::new();
    let lead = regex(&LEAD, r"\A\(?([A-Z])(?:\)|[.:\s]|\z)");
    let said = regex(&SAID, r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b");
    lead.captures(pred)
        .or_else(|| said.captures(pred))
        .and_then(|c| c[1].chars().next())
}

/// The number a prediction states: the whole of it, else its last number.
fn predicted_number(pred: &str) -> Option<f64> {
    static NUM: OnceLock<Regex> = OnceLock::new();
    parse_number(pred).or_else(|| {
        let re = regex(&NUM, r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?");
        re.find_iter(pred)
            .last()
            .and_then(|m| parse_number(m.as_str()))
    })
}

/// Answer correctness: multiple-choice letter, number within tolerance, or normalised string.
#[derive(Debug, Clone, Copy)]
pub struct AccuracyReward {
    /// Relative tolerance of numeric answers. Default 1e-2.
    pub rel_tol: f64,
    /// Absolute tolerance of numeric answers. Default 1e-6.
    pub abs_tol: f64,
}

impl Default for AccuracyReward {
    fn default() -> Self {
        AccuracyReward {
            rel_tol: 1e-2,
            abs_tol: 1e-6,
        }
    }
}

impl AccuracyReward {
    /// Whether `response` answers `answer` correctly.
    pub fn is_correct(&self, response: &str, answer: &str) -> bool {
        let pred = extract_answer(response);
        match answer_kind(extract_answer(answer)) {
            AnswerKind::Letter(want) => predicted_letter(pred) == Some(want),
            AnswerKind::Number(want) => predicted_number(pred)
                .is_some_and(|x| (x - want).abs() <= self.abs_tol + self.rel_tol * want.abs()),
            AnswerKind::Text(want) => normalise_text(pred) == want,
        }
    }
}

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score(&self, input: &RewardInput) -> RewardOutput {
        let ok = self.is_correct(input.response, input.answer);
        RewardOutput::simple("accuracy", ok as u8 as f32)
    }
}

/// Σ_k w_k·r_k over component rewards; the breakdown lists each component's unweighted value.
pub struct WeightedReward {
    parts: Vec<(f32, Box<dyn Reward>)>,
}

impl WeightedReward {
    /// The weighted sum of `parts` ((weight, reward) pairs).
    pub fn new(parts: Vec<(f32, Box<dyn Reward>)>) -> Self {
        WeightedReward { parts }
    }

    /// The components' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.parts
            .iter()
            .map(|(_, r)| r.name().to_string())
            .collect()
    }
}

impl Reward for WeightedReward {
    fn name(&self) -> &str {
        "weighted"
    }
    fn score(&self, input: &RewardInput) -> RewardOutput {
        let mut out = RewardOutput {
            value: 0.0,
            parts: Vec::with_capacity(self.parts.len()),
            warning: None,
        };
        for (w, r) in &self.parts {
            let o = r.score(input);
            out.value += w * o.value;
            out.parts.push((r.name().to_string(), o.value));
            if let Some(msg) = o.warning {
                out.warning = Some(match out.warning.take() {
                    Some(prev) => format!("{prev}; {msg}"),
                    None => msg,
                });
            }
        }
        out
    }
}

/// A reward computed by an external program (any language): JSON on stdin, one number on stdout.
#[derive(Debug, Clone)]
pub struct CommandReward {
    /// The program to run (looked up on PATH when it has no slash).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// How long one sample may take before the program is killed.
    pub timeout: Duration,
}

/// Bytes of stdout read at most (a number needs few) and of stderr quoted in a warning.
const STDOUT_LIMIT: u64 = 1 << 16;
const STDERR_QUOTE: usize = 300;

fn read_limited(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(r) = r {
            let _ = r.take(STDOUT_LIMIT).read_to_end(&mut buf);
        }
        buf
    })
}

impl CommandReward {
    fn describe(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the program on one sample: its number, or why there is none.
    pub fn run(&self, input: &RewardInput) -> Result<f32, String> {
        let json = serde_json::json!({
            "prompt": input.prompt,
            "response": input.response,
            "answer": input.answer,
            "problem_id": input.problem_id,
        })
        .to_string();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start: {e}"))?;
        let stdin = child.stdin.take();
        // Written from a thread so a program that does not read stdin cannot block us; a
        // program that exits without reading it (broken pipe) is not an error.
        let writer = std::thread::spawn(move || {
            if let Some(mut s) = stdin {
                let _ = s.write_all(json.as_bytes());
            }
        });
        let out = read_limited(child.stdout.take());
        let err = read_limited(child.stderr.take());
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The reader threads end when every holder of the pipes exits; they are not
                    // joined here, so a lingering grandchild cannot stall training.
                    return Err(format!(
                        "timed out after {:.1} s (killed)",
                        self.timeout.as_secs_f64()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(format!("cannot wait for it: {e}")),
            }
        };
        let _ = writer.join();
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            let text = String::from_utf8_lossy(&stderr);
            let text = text.trim();
            let tail: String = if text.chars().count() > STDERR_QUOTE {
                let skip = text.chars().count() - STDERR_QUOTE;
                format!("…{}", text.chars().skip(skip).collect::<String>())
            } else {
                text.to_string()
            };
            return Err(if tail.is_empty() {
                format!("exited with {status}")
            } else {
                format!("exited with {status}: {tail}")
            });
        }
        let text = String::from_utf8_lossy(&stdout);
        let text = text.trim();
        match text.parse::<f32>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => {
                let shown: String = text.chars().take(80).collect();
                Err(format!(
                    "printed `{shown}` where one finite number was expected"
                ))
            }
        }
    }
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        "command"
    }
    fn score(&self, input: &RewardInput) -> RewardOutput {
        match self.run(input) {
            Ok(x) => RewardOutput::simple("command", x),
            Err(why) => {
                let msg = format!(
                    "reward command `{}` on problem {}: {why}; reward 0 for this sample",
                    self.describe(),
                    input.problem_id
                );
                tracing::warn!("{msg}");
                RewardOutput {
                    value: 0.0,
                    parts: vec![("command".to_string(), 0.0)],
                    warning: Some(msg),
                }
            }
        }
    }
}

/// Token-level rewards [B·T]: each sequence's reward at its last response token (the last
/// position where `mask` is true in its row), 0 elsewhere. `rewards` is [B]; a row with no
/// response token is an error naming it.
pub fn place_on_last_token(rewards: &[f32], mask: &[bool], t: usize) -> Result<Vec<f32>, RlError> {
    let b = rewards.len();
    if mask.len() != b * t {
        return Err(RlError::Invalid(format!(
            "response mask has {} values, {b} rewards × T = {t} need {}",
            mask.len(),
            b * t
        )));
    }
    let mut out = vec![0.0f32; b * t];
    for (i, &r) in rewards.iter().enumerate() {
        let row = &mask[i * t..(i + 1) * t];
        let last = row.iter().rposition(|&m| m).ok_or_else(|| {
            RlError::Invalid(format!("sequence {i} has no response token to reward"))
        })?;
        out[i * t + last] = r;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(response: &'a str, answer: &'a str) -> RewardInput<'a> {
        RewardInput {
            prompt: "Which? A. x B. y C. z D. w",
            response,
            answer,
            problem_id: "p7",
        }
    }

    #[test]
    fn format_is_the_whole_response() {
        for (s, ok) in [
            ("<think>a</think><answer>B</answer>", true),
            ("<think>a\nb</think> \n <answer>B\n</answer>", true),
            ("<think></think><answer></answer>", true),
            (" <think>a</think><answer>B</answer>", false),
            ("<think>a</think><answer>B</answer>\n", false),
            ("<think>a</think><answer>B</answer> extra", false),
            ("<think>a</think> x <answer>B</answer>", false),
            ("<answer>B</answer>", false),
            ("<think>a</think>", false),
            ("<think>a<answer>B</answer>", false),
        ] {
            assert_eq!(FormatReward::matches(s), ok, "{s:?}");
            assert_eq!(FormatReward.score(&input(s, "B")).value, ok as u8 as f32);
        }
    }

    #[test]
    fn accuracy_multiple_choice() {
        let acc = AccuracyReward::default();
        for (resp, ok) in [
            ("<think>…</think><answer>B</answer>", true),
            ("<answer> (B) </answer>", true),
            ("<answer>B. the red car</answer>", true),
            ("<answer>B: red</answer>", true),
            ("<answer>The answer is B.</answer>", true),
            ("answer: (B)", true),
            ("<answer>A</answer> then <answer>B</answer>", true),
            ("<answer>C</answer>", false),
            ("<answer>b</answer>", false),
            ("<answer>Because</answer>", false),
            ("<answer></answer>", false),
            ("no answer at all", false),
        ] {
            assert_eq!(acc.is_correct(resp, "<answer>B</answer>"), ok, "{resp:?}");
        }
        assert!(acc.is_correct("<answer>(C)</answer>", "C"));
        assert!(acc.is_correct("<answer>D</answer>", "(D)"));
    }

    #[test]
    fn accuracy_numbers_with_tolerance() {
        let acc = AccuracyReward {
            rel_tol: 1e-2,
            abs_tol: 1e-6,
        };
        for (resp, ok) in [
            ("<answer>42</answer>", true),
            ("<answer>42.0</answer>", true),
            ("<answer>42.4</answer>", true),
            ("<answer>41.5</answer>", false),
            ("<answer>about 42 seconds</answer>", true),
            ("<answer>from 3 to 42</answer>", true),
            ("<answer>1,042</answer>", false),
            ("<answer>forty-two</answer>", false),
        ] {
            assert_eq!(acc.is_correct(resp, "<answer>42</answer>"), ok, "{resp:?}");
        }
        assert!(acc.is_correct("<answer>1,042</answer>", "1042"));
        assert!(acc.is_correct("<answer>-0.5</answer>", "-.5"));
        // Zero: only the absolute tolerance applies.
        assert!(acc.is_correct("<answer>0.0000001</answer>", "0"));
        assert!(!acc.is_correct("<answer>0.001</answer>", "0"));
        let strict = AccuracyReward {
            rel_tol: 0.0,
            abs_tol: 0.0,
        };
        assert!(!strict.is_correct("<answer>42.4</answer>", "42"));
        assert!(strict.is_correct("<answer>42.000</answer>", "42"));
    }

    #[test]
    fn accuracy_normalised_strings() {
        let acc = AccuracyReward::default();
        let want = "<answer>The Kitchen</answer>";
        for (resp, ok) in [
            ("<answer>the kitchen</answer>", true),
            ("<answer>  The   Kitchen. </answer>", true),
            ("<answer>\"the kitchen\"</answer>", true),
            ("<answer>kitchen</answer>", false),
            ("<answer>the kitchens</answer>", false),
        ] {
            assert_eq!(acc.is_correct(resp, want), ok, "{resp:?}");
        }
    }

    #[test]
    fn weighted_sum_and_breakdown() {
        let r = WeightedReward::new(vec![
            (0.9, Box::new(AccuracyReward::default())),
            (0.1, Box::new(FormatReward)),
        ]);
        assert_eq!(r.names(), ["accuracy", "format"]);
        let cases = [
            ("<think>x</think><answer>B</answer>", 1.0, 1.0),
            ("<think>x</think><answer>C</answer>", 0.0, 1.0),
            ("<answer>B</answer>", 1.0, 0.0),
            ("C", 0.0, 0.0),
        ];
        for (resp, acc, fmt) in cases {
            let o = r.score(&input(resp, "<answer>B</answer>"));
            assert!((o.value - (0.9 * acc + 0.1 * fmt)).abs() < 1e-6, "{resp:?}");
            assert_eq!(o.part("accuracy"), Some(acc));
            assert_eq!(o.part("format"), Some(fmt));
            assert_eq!(o.warning, None);
        }
    }

    #[test]
    fn last_token_placement() {
        let mask = [
            false, true, true, false, //
            true, true, true, true, //
        ];
        let out = place_on_last_token(&[0.5, -1.0], &mask, 4).unwrap();
        assert_eq!(out, [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, -1.0]);
        let e = place_on_last_token(&[1.0, 2.0], &[true, false, false, false], 2).unwrap_err();
        assert!(e.to_string().contains("sequence 1"), "{e}");
        assert!(place_on_last_token(&[1.0], &[true], 2).is_err());
    }

    fn sh(script: &str, timeout_ms: u64) -> CommandReward {
        CommandReward {
            program: PathBuf::from("sh"),
            args: vec!["-c".into(), script.into()],
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn command_reward_reads_json_and_prints_a_number() {
        // The program sees every field: it prints 1 only when the JSON has them all.
        let r = sh(
            r#"j=$(cat); echo "$j" | grep -q '"answer":"B"' \
               && echo "$j" | grep -q '"response":"<answer>B</answer>"' \
               && echo "$j" | grep -q '"problem_id":"p7"' && echo "$j" | grep -q '"prompt":"Which' \
               && echo ' 0.75 ' || echo 0.25"#,
            5000,
        );
        let o = r.score(&input("<answer>B</answer>", "B"));
        assert_eq!(o.value, 0.75, "{o:?}");
        assert_eq!(o.warning, None);
    }

    #[test]
    fn failing_commands_give_zero_and_a_warning() {
        let cases = [
            (
                sh("echo boom >&2; exit 3", 5000),
                "exited with exit status: 3: boom",
            ),
            (sh("echo not-a-number", 5000), "printed `not-a-number`"),
            (sh("echo 1 2", 5000), "printed `1 2`"),
            (sh("echo nan", 5000), "printed `nan`"),
            (sh("true", 5000), "printed ``"),
            (
                CommandReward {
                    program: PathBuf::from("sleep"),
                    args: vec!["5".into()],
                    timeout: Duration::from_millis(200),
                },
                "timed out after 0.2 s",
            ),
            (
                CommandReward {
                    program: PathBuf::from("/nonexistent/reward-program"),
                    args: vec![],
                    timeout: Duration::from_secs(1),
                },
                "cannot start",
            ),
        ];
        for (r, want) in cases {
            let t0 = Instant::now();
            let o = r.score(&input("<answer>B</answer>", "B"));
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "{want}: took too long"
            );
            assert_eq!(o.value, 0.0);
            let w = o.warning.expect("a warning");
            assert!(w.contains(want), "expected {want:?} in {w:?}");
            assert!(w.contains("problem p7") && w.contains("reward 0"), "{w}");
        }
        // Inside a weighted reward, the other components still count.
        let r = WeightedReward::new(vec![
            (0.9, Box::new(AccuracyReward::default())),
            (1.0, Box::new(sh("exit 1", 5000))),
        ]);
        let o = r.score(&input("<answer>B</answer>", "B"));
        assert!((o.value - 0.9).abs() < 1e-6);
        assert!(o.warning.unwrap().contains("exited"));
    }
}
