"""ServerOptions: every server option once; the CLI and the workers derive from it."""

from __future__ import annotations

import math
import typing
from typing import Any

import attrs
import pytest

from triomilter import Milter, ServerOptions
from triomilter._options import ServerOptionsKwargs
from triomilter.cli import _options, _parser


def test_defaults() -> None:
    options = ServerOptions()
    assert options.io_timeout == 7210.0  # libmilter's
    assert options.handler_timeout is None  # the milter's own
    assert options.max_connections == 10_000
    limits = options.limits_for(Milter("m"))
    assert limits.handler_timeout == 8.0 and limits.eom_timeout == 240.0


def test_options_win_over_the_milters_deadlines() -> None:
    milter = Milter("m", handler_timeout=2.0, eom_timeout=60.0)
    assert ServerOptions().limits_for(milter).handler_timeout == 2.0
    limits = ServerOptions(handler_timeout=1.0, eom_timeout=9.0).limits_for(milter)
    assert (limits.handler_timeout, limits.eom_timeout) == (1.0, 9.0)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("io_timeout", 0, ValueError),
        ("io_timeout", -1.0, ValueError),
        ("io_timeout", math.nan, ValueError),
        ("io_timeout", math.inf, ValueError),
        ("io_timeout", "10", TypeError),
        ("handler_timeout", 0.0, ValueError),
        ("shutdown_grace", -1.0, ValueError),
        ("max_connections", 0, ValueError),
        ("max_connections", 1.5, TypeError),
        ("max_data_size", 1000, ValueError),
        ("backlog", 0, ValueError),
        ("socket_mode", 0o10000, ValueError),
        ("thread_limit", 0, ValueError),
    ],
)
def test_validated_once_when_made(field: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        attrs.evolve(ServerOptions(), **{field: value})


def test_the_serve_keyword_arguments_are_the_fields() -> None:
    keys = set(typing.get_type_hints(ServerOptionsKwargs))
    assert keys == {field.name for field in attrs.fields(ServerOptions)}


def test_every_flag_comes_from_a_field() -> None:
    flags = {meta["flag"] for _, meta in ServerOptions.flags()}
    wanted = {"--io-timeout", "--handler-timeout", "--max-connections", "--keep-stale-socket"}
    assert wanted <= flags
    args = _parser().parse_args(["serve", "m.py", "--socket", "fd:3"])
    # Each flag's default is the field's default: the defaults are written once.
    assert _options(args) == ServerOptions()


def test_parsed_flags_make_the_options() -> None:
    args = _parser().parse_args(
        [
            "serve",
            "m.py",
            "--socket",
            "inet:0@127.0.0.1",
            "--io-timeout",
            "60",
            "--handler-timeout",
            "2.5",
            "--socket-mode",
            "660",
            "--keep-stale-socket",
        ]
    )
    assert _options(args) == ServerOptions(
        io_timeout=60.0, handler_timeout=2.5, socket_mode=0o660, remove_stale_socket=False
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"io_timeout": 30.5, "max_connections": 7},
        {"socket_mode": 0o640, "remove_stale_socket": False, "backlog": 16},
        {"handler_timeout": 1.0, "eom_timeout": 100.0, "progress_interval": 0.5},
        {"stall_warning": 0.25, "thread_limit": 3, "max_data_size": 262143},
    ],
)
def test_to_argv_round_trips_through_the_cli(changes: dict[str, Any]) -> None:
    """What --workers hands its workers is exactly what the parent was given."""
    options = ServerOptions(**changes)
    argv = ["serve", "m.py", "--socket", "fd:3", *options.to_argv()]
    assert _options(_parser().parse_args(argv)) == options
