"""Key bytes: the str/bytes conversions and prefix ranges every layer shares."""

from __future__ import annotations

__all__ = ["KeyLike", "as_bytes", "decode_key", "prefix_range_end"]

KeyLike = str | bytes


def as_bytes(value: KeyLike) -> bytes:
    """Keys and values are bytes on the wire; ``str`` is encoded as UTF-8."""
    return value.encode() if isinstance(value, str) else value


def decode_key(key: bytes) -> str:
    """Keys become ``str``; bytes that are not UTF-8 survive the round trip via surrogateescape."""
    return key.decode("utf-8", "surrogateescape")


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
