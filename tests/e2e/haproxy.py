"""Run a private, loopback-only HAProxy in front of milter processes.

The end-to-end scale-out test puts HAProxy (``mode tcp``) between Postfix
and several ``triomilter serve`` processes.  `PrivateHAProxy` writes its own
config file into a temp dir, checks it with ``haproxy -c``, runs
``haproxy -db`` (foreground, no daemon: the test owns the process) with its
log on stderr, captured into a file, and waits for the frontend to listen.
A stats socket in the same dir answers ``show stat`` (server state, retry
and redispatch counters) without touching the traffic ports.

`render_config` is the configuration that docs/deploying.md documents; the
test runs exactly what it returns.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from .postfix import _listening, free_port

__all__ = [
    "HAPROXY_MISSING_REASON",
    "HAProxyError",
    "PrivateHAProxy",
    "ServerStat",
    "haproxy_missing_reason",
    "render_config",
]

HAPROXY_MISSING_REASON = "haproxy is not installed (run .ci/install-haproxy.sh as root)"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}

# The milter negotiation a health check sends: SMFIC_OPTNEG ('O') with
# version 6 and what Postfix offers (all actions 0x1ff, all v6 protocol
# steps 0x1fffff); a live milter answers with its own 'O' packet
# (4-byte length, then 0x4f).  Then SMFIC_QUIT ('Q'), so the milter ends
# the session cleanly instead of logging an unexpected EOF.
CHECK_OPTNEG = "0000000d" + "4f" + "00000006" + "000001ff" + "001fffff"
CHECK_REPLY_REGEX = "^[0-9A-Fa-f]{8}4[Ff]"  # rbinary: the reply in hex
CHECK_QUIT = "00000001" + "51"


def render_config(
    *,
    frontend_port: int,
    backends: Mapping[str, int],
    stats_socket: str,
    host: str = "127.0.0.1",
) -> str:
    """The HAProxy configuration: a TCP frontend on ``host:frontend_port``
    balancing over ``backends`` (server name -> port on ``host``).

    The reasons for each value are in docs/deploying.md ("Behind HAProxy");
    keep the two in step.
    """
    servers = "".join(f"    server {name} {host}:{port}\n" for name, port in backends.items())
    return f"""\
global
    log stderr format raw local0 info
    maxconn 4000
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1s
    timeout client 310s
    timeout server 310s
    timeout queue 5s
    timeout check 2s
    retries 2
    option redispatch 1

frontend milter
    bind {host}:{frontend_port}
    default_backend milters

backend milters
    balance leastconn
    option tcp-check
    tcp-check connect
    tcp-check send-binary {CHECK_OPTNEG}
    tcp-check expect min-recv 5 rbinary {CHECK_REPLY_REGEX}
    tcp-check send-binary {CHECK_QUIT}
    default-server check inter 1s fall 2 rise 2 maxconn 1000
{servers}"""


class HAProxyError(RuntimeError):
    """HAProxy could not be started/controlled; the message has its log."""


@dataclasses.dataclass(frozen=True)
class ServerStat:
    """One backend server's row of ``show stat``."""

    name: str
    status: str  # UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (coming up), ...
    check_status: str  # L7OK, L4CON, ...
    sessions_total: int  # stot
    retries: int  # wretr: connection attempts to this server that were retried
    redispatches: int  # wredis: times a session was moved away from this server
    connect_errors: int  # econ
    response_errors: int  # eresp: e.g. the server closed mid-session


def haproxy_missing_reason() -> str | None:
    """Why HAProxy cannot be used here, or None if it can."""
    if shutil.which("haproxy", path=_ENV["PATH"]) is None:
        return f"haproxy: not found; {HAPROXY_MISSING_REASON}"
    return None


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


