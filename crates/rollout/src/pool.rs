//! Paged KV cache: a pool of fixed-size blocks of keys and values, reference-counted so that
//! sequences forked from one prompt share its blocks (vLLM's PagedAttention, Kwon et al. 2023).
//!
//! Storage, per layer l: K and V [num_blocks, block_size, H_kv, D] (f32). A block id names the
//! same slot in every layer, so one block holds block_size tokens of every layer. A sequence's
//! [`BlockTable`] lists its blocks in token order: token p lives in block `blocks[p / bs]`, slot
//! `p % bs`. Blocks a table shares with others are never written: [`BlockPool::reserve`] copies a
//! shared, partially filled last block before the first append (copy on write); full shared
//! blocks stay shared, since appends only write past a table's length.
//!
//! A pool made by [`BlockPool::new_device`] keeps only the tables, reference counts and free list:
//! the block data lives elsewhere (a GPU decoder's device memory, the same layout), so its copies
//! on write are queued as [`BlockCopy`]s for the owner of the data to carry out before the next
//! step writes ([`BlockPool::take_copies`]).

use crate::RolloutError;

/// Block-pool sizes. Every field is required (no defaults here; see `EngineConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers L.
    pub layers: usize,
    /// Key/value heads H_kv.
    pub h_kv: usize,
    /// Head dimension D.
    pub d: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

impl KvLayout {
    /// Bytes of keys and values one block holds (all layers).
    pub fn block_bytes(&self) -> usize {
        2 * 4 * self.block_size * self.layers * self.h_kv * self.d
    }
}

/// The blocks of one sequence, in token order, and how many tokens they hold. Only the pool
/// creates, grows, forks and frees tables; give every table back with [`BlockPool::release`].
#[derive(Debug)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
}

impl BlockTable {
    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held (stored tokens and reserved room).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block ids in token order (for attention kernels).
    pub fn block_ids(&self) -> &[u32] {
        &self.blocks
    }
}

/// A copy on write of a pool whose block data lives elsewhere: the first `tokens` slots of block
/// `src` go to block `dst`, in every layer, keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u32,
    pub dst: u32,
    pub tokens: usize,
}

/// Fixed-size KV blocks with reference counts and a free list.
pub struct BlockPool {
    layout: KvLayout,
    /// Per layer, [num_blocks, block_size, H_kv, D]; empty for a device pool.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Whether the block data lives elsewhere ([`BlockPool::new_device`]).
    device: bool,
    /// Copies on write not yet carried out (device pools only).
    pending: Vec<BlockCopy>,
    refs: Vec<u32>,
    free: Vec<u32>,
    cow_copies: u64,
}

impl BlockPool {
    /// Allocates the whole pool up front (f32 block data on the host).
    pub fn new(layout: KvLayout) -> Result<Self, RolloutError> {
        let mut pool = Self::new_device(layout)?;
        let per_layer = layout.num_blocks * layout.block_size * layout.h_kv * layout.d;
        pool.k = (0..layout.layers).map(|_| vec![0.0; per_layer]).collect();
        pool.v = (0..layout.layers).map(|_| vec![0.0; per_layer]).collect();
        pool.device = false;
        Ok(pool)
    }

