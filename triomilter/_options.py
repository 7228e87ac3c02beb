"""`ServerOptions`: every option of a server, written once.

Defaults, validation, help texts and command-line flags all come from the
fields below: `serve`/`serve_listener` take a `ServerOptions`, the CLI builds
its flags from the fields' metadata, and ``--workers`` turns the parent's
options back into flags for its workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, TypedDict

import attrs

from ._milter import DEFAULT_EOM_TIMEOUT, DEFAULT_HANDLER_TIMEOUT, Milter
from .protocol import MAX_DATA_SIZE

DEFAULT_MAX_CONNECTIONS = 10_000
"""About 80 MiB of idle connections at ~8 KiB each (benchmarks W5): what a
milter host next to one MTA needs, far below what exhausts it."""


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None and attribute.default is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be a number, got {value!r}")
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be a number, got {value!r}")
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be zero or more seconds, got {value}")


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[Any], int | None], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is None and attribute.default is None:
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{attribute.name} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{attribute.name} must be at least {minimum}, got {value}")

    return check


def _mode(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not (isinstance(value, int) and 0 <= value <= 0o7777):
        raise ValueError(f"{attribute.name} must be a file mode like 0o660, got {value!r}")


def _octal(text: str) -> int:
    return int(text, 8)


def _flag(name: str, help: str, *, parse: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Metadata that makes a field a command-line flag."""
    return {"flag": name, "help": help, "parse": parse}


@attrs.frozen(kw_only=True)
class ServerOptions:
    """How `serve` and `serve_listener` run a milter: limits, deadlines, shutdown.

    Validated once, when made. The command line has a flag for each option
    but ``handle_signals`` and ``reuse_port``.
    """

    handler_timeout: float | None = attrs.field(
        default=None,
        validator=_positive,
        metadata=_flag(
            "--handler-timeout",
            "seconds a handler may run before it is cancelled and the command answered "
            f"TEMPFAIL (default: the milter's, {DEFAULT_HANDLER_TIMEOUT:g})",
            parse=float,
        ),
    )
    eom_timeout: float | None = attrs.field(
        default=None,
        validator=_positive,
        metadata=_flag(
            "--eom-timeout",
            "seconds an end-of-message handler may run (progress is sent meanwhile; "
            f"default: the milter's, {DEFAULT_EOM_TIMEOUT:g})",
            parse=float,
        ),
    )
    progress_interval: float = attrs.field(
        default=5.0,
        validator=_positive,
        metadata=_flag(
            "--progress-interval",
            "while an end-of-message handler runs, send progress this often, in seconds "
            "(below the MTA's content/read timeout; 5)",
            parse=float,
        ),
    )
    io_timeout: float = attrs.field(
        default=7210.0,
        validator=_positive,
        metadata=_flag(
            "--io-timeout",
            "seconds to wait for the MTA's next command or for a write, and for a packet "
            "to be complete after its first byte (libmilter's 7210)",
            parse=float,
        ),
    )
    max_connections: int = attrs.field(
        default=DEFAULT_MAX_CONNECTIONS,
        validator=_at_least(1),
        metadata=_flag(
            "--max-connections",
            "MTA connections served at once; beyond it new ones are answered TEMPFAIL "
            f"at once ({DEFAULT_MAX_CONNECTIONS})",
            parse=int,
        ),
    )
    backlog: int | None = attrs.field(
        default=None,
        validator=_at_least(1),
        metadata=_flag("--backlog", "listen backlog (the system's maximum)", parse=int),
    )
    max_data_size: int = attrs.field(
        default=MAX_DATA_SIZE,
        validator=_at_least(MAX_DATA_SIZE),
        metadata=_flag(
            "--max-data-size", "largest packet accepted, in data bytes (65535)", parse=int
        ),
    )
    remove_stale_socket: bool = attrs.field(
        default=True,
        metadata=_flag("--keep-stale-socket", "fail instead of removing a stale UNIX socket file"),
    )
    socket_mode: int | None = attrs.field(
        default=None,
        validator=_mode,
        metadata=_flag("--socket-mode", "octal mode of a UNIX socket, e.g. 660", parse=_octal),
    )
    shutdown_grace: float = attrs.field(
        default=30.0,
        validator=_not_negative,
        metadata=_flag(
            "--shutdown-grace",
            "seconds open messages may take to finish after SIGTERM (30)",
            parse=float,
        ),
    )
    panic_grace: float = attrs.field(
        default=1.0,
        validator=_not_negative,
        metadata=_flag(
            "--panic-grace",
            "seconds running handlers may take to finish after a panic (1)",
            parse=float,
        ),
    )
    stall_warning: float = attrs.field(
        default=0.1,
        validator=_positive,
        metadata=_flag(
            "--stall-warning",
            "warn when one handler call holds the event loop this long, in seconds (0.1)",
            parse=float,
        ),
    )
    thread_limit: int = attrs.field(
        default=16,
        validator=_at_least(1),
        metadata=_flag(
            "--thread-limit", "worker threads for @blocking handlers, at most (16)", parse=int
        ),
    )
    handle_signals: bool = True
    """Drain on SIGTERM/SIGINT (when serving in the main thread)."""
    reuse_port: bool = False
    """Set ``SO_REUSEPORT`` on a TCP listener that `serve` opens."""

    def limits_for(self, milter: Milter[Any, Any]) -> Limits:
        """The limits a connection of ``milter`` runs with (these options win over the milter's)."""
        return Limits(
            handler_timeout=self.handler_timeout or milter.handler_timeout,
            eom_timeout=self.eom_timeout or milter.eom_timeout,
            progress_interval=self.progress_interval,
            io_timeout=self.io_timeout,
            max_data_size=self.max_data_size,
            stall_warning=self.stall_warning,
        )

    @staticmethod
    def flags() -> Iterator[tuple[attrs.Attribute[Any], dict[str, Any]]]:
        """The fields that are command-line flags, with their metadata."""
        for field in attrs.fields(ServerOptions):
            if "flag" in field.metadata:
                yield field, dict(field.metadata)

    def to_argv(self) -> list[str]:
        """These options as command-line flags (those that differ from the defaults)."""
        argv: list[str] = []
        for field, meta in self.flags():
            value = getattr(self, field.name)
            if value == field.default:
                continue
            if isinstance(value, bool):
                argv.append(meta["flag"])  # the flag is the non-default value
            elif meta["parse"] is _octal:
                argv += [meta["flag"], format(value, "o")]
            else:
                argv += [meta["flag"], repr(value)]
        return argv


class ServerOptionsKwargs(TypedDict, total=False):
    """`ServerOptions` fields as keyword arguments of `serve` (kept equal by a test)."""

    handler_timeout: float | None
    eom_timeout: float | None
    progress_interval: float
    io_timeout: float
    max_connections: int
    backlog: int | None
    max_data_size: int
    remove_stale_socket: bool
    socket_mode: int | None
    shutdown_grace: float
    panic_grace: float
    stall_warning: float
    thread_limit: int
    handle_signals: bool
    reuse_port: bool


@attrs.frozen
class Limits:
    """What each connection of a server runs with, resolved once per server."""

    handler_timeout: float
    eom_timeout: float
    progress_interval: float
    io_timeout: float = 7210.0
    max_data_size: int = MAX_DATA_SIZE
    stall_warning: float = 0.1
