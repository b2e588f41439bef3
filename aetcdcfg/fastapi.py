"""FastAPI glue (the ``fastapi`` extra): load settings before serving, hand each request a snapshot,
and tell operators and Kubernetes how fresh the settings are.

``app = FastAPI(lifespan=live.lifespan)`` is all the lifespan needs; :func:`settings_dependency`
gives route handlers the settings object current when the request started, so one request never sees
two different configurations. Opt-in, mounted by the app: :func:`probes_router` (``/livez``,
``/readyz``), :func:`readiness_dependency` for a readiness route of your own, and
:func:`status_router` (``/status``: JSON, or a live HTML page for a browser, fed by server-sent events
from ``/status/events``). None of them costs anything per etcd event: they read ``live.status`` when
asked, and a page's event stream waits on ``live.updates()`` only while it is open.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import BaseModel

from ._exits import ExitStack
from ._log import get_logger
from ._report import json_number, status_report
from .live import DEFAULT_MAX_STALENESS, LiveSettings

try:
    from fastapi import APIRouter, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aetcdcfg.fastapi needs FastAPI: pip install 'aetcdcfg[fastapi]'") from exc

__all__ = [
    "combine_lifespans",
    "probes_router",
    "readiness",
    "readiness_dependency",
    "settings_dependency",
    "status_router",
]

log = get_logger()

ModelT = TypeVar("ModelT", bound=BaseModel)
Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]

_NO_STORE = {"Cache-Control": "no-store"}
#: The page loads nothing from anywhere: inline style and script, events from this origin only.
_PAGE_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def settings_dependency(live: LiveSettings[ModelT]) -> Callable[[], Awaitable[ModelT]]:
    """A dependency for ``Depends(...)`` returning the settings current when the request started.

    ``async`` because it only reads an attribute: FastAPI runs a plain ``def`` dependency in
    Starlette's threadpool, so while the app's own sync handlers held every thread, each request
    using this waited for one.
    """

    async def current_settings() -> ModelT:
        return live.current

    return current_settings


#: The lifespan state keys: ``live.lifespan`` yields the first; a combined lifespan adds the second.
_STATE_KEY = "live_settings"
_ALL_STATE_KEY = "all_live_settings"


def _lives_in(state: dict[str, Any]) -> tuple[LiveSettings[Any], ...]:
    if _ALL_STATE_KEY in state:
        return tuple(state[_ALL_STATE_KEY])
    return (state[_STATE_KEY],) if isinstance(state.get(_STATE_KEY), LiveSettings) else ()


def combine_lifespans(live: LiveSettings[Any], app_lifespan: Lifespan | None = None) -> Lifespan:
    """A lifespan that loads ``live`` first, then runs the application's own lifespan inside it.

    The state (``request.state``) holds the application's entries, ``live_settings``: ``live``, and
    ``all_live_settings``: every LiveSettings combined, in order, so that
    ``combine_lifespans(live1, live2.lifespan)`` (or nested combinations) loses none of them.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with live.lifespan(app) as state:
            more: dict[str, Any] = {}
            async with ExitStack() as stack:
                if app_lifespan is not None:
                    more = dict(await stack.enter_async_context(app_lifespan(app)) or {})
                lives = dict.fromkeys((*_lives_in(state), *_lives_in(more)))
                yield {**more, **state, _ALL_STATE_KEY: tuple(lives)}

    return lifespan


# -- readiness and liveness ------------------------------------------------------------------------


def _why_not_ready(live: LiveSettings[Any], max_staleness: float) -> str | None:
    try:
        status = live.status
    except RuntimeError:
        return f"{live.prefix}: settings never loaded (LiveSettings not started)"
    if not status.loaded:
        return f"{live.prefix}: settings never loaded"
    if status.is_fresh(max_staleness):
        return None
    watch = status.watch
    confirmed = (
        "never confirmed current by etcd"
        if math.isinf(watch.staleness)
        else f"last confirmed current by etcd {watch.staleness:.1f}s ago"
    )
    return (
        f"{live.prefix}: stale: revision {status.revision} {confirmed} (bound {max_staleness:g}s); "
        f"watch {watch.state}; last error: {watch.last_error or 'none'}"
    )


