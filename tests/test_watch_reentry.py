"""Watches of several prefixes opened and closed again and again on one client (as a layered
LiveSettings, or one with its canary layer, does at every start) never cancel their caller."""

from __future__ import annotations

import anyio
import pytest
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio


class S(BaseSettings):
    rate_limit: int = 1


async def test_nested_watches_of_two_prefixes_open_and_close_repeatedly(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "a/k", "v")
        with anyio.fail_after(20):
            for _ in range(10):
                async with (
                    client.watch(etcd_prefix + "a/", with_snapshot=True) as first,
                    client.watch(etcd_prefix + "b/", with_snapshot=True),
                ):
                    assert first.snapshot is not None and len(first.snapshot.items) == 1


async def test_a_layered_live_settings_starts_again_and_again_on_one_client(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "b/rate_limit", "7")
        with anyio.fail_after(20):
            for _ in range(10):
                async with LiveSettings(
                    S, prefix=[etcd_prefix + "a/", etcd_prefix + "b/"], client=client
                ) as live:
                    assert live.current.rate_limit == 7
