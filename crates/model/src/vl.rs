//! Qwen2.5-VL (transformers' `Qwen2_5_VLForConditionalGeneration`): the vision tower
//! ([`crate::vision`]) feeding the Qwen2 decoder, with multimodal rotary positions (M-RoPE).
//!
//! A batch is B sequences of T token ids in which each video appears as a run of
//! `video_token_id` placeholders, one per merged vision token (t·h·w / m² for a grid of t×h×w
//! patches). The forward:
//! 1. runs the tower over all videos' patches → features [Σ t·h·w/m², d];
//! 2. embeds the tokens and overwrites the placeholder rows with the features, in order;
//! 3. builds 3-D positions [3, B, T] as transformers' `get_rope_index` does: text tokens get
//!    the same running position on all three axes; a video of llm grid (t, h', w') starting at
//!    position s gets (s + ⌊i_t · second_per_grid_t · tokens_per_second⌋, s + i_h, s + i_w), and the
//!    text after it continues at s + max(h', w');
//! 4. rotates q/k with M-RoPE: frequency band j of each head turns with the t, h or w position
//!    as `mrope_section` splits the D/2 bands (in that order);
//! 5. runs the decoder ([`Qwen2::forward_embeds`]) and the LM head with cross-entropy.
//!
//! The backward returns ∂L/∂embeddings from the decoder; text rows go to the embedding table,
//! placeholder rows into the tower's backward. Gradients live in two flat buffers, one per
//! layout ([`ParamLayout`] for the decoder, [`VisionLayout`] for the tower).
//!
//! Checkpoints: `config.json` of model_type `qwen2_5_vl` (text fields in `text_config` or, as
//! older checkpoints have them, at the top level; `vision_config`), tensors named `visual.*`,
//! `model.*`, `lm_head.weight` as transformers 5.17 saves them and the published checkpoints
//! hold them; module-path names (`model.visual.*`, `model.language_model.*`) are accepted too.

use crate::attention::AttentionOp;
use crate::config::Qwen2Config;
use crate::io::{folder_files, read_tensors, take_params, write_folder, TensorRef};
use crate::model::{EmbedsBatch, LossStats, Qwen2, Rotary, Workspace};
use crate::params::ParamLayout;
use crate::vision::{VideoGrid, VisionConfig, VisionLayout, VisionTower, VisionWorkspace};
use crate::{CheckpointPolicy, ModelError};
use reel_kernels::embedding::{embedding_backward, embedding_forward};
use reel_kernels::rope::RopeTable;
use reel_tensor::DType;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Qwen2.5-VL hyper-parameters: the decoder's, the tower's and the multimodal glue.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen25VLConfig {
    /// The language model (head_dim is always hidden_size / num_attention_heads here).
    pub text: Qwen2Config,
    pub vision: VisionConfig,
    /// M-RoPE bands per axis (t, h, w), summing to head_dim / 2
    /// (`rope_parameters.mrope_section`, default [16, 24, 24]).
    pub mrope_section: [usize; 3],
    /// Image placeholder id (default 151655); images are not supported yet and are refused.
    pub image_token_id: u32,
    /// Video placeholder id (default 151656).
    pub video_token_id: u32,
    /// `<|vision_start|>` (default 151652); an ordinary text token to the model.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>` (default 151653); an ordinary text token to the model.
    pub vision_end_token_id: u32,
}

fn config_err(path: &Path, msg: String) -> ModelError {
    ModelError::Config {
        path: path.display().to_string(),
        msg,
    }
}

