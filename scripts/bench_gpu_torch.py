#!/usr/bin/env python3
"""PyTorch's side of `reel bench gpu`: GEMMs, SDPA attention, AdamW and cross-entropy, timed the same way.

`reel bench gpu` runs this itself (it embeds this file and pipes it to `python3 -`) when
`python3 -c 'import torch'` works, passing its shapes, and prints both columns and their ratio. To run
it by hand in the same session, on the same GPU:

    python3 scripts/bench_gpu_torch.py            # default shapes (the same as reel's), as text
    python3 scripts/bench_gpu_torch.py --json     # JSON rows

Shapes are nn.Linear GEMMs: inp [m, k], weight [n, k]. "fwd" times out = inp @ weight.T (2mkn FLOPs);
"bwd" times dinp = dout @ weight and dweight += dout.T @ inp (4mkn FLOPs). Inputs are uniform in
[-1, 1), bf16; outputs bf16; accumulation fp32 (reduced-precision bf16 reductions are turned off, as
reel accumulates in fp32). Each row: warm-up runs, then CUDA events around each timed run; the median
("ms": what a Python caller gets, host overhead included); and "graph_ms": the same calls captured in
one CUDA graph and replayed, per call (the GPU's time alone, for small GEMMs where eager PyTorch is
bound by its host overhead).

Attention (`--attention`, rows [B, T, H, H_kv, D, causal]): F.scaled_dot_product_attention on
tensors laid out as reel's [B, T, H, D] (transposed views, as transformers passes them), bf16,
scale 1/sqrt(D), GQA through enable_gqa (or K/V repeated to H heads outside the timed region where
a backend refuses it, noted), per backend (flash, cudnn, efficient): the forward, and the forward
with torch.autograd.grad of q, k, v (fwd_bwd). A backend that cannot run a shape reports its error.
AdamW (`--adamw N`): torch.optim.AdamW(fused=True) on one N-element fp32 parameter. Cross-entropy
(`--ce [rows, D, V]`): logits = h @ W.T in bf16, F.cross_entropy on them in fp32, forward and
forward+backward (dh, dW). Decode (`--decode`, rows [B, ctx, H, H_kv, D, block]): one new token per
sequence attending over a paged bf16 KV cache [num_blocks, block, H_kv, D] with shuffled block tables:
F.scaled_dot_product_attention over K/V gathered through the tables (k_cache[tables], timed with the
attention), and over K/V already contiguous (the gather left out). `--sections` picks what runs
(gemm, attention, adamw, ce, decode; default all).
"""

import argparse
import json
import sys

import torch

