//! The rollout engine against `Qwen2::generate` (itself checked against transformers) on the
//! golden fixture model: greedy and sampled outputs token for token, alone and batched, with
//! prefix sharing, copy on write, preemption, stops and bad requests; and a step that returns
//! each row's best candidates in place of full rows (as a GPU decoder does) giving the same
//! tokens and log-probabilities.

use reel_model::decode::SeqStep;
use reel_model::generate::SamplingParams;
use reel_model::{
    load_checkpoint, CheckpointPolicy, LocalAttention, Qwen2, Qwen2Config, Workspace,
};
use reel_rollout::sample::top_rows_reference;
use reel_rollout::{
    sample_seed, BlockPool, BlockTable, CpuStep, Engine, EngineConfig, FinishReason,
    GenerationParams, GroupOutput, KvLayout, MRopePrompt, Prompt, RolloutError, SeqState,
    StepModel, TopRows,
};
use reel_tensor::Tolerance;
use std::path::Path;
use std::sync::Arc;

fn model() -> Qwen2 {
    load_checkpoint(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny"))
        .unwrap()
}

fn golden() -> (Vec<u32>, Vec<u32>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny/gen.json");
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        gen[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    (ids("prompt_ids"), ids("generated_ids"))
}

/// A prompt of `n` tokens from a seed.
fn prompt(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 37 + seed * 11 + i * i * seed) % 120) as u32)
        .collect()
}

fn greedy(max_new: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: max_new,
        ..GenerationParams::default()
    }
}

fn sampled(max_new: usize, seed: u64) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            seed,
        },
        max_new_tokens: max_new,
        ..GenerationParams::default()
    }
}

/// Small blocks and step budgets so prompts span partial blocks and prefill runs in chunks.
fn small() -> EngineConfig {
    EngineConfig {
        block_size: 3,
        num_blocks: 400,
        max_step_tokens: 17,
        max_step_seqs: 64,
    }
}

/// Each group's samples (`out`, in `work`'s order) are what `generate` gives them alone.
fn assert_generates_alone(
    m: &Qwen2,
    out: &[reel_rollout::GroupOutput],
    work: &[(Vec<u32>, usize, GenerationParams)],
) {
    for (o, (p, g, params)) in out.iter().zip(work) {
        assert_eq!(o.samples.len(), *g);
        for (j, s) in o.samples.iter().enumerate() {
            assert_eq!(
                s.ids,
                reference(m, p, params, j),
                "group {} sample {j}",
                o.id
            );
        }
    }
}

/// What `generate` gives sample j of a group with these params.
fn reference(m: &Qwen2, prompt: &[u32], p: &GenerationParams, j: usize) -> Vec<u32> {
    let params = SamplingParams {
        seed: sample_seed(p.sampling.seed, j),
        ..p.sampling
    };
    m.generate(prompt, p.max_new_tokens, &p.stop_token_ids, &params)
        .unwrap()
}

#[test]
fn greedy_output_equals_generate_alone_and_batched() {
    let m = model();
    let (prompt_ids, expected) = golden();
    let mut e = Engine::new(&m, small()).unwrap();
    e.add_request(prompt_ids.clone(), greedy(expected.len()))
        .unwrap();
    let out = e.run().unwrap();
    assert_eq!(out[0].samples[0].ids, expected);
    assert_eq!(out[0].samples[0].finish, FinishReason::MaxTokens);

    // Batched with requests of other lengths, joining at different steps.
    let others: Vec<(Vec<u32>, usize)> = vec![
        (prompt(5, 1), 9),
        (prompt(23, 2), 4),
        (prompt(1, 3), 14),
        (prompt(40, 4), 7),
    ];
    let mut e = Engine::new(&m, small()).unwrap();
    let mut ids = vec![e
        .add_request(others[0].0.clone(), greedy(others[0].1))
        .unwrap()];
    e.step().unwrap();
    ids.push(
        e.add_request(prompt_ids.clone(), greedy(expected.len()))
            .unwrap(),
    );
    let mut mixed = false;
    for (p, n) in &others[1..] {
        let st = e.step().unwrap();
        mixed |= st.prefill_tokens > 0 && st.decode_tokens > 0;
        ids.push(e.add_request(p.clone(), greedy(*n)).unwrap());
    }
    let out = e.run().unwrap();
    assert!(mixed, "some step ran prefill chunks beside decode tokens");
    assert_eq!(out.len(), 5);
    assert_eq!(out[1].id, ids[1]);
    assert_eq!(out[1].samples[0].ids, expected);
    for (o, (p, n)) in [&out[0], &out[2], &out[3], &out[4]].iter().zip(&others) {
        assert_eq!(
            o.samples[0].ids,
            reference(&m, p, &greedy(*n), 0),
            "prompt {p:?}"
        );
    }
    assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
}

