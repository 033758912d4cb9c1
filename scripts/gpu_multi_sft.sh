#!/usr/bin/env bash
# The multi-process GPU SFT tests (one process per GPU over NCCL: loss curve against one GPU,
# a rank killed mid-step, resume, `reel launch -- reel sft`, too many processes refused) on a
# machine with at least 2 GPUs, from binaries built beforehand on any machine:
#
#   cargo test -p reel-train --features cuda --release --test gpu_nccl_sft --no-run   # the test binary
#   cargo build --release -p reel-cli --features cuda                                  # target/release/reel
#
# Copy both (stripped) into one folder as `gpu_nccl_sft` and `reel`, then:
#
#   scripts/gpu_multi_sft.sh FOLDER      # REEL_NCCL_WORLDS=2,4 for more world sizes (default 2)
set -euo pipefail
bin=${1:?usage: scripts/gpu_multi_sft.sh FOLDER-with-gpu_nccl_sft-and-reel}
# NVLink multicast stays off (a program using it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export REEL_GPU_TESTS=1 REEL_NCCL_WORLDS=${REEL_NCCL_WORLDS:-2}
nvidia-smi -L || true
REEL_BIN="$(cd "$bin" && pwd)/reel" "$bin/gpu_nccl_sft" --test-threads=1 --nocapture
