"""Secrets of a settings model in etcd values: whole keys, and fields inside whole-object values.

A key can point at a secret field (``db/password``), or at a value with secrets inside it: ``db`` =
``{"url": ..., "password": ...}``, a list or dict of such models, an optional one. :class:`Secrets`
masks both for printing (the fields inside a JSON value, so the rest still shows; the whole value
when it does not parse), and restores masked fields from etcd's values when a masked dump is pushed
back. Types are followed through nested models, ``list``/``tuple``/``set``, ``dict``/``Mapping``,
``Optional``/unions, ``Annotated``, TypedDicts and dataclasses.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from typing import Any

from pydantic import BaseModel, Secret, SecretBytes, SecretStr

from .._names import names_of
from ..source import MASK, resolve_key

__all__ = ["MaskedSecretMissing", "Secrets", "contains_secret"]

_ABSENT: Any = object()
_SEQUENCES = (
    list,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Set,
    collections.abc.MutableSet,
    collections.abc.Collection,
    collections.abc.Iterable,
)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


class MaskedSecretMissing(Exception):
    """A masked secret in a pushed value has no value in etcd at the same place to keep."""

    def __init__(self, path: tuple[str, ...]) -> None:
        super().__init__("/".join(path) or "(the value)")
        self.path = path


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _options(tp: Any) -> list[Any]:
    """The members of a union (``X | None`` included), else ``[tp]``."""
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [o for member in typing.get_args(tp) for o in _options(member) if o is not type(None)]
    return [tp]


def _is_secret_type(tp: Any) -> bool:
    tp = _strip(tp)
    cls = typing.get_origin(tp) or tp
    return isinstance(cls, type) and issubclass(cls, (SecretStr, SecretBytes, Secret))


def _fields(tp: Any) -> dict[str, Any] | None:
    """Key in a JSON object -> annotation of its value, for a model (every name pydantic may read
    a field under: its name, each string alias, an AliasPath's head), TypedDict or dataclass;
    None for other types."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return names_of(tp).readable()
    if typing.is_typeddict(tp) or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        try:
            return dict(typing.get_type_hints(tp))
        except Exception:  # an unresolvable forward reference: nothing known about its fields
            return {}
    return None


def _field(fields: dict[str, Any], name: str) -> Any:
    if name in fields:
        return fields[name]
    folded = {k.lower(): v for k, v in fields.items()}
    return folded.get(name.lower(), _ABSENT)


def _items(tp: Any) -> tuple[str, Any] | None:
    """("seq", item type), ("tuple", (types...)) or ("map", value type) of a container type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "seq", args[0]
        return "tuple", args
    if origin in _SEQUENCES:
        return "seq", args[0] if args else Any
    if origin in _MAPPINGS:
        return "map", args[1] if len(args) == 2 else Any
    return None


def contains_secret(tp: Any, _seen: frozenset[int] = frozenset()) -> bool:
    """Whether a value of type ``tp`` may hold a secret anywhere inside it."""
    if id(tp) in _seen:
        return False
    seen = _seen | {id(tp)}
    for option in _options(tp):
        if _is_secret_type(option):
            return True
        fields = _fields(option)
        if fields is not None:
            if any(contains_secret(ann, seen) for ann in fields.values()):
                return True
            continue
        container = _items(option)
        if container is not None:
            members = container[1] if container[0] == "tuple" else (container[1],)
            if any(contains_secret(m, seen) for m in members):
                return True
    return False


def _walk(tp: Any, data: Any, other: Any, path: tuple[str, ...], restore: bool) -> Any:
    """``data`` with each secret in it masked (``restore`` False), or with each masked secret
    replaced by ``other``'s value at the same place (``restore`` True)."""
    for option in _options(tp):
        if not contains_secret(option):
            continue
        if _is_secret_type(option):
            if not restore:
                return data if data in ("", None) else MASK
            if data != MASK:
                return data
            if other is _ABSENT:
                raise MaskedSecretMissing(path)
            return other
        fields = _fields(option)
        container = _items(option)
        if fields is not None and isinstance(data, dict):
            data = {
                key: _walk(
                    _field(fields, key),
                    value,
                    other.get(key, _ABSENT) if isinstance(other, dict) else _ABSENT,
                    (*path, key),
                    restore,
                )
                for key, value in data.items()
            }
        elif container is not None and container[0] == "map" and isinstance(data, dict):
            data = {
                key: _walk(
                    container[1],
                    value,
                    other.get(key, _ABSENT) if isinstance(other, dict) else _ABSENT,
                    (*path, key),
                    restore,
                )
                for key, value in data.items()
            }
        elif container is not None and isinstance(data, list):
            kinds = container[1] if container[0] == "tuple" else (container[1],) * len(data)
            data = [
                _walk(
                    kinds[i] if i < len(kinds) else Any,
                    value,
                    other[i] if isinstance(other, list) and i < len(other) else _ABSENT,
                    (*path, str(i)),
                    restore,
                )
                for i, value in enumerate(data)
            ]
    return data


def _parse(value: bytes | None) -> Any:
    if value is None:
        return _ABSENT
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or past Python's limits
        return _ABSENT


class Secrets:
    """Which keys (relative to the prefix) of ``model`` hold secrets, and masking them; no model,
    no secrets known (:meth:`hiding_everything`: every value is one)."""

    def __init__(self, model: type[BaseModel] | None) -> None:
        self._model = model
        self._annotations: dict[str, Any] = {}
        self._everything = False

    @classmethod
    def hiding_everything(cls) -> Secrets:
        """Every value a secret: what to print when no model says which are (never to restore)."""
        secrets = cls(None)
        secrets._everything = True
        return secrets

    @property
    def hides_everything(self) -> bool:
        return self._everything

    def _annotation(self, key: str) -> Any:
        if key not in self._annotations:
            resolved = resolve_key(self._model, key) if self._model is not None else None
            self._annotations[key] = resolved[1] if resolved is not None else None
        return self._annotations[key]

    def holds(self, key: str) -> bool:
        """The value of ``key`` is a secret or may hold one inside it."""
        annotation = self._annotation(key)
        return annotation is not None and contains_secret(annotation)

    def whole(self, key: str) -> bool:
        """The value of ``key`` is itself a secret (not a structure holding one)."""
        annotation = self._annotation(key)
        return annotation is not None and any(_is_secret_type(o) for o in _options(annotation))

    def mask(self, key: str, value: bytes) -> bytes:
        """``value`` as it may be printed: secrets inside a JSON value masked field by field, the
        whole value masked when it is a secret or does not parse; unchanged when nothing is secret."""
        if self._everything:
            return MASK.encode()
        if not self.holds(key):
            return value
        if self.whole(key):
            return MASK.encode()
        data = _parse(value)
        if data is _ABSENT:
            return MASK.encode()  # cannot tell where in it the secret is
        masked = _walk(self._annotation(key), data, _ABSENT, (), restore=False)
        return value if masked == data else json.dumps(masked, ensure_ascii=False).encode()

    def restore(self, key: str, wanted: bytes, current: bytes | None) -> bytes | None:
        """What to write for ``key`` given a pushed ``wanted`` value that may carry masked secrets:
        each masked one replaced by ``current``'s (etcd's) value at the same place. ``None``: leave
        the key out (a wholly masked secret etcd does not hold). Raises :class:`MaskedSecretMissing`
        for a masked field inside a value that etcd does not hold at that place."""
        if not self.holds(key):
            return wanted
        if self.whole(key):
            return current if wanted == MASK.encode() else wanted
        data = _parse(wanted)
        if data is _ABSENT:
            return wanted
        before = _parse(current)
        restored = _walk(self._annotation(key), data, before, (), restore=True)
        if restored == data:
            return wanted  # nothing was masked: the value as given
        if current is not None and restored == before:
            return current  # exactly etcd's bytes, so an unchanged value is no change
        return json.dumps(restored, ensure_ascii=False).encode()
