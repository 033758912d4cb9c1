//! `reel bench rollout`: the rollout engine on a small random Qwen2 (`bench_config`), CPU.
//!
//! - decode tokens/s at batch sizes 1, 8 and 64 (one request each, greedy), counted over the
//!   steps that ran no prefill, beside single-sequence `Qwen2::generate` at batch 1;
//! - prefill of one prompt with G samples: as one group (prefilled once, samples forked) and as
//!   G independent requests; prefilled tokens and wall time of each;
//! - the same group on the sharded engine over 1, 2 and 3 in-process ranks (sequence-parallel
//!   prefill, KV sharded): wall time, bytes a rank sent in prefill and per decoded token, and the
//!   most KV blocks one rank held;
//! - the same group with its prefill shared over 1, 2 and 3 in-process CPU peers
//!   (`reel_rollout::shared_prefill::CpuPeerStep`: each peer computes its zigzag chunks, every
//!   layer's keys and values all-gathered, the cache whole on every peer, the samples split):
//!   wall time, and the bytes a peer received beside the formula (`exchange_bytes` and the
//!   agreement's `agreement_bytes`).

use anyhow::Result;
use reel_comm::{Communicator, InProcess};
use reel_model::generate::SamplingParams;
use reel_model::Qwen2;
use reel_parallel::ScheduleKind;
use reel_rollout::{
    Engine, EngineConfig, GenerationParams, RolloutError, ShardedEngine, ShardedStats,
};
use serde_json::json;
use std::time::{Duration, Instant};

fn prompt(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut rng = reel_tensor::rng(seed);
    use rand::Rng;
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn greedy(max_new: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: max_new,
        ..GenerationParams::default()
    }
}

