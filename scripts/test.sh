#!/usr/bin/env bash
# The project's test command: every crate's unit, golden-fixture and end-to-end tests on CPU.
# Installs what the tests need and cargo cannot build: FFmpeg (the video tests decode mp4/mkv
# through ffprobe/ffmpeg; without it those cases print a skip note, and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing FFmpeg (apt-get) for the video tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg
  else
    echo "note: ffmpeg/ffprobe not found and cannot be installed here (not root or no apt-get);" \
      "the mp4/mkv video tests will be skipped" >&2
  fi
fi

exec cargo test --workspace --locked --no-fail-fast "$@"
