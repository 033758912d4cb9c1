//! How a prompt's prefill is split over a model's peers (MR-SP's sequence-parallel prefill, with
//! the cache kept whole): [`crate::StepModel::prefill_shared`].
//!
//! The prompt's n rows are cut into 2P chunks of ⌈n / 2P⌉ rows (the last ones shorter or empty);
//! rank r computes chunks r and 2P − 1 − r (zigzag: a chunk near the start, whose queries see few
//! keys, with one near the end, whose queries see many, so causal attention costs every rank
//! about the same). Layer by layer each rank computes its rows' keys and values, every rank's
//! are gathered to every rank (each rank's part padded to [`PrefillSplit::rows_per_rank`] rows)
//! and put at their cache slots, and each rank's queries attend over the keys before them. After
//! the last layer every peer's table holds every row's keys and values: each peer decodes its
//! [`sample_share`] of the group's samples from them (all of them on the prompt's owner, when
//! the caller keeps decoding on one peer), and a peer with none drops them.
//!
//! **Agreement.** Before the first collective each peer says, in one small all-gather
//! ([`PrefillVote`], [`StepModel::gather_peers`]), whether it can take part — the request passed
//! its checks, its pool has room for the prompt, its model readied its buffers
//! ([`StepModel::prepare_shared`]) — and what it is about to run: the rows, the rows a rank
//! runs per segment, the prompt's [`fingerprint`]. [`agree`] then fails every peer alike,
//! naming each peer that refused and why, or what they disagree on; so one peer's local
//! failure no longer leaves the others waiting in the first layer's all-gather until their
//! collective timeout. A failure inside the prefill itself still does: a device error
//! mid-layer, or a GPU running out of memory for a segment's smaller scratch (the step buffers
//! are sized before the vote). The errors name peers by their rank in the prefill group (an sp
//! group's processes in order), not by world rank.

use crate::kv::{attend_placed, write_placed};
use crate::pool::{BlockPool, BlockTable, KvLayout};
use crate::step::{CpuStep, StepModel};
use crate::RolloutError;
use reel_comm::Communicator;
use reel_model::decode::{
    DecodeScratch, HeadShape, KvError, KvStore, SeqStep, StepInput, StepPositions,
};
use reel_model::{Qwen2, Qwen2Config};
use std::ops::Range;

/// The split of an n-row prompt over `world` peers (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillSplit {
    pub rows: usize,
    pub world: usize,
}

/// The slot a padding row of the gathered buffer is put at: nowhere.
pub const NO_SLOT: u32 = u32::MAX;

impl PrefillSplit {
    pub fn new(rows: usize, world: usize) -> Self {
        PrefillSplit {
            rows,
            world: world.max(1),
        }
    }

    /// Rows of each of the 2P chunks (the last ones may hold fewer).
    pub fn chunk(&self) -> usize {
        self.rows.div_ceil(2 * self.world)
    }

    /// Chunk j's rows, clamped to the prompt.
    fn chunk_rows(&self, j: usize) -> Range<usize> {
        let c = self.chunk();
        (j * c).min(self.rows)..((j + 1) * c).min(self.rows)
    }

    /// Rank r's two chunks in row order: chunk r, then chunk 2P − 1 − r (either may be empty).
    pub fn parts(&self, rank: usize) -> [Range<usize>; 2] {
        [
            self.chunk_rows(rank),
            self.chunk_rows(2 * self.world - 1 - rank),
        ]
    }

    /// Rows each rank's part of the gathered buffer holds (its rows, then padding).
    pub fn rows_per_rank(&self) -> usize {
        2 * self.chunk()
    }

    /// The row of the prompt each row of the gathered buffer holds ([world · rows_per_rank],
    /// rank-major; `None` for padding).
    pub fn gathered_rows(&self) -> Vec<Option<usize>> {
        let m = self.rows_per_rank();
        let mut out = Vec::with_capacity(self.world * m);
        for q in 0..self.world {
            let at = out.len();
            for r in self.parts(q) {
                out.extend(r.map(Some));
            }
            out.resize(at + m, None);
        }
        out
    }

    /// Values of one rank's part of a layer's gathered buffer: its m key rows then m value rows
    /// of `kv_width` (H_kv · D) values, padding included.
    pub fn part_values(&self, kv_width: usize) -> usize {
        2 * self.rows_per_rank() * kv_width
    }

