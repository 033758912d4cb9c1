//! Failure handling: a rank that panics, returns an error or returns early mid-collective or
//! mid-wait makes every other rank return an error promptly (well within the timeout); a rank that
//! stays silent makes its peers time out rather than hang. Every timing is asserted.

mod common;

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reel_comm::{CommError, Communicator, InProcess, Op, P2pOp, Pending};

const TIMEOUT: Duration = Duration::from_secs(2);
/// An abort must reach every rank well within the timeout.
const PROMPT: Duration = Duration::from_secs(1);
/// Slack on top of the timeout for a wait that runs into it.
const MARGIN: Duration = Duration::from_secs(1);
/// How long the failing rank lets the others block before it fails.
const BLOCKED: Duration = Duration::from_millis(200);

/// A rank's own error type, as a trainer would have: its own failures and the communicator's.
#[derive(Debug)]
enum RankError {
    Comm(CommError),
    Model(String),
}

impl From<CommError> for RankError {
    fn from(e: CommError) -> Self {
        RankError::Comm(e)
    }
}

impl fmt::Display for RankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankError::Comm(e) => write!(f, "{e}"),
            RankError::Model(m) => write!(f, "model: {m}"),
        }
    }
}

/// How the failing rank stops.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Panic,
    Error,
}

/// A good rank and how long it waited in the call that failed.
type RankWait = (usize, Duration);

/// Every rank but `bad` runs all-reduces; `bad` joins three, then (after the others have blocked
/// in the fourth) fails. Returns each rank's result and how long each good rank waited in the
/// call that failed.
fn fail_mid_all_reduce(
    p: usize,
    bad: usize,
    how: Failure,
) -> (Vec<Result<(), RankError>>, Vec<RankWait>) {
    let waited = Mutex::new(Vec::new());
    let results = InProcess::spawn(p, TIMEOUT, |comm| -> Result<(), RankError> {
        let r = comm.rank();
        let mut buf = vec![1.0f32 + r as f32; 9];
        for _ in 0..3 {
            comm.all_reduce_sum(&mut buf)?;
        }
        if r == bad {
            std::thread::sleep(BLOCKED);
            match how {
                Failure::Panic => panic!("simulated panic on rank {r}"),
                Failure::Error => return Err(RankError::Model("simulated loss NaN".into())),
            }
        }
        let start = Instant::now();
        let out = comm.all_reduce_sum(&mut buf);
        waited.lock().unwrap().push((r, start.elapsed()));
        out?;
        Ok(())
    });
    (results, waited.into_inner().unwrap())
}

#[test]
fn a_rank_that_panics_or_fails_mid_collective_stops_every_rank_promptly() {
    for how in [Failure::Panic, Failure::Error] {
        for p in [2, 3, 4, 8] {
            let bad = p / 2;
            let start = Instant::now();
            let (results, waited) = fail_mid_all_reduce(p, bad, how);
            assert!(
                start.elapsed() < BLOCKED + PROMPT,
                "{how:?} P={p}: {:?}",
                start.elapsed()
            );
            assert_eq!(waited.len(), p - 1);
            for (r, w) in waited {
                assert!(w < BLOCKED + PROMPT, "{how:?} P={p} rank {r} waited {w:?}");
            }
            for (r, res) in results.iter().enumerate() {
                match (r == bad, how, res) {
                    (
                        true,
                        Failure::Panic,
                        Err(RankError::Comm(CommError::Panicked { rank, message })),
                    ) => {
                        assert_eq!(*rank, bad);
                        assert!(message.contains("simulated panic"), "{message}");
                    }
                    (true, Failure::Error, Err(RankError::Model(_))) => {}
                    (
                        false,
                        _,
                        Err(RankError::Comm(CommError::PeerFailed {
                            op,
                            rank,
                            peer,
                            reason,
                        })),
                    ) => {
                        assert_eq!((*op, *rank, *peer), (Op::AllReduce, r, bad));
                        let expected = match how {
                            Failure::Panic => "simulated panic",
                            Failure::Error => "simulated loss NaN",
                        };
                        assert!(reason.contains(expected), "{reason}");
                    }
                    _ => panic!("{how:?} P={p} rank {r}: {res:?}"),
                }
            }
        }
    }
}

#[test]
fn a_rank_that_fails_while_others_wait_on_batches_stops_them_promptly() {
    let p = 4;
    let results = InProcess::spawn(p, TIMEOUT, |comm| -> Result<Duration, RankError> {
        let r = comm.rank();
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        let batch = comm.start(vec![
            P2pOp::send(next, 0, vec![r as f32; 4]),
            P2pOp::recv(prev, 0, 4),
            P2pOp::recv(prev, 1, 4), // never sent: only the abort can end this wait
        ])?;
        if r == 1 {
            std::thread::sleep(BLOCKED);
            return Err(RankError::Model("simulated failure".into()));
        }
        let start = Instant::now();
        let out = batch.wait();
        let waited = start.elapsed();
        match out {
            Err(CommError::PeerFailed {
                op: Op::Recv,
                peer: 1,
                ..
            }) => Ok(waited),
            other => panic!("rank {r}: {other:?}"),
        }
    });
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(waited) => assert!(waited < BLOCKED + PROMPT, "rank {r} waited {waited:?}"),
            Err(RankError::Model(_)) => assert_eq!(r, 1),
            Err(e) => panic!("rank {r}: {e}"),
        }
    }
}

