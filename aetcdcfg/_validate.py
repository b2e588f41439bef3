"""Building a settings model from etcd keys, shared by LiveSettings and the ``aetcdcfg`` command.

A BaseSettings model is constructed (so env, dotenv and secrets sources apply below etcd); a plain
pydantic model is validated. Every failure becomes :class:`ConfigRejected` naming keys, never values:
a ``ValidationError``, and anything else user code raises while the model is built (a validator's
``TypeError`` or ``KeyError``, which pydantic does not wrap). Problems are written from an error's
type, location and the parts of its context that come from the model (``ge``, ``pattern``, the
expected values), never from its message, which may quote the value (a union tag, a UUID parser's
"found 'h' at 0", a validator's ``ValueError(f"bad {v}")``).

LiveSettings builds its model once per etcd revision, so it passes what does not change between
revisions: a :class:`~aetcdcfg.source.KeyDecoder` per layer, and :class:`ReadSources`, the model's
env, dotenv and secrets sources as read when LiveSettings loaded.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticKnownError
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
)
from pydantic_settings.sources import DefaultSettingsSource

from ._names import field_path, input_keyed
from .errors import ConfigRejected
from .source import DecodedConfig, EtcdSettingsSource, Origins, current_config, decode_items, fresh

__all__ = [
    "ReadSources",
    "build_layered",
    "build_model",
    "describe",
    "explain",
    "explain_raised",
    "lists_etcd_source",
    "validate_layered",
]

ModelT = TypeVar("ModelT", bound=BaseModel)


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``top``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def lists_etcd_source(model: type[BaseModel]) -> bool:
    """Whether the model's own ``settings_customise_sources`` places an EtcdSettingsSource itself."""
    if not issubclass(model, BaseSettings):
        return False
    probe = EtcdSettingsSource(model)
    try:
        sources = model.settings_customise_sources(model, probe, probe, probe, probe)
    except Exception:
        return False
    return any(isinstance(s, EtcdSettingsSource) and s is not probe for s in sources)


def build_model(
    model: type[ModelT],
    prefix: str,
    items: Mapping[str, bytes],
    revision: int,
    *,
    init_kwargs: Mapping[str, Any] | None = None,
    source_listed: bool | None = None,
    changed: Sequence[str] = (),
) -> ModelT:
    """Validate ``model`` from ``items`` (keys relative to ``prefix``) as of ``revision``.

    Order of sources: init kwargs > etcd > env > dotenv > secrets files, unless the model lists an
    :class:`EtcdSettingsSource` itself (then its own order applies).
    """
    return build_layered(
        model,
        [(prefix, items)],
        revision,
        init_kwargs=init_kwargs,
        source_listed=source_listed,
        changed=changed,
    )


def build_layered(
    model: type[ModelT],
    layers: Sequence[tuple[str, Mapping[str, bytes]]],
    revision: int,
    *,
    init_kwargs: Mapping[str, Any] | None = None,
    source_listed: bool | None = None,
    changed: Sequence[str] = (),
) -> ModelT:
    """Validate ``model`` from several ``(prefix, items)`` layers, later layers overriding earlier ones.

    Layers merge field by field: nested models and dict fields merge by key, as pydantic-settings
    merges its sources. Problems name the full etcd key (so its layer), never the value.
    """
    decoded = [(prefix, decode_items(model, items)) for prefix, items in layers]
    return validate_layered(
        model, decoded, revision, init_kwargs=init_kwargs, source_listed=source_listed, changed=changed
    )


