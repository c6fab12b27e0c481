"""`gateway`'s parser, built whole or for one command (what each process builds)."""

from __future__ import annotations

import argparse

import pytest

from gateway_cli.main import COMMANDS, build_parser


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_commands_names_every_command() -> None:
    assert set(commands(build_parser())) == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_one_commands_parser_has_everything_the_whole_one_has(command: str) -> None:
    """A process builds only its own command's part: the same subcommands and options."""

    def shape(parser: argparse.ArgumentParser) -> object:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        options = sorted(o for a in parser._actions for o in a.option_strings)
        return options, {n: shape(p) for s in subs for n, p in s.choices.items()}

    assert shape(commands(build_parser(command))[command]) == shape(
        commands(build_parser())[command]
    )
