#!/usr/bin/env bash
# Run `fusion demo` (its embedded default) in the project's virtual environment.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$root/.venv/bin/fusion" demo "$@"
