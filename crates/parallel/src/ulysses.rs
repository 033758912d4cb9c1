//! Ulysses sequence-parallel attention (DeepSpeed-Ulysses, Jacobs et al. 2023) and its 2-D hybrid
//! with a ring (USP, Fang & Zhao 2024; LoongTrain's "2D-Attention", Gu et al. 2024), forward and
//! backward, over a [`Communicator`].
//!
//! # Layout
//!
//! P = u × r ranks ([`UlyssesGrid`]). Rank `p = g·u + i` is member i of Ulysses group g (u
//! contiguous ranks, the ones an all-to-all joins: neighbouring GPUs) and position g of ring i
//! (the r ranks with the same i, stride u). Tokens are cut contiguously over the P ranks with
//! [`Sharding`] ([`Layout::Contiguous`], padded at the end to a multiple of P): rank p holds global
//! rows `[p·L, (p+1)·L)`, so group g holds the contiguous rows `[g·U, (g+1)·U)`, `U = u·L`.
//!
//! Per rank (f32): q, out, dout, dq `[B, L, H, D]`; k, v, dk, dv `[B, L, H_kv, D]`; lse `[B, L, H]`.
//! Padded rows (global row ≥ T) are never read; outputs get out = 0, lse = −inf, dq = dk = dv = 0
//! there.
//!
//! # Forward
//!
//! 1. All-to-all inside the group, one call for q ‖ k ‖ v: member j receives, from every member,
//!    its L tokens of query heads `[j·H/u, (j+1)·H/u)` and KV heads `[j·H_kv/u, (j+1)·H_kv/u)`, and
//!    keeps the valid prefix of the group's U rows (padding is the tail of the sequence), so no
//!    padded key ever reaches a kernel. GQA stays intact: query head hh reads KV head
//!    hh / (H / H_kv), and H/u = (H/H_kv)·(H_kv/u), so a member's query heads read only its own
//!    KV heads. This needs u | H_kv ([`UlyssesError::KvHeads`] otherwise).
//! 2. Ring over the r groups (plain ring, ring-flash-attention style): at step s member i of
//!    group c holds the KV of group `c − s (mod r)`, posts that KV to group c+1 and the receive of
//!    the next one before computing, computes the block (causal: the diagonal with
//!    `AttnMask::Causal` at global offsets, earlier groups in full, later ones skipped) and folds
//!    its `(o_b, lse_b)` into the running f32 `(o, lse)` with `attention_merge` (DESIGN.md
//!    "Attention math"). With r = 1 this is one kernel call over the whole sequence: pure Ulysses.
//! 3. All-to-all back, one call for out ‖ lse: each rank gets its tokens with all heads.
//!
//! # Backward
//!
//! Each rank computes D = rowsum(dO ∘ O) `[B, L, H]` of its own rows, then one all-to-all moves
//! q ‖ k ‖ v ‖ dO ‖ lse ‖ D to the head layout (D is sent in place of out: H floats a token
//! instead of H·D). The ring runs `attention_backward_with_delta` per block: KV moves as in the
//! forward, and each KV chunk's dK ‖ dV accumulator travels with it, one hop behind (a block's
//! contribution is computed into a fresh buffer, then the incoming accumulator is waited for and
//! added, and the sum is sent on), and takes a last hop home after step r−1. One all-to-all of
//! dq ‖ dk ‖ dv returns the gradients to token shards (overwritten, as `AttentionOp::backward`
//! does).
//!
//! # Communication per rank and pass (bytes sent = bytes received, [`UlyssesAttention::planned_bytes_sent`])
//!
//! With the communicator's convention (`reel_comm::stats`: payload bytes that leave this rank; an
//! all-to-all of a `[u, c]` buffer sends `(u−1)·c` floats), N = P·L padded tokens, f32:
//!
//! - forward all-to-all: `4·(u−1)/u·B·L·(2·H·D + 2·H_kv·D + H)` (in: q, k, v; out: o, lse);
//! - backward all-to-all: `4·(u−1)/u·B·L·(3·H·D + 4·H_kv·D + 2·H)` (in: q, k, v, dO, lse, D;
//!   out: dq, dk, dv);
//! - forward ring: r−1 KV chunks of `2·B·n·(H_kv/u)·D` floats (n ≤ U valid rows): with no padding
//!   `8·(r−1)·B·L·H_kv·D`;
//! - backward ring: the same KV plus r dK ‖ dV hops (none when r = 1): `8·(2r−1)·B·L·H_kv·D`.
//!
//! With H_kv = H, d = H·D and u = P this is DESIGN.md's "Ulysses 4Nd/P each way" (times
//! (P−1)/P, plus lse); with u = 1 it is the plain ring's 2N·d_kv forward and 4N·d_kv backward.
//!
//! Allocation: buffers are allocated per call (like the kernels' scratch); f32 only.

