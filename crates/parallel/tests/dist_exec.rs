//! `DistExecutor` on in-process ranks: every schedule at several world sizes, GQA ratios and
//! lengths that P does not divide, each rank holding only its shard, against one whole-sequence
//! kernel call; both overlap modes; block counts and bytes per rank; a failing rank.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reel_comm::{CommError, CommStats, Communicator, InProcess, InProcessBatch, P2pOp, Pending};
use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};
use reel_parallel::{
    block_counts, DistExecError, DistExecutor, ExecStats, Overlap, Pass, Payload, Schedule,
    ScheduleKind, Sharding, Stage,
};
use reel_tensor::{check_close, rng, uniform_vec, Tolerance};

const TOL: Tolerance = Tolerance::new(1e-5, 1e-5);
const TIMEOUT: Duration = Duration::from_secs(10);
const PS: [usize; 6] = [1, 2, 3, 4, 6, 8];

struct Case {
    b: usize,
    t: usize,
    h: usize,
    h_kv: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn case(b: usize, t: usize, h: usize, h_kv: usize, d: usize, seed: u64) -> Case {
    let mut r = rng(seed);
    Case {
        b,
        t,
        h,
        h_kv,
        d,
        q: uniform_vec(&mut r, b * t * h * d, 1.5),
        k: uniform_vec(&mut r, b * t * h_kv * d, 1.5),
        v: uniform_vec(&mut r, b * t * h_kv * d, 1.0),
        dout: uniform_vec(&mut r, b * t * h * d, 1.0),
    }
}

/// Global out, lse, dq, dk, dv `[B, T, ·]`.
#[derive(Clone, Debug, PartialEq)]
struct Results {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// One whole-sequence call of each kernel.
fn reference(c: &Case, causal: bool) -> Results {
    let shape = AttnShape {
        b: c.b,
        tq: c.t,
        tk: c.t,
        h: c.h,
        h_kv: c.h_kv,
        d: c.d,
    };
    let mask = if causal {
        AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        }
    } else {
        AttnMask::Full
    };
    let mut r = Results {
        out: vec![f32::NAN; c.q.len()],
        lse: vec![f32::NAN; c.b * c.t * c.h],
        dq: vec![0.0; c.q.len()],
        dk: vec![0.0; c.k.len()],
        dv: vec![0.0; c.v.len()],
    };
    attention_forward(&mut r.out, &mut r.lse, &c.q, &c.k, &c.v, shape, mask);
    attention_backward(
        &mut r.dq, &mut r.dk, &mut r.dv, &c.dout, &c.q, &c.k, &c.v, &r.out, &r.lse, shape, mask,
    );
    r
}

/// What one rank returns: its local out, lse, dq, dk, dv and the two passes' stats.
struct RankOut {
    local: [Vec<f32>; 5],
    fwd: ExecStats,
    bwd: ExecStats,
}

fn executor(c: &Case, schedule: &Schedule, overlap: Overlap) -> DistExecutor {
    let sh = Sharding::new(c.t, schedule.ranks, schedule.layout()).unwrap();
    let l = sh.local_len();
    let local = AttnShape {
        b: c.b,
        tq: l,
        tk: l,
        h: c.h,
        h_kv: c.h_kv,
        d: c.d,
    };
    DistExecutor::new(schedule.clone(), sh, local, overlap).unwrap()
}

/// Each rank's shard of q, k, v, dout (padding NaN: a padded row that reached a kernel would
/// poison the results).
fn shards(c: &Case, sh: &Sharding) -> Vec<[Vec<f32>; 4]> {
    let (qw, kw) = (c.h * c.d, c.h_kv * c.d);
    (0..sh.ranks())
        .map(|r| {
            let cut = |x: &[f32], w: usize| sh.shard(x, c.b, w, r, f32::NAN).unwrap();
            [
                cut(&c.q, qw),
                cut(&c.k, kw),
                cut(&c.v, kw),
                cut(&c.dout, qw),
            ]
        })
        .collect()
}

/// Forward then backward on every rank; outputs are poisoned with NaN before each call.
fn rank_pass<C: Communicator>(
    comm: &C,
    ex: &DistExecutor,
    input: &[Vec<f32>; 4],
) -> Result<RankOut, DistExecError> {
    let [q, k, v, dout] = input;
    let mut out = vec![f32::NAN; q.len()];
    let mut lse = vec![f32::NAN; q.len() / ex.local_shape().d];
    let fwd = ex.forward(comm, &mut out, &mut lse, q, k, v)?;
    let (mut dq, mut dk, mut dv) = (
        vec![f32::NAN; q.len()],
        vec![f32::NAN; k.len()],
        vec![f32::NAN; v.len()],
    );
    let bwd = ex.backward(comm, &mut dq, &mut dk, &mut dv, dout, q, k, v, &out, &lse)?;
    Ok(RankOut {
        local: [out, lse, dq, dk, dv],
        fwd,
        bwd,
    })
}

fn run(c: &Case, schedule: &Schedule, overlap: Overlap) -> Vec<RankOut> {
    let ex = executor(c, schedule, overlap);
    let inputs = shards(c, &ex.sharding());
    InProcess::spawn(schedule.ranks, TIMEOUT, |comm| {
        rank_pass(&comm, &ex, &inputs[comm.rank()])
    })
    .into_iter()
    .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
    .collect()
}

/// The ranks' outputs gathered back into `[B, T, ·]`.
fn unshard(c: &Case, sh: &Sharding, ranks: &[RankOut]) -> Results {
    let widths = [c.h * c.d, c.h, c.h * c.d, c.h_kv * c.d, c.h_kv * c.d];
    let mut all = (0..5).map(|i| {
        let parts: Vec<&[f32]> = ranks.iter().map(|r| r.local[i].as_slice()).collect();
        sh.unshard(&parts, c.b, widths[i]).unwrap()
    });
    let mut next = || all.next().unwrap();
    Results {
        out: next(),
        lse: next(),
        dq: next(),
        dk: next(),
        dv: next(),
    }
}

fn check(what: &str, got: &Results, want: &Results) {
    for (name, g, w) in [
        ("out", &got.out, &want.out),
        ("lse", &got.lse, &want.lse),
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        check_close(&format!("{what} {name}"), g, w, TOL).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Rows packed by prompt (segments that see a shared prefix and themselves, each batch row its
/// own layout, padding after them): every causal schedule at every P matches one
/// `SharedPrefixAttention` call on the whole sequence, forward and backward.
#[test]
fn packed_rows_match_shared_prefix_attention_on_one_rank() {
    use reel_model::{AttentionOp, PackedRow, SharedPrefixAttention};
    let (t, h, h_kv, d) = (41, 4, 2, 4);
    let c = case(2, t, h, h_kv, d, 77);
    let rows = vec![
        PackedRow {
            prefix: 17,
            segments: vec![6, 1, 9, 4],
        },
        PackedRow {
            prefix: 3,
            segments: vec![20, 0, 11],
        },
    ];
    let shape = AttnShape {
        b: c.b,
        tq: t,
        tk: t,
        h,
        h_kv,
        d,
    };
    let one = SharedPrefixAttention::new(rows.clone());
    let mut want = Results {
        out: vec![0.0; c.q.len()],
        lse: vec![0.0; c.b * t * h],
        dq: vec![0.0; c.q.len()],
        dk: vec![0.0; c.k.len()],
        dv: vec![0.0; c.v.len()],
    };
    one.forward(&mut want.out, &mut want.lse, &c.q, &c.k, &c.v, shape)
        .unwrap();
    let w = &mut want;
    one.backward(
        &mut w.dq, &mut w.dk, &mut w.dv, &c.dout, &c.q, &c.k, &c.v, &w.out, &w.lse, shape,
    )
    .unwrap();
    // The packed mask is not the causal one: the plain causal run differs.
    assert!(max_diff(&reference(&c, true).out, &want.out) > 1e-2);
    for kind in ScheduleKind::ALL.into_iter().filter(|k| k.is_causal()) {
        for p in [1, 2, 3, 4, 8] {
            let s = kind.build(p).unwrap();
            let mut ex = executor(&c, &s, Overlap::Overlapped);
            ex.set_packed(Some(rows.clone().into())).unwrap();
            let inputs = shards(&c, &ex.sharding());
            let got: Vec<RankOut> = InProcess::spawn(p, TIMEOUT, |comm| {
                rank_pass(&comm, &ex, &inputs[comm.rank()])
            })
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect();
            check(
                &format!("packed {kind:?} P={p}"),
                &unshard(&c, &ex.sharding(), &got),
                &want,
            );
        }
    }
    // A layout that does not fit is refused.
    let mut ex = executor(
        &c,
        &ScheduleKind::ALL[0].build(2).unwrap(),
        Overlap::Blocking,
    );
    let long = vec![
        PackedRow {
            prefix: 40,
            segments: vec![2],
        };
        2
    ];
    assert!(ex.set_packed(Some(long.into())).is_err());
    assert!(ex.set_packed(Some(rows[..1].to_vec().into())).is_err());
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every schedule, every P it supports in {1, 2, 3, 4, 6, 8}, GQA ratios 1, 2, 4, B = 2 and
/// T = 37, 50 (no P > 1 divides both; zigzag at P = 8 has all-padding chunks): out, lse, dq, dk,
/// dv gathered from the ranks match one whole-sequence call; overlapped and blocking runs are
/// bit-identical; each rank computes exactly its `block_counts` in each pass; padded rows are
/// zero (out, dq, dk, dv) and −inf (lse).
#[test]
fn every_schedule_matches_one_call() {
    let mut seed = 10;
    for t in [37, 50] {
        for h_kv in [4, 2, 1] {
            seed += 1;
            let c = case(2, t, 4, h_kv, 4, seed);
            for causal in [true, false] {
                let want = reference(&c, causal);
                assert!(want.dk.iter().any(|&x| x.abs() > 1e-3));
                assert!(want.dq.iter().any(|&x| x.abs() > 1e-3));
                for kind in ScheduleKind::ALL
                    .into_iter()
                    .filter(|k| k.is_causal() == causal)
                {
                    for p in PS {
                        let what = format!("{kind:?} P={p} T={t} H_kv={h_kv}");
                        let s = kind.build(p).unwrap();
                        let sh = Sharding::new(t, p, s.layout()).unwrap();
                        let over = run(&c, &s, Overlap::Overlapped);
                        check(&what, &unshard(&c, &sh, &over), &want);
                        let counts = block_counts(&s);
                        for (r, ro) in over.iter().enumerate() {
                            assert_eq!(ro.fwd.blocks, counts[r], "{what} rank {r} forward");
                            assert_eq!(ro.bwd.blocks, counts[r], "{what} rank {r} backward");
                            let mask = sh.valid_mask(r).unwrap();
                            let widths = [c.h * c.d, c.h, c.h * c.d, c.h_kv * c.d, c.h_kv * c.d];
                            for (i, (x, w)) in ro.local.iter().zip(widths).enumerate() {
                                // lse pads with −inf, the rest with 0.
                                let pad = if i == 1 { f32::NEG_INFINITY } else { 0.0 };
                                for (row, vals) in x.chunks_exact(w).enumerate() {
                                    if !mask[row % mask.len()] {
                                        assert!(vals.iter().all(|&v| v == pad), "{what} pad");
                                    }
                                }
                            }
                        }
                        let blocking = run(&c, &s, Overlap::Blocking);
                        for (r, (a, b)) in over.iter().zip(&blocking).enumerate() {
                            for (x, y) in a.local.iter().zip(&b.local) {
                                // Bit-identical, NaN-free (`==` would fail on NaN).
                                assert!(
                                    x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()),
                                    "{what} rank {r}: overlap modes differ"
                                );
                            }
                            assert_eq!(a.fwd.bytes_sent, b.fwd.bytes_sent);
                            assert_eq!(a.bwd.blocks, b.bwd.blocks);
                        }
                    }
                }
            }
        }
    }
}

/// Bytes each rank sends, from the schedule's messages and the valid rows of each chunk
/// (independently of the executor): KV heads only, Q forward, (Q, dO, lse, D) backward — never
/// O —, (o, lse) or dQ partials, dK/dV. Sent and received totals agree.
#[test]
fn bytes_sent_follow_the_schedule() {
    let c = case(2, 50, 4, 2, 4, 77);
    for kind in ScheduleKind::ALL {
        for p in [3, 4] {
            let s = kind.build(p).unwrap();
            let sh = Sharding::new(c.t, p, s.layout()).unwrap();
            let rows = |chunk: usize| c.b * sh.chunk_valid_len(chunk);
            let (qw, kw, h) = (c.h * c.d, c.h_kv * c.d, c.h);
            let values = |pass: Pass, payload: Payload| match (pass, payload) {
                (_, Payload::Kv { chunk }) => 2 * rows(chunk) * kw,
                (Pass::Forward, Payload::Query { chunk }) => rows(chunk) * qw,
                (Pass::Backward, Payload::Query { chunk }) => rows(chunk) * (2 * qw + 2 * h),
                (Pass::Forward, Payload::Partial { q_chunk, .. }) => rows(q_chunk) * (qw + h),
                (Pass::Backward, Payload::Partial { q_chunk, .. }) => rows(q_chunk) * qw,
                (Pass::Forward, Payload::KvGrad { .. }) => 0,
                (Pass::Backward, Payload::KvGrad { chunk }) => 2 * rows(chunk) * kw,
            };
            let expected = |pass: Pass, r: usize| -> u64 {
                s.steps
                    .iter()
                    .flat_map(|st| &st.recv)
                    .chain(&s.finish)
                    .filter(|m| m.from == r)
                    .map(|m| 4 * values(pass, m.payload) as u64)
                    .sum()
            };
            let ranks = run(&c, &s, Overlap::Overlapped);
            let ex = executor(&c, &s, Overlap::Overlapped);
            for (r, ro) in ranks.iter().enumerate() {
                let what = format!("{kind:?} P={p} rank {r}");
                assert_eq!(ro.fwd.bytes_sent, expected(Pass::Forward, r), "{what}");
                assert_eq!(ro.bwd.bytes_sent, expected(Pass::Backward, r), "{what}");
                assert_eq!(ex.planned_bytes_sent(r, Pass::Backward), ro.bwd.bytes_sent);
                assert_eq!(ex.planned_blocks(r), ro.fwd.blocks);
                if p > 1 {
                    assert!(ro.bwd.bytes_sent > 0 && ro.bwd.messages_sent > 0, "{what}");
                }
            }
            for pass in [Pass::Forward, Pass::Backward] {
                let pick = |ro: &RankOut| match pass {
                    Pass::Forward => ro.fwd,
                    Pass::Backward => ro.bwd,
                };
                let sent: u64 = ranks.iter().map(|ro| pick(ro).bytes_sent).sum();
                let recv: u64 = ranks.iter().map(|ro| pick(ro).bytes_recv).sum();
                assert_eq!(sent, recv, "{kind:?} P={p} {pass}");
            }
        }
    }
}

/// Delegates to `InProcess`, counting `start`s and batches posted but not yet waited for; its
/// `fail_at`-th `start` (0-based) returns an error (or panics).
struct Flaky {
    inner: InProcess,
    fail_at: Option<usize>,
    panic: bool,
    starts: AtomicUsize,
    outstanding: AtomicUsize,
    max_outstanding: AtomicUsize,
}

impl Flaky {
    fn new(inner: InProcess, fail_at: Option<usize>, panic: bool) -> Self {
        Flaky {
            inner,
            fail_at,
            panic,
            starts: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            max_outstanding: AtomicUsize::new(0),
        }
    }
}

struct FlakyBatch<'a> {
    inner: InProcessBatch<'a>,
    comm: &'a Flaky,
}

impl Pending for FlakyBatch<'_> {
    fn wait(self) -> Result<Vec<Vec<f32>>, CommError> {
        let got = self.inner.wait();
        self.comm.outstanding.fetch_sub(1, Ordering::SeqCst);
        got
    }
}

impl Communicator for Flaky {
    type Batch<'a> = FlakyBatch<'a>;

    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.inner.all_reduce_sum(buf)
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.inner.all_gather(send, recv)
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.inner.reduce_scatter_sum(send, recv)
    }
    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.inner.all_to_all(send, recv)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.inner.barrier()
    }
    fn start(&self, ops: Vec<P2pOp>) -> Result<FlakyBatch<'_>, CommError> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        if Some(n) == self.fail_at {
            assert!(!self.panic, "injected panic on rank {}", self.rank());
            return Err(CommError::Backend {
                rank: self.rank(),
                detail: "injected failure".into(),
            });
        }
        let inner = self.inner.start(ops)?;
        let now = self.outstanding.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_outstanding.fetch_max(now, Ordering::SeqCst);
        Ok(FlakyBatch { inner, comm: self })
    }
    fn split(&self, color: usize, key: usize) -> Result<Self, CommError> {
        Ok(Flaky::new(self.inner.split(color, key)?, None, false))
    }
    fn stats(&self) -> CommStats {
        self.inner.stats()
    }
    fn reset_stats(&self) {
        self.inner.reset_stats()
    }
}

