//! `SpAttention` as the model's `AttentionOp`: one tiny Qwen2 replica per rank on its token shard
//! (global RoPE positions, padded tail masked out of the loss) gives the single-process loss and,
//! after summing over ranks, the single-process gradients, under every checkpoint policy.

use std::fmt;
use std::time::Duration;

use reel_comm::{CommError, Communicator, InProcess};
use reel_kernels::attention::AttnShape;
use reel_model::{
    default_positions, AttentionOp, CheckpointPolicy, LocalAttention, ModelError, Qwen2,
    Qwen2Config, TokenBatch, Workspace,
};
use reel_parallel::{
    block_counts, DistExecError, Overlap, ScheduleKind, Sharding, SpAttention, SpStats,
};
use reel_tensor::{check_close, rng, uniform_vec, Tolerance};

const TIMEOUT: Duration = Duration::from_secs(10);
const VOCAB: usize = 48;

/// A rank's error, whatever layer it comes from.
#[derive(Debug)]
struct RankError(String);

impl fmt::Display for RankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! rank_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for RankError {
            fn from(e: $t) -> Self {
                RankError(e.to_string())
            }
        }
    )*};
}
rank_error_from!(
    CommError,
    DistExecError,
    ModelError,
    reel_parallel::ShardError,
    reel_parallel::ScheduleError
);

/// B rows of T random tokens; targets are the next token, with every fifth position and each row's
/// last unlabelled.
fn tokens(b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let tokens: Vec<u32> = uniform_vec(&mut rng(seed), b * t, 1.0)
        .into_iter()
        .map(|x| ((x + 1.0) * 0.5 * VOCAB as f32) as u32 % VOCAB as u32)
        .collect();
    let targets = (0..b * t)
        .map(|i| {
            if i % t == t - 1 || i % 5 == 3 {
                -1
            } else {
                tokens[i + 1] as i32
            }
        })
        .collect();
    (tokens, targets)
}

/// Loss sum, labelled-token count and gradients of one single-process step.
fn single(model: &Qwen2, tok: &[u32], tgt: &[i32], b: usize, policy: CheckpointPolicy) -> Step {
    let t = tok.len() / b;
    let positions = default_positions(b, t);
    let batch = TokenBatch {
        tokens: tok,
        targets: tgt,
        positions: &positions,
        b,
        t,
    };
    let mut ws = Workspace::new(&model.config, policy);
    let loss = model.forward(&mut ws, &batch, &LocalAttention).unwrap();
    let mut grads = vec![0.0; model.params.len()];
    model
        .backward(&mut grads, &mut ws, &batch, 1.0, &LocalAttention)
        .unwrap();
    Step {
        loss_sum: loss.loss_sum,
        n_tokens: loss.n_tokens,
        grads,
        stats: SpStats::default(),
    }
}

struct Step {
    loss_sum: f64,
    n_tokens: usize,
    grads: Vec<f32>,
    stats: SpStats,
}

