#!/usr/bin/env bash
# The C/C++ headers that reel-cuda's `cudnn` feature compiles against (crates/cuda/csrc/cudnn_attention.cpp):
# cudnn-frontend 1.32 (header-only), cuDNN 9.19's cudnn*.h, and the CUDA 13.0 runtime, crt, NVRTC
# and <nv/target> (CCCL) headers those include. Nothing from CUDA is linked: libcudnn, libcudart and libnvrtc are opened at
# run time. The headers come from NVIDIA's PyPI wheels; only their include/ folders are kept:
#
#   <out>/include                  cudnn_frontend.h, ...
#   <out>/nvidia/cudnn/include     cudnn.h, ...
#   <out>/nvidia/cu13/include      cuda.h, cuda_runtime_api.h, cuda_bf16.h, nvrtc.h, ...
#
# Usage: scripts/cuda_build_deps.sh [OUT]   (default: <repo>/.cache/cuda-headers)
# Idempotent: a stamp file naming the pinned versions makes a second run a no-op. Needs python3
# with pip and network access to PyPI (about 470 MB of wheels are downloaded, 8 MB kept).
# crates/cuda/build.rs runs this itself when the headers are missing.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/.cache/cuda-headers}"
PY="${PYTHON:-python3}"
PINS=(
  nvidia-cudnn-frontend==1.32.0
  nvidia-cudnn-cu13==9.19.0.56
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)
STAMP="$OUT/.complete"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
  exit 0
fi

command -v "$PY" >/dev/null || { echo "cuda_build_deps.sh: $PY not found (needed for pip)" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "cuda_build_deps.sh: downloading ${PINS[*]}" >&2
# Headers are the same on every platform and Python; fixing both makes the download independent
# of this machine's (the frontend's wheel is built per CPython version).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  -d "$TMP/wheels" "${PINS[@]}"

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
"$PY" - "$OUT.tmp" "$TMP"/wheels/*.whl <<'EOF'
import sys, zipfile
out, wheels = sys.argv[1], sys.argv[2:]
kept = 0
for w in wheels:
    with zipfile.ZipFile(w) as z:
        # From CCCL only <nv/target> (cuda_fp16.h includes it), not thrust, cub or libcu++.
        only = "nvidia/cu13/include/nv/" if "cuda_cccl" in w else ""
        for n in z.namelist():
            if only and not n.startswith(only):
                continue
            if (n.startswith("include/") or "/include/" in n) and not n.endswith("/"):
                z.extract(n, out)
                kept += 1
print(f"cuda_build_deps.sh: kept {kept} header files", file=sys.stderr)
EOF
for f in include/cudnn_frontend.h nvidia/cudnn/include/cudnn.h nvidia/cu13/include/cuda_runtime_api.h \
         nvidia/cu13/include/nvrtc.h nvidia/cu13/include/crt/host_defines.h nvidia/cu13/include/nv/target; do
  [[ -f "$OUT.tmp/$f" ]] || { echo "cuda_build_deps.sh: $f missing from the wheels" >&2; exit 1; }
done
echo "${PINS[*]}" >"$OUT.tmp/.complete"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "cuda_build_deps.sh: headers in $OUT" >&2