/// A rank whose communication fails (error or panic) mid-schedule, in the forward or in the
/// backward: it reports the pass and step, and every other rank returns an error promptly (the
/// world aborts) instead of hanging until its timeout.
#[test]
fn a_failing_rank_stops_every_rank() {
    let slow = Duration::from_secs(30);
    let c = case(2, 37, 4, 2, 4, 5);
    for (kind, p, bad) in [
        (ScheduleKind::RingFull, 4, 2),
        (ScheduleKind::DistAttnCausal, 4, 1),
    ] {
        let s = kind.build(p).unwrap();
        for overlap in [Overlap::Overlapped, Overlap::Blocking] {
            let ex = executor(&c, &s, overlap);
            let inputs = shards(&c, &ex.sharding());
            // How many `start`s the bad rank makes in the forward.
            let counted = InProcess::spawn(p, TIMEOUT, |comm| {
                let r = comm.rank();
                let comm = Flaky::new(comm, None, false);
                let [q, k, v, _] = &inputs[r];
                let mut out = vec![0.0; q.len()];
                let mut lse = vec![0.0; q.len() / c.d];
                ex.forward(&comm, &mut out, &mut lse, q, k, v)?;
                Ok::<_, DistExecError>(comm.starts.load(Ordering::SeqCst))
            });
            let fwd_starts = *counted[bad].as_ref().unwrap();
            assert!(fwd_starts >= 2, "{kind:?}: {fwd_starts} starts");
            for (fail_at, pass, panic) in [
                (1, Pass::Forward, false),
                (1, Pass::Forward, true),
                (fwd_starts + 1, Pass::Backward, false),
            ] {
                let what = format!("{kind:?} P={p} {overlap:?} fail at start {fail_at}");
                let t0 = Instant::now();
                let res = InProcess::spawn(p, slow, |comm| {
                    let r = comm.rank();
                    let comm = Flaky::new(comm, (r == bad).then_some(fail_at), panic);
                    let out = rank_pass(&comm, &ex, &inputs[r])?;
                    // A collective after the pass, as a training step has: a rank whose pass
                    // needed nothing of the failed one cannot finish before the failure reaches it.
                    comm.barrier()?;
                    Ok(out)
                });
                let took = t0.elapsed();
                assert!(took < slow / 3, "{what}: took {took:?}");
                for (r, out) in res.iter().enumerate() {
                    let e = match out {
                        Ok(_) => panic!("{what}: rank {r} succeeded"),
                        Err(e) => e,
                    };
                    if r == bad && panic {
                        assert!(
                            matches!(e, DistExecError::Comm(CommError::Panicked { .. })),
                            "{what}: {e}"
                        );
                    } else if r == bad {
                        match e {
                            DistExecError::CommAt {
                                pass: got_pass,
                                stage: Stage::Step(_),
                                rank,
                                source: CommError::Backend { .. },
                            } => assert!(*got_pass == pass && *rank == bad, "{what}: {e}"),
                            _ => panic!("{what}: {e}"),
                        }
                    } else {
                        let source = e.comm_error().unwrap_or_else(|| panic!("{what}: {e}"));
                        assert!(
                            matches!(
                                source,
                                CommError::PeerFailed { .. } | CommError::PeerExited { .. }
                            ),
                            "{what}: rank {r}: {e}"
                        );
                    }
                }
            }
        }
    }
}

