"""How the library logs: through structlog when the host app configured it, stdlib logging otherwise.

A library must not print to stdout: structlog's *unconfigured* default prints every level there,
which corrupts programs whose stdout is data (a CLI piping JSON, a worker speaking a protocol). So
each call checks ``structlog.is_configured()``:

* configured (the app called ``structlog.configure``): the event goes through the app's structlog
  pipeline, as ``structlog.get_logger("aetcdcfg")`` — nothing changes for structlog users;
* not configured: it goes to the stdlib logger ``"aetcdcfg"`` as ``"event key=value ..."`` with the
  fields also in ``record.aetcdcfg`` (for JSON formatters). Like httpx, urllib3 or grpc, the library
  adds no handler: with no logging set up at all, Python's last-resort handler prints warnings and
  errors to stderr and drops the rest; ``logging.basicConfig(level=logging.INFO)`` shows info too.

Event names are stable and dotted (``watch.resumed``); the README lists them.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["Logger", "get_logger"]

NAME = "aetcdcfg"
_stdlib = logging.getLogger(NAME)


class Logger:
    """A bound-context logger with structlog's call shape: ``log.bind(prefix=p).info("watch.resumed")``."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any] | None = None) -> None:
        self._context = context or {}

    def bind(self, **fields: Any) -> Logger:
        return Logger({**self._context, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback of the exception being handled."""
        self._log(logging.ERROR, "exception", event, fields)

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(structlog.get_logger(NAME), method)(event, **self._context, **fields)
            return
        if not _stdlib.isEnabledFor(level):
            return
        merged = {**self._context, **fields}
        text = " ".join(f"{key}={value!r}" for key, value in merged.items())
        _stdlib.log(
            level,
            "%s %s",
            event,
            text,
            exc_info=method == "exception",
            extra={"aetcdcfg": {"event": event, **merged}},
            stacklevel=3,
        )


def get_logger() -> Logger:
    """The library's logger (see the module docstring for where its events go)."""
    return Logger()