use std::fmt;

use reel_comm::{CommError, CommStats, Communicator, P2pOp, Pending};
use reel_kernels::attention::{
    attention_backward_with_delta, attention_delta, attention_forward, attention_merge, AttnMask,
    AttnShape,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::blocks::add;
use crate::dist_exec::Pass;
use crate::shard::{Layout, ShardError, Sharding};

/// Tags of the ring's point-to-point messages (on the ring's own communicator).
const TAG_KV: u64 = 0x554c_0000_0000_0000;
const TAG_DKV: u64 = TAG_KV + 1;

/// Which (query, key) pairs interact over the whole sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Causality {
    /// Token i sees tokens 0..=i.
    Causal,
    /// Every token sees every token.
    Full,
}

/// Where a communication call of a pass failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Phase {
    /// The all-to-all from token shards to head shards.
    AllToAllIn,
    /// Step `step` of the ring over groups.
    Ring { step: usize },
    /// The all-to-all back to token shards.
    AllToAllOut,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::AllToAllIn => f.write_str("all-to-all in"),
            Phase::Ring { step } => write!(f, "ring step {step}"),
            Phase::AllToAllOut => f.write_str("all-to-all out"),
        }
    }
}

/// Why Ulysses attention was refused or failed.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum UlyssesError {
    #[error("ulysses: {name} = 0, but it must be at least 1")]
    ZeroDegree { name: &'static str },
    #[error(
        "ulysses: u × r = {ulysses} × {ring} = {ranks} ranks, but the communicator has {world}"
    )]
    WorldSize {
        ulysses: usize,
        ring: usize,
        ranks: usize,
        world: usize,
    },
    /// The all-to-all degree does not divide the KV heads.
    #[error("{}", kv_heads_message(*ulysses, *ring, *h, *h_kv))]
    KvHeads {
        ulysses: usize,
        ring: usize,
        h: usize,
        h_kv: usize,
    },
    #[error("ulysses: {0}")]
    Shape(String),
    #[error("ulysses on rank {rank}: {name} has {len} elements, expected {expected}")]
    Length {
        rank: usize,
        name: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("ulysses: groups are for {groups:?}, the attention for {attention:?}")]
    GridMismatch {
        groups: UlyssesGrid,
        attention: UlyssesGrid,
    },
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A collective or ring message failed (a peer failed, timed out or exited); the world is
    /// aborted.
    #[error("ulysses {pass}, {phase}, rank {rank}: {source}")]
    CommAt {
        pass: Pass,
        phase: Phase,
        rank: usize,
        #[source]
        source: CommError,
    },
    /// A communication failure outside a pass (`split`, or `InProcess::spawn` reporting a panic).
    #[error(transparent)]
    Comm(#[from] CommError),
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn kv_heads_message(u: usize, r: usize, h: usize, h_kv: usize) -> String {
    let p = u * r;
    let best = gcd(h_kv, p).max(1);
    let what = if r == 1 {
        format!("Ulysses over P = {p} ranks needs P | h_kv")
    } else {
        format!("u = {u} ranks per all-to-all group (P = {p} = {u} × {r}) must divide h_kv")
    };
    format!(
        "ulysses: {what}, but h_kv = {h_kv} (h = {h}): each rank must hold whole KV heads after \
         the all-to-all; use the 2-D hybrid with u = {best} (divides both h_kv = {h_kv} and \
         P = {p}) × a ring of r = {} groups: UlyssesGrid::new({best}, {})",
        p / best,
        p / best
    )
}

/// `u` ranks per Ulysses (all-to-all) group × `r` groups joined by a ring; `u·r` ranks in all.
/// `UlyssesGrid::new(P, 1)` is pure Ulysses, `UlyssesGrid::new(1, P)` a plain ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct UlyssesGrid {
    ulysses: usize,
    ring: usize,
}

