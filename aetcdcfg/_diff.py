"""Differences between two states of a prefix, and the history built from them: pure values.

``ConfigDiff`` is what ``diff``, ``history`` and ``rollback`` share: computed from two snapshots
with no I/O, applied (as puts and deletes) by the KV layer in one guarded transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .events import Snapshot

__all__ = ["ConfigDiff", "History", "HistoryEntry"]


def _empty() -> Mapping[str, bytes]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """How the keys under a prefix differ from ``old_revision`` to ``new_revision``.

    ``added`` maps each new key to its value, ``changed`` each changed key to ``(old, new)``, and
    ``removed`` each vanished key to its last value. Keys are full etcd keys, in sorted order. The
    repr shows keys only: values may be secrets (mask them with the model, as the CLI does).
    Applying the diff to the old state gives the new one: :attr:`puts` and :attr:`deletes`.
    """

    old_revision: int
    new_revision: int
    added: Mapping[str, bytes] = field(default_factory=_empty)
    changed: Mapping[str, tuple[bytes, bytes]] = field(default_factory=lambda: MappingProxyType({}))
    removed: Mapping[str, bytes] = field(default_factory=_empty)

    @classmethod
    def between(cls, old: Snapshot, new: Snapshot) -> ConfigDiff:
        """The difference that turns ``old`` into ``new`` (two snapshots of the same prefix)."""
        before, after = old.items, new.items
        added = {k: after[k] for k in sorted(after) if k not in before}
        changed = {k: (before[k], after[k]) for k in sorted(after) if k in before and before[k] != after[k]}
        removed = {k: before[k] for k in sorted(before) if k not in after}
        return cls(
            old_revision=old.revision,
            new_revision=new.revision,
            added=MappingProxyType(added),
            changed=MappingProxyType(changed),
            removed=MappingProxyType(removed),
        )

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    @property
    def keys(self) -> list[str]:
        """Every key the diff touches, sorted."""
        return sorted([*self.added, *self.changed, *self.removed])

    @property
    def puts(self) -> dict[str, bytes]:
        """The writes that turn the old state into the new one (added and changed keys)."""
        return {**self.added, **{k: new for k, (_, new) in self.changed.items()}}

    @property
    def deletes(self) -> list[str]:
        """The deletes that turn the old state into the new one (removed keys)."""
        return list(self.removed)

    def __repr__(self) -> str:
        return (
            f"ConfigDiff({self.old_revision} -> {self.new_revision}: +{len(self.added)} "
            f"~{len(self.changed)} -{len(self.removed)})"
        )


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One revision that changed the prefix: ``diff`` is from the revision before it to it.

    ``rewritten`` lists keys written at this revision with the value they already had (a put
    creates a revision even when the value is the same). etcd does not record when a revision was
    committed, so there is no time here.
    """

    revision: int
    diff: ConfigDiff
    rewritten: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"HistoryEntry({self.revision}, {self.diff!r})"


@dataclass(frozen=True, slots=True)
class History:
    """The recent revisions that changed a prefix, newest first, as etcd's MVCC history holds them.

    ``revision`` is where the scan started (etcd's revision when it began) and ``scanned_from`` the
    oldest revision whose change was checked: every change to the prefix in
    ``[scanned_from, revision]`` is in ``entries`` unless ``limit`` stopped the scan first.
    ``compact_revision`` is set when etcd's compaction ended the scan (older history is gone).
    """

    prefix: str
    revision: int
    scanned_from: int
    entries: tuple[HistoryEntry, ...]
    compact_revision: int | None = None

    def __repr__(self) -> str:
        return (
            f"History({self.prefix!r}, revisions {self.scanned_from}..{self.revision}: "
            f"{len(self.entries)} changes)"
        )
