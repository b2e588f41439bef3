"""EtcdSettings and client construction: bad settings fail early and name the setting."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from aetcdcfg import ConfigurationError, EtcdClient, EtcdSettings


def test_defaults_point_at_local_etcd() -> None:
    settings = EtcdSettings()
    assert settings.endpoints == ["http://127.0.0.1:2379"]
    assert settings.keepalive_time >= 5.0  # etcd GOAWAYs pings closer than 5 s by default


def test_environment_gives_comma_separated_endpoints_and_secret_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://10.0.0.1:2379, http://10.0.0.2")
    monkeypatch.setenv("ETCD_USERNAME", "app")
    monkeypatch.setenv("ETCD_PASSWORD", "hunter2")
    monkeypatch.setenv("ETCD_REQUEST_TIMEOUT", "3.5")
    settings = EtcdSettings()
    assert settings.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert settings.request_timeout == 3.5
    assert settings.password is not None and settings.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    client = EtcdClient(settings)
    assert "hunter2" not in repr(client)


@pytest.mark.parametrize(
    ("overrides", "setting", "text"),
    [
        ({"endpoints": []}, "endpoints", "at least one endpoint"),
        ({"endpoints": ["10.0.0.1:2379"]}, "endpoints", "not an http:// or https:// URL"),
        ({"endpoints": ["http://h:99999"]}, "endpoints", "invalid port"),
        ({"endpoints": ["http://a:1", "https://b:2"]}, "endpoints", "mix http:// and https://"),
        ({"endpoints": ["http://a:1/v3"]}, "endpoints", "no path"),
        ({"username": "u"}, "settings", "password is not"),
        ({"request_timeout": 0}, "request_timeout", "greater than 0"),
        ({"cert_file": "/c.pem"}, "settings", "cert_file and key_file go together"),
        ({"ca_file": "/ca.pem"}, "settings", "endpoints are http://"),
    ],
)
def test_bad_settings_raise_configuration_error_naming_the_setting(
    overrides: dict[str, object], setting: str, text: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        EtcdClient(**overrides)
    assert info.value.setting == setting
    assert text in str(info.value)


@pytest.mark.anyio
async def test_missing_ca_file_fails_on_connect_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=r"ca_file: cannot read .*nope\.pem"):
        async with EtcdClient(endpoints=["https://127.0.0.1:1"], ca_file=missing):
            pass


@pytest.mark.anyio
async def test_not_pem_ca_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="ca_file: .* is not a PEM CA bundle"):
        async with EtcdClient(endpoints=["https://127.0.0.1:1"], ca_file=bogus):
            pass


SECRET = "s3cr3t-in-a-url"


@pytest.mark.parametrize(
    ("endpoints", "text"),
    [
        ([f"http://etcd:2379/{SECRET}"], "no path"),
        ([f"app:{SECRET}@etcd"], "not an http:// or https:// URL"),
        (["http://a:1", f"http://app:{SECRET}@etcd:99999"], "endpoint 2 has an invalid port"),
        (["http://a:1", f"http://app:{SECRET}@etcd:2379"], "endpoint 2 holds a user name or password"),
        ([f"https://{SECRET}@etcd:2379"], "endpoint 1 holds a user name or password"),
    ],
)
def test_a_bad_setting_is_named_without_quoting_its_value(
    endpoints: list[str], text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic's message of an error may quote the input (here ours did: an endpoint URL, which
    can carry a password); the error names the setting and the problem, never the value: not from
    ``EtcdClient``, ``ETCD_ENDPOINTS`` read by a ``LiveSettings`` without a client, nor
    ``EtcdSettings`` itself."""
    from pydantic import BaseModel, ValidationError

    from aetcdcfg import LiveSettings

    with pytest.raises(ConfigurationError) as info:
        EtcdClient(endpoints=endpoints)
    assert info.value.setting == "endpoints" and text in str(info.value)
    assert SECRET not in str(info.value)

    with pytest.raises(ValidationError) as raw:
        EtcdSettings(endpoints=endpoints)
    assert SECRET not in str(raw.value)

    monkeypatch.setenv("ETCD_ENDPOINTS", ",".join(endpoints))
    with pytest.raises(ConfigurationError) as info:
        anyio.run(LiveSettings(BaseModel, prefix="/p/").__aenter__)
    assert info.value.setting == "endpoints" and SECRET not in str(info.value)
