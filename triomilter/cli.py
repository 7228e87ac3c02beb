"""The command line: ``triomilter serve MODULE[:ATTR] --socket SPEC``.

MODULE is an importable module name or a path to a ``.py`` file. ATTR names a
`Milter` object in it; without ATTR the module's ``milter`` attribute (or its
only `Milter` object) is used, else a `Milter` is built from the module's
decorated handlers (``Milter.from_module``).

Exit status: 0 after a shutdown, 1 when the milter cannot start, 2 for
usage errors, 70 (EX_SOFTWARE) after a handler panic.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import socket as stdsocket
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from ._errors import MilterPanic
from ._milter import Milter
from ._server import serve
from ._sockets import SocketSpecError, parse_socket_spec

EXIT_START_FAILED = 1
EXIT_USAGE = 2
EXIT_PANIC = 70

log = logging.getLogger("triomilter")


class LoadError(Exception):
    """The milter named on the command line cannot be loaded."""


def load_milter(target: str) -> Milter:
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
    milter = Milter.from_module(module)
    if not milter.handlers:
        raise LoadError(f"module {module.__name__!r} has no Milter and no decorated handlers")
    return milter


def _import(name: str) -> types.ModuleType:
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise LoadError(f"no such file: {name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise LoadError(f"cannot import {name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules beside us import
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise LoadError(f"no module named {name!r}") from None
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triomilter", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run a milter")
    run.add_argument("target", metavar="MODULE[:ATTR]", help="the milter to run")
    run.add_argument(
        "--socket", "-s", required=True, help="inet:PORT@HOST, inet6:PORT@HOST or unix:/path"
    )
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    run.add_argument("--workers", type=int, default=1, help="processes on one inet address")
    run.add_argument("--io-timeout", type=float, default=7210.0, help="seconds (7210)")
    run.add_argument("--max-connections", type=int, default=1000)
    run.add_argument("--backlog", type=int, default=None)
    run.add_argument("--max-data-size", type=int, default=65535)
    run.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds (30)")
    run.add_argument("--panic-grace", type=float, default=1.0, help="seconds (1)")
    run.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default=None,
        help="octal mode of a UNIX socket, e.g. 660",
    )
    run.add_argument(
        "--keep-stale-socket",
        action="store_true",
        help="fail instead of removing a stale UNIX socket file",
    )
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="load a milter and show its configuration")
    check.add_argument("target", metavar="MODULE[:ATTR]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.INFO
    if "log_level" in args:
        named = logging.getLevelName(str(args.log_level).upper())
        if not isinstance(named, int):
            print(f"triomilter: unknown log level {args.log_level!r}", file=sys.stderr)
            return EXIT_USAGE
        level = named
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        milter = load_milter(args.target)
    except LoadError as exc:
        print(f"triomilter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        print(f"milter {milter.name!r}")
        print(f"  handlers: {', '.join(stage.value for stage in milter.handlers)}")
        print(f"  actions: {milter.actions!r}")
        print(f"  protocol options: {milter.protocol_opts!r} (+ {milter.unhandled_steps!r})")
        return 0
    try:
        spec = parse_socket_spec(args.socket)
    except SocketSpecError as exc:
        print(f"triomilter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 1:
        print("triomilter: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1:
        if spec.family == "unix":
            print("triomilter: --workers needs an inet or inet6 socket", file=sys.stderr)
            return EXIT_USAGE
        return _run_workers(args, spec.family, spec.host, spec.port)
    options = dict(
        io_timeout=args.io_timeout,
        max_connections=args.max_connections,
        backlog=args.backlog,
        max_data_size=args.max_data_size,
        shutdown_grace=args.shutdown_grace,
        panic_grace=args.panic_grace,
        socket_mode=args.socket_mode,
        remove_stale_socket=not args.keep_stale_socket,
        reuse_port=args.reuse_port,
    )
    try:
        trio.run(partial(serve, milter, args.socket, **options))
    except MilterPanic as exc:
        log.critical("%s", exc)
        return EXIT_PANIC
    except (SocketSpecError, ValueError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return EXIT_START_FAILED
    return 0


def _run_workers(args: argparse.Namespace, family: str, host: str, port: int) -> int:
    """Run ``args.workers`` processes sharing one address through SO_REUSEPORT.

    A panic in one worker stops them all (exit 70); SIGTERM/SIGINT drain them all.
    """
    holder = None
    if port == 0:
        # Pick the port once, and hold it until every worker has bound it.
        holder = stdsocket.socket(
            stdsocket.AF_INET6 if family == "inet6" else stdsocket.AF_INET, stdsocket.SOCK_STREAM
        )
        holder.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEPORT, 1)
        holder.bind((host or ("::" if family == "inet6" else "0.0.0.0"), 0))
        port = holder.getsockname()[1]
    spec = f"{family}:{port}@{host}" if host else f"{family}:{port}"
    argv = [
        sys.executable,
        "-m",
        "triomilter",
        "serve",
        args.target,
        "--socket",
        spec,
        "--reuse-port",
        "--log-level",
        args.log_level,
        "--io-timeout",
        str(args.io_timeout),
        "--max-connections",
        str(args.max_connections),
        "--max-data-size",
        str(args.max_data_size),
        "--shutdown-grace",
        str(args.shutdown_grace),
        "--panic-grace",
        str(args.panic_grace),
    ]
    if args.backlog is not None:
        argv += ["--backlog", str(args.backlog)]
    # Each worker in its own session: a terminal's Ctrl-C (sent to the whole
    # foreground group) reaches only us, and we forward it once; a worker
    # signalled twice would stop at once instead of draining.
    workers = [subprocess.Popen(argv, start_new_session=True) for _ in range(args.workers)]
    log.info(
        "serving on %s with %d workers (pids %s)",
        spec,
        len(workers),
        " ".join(str(w.pid) for w in workers),
    )
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT if stopping else signal.SIGTERM)
        stopping = True

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    panicked = False
    try:
        if holder is not None:
            time.sleep(1.0)  # let the workers bind before releasing the port
            holder.close()
        while any(worker.poll() is None for worker in workers):
            for worker in workers:
                code = worker.poll()
                if code not in (None, 0) and not stopping:
                    panicked = panicked or code == EXIT_PANIC
                    log.critical("worker %d exited with status %d: stopping all", worker.pid, code)
                    stopping = True
                    for other in workers:
                        if other.poll() is None:  # drain, then stop at once
                            other.send_signal(signal.SIGTERM)
                            other.send_signal(signal.SIGINT)
            time.sleep(0.05)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    codes = [worker.returncode for worker in workers]
    if panicked or EXIT_PANIC in codes:
        return EXIT_PANIC
    return 0 if all(code == 0 for code in codes) else EXIT_START_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
