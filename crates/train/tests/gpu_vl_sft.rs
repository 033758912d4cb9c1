//! Qwen2.5-VL SFT with the decoder on the GPU against the CPU.
//!
//! (a) `GpuQwen2::forward_embeds`/`backward_embeds` on a tiny Qwen2.5-VL's decoder (tied and
//! untied embeddings, each checkpoint policy) against `Qwen2::forward_embeds`/`backward_embeds`
//! plus `Qwen25VL::text_embedding_backward`: one sequence with two videos' feature rows and its
//! M-RoPE angles; the loss, every decoder gradient tensor (the embedding table's text rows
//! included) and ∂L/∂embeddings of every row agree within bf16 tolerance.
//! (b) `run_sft` on a tiny Qwen2.5-VL and synthetic video records, once on the CPU and on the GPU
//! (one rank; sp = 2 in-process ranks sharing the GPU; dp = 2 replicas sharing it, against the
//! CPU run with dp = 2): every step's loss and the held-out loss
//! agree within bf16 tolerance, the frozen tower stays put, the checkpoint loads, an interrupted
//! GPU run resumes onto its own curve, and a trained tower is refused on "cuda".
//! (c) The same GPU run with its videos encoded by the frozen tower on the GPU
//! (`video.gpu_tower` "f32", "bf16"; one rank and sp = 2 ranks sharing the tower) against the CPU
//! tower ("off"): the same loss curve (f32: to float rounding; bf16: within bf16 tolerance), the
//! same cache traffic, and the metrics name where the tower ran.
//!
//! Needs the `cuda` feature and a GPU; opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-train --features cuda --release --test gpu_vl_sft -- --nocapture
#![cfg(feature = "cuda")]

mod common;

use common::{gpu_tests_enabled as enabled, rel_norm_err};

use rand::Rng as _;
use reel_cuda::{Gpu, GpuEmbedsBatch, GpuQwen2};
use reel_model::{
    load_vl_checkpoint, CheckpointPolicy, EmbedsBatch, LocalAttention, Qwen2, Qwen25VL, Rotary,
    VideoBatch, VideoGrid, VlBatch,
};
use reel_optim::AdamWConfig;
use reel_train::vl::write_tiny_vl_model;
use reel_train::{run_sft, Device, GpuTowerMode, RunOptions, SftConfig};

/// One sequence: `head` text tokens, a video of grid 2×4×4 (8 rows), text, a video of grid
/// 1×2×6 (3 rows), then `tail` text tokens; targets on about half of the text rows.
struct Record {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    grids: Vec<VideoGrid>,
    seconds: Vec<f32>,
    features: Vec<f32>,
}

fn record(m: &Qwen25VL, seed: u64, tail: usize) -> Record {
    let c = &m.config;
    let mut r = reel_tensor::rng(seed);
    let special = [
        c.video_token_id,
        c.image_token_id,
        c.vision_start_token_id,
        c.vision_end_token_id,
    ];
    let mut text = |n: usize, out: &mut Vec<u32>| {
        let mut k = 0;
        while k < n {
            let t = r.random_range(0..c.text.vocab_size as u32);
            if !special.contains(&t) {
                out.push(t);
                k += 1;
            }
        }
    };
    let mut tokens = Vec::new();
    text(5, &mut tokens);
    tokens.push(c.vision_start_token_id);
    tokens.extend(std::iter::repeat_n(c.video_token_id, 8));
    tokens.push(c.vision_end_token_id);
    text(7, &mut tokens);
    tokens.push(c.vision_start_token_id);
    tokens.extend(std::iter::repeat_n(c.video_token_id, 3));
    tokens.push(c.vision_end_token_id);
    text(tail, &mut tokens);
    let mut r = reel_tensor::rng(seed + 1);
    let v = c.text.vocab_size as i32;
    let targets = tokens
        .iter()
        .map(|&t| {
            if t != c.video_token_id && r.random_range(0..2) == 1 {
                r.random_range(0..v)
            } else {
                -100
            }
        })
        .collect();
    let d = c.text.hidden_size;
    Record {
        tokens,
        targets,
        grids: vec![
            VideoGrid { t: 2, h: 4, w: 4 },
            VideoGrid { t: 1, h: 2, w: 6 },
        ],
        seconds: vec![1.0, 2.0],
        features: reel_tensor::uniform_vec(&mut reel_tensor::rng(seed + 2), 11 * d, 1.0),
    }
}