#[test]
fn prefix_sharing_prefills_once_whatever_the_group_size() {
    let m = model();
    let p = prompt(20, 5); // 20 % 3 != 0: the last prompt block is partial and shared
    for g in [1usize, 4, 8] {
        let mut e = Engine::new(&m, small()).unwrap();
        e.add_group(p.clone(), g, greedy(6)).unwrap();
        let out = e.run().unwrap();
        let st = e.stats();
        assert_eq!(st.prefill_tokens, 20, "G = {g}");
        let want = reference(&m, &p, &greedy(6), 0);
        for s in &out[0].samples {
            assert_eq!(s.ids, want, "G = {g}");
        }
        assert_eq!(st.forks, g as u64);
        assert_eq!(st.decode_tokens, (g * (want.len() - 1)) as u64);
        // The last holder of the shared partial block appends in place; the others copy it.
        assert_eq!(st.cow_copies, g as u64 - 1, "G = {g}");
        assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
    }
}

#[test]
fn forked_samples_diverge_and_each_equals_its_own_run() {
    let m = model();
    let p = prompt(10, 7);
    let params = sampled(12, 1234);
    let g = 6;
    let mut e = Engine::new(&m, small()).unwrap();
    e.add_group(p.clone(), g, params.clone()).unwrap();
    let out = e.run().unwrap().remove(0);
    assert_eq!(e.stats().prefill_tokens, 10);
    let distinct: std::collections::HashSet<&Vec<u32>> =
        out.samples.iter().map(|s| &s.ids).collect();
    assert!(distinct.len() > 1, "samples differ");
    // Each sample equals generate with its seed: had a sample written into the shared prompt
    // blocks, the others' continuations would differ.
    for (j, s) in out.samples.iter().enumerate() {
        assert_eq!(s.seed, sample_seed(1234, j));
        assert_eq!(s.ids, reference(&m, &p, &params, j), "sample {j}");
    }
    // The same group batched with others gives the same samples.
    let mut e = Engine::new(&m, small()).unwrap();
    e.add_group(prompt(15, 8), 3, sampled(9, 99)).unwrap();
    let id = e.add_group(p.clone(), g, params.clone()).unwrap();
    e.add_request(prompt(4, 9), greedy(20)).unwrap();
    let again = e.run().unwrap();
    let again = again.iter().find(|o| o.id == id).unwrap();
    for (a, b) in again.samples.iter().zip(&out.samples) {
        assert_eq!(a.ids, b.ids);
        // Batched GEMMs may round differently in the last bit.
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}

#[test]
fn logprobs_are_the_policy_log_probabilities_of_the_sampled_tokens() {
    let m = model();
    let p = prompt(9, 3);
    for temperature in [1.0f32, 0.7, 0.0] {
        let mut params = sampled(8, 5);
        params.sampling.temperature = temperature;
        let mut e = Engine::new(&m, small()).unwrap();
        e.add_group(p.clone(), 2, params).unwrap();
        let out = e.run().unwrap().remove(0);
        for s in &out.samples {
            // Full-sequence logits from the training forward.
            let seq: Vec<u32> = p.iter().chain(&s.ids).copied().collect();
            let t = seq.len();
            let mut ws = Workspace::new(&m.config, CheckpointPolicy::None);
            let pos: Vec<u32> = (0..t as u32).collect();
            let logits = m
                .logits(&mut ws, &seq, &pos, 1, t, &LocalAttention)
                .unwrap();
            let v = m.config.vocab_size;
            let temp = if temperature > 0.0 { temperature } else { 1.0 };
            for (i, (&tok, &lp)) in s.ids.iter().zip(&s.logprobs).enumerate() {
                let row = &logits[(p.len() - 1 + i) * v..(p.len() + i) * v];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let lse = row
                    .iter()
                    .map(|&x| ((x - max) / temp).exp())
                    .sum::<f32>()
                    .ln();
                let want = (row[tok as usize] - max) / temp - lse;
                assert!(
                    (lp - want).abs() < 1e-4,
                    "T {temperature} token {i}: {lp} vs {want}"
                );
            }
        }
    }
}

#[test]
fn seeds_are_reproducible() {
    let m = model();
    let run = |seed: u64| -> GroupOutput {
        let mut e = Engine::new(&m, EngineConfig::default()).unwrap();
        e.add_group(prompt(8, 2), 4, sampled(10, seed)).unwrap();
        e.run().unwrap().remove(0)
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a.samples, run(43).samples);
}

#[test]
fn pool_exhaustion_preempts_and_recomputes_without_changing_outputs() {
    let m = model();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 32, // each group fits alone (27, 18, 13 blocks), not together
        max_step_tokens: 64,
        max_step_seqs: 64,
    };
    let work: Vec<(Vec<u32>, usize, GenerationParams)> = vec![
        (prompt(14, 1), 3, sampled(30, 1)),
        (prompt(9, 2), 2, sampled(30, 2)),
        (prompt(20, 3), 1, greedy(30)),
    ];
    let mut e = Engine::new(&m, cfg).unwrap();
    for (p, g, params) in &work {
        e.add_group(p.clone(), *g, params.clone()).unwrap();
    }
    let out = e.run().unwrap();
    assert!(e.stats().preemptions > 0, "{:?}", e.stats());
    assert!(e.stats().prefill_tokens > 14 + 9 + 20, "recomputed prompts");
    assert_generates_alone(&m, &out, &work);
    assert_eq!(e.pool().free_blocks(), 32);

    // A group that cannot fit even alone is an error, not a hang.
    let tiny = EngineConfig {
        block_size: 4,
        num_blocks: 6,
        ..cfg
    };
    let mut e = Engine::new(&m, tiny).unwrap();
    e.add_group(prompt(16, 1), 4, greedy(30)).unwrap();
    let err = e.run().unwrap_err();
    assert!(matches!(err, RolloutError::PoolTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("num_blocks"), "{err}");
    let mut e = Engine::new(&m, tiny).unwrap();
    let err = e.add_request(prompt(30, 1), greedy(3)).unwrap_err();
    assert!(matches!(err, RolloutError::PoolTooSmall { .. }), "{err}");
}

#[test]
fn stops_on_tokens_strings_max_tokens_and_context() {
    let m = model();
    let (p, expected) = golden();
    // Stop token: the fourth greedy token.
    let mut e = Engine::new(&m, small()).unwrap();
    let params = GenerationParams {
        stop_token_ids: vec![expected[3]],
        ..greedy(12)
    };
    e.add_request(p.clone(), params).unwrap();
    let out = e.run().unwrap().remove(0).samples.remove(0);
    let first = expected.iter().position(|&t| t == expected[3]).unwrap();
    assert_eq!(out.ids, expected[..=first]);
    assert_eq!(out.finish, FinishReason::StopToken(expected[3]));

    // Stop string over a detokenizer that renders ids as <id>.
    let detok = Arc::new(|ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect::<String>());
    let mut e = Engine::new(&m, small()).unwrap().with_detokenizer(detok);
    let params = GenerationParams {
        stop_strings: vec!["nope".into(), format!("<{}><{}>", expected[1], expected[2])],
        ..greedy(12)
    };
    let id = e.add_request(p.clone(), params).unwrap();
    assert_eq!(e.state(id, 0), Some(SeqState::Waiting));
    e.step().unwrap();
    assert_eq!(e.state(id, 0), Some(SeqState::Running));
    let out = e.run().unwrap().remove(0).samples.remove(0);
    assert_eq!(out.ids, expected[..3]);
    assert_eq!(out.finish, FinishReason::StopString(1));
    assert_eq!(
        e.state(id, 0),
        None,
        "outputs taken by run are no longer held"
    );

    // The context limit, as generate has it.
    let max_pos = m.config.max_position_embeddings;
    let long = prompt(max_pos - 5, 1);
    let mut e = Engine::new(&m, EngineConfig::default()).unwrap();
    e.add_request(long.clone(), greedy(100)).unwrap();
    let out = e.run().unwrap().remove(0).samples.remove(0);
    assert_eq!(out.ids.len(), 5);
    assert_eq!(out.finish, FinishReason::ContextFull);
    assert_eq!(
        out.ids,
        m.generate(&long, 100, &[], &SamplingParams::default())
            .unwrap()
    );

    // Nothing to generate.
    let mut e = Engine::new(&m, EngineConfig::default()).unwrap();
    let id = e.add_group(p.clone(), 2, greedy(0)).unwrap();
    assert_eq!(
        e.state(id, 1),
        Some(SeqState::Finished {
            reason: FinishReason::MaxTokens
        })
    );
    let out = e.run().unwrap();
    assert!(out[0].samples.iter().all(|s| s.ids.is_empty()));
    assert_eq!(e.stats().steps, 0);
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let m = model();
    let mut e = Engine::new(&m, EngineConfig::default()).unwrap();
    let err = |r: Result<_, RolloutError>| r.unwrap_err().to_string();
    assert!(err(e.add_request(vec![], greedy(3))).contains("1 to"));
    assert!(err(e.add_request(vec![1, 500], greedy(3))).contains("500"));
    assert!(err(e.add_group(vec![1, 2], 0, greedy(3))).contains("at least one"));
    let mut nan = greedy(3);
    nan.sampling.temperature = f32::NAN;
    assert!(err(e.add_request(vec![1, 2], nan)).contains("temperature"));
    let stops = GenerationParams {
        stop_strings: vec!["x".into()],
        ..greedy(3)
    };
    assert!(err(e.add_request(vec![1, 2], stops)).contains("detokenizer"));
    let bad_embed = Prompt {
        ids: vec![1, 2],
        embeddings: Some(vec![0.0; 5]),
        mrope: None,
    };
    assert!(err(e.add_request(bad_embed, greedy(3))).contains("embeddings"));
    assert!(!e.has_work(), "refused requests are not queued");
    assert!(Engine::new(
        &m,
        EngineConfig {
            block_size: 0,
            ..EngineConfig::default()
        }
    )
    .is_err());
}

#[test]
fn embedding_and_mrope_prompts_are_an_extension_point() {
    // Input embeddings equal to the ids' rows and M-RoPE positions with equal components must
    // give exactly the plain prompt's output; shifted temporal positions must change it.
    let m = model();
    let p = prompt(11, 4);
    let d = m.config.hidden_size;
    let embed = &m.params[m.layout.embed.clone()];
    let rows: Vec<f32> = p
        .iter()
        .flat_map(|&t| embed[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    let half = m.config.head_dim / 2;
    let sections = [half - 2, 1, 1];
    let same = Prompt {
        ids: p.clone(),
        embeddings: Some(rows.clone()),
        mrope: Some(MRopePrompt {
            positions: (0..p.len() as u32).map(|i| [i, i, i]).collect(),
            sections,
        }),
    };
    let shifted = Prompt {
        mrope: Some(MRopePrompt {
            positions: (0..p.len() as u32).map(|i| [i + 30, i, i]).collect(),
            sections,
        }),
        ..same.clone()
    };
    assert_eq!(shifted.next_position(), p.len() + 30);
    let mut e = Engine::new(&m, small()).unwrap();
    e.add_request(p.clone(), greedy(10)).unwrap();
    e.add_request(same, greedy(10)).unwrap();
    e.add_request(shifted, greedy(10)).unwrap();
    let out = e.run().unwrap();
    assert_eq!(out[0].samples[0].ids, reference(&m, &p, &greedy(10), 0));
    assert_eq!(out[1].samples[0].ids, out[0].samples[0].ids);
    assert_ne!(out[2].samples[0].logprobs, out[0].samples[0].logprobs);
}

#[test]
fn tied_mqa_model_matches_generate_with_shared_prefixes() {
    let m = load_checkpoint(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny-tied"),
    )
    .unwrap();
    assert_eq!(m.config.num_key_value_heads, 1);
    let mut e = Engine::new(&m, small()).unwrap();
    let small_vocab = |n, seed| -> Vec<u32> { prompt(n, seed).iter().map(|t| t % 96).collect() };
    let work = [
        (small_vocab(13, 1), 3, sampled(10, 3)),
        (small_vocab(6, 2), 2, greedy(12)),
    ];
    for (p, g, params) in &work {
        e.add_group(p.clone(), *g, params.clone()).unwrap();
    }
    let out = e.run().unwrap();
    assert_eq!(e.stats().prefill_tokens, 13 + 6);
    for (o, (p, _, params)) in out.iter().zip(&work) {
        for (j, s) in o.samples.iter().enumerate() {
            assert_eq!(
                s.ids,
                reference(&m, p, params, j),
                "group {} sample {j}",
                o.id
            );
        }
    }
}

/// The CPU step offering each logits row's best candidates, as a GPU decoder does on the device
/// (`reel_rollout::sample::top_rows_reference`, the sum rounded to f32 as the device returns
/// it); counts the steps that returned candidates and full rows.
struct CandidateStep<'m> {
    cpu: CpuStep<'m>,
    cap: usize,
    ids: Vec<u32>,
    values: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    top_steps: usize,
    full_steps: usize,
}

impl StepModel for CandidateStep<'_> {
    fn config(&self) -> &Qwen2Config {
        self.cpu.config()
    }

    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
        self.cpu.new_pool(layout)
    }

    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError> {
        self.full_steps += 1;
        self.cpu.forward_step(pool, steps, tables)
    }

    fn max_candidates(&self) -> usize {
        self.cap
    }

    fn forward_step_top(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
        k: usize,
        temperatures: &[f32],
    ) -> Result<TopRows<'_>, RolloutError> {
        assert!(k <= self.cap);
        let v = self.cpu.config().vocab_size;
        let z = self.cpu.forward_step(pool, steps, tables)?.to_vec();
        let (ids, values, max, sum) = top_rows_reference(&z, v, k, temperatures);
        (self.ids, self.values, self.max) = (ids, values, max);
        self.sum = sum.iter().map(|&s| s as f32).collect();
        self.top_steps += 1;
        Ok(TopRows {
            k,
            ids: &self.ids,
            values: &self.values,
            max: &self.max,
            sum: &self.sum,
        })
    }
}

