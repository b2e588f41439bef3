"""Readiness, liveness, the status route and its event stream, served by a real uvicorn against real etcd.

The watcher probes a silent stream after 1 s and gives up 1 s later (``WATCHER_OPTIONS``), so a
stale bound of 3 s is crossed within 3 s + one keepalive window of etcd going away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.fastapi import (
    combine_lifespans,
    probes_router,
    readiness_dependency,
    settings_dependency,
    status_router,
)
from aetcdcfg.testing import EtcdServer

from .harness import MEMBER_OPTIONS, RECOVERY_BOUND, WATCHER_OPTIONS, wait_logged

pytestmark = pytest.mark.anyio

WINDOW = WATCHER_OPTIONS["keepalive_time"] + WATCHER_OPTIONS["keepalive_timeout"]
SECRET = "hunter2-status-secret"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class Database(BaseModel):
    url: str = "sqlite://"
    password: SecretStr = SecretStr("")


class Service(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
    token: SecretStr = SecretStr("")
    db: Database = Database()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_app(
    live: LiveSettings[Service], *, bound: float = 30.0, lifespan: bool = True, **status: Any
) -> FastAPI:
    app = FastAPI(lifespan=live.lifespan if lifespan else None)
    app.include_router(probes_router(live, max_staleness=bound))
    app.include_router(status_router(live, max_staleness=bound, **status))

    current = Depends(settings_dependency(live))
    ready = Depends(readiness_dependency(live, max_staleness=bound))

    # locals, so as defaults: FastAPI would evaluate an Annotated[...] string in the module's globals
    @app.get("/limit")
    def limit(settings: Service = current) -> int:
        return settings.rate_limit

    @app.get("/ready-and-more")
    def ready_and_more(config: dict[str, Any] = ready) -> dict[str, Any]:
        return {"config": config, "database": "ok"}

    return app


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """``app`` on a real uvicorn server on a free loopback port, in this event loop (grpc.aio's)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(30):
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("uvicorn did not start")
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any], str]]:
    """(event, data, raw text) of each server-sent event of a streaming response."""
    event, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield event, json.loads(data), data
            event, data = "message", ""


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    """A member of this test's own, which the test kills."""
    with EtcdServer(**MEMBER_OPTIONS) as private:
        yield private


async def test_never_loaded_is_not_ready_and_liveness_does_not_care(etcd_prefix: str) -> None:
    live = LiveSettings(Service, prefix=etcd_prefix)  # never entered: nothing loaded
    async with serving(make_app(live, lifespan=False)) as url, httpx.AsyncClient(base_url=url) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not ready",
            "reasons": [f"{etcd_prefix}: settings never loaded (LiveSettings not started)"],
        }
        assert ready.headers["cache-control"] == "no-store"
        assert (await http.get("/livez")).json() == {"status": "alive"}
        assert (await http.get("/livez")).status_code == 200
        custom = await http.get("/ready-and-more")
        assert custom.status_code == 503 and custom.json()["detail"]["status"] == "not ready"
        status = (await http.get("/status")).json()
        assert status["status"] == "stale"
        assert status["settings"][0] | {"max_staleness": 0} == {
            "prefix": etcd_prefix,
            "model": "Service",
            "max_staleness": 0,
            "started": False,
            "loaded": False,
            "fresh": False,
            "revision": 0,
        }
        page = await http.get("/status", headers={"accept": BROWSER})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def test_readiness_turns_503_when_stale_and_200_once_the_watch_resumes(
    server: EtcdServer, etcd_prefix: str
) -> None:
    bound = 3.0
    with capture_logs() as logs, anyio.fail_after(90):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as client,
            LiveSettings(Service, prefix=etcd_prefix, client=client) as live,
            serving(make_app(live, bound=bound, lifespan=False)) as url,
            httpx.AsyncClient(base_url=url, timeout=5) as http,
        ):
            await client.put(etcd_prefix + "rate_limit", "7")
            await live.wait_for(lambda s: s.rate_limit == 7, timeout=5)
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"status": "ready", "prefixes": [etcd_prefix]}
            assert (await http.get("/ready-and-more")).json()["database"] == "ok"

            server.kill()
            killed = time.monotonic()
            while (ready := await http.get("/readyz")).status_code == 200:
                await anyio.sleep(0.05)
            went_stale = time.monotonic() - killed
            assert went_stale <= bound + WINDOW + 0.5, went_stale
            (reason,) = ready.json()["reasons"]
            assert reason.startswith(f"{etcd_prefix}: stale: revision {live.revision} last confirmed current")
            assert f"(bound {bound:g}s); watch reconnecting; last error: " in reason
            assert not reason.endswith("last error: none")
            assert ready.json()["status"] == "not ready"
            assert (await http.get("/limit")).json() == 7  # the last good settings keep serving
            assert (await http.get("/livez")).status_code == 200  # never restarted for an etcd outage
            assert (await http.get("/ready-and-more")).status_code == 503
            status = (await http.get("/status")).json()["settings"][0]
            assert status["fresh"] is False and status["watch"]["state"] == "reconnecting"
            assert status["watch"]["outage_seconds"] > 0 and status["staleness"] > bound

            await anyio.to_thread.run_sync(server.restart)
            await wait_logged(logs, "watch.resumed", etcd_prefix, timeout=RECOVERY_BOUND)
            resumed = time.monotonic()
            while (await http.get("/readyz")).status_code != 200:
                await anyio.sleep(0.02)
            assert time.monotonic() - resumed <= 1.0
            status = (await http.get("/status")).json()["settings"][0]
            assert status["watch"]["reconnects"] == 1 and status["watch"]["state"] == "live"
    print(f"\nNOT READY after {went_stale:.2f}s (bound {bound}s)")