def validate_layered(
    model: type[ModelT],
    layers: Sequence[tuple[str, DecodedConfig]],
    revision: int,
    *,
    init_kwargs: Mapping[str, Any] | None = None,
    source_listed: bool | None = None,
    changed: Sequence[str] = (),
    sources: ReadSources | None = None,
) -> ModelT:
    """:func:`build_layered` from layers decoded already; ``sources``: env, dotenv and secrets read once."""
    label = ", ".join(prefix for prefix, _ in layers)
    data: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for prefix, decoded in layers:
        problems.update({prefix + key: why for key, why in decoded.problems.items()})
        data = merge(data, decoded.data) if data else decoded.data
    # A later layer's key wins, as its value does; full keys are made only when one is looked up.
    origins = Origins([_Prefixed(prefix, decoded.origins) for prefix, decoded in reversed(layers)])
    if problems:
        keys = list(problems)
        raise ConfigRejected(
            prefix=label,
            revision=revision,
            keys=keys,
            problems=[f"{k}: {why}" for k, why in problems.items()],
        )
    if source_listed is None:
        source_listed = lists_etcd_source(model)
    kwargs = dict(init_kwargs or {})
    token = current_config.set(DecodedConfig(data, origins, {}))
    try:
        if not source_listed:
            # The keys' values are under the names pydantic reads (aliases): init kwargs, which
            # may spell a field by its name, are put under the same, so that they still win.
            kwargs = merge(data, input_keyed(model, kwargs) if kwargs else kwargs)
        if sources is not None:
            return sources.construct(model, kwargs)
        if issubclass(model, BaseSettings):
            return model(**kwargs)  # init kwargs outrank env/dotenv/secrets in pydantic-settings
        return model.model_validate(kwargs)
    except ValidationError as exc:
        keys, found = explain(exc, model, origins, changed)
        raise ConfigRejected(prefix=label, revision=revision, keys=keys, problems=found) from None
    except Exception as exc:  # user code raised what pydantic does not wrap: a rejection all the same
        keys, found = explain_raised(exc, model, origins, changed)
        raise ConfigRejected(prefix=label, revision=revision, keys=keys, problems=found) from None
    finally:
        current_config.reset(token)


class _ReadOnce(PydanticBaseSettingsSource):
    """A settings source as it read once: its data, handed out again (fresh containers) at every call."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self.source = source
        self.data = source()
        self.__name__ = type(source).__name__  # the name pydantic-settings files its data under

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = fresh(self.data)
        return data

    def __repr__(self) -> str:
        return repr(self.source)


class ReadSources:
    """A BaseSettings model's env, dotenv and secrets-files sources, read once and reused per build.

    pydantic-settings reads ``os.environ``, the dotenv files and the secrets directory, and checks
    every field against them, each time a model is constructed: ~1.3 ms of the ~3.3 ms a revision of a
    200-field model took. LiveSettings reads them once, when it loads (``async with``), and builds every
    later revision from what they held then, in the model's own source order
    (``settings_customise_sources``, called per build as pydantic-settings does). A process's
    environment does not change under it; a dotenv or secrets file edited while the service runs is
    picked up by the next load (a new ``async with``), not by the next etcd revision.
    """

    def __init__(self, model: type[BaseSettings]) -> None:
        self.env = _ReadOnce(EnvSettingsSource(model))
        self.dotenv = _ReadOnce(DotEnvSettingsSource(model))
        self.secrets = _ReadOnce(SecretsSettingsSource(model))
        #: Without aliases, InitSettingsSource hands input keyed by field names over unchanged, and
        #: pydantic-settings' renaming back to the init kwargs' names changes nothing: both are
        #: skipped (~45 % of a revision of the 200-field model: alias lookups for every field, twice).
        self._names_as_is = not model.model_config.get("nested_model_default_partial_update") and all(
            info.alias is None and info.validation_alias is None for info in model.model_fields.values()
        )

    @classmethod
    def read(cls, model: type[BaseModel]) -> ReadSources | None:
        """The sources of ``model``; None for a plain pydantic model, or one that parses the command line."""
        if not issubclass(model, BaseSettings):
            return None
        config = model.model_config
        if config.get("cli_parse_args") is not None or config.get("cli_settings_source") is not None:
            return None  # pydantic-settings adds a CLI source of its own: let it build the model
        return cls(model)

    def construct(self, model: type[ModelT], kwargs: dict[str, Any]) -> ModelT:
        """``model(**kwargs)``, with these sources in place of fresh env/dotenv/secrets sources."""
        assert issubclass(model, BaseSettings)
        init: PydanticBaseSettingsSource
        if self._names_as_is and kwargs.keys() <= model.model_fields.keys():
            init, renames = _Given(model, kwargs), {}
        else:
            init, renames = InitSettingsSource(model, init_kwargs=kwargs), kwargs
        sources = model.settings_customise_sources(
            model,
            init_settings=init,
            env_settings=self.env,
            dotenv_settings=self.dotenv,
            file_secret_settings=self.secrets,
        )
        settings: ModelT = model(_build_sources=((*sources, DefaultSettingsSource(model)), renames))
        return settings


class _Given(PydanticBaseSettingsSource):
    """The init kwargs as given: what InitSettingsSource makes of input keyed by field names when
    the model has no aliases (see ``ReadSources._names_as_is``)."""

    def __init__(self, model: type[BaseSettings], kwargs: dict[str, Any]) -> None:
        super().__init__(model)
        self.kwargs = kwargs
        self.__name__ = InitSettingsSource.__name__  # the name pydantic-settings files its data under

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, "", False  # as InitSettingsSource: only __call__ is used

    def __call__(self) -> dict[str, Any]:
        return self.kwargs


class _Prefixed(Mapping[tuple[str, ...], str]):
    """Field path -> full key, for one layer's path -> relative key."""

    def __init__(self, prefix: str, origins: Mapping[tuple[str, ...], str]) -> None:
        self._prefix, self._origins = prefix, origins

    def __getitem__(self, path: tuple[str, ...]) -> str:
        return self._prefix + self._origins[path]

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(self._origins)

    def __len__(self) -> int:
        return len(self._origins)