/// One step with a model replica per rank: tokens, targets (padding unlabelled) and global
/// positions are sharded with the sharding `set_seq_len` returns; gradients are summed over the
/// group through the adapter's communicator.
fn sequence_parallel(
    model: &Qwen2,
    tok: &[u32],
    tgt: &[i32],
    b: usize,
    policy: CheckpointPolicy,
    kind: ScheduleKind,
    p: usize,
) -> Vec<Step> {
    let t = tok.len() / b;
    let res = InProcess::spawn(p, TIMEOUT, |comm| {
        let r = comm.rank();
        let sp = SpAttention::new(comm, kind.build(p)?, Overlap::Overlapped)?;
        let sh: Sharding = sp.set_seq_len(t)?;
        let l = sh.local_len();
        let tokens = sh.shard(tok, b, 1, r, 0u32)?;
        let targets = sh.shard(tgt, b, 1, r, -1i32)?;
        let positions: Vec<u32> = (0..b).flat_map(|_| sh.positions(r).unwrap()).collect();
        let batch = TokenBatch {
            tokens: &tokens,
            targets: &targets,
            positions: &positions,
            b,
            t: l,
        };
        let mut ws = Workspace::new(&model.config, policy);
        let loss = model.forward(&mut ws, &batch, &sp)?;
        let mut grads = vec![0.0; model.params.len()];
        model.backward(&mut grads, &mut ws, &batch, 1.0, &sp)?;
        sp.with_comm(|c| c.all_reduce_sum(&mut grads))?;
        Ok::<_, RankError>(Step {
            loss_sum: loss.loss_sum,
            n_tokens: loss.n_tokens,
            grads,
            stats: sp.stats(),
        })
    });
    res.into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[test]
fn model_replicas_on_token_shards_match_one_process() {
    let model = Qwen2::new_random(Qwen2Config::tiny(VOCAB), 7).unwrap();
    let (b, t) = (2, 29);
    let (tok, tgt) = tokens(b, t, 8);
    let layers = model.config.num_hidden_layers;
    let policies = [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ];
    let runs = [
        (ScheduleKind::DistAttnCausal, 3, &policies[..]),
        (ScheduleKind::DistAttnCausal, 4, &policies[2..]),
        (ScheduleKind::RingCausal, 2, &policies[2..]),
        (ScheduleKind::ZigzagRingCausal, 3, &policies[..1]),
    ];
    for (kind, p, policies) in runs {
        for &policy in policies {
            let what = format!("{kind:?} P={p} {policy}");
            let want = single(&model, &tok, &tgt, b, policy);
            assert!(want.grads.iter().any(|&g| g.abs() > 1e-3), "{what}");
            let got = sequence_parallel(&model, &tok, &tgt, b, policy, kind, p);
            let loss: f64 = got.iter().map(|s| s.loss_sum).sum();
            let n: usize = got.iter().map(|s| s.n_tokens).sum();
            assert_eq!(n, want.n_tokens, "{what}");
            assert!(
                (loss - want.loss_sum).abs() <= 1e-5 * want.loss_sum.abs(),
                "{what}: loss {loss} vs {}",
                want.loss_sum
            );
            let counts = block_counts(&kind.build(p).unwrap());
            for (r, s) in got.iter().enumerate() {
                check_close(
                    &format!("{what} rank {r} grads"),
                    &s.grads,
                    &want.grads,
                    Tolerance::new(2e-6, 1e-3),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                let st = s.stats;
                assert_eq!(st.backward_calls, layers, "{what}");
                // Rematerialization-aware checkpointing runs one distributed attention forward
                // per layer per step; whole-layer checkpointing reruns it in the backward.
                let forwards = if policy == CheckpointPolicy::Layer {
                    2 * layers
                } else {
                    layers
                };
                assert_eq!(st.forward_calls, forwards, "{what}");
                assert_eq!(st.forward.blocks, st.forward_calls * counts[r], "{what}");
                assert_eq!(st.backward.blocks, layers * counts[r], "{what}");
            }
        }
    }
}

/// Non-causal schedules, a group of the wrong size, a call before `set_seq_len` and a shape that
/// is not the sharding's are refused, as errors the model can propagate.
#[test]
fn refuses_what_it_cannot_run() {
    let res = InProcess::spawn(2, TIMEOUT, |comm| {
        let full = ScheduleKind::RingFull.build(2).unwrap();
        let e = SpAttention::new(comm, full, Overlap::Blocking)
            .err()
            .expect("ring_full refused");
        Ok::<_, DistExecError>(e.to_string())
    });
    assert!(res[0].as_ref().unwrap().contains("causal"));
    let res = InProcess::spawn(1, TIMEOUT, |comm| {
        let s = ScheduleKind::RingCausal.build(2).unwrap();
        Ok::<_, DistExecError>(SpAttention::new(comm, s, Overlap::Blocking).is_err())
    });
    assert!(res[0].as_ref().unwrap());
    let res = InProcess::spawn(1, TIMEOUT, |comm| {
        let s = ScheduleKind::DistAttnCausal.build(1).unwrap();
        let sp = SpAttention::new(comm, s, Overlap::Blocking)?;
        let shape = AttnShape {
            b: 1,
            tq: 4,
            tk: 4,
            h: 2,
            h_kv: 1,
            d: 2,
        };
        let (q, kv) = (vec![0.5; 16], vec![0.25; 8]);
        let (mut out, mut lse) = (vec![0.0; 16], vec![0.0; 8]);
        let before = sp
            .forward(&mut out, &mut lse, &q, &kv, &kv, shape)
            .unwrap_err()
            .to_string();
        sp.set_seq_len(5)?;
        let wrong = sp
            .forward(&mut out, &mut lse, &q, &kv, &kv, shape)
            .unwrap_err()
            .to_string();
        sp.set_seq_len(4)?;
        sp.forward(&mut out, &mut lse, &q, &kv, &kv, shape)
            .map_err(|e| CommError::Backend {
                rank: 0,
                detail: e.to_string(),
            })?;
        Ok::<_, DistExecError>((before, wrong, out))
    });
    let (before, wrong, out) = res.into_iter().next().unwrap().unwrap();
    assert!(before.contains("set_seq_len"), "{before}");
    assert!(wrong.contains("5 rows per rank"), "{wrong}");
    // Uniform keys and values: every output is v.
    assert!(out.iter().all(|&x| (x - 0.25).abs() < 1e-6), "{out:?}");
}
