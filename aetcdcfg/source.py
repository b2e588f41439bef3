"""EtcdSettingsSource: the keys under an etcd prefix as a pydantic-settings source.

Mapping: the key ``<prefix>rate_limit`` fills field ``rate_limit``; ``<prefix>db/url`` fills
``db.url`` of a nested model (and ``<prefix>db`` may hold the whole nested model as JSON; deeper
keys override the values inside it they name, and keep the rest); ``<prefix>limits/eu`` fills key
``eu`` of a ``dict`` field. A key spells a field as the environment does: by its aliases, and by
its name when pydantic reads it by name, then case-insensitively (see ``_names``); the value is
passed to pydantic under the name it validates the field with (its alias, when it has one).
Values are decoded by the type of the field they fill, as pydantic-settings' environment source
decodes the same text (see ``_values``): JSON for structured fields, the text as it is for the rest,
and pydantic validates as usual.
Keys that match no field are ignored with a ``config.unknown_key`` debug log (for a plain pydantic
model with ``extra="forbid"`` they are passed on, and pydantic rejects them).
"""

from __future__ import annotations

import bisect
import contextvars
import dataclasses
import operator
import typing
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from ._log import get_logger
from ._names import alternatives, names_of, nested_model
from ._values import ABSENT, TEXT, UNTYPED, DictValues, ModelSettings, decode_value, decoding_for

__all__ = [
    "MASK",
    "DecodedConfig",
    "EtcdSettingsSource",
    "KeyDecoder",
    "Origins",
    "decode_items",
    "fresh",
    "is_secret",
    "leaf_paths",
    "resolve_key",
]

#: What every output (the command, the status route and page) shows instead of a secret value.
MASK = "**********"

log = get_logger()


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedConfig:
    """Etcd keys turned into model input: ``data`` for pydantic, where each field path came from,
    and the keys that could not be decoded (``problems``: key -> reason, never the value)."""

    data: dict[str, Any]
    origins: Mapping[tuple[str, ...], str]
    problems: dict[str, str]


#: What LiveSettings is applying right now, read by EtcdSettingsSource instances it triggers.
current_config: contextvars.ContextVar[DecodedConfig | None] = contextvars.ContextVar(
    "aetcdcfg_current_config", default=None
)


def _is_mapping(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and issubclass(origin, (dict, Mapping))


def _forbids_extra(model: type[BaseModel]) -> bool:
    """Unknown keys are rejected only for a plain pydantic model configured with extra="forbid".

    BaseSettings forbids extras by default, aimed at init kwargs and dotenv files; stray keys under a
    shared etcd prefix should not take a service's config down, so for settings models they are
    ignored (with a ``config.unknown_key`` debug log).
    """
    if issubclass(model, BaseSettings):
        return False
    return model.model_config.get("extra") == "forbid"


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any, made: set[int]) -> None:
    """Put ``value`` at ``path`` in ``target``, creating dicts on the way (their ids go into ``made``).

    A dict met on the way that this assembly did not make (a decoded JSON value) is copied before
    anything is put into it: decoded values are kept between revisions and must stay as decoded.
    """
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict) or id(child) not in made:
            child = dict(child) if isinstance(child, dict) else {}
            made.add(id(child))
            node[part] = child
        node = child
    leaf = path[-1]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        # Deeper keys, applied earlier, win over a whole-object JSON value, key by key all the way
        # down: what layers do (_validate.merge), and what pydantic-settings does with DB='{...}'
        # and DB__OPTS__A=10 in the environment.
        node[leaf] = _under(value, node[leaf], made)
    else:
        node[leaf] = value


def _under(base: dict[str, Any], top: dict[str, Any], made: set[int]) -> dict[str, Any]:
    """``base`` with ``top`` merged over it key by key, in new dicts (their ids go into ``made``);
    neither is changed."""
    out = dict(base)
    made.add(id(out))
    for key, value in top.items():
        below = out.get(key)
        out[key] = (
            _under(below, value, made) if isinstance(value, dict) and isinstance(below, dict) else value
        )
    return out


