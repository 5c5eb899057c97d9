#!/usr/bin/env bash
# What a GPU changes, checked in a few minutes without Ray (see fusion/testing/gpu_check.py):
#   bash scripts/gpu-check.sh          # on a CUDA machine
#   bash scripts/gpu-check.sh --cpu    # the same checks on the CPU (CI runs this)
# Uses the project's .venv when there is one, else python3 (torch, transformers, tokenizers,
# numpy, pydantic and pyyaml; deepspeed is optional).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python="$root/.venv/bin/python"
[ -x "$python" ] || python=python3
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m fusion.testing.gpu_check "$@"