#[test]
fn candidate_rows_give_the_full_rows_tokens_and_logprobs() {
    let m = model();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 32, // preempts, as above
        max_step_tokens: 64,
        max_step_seqs: 64,
    };
    let nucleus = GenerationParams {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 0,
            seed: 9,
        },
        max_new_tokens: 5,
        ..GenerationParams::default()
    };
    // The nucleus group (top-k off: every row needed) runs its few tokens on full rows; the
    // steps after it take candidates (greedy: 1, top-k 50: 50 ≤ the cap of 64).
    let work: Vec<(Vec<u32>, usize, GenerationParams)> = vec![
        (prompt(14, 1), 3, sampled(30, 1)),
        (prompt(9, 2), 2, nucleus),
        (prompt(20, 3), 2, greedy(30)),
    ];
    let run = |mut e: Engine| {
        for (p, g, params) in &work {
            e.add_group(p.clone(), *g, params.clone()).unwrap();
        }
        (e.run().unwrap(), e.stats())
    };
    let (want, want_stats) = run(Engine::new(&m, cfg).unwrap());
    let mut step = CandidateStep {
        cpu: CpuStep::new(&m),
        cap: 64,
        ids: Vec::new(),
        values: Vec::new(),
        max: Vec::new(),
        sum: Vec::new(),
        top_steps: 0,
        full_steps: 0,
    };
    let (got, stats) = run(Engine::with_model(Box::new(&mut step), cfg).unwrap());
    assert!(want_stats.preemptions > 0, "{want_stats:?}");
    assert_eq!(stats, want_stats);
    assert!(step.top_steps > 0 && step.full_steps > 0, "both paths ran");
    let mut worst = 0f32;
    for (o, w) in got.iter().zip(&want) {
        for (j, (s, t)) in o.samples.iter().zip(&w.samples).enumerate() {
            assert_eq!(s.ids, t.ids, "group {} sample {j}", o.id);
            for (a, b) in s.logprobs.iter().zip(&t.logprobs) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(worst <= 1e-5, "log-probabilities differ by {worst}");
    eprintln!(
        "{} steps on candidates, {} on full rows; largest |Δ log π| {worst:.1e}",
        step.top_steps, step.full_steps
    );
}

/// The CPU step as a one-rank prefill group: `prefill_shared` runs the rows as one step (what a
/// group of one computes), counting the calls and rows.
struct SoloPeers<'m> {
    step: CpuStep<'m>,
    calls: Vec<usize>,
    released: usize,
}