    /// Rank r's causal attention work in query-key pairs (each query row sees the keys up to
    /// its own): what the zigzag balances.
    pub fn attention_pairs(&self, rank: usize) -> u64 {
        self.parts(rank)
            .iter()
            .flat_map(|r| r.clone())
            .map(|p| p as u64 + 1)
            .sum()
    }
}

/// The segments of an n-row shared prefill, `world · rows_per_rank` rows each (the last
/// shorter), run one after another: a segment's queries attend over every earlier segment's
/// keys, which every peer holds by then.
pub fn segments(
    n: usize,
    world: usize,
    rows_per_rank: usize,
) -> impl Iterator<Item = Range<usize>> {
    let seg = world.max(1) * rows_per_rank.max(1);
    (0..n).step_by(seg).map(move |s| s..(s + seg).min(n))
}

/// What each peer receives over a whole shared prefill of `n` rows (`layers` layers, keys and
/// values of `kv_width` values of `elem_bytes` bytes each): per segment and layer the other
/// P − 1 ranks' parts ([`PrefillSplit::part_values`], padding included), as the all-gathers
/// move them; and the all-gathers' count. The unpadded ideal is (P − 1)/P of the prompt's
/// keys and values, 2 · n · kv_width · layers · elem_bytes.
pub fn exchange_bytes(
    n: usize,
    world: usize,
    rows_per_rank: usize,
    (kv_width, layers, elem_bytes): (usize, usize, usize),
) -> (u64, u64) {
    let (mut bytes, mut calls) = (0u64, 0u64);
    for span in segments(n, world, rows_per_rank) {
        let part = PrefillSplit::new(span.len(), world).part_values(kv_width);
        bytes += (layers * (world.max(1) - 1) * part * elem_bytes) as u64;
        calls += layers as u64;
    }
    (bytes, calls)
}

/// Rank `rank`'s sequences of the segment `span` of `step` (a prompt's rows from its first):
/// its non-empty chunks of the segment's [`PrefillSplit`] over `world`, each as a step of its
/// rows (inputs and positions cut from `step`; `hidden` values an embedding row) with the
/// prompt position it starts at.
pub fn segment_steps<'a>(
    step: &SeqStep<'a>,
    span: Range<usize>,
    world: usize,
    rank: usize,
    hidden: usize,
) -> Vec<(SeqStep<'a>, usize)> {
    let split = PrefillSplit::new(span.len(), world);
    split
        .parts(rank)
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            let r = span.start + r.start..span.start + r.end;
            let sub = SeqStep {
                input: match step.input {
                    StepInput::Tokens(ids) => StepInput::Tokens(&ids[r.clone()]),
                    StepInput::Embeddings(e) => {
                        StepInput::Embeddings(&e[r.start * hidden..r.end * hidden])
                    }
                },
                positions: match step.positions {
                    StepPositions::Linear { start } => StepPositions::Linear {
                        start: start + r.start,
                    },
                    StepPositions::MRope { ids, sections } => StepPositions::MRope {
                        ids: &ids[r.clone()],
                        sections,
                    },
                },
                logits: false,
            };
            (sub, r.start)
        })
        .collect()
}

/// The rows of `step` (a shared prefill's whole prompt rows), checked against the model: the
/// count, and inputs and positions that cover it; what every peer checks before the collective.
pub fn step_rows(c: &Qwen2Config, step: &SeqStep) -> Result<usize, RolloutError> {
    let bad = |m: String| Err(RolloutError::Invalid(format!("shared prefill: {m}")));
    let n = match step.input {
        StepInput::Tokens(ids) => ids.len(),
        StepInput::Embeddings(e) if e.len().is_multiple_of(c.hidden_size) => {
            e.len() / c.hidden_size
        }
        StepInput::Embeddings(e) => {
            return bad(format!(
                "{} input-embedding values are not rows of hidden_size {}",
                e.len(),
                c.hidden_size
            ))
        }
    };
    if let StepPositions::MRope { ids, .. } = step.positions {
        if ids.len() != n {
            return bad(format!("{n} rows but {} M-RoPE positions", ids.len()));
        }
    }
    Ok(n)
}

/// The CPU model as a peer of a shared prefill over a [`Communicator`] (one per rank, each with
/// its own pool): the plain reference of what a GPU decoder's prefill group does, and the CPU
/// engines' way to take part. Steps are [`CpuStep`]'s; [`StepModel::prefill_shared`] runs the
/// module's algorithm — per segment this rank's chunks through `Qwen2::forward_step`, whose
/// key/value store (`SharedKv`) writes the rank's rows, all-gathers every rank's (padded to
/// [`PrefillSplit::rows_per_rank`]) and writes the others' at their positions before attention.
pub struct CpuPeerStep<'m, 'c, C: Communicator> {
    step: CpuStep<'m>,
    model: &'m Qwen2,
    comm: &'c C,
    scratch: DecodeScratch,
    rows_per_rank: usize,
}

