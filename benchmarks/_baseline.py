"""The instruction-count guard's bookkeeping: the committed baseline, the environment, the verdicts.

``make bench-check`` counts the hot paths' instructions per unit under callgrind
(``benchmarks/instructions.py``) and compares them with ``benchmarks/instructions_baseline.json``.
Everything here is plain data in, plain data out, so ``tests/test_bench_guard.py`` checks every
verdict without valgrind.

Counts are only comparable on the same interpreter and the same libraries that run the hot paths:
a new protobuf or pydantic-core changes them by more than any tolerance. So the baseline records the
environment it was measured in; :func:`environment_mismatches` names what differs, and
:func:`exit_status` decides: in CI (``CI=true``) a mismatch fails, because CI must compare (a
dependency release reaching CI's fresh install needs a deliberate new baseline); anywhere else the
check prints why it cannot compare and passes, because a count from another interpreter says
nothing about the change at hand.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: A scenario's count may exceed its baseline by this fraction before the check fails. The same
#: code in the same checkout counts the same run to run (to 0.0003 %); what the check cannot pin
#: (the heap's layout after another checkout path or an edit to the benchmark) moved a count by
#: 1.2 % at most, measured; one more Python call per delivery costs 8-19 % (docs/benchmarks.md).
TOLERANCE = 0.03

#: Libraries whose code runs in the measured hot paths: a different version of any of them makes
#: counts incomparable. (CPython's minor version, the machine and protobuf's backend as well.)
KEY_PACKAGES = ("grpcio", "protobuf", "pydantic", "pydantic-core", "pydantic-settings", "anyio")

BASELINE_PATH = Path(__file__).with_name("instructions_baseline.json")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One scenario's count: instructions per unit of work over ``units`` units."""

    unit: str
    units: int
    per_unit: float


@dataclass(frozen=True, slots=True)
class Baseline:
    """A baseline file: what it was measured with (compared, and only recorded), and the counts."""

    environment: dict[str, str]
    measured_on: dict[str, str]
    scenarios: dict[str, Measurement]


@dataclass(frozen=True, slots=True)
class Row:
    """One scenario in the check's table. ``baseline``/``now`` are None when one side lacks it."""

    scenario: str
    unit: str
    baseline: float | None
    now: float | None
    verdict: str
    failed: bool

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.now is None or not self.baseline:
            return None
        return self.now / self.baseline


OK = "ok"
REGRESSED = "REGRESSED"
IMPROVED = "improved: update the baseline"
NOT_IN_BASELINE = "NOT IN BASELINE"
NOT_MEASURED = "NOT MEASURED"
SIZE_CHANGED = "SIZE CHANGED"


def environment() -> dict[str, str]:
    """What counts depend on and the check compares: interpreter, machine, protobuf backend, libraries."""
    from google.protobuf.internal import api_implementation

    return {
        "python": f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "protobuf backend": api_implementation.Type(),
        **{package: metadata.version(package) for package in KEY_PACKAGES},
    }


#: CPU features glibc picks its memcpy/memset/memcmp/strlen by: those routines are 1.5-5.5 % of
#: the measured instructions (callgrind, per scenario), and their variants differ in count.
CPU_FLAGS = ("ssse3", "sse4_2", "avx", "avx2", "bmi2", "erms", "fsrm", "avx512f", "avx512bw", "avx512vl")


def build_info() -> dict[str, str]:
    """Recorded with the baseline but not compared: each can move counts by a little (see the notes)."""
    try:
        valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        valgrind = "missing"
    libc, libc_version = platform.libc_ver()
    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return {
        "python build": sys.version.replace("\n", " "),
        "libc": f"{libc} {libc_version}".strip(),
        "valgrind": valgrind,
        "cpu": model.group(1).strip() if model else "",
        "cpu flags": " ".join(flag for flag in CPU_FLAGS if flag in present),
    }


def environment_mismatches(baseline_env: Mapping[str, str], env: Mapping[str, str]) -> list[str]:
    """What differs between the baseline's environment and this one, one line each (empty: comparable)."""
    return [
        f"{key}: baseline {baseline_env.get(key, '(not recorded)')}, here {env.get(key, '(unknown)')}"
        for key in sorted(set(baseline_env) | set(env))
        if baseline_env.get(key) != env.get(key)
    ]


