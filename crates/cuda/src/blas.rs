//! GEMMs through cuBLASLt, in the nn.Linear layout of `reel_kernels::matmul`.
//!
//! Row-major `out[m, n] = inp[m, k] · weight[n, k]ᵀ` is, in cuBLASLt's column-major terms,
//! `outᵀ (n×m) = weight (n×k, stored k×n: op T) · inpᵀ (k×m, op N)` ("TN"). The backward GEMMs:
//! `dinpᵀ (k×m) = weightᵀ (k×n, op N) · doutᵀ (n×m, op N)` and
//! `dweightᵀ (k×n) += inpᵀ (k×m, op N) · dout (m×n, stored n×m: op T)`, with β = 1.
//! Compute is f32 (`CUBLAS_COMPUTE_32F`, no TF32) for every type pair, split-K reductions too
//! (never in the output type). Measured on an H100: with a bf16 output, the kernels cuBLASLt
//! picks for the bias epilogue at small shapes and for β = 1 (dweight +=) at some shapes round
//! about one bf16 step differently from the CPU's single rounding on half the elements (relative
//! norm ≤ 2.9e-3); f32 outputs match to 1e-6. Each shape's plan
//! (descriptors and the heuristic's algorithm) is made once and cached.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::buffer::{DevRead, DevWrite};
use crate::{shape_err, GpuError, GpuFloat, Result};

const WORKSPACE_BYTES: usize = 32 << 20;

/// One GEMM in column-major terms: D (m×n) = α·op(A)·op(B) + β·C, C = D.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Spec {
    pub(crate) ta: bool,
    pub(crate) tb: bool,
    pub(crate) m: u64,
    pub(crate) n: u64,
    pub(crate) k: u64,
    pub(crate) lda: i64,
    pub(crate) ldb: i64,
    pub(crate) ldc: i64,
    pub(crate) ab: sys::cudaDataType,
    pub(crate) cd: sys::cudaDataType,
    /// Set by [`Blas::gemm`] from its `bias` argument.
    pub(crate) bias: bool,
    /// β = 1 (D += …) rather than β = 0.
    pub(crate) accumulate: bool,
    /// Set by [`Blas::gemm`] from the addresses.
    pub(crate) align: [u32; 3],
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain heap objects of cuBLASLt, used under the cache's mutex.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by this plan and destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Spec, Plan>>,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is used under `plans`' mutex (every matmul holds it).
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Largest power of two (≤ 256) dividing the address: what the heuristic may assume.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    // SAFETY: `v` is the attribute's documented type and size.
    unsafe {
        lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, size_of::<T>())
    }?;
    Ok(())
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        let handle = lt::create_handle()?;
        // SAFETY: scratch for cuBLASLt; never read by us.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }?;
        Ok(Blas {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            stream: stream.clone(),
        })
    }

    fn make_plan(&self, s: &Spec) -> Result<Plan> {
        let (a_rows, a_cols) = if s.ta { (s.k, s.m) } else { (s.m, s.k) };
        let (b_rows, b_cols) = if s.tb { (s.n, s.k) } else { (s.k, s.n) };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )?;
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: unsafe { std::mem::zeroed() },
        };
        plan.a = lt::create_matrix_layout(s.ab, a_rows, a_cols, s.lda)?;
        plan.b = lt::create_matrix_layout(s.ab, b_rows, b_cols, s.ldb)?;
        plan.c = lt::create_matrix_layout(s.cd, s.m, s.n, s.ldc)?;
        // cublasOperation_t: 0 = N, 1 = T.
        let op = |t: bool| t as i32;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(s.ta),
        )?;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(s.tb),
        )?;
        if s.bias {
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
        }
        let pref = lt::create_matmul_pref()?;
        let set_pref = |attr, v: &[u8]| -> Result<()> {
            // SAFETY: `v` holds the attribute's documented type.
            unsafe {
                lt::set_matmul_pref_attribute(pref, attr, v.as_ptr() as *const c_void, v.len())
            }?;
            Ok(())
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let r = (|| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(WORKSPACE_BYTES as u64).to_ne_bytes(),
            )?;
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &s.align[0].to_ne_bytes(),
            )?;
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &s.align[1].to_ne_bytes(),
            )?;
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &s.align[2].to_ne_bytes(),
            )?;
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &s.align[2].to_ne_bytes(),
            )?;
            // Split-K partial sums in f32 only (in the workspace), never in the output type or in
            // place in D, where a bf16 output would round every partial; PyTorch sets the same
            // mask when reduced-precision bf16 reductions are off.
            let scheme =
                sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
            set_pref(
                P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                &scheme.to_ne_bytes(),
            )?;
            // SAFETY: every descriptor above is alive.
            let h = unsafe {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                )
            }
            .map_err(|e| GpuError::Blas(format!("no cuBLASLt algorithm for {s:?}: {e:?}")))?;
            plan.algo = h.algo;
            Ok(())
        })();
        // SAFETY: created above, destroyed once.
        unsafe { lt::destroy_matmul_pref(pref) }?;
        r.map(|_| plan)
    }

    /// D = α·op(A)·op(B) + β·D (+ bias per row of D), enqueued on the stream.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        mut s: Spec,
        alpha: f32,
        a: u64,
        b: u64,
        d: u64,
        bias: Option<u64>,
    ) -> Result<()> {
        s.align = [alignment(a), alignment(b), alignment(d)];
        s.bias = bias.is_some();
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| GpuError::Blas("plan cache poisoned".into()))?;
        let plan = match plans.entry(s) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.make_plan(&s)?),
        };
        if let Some(bias) = bias {
            let p = bias as *const c_void;
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &p,
            )?;
        }
        let beta: f32 = if s.accumulate { 1.0 } else { 0.0 };
        let (ws, _g) = self.workspace.device_ptr(&self.stream);
        // SAFETY: the caller checked every length against the spec; the plan is alive.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                d as *const c_void,
                plan.c,
                d as *mut c_void,
                plan.c,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }?;
        Ok(())
    }
}

fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return shape_err(format!("{op}: {what} has {got} elements, expected {want}"));
    }
    Ok(())
}

/// The (input, output) type pairs cuBLASLt runs with f32 compute: bf16→bf16, bf16→f32, f32→f32.
fn check_types<I: GpuFloat, O: GpuFloat>(op: &str) -> Result<()> {
    if I::INDEX == 0 && O::INDEX != 0 {
        return shape_err(format!("{op}: f32 inputs need an f32 output"));
    }
    Ok(())
}

/// The GEMM of `out[m,n] (+)= inp[m,k] · weight[n,k]ᵀ` in cuBLASLt's column-major terms:
/// `outᵀ[n,m] = weight[n,k] · inpᵀ[k,m]`, accumulating into `out` (β = 1) or overwriting it.
fn linear_spec<I: GpuFloat, O: GpuFloat>(m: usize, k: usize, n: usize, accumulate: bool) -> Spec {
    Spec {
        ta: true,
        tb: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        lda: k as i64,
        ldb: k as i64,
        ldc: n as i64,
        ab: I::cuda_type(),
        cd: O::cuda_type(),
        bias: false,
        accumulate,
        align: [0; 3],
    }
}

impl crate::Gpu {
    /// `out[m,n] = inp[m,k] · weight[n,k]ᵀ (+ bias[n])`, overwriting `out`; f32 accumulation.
    /// Inputs bf16 with a bf16 or f32 output, or f32 throughout; the bias has the output's type.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward<I: GpuFloat, O: GpuFloat>(
        &self,
        out: &mut impl DevWrite<O>,
        inp: &impl DevRead<I>,
        weight: &impl DevRead<I>,
        bias: Option<&dyn DevRead<O>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.timed("gemm", "matmul_forward", || {
            let op = "matmul_forward";
            check_types::<I, O>(op)?;
            check_len(op, "out", out.dlen(), m * n)?;
            check_len(op, "inp", inp.dlen(), m * k)?;
            check_len(op, "weight", weight.dlen(), n * k)?;
            if let Some(b) = bias {
                check_len(op, "bias", b.dlen(), n)?;
            }
            if m == 0 || n == 0 {
                return Ok(());
            }
            if k == 0 {
                if bias.is_some() {
                    return shape_err(format!(
                        "{op}: k = 0 with a bias is not supported on the GPU"
                    ));
                }
                return self.zero(out);
            }
            self.bind()?;
            let s = linear_spec::<I, O>(m, k, n, false);
            self.blas.gemm(
                s,
                1.0,
                weight.dptr(),
                inp.dptr(),
                out.dptr(),
                bias.map(|b| b.dptr()),
            )
        })
    }

    /// `out[m,n] += inp[m,k] · weight[n,k]ᵀ` (β = 1: the residual add fused into the GEMM, one
    /// rounding of the f32 sum to the output type). Same types as [`crate::Gpu::matmul_forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward_accumulate<I: GpuFloat, O: GpuFloat>(
        &self,
        out: &mut impl DevWrite<O>,
        inp: &impl DevRead<I>,
        weight: &impl DevRead<I>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.timed("gemm", "matmul_forward_accumulate", || {
            let op = "matmul_forward_accumulate";
            check_types::<I, O>(op)?;
            check_len(op, "out", out.dlen(), m * n)?;
            check_len(op, "inp", inp.dlen(), m * k)?;
            check_len(op, "weight", weight.dlen(), n * k)?;
            if m == 0 || n == 0 || k == 0 {
                return Ok(());
            }
            self.bind()?;
            let s = linear_spec::<I, O>(m, k, n, true);
            self.blas
                .gemm(s, 1.0, weight.dptr(), inp.dptr(), out.dptr(), None)
        })
    }

    /// `dinp[m,k] = dout · weight` (overwrites; skipped when `None`), `dweight[n,k] += doutᵀ · inp`,
    /// `dbias[n] +=` column sums of `dout`. All one type; f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward<T: GpuFloat>(
        &self,
        dinp: Option<&mut dyn DevWrite<T>>,
        dweight: &mut impl DevWrite<T>,
        dbias: Option<&mut dyn DevWrite<T>>,
        dout: &impl DevRead<T>,
        inp: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let dinp = dinp.map(|d| (d.dptr(), d.dlen()));
        let dbias = dbias.map(|d| (d.dptr(), d.dlen()));
        let dw = (dweight.dptr(), dweight.dlen());
        let ops = [
            (dout.dptr(), dout.dlen()),
            (inp.dptr(), inp.dlen()),
            (weight.dptr(), weight.dlen()),
        ];
        self.matmul_backward_raw::<T>(dinp, dw, dbias, ops, m, k, n)
    }

    /// [`Gpu::matmul_backward`] without a bias whose `dinp` overwrites `inp` in place:
    /// `dweight[n,k] += doutᵀ · inp` is formed first, then `inp[m,k] = dout · weight`. For a
    /// backward that no longer needs the layer input afterwards (its buffer holds the input's
    /// gradient instead of a separate one).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward_into_input<T: GpuFloat>(
        &self,
        inp: &mut impl DevWrite<T>,
        dweight: &mut impl DevWrite<T>,
        dout: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let x = (inp.dptr(), inp.dlen());
        let ops = [
            (dout.dptr(), dout.dlen()),
            x,
            (weight.dptr(), weight.dlen()),
        ];
        let dw = (dweight.dptr(), dweight.dlen());
        self.matmul_backward_raw::<T>(Some(x), dw, None, ops, m, k, n)
    }

    /// The body of both backward forms on (address, length) pairs: `ops` = dout, inp, weight.
    /// `dweight` (and `dbias`) from `inp` first, then `dinp`, so `dinp` may be `inp`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_raw<T: GpuFloat>(
        &self,
        dinp: Option<(u64, usize)>,
        dweight: (u64, usize),
        dbias: Option<(u64, usize)>,
        [dout, inp, weight]: [(u64, usize); 3],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.timed("gemm", "matmul_backward", || {
            let op = "matmul_backward";
            check_len(op, "dout", dout.1, m * n)?;
            check_len(op, "inp", inp.1, m * k)?;
            check_len(op, "weight", weight.1, n * k)?;
            check_len(op, "dweight", dweight.1, n * k)?;
            if let Some(d) = &dinp {
                check_len(op, "dinp", d.1, m * k)?;
            }
            if let Some(d) = &dbias {
                check_len(op, "dbias", d.1, n)?;
            }
            self.bind()?;
            let t = T::cuda_type();
            if m > 0 && n > 0 && k > 0 {
                let s = Spec {
                    ta: false,
                    tb: true,
                    m: k as u64,
                    n: n as u64,
                    k: m as u64,
                    lda: k as i64,
                    ldb: n as i64,
                    ldc: k as i64,
                    ab: t,
                    cd: t,
                    bias: false,
                    accumulate: true,
                    align: [0; 3],
                };
                self.blas.gemm(s, 1.0, inp.0, dout.0, dweight.0, None)?;
            }
            if let Some(dbias) = dbias {
                if m > 0 && n > 0 {
                    self.colsum::<T>(dbias.0, dout.0, None, m, n)?;
                }
            }
            if let Some(dinp) = dinp {
                if n == 0 {
                    self.zero_dyn::<T>(dinp.0, dinp.1)?;
                } else if m > 0 && k > 0 {
                    let s = Spec {
                        ta: false,
                        tb: false,
                        m: k as u64,
                        n: m as u64,
                        k: n as u64,
                        lda: k as i64,
                        ldb: n as i64,
                        ldc: k as i64,
                        ab: t,
                        cd: t,
                        bias: false,
                        accumulate: false,
                        align: [0; 3],
                    };
                    self.blas.gemm(s, 1.0, weight.0, dout.0, dinp.0, None)?;
                }
            }
            Ok(())
        })
    }

    fn zero_dyn<T>(&self, ptr: u64, len: usize) -> Result<()> {
        if len > 0 {
            // SAFETY: the caller passes a live buffer of `len` elements.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr,
                    0,
                    len * size_of::<T>(),
                    self.cu_stream(),
                )
            }?;
        }
        Ok(())
    }
}
