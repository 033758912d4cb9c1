//! `reel bench sp-train`: full training steps of a Qwen2-7B-shaped layer stack trained with
//! sequence parallelism across GPUs, one process per GPU over NCCL, started as
//! `reel launch --nproc P -- reel bench sp-train`; and `reel bench sp-train --sp-longest`, the
//! longest sequence each schedule trains, one `reel launch` process tree per trial.
//!
//! Model: random weights (matrices uniform with std 0.02, norms 1, biases 0) of Qwen2-7B's shape
//! — d 3584, H 28 / H_kv 4, D 128, I 18944, V 152064, untied LM head — with `--sp-layers L`
//! decoder layers (default 4: the embedding and LM head, 1.09B parameters, stay whole, so a step
//! is 2.02B parameters' GEMMs plus L layers of attention, and the whole stack with fp32 master
//! weights, gradients and AdamW moments, 40 GB, fits one H200 beside 128k-token activations).
//! `GpuQwen2`: bf16 activations, fp32 master weights and AdamW moments, checkpoint policy
//! `--sp-policy` (default remat: attention outputs and lse kept, the rest recomputed).
//!
//! A step is one sequence of T tokens (`--sp-seqs`, default 32k, 64k, 128k; every token
//! labelled): each rank cuts its shard as the SFT trainer does (`Sharding::shard_tokens` of the
//! schedule's layout), forward, backward (attention through `GpuSpAttention` over the ranks'
//! `NcclP2p`), the gradient all-reduce over NCCL, clipping at 1.0 and AdamW, then the GPU is
//! synchronised. Timing: a barrier, the step on every rank, the slowest rank's wall time; the
//! median of `--reps` steps after one warm-up step. Per row: tokens/s, model TFLOP/s per GPU
//! (6·N·P_matmul + 6·L·H·D·T², recomputation not counted: `bench_gpu_train::step_flops`), the
//! one-GPU step at the same T on the same model (local cuDNN attention; where it fits) and the
//! speed-up over it, bytes each GPU sends per step — measured by the communicator's counters
//! (attention point-to-point traffic and the gradient all-reduce), planned (each executor's plan
//! × its calls, + the all-reduce's counting convention) and the closed-form formulas
//! ([`step_formula_bytes`]) — and peak device memory per GPU (in use after the row's steps, the
//! scratch pool's cache emptied and its high-water mark reset before the warm-up step, so the
//! pool then holds its peak; the pool's high-water mark is reported beside it).
//!
//! Schedules (`--sp-schedules`, default every one the world size allows, [`variants`]): ring
//! (plain causal ring), distattn (LightSeq's balanced DistAttn), zigzag (zigzag ring) — each with
//! communication overlapped and blocking —, ulysses where P | H_kv, and the hybrid (Ulysses
//! groups of u × balanced DistAttn over the P/u groups; overlapped and blocking) for the largest
//! u with 1 < u < P dividing P and H_kv. A failing row (out of memory, say) aborts the
//! communicator (the other ranks fail at their next exchange or within `--sp-timeout-s`) and ends
//! the run; every finished row and the failure are in `--sp-out` (JSON lines).
//!
//! `--sp-longest` (not under `reel launch`): for each schedule at P = `--sp-nproc` (and with
//! `--sp-longest-one-gpu` the one-GPU model, P = 1), T doubles from `--sp-longest-from` (default
//! 32768) until a step fails, then bisection until the bracket is at most `--sp-granularity`
//! (default 32768) wide ([`search_longest`]); each trial is one `reel launch` of this binary
//! (`--sp-trial`: one warm-up step), so an out-of-memory error cannot poison the next. A trial
//! that fails for another reason than memory stops that schedule's search; `--sp-longest-budget-s`
//! bounds the whole search (the bracket so far is reported).

// Without `cuda` only the search driver and the CPU-tested pieces are reachable.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reel_model::{CheckpointPolicy, ParamLayout, Qwen2Config};
use reel_parallel::SpMethod;
use reel_train::config::{ParallelConfig, SpSchedule};
use serde_json::{json, Value};

/// `reel bench sp-train` options (the sequence lengths and repetitions are `bench`'s
/// `--sp-seqs` and `--reps`).
#[derive(clap::Args, Clone, Debug)]
pub struct SpTrainArgs {
    /// `bench sp-train`: decoder layers of the Qwen2-7B-shaped stack.
    #[arg(long, default_value_t = 4)]
    pub sp_layers: usize,
    /// `bench sp-train`: schedules, comma-separated: ring, distattn, zigzag, ulysses, hybrid.
    /// Default: every one the world size allows.
    #[arg(long, value_delimiter = ',', value_parser = parse_schedule)]
    pub sp_schedules: Vec<SpSchedule>,
    /// `bench sp-train`: checkpoint policy (remat, layer, none).
    #[arg(long, default_value = "remat")]
    pub sp_policy: CheckpointPolicy,
    /// `bench sp-train`: skip the one-GPU step.
    #[arg(long)]
    pub sp_no_single: bool,
    /// `bench sp-train`: append every row as a JSON line to this file as it completes (rank 0;
    /// a failing rank appends its error).
    #[arg(long)]
    pub sp_out: Option<PathBuf>,
    /// `bench sp-train`: seconds a rank waits on another before failing.
    #[arg(long, default_value_t = 120)]
    pub sp_timeout_s: u64,
    /// `bench sp-train`: one trial of the longest-sequence search (what `--sp-longest` launches):
    /// one warm-up step of the first schedule at the first `--sp-seqs` length.
    #[arg(long, hide = true)]
    pub sp_trial: bool,
    /// `bench sp-train`: search the longest sequence each schedule trains (see the module docs;
    /// run it directly, not under `reel launch`).
    #[arg(long)]
    pub sp_longest: bool,
    /// `--sp-longest`: processes (GPUs) per trial.
    #[arg(long, default_value_t = 2)]
    pub sp_nproc: usize,
    /// `--sp-longest`: also search the one-GPU model (P = 1, local attention).
    #[arg(long)]
    pub sp_longest_one_gpu: bool,
    /// `--sp-longest`: the first length tried.
    #[arg(long, default_value_t = 32_768)]
    pub sp_longest_from: usize,
    /// `--sp-longest`: the longest length tried.
    #[arg(long, default_value_t = 4_194_304)]
    pub sp_longest_max: usize,
    /// `--sp-longest`: bisection stops once the bracket is at most this wide (tokens).
    #[arg(long, default_value_t = 32_768)]
    pub sp_granularity: usize,
    /// `--sp-longest`: wall-clock budget of the whole search in seconds (default none).
    #[arg(long)]
    pub sp_longest_budget_s: Option<f64>,
    /// `--sp-longest`: a trial still running after this many seconds is killed and counted as
    /// failed.
    #[arg(long, default_value_t = 1800)]
    pub sp_trial_timeout_s: u64,
}

/// A `--sp-schedules` item (the `parallel.schedule` names).
pub fn parse_schedule(s: &str) -> Result<SpSchedule, String> {
    serde_json::from_value(Value::String(s.trim().to_string()))
        .map_err(|_| format!("unknown schedule `{s}` (ring, distattn, zigzag, ulysses, hybrid)"))
}

/// Qwen2-7B's shape with `layers` decoder layers (`max_pos` rotary positions).
pub fn qwen2_7b_stack(layers: usize, max_pos: usize) -> Qwen2Config {
    Qwen2Config {
        vocab_size: 152_064,
        hidden_size: 3584,
        intermediate_size: 18_944,
        num_hidden_layers: layers,
        num_attention_heads: 28,
        num_key_value_heads: 4,
        head_dim: 128,
        max_position_embeddings: max_pos,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        ..Qwen2Config::tiny(152_064)
    }
}

