//! The block products of a schedule, shared by every executor ([`LocalExecutor`] in one process,
//! [`DistExecutor`] over a communicator): chunk geometry, masks at global offsets, one block's
//! forward and backward with the kernels, the f32 merge of partials, and moving a chunk's valid
//! rows in and out of a rank's shard.
//!
//! A chunk's tensors are `[B, n, W]` with `n = chunk_valid_len(chunk)`: only its valid prefix
//! (padding is the tail of the sequence, DESIGN.md / [`Sharding`]), so padded rows never reach a
//! kernel and never contribute. W is H·D (q, out, dout, dq), H (lse, D) or H_kv·D (k, v, dk, dv).
//! The backward reads out only through D = rowsum(dout ∘ out), computed once per query chunk.
//!
//! [`LocalExecutor`]: crate::local_exec::LocalExecutor
//! [`DistExecutor`]: crate::dist_exec::DistExecutor

use reel_kernels::attention::{
    attention_backward_with_delta, attention_delta, attention_forward, attention_merge, AttnMask,
    AttnShape,
};

use std::ops::Range;
use std::sync::Arc;

use reel_model::{packed_backward, packed_forward, PackedRow};

use crate::schedule::{BlockMask, Work};
use crate::shard::Sharding;

/// f32 `(o [B, n, H, D], lse [B, n, H])` of a block or of a running merge.
pub(crate) type OutLse = (Vec<f32>, Vec<f32>);

/// Geometry of the blocks of one sharded sequence: the sharding and the head dimensions
/// (B, H, H_kv, D of `shape`; its lengths are ignored), and, for rows packed by prompt, each
/// batch row's layout: a block of the causal schedule then refines into the row's sub-blocks
/// ([`PackedRow::sub_blocks`]: segments see the shared prefix and themselves), which the
/// schedule's causal blocks always contain.
#[derive(Clone, Debug)]
pub(crate) struct Blocks {
    pub sharding: Sharding,
    pub shape: AttnShape,
    pub packed: Option<Arc<[PackedRow]>>,
}

impl Blocks {
    pub fn new(sharding: Sharding, shape: AttnShape) -> Self {
        Blocks {
            sharding,
            shape,
            packed: None,
        }
    }

    /// Global positions of a chunk's valid rows.
    fn span(&self, chunk: usize) -> Range<usize> {
        let start = self.sharding.chunk_start(chunk);
        start..start + self.sharding.chunk_valid_len(chunk)
    }

    /// Row widths of q (H·D) and of k, v (H_kv·D).
    pub fn widths(&self) -> (usize, usize) {
        let AttnShape { h, h_kv, d, .. } = self.shape;
        (h * d, h_kv * d)
    }

    /// `B · valid_len(chunk)`: the rows of a chunk's tensors.
    pub fn rows(&self, chunk: usize) -> usize {
        self.shape.b * self.sharding.chunk_valid_len(chunk)
    }

    fn lens(&self, w: &Work) -> (usize, usize) {
        (
            self.sharding.chunk_valid_len(w.q_chunk),
            self.sharding.chunk_valid_len(w.kv_chunk),
        )
    }

    fn block_shape(&self, tq: usize, tk: usize) -> AttnShape {
        AttnShape {
            tq,
            tk,
            ..self.shape
        }
    }

    /// The block's mask: causal at the chunks' global starts on the diagonal, else full.
    pub fn mask(&self, w: &Work) -> AttnMask {
        match w.mask {
            BlockMask::Diagonal => AttnMask::Causal {
                q_offset: self.sharding.chunk_start(w.q_chunk),
                k_offset: self.sharding.chunk_start(w.kv_chunk),
            },
            BlockMask::Full => AttnMask::Full,
        }
    }

    /// `(o_b, lse_b)` of block `w` from its chunks' q `[B, tq, H, D]`, k and v `[B, tk, H_kv, D]`;
    /// `(0, −inf)` rows when a chunk is empty.
    pub fn forward(&self, w: &Work, q: &[f32], k: &[f32], v: &[f32]) -> OutLse {
        let (tq, tk) = self.lens(w);
        let AttnShape { b, h, d, .. } = self.shape;
        let mut o_b = vec![0.0; b * tq * h * d];
        let mut lse_b = vec![f32::NEG_INFINITY; b * tq * h];
        if let Some(rows) = &self.packed {
            let (qs, ks) = (self.span(w.q_chunk), self.span(w.kv_chunk));
            let kw = self.shape.h_kv * d;
            for (bi, row) in rows.iter().enumerate() {
                packed_forward(
                    &row.sub_blocks(self.sharding.seq_len(), qs.clone(), ks.clone()),
                    (qs.start, ks.start),
                    &mut o_b[bi * tq * h * d..(bi + 1) * tq * h * d],
                    &mut lse_b[bi * tq * h..(bi + 1) * tq * h],
                    &q[bi * tq * h * d..(bi + 1) * tq * h * d],
                    &k[bi * tk * kw..(bi + 1) * tk * kw],
                    &v[bi * tk * kw..(bi + 1) * tk * kw],
                    self.block_shape(tq, tk),
                );
            }
        } else if tq > 0 && tk > 0 {
            attention_forward(
                &mut o_b,
                &mut lse_b,
                q,
                k,
                v,
                self.block_shape(tq, tk),
                self.mask(w),
            );
        }
        (o_b, lse_b)
    }

