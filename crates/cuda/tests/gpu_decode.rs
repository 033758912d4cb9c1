//! The rollout engine's decoding step on the GPU (`GpuDecoder`) against the CPU model's
//! `Qwen2::forward_step` over a host pool (`CpuStep`), on a tiny random Qwen2 (D = 32: the paged
//! kernel's smallest head dimension). Opt-in:
//!
//!     REEL_GPU_TESTS=1 cargo test -p reel-cuda --release --test gpu_decode -- --nocapture
//!
//! - one step's logits (prefill chunks of several lengths, the last without logits, then decode
//!   tokens and a chunk, in one batch) within bf16 tolerance, and within f32 rounding for an f32
//!   decoder;
//! - `step_top` (each logits row's best k and log-sum-exp parts, found on the device) against
//!   the CPU reference over the same step's downloaded logits, k = 1, 40, V; bad k and
//!   temperatures refused;
//! - whole engines, CPU and GPU, on several groups of several samples with shared prefixes
//!   (prompts that end inside a block, so forks copy on write on the device), greedy and sampled,
//!   in a pool small enough to preempt: the f32 decoder gives the same tokens, the same
//!   scheduling counters and log-probabilities within 1e-4, with candidates found on the device
//!   (every row here allows it) and with full rows downloaded; the bf16 decoder's agreement is
//!   printed and its counters must match (no stop tokens, so the schedule does not depend on the
//!   tokens);
//! - VLM steps: input-embedding rows and M-RoPE positions mixed with token rows and 1-D positions
//!   in one step, against the CPU step in f32 (rel-norm 1e-4) and bf16 (5e-2), on a model sharp
//!   enough that 1-D positions in place of the 3-D ones move the CPU logits by > 0.3 (rel-norm);
//! - a whole Qwen2.5-VL engine (`Prompt::vl` prompts with video features, groups, greedy) with
//!   the f32 decoder gives the CPU VLM engine's tokens and log-probabilities within 1e-3;
//! - a prefill shared by 2 or 3 in-process decoders (`Engine::add_group_shared`; text and VLM
//!   prompts, one or several segments, uneven chunks; the samples on one rank or split) continues
//!   as one decoder's own prefill: f32 every token equal and log-probabilities within 1e-4,
//!   bf16 through cuDNN chunks the greedy groups' first tokens equal and their log-probabilities
//!   within twice bf16's own spread (one bf16 decoder against f32).

mod common;
use common::*;

use reel_cuda::{Gpu, GpuDecoder, GpuFloat, TOPK_CAP};
use reel_model::decode::{SeqStep, StepInput, StepPositions};
use reel_model::generate::SamplingParams;
use reel_model::{Qwen2, Qwen2Config};
use reel_rollout::sample::top_rows_reference;
use reel_rollout::{
    CpuStep, Engine, EngineConfig, GenerationParams, GroupOutput, KvLayout, StepModel,
};
use reel_tensor::{bf16, Tolerance};

fn config() -> Qwen2Config {
    Qwen2Config {
        vocab_size: 300,
        hidden_size: 128,
        intermediate_size: 200,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        ..Qwen2Config::tiny(300)
    }
}

/// A decoder's own device handle (the shared one from `gpu()` only serialises the tests).
fn open() -> Gpu {
    Gpu::open(0).expect("REEL_GPU_TESTS=1 but no GPU")
}

fn tokens(n: usize, seed: u64, vocab: u32) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 37 + seed * 11 + i * i * seed) % vocab as u64) as u32)
        .collect()
}

/// Two steps over three sequences through `m`'s own pool; the logits of each step.
fn two_steps(m: &mut dyn StepModel, c: &Qwen2Config) -> Vec<Vec<f32>> {
    let layout = KvLayout {
        layers: c.num_hidden_layers,
        h_kv: c.num_key_value_heads,
        d: c.head_dim,
        block_size: 5,
        num_blocks: 32,
    };
    let mut pool = m.new_pool(layout).unwrap();
    let seqs: Vec<Vec<u32>> = [23usize, 9, 40]
        .iter()
        .enumerate()
        .map(|(s, &n)| tokens(n, s as u64 + 1, c.vocab_size as u32))
        .collect();
    // Step 1: chunks of 17, 8 and 39 tokens (the first without logits); step 2: the rest.
    let cuts = [[17usize, 23], [8, 9], [39, 40]];
    let mut tables: Vec<_> = (0..3).map(|_| pool.new_table()).collect();
    let mut out = Vec::new();
    for step in 0..2 {
        let mut steps = Vec::new();
        for s in 0..3 {
            let lo = if step == 0 { 0 } else { cuts[s][0] };
            let hi = cuts[s][step];
            pool.reserve(&mut tables[s], hi - lo).unwrap();
            steps.push(SeqStep {
                input: StepInput::Tokens(&seqs[s][lo..hi]),
                positions: StepPositions::Linear { start: lo },
                logits: step == 1 || s > 0,
            });
        }
        let refs: Vec<_> = tables.iter().collect();
        out.push(m.forward_step(&mut pool, &steps, &refs).unwrap().to_vec());
        drop(refs);
        for (s, t) in tables.iter_mut().enumerate() {
            let lo = if step == 0 { 0 } else { cuts[s][0] };
            pool.advance(t, cuts[s][step] - lo);
        }
    }
    out
}

