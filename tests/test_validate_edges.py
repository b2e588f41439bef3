"""Rejections and source order in ``_validate`` that mutation testing found no fast test pinned
(``make mutation``): problems never quote a value (a withheld context entry, a validator's message,
an exception user code raised), the current config is gone after a build, and a model that places
EtcdSettingsSource itself keeps its order.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from aetcdcfg import ConfigRejected, EtcdSettingsSource
from aetcdcfg._validate import WITHHELD, ReadSources, build_layered, explain, explain_raised
from aetcdcfg.source import current_config

SECRET = "s3cr3t-value"


class Kind1(BaseModel):
    kind: Literal["a"]


class Kind2(BaseModel):
    kind: Literal["b"]


class Tagged(BaseSettings):
    store: Kind1 | Kind2 = Field(Kind1(kind="a"), discriminator="kind")


def rejected(model: type[BaseModel], items: dict[str, bytes]) -> ConfigRejected:
    with pytest.raises(ConfigRejected) as info:
        build_layered(model, [("/p/", items)], 7)
    assert SECRET not in str(info.value)
    assert all(SECRET not in problem for problem in info.value.problems)
    return info.value


def test_a_context_entry_that_may_quote_the_value_is_withheld() -> None:
    error = rejected(Tagged, {"store": f'{{"kind": "{SECRET}"}}'.encode()})
    (problem,) = error.problems
    assert problem.startswith("/p/store: ")
    assert WITHHELD in problem and "'a', 'b'" in problem  # the tag withheld, the expected tags shown


def check_name(value: str) -> str:
    if value != "ok":
        raise ValueError(f"{value} is not a name")
    return value


def check_code(value: str) -> str:
    if value != "ok":
        raise TypeError(f"cannot use {value}")
    return value


class Validated(BaseSettings):
    name: Annotated[str, AfterValidator(check_name)] = "ok"
    code: str = "ok"
    other: int = 0

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        return check_code(value)


def test_a_validators_message_is_not_shown() -> None:
    error = rejected(Validated, {"name": SECRET.encode()})
    assert error.keys == ("/p/name",)
    assert error.problems == (
        "/p/name: ValueError raised by a validator (its message is not shown: it may quote the value)",
    )


def test_an_exception_user_code_raises_names_its_function_and_keys_never_its_message() -> None:
    """pydantic does not wrap a TypeError from a validator: it is still a rejection of that field."""
    error = rejected(Validated, {"code": SECRET.encode(), "other": b"1"})
    assert error.keys == ("/p/code",)
    (problem,) = error.problems
    assert problem.startswith("/p/code: TypeError raised in Validated._code (line ")
    assert problem.endswith("(its message is not shown: it may quote the value)")


def test_the_config_being_applied_is_gone_after_a_build() -> None:
    """An EtcdSettingsSource outside LiveSettings contributes nothing, even right after one applied."""
    build_layered(Validated, [("/p/", {"other": b"5"})], 7)
    assert current_config.get() is None
    assert EtcdSettingsSource(Validated)() == {}


class EnvOverEtcd(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_")
    name: str = "default"
    size: int = 0

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


def test_a_model_placing_etcd_below_env_gets_env_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_NAME", "from-env")
    built = build_layered(EnvOverEtcd, [("/p/", {"name": b"from-etcd", "size": b"3"})], 7)
    assert (built.name, built.size) == ("from-env", 3)


class AnnotatedCheck(BaseSettings):
    code: Annotated[str, AfterValidator(check_code)] = "ok"


def test_an_exception_from_an_annotated_validator_names_its_field_key() -> None:
    error = rejected(AnnotatedCheck, {"code": SECRET.encode()})
    assert error.keys == ("/p/code",)
    assert error.problems[0].startswith("/p/code: TypeError raised in check_code (line ")


class Whole(BaseSettings):
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def ordered(self) -> Whole:
        if self.low > self.high:
            raise ValueError(f"{self.low} > {self.high}")
        if self.low == self.high:
            raise TypeError(f"{self.low} == {self.high}")
        return self


def test_a_model_validators_rejection_names_the_changed_keys() -> None:
    """A whole-model error has no field: the keys the change touched are the ones to look at."""
    for items, problem in [
        ({"low": b"5"}, " (not from etcd): ValueError raised by a validator"),
        ({"low": b"1"}, "Whole: TypeError raised in Whole.ordered (line "),
    ]:
        with pytest.raises(ConfigRejected) as info:
            build_layered(Whole, [("/p/", items)], 7, changed=["/p/low"])
        assert info.value.keys == ("/p/low",)
        (found,) = info.value.problems
        assert found.startswith(problem), found


class Limits(BaseSettings):
    limits: dict[str, int] | str = {}


def test_a_later_layers_text_replaces_an_earlier_layers_object() -> None:
    base = ("/base/", {"limits": b'{"eu": 1}'})
    assert build_layered(Limits, [base, ("/top/", {"limits": b"none"})], 7).limits == "none"
    assert build_layered(Limits, [("/base/", {"limits": b"none"}), ("/top/", base[1])], 7).limits == {"eu": 1}


# -- which field user code that raised validates (explain_raised) -------------------------------------


def check_level(value: int) -> int:
    if value > 9:
        raise TypeError(f"level {value}")
    return value


class Gauge(int):
    """A custom type whose own validator is a classmethod (a classmethod object in its ``vars``)."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls.check, core_schema.int_schema())

    @classmethod
    def check(cls, value: int) -> Gauge:
        if value > 9:
            raise TypeError(f"gauge {value}")
        return cls(value)


