//! Chat messages and Jinja chat templates, rendered with minijinja exactly as `transformers` does.
//!
//! `transformers` (`render_jinja_template`) compiles the template in an immutable sandboxed Jinja2
//! environment with `trim_blocks=True`, `lstrip_blocks=True` (and the default
//! `keep_trailing_newline=False`), the `loopcontrols` extension, a `tojson` filter that calls
//! `json.dumps(ensure_ascii=False)`, and the globals `raise_exception(msg)` and
//! `strftime_now(fmt)`. It renders with `messages`, `tools=None`, `documents=None`,
//! `add_generation_prompt` and the tokenizer's special tokens map (`bos_token`, `eos_token`, ...,
//! only those that are set). This module reproduces that: minijinja with the same block settings,
//! `loop_controls`, Python string/dict methods from `minijinja_contrib::pycompat`, and the same
//! globals and filter. `{% generation %}` blocks (transformers' assistant-mask extension) render
//! their body unchanged.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// One chat turn. `role` is `system`, `user`, `assistant` or `tool`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// The special-token strings a template sees as variables (`bos_token`, `eos_token`, ...).
/// Unset tokens are undefined in the template, as in `transformers`' `special_tokens_map`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// The Qwen-style template used for checkpoints that ship none: each message is
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, and `add_generation_prompt` appends
/// `<|im_start|>assistant\n`. No system message is added.
pub const DEFAULT_QWEN_TEMPLATE: &str = r#"{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    special: SpecialTokens,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("special", &self.special)
            .finish()
    }
}

impl PartialEq for ChatTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.special == other.special
    }
}

impl ChatTemplate {
    /// Compile a Jinja template (syntax errors are reported here, not at render time).
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_formatter(python_formatter);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(template_error)?;
        Ok(ChatTemplate {
            source,
            special: SpecialTokens::default(),
            env,
        })
    }

    /// [`DEFAULT_QWEN_TEMPLATE`].
    pub fn default_qwen() -> Self {
        // The constant template is compiled by the test suite; failure here is a bug in this file.
        ChatTemplate::new(DEFAULT_QWEN_TEMPLATE).expect("the default template compiles")
    }

    /// The same template rendered with these special tokens.
    pub fn with_special_tokens(mut self, special: SpecialTokens) -> Self {
        self.special = special;
        self
    }

    /// The Jinja source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Render `messages`; with `add_generation_prompt` the template appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut specials = BTreeMap::new();
        let s = &self.special;
        for (name, value) in [
            ("bos_token", &s.bos_token),
            ("eos_token", &s.eos_token),
            ("pad_token", &s.pad_token),
            ("unk_token", &s.unk_token),
        ] {
            if let Some(v) = value {
                specials.insert(name, v.clone());
            }
        }
        let ctx = context! {
            messages => messages,
            tools => Value::from(()),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            ..Value::from_serialize(&specials)
        };
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template.render(ctx).map_err(template_error)
    }
}

/// The error message plus the chain of causes minijinja keeps (the location lives in the detail).
fn template_error(e: Error) -> DataError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    DataError::Template(msg)
}

/// `raise_exception(msg)`: abort rendering with the template's message.
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker) become
/// `{% if true %}` / `{% endif %}`, keeping the whitespace-control markers so trimming is unchanged.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        match rewrite_one_tag(tag) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &tag[consumed..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` (starting at `{%`) is a generation tag, its replacement and its length in bytes.
fn rewrite_one_tag(tag: &str) -> Option<(String, usize)> {
    let mut i = 2;
    let bytes = tag.as_bytes();
    let open_ctl = match bytes.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &tag[2..3]
        }
        _ => "",
    };
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    let word_start = i;
    while bytes
        .get(i)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        i += 1;
    }
    let replacement = match &tag[word_start..i] {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    let close_ctl = match bytes.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &tag[i - 1..i]
        }
        _ => "",
    };
    if !tag[i..].starts_with("%}") {
        return None;
    }
    Some((format!("{{%{open_ctl} {replacement} {close_ctl}%}}"), i + 2))
}

