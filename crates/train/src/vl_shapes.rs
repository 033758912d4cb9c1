//! Random-weight Qwen2.5-VL folders at the published model shapes, for benchmarks that need the
//! real sizes (memory, time) but not trained weights: `reel bench rl --rl-shape 3b|7b`.
//!
//! Shapes ([`VlShape`]), as the published `config.json` files of Qwen2.5-VL-3B/-7B-Instruct say:
//!
//! | shape | decoder d | layers | H / H_kv (D = 128) | I (MLP) | V | embeddings |
//! |---|---|---|---|---|---|---|
//! | 3b | 2048 | 36 | 16 / 2 | 11008 | 151936 | tied |
//! | 7b | 3584 | 28 | 28 / 4 | 18944 | 152064 | untied |
//!
//! Both: vision tower 32 blocks 1280 wide (16 heads of 80, MLP 3420, windows of 112 pixels, full
//! attention at blocks 7/15/23/31), merger to the decoder width, M-RoPE sections [16, 24, 24],
//! rope_theta 10⁶, RMSNorm ε 10⁻⁶, `max_position_embeddings` 128000 (or more when asked).
//!
//! The folder holds config.json, one bf16 `model.safetensors` and the character tokenizer with
//! the vision special tokens (its ids for `<|video_pad|>` etc. in config.json; the vocabulary
//! rows past the tokenizer are never sampled as text but are real rows of the tables), and a
//! video_preprocessor_config.json keeping `frame_side`² frames. Weights: every matrix uniform
//! with unit variance over its fan-in (±√(3/fan_in), fan_in = the product of the dimensions
//! after the first), biases zero, norm weights one — [`crate::vl::random_tower`]'s rule, applied
//! to the decoder too. They are generated straight into bf16, tensor by tensor, in chunks of
//! 2²⁰ values drawn in parallel from SplitMix64 streams keyed by (seed, tensor, chunk), and
//! written as they are made: the 3B folder (3.75 B parameters, 7.5 GB) needs no f32 copy.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use reel_model::vision::VisionLayout;
use reel_model::{ParamLayout, Qwen25VLConfig, Qwen2Config, VisionConfig};
use reel_tensor::DType;

/// A random-weight Qwen2.5-VL's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VlShape {
    /// The tiny VLM of [`crate::write_tiny_vl_model_with`] (decoder d 64, 2 layers; tower
    /// `VisionConfig::tiny`), f32.
    Tiny,
    /// Qwen2.5-VL-3B-Instruct's shapes (module docs).
    Qwen3b,
    /// Qwen2.5-VL-7B-Instruct's shapes (module docs).
    Qwen7b,
}

impl std::str::FromStr for VlShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(VlShape::Tiny),
            "3b" => Ok(VlShape::Qwen3b),
            "7b" => Ok(VlShape::Qwen7b),
            _ => Err(format!("unknown model shape `{s}` (tiny, 3b, 7b)")),
        }
    }
}

impl VlShape {
    /// The name `FromStr` reads.
    pub fn name(&self) -> &'static str {
        match self {
            VlShape::Tiny => "tiny",
            VlShape::Qwen3b => "3b",
            VlShape::Qwen7b => "7b",
        }
    }

    /// The decoder and tower configs of a published shape (`None` for [`VlShape::Tiny`]), with
    /// `max_position_embeddings` at least 128000 and at least `positions`.
    pub fn configs(&self, positions: usize) -> Option<(Qwen2Config, VisionConfig)> {
        let (d, layers, h, h_kv, i, v, tied) = match self {
            VlShape::Tiny => return None,
            VlShape::Qwen3b => (2048, 36, 16, 2, 11008, 151936, true),
            VlShape::Qwen7b => (3584, 28, 28, 4, 18944, 152064, false),
        };
        let text = Qwen2Config {
            vocab_size: v,
            hidden_size: d,
            intermediate_size: i,
            num_hidden_layers: layers,
            num_attention_heads: h,
            num_key_value_heads: h_kv,
            head_dim: d / h,
            max_position_embeddings: positions.max(128_000),
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tied,
            dtype: DType::BF16,
            bos_token_id: None,
            eos_token_id: None,
        };
        let vision = VisionConfig {
            depth: 32,
            hidden_size: 1280,
            intermediate_size: 3420,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            tokens_per_second: 2,
            window_size: 112,
            out_hidden_size: d,
            fullatt_block_indexes: vec![7, 15, 23, 31],
            rope_theta: 10000.0,
        };
        Some((text, vision))
    }
}