fn check_step<T: GpuFloat>(what: &str, tol: Tolerance, max_rel: f64) {
    let Some(_lock) = gpu() else { return };
    let c = config();
    let model = Qwen2::new_random(c.clone(), 7).unwrap();
    let want = two_steps(&mut CpuStep::new(&model), &c);
    let mut dec = GpuDecoder::<T>::from_model(open(), &model).unwrap();
    let got = two_steps(&mut dec, &c);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.len(), b.len(), "step {i}: rows of logits");
        compare(&format!("{what} step {i} logits"), a, b, tol, max_rel);
    }
}

#[test]
fn step_logits_match_the_cpu_step_in_bf16() {
    check_step::<bf16>("bf16", Tolerance::new(1e-2, 2e-2), 2e-2);
}

#[test]
fn step_logits_match_the_cpu_step_in_f32() {
    check_step::<f32>("f32", Tolerance::new(1e-4, 1e-4), 1e-5);
}

/// Two steps of long prompt chunks beside short ones (`cuts[s]` = each sequence's token count
/// after step 0 and step 1): every sequence asks for logits at each step.
fn long_chunk_steps(m: &mut dyn StepModel, c: &Qwen2Config, cuts: &[[usize; 2]]) -> Vec<Vec<f32>> {
    let layout = KvLayout {
        layers: c.num_hidden_layers,
        h_kv: c.num_key_value_heads,
        d: c.head_dim,
        block_size: 5,
        num_blocks: 256,
    };
    let mut pool = m.new_pool(layout).unwrap();
    let seqs: Vec<Vec<u32>> = cuts
        .iter()
        .enumerate()
        .map(|(s, cut)| tokens(cut[1], s as u64 + 3, c.vocab_size as u32))
        .collect();
    let mut tables: Vec<_> = cuts.iter().map(|_| pool.new_table()).collect();
    let mut out = Vec::new();
    for step in 0..2 {
        let span = |s: usize| (if step == 0 { 0 } else { cuts[s][0] }, cuts[s][step]);
        let mut steps = Vec::new();
        for (s, t) in tables.iter_mut().enumerate() {
            let (lo, hi) = span(s);
            pool.reserve(t, hi - lo).unwrap();
            steps.push(SeqStep {
                input: StepInput::Tokens(&seqs[s][lo..hi]),
                positions: StepPositions::Linear { start: lo },
                logits: true,
            });
        }
        let refs: Vec<_> = tables.iter().collect();
        out.push(m.forward_step(&mut pool, &steps, &refs).unwrap().to_vec());
        drop(refs);
        for (s, t) in tables.iter_mut().enumerate() {
            let (lo, hi) = span(s);
            pool.advance(t, hi - lo);
        }
    }
    out
}

/// Long chunks through cuDNN (the threshold lowered to 100 rows): a 300-row fresh prompt (padded
/// to 512), a 150-row one continued by 200 rows after its 150 cached keys (the merge with the
/// earlier keys), beside sequences that stay on the paged kernel (7 rows, then single decode
/// rows); bf16 logits against the CPU step, and against the same decoder with every row on the
/// paged kernel.
#[test]
fn long_prompt_chunks_through_cudnn_match_the_cpu_step() {
    let Some(_lock) = gpu() else { return };
    let c = config();
    let model = Qwen2::new_random(c.clone(), 11).unwrap();
    let cuts = [[300usize, 302], [150, 350], [7, 8]];
    let want = long_chunk_steps(&mut CpuStep::new(&model), &c, &cuts);
    let mut dec = GpuDecoder::<bf16>::from_model(open(), &model).unwrap();
    dec.set_cudnn_prefill_rows(100);
    let got = long_chunk_steps(&mut dec, &c, &cuts);
    assert_eq!(
        dec.cudnn_rows_run(),
        300 + 150 + 200,
        "the long chunks took cuDNN"
    );
    let mut paged = GpuDecoder::<bf16>::from_model(open(), &model).unwrap();
    paged.set_cudnn_prefill_rows(usize::MAX);
    let all_paged = long_chunk_steps(&mut paged, &c, &cuts);
    assert_eq!(paged.cudnn_rows_run(), 0);
    for i in 0..2 {
        assert_eq!(got[i].len(), want[i].len(), "step {i}: rows of logits");
        compare(
            &format!("cuDNN chunks step {i} logits"),
            &got[i],
            &want[i],
            Tolerance::new(1e-2, 2e-2),
            2e-2,
        );
        compare(
            &format!("paged step {i} logits"),
            &all_paged[i],
            &want[i],
            Tolerance::new(1e-2, 2e-2),
            2e-2,
        );
        eprintln!(
            "step {i}: cuDNN chunks vs CPU rel-norm {:.2e}, paged vs CPU {:.2e}",
            rel_norm_err(&got[i], &want[i]),
            rel_norm_err(&all_paged[i], &want[i])
        );
    }
}

