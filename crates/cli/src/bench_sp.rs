//! `reel bench sp`: sequence-parallel attention schedules side by side on in-process ranks.
//!
//! For one causal attention layer (N tokens, H/H_kv heads of size D) and each schedule and P,
//! prints: block products per rank (max/mean; a plain ring's last rank does P), bytes each rank
//! sends per layer, forward + backward, measured by the communicator's counters, beside the
//! formula volumes of Megatron-style TP+SP (≈ 4·N·d), Ulysses (4·N·d/P) and ring
//! (≈ 2·N·d_kv forward + 4·N·d_kv backward), the largest error against single-rank attention,
//! and the wall time of a forward + backward with communication overlapped and blocking.
//! In-process ranks share this machine's cores, so times compare schedules, not GPUs.

use anyhow::Result;
use reel_comm::{Communicator, InProcess};
use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};
use reel_parallel::{
    balance, block_counts, Causality, DistExecutor, ExecStats, Overlap, ScheduleKind, Sharding,
    UlyssesAttention, UlyssesGrid, UlyssesGroups,
};
use serde_json::json;
use std::time::{Duration, Instant};

/// The layer a benchmark runs.
#[derive(Clone, Copy, Debug)]
pub struct SpShape {
    pub n: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
}

struct Full {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn reference(s: SpShape) -> Full {
    let mut r = reel_tensor::rng(3);
    let q = reel_tensor::uniform_vec(&mut r, s.n * s.h * s.d, 1.0);
    let k = reel_tensor::uniform_vec(&mut r, s.n * s.h_kv * s.d, 1.0);
    let v = reel_tensor::uniform_vec(&mut r, s.n * s.h_kv * s.d, 1.0);
    let dout = reel_tensor::uniform_vec(&mut r, s.n * s.h * s.d, 1.0);
    let shape = AttnShape {
        b: 1,
        tq: s.n,
        tk: s.n,
        h: s.h,
        h_kv: s.h_kv,
        d: s.d,
    };
    let mask = AttnMask::Causal {
        q_offset: 0,
        k_offset: 0,
    };
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.n * s.h];
    attention_forward(&mut out, &mut lse, &q, &k, &v, shape, mask);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_backward(
        &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, shape, mask,
    );
    Full {
        q,
        k,
        v,
        dout,
        out,
        dq,
        dk,
        dv,
    }
}

impl Full {
    /// Rank `r`'s shard of q, k, v and dout.
    fn shard(&self, s: SpShape, sh: &Sharding, r: usize) -> Result<[Vec<f32>; 4]> {
        let (qw, kw) = (s.h * s.d, s.h_kv * s.d);
        let cut = |x: &[f32], w: usize| sh.shard(x, 1, w, r, 0.0);
        Ok([
            cut(&self.q, qw)?,
            cut(&self.k, kw)?,
            cut(&self.v, kw)?,
            cut(&self.dout, qw)?,
        ])
    }
}

/// Splits each rank's (extra, [out, dq, dk, dv]) into the extras and the four lists of parts.
type Gathered<X> = (Vec<X>, [Vec<Vec<f32>>; 4]);

fn gather<X>(results: Vec<Result<(X, [Vec<f32>; 4])>>) -> Result<Gathered<X>> {
    let mut extras = Vec::new();
    let mut parts: [Vec<Vec<f32>>; 4] = Default::default();
    for r in results {
        let (x, locals) = r?;
        extras.push(x);
        for (i, v) in locals.into_iter().enumerate() {
            parts[i].push(v);
        }
    }
    Ok((extras, parts))
}

/// Per rank: forward and backward stats.
type RankStats = Vec<(ExecStats, ExecStats)>;

/// One schedule at one P: per-rank stats, the gathered results' worst error, the wall time.
fn run_schedule(
    s: SpShape,
    kind: ScheduleKind,
    p: usize,
    overlap: Overlap,
    full: &Full,
) -> Result<(RankStats, f32, Duration)> {
    let schedule = kind.build(p)?;
    let sh = Sharding::new(s.n, p, schedule.layout())?;
    let l = sh.local_len();
    let local = AttnShape {
        b: 1,
        tq: l,
        tk: l,
        h: s.h,
        h_kv: s.h_kv,
        d: s.d,
    };
    let ex = DistExecutor::new(schedule, sh, local, overlap)?;
    let start = Instant::now();
    let results = InProcess::spawn(p, Duration::from_secs(600), |comm| {
        let [q, k, v, dout] = full.shard(s, &sh, comm.rank())?;
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; l * s.h];
        let f = ex.forward(&comm, &mut out, &mut lse, &q, &k, &v)?;
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let b = ex.backward(
            &comm, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
        )?;
        Ok::<_, anyhow::Error>(((f, b), [out, dq, dk, dv]))
    });
    let elapsed = start.elapsed();
    let (stats, parts) = gather(results)?;
    let err = worst_error(s, &sh, &parts, full)?;
    Ok((stats, err, elapsed))
}

/// Gathers per-rank [out, dq, dk, dv] and returns the worst error against the reference.
fn worst_error(s: SpShape, sh: &Sharding, parts: &[Vec<Vec<f32>>; 4], full: &Full) -> Result<f32> {
    let (qw, kw) = (s.h * s.d, s.h_kv * s.d);
    let mut err = 0.0f32;
    for (i, (want, w)) in [
        (&full.out, qw),
        (&full.dq, qw),
        (&full.dk, kw),
        (&full.dv, kw),
    ]
    .into_iter()
    .enumerate()
    {
        let refs: Vec<&[f32]> = parts[i].iter().map(Vec::as_slice).collect();
        let got = sh.unshard(&refs, 1, w)?;
        err = err.max(reel_tensor::max_abs_diff(&got, want));
    }
    Ok(err)
}

