"""``make mutation``: which lines of the core could change without a fast test noticing.

Not part of ``make test``. A small AST mutation runner (mutmut's operators, without its copy of the tree):
each mutant is one change to one module (a comparison flipped, ``and``/``or`` swapped, ``not`` dropped,
an integer moved by one, ``+``/``-`` swapped, a ``return x`` made ``return None``, a statement removed).
The mutated module is compiled in the child process by an import hook (the files on disk never change),
and only the tests that executed the mutated line in a traced baseline run run against it (``-x``, in a
child forked from the runner, which holds the heavy imports but never aetcdcfg; with a timeout): the
fast deterministic tests, those needing no etcd fixture, hypothesis derandomized without shrinking.

    python -m tests.mutation [--modules _resume,_fanout] [--jobs 2] [--only _resume:17,...] [--out FILE]
    python -m tests.mutation --modules live --etcd-tests tests/test_live.py,tests/test_layers.py,...

A mutant is *killed* when a test fails or the run times out, *survives* when every selected test passes,
and is *uncovered* when no fast test executes its line (it survives too: the score counts it as alive).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aetcdcfg"
CORE = ["_fanout", "_resume", "live", "source", "_values", "_validate"]
ENV_MUTANT = "AETCDCFG_MUTANT"  # "aetcdcfg._resume:17": the child runs mutant 17 of that module
ENV_TRACE = "AETCDCFG_MUTATION_TRACE"  # a path: the baseline run writes the lines each test executed
ENV_ETCD = "AETCDCFG_MUTATION_ETCD"  # test files whose etcd tests run too ("tests/test_live.py,...")

_FLIP_COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_FLIP_BINOP: dict[type[ast.operator], type[ast.operator]] = {ast.Add: ast.Sub, ast.Sub: ast.Add}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int
    line: int
    lines: tuple[int, ...]  # executing any of these lines executes the mutated code (or may)
    kind: str
    before: str
    after: str


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """Nodes never mutated: annotations, ``TYPE_CHECKING`` blocks, ``__all__``."""
    skip: set[int] = set()

    def all_below(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            all_below(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                all_below(arg.annotation)
            all_below(node.args.vararg)
            all_below(node.args.kwarg)
        elif isinstance(node, ast.AnnAssign):
            all_below(node.annotation)
        elif (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)) or (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        ):
            all_below(node)
    return skip


def _sites(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Every (node, operator) pair, in a deterministic order (the walk order of ``ast.walk``)."""
    skip = _skipped_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _FLIP_COMPARE:
                    yield node, f"compare:{i}"
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not"
        elif isinstance(node, ast.BinOp) and type(node.op) in _FLIP_BINOP:
            yield node, "binop"
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, "int"
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield node, "bool"
        if isinstance(node, ast.Return) and not (
            node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            yield node, "return-none"
        statement = (ast.Expr, ast.Assign, ast.AugAssign, ast.Raise, ast.Break, ast.Continue)
        if isinstance(node, statement) and not _is_docstring(node):
            yield node, "delete"


def _apply(node: ast.AST, kind: str) -> ast.AST:
    """The replacement for ``node`` (a copy; ``node`` itself is left alone)."""
    new = copy.copy(node)
    if kind.startswith("compare:"):
        assert isinstance(new, ast.Compare)
        i = int(kind.split(":")[1])
        new.ops = list(new.ops)
        new.ops[i] = _FLIP_COMPARE[type(new.ops[i])]()
    elif kind == "boolop":
        assert isinstance(new, ast.BoolOp)
        new.op = ast.Or() if isinstance(new.op, ast.And) else ast.And()
    elif kind == "not":
        assert isinstance(node, ast.UnaryOp)
        return node.operand
    elif kind == "binop":
        assert isinstance(new, ast.BinOp)
        new.op = _FLIP_BINOP[type(new.op)]()
    elif kind == "int":
        assert isinstance(new, ast.Constant)
        new.value = new.value + 1
    elif kind == "bool":
        assert isinstance(new, ast.Constant)
        new.value = not new.value
    elif kind == "return-none":
        assert isinstance(new, ast.Return)
        new.value = ast.Constant(value=None)
    elif kind == "delete":
        new = ast.Pass()
    return ast.copy_location(new, node)


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node: ast.AST) -> Any:
        if node is self.target:
            return self.replacement
        return self.generic_visit(node)


def _module_path(module: str) -> Path:
    return PACKAGE / f"{module.rsplit('.', 1)[-1]}.py"


def _statement_lines(tree: ast.Module) -> dict[int, tuple[int, ...]]:
    """For every node: the lines of its innermost statement (a compound statement: its header only)."""
    out: dict[int, tuple[int, ...]] = {}

    def visit(node: ast.AST, lines: tuple[int, ...]) -> None:
        if isinstance(node, ast.stmt):
            end = node.end_lineno or node.lineno
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                end = max(node.lineno, body[0].lineno - 1)
            lines = tuple(range(node.lineno, end + 1))
        out[id(node)] = lines
        for child in ast.iter_child_nodes(node):
            visit(child, lines)

    visit(tree, ())
    return out