impl StepModel for SoloPeers<'_> {
    fn config(&self) -> &Qwen2Config {
        self.step.config()
    }

    fn new_pool(&mut self, layout: KvLayout) -> Result<BlockPool, RolloutError> {
        self.step.new_pool(layout)
    }

    fn forward_step(
        &mut self,
        pool: &mut BlockPool,
        steps: &[SeqStep],
        tables: &[&BlockTable],
    ) -> Result<&[f32], RolloutError> {
        self.step.forward_step(pool, steps, tables)
    }

    fn release_pool(&mut self) {
        self.released += 1;
    }

    fn prefill_peers(&self) -> Option<(usize, usize)> {
        Some((0, 1))
    }

    fn prepare_shared(&mut self, _rows: usize) -> Result<usize, RolloutError> {
        Ok(1 << 20)
    }

    fn gather_peers(&mut self, values: &[f32]) -> Result<Vec<f32>, RolloutError> {
        Ok(values.to_vec())
    }

    fn prefill_shared(
        &mut self,
        pool: &mut BlockPool,
        step: &SeqStep,
        table: &BlockTable,
    ) -> Result<(), RolloutError> {
        assert!(!step.logits && table.is_empty());
        let rows = match step.input {
            reel_model::decode::StepInput::Tokens(t) => t.len(),
            reel_model::decode::StepInput::Embeddings(e) => e.len() / self.config().hidden_size,
        };
        self.calls.push(rows);
        self.step
            .forward_step(pool, std::slice::from_ref(step), &[table])?;
        Ok(())
    }
}