/// Inputs of the wrong size, a communicator of the wrong size and a shape that does not match
/// the sharding are refused with what is wrong named.
#[test]
fn refuses_bad_inputs() {
    let c = case(1, 10, 2, 1, 4, 3);
    let s = ScheduleKind::RingCausal.build(2).unwrap();
    let sh = Sharding::new(10, 2, s.layout()).unwrap();
    let bad = AttnShape {
        b: 1,
        tq: 4,
        tk: 4,
        h: 2,
        h_kv: 1,
        d: 4,
    };
    let e = DistExecutor::new(s.clone(), sh, bad, Overlap::Blocking).unwrap_err();
    assert!(e.to_string().contains("5 rows per rank"), "{e}");
    let zig = Sharding::new(10, 2, reel_parallel::Layout::Zigzag).unwrap();
    let good = AttnShape {
        tq: 5,
        tk: 5,
        ..bad
    };
    assert!(matches!(
        DistExecutor::new(s.clone(), zig, good, Overlap::Blocking),
        Err(DistExecError::Shape(_))
    ));
    let ex = executor(&c, &s, Overlap::Overlapped);
    let res = InProcess::spawn(1, TIMEOUT, |comm| {
        let mut out = vec![0.0; 10 * 8];
        let mut lse = vec![0.0; 10 * 2];
        ex.forward(&comm, &mut out, &mut lse, &c.q, &c.k, &c.v)
    });
    let e = res.into_iter().next().unwrap().unwrap_err();
    assert_eq!(
        e,
        DistExecError::WorldSize { size: 1, ranks: 2 },
        "a 1-rank group for a 2-rank schedule"
    );
    let res = InProcess::spawn(2, TIMEOUT, |comm| {
        let mut out = vec![0.0; 5 * 8];
        let mut lse = vec![0.0; 5 * 2];
        let q = vec![0.0; 5 * 8 - 1];
        let kv = vec![0.0; 5 * 4];
        ex.forward(&comm, &mut out, &mut lse, &q, &kv, &kv)
    });
    let e = res.into_iter().next().unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "distributed attention on rank 0: q has 39 elements, expected 40"
    );
}