/// One row's attention: a schedule and, for Ulysses and the hybrid, u (ranks per all-to-all
/// group; the ring then runs over P / u groups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub schedule: SpSchedule,
    /// u for Ulysses (= P) and the hybrid; 0 for the ring family.
    pub u: usize,
}

impl Variant {
    /// The row's name: the schedule, the hybrid with its grid (`hybrid2x2`).
    pub fn name(&self, p: usize) -> String {
        match self.schedule {
            SpSchedule::Hybrid => format!("hybrid{}x{}", self.u, p / self.u.max(1)),
            s => s.to_string(),
        }
    }

    /// The attention method of the P ranks (`ParallelConfig::sp_method`, the trainer's).
    pub fn method(&self, p: usize, h: usize, h_kv: usize) -> Result<SpMethod> {
        // Pure Ulysses takes u = P from `schedule` (the config refuses a degree beside it).
        let ulysses_degree = match self.schedule {
            SpSchedule::Hybrid => self.u,
            _ => 0,
        };
        let cfg = ParallelConfig {
            sp: p,
            schedule: self.schedule,
            ulysses_degree,
            ..ParallelConfig::default()
        };
        Ok(cfg.sp_method(h, h_kv)?)
    }

    /// Whether the row has a ring to overlap (every schedule but pure Ulysses).
    pub fn has_ring(&self) -> bool {
        self.schedule != SpSchedule::Ulysses
    }
}

/// The largest u with 1 < u < P dividing P and H_kv: the hybrid's all-to-all groups.
pub fn hybrid_degree(p: usize, h_kv: usize) -> Option<usize> {
    (2..p)
        .rev()
        .find(|&u| p.is_multiple_of(u) && h_kv.is_multiple_of(u))
}

/// The rows for P ranks and H_kv KV heads: `requested` (refused, saying why, where the world
/// does not allow one), or when empty every schedule it allows — ring, distattn, zigzag; ulysses
/// where P | H_kv; the hybrid where [`hybrid_degree`] finds a u.
pub fn variants(p: usize, h_kv: usize, requested: &[SpSchedule]) -> Result<Vec<Variant>> {
    if p < 2 {
        bail!("sequence parallelism needs at least 2 processes (got {p})");
    }
    let ulysses_ok = h_kv.is_multiple_of(p);
    let hybrid = hybrid_degree(p, h_kv);
    let all = [
        SpSchedule::Ring,
        SpSchedule::Distattn,
        SpSchedule::Zigzag,
        SpSchedule::Ulysses,
        SpSchedule::Hybrid,
    ];
    let want: Vec<SpSchedule> = if requested.is_empty() {
        all.into_iter()
            .filter(|s| match s {
                SpSchedule::Ulysses => ulysses_ok,
                SpSchedule::Hybrid => hybrid.is_some(),
                _ => true,
            })
            .collect()
    } else {
        requested.to_vec()
    };
    let mut out: Vec<Variant> = Vec::new();
    for s in want {
        let v = match s {
            SpSchedule::Ulysses if !ulysses_ok => bail!(
                "ulysses needs P = {p} to divide H_kv = {h_kv} (its all-to-all splits the KV \
                 heads over every rank); use the hybrid or a ring-family schedule"
            ),
            SpSchedule::Ulysses => Variant { schedule: s, u: p },
            SpSchedule::Hybrid => match hybrid {
                Some(u) => Variant { schedule: s, u },
                None => bail!(
                    "the hybrid needs a u with 1 < u < P = {p} dividing P and H_kv = {h_kv} \
                     (P ≥ 4 here)"
                ),
            },
            _ => Variant { schedule: s, u: 0 },
        };
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Bytes one GPU sends in one attention call of a layer: (forward, backward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassBytes {
    pub forward: f64,
    pub backward: f64,
}

/// The ring formula of one layer over `p` ranks, `t` tokens, `d_kv` = H_kv·D: K‖V (bf16) to
/// every other rank forward, K‖V again and dK‖dV (f32) back in the backward —
/// `4·T·d_kv·(P−1)/P` and `12·T·d_kv·(P−1)/P` bytes. Exact for the full and zigzag rings; the
/// causal ring and DistAttn send at most this (no chunk travels above the diagonal).
pub fn ring_formula(t: usize, d_kv: usize, p: usize) -> PassBytes {
    let f = (t * d_kv) as f64 * (p as f64 - 1.0) / p as f64;
    PassBytes {
        forward: 4.0 * f,
        backward: 12.0 * f,
    }
}

/// Ulysses' all-to-alls of one layer for groups of `u` ranks out of `p` (L = ⌈T/P⌉ rows a
/// rank, H/u and H_kv/u heads a member): forward q, k, v in, out and lse back —
/// `(u−1)·L·(4·H·D + 4·H_kv·D + 4·H)/u`; backward q, k, v, out, dO, lse in, dq, dk, dv back —
/// `(u−1)·L·(8·H·D + 8·H_kv·D + 4·H)/u` (`UlyssesLayout::all_to_all_bytes`).
pub fn ulysses_formula(t: usize, p: usize, u: usize, h: usize, h_kv: usize, d: usize) -> PassBytes {
    let l = t.div_ceil(p) as f64;
    let (hq, hk) = ((h / u) as f64, (h_kv / u) as f64);
    let d = d as f64;
    let k = (u as f64 - 1.0) * l;
    PassBytes {
        forward: k * (4.0 * hq * d + 4.0 * hk * d + 4.0 * hq),
        backward: k * (8.0 * hq * d + 8.0 * hk * d + 4.0 * hq),
    }
}

/// The closed form of one attention call of `v` at P = `p`, T = `t`: the ring formula, Ulysses'
/// all-to-alls, or the hybrid's (its all-to-alls in groups of u, plus the ring formula over the
/// P/u groups on H_kv/u heads).
pub fn attention_formula(
    v: &Variant,
    p: usize,
    t: usize,
    h: usize,
    h_kv: usize,
    d: usize,
) -> PassBytes {
    match v.schedule {
        SpSchedule::Ulysses => ulysses_formula(t, p, p, h, h_kv, d),
        SpSchedule::Hybrid => {
            let a = ulysses_formula(t, p, v.u, h, h_kv, d);
            let r = ring_formula(t, h_kv / v.u * d, p / v.u);
            PassBytes {
                forward: a.forward + r.forward,
                backward: a.backward + r.backward,
            }
        }
        _ => ring_formula(t, h_kv * d, p),
    }
}

/// The all-to-all counting convention of an all-reduce of `n` f32 values over `p` ranks (a
/// ring: reduce-scatter then all-gather), `8·n·(P−1)/P` bytes sent a rank.
pub fn all_reduce_formula(n: usize, p: usize) -> f64 {
    8.0 * n as f64 * (p as f64 - 1.0) / p as f64
}

/// Attention forward calls a training step makes per layer under `policy` (the layer policy
/// recomputes attention in the backward).
pub fn forward_calls_per_layer(policy: CheckpointPolicy) -> usize {
    match policy {
        CheckpointPolicy::Layer => 2,
        CheckpointPolicy::None | CheckpointPolicy::Remat => 1,
    }
}

/// Bytes one GPU sends in a training step by the formulas: every layer's attention calls
/// ([`attention_formula`]) and the gradient all-reduce of every parameter plus the three loss
/// statistics ([`all_reduce_formula`]).
pub fn step_formula_bytes(
    v: &Variant,
    p: usize,
    t: usize,
    c: &Qwen2Config,
    policy: CheckpointPolicy,
) -> f64 {
    let a = attention_formula(
        v,
        p,
        t,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    );
    let l = c.num_hidden_layers as f64;
    let fwd = (forward_calls_per_layer(policy) as f64) * l * a.forward;
    fwd + l * a.backward + all_reduce_formula(ParamLayout::new(c).total() + 3, p)
}

/// What one trial of the longest-sequence search found.
#[derive(Clone, Debug, PartialEq)]
pub enum TrialOutcome {
    /// The step ran (seconds, peak device bytes on the fullest GPU).
    Fits { step_s: f64, peak_bytes: f64 },
    /// A rank ran out of device memory.
    OutOfMemory(String),
    /// Any other failure (it stops the search: the limit found would not be memory's).
    Failed(String),
}

/// The longest-sequence search's result for one schedule.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchReport {
    /// The longest length whose step ran.
    pub longest: Option<usize>,
    /// The shortest length that ran out of memory.
    pub first_oom: Option<usize>,
    /// Every trial in order.
    pub trials: Vec<(usize, TrialOutcome)>,
    /// Why the search ended before bisecting to the granularity, if it did.
    pub stopped: Option<String>,
}

/// Doubling from `from` until a trial runs out of memory (or `max` is passed), then bisection
/// of [longest fit, first out-of-memory] to a bracket at most `granularity` wide, trial points
/// on multiples of `granularity`. `out_of_time` is asked before each trial; a `Failed` trial ends
/// the search.
pub fn search_longest(
    from: usize,
    max: usize,
    granularity: usize,
    mut out_of_time: impl FnMut() -> bool,
    mut trial: impl FnMut(usize) -> TrialOutcome,
) -> SearchReport {
    let g = granularity.max(1);
    let mut r = SearchReport::default();
    let mut run = |t: usize, r: &mut SearchReport| -> Option<bool> {
        if out_of_time() {
            r.stopped = Some(format!("time budget spent before trying T = {t}"));
            return None;
        }
        let o = trial(t);
        let fits = match &o {
            TrialOutcome::Fits { .. } => Some(true),
            TrialOutcome::OutOfMemory(_) => Some(false),
            TrialOutcome::Failed(m) => {
                r.stopped = Some(format!(
                    "T = {t} failed for another reason than memory: {m}"
                ));
                None
            }
        };
        r.trials.push((t, o));
        match fits {
            Some(true) => r.longest = Some(t),
            Some(false) => r.first_oom = Some(t),
            None => {}
        }
        fits
    };
    let mut t = from.max(1);
    loop {
        if t > max {
            r.stopped = Some(format!("no out-of-memory up to --sp-longest-max {max}"));
            return r;
        }
        match run(t, &mut r) {
            Some(true) => t = t.saturating_mul(2),
            Some(false) => break,
            None => return r,
        }
    }
    let (Some(mut lo), Some(mut hi)) = (r.longest, r.first_oom) else {
        return r;
    };
    while hi - lo > g {
        let mut mid = (lo + hi) / 2 / g * g;
        if mid <= lo {
            mid = lo + g;
        }
        if mid >= hi {
            break;
        }
        match run(mid, &mut r) {
            Some(true) => lo = mid,
            Some(false) => hi = mid,
            None => break,
        }
    }
    r.longest = Some(lo);
    r.first_oom = Some(hi);
    r
}

/// Whether an error message is an out-of-memory failure of the device.
pub fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("OUT_OF_MEMORY") || msg.to_lowercase().contains("out of memory")
}

/// The marker before the JSON line a trial prints.
const TRIAL_MARK: &str = "SPTRIAL ";

/// A trial's outcome from the lines the ranks printed (`SPTRIAL {json}`) and whether the
/// launch succeeded: rank 0's `fits` line on success; otherwise out of memory if any rank's
/// error says so, else a failure naming the errors (or the launch's).
pub fn trial_outcome(stdout: &str, launch_ok: bool, launch_note: &str) -> TrialOutcome {
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(TRIAL_MARK))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let errors: Vec<String> = lines
        .iter()
        .filter(|v| v["fits"] == json!(false))
        .map(|v| format!("rank {}: {}", v["rank"], v["error"].as_str().unwrap_or("")))
        .collect();
    if launch_ok && errors.is_empty() {
        if let Some(v) = lines.iter().find(|v| v["fits"] == json!(true)) {
            return TrialOutcome::Fits {
                step_s: v["step_s"].as_f64().unwrap_or(f64::NAN),
                peak_bytes: v["peak_bytes"].as_f64().unwrap_or(f64::NAN),
            };
        }
    }
    if errors.iter().any(|e| is_out_of_memory(e)) {
        return TrialOutcome::OutOfMemory(errors.join("; "));
    }
    let mut why = errors.join("; ");
    if why.is_empty() {
        why = if launch_ok {
            "no rank reported".into()
        } else {
            launch_note.to_string()
        };
    }
    TrialOutcome::Failed(why)
}