/// Writes a random-weight Qwen2.5-VL of `shape` to `dir` (module docs): the published shapes
/// with `max_position_embeddings` ≥ `positions`, or the tiny model
/// ([`crate::write_tiny_vl_model_with`] with `positions` rounded up to a power of two), frames
/// kept at `frame_side` pixels (a multiple of 28).
pub fn write_shaped_vl_model(
    dir: &Path,
    shape: VlShape,
    seed: u64,
    positions: usize,
    frame_side: usize,
) -> Result<()> {
    match shape.configs(positions) {
        None => {
            crate::write_tiny_vl_model_with(dir, seed, positions.next_power_of_two(), frame_side)
        }
        Some((text, vision)) => write_random_vl_model(dir, text, vision, seed, frame_side),
    }
}

/// Writes a random-weight Qwen2.5-VL with the decoder `text` and tower `vision` (the tower's
/// output width must be the decoder's), bf16, with the character tokenizer (module docs).
/// `text.vocab_size` must hold the tokenizer; its token ids are set from the tokenizer.
pub fn write_random_vl_model(
    dir: &Path,
    mut text: Qwen2Config,
    vision: VisionConfig,
    seed: u64,
    frame_side: usize,
) -> Result<()> {
    if frame_side == 0 || !frame_side.is_multiple_of(28) {
        bail!("frame side {frame_side} must be a positive multiple of 28 (patch 14, merge 2)");
    }
    if vision.out_hidden_size != text.hidden_size {
        bail!(
            "the tower's output width {} must be the decoder's width {}",
            vision.out_hidden_size,
            text.hidden_size
        );
    }
    let tok = reel_data::char_tokenizer_with(&reel_data::VISION_SPECIAL_TOKENS);
    if tok.vocab_size() > text.vocab_size {
        bail!(
            "a vocabulary of {} rows cannot hold the tokenizer's {} tokens",
            text.vocab_size,
            tok.vocab_size()
        );
    }
    let id = |t: &str| tok.token_to_id(t).context("tokenizer lacks a vision token");
    text.eos_token_id = tok.eos_token_id();
    text.dtype = DType::BF16;
    let config = Qwen25VLConfig {
        text,
        vision,
        mrope_section: [16, 24, 24],
        image_token_id: id("<|image_pad|>")?,
        video_token_id: id("<|video_pad|>")?,
        vision_start_token_id: id("<|vision_start|>")?,
        vision_end_token_id: id("<|vision_end|>")?,
    };
    // M-RoPE sections must cover the head's D/2 frequencies.
    let half = config.text.head_dim / 2;
    let config = if config.mrope_section.iter().sum::<usize>() == half {
        config
    } else {
        // Scaled-down shapes: the published proportions 2:3:3 of D/2.
        let t = half / 4;
        let h = (half - t) / 2;
        Qwen25VLConfig {
            mrope_section: [t, h, half - t - h],
            ..config
        }
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config.to_json())?)
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    // Check what was written reads back as the same config before spending time on weights.
    let back = Qwen25VLConfig::from_file(&cfg_path)?;
    if back != config {
        bail!(
            "{} does not read back as the config written",
            cfg_path.display()
        );
    }
    let lm = ParamLayout::new(&config.text);
    let vis = VisionLayout::new(&config.vision);
    let tensors: Vec<(&str, &[usize])> = vis
        .entries
        .iter()
        .chain(&lm.entries)
        .map(|e| (e.name.as_str(), e.shape.as_slice()))
        .collect();
    let st = dir.join("model.safetensors");
    write_random_bf16_safetensors(&st, &tensors, seed)
        .with_context(|| format!("writing {}", st.display()))?;
    tok.save(dir)?;
    let proc = serde_json::json!({
        "size": {"shortest_edge": frame_side * frame_side, "longest_edge": frame_side * frame_side},
        "patch_size": config.vision.patch_size,
        "temporal_patch_size": config.vision.temporal_patch_size,
        "merge_size": config.vision.spatial_merge_size,
    });
    std::fs::write(
        dir.join("video_preprocessor_config.json"),
        serde_json::to_string_pretty(&proc)?,
    )?;
    Ok(())
}

