"""The ``aetcdcfg`` command: inspect, watch, validate, push and roll back config a settings model reads.

``etcdctl`` knows bytes; this knows the service's pydantic settings model. Connection options and
``ETCD_*`` environment variables are those of :class:`~aetcdcfg.EtcdSettings`. Errors print one line
and exit non-zero (``--verbose`` shows the traceback). Written as ``cli(*args) -> int`` so it can be
tested in-process as well as through the console script.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback

import anyio
import structlog

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup

from .._version import __version__
from ..errors import ConfigurationError
from . import _canary, _dev, _fleet, _ops, _read, _write
from ._common import Subparsers, UsageError, normalize_prefix, positive_float
from ._files import flatten, unflatten

__all__ = ["build_parser", "cli", "flatten", "main", "reference", "unflatten"]


DESCRIPTION = (
    "Inspect, watch, validate and change the etcd config a pydantic settings model reads. Every "
    "command that talks to etcd takes the connection options (defaults from ETCD_* environment "
    "variables); errors print one line and exit 1 (2 for usage errors)."
)
SECRETS_NOTE = (
    "Secrets: get, watch, history and diff hide every value unless --model says which fields are "
    "secret (then only those are masked) or --show-values asks for all of them in clear; commands "
    "that write mask the model's secrets in the diffs they show."
)


def _parsers() -> tuple[argparse.ArgumentParser, Subparsers]:
    """The parser and its subcommands' action (for :func:`reference` to walk)."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks on errors and the library's debug logs"
    )
    connection = argparse.ArgumentParser(add_help=False, parents=[verbose])
    conn = connection.add_argument_group("connection (defaults from ETCD_* environment variables)")
    conn.add_argument(
        "--endpoints",
        type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
        metavar="URLS",
        help="comma-separated etcd client URLs, e.g. http://127.0.0.1:2379 (ETCD_ENDPOINTS)",
    )
    conn.add_argument("--username", help="etcd user, when etcd has auth on (ETCD_USERNAME)")
    conn.add_argument("--password", help="prefer ETCD_PASSWORD: command lines are visible to other users")
    conn.add_argument("--ca-file", metavar="PATH", help="CA bundle to verify https endpoints (ETCD_CA_FILE)")
    conn.add_argument("--cert-file", metavar="PATH", help="client certificate for mTLS (ETCD_CERT_FILE)")
    conn.add_argument("--key-file", metavar="PATH", help="the client certificate's key (ETCD_KEY_FILE)")
    conn.add_argument(
        "--connect-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="give up connecting after this long (ETCD_CONNECT_TIMEOUT)",
    )
    conn.add_argument(
        "--request-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="give up on one request after this long (ETCD_REQUEST_TIMEOUT)",
    )

    parser = argparse.ArgumentParser(prog="aetcdcfg", description=DESCRIPTION, epilog=SECRETS_NOTE)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for group in (_read, _write, _ops, _fleet, _canary):
        group.register(sub, connection)
    _dev.register(sub, verbose)  # a local etcd: no connection options to take
    return parser, sub


def build_parser() -> argparse.ArgumentParser:
    """The ``aetcdcfg`` argument parser."""
    return _parsers()[0]


#: The width :func:`reference` formats help at, whatever the terminal.
REFERENCE_WIDTH = 100
#: Where the top-level help's summaries start in :func:`reference`: CPython 3.13 measures the
#: indented command names when placing that column and earlier versions do not, so the column is
#: fixed (the widest of both, "-h, --help" and its padding) instead of left to argparse.
TOP_HELP_POSITION = 14


class _StableHelp(argparse.HelpFormatter):
    """argparse's help at a fixed width, laid out alike on CPython 3.10 to 3.13 (3.13 writes an
    option with a value as ``-m, --message MESSAGE``; here it is ``-m MESSAGE, --message MESSAGE``
    everywhere, as before 3.13)."""

    def __init__(self, prog: str, max_help_position: int = 24) -> None:
        super().__init__(prog, max_help_position=max_help_position, width=REFERENCE_WIDTH)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{option} {value}" for option in action.option_strings)


def reference() -> str:
    """The command's reference as Markdown: ``aetcdcfg --help`` and each command's ``--help``.

    Generated from the parser, so it says what the parser does (``tests/test_cli_reference.py``
    checks every command and option has help, and a checked-in ``docs/cli.md`` equals this), and
    the same on every supported CPython, whichever one generates the page.
    """
    parser, sub = _parsers()

    def block(command: argparse.ArgumentParser, help_position: int = 24) -> str:
        command.formatter_class = functools.partial(_StableHelp, max_help_position=help_position)
        return "```text\n" + command.format_help().rstrip() + "\n```\n"

    parts = [
        "# The `aetcdcfg` command\n",
        "<!-- Generated from the parser by aetcdcfg.cli.reference(); do not edit by hand:\n"
        "     python -c 'import aetcdcfg.cli as c; print(c.reference(), end=\"\")' > docs/cli.md -->\n",
        block(parser, TOP_HELP_POSITION),
    ]
    for name, command in sub.choices.items():
        parts += [f"## `aetcdcfg {name}`\n", block(command)]
    return "\n".join(parts)


def _configure_logging(verbose: bool) -> None:
    """The command is an application, so it may set up logging (the library never does): library
    events go to stderr, warnings and worse only unless ``--verbose``."""
    level = logging.DEBUG if verbose else logging.WARNING
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _one_line(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or repr(exc)


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one, as a task group raises it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def cli(*argv: str) -> int:
    """Run the command line; returns the exit code (0 ok, 1 refused or failed, 2 usage).

    Arguments are checked by the parser (a bad one is argparse's usage error, exit 2); every other
    error prints one line, ``aetcdcfg: <kind>: <message>`` (``--verbose`` adds the traceback).
    """
    parser = build_parser()
    for arg in argv:
        try:
            arg.encode()
        except UnicodeEncodeError:  # a byte the shell passed that is not UTF-8 (surrogate-escaped)
            parser.error(
                f"argument {os.fsencode(arg)!r} is not valid UTF-8: keys, values and prefixes are "
                "UTF-8 text (check the terminal's encoding)"
            )
    args = parser.parse_args(list(argv))
    try:
        if getattr(args, "prefix", None) is not None and args.command in ("get", "watch"):
            args.prefix = normalize_prefix(args.prefix)
        return int(anyio.run(args.run, args))
    except KeyboardInterrupt:
        return 130
    except Exception as raised:
        exc = _leaf(raised)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if args.verbose:
            traceback.print_exception(raised)
        # ours name what to do; anything else (a bug, an OSError) is one line too
        usage = isinstance(exc, (UsageError, ConfigurationError))
        kind, code = ("usage", 2) if usage else (type(exc).__name__, 1)
        print(f"aetcdcfg: {kind}: {_one_line(exc)}", file=sys.stderr)
        return code


def main() -> None:
    """The console script. Only here, in the program, is logging configured: ``cli()`` may run
    inside someone else's process (tests, an admin tool) whose logging is not ours to change."""
    _configure_logging("-v" in sys.argv or "--verbose" in sys.argv)
    raise SystemExit(cli(*sys.argv[1:]))
