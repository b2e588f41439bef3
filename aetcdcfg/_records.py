"""Instance records, as data: who an instance is, what it applied, where its record lives in etcd.

Pure: no I/O. The reporter (``_reporter``) writes these; ``_fleet`` reads them back. A record holds
names, revisions and validation problems (whose text never quotes a value), never a config value.

Records live outside every config prefix, at ``/aetcdcfg/instances`` + the config prefix + the
instance id, e.g. ``/aetcdcfg/instances/myservice/pod-a``, so that an etcd role can grant "read
``/myservice/``, readwrite ``/aetcdcfg/instances/myservice/``" and nothing more.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import importlib.metadata
import json
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

__all__ = [
    "AUDIT_ROOT",
    "AuditRecord",
    "RECORDS_ROOT",
    "Identity",
    "InstanceRecord",
    "InstanceState",
    "Newest",
    "WaitTally",
    "WriteSchedule",
    "audit_id_ranges",
    "audit_time",
    "config_audit_range",
    "current_user",
    "finite",
    "instance_state",
    "library_version",
    "parse_labels",
    "record_id",
    "record_key",
    "records_prefix",
    "report_enabled",
    "schema_fingerprint",
    "strict_loads",
    "wait_target",
]

RECORDS_ROOT = "/aetcdcfg/instances"
AUDIT_ROOT = "/aetcdcfg/audit"

#: How ``aetcdcfg instances`` describes an instance against the prefix's newest change.
InstanceState = Literal["current", "behind", "stale", "rejecting"]


def records_prefix(prefix: str) -> str:
    """Where the records of the instances reading ``prefix`` live (``prefix`` ends with "/")."""
    return RECORDS_ROOT + prefix


def record_key(prefix: str, instance: str) -> str:
    return records_prefix(prefix) + instance


def parse_labels(text: str) -> dict[str, str]:
    """``"zone=b,version=1.4"`` -> ``{"zone": "b", "version": "1.4"}``; ``ValueError`` names a bad pair."""
    labels: dict[str, str] = {}
    for pair in text.split(","):
        pair = pair.strip()
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"label {pair!r}: expected NAME=VALUE, e.g. zone=b,version=1.4")
        if name in labels:
            raise ValueError(f"label {name!r} is given twice")
        labels[name] = value
    return labels


def report_enabled(report: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """``report=`` if given, else ``AETCDCFG_REPORT`` (``0``/``false``/``no``/``off`` opt out), else on."""
    if report is not None:
        return report
    return environ.get("AETCDCFG_REPORT", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an instance is: its id (unique among the instances of a prefix) and its labels."""

    instance: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        instance: str | None = None,
        labels: Mapping[str, str] | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Identity:
        """The constructor's values, else ``AETCDCFG_INSTANCE`` (default ``hostname-pid``) and
        ``AETCDCFG_LABELS`` (``zone=b,version=1.4``)."""
        if instance is None:
            instance = environ.get("AETCDCFG_INSTANCE") or f"{socket.gethostname()}-{os.getpid()}"
        if not instance or "/" in instance:
            raise ValueError(f"instance id {instance!r}: must be non-empty and without '/'")
        if labels is None:
            try:
                labels = parse_labels(environ.get("AETCDCFG_LABELS", ""))
            except ValueError as exc:
                raise ValueError(f"AETCDCFG_LABELS: {exc}") from None
        return cls(instance, dict(labels))


