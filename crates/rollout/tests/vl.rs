//! The rollout engine on Qwen2.5-VL prompts (video features as input embeddings, M-RoPE
//! positions) against a plain reference: greedy decoding by full recomputation, the whole
//! `Qwen25VL` forward (tower included) over prompt + generated tokens at every step, argmax of
//! the last logits. Transformers' positions for text after the prompt (max + 1 on all three
//! components) come out of `mrope_positions` over the longer sequence, so the reference checks
//! the engine's continuation too.

use reel_model::vision::VisionLayout;
use reel_model::{
    CheckpointPolicy, LocalAttention, Qwen2, Qwen25VL, Qwen25VLConfig, Qwen2Config, VideoBatch,
    VideoGrid, VisionConfig, VlBatch,
};
use reel_rollout::{Engine, EngineConfig, GenerationParams, Prompt};

const VOCAB: usize = 96;
const VIDEO: u32 = 90;
const START: u32 = 91;
const END: u32 = 92;

/// A tiny random Qwen2.5-VL (decoder `Qwen2Config::tiny`, tower `VisionConfig::tiny`).
fn model(seed: u64) -> Qwen25VL {
    let mut text = Qwen2Config::tiny(VOCAB);
    text.tie_word_embeddings = false;
    let config = Qwen25VLConfig {
        text: text.clone(),
        vision: VisionConfig::tiny(),
        mrope_section: [2, 3, 3],
        image_token_id: 93,
        video_token_id: VIDEO,
        vision_start_token_id: START,
        vision_end_token_id: END,
    };
    let mut lm = Qwen2::new_random(text, seed).unwrap();
    // HF's N(0, 0.02²) leaves attention nearly uniform, where positions hardly matter; weights
    // of std 0.4 make them matter.
    for e in lm.layout.entries.clone() {
        if e.shape.len() >= 2 {
            lm.params[e.range].iter_mut().for_each(|x| *x *= 20.0);
        }
    }
    let layout = VisionLayout::new(&config.vision);
    let mut rng = reel_tensor::rng(seed ^ 0x77);
    let vis = reel_tensor::uniform_vec(&mut rng, layout.total(), 0.1);
    Qwen25VL::from_params(config, lm.params, vis).unwrap()
}

/// One prompt: text, then each video's placeholder run between start/end markers, then text.
struct VlCase {
    ids: Vec<u32>,
    pixels: Vec<f32>,
    grids: Vec<VideoGrid>,
    seconds: Vec<f32>,
}

fn case(m: &Qwen25VL, grids: &[VideoGrid], seconds: &[f32], seed: u64) -> VlCase {
    let merge = m.config.vision.spatial_merge_size;
    let text = |n: usize, s: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 29 + s * 7 + i * i) % 80) as u32)
            .collect()
    };
    let mut ids = text(5, seed);
    for (k, g) in grids.iter().enumerate() {
        ids.push(START);
        ids.extend(std::iter::repeat_n(
            VIDEO,
            g.t * g.h * g.w / (merge * merge),
        ));
        ids.push(END);
        ids.extend(text(3 + k, seed + k as u64 + 1));
    }
    let patch = 3 * m.config.vision.temporal_patch_size * 14 * 14;
    let rows: usize = grids.iter().map(|g| g.t * g.h * g.w).sum();
    let mut rng = reel_tensor::rng(seed * 1000);
    VlCase {
        ids,
        pixels: reel_tensor::uniform_vec(&mut rng, rows * patch, 1.0),
        grids: grids.to_vec(),
        seconds: seconds.to_vec(),
    }
}

/// Greedy tokens and their log-probabilities by full recomputation through `Qwen25VL::logits`
/// (the tower runs on the pixels).
fn reference(m: &Qwen25VL, c: &VlCase, n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut seq = c.ids.clone();
    let mut logprobs = Vec::new();
    let mut ws = m.workspace(CheckpointPolicy::None);
    let v = m.config.text.vocab_size;
    for _ in 0..n {
        let targets = vec![-100; seq.len()];
        let batch = VlBatch {
            tokens: &seq,
            targets: &targets,
            b: 1,
            t: seq.len(),
            videos: VideoBatch {
                pixels: &c.pixels,
                grids: &c.grids,
                second_per_grid_ts: &c.seconds,
            },
        };
        let logits = m.logits(&mut ws, &batch, &LocalAttention).unwrap();
        let last = &logits[logits.len() - v..];
        let best = (0..v).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        let sum: f64 = last.iter().map(|&x| ((x - last[best]) as f64).exp()).sum();
        logprobs.push(-sum.ln() as f32);
        seq.push(best as u32);
    }
    (seq[c.ids.len()..].to_vec(), logprobs)
}

