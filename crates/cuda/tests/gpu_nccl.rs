//! NCCL communicator tests, multi-process: each test re-executes this test binary once per rank
//! through `reel_comm::launch` (RANK, WORLD_SIZE, LOCAL_RANK, REEL_RENDEZVOUS), one GPU per rank,
//! and checks values against a plain computation of every rank's deterministic inputs (exact in
//! f32), the same checks the in-process backend's tests make. Opt-in:
//!
//!     REEL_GPU_TESTS=1 NCCL_NVLS_ENABLE=0 cargo test -p reel-cuda --release --test gpu_nccl -- --test-threads=1 --nocapture
//!
//! `REEL_NCCL_WORLDS` (default `1,2`) lists the world sizes. Without `REEL_GPU_TESTS=1` each test
//! prints "skipped" and passes.

mod common;
use common::launch::{launch_or_run, worlds, SCENARIO};

use std::time::{Duration, Instant};

use reel_comm::{CommError, Communicator, Op, P2pOp, Pending};
use reel_cuda::NcclComm;

const TIMEOUT: Duration = Duration::from_secs(60);

fn comm(timeout: Duration) -> NcclComm {
    NcclComm::from_env(timeout).unwrap_or_else(|e| panic!("NCCL init: {e}"))
}

/// Rank `r`'s input: small multiples of 0.25, so every sum is exact in f32.
fn input(seed: usize, r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((r * 31 + i * 7 + seed * 13) % 17) as f32 * 0.25 - 2.0)
        .collect()
}

fn assert_exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g == w, "{what}: element {i}: got {g}, want {w}");
    }
}

#[test]
fn nccl_collectives_match_plain_sums() {
    if !launch_or_run("nccl_collectives_match_plain_sums", 29610, &worlds()) {
        return;
    }
    let c = comm(TIMEOUT);
    let (p, r) = (c.world_size(), c.rank());
    eprintln!("rank {r} of {p}: {c:?}");
    for (seed, n) in [1usize, 5, 37, 64, 1000].into_iter().enumerate() {
        let what = |op: &str| format!("{op} n={n} rank {r} of {p}");
        let all: Vec<Vec<f32>> = (0..p).map(|q| input(seed, q, n)).collect();
        let sum: Vec<f32> = (0..n).map(|i| all.iter().map(|v| v[i]).sum()).collect();

        let mut buf = all[r].clone();
        c.all_reduce_sum(&mut buf).unwrap();
        assert_exact(&buf, &sum, &what("all_reduce"));
        let mut d = c.upload(&all[r]).unwrap();
        c.all_reduce_sum_dev(&mut d).unwrap();
        assert_exact(&c.download(&d).unwrap(), &sum, &what("all_reduce_dev"));

        let gathered: Vec<f32> = all.concat();
        let mut g = vec![f32::NAN; p * n];
        c.all_gather(&all[r], &mut g).unwrap();
        assert_exact(&g, &gathered, &what("all_gather"));
        let s = c.upload(&all[r]).unwrap();
        let mut dg = c.upload(&vec![f32::NAN; p * n]).unwrap();
        c.all_gather_dev(&s, &mut dg).unwrap();
        assert_exact(
            &c.download(&dg).unwrap(),
            &gathered,
            &what("all_gather_dev"),
        );

        // Reduce-scatter of [P, n] inputs: chunk r of the sum.
        let big: Vec<Vec<f32>> = (0..p).map(|q| input(seed + 7, q, p * n)).collect();
        let want: Vec<f32> = (0..n)
            .map(|i| big.iter().map(|v| v[r * n + i]).sum())
            .collect();
        let mut chunk = vec![f32::NAN; n];
        c.reduce_scatter_sum(&big[r], &mut chunk).unwrap();
        assert_exact(&chunk, &want, &what("reduce_scatter"));
        let s = c.upload(&big[r]).unwrap();
        let mut dc = c.upload(&vec![f32::NAN; n]).unwrap();
        c.reduce_scatter_sum_dev(&s, &mut dc).unwrap();
        assert_exact(
            &c.download(&dc).unwrap(),
            &want,
            &what("reduce_scatter_dev"),
        );

        // All-to-all: chunk q of rank r's result is chunk r of rank q's input.
        let want: Vec<f32> = (0..p)
            .flat_map(|q| big[q][r * n..(r + 1) * n].to_vec())
            .collect();
        let mut a = vec![f32::NAN; p * n];
        c.all_to_all(&big[r], &mut a).unwrap();
        assert_exact(&a, &want, &what("all_to_all"));
        let s = c.upload(&big[r]).unwrap();
        let mut da = c.upload(&vec![f32::NAN; p * n]).unwrap();
        c.all_to_all_dev(&s, &mut da).unwrap();
        assert_exact(&c.download(&da).unwrap(), &want, &what("all_to_all_dev"));

        let root = p - 1;
        let mut b = if r == root {
            all[r].clone()
        } else {
            vec![f32::NAN; n]
        };
        c.broadcast(&mut b, root).unwrap();
        assert_exact(&b, &all[root], &what("broadcast"));
        let mut db = c.upload(&input(seed, r, n)).unwrap();
        c.broadcast_dev(&mut db, 0).unwrap();
        assert_exact(&c.download(&db).unwrap(), &all[0], &what("broadcast_dev"));
        c.barrier().unwrap();
    }
    // Byte counters follow reel_comm::stats' convention.
    c.reset_stats();
    let mut buf = vec![1.0f32; 12];
    c.all_reduce_sum(&mut buf).unwrap();
    c.all_reduce_sum(&mut buf).unwrap();
    let (s, rv) = reel_comm::stats::convention_bytes(Op::AllReduce, 12, p, r, 0);
    let st = c.stats().all_reduce;
    assert_eq!((st.calls, st.bytes_sent, st.bytes_recv), (2, 2 * s, 2 * rv));
    assert_exact(&buf, &[(p * p) as f32; 12], "all_reduce twice");
    // Bad arguments are refused on this rank alone, before any NCCL call.
    let e = c.all_gather(&[1.0; 3], &mut [0.0; 5]).unwrap_err();
    assert!(
        matches!(
            e,
            CommError::InvalidArgument {
                op: Op::AllGather,
                ..
            }
        ),
        "{e}"
    );
    let e = c.broadcast(&mut [0.0; 2], p).unwrap_err();
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
    c.barrier().unwrap();
}

