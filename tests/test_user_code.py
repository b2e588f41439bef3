"""User code raising anything, triggered by a value in etcd, never takes LiveSettings down.

Every hook a settings model offers (field validators before/after/wrap, model validators
before/after, a custom type's validator) and every hook LiveSettings calls (``on_change``) or hands
out (an ``updates()`` consumer) raises each kind of exception in turn. Each time, the change is
rejected (or, for the callbacks, logged), the last good object stays, the next good value applies,
and the value never appears in ``last_error``, the status or the logs, although every exception
message quotes it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel, GetCoreSchemaHandler, field_validator, model_validator
from pydantic_core import core_schema
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import ConfigRejected, EtcdClient, LiveSettings
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-quoted-by-user-code"
KINDS: dict[str, type[Exception]] = {
    kind.__name__: kind
    for kind in (
        ValueError,
        TypeError,
        KeyError,
        RuntimeError,
        ZeroDivisionError,
        AssertionError,
        AttributeError,
        IndexError,
    )
}
VALIDATOR_HOOKS = ["field_before", "field_after", "field_wrap", "model_before", "model_after", "custom_type"]


def trap(hook: str, value: Any) -> None:
    """Raise the kind named in ``value`` (``"<hook>:<kind>:<secret>"``) if it is aimed at ``hook``;
    the message quotes the value, as user code often does."""
    if isinstance(value, str) and value.startswith(hook + ":"):
        kind = KINDS[value.split(":")[1]]
        if kind is ZeroDivisionError:
            _ = len(value) / 0  # a real bug, not a raise
        raise kind(f"cannot use {value!r}")


class Trap(str):
    """A custom type with a validator of its own."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls._check, core_schema.str_schema())

    @classmethod
    def _check(cls, value: str) -> Trap:
        trap("custom_type", value)
        return cls(value)


class Hooked(BaseSettings):
    f: str = ""
    c: Annotated[str, Trap] = ""
    n: int = 0

    @field_validator("f", mode="before")
    @classmethod
    def before(cls, value: Any) -> Any:
        trap("field_before", value)
        return value

    @field_validator("f", mode="after")
    @classmethod
    def after(cls, value: str) -> str:
        trap("field_after", value)
        return value

    @field_validator("f", mode="wrap")
    @classmethod
    def wrap(cls, value: Any, handler: Any) -> Any:
        trap("field_wrap", value)
        return handler(value)

    @model_validator(mode="before")
    @classmethod
    def model_before(cls, data: Any) -> Any:
        if isinstance(data, dict):
            trap("model_before", data.get("f"))
        return data

    @model_validator(mode="after")
    def model_after(self) -> Hooked:
        trap("model_after", self.f)
        return self


class Plain(BaseModel):
    """The same hooks on a plain pydantic model (validated, not constructed by pydantic-settings)."""

    f: str = ""
    n: int = 0

    @field_validator("f")
    @classmethod
    def after(cls, value: str) -> str:
        trap("field_after", value)
        return value


async def wait_rejected(live: LiveSettings[Any], revision: int) -> ConfigRejected:
    with anyio.fail_after(5):
        while live.last_error is None or live.last_error.revision != revision:
            await anyio.sleep(0.005)
    return live.last_error


async def test_every_hook_raising_every_kind_is_a_rejection_and_the_next_good_value_applies(
    etcd_server: EtcdServer, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    called: list[int] = []
    consumer_errors: list[str] = []

    def on_change(settings: Hooked) -> None:
        called.append(settings.n)
        trap("on_change", settings.f)

    async def consumer(live: LiveSettings[Hooked], *, task_status: anyio.abc.TaskStatus[None]) -> None:
        updates = live.updates()
        task_status.started()
        try:
            async for settings in updates:
                trap("consumer", settings.f)
        except Exception as exc:  # the consumer's own task ends with its own error, nothing else does
            consumer_errors.append(type(exc).__name__)

    n = 0
    rejections: list[ConfigRejected] = []
    with capture_logs() as logs, anyio.fail_after(90):
        async with (
            EtcdClient(endpoints=[etcd_server.endpoint]) as client,
            LiveSettings(Hooked, prefix=etcd_prefix, client=client, on_change=on_change) as live,
        ):
            for kind in KINDS:
                for hook in VALIDATOR_HOOKS:
                    n += 1
                    good = live.current
                    field = "c" if hook == "custom_type" else "f"
                    bad = await client.put_many(
                        {etcd_prefix + field: f"{hook}:{kind}:{SECRET}", etcd_prefix + "n": str(n)}
                    )
                    error = await wait_rejected(live, bad)
                    rejections.append(error)
                    assert live.current is good
                    if hook.startswith("model"):  # no field to blame: the keys the change touched
                        assert etcd_prefix + field in error.keys, (hook, kind, error)
                    else:
                        assert error.keys == (etcd_prefix + field,), (hook, kind, error)
                    assert kind in str(error), (hook, kind, error)
                    n += 1
                    await client.put_many({etcd_prefix + field: "ok", etcd_prefix + "n": str(n)})
                    await live.wait_for(lambda s, n=n: s.n == n, timeout=5)  # type: ignore[misc]
                    assert live.last_error is None
                for hook in ("on_change", "consumer"):
                    async with anyio.create_task_group() as tg:
                        await tg.start(consumer, live)
                        n += 1
                        await client.put_many(
                            {etcd_prefix + "f": f"{hook}:{kind}:{SECRET}", etcd_prefix + "n": str(n)}
                        )
                        await live.wait_for(lambda s, n=n: s.n == n, timeout=5)  # type: ignore[misc]
                        n += 1
                        await client.put_many({etcd_prefix + "f": "ok", etcd_prefix + "n": str(n)})
                        await live.wait_for(lambda s, n=n: s.n == n, timeout=5)  # type: ignore[misc]
                        if hook == "consumer":
                            await anyio.wait_all_tasks_blocked()
                        tg.cancel_scope.cancel()
                    assert called[-2:] == [n - 1, n]  # on_change raised at n - 1, and is called again
            status = live.status
    assert consumer_errors == list(KINDS)
    assert status.rejected == len(KINDS) * len(VALIDATOR_HOOKS)
    failed = [e for e in logs if e["event"] == "config.on_change_failed"]
    assert [e["error_type"] for e in failed] == list(KINDS)
    assert len([e for e in logs if e["event"] == "config.rejected"]) == len(rejections)
    text = repr(logs) + caplog.text + repr(status) + "".join(str(e) + repr(e.problems) for e in rejections)
    assert SECRET not in text


@pytest.mark.parametrize("kind", ["TypeError", "KeyError", "ZeroDivisionError", "ValueError"])
async def test_a_bad_first_value_fails_entry_with_config_rejected_never_the_raw_error(
    etcd_server: EtcdServer, etcd_prefix: str, kind: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "f", f"field_after:{kind}:{SECRET}")
        for model in (Hooked, Plain):
            with pytest.raises(ConfigRejected) as info:
                async with LiveSettings(model, prefix=etcd_prefix, client=client):
                    pass
            assert info.value.keys == (etcd_prefix + "f",)
            assert kind in str(info.value) and SECRET not in str(info.value)
            async with LiveSettings(model, prefix=etcd_prefix, client=client, allow_defaults=True) as live:
                assert live.current.f == ""
                assert live.last_error is not None and SECRET not in str(live.last_error)