/// Values per independently seeded chunk.
const CHUNK: usize = 1 << 20;

/// SplitMix64's output function (Steele, Lea, Flood 2014): a full-period 64-bit mixer.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (the little-endian bf16 bytes of chunk `chunk` of tensor `tensor`) with values
/// uniform in ±`bound`.
fn fill_uniform(out: &mut [u8], seed: u64, tensor: usize, chunk: usize, bound: f32) {
    let mut s = seed ^ ((tensor as u64) << 40) ^ (chunk as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    splitmix64(&mut s);
    for pair in out.chunks_mut(4) {
        let r = splitmix64(&mut s);
        for (k, o) in pair.chunks_exact_mut(2).enumerate() {
            // 24 random bits → [0, 1) → [-bound, bound).
            let u = ((r >> (32 * k + 8)) & 0xff_ffff) as f32 / (1u32 << 24) as f32;
            o.copy_from_slice(&half::bf16::from_f32((2.0 * u - 1.0) * bound).to_le_bytes());
        }
    }
}

/// The value rule of one tensor (module docs): `None` for a constant (`Some` bound otherwise).
fn init_rule(name: &str, shape: &[usize]) -> (Option<f32>, f32) {
    if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        (Some((3.0 / fan_in.max(1) as f32).sqrt()), 0.0)
    } else if name.ends_with("bias") {
        (None, 0.0)
    } else {
        (None, 1.0)
    }
}

