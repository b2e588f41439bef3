"""More field types decode from etcd as pydantic-settings decodes the environment: every text, every type.

``test_decode_like_env`` draws models from common field types; mutation testing of ``_values.py``
(``make mutation``) showed the rarer shapes its decisions are about were never drawn: ``Json[...]``,
``NoDecode``/``ForceDecode``, type aliases, ``Annotated`` union members, ``Strict`` members, a
``Literal`` of an ``IntEnum``, sets, dataclasses, root models, secrets, untyped dicts. Here each of
them meets every text of ``TEXTS`` (exhaustively, no sampling) under a few model configurations.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional

import pytest
from pydantic import BaseModel, Field, Json, RootModel, Secret, SecretStr, create_model
from pydantic.types import Strict
from pydantic_settings import BaseSettings, ForceDecode, NoDecode, SettingsConfigDict
from typing_extensions import TypeAliasType

from aetcdcfg._validate import validate_layered
from aetcdcfg.source import KeyDecoder

from .test_decode_like_env import TEXTS, Color, Level, Nested, as_env, environment, outcome


@dataclasses.dataclass
class Point:
    x: int = 0
    y: int = 0


class Numbers(RootModel[list[int]]):
    pass


class Count(RootModel[int]):
    pass


IntList = TypeAliasType("IntList", list[int])
MaybeInts = TypeAliasType("MaybeInts", "list[int] | None")
RawInts = TypeAliasType("RawInts", Annotated[list[int], NoDecode])
IntsOrText = TypeAliasType("IntsOrText", list[int] | str)
OptionalInts = TypeAliasType("OptionalInts", list[int] | None)  # not a forward reference, unlike MaybeInts

#: name -> (annotation, sub-keys it is written with besides the field's own key)
TYPES: dict[str, tuple[Any, list[str]]] = {
    "Json[list[int]]": (Json[list[int]], []),
    "Optional[Json[list[int]]]": (Optional[Json[list[int]]], []),  # noqa: UP045
    "Annotated[list[int], NoDecode]": (Annotated[list[int], NoDecode], []),
    "Annotated[list[int], ForceDecode]": (Annotated[list[int], ForceDecode], []),
    "IntList (a type alias)": (IntList, []),
    "MaybeInts (a type alias of a union)": (MaybeInts, []),
    "Annotated[list[int], Field(max_length=3)] | str": (
        Annotated[list[int], Field(max_length=3)] | str,
        [],
    ),
    "Annotated[IntList, Field()] | str": (Annotated[IntList, Field()] | str, []),
    "Annotated[MaybeInts, Field()] | str": (Annotated[MaybeInts, Field()] | str, []),
    "RawInts (an alias of Annotated[list[int], NoDecode])": (RawInts, []),
    "Annotated[Json[list[int]], Field()] | str": (Annotated[Json[list[int]], Field()] | str, []),
    "Annotated[int, Strict()] | str": (Annotated[int, Strict()] | str, []),
    "Annotated[int, Strict()] | None": (Annotated[int, Strict()] | None, []),
    "Annotated[Literal[Level.low], Field()] | None": (Annotated[Literal[Level.low], Field()] | None, []),
    "int | OptionalInts (an alias of a union, in a union)": (int | OptionalInts, []),
    "int | Annotated[OptionalInts, Field()]": (int | Annotated[OptionalInts, Field()], []),
    "Literal[Level.low, Level.high]": (Literal[Level.low, Level.high], []),
    "Literal[1, 2] (plain numbers)": (Literal[1, 2], []),
    "Literal[Color.red] (a str enum)": (Literal[Color.red], []),
    "Annotated[Literal[Level.low], Field()]": (Annotated[Literal[Level.low], Field()], []),
    "Optional[Literal[Level.high]]": (Optional[Literal[Level.high]], []),  # noqa: UP045
    "Color | None": (Color | None, []),
    "Level (an IntEnum, named by a member's name)": (Level, []),
    "Optional[Level]": (Optional[Level], []),  # noqa: UP045
    "set[int]": (set[int], []),
    "frozenset[str]": (frozenset[str], []),
    "deque[int]": (deque[int], []),
    "Point (a dataclass)": (Point, []),
    "Numbers (a RootModel)": (Numbers, []),
    "Count (a RootModel of int)": (Count, []),
    "SecretStr": (SecretStr, []),
    "Secret[int]": (Secret[int], []),
    "dict": (dict, ["x"]),
    "Mapping[str, Any]": (Mapping[str, Any], ["x"]),
    "dict[str, Nested]": (dict[str, Nested], ["x"]),
    "dict[str, list[int] | str]": (dict[str, list[int] | str], ["x"]),
    "dict[str, Annotated[list[int], Field()] | str]": (dict[str, Annotated[list[int], Field()] | str], ["x"]),
    "dict[str, IntList]": (dict[str, IntList], ["x"]),
    "dict[str, IntsOrText] (an alias of a union)": (dict[str, IntsOrText], ["x"]),
}

#: (strict, env_parse_enums, env_parse_none_str, enable_decoding)
CONFIGS = [(False, False, None, True), (True, True, "null", True), (False, False, None, False)]


def model_of(annotation: Any, config: tuple[Any, ...]) -> type[BaseSettings]:
    strict, parse_enums, none_str, decoding = config
    model: type[BaseSettings] = create_model(  # type: ignore[call-overload]
        "Generated", __base__=BaseSettings, __config__=None, f0=(annotation, None)
    )
    model.model_config = SettingsConfigDict(
        env_prefix="GEN_",
        env_nested_delimiter="__",
        strict=strict,
        env_parse_enums=parse_enums,
        env_parse_none_str=none_str,
        enable_decoding=decoding,
    )
    model.model_rebuild(force=True)
    return model


def ours_and_theirs(model: type[BaseModel], items: dict[str, str]) -> tuple[str, str]:
    decoded = KeyDecoder(model).decode({key: text.encode() for key, text in items.items()})
    ours = outcome(lambda: validate_layered(model, [("/p/", decoded)], 1))
    with environment(as_env(items)):
        theirs = outcome(model)
    return ours, theirs


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "strict-enums-null", "no-decoding"])
@pytest.mark.parametrize("name", list(TYPES))
def test_every_text_decodes_as_from_the_environment(name: str, config: tuple[Any, ...]) -> None:
    annotation, subkeys = TYPES[name]
    model = model_of(annotation, config)
    differ = []
    for text in TEXTS:
        for key in ["f0", *(f"f0/{sub}" for sub in subkeys)]:
            ours, theirs = ours_and_theirs(model, {key: text})
            if ours != theirs:
                differ.append((key, text, ours, theirs))
    assert not differ


#: Dict fields to mark with NoDecode/ForceDecode. pydantic-settings applies a dict field's marker (and
#: ``enable_decoding``) to its own whole value, and to a value of one of its keys only when the
#: value type is a union with a structured member; a structured value type is JSON regardless.
MARKED_DICTS: dict[str, Any] = {
    "dict[str, list[int] | str]": dict[str, list[int] | str],
    "Optional[dict[str, list[int] | str]]": Optional[dict[str, list[int] | str]],  # noqa: UP045
    "dict[str, list[int]]": dict[str, list[int]],
    "dict": dict,
}

#: How the field is written: its whole value (GEN_F0), one key's value (GEN_F0__X), or both.
LAYOUTS: dict[str, Any] = {
    "whole": lambda text: {"f0": text},
    "per-key": lambda text: {"f0/x": text},
    "whole-and-per-key": lambda text: {"f0": '{"y": [3]}', "f0/x": text},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("decoding", [True, False], ids=["decoding", "no-decoding"])
@pytest.mark.parametrize("marker", [NoDecode, ForceDecode], ids=["NoDecode", "ForceDecode"])
def test_a_dict_fields_own_marker_decodes_its_values_as_from_the_environment(
    marker: Any, decoding: bool, layout: str
) -> None:
    """``<prefix>f0/x`` of ``Annotated[dict[str, list[int] | str], NoDecode]`` is text, as ``GEN_F0__X``
    is, and of one with ``ForceDecode`` under ``enable_decoding=False`` JSON (etcd gave the
    opposite: the value type's decoding did not see the dict field's marker). A whole value, and a
    marker that agrees with ``enable_decoding``, decoded alike already; they are here to stay so."""
    differ = []
    for name, annotation in MARKED_DICTS.items():
        model = model_of(Annotated[annotation, marker], (False, False, None, decoding))
        for text in TEXTS:
            items = LAYOUTS[layout](text)
            ours, theirs = ours_and_theirs(model, items)
            if ours != theirs:
                differ.append((name, items, ours, theirs))
    assert not differ


@pytest.mark.parametrize("decoding", [True, False], ids=["decoding", "no-decoding"])
@pytest.mark.parametrize("marker", [NoDecode, ForceDecode], ids=["NoDecode", "ForceDecode"])
def test_a_nested_dict_fields_own_marker_decides_not_the_enclosing_fields(
    marker: Any, decoding: bool
) -> None:
    """``<prefix>f0/d/x`` follows ``d``'s marker, as ``GEN_F0__D__X`` follows the closest field
    holding it, not the opposite marker of ``f0``, the model ``d`` is in."""
    opposite = NoDecode if marker is ForceDecode else ForceDecode
    inner = create_model("Inner", d=(Annotated[dict[str, list[int] | str], marker], {}))
    model = model_of(Annotated[inner, opposite], (False, False, None, decoding))
    differ = []
    for text in TEXTS:
        ours, theirs = ours_and_theirs(model, {"f0/d/x": text})
        if ours != theirs:
            differ.append((text, ours, theirs))
    assert not differ
