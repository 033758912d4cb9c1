//! The sharded engine (sequence-parallel prefill, KV sharded over ranks, decode attention merged
//! from per-rank partials) against the single-rank engine on the golden fixture model, on
//! in-process ranks at world 1, 2 and 3: tokens, log-probabilities and finish reasons, a prompt
//! that fits no single rank's pool, and the communication it counts.

use reel_comm::InProcess;
use reel_model::generate::SamplingParams;
use reel_model::{load_checkpoint, Qwen2};
use reel_parallel::ScheduleKind;
use reel_rollout::{
    Engine, EngineConfig, GenerationParams, GroupOutput, MRopePrompt, Prompt, RolloutError,
    ShardedEngine, ShardedStats,
};
use std::path::Path;
use std::time::Duration;

fn model() -> Qwen2 {
    load_checkpoint(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny"))
        .unwrap()
}

fn prompt(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 37 + seed * 11 + i * i * seed) % 120) as u32)
        .collect()
}

fn params(max_new: usize, temperature: f32, seed: u64) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature,
            top_p: 0.95,
            top_k: 50,
            seed,
        },
        max_new_tokens: max_new,
        stop_token_ids: vec![7],
        ..GenerationParams::default()
    }
}

/// (prompt, group size, params) of a mixed workload: greedy and sampled groups, prompts shorter
/// than the world, partial blocks, a stop token.
fn workload() -> Vec<(Vec<u32>, usize, GenerationParams)> {
    vec![
        (prompt(29, 1), 3, params(9, 0.0, 0)),
        (prompt(2, 2), 2, params(6, 1.0, 17)),
        (prompt(41, 3), 4, params(12, 1.0, 5)),
        (prompt(13, 4), 1, params(1, 1.0, 9)),
        (prompt(8, 5), 2, params(0, 1.0, 3)),
    ]
}

fn single(
    m: &Qwen2,
    work: &[(impl Into<Prompt> + Clone, usize, GenerationParams)],
) -> Vec<GroupOutput> {
    let mut e = Engine::new(m, EngineConfig::default()).unwrap();
    for (p, g, par) in work {
        e.add_group(p.clone(), *g, par.clone()).unwrap();
    }
    e.run().unwrap()
}

fn sharded(
    m: &Qwen2,
    world: usize,
    kind: ScheduleKind,
    config: EngineConfig,
    work: &[(impl Into<Prompt> + Clone + Sync, usize, GenerationParams)],
) -> Vec<(Vec<GroupOutput>, ShardedStats)> {
    let res = InProcess::spawn(world, Duration::from_secs(30), |comm| {
        let mut e = ShardedEngine::new(m, &comm, config, kind)?;
        for (p, g, par) in work {
            e.add_group(p.clone(), *g, par.clone())?;
        }
        let out = e.run()?;
        assert_eq!(
            e.pool().free_blocks(),
            e.pool().total_blocks(),
            "every block returned"
        );
        Ok::<_, RolloutError>((out, e.stats()))
    });
    res.into_iter().map(|r| r.unwrap()).collect()
}

