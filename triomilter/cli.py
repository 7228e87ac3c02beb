"""The command line: ``triomilter serve MODULE[:ATTR] --socket SPEC``, ``check``, ``tap``.

MODULE is an importable module name or a path to a ``.py`` file (imported
like ``python FILE`` runs it: its directory comes first on ``sys.path``).
ATTR names a `Milter` object in it; without ATTR the module's ``milter``
attribute (or its only `Milter` object) is used, else a `Milter` is built
from the module's decorated handlers (``Milter.from_module``).

Exit status of ``serve``: 0 after a shutdown, 1 when the milter cannot
start, 2 for usage errors (a milter that cannot be loaded included), 70
(EX_SOFTWARE) after a handler panic, 128 + the signal number after a forced
stop (a second SIGTERM: 143, SIGINT: 130). ``check`` exits with its verdict
(``_check_cli``), ``tap`` as ``_tap`` says; both use 2 for usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import traceback
import types
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ._check_cli import add_check_parser, check_command
from ._errors import ForcedShutdown, MilterPanic
from ._logging import configure as configure_logging
from ._metrics import Metrics
from ._milter import Milter
from ._options import ServerOptions
from ._sockets import SocketSpecError, listener_from_fd, open_listener, parse_socket_spec
from ._systemd import SystemdError, listen_fds
from ._tap import add_tap_parser, tap_command

EXIT_START_FAILED = 1
EXIT_USAGE = 2
EXIT_PANIC = 70
EXIT_SIGNAL_BASE = 128

log = logging.getLogger("triomilter")


class LoadError(Exception):
    """The milter named on the command line cannot be loaded."""


def load_milter(target: str) -> Milter[Any, Any]:
    """Load ``MODULE[:ATTR]`` as described in the module docstring."""
    module_name, _, attr = target.partition(":")
    if target.count(":") > 1 or not module_name:
        raise LoadError(f"expected MODULE[:ATTR], got {target!r}")
    module = _import(module_name)
    if attr:
        try:
            value = getattr(module, attr)
        except AttributeError:
            raise LoadError(f"module {module.__name__!r} has no attribute {attr!r}") from None
        if isinstance(value, Milter):
            return value
        if isinstance(value, types.ModuleType):
            milter = Milter.from_module(value)
            if not milter.handlers:
                raise LoadError(f"{target}: module {value.__name__!r} has no decorated handlers")
            return milter
        raise LoadError(f"{target} is a {type(value).__name__}, not a triomilter.Milter")
    named = getattr(module, "milter", None)
    if isinstance(named, Milter):
        return named
    milters = [value for value in vars(module).values() if isinstance(value, Milter)]
    if len(milters) == 1:
        return milters[0]
    if len(milters) > 1:
        raise LoadError(f"module {module.__name__!r} has several Milter objects: name one")
    try:
        milter = Milter.from_module(module)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"module {module.__name__!r}: {exc}") from exc
    if not milter.handlers:
        raise LoadError(f"module {module.__name__!r} has no Milter and no decorated handlers")
    return milter


def _import(name: str) -> types.ModuleType:
    if name.endswith(".py") or os.sep in name:
        return _import_file(Path(name))
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules beside us import
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise LoadError(f"no module named {name!r}") from None
        raise LoadError(f"cannot import {name}: {_one_line(exc)}") from exc
    except Exception as exc:
        raise LoadError(f"cannot import {name}: {_one_line(exc)}") from exc


def _import_file(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise LoadError(f"no such file: {path}")
    # Like `python FILE`: the file's directory first, so its sibling modules import.
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[path.stem]
        raise LoadError(f"cannot load {path}: {_one_line(exc)}") from exc
    return module


def _one_line(exc: BaseException) -> str:
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f" ({Path(last.filename).name}, line {last.lineno})"
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({Path(exc.filename).name}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


# --- the parser ---------------------------------------------------------------------


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerOptions` field that has one: the fields are the source."""
    group = parser.add_argument_group("server options")
    for field, meta in ServerOptions.flags():
        if isinstance(field.default, bool):
            # The flag sets the non-default value (--keep-stale-socket).
            group.add_argument(
                meta["flag"],
                dest=field.name,
                action="store_const",
                const=not field.default,
                default=field.default,
                help=meta["help"],
            )
        else:
            group.add_argument(
                meta["flag"],
                dest=field.name,
                type=meta["parse"],
                default=field.default,
                metavar=field.name.upper() if meta["parse"] is not float else "SECONDS",
                help=meta["help"],
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triomilter", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run a milter")
    run.add_argument("target", metavar="MODULE[:ATTR]", help="the milter to run")
    run.add_argument(
        "--socket",
        "-s",
        required=True,
        help="inet:PORT@HOST, inet6:PORT@HOST, unix:/path; systemd (the sockets of a "
        ".socket unit); fd:N[,M...] (listening sockets inherited as descriptors)",
    )
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line (text)",
    )
    run.add_argument(
        "--metrics",
        metavar="SPEC",
        help="serve Prometheus metrics at http://HOST:PORT/metrics for inet:PORT@HOST "
        "(needs 'triomilter[prometheus]'; with --workers, worker N uses PORT+N)",
    )
    run.add_argument(
        "--workers", type=int, default=1, help="processes sharing the listening socket (1)"
    )
    _add_server_options(run)
    add_check_parser(commands)
    add_tap_parser(commands)
    return parser


