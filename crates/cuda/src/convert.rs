//! Widening to f32, fills and device-to-device copies, for DistAttn on device buffers (f32
//! partials and gradient accumulators beside bf16 blocks); rounding to a storage type and f32
//! accumulation are `glue.rs`'s `cast_from_f32` and `accum_f32`. Elementwise over flat buffers
//! of equal length.

use cudarc::driver::result as dres;

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
}
