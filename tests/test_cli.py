"""The aetcdcfg command through the real console script, against real etcd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from hypothesis import given, settings
from hypothesis import strategies as st

from aetcdcfg import EtcdClient, EtcdUnavailable
from aetcdcfg.cli import build_parser, cli, flatten, unflatten
from aetcdcfg.cli._files import dumps, loads
from aetcdcfg.cli._secrets import MaskedSecretMissing, Secrets
from aetcdcfg.testing import EtcdServer
from aetcdcfg.testing._ports import free_port, release

pytestmark = pytest.mark.anyio

SCRIPT = shutil.which("aetcdcfg", path=str(Path(sys.executable).parent)) or "aetcdcfg"

MODEL = """
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings


class Database(BaseModel):
    url: str = "sqlite://"
    password: SecretStr = SecretStr("")


class Settings(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
    maintenance: bool = False
    db: Database = Database()
    tags: list[str] = []
"""


@pytest.fixture
def workdir(tmp_path: Path, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "svc_settings.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    return tmp_path


async def run(*args: str, check: bool = True) -> tuple[int, str, str]:
    result = await anyio.run_process([SCRIPT, *args], check=False, env=dict(os.environ))
    out, err = result.stdout.decode(), result.stderr.decode()
    if check and result.returncode != 0:
        raise AssertionError(f"aetcdcfg {' '.join(args)} exited {result.returncode}:\n{out}\n{err}")
    return result.returncode, out, err


async def test_get_prints_revision_and_masks_secrets(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        revision = await client.put_many(
            {etcd_prefix + "rate_limit": "5", etcd_prefix + "db/password": "hunter2"}
        )
    _, out, _ = await run("get", etcd_prefix, "--model", "svc_settings:Settings")
    assert f"at revision {revision}" in out
    assert f"{etcd_prefix}rate_limit = 5" in out
    assert "hunter2" not in out
    assert f"{etcd_prefix}db/password = **********" in out
    _, out, _ = await run("get", etcd_prefix, "--json", "--show-values")
    data = json.loads(out)
    assert data["revision"] == revision
    assert data["items"][etcd_prefix + "rate_limit"] == "5"


async def test_without_a_model_values_are_hidden_unless_show_values(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Without --model nothing says which values are secret, so none is printed unless asked."""
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        first = await client.put_many({p + "rate_limit": "5", p + "token": "hunter2"})
        await client.put(p + "token", "swordfish")
    hidden = {
        "get": await run("get", p),
        "get --json": await run("get", p, "--json"),
        "history": await run("history", p),
        "history --json": await run("history", p, "--json"),
        "diff": await run("diff", p, "--from", str(first)),
        "diff --json": await run("diff", p, "--from", str(first), "--json"),
    }
    for command, (_, out, err) in hidden.items():
        assert "hunter2" not in out and "swordfish" not in out, (command, out)
        assert "token" in out and "**********" in out, (command, out)
        assert "values hidden" in err and "--show-values" in err, (command, err)
    assert f"{p}rate_limit = **********" in hidden["get"][1]
    assert f"~ {p}token: ********** -> **********" in hidden["diff"][1]

    _, out, err = await run("get", p, "--show-values")
    assert f"{p}rate_limit = 5" in out and f"{p}token = swordfish" in out and err == ""
    _, out, _ = await run("history", p, "--show-values")
    assert f"~ {p}token: hunter2 -> swordfish" in out
    _, out, err = await run("get", p, "--model", "svc_settings:Settings")  # the model says: none secret
    assert f"{p}token = swordfish" in out and err == ""


async def test_watch_prints_events_and_exits_cleanly_on_sigint_and_sigterm(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        command = [SCRIPT, "watch", etcd_prefix, "--json", "--show-values"]
        async with await anyio.open_process(command) as proc:
            assert proc.stderr is not None
            assert proc.stdout is not None
            with anyio.fail_after(10):
                async for text in TextReceiveStream(proc.stderr):
                    if "# watching" in text:
                        break
            async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
                first = await client.put(etcd_prefix + "a", "1")
                await client.put_many({etcd_prefix + "b": "2", etcd_prefix + "c": "3"})
                await client.delete(etcd_prefix + "a")
            lines: list[dict[str, object]] = []
            buffer = ""
            with anyio.fail_after(10):
                async for text in TextReceiveStream(proc.stdout):
                    buffer += text
                    while "\n" in buffer:
                        line, buffer = buffer.split("\n", 1)
                        lines.append(json.loads(line))
                    if len(lines) >= 4:
                        break
            proc.send_signal(sig)
            with anyio.fail_after(10):
                code = await proc.wait()
        assert code == 0, sig
        assert [(e["revision"], e["type"], e["key"], e["value"]) for e in lines] == [
            (first, "PUT", etcd_prefix + "a", "1"),
            (first + 1, "PUT", etcd_prefix + "b", "2"),
            (first + 1, "PUT", etcd_prefix + "c", "3"),
            (first + 2, "DELETE", etcd_prefix + "a", None),
        ]


async def test_check_lists_every_problem_by_key(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "rate_limit": "7", etcd_prefix + "tags": '["x"]'})
        code, out, _ = await run("check", etcd_prefix, "--model", "svc_settings:Settings")
        assert code == 0
        assert out.startswith("OK:")
        await client.put_many({etcd_prefix + "rate_limit": "0", etcd_prefix + "tags": "not json"})
    code, out, _ = await run("check", etcd_prefix, "--model", "svc_settings:Settings", check=False)
    assert code == 1
    assert "INVALID" in out
    assert f"{etcd_prefix}tags: structured field needs JSON" in out
    # pydantic runs only once the values decode; the tags problem is reported first
    assert "rate_limit" not in out or "greater than or equal to 1" in out


async def test_push_validates_diffs_and_writes_one_revision(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "cfg.yaml").write_text(
        "rate_limit: 200\nmaintenance: true\ndb:\n  url: postgres://db/app\n  password: hunter2\ntags: [a, b]\n"
    )
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "100")
        _, out, _ = await run(
            "push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings", "--dry-run"
        )
        assert f"~ {etcd_prefix}rate_limit: 100 -> 200" in out
        assert f"+ {etcd_prefix}db/password = **********" in out
        assert "hunter2" not in out
        assert (await client.get_prefix(etcd_prefix)).items == {etcd_prefix + "rate_limit": b"100"}

        before = (await client.get_prefix(etcd_prefix)).revision
        _, out, _ = await run("push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings")
        assert "wrote 5 put(s)" in out
        written = int(out.strip().rsplit(" ", 1)[1])
        snapshot = await client.get_prefix(etcd_prefix)
        assert snapshot.items == {
            etcd_prefix + "rate_limit": b"200",
            etcd_prefix + "maintenance": b"true",
            etcd_prefix + "db/url": b"postgres://db/app",
            etcd_prefix + "db/password": b"hunter2",
            etcd_prefix + "tags": b'["a","b"]',
        }
        assert written == before + 1  # five keys, one transaction, one revision

        _, out, _ = await run("push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings")
        assert "no changes" in out


