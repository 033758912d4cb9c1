//! Every collective at world sizes 1, 2, 3, 4 and 8 against a plain single-thread computation on
//! the same per-rank inputs, at lengths that do and do not divide by the world size; outputs are
//! poisoned with NaN first. Rank code is written generic over `Communicator`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{all_ok, assert_close, input, poisoned, TIMEOUT, WORLD_SIZES};
use reel_comm::{CommError, Communicator, InProcess, Op};

/// Lengths of the reduced buffers: shorter than the world, odd, and a multiple of 8.
const LENGTHS: [usize; 4] = [1, 5, 37, 64];

fn rank_all_reduce<C: Communicator>(comm: &C, seed: u64, n: usize) -> Result<Vec<f32>, CommError> {
    let mut buf = input(seed, comm.rank(), n);
    comm.all_reduce_sum(&mut buf)?;
    Ok(buf)
}

#[test]
fn all_reduce_matches_single_thread_sum() {
    for p in WORLD_SIZES {
        for (seed, n) in LENGTHS.into_iter().enumerate() {
            let seed = seed as u64;
            let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
                rank_all_reduce(&comm, seed, n)
            }));
            let mut expected = vec![0.0f32; n];
            for r in 0..p {
                for (e, x) in expected.iter_mut().zip(input(seed, r, n)) {
                    *e += x;
                }
            }
            for (r, g) in got.iter().enumerate() {
                assert_close(&format!("all_reduce P={p} n={n} rank {r}"), g, &expected);
                // Every chunk is summed once and copied: ranks agree to the bit.
                let same = g
                    .iter()
                    .zip(&got[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "P={p} n={n}: rank {r} differs from rank 0");
            }
        }
    }
}

#[test]
fn all_gather_is_rank_major() {
    for p in WORLD_SIZES {
        for n in [1, 6, 33] {
            let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
                let send = input(1, comm.rank(), n);
                let mut recv = poisoned(p * n);
                comm.all_gather(&send, &mut recv)?;
                Ok(recv)
            }));
            let expected: Vec<f32> = (0..p).flat_map(|r| input(1, r, n)).collect();
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g, &expected, "all_gather P={p} n={n} rank {r}");
            }
        }
    }
}

#[test]
fn reduce_scatter_matches_single_thread_sum() {
    for p in WORLD_SIZES {
        for n in [1, 7, 16] {
            let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
                let send = input(2, comm.rank(), p * n);
                let mut recv = poisoned(n);
                comm.reduce_scatter_sum(&send, &mut recv)?;
                Ok(recv)
            }));
            let mut total = vec![0.0f32; p * n];
            for r in 0..p {
                for (t, x) in total.iter_mut().zip(input(2, r, p * n)) {
                    *t += x;
                }
            }
            for (r, g) in got.iter().enumerate() {
                let what = format!("reduce_scatter P={p} n={n} rank {r}");
                assert_close(&what, g, &total[r * n..(r + 1) * n]);
            }
        }
    }
}

#[test]
fn all_to_all_transposes_chunks() {
    for p in WORLD_SIZES {
        for m in [1, 3, 8] {
            let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
                let send = input(3, comm.rank(), p * m);
                let mut recv = poisoned(p * m);
                comm.all_to_all(&send, &mut recv)?;
                Ok(recv)
            }));
            for (r, g) in got.iter().enumerate() {
                // Chunk q of rank r's output is chunk r of rank q's input.
                let expected: Vec<f32> = (0..p)
                    .flat_map(|q| input(3, q, p * m)[r * m..(r + 1) * m].to_vec())
                    .collect();
                assert_eq!(g, &expected, "all_to_all P={p} m={m} rank {r}");
            }
        }
    }
}

#[test]
fn broadcast_copies_the_root_from_every_root() {
    for p in WORLD_SIZES {
        for root in 0..p {
            let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
                let mut buf = if comm.rank() == root {
                    input(4, root, 19)
                } else {
                    poisoned(19)
                };
                comm.broadcast(&mut buf, root)?;
                Ok(buf)
            }));
            for (r, g) in got.iter().enumerate() {
                assert_eq!(
                    g,
                    &input(4, root, 19),
                    "broadcast P={p} root {root} rank {r}"
                );
            }
        }
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    for p in WORLD_SIZES {
        let arrived = AtomicUsize::new(0);
        all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
            // Later ranks arrive later; nobody may leave before the last one arrives.
            std::thread::sleep(Duration::from_millis(15 * comm.rank() as u64));
            arrived.fetch_add(1, Ordering::SeqCst);
            comm.barrier()?;
            let seen = arrived.load(Ordering::SeqCst);
            assert_eq!(
                seen,
                p,
                "P={p}: rank {} left the barrier early",
                comm.rank()
            );
            Ok(())
        }));
    }
}