def mutants_of(module: str) -> list[Mutant]:
    tree = ast.parse(_module_path(module).read_text())
    statement_lines = _statement_lines(tree)
    out = []
    for index, (node, kind) in enumerate(_sites(tree)):
        before = ast.unparse(node).splitlines()[0]
        after = ast.unparse(_apply(node, kind)).splitlines()[0] if kind != "delete" else "pass"
        line = getattr(node, "lineno", 0)
        own = range(line, (getattr(node, "end_lineno", None) or line) + 1)
        lines = tuple(sorted({*own, *statement_lines[id(node)]}))
        out.append(Mutant(module, index, line, lines, kind, before[:90], after[:90]))
    return out


def mutated_code(module: str, index: int) -> Any:
    path = _module_path(module)
    tree = ast.parse(path.read_text())
    node, kind = list(_sites(tree))[index]
    tree = _Replace(node, _apply(node, kind)).visit(tree)
    ast.fix_missing_locations(tree)
    return compile(tree, str(path), "exec", dont_inherit=True)


# --- the child: a pytest plugin (``-p tests.mutation``) --------------------------------------------------


class _MutantLoader(importlib.abc.Loader):
    def __init__(self, code: Any) -> None:
        self.code = code

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        exec(self.code, module.__dict__)


class _MutantFinder(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, index: int) -> None:
        self.module, self.index = module, index

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module:
            return None
        file = _module_path(fullname)
        loader = _MutantLoader(mutated_code(fullname, self.index))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


if ENV_MUTANT in os.environ:
    _name, _index = os.environ[ENV_MUTANT].rsplit(":", 1)
    sys.meta_path.insert(0, _MutantFinder(_name, int(_index)))


def pytest_configure(config: pytest.Config) -> None:
    # Derandomized, no shrinking and no example database: the same examples for every mutant, a kill ends
    # at the first failing example.
    from hypothesis import Phase, settings

    settings.register_profile(
        "mutation", derandomize=True, database=None, phases=[Phase.explicit, Phase.generate]
    )
    settings.load_profile("mutation")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Only the fast deterministic tests: any test using an etcd fixture is deselected, except in the
    files named by ``--etcd-tests``."""
    allowed = {f for f in os.environ.get(ENV_ETCD, "").split(",") if f}
    keep, drop = [], []
    for item in items:
        names = getattr(item, "fixturenames", ())
        etcd = any(n.startswith("etcd") for n in names)
        (drop if etcd and item.nodeid.split("::")[0] not in allowed else keep).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


class _Tracer:
    """Which lines of the core each test executes (the baseline run only)."""

    def __init__(self) -> None:
        self.files = {str(_module_path(m)): m for m in CORE}
        self.current = "<import>"
        self.lines: dict[str, set[tuple[str, int]]] = {}

    def global_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename in self.files:
            return self.local_trace
        return None

    def local_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            module = self.files[frame.f_code.co_filename]
            self.lines.setdefault(self.current, set()).add((module, frame.f_lineno))
        return self.local_trace


_tracer: _Tracer | None = None
if ENV_TRACE in os.environ:
    _tracer = _Tracer()
    sys.settrace(_tracer.global_trace)
    threading.settrace(_tracer.global_trace)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    if _tracer is not None:
        _tracer.current = item.nodeid
    try:
        return (yield)
    finally:
        if _tracer is not None:
            _tracer.current = "<between>"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _tracer is not None:
        sys.settrace(None)
        data = {test: sorted(lines) for test, lines in _tracer.lines.items()}
        Path(os.environ[ENV_TRACE]).write_text(json.dumps(data))


# --- the parent ---------------------------------------------------------------------------------------------


def _pytest(args: list[str], env: dict[str, str], timeout: float) -> tuple[str, float]:
    """One pytest run in a fresh process (the baseline)."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "tests.mutation", *args]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=base, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    return _outcome(done.returncode), time.monotonic() - start


def _outcome(returncode: int) -> str:
    # 2 (a collection error) and 3 (pytest's plugin, which imports the package, failed): the mutated module
    # does not import; the baseline run proves the runner itself loads, so the mutant is killed
    return {0: "survived", 1: "killed", 2: "killed", 3: "killed"}.get(returncode, f"error {returncode}")


#: Imported once by the parent, so that a forked child only imports aetcdcfg and the tests (~1 s less
#: per mutant). Never aetcdcfg itself: each child must import the mutated module.
_PRELOAD = [
    "pydantic",
    "pydantic_settings",
    "hypothesis",
    "anyio",
    "structlog",
    "aetcd",
    "yaml",
    "_pytest.python",
]


