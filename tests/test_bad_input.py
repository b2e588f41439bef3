"""Bad input gets a clear, typed error or a logged rejection, and loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import ConfigRejected, ConfigurationError, EtcdClient, LiveSettings
from aetcdcfg.cli import flatten, unflatten
from aetcdcfg.source import decode_items, resolve_key
from aetcdcfg.testing import EtcdServer, TLSFiles


class Limits(BaseModel):
    burst: int = 1


class Model(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
    name: str = "svc"
    tags: list[str] = []
    limits: Limits = Limits()
    regions: dict[str, int] = {}
    note: str = ""


async def _rejection(client: EtcdClient, live: LiveSettings[Model], key: str, value: bytes) -> ConfigRejected:
    revision = await client.put(key, value)
    with anyio.fail_after(5):
        while live.last_error is None or live.last_error.revision != revision:
            await anyio.sleep(0.01)
    assert live.last_error is not None
    return live.last_error


@pytest.mark.anyio
async def test_bad_values_are_rejected_by_key_and_good_state_is_kept(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "5")
        async with LiveSettings(Model, prefix=etcd_prefix, client=client) as live:
            good = live.current
            cases = {
                "tags": (b'{"not": "a list"}', "Input should be a valid list"),
                "limits": (b"[1, 2]", "valid dictionary"),
                "name": (b"\xff\xfe", "not UTF-8"),
                "rate_limit": (b"", "valid integer"),
                "regions/eu": (b"many", "valid integer"),
            }
            for key, (value, why) in cases.items():
                error = await _rejection(client, live, etcd_prefix + key, value)
                assert error.keys == (etcd_prefix + key,), key
                assert why in str(error), (key, str(error))
                assert live.current is good
                await client.delete(etcd_prefix + key)
                await live.wait_for(lambda s: live.last_error is None, timeout=5)
                good = live.current  # the fix is a new revision, so a new (equal) object
                if key == "rate_limit":
                    await client.put(etcd_prefix + "rate_limit", "5")
                    good = await live.wait_for(lambda s: s.rate_limit == 5, timeout=5)


@pytest.mark.anyio
async def test_json_past_pythons_limits_is_a_rejection_never_the_end_of_the_settings(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """``json.loads`` raises ValueError (not JSONDecodeError) for an integer of more than 4,300
    digits, and RecursionError for deep nesting: either escaped the decoding, ended the settings'
    follow task, and every later change was ignored while /readyz said "never loaded". Each is a
    rejection of its key now, and the next good value applies."""
    deep = b"[" * 100_000 + b"]" * 100_000
    huge = b"9" * 5_000
    cases = {
        "tags": (deep, "nested too deeply"),
        "limits": (b'{"burst": ' + huge + b"}", "a number too long"),
        "regions": (b'{"eu": ' + huge + b"}", "a number too long"),
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(Model, prefix=etcd_prefix, client=client, report=False) as live:
            for key, (value, why) in cases.items():
                good = live.current
                error = await _rejection(client, live, etcd_prefix + key, value)
                assert error.keys == (etcd_prefix + key,), key
                assert why in str(error), (key, str(error))
                assert "9999" not in str(error)  # never the value
                assert live.current is good
                await client.delete(etcd_prefix + key)
                await live.wait_for(lambda s: live.last_error is None, timeout=5)
            revision = await client.put(etcd_prefix + "rate_limit", "7")
            settings = await live.wait_for(lambda s: s.rate_limit == 7, timeout=5)
            assert (settings.rate_limit, live.revision) == (7, revision)


@pytest.mark.anyio
async def test_a_crash_of_our_decoding_is_a_rejection_never_the_end_of_the_settings(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: whatever our key decoding raises on some value is a rejection of that
    revision (logged as ``config.decode_crashed``), and the next good value applies."""
    from aetcdcfg._layers import Layer

    real_decode = Layer.decode

    def decode(layer: Layer, identity: object, changed: object) -> object:
        if changed and any(key.endswith("/boom") for key in changed):  # type: ignore[attr-defined]
            raise RuntimeError("a bug")
        return real_decode(layer, identity, changed)  # type: ignore[arg-type]

    monkeypatch.setattr(Layer, "decode", decode)
    with capture_logs() as logs:
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            async with LiveSettings(Model, prefix=etcd_prefix, client=client, report=False) as live:
                good = live.current
                error = await _rejection(client, live, etcd_prefix + "boom", b"1")
                assert "RuntimeError" in str(error) and live.current is good
                await client.put(etcd_prefix + "rate_limit", "7")
                settings = await live.wait_for(lambda s: s.rate_limit == 7, timeout=5)
    assert settings.rate_limit == 7
    assert [e["error_type"] for e in logs if e["event"] == "config.decode_crashed"] == ["RuntimeError"]


