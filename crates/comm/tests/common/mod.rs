//! Helpers shared by the integration tests: per-rank random inputs (never zeros), NaN-poisoned
//! outputs, the comparison tolerance, and unwrapping every rank's result.

#![allow(dead_code)]

use std::time::Duration;

use reel_comm::CommError;
use reel_tensor::Tolerance;

/// World sizes every collective is tested at.
pub const WORLD_SIZES: [usize; 5] = [1, 2, 3, 4, 8];

/// Timeout of the tests that expect success (generous: they never wait on it).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Sums of a few f32 values in another order.
pub const SUM_TOL: Tolerance = Tolerance::new(1e-5, 1e-5);

/// Rank `rank`'s input of `n` values for test `seed`: uniform in [-1, 1), different per rank.
pub fn input(seed: u64, rank: usize, n: usize) -> Vec<f32> {
    let mut rng = reel_tensor::rng(seed * 1000 + rank as u64);
    reel_tensor::uniform_vec(&mut rng, n, 1.0)
}

/// An output buffer filled with NaN, so an element a collective forgets to write fails the test.
pub fn poisoned(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Every rank's value, panicking with the rank and error on the first failure.
pub fn all_ok<T>(results: Vec<Result<T, CommError>>) -> Vec<T> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, res)| res.unwrap_or_else(|e| panic!("rank {r} failed: {e}")))
        .collect()
}

/// `check_close` that panics with its message.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32]) {
    if let Err(msg) = reel_tensor::check_close(what, actual, expected, SUM_TOL) {
        panic!("{msg}");
    }
}
