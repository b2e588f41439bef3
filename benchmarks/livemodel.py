"""Put-to-settings latency for a realistic 200-field model, one key changed per revision.

``Service`` has 200 leaf fields: 20 top-level ones and 180 in nested models (two databases, two
caches, three HTTP clients, two queues, auth, observability), with ints, floats, bools, strs,
``SecretStr``, lists and dicts, field constraints and one cross-field ``model_validator``. Every
field is filled from its own etcd key (``<prefix>primary_db/pool_max``; lists and dicts as JSON).

A separate writer process (``python -m benchmarks.livemodel write ...``) puts one key per revision
every 5 ms, cycling through the 200 keys with valid new values, and records each put's start time
and revision. The watcher process runs ``LiveSettings(Service, ...)`` and records, in ``on_change``,
when each revision's object is swapped in. Latency is put start -> swap, matched by revision; CPU is
the watcher process's CPU time over the run divided by the revisions applied (it includes gRPC's
own threads). The floor is the same run with a one-field model (``Floor``): etcd, the writer, the
watch and the swap, with next to nothing to decode or validate.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.testing import EtcdServer

from ._util import ROOT, percentile, table

PUTS = 2_000
INTERVAL = 0.005


class Database(BaseModel):
    url: SecretStr = SecretStr("postgresql://db:5432/app")
    user: str = "app"
    password: SecretStr = SecretStr("")
    pool_min: int = Field(2, ge=0)
    pool_max: int = Field(20, ge=1, le=10_000)
    timeout: float = 5.0
    statement_timeout_ms: int = 30_000
    ssl: bool = True
    ssl_mode: str = "verify-full"
    replicas: list[str] = []
    options: dict[str, str] = {}
    retries: int = 3
    retry_backoff: float = 0.2
    echo: bool = False
    schema_name: str = "public"
    application_name: str = "service"
    idle_timeout: int = 600
    max_overflow: int = 10

    @model_validator(mode="after")
    def pool_bounds(self) -> Database:
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min must not exceed pool_max")
        return self


class Cache(BaseModel):
    url: str = "redis://cache:6379/0"
    password: SecretStr = SecretStr("")
    ttl: int = Field(300, ge=0)
    max_entries: int = 100_000
    enabled: bool = True
    namespace: str = "svc"
    connect_timeout: float = 1.0
    read_timeout: float = 0.5
    pool_size: int = 10
    compression: bool = False
    compression_threshold: int = 1024
    serializer: str = "json"
    nodes: list[str] = []
    tags: dict[str, str] = {}
    stale_while_revalidate: int = 30


class HttpClient(BaseModel):
    base_url: str = "https://api.example.com"
    api_key: SecretStr = SecretStr("")
    timeout: float = 10.0
    connect_timeout: float = 2.0
    retries: int = Field(3, ge=0, le=10)
    retry_statuses: list[int] = [502, 503, 504]
    backoff: float = 0.5
    max_connections: int = 100
    keepalive: bool = True
    verify_tls: bool = True
    user_agent: str = "service/1.0"
    headers: dict[str, str] = {}
    rate_limit_per_s: int = 50
    circuit_breaker_threshold: int = 5
    circuit_breaker_reset_s: int = 30


class Queue(BaseModel):
    url: SecretStr = SecretStr("amqp://mq:5672/")
    name: str = "jobs"
    prefetch: int = Field(10, ge=1)
    concurrency: int = 4
    visibility_timeout: int = 30
    max_retries: int = 5
    dead_letter: str = "jobs.dead"
    durable: bool = True
    priority: int = 0
    batch_size: int = 10
    poll_interval: float = 0.5
    routing_keys: list[str] = []
    arguments: dict[str, int] = {}
    enabled: bool = True
    compression: str = "none"


class Auth(BaseModel):
    issuer: str = "https://auth.example.com"
    audience: str = "service"
    jwks_url: str = "https://auth.example.com/.well-known/jwks.json"
    client_id: str = "service"
    client_secret: SecretStr = SecretStr("")
    token_ttl: int = 3600
    refresh_ttl: int = 86_400
    leeway: int = 30
    algorithms: list[str] = ["RS256"]
    scopes: list[str] = []
    required_claims: list[str] = ["sub"]
    cache_jwks: bool = True
    jwks_refresh_s: int = 300
    allow_anonymous: bool = False
    session_cookie: str = "sid"
    cookie_secure: bool = True
    cookie_samesite: str = "lax"
    csrf_enabled: bool = True
    roles: dict[str, list[str]] = {}
    signing_key: SecretStr = SecretStr("")


class Observability(BaseModel):
    log_format: str = "json"
    log_sample_rate: float = 1.0
    metrics_enabled: bool = True
    metrics_port: int = 9100
    tracing_enabled: bool = False
    tracing_endpoint: str = "http://otel:4317"
    tracing_sample_rate: float = 0.01
    service_tag: str = "service"
    extra_tags: dict[str, str] = {}
    slow_request_ms: int = 500
    profile: bool = False
    profile_interval_s: int = 60
    health_path: str = "/livez"
    ready_path: str = "/readyz"
    error_reporting_dsn: SecretStr = SecretStr("")
    error_sample_rate: float = 1.0
    ignored_paths: list[str] = ["/livez", "/readyz"]
    histogram_buckets: list[float] = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0]
    audit_log: bool = False


class Service(BaseSettings):
    service_name: str = "service"
    environment: str = "dev"
    debug: bool = False
    log_level: str = "INFO"
    workers: int = Field(4, ge=1)
    port: int = Field(8080, ge=1, le=65_535)
    host: str = "0.0.0.0"
    timezone: str = "UTC"
    maintenance: bool = False
    version: str = "1.0.0"
    region: str = "eu-west-1"
    zone: str = "a"
    max_body_bytes: int = 1 << 20
    request_timeout: float = 30.0
    allowed_hosts: list[str] = ["*"]
    cors_origins: list[str] = []
    admin_emails: list[str] = []
    feature_flags: dict[str, bool] = {}
    rate_limits: dict[str, int] = {}
    api_key: SecretStr = SecretStr("")
    primary_db: Database = Database()
    analytics_db: Database = Database()
    cache: Cache = Cache()
    sessions: Cache = Cache()
    payments_api: HttpClient = HttpClient()
    search_api: HttpClient = HttpClient()
    email_api: HttpClient = HttpClient()
    jobs: Queue = Queue()
    events: Queue = Queue()
    auth: Auth = Auth()
    observability: Observability = Observability()


class Floor(BaseSettings):
    k0: int = 0


def _leaves(model: type[BaseModel], path: str = "") -> list[tuple[str, Any]]:
    """(relative key, annotation) of every leaf field."""
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out.extend(_leaves(tp, f"{path}{name}/"))
        else:
            out.append((f"{path}{name}", tp))
    return out


LEAVES = _leaves(Service)
assert len(LEAVES) == 200, len(LEAVES)


def value_for(key: str, annotation: Any, i: int) -> str:
    """A valid value for the field at ``key``, different for each ``i`` (what the writer puts)."""
    name = key.rsplit("/", 1)[-1]
    if annotation is bool:
        return "true" if i % 2 else "false"
    if annotation is int:
        if name == "pool_min":
            return str(1 + i % 2)  # stays <= pool_max, so the model validator passes
        if name == "port" or name == "metrics_port":
            return str(1024 + i % 60_000)
        if name == "retries" and "api" in key:
            return str(i % 10)
        return str(2 + i % 5_000)
    if annotation is float:
        return f"{0.1 + (i % 100) / 100:.2f}"
    if annotation is str:
        return f"{name}-{i}"
    if annotation is SecretStr:
        return f"s3cr3t-{i}"
    if annotation == list[str]:
        return json.dumps([f"{name}-{i}-{j}" for j in range(3)])
    if annotation == list[int]:
        return json.dumps([500 + i % 5, 503])
    if annotation == list[float]:
        return json.dumps([0.01, 0.1 + i % 10, 1.0])
    if annotation == dict[str, str]:
        return json.dumps({f"k{j}": f"{name}-{i}-{j}" for j in range(3)})
    if annotation == dict[str, int]:
        return json.dumps({f"k{j}": i + j for j in range(3)})
    if annotation == dict[str, bool]:
        return json.dumps({f"flag{j}": (i + j) % 2 == 0 for j in range(5)})
    if annotation == dict[str, list[str]]:
        return json.dumps({"admin": ["read", "write"], "viewer": [f"read-{i}"]})
    raise AssertionError(f"no value for {key}: {annotation}")


def initial_items() -> dict[str, str]:
    """Every field's key with a valid value: the prefix as the service finds it at start."""
    return {key: value_for(key, tp, 0) for key, tp in LEAVES}


