//! GRPO over `[parallel] dp × sp` in-process ranks (DESIGN.md "MR-SP and the RL step"; the SFT
//! trainer's rank layout: rank = dp_rank · sp + sp_rank, sp groups contiguous).
//!
//! Every rank runs the same step loop ([`super::grpo_rank`]) on its own replica of the policy
//! (and of the frozen reference), so every rank takes the same decisions:
//!
//! - **Rollout**: group k of a round is rolled out by replica `k mod dp`; within a replica the
//!   sp ranks run one [`ShardedEngine`] (prompt prefilled sequence-parallel, KV sharded over the
//!   sp ranks' pools, decode attention merged from partials), or the plain [`Engine`] when sp = 1.
//!   The responses are all-gathered over each dp group (token ids travel as f32, exact below
//!   2²⁴), so every rank holds every group in draw order; rewards, advantages and dynamic sampling
//!   then run on every rank alike (a reward command runs once per rank).
//! - **Old / reference log-probabilities and the update**: replica d takes micro-batches
//!   d, d + dp, … of each mini-batch, and each of its sp ranks its balanced token shard of them
//!   (the schedule's layout, [`SpAttention`]); `grpo_loss` is given the global token counts (and
//!   each sequence's whole response length) so the per-rank losses and gradients are partial
//!   sums. Gradients are summed over the world in one all-reduce, the loss in another, then every
//!   rank clips and steps AdamW identically (replica checksums compared at the end).
//! - **Metrics** (sums over tokens) are all-gathered and merged in rank order once per step.
//!   Only rank 0 writes metrics, progress, `config.toml` and checkpoints.

use super::{grpo_rank, GrpoOptions, GrpoRunConfig, GrpoSummary, Rows};
use crate::device::RolloutDecoder;
use anyhow::{bail, Context, Result};
use reel_comm::{Communicator, InProcess};
use reel_data::IGNORE_INDEX;
use reel_model::{AttentionOp, LocalAttention, Qwen2, Qwen2Config};
use reel_parallel::{ParallelDims, RankCoords, ScheduleKind, SpAttention, SpMethod};
use reel_rl::GrpoMetrics;
use reel_rollout::engine::Detokenizer;
use reel_rollout::{EngineConfig, GenerationParams, ShardedEngine};

/// A rank's place among the others.
pub(crate) struct Peers<'a, C: Communicator> {
    pub rank: usize,
    pub dims: ParallelDims,
    pub coords: RankCoords,
    /// All ranks (gradient and loss all-reduce, metrics).
    pub world: &'a C,
    /// This rank's dp group: the ranks with its sp rank (rollout gather).
    pub dp: &'a C,
    /// This rank's sp group for the rollout engine (sp > 1).
    pub sp_roll: Option<&'a C>,
    /// Sequence-parallel attention over the sp group for scoring and update (sp > 1).
    pub sp: Option<&'a SpAttention<C>>,
    /// The ring-family schedule of the sharded rollout's prefill (`ParallelConfig::rollout_schedule`).
    pub schedule: ScheduleKind,
}

/// Responses of a round: per group, per sample, the generated ids.
pub(crate) type Responses = Vec<Vec<Vec<u32>>>;

/// One rollout request: the prompt's ids, its sampling, and a name for errors.
pub(crate) struct Request<'a> {
    pub ids: &'a [u32],
    pub params: GenerationParams,
    pub name: &'a str,
}

