"""The fleet examples are wired right: the Kubernetes Deployment and compose's labelled copies."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
