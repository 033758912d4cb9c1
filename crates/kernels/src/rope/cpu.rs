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
    x.par_chunks_mut(n_heads * table.head_dim)
        .zip(positions.par_iter())
        .for_each(|(token, &pos)| {
            let cos = &table.cos[pos as usize * half..][..half];
            let sin = &table.sin[pos as usize * half..][..half];
            for head in token.chunks_exact_mut(table.head_dim) {
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
