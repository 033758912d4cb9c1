//! reel-cuda: the GPU path. Every CUDA library is opened at run time (cudarc with
//! `dynamic-loading`), so this crate builds on machines with no GPU and no CUDA toolkit, and
//! [`Gpu::open`] answers a clear [`GpuError`] (never a panic) where no driver, device or library
//! is found; the caller falls back to the CPU.
//!
//! - [`libs`]: where the libraries are (pip's `nvidia/*/lib`, `/usr/local/cuda/lib64`, …), how
//!   they are made reachable (preloading by full path; or re-exec with `LD_LIBRARY_PATH` and an
//!   NCCL shim), and NVRTC's include folder for `cuda_bf16.h`.
//! - [`Gpu`]: one device and one stream; [`DeviceBuf`] (f32, bf16, u32) with upload/download and
//!   sub-range views ([`DView`], [`DViewMut`]).
//! - GEMMs through cuBLASLt in the nn.Linear layout ([`Gpu::matmul_forward`],
//!   [`Gpu::matmul_backward`]): bf16 in with f32 accumulation and f32 or bf16 out, or f32
//!   throughout.
//! - reel's own kernels (`kernels.cu`, compiled by NVRTC for the device's architecture when the
//!   device is opened): RMSNorm, SwiGLU, embedding and RoPE, forward and backward, with the CPU
//!   references' argument conventions (`reel-kernels`): outputs, saved values, inputs, weights,
//!   dimensions; parameter gradients accumulate, activation gradients overwrite; storage f32 or
//!   bf16, arithmetic f32, reductions deterministic.
//!
//! - The fp32 partial-attention merge ([`Gpu::attention_merge`]), the LM head fused with
//!   cross-entropy over vocabulary chunks ([`Gpu::lm_head_ce_forward`],
//!   [`Gpu::lm_head_ce_backward`]; logits by cuBLASLt) and AdamW ([`Gpu::adamw_step`], bit-exact
//!   with `reel_optim::AdamW`), with the CPU references' conventions.
//! - With the `cudnn` feature: fused attention through cuDNN (`Gpu::attention_forward`,
//!   `Gpu::attention_backward`; `cudnn.rs`, `csrc/cudnn_attention.cpp`), in reel's layouts.
//!
//! - The caching scratch pool (`arena`: [`Gpu::scratch`], [`Scratch`], [`SizePool`]) behind every
//!   op's temporary buffers, and [`Gpu::alloc_stats`] counting real device allocations.
//! - With the `cudnn` feature, `GpuQwen2` (`model`): the Qwen2 decoder resident on the GPU — fp32
//!   master weights and AdamW moments in `ParamLayout`, bf16 weights and activations, forward and
//!   backward under the three checkpoint policies, clipping and AdamW — over the ops above and the
//!   elementwise glue of `glue` (q/k/v split and merge, residual add, casts, gradient norm).
//!
//! - [`NcclComm`] (`nccl`): NCCL as a `reel_comm::Communicator`, one process per GPU, TCP
//!   rendezvous, host-staged and device-buffer collectives, tagged point-to-point, split; and
//!   [`NcclP2p`] ([`NcclComm::device_p2p`] borrowing it, [`NcclComm::into_device_p2p`] owning
//!   it), device point-to-point as a [`DeviceP2p`] and [`DeviceGroup`].
//! - Decode attention over a paged KV cache ([`Gpu::paged_attention_forward`], [`GpuPagedBatch`];
//!   `paged.rs`), as `reel_rollout::paged_attention_forward`.
//! - The rollout engine's decoding step ([`GpuDecoder`], `decode.rs`): `Qwen2::forward_step` on
//!   the device over a paged KV cache whose blocks live in device memory (tables on the host),
//!   a `reel_rollout::StepModel`, so `Engine::with_model` runs on the GPU; with each logits row's
//!   sampling candidates and log-sum-exp found on the device ([`Gpu::topk_lse`], `topk.rs`)
//!   when the engine's sampling allows, so only those are downloaded.
//! - The frozen Qwen2.5-VL vision tower's forward ([`GpuVisionTower`], `vision.rs`; bf16 or
//!   f32), a `reel_model::TowerForward` the MR-SP encoder runs, with its exact GELU
//!   ([`Gpu::gelu_forward`]) and bidirectional attention within segments
//!   ([`Gpu::segment_attention_forward`], [`GpuSegments`]).
//! - In-process ranks on device buffers (`devcomm.rs`: [`DeviceP2p`], the device point-to-point
//!   trait, and [`DeviceGroup`], the same plus a sum all-reduce; [`DeviceWorld`], [`DeviceComm`],
//!   [`DeviceRanks`]; each rank its own stream,
//!   [`Gpu::open_on_new_stream`]) and, with `cudnn`, sequence-parallel attention schedules over
//!   any [`DeviceP2p`] ([`GpuDistAttn`], `dist_attn.rs`; Ulysses and its hybrid with a ring,
//!   `GpuUlysses` over [`UlyssesLayout`] and [`SubP2p`], `ulysses.rs`), with the f32 ⇄ bf16
//!   conversions, accumulation, copies and strided copies they need (`convert.rs`).
//!
//! Every op is enqueued on the device's stream and returns at once; [`Gpu::download`] and
//! [`Gpu::synchronize`] wait. Shapes are checked before launch and refused with
//! [`GpuError::Shape`].

