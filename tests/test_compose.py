"""compose.yaml would really form a cluster: each member's flags agree with the others', and the app
reaches the members through etcd's gRPC proxy.

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


def proxy() -> tuple[list[str], dict[str, str]]:
    """The grpc-proxy service's command words before the flags, and its flags."""
    command = load()["services"]["grpc-proxy"]["command"]
    return [arg for arg in command if not arg.startswith("--")], flags({"command": command})


def test_member_client_urls_are_their_service_names() -> None:
    for name, member in members().items():
        assert member["advertise-client-urls"] == f"http://{name}:2379"


def test_grpc_proxy_forwards_to_every_member_advertised_client_url() -> None:
    words, proxy_flags = proxy()
    assert words == ["etcd", "grpc-proxy", "start"]
    endpoints = proxy_flags["endpoints"].split(",")
    # The proxy's --endpoints are host:port; the members advertise http://host:port.
    advertised = [m["advertise-client-urls"].removeprefix("http://") for m in members().values()]
    assert sorted(endpoints) == sorted(advertised)
    assert len(endpoints) == len(set(endpoints))


def test_grpc_proxy_listens_on_all_interfaces_and_advertises_its_service_name() -> None:
    _, proxy_flags = proxy()
    assert proxy_flags["listen-addr"] == "0.0.0.0:23790"
    assert proxy_flags["advertise-client-url"] == "grpc-proxy:23790"


def test_grpc_proxy_runs_the_members_image_after_they_are_healthy() -> None:
    services = load()["services"]
    service = services["grpc-proxy"]
    assert service["image"] == services["etcd1"]["image"]
    assert service["depends_on"] == {name: {"condition": "service_healthy"} for name in members()}
    check = service["healthcheck"]["test"]
    assert "etcdctl" in check
    assert "--endpoints=http://127.0.0.1:23790" in check  # through the proxy, not a member


def test_app_points_at_the_proxy_listen_address() -> None:
    app = load()["services"]["app"]
    _, proxy_flags = proxy()
    port = proxy_flags["listen-addr"].rsplit(":", 1)[1]
    assert app["environment"]["ETCD_ENDPOINTS"] == f"http://grpc-proxy:{port}"
    assert proxy_flags["advertise-client-url"] == f"grpc-proxy:{port}"


def test_app_waits_for_a_healthy_proxy_and_runs_the_example() -> None:
    compose = load()
    app = compose["services"]["app"]
    assert app["depends_on"] == {"grpc-proxy": {"condition": "service_healthy"}}
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