    /// A pool of tables only: the block data, in the same layout, is kept by someone else (a GPU
    /// decoder), who carries out the queued copies on write ([`BlockPool::take_copies`]) and the
    /// writes. [`BlockPool::write`], [`BlockPool::layer`] and [`BlockPool::gather`] refuse it.
    pub fn new_device(layout: KvLayout) -> Result<Self, RolloutError> {
        let KvLayout {
            layers,
            h_kv,
            d,
            block_size,
            num_blocks,
        } = layout;
        if layers == 0 || h_kv == 0 || d == 0 || block_size == 0 || num_blocks == 0 {
            return Err(RolloutError::Config(format!(
                "every KV pool size must be positive: {layout:?}"
            )));
        }
        if num_blocks > u32::MAX as usize {
            return Err(RolloutError::Config(format!(
                "num_blocks {num_blocks} exceeds {}",
                u32::MAX
            )));
        }
        num_blocks
            .checked_mul(block_size * h_kv * d * layers)
            .ok_or_else(|| RolloutError::Config(format!("KV pool too large: {layout:?}")))?;
        Ok(BlockPool {
            layout,
            k: Vec::new(),
            v: Vec::new(),
            device: true,
            pending: Vec::new(),
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            cow_copies: 0,
        })
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn total_blocks(&self) -> usize {
        self.layout.num_blocks
    }

    /// Shared partial blocks copied so far.
    pub fn cow_copies(&self) -> u64 {
        self.cow_copies
    }

    /// Whether the block data lives elsewhere ([`BlockPool::new_device`]).
    pub fn is_device(&self) -> bool {
        self.device
    }

    /// The copies on write queued since the last call, in order (always none for a host pool,
    /// which copies at once). Carry them out before the next write into the pool's blocks.
    pub fn take_copies(&mut self) -> Vec<BlockCopy> {
        std::mem::take(&mut self.pending)
    }

    /// References held on a block (tests, diagnostics).
    pub fn ref_count(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// An empty table.
    pub fn new_table(&self) -> BlockTable {
        BlockTable {
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// Blocks needed to hold `n` tokens.
    pub fn blocks_for(&self, n: usize) -> usize {
        n.div_ceil(self.layout.block_size)
    }

    /// Blocks that [`BlockPool::reserve`] of `n_new` tokens would take from the free list.
    pub fn blocks_needed(&self, table: &BlockTable, n_new: usize) -> usize {
        let grow = self
            .blocks_for(table.len + n_new)
            .saturating_sub(table.blocks.len());
        grow + usize::from(n_new > 0 && self.needs_copy(table))
    }

    /// Whether the block the next token goes to is partially filled and shared.
    fn needs_copy(&self, table: &BlockTable) -> bool {
        let bs = self.layout.block_size;
        !table.len.is_multiple_of(bs) && self.refs[table.blocks[table.len / bs] as usize] > 1
    }

    fn alloc(&mut self) -> u32 {
        let b = self.free.pop().expect("alloc after a capacity check");
        debug_assert_eq!(self.refs[b as usize], 0);
        self.refs[b as usize] = 1;
        b
    }

    fn decref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than held");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    /// Makes room for `n_new` more tokens after the table's length: copies a shared partial last
    /// block (copy on write) and appends fresh blocks. All or nothing: when the pool has too few
    /// free blocks, nothing changes and the error says how many were needed. Idempotent for the
    /// same `n_new` until the length is advanced.
    pub fn reserve(&mut self, table: &mut BlockTable, n_new: usize) -> Result<(), RolloutError> {
        let needed = self.blocks_needed(table, n_new);
        if needed > self.free.len() {
            return Err(RolloutError::PoolExhausted {
                needed,
                free: self.free.len(),
                total: self.layout.num_blocks,
            });
        }
        if n_new > 0 && self.needs_copy(table) {
            let bs = self.layout.block_size;
            let i = table.len / bs;
            let old = table.blocks[i];
            let new = self.alloc();
            if self.device {
                self.pending.push(BlockCopy {
                    src: old,
                    dst: new,
                    tokens: table.len % bs,
                });
            } else {
                let w = self.layout.h_kv * self.layout.d;
                let used = (table.len % bs) * w;
                let (src, dst) = (old as usize * bs * w, new as usize * bs * w);
                for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
                    layer.copy_within(src..src + used, dst);
                }
            }
            self.decref(old);
            table.blocks[i] = new;
            self.cow_copies += 1;
        }
        while table.blocks.len() < self.blocks_for(table.len + n_new) {
            let b = self.alloc();
            table.blocks.push(b);
        }
        Ok(())
    }

    /// A new table sharing every block that holds `table`'s tokens (reference counts + 1);
    /// reserved room past its length is not shared.
    pub fn fork(&mut self, table: &BlockTable) -> BlockTable {
        let used = self.blocks_for(table.len);
        let blocks = table.blocks[..used].to_vec();
        for &b in &blocks {
            self.refs[b as usize] += 1;
        }
        BlockTable {
            blocks,
            len: table.len,
        }
    }

    /// Gives a table's blocks back (a block returns to the free list when no table holds it).
    pub fn release(&mut self, table: BlockTable) {
        for &b in &table.blocks {
            self.decref(b);
        }
    }

    /// Records that the `n` tokens after the table's length are now stored.
    pub fn advance(&self, table: &mut BlockTable, n: usize) {
        assert!(
            self.blocks_for(table.len + n) <= table.blocks.len(),
            "advance past the reserved room"
        );
        table.len += n;
    }

    /// Writes keys and values of layer `layer` for `n` tokens starting at token `start` of the
    /// table (k, v [n, H_kv, D]). The room must be reserved and the blocks owned by this table
    /// alone (guaranteed after [`BlockPool::reserve`] for positions ≥ its length).
    pub fn write(
        &mut self,
        table: &BlockTable,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), RolloutError> {
        if self.device {
            return Err(RolloutError::Invalid(
                "KV write into a device pool: its blocks live on the device".into(),
            ));
        }
        let (bs, w) = (self.layout.block_size, self.layout.h_kv * self.layout.d);
        let n = k.len() / w;
        if k.len() != v.len() || !k.len().is_multiple_of(w) {
            return Err(RolloutError::Invalid(format!(
                "KV write of {} keys and {} values is not rows of H_kv·D = {w}",
                k.len(),
                v.len()
            )));
        }
        if self.blocks_for(start + n) > table.blocks.len() {
            return Err(RolloutError::Invalid(format!(
                "KV write of tokens {start}..{} past the table's {} reserved blocks",
                start + n,
                table.blocks.len()
            )));
        }
        for i in 0..n {
            let p = start + i;
            let b = table.blocks[p / bs];
            debug_assert_eq!(self.refs[b as usize], 1, "write into a shared block");
            let at = (b as usize * bs + p % bs) * w;
            self.k[layer][at..at + w].copy_from_slice(&k[i * w..(i + 1) * w]);
            self.v[layer][at..at + w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
        Ok(())
    }

    /// Layer `layer`'s key and value storage, [num_blocks, block_size, H_kv, D] each (empty for a
    /// device pool, whose data lives elsewhere).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        if self.device {
            return (&[], &[]);
        }
        (&self.k[layer], &self.v[layer])
    }

    /// Keys and values of the table's first `n` tokens of layer `layer`, gathered contiguously
    /// ([n, H_kv, D] each; tests and diagnostics). Empty for a device pool.
    pub fn gather(&self, table: &BlockTable, layer: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        if self.device {
            return (Vec::new(), Vec::new());
        }
        let (bs, w) = (self.layout.block_size, self.layout.h_kv * self.layout.d);
        let mut k = Vec::with_capacity(n * w);
        let mut v = Vec::with_capacity(n * w);
        for p in 0..n {
            let at = (table.blocks[p / bs] as usize * bs + p % bs) * w;
            k.extend_from_slice(&self.k[layer][at..at + w]);
            v.extend_from_slice(&self.v[layer][at..at + w]);
        }
        (k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(block_size: usize, num_blocks: usize) -> BlockPool {
        BlockPool::new(KvLayout {
            layers: 2,
            h_kv: 1,
            d: 2,
            block_size,
            num_blocks,
        })
        .unwrap()
    }

    fn fill(pool: &mut BlockPool, t: &mut BlockTable, vals: &[f32]) {
        let n = vals.len();
        pool.reserve(t, n).unwrap();
        let kv: Vec<f32> = vals.iter().flat_map(|&x| [x, -x]).collect();
        for l in 0..2 {
            pool.write(t, l, t.len(), &kv, &kv).unwrap();
        }
        pool.advance(t, n);
    }

    #[test]
    fn fork_shares_blocks_and_copy_on_write_keeps_the_prefix() {
        let mut p = pool(3, 8);
        let mut prompt = p.new_table();
        fill(&mut p, &mut prompt, &[1.0, 2.0, 3.0, 4.0]); // blocks: full [1,2,3], partial [4]
        assert_eq!(p.free_blocks(), 6);
        let mut a = p.fork(&prompt);
        let mut b = p.fork(&prompt);
        assert_eq!(p.ref_count(prompt.block_ids()[0]), 3);
        assert_eq!(p.free_blocks(), 6, "forks take no blocks");
        p.release(prompt);
        // a appends: the shared partial block is copied, the full one stays shared.
        assert_eq!(p.blocks_needed(&a, 1), 1);
        fill(&mut p, &mut a, &[10.0]);
        assert_eq!(p.cow_copies(), 1);
        assert_eq!(a.block_ids()[0], b.block_ids()[0]);
        assert_ne!(a.block_ids()[1], b.block_ids()[1]);
        // b is now the only holder of the original partial block: it appends in place.
        assert_eq!(p.blocks_needed(&b, 1), 0);
        fill(&mut p, &mut b, &[20.0]);
        assert_eq!(p.cow_copies(), 1);
        for l in 0..2 {
            let (ka, _) = p.gather(&a, l, 5);
            let (kb, vb) = p.gather(&b, l, 5);
            assert_eq!(ka, [1., -1., 2., -2., 3., -3., 4., -4., 10., -10.]);
            assert_eq!(kb, [1., -1., 2., -2., 3., -3., 4., -4., 20., -20.]);
            assert_eq!(vb, kb);
        }
        p.release(a);
        p.release(b);
        assert_eq!(p.free_blocks(), 8, "every block returns");
    }

    #[test]
    fn a_device_pool_queues_its_copies_on_write_and_refuses_host_access() {
        let layout = KvLayout {
            layers: 2,
            h_kv: 1,
            d: 2,
            block_size: 3,
            num_blocks: 8,
        };
        let mut p = BlockPool::new_device(layout).unwrap();
        assert!(p.is_device() && !pool(3, 8).is_device());
        let mut prompt = p.new_table();
        p.reserve(&mut prompt, 4).unwrap();
        p.advance(&mut prompt, 4); // blocks: full, partial (1 token)
        let mut a = p.fork(&prompt);
        let mut b = p.fork(&prompt);
        p.release(prompt);
        assert!(p.take_copies().is_empty());
        p.reserve(&mut a, 1).unwrap();
        let copies = p.take_copies();
        assert_eq!(
            copies,
            vec![BlockCopy {
                src: b.block_ids()[1],
                dst: a.block_ids()[1],
                tokens: 1
            }]
        );
        assert!(p.take_copies().is_empty(), "taken once");
        // b alone holds the old partial block now: no copy.
        p.reserve(&mut b, 1).unwrap();
        assert!(p.take_copies().is_empty());
        assert_eq!(p.cow_copies(), 1);
        assert!(p.write(&a, 0, 4, &[1.0, 2.0], &[1.0, 2.0]).is_err());
        assert!(p.layer(0).0.is_empty() && p.gather(&a, 0, 4).0.is_empty());
        p.release(a);
        p.release(b);
        assert_eq!(p.free_blocks(), 8);
    }

    #[test]
    fn exhaustion_is_an_error_and_changes_nothing() {
        let mut p = pool(4, 3);
        let mut t = p.new_table();
        fill(&mut p, &mut t, &[1.0; 9]); // 3 blocks
        assert_eq!(p.free_blocks(), 0);
        let mut f = p.fork(&t);
        let before = (f.num_blocks(), f.len());
        let err = p.reserve(&mut f, 1).unwrap_err();
        assert!(
            matches!(
                err,
                RolloutError::PoolExhausted {
                    needed: 1,
                    free: 0,
                    total: 3
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("exhausted"), "{err}");
        assert_eq!((f.num_blocks(), f.len()), before);
        p.release(t);
        // f alone holds the partial third block now: 3 more tokens fit in place, a 4th does not.
        assert_eq!(p.blocks_needed(&f, 3), 0);
        assert_eq!(p.blocks_needed(&f, 4), 1);
        p.reserve(&mut f, 3).unwrap();
        assert!(p.reserve(&mut f, 4).is_err());
        p.release(f);
        assert_eq!(p.free_blocks(), 3);
        assert!(BlockPool::new(KvLayout {
            layers: 1,
            h_kv: 1,
            d: 1,
            block_size: 0,
            num_blocks: 1
        })
        .is_err());
    }
}