async def test_push_refuses_invalid_or_unknown_and_changes_nothing(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "bad.json").write_text(json.dumps({"rate_limit": 0, "tags": ["a"]}))
    (workdir / "typo.toml").write_text("rate_limt = 5\n")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        before = await client.put(etcd_prefix + "rate_limit", "100")
        code, out, _ = await run(
            "push", etcd_prefix, "bad.json", "--model", "svc_settings:Settings", check=False
        )
        assert code == 1
        assert f"{etcd_prefix}rate_limit: Input should be greater than or equal to 1" in out
        assert "nothing was written" in out
        code, out, _ = await run(
            "push", etcd_prefix, "typo.toml", "--model", "svc_settings:Settings", check=False
        )
        assert code == 1
        assert f"{etcd_prefix}rate_limt" in out
        snapshot = await client.get_prefix(etcd_prefix)
    assert snapshot.items == {etcd_prefix + "rate_limit": b"100"}
    assert snapshot.revision >= before


async def test_push_detects_a_change_made_after_the_reviewed_diff(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "cfg.json").write_text(json.dumps({"rate_limit": 300}))
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        reviewed = await client.put(etcd_prefix + "rate_limit", "100")
        await client.put(etcd_prefix + "maintenance", "true")  # someone else, after the review
        code, _, err = await run(
            "push", etcd_prefix, "cfg.json", "--model", "svc_settings:Settings",
            "--expect-revision", str(reviewed), check=False,
        )  # fmt: skip
        assert code == 1
        assert f"changed after revision {reviewed}; nothing was written" in err
        assert len(err.strip().splitlines()) == 1
        assert await client.get(etcd_prefix + "rate_limit") == b"100"


