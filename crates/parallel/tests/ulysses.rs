//! `UlyssesAttention` on in-process ranks: pure Ulysses (u = P) and the 2-D hybrid (u × r),
//! causal and full, T divisible and not divisible by P, each rank holding only its token shard,
//! against one whole-sequence kernel call (out, lse, dq, dk, dv); refused head counts; bytes per
//! rank from the communicators' counters against the formula.
//!
//! Byte convention (reel_comm::stats): payload bytes that leave a rank; an all-to-all of a
//! `[u, c]` buffer sends (u−1)·c floats; a ring message sends its payload. Sent = received here.

use std::time::Duration;

use reel_comm::{Communicator, InProcess};
use reel_kernels::attention::{attention_backward, attention_forward, AttnMask, AttnShape};
use reel_parallel::{
    Causality, Pass, Sharding, UlyssesAttention, UlyssesBytes, UlyssesError, UlyssesGrid,
    UlyssesGroups,
};
use reel_tensor::{check_close, rng, uniform_vec, Tolerance};

const TOL: Tolerance = Tolerance::new(1e-5, 1e-5);
const TIMEOUT: Duration = Duration::from_secs(10);
const H: usize = 8;
const D: usize = 4;
const B: usize = 2;

struct Case {
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn case(t: usize, h_kv: usize, seed: u64) -> Case {
    let shape = AttnShape {
        b: B,
        tq: t,
        tk: t,
        h: H,
        h_kv,
        d: D,
    };
    let mut r = rng(seed);
    Case {
        shape,
        q: uniform_vec(&mut r, B * t * H * D, 1.5),
        k: uniform_vec(&mut r, B * t * h_kv * D, 1.5),
        v: uniform_vec(&mut r, B * t * h_kv * D, 1.0),
        dout: uniform_vec(&mut r, B * t * H * D, 1.0),
    }
}

/// Global out, lse, dq, dk, dv.
type Results = [Vec<f32>; 5];

/// One whole-sequence call of each kernel.
fn reference(c: &Case, causality: Causality) -> Results {
    let mask = match causality {
        Causality::Causal => AttnMask::Causal {
            q_offset: 0,
            k_offset: 0,
        },
        Causality::Full => AttnMask::Full,
    };
    let s = c.shape;
    let mut out = vec![f32::NAN; c.q.len()];
    let mut lse = vec![f32::NAN; s.b * s.tq * s.h];
    attention_forward(&mut out, &mut lse, &c.q, &c.k, &c.v, s, mask);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; c.q.len()],
        vec![0.0; c.k.len()],
        vec![0.0; c.v.len()],
    );
    attention_backward(
        &mut dq, &mut dk, &mut dv, &c.dout, &c.q, &c.k, &c.v, &out, &lse, s, mask,
    );
    [out, lse, dq, dk, dv]
}

/// What a rank returns: its local out, lse, dq, dk, dv and the bytes it sent in each pass.
struct RankOut {
    local: Results,
    fwd: UlyssesBytes,
    bwd: UlyssesBytes,
}

fn sent<C: Communicator>(groups: &UlyssesGroups<C>) -> UlyssesBytes {
    UlyssesBytes {
        all_to_all: groups.ulysses_comm().stats().all_to_all.bytes_sent,
        ring: groups.ring_comm().stats().send.bytes_sent,
    }
}

