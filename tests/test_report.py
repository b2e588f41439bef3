"""settings_report/status_report against real etcd: every leaf's source, secrets masked everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import AliasChoices, AliasPath, BaseModel, Field, SecretBytes, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from aetcdcfg import EtcdClient, EtcdSettingsSource, LiveSettings, settings_report, status_report
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio

SECRET = "hunter2-report-secret"


class Database(BaseModel):
    url: str = "sqlite://"
    pool: int = 5
    password: SecretStr = SecretStr("")


class Reported(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPORTED_", env_nested_delimiter="__")

    rate_limit: int = 100
    name: str = "svc"
    region: str = "eu"
    zone: str = "a"
    tags: list[str] = []
    limits: dict[str, int] = {}
    tokens: list[SecretStr] = []
    blob: SecretBytes = SecretBytes(b"")
    db: Database = Database()


def by_field(report: Any) -> dict[str, dict[str, Any]]:
    return {f["field"]: f for f in report["fields"]}


async def test_each_leaf_names_its_source_and_secrets_are_masked(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REPORTED_NAME", "from-env")
    monkeypatch.setenv("reported_db__pool", "9")  # case-insensitive, nested by delimiter
    monkeypatch.setenv("REPORTED_RATE_LIMIT", "1")  # etcd outranks env: not the source
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many(
            {
                etcd_prefix + "rate_limit": "150",
                etcd_prefix + "db/password": SECRET,
                etcd_prefix + "limits/eu": "3",
                etcd_prefix + "tokens": json.dumps([SECRET + "-t"]),
                etcd_prefix + "blob": SECRET + "-b",
                etcd_prefix + "db": '{"url": "postgres://whole"}',
            }
        )
        async with LiveSettings(
            Reported, prefix=etcd_prefix, client=client, init_kwargs={"zone": "b"}
        ) as live:
            report = settings_report(live)
            assert live.current.db.password.get_secret_value() == SECRET
    fields = by_field(report)
    assert (report["prefix"], report["model"], report["revision"]) == (etcd_prefix, "Reported", live.revision)
    assert fields["rate_limit"] | {} == {
        "field": "rate_limit",
        "value": 150,
        "secret": False,
        "source": "etcd",
        "origin": etcd_prefix + "rate_limit",
        "pending_rejected": False,
    }
    assert (fields["db.url"]["source"], fields["db.url"]["origin"]) == ("etcd", etcd_prefix + "db")
    assert (fields["db.password"]["source"], fields["db.password"]["origin"]) == (
        "etcd",
        etcd_prefix + "db/password",
    )
    assert fields["db.password"]["value"] == "**********" and fields["db.password"]["secret"]
    assert (fields["limits.eu"]["value"], fields["limits.eu"]["origin"]) == (3, etcd_prefix + "limits/eu")
    assert fields["tokens"]["value"] == ["**********"] and fields["tokens"]["source"] == "etcd"
    assert fields["blob"]["value"] == "**********" and fields["blob"]["secret"]
    assert (fields["name"]["source"], fields["name"]["origin"]) == ("env", "REPORTED_NAME")
    assert (fields["db.pool"]["value"], fields["db.pool"]["source"], fields["db.pool"]["origin"]) == (
        9,
        "env",
        "reported_db__pool",
    )
    assert (fields["zone"]["value"], fields["zone"]["source"]) == ("b", "init")
    assert (fields["region"]["source"], fields["region"]["origin"]) == ("default", None)
    assert fields["tags"] == {
        "field": "tags",
        "value": [],
        "secret": False,
        "source": "default",
        "origin": None,
        "pending_rejected": False,
    }
    assert report["values"]["db"] == {"url": "postgres://whole", "pool": 9, "password": "**********"}
    text = json.dumps(report)
    assert SECRET not in text


async def test_dotenv_values_name_their_file(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "service.env"
    env_file.write_text(f"DOTTED_REGION=us\nDOTTED_TOKEN={SECRET}\n")

    class Dotted(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="DOTTED_", env_file=env_file)
        region: str = "eu"
        token: SecretStr = SecretStr("")
        rate_limit: int = 1

    monkeypatch.setenv("DOTTED_RATE_LIMIT", "5")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(Dotted, prefix=etcd_prefix, client=client) as live:
            fields = by_field(settings_report(live))
    assert (fields["region"]["value"], fields["region"]["source"], fields["region"]["origin"]) == (
        "us",
        "dotenv",
        f"{env_file}: DOTTED_REGION",
    )
    assert fields["token"] | {} == {
        "field": "token",
        "value": "**********",
        "secret": True,
        "source": "dotenv",
        "origin": f"{env_file}: DOTTED_TOKEN",
        "pending_rejected": False,
    }
    assert (fields["rate_limit"]["source"], fields["rate_limit"]["origin"]) == ("env", "DOTTED_RATE_LIMIT")


async def test_models_own_source_order_is_followed(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class EnvFirst(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="REPORTENVFIRST_")
        a: int = 0
        b: int = 0

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, EtcdSettingsSource(settings_cls)

    monkeypatch.setenv("REPORTENVFIRST_A", "7")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "a": "1", etcd_prefix + "b": "2"})
        async with LiveSettings(EnvFirst, prefix=etcd_prefix, client=client) as live:
            fields = by_field(settings_report(live))
    assert (fields["a"]["value"], fields["a"]["source"], fields["a"]["origin"]) == (
        7,
        "env",
        "REPORTENVFIRST_A",
    )
    assert (fields["b"]["value"], fields["b"]["source"], fields["b"]["origin"]) == (
        2,
        "etcd",
        etcd_prefix + "b",
    )


async def test_a_field_follows_etcd_as_keys_come_and_go(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(Reported, prefix=etcd_prefix, client=client) as live:
            assert by_field(settings_report(live))["region"]["source"] == "default"
            await client.put(etcd_prefix + "region", "ap")
            await live.wait_for(lambda s: s.region == "ap", timeout=5)
            region = by_field(settings_report(live))["region"]
            assert (region["value"], region["source"], region["origin"]) == (
                "ap",
                "etcd",
                etcd_prefix + "region",
            )
            await client.delete(etcd_prefix + "region")
            await live.wait_for(lambda s: s.region == "eu", timeout=5)
            assert by_field(settings_report(live))["region"]["source"] == "default"


async def test_rejected_pending_key_is_flagged_and_its_value_never_shown(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    class Limited(BaseSettings):
        rate_limit: int = Field(default=100, ge=1)
        token: SecretStr = SecretStr("")

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "rate_limit": "5", etcd_prefix + "token": SECRET})
        async with LiveSettings(Limited, prefix=etcd_prefix, client=client) as live:
            bad = await client.put_many(
                {etcd_prefix + "rate_limit": "-7777", etcd_prefix + "token": SECRET + "x"}
            )
            with anyio.fail_after(5):
                while live.last_error is None:
                    await anyio.sleep(0.01)
            report = status_report(live, max_staleness=5)
    fields = by_field(report["settings"])
    assert fields["rate_limit"]["value"] == 5 and fields["rate_limit"]["pending_rejected"]
    assert fields["token"]["value"] == "**********"
    assert report["last_rejected"]["revision"] == bad
    assert set(report["last_rejected"]["keys"]) == {etcd_prefix + "rate_limit", etcd_prefix + "token"}
    assert any("greater than or equal to 1" in p for p in report["last_rejected"]["problems"])
    text = json.dumps(report, allow_nan=False)
    assert SECRET not in text and "-7777" not in text


async def test_defaults_after_an_invalid_start_are_not_attributed_to_etcd(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "rate_limit": "many", etcd_prefix + "name": "x"})
        async with LiveSettings(Reported, prefix=etcd_prefix, client=client, allow_defaults=True) as live:
            fields = by_field(settings_report(live))
            report = status_report(live)
    assert (fields["rate_limit"]["value"], fields["rate_limit"]["source"]) == (100, "default")
    assert (fields["name"]["value"], fields["name"]["source"]) == ("svc", "default")
    assert report["loaded"] and report["config_error"] and "many" not in json.dumps(report)


async def test_status_report_of_a_live_watch(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    never = LiveSettings(Reported, prefix=etcd_prefix)
    assert status_report(never) == {
        "prefix": etcd_prefix,
        "model": "Reported",
        "max_staleness": 30.0,
        "started": False,
        "loaded": False,
        "fresh": False,
        "revision": 0,
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        revision = await client.put(etcd_prefix + "rate_limit", "9")
        async with LiveSettings(Reported, prefix=etcd_prefix, client=client) as live:
            with anyio.fail_after(5):
                while live.status.watch.state != "live":  # the watcher is created right after the listing
                    await anyio.sleep(0.01)
            report = status_report(live, max_staleness=10)
    assert report["fresh"] and report["loaded"] and report["started"]
    assert report["revision"] == revision and report["max_staleness"] == 10
    assert report["watch"]["state"] == "live" and report["watch"]["endpoint"] == etcd_server.endpoint
    assert report["staleness"] is not None and report["staleness"] < 10
    assert report["history"] == [] and report["last_rejected"] is None
    assert by_field(report["settings"])["rate_limit"]["value"] == 9
    json.dumps(report, allow_nan=False)


class AliasedVault(BaseModel):
    password: SecretStr = Field(SecretStr(""), alias="PASS")
    host: str = Field("", validation_alias=AliasChoices("HOST", "server"))


class AliasedReported(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIASED_", env_nested_delimiter="__")

    rate_limit: int = Field(100, alias="rps")
    token: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("api_token", "TOKEN"))
    region: str = Field("eu", validation_alias=AliasChoices("zone_name", "where"))
    name: str = Field("svc", alias="service")
    vault: AliasedVault = Field(AliasedVault(), alias="secrets")
    login: str = Field("", validation_alias=AliasPath("account", "user"))


async def test_aliased_fields_name_their_alias_keys_and_their_secrets_stay_masked(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys spelled as pydantic reads the fields (aliases, a choice, an AliasPath's head): each
    leaf names the key it came from under its field name; the secrets are masked everywhere."""
    p = etcd_prefix
    monkeypatch.setenv("where", "from-env")  # AliasChoices' second choice, without env_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many(
            {
                p + "rps": "150",
                p + "api_token": SECRET,
                p + "secrets/PASS": SECRET + "-p",
                p + "secrets": '{"server": "vault.local"}',
                p + "account": '{"user": "alice"}',
            }
        )
        async with LiveSettings(
            AliasedReported, prefix=p, client=client, init_kwargs={"service": "init-name"}
        ) as live:
            assert live.current.vault.password.get_secret_value() == SECRET + "-p"
            report = settings_report(live)
            bad = await client.put(p + "rps", "-" + SECRET)
            with anyio.fail_after(5):
                while live.last_error is None:
                    await anyio.sleep(0.01)
            status = status_report(live, max_staleness=5)
    fields = by_field(report)
    sources = {name: (f["value"], f["source"], f["origin"]) for name, f in fields.items()}
    assert sources == {
        "rate_limit": (150, "etcd", p + "rps"),
        "token": ("**********", "etcd", p + "api_token"),
        "region": ("from-env", "env", "where"),
        "name": ("init-name", "init", None),
        "vault.password": ("**********", "etcd", p + "secrets/PASS"),
        "vault.host": ("vault.local", "etcd", p + "secrets"),
        "login": ("alice", "etcd", p + "account"),
    }
    assert fields["token"]["secret"] and fields["vault.password"]["secret"]
    assert report["values"]["vault"] == {"password": "**********", "host": "vault.local"}
    assert status["last_rejected"]["revision"] == bad
    assert status["last_rejected"]["keys"] == [p + "rps"]
    assert by_field(status["settings"])["rate_limit"]["pending_rejected"]
    assert SECRET not in json.dumps(report) + json.dumps(status)


async def test_a_fleet_record_holding_a_number_json_has_not_still_gives_a_json_status(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The backstop behind the records refusing NaN/Infinity when read: whatever record a fleet view
    holds, the status report stays JSON (its numbers as ``json_number`` shows them)."""
    from aetcdcfg._records import InstanceRecord

    nan = InstanceRecord("odd", {}, "M", "s", (etcd_prefix,), 1, None, (), (), True, "1", float("nan"), 1.0)
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Reported, prefix=etcd_prefix, client=client, instance="svc-a") as live,
    ):
        live.fleet().records["odd"] = nan  # as if read from etcd
        report = status_report(live)
    (row,) = [row for row in report["fleet"][0]["instances"] if row["id"] == "odd"]
    assert row["started_at"] == "nan" and row["updated_at"] == 1.0
    json.dumps(report, allow_nan=False)
