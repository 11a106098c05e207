"""The documentation stays true: its runnable examples run, and its references resolve.

* Every shell block of ``README.md`` and ``docs/*.md`` whose fence reads ```` ```bash runnable ````
  is run with ``bash -euo pipefail``. The blocks of one page run in order, in one fresh temporary
  folder, so a later block can use what an earlier one wrote. A block fails the test when any of
  its commands fails. ``kitspipe`` on PATH runs this checkout with this interpreter.
* Relative links (and their ``#anchors``) point at files and headings that exist.
* Every ``test_*.py::test_*`` named in the docs exists, so docs/reliability.md cannot cite a
  test that was never written or has been renamed.
* Every plan field and every command-line option is mentioned in the docs.

Blocks with a plain ```` ```bash ```` fence (GPU commands, long training) are never run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
RUNNABLE = re.compile(r"^```bash runnable[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# Pages that other people write; a link to one of them is checked once the page exists.
MAINTAINED_ELSEWHERE = {"performance.md", "results.md"}
BLOCK_TIMEOUT_S = 120


def _runnable_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in RUNNABLE.finditer(text)]


def _pages_with_blocks() -> list[Path]:
    return [page for page in PAGES if _runnable_blocks(page)]


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory) -> dict[str, str]:
    """PATH with a ``kitspipe`` that runs this checkout under the test's own interpreter."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "kitspipe"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kitspipe "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "Agg"
    return env


def test_the_docs_have_runnable_examples():
    pages = {page.name for page in _pages_with_blocks()}
    assert "getting-started.md" in pages, "the getting-started example lost its ```bash runnable fence"


@pytest.mark.parametrize("page", _pages_with_blocks(), ids=lambda p: p.name)
def test_runnable_blocks_succeed(page: Path, tmp_path: Path, shell_env: dict[str, str]):
    for line, code in _runnable_blocks(page):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=shell_env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert result.returncode == 0, (
            f"{page.relative_to(REPO)}:{line}: block failed with exit code {result.returncode}\n"
            f"--- block ---\n{code}--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # no headings inside code
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            if linked.name not in MAINTAINED_ELSEWHERE:
                broken.append(f"{target}: no such file")
            continue
        if anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_tests_named_in_the_docs_exist():
    reference = re.compile(r"((?:tests/)?(?:reliability/)?test_\w+\.py)::(test_\w+)")
    missing = []
    for page in PAGES:
        for file_name, function in reference.findall(page.read_text(encoding="utf-8")):
            path = REPO / "tests" / file_name.removeprefix("tests/")
            if not path.is_file() or not re.search(rf"^\s*def {function}\(", path.read_text(), re.MULTILINE):
                missing.append(f"{page.name}: {file_name}::{function}")
    assert not missing, "tests named in the docs that do not exist: " + ", ".join(sorted(set(missing)))


def test_every_plan_field_is_documented():
    from kitspipe import plans

    text = (DOCS / "plans.md").read_text(encoding="utf-8")
    classes = {getattr(plans, name) for name in dir(plans) if dataclasses.is_dataclass(getattr(plans, name))}
    assert plans.Plans in classes and plans.TrainingPlan in classes
    undocumented = sorted(f"{cls.__name__}.{field.name}" for cls in classes for field in dataclasses.fields(cls)
                          if not re.search(rf"^\|[^\n]*`{field.name}`", text, re.MULTILINE))
    assert not undocumented, "plan fields without a row in docs/plans.md: " + ", ".join(undocumented)


def test_every_command_line_option_is_documented():
    import argparse

    from kitspipe.cli import build_parser

    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"kitspipe {option}" for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option not in ("--help",) and option not in text]
    for name, subparser in subcommands.choices.items():
        if f"kitspipe {name}" not in text:
            missing.append(f"kitspipe {name}")
        for action in subparser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and option not in text:
                    missing.append(f"kitspipe {name} {option}")
    assert not missing, "command-line options not mentioned in the docs: " + ", ".join(missing)