def library_version() -> str:
    try:
        return importlib.metadata.version("aetcdcfg")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def schema_fingerprint(model: type[BaseModel]) -> str:
    """A short sha256 of the model's JSON schema: instances with the same one read config alike."""
    try:
        schema = json.dumps(model.model_json_schema(), sort_keys=True, default=str)
    except Exception:  # a field type without a JSON schema: the field names still tell models apart
        schema = json.dumps(sorted(model.model_fields), sort_keys=True)
    return hashlib.sha256(schema.encode()).hexdigest()[:12]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def finite(value: Any) -> float:
    """``float(value)``; ``ValueError`` for NaN or an infinity, which JSON (and the status) cannot carry."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("a number that is not finite")
    return number


def strict_loads(raw: bytes) -> Any:
    """JSON as the standard has it: Python's ``NaN``/``Infinity`` and an overflowing ``1e400`` are
    errors, so that a record read back can be served as JSON (the status, ``--json``) as it is."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=finite)
    except RecursionError:  # an attacker's (or a bug's) [[[[...]]]]: not a record, like bad JSON
        raise ValueError("JSON nested too deeply") from None


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What one running LiveSettings reports about itself (names and revisions, never values)."""

    id: str
    labels: Mapping[str, str]
    model: str
    schema: str
    prefixes: tuple[str, ...]
    #: The etcd revision of the settings in force.
    applied_revision: int
    #: The latest revision validation rejected (None if none), its keys and problems.
    rejected_revision: int | None
    rejected_keys: tuple[str, ...]
    problems: tuple[str, ...]
    #: Its watch confirmed current within the readiness bound when the record was written.
    fresh: bool
    version: str
    started_at: float
    updated_at: float
    #: A canary is open on its prefix and selects it: it applies the canary's overlay.
    canary: bool = False
    #: The prefixes whose canary it follows (all of ``prefixes`` unless it runs with
    #: ``canary=False`` or its role cannot read them): only those can select it.
    follows_canary: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        data = {
            "id": self.id,
            "labels": dict(self.labels),
            "model": self.model,
            "schema": self.schema,
            "prefixes": list(self.prefixes),
            "applied_revision": self.applied_revision,
            "rejected_revision": self.rejected_revision,
            "rejected_keys": list(self.rejected_keys),
            "problems": list(self.problems),
            "fresh": self.fresh,
            "canary": self.canary,
            "follows_canary": list(self.follows_canary),
            "version": self.version,
            "started_at": round(self.started_at, 3),
            "updated_at": round(self.updated_at, 3),
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> InstanceRecord:
        """Parse a record; ``ValueError`` if it is not one (e.g. written by something else)."""
        try:
            data: dict[str, Any] = strict_loads(raw)
            rejected = data.get("rejected_revision")
            prefixes = tuple(str(p) for p in data.get("prefixes") or ())
            follows = data.get("follows_canary")  # absent: a record of a build that always followed
            return cls(
                id=str(data["id"]),
                labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()},
                model=str(data.get("model", "")),
                schema=str(data.get("schema", "")),
                prefixes=prefixes,
                applied_revision=int(data["applied_revision"]),
                rejected_revision=None if rejected is None else int(rejected),
                rejected_keys=tuple(str(k) for k in data.get("rejected_keys") or ()),
                problems=tuple(str(p) for p in data.get("problems") or ()),
                fresh=bool(data.get("fresh", False)),
                canary=bool(data.get("canary", False)),
                follows_canary=prefixes if follows is None else tuple(str(p) for p in follows),
                version=str(data.get("version", "")),
                started_at=finite(data.get("started_at", 0.0)),
                updated_at=finite(data.get("updated_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"not an instance record: {exc!r}") from None

    @property
    def rejecting(self) -> bool:
        """Its newest known revision was rejected: it serves an older one."""
        return self.rejected_revision is not None and self.rejected_revision > self.applied_revision

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())  # type: ignore[no-any-return]


def wait_target(record: InstanceRecord, prefix: str, revision: int, config_revision: int | None) -> int:
    """The revision ``record``'s instance must apply to reflect ``prefix`` as of ``revision``.

    ``revision`` itself, except for an instance that does not follow the prefix's canary: it never
    sees a canary opened or aborted, so for it the prefix as of ``revision`` is as of the newest
    change to the config itself up to then, ``config_revision`` (None: not known, ``revision``).
    """
    if config_revision is None or prefix in record.follows_canary:
        return revision
    return min(revision, config_revision)


@dataclass(frozen=True, slots=True)
class Newest:
    """A prefix's newest change as of etcd's ``revision``: ``change``, anything an instance of it
    applies (a canary opened or aborted included), and ``config``, the newest change to the config
    itself (its keys, or a change that only deleted some)."""

    revision: int
    change: int
    config: int

    def of(self, record: InstanceRecord, prefix: str) -> int:
        """The newest change of ``prefix`` that ``record``'s instance can apply (see wait_target)."""
        return wait_target(record, prefix, self.change, self.config)