fn assert_same(got: &[GroupOutput], want: &[GroupOutput], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: groups");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.id, w.id);
        assert_eq!(g.samples.len(), w.samples.len());
        for (j, (a, b)) in g.samples.iter().zip(&w.samples).enumerate() {
            let at = format!("{what}: group {} sample {j}", g.id);
            assert_eq!(a.ids, b.ids, "{at}: tokens");
            assert_eq!(a.finish, b.finish, "{at}: finish");
            assert_eq!(a.seed, b.seed, "{at}: seed");
            for (t, (x, y)) in a.logprobs.iter().zip(&b.logprobs).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 + 1e-4 * y.abs(),
                    "{at}: log-prob of token {t}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn sharded_engine_matches_the_single_rank_engine_at_world_1_2_3() {
    let m = model();
    let work = workload();
    let want = single(&m, &work);
    assert!(want
        .iter()
        .any(|g| g.samples.iter().any(|s| s.ids.len() > 3)));
    let config = EngineConfig {
        block_size: 3,
        num_blocks: 200,
        ..EngineConfig::default()
    };
    for world in [1usize, 2, 3] {
        for kind in [ScheduleKind::DistAttnCausal, ScheduleKind::ZigzagRingCausal] {
            let ranks = sharded(&m, world, kind, config, &work);
            let what = format!("world {world}, {kind:?}");
            for (r, (out, st)) in ranks.iter().enumerate() {
                // Every rank holds the same outputs, bit for bit.
                assert_eq!(out, &ranks[0].0, "{what}: rank {r} differs from rank 0");
                assert_eq!(st.engine.prefill_tokens, 29 + 2 + 41 + 13, "{what}");
            }
            assert_same(&ranks[0].0, &want, &what);
            let prompt_held: u64 = ranks.iter().map(|(_, s)| s.local_prompt_tokens).sum();
            assert_eq!(prompt_held, 29 + 2 + 41 + 13, "{what}: prompt KV held once");
            let decoded = ranks[0].1.engine.decode_tokens;
            let held: u64 = ranks.iter().map(|(_, s)| s.local_decode_tokens).sum();
            assert_eq!(
                held, decoded,
                "{what}: each generated token's KV on one rank"
            );
        }
    }
}

#[test]
fn a_prompt_longer_than_one_pool_rolls_out_across_ranks() {
    let m = model();
    let long = prompt(90, 7);
    let work = vec![
        (long.clone(), 3, params(10, 1.0, 11)),
        (prompt(33, 8), 2, params(8, 0.0, 0)),
    ];
    // 16 blocks of 4 tokens: 64 tokens, fewer than the long prompt alone.
    let small = EngineConfig {
        block_size: 4,
        num_blocks: 16,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(&m, small).unwrap();
    let err = e
        .add_group(long.clone(), 3, params(10, 1.0, 11))
        .unwrap_err();
    assert!(matches!(err, RolloutError::PoolTooSmall { .. }), "{err}");
    let err = sharded_err(&m, 1, small, &work);
    assert!(err.contains("cannot run even alone"), "{err}");

    let want = single(&m, &work);
    let ranks = sharded(&m, 3, ScheduleKind::ZigzagRingCausal, small, &work);
    assert_same(&ranks[0].0, &want, "world 3 over 16-block pools");
    for (r, (_, st)) in ranks.iter().enumerate() {
        assert!(st.peak_blocks <= 16, "rank {r}: {} blocks", st.peak_blocks);
        assert!(st.local_prompt_tokens > 0, "rank {r} holds a prompt shard");
    }
    // The generated tokens' KV spreads over the ranks (least-loaded owners).
    let owners = ranks
        .iter()
        .filter(|(_, s)| s.local_decode_tokens > 0)
        .count();
    assert!(owners >= 2, "generated KV on {owners} rank(s)");
}

fn sharded_err(
    m: &Qwen2,
    world: usize,
    config: EngineConfig,
    work: &[(Vec<u32>, usize, GenerationParams)],
) -> String {
    let res = InProcess::spawn(world, Duration::from_secs(30), |comm| {
        let mut e = ShardedEngine::new(m, &comm, config, ScheduleKind::DistAttnCausal)?;
        for (p, g, par) in work {
            e.add_group(Prompt::from(p.clone()), *g, par.clone())?;
        }
        e.run()?;
        Ok::<_, RolloutError>(())
    });
    res.into_iter()
        .find_map(|r| r.err())
        .expect("the run fails")
        .to_string()
}

#[test]
fn communication_is_counted() {
    let m = model();
    let c = &m.config;
    let work = vec![
        (prompt(37, 2), 3, params(7, 1.0, 4)),
        (prompt(11, 6), 2, params(5, 0.0, 0)),
    ];
    let config = EngineConfig::default();
    for world in [1usize, 2, 3] {
        let ranks = sharded(&m, world, ScheduleKind::DistAttnCausal, config, &work);
        for (r, (_, st)) in ranks.iter().enumerate() {
            let what = format!("world {world}, rank {r}");
            // Decode: per layer and step one all-gather of [o ‖ lse] of the step's rows; this rank
            // sends its partial to the W − 1 others.
            let per_token = 4 * (c.num_attention_heads * c.head_dim + c.num_attention_heads) as u64;
            let want = c.num_hidden_layers as u64
                * (world as u64 - 1)
                * per_token
                * st.engine.decode_tokens;
            assert_eq!(st.decode_comm.bytes_sent, want, "{what}: decode bytes");
            assert!(st.decode_comm.calls > 0, "{what}");
            // Admission: one flag all-reduce per group here (both fit at once).
            assert_eq!(st.control_comm.calls, 2, "{what}");
            if world == 1 {
                assert_eq!(st.prefill_comm.bytes_sent + st.decode_comm.bytes_sent, 0);
            } else {
                assert!(
                    st.prefill_comm.bytes_recv > 0,
                    "{what}: prefill moves KV/partials"
                );
            }
        }
    }
}

#[test]
fn embedding_and_mrope_prompts_match_the_single_rank_engine() {
    // A VLM-like prompt: input embeddings (not the ids' rows) and 3-D rotary positions that are
    // not consecutive; generated tokens continue after the largest component.
    let m = model();
    let (d, half) = (m.config.hidden_size, m.config.head_dim / 2);
    let embed = &m.params[m.layout.embed.clone()];
    let mk = |n: usize, seed: u64| -> Prompt {
        let ids = prompt(n, seed);
        let rows = ids
            .iter()
            .enumerate()
            .flat_map(|(i, &t)| {
                let r = &embed[t as usize * d..(t as usize + 1) * d];
                r.iter()
                    .map(move |&x| x * (1.0 + 0.01 * i as f32))
                    .collect::<Vec<_>>()
            })
            .collect();
        Prompt {
            ids,
            embeddings: Some(rows),
            mrope: Some(MRopePrompt {
                positions: (0..n as u32).map(|i| [i / 3 + 2, i % 4, i % 5]).collect(),
                sections: [half - 3, 2, 1],
            }),
        }
    };
    let work: Vec<(Prompt, usize, GenerationParams)> = vec![
        (mk(23, 1), 2, params(8, 1.0, 3)),
        (mk(10, 2), 1, params(6, 0.0, 0)),
    ];
    let want = single(&m, &work);
    for (world, kind) in [
        (2, ScheduleKind::ZigzagRingCausal),
        (3, ScheduleKind::DistAttnCausal),
    ] {
        let ranks = sharded(&m, world, kind, EngineConfig::default(), &work);
        assert_same(&ranks[0].0, &want, &format!("world {world}, {kind:?}"));
    }
}
