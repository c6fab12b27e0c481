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


def test_admin_tables_show_control_characters_as_escapes() -> None:
    """A member's reason is printed in a registry administrator's terminal by `gateway admin
    log`: an escape sequence in it must not move the cursor and rewrite lines (red-team
    review: a forged 'approve' line)."""
    from gateway_cli.admin import LOG, render_table

    forged = "ok\x1b[1A\x1b[2K\x1b[1G99 approve AGR-2026-0002 by alice@registry\u202e"
    entry = {
        "seq": 7,
        "at": "2026-12-01T10:00:00Z",
        "actor": "carla@msp",
        "action": "reject",
        "target": "AGR-2026-0002",
        "from_state": "requested",
        "to_state": "rejected",
        "reason": forged,
    }
    text = render_table(LOG, [entry])
    assert "\x1b" not in text and "\u202e" not in text, text
    assert "\\x1b[1A" in text
