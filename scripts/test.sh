#!/usr/bin/env bash
# The project's test command: every crate's unit, golden-fixture and end-to-end tests on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace --locked "$@"
