//! The device-resident Qwen2 under sequence parallelism: `GpuQwen2` on sp = 2 and 3 in-process
//! ranks of one GPU (each rank its own stream, its token shard of the schedule's layout, attention
//! through `GpuDistAttn`, gradients and loss all-reduced on the device) against the one-rank
//! `GpuQwen2` and the CPU model on the whole batch: the global loss and the gradient of every
//! parameter tensor, by checkpoint name, under each checkpoint policy and each causal schedule
//! (balanced DistAttn, ring, zigzag ring); every rank ends with bit-identical gradients, and after
//! clipping and AdamW with identical weights. The sequence length is no multiple of the ranks
//! (padded shards). Warm steps allocate nothing: after one step, a second and third step of every
//! rank (ring, balanced DistAttn, Ulysses and the hybrid; sp 2, 3 and 4) make no device
//! allocation, and their loss and gradients still match one rank's. Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --features cudnn --release --test gpu_sp_model -- --nocapture
#![cfg(feature = "cudnn")]

mod common;
use common::model::{enabled, Case};
use common::rel_norm_err;

use std::time::{Duration, Instant};

use reel_cuda::{DeviceWorld, Gpu, GpuAttention, GpuQwen2, GpuSpAttention};
use reel_model::{CheckpointPolicy, LocalAttention, Qwen2, Qwen2Config, Workspace};
use reel_optim::AdamWConfig;
use reel_parallel::{Overlap, ScheduleKind, SpMethod, UlyssesGrid};

