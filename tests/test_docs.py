"""The docs run: every Python and console example of README.md and docs/ is executed against a real
etcd (see ``tests/docs_runner.py`` for what each kind of block means), and the reference pages cover
the public API and the CLI parser. An API change that breaks an example fails here."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import aetcdcfg
from aetcdcfg.cli import build_parser

from . import docs_runner

RUNNABLE = [page for page in docs_runner.pages() if any(b.kind != "other" for b in docs_runner.blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(docs_runner.ROOT)) for p in RUNNABLE])
def test_page_examples_run_as_written(page: Path, tmp_path: Path) -> None:
    ran = list(docs_runner.run_page(page, tmp_path))
    assert ran, f"{page}: no example ran"


def test_skipped_examples_are_few_and_say_why() -> None:
    every = [b for page in docs_runner.pages() for b in docs_runner.blocks(page)]
    runnable = [b for b in every if b.lang in ("python", "console")]
    skipped = [b for b in runnable if b.skip is not None]
    assert all(b.skip.strip() for b in skipped)  # type: ignore[union-attr]
    assert len(skipped) * 5 <= len(runnable), [b.where for b in skipped]


def test_api_reference_documents_every_public_name() -> None:
    page = (docs_runner.DOCS / "reference" / "api.md").read_text()
    documented = {line.removeprefix("::: ").strip() for line in page.splitlines() if line.startswith("::: ")}
    public = {f"aetcdcfg.{name}" for name in aetcdcfg.__all__ if not name.startswith("__")}
    for module in ("aetcdcfg.fastapi", "aetcdcfg.metrics", "aetcdcfg.testing"):
        names = importlib.import_module(module).__all__
        public |= {f"{module}.{name}" for name in names}
    assert sorted(public - documented) == [], "public names missing from docs/reference/api.md"
    assert sorted(documented - public) == [], "docs/reference/api.md documents names that are not public"


def _hooks():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("docs_hooks", docs_runner.DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_page_is_the_parsers_help() -> None:
    """``docs/cli.md`` is every command's ``--help``, checked in: regenerate it with
    ``python docs/hooks.py`` when this fails (a command or option changed)."""
    hooks = _hooks()
    page = (docs_runner.DOCS / "cli.md").read_text()
    assert page == hooks.cli_reference(), "docs/cli.md differs from the parser: run python docs/hooks.py"
    commands = hooks.subcommands(build_parser())
    assert len(commands) >= 10
    for name in commands:
        assert f"## `aetcdcfg {name}`" in page


PYTHON_BLOCKS = [
    b for page in docs_runner.pages() for b in docs_runner.blocks(page) if b.lang == "python" and not b.skip
]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_examples_are_linted_like_the_code(block: docs_runner.Block) -> None:
    """ruff, with the project's settings: formatted, and no unused import or undefined name (except
    in a continuation, whose names come from the file it continues)."""
    ruff = [sys.executable, "-m", "ruff"]
    config = ["--config", str(docs_runner.ROOT / "pyproject.toml"), "--stdin-filename", "example.py"]
    formatted = subprocess.run(
        [*ruff, "format", *config, "-"], input=block.text, capture_output=True, text=True
    )
    assert formatted.returncode == 0 and formatted.stdout == block.text, f"{block.where}: not ruff-formatted"
    ignore = ["--ignore", "F821"] if (block.title or "").endswith(docs_runner.CONTINUED) else []
    checked = subprocess.run(
        [*ruff, "check", *config, "--select", "E,F,W,B,UP", *ignore, "-"],
        input=block.text,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, f"{block.where}:\n{checked.stdout}"
