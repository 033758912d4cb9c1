//! CPU token embedding: table [V, D], tokens [N] → out [N, D], `out[i] = table[tokens[i]]`;
//! backward `dtable[tokens[i]] += dout[i]`.

use rayon::prelude::*;
use reel_tensor::Float;

pub(super) fn embedding_forward<T: Float>(out: &mut [T], tokens: &[u32], table: &[T], d: usize) {
    out.par_chunks_mut(d).zip(tokens).for_each(|(row, &t)| {
        let t = t as usize;
        row.copy_from_slice(&table[t * d..(t + 1) * d]);
    });
}

/// Token rows are grouped (a sorted index), so every touched `dtable` row is summed in f32 and
/// stored once, and rows update in parallel without sharing.
pub(super) fn embedding_backward<T: Float>(dtable: &mut [T], dout: &[T], tokens: &[u32], d: usize) {
    let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
    order.sort_unstable_by_key(|&i| tokens[i as usize]);
    dtable.par_chunks_mut(d).enumerate().for_each(|(v, drow)| {
        let start = order.partition_point(|&i| (tokens[i as usize] as usize) < v);
        let uses = order[start..]
            .iter()
            .take_while(|&&i| tokens[i as usize] as usize == v);
        let mut acc: Option<Vec<f32>> = None;
        for &i in uses {
            let acc = acc.get_or_insert_with(|| drow.iter().map(|x| x.to_f32()).collect());
            let g = &dout[i as usize * d..(i as usize + 1) * d];
            acc.iter_mut().zip(g).for_each(|(a, g)| *a += g.to_f32());
        }
        if let Some(acc) = acc {
            drow.iter_mut()
                .zip(&acc)
                .for_each(|(x, &a)| *x = T::from_f32(a));
        }
    });
}