#: Context entries that come from the model (its constraints, types and expected values), never from
#: the input. Any other entry (a union's ``tag``, a parser's ``error`` text, a validator's exception,
#: an ``actual_length``) may quote or reveal the value, and is withheld.
_SAFE_CONTEXT = frozenset(
    {
        "gt",
        "ge",
        "lt",
        "le",
        "multiple_of",
        "min_length",
        "max_length",
        "field_type",
        "expected_plural",
        "pattern",
        "expected",
        "expected_tags",
        "discriminator",
        "max_digits",
        "decimal_places",
        "whole_digits",
        "expected_schemes",
        "expected_version",
        "tz_expected",
        "class_name",
        "class",
        "method_name",
        "encoding",
    }
)
#: What a withheld context entry reads as.
WITHHELD = "<withheld>"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
#: Said of every message not shown.
_NOT_SHOWN = "its message is not shown: it may quote the value"


def describe(error: ErrorDetails) -> str:
    """One pydantic error as a line built from its type and the model's side of its context.

    pydantic's own ``msg`` may quote the input (``Input tag 's3cr3t' found using 'kind'``, a
    validator's ``ValueError`` text): it is never used. The line is pydantic's message template for
    the error type, rendered with the safe context entries and :data:`WITHHELD` for the others.
    """
    kind = error["type"]
    context = error.get("ctx") or {}
    raised = context.get("error")
    if isinstance(raised, BaseException):  # value_error, assertion_error: a validator raised it
        return f"{type(raised).__name__} raised by a validator ({_NOT_SHOWN})"
    try:
        template = PydanticKnownError(kind, context).message_template  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):  # a PydanticCustomError's type: its template is the user's
        return f"{kind} ({_NOT_SHOWN})"
    return _PLACEHOLDER.sub(lambda match: _shown(context, match[1]), template)


def _shown(context: Mapping[str, Any], name: str) -> str:
    """How a context entry reads in a problem: as pydantic renders it if it is safe, else withheld."""
    if name == "expected_plural" and name not in context:  # pydantic derives it from the bound
        bound = context.get("min_length", context.get("max_length"))
        return "" if bound == 1 else "s"
    if name in _SAFE_CONTEXT and name in context:
        return str(context[name])
    return WITHHELD