def readiness(
    lives: Sequence[LiveSettings[Any]], max_staleness: float = DEFAULT_MAX_STALENESS
) -> tuple[bool, dict[str, Any]]:
    """(ready, body): ready when every LiveSettings is loaded and fresh within ``max_staleness``.

    The body is ``{"status": "ready"}`` or ``{"status": "not ready", "reasons": [...]}``, each reason
    naming the prefix, the staleness, the watch state and its last error (never a value).
    """
    reasons = [r for r in (_why_not_ready(live, max_staleness) for live in lives) if r is not None]
    if reasons:
        return False, {"status": "not ready", "reasons": reasons}
    return True, {"status": "ready", "prefixes": [live.prefix for live in lives]}


def readiness_dependency(
    live: LiveSettings[Any], *more: LiveSettings[Any], max_staleness: float = DEFAULT_MAX_STALENESS
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A dependency for ``Depends(...)``: raises ``HTTPException(503)`` (detail: the not-ready body)
    unless every LiveSettings is loaded and confirmed current within ``max_staleness`` seconds.

    For a readiness route that checks more than config:
    ``async def readyz(config: dict = Depends(readiness_dependency(live))) -> dict: ...``.
    """
    lives = (live, *more)

    async def ready() -> dict[str, Any]:  # async: no blocking work, so no threadpool thread needed
        ok, body = readiness(lives, max_staleness)
        if not ok:
            raise HTTPException(status_code=503, detail=body, headers=_NO_STORE)
        return body

    return ready


def probes_router(
    live: LiveSettings[Any],
    *more: LiveSettings[Any],
    max_staleness: float = DEFAULT_MAX_STALENESS,
    readiness_path: str = "/readyz",
    liveness_path: str = "/livez",
) -> APIRouter:
    """Kubernetes' probes: ``GET /readyz`` (503 with reasons while settings are not loaded or are
    staler than ``max_staleness``, 200 otherwise) and ``GET /livez`` (200 while the process serves;
    never depends on etcd, so an etcd outage never gets pods restarted).

    Both are ``async def``: they do no blocking work, and a plain ``def`` route waits for a thread of
    Starlette's threadpool (40), which the app's own sync handlers may all hold for seconds.
    """
    lives = (live, *more)
    router = APIRouter()

    @router.get(readiness_path, include_in_schema=False)
    async def readyz() -> Response:
        ok, body = readiness(lives, max_staleness)
        return _json(body, status_code=200 if ok else 503, headers=_NO_STORE)

    @router.get(liveness_path, include_in_schema=False)
    async def livez() -> JSONResponse:
        return JSONResponse({"status": "alive"}, headers=_NO_STORE)

    return router


# -- the status route, page and event stream -------------------------------------------------------


def _prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks HTML above JSON (a browser); ``*/*`` and ties get JSON."""
    html = other = 0.0
    for part in accept.split(","):
        media, _, params = part.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            html = max(html, quality)
        elif media in ("application/json", "application/*", "*/*"):
            other = max(other, quality)
    return html > other


def _status_body(lives: Sequence[LiveSettings[Any]], max_staleness: float) -> dict[str, Any]:
    reports = [status_report(live, max_staleness=max_staleness) for live in lives]
    return {
        "status": "fresh" if all(r["fresh"] for r in reports) else "stale",
        "max_staleness": json_number(max_staleness),
        "taken_at": time.time(),
        "settings": reports,
    }


