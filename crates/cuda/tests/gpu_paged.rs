//! Paged decode attention on the GPU (`Gpu::paged_attention_forward`) against reel-rollout's CPU
//! `paged_attention_forward`: f32 and bf16 caches, block sizes 1/3/5/7/16/32, lengths that are not
//! a multiple of the block, decode rows and multi-token chunks (causal within them) in one call,
//! GQA ratios 1/2/3/4/7/16 and MQA (a block serves a whole group of up to 8 heads), D 64 and 128
//! (and 32/256), one split and forced splits (the f32 merge). Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --release --test gpu_paged -- --nocapture
//!
//! Block tables are shuffled so sequences interleave in the pool; outputs are poisoned with NaN
//! first; the CPU reference runs in f32 on the same (widened) values.

mod common;
use common::*;

use reel_cuda::{Gpu, GpuError, GpuFloat, GpuPagedBatch};
use reel_rollout::paged_attention::{paged_attention_forward, PagedSeq, PagedShape};
use reel_tensor::{bf16, rng, Rng, Tolerance};

struct Case {
    h: usize,
    h_kv: usize,
    d: usize,
    bs: usize,
    /// (past, new) per sequence.
    seqs: Vec<(usize, usize)>,
    split_keys: Option<usize>,
}

fn shuffled(r: &mut Rng, n: usize) -> Vec<u32> {
    use rand::Rng as _;
    let mut ids: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        ids.swap(i, r.random_range(0..=i));
    }
    ids
}

fn run<T: GpuFloat>(g: &Gpu, c: &Case, seed: u64) {
    let mut r = rng(seed);
    let kvw = c.h_kv * c.d;
    let blocks: Vec<usize> = c
        .seqs
        .iter()
        .map(|&(p, n)| (p + n).div_ceil(c.bs))
        .collect();
    let num_blocks = blocks.iter().sum::<usize>() + 2;
    let ids = shuffled(&mut r, num_blocks);
    let k_cache: Vec<T> = rand_t(&mut r, num_blocks * c.bs * kvw, 1.0);
    let v_cache: Vec<T> = rand_t(&mut r, num_blocks * c.bs * kvw, 1.0);
    let n: usize = c.seqs.iter().map(|s| s.1).sum();
    let q: Vec<T> = rand_t(&mut r, n * c.h * c.d, 1.0);
    let mut tables = Vec::new();
    let mut next = 0;
    for &nb in &blocks {
        tables.push(ids[next..next + nb].to_vec());
        next += nb;
    }
    let mut at = 0;
    let seqs: Vec<PagedSeq> = c
        .seqs
        .iter()
        .zip(&tables)
        .map(|(&(past, new), t)| {
            let s = PagedSeq {
                block_table: t,
                past,
                rows: at..at + new,
            };
            at += new;
            s
        })
        .collect();
    let shape = PagedShape {
        h: c.h,
        h_kv: c.h_kv,
        d: c.d,
        block_size: c.bs,
    };
    let mut out_ref = vec![0.0f32; n * c.h * c.d];
    let mut lse_ref = vec![0.0f32; n * c.h];
    paged_attention_forward(
        &mut out_ref,
        &mut lse_ref,
        &widen(&q),
        &widen(&k_cache),
        &widen(&v_cache),
        &seqs,
        shape,
    );
    let batch = GpuPagedBatch::new(g, &seqs, c.bs).unwrap();
    let (qd, kd, vd) = (
        g.upload(&q).unwrap(),
        g.upload(&k_cache).unwrap(),
        g.upload(&v_cache).unwrap(),
    );
    let mut out = g.upload(&poison::<T>(n * c.h * c.d)).unwrap();
    let mut lse = g.upload(&poison::<f32>(n * c.h)).unwrap();
    g.paged_attention_forward(
        &mut out,
        &mut lse,
        &qd,
        &kd,
        &vd,
        &batch,
        shape,
        c.split_keys,
    )
    .unwrap();
    let out = widen(&g.download(&out).unwrap());
    let lse = g.download(&lse).unwrap();
    let what = format!(
        "{} h{}/{} d{} bs{} seqs {:?} split {:?}",
        name::<T>(),
        c.h,
        c.h_kv,
        c.d,
        c.bs,
        c.seqs,
        c.split_keys
    );
    // f32: summation order differs (splits, lanes); bf16: out rounded to bf16.
    let (tol, rel) = if T::INDEX == 0 {
        (Tolerance::new(2e-5, 2e-5), 1e-5)
    } else {
        (Tolerance::new(1e-2, 1e-2), 6e-3)
    };
    compare(&format!("{what} out"), &out, &out_ref, tol, rel);
    compare(
        &format!("{what} lse"),
        &lse,
        &lse_ref,
        Tolerance::new(2e-5, 2e-5),
        1e-5,
    );
}

