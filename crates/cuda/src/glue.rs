//! Elementwise glue of the device-resident training step (`model.rs`): the fused q/k/v
//! projection's split [N, H·D + 2·H_kv·D] → q [N, H·D], k, v [N, H_kv·D] and its transpose, the
//! residual add, the fp32 master → storage cast, storage → fp32 gradient accumulation, and the
//! global gradient norm's sum of squares and clipping scale (torch's `clip_grad_norm_`).

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{as_i32, cfg, check, elementwise_grid, launch};
use crate::{DeviceBuf, Gpu, GpuFloat, Result};

/// Values [`Gpu::upload_cast`] stages at a time (256 MiB of f32).
pub const UPLOAD_CAST_CHUNK: usize = 1 << 26;

/// Blocks of the sum-of-squares kernel (fixed, so the partial sums and their order are too).
const SUMSQ_BLOCKS: usize = 1024;

impl Gpu {
    /// q, k, v from the fused projection output qkv [n, qw + 2·kvw] (rows q, then k, then v).
    #[allow(clippy::too_many_arguments)]
    pub fn split_qkv<T: GpuFloat>(
        &self,
        q: &mut impl DevWrite<T>,
        k: &mut impl DevWrite<T>,
        v: &mut impl DevWrite<T>,
        qkv: &impl DevRead<T>,
        n: usize,
        qw: usize,
        kvw: usize,
    ) -> Result<()> {
        let lens = [qkv.dlen(), q.dlen(), k.dlen(), v.dlen()];
        let ptrs = [q.dptr(), k.dptr(), v.dptr(), qkv.dptr()];
        self.qkv_copy::<T>(true, ptrs, lens, n, qw, kvw)
    }

    /// The transpose of [`Gpu::split_qkv`]: dqkv [n, qw + 2·kvw] from dq, dk, dv (overwrites).
    #[allow(clippy::too_many_arguments)]
    pub fn merge_qkv<T: GpuFloat>(
        &self,
        qkv: &mut impl DevWrite<T>,
        q: &impl DevRead<T>,
        k: &impl DevRead<T>,
        v: &impl DevRead<T>,
        n: usize,
        qw: usize,
        kvw: usize,
    ) -> Result<()> {
        let lens = [qkv.dlen(), q.dlen(), k.dlen(), v.dlen()];
        let ptrs = [qkv.dptr(), q.dptr(), k.dptr(), v.dptr()];
        self.qkv_copy::<T>(false, ptrs, lens, n, qw, kvw)
    }

    /// `ptrs` in the kernel's argument order; `lens` = [qkv, q, k, v].
    fn qkv_copy<T: GpuFloat>(
        &self,
        split: bool,
        ptrs: [u64; 4],
        lens: [usize; 4],
        n: usize,
        qw: usize,
        kvw: usize,
    ) -> Result<()> {
        let op = if split { "split_qkv" } else { "merge_qkv" };
        check(op, "qkv", lens[0], n * (qw + 2 * kvw))?;
        check(op, "q", lens[1], n * qw)?;
        check(op, "k", lens[2], n * kvw)?;
        check(op, "v", lens[3], n * kvw)?;
        if lens[0] == 0 {
            return Ok(());
        }
        let (qw32, kvw32, n64) = (as_i32(op, "qw", qw)?, as_i32(op, "kvw", kvw)?, n as i64);
        self.bind()?;
        let f = if split {
            &self.kernels.split_qkv[T::INDEX]
        } else {
            &self.kernels.merge_qkv[T::INDEX]
        };
        let [a, b, c, d] = ptrs;
        self.timed("kernels", op, || {
            launch!(
                self,
                f,
                cfg((elementwise_grid(lens[0]), 1, 1), (256, 1, 1)),
                &a,
                &b,
                &c,
                &d,
                &n64,
                &qw32,
                &kvw32
            )
        })
    }

