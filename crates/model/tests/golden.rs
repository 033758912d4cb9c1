//! reel's Qwen2 against transformers: logits, loss, every parameter gradient (under each
//! checkpoint policy), a 10-step AdamW loss trace and greedy generation, from the fixtures that
//! `scripts/make_fixtures.py` wrote with transformers 5.17 / PyTorch 2.11 in fp32.

use reel_kernels::attention::AttnShape;
use reel_model::generate::SamplingParams;
use reel_model::{
    load_checkpoint, save_checkpoint, AttentionError, AttentionOp, CheckpointPolicy,
    LocalAttention, Qwen2, TokenBatch, Workspace,
};
use reel_optim::{AdamW, AdamWConfig};
use reel_tensor::{check_close, DType, Tolerance};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

struct Golden {
    ints: HashMap<String, (Vec<usize>, Vec<i32>)>,
    floats: HashMap<String, Vec<f32>>,
}

fn golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut g = Golden {
        ints: HashMap::new(),
        floats: HashMap::new(),
    };
    for (name, view) in st.tensors() {
        let data = view.data();
        match view.dtype() {
            safetensors::Dtype::I32 => {
                let v = data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                g.ints.insert(name, (view.shape().to_vec(), v));
            }
            safetensors::Dtype::F32 => {
                let v = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                g.floats.insert(name, v);
            }
            other => panic!("unexpected dtype {other:?} for {name}"),
        }
    }
    g
}

struct Inputs {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    positions: Vec<u32>,
    b: usize,
    t: usize,
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
        Inputs {
            tokens: ids.iter().map(|&x| x as u32).collect(),
            targets,
            positions: reel_model::default_positions(b, t),
            b,
            t,
        }
    }
    fn batch(&self) -> TokenBatch<'_> {
        TokenBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            positions: &self.positions,
            b: self.b,
            t: self.t,
        }
    }
}

/// Counts attention forwards, to check what each checkpoint policy recomputes.
#[derive(Default)]
struct CountingAttention(AtomicUsize);

impl AttentionOp for CountingAttention {
    fn forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        LocalAttention.forward(out, lse, q, k, v, shape)
    }
    fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) -> Result<(), AttentionError> {
        LocalAttention.backward(dq, dk, dv, dout, q, k, v, out, lse, shape)
    }
}

fn loss_and_grads(
    model: &Qwen2,
    inputs: &Inputs,
    policy: CheckpointPolicy,
) -> (f64, Vec<f32>, usize, usize) {
    let mut ws = Workspace::new(&model.config, policy);
    let attn = CountingAttention::default();
    let stats = model.forward(&mut ws, &inputs.batch(), &attn).unwrap();
    let mut grads = vec![0.0f32; model.params.len()];
    model
        .backward(
            &mut grads,
            &mut ws,
            &inputs.batch(),
            1.0 / stats.n_tokens as f32,
            &attn,
        )
        .unwrap();
    (
        stats.mean(),
        grads,
        attn.0.load(Ordering::Relaxed),
        ws.saved_activation_bytes(),
    )
}

fn check_model(name: &str) {
    let dir = fixture(name);
    let model = load_checkpoint(&dir).unwrap();
    let g = golden(&dir);
    let inputs = Inputs::from(&g);
    let layers = model.config.num_hidden_layers;

    let mut ws = Workspace::new(&model.config, CheckpointPolicy::None);
    let logits = model
        .logits(
            &mut ws,
            &inputs.tokens,
            &inputs.positions,
            inputs.b,
            inputs.t,
            &LocalAttention,
        )
        .unwrap();
    check_close(
        "logits",
        &logits,
        &g.floats["logits"],
        Tolerance::new(2e-5, 1e-4),
    )
    .unwrap();

    let expected_loss = g.floats["loss"][0] as f64;
    let mut bytes = Vec::new();
    for (policy, attention_forwards) in [
        (CheckpointPolicy::None, layers),
        (CheckpointPolicy::Layer, 2 * layers),
        (CheckpointPolicy::Remat, layers),
    ] {
        let (loss, grads, forwards, saved) = loss_and_grads(&model, &inputs, policy);
        assert!(
            (loss - expected_loss).abs() < 1e-5 * expected_loss.abs(),
            "{name} {policy}: loss {loss} vs transformers {expected_loss}"
        );
        assert_eq!(
            forwards, attention_forwards,
            "{policy}: attention forwards per step"
        );
        for e in &model.layout.entries {
            let expected = &g.floats[&format!("grad.{}", e.name)];
            let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            check_close(
                &format!("{name} {policy} grad.{}", e.name),
                &grads[e.range.clone()],
                expected,
                Tolerance::new(1e-4 * scale + 1e-7, 1e-3),
            )
            .unwrap();
        }
        bytes.push((policy, saved));
        println!("{name}: policy {policy}: saved activations {saved} bytes");
    }
    // Memory ordering: none keeps most, layer least, remat in between (once there are enough
    // layers for the one recomputation scratch layer not to dominate).
    if layers >= 2 {
        assert!(
            bytes[0].1 > bytes[2].1 && bytes[2].1 > bytes[1].1,
            "{bytes:?}"
        );
    }

    // 10 AdamW steps on the same batch, as the fixture script ran them.
    let mut model = model;
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let sizes: Vec<usize> = model.layout.entries.iter().map(|e| e.range.len()).collect();
    let decay: Vec<bool> = model.layout.entries.iter().map(|e| e.decay).collect();
    let mut opt = AdamW::new(&sizes, &decay, cfg);
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
    let mut grads = vec![0.0f32; model.params.len()];
    let mut trace = Vec::new();
    for _ in 0..10 {
        let stats = model
            .forward(&mut ws, &inputs.batch(), &LocalAttention)
            .unwrap();
        trace.push(stats.mean() as f32);
        grads.fill(0.0);
        model
            .backward(
                &mut grads,
                &mut ws,
                &inputs.batch(),
                1.0 / stats.n_tokens as f32,
                &LocalAttention,
            )
            .unwrap();
        let layout = model.layout.clone();
        let mut p = layout.split_mut(&mut model.params);
        let mut gr = layout.split_mut(&mut grads);
        let g_ro: Vec<&[f32]> = gr.iter_mut().map(|s| &**s).collect();
        opt.step(&mut p, &g_ro, 1e-2);
    }
    check_close(
        "adamw trace",
        &trace,
        &g.floats["trace"],
        Tolerance::new(1e-4, 2e-3),
    )
    .unwrap();
}