/// `step_top` on a step gives the candidates of `step`'s logits for the same step (run twice on
/// the same tables: the second run rewrites the same KV slots with the same values).
fn check_step_top<T: GpuFloat>() {
    let c = config();
    let model = Qwen2::new_random(c.clone(), 3).unwrap();
    let mut dec = GpuDecoder::<T>::from_model(open(), &model).unwrap();
    let layout = KvLayout {
        layers: c.num_hidden_layers,
        h_kv: c.num_key_value_heads,
        d: c.head_dim,
        block_size: 4,
        num_blocks: 16,
    };
    let v = c.vocab_size;
    let mut pool = dec.new_pool(layout).unwrap();
    let seqs: Vec<Vec<u32>> = [11usize, 1, 6, 4]
        .iter()
        .enumerate()
        .map(|(s, &n)| tokens(n, s as u64 + 3, v as u32))
        .collect();
    let mut tables: Vec<_> = (0..seqs.len()).map(|_| pool.new_table()).collect();
    for (t, s) in tables.iter_mut().zip(&seqs) {
        pool.reserve(t, s.len()).unwrap();
    }
    let steps: Vec<SeqStep> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| SeqStep {
            input: StepInput::Tokens(s),
            positions: StepPositions::Linear { start: 0 },
            logits: i != 2,
        })
        .collect();
    let refs: Vec<_> = tables.iter().collect();
    let temps = [0.7f32, 1.0, 1.3];
    let z = dec.step(&mut pool, &steps, &refs).unwrap().to_vec();
    assert_eq!(z.len(), 3 * v);
    for k in [1usize, 40, v] {
        let top = dec.step_top(&mut pool, &steps, &refs, k, &temps).unwrap();
        let (ids, values, max, sum) = top_rows_reference(&z, v, k, &temps);
        assert_eq!(top.k, k);
        assert_eq!(top.ids, &ids[..], "k {k}: ids");
        assert_eq!(top.values, &values[..], "k {k}: values");
        assert_eq!(top.max, &max[..], "k {k}: max");
        for (a, b) in top.sum.iter().zip(&sum) {
            assert!(((*a as f64) - b).abs() <= 1e-5 * b, "k {k}: sum {a} vs {b}");
        }
    }
    // A k over what the decoder offers, and temperatures that do not fit, are refused.
    dec.set_max_candidates(16);
    let e = dec
        .step_top(&mut pool, &steps, &refs, 40, &temps)
        .err()
        .unwrap();
    assert!(e.to_string().contains("1 to 16 offered"), "{e}");
    let e = dec
        .step_top(&mut pool, &steps, &refs, 8, &temps[..2])
        .err()
        .unwrap();
    assert!(e.to_string().contains("2 temperatures for 3"), "{e}");
    let e = dec
        .step_top(&mut pool, &steps, &refs, 8, &[1.0, 0.0, 1.0])
        .err()
        .unwrap();
    assert!(e.to_string().contains("temperature 0"), "{e}");
    drop(refs);
    for t in tables {
        pool.release(t);
    }
}

#[test]
fn step_top_gives_the_candidates_of_the_steps_logits() {
    let Some(_lock) = gpu() else { return };
    check_step_top::<f32>();
    check_step_top::<bf16>();
}

fn sampled(max_new: usize, seed: u64) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 40,
            seed,
        },
        max_new_tokens: max_new,
        ..GenerationParams::default()
    }
}

fn greedy(max_new: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: max_new,
        ..GenerationParams::default()
    }
}

/// Groups with shared prefixes, in a pool that holds each alone but not all together.
fn run_engine(mut e: Engine) -> (Vec<GroupOutput>, reel_rollout::EngineStats) {
    let v = 300;
    let work: Vec<(Vec<u32>, usize, GenerationParams)> = vec![
        (tokens(14, 1, v), 3, greedy(24)),
        (tokens(9, 2, v), 4, sampled(24, 2)),
        (tokens(21, 3, v), 2, greedy(24)),
        (tokens(6, 4, v), 3, sampled(24, 4)),
        (tokens(30, 5, v), 1, greedy(24)),
    ];
    for (p, g, params) in &work {
        e.add_group(p.clone(), *g, params.clone()).unwrap();
    }
    let out = e.run().unwrap();
    assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
    (out, e.stats())
}

#[test]
fn gpu_engine_matches_the_cpu_engine_with_shared_prefixes_and_preemption() {
    let Some(_lock) = gpu() else { return };
    let c = config();
    let model = Qwen2::new_random(c.clone(), 11).unwrap();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 40,
        max_step_tokens: 48,
        max_step_seqs: 32,
    };
    let (want, want_stats) = run_engine(Engine::new(&model, cfg).unwrap());
    assert!(want_stats.preemptions > 0, "{want_stats:?}");
    assert!(want_stats.cow_copies > 0, "{want_stats:?}");

    // Candidates on the device (every row here: greedy or top-k 40 ≤ the cap; V = 300), then
    // full rows downloaded (no candidates offered).
    for cap in [TOPK_CAP, 0] {
        let mut dec = GpuDecoder::<f32>::from_model(open(), &model).unwrap();
        dec.set_max_candidates(cap);
        let (got, stats) = run_engine(Engine::with_model(Box::new(&mut dec), cfg).unwrap());
        assert_eq!(
            stats, want_stats,
            "same schedule, forks, copies and preemptions"
        );
        for (o, w) in got.iter().zip(&want) {
            for (j, (s, t)) in o.samples.iter().zip(&w.samples).enumerate() {
                assert_eq!(s.ids, t.ids, "f32, cap {cap}: group {} sample {j}", o.id);
                reel_tensor::check_close(
                    &format!("f32 log-probs, cap {cap}, group {} sample {j}", o.id),
                    &s.logprobs,
                    &t.logprobs,
                    Tolerance::new(1e-4, 1e-4),
                )
                .unwrap();
            }
        }
        eprintln!("f32 decoder, candidates cap {cap}: every token equal; {stats:?}");
    }

    let mut dec = GpuDecoder::<bf16>::from_model(open(), &model).unwrap();
    let (got, stats) = run_engine(Engine::with_model(Box::new(&mut dec), cfg).unwrap());
    assert_eq!(stats, want_stats, "bf16: same schedule (no stop tokens)");
    let (mut same, mut total, mut prefix) = (0, 0, 0);
    for (o, w) in got.iter().zip(&want) {
        for (s, t) in o.samples.iter().zip(&w.samples) {
            total += s.ids.len();
            same += s.ids.iter().zip(&t.ids).filter(|(a, b)| a == b).count();
            prefix += s.ids.iter().zip(&t.ids).take_while(|(a, b)| a == b).count();
        }
    }
    eprintln!(
        "bf16 decoder: {same}/{total} tokens equal to the CPU's ({prefix} before the first \
         divergence of each sample)"
    );
}

