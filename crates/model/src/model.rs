//! The Qwen2 decoder: explicit forward and backward over a batch of B sequences of T tokens.
//!
//! Per layer (N = B·T tokens, d hidden, H/H_kv heads of size D, I intermediate):
//!   xn1 = rmsnorm(x)            qkv = xn1·W_qkvᵀ + b_qkv   → q [N,H,D], k/v [N,H_kv,D]
//!   q, k = rope(q, k, positions) attn, lse = attention(q, k, v)
//!   h = x + attn·W_oᵀ           xn2 = rmsnorm(h)
//!   gu = xn2·W_guᵀ              act = silu(gate)·up        x' = h + act·W_downᵀ
//! then the final norm and the LM head fused with chunked cross-entropy.
//!
//! Activation checkpointing ([`CheckpointPolicy`]):
//! - `None` keeps every layer's activations;
//! - `Layer` keeps only each layer's input and recomputes the whole layer (attention included);
//! - `Remat` (LightSeq's rematerialization-aware checkpointing) keeps each layer's input, attention
//!   output and lse: the backward recomputes only the non-attention part and calls the attention
//!   backward directly, so attention runs forward once per layer per step.
//!
//! The decoder also runs from input embeddings with per-token rotary angles
//! ([`Qwen2::forward_embeds`], [`EmbedsBatch`], [`Rotary::Angles`]): a vision-language model puts
//! its vision features in the placeholder rows and rotates q/k with multimodal (M-RoPE) angles;
//! its backward returns the gradient of the input embeddings.

use crate::attention::AttentionOp;
use crate::config::Qwen2Config;
use crate::params::{LayerRanges, ParamLayout};
use crate::ModelError;
use reel_kernels::attention::AttnShape;
use reel_kernels::cross_entropy::{lm_head_ce_backward, lm_head_ce_forward};
use reel_kernels::embedding::{embedding_backward, embedding_forward};
use reel_kernels::matmul::{matmul_backward, matmul_forward};
use reel_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use reel_kernels::rope::{
    rope_backward, rope_backward_angles, rope_forward, rope_forward_angles, RopeTable,
};
use reel_kernels::swiglu::{swiglu_backward, swiglu_forward};
use std::ops::Range;

/// Vocabulary columns per chunk in the fused LM head + cross-entropy.
pub const CE_CHUNK: usize = 4096;

/// Which activations the forward keeps for the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointPolicy {
    /// Keep everything; no recomputation.
    None,
    /// Keep each layer's input; recompute the whole layer, attention included.
    Layer,
    /// Keep each layer's input, attention output and lse; recompute all but attention.
    #[default]
    Remat,
}

impl std::str::FromStr for CheckpointPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CheckpointPolicy::None),
            "layer" => Ok(CheckpointPolicy::Layer),
            "remat" => Ok(CheckpointPolicy::Remat),
            _ => Err(format!(
                "unknown checkpoint policy `{s}` (none, layer, remat)"
            )),
        }
    }
}

impl std::fmt::Display for CheckpointPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointPolicy::None => "none",
            CheckpointPolicy::Layer => "layer",
            CheckpointPolicy::Remat => "remat",
        })
    }
}

/// Tokens of one step: B sequences of T tokens, row-major.
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    pub tokens: &'a [u32],
    /// Next-token targets per position; negative = no loss.
    pub targets: &'a [i32],
    /// Position of each token (RoPE); global positions under sequence parallelism.
    pub positions: &'a [u32],
    pub b: usize,
    pub t: usize,
}

/// How q and k are rotated: by the RoPE table at one position per token, or by angles given per
/// token (cos, sin [B·T, D/2]; multimodal RoPE builds them from its 3-D positions).
#[derive(Clone, Copy, Debug)]
pub enum Rotary<'a> {
    Positions(&'a [u32]),
    Angles { cos: &'a [f32], sin: &'a [f32] },
}

/// B sequences of T tokens given as input embeddings [B·T, d] instead of token ids.
#[derive(Clone, Copy, Debug)]
pub struct EmbedsBatch<'a> {
    pub embeds: &'a [f32],
    /// Next-token targets per position; negative = no loss.
    pub targets: &'a [i32],
    pub rotary: Rotary<'a>,
    pub b: usize,
    pub t: usize,
}

/// Sum of token losses and the number of labelled tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    pub loss_sum: f64,
    pub n_tokens: usize,
}

impl LossStats {
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.n_tokens.max(1) as f64
    }
}

/// Model dimensions for N tokens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub n: usize,
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub h: usize,
    pub h_kv: usize,
    pub hd: usize,
    pub i: usize,
    pub v: usize,
}