def build_notes(measured_on: Mapping[str, str], info: Mapping[str, str]) -> list[str]:
    """What differs from the build the baseline was measured on: compared anyway, but worth a note
    when a count moves (another CPython patch release, glibc, or CPU features move counts a little)."""
    return [
        f"{key}: baseline {measured_on[key]}, here {info.get(key, '(unknown)')}"
        for key in measured_on
        if measured_on[key] != info.get(key)
    ]


def compare(
    baseline: Mapping[str, Measurement], measured: Mapping[str, Measurement], tolerance: float
) -> list[Row]:
    """One row per scenario of either side, in the baseline's order, then new ones.

    Only a count above ``baseline * (1 + tolerance)`` is a regression; one below
    ``baseline * (1 - tolerance)`` passes with a note to update the baseline (else the next
    regression could hide in the gain). A scenario on one side only, or measured over a different
    number of units (per-unit counts shift a little with the size), fails: the baseline is stale.
    """
    rows = []
    for name in [*baseline, *(name for name in measured if name not in baseline)]:
        old, new = baseline.get(name), measured.get(name)
        if old is None:
            assert new is not None
            rows.append(Row(name, new.unit, None, new.per_unit, NOT_IN_BASELINE, True))
        elif new is None:
            rows.append(Row(name, old.unit, old.per_unit, None, NOT_MEASURED, True))
        elif (old.unit, old.units) != (new.unit, new.units):
            verdict = f"{SIZE_CHANGED} ({old.units:,} -> {new.units:,} {new.unit}s)"
            rows.append(Row(name, new.unit, old.per_unit, new.per_unit, verdict, True))
        elif new.per_unit > old.per_unit * (1 + tolerance):
            rows.append(Row(name, new.unit, old.per_unit, new.per_unit, REGRESSED, True))
        elif new.per_unit < old.per_unit * (1 - tolerance):
            rows.append(Row(name, new.unit, old.per_unit, new.per_unit, IMPROVED, False))
        else:
            rows.append(Row(name, new.unit, old.per_unit, new.per_unit, OK, False))
    return rows


def exit_status(mismatches: Sequence[str], rows: Sequence[Row], *, ci: bool) -> int:
    """1 if the check fails: a failed row, or (in CI only) an environment it cannot compare with."""
    if mismatches:
        return 1 if ci else 0
    return 1 if any(row.failed for row in rows) else 0


def render(rows: Sequence[Row], tolerance: float) -> str:
    """The check's table: scenario, baseline, now, ratio, verdict."""
    from ._util import table

    def count(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    body = [
        [
            row.scenario,
            f"{count(row.baseline)} /{row.unit}",
            count(row.now),
            "-" if row.ratio is None else f"{row.ratio:.4f}",
            row.verdict,
        ]
        for row in rows
    ]
    return table(["scenario", "baseline", "now", "ratio", f"verdict (tolerance +{tolerance:.0%})"], body)


def load(path: Path = BASELINE_PATH) -> Baseline:
    data = json.loads(path.read_text())
    scenarios = {
        name: Measurement(entry["unit"], entry["units"], entry["instructions_per_unit"])
        for name, entry in data["scenarios"].items()
    }
    return Baseline(data["environment"], data["measured on"], scenarios)


def dump(measured: Mapping[str, Measurement], env: Mapping[str, str], info: Mapping[str, str]) -> str:
    """A baseline file's text: sorted, one scenario a line or two, so a new baseline diffs readably."""
    data: dict[str, Any] = {
        "about": "Instructions per unit of the hot paths under callgrind: make bench-check compares, "
        "make bench-baseline rewrites (see docs/benchmarks.md)",
        "environment": dict(env),
        "measured on": dict(info),
        "scenarios": {
            name: {"unit": m.unit, "units": m.units, "instructions_per_unit": round(m.per_unit, 1)}
            for name, m in measured.items()
        },
    }
    return json.dumps(data, indent=2) + "\n"
