"""The one exception tree of aetcdcfg.

Every error the public API raises derives from :class:`AetcdcfgError`; no raw ``grpc`` error escapes::

    AetcdcfgError
    ├── ConfigurationError      bad client settings (endpoints, TLS files, ...); names the setting
    ├── ClientClosedError       the EtcdClient is not open (use ``async with``) or was closed
    ├── EtcdError               an etcd request failed
    │   ├── EtcdUnavailable     no endpoint answered in time; lists endpoints tried and the last cause
    │   ├── AuthenticationFailed    wrong user name or password (retrying cannot fix it)
    │   ├── PermissionDenied    the user's etcd role does not cover the key or prefix
    │   ├── RequestTooLarge     over etcd's ``--max-request-bytes`` or ``--max-txn-ops``
    │   ├── RevisionCompacted   a watch or read asked for history etcd has compacted away
    │   ├── FutureRevision      a read asked for a revision etcd has not reached yet
    │   └── TxnConflict         a guarded write found that etcd changed since it was read
    ├── SubscriberLagged        a watch subscriber fell behind its buffer; resume from ``resume_revision``
    ├── ConfigRejected          a settings change failed validation; the last good settings stay
    ├── CanaryRefused           a canary cannot be opened/promoted/aborted as asked; nothing written
    └── SettingsClosed          a LiveSettings closed while ``wait_for()`` waited: no change will come

Messages never contain passwords, tokens or secret values.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AetcdcfgError",
    "AuthenticationFailed",
    "CanaryRefused",
    "ClientClosedError",
    "ConfigRejected",
    "ConfigurationError",
    "EtcdError",
    "EtcdUnavailable",
    "FutureRevision",
    "PermissionDenied",
    "RequestTooLarge",
    "RevisionCompacted",
    "SettingsClosed",
    "SubscriberLagged",
    "TxnConflict",
]


class AetcdcfgError(Exception):
    """Root of every error aetcdcfg raises."""


class ConfigurationError(AetcdcfgError, ValueError):
    """The client's settings cannot work; ``setting`` names the field to fix."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


class ClientClosedError(AetcdcfgError, RuntimeError):
    """The client is not open: enter it with ``async with EtcdClient(...)`` first."""


class EtcdError(AetcdcfgError):
    """An etcd request failed; ``endpoint`` is the member that answered, when known."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        super().__init__(message if endpoint is None else f"{message} (endpoint {endpoint})")


class EtcdUnavailable(EtcdError):
    """No endpoint could serve the request before its deadline."""

    def __init__(self, message: str, *, endpoints: Sequence[str], cause: str | None = None) -> None:
        self.endpoints = tuple(endpoints)
        self.cause = cause
        text = f"{message}; endpoints tried: {', '.join(self.endpoints) or '(none)'}"
        if cause:
            text += f"; last cause: {cause}"
        super().__init__(text)


class AuthenticationFailed(EtcdError):
    """etcd refused the user name or password (or auth is needed and none was given)."""


class PermissionDenied(EtcdError):
    """The authenticated user may not read or write the key range; ``key`` names it."""

    def __init__(self, message: str, *, key: str | None = None, endpoint: str | None = None) -> None:
        self.key = key
        super().__init__(message if key is None else f"{message}: {key!r}", endpoint=endpoint)


class RequestTooLarge(EtcdError):
    """The request exceeds etcd's ``--max-request-bytes`` (1.5 MiB) or ``--max-txn-ops`` (128) limit."""


class RevisionCompacted(EtcdError):
    """History from ``requested_revision`` is gone; etcd compacted it up to ``compact_revision``.

    A watch can start at ``compact_revision + 1`` at the earliest; a read (``get_prefix(revision=R)``,
    ``diff``, ``rollback``) can use ``compact_revision`` itself, the oldest state etcd still holds.
    ``operation`` says what was asked: ``"watch"`` (the default) or a read.
    """

    def __init__(
        self, *, prefix: str, requested_revision: int, compact_revision: int, operation: str = "watch"
    ) -> None:
        self.prefix = prefix
        self.requested_revision = requested_revision
        self.compact_revision = compact_revision
        self.operation = operation
        if operation == "watch":
            text = (
                f"watch of {prefix!r} from revision {requested_revision} is impossible: etcd compacted "
                f"history up to revision {compact_revision}; re-read the prefix with get_prefix()"
            )
        else:
            text = (
                f"{operation} of {prefix!r} at revision {requested_revision} is impossible: etcd keeps "
                f"history only until compaction, and it compacted up to revision {compact_revision}; "
                f"pick a revision >= {compact_revision}"
            )
        super().__init__(text)