async def test_status_json_reports_freshness_watch_history_and_settings(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint], **WATCHER_OPTIONS) as client:
        first = await client.put_many(
            {etcd_prefix + "rate_limit": "5", etcd_prefix + "db/url": "postgres://a"}
        )
        live = LiveSettings(Service, prefix=etcd_prefix, client=client)
        async with serving(make_app(live, bound=10)) as url, httpx.AsyncClient(base_url=url) as http:
            changed = await client.put(etcd_prefix + "rate_limit", "6")
            await live.wait_for(lambda s: s.rate_limit == 6, timeout=5)
            with anyio.fail_after(5):
                while live.status.watch.state != "live":
                    await anyio.sleep(0.01)
            response = await http.get("/status", headers={"accept": "*/*"})
    assert response.headers["content-type"] == "application/json"
    assert response.headers["vary"] == "Accept"
    body = response.json()
    assert body["status"] == "fresh" and body["max_staleness"] == 10
    (report,) = body["settings"]
    assert report["prefix"] == etcd_prefix and report["model"] == "Service"
    assert (report["revision"], report["started"], report["loaded"], report["fresh"]) == (
        changed,
        True,
        True,
        True,
    )
    assert 0 <= report["staleness"] < 10
    watch = report["watch"]
    assert (watch["state"], watch["endpoint"], watch["reconnects"], watch["last_error"]) == (
        "live",
        etcd_server.endpoint,
        0,
        None,
    )
    assert watch["confirmed_at"] <= time.time() and watch["outage_started_at"] is None
    assert report["history"] == [
        {
            "revision": changed,
            "applied": True,
            "keys": [etcd_prefix + "rate_limit"],
            "problems": [],
            "at": report["history"][0]["at"],
        }
    ]
    assert report["last_rejected"] is None and report["applied"] == 1 and first < changed
    fields = {f["field"]: f for f in report["settings"]["fields"]}
    assert (fields["rate_limit"]["value"], fields["rate_limit"]["origin"]) == (6, etcd_prefix + "rate_limit")
    assert (fields["db.url"]["source"], fields["token"]["source"]) == ("etcd", "default")


