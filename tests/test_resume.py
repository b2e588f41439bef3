"""The watch bookkeeping, fed real etcd protobuf messages without a server (sans-IO)."""

from __future__ import annotations

from aetcd.rpc import kv_pb2, rpc_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from aetcdcfg import Event, EventType
from aetcdcfg._grpc_errors import Failure, classify_cancel
from aetcdcfg._resume import StepKind, WatchState  # KeyState: (value, mod, create, version)

WATCH_ID = 7

# One revision: a list of (key, value or None for delete)
Revision = list[tuple[bytes, bytes | None]]


def history_strategy() -> st.SearchStrategy[list[Revision]]:
    op = st.tuples(st.sampled_from([b"/p/a", b"/p/b", b"/p/c", b"/p/d"]), st.none() | st.binary(max_size=3))
    return st.lists(st.lists(op, min_size=1, max_size=3, unique_by=lambda o: o[0]), min_size=1, max_size=25)


def to_events(history: list[Revision], first_revision: int) -> list[kv_pb2.Event]:
    """etcd events for the history, revision ``first_revision`` onward, like etcd would keep them."""
    events = []
    for offset, ops in enumerate(history):
        revision = first_revision + offset
        for key, value in ops:
            if value is None:
                events.append(
                    kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue(key=key, mod_revision=revision))
                )
            else:
                kv = kv_pb2.KeyValue(
                    key=key, value=value, mod_revision=revision, create_revision=1, version=1
                )
                events.append(kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv))
    return events


def response(events: list[kv_pb2.Event], *, header: int, fragment: bool = False) -> rpc_pb2.WatchResponse:
    return rpc_pb2.WatchResponse(
        header=rpc_pb2.ResponseHeader(revision=header), watch_id=WATCH_ID, events=events, fragment=fragment
    )


def created(header: int) -> rpc_pb2.WatchResponse:
    return rpc_pb2.WatchResponse(
        header=rpc_pb2.ResponseHeader(revision=header), watch_id=WATCH_ID, created=True
    )


def expected(history: list[Revision], first_revision: int) -> list[tuple[int, str, EventType, bytes]]:
    out = []
    for offset, ops in enumerate(history):
        for key, value in ops:
            kind = EventType.DELETE if value is None else EventType.PUT
            out.append((first_revision + offset, key.decode(), kind, value or b""))
    return out


def seen(events: list[Event]) -> list[tuple[int, str, EventType, bytes]]:
    return [(e.revision, e.key, e.type, e.value) for e in events]


def test_created_then_events_emit_one_batch_per_revision() -> None:
    state = WatchState(b"/p/", 10, {})
    assert state.on_response(created(10)).kind is StepKind.CREATED
    events = to_events([[(b"/p/a", b"1"), (b"/p/b", b"2")], [(b"/p/a", None)]], 11)
    step = state.on_response(response(events, header=12))
    assert step.kind is StepKind.EMIT
    assert [[(e.revision, e.key) for e in batch] for batch in step.batches] == [
        [(11, "/p/a"), (11, "/p/b")],
        [(12, "/p/a")],
    ]
    assert step.batches[1][0].prev_value == b"1"
    assert state.delivered == 12
    assert state.resume_revision == 13


def test_catch_up_header_revision_does_not_advance_resume_point() -> None:
    # A catch-up response carries etcd's current revision (50) in its header, not the events' (11).
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(50))
    state.on_response(response(to_events([[(b"/p/a", b"1")]], 11), header=50))
    assert state.delivered == 11


def test_progress_notification_for_this_watcher_advances() -> None:
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    step = state.on_response(response([], header=30))
    assert step.kind is StepKind.PROGRESS
    assert state.delivered == 30


def test_broadcast_progress_answer_does_not_advance() -> None:
    # etcd < 3.5.8 answers a progress request with watch id -1 even while the watcher is replaying.
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    broadcast = rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(revision=99), watch_id=-1)
    assert state.on_response(broadcast).kind is StepKind.ANSWER  # it proves the endpoint is etcd
    assert state.delivered == 10


