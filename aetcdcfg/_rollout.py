"""Canary rollouts: open a canary on some instances, see it, promote it into the prefix or abort it.

Each step is one guarded transaction (see ``_canary`` for the layout), with an audit record in it:

* **open**: refused (``CanaryRefused``) if another canary is open (named) or the selector matches
  no live instance; validated first (base + overlay, with the model); written only if the prefix is
  still as it was read and no canary appeared meanwhile. ``plan_canary`` decides all of it and
  writes nothing (a dry run); open it on the plan's revision to write exactly what was shown.
* **promote**: writes the overlay into the prefix and deletes the canary, only if the prefix did not
  change since the canary's base revision (else :class:`TxnConflict`: the canary was tried on a
  state that no longer exists) and the canary is the one read.
* **abort**: deletes the canary, only if it is the one read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel

from ._audit import audit_write
from ._canary import SPEC, VALUES, CanarySpec, Selector, canary_prefix
from ._diff import ConfigDiff
from ._fleet import instances
from ._records import AuditRecord, Identity, InstanceRecord
from ._validate import build_model
from .client import EtcdClient
from .errors import CanaryRefused, TxnConflict
from .events import Snapshot

__all__ = [
    "Canary",
    "CanaryPlan",
    "abort_canary",
    "canary_status",
    "open_canary",
    "plan_canary",
    "promote_canary",
]


@dataclass(frozen=True, slots=True)
class Canary:
    """An open canary of ``prefix``: its spec, overlay (relative keys; values: mask before showing)
    and the revision that opened it; ``members``/``others`` are the live instances it selects or not.
    ``unreachable``: instances its selector matches that do not follow the prefix's canary
    (``LiveSettings(canary=False)``, or a role that cannot read it): they keep the prefix alone."""

    prefix: str
    spec: CanarySpec
    overlay: Mapping[str, bytes]
    revision: int
    members: tuple[InstanceRecord, ...] = ()
    others: tuple[InstanceRecord, ...] = ()
    unreachable: tuple[InstanceRecord, ...] = ()


def _norm(prefix: str) -> str:
    if not prefix:
        raise ValueError("prefix must not be empty (e.g. '/myservice/')")
    return prefix if prefix.endswith("/") else prefix + "/"


async def _read(client: EtcdClient, prefix: str) -> Canary | None:
    root = canary_prefix(prefix)
    _, stored = await client.get_stored(root)
    items = {s.key[len(root) :]: s for s in stored}
    spec = items.get(SPEC)
    if spec is None:
        return None
    overlay = {k[len(VALUES) :]: s.value for k, s in items.items() if k.startswith(VALUES)}
    return Canary(prefix, CanarySpec.from_json(spec.value), overlay, spec.mod_revision)


def _split(
    prefix: str, records: tuple[InstanceRecord, ...], selector: Selector
) -> tuple[tuple[InstanceRecord, ...], tuple[InstanceRecord, ...], tuple[InstanceRecord, ...]]:
    """(members, others, unreachable): selected and following the canary, not selected, selected
    but not following it."""
    matched = [r for r in records if selector.matches(Identity(r.id, r.labels))]
    members = tuple(r for r in matched if prefix in r.follows_canary)
    unreachable = tuple(r for r in matched if prefix not in r.follows_canary)
    return members, tuple(r for r in records if r not in matched), unreachable


async def canary_status(client: EtcdClient, prefix: str) -> Canary | None:
    """The open canary of ``prefix`` with the live instances it selects, or None."""
    prefix = _norm(prefix)
    canary = await _read(client, prefix)
    if canary is None:
        return None
    fleet = await instances(client, prefix, check_leases=False)
    split = _split(prefix, tuple(v.record for v in fleet.instances), canary.spec.selector)
    return Canary(prefix, canary.spec, canary.overlay, canary.revision, *split)


def _refuse_open(prefix: str, open_: Canary) -> CanaryRefused:
    return CanaryRefused(
        f"a canary of {prefix!r} is already open (selector {open_.spec.selector}, opened at revision "
        f"{open_.revision} by {open_.spec.user}, keys {', '.join(open_.spec.keys)}); "
        "promote or abort it first",
        prefix=prefix,
        reason="open",
        open_selector=str(open_.spec.selector),
    )


@dataclass(frozen=True, slots=True)
class CanaryPlan:
    """What :func:`open_canary` would write, decided and validated: the ``spec``, the ``values``
    (relative keys; mask before showing) over ``base`` (the prefix as it is read), the live
    instances it selects now (``members``), those it does not (``others``) and those it matches
    that do not follow canaries (``unreachable``), and the audit record to write with it."""

    prefix: str
    spec: CanarySpec
    values: Mapping[str, bytes]
    base: Snapshot
    members: tuple[InstanceRecord, ...]
    others: tuple[InstanceRecord, ...]
    unreachable: tuple[InstanceRecord, ...]
    audit: AuditRecord

    @property
    def diff(self) -> ConfigDiff:
        """How the config of a selected instance changes: ``base`` to base + overlay (full keys)."""
        overlay = {self.prefix + k: v for k, v in self.values.items()}
        return ConfigDiff.between(self.base, Snapshot(self.base.revision, {**self.base.items, **overlay}))


async def plan_canary(
    client: EtcdClient,
    prefix: str,
    values: Mapping[str, bytes],
    selector: Selector,
    *,
    model: type[BaseModel] | None = None,
    at_revision: int | None = None,
    message: str | None = None,
    command: str = "canary",
) -> CanaryPlan:
    """Decide a canary as :func:`open_canary` would, refusals included, and write nothing (a dry
    run). ``at_revision``: on the prefix as of that revision (a reviewed plan's) instead of now."""
    prefix = _norm(prefix)
    if not values:
        raise ValueError("a canary needs at least one KEY=VALUE")
    existing = await _read(client, prefix)
    if existing is not None:
        raise _refuse_open(prefix, existing)
    base = await client.get_prefix(prefix, revision=at_revision)
    fleet = await instances(client, prefix, check_leases=False)
    records = tuple(v.record for v in fleet.instances)
    members, others, unreachable = _split(prefix, records, selector)
    if not members:
        live = ", ".join(f"{r.id}({','.join(f'{k}={v}' for k, v in r.labels.items())})" for r in records)
        deaf = ""
        if unreachable:
            deaf = (
                f"; it matches {', '.join(r.id for r in unreachable)}, which do not follow canaries "
                f"(LiveSettings(canary=False), or a role that cannot read {canary_prefix(prefix)})"
            )
        raise CanaryRefused(
            f"selector {selector} matches no live instance of {prefix!r} that follows canaries "
            f"(live: {live or 'none'}){deaf}",
            prefix=prefix,
            reason="no_match",
        )
    if model is not None:
        items = {k[len(prefix) :]: v for k, v in base.items.items()} | dict(values)
        build_model(model, prefix, items, base.revision)
    keys = tuple(prefix + k for k in values)
    record = AuditRecord.now(command, keys, message)
    spec = CanarySpec(selector, base.revision, keys, record.user, record.time)
    return CanaryPlan(prefix, spec, dict(values), base, members, others, unreachable, record)


async def open_canary(
    client: EtcdClient,
    prefix: str,
    values: Mapping[str, bytes],
    selector: Selector,
    *,
    model: type[BaseModel] | None = None,
    message: str | None = None,
    command: str = "canary",
    audit_keep: int | None = None,
    at_revision: int | None = None,
) -> int:
    """Open a canary: ``values`` (keys relative to ``prefix``) for the instances ``selector``
    matches. Returns the revision that opened it. Raises :class:`CanaryRefused` (another canary is
    open; the selector matches no live instance), :class:`ConfigRejected` (base + overlay does not
    validate as ``model``) or :class:`TxnConflict` (the prefix changed while this was decided, or
    after ``at_revision``: see :func:`plan_canary`).

    Each step writes an audit record with the change and prunes the prefix's oldest beyond
    ``audit_keep`` (default ``AETCDCFG_AUDIT_KEEP``, else 1000; 0 keeps all)."""
    plan = await plan_canary(
        client,
        prefix,
        values,
        selector,
        model=model,
        at_revision=at_revision,
        message=message,
        command=command,
    )
    prefix, base = plan.prefix, plan.base
    root = canary_prefix(prefix)
    audit = await audit_write(client, prefix, plan.audit, keep=audit_keep, canary_only=True)
    writes = {root + SPEC: plan.spec.to_json(), **audit.puts}
    writes |= {root + VALUES + k: v for k, v in values.items()}
    try:
        return await client.apply_if_unchanged(
            prefix, {}, since_revision=base.revision, also=writes, absent=[root + SPEC], prune=audit.prune
        )
    except TxnConflict:
        opened = await _read(client, prefix)
        if opened is not None:
            raise _refuse_open(prefix, opened) from None
        raise


async def _the_open_one(client: EtcdClient, prefix: str, doing: str) -> Canary:
    canary = await _read(client, prefix)
    if canary is None:
        raise CanaryRefused(f"no canary of {prefix!r} is open to {doing}", prefix=prefix, reason="none")
    return canary


async def promote_canary(
    client: EtcdClient, prefix: str, *, message: str | None = None, audit_keep: int | None = None
) -> int:
    """Write the canary's overlay into ``prefix`` and delete the canary, in one transaction guarded
    on the canary's base revision; returns the new revision. :class:`TxnConflict` if the prefix
    changed since the canary was opened (nothing written: abort, and open a canary again)."""
    prefix = _norm(prefix)
    canary = await _the_open_one(client, prefix, "promote")
    root = canary_prefix(prefix)
    record = AuditRecord.now("canary promote", canary.spec.keys, message)
    audit = await audit_write(client, prefix, record, keep=audit_keep)
    return await client.apply_if_unchanged(
        prefix,
        {prefix + k: v for k, v in canary.overlay.items()},
        since_revision=canary.spec.base_revision,
        also=audit.puts,
        mod_revisions={root + SPEC: canary.revision},
        delete_prefixes=[root],
        prune=audit.prune,
    )


async def abort_canary(
    client: EtcdClient, prefix: str, *, message: str | None = None, audit_keep: int | None = None
) -> int:
    """Delete the canary of ``prefix`` (every instance goes back to the prefix alone); returns the
    revision of the deletion."""
    prefix = _norm(prefix)
    canary = await _the_open_one(client, prefix, "abort")
    root = canary_prefix(prefix)
    record = AuditRecord.now("canary abort", canary.spec.keys, message)
    audit = await audit_write(client, prefix, record, keep=audit_keep, canary_only=True)
    return await client.apply_if_unchanged(
        root,
        {},
        since_revision=canary.revision,
        also=audit.puts,
        mod_revisions={root + SPEC: canary.revision},
        delete_prefixes=[root],
        prune=audit.prune,
    )
