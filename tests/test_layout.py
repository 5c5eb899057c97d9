"""The package's layout is its pipeline: no stage imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusion"
# Stages in pipeline order; a module may import its own stage and earlier ones only.
STAGES = ["base", "data", "models", "align", "teacher", "train", "evaluate", "top"]
BASE = {"fusion.errors", "fusion.progress", "fusion.config", "fusion.cluster"}  # and fusion
TOP = {"fusion.cli", "fusion.demo", "fusion.testing"}


def stage_of(module: str) -> str:
    """The stage a module of the package belongs to (``fusion.teacher.stages`` → teacher)."""
    if module == "fusion" or any(module == b or module.startswith(f"{b}.") for b in BASE):
        return "base"
    parts = module.split(".")
    if ".".join(parts[:2]) in TOP:
        return "top"
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    raise AssertionError(f"{module} belongs to no stage: add it to a stage's folder")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether a dotted name under fusion is a module or package of it (not an attribute)."""
    folder = PACKAGE.parent.joinpath(*name.split("."))
    return folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file()


def imported(source: str, importer: str = "fusion", *, package: bool = False) -> set[str]:
    """Every fusion module a file imports, at the top or inside a function: ``import``,
    ``from fusion.x import y`` where ``y`` is itself a module, relative imports (resolved
    against ``importer``, a package's ``__init__`` when ``package``) and
    ``importlib.import_module`` or ``__import__`` of a written-out name."""
    here = importer.split(".") if package else importer.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "fusion":
                names.add(module)
                names |= {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "fusion"}
        elif isinstance(node, ast.Call) and _names_a_module(node):
            names.add(node.args[0].value)
    return {name for name in names if is_module(name)}


def _names_a_module(call: ast.Call) -> bool:
    """``importlib.import_module("fusion…")``, ``import_module("fusion…")``, ``__import__``."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return (
        name in ("import_module", "__import__")
        and bool(call.args)
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
        and call.args[0].value.split(".")[0] == "fusion"
    )


def test_stage_of_reads_the_folder_and_refuses_a_module_outside_every_stage():
    assert stage_of("fusion.teacher.backends.hf") == "teacher"
    assert stage_of("fusion.demo.run") == stage_of("fusion.cli") == "top"
    assert stage_of("fusion.config") == stage_of("fusion.config.models") == "base"
    with pytest.raises(AssertionError, match="belongs to no stage"):
        stage_of("fusion.somewhere")


def test_imported_finds_modules_however_they_are_imported():
    source = (
        "from fusion import __version__, train\n"
        "import fusion.data.corpus\n"
        "def f():\n"
        "    from fusion.teacher import rows\n"
        "    from fusion.models.loading import load_tokenizer\n"
    )
    assert imported(source) == {
        "fusion",
        "fusion.train",
        "fusion.data.corpus",
        "fusion.teacher",
        "fusion.teacher.rows",
        "fusion.models.loading",
    }
    relative = (
        "from ..teacher.rows import x\n"
        "from .. import train\n"
        "from . import loading\n"
        "import importlib\n"
        "def g():\n"
        "    importlib.import_module('fusion.train.loss')\n"
        "    __import__('fusion.evaluate.bpb')\n"
    )
    assert imported(relative, "fusion.models.head") == {
        "fusion.teacher.rows",
        "fusion",
        "fusion.train",
        "fusion.models",
        "fusion.models.loading",
        "fusion.train.loss",
        "fusion.evaluate.bpb",
    }
    assert imported("from .rows import x\n", "fusion.teacher", package=True) == {
        "fusion.teacher.rows"
    }


def test_no_stage_imports_a_later_one():
    backwards = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        rank = STAGES.index(stage_of(importer))
        source = path.read_text(encoding="utf-8")
        package = path.name == "__init__.py"
        for name in sorted(imported(source, importer, package=package)):
            if name != "fusion" and STAGES.index(stage_of(name)) > rank:
                backwards.append(f"{importer} imports {name}")
    assert backwards == []


def test_the_top_level_holds_the_face_and_one_folder_per_stage():
    # Folders count when they hold code: a checkout that had another layout keeps empty
    # folders of bytecode caches behind, which are not the package.
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    entries = folders | {p.name for p in PACKAGE.glob("*.py")}
    stages = {"data", "models", "align", "teacher", "train", "evaluate"}
    assert folders == stages | {"config", "demo", "testing"}
    assert len(entries) <= 14, sorted(entries)