def _tick_body(lives: Sequence[LiveSettings[Any]], max_staleness: float) -> dict[str, Any]:
    """Freshness only: what a page needs every second between changes."""
    keep = ("prefix", "started", "loaded", "fresh", "revision", "staleness", "watch")
    reports = [status_report(live, max_staleness=max_staleness, settings=False) for live in lives]
    return {
        "status": "fresh" if all(r["fresh"] for r in reports) else "stale",
        "taken_at": time.time(),
        "settings": [{k: r[k] for k in keep if k in r} for r in reports],
    }


def _signature(lives: Sequence[LiveSettings[Any]]) -> tuple[tuple[int, int, int, bool, int], ...]:
    """Changes when a revision is applied or rejected, or an instance record changes (the fleet
    view): then the page gets the whole status again."""
    out = []
    for live in lives:
        try:
            status = live.status
        except RuntimeError:
            out.append((live.revision, -1, -1, False, 0))
            continue
        fleet = sum(view.version for view in live.fleet_views.values())  # each only grows
        out.append((status.revision, status.applied, status.rejected, status.loaded, fleet))
    return tuple(out)


def _follow_fleets(lives: Sequence[LiveSettings[Any]]) -> None:
    """Start each started LiveSettings' fleet views (one watch of records per layer), once."""
    for live in lives:
        with contextlib.suppress(RuntimeError):  # not started yet: its next request starts it
            live.fleets()


def _dumps(body: Any) -> str:
    return json.dumps(body, allow_nan=False, separators=(",", ":"))


def _json(body: Any, *, status_code: int = 200, headers: Mapping[str, str]) -> Response:
    """A JSON response. Not Starlette's JSONResponse: its ``ensure_ascii=False`` fails on a key
    name that is not UTF-8 (kept with surrogate escapes, e.g. in the history); this escapes it."""
    return Response(_dumps(body), status_code=status_code, media_type="application/json", headers=headers)


@functools.cache
def _template() -> str:
    """The page, read from the package once (the route runs on the event loop: no file I/O per request)."""
    return resources.files(__package__ or "aetcdcfg").joinpath("status_page.html").read_text("utf-8")


def _page(body: dict[str, Any]) -> str:
    template = _template()
    # The status as a JSON script block, so the page shows something before its event stream opens;
    # "<" escaped so that no key name can close the script element.
    initial = _dumps(body).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return template.replace("/*INITIAL_STATUS*/null", initial)


