"""The command's help is complete and its reference cannot drift from the parser (no etcd needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import aetcdcfg
from aetcdcfg.cli import build_parser, cli, reference

REPO = Path(__file__).resolve().parent.parent

#: What only commands that talk to etcd take.
CONNECTION = {
    "--endpoints",
    "--username",
    "--password",
    "--ca-file",
    "--cert-file",
    "--key-file",
    "--connect-timeout",
    "--request-timeout",
}


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli("--version")
    assert done.value.code == 0
    assert capsys.readouterr().out == f"aetcdcfg {aetcdcfg.__version__}\n"


def test_every_command_has_a_summary_and_a_description() -> None:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {choice.dest: choice.help for choice in sub._choices_actions}
    assert set(summaries) == set(commands())
    for name, parser in commands().items():
        assert summaries[name], f"{name} has no one-line summary in `aetcdcfg --help`"
        assert parser.description and len(parser.description) > len(summaries[name] or ""), name


def test_every_argument_of_every_command_has_help() -> None:
    parsers = {"aetcdcfg": build_parser(), **commands()}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            label = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {label} has no help"


def test_dev_takes_no_connection_options_and_the_others_take_them_all() -> None:
    for name, parser in commands().items():
        if name == "dev":
            assert not options(parser) & CONNECTION, options(parser) & CONNECTION
        else:
            assert options(parser) >= CONNECTION, name


def test_every_command_takes_the_prefix_positionally() -> None:
    for name, parser in commands().items():
        if name == "dev":  # dev has none
            continue
        if name == "canary":  # canary status|promote|abort PREFIX, as the issue spells it
            assert [a.dest for a in parser._actions if not a.option_strings] == ["action", "prefix"]
            continue
        positional = [a.dest for a in parser._actions if not a.option_strings]
        assert positional[:1] == ["prefix"], (name, positional)


def test_the_reference_names_every_command_and_option() -> None:
    text = reference()
    for name, parser in commands().items():
        assert f"## `aetcdcfg {name}`" in text
        for option in options(parser):
            assert option in text, (name, option)
    assert "aetcdcfg --version" in text or "--version" in text


def test_the_reference_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = reference()
    monkeypatch.setenv("COLUMNS", "300")
    assert reference() == narrow


def test_a_checked_in_reference_matches_the_parser() -> None:
    """``docs/cli.md`` is ``reference()``'s output; regenerate it when this fails (see its header)."""
    page = REPO / "docs" / "cli.md"
    if not page.exists():
        pytest.skip("docs/cli.md is not checked in yet")
    assert page.read_text() == reference()
