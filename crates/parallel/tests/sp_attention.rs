//! `SpAttention` as the model's `AttentionOp`: one tiny Qwen2 replica per rank on its token shard
//! (global RoPE positions, padded tail masked out of the loss) gives the single-process loss and,
//! after summing over ranks, the single-process gradients, under every checkpoint policy and
//! method (ring-family schedules, Ulysses and its hybrid); the Ulysses method as a bare
//! `AttentionOp` against `LocalAttention` (out, lse, dq, dk, dv) at several grids and GQA ratios.

use std::fmt;
use std::time::Duration;

use reel_comm::{CommError, Communicator, InProcess};
use reel_kernels::attention::AttnShape;
use reel_model::{
    default_positions, AttentionOp, CheckpointPolicy, LocalAttention, ModelError, Qwen2,
    Qwen2Config, TokenBatch, Workspace,
};
use reel_parallel::{
    block_counts, DistExecError, Overlap, ScheduleKind, Sharding, SpAttention, SpMethod, SpStats,
    UlyssesGrid,
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
    method: &SpMethod,
) -> Vec<Step> {
    let t = tok.len() / b;
    let res = InProcess::spawn(method.ranks(), TIMEOUT, |comm| {
        let r = comm.rank();
        let sp = SpAttention::with_method(comm, method.clone(), Overlap::Overlapped)?;
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
            let method = SpMethod::Schedule(kind.build(p).unwrap());
            let got = sequence_parallel(&model, &tok, &tgt, b, policy, &method);
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

/// Ulysses (u = P) and the hybrid (u × r) as the model's attention: the loss and every gradient
/// of one process, under each checkpoint policy (the tiny model: H = 4, H_kv = 2).
#[test]
fn model_replicas_under_ulysses_match_one_process() {
    let model = Qwen2::new_random(Qwen2Config::tiny(VOCAB), 7).unwrap();
    let (b, t) = (2, 29);
    let (tok, tgt) = tokens(b, t, 8);
    let layers = model.config.num_hidden_layers;
    let runs = [
        ((2, 1), CheckpointPolicy::None),
        ((2, 1), CheckpointPolicy::Layer),
        ((2, 2), CheckpointPolicy::Remat),
        ((1, 3), CheckpointPolicy::None),
        ((2, 3), CheckpointPolicy::Layer),
    ];
    for ((u, r), policy) in runs {
        let what = format!("Ulysses {u} × {r} {policy}");
        let method = SpMethod::Ulysses(UlyssesGrid::new(u, r).unwrap());
        let want = single(&model, &tok, &tgt, b, policy);
        let got = sequence_parallel(&model, &tok, &tgt, b, policy, &method);
        let loss: f64 = got.iter().map(|s| s.loss_sum).sum();
        let n: usize = got.iter().map(|s| s.n_tokens).sum();
        assert_eq!(n, want.n_tokens, "{what}");
        assert!(
            (loss - want.loss_sum).abs() <= 1e-5 * want.loss_sum.abs(),
            "{what}: loss {loss} vs {}",
            want.loss_sum
        );
        for (rank, s) in got.iter().enumerate() {
            check_close(
                &format!("{what} rank {rank} grads"),
                &s.grads,
                &want.grads,
                Tolerance::new(2e-6, 1e-3),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.stats.backward_calls, layers, "{what}");
            // Every rank moves data each pass (all-to-all when u > 1, ring when r > 1).
            assert!(s.stats.forward.bytes_sent > 0, "{what}: {:?}", s.stats);
            assert!(s.stats.backward.bytes_sent > 0, "{what}: {:?}", s.stats);
        }
    }
}

/// Random attention operands of a global `[B, T]` batch.
struct OpCase {
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl OpCase {
    fn new(b: usize, t: usize, h: usize, h_kv: usize, d: usize, seed: u64) -> Self {
        let mut r = rng(seed);
        OpCase {
            shape: AttnShape {
                b,
                tq: t,
                tk: t,
                h,
                h_kv,
                d,
            },
            q: uniform_vec(&mut r, b * t * h * d, 1.5),
            k: uniform_vec(&mut r, b * t * h_kv * d, 1.5),
            v: uniform_vec(&mut r, b * t * h_kv * d, 1.0),
            dout: uniform_vec(&mut r, b * t * h * d, 1.0),
        }
    }

    /// out, lse, dq, dk, dv of `op` on one rank holding the whole sequence.
    fn local(&self) -> [Vec<f32>; 5] {
        let s = self.shape;
        let (nq, nk, nl) = (
            s.b * s.tq * s.h * s.d,
            s.b * s.tq * s.h_kv * s.d,
            s.b * s.tq * s.h,
        );
        let (mut out, mut lse) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
        LocalAttention
            .forward(&mut out, &mut lse, &self.q, &self.k, &self.v, s)
            .unwrap();
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
        LocalAttention
            .backward(
                &mut dq, &mut dk, &mut dv, &self.dout, &self.q, &self.k, &self.v, &out, &lse, s,
            )
            .unwrap();
        [out, lse, dq, dk, dv]
    }
}

/// `SpAttention` under Ulysses / the hybrid as a bare `AttentionOp`: each rank its token shard
/// (outputs poisoned first), out, lse, dq, dk, dv unsharded against `LocalAttention` on the whole
/// sequence, at several grids, GQA ratios (MHA, 2:1, 4:1, MQA) and lengths not divisible by P.
#[test]
fn ulysses_op_matches_local_attention() {
    // (H, H_kv, [(u, r)], T)
    type Grids = &'static [(usize, usize)];
    let cases: [(usize, usize, Grids, usize); 5] = [
        (4, 4, &[(2, 1), (4, 1), (2, 2)], 23),
        (8, 4, &[(2, 1), (1, 3), (2, 3), (4, 1)], 19),
        (6, 3, &[(3, 1), (3, 2)], 29),
        (8, 2, &[(2, 2), (1, 2)], 7),
        (4, 1, &[(1, 2), (1, 4)], 11),
    ];
    for (h, h_kv, grids, t) in cases {
        let c = OpCase::new(2, t, h, h_kv, 4, (h * 31 + h_kv * 7 + t) as u64);
        let want = c.local();
        let widths = [
            h * c.shape.d,
            h,
            h * c.shape.d,
            h_kv * c.shape.d,
            h_kv * c.shape.d,
        ];
        for &(u, r) in grids {
            let what = format!("H={h} H_kv={h_kv} T={t} Ulysses {u} × {r}");
            let grid = UlyssesGrid::new(u, r).unwrap();
            let p = grid.ranks();
            let res = InProcess::spawn(p, TIMEOUT, |comm| {
                let rank = comm.rank();
                let sp =
                    SpAttention::with_method(comm, SpMethod::Ulysses(grid), Overlap::Blocking)?;
                let sh = sp.set_seq_len(t)?;
                let b = c.shape.b;
                let cut = |x: &[f32], w: usize| sh.shard(x, b, w, rank, 0.0).unwrap();
                let (q, k, v) = (
                    cut(&c.q, widths[0]),
                    cut(&c.k, widths[3]),
                    cut(&c.v, widths[4]),
                );
                let dout = cut(&c.dout, widths[0]);
                let l = sh.local_len();
                let shape = AttnShape {
                    tq: l,
                    tk: l,
                    ..c.shape
                };
                let mut out = vec![f32::NAN; q.len()];
                let mut lse = vec![f32::NAN; b * l * h];
                sp.forward(&mut out, &mut lse, &q, &k, &v, shape)
                    .map_err(|e| RankError(e.to_string()))?;
                let (mut dq, mut dk, mut dv) = (
                    vec![f32::NAN; q.len()],
                    vec![f32::NAN; k.len()],
                    vec![f32::NAN; v.len()],
                );
                sp.backward(
                    &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, shape,
                )
                .map_err(|e| RankError(e.to_string()))?;
                Ok::<_, RankError>((sh, [out, lse, dq, dk, dv]))
            });
            let ranks: Vec<(Sharding, [Vec<f32>; 5])> = res
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("{what}: {e}")))
                .collect();
            let sh = ranks[0].0;
            for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
                let shards: Vec<&Vec<f32>> = ranks.iter().map(|(_, x)| &x[i]).collect();
                let got = sh.unshard(&shards, c.shape.b, widths[i]).unwrap();
                check_close(
                    &format!("{what} {name}"),
                    &got,
                    &want[i],
                    Tolerance::new(1e-5, 1e-4),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

/// Ulysses refuses heads that do not split over u (suggesting the hybrid), packed rows, and a
/// group that is not u × r ranks.
#[test]
fn ulysses_refuses_what_it_cannot_run() {
    let res = InProcess::spawn(4, TIMEOUT, |comm| {
        let grid = UlyssesGrid::new(4, 1).unwrap();
        let sp = SpAttention::with_method(comm, SpMethod::Ulysses(grid), Overlap::Blocking)?;
        let sh = sp.set_seq_len(8)?;
        let shape = AttnShape {
            b: 1,
            tq: sh.local_len(),
            tk: sh.local_len(),
            h: 4,
            h_kv: 2,
            d: 2,
        };
        let (q, kv) = (vec![0.5; 8], vec![0.25; 4]);
        let (mut out, mut lse) = (vec![0.0; 8], vec![0.0; 8]);
        let heads = sp
            .forward(&mut out, &mut lse, &q, &kv, &kv, shape)
            .unwrap_err()
            .to_string();
        let packed = sp
            .set_packed(vec![reel_model::PackedRow {
                prefix: 2,
                segments: vec![3, 3],
            }])
            .unwrap_err()
            .to_string();
        Ok::<_, DistExecError>((heads, packed))
    });
    let (heads, packed) = res.into_iter().next().unwrap().unwrap();
    assert!(
        heads.contains("h_kv = 2") && heads.contains("UlyssesGrid::new(2, 2)"),
        "{heads}"
    );
    assert!(packed.contains("ring-family"), "{packed}");
    let res = InProcess::spawn(3, TIMEOUT, |comm| {
        let grid = UlyssesGrid::new(2, 1).unwrap();
        Ok::<_, DistExecError>(
            SpAttention::with_method(comm, SpMethod::Ulysses(grid), Overlap::Blocking)
                .err()
                .map(|e| e.to_string()),
        )
    });
    let e = res[0]
        .as_ref()
        .unwrap()
        .clone()
        .expect("3 ranks for 2 × 1 refused");
    assert!(e.contains("3 ranks") && e.contains("2"), "{e}");
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
