//! Device buffers and views of sub-ranges (a flat parameter buffer's tensors, say).

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::{shape_err, DeviceElem, Result};

/// A device allocation of `len` elements of `T`, freed (stream-ordered) on drop. Made by
/// [`crate::Gpu::upload`] or [`crate::Gpu::alloc_zeros`].
pub struct DeviceBuf<T: DeviceElem> {
    pub(crate) slice: CudaSlice<T>,
}

impl<T: DeviceElem> DeviceBuf<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    pub(crate) fn ptr(&self) -> u64 {
        // Event tracking is off (one stream per Gpu), so the guard records nothing.
        let (p, _guard) = self.slice.device_ptr(self.slice.stream());
        p
    }

    /// Elements `range` as a read-only view.
    pub fn view(&self, range: Range<usize>) -> Result<DView<'_, T>> {
        check_range(&range, self.len())?;
        Ok(DView {
            ptr: self.ptr() + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _p: PhantomData,
        })
    }

    /// Elements `range` as a writable view.
    pub fn view_mut(&mut self, range: Range<usize>) -> Result<DViewMut<'_, T>> {
        check_range(&range, self.len())?;
        Ok(DViewMut {
            ptr: self.ptr() + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _p: PhantomData,
        })
    }
}

impl<T: DeviceElem> DeviceBuf<T> {
    /// Two writable views of disjoint ranges (a weight's and its bias's gradients, say).
    pub fn views_mut2(
        &mut self,
        a: Range<usize>,
        b: Range<usize>,
    ) -> Result<(DViewMut<'_, T>, DViewMut<'_, T>)> {
        check_range(&a, self.len())?;
        check_range(&b, self.len())?;
        if a.start < b.end && b.start < a.end && !a.is_empty() && !b.is_empty() {
            return shape_err(format!("views {a:?} and {b:?} overlap"));
        }
        let base = self.ptr();
        let mk = |r: &Range<usize>| DViewMut {
            ptr: base + (r.start * size_of::<T>()) as u64,
            len: r.len(),
            _p: PhantomData,
        };
        Ok((mk(&a), mk(&b)))
    }
}

fn check_range(r: &Range<usize>, len: usize) -> Result<()> {
    if r.start > r.end || r.end > len {
        return shape_err(format!("view {r:?} is outside a buffer of {len} elements"));
    }
    Ok(())
}

/// A read-only view of device elements.
#[derive(Clone, Copy)]
pub struct DView<'a, T> {
    ptr: u64,
    len: usize,
    _p: PhantomData<&'a T>,
}

impl<'a, T> DView<'a, T> {
    /// All of `src`.
    pub fn all(src: &'a impl DevRead<T>) -> Self {
        DView {
            ptr: src.dptr(),
            len: src.dlen(),
            _p: PhantomData,
        }
    }

    /// Elements `range` of `src` (checked against its length).
    pub fn of(src: &'a impl DevRead<T>, range: Range<usize>) -> Result<Self> {
        check_range(&range, src.dlen())?;
        Ok(DView {
            ptr: src.dptr() + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _p: PhantomData,
        })
    }
}

impl<T> DView<'_, T> {
    /// A view of `len` elements at device address `ptr`, for a holder that keeps a borrowed
    /// buffer's address past the borrow.
    ///
    /// # Safety
    /// `ptr` must address `len` elements of `T` on the device that stay allocated while the
    /// view is used.
    pub(crate) unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        DView {
            ptr,
            len,
            _p: PhantomData,
        }
    }
}

impl<'a, T> DView<'a, T> {
    /// The same bytes as elements of `U`, of the same size (code generic over the storage type
    /// that has checked `T` is `U`).
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    pub(crate) fn retype<U>(self) -> DView<'a, U> {
        assert_eq!(size_of::<T>(), size_of::<U>(), "retype between sizes");
        DView {
            ptr: self.ptr,
            len: self.len,
            _p: PhantomData,
        }
    }
}

impl<'a, T> DViewMut<'a, T> {
    /// [`DView::retype`] for a writable view.
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    pub(crate) fn retype<U>(self) -> DViewMut<'a, U> {
        assert_eq!(size_of::<T>(), size_of::<U>(), "retype between sizes");
        DViewMut {
            ptr: self.ptr,
            len: self.len,
            _p: PhantomData,
        }
    }

    /// All of `dst`.
    pub fn all(dst: &'a mut impl DevWrite<T>) -> Self {
        DViewMut {
            ptr: dst.dptr(),
            len: dst.dlen(),
            _p: PhantomData,
        }
    }

    /// Elements `range` of `dst` (checked against its length).
    pub fn of(dst: &'a mut impl DevWrite<T>, range: Range<usize>) -> Result<Self> {
        check_range(&range, dst.dlen())?;
        Ok(DViewMut {
            ptr: dst.dptr() + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _p: PhantomData,
        })
    }
}

/// A writable view of device elements.
pub struct DViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _p: PhantomData<&'a mut T>,
}

/// Device memory an op reads: a [`DeviceBuf`] or a view.
pub trait DevRead<T> {
    /// The device address of the first element.
    fn dptr(&self) -> u64;
    /// Number of elements.
    fn dlen(&self) -> usize;
}

/// Device memory an op writes: a [`DeviceBuf`] or a [`DViewMut`].
pub trait DevWrite<T>: DevRead<T> {}

impl<T: DeviceElem> DevRead<T> for DeviceBuf<T> {
    fn dptr(&self) -> u64 {
        self.ptr()
    }
    fn dlen(&self) -> usize {
        self.len()
    }
}
impl<T: DeviceElem> DevWrite<T> for DeviceBuf<T> {}

impl<T> DevRead<T> for DView<'_, T> {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn dlen(&self) -> usize {
        self.len
    }
}

impl<T> DevRead<T> for DViewMut<'_, T> {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn dlen(&self) -> usize {
        self.len
    }
}
impl<T> DevWrite<T> for DViewMut<'_, T> {}
