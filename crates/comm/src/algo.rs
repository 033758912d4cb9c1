//! Collective algorithms over buffered point-to-point links, for host backends that have no
//! collectives of their own (the in-process backend; a TCP one later). `P` ranks, this rank `r`.
//!
//! - Reduce-scatter (ring, P−1 steps): at step s rank r sends its running partial of chunk
//!   `(r−s−1) mod P` to `r+1` and receives chunk `(r−s−2) mod P` from `r−1`, adding its own part;
//!   after the last step it holds the full sum of chunk r. The received buffer is reused as the next
//!   partial, so each step moves one chunk and allocates nothing after the first.
//! - All-gather (ring, P−1 steps): at step s rank r forwards chunk `(r−s) mod P` to `r+1` and
//!   receives chunk `(r−s−1) mod P` from `r−1`.
//! - All-reduce: reduce-scatter, then all-gather (chunks of `n` split as evenly as possible); each
//!   chunk is summed once, so every rank ends with bit-identical values.
//! - All-to-all and broadcast: direct (each chunk goes straight to its destination).
//! - Barrier: dissemination (round k: signal `r+2^k`, wait for `r−2^k`), ⌈log2 P⌉ rounds.
//!
//! Sends never block, so no ordering of sends and receives can deadlock.

use std::ops::Range;

use crate::CommError;

/// Buffered point-to-point links of one collective call; peers are group ranks.
pub(crate) trait Links {
    /// This rank's position in the group.
    fn rank(&self) -> usize;
    /// The group size.
    fn size(&self) -> usize;
    /// Sends `data` to `peer` without waiting for it to receive.
    fn send(&self, peer: usize, data: Vec<f32>) -> Result<(), CommError>;
    /// Blocks for the next message from `peer`, which must hold `len` values.
    fn recv(&self, peer: usize, len: usize) -> Result<Vec<f32>, CommError>;
}

/// Chunk `i` of `n` elements split into `p` chunks whose lengths differ by at most one (the first
/// `n mod p` chunks are one longer).
pub(crate) fn chunk_range(n: usize, p: usize, i: usize) -> Range<usize> {
    let base = n / p;
    let rem = n % p;
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

/// Ring reduce-scatter of `src` split by [`chunk_range`]: returns the sum over ranks of chunk r.
pub(crate) fn ring_reduce_scatter<L: Links>(l: &L, src: &[f32]) -> Result<Vec<f32>, CommError> {
    let (p, r) = (l.size(), l.rank());
    let n = src.len();
    if p == 1 {
        return Ok(src.to_vec());
    }
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    let mut partial = src[chunk_range(n, p, prev)].to_vec();
    for s in 0..p - 1 {
        l.send(next, partial)?;
        let c = (r + 2 * p - s - 2) % p;
        let range = chunk_range(n, p, c);
        let mut got = l.recv(prev, range.len())?;
        for (g, x) in got.iter_mut().zip(&src[range]) {
            *g += x;
        }
        partial = got;
    }
    Ok(partial)
}

/// Ring all-gather in place: `buf` split by [`chunk_range`] holds this rank's chunk r on entry and
/// every rank's chunk on return.
pub(crate) fn ring_all_gather<L: Links>(l: &L, buf: &mut [f32]) -> Result<(), CommError> {
    let (p, r) = (l.size(), l.rank());
    let n = buf.len();
    if p == 1 {
        return Ok(());
    }
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    let mut current = buf[chunk_range(n, p, r)].to_vec();
    for s in 0..p - 1 {
        l.send(next, current)?;
        let range = chunk_range(n, p, (r + p - s - 1) % p);
        let got = l.recv(prev, range.len())?;
        buf[range].copy_from_slice(&got);
        current = got;
    }
    Ok(())
}

/// Ring all-reduce (sum) in place.
pub(crate) fn all_reduce_sum<L: Links>(l: &L, buf: &mut [f32]) -> Result<(), CommError> {
    let (p, r) = (l.size(), l.rank());
    if p == 1 {
        return Ok(());
    }
    let mine = ring_reduce_scatter(l, buf)?;
    let n = buf.len();
    buf[chunk_range(n, p, r)].copy_from_slice(&mine);
    ring_all_gather(l, buf)
}

/// Direct all-to-all of equal chunks (`send.len() = recv.len() = P·m`, checked by the caller).
pub(crate) fn all_to_all<L: Links>(l: &L, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
    let (p, r) = (l.size(), l.rank());
    let m = send.len() / p;
    for j in 1..p {
        let peer = (r + j) % p;
        l.send(peer, send[peer * m..(peer + 1) * m].to_vec())?;
    }
    recv[r * m..(r + 1) * m].copy_from_slice(&send[r * m..(r + 1) * m]);
    for j in 1..p {
        let peer = (r + p - j) % p;
        let got = l.recv(peer, m)?;
        recv[peer * m..(peer + 1) * m].copy_from_slice(&got);
    }
    Ok(())
}

/// Direct broadcast from `root` (checked by the caller to be in range).
pub(crate) fn broadcast<L: Links>(l: &L, buf: &mut [f32], root: usize) -> Result<(), CommError> {
    let (p, r) = (l.size(), l.rank());
    if r == root {
        for peer in (0..p).filter(|&q| q != root) {
            l.send(peer, buf.to_vec())?;
        }
    } else {
        let got = l.recv(root, buf.len())?;
        buf.copy_from_slice(&got);
    }
    Ok(())
}

/// Dissemination barrier.
pub(crate) fn barrier<L: Links>(l: &L) -> Result<(), CommError> {
    let (p, r) = (l.size(), l.rank());
    let mut k = 1;
    while k < p {
        l.send((r + k) % p, Vec::new())?;
        l.recv((r + p - k) % p, 0)?;
        k *= 2;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::chunk_range;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for n in 0..20 {
            for p in 1..9 {
                let mut next = 0;
                for i in 0..p {
                    let c = chunk_range(n, p, i);
                    assert_eq!(c.start, next, "n={n} p={p} i={i}");
                    assert!(c.len() == n / p || c.len() == n / p + 1);
                    next = c.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