    /// D = rowsum(dout ∘ out) `[B, n, H]` of query chunk `chunk`, from its dout and GLOBAL out
    /// `[B, n, H, D]`: computed once per backward by the chunk's owner, used by every block of the
    /// chunk there and sent to helpers in place of out.
    pub fn delta(&self, chunk: usize, dout: &[f32], out: &[f32]) -> Vec<f32> {
        let n = self.sharding.chunk_valid_len(chunk);
        let mut delta = vec![0.0; self.rows(chunk) * self.shape.h];
        if n > 0 {
            attention_delta(&mut delta, dout, out, self.block_shape(n, n));
        }
        delta
    }

    /// Accumulates block `w`'s gradients into dq `[B, tq, H, D]`, dk and dv `[B, tk, H_kv, D]`,
    /// given the GLOBAL lse of its query rows and their D = rowsum(dout ∘ out) of the GLOBAL out
    /// ([`Blocks::delta`]), so a helper needs no out.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        w: &Work,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        delta: &[f32],
        lse: &[f32],
    ) {
        let (tq, tk) = self.lens(w);
        if let Some(rows) = &self.packed {
            let (qs, ks) = (self.span(w.q_chunk), self.span(w.kv_chunk));
            let AttnShape { h, h_kv, d, .. } = self.shape;
            let (qw, kw) = (h * d, h_kv * d);
            for (bi, row) in rows.iter().enumerate() {
                let (fq, fk, fl) = (
                    bi * tq * qw..(bi + 1) * tq * qw,
                    bi * tk * kw..(bi + 1) * tk * kw,
                    bi * tq * h..(bi + 1) * tq * h,
                );
                packed_backward(
                    &row.sub_blocks(self.sharding.seq_len(), qs.clone(), ks.clone()),
                    (qs.start, ks.start),
                    &mut dq[fq.clone()],
                    &mut dk[fk.clone()],
                    &mut dv[fk.clone()],
                    &dout[fq.clone()],
                    &q[fq],
                    &k[fk.clone()],
                    &v[fk],
                    &delta[fl.clone()],
                    &lse[fl],
                    self.block_shape(tq, tk),
                );
            }
        } else if tq > 0 && tk > 0 {
            attention_backward_with_delta(
                dq,
                dk,
                dv,
                dout,
                q,
                k,
                v,
                delta,
                lse,
                self.block_shape(tq, tk),
                self.mask(w),
            );
        }
    }

    /// The valid rows of `chunk` `[B, n, width]`, taken from its home's shard `[B, L, width]`.
    pub fn chunk_of(&self, shard: &[f32], width: usize, chunk: usize) -> Vec<f32> {
        let sh = &self.sharding;
        let (l, n) = (sh.local_len(), sh.chunk_valid_len(chunk));
        let row0 = sh.layout().slot_of(sh.ranks(), chunk) * sh.chunk_len();
        (0..self.shape.b)
            .flat_map(|bi| &shard[(bi * l + row0) * width..(bi * l + row0 + n) * width])
            .copied()
            .collect()
    }

    /// The inverse of [`Blocks::chunk_of`]: writes `data` `[B, n, width]` into the chunk's rows of
    /// its home's shard `[B, L, width]` (padded rows untouched).
    pub fn put_chunk(&self, shard: &mut [f32], width: usize, chunk: usize, data: &[f32]) {
        let sh = &self.sharding;
        let (l, n) = (sh.local_len(), sh.chunk_valid_len(chunk));
        let row0 = sh.layout().slot_of(sh.ranks(), chunk) * sh.chunk_len();
        for bi in 0..self.shape.b {
            shard[(bi * l + row0) * width..(bi * l + row0 + n) * width]
                .copy_from_slice(&data[bi * n * width..(bi + 1) * n * width]);
        }
    }
}

/// Folds a block's f32 partial into the running `(o, lse)` (DESIGN.md "Attention math"); a
/// running value still at `(0, −inf)` takes the partial as is.
pub(crate) fn merge(acc: &mut OutLse, (o_b, lse_b): (&[f32], &[f32]), d: usize) {
    let (o, l) = acc;
    attention_merge(o, l, o_b, lse_b, lse_b.len(), d);
}

/// `dst += src`.
pub(crate) fn add(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}
