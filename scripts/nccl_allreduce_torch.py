"""PyTorch side of reel's NCCL all-reduce measurement: 256 MiB f32 all-reduce over every GPU of
this machine, one process per GPU (torch.distributed, NCCL backend); prints the time and the bus
bandwidth 2*(P-1)/P * bytes / time, as crates/cuda/tests/gpu_nccl.rs's
nccl_all_reduce_bus_bandwidth does (5 warm-up calls, 20 timed)."""

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29691")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    n = (256 << 20) // 4
    x = torch.ones(n, dtype=torch.float32, device="cuda")
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    iters = 20
    t = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t) / iters
    nbytes = n * 4
    bus = 2 * (world - 1) / world * nbytes / secs / 1e9
    print(
        f"torch NCCL all_reduce 256 MiB f32, world {world}, rank {rank}: {secs * 1e3:.3f} ms, "
        f"algbw {nbytes / secs / 1e9:.1f} GB/s, busbw {bus:.1f} GB/s, "
        f"NCCL {torch.cuda.nccl.version()}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    world = torch.cuda.device_count()
    mp.spawn(rank_main, args=(world,), nprocs=world)
