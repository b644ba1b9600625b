#!/usr/bin/env bash
# convert_model.sh — the original interface, kept for existing scripts and docs.
# It now calls `mkonnx build`, which converts natively (no Python), evaluates, compares and
# caches every stage. Usage:
#   ./convert_model.sh <run_dir> [--dataset-dir DIR] [--image-input PATH]
#                      [--checkpoint-path PATH] [--device cpu|cuda] [--evaluate-converted-model]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkonnx="${MKONNX:-}"
if [[ -z "$mkonnx" ]]; then
  if command -v mkonnx >/dev/null 2>&1; then mkonnx=mkonnx
  else mkonnx="$here/target/release/mkonnx"; fi
fi
if [[ ! -x "$mkonnx" ]] && ! command -v "$mkonnx" >/dev/null 2>&1; then
  echo "Error: mkonnx not found (run 'make setup' in $here, or set MKONNX)" >&2
  exit 1
fi
exec "$mkonnx" build "$@"
