"""mkdocs hooks (``hooks:`` in mkdocs.yml), and the CLI reference's generator.

- The home page is README.md itself (its ``docs/...`` links made relative to the site), so the landing
  page on GitHub and on the site never drift apart.
- Docstrings are written with Sphinx roles (``:class:`~aetcdcfg.EtcdSettings```); the API page shows
  them as plain code (``EtcdSettings``) rather than with the role's markup.
- ``docs/cli.md`` is the CLI reference, every command's ``--help``, generated from the parser and
  checked in (so it reads on GitHub too): ``python docs/hooks.py`` rewrites it, and
  ``tests/test_docs.py`` fails when it differs from the parser.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI_PAGE = ROOT / "docs" / "cli.md"
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
    """``parser``'s ``--help`` at a fixed width, whatever the terminal."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)  # type: ignore[assignment,misc]
    return parser.format_help()


def cli_reference() -> str:
    """The reference as Markdown: ``aetcdcfg.cli.reference()`` where the CLI has it, else the same
    walk of the parser: ``aetcdcfg --help``, then each command's ``--help``, in the parser's order."""
    from aetcdcfg import cli

    if hasattr(cli, "reference"):
        return str(cli.reference())
    parser = cli.build_parser()
    parts = [
        "# The `aetcdcfg` command\n",
        "<!-- Generated from the parser; do not edit by hand: python docs/hooks.py -->\n",
        "```text\n" + help_text(parser).rstrip() + "\n```\n",
    ]
    for name, sub in subcommands(parser).items():
        parts += [f"## `aetcdcfg {name}`\n", "```text\n" + help_text(sub).rstrip() + "\n```\n"]
    return "\n".join(parts)


_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):(?=<code>)")
_TILDE = re.compile(r"<code>~(?:\w+\.)*(\w+)</code>")


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri.startswith("reference/"):
        html = _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html))
    return html


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "index.md":
        return readme_as_home()
    return markdown


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    CLI_PAGE.write_text(cli_reference())
    print(f"wrote {CLI_PAGE.relative_to(ROOT)}")
