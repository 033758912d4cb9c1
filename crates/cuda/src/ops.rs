//! reel's own kernels (`kernels.cu`): NVRTC compilation and the host side of each op.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::{result as nvres, sys as nvsys, Ptx};

use crate::buffer::{DevRead, DevWrite};
use crate::{shape_err, DeviceBuf, Gpu, GpuError, GpuFloat, Result};

const SOURCE: &str = include_str!("kernels.cu");

/// Rows one block of the column-sum kernel covers at least (its partial sums are then added in
/// order).
const COLSUM_ROWS: usize = 64;

/// Compiles `src` to a CUBIN for `arch` (`sm_90`) with NVRTC. Errors carry NVRTC's log.
fn compile_cubin(src: &str, arch: &str, includes: &[PathBuf]) -> Result<Vec<u8>> {
    let nv = |what: &str| {
        let what = what.to_string();
        move |e: nvres::NvrtcError| GpuError::Nvrtc(format!("{what}: {e:?}"))
    };
    let src_c = CString::new(src).map_err(|e| GpuError::Nvrtc(e.to_string()))?;
    let name = CString::new("reel_kernels.cu").expect("no NUL");
    let prog = nvres::create_program(&src_c, Some(&name)).map_err(nv("nvrtcCreateProgram"))?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    opts.extend(
        includes
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    // SAFETY: `prog` is alive until destroyed at the end; buffers are sized by NVRTC's answers.
    let result = unsafe {
        match nvres::compile_program(prog, &opts) {
            Ok(()) => {
                let mut size = 0usize;
                nvsys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(nv("nvrtcGetCUBINSize"))
                    .and_then(|_| {
                        let mut buf = vec![0u8; size];
                        nvsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                            .result()
                            .map_err(nv("nvrtcGetCUBIN"))
                            .map(|_| buf)
                    })
            }
            Err(e) => {
                let log = nvres::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> = l
                            .iter()
                            .take_while(|&&c| c != 0)
                            .map(|&c| c as u8)
                            .collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                let hint = if includes.is_empty() && log.contains("cuda_bf16.h") {
                    "; cuda_bf16.h was not found: install the pip wheel nvidia-cuda-runtime or set REEL_CUDA_INCLUDE_DIRS"
                } else {
                    ""
                };
                Err(GpuError::Nvrtc(format!(
                    "compiling reel's kernels for {arch} failed ({e:?}){hint}:\n{log}"
                )))
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nvres::destroy_program(prog) };
    result
}

/// Compiled CUBINs by architecture, shared by every `Gpu` of the process.
fn cubin_for(arch: &str, includes: &[PathBuf]) -> Result<(Arc<Vec<u8>>, f64)> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache
        .lock()
        .map_err(|_| GpuError::Nvrtc("kernel cache poisoned".into()))?;
    if let Some(c) = map.get(arch) {
        return Ok((c.clone(), 0.0));
    }
    let t = Instant::now();
    let cubin = Arc::new(compile_cubin(SOURCE, arch, includes)?);
    map.insert(arch.to_string(), cubin.clone());
    Ok((cubin, t.elapsed().as_secs_f64()))
}

/// One entry point per storage type, indexed by [`GpuFloat::INDEX`].
type PerType = [CudaFunction; 2];

pub(crate) struct Kernels {
    rmsnorm_fwd: PerType,
    rmsnorm_bwd_dinp: PerType,
    colsum_partial: PerType,
    colsum_finish: PerType,
    swiglu_fwd: PerType,
    swiglu_bwd: PerType,
    embedding_fwd: PerType,
    embedding_bwd: PerType,
    rope: PerType,
    pub(crate) gather_rows: PerType,
    pub(crate) scatter_rows: PerType,
    pub(crate) put_kv_rows: PerType,
    pub(crate) ce_bwd_chunk: PerType,
    pub(crate) split_qkv: PerType,
    pub(crate) merge_qkv: PerType,
    pub(crate) add_inplace: PerType,
    pub(crate) scale_inplace: PerType,
    pub(crate) cast_from_f32: PerType,
    pub(crate) accum_f32: PerType,
    pub(crate) sumsq_partial: CudaFunction,
    pub(crate) scale_f32: CudaFunction,
    pub(crate) ce_fwd_chunk: CudaFunction,
    pub(crate) ce_fwd_finish: CudaFunction,
    pub(crate) attention_merge: CudaFunction,
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    pub(crate) lse_bth_to_bht: CudaFunction,
    pub(crate) adamw_step: CudaFunction,
    pub(crate) to_f32: PerType,
    pub(crate) fill_f32: CudaFunction,
    /// Paged decode attention per storage type, head dimension ([`PAGED_HEAD_DIMS`]) and head
    /// group ([`PAGED_HEAD_GROUPS`]).
    pub(crate) paged_attn: [[[CudaFunction; 4]; 4]; 2],
    pub(crate) paged_attn_combine: PerType,
    /// The decode step's q/k/v split, RoPE and KV-cache store in one pass (`decode.rs`).
    pub(crate) decode_qkv_store: PerType,
    /// Copies on write of paged KV blocks (`decode.rs`).
    pub(crate) kv_copy_blocks: PerType,
    /// The vision tower's exact GELU and segment attention (`vision.rs`).
    pub(crate) gelu_fwd: PerType,
    pub(crate) seg_attn_fwd: PerType,
    /// Sampling candidates and log-sum-exp of logits rows (`topk.rs`).
    pub(crate) topk_lse: CudaFunction,
}

/// Head dimensions the paged decode-attention kernel is built for.
pub const PAGED_HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];
/// Query heads one paged-attention block serves at most (its per-head registers), by variant.
pub(crate) const PAGED_HEAD_GROUPS: [usize; 4] = [1, 2, 4, 8];

impl Kernels {
    pub(crate) fn load(
        ctx: &Arc<CudaContext>,
        cc: (i32, i32),
        includes: &[PathBuf],
    ) -> Result<(Kernels, f64)> {
        let arch = format!("sm_{}{}", cc.0, cc.1);
        let (cubin, secs) = cubin_for(&arch, includes)?;
        let module = ctx.load_module(Ptx::from_binary(cubin.to_vec()))?;
        let get = |name: &str| -> Result<PerType> {
            Ok([
                module.load_function(&format!("{name}_f32"))?,
                module.load_function(&format!("{name}_bf16"))?,
            ])
        };
        Ok((
            Kernels {
                rmsnorm_fwd: get("rmsnorm_fwd")?,
                rmsnorm_bwd_dinp: get("rmsnorm_bwd_dinp")?,
                colsum_partial: get("colsum_partial")?,
                colsum_finish: get("colsum_finish")?,
                swiglu_fwd: get("swiglu_fwd")?,
                swiglu_bwd: get("swiglu_bwd")?,
                embedding_fwd: get("embedding_fwd")?,
                embedding_bwd: get("embedding_bwd")?,
                rope: get("rope")?,
                gather_rows: get("gather_rows")?,
                scatter_rows: get("scatter_rows")?,
                put_kv_rows: get("put_kv_rows")?,
                ce_bwd_chunk: get("ce_bwd_chunk")?,
                split_qkv: get("split_qkv")?,
                merge_qkv: get("merge_qkv")?,
                add_inplace: get("add_inplace")?,
                scale_inplace: get("scale_inplace")?,
                cast_from_f32: get("cast_from_f32")?,
                accum_f32: get("accum_f32")?,
                sumsq_partial: module.load_function("sumsq_partial")?,
                scale_f32: module.load_function("scale_f32")?,
                ce_fwd_chunk: module.load_function("ce_fwd_chunk")?,
                ce_fwd_finish: module.load_function("ce_fwd_finish")?,
                attention_merge: module.load_function("attention_merge")?,
                lse_bth_to_bht: module.load_function("lse_bth_to_bht")?,
                adamw_step: module.load_function("adamw_step")?,
                to_f32: get("to_f32")?,
                fill_f32: module.load_function("fill_f32")?,
                paged_attn: {
                    let f = |s: &str, d: usize, g: usize| {
                        module.load_function(&format!("paged_attn_{s}_d{d}_g{g}"))
                    };
                    let per_d = |s: &str, d: usize| -> Result<[CudaFunction; 4]> {
                        Ok([f(s, d, 1)?, f(s, d, 2)?, f(s, d, 4)?, f(s, d, 8)?])
                    };
                    let per = |s: &str| -> Result<[[CudaFunction; 4]; 4]> {
                        Ok([per_d(s, 32)?, per_d(s, 64)?, per_d(s, 128)?, per_d(s, 256)?])
                    };
                    [per("f32")?, per("bf16")?]
                },
                paged_attn_combine: get("paged_attn_combine")?,
                decode_qkv_store: get("decode_qkv_store")?,
                kv_copy_blocks: get("kv_copy_blocks")?,
                gelu_fwd: get("gelu_fwd")?,
                seg_attn_fwd: get("seg_attn_fwd")?,
                topk_lse: module.load_function("topk_lse")?,
            },
            secs,
        ))
    }
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// Threads for a row-per-block kernel over `d` columns: a multiple of 32, at most 1024.
pub(crate) fn row_threads(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Blocks for a grid-stride elementwise kernel over `total` items, 256 threads each.
pub(crate) fn elementwise_grid(total: usize) -> u32 {
    total.div_ceil(256).clamp(1, 132 * 32) as u32
}

pub(crate) fn as_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        GpuError::Shape(format!(
            "{op}: {what} = {v} exceeds the kernel's 32-bit limit"
        ))
    })
}

