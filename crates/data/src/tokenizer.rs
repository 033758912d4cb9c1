//! A Hugging Face tokenizer (`tokenizer.json`, run by the `tokenizers` crate) together with the
//! parts of `tokenizer_config.json` a chat model needs: the chat template and the special tokens.
//!
//! Encoding never adds BOS/EOS (Qwen2 adds none; chat templates write the markers themselves);
//! special tokens written in the text, such as `<|im_end|>`, become single tokens. Offsets are
//! byte ranges into the encoded text.

use std::path::Path;

use serde_json::{Map, Value};

use crate::chat::{ChatTemplate, SpecialTokens};
use crate::{DataError, Result};

/// Byte range `[start, end)` of each token in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// A tokenizer plus its chat template and special tokens.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: ChatTemplate,
    /// `tokenizer_config.json` as read (empty when there was none); `save` writes it back with
    /// the template and special tokens updated, keeping fields we do not interpret.
    config: Map<String, Value>,
}

impl Tokenizer {
    /// A tokenizer from parts; the template is rendered with `special`.
    pub fn new(
        inner: tokenizers::Tokenizer,
        template: ChatTemplate,
        special: SpecialTokens,
    ) -> Self {
        Tokenizer {
            inner,
            template: template.with_special_tokens(special),
            config: Map::new(),
        }
    }

    /// Load `dir/tokenizer.json` (required) and `dir/tokenizer_config.json` (optional). The chat
    /// template comes from the config's `chat_template` (a string, or a list of `{name, template}`
    /// of which `default` is used), else from `chat_template.jinja` / `chat_template.json` in the
    /// folder, else [`ChatTemplate::default_qwen`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let inner = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let text = read_to_string(&config_path)?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(DataError::config(&config_path, "expected a JSON object")),
                Err(e) => return Err(DataError::config(&config_path, e)),
            }
        } else {
            Map::new()
        };

        let special = SpecialTokens {
            bos_token: token_field(&config, "bos_token", &config_path)?,
            eos_token: token_field(&config, "eos_token", &config_path)?,
            pad_token: token_field(&config, "pad_token", &config_path)?,
            unk_token: token_field(&config, "unk_token", &config_path)?,
        };
        let source = match config.get("chat_template") {
            Some(v) => Some(template_field(v, &config_path)?),
            None => template_beside(dir)?,
        };
        let template = match source {
            Some(src) => ChatTemplate::new(src).map_err(|e| DataError::config(&config_path, e))?,
            None => ChatTemplate::default_qwen(),
        };
        let mut tok = Tokenizer::new(inner, template, special);
        tok.config = config;
        Ok(tok)
    }

    /// A bare `tokenizer.json`: no special-token config, the default Qwen template.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = load_tokenizer_json(path)?;
        Ok(Tokenizer::new(
            inner,
            ChatTemplate::default_qwen(),
            SpecialTokens::default(),
        ))
    }

    /// Write `dir/tokenizer.json` and `dir/tokenizer_config.json` (chat template and special
    /// tokens included) so the folder loads with `AutoTokenizer.from_pretrained(dir)`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let json_path = dir.join("tokenizer.json");
        self.inner
            .save(&json_path, true)
            .map_err(|e| DataError::config(&json_path, e))?;

        let mut config = self.config.clone();
        // A list of named templates is written back as it was read; otherwise the source.
        if !matches!(config.get("chat_template"), Some(Value::Array(_))) {
            config.insert(
                "chat_template".into(),
                Value::String(self.template.source().to_string()),
            );
        }
        let s = self.template.special_tokens();
        for (key, value) in [
            ("bos_token", &s.bos_token),
            ("eos_token", &s.eos_token),
            ("pad_token", &s.pad_token),
            ("unk_token", &s.unk_token),
        ] {
            let v = value.clone().map(Value::String).unwrap_or(Value::Null);
            config.insert(key.into(), v);
        }
        config
            .entry("tokenizer_class")
            .or_insert_with(|| Value::String("PreTrainedTokenizerFast".into()));
        config
            .entry("clean_up_tokenization_spaces")
            .or_insert(Value::Bool(false));
        let config_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&Value::Object(config))
            .map_err(|e| DataError::config(&config_path, e))?;
        std::fs::write(&config_path, text + "\n").map_err(|e| DataError::io(&config_path, e))
    }

    /// Token ids of `text`, no BOS/EOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Token ids of `text` and each token's byte range `[start, end)` in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text of `ids`; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// One past the largest token id, added tokens included (the smallest embedding that fits).
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }

    /// The config's `eos_token`, else `<|im_end|>`, else `<|endoftext|>`, if in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_id(
            &self.template.special_tokens().eos_token,
            &["<|im_end|>", "<|endoftext|>"],
        )
    }

    /// The config's `pad_token`, else `<|endoftext|>`, else the EOS token.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_id(
            &self.template.special_tokens().pad_token,
            &["<|endoftext|>"],
        )
        .or_else(|| self.eos_token_id())
    }

    /// The config's `bos_token`, if any (Qwen2 has none).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_id(&self.template.special_tokens().bos_token, &[])
    }

    fn special_id(&self, configured: &Option<String>, fallbacks: &[&str]) -> Option<u32> {
        match configured {
            Some(t) => self.token_to_id(t),
            None => fallbacks.iter().find_map(|t| self.token_to_id(t)),
        }
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Replace the chat template (rendered with this tokenizer's special tokens).
    pub fn set_chat_template(&mut self, template: ChatTemplate) {
        let special = self.template.special_tokens().clone();
        self.template = template.with_special_tokens(special);
        self.config.remove("chat_template");
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = read_to_string(path)?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| DataError::config(path, format!("not a valid tokenizer.json: {e}")))
}

/// A special token in `tokenizer_config.json`: absent/null, a string, or an object whose
/// `content` is the string (transformers' serialised `AddedToken`).
fn token_field(config: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(DataError::config(
                path,
                format!("`{key}` is an object without a string `content`"),
            )),
        },
        Some(_) => Err(DataError::config(
            path,
            format!("`{key}` must be a string or an object with `content`"),
        )),
    }
}