    /// `dst += src` elementwise (f32 arithmetic, rounded to the storage type).
    pub fn add_inplace<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<T>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        check("add_inplace", "src", src.dlen(), dst.dlen())?;
        self.elementwise(
            "add_inplace",
            &self.kernels.add_inplace[T::INDEX],
            dst.dptr(),
            src.dptr(),
            dst.dlen(),
        )
    }

    /// Uploads the f32 `host` values into the first `host.len()` elements of `dst`, rounded to
    /// its storage type, through a staging buffer of at most [`UPLOAD_CAST_CHUNK`] values: the
    /// whole fp32 copy never sits on the device (at 7B that copy alone is 30.5 GB, beside the
    /// 15 GB it is cast to).
    pub fn upload_cast<T: GpuFloat>(&self, dst: &mut DeviceBuf<T>, host: &[f32]) -> Result<()> {
        if host.len() > dst.len() {
            return crate::shape_err(format!(
                "upload_cast: {} host values into a buffer of {}",
                host.len(),
                dst.len()
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        let mut stage = self.alloc_zeros::<f32>(host.len().min(UPLOAD_CAST_CHUNK))?;
        for at in (0..host.len()).step_by(UPLOAD_CAST_CHUNK) {
            let end = (at + UPLOAD_CAST_CHUNK).min(host.len());
            let mut part = stage.view_mut(0..end - at)?;
            self.upload_into(&mut part, &host[at..end])?;
            // Stream order: the next chunk's upload into the stage waits for this cast.
            self.cast_from_f32(&mut dst.view_mut(at..end)?, &part)?;
        }
        self.synchronize()
    }

    /// `dst = src` rounded to the storage type (bf16 weights from fp32 master weights).
    pub fn cast_from_f32<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<T>,
        src: &impl DevRead<f32>,
    ) -> Result<()> {
        check("cast_from_f32", "src", src.dlen(), dst.dlen())?;
        self.elementwise(
            "cast_from_f32",
            &self.kernels.cast_from_f32[T::INDEX],
            dst.dptr(),
            src.dptr(),
            dst.dlen(),
        )
    }

    /// `dst += src` in f32 (a micro-batch's gradients into the step's fp32 gradients).
    pub fn accum_f32<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<f32>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        check("accum_f32", "src", src.dlen(), dst.dlen())?;
        self.elementwise(
            "accum_f32",
            &self.kernels.accum_f32[T::INDEX],
            dst.dptr(),
            src.dptr(),
            dst.dlen(),
        )
    }

    /// Launches an elementwise kernel `f(dst, src, n)` over `n` elements (none when `n` is 0).
    pub(crate) fn elementwise(
        &self,
        name: &'static str,
        f: &cudarc::driver::CudaFunction,
        dst: u64,
        src: u64,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let n64 = n as i64;
        // Named here: the kernel is chosen at run time (the profile's op name).
        self.timed("kernels", name, || {
            launch!(
                self,
                f,
                cfg((elementwise_grid(n), 1, 1), (256, 1, 1)),
                &dst,
                &src,
                &n64
            )
        })
    }

    /// Σ x² over every buffer in `xs` (f32 per block of a fixed grid, then f64 on the host):
    /// the squared global L2 norm of the gradients. Waits for the stream.
    pub fn sum_squares(&self, xs: &[&dyn DevRead<f32>]) -> Result<f64> {
        let partial = self.scratch::<f32>(SUMSQ_BLOCKS * xs.len().max(1))?;
        self.bind()?;
        for (i, x) in xs.iter().enumerate() {
            let n = x.dlen();
            let p = partial.dptr() + (i * SUMSQ_BLOCKS * 4) as u64;
            let (xp, n64) = (x.dptr(), n as i64);
            launch!(
                self,
                &self.kernels.sumsq_partial,
                cfg((SUMSQ_BLOCKS as u32, 1, 1), (256, 1, 1)),
                &p,
                &xp,
                &n64
            )?;
        }
        let host = self.download(&partial)?;
        Ok(host[..SUMSQ_BLOCKS * xs.len()]
            .iter()
            .map(|&v| v as f64)
            .sum())
    }

    /// `x *= s` in f32 arithmetic, rounded to the storage type (the LM head's 1/temperature on
    /// the final normed rows and their gradient).
    pub fn scale_inplace<T: GpuFloat>(&self, x: &mut impl DevWrite<T>, s: f32) -> Result<()> {
        let n = x.dlen();
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let (xp, n64) = (x.dptr(), n as i64);
        launch!(
            self,
            &self.kernels.scale_inplace[T::INDEX],
            cfg((elementwise_grid(n), 1, 1), (256, 1, 1)),
            &xp,
            &n64,
            &s
        )
    }

    /// `x *= s` (f32).
    pub fn scale_f32(&self, x: &mut impl DevWrite<f32>, s: f32) -> Result<()> {
        let n = x.dlen();
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let (xp, n64) = (x.dptr(), n as i64);
        launch!(
            self,
            &self.kernels.scale_f32,
            cfg((elementwise_grid(n), 1, 1), (256, 1, 1)),
            &xp,
            &n64,
            &s
        )
    }
}
