"""Golden fixtures from transformers for reel's tests.

Builds small random Qwen2 models with transformers + PyTorch (fp32, eager attention) and writes,
for each, an HF checkpoint folder (config.json, model.safetensors) and `golden.safetensors` with:
  input_ids, labels [B, T] (int32; labels -100 where ignored), logits [B, T, V], loss [],
  grad.<param name> for every parameter, trace [10] (loss before each of 10 AdamW steps).
The main model also gets a character-level tokenizer with a chat template, an SFT JSONL file and
transformers' mean NLL over its assistant tokens (`eval.json`), and a greedy generation (`gen.json`).

Usage (on a machine with torch + transformers; reel's GPU host has both):
    python3 scripts/make_fixtures.py OUT_DIR
The outputs are committed under fixtures/; CI never runs this script.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and loop.first %}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATIONS = [
    {"messages": [
        {"role": "user", "content": "reverse: abcd"},
        {"role": "assistant", "content": "dcba"},
    ]},
    {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "add: 12+30"},
        {"role": "assistant", "content": "  42 "},
        {"role": "user", "content": "and 1+1?"},
        {"role": "assistant", "content": "2"},
    ]},
    {"prompt": "sort: 3142", "response": "1234"},
]


def char_tokenizer(out_dir):
    chars = [chr(c) for c in range(0x20, 0x7F)] + ["\n"]
    vocab = {ch: i for i, ch in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_model(out_dir, seed, **cfg):
    torch.manual_seed(seed)
    config = Qwen2Config(
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_sliding_window=False,
        **cfg,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).float()
    init_weights(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def golden(model, out_dir, seed, b, t, n_real_vocab):
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, n_real_vocab, (b, t), generator=g)
    labels = input_ids.clone()
    labels[0, : t // 3] = -100  # a prompt that carries no loss
    labels[b - 1, ::5] = -100
    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": input_ids.to(torch.int32),
        "labels": labels.to(torch.int32),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().reshape(()).float(),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().float().contiguous()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
    )
    trace = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(input_ids=input_ids, labels=labels).loss
        trace.append(loss.item())
        loss.backward()
        opt.step()
    tensors["trace"] = torch.tensor(trace, dtype=torch.float32)
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"),
              metadata={"adamw": "lr=1e-2 betas=(0.9,0.95) eps=1e-8 wd=0.01 on dim>=2"})
    print(out_dir, "loss", out.loss.item(), "trace", trace)


def eval_nll(model, tok, records):
    total, count = 0.0, 0
    for rec in records:
        msgs = rec.get("messages") or [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["response"]},
        ]
        text = tok.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
            end = len(tok.apply_chat_template(msgs[: i + 1], tokenize=False))
            assert text.startswith(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
            spans.append((start, end))
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([enc["input_ids"]])
        mask = [any(s <= o[0] < e for s, e in spans) for o in enc["offset_mapping"]]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for j in range(1, ids.shape[1]):
            if mask[j]:
                total -= logp[j - 1, ids[0, j]].item()
                count += 1
    return total / count, count


def main():
    out = sys.argv[1]
    main_dir = os.path.join(out, "qwen2-tiny")
    tied_dir = os.path.join(out, "qwen2-tiny-tied")
    os.makedirs(main_dir, exist_ok=True)
    os.makedirs(tied_dir, exist_ok=True)

    tok = char_tokenizer(main_dir)
    n_real = len(tok)
    model = make_model(main_dir, 1, vocab_size=128, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=10000.0, tie_word_embeddings=False)
    golden(model, main_dir, 1, b=2, t=24, n_real_vocab=n_real)

    tied = make_model(tied_dir, 2, vocab_size=96, hidden_size=48, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1,
                      rope_theta=500.0, tie_word_embeddings=True)
    golden(tied, tied_dir, 2, b=1, t=17, n_real_vocab=96)

    # Reload the main model from disk (pre-AdamW weights) for eval and generation.
    model = Qwen2ForCausalLM.from_pretrained(main_dir, attn_implementation="eager").float().eval()
    with open(os.path.join(out, "sft-eval.jsonl"), "w") as f:
        for rec in CONVERSATIONS:
            f.write(json.dumps(rec) + "\n")
    mean_nll, tokens = eval_nll(model, tok, CONVERSATIONS)
    with open(os.path.join(main_dir, "eval.json"), "w") as f:
        json.dump({"mean_nll": mean_nll, "tokens": tokens}, f)
    print("eval", mean_nll, tokens)

    prompt = tok.apply_chat_template([{"role": "user", "content": "reverse: abc"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    with open(os.path.join(main_dir, "gen.json"), "w") as f:
        json.dump({"prompt": prompt, "prompt_ids": ids[0].tolist(),
                   "generated_ids": gen[0, ids.shape[1]:].tolist()}, f)
    print("gen", gen[0, ids.shape[1]:].tolist())


if __name__ == "__main__":
    main()
