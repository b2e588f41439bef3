"""mkdocs hooks (``hooks:`` in mkdocs.yml).

- The home page is README.md itself (its ``docs/...`` links made relative to the site), so the landing
  page on GitHub and on the site never drift apart.
- Docstrings are written with Sphinx roles (``:class:`~aetcdcfg.EtcdSettings```); the API page shows
  them as plain code (``EtcdSettings``) rather than with the role's markup.
- The CLI reference (``reference/cli.md``) is generated from the ``aetcdcfg`` argparse parser at build
  time: every command's ``--help``, so it cannot fall behind the code. ``tests/test_docs.py`` checks
  that it renders every command.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- cli-reference -->"
WIDTH = 100


def readme_as_home() -> str:
    """README.md with its links into docs/ relative to the site root."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_text(parser: argparse.ArgumentParser) -> str:
    """``parser``'s ``--help`` at a fixed width, without colour, whatever the terminal."""
    saved = parser.formatter_class
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)  # type: ignore[assignment,misc]
    color = getattr(parser, "color", None)
    if color is not None:  # Python 3.14 colours help on a terminal
        parser.color = False  # type: ignore[attr-defined]
    try:
        return parser.format_help()
    finally:
        parser.formatter_class = saved
        if color is not None:
            parser.color = color  # type: ignore[attr-defined]


def cli_reference() -> str:
    """Markdown: ``aetcdcfg --help``, then each command's ``--help``, in the parser's order."""
    from aetcdcfg.cli import build_parser

    parser = build_parser()
    parts = ["## `aetcdcfg`\n", "```text\n" + help_text(parser) + "```\n"]
    for name, sub in subcommands(parser).items():
        parts += [f"## `aetcdcfg {name}`\n", "```text\n" + help_text(sub) + "```\n"]
    return "\n".join(parts)


_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):(?=<code>)")
_TILDE = re.compile(r"<code>~(?:\w+\.)*(\w+)</code>")


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri.startswith("reference/"):
        html = _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html))
    return html


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    src = page.file.src_uri
    if src == "index.md":
        return readme_as_home()
    if CLI_MARKER in markdown:
        return markdown.replace(CLI_MARKER, cli_reference())
    return markdown
