"""The fleet, read back: the live instances of a prefix, and waiting until they applied a revision.

``instances(client, prefix)`` reads the instance records (see ``_records``) and the prefix's newest
change, and says of each instance whether it is current, behind, stale or rejecting.
``wait_applied(client, prefix, revision, timeout)`` follows the records (one watch of the records
prefix) until every instance still present applied the revision or rejected it, or the time is up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio

from ._fleetview import newest_change
from ._log import get_logger
from ._records import (
    InstanceRecord,
    InstanceState,
    WaitTally,
    instance_state,
    record_id,
    records_prefix,
)
from .client import EtcdClient
from .errors import EtcdError
from .events import EventType

__all__ = [
    "Fleet",
    "InstanceView",
    "WaitResult",
    "instances",
    "wait_applied",
]

log = get_logger()

#: Seconds of slack on top of one refresh interval (TTL/3) before an unrefreshed lease means stale.
RENEW_SLACK = 2.0


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One live instance of a prefix: its record, and its state against the newest change."""

    record: InstanceRecord
    state: InstanceState
    #: Its lease was refreshed on time (False: the instance is cut off from etcd, or frozen).
    renewed: bool


@dataclass(frozen=True, slots=True)
class Fleet:
    """Every live instance of ``prefix`` as of etcd ``revision``; ``newest``: the newest change,
    ``newest_config``: the newest that was not a canary opened or aborted (what an instance that
    does not follow canaries is compared with)."""

    prefix: str
    revision: int
    newest: int
    instances: tuple[InstanceView, ...]
    newest_config: int


@dataclass(frozen=True, slots=True)
class WaitResult:
    """How a wait for ``revision`` ended. ``ok``: every instance still present applied it."""

    prefix: str
    revision: int
    applied: tuple[InstanceRecord, ...]
    rejected: tuple[InstanceRecord, ...]
    #: Present, but neither applied nor rejected it in time (``stale``: its lease was not renewed).
    pending: tuple[InstanceView, ...]
    #: Ids of instances whose record disappeared during the wait (their process ended).
    gone: tuple[str, ...]
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.pending


def _norm(prefix: str) -> str:
    if not prefix:
        raise ValueError("prefix must not be empty (e.g. '/myservice/')")
    return prefix if prefix.endswith("/") else prefix + "/"


def _records(root: str, stored: Iterable[tuple[str, bytes]]) -> list[InstanceRecord]:
    found = []
    for key, value in stored:
        if record_id(root, key) is None:
            continue
        try:
            found.append(InstanceRecord.from_json(value))
        except ValueError:
            log.warning("fleet.bad_record", key=key)
    return found


async def _renewed(client: EtcdClient, leases: Iterable[int]) -> dict[int, bool]:
    """Whether each lease was refreshed within one interval (TTL/3) plus slack; read concurrently."""
    result: dict[int, bool] = {}

    async def check(lease: int) -> None:
        try:
            granted, remaining = await client.lease_remaining(lease)
        except EtcdError:
            result[lease] = True  # unknown: do not call it stale on a failed read
            return
        result[lease] = remaining >= 0 and granted - remaining <= granted / 3 + RENEW_SLACK

    async with anyio.create_task_group() as tg:
        for lease in set(leases):
            if lease:
                tg.start_soon(check, lease)
    return result


async def instances(client: EtcdClient, prefix: str, *, check_leases: bool = True) -> Fleet:
    """Every live instance of ``prefix`` (those whose record is in etcd), sorted by id.

    ``check_leases`` reads each record's lease (one request per instance) so that an instance cut off
    from etcd, whose record still says what it said before, is reported ``stale``.
    """
    prefix = _norm(prefix)
    root = records_prefix(prefix)
    newest = await newest_change(client, prefix)
    _, stored = await client.get_stored(root)
    leases = {s.key: s.lease for s in stored}
    renewed = await _renewed(client, leases.values()) if check_leases else {}
    views = []
    for item in stored:
        if record_id(root, item.key) is None:
            continue
        try:
            record = InstanceRecord.from_json(item.value)
        except ValueError:
            log.warning("fleet.bad_record", key=item.key)
            continue
        fine = renewed.get(item.lease, True)
        state = instance_state(record, newest.of(record, prefix), renewed=fine)
        views.append(InstanceView(record, state, fine))
    views.sort(key=lambda v: v.record.id)
    return Fleet(prefix, newest.revision, newest.change, tuple(views), newest.config)


async def wait_applied(
    client: EtcdClient,
    prefix: str,
    revision: int | None = None,
    timeout: float = 30.0,
    *,
    on_progress: Callable[[str], object] | None = None,
) -> WaitResult:
    """Wait until every live instance of ``prefix`` applied ``revision`` or later (default: the
    prefix's newest change), or rejected it, or ``timeout`` seconds passed.

    An instance that starts meanwhile is waited for too; one whose record disappears (it died: its
    lease expired, at most its TTL later) is named in ``gone`` and no longer waited for.
    ``on_progress`` gets a line such as ``"7/10 applied"`` each time the count changes.
    """
    prefix = _norm(prefix)
    newest = await newest_change(client, prefix)
    if revision is None:
        revision = newest.change
    root = records_prefix(prefix)
    tally = WaitTally(revision, prefix=prefix, config_revision=newest.config)
    shown = ""

    def progress() -> None:
        nonlocal shown
        line = tally.progress()
        if on_progress is not None and line != shown:
            on_progress(line)
        shown = line

    timed_out = True
    with anyio.move_on_after(timeout):
        async with client.watch(root, with_snapshot=True) as sub:
            assert sub.snapshot is not None
            for record in _records(root, sub.snapshot.items.items()):
                tally.put(record)
            progress()
            if tally.settled:
                timed_out = False
            else:
                async for batch in sub.batches():
                    for event in batch:
                        instance = record_id(root, event.key)
                        if instance is None:
                            continue
                        if event.type is EventType.DELETE:
                            tally.delete(instance)
                        else:
                            for record in _records(root, [(event.key, event.value)]):
                                tally.put(record)
                    progress()
                    if tally.settled:
                        timed_out = False
                        break
    pending: list[InstanceView] = []
    if tally.pending():
        _, stored = await client.get_stored(root)
        leases = {record_id(root, s.key): s.lease for s in stored}
        renewed = await _renewed(client, [leases.get(r.id, 0) for r in tally.pending()])
        for record in tally.pending():
            fine = renewed.get(leases.get(record.id, 0), True)
            state = instance_state(record, tally.target(record), renewed=fine)
            pending.append(InstanceView(record, state, fine))
    return WaitResult(
        prefix=prefix,
        revision=revision,
        applied=tuple(sorted(tally.applied(), key=lambda r: r.id)),
        rejected=tuple(sorted(tally.rejected(), key=lambda r: r.id)),
        pending=tuple(sorted(pending, key=lambda v: v.record.id)),
        gone=tuple(tally.gone),
        timed_out=timed_out,
    )