def test_progress_notification_through_an_untrusted_endpoint_does_not_advance() -> None:
    # etcd's gRPC proxy forwards etcd's notifications, but may have dropped revisions of this client.
    state = WatchState(b"/p/", 10, {}, trust_progress=False)
    state.on_response(created(10))
    step = state.on_response(response([], header=30))
    assert step.kind is StepKind.ALIVE and step.revision == 30
    assert state.delivered == 10
    state.on_response(response(to_events([[(b"/p/a", b"1")]], 31), header=31))
    assert state.delivered == 31  # events still advance it
    state.trust_progress = True
    assert state.on_response(response([], header=40)).kind is StepKind.PROGRESS
    assert state.delivered == 40


def test_notification_at_or_below_delivered_only_proves_the_stream_alive() -> None:
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    assert state.on_response(response([], header=10)).kind is StepKind.ALIVE
    assert state.delivered == 10


def test_responses_before_created_are_ignored() -> None:
    state = WatchState(b"/p/", 10, {})
    assert state.on_response(response([], header=99)).kind is StepKind.NOTHING
    assert state.delivered == 10


def test_fragments_are_joined_and_lost_fragments_discarded() -> None:
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    events = to_events([[(b"/p/a", b"1"), (b"/p/b", b"2"), (b"/p/c", b"3")]], 11)
    assert state.on_response(response(events[:1], header=11, fragment=True)).kind is StepKind.NOTHING
    state.stream_lost()  # the rest never arrives
    assert state.delivered == 10
    state.on_response(created(11))
    state.on_response(response(events[:2], header=11, fragment=True))
    step = state.on_response(response(events[2:], header=11))
    assert [e.key for e in step.batches[0]] == ["/p/a", "/p/b", "/p/c"]


def test_a_joined_revision_leaves_no_fragments_behind() -> None:
    """Kills a surviving mutant (make mutation): fragments kept after the join made the next
    notification a join of stale events, so it was neither progress nor proof of life."""
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    events = to_events([[(b"/p/a", b"1"), (b"/p/b", b"2")]], 11)
    state.on_response(response(events[:1], header=11, fragment=True))
    assert state.on_response(response(events[1:], header=11)).kind is StepKind.EMIT
    step = state.on_response(response([], header=20))
    assert (step.kind, state.delivered) == (StepKind.PROGRESS, 20)


def test_a_resync_drops_a_partial_fragment_sequence() -> None:
    """Kills a surviving mutant: a re-list starts over from the listing, so fragments received
    before it are never joined to what comes after (here: a revision read twice, once in part)."""
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    events = to_events([[(b"/p/a", b"1"), (b"/p/b", b"2")]], 12)
    state.on_response(response(events[:1], header=12, fragment=True))
    state.resync({}, 11)
    step = state.on_response(response(events, header=12))
    assert [e.key for e in step.batches[0]] == ["/p/a", "/p/b"]


def test_events_of_another_watch_id_on_the_stream_are_ignored() -> None:
    """Kills a surviving mutant: only this watcher's responses move it; a stale watcher's events
    (a cancelled watch, or the proxy's other watchers) on the same stream never do."""
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    other = response(to_events([[(b"/p/a", b"1")]], 11), header=11)
    other.watch_id = WATCH_ID + 1
    assert state.on_response(other).kind is StepKind.NOTHING
    assert (state.delivered, state.keys) == (10, {})


def test_compaction_asks_for_relist_and_resync_emits_difference() -> None:
    keys = {
        b"/p/a": (b"1", 5, 5, 1),
        b"/p/b": (b"2", 6, 6, 1),
        b"/p/c": (b"3", 7, 7, 1),
    }
    state = WatchState(b"/p/", 10, dict(keys))
    compacted = rpc_pb2.WatchResponse(watch_id=WATCH_ID, canceled=True, compact_revision=40, created=True)
    step = state.on_response(compacted)
    assert step.kind is StepKind.RELIST
    assert step.revision == 40
    listing = {
        b"/p/a": (b"1", 5, 5, 1),  # unchanged
        b"/p/b": (b"22", 45, 6, 2),  # changed
        b"/p/d": (b"4", 44, 44, 1),  # new
    }  # /p/c deleted
    batch = state.resync(listing, 50)
    assert [(e.type, e.key, e.value, e.prev_value, e.revision, e.resync) for e in batch] == [
        (EventType.PUT, "/p/b", b"22", b"2", 50, True),
        (EventType.DELETE, "/p/c", b"", b"3", 50, True),
        (EventType.PUT, "/p/d", b"4", None, 50, True),
    ]
    assert state.delivered == 50
    assert state.keys == listing