#[test]
fn a_shared_prefill_leaves_the_engine_where_its_own_prefill_would() {
    let m = model();
    let mut peers = SoloPeers {
        step: CpuStep::new(&m),
        calls: Vec::new(),
        released: 0,
    };
    let work = [
        (prompt(20, 5), 3, greedy(6)),
        (prompt(1, 6), 2, greedy(4)),
        (prompt(31, 7), 4, sampled(8, 3)),
    ];
    let (out, stats) = {
        let mut e = Engine::with_model(Box::new(&mut peers), small()).unwrap();
        for (p, g, params) in &work {
            e.add_group_shared(&p.clone().into(), 0..*g, params.clone())
                .unwrap();
        }
        // A peer's prompt (no samples here): computed, then given back.
        let free = e.pool().free_blocks();
        let none = e.add_group_shared(&prompt(40, 8).into(), 0..0, greedy(4));
        assert_eq!(none.unwrap(), None);
        assert_eq!(e.pool().free_blocks(), free);
        // Nothing to generate: the prefilled table is given back with the group.
        let mut none = greedy(0);
        none.max_new_tokens = 0;
        e.add_group_shared(&prompt(9, 9).into(), 0..2, none)
            .unwrap();
        assert_eq!(e.pool().free_blocks(), free);
        let out = e.run().unwrap();
        assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
        (out, e.stats())
    };
    // Every prompt but the one-token one shared all its rows but the last; the engine let go of
    // its pool's memory when dropped.
    assert_eq!(peers.calls, vec![19, 30, 39, 8]);
    assert_eq!(peers.released, 1);
    // Counted as run: the finished-before-start group's 8 shared rows too (not a peer's).
    assert_eq!(stats.prefill_tokens, 20 + 1 + 31 + 8);
    for ((p, _, params), o) in work.iter().zip(&out) {
        for (j, s) in o.samples.iter().enumerate() {
            assert_eq!(
                s.ids,
                reference(&m, p, params, j),
                "group {} sample {j}",
                o.id
            );
        }
    }
    // Log-probabilities as the engine's own prefill gives them.
    let mut e = Engine::new(&m, small()).unwrap();
    for (p, g, params) in &work {
        e.add_group(p.clone(), *g, params.clone()).unwrap();
    }
    let own = e.run().unwrap();
    for (o, w) in out.iter().zip(&own) {
        for (s, t) in o.samples.iter().zip(&w.samples) {
            reel_tensor::check_close(
                "log-probs",
                &s.logprobs,
                &t.logprobs,
                Tolerance::new(1e-5, 1e-5),
            )
            .unwrap();
        }
    }
}

