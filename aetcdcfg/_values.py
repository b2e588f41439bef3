"""One etcd value -> what pydantic gets for the field it fills, decided by the field's type.

A value in etcd is text, like an environment variable, and is decoded the way pydantic-settings'
environment source decodes the same text for the same field, so a model reads the same from etcd
as from ``DB__POOL=5`` (with ``env_nested_delimiter="__"``) and pydantic validates as usual:

* a *complex* field — a model, a dataclass, a list, tuple, set, dict or any mapping or sequence
  other than ``str``/``bytes`` (``Json[...]`` and ``Secret[...]`` are not) — takes JSON, and a
  value that is not JSON is a problem;
* a union with a complex member (``Model | None``, ``list[str] | str``) takes the JSON value when
  the text parses as JSON, else the text;
* every other field (``int``, ``Decimal``, ``str``, an enum, ``str | int``, ``bool``...) takes the
  text as it is, and pydantic parses it: ``12345678901234567890.12`` stays exact for a ``Decimal``,
  ``"1"`` is a ``str`` enum's value, ``1.10`` stays ``"1.10"`` for ``str | int``;
* a dict's values (``<prefix>limits/eu``): JSON for a complex value type, but a value that is not
  JSON is passed on as text; for a union with a complex member only a JSON array or object is used,
  and only if the dict field itself decodes (its own ``NoDecode``/``ForceDecode``, else
  ``enable_decoding``), as pydantic-settings decodes ``LIMITS__EU``.

The model's own settings apply as they do to the environment: ``NoDecode``/``ForceDecode`` and
``enable_decoding``, ``env_parse_none_str`` (that text is ``None``), ``env_parse_enums`` (an enum
member's name stands for it) and ``strict`` (the text is first validated leniently, as
pydantic-settings does, so a strict ``int`` field takes ``5``). Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections import deque
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Union

from pydantic import BaseModel, Json, RootModel, Secret, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic.types import Strict
from pydantic_settings import ForceDecode, NoDecode

__all__ = ["ABSENT", "UNTYPED", "Decoding", "DictValues", "ModelSettings", "decode_value", "decoding_for"]

#: The value type of a dict field that does not say (``dict``, ``Mapping``): decoded as JSON when
#: it parses, as pydantic-settings does for values under such a field.
UNTYPED = object()

#: What :func:`decode_value` gives for a value that counts as no value at all.
ABSENT = object()

# How a value is read (Decoding.how).
TEXT = "text"
JSON = "json"  # must parse
JSON_OR_TEXT = "json_or_text"  # the JSON value if the text parses, else the text
CONTAINER_OR_TEXT = "container_or_text"  # a JSON array or object if the text is one, else the text


class ModelSettings(typing.NamedTuple):
    """The settings of the top-level model that change how values decode (as for its environment)."""

    strict: bool
    parse_enums: bool
    none_str: str | None
    decoding: bool  # enable_decoding

    @classmethod
    def of(cls, model: type[BaseModel]) -> ModelSettings:
        config = model.model_config
        return cls(
            bool(config.get("strict")),
            bool(config.get("env_parse_enums")),
            config.get("env_parse_none_str"),  # type: ignore[arg-type]  # a BaseSettings key
            config.get("enable_decoding") is not False,
        )


class DictValues(typing.NamedTuple):
    """The values of a dict field (``<prefix>limits/eu``): their type (:data:`UNTYPED`: the dict does
    not say) and the dict field, whose own decoding applies to some of them."""

    annotation: Any
    field: FieldInfo


class Decoding(typing.NamedTuple):
    """How the values of one field (or of one dict's values) are read."""

    how: str
    none_str: str | None = None
    enums: Any = None  # the annotation whose enum members' names stand for them (env_parse_enums)
    lenient: TypeAdapter[Any] | None = None  # strict fields: the text validated leniently first


def decode_value(raw: bytes, decoding: Decoding, *, top_level: bool) -> tuple[Any, str | None]:
    """(value, problem) for one etcd value; the problem never quotes the value.

    ``top_level``: the value fills a field of the model itself, where JSON ``null`` is
    :data:`ABSENT` (as if the key were not there): pydantic-settings drops a field whose decoded
    value is None, so the field keeps its default (``env_parse_none_str`` is an explicit None).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"value is not UTF-8 text (invalid byte at position {exc.start})"
    if decoding.none_str is not None and text == decoding.none_str:
        return None, None
    how = decoding.how
    if how == TEXT:
        value: Any = text
        if decoding.enums is not None:
            member = _enum_named(decoding.enums, text)
            value = text if member is None else member
        if decoding.lenient is not None and isinstance(value, str):
            value = _leniently(decoding.lenient, value)
        return value, None
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not JSON; or an integer, or nesting, past Python's limits
        if how != JSON:
            return text, None
        return None, f"structured field needs JSON: {json_problem(exc, text)}"
    if how == CONTAINER_OR_TEXT and not isinstance(decoded, (list, dict)):
        return text, None
    if decoded is None and top_level:
        return ABSENT, None
    return decoded, None


#: (target, model settings) -> its Decoding, for the hashable targets (a handful per model).
_memo: dict[tuple[Any, ModelSettings], Decoding] = {}


def decoding_for(target: FieldInfo | DictValues | None, settings: ModelSettings) -> Decoding:
    """How values for ``target`` decode: a model field (its FieldInfo), a dict field's values, or
    None (a key of no field, which pydantic rejects as extra: its text)."""
    try:
        found = _memo.get((target, settings))
    except TypeError:  # an unhashable type (e.g. Annotated with a list in it)
        return _decoding(target, settings)
    if found is None:
        if len(_memo) > 1_000:  # models made on the fly (tests): keep the memo small
            _memo.clear()
        found = _memo[(target, settings)] = _decoding(target, settings)
    return found


def _decoding(target: FieldInfo | DictValues | None, settings: ModelSettings) -> Decoding:
    none_str = settings.none_str
    if isinstance(target, DictValues):
        return _dict_value_decoding(target, settings)
    if target is None:
        return Decoding(TEXT, none_str)
    annotation, metadata = _annotation_and_metadata(target)
    decodes = _decodes(metadata, settings)
    if _is_complex(annotation, metadata):
        return Decoding(JSON if decodes else TEXT, none_str)
    if _is_union(annotation) and _union_is_complex(annotation, metadata):
        return Decoding(JSON_OR_TEXT if decodes else TEXT, none_str)
    enums = target.annotation if settings.parse_enums else None
    lenient = None
    json_typed = any(_is_json(item) for item in metadata) or _contains_json(target.annotation)
    if not json_typed and (
        settings.strict or _has_strict_member(annotation) or _literal_of_numeric_enum(annotation)
    ):
        lenient = TypeAdapter(typing.cast(Any, target.annotation))
    return Decoding(TEXT, none_str, enums, lenient)


def _dict_value_decoding(values: DictValues, settings: ModelSettings) -> Decoding:
    """A dict's values, as pydantic-settings' ``explode_env_vars`` decodes ``LIMITS__EU``: a complex
    (or unknown) value type takes JSON whatever the dict field says; a union with a complex member
    takes a JSON array or object only if the dict field itself decodes."""
    none_str = settings.none_str
    target = values.annotation
    if target is UNTYPED or _is_complex(target, ()):
        return Decoding(JSON_OR_TEXT, none_str)
    member = _without_annotated(_alias(target))
    if member is not None and _is_union(member) and _union_is_complex(member, ()):
        decodes = _decodes(_annotation_and_metadata(values.field)[1], settings)
        return Decoding(CONTAINER_OR_TEXT if decodes else TEXT, none_str)
    return Decoding(TEXT, none_str)


def _annotation_and_metadata(field: FieldInfo) -> tuple[Any, tuple[Any, ...]]:
    """A field's annotation (a type alias followed) and its metadata, with that of an ``Annotated``
    the alias stands for (``type Raw = Annotated[list[int], NoDecode]``)."""
    annotation, metadata = _alias(field.annotation), tuple(field.metadata)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *more = typing.get_args(annotation)
        metadata += tuple(more)
    return annotation, metadata


def json_problem(exc: ValueError | RecursionError, text: str) -> str:
    """What is wrong with ``text`` as JSON, never quoting it (it may be a secret)."""
    if isinstance(exc, json.JSONDecodeError):
        return "empty value" if not text.strip() else f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "a number too long for Python to read (sys.get_int_max_str_digits())"


def _decodes(metadata: Sequence[Any], settings: ModelSettings) -> bool:
    """Whether a field with this metadata decodes JSON (``NoDecode``, ``ForceDecode``, else the
    model's ``enable_decoding``)."""
    return NoDecode not in metadata and (settings.decoding or ForceDecode in metadata)


def _leniently(adapter: TypeAdapter[Any], text: str) -> Any:
    """A strict field's text validated leniently (``"5"`` -> 5), else as JSON, else as it is."""
    try:
        return adapter.validate_python(text)
    except ValidationError:
        pass
    try:
        decoded = json.loads(text)
        if not isinstance(decoded, str):
            return adapter.validate_python(decoded)
    except (ValueError, RecursionError):  # ValidationError is one; JSON past Python's limits too
        pass
    return text  # pydantic will reject it, naming the field


def _enum_named(annotation: Any, name: str) -> Any:
    """The member called ``name`` of an enum in ``annotation`` (or its arguments), or None."""
    for candidate in (annotation, typing.get_origin(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum) and name in candidate.__members__:
            return candidate[name]
    for arg in typing.get_args(annotation):
        member = _enum_named(arg, name)
        if member is not None:
            return member
    return None


# -- which types are complex (their values are JSON) ----------------------------------------------

_CONTAINERS = (BaseModel, Mapping, Sequence, AbstractSet, tuple, set, frozenset, deque)


def _subclass(candidate: Any, classes: type | tuple[type, ...]) -> bool:
    try:
        return isinstance(candidate, type) and issubclass(candidate, classes)
    except TypeError:
        return False


def _alias(annotation: Any) -> Any:
    """``annotation`` with ``type X = ...`` aliases followed."""
    while type(annotation).__name__ == "TypeAliasType":
        annotation = annotation.__value__
    return annotation


def _is_json(item: Any) -> bool:
    return item is Json or isinstance(item, Json)  # type: ignore[misc]


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is Union or origin is types.UnionType


def _structured(candidate: Any) -> bool:
    if _subclass(candidate, (str, bytes)):
        return False
    return _subclass(candidate, _CONTAINERS) or dataclasses.is_dataclass(candidate)


def _is_complex(annotation: Any, metadata: Sequence[Any]) -> bool:
    """Whether a value for ``annotation`` is JSON (a container or a model; not Json[...] or Secret)."""
    annotation = _alias(annotation)
    if _subclass(annotation, RootModel) and annotation is not RootModel:
        annotation = annotation.model_fields["root"].annotation
    if any(_is_json(item) for item in metadata):
        return False
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *more = typing.get_args(annotation)
        return _is_complex(inner, more)
    if _subclass(origin, Secret):
        return False
    return (
        _structured(annotation)
        or _structured(origin)
        or hasattr(origin, "__pydantic_core_schema__")
        or hasattr(origin, "__get_pydantic_core_schema__")
    )


def _without_annotated(annotation: Any) -> Any:
    """A union member without its Annotated layers; None if one of them says Json."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *more = typing.get_args(annotation)
        if any(_is_json(item) for item in more):
            return None
        annotation = _alias(annotation)
    return annotation


def _union_is_complex(annotation: Any, metadata: Sequence[Any], seen: tuple[Any, ...] = ()) -> bool:
    for arg in typing.get_args(annotation):
        if arg in seen:
            continue
        if _is_complex(_alias(arg), metadata):
            return True
        inner = _without_annotated(_alias(arg))
        if inner is not None and _is_union(inner) and _union_is_complex(inner, metadata, (*seen, arg)):
            return True
    return False


def _has_strict_member(annotation: Any) -> bool:
    if not _is_union(annotation):
        return False
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Annotated and any(
            isinstance(item, Strict) for item in typing.get_args(arg)[1:]
        ):
            return True
    return False


def _literal_of_numeric_enum(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(
            isinstance(arg, (int, float)) and isinstance(arg, enum.Enum)
            for arg in typing.get_args(annotation)
        )
    if origin is typing.Annotated:
        return _literal_of_numeric_enum(typing.get_args(annotation)[0])
    if _is_union(annotation):
        return any(_literal_of_numeric_enum(arg) for arg in typing.get_args(annotation))
    return False


def _contains_json(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated and any(
        _is_json(item) for item in typing.get_args(annotation)[1:]
    ):
        return True
    return any(_contains_json(arg) for arg in typing.get_args(annotation))