impl Qwen25VLConfig {
    /// Reads `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| config_err(path, e.to_string()))?;
        Self::from_json(&value).map_err(|msg| config_err(path, msg))
    }

    /// Parses an HF config object (transformers 4 layout with text fields at the top level and
    /// `rope_scaling`, or transformers 5 with `text_config` and `rope_parameters`).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "qwen2_5_vl" {
                return Err(format!("model_type `{mt}` is not qwen2_5_vl"));
            }
        }
        let src = match v.get("text_config") {
            Some(Value::Object(o)) => o.clone(),
            _ => v.as_object().cloned().ok_or("config is not an object")?,
        };
        let rope = src
            .get("rope_parameters")
            .or_else(|| src.get("rope_scaling"))
            .or_else(|| v.get("rope_scaling"))
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(rt) = rope
            .get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(Value::as_str)
        {
            if rt != "default" && rt != "mrope" {
                return Err(format!(
                    "text rope_type `{rt}` is not supported (default / mrope)"
                ));
            }
        }
        let mrope_section = match rope.get("mrope_section") {
            None | Some(Value::Null) => [16, 24, 24],
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut s = [0usize; 3];
                for (dst, x) in s.iter_mut().zip(a) {
                    *dst = x.as_u64().ok_or("mrope_section must hold integers")? as usize;
                }
                s
            }
            Some(_) => return Err("mrope_section must be a list of 3 integers".into()),
        };
        let theta = rope
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| src.get("rope_theta").and_then(Value::as_f64))
            .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(1_000_000.0);
        let mut t: Map<String, Value> = src;
        t.insert("model_type".into(), json!("qwen2"));
        t.remove("rope_scaling");
        t.remove("rope_theta");
        // The VL decoder's head size is always hidden_size / num_attention_heads.
        t.remove("head_dim");
        t.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": theta}),
        );
        t.entry("rms_norm_eps").or_insert(json!(1e-5));
        if let Some(tie) = v.get("tie_word_embeddings") {
            t.insert("tie_word_embeddings".into(), tie.clone());
        }
        for key in ["dtype", "torch_dtype"] {
            if !t.contains_key(key) {
                if let Some(x) = v.get(key) {
                    t.insert(key.into(), x.clone());
                }
            }
        }
        let text = Qwen2Config::from_json(&Value::Object(t)).map_err(|e| format!("text: {e}"))?;
        let vision = VisionConfig::from_json(
            v.get("vision_config")
                .ok_or("missing the `vision_config` object")?,
        )?;
        let id = |k: &str, default: u32| -> Result<u32, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(|| format!("`{k}` must be a token id")),
            }
        };
        let c = Qwen25VLConfig {
            text,
            vision,
            mrope_section,
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks that the parts fit together.
    pub fn validate(&self) -> Result<(), String> {
        self.text.validate().map_err(|e| format!("text: {e}"))?;
        self.vision.validate()?;
        if self.text.head_dim * self.text.num_attention_heads != self.text.hidden_size {
            return Err(format!(
                "text: head_dim ({}) must be hidden_size / num_attention_heads",
                self.text.head_dim
            ));
        }
        if self.mrope_section.iter().sum::<usize>() != self.text.head_dim / 2 {
            return Err(format!(
                "mrope_section {:?} must sum to head_dim / 2 = {}",
                self.mrope_section,
                self.text.head_dim / 2
            ));
        }
        if self.vision.out_hidden_size != self.text.hidden_size {
            return Err(format!(
                "vision_config.out_hidden_size ({}) must equal the text hidden_size ({})",
                self.vision.out_hidden_size, self.text.hidden_size
            ));
        }
        let v = self.text.vocab_size;
        if self.video_token_id as usize >= v {
            return Err(format!(
                "video_token_id ({}) is outside the vocabulary ({v})",
                self.video_token_id
            ));
        }
        Ok(())
    }

    /// The HF `config.json` object (transformers 5 layout, as 5.17 saves it).
    pub fn to_json(&self) -> Value {
        let mut text = self.text.to_json();
        let t = text.as_object_mut().expect("object");
        for key in [
            "architectures",
            "head_dim",
            "rope_theta",
            "torch_dtype",
            "dtype",
            "tie_word_embeddings",
        ] {
            t.remove(key);
        }
        t.insert("model_type".into(), json!("qwen2_5_vl_text"));
        t.insert(
            "rope_parameters".into(),
            json!({
                "rope_type": "default",
                "rope_theta": self.text.rope_theta,
                "mrope_section": self.mrope_section,
            }),
        );
        let dtype = match self.text.dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
        };
        json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "dtype": dtype,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": text,
            "vision_config": self.vision.to_json(),
        })
    }
}