/// Forward then backward on every rank, each holding its shard (padding NaN, outputs poisoned
/// with NaN); returns every rank's outputs and bytes.
fn run(c: &Case, grid: UlyssesGrid, causality: Causality) -> (UlyssesAttention, Vec<RankOut>) {
    let attn = UlyssesAttention::new(grid, c.shape, causality).unwrap();
    let sh = attn.sharding();
    let (qw, kw) = (H * D, c.shape.h_kv * D);
    let results = InProcess::spawn(grid.ranks(), TIMEOUT, |world| {
        let r = world.rank();
        let cut = |x: &[f32], w: usize| sh.shard(x, B, w, r, f32::NAN).unwrap();
        let (q, k, v, dout) = (
            cut(&c.q, qw),
            cut(&c.k, kw),
            cut(&c.v, kw),
            cut(&c.dout, qw),
        );
        let groups = UlyssesGroups::split(&world, grid)?;
        assert_eq!(groups.rank(), r);
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; q.len() / D];
        attn.forward(&groups, &mut out, &mut lse, &q, &k, &v)?;
        let fwd = sent(&groups);
        groups.reset_stats();
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; q.len()],
            vec![f32::NAN; k.len()],
            vec![f32::NAN; v.len()],
        );
        attn.backward(
            &groups, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
        )?;
        let bwd = sent(&groups);
        Ok::<_, UlyssesError>(RankOut {
            local: [out, lse, dq, dk, dv],
            fwd,
            bwd,
        })
    });
    let ranks = results
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{grid:?}: {e}"));
    (attn, ranks)
}

/// Unshards every rank's outputs, checks padded rows (out 0, lse −inf, grads 0) and compares with
/// the whole-sequence reference.
fn check(what: &str, c: &Case, sh: &Sharding, ranks: &[RankOut], want: &Results) {
    let widths = [H * D, H, H * D, c.shape.h_kv * D, c.shape.h_kv * D];
    let names = ["out", "lse", "dq", "dk", "dv"];
    for (i, name) in names.iter().enumerate() {
        for (r, ro) in ranks.iter().enumerate() {
            let mask = sh.valid_mask(r).unwrap();
            let w = widths[i];
            for bi in 0..B {
                for (row, &valid) in mask.iter().enumerate() {
                    let x = &ro.local[i][(bi * sh.local_len() + row) * w..][..w];
                    if !valid {
                        let pad = if i == 1 { f32::NEG_INFINITY } else { 0.0 };
                        assert!(
                            x.iter().all(|&e| e == pad),
                            "{what} {name} rank {r} pad row"
                        );
                    }
                }
            }
        }
        let shards: Vec<&[f32]> = ranks.iter().map(|ro| ro.local[i].as_slice()).collect();
        let got = sh.unshard(&shards, B, widths[i]).unwrap();
        check_close(&format!("{what} {name}"), &got, &want[i], TOL).unwrap();
    }
}

/// Bytes each rank sent, against `planned_bytes_sent`.
fn check_planned_bytes(what: &str, attn: &UlyssesAttention, ranks: &[RankOut]) {
    for (r, ro) in ranks.iter().enumerate() {
        assert_eq!(
            ro.fwd,
            attn.planned_bytes_sent(r, Pass::Forward),
            "{what} rank {r} fwd"
        );
        assert_eq!(
            ro.bwd,
            attn.planned_bytes_sent(r, Pass::Backward),
            "{what} rank {r} bwd"
        );
    }
}

const CAUSALITIES: [Causality; 2] = [Causality::Causal, Causality::Full];

/// Pure Ulysses (u = P, r = 1): P ∈ {1, 2, 4}, H = 8, H_kv ∈ {8, 4, 2} with P | H_kv, causal and
/// full, T ∈ {32, 37} (37: padded rows on the last rank), B = 2.
#[test]
fn ulysses_matches_one_call() {
    let mut seed = 0;
    for t in [32, 37] {
        for h_kv in [8, 4, 2] {
            seed += 1;
            let c = case(t, h_kv, seed);
            for causality in CAUSALITIES {
                let want = reference(&c, causality);
                assert!(want[3].iter().any(|&x| x.abs() > 1e-3));
                for p in [1, 2, 4].into_iter().filter(|p| h_kv % p == 0) {
                    let grid = UlyssesGrid::new(p, 1).unwrap();
                    let what = format!("Ulysses P={p} T={t} H_kv={h_kv} {causality:?}");
                    let (attn, ranks) = run(&c, grid, causality);
                    check(&what, &c, &attn.sharding(), &ranks, &want);
                    check_planned_bytes(&what, &attn, &ranks);
                    assert!(ranks.iter().all(|ro| ro.fwd.ring == 0 && ro.bwd.ring == 0));
                }
            }
        }
    }
}

