//! Scoring and the policy-gradient backward: what RL (GRPO) needs from the policy model.
//!
//! [`Qwen2::token_logprobs`] runs the forward of a [B, T] batch and writes, at each labelled
//! position (target ≥ 0, e.g. the response tokens), `log π(target) = z_target − lse` and optionally
//! the entropy `−Σ_c p_c ln p_c` of that position's distribution. It is the fused LM head of the
//! cross-entropy path ([`reel_kernels::cross_entropy`]): logits only for the labelled rows,
//! vocabulary-chunked online log-sum-exp, never [B·T, V].
//!
//! [`Qwen2::backward_logprobs`] takes per-token coefficients `g_t = ∂L/∂log π_t` (from a GRPO loss)
//! and runs the model's backward with `∂L/∂z = g_t·(onehot(target) − softmax(z))` at the LM head,
//! through the same layers, checkpoint policies and [`AttentionOp`] as the CE backward: CE is the
//! case `g_t = −loss_scale`, and both are [`Qwen2::backward_from_dloss`] underneath.
//!
//! [`Qwen2::token_logprobs_embeds`] and [`Qwen2::backward_logprobs_embeds`] are the same pair from
//! input embeddings [B·T, d] with per-token rotary ([`EmbedsBatch`]): a vision-language policy
//! scores prompt + response rows whose video rows hold cached vision features and whose q/k turn
//! by M-RoPE angles; the backward returns ∂L/∂embeddings for the caller's embedding lookup.

use crate::attention::AttentionOp;
use crate::model::{EmbedsBatch, Qwen2, TokenBatch, Workspace, CE_CHUNK};
use crate::ModelError;
use reel_kernels::cross_entropy::{lm_head_ce_entropy_forward, lm_head_ce_forward};

/// Checks the temperature and the sizes of the logp/entropy buffers for `n` positions.
fn check_logprob_args(
    temperature: f32,
    n: usize,
    logp: &[f32],
    entropy: Option<&[f32]>,
) -> Result<(), ModelError> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(ModelError::Invalid(format!(
            "temperature {temperature} must be a finite number > 0"
        )));
    }
    for (name, len) in [
        ("logp", Some(logp.len())),
        ("entropy", entropy.map(<[f32]>::len)),
    ] {
        if let Some(len) = len.filter(|&l| l != n) {
            return Err(ModelError::Invalid(format!(
                "{name} buffer has {len} values, the batch needs {n}"
            )));
        }
    }
    Ok(())
}

impl Qwen2 {
    /// Forward of `batch`, then `logp[i] = log π(targets[i] | tokens ≤ i)` for every labelled
    /// position i (0 where targets[i] < 0), π = softmax(logits / temperature), and, if given,
    /// `entropy[i]` of that distribution there (0 where unlabelled; an output only, not
    /// differentiated). Both buffers are [B·T]. Keeps what the workspace's checkpoint policy
    /// keeps, so [`Qwen2::backward_logprobs`] (or [`Qwen2::backward`]) can follow on the same
    /// batch. Returns the number of labelled positions.
    pub fn token_logprobs(
        &self,
        ws: &mut Workspace,
        batch: &TokenBatch,
        attn: &dyn AttentionOp,
        temperature: f32,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
    ) -> Result<usize, ModelError> {
        check_logprob_args(temperature, batch.b * batch.t, logp, entropy.as_deref())?;
        self.validate_batch(batch)?;
        self.forward_layers(ws, batch, attn)?;
        self.head_logprobs(ws, batch.targets, temperature, logp, entropy)
    }

    /// [`Qwen2::token_logprobs`] from input embeddings [B·T, d] with the batch's rotary (token
    /// positions or per-token angles, e.g. M-RoPE); [`Qwen2::backward_logprobs_embeds`] follows.
    pub fn token_logprobs_embeds(
        &self,
        ws: &mut Workspace,
        batch: &EmbedsBatch,
        attn: &dyn AttentionOp,
        temperature: f32,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
    ) -> Result<usize, ModelError> {
        check_logprob_args(temperature, batch.b * batch.t, logp, entropy.as_deref())?;
        self.forward_layers_embeds(ws, batch, attn)?;
        self.head_logprobs(ws, batch.targets, temperature, logp, entropy)
    }

