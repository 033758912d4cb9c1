//! `reel bench gpu-rollout`: the rollout engine on one GPU (`reel_cuda::GpuDecoder`, bf16) for a
//! Qwen2-0.5B-shaped model (random weights, d 896, 24 layers, H 14 / H_kv 2, D 64, I 4864,
//! V 151936, tied) beside transformers' `generate` on the same GPU in the same run
//! (`scripts/bench_generate_torch.py`: bf16 weights, SDPA, `num_return_sequences`).
//!
//! A case G×S×P×N is G groups of S samples of a P-token random prompt, N new tokens each (no stop
//! token, so every sample runs N), sampling at temperature 1 with top-k 50 (top-p 1) on both
//! sides. reel: one engine run (prompts prefilled once per group, samples forked, continuous
//! batching; blocks of 16 tokens, steps of up to 4096 tokens), after a small warm-up run.
//! Reported: end-to-end new tokens/s (G·S·N over the run's wall time), decode tokens/s (tokens
//! sampled in steps that prefilled nothing over those steps' time; transformers: G·S·(N − 1)
//! over the time of `generate` with N new tokens minus that with 1), and reel's split of the
//! decode steps' time into the device step (`GpuDecoder::step`: kernels and the logits
//! download) and the host's scheduling and sampling. Each case runs twice: with every row's top-k
//! candidates and log-sum-exp found on the device (`GpuDecoder::step_top`, k·8 + 8 bytes a row
//! downloaded; the figures reported first) and, as the baseline, with the full f32 logits rows
//! downloaded and the top-k selection and log-probability on the host (`full_rows`).
//! `REEL_BENCH_ROLLOUT_CASES=GxSxPxN,…` picks other cases. Needs the `cuda` feature.

use anyhow::Result;
use serde_json::Value;

/// (groups G, samples S, prompt tokens P, new tokens N).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CASES: &[(usize, usize, usize, usize)] = &[
    (8, 8, 512, 256),
    (8, 8, 2048, 256),
    (32, 8, 512, 256),
    (32, 8, 2048, 256),
];