/// The hybrid: (u, r) ∈ {(2, 2), (2, 3), (4, 2), (1, 4)}, H_kv ∈ {2, 4} where u | H_kv (so
/// (4, 2) runs with H_kv = 4; H_kv = 2 on it is refused), causal and full, T ∈ {32, 37}.
#[test]
fn hybrid_matches_one_call() {
    let mut seed = 100;
    for t in [32, 37] {
        for h_kv in [2, 4] {
            seed += 1;
            let c = case(t, h_kv, seed);
            for causality in CAUSALITIES {
                let want = reference(&c, causality);
                for (u, r) in [(2, 2), (2, 3), (4, 2), (1, 4)] {
                    let grid = UlyssesGrid::new(u, r).unwrap();
                    if h_kv % u != 0 {
                        assert!(matches!(
                            UlyssesAttention::new(grid, c.shape, causality),
                            Err(UlyssesError::KvHeads { .. })
                        ));
                        continue;
                    }
                    let what = format!("hybrid {u}×{r} T={t} H_kv={h_kv} {causality:?}");
                    let (attn, ranks) = run(&c, grid, causality);
                    check(&what, &c, &attn.sharding(), &ranks, &want);
                    check_planned_bytes(&what, &attn, &ranks);
                }
            }
        }
    }
}

/// Sequences shorter than the ranks: whole ranks, even whole ring groups, are padding.
#[test]
fn short_sequences_with_empty_ranks() {
    for t in [1, 3, 5] {
        let c = case(t, 2, 200 + t as u64);
        for causality in CAUSALITIES {
            let want = reference(&c, causality);
            for (u, r) in [(2, 1), (2, 3), (1, 4), (2, 4)] {
                let grid = UlyssesGrid::new(u, r).unwrap();
                let what = format!("{u}×{r} T={t} {causality:?}");
                let (attn, ranks) = run(&c, grid, causality);
                check(&what, &c, &attn.sharding(), &ranks, &want);
                check_planned_bytes(&what, &attn, &ranks);
            }
        }
    }
}

/// P ∤ H_kv is refused before any communication, with a message naming the numbers and the way
/// out; the suggested hybrid then runs.
#[test]
fn refuses_p_not_dividing_h_kv() {
    let c = case(16, 2, 300);
    let e = UlyssesAttention::new(UlyssesGrid::new(4, 1).unwrap(), c.shape, Causality::Causal)
        .unwrap_err();
    assert_eq!(
        e,
        UlyssesError::KvHeads {
            ulysses: 4,
            ring: 1,
            h: 8,
            h_kv: 2
        }
    );
    let msg = e.to_string();
    for part in [
        "P = 4",
        "h_kv = 2",
        "h = 8",
        "2-D hybrid",
        "UlyssesGrid::new(2, 2)",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }
    let e = UlyssesAttention::new(UlyssesGrid::new(4, 2).unwrap(), c.shape, Causality::Full)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("u = 4 ranks per all-to-all group (P = 8 = 4 × 2)"),
        "{e}"
    );
    assert!(e.to_string().contains("UlyssesGrid::new(2, 4)"), "{e}");
    // MQA over any P > 1: only a plain ring is left.
    let mqa = AttnShape { h_kv: 1, ..c.shape };
    let e =
        UlyssesAttention::new(UlyssesGrid::new(2, 1).unwrap(), mqa, Causality::Causal).unwrap_err();
    assert!(e.to_string().contains("UlyssesGrid::new(1, 2)"), "{e}");
    // The suggestion works.
    let want = reference(&c, Causality::Causal);
    let (attn, ranks) = run(&c, UlyssesGrid::new(2, 2).unwrap(), Causality::Causal);
    check("suggested 2×2", &c, &attn.sharding(), &ranks, &want);
}