@pytest.mark.anyio
async def test_large_empty_and_odd_keys_are_handled(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    big = "x" * (1024 * 1024)
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "note", big)  # 1 MiB: under etcd's 1.5 MiB request limit
        await client.put_many(
            {
                etcd_prefix + "name": "",
                etcd_prefix + "limits//burst": "3",  # an empty path segment is skipped
                etcd_prefix + "regions/eu-west 1/x": "2",  # dict keys keep odd characters and slashes
                etcd_prefix + "ümlaut key": "ignored",
                etcd_prefix + "rate_limit/extra": "ignored",
            }
        )
        with capture_logs() as logs:
            async with LiveSettings(Model, prefix=etcd_prefix, client=client) as live:
                current = live.current
    assert current.note == big
    assert current.name == ""
    assert current.limits.burst == 3
    assert current.regions == {"eu-west 1/x": 2}
    unknown = {entry["key"] for entry in logs if entry["event"] == "config.unknown_key"}
    assert unknown == {"ümlaut key", "rate_limit/extra"}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("server_key", "key_file: .* does not match cert_file"),  # the server's key, not the client's
        ("missing", r"key_file: cannot read .*missing-key\.pem"),
    ],
)
def test_a_bad_client_key_is_named_before_connecting(tmp_path: Path, key: str, expected: str) -> None:
    files = TLSFiles.create(tmp_path)
    key_file = files.server_key if key == "server_key" else tmp_path / "missing-key.pem"

    async def connect() -> None:
        async with EtcdClient(
            endpoints=["https://127.0.0.1:1"],
            ca_file=files.ca_file,
            cert_file=files.client_cert,
            key_file=key_file,
        ):
            pass

    with pytest.raises(ConfigurationError, match=expected) as info:
        anyio.run(connect)
    assert info.value.setting == "key_file"


# -- properties of the pure parts ------------------------------------------------------------------

segment = st.text(
    alphabet=st.characters(blacklist_characters="/", blacklist_categories=["Cs"]), min_size=1, max_size=6
)


@settings(max_examples=300, deadline=None)
@given(st.lists(segment, min_size=1, max_size=4))
def test_every_key_maps_to_a_field_or_is_ignored_never_crashes(parts: list[str]) -> None:
    key = "/".join(parts)
    resolved = resolve_key(Model, key)
    if resolved is not None:
        path, _ = resolved
        assert path[0] in Model.model_fields
    decoded = decode_items(Model, {key: b"1"})
    assert set(decoded.problems) <= {key}


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["rate_limit", "name", "tags", "limits/burst", "regions/a", "regions/b"]),
        st.integers(-5, 500),
    )
)
def test_decoding_valid_values_round_trips_through_the_model(values: dict[str, int]) -> None:
    items = {k: (json.dumps([str(v)]) if k == "tags" else str(v)).encode() for k, v in values.items()}
    decoded = decode_items(Model, items)
    assert not decoded.problems
    if "limits/burst" in values:  # the text, as from the environment: pydantic parses it
        assert Limits(**decoded.data["limits"]).burst == values["limits/burst"]
    if "name" in values:
        assert decoded.data["name"] == str(values["name"])  # a str field keeps the text
    assert set(decoded.origins.values()) == set(items)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join),
        st.binary(max_size=4),
        max_size=6,
    )
)
def test_dump_format_round_trips_any_keys_and_bytes(items: dict[str, bytes]) -> None:
    assert flatten(unflatten(items)) == items


def test_records_and_canary_specs_nested_past_pythons_limits_are_no_records() -> None:
    """A record or canary spec ``[[[[...]]]]`` raised RecursionError, which nothing reading them
    expects (a bad one is skipped, or an empty overlay): now it is a ValueError like bad JSON."""
    from aetcdcfg import AuditRecord, CanarySpec, InstanceRecord

    deep = b"[" * 100_000 + b"]" * 100_000
    for kind in (InstanceRecord, AuditRecord, CanarySpec):
        with pytest.raises(ValueError, match="nested too deeply"):
            kind.from_json(deep)
