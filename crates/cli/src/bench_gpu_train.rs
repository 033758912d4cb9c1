//! `reel bench gpu-train`: a full training step of a Qwen2-0.5B-shaped model (random weights,
//! d 896, 24 layers, H 14 / H_kv 2, D 64, I 4864, V 151936, tied) on one GPU beside transformers
//! on the same GPU in the same run, and the longest sequence each can train.
//!
//! reel: `GpuQwen2` (bf16 activations, fp32 master weights and AdamW moments), one sequence of T
//! tokens per step, every token labelled; a step is forward, backward, clipping at 1.0 and AdamW.
//! transformers: `scripts/bench_train_torch.py` (fp32 weights under bf16 autocast, SDPA, gradient
//! checkpointing, fused AdamW, clipping), as its Trainer runs with `bf16=True`.
//!
//! Median of `ITERS` steps after one warm-up; then one more step profiled by kind of op
//! (`reel_cuda`'s profile: GEMMs, attention, LM head + cross-entropy, other kernels, optimizer),
//! its device time beside the timed step (idle = the rest) and the MFU the device time alone
//! would give. MFU = model FLOPs / (step time · peak), model FLOPs
//! (recomputation not counted) = 6·N·P_matmul (P_matmul: every projection and the LM head,
//! 494M) + 6·L·H·D·T² (causal attention, forward + backward = 3× forward). Peak: the H100/H200
//! SXM datasheet's dense bf16 989 TFLOP/s. Longest sequence: transformers by doubling from 32k and
//! bisection to 4k (the script); reel tries 2× and then 4× transformers' longest (each trial is
//! one full step; the search stops at its time budget, so reel's figure is a lower bound).
//! Needs the `cuda` feature.

use anyhow::Result;
#[cfg(feature = "cuda")]
use serde_json::json;
use serde_json::Value;

