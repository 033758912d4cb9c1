#!/usr/bin/env bash
# Sequence-parallel training benchmark of a Qwen2-7B-shaped layer stack on a machine with P GPUs
# (`reel bench sp-train`): the scaling table, then the longest sequence each schedule trains. From
# a binary built beforehand on any machine (`cargo build --release -p reel-cli --features cuda`):
#
#   scripts/bench_sp_train.sh path/to/reel OUTDIR [P]
#
# Writes OUTDIR/table.txt and OUTDIR/rows.jsonl (every finished row, and a failing row's error),
# OUTDIR/longest.txt and OUTDIR/longest.jsonl. Knobs (environment): SEQS (default
# 32768,65536,131072), REPS (3), LAYERS (4), TABLE_S (the table's wall limit, 900),
# LONGEST_SCHEDULES (default every one P allows), LONGEST_FROM (32768), GRANULARITY (32768),
# LONGEST_BUDGET_S (1800), LONGEST_ONE_GPU (1: also the one-GPU model).
set -uo pipefail
reel=${1:?usage: scripts/bench_sp_train.sh path/to/reel OUTDIR [P]}
out=${2:?usage: scripts/bench_sp_train.sh path/to/reel OUTDIR [P]}
p=${3:-2}
mkdir -p "$out"
# NVLink multicast stays off (a program using it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L || true
layers=${LAYERS:-4}
timeout "${TABLE_S:-900}" "$reel" launch --nproc "$p" --grace-secs 10 -- reel bench sp-train \
  --sp-layers "$layers" --sp-seqs "${SEQS:-32768,65536,131072}" --reps "${REPS:-3}" \
  --sp-out "$out/rows.jsonl" 2>&1 | tee "$out/table.txt"
echo "table: exit ${PIPESTATUS[0]}"
args=(bench sp-train --sp-longest --sp-nproc "$p" --sp-layers "$layers"
  --sp-longest-from "${LONGEST_FROM:-32768}" --sp-granularity "${GRANULARITY:-32768}"
  --sp-longest-budget-s "${LONGEST_BUDGET_S:-1800}" --sp-out "$out/longest.jsonl")
[ -n "${LONGEST_SCHEDULES:-}" ] && args+=(--sp-schedules "$LONGEST_SCHEDULES")
[ "${LONGEST_ONE_GPU:-1}" = 1 ] && args+=(--sp-longest-one-gpu)
"$reel" "${args[@]}" 2>&1 | tee "$out/longest.txt"
echo "longest: exit ${PIPESTATUS[0]}"