/// Appends `row` as one JSON line to `path`.
fn append_row(path: Option<&PathBuf>, row: &Value) {
    use std::io::Write;
    let Some(path) = path else { return };
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{row}"));
    if let Err(e) = r {
        eprintln!("bench sp-train: cannot append to {}: {e}", path.display());
    }
}

/// `reel bench sp-train`: the search (`--sp-longest`), or this process's rank of the table or
/// of one trial. Rank 0 returns the report; the other ranks `Value::Null`.
pub fn run(a: &SpTrainArgs, seqs: &[usize], reps: usize, as_json: bool) -> Result<Value> {
    if a.sp_layers == 0 {
        bail!("--sp-layers must be at least 1");
    }
    if seqs.is_empty() || seqs.contains(&0) {
        bail!("--sp-seqs needs lengths ≥ 1 (got {seqs:?})");
    }
    if a.sp_longest {
        if std::env::var_os(reel_comm::launch::ENV_RANK).is_some() {
            bail!("bench sp-train --sp-longest launches its own trials: run it directly, not under `reel launch`");
        }
        let report = longest(a)?;
        if !as_json {
            print_longest(&report);
        }
        return Ok(report);
    }
    if std::env::var_os(reel_comm::launch::ENV_RANK).is_none() {
        bail!(
            "bench sp-train runs one process per GPU: start it as \
             `reel launch --nproc 2 -- reel bench sp-train` (or search the longest sequence \
             with `reel bench sp-train --sp-longest`)"
        );
    }
    rank::run(a, seqs, reps, as_json)
}

