//! Where every weight lives in the model's one flat f32 parameter buffer.
//!
//! reel fuses q/k/v into one projection ([(H + 2·H_kv)·D, d], rows q then k then v) and gate/up
//! into one ([2·I, d], rows gate then up). Because rows are contiguous, each Hugging Face tensor
//! (`q_proj.weight`, `up_proj.weight`, …) is still one contiguous range of the flat buffer, so
//! loading, saving and golden comparisons address HF names directly with no copies. Gradients use
//! the same layout.

use crate::config::Qwen2Config;
use std::ops::Range;

/// One Hugging Face tensor: its name, shape and range in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// Weight decay applies (2-D matrices), or not (biases and norm weights).
    pub decay: bool,
}

/// The ranges of one decoder layer's (fused) weights.
#[derive(Clone, Debug)]
pub struct LayerRanges {
    pub input_norm: Range<usize>,
    pub qkv_w: Range<usize>,
    pub qkv_b: Range<usize>,
    pub o_w: Range<usize>,
    pub post_norm: Range<usize>,
    pub gate_up_w: Range<usize>,
    pub down_w: Range<usize>,
}

impl LayerRanges {
    fn all(&self) -> [&Range<usize>; 7] {
        [
            &self.input_norm,
            &self.qkv_w,
            &self.qkv_b,
            &self.o_w,
            &self.post_norm,
            &self.gate_up_w,
            &self.down_w,
        ]
    }

    /// The flat range the layer's tensors tile (they are contiguous in [`ParamLayout`]): what
    /// a buffer holding one layer's parameters or gradients at a time spans.
    pub fn span(&self) -> Range<usize> {
        let all = self.all();
        let start = all.iter().map(|r| r.start).min().unwrap_or(0);
        let end = all.iter().map(|r| r.end).max().unwrap_or(0);
        start..end
    }

    /// The same ranges moved down by `by` (the layer's tensors within a buffer of its own,
    /// `by` = `span().start`).
    pub fn shifted(&self, by: usize) -> LayerRanges {
        let s = |r: &Range<usize>| r.start - by..r.end - by;
        LayerRanges {
            input_norm: s(&self.input_norm),
            qkv_w: s(&self.qkv_w),
            qkv_b: s(&self.qkv_b),
            o_w: s(&self.o_w),
            post_norm: s(&self.post_norm),
            gate_up_w: s(&self.gate_up_w),
            down_w: s(&self.down_w),
        }
    }
}

/// The whole layout.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub entries: Vec<ParamEntry>,
    pub embed: Range<usize>,
    pub layers: Vec<LayerRanges>,
    pub final_norm: Range<usize>,
    /// The LM head's range: the embedding's when the embeddings are tied.
    pub lm_head: Range<usize>,
    total: usize,
}

/// Appends entries one after another in the flat buffer.
#[derive(Default)]
pub(crate) struct Builder {
    pub(crate) entries: Vec<ParamEntry>,
    pub(crate) offset: usize,
}

impl Builder {
    pub(crate) fn push(&mut self, name: String, shape: Vec<usize>) -> Range<usize> {
        let n: usize = shape.iter().product();
        let range = self.offset..self.offset + n;
        self.offset += n;
        let decay = shape.len() >= 2;
        self.entries.push(ParamEntry {
            name,
            shape,
            range: range.clone(),
            decay,
        });
        range
    }
}

