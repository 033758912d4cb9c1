//! The policy model's RL interface on the golden fixtures: `token_logprobs` against
//! transformers' logits (log-softmax at the target, entropy of the softmax), and
//! `backward_logprobs` against the CE backward (g = −1/N) and against central differences of
//! Σ g_t·log π_t for random g, under every checkpoint policy.

use reel_model::{
    default_positions, load_checkpoint, CheckpointPolicy, LocalAttention, Qwen2, TokenBatch,
    Workspace,
};
use reel_tensor::{check_close, Tolerance};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// input_ids [B, T], labels [B, T] and logits [B, T, V] from the fixture's golden file.
fn golden(dir: &Path) -> (usize, usize, Vec<u32>, Vec<i32>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i32s = |name: &str| -> (Vec<usize>, Vec<i32>) {
        let v = st.tensor(name).unwrap();
        let data = v
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (v.shape().to_vec(), data)
    };
    let (shape, ids) = i32s("input_ids");
    let (_, labels) = i32s("labels");
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (b, t) = (shape[0], shape[1]);
    // transformers shifts inside the loss: position i predicts labels[i + 1].
    let mut targets = vec![-100i32; b * t];
    for r in 0..b {
        for i in 0..t - 1 {
            targets[r * t + i] = labels[r * t + i + 1];
        }
    }
    (
        b,
        t,
        ids.iter().map(|&x| x as u32).collect(),
        targets,
        logits,
    )
}

#[test]
fn token_logprobs_and_entropy_match_transformers_logits() {
    for name in ["qwen2-tiny", "qwen2-tiny-tied"] {
        let dir = fixture(name);
        let model = load_checkpoint(&dir).unwrap();
        let (b, t, tokens, targets, logits) = golden(&dir);
        let v = model.config.vocab_size;
        let positions = default_positions(b, t);
        let batch = TokenBatch {
            tokens: &tokens,
            targets: &targets,
            positions: &positions,
            b,
            t,
        };
        for tau in [1.0f32, 0.7] {
            // Expected: log-softmax of logits/τ at the target and entropy, from transformers' logits
            // in f64.
            let mut want_lp = vec![0.0f32; b * t];
            let mut want_ent = vec![0.0f32; b * t];
            for i in 0..b * t {
                if targets[i] < 0 {
                    continue;
                }
                let z: Vec<f64> = logits[i * v..(i + 1) * v]
                    .iter()
                    .map(|&x| x as f64 / tau as f64)
                    .collect();
                let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + z.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                want_lp[i] = (z[targets[i] as usize] - lse) as f32;
                want_ent[i] = -z.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>() as f32;
            }
            let labelled = targets.iter().filter(|&&x| x >= 0).count();
            assert!(labelled > 0 && labelled < b * t);

            let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
            let mut lp = vec![f32::NAN; b * t];
            let mut ent = vec![f32::NAN; b * t];
            let count = model
                .token_logprobs(
                    &mut ws,
                    &batch,
                    &LocalAttention,
                    tau,
                    &mut lp,
                    Some(&mut ent),
                )
                .unwrap();
            assert_eq!(count, labelled);
            let tol = Tolerance::new(1e-4, 1e-4);
            check_close(&format!("{name} τ {tau} logp"), &lp, &want_lp, tol).unwrap();
            check_close(&format!("{name} τ {tau} entropy"), &ent, &want_ent, tol).unwrap();

            // Without entropy: the same log-probabilities; and they are −CE of the forward.
            let mut lp2 = vec![f32::NAN; b * t];
            model
                .token_logprobs(&mut ws, &batch, &LocalAttention, tau, &mut lp2, None)
                .unwrap();
            assert_eq!(lp, lp2);
            if tau == 1.0 {
                let stats = model.forward(&mut ws, &batch, &LocalAttention).unwrap();
                let sum: f64 = lp.iter().map(|&x| x as f64).sum();
                assert!(
                    (sum + stats.loss_sum).abs() < 1e-5 * stats.loss_sum.abs(),
                    "{name}: Σ logp {sum} vs −CE sum {}",
                    -stats.loss_sum
                );
            }
        }
    }
}

fn random_batch(b: usize, t: usize, v: u32, seed: u64) -> (Vec<u32>, Vec<i32>, Vec<u32>) {
    use rand::Rng;
    let mut rng = reel_tensor::rng(seed);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..v)).collect();
    // A prompt of a few tokens per row, then the response is labelled (as RL scores it).
    let targets = (0..b * t)
        .map(|i| {
            let (r, p) = (i / t, i % t);
            if p + 1 < t && p >= 2 + r {
                tokens[i + 1] as i32
            } else {
                -100
            }
        })
        .collect();
    (tokens, targets, default_positions(b, t))
}

