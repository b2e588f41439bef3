"""The ``aetcdcfg`` command: inspect, watch, validate, push and roll back config a settings model reads.

``etcdctl`` knows bytes; this knows the service's pydantic settings model. Connection options and
``ETCD_*`` environment variables are those of :class:`~aetcdcfg.EtcdSettings`. Errors print one line
and exit non-zero (``--verbose`` shows the traceback). Written as ``cli(*args) -> int`` so it can be
tested in-process as well as through the console script.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import anyio
import structlog

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup

from ..errors import ConfigurationError
from . import _canary, _dev, _fleet, _ops, _read, _write
from ._common import UsageError, normalize_prefix, positive_float
from ._files import flatten, unflatten

__all__ = ["build_parser", "cli", "flatten", "main", "unflatten"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection (defaults from ETCD_* environment variables)")
    conn.add_argument(
        "--endpoints", type=lambda v: [p.strip() for p in v.split(",") if p.strip()], metavar="URLS"
    )
    conn.add_argument("--username")
    conn.add_argument("--password", help="prefer ETCD_PASSWORD: command lines are visible to other users")
    conn.add_argument("--ca-file")
    conn.add_argument("--cert-file")
    conn.add_argument("--key-file")
    conn.add_argument("--connect-timeout", type=positive_float, metavar="SECONDS")
    conn.add_argument("--request-timeout", type=positive_float, metavar="SECONDS")
    common.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")

    parser = argparse.ArgumentParser(
        prog="aetcdcfg", description="Inspect, watch, validate and push etcd config for a settings model."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (_read, _write, _ops, _dev, _fleet, _canary):
        group.register(sub, common)
    return parser


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