impl Case {
    fn labelled(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

fn config() -> Qwen2Config {
    let mut c = Qwen2Config::tiny(200);
    c.tie_word_embeddings = false;
    c.num_hidden_layers = 3;
    c.head_dim = 32;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.hidden_size = 96;
    c.intermediate_size = 160;
    c
}

/// What one rank ended with.
struct RankOut {
    loss_mean: f64,
    n_tokens: usize,
    local_tokens: usize,
    grads: Vec<f32>,
    /// Weights after clipping at 1.0 and one AdamW step.
    stepped: Vec<f32>,
    /// Median step time over the repeats after the first two (the first builds plans).
    step_s: f64,
    /// Device allocations of the first step, and of all later ones.
    cold_allocs: u64,
    warm_allocs: u64,
}

/// Median of `times` past the first two (all of them when there are fewer than three).
fn median_after_warmup(times: &[f64]) -> f64 {
    let mut t: Vec<f64> = if times.len() > 2 {
        times[2..].to_vec()
    } else {
        times.to_vec()
    };
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// `repeats` steps (the same batch, no update between them; the cached scratch blocks filled
/// with NaN before every step after the first) of `GpuQwen2` over `p` in-process ranks of one
/// GPU, attention by `method`.
fn sp_step(
    c: &Qwen2Config,
    params: &[f32],
    case: &Case,
    method: SpMethod,
    p: usize,
    policy: CheckpointPolicy,
    repeats: usize,
) -> Vec<RankOut> {
    let what = format!("{method:?}");
    let world = DeviceWorld::new(p, Duration::from_secs(60));
    let mut models: Vec<GpuQwen2> = (0..p)
        .map(|r| {
            let gpu = Gpu::open_on_new_stream(0).unwrap();
            let comm = world.comm(r, &gpu).unwrap();
            let sp =
                GpuSpAttention::with_method(comm, method.clone(), Overlap::Overlapped).unwrap();
            let mut gm =
                GpuQwen2::new(gpu, c.clone(), params, policy, AdamWConfig::default()).unwrap();
            gm.set_attention(GpuAttention::Sp(Box::new(sp)));
            gm
        })
        .collect();
    let labelled = case.labelled();
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = models
            .iter_mut()
            .enumerate()
            .map(|(r, gm)| {
                s.spawn(move || -> reel_cuda::Result<RankOut> {
                    let sh = gm.set_seq_len(case.t)?.expect("sequence-parallel model");
                    let shard = sh
                        .shard_tokens(&case.tokens, &case.targets, case.b, r, 0, -100)
                        .unwrap();
                    let tb = shard.batch();
                    let mut times = Vec::new();
                    let mut out = None;
                    let (mut cold_allocs, mut warm_allocs) = (0, 0);
                    for i in 0..repeats {
                        if i > 0 {
                            // A buffer read before it is written would now read NaN.
                            gm.gpu().scribble_cached(0xFF)?;
                        }
                        gm.gpu().synchronize()?;
                        let before = gm.gpu().alloc_stats().device_allocs;
                        let t0 = Instant::now();
                        gm.zero_grads()?;
                        let local = gm.forward(&tb)?;
                        gm.backward(&tb, 1.0 / labelled as f32)?;
                        let global = gm.all_reduce_grads(local)?;
                        gm.gpu().synchronize()?;
                        times.push(t0.elapsed().as_secs_f64());
                        let made = gm.gpu().alloc_stats().device_allocs - before;
                        if i == 0 {
                            cold_allocs = made;
                        } else {
                            warm_allocs += made;
                        }
                        out = Some((local, global));
                    }
                    let (local, global) = out.expect("one repeat at least");
                    let grads = gm.grads_host()?;
                    gm.clip_grad_norm(1.0)?;
                    gm.adamw_step(1e-3)?;
                    Ok(RankOut {
                        loss_mean: global.mean(),
                        n_tokens: global.n_tokens,
                        local_tokens: local.n_tokens,
                        grads,
                        stepped: gm.params_host()?,
                        step_s: median_after_warmup(&times),
                        cold_allocs,
                        warm_allocs,
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    outs.into_iter()
        .enumerate()
        .map(|(r, o)| o.unwrap_or_else(|e| panic!("{what} P {p} {policy} rank {r}: {e}")))
        .collect()
}

fn one_rank(
    c: &Qwen2Config,
    params: &[f32],
    case: &Case,
    policy: CheckpointPolicy,
    repeats: usize,
) -> (f64, Vec<f32>, f64) {
    let gpu = Gpu::open(0).expect("REEL_GPU_TESTS=1 but no GPU");
    let mut gm = GpuQwen2::new(gpu, c.clone(), params, policy, AdamWConfig::default()).unwrap();
    let mut res = None;
    let mut times = Vec::new();
    for _ in 0..repeats {
        gm.gpu().synchronize().unwrap();
        let t0 = Instant::now();
        gm.zero_grads().unwrap();
        let s = gm.forward(&case.batch()).unwrap();
        gm.backward(&case.batch(), 1.0 / s.n_tokens as f32).unwrap();
        // Local attention: the statistics come back unchanged.
        assert_eq!(gm.all_reduce_grads(s).unwrap(), s);
        gm.gpu().synchronize().unwrap();
        times.push(t0.elapsed().as_secs_f64());
        res = Some(s.mean());
    }
    let loss = res.unwrap();
    (loss, gm.grads_host().unwrap(), median_after_warmup(&times))
}

fn cpu_reference(model: &Qwen2, case: &Case) -> (f64, Vec<f32>) {
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::None);
    let s = model
        .forward(&mut ws, &case.batch(), &LocalAttention)
        .unwrap();
    let mut g = vec![0.0f32; model.params.len()];
    model
        .backward(
            &mut g,
            &mut ws,
            &case.batch(),
            1.0 / s.n_tokens as f32,
            &LocalAttention,
        )
        .unwrap();
    (s.mean(), g)
}

/// Worst relative-norm error over the tensors; fails past `bound`.
fn check_grads(what: &str, model: &Qwen2, got: &[f32], want: &[f32], bound: f64) -> f64 {
    let mut worst = 0.0f64;
    for e in &model.layout.entries {
        let (a, w) = (&got[e.range.clone()], &want[e.range.clone()]);
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{what}: {} non-finite",
            e.name
        );
        let rel = rel_norm_err(a, w);
        worst = worst.max(rel);
        assert!(
            rel <= bound,
            "{what}: gradient of {} off by relative norm {rel:.3e}",
            e.name
        );
    }
    worst
}

#[test]
fn sp_ranks_match_one_rank_and_the_cpu_model_under_each_policy_and_schedule() {
    if !enabled() {
        return;
    }
    let c = config();
    let model = Qwen2::new_random(c.clone(), 7).unwrap();
    let case = Case::new(11, c.vocab_size, 2, 203, 5);
    let (cpu_loss, cpu_g) = cpu_reference(&model, &case);
    let kinds = [
        ScheduleKind::DistAttnCausal,
        ScheduleKind::RingCausal,
        ScheduleKind::ZigzagRingCausal,
    ];
    for policy in [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ] {
        let (one_loss, one_g, _) = one_rank(&c, &model.params, &case, policy, 1);
        for p in [2usize, 3] {
            for kind in kinds {
                let what = format!("{kind:?} P {p} {policy}");
                let method = SpMethod::Schedule(kind.build(p).unwrap());
                let outs = sp_step(&c, &model.params, &case, method, p, policy, 1);
                let loss = outs[0].loss_mean;
                eprintln!("{what}: loss SP {loss:.6} one rank {one_loss:.6} CPU {cpu_loss:.6}");
                assert_eq!(outs[0].n_tokens, case.labelled(), "{what}: global count");
                assert_eq!(
                    outs.iter().map(|o| o.local_tokens).sum::<usize>(),
                    case.labelled(),
                    "{what}: the shards' labelled tokens"
                );
                assert!(
                    (loss - cpu_loss).abs() <= 1e-2 * cpu_loss.abs(),
                    "{what}: loss {loss} vs CPU {cpu_loss}"
                );
                assert!(
                    (loss - one_loss).abs() <= 1e-2 * one_loss.abs(),
                    "{what}: loss {loss} vs one rank {one_loss}"
                );
                for (r, o) in outs.iter().enumerate() {
                    assert_eq!(o.loss_mean, loss, "{what}: rank {r}'s global loss");
                    assert!(
                        o.grads == outs[0].grads,
                        "{what}: rank {r}'s all-reduced gradients differ from rank 0's"
                    );
                    assert!(
                        o.stepped == outs[0].stepped,
                        "{what}: rank {r}'s weights after AdamW differ from rank 0's"
                    );
                }
                let w_cpu = check_grads(
                    &format!("{what} vs CPU"),
                    &model,
                    &outs[0].grads,
                    &cpu_g,
                    3e-2,
                );
                let w_one = check_grads(
                    &format!("{what} vs one rank"),
                    &model,
                    &outs[0].grads,
                    &one_g,
                    3e-2,
                );
                eprintln!(
                    "  worst gradient rel-norm error: vs CPU {w_cpu:.3e}, vs one rank {w_one:.3e}"
                );
            }
        }
    }
}

/// Step time of sp = 2 and 3 on one GPU against one rank, at a longer sequence (printed, not
/// asserted: ranks on one GPU share it, so SP costs time here; it pays across GPUs).
#[test]
fn sp_step_time_on_one_gpu() {
    if !enabled() {
        return;
    }
    let mut c = config();
    c.hidden_size = 512;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 2;
    c.head_dim = 64;
    c.intermediate_size = 1408;
    c.num_hidden_layers = 4;
    c.vocab_size = 4096;
    c.max_position_embeddings = 16384;
    let model = Qwen2::new_random(c.clone(), 3).unwrap();
    let case = Case::new(5, c.vocab_size, 1, 8192, 7);
    let policy = CheckpointPolicy::Remat;
    let (l1, _, s1) = one_rank(&c, &model.params, &case, policy, 12);
    eprintln!(
        "T 8192, d 512, 4 layers, {policy}, median of 10 warm steps: one rank {:.1} ms/step \
         (loss {l1:.4})",
        s1 * 1e3
    );
    for p in [2usize, 3] {
        let method = SpMethod::Schedule(ScheduleKind::DistAttnCausal.build(p).unwrap());
        let outs = sp_step(&c, &model.params, &case, method, p, policy, 12);
        let worst = outs.iter().map(|o| o.step_s).fold(0.0, f64::max);
        eprintln!(
            "  sp {p} (DistAttn, {p} ranks on one GPU): {:.1} ms/step (loss {:.4}; device \
             allocations: first step {}, the 11 after it {})",
            worst * 1e3,
            outs[0].loss_mean,
            outs[0].cold_allocs,
            outs[0].warm_allocs
        );
        assert!((outs[0].loss_mean - l1).abs() <= 1e-2 * l1.abs());
    }
}

/// After one step, two more steps of every rank allocate no device memory, under a ring-family
/// schedule, balanced DistAttn, pure Ulysses (u = P) and the hybrid (2 × 2), with and without
/// recomputation; the last step's loss and gradients match one rank's (every cached scratch
/// block is filled with NaN before each later step, so a buffer read before it is written would
/// show).
#[test]
fn warm_sp_steps_allocate_nothing() {
    if !enabled() {
        return;
    }
    let mut c = config();
    // H_kv 6: Ulysses over 2 and 3 ranks (u | H_kv).
    c.num_attention_heads = 12;
    c.num_key_value_heads = 6;
    let model = Qwen2::new_random(c.clone(), 9).unwrap();
    let case = Case::new(17, c.vocab_size, 2, 203, 5);
    let sched = |k: ScheduleKind, p: usize| (p, SpMethod::Schedule(k.build(p).unwrap()));
    let uly = |u: usize, r: usize| (u * r, SpMethod::Ulysses(UlyssesGrid::new(u, r).unwrap()));
    let methods = [
        sched(ScheduleKind::RingCausal, 2),
        sched(ScheduleKind::RingCausal, 3),
        sched(ScheduleKind::DistAttnCausal, 2),
        sched(ScheduleKind::DistAttnCausal, 3),
        sched(ScheduleKind::ZigzagRingCausal, 3),
        uly(2, 1),
        uly(3, 1),
        uly(2, 2),
    ];
    let mut failed = Vec::new();
    for policy in [CheckpointPolicy::None, CheckpointPolicy::Remat] {
        let (one_loss, one_g, _) = one_rank(&c, &model.params, &case, policy, 1);
        for (p, method) in &methods {
            let what = format!("{method:?} P {p} {policy}");
            let outs = sp_step(&c, &model.params, &case, method.clone(), *p, policy, 3);
            let counts: Vec<(u64, u64)> = outs
                .iter()
                .map(|o| (o.cold_allocs, o.warm_allocs))
                .collect();
            let loss = outs[0].loss_mean;
            eprintln!(
                "{what}: (first step, steps 2-3) device allocations per rank {counts:?}; loss \
                 {loss:.6} one rank {one_loss:.6}"
            );
            if counts.iter().any(|&(_, w)| w != 0) {
                failed.push(format!("{what}: warm steps allocated {counts:?}"));
            }
            assert!(
                (loss - one_loss).abs() <= 1e-2 * one_loss.abs(),
                "{what}: loss {loss} vs one rank {one_loss}"
            );
            for (r, o) in outs.iter().enumerate() {
                assert!(
                    o.grads == outs[0].grads,
                    "{what}: rank {r}'s gradients differ"
                );
            }
            check_grads(
                &format!("{what} vs one rank"),
                &model,
                &outs[0].grads,
                &one_g,
                3e-2,
            );
        }
    }
    assert!(failed.is_empty(), "warm steps allocated: {failed:?}");
}

/// A rank whose batch does not fit the announced sharding fails with a shape error and aborts
/// the group: the other rank stops at its next exchange with the abort, long before the world's
/// timeout.
#[test]
fn a_failing_rank_aborts_the_group_promptly() {
    if !enabled() {
        return;
    }
    let c = config();
    let model = Qwen2::new_random(c.clone(), 1).unwrap();
    let case = Case::new(3, c.vocab_size, 1, 64, 4);
    let p = 2;
    let world = DeviceWorld::new(p, Duration::from_secs(60));
    let mut models: Vec<GpuQwen2> = (0..p)
        .map(|r| {
            let gpu = Gpu::open_on_new_stream(0).unwrap();
            let comm = world.comm(r, &gpu).unwrap();
            let sp = GpuSpAttention::new(
                comm,
                ScheduleKind::DistAttnCausal.build(p).unwrap(),
                Overlap::Overlapped,
            )
            .unwrap();
            let mut gm = GpuQwen2::new(
                gpu,
                c.clone(),
                &model.params,
                CheckpointPolicy::Remat,
                AdamWConfig::default(),
            )
            .unwrap();
            gm.set_attention(GpuAttention::Sp(Box::new(sp)));
            gm
        })
        .collect();
    let t0 = Instant::now();
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = models
            .iter_mut()
            .enumerate()
            .map(|(r, gm)| {
                let case = &case;
                s.spawn(move || {
                    let sh = gm.set_seq_len(case.t).unwrap().unwrap();
                    let shard = sh
                        .shard_tokens(&case.tokens, &case.targets, 1, r, 0, -100)
                        .unwrap();
                    // Rank 1 then announces another length than the batch it runs.
                    if r == 1 {
                        gm.set_seq_len(case.t + 40).unwrap();
                    }
                    match gm.forward(&shard.batch()) {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("errors after {secs:.2} s: {errs:?}");
    assert!(errs[1].contains("shard length"), "rank 1: {}", errs[1]);
    assert!(errs[0].contains("aborted"), "rank 0: {}", errs[0]);
    assert!(secs < 30.0, "the abort took {secs} s");
}
