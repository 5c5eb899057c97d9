"""The package's layout is its pipeline: no stage imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

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


def imported(path: Path) -> set[str]:
    """Every fusion module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "fusion":
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "fusion"}
    return names


def test_stage_of_reads_the_folder_and_refuses_a_module_outside_every_stage():
    assert stage_of("fusion.teacher.backends.hf") == "teacher"
    assert stage_of("fusion.demo.run") == stage_of("fusion.cli") == "top"
    assert stage_of("fusion.config") == stage_of("fusion.config.models") == "base"
    try:
        stage_of("fusion.somewhere")
    except AssertionError as error:
        assert "belongs to no stage" in str(error)
    else:
        raise AssertionError("a module outside every stage passed")


def test_no_stage_imports_a_later_one():
    backwards = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        rank = STAGES.index(stage_of(importer))
        for name in sorted(imported(path)):
            if name != "fusion" and STAGES.index(stage_of(name)) > rank:
                backwards.append(f"{importer} imports {name}")
    assert backwards == []


def test_the_top_level_holds_the_face_and_one_folder_per_stage():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    stages = {"data", "models", "align", "teacher", "train", "evaluate"}
    assert folders == stages | {"config", "demo", "testing"}
    assert len(entries) <= 14, sorted(entries)