    /// The LM head over the final normed states in ws at the labelled rows only (chunked
    /// log-sum-exp), scaled by 1/temperature (remembered for the backward).
    fn head_logprobs(
        &self,
        ws: &mut Workspace,
        targets: &[i32],
        temperature: f32,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
    ) -> Result<usize, ModelError> {
        if temperature != 1.0 {
            let c = 1.0 / temperature;
            ws.xn_f.iter_mut().for_each(|x| *x *= c);
            ws.head_scale = c;
        }
        let (d, v, n) = (self.config.hidden_size, self.config.vocab_size, logp.len());
        let head = &self.params[self.layout.lm_head.clone()];
        let (sum, count) = match entropy {
            Some(e) => lm_head_ce_entropy_forward(
                &mut ws.ce_losses,
                &mut ws.ce_lse,
                e,
                &ws.xn_f,
                head,
                targets,
                n,
                d,
                v,
                CE_CHUNK,
            ),
            None => lm_head_ce_forward(
                &mut ws.ce_losses,
                &mut ws.ce_lse,
                &ws.xn_f,
                head,
                targets,
                n,
                d,
                v,
                CE_CHUNK,
            ),
        };
        if !sum.is_finite() {
            return Err(ModelError::NonFinite(format!(
                "log-probabilities sum to {} over {count} tokens",
                -sum
            )));
        }
        for (lp, &loss) in logp.iter_mut().zip(&ws.ce_losses) {
            *lp = -loss;
        }
        Ok(count)
    }

    /// Backward of the last forward on the same batch for a loss L whose derivative with respect
    /// to each labelled position's `log π(target)` is `dlogp[i]` ([B·T]; ignored where
    /// targets[i] < 0). Parameter gradients accumulate into `grads`. CE's backward is the case
    /// `dlogp = −loss_scale`.
    pub fn backward_logprobs(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        batch: &TokenBatch,
        dlogp: &[f32],
        attn: &dyn AttentionOp,
    ) -> Result<(), ModelError> {
        self.check_backward(grads, ws, batch.b, batch.t)?;
        set_logprob_dloss(&mut ws.dloss, batch.targets, dlogp)?;
        self.backward_from_dloss(grads, ws, batch, attn)
    }

    /// [`Qwen2::backward_logprobs`] after [`Qwen2::token_logprobs_embeds`]: parameter gradients
    /// accumulate into `grads` (the embedding table gets none: the caller owns the lookup);
    /// returns ∂L/∂embeds [B·T, d].
    pub fn backward_logprobs_embeds<'w>(
        &self,
        grads: &mut [f32],
        ws: &'w mut Workspace,
        batch: &EmbedsBatch,
        dlogp: &[f32],
        attn: &dyn AttentionOp,
    ) -> Result<&'w [f32], ModelError> {
        let m = self.validate_embeds(batch)?;
        self.check_backward(grads, ws, m.b, m.t)?;
        set_logprob_dloss(&mut ws.dloss, batch.targets, dlogp)?;
        let dx = self.backward_layers(grads, ws, batch.targets, batch.rotary, &m, attn)?;
        Ok(&ws.dx[dx])
    }
}

/// The per-token weights of a policy-gradient backward: `−dlogp[i]` on labelled rows, 0
/// elsewhere; refuses a wrong length or a non-finite coefficient on a labelled row.
fn set_logprob_dloss(dloss: &mut [f32], targets: &[i32], dlogp: &[f32]) -> Result<(), ModelError> {
    let n = targets.len();
    if dlogp.len() != n {
        return Err(ModelError::Invalid(format!(
            "dlogp has {} values, the batch needs {n}",
            dlogp.len()
        )));
    }
    if let Some(i) = (0..n).find(|&i| targets[i] >= 0 && !dlogp[i].is_finite()) {
        return Err(ModelError::NonFinite(format!("dlogp[{i}] is {}", dlogp[i])));
    }
    for ((dl, &g), &t) in dloss.iter_mut().zip(dlogp).zip(targets) {
        *dl = if t >= 0 { -g } else { 0.0 };
    }
    Ok(())
}