impl Dims {
    pub(crate) fn new(c: &Qwen2Config, b: usize, t: usize) -> Self {
        Dims {
            n: b * t,
            b,
            t,
            d: c.hidden_size,
            h: c.num_attention_heads,
            h_kv: c.num_key_value_heads,
            hd: c.head_dim,
            i: c.intermediate_size,
            v: c.vocab_size,
        }
    }
    pub(crate) fn q_width(&self) -> usize {
        self.h * self.hd
    }
    pub(crate) fn kv_width(&self) -> usize {
        self.h_kv * self.hd
    }
    fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            tq: self.t,
            tk: self.t,
            h: self.h,
            h_kv: self.h_kv,
            d: self.hd,
        }
    }
}

/// One layer's activations (everything its backward reads).
#[derive(Default)]
pub(crate) struct LayerActs {
    pub rstd1: Vec<f32>,
    pub xn1: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub lse: Vec<f32>,
    pub h: Vec<f32>,
    pub rstd2: Vec<f32>,
    pub xn2: Vec<f32>,
    pub gate_up: Vec<f32>,
    pub act: Vec<f32>,
}

impl LayerActs {
    pub(crate) fn resize(&mut self, m: &Dims) {
        let n = m.n;
        self.rstd1.resize(n, 0.0);
        self.xn1.resize(n * m.d, 0.0);
        self.q.resize(n * m.q_width(), 0.0);
        self.k.resize(n * m.kv_width(), 0.0);
        self.v.resize(n * m.kv_width(), 0.0);
        self.attn.resize(n * m.q_width(), 0.0);
        self.lse.resize(n * m.h, 0.0);
        self.h.resize(n * m.d, 0.0);
        self.rstd2.resize(n, 0.0);
        self.xn2.resize(n * m.d, 0.0);
        self.gate_up.resize(n * 2 * m.i, 0.0);
        self.act.resize(n * m.i, 0.0);
    }

    fn bytes(&self) -> usize {
        4 * [
            &self.rstd1,
            &self.xn1,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.lse,
            &self.h,
            &self.rstd2,
            &self.xn2,
            &self.gate_up,
            &self.act,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
    }
}

/// Gradient scratch for one layer's backward.
#[derive(Default)]
struct BackwardScratch {
    dact: Vec<f32>,
    dgate_up: Vec<f32>,
    dxn: Vec<f32>,
    dh: Vec<f32>,
    dattn: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dqkv: Vec<f32>,
}

/// Every buffer a step needs, allocated at the first step and reused (resized within capacity)
/// afterwards, so steady-state steps do not allocate.
pub struct Workspace {
    policy: CheckpointPolicy,
    /// Residual stream entering each layer, and after the last one: L + 1 buffers [N, d].
    xs: Vec<Vec<f32>>,
    /// Per-layer activations (policy None) or one scratch layer (Layer, Remat).
    acts: Vec<LayerActs>,
    /// Per-layer attention output and lse (policy Remat).
    saved_attn: Vec<Vec<f32>>,
    saved_lse: Vec<Vec<f32>>,
    qkv: Vec<f32>,
    x_tmp: Vec<f32>,
    rstd_f: Vec<f32>,
    pub(crate) xn_f: Vec<f32>,
    /// Factor xn_f was multiplied by before the LM head (1/temperature when scoring a sampling
    /// temperature, else 1); the backward applies it to dxn_f.
    pub(crate) head_scale: f32,
    pub(crate) ce_losses: Vec<f32>,
    pub(crate) ce_lse: Vec<f32>,
    pub(crate) dloss: Vec<f32>,
    dxn_f: Vec<f32>,
    pub(crate) dx: [Vec<f32>; 2],
    bw: BackwardScratch,
    /// Dimensions of the batch the last forward ran on (the backward must see the same batch).
    last: Option<(usize, usize)>,
}

impl Workspace {
    pub fn new(config: &Qwen2Config, policy: CheckpointPolicy) -> Self {
        let layers = config.num_hidden_layers;
        let n_acts = match policy {
            CheckpointPolicy::None => layers,
            _ => 1,
        };
        let n_saved = match policy {
            CheckpointPolicy::Remat => layers,
            _ => 0,
        };
        Workspace {
            policy,
            xs: (0..=layers).map(|_| Vec::new()).collect(),
            acts: (0..n_acts).map(|_| LayerActs::default()).collect(),
            saved_attn: vec![Vec::new(); n_saved],
            saved_lse: vec![Vec::new(); n_saved],
            qkv: Vec::new(),
            x_tmp: Vec::new(),
            rstd_f: Vec::new(),
            xn_f: Vec::new(),
            head_scale: 1.0,
            ce_losses: Vec::new(),
            ce_lse: Vec::new(),
            dloss: Vec::new(),
            dxn_f: Vec::new(),
            dx: [Vec::new(), Vec::new()],
            bw: BackwardScratch::default(),
            last: None,
        }
    }

