"""compose.yaml would really form a cluster: each member's flags agree with the others'.

Docker does not run on CI, so the file is parsed with PyYAML and its wiring checked instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"


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


def test_flags_are_flag_value_strings() -> None:
    services = load()["services"]
    for name in members():
        command = services[name]["command"]
        assert command[0] == "etcd"
        assert all(arg.startswith("--") and "=" in arg for arg in command[1:]), command


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


def test_members_listen_on_all_interfaces_at_the_advertised_ports() -> None:
    for member in members().values():
        assert member["listen-peer-urls"] == "http://0.0.0.0:2380"
        assert member["listen-client-urls"] == "http://0.0.0.0:2379"


def test_client_urls_and_app_endpoints_match_the_members() -> None:
    found = members()
    for name, member in found.items():
        assert member["advertise-client-urls"] == f"http://{name}:2379"
    app = load()["services"]["app"]
    endpoints = app["environment"]["ETCD_ENDPOINTS"].split(",")
    assert sorted(endpoints) == sorted(m["advertise-client-urls"] for m in found.values())
    assert len(endpoints) == len(set(endpoints))


def test_app_waits_for_healthy_members_and_runs_the_example() -> None:
    compose = load()
    app = compose["services"]["app"]
    assert app["depends_on"] == {name: {"condition": "service_healthy"} for name in members()}
    assert app["working_dir"] == "/src" and ".:/src" in app["volumes"]
    assert "8000:8000" in app["ports"]
    command = " ".join(app["command"])
    assert "uvicorn examples.fastapi_app:app" in command
    assert (REPO / "examples" / "fastapi_app.py").is_file()


def test_each_member_has_its_own_volume_and_an_etcdctl_healthcheck() -> None:
    compose = load()
    services = compose["services"]
    volumes = {}
    for name, member in members().items():
        service = services[name]
        assert service["image"] == "quay.io/coreos/etcd:v3.5.17"
        assert "etcdctl" in service["healthcheck"]["test"]
        (mount,) = service["volumes"]
        volume, path = mount.split(":")
        assert path == member["data-dir"]
        volumes[name] = volume
    assert len(set(volumes.values())) == 3
    assert set(volumes.values()) <= set(compose["volumes"])
