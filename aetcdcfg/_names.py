"""How the fields of a model are named: by etcd key parts, in pydantic's input, in its errors.

pydantic reads a field under its validation alias (``alias`` sets it too): a string, each string
of an ``AliasChoices``, or an ``AliasPath`` into a structure; and under its name only when it has
no alias or the model validates by name (``populate_by_name``, ``validate_by_name``, or
``validate_by_alias=False``, which ignores the aliases). A key part spells a field as
pydantic-settings' environment source spells it (``PydanticBaseEnvSettingsSource._extract_field_info``):

* each string alias, and the name when pydantic reads it, in that order of preference (when two
  keys spell one field, the preferred spelling wins, as in the environment and in init kwargs);
* an ``AliasPath``'s head names the structure the path reads from (``login`` for
  ``AliasPath("login", "user")``), which holds JSON, as the variable ``LOGIN`` does;
* unless the model is ``case_sensitive``, case-insensitively too, below every exact spelling.

The value of a key is passed to pydantic under the field's *input key*: its first string alias,
else its name (a head's value under the head). So the model validates what the keys hold whether
or not it reads names, and an error's location names the input key: :func:`field_path` turns it
back into field names, which is how the keys' origins, reports and masking name fields.
Pure functions of the model classes; nothing here validates.
"""

from __future__ import annotations

import types
import typing
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

from pydantic import AliasChoices, AliasPath, BaseModel
from pydantic.fields import FieldInfo

__all__ = ["ModelNames", "Spelling", "alternatives", "field_path", "input_keyed", "names_of", "nested_model"]

#: How far below every exact spelling a case variant of it ranks.
CASE_VARIANT = 1_000


def alternatives(annotation: Any) -> list[Any]:
    """The alternatives of an annotation with Optional/Union/Annotated peeled off."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return alternatives(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                out.extend(alternatives(arg))
        return out
    return [annotation]


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model among the alternatives of ``annotation``, if any."""
    return next(
        (tp for tp in alternatives(annotation) if isinstance(tp, type) and issubclass(tp, BaseModel)), None
    )


def _by_name(config: Mapping[str, Any]) -> bool:
    """Whether pydantic reads fields by name, resolved as pydantic resolves its config."""
    for key in ("validate_by_name", "populate_by_name"):
        value = config.get(key)
        if value is not None:
            return bool(value)
    return config.get("validate_by_alias") is False


def _aliases(info: FieldInfo) -> list[str | tuple[str | int, ...]]:
    """A field's validation aliases in pydantic's order: strings, and AliasPaths as tuples (one of a
    single string is that string)."""
    alias = info.validation_alias if info.validation_alias is not None else info.alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [] if alias is None else [alias]
    out: list[str | tuple[str | int, ...]] = []
    for choice in choices:
        if isinstance(choice, AliasPath):
            path = tuple(choice.path)
            out.append(path[0] if len(path) == 1 and isinstance(path[0], str) else path)
        else:
            out.append(choice)
    return out


class Spelling(NamedTuple):
    """What one key part names on one model."""

    field: str  # the field it fills (a head: the first field read inside it)
    key: str  # the name its value is passed to pydantic under
    rank: int  # among the spellings of one field, 0 is preferred (wins over the others)
    head: tuple[str, ...] = ()  # an AliasPath head: every field read inside its value


