"""What a LiveSettings serves and where each value came from, as JSON-able data with secrets masked.

:func:`settings_report` walks the settings in force and, for every leaf field, asks the sources in the
model's own order which one holds it: init kwargs, the etcd keys LiveSettings has (by name), the
environment (per ``env_prefix``, ``env_nested_delimiter`` and ``case_sensitive``), the dotenv files of
``env_file``, the secrets directory, else the default. :func:`status_report` adds freshness, the watch,
and the applied/rejected history. Both are computed only when called: nothing here runs per event.

Secrets: a ``SecretStr``/``SecretBytes`` value (anywhere: nested models, lists, dicts) or a field
:func:`~aetcdcfg.source.is_secret` names is shown as ``**********`` (``""`` when empty, ``None`` when
None); its source and key are shown, never its value.

Floats: JSON has no infinity or NaN, and pydantic accepts them in a ``float`` field, so a value
(or ``max_staleness``) that is not finite is shown as the string ``"inf"``, ``"-inf"`` or ``"nan"``:
how Python writes it, what an operator puts in etcd, and what pydantic reads back.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from dotenv import dotenv_values
from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic_core import to_jsonable_python
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
)

from ._names import field_path, names_of
from ._validate import lists_etcd_source
from .live import DEFAULT_MAX_STALENESS, LiveSettings
from .source import MASK, EtcdSettingsSource, is_secret, leaf_paths
from .status import AppliedChange, ReportStatus, WatchStatus

__all__ = ["FieldReport", "MASK", "SettingsReport", "json_number", "settings_report", "status_report"]


Path_ = tuple[str, ...]


class FieldReport(TypedDict):
    """One leaf field: its value in force (masked if secret) and the source that supplied it."""

    #: Dotted field path, e.g. ``db.password`` (dict entries too: ``limits.eu``).
    field: str
    value: Any
    secret: bool
    #: ``init``, ``etcd``, ``env``, ``dotenv``, ``secrets``, ``default``, or ``unknown`` when a source
    #: this report cannot read (a custom one) ranks above every source found holding the field.
    source: str
    #: The etcd key (full), the environment variable, ``<dotenv file>: <VAR>``, the secrets file, or None.
    origin: str | None
    #: etcd holds a newer value for this key that was rejected; the value shown is the one in force.
    pending_rejected: bool


class SettingsReport(TypedDict):
    prefix: str
    model: str
    revision: int
    #: The settings in force as nested JSON, secrets masked.
    values: dict[str, Any]
    fields: list[FieldReport]


@dataclasses.dataclass
class _Layer:
    """One source, as the report sees it: the leaf paths it holds and where each came from."""

    name: str
    paths: dict[Path_, str | None]
    readable: bool = True

    def holds(self, path: Path_) -> tuple[bool, str | None]:
        """Whether this source supplies ``path`` (or a whole value above or below it), and from where."""
        origin = self.paths.get(path)
        if path in self.paths:
            return True, origin
        for depth in range(len(path) - 1, 0, -1):  # a whole object or list above the leaf
            if path[:depth] in self.paths:
                return True, self.paths[path[:depth]]
        below = [o for p, o in self.paths.items() if p[: len(path)] == path]  # entries below a leaf
        if below:
            names = sorted({o for o in below if o is not None})
            return True, ", ".join(names) if names else None
        return False, None


# -- masking ---------------------------------------------------------------------------------------


def _masked_secret(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (SecretStr, SecretBytes)):
        return MASK if len(value) else ""
    return MASK if value not in ("", b"") else ""


def json_number(value: float) -> float | str:
    """``value``, or ``"inf"``/``"-inf"``/``"nan"`` when it is not finite (JSON has no such numbers)."""
    return value if math.isfinite(value) else str(float(value))


def json_numbers(data: Any) -> Any:
    """JSON-able ``data`` (dicts, lists, scalars) with every float passed through :func:`json_number`."""
    if isinstance(data, float):
        return json_number(data)
    if isinstance(data, Mapping):
        return {key: json_numbers(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_numbers(value) for value in data]
    return data


def mask(value: Any, secret: bool = False) -> Any:
    """``value`` as JSON-able data with every secret replaced by :data:`MASK`."""
    if secret or isinstance(value, (SecretStr, SecretBytes)):
        return _masked_secret(value)
    if isinstance(value, BaseModel):
        return {
            name: mask(getattr(value, name), is_secret(info.annotation))
            for name, info in type(value).model_fields.items()
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: mask(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [mask(v) for v in value]
    if isinstance(value, float):
        return json_number(value)
    # Anything pydantic cannot turn into JSON is named by type: its repr might hold a secret.
    return to_jsonable_python(value, fallback=lambda v: f"<{type(v).__name__}>")


def _leaves(value: Any, secret: bool, path: Path_ = ()) -> list[tuple[Path_, Any, bool]]:
    """(path, masked value, secret) for every leaf of the settings: nested models and dict entries."""
    if isinstance(value, BaseModel) and not secret:
        out: list[tuple[Path_, Any, bool]] = []
        for name, info in type(value).model_fields.items():
            out.extend(_leaves(getattr(value, name), is_secret(info.annotation), (*path, name)))
        return out
    if isinstance(value, Mapping) and value and not secret:
        return [leaf for k, v in value.items() for leaf in _leaves(v, False, (*path, str(k)))]
    is_hidden = secret or isinstance(value, (SecretStr, SecretBytes))
    return [(path, mask(value, secret), is_hidden)]


# -- sources ---------------------------------------------------------------------------------------


def _by_field(model: type[BaseModel], data: Mapping[str, Any]) -> list[tuple[Path_, Path_]]:
    """(field path, path in ``data``) for the leaves of a source's data, which is keyed by the
    names pydantic reads (aliases, as the environment source puts them)."""
    return [(field_path(model, path), path) for path in leaf_paths(data)]


class _EnvNames:
    """Finds the variable a path was read from, the way pydantic-settings matches names."""

    def __init__(
        self,
        model: type[BaseModel],
        source: EnvSettingsSource | SecretsSettingsSource,
        names: Iterable[str | None],
    ) -> None:
        self.model = model
        self.prefix = source.env_prefix
        # env_prefix goes before a field's name; before an alias only if env_prefix_target says
        target = getattr(source, "env_prefix_target", "variable")
        self.alias_prefix = self.prefix if target in ("alias", "all") else ""
        self.name_prefix = self.prefix if target in ("variable", "all") else ""
        self.delimiter: str | None = getattr(source, "env_nested_delimiter", None)
        self.case_sensitive = bool(source.case_sensitive)
        self.names = {self._norm(n): n for n in names if n is not None}

    def _norm(self, name: str) -> str:
        return name if self.case_sensitive else name.lower()

    def find(self, path: Path_) -> str | None:
        """The variable ``path`` (a path in the source's data) was read from: any spelling of its
        field (the source puts each under the field's preferred one), its path below as it is."""
        spelling = names_of(self.model).match(path[0])
        tops = [(path[0], spelling is None or path[0] != spelling.field)]
        if spelling is not None and not spelling.head:
            spelled = names_of(self.model).spelled[spelling.field]
            tops = [(top, top != spelling.field) for top in spelled] + tops
        for top, is_alias in tops:
            prefix = self.alias_prefix if is_alias else self.name_prefix
            for depth in range(len(path), 0, -1):
                if depth > 1 and not self.delimiter:
                    continue
                tail = [*path[1:depth]]
                name = prefix + (self.delimiter or "").join([top, *tail])
                found = self.names.get(self._norm(name))
                if found is not None:
                    return found
        return None


def _read(source: PydanticBaseSettingsSource) -> dict[str, Any]:
    try:
        return source()
    except Exception:  # a malformed variable: the model itself reports it when it is built
        return {}


def _env_layer(model: type[BaseModel], source: EnvSettingsSource) -> _Layer:
    names = _EnvNames(model, source, os.environ)
    return _Layer("env", {field: names.find(path) for field, path in _by_field(model, _read(source))})


def _dotenv_files(source: DotEnvSettingsSource) -> list[Path]:
    files = source.env_file
    if files is None:
        return []
    listed = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    return [Path(f).expanduser() for f in listed]


def _dotenv_layer(model: type[BaseModel], source: DotEnvSettingsSource) -> _Layer:
    paths: dict[Path_, str | None] = {}
    files = [f for f in _dotenv_files(source) if f.is_file()]
    per_file = [(f, _EnvNames(model, source, dotenv_values(f))) for f in files]
    for field, path in _by_field(model, _read(source)):
        origin = None
        for file, names in reversed(per_file):  # later files override earlier ones
            name = names.find(path)
            if name is not None:
                origin = f"{file}: {name}"
                break
        paths[field] = origin
    return _Layer("dotenv", paths)


def _secrets_layer(model: type[BaseModel], source: SecretsSettingsSource) -> _Layer:
    where = source.secrets_dir
    dirs = [] if where is None else [where] if isinstance(where, (str, os.PathLike)) else list(where)
    paths: dict[Path_, str | None] = {}
    for field, path in _by_field(model, _read(source)):
        paths[field] = None
        for directory in reversed(dirs):
            names = _EnvNames(model, source, os.listdir(directory) if os.path.isdir(directory) else [])
            name = names.find(path[:1])
            if name is not None:
                paths[field] = str(Path(directory) / name)
                break
    return _Layer("secrets", paths)


def _layers(live: LiveSettings[Any]) -> list[_Layer]:
    """The model's sources, highest priority first, as LiveSettings builds it."""
    model = live.model
    init = _Layer("init", dict.fromkeys(live.init_fields()))
    etcd = _Layer("etcd", dict(live.etcd_fields()))
    if not issubclass(model, BaseSettings):
        return [init, etcd]
    init_source = InitSettingsSource(model, init_kwargs={})
    env = EnvSettingsSource(model)
    dotenv = DotEnvSettingsSource(model)
    secrets = SecretsSettingsSource(model)
    listed = lists_etcd_source(model)
    layers: list[_Layer] = []
    sources = model.settings_customise_sources(
        model,
        init_settings=init_source,
        env_settings=env,
        dotenv_settings=dotenv,
        file_secret_settings=secrets,
    )
    for source in sources:
        if source is init_source:
            # Without an EtcdSettingsSource of the model's own, etcd's data is passed in with the
            # init kwargs (which win over it), so etcd ranks right below them.
            layers += [init] if listed else [init, etcd]
        elif isinstance(source, EtcdSettingsSource):
            layers.append(etcd)
        elif source is dotenv:
            layers.append(_dotenv_layer(model, dotenv))
        elif source is env:
            layers.append(_env_layer(model, env))
        elif source is secrets:
            layers.append(_secrets_layer(model, secrets))
        else:
            layers.append(_Layer(type(source).__name__, {}, readable=False))
    return layers


def _pending_rejected_keys(live: LiveSettings[Any], history: Iterable[AppliedChange]) -> set[str]:
    """Keys of rejected revisions newer than the settings in force."""
    return {k for c in history if not c.applied and c.revision > live.revision for k in c.keys}


def settings_report(live: LiveSettings[Any]) -> SettingsReport:
    """The settings in force, secrets masked, with the source of every leaf field.

    Raises ``RuntimeError`` before ``async with live:`` has loaded them.
    """
    current = live.current
    layers = _layers(live)
    try:
        pending = _pending_rejected_keys(live, live.status.history)
    except RuntimeError:
        pending = set()
    fields: list[FieldReport] = []
    for path, value, secret in _leaves(current, False):
        source, origin = "default", None
        for layer in layers:
            if not layer.readable:
                source, origin = "unknown", f"{layer.name} (not readable by this report)"
                break
            held, where = layer.holds(path)
            if held:
                source, origin = layer.name, where
                break
        fields.append(
            FieldReport(
                field=".".join(path),
                value=value,
                secret=secret,
                source=source,
                origin=origin,
                pending_rejected=source == "etcd" and origin in pending,
            )
        )
    return SettingsReport(
        prefix=live.prefix,
        model=live.model.__name__,
        revision=live.revision,
        values=mask(current),
        fields=fields,
    )


# -- status ----------------------------------------------------------------------------------------


def _seconds(value: float | None) -> float | None:
    """JSON has no infinity: "never" is null."""
    return None if value is None or math.isinf(value) else round(value, 3)


def change_data(change: AppliedChange) -> dict[str, Any]:
    return {
        "revision": change.revision,
        "applied": change.applied,
        "keys": list(change.keys),
        "problems": list(change.problems),
        "at": change.at,
    }


def watch_data(watch: WatchStatus) -> dict[str, Any]:
    return {
        "state": watch.state,
        "endpoint": watch.endpoint,
        "revision": watch.revision,
        "confirmed_at": watch.confirmed_at,
        "staleness": _seconds(watch.staleness),
        "outage_started_at": watch.outage_started_at,
        "outage_seconds": _seconds(watch.outage_seconds),
        "total_outage_seconds": _seconds(watch.total_outage_seconds),
        "reconnects": watch.reconnects,
        "last_error": watch.last_error,
        "events_delivered": watch.events_delivered,
        "subscribers": watch.subscribers,
        "lagged_subscribers": watch.lagged_subscribers,
        "taken_at": watch.taken_at,
    }


def _instance_data(report: ReportStatus) -> dict[str, Any]:
    return {
        "id": report.instance,
        "labels": dict(report.labels),
        "record_in_etcd": report.in_etcd,
        "record_writes": report.writes,
        "leases_lost": report.leases_lost,
        "last_error": report.last_error,
    }


def status_report(
    live: LiveSettings[Any], *, max_staleness: float = DEFAULT_MAX_STALENESS, settings: bool = True
) -> dict[str, Any]:
    """One LiveSettings as JSON-able data: freshness, watch, rejections, history and (with
    ``settings``) the :func:`settings_report`. Never a value of a secret, nor of a rejected change.

    ``staleness`` is null when etcd never confirmed the watch; ``fresh`` applies ``max_staleness``.
    A LiveSettings not started (``async with live`` not entered) gives ``started: false``.
    """
    base: dict[str, Any] = {
        "prefix": live.prefix,
        "model": live.model.__name__,
        "max_staleness": json_number(max_staleness),
    }
    try:
        status = live.status
    except RuntimeError:
        return {**base, "started": False, "loaded": False, "fresh": False, "revision": live.revision}
    report: dict[str, Any] = {
        **base,
        "started": True,
        "loaded": status.loaded,
        "fresh": status.is_fresh(max_staleness),
        "revision": status.revision,
        "staleness": _seconds(status.staleness),
        "watch": watch_data(status.watch),
        "applied": status.applied,
        "rejected": status.rejected,
        "config_error": None if live.last_error is None else str(live.last_error),
        "last_rejected": None if status.last_rejected is None else change_data(status.last_rejected),
        "history": [change_data(c) for c in status.history],
        "instance": None if status.report is None else _instance_data(status.report),
    }
    if views := live.fleet_views:
        # read back from etcd: a number JSON has not (the records refuse one) must not fail the status
        report["fleet"] = json_numbers([view.report() for view in views.values()])
    if settings and status.loaded:
        report["settings"] = settings_report(live)
    return report
