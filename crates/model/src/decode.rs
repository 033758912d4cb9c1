//! Incremental decoding over a batch of sequences of different lengths (continuous batching).
//!
//! One step runs, for each sequence s, n_s new tokens after the tokens its key/value store
//! already holds: a prompt chunk (prefill) or one generated token (decode). The new tokens of all
//! sequences are stacked into N = Σ n_s rows, so every projection and MLP GEMM of a layer is one
//! call over [N, d]; only attention is per sequence, through a [`KvStore`] that keeps the rotated
//! keys and values (a contiguous single-sequence cache, [`crate::generate::KvCache`], or the
//! rollout engine's paged block pool):
//!
//!   x [N, d] = embed(tokens) or the caller's input embeddings (a VLM's video rows)
//!   per layer: q [N, H, D], k/v [N, H_kv, D] = rope(qkv(rmsnorm(x)), positions)
//!              kv.write(k, v);  attn [N, H, D], lse [N, H] = kv.attend(q)   (causal, GQA)
//!              x = mlp(x + attn·W_oᵀ)
//!   logits [S_l, V] = lm_head(rmsnorm(x)) at the last row of each sequence that asks for them.
//!
//! Positions are per sequence: consecutive 1-D positions, or 3-D multimodal rotary positions
//! (M-RoPE, Qwen2-VL, Wang et al. 2024: the D/2 rotary frequencies are split into temporal,
//! height and width sections, each turned by its own position component).

use crate::model::{Dims, LayerActs, Qwen2};
use crate::vl::mrope_angles;
use crate::ModelError;
use reel_kernels::embedding::embedding_forward;
use reel_kernels::matmul::matmul_forward;
use reel_kernels::rmsnorm::rmsnorm_forward;
use reel_kernels::rope::{rope_forward, rope_forward_angles};
use std::ops::Range;

/// Why a key/value store failed (its capacity was not reserved, a device error, …).
pub type KvError = Box<dyn std::error::Error + Send + Sync>;

/// Query heads H, key/value heads H_kv and head dimension D of a step's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
}

/// Keys and values of the sequences of one step. Sequence `s` of the step owns rows `rows[s]`
/// of the step's stacked tensors; its new tokens come right after what the store already holds
/// for it. The caller commits the new length once the whole step succeeded.
pub trait KvStore {
    /// Stores layer `layer`'s rotated keys and values of the new tokens, k/v [N, H_kv, D].
    fn write(
        &mut self,
        layer: usize,
        rows: &[Range<usize>],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError>;

    /// Causal attention of the new tokens' queries q [N, H, D] over each sequence's stored keys
    /// and values (earlier tokens and this step's, written by [`KvStore::write`]): query i of
    /// sequence s sees its keys 0..=past_s + i. Overwrites out [N, H, D] and lse [N, H].
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        rows: &[Range<usize>],
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        heads: HeadShape,
    ) -> Result<(), KvError>;
}

/// What a sequence feeds in this step.
#[derive(Clone, Copy, Debug)]
pub enum StepInput<'a> {
    /// Token ids [n], looked up in the embedding table.
    Tokens(&'a [u32]),
    /// Input embeddings [n, d] given by the caller (e.g. a VLM prompt with video rows).
    Embeddings(&'a [f32]),
}

/// Rotary positions of a sequence's new tokens.
#[derive(Clone, Copy, Debug)]
pub enum StepPositions<'a> {
    /// start, start + 1, …, start + n − 1.
    Linear { start: usize },
    /// Multimodal rotary positions [n] of (temporal, height, width); `sections` split the D/2
    /// rotary frequencies (in order) among the three components and must sum to D/2. When the
    /// three components are equal this is ordinary 1-D RoPE.
    MRope {
        ids: &'a [[u32; 3]],
        sections: [usize; 3],
    },
}

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    pub input: StepInput<'a>,
    pub positions: StepPositions<'a>,
    /// Whether the logits of this sequence's last new token are wanted (the end of a prompt, a
    /// decoded token); prompt chunks before the last need none.
    pub logits: bool,
}