/// M-RoPE sections of the VLM tests (D/2 = 16 rotary frequencies).
const SECTIONS: [usize; 3] = [4, 6, 6];

/// `config()`'s model with its matrices scaled up (std ≈ 0.16: attention far from uniform, so
/// positions and inputs show in the logits).
fn sharp_model(seed: u64) -> Qwen2 {
    let mut m = Qwen2::new_random(config(), seed).unwrap();
    for e in m.layout.entries.clone() {
        if e.shape.len() >= 2 {
            m.params[e.range].iter_mut().for_each(|x| *x *= 8.0);
        }
    }
    m
}

/// M-RoPE positions ids[start..], or 1-D positions from `start` when `mrope` is false.
fn vl_positions(ids: &[[u32; 3]], start: usize, mrope: bool) -> StepPositions<'_> {
    if mrope {
        StepPositions::MRope {
            ids: &ids[start..],
            sections: SECTIONS,
        }
    } else {
        StepPositions::Linear { start }
    }
}

/// Two steps over three sequences mixing input embeddings, token ids, M-RoPE and 1-D positions
/// in each step; the logits of each step. `mrope: false` feeds the M-RoPE sequences 1-D
/// positions instead (the test's proof that the 3-D positions matter).
fn two_vl_steps(m: &mut dyn StepModel, c: &Qwen2Config, mrope: bool) -> Vec<Vec<f32>> {
    let layout = KvLayout {
        layers: c.num_hidden_layers,
        h_kv: c.num_key_value_heads,
        d: c.head_dim,
        block_size: 4,
        num_blocks: 32,
    };
    let d = c.hidden_size;
    let mut pool = m.new_pool(layout).unwrap();
    let mut rng = reel_tensor::rng(5);
    // A: 13 embedding rows with video-like 3-D positions, then one token (equal components).
    let emb_a = reel_tensor::uniform_vec(&mut rng, 13 * d, 0.5);
    let ids_a: Vec<[u32; 3]> = (0..13u32)
        .map(|k| {
            if k < 2 {
                [k; 3]
            } else {
                [2 + (k - 2) / 6, 2 + (k - 2) % 6 / 3, 2 + k % 3]
            }
        })
        .chain(std::iter::once([9; 3]))
        .collect();
    // B: 9 tokens (1-D), then 3 embedding rows (1-D).
    let tok_b = tokens(9, 2, c.vocab_size as u32);
    let emb_b = reel_tensor::uniform_vec(&mut rng, 3 * d, 0.5);
    // C: 6 tokens with M-RoPE positions, then one token (1-D).
    let tok_c = tokens(7, 3, c.vocab_size as u32);
    let ids_c: Vec<[u32; 3]> = (0..6u32).map(|k| [k, k / 2, 5 - k]).collect();
    let pos = |ids, start| vl_positions(ids, start, mrope);
    let mut tables: Vec<_> = (0..3).map(|_| pool.new_table()).collect();
    let mut out = Vec::new();
    for step in 0..2 {
        let steps = if step == 0 {
            vec![
                SeqStep {
                    input: StepInput::Embeddings(&emb_a),
                    positions: pos(&ids_a[..13], 0),
                    logits: true,
                },
                SeqStep {
                    input: StepInput::Tokens(&tok_b),
                    positions: StepPositions::Linear { start: 0 },
                    logits: false,
                },
                SeqStep {
                    input: StepInput::Tokens(&tok_c[..6]),
                    positions: pos(&ids_c, 0),
                    logits: true,
                },
            ]
        } else {
            vec![
                SeqStep {
                    input: StepInput::Tokens(&[17]),
                    positions: pos(&ids_a, 13),
                    logits: true,
                },
                SeqStep {
                    input: StepInput::Embeddings(&emb_b),
                    positions: StepPositions::Linear { start: 9 },
                    logits: true,
                },
                SeqStep {
                    input: StepInput::Tokens(&tok_c[6..]),
                    positions: StepPositions::Linear { start: 6 },
                    logits: true,
                },
            ]
        };
        let lens: Vec<usize> = steps
            .iter()
            .map(|s| match s.input {
                StepInput::Tokens(t) => t.len(),
                StepInput::Embeddings(e) => e.len() / d,
            })
            .collect();
        for (t, &n) in tables.iter_mut().zip(&lens) {
            pool.reserve(t, n).unwrap();
        }
        let refs: Vec<_> = tables.iter().collect();
        out.push(m.forward_step(&mut pool, &steps, &refs).unwrap().to_vec());
        drop(refs);
        for (t, &n) in tables.iter_mut().zip(&lens) {
            pool.advance(t, n);
        }
    }
    out
}

