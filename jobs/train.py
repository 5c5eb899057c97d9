"""`ray job submit --working-dir . -- python jobs/train.py CONFIG [OPTIONS]` = `fusion train`.

Inside a Ray job, RAY_ADDRESS names the cluster and `ray.init()` connects to it; the
arguments, output and exit codes are those of the CLI command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from fusion.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="jobs/train.py")
