//! The vision tower on the GPU against the CPU: exact GELU and segment attention against their
//! reel-kernels references, and `GpuVisionTower`'s merged features against
//! `reel_model::VisionTower::forward` (f32 and bf16 storage; odd grids, several videos and
//! frames, window and full-attention blocks, head sizes 16, 80 and 128, a 3B-shaped tower, the
//! chunked forward) and against transformers' features for the fixture model. Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --release --test gpu_vision -- --nocapture
//!
//! Outputs are poisoned with NaN before each op; inputs are random, never zeros; biases and norm
//! weights are random too (a dropped bias fails).

use std::path::Path;

use rand::Rng as _;

use reel_cuda::{Gpu, GpuFloat, GpuSegments, GpuVisionTower};
use reel_kernels::attention::{attention_forward, AttnMask, AttnShape};
use reel_kernels::gelu;
use reel_model::vision::VisionLayout;
use reel_model::{VideoGrid, VisionConfig, VisionTower, VisionWorkspace};
use reel_tensor::{bf16, rng, uniform_vec, Rng, Tolerance};

mod common;
use common::*;

// ---------------------------------------------------------------------------------------------

fn gelu_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, n: usize) {
    let x: Vec<T> = rand_t(r, n, 5.0);
    let mut want = poison::<T>(n);
    gelu::gelu_forward(&mut want, &x);
    let xg = g.upload(&x).unwrap();
    let mut out = g.upload(&poison::<T>(n)).unwrap();
    g.gelu_forward(&mut out, &xg).unwrap();
    let (t, rn) = tol::<T>(1.0);
    compare(
        &format!("gelu {} n={n}", name::<T>()),
        &widen(&g.download(&out).unwrap()),
        &widen(&want),
        t,
        rn,
    );
}

#[test]
fn gelu_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(71);
    for n in [1usize, 7, 1000, 100_003] {
        gelu_case::<f32>(&g, &mut r, n);
        gelu_case::<bf16>(&g, &mut r, n);
    }
}

// ---------------------------------------------------------------------------------------------

/// Segment attention of q, k, v [N, H, D] (segments `cu`) against the CPU kernel run on each
/// segment alone with a full mask (on the same storage-rounded inputs, in f32).
fn seg_case<T: GpuFloat>(g: &Gpu, r: &mut Rng, heads: usize, d: usize, cu: &[usize]) {
    let n = *cu.last().unwrap();
    let w = heads * d;
    let (q, k, v): (Vec<T>, Vec<T>, Vec<T>) = (
        rand_t(r, n * w, 2.0),
        rand_t(r, n * w, 2.0),
        rand_t(r, n * w, 1.0),
    );
    let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));
    let (mut out_c, mut lse_c) = (vec![f32::NAN; n * w], vec![f32::NAN; n * heads]);
    for s in cu.windows(2) {
        let (a, b) = (s[0], s[1]);
        attention_forward(
            &mut out_c[a * w..b * w],
            &mut lse_c[a * heads..b * heads],
            &qf[a * w..b * w],
            &kf[a * w..b * w],
            &vf[a * w..b * w],
            AttnShape {
                b: 1,
                tq: b - a,
                tk: b - a,
                h: heads,
                h_kv: heads,
                d,
            },
            AttnMask::Full,
        );
    }
    let segs = GpuSegments::new(g, cu).unwrap();
    let (qg, kg, vg) = (
        g.upload(&q).unwrap(),
        g.upload(&k).unwrap(),
        g.upload(&v).unwrap(),
    );
    let mut out = g.upload(&poison::<T>(n * w)).unwrap();
    let mut lse = g.upload(&vec![f32::NAN; n * heads]).unwrap();
    g.segment_attention_forward(&mut out, &mut lse, &qg, &kg, &vg, &segs, heads, d)
        .unwrap();
    let s = format!("{} H={heads} D={d} segments={}", name::<T>(), cu.len() - 1);
    let (t, rn) = tol::<T>(1.0);
    let got = widen(&g.download(&out).unwrap());
    compare(&format!("segment attention out {s}"), &got, &out_c, t, rn);
    // The outputs are small (averages of values in ±1): the norm bound, always.
    let rel = rel_norm_err(&got, &out_c);
    assert!(
        rel <= rn,
        "segment attention out {s}: relative norm {rel:.3e}"
    );
    compare(
        &format!("segment attention lse {s}"),
        &g.download(&lse).unwrap(),
        &lse_c,
        Tolerance::new(2e-5, 2e-5),
        1e-5,
    );
}

