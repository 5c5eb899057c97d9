"""`ray job submit --working-dir . -- python jobs/eval.py -m NAME=DIR -d DOMAIN=FILE`.

The same as `fusion eval`. Evaluation runs in the job's entrypoint process; give it a GPU with
`ray job submit --entrypoint-num-gpus 1 … -- python jobs/eval.py … --device cuda`. The
arguments, output and exit codes are those of the CLI command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from fusion.cli import app

if __name__ == "__main__":
    app(["eval", *sys.argv[1:]], prog_name="jobs/eval.py")
