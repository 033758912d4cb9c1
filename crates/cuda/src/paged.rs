//! Decode attention over a paged KV cache on the GPU, as `reel_rollout::paged_attention_forward`
//! computes it (vLLM's PagedAttention, Kwon et al. 2023; split-K as flash-decoding, Dao et al.
//! 2023).
//!
//! q, out [N, H, D] (rows of sequence s at `seqs[s].rows`), K/V caches of one layer
//! [num_blocks, block_size, H_kv, D] (f32 or bf16, the layout of `reel_rollout::BlockPool`), lse
//! [N, H] f32. Row i of sequence s sees keys 0 ..= past_s + i (causal within the new tokens); key
//! p is slot `p % bs` of block `block_table[p / bs]`; query head hh reads KV head hh / (H / H_kv).
//! `out_i = Σ_j softmax_j(s·q_i·k_j) v_j`, `lse_i = ln Σ_j e^{s·q_i·k_j}`, s = 1/√D, f32 arithmetic.
//!
//! Long contexts are split over the keys: each split runs its own online softmax and leaves an
//! f32 (o, lse); a second kernel merges the splits in f32 (`o = Σ w_s o_s / Σ w_s`,
//! `w_s = e^{lse_s − max lse}`), the same merge rule as `attention_merge`. A [`GpuPagedBatch`]
//! holds a step's block tables and per-row key counts on the device, and the split scratch, so
//! one upload serves every layer of a decode step.

use std::sync::Mutex;

use reel_rollout::paged_attention::{PagedSeq, PagedShape};

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{cfg, check, launch, PAGED_HEAD_DIMS, PAGED_HEAD_GROUPS};
use crate::{shape_err, DeviceBuf, Gpu, GpuError, GpuFloat, Result};

/// Threads of one paged-attention block (4 warps; `PAGED_WARPS` in kernels.cu).
const PAGED_THREADS: u32 = 128;
/// Fewest keys a split covers.
const MIN_SPLIT_KEYS: usize = 512;
/// Blocks per multiprocessor the default split aims at (several waves of resident blocks, so the
/// last wave's tail is short).
const BLOCKS_PER_SM: usize = 16;

/// One decode step's sequences on the device: block tables, and per query row the offset of its
/// sequence's table and the number of keys it sees (0 for a row no sequence owns: out 0, lse −∞).
pub struct GpuPagedBatch {
    tables: DeviceBuf<u32>,
    row_table: DeviceBuf<u32>,
    row_keys: DeviceBuf<u32>,
    rows: usize,
    max_keys: usize,
    block_size: usize,
    /// Largest block id any row reads (checked against the cache at each call).
    max_block: Option<u32>,
    /// Split partials (o then lse), grown on demand and reused.
    scratch: Mutex<Option<DeviceBuf<f32>>>,
}

/// A step's sequences as the kernel reads them (built on the host, checked there).
#[derive(Debug, PartialEq, Eq)]
struct Tables {
    /// The sequences' block tables, each cut to the blocks its keys need, concatenated.
    tables: Vec<u32>,
    /// Per query row: offset of its sequence's table in `tables`.
    row_table: Vec<u32>,
    /// Per query row: keys it sees (0 for a row no sequence owns).
    row_keys: Vec<u32>,
    max_keys: usize,
    max_block: Option<u32>,
}

/// Validates `seqs` (rows disjoint, each table long enough for its keys) and lays them out.
fn build_tables(seqs: &[PagedSeq], block_size: usize) -> Result<Tables> {
    if block_size == 0 {
        return shape_err("paged attention: block size 0".into());
    }
    let rows = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
    let mut t = Tables {
        tables: Vec::new(),
        row_table: vec![0; rows],
        row_keys: vec![0; rows],
        max_keys: 0,
        max_block: None,
    };
    let mut owned = vec![false; rows];
    for (si, s) in seqs.iter().enumerate() {
        let keys = s.past + s.rows.len();
        let need = keys.div_ceil(block_size);
        if need > s.block_table.len() {
            return shape_err(format!(
                "paged attention: sequence {si} has {keys} keys but {} blocks of {block_size}",
                s.block_table.len()
            ));
        }
        let off = u32::try_from(t.tables.len())
            .map_err(|_| GpuError::Shape("paged attention: block tables too long".into()))?;
        t.tables.extend_from_slice(&s.block_table[..need]);
        if let Some(&m) = s.block_table[..need].iter().max() {
            t.max_block = Some(t.max_block.map_or(m, |b| b.max(m)));
        }
        for (i, r) in s.rows.clone().enumerate() {
            if owned[r] {
                return shape_err(format!(
                    "paged attention: query row {r} belongs to two sequences (the second is {si})"
                ));
            }
            owned[r] = true;
            t.row_table[r] = off;
            t.row_keys[r] = u32::try_from(s.past + i + 1)
                .map_err(|_| GpuError::Shape(format!("paged attention: sequence {si} too long")))?;
        }
        t.max_keys = t.max_keys.max(keys);
    }
    Ok(t)
}

