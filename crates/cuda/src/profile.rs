//! Device time by kind of op, opt-in: where a training step's milliseconds go.
//!
//! Between [`Gpu::profile_begin`] and [`Gpu::profile_end`] every top-level op a [`Gpu`] enqueues
//! is bracketed by two CUDA events on its stream, under one category:
//!
//! - `gemm`: cuBLASLt projections (`matmul_forward`, `matmul_forward_accumulate`,
//!   `matmul_backward`);
//! - `attention`: fused attention forward and backward (cuDNN, with the lse transpose);
//! - `lm_head_ce`: the chunked LM head + cross-entropy forward and backward (their GEMMs and
//!   softmax kernels together);
//! - `optimizer`: AdamW and the gradient-norm clip;
//! - `kernels`: every other kernel (embedding, RMSNorm, RoPE, SwiGLU, residual adds, casts,
//!   gathers, attention merges) and memsets.
//!
//! Nested ops count once, under the outermost (a GEMM inside the LM head counts as
//! `lm_head_ce`). The events measure each op's own time on the device, so what a wall-clock step
//! has beyond the categories' sum is time the device spent idle (host work, synchronisation,
//! launch gaps) or in untimed copies. Profiling adds two event records per op; leave it off for
//! timing runs. Off, it costs one relaxed atomic load per op.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use cudarc::driver::{sys as dsys, CudaEvent};

use crate::{Gpu, Result};

/// One category's device time over a profiled span.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    pub category: &'static str,
    /// Sum of the category's ops' device time (ms).
    pub ms: f64,
    /// Ops timed.
    pub ops: u64,
}

/// A [`Gpu`]'s profiling state.
#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    /// Nesting depth of timed ops on this `Gpu` (used from one thread at a time).
    depth: AtomicUsize,
    spans: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

/// Sums `(category, ms)` pairs per category, largest first (ties by name).
pub fn sum_by_category(spans: &[(&'static str, f64)]) -> Vec<ProfileRow> {
    let mut by: BTreeMap<&'static str, (f64, u64)> = BTreeMap::new();
    for &(c, ms) in spans {
        let e = by.entry(c).or_default();
        e.0 += ms;
        e.1 += 1;
    }
    let mut rows: Vec<ProfileRow> = by
        .into_iter()
        .map(|(category, (ms, ops))| ProfileRow { category, ms, ops })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.category.cmp(b.category)));
    rows
}

impl Gpu {
    /// Starts timing this `Gpu`'s ops by category (module docs), dropping any earlier spans.
    pub fn profile_begin(&self) {
        self.prof
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.prof.on.store(true, Ordering::Relaxed);
    }

    /// Stops timing, waits for the stream, and returns each category's device time since
    /// [`Gpu::profile_begin`], largest first.
    pub fn profile_end(&self) -> Result<Vec<ProfileRow>> {
        self.prof.on.store(false, Ordering::Relaxed);
        self.synchronize()?;
        let spans = std::mem::take(&mut *self.prof.spans.lock().unwrap_or_else(|e| e.into_inner()));
        let mut ms = Vec::with_capacity(spans.len());
        for (c, a, b) in &spans {
            ms.push((*c, a.elapsed_ms(b)? as f64));
        }
        Ok(sum_by_category(&ms))
    }

    /// Runs `f` (which enqueues ops on this `Gpu`'s stream) as one op of `category` while
    /// profiling is on and no timed op encloses it; otherwise just runs it.
    pub(crate) fn timed<R>(
        &self,
        category: &'static str,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if !self.prof.on.load(Ordering::Relaxed) {
            return f();
        }
        let outer = self.prof.depth.fetch_add(1, Ordering::Relaxed) == 0;
        let start = if outer {
            self.record_event().ok()
        } else {
            None
        };
        let r = f();
        self.prof.depth.fetch_sub(1, Ordering::Relaxed);
        if let (Some(a), Ok(_)) = (start, &r) {
            if let Ok(b) = self.record_event() {
                self.prof
                    .spans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((category, a, b));
            }
        }
        r
    }

    fn record_event(&self) -> Result<CudaEvent> {
        let e = self
            .ctx
            .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(&self.stream)?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_summed_per_category_largest_first() {
        let rows = sum_by_category(&[
            ("kernels", 0.5),
            ("gemm", 2.0),
            ("kernels", 0.25),
            ("attention", 2.0),
            ("gemm", 1.0),
        ]);
        let got: Vec<(&str, f64, u64)> = rows.iter().map(|r| (r.category, r.ms, r.ops)).collect();
        assert_eq!(
            got,
            vec![
                ("gemm", 3.0, 2),
                ("attention", 2.0, 1),
                ("kernels", 0.75, 2)
            ]
        );
        assert!(sum_by_category(&[]).is_empty());
    }
}
