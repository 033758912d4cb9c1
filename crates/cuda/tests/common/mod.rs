//! Helpers shared by the opt-in GPU tests: the process's one `Gpu` (only with
//! `REEL_GPU_TESTS=1`), random and poisoned buffers, and the comparison against a CPU reference
//! (`check_close` elementwise plus a relative-norm bound, one line printed per case); `launch`
//! (multi-process tests, one GPU per rank) and `sp` (the device SP attention cases).
#![allow(dead_code)]

pub mod launch;
pub mod model;
#[cfg(feature = "cudnn")]
pub mod sp;

use std::sync::{Mutex, MutexGuard, OnceLock};

use reel_cuda::{Gpu, GpuFloat};
use reel_tensor::{check_close, uniform_vec, Float, Rng, Tolerance};

pub fn gpu() -> Option<MutexGuard<'static, Gpu>> {
    if std::env::var("REEL_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set REEL_GPU_TESTS=1 to run the GPU tests");
        return None;
    }
    static GPU: OnceLock<Mutex<Gpu>> = OnceLock::new();
    let g = GPU.get_or_init(|| {
        let g = Gpu::open(0).unwrap_or_else(|e| panic!("REEL_GPU_TESTS=1 but no usable GPU: {e}"));
        eprintln!("{}", g.info());
        Mutex::new(g)
    });
    Some(g.lock().unwrap_or_else(|p| p.into_inner()))
}

pub fn to_t<T: Float>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

pub fn widen<T: Float>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn poison<T: Float>(n: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); n]
}

pub fn rand_t<T: Float>(r: &mut Rng, n: usize, scale: f32) -> Vec<T> {
    to_t(&uniform_vec(r, n, scale))
}

pub fn rel_norm_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Elementwise `check_close` (NaN never passes) plus a relative-norm bound; prints both. The
/// norm bound is skipped where the reference is itself within `atol` of zero (the output of a
/// cancellation, as RMSNorm's dinp at d = 1), where only absolute error means anything.
pub fn compare(what: &str, gpu: &[f32], cpu: &[f32], tol: Tolerance, max_rel_norm: f64) {
    let rel = rel_norm_err(gpu, cpu);
    let maxd = reel_tensor::max_abs_diff(gpu, cpu);
    let rms =
        (cpu.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cpu.len().max(1) as f64).sqrt();
    let near_zero = tol.atol > 0.0 && rms <= 10.0 * tol.atol as f64;
    let note = if near_zero {
        "  (reference ~ 0: norm not checked)"
    } else {
        ""
    };
    eprintln!("  {what:<58} max|diff| {maxd:.3e}  rel-norm {rel:.3e}{note}");
    if let Err(e) = check_close(what, gpu, cpu, tol) {
        panic!("{e}");
    }
    assert!(
        near_zero || rel <= max_rel_norm,
        "{what}: relative norm error {rel:.3e} > {max_rel_norm:.1e}"
    );
}

/// Elementwise ops: f32 storage agrees to rounding; bf16 to one bf16 step (2⁻⁸ relative).
pub fn tol<T: GpuFloat>(scale: f32) -> (Tolerance, f64) {
    if T::INDEX == 0 {
        (Tolerance::new(1e-5 * scale, 1e-5), 1e-5)
    } else {
        (Tolerance::new(1e-2 * scale, 1e-2), 1e-2)
    }
}

pub fn name<T: GpuFloat>() -> &'static str {
    T::SUFFIX
}

/// Runs every case, even after one fails (its panic message is printed as it happens), then
/// fails naming the cases that did: one GPU run reports every broken shape at once.
pub fn run_all(what: &str, cases: Vec<(String, Box<dyn FnOnce() + '_>)>) {
    let mut failed = Vec::new();
    for (name, f) in cases {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "{what}: failing cases: {failed:?}");
}
