//! The caching allocator behind every scratch buffer of the GPU path, and the allocation
//! counters that prove a training step allocates nothing once warm.
//!
//! [`SizePool`] is the bookkeeping (no CUDA in it, so it is tested on any machine): freed blocks
//! are kept by their size class and handed out again best-fit, never more than twice the bytes
//! asked for. Size classes are 512-byte multiples up to 4 KiB, then four steps per power of two
//! (2^k, 1.25·2^k, 1.5·2^k, 1.75·2^k), so a buffer whose length moves a little from step to step
//! (the labelled rows of a batch) lands on a block it used before; the waste is under 25%.
//!
//! [`Scratch`] is one block lent by a [`crate::Gpu`]'s pool: a device buffer of `len` elements
//! that goes back to the pool when dropped. Every op runs on the Gpu's one stream, so a block
//! given back is reused only by work enqueued after the work that used it (stream order), as in
//! PyTorch's caching allocator. [`AllocStats`] counts the real device allocations (pool misses,
//! uploads, `alloc_zeros`, library workspaces) and the pool's hits.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::buffer::{DView, DViewMut, DevRead, DevWrite};
use crate::{DeviceElem, Gpu, GpuError, Result};

/// The size class (bytes) a request of `bytes` is served from.
pub fn size_class(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b <= 4096 {
        return b.div_ceil(512) * 512;
    }
    let p = usize::BITS - 1 - (b - 1).leading_zeros(); // 2^p < b ≤ 2^(p+1)
    let base = 1usize << p;
    let step = base / 4;
    base + (b - base).div_ceil(step) * step
}

/// Freed blocks by size class, with counters. `B` is the block (a device slice on the GPU).
#[derive(Debug)]
pub struct SizePool<B> {
    free: BTreeMap<usize, Vec<B>>,
    /// Requests served by a cached block.
    pub hits: u64,
    /// Requests that needed a new block.
    pub misses: u64,
    /// Bytes of every block made (cached or lent).
    pub bytes_made: usize,
    /// Bytes of the blocks now cached.
    pub bytes_cached: usize,
    /// High-water mark of `bytes_made` since the pool was made or [`SizePool::reset_peak`]: the
    /// most device memory the pool held at once.
    pub peak_bytes: usize,
}

impl<B> Default for SizePool<B> {
    fn default() -> Self {
        SizePool {
            free: BTreeMap::new(),
            hits: 0,
            misses: 0,
            bytes_made: 0,
            bytes_cached: 0,
            peak_bytes: 0,
        }
    }
}

impl<B> SizePool<B> {
    /// A cached block for `bytes` (its class, and the block), best-fit within 2× the class;
    /// `None` when the caller must make one of `size_class(bytes)` bytes (counted as a miss).
    pub fn take(&mut self, bytes: usize) -> (usize, Option<B>) {
        let class = size_class(bytes);
        let found = self
            .free
            .range_mut(class..=class.saturating_mul(2))
            .find(|(_, v)| !v.is_empty())
            .map(|(&c, v)| (c, v.pop().expect("non-empty")));
        match found {
            Some((c, b)) => {
                self.hits += 1;
                self.bytes_cached -= c;
                (c, Some(b))
            }
            None => {
                self.misses += 1;
                self.bytes_made += class;
                self.peak_bytes = self.peak_bytes.max(self.bytes_made);
                (class, None)
            }
        }
    }

    /// Gives a block of class `class` back.
    pub fn give(&mut self, class: usize, block: B) {
        self.bytes_cached += class;
        self.free.entry(class).or_default().push(block);
    }

    /// Every cached block, with its class.
    pub fn cached(&self) -> impl Iterator<Item = (usize, &B)> {
        self.free
            .iter()
            .flat_map(|(&c, v)| v.iter().map(move |b| (c, b)))
    }

    /// Drops every cached block (their memory goes back to the device); returns the bytes freed.
    pub fn release(&mut self) -> usize {
        let freed = self.bytes_cached;
        self.bytes_made -= freed;
        self.bytes_cached = 0;
        self.free.clear();
        freed
    }

    /// Starts a new high-water mark at the bytes held now.
    pub fn reset_peak(&mut self) {
        self.peak_bytes = self.bytes_made;
    }
}