impl ParamLayout {
    pub fn new(c: &Qwen2Config) -> Self {
        let (d, hd, kvd, i) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
            c.intermediate_size,
        );
        let mut b = Builder {
            entries: Vec::new(),
            offset: 0,
        };
        let embed = b.push("model.embed_tokens.weight".into(), vec![c.vocab_size, d]);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let input_norm = b.push(format!("{p}.input_layernorm.weight"), vec![d]);
            let q = b.push(format!("{p}.self_attn.q_proj.weight"), vec![hd, d]);
            b.push(format!("{p}.self_attn.k_proj.weight"), vec![kvd, d]);
            let v = b.push(format!("{p}.self_attn.v_proj.weight"), vec![kvd, d]);
            let qb = b.push(format!("{p}.self_attn.q_proj.bias"), vec![hd]);
            b.push(format!("{p}.self_attn.k_proj.bias"), vec![kvd]);
            let vb = b.push(format!("{p}.self_attn.v_proj.bias"), vec![kvd]);
            let o_w = b.push(format!("{p}.self_attn.o_proj.weight"), vec![d, hd]);
            let post_norm = b.push(format!("{p}.post_attention_layernorm.weight"), vec![d]);
            let g = b.push(format!("{p}.mlp.gate_proj.weight"), vec![i, d]);
            let u = b.push(format!("{p}.mlp.up_proj.weight"), vec![i, d]);
            let down_w = b.push(format!("{p}.mlp.down_proj.weight"), vec![d, i]);
            layers.push(LayerRanges {
                input_norm,
                qkv_w: q.start..v.end,
                qkv_b: qb.start..vb.end,
                o_w,
                post_norm,
                gate_up_w: g.start..u.end,
                down_w,
            });
        }
        let final_norm = b.push("model.norm.weight".into(), vec![d]);
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            b.push("lm_head.weight".into(), vec![c.vocab_size, d])
        };
        ParamLayout {
            entries: b.entries,
            embed,
            layers,
            final_norm,
            lm_head,
            total: b.offset,
        }
    }

    /// Number of f32 values in the flat buffer.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Every tensor's range, in entry order.
    pub fn entry_ranges(&self) -> Vec<Range<usize>> {
        self.entries.iter().map(|e| e.range.clone()).collect()
    }

    pub fn entry(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Splits a flat buffer into one mutable slice per entry, in entry order.
    pub fn split_mut<'a>(&self, flat: &'a mut [f32]) -> Vec<&'a mut [f32]> {
        let mut out = Vec::with_capacity(self.entries.len());
        let mut rest = flat;
        for e in &self.entries {
            let (head, tail) = rest.split_at_mut(e.range.len());
            out.push(head);
            rest = tail;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_tile_the_buffer_and_fusions_are_contiguous() {
        for tied in [false, true] {
            let mut c = Qwen2Config::tiny(50);
            c.tie_word_embeddings = tied;
            let l = ParamLayout::new(&c);
            let mut off = 0;
            for e in &l.entries {
                assert_eq!(e.range.start, off, "{}", e.name);
                assert_eq!(e.range.len(), e.shape.iter().product::<usize>());
                off = e.range.end;
            }
            assert_eq!(off, l.total());
            assert_eq!(l.layers[0].qkv_w.len(), c.qkv_width() * c.hidden_size);
            assert_eq!(l.entry("lm_head.weight").is_some(), !tied);
            assert_eq!(
                l.split_mut(&mut vec![0.0; l.total()]).len(),
                l.entries.len()
            );
        }
    }

    /// Each layer's tensors tile its span with nothing else inside, layer after layer; shifted
    /// by the span's start they tile 0..span.len() (what a one-layer gradient buffer holds).
    #[test]
    fn a_layers_tensors_tile_its_span() {
        let c = Qwen2Config::tiny(50);
        let l = ParamLayout::new(&c);
        let mut prev = l.embed.end;
        for (k, rg) in l.layers.iter().enumerate() {
            let span = rg.span();
            assert_eq!(span.start, prev, "layer {k} follows the previous");
            let mut parts: Vec<_> = rg.all().iter().map(|r| (*r).clone()).collect();
            parts.sort_by_key(|r| r.start);
            let covered: usize = parts.iter().map(|r| r.len()).sum();
            assert_eq!(covered, span.len(), "layer {k}: the tensors fill the span");
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start, "layer {k}: no gap or overlap");
            }
            let inner = l
                .entries
                .iter()
                .filter(|e| e.range.start >= span.start && e.range.end <= span.end);
            assert!(inner
                .clone()
                .all(|e| e.name.starts_with(&format!("model.layers.{k}."))));
            let moved = rg.shifted(span.start);
            assert_eq!(moved.span(), 0..span.len());
            assert_eq!(moved.down_w.len(), rg.down_w.len());
            prev = span.end;
        }
        assert_eq!(prev, l.final_norm.start);
    }
}