impl UlyssesGrid {
    /// Both degrees at least 1.
    pub fn new(ulysses: usize, ring: usize) -> Result<Self, UlyssesError> {
        if ulysses == 0 {
            return Err(UlyssesError::ZeroDegree { name: "u" });
        }
        if ring == 0 {
            return Err(UlyssesError::ZeroDegree { name: "r" });
        }
        Ok(UlyssesGrid { ulysses, ring })
    }

    /// u: ranks per all-to-all group.
    pub fn ulysses(&self) -> usize {
        self.ulysses
    }

    /// r: groups in the ring.
    pub fn ring(&self) -> usize {
        self.ring
    }

    /// P = u·r.
    pub fn ranks(&self) -> usize {
        self.ulysses * self.ring
    }

    /// `(group g, member i)` of `rank = g·u + i`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.ulysses, rank % self.ulysses)
    }

    /// Checks `h` a positive multiple of `h_kv` and `u | h_kv` (which gives `u | h`); the error
    /// for the latter suggests the largest u that works.
    pub fn check_heads(&self, h: usize, h_kv: usize) -> Result<(), UlyssesError> {
        if h_kv == 0 || !h.is_multiple_of(h_kv) {
            return Err(UlyssesError::Shape(format!(
                "h = {h} must be a positive multiple of h_kv = {h_kv}"
            )));
        }
        if !h_kv.is_multiple_of(self.ulysses) {
            return Err(UlyssesError::KvHeads {
                ulysses: self.ulysses,
                ring: self.ring,
                h,
                h_kv,
            });
        }
        Ok(())
    }
}

/// This rank's two communicators: its Ulysses group (u ranks, member index i) and its ring (r
/// ranks, group index g). Made once with [`UlyssesGroups::split`]; reused by every call.
#[derive(Debug)]
pub struct UlyssesGroups<C> {
    grid: UlyssesGrid,
    ulysses: C,
    ring: C,
}

impl<C: Communicator> UlyssesGroups<C> {
    /// Splits `world` (P = u·r ranks) into Ulysses groups of u contiguous ranks and rings of
    /// stride u. Collective: every rank of `world` calls it, in the same order as its other calls.
    pub fn split(world: &C, grid: UlyssesGrid) -> Result<Self, UlyssesError> {
        if world.world_size() != grid.ranks() {
            return Err(UlyssesError::WorldSize {
                ulysses: grid.ulysses,
                ring: grid.ring,
                ranks: grid.ranks(),
                world: world.world_size(),
            });
        }
        let (g, i) = grid.coords(world.rank());
        let ulysses = world.split(g, i)?;
        let ring = world.split(i, g)?;
        Ok(UlyssesGroups {
            grid,
            ulysses,
            ring,
        })
    }

    pub fn grid(&self) -> UlyssesGrid {
        self.grid
    }

    /// This rank in the grid: `g·u + i`.
    pub fn rank(&self) -> usize {
        self.ring.rank() * self.grid.ulysses + self.ulysses.rank()
    }

    /// The all-to-all group (u ranks).
    pub fn ulysses_comm(&self) -> &C {
        &self.ulysses
    }

    /// The ring (r ranks).
    pub fn ring_comm(&self) -> &C {
        &self.ring
    }

    /// Both communicators' counters added.
    pub fn stats(&self) -> CommStats {
        self.ulysses.stats() + self.ring.stats()
    }

    pub fn reset_stats(&self) {
        self.ulysses.reset_stats();
        self.ring.reset_stats();
    }
}

/// Bytes one rank sends in one pass, by where they go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UlyssesBytes {
    /// Both all-to-alls (the `all_to_all` counter of the Ulysses communicator).
    pub all_to_all: u64,
    /// Ring messages (the `send` counter of the ring communicator).
    pub ring: u64,
}

impl UlyssesBytes {
    pub fn total(&self) -> u64 {
        self.all_to_all + self.ring
    }
}

/// Ulysses / hybrid attention over sequences of T tokens (see the module docs). Holds only the
/// geometry; the communicators come with each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UlyssesAttention {
    grid: UlyssesGrid,
    sharding: Sharding,
    shape: AttnShape,
    causality: Causality,
}

/// Dimensions of one call.
#[derive(Clone, Copy, Debug)]
struct Geo {
    b: usize,
    t: usize,
    /// Local rows per rank (padding included).
    l: usize,
    u: usize,
    h: usize,
    h_kv: usize,
    d: usize,
    /// Query and KV heads per Ulysses member.
    hq: usize,
    hk: usize,
}

