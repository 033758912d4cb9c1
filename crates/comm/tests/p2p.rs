//! Batched point-to-point: a ring pass that posts step t+1's messages before computing step t,
//! waits in any order, tags, buffered sends, self-messages and refused arguments.

mod common;

use std::time::Duration;

use common::{all_ok, input, TIMEOUT, WORLD_SIZES};
use reel_comm::{CommError, Communicator, InProcess, Op, P2pOp, Pending};

/// Ring pass (ring attention's loop): at step t rank r holds the block of rank `r − t`, starts
/// sending it on and receiving the next one, "computes" on it, then waits. Returns the blocks in
/// the order they were held and the running "compute" result.
fn ring_pass<C: Communicator>(comm: &C, n: usize) -> Result<(Vec<Vec<f32>>, f32), CommError> {
    let (p, r) = (comm.world_size(), comm.rank());
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    let mut current = input(10, r, n);
    let mut held = Vec::new();
    let mut acc = 0.0f32;
    for t in 0..p {
        let pending = if t + 1 < p {
            Some(comm.start(vec![
                P2pOp::send(next, 0, current.clone()),
                P2pOp::recv(prev, 0, n),
            ])?)
        } else {
            None
        };
        acc += current.iter().sum::<f32>(); // this step's compute, overlapped with the messages
        held.push(std::mem::take(&mut current));
        if let Some(pending) = pending {
            current = pending.wait()?.pop().expect("one receive");
        }
    }
    Ok((held, acc))
}

#[test]
fn ring_exchange_with_batched_ops() {
    for p in WORLD_SIZES {
        let n = 13;
        let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| ring_pass(&comm, n)));
        let total: f32 = (0..p).map(|q| input(10, q, n).iter().sum::<f32>()).sum();
        for (r, (held, acc)) in got.iter().enumerate() {
            assert_eq!(held.len(), p);
            for (t, block) in held.iter().enumerate() {
                assert_eq!(
                    block,
                    &input(10, (r + p - t) % p, n),
                    "P={p} rank {r} step {t}"
                );
            }
            assert!(
                (acc - total).abs() <= 1e-4 * total.abs().max(1.0),
                "P={p} rank {r}"
            );
        }
    }
}

#[test]
fn waits_in_any_order_match_in_posting_order() {
    for p in [2, 3, 4, 8] {
        let got = all_ok(InProcess::spawn(p, TIMEOUT, |comm| {
            let r = comm.rank();
            // One batch per peer, posted in rank order, before anyone has sent.
            let batches: Vec<_> = (0..p)
                .filter(|&q| q != r)
                .map(|q| Ok((q, comm.start(vec![P2pOp::recv(q, 5, 3)])?)))
                .collect::<Result<_, CommError>>()?;
            std::thread::sleep(Duration::from_millis(10));
            for q in (0..p).filter(|&q| q != r) {
                comm.send(q, 5, vec![r as f32, q as f32, 0.5])?;
            }
            // Wait newest first.
            let mut from = vec![Vec::new(); p];
            for (q, batch) in batches.into_iter().rev() {
                from[q] = batch.wait()?.remove(0);
            }
            Ok(from)
        }));
        for (r, from) in got.iter().enumerate() {
            for (q, msg) in from.iter().enumerate().filter(|&(q, _)| q != r) {
                assert_eq!(
                    msg,
                    &vec![q as f32, r as f32, 0.5],
                    "P={p} rank {r} from {q}"
                );
            }
        }
    }

    // Two receives from the same peer and tag: the first posted gets the first message whichever
    // is waited on first; a batch dropped without waiting still takes its message.
    let got = all_ok(InProcess::spawn(2, TIMEOUT, |comm| {
        if comm.rank() == 0 {
            for k in 1..=4 {
                comm.send(1, 9, vec![k as f32; 2])?;
            }
            return Ok(Vec::new());
        }
        let first = comm.start(vec![P2pOp::recv(0, 9, 2)])?;
        let second = comm.start(vec![P2pOp::recv(0, 9, 2)])?;
        drop(comm.start(vec![P2pOp::recv(0, 9, 2)])?);
        let fourth = comm.start(vec![P2pOp::recv(0, 9, 2)])?;
        let b = second.wait()?.remove(0);
        let d = fourth.wait()?.remove(0);
        let a = first.wait()?.remove(0);
        Ok(vec![a, b, d])
    }));
    assert_eq!(got[1], vec![vec![1.0; 2], vec![2.0; 2], vec![4.0; 2]]);
}

