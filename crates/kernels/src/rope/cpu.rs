//! CPU rotary embedding, HF "rotate_half" layout: x [N, H, D], element i pairs with i + D/2.
//! Forward `x1' = x1·cos − x2·sin`, `x2' = x2·cos + x1·sin`; backward rotates by −angle.

use rayon::prelude::*;
use reel_tensor::Float;

use super::RopeTable;

/// Rotates every head of every token by its position's angles; `sign` −1 gives the transpose.
pub(super) fn rotate<T: Float>(
    x: &mut [T],
    positions: &[u32],
    table: &RopeTable,
    n_heads: usize,
    sign: f32,
) {
    let half = table.head_dim / 2;
    rotate_rows(x, table.head_dim, n_heads, sign, |t| {
        let pos = positions[t] as usize;
        (
            &table.cos[pos * half..][..half],
            &table.sin[pos * half..][..half],
        )
    });
}

/// Rotates every head of token t by the angles `row(t)` returns (cos, sin, head_dim/2 each).
pub(super) fn rotate_rows<'a, T: Float, F>(
    x: &mut [T],
    head_dim: usize,
    n_heads: usize,
    sign: f32,
    row: F,
) where
    F: Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
{
    let half = head_dim / 2;
    x.par_chunks_mut(n_heads * head_dim)
        .enumerate()
        .for_each(|(t, token)| {
            let (cos, sin) = row(t);
            for head in token.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j].to_f32(), x2[j].to_f32());
                    let (c, s) = (cos[j], sign * sin[j]);
                    x1[j] = T::from_f32(a * c - b * s);
                    x2[j] = T::from_f32(b * c + a * s);
                }
            }
        });
}
