"""Pure revision bookkeeping for one prefix watch: what to emit, where to resume, when to re-list.

No I/O here. :class:`WatchState` is fed etcd ``WatchResponse`` messages (anything with the same fields)
and returns a :class:`Step` saying what the I/O loop must do. It guarantees:

* ``delivered`` is a revision such that every event with a mod revision <= it has been emitted, so a
  new watch resumes at ``delivered + 1`` with nothing missed or repeated. It advances on events (to the
  last event's mod revision, never to a catch-up response's header revision) and on progress
  notifications addressed to this watcher (etcd sends those only to synced watchers) while
  ``trust_progress`` holds: through etcd's gRPC proxy a notification is etcd's, forwarded, and says
  nothing of revisions the proxy failed to send this client, so there only events advance it.
* Every response is classified here, once: events, a progress notification (``PROGRESS`` when it
  advances, ``ALIVE`` when it only proves the stream alive), etcd's own answer to a progress request
  (``ANSWER``, watch id -1: only etcd itself sends one, its proxy never does).
* Events are emitted as whole revisions: a transaction's events form one batch, fragments are joined
  first, and a partial fragment sequence is thrown away when the stream breaks.
* After compaction, ``resync()`` turns a fresh listing into the difference against what was delivered.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from ._keys import decode_key
from .events import Event, EventType, make_event

__all__ = ["Batch", "KeyState", "Step", "StepKind", "WatchState"]

Batch = tuple[Event, ...]

# etcd's mvccpb.Event.EventType value of a deletion (any other is a put)
_DELETE = 1


#: What the watch last delivered for one key: ``(value, mod_revision, create_revision, version)``.
#: A plain tuple, not a NamedTuple: built with BUILD_TUPLE from the free list, and the cyclic GC stops
#: tracking a tuple of bytes and ints, where a tuple subclass stays tracked (a watch holds one per key
#: of its prefix). Callgrind: -1,600 instructions per event in 100-event transactions.
KeyState: TypeAlias = tuple[bytes, int, int, int]


_PUT_TYPE = EventType.PUT
_DELETED = EventType.DELETE
#: ``_new_tuple(Step, (...))`` is ``Step(...)`` without the NamedTuple's Python-level ``__new__``.
_new_tuple = tuple.__new__


class StepKind(enum.Enum):
    NOTHING = "nothing"  # keep reading
    CREATED = "created"  # the server watcher exists; ``revision`` is etcd's current revision
    EMIT = "emit"  # deliver ``batches`` in order
    PROGRESS = "progress"  # no events up to ``revision``: ``delivered`` advanced to it
    ALIVE = "alive"  # an event-less response for this watcher that does not advance ``delivered``
    ANSWER = "answer"  # etcd's own answer to a progress request (watch id -1): the endpoint is etcd
    RELIST = "relist"  # history is gone (``revision`` = compact revision): re-list and call resync()
    CHECK_REVISION = "check_revision"  # etcd reported a revision below ``delivered``: verify it
    CANCELED = "canceled"  # the server canceled the watch for ``reason``; reconnect or give up


class Step(NamedTuple):
    """What the I/O loop must do next (a NamedTuple: one is built per response, and a frozen
    dataclass costs ~4x more to build). The per-response EMIT step is built with ``_new_tuple``,
    without the NamedTuple's Python-level ``__new__`` (~1,300 instructions less)."""

    kind: StepKind
    batches: tuple[Batch, ...] = ()
    revision: int = 0
    reason: str = ""


_NOTHING = Step(StepKind.NOTHING)


