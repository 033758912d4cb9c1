//! CPU matmul in the nn.Linear layout, on the `gemm` crate.
//!
//! inp [M, K], weight [N, K], bias [N], out [M, N]: `out = inp · weightᵀ + bias`.
//! Row-major buffers; transposes are expressed with strides, never copied. Every product goes
//! through [`gemm_strided`] (`dst = (accumulate ? dst : 0) + beta·lhs·rhs`, bounds-checked),
//! threaded above [`SERIAL_FLOPS`]. bf16 widens to f32 scratch, runs the f32 path and rounds back.

use std::any::TypeId;

use rayon::prelude::*;
use reel_tensor::Float;

use crate::gemm::{gemm_strided, Parallelism};

/// Below this many multiply-adds gemm runs on the calling thread.
const SERIAL_FLOPS: usize = 64 * 64 * 64;

/// Columns of `dbias` one rayon task sums.
const BIAS_COLS: usize = 256;

fn parallelism(m: usize, k: usize, n: usize) -> Parallelism {
    if m.saturating_mul(k).saturating_mul(n) < SERIAL_FLOPS {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `x` viewed as `f32` when `T` is `f32`.
fn as_f32<T: Float>(x: &[T]) -> Option<&[f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice already is a slice of f32.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
    } else {
        None
    }
}

/// `x` viewed as `f32` when `T` is `f32`.
fn as_f32_mut<T: Float>(x: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice already is a slice of f32.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
    } else {
        None
    }
}

fn widen<T: Float>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn store<T: Float>(dst: &mut [T], src: &[f32]) {
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &s)| *d = T::from_f32(s));
}

/// `out[m,n] = inp[m,k] · weight[n,k]ᵀ (+ bias)` in f32. Lengths are checked by the caller.
fn forward_f32(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let read_dst = match bias {
        Some(b) => {
            out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
            true
        }
        None => false,
    };
    // out is [m, n] (row stride n), inp is [m, k] (row stride k), and weight is [n, k], read as
    // the [k, n] matrix weightᵀ: element (kk, j) at j*k + kk.
    gemm_strided(
        out,
        n,
        read_dst,
        inp,
        k,
        1,
        weight,
        1,
        k,
        1.0,
        m,
        n,
        k,
        parallelism(m, k, n),
    );
}

/// `dinp[m,k] = dout[m,n] · weight[n,k]` (overwrites).
fn backward_dinp_f32(dinp: &mut [f32], dout: &[f32], weight: &[f32], m: usize, k: usize, n: usize) {
    if m == 0 || k == 0 {
        return;
    }
    // dinp is [m, k], dout [m, n], weight [n, k], all row-major.
    gemm_strided(
        dinp,
        k,
        false,
        dout,
        n,
        1,
        weight,
        k,
        1,
        1.0,
        m,
        k,
        n,
        parallelism(m, k, n),
    );
}

/// `dweight[n,k] += dout[m,n]ᵀ · inp[m,k]`.
fn backward_dweight_f32(
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    if n == 0 || k == 0 {
        return;
    }
    // dweight is [n, k]; doutᵀ is the [n, m] matrix with element (j, i) at i*n + j; inp is
    // [m, k].
    gemm_strided(
        dweight,
        k,
        true,
        dout,
        1,
        n,
        inp,
        k,
        1,
        1.0,
        n,
        k,
        m,
        parallelism(m, k, n),
    );
}

/// `dbias[j] += Σ_i dout[i, j]`, summed in f32 per column block, stored once.
fn backward_dbias<T: Float>(dbias: &mut [T], dout: &[T], m: usize, n: usize) {
    if n == 0 {
        return;
    }
    dbias
        .par_chunks_mut(BIAS_COLS)
        .enumerate()
        .for_each(|(blk, db)| {
            let c0 = blk * BIAS_COLS;
            let mut acc: Vec<f32> = db.iter().map(|v| v.to_f32()).collect();
            for row in dout.chunks_exact(n).take(m) {
                for (a, g) in acc.iter_mut().zip(&row[c0..c0 + db.len()]) {
                    *a += g.to_f32();
                }
            }
            store(db, &acc);
        });
}

pub(super) fn matmul_forward<T: Float>(
    out: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    m: usize,
    k: usize,
    n: usize,
) {
    if let (Some(inp32), Some(w32)) = (as_f32(inp), as_f32(weight)) {
        let b32 = bias.map(|b| as_f32(b).expect("bias has the dtype of inp"));
        let out32 = as_f32_mut(out).expect("out has the dtype of inp");
        forward_f32(out32, inp32, w32, b32, m, k, n);
        return;
    }
    let bias32 = bias.map(widen);
    let mut out32 = vec![0.0f32; m * n];
    forward_f32(
        &mut out32,
        &widen(inp),
        &widen(weight),
        bias32.as_deref(),
        m,
        k,
        n,
    );
    store(out, &out32);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_backward<T: Float>(
    dinp: Option<&mut [T]>,
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    weight: &[T],
    m: usize,
    k: usize,
    n: usize,
) {
    if let Some(db) = dbias {
        backward_dbias(db, dout, m, n);
    }
    if let (Some(dout32), Some(inp32), Some(w32)) = (as_f32(dout), as_f32(inp), as_f32(weight)) {
        if let Some(di) = dinp {
            let di32 = as_f32_mut(di).expect("dinp has the dtype of inp");
            backward_dinp_f32(di32, dout32, w32, m, k, n);
        }
        let dw32 = as_f32_mut(dweight).expect("dweight has the dtype of inp");
        backward_dweight_f32(dw32, dout32, inp32, m, k, n);
        return;
    }
    let dout32 = widen(dout);
    if let Some(di) = dinp {
        let mut di32 = vec![0.0f32; m * k];
        backward_dinp_f32(&mut di32, &dout32, &widen(weight), m, k, n);
        store(di, &di32);
    }
    let mut dw32 = widen(dweight);
    backward_dweight_f32(&mut dw32, &dout32, &widen(inp), m, k, n);
    store(dweight, &dw32);
}

pub(super) fn matmul_forward_ref(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias.map_or(0.0f64, |b| b[j] as f64);
            for kk in 0..k {
                acc += inp[i * k + kk] as f64 * weight[j * k + kk] as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
}