/// A communicator of the wrong size and mismatched buffers are refused with the numbers named.
#[test]
fn refuses_wrong_world_and_lengths() {
    let c = case(8, 4, 301);
    let grid = UlyssesGrid::new(2, 2).unwrap();
    let attn = UlyssesAttention::new(grid, c.shape, Causality::Causal).unwrap();
    let res = InProcess::spawn(3, TIMEOUT, |world| {
        UlyssesGroups::split(&world, grid).map(|_| ())
    });
    for r in res {
        assert_eq!(
            r.unwrap_err().to_string(),
            "ulysses: u × r = 2 × 2 = 4 ranks, but the communicator has 3"
        );
    }
    let res = InProcess::spawn(4, TIMEOUT, |world| {
        let groups = UlyssesGroups::split(&world, grid)?;
        let l = attn.sharding().local_len();
        let q = vec![0.0; B * l * H * D];
        let kv = vec![0.0; B * l * 4 * D];
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; B * l * H - 1];
        attn.forward(&groups, &mut out, &mut lse, &q, &kv, &kv)
    });
    // The first rank to refuse aborts the world; the others report its message.
    let errs: Vec<UlyssesError> = res.into_iter().map(|r| r.unwrap_err()).collect();
    assert!(errs.iter().any(|e| matches!(
        e,
        UlyssesError::Length {
            name: "lse",
            len: 31,
            expected: 32,
            ..
        }
    )));
    for e in &errs {
        assert!(
            e.to_string().contains("lse has 31 elements, expected 32"),
            "{e}"
        );
    }
    assert_eq!(
        UlyssesGrid::new(2, 0),
        Err(UlyssesError::ZeroDegree { name: "r" })
    );
}

/// Bytes sent per rank, measured by the communicators' counters, against the closed form with
/// L = T/P (T divisible, so every ring chunk is full), f32:
/// - all-to-all forward  4·(u−1)/u·B·L·(2·H·D + 2·H_kv·D + H)
/// - all-to-all backward 4·(u−1)/u·B·L·(3·H·D + 4·H_kv·D + 2·H)
/// - ring forward  8·(r−1)·B·L·H_kv·D; ring backward 8·(2r−1)·B·L·H_kv·D (0 when r = 1).
///
/// And the DESIGN.md check: pure Ulysses with H_kv = H moves 4·N·d/P floats each way (q, k, v, o;
/// d = H·D, N = T) times (P−1)/P, plus lse.
#[test]
fn bytes_match_the_formula() {
    let t = 48;
    for (u, r, h_kv) in [
        (1, 1, 8),
        (2, 1, 8),
        (4, 1, 8),
        (4, 1, 4),
        (2, 2, 2),
        (2, 3, 2),
        (1, 4, 2),
        (4, 2, 4),
    ] {
        let c = case(t, h_kv, 400);
        let grid = UlyssesGrid::new(u, r).unwrap();
        let (attn, ranks) = run(&c, grid, Causality::Causal);
        let l = t / (u * r);
        let (h, d) = (H as u64, D as u64);
        let (b, l, u64_, r64, hk) = (B as u64, l as u64, u as u64, r as u64, h_kv as u64);
        let a2a = |per_row: u64| 4 * (u64_ - 1) * b * l * per_row / u64_;
        let fwd = UlyssesBytes {
            all_to_all: a2a(2 * h * d + 2 * hk * d + h),
            ring: 8 * (r64 - 1) * b * l * hk * d,
        };
        let bwd = UlyssesBytes {
            all_to_all: a2a(3 * h * d + 4 * hk * d + 2 * h),
            ring: if r == 1 {
                0
            } else {
                8 * (2 * r64 - 1) * b * l * hk * d
            },
        };
        for (rank, ro) in ranks.iter().enumerate() {
            assert_eq!(
                (ro.fwd, ro.bwd),
                (fwd, bwd),
                "{u}×{r} H_kv={h_kv} rank {rank}"
            );
            assert_eq!(ro.fwd, attn.planned_bytes_sent(rank, Pass::Forward));
        }
        if r == 1 && h_kv == H && u > 1 {
            let n = (B * t) as u64;
            let per_way = 4 * (4 * n * h * d + n * h) / u64_ * (u64_ - 1) / u64_;
            assert_eq!(fwd.all_to_all, per_way, "4Nd/P·(P−1)/P + lse, u = {u}");
        }
    }
}
