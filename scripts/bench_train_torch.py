#!/usr/bin/env python3
"""The PyTorch side of `reel bench gpu-train`: a training step of a Qwen2-0.5B-shaped model
(random weights) in Hugging Face transformers, as its Trainer runs it with `bf16=True`: fp32
weights under torch.autocast(bfloat16), SDPA attention, gradient checkpointing, fused AdamW,
gradient clipping at 1.0. One sequence of T tokens per step, every token labelled.

Reports, as JSON on stdout: for each T in --tokens, the median step time over --iters steps
after --warmup, tokens/s and the peak memory; and, with --longest, the longest T (a multiple of
--granule) whose step runs without running out of memory, found by doubling then bisection.

Run by `reel bench gpu-train` (which pipes this file to python3), or by hand:
    python3 scripts/bench_train_torch.py --tokens 16384,32768 --longest
"""
import argparse
import json
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
        use_cache=False,
    )


def make(max_pos):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_05b(max_pos)).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    return model, opt


def step(model, opt, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss


def time_steps(model, opt, t, warmup, iters):
    ids = torch.randint(0, 151936, (1, t), device="cuda")
    for _ in range(warmup):
        step(model, opt, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step(model, opt, ids)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    s = times[len(times) // 2]
    return {
        "t": t,
        "step_s": s,
        "tokens_per_s": t / s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
    }


def fits(model, opt, t):
    ids = torch.randint(0, 151936, (1, t), device="cuda")
    try:
        step(model, opt, ids)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del ids
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def longest(model, opt, start, granule, limit_s):
    t0 = time.time()
    lo, hi = 0, None
    t = start
    while hi is None and time.time() - t0 < limit_s:
        if fits(model, opt, t):
            lo, t = t, 2 * t
        else:
            hi = t
    if hi is None:
        return {"longest": lo, "bounded": False, "secs": time.time() - t0}
    while hi - lo > granule and time.time() - t0 < limit_s:
        mid = (lo + hi) // 2 // granule * granule
        if mid <= lo:
            break
        if fits(model, opt, mid):
            lo = mid
        else:
            hi = mid
    return {"longest": lo, "first_oom": hi, "bounded": True, "secs": time.time() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="16384,32768")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--longest", action="store_true")
    p.add_argument("--start", type=int, default=32768)
    p.add_argument("--granule", type=int, default=4096)
    p.add_argument("--limit-s", type=float, default=150.0)
    a = p.parse_args()
    import transformers

    model, opt = make(1 << 20)
    rows = [time_steps(model, opt, int(t), a.warmup, a.iters) for t in a.tokens.split(",")]
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0),
        "rows": rows,
    }
    if a.longest:
        out["longest"] = longest(model, opt, a.start, a.granule, a.limit_s)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
