"""The documentation is checked against the code: every `fusion` command shown in README.md and
docs/*.md is one the CLI accepts, and every relative link leads to a file (and heading) that
exists. No Ray, no torch: the CLI is read as click builds it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import typer

from fusion.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Shown:
    """A command as a page shows it, with where."""

    page: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Line:
    """A line of a page and the fenced block it is in: its language ("" for none given), or
    None outside every block; `fence` for the block's opening and closing lines."""

    text: str
    language: str | None
    fence: bool


def _lines(text: str) -> list[Line]:
    found, language, opened = [], None, ""
    for line in text.split("\n"):
        fence = FENCE.match(line)
        if language is None and fence:
            language, opened = fence.group(2).lower(), fence.group(1)
            found.append(Line(line, language, fence=True))
        elif language is not None and line.strip().startswith(opened) and not line.strip("`~"):
            found.append(Line(line, language, fence=True))
            language = None
        else:
            found.append(Line(line, language, fence=False))
    return found


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """Fenced code blocks: (language, line number of their first line, their lines)."""
    blocks: list[tuple[str, int, list[str]]] = []
    opening = True
    for number, line in enumerate(_lines(text), 1):
        if line.fence and opening:
            blocks.append((line.language or "", number + 1, []))
        elif not line.fence and line.language is not None:
            blocks[-1][2].append(line.text)
        opening = opening != line.fence
    return blocks


def _without_code_blocks(text: str) -> str:
    """The page with its fenced blocks blanked out, newlines kept (offsets give lines)."""
    return "\n".join(line.text if line.language is None else "" for line in _lines(text))


def _without_code(text: str) -> str:
    """The page with fenced blocks and inline code blanked out (newlines kept, so offsets
    still give line numbers): links and headings are only looked for in the prose."""
    blank = _without_code_blocks(text)
    return re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group()), blank)


def shown_commands(page: Path) -> list[Shown]:
    """Each `fusion …` command line of the page's ```bash blocks: continuation lines joined,
    a trailing `# comment` dropped."""
    found = []
    for language, first, lines in _blocks(page.read_text(encoding="utf-8")):
        if language not in ("bash", "sh", "shell", "console"):
            continue
        joined, start = "", None
        for offset, line in enumerate(lines):
            if start is None:
                start = first + offset
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            command = re.sub(r"(^|\s)#.*$", "", joined + line).strip()
            if command.startswith("fusion "):
                found.append(Shown(page, start, command))
            joined, start = "", None
    return found


def quoted_commands(page: Path) -> list[Shown]:
    """Each `fusion …` inline code span of the page's prose (`fusion inspect DIR [--row ID]`):
    optional parts' brackets dropped, so their options are checked too."""
    text = page.read_text(encoding="utf-8")
    prose, found = _without_code_blocks(text), []
    for match in re.finditer(r"`([^`]+)`", prose):
        words = [word.strip("[]") for word in match.group(1).split()]
        if len(words) > 1 and words[0] == "fusion":
            line = prose.count("\n", 0, match.start()) + 1
            found.append(Shown(page, line, shlex.join(word for word in words if word)))
    return found


def _options(command) -> set[str]:
    """Every spelling of the command's options (typer builds click commands of its own copy of
    click, so they are told apart by what they are, not by click's classes)."""
    names = {"--help"}
    for parameter in command.params:
        if parameter.param_type_name == "option":
            names.update(parameter.opts, parameter.secondary_opts)
    return names