class _Field(typing.NamedTuple):
    """What one part of a key resolves to on one model: a field, and where the next part goes."""

    name: str
    info: FieldInfo  # an AliasPath head: the structure its value is (see ModelNames.structure)
    nested: type[BaseModel] | None  # the next part names a field of this model
    values: DictValues | None  # a dict field: the rest of the key is one of its keys
    key: str  # the name pydantic reads it under: its value goes there in the input
    rank: int  # how this part spells the field (0: preferred, which wins over other spellings)
    fills: tuple[str, ...]  # the fields its value fills: itself, or those read inside a head


class _Target(typing.NamedTuple):
    """Where a relative key goes: its field path (names), the same path in the input pydantic
    validates (the names it reads them under), what decides how its value decodes (a field, or a
    dict field's values), the spellings' ranks, and every field path it fills (more than one for an
    AliasPath head)."""

    path: tuple[str, ...]
    keys: tuple[str, ...]
    target: FieldInfo | DictValues | None
    rank: tuple[int, ...]
    fills: tuple[tuple[str, ...], ...]


#: model -> key part -> _Field, for parts that name a field (so bounded by the models' fields).
#: A prefix of 40,000 keys resolves its few distinct parts once, not 40,000 times.
_fields: weakref.WeakKeyDictionary[type[BaseModel], dict[str, _Field]] = weakref.WeakKeyDictionary()


def _resolve_part(model: type[BaseModel], part: str) -> _Field | None:
    known = _fields.get(model)
    if known is None:
        known = _fields[model] = {}
    found = known.get(part)
    if found is not None:
        return found
    names = names_of(model)
    spelling = names.match(part)
    if spelling is None:
        return None
    if spelling.head:  # JSON under an AliasPath head: nothing deeper is a key of its own
        info = names.structure(spelling.key)
        found = known[part] = _Field(
            spelling.field, info, None, None, spelling.key, spelling.rank, spelling.head
        )
        return found
    info = model.model_fields[spelling.field]
    mapping = next((tp for tp in alternatives(info.annotation) if _is_mapping(tp)), None)
    args = typing.get_args(mapping) if mapping is not None else ()
    values = None if mapping is None else DictValues(args[1] if len(args) == 2 else UNTYPED, info)
    nested = nested_model(info.annotation)
    found = known[part] = _Field(
        spelling.field,
        info,
        nested,
        values,
        spelling.key,
        spelling.rank,
        (spelling.field,),
    )
    return found


def resolve_key(model: type[BaseModel], key: str) -> tuple[tuple[str, ...], Any] | None:
    """The field path and annotation a relative key fills, or None if it matches no field.

    A key naming an AliasPath head fills the first field read inside it; its annotation is the
    structure its JSON has (the fields read inside it at their paths)."""
    resolved = _resolve(model, key)
    if resolved is None:
        return None
    path, target = resolved.path, resolved.target
    if isinstance(target, FieldInfo):
        return path, target.annotation
    if isinstance(target, DictValues):
        return path, Any if target.annotation is UNTYPED else target.annotation
    return path, None


def _resolve(model: type[BaseModel], key: str) -> _Target | None:
    """Where a relative key goes (its target: the field's FieldInfo, or a dict field's values, or
    None for a key pydantic itself will reject as extra); None if it matches no field."""
    parts = [p for p in key.split("/") if p]
    if not parts:
        return None
    target: type[BaseModel] = model
    path: list[str] = []
    keys: list[str] = []
    rank: list[int] = []
    index = 0
    while True:  # each part resolves, or the key ends here
        part = parts[index]
        field = _resolve_part(target, part)
        if field is None:
            if _forbids_extra(target) and index == len(parts) - 1:
                # pydantic will say "extra inputs are not permitted"
                here = (*path, part)
                return _Target(here, (*keys, part), None, tuple(rank), (here,))
            return None
        path.append(field.name)
        keys.append(field.key)
        rank.append(field.rank)
        index += 1
        if index == len(parts):
            fills = tuple((*path[:-1], name) for name in field.fills)
            return _Target(tuple(path), tuple(keys), field.info, tuple(rank), fills)
        if field.nested is not None:
            target = field.nested
            continue
        if field.values is not None:
            rest = "/".join(parts[index:])
            here = (*path, rest)
            return _Target(here, (*keys, rest), field.values, tuple(rank), (here,))
        return None