/// Splits for `max_keys` keys over `base` blocks (N·(H / group)): enough splits of at least
/// [`MIN_SPLIT_KEYS`] keys to reach `BLOCKS_PER_SM` blocks per multiprocessor; keys per split.
fn split_keys_for(max_keys: usize, base: usize, multiprocessors: usize) -> usize {
    let want = (BLOCKS_PER_SM * multiprocessors).div_ceil(base.max(1));
    let most = max_keys.div_ceil(MIN_SPLIT_KEYS).max(1);
    let splits = want.clamp(1, most);
    max_keys.div_ceil(splits).max(1)
}

impl GpuPagedBatch {
    /// Validates `seqs` (rows disjoint, each table long enough for its keys) and uploads them.
    pub fn new(gpu: &Gpu, seqs: &[PagedSeq], block_size: usize) -> Result<Self> {
        let t = build_tables(seqs, block_size)?;
        let rows = t.row_keys.len();
        Ok(GpuPagedBatch {
            tables: gpu.upload(&t.tables.max_len1())?,
            row_table: gpu.upload(&t.row_table.max_len1())?,
            row_keys: gpu.upload(&t.row_keys.max_len1())?,
            rows,
            max_keys: t.max_keys,
            block_size,
            max_block: t.max_block,
            scratch: Mutex::new(None),
        })
    }

    /// Refills the batch with another step's sequences (same block size), reusing its device
    /// buffers where they are large enough (a decode loop uploads tables every step).
    pub fn refill(&mut self, gpu: &Gpu, seqs: &[PagedSeq]) -> Result<()> {
        let t = build_tables(seqs, self.block_size)?;
        let put = |buf: &mut DeviceBuf<u32>, host: Vec<u32>| -> Result<()> {
            let host = host.max_len1();
            if buf.len() < host.len() {
                *buf = gpu.upload(&host)?;
                Ok(())
            } else {
                gpu.upload_into(&mut buf.view_mut(0..host.len())?, &host)
            }
        };
        self.rows = t.row_keys.len();
        put(&mut self.tables, t.tables)?;
        put(&mut self.row_table, t.row_table)?;
        put(&mut self.row_keys, t.row_keys)?;
        self.max_keys = t.max_keys;
        self.max_block = t.max_block;
        Ok(())
    }

    /// Query rows N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Most keys any sequence has.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Keys per split the kernel uses by default: enough splits (of at least [`MIN_SPLIT_KEYS`]
    /// keys) for N·(H / group)·splits blocks to reach `BLOCKS_PER_SM` per multiprocessor, one
    /// split when N·(H / group) alone does (`group`: query heads per block, [`head_group`]).
    pub fn default_split_keys(&self, h: usize, group: usize, multiprocessors: usize) -> usize {
        split_keys_for(self.max_keys, self.rows * h / group.max(1), multiprocessors)
    }
}

/// Query heads one block serves: the whole GQA group (H / H_kv heads sharing a KV head, so each
/// K/V row is read once for all of them) when it is at most 8, else its largest divisor ≤ 8.
pub fn head_group(h: usize, h_kv: usize) -> usize {
    let g = (h / h_kv.max(1)).max(1);
    (1..=g.min(8))
        .rev()
        .find(|x| g.is_multiple_of(*x))
        .unwrap_or(1)
}

/// A vector of at least one element (the device needs a non-empty allocation to point at).
trait MaxLen1 {
    fn max_len1(self) -> Self;
}
impl MaxLen1 for Vec<u32> {
    fn max_len1(mut self) -> Self {
        if self.is_empty() {
            self.push(0);
        }
        self
    }
}

