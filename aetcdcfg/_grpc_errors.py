"""The one place that reads gRPC errors: classify them for retry decisions and map them to ours."""

from __future__ import annotations

import asyncio
import enum
import sys

import anyio.lowlevel
import grpc

from .errors import AuthenticationFailed, EtcdError, PermissionDenied, RequestTooLarge

__all__ = [
    "CompactedRead",
    "Failure",
    "FutureRead",
    "LeaseNotFound",
    "classify",
    "classify_cancel",
    "describe",
    "is_stray_cancel",
    "own_cancellation",
    "to_error",
]


class Failure(enum.Enum):
    """What a failed etcd call means for retrying it."""

    AUTH_EXPIRED = "auth_expired"  # token unknown to the member or expired: authenticate again
    AUTH_FAILED = "auth_failed"  # credentials wrong or missing: retrying cannot help
    AUTH_DISABLED = "auth_disabled"  # Authenticate on an etcd with auth off: go on without a token
    PERMISSION = "permission"  # the role does not cover the key
    TOO_LARGE = "too_large"
    COMPACTED = "compacted"  # a read at a revision etcd has compacted away
    FUTURE_REVISION = "future_revision"  # a read at a revision etcd has not reached
    LEASE_NOT_FOUND = "lease_not_found"  # a put bound to a lease that expired (or a wiped etcd)
    NOT_APPLIED = "not_applied"  # refused before it could take effect: safe to retry anywhere
    TRANSPORT = "transport"  # connection-level failure: the request may or may not have taken effect
    OTHER = "other"


#: etcd's words for a role that does not cover a key, in an error and in a watch's cancel reason.
_PERMISSION_DENIED = "permission denied"

_NOT_APPLIED_DETAILS = (
    "no leader",
    "too many requests",
    "not capable",
    "failed to connect to all addresses",
    "connection refused",
    "leader changed",
)


class CompactedRead(EtcdError):
    """A read at a revision below etcd's compact revision. etcd does not say where that is, so the
    reads layer finds out and raises :class:`~aetcdcfg.errors.RevisionCompacted` to users."""


class LeaseNotFound(EtcdError):
    """A put or keepalive named a lease etcd does not hold (expired, revoked, or etcd was wiped):
    the fleet reporter grants a new one and writes its records again."""


class FutureRead(EtcdError):
    """A read at a revision etcd has not reached; users get :class:`~aetcdcfg.errors.FutureRevision`."""


def classify(exc: grpc.aio.AioRpcError) -> Failure:
    """Decide what a gRPC error from etcd means for the request that got it."""
    code = exc.code()
    details = (exc.details() or "").lower()
    if "authentication is not enabled" in details:
        return Failure.AUTH_DISABLED
    if "invalid auth token" in details or "auth token is expired" in details:
        return Failure.AUTH_EXPIRED
    if (
        "authentication failed" in details
        or "user name is empty" in details
        or "user name not found" in details
        or "invalid auth management" in details
    ):
        return Failure.AUTH_FAILED
    if code == grpc.StatusCode.PERMISSION_DENIED or _PERMISSION_DENIED in details:
        return Failure.PERMISSION
    if (
        "request is too large" in details
        or "too many operations in txn" in details
        or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details)
    ):
        return Failure.TOO_LARGE
    if code == grpc.StatusCode.OUT_OF_RANGE:
        if "has been compacted" in details:
            return Failure.COMPACTED
        if "future revision" in details:
            return Failure.FUTURE_REVISION
    if "requested lease not found" in details:  # NOT_FOUND from etcd, UNKNOWN through its gRPC proxy
        return Failure.LEASE_NOT_FOUND
    if any(text in details for text in _NOT_APPLIED_DETAILS):
        return Failure.NOT_APPLIED
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    ):
        return Failure.TRANSPORT
    return Failure.OTHER


def classify_cancel(reason: str) -> Failure:
    """What etcd's reason for canceling a watch means: ``PERMISSION`` (etcd 3.5 also gives it when
    the stream's token expired) or ``OTHER``. A compacted start revision is not read from the text:
    etcd sets the response's ``compact_revision`` for it."""
    if _PERMISSION_DENIED in reason.lower():
        return Failure.PERMISSION
    return Failure.OTHER


def describe(exc: grpc.aio.AioRpcError) -> str:
    """A short cause for messages and logs: the status code and etcd's text."""
    return f"{exc.code().name}: {exc.details() or 'no details'}"


def to_error(exc: grpc.aio.AioRpcError, *, endpoint: str, key: str | None = None) -> EtcdError:
    """The aetcdcfg error for a gRPC error that retrying will not fix."""
    kind = classify(exc)
    cause = describe(exc)
    if kind is Failure.AUTH_FAILED:
        return AuthenticationFailed(
            f"etcd rejected the credentials ({cause}); check username/password (ETCD_USERNAME, "
            "ETCD_PASSWORD)",
            endpoint=endpoint,
        )
    if kind is Failure.PERMISSION:
        return PermissionDenied(
            "the etcd user's role does not permit this on", key=key or "(unknown key)", endpoint=endpoint
        )
    if kind is Failure.TOO_LARGE:
        what = f" for key {key!r}" if key else ""
        return RequestTooLarge(
            f"request{what} is larger than etcd accepts ({cause}); etcd's --max-request-bytes "
            "is 1.5 MiB and --max-txn-ops 128 by default",
            endpoint=endpoint,
        )
    if kind is Failure.COMPACTED:
        return CompactedRead(f"etcd compacted the revision asked for ({cause})", endpoint=endpoint)
    if kind is Failure.FUTURE_REVISION:
        return FutureRead(f"etcd has not reached the revision asked for ({cause})", endpoint=endpoint)
    if kind is Failure.LEASE_NOT_FOUND:
        return LeaseNotFound(f"etcd does not hold the lease ({cause})", endpoint=endpoint)
    return EtcdError(f"etcd request failed: {cause}", endpoint=endpoint)


def is_stray_cancel(*, channel_closed: bool) -> bool:
    """Whether a ``CancelledError`` out of a grpc.aio call is grpc's own, not this task's cancellation.

    grpc.aio cancels every call on a channel being closed and raises a bare ``CancelledError`` in
    the awaiting task, which nobody cancelled; let through, it would end the caller's work as if
    cancelled (anyio takes a stray cancellation for the caller's own). Python 3.11+ counts the
    cancellations requested of a task, which settles it; 3.10 does not, so there only a call whose
    channel we closed counts as cut off (a real cancellation at the same moment is then reported as
    the error, not as a cancellation).
    """
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return channel_closed  # pragma: no cover - Python 3.10


async def own_cancellation() -> None:
    """Before re-raising a real cancellation that came out of a grpc.aio call: let anyio raise its own.

    grpc.aio swallows the ``CancelledError`` anyio threw into the call and raises a new, bare one.
    anyio's cancel scope does not recognise that one as its own (it looks for its message), so it
    would leave the scope uncaught, a stray cancellation: ``move_on_after`` around a call raised
    ``CancelledError`` instead of returning, and a session's watchdog ending its task group during a
    read took down the client's task group. With the scope still cancelled, this checkpoint raises
    anyio's own cancellation in place of grpc's; a plain ``task.cancel()`` is left as it is.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