/// Rolls out every request's `g` samples (this replica's share under dp, gathered), with `gpu`'s
/// decoder when given (one rank only) else the CPU model; returns the
/// responses' ids per group and sample, in request order, and the prefill and decode tokens run
/// (summed over replicas).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rollout<C: Communicator>(
    model: &Qwen2,
    gpu: Option<&mut RolloutDecoder>,
    peers: Option<&Peers<'_, C>>,
    ecfg: EngineConfig,
    g: usize,
    requests: &[Request],
    detok: &Detokenizer,
    at: &str,
) -> Result<(Responses, u64, u64)> {
    let (dp, dp_rank) = peers.map_or((1, 0), |p| (p.dims.dp(), p.coords.dp_rank));
    let mine: Vec<&Request> = requests.iter().skip(dp_rank).step_by(dp).collect();
    let (outs, prefill, decode) = match peers.and_then(|p| p.sp_roll.map(|c| (p, c))) {
        Some((p, comm)) => {
            let mut engine =
                ShardedEngine::new(model, comm, ecfg, p.schedule)?.with_detokenizer(detok.clone());
            for r in &mine {
                engine
                    .add_group(r.ids.to_vec(), g, r.params.clone())
                    .with_context(|| format!("{at}: prompt {}", r.name))?;
            }
            let outs = engine.run().with_context(|| format!("{at}: rollout"))?;
            let st = engine.stats().engine;
            (outs, st.prefill_tokens, st.decode_tokens)
        }
        None => {
            let mut engine =
                crate::device::rollout_engine(gpu, model, ecfg)?.with_detokenizer(detok.clone());
            for r in &mine {
                engine
                    .add_group(r.ids.to_vec(), g, r.params.clone())
                    .with_context(|| format!("{at}: prompt {}", r.name))?;
            }
            let outs = engine.run().with_context(|| format!("{at}: rollout"))?;
            let st = engine.stats();
            (outs, st.prefill_tokens, st.decode_tokens)
        }
    };
    let local: Responses = outs
        .into_iter()
        .map(|o| o.samples.into_iter().map(|s| s.ids).collect())
        .collect();
    let Some(p) = peers else {
        return Ok((local, prefill, decode));
    };
    let mut counts = [prefill as f32, decode as f32];
    p.dp.all_reduce_sum(&mut counts)
        .with_context(|| format!("{at}: rollout counters"))?;
    let gathered = gather_groups(p.dp, &local, model.config.vocab_size)
        .with_context(|| format!("{at}: gathering the rollouts over the dp group"))?;
    // Replica d's j-th group is request d + j·dp.
    let mut all = vec![Vec::new(); requests.len()];
    for (d, groups) in gathered.into_iter().enumerate() {
        for (j, grp) in groups.into_iter().enumerate() {
            all[d + j * dp] = grp;
        }
    }
    Ok((all, counts[0] as u64, counts[1] as u64))
}

/// All-gathers each rank's groups (samples' ids) over `comm`: rank-major result.
fn gather_groups<C: Communicator>(
    comm: &C,
    groups: &Responses,
    vocab: usize,
) -> Result<Vec<Responses>> {
    if vocab >= 1 << 24 {
        bail!("a vocabulary of {vocab} tokens does not travel exactly as f32");
    }
    // [groups, then per group: samples, then per sample: length, ids…]
    let mut flat = vec![groups.len() as f32];
    for grp in groups {
        flat.push(grp.len() as f32);
        for s in grp {
            flat.push(s.len() as f32);
            flat.extend(s.iter().map(|&t| t as f32));
        }
    }
    let w = comm.world_size();
    let mut lens = vec![0.0f32; w];
    comm.all_gather(&[flat.len() as f32], &mut lens)?;
    let max = lens.iter().fold(0.0f32, |m, &x| m.max(x)) as usize;
    flat.resize(max, 0.0);
    let mut all = vec![0.0f32; w * max];
    comm.all_gather(&flat, &mut all)?;
    let mut out = Vec::with_capacity(w);
    for r in 0..w {
        let mut it = all[r * max..(r + 1) * max].iter().map(|&x| x as usize);
        let mut next = || it.next().context("a truncated rollout message");
        let n_groups = next()?;
        let mut groups = Vec::with_capacity(n_groups);
        for _ in 0..n_groups {
            let n_samples = next()?;
            let mut grp = Vec::with_capacity(n_samples);
            for _ in 0..n_samples {
                let len = next()?;
                grp.push(
                    (0..len)
                        .map(|_| next().map(|t| t as u32))
                        .collect::<Result<_>>()?,
                );
            }
            groups.push(grp);
        }
        out.push(groups);
    }
    Ok(out)
}