impl Gpu {
    /// Paged decode attention (module docs): out [N, H, D] and lse [N, H] (overwritten) from q
    /// [N, H, D] and one layer's K/V caches [num_blocks, block_size, H_kv, D], for the sequences
    /// of `batch`. `split_keys`: keys per split (None: [`GpuPagedBatch::default_split_keys`]).
    /// D must be 32, 64, 128 or 256; pointers 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_forward<T: GpuFloat>(
        &self,
        out: &mut impl DevWrite<T>,
        lse: &mut impl DevWrite<f32>,
        q: &impl DevRead<T>,
        k_cache: &impl DevRead<T>,
        v_cache: &impl DevRead<T>,
        batch: &GpuPagedBatch,
        shape: PagedShape,
        split_keys: Option<usize>,
    ) -> Result<()> {
        let op = "paged_attention_forward";
        let PagedShape {
            h,
            h_kv,
            d,
            block_size: bs,
        } = shape;
        if h_kv == 0 || h % h_kv != 0 {
            return shape_err(format!(
                "{op}: H = {h} must be a positive multiple of H_kv = {h_kv}"
            ));
        }
        let Some(di) = PAGED_HEAD_DIMS.iter().position(|&x| x == d) else {
            return shape_err(format!(
                "{op}: head dimension D = {d}; the kernel is built for {PAGED_HEAD_DIMS:?}"
            ));
        };
        if bs != batch.block_size {
            return shape_err(format!(
                "{op}: block size {bs}, but the batch was built for {}",
                batch.block_size
            ));
        }
        let n = batch.rows;
        check(op, "q", q.dlen(), n * h * d)?;
        check(op, "out", out.dlen(), n * h * d)?;
        check(op, "lse", lse.dlen(), n * h)?;
        check(op, "v_cache", v_cache.dlen(), k_cache.dlen())?;
        let block_elems = bs * h_kv * d;
        if k_cache.dlen() % block_elems != 0 {
            return shape_err(format!(
                "{op}: k_cache has {} elements, not a whole number of blocks of {bs}×{h_kv}×{d}",
                k_cache.dlen()
            ));
        }
        let num_blocks = k_cache.dlen() / block_elems;
        if let Some(m) = batch.max_block {
            if m as usize >= num_blocks {
                return shape_err(format!(
                    "{op}: a block table names block {m}, the cache has {num_blocks}"
                ));
            }
        }
        for (name, p) in [
            ("q", q.dptr()),
            ("k_cache", k_cache.dptr()),
            ("v_cache", v_cache.dptr()),
        ] {
            if p % 16 != 0 {
                return shape_err(format!("{op}: {name} must be 16-byte aligned"));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let gb = head_group(h, h_kv);
        let gi = PAGED_HEAD_GROUPS
            .iter()
            .position(|&x| x >= gb)
            .expect("head_group is at most 8");
        let split = split_keys
            .unwrap_or_else(|| {
                batch.default_split_keys(h, gb, self.info().multiprocessors as usize)
            })
            .max(1);
        let splits = batch.max_keys.div_ceil(split).max(1);
        let as32 = |what, v| crate::ops::as_i32(op, what, v);
        let gb32 = as32("head group", gb)?;
        let (n32, h32, hk32, bs32, sk32, sp32) = (
            u32::try_from(n).map_err(|_| GpuError::Shape(format!("{op}: N = {n} too large")))?,
            as32("H", h)?,
            as32("H_kv", h_kv)?,
            as32("block size", bs)?,
            as32("split keys", split)?,
            as32("splits", splits)?,
        );
        if h > 65_535 || splits > 65_535 {
            return shape_err(format!("{op}: H = {h} or {splits} splits exceed the grid"));
        }
        self.bind()?;
        let scale = 1.0f32 / (d as f32).sqrt();
        let mut guard = batch
            .scratch
            .lock()
            .map_err(|_| GpuError::Shape(format!("{op}: scratch poisoned")))?;
        let part_len = if splits > 1 {
            splits * n * h * (d + 1)
        } else {
            1
        };
        if guard.as_ref().is_none_or(|s| s.len() < part_len) {
            *guard = Some(self.alloc_zeros::<f32>(part_len)?);
        }
        let part = guard.as_ref().expect("just made").dptr();
        let part_lse = part + (splits * n * h * d * 4) as u64;
        let (op_, lp, qp, kp, vp) = (
            out.dptr(),
            lse.dptr(),
            q.dptr(),
            k_cache.dptr(),
            v_cache.dptr(),
        );
        let (tp, rtp, rkp) = (
            batch.tables.dptr(),
            batch.row_table.dptr(),
            batch.row_keys.dptr(),
        );
        launch!(
            self,
            &self.kernels.paged_attn[T::INDEX][di][gi],
            cfg((n32, (h / gb) as u32, splits as u32), (PAGED_THREADS, 1, 1)),
            &part,
            &part_lse,
            &op_,
            &lp,
            &qp,
            &kp,
            &vp,
            &tp,
            &rtp,
            &rkp,
            &h32,
            &hk32,
            &gb32,
            &bs32,
            &sk32,
            &scale
        )?;
        if splits > 1 {
            let rows = (n * h) as i64;
            let d32 = as32("D", d)?;
            launch!(
                self,
                &self.kernels.paged_attn_combine[T::INDEX],
                cfg(
                    ((n * h).div_ceil(8).min(132 * 64) as u32, 1, 1),
                    (256, 1, 1)
                ),
                &op_,
                &lp,
                &part,
                &part_lse,
                &rows,
                &sp32,
                &d32
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_cut_to_the_keys_and_rows_point_at_their_sequence() {
        let (a, b) = ([7u32, 3, 9, 1], [4u32, 5]);
        let seqs = [
            PagedSeq {
                block_table: &a,
                past: 5,
                rows: 2..4,
            },
            PagedSeq {
                block_table: &b,
                past: 0,
                rows: 0..1,
            },
        ];
        let t = build_tables(&seqs, 4).unwrap();
        // Sequence 0: 7 keys in blocks of 4 need 2 blocks; sequence 1: 1 key, 1 block.
        assert_eq!(t.tables, vec![7, 3, 4]);
        assert_eq!(t.row_table, vec![2, 0, 0, 0]);
        // Row 1 belongs to no sequence: no keys. Rows 2 and 3 see 6 and 7 keys (causal).
        assert_eq!(t.row_keys, vec![1, 0, 6, 7]);
        assert_eq!((t.max_keys, t.max_block), (7, Some(7)));
    }

    #[test]
    fn bad_tables_are_refused_with_the_sequence_named() {
        let a = [0u32, 1];
        let short = [PagedSeq {
            block_table: &a,
            past: 8,
            rows: 0..1,
        }];
        let e = build_tables(&short, 4).unwrap_err().to_string();
        assert!(e.contains("sequence 0 has 9 keys but 2 blocks of 4"), "{e}");
        let twice = [
            PagedSeq {
                block_table: &a,
                past: 0,
                rows: 0..2,
            },
            PagedSeq {
                block_table: &a,
                past: 0,
                rows: 1..2,
            },
        ];
        let e = build_tables(&twice, 4).unwrap_err().to_string();
        assert!(e.contains("query row 1 belongs to two sequences"), "{e}");
        assert!(build_tables(&twice, 0).is_err());
    }

    #[test]
    fn head_groups_divide_the_gqa_group() {
        for (h, h_kv, want) in [
            (32, 8, 4),
            (14, 2, 7),
            (16, 1, 8),
            (28, 2, 7),
            (6, 2, 3),
            (8, 8, 1),
        ] {
            let g = head_group(h, h_kv);
            assert_eq!(g, want, "H {h} H_kv {h_kv}");
            assert_eq!((h / h_kv) % g, 0);
        }
    }

    #[test]
    fn splits_fill_the_gpu_without_going_under_the_minimum() {
        // Many rows: one split.
        assert_eq!(split_keys_for(4096, 64 * 32 * 4, 132), 4096);
        // One sequence, long context: as many splits as fill the GPU, each ≥ 512 keys.
        let k = split_keys_for(131_072, 8, 132);
        assert!(
            k >= MIN_SPLIT_KEYS && 131_072usize.div_ceil(k) <= 264,
            "{k}"
        );
        // Short context: one split however few the rows.
        assert_eq!(split_keys_for(300, 1, 132), 300);
    }
}