class Inner(BaseModel):
    level: Annotated[int, AfterValidator(check_level)] | None = None
    other: int = 0


class Raising(BaseSettings):
    gauge: Gauge = Gauge(0)
    maybe: Annotated[int, AfterValidator(check_level)] | None = None
    tags: list[int] = []  # a generic alias, no validator of the user's: never blamed
    bounded: Annotated[int, Field(ge=0)] = 0  # metadata that runs no code of the user's
    inner: Inner = Inner()


@pytest.mark.parametrize(
    ("items", "key", "function"),
    [
        ({"gauge": b"10"}, "/p/gauge", "Gauge.check"),
        ({"maybe": b"10"}, "/p/maybe", "check_level"),  # inside a union member's Annotated
        ({"inner/level": b"10"}, "/p/inner/level", "check_level"),  # in a nested model
    ],
)
def test_an_exception_user_code_raises_names_the_keys_of_the_field_it_validates_only(
    items: dict[str, bytes], key: str, function: str
) -> None:
    everything = {"tags": b"[1]", "bounded": b"1", "inner/other": b"1", **items}
    with pytest.raises(ConfigRejected) as info:
        build_layered(Raising, [("/p/", everything)], 7, changed=[f"/p/{k}" for k in everything])
    assert info.value.keys == (key,)
    (problem,) = info.value.problems
    assert problem.startswith(f"{key}: TypeError raised in {function} (line "), problem


def test_an_exception_with_no_frame_of_user_code_names_the_model_and_the_changed_keys() -> None:
    """Raised inside pydantic (or handed over without a traceback): no function to name."""
    keys, problems = explain_raised(TypeError(SECRET), Raising, {("gauge",): "/p/gauge"}, ["/p/gauge"])
    assert keys == ["/p/gauge"]
    assert problems == [
        "Raising: TypeError raised in Raising (its message is not shown: it may quote the value)"
    ]


class Nested(BaseSettings):
    inner: Inner = Inner()


def test_an_error_inside_a_field_given_whole_names_the_fields_key() -> None:
    """``inner`` set as one JSON value: an error at ``inner.other`` is the ``inner`` key's."""
    error = rejected(Nested, {"inner": b'{"other": "x"}'})
    assert error.keys == ("/p/inner",)
    assert error.problems[0].startswith("/p/inner: Input should be a valid integer")


# -- ReadSources builds what pydantic-settings builds -------------------------------------------------


class Peek(PydanticBaseSettingsSource):
    """A source of the user's that reads what the sources before it gave, by their names."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, "", False

    def __call__(self) -> dict[str, Any]:
        return {"seen": ",".join(f"{name}={data}" for name, data in self.settings_sources_data.items())}


class Peeking(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_")
    name: str = "default"
    seen: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, Peek(settings_cls)


class ChoiceFirst(BaseSettings):
    """Its field's first choice is not its name: init input by name is renamed to it, so the init
    kwargs still beat the environment, which pydantic-settings files under that choice."""

    model_config = SettingsConfigDict(env_prefix="EDGE_")
    name: str = Field("default", validation_alias=AliasChoices("edge_svc_name", "name"))


@pytest.mark.parametrize("model", [Peeking, ChoiceFirst])
def test_sources_read_once_build_what_pydantic_settings_builds(
    model: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_NAME", "from-env")
    monkeypatch.setenv("EDGE_SVC_NAME", "from-env")
    sources = ReadSources.read(model)
    assert sources is not None
    want = model(name="init").model_dump()
    assert want["name"] == "init"
    assert sources.construct(model, {"name": "init"}).model_dump() == want


class Sized(BaseModel):
    one: Annotated[list[int], Field(min_length=1)] = [1]
    two: Annotated[list[int], Field(min_length=2)] = [1, 2]


def test_a_bounds_plural_reads_as_pydantic_renders_it() -> None:
    """pydantic derives ``expected_plural`` from the bound: shown (the length found is withheld)."""
    with pytest.raises(ValidationError) as info:
        Sized.model_validate({"one": [], "two": [1]})
    _keys, problems = explain(info.value, Sized, {("one",): "/p/one", ("two",): "/p/two"}, [])
    assert problems == [
        "/p/one: List should have at least 1 item after validation, not <withheld>",
        "/p/two: List should have at least 2 items after validation, not <withheld>",
    ]


class FromTheCommandLine(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=["--name", "from-cli"])
    name: str = "default"


def test_a_model_parsing_its_command_line_is_built_by_pydantic_settings_itself() -> None:
    assert ReadSources.read(FromTheCommandLine) is None  # its CLI source would be missing
    assert ReadSources.read(Peeking) is not None


class Node(BaseModel):
    """A model that nests itself: the search for the field a function validates stops (8 levels)."""

    level: Annotated[int, AfterValidator(check_level)] = 0
    child: Node | None = None


class Tree(BaseSettings):
    root: Node = Node()


def test_an_exception_in_a_model_nesting_itself_names_its_key() -> None:
    with pytest.raises(ConfigRejected) as info:
        build_layered(Tree, [("/p/", {"root/child/level": b"10"})], 7)
    assert info.value.keys == ("/p/root/child/level",)
