"""Real etcd processes for tests and demos: one member, a single-member server, or a cluster.

Synchronous on purpose (subprocess + polling), so session fixtures, benchmarks and scripts can use
them from any thread or event loop. Everything binds to 127.0.0.1 on free ports with temp data dirs.

No etcd outlives the interpreter that started it: ``kill``/``stop``/``cleanup`` and the context
managers end processes, an ``atexit`` hook (``_process.cleanup_all``, which the pytest plugin also
runs on SIGTERM) ends any left over and removes their temp dirs, and on Linux the kernel kills etcd
when the interpreter dies any other way (see ``_binary.spawn``); the dirs such a death leaves are
removed by the next process that makes one (``_tempdirs``). Ports come from ``_ports``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _tempdirs
from ._binary import etcd_binary, etcdctl_binary
from ._ports import free_port
from ._process import ManagedProcess
from ._tls import TLSFiles

__all__ = ["EtcdCluster", "EtcdMember", "EtcdServer", "free_port"]


# -- one member ------------------------------------------------------------------------------------


def _get_health(metrics_url: str) -> bool | None:
    """etcd's ``/health``: True or False as it answers, None if it does not answer within 1 s."""
    try:
        with urllib.request.urlopen(f"{metrics_url}/health", timeout=1) as response:
            body = response.read()
    except urllib.error.HTTPError as err:  # 503 {"health":"false","reason":"RAFT NO LEADER"}
        with err:
            body = err.read()
    except (OSError, http.client.HTTPException):
        return None
    try:
        return bool(json.loads(body).get("health") == "true")
    except (ValueError, AttributeError):
        return False