mod arena;
mod attention;
mod blas;
mod buffer;
mod collective;
mod convert;
#[cfg(feature = "cudnn")]
mod cudnn;
mod decode;
mod devcomm;
#[cfg(feature = "cudnn")]
mod dist_attn;
mod glue;
mod gpu;
pub mod libs;
mod loss;
#[cfg(feature = "cudnn")]
mod model;
pub mod nccl;
mod ops;
mod optim;
mod paged;
mod profile;
#[cfg(feature = "cudnn")]
mod sp_attn;
mod topk;
mod ulysses;
mod vision;

pub use arena::{size_class, AllocStats, Scratch, SizePool};
pub use buffer::{DView, DViewMut, DevRead, DevWrite, DeviceBuf};
pub use decode::{GpuDecoder, PrefillGroup, CUDNN_PREFILL_ROWS, PREFILL_PAD, SHARED_PREFILL_ROWS};
pub use devcomm::{
    DevOp, DevPart, DeviceComm, DeviceGroup, DeviceP2p, DeviceRanks, DeviceWorld, Transfer,
};
#[cfg(feature = "cudnn")]
pub use dist_attn::{GpuDistAttn, GpuSpStats};
pub use glue::UPLOAD_CAST_CHUNK;
pub use gpu::{DeviceInfo, Gpu, MemWatch};
#[cfg(feature = "cudnn")]
pub use model::{GpuAttention, GpuDpGroup, GpuEmbedsBatch, GpuQwen2, Weights};
pub use nccl::{NcclBatch, NcclComm, NcclP2p, NcclPosted};
pub use ops::{GpuRopeTable, PAGED_HEAD_DIMS};
pub use paged::{head_group as paged_head_group, GpuPagedBatch};
pub use profile::{kernel_name, sum_by_category, Profile, ProfileRow};
pub use reel_model::plan::{activation_bytes, ce_chunk, workspace_bytes};
#[cfg(feature = "cudnn")]
pub use sp_attn::{GpuSpAttention, GpuSpRank, GpuSpTotals};
pub use topk::TOPK_CAP;
#[cfg(feature = "cudnn")]
pub use ulysses::GpuUlysses;
pub use ulysses::{SubP2p, UlyssesLayout};
pub use vision::{GpuSegments, GpuVisionTower, DEFAULT_CHUNK_PATCHES, SEG_MAX_HEAD_DIM};

use half::bf16;

/// Why the GPU path is unavailable or an op failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No CUDA driver library: no NVIDIA driver on this machine.
    #[error("no NVIDIA driver: libcuda.so.1 could not be loaded ({0})")]
    NoDriver(String),
    /// The driver is there but the device is not.
    #[error("no CUDA device {ordinal}: {detail}")]
    NoDevice { ordinal: usize, detail: String },
    /// A CUDA library other than the driver could not be loaded.
    #[error("CUDA library {lib} could not be loaded ({detail}); install NVIDIA's pip wheels (nvidia-cublas, nvidia-cuda-nvrtc, nvidia-cuda-runtime) or set REEL_CUDA_LIB_DIRS")]
    MissingLibrary { lib: &'static str, detail: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC could not compile reel's kernels (the log follows).
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// A cuBLASLt call failed.
    #[error("cuBLASLt: {0}")]
    Blas(String),
    /// cuDNN refused a graph or failed to run one (its message follows).
    #[error("cuDNN: {0}")]
    Cudnn(String),
    /// Buffer lengths or dimensions that do not fit the op.
    #[error("{0}")]
    Shape(String),
    /// A training step produced a NaN or infinite loss (the message says where).
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// In-process device communication failed: a peer did not post its side in time, the sizes
    /// of a send and its receive differ, or another rank aborted the world.
    #[error("device communicator: {0}")]
    Comm(String),
    /// A CUDA library panicked inside cudarc (a missing symbol, say).
    #[error("CUDA library call panicked: {0}")]
    Panic(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(format!("{e:?}"))
    }
}

impl From<cudarc::cublaslt::result::CublasError> for GpuError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        GpuError::Blas(format!("{e:?}"))
    }
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for u32 {}
}

/// An element type device buffers hold: f32, bf16 or u32 (token ids, positions).
pub trait DeviceElem:
    sealed::Sealed
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
}
impl DeviceElem for f32 {}
impl DeviceElem for bf16 {}
impl DeviceElem for u32 {}

/// A storage type the ops run on: f32 or bf16 (arithmetic is f32 either way).
pub trait GpuFloat: DeviceElem + reel_tensor::Float {
    /// Kernel name suffix (`rmsnorm_fwd_bf16`).
    const SUFFIX: &'static str;
    /// Index into per-type kernel tables.
    const INDEX: usize;
    /// cuBLASLt's name for the type.
    fn cuda_type() -> cudarc::cublaslt::sys::cudaDataType;
}

impl GpuFloat for f32 {
    const SUFFIX: &'static str = "f32";
    const INDEX: usize = 0;
    fn cuda_type() -> cudarc::cublaslt::sys::cudaDataType {
        cudarc::cublaslt::sys::cudaDataType::CUDA_R_32F
    }
}

impl GpuFloat for bf16 {
    const SUFFIX: &'static str = "bf16";
    const INDEX: usize = 1;
    fn cuda_type() -> cudarc::cublaslt::sys::cudaDataType {
        cudarc::cublaslt::sys::cudaDataType::CUDA_R_16BF
    }
}

/// Runs `f`, turning a panic inside cudarc (it panics when a library or symbol cannot be loaded)
/// into [`GpuError::Panic`].
pub(crate) fn catch<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(GpuError::Panic(format!("{what}: {msg}")))
        }
    }
}

pub(crate) fn shape_err<T>(msg: String) -> Result<T> {
    Err(GpuError::Shape(msg))
}
