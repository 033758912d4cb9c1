//! Widening to f32, fills and device-to-device copies, for DistAttn on device buffers (f32
//! partials and gradient accumulators beside bf16 blocks), and strided (2-D) copies, for Ulysses'
//! head slices (`[rows, W]` → `[rows, w]` columns); rounding to a storage type and f32
//! accumulation are `glue.rs`'s `cast_from_f32` and `accum_f32`. Elementwise over flat buffers
//! of equal length.

use cudarc::driver::{result as dres, sys as dsys};

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{cfg, check, elementwise_grid, launch};
use crate::{DeviceElem, Gpu, GpuFloat, Result};

/// Widening and fills of f32 buffers, device-to-device copies (DistAttn's f32 partials and
/// gradient accumulators).
impl Gpu {
    /// `dst = src` widened to f32 (same length).
    pub fn to_f32<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<f32>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        check("to_f32", "src", src.dlen(), dst.dlen())?;
        self.elementwise(
            "to_f32",
            &self.kernels.to_f32[T::INDEX],
            dst.dptr(),
            src.dptr(),
            dst.dlen(),
        )
    }

    /// Every element of `dst` set to `v`.
    pub fn fill_f32(&self, dst: &mut impl DevWrite<f32>, v: f32) -> Result<()> {
        if dst.dlen() == 0 {
            return Ok(());
        }
        self.bind()?;
        let (d, n) = (dst.dptr(), dst.dlen() as i64);
        launch!(
            self,
            &self.kernels.fill_f32,
            cfg((elementwise_grid(dst.dlen()), 1, 1), (256, 1, 1)),
            &d,
            &v,
            &n
        )
    }

    /// `dst = src` (same length), a device-to-device copy on this `Gpu`'s stream.
    pub fn copy<T: DeviceElem>(
        &self,
        dst: &mut impl DevWrite<T>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        check("copy", "src", src.dlen(), dst.dlen())?;
        if dst.dlen() == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges hold dst.dlen() elements of T (checked above).
        unsafe {
            dres::memcpy_dtod_async(
                dst.dptr(),
                src.dptr(),
                dst.dlen() * size_of::<T>(),
                self.cu_stream(),
            )
        }?;
        Ok(())
    }

    /// Strided copy: `rows` rows of `width` elements, row i from `src[src_at + i·src_pitch ..]`
    /// to `dst[dst_at + i·dst_pitch ..]` (element offsets and pitches), one `cuMemcpy2DAsync` on
    /// this `Gpu`'s stream. Refused when a row would fall outside either buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_2d<T: DeviceElem>(
        &self,
        dst: &mut impl DevWrite<T>,
        dst_at: usize,
        dst_pitch: usize,
        src: &impl DevRead<T>,
        src_at: usize,
        src_pitch: usize,
        width: usize,
        rows: usize,
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        for (name, at, pitch, len) in [
            ("dst", dst_at, dst_pitch, dst.dlen()),
            ("src", src_at, src_pitch, src.dlen()),
        ] {
            if width > pitch || at + (rows - 1) * pitch + width > len {
                return crate::shape_err(format!(
                    "copy_2d: {name} of {len} elements cannot hold {rows} rows of {width} at \
                     offset {at}, pitch {pitch}"
                ));
            }
        }
        self.bind()?;
        let e = size_of::<T>();
        let p = dsys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src.dptr() + (src_at * e) as u64,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch * e,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst.dptr() + (dst_at * e) as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch * e,
            WidthInBytes: width * e,
            Height: rows,
        };
        // SAFETY: every row lies inside both buffers (checked above); both are device memory.
        unsafe { dsys::cuMemcpy2DAsync_v2(&p, self.cu_stream()) }.result()?;
        Ok(())
    }
}