class EtcdMember(ManagedProcess):
    """One etcd process with its own ports and data dir (alone, or one member of an EtcdCluster).

    Ports are fixed for the member's lifetime, so ``restart()`` comes back on the same URLs. Logs
    (``--log-level=warn``) go to ``<base_dir>/<name>.log``, next to the data dir, not to the terminal.
    """

    def __init__(
        self,
        name: str = "m0",
        *,
        base_dir: Path | None = None,
        cluster_token: str | None = None,
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
        self.base_dir = _tempdirs.make("aetcdcfg-etcd-") if base_dir is None else base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / f"{name}.data"
        self.log_file = self.base_dir / f"{name}.log"
        # Unique per cluster, so a member never talks to a stale peer that got a recycled port.
        self.cluster_token = cluster_token or f"aetcdcfg-{uuid.uuid4().hex[:8]}"
        self.auth_token_ttl = auth_token_ttl
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.keepalive_min_time = keepalive_min_time
        self.progress_notify_interval = progress_notify_interval
        self.quota_bytes = quota_bytes
        self.extra_args = list(extra_args)
        self.drawn_ports = []
        self.client_port = client_port or self._draw_port()
        self.peer_port = self._draw_port()
        self.metrics_port = self._draw_port()
        #: ``--initial-cluster``; EtcdCluster sets it to list every member.
        self.initial_cluster = f"{name}={self.peer_url}"
        #: ``--initial-cluster-state``: "existing" for a member added to a running cluster.
        self.initial_cluster_state = "new"
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False
        #: Set by :meth:`EtcdServer.enable_auth`: etcdctl then runs as root unless told otherwise.
        self._root_password: str | None = None

    def _draw_port(self) -> int:
        port = free_port()
        self.drawn_ports.append(port)
        return port

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<EtcdMember {self.name} {self.endpoint} {state} pid={self.pid}>"

    # -- addresses and state

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        """The URL clients use, e.g. ``http://127.0.0.1:23791`` (same as ``client_url``)."""
        return self.client_url

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        """Plain-http ``/health`` and ``/metrics``, even when the client URL is https."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def in_cluster(self) -> bool:
        """True if ``--initial-cluster`` names other members too."""
        return "," in self.initial_cluster

    def args(self) -> list[str]:
        """The etcd command line."""
        args = [
            str(etcd_binary()),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            # etcd ignores every --initial-* flag once the data dir holds a member, so restarts
            # need no "existing" here (only a member added to a running cluster does).
            f"--initial-cluster-state={self.initial_cluster_state}",
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

    # -- lifecycle

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EtcdMember:
        """Start; with ``wait`` (the default) return once ``/health`` is true, i.e. a leader exists.

        A member restarted while its cluster lacks quorum can never be healthy: start it with
        ``wait=False`` and call :meth:`wait_ready` instead. If it does not become healthy in time the
        process is killed and the error carries the tail of its log.
        """
        self.spawn()
        if wait:
            try:
                self.wait_healthy(timeout)
            except BaseException:
                self.kill()
                raise
        return self

    def health(self) -> bool:
        """Whether ``/health`` says true right now (false while there is no leader, or no answer)."""
        return _get_health(self.metrics_url) is True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until ``/health`` says true: the member serves and a leader exists."""
        self._wait(self.health, "healthy", timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the client port accepts TCP and ``/health`` answers, true *or false*.

        For a cluster member that is up but may have no leader (e.g. restarted alone): a client can
        connect to it, but requests needing consensus will wait or fail.
        """

        def ready() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.client_port), timeout=1).close()
            except OSError:
                return False
            return _get_health(self.metrics_url) is not None

        self._wait(ready, "ready", timeout)

    def wipe_and_restart(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start over with an empty data dir on the same ports: a new cluster, revision back to 1.

        Single members only: a wiped member cannot rejoin the cluster it was part of.
        """
        if self.in_cluster:
            raise RuntimeError(f"etcd {self.name} is a cluster member; wiping it would not rejoin it")
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start(wait=wait, timeout=timeout)

    # -- looking inside

    def metrics(self) -> str:
        """The Prometheus text from ``/metrics``."""
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def watcher_count(self) -> int:
        """etcd's own count of server-side watchers (gauge ``etcd_debugging_mvcc_watcher_total``)."""
        for line in self.metrics().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
        raise RuntimeError("etcd_debugging_mvcc_watcher_total is not in etcd's metrics")

    def etcdctl(
        self,
        *args: str,
        check: bool = True,
        user: str | None = None,
        password: str | None = None,
        endpoints: Sequence[str] | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Run ``etcdctl <args>`` (API v3) against this member, or ``endpoints``; its stdout.

        TLS flags are added when the member uses TLS. ``user`` is ``name`` with ``password``, or
        ``name:password``; once auth is enabled it defaults to root. With ``check`` a non-zero exit
        raises RuntimeError carrying etcdctl's stderr.
        """
        if user is None and self._root_password is not None:
            user, password = "root", self._root_password
        command = [str(etcdctl_binary()), f"--endpoints={','.join(endpoints or [self.endpoint])}"]
        if self.tls is not None:
            command += [
                f"--cacert={self.tls.ca_file}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if user is not None:
            command.append(f"--user={user}")
            if password is not None:
                command.append(f"--password={password}")
        command += args
        result = subprocess.run(
            command,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"etcdctl {' '.join(args)} failed (exit {result.returncode}): {stderr}")
        return result.stdout.decode(errors="replace")

    # -- a single-member server ------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return f"etcd {self.name}"


class EtcdServer(EtcdMember):
    """A single-member etcd: ``with EtcdServer() as server: server.endpoint``.

    Leaving the ``with`` block kills it and removes its temp dir.
    """

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def enable_auth(self, root_password: str) -> None:
        """Create ``root`` with ``root_password``, grant it the root role, and turn authentication on."""
        self.etcdctl("user", "add", "root", f"--new-user-password={root_password}")
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
        """A user with a role of its own (``<name>-role``) granting read or readwrite on key prefixes."""
        role = f"{name}-role"
        self.etcdctl("user", "add", name, f"--new-user-password={password}")
        self.etcdctl("role", "add", role)
        for permission, prefix in (("read", read_prefix), ("readwrite", readwrite_prefix)):
            if prefix is not None:
                self.etcdctl("role", "grant-permission", role, permission, prefix, "--prefix=true")
        self.etcdctl("user", "grant-role", name, role)


# -- a cluster -------------------------------------------------------------------------------------


class EtcdCluster:
    """``size`` members forming one cluster on loopback: ``with EtcdCluster(3) as cluster:``.

    ``member_options`` are :class:`EtcdMember` keyword arguments, applied to every member.
    """

    def __init__(self, size: int = 3, **member_options: Any) -> None:
        self.base_dir = _tempdirs.make("aetcdcfg-cluster-")
        member_options.setdefault("cluster_token", f"aetcdcfg-{uuid.uuid4().hex[:8]}")
        self.members = [EtcdMember(f"m{i}", base_dir=self.base_dir, **member_options) for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    def __repr__(self) -> str:
        return f"<EtcdCluster {self.members!r}>"

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
        """Start every member at once (they need each other to elect a leader); wait until all are healthy."""
        try:
            for member in self.members:
                member.spawn()
            deadline = time.monotonic() + timeout
            for member in self.members:
                member.wait_healthy(max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, index: int) -> None:
        """SIGKILL member ``index``."""
        self.members[index].kill()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Restart member ``index`` on its data dir and wait until it has rejoined (healthy)."""
        self.members[index].restart(timeout=timeout)

    def ensure_all_running(self, timeout: float = 30.0) -> None:
        """Resume paused members, start killed ones, add removed ones back, and wait until every
        member is healthy.

        A member removed from the cluster (:meth:`remove_member`) cannot come back on its data dir
        (etcd exits, "the member has been permanently removed"): it is added again as a new member
        with an empty data dir, on the same URLs and name.
        """
        deadline = time.monotonic() + timeout
        for member in self.members:
            member.resume()
        listed = self._listed_peer_urls()
        for member in self.members:
            if not member.running and (listed is None or member.peer_url in listed):
                member.spawn()
        listed = self._listed_peer_urls()
        for member in self.members:
            if listed is not None and member.peer_url not in listed:
                self._add_back(member, deadline)
        for member in self.members:
            member.wait_healthy(max(deadline - time.monotonic(), 1.0))

    def _listed_peer_urls(self) -> set[str] | None:
        """The peer URLs of the members the cluster lists, or None if no running member answers."""
        alive = [m.endpoint for m in self.members if m.running and not m.paused]
        if not alive:
            return None
        out = self.members[0].etcdctl(
            "member", "list", "-w", "json", "--command-timeout=5s", endpoints=alive, check=False
        )
        try:
            members = json.loads(out or "{}")["members"]
        except (ValueError, KeyError, TypeError):
            return None
        return {url for entry in members for url in entry.get("peerURLs", [])}

    def _add_back(self, member: EtcdMember, deadline: float) -> None:
        """``etcdctl member add`` a removed member again, then start it on an empty data dir."""
        member.kill()  # a removed member shuts itself down; do not wait for it
        shutil.rmtree(member.data_dir, ignore_errors=True)
        others = [m for m in self.members if m is not member]
        for other in others:  # the others must be up to agree on the change
            other.wait_healthy(max(deadline - time.monotonic(), 1.0))
        endpoints = [m.endpoint for m in others]
        while True:  # refused ("unhealthy cluster") while a member joined only moments ago
            try:
                out = others[0].etcdctl(
                    "member", "add", member.name, f"--peer-urls={member.peer_url}", endpoints=endpoints
                )
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for line in out.splitlines():
            if line.startswith("ETCD_INITIAL_CLUSTER="):
                member.initial_cluster = line.split("=", 1)[1].strip('"')
        member.initial_cluster_state = "existing"
        member.spawn()

    def _status(self) -> list[dict[str, Any]]:
        """``etcdctl endpoint status`` of the members that run and are not paused."""
        alive = [m.endpoint for m in self.members if m.running and not m.paused]
        if not alive:
            return []
        out = self.members[0].etcdctl(
            "endpoint", "status", "-w", "json", "--command-timeout=2s", endpoints=alive, check=False
        )
        try:
            return list(json.loads(out or "[]"))
        except ValueError:
            return []

    def leader_index(self) -> int:
        """Which member leads now, as the running members report it (RuntimeError if none)."""
        for entry in self._status():
            status = entry["Status"]
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
        """Member ``index``'s id in hex, as ``etcdctl member`` commands want it."""
        for entry in self._status():
            if entry["Endpoint"] == self.members[index].endpoint:
                return format(int(entry["Status"]["header"]["member_id"]), "x")
        raise RuntimeError(f"member {index} is not running")

    def move_leader(self, to_index: int, timeout: float = 10.0) -> None:
        """Transfer leadership to member ``to_index``; returns once the members report it leads."""
        leader = self.members[self.wait_leader(timeout)]
        if leader is self.members[to_index]:
            return
        target = self.member_id(to_index)
        leader.etcdctl("move-leader", target, endpoints=[leader.endpoint])
        deadline = time.monotonic() + timeout
        while self.wait_leader(timeout) != to_index:
            if time.monotonic() > deadline:
                raise TimeoutError(f"member {to_index} did not become leader within {timeout}s")
            time.sleep(0.05)

    def remove_member(self, index: int, timeout: float = 20.0) -> None:
        """Remove member ``index`` from the cluster, asking the others.

        etcd refuses with "unhealthy cluster" while a member joined only moments ago, so this
        retries until ``timeout``.
        """
        member_id = self.member_id(index)
        others = [m for i, m in enumerate(self.members) if i != index and m.running]
        deadline = time.monotonic() + timeout
        while True:
            try:
                others[0].etcdctl("member", "remove", member_id, endpoints=[m.endpoint for m in others])
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        """Kill every member, remove the cluster's temp dir and give back the members' ports."""
        for member in self.members:
            member.kill()
            member.release_ports()
        _tempdirs.remove(self.base_dir)
