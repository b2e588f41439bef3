"""The parts of WatchState's contract that mutation testing showed no test pinned (``make mutation``).

Every event carries what etcd sent (create revision, version, the previous value from the watch's own
copy of the prefix), and responses of a watcher that is gone never move ``delivered``.
"""

from __future__ import annotations

import pytest
from aetcd.rpc import kv_pb2, rpc_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from aetcdcfg import EventType
from aetcdcfg._resume import KeyState, StepKind, WatchState

from .test_resume import WATCH_ID, Revision, created, history_strategy, response

FIRST = 5


def etcd_history(
    history: list[Revision],
) -> tuple[list[kv_pb2.Event], list[tuple[object, ...]], dict[bytes, KeyState]]:
    """The events etcd keeps for ``history`` from revision FIRST (create revision and version as etcd
    keeps them: a delete's key-value holds only the key and the revision), what each emitted event
    must be (``(revision, key, type, value, prev_value, create_revision, version)``), and the prefix
    after the last revision."""
    keys: dict[bytes, KeyState] = {}
    raw, expected = [], []
    for offset, ops in enumerate(history):
        revision = FIRST + offset
        for key, value in ops:
            before = keys.get(key)
            prev = before[0] if before else None
            if value is None:
                kv = kv_pb2.KeyValue(key=key, mod_revision=revision)
                raw.append(kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv))
                expected.append((revision, key.decode(), EventType.DELETE, b"", prev, 0, 0))
                keys.pop(key, None)
            else:
                create, version = (before[2], before[3] + 1) if before else (revision, 1)
                kv = kv_pb2.KeyValue(
                    key=key, value=value, mod_revision=revision, create_revision=create, version=version
                )
                raw.append(kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv))
                expected.append((revision, key.decode(), EventType.PUT, value, prev, create, version))
                keys[key] = (value, revision, create, version)
    return raw, expected, keys


@settings(max_examples=200, deadline=None)
@given(history=history_strategy(), data=st.data())
def test_events_carry_etcd_fields_and_prev_value_through_any_reconnect(
    history: list[Revision], data: st.DataObject
) -> None:
    """Deletes included (a deleted key's previous value is gone, its create revision and version are 0),
    and afterwards the watch's copy of the prefix is the prefix, so a resync diffs against the truth."""
    raw, expected, prefix = etcd_history(history)
    last = FIRST + len(history) - 1
    state = WatchState(b"/p/", FIRST - 1, {})
    emitted = []
    while state.delivered < last:
        state.on_response(created(last))
        remaining = [e for e in raw if e.kv.mod_revision >= state.resume_revision]
        # one revision per response, or the whole rest split into fragments; the stream may break
        cut = data.draw(st.integers(1, len(remaining)), label="cut")
        fragments = data.draw(st.booleans(), label="fragments")
        if fragments:
            chunks = [remaining[:cut], remaining[cut:]]
        else:
            revision = remaining[0].kv.mod_revision
            chunks = [[e for e in remaining if e.kv.mod_revision == revision]]
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            fragment = fragments and i == 0 and bool(chunks[1])
            step = state.on_response(response(chunk, header=last, fragment=fragment))
            if step.kind is StepKind.EMIT:
                emitted.extend(e for batch in step.batches for e in batch)
        if data.draw(st.booleans(), label="break"):
            state.stream_lost()
    assert [
        (e.revision, e.key, e.type, e.value, e.prev_value, e.create_revision, e.version) for e in emitted
    ] == expected
    assert state.keys == prefix


def test_a_delete_then_a_put_again_has_no_previous_value() -> None:
    state = WatchState(b"/p/", 10, {b"/p/a": (b"1", 3, 3, 1)})
    state.on_response(created(10))
    delete = kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue(key=b"/p/a", mod_revision=11))
    put = kv_pb2.Event(
        type=kv_pb2.Event.PUT,
        kv=kv_pb2.KeyValue(key=b"/p/a", value=b"2", mod_revision=12, create_revision=12, version=1),
    )
    step = state.on_response(response([delete, put], header=12))
    (deleted,), (recreated,) = step.batches
    assert (deleted.type, deleted.prev_value, deleted.create_revision, deleted.version) == (
        EventType.DELETE,
        b"1",
        0,
        0,
    )
    assert (recreated.prev_value, recreated.create_revision, recreated.version) == (None, 12, 1)
    assert state.keys == {b"/p/a": (b"2", 12, 12, 1)}


@pytest.mark.parametrize(
    "ending",
    [
        rpc_pb2.WatchResponse(watch_id=WATCH_ID, canceled=True, cancel_reason="etcdserver: no leader"),
        rpc_pb2.WatchResponse(watch_id=WATCH_ID, canceled=True, compact_revision=8),
    ],
    ids=["canceled", "compacted"],
)
def test_a_canceled_watcher_neither_advances_nor_leaves_fragments(ending: rpc_pb2.WatchResponse) -> None:
    """After etcd cancels the watcher, a late progress notification with its id proves nothing, and
    the half-received revision is not glued to the replay of the next watcher."""
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    put = [
        kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv_pb2.KeyValue(key=k, value=b"v", mod_revision=11, version=1))
        for k in (b"/p/a", b"/p/b")
    ]
    state.on_response(response(put[:1], header=11, fragment=True))
    assert state.on_response(ending).kind in (StepKind.CANCELED, StepKind.RELIST)
    assert state.on_response(response([], header=30)).kind is StepKind.NOTHING
    assert state.delivered == 10
    state.on_response(created(11))
    state.on_response(response(put[:1], header=11, fragment=True))
    step = state.on_response(response(put[1:], header=11))
    assert [e.key for batch in step.batches for e in batch] == ["/p/a", "/p/b"]


def test_a_lost_stream_forgets_its_watcher() -> None:
    """Until the next stream's watcher is created, a response with the old id does not move
    ``delivered`` (etcd numbers watchers per stream, so the id comes back)."""
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    state.stream_lost()
    assert state.on_response(response([], header=30)).kind is StepKind.NOTHING
    assert state.delivered == 10


def test_a_progress_notification_never_moves_delivered_back() -> None:
    state = WatchState(b"/p/", 10, {})
    state.on_response(created(10))
    assert (
        state.on_response(response([], header=9)).kind is StepKind.ALIVE
    )  # it proves the stream alive, nothing more
    assert state.delivered == 10


def test_a_watch_without_keys_cannot_resync() -> None:
    """A private catch-up watch keeps no copy of the prefix: compaction is refused, not diffed."""
    private = WatchState(b"/p/", 10)
    assert not private.tracks_state
    assert WatchState(b"/p/", 10, {}).tracks_state
    with pytest.raises(RuntimeError, match="tracks the prefix"):
        private.resync({}, 20)
