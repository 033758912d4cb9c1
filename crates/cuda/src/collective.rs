//! Collectives of in-process device ranks ([`DeviceComm`]) on device buffers, built from its
//! point-to-point transfers: the sum all-reduce a sequence-parallel `GpuQwen2` needs for its
//! gradients (the call `NcclComm::all_reduce_sum_dev` makes across GPUs), and the in-place
//! reduce-scatter and all-gather of a sharded optimizer (`OptShard`; NCCL's in-place forms).
//!
//! Ring (Patarasuk & Yuan): the buffer is cut into P contiguous chunks (chunk c holds elements
//! `[c·n/P, (c+1)·n/P)`). A reduce-scatter is P − 1 steps in which rank r sends chunk
//! r + k − s to r + 1 and receives chunk r + k − s − 1 from r − 1, adding it into its copy in
//! f32; afterwards rank r holds the full sum of chunk r + k + 1. An all-gather is P − 1 steps
//! passing finished chunks around the same ring (rank r starts with chunk r + k). The all-reduce
//! is a reduce-scatter at k = 0 and an all-gather at k = 1; the standalone reduce-scatter runs
//! at k = −1 and the all-gather at k = 0, so rank r owns chunk r, as NCCL's in-place
//! ncclReduceScatter/ncclAllGather do. Each chunk's sum is formed once, on one rank, and copied
//! to the others, so every rank ends with bit-identical values. Bytes sent per rank: (P − 1)/P ·
//! 4n a phase.

use crate::buffer::{DView, DViewMut, DevRead};
use crate::devcomm::{DevPart, DeviceComm, DeviceGroup};
use crate::{DeviceBuf, Gpu, Result};

/// The two kinds of ring phase.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// The received chunk is added into this rank's copy.
    ReduceScatter,
    /// The received chunk overwrites this rank's copy.
    AllGather,
}

/// Tag of step `s` of a collective's `i`-th phase.
fn tag(i: u64, s: usize) -> u64 {
    (i << 32) | s as u64
}

/// Elements of chunk `c` of an `n`-element buffer cut into `p` chunks.
fn span(n: usize, p: usize, c: usize) -> std::ops::Range<usize> {
    c * n / p..(c + 1) * n / p
}

/// Rank `r`'s (chunk sent to r + 1, chunk received from r − 1) at step `s` of a phase at ring
/// offset `k` (module docs; `k` in 0..p, p − 1 standing for −1).
fn ring_step(p: usize, r: usize, k: usize, s: usize) -> (usize, usize) {
    ((r + k + p - s) % p, (r + k + 2 * p - s - 1) % p)
}

impl DeviceComm {
    /// Sums `buf` over every rank of the world, in place (module docs); every rank calls it, each
    /// with its `Gpu`, in the same order as its other calls. Enqueued on `gpu`'s stream; a
    /// failure aborts the world.
    pub fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()> {
        self.ring(
            gpu,
            &mut DViewMut::all(buf),
            &[(Phase::ReduceScatter, 0), (Phase::AllGather, 1)],
            "all-reduce",
        )
    }

