//! Sampling candidates on the device (`topk_lse` in kernels.cu): for each logits row z [V] at
//! temperature τ, its k best ids and logits in the sampler's order
//! (`reel_model::generate::rank_order`: larger first in the IEEE total order, equal logits by the
//! smaller id), sorted, and the two parts of its log-sum-exp, m = max z (NaN ignored) and
//! Σ exp((z − m)/τ) in f32, so that log π(t) = (z_t − m)/τ − ln Σ and lse = m/τ + ln Σ
//! (`reel_rollout::sample`). The CPU reference is `reel_rollout::sample::top_rows_reference`.
//!
//! What a rollout step downloads in place of its logits rows ([`crate::GpuDecoder`]): k ids,
//! k logits and two floats a row, not V floats. One block of 1024 threads per row; a radix
//! select over 32-bit order keys (three digit passes at most, each a shared-memory histogram),
//! one collecting pass in id order (ties at the k-th value go to the smallest ids, a block
//! scan), a bitonic sort of the k; the sum is f32 per thread, then a fixed tree.

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{as_i32, cfg, check, launch};
use crate::{shape_err, Gpu, Result};

/// The most candidates [`Gpu::topk_lse`] returns per row (its sort runs in one block of 1024
/// threads and its candidates fit in shared memory). Covers every top-k a sampler is usually
/// given (50 in the benchmark, tens to a few hundred in RL recipes) and greedy (1).
pub const TOPK_CAP: usize = 1024;

impl Gpu {
    /// For each of `rows` rows of `logits` [rows, v] at temperature `temps[r]` (> 0, finite;
    /// the caller's to check): `ids` [rows, k] its k best ids sorted in `rank_order`, and in
    /// `out` [rows·(k + 2)] first their logits [rows, k], then each row's max [rows], then its
    /// Σ exp((z − max)/τ_r) [rows]. 1 ≤ k ≤ min(v, [`TOPK_CAP`]).
    #[allow(clippy::too_many_arguments)]
    pub fn topk_lse(
        &self,
        ids: &mut impl DevWrite<u32>,
        out: &mut impl DevWrite<f32>,
        logits: &impl DevRead<f32>,
        temps: &impl DevRead<f32>,
        rows: usize,
        v: usize,
        k: usize,
    ) -> Result<()> {
        let op = "topk_lse";
        if k == 0 || k > v.min(TOPK_CAP) {
            return shape_err(format!(
                "{op}: k = {k} must be in 1..=min(V = {v}, {TOPK_CAP})"
            ));
        }
        check(op, "ids", ids.dlen(), rows * k)?;
        check(op, "out", out.dlen(), rows * (k + 2))?;
        check(op, "logits", logits.dlen(), rows * v)?;
        check(op, "temps", temps.dlen(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        // Ids and the chunk offsets are 32-bit in the kernel.
        let v64 = as_i32(op, "V", v)? as i64;
        let (k32, rows32) = (as_i32(op, "k", k)?, as_i32(op, "rows", rows)?);
        self.bind()?;
        let (i, o, z, t) = (ids.dptr(), out.dptr(), logits.dptr(), temps.dptr());
        launch!(
            self,
            &self.kernels.topk_lse,
            cfg((rows32 as u32, 1, 1), (1024, 1, 1)),
            &i,
            &o,
            &z,
            &t,
            &v64,
            &k32
        )
    }
}
