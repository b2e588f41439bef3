"""ManagedProcess: the lifecycle that etcd members and the etcd gRPC proxy share in tests.

A subclass starts its process (``start``); this gives it the rest, the same way for both: waiting
for a condition while watching for an early exit, the log's tail for error messages, kill, graceful
stop, restart on the same ports, a SIGSTOP freeze that returns only once the process really stopped,
and cleanup of its files.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import _ports, _tempdirs
from ._binary import kill_spawned, release
from ._binary import spawn as spawn_process

__all__ = ["ManagedProcess", "cleanup_all"]


@atexit.register
def cleanup_all() -> None:
    """Kill every process this interpreter started and still runs, remove the temp dirs it made,
    and release its port claims. Runs at exit; the pytest plugin also runs it on SIGTERM, whose
    default action skips ``atexit``. Takes no lock, so a signal handler may call it."""
    kill_spawned()
    _tempdirs.remove_all()
    _ports.release_all()


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (or gone). True where there is no ``/proc`` to ask."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in threads:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # that thread has exited
        if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
            return False
    return True


class ManagedProcess:
    """One test process with a log file and a data dir under a base dir; see the module docstring."""

    process: subprocess.Popen[bytes] | None
    #: Ports this object drew with ``free_port``: released (and their lock files removed) on cleanup.
    drawn_ports: list[int]
    log_file: Path
    data_dir: Path
    base_dir: Path
    _own_dir: bool
    _paused: bool

    @property
    def label(self) -> str:
        """What messages call it, e.g. ``etcd m0``."""
        raise NotImplementedError

    def args(self) -> list[str]:
        """The command line."""
        raise NotImplementedError

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> ManagedProcess:
        raise NotImplementedError

    def spawn(self) -> None:
        """Start the process without waiting for it to serve."""
        if self.running:
            raise RuntimeError(f"{self.label} is already running (pid {self.pid})")
        self.process = spawn_process(self.args(), self.log_file)
        self._paused = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """The process exists (it may be paused)."""
        return self.process is not None and self.process.poll() is None

    @property
    def paused(self) -> bool:
        return self.running and self._paused

    def _wait(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.process
            if proc is None:
                raise RuntimeError(f"{self.label} is not running")
            if proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {proc.returncode}:\n{self.log_tail()}")
            if condition():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.label} not {what} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            if sig is not signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        release(proc)
        self.process = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL and reap: a crash, with no chance to flush or say goodbye (peers see a reset)."""
        self._end(signal.SIGKILL, 10.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL if still running after ``timeout`` seconds."""
        self._end(signal.SIGTERM, timeout)

    def restart(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Kill if running, then start again on the same ports (and data dir)."""
        self.kill()
        self.start(wait=wait, timeout=timeout)

    def pause(self, timeout: float = 10.0) -> None:
        """SIGSTOP: the process freezes with its sockets open (no RST, nothing answered).

        Returns once every thread has stopped. ``kill()`` only starts a group stop: one thread must
        be scheduled to spread it, and until then the others go on serving (on a loaded machine,
        long enough to answer a request sent after this returned).
        """
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)
            self._paused = True
            deadline = time.monotonic() + timeout
            while not _all_threads_stopped(self.process.pid):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.label} did not stop within {timeout}s of SIGSTOP")
                time.sleep(0.002)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def cleanup(self) -> None:
        """Kill the process and remove its data (and the base dir, if this object made it)."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._own_dir:
            _tempdirs.remove(self.base_dir)
        self.release_ports()

    def release_ports(self) -> None:
        """Give back the ports this object drew (it will not run on them again)."""
        for port in self.drawn_ports:
            _ports.release(port)
        self.drawn_ports = []
