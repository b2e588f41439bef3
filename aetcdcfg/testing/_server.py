"""Real etcd processes for tests and demos: one member, a single-member server, or a cluster.

Synchronous on purpose (subprocess + polling), so session fixtures, benchmarks and scripts can use
them from any thread or event loop. Everything binds to 127.0.0.1 on free ports with temp data dirs,
and every process started here is killed at interpreter exit at the latest.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ._binary import etcd_binary, etcdctl_binary
from ._tls import TLSFiles

__all__ = ["EtcdCluster", "EtcdMember", "EtcdServer"]

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago.

    Drawn below Linux's ephemeral range (32768+), where the kernel does not hand out ports for
    outgoing connections, so a restarted member rarely finds its port taken by a client socket.
    """
    for _ in range(50):
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdMember:
    """One etcd process with its own ports and data dir (part of a cluster, or alone)."""

    def __init__(
        self,
        name: str = "m0",
        *,
        base_dir: Path | None = None,
        cluster_token: str = "aetcdcfg-test",
        auth_token_ttl: int | None = None,
        tls: TLSFiles | None = None,
        client_cert_auth: bool = False,
        keepalive_min_time: float | None = None,
        progress_notify_interval: float | None = None,
        quota_bytes: int | None = None,
        extra_args: Sequence[str] = (),
        client_port: int | None = None,
    ) -> None:
        self.name = name
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="aetcdcfg-etcd-")) if base_dir is None else base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / f"{name}.data"
        self.log_file = self.base_dir / f"{name}.log"
        self.cluster_token = cluster_token
        self.auth_token_ttl = auth_token_ttl
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.keepalive_min_time = keepalive_min_time
        self.progress_notify_interval = progress_notify_interval
        self.quota_bytes = quota_bytes
        self.extra_args = list(extra_args)
        self.client_port = client_port or free_port()
        self.peer_port, self.metrics_port = free_port(), free_port()
        self.initial_cluster = f"{name}={self.peer_url}"
        self.process: subprocess.Popen[bytes] | None = None
        self._started_once = False

    def __repr__(self) -> str:
        return f"<EtcdMember {self.name} {self.endpoint} pid={self.pid}>"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        """The URL clients use (same as ``client_url``)."""
        return self.client_url

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def args(self) -> list[str]:
        args = [
            str(etcd_binary()),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.cluster_token}",
            f"--listen-metrics-urls={self.metrics_url}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
        ]
        if self.auth_token_ttl is not None:
            args += ["--auth-token=simple", f"--auth-token-ttl={self.auth_token_ttl}"]
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca_file}",
            ]
            if self.client_cert_auth:
                args.append("--client-cert-auth")
        if self.keepalive_min_time is not None:
            args.append(f"--grpc-keepalive-min-time={self.keepalive_min_time:g}s")
        if self.progress_notify_interval is not None:
            args.append(f"--experimental-watch-progress-notify-interval={self.progress_notify_interval:g}s")
        if self.quota_bytes is not None:
            args.append(f"--quota-backend-bytes={self.quota_bytes}")
        return args + self.extra_args

    def spawn(self) -> None:
        """Start the process without waiting for it to serve."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        args = self.args()
        if self._started_once:
            args = [a for a in args if not a.startswith("--initial-cluster-state")]
            args.append("--initial-cluster-state=existing")
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _LIVE.add(self.process)
        self._started_once = True

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EtcdMember:
        """Start, and by default wait until ``/health`` says true (a leader exists)."""
        self.spawn()
        if wait:
            self.wait_healthy(timeout)
        return self

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/health", timeout=1) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until the member reports healthy; fails with its log tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"etcd {self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.health():
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd {self.name} not healthy within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _end(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            if sig is not signal.SIGKILL:
                os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.discard(proc)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush or say goodbye."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        self._end(signal.SIGTERM)

    def restart(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Kill if running, then start again on the same ports and data dir."""
        self.kill()
        self.start(wait=wait, timeout=timeout)

    def wipe_and_restart(self, *, wait: bool = True) -> None:
        """Start over with an empty data dir on the same ports (etcd's revision goes back to 1)."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._started_once = False
        self.start(wait=wait)

    def pause(self) -> None:
        """SIGSTOP: the process freezes with its sockets open (no RST, nothing answered)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def watcher_count(self) -> int:
        """etcd's own count of server-side watchers (gauge ``etcd_debugging_mvcc_watcher_total``)."""
        for line in self.metrics().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
        raise RuntimeError("etcd_debugging_mvcc_watcher_total not in etcd's metrics")

    def etcdctl(
        self,
        *args: str,
        check: bool = True,
        user: str | None = None,
        endpoints: Sequence[str] | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Run etcdctl against this member (or ``endpoints``) and return its stdout."""
        command = [str(etcdctl_binary()), f"--endpoints={','.join(endpoints or [self.endpoint])}"]
        if self.tls is not None:
            command += [
                f"--cacert={self.tls.ca_file}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if user is not None:
            command.append(f"--user={user}")
        command += list(args)
        result = subprocess.run(
            command, capture_output=True, timeout=timeout, env={**os.environ, "ETCDCTL_API": "3"}, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode(errors="replace")

    def cleanup(self) -> None:
        """Kill the process and remove its data (and the base dir, if this member made it)."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


class EtcdServer(EtcdMember):
    """A single-member etcd: ``with EtcdServer() as server: server.endpoint``."""

    _root_password: str | None = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def _root(self) -> str | None:
        return f"root:{self._root_password}" if self._root_password is not None else None

    def enable_auth(self, root_password: str) -> None:
        """Create ``root`` with ``root_password`` and turn authentication on."""
        self.etcdctl("user", "add", f"root:{root_password}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self._root_password = root_password

    def add_user(
        self,
        name: str,
        password: str,
        *,
        read_prefix: str | None = None,
        readwrite_prefix: str | None = None,
    ) -> None:
        """A user with a role of its own granting read or readwrite on one key prefix."""
        user = self._root()
        self.etcdctl("user", "add", f"{name}:{password}", user=user)
        self.etcdctl("role", "add", f"{name}-role", user=user)
        for permission, prefix in (("read", read_prefix), ("readwrite", readwrite_prefix)):
            if prefix is not None:
                self.etcdctl(
                    "role", "grant-permission", f"{name}-role", permission, prefix, "--prefix=true", user=user
                )
        self.etcdctl("user", "grant-role", name, f"{name}-role", user=user)


class EtcdCluster:
    """``size`` members forming one cluster on loopback: ``with EtcdCluster(3) as cluster:``."""

    def __init__(self, size: int = 3, **member_options: object) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="aetcdcfg-cluster-"))
        self.members = [
            EtcdMember(f"m{i}", base_dir=self.base_dir, **member_options)  # type: ignore[arg-type]
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        for member in self.members:
            member.spawn()
        for member in self.members:
            member.wait_healthy(timeout)
        return self

    def kill(self, index: int) -> None:
        self.members[index].kill()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Restart member ``index`` on its data dir and wait until it has rejoined (healthy)."""
        self.members[index].restart(timeout=timeout)

    def ensure_all_running(self) -> None:
        """Bring back any member a test killed or paused, and wait for all to be healthy."""
        for member in self.members:
            if member.running:
                member.resume()
            else:
                member.spawn()
        for member in self.members:
            member.wait_healthy(30)

    def _status(self) -> list[dict[str, object]]:
        alive = [m.endpoint for m in self.members if m.running]
        out = self.members[0].etcdctl("endpoint", "status", "-w", "json", endpoints=alive, check=False)
        return list(json.loads(out or "[]"))

    def leader_index(self) -> int:
        """Which member leads now."""
        for entry in self._status():
            status = entry["Status"]
            assert isinstance(status, dict)
            if status["header"]["member_id"] == status["leader"]:
                return self.endpoints.index(str(entry["Endpoint"]))
        raise RuntimeError("no leader among the running members")

    def wait_leader(self, timeout: float = 10.0) -> int:
        """Wait until the running members have elected a leader; its index."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.leader_index()
            except (RuntimeError, KeyError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def member_id(self, index: int) -> str:
        for entry in self._status():
            if entry["Endpoint"] == self.members[index].endpoint:
                status = entry["Status"]
                assert isinstance(status, dict)
                return format(int(status["header"]["member_id"]), "x")
        raise RuntimeError(f"member {index} is not running")

    def move_leader(self, to_index: int) -> None:
        leader = self.members[self.leader_index()]
        leader.etcdctl("move-leader", self.member_id(to_index), endpoints=[leader.endpoint])

    def stop(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)
