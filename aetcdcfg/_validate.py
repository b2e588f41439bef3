"""Building a settings model from etcd keys, shared by LiveSettings and the ``aetcdcfg`` command.

A BaseSettings model is constructed (so env, dotenv and secrets sources apply below etcd); a plain
pydantic model is validated. Failures become :class:`ConfigRejected` naming keys, never values.

LiveSettings builds its model once per etcd revision, so it decodes each layer with a
:class:`~aetcdcfg.source.KeyDecoder` (which decodes again only what changed) and validates with
:func:`validate_layered`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from .errors import ConfigRejected
from .source import DecodedConfig, EtcdSettingsSource, current_config, decode_items

__all__ = ["build_layered", "build_model", "lists_etcd_source", "validate_layered"]

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
) -> ModelT:
    """:func:`build_layered` from layers decoded already."""
    label = ", ".join(prefix for prefix, _ in layers)
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    problems: dict[str, str] = {}
    for prefix, decoded in layers:
        problems.update({prefix + key: why for key, why in decoded.problems.items()})
        data = merge(data, decoded.data) if data else decoded.data
        origins.update({path: prefix + key for path, key in decoded.origins.items()})
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
            kwargs = merge(data, kwargs)
        if issubclass(model, BaseSettings):
            return model(**kwargs)  # init kwargs outrank env/dotenv/secrets in pydantic-settings
        return model.model_validate(kwargs)
    except ValidationError as exc:
        keys, found = explain(exc, origins, changed)
        raise ConfigRejected(prefix=label, revision=revision, keys=keys, problems=found) from None
    finally:
        current_config.reset(token)


def explain(
    exc: ValidationError, origins: Mapping[tuple[str, ...], str], changed: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(keys, problems) for a validation error: each problem names its etcd key, never its value."""
    keys: list[str] = []
    problems: list[str] = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = tuple(str(part) for part in error["loc"])
        origin = None
        for depth in range(len(loc), 0, -1):
            origin = origins.get(loc[:depth])
            if origin is not None:
                break
        where = origin if origin is not None else ".".join(loc) + " (not from etcd)"
        if origin is not None and where not in keys:
            keys.append(where)
        problems.append(f"{where}: {error['msg']}")
    if not keys:
        keys = list(changed)
    return keys, problems
