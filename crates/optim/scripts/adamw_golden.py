"""Golden trace of torch.optim.AdamW (CPU, float32) for reel-optim's `matches_torch_golden` test.

Run: python crates/optim/scripts/adamw_golden.py  -> prints the Rust constants pasted into
crates/optim/src/adamw.rs. Two parameter groups (decay 0.1 / none), lr changed every step
like a schedule does, 3 steps.
"""
import torch

torch.manual_seed(0)
w = torch.tensor([0.5, -1.25, 2.0, 0.03, -0.7, 1e-3], dtype=torch.float32, requires_grad=True)
b = torch.tensor([0.25, -0.125, 4.0], dtype=torch.float32, requires_grad=True)
grads_w = [
    [0.1, -0.7, 3.0, -1e-3, 0.0, 0.25],
    [-0.2, 0.4, 2.5, 5e-3, 1e-6, -0.25],
    [0.3, 0.3, -1.0, 1e-4, -2.0, 0.5],
]
grads_b = [[0.5, -0.05, 1e-5], [0.45, 0.1, -1e-5], [-1.0, 0.2, 0.0]]
lrs = [1e-2, 5e-3, 2.5e-3]
opt = torch.optim.AdamW(
    [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
    lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False,
)
out_w, out_b = [], []
for gw, gb, lr in zip(grads_w, grads_b, lrs):
    for g in opt.param_groups:
        g["lr"] = lr
    w.grad = torch.tensor(gw, dtype=torch.float32)
    b.grad = torch.tensor(gb, dtype=torch.float32)
    opt.step()
    out_w.append(w.detach().clone())
    out_b.append(b.detach().clone())


def bits(t):
    return ", ".join("0x%08x" % (x & 0xFFFFFFFF) for x in t.view(torch.int32).tolist())


print("// torch", torch.__version__)
print("const TORCH_W: [[u32; 6]; 3] = [")
for t in out_w:
    print("    [%s]," % bits(t))
print("];")
print("const TORCH_B: [[u32; 3]; 3] = [")
for t in out_b:
    print("    [%s]," % bits(t))
print("];")