class _EventStream(Response):
    """``text/event-stream`` of the status: ``status`` events (everything) whenever a revision is
    applied or rejected, ``tick`` events (freshness) every ``heartbeat`` seconds.

    One task group per open stream, owned by this response: one task per LiveSettings waiting on
    ``live.updates()``, one listening for the client's disconnect. It ends when the client leaves,
    after ``lifetime`` seconds (the browser reconnects within a second; this bounds how long a
    server's graceful shutdown waits for open streams), or when every LiveSettings has stopped.

    Every send, the first and the closing one included, happens within ``lifetime``: once the
    server's write buffer is full, a send waits until the client reads, and a client that never
    reads would otherwise hold the response (and the server's shutdown) forever. Events stop
    ``_close_margin()`` before the lifetime ends, which leaves the closing send time to complete;
    if the client has not read enough by then, the response is abandoned (``ended = "stalled"``).
    """

    media_type = "text/event-stream"

    def __init__(
        self, lives: Sequence[LiveSettings[Any]], max_staleness: float, heartbeat: float, lifetime: float
    ) -> None:
        super().__init__(headers={**_NO_STORE, "X-Accel-Buffering": "no"})
        # A stream has no length: drop the "content-length: 0" Response computed for the empty body.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.lives = tuple(lives)
        self.max_staleness = max_staleness
        self.heartbeat = heartbeat
        self.lifetime = lifetime
        self.ended = "lifetime"

    def _close_margin(self) -> float:
        """How long before the lifetime ends the events stop, so the closing send fits in it."""
        return min(1.0, self.lifetime / 10)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.monotonic()
        wake_send, wake_receive = anyio.create_memory_object_stream[None](1)
        with anyio.move_on_after(self.lifetime) as lifetime, wake_send, wake_receive:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_disconnect, receive, tg.cancel_scope)
                for live in self.lives:
                    tg.start_soon(self._forward, live, wake_send)
                with anyio.move_on_after(self.lifetime - self._close_margin()):
                    await self._stream(send, wake_receive)
                tg.cancel_scope.cancel()
            if self.ended != "disconnected":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        if lifetime.cancelled_caught:
            self.ended = "stalled"  # the client did not read what was sent; the response is abandoned
        log.debug("status.stream_closed", reason=self.ended, seconds=round(time.monotonic() - began, 3))

    async def _stream(self, send: Send, wake: MemoryObjectReceiveStream[None]) -> None:
        await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
        seen: tuple[tuple[int, int, int, bool, int], ...] | None = None
        while True:
            signature = _signature(self.lives)
            if all(applied < 0 for _, applied, _, _, _ in signature) and seen is not None:
                self.ended = "stopped"  # every LiveSettings has closed: the app is shutting down
                return
            if signature != seen:
                event, body = "status", _status_body(self.lives, self.max_staleness)
                seen = signature
            else:
                event, body = "tick", _tick_body(self.lives, self.max_staleness)
            message = f"event: {event}\ndata: {_dumps(body)}\n\n".encode()
            await send({"type": "http.response.body", "body": message, "more_body": True})
            with anyio.move_on_after(self.heartbeat):
                await wake.receive()

    async def _forward(self, live: LiveSettings[Any], wake: MemoryObjectSendStream[None]) -> None:
        async for _ in live.updates():
            with contextlib.suppress(anyio.WouldBlock):
                wake.send_nowait(None)

    async def _until_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.ended = "disconnected"
        scope.cancel()


def status_router(
    live: LiveSettings[Any],
    *more: LiveSettings[Any],
    path: str = "/status",
    max_staleness: float = DEFAULT_MAX_STALENESS,
    heartbeat: float = 1.0,
    stream_lifetime: float = 30.0,
    fleet: bool = True,
) -> APIRouter:
    """``GET {path}``: the status of each LiveSettings as JSON (see :func:`aetcdcfg.status_report`),
    or, when the client prefers HTML (a browser), a page that follows it live through
    ``GET {path}/events`` (server-sent events). Values of secrets and of rejected changes never
    appear. Mount it where only operators reach it: it names keys, endpoints and sources.

    Each event stream ends within ``stream_lifetime`` seconds, also for a client that stopped
    reading; what the server already buffered for such a client it drops only after its own
    graceful-shutdown timeout (uvicorn: ``timeout_graceful_shutdown``, unlimited by default).

    With ``fleet`` (the default) the first request starts each LiveSettings' fleet views (one watch
    of instance records per prefix it reads, layers included): the JSON gains ``fleet``, a list of
    ``{"prefix", "following", "instances"}``, and the page a table of every live instance of each
    prefix, updated over the event stream within ``heartbeat`` of a record's change.
    """
    lives = (live, *more)
    router = APIRouter()

    # async, like the probes: building the status is CPU work of a few ms at most, never I/O
    # (the page's template is read once), so it need not wait for a threadpool thread.
    @router.get(path, include_in_schema=False)
    async def status(request: Request) -> Response:
        if fleet:
            _follow_fleets(lives)
        body = _status_body(lives, max_staleness)
        headers = {**_NO_STORE, "Vary": "Accept"}
        if _prefers_html(request.headers.get("accept", "")):
            return HTMLResponse(_page(body), headers={**headers, "Content-Security-Policy": _PAGE_POLICY})
        return _json(body, headers=headers)

    @router.get(path.rstrip("/") + "/events", include_in_schema=False)
    async def events() -> Response:
        if fleet:
            _follow_fleets(lives)
        return _EventStream(lives, max_staleness, heartbeat, stream_lifetime)

    return router