class ModelNames:
    """The names of one model's own fields (nested models have their own); see the module docstring."""

    def __init__(self, model: type[BaseModel]) -> None:
        config = model.model_config
        by_alias = config.get("validate_by_alias") is not False
        by_name = _by_name(config)
        self.model = model
        self.case_sensitive = bool(config.get("case_sensitive", False))
        #: field -> the strings that spell it in keys (and in the environment), preferred first.
        self.spelled: dict[str, tuple[str, ...]] = {}
        #: field -> the name its value is passed to pydantic under.
        self.keys: dict[str, str] = {}
        self._locs: dict[str, str] = {}  # a string an error's loc may hold -> its field
        self._loc_paths: list[tuple[tuple[str | int, ...], str]] = []
        self._heads: dict[str, list[tuple[str, tuple[str | int, ...]]]] = {}  # head -> (field, path)
        for name, info in model.model_fields.items():
            aliases = _aliases(info)
            strings = [alias for alias in aliases if isinstance(alias, str)]
            spelled = strings if by_alias else []
            if by_name or not by_alias or not aliases:
                spelled = [*spelled, name]
            self.spelled[name] = tuple(dict.fromkeys(spelled))
            self.keys[name] = spelled[0] if spelled else name  # only AliasPaths: never used
            for path in (alias for alias in aliases if isinstance(alias, tuple)):
                self._loc_paths.append((path, name))
                if by_alias:
                    self._heads.setdefault(str(path[0]), []).append((name, path))
        for name in model.model_fields:  # locate by name first, as keys matched a name first
            self._locs.setdefault(name, name)
        for name, info in model.model_fields.items():
            for alias in _aliases(info):
                if isinstance(alias, str):
                    self._locs.setdefault(alias, name)
        exact: dict[str, Spelling] = {}
        for name, texts in self.spelled.items():  # a field's own name first, then aliases
            if name in texts:
                exact.setdefault(name, Spelling(name, self.keys[name], texts.index(name)))
        for name, texts in self.spelled.items():
            for rank, text in enumerate(texts):
                exact.setdefault(text, Spelling(name, self.keys[name], rank))
        for head, read in self._heads.items():
            exact.setdefault(head, Spelling(read[0][0], head, 0, tuple(dict.fromkeys(n for n, _ in read))))
        self._exact = exact
        self._folded: dict[str, Spelling] = {}
        if not self.case_sensitive:
            for text, spelling in exact.items():
                field, key, rank, reads = spelling
                self._folded.setdefault(text.lower(), Spelling(field, key, rank + CASE_VARIANT, reads))
        self._structures: dict[str, FieldInfo] = {}

    def match(self, part: str) -> Spelling | None:
        """What the key part ``part`` names, or None (no field reads it)."""
        found = self._exact.get(part)
        if found is None and self._folded:
            found = self._folded.get(part.lower())
        return found

    def structure(self, head: str) -> FieldInfo:
        """The type of the value under an AliasPath head, as a field: JSON whose paths hold the
        fields read inside it (nested TypedDicts, a list where a path indexes)."""
        found = self._structures.get(head)
        if found is None:
            fields = self.model.model_fields
            entries = [(path[1:], fields[name].annotation) for name, path in self._heads[head]]
            found = self._structures[head] = FieldInfo.from_annotation(_structure(head, entries))
        return found

    def field_at(self, loc: Sequence[str | int], index: int) -> tuple[str, int] | None:
        """(field, parts used) for the field an error's ``loc`` names at ``index``: by an AliasPath,
        an alias or the name (``loc_by_alias=False``)."""
        for path, name in self._loc_paths:
            if tuple(loc[index : index + len(path)]) == path:
                return name, len(path)
        part = loc[index]
        found = self._locs.get(part) if isinstance(part, str) else None
        return (found, 1) if found is not None else None

    def readable(self) -> dict[str, Any]:
        """Every name pydantic may read one of these fields under in its input -> the annotation of
        what it holds (a head: its structure): what a JSON object for this model may spell."""
        out: dict[str, Any] = {}
        for name, info in self.model.model_fields.items():
            out[name] = info.annotation
            for alias in _aliases(info):
                if isinstance(alias, str):
                    out.setdefault(alias, info.annotation)
        for head in self._heads:
            out.setdefault(head, self.structure(head).annotation)
        return out


def _structure(name: str, entries: list[tuple[tuple[str | int, ...], Any]]) -> Any:
    """The type holding each annotation at its path (an empty path: the value itself)."""
    ends = [annotation for path, annotation in entries if not path]
    if ends:  # a path ends here: its field's type (another going deeper cannot be described too)
        return ends[0]
    below: dict[str | int, list[tuple[tuple[str | int, ...], Any]]] = {}
    for path, annotation in entries:
        below.setdefault(path[0], []).append((path[1:], annotation))
    if all(isinstance(step, int) for step in below):
        items = tuple(dict.fromkeys(_structure(name, more) for more in below.values()))
        return list[items]  # type: ignore[valid-type]  # a union of the items' types
    if all(isinstance(step, str) for step in below):
        typed_dict: Any = typing.TypedDict
        return typed_dict(
            name, {str(step): _structure(str(step), more) for step, more in below.items()}, total=False
        )
    return Any


_names: weakref.WeakKeyDictionary[type[BaseModel], ModelNames] = weakref.WeakKeyDictionary()


def names_of(model: type[BaseModel]) -> ModelNames:
    """The :class:`ModelNames` of ``model``, worked out once."""
    found = _names.get(model)
    if found is None:
        found = _names[model] = ModelNames(model)
    return found


def field_path(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[str, ...]:
    """Field names for a location in ``model``'s input (an error's ``loc``, a path in the data
    handed to pydantic): each part naming a field by alias, AliasPath or name becomes its name,
    through nested models; the rest (dict keys, list indices, union tags) is kept, as text."""
    out: list[str] = []
    target: type[BaseModel] | None = model
    index = 0
    while index < len(loc) and target is not None:
        found = names_of(target).field_at(loc, index)
        if found is None:
            break
        name, used = found
        out.append(name)
        index += used
        target = nested_model(target.model_fields[name].annotation)
    return (*out, *(str(part) for part in loc[index:]))


def input_keyed(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (e.g. init kwargs) with each key that spells a field as a key part does replaced by
    the field's input key, through nested models: so it merges with decoded keys field by field.
    Two spellings of one field keep the preferred one's value; other keys are kept as they are."""
    names = names_of(model)
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    for key, value in data.items():
        spelling = names.match(key) if isinstance(key, str) else None
        if spelling is None or spelling.head:
            out[key] = value
            continue
        nested = nested_model(model.model_fields[spelling.field].annotation)
        if nested is not None and isinstance(value, Mapping):
            value = input_keyed(nested, value)
        if spelling.key not in ranks or spelling.rank < ranks[spelling.key]:
            out[spelling.key], ranks[spelling.key] = value, spelling.rank
    return out
