//! Byte counters against the convention of `reel_comm::stats` (bytes that cross between ranks
//! under the backend's algorithm) for a known pattern of calls, reset, per-group counters and
//! serialisation.

mod common;

use common::{all_ok, poisoned, TIMEOUT};
use reel_comm::{CommStats, Communicator, InProcess, OpStats, P2pOp, Pending};

const F32: u64 = 4;

fn op(calls: u64, sent: u64, recv: u64) -> OpStats {
    OpStats {
        calls,
        bytes_sent: sent * F32,
        bytes_recv: recv * F32,
    }
}

#[test]
fn byte_counters_follow_the_documented_convention() {
    for p in [1usize, 2, 3, 4, 8] {
        let m = 5; // chunk length
        let n = p * m; // full length
        let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
            let r = comm.rank();
            let mut full = vec![1.5f32; n];
            comm.all_reduce_sum(&mut full)?;
            comm.all_reduce_sum(&mut full)?;
            let mut gathered = poisoned(n);
            comm.all_gather(&vec![2.5; m], &mut gathered)?;
            let mut chunk = poisoned(m);
            comm.reduce_scatter_sum(&full, &mut chunk)?;
            let mut swapped = poisoned(n);
            comm.all_to_all(&full, &mut swapped)?;
            let mut bc = vec![0.25f32; 7];
            comm.broadcast(&mut bc, p - 1)?;
            comm.barrier()?;
            // Point to point: 3 values to the next rank, 3 to itself (not counted as bytes).
            let next = (r + 1) % p;
            let prev = (r + p - 1) % p;
            comm.start(vec![
                P2pOp::send(next, 0, vec![1.0; 3]),
                P2pOp::send(r, 1, vec![1.0; 3]),
                P2pOp::recv(prev, 0, 3),
                P2pOp::recv(r, 1, 3),
            ])?
            .wait()?;
            let before_reset = comm.stats();
            comm.reset_stats();
            Ok((before_reset, comm.stats()))
        }));
        let p = p as u64;
        let (m, n) = (m as u64, n as u64);
        // Crossing p2p bytes only exist when the next rank is another rank.
        let ring = if p > 1 { 3 } else { 0 };
        for (r, (stats, after)) in got.iter().enumerate() {
            let root = r as u64 == p - 1;
            let expected = CommStats {
                send: op(2, ring, 0),
                recv: op(2, 0, ring),
                all_reduce: op(2, 2 * 2 * (p - 1) * m, 2 * 2 * (p - 1) * m),
                all_gather: op(1, (p - 1) * m, (p - 1) * m),
                reduce_scatter: op(1, (p - 1) * m, (p - 1) * m),
                all_to_all: op(1, (p - 1) * m, (p - 1) * m),
                broadcast: if root {
                    op(1, (p - 1) * 7, 0)
                } else {
                    op(1, 0, 7)
                },
                barrier: op(1, 0, 0),
                // The host communicators have no reduce (device groups only).
                reduce: op(0, 0, 0),
            };
            assert_eq!(stats, &expected, "P={p} rank {r} (n={n})");
            assert_eq!(after, &CommStats::default(), "P={p} rank {r} after reset");
            assert_eq!(stats.total().calls, 11);
        }
        // Everything sent was received by some rank.
        let sent: u64 = got.iter().map(|(s, _)| s.total().bytes_sent).sum();
        let recv: u64 = got.iter().map(|(s, _)| s.total().bytes_recv).sum();
        assert_eq!(sent, recv, "P={p}");
    }
}

#[test]
fn uneven_all_reduce_counts_every_chunk_but_one_per_phase() {
    // n = 10 over 4 ranks: chunks 3, 3, 2, 2. Reduce-scatter sends every chunk but r and receives
    // every chunk but r−1; all-gather sends every chunk but r+1 and receives every chunk but r.
    let (p, n) = (4usize, 10usize);
    let len = |i: usize| if i < 2 { 3u64 } else { 2 };
    let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
        comm.all_reduce_sum(&mut vec![1.0; n])?;
        Ok(comm.stats().all_reduce)
    }));
    for (r, s) in got.iter().enumerate() {
        let sent = 2 * n as u64 - len(r) - len((r + 1) % p);
        let recv = 2 * n as u64 - len((r + p - 1) % p) - len(r);
        assert_eq!(*s, op(1, sent, recv), "rank {r}");
    }
}