/// The search of every schedule (and the one-GPU model with `--sp-longest-one-gpu`).
fn longest(a: &SpTrainArgs) -> Result<Value> {
    let c = qwen2_7b_stack(a.sp_layers, 1);
    let p = a.sp_nproc;
    let mut targets: Vec<(String, usize, Option<SpSchedule>)> = Vec::new();
    if a.sp_longest_one_gpu {
        targets.push(("one GPU".into(), 1, None));
    }
    for v in variants(p, c.num_key_value_heads, &a.sp_schedules)? {
        targets.push((v.name(p), p, Some(v.schedule)));
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let start = Instant::now();
    let budget = a.sp_longest_budget_s;
    let mut port = 29600u16;
    let mut out = Vec::new();
    for (name, nproc, schedule) in targets {
        eprintln!("longest sequence: {name} on {nproc} GPU(s)");
        let report = search_longest(
            a.sp_longest_from,
            a.sp_longest_max,
            a.sp_granularity,
            || budget.is_some_and(|b| start.elapsed().as_secs_f64() > b),
            |t| {
                port = if port >= 29_990 { 29_600 } else { port + 1 };
                let o = launch_trial(&exe, a, nproc, schedule, t, port);
                eprintln!("  T {t}: {o:?}");
                o
            },
        );
        let trials: Vec<Value> = report
            .trials
            .iter()
            .map(|(t, o)| match o {
                TrialOutcome::Fits { step_s, peak_bytes } => json!({"t": t, "fits": true,
                    "step_s": step_s, "peak_gib": peak_bytes / (1u64 << 30) as f64}),
                TrialOutcome::OutOfMemory(m) => {
                    json!({"t": t, "fits": false, "oom": true, "error": m})
                }
                TrialOutcome::Failed(m) => json!({"t": t, "fits": false, "oom": false, "error": m}),
            })
            .collect();
        let row = json!({"schedule": name, "ranks": nproc, "longest": report.longest,
            "first_oom": report.first_oom, "stopped": report.stopped, "trials": trials,
            "elapsed_s": start.elapsed().as_secs_f64()});
        append_row(a.sp_out.as_ref(), &row);
        out.push(row);
    }
    Ok(
        json!({"model": format!("Qwen2-7B shape, {} layers, random weights", a.sp_layers),
        "policy": a.sp_policy.to_string(), "from": a.sp_longest_from,
        "granularity": a.sp_granularity, "schedules": out}),
    )
}

/// One trial: `reel launch --nproc P -- reel bench sp-train --sp-trial …` in its own process
/// group (killed whole after `--sp-trial-timeout-s`).
fn launch_trial(
    exe: &std::path::Path,
    a: &SpTrainArgs,
    nproc: usize,
    schedule: Option<SpSchedule>,
    t: usize,
    port: u16,
) -> TrialOutcome {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(exe);
    cmd.args([
        "launch",
        "--nproc",
        &nproc.to_string(),
        "--grace-secs",
        "10",
    ])
    .args(["--rendezvous", &format!("127.0.0.1:{port}"), "--", "reel"])
    .args([
        "bench",
        "sp-train",
        "--sp-trial",
        "--sp-seqs",
        &t.to_string(),
    ])
    .args(["--sp-layers", &a.sp_layers.to_string()])
    .args(["--sp-policy", &a.sp_policy.to_string()])
    .args(["--sp-timeout-s", &a.sp_timeout_s.to_string()]);
    if let Some(s) = schedule {
        cmd.args(["--sp-schedules", &s.to_string()]);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return TrialOutcome::Failed(format!("cannot start {}: {e}", exe.display())),
    };
    // Read stdout on a thread so a chatty trial cannot block on a full pipe.
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + Duration::from_secs(a.sp_trial_timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if Instant::now() > deadline => {
                // The whole group: the launcher and its ranks.
                let _ = Command::new("kill")
                    .args(["-KILL", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                break Err(format!(
                    "timed out after {} s and was killed",
                    a.sp_trial_timeout_s
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => break Err(format!("waiting for the trial: {e}")),
        }
    };
    let text = reader.join().unwrap_or_default();
    match status {
        Ok(s) => trial_outcome(&text, s.success(), &format!("the launch failed ({s})")),
        Err(why) => match trial_outcome(&text, false, &why) {
            TrialOutcome::OutOfMemory(m) => TrialOutcome::OutOfMemory(m),
            _ => TrialOutcome::Failed(why),
        },
    }
}

fn print_longest(r: &Value) {
    println!(
        "longest trainable sequence, {}, policy {} (doubling from {}, bisection to {} tokens)",
        r["model"].as_str().unwrap_or(""),
        r["policy"].as_str().unwrap_or(""),
        r["from"],
        r["granularity"]
    );
    for s in r["schedules"].as_array().into_iter().flatten() {
        println!(
            "{:<12} P {}: longest {} (first out of memory {}){}",
            s["schedule"].as_str().unwrap_or(""),
            s["ranks"],
            s["longest"],
            s["first_oom"],
            s["stopped"]
                .as_str()
                .map_or(String::new(), |w| format!(" — stopped: {w}"))
        );
        for t in s["trials"].as_array().into_iter().flatten() {
            println!("    T {:>8}: {}", t["t"], t);
        }
    }
}

/// Prints one table row (rank 0).
fn print_row(r: &Value) {
    let f = |v: &Value, p: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.p$}"));
    let gb = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{:.2}", x / 1e9))
    };
    if r.get("error").is_some() {
        println!(
            "{:<12} T {:>7}: failed: {}",
            r["schedule"].as_str().unwrap_or(""),
            r["t"],
            r["error"].as_str().unwrap_or("")
        );
        return;
    }
    println!(
        "{:<12} T {:>7}: overlapped {:>9} ms, blocking {:>9} ms | {:>7} tok/s | {:>4} TFLOP/s/GPU | one GPU {:>9} ms, speed-up {} | GB sent per GPU {} (attention {}), planned {}, formula {} | peak {} GiB (pool {} GiB)",
        r["schedule"].as_str().unwrap_or(""),
        r["t"],
        f(&r["overlapped_ms"], 1),
        f(&r["blocking_ms"], 1),
        f(&r["tokens_per_s"], 0),
        f(&r["tflops_per_gpu"], 0),
        f(&r["single_gpu_ms"], 1),
        f(&r["speedup_over_one_gpu"], 2),
        gb(&r["bytes_sent_per_gpu"]),
        gb(&r["attention_bytes_per_gpu"]),
        gb(&r["planned_bytes_per_gpu"]),
        gb(&r["formula_bytes_per_gpu"]),
        f(&r["peak_gib"], 1),
        f(&r["pool_peak_gib"], 1),
    );
}

/// The random weights: matrices uniform in ±0.02·√3 (std 0.02), norm weights 1, biases 0;
/// filled in parallel (a 7B-shaped stack holds billions of values).
pub fn random_params(c: &Qwen2Config, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    let layout = ParamLayout::new(c);
    let mut params = vec![0f32; layout.total()];
    let a = 0.02 * 3f32.sqrt();
    for (k, e) in layout.entries.iter().enumerate() {
        let slot = &mut params[e.range.clone()];
        if e.name.ends_with("norm.weight") {
            slot.fill(1.0);
        } else if e.shape.len() >= 2 {
            slot.par_chunks_mut(1 << 16)
                .enumerate()
                .for_each(|(i, ch)| {
                    // splitmix64 per chunk, then xorshift64.
                    let mut s = seed ^ ((k as u64) << 40) ^ (i as u64);
                    s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    s = (s ^ (s >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    s = (s ^ (s >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    s = (s ^ (s >> 31)) | 1;
                    for x in ch {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                        *x = a * (2.0 * u - 1.0);
                    }
                });
        }
    }
    params
}

/// Token ids, targets (the next token; the last unlabelled) and positions of one random
/// sequence of `t` tokens.
pub fn random_sequence(vocab: usize, t: usize) -> (Vec<u32>, Vec<i32>, Vec<u32>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let tokens: Vec<u32> = (0..t)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect();
    let mut targets: Vec<i32> = tokens[1..].iter().map(|&v| v as i32).collect();
    targets.push(-100);
    (tokens, targets, reel_model::default_positions(1, t))
}

#[cfg(not(feature = "cuda"))]
mod rank {
    use super::*;

    pub fn run(_: &SpTrainArgs, _: &[usize], _: usize, _: bool) -> Result<Value> {
        bail!(
            "this reel was built without the `cuda` feature; build it with \
             `cargo build --release -p reel-cli --features cuda` (no CUDA toolkit needed)"
        )
    }
}

#[cfg(feature = "cuda")]
mod rank {
    //! One process's rank: the table (the one-GPU steps, then every schedule and mode per
    //! length) or one trial.
    use super::*;
    use crate::bench::step_flops;

    fn median(mut t: Vec<f32>) -> f64 {
        t.sort_by(f32::total_cmp);
        t.get(t.len() / 2).map_or(f64::NAN, |&x| x as f64)
    }
    use reel_cuda::{
        Gpu, GpuAttention, GpuDistAttn, GpuQwen2, GpuSpAttention, GpuUlysses, NcclComm,
    };
    use reel_kernels::attention::AttnShape;
    use reel_model::TokenBatch;
    use reel_optim::AdamWConfig;
    use reel_parallel::{Overlap, Pass, ScheduleKind};

    const LR: f32 = 1e-5;
    const GIB: f64 = (1u64 << 30) as f64;

    fn adamw() -> AdamWConfig {
        AdamWConfig {
            lr: LR,
            ..AdamWConfig::default()
        }
    }

    struct Seq {
        tokens: Vec<u32>,
        targets: Vec<i32>,
        positions: Vec<u32>,
    }

    impl Seq {
        fn new(c: &Qwen2Config, t: usize) -> Self {
            let (tokens, targets, positions) = random_sequence(c.vocab_size, t);
            Seq {
                tokens,
                targets,
                positions,
            }
        }
        fn t(&self) -> usize {
            self.tokens.len()
        }
    }

    /// One full training step (forward, backward, the gradient all-reduce under SP, clipping,
    /// AdamW), the GPU synchronised after it.
    fn step(gm: &mut GpuQwen2, s: &Seq) -> Result<()> {
        let t = s.t();
        let scale = 1.0 / (t.saturating_sub(1)).max(1) as f32;
        gm.zero_grads()?;
        match gm.set_seq_len(t)? {
            None => {
                let b = TokenBatch {
                    tokens: &s.tokens,
                    targets: &s.targets,
                    positions: &s.positions,
                    b: 1,
                    t,
                };
                gm.forward(&b)?;
                gm.backward(&b, scale)?;
            }
            Some(sh) => {
                let shard = sh.shard_tokens(&s.tokens, &s.targets, 1, gm.sp_rank(), 0, -100)?;
                let b = shard.batch();
                let local = gm.forward(&b)?;
                gm.backward(&b, scale)?;
                gm.all_reduce_grads(local)?;
            }
        }
        gm.clip_grad_norm(1.0)?;
        gm.adamw_step(LR)?;
        gm.gpu().synchronize()?;
        Ok(())
    }

    /// Every rank's `x` (through the group's all-reduce; a barrier too).
    fn gather(gm: &GpuQwen2, x: f64) -> Result<Vec<f64>> {
        Ok(gm
            .all_gather_u64(x.to_bits())?
            .into_iter()
            .map(f64::from_bits)
            .collect())
    }

    fn max_over(gm: &GpuQwen2, x: f64) -> Result<f64> {
        Ok(gather(gm, x)?.into_iter().fold(f64::MIN, f64::max))
    }

    /// (attention bytes sent, all-reduce bytes sent, forward calls, backward calls) so far.
    fn traffic(gm: &GpuQwen2) -> (u64, u64, usize, usize) {
        match gm.attention() {
            GpuAttention::Sp(sp) => {
                let t = sp.totals();
                let ar = sp.collective_stats().map_or(0, |s| s.all_reduce.bytes_sent);
                (
                    t.forward.bytes_sent + t.backward.bytes_sent,
                    ar,
                    t.forward_calls,
                    t.backward_calls,
                )
            }
            GpuAttention::Local => (0, 0, 0, 0),
        }
    }

    /// Bytes `rank` sends in one attention call of `method` (forward, backward), from the
    /// executor's plan.
    fn planned(method: &SpMethod, c: &Qwen2Config, t: usize, rank: usize) -> Result<(u64, u64)> {
        let whole = AttnShape {
            b: 1,
            tq: t,
            tk: t,
            h: c.num_attention_heads,
            h_kv: c.num_key_value_heads,
            d: c.head_dim,
        };
        Ok(match method {
            SpMethod::Schedule(s) => {
                let sh = method.sharding(t)?;
                let l = sh.local_len();
                let local = AttnShape {
                    tq: l,
                    tk: l,
                    ..whole
                };
                let e = GpuDistAttn::new(s.clone(), sh, local, Overlap::Overlapped)?;
                (
                    e.planned_bytes_sent(rank, Pass::Forward),
                    e.planned_bytes_sent(rank, Pass::Backward),
                )
            }
            SpMethod::Ulysses(g) => {
                let e =
                    GpuUlysses::new(*g, whole, ScheduleKind::DistAttnCausal, Overlap::Overlapped)?;
                (
                    e.planned_bytes_sent(rank, Pass::Forward),
                    e.planned_bytes_sent(rank, Pass::Backward),
                )
            }
        })
    }

    /// What the timed steps of one mode gave (slowest rank's median ms, measured bytes per
    /// step, peak bytes, pool peak bytes, planned bytes).
    struct Timed {
        ms: f64,
        sent: f64,
        attn: f64,
        planned: f64,
        peak: f64,
        pool_peak: f64,
    }

    /// Warm-up + `reps` steps (`reps` = 0: the warm-up alone, timed), the pool's cache emptied
    /// and its high-water mark reset first.
    fn timed(gm: &mut GpuQwen2, s: &Seq, reps: usize, plan: (u64, u64)) -> Result<Timed> {
        gm.gpu().reset_pool_peak()?;
        let mut times = Vec::new();
        let (mut sent, mut attn, mut planned) = (0u64, 0u64, 0u64);
        for it in 0..1 + reps {
            gather(gm, 0.0)?; // barrier
            let before = traffic(gm);
            let t0 = Instant::now();
            step(gm, s)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let after = traffic(gm);
            attn = after.0 - before.0;
            sent = attn + (after.1 - before.1);
            let calls = ((after.2 - before.2) as u64, (after.3 - before.3) as u64);
            planned = calls.0 * plan.0 + calls.1 * plan.1 + (after.1 - before.1);
            let slowest = max_over(gm, ms)?;
            if it > 0 || reps == 0 {
                times.push(slowest as f32);
            }
        }
        let used = gm.gpu().memory_in_use()?.0 as f64;
        let pool = gm.gpu().alloc_stats().pool_peak_bytes as f64;
        Ok(Timed {
            ms: median(times),
            sent: max_over(gm, sent as f64)?,
            attn: max_over(gm, attn as f64)?,
            planned: max_over(gm, planned as f64)?,
            peak: max_over(gm, used)?,
            pool_peak: max_over(gm, pool)?,
        })
    }

    /// A one-GPU length: (T, (median ms, device bytes in use) or the error).
    type OneGpuRow = (usize, std::result::Result<(f64, f64), String>);

    /// The one-GPU step of every length on this rank's GPU (no communication): median ms, or
    /// the error (later lengths are skipped after an out-of-memory one).
    fn one_gpu(
        local: usize,
        c: &Qwen2Config,
        params: &[f32],
        policy: CheckpointPolicy,
        seqs: &[usize],
        reps: usize,
    ) -> Result<Vec<OneGpuRow>> {
        let gpu = Gpu::open_on_new_stream(local)?;
        let mut gm = GpuQwen2::new(gpu, c.clone(), params, policy, adamw())?;
        let mut out = Vec::new();
        for &t in seqs {
            let s = Seq::new(c, t);
            let r = (|| -> Result<(f64, f64)> {
                gm.gpu().reset_pool_peak()?;
                let mut times = Vec::new();
                for it in 0..1 + reps {
                    let t0 = Instant::now();
                    step(&mut gm, &s)?;
                    if it > 0 || reps == 0 {
                        times.push((t0.elapsed().as_secs_f64() * 1e3) as f32);
                    }
                }
                Ok((median(times), gm.gpu().memory_in_use()?.0 as f64))
            })();
            let oom = matches!(&r, Err(e) if is_out_of_memory(&format!("{e:#}")));
            out.push((t, r.map_err(|e| format!("{e:#}"))));
            if oom {
                break;
            }
        }
        Ok(out)
    }

    pub fn run(a: &SpTrainArgs, seqs: &[usize], reps: usize, as_json: bool) -> Result<Value> {
        // NCCL is opened by the name libnccl.so: make pip's libnccl.so.2 reachable under it.
        if let Err(e) = reel_cuda::libs::reexec_with_library_path() {
            eprintln!("bench sp-train: {e}");
        }
        let comm = NcclComm::from_env(Duration::from_secs(a.sp_timeout_s)).context("NCCL init")?;
        let local = std::env::var(reel_comm::launch::ENV_LOCAL_RANK)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(reel_comm::Communicator::rank(&comm));
        let (p, rank) = (
            reel_comm::Communicator::world_size(&comm),
            reel_comm::Communicator::rank(&comm),
        );
        let lead = rank == 0;
        let max_t = *seqs.iter().max().unwrap_or(&1);
        let c = qwen2_7b_stack(a.sp_layers, max_t);
        let policy = a.sp_policy;
        let t_params = Instant::now();
        let params = random_params(&c, 7);
        if lead && !a.sp_trial {
            eprintln!(
                "bench sp-train: {} parameters drawn in {:.1} s",
                params.len(),
                t_params.elapsed().as_secs_f64()
            );
        }
        if a.sp_trial {
            return trial(a, comm, local, p, rank, &c, &params, seqs[0]);
        }
        let vs = variants(p, c.num_key_value_heads, &a.sp_schedules)?;

        // One GPU first (its model freed before the sequence-parallel one is made).
        let single = if a.sp_no_single {
            Vec::new()
        } else {
            let r = one_gpu(local, &c, &params, policy, seqs, reps)?;
            reel_comm::Communicator::barrier(&comm)?;
            r
        };
        if lead && !as_json {
            println!(
                "SP training steps over NCCL, {p} processes, Qwen2-7B shape with {} layers (d {}, H {}/{}, D {}, I {}, V {}), random weights, policy {policy}; \
                 step = forward + backward + gradient all-reduce + clip + AdamW, slowest rank, median of {reps} after 1 warm-up",
                c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim, c.intermediate_size, c.vocab_size
            );
            for (t, r) in &single {
                match r {
                    Ok((ms, used)) => {
                        println!("one GPU T {t}: {ms:.1} ms, {:.1} GiB in use", used / GIB)
                    }
                    Err(e) => println!("one GPU T {t}: failed: {e}"),
                }
            }
        }
        let gpu = Gpu::open_on_new_stream(local)?;
        let p2p = comm.into_device_p2p(&gpu)?;
        let first = vs[0].method(p, c.num_attention_heads, c.num_key_value_heads)?;
        let sp = GpuSpAttention::with_method(p2p, first, Overlap::Overlapped)?;
        let mut gm = GpuQwen2::new(gpu, c.clone(), &params, policy, adamw())?;
        gm.set_attention(GpuAttention::Sp(Box::new(sp)));
        drop(params);

        let mut rows = Vec::new();
        for &t in seqs {
            let s = Seq::new(&c, t);
            let single_ms = single
                .iter()
                .find(|(x, _)| *x == t)
                .and_then(|(_, r)| r.as_ref().ok().map(|x| x.0));
            for v in &vs {
                let name = v.name(p);
                match row(&mut gm, &c, v, &s, reps, p, rank, policy, single_ms) {
                    Ok(r) => {
                        if lead {
                            if !as_json {
                                print_row(&r);
                            }
                            append_row(a.sp_out.as_ref(), &r);
                        }
                        rows.push(r);
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        gm.abort_peers(&msg);
                        let r = json!({"schedule": name, "ranks": p, "t": t, "rank": rank,
                            "error": msg, "oom": is_out_of_memory(&msg)});
                        eprintln!(
                            "bench sp-train: rank {rank}: {name} T {t}: {msg} (the run stops here)"
                        );
                        append_row(a.sp_out.as_ref(), &r);
                        bail!("{name} T {t} failed on rank {rank}: {msg}");
                    }
                }
            }
        }
        let singles: Vec<Value> = single
            .iter()
            .map(|(t, r)| match r {
                Ok((ms, used)) => json!({"t": t, "ms": ms, "tokens_per_s": *t as f64 / (ms / 1e3),
                    "in_use_gib": used / GIB}),
                Err(e) => json!({"t": t, "error": e}),
            })
            .collect();
        Ok(if lead {
            json!({"ranks": p, "device": gm.gpu().info().name,
                "model": format!("Qwen2-7B shape, {} layers, random weights", c.num_hidden_layers),
                "params": ParamLayout::new(&c).total(), "policy": policy.to_string(),
                "reps": reps, "one_gpu": singles, "rows": rows})
        } else {
            Value::Null
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        gm: &mut GpuQwen2,
        c: &Qwen2Config,
        v: &Variant,
        s: &Seq,
        reps: usize,
        p: usize,
        rank: usize,
        policy: CheckpointPolicy,
        single_ms: Option<f64>,
    ) -> Result<Value> {
        let t = s.t();
        let method = v.method(p, c.num_attention_heads, c.num_key_value_heads)?;
        let plan = planned(&method, c, t, rank)?;
        let modes: &[Overlap] = if v.has_ring() {
            &[Overlap::Overlapped, Overlap::Blocking]
        } else {
            &[Overlap::Overlapped]
        };
        let mut res = json!({"schedule": v.name(p), "ranks": p, "t": t,
            "layers": c.num_hidden_layers, "policy": policy.to_string(),
            "single_gpu_ms": single_ms});
        for &mode in modes {
            gm.set_sp_method(method.clone(), mode)?;
            let r = timed(gm, s, reps, plan)?;
            let key = match mode {
                Overlap::Overlapped => "overlapped",
                Overlap::Blocking => "blocking",
            };
            res[format!("{key}_ms")] = json!(r.ms);
            if mode == Overlap::Overlapped {
                res["bytes_sent_per_gpu"] = json!(r.sent);
                res["attention_bytes_per_gpu"] = json!(r.attn);
                res["planned_bytes_per_gpu"] = json!(r.planned);
                res["peak_gib"] = json!(r.peak / GIB);
                res["pool_peak_gib"] = json!(r.pool_peak / GIB);
            }
        }
        let o = res["overlapped_ms"].as_f64().unwrap_or(f64::NAN);
        if let Some(b) = res["blocking_ms"].as_f64() {
            res["blocking_over_overlapped"] = json!(b / o);
        }
        res["tokens_per_s"] = json!(t as f64 / (o / 1e3));
        res["tflops_per_gpu"] = json!(step_flops(c, t) / p as f64 / (o / 1e3) / 1e12);
        res["formula_bytes_per_gpu"] = json!(step_formula_bytes(v, p, t, c, policy));
        if let Some(sm) = single_ms {
            res["speedup_over_one_gpu"] = json!(sm / o);
        }
        Ok(res)
    }

    /// One trial: a warm-up step of the first schedule (the one-GPU model when the world is
    /// one process) at T = `t`; rank 0 prints `SPTRIAL {"fits": true, …}`, a failing rank
    /// `SPTRIAL {"fits": false, …}` and fails.
    #[allow(clippy::too_many_arguments)]
    fn trial(
        a: &SpTrainArgs,
        comm: NcclComm,
        local: usize,
        p: usize,
        rank: usize,
        c: &Qwen2Config,
        params: &[f32],
        t: usize,
    ) -> Result<Value> {
        let gpu = Gpu::open_on_new_stream(local)?;
        let name;
        let mut gm = if p == 1 {
            name = "one GPU".to_string();
            drop(comm);
            GpuQwen2::new(gpu, c.clone(), params, a.sp_policy, adamw())?
        } else {
            let v = variants(p, c.num_key_value_heads, &a.sp_schedules)?.remove(0);
            name = v.name(p);
            let method = v.method(p, c.num_attention_heads, c.num_key_value_heads)?;
            let p2p = comm.into_device_p2p(&gpu)?;
            let sp = GpuSpAttention::with_method(p2p, method, Overlap::Overlapped)?;
            let mut gm = GpuQwen2::new(gpu, c.clone(), params, a.sp_policy, adamw())?;
            gm.set_attention(GpuAttention::Sp(Box::new(sp)));
            gm
        };
        let s = Seq::new(c, t);
        let t0 = Instant::now();
        let r = step(&mut gm, &s);
        let secs = t0.elapsed().as_secs_f64();
        if let Err(e) = r {
            let msg = format!("{e:#}");
            gm.abort_peers(&msg);
            println!(
                "{TRIAL_MARK}{}",
                json!({"fits": false, "rank": rank, "schedule": name, "t": t,
                       "oom": is_out_of_memory(&msg), "error": msg})
            );
            bail!("{name} T {t}: {msg}");
        }
        let used = gm.gpu().memory_in_use()?.0 as f64;
        let (secs, used) = if p == 1 {
            (secs, used)
        } else {
            (max_over(&gm, secs)?, max_over(&gm, used)?)
        };
        let v = json!({"fits": true, "rank": rank, "schedule": name, "t": t, "step_s": secs,
                       "peak_bytes": used});
        if rank == 0 {
            println!("{TRIAL_MARK}{v}");
        }
        Ok(if rank == 0 { v } else { Value::Null })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: SpTrainArgs,
    }

    #[test]
    fn defaults_and_parsing() {
        let a = Cli::parse_from(["x"]).a;
        assert_eq!(a.sp_layers, 4);
        assert!(a.sp_schedules.is_empty());
        assert_eq!(a.sp_policy, CheckpointPolicy::Remat);
        assert_eq!((a.sp_longest_from, a.sp_granularity), (32_768, 32_768));
        assert!(!a.sp_longest && !a.sp_trial && !a.sp_no_single);
        let a = Cli::parse_from([
            "x",
            "--sp-schedules",
            "zigzag,ulysses",
            "--sp-policy",
            "layer",
            "--sp-layers",
            "2",
        ])
        .a;
        assert_eq!(
            a.sp_schedules,
            vec![SpSchedule::Zigzag, SpSchedule::Ulysses]
        );
        assert_eq!(a.sp_policy, CheckpointPolicy::Layer);
        assert_eq!(a.sp_layers, 2);
        assert!(Cli::try_parse_from(["x", "--sp-schedules", "megatron"]).is_err());
        assert!(Cli::try_parse_from(["x", "--sp-policy", "some"]).is_err());
    }

    #[test]
    fn the_stack_is_qwen2_7b_shaped() {
        let c = qwen2_7b_stack(4, 131_072);
        c.validate().unwrap();
        let n = ParamLayout::new(&c).total();
        // Embedding and LM head 2·152064·3584, each layer 233.1M (q/k/v with biases, o, MLP,
        // two norms), the final norm.
        let layer = 3584 * 4608 + 4608 + 3584 * 3584 + 3 * 3584 * 18_944 + 2 * 3584;
        assert_eq!(n, 2 * 152_064 * 3584 + 4 * layer + 3584);
    }

    #[test]
    fn variants_follow_the_world_size() {
        let names = |p: usize| -> Vec<String> {
            variants(p, 4, &[])
                .unwrap()
                .iter()
                .map(|v| v.name(p))
                .collect()
        };
        assert_eq!(names(2), ["ring", "distattn", "zigzag", "ulysses"]);
        assert_eq!(
            names(4),
            ["ring", "distattn", "zigzag", "ulysses", "hybrid2x2"]
        );
        assert_eq!(names(8), ["ring", "distattn", "zigzag", "hybrid4x2"]);
        assert_eq!(names(3), ["ring", "distattn", "zigzag"]);
        assert!(variants(1, 4, &[]).is_err());
        let e = variants(8, 4, &[SpSchedule::Ulysses])
            .unwrap_err()
            .to_string();
        assert!(e.contains("divide H_kv"), "{e}");
        let e = variants(2, 4, &[SpSchedule::Hybrid])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 < u < P"), "{e}");
        let v = variants(8, 4, &[SpSchedule::Zigzag, SpSchedule::Zigzag]).unwrap();
        assert_eq!(v.len(), 1);
        // The methods are the trainer's: the hybrid's grid u × P/u, the ring family's schedule.
        let h = variants(8, 4, &[SpSchedule::Hybrid]).unwrap().remove(0);
        match h.method(8, 28, 4).unwrap() {
            SpMethod::Ulysses(g) => assert_eq!((g.ulysses(), g.ring()), (4, 2)),
            m => panic!("{m:?}"),
        }
        let r = variants(4, 4, &[SpSchedule::Distattn]).unwrap().remove(0);
        assert!(matches!(r.method(4, 28, 4).unwrap(), SpMethod::Schedule(s) if s.ranks == 4));
        assert!(!variants(2, 4, &[SpSchedule::Ulysses]).unwrap()[0].has_ring());
        // Every default row of every world size has a method the trainer accepts, on P ranks.
        for p in 2..=8 {
            for v in variants(p, 4, &[]).unwrap() {
                let m = v
                    .method(p, 28, 4)
                    .unwrap_or_else(|e| panic!("{} at P {p}: {e}", v.name(p)));
                assert_eq!(m.ranks(), p, "{}", v.name(p));
                match (v.schedule, &m) {
                    (SpSchedule::Ulysses, SpMethod::Ulysses(g)) => assert_eq!(g.ulysses(), p),
                    (SpSchedule::Hybrid, SpMethod::Ulysses(g)) => assert_eq!(g.ulysses(), v.u),
                    (_, SpMethod::Schedule(_)) => assert!(v.has_ring()),
                    _ => panic!("{} at P {p}: {m:?}", v.name(p)),
                }
            }
        }
    }

    #[test]
    fn formulas_match_the_measured_counts_they_describe() {
        // The full ring at P 2, 32k tokens, H_kv·D = 1024: 268.4 MB a GPU for fwd + bwd
        // (BENCHMARKS: sp-nccl, ring full and zigzag).
        let r = ring_formula(32_768, 1024, 2);
        assert_eq!(r.forward + r.backward, 268_435_456.0);
        assert_eq!(r.backward, 3.0 * r.forward);
        // Ulysses at P 2, H 32/8, D 128, 32k: the all-to-alls of fwd + bwd, 505.4 MB measured.
        let u = ulysses_formula(32_768, 2, 2, 32, 8, 128);
        assert_eq!(u.forward + u.backward, 505_413_632.0);
        // Its sum is (u−1)/u·L·(12·H·D + 12·H_kv·D + 8·H) with L = T/P.
        for (t, p, h, hk) in [(1000usize, 4usize, 28usize, 4usize), (4096, 2, 8, 2)] {
            let u = ulysses_formula(t, p, p, h, hk, 64);
            let l = t.div_ceil(p) as f64;
            let want = (p as f64 - 1.0) / p as f64
                * l
                * (12.0 * (h * 64) as f64 + 12.0 * (hk * 64) as f64 + 8.0 * h as f64);
            assert!(
                (u.forward + u.backward - want).abs() < 1e-6 * want,
                "{t} {p}"
            );
        }
        // The all-reduce formula is the communicator's counting convention.
        for (n, p) in [(1000usize, 2usize), (1 << 20, 4), (4096, 8)] {
            let (sent, _) =
                reel_comm::stats::convention_bytes(reel_comm::Op::AllReduce, n, p, 1, 0);
            assert_eq!(all_reduce_formula(n, p), sent as f64, "{n} {p}");
        }
        // The hybrid: its all-to-alls in groups of u plus the ring over the P/u groups.
        let hy = Variant {
            schedule: SpSchedule::Hybrid,
            u: 2,
        };
        let f = attention_formula(&hy, 4, 8192, 28, 4, 128);
        let a = ulysses_formula(8192, 4, 2, 28, 4, 128);
        let r = ring_formula(8192, 2 * 128, 2);
        assert_eq!(f.forward, a.forward + r.forward);
        // A step: L layers' calls (the layer policy's forward twice) and the all-reduce.
        let c = qwen2_7b_stack(2, 4096);
        let v = Variant {
            schedule: SpSchedule::Zigzag,
            u: 0,
        };
        let n = ParamLayout::new(&c).total() + 3;
        let ring = ring_formula(4096, 512, 2);
        let remat = step_formula_bytes(&v, 2, 4096, &c, CheckpointPolicy::Remat);
        assert_eq!(
            remat,
            2.0 * (ring.forward + ring.backward) + all_reduce_formula(n, 2)
        );
        let layer = step_formula_bytes(&v, 2, 4096, &c, CheckpointPolicy::Layer);
        assert_eq!(layer - remat, 2.0 * ring.forward);
    }

    /// A fake trial: fits up to `limit`, out of memory above.
    fn fake(limit: usize, calls: &mut Vec<usize>) -> impl FnMut(usize) -> TrialOutcome + '_ {
        move |t| {
            calls.push(t);
            if t <= limit {
                TrialOutcome::Fits {
                    step_s: 1.0,
                    peak_bytes: t as f64,
                }
            } else {
                TrialOutcome::OutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into())
            }
        }
    }

    #[test]
    fn the_search_doubles_then_bisects_to_the_granularity() {
        let mut calls = Vec::new();
        let r = search_longest(32_768, 1 << 24, 32_768, || false, fake(700_000, &mut calls));
        // 32k … 512k fit, 1M does not; bisection of [512k, 1M) in 32k steps.
        assert_eq!(
            &calls[..6],
            &[32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576]
        );
        assert_eq!(calls[6], 786_432);
        assert_eq!(r.longest, Some(688_128));
        assert_eq!(r.first_oom, Some(720_896));
        assert!(r.stopped.is_none());
        assert!(calls.iter().all(|t| t % 32_768 == 0));
        // Exactly the bracket: every length tried ≤ limit fit, every one above did not.
        for (t, o) in &r.trials {
            assert_eq!(matches!(o, TrialOutcome::Fits { .. }), *t <= 700_000, "{t}");
        }
        // A limit on a power of two: the doubling's last fit is the answer.
        let mut calls = Vec::new();
        let r = search_longest(32_768, 1 << 24, 32_768, || false, fake(131_072, &mut calls));
        assert_eq!((r.longest, r.first_oom), (Some(131_072), Some(163_840)));
        // The first length failing: no fit, no bisection.
        let mut calls = Vec::new();
        let r = search_longest(32_768, 1 << 24, 32_768, || false, fake(1000, &mut calls));
        assert_eq!((r.longest, r.first_oom), (None, Some(32_768)));
        assert_eq!(calls, [32_768]);
    }

    #[test]
    fn the_search_stops_at_max_budget_and_other_failures() {
        let mut calls = Vec::new();
        let r = search_longest(32_768, 200_000, 32_768, || false, fake(1 << 30, &mut calls));
        assert_eq!(calls, [32_768, 65_536, 131_072]);
        assert_eq!((r.longest, r.first_oom), (Some(131_072), None));
        assert!(r.stopped.unwrap().contains("no out-of-memory"));
        // Budget: two trials allowed.
        let mut left = 2;
        let mut calls = Vec::new();
        let r = search_longest(
            32_768,
            1 << 24,
            32_768,
            || {
                left -= 1;
                left < 0
            },
            fake(1 << 30, &mut calls),
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(r.longest, Some(65_536));
        assert!(r.stopped.unwrap().contains("time budget"));
        // A failure that is not memory's ends the search where it stands.
        let r = search_longest(
            32_768,
            1 << 24,
            32_768,
            || false,
            |t| {
                if t > 65_536 {
                    TrialOutcome::Failed("NCCL timeout".into())
                } else {
                    TrialOutcome::Fits {
                        step_s: 1.0,
                        peak_bytes: 0.0,
                    }
                }
            },
        );
        assert_eq!((r.longest, r.first_oom), (Some(65_536), None));
        assert!(r.stopped.unwrap().contains("NCCL timeout"));
    }

    #[test]
    fn trial_outcomes_are_read_from_the_ranks_lines() {
        let ok =
            "noise\nSPTRIAL {\"fits\": true, \"rank\": 0, \"step_s\": 2.5, \"peak_bytes\": 1e9}\n";
        assert_eq!(
            trial_outcome(ok, true, ""),
            TrialOutcome::Fits {
                step_s: 2.5,
                peak_bytes: 1e9
            }
        );
        // Rank 1 ran out of memory; rank 0 was killed by the launcher (no line).
        let oom = "SPTRIAL {\"fits\": false, \"rank\": 1, \"error\": \"cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY\"}\n";
        assert!(
            matches!(trial_outcome(oom, false, "launch failed"), TrialOutcome::OutOfMemory(m) if m.contains("rank 1"))
        );
        let other = "SPTRIAL {\"fits\": false, \"rank\": 0, \"error\": \"timed out\"}\n";
        assert!(
            matches!(trial_outcome(other, false, "x"), TrialOutcome::Failed(m) if m.contains("timed out"))
        );
        assert!(
            matches!(trial_outcome("", false, "rank 1 was killed"), TrialOutcome::Failed(m) if m == "rank 1 was killed")
        );
        assert!(matches!(
            trial_outcome("", true, ""),
            TrialOutcome::Failed(_)
        ));
        assert!(is_out_of_memory("out of memory") && !is_out_of_memory("timeout"));
    }

    #[test]
    fn random_weights_have_the_intended_statistics() {
        let mut c = qwen2_7b_stack(1, 64);
        c.hidden_size = 64;
        c.intermediate_size = 96;
        c.num_attention_heads = 4;
        c.num_key_value_heads = 2;
        c.head_dim = 16;
        c.vocab_size = 500;
        let p = random_params(&c, 3);
        let layout = ParamLayout::new(&c);
        for e in &layout.entries {
            let x = &p[e.range.clone()];
            if e.name.ends_with("norm.weight") {
                assert!(x.iter().all(|&v| v == 1.0), "{}", e.name);
            } else if e.shape.len() >= 2 {
                let n = x.len() as f64;
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
                let std = (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
                assert!(
                    mean.abs() < 2e-3 && (std - 0.02).abs() < 2e-3,
                    "{}: {mean} {std}",
                    e.name
                );
            } else {
                assert!(x.iter().all(|&v| v == 0.0), "{}", e.name);
            }
        }
        assert_eq!(p, random_params(&c, 3), "deterministic");
    }
}
