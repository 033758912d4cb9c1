//! The sharded optimizer (ZeRO-1, `GpuQwen2::new_sharded`), and with it sharded gradients
//! (ZeRO-2, `GpuQwen2::shard_gradients`), on in-process dp × sp ranks of one GPU against the
//! same grid with the optimizer replicated: three training steps of different batches (at step
//! 2 the second replica has none: `skip_backward`), each replica its own, each sp rank its token
//! shard, clipping that scales, AdamW with
//! weight decay. The sharded ranks end bit-identical to each other, and within reduction-order
//! rounding of the replicated run, weights and both moments (gathered by `gather_state`); state
//! loaded into sharded ranks gathers back bit for bit; the whole master weights are refused
//! between `zero_grads` and the update; `opt_state` of a sharded rank is refused. Grids: sp 2,
//! dp 2, dp 2 × sp 2, and sp 3 (a parameter count the world does not divide: padding). Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --features cudnn --release --test gpu_zero -- --nocapture
#![cfg(feature = "cudnn")]

mod common;
use common::model::{enabled, Case};
use common::rel_norm_err;

use std::time::Duration;

use reel_cuda::{DeviceWorld, Gpu, GpuAttention, GpuQwen2, GpuSpAttention};
use reel_model::{CheckpointPolicy, ParamLayout, Qwen2, Qwen2Config};
use reel_optim::{AdamWConfig, AdamWState, OptShard};
use reel_parallel::{Overlap, ScheduleKind, SpMethod};

fn config() -> Qwen2Config {
    let mut c = Qwen2Config::tiny(200);
    c.tie_word_embeddings = false;
    c.num_hidden_layers = 2;
    c.head_dim = 32;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.hidden_size = 96;
    c.intermediate_size = 160;
    c
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    }
}

const STEPS: usize = 3;
const T: usize = 61;

/// The ranks of a dp × sp grid, world order (replica-major): `stage` 0 replicated, 1 the
/// optimizer sharded (ZeRO-1), 2 the gradients too (ZeRO-2).
fn grid(c: &Qwen2Config, params: &[f32], dp: usize, sp: usize, stage: u8) -> Vec<GpuQwen2> {
    let sharded = stage > 0;
    let timeout = Duration::from_secs(60);
    let sp_worlds: Vec<DeviceWorld> = (0..dp).map(|_| DeviceWorld::new(sp, timeout)).collect();
    let dp_worlds: Vec<DeviceWorld> = (0..sp).map(|_| DeviceWorld::new(dp, timeout)).collect();
    let total = ParamLayout::new(c).total();
    let mut out = Vec::new();
    for (d, sp_world) in sp_worlds.iter().enumerate() {
        for (s, dp_world) in dp_worlds.iter().enumerate() {
            let gpu = Gpu::open_on_new_stream(0).unwrap();
            let plan = sharded.then(|| OptShard::new(total, sp, dp, s, d));
            let attn = (sp > 1).then(|| {
                let comm = sp_world.comm(s, &gpu).unwrap();
                let method = SpMethod::Schedule(ScheduleKind::DistAttnCausal.build(sp).unwrap());
                GpuSpAttention::with_method(comm, method, Overlap::Overlapped).unwrap()
            });
            let dpc = (dp > 1).then(|| dp_world.comm(d, &gpu).unwrap());
            let mut gm = GpuQwen2::new_sharded(
                gpu,
                c.clone(),
                params,
                CheckpointPolicy::Remat,
                adamw(),
                plan,
            )
            .unwrap();
            if let Some(a) = attn {
                gm.set_attention(GpuAttention::Sp(Box::new(a)));
            }
            if let Some(x) = dpc {
                gm.set_dp_group(Box::new(x));
            }
            if stage == 2 {
                gm.shard_gradients().unwrap();
                assert!(gm.grads_sharded());
                let len = OptShard::new(total, sp, dp, s, d).len();
                assert_eq!(gm.grads_host().unwrap().len(), len, "a shard's gradients");
            }
            out.push(gm);
        }
    }
    out
}

/// What a rank ended with: its weights, the gathered state, the gradient norms of each step.
struct Ended {
    params: Vec<f32>,
    state: AdamWState,
    norms: Vec<f32>,
}