impl<'m, 'c, C: Communicator> CpuPeerStep<'m, 'c, C> {
    /// `model` on this rank of `comm`, `rows_per_rank` rows a rank per segment (every peer
    /// the same).
    pub fn new(model: &'m Qwen2, comm: &'c C, rows_per_rank: usize) -> Self {
        CpuPeerStep {
            step: CpuStep::new(model),
            model,
            comm,
            scratch: DecodeScratch::default(),
            rows_per_rank: rows_per_rank.max(1),
        }
    }
}

impl<C: Communicator> StepModel for CpuPeerStep<'_, '_, C> {
    fn config(&self) -> &Qwen2Config {
        &self.model.config
    }

    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
        self.step.new_pool(layout)
    }

    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError> {
        self.step.forward_step(pool, steps, tables)
    }

    fn prefill_peers(&self) -> Option<(usize, usize)> {
        Some((self.comm.rank(), self.comm.world_size()))
    }

    fn prepare_shared(&mut self, _rows: usize) -> Result<usize, RolloutError> {
        Ok(self.rows_per_rank)
    }

    fn gather_peers(&mut self, values: &[f32]) -> Result<Vec<f32>, RolloutError> {
        let mut out = vec![0.0f32; values.len() * self.comm.world_size()];
        self.comm.all_gather(values, &mut out)?;
        Ok(out)
    }

    fn prefill_shared(
        &mut self,
        pool: &mut BlockPool,
        step: &SeqStep,
        table: &BlockTable,
    ) -> Result<(), RolloutError> {
        let c = &self.model.config;
        let n = step_rows(c, step)?;
        if !table.is_empty() || pool.blocks_for(n) > table.num_blocks() {
            return Err(RolloutError::Invalid(format!(
                "shared prefill: {n} rows need an empty table with room for them"
            )));
        }
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        for span in segments(n, world, self.rows_per_rank) {
            let parts = segment_steps(step, span.clone(), world, rank, c.hidden_size);
            let (steps, starts): (Vec<SeqStep>, Vec<usize>) = parts.into_iter().unzip();
            let split = PrefillSplit::new(span.len(), world);
            let mut kv = SharedKv {
                pool: &mut *pool,
                table,
                starts,
                span: span.clone(),
                split,
                comm: self.comm,
            };
            if steps.is_empty() {
                // No rows of its own: it still takes part in every layer's gather.
                for l in 0..c.num_hidden_layers {
                    kv.write(l, &[], &[], &[])
                        .map_err(|e| RolloutError::Invalid(e.to_string()))?;
                }
                continue;
            }
            self.model
                .forward_step(&mut self.scratch, &steps, &mut kv)?;
        }
        Ok(())
    }
}

/// This rank's sequences of a segment: the one table at each chunk's prompt position.
fn placed<'t>(table: &'t BlockTable, starts: &[usize]) -> Vec<(&'t BlockTable, usize)> {
    starts.iter().map(|&at| (table, at)).collect()
}

/// A shared prefill segment's key/value store on one peer (see [`CpuPeerStep`]): this rank's
/// sequences (its chunks) at positions `starts` of one table.
struct SharedKv<'a, C: Communicator> {
    pool: &'a mut BlockPool,
    table: &'a BlockTable,
    starts: Vec<usize>,
    span: Range<usize>,
    split: PrefillSplit,
    comm: &'a C,
}

impl<C: Communicator> KvStore for SharedKv<'_, C> {
    fn write(
        &mut self,
        layer: usize,
        rows: &[Range<usize>],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let l = self.pool.layout();
        let places = placed(self.table, &self.starts);
        write_placed(self.pool, layer, &places, rows, k, v)?;
        let own = rows.last().map_or(0, |r| r.end);
        self.exchange(layer, own, k, v, l.h_kv * l.d)
    }

    fn attend(
        &self,
        layer: usize,
        rows: &[Range<usize>],
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        heads: HeadShape,
    ) -> Result<(), KvError> {
        let places = placed(self.table, &self.starts);
        attend_placed(self.pool, layer, &places, rows, out, lse, q, heads)
    }
}