#[test]
fn segment_attention_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng(72);
    let cases: Vec<(usize, usize, Vec<usize>)> = vec![
        (1, 8, vec![0, 1]),
        (2, 16, vec![0, 1, 5, 37, 40]),
        (3, 80, vec![0, 64, 128, 150, 1174]),
        (16, 80, vec![0, 1024, 2048]),
        (1, 128, vec![0, 33, 97]),
        (5, 36, vec![0, 7, 8, 9, 300, 333]),
    ];
    let mut all: Vec<(String, Box<dyn FnOnce() + '_>)> = Vec::new();
    for (h, d, cu) in cases {
        let (g, mut r1, mut r2) = (&*g, rng(r.random()), rng(r.random()));
        let cu2 = cu.clone();
        all.push((
            format!("f32 H={h} D={d} {cu:?}"),
            Box::new(move || seg_case::<f32>(g, &mut r1, h, d, &cu)),
        ));
        all.push((
            format!("bf16 H={h} D={d} {cu2:?}"),
            Box::new(move || seg_case::<bf16>(g, &mut r2, h, d, &cu2)),
        ));
    }
    run_all("segment attention", all);
}

#[test]
fn segment_attention_refuses_bad_input() {
    let Some(g) = gpu() else { return };
    assert!(GpuSegments::new(&g, &[1, 4]).is_err());
    assert!(GpuSegments::new(&g, &[0, 4, 4]).is_err());
    let segs = GpuSegments::new(&g, &[0, 4]).unwrap();
    let x = g.upload(&[1.0f32; 4 * 200]).unwrap();
    let mut out = g.upload(&[0.0f32; 4 * 200]).unwrap();
    let mut lse = g.upload(&[0.0f32; 4]).unwrap();
    let e = g
        .segment_attention_forward(&mut out, &mut lse, &x, &x, &x, &segs, 1, 200)
        .unwrap_err();
    assert!(e.to_string().contains("head dimension 200"), "{e}");
    let e = g
        .segment_attention_forward(&mut out, &mut lse, &x, &x, &x, &segs, 2, 80)
        .unwrap_err();
    assert!(e.to_string().contains("segment_attention_forward"), "{e}");
}

// ---------------------------------------------------------------------------------------------

