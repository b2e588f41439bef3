"""Keys -> model input: the incremental decoder LiveSettings uses gives what decoding everything gives."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from aetcdcfg._validate import build_layered
from aetcdcfg._values import ABSENT, ModelSettings, decode_value, decoding_for
from aetcdcfg.source import DecodedConfig, KeyDecoder, _resolve, _set_path


class Db(BaseModel):
    url: str = ""
    pool: int = 5
    options: dict[str, str] = {}


class Model(BaseSettings):
    rate_limit: int = Field(default=100, alias="rateLimit")
    name: str = "svc"
    tags: list[str] = []
    db: Db = Db()
    limits: dict[str, int] = {}
    flags: dict[str, str] = {}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    db: Db = Db()


class AliasedDb(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    url: str = Field("", alias="URL")
    pool: int = Field(5, validation_alias=AliasChoices("size", "POOL"))
    options: dict[str, str] = {}


class Aliased(BaseSettings):
    """Every field spelled several ways at once (the preferred spelling wins), and an AliasPath."""

    model_config = SettingsConfigDict(populate_by_name=True)
    rate_limit: int = Field(default=100, alias="rateLimit")
    db: AliasedDb = Field(AliasedDb(), validation_alias=AliasChoices("database", "DB"))
    login: str = Field("", validation_alias=AliasPath("name", "user"))
    flags: dict[str, str] = {}


def decode_all(model: type[BaseModel], items: dict[str, bytes]) -> DecodedConfig:
    """The reference: every key in one pass, deeper keys first (so they win over whole JSON objects),
    and of keys spelling the same fields the preferred spelling last (so it wins)."""
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    problems: dict[str, str] = {}
    resolved = [(key, target) for key in items if (target := _resolve(model, key)) is not None]
    resolved.sort(key=lambda found: (-found[0].count("/"), [-rank for rank in found[1].rank], found[0]))
    fields: dict[str, set[str]] = {}
    for key, target in resolved:
        decoding = decoding_for(target.target, ModelSettings.of(model))
        value, problem = decode_value(items[key], decoding, top_level=len(target.path) == 1)
        if problem is not None:
            problems[key] = problem
            continue
        _set_path(data, target.keys, value, set())
        fields.setdefault(target.keys[0], set()).update(path[0] for path in target.fills)
        origins.update(dict.fromkeys(target.fills, key))
    for name in [name for name, value in data.items() if value is ABSENT]:  # a field's JSON null
        del data[name]
        origins = {path: key for path, key in origins.items() if path[0] not in fields[name]}
    problems = {key: problems[key] for key in sorted(problems, key=lambda k: (-k.count("/"), k))}
    return DecodedConfig(data, origins, problems)


KEYS = [
    "rate_limit",
    "rateLimit",
    "RATE_LIMIT",
    "RATELIMIT",
    "database",
    "database/URL",
    "database/url",
    "database/size",
    "DB/POOL",
    "db/size",
    "name",
    "tags",
    "db",
    "DB",
    "db/url",
    "db/pool",
    "Db/pool",
    "/db/pool",
    "db//url",
    "db/",
    "db/options",
    "db/options/a",
    "db/options/a/b",
    "limits",
    "limits/eu",
    "Limits/eu",
    "limits//eu/",
    "flags/f1",
    "flags/f2",
    "flags/a/b",
    "flags/",
    "flags",
    "flags-x",  # sorts between "flags" and "flags/..."
    "flags./a",
    "flags0/a",
    "unknown",
    "unknown/x",
    "/",
    "",
]
VALUES = [
    b"1",
    b"7",
    b"x",
    b'"quoted"',
    b'{"url": "u", "pool": 2}',
    b'{"eu": 3}',
    b'["a"]',
    b"\xff",
    b"",
    b'{"options": {"a": "1", "b": "2"}, "pool": 3}',  # a deeper key (db/options/a) overrides one part
    b'{"a": {"b": "c"}, "d": "e"}',
    b"null",
]

layer = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=10)


def same(got: DecodedConfig, want: DecodedConfig) -> None:
    assert got.data == want.data
    assert got.origins == want.origins
    assert list(got.problems.items()) == list(want.problems.items())  # the order keys are named in


@settings(max_examples=400, deadline=None)
@given(st.lists(layer, min_size=1, max_size=6))
def test_incremental_decoding_matches_decoding_everything(revisions: list[dict[str, bytes]]) -> None:
    for model in (Model, Strict, Aliased):
        decoder = KeyDecoder(model)
        for items in revisions:
            same(decoder.decode(items), decode_all(model, items))


@settings(max_examples=400, deadline=None)
@given(st.lists(layer, min_size=1, max_size=6), st.lists(st.sampled_from(KEYS), max_size=3))
def test_decoding_only_the_changed_keys_matches_decoding_everything(
    revisions: list[dict[str, bytes]], extra: list[str]
) -> None:
    for model in (Model, Strict, Aliased):
        decoder = KeyDecoder(model)
        before: dict[str, bytes] = {}  # a first call that names changed keys decodes everything anyway
        for items in revisions:
            changed = [k for k in before.keys() | items.keys() if before.get(k) != items.get(k)]
            same(decoder.decode(items, changed + extra), decode_all(model, items))  # extra: unchanged keys
            before = items


@settings(max_examples=200, deadline=None)
@given(layer, st.sampled_from(KEYS), st.sampled_from(VALUES))
def test_one_changed_key_is_decoded_again(items: dict[str, bytes], key: str, value: bytes) -> None:
    decoder = KeyDecoder(Model)
    decoder.decode(items)
    changed = {**items, key: value}
    same(decoder.decode(changed, [key]), decode_all(Model, changed))
    del changed[key]
    same(decoder.decode(changed, [key]), decode_all(Model, changed))


def test_input_changed_by_a_validator_does_not_change_the_next_revision() -> None:
    decoder = KeyDecoder(Model)
    items = {"db": b'{"options": {"a": "1"}}', "tags": b'["x"]', "flags/f1": b"on", "name": b"n"}
    first = decoder.decode(items)
    first.data["db"]["options"]["a"] = "changed"  # what a mode="before" validator may do to its input
    first.data["tags"].append("y")
    first.data["flags"]["f1"] = "off"
    same(decoder.decode({**items, "name": b"m"}), decode_all(Model, {**items, "name": b"m"}))


def test_a_large_table_decodes_as_key_by_key() -> None:
    table = {f"flags/f{i:05d}": b"on" if i % 2 else b"off" for i in range(5_000)}
    variants = [
        {},
        {"flags/f00003": b'"quoted"', "flags/f00004": b'"not" closed'},
        {"flags/f00005": b"\xff"},  # named as a problem
        {"Flags/f00006": b"case variant"},
        {"flags/sub/key": b"deeper"},
        {"flags": b'{"whole": "table"}'},
        {"flags/": b'{"whole": "table"}'},
        {"name": b"other field"},
    ]
    for extra in variants:
        items = {**table, **extra}
        same(KeyDecoder(Model).decode(items), decode_all(Model, items))


class Opts(BaseModel):
    a: int = 0
    b: int = 0


class Deep(BaseModel):
    opts: Opts = Opts()
    extra: dict[str, dict[str, int]] = {}


class DeepSettings(BaseSettings):
    db: Deep = Deep()


def test_a_deeper_key_overrides_one_value_inside_a_whole_json_value_and_keeps_the_rest() -> None:
    """ "Deeper keys win" merges key by key, all the way down, as layers do."""
    whole = {"db": b'{"opts": {"a": 1, "b": 2}, "extra": {"x": {"p": 1, "q": 2}}}'}
    deeper = {"db/opts/a": b"10", "db/extra/x": b'{"q": 20}'}
    one_prefix = build_layered(DeepSettings, [("/one/", {**whole, **deeper})], 1)
    layered = build_layered(DeepSettings, [("/shared/", whole), ("/one/", deeper)], 1)
    assert one_prefix.db.opts == Opts(a=10, b=2)
    assert one_prefix.db.extra == {"x": {"p": 1, "q": 20}}
    assert one_prefix == layered
    decoder = KeyDecoder(DeepSettings)
    decoder.decode(whole)
    same(decoder.decode({**whole, **deeper}, list(deeper)), decode_all(DeepSettings, {**whole, **deeper}))