#[test]
fn collectives_in_sequence_stay_matched() {
    // Different collectives back to back, each depending on the last; a message matched to the
    // wrong call would change the result.
    for p in WORLD_SIZES {
        let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
            let r = comm.rank();
            let mut acc = input(5, r, 10);
            for i in 0..5 {
                comm.all_reduce_sum(&mut acc)?;
                comm.barrier()?;
                acc.iter_mut().for_each(|x| *x += (r + 1) as f32);
                comm.broadcast(&mut acc, i % p)?;
                acc.iter_mut().for_each(|x| *x *= 0.5);
            }
            Ok(acc)
        }));
        // Single-thread replay: after the all-reduce every rank holds the same sum.
        let mut acc = vec![0.0f32; 10];
        for r in 0..p {
            for (a, x) in acc.iter_mut().zip(input(5, r, 10)) {
                *a += x;
            }
        }
        for i in 0..5 {
            if i > 0 {
                acc.iter_mut().for_each(|x| *x *= p as f32);
            }
            acc.iter_mut()
                .for_each(|x| *x = 0.5 * (*x + (i % p + 1) as f32));
        }
        for (r, g) in got.iter().enumerate() {
            assert_close(&format!("sequence P={p} rank {r}"), g, &acc);
        }
    }
}

#[test]
fn bad_sizes_are_refused_without_hanging() {
    // Wrong on one rank alone: InvalidArgument there, PeerFailed on the others.
    let results = InProcess::spawn(3, TIMEOUT, |comm| {
        let n = if comm.rank() == 1 { 4 } else { 5 };
        let mut recv = poisoned(3 * 5);
        comm.all_gather(&vec![1.0; n], &mut recv)
    });
    assert!(
        matches!(
            &results[1],
            Err(CommError::InvalidArgument {
                op: Op::AllGather,
                rank: 1,
                ..
            })
        ),
        "{:?}",
        results[1]
    );
    for r in [0, 2] {
        assert!(
            matches!(&results[r], Err(CommError::PeerFailed { peer: 1, .. })),
            "{results:?}"
        );
    }

    // Consistent on each rank but not across ranks: the receivers see a length mismatch.
    let results = InProcess::spawn(2, TIMEOUT, |comm| {
        let mut buf = vec![1.0; 4 + comm.rank()];
        comm.all_reduce_sum(&mut buf)
    });
    let mismatch = results.iter().any(|r| {
        matches!(
            r,
            Err(CommError::Mismatch {
                op: Op::AllReduce,
                ..
            })
        )
    });
    assert!(mismatch, "{results:?}");
    assert!(results.iter().all(Result::is_err), "{results:?}");

    // Different collectives on different ranks: the receiving rank names both (the root of a
    // broadcast only sends, so it cannot tell).
    let results = InProcess::spawn(2, TIMEOUT, |comm| {
        if comm.rank() == 0 {
            comm.all_reduce_sum(&mut [1.0, 2.0])
        } else {
            let mut buf = [3.0, 4.0];
            comm.broadcast(&mut buf, 1)?;
            // Stay until rank 0 has looked (a send to an exited rank fails as `PeerExited`).
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        }
    });
    match &results[0] {
        Err(CommError::Mismatch {
            op: Op::AllReduce,
            rank: 0,
            peer: 1,
            detail,
        }) => {
            assert!(detail.contains("broadcast"), "{detail}")
        }
        other => panic!("{other:?}"),
    }

    let results = InProcess::spawn(2, TIMEOUT, |comm| comm.broadcast(&mut [1.0], 2));
    assert!(matches!(
        &results[0],
        Err(CommError::InvalidArgument {
            op: Op::Broadcast,
            ..
        }) | Err(CommError::PeerFailed { .. })
    ));
    assert!(results.iter().all(Result::is_err), "{results:?}");
}
