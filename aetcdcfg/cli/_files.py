"""Settings files: YAML, JSON or TOML in, etcd keys out (``flatten``), and back (``unflatten``)."""

from __future__ import annotations

import base64
import datetime
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._common import UsageError

__all__ = ["dumps", "flatten", "load_file", "loads", "unflatten"]


def load_file(path: Path) -> dict[str, Any]:
    """A YAML, JSON or TOML file of settings (by its suffix) as a dict."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return loads(text, path.suffix.lower(), str(path))


def loads(text: bytes, suffix: str, name: str) -> dict[str, Any]:
    """The settings in ``text``, parsed as the format its file ``suffix`` says (``.yaml``, ...)."""
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise UsageError("YAML files need PyYAML: pip install 'aetcdcfg[cli]'") from exc
            try:
                data = yaml.safe_load(text)
            except yaml.MarkedYAMLError as exc:
                # str(exc) quotes the offending line, which may hold a secret: where, and what, only.
                mark = exc.problem_mark
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise UsageError(f"{name!r} is not valid YAML: {exc.problem or exc.context}{where}") from None
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text.decode())
        else:
            raise UsageError(f"{name!r}: use a .yaml, .yml, .json or .toml file")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{name!r} is not valid {suffix[1:].upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{name!r}: the top level must be a mapping of settings")
    return data


def dumps(items: Mapping[str, bytes], *, as_json: bool, header: str = "") -> str:
    """What ``dump`` prints for ``items`` (relative keys): JSON, or YAML after ``header`` (comment
    lines); :func:`loads` and :func:`flatten` turn it back into the same items."""
    tree = unflatten(items)
    if as_json:
        return json.dumps(tree, indent=2, default=lambda b: {"base64": base64.b64encode(b).decode()})
    try:
        import yaml
    except ImportError as exc:
        raise UsageError("YAML output needs PyYAML: pip install 'aetcdcfg[cli]' (or use --json)") from exc

    class Dumper(yaml.SafeDumper):
        """Text with a character that is not printable in double quotes, where YAML escapes it:
        PyYAML writes U+0085, U+2028 and U+2029 raw in plain or single-quoted text, and reads them
        back as line breaks (NEL as "\n", folded to a space), so those values changed."""

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = None if value.isprintable() else '"'
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    # no folding of long lines: a value reads back as written, whatever its length
    dumped = yaml.dump(tree, Dumper=Dumper, sort_keys=True, allow_unicode=True, width=2**31 - 1)
    return header + dumped.rstrip()


def _iso(value: Any) -> str:
    """YAML and TOML dates and times as ISO 8601 text (what pydantic reads back); nothing else
    without a JSON form is guessed at."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} has no JSON form")


def flatten(data: Mapping[str, Any], parent: str = "") -> dict[str, bytes]:
    """Nested mappings become ``a/b`` keys; other values become their etcd bytes (str as is,
    bytes as is, dates and times as ISO 8601 text, anything else as JSON). A value with no JSON
    form (a YAML set, say) is a :class:`UsageError` naming its key."""
    out: dict[str, bytes] = {}
    for key, value in data.items():
        path = f"{parent}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "/"))
        elif isinstance(value, bytes):
            out[path] = value
        elif isinstance(value, str):
            out[path] = value.encode()
        elif isinstance(value, (datetime.date, datetime.time)):
            out[path] = _iso(value).encode()
        else:
            try:
                text = json.dumps(value, separators=(",", ":"), default=_iso, allow_nan=True)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{path}: {exc}; write it as a string, a list or a mapping") from None
            out[path] = text.encode()
    return out


def unflatten(items: Mapping[str, bytes]) -> dict[str, Any]:
    """The inverse of :func:`flatten` for a dump: nested where unambiguous, ``a/b`` keys otherwise.
    Values stay text (or bytes when not UTF-8), so a dump pushed back writes the same bytes."""
    tree: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for key in sorted(items):
        raw = items[key]
        try:
            value: Any = raw.decode()
        except UnicodeDecodeError:
            value = raw
        parts = [p for p in key.split("/") if p]
        node = tree
        ok = bool(parts) and "/".join(parts) == key
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                ok = False
                break
            node = child
        if ok and parts[-1] not in node:
            node[parts[-1]] = value
        else:
            flat[key] = value
    tree.update(flat)
    return tree