/// Sequence lengths timed.
#[cfg(feature = "cuda")]
const TOKENS: &[usize] = &[16_384, 32_768];
/// Timed steps per length (after one warm-up).
#[cfg(feature = "cuda")]
const ITERS: usize = 3;
/// Dense bf16 peak of an H100/H200 SXM (TFLOP/s).
#[cfg(feature = "cuda")]
const PEAK_TFLOPS: f64 = 989.0;

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn qwen2_05b(max_pos: usize) -> reel_model::Qwen2Config {
    reel_model::Qwen2Config {
        vocab_size: 151_936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        max_position_embeddings: max_pos,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        ..reel_model::Qwen2Config::tiny(151_936)
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// Model FLOPs of one training step on one sequence of `t` tokens (see the module docs).
pub fn step_flops(c: &reel_model::Qwen2Config, t: usize) -> f64 {
    let (d, qw, kvw, i) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let per_layer = d * (qw + 2 * kvw) + qw * d + d * 2 * i + i * d;
    let p_matmul = (c.num_hidden_layers * per_layer + c.vocab_size * d) as f64;
    let t = t as f64;
    let attn = 6.0 * (c.num_hidden_layers * c.num_attention_heads * c.head_dim) as f64 * t * t;
    6.0 * t * p_matmul + attn
}

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
    use reel_cuda::{Gpu, GpuQwen2};
    use reel_model::{CheckpointPolicy, Qwen2Config, TokenBatch};
    use reel_optim::AdamWConfig;
    use std::time::Instant;

    /// Random weights as `Qwen2::new_random` draws them (matrices N(0, 0.02²), norms 1, biases
    /// 0), made here without the CPU model's workspace.
    fn random_params(c: &Qwen2Config) -> Vec<f32> {
        reel_model::Qwen2::new_random(c.clone(), 0)
            .map(|m| m.params)
            .unwrap_or_default()
    }

    /// One optimizer step; returns (seconds, loss).
    fn step(gm: &mut GpuQwen2, c: &Qwen2Config, t: usize) -> Result<(f64, f64)> {
        let (tokens, targets, positions) = crate::bench_sp_train::random_sequence(c.vocab_size, t);
        let b = TokenBatch {
            tokens: &tokens,
            targets: &targets,
            positions: &positions,
            b: 1,
            t,
        };
        gm.gpu().synchronize()?;
        let t0 = Instant::now();
        gm.zero_grads()?;
        let s = gm.forward(&b)?;
        gm.backward(&b, 1.0 / s.n_tokens.max(1) as f32)?;
        gm.clip_grad_norm(1.0)?;
        gm.adamw_step(1e-5)?;
        gm.gpu().synchronize()?;
        Ok((t0.elapsed().as_secs_f64(), s.mean()))
    }

    fn model(c: &Qwen2Config, params: &[f32], policy: CheckpointPolicy) -> Result<GpuQwen2> {
        let gpu = Gpu::open(0).context("opening GPU 0")?;
        Ok(GpuQwen2::new(
            gpu,
            c.clone(),
            params,
            policy,
            AdamWConfig {
                lr: 1e-5,
                ..AdamWConfig::default()
            },
        )?)
    }

    fn timed(c: &Qwen2Config, params: &[f32], policy: CheckpointPolicy, t: usize) -> Result<Value> {
        let mut gm = model(c, params, policy)?;
        step(&mut gm, c, t)?;
        let before = gm.gpu().alloc_stats();
        let mut times = Vec::new();
        let mut loss = 0.0;
        for _ in 0..ITERS {
            let (s, l) = step(&mut gm, c, t)?;
            times.push(s);
            loss = l;
        }
        let after = gm.gpu().alloc_stats();
        times.sort_by(f64::total_cmp);
        let s = times[times.len() / 2];
        let tflops = step_flops(c, t) / s / 1e12;
        // One more step with every op timed by kind (reel_cuda's profile): where the step's
        // milliseconds go, and what the device time alone would give.
        gm.gpu().profile_begin();
        step(&mut gm, c, t)?;
        let prof = gm.gpu().profile_end()?;
        let busy_ms = prof.total_ms();
        let profile: serde_json::Map<String, Value> = prof
            .by_category
            .iter()
            .map(|r| (r.category.to_string(), json!(r.ms)))
            .collect();
        let top_ops: Vec<Value> = prof
            .by_op
            .iter()
            .take(16)
            .map(|r| json!({"op": r.category, "ms": r.ms, "calls": r.ops}))
            .collect();
        Ok(json!({
            "t": t, "policy": policy.to_string(), "step_s": s, "tokens_per_s": t as f64 / s,
            "model_tflops": tflops, "mfu": tflops / PEAK_TFLOPS, "loss": loss,
            "allocs_in_timed_steps": after.device_allocs - before.device_allocs,
            "activation_gib": reel_cuda::activation_bytes(c, policy, t) as f64 / (1u64 << 30) as f64,
            "profile_ms": profile, "top_ops": top_ops, "device_busy_ms": busy_ms,
            "idle_ms": s * 1e3 - busy_ms,
            "mfu_if_never_idle": step_flops(c, t) / (busy_ms * 1e-3) / 1e12 / PEAK_TFLOPS,
        }))
    }

    /// Whether one step at `t` tokens runs (an out-of-memory error is "no").
    fn fits(
        c: &Qwen2Config,
        params: &[f32],
        policy: CheckpointPolicy,
        t: usize,
    ) -> Result<(bool, f64)> {
        let mut gm = model(c, params, policy)?;
        match step(&mut gm, c, t) {
            Ok((s, _)) => Ok((true, s)),
            Err(e) => {
                let msg = format!("{e:#}");
                if msg.contains("OUT_OF_MEMORY") || msg.to_lowercase().contains("out of memory") {
                    Ok((false, f64::NAN))
                } else {
                    Err(e)
                }
            }
        }
    }

    pub fn run(as_json: bool) -> Result<Value> {
        let longest_budget_s: f64 = std::env::var("REEL_BENCH_LONGEST_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(150.0);
        let c = qwen2_05b(1 << 20);
        let params = random_params(&c);
        let policy = CheckpointPolicy::Remat;
        let mut rows = Vec::new();
        for &t in TOKENS {
            for p in [
                CheckpointPolicy::None,
                CheckpointPolicy::Remat,
                CheckpointPolicy::Layer,
            ] {
                let r = timed(&c, &params, p, t).unwrap_or_else(|e| {
                    eprintln!("reel T {t} {p}: {e:#}");
                    json!({"t": t, "policy": p.to_string(), "error": format!("{e:#}")})
                });
                eprintln!("reel {r}");
                rows.push(r);
            }
        }
        // Every device buffer of reel is gone (each model owned its Gpu) before torch starts.
        let torch = super::torch_side(TOKENS, longest_budget_s);
        eprintln!("torch {torch:?}");
        let hf_longest = torch
            .as_ref()
            .ok()
            .and_then(|t| t["longest"]["longest"].as_u64())
            .unwrap_or(65_536) as usize;
        let mut tried = Vec::new();
        let mut reel_longest = 0usize;
        let t0 = Instant::now();
        for k in [2usize, 4] {
            let t = k * hf_longest;
            if t0.elapsed().as_secs_f64() > longest_budget_s {
                break;
            }
            let (ok, s) = fits(&c, &params, policy, t)?;
            tried.push(json!({"t": t, "fits": ok, "step_s": s}));
            eprintln!("reel longest: T {t} fits {ok} ({s:.1} s)");
            if !ok {
                break;
            }
            reel_longest = t;
        }
        let mut report = json!({
            "model": "Qwen2-0.5B shape, random weights", "peak_tflops": PEAK_TFLOPS,
            "reel": rows,
            "reel_longest": {"policy": policy.to_string(), "tried": tried, "at_least": reel_longest},
        });
        match torch {
            Ok(t) => report["torch"] = t,
            Err(e) => report["torch_error"] = json!(e),
        }
        if !as_json {
            super::print(&report);
        }
        Ok(report)
    }
}

#[cfg(feature = "cuda")]
pub use imp::run;

/// Runs scripts/bench_train_torch.py (embedded) with `python3` (`REEL_PYTHON` names another).
#[cfg(feature = "cuda")]
fn torch_side(tokens: &[usize], limit_s: f64) -> Result<Value, String> {
    let list: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    const SCRIPT: &str = include_str!("../../../scripts/bench_train_torch.py");
    let args = [
        "--longest".to_string(),
        "--tokens".into(),
        list.join(","),
        "--limit-s".into(),
        limit_s.to_string(),
    ];
    run_python("bench_train_torch.py", SCRIPT, &args)
}

/// Pipes `script` (named `name` in messages) to `python3` (`REEL_PYTHON` names another) with
/// `args` and parses the JSON of its last stdout line; `REEL_BENCH_NO_TORCH=1` skips it.
#[cfg(feature = "cuda")]
pub(crate) fn run_python(name: &str, script: &str, args: &[String]) -> Result<Value, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if std::env::var("REEL_BENCH_NO_TORCH").as_deref() == Ok("1") {
        return Err("REEL_BENCH_NO_TORCH=1".into());
    }
    let py = std::env::var("REEL_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&py)
        .arg("-")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {py}: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| format!("writing the script to {py}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {py}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{name} failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .map_err(|e| format!("{name} printed no JSON ({e})"))
}

/// The side-by-side table.
#[cfg(feature = "cuda")]
fn print(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "training step, {} (tokens/s, MFU of {} TFLOP/s)",
        r["model"].as_str().unwrap_or(""),
        r["peak_tflops"]
    );
    let torch_rows = r["torch"]["rows"].as_array().cloned().unwrap_or_default();
    println!(
        "{:>7} {:<6} {:>10} {:>7} {:>7} {:>12} {:>7} {:>7}",
        "T", "policy", "reel tok/s", "MFU", "allocs", "torch tok/s", "MFU", "ratio"
    );
    for row in r["reel"].as_array().into_iter().flatten() {
        let t = row["t"].as_u64().unwrap_or(0);
        let tr = torch_rows.iter().find(|x| x["t"].as_u64() == Some(t));
        let (tt, tm) = match tr {
            Some(x) => {
                let tps = f(&x["tokens_per_s"]);
                let c = qwen2_05b(1 << 20);
                (
                    tps,
                    step_flops(&c, t as usize) / f(&x["step_s"]) / 1e12 / PEAK_TFLOPS,
                )
            }
            None => (f64::NAN, f64::NAN),
        };
        let rt = f(&row["tokens_per_s"]);
        println!(
            "{:>7} {:<6} {:>10.0} {:>6.1}% {:>7} {:>12.0} {:>6.1}% {:>7.2}",
            t,
            row["policy"].as_str().unwrap_or(""),
            rt,
            100.0 * f(&row["mfu"]),
            row["allocs_in_timed_steps"],
            tt,
            100.0 * tm,
            rt / tt
        );
    }
    println!(
        "where reel's step goes (ms of device time by kind of op, one profiled step; idle = the \
         timed step minus them)"
    );
    let cats = ["gemm", "attention", "lm_head_ce", "kernels", "optimizer"];
    print!("{:>7} {:<6} {:>8}", "T", "policy", "step ms");
    for c in cats {
        print!(" {c:>10}");
    }
    println!(" {:>8} {:>9}", "idle", "MFU busy");
    for row in r["reel"].as_array().into_iter().flatten() {
        print!(
            "{:>7} {:<6} {:>8.1}",
            row["t"],
            row["policy"].as_str().unwrap_or(""),
            1e3 * f(&row["step_s"])
        );
        for c in cats {
            print!(" {:>10.1}", f(&row["profile_ms"][c]));
        }
        println!(
            " {:>8.1} {:>8.1}%",
            f(&row["idle_ms"]),
            100.0 * f(&row["mfu_if_never_idle"])
        );
        let ops: Vec<String> = row["top_ops"]
            .as_array()
            .into_iter()
            .flatten()
            .take(10)
            .map(|o| format!("{} {:.1}", o["op"].as_str().unwrap_or(""), f(&o["ms"])))
            .collect();
        println!("{:>15} ops: {}", "", ops.join(", "));
    }
    println!(
        "longest trainable sequence: reel ≥ {} tokens ({}), transformers {} (first OOM {})",
        r["reel_longest"]["at_least"],
        r["reel_longest"]["policy"].as_str().unwrap_or(""),
        r["torch"]["longest"]["longest"],
        r["torch"]["longest"]["first_oom"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_count_projections_head_and_causal_attention() {
        let c = qwen2_05b(4096);
        let f16 = step_flops(&c, 16_384);
        // 6·N·P with P = 24 layers' projections + the tied head = 493.9M.
        let p = 24.0 * 14_909_440.0 + 151_936.0 * 896.0;
        let attn = 6.0 * 24.0 * 14.0 * 64.0 * 16_384f64.powi(2);
        assert!((f16 - (6.0 * 16_384.0 * p + attn)).abs() < 1.0);
        assert!(step_flops(&c, 32_768) > 2.0 * f16, "attention grows as T²");
    }
}
