//! The Qwen2 model configuration, read from and written to Hugging Face `config.json`.
//!
//! Accepts both transformers 4 (`rope_theta`, `torch_dtype`) and transformers 5
//! (`rope_parameters.rope_theta`, `dtype`) spellings, and writes both so either version loads it.

use crate::ModelError;
use reel_tensor::DType;
use serde_json::{json, Value};
use std::path::Path;

/// Architecture hyper-parameters of a Qwen2/Qwen2.5 decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head size D; `hidden_size / num_attention_heads` unless the config says otherwise.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint is stored in (`dtype` / `torch_dtype`); reel computes in f32 on CPU.
    pub dtype: DType,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Qwen2Config {
    /// A small config for tests and the demo.
    pub fn tiny(vocab_size: usize) -> Self {
        Qwen2Config {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 1024,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            dtype: DType::F32,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Reads `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::from_json(&value).map_err(|msg| ModelError::Config {
            path: path.display().to_string(),
            msg,
        })
    }

    /// Parses an HF config object.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let get_usize = |k: &str| -> Result<usize, String> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| format!("missing or non-integer field `{k}`"))
        };
        let get_f32 = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "qwen2" {
                return Err(format!(
                    "model_type `{mt}` is not a Qwen2-family decoder (expected qwen2)"
                ));
            }
        }
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err("use_sliding_window = true is not supported".into());
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(format!(
                    "hidden_act `{act}` is not supported (expected silu)"
                ));
            }
        }
        let hidden_size = get_usize("hidden_size")?;
        let num_attention_heads = get_usize("num_attention_heads")?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .or_else(|| get_f32("rope_theta"))
            .unwrap_or(10000.0);
        if let Some(rt) = v
            .get("rope_parameters")
            .or_else(|| v.get("rope_scaling"))
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
        {
            if rt != "default" {
                return Err(format!("rope_type `{rt}` is not supported (only default)"));
            }
        }
        let dtype_name = v
            .get("dtype")
            .or_else(|| v.get("torch_dtype"))
            .and_then(Value::as_str)
            .unwrap_or("float32");
        let dtype = DType::parse(dtype_name).ok_or_else(|| {
            format!("dtype `{dtype_name}` is not supported (float32 or bfloat16)")
        })?;
        let token = |k: &str| -> Option<u32> {
            match v.get(k) {
                Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
                Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
                _ => None,
            }
        };
        let cfg = Qwen2Config {
            vocab_size: get_usize("vocab_size")?,
            hidden_size,
            intermediate_size: get_usize("intermediate_size")?,
            num_hidden_layers: get_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: get_usize("max_position_embeddings").unwrap_or(32768),
            rms_norm_eps: get_f32("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            dtype,
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the dimensions fit together.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, x) in nonzero {
            if x == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        // Sizes this program can hold: positions for the RoPE table, parameters for one buffer.
        if self.max_position_embeddings > 1 << 24 {
            return Err(format!(
                "max_position_embeddings ({}) is larger than reel supports (2^24)",
                self.max_position_embeddings
            ));
        }
        // f64: no overflow whatever the fields say; exact enough for a bound.
        let f = |x: usize| x as f64;
        let params = f(self.vocab_size) * f(self.hidden_size) * 2.0
            + f(self.num_hidden_layers)
                * f(self.hidden_size)
                * ((f(self.num_attention_heads) + 2.0 * f(self.num_key_value_heads))
                    * f(self.head_dim)
                    + f(self.num_attention_heads) * f(self.head_dim)
                    + 3.0 * f(self.intermediate_size));
        if params > (1u64 << 40) as f64 {
            return Err(format!(
                "the config describes {params} parameters; reel supports up to 2^40"
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// The HF `config.json` object (transformers 4 and 5 spellings both present).
    pub fn to_json(&self) -> Value {
        let dtype = match self.dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
        };
        json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": null,
            "use_sliding_window": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": true,
            "dtype": dtype,
            "torch_dtype": dtype,
            "vocab_size": self.vocab_size,
        })
    }

    /// Parameters in the model (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        crate::params::ParamLayout::new(self).total()
    }

    /// Width of the fused q/k/v projection: (H + 2·H_kv)·D.
    pub fn qkv_width(&self) -> usize {
        (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_both_spellings() {
        let c = Qwen2Config::tiny(99);
        let back = Qwen2Config::from_json(&c.to_json()).unwrap();
        assert_eq!(c, back);
        let mut v = c.to_json();
        v.as_object_mut().unwrap().remove("rope_parameters");
        v["rope_theta"] = json!(500.0);
        assert_eq!(Qwen2Config::from_json(&v).unwrap().rope_theta, 500.0);
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        let mut v = Qwen2Config::tiny(99).to_json();
        v["num_key_value_heads"] = json!(3);
        let e = Qwen2Config::from_json(&v).unwrap_err();
        assert!(e.contains("num_key_value_heads"), "{e}");
        for (field, huge) in [
            ("max_position_embeddings", json!(1u64 << 40)),
            ("vocab_size", json!(1u64 << 62)),
        ] {
            let mut v = Qwen2Config::tiny(99).to_json();
            v[field] = huge;
            let e = Qwen2Config::from_json(&v).unwrap_err();
            assert!(e.contains("supports"), "{field}: {e}");
        }
        let mut v = Qwen2Config::tiny(99).to_json();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(Qwen2Config::from_json(&v)
            .unwrap_err()
            .contains("hidden_size"));
    }
}
