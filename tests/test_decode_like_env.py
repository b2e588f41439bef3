"""Values from etcd decode as pydantic-settings decodes the same text from the environment.

A differential test: for generated settings models and generated values, the keys
``<prefix>f0`` and ``<prefix>f0/a`` give the same object (or both a rejection) as the environment
variables ``GEN_F0`` and ``GEN_F0__A`` (``env_nested_delimiter="__"``); and the incremental
KeyDecoder LiveSettings uses gives what decoding everything at once gives. One test goes through
real etcd and LiveSettings.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Literal, Optional
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from aetcdcfg import ConfigRejected, EtcdClient, LiveSettings
from aetcdcfg._validate import validate_layered
from aetcdcfg.source import KeyDecoder
from aetcdcfg.testing import EtcdServer


class Color(str, enum.Enum):
    one = "1"
    red = "red"
    zero_one = "01"


class Level(enum.IntEnum):
    low = 1
    high = 2


class Nested(BaseModel):
    a: int = 0
    b: str = ""
    c: Optional[Decimal] = None  # noqa: UP045  (the spelling is part of what is tested)


#: The field types a generated model draws from: scalars, enums, unions, Optional, containers,
#: a nested model. ``list[int] | str`` and ``Optional[Nested]`` are unions with a complex member.
TYPES: dict[str, Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "Decimal": Decimal,
    "Color": Color,
    "Level": Level,
    "Optional[int]": Optional[int],  # noqa: UP045
    "int | None": int | None,
    "str | int": str | int,
    "int | str": int | str,
    "Optional[Decimal]": Optional[Decimal],  # noqa: UP045
    "Literal": Literal["a", "1"],
    "Optional[Color]": Optional[Color],  # noqa: UP045
    "list[int]": list[int],
    "list[str]": list[str],
    "tuple[int, ...]": tuple[int, ...],
    "dict[str, int]": dict[str, int],
    "dict[str, str]": dict[str, str],
    "dict[str, list[int]]": dict[str, list[int]],
    "dict[str, list[int] | int]": dict[str, list[int] | int],
    "Optional[list[int]]": Optional[list[int]],  # noqa: UP045
    "list[int] | str": list[int] | str,
    "Nested": Nested,
    "Optional[Nested]": Optional[Nested],  # noqa: UP045
}
#: Sub-keys for the fields that have them (a nested model's fields, a dict's keys).
SUBKEYS = {"Nested": ["a", "b", "c"], "Optional[Nested]": ["a", "b", "c"]}
TEXTS = [
    "1",
    "01",
    "1.10",
    "12345678901234567890.12",
    "-3",
    "1e3",
    "true",
    "false",
    "null",
    "red",
    "a",
    "low",
    "",
    " 1",
    '"x"',
    '"1"',
    "[1, 2]",
    '["a"]',
    "[1",
    '{"a": 1}',
    '{"a": "x", "b": "2"}',
    '{"x": [1]}',
    "{",
    "abc",
    "NaN",
]


@st.composite
def cases(draw: st.DrawFn) -> tuple[tuple[tuple[str, str], ...], tuple[Any, ...], list[dict[str, str]]]:
    """(field types, model settings, revisions: each {relative etcd key: text})."""
    names = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=1, max_size=4))
    fields = tuple((f"f{i}", name) for i, name in enumerate(names))
    config = (draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([None, "null"])))
    keys: list[str] = []
    for field, name in fields:
        keys.append(field)
        if name in SUBKEYS:
            keys += [f"{field}/{sub}" for sub in SUBKEYS[name]]
        elif name.startswith("dict"):
            keys += [f"{field}/x", f"{field}/y"]
    revision = st.dictionaries(st.sampled_from(keys), st.sampled_from(TEXTS), max_size=6)
    return fields, config, draw(st.lists(revision, min_size=1, max_size=3))


_models: dict[Any, type[BaseSettings]] = {}


def model_of(fields: tuple[tuple[str, str], ...], config: tuple[Any, ...]) -> type[BaseSettings]:
    found = _models.get((fields, config))
    if found is None:
        strict, parse_enums, none_str = config
        found = create_model(  # type: ignore[call-overload]
            "Generated",
            __base__=BaseSettings,
            __config__=None,
            **{field: (TYPES[name], None) for field, name in fields},
        )
        found.model_config = SettingsConfigDict(
            env_prefix="GEN_",
            env_nested_delimiter="__",
            strict=strict,
            env_parse_enums=parse_enums,
            env_parse_none_str=none_str,
        )
        found.model_rebuild(force=True)
        _models[(fields, config)] = found
    return found


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly ``values`` as the GEN_ variables of the environment."""
    ours = {name: value for name, value in os.environ.items() if name.startswith("GEN_")}
    assert not ours, "the environment already has GEN_ variables"
    with mock.patch.dict(os.environ, values):
        yield


