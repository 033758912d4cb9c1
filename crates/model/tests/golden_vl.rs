//! reel's Qwen2.5-VL against transformers: 3-D rotary positions, vision tower features, logits,
//! loss and every parameter gradient (decoder under each checkpoint policy, tower, merger), from
//! the fixture `scripts/make_vl_fixtures.py` wrote with transformers 5.17 / PyTorch 2.11 in fp32;
//! HF folder save → load round trips and refusals of bad checkpoints.

use reel_model::io::{read_tensors, safetensors_bytes, TensorRef};
use reel_model::vl::{mrope_positions, vl_model_files};
use reel_model::{
    load_vl_checkpoint, save_vl_checkpoint, CheckpointPolicy, LocalAttention, Qwen25VL, VideoBatch,
    VideoGrid, VisionWorkspace, VlBatch,
};
use reel_tensor::{check_close, DType, Tolerance};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2_5_vl-tiny")
}

struct Golden {
    ints: HashMap<String, (Vec<usize>, Vec<i32>)>,
    floats: HashMap<String, Vec<f32>>,
}

fn golden() -> Golden {
    let bytes = std::fs::read(fixture().join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut g = Golden {
        ints: HashMap::new(),
        floats: HashMap::new(),
    };
    for (name, view) in st.tensors() {
        let words = view
            .data()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]]);
        match view.dtype() {
            safetensors::Dtype::I32 => {
                let v = words.map(i32::from_le_bytes).collect();
                g.ints.insert(name, (view.shape().to_vec(), v));
            }
            safetensors::Dtype::F32 => {
                g.floats
                    .insert(name, words.map(f32::from_le_bytes).collect());
            }
            other => panic!("unexpected dtype {other:?} for {name}"),
        }
    }
    g
}

struct Inputs {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    b: usize,
    t: usize,
    pixels: Vec<f32>,
    grids: Vec<VideoGrid>,
    seconds: Vec<f32>,
}

impl Inputs {
    fn from(g: &Golden) -> Self {
        let (shape, ids) = &g.ints["input_ids"];
        let (_, labels) = &g.ints["labels"];
        let (b, t) = (shape[0], shape[1]);
        // transformers shifts inside the loss: position i predicts labels[i + 1].
        let mut targets = vec![-100i32; b * t];
        for r in 0..b {
            for i in 0..t - 1 {
                targets[r * t + i] = labels[r * t + i + 1];
            }
        }
        let grids = g.ints["video_grid_thw"]
            .1
            .chunks_exact(3)
            .map(|x| VideoGrid {
                t: x[0] as usize,
                h: x[1] as usize,
                w: x[2] as usize,
            })
            .collect();
        Inputs {
            tokens: ids.iter().map(|&x| x as u32).collect(),
            targets,
            b,
            t,
            pixels: g.floats["pixel_values_videos"].clone(),
            grids,
            seconds: g.floats["second_per_grid_ts"].clone(),
        }
    }

    fn batch(&self) -> VlBatch<'_> {
        VlBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            b: self.b,
            t: self.t,
            videos: VideoBatch {
                pixels: &self.pixels,
                grids: &self.grids,
                second_per_grid_ts: &self.seconds,
            },
        }
    }
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

#[test]
fn positions_match_transformers() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let g = golden();
    let inp = Inputs::from(&g);
    let pos = mrope_positions(
        &model.config,
        &inp.tokens,
        inp.b,
        inp.t,
        &inp.grids,
        &inp.seconds,
    )
    .unwrap();
    let expected: Vec<u32> = g.ints["position_ids"].1.iter().map(|&x| x as u32).collect();
    assert_eq!(pos, expected);
    // Half a second per temporal patch at 2 tokens per second: one position per patch (the
    // temporal axis is scaled before truncation).
    let grid = [VideoGrid { t: 3, h: 4, w: 4 }];
    let vid = model.config.video_token_id;
    let mut tokens = vec![5u32; 2];
    tokens.extend(std::iter::repeat_n(vid, 12));
    tokens.push(7);
    let p = mrope_positions(&model.config, &tokens, 1, 15, &grid, &[0.5]).unwrap();
    let n = tokens.len();
    assert_eq!(&p[..n], &[0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4]);
    assert_eq!(&p[n..2 * n], &[0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 2, 2, 3, 3, 4]);
    // A run that does not match its grid is refused.
    let e = mrope_positions(&model.config, &tokens[..13], 1, 13, &grid, &[0.5]).unwrap_err();
    assert!(e.to_string().contains("placeholder"), "{e}");
}