/// Device allocations of one [`Gpu`] so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Real device allocations: pool misses, uploads, `alloc_zeros`, library workspaces.
    pub device_allocs: u64,
    /// Scratch requests served from the pool.
    pub pool_hits: u64,
    /// Bytes the pool has made (lent or cached).
    pub pool_bytes: usize,
    /// The pool's high-water mark ([`SizePool::peak_bytes`]): the most bytes it held at once
    /// since the Gpu was opened or [`Gpu::reset_pool_peak`].
    pub pool_peak_bytes: usize,
}

/// A scratch buffer of `len` elements lent by the Gpu's pool; back to the pool on drop. Its
/// contents are undefined until written.
pub struct Scratch<'g, T: DeviceElem> {
    gpu: &'g Gpu,
    block: Option<CudaSlice<u8>>,
    class: usize,
    ptr: u64,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: DeviceElem> Drop for Scratch<'_, T> {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            if let Ok(mut pool) = self.gpu.pool.lock() {
                pool.give(self.class, b);
            }
        }
    }
}

impl<T: DeviceElem> Scratch<'_, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `range` as a read-only view.
    pub fn view(&self, range: Range<usize>) -> Result<DView<'_, T>> {
        DView::of(self, range)
    }

    /// Elements `range` as a writable view.
    pub fn view_mut(&mut self, range: Range<usize>) -> Result<DViewMut<'_, T>> {
        DViewMut::of(self, range)
    }
}

impl<T: DeviceElem> DevRead<T> for Scratch<'_, T> {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn dlen(&self) -> usize {
        self.len
    }
}
impl<T: DeviceElem> DevWrite<T> for Scratch<'_, T> {}