def as_env(items: dict[str, str]) -> dict[str, str]:
    return {"GEN_" + key.replace("/", "__").upper(): text for key, text in items.items()}


def canonical(value: Any) -> str:
    """``value`` as comparable text: dicts in key order, Decimal exact (repr), NaN equal to NaN."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {canonical(value[key])}" for key in sorted(value, key=repr)) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(map(canonical, value))}]"
    return repr(value)


def outcome(build: Any) -> str:
    """What a build gives: the dumped object, or that it was rejected."""
    try:
        return canonical(build().model_dump())
    except (ValidationError, SettingsError, ConfigRejected):
        return "rejected"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_etcd_values_decode_as_pydantic_settings_decodes_the_environment(
    case: tuple[tuple[tuple[str, str], ...], tuple[Any, ...], list[dict[str, str]]],
) -> None:
    fields, config, revisions = case
    model = model_of(fields, config)
    decoder = KeyDecoder(model)
    before: dict[str, bytes] = {}
    for revision in revisions:
        items = {key: text.encode() for key, text in revision.items()}
        changed = [k for k in before.keys() | items.keys() if before.get(k) != items.get(k)]
        decoded = decoder.decode(items, changed)
        everything = KeyDecoder(model).decode(items)
        assert canonical(decoded.data) == canonical(everything.data)
        assert (dict(decoded.origins), decoded.problems) == (dict(everything.origins), everything.problems)
        ours = outcome(lambda: validate_layered(model, [("/p/", decoded)], 1))  # noqa: B023
        with environment(as_env(revision)):
            theirs = outcome(model)
        assert ours == theirs, (fields, config, revision)
        before = items


class Exact(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GEN_", env_nested_delimiter="__")
    amount: Decimal = Decimal(0)
    color: Color = Color.red
    version: str | int = 0
    level: Level = Level.low
    name: str = ""
    maybe: Optional[int] = None  # noqa: UP045
    nested: Nested = Nested()
    numbers: list[int] | str = []


def test_the_values_of_issue_17_decode_as_from_the_environment() -> None:
    """Through etcd a Decimal lost digits, a str enum's "1" and "1.10" for str | int were rejected."""
    texts = {"amount": "12345678901234567890.12", "color": "1", "version": "1.10"}
    decoded = KeyDecoder(Exact).decode({k: v.encode() for k, v in texts.items()})
    ours = validate_layered(Exact, [("/p/", decoded)], 1)
    with environment(as_env(texts)):
        theirs = Exact()
    assert ours == theirs
    assert (ours.amount, ours.color, ours.version) == (Decimal("12345678901234567890.12"), Color.one, "1.10")


@pytest.mark.anyio
async def test_live_settings_from_etcd_equal_pydantic_settings_from_the_environment(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    texts = {
        "amount": "12345678901234567890.12",
        "color": "1",
        "version": "1.10",
        "level": "2",
        "name": '"quoted"',  # a str takes the text as it is, quotes and all
        "nested": '{"a": 1, "b": "x"}',
        "nested/c": "0.10",
        "numbers": "[1, 2]",
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + key: text for key, text in texts.items()})
        async with LiveSettings(Exact, prefix=etcd_prefix, client=client) as live:
            ours = live.current
            await client.put(etcd_prefix + "numbers", "not json")
            changed = await live.wait_for(lambda s: s.numbers == "not json", timeout=5)
    with environment(as_env(texts)):
        theirs = Exact()
    with environment(as_env({**texts, "numbers": "not json"})):
        theirs_changed = Exact()
    assert ours == theirs
    assert ours.amount == Decimal("12345678901234567890.12") and ours.nested.c == Decimal("0.10")
    assert (ours.color, ours.version, ours.name) == (Color.one, "1.10", '"quoted"')
    assert changed == theirs_changed
