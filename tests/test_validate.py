"""Building a model per revision with sources read once gives what pydantic-settings builds itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from aetcdcfg import EtcdSettingsSource
from aetcdcfg._validate import ReadSources
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
