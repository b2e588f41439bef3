"""Key matching and rejections that mutation testing showed no fast test pinned (``make mutation``).

Keys match a field by name, by alias (``alias`` or a ``validation_alias`` string) and, unless the
model is ``case_sensitive``, case-insensitively, as pydantic-settings matches environment variables;
an unknown key is ignored by a settings model and rejected by a plain model with ``extra="forbid"``;
a rejected value names its full key (so its layer), and decoding a revision never changes a value
decoded for an earlier one.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from aetcdcfg import ConfigRejected, EtcdSettingsSource
from aetcdcfg._validate import build_layered
from aetcdcfg.cli._secrets import Secrets
from aetcdcfg.source import MASK, KeyDecoder, resolve_key


class Named(BaseSettings):
    model_config = SettingsConfigDict(populate_by_name=True)
    url: str = Field("", alias="db_url")
    host: str = Field("", validation_alias="DB_HOST")
    pool: int = 1


class CaseSensitive(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True)
    pool: int = 1


class Db(BaseModel):
    url: str = ""
    pool: int = 1


class WithDb(BaseSettings):
    db: Db = Db()


def build(model: type[BaseModel], items: dict[str, bytes]) -> BaseModel:
    return build_layered(model, [("/p/", items)], 1)


def test_keys_match_a_field_by_name_alias_validation_alias_and_any_case() -> None:
    assert build(Named, {"db_url": b"u", "DB_HOST": b"h", "POOL": b"3"}) == Named(url="u", host="h", pool=3)
    assert build(Named, {"url": b"u", "host": b"h", "pool": b"3"}) == Named(url="u", host="h", pool=3)


def test_a_nested_field_matches_in_any_case_too() -> None:
    assert build(WithDb, {"DB/URL": b"u", "Db/Pool": b"2"}) == WithDb(db=Db(url="u", pool=2))


def test_a_case_sensitive_model_ignores_a_key_in_another_case() -> None:
    assert build(CaseSensitive, {"POOL": b"3"}) == CaseSensitive()
    assert build(CaseSensitive, {"pool": b"3"}) == CaseSensitive(pool=3)


class Aliased(BaseSettings):
    url: str = Field("", alias="db_url")


def test_an_aliased_field_takes_its_alias_key_without_populate_by_name() -> None:
    assert build(Aliased, {"db_url": b"u"}) == Aliased(db_url="u")


class ValidationAliased(BaseSettings):
    host: str = Field("", validation_alias="DB_HOST")
    port: int = Field(0, validation_alias=AliasChoices("db_port", "PORT"))
    # Reached through an AliasPath: as in the environment, its head holds the JSON it is read from.
    user: str = Field("", validation_alias=AliasPath("login", "user"))
    first: str = Field("", validation_alias=AliasPath("hosts", 0))


def test_validation_aliases_and_every_string_choice_fill_their_field() -> None:
    assert build(ValidationAliased, {"DB_HOST": b"h", "PORT": b"5"}) == ValidationAliased(DB_HOST="h", PORT=5)
    assert build(ValidationAliased, {"db_host": b"h", "DB_PORT": b"6"}).port == 6  # any case, as env
    built = build(ValidationAliased, {"login": b'{"user": "u"}', "hosts": b'["a", "b"]'})
    assert (built.user, built.first) == ("u", "a")  # type: ignore[attr-defined]
    with pytest.raises(ConfigRejected) as info:  # a head holds JSON, as LOGIN='{...}' must
        build(ValidationAliased, {"login": b"s3cr3t"})
    assert info.value.keys == ("/p/login",) and "s3cr3t" not in str(info.value)


def test_a_field_name_without_populate_by_name_is_an_unknown_key_as_in_the_environment() -> None:
    """pydantic reads an aliased field only by its alias here: ``URL=u`` in the environment fills
    nothing, and neither does the key ``url`` (it used to reject the whole revision as extra input)."""
    assert build(Aliased, {"url": b"u"}) == Aliased()
    assert build(ValidationAliased, {"host": b"h", "user": b"u"}) == ValidationAliased()
    assert build(ValidationAliased, {"port": b"5"}).port == 5  # a case variant of PORT, as in env


def test_with_populate_by_name_both_names_fill_the_field_and_the_alias_wins() -> None:
    """Both spellings at once: the alias wins whatever the keys sort like, as pydantic-settings
    prefers it in the environment and in init kwargs."""
    assert build(Named, {"url": b"by-name", "db_url": b"by-alias"}) == Named(url="by-alias")

    class Late(BaseSettings):  # an alias that sorts after the name
        model_config = SettingsConfigDict(populate_by_name=True)
        url: str = Field("", alias="z_url")

    assert build(Late, {"url": b"by-name", "z_url": b"by-alias"}) == Late(url="by-alias")
    assert build(Late, {"url": b"by-name"}) == Late(url="by-name")


class AliasedDb(BaseModel):
    url: str = Field("", alias="URL")
    pool: int = Field(1, validation_alias=AliasChoices("POOL_SIZE", "size"))


class WithAliasedDb(BaseSettings):
    db: AliasedDb = Field(AliasedDb(), alias="database")


def test_a_nested_aliased_field_takes_its_alias_key_and_its_alias_inside_json() -> None:
    want = WithAliasedDb(database=AliasedDb(URL="u", POOL_SIZE=3))
    assert build(WithAliasedDb, {"database/URL": b"u", "database/size": b"3"}) == want
    assert build(WithAliasedDb, {"database": b'{"URL": "u"}', "database/pool_size": b"3"}) == want
    # the field names are not what pydantic reads: the keys fill nothing
    assert build(WithAliasedDb, {"database/pool": b"3", "db/URL": b"v"}) == WithAliasedDb()


def test_a_bad_value_under_an_alias_key_names_that_key() -> None:
    with pytest.raises(ConfigRejected) as info:
        build(WithAliasedDb, {"database/URL": b"u", "database/POOL_SIZE": b"s3cr3t"})
    assert info.value.keys == ("/p/database/POOL_SIZE",)
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigRejected) as info:
        build(ValidationAliased, {"db_port": b"s3cr3t"})
    assert info.value.keys == ("/p/db_port",)
    with pytest.raises(ConfigRejected) as info:  # inside an AliasPath head's JSON
        build(ValidationAliased, {"hosts": b"[5]"})
    assert info.value.keys == ("/p/hosts",)


class NamesInErrors(BaseSettings):
    model_config = SettingsConfigDict(loc_by_alias=False)
    pool: int = Field(1, alias="POOL_SIZE")


def test_a_bad_value_names_its_key_when_errors_locate_fields_by_name() -> None:
    with pytest.raises(ConfigRejected) as info:
        build(NamesInErrors, {"POOL_SIZE": b"s3cr3t"})
    assert info.value.keys == ("/p/POOL_SIZE",)
    assert info.value.problems == (
        "/p/POOL_SIZE: Input should be a valid integer, unable to parse string as an integer",
    )


def test_init_kwargs_outrank_etcd_under_either_name_of_a_field() -> None:
    """``init_kwargs={"url": ...}`` (populate_by_name) against the key ``db_url``: two names of one
    field, and the init kwarg still wins, as it does over every source."""
    built = build_layered(Named, [("/p/", {"db_url": b"from-etcd"})], 1, init_kwargs={"url": "init"})
    assert built == Named(url="init")
    items = {"database/URL": b"etcd", "database/POOL_SIZE": b"3"}
    built = build_layered(WithAliasedDb, [("/p/", items)], 1, init_kwargs={"database": {"size": 4}})
    assert built == WithAliasedDb(database=AliasedDb(URL="etcd", POOL_SIZE=4))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: int = 1


class Lenient(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid")  # BaseSettings' default, aimed at init kwargs
    pool: int = 1


def test_an_unknown_key_is_rejected_only_by_a_plain_model_that_forbids_extras() -> None:
    with pytest.raises(ConfigRejected) as info:
        build(Strict, {"pool": b"2", "nope": b"s3cr3t"})
    assert info.value.keys == ("/p/nope",)
    assert "s3cr3t" not in str(info.value)
    # a stray key under a shared prefix must not take a service's settings down
    assert build(Lenient, {"pool": b"2", "nope": b"x"}) == Lenient(pool=2)


class Flags(BaseSettings):
    flags: dict[str, int] = {}


def test_a_rejected_table_value_names_the_key_of_its_layer() -> None:
    """Each layer's table knows only its own keys: the other layer's is not asked for a key it lacks."""
    with pytest.raises(ConfigRejected) as info:
        build_layered(Flags, [("/base/", {"flags/a": b"s3cr3t"}), ("/top/", {"flags/b": b"1"})], 1)
    assert info.value.keys == ("/base/flags/a",)
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigRejected) as info:
        build_layered(Flags, [("/base/", {"flags/a": b"1"}), ("/top/", {"flags/b": b"s3cr3t"})], 1)
    assert info.value.keys == ("/top/flags/b",)


def test_a_deeper_key_never_changes_the_decoded_json_value_of_an_earlier_revision() -> None:
    """``db`` holds JSON and ``db/url`` overrides inside it; once ``db/url`` is deleted, the JSON
    value decoded (and kept) for ``db`` has no ``url``."""
    decoder = KeyDecoder(WithDb)
    first = decoder.decode({"db": b'{"pool": 2}', "db/url": b"u"})
    assert first.data == {"db": {"pool": 2, "url": "u"}}
    second = decoder.decode({"db": b'{"pool": 2}'}, changed=["db/url"])
    assert second.data == {"db": {"pool": 2}}
    third = decoder.decode({"db": b'{"pool": 2}', "db/url": b"v"}, changed=["db/url"])
    assert third.data == {"db": {"pool": 2, "url": "v"}}


def test_a_decoders_first_call_decodes_every_key_even_when_told_what_changed() -> None:
    """``changed`` lists what changed since the last call; before the first there is none to go by."""
    decoder = KeyDecoder(WithDb)
    assert decoder.decode({"db/url": b"u", "db/pool": b"2"}, changed=["db/pool"]).data == {
        "db": {"url": "u", "pool": "2"}
    }


def test_the_source_answers_a_field_lookup_from_its_keys() -> None:
    source = EtcdSettingsSource(Named, {"db_url": b"u"})
    assert source.get_field_value(Named.model_fields["url"], "url") == ("u", "db_url", False)
    assert source.get_field_value(Named.model_fields["pool"], "pool") == (None, "pool", False)


class Tagged(BaseSettings):
    tags: list[str] = []


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "structured field needs JSON: empty value"),
        (b"  ", "structured field needs JSON: empty value"),
        (b'["a",', "structured field needs JSON: Expecting value at line 1 column 6"),
    ],
)
def test_a_structured_fields_bad_json_is_named_by_where_it_fails(raw: bytes, problem: str) -> None:
    assert KeyDecoder(Tagged).decode({"tags": raw}).problems == {"tags": problem}


class Vault(BaseSettings):
    tokens: dict[str, SecretStr] = {}
    anything: dict = {}  # type: ignore[type-arg]


def test_a_dict_fields_key_resolves_to_its_value_type_so_a_secret_value_is_masked() -> None:
    assert resolve_key(Vault, "tokens/eu") == (("tokens", "eu"), SecretStr)
    assert resolve_key(Vault, "anything/eu") == (("anything", "eu"), Any)  # the dict does not say
    assert Secrets(Vault).mask("tokens/eu", b"s3cr3t") == MASK.encode()