def _options(args: argparse.Namespace) -> ServerOptions:
    fields = {field.name: getattr(args, field.name) for field, _ in ServerOptions.flags()}
    return ServerOptions(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    named = logging.getLevelName(str(args.log_level).upper())
    if not isinstance(named, int):
        print(f"triomilter: unknown log level {args.log_level!r}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(named, getattr(args, "log_format", "text"))
    if args.command == "tap":
        return tap_command(args)
    try:
        if args.command == "check":
            return check_command(args, load_milter)
        milter = load_milter(args.target)
    except LoadError as exc:
        print(f"triomilter: {exc}", file=sys.stderr)
        if named <= logging.DEBUG and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        return EXIT_USAGE
    return _serve(args, milter)


def _serve(args: argparse.Namespace, milter: Milter[Any, Any]) -> int:
    try:
        options = _options(args)
        fds = _inherited_sockets(args.socket)
        if fds is None:
            parse_socket_spec(args.socket)  # a usage error, before anything starts
        if args.metrics:
            parse_socket_spec(args.metrics)
    except (TypeError, ValueError, SystemdError) as exc:
        print(f"triomilter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 1:
        print("triomilter: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1:
        from ._workers import Workers, run_workers

        workers = Workers(args.target, args.workers, args.log_level, args.log_format, args.metrics)
        return run_workers(workers, args.socket, fds, options)
    try:
        trio.run(partial(_run, milter, args.socket, fds, options, args.metrics))
    except MilterPanic as exc:
        log.critical("%s", exc)
        return EXIT_PANIC
    except ForcedShutdown as exc:
        return EXIT_SIGNAL_BASE + exc.signal
    except (SocketSpecError, ValueError, OSError, RuntimeError) as exc:
        log.error("cannot serve: %s", exc)
        return EXIT_START_FAILED
    return 0


def _inherited_sockets(socket: str) -> list[int] | None:
    """The descriptors of ``systemd`` or ``fd:N[,M...]``, or None for a socket spec to open."""
    if socket.strip().lower() == "systemd":
        return [fd for fd, _ in listen_fds()]
    kind, sep, numbers = socket.partition(":")
    if not (sep and kind.lower() == "fd"):
        return None
    parts = numbers.split(",")
    if not all(part.isdigit() for part in parts):
        raise SocketSpecError(f"socket spec {socket!r}: use fd:N or fd:N,M,...")
    return [int(part) for part in parts]


async def _run(
    milter: Milter[Any, Any],
    socket: str,
    fds: list[int] | None,
    options: ServerOptions,
    metrics_spec: str | None,
) -> None:
    """Serve (and, with ``--metrics``, expose the metrics) until the server stops."""
    from ._server import serve, serve_listener

    metrics = Metrics() if metrics_spec else None
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        if metrics is not None and metrics_spec is not None:
            from ._prometheus import serve_metrics

            metrics_listener = await open_listener(parse_socket_spec(metrics_spec))
            await nursery.start(serve_metrics, metrics, metrics_listener)
            log.info("metrics at http://%s/metrics", _http_address(metrics_listener))
        try:
            if fds is not None:
                listeners = [listener_from_fd(fd) for fd in fds]
                await serve_listener(milter, listeners, options, metrics=metrics)
            else:
                await serve(milter, socket, options, metrics=metrics)
        except Exception as exc:  # raised as itself below, not in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _http_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
