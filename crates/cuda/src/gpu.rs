//! Opening a device: libraries, context, stream, kernels, cuBLASLt.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{result as dres, sys as dsys, CudaContext, CudaStream};

use crate::blas::Blas;
use crate::buffer::{DevRead, DevWrite, DeviceBuf};
use crate::ops::Kernels;
use crate::{catch, libs, shape_err, DeviceElem, GpuError, Result};

/// What [`Gpu::open`] found.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub device_count: usize,
    pub name: String,
    /// Compute capability (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    pub total_mem_bytes: usize,
    /// The driver's CUDA version, (13, 0).
    pub driver_cuda: (i32, i32),
    pub nvrtc: (i32, i32),
    /// Library folders searched ([`libs::lib_dirs`]).
    pub lib_dirs: Vec<PathBuf>,
    /// `-I` folders given to NVRTC.
    pub include_dirs: Vec<PathBuf>,
    /// Seconds NVRTC took for reel's kernels (0 when cached in this process).
    pub compile_secs: f64,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {} of {}: {}, sm_{}{}, {} SMs, {:.1} GiB; driver CUDA {}.{}, NVRTC {}.{}",
            self.ordinal,
            self.device_count,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_mem_bytes as f64 / (1u64 << 30) as f64,
            self.driver_cuda.0,
            self.driver_cuda.1,
            self.nvrtc.0,
            self.nvrtc.1
        )
    }
}

/// One CUDA device with one stream, reel's compiled kernels and a cuBLASLt handle. Ops are
/// enqueued in order on the stream. Methods take `&self`; use one `Gpu` from one thread at a time
/// (share it behind a `Mutex`).
pub struct Gpu {
    // Dropped in this order: cuDNN, cuBLASLt and the module before the stream and context.
    /// cuDNN's handle, plans and buffers, made on first use (feature `cudnn`).
    #[cfg(feature = "cudnn")]
    pub(crate) cudnn: std::sync::Mutex<Option<crate::cudnn::Cudnn>>,
    pub(crate) blas: Blas,
    /// Freed scratch blocks ([`crate::arena`]); dropped before the stream.
    pub(crate) pool: std::sync::Mutex<crate::arena::SizePool<cudarc::driver::CudaSlice<u8>>>,
    /// Device allocations made so far ([`Gpu::alloc_stats`]).
    pub(crate) allocs: std::sync::atomic::AtomicU64,
    pub(crate) kernels: Kernels,
    /// Device time by kind of op, when on ([`crate::profile`]).
    pub(crate) prof: crate::profile::Profiler,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) ctx: Arc<CudaContext>,
    info: DeviceInfo,
}

fn panic_free_present(f: unsafe fn() -> bool) -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the library.
    std::panic::catch_unwind(|| unsafe { f() }).unwrap_or(false)
}

fn preload_note(stem: &str) -> String {
    libs::preload()
        .iter()
        .find(|p| p.stem == stem)
        .map(|p| match &p.result {
            Ok(path) => format!("{} loaded, yet cudarc cannot open it", path.display()),
            Err(e) => e.clone(),
        })
        .unwrap_or_default()
}