    pub fn policy(&self) -> CheckpointPolicy {
        self.policy
    }

    fn resize(&mut self, m: &Dims) {
        let nd = m.n * m.d;
        for x in &mut self.xs {
            x.resize(nd, 0.0);
        }
        for a in &mut self.acts {
            a.resize(m);
        }
        for a in &mut self.saved_attn {
            a.resize(m.n * m.q_width(), 0.0);
        }
        for l in &mut self.saved_lse {
            l.resize(m.n * m.h, 0.0);
        }
        self.qkv.resize(m.n * m.qkv_width(), 0.0);
        self.x_tmp.resize(nd, 0.0);
        self.rstd_f.resize(m.n, 0.0);
        self.xn_f.resize(nd, 0.0);
        self.ce_losses.resize(m.n, 0.0);
        self.ce_lse.resize(m.n, 0.0);
        self.dloss.resize(m.n, 0.0);
        self.dxn_f.resize(nd, 0.0);
        for d in &mut self.dx {
            d.resize(nd, 0.0);
        }
        let bw = &mut self.bw;
        bw.dact.resize(m.n * m.i, 0.0);
        bw.dgate_up.resize(m.n * 2 * m.i, 0.0);
        bw.dxn.resize(nd, 0.0);
        bw.dh.resize(nd, 0.0);
        bw.dattn.resize(m.n * m.q_width(), 0.0);
        bw.dq.resize(m.n * m.q_width(), 0.0);
        bw.dk.resize(m.n * m.kv_width(), 0.0);
        bw.dv.resize(m.n * m.kv_width(), 0.0);
        bw.dqkv.resize(m.n * m.qkv_width(), 0.0);
    }

    /// Bytes of activations kept from the forward for the backward (the part that depends on
    /// the checkpoint policy): residual streams, per-layer activations or saved attention
    /// outputs, and one recomputation scratch layer where the policy recomputes.
    pub fn saved_activation_bytes(&self) -> usize {
        let xs: usize = self.xs.iter().map(|x| 4 * x.len()).sum();
        let acts: usize = self.acts.iter().map(LayerActs::bytes).sum();
        let saved: usize = self
            .saved_attn
            .iter()
            .chain(&self.saved_lse)
            .map(|x| 4 * x.len())
            .sum();
        xs + acts + saved
    }
}

/// A Qwen2 decoder with its weights in one flat f32 buffer.
pub struct Qwen2 {
    pub config: Qwen2Config,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub(crate) rope: RopeTable,
}

/// Read-only views of one layer's weights.
pub(crate) struct LayerWeights<'a> {
    pub input_norm: &'a [f32],
    pub qkv_w: &'a [f32],
    pub qkv_b: &'a [f32],
    pub o_w: &'a [f32],
    pub post_norm: &'a [f32],
    pub gate_up_w: &'a [f32],
    pub down_w: &'a [f32],
}

pub(crate) fn two_mut(g: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "ranges must be ordered and disjoint");
    let (lo, hi) = g.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.end - b.start])
}

pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

impl Qwen2 {
    /// A model with the given weights; the length must match the config's layout.
    pub fn from_params(config: Qwen2Config, params: Vec<f32>) -> Result<Self, ModelError> {
        config
            .validate()
            .map_err(|msg| ModelError::Invalid(format!("config: {msg}")))?;
        let layout = ParamLayout::new(&config);
        if params.len() != layout.total() {
            return Err(ModelError::Invalid(format!(
                "parameter buffer has {} values, config needs {}",
                params.len(),
                layout.total()
            )));
        }
        let rope = RopeTable::new(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        );
        Ok(Qwen2 {
            config,
            layout,
            params,
            rope,
        })
    }

    /// Fresh weights: matrices ~ N(0, 0.02²) (the HF initializer), norms 1, biases 0.
    pub fn new_random(config: Qwen2Config, seed: u64) -> Result<Self, ModelError> {
        use rand::Rng;
        let layout = ParamLayout::new(&config);
        let mut params = vec![0.0f32; layout.total()];
        let mut rng = reel_tensor::rng(seed);
        for e in &layout.entries {
            let slot = &mut params[e.range.clone()];
            if e.name.ends_with("norm.weight") {
                slot.fill(1.0);
            } else if e.shape.len() >= 2 {
                for x in slot.iter_mut() {
                    // Box–Muller.
                    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                    let u2: f32 = rng.random_range(0.0..1.0);
                    *x = 0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                }
            }
        }
        Self::from_params(config, params)
    }

