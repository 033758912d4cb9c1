//! Evaluation: mean negative log-likelihood of the assistant tokens of a set of conversations,
//! with the same tokenization, loss mask and batching as training.

use anyhow::{Context, Result};
use reel_data::{
    make_batch, tokenize_conversation, BucketSampler, SftFile, TokenizedExample, Tokenizer,
};
use reel_model::{CheckpointPolicy, LocalAttention, LossStats, Qwen2, TokenBatch, Workspace};

/// Tokens per evaluation batch.
const EVAL_TOKENS_PER_BATCH: usize = 8192;

/// Tokenizes a file's conversations, truncating each to `max_len` tokens and dropping those
/// left with no assistant token (a warning says how many). An error names `path:line`.
pub fn tokenize_all(
    tok: &Tokenizer,
    file: &SftFile,
    max_len: usize,
) -> Result<Vec<TokenizedExample>> {
    let convs = &file.conversations;
    let mut out = Vec::with_capacity(convs.len());
    let mut dropped = 0usize;
    for (i, c) in convs.iter().enumerate() {
        let mut ex = tokenize_conversation(tok, c).with_context(|| file.origin(i))?;
        ex.input_ids.truncate(max_len);
        ex.loss_mask.truncate(max_len);
        // The first token is never a target (nothing predicts it).
        if ex.loss_mask.iter().skip(1).any(|&m| m) {
            out.push(ex);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            "{}: {dropped} of {} conversations have no assistant token within {max_len} tokens; \
             skipped",
            file.path.display(),
            convs.len()
        );
    }
    Ok(out)
}

/// Sum and count of the assistant-token NLL of a file's conversations (use `.mean()` for the
/// mean). Conversations are truncated to `max_len`, and never past the model's positions; a set
/// with no assistant token left is an error rather than a mean of zero.
pub fn eval_nll(
    model: &Qwen2,
    tok: &Tokenizer,
    file: &SftFile,
    max_len: usize,
) -> Result<LossStats> {
    let max_len = max_len.min(model.config.max_position_embeddings);
    let examples = tokenize_all(tok, file, max_len)?;
    if examples.is_empty() {
        anyhow::bail!(
            "{}: no conversation ({} given) has an assistant token within {max_len} tokens",
            file.path.display(),
            file.conversations.len()
        );
    }
    let pad = tok
        .pad_token_id()
        .context("the tokenizer has neither a pad nor an eos token")?;
    eval_examples(model, &examples, pad)
}

/// Sum and count of the assistant-token NLL of already tokenized examples, in length-bucketed
/// batches of at most [`EVAL_TOKENS_PER_BATCH`] tokens.
pub fn eval_examples(model: &Qwen2, examples: &[TokenizedExample], pad: u32) -> Result<LossStats> {
    let lengths: Vec<usize> = examples.iter().map(TokenizedExample::len).collect();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let mut batches = BucketSampler::new(&lengths, EVAL_TOKENS_PER_BATCH, 0);
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Layer);
    let mut total = LossStats::default();
    for _ in 0..batches.num_batches() {
        let ex: Vec<&TokenizedExample> =
            batches.next_batch().iter().map(|&i| &examples[i]).collect();
        let b = make_batch(&ex, pad, max_len);
        let stats = model.forward(
            &mut ws,
            &TokenBatch {
                tokens: &b.input_ids,
                targets: &b.targets,
                positions: &b.positions,
                b: b.b,
                t: b.t,
            },
            &LocalAttention,
        )?;
        total.loss_sum += stats.loss_sum;
        total.n_tokens += stats.n_tokens;
    }
    Ok(total)
}
