//! Paged decode attention, CPU reference: the new tokens of several sequences attend over keys
//! and values that live in the block pool, found through each sequence's block table.
//!
//! q [N, H, D] (rows of sequence s at `seqs[s].rows`), pool K/V [num_blocks, bs, H_kv, D] of one
//! layer → out [N, H, D], lse [N, H] (f32). Row i of sequence s has global position
//! `past_s + i` and sees the keys 0..=past_s + i (causal within the new tokens); key p is slot
//! `p % bs` of block `block_table[p / bs]`. Query head hh reads KV head hh / (H / H_kv) (GQA).
//! `out_i = Σ_j softmax_j(s·q_i·k_j) v_j`, `lse_i = ln Σ_j e^{s·q_i·k_j}`, s = 1/√D, computed
//! with the online softmax (running max and sum, one pass over the keys; FlashAttention), so
//! lse is the same quantity as the dense kernel's and partial results over key shards merge with
//! `reel_kernels::attention::attention_merge`.

use rayon::prelude::*;
use std::ops::Range;

/// One sequence of a paged attention call.
#[derive(Clone, Debug)]
pub struct PagedSeq<'a> {
    /// Its blocks in token order.
    pub block_table: &'a [u32],
    /// Tokens stored before this call's queries (the queries' keys are already written too).
    pub past: usize,
    /// Its query rows of q/out/lse.
    pub rows: Range<usize>,
}

/// Heads and block size of a paged attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedShape {
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
    pub block_size: usize,
}