pub(crate) fn check(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return shape_err(format!("{op}: {what} has {got} elements, expected {want}"));
    }
    Ok(())
}

macro_rules! launch {
    ($gpu:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let gpu: &$crate::Gpu = &$gpu;
        gpu.timed("kernels", stringify!($f), || {
            let mut b = gpu.stream.launch_builder($f);
            $( b.arg($arg); )*
            // SAFETY: every pointer argument was checked against the kernel's extent by the
            // caller.
            unsafe { b.launch($cfg) }.map(|_| ()).map_err($crate::GpuError::from)
        })
    }};
}
pub(crate) use launch;

/// cos and sin of every (position, frequency) pair on the device, computed exactly as
/// `reel_kernels::rope::RopeTable::new` does (f32 `inv_freq`, f32 angle), [max_positions, D/2].
pub struct GpuRopeTable {
    head_dim: usize,
    max_positions: usize,
    pub(crate) cos: DeviceBuf<f32>,
    pub(crate) sin: DeviceBuf<f32>,
}

impl GpuRopeTable {
    pub fn new(gpu: &Gpu, head_dim: usize, max_positions: usize, theta: f32) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 == 1 {
            return shape_err(format!(
                "GpuRopeTable: head_dim {head_dim} must be even and positive"
            ));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(GpuRopeTable {
            head_dim,
            max_positions,
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
        })
    }

