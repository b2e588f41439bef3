"""Building a model per revision with sources read once gives what pydantic-settings builds itself."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    Field,
    HttpUrl,
    Json,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from aetcdcfg import EtcdSettingsSource
from aetcdcfg._validate import ReadSources, explain
from aetcdcfg.source import current_config, decode_items


class Db(BaseModel):
    url: str = "sqlite://"
    pool: int = 5
    password: SecretStr = SecretStr("")

    @model_validator(mode="before")
    @classmethod
    def fill_in(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data.setdefault("url", "from-validator")  # changes its input
        return data


class Plain(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_", env_nested_delimiter="__")
    rate_limit: int = Field(100, ge=1)
    name: str = "svc"
    tags: list[str] = []
    db: Db = Db()
    limits: dict[str, int] = {}


class Aliased(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_", populate_by_name=True)
    rate_limit: int = Field(100, alias="rateLimit")
    name: str = Field("svc", validation_alias=AliasChoices("name", "svc_name"))
    db: Db = Db()


class Partial(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_", nested_model_default_partial_update=True)
    db: Db = Db(pool=7)
    name: str = "svc"


class EnvFirst(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_")
    rate_limit: int = 1
    name: str = "svc"

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


KEYS = ["rate_limit", "rateLimit", "name", "svc_name", "tags", "db", "db/url", "db/pool", "limits/eu"]
VALUES = [b"1", b"0", b"7", b"x", b'["a"]', b'{"pool": 2}', b'{"url": "u"}']


def outcome(build: Any) -> Any:
    try:
        return build().model_dump()
    except ValidationError as exc:
        return [(e["loc"], e["type"]) for e in exc.errors()]


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RS_NAME", "from-env")
    monkeypatch.setenv("RS_DB__POOL", "3")
    monkeypatch.chdir(tmp_path)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([Plain, Aliased, Partial, EnvFirst]),
    st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=6),
    st.sampled_from([{}, {"name": "init"}, {"NAME": "init"}, {"rateLimit": 9}]),
)
def test_sources_read_once_build_what_pydantic_settings_builds(
    model: type[BaseSettings], items: dict[str, bytes], init: dict[str, Any]
) -> None:
    decoded = decode_items(model, items)
    sources = ReadSources.read(model)
    assert sources is not None
    token = current_config.set(decoded)
    try:
        # EnvFirst lists EtcdSettingsSource itself: only the init kwargs are passed in.
        kwargs = dict(init) if model is EnvFirst else {**decoded.data, **init}
        want = outcome(lambda: model(**kwargs))
        assert outcome(lambda: sources.construct(model, dict(kwargs))) == want
        # And again, from the same reads.
        assert outcome(lambda: sources.construct(model, dict(kwargs))) == want
    finally:
        current_config.reset(token)


# -- rejections never quote the value ---------------------------------------------------------------


class Kind1(BaseModel):
    kind: Literal["a"]


class Kind2(BaseModel):
    kind: Literal["b"]


class Color(str, Enum):
    red = "red"


class Leaky(BaseModel):
    """Fields whose pydantic error messages quote (part of) the input."""

    store: Annotated[Kind1 | Kind2, Field(discriminator="kind")] = Kind1(kind="a")
    id: UUID | None = None
    mode: Literal["x", "y"] = "x"
    color: Color = Color.red
    port: int = 1
    url: HttpUrl | None = None
    blob: Json[dict[str, int]] | None = None
    code: Annotated[str, Field(pattern=r"^[a-z]+$")] = "a"
    short: Annotated[str, Field(max_length=3)] = ""
    items: Annotated[list[int], Field(min_length=2)] = [1, 2]
    stamp: datetime | None = None
    custom: Annotated[str, AfterValidator(lambda v: _custom_error(v))] = ""


def _custom_error(value: str) -> str:
    if value:
        raise PydanticCustomError("not_allowed", "{value} is not allowed", {"value": value})
    return value


SECRET = "s3cr3t"
#: Each field's bad value; a UUID parser says where it stopped ("found `z` at 0"), so the first
#: character is distinctive too.
LEAKY_VALUES: dict[str, Any] = {
    "store": {"kind": SECRET + "-tag"},
    "id": "z" + SECRET,
    "mode": SECRET,
    "color": SECRET,
    "port": SECRET,
    "url": SECRET + " url",
    "blob": SECRET + "{",
    "code": SECRET + "!",
    "short": SECRET,
    "items": [1],
    "stamp": SECRET,
    "custom": SECRET,
}


def test_problems_are_built_from_the_error_type_and_model_context_never_the_input() -> None:
    origins = {(name,): f"/app/{name}" for name in LEAKY_VALUES}
    with pytest.raises(ValidationError) as info:
        Leaky.model_validate(LEAKY_VALUES)
    assert {e["loc"][0] for e in info.value.errors()} == set(LEAKY_VALUES)  # every field fails
    keys, problems = explain(info.value, Leaky, origins, [])
    text = "\n".join(problems)
    assert SECRET not in text
    assert "`z`" not in text and "1" not in text.replace("/app/", "")  # the UUID's char, the list's length
    assert keys == [f"/app/{name}" for name in LEAKY_VALUES]
    # what comes from the model is still said
    for said in (
        "'a', 'b'",
        "'kind'",
        "'x' or 'y'",
        "'red'",
        "^[a-z]+$",
        "at most 3 characters",
        "at least 2",
    ):
        assert said in text, said
    assert "valid UUID" in text and "valid integer" in text and "not_allowed" in text
