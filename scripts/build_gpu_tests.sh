#!/usr/bin/env bash
# Builds every opt-in GPU test and the `cuda` reel binary here (no GPU or CUDA toolkit needed),
# stripped, into OUT (default .gpu, ignored by git), for scripts/gpu_tests.sh on a GPU machine.
#
# Usage: scripts/build_gpu_tests.sh [OUT]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/.gpu}"
cd "$ROOT"
[ -d .cache/cuda-headers ] || ./scripts/cuda_build_deps.sh
mkdir -p "$OUT"
# Test executables of a cargo invocation, one "name path" line each.
list() {
  cargo test --release --no-run --message-format=json "$@" 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])'
}
cargo test --release --no-run -p reel-cuda --features cudnn >/dev/null
cargo test --release --no-run -p reel-train --features cuda >/dev/null
{
  list -p reel-cuda --features cudnn
  list -p reel-train --features cuda
} | while read -r name exe; do
  case "$name" in
    reel_cuda | gpu_*) strip -o "$OUT/$name" "$exe" ;;
  esac
done
cargo build --release -p reel-cli --features cuda
strip -o "$OUT/reel" "${CARGO_TARGET_DIR:-target}/release/reel"
# The tests read fixtures through the path they were built at.
echo "$ROOT" >"$OUT/BUILT_AT"
ls -la "$OUT"