class PrivateHAProxy:
    """A throw-away HAProxy: frontend on a free loopback port, one server per
    entry of ``backends`` (name -> port on 127.0.0.1).

    Use as a context manager (or call start()/stop()).  ``spec`` is the
    frontend in Postfix's ``smtpd_milters`` syntax.
    """

    def __init__(self, backends: Mapping[str, int], *, start_timeout: float = 10.0) -> None:
        self.backends = dict(backends)
        self._start_timeout = start_timeout
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # -- paths ---------------------------------------------------------------

    @property
    def base_dir(self) -> str:
        if self._dir is None:
            raise RuntimeError("haproxy not started")
        return self._dir

    @property
    def config_path(self) -> str:
        return os.path.join(self.base_dir, "haproxy.cfg")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "haproxy.log")

    @property
    def stats_socket(self) -> str:
        return os.path.join(self.base_dir, "admin.sock")

    @property
    def spec(self) -> str:
        """The frontend as Postfix writes a milter endpoint."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        return Path(self.config_path).read_text(encoding="utf-8")

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> PrivateHAProxy:
        """Write the config, check it, start HAProxy, wait for its frontend.

        Retries with another port if the chosen one was taken meanwhile.
        """
        if self._dir is not None:
            raise RuntimeError("already started")
        reason = haproxy_missing_reason()
        if reason:
            raise HAProxyError(reason)
        # Short path: the stats socket is a UNIX socket (108-byte limit).
        self._dir = tempfile.mkdtemp(prefix="hap-", dir="/tmp")
        try:
            for _ in range(3):
                if self._start_once():
                    return self
            raise HAProxyError(f"no free frontend port after 3 tries:\n{self.log_text()}")
        except BaseException:
            self.stop()
            raise

    def _start_once(self) -> bool:
        """One start attempt; False if the frontend port was taken (retry)."""
        self.port = free_port()
        Path(self.config_path).write_text(
            render_config(
                frontend_port=self.port, backends=self.backends, stats_socket=self.stats_socket
            ),
            encoding="utf-8",
        )
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", self.config_path],
            env=_ENV,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self._start_timeout,
            check=False,
        )
        if check.returncode != 0:
            raise HAProxyError(
                f"haproxy -c rejected the config ({check.returncode}):\n"
                f"{check.stdout}{check.stderr}\n{self.config_text()}"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.stats_socket)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                ["haproxy", "-db", "-f", self.config_path],
                env=_ENV,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self._start_timeout
        # Ready when the frontend listens (read from /proc: a probe
        # connection would open a milter session) and the stats socket exists.
        while not (_listening("127.0.0.1", self.port) and os.path.exists(self.stats_socket)):
            if self._proc.poll() is not None:
                if "address already in use" in self.log_text().lower():
                    self._proc = None
                    return False
                raise HAProxyError(
                    f"haproxy exited {self._proc.returncode} at start:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy not listening after {self._start_timeout}s")
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop HAProxy (SIGTERM: close everything now; SIGKILL after
        ``timeout``) and delete its directory unless E2E_KEEP_HAPROXY is set."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if self._dir is not None and not os.environ.get("E2E_KEEP_HAPROXY"):
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> PrivateHAProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- runtime API (stats socket) ------------------------------------------

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one command to the stats socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode("ascii") + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def servers(self, backend: str = "milters") -> dict[str, ServerStat]:
        """``show stat`` rows of ``backend``'s servers, by server name."""
        text = self.command("show stat").lstrip("# ")
        stats = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") != backend or row.get("svname") in ("BACKEND", "FRONTEND"):
                continue
            stats[row["svname"]] = ServerStat(
                name=row["svname"],
                status=row["status"],
                check_status=row["check_status"],
                sessions_total=_int(row["stot"]),
                retries=_int(row["wretr"]),
                redispatches=_int(row["wredis"]),
                connect_errors=_int(row["econ"]),
                response_errors=_int(row["eresp"]),
            )
        return stats

    def wait_status(
        self, server: str, status: str, check_status: str | None = None, timeout: float = 10.0
    ) -> ServerStat:
        """Wait until health checks put ``server`` in ``status`` (UP, DOWN)
        and, if given, its last check ended with ``check_status`` (L7OK...)."""
        deadline = time.monotonic() + timeout
        while True:
            stat = self.servers()[server]
            if stat.status == status and check_status in (None, stat.check_status):
                return stat
            if time.monotonic() > deadline:
                raise HAProxyError(
                    f"server {server} is {stat.status} ({stat.check_status}), not {status} "
                    f"({check_status or 'any check'}) after {timeout}s\n{self.log_text()[-5000:]}"
                )
            time.sleep(0.05)