#[test]
fn groups_count_their_own_traffic() {
    let got = all_ok(InProcess::spawn(4, TIMEOUT, |world| {
        let r = world.rank();
        let group = world.split(r / 2, r)?;
        group.all_reduce_sum(&mut [1.0, 2.0, 3.0, 4.0])?;
        Ok((world.stats(), group.stats()))
    }));
    for (world, group) in &got {
        assert_eq!(world, &CommStats::default(), "split is not counted");
        assert_eq!(group.all_reduce, op(1, 2 * 2, 2 * 2));
    }
}

#[test]
fn stats_serialise_with_operation_names() {
    let mut stats = CommStats::default();
    stats.record(reel_comm::Op::AllToAll, 12, 8);
    stats.record(reel_comm::Op::AllToAll, 4, 0);
    let json = serde_json::to_string(&stats).unwrap();
    assert!(
        json.contains(r#""all_to_all":{"calls":2,"bytes_sent":16,"bytes_recv":8}"#),
        "{json}"
    );
    let back: CommStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stats);
    assert_eq!(stats.total(), op(2, 4, 2));
}

/// `stats::convention_bytes` (what backends that cannot count on the wire record) agrees with what
/// the in-process backend counts, uneven all-reduce chunks included.
#[test]
fn convention_bytes_match_the_counted_bytes() {
    use reel_comm::stats::convention_bytes;
    use reel_comm::Op;
    for p in [1usize, 2, 3, 4] {
        for n_ar in [1usize, 7, 12] {
            let m = 3;
            let per_rank = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
                let mut s = Vec::new();
                let mut buf = vec![1.0f32; n_ar];
                comm.all_reduce_sum(&mut buf)?;
                s.push(comm.stats().all_reduce);
                let mut g = poisoned(p * m);
                comm.all_gather(&vec![1.0; m], &mut g)?;
                s.push(comm.stats().all_gather);
                let mut c = poisoned(m);
                comm.reduce_scatter_sum(&vec![1.0; p * m], &mut c)?;
                s.push(comm.stats().reduce_scatter);
                let mut a = poisoned(p * m);
                comm.all_to_all(&vec![1.0; p * m], &mut a)?;
                s.push(comm.stats().all_to_all);
                let mut b = vec![1.0f32; 5];
                comm.broadcast(&mut b, p - 1)?;
                s.push(comm.stats().broadcast);
                Ok(s)
            }));
            for (r, s) in per_rank.iter().enumerate() {
                let cases = [
                    (Op::AllReduce, n_ar),
                    (Op::AllGather, p * m),
                    (Op::ReduceScatter, p * m),
                    (Op::AllToAll, p * m),
                    (Op::Broadcast, 5),
                ];
                for (got, (op, n)) in s.iter().zip(cases) {
                    let (sent, recv) = convention_bytes(op, n, p, r, p - 1);
                    assert_eq!(
                        (got.bytes_sent, got.bytes_recv),
                        (sent, recv),
                        "{op} p={p} n={n} rank {r}"
                    );
                }
            }
        }
    }
}

/// The reduce's convention (device groups only: no host backend runs it): every other rank
/// sends its buffer once, the root receives them all, so the world's bytes balance.
#[test]
fn the_reduce_convention_sends_each_buffer_to_the_root_once() {
    use reel_comm::stats::convention_bytes;
    use reel_comm::Op;
    assert_eq!(convention_bytes(Op::Reduce, 10, 1, 0, 0), (0, 0));
    for p in [2usize, 3, 8] {
        for root in 0..p {
            let all: Vec<(u64, u64)> = (0..p)
                .map(|r| convention_bytes(Op::Reduce, 10, p, r, root))
                .collect();
            assert_eq!(all[root], (0, 40 * (p as u64 - 1)), "p={p} root {root}");
            let sent: u64 = all.iter().map(|x| x.0).sum();
            let recv: u64 = all.iter().map(|x| x.1).sum();
            assert_eq!(sent, recv, "p={p} root {root}");
        }
    }
}
