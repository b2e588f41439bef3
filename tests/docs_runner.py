"""Runs the examples of README.md and docs/**/*.md as a reader would, against a real etcd.

What a page's fenced blocks mean (in document order, in one project directory per page):

- ``title="name"`` on any block: the block is a file of the reader's project, written there
  (``title="app.py (continued)"`` appends to ``app.py``). Every page starts with the files of
  ``docs/getting-started.md``, so a page can continue the quickstart's ``app.py``.
- ```` ```python ```` without a title: a complete program, run as ``python example.py`` in the project
  directory against an empty etcd (every key is deleted first); it must exit 0.
- ```` ```console ````: ``$ command`` lines run by bash in the project directory, each followed by the
  output it must print (stdout and stderr together). In expected output, a line ``...`` stands for
  any lines and ``...`` inside a line for any text. A command may exit non-zero only where its expected
  output shows the CLI's error or refusal (a line ``aetcdcfg: ...`` or ``REFUSED...``). ``curl`` and ``aetcdcfg instances`` are retried until their output matches
  (a service applies a change, and writes its instance record, milliseconds after the write). Long-running commands run in the
  background: ``aetcdcfg dev`` (its first lines are checked, then it serves the rest of the page),
  ``uvicorn`` (until the page ends, or the next ``uvicorn`` line restarts it) and ``aetcdcfg watch`` (its lines are checked, then Ctrl-C, exit 0). A trailing ``&`` is
  allowed on these, as in a terminal.
  ``export NAME=value`` sets the environment of later commands.
- ``<!-- example: skip REASON -->`` on the line before a block: not run (keep these few).

Ports: 2379 and 8000 in commands and output are replaced by free ports (``aetcdcfg dev`` and
``uvicorn`` without ``--port`` are given one), so examples can say what a
reader would type. Every page gets a fresh single-member etcd (``ETCD_ENDPOINTS``), so the revisions
its commands print are the same at every run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from aetcdcfg.testing import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
QUICKSTART = DOCS / "getting-started.md"
PORTS = ("2379", "8000")
SKIP = re.compile(r"<!--\s*example:\s*skip\s+(?P<reason>\S.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)\s*(?P<lang>[\w+-]*)(?P<info>[^`]*)$")
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
CONTINUED = " (continued)"
RUN_TIMEOUT = 90.0
BACKGROUND_TIMEOUT = 30.0


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    title: str | None
    skip: str | None  # the reason, when marked to be skipped
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        if self.skip is not None:
            return "skipped"
        if self.title is not None:
            return "file"
        return {"python": "python", "console": "console"}.get(self.lang, "other")


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their titles and skip markers."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(previous)
        title = TITLE.search(match["info"])
        found.append(
            Block(
                page=page,
                line=start + 1,
                lang=match["lang"],
                title=title["title"] if title else None,
                skip=skip["reason"] if skip else None,
                text="\n".join(body) + "\n",
            )
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def matches(expected: str, actual: str) -> bool:
    """doctest-like: a line ``...`` is any lines, ``...`` inside a line is any text; runs of spaces
    count as one (pytest pads its progress line to the terminal's width)."""
    pattern = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            pattern.append(re.escape(_squeeze(line)).replace(r"\.\.\.", r"[^\n]*") + r"\n")
    text = "\n".join(_squeeze(line) for line in actual.rstrip("\n").splitlines()) + "\n"
    if not expected.strip():
        return not actual.strip()
    return re.fullmatch("".join(pattern), text) is not None


def _squeeze(line: str) -> str:
    return re.sub(r"[ \t]+", " ", line.rstrip())


@dataclasses.dataclass
class Command:
    line: str
    expected: str


def commands(block: Block) -> list[Command]:
    """``$ command`` lines (a trailing ``\\`` continues one) with the output shown after each."""
    found: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise AssertionError(f"{block.where}: console output before any '$ ' command: {lines[i]!r}")
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        found.append(Command(command, "\n".join(output)))
    return found


class Project:
    """One page's run: its directory, its etcd, its environment and its background processes."""

    def __init__(self, page: Path, directory: Path, etcd: EtcdServer) -> None:
        self.page = page
        self.dir = directory
        self.etcd = etcd
        self.ports = {doc: str(free_port()) for doc in PORTS}
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "ETCD_ENDPOINTS": etcd.endpoint,
            "COLUMNS": "100",
            "LOG_LEVEL": "warning",
        }
        for name in list(self.env):
            if name.startswith("ETCD_") and name != "ETCD_ENDPOINTS":
                del self.env[name]  # a developer's own credentials must not leak into examples
        self.background: list[tuple[str, subprocess.Popen[str]]] = []
        self.ran = 0

    # -- ports ----------------------------------------------------------------------------------------

    def localize(self, text: str) -> str:
        """The doc's ports (2379, 8000) as this run's free ports."""
        return re.sub(r"\b(2379|8000)\b", lambda m: self.ports[m[1]], text)

    # -- blocks ---------------------------------------------------------------------------------------

    def write(self, block: Block) -> None:
        assert block.title is not None
        name = block.title.removesuffix(CONTINUED)
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if block.title.endswith(CONTINUED):
            assert path.exists(), f"{block.where}: continues {name}, which no block wrote before"
            with path.open("a") as file:
                file.write("\n" + block.text)
        else:
            path.write_text(block.text)

    def run_python(self, block: Block) -> None:
        self.etcd.etcdctl("del", "", "--from-key=true")
        script = self.dir / f"example_{block.line}.py"
        script.write_text(block.text)
        result = subprocess.run(
            [sys.executable, script.name],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, (
            f"{block.where}: the example exited {result.returncode}\n--- stdout\n{result.stdout}"
            f"--- stderr\n{result.stderr}"
        )
        self.ran += 1

    def run_console(self, block: Block) -> None:
        for command in commands(block):
            self.run_command(block, command)
        self.ran += 1

    def run_command(self, block: Block, command: Command) -> None:
        line = self.localize(command.line)
        expected = self.localize(command.expected)
        words = shlex.split(line, comments=True)
        where = f"{block.where}: $ {command.line}"
        if not words:
            return
        if words[-1] == "&":  # backgrounded as in a terminal: the long-running ones run so anyway
            words = words[:-1]
            line = shlex.join(words)
        if words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = value
            return
        if words[0] == "uvicorn":
            self.start_uvicorn(where, words)
            return
        if words[:2] == ["aetcdcfg", "dev"] and "--port" not in words:  # never the machine's 2379
            words = [*words, "--port", self.ports["2379"]]
            line = shlex.join(words)
        if words[:2] in (["aetcdcfg", "dev"], ["aetcdcfg", "watch"]):
            self.run_background(where, line, expected, interrupt=words[1] == "watch")
            return
        read_only = words[0] == "curl" or words[:2] == ["aetcdcfg", "instances"]
        deadline = time.monotonic() + (10.0 if read_only else 0.0)
        while True:
            result = subprocess.run(
                ["bash", "-c", line],
                cwd=self.dir,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
            ok = matches(expected, result.stdout)
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ok, f"{where}\n--- expected\n{expected}\n--- got (exit {result.returncode})\n{result.stdout}"
        failed_as_shown = any(out.startswith(("aetcdcfg: ", "REFUSED")) for out in expected.splitlines())
        assert result.returncode == 0 or failed_as_shown, (
            f"{where}: exit {result.returncode}\n{result.stdout}"
        )

    def run_background(self, where: str, line: str, expected: str, *, interrupt: bool) -> None:
        """Start ``line``; check that its first lines are ``expected``; Ctrl-C it if ``interrupt``."""
        process = subprocess.Popen(
            ["bash", "-c", "exec " + line],
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.background.append((line, process))
        wanted = len(expected.splitlines())
        got: list[str] = []
        deadline = time.monotonic() + BACKGROUND_TIMEOUT
        assert process.stdout is not None
        while len(got) < wanted and time.monotonic() < deadline:
            out = process.stdout.readline()
            if not out:
                break
            got.append(out)
        assert matches(expected, "".join(got)), f"{where}\n--- expected\n{expected}\n--- got\n{''.join(got)}"
        if interrupt:
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=BACKGROUND_TIMEOUT)
            assert code == 0, f"{where}: exit {code} after Ctrl-C"

    def start_uvicorn(self, where: str, words: list[str]) -> None:
        """Serve the app as the page says; a second ``uvicorn`` line restarts it (Ctrl-C, run again)."""
        for line, running in self.background:
            if line.startswith("uvicorn ") and running.poll() is None:
                running.send_signal(signal.SIGINT)
                running.wait(timeout=BACKGROUND_TIMEOUT)
        if "--port" not in words:
            words = [*words, "--port", self.ports["8000"]]
        port = int(words[words.index("--port") + 1])
        with (self.dir / "uvicorn.log").open("w") as log:  # the child keeps its own copy of the fd
            process = subprocess.Popen(
                words,
                cwd=self.dir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.background.append((" ".join(words), process))
        deadline = time.monotonic() + BACKGROUND_TIMEOUT
        while True:
            assert process.poll() is None, (
                f"{where}: uvicorn exited\n{(self.dir / 'uvicorn.log').read_text()}"
            )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"{where}: uvicorn never listened"
                time.sleep(0.1)

    def stop(self) -> None:
        for _, process in reversed(self.background):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for _, process in reversed(self.background):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def quickstart_files(directory: Path) -> None:
    """Write the quickstart's files, as a reader who followed it has them."""
    for block in blocks(QUICKSTART):
        if block.kind == "file" and not block.title.endswith(CONTINUED):  # type: ignore[union-attr]
            (directory / block.title).write_text(block.text)  # type: ignore[operator]


def run_page(page: Path, directory: Path) -> Iterator[Block]:
    """Run every block of ``page`` in order; yields each block run (or skipped)."""
    if page != QUICKSTART:
        quickstart_files(directory)
    with EtcdServer() as etcd:
        project = Project(page, directory, etcd)
        try:
            for block in blocks(page):
                if block.kind == "file":
                    project.write(block)
                elif block.kind == "python":
                    project.run_python(block)
                elif block.kind == "console":
                    project.run_console(block)
                yield block
        finally:
            project.stop()
