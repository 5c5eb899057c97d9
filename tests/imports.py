"""What importing some modules loads, seen from a fresh interpreter (a Ray worker's view)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def packages_loaded_by(modules: list[str], packages: list[str]) -> list[str]:
    """The modules under ``packages`` that a new Python process holds after importing
    ``modules`` (nothing else imported before)."""
    probe = (
        f"import json, sys, {', '.join(modules)};"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(done.stdout)