#[test]
fn vision_features_match_transformers() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let g = golden();
    let inp = Inputs::from(&g);
    let plan = reel_model::vision::VisionPlan::new(&model.config.vision, &inp.grids).unwrap();
    // The windows really permute the merge units and one window was dropped as empty padding.
    assert!(plan.window_index.windows(2).any(|w| w[1] < w[0]));
    assert!(plan.cu_window_seqlens.len() > plan.cu_seqlens.len());
    let mut ws = VisionWorkspace::new();
    let out = model
        .vision
        .forward(&mut ws, &inp.pixels, &inp.grids)
        .unwrap();
    let expected = &g.floats["video_embeds"];
    check_close(
        "video_embeds",
        out,
        expected,
        Tolerance::new(1e-5 * max_abs(expected), 1e-4),
    )
    .unwrap();
}

#[test]
fn logits_and_loss_match_transformers() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let g = golden();
    let inp = Inputs::from(&g);
    let mut ws = model.workspace(CheckpointPolicy::None);
    let logits = model
        .logits(&mut ws, &inp.batch(), &LocalAttention)
        .unwrap();
    check_close(
        "logits",
        &logits,
        &g.floats["logits"],
        Tolerance::new(2e-5, 1e-4),
    )
    .unwrap();
    let stats = model
        .forward(&mut ws, &inp.batch(), &LocalAttention)
        .unwrap();
    let expected = g.floats["loss"][0] as f64;
    assert!(
        (stats.mean() - expected).abs() < 1e-5 * expected,
        "loss {} vs transformers {expected}",
        stats.mean()
    );
}

/// Maps a transformers parameter name to (decoder?, saved name).
fn golden_grad<'a>(g: &'a Golden, saved: &str) -> &'a [f32] {
    let module = if let Some(rest) = saved.strip_prefix("visual.") {
        format!("grad.model.visual.{rest}")
    } else if let Some(rest) = saved.strip_prefix("model.") {
        format!("grad.model.language_model.{rest}")
    } else {
        format!("grad.{saved}")
    };
    g.floats
        .get(&module)
        .unwrap_or_else(|| panic!("no {module}"))
}

fn grads_of(model: &Qwen25VL, inp: &Inputs, policy: CheckpointPolicy) -> (f64, Vec<f32>, Vec<f32>) {
    let mut ws = model.workspace(policy);
    let stats = model
        .forward(&mut ws, &inp.batch(), &LocalAttention)
        .unwrap();
    let mut lm = vec![0.0f32; model.lm.params.len()];
    let mut vision = vec![0.0f32; model.vision.params.len()];
    model
        .backward(
            &mut lm,
            &mut vision,
            &mut ws,
            &inp.batch(),
            1.0 / stats.n_tokens as f32,
            &LocalAttention,
        )
        .unwrap();
    (stats.mean(), lm, vision)
}