#[test]
fn a_rank_that_returns_early_fails_its_peers_promptly() {
    let p = 3;
    let start = Instant::now();
    let results = InProcess::spawn(p, TIMEOUT, |comm| {
        if comm.rank() == 1 {
            return Ok(());
        }
        let mut buf = vec![2.0f32; 6];
        comm.all_reduce_sum(&mut buf)
    });
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
    assert!(results[1].is_ok(), "{results:?}");
    for r in [0, 2] {
        assert!(
            matches!(
                &results[r],
                Err(CommError::PeerExited {
                    op: Op::AllReduce,
                    peer: 1,
                    ..
                }) | Err(CommError::PeerFailed {
                    op: Op::AllReduce,
                    ..
                })
            ),
            "rank {r}: {:?}",
            results[r]
        );
    }
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(CommError::PeerExited { .. }))),
        "{results:?}"
    );
}

#[test]
fn a_silent_rank_makes_its_peers_time_out() {
    // Rank 2 neither fails nor calls: it computes for longer than the timeout.
    let p = 3;
    let results = InProcess::spawn(p, TIMEOUT, |comm| -> Result<Duration, CommError> {
        if comm.rank() == 2 {
            std::thread::sleep(TIMEOUT + MARGIN + Duration::from_millis(500));
            return Ok(Duration::ZERO);
        }
        let start = Instant::now();
        let mut buf = vec![3.0f32; 6];
        match comm.all_reduce_sum(&mut buf) {
            Ok(()) => panic!("all_reduce succeeded without rank 2"),
            Err(e) => {
                let waited = start.elapsed();
                assert!(
                    waited < TIMEOUT + MARGIN,
                    "rank {} waited {waited:?}: {e}",
                    comm.rank()
                );
                Err(e)
            }
        }
    });
    assert!(results[2].is_ok());
    // Rank 0 waits on rank 2 and rank 1 on rank 0 (stuck behind rank 2), both since the start:
    // whichever deadline passes first times out and its abort ends the other's wait.
    let mut timeouts = 0;
    for (r, res) in results[..2].iter().enumerate() {
        match res {
            Err(CommError::Timeout {
                op: Op::AllReduce,
                rank,
                peer,
                waited,
            }) => {
                timeouts += 1;
                assert_eq!((*rank, *peer), (r, [2, 0][r]));
                assert!(
                    *waited >= TIMEOUT && *waited < TIMEOUT + MARGIN,
                    "{waited:?}"
                );
            }
            Err(CommError::PeerFailed {
                op: Op::AllReduce,
                rank,
                peer,
                reason,
            }) => {
                assert_eq!((*rank, *peer), (r, 1 - r));
                assert!(reason.contains("timed out"), "{reason}");
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
    assert!(timeouts >= 1, "{results:?}");
}

#[test]
fn an_unanswered_receive_times_out() {
    let short = Duration::from_millis(300);
    let results = InProcess::spawn(2, short, |comm| {
        if comm.rank() == 0 {
            std::thread::sleep(short * 3);
            return Ok(Duration::ZERO);
        }
        let start = Instant::now();
        let out = comm.recv(0, 0, 4);
        assert!(start.elapsed() < short + MARGIN, "{:?}", start.elapsed());
        out.map(|_| start.elapsed())
    });
    match &results[1] {
        Err(CommError::Timeout {
            op: Op::Recv,
            rank: 1,
            peer: 0,
            waited,
        }) => {
            assert!(*waited >= short, "{waited:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn calls_after_an_abort_fail_at_once() {
    let results = InProcess::spawn(2, TIMEOUT, |comm| -> Result<(), RankError> {
        if comm.rank() == 0 {
            return Err(RankError::Model("stop".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        let group = comm.split(0, 0);
        assert!(matches!(
            group,
            Err(CommError::PeerFailed {
                op: Op::Split,
                peer: 0,
                ..
            })
        ));
        // Even a call that needs nobody else (a message to itself) fails.
        let send_self = comm.start(vec![P2pOp::send(1, 0, vec![1.0])]);
        assert!(matches!(
            send_self,
            Err(CommError::PeerFailed { op: Op::Send, .. })
        ));
        let mut buf = [1.0f32];
        let reduce = comm.all_reduce_sum(&mut buf);
        assert!(matches!(
            reduce,
            Err(CommError::PeerFailed {
                op: Op::AllReduce,
                ..
            })
        ));
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        Err(reduce.unwrap_err().into())
    });
    assert!(matches!(results[0], Err(RankError::Model(_))));
    assert!(matches!(
        results[1],
        Err(RankError::Comm(CommError::PeerFailed { .. }))
    ));
}

#[test]
fn a_failed_call_stops_every_rank_before_its_rank_returns() {
    // Rank 1's all-gather is refused locally; rank 1 then lingers (say, writing a report) longer
    // than an abort may take. The others, blocked in the ring, must not wait for it to return.
    let linger = Duration::from_millis(1500);
    let waited = Mutex::new(Vec::new());
    let results = InProcess::spawn(4, TIMEOUT, |comm| {
        let r = comm.rank();
        let mut recv = vec![0.5f32; if r == 1 { 7 } else { 8 }];
        let start = Instant::now();
        let out = comm.all_gather(&[r as f32, 1.0], &mut recv);
        waited.lock().unwrap().push((r, start.elapsed()));
        if r == 1 {
            std::thread::sleep(linger);
        }
        out
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
    for r in [0, 2, 3] {
        match &results[r] {
            Err(CommError::PeerFailed {
                op: Op::AllGather,
                peer: 1,
                ..
            }) => {}
            other => panic!("rank {r}: {other:?}"),
        }
    }
    for (r, w) in waited.into_inner().unwrap() {
        assert!(w < PROMPT, "rank {r} waited {w:?}");
    }
}