@dataclass
class WatchState:
    """Bookkeeping of one watch over ``prefix`` that has delivered everything up to ``delivered``.

    With ``keys`` (the prefix's contents as of ``delivered``) it keeps a materialised copy of the
    prefix, fills ``Event.prev_value`` from it and can resync after compaction. Without it (a private
    catch-up stream) compaction cannot be repaired and is reported as RELIST for the caller to refuse.
    """

    prefix: bytes
    delivered: int
    keys: dict[bytes, KeyState] | None = None
    watch_id: int | None = None
    #: Whether a progress notification may advance ``delivered`` (the loop sets it per endpoint).
    trust_progress: bool = True
    _fragments: list[Any] = field(default_factory=list)

    @property
    def tracks_state(self) -> bool:
        return self.keys is not None

    @property
    def resume_revision(self) -> int:
        """Where a new server watcher must start."""
        return self.delivered + 1

    def stream_lost(self) -> None:
        """The stream broke: forget partial fragments and the server's watch id."""
        self._fragments.clear()
        self.watch_id = None

    def on_response(self, response: Any) -> Step:
        """Digest one WatchResponse."""
        events = response.events
        if events and not response.fragment and not self._fragments and response.watch_id == self.watch_id:
            # The common case, first and with the fewest protobuf reads (~0.1 us each): etcd never
            # puts events in a created, canceled or compaction response.
            batches = self._batches(events)
            if not batches:
                return _NOTHING
            return _new_tuple(Step, (StepKind.EMIT, batches, self.delivered, ""))
        if response.canceled or response.compact_revision:
            self.stream_lost()
            if response.compact_revision:
                return Step(StepKind.RELIST, revision=int(response.compact_revision), reason="compacted")
            return Step(StepKind.CANCELED, reason=str(response.cancel_reason) or "canceled by server")
        header_revision = int(response.header.revision)
        if response.created:
            self.watch_id = int(response.watch_id)
            if header_revision < self.delivered:
                return Step(StepKind.CHECK_REVISION, revision=header_revision)
            return Step(StepKind.CREATED, revision=header_revision)
        if response.watch_id == -1 and not events:
            # A broadcast answering a progress request: in etcd < 3.5.8 its header revision can run
            # ahead of events still being replayed, so it proves liveness, never progress.
            return Step(StepKind.ANSWER, revision=header_revision)
        if self.watch_id is None or int(response.watch_id) != self.watch_id:
            return _NOTHING
        if response.fragment:
            self._fragments.extend(events)
            return _NOTHING
        if self._fragments:
            joined = self._fragments + list(events)
            self._fragments = []
            batches = self._batches(joined)
            if not batches:
                return _NOTHING
            return Step(StepKind.EMIT, batches, self.delivered)
        if header_revision > self.delivered and self.trust_progress:
            self.delivered = header_revision
            return Step(StepKind.PROGRESS, revision=header_revision)
        return Step(StepKind.ALIVE, revision=header_revision)

    def _batches(self, raw_events: Iterable[Any]) -> tuple[Batch, ...]:
        # Runs once per etcd event, so it is written flat: protobuf already hands out ``int`` and
        # ``bytes`` (no conversions), and what the loop reads is in local names.
        batches: list[Batch] = []
        current: list[Event] = []
        current_revision = 0
        delivered = self.delivered
        keys = self.keys
        for raw in raw_events:
            kv = raw.kv
            revision = kv.mod_revision
            if revision <= delivered:
                continue  # already delivered before a reconnect; never repeat
            if revision != current_revision and current:
                batches.append(tuple(current))
                current = []
            current_revision = revision
            key = kv.key
            name = key.decode("utf-8", "surrogateescape")  # as _keys.decode_key, inlined
            previous = keys.get(key) if keys is not None else None
            prev_value = previous[0] if previous is not None else None
            if raw.type == _DELETE:
                current.append(make_event(_DELETED, name, b"", revision, prev_value, 0, 0))
                if keys is not None:
                    keys.pop(key, None)
            else:
                value = kv.value
                create = kv.create_revision
                version = kv.version
                current.append(make_event(_PUT_TYPE, name, value, revision, prev_value, create, version))
                if keys is not None:
                    keys[key] = (value, revision, create, version)
        if current:
            batches.append(tuple(current))
            self.delivered = current_revision
        return tuple(batches)

    def resync(self, listing: Mapping[bytes, KeyState], revision: int) -> Batch:
        """Adopt a fresh listing at ``revision``; return the changes against what was delivered.

        The batch holds a PUT for every new or changed key and a DELETE for every vanished key, all
        marked ``resync`` and stamped with ``revision`` (the listing's), sorted by key.
        """
        if self.keys is None:
            raise RuntimeError("resync needs a watch that tracks the prefix's keys")
        old = self.keys
        events: list[Event] = []
        for key in sorted(old.keys() | listing.keys()):
            before, after = old.get(key), listing.get(key)
            prev_value = before[0] if before is not None else None
            if after is None:
                events.append(
                    Event(EventType.DELETE, decode_key(key), b"", revision, prev_value, resync=True)
                )
            elif before is None or before[:2] != after[:2]:  # value or mod_revision differ
                value, _, create_revision, version = after
                events.append(
                    Event(
                        EventType.PUT,
                        decode_key(key),
                        value,
                        revision,
                        prev_value,
                        create_revision,
                        version,
                        resync=True,
                    )
                )
        self.keys = dict(listing)
        self.delivered = revision
        self._fragments.clear()
        return tuple(events)