impl Gpu {
    /// A scratch buffer of `len` elements from the pool (a new device block only on a miss).
    pub fn scratch<T: DeviceElem>(&self, len: usize) -> Result<Scratch<'_, T>> {
        let bytes = len.max(1) * size_of::<T>();
        let (class, cached) = self
            .pool
            .lock()
            .map_err(|_| GpuError::Driver("scratch pool poisoned".into()))?
            .take(bytes);
        let block = match cached {
            Some(b) => b,
            None => {
                self.bind()?;
                self.count_alloc();
                // SAFETY: scratch is written before it is read (documented on `Scratch`).
                match unsafe { self.stream.alloc::<u8>(class) } {
                    Ok(b) => b,
                    Err(_) => {
                        // Out of memory, perhaps because of cached blocks: free them and retry.
                        self.release_cached()?;
                        // SAFETY: as above.
                        unsafe { self.stream.alloc::<u8>(class) }?
                    }
                }
            }
        };
        let ptr = {
            let (p, _g) = block.device_ptr(&self.stream);
            p
        };
        Ok(Scratch {
            gpu: self,
            block: Some(block),
            class,
            ptr,
            len,
            _t: PhantomData,
        })
    }

    /// A scratch buffer holding `host` (copied in stream order).
    pub fn scratch_from<T: DeviceElem>(&self, host: &[T]) -> Result<Scratch<'_, T>> {
        let mut s = self.scratch::<T>(host.len())?;
        self.upload_into(&mut s, host)?;
        Ok(s)
    }

    /// Frees every cached scratch block (after waiting for the stream); returns the bytes freed.
    pub fn release_cached(&self) -> Result<usize> {
        self.synchronize()?;
        let mut pool = self
            .pool
            .lock()
            .map_err(|_| GpuError::Driver("scratch pool poisoned".into()))?;
        Ok(pool.release())
    }

    /// Frees every cached scratch block and starts a new pool high-water mark
    /// ([`AllocStats::pool_peak_bytes`]) at the bytes still lent; returns the bytes freed. What
    /// a benchmark calls before the steps whose peak memory it reports.
    pub fn reset_pool_peak(&self) -> Result<usize> {
        let freed = self.release_cached()?;
        if let Ok(mut pool) = self.pool.lock() {
            pool.reset_peak();
        }
        Ok(freed)
    }

    /// Fills every cached scratch block with `byte`, in stream order; returns how many. A
    /// debugging aid: a buffer that is read before it is written then shows (`0xFF` is NaN in
    /// bf16 and f32).
    pub fn scribble_cached(&self, byte: u8) -> Result<usize> {
        self.bind()?;
        let pool = self
            .pool
            .lock()
            .map_err(|_| GpuError::Driver("scratch pool poisoned".into()))?;
        let mut n = 0;
        for (class, block) in pool.cached() {
            let (p, _g) = block.device_ptr(&self.stream);
            // SAFETY: writes exactly the block's `class` bytes; no one holds a cached block.
            unsafe { cudarc::driver::result::memset_d8_async(p, byte, class, self.cu_stream()) }?;
            n += 1;
        }
        Ok(n)
    }

    /// Device allocations so far (see [`AllocStats`]).
    pub fn alloc_stats(&self) -> AllocStats {
        let (hits, bytes, peak) = self
            .pool
            .lock()
            .map(|p| (p.hits, p.bytes_made, p.peak_bytes))
            .unwrap_or((0, 0, 0));
        #[cfg(feature = "cudnn")]
        let cudnn = self
            .cudnn
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.allocs))
            .unwrap_or(0);
        #[cfg(not(feature = "cudnn"))]
        let cudnn = 0;
        AllocStats {
            device_allocs: self.allocs.load(std::sync::atomic::Ordering::Relaxed) + cudnn,
            pool_hits: hits,
            pool_bytes: bytes,
            pool_peak_bytes: peak,
        }
    }

    pub(crate) fn count_alloc(&self) {
        self.allocs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_the_request_with_under_25_percent_waste() {
        for b in [
            1usize,
            511,
            512,
            513,
            4096,
            4097,
            5000,
            65536,
            65537,
            1 << 30,
            123_456_789,
        ] {
            let c = size_class(b);
            assert!(c >= b, "{b} → {c}");
            if b > 4096 {
                assert!((c - b) as f64 <= 0.25 * b as f64, "{b} → {c}");
            }
            assert_eq!(size_class(c), c, "classes are fixed points");
        }
        assert_eq!(size_class(4097), 5120);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 18));
    }

    #[test]
    fn a_warm_pool_serves_repeated_and_slightly_smaller_requests_without_new_blocks() {
        let mut pool = SizePool::<u32>::default();
        let mut made = 0u32;
        // Warm-up step: three buffers, all misses.
        let mut step = |pool: &mut SizePool<u32>, sizes: &[usize]| {
            let mut lent = Vec::new();
            for &s in sizes {
                let (class, b) = pool.take(s);
                let b = b.unwrap_or_else(|| {
                    made += 1;
                    made
                });
                lent.push((class, b));
            }
            for (c, b) in lent {
                pool.give(c, b);
            }
        };
        step(&mut pool, &[1 << 20, 3000, 7 << 20]);
        assert_eq!((pool.misses, pool.hits), (3, 0));
        // Later steps with the same or slightly smaller sizes: no new block.
        step(&mut pool, &[1 << 20, 3000, 7 << 20]);
        step(&mut pool, &[(1 << 20) - 100, 2900, 6 << 20]);
        assert_eq!((pool.misses, pool.hits), (3, 6));
        assert_eq!(pool.bytes_cached, pool.bytes_made);
        assert_eq!(pool.cached().count(), 3, "every block back in the pool");
        // A request more than twice smaller than every cached block does not take one.
        let (_, b) = pool.take(1000);
        assert!(b.is_none());
        assert_eq!(pool.misses, 4);
        let freed = pool.release();
        assert_eq!(pool.bytes_cached, 0);
        assert!(freed > 0);
    }

    #[test]
    fn the_high_water_mark_keeps_the_most_bytes_held_at_once() {
        let mut pool = SizePool::<u32>::default();
        let (a, _) = pool.take(1 << 20);
        let (b, _) = pool.take(3 << 20);
        assert_eq!(pool.peak_bytes, a + b);
        pool.give(a, 0);
        pool.give(b, 1);
        // Served from the cache: no new bytes, the mark stays.
        let (c, blk) = pool.take(3 << 20);
        assert!(blk.is_some());
        assert_eq!(pool.peak_bytes, a + b);
        pool.give(c, 1);
        // Released and reset: the mark restarts at what is held (nothing), then follows new blocks.
        pool.release();
        assert_eq!(pool.bytes_made, 0);
        assert_eq!(pool.peak_bytes, a + b, "release alone keeps the mark");
        pool.reset_peak();
        assert_eq!(pool.peak_bytes, 0);
        let (d, _) = pool.take(5000);
        assert_eq!(pool.peak_bytes, d);
    }
}