impl Geo {
    /// Rows of a group's chunk, `U = u·L`.
    fn group_rows(&self) -> usize {
        self.u * self.l
    }

    /// Valid rows of group g's chunk: a prefix of its U rows.
    fn valid(&self, g: usize) -> usize {
        self.group_rows()
            .min(self.t.saturating_sub(g * self.group_rows()))
    }

    /// Floats of group g's K ‖ V (valid rows, this member's KV heads).
    fn kv_len(&self, g: usize) -> usize {
        2 * self.b * self.valid(g) * self.hk * self.d
    }

    fn block_shape(&self, tq: usize, tk: usize) -> AttnShape {
        AttnShape {
            b: self.b,
            tq,
            tk,
            h: self.hq,
            h_kv: self.hk,
            d: self.d,
        }
    }
}

fn comm_at(pass: Pass, phase: Phase, rank: usize) -> impl FnOnce(CommError) -> UlyssesError {
    move |source| UlyssesError::CommAt {
        pass,
        phase,
        rank,
        source,
    }
}

impl UlyssesAttention {
    /// `shape` is the GLOBAL shape (`tq == tk == T`, `h` a positive multiple of `h_kv`, `d > 0`);
    /// refuses `u ∤ h_kv` with [`UlyssesError::KvHeads`].
    pub fn new(
        grid: UlyssesGrid,
        shape: AttnShape,
        causality: Causality,
    ) -> Result<Self, UlyssesError> {
        if shape.tq != shape.tk {
            return Err(UlyssesError::Shape(format!(
                "self-attention needs tq == tk, got {} and {}",
                shape.tq, shape.tk
            )));
        }
        if shape.d == 0 {
            return Err(UlyssesError::Shape("head dimension d = 0".into()));
        }
        grid.check_heads(shape.h, shape.h_kv)?;
        let sharding = Sharding::new(shape.tq, grid.ranks(), Layout::Contiguous)?;
        Ok(UlyssesAttention {
            grid,
            sharding,
            shape,
            causality,
        })
    }

    pub fn grid(&self) -> UlyssesGrid {
        self.grid
    }

    /// How tokens (and targets, positions) are cut over the P ranks: contiguous, padded at the end.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// The per-rank shape: `tq = tk = L`.
    pub fn local_shape(&self) -> AttnShape {
        let l = self.sharding.local_len();
        AttnShape {
            tq: l,
            tk: l,
            ..self.shape
        }
    }

    pub fn causality(&self) -> Causality {
        self.causality
    }

    fn geo(&self) -> Geo {
        let AttnShape { b, h, h_kv, d, .. } = self.shape;
        let u = self.grid.ulysses;
        Geo {
            b,
            t: self.shape.tq,
            l: self.sharding.local_len(),
            u,
            h,
            h_kv,
            d,
            hq: h / u,
            hk: h_kv / u,
        }
    }

    /// Payload bytes `rank` sends in one `pass` (the module docs' formulas, with the exact valid
    /// rows of each ring chunk).
    pub fn planned_bytes_sent(&self, rank: usize, pass: Pass) -> UlyssesBytes {
        let g = self.geo();
        let r = self.grid.ring;
        let (c, _) = self.grid.coords(rank);
        let per_row = match pass {
            Pass::Forward => 2 * g.h * g.d + 2 * g.h_kv * g.d + g.h,
            Pass::Backward => 3 * g.h * g.d + 4 * g.h_kv * g.d + 2 * g.h,
        };
        // The all-to-all sends u − 1 of its u equal chunks.
        let all_to_all = (g.u - 1) * (g.b * g.l * per_row / g.u);
        let held = |s: usize| g.kv_len((c + r - s) % r);
        let mut ring: usize = (0..r.saturating_sub(1)).map(held).sum();
        if pass == Pass::Backward && r > 1 {
            ring += (0..r).map(held).sum::<usize>();
        }
        UlyssesBytes {
            all_to_all: 4 * all_to_all as u64,
            ring: 4 * ring as u64,
        }
    }

    fn check_groups<C: Communicator>(
        &self,
        groups: &UlyssesGroups<C>,
    ) -> Result<usize, UlyssesError> {
        if groups.grid != self.grid {
            return Err(UlyssesError::GridMismatch {
                groups: groups.grid,
                attention: self.grid,
            });
        }
        Ok(groups.rank())
    }