    /// A table of `rows` zero rows, to be filled with per-token angles by
    /// [`GpuRopeTable::load_angles`] (row k turns the token at position k).
    pub fn zeroed(gpu: &Gpu, head_dim: usize, rows: usize) -> Result<Self> {
        let half = head_dim / 2;
        Ok(GpuRopeTable {
            head_dim,
            max_positions: rows,
            cos: gpu.alloc_zeros((rows * half).max(1))?,
            sin: gpu.alloc_zeros((rows * half).max(1))?,
        })
    }

    /// Writes per-token angles cos, sin [N, D/2] (N ≤ the table's rows) into the table's first
    /// N rows, so that positions 0..N turn the N tokens by their own angles (M-RoPE).
    pub fn load_angles(&mut self, gpu: &Gpu, cos: &[f32], sin: &[f32]) -> Result<()> {
        let half = self.head_dim / 2;
        if cos.len() != sin.len() || !cos.len().is_multiple_of(half.max(1)) {
            return shape_err(format!(
                "rotary angles: cos has {} values and sin {}, both must be N × {half}",
                cos.len(),
                sin.len()
            ));
        }
        if cos.len() > self.max_positions * half {
            return shape_err(format!(
                "rotary angles: {} rows for a table of {}",
                cos.len() / half.max(1),
                self.max_positions
            ));
        }
        gpu.upload_into(&mut self.cos.view_mut(0..cos.len())?, cos)?;
        gpu.upload_into(&mut self.sin.view_mut(0..sin.len())?, sin)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

impl Gpu {
    /// Uploads token ids, refusing any id ≥ `vocab` (the kernels would write NaN rows for them).
    pub fn upload_tokens(&self, tokens: &[u32], vocab: usize) -> Result<DeviceBuf<u32>> {
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return shape_err(format!(
                "token id {t} at index {i} is outside the table of {vocab} rows"
            ));
        }
        self.upload(tokens)
    }

    /// RMSNorm forward as `reel_kernels::rmsnorm::rmsnorm_forward`: inp [n, d], weight [d] →
    /// out [n, d], rstd [n] (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward<T: GpuFloat>(
        &self,
        out: &mut impl DevWrite<T>,
        rstd: &mut impl DevWrite<f32>,
        inp: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rmsnorm_forward";
        check(op, "out", out.dlen(), n * d)?;
        check(op, "rstd", rstd.dlen(), n)?;
        check(op, "inp", inp.dlen(), n * d)?;
        check(op, "weight", weight.dlen(), d)?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (d32, n32) = (as_i32(op, "d", d)?, as_i32(op, "n", n)?);
        self.bind()?;
        let (o, r, x, w) = (out.dptr(), rstd.dptr(), inp.dptr(), weight.dptr());
        launch!(
            self,
            &self.kernels.rmsnorm_fwd[T::INDEX],
            cfg((n32 as u32, 1, 1), (row_threads(d), 1, 1)),
            &o,
            &r,
            &x,
            &w,
            &d32,
            &eps
        )
    }

