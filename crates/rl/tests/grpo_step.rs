//! GRPO end to end on the tiny fixture model: rewards → group advantages → policy log-probs →
//! `grpo_loss` → `Qwen2::backward_logprobs` → clip + AdamW. One step raises the log-probability
//! of the sample with positive advantage and lowers the other's; micro-batches with global
//! counts give the whole batch's gradient.

use reel_model::{
    default_positions, load_checkpoint, CheckpointPolicy, LocalAttention, Qwen2, TokenBatch,
    Workspace,
};
use reel_optim::{clip_grad_norm, AdamW, AdamWConfig};
use reel_rl::{
    group_advantages, grpo_loss, GrpoConfig, LossAggregation, LossScale, PolicyTokens, Reward,
    RewardInput,
};
use reel_tensor::{check_close, Tolerance};
use std::path::Path;

/// G = 2 sampled continuations of one prompt, as [B, T] rows: 5 prompt tokens, then the
/// response; targets label the response tokens only.
struct Rollout {
    tokens: Vec<u32>,
    targets: Vec<i32>,
    positions: Vec<u32>,
    mask: Vec<bool>,
    b: usize,
    t: usize,
}

fn rollout() -> Rollout {
    let (b, t, prompt) = (2, 14, 5);
    let tokens: Vec<u32> = (0..b * t)
        .map(|j| ((j / t) * 31 + (j % t) * 7 + 3) as u32 % 90)
        .collect();
    let mut targets = vec![-100i32; b * t];
    for i in 0..b {
        // The second sample's response is 3 tokens shorter (right padding after it).
        let end = if i == 0 { t - 1 } else { t - 4 };
        for p in prompt - 1..end {
            targets[i * t + p] = tokens[i * t + p + 1] as i32;
        }
    }
    let mask = targets.iter().map(|&x| x >= 0).collect();
    Rollout {
        tokens,
        targets,
        positions: default_positions(b, t),
        mask,
        b,
        t,
    }
}

impl Rollout {
    fn batch(&self, rows: std::ops::Range<usize>) -> TokenBatch<'_> {
        let r = rows.start * self.t..rows.end * self.t;
        TokenBatch {
            tokens: &self.tokens[r.clone()],
            targets: &self.targets[r.clone()],
            positions: &self.positions[r],
            b: rows.len(),
            t: self.t,
        }
    }
}

fn logprobs(model: &Qwen2, ws: &mut Workspace, batch: &TokenBatch, tau: f32) -> Vec<f32> {
    let mut lp = vec![0.0f32; batch.b * batch.t];
    model
        .token_logprobs(ws, batch, &LocalAttention, tau, &mut lp, None)
        .unwrap();
    lp
}

fn row_sum(lp: &[f32], mask: &[bool], t: usize, i: usize) -> f64 {
    (i * t..(i + 1) * t)
        .filter(|&j| mask[j])
        .map(|j| lp[j] as f64)
        .sum()
}

/// Gradient of the GRPO loss over `rows` of the rollout (one micro-batch), accumulated into
/// `grads`; returns the micro-batch's loss.
#[allow(clippy::too_many_arguments)]
fn micro_batch_grads(
    model: &Qwen2,
    ws: &mut Workspace,
    r: &Rollout,
    rows: std::ops::Range<usize>,
    old: &[f32],
    adv: &[f32],
    cfg: &GrpoConfig,
    scale: LossScale,
    grads: &mut [f32],
) -> f64 {
    let batch = r.batch(rows.clone());
    let span = rows.start * r.t..rows.end * r.t;
    let mut lp = vec![0.0f32; batch.b * batch.t];
    let mut ent = vec![0.0f32; batch.b * batch.t];
    model
        .token_logprobs(
            ws,
            &batch,
            &LocalAttention,
            cfg.temperature,
            &mut lp,
            Some(&mut ent),
        )
        .unwrap();
    let x = PolicyTokens {
        b: batch.b,
        t: batch.t,
        logp: &lp,
        old_logp: &old[span.clone()],
        // The reference is the starting policy here, so the KL term starts at 0.
        ref_logp: Some(&old[span.clone()]),
        entropy: Some(&ent),
        mask: &r.mask[span],
        advantages: &adv[rows],
        seq_tokens: None,
    };
    let mut g = vec![0.0f32; batch.b * batch.t];
    let (loss, metrics) = grpo_loss(&x, &cfg.policy_loss(), scale, &mut g).unwrap();
    let s = metrics.summary();
    assert!(s.entropy.unwrap() > 0.0);
    model
        .backward_logprobs(grads, ws, &batch, &g, &LocalAttention)
        .unwrap();
    loss
}

