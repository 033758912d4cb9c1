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
//! Each op also has a name (the function, or the kernel for `kernels`), so a profile lists the
//! ops by time too. Nested ops count once, under the outermost (a GEMM inside the LM head counts
//! as `lm_head_ce`). The events measure each op's own time on the device, so what a wall-clock step
//! has beyond the categories' sum is time the device spent idle (host work, synchronisation,
//! launch gaps) or in untimed copies. Profiling adds two event records per op; leave it off for
//! timing runs. Off, it costs one relaxed atomic load per op.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use cudarc::driver::{sys as dsys, CudaEvent};

use crate::{Gpu, Result};

/// A profiled span's device time, by category and by op (largest first).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub by_category: Vec<ProfileRow>,
    /// Keyed by op name: the function (`matmul_backward`) or the kernel (`swiglu_bwd`).
    pub by_op: Vec<ProfileRow>,
}

impl Profile {
    /// Total device time (ms).
    pub fn total_ms(&self) -> f64 {
        self.by_category.iter().map(|r| r.ms).sum()
    }
}

/// One category's (or op's) device time over a profiled span.
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
    spans: Mutex<Vec<Span>>,
}

/// (category, op name, start, end).
type Span = (&'static str, &'static str, CudaEvent, CudaEvent);

/// The kernel's name in a `launch!` function expression (`&self.kernels.swiglu_fwd[T::INDEX]`
/// → `swiglu_fwd`); other names unchanged.
pub fn kernel_name(expr: &'static str) -> &'static str {
    let tail = match expr.rfind("kernels.") {
        Some(i) => &expr[i + "kernels.".len()..],
        None => return expr,
    };
    let end = tail
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(tail.len());
    &tail[..end]
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

    /// Stops timing, waits for the stream, and returns the device time since
    /// [`Gpu::profile_begin`] by category and by op.
    pub fn profile_end(&self) -> Result<Profile> {
        self.prof.on.store(false, Ordering::Relaxed);
        self.synchronize()?;
        let spans = std::mem::take(&mut *self.prof.spans.lock().unwrap_or_else(|e| e.into_inner()));
        let mut cats = Vec::with_capacity(spans.len());
        let mut ops = Vec::with_capacity(spans.len());
        for (c, name, a, b) in &spans {
            let ms = a.elapsed_ms(b)? as f64;
            cats.push((*c, ms));
            ops.push((kernel_name(name), ms));
        }
        Ok(Profile {
            by_category: sum_by_category(&cats),
            by_op: sum_by_category(&ops),
        })
    }

    /// Runs `f` (which enqueues ops on this `Gpu`'s stream) as one op `name` of `category`
    /// while profiling is on and no timed op encloses it; otherwise just runs it.
    pub(crate) fn timed<R>(
        &self,
        category: &'static str,
        name: &'static str,
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
                    .push((category, name, a, b));
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

    #[test]
    fn kernel_names_come_from_the_launch_expression() {
        assert_eq!(
            kernel_name("&self.kernels.swiglu_fwd[T::INDEX]"),
            "swiglu_fwd"
        );
        assert_eq!(kernel_name("& g.kernels.adamw_step"), "adamw_step");
        assert_eq!(kernel_name("matmul_backward"), "matmul_backward");
        assert_eq!(kernel_name("&f"), "&f");
        // What `launch!` hands over: an `expr` fragment, stringified.
        macro_rules! as_launch {
            ($f:expr) => {
                stringify!($f)
            };
        }
        assert_eq!(
            kernel_name(as_launch!(&self.kernels.rmsnorm_bwd_dinp[T::INDEX])),
            "rmsnorm_bwd_dinp"
        );
        assert_eq!(kernel_name(as_launch!(&g.kernels.adamw_step)), "adamw_step");
    }
}