#[test]
fn tags_keep_messages_apart() {
    let got = all_ok(InProcess::spawn(2, TIMEOUT, |comm| {
        if comm.rank() == 0 {
            comm.start(vec![
                P2pOp::send(1, 7, vec![7.0; 3]),
                P2pOp::send(1, 3, vec![3.0; 2]),
                P2pOp::send(1, 7, vec![77.0; 3]),
            ])?
            .wait()?;
            Ok(Vec::new())
        } else {
            // Tag 3 first, though it was sent second; the two tag-7 messages in order.
            comm.start(vec![
                P2pOp::recv(0, 3, 2),
                P2pOp::recv(0, 7, 3),
                P2pOp::recv(0, 7, 3),
            ])?
            .wait()
        }
    }));
    assert_eq!(got[1], vec![vec![3.0; 2], vec![7.0; 3], vec![77.0; 3]]);
}

#[test]
fn sends_do_not_wait_for_the_receiver() {
    // Both ranks send a large message and many small ones before either receives: with
    // rendezvous sends this would deadlock.
    let n = 1 << 20;
    let got = all_ok(InProcess::spawn(2, TIMEOUT, |comm| {
        let r = comm.rank();
        let peer = 1 - r;
        comm.send(peer, 0, input(11, r, n))?;
        for k in 0..100 {
            comm.send(peer, 1, vec![k as f32])?;
        }
        let big = comm.recv(peer, 0, n)?;
        let small: Vec<f32> = (0..100)
            .map(|_| comm.recv(peer, 1, 1).map(|v| v[0]))
            .collect::<Result<_, _>>()?;
        Ok((big, small))
    }));
    for (r, (big, small)) in got.iter().enumerate() {
        assert_eq!(big, &input(11, 1 - r, n));
        assert_eq!(small, &(0..100).map(|k| k as f32).collect::<Vec<_>>());
    }
}

#[test]
fn messages_to_self_arrive() {
    let got = all_ok(InProcess::spawn(3, TIMEOUT, |comm| {
        let r = comm.rank();
        comm.start(vec![
            P2pOp::send(r, 2, vec![r as f32; 4]),
            P2pOp::recv(r, 2, 4),
        ])?
        .wait()
    }));
    for (r, got) in got.iter().enumerate() {
        assert_eq!(got, &vec![vec![r as f32; 4]]);
    }
}

#[test]
fn wrong_peer_or_length_is_reported() {
    let results = InProcess::spawn(2, TIMEOUT, |comm| {
        comm.start(vec![P2pOp::send(2, 0, vec![1.0])]).map(|_| ())
    });
    for (r, res) in results.iter().enumerate() {
        assert!(
            matches!(
                res,
                Err(CommError::InvalidArgument { op: Op::Send, .. })
                    | Err(CommError::PeerFailed { .. })
            ),
            "rank {r}: {res:?}"
        );
    }
    assert!(results
        .iter()
        .any(|r| matches!(r, Err(CommError::InvalidArgument { .. }))));

    let results = InProcess::spawn(2, TIMEOUT, |comm| {
        if comm.rank() == 0 {
            comm.send(1, 0, vec![1.0; 5])?;
            comm.barrier()
        } else {
            comm.recv(0, 0, 4).map(|_| ())
        }
    });
    match &results[1] {
        Err(CommError::Mismatch {
            op: Op::Recv,
            rank: 1,
            peer: 0,
            detail,
        }) => {
            assert!(detail.contains("expected 4 values, got 5"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&results[0], Err(CommError::PeerFailed { peer: 1, .. })),
        "{results:?}"
    );
}