    pub(crate) fn layer_weights(&self, l: usize) -> LayerWeights<'_> {
        let r = &self.layout.layers[l];
        let p = &self.params;
        LayerWeights {
            input_norm: &p[r.input_norm.clone()],
            qkv_w: &p[r.qkv_w.clone()],
            qkv_b: &p[r.qkv_b.clone()],
            o_w: &p[r.o_w.clone()],
            post_norm: &p[r.post_norm.clone()],
            gate_up_w: &p[r.gate_up_w.clone()],
            down_w: &p[r.down_w.clone()],
        }
    }

    /// Checks a batch against the model before any kernel sees it.
    pub fn validate_batch(&self, batch: &TokenBatch) -> Result<(), ModelError> {
        let n = batch.b * batch.t;
        if batch.tokens.len() != n || batch.targets.len() != n || batch.positions.len() != n {
            return Err(ModelError::Invalid(format!(
                "batch of {}×{} needs {n} tokens, targets and positions; got {}, {}, {}",
                batch.b,
                batch.t,
                batch.tokens.len(),
                batch.targets.len(),
                batch.positions.len()
            )));
        }
        let v = self.config.vocab_size;
        if let Some((i, &tok)) = batch
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &x)| x as usize >= v)
        {
            return Err(ModelError::Invalid(format!(
                "token id {tok} at position {i} is outside the vocabulary ({v})"
            )));
        }
        self.check_targets(batch.targets)?;
        self.check_positions(batch.positions)
    }

    /// Refuses a target id outside the vocabulary (negative targets mean no loss).
    fn check_targets(&self, targets: &[i32]) -> Result<(), ModelError> {
        let v = self.config.vocab_size;
        if let Some((i, &tg)) = targets
            .iter()
            .enumerate()
            .find(|(_, &x)| x >= 0 && x as usize >= v)
        {
            return Err(ModelError::Invalid(format!(
                "target id {tg} at position {i} is outside the vocabulary ({v})"
            )));
        }
        Ok(())
    }

    /// Refuses a RoPE position past the table.
    fn check_positions(&self, positions: &[u32]) -> Result<(), ModelError> {
        let max = self.config.max_position_embeddings;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= max) {
            return Err(ModelError::Invalid(format!(
                "position {p} exceeds max_position_embeddings ({max})"
            )));
        }
        Ok(())
    }

    /// Norm, fused q/k/v projection, split and RoPE: fills a.rstd1, a.xn1, a.q, a.k, a.v.
    pub(crate) fn qkv_forward(
        &self,
        w: &LayerWeights,
        a: &mut LayerActs,
        qkv: &mut [f32],
        x_in: &[f32],
        rot: Rotary,
        m: &Dims,
    ) {
        self.qkv_project(w, a, qkv, x_in, m);
        self.rotate(&mut a.q, rot, m.h, Direction::Forward);
        self.rotate(&mut a.k, rot, m.h_kv, Direction::Forward);
    }

    /// [`Qwen2::qkv_forward`] without RoPE (q and k not yet rotated), for callers that rotate
    /// rows by different kinds of positions (incremental decoding, multimodal positions).
    pub(crate) fn qkv_project(
        &self,
        w: &LayerWeights,
        a: &mut LayerActs,
        qkv: &mut [f32],
        x_in: &[f32],
        m: &Dims,
    ) {
        let eps = self.config.rms_norm_eps;
        rmsnorm_forward(&mut a.xn1, &mut a.rstd1, x_in, w.input_norm, m.n, m.d, eps);
        let (qw, kvw, width) = (m.q_width(), m.kv_width(), m.qkv_width());
        matmul_forward(qkv, &a.xn1, w.qkv_w, Some(w.qkv_b), m.n, m.d, width);
        for (row, src) in qkv.chunks_exact(width).enumerate() {
            a.q[row * qw..(row + 1) * qw].copy_from_slice(&src[..qw]);
            a.k[row * kvw..(row + 1) * kvw].copy_from_slice(&src[qw..qw + kvw]);
            a.v[row * kvw..(row + 1) * kvw].copy_from_slice(&src[qw + kvw..]);
        }
    }

    /// RoPE on x [N, heads, D] in place; `Backward` applies the transpose rotation.
    fn rotate(&self, x: &mut [f32], rot: Rotary, heads: usize, dir: Direction) {
        let hd = self.config.head_dim;
        match (rot, dir) {
            (Rotary::Positions(p), Direction::Forward) => rope_forward(x, p, &self.rope, heads),
            (Rotary::Positions(p), Direction::Backward) => rope_backward(x, p, &self.rope, heads),
            (Rotary::Angles { cos, sin }, Direction::Forward) => {
                rope_forward_angles(x, cos, sin, heads, hd)
            }
            (Rotary::Angles { cos, sin }, Direction::Backward) => {
                rope_backward_angles(x, cos, sin, heads, hd)
            }
        }
    }

    /// o_proj, residual, norm, SwiGLU MLP, residual: reads a.attn, writes the rest and x_out.
    pub(crate) fn post_attention_forward(
        &self,
        w: &LayerWeights,
        a: &mut LayerActs,
        x_in: &[f32],
        x_out: &mut [f32],
        m: &Dims,
    ) {
        matmul_forward(&mut a.h, &a.attn, w.o_w, None, m.n, m.q_width(), m.d);
        add_into(&mut a.h, x_in);
        let eps = self.config.rms_norm_eps;
        rmsnorm_forward(&mut a.xn2, &mut a.rstd2, &a.h, w.post_norm, m.n, m.d, eps);
        matmul_forward(&mut a.gate_up, &a.xn2, w.gate_up_w, None, m.n, m.d, 2 * m.i);
        swiglu_forward(&mut a.act, &a.gate_up, m.n, m.i);
        matmul_forward(x_out, &a.act, w.down_w, None, m.n, m.i, m.d);
        add_into(x_out, &a.h);
    }

    /// One layer forward. With `attention: Reuse`, a.attn and a.lse already hold this layer's
    /// attention output (rematerialization-aware recomputation) and attention does not run.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        a: &mut LayerActs,
        qkv: &mut [f32],
        x_in: &[f32],
        x_out: &mut [f32],
        rot: Rotary,
        m: &Dims,
        attn: &dyn AttentionOp,
        attention: AttentionPass,
    ) -> Result<(), ModelError> {
        let w = self.layer_weights(l);
        self.qkv_forward(&w, a, qkv, x_in, rot, m);
        if attention == AttentionPass::Run {
            attn.forward(&mut a.attn, &mut a.lse, &a.q, &a.k, &a.v, m.attn_shape())
                .map_err(ModelError::Attention)?;
        }
        self.post_attention_forward(&w, a, x_in, x_out, m);
        Ok(())
    }

    /// One layer backward: dx_in = ∂L/∂x_in given dx_out; parameter gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        a: &LayerActs,
        x_in: &[f32],
        dx_out: &[f32],
        dx_in: &mut [f32],
        grads: &mut [f32],
        bw: &mut BackwardScratch,
        rot: Rotary,
        m: &Dims,
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        let w = self.layer_weights(l);
        let r: &LayerRanges = &self.layout.layers[l];
        let (n, d, i) = (m.n, m.d, m.i);
        // MLP.
        matmul_backward(
            Some(&mut bw.dact),
            &mut grads[r.down_w.clone()],
            None,
            dx_out,
            &a.act,
            w.down_w,
            n,
            i,
            d,
        );
        swiglu_backward(&mut bw.dgate_up, &bw.dact, &a.gate_up, n, i);
        matmul_backward(
            Some(&mut bw.dxn),
            &mut grads[r.gate_up_w.clone()],
            None,
            &bw.dgate_up,
            &a.xn2,
            w.gate_up_w,
            n,
            d,
            2 * i,
        );
        rmsnorm_backward(
            &mut bw.dh,
            &mut grads[r.post_norm.clone()],
            &bw.dxn,
            &a.h,
            w.post_norm,
            &a.rstd2,
            n,
            d,
        );
        add_into(&mut bw.dh, dx_out);
        // Attention.
        matmul_backward(
            Some(&mut bw.dattn),
            &mut grads[r.o_w.clone()],
            None,
            &bw.dh,
            &a.attn,
            w.o_w,
            n,
            m.q_width(),
            d,
        );
        attn.backward(
            &mut bw.dq,
            &mut bw.dk,
            &mut bw.dv,
            &bw.dattn,
            &a.q,
            &a.k,
            &a.v,
            &a.attn,
            &a.lse,
            m.attn_shape(),
        )
        .map_err(ModelError::Attention)?;
        self.rotate(&mut bw.dq, rot, m.h, Direction::Backward);
        self.rotate(&mut bw.dk, rot, m.h_kv, Direction::Backward);
        let (qw, kvw, width) = (m.q_width(), m.kv_width(), m.qkv_width());
        for (row, dst) in bw.dqkv.chunks_exact_mut(width).enumerate() {
            dst[..qw].copy_from_slice(&bw.dq[row * qw..(row + 1) * qw]);
            dst[qw..qw + kvw].copy_from_slice(&bw.dk[row * kvw..(row + 1) * kvw]);
            dst[qw + kvw..].copy_from_slice(&bw.dv[row * kvw..(row + 1) * kvw]);
        }
        let (gw, gb) = two_mut(grads, r.qkv_w.clone(), r.qkv_b.clone());
        matmul_backward(
            Some(&mut bw.dxn),
            gw,
            Some(gb),
            &bw.dqkv,
            &a.xn1,
            w.qkv_w,
            n,
            d,
            width,
        );
        rmsnorm_backward(
            dx_in,
            &mut grads[r.input_norm.clone()],
            &bw.dxn,
            x_in,
            w.input_norm,
            &a.rstd1,
            n,
            d,
        );
        add_into(dx_in, &bw.dh);
        Ok(())
    }

    /// Embedding, every layer and the final norm; leaves the normed last hidden states in
    /// ws.xn_f.
    pub(crate) fn forward_layers(
        &self,
        ws: &mut Workspace,
        batch: &TokenBatch,
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        let m = Dims::new(&self.config, batch.b, batch.t);
        ws.resize(&m);
        embedding_forward(
            &mut ws.xs[0],
            batch.tokens,
            &self.params[self.layout.embed.clone()],
            m.d,
        );
        self.run_layers(ws, Rotary::Positions(batch.positions), &m, attn)
    }

    /// Every layer and the final norm from the embeddings in ws.xs[0].
    pub(crate) fn run_layers(
        &self,
        ws: &mut Workspace,
        rot: Rotary,
        m: &Dims,
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        let (m, d) = (*m, m.d);
        for l in 0..self.config.num_hidden_layers {
            let (before, after) = ws.xs.split_at_mut(l + 1);
            let (x_in, x_out) = (&before[l], &mut after[0]);
            let slot = match ws.policy {
                CheckpointPolicy::None => l,
                _ => 0,
            };
            let a = &mut ws.acts[slot];
            self.layer_forward(
                l,
                a,
                &mut ws.qkv,
                x_in,
                x_out,
                rot,
                &m,
                attn,
                AttentionPass::Run,
            )?;
            if ws.policy == CheckpointPolicy::Remat {
                ws.saved_attn[l].copy_from_slice(&a.attn);
                ws.saved_lse[l].copy_from_slice(&a.lse);
            }
        }
        let last = &ws.xs[self.config.num_hidden_layers];
        rmsnorm_forward(
            &mut ws.xn_f,
            &mut ws.rstd_f,
            last,
            &self.params[self.layout.final_norm.clone()],
            m.n,
            d,
            self.config.rms_norm_eps,
        );
        ws.head_scale = 1.0;
        ws.last = Some((m.b, m.t));
        Ok(())
    }

    /// Forward pass and loss (sum over labelled tokens), keeping what the policy says for
    /// [`Qwen2::backward`].
    pub fn forward(
        &self,
        ws: &mut Workspace,
        batch: &TokenBatch,
        attn: &dyn AttentionOp,
    ) -> Result<LossStats, ModelError> {
        self.validate_batch(batch)?;
        self.forward_layers(ws, batch, attn)?;
        self.head_loss(
            ws,
            batch.targets,
            &Dims::new(&self.config, batch.b, batch.t),
        )
    }

    /// Logits [N, V] of the LM head over the final normed states in ws (tests, small evaluations).
    fn head_logits(&self, ws: &Workspace, m: &Dims) -> Vec<f32> {
        let mut logits = vec![0.0f32; m.n * m.v];
        matmul_forward(
            &mut logits,
            &ws.xn_f,
            &self.params[self.layout.lm_head.clone()],
            None,
            m.n,
            m.d,
            m.v,
        );
        logits
    }

    /// The LM head fused with cross-entropy over the final normed states in ws.
    fn head_loss(
        &self,
        ws: &mut Workspace,
        targets: &[i32],
        m: &Dims,
    ) -> Result<LossStats, ModelError> {
        let (loss_sum, n_tokens) = lm_head_ce_forward(
            &mut ws.ce_losses,
            &mut ws.ce_lse,
            &ws.xn_f,
            &self.params[self.layout.lm_head.clone()],
            targets,
            m.n,
            m.d,
            m.v,
            CE_CHUNK,
        );
        if !loss_sum.is_finite() {
            return Err(ModelError::NonFinite(format!(
                "loss is {loss_sum} over {n_tokens} tokens"
            )));
        }
        Ok(LossStats { loss_sum, n_tokens })
    }

    /// Backward of the last [`Qwen2::forward`] on the same batch, for the loss
    /// `loss_scale · Σ token losses`; parameter gradients accumulate into `grads`.
    pub fn backward(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        batch: &TokenBatch,
        loss_scale: f32,
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        self.check_backward(grads, ws, batch.b, batch.t)?;
        set_ce_dloss(&mut ws.dloss, batch.targets, loss_scale);
        self.backward_from_dloss(grads, ws, batch, attn)
    }

    /// What every backward checks first: the forward ran on a batch of this shape, the gradient
    /// buffer fits.
    pub(crate) fn check_backward(
        &self,
        grads: &[f32],
        ws: &Workspace,
        b: usize,
        t: usize,
    ) -> Result<(), ModelError> {
        if ws.last != Some((b, t)) {
            return Err(ModelError::Invalid(
                "backward needs the forward of the same batch first".into(),
            ));
        }
        if grads.len() != self.params.len() {
            return Err(ModelError::Invalid(format!(
                "gradient buffer has {} values, the model {}",
                grads.len(),
                self.params.len()
            )));
        }
        Ok(())
    }

    /// The backward for per-token loss weights already in `ws.dloss` (∂L/∂loss_i, 0 on
    /// unlabelled rows): the one implementation behind [`Qwen2::backward`] (CE, a constant
    /// weight) and [`Qwen2::backward_logprobs`] (policy gradient, −∂L/∂log π_i).
    pub(crate) fn backward_from_dloss(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        batch: &TokenBatch,
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        let m = Dims::new(&self.config, batch.b, batch.t);
        let rot = Rotary::Positions(batch.positions);
        let dx = self.backward_layers(grads, ws, batch.targets, rot, &m, attn)?;
        embedding_backward(
            &mut grads[self.layout.embed.clone()],
            &ws.dx[dx],
            batch.tokens,
            m.d,
        );
        Ok(())
    }

    /// The backward from the per-token weights in `ws.dloss` to the input of layer 0 (checks
    /// done by the caller); returns which of ws.dx holds ∂L/∂(input embeddings).
    pub(crate) fn backward_layers(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        targets: &[i32],
        rot: Rotary,
        m: &Dims,
        attn: &dyn AttentionOp,
    ) -> Result<usize, ModelError> {
        let m = *m;
        let layers = self.config.num_hidden_layers;
        lm_head_ce_backward(
            &mut ws.dxn_f,
            &mut grads[self.layout.lm_head.clone()],
            &ws.xn_f,
            &self.params[self.layout.lm_head.clone()],
            targets,
            &ws.ce_lse,
            &ws.dloss,
            m.n,
            m.d,
            m.v,
            CE_CHUNK,
        );
        if ws.head_scale != 1.0 {
            let c = ws.head_scale;
            ws.dxn_f.iter_mut().for_each(|x| *x *= c);
        }
        let [dx_a, dx_b] = &mut ws.dx;
        rmsnorm_backward(
            dx_a,
            &mut grads[self.layout.final_norm.clone()],
            &ws.dxn_f,
            &ws.xs[layers],
            &self.params[self.layout.final_norm.clone()],
            &ws.rstd_f,
            m.n,
            m.d,
        );
        let (mut dx_cur, mut dx_next) = (dx_a, dx_b);
        for l in (0..layers).rev() {
            let slot = match ws.policy {
                CheckpointPolicy::None => l,
                CheckpointPolicy::Layer => {
                    self.layer_forward(
                        l,
                        &mut ws.acts[0],
                        &mut ws.qkv,
                        &ws.xs[l],
                        &mut ws.x_tmp,
                        rot,
                        &m,
                        attn,
                        AttentionPass::Run,
                    )?;
                    0
                }
                CheckpointPolicy::Remat => {
                    let a = &mut ws.acts[0];
                    a.attn.copy_from_slice(&ws.saved_attn[l]);
                    a.lse.copy_from_slice(&ws.saved_lse[l]);
                    self.layer_forward(
                        l,
                        a,
                        &mut ws.qkv,
                        &ws.xs[l],
                        &mut ws.x_tmp,
                        rot,
                        &m,
                        attn,
                        AttentionPass::Reuse,
                    )?;
                    0
                }
            };
            self.layer_backward(
                l,
                &ws.acts[slot],
                &ws.xs[l],
                dx_cur,
                dx_next,
                grads,
                &mut ws.bw,
                rot,
                &m,
                attn,
            )?;
            std::mem::swap(&mut dx_cur, &mut dx_next);
        }
        // Each layer swaps the two buffers: the gradient ends in dx[0] after an even number.
        Ok(layers % 2)
    }

    /// Logits [B·T, V] for every position (tests, small evaluations). Training and scoring use
    /// the fused chunked cross-entropy instead.
    pub fn logits(
        &self,
        ws: &mut Workspace,
        tokens: &[u32],
        positions: &[u32],
        b: usize,
        t: usize,
        attn: &dyn AttentionOp,
    ) -> Result<Vec<f32>, ModelError> {
        let targets = vec![-1i32; tokens.len()];
        let batch = TokenBatch {
            tokens,
            targets: &targets,
            positions,
            b,
            t,
        };
        self.validate_batch(&batch)?;
        self.forward_layers(ws, &batch, attn)?;
        let m = Dims::new(&self.config, b, t);
        Ok(self.head_logits(ws, &m))
    }
}

