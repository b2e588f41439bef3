"""Exponential backoff with jitter, as plain state so it is testable without sleeping."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays that double from ``initial`` up to ``maximum``, each randomised by ±``jitter``."""

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.3
    _next: float = field(init=False, default=0.0)
    _rng: random.Random = field(init=False, default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        """The delay to sleep now; the one after it grows."""
        base = self._next
        self._next = min(self._next * self.multiplier, self.maximum)
        return base * (1.0 + self._rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self._next = self.initial