def change(i: int) -> tuple[str, str]:
    """The ``i``-th put: the next field in turn, with a new valid value."""
    key, tp = LEAVES[i % len(LEAVES)]
    return key, value_for(key, tp, i + 1)


#: model name -> (model, its keys at start, the i-th put)
MODELS: dict[
    str, tuple[type[BaseSettings], Callable[[], dict[str, str]], Callable[[int], tuple[str, str]]]
] = {
    "service": (Service, initial_items, change),
    "floor": (Floor, lambda: {"k0": "0"}, lambda i: ("k0", str(i + 1))),
}


async def write(endpoint: str, prefix: str, count: int, interval: float, model: str) -> list[tuple[int, int]]:
    """The writer process: one key per revision every ``interval``; returns (revision, put start ns)."""
    puts: list[tuple[int, int]] = []
    _, _, put = MODELS[model]
    async with EtcdClient(endpoints=[endpoint]) as client:
        next_at = time.monotonic()
        for i in range(count):
            key, value = put(i)
            started = time.time_ns()
            revision = await client.put(prefix + key, value)
            puts.append((revision, started))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
    return puts


def _recorder(live: list[LiveSettings[Any]], out: dict[int, int]) -> Callable[[object], None]:
    def on_change(settings: object) -> None:
        out[live[0].revision] = time.time_ns()

    return on_change