    /// Sums `buf` over every rank and leaves rank r the sum of its chunk r (of P equal chunks;
    /// the length a multiple of P), in place; the other chunks hold partial sums.
    pub fn reduce_scatter_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        self.check_chunks(buf.dlen(), "reduce-scatter")?;
        let p = self.world_size();
        self.ring(gpu, buf, &[(Phase::ReduceScatter, p - 1)], "reduce-scatter")
    }

    /// Gives every rank every rank's chunk r of `buf` (of P equal chunks), in place.
    pub fn all_gather_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        self.check_chunks(buf.dlen(), "all-gather")?;
        self.ring(gpu, buf, &[(Phase::AllGather, 0)], "all-gather")
    }

    /// Sums `buf` over every rank onto `root`, in place: each other rank sends its buffer to the
    /// root, which adds them in rank order (so the sum is the same whatever order they arrive
    /// in); the others' buffers are left as they were.
    pub fn reduce_sum_dev(
        &self,
        gpu: &Gpu,
        buf: &mut DViewMut<'_, f32>,
        root: usize,
    ) -> Result<()> {
        let p = self.world_size();
        if root >= p {
            return Err(crate::GpuError::Comm(format!(
                "reduce onto rank {root} of a group of {p}"
            )));
        }
        let n = buf.dlen();
        if p == 1 || n == 0 {
            return Ok(());
        }
        self.next_epoch();
        let r = self.rank();
        let result = (|| -> Result<()> {
            if r != root {
                let t = self.send(
                    gpu,
                    root,
                    tag(0, r),
                    &[DevPart::of(&DView::of(&*buf, 0..n)?)],
                )?;
                return self.wait(gpu, t);
            }
            let tmp = gpu.scratch::<f32>(n)?;
            for q in (0..p).filter(|&q| q != root) {
                let t = self.recv(gpu, q, tag(0, q), &[DevPart::of(&DView::of(&tmp, 0..n)?)])?;
                self.wait(gpu, t)?;
                gpu.accum_f32(&mut DViewMut::of(&mut *buf, 0..n)?, &DView::of(&tmp, 0..n)?)?;
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.abort(&format!("reduce: {e}"));
        }
        result
    }

    fn check_chunks(&self, n: usize, what: &str) -> Result<()> {
        let p = self.world_size();
        if !n.is_multiple_of(p) {
            return Err(crate::GpuError::Comm(format!(
                "{what} of {n} values over {p} ranks: the length must be a multiple of the world"
            )));
        }
        Ok(())
    }

    /// Runs the ring `phases` over `buf` (module docs); a failure aborts the world.
    fn ring(
        &self,
        gpu: &Gpu,
        buf: &mut DViewMut<'_, f32>,
        phases: &[(Phase, usize)],
        what: &str,
    ) -> Result<()> {
        let p = self.world_size();
        if p == 1 {
            return Ok(());
        }
        self.next_epoch();
        let r = self.rank();
        let n = buf.dlen();
        let span = |c: usize| span(n, p, c);
        let tmp = gpu.scratch::<f32>(n.div_ceil(p))?;
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        let result = (|| -> Result<()> {
            for (i, &(phase, k)) in phases.iter().enumerate() {
                for s in 0..p - 1 {
                    let (out, inc) = ring_step(p, r, k, s);
                    let (out, inc) = (span(out), span(inc));
                    let len = inc.len();
                    let t = tag(i as u64, s);
                    let ts = self.send(gpu, next, t, &[DevPart::of(&DView::of(&*buf, out)?)])?;
                    let land = match phase {
                        Phase::ReduceScatter => DevPart::of(&DView::of(&tmp, 0..len)?),
                        Phase::AllGather => DevPart::of(&DView::of(&*buf, inc.clone())?),
                    };
                    let tr = self.recv(gpu, prev, t, &[land])?;
                    self.wait(gpu, ts)?;
                    self.wait(gpu, tr)?;
                    if phase == Phase::ReduceScatter {
                        gpu.accum_f32(
                            &mut DViewMut::of(&mut *buf, inc)?,
                            &DView::of(&tmp, 0..len)?,
                        )?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.abort(&format!("{what}: {e}"));
        }
        result
    }
}

impl DeviceGroup for DeviceComm {
    fn all_reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DeviceBuf<f32>) -> Result<()> {
        DeviceComm::all_reduce_sum_dev(self, gpu, buf)
    }

    fn reduce_scatter_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        DeviceComm::reduce_scatter_sum_dev(self, gpu, buf)
    }

    fn all_gather_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>) -> Result<()> {
        DeviceComm::all_gather_dev(self, gpu, buf)
    }

    fn reduce_sum_dev(&self, gpu: &Gpu, buf: &mut DViewMut<'_, f32>, root: usize) -> Result<()> {
        DeviceComm::reduce_sum_dev(self, gpu, buf, root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One ring phase at offset `k` on host vectors, step by step as the device ranks run it:
    /// every rank posts, then every receive lands (the sent chunks are read before any receive
    /// of the step writes).
    fn simulate(bufs: &mut [Vec<f32>], n: usize, phase: Phase, k: usize) {
        let p = bufs.len();
        for s in 0..p.saturating_sub(1) {
            let sent: Vec<(usize, Vec<f32>)> = (0..p)
                .map(|r| {
                    let (out, _) = ring_step(p, r, k, s);
                    (out, bufs[r][span(n, p, out)].to_vec())
                })
                .collect();
            for r in 0..p {
                let (_, inc) = ring_step(p, r, k, s);
                let (chunk, data) = &sent[(r + p - 1) % p];
                assert_eq!(*chunk, inc, "P {p} rank {r} {phase:?} step {s}");
                let dst = &mut bufs[r][span(n, p, inc)];
                for (d, x) in dst.iter_mut().zip(data) {
                    *d = if phase == Phase::ReduceScatter {
                        *d + x
                    } else {
                        *x
                    };
                }
            }
        }
    }

    fn start(p: usize, n: usize) -> (Vec<Vec<f32>>, Vec<f32>) {
        let bufs: Vec<Vec<f32>> = (0..p)
            .map(|r| (0..n).map(|i| (i * 10 + r) as f32).collect())
            .collect();
        let want: Vec<f32> = (0..n)
            .map(|i| (0..p).map(|r| (i * 10 + r) as f32).sum())
            .collect();
        (bufs, want)
    }

    /// The all-reduce's plan: every rank ends with the exact sum (integers in f32), each
    /// chunk's sum formed once.
    #[test]
    fn the_ring_plan_sums_every_chunk_onto_every_rank() {
        for p in 1..=6usize {
            for n in [0usize, 1, 5, 6, 17, 100] {
                let (mut bufs, want) = start(p, n);
                simulate(&mut bufs, n, Phase::ReduceScatter, 0);
                simulate(&mut bufs, n, Phase::AllGather, 1);
                for (r, b) in bufs.iter().enumerate() {
                    assert_eq!(b, &want, "P {p} n {n} rank {r}");
                }
                // The chunks tile the buffer.
                let total: usize = (0..p).map(|c| span(n, p, c).len()).sum();
                assert_eq!(total, n);
            }
        }
    }

    /// The standalone reduce-scatter leaves rank r the sum of chunk r (NCCL's in-place
    /// convention), and the all-gather from chunk r gives every rank the whole buffer.
    #[test]
    fn the_standalone_phases_leave_rank_r_chunk_r() {
        for p in 1..=6usize {
            for n in [0usize, p, 3 * p, 17 * p] {
                let (mut bufs, want) = start(p, n);
                simulate(&mut bufs, n, Phase::ReduceScatter, p - 1);
                for (r, b) in bufs.iter().enumerate() {
                    let c = span(n, p, r);
                    assert_eq!(b[c.clone()], want[c], "P {p} n {n} rank {r}");
                }
                // Scribble on the chunks a rank does not own: the all-gather overwrites them.
                for (r, b) in bufs.iter_mut().enumerate() {
                    for c in (0..p).filter(|&c| c != r) {
                        b[span(n, p, c)].fill(f32::NAN);
                    }
                }
                simulate(&mut bufs, n, Phase::AllGather, 0);
                for (r, b) in bufs.iter().enumerate() {
                    assert_eq!(b, &want, "P {p} n {n} rank {r} after the all-gather");
                }
            }
        }
    }
}