impl Qwen2 {
    /// Checks an embeddings batch against the model.
    pub(crate) fn validate_embeds(&self, batch: &EmbedsBatch) -> Result<Dims, ModelError> {
        let m = Dims::new(&self.config, batch.b, batch.t);
        let half = m.hd / 2;
        let ok_rot = match batch.rotary {
            Rotary::Positions(p) => p.len() == m.n,
            Rotary::Angles { cos, sin } => cos.len() == m.n * half && sin.len() == m.n * half,
        };
        if batch.embeds.len() != m.n * m.d || batch.targets.len() != m.n || !ok_rot {
            return Err(ModelError::Invalid(format!(
                "batch of {}×{} needs {} embedding values, {} targets and rotary for {} tokens",
                batch.b,
                batch.t,
                m.n * m.d,
                m.n,
                m.n
            )));
        }
        self.check_targets(batch.targets)?;
        if let Rotary::Positions(p) = batch.rotary {
            self.check_positions(p)?;
        }
        Ok(m)
    }

    /// Every layer and the final norm from the batch's input embeddings (checked first); leaves
    /// the normed last hidden states in ws.xn_f.
    pub(crate) fn forward_layers_embeds(
        &self,
        ws: &mut Workspace,
        batch: &EmbedsBatch,
        attn: &dyn AttentionOp,
    ) -> Result<Dims, ModelError> {
        let m = self.validate_embeds(batch)?;
        ws.resize(&m);
        ws.xs[0].copy_from_slice(batch.embeds);
        self.run_layers(ws, batch.rotary, &m, attn)?;
        Ok(m)
    }

