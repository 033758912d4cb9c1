//! Sub-groups from `split`: a world of 8 as dp 2 × sp 4 (sequence-parallel groups of consecutive
//! ranks, data-parallel groups across them), collectives and point-to-point inside each group,
//! interleaved with world collectives, against single-thread results.

mod common;

use common::{all_ok, assert_close, input, poisoned, TIMEOUT};
use reel_comm::{CommError, Communicator, InProcess};

const DP: usize = 2;
const SP: usize = 4;

#[test]
fn world_of_8_splits_into_dp2_x_sp4() {
    let n = 6;
    let got = all_ok(InProcess::spawn(DP * SP, TIMEOUT, |world| {
        let r = world.rank();
        let sp = world.split(r / SP, r)?;
        let dp = world.split(r % SP, r)?;
        let ranks = (sp.rank(), sp.world_size(), dp.rank(), dp.world_size());
        let members = (sp.members().to_vec(), dp.members().to_vec());

        // sp: all-gather of this rank's block, then a ring shift by one inside the group.
        let mut gathered = poisoned(SP * n);
        sp.all_gather(&input(20, r, n), &mut gathered)?;
        let (next, prev) = ((sp.rank() + 1) % SP, (sp.rank() + SP - 1) % SP);
        sp.send(next, 0, input(21, r, n))?;
        let shifted = sp.recv(prev, 0, n)?;

        // A world collective in between must not mix with the groups' messages.
        let mut everyone = input(22, r, n);
        world.all_reduce_sum(&mut everyone)?;

        // dp: gradient all-reduce.
        let mut grad = input(23, r, n);
        dp.all_reduce_sum(&mut grad)?;
        Ok((ranks, members, gathered, shifted, everyone, grad))
    }));

    let sum_over = |seed: u64, ranks: &[usize]| {
        let mut s = vec![0.0f32; n];
        for &q in ranks {
            for (a, x) in s.iter_mut().zip(input(seed, q, n)) {
                *a += x;
            }
        }
        s
    };
    let all: Vec<usize> = (0..DP * SP).collect();
    for (r, (ranks, members, gathered, shifted, everyone, grad)) in got.iter().enumerate() {
        let (d, s) = (r / SP, r % SP);
        assert_eq!(*ranks, (s, SP, d, DP), "rank {r}");
        let sp_members: Vec<usize> = (0..SP).map(|j| d * SP + j).collect();
        let dp_members: Vec<usize> = (0..DP).map(|j| j * SP + s).collect();
        assert_eq!(
            members,
            &(sp_members.clone(), dp_members.clone()),
            "rank {r}"
        );
        let expected: Vec<f32> = sp_members.iter().flat_map(|&q| input(20, q, n)).collect();
        assert_eq!(gathered, &expected, "sp all_gather rank {r}");
        assert_eq!(
            shifted,
            &input(21, sp_members[(s + SP - 1) % SP], n),
            "rank {r}"
        );
        assert_close(
            &format!("world all_reduce {r}"),
            everyone,
            &sum_over(22, &all),
        );
        assert_close(
            &format!("dp all_reduce {r}"),
            grad,
            &sum_over(23, &dp_members),
        );
    }
}

#[test]
fn split_orders_by_key_then_rank_and_nests() {
    let got = all_ok(InProcess::spawn(6, TIMEOUT, |world| {
        let r = world.rank();
        // Two groups by parity, ranked in reverse; then each group split again into pairs.
        let half = world.split(r % 2, 100 - r)?;
        let pair = half.split(half.rank() / 2, 0)?;
        let mut v = vec![r as f32 + 0.5];
        pair.all_reduce_sum(&mut v)?;
        Ok((
            half.members().to_vec(),
            half.rank(),
            pair.members().to_vec(),
            v[0],
        ))
    }));
    for (r, (half, half_rank, pair, v)) in got.iter().enumerate() {
        let expected_half = if r % 2 == 0 {
            vec![4, 2, 0]
        } else {
            vec![5, 3, 1]
        };
        assert_eq!(half, &expected_half, "rank {r}");
        assert_eq!(half[*half_rank], r);
        let expected_pair: Vec<usize> = expected_half
            .chunks(2)
            .find(|c| c.contains(&r))
            .unwrap()
            .to_vec();
        assert_eq!(pair, &expected_pair, "rank {r}");
        let sum: f32 = expected_pair.iter().map(|&q| q as f32 + 0.5).sum();
        assert_eq!(*v, sum, "rank {r}");
    }
}

#[test]
fn a_failure_inside_a_group_stops_the_other_groups() {
    let results = InProcess::spawn(
        4,
        std::time::Duration::from_secs(2),
        |world| -> Result<(), CommError> {
            let r = world.rank();
            let group = world.split(r / 2, r)?;
            if r == 3 {
                return Err(CommError::InvalidArgument {
                    op: reel_comm::Op::Barrier,
                    rank: 3,
                    detail: "simulated failure".into(),
                });
            }
            // Group 0 keeps working until the world aborts; it must not wait for a timeout.
            let start = std::time::Instant::now();
            loop {
                let mut v = [1.0f32];
                match group.all_reduce_sum(&mut v) {
                    Ok(()) => std::thread::sleep(std::time::Duration::from_millis(1)),
                    Err(e) => {
                        assert!(start.elapsed() < std::time::Duration::from_secs(1), "{e}");
                        return Err(e);
                    }
                }
            }
        },
    );
    for (r, res) in results.iter().enumerate() {
        match res {
            Err(CommError::PeerFailed { peer: 3, .. }) => assert_ne!(r, 3),
            Err(CommError::InvalidArgument { rank: 3, .. }) => assert_eq!(r, 3),
            other => panic!("rank {r}: {other:?}"),
        }
    }
}