fn grads_of(
    model: &Qwen2,
    policy: CheckpointPolicy,
    batch: &TokenBatch,
    weighted: Option<&[f32]>,
    scale: f32,
    temperature: f32,
) -> Vec<f32> {
    let mut ws = Workspace::new(&model.config, policy);
    let mut grads = vec![0.0f32; model.params.len()];
    let mut lp = vec![0.0f32; batch.b * batch.t];
    model
        .token_logprobs(&mut ws, batch, &LocalAttention, temperature, &mut lp, None)
        .unwrap();
    match weighted {
        Some(g) => model
            .backward_logprobs(&mut grads, &mut ws, batch, g, &LocalAttention)
            .unwrap(),
        None => model
            .backward(&mut grads, &mut ws, batch, scale, &LocalAttention)
            .unwrap(),
    }
    grads
}

#[test]
fn weighted_backward_with_minus_one_over_n_is_the_ce_backward() {
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let (b, t) = (3, 37);
    let (tokens, targets, positions) = random_batch(b, t, model.config.vocab_size as u32, 1);
    let batch = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b,
        t,
    };
    let n = targets.iter().filter(|&&x| x >= 0).count();
    // Unlabelled positions carry garbage: the backward must ignore them.
    let g: Vec<f32> = targets
        .iter()
        .map(|&x| if x >= 0 { -1.0 / n as f32 } else { 123.0 })
        .collect();
    for policy in [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ] {
        let ce = grads_of(&model, policy, &batch, None, 1.0 / n as f32, 1.0);
        let pg = grads_of(&model, policy, &batch, Some(&g), 0.0, 1.0);
        assert!(ce.iter().any(|&x| x != 0.0));
        assert_eq!(ce, pg, "{policy}: weighted backward differs from CE's");
    }
}

#[test]
fn weighted_backward_matches_finite_differences() {
    use rand::Rng;
    let mut model = load_checkpoint(&fixture("qwen2-tiny-tied")).unwrap();
    let (b, t) = (2, 29);
    let (tokens, targets, positions) = random_batch(b, t, model.config.vocab_size as u32, 2);
    let batch = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b,
        t,
    };
    let mut rng = reel_tensor::rng(3);
    let g: Vec<f32> = (0..b * t).map(|_| rng.random_range(-1.0..1.0)).collect();
    let objective = |model: &Qwen2, ws: &mut Workspace, tau: f32| -> f64 {
        let mut lp = vec![0.0f32; b * t];
        model
            .token_logprobs(ws, &batch, &LocalAttention, tau, &mut lp, None)
            .unwrap();
        lp.iter()
            .zip(&g)
            .zip(&targets)
            .filter(|(_, &tg)| tg >= 0)
            .map(|((&l, &g), _)| l as f64 * g as f64)
            .sum()
    };
    // Each policy once, two of them at a sampling temperature (softmax(z/τ)).
    for (policy, tau) in [
        (CheckpointPolicy::None, 1.0f32),
        (CheckpointPolicy::Layer, 0.8),
        (CheckpointPolicy::Remat, 1.3),
    ] {
        let grads = grads_of(&model, policy, &batch, Some(&g), 0.0, tau);
        let mut ws = Workspace::new(&model.config, policy);
        let mut worst = 0.0f32;
        for e in model.layout.entries.clone() {
            for j in 0..3 {
                let idx = e.range.start + (j * 7919 + 13) % e.range.len();
                let orig = model.params[idx];
                let eps = 1e-2f32;
                model.params[idx] = orig + eps;
                let up = objective(&model, &mut ws, tau);
                model.params[idx] = orig - eps;
                let down = objective(&model, &mut ws, tau);
                model.params[idx] = orig;
                let numeric = ((up - down) / (2.0 * eps as f64)) as f32;
                let err =
                    (numeric - grads[idx]).abs() / (numeric.abs().max(grads[idx].abs()) + 1e-2);
                worst = worst.max(err);
                assert!(
                    err < 2e-2,
                    "{policy} τ {tau} {} [{idx}]: analytic {} vs numeric {numeric}",
                    e.name,
                    grads[idx]
                );
            }
        }
        println!("{policy} τ {tau}: worst relative error {worst}");
    }
}