#[test]
fn a_shared_prefill_without_peers_or_room_is_refused_and_leaks_nothing() {
    let m = model();
    let mut e = Engine::new(&m, small()).unwrap();
    let err = e
        .add_group_shared(&prompt(20, 1).into(), 0..2, greedy(4))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefill peers"), "{err}");
    assert!(e
        .add_group_shared(&prompt(5, 1).into(), 0..0, greedy(4))
        .is_err());
    assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
    assert!(!e.has_work());
    let mut peers = SoloPeers {
        step: CpuStep::new(&m),
        calls: Vec::new(),
        released: 0,
    };
    let tiny = EngineConfig {
        num_blocks: 4,
        ..small()
    };
    let mut e = Engine::with_model(Box::new(&mut peers), tiny).unwrap();
    assert!(e
        .add_group_shared(&prompt(30, 1).into(), 0..1, greedy(2))
        .is_err());
    assert!(e
        .add_group_shared(&prompt(30, 1).into(), 0..0, greedy(2))
        .is_err());
    assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
    assert!(!e.has_work());
    // A bad request is refused before the prefill, on a peer without samples too (every peer
    // fails alike instead of leaving the others in the collective).
    let mut bad = greedy(2);
    bad.sampling.temperature = -1.0;
    for share in [0..1, 0..0] {
        let e2 = e.add_group_shared(&prompt(8, 1).into(), share, bad.clone());
        assert!(e2.is_err());
    }
    assert!(e
        .add_group_shared(&vec![9999u32; 5].into(), 0..0, greedy(2))
        .is_err());
    drop(e);
    assert!(peers.calls.is_empty(), "nothing reached the collective");
}

/// Peers that split a group's samples after a shared prefill give, put together in rank order,
/// the samples one engine gives the whole group (each seeded as its index in the whole group).
#[test]
fn peers_decoding_their_sample_shares_give_the_whole_groups_samples() {
    let m = model();
    let p = prompt(23, 4);
    let params = sampled(7, 11);
    let g = 5;
    for world in [2, 3, 7] {
        let mut got = Vec::new();
        let mut first_prefill = Vec::new();
        for r in 0..world {
            let mut peers = SoloPeers {
                step: CpuStep::new(&m),
                calls: Vec::new(),
                released: 0,
            };
            let share = reel_rollout::sample_share(g, world, r);
            let mut e = Engine::with_model(Box::new(&mut peers), small()).unwrap();
            let id = e
                .add_group_shared(&p.clone().into(), share.clone(), params.clone())
                .unwrap();
            if share.is_empty() {
                assert_eq!(id, None);
                assert!(e.run().unwrap().is_empty());
                continue;
            }
            let out = e.run().unwrap();
            assert_eq!(out[0].samples.len(), share.len());
            got.extend(out[0].samples.iter().map(|s| s.ids.clone()));
            first_prefill.push(e.stats().prefill_tokens);
        }
        let want: Vec<Vec<u32>> = (0..g).map(|j| reference(&m, &p, &params, j)).collect();
        assert_eq!(got, want, "world {world}");
        // The shared rows count on the peer of sample 0 only; each peer runs the last token.
        assert_eq!(first_prefill[0], 23);
        assert!(
            first_prefill[1..].iter().all(|&n| n == 1),
            "{first_prefill:?}"
        );
    }
}