#[test]
fn the_vlm_decoder_on_the_gpu_matches_the_cpu_loss_gradients_and_embedding_gradients() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_tiny_vl_model(dir.path(), 3).unwrap();
    let untied = load_vl_checkpoint(dir.path()).unwrap();
    let tied = {
        let mut text = untied.config.text.clone();
        text.tie_word_embeddings = true;
        let mut config = untied.config.clone();
        config.text = text.clone();
        let lm = Qwen2::new_random(text, 5).unwrap();
        Qwen25VL::from_params(config, lm.params, untied.vision.params.clone()).unwrap()
    };
    for (name, m, tail) in [("untied", &untied, 60), ("tied", &tied, 190)] {
        let c = &m.config;
        let d = c.text.hidden_size;
        let rec = record(m, 11, tail);
        let t = rec.tokens.len();
        let batch = VlBatch {
            tokens: &rec.tokens,
            targets: &rec.targets,
            b: 1,
            t,
            videos: VideoBatch {
                pixels: &[],
                grids: &rec.grids,
                second_per_grid_ts: &rec.seconds,
            },
        };
        // The CPU: decoder on the prepared embeddings, then the table's text rows.
        let mut ws = m.workspace(CheckpointPolicy::None);
        m.prepare_with_features(&mut ws, &batch, &rec.features)
            .unwrap();
        let (emb, cos, sin) = Qwen25VL::prepared(&ws);
        let (emb, cos, sin) = (emb.to_vec(), cos.to_vec(), sin.to_vec());
        let eb = EmbedsBatch {
            embeds: &emb,
            targets: &rec.targets,
            rotary: Rotary::Angles {
                cos: &cos,
                sin: &sin,
            },
            b: 1,
            t,
        };
        let s =
            m.lm.forward_embeds(&mut ws.lm, &eb, &LocalAttention)
                .unwrap();
        let scale = 1.0 / s.n_tokens as f32;
        let mut cpu_g = vec![0.0f32; m.lm.params.len()];
        let cpu_dx =
            m.lm.backward_embeds(&mut cpu_g, &mut ws.lm, &eb, scale, &LocalAttention)
                .unwrap()
                .to_vec();
        m.text_embedding_backward(&mut cpu_g, &cpu_dx, &rec.tokens)
            .unwrap();
        let cpu_loss = s.mean();
        assert!(
            cpu_dx.iter().any(|&x| x != 0.0),
            "the test needs non-zero ∂L/∂embeddings"
        );

        for policy in [
            CheckpointPolicy::None,
            CheckpointPolicy::Layer,
            CheckpointPolicy::Remat,
        ] {
            let gpu = Gpu::open(0).expect("REEL_GPU_TESTS=1 but no GPU");
            let mut gm = GpuQwen2::new(
                gpu,
                c.text.clone(),
                &m.lm.params,
                policy,
                AdamWConfig::default(),
            )
            .unwrap();
            let geb = GpuEmbedsBatch {
                tokens: &rec.tokens,
                targets: &rec.targets,
                feature_token: c.video_token_id,
                feature_rows: None,
                features: &rec.features,
                cos: &cos,
                sin: &sin,
                b: 1,
                t,
            };
            gm.zero_grads().unwrap();
            let gs = gm.forward_embeds(&geb).unwrap();
            assert_eq!(gs.n_tokens, s.n_tokens);
            let dx = gm.backward_embeds(&geb, scale, true).unwrap().unwrap();
            let g = gm.grads_host().unwrap();
            let loss = gs.mean();
            eprintln!("{name}, T {t}, {policy}: loss GPU {loss:.6} CPU {cpu_loss:.6}");
            assert!(
                (loss - cpu_loss).abs() <= 1e-2 * cpu_loss.abs(),
                "{name} {policy}: loss {loss} vs CPU {cpu_loss}"
            );
            let mut worst = 0.0f64;
            for e in &m.lm.layout.entries {
                let (a, w) = (&g[e.range.clone()], &cpu_g[e.range.clone()]);
                assert!(a.iter().all(|x| x.is_finite()), "{}: non-finite", e.name);
                let rel = rel_norm_err(a, w);
                worst = worst.max(rel);
                assert!(
                    rel <= 3e-2,
                    "{name} {policy}: gradient of {} off by relative norm {rel:.3e}",
                    e.name
                );
            }
            // The table's video row gets nothing (the feature rows' gradient goes to the tower).
            let vid = c.video_token_id as usize;
            let table = &g[m.lm.layout.embed.clone()];
            if !c.text.tie_word_embeddings {
                assert!(table[vid * d..(vid + 1) * d].iter().all(|&x| x == 0.0));
            }
            let rel_dx = rel_norm_err(&dx, &cpu_dx);
            let (fg, fc): (Vec<f32>, Vec<f32>) = rec
                .tokens
                .iter()
                .enumerate()
                .filter(|(_, &x)| x == c.video_token_id)
                .flat_map(|(r, _)| {
                    (r * d..(r + 1) * d)
                        .map(|i| (dx[i], cpu_dx[i]))
                        .collect::<Vec<_>>()
                })
                .unzip();
            let rel_f = rel_norm_err(&fg, &fc);
            eprintln!(
                "  {} tensors, worst gradient rel-norm error {worst:.3e}; ∂L/∂embeddings \
                 {rel_dx:.3e}, its feature rows {rel_f:.3e}",
                m.lm.layout.entries.len()
            );
            assert!(
                rel_dx <= 3e-2,
                "{name} {policy}: ∂L/∂embeddings {rel_dx:.3e}"
            );
            assert!(rel_f <= 3e-2, "{name} {policy}: ∂L/∂features {rel_f:.3e}");
        }
    }
}