/// The videos of a batch: all patches, each video's grid and its seconds per temporal patch.
#[derive(Clone, Copy, Debug)]
pub struct VideoBatch<'a> {
    /// [Σ t·h·w, C·T_p·p·p], videos one after another in the order their placeholder runs appear.
    pub pixels: &'a [f32],
    pub grids: &'a [VideoGrid],
    /// Seconds per temporal patch of each video (`second_per_grid_ts`); empty means 1 s each.
    pub second_per_grid_ts: &'a [f32],
}

/// One step's input: B sequences of T tokens with their videos.
#[derive(Clone, Copy, Debug)]
pub struct VlBatch<'a> {
    pub tokens: &'a [u32],
    /// Next-token targets per position; negative = no loss.
    pub targets: &'a [i32],
    pub b: usize,
    pub t: usize,
    pub videos: VideoBatch<'a>,
}

/// Every buffer a VLM step needs.
pub struct VlWorkspace {
    pub lm: Workspace,
    pub vision: VisionWorkspace,
    /// 3-D positions [3, B·T] of the last forward.
    pub positions: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    embeds: Vec<f32>,
    d_text: Vec<f32>,
    d_features: Vec<f32>,
}

impl VlWorkspace {
    /// Buffers for `config`; `policy` is the decoder's checkpoint policy (the tower keeps all
    /// of its activations).
    pub fn new(config: &Qwen25VLConfig, policy: CheckpointPolicy) -> Self {
        VlWorkspace {
            lm: Workspace::new(&config.text, policy),
            vision: VisionWorkspace::new(),
            positions: Vec::new(),
            cos: Vec::new(),
            sin: Vec::new(),
            embeds: Vec::new(),
            d_text: Vec::new(),
            d_features: Vec::new(),
        }
    }
}

/// 3-D rotary positions [3, B·T] (t, h, w rows) as transformers' `get_rope_index` computes them
/// for video placeholders (see the module doc). Each run of `video_token_id` takes the next
/// videos in order, as many as its length covers.
pub fn mrope_positions(
    config: &Qwen25VLConfig,
    tokens: &[u32],
    b: usize,
    t: usize,
    grids: &[VideoGrid],
    second_per_grid_ts: &[f32],
) -> Result<Vec<u32>, ModelError> {
    let n = b * t;
    if tokens.len() != n {
        return Err(ModelError::Invalid(format!(
            "batch of {b}×{t} needs {n} tokens; got {}",
            tokens.len()
        )));
    }
    if !second_per_grid_ts.is_empty() && second_per_grid_ts.len() != grids.len() {
        return Err(ModelError::Invalid(format!(
            "{} second_per_grid_ts for {} videos",
            second_per_grid_ts.len(),
            grids.len()
        )));
    }
    if let Some(s) = second_per_grid_ts
        .iter()
        .find(|s| !s.is_finite() || **s < 0.0)
    {
        return Err(ModelError::Invalid(format!(
            "second_per_grid_ts {s} must be a finite non-negative number"
        )));
    }
    let m = config.vision.spatial_merge_size;
    let tps = config.vision.tokens_per_second as f64;
    let vid = config.video_token_id;
    let mut pos = vec![0u32; 3 * n];
    let mut next_video = 0usize;
    for row in 0..b {
        let toks = &tokens[row * t..(row + 1) * t];
        let mut cur = 0u64;
        let mut i = 0;
        while i < t {
            if toks[i] != vid {
                for axis in 0..3 {
                    pos[axis * n + row * t + i] = cur as u32;
                }
                cur += 1;
                i += 1;
                continue;
            }
            let g = grids.get(next_video).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "sequence {row}: video placeholder at position {i} but only {} videos",
                    grids.len()
                ))
            })?;
            let secs = second_per_grid_ts.get(next_video).copied().unwrap_or(1.0) as f64;
            let (lt, lh, lw) = (g.t, g.h / m, g.w / m);
            let len = lt * lh * lw;
            if i + len > t || toks[i..i + len].iter().any(|&x| x != vid) {
                return Err(ModelError::Invalid(format!(
                    "sequence {row}: video {next_video} (grid {}×{}×{}) needs {len} placeholder \
                     tokens from position {i}; the run is shorter",
                    g.t, g.h, g.w
                )));
            }
            let mut k = row * t + i;
            for it in 0..lt {
                let tp = cur + (it as f64 * secs * tps) as u64;
                for ih in 0..lh {
                    for iw in 0..lw {
                        pos[k] = tp as u32;
                        pos[n + k] = (cur + ih as u64) as u32;
                        pos[2 * n + k] = (cur + iw as u64) as u32;
                        k += 1;
                    }
                }
            }
            cur += lh.max(lw) as u64;
            i += len;
            next_video += 1;
        }
    }
    if next_video != grids.len() {
        return Err(ModelError::Invalid(format!(
            "{} videos but placeholders for {next_video}",
            grids.len()
        )));
    }
    Ok(pos)
}