async def measure(endpoint: str, name: str) -> dict[str, float]:
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    swapped: dict[int, int] = {}
    holder: list[LiveSettings[Any]] = []
    model, initial, _ = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "puts.json"
        async with EtcdClient(endpoints=[endpoint]) as client:
            items = list(initial().items())
            for start in range(0, len(items), 100):  # etcd takes up to 128 operations per txn
                await client.put_many({prefix + k: v for k, v in items[start : start + 100]})
            live = LiveSettings(model, prefix=prefix, client=client, on_change=_recorder(holder, swapped))
            holder.append(live)
            async with live:
                await anyio.sleep(0.2)
                cpu0 = time.process_time()
                command = [sys.executable, "-m", "benchmarks.livemodel", "write", endpoint, prefix]
                command += [str(PUTS), str(INTERVAL), name, str(out)]
                async with await anyio.open_process(command, cwd=ROOT, env=dict(os.environ)) as writer:
                    await writer.wait()
                puts: list[tuple[int, int]] = json.loads(out.read_text())
                with anyio.fail_after(10):
                    while live.revision < puts[-1][0]:
                        await anyio.sleep(0.01)
                cpu = time.process_time() - cpu0
                assert live.last_error is None, live.last_error
    latencies = [(swapped[rev] - started) / 1e6 for rev, started in puts if rev in swapped]
    assert len(latencies) == len(puts), f"{len(puts) - len(latencies)} revisions not applied one by one"
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "cpu_us": cpu / len(puts) * 1e6,
    }


async def main() -> str:
    rows = []
    with EtcdServer() as server:
        for name, label in [
            ("floor", "LiveSettings, 1-field model (floor)"),
            ("service", "LiveSettings, 200-field model"),
        ]:
            result = await measure(server.endpoint, name)
            rows.append(
                [
                    label,
                    f"{PUTS:,}",
                    f"{result['p50']:.2f}",
                    f"{result['p99']:.2f}",
                    f"{result['max']:.2f}",
                    f"{result['cpu_us']:.0f}",
                ]
            )
    headers = ["watcher", "puts", "put->current p50 ms", "p99 ms", "max ms", "CPU µs/revision"]
    return table(headers, rows)


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "write":
        _, _, endpoint, prefix, count, interval, model, out = sys.argv
        puts = anyio.run(write, endpoint, prefix, int(count), float(interval), model)
        Path(out).write_text(json.dumps(puts))
    else:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet
        print(anyio.run(main))
