"""Audit records, written and read: who changed a prefix, when and why; and how many are kept.

Every write aetcdcfg makes (``set``, ``push``, ``rollback``, a canary opened, promoted or aborted)
puts one :class:`AuditRecord` under ``/aetcdcfg/audit<prefix>`` in the transaction of the change.
One per change, forever, would grow without bound, so the same transaction also deletes the oldest
records beyond the newest ``keep`` of the prefix (default 1000; ``AETCDCFG_AUDIT_KEEP``; 0 keeps
all). A write deletes at most ``PRUNE_BATCH`` of them, as single keys, and only as many as fit
etcd's transaction limit beside the change: at the bound that is one per write, and after ``keep``
is lowered the excess goes over the next writes. A refused write deletes nothing, and a write never
waits on or fails for pruning: deleting a key another writer deleted first is a no-op.

Why a count and not etcd's compaction: many clusters compact every few minutes or hours
(``--auto-compaction-retention``; Kubernetes' API server every 5 min), and the audit record is the
only trace of who made a change and why that outlives that history. ``history`` cannot show the diff
of a compacted revision, but ``audit_log()`` still says who wrote it and when. A count gives a fixed
bound instead (a record is ~150-300 bytes: 1000 stay well under 1 MB of etcd per prefix).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ._log import get_logger
from ._records import AUDIT_ROOT, AuditRecord, audit_id_ranges, audit_time
from .client import EtcdClient
from .errors import PermissionDenied

__all__ = ["DEFAULT_AUDIT_KEEP", "PRUNE_BATCH", "AuditWrite", "audit_keep", "audit_log", "audit_write"]

log = get_logger()

#: Audit records kept per prefix when neither the caller nor ``AETCDCFG_AUDIT_KEEP`` says.
DEFAULT_AUDIT_KEEP = 1000
#: At most this many old records are deleted by one write.
PRUNE_BATCH = 32


def audit_keep(keep: int | None = None, environ: Mapping[str, str] = os.environ) -> int:
    """``keep`` if given, else ``AETCDCFG_AUDIT_KEEP``, else 1000; 0 keeps every record.
    ``ValueError`` names what is wrong."""
    if keep is None:
        text = environ.get("AETCDCFG_AUDIT_KEEP", "").strip()
        if not text:
            return DEFAULT_AUDIT_KEEP
        try:
            keep = int(text)
        except ValueError:
            raise ValueError(
                f"AETCDCFG_AUDIT_KEEP={text!r}: give a whole number of records (0 keeps all)"
            ) from None
    if keep < 0:
        raise ValueError(f"audit records to keep: {keep} is negative (0 keeps all)")
    return keep


@dataclass(frozen=True, slots=True)
class AuditWrite:
    """An audit record to put in a change's transaction, and the old ones to delete in it."""

    puts: dict[str, bytes]
    prune: tuple[str, ...]


async def audit_write(
    client: EtcdClient,
    prefix: str,
    record: AuditRecord,
    *,
    keep: int | None = None,
    canary_only: bool = False,
) -> AuditWrite:
    """``record`` as a key of ``prefix``'s audit log, and its oldest records beyond the newest
    ``keep`` counting this one (see :func:`audit_keep`), at most ``PRUNE_BATCH``. ``canary_only``:
    the change opens or aborts a canary and writes no config key (see ``AuditRecord.key``)."""
    keep = audit_keep(keep)
    puts = {record.key(prefix, canary_only=canary_only): record.to_json()}
    if not keep:
        return AuditWrite(puts, ())
    return AuditWrite(puts, tuple(await _beyond(client, AUDIT_ROOT + prefix, keep)))


async def _beyond(client: EtcdClient, root: str, keep: int) -> list[str]:
    """The oldest records directly under ``root`` beyond the newest ``keep - 1`` (one is being
    added), at most ``PRUNE_BATCH``; keys that are not records, and nested prefixes', are left."""
    try:
        # Counted over the two ranges of record ids only: a parent prefix's count used to take in
        # every nested prefix's records, and then listed them all on each write to prune nothing.
        counted = 0
        for start, end in audit_id_ranges(root):
            counted += await client.count(start, end=end)
        if counted < keep:
            return []
        _, stored = await client.get_stored(root, keys_only=True)
    except PermissionDenied:
        # A role that may write records but not read them back: the write goes on, unpruned.
        log.warning("fleet.audit_not_pruned", prefix=root, reason="no read permission on the audit records")
        return []
    # Oldest first by the revision that wrote them (every writer's clock is not the same clock).
    records = sorted(
        (item.mod_revision, item.key) for item in stored if audit_time(item.key[len(root) :]) is not None
    )
    excess = max(0, len(records) + 1 - keep)
    return [key for _, key in records[: min(excess, PRUNE_BATCH)]]


async def audit_log(client: EtcdClient, prefix: str) -> dict[int, AuditRecord]:
    """Who made each change to ``prefix`` that aetcdcfg wrote: {revision: record} (see AuditRecord);
    the newest ``keep`` of them (see :func:`audit_keep`)."""
    if not prefix:
        raise ValueError("prefix must not be empty (e.g. '/myservice/')")
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    root = AUDIT_ROOT + prefix
    _, stored = await client.get_stored(root)
    found: dict[int, AuditRecord] = {}
    for item in stored:
        if "/" in item.key[len(root) :]:
            continue  # a nested prefix's record
        try:
            found[item.mod_revision] = AuditRecord.from_json(item.value)
        except ValueError:
            log.warning("fleet.bad_record", key=item.key)
    return found