/// Writes `tensors` (name, shape) as one bf16 safetensors file at `path`, each value drawn by
/// [`init_rule`] (module docs).
fn write_random_bf16_safetensors(
    path: &Path,
    tensors: &[(&str, &[usize])],
    seed: u64,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The data starts 8-byte aligned, as the safetensors writer pads it.
    while !(8 + head.len()).is_multiple_of(8) {
        head.push(b' ');
    }
    let f = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 24, f);
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(&head)?;
    let mut buf: Vec<u8> = Vec::new();
    for (t, (name, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let (bound, constant) = init_rule(name, shape);
        buf.clear();
        match bound {
            None => {
                let c = half::bf16::from_f32(constant).to_le_bytes();
                buf.extend((0..n).flat_map(|_| c));
            }
            Some(b) => {
                buf.resize(2 * n, 0);
                buf.par_chunks_mut(2 * CHUNK)
                    .enumerate()
                    .for_each(|(c, out)| fill_uniform(out, seed, t, c, b));
            }
        }
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_shapes_have_the_published_sizes() {
        let (t, v) = VlShape::Qwen3b.configs(0).unwrap();
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads),
            (2048, 36, 16)
        );
        assert_eq!(
            (t.num_key_value_heads, t.intermediate_size, t.vocab_size),
            (2, 11008, 151936)
        );
        assert!(t.tie_word_embeddings);
        assert_eq!(
            (v.depth, v.hidden_size, v.out_hidden_size),
            (32, 1280, 2048)
        );
        // 3.75 B parameters: 3.09 B decoder (tied) + 0.67 B tower, as the model card's 3.75 B.
        let n = ParamLayout::new(&t).total() + VisionLayout::new(&v).total();
        assert!((3_740_000_000..3_760_000_000).contains(&n), "{n}");
        let (t, v) = VlShape::Qwen7b.configs(200_000).unwrap();
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads),
            (3584, 28, 28)
        );
        assert_eq!(
            (t.num_key_value_heads, t.intermediate_size, t.vocab_size),
            (4, 18944, 152064)
        );
        assert!(!t.tie_word_embeddings);
        assert_eq!(t.max_position_embeddings, 200_000);
        assert_eq!(v.out_hidden_size, 3584);
        // 8.29 B parameters, as the published config gives (reel_model's round-trip test).
        let n = ParamLayout::new(&t).total() + VisionLayout::new(&v).total();
        assert!((8_280_000_000..8_300_000_000).contains(&n), "{n}");
        assert!(VlShape::Tiny.configs(0).is_none());
        assert_eq!("7b".parse::<VlShape>(), Ok(VlShape::Qwen7b));
        assert!("13b"
            .parse::<VlShape>()
            .unwrap_err()
            .contains("tiny, 3b, 7b"));
    }

    /// The 3B shape scaled down (fewer and narrower layers, a small vocabulary) written and read
    /// back: the config and every tensor through the checkpoint loader, values by the rule.
    #[test]
    fn a_scaled_down_shape_round_trips_through_the_loader() {
        let tmp = tempfile::tempdir().unwrap();
        for tied in [true, false] {
            let (mut t, mut v) = VlShape::Qwen3b.configs(0).unwrap();
            t.hidden_size = 128;
            t.num_attention_heads = 4;
            t.num_key_value_heads = 2;
            t.head_dim = 32;
            t.intermediate_size = 200;
            t.num_hidden_layers = 3;
            t.vocab_size = 640;
            t.tie_word_embeddings = tied;
            v.depth = 4;
            v.hidden_size = 64;
            v.num_heads = 4;
            v.intermediate_size = 96;
            v.fullatt_block_indexes = vec![1, 3];
            v.out_hidden_size = 128;
            let dir = tmp.path().join(format!("tied-{tied}"));
            write_random_vl_model(&dir, t.clone(), v.clone(), 7, 56).unwrap();
            let c = Qwen25VLConfig::from_file(&dir.join("config.json")).unwrap();
            assert_eq!(c.text.hidden_size, 128);
            assert_eq!(c.text.num_hidden_layers, 3);
            assert_eq!(c.text.vocab_size, 640);
            assert_eq!(c.text.tie_word_embeddings, tied);
            assert_eq!(c.text.dtype, DType::BF16);
            assert_eq!(c.text.max_position_embeddings, 128_000);
            assert_eq!(c.vision, v);
            assert_eq!(c.mrope_section.iter().sum::<usize>(), 16);
            let m = reel_model::load_vl_checkpoint(&dir).unwrap();
            assert_eq!(m.lm.params.len(), ParamLayout::new(&c.text).total());
            // Norm weights one, biases zero, matrices within ±√(3/fan_in) and not constant.
            for e in &m.lm.layout.entries {
                let x = &m.lm.params[e.range.clone()];
                match init_rule(&e.name, &e.shape) {
                    (None, c) => assert!(x.iter().all(|&y| y == c), "{}", e.name),
                    (Some(b), _) => {
                        assert!(x.iter().all(|&y| y.abs() <= b * 1.01), "{}", e.name);
                        let mean_sq = x.iter().map(|y| y * y).sum::<f32>() / x.len() as f32;
                        // Uniform on ±b has variance b²/3.
                        let want = b * b / 3.0;
                        assert!((mean_sq / want - 1.0).abs() < 0.2, "{}: {mean_sq}", e.name);
                    }
                }
            }
            let tok = reel_data::Tokenizer::from_dir(&dir).unwrap();
            assert_eq!(tok.token_to_id("<|video_pad|>"), Some(c.video_token_id));
            let p = reel_data::VideoProcessorConfig::from_dir(&dir).unwrap();
            assert_eq!(p.max_pixels, 56 * 56);
        }
        // The same seed gives the same file; another seed another.
        let (mut t, mut v) = VlShape::Qwen7b.configs(0).unwrap();
        t.hidden_size = 64;
        t.head_dim = 32;
        t.num_attention_heads = 2;
        t.num_key_value_heads = 1;
        t.intermediate_size = 96;
        t.num_hidden_layers = 1;
        t.vocab_size = 512;
        v.depth = 1;
        v.hidden_size = 32;
        v.num_heads = 2;
        v.intermediate_size = 48;
        v.fullatt_block_indexes = vec![0];
        v.out_hidden_size = 64;
        let read = |seed: u64, name: &str| {
            let d = tmp.path().join(name);
            write_random_vl_model(&d, t.clone(), v.clone(), seed, 28).unwrap();
            std::fs::read(d.join("model.safetensors")).unwrap()
        };
        assert_eq!(read(1, "a"), read(1, "b"));
        assert_ne!(read(1, "a"), read(2, "c"));
        let e = write_random_vl_model(&tmp.path().join("bad"), t.clone(), v.clone(), 1, 30)
            .unwrap_err();
        assert!(e.to_string().contains("multiple of 28"), "{e}");
        v.out_hidden_size = 32;
        let e = write_random_vl_model(&tmp.path().join("bad"), t, v, 1, 28).unwrap_err();
        assert!(e.to_string().contains("output width"), "{e}");
    }
}