def is_secret(annotation: Any) -> bool:
    """Whether a field holds a secret (SecretStr/SecretBytes): never print its value."""
    return (
        any(tp in (SecretStr, SecretBytes) for tp in alternatives(annotation))
        if annotation is not None
        else False
    )


def leaf_paths(data: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The paths to the non-mapping values of a nested ``data`` dict (an empty mapping is a leaf)."""
    out: list[tuple[str, ...]] = []
    for name, value in data.items():
        here = (*path, str(name))
        if isinstance(value, Mapping) and value:
            out.extend(leaf_paths(value, here))
        else:
            out.append(here)
    return out


def decode_items(model: type[BaseModel], items: Mapping[str, bytes]) -> DecodedConfig:
    """Turn ``{relative key: raw value}`` into model input, without validating it yet."""
    return KeyDecoder(model).decode(items)


class _Group(typing.NamedTuple):
    """The keys filling one top-level field (or, with ``None``, keys of no field), decoded."""

    items: dict[str, bytes]
    data: dict[str, Any]
    origins: Mapping[tuple[str, ...], str]
    problems: dict[str, str]
    flat: bool = False  # data is {field: a dict of str}: a plain copy of it is a fresh one


class KeyDecoder:
    """``decode_items`` for one model, remembering its results for keys that change a few at a time.

    Keys are decoded a group at a time, a group being the keys that fill one top-level field (its
    spellings and case variants: ``db/url``, ``db/pool``, ``DB``); a group no key of which
    changed since the last call is not decoded again. LiveSettings keeps one per layer, so a revision
    of a 200-field model re-decodes the one section it touched, not 200 keys. Decoded values are
    handed out as fresh containers every time (:func:`fresh`): a validator may change its input.
    """

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self._settings = ModelSettings.of(model)
        self._groups: dict[str | None, _Group] = {}
        self._names: dict[str, str | None] = {}  # a key's first part -> the field it fills
        # a key -> (its place in the decoding order, its target), None if it fills no field
        self._targets: dict[str, tuple[tuple[int, tuple[int, ...], str], _Target] | None] = {}
        self._synced = False  # whether a call decoded every key (after which `changed` is enough)

    def decode(self, items: Mapping[str, bytes], changed: Iterable[str] | None = None) -> DecodedConfig:
        """Model input from ``items``. ``changed``: every key added, changed or deleted since the
        last call (the rest must be as they were then); None when that is not known."""
        if changed is None or not self._synced:
            groups = {name: self._decoded(name, keys) for name, keys in self._split(items).items()}
            self._synced = True
        else:
            groups = dict(self._groups)
            touched: dict[str | None, dict[str, bytes]] = {}
            for key in changed:
                name = self._field_of(key)
                keys = touched.get(name)
                if keys is None:
                    known = groups.get(name)
                    keys = touched[name] = dict(known.items) if known is not None else {}
                if key in items:
                    keys[key] = items[key]
                else:
                    keys.pop(key, None)
            for name, keys in touched.items():
                if keys:
                    groups[name] = self._decoded(name, keys)
                else:
                    groups.pop(name, None)
        self._groups = groups
        data: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for group in groups.values():
            if group.flat:
                data.update({field: dict(value) for field, value in group.data.items()})
            else:
                data.update({field: fresh(value) for field, value in group.data.items()})
            problems.update(group.problems)
        if len(problems) > 1:  # deeper keys first, then by name, across groups too
            problems = {key: problems[key] for key in sorted(problems, key=_depth_first)}
        # Each group's paths start with its own fields, so a lookup finds at most one.
        origins = Origins([group.origins for group in groups.values()])
        return DecodedConfig(data, origins, problems)

    def _decoded(self, name: str | None, keys: dict[str, bytes]) -> _Group:
        known = self._groups.get(name)
        return known if known is not None and known.items == keys else self._decode_group(keys)

    def _field_of(self, key: str) -> str | None:
        """The top-level field ``key`` fills (None: no field)."""
        # Empty parts are skipped ("/db/url" fills db.url), so the first part is the first non-empty one.
        first = key.partition("/")[0] or key.strip("/").partition("/")[0]
        try:
            return self._names[first]
        except KeyError:
            pass
        field = _resolve_part(self.model, first) if first else None
        if len(self._names) > 1_000:  # stray keys under the prefix: keep the memo small
            self._names.clear()
        name = self._names[first] = field.name if field is not None else None
        return name

    def _split(self, items: Mapping[str, bytes]) -> dict[str | None, dict[str, bytes]]:
        """The keys by the top-level field they fill (None: no field).

        The keys are sorted (etcd lists them in that order already, and sorting sorted input is one
        pass in C), so the keys under one first part are a run, found by bisection: a prefix of
        40,000 keys under ``flags/`` is split with one search, not 40,000 steps.
        """
        keys = sorted(items)
        by_field: dict[str | None, dict[str, bytes]] = {}
        start, count = 0, len(keys)
        while start < count:
            first, slash, _ = keys[start].partition("/")
            # "0" sorts right after "/": the run ends at the first key past every "<first>/...".
            end = bisect.bisect_left(keys, first + "0", start) if first and slash else start + 1
            name = self._field_of(keys[start])
            run = {key: items[key] for key in keys[start:end]}
            if name in by_field:
                by_field[name].update(run)
            else:
                by_field[name] = run
            start = end
        return by_field

    def _decode_group(self, items: dict[str, bytes]) -> _Group:
        table = self._decode_table(items)
        if table is not None:
            return table
        data: dict[str, Any] = {}
        origins: dict[tuple[str, ...], str] = {}
        problems: dict[str, str] = {}
        made: set[int] = set()
        resolved: list[tuple[tuple[int, tuple[int, ...], str], _Target]] = []
        for key in items:
            found = self._targets[key] if key in self._targets else self._resolve_key(key)
            if found is None:
                log.debug("config.unknown_key", key=key)
            else:
                resolved.append(found)
        # Deeper keys first, so that _set_path lets them win over a shallower whole-object value;
        # of keys spelling the same fields, the preferred spelling last, so that it wins.
        resolved.sort(key=_ORDER)
        fields_under: dict[str, set[str]] = {}  # a top-level input key -> the fields it fills
        for (_, _, key), target in resolved:
            decoding = decoding_for(target.target, self._settings)
            value, problem = decode_value(items[key], decoding, top_level=len(target.path) == 1)
            if problem is not None:
                problems[key] = problem
                continue
            _set_path(data, target.keys, value, made)
            fields_under.setdefault(target.keys[0], set()).update(path[0] for path in target.fills)
            for path in target.fills:
                origins[path] = key
        for name in [name for name, value in data.items() if value is ABSENT]:
            # A field's JSON null: no value, and its deeper keys are overridden by it (as a
            # whole-field value that is not an object overrides them), so nothing at all.
            del data[name]
            gone = fields_under[name]
            origins = {path: key for path, key in origins.items() if path[0] not in gone}
        return _Group(items, data, origins, problems)

    def _resolve_key(self, key: str) -> tuple[tuple[int, tuple[int, ...], str], _Target] | None:
        """``key``'s target with its place in the decoding order, remembered: a revision decodes
        the group a changed key is in again, and resolving each of its keys anew cost ~15% of a
        revision of a 200-field model (callgrind, ``make bench-check``)."""
        target = _resolve(self.model, key)
        found = (
            None if target is None else ((-key.count("/"), tuple(-rank for rank in target.rank), key), target)
        )
        if len(self._targets) > 10_000:  # many distinct keys come and go: keep the memo bounded
            self._targets.clear()
        self._targets[key] = found
        return found

    def _decode_table(self, items: dict[str, bytes]) -> _Group | None:
        """A text-valued dict field whose every key is ``<field>/<dict key>``, decoded in one pass.

        A feature-flag or tenant table may hold tens of thousands of keys: they are all one level
        under the same first part, so none nests under or collides with another, and the general
        path's sort, per-key resolving and path setting can be skipped. None when the group is not
        that simple (another spelling of the field, deeper keys, a whole-table JSON value, a value
        that is not UTF-8): the general path then decodes it, and names any problem.
        """
        first, slash, _ = next(iter(items)).partition("/")
        field = _resolve_part(self.model, first) if slash else None
        if field is None or field.values is None:
            return None
        decoding = decoding_for(field.values, self._settings)
        if decoding.how != TEXT or decoding.none_str is not None:
            return None
        head = first + "/"
        if (
            not (min(items).startswith(head) and max(items).startswith(head))  # so every key between
            or "".join(items).count("/") != len(items)  # one "/" per key
            or head in items  # "flags/" is the whole table
        ):
            return None
        cut = len(head)
        try:
            table = {key[cut:]: raw.decode() for key, raw in items.items()}  # UTF-8
        except UnicodeDecodeError:
            return None
        return _Group(items, {field.key: table}, _TableOrigins(field.name, head, items), {}, flat=True)


class Origins(Mapping[tuple[str, ...], str]):
    """Several field path -> key mappings seen as one; where two hold a path, the first one's key."""

    def __init__(self, maps: Sequence[Mapping[tuple[str, ...], str]]) -> None:
        self._maps = maps

    def __getitem__(self, path: tuple[str, ...]) -> str:
        for origins in self._maps:
            key = origins.get(path)
            if key is not None:
                return key
        raise KeyError(path)

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(dict.fromkeys(path for origins in self._maps for path in origins))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _TableOrigins(Mapping[tuple[str, ...], str]):
    """A table's field paths -> keys (``("flags", "x")`` -> ``flags/x``), worked out when asked for:
    they are needed only to name the key of a rejected value, and a table may have 40,000."""

    def __init__(self, name: str, head: str, items: Mapping[str, bytes]) -> None:
        self._name, self._head, self._items = name, head, items

    def __getitem__(self, path: tuple[str, ...]) -> str:
        if len(path) == 2 and path[0] == self._name and self._head + path[1] in self._items:
            return self._head + path[1]
        raise KeyError(path)

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        cut = len(self._head)
        return ((self._name, key[cut:]) for key in self._items)

    def __len__(self) -> int:
        return len(self._items)


def _depth_first(key: str) -> tuple[int, str]:
    return -key.count("/"), key


def fresh(value: Any) -> Any:
    """``value`` with its dicts and lists copied (all the way down); other values are immutable."""
    if isinstance(value, dict):
        return {key: fresh(item) if isinstance(item, _CONTAINERS) else item for key, item in value.items()}
    if isinstance(value, list):
        return [fresh(item) if isinstance(item, _CONTAINERS) else item for item in value]
    return value


_CONTAINERS = (dict, list)
_ORDER = operator.itemgetter(0)


class EtcdSettingsSource(PydanticBaseSettingsSource):
    """Settings from etcd, for ``settings_customise_sources``; LiveSettings supplies the keys.

    Listing it in your model's ``settings_customise_sources`` lets you choose its priority; without
    it, LiveSettings applies etcd above env, dotenv and secrets files, and below init kwargs.
    Outside LiveSettings (e.g. a plain ``Model()``) it contributes nothing, unless given ``items``.
    """

    def __init__(self, settings_cls: type[BaseSettings], items: Mapping[str, bytes] | None = None) -> None:
        super().__init__(settings_cls)
        self._explicit = decode_items(settings_cls, items) if items is not None else None

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        key = names_of(self.settings_cls).keys.get(field_name, field_name)
        return self().get(key), key, False

    def __call__(self) -> dict[str, Any]:
        config = self._explicit if self._explicit is not None else current_config.get()
        return dict(config.data) if config is not None else {}

    def __repr__(self) -> str:
        return "EtcdSettingsSource()"