async def test_push_prune_deletes_keys_the_file_lacks(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "cfg.yaml").write_text("rate_limit: 5\n")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "rate_limit": "1", etcd_prefix + "maintenance": "true"})
        _, out, _ = await run("push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings")
        assert "kept (use --prune" in out
        assert await client.get(etcd_prefix + "maintenance") == b"true"
        _, out, _ = await run("push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings", "--prune")
        assert f"- {etcd_prefix}maintenance" in out
        assert (await client.get_prefix(etcd_prefix)).items == {etcd_prefix + "rate_limit": b"5"}


async def test_dump_then_push_round_trips_and_masked_secrets_keep_their_value(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    source = {
        "rate_limit": "42",
        "maintenance": "false",
        "db": '{"url": "postgres://whole"}',
        "db/url": "postgres://deeper",
        "db/password": "s3cret",
        "tags": '["a", "b"]',
        "notes": "  spaces and\nnewlines, NEL \x85 LS \u2028 PS \u2029 BOM \ufeff CR \r  ",
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "src/" + k: v for k, v in source.items()})
        for fmt in ("yaml", "json"):
            args = ["dump", etcd_prefix + "src/"] + (["--json"] if fmt == "json" else [])
            _, out, _ = await run(*args)
            (workdir / f"dump.{fmt}").write_text(out)
            target = f"{etcd_prefix}copy-{fmt}/"
            # notes is no field of the model, so this round trip goes through a permissive model
            (workdir / "loose.py").write_text(
                "from pydantic import BaseModel, ConfigDict\n"
                "class Loose(BaseModel):\n    model_config = ConfigDict(extra='allow')\n"
                "    rate_limit: str = ''\n    maintenance: str = ''\n    db: dict[str, str] = {}\n"
                "    tags: str = ''\n    notes: str = ''\n"
            )
            await run("push", target, f"dump.{fmt}", "--model", "loose:Loose")
            copied = (await client.get_prefix(target)).items
            assert {k[len(target) :]: v.decode() for k, v in copied.items()} == source

        # a dump with --model masks the secret; pushing it back keeps etcd's value
        await client.put_many(
            {etcd_prefix + "svc/db/password": "s3cret", etcd_prefix + "svc/rate_limit": "3"}
        )
        _, out, _ = await run("dump", etcd_prefix + "svc/", "--model", "svc_settings:Settings")
        assert "s3cret" not in out
        (workdir / "masked.yaml").write_text(out.replace("'3'", "'4'"))
        await run("push", etcd_prefix + "svc/", "masked.yaml", "--model", "svc_settings:Settings")
        assert await client.get(etcd_prefix + "svc/db/password") == b"s3cret"
        assert await client.get(etcd_prefix + "svc/rate_limit") == b"4"


async def start_dev(*args: str) -> tuple[Process, list[str]]:
    """``aetcdcfg dev`` started, and what it printed up to its export line."""
    proc = await anyio.open_process([SCRIPT, "dev", *args])
    assert proc.stdout is not None
    buffer = ""
    with anyio.fail_after(30):
        async for text in TextReceiveStream(proc.stdout):
            buffer += text
            if "export ETCD_ENDPOINTS=" in buffer and buffer.endswith("\n"):
                return proc, buffer.splitlines()
    raise AssertionError(f"aetcdcfg dev printed no export line: {buffer!r}")


async def stop_dev(proc: Process) -> None:
    async with proc:
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            assert await proc.wait() == 0


async def test_dev_comes_back_on_its_port_with_its_data_until_fresh(workdir: Path) -> None:
    port = free_port()
    try:
        proc, lines = await start_dev("--port", str(port))
        endpoint = f"http://127.0.0.1:{port}"
        data = workdir / ".etcd-data" / "m0.data"
        assert f"export ETCD_ENDPOINTS={endpoint}" in lines
        assert any(line.startswith(f"data in {data} (new, empty;") for line in lines), lines
        async with EtcdClient(endpoints=[endpoint]) as client:
            await client.put("/dev/k", "v")
        await stop_dev(proc)
        with pytest.raises(EtcdUnavailable):  # the dev etcd is gone
            async with EtcdClient(endpoints=[endpoint], connect_timeout=0.5):
                pass

        proc, lines = await start_dev("--port", str(port))  # restarted: same URL, same data
        assert any(line.startswith(f"data in {data} (the data of the last run;") for line in lines), lines
        async with EtcdClient(endpoints=[endpoint]) as client:
            assert await client.get("/dev/k") == b"v"
            # another one on the same port is refused, naming the port and what to do
            code, out, err = await run("dev", "--port", str(port), check=False)
            assert (code, out) == (2, "")
            assert err.startswith(f"aetcdcfg: usage: port {port} is in use") and "--port" in err, err
        await stop_dev(proc)

        proc, lines = await start_dev("--port", str(port), "--fresh")
        async with EtcdClient(endpoints=[endpoint]) as client:
            assert await client.get("/dev/k") is None
        await stop_dev(proc)
    finally:
        release(port)