/// This rank's rows of a micro-batch: its token shard under sp (positions global, padding
/// unlabelled, each sequence's whole response length kept for seq-mean-token-mean; packed rows
/// are cut like plain ones, the rank's labelled positions mapped into the loss's layout).
pub(crate) fn shard_rows<C: Communicator>(
    rows: &Rows,
    peers: Option<&Peers<'_, C>>,
    pad: u32,
) -> Result<Rows> {
    let Some((sp, r)) = peers.and_then(|p| p.sp.map(|sp| (sp, p.coords.sp_rank))) else {
        return Ok(rows.clone());
    };
    let (b, t) = (rows.b, rows.t);
    let sh = sp.set_seq_len(t)?;
    let (lb, lt, mask) = rows.loss_rows();
    let seq_tokens = (0..lb)
        .map(|i| mask[i * lt..(i + 1) * lt].iter().filter(|&&m| m).count())
        .collect();
    let (positions, packed) = match &rows.packed {
        Some((pk, _)) => (
            sh.shard(&rows.positions, b, 1, r, 0)?,
            Some((pk.clone(), pk.layout_for(Some(&sh), r, lb, lt)?)),
        ),
        None => {
            let row = sh.positions(r)?;
            ((0..b).flat_map(|_| row.iter().copied()).collect(), None)
        }
    };
    Ok(Rows {
        tokens: sh.shard(&rows.tokens, b, 1, r, pad)?,
        targets: sh.shard(&rows.targets, b, 1, r, IGNORE_INDEX)?,
        positions,
        mask: sh.shard(&rows.mask, b, 1, r, false)?,
        advantages: rows.advantages.clone(),
        b,
        t: sh.local_len(),
        global_t: t,
        seq_tokens: Some(seq_tokens),
        packed,
    })
}

/// The attention to run `rows` with: `SpAttention` announced the rows' global length (and
/// their packed layout), or the single-rank kernel (the shared-prefix one for packed rows).
pub(crate) fn attention<'a, 'p: 'a, C: Communicator + 'p>(
    rows: &'a Rows,
    peers: Option<&'a Peers<'p, C>>,
) -> Result<&'a dyn AttentionOp> {
    match (peers.and_then(|p| p.sp), &rows.packed) {
        (Some(sp), packed) => {
            sp.set_seq_len(rows.global_t)?;
            if let Some((pk, _)) = packed {
                sp.set_packed(pk.layout.clone())?;
            }
            Ok(sp)
        }
        (None, Some((pk, _))) => Ok(&pk.attn),
        (None, None) => Ok(&LocalAttention),
    }
}

/// Whether micro-batch `j` of a mini-batch is this replica's.
pub(crate) fn is_mine<C: Communicator>(j: usize, peers: Option<&Peers<'_, C>>) -> bool {
    peers.is_none_or(|p| j % p.dims.dp() == p.coords.dp_rank)
}

/// Sums gradients over the world (after checking this rank's are finite) and returns the world's
/// loss sum.
pub(crate) fn reduce_update<C: Communicator>(
    peers: Option<&Peers<'_, C>>,
    grads: &mut [f32],
    loss: f64,
    at: &str,
) -> Result<f64> {
    let Some(p) = peers else {
        return Ok(loss);
    };
    if loss.is_finite() {
        if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            bail!(
                "{at}: rank {}: non-finite gradient ({} at parameter index {i}) before the \
                 all-reduce",
                p.rank,
                grads[i]
            );
        }
    }
    p.world
        .all_reduce_sum(grads)
        .with_context(|| format!("{at}: gradient all-reduce"))?;
    let hi = loss as f32;
    let mut l = [hi, (loss - hi as f64) as f32];
    p.world
        .all_reduce_sum(&mut l)
        .with_context(|| format!("{at}: loss all-reduce"))?;
    Ok(l[0] as f64 + l[1] as f64)
}