/// Overlapped mode double-buffers: the next step's chunks are posted while the current step's
/// batch of results is still outstanding (two batches in flight); blocking mode never has more
/// than one. Both send the same bytes.
#[test]
fn overlapped_mode_keeps_two_batches_in_flight() {
    let c = case(1, 24, 2, 1, 4, 9);
    for kind in ScheduleKind::ALL {
        let s = kind.build(4).unwrap();
        let mut bytes = Vec::new();
        for overlap in [Overlap::Overlapped, Overlap::Blocking] {
            let ex = executor(&c, &s, overlap);
            let inputs = shards(&c, &ex.sharding());
            let res = InProcess::spawn(4, TIMEOUT, |comm| {
                let comm = Flaky::new(comm, None, false);
                let out = rank_pass(&comm, &ex, &inputs[comm.rank()])?;
                let max = comm.max_outstanding.load(Ordering::SeqCst);
                Ok::<_, DistExecError>((max, out.fwd.bytes_sent + out.bwd.bytes_sent))
            });
            let res: Vec<(usize, u64)> = res.into_iter().map(|r| r.unwrap()).collect();
            let max = res.iter().map(|r| r.0).max().unwrap();
            match overlap {
                Overlap::Overlapped => assert_eq!(max, 2, "{kind:?}"),
                Overlap::Blocking => assert_eq!(max, 1, "{kind:?}"),
            }
            bytes.push(res.iter().map(|r| r.1).collect::<Vec<_>>());
        }
        assert_eq!(bytes[0], bytes[1], "{kind:?}");
    }
}