async def test_rejected_change_shows_keys_and_problems_never_the_value(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        live = LiveSettings(Service, prefix=etcd_prefix, client=client)
        async with serving(make_app(live)) as url, httpx.AsyncClient(base_url=url) as http:
            await client.put(etcd_prefix + "rate_limit", "5")
            await live.wait_for(lambda s: s.rate_limit == 5, timeout=5)
            bad = await client.put_many({etcd_prefix + "rate_limit": "-4242", etcd_prefix + "token": SECRET})
            with anyio.fail_after(5):
                while live.last_error is None:
                    await anyio.sleep(0.01)
            json_text = (await http.get("/status")).text
            page = (await http.get("/status", headers={"accept": BROWSER})).text
    report = json.loads(json_text)["settings"][0]
    rejected = report["last_rejected"]
    assert rejected["revision"] == bad and rejected["applied"] is False
    assert set(rejected["keys"]) == {etcd_prefix + "rate_limit", etcd_prefix + "token"}
    assert rejected["problems"] == [f"{etcd_prefix}rate_limit: Input should be greater than or equal to 1"]
    assert report["history"][-1] == rejected
    assert report["revision"] < bad and "greater than or equal to 1" in report["config_error"]
    for text in (json_text, page):
        assert "-4242" not in text and SECRET not in text
    assert f"{etcd_prefix}rate_limit: Input should be greater than or equal to 1" in page


async def test_no_secret_in_status_page_event_stream_or_logs(
    etcd_server: EtcdServer, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with capture_logs() as logs:
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            await client.put_many(
                {etcd_prefix + "token": SECRET, etcd_prefix + "db/password": SECRET + "-db"}
            )
            live = LiveSettings(Service, prefix=etcd_prefix, client=client)
            app = make_app(live, heartbeat=0.2)
            async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert live.current.token.get_secret_value() == SECRET
                seen.append((await http.get("/status")).text)
                seen.append((await http.get("/status", headers={"accept": BROWSER})).text)
                seen.append((await http.get("/readyz")).text)
                with anyio.fail_after(10):
                    async with http.stream("GET", "/status/events") as stream:
                        assert stream.headers["content-type"].startswith("text/event-stream")
                        events = sse_events(stream)
                        kind, first, raw = await anext(events)  # closed with the stream below
                        seen.append(raw)
                        assert kind == "status" and first["settings"][0]["revision"] == live.revision
                        revision = await client.put_many(
                            {etcd_prefix + "token": SECRET + "-2", etcd_prefix + "rate_limit": "77"}
                        )
                        kinds = []
                        async for kind, body, raw in events:  # ticks, then the change, pushed live
                            seen.append(raw)
                            kinds.append(kind)
                            if kind == "status" and body["settings"][0]["revision"] == revision:
                                break
                        fields = {f["field"]: f for f in body["settings"][0]["settings"]["fields"]}
                        assert fields["rate_limit"]["value"] == 77
                        assert fields["token"]["value"] == "**********" and fields["token"]["secret"]
                        await client.put(etcd_prefix + "rate_limit", "zero")  # rejected: on the next tick
                        async for kind, body, raw in events:
                            seen.append(raw)
                            if kind == "status" and body["settings"][0]["last_rejected"]:
                                break
    text = "\n".join(seen) + repr(logs) + caplog.text
    assert SECRET not in text and "zero" not in text
    assert "**********" in seen[0] and "•••••• secret" in seen[1]


async def test_event_stream_ends_when_the_client_leaves_or_its_lifetime_is_over(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        live = LiveSettings(Service, prefix=etcd_prefix, client=client)
        with capture_logs() as logs, anyio.fail_after(30):
            async with httpx.AsyncClient() as outer:
                async with serving(make_app(live, heartbeat=0.2, stream_lifetime=1.5)) as url:
                    async with httpx.AsyncClient(base_url=url) as http:
                        async with http.stream("GET", "/status/events") as stream:
                            async with contextlib.aclosing(sse_events(stream)) as events:
                                await anext(events)
                        while not closed(logs):
                            await anyio.sleep(0.02)
                        assert closed(logs) == ["disconnected"]

                        began = time.monotonic()
                        async with http.stream("GET", "/status/events") as stream:
                            kinds = [kind async for kind, _, _ in sse_events(stream)]  # the server ends it
                        assert 1.3 <= time.monotonic() - began < 5  # events stop 10 % before the lifetime
                        assert kinds[0] == "status" and set(kinds[1:]) == {"tick"}
                        assert closed(logs)[-1] == "lifetime"
                    # a stream still open at shutdown holds the server up no longer than its lifetime
                    opened = await outer.send(outer.build_request("GET", url + "/status/events"), stream=True)
                    stopping = time.monotonic()
                assert time.monotonic() - stopping < 5
                await opened.aclose()
        assert live.revision > 0


def closed(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "status.stream_closed"]


async def test_probes_and_settings_dependency_answer_while_every_worker_thread_is_blocked(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The app's own sync handlers fill Starlette's threadpool; the probes, the readiness dependency
    and an async route using ``settings_dependency`` do no blocking work, so they must not wait for
    a thread (Kubernetes gives a probe 1 s)."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    release = threading.Event()
    entered: list[int] = []
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client) as live,
    ):
        app = make_app(live, lifespan=False)
        current = Depends(settings_dependency(live))
        ready = Depends(readiness_dependency(live))

        @app.get("/block")
        def block() -> str:
            entered.append(threading.get_ident())
            release.wait(60)
            return "released"

        @app.get("/async-limit")
        async def async_limit(settings: Service = current) -> int:
            return settings.rate_limit

        @app.get("/async-ready")
        async def async_ready(config: dict[str, Any] = ready) -> dict[str, Any]:
            return config

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with (
            serving(app) as url,
            httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http,
            anyio.create_task_group() as tg,
        ):
            try:
                for _ in range(int(limiter.total_tokens)):
                    tg.start_soon(http.get, "/block")
                with anyio.fail_after(20):  # every worker thread is now provably waiting on `release`
                    while len(set(entered)) < limiter.total_tokens or limiter.available_tokens > 0:
                        await anyio.sleep(0.01)
                with anyio.fail_after(2):
                    livez = await http.get("/livez")
                    readyz = await http.get("/readyz")
                    limit = await http.get("/async-limit")
                    ready_body = await http.get("/async-ready")
                assert limiter.available_tokens == 0 and len(entered) == limiter.total_tokens
            finally:
                release.set()
    assert (livez.status_code, livez.json()) == (200, {"status": "alive"})
    assert readyz.status_code == 200 and readyz.json()["status"] == "ready"
    assert (limit.status_code, limit.json()) == (200, 100)
    assert ready_body.json() == {"status": "ready", "prefixes": [etcd_prefix]}


async def test_a_client_that_never_reads_holds_the_stream_no_longer_than_its_lifetime(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """A page's event stream to a client that stopped reading (a small receive buffer, never read).
    Once uvicorn's write buffer is full every ``send`` waits for the client, the closing one too:
    the response must still end within ``stream_lifetime``. The bytes uvicorn already holds for
    that client are its own to drop, which it does after ``timeout_graceful_shutdown`` (the README
    says to set it): with both, shutdown ends within the lifetime."""
    lifetime = 2.0
    opened = anyio.Event()
    sends: list[str] = []
    waiting_in_send: list[dict[str, Any]] = []

    class Big(BaseSettings):
        notes: str = ""

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        live = LiveSettings(Big, prefix=etcd_prefix, client=client)
        app = FastAPI(lifespan=live.lifespan)
        app.include_router(status_router(live, heartbeat=0.05, stream_lifetime=lifetime))
        inner = app.build_middleware_stack()

        async def watched(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"] != "/status/events":
                return await inner(scope, receive, send)

            async def flow_controlled(message: dict[str, Any]) -> None:
                # uvicorn's send returns without suspending unless its write buffer is over the
                # high-water mark: a send the test sees pending is one waiting for the client
                sends.append(message["type"])
                waiting_in_send.append(message)
                try:
                    await send(message)
                finally:
                    waiting_in_send.remove(message)

            opened.set()
            return await inner(scope, receive, flow_controlled)

        app.middleware_stack = watched
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="critical", timeout_graceful_shutdown=int(lifetime)
        )
        server = uvicorn.Server(config)
        with capture_logs() as logs, anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                stopped = anyio.Event()

                async def serve() -> None:
                    await server.serve()
                    stopped.set()

                tg.start_soon(serve)
                while not server.started:
                    await anyio.sleep(0.01)
                with socket.socket() as reader:
                    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    reader.connect(("127.0.0.1", port))
                    reader.sendall(b"GET /status/events HTTP/1.1\r\nHost: test\r\n\r\n")
                    await opened.wait()  # the stream is open; the client reads nothing, ever
                    for n in range(20):  # status events of 1 MB each, until the app waits for the client
                        sent = len(sends)
                        await client.put(etcd_prefix + "notes", str(n % 10) * 1_000_000)
                        with anyio.fail_after(10):
                            while len(sends) == sent:  # the stream has reacted to the change
                                await anyio.sleep(0.01)
                        if waiting_in_send:
                            break
                    assert waiting_in_send, "the stream never filled the buffers"
                    server.should_exit = True
                    stopping = time.monotonic()
                    with anyio.move_on_after(lifetime + 8):
                        await stopped.wait()
                    took = time.monotonic() - stopping
                    if not stopped.is_set():
                        tg.cancel_scope.cancel()  # do not leave the server hanging for the next test
    ended = [e for e in logs if e["event"] == "status.stream_closed"]
    print(f"\nSTREAM ENDED {ended}; SHUTDOWN took {took:.2f}s (stream_lifetime {lifetime}s)")
    assert [e["reason"] for e in ended] == ["stalled"], "the response still waited for the client"
    assert ended[0]["seconds"] <= lifetime + 0.3
    assert stopped.is_set(), f"uvicorn's graceful shutdown still waited after {took:.1f}s"
    assert took < lifetime + 1.0, took


def strict_json(text: str) -> Any:
    """JSON as the standard has it: ``NaN``/``Infinity`` (Python's json extension) are errors."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


async def test_infinite_and_nan_settings_show_as_strings_in_status_page_and_stream(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """``inf``/``-inf``/``nan`` are valid floats for pydantic; JSON has no such numbers, so the status
    shows them as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (what etcd holds, and what pydantic
    reads back) instead of failing with a 500. A key name that is not UTF-8 is escaped."""

    class Floats(BaseSettings):
        ratio: float = 1.0
        limits: dict[str, float] = {}
        weights: list[float] = []

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many(
            {
                etcd_prefix + "ratio": "inf",
                etcd_prefix + "limits/low": "-inf",
                etcd_prefix + "limits/odd": "nan",
                etcd_prefix + "weights": "[1.5, Infinity]",
            }
        )
        live = LiveSettings(Floats, prefix=etcd_prefix, client=client)
        app = FastAPI(lifespan=live.lifespan)
        app.include_router(probes_router(live))
        app.include_router(status_router(live, max_staleness=float("inf"), heartbeat=0.1))
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert live.current.ratio == float("inf")
            # A stray key whose name is not UTF-8: kept with surrogate escapes, and in the history
            # of changes, it made Starlette's JSONResponse (ensure_ascii=False) fail with a 500.
            stray = await client.put((etcd_prefix + "notes").encode() + b"\xff", b"x")
            with anyio.fail_after(5):
                while live.revision < stray:
                    await anyio.sleep(0.01)
            ready = await http.get("/readyz")
            status = await http.get("/status")
            page = await http.get("/status", headers={"accept": BROWSER})
            with anyio.fail_after(10):
                async with http.stream("GET", "/status/events") as stream:
                    raw: list[str] = []
                    async for line in stream.aiter_lines():
                        if line.startswith("data:"):
                            raw.append(line[5:])
                        if len(raw) == 2:  # the status event and a tick
                            break
    assert ready.status_code == 200
    assert status.status_code == 200, status.text
    assert page.status_code == 200, page.text
    assert status.headers["content-type"] == "application/json"
    assert "notes\\udcff" in status.text  # named, escaped
    body = strict_json(status.text)
    assert body["max_staleness"] == "inf"
    values = body["settings"][0]["settings"]["values"]
    assert values == {
        "ratio": "inf",
        "limits": {"low": "-inf", "odd": "nan"},
        "weights": [1.5, "inf"],
    }
    fields = {f["field"]: f["value"] for f in body["settings"][0]["settings"]["fields"]}
    assert (fields["ratio"], fields["limits.low"], fields["limits.odd"]) == ("inf", "-inf", "nan")
    assert [strict_json(data)["settings"][0]["prefix"] for data in raw] == [etcd_prefix, etcd_prefix]
    assert strict_json(raw[0])["settings"][0]["settings"]["values"]["ratio"] == "inf"


async def test_combined_lifespans_of_two_live_settings_keep_both_in_the_state(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``live.lifespan`` yields ``{"live_settings": live}``; combining two must not let the second
    overwrite the first: ``live_settings`` is the first given, ``all_live_settings`` every one."""
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    first = LiveSettings(Service, prefix=etcd_prefix + "one/")
    second = LiveSettings(Service, prefix=etcd_prefix + "two/")
    third = LiveSettings(Service, prefix=etcd_prefix + "three/")
    seen: dict[str, Any] = {}

    async def own(app: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"database": "db"}

    nested = combine_lifespans(second, combine_lifespans(third, contextlib.asynccontextmanager(own)))
    app = FastAPI(lifespan=combine_lifespans(first, nested))

    @app.get("/state")
    async def state(request: Request) -> dict[str, Any]:
        seen.update(vars(request.state)["_state"])
        every = getattr(request.state, "all_live_settings", ())
        return {"first": request.state.live_settings.prefix, "all": [live.prefix for live in every]}

    with anyio.fail_after(30):
        async with (
            EtcdClient(endpoints=[etcd_server.endpoint]) as client,
            serving(app) as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            await client.put(etcd_prefix + "two/rate_limit", "2")
            await second.wait_for(lambda s: s.rate_limit == 2, timeout=5)
            body = (await http.get("/state")).json()
    assert body["first"] == etcd_prefix + "one/"
    assert body["all"] == [etcd_prefix + "one/", etcd_prefix + "two/", etcd_prefix + "three/"]
    assert seen["live_settings"] is first
    assert seen["database"] == "db"


def fleet_ids(body: dict[str, Any]) -> list[str]:
    return [row["id"] for row in body["settings"][0]["fleet"][0]["instances"]]


async def test_a_record_holding_a_number_json_has_not_is_skipped_and_the_status_stays_up(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Python's json reads ``NaN``/``Infinity`` (and ``1e400`` as infinity), which JSON has not: a
    record holding one, written by anything that may write the records prefix, is skipped like any
    other bad record (``fleet.bad_record``) instead of failing ``/status`` and its event stream with a
    500 on every instance of the fleet."""
    from aetcdcfg._records import InstanceRecord, record_key

    good = json.loads(
        InstanceRecord(
            "svc-b", {}, "Service", "abc", (etcd_prefix,), 1, None, (), (), True, "1", 1.0, 2.0
        ).to_json()
    )
    bad = {
        "bad-nan": json.dumps({**good, "id": "bad-nan", "started_at": float("nan")}),
        "bad-inf": json.dumps({**good, "id": "bad-inf", "updated_at": float("inf")}),
        "bad-big": json.dumps({**good, "id": "bad-big", "updated_at": 1e300}).replace("1e+300", "1e400"),
        "bad-text": json.dumps({**good, "id": "bad-text", "started_at": "-inf"}),
        "bad-rev": json.dumps({**good, "id": "bad-rev", "applied_revision": float("inf")}),
    }
    with capture_logs() as logs:
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            await client.put(record_key(etcd_prefix, "bad-nan"), bad["bad-nan"])  # there from the start
            live = LiveSettings(Service, prefix=etcd_prefix, client=client, instance="svc-a")
            app = make_app(live, heartbeat=0.1)
            async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
                with anyio.fail_after(10):
                    while True:  # its own record, once written, and never the bad one
                        status = await http.get("/status")
                        assert status.status_code == 200, status.text
                        if fleet_ids(strict_json(status.text)) == ["svc-a"]:
                            break
                        await anyio.sleep(0.05)
                    page = await http.get("/status", headers={"accept": BROWSER})
                    assert page.status_code == 200, page.text
                    async with http.stream("GET", "/status/events") as stream:
                        events = sse_events(stream)
                        kind, body, _ = await anext(events)
                        assert kind == "status" and fleet_ids(body) == ["svc-a"]
                        for name, text in bad.items():
                            await client.put(record_key(etcd_prefix, name), text)
                        await client.put(record_key(etcd_prefix, "svc-b"), json.dumps(good))
                        kinds = []
                        async for kind, body, raw in events:  # the stream goes on past the bad ones
                            strict_json(raw)
                            kinds.append(kind)
                            if kind == "status" and fleet_ids(body) == ["svc-a", "svc-b"]:
                                break
                        kind, _, _ = await anext(events)  # and on after them
                        assert kind == "tick"
                    status = await http.get("/status")
        assert status.status_code == 200 and fleet_ids(strict_json(status.text)) == ["svc-a", "svc-b"]
    skipped = {e["key"] for e in logs if e["event"] == "fleet.bad_record"}
    assert skipped == {record_key(etcd_prefix, name) for name in bad}