class HistoryReplaced(RevisionCompacted):
    """etcd's history was replaced (the cluster wiped, or restored from a backup) while a watch was
    still replaying the old one from ``requested_revision``: re-read the prefix (``with_snapshot``).

    Revisions of the new history start again below the old ones; ``compact_revision`` is the new
    history's revision when this was found, from which reads and watches work.
    """

    def __init__(self, *, prefix: str, requested_revision: int, compact_revision: int) -> None:
        self.prefix = prefix
        self.requested_revision = requested_revision
        self.compact_revision = compact_revision
        self.operation = "watch"
        EtcdError.__init__(  # RevisionCompacted's own message would say "compacted"
            self,
            f"watch of {prefix!r} from revision {requested_revision} is impossible: etcd's history was "
            f"replaced (the cluster wiped or restored) and is now at revision {compact_revision}; "
            "re-read the prefix with get_prefix() or watch(with_snapshot=True)",
        )


class FutureRevision(EtcdError, ValueError):
    """A read asked for ``requested_revision``, but etcd is only at ``current_revision``."""

    def __init__(self, *, prefix: str, requested_revision: int, current_revision: int) -> None:
        self.prefix = prefix
        self.requested_revision = requested_revision
        self.current_revision = current_revision
        super().__init__(
            f"revision {requested_revision} of {prefix!r} does not exist yet: etcd is at revision "
            f"{current_revision}; pick a revision <= {current_revision}"
        )


class TxnConflict(EtcdError):
    """A write guarded by a revision found that the prefix changed after it was read."""

    def __init__(self, *, prefix: str, expected_revision: int) -> None:
        self.prefix = prefix
        self.expected_revision = expected_revision
        super().__init__(
            f"{prefix!r} changed after revision {expected_revision}; nothing was written, read it again"
        )


class SubscriberLagged(AetcdcfgError):
    """A subscriber's buffer overflowed; every event before ``resume_revision`` was delivered to it.

    Resume gap-free with ``client.watch(prefix, start_revision=exc.resume_revision)``. If what
    overflowed was a re-list (``resync``) of a revision already delivered, ``resume_revision`` is
    that revision: the resume hands it over again, its plain events too, while the shared watch
    still remembers the re-list, and only etcd's plain history after that. A consumer that tracks
    state should then re-read (``with_snapshot=True``), as ``LiveSettings`` does.
    """

    def __init__(self, *, prefix: str, resume_revision: int, buffer_size: int) -> None:
        self.prefix = prefix
        self.resume_revision = resume_revision
        self.buffer_size = buffer_size
        super().__init__(
            f"subscriber of {prefix!r} fell more than {buffer_size} revisions behind; "
            f"resume with start_revision={resume_revision}"
        )


class ConfigRejected(AetcdcfgError, ValueError):
    """A settings change from etcd failed validation and was not applied.

    ``keys`` are the etcd keys involved, ``problems`` one line each (never the secret values), ``revision``
    the etcd revision that was rejected.
    """

    def __init__(self, *, prefix: str, revision: int, keys: Sequence[str], problems: Sequence[str]) -> None:
        self.prefix = prefix
        self.revision = revision
        self.keys = tuple(keys)
        self.problems = tuple(problems)
        lines = "; ".join(self.problems)
        super().__init__(f"config under {prefix!r} at revision {revision} rejected: {lines}")


class CanaryRefused(AetcdcfgError, ValueError):
    """A canary of ``prefix`` was refused, nothing written: ``reason`` is ``"no_match"`` (its
    selector matches no live instance that follows canaries), ``"open"`` (another canary is open:
    ``open_selector`` names it) or ``"none"`` (no canary is open to promote or abort)."""

    def __init__(self, message: str, *, prefix: str, reason: str, open_selector: str | None = None) -> None:
        self.prefix = prefix
        self.reason = reason
        self.open_selector = open_selector
        super().__init__(f"{message}; nothing was written")


class SettingsClosed(AetcdcfgError, RuntimeError):
    """The LiveSettings was closed (its ``async with`` ended): it will apply no further change.

    ``wait_for()`` raises it instead of waiting forever; ``updates()`` simply ends. ``prefix`` names
    the LiveSettings (its last layer).
    """

    def __init__(self, *, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(
            f"LiveSettings for {prefix!r} is closed: no further settings will be applied "
            "(wait inside its `async with`)"
        )
