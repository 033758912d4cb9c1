//! CPU SwiGLU: gate_up [N, 2I] (gate in columns [0, I), up in [I, 2I)) → out [N, I],
//! `out = silu(gate) · up`, `silu(g) = g · σ(g)`; backward
//! `dgate = dout · up · σ(g) · (1 + g · (1 − σ(g)))`, `dup = dout · silu(g)`.

use rayon::prelude::*;
use reel_tensor::Float;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(super) fn swiglu_forward<T: Float>(out: &mut [T], gate_up: &[T], i: usize) {
    out.par_chunks_mut(i)
        .zip(gate_up.par_chunks(2 * i))
        .for_each(|(y, gu)| {
            let (gate, up) = gu.split_at(i);
            for ((y, g), u) in y.iter_mut().zip(gate).zip(up) {
                let g = g.to_f32();
                *y = T::from_f32(g * sigmoid(g) * u.to_f32());
            }
        });
}

pub(super) fn swiglu_backward<T: Float>(dgate_up: &mut [T], dout: &[T], gate_up: &[T], i: usize) {
    dgate_up
        .par_chunks_mut(2 * i)
        .zip(dout.par_chunks(i))
        .zip(gate_up.par_chunks(2 * i))
        .for_each(|((dgu, dy), gu)| {
            let (dgate, dup) = dgu.split_at_mut(i);
            let (gate, up) = gu.split_at(i);
            for j in 0..i {
                let (g, u, dy) = (gate[j].to_f32(), up[j].to_f32(), dy[j].to_f32());
                let s = sigmoid(g);
                dgate[j] = T::from_f32(dy * u * s * (1.0 + g * (1.0 - s)));
                dup[j] = T::from_f32(dy * g * s);
            }
        });
}