fn check_vl_step<T: GpuFloat>(what: &str, tol: Tolerance, max_rel: f64) {
    let Some(_lock) = gpu() else { return };
    let c = config();
    let model = sharp_model(13);
    let want = two_vl_steps(&mut CpuStep::new(&model), &c, true);
    let flat = two_vl_steps(&mut CpuStep::new(&model), &c, false);
    let mut dec = GpuDecoder::<T>::from_model(open(), &model).unwrap();
    let got = two_vl_steps(&mut dec, &c, true);
    for (i, ((a, b), f)) in got.iter().zip(&want).zip(&flat).enumerate() {
        assert_eq!(a.len(), b.len(), "step {i}: rows of logits");
        let moved = rel_norm_err(f, b);
        assert!(
            moved > 0.3,
            "step {i}: 1-D positions move the CPU logits by only {moved:.2e}"
        );
        compare(&format!("{what} VLM step {i} logits"), a, b, tol, max_rel);
    }
}

#[test]
fn vl_step_logits_match_the_cpu_step_in_bf16() {
    // bf16 rounding through the sharp model's weights: measured on an H200, step 0 rel-norm
    // 2.1e-2 and max |diff| 0.135 (a logit near 0).
    check_vl_step::<bf16>("bf16", Tolerance::new(0.3, 5e-2), 5e-2);
}

#[test]
fn vl_step_logits_match_the_cpu_step_in_f32() {
    check_vl_step::<f32>("f32", Tolerance::new(1e-3, 1e-3), 1e-4);
}

/// A tiny random Qwen2.5-VL whose decoder is `sharp_model` (the tower is not run: prompts take
/// random video features).
fn vl_model(seed: u64) -> reel_model::Qwen25VL {
    use reel_model::vision::{VisionConfig, VisionLayout};
    let lm = sharp_model(seed);
    let config = reel_model::Qwen25VLConfig {
        text: lm.config.clone(),
        vision: VisionConfig {
            out_hidden_size: lm.config.hidden_size,
            ..VisionConfig::tiny()
        },
        mrope_section: SECTIONS,
        image_token_id: 293,
        video_token_id: 290,
        vision_start_token_id: 291,
        vision_end_token_id: 292,
    };
    let vis = vec![0.0; VisionLayout::new(&config.vision).total()];
    reel_model::Qwen25VL::from_params(config, lm.params, vis).unwrap()
}

/// Greedy groups of VLM prompts (text, one video's features, text) through an engine.
fn run_vl_engine(m: &reel_model::Qwen25VL, mut e: Engine) -> Vec<GroupOutput> {
    use reel_model::VideoGrid;
    let d = m.config.text.hidden_size;
    let grids = [
        VideoGrid { t: 2, h: 4, w: 4 },
        VideoGrid { t: 3, h: 2, w: 6 },
        VideoGrid { t: 1, h: 6, w: 4 },
    ];
    for (k, g) in grids.iter().enumerate() {
        let n_video = g.t * g.h * g.w / 4;
        let mut ids = tokens(5 + k, k as u64 + 1, 280);
        ids.push(291);
        ids.extend(std::iter::repeat_n(290, n_video));
        ids.push(292);
        ids.extend(tokens(4, k as u64 + 7, 280));
        let mut rng = reel_tensor::rng(100 + k as u64);
        let features = reel_tensor::uniform_vec(&mut rng, n_video * d, 0.5);
        let p = reel_rollout::Prompt::vl(m, ids, &[*g], &[1.0], &features).unwrap();
        e.add_group(p, 2, greedy(20)).unwrap();
    }
    let out = e.run().unwrap();
    assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
    out
}

#[test]
fn gpu_vl_engine_matches_the_cpu_vl_engine() {
    let Some(_lock) = gpu() else { return };
    let m = vl_model(17);
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_step_tokens: 19,
        max_step_seqs: 32,
    };
    let want = run_vl_engine(&m, Engine::new_vl(&m, cfg).unwrap());
    let mut dec = GpuDecoder::<f32>::from_model(open(), &m.lm).unwrap();
    let got = run_vl_engine(&m, Engine::with_model(Box::new(&mut dec), cfg).unwrap());
    let mut distinct = std::collections::BTreeSet::new();
    for (o, w) in got.iter().zip(&want) {
        for (j, (s, t)) in o.samples.iter().zip(&w.samples).enumerate() {
            assert_eq!(s.ids, t.ids, "f32: group {} sample {j}", o.id);
            reel_tensor::check_close(
                &format!("f32 log-probs, group {} sample {j}", o.id),
                &s.logprobs,
                &t.logprobs,
                Tolerance::new(1e-3, 1e-3),
            )
            .unwrap();
            distinct.extend(s.ids.iter().copied());
        }
    }
    // Greedy text that is not one repeated token (a degenerate model would prove little).
    assert!(distinct.len() > 3, "generated tokens {distinct:?}");
    eprintln!(
        "f32 VLM decoder: every token equal ({} distinct)",
        distinct.len()
    );
}

