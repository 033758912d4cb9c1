#!/usr/bin/env bash
# One GRPO step of a Qwen2.5-VL at a published shape (random weights) with its scoring and update
# sequence-parallel over P GPUs (`reel launch --nproc P -- reel bench rl --rl-sp P`), beside the
# same step on one GPU. From a binary built beforehand on any machine
# (`cargo build --release -p reel-cli --features cuda`):
#
#   scripts/bench_rl_sp.sh path/to/reel OUTDIR [P]
#
# Writes OUTDIR/one-F.txt (one GPU) and OUTDIR/spP-F.txt (every process's rows: each reports its
# own GPU's peak memory) for each frame count. Knobs (environment): SHAPE (3b), ONE_FRAMES (256;
# empty: none), SP_FRAMES (256 1024: one launch each), GROUP (2), RESPONSE (16), CHECKPOINT
# (remat), MODEL_DIR (where the random model is kept: written by the first one-GPU run, or by --rl-write-model when there is none; /tmp/reel-rl-SHAPE),
# RUN_S (each run's wall limit, 300), STEPS (--rl-steps: steps a run, the last reported; 1), SHARD (1: the P-GPU runs shard the optimizer state over the
# processes, --rl-shard-optimizer; 2: the gradients too, --rl-shard-gradients), SHARED_PREFILL (--rl-shared-prefill: prompts this long are
# prefilled by the P processes together; 0 = by their owner alone; unset: the default, 8192).
set -uo pipefail
reel=${1:?usage: scripts/bench_rl_sp.sh path/to/reel OUTDIR [P]}
out=${2:?usage: scripts/bench_rl_sp.sh path/to/reel OUTDIR [P]}
p=${3:-2}
shape=${SHAPE:-3b}
mkdir -p "$out"
# NVLink multicast stays off (a program using it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L || true
model=${MODEL_DIR:-/tmp/reel-rl-$shape}
args=(bench rl --rl-shape "$shape" --rl-side 448 --rl-device cuda --rl-group "${GROUP:-2}"
  --rl-micro 1 --rl-response "${RESPONSE:-16}" --rl-checkpoint "${CHECKPOINT:-remat}" --reps 1
  --rl-reuse on --rl-model-dir "$model" --rl-steps "${STEPS:-1}")
# The model is written once, by a single process (the first one-GPU run, else
# --rl-write-model, which runs no step); the launched ones read it.
if [ -z "${ONE_FRAMES-256}" ] && [ ! -f "$model/config.json" ]; then
  "$reel" "${args[@]}" --rl-write-model >"$out/write-model.txt" 2>&1
  echo "model: exit $?"
fi
for f in ${ONE_FRAMES-256}; do
  timeout "${RUN_S:-300}" "$reel" "${args[@]}" --rl-frames "$f" 2>&1 | tee "$out/one-$f.txt"
  echo "one GPU, $f frames: exit ${PIPESTATUS[0]}"
done
for f in ${SP_FRAMES:-256 1024}; do
  shard=()
  [ "${SHARD:-0}" = 1 ] && shard=(--rl-shard-optimizer)
  [ "${SHARD:-0}" = 2 ] && shard=(--rl-shard-optimizer --rl-shard-gradients)
  [ -n "${SHARED_PREFILL-}" ] && shard+=(--rl-shared-prefill "$SHARED_PREFILL")
  timeout "${RUN_S:-300}" "$reel" launch --nproc "$p" --grace-secs 10 -- reel "${args[@]}" \
    "${shard[@]}" --rl-sp "$p" --rl-frames "$f" 2>&1 | tee "$out/sp$p-$f.txt"
  echo "sp $p, $f frames: exit ${PIPESTATUS[0]}"
done