def instance_state(record: InstanceRecord, newest: int, *, renewed: bool = True) -> InstanceState:
    """``record`` against ``newest``, the revision of the prefix's newest change.

    ``renewed``: its lease was refreshed on time (an instance cut off from etcd cannot refresh it,
    nor rewrite its record, which then still says what it said before the partition).
    """
    if not record.fresh or not renewed:
        return "stale"
    if record.rejecting:
        return "rejecting"
    if record.applied_revision >= newest:
        return "current"
    return "behind"


@dataclass
class WriteSchedule:
    """When the reporter writes: at most once per ``interval`` seconds, whenever something changed.

    Plain state over a clock the caller passes (``anyio.current_time()``), so it is tested without
    sleeping. A burst of N changes within T seconds costs at most ``T / interval + 1`` writes.
    """

    interval: float = 0.25
    dirty: bool = True
    last_write: float = float("-inf")

    def changed(self) -> None:
        self.dirty = True

    def due_at(self) -> float | None:
        """When the next write may go (None: nothing to write)."""
        return self.last_write + self.interval if self.dirty else None

    def should_write(self, now: float) -> bool:
        due = self.due_at()
        return due is not None and now >= due

    def wrote(self, now: float) -> None:
        """A write began at ``now`` with the state as it was then (later changes dirty it again)."""
        self.dirty = False
        self.last_write = now


def record_id(records_root: str, key: str) -> str | None:
    """The instance id of a record key directly under ``records_root`` (None for a deeper key: the
    records of a nested prefix, e.g. ``/svc/sub/``, live below those of ``/svc/``)."""
    if not key.startswith(records_root):
        return None
    rest = key[len(records_root) :]
    return rest if rest and "/" not in rest else None


@dataclass
class WaitTally:
    """Who has applied ``revision``: plain bookkeeping over the records as they come and go.

    An instance has *applied* it when its ``applied_revision`` is ``revision`` or later, has
    *rejected* it when it serves an older one and rejected ``revision`` or a later one, and is
    *pending* otherwise. An instance whose record disappears (its process ended, its lease expired)
    is *gone*: named, but no longer waited for. An instance that does not follow ``prefix``'s
    canary waits for ``config_revision`` instead when that is older (see :func:`wait_target`).
    """

    revision: int
    records: dict[str, InstanceRecord] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    prefix: str = ""
    config_revision: int | None = None

    def target(self, record: InstanceRecord) -> int:
        return wait_target(record, self.prefix, self.revision, self.config_revision)

    def put(self, record: InstanceRecord) -> None:
        self.records[record.id] = record
        if record.id in self.gone:
            self.gone.remove(record.id)

    def delete(self, instance: str) -> None:
        if self.records.pop(instance, None) is not None:
            self.gone.append(instance)

    def applied(self) -> list[InstanceRecord]:
        return [r for r in self.records.values() if r.applied_revision >= self.target(r)]

    def rejected(self) -> list[InstanceRecord]:
        return [
            r
            for r in self.records.values()
            if r.applied_revision < self.target(r)
            and r.rejected_revision is not None
            and r.rejected_revision >= self.target(r)
        ]

    def pending(self) -> list[InstanceRecord]:
        done = {r.id for r in self.applied()} | {r.id for r in self.rejected()}
        return [r for r in self.records.values() if r.id not in done]

    @property
    def settled(self) -> bool:
        """Nothing left to wait for: every instance present applied or rejected it."""
        return not self.pending()

    def progress(self) -> str:
        """``7/10 applied`` (+ rejected and gone counts when there are any)."""
        text = f"{len(self.applied())}/{len(self.records)} applied"
        if rejected := self.rejected():
            text += f", {len(rejected)} rejected"
        if self.gone:
            text += f", {len(self.gone)} gone"
        return text