fn eval_losses(cfg: &SftConfig) -> Vec<f64> {
    common::metrics(cfg)
        .iter()
        .filter_map(|m| m["eval_loss"].as_f64())
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rtol * w.abs(),
            "{what}: step {} loss {g} vs {w}\n{got:?}\nvs\n{want:?}",
            i + 1
        );
    }
}

#[test]
fn vl_sft_on_the_gpu_follows_the_cpu_loss_curve_checkpoints_and_resumes() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cpu_cfg = common::vl_setup(dir.path(), 6);
    cpu_cfg.output.dir = dir.path().join("cpu");
    let cpu = run_sft(&cpu_cfg, common::quiet()).unwrap();
    let before = load_vl_checkpoint(cpu_cfg.model.path.as_deref().unwrap()).unwrap();
    let cpu_eval = eval_losses(&cpu_cfg);
    for (sp, policy) in [(1, CheckpointPolicy::Layer), (2, CheckpointPolicy::Remat)] {
        let mut cfg = cpu_cfg.clone();
        cfg.train.device = Device::Cuda;
        cfg.train.checkpoint = policy;
        cfg.parallel.sp = sp;
        cfg.output.dir = dir.path().join(format!("gpu-sp{sp}"));
        let gpu = run_sft(&cfg, common::quiet()).unwrap();
        eprintln!(
            "sp {sp}, {policy}: GPU losses {:?}\n  CPU losses {:?}\n  eval GPU {:?} CPU {cpu_eval:?}",
            gpu.losses,
            cpu.losses,
            eval_losses(&cfg)
        );
        assert_close(&format!("sp {sp}"), &gpu.losses, &cpu.losses, 2e-2);
        let ge = eval_losses(&cfg);
        assert_eq!(ge.len(), cpu_eval.len(), "evaluations at the same steps");
        for (g, c) in ge.iter().zip(&cpu_eval) {
            assert!((g - c).abs() <= 2e-2 * c.abs(), "eval loss {g} vs {c}");
        }
        assert!(gpu.losses.last() < gpu.losses.first(), "the GPU run learns");
        let v = gpu.video.as_ref().unwrap();
        assert_eq!(v.cache.misses as usize, 6 * sp, "{:?}", v.cache);
        let m = load_vl_checkpoint(&gpu.final_model_dir).unwrap();
        assert!(m.lm.params.iter().all(|x| x.is_finite()));
        assert_ne!(m.lm.params, before.lm.params, "the decoder trained");
        assert_eq!(
            m.vision.params, before.vision.params,
            "the frozen tower moved"
        );
    }

    // Two data-parallel replicas sharing the GPU, each taking every other record: the CPU run
    // with the same replicas.
    let mut dp_cpu = cpu_cfg.clone();
    dp_cpu.parallel.dp = 2;
    dp_cpu.output.dir = dir.path().join("cpu-dp2");
    let want = run_sft(&dp_cpu, common::quiet()).unwrap();
    let mut cfg = dp_cpu.clone();
    cfg.train.device = Device::Cuda;
    cfg.output.dir = dir.path().join("gpu-dp2");
    let gpu = run_sft(&cfg, common::quiet()).unwrap();
    eprintln!(
        "dp 2: GPU losses {:?}\n  CPU losses {:?}",
        gpu.losses, want.losses
    );
    assert_close("dp 2", &gpu.losses, &want.losses, 2e-2);
    assert_eq!(gpu.param_checksums.len(), 2);
    assert_eq!(
        gpu.param_checksums[0], gpu.param_checksums[1],
        "replicas differ"
    );

    // Interrupted after 3 steps and resumed from the step-2 checkpoint: the same curve.
    let mut cfg = cpu_cfg.clone();
    cfg.train.device = Device::Cuda;
    cfg.output.dir = dir.path().join("gpu-straight");
    let straight = run_sft(&cfg, common::quiet()).unwrap();
    cfg.output.dir = dir.path().join("gpu-resumed");
    let first = run_sft(
        &cfg,
        RunOptions {
            stop_after: Some(3),
            ..common::quiet()
        },
    )
    .unwrap();
    assert_eq!(first.losses.len(), 3);
    let resumed = run_sft(
        &cfg,
        RunOptions {
            resume: true,
            ..common::quiet()
        },
    )
    .unwrap();
    eprintln!(
        "straight {:?}\n  first {:?} resumed {:?}",
        straight.losses, first.losses, resumed.losses
    );
    assert_close("first part", &first.losses, &straight.losses[..3], 1e-3);
    assert_close("resumed part", &resumed.losses, &straight.losses[2..], 1e-3);

    // A trained tower has no GPU path: "cuda" refuses, saying why.
    let mut cfg = cpu_cfg.clone();
    cfg.train.device = Device::Cuda;
    cfg.video.train_vision = true;
    cfg.output.dir = dir.path().join("gpu-tower");
    let e = format!("{:#}", run_sft(&cfg, common::quiet()).unwrap_err());
    assert!(
        e.contains("train.device") && e.contains("video.train_vision"),
        "{e}"
    );
}

