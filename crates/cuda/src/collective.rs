//! Collectives of in-process device ranks ([`DeviceComm`]) on device buffers, built from its
//! point-to-point transfers: the sum all-reduce a sequence-parallel `GpuQwen2` needs for its
//! gradients (the call `NcclComm::all_reduce_sum_dev` makes across GPUs).
//!
//! Ring all-reduce (Patarasuk & Yuan): the buffer is cut into P contiguous chunks (chunk c holds
//! elements `[c·n/P, (c+1)·n/P)`); P − 1 reduce-scatter steps (rank r sends chunk r − s to
//! r + 1, receives chunk r − s − 1 from r − 1 into scratch and adds it into its copy, in f32),
//! after which rank r holds the full sum of chunk r + 1; then P − 1 all-gather steps pass the
//! finished chunks around the ring. Each chunk's sum is formed once, on one rank, and copied to
//! the others, so every rank ends with bit-identical values. Bytes sent per rank:
//! 2·(P − 1)/P · 4n.

use crate::buffer::DView;
use crate::devcomm::{DevPart, DeviceComm, DeviceGroup};
use crate::{DeviceBuf, Gpu, Result};

/// Tag of step `s` of phase `phase` (0 reduce-scatter, 1 all-gather).
fn tag(phase: u64, s: usize) -> u64 {
    (phase << 32) | s as u64
}

/// Elements of chunk `c` of an `n`-element buffer cut into `p` chunks.
fn span(n: usize, p: usize, c: usize) -> std::ops::Range<usize> {
    c * n / p..(c + 1) * n / p
}

/// Rank `r`'s (chunk sent to r + 1, chunk received from r − 1) at step `s` of `phase` (0: the
/// received chunk is added into this rank's copy; 1: it overwrites it).
fn ring_step(p: usize, r: usize, phase: u64, s: usize) -> (usize, usize) {
    let shift = if phase == 0 { 0 } else { 1 };
    ((r + shift + p - s) % p, (r + shift + 2 * p - s - 1) % p)
}

impl DeviceComm {
    /// Sums `buf` over every rank of the world, in place (module docs); every rank calls it, each
    /// with its `Gpu`, in the same order as its other calls. Enqueued on `gpu`'s stream; a
    /// failure aborts the world.
    pub fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()> {
        let p = self.world_size();
        if p == 1 {
            return Ok(());
        }
        self.next_epoch();
        let r = self.rank();
        let n = buf.len();
        let span = |c: usize| span(n, p, c);
        let tmp = gpu.scratch::<f32>(n.div_ceil(p))?;
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        let result = (|| -> Result<()> {
            for s in 0..p - 1 {
                let (out, inc) = ring_step(p, r, 0, s);
                let (out, inc) = (span(out), span(inc));
                let len = inc.len();
                let ts = self.send(gpu, next, tag(0, s), &[DevPart::of(&buf.view(out)?)])?;
                let tr = self.recv(
                    gpu,
                    prev,
                    tag(0, s),
                    &[DevPart::of(&DView::of(&tmp, 0..len)?)],
                )?;
                self.wait(gpu, ts)?;
                self.wait(gpu, tr)?;
                gpu.accum_f32(&mut buf.view_mut(inc)?, &DView::of(&tmp, 0..len)?)?;
            }
            for s in 0..p - 1 {
                let (out, inc) = ring_step(p, r, 1, s);
                let (out, inc) = (span(out), span(inc));
                let ts = self.send(gpu, next, tag(1, s), &[DevPart::of(&buf.view(out)?)])?;
                let tr = self.recv(gpu, prev, tag(1, s), &[DevPart::of(&buf.view(inc)?)])?;
                self.wait(gpu, ts)?;
                self.wait(gpu, tr)?;
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.abort(&format!("all-reduce: {e}"));
        }
        result
    }
}

impl DeviceGroup for DeviceComm {
    fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()> {
        DeviceComm::all_reduce_sum_dev(self, gpu, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring's plan on host vectors, step by step as the device ranks run it: every rank
    /// ends with the exact sum (integers in f32), each chunk's sum formed once.
    #[test]
    fn the_ring_plan_sums_every_chunk_onto_every_rank() {
        for p in 1..=6usize {
            for n in [0usize, 1, 5, 6, 17, 100] {
                let mut bufs: Vec<Vec<f32>> = (0..p)
                    .map(|r| (0..n).map(|i| (i * 10 + r) as f32).collect())
                    .collect();
                let want: Vec<f32> = (0..n)
                    .map(|i| (0..p).map(|r| (i * 10 + r) as f32).sum())
                    .collect();
                for phase in [0u64, 1] {
                    for s in 0..p.saturating_sub(1) {
                        // Every rank posts, then every receive lands (the sent chunks are read
                        // before any receive of the step writes).
                        let sent: Vec<(usize, Vec<f32>)> = (0..p)
                            .map(|r| {
                                let (out, _) = ring_step(p, r, phase, s);
                                (out, bufs[r][span(n, p, out)].to_vec())
                            })
                            .collect();
                        for r in 0..p {
                            let (_, inc) = ring_step(p, r, phase, s);
                            let (chunk, data) = &sent[(r + p - 1) % p];
                            assert_eq!(*chunk, inc, "P {p} rank {r} phase {phase} step {s}");
                            let dst = &mut bufs[r][span(n, p, inc)];
                            for (d, x) in dst.iter_mut().zip(data) {
                                *d = if phase == 0 { *d + x } else { *x };
                            }
                        }
                    }
                }
                for (r, b) in bufs.iter().enumerate() {
                    assert_eq!(b, &want, "P {p} n {n} rank {r}");
                }
                // The chunks tile the buffer.
                let total: usize = (0..p).map(|c| span(n, p, c).len()).sum();
                assert_eq!(total, n);
            }
        }
    }
}