impl<C: Communicator> SharedKv<'_, C> {
    /// One layer's exchange: this rank's `own` rows of k/v [own, w] (its part, padded to m rows
    /// of keys then m of values) all-gathered; every other rank's rows written at their
    /// positions of the table.
    fn exchange(
        &mut self,
        layer: usize,
        own: usize,
        k: &[f32],
        v: &[f32],
        w: usize,
    ) -> Result<(), KvError> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let m = self.split.rows_per_rank();
        let part = 2 * m * w;
        let mut send = vec![0.0f32; part];
        send[..own * w].copy_from_slice(&k[..own * w]);
        send[m * w..m * w + own * w].copy_from_slice(&v[..own * w]);
        let mut recv = vec![0.0f32; world * part];
        self.comm.all_gather(&send, &mut recv)?;
        for q in (0..world).filter(|&q| q != rank) {
            let base = q * part;
            let mut i = 0;
            for r in self.split.parts(q) {
                let n = r.len();
                let (ks, vs) = (
                    &recv[base + i * w..base + (i + n) * w],
                    &recv[base + (m + i) * w..base + (m + i + n) * w],
                );
                self.pool
                    .write(self.table, layer, self.span.start + r.start, ks, vs)?;
                i += n;
            }
        }
        Ok(())
    }
}

/// Why a peer cannot take part in a shared prefill ([`PrefillVote`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request failed the peer's checks (the prompt or the parameters).
    Request,
    /// Its KV pool has no room for the prompt: `needed` blocks, `free` free.
    NoRoom { needed: u64, free: u64 },
    /// Its model could not ready itself (a device's memory for the step buffers, say).
    Model,
}

/// What one peer says before a shared prefill (module docs, "Agreement").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillVote {
    /// `None`: ready to run it.
    pub refusal: Option<Refusal>,
    /// The rows it would prefill (the prompt's tokens but the last).
    pub rows: u64,
    /// Rows a rank runs per segment ([`segments`]); 0 where the peer refused before asking
    /// its model.
    pub rows_per_rank: u64,
    /// The prompt's [`fingerprint`].
    pub prompt: u64,
}

impl PrefillVote {
    /// f32 values a vote travels as: six u64 words in 16-bit pieces, each exact in an f32
    /// (whatever the transport does with the bits of a float).
    pub const VALUES: usize = 24;

    pub fn encode(&self) -> [f32; Self::VALUES] {
        let (code, a, b) = match self.refusal {
            None => (0, 0, 0),
            Some(Refusal::Request) => (1, 0, 0),
            Some(Refusal::NoRoom { needed, free }) => (2, needed, free),
            Some(Refusal::Model) => (3, 0, 0),
        };
        let words = [code, a, b, self.rows, self.rows_per_rank, self.prompt];
        let mut out = [0.0f32; Self::VALUES];
        for (i, w) in words.iter().enumerate() {
            for k in 0..4 {
                out[4 * i + k] = ((w >> (16 * k)) & 0xFFFF) as f32;
            }
        }
        out
    }

    /// The vote `encode` wrote into `v` (its length); an error for values it cannot have
    /// written.
    pub fn decode(v: &[f32]) -> Result<Self, RolloutError> {
        let bad = || RolloutError::Invalid(format!("shared prefill: a malformed vote {v:?}"));
        if v.len() != Self::VALUES {
            return Err(bad());
        }
        let mut words = [0u64; 6];
        for (i, w) in words.iter_mut().enumerate() {
            for k in 0..4 {
                let x = v[4 * i + k];
                if !(x.fract() == 0.0 && (0.0..65536.0).contains(&x)) {
                    return Err(bad());
                }
                *w |= (x as u64) << (16 * k);
            }
        }
        let [code, a, b, rows, rows_per_rank, prompt] = words;
        let refusal = match code {
            0 => None,
            1 => Some(Refusal::Request),
            2 => Some(Refusal::NoRoom { needed: a, free: b }),
            3 => Some(Refusal::Model),
            _ => return Err(bad()),
        };
        Ok(PrefillVote {
            refusal,
            rows,
            rows_per_rank,
            prompt,
        })
    }
}

/// What each peer receives in a shared prefill's agreement: every other peer's vote, as f32
/// values ([`PrefillVote::VALUES`]), in one all-gather (beside [`exchange_bytes`]).
pub fn agreement_bytes(world: usize) -> u64 {
    (world.max(1) - 1) as u64 * PrefillVote::VALUES as u64 * 4
}