/// M-RoPE angles, the one implementation (the training forward here and the incremental
/// decoding step, [`crate::decode`], both use it): cos/sin [N, D/2] where rotary frequency j of
/// token k turns by position component `pos(k, axis)`, axis 0 (temporal) for j < sections[0],
/// 1 (height) for the next sections[1] frequencies, 2 (width) for the rest; the angle of a
/// component position p is the 1-D table's (`table.row(p)`). Sections must sum to D/2 (the
/// callers check).
pub fn mrope_angles(
    table: &RopeTable,
    sections: [usize; 3],
    n: usize,
    pos: impl Fn(usize, usize) -> u32,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let half = table.head_dim() / 2;
    let [s0, s1, _] = sections;
    cos.resize(n * half, 0.0);
    sin.resize(n * half, 0.0);
    for k in 0..n {
        for j in 0..half {
            let axis = if j < s0 {
                0
            } else if j < s0 + s1 {
                1
            } else {
                2
            };
            let (c, s) = table.row(pos(k, axis) as usize);
            cos[k * half + j] = c[j];
            sin[k * half + j] = s[j];
        }
    }
}

/// Qwen2.5-VL: the decoder and the vision tower, each with its own flat parameter buffer.
pub struct Qwen25VL {
    pub config: Qwen25VLConfig,
    pub lm: Qwen2,
    pub vision: VisionTower,
}

impl Qwen25VL {
    /// A model from both weight buffers; their lengths must match the config's layouts.
    pub fn from_params(
        config: Qwen25VLConfig,
        lm_params: Vec<f32>,
        vision_params: Vec<f32>,
    ) -> Result<Self, ModelError> {
        config
            .validate()
            .map_err(|msg| ModelError::Invalid(format!("config: {msg}")))?;
        let lm = Qwen2::from_params(config.text.clone(), lm_params)?;
        let vision = VisionTower::from_params(config.vision.clone(), vision_params)?;
        Ok(Qwen25VL { config, lm, vision })
    }

    /// Every buffer of a step, for the decoder's checkpoint `policy`.
    pub fn workspace(&self, policy: CheckpointPolicy) -> VlWorkspace {
        VlWorkspace::new(&self.config, policy)
    }