def explain(
    exc: ValidationError,
    model: type[BaseModel],
    origins: Mapping[tuple[str, ...], str],
    changed: Sequence[str],
) -> tuple[list[str], list[str]]:
    """(keys, problems) for a validation error: each problem names its etcd key, never its value.

    An error's location names fields as pydantic read them (by alias, unless ``loc_by_alias`` is
    off); ``origins`` are by field name: the location is turned into names to find the key."""
    keys: list[str] = []
    problems: list[str] = []
    for error in exc.errors(include_input=False, include_url=False, include_context=True):
        loc = tuple(str(part) for part in error["loc"])
        path = field_path(model, error["loc"])
        origin = None
        for depth in range(len(path), 0, -1):
            origin = origins.get(path[:depth])
            if origin is not None:
                break
        where = origin if origin is not None else ".".join(loc) + " (not from etcd)"
        if origin is not None and where not in keys:
            keys.append(where)
        problems.append(f"{where}: {describe(error)}")
    if not keys:
        keys = list(changed)
    return keys, problems


#: Packages between ``model(...)`` and the user's code in a traceback.
_OURS = frozenset({"pydantic", "pydantic_core", "pydantic_settings", "aetcdcfg"})


def explain_raised(
    exc: Exception, model: type[BaseModel], origins: Mapping[tuple[str, ...], str], changed: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(keys, problems) for an exception user code raised while the model was built.

    pydantic wraps only ``ValueError`` and ``AssertionError`` from validators; a ``TypeError``,
    ``KeyError`` or ``ZeroDivisionError`` comes through as it is. The problem names its type, the
    function that raised it (the first frame outside pydantic and aetcdcfg) and the keys of the
    field that function validates, when that can be told (a field validator, an ``Annotated``
    validator, a custom type's); otherwise the keys the change touched. Never ``str(exc)``.
    """
    code = None
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.partition(".")[0] not in _OURS:
            code = tb.tb_frame.f_code
            break
        tb = tb.tb_next
    where = model.__name__
    keys: list[str] = []
    if code is not None:
        where = f"{getattr(code, 'co_qualname', code.co_name)} (line {tb.tb_lineno if tb else '?'})"
        for path in _fields_validated_by(model, code):
            keys += [key for found, key in origins.items() if found[: len(path)] == path and key not in keys]
    problem = f"{type(exc).__name__} raised in {where} ({_NOT_SHOWN})"
    if not keys:
        return list(changed), [f"{model.__name__}: {problem}"]
    return keys, [f"{key}: {problem}" for key in keys]


def _fields_validated_by(
    model: type[BaseModel], code: types.CodeType, path: tuple[str, ...] = (), depth: int = 0
) -> list[tuple[str, ...]]:
    """The field paths of ``model`` (and the models nested in it) that the function of ``code``
    validates: as a field validator, an ``Annotated`` validator, or a method of the field's type."""
    found: list[tuple[str, ...]] = []
    for decorator in model.__pydantic_decorators__.field_validators.values():
        if _code_of(decorator.func) is code:
            found += [(*path, name) for name in decorator.info.fields if name in model.model_fields]
    for name, info in model.model_fields.items():
        here = (*path, name)
        annotations = [info.annotation, *info.metadata]
        if any(_holds(candidate, code) for candidate in _flatten(annotations)):
            found.append(here)
        if depth < 8:
            for nested in _flatten([info.annotation]):
                if isinstance(nested, type) and issubclass(nested, BaseModel):
                    found += _fields_validated_by(nested, code, here, depth + 1)
    return found


def _flatten(annotations: Sequence[Any]) -> Iterator[Any]:
    """Every object in ``annotations`` and, through Annotated/Union/generic arguments, inside them."""
    for annotation in annotations:
        yield annotation
        yield from _flatten(typing.get_args(annotation))  # an Annotated's metadata too


def _code_of(function: Any) -> types.CodeType | None:
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def _holds(candidate: Any, code: types.CodeType) -> bool:
    """Whether ``candidate`` (a validator object or a type) runs the function of ``code``."""
    if _code_of(getattr(candidate, "func", None)) is code:  # AfterValidator(f) and its kin
        return True
    if isinstance(candidate, type) and not issubclass(candidate, BaseModel):  # a custom type's own validator
        return any(_code_of(member) is code for member in vars(candidate).values())
    return False