#[test]
fn vl_sft_with_the_tower_on_the_gpu_follows_the_cpu_tower() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut base = common::vl_setup(dir.path(), 6);
    base.train.device = Device::Cuda;
    let run = |mode: GpuTowerMode, sp: usize| {
        let mut cfg = base.clone();
        cfg.video.gpu_tower = mode;
        cfg.parallel.sp = sp;
        cfg.output.dir = dir.path().join(format!("{mode:?}-sp{sp}"));
        let s = run_sft(&cfg, common::quiet()).unwrap();
        let m = common::metrics(&cfg);
        let devices: Vec<String> = m
            .iter()
            .filter_map(|r| r["tower_device"].as_str().map(str::to_string))
            .collect();
        (s, devices, eval_losses(&cfg))
    };
    let (cpu, cpu_dev, cpu_eval) = run(GpuTowerMode::Off, 1);
    assert!(
        !cpu_dev.is_empty() && cpu_dev.iter().all(|d| d == "cpu"),
        "{cpu_dev:?}"
    );
    for (mode, sp, name, rtol) in [
        (GpuTowerMode::F32, 1, "cuda-f32", 2e-3),
        (GpuTowerMode::Bf16, 1, "cuda-bf16", 2e-2),
        (GpuTowerMode::Bf16, 2, "cuda-bf16", 2e-2),
    ] {
        let (gpu, dev, ev) = run(mode, sp);
        eprintln!(
            "{name} sp {sp}: losses {:?}\n  CPU tower {:?}\n  eval {ev:?} vs {cpu_eval:?}",
            gpu.losses, cpu.losses
        );
        assert!(!dev.is_empty() && dev.iter().all(|d| d == name), "{dev:?}");
        assert_close(&format!("{name} sp {sp}"), &gpu.losses, &cpu.losses, rtol);
        assert_eq!(ev.len(), cpu_eval.len());
        for (g, c) in ev.iter().zip(&cpu_eval) {
            assert!(
                (g - c).abs() <= rtol as f64 * c.abs(),
                "eval loss {g} vs {c}"
            );
        }
        let (v, c) = (gpu.video.as_ref().unwrap(), cpu.video.as_ref().unwrap());
        assert_eq!(v.cache.misses as usize, 6 * sp, "{:?}", v.cache);
        assert_eq!(v.encode.videos_encoded, c.encode.videos_encoded);
        assert_eq!(v.encode.videos_cached, c.encode.videos_cached);
    }
}