/// Paged causal attention (module docs). Panics on inconsistent shapes (callers validate).
pub fn paged_attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[PagedSeq],
    shape: PagedShape,
) {
    let PagedShape {
        h,
        h_kv,
        d,
        block_size: bs,
    } = shape;
    assert!(
        d > 0 && bs > 0 && h_kv > 0 && h.is_multiple_of(h_kv),
        "paged_attention_forward: bad shape {shape:?}"
    );
    let n = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
    assert!(
        q.len() >= n * h * d && out.len() >= n * h * d && lse.len() >= n * h,
        "paged_attention_forward: q/out/lse shorter than {n} rows"
    );
    assert_eq!(k_cache.len(), v_cache.len());
    for s in seqs {
        let keys = s.past + s.rows.len();
        assert!(
            keys.div_ceil(bs) <= s.block_table.len(),
            "paged_attention_forward: {keys} keys but {} blocks",
            s.block_table.len()
        );
    }
    // Which sequence and which of its rows each query row is.
    let mut row_of = vec![(usize::MAX, 0usize); n];
    for (si, s) in seqs.iter().enumerate() {
        for (i, r) in s.rows.clone().enumerate() {
            row_of[r] = (si, i);
        }
    }
    let group = h / h_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let kvw = h_kv * d;
    out[..n * h * d]
        .par_chunks_mut(h * d)
        .zip(lse[..n * h].par_chunks_mut(h))
        .enumerate()
        .for_each(|(r, (out_r, lse_r))| {
            let (si, i) = row_of[r];
            if si == usize::MAX {
                return;
            }
            let s = &seqs[si];
            let keys = s.past + i + 1;
            let q_r = &q[r * h * d..(r + 1) * h * d];
            let mut scores = vec![0.0f32; keys];
            for hh in 0..h {
                let kh = hh / group;
                let qh = &q_r[hh * d..(hh + 1) * d];
                let mut max = f32::NEG_INFINITY;
                for (p, sc) in scores.iter_mut().enumerate() {
                    let at = (s.block_table[p / bs] as usize * bs + p % bs) * kvw + kh * d;
                    let kp = &k_cache[at..at + d];
                    let dot: f32 = qh.iter().zip(kp).map(|(a, b)| a * b).sum();
                    *sc = scale * dot;
                    max = max.max(*sc);
                }
                let oh = &mut out_r[hh * d..(hh + 1) * d];
                oh.fill(0.0);
                let mut sum = 0.0f32;
                for (p, &sc) in scores.iter().enumerate() {
                    let w = (sc - max).exp();
                    sum += w;
                    let at = (s.block_table[p / bs] as usize * bs + p % bs) * kvw + kh * d;
                    for (o, &x) in oh.iter_mut().zip(&v_cache[at..at + d]) {
                        *o += w * x;
                    }
                }
                let inv = 1.0 / sum;
                oh.iter_mut().for_each(|o| *o *= inv);
                lse_r[hh] = max + sum.ln();
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_kernels::attention::{attention_forward, AttnMask, AttnShape};
    use reel_tensor::{check_close, uniform_vec, Tolerance};

    /// Sequences of (past, new) tokens scattered into a pool under shuffled block tables; paged
    /// attention of all of them in one call equals the dense kernel per sequence.
    fn check(h: usize, h_kv: usize, d: usize, bs: usize, seqs: &[(usize, usize)], seed: u64) {
        let mut rng = reel_tensor::rng(seed);
        let kvw = h_kv * d;
        let blocks_each: Vec<usize> = seqs.iter().map(|&(p, n)| (p + n).div_ceil(bs)).collect();
        let num_blocks = blocks_each.iter().sum::<usize>() + 3;
        // Shuffled block ids: sequences' blocks interleave in the pool.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            use rand::Rng;
            ids.swap(i, rng.random_range(0..=i));
        }
        let mut k_cache = uniform_vec(&mut rng, num_blocks * bs * kvw, 1.0);
        let mut v_cache = uniform_vec(&mut rng, num_blocks * bs * kvw, 1.0);
        let n: usize = seqs.iter().map(|s| s.1).sum();
        let q = uniform_vec(&mut rng, n * h * d, 1.0);
        let mut tables = Vec::new();
        let mut dense = Vec::new();
        let mut next = 0;
        for (&(past, new), &nb) in seqs.iter().zip(&blocks_each) {
            let table: Vec<u32> = ids[next..next + nb].to_vec();
            next += nb;
            let k = uniform_vec(&mut rng, (past + new) * kvw, 1.0);
            let v = uniform_vec(&mut rng, (past + new) * kvw, 1.0);
            for p in 0..past + new {
                let at = (table[p / bs] as usize * bs + p % bs) * kvw;
                k_cache[at..at + kvw].copy_from_slice(&k[p * kvw..(p + 1) * kvw]);
                v_cache[at..at + kvw].copy_from_slice(&v[p * kvw..(p + 1) * kvw]);
            }
            tables.push(table);
            dense.push((k, v));
        }
        let mut at = 0;
        let paged: Vec<PagedSeq> = seqs
            .iter()
            .zip(&tables)
            .map(|(&(past, new), t)| {
                let s = PagedSeq {
                    block_table: t,
                    past,
                    rows: at..at + new,
                };
                at += new;
                s
            })
            .collect();
        let mut out = vec![f32::NAN; n * h * d];
        let mut lse = vec![f32::NAN; n * h];
        let shape = PagedShape {
            h,
            h_kv,
            d,
            block_size: bs,
        };
        paged_attention_forward(&mut out, &mut lse, &q, &k_cache, &v_cache, &paged, shape);
        for (s, ((&(past, new), (k, v)), ps)) in seqs.iter().zip(&dense).zip(&paged).enumerate() {
            let mut o = vec![0.0; new * h * d];
            let mut l = vec![0.0; new * h];
            let r = ps.rows.clone();
            attention_forward(
                &mut o,
                &mut l,
                &q[r.start * h * d..r.end * h * d],
                k,
                v,
                AttnShape {
                    b: 1,
                    tq: new,
                    tk: past + new,
                    h,
                    h_kv,
                    d,
                },
                AttnMask::Causal {
                    q_offset: past,
                    k_offset: 0,
                },
            );
            let what = format!("h{h} h_kv{h_kv} d{d} bs{bs} seq {s} (past {past}, new {new})");
            let tol = Tolerance::new(1e-5, 1e-4);
            check_close(
                &format!("{what} out"),
                &out[r.start * h * d..r.end * h * d],
                &o,
                tol,
            )
            .unwrap();
            check_close(
                &format!("{what} lse"),
                &lse[r.start * h..r.end * h],
                &l,
                tol,
            )
            .unwrap();
        }
    }

    #[test]
    fn paged_attention_matches_dense_attention() {
        // Decode rows (new = 1), prefill chunks after a prefix, a fresh prompt, in one call.
        let seqs = [(0, 7), (13, 1), (4, 5), (1, 1), (30, 3), (0, 1)];
        for (i, &(h, h_kv, d, bs)) in [
            (4, 4, 8, 1),
            (6, 2, 8, 3),
            (4, 1, 16, 5),
            (3, 3, 6, 7),
            (8, 2, 4, 16),
        ]
        .iter()
        .enumerate()
        {
            check(h, h_kv, d, bs, &seqs, 11 + i as u64);
        }
    }

    #[test]
    fn long_prefix_with_many_blocks() {
        check(2, 1, 32, 5, &[(200, 9), (123, 1)], 5);
    }
}