def test_dev_defaults_to_etcds_port_and_a_data_dir_here() -> None:
    args = build_parser().parse_args(["dev"])
    assert (args.port, args.data_dir, args.fresh) == (2379, ".etcd-data", False)


async def test_unreachable_etcd_is_one_line_without_traceback(workdir: Path) -> None:
    code, out, err = await run(
        "get", "/x/", "--endpoints", "http://127.0.0.1:1", "--connect-timeout", "0.5", check=False
    )
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("aetcdcfg: EtcdUnavailable: no etcd endpoint reachable")
    assert "Traceback" not in err


def test_bad_model_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("check", "/x/", "--model", "nomodule") == 2
    assert "expected module:Class" in capsys.readouterr().err


async def test_check_takes_the_prefix_first_and_still_accepts_the_old_option(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    m = ("--model", "svc_settings:Settings")
    code, out, err = await run("check", "--prefix", etcd_prefix, *m)
    assert code == 0 and out.startswith("OK:"), out + err
    assert "--prefix is deprecated" in err and f"aetcdcfg check {etcd_prefix} --model" in err
    for args in (("check", *m), ("check", etcd_prefix, "--prefix", "/other/", *m)):
        code, out, err = await run(*args, check=False)
        assert (code, out) == (2, ""), args
        assert err.startswith("aetcdcfg: usage:") and "prefix" in err, err


def test_flatten_and_unflatten_are_inverse_for_dumped_text() -> None:
    items = {"a": b"1", "b/c": b"x", "b/d": b'{"k": 1}', "e": b"\xff\x00"}
    assert flatten(unflatten(items)) == items


#: A whole-object JSON value of NESTED_MODEL's ``db``, with secret fields at two depths.
NESTED_DB = json.dumps(
    {"url": "postgres://db", "password": "hunter2", "replicas": [{"user": "r", "token": "replica-tok"}]}
)
NESTED_MODEL = """
from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic_settings import BaseSettings


class Cred(BaseModel):
    user: str = ""
    token: SecretStr = SecretStr("")


class Database(BaseModel):
    url: str = "sqlite://"
    password: SecretStr = SecretStr("")
    replicas: list[Cred] = []


class Settings(BaseSettings):
    rate_limit: int = 100
    db: Database = Database()
    creds: dict[str, Cred] = {}
    keys: list[SecretBytes] = []
    maybe: Cred | None = None
"""

#: Each of these is a secret inside a whole-object JSON value.
NESTED_SECRETS = ("hunter2", "replica-tok", "eu-tok", "key-secret", "maybe-tok")


async def test_secrets_inside_whole_object_values_are_masked_by_every_command(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """``/svc/db`` = ``{"url": ..., "password": ...}``: the key points at a model, not at the secret
    field in it; every command with ``--model`` masks the secret fields inside (nested models,
    lists, dicts, optionals), shows the rest, and a masked dump pushed back keeps etcd's values."""
    (workdir / "nested_settings.py").write_text(NESTED_MODEL)
    m = ("--model", "nested_settings:Settings")
    p = etcd_prefix
    db = NESTED_DB
    values = {
        p + "db": db,
        p + "creds/eu": '{"user": "eu", "token": "eu-tok"}',
        p + "keys": '["key-secret"]',
        p + "maybe": '{"user": "m", "token": "maybe-tok"}',
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        first = await client.put(p + "rate_limit", "1")
        written = await client.put_many(values)
        outputs = {
            "get": (await run("get", p, *m))[1],
            "get --json": (await run("get", p, "--json", *m))[1],
            "dump": (await run("dump", p, *m))[1],
            "dump --json": (await run("dump", p, "--json", *m))[1],
            "history": (await run("history", p, *m))[1],
            "history --json": (await run("history", p, "--json", *m))[1],
            "diff": (await run("diff", p, "--from", str(first), *m))[1],
            "diff --json": (await run("diff", p, "--from", str(first), "--json", *m))[1],
            "set --dry-run": (
                await run("set", p, 'db={"url": "postgres://new", "password": "hunter2"}', "--dry-run", *m)
            )[1],
            "rollback --dry-run": (await run("rollback", p, "--to-revision", str(first), "--dry-run", *m))[1],
        }
        for command, text in outputs.items():
            leaked = [s for s in NESTED_SECRETS if s in text]
            assert not leaked, f"{command} printed {leaked}:\n{text}"
        # what is not secret still shows
        assert "postgres://db" in outputs["get"] and '"user": "eu"' in outputs["get"]
        assert f"{p}keys = " in outputs["get"] and "**********" in outputs["get"]
        assert "postgres://new" in outputs["set --dry-run"]
        items = json.loads(outputs["get --json"])["items"]
        assert json.loads(items[p + "db"]) == {
            "url": "postgres://db",
            "password": "**********",
            "replicas": [{"user": "r", "token": "**********"}],
        }
        assert json.loads(items[p + "keys"]) == ["**********"]

        # a masked dump pushed back (YAML and JSON) writes nothing: etcd keeps every secret
        for fmt in ("yaml", "json"):
            (workdir / f"nested.{fmt}").write_text(outputs["dump" if fmt == "yaml" else "dump --json"])
            _, out, _ = await run("push", p, f"nested.{fmt}", *m)
            assert "no changes" in out, out
        snapshot = await client.get_prefix(p)
        assert snapshot.revision == written
        assert {k: v.decode() for k, v in snapshot.items.items()} == {p + "rate_limit": "1", **values}


def test_masked_fields_are_restored_from_etcds_value_or_refused_when_it_has_none() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(NESTED_MODEL, "nested_settings", "exec", dont_inherit=True), namespace)  # as --model
    secrets = Secrets(namespace["Settings"])
    current = b'{"url": "u", "password": "pw", "replicas": [{"user": "a", "token": "t0"}]}'
    masked = secrets.mask("db", current)
    assert json.loads(masked) == {
        "url": "u",
        "password": "**********",
        "replicas": [{"user": "a", "token": "**********"}],
    }
    assert secrets.restore("db", masked, current) == current  # etcd's exact bytes: no change
    edited = masked.replace(b'"u"', b'"v"')
    assert json.loads(secrets.restore("db", edited, current) or b"") == {
        "url": "v",
        "password": "pw",
        "replicas": [{"user": "a", "token": "t0"}],
    }
    with pytest.raises(MaskedSecretMissing) as missing:  # a second replica etcd never had
        secrets.restore("db", masked.replace(b"}]", b'}, {"token": "**********"}]'), current)
    assert missing.value.path == ("replicas", "1", "token")
    assert secrets.mask("rate_limit", b"5") == b"5" and not secrets.holds("rate_limit")
    assert secrets.mask("db", b"{not json") == b"**********"  # cannot tell where the secret is
    assert secrets.mask("creds/eu", b'{"user": "x", "token": ""}') == b'{"user": "x", "token": ""}'
    assert Secrets(None).mask("db", current) == current


ALIASED_MODEL = """
from pydantic import AliasChoices, AliasPath, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings


class Vault(BaseModel):
    password: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("PASS", "pw"))
    url: str = ""


class Settings(BaseSettings):
    rate_limit: int = Field(100, ge=1, alias="rps")
    token: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("api_token", "TOKEN"))
    vault: Vault = Field(Vault(), alias="secrets")
    login: SecretStr = Field(SecretStr(""), validation_alias=AliasPath("account", "password"))
"""


def test_secrets_under_alias_keys_and_aliases_inside_json_values_are_masked() -> None:
    """Keys spelled as pydantic reads the fields: a secret under an AliasChoices choice, a secret
    named by a nested field's alias inside a whole-object value, and inside an AliasPath's head."""
    namespace: dict[str, Any] = {}
    exec(compile(ALIASED_MODEL, "aliased_settings", "exec", dont_inherit=True), namespace)  # as --model
    secrets = Secrets(namespace["Settings"])
    assert secrets.mask("api_token", b"tok") == b"**********"
    assert secrets.mask("TOKEN", b"tok") == b"**********"
    assert secrets.mask("secrets/pw", b"pw") == b"**********"
    assert json.loads(secrets.mask("secrets", b'{"PASS": "pw", "url": "u"}')) == {
        "PASS": "**********",
        "url": "u",
    }
    assert json.loads(secrets.mask("account", b'{"password": "pw", "x": 1}')) == {
        "password": "**********",
        "x": 1,
    }
    assert secrets.restore(
        "account", b'{"password": "**********", "x": 1}', b'{"password": "pw", "x": 1}'
    ) == (b'{"password": "pw", "x": 1}')
    assert secrets.mask("rps", b"5") == b"5"


async def test_check_and_get_read_keys_by_the_names_pydantic_validates(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """``--model`` reads alias keys as LiveSettings does: check accepts them and names the alias key
    of a bad value; get masks a secret under an alias key; set refuses a key the model does not read."""
    (workdir / "aliased_settings.py").write_text(ALIASED_MODEL)
    m = ("--model", "aliased_settings:Settings")
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({p + "rps": "5", p + "api_token": "hunter2", p + "secrets/PASS": "hunter3"})
        _, out, _ = await run("check", p, *m)
        assert out.startswith("OK:"), out
        _, out, _ = await run("get", p, *m)
        assert "hunter" not in out and f"{p}api_token = **********" in out and f"{p}rps = 5" in out
        await client.put(p + "rps", "0")
        code, out, _ = await run("check", p, *m, check=False)
        assert code == 1 and f"{p}rps: Input should be greater than or equal to 1" in out, out
        code, out, _ = await run("set", p, "rate_limit=5", *m, check=False)  # its name is not read
        assert code != 0 and "REFUSED" in out and f"{p}rate_limit" in out, out


DATED_MODEL = """
import datetime

from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    day: datetime.date | None = None
    at: datetime.datetime | None = None
    tags: list[str] = []
"""


async def test_bad_input_is_one_line_and_a_non_zero_exit_never_a_traceback(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    m = ("--model", "svc_settings:Settings")
    (workdir / "cfg.yaml").write_text("rate_limit: 5\n")
    (workdir / "odd.yaml").write_text("tags: !!set {a, b}\n")  # a YAML set: no JSON for it
    parser_errors = [
        ("history", p, "--limit", "0"),
        ("history", p, "--max-revisions", "-1"),
        ("diff", p, "--from", "0"),
        ("diff", p, "--from", "1", "--to", "0"),
        ("rollback", p, "--to-revision", "0", *m),
        ("rollback", p, "--to-revision", "x", *m),
        ("rollback", p, "--to-revision", str(2**63), *m),  # past etcd's int64 revisions
        ("diff", p, "--from", str(2**64)),
        ("watch", p, "--from-revision", "0"),
        ("push", p, "cfg.yaml", "--expect-revision", "0", *m),
        ("set", p, "rate_limit=caf\udce9", *m),  # a byte that is not UTF-8, as the shell passed it
        ("get", "/caf\udce9/"),
    ]
    for args in parser_errors:
        with anyio.fail_after(30):
            code, out, err = await run(*args, check=False)
        assert (code, out) == (2, ""), (args, code, out, err)
        assert "Traceback" not in err, (args, err)
        assert err.splitlines()[-1].startswith("aetcdcfg"), (args, err)
        assert "error:" in err.splitlines()[-1], (args, err)
    code, out, err = await run("push", p, "odd.yaml", *m, check=False)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("aetcdcfg: usage: 'odd.yaml': tags: a set"), err


async def test_errors_about_bad_input_never_print_what_may_be_a_secret(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """PyYAML's own message quotes the offending line (``password: hunter2: ...``), and a
    ``KEY=VALUE`` with no key was echoed whole: both land in CI logs. Where and what only."""
    m = ("--model", "svc_settings:Settings")
    (workdir / "bad.yaml").write_text("rate_limit: 200\ndb:\n  password: hunter2: very-secret\n")
    for args in (("push", etcd_prefix, "bad.yaml", *m, "--dry-run"), ("set", etcd_prefix, "=hunter2", *m)):
        with anyio.fail_after(30):
            code, out, err = await run(*args, check=False)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
        assert "hunter2" not in err, err
    code, _, err = await run("push", etcd_prefix, "bad.yaml", *m, check=False)
    assert err.strip() == (
        "aetcdcfg: usage: 'bad.yaml' is not valid YAML: mapping values are not allowed here at line 3, column 20"
    )


async def test_a_key_another_spelling_of_its_field_shadows_is_refused_not_written(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Field names match case-insensitively and ignore empty path parts, so ``RATE_LIMIT=5`` and
    ``rate_limit/=7`` were accepted beside etcd's ``rate_limit``: written, "wrote 1 put(s)", exit
    0, and the service kept building rate_limit from ``rate_limit``. Refused, naming the key to write."""
    m = ("--model", "svc_settings:Settings")
    (workdir / "shadow.yaml").write_text("RATE_LIMIT: 9\n")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "150")
        for args in (
            ("set", etcd_prefix, "RATE_LIMIT=5", *m),
            ("set", etcd_prefix, "rate_limit/=7", *m),
            ("push", etcd_prefix, "shadow.yaml", *m),
        ):
            with anyio.fail_after(30):
                code, out, err = await run(*args, check=False)
            assert code == 1 and err == "", (args, code, out, err)
            assert out.startswith("REFUSED: ") and out.rstrip().endswith("nothing was written"), out
            assert f"(its field is read from {etcd_prefix}rate_limit: write that key)" in out, out
        assert (await client.get_prefix(etcd_prefix)).items == {etcd_prefix + "rate_limit": b"150"}
        code, out, _ = await run("set", etcd_prefix, "rate_limit=5", *m)
        assert code == 0 and await client.get(etcd_prefix + "rate_limit") == b"5"


async def test_dates_in_yaml_and_toml_files_are_written_as_iso_8601_text(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "dated.py").write_text(DATED_MODEL)
    (workdir / "dated.yaml").write_text("day: 2024-01-31\nat: 2024-01-31 10:20:30\n")
    (workdir / "dated.toml").write_text("day = 2024-02-29\nat = 2024-02-29T10:20:30+02:00\n")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        for name, expected in (
            ("dated.yaml", {"day": b"2024-01-31", "at": b"2024-01-31T10:20:30"}),
            ("dated.toml", {"day": b"2024-02-29", "at": b"2024-02-29T10:20:30+02:00"}),
        ):
            target = f"{etcd_prefix}{name}/"
            code, out, err = await run("push", target, name, "--model", "dated:Settings", check=False)
            assert code == 0, out + err
            items = (await client.get_prefix(target)).items
            assert {k[len(target) :]: v for k, v in items.items()} == expected


#: Path segments of keys: text of any kind, no "/" (which separates them) and not empty.
SEGMENTS = st.text(min_size=1, max_size=6).filter(lambda s: "/" not in s)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join),
        st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=12)),
        max_size=6,
    )
)
def test_yaml_dump_then_push_round_trips_any_value_byte_for_byte(items: dict[str, bytes]) -> None:
    """What ``dump`` prints (plus print's newline), read back as ``push`` reads a file, is the same
    keys and bytes: any text (U+0085 NEL, U+2028, U+FEFF, CR, control characters, long lines) and
    bytes that are not UTF-8 (``!!binary``)."""
    text = dumps(items, as_json=False, header="# a header\n") + "\n"
    assert flatten(loads(text.encode(), ".yaml", "dump.yaml")) == items


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join),
        st.text(max_size=200).map(str.encode),
        max_size=6,
    )
)
def test_json_dump_then_push_round_trips_any_text_byte_for_byte(items: dict[str, bytes]) -> None:
    """The same for ``dump --json`` and any text (bytes that are not UTF-8 it writes as
    ``{"base64": ...}``, which push reads as a mapping: the README says to use YAML for those)."""
    text = dumps(items, as_json=True) + "\n"
    assert flatten(loads(text.encode(), ".json", "dump.json")) == items


@pytest.mark.parametrize("value", ["a\x85b", "x\u2028y\u2029z", "\ufeffbom", "cr\r\nlf", "tab\there  "])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_dump_then_push_keeps_line_breaks_yaml_would_fold(value: str, suffix: str) -> None:
    items = {"notes": value.encode(), "k\x85ey/nested": value.encode()}
    text = dumps(items, as_json=suffix == ".json") + "\n"
    assert flatten(loads(text.encode(), suffix, "dump" + suffix)) == items


async def test_push_takes_the_prefix_first_and_the_old_spelling_still_works_with_a_note(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """``push PREFIX FILE`` like every other command; ``push FILE --prefix PREFIX`` is deprecated."""
    (workdir / "cfg.yaml").write_text("rate_limit: 7\n")
    m = ("--model", "svc_settings:Settings")
    code, out, err = await run("push", "cfg.yaml", "--prefix", etcd_prefix, *m)
    assert code == 0 and "wrote 1 put(s)" in out
    assert (
        f"deprecated: give the prefix first, as other commands take it (aetcdcfg push {etcd_prefix} cfg.yaml"
        in err
    )
    code, _, err = await run("push", etcd_prefix, *m, check=False)
    assert code == 2 and err.strip() == (
        "aetcdcfg: usage: push needs the prefix and the file: aetcdcfg push /myservice/ cfg.yaml --model ..."
    )
    code, _, err = await run("push", etcd_prefix, "cfg.yaml", "--prefix", "/other/", *m, check=False)
    assert code == 2 and "two prefixes given" in err
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        assert (await client.get_prefix(etcd_prefix)).items == {etcd_prefix + "rate_limit": b"7"}


async def test_dump_then_push_through_etcd_keeps_line_breaks_byte_for_byte(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The pure round trip (above) through the console script and etcd: U+0085, which YAML reads as
    a line break, in a value and in a key, and the other breaks YAML would fold come back from
    ``dump`` then ``push`` as the same bytes (a model reads values as text, as from the environment:
    bytes that are not UTF-8 are refused by ``push``, not mangled)."""
    (workdir / "raw_settings.py").write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "class Raw(BaseModel):\n    model_config = ConfigDict(extra='allow')\n"
        "    notes: str = ''\n    tree: dict[str, str] = {}\n"
    )
    source = {
        "notes": "nel\x85 ls\u2028 ps\u2029 \ufeffbom cr\r\n trailing  ".encode(),
        "tree/k\x85ey": "a\x85b".encode(),
        "tree/plain": b"1",
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "src/" + k: v for k, v in source.items()})
        _, out, _ = await run("dump", etcd_prefix + "src/")
        (workdir / "dump.yaml").write_bytes(out.encode())
        await run("push", etcd_prefix + "copy/", "dump.yaml", "--model", "raw_settings:Raw")
        copied = (await client.get_prefix(etcd_prefix + "copy/")).items
    assert {k.removeprefix(etcd_prefix + "copy/"): v for k, v in copied.items()} == source


async def watch_lines(etcd_prefix: str, writes: dict[str, str], *args: str) -> list[str]:
    """``aetcdcfg watch PREFIX *args``: its output lines for ``writes`` (one txn), then SIGINT."""
    async with await anyio.open_process([SCRIPT, "watch", etcd_prefix, *args]) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        with anyio.fail_after(10):
            async for text in TextReceiveStream(proc.stderr):
                if "# watching" in text:
                    break
        async with EtcdClient() as client:
            await client.put_many(writes)
        lines: list[str] = []
        buffer = ""
        with anyio.fail_after(10):
            async for text in TextReceiveStream(proc.stdout):
                buffer += text
                *done, buffer = buffer.split("\n")
                lines += done
                if len(lines) >= len(writes):
                    break
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await proc.wait() == 0
    return lines


async def test_watch_and_canary_status_mask_secrets_inside_whole_object_values(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The two commands the test above leaves out: ``watch --model`` (text and ``--json``) and
    ``canary status --model`` show the non-secret part of a whole-object JSON value and mask the
    secret fields inside it."""
    from aetcdcfg._canary import CANARY_ROOT, CanarySpec, Selector

    (workdir / "nested_settings.py").write_text(NESTED_MODEL)
    m = ("--model", "nested_settings:Settings")
    p = etcd_prefix
    db = NESTED_DB
    values = {
        "db": db,
        "creds/eu": '{"user": "eu", "token": "eu-tok"}',
        "keys": '["key-secret"]',
        "maybe": '{"user": "m", "token": "maybe-tok"}',
    }
    outputs = {
        "watch": "\n".join(await watch_lines(p, {p + k: v for k, v in values.items()}, *m)),
        "watch --json": "\n".join(await watch_lines(p, {p + k: v for k, v in values.items()}, "--json", *m)),
    }
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        base = await client.put(p + "rate_limit", "1")
        spec = CanarySpec(Selector.parse("zone=b"), base, tuple(p + k for k in values), "alice", 0.0)
        canary = CANARY_ROOT + p
        await client.put_many(
            {canary + "spec": spec.to_json(), **{canary + "values/" + k: v for k, v in values.items()}}
        )
    outputs["canary status"] = (await run("canary", "status", p, *m))[1]
    for command, text in outputs.items():
        leaked = [s for s in NESTED_SECRETS if s in text]
        assert not leaked, f"{command} printed {leaked}:\n{text}"
        assert "postgres://db" in text and "**********" in text, f"{command}:\n{text}"
    (db_event,) = [json.loads(line) for line in outputs["watch --json"].splitlines() if p + "db" in line]
    assert json.loads(db_event["value"]) == {
        "url": "postgres://db",
        "password": "**********",
        "replicas": [{"user": "r", "token": "**********"}],
    }
    assert f"~ {p}creds/eu = " in outputs["canary status"] and '"user": "eu"' in outputs["canary status"]
