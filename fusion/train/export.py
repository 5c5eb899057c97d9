"""The trained target as a Hugging Face folder with tokenizer, resolved config and model card."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fusion.config import FusionConfig, config_to_yaml
from fusion.models.loading import model_tokenizer


def model_card(run: FusionConfig, progress, dataset: dict) -> str:
    """A README.md saying what the model is, what it learned from and how training went."""
    train, align = run.train, run.align
    precision = "bf16" if train.bf16 else "fp32"
    losses = [loss for _, loss in progress.losses]
    sources = "\n".join(f"  - `{s.name}`: {s.path}" for s in run.sources)
    curve = (
        f"first {losses[0]:.4f}, last {losses[-1]:.4f}, lowest {min(losses):.4f} "
        f"over {len(losses)} logged steps"
        if losses
        else "no step was logged"
    )
    return f"""---
library_name: transformers
tags: [knowledge-fusion, fusellm, fusion]
---
# Fused target model

Continual training of `{run.target.path}` on `λ·CLM + (1−λ)·fusion` (FuseLLM, Wan et al.,
ICLR 2024) with the `fusion` toolkit.

- **Base model:** {run.target.path}
- **Source models:**
{sources}
- **Teacher data:** {dataset.get("path")} — {dataset.get("rows")} rows, {dataset.get("tokens")}
  tokens, teacher `{train.teacher}` (align {align.method}/{align.vocab_map}/{align.mode},
  fuse {run.fuse.method} per {run.fuse.granularity}, top-{align.top_k})
- **λ:** {train.lam}
- **Compute dtype:** {"bfloat16" if train.bf16 else "float32"} (precision `{train.precision}`,
  {"GPU" if train.use_gpu else "CPU"} workers; master weights float32)
- **Optimizer steps:** {progress.step}; **tokens seen:** {progress.tokens_seen}
- **Loss:** {curve}
- **Settings:** {train.strategy} (ZeRO {train.zero_stage}), {train.num_workers} worker(s),
  {precision}, lr {train.lr} ({train.schedule}, warm-up {train.warmup_ratio}), AdamW
  {tuple(train.betas)}, weight decay {train.weight_decay}, clip {train.grad_clip}, global batch
  {train.global_batch_size}, seed {train.seed}

The exact configuration is in `fusion-config.yaml`; per-step metrics are in the run's
`metrics.jsonl`.
"""


def export_model(module, run: FusionConfig, progress, export_dir: Path, dataset: dict) -> None:
    """Write weights (safetensors), tokenizer, config and card; replace the folder whole."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}-", dir=export_dir.parent))
    module.save_pretrained(staging, safe_serialization=True)
    model_tokenizer(run.target).save_pretrained(staging)
    (staging / "fusion-config.yaml").write_text(config_to_yaml(run), encoding="utf-8")
    (staging / "README.md").write_text(model_card(run, progress, dataset), encoding="utf-8")
    summary = {
        "steps": progress.step,
        "tokens_seen": progress.tokens_seen,
        "losses": progress.losses,
        "dataset": dataset,
    }
    (staging / "training_summary.json").write_text(json.dumps(summary, indent=2))
    if export_dir.exists():
        shutil.rmtree(export_dir)
    staging.rename(export_dir)