    /// RMSNorm backward as `reel_kernels::rmsnorm::rmsnorm_backward`: `dinp` overwritten,
    /// `dweight +=` (summed over rows in f32 in a fixed order, rounded once).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward<T: GpuFloat>(
        &self,
        dinp: &mut impl DevWrite<T>,
        dweight: &mut impl DevWrite<T>,
        dout: &impl DevRead<T>,
        inp: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        rstd: &impl DevRead<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let op = "rmsnorm_backward";
        check(op, "dinp", dinp.dlen(), n * d)?;
        check(op, "dweight", dweight.dlen(), d)?;
        check(op, "dout", dout.dlen(), n * d)?;
        check(op, "inp", inp.dlen(), n * d)?;
        check(op, "weight", weight.dlen(), d)?;
        check(op, "rstd", rstd.dlen(), n)?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (d32, n32) = (as_i32(op, "d", d)?, as_i32(op, "n", n)?);
        self.bind()?;
        let (dx, dy, x, w, r) = (
            dinp.dptr(),
            dout.dptr(),
            inp.dptr(),
            weight.dptr(),
            rstd.dptr(),
        );
        launch!(
            self,
            &self.kernels.rmsnorm_bwd_dinp[T::INDEX],
            cfg((n32 as u32, 1, 1), (row_threads(d), 1, 1)),
            &dx,
            &dy,
            &x,
            &w,
            &r,
            &d32
        )?;
        self.colsum::<T>(dweight.dptr(), dy, Some((x, r)), n, d)
    }

    /// `dst[d] +=` column sums over `n` rows of `dout` (times `x · rstd[row]` when given), in f32,
    /// deterministic: partial sums per block of [`COLSUM_ROWS`] rows, then added in order.
    pub(crate) fn colsum<T: GpuFloat>(
        &self,
        dst: u64,
        dout: u64,
        x_rstd: Option<(u64, u64)>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let op = "column sum";
        // At most 65535 chunks (the grid's y limit).
        let rows = COLSUM_ROWS.max(n.div_ceil(65535));
        let chunks = n.div_ceil(rows);
        let (n32, d32) = (as_i32(op, "n", n)?, as_i32(op, "d", d)?);
        let chunks32 = as_i32(op, "chunks", chunks)?;
        let rows32 = as_i32(op, "rows per chunk", rows)?;
        let col_blocks = d.div_ceil(32) as u32;
        // Back to the pool (stream order: after the kernels) at the end of this function.
        let partial = self.scratch::<f32>(chunks * d)?;
        let p = partial.dptr();
        let (x, r) = x_rstd.unwrap_or((0, 0));
        launch!(
            self,
            &self.kernels.colsum_partial[T::INDEX],
            cfg((col_blocks, chunks as u32, 1), (32, 8, 1)),
            &p,
            &dout,
            &x,
            &r,
            &n32,
            &d32,
            &rows32
        )?;
        launch!(
            self,
            &self.kernels.colsum_finish[T::INDEX],
            cfg((d.div_ceil(256) as u32, 1, 1), (256, 1, 1)),
            &dst,
            &p,
            &chunks32,
            &d32
        )?;
        Ok(())
    }

    /// SwiGLU forward as `reel_kernels::swiglu::swiglu_forward`: gate_up [n, 2i] → out [n, i].
    pub fn swiglu_forward<T: GpuFloat>(
        &self,
        out: &mut impl DevWrite<T>,
        gate_up: &impl DevRead<T>,
        n: usize,
        i: usize,
    ) -> Result<()> {
        let op = "swiglu_forward";
        check(op, "out", out.dlen(), n * i)?;
        check(op, "gate_up", gate_up.dlen(), 2 * n * i)?;
        if n == 0 || i == 0 {
            return Ok(());
        }
        self.bind()?;
        let (o, g, n64, i64_) = (out.dptr(), gate_up.dptr(), n as i64, i as i64);
        launch!(
            self,
            &self.kernels.swiglu_fwd[T::INDEX],
            cfg((elementwise_grid(n * i), 1, 1), (256, 1, 1)),
            &o,
            &g,
            &n64,
            &i64_
        )
    }

    /// SwiGLU backward as `reel_kernels::swiglu::swiglu_backward` (overwrites `dgate_up`).
    pub fn swiglu_backward<T: GpuFloat>(
        &self,
        dgate_up: &mut impl DevWrite<T>,
        dout: &impl DevRead<T>,
        gate_up: &impl DevRead<T>,
        n: usize,
        i: usize,
    ) -> Result<()> {
        self.swiglu_backward_raw::<T>(
            dgate_up.dptr(),
            dgate_up.dlen(),
            dout,
            gate_up.dptr(),
            gate_up.dlen(),
            n,
            i,
        )
    }

    /// [`Gpu::swiglu_backward`] whose gradient overwrites `gate_up` in place (each element's
    /// gate and up values are read by the thread that writes their gradients).
    pub fn swiglu_backward_in_place<T: GpuFloat>(
        &self,
        gate_up: &mut impl DevWrite<T>,
        dout: &impl DevRead<T>,
        n: usize,
        i: usize,
    ) -> Result<()> {
        let (p, len) = (gate_up.dptr(), gate_up.dlen());
        self.swiglu_backward_raw::<T>(p, len, dout, p, len, n, i)
    }

    #[allow(clippy::too_many_arguments)]
    fn swiglu_backward_raw<T: GpuFloat>(
        &self,
        dg: u64,
        dg_len: usize,
        dout: &impl DevRead<T>,
        g: u64,
        g_len: usize,
        n: usize,
        i: usize,
    ) -> Result<()> {
        let op = "swiglu_backward";
        check(op, "dgate_up", dg_len, 2 * n * i)?;
        check(op, "dout", dout.dlen(), n * i)?;
        check(op, "gate_up", g_len, 2 * n * i)?;
        if n == 0 || i == 0 {
            return Ok(());
        }
        self.bind()?;
        let (dy, n64, i64_) = (dout.dptr(), n as i64, i as i64);
        launch!(
            self,
            &self.kernels.swiglu_bwd[T::INDEX],
            cfg((elementwise_grid(n * i), 1, 1), (256, 1, 1)),
            &dg,
            &dy,
            &g,
            &n64,
            &i64_
        )
    }

    /// Embedding forward as `reel_kernels::embedding::embedding_forward`: out[t] = table[tokens[t]]
    /// for table [vocab, d] (vocab = table length / d). An id ≥ vocab gives a NaN row; upload ids
    /// with [`Gpu::upload_tokens`] to refuse them up front.
    pub fn embedding_forward<T: GpuFloat>(
        &self,
        out: &mut impl DevWrite<T>,
        tokens: &impl DevRead<u32>,
        table: &impl DevRead<T>,
        d: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        let n = tokens.dlen();
        check(op, "out", out.dlen(), n * d)?;
        if d == 0 || n == 0 {
            return Ok(());
        }
        if table.dlen() % d != 0 {
            return shape_err(format!(
                "{op}: table has {} elements, not a multiple of d = {d}",
                table.dlen()
            ));
        }
        let vocab = u32::try_from(table.dlen() / d)
            .map_err(|_| GpuError::Shape(format!("{op}: vocabulary too large")))?;
        let d32 = as_i32(op, "d", d)?;
        let n32 = as_i32(op, "tokens", n)?;
        self.bind()?;
        let (o, t, w) = (out.dptr(), tokens.dptr(), table.dptr());
        launch!(
            self,
            &self.kernels.embedding_fwd[T::INDEX],
            cfg((n32 as u32, 1, 1), (row_threads(d), 1, 1)),
            &o,
            &t,
            &w,
            &d32,
            &vocab
        )
    }

    /// Embedding backward as `reel_kernels::embedding::embedding_backward`:
    /// `dtable[tokens[t]] += dout[t]`, each row summed in f32 in token order and rounded once
    /// (deterministic, no atomics). `tokens` are host ids (as llm.c does, the host groups them);
    /// an id ≥ vocab is refused.
    pub fn embedding_backward<T: GpuFloat>(
        &self,
        dtable: &mut impl DevWrite<T>,
        dout: &impl DevRead<T>,
        tokens: &[u32],
        d: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        let n = tokens.len();
        check(op, "dout", dout.dlen(), n * d)?;
        if d == 0 || n == 0 {
            return Ok(());
        }
        if dtable.dlen() % d != 0 {
            return shape_err(format!(
                "{op}: dtable has {} elements, not a multiple of d = {d}",
                dtable.dlen()
            ));
        }
        let vocab = dtable.dlen() / d;
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return shape_err(format!(
                "{op}: token id {t} at index {i} is outside the table of {vocab} rows"
            ));
        }
        as_i32(op, "tokens", n)?;
        let d32 = as_i32(op, "d", d)?;
        // Group token indices by id (stable: ascending index within an id).
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&i| tokens[i as usize]);
        let mut uniq: Vec<u32> = Vec::new();
        let mut offsets: Vec<u32> = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let t = tokens[i as usize];
            if uniq.last() != Some(&t) {
                uniq.push(t);
                offsets.push(k as u32);
            }
        }
        offsets.push(n as u32);
        let order_d = self.scratch_from(&order)?;
        let uniq_d = self.scratch_from(&uniq)?;
        let offsets_d = self.scratch_from(&offsets)?;
        let (dt, dy, o, u, off) = (
            dtable.dptr(),
            dout.dptr(),
            order_d.dptr(),
            uniq_d.dptr(),
            offsets_d.dptr(),
        );
        launch!(
            self,
            &self.kernels.embedding_bwd[T::INDEX],
            cfg((uniq.len() as u32, 1, 1), (row_threads(d), 1, 1)),
            &dt,
            &dy,
            &o,
            &u,
            &off,
            &d32
        )
    }

    /// RoPE forward as `reel_kernels::rope::rope_forward`, in place on x [n, n_heads, head_dim];
    /// `positions` [n] (a position outside the table gives NaNs).
    pub fn rope_forward<T: GpuFloat>(
        &self,
        x: &mut impl DevWrite<T>,
        positions: &impl DevRead<u32>,
        table: &GpuRopeTable,
        n_heads: usize,
    ) -> Result<()> {
        self.rope("rope_forward", x, positions, table, n_heads, 1.0)
    }

    /// RoPE backward as `reel_kernels::rope::rope_backward`: the rotation by −angle, in place.
    pub fn rope_backward<T: GpuFloat>(
        &self,
        dx: &mut impl DevWrite<T>,
        positions: &impl DevRead<u32>,
        table: &GpuRopeTable,
        n_heads: usize,
    ) -> Result<()> {
        self.rope("rope_backward", dx, positions, table, n_heads, -1.0)
    }

    fn rope<T: GpuFloat>(
        &self,
        op: &str,
        x: &mut impl DevWrite<T>,
        positions: &impl DevRead<u32>,
        table: &GpuRopeTable,
        n_heads: usize,
        sign: f32,
    ) -> Result<()> {
        let n = positions.dlen();
        let d = table.head_dim;
        check(op, "x", x.dlen(), n * n_heads * d)?;
        if x.dlen() == 0 {
            return Ok(());
        }
        let h32 = as_i32(op, "n_heads", n_heads)?;
        let d32 = as_i32(op, "head_dim", d)?;
        let max_pos = u32::try_from(table.max_positions).unwrap_or(u32::MAX);
        self.bind()?;
        let (xp, p, c, s, n64) = (
            x.dptr(),
            positions.dptr(),
            table.cos.ptr(),
            table.sin.ptr(),
            n as i64,
        );
        launch!(
            self,
            &self.kernels.rope[T::INDEX],
            cfg((elementwise_grid(n * n_heads * d / 2), 1, 1), (256, 1, 1)),
            &xp,
            &p,
            &c,
            &s,
            &n64,
            &h32,
            &d32,
            &max_pos,
            &sign
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: wherever libnvrtc is found (pip's nvidia-cuda-nvrtc on a CPU machine
    /// too), reel's kernels must compile for Hopper. Skipped where it is absent (CI).
    #[test]
    fn kernels_compile_for_sm90_where_nvrtc_is_present() {
        crate::libs::preload();
        // SAFETY: only tries to dlopen.
        let present =
            std::panic::catch_unwind(|| unsafe { nvsys::is_culib_present() }).unwrap_or(false);
        if !present {
            eprintln!("skipped: no libnvrtc here");
            return;
        }
        let inc = crate::libs::include_dirs(crate::libs::lib_dirs());
        let t = Instant::now();
        let cubin = compile_cubin(SOURCE, "sm_90", &inc).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "{} bytes of sm_90 CUBIN in {:.2}s (include {inc:?})",
            cubin.len(),
            t.elapsed().as_secs_f64()
        );
        assert!(cubin.len() > 1000);
    }
}