/// Ulysses over P ranks when P divides H_kv, else the hybrid with u = gcd(H_kv, P):
/// (u, bytes sent by the busiest rank, worst error, wall time).
fn run_ulysses(s: SpShape, p: usize, full: &Full) -> Result<(usize, f64, f32, Duration)> {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let u = gcd(s.h_kv, p);
    let grid = UlyssesGrid::new(u, p / u)?;
    let global = AttnShape {
        b: 1,
        tq: s.n,
        tk: s.n,
        h: s.h,
        h_kv: s.h_kv,
        d: s.d,
    };
    let att = UlyssesAttention::new(grid, global, Causality::Causal)?;
    let sh = att.sharding();
    let l = att.local_shape().tq;
    let start = Instant::now();
    let results = InProcess::spawn(p, Duration::from_secs(600), |comm| {
        let groups = UlyssesGroups::split(&comm, grid)?;
        groups.reset_stats();
        let [q, k, v, dout] = full.shard(s, &sh, comm.rank())?;
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; l * s.h];
        att.forward(&groups, &mut out, &mut lse, &q, &k, &v)?;
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        att.backward(
            &groups, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
        )?;
        let sent = groups.stats().total().bytes_sent;
        Ok::<_, anyhow::Error>((sent, [out, dq, dk, dv]))
    });
    let elapsed = start.elapsed();
    let (sent, parts) = gather(results)?;
    let sent = sent.into_iter().max().unwrap_or(0);
    Ok((u, sent as f64, worst_error(s, &sh, &parts, full)?, elapsed))
}

pub fn run(s: SpShape, ranks: &[usize], as_json: bool) -> Result<serde_json::Value> {
    let full = reference(s);
    let (n, d, d_kv) = (s.n as f64, (s.h * s.d) as f64, (s.h_kv * s.d) as f64);
    let mib = |x: f64| x / (1 << 20) as f64;
    let mut rows = Vec::new();
    if !as_json {
        println!(
            "sequence-parallel causal attention: N={} H={} H_kv={} D={} (f32, in-process ranks on {} threads)",
            s.n, s.h, s.h_kv, s.d, rayon::current_num_threads()
        );
        println!(
            "{:<8} {:>2} {:>9} {:>9} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
            "schedule",
            "P",
            "blocks",
            "max/mean",
            "sent MiB",
            "TP+SP MiB",
            "Ulysses",
            "ring",
            "max err",
            "overlap s",
            "block s"
        );
    }
    for &p in ranks {
        for kind in [
            ScheduleKind::RingCausal,
            ScheduleKind::DistAttnCausal,
            ScheduleKind::ZigzagRingCausal,
        ] {
            let schedule = kind.build(p)?;
            let counts = block_counts(&schedule);
            let (stats, err, t_over) = run_schedule(s, kind, p, Overlap::Overlapped, &full)?;
            let (_, _, t_block) = run_schedule(s, kind, p, Overlap::Blocking, &full)?;
            let sent = stats
                .iter()
                .map(|(f, b)| (f.bytes_sent + b.bytes_sent) as f64)
                .fold(0.0, f64::max);
            let row = json!({
                "schedule": format!("{kind:?}"), "p": p,
                "blocks_per_rank": counts, "balance": balance(&schedule),
                "max_bytes_sent_per_rank": sent,
                "formula_tp_sp_bytes": 4.0 * n * d * 4.0,
                "formula_ulysses_bytes": 4.0 * n * d / p as f64 * 4.0,
                "formula_ring_bytes": 6.0 * n * d_kv * 4.0,
                "max_abs_error": err,
                "overlapped_s": t_over.as_secs_f64(), "blocking_s": t_block.as_secs_f64(),
            });
            if !as_json {
                println!(
                    "{:<8} {:>2} {:>9} {:>9.3} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2e} {:>10.3} {:>9.3}",
                    match kind {
                        ScheduleKind::RingCausal => "ring",
                        ScheduleKind::DistAttnCausal => "distattn",
                        ScheduleKind::ZigzagRingCausal => "zigzag",
                        _ => "other",
                    },
                    p,
                    format!("{}", counts.iter().max().unwrap_or(&0)),
                    balance(&schedule),
                    mib(sent),
                    mib(4.0 * n * d * 4.0),
                    mib(4.0 * n * d / p as f64 * 4.0),
                    mib(6.0 * n * d_kv * 4.0),
                    err,
                    t_over.as_secs_f64(),
                    t_block.as_secs_f64()
                );
            }
            rows.push(row);
        }
        let (u, sent, err, t) = run_ulysses(s, p, &full)?;
        let label = if u == p {
            "ulysses".to_string()
        } else {
            format!("hyb{u}x{}", p / u)
        };
        if !as_json {
            println!(
                "{:<8} {:>2} {:>9} {:>9} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2e} {:>10.3} {:>9}",
                label,
                p,
                "-",
                "-",
                mib(sent),
                mib(4.0 * n * d * 4.0),
                mib(4.0 * n * d / p as f64 * 4.0),
                mib(6.0 * n * d_kv * 4.0),
                err,
                t.as_secs_f64(),
                "-"
            );
        }
        rows.push(json!({
            "schedule": label, "p": p, "ulysses_degree": u,
            "max_bytes_sent_per_rank": sent, "max_abs_error": err,
            "overlapped_s": t.as_secs_f64(),
        }));
    }
    if !as_json {
        println!("(blocks: the slowest rank's block products; zigzag counts half-size blocks)");
    }
    Ok(json!(rows))
}
