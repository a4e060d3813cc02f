#!/usr/bin/env bash
# Set up ./.venv and serve the built-in models (Gemma 3 270M, Qwen2.5-Coder-0.5B-Instruct, all-MiniLM-L6-v2) on 127.0.0.1:8080.
# Extra arguments go to `gemserve serve` (e.g. --port 9000 --alias gemini-2.0-flash=gemma-3-270m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gemserve serve --host 127.0.0.1 --port 8080 --data-dir ./data "$@"
