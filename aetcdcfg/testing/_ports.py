"""Loopback ports for test processes: drawn once, claimed machine-wide, and given back.

Binding only shows that a port is free now: a member that is down (killed, or held down for an
outage test) leaves its ports unbound, and another test process on the same machine could draw one
of them, so that the member could not be restarted on its own URLs. So each port drawn is also
claimed with an exclusive ``flock`` on ``<tmp>/aetcdcfg-ports/<port>.lock``, held while this process
needs the port. A claim ends with :func:`release` (its file removed while still locked), with the
process's cleanup (``atexit``, or the pytest plugin's SIGTERM handler), or, after a SIGKILL, with
the process; the file such a process leaves is swept by the next process that draws a port.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import threading
from pathlib import Path

__all__ = ["PORT_CLAIMS", "free_port", "release", "release_all"]

_PORT_LOCK = threading.Lock()
_PORTS_GIVEN: set[int] = set()
#: Lock files through which test processes on one machine hand out each port to only one of them.
PORT_CLAIMS = Path(tempfile.gettempdir()) / "aetcdcfg-ports"
#: Open descriptors holding this process's claims; the kernel drops the locks when the process ends.
_CLAIMED: dict[int, int] = {}
_swept = False


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _still_named(fd: int, path: Path) -> bool:
    """``fd`` is the file ``path`` names now: a lock taken on a file its holder removed meanwhile
    (released, or swept) would claim nothing."""
    try:
        mine, named = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _lock(path: Path, create: bool) -> int | None:
    """An open descriptor holding the exclusive lock on ``path``, or None if it is held elsewhere."""
    import fcntl

    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not _still_named(fd, path):
        os.close(fd)
        return None
    return fd


def _sweep() -> None:
    """Remove the lock files nobody holds (left by processes that were killed, or by versions that
    never removed them); once per process, before its first claim."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        names = os.listdir(PORT_CLAIMS)
    except OSError:
        return
    for name in names:
        if not name.endswith(".lock"):
            continue
        path = PORT_CLAIMS / name
        try:
            fd = _lock(path, create=False)
        except OSError:
            continue
        if fd is not None:  # unheld: remove it while holding the lock, so nobody claims it meanwhile
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)


def _claim(port: int) -> bool:
    """Claim ``port`` for as long as this process needs it, against other processes that use
    :func:`free_port`. Always True where ``fcntl`` is missing or the lock directory cannot be used
    (the bind check alone)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        PORT_CLAIMS.mkdir(mode=0o777, exist_ok=True)
        _sweep()
        fd = _lock(PORT_CLAIMS / f"{port}.lock", create=True)
    except OSError:
        return True
    if fd is None:
        return False
    _CLAIMED[port] = fd
    return True


def release(port: int) -> None:
    """End this process's claim on ``port`` and remove its lock file (removed while still locked,
    so no other process can lock that file in between and believe it holds the port)."""
    fd = _CLAIMED.pop(port, None)
    if fd is None:
        return
    try:
        (PORT_CLAIMS / f"{port}.lock").unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


def release_all() -> None:
    """Release every claim of this process (at exit). Takes no lock: a signal handler calls it."""
    for port in list(_CLAIMED):
        release(port)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, never handed out twice by this process nor
    by any other process using this function on the same machine while this one holds its claim.

    Drawn below the kernel's ephemeral range rather than by binding port 0: ports from that range
    are also used as source ports of outgoing connections, so a member restarted on "its" port can
    find it taken by a client socket (or a client retrying the dead port connects to itself).
    """
    ceiling = min(_ephemeral_floor(), 32768)
    with _PORT_LOCK:
        for _ in range(100 if ceiling > 21000 else 0):
            port = random.randrange(20000, ceiling)
            if port in _PORTS_GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            if not _claim(port):
                continue
            _PORTS_GIVEN.add(port)
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        _PORTS_GIVEN.add(port)
        return port