/// A bf16 decoder reading a `GpuQwen2`'s compute weights in place gives the logits of a decoder
/// with its own copy, bit for bit, before and after the trainer's AdamW step (which it sees with
/// no refresh, as the own copy does after `load_params_device`); refreshing its weights itself
/// is refused.
#[cfg(feature = "cudnn")]
#[test]
fn a_decoder_reading_the_trainers_weights_in_place_follows_its_updates() {
    use reel_model::{CheckpointPolicy, TokenBatch};
    use reel_optim::AdamWConfig;
    let Some(_lock) = gpu() else { return };
    let c = config();
    let model = Qwen2::new_random(c.clone(), 7).unwrap();
    let mut gm = reel_cuda::GpuQwen2::new(
        open(),
        c.clone(),
        &model.params,
        CheckpointPolicy::Remat,
        AdamWConfig::default(),
    )
    .unwrap();
    let mut own = GpuDecoder::<bf16>::from_model(open(), &model).unwrap();
    let mut in_place = GpuDecoder::<bf16>::from_model(open(), &model).unwrap();
    // SAFETY: `gm` outlives the decoder's steps; its update is waited for below.
    unsafe { in_place.read_weights_in_place(gm.weights_device()).unwrap() };
    assert!(in_place.weights_in_place() && !own.weights_in_place());
    let bits = |v: Vec<Vec<f32>>| -> Vec<u32> { v.concat().iter().map(|x| x.to_bits()).collect() };
    let before = bits(two_steps(&mut own, &c));
    assert_eq!(
        bits(two_steps(&mut in_place, &c)),
        before,
        "before the update"
    );
    // One training step moves the trainer's weights.
    let (b, t) = (2, 24);
    let ids = tokens(b * t, 5, c.vocab_size as u32);
    let targets: Vec<i32> = tokens(b * t, 9, c.vocab_size as u32)
        .iter()
        .map(|&x| x as i32)
        .collect();
    let positions = reel_model::default_positions(b, t);
    let batch = TokenBatch {
        tokens: &ids,
        targets: &targets,
        positions: &positions,
        b,
        t,
    };
    gm.zero_grads().unwrap();
    let loss = gm.forward(&batch).unwrap();
    gm.backward(&batch, 1.0 / loss.n_tokens as f32).unwrap();
    gm.adamw_step(1e-2).unwrap();
    gm.gpu().synchronize().unwrap();
    own.load_params_device(&gm.params_device().unwrap())
        .unwrap();
    let after = bits(two_steps(&mut own, &c));
    assert_ne!(after, before, "the update moved the logits");
    assert_eq!(
        bits(two_steps(&mut in_place, &c)),
        after,
        "after the update"
    );
    assert!(in_place.load_params(&model.params).is_err());
}

/// What one prompt asks of a shared-prefill run: the prompt, its samples and their sampling.
type Work = (reel_rollout::Prompt, usize, GenerationParams);

/// Text and VLM prompts (one of a single token, whose prefill is not shared; one of three, whose
/// two shared rows leave a third rank without rows), greedy and sampled.
fn shared_work(m: &reel_model::Qwen25VL) -> Vec<Work> {
    use reel_model::VideoGrid;
    let d = m.config.text.hidden_size;
    let g = VideoGrid { t: 4, h: 6, w: 8 };
    let n_video = g.t * g.h * g.w / 4;
    let mut ids = tokens(9, 5, 280);
    ids.push(291);
    ids.extend(std::iter::repeat_n(290, n_video));
    ids.push(292);
    ids.extend(tokens(11, 6, 280));
    let mut rng = reel_tensor::rng(101);
    let features = reel_tensor::uniform_vec(&mut rng, n_video * d, 0.5);
    let vl = reel_rollout::Prompt::vl(m, ids, &[g], &[1.0], &features).unwrap();
    vec![
        (tokens(203, 1, 280).into(), 3, greedy(12)),
        (vl, 2, greedy(12)),
        (tokens(1, 2, 280).into(), 2, greedy(4)),
        (tokens(77, 3, 280).into(), 4, sampled(12, 9)),
        // 2 shared rows: at world 3, rank 2's chunks are both empty (it only exchanges).
        (tokens(3, 4, 280).into(), 2, greedy(6)),
    ]
}