    fn check_lens(
        &self,
        rank: usize,
        bufs: &[(&'static str, usize, usize)],
    ) -> Result<(), UlyssesError> {
        for &(name, len, expected) in bufs {
            if len != expected {
                return Err(UlyssesError::Length {
                    rank,
                    name,
                    len,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// Mask of the block (queries of group `c`, keys of group `j`), `None` if it is empty.
    fn block_mask(&self, c: usize, j: usize, g: &Geo) -> Option<AttnMask> {
        match self.causality {
            Causality::Full => Some(AttnMask::Full),
            Causality::Causal if j == c => Some(AttnMask::Causal {
                q_offset: c * g.group_rows(),
                k_offset: j * g.group_rows(),
            }),
            Causality::Causal if j < c => Some(AttnMask::Full),
            Causality::Causal => None,
        }
    }

    /// This rank's out `[B, L, H, D]` and lse `[B, L, H]` (overwritten) from its q `[B, L, H, D]`,
    /// k and v `[B, L, H_kv, D]`. Every rank of the grid calls it with the same geometry.
    pub fn forward<C: Communicator>(
        &self,
        groups: &UlyssesGroups<C>,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), UlyssesError> {
        let rank = self.check_groups(groups)?;
        let g = self.geo();
        let rows = g.b * g.l;
        let (nq, nk) = (rows * g.h * g.d, rows * g.h_kv * g.d);
        self.check_lens(
            rank,
            &[
                ("out", out.len(), nq),
                ("lse", lse.len(), rows * g.h),
                ("q", q.len(), nq),
                ("k", k.len(), nk),
                ("v", v.len(), nk),
            ],
        )?;
        let pass = Pass::Forward;
        let send = pack_heads(
            &[(q, g.h, g.d), (k, g.h_kv, g.d), (v, g.h_kv, g.d)],
            rows,
            g.u,
        );
        let mut recv = vec![0.0; send.len()];
        groups
            .ulysses
            .all_to_all(&send, &mut recv)
            .map_err(comm_at(pass, Phase::AllToAllIn, rank))?;
        let n = g.valid(groups.ring.rank());
        let (qw, kw) = (g.hq * g.d, g.hk * g.d);
        let [qg, mut kv, vg] = unpack_tokens(&recv, [qw, kw, kw], &g, n);
        kv.extend_from_slice(&vg);

        let (og, lseg) = self.ring_forward(&groups.ring, rank, &g, &qg, kv)?;

        let send = pack_tokens(&[(&og, qw, 0.0), (&lseg, g.hq, f32::NEG_INFINITY)], &g, n);
        let mut recv = vec![0.0; send.len()];
        groups
            .ulysses
            .all_to_all(&send, &mut recv)
            .map_err(comm_at(pass, Phase::AllToAllOut, rank))?;
        unpack_heads(&recv, &mut [(out, g.h, g.d), (lse, g.h, 1)], rows, g.u);
        Ok(())
    }

    /// Gradients of this rank's q, k, v (dq `[B, L, H, D]`, dk and dv `[B, L, H_kv, D]`,
    /// overwritten) given dout and this rank's rows of the forward's out and lse.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<C: Communicator>(
        &self,
        groups: &UlyssesGroups<C>,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
    ) -> Result<(), UlyssesError> {
        let rank = self.check_groups(groups)?;
        let g = self.geo();
        let rows = g.b * g.l;
        let (nq, nk, nl) = (rows * g.h * g.d, rows * g.h_kv * g.d, rows * g.h);
        self.check_lens(
            rank,
            &[
                ("dq", dq.len(), nq),
                ("dk", dk.len(), nk),
                ("dv", dv.len(), nk),
                ("dout", dout.len(), nq),
                ("q", q.len(), nq),
                ("k", k.len(), nk),
                ("v", v.len(), nk),
                ("out", out.len(), nq),
                ("lse", lse.len(), nl),
            ],
        )?;
        let pass = Pass::Backward;
        // D of this rank's rows (padded rows give junk D, dropped below with their lse).
        let mut delta = vec![0.0; nl];
        attention_delta(&mut delta, dout, out, self.local_shape());
        let send = pack_heads(
            &[
                (q, g.h, g.d),
                (k, g.h_kv, g.d),
                (v, g.h_kv, g.d),
                (dout, g.h, g.d),
                (lse, g.h, 1),
                (&delta, g.h, 1),
            ],
            rows,
            g.u,
        );
        let mut recv = vec![0.0; send.len()];
        groups
            .ulysses
            .all_to_all(&send, &mut recv)
            .map_err(comm_at(pass, Phase::AllToAllIn, rank))?;
        let n = g.valid(groups.ring.rank());
        let (qw, kw) = (g.hq * g.d, g.hk * g.d);
        let [qg, mut kv, vg, dog, lseg, deltag] =
            unpack_tokens(&recv, [qw, kw, kw, qw, g.hq, g.hq], &g, n);
        kv.extend_from_slice(&vg);

        let (dqg, dkv) =
            self.ring_backward(&groups.ring, rank, &g, &qg, kv, &dog, &lseg, &deltag)?;

        let (dkg, dvg) = dkv.split_at(dkv.len() / 2);
        let send = pack_tokens(&[(&dqg, qw, 0.0), (dkg, kw, 0.0), (dvg, kw, 0.0)], &g, n);
        let mut recv = vec![0.0; send.len()];
        groups
            .ulysses
            .all_to_all(&send, &mut recv)
            .map_err(comm_at(pass, Phase::AllToAllOut, rank))?;
        unpack_heads(
            &recv,
            &mut [(dq, g.h, g.d), (dk, g.h_kv, g.d), (dv, g.h_kv, g.d)],
            rows,
            g.u,
        );
        Ok(())
    }

    /// The ring over groups, forward: this member's heads of its group's queries `[B, n, H/u, D]`
    /// against every group's K ‖ V (`kv` starts as its own group's); returns f32 `(o, lse)`.
    fn ring_forward<C: Communicator>(
        &self,
        ring: &C,
        rank: usize,
        g: &Geo,
        q: &[f32],
        mut kv: Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>), UlyssesError> {
        let (r, c) = (ring.world_size(), ring.rank());
        let (next, prev) = ((c + 1) % r, (c + r - 1) % r);
        let n_c = g.valid(c);
        let mut o = vec![0.0; g.b * n_c * g.hq * g.d];
        let mut lse = vec![f32::NEG_INFINITY; g.b * n_c * g.hq];
        for s in 0..r {
            let j = (c + r - s) % r;
            let at = comm_at(Pass::Forward, Phase::Ring { step: s }, rank);
            let incoming = if s + 1 < r {
                let ops = vec![
                    P2pOp::send(next, TAG_KV, kv.clone()),
                    P2pOp::recv(prev, TAG_KV, g.kv_len((j + r - 1) % r)),
                ];
                Some(ring.start(ops).map_err(at)?)
            } else {
                None
            };
            let n_j = g.valid(j);
            if let Some(mask) = self.block_mask(c, j, g).filter(|_| n_c > 0 && n_j > 0) {
                let (k, v) = kv.split_at(kv.len() / 2);
                let shape = g.block_shape(n_c, n_j);
                if s == 0 {
                    // The diagonal block comes first: it is the running value as is.
                    attention_forward(&mut o, &mut lse, q, k, v, shape, mask);
                } else {
                    let mut o_b = vec![0.0; o.len()];
                    let mut lse_b = vec![0.0; lse.len()];
                    attention_forward(&mut o_b, &mut lse_b, q, k, v, shape, mask);
                    attention_merge(&mut o, &mut lse, &o_b, &lse_b, lse_b.len(), g.d);
                }
            }
            if let Some(batch) = incoming {
                let at = comm_at(Pass::Forward, Phase::Ring { step: s }, rank);
                kv = batch.wait().map_err(at)?.pop().unwrap_or_default();
            }
        }
        Ok((o, lse))
    }

    /// The ring over groups, backward: returns dQ of this member's query heads `[B, n, H/u, D]`
    /// and dK ‖ dV of its own group's KV, summed over every group's queries.
    #[allow(clippy::too_many_arguments)]
    fn ring_backward<C: Communicator>(
        &self,
        ring: &C,
        rank: usize,
        g: &Geo,
        q: &[f32],
        mut kv: Vec<f32>,
        dout: &[f32],
        lse: &[f32],
        delta: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), UlyssesError> {
        let (r, c) = (ring.world_size(), ring.rank());
        let (next, prev) = ((c + 1) % r, (c + r - 1) % r);
        let n_c = g.valid(c);
        let mut dq = vec![0.0; q.len()];
        // The accumulator of the chunk held next, on its way from `prev`.
        let mut dkv_in: Option<C::Batch<'_>> = None;
        let mut dkv_home = Vec::new();
        for s in 0..r {
            let j = (c + r - s) % r;
            let at = || comm_at(Pass::Backward, Phase::Ring { step: s }, rank);
            let incoming = (j + r - 1) % r;
            let kv_next = if s + 1 < r {
                let ops = vec![
                    P2pOp::send(next, TAG_KV, kv.clone()),
                    P2pOp::recv(prev, TAG_KV, g.kv_len(incoming)),
                ];
                Some(ring.start(ops).map_err(at())?)
            } else {
                None
            };
            let n_j = g.valid(j);
            let mut dkv = vec![0.0; kv.len()];
            if let Some(mask) = self.block_mask(c, j, g).filter(|_| n_c > 0 && n_j > 0) {
                let (k, v) = kv.split_at(kv.len() / 2);
                let (dk, dv) = dkv.split_at_mut(kv.len() / 2);
                attention_backward_with_delta(
                    &mut dq,
                    dk,
                    dv,
                    dout,
                    q,
                    k,
                    v,
                    delta,
                    lse,
                    g.block_shape(n_c, n_j),
                    mask,
                );
            }
            if let Some(batch) = dkv_in.take() {
                let acc = batch.wait().map_err(at())?.pop().unwrap_or_default();
                add(&mut dkv, &acc);
            }
            if r == 1 {
                dkv_home = dkv;
            } else {
                // On to the rank that holds chunk j next (after step r − 1: its home).
                let ops = vec![
                    P2pOp::send(next, TAG_DKV, dkv),
                    P2pOp::recv(prev, TAG_DKV, g.kv_len(incoming)),
                ];
                dkv_in = Some(ring.start(ops).map_err(at())?);
            }
            if let Some(batch) = kv_next {
                kv = batch.wait().map_err(at())?.pop().unwrap_or_default();
            }
        }
        if let Some(batch) = dkv_in {
            let at = comm_at(Pass::Backward, Phase::Ring { step: r }, rank);
            dkv_home = batch.wait().map_err(at)?.pop().unwrap_or_default();
        }
        Ok((dq, dkv_home))
    }
}

/// All-to-all send buffer by heads: chunk j (for Ulysses member j) holds, for each part
/// `(x [rows, heads, w], heads, w)` in turn, heads `[j·heads/u, (j+1)·heads/u)` of every row.
fn pack_heads(parts: &[(&[f32], usize, usize)], rows: usize, u: usize) -> Vec<f32> {
    let len: usize = parts.iter().map(|&(_, heads, w)| rows * heads * w).sum();
    let mut buf = Vec::with_capacity(len);
    for j in 0..u {
        for &(x, heads, w) in parts {
            let span = heads / u * w;
            for row in 0..rows {
                let at = row * heads * w + j * span;
                buf.extend_from_slice(&x[at..at + span]);
            }
        }
    }
    buf
}

/// The inverse of [`pack_heads`]: received chunk j holds heads j of every row of each part; they
/// are written into the parts (every element of every part is overwritten).
fn unpack_heads(recv: &[f32], parts: &mut [(&mut [f32], usize, usize)], rows: usize, u: usize) {
    let mut off = 0;
    for j in 0..u {
        for (x, heads, w) in parts.iter_mut() {
            let span = *heads / u * *w;
            for row in 0..rows {
                let at = row * *heads * *w + j * span;
                x[at..at + span].copy_from_slice(&recv[off..off + span]);
                off += span;
            }
        }
    }
}

/// Received chunk j (from member j: its L rows, which are rows `[j·L, (j+1)·L)` of the group's
/// chunk, of each part with row width `widths[k]`) → each part `[B, n, width]` over the group's
/// `n` valid rows; rows past n (padding) are dropped.
fn unpack_tokens<const K: usize>(
    recv: &[f32],
    widths: [usize; K],
    g: &Geo,
    n: usize,
) -> [Vec<f32>; K] {
    let mut parts = widths.map(|w| vec![0.0; g.b * n * w]);
    let mut off = 0;
    for j in 0..g.u {
        let keep = n.saturating_sub(j * g.l).min(g.l);
        for (x, &w) in parts.iter_mut().zip(&widths) {
            for bi in 0..g.b {
                if keep > 0 {
                    let at = (bi * n + j * g.l) * w;
                    x[at..at + keep * w].copy_from_slice(&recv[off..off + keep * w]);
                }
                off += g.l * w;
            }
        }
    }
    parts
}

/// The inverse of [`unpack_tokens`]: parts `(x [B, n, width], width, pad)` → send buffer whose
/// chunk j holds rows `[j·L, (j+1)·L)` of each part, rows past n filled with `pad`.
fn pack_tokens(parts: &[(&[f32], usize, f32)], g: &Geo, n: usize) -> Vec<f32> {
    let len: usize = parts.iter().map(|&(_, w, _)| g.u * g.b * g.l * w).sum();
    let mut buf = Vec::with_capacity(len);
    for j in 0..g.u {
        let keep = n.saturating_sub(j * g.l).min(g.l);
        for &(x, w, pad) in parts {
            for bi in 0..g.b {
                let at = (bi * n + j * g.l) * w;
                if keep > 0 {
                    buf.extend_from_slice(&x[at..at + keep * w]);
                }
                buf.extend(std::iter::repeat_n(pad, (g.l - keep) * w));
            }
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(b: usize, t: usize, l: usize, u: usize) -> Geo {
        Geo {
            b,
            t,
            l,
            u,
            h: 4,
            h_kv: 2,
            d: 3,
            hq: 4 / u,
            hk: 2 / u,
        }
    }

    /// Heads out and back: the identity, and chunk j holds head group j.
    #[test]
    fn pack_heads_round_trip() {
        let (rows, u) = (5, 2);
        let x: Vec<f32> = (0..rows * 4 * 3).map(|i| i as f32).collect();
        let y: Vec<f32> = (0..rows * 2).map(|i| -(i as f32)).collect();
        let buf = pack_heads(&[(&x, 4, 3), (&y, 2, 1)], rows, u);
        assert_eq!(buf.len(), x.len() + y.len());
        // Chunk 1 starts with row 0, heads 2..4 of x.
        let chunk = buf.len() / u;
        assert_eq!(buf[chunk..chunk + 6], x[6..12]);
        let (mut x2, mut y2) = (vec![f32::NAN; x.len()], vec![f32::NAN; y.len()]);
        unpack_heads(&buf, &mut [(&mut x2, 4, 3), (&mut y2, 2, 1)], rows, u);
        assert_eq!((x2, y2), (x, y));
    }

    /// Tokens in and out with a padded tail: valid rows survive, padding is dropped then refilled.
    #[test]
    fn pack_tokens_round_trip() {
        let (b, l, u) = (2, 3, 3);
        for n in [0, 1, 4, 7, 9] {
            let g = geo(b, n, l, u);
            let x: Vec<f32> = (0..b * n * 2).map(|i| i as f32).collect();
            let buf = pack_tokens(&[(&x, 2, -1.0)], &g, n);
            assert_eq!(buf.len(), u * b * l * 2);
            assert_eq!(
                buf.iter().filter(|&&e| e == -1.0).count(),
                b * (u * l - n) * 2
            );
            let [back] = unpack_tokens(&buf, [2], &g, n);
            assert_eq!(back, x, "n = {n}");
        }
    }

    #[test]
    fn kv_heads_error_suggests_the_hybrid() {
        let grid = UlyssesGrid::new(4, 1).unwrap();
        let e = grid.check_heads(8, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ulysses: Ulysses over P = 4 ranks needs P | h_kv, but h_kv = 2 (h = 8): each rank \
             must hold whole KV heads after the all-to-all; use the 2-D hybrid with u = 2 \
             (divides both h_kv = 2 and P = 4) × a ring of r = 2 groups: UlyssesGrid::new(2, 2)"
        );
        let e = UlyssesGrid::new(3, 2)
            .unwrap()
            .check_heads(4, 4)
            .unwrap_err();
        assert!(e
            .to_string()
            .contains("u = 3 ranks per all-to-all group (P = 6 = 3 × 2)"));
        assert!(e.to_string().contains("UlyssesGrid::new(2, 3)"), "{e}");
        assert!(UlyssesGrid::new(2, 3).unwrap().check_heads(4, 2).is_ok());
        assert_eq!(
            UlyssesGrid::new(0, 3),
            Err(UlyssesError::ZeroDegree { name: "u" })
        );
    }
}