/// Every rank's metric sums merged in rank order (the same on every rank).
pub(crate) fn merge_metrics<C: Communicator>(
    peers: Option<&Peers<'_, C>>,
    m: GrpoMetrics,
    at: &str,
) -> Result<GrpoMetrics> {
    let Some(p) = peers else {
        return Ok(m);
    };
    let split = |x: f64| {
        let hi = x as f32;
        [hi, (x - hi as f64) as f32]
    };
    let mut v: Vec<f32> = Vec::with_capacity(20);
    for c in [
        m.tokens,
        m.kl_tokens,
        m.entropy_tokens,
        m.clipped_low,
        m.clipped_high,
        m.dual_clipped,
    ] {
        v.extend(split(c as f64));
    }
    for x in [m.pg_loss_sum, m.kl_sum, m.entropy_sum, m.ratio_sum] {
        v.extend(split(x));
    }
    v.push(m.ratio_min as f32);
    v.push(m.ratio_max as f32);
    let n = v.len();
    let mut all = vec![0.0f32; n * p.world.world_size()];
    p.world
        .all_gather(&v, &mut all)
        .with_context(|| format!("{at}: metrics"))?;
    let mut out = GrpoMetrics::default();
    for r in all.chunks_exact(n) {
        let f = |i: usize| r[2 * i] as f64 + r[2 * i + 1] as f64;
        let u = |i: usize| f(i).round() as usize;
        out.merge(&GrpoMetrics {
            tokens: u(0),
            kl_tokens: u(1),
            entropy_tokens: u(2),
            clipped_low: u(3),
            clipped_high: u(4),
            dual_clipped: u(5),
            pg_loss_sum: f(6),
            kl_sum: f(7),
            entropy_sum: f(8),
            ratio_sum: f(9),
            ratio_min: r[20] as f64,
            ratio_max: r[21] as f64,
        });
    }
    Ok(out)
}

/// Runs the GRPO loop on `dp × sp` in-process ranks; returns rank 0's summary.
pub(crate) fn run_ranks(cfg: &GrpoRunConfig, opts: &GrpoOptions) -> Result<GrpoSummary> {
    let par = &cfg.parallel;
    let dims = par.dims()?;
    tracing::info!(
        "GRPO on {} in-process ranks: dp {} × sp {} ({} attention)",
        dims.world(),
        dims.dp(),
        dims.sp(),
        par.schedule
    );
    let schedule = par.rollout_schedule();
    let method = if dims.sp() > 1 {
        let path = cfg.model.path.join("config.json");
        let c = Qwen2Config::from_file(&path)?;
        par.sp_method(c.num_attention_heads, c.num_key_value_heads)?
    } else {
        SpMethod::Schedule(schedule.build(1)?)
    };
    let results = InProcess::spawn(dims.world(), par.timeout(), |comm| -> Result<_> {
        let rank = comm.rank();
        let coords = dims.coords(rank)?;
        let dp = comm
            .split(coords.sp_rank, coords.dp_rank)
            .with_context(|| format!("rank {rank}: forming its data-parallel group"))?;
        let (sp_roll, sp) = if dims.sp() > 1 {
            let roll = comm
                .split(coords.dp_rank, coords.sp_rank)
                .with_context(|| format!("rank {rank}: forming its sequence-parallel group"))?;
            let group = comm
                .split(coords.dp_rank, coords.sp_rank)
                .with_context(|| format!("rank {rank}: forming its sequence-parallel group"))?;
            let attn = SpAttention::with_method(group, method.clone(), par.overlap_mode())
                .with_context(|| format!("rank {rank}: sequence-parallel attention"))?;
            (Some(roll), Some(attn))
        } else {
            (None, None)
        };
        let peers = Peers {
            rank,
            dims,
            coords,
            world: &comm,
            dp: &dp,
            sp_roll: sp_roll.as_ref(),
            sp: sp.as_ref(),
            schedule,
        };
        grpo_rank(cfg, opts, Some(&peers), None).with_context(|| format!("rank {rank}"))
    });
    let mut outs = crate::sft::all_ranks_ok(results)?;
    let sums: Vec<u64> = outs
        .iter()
        .map(|(_, m): &(GrpoSummary, Qwen2)| crate::sft::param_checksum(&m.params))
        .collect();
    if let Some(r) = sums.iter().position(|&s| s != sums[0]) {
        bail!(
            "rank {r}'s parameters differ from rank 0's at the end of the run (replicas diverged)"
        );
    }
    Ok(outs.swap_remove(0).0)
}