def test_created_below_delivered_asks_for_a_revision_check() -> None:
    state = WatchState(b"/p/", 100, {})
    assert state.on_response(created(3)).kind is StepKind.CHECK_REVISION


def test_server_cancel_is_reported_with_reason() -> None:
    state = WatchState(b"/p/", 10, {})
    canceled = rpc_pb2.WatchResponse(
        watch_id=WATCH_ID, canceled=True, cancel_reason="etcdserver: permission denied"
    )
    step = state.on_response(canceled)
    assert step.kind is StepKind.CANCELED
    assert "permission denied" in step.reason
    assert classify_cancel(step.reason) is Failure.PERMISSION
    assert classify_cancel("etcdserver: no leader") is Failure.OTHER


@settings(max_examples=300, deadline=None)
@given(history=history_strategy(), data=st.data())
def test_any_split_and_reconnect_pattern_delivers_history_exactly_once(
    history: list[Revision], data: st.DataObject
) -> None:
    """Whatever way etcd chunks the replay and wherever the stream breaks, the emitted sequence is the
    history, once, in order, one batch per revision."""
    first = 5
    all_events = to_events(history, first)
    last_revision = first + len(history) - 1
    state = WatchState(b"/p/", first - 1, {})
    emitted: list[Event] = []
    batches_seen: list[tuple[Event, ...]] = []
    for _ in range(60):
        if state.delivered >= last_revision:
            break
        # The server replays from the resume revision; it may include older revisions if it is buggy.
        replay_from = state.resume_revision - data.draw(st.integers(0, 1), label="overlap")
        remaining = [e for e in all_events if e.kv.mod_revision >= replay_from]
        state.on_response(created(last_revision + 3))
        position = 0
        while position < len(remaining):
            size = data.draw(st.integers(1, 4), label="chunk")
            chunk = remaining[position : position + size]
            position += size
            fragment = position < len(remaining) and data.draw(st.booleans(), label="fragment")
            # etcd only splits a revision across responses with fragment=true
            if not fragment and position < len(remaining):
                while (
                    position < len(remaining)
                    and remaining[position].kv.mod_revision == chunk[-1].kv.mod_revision
                ):
                    chunk.append(remaining[position])
                    position += 1
            step = state.on_response(response(chunk, header=last_revision + 3, fragment=fragment))
            if step.kind is StepKind.EMIT:
                for batch in step.batches:
                    batches_seen.append(batch)
                    emitted.extend(batch)
            if data.draw(st.integers(0, 5), label="break") == 0:
                state.stream_lost()
                break
    assert seen(emitted) == expected(history, first)
    assert [b[0].revision for b in batches_seen] == sorted({b[0].revision for b in batches_seen})
    assert all(len({e.revision for e in batch}) == 1 for batch in batches_seen)


@settings(max_examples=200, deadline=None)
@given(
    before=st.dictionaries(st.sampled_from([b"/p/a", b"/p/b", b"/p/c"]), st.binary(max_size=2)),
    after=st.dictionaries(st.sampled_from([b"/p/a", b"/p/b", b"/p/d"]), st.binary(max_size=2)),
)
def test_resync_difference_applied_to_old_state_gives_new_state(
    before: dict[bytes, bytes], after: dict[bytes, bytes]
) -> None:
    old = {k: (v, 3, 3, 1) for k, v in before.items()}
    new = {k: (v, 9 if before.get(k) != v else 3, 3, 1) for k, v in after.items()}
    state = WatchState(b"/p/", 5, dict(old))
    batch = state.resync(new, 20)
    materialized = {k.decode(): v for k, v in before.items()}
    for event in batch:
        assert event.resync and event.revision == 20
        if event.type is EventType.PUT:
            materialized[event.key] = event.value
        else:
            del materialized[event.key]
    assert materialized == {k.decode(): v for k, v in after.items()}
    assert len(batch) == sum(1 for k in before.keys() | after.keys() if before.get(k) != after.get(k))