    /// Forward pass and loss from input embeddings (see [`Qwen2::forward`]).
    pub fn forward_embeds(
        &self,
        ws: &mut Workspace,
        batch: &EmbedsBatch,
        attn: &dyn AttentionOp,
    ) -> Result<LossStats, ModelError> {
        let m = self.forward_layers_embeds(ws, batch, attn)?;
        self.head_loss(ws, batch.targets, &m)
    }

    /// Backward of the last [`Qwen2::forward_embeds`] for the loss `loss_scale · Σ token
    /// losses`: parameter gradients accumulate into `grads` (the embedding table gets none: the
    /// caller owns the embedding lookup); returns ∂L/∂embeds [B·T, d].
    pub fn backward_embeds<'w>(
        &self,
        grads: &mut [f32],
        ws: &'w mut Workspace,
        batch: &EmbedsBatch,
        loss_scale: f32,
        attn: &dyn AttentionOp,
    ) -> Result<&'w [f32], ModelError> {
        let m = self.validate_embeds(batch)?;
        self.check_backward(grads, ws, m.b, m.t)?;
        set_ce_dloss(&mut ws.dloss, batch.targets, loss_scale);
        let dx = self.backward_layers(grads, ws, batch.targets, batch.rotary, &m, attn)?;
        Ok(&ws.dx[dx])
    }

    /// Logits [B·T, V] from input embeddings (tests, small evaluations).
    pub fn logits_embeds(
        &self,
        ws: &mut Workspace,
        batch: &EmbedsBatch,
        attn: &dyn AttentionOp,
    ) -> Result<Vec<f32>, ModelError> {
        let m = self.forward_layers_embeds(ws, batch, attn)?;
        Ok(self.head_logits(ws, &m))
    }
}

/// Cross-entropy's per-token weights: `loss_scale` on labelled rows, 0 elsewhere.
fn set_ce_dloss(dloss: &mut [f32], targets: &[i32], loss_scale: f32) {
    for (dl, &t) in dloss.iter_mut().zip(targets) {
        *dl = if t >= 0 { loss_scale } else { 0.0 };
    }
}

/// Which way [`Qwen2::rotate`] turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
}

/// Whether a layer forward runs attention or reuses the saved output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttentionPass {
    Run,
    Reuse,
}

/// Positions 0..t for each of b sequences.
pub fn default_positions(b: usize, t: usize) -> Vec<u32> {
    (0..b).flat_map(|_| 0..t as u32).collect()
}
