"""The layers of a LiveSettings: each prefix's keys, with that prefix's canary layer right above it.

A ``LiveSettings`` over ``["/shared/", "/myservice/"]`` follows four key sets, later ones overriding
earlier ones field by field: ``/shared/``, ``/aetcdcfg/canary/shared/``, ``/myservice/``,
``/aetcdcfg/canary/myservice/``. A canary layer's keys are a spec and an overlay (``_canary``): it
contributes its overlay only while the spec's selector matches this instance, and nothing otherwise.
Without canaries (``canary=False``, or a role that may not read them) the stack is the prefixes alone.

This module holds the layers' keys and reads them from etcd; ``live`` decides when, and validates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import anyio
from pydantic import BaseModel

from ._backoff import Backoff
from ._canary import canary_prefix, overlay_of
from ._exits import ExitStack
from ._fanout import Subscription, history_epoch
from ._log import Logger
from ._records import Identity
from .client import EtcdClient
from .errors import EtcdUnavailable, FutureRevision, PermissionDenied, RevisionCompacted
from .source import DecodedConfig, KeyDecoder

__all__ = ["Layer", "canaries_followed", "in_canary", "layers_of", "read_all", "read_at", "subscribe_all"]


@dataclass(eq=False)
class Layer:
    """One key set of a LiveSettings: its keys (relative to ``prefix``) and its subscription."""

    prefix: str
    decoder: KeyDecoder
    items: dict[str, bytes] = field(default_factory=dict)
    sub: Subscription | None = None
    #: The canary layer of ``of`` (its ``prefix`` is ``/aetcdcfg/canary`` + ``of``); None: a prefix.
    of: str | None = None
    #: Since when (``anyio.current_time()``) this layer has been off its watch (lagged, failed)
    #: and not yet back to the revision its watch had delivered; None while it follows.
    behind_since: float | None = None
    #: Its watch's history epoch when it last subscribed (see ``_fanout.history_epoch``).
    epoch: tuple[object, int] | None = None

    @property
    def canary(self) -> bool:
        return self.of is not None

    def relative(self, items: Mapping[str, bytes]) -> dict[str, bytes]:
        # {key[cut:]: value for ...} in C: 3.4 % of a 40,000-key start (callgrind), for one line.
        cut = itemgetter(slice(len(self.prefix), None))
        return dict(zip(map(cut, items), items.values(), strict=True))

    def effective(self, identity: Identity) -> tuple[str, dict[str, bytes]]:
        """(the prefix its keys are named under, the keys ``identity`` applies) of this layer."""
        if self.of is None:
            return self.prefix, self.items
        return self.prefix + "values/", overlay_of(self.items, identity)[0]

    def decode(self, identity: Identity, changed: Sequence[str] | None) -> tuple[str, DecodedConfig]:
        """(label, decoded) for validation. ``changed``: the full keys changed since the last decode
        (None: all), so that a prefix's fields are decoded again only where its keys changed; a
        canary layer's overlay (small, or empty) is decoded whole."""
        if self.of is not None:
            label, overlay = self.effective(identity)
            return label, self.decoder.decode(overlay)
        cut = len(self.prefix)
        mine = None if changed is None else [k[cut:] for k in changed if k.startswith(self.prefix)]
        return self.prefix, self.decoder.decode(self.items, mine)


def layers_of(model: type[BaseModel], prefixes: Sequence[str], *, canary: bool) -> list[Layer]:
    """The layers of ``prefixes``, lowest first; with ``canary`` each prefix's canary right above it."""
    layers = []
    for prefix in prefixes:
        layers.append(Layer(prefix, KeyDecoder(model)))
        if canary:
            layers.append(Layer(canary_prefix(prefix), KeyDecoder(model), of=prefix))
    return layers


def in_canary(layers: Sequence[Layer], identity: Identity) -> bool:
    """A canary is open on one of the prefixes and its selector matches ``identity``."""
    return any(overlay_of(layer.items, identity)[1] for layer in layers if layer.canary)


def canaries_followed(layers: Sequence[Layer]) -> tuple[str, ...]:
    """The config prefixes whose canary these layers follow."""
    return tuple(layer.of for layer in layers if layer.of is not None)


async def subscribe_all(stack: ExitStack, client: EtcdClient, layers: list[Layer], log: Logger) -> list[int]:
    """Subscribe to every layer with a snapshot (undone by ``stack``); each layer's revision listed.

    A canary layer the role may not read is dropped from ``layers`` (log ``fleet.canary_unreadable``):
    a role made before canaries existed runs without them rather than not at all.
    """
    revisions = []
    for layer in list(layers):
        try:
            sub = await stack.enter_async_context(client.watch(layer.prefix, with_snapshot=True))
        except PermissionDenied:
            if not layer.canary:
                raise
            log.warning("fleet.canary_unreadable", layer=layer.prefix)
            layers.remove(layer)
            continue
        assert sub.snapshot is not None
        layer.epoch = history_epoch(sub)  # from the listing on: a replaced history is noticed
        layer.sub = sub
        layer.items = layer.relative(sub.snapshot.items)
        revisions.append(sub.snapshot.revision)
    return revisions


async def read(
    client: EtcdClient, layer: Layer, revision: int | None, log: Logger
) -> tuple[int, dict[str, bytes]]:
    """(revision, ``layer``'s keys) as of ``revision`` or now, retried while etcd is unreachable; a
    canary layer the role may no longer read reads as empty (log ``fleet.canary_unreadable``)."""
    backoff = Backoff(initial=0.1, maximum=2.0)
    while True:
        try:
            snapshot = await client.get_prefix(layer.prefix, revision=revision)
        except PermissionDenied:
            if not layer.canary or revision is None:
                raise
            # Read access to the canaries taken away since start-up: no overlay, as a role without
            # it gets from the start, rather than every other layer's changes stalling on it.
            log.warning("fleet.canary_unreadable", layer=layer.prefix)
            return revision, {}
        except EtcdUnavailable as exc:
            log.warning("config.layer_read_retry", layer=layer.prefix, cause=str(exc))
            await anyio.sleep(backoff.next_delay())
            continue
        return snapshot.revision, layer.relative(snapshot.items)


async def read_at(client: EtcdClient, layer: Layer, revision: int, log: Logger) -> dict[str, bytes]:
    """``layer``'s keys as of ``revision``, retried while etcd is unreachable.

    Raises RevisionCompacted or FutureRevision when etcd no longer (or not yet) has ``revision``.
    """
    return (await read(client, layer, revision, log))[1]


async def read_all(
    client: EtcdClient, layers: Sequence[Layer], log: Logger
) -> tuple[int, dict[str, dict[str, bytes]]]:
    """Every layer's keys at one revision, the current one: (revision, {prefix: keys})."""
    while True:
        first = layers[0]
        revision, items = await read(client, first, None, log)
        states = {first.prefix: items}
        try:
            for other in layers[1:]:
                states[other.prefix] = await read_at(client, other, revision, log)
        except (RevisionCompacted, FutureRevision):
            continue  # compacted past it (or etcd replaced) between two reads: a newer one
        return revision, states
