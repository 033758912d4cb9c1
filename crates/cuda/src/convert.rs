//! Conversions between f32 and a storage type, f32 accumulation and fills, and device-to-device
//! copies: the glue of DistAttn on device buffers (f32 partials and gradient accumulators beside
//! bf16 blocks). Elementwise over flat buffers of equal length.

use cudarc::driver::{result as dres, CudaFunction};

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{cfg, check, elementwise_grid, launch};
use crate::{DeviceElem, Gpu, GpuFloat, Result};

/// Conversions, accumulation and fills between f32 and a storage type (DistAttn's f32 partials
/// and gradient accumulators).
impl Gpu {
    /// `dst = src` widened to f32 (same length).
    pub fn to_f32<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<f32>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        self.elementwise("to_f32", &self.kernels.to_f32[T::INDEX], dst, src)
    }

    /// `dst = src` rounded to `T` (same length).
    pub fn from_f32<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<T>,
        src: &impl DevRead<f32>,
    ) -> Result<()> {
        let op = "from_f32";
        check(op, "src", src.dlen(), dst.dlen())?;
        if dst.dlen() == 0 {
            return Ok(());
        }
        self.bind()?;
        let (d, s, n) = (dst.dptr(), src.dptr(), dst.dlen() as i64);
        launch!(
            self,
            &self.kernels.from_f32[T::INDEX],
            cfg((elementwise_grid(dst.dlen()), 1, 1), (256, 1, 1)),
            &d,
            &s,
            &n
        )
    }

    /// `dst += src` in f32 (same length).
    pub fn add_to_f32<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<f32>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        self.elementwise("add_to_f32", &self.kernels.add_to_f32[T::INDEX], dst, src)
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

    fn elementwise<T>(
        &self,
        op: &str,
        f: &CudaFunction,
        dst: &mut impl DevWrite<f32>,
        src: &impl DevRead<T>,
    ) -> Result<()> {
        check(op, "src", src.dlen(), dst.dlen())?;
        if dst.dlen() == 0 {
            return Ok(());
        }
        self.bind()?;
        let (d, s, n) = (dst.dptr(), src.dptr(), dst.dlen() as i64);
        launch!(
            self,
            f,
            cfg((elementwise_grid(dst.dlen()), 1, 1), (256, 1, 1)),
            &d,
            &s,
            &n
        )
    }
}
