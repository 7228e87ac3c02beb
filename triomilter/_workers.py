"""``triomilter serve --workers N``: several processes serving one listening socket.

The parent opens the listening sockets (any spec: TCP, port 0, a UNIX
socket) and hands their descriptors to N worker processes (``triomilter
serve TARGET --socket fd:N`` plus the parent's options). On TCP each worker
gets a socket of its own in one ``SO_REUSEPORT`` group, all bound by the
parent before any worker starts (port 0 resolved by the first): the kernel
spreads new connections evenly by their addresses. A shared socket would
let whichever worker wakes first take them all (measured: 16 of 16). A UNIX
socket cannot be grouped that way and is shared. The parent only supervises:

- the first SIGTERM/SIGINT is forwarded once as SIGTERM (every worker
  drains); a second one as SIGINT (every worker stops at once);
- a worker that exits while the others serve stops the set: the others are
  drained and stopped; a worker's panic (exit 70) makes the parent exit 70;
- the parent removes the UNIX socket file when all are gone;
- under systemd (``Type=notify``) the parent speaks for the set: each
  worker notifies a private socket of the parent's, the parent says
  ``READY=1`` once every worker did, and ``WATCHDOG=1`` only while every
  worker's event loop keeps pinging, so that one blocked worker gets the
  whole service restarted (with ``NotifyAccess=all`` any one worker's
  ping would keep a blocked sibling alive).

Workers run in their own sessions: a terminal's Ctrl-C (sent to the whole
foreground process group) reaches only the parent, which forwards it once;
a worker signalled twice would stop at once instead of draining.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket as stdsocket
import sys
from collections.abc import AsyncIterator
from functools import partial

import attrs
import trio

from ._context import SocketFamily
from ._options import ServerOptions
from ._sockets import SocketSpec, describe_address, open_listener, parse_socket_spec
from ._systemd import Notifier, child_environment

log = logging.getLogger("triomilter")

EXIT_START_FAILED = 1
EXIT_PANIC = 70
EXIT_SIGNAL_BASE = 128


@attrs.frozen
class Workers:
    """What every worker is started with (besides its sockets and the server options)."""

    target: str
    count: int
    log_level: str
    log_format: str = "text"
    metrics: str | None = None
    """The parent's ``--metrics`` spec; worker N serves on its port + N."""

    def argv(self, n: int, fds: list[int], options: ServerOptions) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "triomilter",
            "serve",
            self.target,
            "--socket",
            "fd:" + ",".join(map(str, fds)),
            "--log-level",
            self.log_level,
            "--log-format",
            self.log_format,
            *options.to_argv(),
        ]
        if self.metrics:
            spec = parse_socket_spec(self.metrics)
            argv += ["--metrics", str(attrs.evolve(spec, port=spec.port + n if spec.port else 0))]
        return argv