LOGS = Path(tempfile.gettempdir()) / "aetcdcfg-mutation-logs"


def _forked_pytest(args: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[str, float]:
    """One pytest run in a child forked from this process (already holding the heavy imports); its
    output goes to ``log``."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child, in a process group of its own: a timeout ends it and any etcd it started
        code = 4
        try:
            os.setpgid(0, 0)
            os.environ.update(env)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            # hypothesis' and anyio's pytest plugins were imported by the parent: nothing to rewrite in them
            quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
            code = pytest.main(["-q", "-x", "-p", "tests.mutation", *quiet, *args])
        except BaseException:  # pytest itself raised (e.g. on warnings at exit): the suite failed
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _outcome(os.waitstatus_to_exitcode(status)), time.monotonic() - start
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=",".join(CORE))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "aetcdcfg-mutation.json"))
    parser.add_argument("--reuse-trace", action="store_true", help="skip the baseline: reuse its last trace")
    parser.add_argument(
        "--etcd-tests",
        default="",
        help="test files whose tests needing etcd run too (real etcd per mutant), e.g. tests/test_live.py",
    )
    parser.add_argument("--only", default="", help="module:index,... (re-run these mutants only)")
    args = parser.parse_args()
    modules = [f"aetcdcfg.{m}" for m in args.modules.split(",")]

    etcd = {ENV_ETCD: args.etcd_tests}
    suffix = "-etcd" if args.etcd_tests else ""
    trace = Path(tempfile.gettempdir()) / f"aetcdcfg-mutation-trace{suffix}.json"
    if not (args.reuse_trace and trace.exists()):
        print("baseline: every fast test, tracing the lines each executes ...", flush=True)
        outcome, took = _pytest(["tests", "-p", "no:cacheprovider"], {ENV_TRACE: str(trace), **etcd}, 900)
        if outcome != "survived":
            print(f"the baseline run did not pass ({outcome}): fix the tests first", file=sys.stderr)
            return 2
        print(f"baseline passed in {took:.0f} s", flush=True)
    covered: dict[tuple[str, int], set[str]] = {}
    for test, lines in json.loads(trace.read_text()).items():
        for module, line in lines:
            covered.setdefault((f"aetcdcfg.{module}", line), set()).add(test)
    # Module-level lines ran at import, before any test: the tests of that module cover them.
    by_module: dict[str, set[str]] = {}
    for (module, _), tests in covered.items():
        if not tests & {"<import>", "<between>"}:
            by_module.setdefault(module, set()).update(tests)

    only = {tuple(s.rsplit(":", 1)) for s in args.only.split(",") if s}
    todo: list[tuple[Mutant, list[str]]] = []
    for module in modules:
        for mutant in mutants_of(module):
            if only and (module.rsplit(".", 1)[-1], str(mutant.index)) not in only:
                continue
            tests = set().union(*(covered.get((module, line), set()) for line in mutant.lines))
            if tests & {"<import>", "<between>"}:
                tests = by_module.get(module, set())
            todo.append((mutant, sorted(t for t in tests if not t.startswith("<"))))

    os.chdir(ROOT)
    LOGS.mkdir(exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if args.etcd_tests:
        _PRELOAD.remove("aetcd")  # grpc in a forked child works only if the parent never loaded it
    for name in _PRELOAD:
        importlib.import_module(name)

    def run(entry: tuple[Mutant, list[str]]) -> dict[str, Any]:
        mutant, tests = entry
        if not tests:
            return {**asdict(mutant), "outcome": "uncovered", "seconds": 0.0}
        env = {ENV_MUTANT: f"{mutant.module}:{mutant.index}", **etcd}
        log = LOGS / f"{mutant.module}-{mutant.index}.log"
        outcome, took = _forked_pytest(["-p", "no:cacheprovider", *tests], env, 60, log)
        return {**asdict(mutant), "outcome": outcome, "seconds": round(took, 1), "tests": len(tests)}

    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for i, result in enumerate(pool.map(run, todo), 1):
            results.append(result)
            if result["outcome"] != "killed" and result["outcome"] != "timeout":
                print(
                    f"[{i}/{len(todo)}] {result['outcome']:9} {result['module']}:{result['index']} "
                    f"line {result['line']} {result['kind']}: {result['before']!r} -> {result['after']!r}",
                    flush=True,
                )
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\nmodule                 mutants  killed  survived  uncovered  score")
    for module in modules:
        mine = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"] in ("killed", "timeout") for r in mine)
        survived = sum(r["outcome"] == "survived" for r in mine)
        uncovered = sum(r["outcome"] == "uncovered" for r in mine)
        score = 100 * killed / len(mine) if mine else 0.0
        print(f"{module:22} {len(mine):7} {killed:7} {survived:9} {uncovered:10} {score:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