/// The CPU reference of the shared prefill (`CpuPeerStep` over in-process ranks, each its own
/// engine and pool): world 1–4, one segment or several, a rank without rows (a 3-token prompt at
/// world ≥ 3), a 1-token prompt (nothing shared), the samples on rank 0 or split over the ranks:
/// every token and log-probability as one engine's own prefill gives them, every pool empty,
/// and each rank's all-gathers moving `exchange_bytes`' bytes.
#[test]
fn a_prefill_shared_over_cpu_peers_continues_as_one_engines_own() {
    use reel_comm::{Communicator, InProcess};
    use reel_rollout::shared_prefill::{agreement_bytes, exchange_bytes, CpuPeerStep};
    use std::time::Duration;
    let m = model();
    let work: Vec<(Prompt, usize, GenerationParams)> = vec![
        (prompt(41, 1).into(), 3, greedy(6)),
        (prompt(3, 2).into(), 2, sampled(5, 4)),
        (prompt(1, 3).into(), 2, greedy(3)),
        (prompt(26, 4).into(), 5, sampled(6, 9)),
    ];
    let want = {
        let mut e = Engine::new(&m, small()).unwrap();
        for (p, g, params) in &work {
            e.add_group(p.clone(), *g, params.clone()).unwrap();
        }
        e.run().unwrap()
    };
    for world in 1..=4 {
        for (rows, split) in [(1000, false), (4, false), (3, true), (1000, true)] {
            let per_rank = InProcess::spawn(world, Duration::from_secs(30), |comm| {
                let r = comm.rank();
                let mut step = CpuPeerStep::new(&m, &comm, rows);
                let mut e = Engine::with_model(Box::new(&mut step), small())?;
                let mut ids = Vec::new();
                for (p, g, params) in &work {
                    let share = match split {
                        true => reel_rollout::sample_share(*g, world, r),
                        false if r == 0 => 0..*g,
                        false => 0..0,
                    };
                    ids.push(e.add_group_shared(p, share, params.clone())?);
                }
                let mut out = e.run()?;
                assert_eq!(e.pool().free_blocks(), e.pool().total_blocks(), "rank {r}");
                // Every all-gather was a shared prefill's, each moving the formula's bytes, or
                // its agreement's, one vote from every other peer.
                let c = &m.config;
                let kv = (c.num_key_value_heads * c.head_dim, c.num_hidden_layers, 4);
                let vote = agreement_bytes(world);
                let (bytes, calls) = work
                    .iter()
                    .map(|(p, _, _)| exchange_bytes(p.ids.len() - 1, world, rows, kv))
                    .fold((0, 0), |a, b| (a.0 + b.0 + vote, a.1 + b.1 + 1));
                let st = comm.stats().all_gather;
                assert_eq!((st.bytes_recv, st.calls), (bytes, calls), "rank {r}");
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
                Ok::<_, RolloutError>(samples)
            });
            let mut merged = vec![Vec::new(); work.len()];
            for r in per_rank {
                for (k, s) in r.unwrap().into_iter().enumerate() {
                    merged[k].extend(s);
                }
            }
            for (k, (got, w)) in merged.iter().zip(&want).enumerate() {
                let at = format!("world {world}, {rows} rows a rank, split {split}: group {k}");
                assert_eq!(got.len(), w.samples.len(), "{at}");
                for (j, (s, t)) in got.iter().zip(&w.samples).enumerate() {
                    assert_eq!(s.ids, t.ids, "{at} sample {j}");
                    reel_tensor::check_close(
                        &format!("{at} sample {j}"),
                        &s.logprobs,
                        &t.logprobs,
                        Tolerance::new(1e-5, 1e-5),
                    )
                    .unwrap();
                }
            }
        }
    }
}

/// A peer that cannot take part in a shared prefill — no room in its pool, a request its checks
/// refuse, a different segment size or prompt — fails every peer at once through the agreement,
/// each error naming that peer (not a collective timeout: the ranks' timeout here is far longer
/// than the test), and nothing leaks: afterwards the same engines prefill a prompt together as
/// if nothing had happened.
#[test]
fn a_peer_that_cannot_take_part_fails_every_peer_at_once_and_the_peers_go_on() {
    use reel_comm::{Communicator, InProcess};
    use reel_rollout::shared_prefill::CpuPeerStep;
    use std::time::Duration;
    let m = model();
    let long: Prompt = prompt(41, 1).into();
    let fits: Prompt = prompt(9, 2).into();
    let want = reference(&m, &prompt(9, 2), &greedy(4), 0);
    // (world, the odd rank, what is odd about it)
    let cases = [
        (2, 1, "room"),
        (3, 2, "room"),
        (3, 0, "request"),
        (2, 1, "segments"),
        (3, 1, "prompt"),
    ];
    for (world, odd, what) in cases {
        let per_rank = InProcess::spawn(world, Duration::from_secs(600), |comm| {
            let r = comm.rank();
            let is_odd = r == odd;
            let rows = if is_odd && what == "segments" { 5 } else { 4 };
            let mut step = CpuPeerStep::new(&m, &comm, rows);
            // 40 rows need 14 blocks of 3; the odd peer's pool holds 8.
            let cfg = match is_odd && what == "room" {
                true => EngineConfig {
                    num_blocks: 8,
                    ..small()
                },
                false => small(),
            };
            let mut e = Engine::with_model(Box::new(&mut step), cfg)?;
            let mut params = greedy(4);
            if is_odd && what == "request" {
                params.sampling.temperature = -1.0;
            }
            let p = match is_odd && what == "prompt" {
                true => prompt(41, 3).into(),
                false => long.clone(),
            };
            let share = reel_rollout::sample_share(2, world, r);
            let refused = e
                .add_group_shared(&p, share, params)
                .expect_err("every peer refuses")
                .to_string();
            assert_eq!(e.pool().free_blocks(), e.pool().total_blocks(), "rank {r}");
            assert!(!e.has_work());
            // In step again: a prompt that fits every pool, its one sample on rank 0.
            let share = if r == 0 { 0..1 } else { 0..0 };
            let rows = match what {
                // The odd segment size would disagree again.
                "segments" => None,
                _ => Some(e.add_group_shared(&fits, share, greedy(4))?),
            };
            let out = e.run()?;
            Ok::<_, RolloutError>((refused, rows, out))
        });
        let at = format!("world {world}, rank {odd}'s {what}");
        for (r, got) in per_rank.into_iter().enumerate() {
            let (refused, again, out) = got.unwrap_or_else(|e| panic!("{at}: rank {r}: {e}"));
            let who = format!("peer {odd}");
            let ok = match what {
                "room" => refused.contains(&format!("{who}: no room in its KV pool")),
                "request" => refused.contains(&format!("{who}: the request failed its checks")),
                _ => refused.contains("disagree") && refused.contains(&format!("{who}: ")),
            };
            assert!(ok, "{at}: rank {r} said: {refused}");
            assert!(!refused.contains("timed out"), "{at}: {refused}");
            // The refusing peer adds its own reason in full.
            if r == odd && what == "room" {
                assert!(
                    refused.contains("here: KV block pool exhausted"),
                    "{refused}"
                );
            }
            if what == "segments" {
                continue;
            }
            match r {
                0 => {
                    assert!(again.unwrap().is_some());
                    assert_eq!(out[0].samples[0].ids, want, "{at}");
                }
                _ => assert!(again.unwrap().is_none() && out.is_empty(), "{at}"),
            }
        }
    }
}