#[test]
fn one_grpo_step_raises_the_rewarded_sample() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny");
    let mut model = load_checkpoint(&dir).unwrap();
    let r = rollout();
    let cfg = GrpoConfig::default();

    // Rewards of the group: the first sample answers correctly in format, the second does not.
    let reward = cfg.reward.build();
    let scores: Vec<f32> = [
        "<think>count</think><answer>B</answer>",
        "<think>count</think> C",
    ]
    .iter()
    .map(|resp| {
        reward
            .score(&RewardInput {
                prompt: "How many? A. 1 B. 2",
                response: resp,
                answer: "<answer>B</answer>",
                problem_id: "0",
            })
            .value
    })
    .collect();
    assert_eq!(scores, [1.0, 0.0]);
    let adv = group_advantages(&scores, 2, cfg.advantage_scaling).unwrap();
    assert!(adv[0] > 0.5 && adv[1] < -0.5, "{adv:?}");

    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
    let old = logprobs(&model, &mut ws, &r.batch(0..r.b), cfg.temperature);
    let scale = LossScale {
        global_tokens: r.mask.iter().filter(|&&m| m).count(),
        global_seqs: r.b,
    };
    let mut grads = vec![0.0f32; model.params.len()];
    micro_batch_grads(
        &model,
        &mut ws,
        &r,
        0..r.b,
        &old,
        &adv,
        &cfg,
        scale,
        &mut grads,
    );
    assert!(grads.iter().any(|&g| g != 0.0));

    // Clip and AdamW as the trainer does (a larger lr than the default 1e-6, so one step shows).
    let layout = model.layout.clone();
    {
        let mut gr = layout.split_mut(&mut grads);
        clip_grad_norm(&mut gr, cfg.grad_clip);
    }
    let sizes: Vec<usize> = layout.entries.iter().map(|e| e.range.len()).collect();
    let decay: Vec<bool> = layout.entries.iter().map(|e| e.decay).collect();
    let adamw = AdamWConfig {
        lr: 1e-3,
        weight_decay: cfg.weight_decay,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(&sizes, &decay, adamw);
    let mut p = layout.split_mut(&mut model.params);
    let mut gr = layout.split_mut(&mut grads);
    let g_ro: Vec<&[f32]> = gr.iter_mut().map(|s| &**s).collect();
    opt.step(&mut p, &g_ro, adamw.lr);

    let new = logprobs(&model, &mut ws, &r.batch(0..r.b), cfg.temperature);
    let (before0, after0) = (
        row_sum(&old, &r.mask, r.t, 0),
        row_sum(&new, &r.mask, r.t, 0),
    );
    let (before1, after1) = (
        row_sum(&old, &r.mask, r.t, 1),
        row_sum(&new, &r.mask, r.t, 1),
    );
    println!("rewarded sample: Σ log π {before0:.4} → {after0:.4}");
    println!("penalised sample: Σ log π {before1:.4} → {after1:.4}");
    assert!(after0 > before0 + 1e-3, "{before0} → {after0}");
    assert!(after1 < before1 - 1e-3, "{before1} → {after1}");
}

#[test]
fn micro_batches_give_the_whole_batch_gradient() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny-tied");
    let model = load_checkpoint(&dir).unwrap();
    let r = rollout();
    let adv = [0.8f32, -0.6];
    for mode in [
        LossAggregation::TokenMean,
        LossAggregation::SeqMeanTokenMean,
        LossAggregation::SeqMeanTokenSumNorm,
    ] {
        let cfg = GrpoConfig {
            loss_aggregation: mode,
            max_response_tokens: 16,
            temperature: 0.9,
            ..GrpoConfig::default()
        };
        let mut ws = Workspace::new(&model.config, CheckpointPolicy::Layer);
        // Off-policy old log-probs (the rollout policy differs), so ratios are not all 1.
        let old: Vec<f32> = logprobs(&model, &mut ws, &r.batch(0..r.b), cfg.temperature)
            .iter()
            .enumerate()
            .map(|(j, &l)| l + 0.05 * ((j % 5) as f32 - 2.0))
            .collect();
        let scale = LossScale {
            global_tokens: r.mask.iter().filter(|&&m| m).count(),
            global_seqs: r.b,
        };
        let mut whole = vec![0.0f32; model.params.len()];
        let l_all = micro_batch_grads(
            &model,
            &mut ws,
            &r,
            0..r.b,
            &old,
            &adv,
            &cfg,
            scale,
            &mut whole,
        );
        let mut parts = vec![0.0f32; model.params.len()];
        let l0 = micro_batch_grads(
            &model,
            &mut ws,
            &r,
            0..1,
            &old,
            &adv,
            &cfg,
            scale,
            &mut parts,
        );
        let l1 = micro_batch_grads(
            &model,
            &mut ws,
            &r,
            1..2,
            &old,
            &adv,
            &cfg,
            scale,
            &mut parts,
        );
        assert!(
            (l0 + l1 - l_all).abs() < 1e-6,
            "{mode}: {l0} + {l1} vs {l_all}"
        );
        let scale_max = whole.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(scale_max > 0.0);
        check_close(
            &format!("{mode} gradient"),
            &parts,
            &whole,
            Tolerance::new(1e-5 * scale_max, 1e-4),
        )
        .unwrap();
    }
}