def current_user(environ: Mapping[str, str] = os.environ) -> str:
    """Who is writing: ``AETCDCFG_USER``, else the login name (``getpass.getuser()``)."""
    if user := environ.get("AETCDCFG_USER"):
        return user
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


#: An audit record's id: the time it was made (ns, 20 digits) and a random part; ``c`` first for a
#: canary opened or aborted (a change to no config key: ``config_audit_range`` leaves those out).
_AUDIT_ID = re.compile(r"c?(\d{20})-[0-9a-f]{8}")


def config_audit_range(prefix: str) -> tuple[str, str]:
    """[start, end) of the ids of ``prefix``'s audit records of changes to the config itself."""
    root = AUDIT_ROOT + prefix
    return root + "0", root + ":"  # the ids that begin with a digit


def audit_id_ranges(root: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The [start, end) key ranges under ``root`` that hold record ids: a digit first (a config
    change), or ``c`` and a digit (a canary). A nested prefix is counted only if its name begins so."""
    return (root + "0", root + ":"), (root + "c0", root + "c:")


def audit_time(record_id: str) -> int | None:
    """The time (ns) an audit record's id (its key after the prefix) holds; None if not an id."""
    matched = _AUDIT_ID.fullmatch(record_id)
    return None if matched is None else int(matched[1])


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Who changed a prefix, when and why, written in the same transaction as the change.

    Stored at ``/aetcdcfg/audit<prefix><time-ordered id>``; its mod revision is the change's
    revision, which is how ``history`` finds it. Key names only, never a value.
    """

    user: str
    host: str
    time: float
    command: str
    message: str | None
    keys: tuple[str, ...]

    @classmethod
    def now(cls, command: str, keys: Sequence[str], message: str | None = None) -> AuditRecord:
        return cls(current_user(), socket.gethostname(), time.time(), command, message, tuple(keys))

    def key(self, prefix: str, *, canary_only: bool = False) -> str:
        """A new key for this record (time-ordered, unique: never derived from a revision).
        ``canary_only``: its change opened or aborted a canary, and wrote no config key."""
        mark = "c" if canary_only else ""
        return f"{AUDIT_ROOT}{prefix}{mark}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"

    def to_json(self) -> bytes:
        data = {
            "user": self.user,
            "host": self.host,
            "time": round(self.time, 3),
            "command": self.command,
            "message": self.message,
            "keys": list(self.keys),
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AuditRecord:
        try:
            data: dict[str, Any] = strict_loads(raw)
            message = data.get("message")
            record = cls(
                user=str(data["user"]),
                host=str(data.get("host", "")),
                time=finite(data["time"]),
                command=str(data.get("command", "")),
                message=None if message is None else str(message),
                keys=tuple(str(k) for k in data.get("keys") or ()),
            )
            record._when()  # a time that is no date (year 10,000 and on) would fail describe()
            return record
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError) as exc:
            raise ValueError(f"not an audit record: {exc!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())  # type: ignore[no-any-return]

    def _when(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.time, datetime.timezone.utc)

    def describe(self) -> str:
        """``2026-12-06 18:20:01 UTC by alice@host (set): "raise the limit"``."""
        when = self._when().strftime("%Y-%m-%d %H:%M:%S UTC")
        why = "" if not self.message else f": {json.dumps(self.message, ensure_ascii=False)}"
        return f"{when} by {self.user}@{self.host} ({self.command}){why}"