#[test]
fn nccl_p2p_tags_split_and_mismatch() {
    if !launch_or_run("nccl_p2p_tags_split_and_mismatch", 29630, &worlds()) {
        return;
    }
    let c = comm(TIMEOUT);
    let (p, r) = (c.world_size(), c.rank());
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    // A ring exchange, posted for steps 0 and 1 before waiting on either; two tags per step and a
    // message to itself.
    let mut batches = Vec::new();
    for step in 0..2u64 {
        let ops = vec![
            P2pOp::send(next, 10 + step, input(step as usize, r, 5)),
            P2pOp::send(next, 20 + step, input(step as usize + 3, r, 3)),
            P2pOp::send(r, 30, vec![r as f32; 2]),
            P2pOp::recv(prev, 10 + step, 5),
            P2pOp::recv(prev, 20 + step, 3),
            P2pOp::recv(r, 30, 2),
        ];
        batches.push(c.start(ops).unwrap());
    }
    for (step, b) in batches.into_iter().enumerate() {
        let got = b.wait().unwrap();
        assert_exact(&got[0], &input(step, prev, 5), "ring message, tag 10+step");
        assert_exact(
            &got[1],
            &input(step + 3, prev, 3),
            "ring message, tag 20+step",
        );
        assert_exact(&got[2], &[r as f32; 2], "message to itself");
    }
    let st = c.stats();
    assert_eq!(st.send.calls, 6);
    let remote = if p > 1 { 2 * (5 + 3) * 4 } else { 0 };
    assert_eq!((st.send.bytes_sent, st.recv.bytes_recv), (remote, remote));

    // Split: one group with keys reversed (ranks swap places), and singletons.
    let rev = c.split(0, p - 1 - r).unwrap();
    assert_eq!((rev.rank(), rev.world_size()), (p - 1 - r, p));
    assert_eq!(rev.global_rank(), r);
    let mut v = vec![r as f32 + 1.0; 3];
    rev.all_reduce_sum(&mut v).unwrap();
    assert_exact(
        &v,
        &[(p * (p + 1) / 2) as f32; 3],
        "all_reduce on the reversed group",
    );
    let mut g = vec![f32::NAN; p];
    rev.all_gather(&[r as f32], &mut g).unwrap();
    let want: Vec<f32> = (0..p).rev().map(|q| q as f32).collect();
    assert_exact(&g, &want, "all_gather on the reversed group");
    let alone = c.split(r, 0).unwrap();
    assert_eq!((alone.rank(), alone.world_size()), (0, 1));
    let mut v = vec![2.5f32; 4];
    alone.all_reduce_sum(&mut v).unwrap();
    assert_exact(&v, &[2.5; 4], "singleton all_reduce");
    assert_eq!(
        c.stats().all_reduce.calls,
        0,
        "sub-groups count their own traffic"
    );
    drop(alone);
    drop(rev);

    // Breaking the ordering rule is reported, not delivered: rank 1 expects tag 2 first.
    if p == 2 {
        c.barrier().unwrap();
        if r == 0 {
            let b = c
                .start(vec![
                    P2pOp::send(1, 1, vec![1.0; 4]),
                    P2pOp::send(1, 2, vec![2.0; 4]),
                ])
                .unwrap();
            b.wait().unwrap();
        } else {
            let b = c
                .start(vec![P2pOp::recv(0, 2, 4), P2pOp::recv(0, 1, 4)])
                .unwrap();
            let e = b.wait().unwrap_err();
            assert!(
                matches!(
                    e,
                    CommError::Mismatch {
                        op: Op::Recv,
                        peer: 0,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains("expected tag 2, the peer sent tag 1"),
                "{e}"
            );
            // The communicator is aborted: later calls fail at once.
            let e = c.barrier().unwrap_err();
            assert!(matches!(e, CommError::PeerFailed { .. }), "{e}");
        }
    }
}

#[test]
fn nccl_rank_exiting_early_fails_the_others_in_time() {
    if !launch_or_run(
        "nccl_rank_exiting_early_fails_the_others_in_time",
        29650,
        &[2],
    ) {
        return;
    }
    let timeout = Duration::from_secs(5);
    let c = comm(timeout);
    c.barrier().unwrap();
    if c.rank() == 1 {
        // Leaves without taking part in the next all-reduce.
        std::process::exit(0);
    }
    let t = Instant::now();
    let mut buf = vec![1.0f32; 1 << 20];
    let e = c.all_reduce_sum(&mut buf).unwrap_err();
    let waited = t.elapsed();
    eprintln!("rank 0 failed after {waited:.1?}: {e}");
    assert!(
        matches!(e, CommError::Timeout { .. } | CommError::PeerFailed { .. }),
        "{e}"
    );
    assert!(waited < timeout + Duration::from_secs(5), "{waited:?}");
    let e = c.barrier().unwrap_err();
    assert!(matches!(e, CommError::PeerFailed { .. }), "{e}");
}

/// All-reduce bus bandwidth of a 256 MiB f32 device buffer (`REEL_NCCL_BENCH=1`; a measurement,
/// no threshold): bus bandwidth = 2·(P−1)/P · bytes / time, as nccl-tests reports it.
#[test]
fn nccl_all_reduce_bus_bandwidth() {
    if std::env::var("REEL_NCCL_BENCH").as_deref() != Ok("1") && std::env::var(SCENARIO).is_err() {
        eprintln!("skipped: set REEL_NCCL_BENCH=1 (and REEL_GPU_TESTS=1) to measure");
        return;
    }
    if !launch_or_run("nccl_all_reduce_bus_bandwidth", 29670, &[2]) {
        return;
    }
    let c = comm(TIMEOUT);
    let p = c.world_size();
    let n = (256usize << 20) / 4;
    let mut d = c.upload(&vec![1.0f32; n]).unwrap();
    for _ in 0..5 {
        c.all_reduce_sum_dev(&mut d).unwrap();
    }
    let iters = 20;
    c.barrier().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        c.all_reduce_sum_dev(&mut d).unwrap();
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    let bytes = (n * 4) as f64;
    let bus = 2.0 * (p as f64 - 1.0) / p as f64 * bytes / secs / 1e9;
    println!(
        "reel NCCL all_reduce 256 MiB f32, world {p}, rank {}: {:.3} ms, algbw {:.1} GB/s, busbw {bus:.1} GB/s",
        c.rank(),
        secs * 1e3,
        bytes / secs / 1e9
    );
    let v = c.download(&d).unwrap();
    assert_eq!(
        v[0],
        (p as f32).powi(25),
        "values after 25 all-reduces of ones"
    );
}