/// `work` rolled out by `world` in-process decoders (each on its own stream of the GPU, `rows`
/// rows a rank per segment, chunks of at least `cudnn_rows` rows through cuDNN), every prompt's
/// prefill shared; its samples decoded by rank 0 alone, or with `split` by every rank its
/// `sample_share`. Each prompt's samples in order (the ranks' shares put together) and the
/// ranks' prefill and decode token counts summed. Every rank's pool ends empty.
fn shared_rollout<T: GpuFloat>(
    m: &reel_model::Qwen25VL,
    work: &[Work],
    cfg: EngineConfig,
    world: usize,
    (rows, cudnn_rows, split): (usize, usize, bool),
) -> (Vec<Vec<reel_rollout::SampleOutput>>, [u64; 2]) {
    let devices = reel_cuda::DeviceWorld::new(world, std::time::Duration::from_secs(60));
    let mut decoders: Vec<GpuDecoder<T>> = (0..world)
        .map(|r| {
            let gpu = Gpu::open_on_new_stream(0).unwrap();
            let comm = devices.comm(r, &gpu).unwrap();
            let mut d = GpuDecoder::<T>::from_model(gpu, &m.lm).unwrap();
            d.set_prefill_group(Box::new(comm));
            d.set_shared_prefill_rows(rows);
            d.set_cudnn_prefill_rows(cudnn_rows);
            assert_eq!(d.prefill_peers(), Some((r, world)));
            d
        })
        .collect();
    let per_rank = std::thread::scope(|s| {
        let handles: Vec<_> = decoders
            .iter_mut()
            .enumerate()
            .map(|(r, d)| {
                s.spawn(move || {
                    let mut e = Engine::with_model(Box::new(d), cfg).unwrap();
                    let mut ids = Vec::new();
                    for (p, g, params) in work {
                        let share = match split {
                            true => reel_rollout::sample_share(*g, world, r),
                            false if r == 0 => 0..*g,
                            false => 0..0,
                        };
                        ids.push(e.add_group_shared(p, share, params.clone()).unwrap());
                    }
                    let mut out = e.run().unwrap();
                    assert_eq!(e.pool().free_blocks(), e.pool().total_blocks(), "rank {r}");
                    let samples: Vec<Vec<reel_rollout::SampleOutput>> = ids
                        .iter()
                        .map(|id| match id {
                            Some(id) => {
                                let at = out.iter().position(|o| o.id == *id).unwrap();
                                out.swap_remove(at).samples
                            }
                            None => Vec::new(),
                        })
                        .collect();
                    (samples, e.stats())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    // Each engine freed its decoder's KV blocks and step buffers when it was dropped.
    for (r, d) in decoders.iter().enumerate() {
        assert!(
            !d.holds_pool(),
            "rank {r}: the dropped engine's KV blocks freed"
        );
    }
    let mut merged: Vec<Vec<reel_rollout::SampleOutput>> = vec![Vec::new(); work.len()];
    let mut counts = [0u64; 2];
    for (samples, st) in per_rank {
        for (k, s) in samples.into_iter().enumerate() {
            merged[k].extend(s);
        }
        counts[0] += st.prefill_tokens;
        counts[1] += st.decode_tokens;
    }
    (merged, counts)
}

/// A prompt prefilled by 2 or 3 in-process decoders together (`Engine::add_group_shared`, all the
/// samples on the owner and none on the others; or every rank its `sample_share` of the samples;
/// zigzag chunks, several segments, each layer's keys and values all-gathered) continues exactly
/// as one decoder's own prefill: text and VLM
/// (embedding rows, M-RoPE) prompts, greedy and sampled, the f32 decoder within 1e-4 of its
/// log-probabilities with every token equal; bf16 with long chunks through cuDNN, the greedy
/// groups' first tokens equal and their log-probabilities within bf16's own spread.
#[test]
fn a_prefill_shared_over_ranks_continues_as_one_decoders_own() {
    let Some(_lock) = gpu() else { return };
    let m = vl_model(23);
    let work = shared_work(&m);
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 400,
        max_step_tokens: 64,
        max_step_seqs: 32,
    };
    let solo = |dec: &mut dyn StepModel| {
        let mut e = Engine::with_model(Box::new(dec), cfg).unwrap();
        for (p, g, params) in &work {
            e.add_group(p.clone(), *g, params.clone()).unwrap();
        }
        (e.run().unwrap(), e.stats())
    };
    let mut one = GpuDecoder::<f32>::from_model(open(), &m.lm).unwrap();
    let (want, want_stats) = solo(&mut one);
    assert!(!one.holds_pool(), "the dropped engine's KV blocks freed");
    for (world, rows, split) in [
        (2, 24, false),
        (3, 1000, false),
        (3, 17, true),
        (2, 40, true),
    ] {
        let (got, [prefill, decode]) =
            shared_rollout::<f32>(&m, &work, cfg, world, (rows, usize::MAX, split));
        // Split, each further peer with samples runs the prompt's last token itself.
        let extra: usize = match split {
            true => work.iter().map(|(_, g, _)| (*g).min(world) - 1).sum(),
            false => 0,
        };
        assert_eq!(prefill, want_stats.prefill_tokens + extra as u64);
        assert_eq!(decode, want_stats.decode_tokens);
        for (k, (o, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(o.len(), w.samples.len(), "group {k}'s samples");
            for (j, (s, t)) in o.iter().zip(&w.samples).enumerate() {
                let at =
                    format!("f32, world {world}, rows {rows}, split {split}: group {k} sample {j}");
                assert_eq!(s.ids, t.ids, "{at}");
                reel_tensor::check_close(&at, &s.logprobs, &t.logprobs, Tolerance::new(1e-4, 1e-4))
                    .unwrap();
            }
        }
        eprintln!(
            "f32, world {world}, {rows} rows a rank per segment, samples split {split}: every \
             token equal"
        );
    }
    let mut one = GpuDecoder::<bf16>::from_model(open(), &m.lm).unwrap();
    one.set_cudnn_prefill_rows(8);
    let f32_first = want;
    let (want, _) = solo(&mut one);
    // bf16's own spread on this sharp model: one decoder's first log-probabilities against f32.
    let spread = want
        .iter()
        .zip(&f32_first)
        .flat_map(|(o, w)| o.samples.iter().zip(&w.samples))
        .map(|(s, t)| (s.logprobs[0] - t.logprobs[0]).abs())
        .fold(0.0f32, f32::max);
    eprintln!("bf16 against f32, one decoder: first log-probs differ by up to {spread:.4}");
    for world in [2, 3] {
        let (got, _) = shared_rollout::<bf16>(&m, &work, cfg, world, (40, 8, world == 2));
        let (mut same, mut total) = (0, 0);
        for (k, (o, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(o.len(), w.samples.len(), "group {k}'s samples");
            for (j, (s, t)) in o.iter().zip(&w.samples).enumerate() {
                let at = format!("bf16, world {world}: group {k} sample {j}");
                total += s.ids.len();
                same += s.ids.iter().zip(&t.ids).filter(|(a, b)| a == b).count();
                if work[k].2.sampling.temperature > 0.0 {
                    // A sampled first token may flip where its draw lands near a boundary of
                    // the distribution, which bf16 rounding moves: counted only.
                    continue;
                }
                assert_eq!(s.ids[0], t.ids[0], "{at}: first token");
                // Another chunking of the same bf16 prefill: within twice bf16's own spread.
                assert!(
                    (s.logprobs[0] - t.logprobs[0]).abs() <= 2.0 * spread + 1e-3,
                    "{at}: first log-prob {} vs {} (bf16 against f32: {spread})",
                    s.logprobs[0],
                    t.logprobs[0]
                );
            }
        }
        eprintln!(
            "bf16, world {world} (cuDNN chunks): {same}/{total} tokens equal to one decoder's"
        );
    }
}

/// A decoder that cannot take part in a shared prefill — its pool has no room, or its segment
/// size differs — fails every decoder of the group at once through the agreement (the error
/// naming it; the group's timeout is far longer than the test), nothing leaks, and the same
/// decoders then prefill a prompt together.
#[test]
fn a_decoder_that_cannot_take_part_fails_every_peer_at_once() {
    let Some(_lock) = gpu() else { return };
    let m = vl_model(23);
    let work = shared_work(&m);
    let short = reel_rollout::Prompt::from(vec![5u32, 9, 2, 7, 1, 3]);
    let (long, short) = (&work[0].0, &short);
    assert!(long.ids.len() > 8, "a prompt longer than the small pool");
    let world = 2;
    let devices = reel_cuda::DeviceWorld::new(world, std::time::Duration::from_secs(600));
    let mut decoders: Vec<GpuDecoder<f32>> = (0..world)
        .map(|r| {
            let gpu = Gpu::open_on_new_stream(0).unwrap();
            let comm = devices.comm(r, &gpu).unwrap();
            let mut d = GpuDecoder::<f32>::from_model(gpu, &m.lm).unwrap();
            d.set_prefill_group(Box::new(comm));
            d
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = decoders
            .iter_mut()
            .enumerate()
            .map(|(r, d)| {
                s.spawn(move || {
                    let mut said = Vec::new();
                    // Rank 1's pool: 2 blocks of 4, too few for the long prompt.
                    let cfg = EngineConfig {
                        block_size: 4,
                        num_blocks: if r == 1 { 2 } else { 400 },
                        max_step_tokens: 64,
                        max_step_seqs: 32,
                    };
                    {
                        let mut e = Engine::with_model(Box::new(&mut *d), cfg).unwrap();
                        let err = e.add_group_shared(long, 0..1, greedy(3)).unwrap_err();
                        said.push(err.to_string());
                        assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
                    }
                    // Both pools roomy, rank 1's segments another size.
                    d.set_shared_prefill_rows(if r == 1 { 7 } else { 16384 });
                    let cfg = EngineConfig {
                        num_blocks: 400,
                        ..cfg
                    };
                    let mut e = Engine::with_model(Box::new(&mut *d), cfg).unwrap();
                    let err = e.add_group_shared(long, 0..1, greedy(3)).unwrap_err();
                    said.push(err.to_string());
                    // In step again: a short prompt both agree on (the size now alike).
                    drop(e);
                    d.set_shared_prefill_rows(16384);
                    let mut e = Engine::with_model(Box::new(&mut *d), cfg).unwrap();
                    let share = if r == 0 { 0..1 } else { 0..0 };
                    let id = e.add_group_shared(short, share, greedy(3)).unwrap();
                    let out = e.run().unwrap();
                    (said, id.is_some(), out)
                })
            })
            .collect();
        let mut first = None;
        for (r, h) in handles.into_iter().enumerate() {
            let (said, has, out) = h.join().unwrap();
            eprintln!("rank {r}: {said:?}");
            assert!(
                said[0].contains("peer 1: no room in its KV pool"),
                "rank {r}: {}",
                said[0]
            );
            assert!(
                said[1].contains("disagree") && said[1].contains("7 a rank per segment"),
                "rank {r}: {}",
                said[1]
            );
            assert_eq!(has, r == 0);
            if r == 0 {
                first = Some(out[0].samples[0].ids.clone());
            }
        }
        // The group's sample as one decoder's own prefill gives it.
        let mut one = GpuDecoder::<f32>::from_model(open(), &m.lm).unwrap();
        let mut e = Engine::with_model(
            Box::new(&mut one),
            EngineConfig {
                block_size: 4,
                num_blocks: 400,
                max_step_tokens: 64,
                max_step_seqs: 32,
            },
        )
        .unwrap();
        e.add_group(short.clone(), 1, greedy(3)).unwrap();
        assert_eq!(Some(e.run().unwrap()[0].samples[0].ids.clone()), first);
    });
    for d in &decoders {
        assert!(!d.holds_pool());
    }
}

/// A decoder whose weights were released (room for a trainer's state before it reads the
/// trainer's weights in place) refuses to step, naming why, and after `load_params` decodes as
/// before.
#[test]
fn released_weights_refuse_steps_until_loaded_again() {
    let Some(_lock) = gpu() else { return };
    let m = vl_model(23);
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_step_tokens: 64,
        max_step_seqs: 8,
    };
    let p: reel_rollout::Prompt = tokens(20, 1, 280).into();
    let run = |d: &mut GpuDecoder<bf16>| -> Result<Vec<u32>, String> {
        let mut e = Engine::with_model(Box::new(d), cfg).map_err(|e| e.to_string())?;
        e.add_group(p.clone(), 1, greedy(5))
            .map_err(|e| e.to_string())?;
        let out = e.run().map_err(|e| e.to_string())?;
        Ok(out[0].samples[0].ids.clone())
    };
    let mut d = GpuDecoder::<bf16>::from_model(open(), &m.lm).unwrap();
    let want = run(&mut d).unwrap();
    d.release_weights().unwrap();
    assert!(d.weights_released());
    let err = run(&mut d).unwrap_err();
    assert!(err.contains("released"), "{err}");
    d.load_params(&m.lm.params).unwrap();
    assert!(!d.weights_released());
    assert_eq!(run(&mut d).unwrap(), want);
}