/// `STEPS` steps on every rank (a thread each): replica d trains on its own batch of each step,
/// sp rank s on its token shard of it.
fn train(models: &mut [GpuQwen2], vocab: usize, sp: usize) -> Vec<Ended> {
    let outs: Vec<reel_cuda::Result<Ended>> = std::thread::scope(|sc| {
        let hs: Vec<_> = models
            .iter_mut()
            .enumerate()
            .map(|(k, gm)| {
                sc.spawn(move || -> reel_cuda::Result<Ended> {
                    let (d, s) = (k / sp, k % sp);
                    let mut norms = Vec::new();
                    for step in 0..STEPS {
                        let case = Case::new(100 + 10 * step as u64 + d as u64, vocab, 1, T, 5);
                        let labelled: usize = case.targets.iter().filter(|&&t| t >= 0).count();
                        let tb_owned;
                        let tb = match gm.set_seq_len(case.t)? {
                            Some(sh) => {
                                tb_owned = sh
                                    .shard_tokens(&case.tokens, &case.targets, case.b, s, 0, -100)
                                    .unwrap();
                                tb_owned.batch()
                            }
                            None => case.batch(),
                        };
                        gm.zero_grads()?;
                        // Replica 1 has no micro-batch at step 1: with sharded gradients it
                        // joins replica 0's reduces with nothing (skip_backward; a no-op else).
                        let local = if d == 1 && step == 1 {
                            gm.skip_backward()?;
                            reel_model::LossStats::default()
                        } else {
                            let local = gm.forward(&tb)?;
                            gm.backward(&tb, 1.0 / labelled as f32)?;
                            local
                        };
                        gm.all_reduce_grads(local)?;
                        // Small enough that every step clips.
                        norms.push(gm.clip_grad_norm(0.05)?);
                        gm.adamw_step(1e-2)?;
                    }
                    let (params, state) = gm.gather_state(true)?.expect("kept");
                    assert_eq!(
                        Some(&params),
                        gm.gather_params(true)?.as_ref(),
                        "gather_state's weights"
                    );
                    // The bf16 weights are the master weights rounded, on every rank.
                    let mut w = vec![0f32; params.len()];
                    gm.weights_range_into(0..params.len(), &mut w)?;
                    let rounded: Vec<f32> = params
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect();
                    assert_eq!(w, rounded, "the bf16 weights");
                    Ok(Ended {
                        params,
                        state,
                        norms,
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    outs.into_iter()
        .enumerate()
        .map(|(k, o)| o.unwrap_or_else(|e| panic!("rank {k}: {e}")))
        .collect()
}

fn flat(v: &[Vec<f32>]) -> Vec<f32> {
    v.concat()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn sharded_ranks_train_as_the_replicated_ones() {
    if !enabled() {
        return;
    }
    let c = config();
    let model = Qwen2::new_random(c.clone(), 3).unwrap();
    let total = model.params.len();
    for (dp, sp) in [(1, 2), (2, 1), (2, 2), (1, 3)] {
        let what = format!("dp {dp} × sp {sp}");
        let plan = OptShard::new(total, sp, dp, 0, 0);
        eprintln!(
            "{what}: {total} parameters, padded {}, shard {}",
            plan.padded,
            plan.len()
        );
        let rep = train(&mut grid(&c, &model.params, dp, sp, 0), c.vocab_size, sp);
        for stage in [1, 2] {
            let what = format!("{what}, ZeRO-{stage}");
            let mut sharded_models = grid(&c, &model.params, dp, sp, stage);
            let sh = train(&mut sharded_models, c.vocab_size, sp);
            for (k, o) in sh.iter().enumerate() {
                assert_eq!(
                    bits(&o.params),
                    bits(&sh[0].params),
                    "{what}: rank {k}'s weights"
                );
                assert_eq!(o.norms, sh[0].norms, "{what}: rank {k}'s gradient norms");
            }
            let (a, b) = (&sh[0], &rep[0]);
            for (x, y) in a.norms.iter().zip(&b.norms) {
                assert!(
                    (x - y).abs() <= 1e-4 * y,
                    "{what}: gradient norm {x} vs {y}"
                );
                assert!(*y > 0.05, "{what}: the step did not clip (norm {y})");
            }
            let e_w = rel_norm_err(&a.params, &b.params);
            let moved = rel_norm_err(&b.params, &model.params);
            let e_m = rel_norm_err(&flat(&a.state.m), &flat(&b.state.m));
            let e_v = rel_norm_err(&flat(&a.state.v), &flat(&b.state.v));
            eprintln!(
            "{what}: sharded vs replicated — weights {e_w:.2e} (the steps moved them {moved:.2e}), \
             m {e_m:.2e}, v {e_v:.2e}; norms {:?} vs {:?}",
            a.norms, b.norms
        );
            assert_eq!(a.state.step, STEPS as u64);
            assert!(
                e_w <= 1e-3 * moved,
                "{what}: weights {e_w:e} (moved {moved:e})"
            );
            assert!(
                e_m <= 1e-4 && e_v <= 1e-4,
                "{what}: moments m {e_m:e} v {e_v:e}"
            );

            // The replicated run's state loaded into the sharded ranks gathers back whole.
            let got = std::thread::scope(|sc| {
                let hs: Vec<_> = sharded_models
                    .iter_mut()
                    .map(|gm| {
                        let st = &b.state;
                        sc.spawn(move || -> reel_cuda::Result<_> {
                            gm.load_opt_state(st.as_ref())?;
                            // The whole master weights are gone between zero_grads and the update.
                            gm.zero_grads()?;
                            let refused = gm.params_host().is_err();
                            // An update of zero gradients at lr 0 changes nothing and gathers them.
                            gm.adamw_step(0.0)?;
                            let opt_refused = gm.opt_state().is_err();
                            Ok((refused, opt_refused, gm.gather_state(true)?.expect("kept")))
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap().unwrap())
                    .collect::<Vec<_>>()
            });
            for (k, (refused, opt_refused, (params, st))) in got.into_iter().enumerate() {
                assert!(
                    refused,
                    "{what}: rank {k} gave the master weights after zero_grads"
                );
                assert!(
                    opt_refused,
                    "{what}: rank {k}'s opt_state of a sharded optimizer"
                );
                assert_eq!(
                    bits(&params),
                    bits(&a.params),
                    "{what}: rank {k}'s weights kept"
                );
                // An AdamW step of zero gradients at lr 0 leaves m = β1·m and v = β2·v.
                let cfg = adamw();
                let want_m: Vec<f32> = flat(&b.state.m).iter().map(|x| x * cfg.beta1).collect();
                let want_v: Vec<f32> = flat(&b.state.v).iter().map(|x| x * cfg.beta2).collect();
                assert!(
                    rel_norm_err(&flat(&st.m), &want_m) <= 1e-6
                        && rel_norm_err(&flat(&st.v), &want_v) <= 1e-6,
                    "{what}: rank {k}'s state after loading and a zero step"
                );
                assert_eq!(st.step, b.state.step + 1);
            }
        }
    }
}
