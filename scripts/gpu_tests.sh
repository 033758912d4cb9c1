#!/usr/bin/env bash
# Runs every opt-in GPU test built by scripts/build_gpu_tests.sh, on a machine with NVIDIA GPUs,
# from a checkout of the repository (fixtures). Multi-process NCCL tests run at world 1 and, with
# several GPUs, at every power of two up to the GPU count. Logs go to LOGS (default
# gpu-test-logs/); the exit status is non-zero if any test failed.
#
# Usage: scripts/gpu_tests.sh [DIR (default .gpu)] [LOGS]
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$(cd "${1:-$ROOT/.gpu}" && pwd)"
LOGS="${2:-$ROOT/gpu-test-logs}"
mkdir -p "$LOGS"
BUILT_AT="$(cat "$DIR/BUILT_AT")"
if [ "$BUILT_AT" != "$ROOT" ] && [ ! -e "$BUILT_AT" ]; then
  mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$ROOT" "$BUILT_AT"
fi
# NVLink multicast stays off (a program using it can take the host's GPUs out of service).
export REEL_GPU_TESTS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# The end-to-end `reel launch -- reel sft` case of gpu_nccl_sft runs this binary.
export REEL_BIN="$DIR/reel"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
worlds=1
for w in 2 4 8; do
  if [ "$w" -le "$gpus" ]; then worlds="$worlds,$w"; fi
done
export REEL_NCCL_WORLDS="$worlds"
echo "GPUs: $gpus; NCCL worlds: $worlds"
failed=()
for t in "$DIR"/reel_cuda "$DIR"/gpu_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  start=$(date +%s)
  if "$t" --test-threads=1 --nocapture >"$LOGS/$name.log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$name")
  fi
  summary=$(grep -a "test result" "$LOGS/$name.log" | tail -1)
  echo "$name: $status in $(($(date +%s) - start)) s; $summary"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (logs in $LOGS)"
  exit 1
fi
echo "all GPU tests passed"
