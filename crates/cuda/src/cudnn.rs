//! cuDNN's fused attention (feature `cudnn`): the Rust side of csrc/cudnn_attention.cpp.
//!
//! One [`Cudnn`] per [`crate::Gpu`], made on first use: libcudart and libcudnn are found with
//! [`crate::libs`] (the library folders first, so pip's cuDNN, the one PyTorch runs, wins over an
//! older system install) and opened by full path (cudnn-frontend then reaches them by their sonames), a
//! cuDNN handle is bound to the Gpu's stream, and each (shape, mask, direction) gets one plan, built
//! once and cached. The workspace is one device buffer, grown to the largest plan's need and reused;
//! so is the [B, H, T] copy of lse the backward reads.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::libs::{self, LibSpec};
use crate::{GpuError, Result};

extern "C" {
    fn reel_cudnn_open(path: *const c_char, err: *mut c_char, err_len: c_int) -> i64;
    fn reel_cudnn_handle_create(
        stream: *mut c_void,
        err: *mut c_char,
        err_len: c_int,
    ) -> *mut c_void;
    fn reel_cudnn_handle_destroy(handle: *mut c_void);
    fn reel_sdpa_plan_create(
        handle: *mut c_void,
        b: i64,
        tq: i64,
        tk: i64,
        h: i64,
        h_kv: i64,
        d: i64,
        causal: c_int,
        backward: c_int,
        workspace_bytes: *mut i64,
        err: *mut c_char,
        err_len: c_int,
    ) -> *mut c_void;
    fn reel_sdpa_plan_destroy(plan: *mut c_void);
    fn reel_sdpa_forward(
        handle: *mut c_void,
        plan: *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *mut c_void,
        lse: *mut f32,
        workspace: *mut c_void,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
    fn reel_sdpa_backward(
        handle: *mut c_void,
        plan: *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *const c_void,
        dout: *const c_void,
        lse_bht: *const f32,
        dq: *mut c_void,
        dk: *mut c_void,
        dv: *mut c_void,
        workspace: *mut c_void,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
}

/// The CUDA runtime (cudnn-frontend opens `libcudart.so.13` by name).
const CUDART: LibSpec = LibSpec {
    stem: "libcudart",
    major: "13",
};
/// cuDNN 9.
const CUDNN: LibSpec = LibSpec {
    stem: "libcudnn",
    major: "9",
};

/// A message buffer for the C side.
struct ErrBuf([c_char; 2048]);

impl ErrBuf {
    fn new() -> Self {
        ErrBuf([0; 2048])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }
    fn len(&self) -> c_int {
        self.0.len() as c_int
    }
    fn text(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// What a plan is for: batch, lengths, heads, head dimension, causal or full, backward or forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
    pub causal: bool,
    pub backward: bool,
}

struct Plan {
    ptr: *mut c_void,
    workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by reel_sdpa_plan_create, destroyed once.
        unsafe { reel_sdpa_plan_destroy(self.ptr) };
    }
}

/// A cuDNN handle on the Gpu's stream, its plans and its reusable buffers.
pub(crate) struct Cudnn {
    handle: *mut c_void,
    version: i64,
    plans: HashMap<PlanKey, Plan>,
    workspace: Option<CudaSlice<u8>>,
    /// Device allocations made here (workspace growth), read by `Gpu::alloc_stats`.
    pub(crate) allocs: u64,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle and plans are used by one thread at a time (the Gpu keeps Cudnn behind a
// Mutex).
unsafe impl Send for Cudnn {}

impl Drop for Cudnn {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        self.plans.clear();
        // SAFETY: made in `open`, destroyed once, after its plans.
        unsafe { reel_cudnn_handle_destroy(self.handle) };
    }
}

fn open_lib(spec: LibSpec) -> Result<String> {
    libs::open_library_dirs_first(spec)
        .map(|p| p.display().to_string())
        .map_err(|detail| GpuError::MissingLibrary {
            lib: spec.stem,
            detail: format!(
                "{detail}; cuDNN comes with pip's nvidia-cudnn-cu13, the runtime with nvidia-cuda-runtime"
            ),
        })
}

impl Cudnn {
    pub(crate) fn open(stream: &Arc<CudaStream>) -> Result<Cudnn> {
        open_lib(CUDART)?;
        let path = open_lib(CUDNN)?;
        let c_path = CString::new(path.clone()).map_err(|e| GpuError::Cudnn(e.to_string()))?;
        let mut err = ErrBuf::new();
        // SAFETY: plain C calls; `err` outlives them.
        let version = unsafe { reel_cudnn_open(c_path.as_ptr(), err.ptr(), err.len()) };
        if version < 0 {
            return Err(GpuError::MissingLibrary {
                lib: "libcudnn",
                detail: format!("{path}: {}", err.text()),
            });
        }
        if version < 91200 {
            return Err(GpuError::Cudnn(format!(
                "cuDNN {version} at {path} is too old: reel needs 9.12 or newer (pip's nvidia-cudnn-cu13)"
            )));
        }
        // SAFETY: the stream outlives the handle (Cudnn holds it and drops the handle first).
        let handle = unsafe {
            reel_cudnn_handle_create(stream.cu_stream() as *mut c_void, err.ptr(), err.len())
        };
        if handle.is_null() {
            return Err(GpuError::Cudnn(err.text()));
        }
        Ok(Cudnn {
            handle,
            version,
            plans: HashMap::new(),
            workspace: None,
            allocs: 0,
            stream: stream.clone(),
        })
    }

    pub(crate) fn version(&self) -> i64 {
        self.version
    }

    fn plan(&mut self, key: PlanKey) -> Result<(*mut c_void, usize)> {
        if let Some(p) = self.plans.get(&key) {
            return Ok((p.ptr, p.workspace));
        }
        let mut err = ErrBuf::new();
        let mut ws: i64 = 0;
        // SAFETY: plain C call on a live handle; `ws` and `err` outlive it.
        let ptr = unsafe {
            reel_sdpa_plan_create(
                self.handle,
                key.b as i64,
                key.tq as i64,
                key.tk as i64,
                key.h as i64,
                key.h_kv as i64,
                key.d as i64,
                key.causal as c_int,
                key.backward as c_int,
                &mut ws,
                err.ptr(),
                err.len(),
            )
        };
        if ptr.is_null() {
            return Err(GpuError::Cudnn(format!(
                "cuDNN {} has no attention plan for {key:?}: {}",
                self.version,
                err.text()
            )));
        }
        let plan = Plan {
            ptr,
            workspace: ws.max(0) as usize,
        };
        let out = (plan.ptr, plan.workspace);
        self.plans.insert(key, plan);
        Ok(out)
    }

    /// The workspace pointer, grown (never shrunk) to at least `bytes`.
    fn workspace(&mut self, bytes: usize) -> Result<u64> {
        if self.workspace.as_ref().is_none_or(|w| w.len() < bytes) {
            self.workspace = None;
            self.allocs += 1;
            // SAFETY: scratch that cuDNN writes before it reads.
            self.workspace = Some(unsafe { self.stream.alloc::<u8>(bytes.max(256)) }?);
        }
        let w = self.workspace.as_ref().expect("just made");
        let (p, _g) = w.device_ptr(&self.stream);
        Ok(p)
    }

    /// Enqueues the forward: out, lse ([B, Tq, H] f32) from q, k, v (device addresses).
    pub(crate) fn forward(
        &mut self,
        key: PlanKey,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
    ) -> Result<()> {
        let (plan, ws) = self.plan(key)?;
        let ws = self.workspace(ws)?;
        let mut err = ErrBuf::new();
        // SAFETY: the caller checked every buffer against `key`; the plan and handle are alive.
        let r = unsafe {
            reel_sdpa_forward(
                self.handle,
                plan,
                q as *const c_void,
                k as *const c_void,
                v as *const c_void,
                out as *mut c_void,
                lse as *mut f32,
                ws as *mut c_void,
                err.ptr(),
                err.len(),
            )
        };
        if r != 0 {
            return Err(GpuError::Cudnn(format!(
                "attention forward {key:?}: {}",
                err.text()
            )));
        }
        Ok(())
    }

    /// Enqueues the backward: dq, dk, dv (overwritten) from q, k, v, out, dout and lse as [B, H, Tq].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        key: PlanKey,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        dout: u64,
        lse_bht: u64,
        dq: u64,
        dk: u64,
        dv: u64,
    ) -> Result<()> {
        let (plan, ws) = self.plan(key)?;
        let ws = self.workspace(ws)?;
        let mut err = ErrBuf::new();
        // SAFETY: as in `forward`.
        let r = unsafe {
            reel_sdpa_backward(
                self.handle,
                plan,
                q as *const c_void,
                k as *const c_void,
                v as *const c_void,
                out as *const c_void,
                dout as *const c_void,
                lse_bht as *const f32,
                dq as *mut c_void,
                dk as *mut c_void,
                dv as *mut c_void,
                ws as *mut c_void,
                err.ptr(),
                err.len(),
            )
        };
        if r != 0 {
            return Err(GpuError::Cudnn(format!(
                "attention backward {key:?}: {}",
                err.text()
            )));
        }
        Ok(())
    }
}
