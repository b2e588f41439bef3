"""What every command shares: usage errors, model loading, masking, the client, output, signals."""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import anyio
from pydantic import BaseModel

from .._diff import ConfigDiff
from ..client import EtcdClient
from ..source import MASK
from ._secrets import Secrets

__all__ = [
    "Subparsers",
    "MASK",
    "Secrets",
    "UsageError",
    "diff_json",
    "diff_lines",
    "json_value",
    "load_model",
    "make_client",
    "normalize_prefix",
    "out",
    "positive_float",
    "positive_int",
    "revision",
    "show",
    "stop_on_signals",
]

#: What ``argparse.ArgumentParser.add_subparsers()`` returns, for the command groups to add to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """A problem with the command line or its inputs (a file, a model name)."""


# -- argument types (argparse turns their ArgumentTypeError into a usage error, exit 2) --------------


def positive_int(text: str) -> int:
    """A count of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def revision(text: str) -> int:
    """An etcd revision: etcd's revisions start at 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a revision number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"etcd's revisions start at 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """Seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


# -- helpers ---------------------------------------------------------------------------------------


def normalize_prefix(value: str) -> str:
    if not value:
        raise UsageError("the prefix must not be empty (e.g. /myservice/)")
    return value if value.endswith("/") else value + "/"


def load_model(spec: str) -> type[BaseModel]:
    """``package.module:ClassName`` -> the class (the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model {spec!r}: expected module:Class, e.g. myservice.settings:Settings")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r}: {exc}") from exc
    model = getattr(module, attr, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise UsageError(f"--model {spec!r}: {attr!r} is not a pydantic model in {module_name!r}")
    return model


def show(value: bytes | None) -> str:
    """How a value prints: text if UTF-8, a byte count otherwise (mask secrets first)."""
    if value is None:
        return "(absent)"
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return f"<{len(value)} bytes, not UTF-8>"
    return json.dumps(text, ensure_ascii=False) if ("\n" in text or text != text.strip()) else text


def json_value(value: bytes) -> Any:
    """A value as JSON-ready data: text, or ``{"base64": ...}`` when not UTF-8 (mask secrets first)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def _masker(prefix: str, model: type[BaseModel] | None) -> Callable[[str, bytes], bytes]:
    """``(full key, value) -> value`` with the secrets of ``model`` masked (see :class:`Secrets`)."""
    secrets = Secrets(model)

    def masked(key: str, value: bytes) -> bytes:
        return secrets.mask(key[len(prefix) :], value) if key.startswith(prefix) else value

    return masked


def diff_lines(prefix: str, diff: ConfigDiff, model: type[BaseModel] | None, indent: str = "") -> list[str]:
    """``+ key = value``, ``~ key: old -> new`` and ``- key`` lines in key order, secrets masked."""
    mask = _masker(prefix, model)
    lines = []
    for key in diff.keys:
        if key in diff.added:
            lines.append(f"{indent}+ {key} = {show(mask(key, diff.added[key]))}")
        elif key in diff.changed:
            old, new = diff.changed[key]
            lines.append(f"{indent}~ {key}: {show(mask(key, old))} -> {show(mask(key, new))}")
        else:
            lines.append(f"{indent}- {key}")
    return lines


def diff_json(prefix: str, diff: ConfigDiff, model: type[BaseModel] | None) -> dict[str, Any]:
    """A diff as JSON-ready data: added/removed map keys to values, changed to ``{old, new}``."""
    mask = _masker(prefix, model)
    return {
        "added": {k: json_value(mask(k, v)) for k, v in diff.added.items()},
        "changed": {
            k: {"old": json_value(mask(k, old)), "new": json_value(mask(k, new))}
            for k, (old, new) in diff.changed.items()
        },
        "removed": {k: json_value(mask(k, v)) for k, v in diff.removed.items()},
    }


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[anyio.CancelScope]:
    """A cancel scope that SIGINT or SIGTERM cancels, so long-running commands exit cleanly."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        scope.cancel()
                        return

            tg.start_soon(watch_signals)
            try:
                yield scope
            finally:
                tg.cancel_scope.cancel()


def make_client(args: argparse.Namespace) -> EtcdClient:
    overrides = {
        name: getattr(args, name)
        for name in (
            "endpoints",
            "username",
            "password",
            "ca_file",
            "cert_file",
            "key_file",
            "connect_timeout",
            "request_timeout",
        )
        if getattr(args, name, None) is not None
    }
    return EtcdClient(**overrides)


def out(text: str = "") -> None:
    print(text, flush=True)