#[cfg(not(feature = "cuda"))]
pub fn run(_as_json: bool) -> Result<Value> {
    anyhow::bail!(
        "this reel was built without the `cuda` feature; build it with \
         `cargo build --release -p reel-cli --features cuda` (no CUDA toolkit needed)"
    )
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use anyhow::Context;
    use reel_cuda::{Gpu, GpuDecoder};
    use reel_model::decode::SeqStep;
    use reel_model::generate::SamplingParams;
    use reel_model::{Qwen2, Qwen2Config};
    use reel_rollout::{
        BlockPool, BlockTable, Engine, EngineConfig, GenerationParams, KvLayout, RolloutError,
        StepModel, TopRows,
    };
    use reel_tensor::bf16;
    use serde_json::json;
    use std::time::Instant;

    /// The decoder, with the wall time of its steps counted.
    struct Timed<'a> {
        dec: &'a mut GpuDecoder<bf16>,
        secs: f64,
    }

    impl StepModel for Timed<'_> {
        fn config(&self) -> &Qwen2Config {
            self.dec.config()
        }
        fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
            self.dec.new_pool(layout)
        }
        fn release_pool(&mut self) {
            self.dec.release_pool()
        }
        fn forward_step(
            &mut self,
            pool: &mut BlockPool,
            steps: &[SeqStep],
            tables: &[&BlockTable],
        ) -> Result<&[f32], RolloutError> {
            let t = Instant::now();
            let out = self.dec.forward_step(pool, steps, tables);
            self.secs += t.elapsed().as_secs_f64();
            out
        }
        fn max_candidates(&self) -> usize {
            self.dec.max_candidates()
        }
        fn forward_step_top(
            &mut self,
            pool: &mut BlockPool,
            steps: &[SeqStep],
            tables: &[&BlockTable],
            k: usize,
            temperatures: &[f32],
        ) -> Result<TopRows<'_>, RolloutError> {
            let t = Instant::now();
            let out = self
                .dec
                .forward_step_top(pool, steps, tables, k, temperatures);
            self.secs += t.elapsed().as_secs_f64();
            out
        }
    }

    fn prompt(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % vocab as u64) as u32
            })
            .collect()
    }

    /// One engine run of a case; its figures.
    fn run_case(dec: &mut GpuDecoder<bf16>, case: (usize, usize, usize, usize)) -> Result<Value> {
        let (g, s, p, n) = case;
        let bs = 16;
        let blocks = g * (p.div_ceil(bs) + 1) + g * s * ((n + bs).div_ceil(bs) + 1) + 64;
        let cfg = EngineConfig {
            block_size: bs,
            num_blocks: blocks,
            max_step_tokens: 4096.max(g * s),
            max_step_seqs: 512.max(g * s),
        };
        let v = dec.config().vocab_size;
        let mut timed = Timed { dec, secs: 0.0 };
        let mut e = Engine::with_model(Box::new(&mut timed), cfg)?;
        for i in 0..g {
            let params = GenerationParams {
                sampling: SamplingParams {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 50,
                    seed: i as u64,
                },
                max_new_tokens: n,
                ..GenerationParams::default()
            };
            e.add_group(prompt(p, i as u64 + 1, v), s, params)?;
        }
        let t0 = Instant::now();
        let (mut decode_s, mut decode_tokens, mut steps) = (0.0, 0u64, 0usize);
        let mut first_token_s = 0.0;
        while e.has_work() {
            let sampled = e.stats().sampled_tokens;
            let t = Instant::now();
            let st = e.step()?;
            if st.seqs == 0 {
                anyhow::bail!("the scheduler found nothing to run");
            }
            if st.prefill_tokens == 0 {
                decode_s += t.elapsed().as_secs_f64();
                decode_tokens += e.stats().sampled_tokens - sampled;
                steps += 1;
            } else {
                first_token_s = t0.elapsed().as_secs_f64();
            }
        }
        let total = t0.elapsed().as_secs_f64();
        let stats = e.stats();
        let out = e.take_finished();
        drop(e);
        let generated: usize = out
            .iter()
            .flat_map(|o| &o.samples)
            .map(|x| x.ids.len())
            .sum();
        anyhow::ensure!(
            generated == g * s * n,
            "{generated} tokens, {} expected",
            g * s * n
        );
        // The device/host split is over the whole run (prefill steps included).
        Ok(json!({
            "groups": g, "samples": s, "prompt": p, "new": n,
            "total_s": total, "first_token_s": first_token_s,
            "tokens_per_s": generated as f64 / total,
            "decode_tokens_per_s": decode_tokens as f64 / decode_s.max(1e-9),
            "decode_steps": steps,
            "decode_step_ms": 1e3 * decode_s / steps.max(1) as f64,
            "device_step_s": timed.secs,
            "host_s": total - timed.secs,
            "prefill_tokens": stats.prefill_tokens, "cow_copies": stats.cow_copies,
            "preemptions": stats.preemptions,
        }))
    }

    /// The cases: `REEL_BENCH_ROLLOUT_CASES` (`GxSxPxN,…`) or [`CASES`].
    fn cases() -> Result<Vec<(usize, usize, usize, usize)>> {
        let Ok(list) = std::env::var("REEL_BENCH_ROLLOUT_CASES") else {
            return Ok(CASES.to_vec());
        };
        list.split(',')
            .map(|case| {
                let x: Vec<usize> = case
                    .split('x')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("REEL_BENCH_ROLLOUT_CASES: bad case {case:?}"))?;
                match x[..] {
                    [g, s, p, n] if g * s * p * n > 0 => Ok((g, s, p, n)),
                    _ => anyhow::bail!("REEL_BENCH_ROLLOUT_CASES: {case:?} is not GxSxPxN"),
                }
            })
            .collect()
    }

    pub fn run(as_json: bool) -> Result<Value> {
        let cases = cases()?;
        let c = super::super::bench_gpu_train::qwen2_05b(4096);
        let t = Instant::now();
        let model = Qwen2::new_random(c.clone(), 0)?;
        let gpu = Gpu::open(0).context("opening GPU 0")?;
        let device = gpu.info().to_string();
        let mut dec = GpuDecoder::<bf16>::from_model(gpu, &model)?;
        drop(model);
        eprintln!(
            "model ready in {:.1}s on {device}",
            t.elapsed().as_secs_f64()
        );
        run_case(&mut dec, (2, 2, 64, 8))?;
        let mut rows = Vec::new();
        for &case in &cases {
            // Full logits rows downloaded and sampled on the host (the baseline), then each
            // row's top-k candidates and log-sum-exp found on the device.
            dec.set_max_candidates(0);
            let full = run_case(&mut dec, case)?;
            dec.set_max_candidates(reel_cuda::TOPK_CAP);
            let mut r = run_case(&mut dec, case)?;
            eprintln!("reel (full rows) {full}");
            eprintln!("reel {r}");
            r["full_rows"] = full;
            rows.push(r);
        }
        drop(dec);
        let cases: Vec<String> = cases
            .iter()
            .map(|(g, s, p, n)| format!("{g}x{s}x{p}x{n}"))
            .collect();
        const SCRIPT: &str = include_str!("../../../scripts/bench_generate_torch.py");
        let torch = super::super::bench_gpu_train::run_python(
            "bench_generate_torch.py",
            SCRIPT,
            &["--cases".to_string(), cases.join(",")],
        );
        let mut report = json!({
            "device": device,
            "model": "Qwen2-0.5B shape, random weights, bf16",
            "sampling": "temperature 1, top-k 50, top-p 1",
            "reel": rows,
        });
        match torch {
            Ok(t) => report["torch"] = t,
            Err(e) => report["torch_error"] = json!(e),
        }
        if !as_json {
            print(&report);
        }
        Ok(report)
    }

    /// The side-by-side table.
    fn print(r: &Value) {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "rollout decoding, {} ({}), on {}",
            r["model"].as_str().unwrap_or(""),
            r["sampling"].as_str().unwrap_or(""),
            r["device"].as_str().unwrap_or("")
        );
        if let Some(e) = r["torch_error"].as_str() {
            println!("transformers side not run: {e}");
        }
        println!(
            "reel: candidates on the device | reel with full rows downloaded: decode tok/s, step \
             ms, host s | transformers | ratios to transformers: tok/s, decode, full-rows decode"
        );
        println!(
            "{:>4} {:>3} {:>5} {:>4} | {:>10} {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>10} {:>10} | {:>6} {:>6} {:>6}",
            "G",
            "S",
            "P",
            "N",
            "reel tok/s",
            "decode",
            "step ms",
            "host s",
            "full-rows",
            "step ms",
            "host s",
            "HF tok/s",
            "decode",
            "ratio",
            "decode",
            "full"
        );
        let empty = vec![];
        let torch = r["torch"]["rows"].as_array().unwrap_or(&empty);
        for x in r["reel"].as_array().unwrap_or(&empty) {
            let t = torch.iter().find(|t| {
                ["groups", "samples", "prompt", "new"]
                    .iter()
                    .all(|k| t[k] == x[k])
            });
            let (ht, hd) = t.map_or((f64::NAN, f64::NAN), |t| {
                (f(&t["tokens_per_s"]), f(&t["decode_tokens_per_s"]))
            });
            let full = &x["full_rows"];
            println!(
                "{:>4} {:>3} {:>5} {:>4} | {:>10.0} {:>10.0} {:>8.2} {:>8.2} | {:>10.0} {:>8.2} {:>8.2} | {:>10.0} {:>10.0} | {:>6.2} {:>6.2} {:>6.2}",
                x["groups"],
                x["samples"],
                x["prompt"],
                x["new"],
                f(&x["tokens_per_s"]),
                f(&x["decode_tokens_per_s"]),
                f(&x["decode_step_ms"]),
                f(&x["host_s"]),
                f(&full["decode_tokens_per_s"]),
                f(&full["decode_step_ms"]),
                f(&full["host_s"]),
                ht,
                hd,
                f(&x["tokens_per_s"]) / ht,
                f(&x["decode_tokens_per_s"]) / hd,
                f(&full["decode_tokens_per_s"]) / hd
            );
        }
    }
}

#[cfg(feature = "cuda")]
pub use imp::run;