/// Decode tokens/s of `batch` requests (prompt `p` tokens, `new` generated each).
fn decode(model: &Qwen2, batch: usize, p: usize, new: usize) -> Result<serde_json::Value> {
    let v = model.config.vocab_size;
    let mut e = Engine::new(model, EngineConfig::default())?;
    for i in 0..batch {
        e.add_request(prompt(p, i as u64, v), greedy(new))?;
    }
    let (mut decode_s, mut decode_tokens, t0) = (0.0, 0usize, Instant::now());
    while e.has_work() {
        let t = Instant::now();
        let st = e.step()?;
        if st.prefill_tokens == 0 {
            decode_s += t.elapsed().as_secs_f64();
            decode_tokens += st.decode_tokens;
        }
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(json!({
        "batch": batch,
        "decode_tokens_per_s": decode_tokens as f64 / decode_s.max(1e-9),
        "total_s": total,
        "sampled_tokens": e.stats().sampled_tokens,
    }))
}

/// One group of `g` samples of `ids` on the sharded engine over `world` in-process ranks.
fn sharded(
    model: &Qwen2,
    ids: &[u32],
    g: usize,
    new: usize,
    world: usize,
) -> Result<serde_json::Value> {
    let t = Instant::now();
    let res = InProcess::spawn(world, Duration::from_secs(300), |comm| {
        let config = EngineConfig::default();
        let mut e = ShardedEngine::new(model, &comm, config, ScheduleKind::ZigzagRingCausal)?;
        e.add_group(ids.to_vec(), g, greedy(new))?;
        e.run()?;
        Ok::<_, RolloutError>(e.stats())
    });
    let wall = t.elapsed().as_secs_f64();
    let st: Vec<ShardedStats> = res.into_iter().collect::<Result<_, _>>()?;
    let max = |f: &dyn Fn(&ShardedStats) -> u64| st.iter().map(f).max().unwrap_or(0);
    let decoded = st[0].engine.decode_tokens.max(1);
    Ok(json!({
        "world": world,
        "wall_s": wall,
        "prefill_bytes_sent_max": max(&|s| s.prefill_comm.bytes_sent),
        "decode_bytes_sent_per_token": max(&|s| s.decode_comm.bytes_sent) / decoded,
        "peak_blocks_max": max(&|s| s.peak_blocks as u64),
    }))
}

/// Rows a CPU peer computes per segment of the shared prefill rows.
const PEER_ROWS: usize = 128;

/// One group of `g` samples of `ids`, its prefill shared over `world` in-process CPU peers and
/// its samples split over them.
fn shared_peers(
    model: &Qwen2,
    ids: &[u32],
    g: usize,
    new: usize,
    world: usize,
) -> Result<serde_json::Value> {
    use reel_rollout::shared_prefill::{agreement_bytes, exchange_bytes, CpuPeerStep};
    let prompt: reel_rollout::Prompt = ids.to_vec().into();
    let t = Instant::now();
    let res = InProcess::spawn(world, Duration::from_secs(300), |comm| {
        let mut step = CpuPeerStep::new(model, &comm, PEER_ROWS);
        let mut e = Engine::with_model(Box::new(&mut step), EngineConfig::default())?;
        let share = reel_rollout::sample_share(g, world, comm.rank());
        e.add_group_shared(&prompt, share, greedy(new))?;
        e.run()?;
        Ok::<_, RolloutError>(comm.stats().all_gather.bytes_recv)
    });
    let wall = t.elapsed().as_secs_f64();
    let recv: Vec<u64> = res.into_iter().collect::<Result<_, _>>()?;
    let c = &model.config;
    let kv = (c.num_key_value_heads * c.head_dim, c.num_hidden_layers, 4);
    // The layers' exchanges and the agreement's votes.
    let formula = exchange_bytes(ids.len() - 1, world, PEER_ROWS, kv).0 + agreement_bytes(world);
    Ok(json!({
        "world": world,
        "wall_s": wall,
        "recv_bytes_max": recv.iter().copied().max().unwrap_or(0),
        "recv_bytes_formula": formula,
    }))
}

pub fn run(model: &Qwen2, as_json: bool) -> Result<serde_json::Value> {
    let (p, new) = (64, 32);
    let mut rows = Vec::new();
    for batch in [1, 8, 64] {
        rows.push(decode(model, batch, p, new)?);
    }
    // Single-sequence generate: decode time = total minus one prefill.
    let ids = prompt(p, 0, model.config.vocab_size);
    let t = Instant::now();
    let out = model.generate(&ids, new, &[], &SamplingParams::default())?;
    let total = t.elapsed().as_secs_f64();
    let mut cache = reel_model::generate::KvCache::new(model, p);
    let t = Instant::now();
    model.forward_cached(&mut cache, &ids)?;
    let prefill = t.elapsed().as_secs_f64();
    let gen_tps = (out.len() - 1) as f64 / (total - prefill).max(1e-9);

    let (sp, g, sn) = (512, 8, 16);
    let ids = prompt(sp, 7, model.config.vocab_size);
    let mut shared = Vec::new();
    for fork in [true, false] {
        let mut e = Engine::new(model, EngineConfig::default())?;
        if fork {
            e.add_group(ids.clone(), g, greedy(sn))?;
        } else {
            for _ in 0..g {
                e.add_request(ids.clone(), greedy(sn))?;
            }
        }
        let t = Instant::now();
        e.run()?;
        shared.push(json!({
            "prefix_sharing": fork,
            "prefill_tokens": e.stats().prefill_tokens,
            "wall_s": t.elapsed().as_secs_f64(),
        }));
    }
    let mut sharded_rows = Vec::new();
    let mut peer_rows = Vec::new();
    for world in [1, 2, 3] {
        sharded_rows.push(sharded(model, &ids, g, sn, world)?);
        peer_rows.push(shared_peers(model, &ids, g, sn, world)?);
    }
    if !as_json {
        println!(
            "\nrollout engine (random Qwen2 d={} L={} V={}, prompt {p}, {new} new tokens, greedy, f32 CPU)",
            model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size
        );
        println!("{:>6} {:>18} {:>10}", "batch", "decode tokens/s", "total s");
        for r in &rows {
            println!(
                "{:>6} {:>18.0} {:>10.2}",
                r["batch"],
                r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                r["total_s"].as_f64().unwrap_or(0.0)
            );
        }
        println!("generate (one sequence, contiguous cache): {gen_tps:.0} decode tokens/s");
        println!("prompt {sp} tokens, G = {g} samples of {sn} tokens:");
        for r in &shared {
            println!(
                "  prefix sharing {:<5}: {:>5} prefilled tokens, {:.2} s",
                r["prefix_sharing"],
                r["prefill_tokens"],
                r["wall_s"].as_f64().unwrap_or(0.0)
            );
        }
        println!("sharded engine (zigzag prefill, KV sharded), the same group:");
        println!(
            "{:>6} {:>8} {:>22} {:>24} {:>16}",
            "ranks",
            "wall s",
            "prefill bytes sent/rank",
            "decode bytes sent/token",
            "peak KV blocks"
        );
        for r in &sharded_rows {
            println!(
                "{:>6} {:>8.2} {:>22} {:>24} {:>16}",
                r["world"].as_u64().unwrap_or(0),
                r["wall_s"].as_f64().unwrap_or(0.0),
                r["prefill_bytes_sent_max"].as_u64().unwrap_or(0),
                r["decode_bytes_sent_per_token"].as_u64().unwrap_or(0),
                r["peak_blocks_max"].as_u64().unwrap_or(0)
            );
        }
        println!(
            "shared prefill over CPU peers (zigzag chunks, keys and values all-gathered, cache \
             whole, samples split), the same group:"
        );
        println!(
            "{:>6} {:>8} {:>22} {:>22}",
            "peers", "wall s", "bytes received/peer", "formula"
        );
        for r in &peer_rows {
            println!(
                "{:>6} {:>8.2} {:>22} {:>22}",
                r["world"].as_u64().unwrap_or(0),
                r["wall_s"].as_f64().unwrap_or(0.0),
                r["recv_bytes_max"].as_u64().unwrap_or(0),
                r["recv_bytes_formula"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(json!({
        "decode": rows,
        "generate_decode_tokens_per_s": gen_tps,
        "prefix": shared,
        "sharded": sharded_rows,
        "shared_prefill_peers": peer_rows,
    }))
}