/// `{{ x }}` prints what Python's `str(x)` would: lists and dicts as their `repr`
/// (`['a', 1]`, `{'k': None}`) and floats as `repr(float)` (`1e-05`); the rest as minijinja does.
fn python_formatter(
    out: &mut Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
            let mut s = String::new();
            py_repr(value, &mut s)?;
            out.write_str(&s).map_err(Error::from)
        }
        ValueKind::Number if !value.is_integer() => {
            let f = f64::try_from(value.clone())?;
            out.write_str(&py_float(f)).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr` of a template value.
fn py_repr(v: &Value, out: &mut String) -> std::result::Result<(), Error> {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => {
            let _ = write!(out, "{v}");
        }
        ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?)),
        ValueKind::String => py_repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (k, item) in v.try_iter()?.enumerate() {
                if k > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (k, key) in v.try_iter()?.enumerate() {
                if k > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&v.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)`: shortest round-trip digits, `.0` on integral values, exponent form
/// (`1e-05`, `1e+16`) outside `[1e-4, 1e16)`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let e = format!("{f:e}");
        let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// `x | tojson(indent=None, sort_keys=False, separators=None, ensure_ascii=False)`: Python's
/// `json.dumps` with those arguments (transformers' filter), not minijinja's HTML-safe variant.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        // Python's defaults: ", " without indent, "," with it.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = PyJson {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    opts.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct PyJson {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) -> std::result::Result<(), Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match v.as_i64() {
                Some(i) if v.is_integer() => {
                    let _ = write!(out, "{i}");
                }
                _ => {
                    let f = f64::try_from(v.clone())?;
                    match py_float(f).as_str() {
                        "nan" => out.push_str("NaN"),
                        "inf" => out.push_str("Infinity"),
                        "-inf" => out.push_str("-Infinity"),
                        s => out.push_str(s),
                    }
                }
            },
            ValueKind::String => self.write_str(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (k, item) in items.iter().enumerate() {
                    if k > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (k, key) in keys.iter().enumerate() {
                    if k > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match key.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => self.write_str(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(key)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: object of kind {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }
}

/// `strftime_now(fmt)`: the current time formatted with C `strftime` codes. Python formats local
/// time; here it is UTC (servers usually run in UTC). Supports `%Y %y %m %d %e %H %I %M %S %p
/// %j %b %B %a %A %%` and the glibc no-padding forms `%-d %-m %-H %-I %-M %-S %-j`.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&fmt, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Format `secs` since the Unix epoch (UTC) with a subset of `strftime`.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3).
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let (pad, code) = match chars.next() {
            Some('-') => (false, chars.next()),
            other => (true, other),
        };
        let num = |out: &mut String, v: i64, width: usize| {
            if pad {
                let _ = write!(out, "{v:0width$}");
            } else {
                let _ = write!(out, "{v}");
            }
        };
        match code {
            Some('Y') => num(&mut out, year, 4),
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = write!(out, "{day:2}");
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, yday, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_turns() -> Vec<Message> {
        vec![
            Message::system("You are terse."),
            Message::user("reverse: abc"),
            Message::assistant("cba"),
        ]
    }

    #[test]
    fn default_template_renders_exact_string() {
        let t = ChatTemplate::default_qwen();
        let got = t.render(&three_turns(), false).unwrap();
        let want = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                    <|im_start|>user\nreverse: abc<|im_end|>\n\
                    <|im_start|>assistant\ncba<|im_end|>\n";
        assert_eq!(got, want);
        let got = t.render(&three_turns()[..2], true).unwrap();
        let want = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                    <|im_start|>user\nreverse: abc<|im_end|>\n\
                    <|im_start|>assistant\n";
        assert_eq!(got, want);
        assert_eq!(t.render(&[], false).unwrap(), "");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('x is not allowed') }}").unwrap();
        let err = t.render(&three_turns(), false).unwrap_err();
        assert!(matches!(err, DataError::Template(_)), "{err}");
        assert!(err.to_string().contains("x is not allowed"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}").unwrap_err();
        assert!(matches!(err, DataError::Template(_)), "{err}");
    }

    #[test]
    fn block_settings_match_transformers() {
        // trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before
        // it, and one trailing newline of the template is dropped.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src).unwrap();
        let got = t.render(&three_turns(), false).unwrap();
        assert_eq!(got, "[reverse: abc]\n");
    }

    #[test]
    fn special_tokens_pycompat_and_loop_controls() {
        let src = "{{ bos_token }}{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}\
                   {{ m.content.strip().upper() }}|{{ m['role'].startswith('sys') }}|{% endfor %}\
                   {{ eos_token }}{% if pad_token is defined %}P{% endif %}{% if tools is none %}N{% endif %}";
        let t = ChatTemplate::new(src)
            .unwrap()
            .with_special_tokens(SpecialTokens {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..Default::default()
            });
        let msgs = vec![
            Message::system("  hi "),
            Message::user("yo"),
            Message::assistant("x"),
        ];
        let got = t.render(&msgs, false).unwrap();
        // Jinja2 prints Python booleans.
        assert_eq!(got, "<s>HI|True|YO|False|</s>N");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }} {{ {'b': [1, 2.5, none, true], 'a': 'é\"\\n'} | tojson(sort_keys=true) }} {{ [1] | tojson(indent=2) }}",
        )
        .unwrap();
        let got = t.render(&[Message::user("<hi>")], false).unwrap();
        assert_eq!(
            got,
            "{\"role\": \"user\", \"content\": \"<hi>\"} {\"a\": \"é\\\"\\n\", \"b\": [1, 2.5, null, true]} [\n  1\n]"
        );
    }

    #[test]
    fn values_print_as_python_str() {
        // Expected strings are what Jinja2 (transformers' renderer) prints.
        let t = ChatTemplate::new(
            "{{ ['a', \"b'c\", 1.5, none, true, {'k': [2]}] }}|{{ 1e-5 }}|{{ 0.1 + 0.2 }}|{{ 2.0 * 3 }}|{{ 7 / 2 }}|{{ 1e20 }}|{{ none }}|{{ [1e-7] | tojson }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "['a', \"b'c\", 1.5, None, True, {'k': [2]}]|1e-05|0.30000000000000004|6.0|3.5|1e+20|None|[1e-07]"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(
            t.render(&[Message::user("a"), Message::assistant("b")], false)
                .unwrap(),
            "ab"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %-d %I%p %%", secs),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 29 01PM %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
    }
}
