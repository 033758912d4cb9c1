#!/usr/bin/env python3
"""The PyTorch side of `reel bench gpu-rollout`: Hugging Face transformers' `generate` on a
Qwen2-0.5B-shaped model (random weights, bf16, SDPA attention) for the same shapes as reel's
rollout engine: G groups of S samples (G prompts of P random tokens, num_return_sequences = S),
exactly N new tokens each (no EOS, min_new_tokens = N), sampling with temperature 1, top-k 50,
top-p 1.

Reports, as JSON on stdout (last line), per case: the wall time of `generate` with N new tokens
and with 1 (prefill and the first token), the end-to-end new tokens/s, and the decode tokens/s
(the S·G·(N − 1) tokens after the first over the difference of the two times). One warm-up call
first; each timing is the median of --iters calls.

Run by `reel bench gpu-rollout` (which pipes this file to python3), or by hand:
    python3 scripts/bench_generate_torch.py --cases 8x8x512x256,8x8x2048x256
"""
import argparse
import json
import statistics
import sys
import time

import torch


def qwen2_05b(max_pos):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


def generate(model, ids, samples, new):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            num_return_sequences=samples,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    assert out.shape == (ids.shape[0] * samples, ids.shape[1] + new), out.shape
    return secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8x8x512x256", help="GxSxPxN, comma-separated")
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--max-pos", type=int, default=4096)
    a = ap.parse_args()
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_05b(a.max_pos)).to(device="cuda", dtype=torch.bfloat16).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Warm-up: kernels, cuBLAS handles, the allocator.
    generate(model, torch.randint(0, 151936, (2, 64), generator=gen).cuda(), 2, 8)
    rows = []
    for case in a.cases.split(","):
        g, s, p, n = (int(x) for x in case.split("x"))
        ids = torch.randint(0, 151936, (g, p), generator=gen).cuda()
        full = statistics.median(generate(model, ids, s, n) for _ in range(a.iters))
        first = statistics.median(generate(model, ids, s, 1) for _ in range(a.iters))
        decode_s = max(full - first, 1e-9)
        row = {
            "groups": g,
            "samples": s,
            "prompt": p,
            "new": n,
            "total_s": full,
            "first_token_s": first,
            "tokens_per_s": g * s * n / full,
            "decode_tokens_per_s": g * s * (n - 1) / decode_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
        torch.cuda.empty_cache()
    print(json.dumps({"torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