# (name, kind, m, k, n): Qwen2-0.5B (d 896, I 4864, 14 q heads + 2 kv heads of 64, V 151936)
# over 8192 tokens, and a square 8192³.
DEFAULT_SHAPES = [
    ["qkv", "fwd", 8192, 896, 1152],
    ["o_proj", "fwd", 8192, 896, 896],
    ["gate_up", "fwd", 8192, 896, 9728],
    ["down", "fwd", 8192, 4864, 896],
    ["lm_head", "fwd", 8192, 896, 151936],
    ["gate_up", "bwd", 8192, 896, 9728],
    ["down", "bwd", 8192, 4864, 896],
    ["square", "fwd", 8192, 8192, 8192],
]
# [B, T, H, H_kv, D, causal], AdamW elements, [rows, D, V]: as reel's bench_gpu.rs.
DEFAULT_ATTENTION = [[1, t, 32, 8, 128, c] for t in (8192, 32768) for c in (True, False)]
DEFAULT_ADAMW = 494_032_768
DEFAULT_CE = [8192, 896, 151936]
# [B, ctx, H, H_kv, D, block]: as DECODE in reel's bench_gpu_sp.rs.
DEFAULT_DECODE = [[64, 4096, 32, 8, 128, 16], [8, 32768, 32, 8, 128, 16], [1, 131072, 32, 8, 128, 16],
                  [64, 4096, 14, 2, 64, 16]]


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = sorted(events[i].elapsed_time(events[i + 1]) for i in range(iters))
    return times[len(times) // 2]


def time_graph_ms(fn, iters, reps=5):
    """Per-call GPU time without host overhead: `iters` calls captured in one CUDA graph, each
    replay timed with events; the median replay over `iters`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / iters)
    times.sort()
    return times[len(times) // 2]


def uniform(*shape):
    return (torch.rand(*shape, device="cuda", dtype=torch.float32) * 2 - 1).to(torch.bfloat16)


def bench(shapes, warmup, iters):
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    rows = []
    for name, kind, m, k, n in shapes:
        inp, w = uniform(m, k), uniform(n, k)
        if kind == "fwd":
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            fn = lambda: torch.matmul(inp, w.t(), out=out)
            flops = 2.0 * m * k * n
        else:
            dout = uniform(m, n)
            dinp = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            dw = uniform(n, k)

            def fn():
                torch.matmul(dout, w, out=dinp)
                dw.addmm_(dout.t(), inp)

            flops = 4.0 * m * k * n
        ms = time_ms(fn, warmup, iters)
        graph_ms = time_graph_ms(fn, iters)
        rows.append({"name": name, "kind": kind, "m": m, "k": k, "n": n, "ms": ms,
                     "tflops": flops / (ms * 1e-3) / 1e12, "graph_ms": graph_ms,
                     "graph_tflops": flops / (graph_ms * 1e-3) / 1e12})
        torch.cuda.empty_cache()
    return rows


def attention(rows, warmup, iters):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out_rows = []
    for b, t, h, h_kv, d, causal in rows:
        q = uniform(b, t, h, d).transpose(1, 2).requires_grad_(True)
        k = uniform(b, t, h_kv, d).transpose(1, 2).requires_grad_(True)
        v = uniform(b, t, h_kv, d).transpose(1, 2).requires_grad_(True)
        dout = uniform(b, t, h, d).transpose(1, 2)
        k_rep = k.detach().repeat_interleave(h // h_kv, dim=1).requires_grad_(True)
        v_rep = v.detach().repeat_interleave(h // h_kv, dim=1).requires_grad_(True)
        res = {}
        for name, backend in backends.items():
            res[name] = {}
            for gqa in (True, False):
                kk, vv = (k, v) if gqa else (k_rep, v_rep)

                def fwd():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=bool(causal),
                                                              enable_gqa=gqa and h != h_kv)

                def fwd_bwd():
                    o = fwd()
                    torch.autograd.grad(o, (q, kk, vv), dout)

                try:
                    with torch.no_grad():
                        f_ms = time_ms(fwd, warmup, iters)
                    fb_ms = time_ms(fwd_bwd, warmup, iters)
                    res[name] = {"fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                                 "note": "" if gqa or h == h_kv else "K/V repeated to H heads"}
                    break
                except Exception as e:  # a backend that cannot run this shape
                    res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            torch.cuda.empty_cache()
        out_rows.append({"b": b, "t": t, "h": h, "h_kv": h_kv, "d": d, "causal": bool(causal),
                         "backends": res})
        del q, k, v, dout, k_rep, v_rep
        torch.cuda.empty_cache()
    return out_rows


def decode(rows, warmup, iters):
    import torch.nn.functional as F

    out_rows = []
    for b, ctx, h, h_kv, d, bs in rows:
        try:
            nb = b * ctx // bs
            k_cache = uniform(nb, bs, h_kv, d)
            v_cache = uniform(nb, bs, h_kv, d)
            tables = torch.randperm(nb, device="cuda").view(b, ctx // bs)
            q = uniform(b, 1, h, d).transpose(1, 2)
            gqa = h != h_kv

            def gathered():
                k = k_cache[tables].view(b, ctx, h_kv, d).transpose(1, 2)
                v = v_cache[tables].view(b, ctx, h_kv, d).transpose(1, 2)
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

            k_c = k_cache[tables].view(b, ctx, h_kv, d).transpose(1, 2).contiguous()
            v_c = v_cache[tables].view(b, ctx, h_kv, d).transpose(1, 2).contiguous()

            def contiguous():
                return F.scaled_dot_product_attention(q, k_c, v_c, enable_gqa=gqa)

            with torch.no_grad():
                g_ms = time_ms(gathered, warmup, iters)
                c_ms = time_ms(contiguous, warmup, iters)
            out_rows.append({"b": b, "ctx": ctx, "h": h, "h_kv": h_kv, "d": d, "bs": bs,
                             "gather_sdpa_ms": g_ms, "sdpa_contiguous_ms": c_ms})
            del k_cache, v_cache, k_c, v_c
        except Exception as e:
            out_rows.append({"b": b, "ctx": ctx, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        torch.cuda.empty_cache()
    return out_rows


def adamw(n, warmup, iters):
    p = torch.nn.Parameter(torch.rand(n, device="cuda") * 2 - 1)
    p.grad = torch.rand(n, device="cuda") * 2 - 1
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=True)
    ms = time_ms(opt.step, warmup, iters)
    del p, opt
    torch.cuda.empty_cache()
    return {"n": n, "ms": ms}


def cross_entropy(rows, d, v, warmup, iters):
    import torch.nn.functional as F
    h = uniform(rows, d).requires_grad_(True)
    w = uniform(v, d).requires_grad_(True)
    targets = (torch.arange(rows, device="cuda") * 7919) % v

    def fwd():
        return F.cross_entropy((h @ w.t()).float(), targets)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (h, w))

    with torch.no_grad():
        f_ms = time_ms(fwd, warmup, iters)
    fb_ms = time_ms(fwd_bwd, warmup, iters)
    del h, w
    torch.cuda.empty_cache()
    return {"rows": rows, "d": d, "v": v, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="JSON list of [name, kind, m, k, n]")
    ap.add_argument("--attention", help="JSON list of [B, T, H, H_kv, D, causal]")
    ap.add_argument("--adamw", type=int, help="AdamW over one tensor of this many fp32 elements")
    ap.add_argument("--ce", help="JSON [rows, D, V]: LM head + cross-entropy")
    ap.add_argument("--decode", help="JSON list of [B, ctx, H, H_kv, D, block]")
    ap.add_argument("--sections", default="gemm,attention,adamw,ce,decode")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        sys.exit(2)
    sections = set(a.sections.split(","))
    shapes = json.loads(a.shapes) if a.shapes else DEFAULT_SHAPES
    rows = bench(shapes, a.warmup, a.iters) if "gemm" in sections else []
    attn = (attention(json.loads(a.attention) if a.attention else DEFAULT_ATTENTION, 3, 10)
            if "attention" in sections else [])
    adam = adamw(a.adamw or DEFAULT_ADAMW, 3, 10) if "adamw" in sections else {}
    ce = cross_entropy(*(json.loads(a.ce) if a.ce else DEFAULT_CE), 2, 5) if "ce" in sections else {}
    dec = decode(json.loads(a.decode) if a.decode else DEFAULT_DECODE, 5, 20) if "decode" in sections else []
    if a.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                          "attention": attn, "adamw": adam, "ce": ce, "decode": dec}))
    else:
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
        for r in rows:
            print(f"{r['name']:<10} {r['kind']:<4} {r['m']:>6} {r['k']:>6} {r['n']:>7} {r['ms']:>9.3f} ms "
                  f"{r['tflops']:>7.1f} TFLOP/s; in a CUDA graph {r['graph_ms']:>9.3f} ms {r['graph_tflops']:>7.1f} TFLOP/s")
        for r in attn:
            print(f"attention b{r['b']} t{r['t']} h{r['h']}/{r['h_kv']} d{r['d']} causal={r['causal']}: {r['backends']}")
        if adam:
            print(f"adamw {adam}")
        if ce:
            print(f"cross-entropy {ce}")
        for r in dec:
            print(f"decode {r}")


if __name__ == "__main__":
    main()