fn cases() -> Vec<Case> {
    let mixed = vec![(0, 7), (13, 1), (4, 5), (1, 1), (300, 3), (0, 1), (1000, 1)];
    vec![
        // One call mixing fresh prompts, decode rows and chunks after a prefix.
        Case {
            h: 8,
            h_kv: 2,
            d: 128,
            bs: 16,
            seqs: mixed.clone(),
            split_keys: None,
        },
        Case {
            h: 7,
            h_kv: 1,
            d: 64,
            bs: 5,
            seqs: mixed.clone(),
            split_keys: Some(64),
        },
        Case {
            h: 4,
            h_kv: 4,
            d: 64,
            bs: 1,
            seqs: vec![(37, 2), (0, 3), (9, 1)],
            split_keys: Some(7),
        },
        Case {
            h: 12,
            h_kv: 3,
            d: 32,
            bs: 32,
            seqs: vec![(63, 1), (64, 1), (65, 2)],
            split_keys: None,
        },
        Case {
            h: 4,
            h_kv: 2,
            d: 256,
            bs: 16,
            seqs: vec![(517, 1), (2, 4)],
            split_keys: Some(100),
        },
        // Long contexts: the default choice splits them (few rows, many keys).
        Case {
            h: 32,
            h_kv: 8,
            d: 128,
            bs: 16,
            seqs: vec![(8190, 1), (5001, 1), (3333, 2)],
            split_keys: None,
        },
        // GQA groups of 16 (served 8 heads a block) and 3 (a block of 3 in 4 registers' room).
        Case {
            h: 16,
            h_kv: 1,
            d: 64,
            bs: 16,
            seqs: vec![(700, 1), (31, 2), (0, 5)],
            split_keys: None,
        },
        Case {
            h: 6,
            h_kv: 2,
            d: 128,
            bs: 3,
            seqs: vec![(95, 1), (10, 3)],
            split_keys: Some(40),
        },
        // Forced splits far shorter than some sequences: splits with no keys for them.
        Case {
            h: 8,
            h_kv: 8,
            d: 128,
            bs: 7,
            seqs: vec![(2, 1), (400, 1)],
            split_keys: Some(33),
        },
    ]
}

#[test]
fn paged_attention_matches_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let mut all: Vec<(String, Box<dyn FnOnce() + '_>)> = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        let c = std::rc::Rc::new(c);
        let c2 = c.clone();
        let g1: &Gpu = &g;
        all.push((
            format!("f32 case {i}"),
            Box::new(move || run::<f32>(g1, &c, 100 + i as u64)),
        ));
        all.push((
            format!("bf16 case {i}"),
            Box::new(move || run::<bf16>(g1, &c2, 200 + i as u64)),
        ));
    }
    run_all("paged attention", all);
}

#[test]
fn bad_paged_inputs_are_refused_by_name() {
    let Some(g) = gpu() else { return };
    let table = [0u32, 1];
    let seqs = [PagedSeq {
        block_table: &table,
        past: 40,
        rows: 0..1,
    }];
    // 41 keys in blocks of 16 need 3 blocks; the table has 2.
    let e = GpuPagedBatch::new(&g, &seqs, 16)
        .err()
        .expect("short table");
    assert!(e.to_string().contains("41 keys"), "{e}");
    let seqs = [PagedSeq {
        block_table: &table,
        past: 20,
        rows: 0..1,
    }];
    let batch = GpuPagedBatch::new(&g, &seqs, 16).unwrap();
    let shape = PagedShape {
        h: 2,
        h_kv: 1,
        d: 64,
        block_size: 16,
    };
    let q = g.alloc_zeros::<f32>(2 * 64).unwrap();
    let one_block = g.alloc_zeros::<f32>(16 * 64).unwrap();
    let mut out = g.alloc_zeros::<f32>(2 * 64).unwrap();
    let mut lse = g.alloc_zeros::<f32>(2).unwrap();
    // The table names block 1; the cache holds one block.
    let e = g
        .paged_attention_forward(
            &mut out, &mut lse, &q, &one_block, &one_block, &batch, shape, None,
        )
        .unwrap_err();
    assert!(
        matches!(&e, GpuError::Shape(m) if m.contains("block 1")),
        "{e}"
    );
    let bad_d = PagedShape { d: 48, ..shape };
    let e = g
        .paged_attention_forward(
            &mut out, &mut lse, &q, &one_block, &one_block, &batch, bad_d, None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("D = 48"), "{e}");
}
