"""The one place that reads gRPC errors: classify them for retry decisions and map them to ours."""

from __future__ import annotations

import enum

import grpc

from .errors import AuthenticationFailed, EtcdError, PermissionDenied, RequestTooLarge

__all__ = ["Failure", "classify", "to_error"]


class Failure(enum.Enum):
    """What a failed etcd call means for retrying it."""

    AUTH_EXPIRED = "auth_expired"  # token unknown to the member or expired: authenticate again
    AUTH_FAILED = "auth_failed"  # credentials wrong or missing: retrying cannot help
    PERMISSION = "permission"  # the role does not cover the key
    TOO_LARGE = "too_large"
    NOT_APPLIED = "not_applied"  # refused before it could take effect: safe to retry anywhere
    TRANSPORT = "transport"  # connection-level failure: the request may or may not have taken effect
    OTHER = "other"


_NOT_APPLIED_DETAILS = (
    "no leader",
    "too many requests",
    "not capable",
    "failed to connect to all addresses",
    "connection refused",
    "leader changed",
)


def classify(exc: grpc.aio.AioRpcError) -> Failure:
    """Decide what a gRPC error from etcd means for the request that got it."""
    code = exc.code()
    details = (exc.details() or "").lower()
    if "invalid auth token" in details or "auth token is expired" in details:
        return Failure.AUTH_EXPIRED
    if (
        "authentication failed" in details
        or "user name is empty" in details
        or "user name not found" in details
        or "invalid auth management" in details
    ):
        return Failure.AUTH_FAILED
    if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
        return Failure.PERMISSION
    if (
        "request is too large" in details
        or "too many operations in txn" in details
        or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details)
    ):
        return Failure.TOO_LARGE
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
    return EtcdError(f"etcd request failed: {cause}", endpoint=endpoint)