/// Engine log-probabilities against the reference's (positions or embeddings that are off by
/// anything show here even where the argmax survives).
fn check_logprobs(what: &str, got: &[f32], want: &[f32]) {
    reel_tensor::check_close(what, got, want, reel_tensor::Tolerance::new(1e-4, 1e-3)).unwrap();
}

/// The engine's prompt: features from the tower run outside the engine (as the cache serves them).
fn prompt(m: &Qwen25VL, c: &VlCase) -> Prompt {
    let mut vws = reel_model::VisionWorkspace::new();
    let features = m.vision.forward(&mut vws, &c.pixels, &c.grids).unwrap();
    Prompt::vl(m, c.ids.clone(), &c.grids, &c.seconds, features).unwrap()
}

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: n,
        ..GenerationParams::default()
    }
}

fn small() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks: 256,
        max_step_tokens: 19,
        max_step_seqs: 32,
    }
}

#[test]
fn greedy_vlm_groups_match_full_recomputation_and_prefill_once() {
    let m = model(3);
    let g = |t, h, w| VideoGrid { t, h, w };
    // One video of 2×4×4 patches (8 tokens) at 1 s per temporal patch; two videos of different
    // grids and rates (the temporal positions jump past the text's running position).
    let cases = [
        case(&m, &[g(2, 4, 4)], &[1.0], 1),
        case(&m, &[g(3, 4, 4), g(1, 4, 6)], &[2.0, 0.5], 2),
    ];
    let n = 12;
    let want: Vec<(Vec<u32>, Vec<f32>)> = cases.iter().map(|c| reference(&m, c, n)).collect();
    for c in &cases {
        let p = prompt(&m, c);
        // Video tokens share positions, so generation continues below P: the engine must not
        // use P as the next position.
        assert!(p.next_position() < c.ids.len(), "{}", p.next_position());
    }

    let mut prefill = Vec::new();
    for group in [1usize, 4] {
        let mut e = Engine::new_vl(&m, small()).unwrap();
        for c in &cases {
            e.add_group(prompt(&m, c), group, greedy(n)).unwrap();
        }
        let out = e.run().unwrap();
        for (k, o) in out.iter().enumerate() {
            assert_eq!(o.samples.len(), group);
            for (j, s) in o.samples.iter().enumerate() {
                assert_eq!(s.ids, want[k].0, "prompt {k} sample {j} of {group}");
                check_logprobs(&format!("prompt {k} sample {j}"), &s.logprobs, &want[k].1);
            }
        }
        let st = e.stats();
        assert_eq!(st.forks, (group * cases.len()) as u64);
        prefill.push(st.prefill_tokens);
        assert_eq!(st.decode_tokens, (group * cases.len() * (n - 1)) as u64);
    }
    // Prefill work is the prompts' tokens, whatever the group size.
    let p_total: usize = cases.iter().map(|c| c.ids.len()).sum();
    assert_eq!(prefill, vec![p_total as u64; 2]);
}

#[test]
fn plain_rope_prompts_would_decode_differently() {
    // The same embeddings with 1-D positions 0..P (the text model's) must change the output:
    // the M-RoPE positions are what the reference agrees with.
    let m = model(5);
    let c = case(&m, &[VideoGrid { t: 2, h: 4, w: 4 }], &[2.0], 4);
    let (want, want_lp) = reference(&m, &c, 10);
    let vl = prompt(&m, &c);
    let plain = Prompt {
        mrope: None,
        ..vl.clone()
    };
    let mut e = Engine::new_vl(&m, small()).unwrap();
    e.add_request(vl, greedy(10)).unwrap();
    e.add_request(plain, greedy(10)).unwrap();
    let out = e.run().unwrap();
    assert_eq!(out[0].samples[0].ids, want);
    check_logprobs("M-RoPE prompt", &out[0].samples[0].logprobs, &want_lp);
    assert_ne!(out[1].samples[0].logprobs, out[0].samples[0].logprobs);
}

#[test]
fn a_bad_vlm_prompt_is_refused_with_the_reason() {
    let m = model(7);
    let c = case(&m, &[VideoGrid { t: 2, h: 4, w: 4 }], &[1.0], 1);
    let d = m.config.text.hidden_size;
    // Too few feature rows for the placeholders.
    let err = Prompt::vl(&m, c.ids.clone(), &c.grids, &c.seconds, &vec![0.0; 3 * d])
        .unwrap_err()
        .to_string();
    assert!(err.contains("features"), "{err}");
    // A placeholder run that does not match the grid.
    let mut ids = c.ids.clone();
    let at = ids.iter().position(|&t| t == VIDEO).unwrap();
    ids.remove(at);
    let err = Prompt::vl(&m, ids, &c.grids, &c.seconds, &vec![0.0; 8 * d])
        .unwrap_err()
        .to_string();
    assert!(err.contains("placeholder"), "{err}");
}
