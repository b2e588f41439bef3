"""``make bench-check``'s verdicts, without valgrind: what fails, what passes, what cannot compare.

The counting itself runs under callgrind in ``make bench-check`` (which proves on every run that it
sees an injected regression); here the comparison is fed plain numbers, and every scenario runs
natively at a tiny size so a change of the library's internals cannot silently break the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _baseline
from benchmarks._baseline import (
    IMPROVED,
    NOT_IN_BASELINE,
    NOT_MEASURED,
    OK,
    REGRESSED,
    Measurement,
    compare,
    environment_mismatches,
    exit_status,
)

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.03
BASE = {
    "stream": Measurement("event", 12_000, 15_000.0),
    "live_revision": Measurement("revision", 200, 1_700_000.0),
}
ENV = {"python": "CPython 3.11", "machine": "x86_64", "grpcio": "1.85.4", "protobuf": "7.36.2"}


def now(**per_unit: float) -> dict[str, Measurement]:
    """The baseline's scenarios measured again, with some counts changed."""
    return {name: Measurement(m.unit, m.units, per_unit.get(name, m.per_unit)) for name, m in BASE.items()}


def verdicts(measured: dict[str, Measurement]) -> dict[str, str]:
    return {row.scenario: row.verdict for row in compare(BASE, measured, TOLERANCE)}


def test_same_counts_pass() -> None:
    rows = compare(BASE, now(), TOLERANCE)
    assert [(row.verdict, row.ratio) for row in rows] == [(OK, 1.0), (OK, 1.0)]
    assert exit_status([], rows, ci=True) == 0


def test_a_regression_within_the_tolerance_passes() -> None:
    rows = compare(BASE, now(stream=15_000 * 1.0299), TOLERANCE)
    assert rows[0].verdict == OK
    assert exit_status([], rows, ci=True) == 0


def test_a_regression_beyond_the_tolerance_fails() -> None:
    rows = compare(BASE, now(live_revision=1_700_000 * 1.031), TOLERANCE)
    assert {row.scenario: row.verdict for row in rows} == {"stream": OK, "live_revision": REGRESSED}
    assert rows[1].failed and rows[1].ratio == pytest.approx(1.031)
    assert exit_status([], rows, ci=False) == 1


def test_an_improvement_beyond_the_tolerance_passes_and_asks_for_a_new_baseline() -> None:
    rows = compare(BASE, now(stream=14_000), TOLERANCE)
    assert rows[0].verdict == IMPROVED and not rows[0].failed
    assert exit_status([], rows, ci=True) == 0


def test_a_scenario_on_one_side_only_fails() -> None:
    measured = now()
    del measured["stream"]
    measured["fanout"] = Measurement("delivery", 10_000, 17_000.0)
    assert verdicts(measured) == {"stream": NOT_MEASURED, "live_revision": OK, "fanout": NOT_IN_BASELINE}
    assert exit_status([], compare(BASE, measured, TOLERANCE), ci=False) == 1


def test_counts_over_another_size_fail_as_stale() -> None:
    measured = now()
    measured["stream"] = Measurement("event", 20_000, 15_000.0)
    [row] = [row for row in compare(BASE, measured, TOLERANCE) if row.scenario == "stream"]
    assert row.failed and row.verdict.startswith("SIZE CHANGED")


def test_environment_mismatch_names_each_difference() -> None:
    assert environment_mismatches(ENV, dict(ENV)) == []
    other = {**ENV, "python": "CPython 3.12", "grpcio": "1.86.0"}
    del other["protobuf"]
    assert environment_mismatches(ENV, other) == [
        "grpcio: baseline 1.85.4, here 1.86.0",
        "protobuf: baseline 7.36.2, here (unknown)",
        "python: baseline CPython 3.11, here CPython 3.12",
    ]


def test_environment_mismatch_fails_in_ci_and_passes_elsewhere() -> None:
    mismatches = environment_mismatches(ENV, {**ENV, "grpcio": "1.86.0"})
    assert exit_status(mismatches, [], ci=True) == 1
    assert exit_status(mismatches, [], ci=False) == 0


def test_the_table_shows_baseline_now_ratio_and_verdict() -> None:
    text = _baseline.render(compare(BASE, now(stream=16_000), TOLERANCE), TOLERANCE)
    assert "| stream        | 15,000 /event       | 16,000    | 1.0667 | REGRESSED" in text
    assert "tolerance +3%" in text


def test_a_written_baseline_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(_baseline.dump(BASE, ENV, {"cpu": "test"}))
    assert _baseline.load(path) == _baseline.Baseline(ENV, {"cpu": "test"}, BASE)


def test_another_build_is_noted_not_refused() -> None:
    measured_on = {"python build": "3.11.7 (main)", "cpu flags": "avx avx2 erms"}
    assert _baseline.build_notes(measured_on, dict(measured_on)) == []
    assert _baseline.build_notes(measured_on, {**measured_on, "cpu flags": "avx"}) == [
        "cpu flags: baseline avx avx2 erms, here avx"
    ]


def test_the_committed_baseline_covers_the_check() -> None:
    from benchmarks.instructions import CHECK, SCENARIOS

    baseline = _baseline.load()
    assert {name: m.units for name, m in baseline.scenarios.items()} == CHECK
    assert all(m.unit == SCENARIOS[name][0] for name, m in baseline.scenarios.items())
    assert set(baseline.environment) == set(_baseline.environment())
    assert set(baseline.measured_on) == set(_baseline.build_info())


def test_every_scenario_still_runs_against_the_library() -> None:
    """Natively, tiny: the segments the check measures under callgrind, the injected one included."""
    from benchmarks.instructions import SCENARIOS, SELF_TEST

    plan = [f"{name}:{200 if name == 'fanout' else 3}" for name in SCENARIOS]  # 2 fan-out rounds
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--segments", *plan, f"{SELF_TEST}:200"],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    labels = json.loads(done.stdout.splitlines()[-1])
    assert len(labels) == 4 * (len(SCENARIOS) + 1)
    assert labels[-4:] == [
        f"{SELF_TEST} warm-up",
        f"{SELF_TEST} 0",
        f"{SELF_TEST} collect",
        f"{SELF_TEST} 200",
    ]


def test_the_probes_verdict_passes_only_under_the_target_with_the_pool_full() -> None:
    from benchmarks.probes import verdict

    assert verdict([5.0] * 100, 100.0)[0]
    assert not verdict([5.0] * 98 + [150.0] * 2, 100.0)[0]  # p99 over 100 ms
    assert not verdict([5.0] * 100, 95.0)[0]  # the pool was not always full: the numbers mean nothing
    assert not verdict([], 100.0)[0]  # /livez never answered
    assert verdict([5.0] * 100, 100.0)[1].startswith("PASS: /livez p99 5.0 ms")


def test_a_probes_run_that_fails_its_target_exits_non_zero() -> None:
    """``make bench`` fails only on a non-zero exit: a 1 s run against a 0 ms target, which no run
    meets (no timing is asserted: the verdict is FAIL whatever the machine's speed)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes", "--seconds", "1", "--target-ms", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "FAIL: /livez p99" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1, done.stderr