def run_workers(
    workers: Workers, socket: str, inherited: list[int] | None, options: ServerOptions
) -> int:
    """Run the workers on ``socket`` (or ``inherited`` descriptors) until all are gone."""
    try:
        return trio.run(partial(_supervise, workers, socket, inherited, options))
    except (ValueError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return EXIT_START_FAILED


async def _supervise(
    workers: Workers, socket: str, inherited: list[int] | None, options: ServerOptions
) -> int:
    if inherited is not None:
        # systemd's (or a parent's) sockets: every worker accepts on all of them.
        where = ", ".join(describe_address(_sockname(fd)) for fd in inherited)
        plan = [(workers.argv(n, inherited, options), inherited) for n in range(workers.count)]
        return await _Supervisor(plan).run(where)
    spec = parse_socket_spec(socket)
    tcp = spec.family is not SocketFamily.UNIX
    listeners: list[trio.SocketListener] = []
    try:
        listeners.append(await _open(spec, options, reuse_port=tcp))
        if tcp:
            # The others join the first one's group, on the port it got.
            port = listeners[0].socket.getsockname()[1]
            for _ in range(workers.count - 1):
                listeners.append(await _open(attrs.evolve(spec, port=port), options, True))
        fds = [listener.socket.fileno() for listener in listeners]
        plan = []
        for n in range(workers.count):
            mine = [fds[n % len(fds)]]
            plan.append((workers.argv(n, mine, options), mine))
        where = describe_address(listeners[0].socket.getsockname())
        return await _Supervisor(plan).run(where)
    finally:
        for listener in listeners:
            listener.socket.close()
        _unlink_ours(spec)


def _sockname(fd: int) -> object:
    with stdsocket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockname()


async def _open(spec: SocketSpec, options: ServerOptions, reuse_port: bool) -> trio.SocketListener:
    return await open_listener(
        spec,
        backlog=options.backlog,
        reuse_port=reuse_port,
        remove_stale_socket=options.remove_stale_socket,
        socket_mode=options.socket_mode,
    )


def _unlink_ours(spec: SocketSpec) -> None:
    if spec.path:
        with contextlib.suppress(OSError):
            os.unlink(spec.path)


class _Reports:
    """What the workers notify, each on a datagram socket of the parent's.

    A worker is started with ``NOTIFY_SOCKET`` naming its own socket (an
    abstract one: nothing to clean up) and half the parent's
    ``WATCHDOG_USEC``, so it pings twice per round of the parent's.
    """

    def __init__(self, count: int, watchdog_usec: int | None) -> None:
        token = secrets.token_hex(6)
        self.addresses = [f"@triomilter-{os.getpid()}-{token}-{n}" for n in range(count)]
        self.sockets: list[trio.socket.SocketType] = []
        self.watchdog_usec = watchdog_usec
        self.ready = [False] * count
        self.pinged = [False] * count
        self.all_ready = trio.Event()

    def open(self) -> None:
        for address in self.addresses:
            sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_DGRAM)
            sock.bind("\0" + address[1:])
            self.sockets.append(trio.socket.from_stdlib_socket(sock))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def environment(self, base: dict[str, str], n: int) -> dict[str, str]:
        env = {**base, "NOTIFY_SOCKET": self.addresses[n]}
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(max(self.watchdog_usec // 2, 1))
        return env

    async def listen(self, n: int) -> None:
        while True:
            lines = (await self.sockets[n].recv(4096)).split(b"\n")
            if b"WATCHDOG=1" in lines:
                self.pinged[n] = True
            if b"READY=1" in lines and not self.ready[n]:
                self.ready[n] = True
                if all(self.ready):
                    self.all_ready.set()


class _Supervisor:
    def __init__(self, workers: list[tuple[list[str], list[int]]]) -> None:
        self.workers = workers
        """Each worker's command line and the descriptors it is given."""
        self.count = len(workers)
        self.notifier = Notifier.from_environment()
        self.reports: _Reports | None = None
        if self.notifier is not None:
            usec = self.notifier.watchdog_interval
            self.reports = _Reports(self.count, round(usec * 2_000_000) if usec else None)
        self.procs: list[trio.Process] = []
        self.signals_forwarded = 0
        self.forced: int | None = None
        self.stopping = False
        self.failed: list[int] = []

    async def run(self, where: str) -> int:
        if self.reports is None:
            return await self._run(where)
        self.reports.open()
        try:
            return await self._run(where)
        finally:
            self.reports.close()

    async def _run(self, where: str) -> int:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                env = child_environment()  # systemd talks to us, not to them
                reports = self.reports
                if reports is not None:
                    for n in range(self.count):
                        nursery.start_soon(reports.listen, n)
                for n, (argv, fds) in enumerate(self.workers):
                    proc: trio.Process = await nursery.start(
                        partial(
                            trio.run_process,
                            argv,
                            pass_fds=tuple(fds),
                            start_new_session=True,
                            check=False,
                            stdin=None,
                            env=env if reports is None else reports.environment(env, n),
                        )
                    )
                    self.procs.append(proc)
                log.info(
                    "serving on %s with %d workers (pids %s)",
                    where,
                    self.count,
                    " ".join(str(proc.pid) for proc in self.procs),
                )
                for proc in self.procs:
                    nursery.start_soon(self._watch, proc)
                nursery.start_soon(self._forward, signals)
                if self.notifier is not None:
                    nursery.start_soon(self._notify_systemd, where)
                await self._all_exited()
                nursery.cancel_scope.cancel()
        return self._status()

    async def _all_exited(self) -> None:
        for proc in self.procs:
            await proc.wait()

    async def _watch(self, proc: trio.Process) -> None:
        code = await proc.wait()
        if self.stopping:
            return
        if code != 0:
            self.failed.append(code)
        log.critical("worker %d exited with status %d: stopping all", proc.pid, code)
        self.stopping = True
        for other in self.procs:
            if other.returncode is None:  # drain, then stop at once
                other.send_signal(signal.SIGTERM)
                other.send_signal(signal.SIGINT)

    async def _notify_systemd(self, where: str) -> None:
        """READY=1 once every worker is serving; then WATCHDOG=1 while all of them ping."""
        notifier, reports = self.notifier, self.reports
        assert notifier is not None and reports is not None
        await reports.all_ready.wait()
        if not self.stopping:
            notifier.send("READY=1", f"STATUS={self.count} workers on {where}")
        interval = notifier.watchdog_interval
        if not interval:
            return
        warned = False
        while True:
            await trio.sleep(interval)
            # Draining workers stop on their own deadlines: no need to judge them.
            if all(reports.pinged) or self.stopping:
                notifier.send("WATCHDOG=1")
                reports.pinged = [False] * self.count
                if warned:
                    log.info("every worker pings its watchdog again")
                    warned = False
            elif not warned:
                warned = True
                pinged = zip(self.procs, reports.pinged, strict=False)
                silent = (proc.pid for proc, ok in pinged if not ok)
                log.warning(
                    "worker(s) %s did not ping their watchdog for %.1f s (event loop "
                    "blocked?): not pinging systemd's, which restarts the service if it lasts",
                    " ".join(map(str, silent)),
                    interval,
                )

    async def _forward(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if not self.stopping and self.notifier is not None:
                self.notifier.send("STOPPING=1", "STATUS=draining the workers")
            self.stopping = True
            forwarded = signal.SIGINT if self.signals_forwarded else signal.SIGTERM
            if self.signals_forwarded:
                self.forced = signum
            self.signals_forwarded += 1
            log.info(
                "%s: forwarding %s to the workers", signal.Signals(signum).name, forwarded.name
            )
            for proc in self.procs:
                if proc.returncode is None:
                    proc.send_signal(forwarded)

    def _status(self) -> int:
        codes = [proc.returncode for proc in self.procs]
        if EXIT_PANIC in codes or EXIT_PANIC in self.failed:
            return EXIT_PANIC
        if self.forced is not None:
            return EXIT_SIGNAL_BASE + self.forced
        # A worker still starting when the forwarded SIGTERM came has no handler
        # for it yet and dies of it: it had nothing to drain either.
        clean = {0, -signal.SIGTERM} if self.signals_forwarded else {0}
        if self.failed or any(code not in clean for code in codes):
            return EXIT_START_FAILED
        return 0