/// `chat_template`: a string, or a list of `{name, template}` of which `default` is used.
fn template_field(v: &Value, path: &Path) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) => {
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(t.to_string()),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(DataError::config(
                            path,
                            "`chat_template` list entries need string `name` and `template`",
                        ))
                    }
                }
            }
            Err(DataError::config(
                path,
                "`chat_template` is a list without a `default` entry",
            ))
        }
        _ => Err(DataError::config(
            path,
            "`chat_template` must be a string or a list of {name, template}",
        )),
    }
}

/// Newer checkpoints keep the template beside the config: `chat_template.jinja` (plain text) or
/// `chat_template.json` (`{"chat_template": ...}`).
fn template_beside(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return read_to_string(&jinja).map(Some);
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        let text = read_to_string(&json)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| DataError::config(&json, e))?;
        let t = v
            .get("chat_template")
            .ok_or_else(|| DataError::config(&json, "no `chat_template` field"))?;
        return template_field(t, &json).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use crate::synth::char_tokenizer;

    /// Qwen2.5-Instruct's chat template, verbatim.
    const QWEN25_TEMPLATE: &str = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn template_from_tokenizer_config_renders() {
        let dir = tempfile::tempdir().unwrap();
        char_tokenizer().save(dir.path()).unwrap();
        // Replace the config with a Qwen2.5-style one: template string, AddedToken-object eos.
        let config = serde_json::json!({
            "chat_template": QWEN25_TEMPLATE,
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false},
            "pad_token": "<|endoftext|>",
            "bos_token": null,
            "tokenizer_class": "Qwen2Tokenizer",
        });
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(&config).unwrap(),
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.chat_template().source(), QWEN25_TEMPLATE);
        assert_eq!(tok.eos_token_id(), tok.token_to_id("<|im_end|>"));
        assert_eq!(tok.pad_token_id(), tok.token_to_id("<|endoftext|>"));

        let no_system = vec![Message::user("hi"), Message::assistant("yo")];
        assert_eq!(
            tok.chat_template().render(&no_system, false).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        );
        let with_system = vec![Message::system("Be brief."), Message::user("hi")];
        assert_eq!(
            tok.chat_template().render(&with_system, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );

        // Saving keeps the template and special tokens and fields we do not interpret.
        let out = tempfile::tempdir().unwrap();
        tok.save(out.path()).unwrap();
        let back = Tokenizer::from_dir(out.path()).unwrap();
        assert_eq!(back.chat_template(), tok.chat_template());
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved["tokenizer_class"], "Qwen2Tokenizer");
        assert_eq!(saved["eos_token"], "<|im_end|>");
    }

    #[test]
    fn named_template_list_uses_default() {
        let dir = tempfile::tempdir().unwrap();
        char_tokenizer().save(dir.path()).unwrap();
        let config = serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "DEFAULT{{ messages | length }}"},
            ],
        });
        let config_path = dir.path().join("tokenizer_config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            tok.chat_template()
                .render(&[Message::user("a")], false)
                .unwrap(),
            "DEFAULT1"
        );

        std::fs::write(
            &config_path,
            r#"{"chat_template": [{"name": "x", "template": "y"}]}"#,
        )
        .unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("default"),
            "{err}"
        );
    }

    #[test]
    fn missing_or_bad_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");

        char_tokenizer().save(dir.path()).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");

        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn special_tokens_in_text_are_single_tokens_with_byte_offsets() {
        let tok = char_tokenizer();
        let text = "é?<|im_start|>ab<|im_end|>\n";
        let (ids, offsets) = tok.encode_with_offsets(text).unwrap();
        // 'é' is not in the character vocabulary and is dropped; offsets stay byte offsets.
        let start = tok.token_to_id("<|im_start|>").unwrap();
        let end = tok.token_to_id("<|im_end|>").unwrap();
        let k = ids.iter().position(|&i| i == start).unwrap();
        assert_eq!(offsets[k], (3, 15));
        assert_eq!(ids[k + 3], end);
        assert_eq!(offsets[k + 3], (17, 27));
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "?<|im_start|>ab<|im_end|>\n"
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), "?ab\n");
    }
}