#[test]
fn qwen2_matches_transformers_untied_gqa() {
    check_model("qwen2-tiny");
}

#[test]
fn qwen2_matches_transformers_tied_mqa() {
    check_model("qwen2-tiny-tied");
}

#[test]
fn greedy_generation_matches_transformers() {
    let dir = fixture("qwen2-tiny");
    let model = load_checkpoint(&dir).unwrap();
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gen.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        gen[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let expected = ids("generated_ids");
    let out = model
        .generate(
            &ids("prompt_ids"),
            expected.len(),
            &[],
            &SamplingParams::default(),
        )
        .unwrap();
    assert_eq!(out, expected);
}

#[test]
fn save_and_load_round_trip_single_sharded_and_bf16() {
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    save_checkpoint(&model, &single, DType::F32, usize::MAX).unwrap();
    assert!(single.join("model.safetensors").exists());
    assert_eq!(load_checkpoint(&single).unwrap().params, model.params);

    let sharded = tmp.path().join("sharded");
    save_checkpoint(&model, &sharded, DType::F32, 100_000).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(!sharded.join("model.safetensors").exists());
    assert_eq!(load_checkpoint(&sharded).unwrap().params, model.params);

    let half = tmp.path().join("bf16");
    save_checkpoint(&model, &half, DType::BF16, usize::MAX).unwrap();
    let back = load_checkpoint(&half).unwrap();
    assert_eq!(back.config.dtype, DType::BF16);
    // Saving that model in f32 says float32 in config.json, whatever it was loaded from.
    let files = reel_model::io::model_files(&back, DType::F32, usize::MAX).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!(files[0].0, "config.json");
    assert_eq!(cfg["dtype"], "float32");
    check_close(
        "bf16 weights",
        &back.params,
        &model.params,
        Tolerance::new(1e-6, 8e-3),
    )
    .unwrap();
}

#[test]
fn mismatched_checkpoints_name_the_tensor() {
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    save_checkpoint(&model, dir, DType::F32, usize::MAX).unwrap();

    let mut wrong = model.config.to_json();
    wrong["intermediate_size"] = serde_json::json!(128);
    std::fs::write(dir.join("config.json"), wrong.to_string()).unwrap();
    let err = load_checkpoint(dir).err().unwrap().to_string();
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight"), "{err}");
    assert!(err.contains("[160, 64]"), "{err}");

    let mut more = model.config.to_json();
    more["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(dir.join("config.json"), more.to_string()).unwrap();
    let err = load_checkpoint(dir).err().unwrap().to_string();
    assert!(
        err.contains("model.layers.2.") && err.contains("missing"),
        "{err}"
    );

    let mut fewer = model.config.to_json();
    fewer["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(dir.join("config.json"), fewer.to_string()).unwrap();
    let err = load_checkpoint(dir).err().unwrap().to_string();
    assert!(err.contains("unexpected tensor `model.layers.1."), "{err}");

    let err = load_checkpoint(&tmp.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope") && err.contains("config.json"), "{err}");
}

#[test]
fn bad_batches_are_refused() {
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
    let batch = TokenBatch {
        tokens: &[1, 2, 500],
        targets: &[2, 500, -100],
        positions: &[0, 1, 2],
        b: 1,
        t: 3,
    };
    let err = model
        .forward(&mut ws, &batch, &LocalAttention)
        .unwrap_err()
        .to_string();
    assert!(err.contains("500"), "{err}");
}

#[test]
fn generation_stops_at_the_position_limit_and_refuses_bad_parameters() {
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let max_pos = model.config.max_position_embeddings;
    let prompt: Vec<u32> = (0..max_pos as u32 - 5).map(|i| i % 90).collect();
    let out = model
        .generate(&prompt, usize::MAX, &[], &SamplingParams::default())
        .unwrap();
    assert_eq!(out.len(), 5, "generation keeps what fits in the positions");
    let bad = SamplingParams {
        temperature: f32::NAN,
        ..SamplingParams::default()
    };
    assert!(model.generate(&prompt[..4], 3, &[], &bad).is_err());
    assert!(model
        .generate(&[], 3, &[], &SamplingParams::default())
        .is_err());
}