/// Buffers of a decoding step, grown to the largest step seen and reused.
#[derive(Default)]
pub struct DecodeScratch {
    acts: LayerActs,
    qkv: Vec<f32>,
    x: [Vec<f32>; 2],
    rows: Vec<Range<usize>>,
    positions: Vec<u32>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    last: Vec<f32>,
    last_n: Vec<f32>,
    rstd: Vec<f32>,
    logits: Vec<f32>,
}

impl SeqStep<'_> {
    fn len(&self, d: usize) -> usize {
        match self.input {
            StepInput::Tokens(t) => t.len(),
            StepInput::Embeddings(e) => e.len() / d.max(1),
        }
    }
}

impl Qwen2 {
    /// Checks one step's inputs before any kernel runs; returns each sequence's rows.
    fn check_step(&self, seqs: &[SeqStep], rows: &mut Vec<Range<usize>>) -> Result<(), ModelError> {
        let c = &self.config;
        let (d, v, max_pos) = (c.hidden_size, c.vocab_size, c.max_position_embeddings);
        rows.clear();
        let mut at = 0;
        for (s, seq) in seqs.iter().enumerate() {
            let n = seq.len(d);
            match seq.input {
                StepInput::Tokens(t) => {
                    if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
                        return Err(ModelError::Invalid(format!(
                            "sequence {s} of the step: token id {bad} is outside the vocabulary ({v})"
                        )));
                    }
                }
                StepInput::Embeddings(e) => {
                    if !e.len().is_multiple_of(d) {
                        return Err(ModelError::Invalid(format!(
                            "sequence {s} of the step: {} input-embedding values are not rows of \
                             hidden_size {d}",
                            e.len()
                        )));
                    }
                }
            }
            if n == 0 {
                return Err(ModelError::Invalid(format!(
                    "sequence {s} of the step has no new tokens"
                )));
            }
            match seq.positions {
                StepPositions::Linear { start } => {
                    if start + n > max_pos {
                        return Err(ModelError::Invalid(format!(
                            "sequence {s} of the step reaches position {} but \
                             max_position_embeddings is {max_pos}",
                            start + n - 1
                        )));
                    }
                }
                StepPositions::MRope { ids, sections } => {
                    if ids.len() != n {
                        return Err(ModelError::Invalid(format!(
                            "sequence {s} of the step has {n} new tokens but {} M-RoPE positions",
                            ids.len()
                        )));
                    }
                    if sections.iter().sum::<usize>() != c.head_dim / 2 {
                        return Err(ModelError::Invalid(format!(
                            "M-RoPE sections {sections:?} must sum to head_dim / 2 = {}",
                            c.head_dim / 2
                        )));
                    }
                    if let Some(p) = ids.iter().flatten().find(|&&p| p as usize >= max_pos) {
                        return Err(ModelError::Invalid(format!(
                            "sequence {s} of the step: M-RoPE position {p} exceeds \
                             max_position_embeddings ({max_pos})"
                        )));
                    }
                }
            }
            rows.push(at..at + n);
            at += n;
        }
        if at == 0 {
            return Err(ModelError::Invalid(
                "a decoding step needs sequences".into(),
            ));
        }
        Ok(())
    }

    /// Runs one step of incremental decoding (module docs) and returns the logits [S_l, V] of
    /// the sequences with `logits: true`, in their order. `kv` must already have room for each
    /// sequence's new tokens; the caller commits the new lengths after success.
    pub fn forward_step<'s>(
        &self,
        scratch: &'s mut DecodeScratch,
        seqs: &[SeqStep],
        kv: &mut dyn KvStore,
    ) -> Result<&'s [f32], ModelError> {
        self.check_step(seqs, &mut scratch.rows)?;
        let sc = scratch;
        let n = sc.rows.last().map_or(0, |r| r.end);
        let m = Dims::new(&self.config, 1, n);
        let d = m.d;
        sc.acts.resize(&m);
        sc.qkv.resize(n * (m.q_width() + 2 * m.kv_width()), 0.0);
        for x in &mut sc.x {
            x.resize(n * d, 0.0);
        }
        sc.positions.clear();
        let embed = &self.params[self.layout.embed.clone()];
        for (seq, r) in seqs.iter().zip(&sc.rows) {
            let x = &mut sc.x[0][r.start * d..r.end * d];
            match seq.input {
                StepInput::Tokens(t) => embedding_forward(x, t, embed, d),
                StepInput::Embeddings(e) => x.copy_from_slice(e),
            }
            match seq.positions {
                StepPositions::Linear { start } => {
                    sc.positions.extend(start as u32..(start + r.len()) as u32)
                }
                // Placeholder; these rows are rotated by M-RoPE angles (`vl::mrope_angles`).
                StepPositions::MRope { ids, .. } => sc.positions.extend(ids.iter().map(|p| p[0])),
            }
        }
        let heads = HeadShape {
            h: m.h,
            h_kv: m.h_kv,
            d: m.hd,
        };
        for l in 0..self.config.num_hidden_layers {
            let w = self.layer_weights(l);
            let [x_in, x_out] = &mut sc.x;
            let a = &mut sc.acts;
            self.qkv_project(&w, a, &mut sc.qkv, x_in, &m);
            self.rope_step(
                seqs,
                &sc.rows,
                &sc.positions,
                a,
                (&mut sc.rope_cos, &mut sc.rope_sin),
            );
            kv.write(l, &sc.rows, &a.k, &a.v).map_err(ModelError::Kv)?;
            kv.attend(l, &sc.rows, &mut a.attn, &mut a.lse, &a.q, heads)
                .map_err(ModelError::Kv)?;
            self.post_attention_forward(&w, a, x_in, x_out, &m);
            sc.x.swap(0, 1);
        }
        sc.last.clear();
        for (seq, r) in seqs.iter().zip(&sc.rows) {
            if seq.logits {
                sc.last
                    .extend_from_slice(&sc.x[0][(r.end - 1) * d..r.end * d]);
            }
        }
        let n_l = sc.last.len() / d;
        sc.last_n.resize(n_l * d, 0.0);
        sc.rstd.resize(n_l, 0.0);
        sc.logits.resize(n_l * m.v, 0.0);
        if n_l > 0 {
            rmsnorm_forward(
                &mut sc.last_n,
                &mut sc.rstd,
                &sc.last,
                &self.params[self.layout.final_norm.clone()],
                n_l,
                d,
                self.config.rms_norm_eps,
            );
            matmul_forward(
                &mut sc.logits,
                &sc.last_n,
                &self.params[self.layout.lm_head.clone()],
                None,
                n_l,
                d,
                m.v,
            );
        }
        Ok(&sc.logits)
    }

    /// Rotates q and k of every row: runs of 1-D sequences in one kernel call each, M-RoPE
    /// sequences by per-token angles from [`crate::vl::mrope_angles`] (the one M-RoPE).
    fn rope_step(
        &self,
        seqs: &[SeqStep],
        rows: &[Range<usize>],
        positions: &[u32],
        a: &mut LayerActs,
        (cos, sin): (&mut Vec<f32>, &mut Vec<f32>),
    ) {
        let (h, h_kv, hd) = (
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
            self.config.head_dim,
        );
        let mut run_start = 0;
        let flush = |a: &mut LayerActs, run: Range<usize>| {
            if !run.is_empty() {
                let p = &positions[run.clone()];
                rope_forward(
                    &mut a.q[run.start * h * hd..run.end * h * hd],
                    p,
                    &self.rope,
                    h,
                );
                let k = &mut a.k[run.start * h_kv * hd..run.end * h_kv * hd];
                rope_forward(k, p, &self.rope, h_kv);
            }
        };
        for (seq, r) in seqs.iter().zip(rows) {
            if let StepPositions::MRope { ids, sections } = seq.positions {
                flush(a, run_start..r.start);
                run_start = r.end;
                mrope_angles(&self.rope, sections, ids.len(), |k, c| ids[k][c], cos, sin);
                let q = &mut a.q[r.start * h * hd..r.end * h * hd];
                rope_forward_angles(q, cos, sin, h, hd);
                let k = &mut a.k[r.start * h_kv * hd..r.end * h_kv * hd];
                rope_forward_angles(k, cos, sin, h_kv, hd);
            }
        }
        flush(a, run_start..rows.last().map_or(0, |r| r.end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalAttention, Qwen2Config, Workspace};
    use reel_kernels::attention::{attention_forward, AttnMask, AttnShape};
    use reel_kernels::rope::RopeTable;
    use reel_tensor::{check_close, Tolerance};

    /// Each sequence's keys and values in its own growing buffers, [len, H_kv, D] per layer.
    struct VecKv {
        k: Vec<Vec<Vec<f32>>>,
        v: Vec<Vec<Vec<f32>>>,
        len: Vec<usize>,
        w: usize,
    }

    impl KvStore for VecKv {
        fn write(
            &mut self,
            layer: usize,
            rows: &[Range<usize>],
            k: &[f32],
            v: &[f32],
        ) -> Result<(), KvError> {
            for (s, r) in rows.iter().enumerate() {
                let w = self.w;
                self.k[s][layer].truncate(self.len[s] * w);
                self.v[s][layer].truncate(self.len[s] * w);
                self.k[s][layer].extend_from_slice(&k[r.start * w..r.end * w]);
                self.v[s][layer].extend_from_slice(&v[r.start * w..r.end * w]);
            }
            Ok(())
        }

        fn attend(
            &self,
            layer: usize,
            rows: &[Range<usize>],
            out: &mut [f32],
            lse: &mut [f32],
            q: &[f32],
            heads: HeadShape,
        ) -> Result<(), KvError> {
            let (h, d) = (heads.h, heads.d);
            for (s, r) in rows.iter().enumerate() {
                let shape = AttnShape {
                    b: 1,
                    tq: r.len(),
                    tk: self.len[s] + r.len(),
                    h,
                    h_kv: heads.h_kv,
                    d,
                };
                attention_forward(
                    &mut out[r.start * h * d..r.end * h * d],
                    &mut lse[r.start * h..r.end * h],
                    &q[r.start * h * d..r.end * h * d],
                    &self.k[s][layer],
                    &self.v[s][layer],
                    shape,
                    AttnMask::Causal {
                        q_offset: self.len[s],
                        k_offset: 0,
                    },
                );
            }
            Ok(())
        }
    }

    #[test]
    fn a_batched_step_of_sequences_at_different_lengths_matches_the_full_forward() {
        let model = Qwen2::new_random(Qwen2Config::tiny(97), 5).unwrap();
        let c = &model.config;
        let seqs: Vec<Vec<u32>> = [9usize, 4, 15]
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                (0..n as u32)
                    .map(|i| (i * 7 + s as u32 * 13) % 97)
                    .collect()
            })
            .collect();
        let mut kv = VecKv {
            k: vec![vec![Vec::new(); c.num_hidden_layers]; 3],
            v: vec![vec![Vec::new(); c.num_hidden_layers]; 3],
            len: vec![0; 3],
            w: c.num_key_value_heads * c.head_dim,
        };
        let mut scratch = DecodeScratch::default();
        // Step 1: prompt chunks of different lengths (the first without logits); step 2: the
        // rest of each sequence, one token for two of them (decode) and a chunk for the third.
        let cuts = [[5usize, 9], [3, 4], [14, 15]];
        let mut got = vec![Vec::new(); 3];
        for step in 0..2 {
            let steps: Vec<SeqStep> = (0..3)
                .map(|s| {
                    let lo = if step == 0 { 0 } else { cuts[s][0] };
                    SeqStep {
                        input: StepInput::Tokens(&seqs[s][lo..cuts[s][step]]),
                        positions: StepPositions::Linear { start: lo },
                        logits: step == 1 || s > 0,
                    }
                })
                .collect();
            let logits = model.forward_step(&mut scratch, &steps, &mut kv).unwrap();
            let want: Vec<usize> = (0..3).filter(|&s| steps[s].logits).collect();
            assert_eq!(logits.len(), want.len() * c.vocab_size);
            for (row, &s) in logits.chunks(c.vocab_size).zip(&want) {
                got[s].push((cuts[s][step] - 1, row.to_vec()));
            }
            for (len, cut) in kv.len.iter_mut().zip(&cuts) {
                *len = cut[step];
            }
        }
        for (s, seq) in seqs.iter().enumerate() {
            let t = seq.len();
            let mut ws = Workspace::new(c, crate::CheckpointPolicy::None);
            let pos: Vec<u32> = (0..t as u32).collect();
            let full = model
                .logits(&mut ws, seq, &pos, 1, t, &LocalAttention)
                .unwrap();
            for (at, row) in &got[s] {
                let want = &full[at * c.vocab_size..(at + 1) * c.vocab_size];
                check_close(
                    &format!("sequence {s} position {at}"),
                    row,
                    want,
                    Tolerance::new(1e-5, 1e-4),
                )
                .unwrap();
            }
        }
        // Bad steps are refused before any kernel runs.
        let bad = [SeqStep {
            input: StepInput::Tokens(&[1, 200]),
            positions: StepPositions::Linear { start: 0 },
            logits: true,
        }];
        let err = model.forward_step(&mut scratch, &bad, &mut kv).unwrap_err();
        assert!(err.to_string().contains("200"), "{err}");
        let far = [SeqStep {
            input: StepInput::Tokens(&[1]),
            positions: StepPositions::Linear { start: 1024 },
            logits: true,
        }];
        assert!(model.forward_step(&mut scratch, &far, &mut kv).is_err());
    }

    /// Rotates x [n, heads, D] by the one M-RoPE (angles from `vl::mrope_angles`).
    fn mrope(x: &mut [f32], ids: &[[u32; 3]], table: &RopeTable, heads: usize, sec: [usize; 3]) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        mrope_angles(table, sec, ids.len(), |k, c| ids[k][c], &mut cos, &mut sin);
        rope_forward_angles(x, &cos, &sin, heads, table.head_dim());
    }

    #[test]
    fn mrope_with_equal_components_is_rope_and_sections_pick_their_component() {
        let table = RopeTable::new(8, 64, 10000.0);
        let mut rng = reel_tensor::rng(3);
        let (n, heads) = (5, 3);
        let x0 = reel_tensor::uniform_vec(&mut rng, n * heads * 8, 1.0);
        let pos: Vec<u32> = vec![0, 7, 3, 40, 63];
        let ids: Vec<[u32; 3]> = pos.iter().map(|&p| [p, p, p]).collect();
        let mut a = x0.clone();
        rope_forward(&mut a, &pos, &table, heads);
        let mut b = x0.clone();
        mrope(&mut b, &ids, &table, heads, [1, 2, 1]);
        check_close("mrope = rope", &b, &a, Tolerance::new(1e-6, 1e-6)).unwrap();

        // Section 0 (frequency 0) follows component 0, frequencies 1–2 component 1, 3 component 2.
        let ids: Vec<[u32; 3]> = pos.iter().map(|&p| [p, 0, 0]).collect();
        let mut c = x0.clone();
        mrope(&mut c, &ids, &table, heads, [1, 2, 1]);
        for (row, (ra, (rc, r0))) in a.chunks(8).zip(c.chunks(8).zip(x0.chunks(8))).enumerate() {
            for j in [0usize, 4] {
                assert!((rc[j] - ra[j]).abs() < 1e-6, "row {row} element {j}");
            }
            for j in [1usize, 2, 3, 5, 6, 7] {
                assert_eq!(
                    rc[j], r0[j],
                    "row {row} element {j} (position 0 = identity)"
                );
            }
        }
    }

    /// A VLM prompt (video rows as input embeddings, M-RoPE positions) prefilled through the
    /// decoding step gives, at its last position, the logits of the training forward
    /// (`Qwen25VL::logits`) on the golden Qwen2.5-VL fixture.
    #[test]
    fn vlm_prefill_through_the_step_matches_the_training_forward() {
        use crate::vl::{load_vl_checkpoint, VideoBatch, VlBatch};
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2_5_vl-tiny");
        let model = load_vl_checkpoint(&dir).unwrap();
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let words = |name: &str| -> (Vec<usize>, Vec<[u8; 4]>) {
            let t = st.tensor(name).unwrap();
            let w = t.data().chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
            (t.shape().to_vec(), w.collect())
        };
        let (shape, ids) = words("input_ids");
        let tokens: Vec<u32> = ids.iter().map(|w| i32::from_le_bytes(*w) as u32).collect();
        let (b, t) = (shape[0], shape[1]);
        let grids: Vec<crate::VideoGrid> = words("video_grid_thw")
            .1
            .chunks(3)
            .map(|x| crate::VideoGrid {
                t: i32::from_le_bytes(x[0]) as usize,
                h: i32::from_le_bytes(x[1]) as usize,
                w: i32::from_le_bytes(x[2]) as usize,
            })
            .collect();
        let f32s = |name: &str| -> Vec<f32> {
            words(name).1.into_iter().map(f32::from_le_bytes).collect()
        };
        let (pixels, seconds) = (f32s("pixel_values_videos"), f32s("second_per_grid_ts"));
        let targets = vec![-100i32; b * t];
        let batch = VlBatch {
            tokens: &tokens,
            targets: &targets,
            b,
            t,
            videos: VideoBatch {
                pixels: &pixels,
                grids: &grids,
                second_per_grid_ts: &seconds,
            },
        };
        let mut ws = model.workspace(crate::CheckpointPolicy::None);
        let full = model.logits(&mut ws, &batch, &LocalAttention).unwrap();
        let (embeds, _, _) = crate::Qwen25VL::prepared(&ws);
        let positions = ws.positions.clone();
        let d = model.config.text.hidden_size;
        let v = model.config.text.vocab_size;
        let n = b * t;
        let ids3: Vec<[u32; 3]> = (0..n)
            .map(|k| [positions[k], positions[n + k], positions[2 * n + k]])
            .collect();
        // All B prompts in one step (prefill of each, batched), then each alone.
        let c = &model.config.text;
        let mut kv = VecKv {
            k: vec![vec![Vec::new(); c.num_hidden_layers]; b],
            v: vec![vec![Vec::new(); c.num_hidden_layers]; b],
            len: vec![0; b],
            w: c.num_key_value_heads * c.head_dim,
        };
        let seqs: Vec<SeqStep> = (0..b)
            .map(|r| SeqStep {
                input: StepInput::Embeddings(&embeds[r * t * d..(r + 1) * t * d]),
                positions: StepPositions::MRope {
                    ids: &ids3[r * t..(r + 1) * t],
                    sections: model.config.mrope_section,
                },
                logits: true,
            })
            .collect();
        let mut scratch = DecodeScratch::default();
        let got = model
            .lm
            .forward_step(&mut scratch, &seqs, &mut kv)
            .unwrap()
            .to_vec();
        for r in 0..b {
            let want = &full[((r + 1) * t - 1) * v..(r + 1) * t * v];
            check_close(
                &format!("last logits of sequence {r}"),
                &got[r * v..(r + 1) * v],
                want,
                Tolerance::new(2e-5, 1e-4),
            )
            .unwrap();
        }
    }
}
