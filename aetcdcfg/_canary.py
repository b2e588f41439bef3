"""Canaries, as data: a selector of instances, an overlay of values, and where they live in etcd.

Pure: no I/O. A canary of the config prefix ``/myservice/`` is a key set under
``/aetcdcfg/canary/myservice/``: ``spec`` (JSON: selector, base revision, id, who) and
``values/<key>`` (the overlay, keys relative to the prefix, as they would be written there). It is
written, promoted and aborted in single transactions, so no instance ever sees half of one. An
instance whose identity the selector matches reads base + overlay as one validated object per
revision; every other instance reads the base alone.

Selectors: labels (``zone=b``, ``zone=b,version=1.4``: all must match), ``instance=ID``, or a share
(``10%``: by a stable hash of the instance id, so the same instances are chosen every time).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._records import Identity, finite, parse_labels, strict_loads

__all__ = [
    "CANARY_ROOT",
    "CanarySpec",
    "Selector",
    "canary_prefix",
    "overlay_of",
    "share_bucket",
]

CANARY_ROOT = "/aetcdcfg/canary"
SPEC = "spec"
VALUES = "values/"


def canary_prefix(prefix: str) -> str:
    """Where the canary of config prefix ``prefix`` lives (``prefix`` ends with "/")."""
    return CANARY_ROOT + prefix


def share_bucket(instance: str) -> int:
    """0..99, stable for an instance id: ``N%`` selects the ids whose bucket is below N."""
    return int(hashlib.sha256(instance.encode()).hexdigest()[:8], 16) % 100


@dataclass(frozen=True, slots=True)
class Selector:
    """Which instances a canary applies to (exactly one of the three is set)."""

    labels: tuple[tuple[str, str], ...] = ()
    instance: str | None = None
    share: int | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``zone=b,version=1.4`` | ``instance=ID`` | ``N%``; ``ValueError`` says what is wrong."""
        text = text.strip()
        if text.endswith("%"):
            try:
                share = int(text[:-1])
            except ValueError:
                raise ValueError(f"selector {text!r}: a share is a whole percentage, e.g. 10%") from None
            if not 1 <= share <= 100:
                raise ValueError(f"selector {text!r}: a share is between 1% and 100%")
            return cls(share=share)
        labels = parse_labels(text)
        if not labels:
            raise ValueError("the selector is empty: use zone=b, instance=ID or 10%")
        if "instance" in labels:
            if len(labels) > 1:
                raise ValueError(f"selector {text!r}: instance=ID selects one instance, alone")
            return cls(instance=labels["instance"])
        return cls(labels=tuple(sorted(labels.items())))

    def matches(self, identity: Identity) -> bool:
        if self.share is not None:
            return share_bucket(identity.instance) < self.share
        if self.instance is not None:
            return identity.instance == self.instance
        return all(identity.labels.get(name) == value for name, value in self.labels)

    def __str__(self) -> str:
        if self.share is not None:
            return f"{self.share}%"
        if self.instance is not None:
            return f"instance={self.instance}"
        return ",".join(f"{k}={v}" for k, v in self.labels)


@dataclass(frozen=True, slots=True)
class CanarySpec:
    """The ``spec`` key of a canary: whom it selects and which state of the prefix it overlays."""

    selector: Selector
    base_revision: int
    keys: tuple[str, ...]
    user: str
    created_at: float

    def to_json(self) -> bytes:
        data = {
            "selector": str(self.selector),
            "base_revision": self.base_revision,
            "keys": list(self.keys),
            "user": self.user,
            "created_at": round(self.created_at, 3),
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CanarySpec:
        try:
            data: dict[str, Any] = strict_loads(raw)  # no NaN/Infinity: an int(inf) would escape
            return cls(
                selector=Selector.parse(str(data["selector"])),
                base_revision=int(data["base_revision"]),
                keys=tuple(str(k) for k in data.get("keys") or ()),
                user=str(data.get("user", "")),
                created_at=finite(data.get("created_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"not a canary spec: {exc!r}") from None


def overlay_of(items: Mapping[str, bytes], identity: Identity) -> tuple[dict[str, bytes], bool]:
    """(the overlay this instance applies, whether it is in the canary) from a canary's keys
    (relative to its canary prefix). Not selected, or no valid spec: an empty overlay."""
    raw = items.get(SPEC)
    if raw is None:
        return {}, False
    try:
        spec = CanarySpec.from_json(raw)
    except ValueError:
        return {}, False
    if not spec.selector.matches(identity):
        return {}, False
    cut = len(VALUES)
    return {key[cut:]: value for key, value in items.items() if key.startswith(VALUES)}, True