#[test]
fn bad_buffers_are_refused_with_a_message() {
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let (b, t) = (1, 8);
    let (tokens, targets, positions) = random_batch(b, t, model.config.vocab_size as u32, 4);
    let batch = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b,
        t,
    };
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
    let mut short = vec![0.0f32; 3];
    let e = model
        .token_logprobs(&mut ws, &batch, &LocalAttention, 1.0, &mut short, None)
        .unwrap_err();
    assert!(e.to_string().contains("logp buffer has 3"), "{e}");
    let mut lp = vec![0.0f32; b * t];
    let e = model
        .token_logprobs(&mut ws, &batch, &LocalAttention, 0.0, &mut lp, None)
        .unwrap_err();
    assert!(e.to_string().contains("temperature 0"), "{e}");
    let mut grads = vec![0.0f32; model.params.len()];
    let e = model
        .backward_logprobs(&mut grads, &mut ws, &batch, &lp, &LocalAttention)
        .unwrap_err();
    assert!(e.to_string().contains("forward of the same batch"), "{e}");
    model
        .token_logprobs(&mut ws, &batch, &LocalAttention, 1.0, &mut lp, None)
        .unwrap();
    let mut g = vec![0.5f32; b * t];
    let at = targets.iter().position(|&x| x >= 0).unwrap();
    g[at] = f32::NAN;
    let e = model
        .backward_logprobs(&mut grads, &mut ws, &batch, &g, &LocalAttention)
        .unwrap_err();
    assert!(e.to_string().contains(&format!("dlogp[{at}]")), "{e}");
}

#[test]
fn embedding_entry_points_equal_the_token_ones() {
    // token_logprobs_embeds / backward_logprobs_embeds on the looked-up embeddings, with the
    // embedding table's gradient added by the caller, are token_logprobs / backward_logprobs.
    use reel_model::{EmbedsBatch, Rotary};
    let model = load_checkpoint(&fixture("qwen2-tiny")).unwrap();
    let d = model.config.hidden_size;
    let (b, t) = (2, 23);
    let (tokens, targets, positions) = random_batch(b, t, model.config.vocab_size as u32, 5);
    let batch = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b,
        t,
    };
    let table = &model.params[model.layout.embed.clone()];
    let embeds: Vec<f32> = tokens
        .iter()
        .flat_map(|&x| table[x as usize * d..(x as usize + 1) * d].iter().copied())
        .collect();
    let eb = EmbedsBatch {
        embeds: &embeds,
        targets: &targets,
        rotary: Rotary::Positions(&positions),
        b,
        t,
    };
    let g: Vec<f32> = (0..b * t)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
        .collect();
    for policy in [CheckpointPolicy::None, CheckpointPolicy::Remat] {
        let tau = 0.9;
        let want = grads_of(&model, policy, &batch, Some(&g), 0.0, tau);
        let mut ws = Workspace::new(&model.config, policy);
        let mut lp_tok = vec![0.0f32; b * t];
        model
            .token_logprobs(&mut ws, &batch, &LocalAttention, tau, &mut lp_tok, None)
            .unwrap();
        let (mut lp, mut ent) = (vec![f32::NAN; b * t], vec![f32::NAN; b * t]);
        let count = model
            .token_logprobs_embeds(&mut ws, &eb, &LocalAttention, tau, &mut lp, Some(&mut ent))
            .unwrap();
        assert_eq!(count, targets.iter().filter(|&&x| x >= 0).count());
        assert_eq!(lp, lp_tok, "{policy}: log-probabilities differ");
        assert!(ent.iter().zip(&targets).all(|(&e, &x)| x < 0 || e > 0.0));
        let mut grads = vec![0.0f32; model.params.len()];
        let dx = model
            .backward_logprobs_embeds(&mut grads, &mut ws, &eb, &g, &LocalAttention)
            .unwrap()
            .to_vec();
        let embed = model.layout.embed.clone();
        assert!(grads[embed.clone()].iter().all(|&x| x == 0.0));
        reel_kernels::embedding::embedding_backward(&mut grads[embed], &dx, &tokens, d);
        check_close(
            &format!("{policy} gradients"),
            &grads,
            &want,
            Tolerance::new(1e-6, 1e-5),
        )
        .unwrap();
    }
    // Wrong sizes are refused, naming the buffer.
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
    let mut short = vec![0.0f32; 5];
    let e = model
        .token_logprobs_embeds(&mut ws, &eb, &LocalAttention, 1.0, &mut short, None)
        .unwrap_err();
    assert!(e.to_string().contains("logp buffer has 5"), "{e}");
}
