#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv.
# Torch is installed first (FUSION_TORCH, default torch==2.13.0) so that a CPU machine never
# pulls a multi-GB CUDA build through a bare `torch` requirement; then the project with its
# dev extras; then the two packages whose files the benchmarks and tests use as real
# tokenizers (installed without their dependencies: only their data files are read).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${FUSION_VENV:-$root/.venv}"
torch_spec="${FUSION_TORCH:-torch==2.13.0}"
tokenizer_data="mistral-common==1.13.1 openai-whisper==20250625"
python="${PYTHON:-python3}"

stamp_of() { cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16; echo "$torch_spec"; }
want=$(stamp_of)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.fusion-stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "bootstrap: preparing $venv (torch: $torch_spec)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install $torch_spec
"${pip[@]}" install -e "$root[dev]"
"${pip[@]}" install --no-deps $tokenizer_data
# DeepSpeed compiles its CPU comm op the first time an engine starts on a CPU (25-40 s of
# every core). Build it once here, with the venv's own ninja (as scripts/test.sh finds it),
# so that the first training run does not; a machine without a compiler only gets a note.
if ! PATH="$venv/bin:$PATH" "$venv/bin/python" -c \
    "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null 2>&1; then
    echo "bootstrap: note: DeepSpeed's CPU comm op did not build; the first CPU run builds it" >&2
fi
echo "$want" > "$venv/.fusion-stamp"