    /// M-RoPE cos/sin [N, D/2] from positions [3, N] (t row, h row, w row), the angles the
    /// decoder turns q/k by ([`Rotary::Angles`]).
    pub fn mrope_angles(&self, positions: &[u32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let n = positions.len() / 3;
        mrope_angles(
            &self.lm.rope,
            self.config.mrope_section,
            n,
            |k, axis| positions[axis * n + k],
            cos,
            sin,
        );
    }

    /// Tower, embeddings with the features in, positions and angles: everything before the
    /// decoder. Leaves ws.embeds, ws.positions, ws.cos, ws.sin filled.
    fn prepare(
        &self,
        ws: &mut VlWorkspace,
        batch: &VlBatch,
        features: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let n = batch.b * batch.t;
        if batch.tokens.len() != n || batch.targets.len() != n {
            return Err(ModelError::Invalid(format!(
                "batch of {}×{} needs {n} tokens and targets; got {}, {}",
                batch.b,
                batch.t,
                batch.tokens.len(),
                batch.targets.len()
            )));
        }
        let v = c.text.vocab_size;
        if let Some((i, &tok)) = batch
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &x)| x as usize >= v || x == c.image_token_id)
        {
            return Err(ModelError::Invalid(if tok == c.image_token_id {
                format!("image placeholder at position {i}: images are not supported")
            } else {
                format!("token id {tok} at position {i} is outside the vocabulary ({v})")
            }));
        }
        crate::vision::check_grids(&c.vision, batch.videos.grids)?;
        let placeholders = batch
            .tokens
            .iter()
            .filter(|&&x| x == c.video_token_id)
            .count();
        let want = self.vision.output_tokens(batch.videos.grids);
        if placeholders != want {
            return Err(ModelError::Invalid(format!(
                "{placeholders} video placeholder tokens but the videos make {want} vision tokens"
            )));
        }
        ws.positions = mrope_positions(
            c,
            batch.tokens,
            batch.b,
            batch.t,
            batch.videos.grids,
            batch.videos.second_per_grid_ts,
        )?;
        let max = c.text.max_position_embeddings;
        if let Some(&p) = ws.positions.iter().find(|&&p| p as usize >= max) {
            return Err(ModelError::Invalid(format!(
                "rotary position {p} exceeds max_position_embeddings ({max})"
            )));
        }
        let (positions, mut cos, mut sin) = (
            std::mem::take(&mut ws.positions),
            std::mem::take(&mut ws.cos),
            std::mem::take(&mut ws.sin),
        );
        self.mrope_angles(&positions, &mut cos, &mut sin);
        (ws.positions, ws.cos, ws.sin) = (positions, cos, sin);
        let d = c.text.hidden_size;
        ws.embeds.resize(n * d, 0.0);
        embedding_forward(
            &mut ws.embeds,
            batch.tokens,
            &self.lm.params[self.lm.layout.embed.clone()],
            d,
        );
        if let Some(f) = features {
            if f.len() != want * d {
                return Err(ModelError::Invalid(format!(
                    "video features have {} values; {want} vision tokens of width {d} need {}",
                    f.len(),
                    want * d
                )));
            }
        }
        if !batch.videos.grids.is_empty() {
            let features = match features {
                Some(f) => f,
                None => {
                    self.vision
                        .forward(&mut ws.vision, batch.videos.pixels, batch.videos.grids)?
                }
            };
            let rows = batch
                .tokens
                .iter()
                .enumerate()
                .filter(|(_, &x)| x == c.video_token_id);
            for ((r, _), f) in rows.zip(features.chunks_exact(d)) {
                ws.embeds[r * d..(r + 1) * d].copy_from_slice(f);
            }
        }
        Ok(())
    }

    fn embeds_batch<'a>(
        embeds: &'a [f32],
        cos: &'a [f32],
        sin: &'a [f32],
        batch: &VlBatch<'a>,
    ) -> EmbedsBatch<'a> {
        EmbedsBatch {
            embeds,
            targets: batch.targets,
            rotary: Rotary::Angles { cos, sin },
            b: batch.b,
            t: batch.t,
        }
    }

    /// Forward and loss (sum over labelled tokens), keeping what [`Qwen25VL::backward`] needs.
    pub fn forward(
        &self,
        ws: &mut VlWorkspace,
        batch: &VlBatch,
        attn: &dyn AttentionOp,
    ) -> Result<LossStats, ModelError> {
        self.prepare(ws, batch, None)?;
        let eb = Self::embeds_batch(&ws.embeds, &ws.cos, &ws.sin, batch);
        self.lm.forward_embeds(&mut ws.lm, &eb, attn)
    }

    /// [`Qwen25VL::forward`] with the videos' merged features [Σ tokens, d] given (from the
    /// embedding cache or a sequence-parallel encode) instead of running the tower;
    /// `batch.videos.pixels` is not read.
    pub fn forward_with_features(
        &self,
        ws: &mut VlWorkspace,
        batch: &VlBatch,
        features: &[f32],
        attn: &dyn AttentionOp,
    ) -> Result<LossStats, ModelError> {
        self.prepare(ws, batch, Some(features))?;
        let eb = Self::embeds_batch(&ws.embeds, &ws.cos, &ws.sin, batch);
        self.lm.forward_embeds(&mut ws.lm, &eb, attn)
    }

    /// Everything before the decoder with the videos' merged features given: fills the
    /// workspace's input embeddings, 3-D positions and M-RoPE angles (read them with
    /// [`Qwen25VL::prepared`]), for callers that run the decoder themselves (sequence parallel).
    pub fn prepare_with_features(
        &self,
        ws: &mut VlWorkspace,
        batch: &VlBatch,
        features: &[f32],
    ) -> Result<(), ModelError> {
        self.prepare(ws, batch, Some(features))
    }

    /// The decoder's inputs for one sequence of `tokens` [T] whose videos' merged features
    /// [Σ tokens, d] come from outside (the embedding cache): input embeddings [T, d] with the
    /// `<|video_pad|>` rows replaced by the features in order, and the 3-D positions of every
    /// token ([`mrope_positions`], one `[t, h, w]` per token). What the rollout engine prefills a
    /// VLM prompt from; the checks are those of the training forward.
    pub fn sequence_inputs(
        &self,
        tokens: &[u32],
        grids: &[VideoGrid],
        second_per_grid_ts: &[f32],
        features: &[f32],
    ) -> Result<(Vec<f32>, Vec<[u32; 3]>), ModelError> {
        let t = tokens.len();
        let targets = vec![-100i32; t];
        let batch = VlBatch {
            tokens,
            targets: &targets,
            b: 1,
            t,
            videos: VideoBatch {
                pixels: &[],
                grids,
                second_per_grid_ts,
            },
        };
        let mut ws = self.workspace(CheckpointPolicy::Layer);
        self.prepare(&mut ws, &batch, Some(features))?;
        let p = &ws.positions;
        let ids = (0..t).map(|k| [p[k], p[t + k], p[2 * t + k]]).collect();
        Ok((std::mem::take(&mut ws.embeds), ids))
    }

    /// Input embeddings [B·T, d] (video rows filled) and M-RoPE cos/sin [B·T, D/2] of the last
    /// forward.
    pub fn prepared(ws: &VlWorkspace) -> (&[f32], &[f32], &[f32]) {
        (&ws.embeds, &ws.cos, &ws.sin)
    }

    /// Logits [B·T, V] (tests, small evaluations).
    pub fn logits(
        &self,
        ws: &mut VlWorkspace,
        batch: &VlBatch,
        attn: &dyn AttentionOp,
    ) -> Result<Vec<f32>, ModelError> {
        self.prepare(ws, batch, None)?;
        let eb = Self::embeds_batch(&ws.embeds, &ws.cos, &ws.sin, batch);
        self.lm.logits_embeds(&mut ws.lm, &eb, attn)
    }

    /// Backward of the last [`Qwen25VL::forward`] on the same batch for the loss
    /// `loss_scale · Σ token losses`; gradients accumulate into `lm_grads` (decoder layout) and
    /// `vision_grads` (tower layout).
    pub fn backward(
        &self,
        lm_grads: &mut [f32],
        vision_grads: &mut [f32],
        ws: &mut VlWorkspace,
        batch: &VlBatch,
        loss_scale: f32,
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        if vision_grads.len() != self.vision.params.len() {
            return Err(ModelError::Invalid(format!(
                "vision gradient buffer has {} values, the tower {}",
                vision_grads.len(),
                self.vision.params.len()
            )));
        }
        self.backward_features(lm_grads, ws, batch, loss_scale, attn)?;
        if !batch.videos.grids.is_empty() {
            self.vision
                .backward(vision_grads, &mut ws.vision, &ws.d_features)?;
        }
        Ok(())
    }

    /// The decoder part of [`Qwen25VL::backward`]: decoder gradients accumulate into `lm_grads`
    /// and ∂L/∂features [Σ tokens, d] (the video rows' input gradients, in order) is returned for
    /// whoever produced the features (the tower's backward, or nothing when it is frozen).
    pub fn backward_features<'w>(
        &self,
        lm_grads: &mut [f32],
        ws: &'w mut VlWorkspace,
        batch: &VlBatch,
        loss_scale: f32,
        attn: &dyn AttentionOp,
    ) -> Result<&'w [f32], ModelError> {
        let c = &self.config;
        let d = c.text.hidden_size;
        let eb = Self::embeds_batch(&ws.embeds, &ws.cos, &ws.sin, batch);
        let dx = self
            .lm
            .backward_embeds(lm_grads, &mut ws.lm, &eb, loss_scale, attn)?;
        ws.d_text.clear();
        ws.d_text.extend_from_slice(dx);
        // Placeholder rows go to the tower, the others to the embedding table.
        ws.d_features.clear();
        for (r, &tok) in batch.tokens.iter().enumerate() {
            if tok == c.video_token_id {
                let row = &mut ws.d_text[r * d..(r + 1) * d];
                ws.d_features.extend_from_slice(row);
                row.fill(0.0);
            }
        }
        embedding_backward(
            &mut lm_grads[self.lm.layout.embed.clone()],
            &ws.d_text,
            batch.tokens,
            d,
        );
        Ok(&ws.d_features)
    }

    /// Accumulates ∂L/∂embeddings `dx` [N, d] of rows `tokens` [N] into the embedding table's
    /// gradient (decoder layout), skipping video placeholder rows (their embeddings are vision
    /// features, not table rows) — the embedding lookup's backward for callers that run the
    /// decoder on input embeddings themselves (a frozen tower).
    pub fn text_embedding_backward(
        &self,
        lm_grads: &mut [f32],
        dx: &[f32],
        tokens: &[u32],
    ) -> Result<(), ModelError> {
        let d = self.config.text.hidden_size;
        if dx.len() != tokens.len() * d || lm_grads.len() != self.lm.params.len() {
            return Err(ModelError::Invalid(format!(
                "embedding backward: {} gradient values for {} rows of width {d}, gradient \
                 buffer {} for {} parameters",
                dx.len(),
                tokens.len(),
                lm_grads.len(),
                self.lm.params.len()
            )));
        }
        let vid = self.config.video_token_id;
        let mut text = dx.to_vec();
        for (r, &tok) in tokens.iter().enumerate() {
            if tok == vid {
                text[r * d..(r + 1) * d].fill(0.0);
            }
        }
        embedding_backward(
            &mut lm_grads[self.lm.layout.embed.clone()],
            &text,
            tokens,
            d,
        );
        Ok(())
    }
}