#[test]
fn every_gradient_matches_transformers_under_each_policy() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let g = golden();
    let inp = Inputs::from(&g);
    let expected_loss = g.floats["loss"][0] as f64;
    let n_grads = g.floats.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        n_grads,
        model.lm.layout.entries.len() + model.vision.layout.entries.len()
    );
    for policy in [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ] {
        let (loss, lm, vision) = grads_of(&model, &inp, policy);
        assert!(
            (loss - expected_loss).abs() < 1e-5 * expected_loss,
            "{policy}: loss {loss} vs {expected_loss}"
        );
        let parts = [
            (&model.lm.layout.entries, &lm),
            (&model.vision.layout.entries, &vision),
        ];
        for (entries, grads) in parts {
            for e in entries {
                let expected = golden_grad(&g, &e.name);
                let scale = max_abs(expected);
                assert!(scale > 0.0, "{}: transformers' gradient is zero", e.name);
                check_close(
                    &format!("{policy} grad.{}", e.name),
                    &grads[e.range.clone()],
                    expected,
                    Tolerance::new(2e-4 * scale + 1e-7, 2e-3),
                )
                .unwrap();
            }
        }
    }
}

fn assert_same_model(a: &Qwen25VL, b: &Qwen25VL) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.lm.params, b.lm.params);
    assert_eq!(a.vision.params, b.vision.params);
}

#[test]
fn save_load_round_trip_single_and_sharded() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    save_vl_checkpoint(&model, &single, DType::F32, usize::MAX).unwrap();
    assert!(single.join("model.safetensors").exists());
    assert_same_model(&model, &load_vl_checkpoint(&single).unwrap());
    // The same tensor names and shapes transformers wrote.
    let ours = read_tensors(&single).unwrap();
    let theirs = read_tensors(&fixture()).unwrap();
    let mut a: Vec<_> = ours.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    let mut b: Vec<_> = theirs
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let sharded = tmp.path().join("sharded");
    save_vl_checkpoint(&model, &sharded, DType::F32, 200_000).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert_same_model(&model, &load_vl_checkpoint(&sharded).unwrap());
    // bf16 files are half the size and load back rounded.
    let files = vl_model_files(&model, DType::BF16, usize::MAX).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
}

/// Writes a copy of the fixture folder whose tensors pass through `edit`.
fn edited_fixture(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors: Vec<_> = read_tensors(&fixture())
        .unwrap()
        .into_iter()
        .map(|(k, (s, v))| (k, s, v))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let refs: Vec<TensorRef> = tensors
        .iter()
        .map(|(k, s, v)| (k.clone(), s.clone(), v.as_slice()))
        .collect();
    let bytes = safetensors_bytes(&refs, DType::F32, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir.to_path_buf()
}

#[test]
fn module_path_names_load_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_fixture(&tmp.path().join("modpath"), |ts| {
        for (k, _, _) in ts.iter_mut() {
            if let Some(rest) = k.strip_prefix("visual.") {
                *k = format!("model.visual.{rest}");
            } else if let Some(rest) = k.strip_prefix("model.") {
                *k = format!("model.language_model.{rest}");
            }
        }
    });
    assert_same_model(
        &load_vl_checkpoint(&fixture()).unwrap(),
        &load_vl_checkpoint(&dir).unwrap(),
    );
}

#[test]
fn bad_checkpoints_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "visual.blocks.2.attn.qkv.bias";
    let dir = edited_fixture(&tmp.path().join("shape"), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        t.1 = vec![t.1[0] - 1];
        t.2.pop();
    });
    let e = load_vl_checkpoint(&dir).err().expect("refused").to_string();
    assert!(e.contains(name) && e.contains("shape"), "{e}");

    let dir = edited_fixture(&tmp.path().join("missing"), |ts| {
        ts.retain(|t| t.0 != "visual.merger.mlp.2.bias")
    });
    let e = load_vl_checkpoint(&dir).err().expect("refused").to_string();
    assert!(
        e.contains("visual.merger.mlp.2.bias") && e.contains("missing"),
        "{e}"
    );

    let dir = edited_fixture(&tmp.path().join("extra"), |ts| {
        ts.push(("visual.extra.weight".into(), vec![2], vec![0.0, 1.0]))
    });
    let e = load_vl_checkpoint(&dir).err().expect("refused").to_string();
    assert!(e.contains("visual.extra.weight"), "{e}");
}

