"""compose.yaml would really form a cluster: each member's flags agree with the others'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "compose.yaml"


def load() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def flags(service: dict[str, Any]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in service["command"] if arg.startswith("--") and "=" in arg)


def members() -> dict[str, dict[str, str]]:
    services = load()["services"]
    return {name: flags(svc) for name, svc in services.items() if name.startswith("etcd")}


def test_three_members_with_matching_names() -> None:
    found = members()
    assert sorted(found) == ["etcd1", "etcd2", "etcd3"]
    for service, member in found.items():
        assert member["name"] == service


def test_initial_cluster_lists_agree_with_names_and_peer_urls() -> None:
    found = members()
    expected = {m["name"]: m["initial-advertise-peer-urls"] for m in found.values()}
    for member in found.values():
        listed = dict(entry.split("=", 1) for entry in member["initial-cluster"].split(","))
        assert listed == expected
        assert member["initial-cluster-state"] == "new"
    assert len({m["initial-cluster-token"] for m in found.values()}) == 1
    for name, url in expected.items():
        assert url == f"http://{name}:2380"


def test_client_urls_and_app_endpoints_match_the_members() -> None:
    found = members()
    for name, member in found.items():
        assert member["advertise-client-urls"] == f"http://{name}:2379"
    app = load()["services"]["app"]
    endpoints = app["environment"]["ETCD_ENDPOINTS"].split(",")
    assert sorted(endpoints) == sorted(m["advertise-client-urls"] for m in found.values())
    assert set(app["depends_on"]) == set(found)


def test_members_use_the_official_v35_image() -> None:
    services = load()["services"]
    for name in members():
        assert services[name]["image"].startswith("quay.io/coreos/etcd:v3.5")