/// Random tower weights: matrices uniform with unit variance over the fan-in, biases ±0.1, norm
/// weights 1 ± 0.2.
fn random_params(c: &VisionConfig, r: &mut Rng) -> Vec<f32> {
    let layout = VisionLayout::new(c);
    let mut p = vec![0.0f32; layout.total()];
    for e in &layout.entries {
        let n = e.range.len();
        let vals = if e.shape.len() == 1 {
            let scale = if e.name.contains("norm") || e.name.contains("ln_q") {
                0.2
            } else {
                0.1
            };
            let mut v = uniform_vec(r, n, scale);
            if scale == 0.2 {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            v
        } else {
            let fan_in: usize = e.shape[1..].iter().product();
            uniform_vec(r, n, (3.0 / fan_in as f32).sqrt())
        };
        p[e.range.clone()].copy_from_slice(&vals);
    }
    p
}

fn pixels_for(c: &VisionConfig, grids: &[VideoGrid], r: &mut Rng) -> Vec<f32> {
    let n: usize = grids.iter().map(VideoGrid::patches).sum();
    uniform_vec(r, n * c.patch_len(), 2.0)
}

fn cpu_features(tower: &VisionTower, pixels: &[f32], grids: &[VideoGrid]) -> Vec<f32> {
    let mut ws = VisionWorkspace::new();
    tower.forward(&mut ws, pixels, grids).unwrap().to_vec()
}

/// The whole tower: f32 storage agrees to f32 rounding compounded over the depth, bf16 to a few
/// bf16 steps relative to the features' scale.
fn tower_tol<T: GpuFloat>(want: &[f32]) -> (Tolerance, f64) {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    if T::INDEX == 0 {
        (Tolerance::new(2e-5 * scale, 1e-4), 2e-5)
    } else {
        (Tolerance::new(6e-2 * scale, 6e-2), 3e-2)
    }
}

fn tower_case<T: GpuFloat>(
    what: &str,
    tower: &VisionTower,
    grids: &[VideoGrid],
    chunk: Option<usize>,
    r: &mut Rng,
) {
    let pixels = pixels_for(&tower.config, grids, r);
    let want = cpu_features(tower, &pixels, grids);
    let mut gt = GpuVisionTower::<T>::new(Gpu::open_on_new_stream(0).unwrap(), tower).unwrap();
    if let Some(c) = chunk {
        gt.set_max_chunk_patches(c);
    }
    let got = gt.forward(&pixels, grids).unwrap();
    assert_eq!(got.len(), want.len());
    let (t, rn) = tower_tol::<T>(&want);
    let s = format!("tower {what} {} chunk={chunk:?}", name::<T>());
    compare(&s, &got, &want, t, rn);
    // bf16's elementwise bound is loose enough that `compare` skips the norm: check it here.
    let rel = rel_norm_err(&got, &want);
    assert!(rel <= rn, "{s}: relative norm {rel:.3e} > {rn:.1e}");
}

fn grid(t: usize, h: usize, w: usize) -> VideoGrid {
    VideoGrid { t, h, w }
}

#[test]
fn tower_matches_cpu() {
    let Some(_g) = gpu() else { return };
    let mut r = rng(73);
    // Tiny: D = 16, windows of 2×2 merge units, full attention at blocks 1 and 3.
    let tiny = VisionConfig::tiny();
    // D = 80 (the published checkpoints' head size), windows of 4×4 units, one full block.
    let d80 = VisionConfig {
        depth: 3,
        hidden_size: 160,
        intermediate_size: 200,
        num_heads: 2,
        window_size: 112,
        out_hidden_size: 96,
        fullatt_block_indexes: vec![1],
        ..VisionConfig::tiny()
    };
    // D = 128, three heads, windows of 3×3 merge units, full attention first.
    let d128 = VisionConfig {
        depth: 2,
        hidden_size: 384,
        intermediate_size: 100,
        num_heads: 3,
        window_size: 84,
        out_hidden_size: 40,
        fullatt_block_indexes: vec![0],
        ..VisionConfig::tiny()
    };
    let cases: Vec<(&str, VisionConfig, Vec<VideoGrid>, Option<usize>)> = vec![
        ("tiny one unit", tiny.clone(), vec![grid(1, 2, 2)], None),
        (
            "tiny odd grids, 3 videos",
            tiny.clone(),
            vec![grid(3, 6, 10), grid(1, 2, 4), grid(2, 14, 4)],
            None,
        ),
        (
            "tiny chunked",
            tiny.clone(),
            vec![grid(3, 6, 10), grid(1, 2, 4), grid(2, 14, 4)],
            Some(70),
        ),
        (
            "D80 frames",
            d80.clone(),
            vec![grid(4, 10, 14), grid(1, 16, 8)],
            None,
        ),
        ("D80 chunked", d80, vec![grid(4, 10, 14)], Some(150)),
        ("D128", d128, vec![grid(2, 6, 18)], None),
    ];
    let mut all: Vec<(String, Box<dyn FnOnce() + '_>)> = Vec::new();
    for (what, c, grids, chunk) in cases {
        let tower = VisionTower::from_params(c.clone(), random_params(&c, &mut r)).unwrap();
        let (mut r1, mut r2) = (rng(r.random()), rng(r.random()));
        let tower = std::sync::Arc::new(tower);
        let (t1, t2, g1, g2) = (tower.clone(), tower, grids.clone(), grids);
        all.push((
            format!("f32 {what}"),
            Box::new(move || tower_case::<f32>(what, &t1, &g1, chunk, &mut r1)),
        ));
        all.push((
            format!("bf16 {what}"),
            Box::new(move || tower_case::<bf16>(what, &t2, &g2, chunk, &mut r2)),
        ));
    }
    run_all("vision tower", all);
}

/// A Qwen2.5-VL-3B/7B-shaped tower (width 1280, 16 heads of 80, MLP 3420, output 2048) cut to 4
/// blocks, one of them full attention, on two 448×336 frames pairs (a grid of 32×24 patches).
#[test]
fn tower_3b_shape_matches_cpu() {
    let Some(_g) = gpu() else { return };
    let mut r = rng(74);
    let c = VisionConfig {
        depth: 4,
        hidden_size: 1280,
        intermediate_size: 3420,
        num_heads: 16,
        window_size: 112,
        out_hidden_size: 2048,
        fullatt_block_indexes: vec![2],
        tokens_per_second: 2,
        ..VisionConfig::tiny()
    };
    let tower = VisionTower::from_params(c.clone(), random_params(&c, &mut r)).unwrap();
    let grids = [grid(2, 32, 24)];
    tower_case::<f32>("3B-shaped", &tower, &grids, None, &mut r);
    tower_case::<bf16>("3B-shaped", &tower, &grids, None, &mut r);
}

#[test]
fn tower_refuses_bad_input() {
    let Some(_g) = gpu() else { return };
    let c = VisionConfig::tiny();
    let mut r = rng(75);
    let tower = VisionTower::from_params(c.clone(), random_params(&c, &mut r)).unwrap();
    let gt = GpuVisionTower::<f32>::new(Gpu::open_on_new_stream(0).unwrap(), &tower).unwrap();
    let e = gt.forward(&[0.5; 10], &[grid(1, 2, 2)]).unwrap_err();
    assert!(e.to_string().contains("pixel_values_videos"), "{e}");
    let e = gt.forward(&[], &[grid(1, 3, 2)]).unwrap_err();
    assert!(e.to_string().contains("video 0"), "{e}");
    let mut px = pixels_for(&c, &[grid(1, 2, 2)], &mut r);
    px[7] = f32::NAN;
    let e = gt.forward(&px, &[grid(1, 2, 2)]).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
}

// ---------------------------------------------------------------------------------------------

/// The fixture model's tower (tiny, written by transformers) on its two videos: the GPU's
/// features against transformers' own `video_embeds`.
#[test]
fn fixture_tower_matches_transformers() {
    let Some(_g) = gpu() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2_5_vl-tiny");
    let model = reel_model::load_vl_checkpoint(&dir).unwrap();
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let floats = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let grids: Vec<VideoGrid> = st
        .tensor("video_grid_thw")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect::<Vec<_>>()
        .chunks_exact(3)
        .map(|x| grid(x[0], x[1], x[2]))
        .collect();
    let pixels = floats("pixel_values_videos");
    let want = floats("video_embeds");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let f32_tower =
        GpuVisionTower::<f32>::new(Gpu::open_on_new_stream(0).unwrap(), &model.vision).unwrap();
    compare(
        "fixture tower f32 vs transformers",
        &f32_tower.forward(&pixels, &grids).unwrap(),
        &want,
        Tolerance::new(2e-5 * scale, 1e-4),
        2e-5,
    );
    let bf16_tower =
        GpuVisionTower::<bf16>::new(Gpu::open_on_new_stream(0).unwrap(), &model.vision).unwrap();
    let got = bf16_tower.forward(&pixels, &grids).unwrap();
    compare(
        "fixture tower bf16 vs transformers",
        &got,
        &want,
        Tolerance::new(6e-2 * scale, 6e-2),
        3e-2,
    );
    let rel = rel_norm_err(&got, &want);
    assert!(rel <= 3e-2, "fixture tower bf16: relative norm {rel:.3e}");
}
