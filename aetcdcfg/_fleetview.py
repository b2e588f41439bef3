"""FleetView: the instance records of a prefix, followed live (for the status page and the API).

One watch of ``/aetcdcfg/instances<prefix>``; ``records`` is every live instance's record as of the
last event, ``version`` changes with each change. Reading it does no I/O, so a status route can
show it on every request. Each instance's state is judged against the prefix's newest change as
etcd says (read when the records are listed, and again when a record reports a revision newer
than any seen): not against the other instances' revisions, which for a prefix that several
services layer (``/shared/``) also count changes of prefixes this one does not hold.
"""

from __future__ import annotations

from typing import Any

import anyio

from ._backoff import Backoff
from ._log import get_logger
from ._records import (
    AUDIT_ROOT,
    InstanceRecord,
    Newest,
    config_audit_range,
    instance_state,
    record_id,
    records_prefix,
)
from .client import EtcdClient
from .errors import AetcdcfgError, PermissionDenied
from .events import EventType

__all__ = ["FleetView", "newest_change"]

log = get_logger()


async def newest_change(client: EtcdClient, prefix: str) -> Newest:
    """The revision of ``prefix``'s newest change that can be seen (``prefix`` ends with "/").

    The newest modification among its keys, or the newest audit record aetcdcfg wrote with a change
    to it (which also covers a change that only deleted keys); for ``config``, leaving out the
    audit records of canaries opened or aborted.
    """
    current, keys = await client.newest_revision(prefix)
    try:
        _, audited = await client.newest_revision(AUDIT_ROOT + prefix)
        start, end = config_audit_range(prefix)
        _, configured = await client.newest_revision(start, end=end)
    except PermissionDenied:  # a service's role (the fleet view) need not read the audit log
        audited = configured = 0
    return Newest(current, max(keys, audited), max(keys, configured))


class FleetView:
    """Every live instance of ``prefix`` as its records say, kept current by :meth:`run`."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.prefix = prefix
        self._client = client
        self._root = records_prefix(prefix)
        self.records: dict[str, InstanceRecord] = {}
        self.version = 0
        self.following = False
        #: The prefix's newest change as last read (None before the first listing).
        self.newest: Newest | None = None
        self._seen = 0  # the newest revision a record reported when ``newest`` was read

    def _reported(self) -> int:
        return max(
            (max(r.applied_revision, r.rejected_revision or 0) for r in self.records.values()), default=0
        )

    async def _read_newest(self) -> None:
        seen = self._reported()
        self.newest = await newest_change(self._client, self.prefix)
        self._seen = seen

    def _put(self, key: str, value: bytes) -> None:
        instance = record_id(self._root, key)
        if instance is None:
            return
        try:
            self.records[instance] = InstanceRecord.from_json(value)
        except ValueError:
            log.warning("fleet.bad_record", key=key)

    async def run(self) -> None:
        """Follow the records until cancelled; a failed watch is re-listed after a backoff."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                async with self._client.watch(self._root, with_snapshot=True) as sub:
                    assert sub.snapshot is not None
                    self.records = {}
                    for key, value in sub.snapshot.items.items():
                        self._put(key, value)
                    await self._read_newest()
                    self.version += 1
                    self.following = True
                    backoff.reset()
                    async for batch in sub.batches():
                        for event in batch:
                            if event.type is EventType.PUT:
                                self._put(event.key, event.value)
                            elif (instance := record_id(self._root, event.key)) is not None:
                                self.records.pop(instance, None)
                        if self._reported() > self._seen:  # a revision not seen yet: a change?
                            await self._read_newest()
                        self.version += 1
            except AetcdcfgError as exc:
                self.following = False
                log.warning("fleet.view_failed", prefix=self.prefix, error=str(exc))
                await anyio.sleep(backoff.next_delay())

    def rows(self) -> list[dict[str, Any]]:
        """JSON-able rows, sorted by id, each with ``state`` against the prefix's newest change
        (for an instance that does not follow the prefix's canary, its newest config change)."""
        records = sorted(self.records.values(), key=lambda r: r.id)
        newest = self.newest
        if newest is None:
            return [{**r.to_dict(), "state": instance_state(r, 0)} for r in records]
        return [{**r.to_dict(), "state": instance_state(r, newest.of(r, self.prefix))} for r in records]

    def report(self) -> dict[str, Any]:
        """``{"prefix", "following", "instances": rows()}`` for the status JSON (no I/O)."""
        return {"prefix": self.prefix, "following": self.following, "instances": self.rows()}
