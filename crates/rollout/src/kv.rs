//! The block pool as the decoder's key/value store for one step: sequence s of the step is a
//! [`BlockTable`] whose room for its new tokens is already reserved; keys and values are written
//! into its blocks and attention reads them through [`paged_attention_forward`].

use crate::paged_attention::{paged_attention_forward, PagedSeq, PagedShape};
use crate::pool::{BlockPool, BlockTable};
use reel_model::decode::{HeadShape, KvError, KvStore};
use std::ops::Range;

/// One step's view of the pool: the step's sequences are `tables`, in step order.
pub struct PagedKv<'a> {
    pub pool: &'a mut BlockPool,
    pub tables: Vec<&'a BlockTable>,
}

impl PagedKv<'_> {
    fn check(&self, rows: &[Range<usize>]) -> Result<(), KvError> {
        if self.pool.is_device() {
            return Err(
                "the CPU decoder was given a device pool (its blocks live on the GPU)".into(),
            );
        }
        if rows.len() != self.tables.len() {
            return Err(format!(
                "the step has {} sequences but {} block tables",
                rows.len(),
                self.tables.len()
            )
            .into());
        }
        Ok(())
    }
}

impl KvStore for PagedKv<'_> {
    fn write(
        &mut self,
        layer: usize,
        rows: &[Range<usize>],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        self.check(rows)?;
        let places: Vec<(&BlockTable, usize)> = self.tables.iter().map(|&t| (t, t.len())).collect();
        write_placed(self.pool, layer, &places, rows, k, v)
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
        self.check(rows)?;
        let places: Vec<(&BlockTable, usize)> = self.tables.iter().map(|&t| (t, t.len())).collect();
        attend_placed(self.pool, layer, &places, rows, out, lse, q, heads)
    }
}

/// Writes each sequence's new keys and values (rows `rows[s]` of k/v [N, H_kv, D]) into its
/// table's blocks from position `places[s].1` on: [`PagedKv`]'s write, and a shared prefill's,
/// whose sequences are chunks of one table at their prompt positions.
pub(crate) fn write_placed(
    pool: &mut BlockPool,
    layer: usize,
    places: &[(&BlockTable, usize)],
    rows: &[Range<usize>],
    k: &[f32],
    v: &[f32],
) -> Result<(), KvError> {
    let l = pool.layout();
    let w = l.h_kv * l.d;
    for (&(t, at), r) in places.iter().zip(rows) {
        let (k, v) = (&k[r.start * w..r.end * w], &v[r.start * w..r.end * w]);
        pool.write(t, layer, at, k, v)?;
    }
    Ok(())
}

/// Causal attention of each sequence's new rows over its table's keys (query i of sequence s
/// sees keys 0..=places[s].1 + i) through [`paged_attention_forward`]: [`PagedKv`]'s attend,
/// and a shared prefill's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_placed(
    pool: &BlockPool,
    layer: usize,
    places: &[(&BlockTable, usize)],
    rows: &[Range<usize>],
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    heads: HeadShape,
) -> Result<(), KvError> {
    let l = pool.layout();
    if (heads.h_kv, heads.d) != (l.h_kv, l.d) {
        return Err(format!(
            "attention with H_kv {} and D {} over a pool of H_kv {} and D {}",
            heads.h_kv, heads.d, l.h_kv, l.d
        )
        .into());
    }
    let seqs: Vec<PagedSeq> = places
        .iter()
        .zip(rows)
        .map(|(&(t, past), r)| PagedSeq {
            block_table: t.block_ids(),
            past,
            rows: r.clone(),
        })
        .collect();
    let (k, v) = pool.layer(layer);
    let shape = PagedShape {
        h: heads.h,
        h_kv: heads.h_kv,
        d: heads.d,
        block_size: l.block_size,
    };
    paged_attention_forward(out, lse, q, k, v, &seqs, shape);
    Ok(())
}