/// A group whose prompt was prefilled with the peers is preempted last: when the pool runs out
/// the engine gives back an older group of its own instead of recomputing alone what the peers
/// computed together — unless every resident group is shared. The outputs never change.
#[test]
fn shared_groups_are_preempted_only_when_every_resident_group_is_shared() {
    let m = model();
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 32, // each group fits alone, not two together
        max_step_tokens: 64,
        max_step_seqs: 64,
    };
    let own = (prompt(14, 1), 3, sampled(30, 1));
    let shared = (prompt(20, 3), 2, sampled(30, 3));
    let mut peers = SoloPeers {
        step: CpuStep::new(&m),
        calls: Vec::new(),
        released: 0,
    };
    let stats = {
        let mut e = Engine::with_model(Box::new(&mut peers), cfg).unwrap();
        // The engine's own group is admitted first, so the shared one is the younger.
        e.add_group(own.0.clone(), own.1, own.2.clone()).unwrap();
        e.step().unwrap();
        e.add_group_shared(&shared.0.clone().into(), 0..shared.1, shared.2.clone())
            .unwrap();
        let out = e.run().unwrap();
        assert_generates_alone(&m, &out, &[own.clone(), shared.clone()]);
        assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
        e.stats()
    };
    assert!(stats.preemptions > 0, "{stats:?}");
    assert_eq!(stats.shared_preemptions, 0, "{stats:?}");
    // Every resident group shared: one of them is preempted after all, and recomputed alone.
    let second = (prompt(16, 4), 3, sampled(30, 4));
    let stats = {
        let mut e = Engine::with_model(Box::new(&mut peers), cfg).unwrap();
        for (p, g, params) in [&shared, &second] {
            e.add_group_shared(&p.clone().into(), 0..*g, params.clone())
                .unwrap();
        }
        let out = e.run().unwrap();
        assert_generates_alone(&m, &out, &[shared.clone(), second.clone()]);
        e.stats()
    };
    assert!(stats.shared_preemptions > 0, "{stats:?}");
    assert!(stats.shared_preemptions <= stats.preemptions, "{stats:?}");
}

/// A peer that is gone (its process died before the shared prefill) fails the others at the
/// agreement within the communicator's timeout, naming the cause, and their pools keep nothing.
#[test]
fn a_peer_gone_before_the_shared_prefill_fails_the_others_within_the_timeout() {
    use reel_comm::{Communicator, InProcess};
    use reel_rollout::shared_prefill::CpuPeerStep;
    use std::time::{Duration, Instant};
    let m = model();
    let long: Prompt = prompt(41, 1).into();
    let t0 = Instant::now();
    let per_rank = InProcess::spawn(3, Duration::from_millis(300), |comm| {
        if comm.rank() == 2 {
            return Ok(None); // gone
        }
        let mut step = CpuPeerStep::new(&m, &comm, 4);
        let mut e = Engine::with_model(Box::new(&mut step), small())?;
        let err = e
            .add_group_shared(&long, 0..1, greedy(3))
            .expect_err("a peer is gone")
            .to_string();
        assert_eq!(e.pool().free_blocks(), e.pool().total_blocks());
        assert!(!e.has_work());
        Ok::<_, RolloutError>(Some(err))
    });
    let waited = t0.elapsed();
    for (r, got) in per_rank.into_iter().enumerate().take(2) {
        let err = got.unwrap().expect("ranks 0 and 1 ran");
        eprintln!("rank {r}: {err}");
        assert!(
            err.contains("rank 2") || err.contains("timed out"),
            "rank {r}: {err}"
        );
    }
    assert!(waited < Duration::from_secs(30), "{waited:?}");
}
