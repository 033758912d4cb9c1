//! The model tests' shared pieces: the opt-in switch and a random token batch.

use rand::Rng as _;
use reel_model::TokenBatch;

pub fn enabled() -> bool {
    if std::env::var("REEL_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set REEL_GPU_TESTS=1 to run the GPU tests");
        return false;
    }
    true
}

/// A random [B, T] batch: every `unlabelled_every`-th target unlabelled, default positions.
pub struct Case {
    pub tokens: Vec<u32>,
    pub targets: Vec<i32>,
    pub positions: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

impl Case {
    pub fn new(seed: u64, vocab: usize, b: usize, t: usize, unlabelled_every: usize) -> Self {
        let mut r = reel_tensor::rng(seed);
        let n = b * t;
        let tokens: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
        let targets: Vec<i32> = (0..n)
            .map(|i| {
                if i % unlabelled_every == 0 {
                    -100
                } else {
                    r.random_range(0..vocab as i32)
                }
            })
            .collect();
        Case {
            tokens,
            targets,
            positions: reel_model::default_positions(b, t),
            b,
            t,
        }
    }
    pub fn batch(&self) -> TokenBatch<'_> {
        TokenBatch {
            tokens: &self.tokens,
            targets: &self.targets,
            positions: &self.positions,
            b: self.b,
            t: self.t,
        }
    }
}
