"""Temp dirs of test processes (members, clusters, proxies): made, marked as this process's, removed.

A dir holds ``.owner.lock``, ``flock``-ed by the process that made it for as long as it is that
process's. The process removes its dirs when done with them and at exit (``atexit``, or the pytest
plugin's SIGTERM handler). A SIGKILL leaves the dir (a member's is ~123 MiB: etcd preallocates its
WAL) with a lock nobody holds: the next process that makes a dir removes it. A dir without the file
(made by an older version, or not by us) is left alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["PREFIXES", "make", "remove", "remove_all"]

#: Name prefixes of the dirs made here, directly under the system's temp dir.
PREFIXES = ("aetcdcfg-etcd-", "aetcdcfg-cluster-", "aetcdcfg-grpcproxy-")
_OWNER = ".owner.lock"
#: This process's dirs and the descriptors holding their locks (-1: no lock to hold).
_OWNED: dict[Path, int] = {}
_swept = False


def _lock(path: Path, *, create: bool) -> int | None:
    """An open descriptor holding the exclusive lock on ``path``, or None if it is held elsewhere."""
    import fcntl

    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _sweep(root: Path) -> None:
    """Remove the dirs of processes that died without cleaning up; once per process."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIXES):
            continue
        directory = root / name
        try:
            fd = _lock(directory / _OWNER, create=False)
        except OSError:
            continue  # no owner file (not ours to judge), or not ours to open
        if fd is None:
            continue  # its process still holds it
        try:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(fd)


def make(prefix: str) -> Path:
    """A new dir ``<temp dir>/<prefix>…``, this process's until :func:`remove` or exit."""
    if not prefix.startswith(PREFIXES):
        raise ValueError(f"temp dir prefix must be one of {PREFIXES}, got {prefix!r}")
    root = Path(tempfile.gettempdir())
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX: removed at exit only
        _OWNED[directory] = -1
        return directory
    _sweep(root)
    # Locked under another name, then renamed: a sweeper never finds the owner file unheld.
    staging = directory / f"{_OWNER}.{os.getpid()}"
    fd = _lock(staging, create=True)
    assert fd is not None  # a file just made, in a dir just made: nobody else can hold it
    staging.rename(directory / _OWNER)
    _OWNED[directory] = fd
    return directory


def remove(directory: Path) -> None:
    """Remove a dir :func:`make` made here (giving up its lock); any other path is left alone."""
    fd = _OWNED.pop(directory, None)
    if fd is None:
        return
    try:
        shutil.rmtree(directory, ignore_errors=True)
    finally:
        if fd >= 0:
            os.close(fd)


def remove_all() -> None:
    """Remove every dir this process made. Takes no lock, so a signal handler may call it."""
    for directory in list(_OWNED):
        remove(directory)