impl Gpu {
    /// Opens device `ordinal`: finds and loads the CUDA libraries ([`libs`]), creates the context
    /// and stream, compiles reel's kernels with NVRTC for the device's architecture (cached per
    /// process) and creates the cuBLASLt handle. Without a driver, a device or a library, answers
    /// a [`GpuError`] saying which; never panics.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        catch("opening the GPU", || Self::open_inner(ordinal, false))
    }

    /// As [`Gpu::open`], but the ops run on a stream of their own (non-blocking) instead of the
    /// device's default stream, so several `Gpu`s of one device (in-process ranks, each on its
    /// thread) run concurrently; they share the device's primary context, so their buffers are
    /// addressable from each other.
    pub fn open_on_new_stream(ordinal: usize) -> Result<Gpu> {
        catch("opening the GPU", || Self::open_inner(ordinal, true))
    }

    /// How many CUDA devices the driver sees (an error when there is no driver).
    pub fn device_count() -> Result<usize> {
        catch("counting the GPUs", || {
            libs::preload();
            if !panic_free_present(dsys::is_culib_present) {
                return Err(GpuError::NoDriver(preload_note("libcuda")));
            }
            dres::init()
                .and_then(|_| dres::device::get_count())
                .map(|c| c.max(0) as usize)
                .map_err(|e| GpuError::NoDevice {
                    ordinal: 0,
                    detail: format!("the driver reports {e:?}"),
                })
        })
    }

    fn open_inner(ordinal: usize, own_stream: bool) -> Result<Gpu> {
        libs::preload();
        if !panic_free_present(dsys::is_culib_present) {
            let note = preload_note("libcuda");
            return Err(GpuError::NoDriver(note));
        }
        let count = match dres::init().and_then(|_| dres::device::get_count()) {
            Ok(c) => c.max(0) as usize,
            Err(e) => {
                return Err(GpuError::NoDevice {
                    ordinal,
                    detail: format!("the driver reports {e:?}"),
                })
            }
        };
        if ordinal >= count {
            return Err(GpuError::NoDevice {
                ordinal,
                detail: format!("this machine has {count} CUDA device(s)"),
            });
        }
        if !panic_free_present(cudarc::nvrtc::sys::is_culib_present) {
            return Err(GpuError::MissingLibrary {
                lib: "libnvrtc",
                detail: preload_note("libnvrtc"),
            });
        }
        if !panic_free_present(cudarc::cublaslt::sys::is_culib_present) {
            return Err(GpuError::MissingLibrary {
                lib: "libcublasLt",
                detail: preload_note("libcublasLt"),
            });
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream per Gpu, so cudarc's cross-stream event tracking is not needed.
        // SAFETY: every op of this crate runs on `stream`, in order.
        unsafe { ctx.disable_event_tracking() };
        let stream = if own_stream {
            ctx.new_stream()?
        } else {
            ctx.default_stream()
        };
        let (maj, min) = ctx.compute_capability()?;
        let mut drv = 0i32;
        // SAFETY: plain query into a local.
        unsafe { dsys::cuDriverGetVersion(&mut drv) }.result()?;
        let (mut nv_maj, mut nv_min) = (0i32, 0i32);
        // SAFETY: plain query into locals.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut nv_maj, &mut nv_min) }
            .result()
            .map_err(|e| GpuError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
        let lib_dirs = libs::lib_dirs().to_vec();
        let include_dirs = libs::include_dirs(&lib_dirs);
        let (kernels, compile_secs) = Kernels::load(&ctx, (maj, min), &include_dirs)?;
        let blas = Blas::new(&stream)?;
        let info = DeviceInfo {
            ordinal,
            device_count: count,
            name: ctx.name()?,
            compute_capability: (maj, min),
            multiprocessors: ctx
                .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            total_mem_bytes: ctx.total_mem()?,
            driver_cuda: (drv / 1000, (drv % 1000) / 10),
            nvrtc: (nv_maj, nv_min),
            lib_dirs,
            include_dirs,
            compile_secs,
        };
        Ok(Gpu {
            #[cfg(feature = "cudnn")]
            cudnn: std::sync::Mutex::new(None),
            blas,
            pool: Default::default(),
            // One so far: the cuBLASLt workspace `Blas::new` made.
            allocs: std::sync::atomic::AtomicU64::new(1),
            kernels,
            prof: Default::default(),
            stream,
            ctx,
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(crate) fn cu_stream(&self) -> dsys::CUstream {
        self.stream.cu_stream()
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    /// A new buffer holding `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuf<T>> {
        self.bind()?;
        self.count_alloc();
        Ok(DeviceBuf {
            slice: self.stream.clone_htod(host)?,
        })
    }

    /// A new buffer of `len` zeros.
    pub fn alloc_zeros<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        self.bind()?;
        self.count_alloc();
        Ok(DeviceBuf {
            slice: self.stream.alloc_zeros(len)?,
        })
    }

    /// Copies `host` into `dst` (same length).
    pub fn upload_into<T: DeviceElem>(&self, dst: &mut impl DevWrite<T>, host: &[T]) -> Result<()> {
        if dst.dlen() != host.len() {
            return shape_err(format!(
                "upload_into: {} host elements into {} device elements",
                host.len(),
                dst.dlen()
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` holds host.len() elements of T; a pageable source is staged before the
        // call returns.
        unsafe { dres::memcpy_htod_async(dst.dptr(), host, self.cu_stream()) }?;
        Ok(())
    }

    /// Waits for the stream and copies `src` to the host.
    pub fn download<T: DeviceElem>(&self, src: &impl DevRead<T>) -> Result<Vec<T>> {
        self.bind()?;
        let mut host = vec![T::default(); src.dlen()];
        if !host.is_empty() {
            // SAFETY: `src` holds host.len() elements of T; synchronised below before use.
            unsafe { dres::memcpy_dtoh_async(&mut host, src.dptr(), self.cu_stream()) }?;
        }
        self.stream.synchronize()?;
        Ok(host)
    }

    /// Waits for the stream and copies `src` into `host` (same length; a reused host buffer).
    pub fn download_into<T: DeviceElem>(
        &self,
        host: &mut [T],
        src: &impl DevRead<T>,
    ) -> Result<()> {
        if host.len() != src.dlen() {
            return shape_err(format!(
                "download_into: {} device elements into {} host elements",
                src.dlen(),
                host.len()
            ));
        }
        self.bind()?;
        if !host.is_empty() {
            // SAFETY: `src` holds host.len() elements of T; synchronised below before use.
            unsafe { dres::memcpy_dtoh_async(host, src.dptr(), self.cu_stream()) }?;
        }
        self.stream.synchronize()?;
        Ok(())
    }

    /// Sets every byte of `dst` to zero.
    pub fn zero<T: DeviceElem>(&self, dst: &mut impl DevWrite<T>) -> Result<()> {
        self.timed("kernels", "memset", || {
            self.bind()?;
            if dst.dlen() > 0 {
                // SAFETY: writes exactly dst's bytes.
                unsafe {
                    dres::memset_d8_async(
                        dst.dptr(),
                        0,
                        dst.dlen() * size_of::<T>(),
                        self.cu_stream(),
                    )
                }?;
            }
            Ok(())
        })
    }

    /// (bytes in use, total bytes) of the device as the driver reports them (cuMemGetInfo):
    /// every process's and library's memory on it, this Gpu's buffers and cached scratch blocks
    /// included.
    pub fn memory_in_use(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let (free, total) = dres::mem_get_info()?;
        Ok((total.saturating_sub(free), total))
    }

    /// Waits until every enqueued op has finished; reports a failed kernel.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize()?;
        Ok(())
    }

    /// Runs `f` `warmup` times, then `iters` times with CUDA events around each run; returns the
    /// milliseconds of each timed run.
    pub fn time_ms(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f32>> {
        self.bind()?;
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(dsys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(iters + 1);
        events.push(self.ctx.new_event(flags)?);
        events[0].record(&self.stream)?;
        for _ in 0..iters {
            f()?;
            let e = self.ctx.new_event(flags)?;
            e.record(&self.stream)?;
            events.push(e);
        }
        self.stream.synchronize()?;
        events
            .windows(2)
            .map(|w| Ok(w[0].elapsed_ms(&w[1])?))
            .collect()
    }
}

/// A thread sampling a device's used memory — total − free by `cuMemGetInfo`, so every context
/// and process on the device — every `period`, keeping the highest it saw. The Gpu's caching pool
/// keeps every block it took, so the peak is close to the process's high-water mark; an
/// allocation shorter than `period` may be missed.
pub struct MemWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(usize, usize)>>>,
}

impl MemWatch {
    /// Starts sampling device `ordinal` (its primary context, shared with the process's Gpus).
    pub fn start(ordinal: usize, period: std::time::Duration) -> Result<MemWatch> {
        let ctx = catch("watching the GPU's memory", || {
            libs::preload();
            if !panic_free_present(dsys::is_culib_present) {
                return Err(GpuError::NoDriver(preload_note("libcuda")));
            }
            Ok(CudaContext::new(ordinal)?)
        })?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<(usize, usize)> {
            ctx.bind_to_thread()?;
            let mut peak = 0usize;
            loop {
                let (free, total) = dres::mem_get_info()?;
                peak = peak.max(total - free);
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok((peak, total));
                }
                std::thread::sleep(period);
            }
        });
        Ok(MemWatch {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sampling; returns the peak used bytes and the device's total bytes.
    pub fn stop(mut self) -> Result<(usize, usize)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let t = self.thread.take().expect("running until stopped");
        t.join()
            .map_err(|_| GpuError::Driver("the memory watch thread panicked".into()))?
    }
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: CI has no GPU, so this checks the CPU-fallback answer there.
    #[test]
    fn open_answers_a_device_or_a_clear_error_never_a_panic() {
        match Gpu::open(0) {
            Ok(gpu) => {
                eprintln!("{}", gpu.info());
                assert!(!gpu.info().name.is_empty());
            }
            Err(e) => {
                let msg = e.to_string();
                eprintln!("no GPU here: {msg}");
                assert!(
                    matches!(
                        e,
                        GpuError::NoDriver(_)
                            | GpuError::NoDevice { .. }
                            | GpuError::MissingLibrary { .. }
                    ),
                    "unexpected error kind: {e:?}"
                );
                assert!(msg.contains("CUDA") || msg.contains("NVIDIA"), "{msg}");
            }
        }
    }

    #[test]
    fn a_device_past_the_last_is_refused() {
        let e = Gpu::open(4096).err().expect("no machine has 4097 GPUs");
        assert!(
            matches!(
                e,
                GpuError::NoDriver(_) | GpuError::NoDevice { ordinal: 4096, .. }
            ),
            "{e:?}"
        );
    }
}
