"""The fleet examples are wired right: the Kubernetes Deployment and compose's labelled copies."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from aetcdcfg._records import parse_labels

REPO = Path(__file__).resolve().parent.parent


def _container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = yaml.safe_load((REPO / "examples" / "kubernetes" / "deployment.yaml").read_text())
    assert deployment["kind"] == "Deployment"
    template = deployment["spec"]["template"]
    return template, template["spec"]["containers"][0]


def test_the_deployment_sets_the_identity_from_the_downward_api() -> None:
    template, container = _container()
    env = container["env"]
    names = [e["name"] for e in env]
    by_name = {e["name"]: e for e in env}
    instance = by_name["AETCDCFG_INSTANCE"]["value"]
    assert instance == "$(POD_NAME)"
    assert by_name["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    labels = by_name["AETCDCFG_LABELS"]["value"]
    for var in re.findall(r"\$\((\w+)\)", instance + labels):
        # Kubernetes expands $(VAR) only from variables defined earlier in the list
        assert names.index(var) < names.index("AETCDCFG_LABELS"), var
        assert "fieldRef" in by_name[var]["valueFrom"]
    for var in re.findall(r"\$\((\w+)\)", labels):
        path = by_name[var]["valueFrom"]["fieldRef"]["fieldPath"]
        if path.startswith("metadata.labels"):
            label = re.search(r"\['(.+)'\]", path).group(1)  # type: ignore[union-attr]
            assert label in template["metadata"]["labels"]
    assert set(parse_labels(re.sub(r"\$\(\w+\)", "x", labels))) == {"version", "track", "node"}


def test_the_deployment_probes_are_routes_of_the_example_app() -> None:
    from starlette.routing import Match

    from examples.fastapi_app import app

    _, container = _container()
    for probe in ("livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
        assert any(route.matches(scope)[0] is Match.FULL for route in app.routes), path
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_compose_runs_several_labelled_copies() -> None:
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    copies = {name: s for name, s in services.items() if name.startswith("app")}
    assert len(copies) >= 3
    ids = [s["environment"]["AETCDCFG_INSTANCE"] for s in copies.values()]
    assert len(set(ids)) == len(ids)
    zones = {parse_labels(s["environment"]["AETCDCFG_LABELS"])["zone"] for s in copies.values()}
    assert len(zones) >= 2
    assert len({s["environment"]["ETCD_ENDPOINTS"] for s in copies.values()}) == 1
    ports = [p.split(":")[0] for s in copies.values() for p in s["ports"]]
    assert len(set(ports)) == len(ports)


def graceful_shutdown(command: Sequence[str]) -> int:
    """uvicorn's ``--timeout-graceful-shutdown`` in a command line (unset: the test fails)."""
    assert "--timeout-graceful-shutdown" in command, f"unbounded graceful shutdown: {command}"
    return int(command[list(command).index("--timeout-graceful-shutdown") + 1])


def test_every_launch_of_the_example_bounds_uvicorns_graceful_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/production.md: a status page client that stops reading holds uvicorn's graceful shutdown
    without limit unless ``--timeout-graceful-shutdown`` is at least the stream lifetime; each launch
    the repository ships sets it, and leaves the clean exit (which revokes the record's lease) time
    before the SIGKILL."""
    import examples.fastapi_app as example
    from examples import demo

    lifetime = example.STREAM_LIFETIME  # what its status_router is given
    assert lifetime > 0

    template, container = _container()
    timeout = graceful_shutdown(container["command"])
    assert lifetime <= timeout < template["spec"]["terminationGracePeriodSeconds"]

    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        if name.startswith("app"):
            command = shlex.split(service["command"][-1])
            launch = command.index("examples.fastapi_app:app") - 1
            assert command[launch - 1 : launch + 1] == ["exec", "uvicorn"], name  # it gets the SIGTERM
            timeout = graceful_shutdown(command)
            assert lifetime <= timeout < float(service["stop_grace_period"].removesuffix("s")), name

    launched: list[list[str]] = []
    monkeypatch.setattr(demo.subprocess, "Popen", lambda command, **_: launched.append(command))
    demo.start_copy(8000, "http://127.0.0.1:2379")
    assert lifetime <= graceful_shutdown(launched[0])

    run = re.search(r"``ETCD_ENDPOINTS=\S+ (uvicorn examples\.fastapi_app:app[^`]*)``", example.__doc__ or "")
    assert run is not None
    assert lifetime <= graceful_shutdown(run[1].split())
