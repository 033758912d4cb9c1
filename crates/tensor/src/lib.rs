//! reel-tensor: element types, shapes and host tensors.
//!
//! Kernels work on plain slices with explicit dimensions (llm.c style); this crate gives those
//! slices an element type ([`Float`]: `f32` or `bf16`, always accumulated in `f32`), a [`Tensor`]
//! that owns a buffer with its [`Shape`] and [`DType`], and [`check_close`], the one numeric
//! comparison every test uses (`|a - b| <= atol + rtol * |b|`, reporting the first mismatches).

mod compare;
mod float;
pub mod gradcheck;
mod tensor;

pub use compare::{check_close, max_abs_diff, Mismatch, Tolerance};
pub use float::{DType, Float};
pub use half::bf16;
pub use tensor::{convert, Device, Shape, Storage, Tensor, TensorError};

/// A seeded generator for reproducible test data and initialisation.
pub type Rng = rand_chacha::ChaCha8Rng;

/// A reproducible generator from a seed.
pub fn rng(seed: u64) -> Rng {
    use rand::SeedableRng;
    Rng::seed_from_u64(seed)
}

/// `n` values drawn uniformly from `[-scale, scale)`: test data that is never all zeros.
pub fn uniform_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    use rand::Rng as _;
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}