/// Maps transformers' module-path names to the saved ones.
fn saved_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        name.to_string()
    }
}

/// Loads a Qwen2.5-VL checkpoint folder (single file or sharded); every tensor is checked
/// against the config and a missing, unexpected or wrong-shaped one is refused by name.
pub fn load_vl_checkpoint(dir: &Path) -> Result<Qwen25VL, ModelError> {
    let config = Qwen25VLConfig::from_file(&dir.join("config.json"))?;
    let mut tensors = read_tensors(dir)?
        .into_iter()
        .map(|(k, v)| (saved_name(&k), v))
        .collect();
    let lm_layout = ParamLayout::new(&config.text);
    let vision_layout = VisionLayout::new(&config.vision);
    let lm = take_params(&lm_layout.entries, lm_layout.total(), &mut tensors, dir)?;
    let vision = take_params(
        &vision_layout.entries,
        vision_layout.total(),
        &mut tensors,
        dir,
    )?;
    if config.text.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(ModelError::Checkpoint {
            path: dir.display().to_string(),
            msg: format!(
                "unexpected tensor `{extra}` ({} unexpected in all) for a Qwen2.5-VL config",
                tensors.len()
            ),
        });
    }
    Qwen25VL::from_params(config, lm, vision)
}

/// The files of a Qwen2.5-VL checkpoint folder in `dtype` (config.json with its dtype set,
/// tensors under the names transformers saves, sharded past `max_shard_bytes`).
pub fn vl_model_files(
    model: &Qwen25VL,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<Vec<(String, Vec<u8>)>, ModelError> {
    let mut config = model.config.clone();
    config.text.dtype = dtype;
    let vision: Vec<TensorRef> = model
        .vision
        .layout
        .entries
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.shape.clone(),
                &model.vision.params[e.range.clone()],
            )
        })
        .collect();
    let lm = model.lm.layout.entries.iter().map(|e| {
        (
            e.name.clone(),
            e.shape.clone(),
            &model.lm.params[e.range.clone()],
        )
    });
    let tensors = vision.into_iter().chain(lm).collect();
    folder_files(&config.to_json(), tensors, dtype, max_shard_bytes)
}