def problems_with(shown: Shown, cli) -> list[str]:
    """What the CLI would refuse in a shown command: an unknown subcommand or option."""
    try:
        words = shlex.split(shown.text)
    except ValueError as error:
        return [f"{shown.where()}: `{shown.text}` does not parse as a shell line ({error})"]
    problems = []
    segments, current = [], []
    for word in words:  # `fusion a && fusion b`: each command on its own
        if word in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    for segment in segments:
        if not segment or segment[0] != "fusion":
            continue
        arguments = segment[1:]
        group_options = _options(cli)
        while arguments and arguments[0].startswith("-"):
            option = arguments.pop(0).split("=", 1)[0]
            if option not in group_options:
                problems.append(f"{shown.where()}: `fusion` has no option {option}")
        if not arguments:
            continue
        name, rest = arguments[0], arguments[1:]
        command = cli.commands.get(name)
        if command is None:
            problems.append(
                f"{shown.where()}: `fusion {name}` is not a fusion command "
                f"(there are: {', '.join(sorted(cli.commands))})"
            )
            continue
        accepted = _options(command)
        for word in rest:
            if word == "--":
                break
            if not word.startswith("-") or word == "-" or re.fullmatch(r"-\d[\d.]*", word):
                continue  # an argument or a placeholder (CONFIG, DIR, NAME=DIR), not an option
            option = word.split("=", 1)[0]
            if option not in accepted:
                problems.append(
                    f"{shown.where()}: `fusion {name}` has no option {option} "
                    f"(it has: {', '.join(sorted(accepted))})"
                )
    return problems


def test_every_fusion_command_shown_in_the_docs_is_one_the_cli_accepts():
    """In ```bash blocks and in the prose's inline code alike."""
    cli = typer.main.get_command(app)
    assert cli.commands, "the CLI has no subcommands"
    shown = [
        command for page in PAGES for command in (*shown_commands(page), *quoted_commands(page))
    ]
    problems = [problem for command in shown for problem in problems_with(command, cli)]
    assert not problems, "shown commands the CLI would refuse:\n" + "\n".join(problems)


def test_the_readme_shows_the_way_from_validate_to_eval():
    """The front door's example is the whole path for one's own models (and the extraction
    above finds commands at all: a broken fence would make the CLI check pass on nothing)."""
    shown = {command.text.split()[1] for command in shown_commands(README)}
    assert {"validate", "estimate", "prepare", "inspect", "train", "eval"} <= shown, shown


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, links and formatting reduced to their text,
    punctuation dropped (letters, digits, `_`, `-` and spaces kept), spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated one gets -1, -2, … as on GitHub)."""
    text = page.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    found = set()
    # the copy without code says which lines are headings (not a `# comment` in a block);
    # the heading's own text, inline code included, is read from the page as written
    for raw, prose in zip(text.split("\n"), _without_code(text).split("\n"), strict=True):
        if not re.match(r"^#{1,6}\s", prose):
            continue
        base = slug(re.sub(r"^#{1,6}\s+|\s+#+\s*$", "", raw))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_every_relative_link_in_the_docs_resolves_to_a_file_and_heading():
    problems = []
    for page in PAGES:
        prose = _without_code(page.read_text(encoding="utf-8"))
        for match in LINK.finditer(prose):
            target = match.group(1)
            line = prose.count("\n", 0, match.start()) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # http, https, mailto: not a file of this repository
            path, _, anchor = target.partition("#")
            file = (page.parent / unquote(path)).resolve() if path else page
            if not file.exists():
                problems.append(f"{where}: ({target}) leads to {path}, which does not exist")
                continue
            if anchor and file.suffix == ".md" and unquote(anchor) not in anchors(file):
                problems.append(
                    f"{where}: ({target}): {file.relative_to(ROOT)} has no heading "
                    f"#{anchor} (it has: {', '.join(sorted(anchors(file)))})"
                )
    assert not problems, "links that lead nowhere:\n" + "\n".join(problems)


def test_the_readme_fits_two_screens():
    lines = README.read_text(encoding="utf-8").rstrip("\n").count("\n") + 1
    assert lines <= 200, f"README.md has {lines} lines; the rest belongs in docs/ (at most 200)"


def _verdict_table(page: Path) -> list[str]:
    lines = page.read_text(encoding="utf-8").split("\n")
    start = lines.index("| comparison | average | code | prose | arith |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_the_readme_shows_the_demo_verdicts_that_results_records():
    """The front door copies the demo's verdict table from docs/results.md: the two agree."""
    assert _verdict_table(README) == _verdict_table(ROOT / "docs" / "results.md")