#[test]
fn bad_inputs_are_refused() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let g = golden();
    let mut inp = Inputs::from(&g);
    let mut ws = model.workspace(CheckpointPolicy::Remat);
    // One placeholder too few for the videos.
    let r = inp
        .tokens
        .iter()
        .position(|&x| x == model.config.video_token_id)
        .unwrap();
    inp.tokens[r] = 5;
    let e = model
        .forward(&mut ws, &inp.batch(), &LocalAttention)
        .unwrap_err();
    assert!(e.to_string().contains("placeholder"), "{e}");
    let mut inp = Inputs::from(&g);
    inp.pixels.pop();
    let e = model
        .forward(&mut ws, &inp.batch(), &LocalAttention)
        .unwrap_err();
    assert!(e.to_string().contains("pixel_values_videos"), "{e}");
    let mut inp = Inputs::from(&g);
    inp.grids[0].w = 9;
    let e = model
        .forward(&mut ws, &inp.batch(), &LocalAttention)
        .unwrap_err();
    assert!(e.to_string().contains("spatial_merge_size"), "{e}");
}

/// Without videos the M-RoPE positions are equal on all three axes, so the VLM is the plain
/// decoder: same logits as `Qwen2::logits` at positions 0..T.
#[test]
fn text_only_batch_is_the_plain_decoder() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let (b, t) = (2, 9);
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 37 % 280) as u32).collect();
    let targets = vec![-1i32; b * t];
    let batch = VlBatch {
        tokens: &tokens,
        targets: &targets,
        b,
        t,
        videos: VideoBatch {
            pixels: &[],
            grids: &[],
            second_per_grid_ts: &[],
        },
    };
    let mut ws = model.workspace(CheckpointPolicy::Remat);
    let vl = model.logits(&mut ws, &batch, &LocalAttention).unwrap();
    let mut lws = reel_model::Workspace::new(&model.config.text, CheckpointPolicy::Remat);
    let positions = reel_model::default_positions(b, t);
    let plain = model
        .lm
        .logits(&mut lws, &tokens, &positions, b, t, &LocalAttention)
        .unwrap();
    assert_eq!(vl, plain);
}

/// Features encoded once and passed in give the same loss and gradients as the full model:
/// the decoder's directly, the tower's through its backward on the returned feature gradient.
#[test]
fn cached_features_give_the_same_loss_and_gradients() {
    let model = load_vl_checkpoint(&fixture()).unwrap();
    let inp = Inputs::from(&golden());
    let (loss, lm, vision) = grads_of(&model, &inp, CheckpointPolicy::Remat);

    let mut vws = VisionWorkspace::new();
    let features = model
        .vision
        .forward(&mut vws, &inp.pixels, &inp.grids)
        .unwrap()
        .to_vec();
    let no_pixels = Inputs {
        pixels: Vec::new(),
        ..Inputs::from(&golden())
    };
    let mut ws = model.workspace(CheckpointPolicy::Remat);
    let stats = model
        .forward_with_features(&mut ws, &no_pixels.batch(), &features, &LocalAttention)
        .unwrap();
    assert_eq!(stats.mean(), loss);
    let mut lm2 = vec![0.0f32; lm.len()];
    let dfeat = model
        .backward_features(
            &mut lm2,
            &mut ws,
            &no_pixels.batch(),
            1.0 / stats.n_tokens as f32,
            &LocalAttention,
        )
        .unwrap()
        .to_vec();
    assert_eq!(lm2, lm);
    let mut vision2 = vec![0.0f32; vision.len()];
    model
        .vision
        .backward(&mut vision2, &mut vws, &dfeat)
        .unwrap();
    assert_eq!(vision2, vision);
    // Features of the wrong size are refused.
    let e = model
        .forward_with_features(&mut ws, &no_pixels.batch(), &features[1..], &LocalAttention)
        .unwrap_err();
    assert!(e.to_string().contains("video features have"), "{e}");
}