/// Saves a Qwen2.5-VL model as an HF checkpoint folder that transformers loads, each file
/// written atomically.
pub fn save_vl_checkpoint(
    model: &Qwen25VL,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<(), ModelError> {
    write_folder(dir, &vl_model_files(model, dtype, max_shard_bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config.json of the published Qwen2.5-VL-7B-Instruct (transformers 4 layout: text
    /// fields at the top level, `rope_scaling` of type mrope, `in_chans`).
    fn published_7b() -> Value {
        serde_json::from_str(
            r#"{
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
            "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 18944, "max_position_embeddings": 128000,
            "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28,
            "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": true,
            "use_sliding_window": false,
            "vision_config": {
                "depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                "spatial_patch_size": 14, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                "temporal_patch_size": 2
            },
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vocab_size": 152064
        }"#,
        )
        .unwrap()
    }

    #[test]
    fn published_config_parses_and_round_trips() {
        let c = Qwen25VLConfig::from_json(&published_7b()).unwrap();
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.rope_theta, 1e6);
        assert_eq!(c.text.dtype, DType::BF16);
        assert_eq!(c.mrope_section, [16, 24, 24]);
        assert_eq!((c.vision.hidden_size, c.vision.in_channels), (1280, 3));
        assert_eq!(c.vision.window_units(), 4);
        assert_eq!(c.video_token_id, 151656);
        // 8.29B parameters, as the model card says.
        let total = ParamLayout::new(&c.text).total() + VisionLayout::new(&c.vision).total();
        assert!((8_280_000_000..8_300_000_000).contains(&total), "{total}");
        assert_eq!(Qwen25VLConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn inconsistent_configs_are_refused_naming_the_field() {
        for (edit, field) in [
            (
                json!({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 23]}}),
                "mrope_section",
            ),
            (
                json!({"vision_config": {"out_hidden_size": 1024}}),
                "out_hidden_size",
            ),
            (
                json!({"vision_config": {"hidden_act": "gelu"}}),
                "hidden_act",
            ),
            (json!({"vision_config": {"window_size": 20}}), "window_size"),
            (
                json!({"vision_config": {"fullatt_block_indexes": [40]}}),
                "fullatt_block_indexes",
            ),
            (json!({"model_type": "qwen2_vl"}), "model_type"),
        ] {
            let mut v = published_7b();
            for (k, x) in edit.as_object().unwrap() {
                match (v.get_mut(k), x) {
                    (Some(Value::Object(dst)), Value::Object(src)) if k == "vision_config" => {
                        for (kk, xx) in src {
                            dst.insert(kk.clone(), xx.clone());
                        }
                    }
                    _ => {
                        v[k] = x.clone();
                    }
                }
            }
            let e = Qwen25VLConfig::from_json(&v).unwrap_err();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