/// A prompt's fingerprint for the agreement: FNV-1a over its token ids and its number of
/// input-embedding values (peers about to prefill different prompts disagree on it).
pub fn fingerprint(ids: &[u32], embedding_values: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = ids
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .chain((embedding_values as u64).to_le_bytes());
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Whether the peers' `votes` (in rank order) let the shared prefill run: every peer ready, and
/// all about the same rows of the same prompt in the same segments. Else the error every peer
/// returns alike, naming each peer that refused and why, or what the peers disagree on.
pub fn agree(votes: &[PrefillVote]) -> Result<(), RolloutError> {
    let refused: Vec<String> = votes
        .iter()
        .enumerate()
        .filter_map(|(r, v)| {
            let why = match v.refusal? {
                Refusal::Request => "the request failed its checks".to_string(),
                Refusal::NoRoom { needed, free } => {
                    format!("no room in its KV pool ({needed} blocks needed, {free} free)")
                }
                Refusal::Model => "its model could not ready its buffers".to_string(),
            };
            Some(format!("peer {r}: {why}"))
        })
        .collect();
    if !refused.is_empty() {
        return Err(RolloutError::Invalid(format!(
            "shared prefill refused by {} of {} peers (peers by rank in the prefill group): {}",
            refused.len(),
            votes.len(),
            refused.join("; ")
        )));
    }
    let Some(first) = votes.first() else {
        return Ok(());
    };
    let same = |v: &PrefillVote| {
        (v.rows, v.rows_per_rank, v.prompt) == (first.rows, first.rows_per_rank, first.prompt)
    };
    if votes.iter().all(same) {
        return Ok(());
    }
    let each: Vec<String> = votes
        .iter()
        .enumerate()
        .map(|(r, v)| {
            format!(
                "peer {r}: {} rows of prompt {:016x}, {} a rank per segment",
                v.rows, v.prompt, v.rows_per_rank
            )
        })
        .collect();
    Err(RolloutError::Invalid(format!(
        "shared prefill: the peers disagree on what to prefill ({})",
        each.join("; ")
    )))
}

/// The samples of a group of `g` that peer `rank` of `world` decodes after a shared prefill
/// (every peer holds the whole prompt): contiguous shares in rank order, the first `g mod world`
/// peers one more; empty where `g < world` leaves a peer none.
pub fn sample_share(g: usize, world: usize, rank: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (g / world, g % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_travel_as_exact_floats_and_the_agreement_names_who_refused_or_differs() {
        let ok = PrefillVote {
            refusal: None,
            rows: 262_143,
            rows_per_rank: 16_384,
            prompt: fingerprint(&[1, 2, 3], 0),
        };
        let full = PrefillVote {
            refusal: Some(Refusal::NoRoom {
                needed: 4097,
                free: u64::MAX - 1,
            }),
            prompt: u64::MAX,
            ..ok
        };
        for v in [ok, full] {
            assert_eq!(PrefillVote::decode(&v.encode()).unwrap(), v);
        }
        let mut bad = ok.encode();
        bad[0] = 0.5;
        assert!(PrefillVote::decode(&bad).is_err());
        bad[0] = 9.0; // no such refusal code
        assert!(PrefillVote::decode(&bad).is_err());
        assert!(PrefillVote::decode(&bad[1..]).is_err());

        agree(&[ok, ok, ok]).unwrap();
        let e = agree(&[ok, full, ok]).unwrap_err().to_string();
        assert!(
            e.contains("1 of 3 peers") && e.contains("peer 1: no room") && e.contains("4097"),
            "{e}"
        );
        let model = PrefillVote {
            refusal: Some(Refusal::Model),
            ..ok
        };
        let e = agree(&[model, ok, full]).unwrap_err().to_string();
        assert!(
            e.contains("peer 0: its model") && e.contains("peer 2: no room"),
            "{e}"
        );
        for other in [
            PrefillVote { rows: 7, ..ok },
            PrefillVote {
                rows_per_rank: 8,
                ..ok
            },
            PrefillVote {
                prompt: fingerprint(&[1, 2, 4], 0),
                ..ok
            },
        ] {
            let e = agree(&[ok, other]).unwrap_err().to_string();
            assert!(e.contains("disagree") && e.contains("peer 1:"), "{e}");
        }
        // The fingerprint tells the inputs apart, embeddings included.
        assert_ne!(fingerprint(&[1, 2, 3], 0), fingerprint(&[1, 2, 3], 6));
        assert_ne!(fingerprint(&[1, 2, 3], 0), fingerprint(&[3, 2, 1], 0));
    }

    #[test]
    fn sample_shares_tile_the_group_in_rank_order() {
        for world in 1..=8 {
            for g in 0..=17 {
                let shares: Vec<Range<usize>> =
                    (0..world).map(|r| sample_share(g, world, r)).collect();
                let all: Vec<usize> = shares.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(all, (0..g).collect::<Vec<_>>(), "g {g} world {world}");
                let (lo, hi) = (
                    shares.iter().map(|r| r.len()).min().unwrap(),
                    shares.iter().map(|r| r.len()).max().unwrap(),
                );
                assert!(hi - lo <= 1, "g {g} world {world}: {shares:?}");
            }
        }
    }

    #[test]
    fn parts_tile_the_prompt_once_and_the_gathered_rows_name_each_row_once() {
        for world in 1..=8 {
            for rows in [1, 2, 7, 15, 16, 17, 100, 1001] {
                let s = PrefillSplit::new(rows, world);
                let mut seen = vec![0u32; rows];
                for r in 0..world {
                    let parts = s.parts(r);
                    assert!(
                        parts[0].end <= parts[1].start || parts[1].is_empty(),
                        "{parts:?}"
                    );
                    let own: usize = parts.iter().map(|p| p.len()).sum();
                    assert!(own <= s.rows_per_rank());
                    for p in parts.iter().flat_map(|p| p.clone()) {
                        seen[p] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "rows {rows} world {world}");
                let g = s.gathered_rows();
                assert_eq!(g.len(), world * s.rows_per_rank());
                let mut named: Vec<usize> = g.iter().flatten().copied().collect();
                named.sort_unstable();
                assert_eq!(named, (0..rows).collect::<Vec<_>>());
                // Rank q's part lists its own rows first, in order.
                for q in 0..world {
                    let m = s.rows_per_rank();
                    let want: Vec<usize> = s.parts(q).iter().flat_map(|p| p.clone()).collect();
                    let got: Vec<usize> = g[q * m..(q + 1) * m].iter().flatten().copied().collect();
                    assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn exchange_bytes_are_the_ideal_share_of_the_cache_up_to_padding() {
        // 3B-shaped keys and values: 2 KV heads of 128, 36 layers, bf16.
        let kv = (256, 36, 2);
        for world in [2usize, 4, 8] {
            // 262,144 rows split evenly: exactly (P − 1)/P of the prompt's keys and values.
            let n = 262_144;
            let ideal = (world as u64 - 1) * (2 * n as u64 * 256 * 36 * 2) / world as u64;
            let (bytes, calls) = exchange_bytes(n, world, 16_384, kv);
            assert_eq!(bytes, ideal, "world {world}");
            assert_eq!(calls, 36 * (n / (world * 16_384)).max(1) as u64);
            // An odd length pads each part to 2·⌈rows / 2P⌉ rows: a little more, never less.
            let n = 262_381;
            let ideal = (world as u64 - 1) * (2 * n as u64 * 256 * 36 * 2) / world as u64;
            let (bytes, _) = exchange_bytes(n, world, 16_384, kv);
            assert!(bytes >= ideal && (bytes - ideal) as f64 / (ideal as f64) < 1e-2);
        }
        assert_eq!(exchange_bytes(1000, 1, 64, kv).0, 0);
        assert_eq!(exchange_bytes(0, 4, 64, kv), (0, 0));
    }

    #[test]
    fn zigzag_balances_causal_attention_where_contiguous_shards_do_not() {
        for world in [2, 4, 8] {
            let s = PrefillSplit::new(262_144, world);
            let work: Vec<u64> = (0..world).map(|r| s.attention_pairs(r)).collect();
            let (lo, hi) = (*work.iter().min().unwrap(), *work.iter().max().unwrap());
            // Exactly balanced up to the chunk size's rounding.
            assert!((hi - lo) as f64 / (hi as f64) < 1e-3, "{work:?}");
            let total: u64 = work.iter().sum();
            assert_eq!(total, 262_144u64 * 262_145 / 2);
            // Contiguous shards of n / P rows: the last rank does 2P − 1 times the first's.
            let n = 262_144u64 / world as u64;
            let first = n * (n + 1) / 2;
            let last: u64 = ((world as u64 - 1) * n..world as u64 * n)
                .map(|p| p + 1)
                .sum();
            assert!(last as f64 / first as f64 > (2 * world - 1) as f64 * 0.99);
        }
    }
}
