"""The layering of ARCHITECTURE.md, checked from the source: imports point down, privacy is kept,
only _grpc_errors reads the text of etcd's errors.

Run without etcd: it reads the package's modules with ``ast`` and never imports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aetcdcfg"

#: Lower layers first; a module may import only from its own layer or below (ARCHITECTURE.md).
LAYERS: list[set[str]] = [
    {"errors", "events", "settings", "status", "_keys", "_backoff", "_log", "_wakeup", "_exits", "_version"},
    {"_grpc_errors", "_resume", "_diff", "_values", "_names", "source", "_records", "_canary"},
    {"_channel", "_validate"},
    {"_connection"},
    {"_reads", "_history"},
    {"_kv", "_stream"},
    {"_fanout"},
    {"client"},
    {"_reporter", "_fleetview"},
    {"_layers", "_presence"},
    {"live"},
    {"_report", "_fleet", "_rollout", "_audit"},
    {"fastapi", "metrics", "cli", "testing", "__init__", "__main__"},
]


def _module_name(path: Path) -> str:
    """``aetcdcfg/cli/_read.py`` -> ``cli`` (a subpackage counts as one module of the package)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _layer(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"aetcdcfg.{name} is in no layer of tests/test_architecture.py: place it")


def _internal_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (relative or absolute), as layer names."""
    tree = ast.parse(path.read_text(), str(path))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for top-level modules
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "aetcdcfg":
                    parts = node.module.split(".")[1:]
                else:
                    continue
            elif node.level - 1 < depth:
                continue  # inside its own subpackage
            else:
                parts = (node.module or "").split(".") if node.module else []
            if parts and parts[0]:
                found.add(parts[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    here = _module_name(path)
    upward = [name for name in _internal_imports(path) if name != here and _layer(name) > _layer(here)]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {_layer(here)}) imports upward: {upward}"


def _private_reaches(path: Path) -> list[str]:
    """``obj._name`` uses where ``_name`` is not defined in the same file (self/cls excepted), and
    ``from .module import _name`` (importing a private module, ``from . import _cli_group``, is fine)."""
    tree = ast.parse(path.read_text(), str(path))
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            defined.add(node.value)  # __slots__ entries
    reaches = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            reaches += [
                f"line {node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__") and node.module
            ]
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in defined:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        reaches.append(f"line {node.lineno}: .{attr}")
    return reaches


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_reaches_into_anothers_private_names(path: Path) -> None:
    reaches = [r for r in _private_reaches(path) if not r.endswith("._SubParsersAction")]
    assert not reaches, f"{path.relative_to(PACKAGE)} uses private names defined elsewhere: {reaches}"


def test_every_module_is_placed_in_a_layer() -> None:
    for path in _sources():
        _layer(_module_name(path))


def test_importing_the_package_has_no_cycle() -> None:
    """Each module imports first, on its own, in a fresh interpreter (a cycle fails one of them).

    One interpreter for all: before each module every ``aetcdcfg`` module is dropped from
    ``sys.modules`` (grpc, pydantic and the rest stay loaded), so this takes a second, not a
    fresh interpreter per module (which took over 80 s on a loaded machine).
    """
    names = sorted(
        {
            "aetcdcfg." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
            for p in _sources()
            if p.name != "__main__.py"
        }
        - {"aetcdcfg.__init__"}
    )
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'aetcdcfg' or m.startswith('aetcdcfg.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {exc!r}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout == "", (
        f"modules that fail to import first:\n{result.stdout}{result.stderr[-2000:]}"
    )


def _direct_loggers(path: Path) -> list[str]:
    """Calls of ``structlog.get_logger`` (or an import of it) outside the library's logging helper."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "structlog":
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ("get_logger", "getLogger", "wrap_logger")
            and isinstance(node.value, ast.Name)
            and node.value.id == "structlog"
        ):
            found.append(f"line {node.lineno}: structlog.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path", [p for p in _sources() if p.name != "_log.py"], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_every_module_logs_through_the_librarys_logging_helper(path: Path) -> None:
    """``_log.get_logger()`` sends events to structlog only when the app configured it, and to the
    stdlib logger otherwise; structlog's unconfigured default would print to stdout."""
    found = _direct_loggers(path)
    assert not found, f"{path.relative_to(PACKAGE)} logs around aetcdcfg._log: {found}"


#: Names that carry etcd's own words: a gRPC error's text, a watch's cancel reason.
_ERROR_TEXT = {"details", "debug_error_string", "reason", "cancel_reason"}


def _reads_error_text(node: ast.expr) -> bool:
    """Whether ``node`` is (or is built from) an error's or a cancel's text: ``exc.details()``,
    ``reason.lower()``, ``str(exc)``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in _ERROR_TEXT:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in _ERROR_TEXT:
            return True
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Name)
            and sub.func.id in ("str", "repr")
            and any(isinstance(a, ast.Name) and a.id in ("exc", "err", "error") for a in sub.args)
        ):
            return True
    return False


def _error_text_classified(path: Path) -> list[str]:
    """Reads of a gRPC error's text (``.details()``) and substring tests on error or cancel text."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("details", "debug_error_string")
            and not node.args
        ):
            found.append(f"line {node.lineno}: .{node.func.attr}()")
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
            and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
            and any(_reads_error_text(side) for side in node.comparators)
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "path", [p for p in _sources() if p.name != "_grpc_errors.py"], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_only_grpc_errors_reads_the_text_of_etcds_errors(path: Path) -> None:
    """etcd's errors and watch cancel reasons are classified by their text in ``_grpc_errors`` only
    (one table to fix the day etcd rewords one); every other module asks it for a ``Failure``."""
    found = _error_text_classified(path)
    assert not found, f"{path.relative_to(PACKAGE)} reads etcd's error text itself: {found}"
