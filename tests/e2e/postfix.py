"""Run a private, loopback-only Postfix instance for end-to-end milter tests.

Each instance lives in its own short temp dir (``/tmp/pfh-XXXX``: unix socket
paths under the queue dir must stay below 108 bytes), with its own main.cf and
master.cf, logs to a file there (containers have no syslog), relays all mail
to ``[127.0.0.1]:relay_port`` (the capture server) and never does DNS.

Starting uses the real ``postfix -c DIR start`` (post-install, integrity
checks, then ``master -w``, which returns once the listeners are bound).
Stopping sends SIGTERM to the master, which is all ``postfix stop``/``abort``
do, but polls for the exit instead of sleeping in 1 s steps.  Readiness is
read from /proc/net/tcp: a probe connection would start an SMTP session and
reach the milters under test.  See shared/reference/postfix-notes.md for the
reasons behind the main.cf settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import glob
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "POSTFIX_MISSING_REASON",
    "PostfixError",
    "PrivatePostfix",
    "QueueEntry",
    "cleanup_stale_instances",
    "free_port",
    "postfix_missing_reason",
]

BASE_PREFIX = "pfh-"
BASE_PARENT = "/tmp"
HOSTNAME = "mta.test.invalid"
CLIENT_HELO = "client.test.invalid"
_LOCK_NAME = "instance.lock"
_BACKDATE = 10.0  # seconds; Postfix waits while config files are < ~2 s old
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}

POSTFIX_MISSING_REASON = "postfix is not installed (run .ci/install-postfix.sh as root)"


class PostfixError(RuntimeError):
    """Postfix could not be started/controlled; the message has the log tail."""


@dataclasses.dataclass(frozen=True)
class QueueEntry:
    """One message in a Postfix queue, as reported by ``postqueue -j``."""

    queue_name: str
    queue_id: str
    sender: str
    recipients: list[str]
    delay_reasons: list[str]
    raw: dict[str, object]


def postfix_missing_reason() -> str | None:
    """Return why Postfix cannot be used here, or None if it can."""
    for tool in ("postfix", "postconf", "postqueue"):
        if shutil.which(tool, path=_ENV["PATH"]) is None:
            return f"{tool}: not found; {POSTFIX_MISSING_REASON}"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """Pick a currently free TCP port on loopback (small race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# process helpers (via /proc: no psutil dependency)


def _proc_state(pid: int) -> str | None:
    """Process state letter (R, S, Z...) of ``pid``, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (PID 1 in containers reaps late)."""
    return _proc_state(pid) not in (None, "Z", "X")


def _proc_link(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}").removesuffix(" (deleted)")
    except OSError:
        return ""


@functools.cache
def _postfix_program_dirs() -> tuple[str, ...]:
    """Where Postfix daemons and commands live (to recognise its processes)."""
    dirs = []
    for param in ("daemon_directory", "command_directory"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["postconf", "-dh", param], env=_ENV, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            if out.startswith("/"):
                dirs.append(out.rstrip("/") + "/")
    return tuple(dirs) or ("/usr/lib/postfix/sbin/", "/usr/sbin/")


def _is_postfix_process(pid: int) -> bool:
    return _proc_link(pid, "exe").startswith(_postfix_program_dirs())


def _pids_in_dir(directory: str) -> list[int]:
    """Live Postfix processes whose cwd is ``directory``: every Postfix daemon
    chdirs to its queue directory, so this finds an instance's master and
    children (and nothing else, like a shell someone left there)."""
    return [
        pid
        for pid in _live_pids()
        if _proc_link(pid, "cwd") == directory and _alive(pid) and _is_postfix_process(pid)
    ]


def _live_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _kill_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


_ORPHAN_GRACE = 0.1  # seconds daemons get to exit on their own once master is gone


def _terminate_instance(queue_dir: str, master_pid: int | None, timeout: float) -> None:
    with _subreaper():
        _terminate(queue_dir, master_pid, timeout)


def _terminate(queue_dir: str, master_pid: int | None, timeout: float) -> None:
    """SIGTERM the master (which SIGTERMs its process group and exits), then
    SIGKILL what is left after a short grace: a daemon forked but not yet
    exec'd sleeps ~1 s with SIGTERM blocked, which would slow every stop."""
    seen = set(_pids_in_dir(queue_dir))
    if master_pid is not None:
        seen.add(master_pid)
        _kill_quietly(master_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    master_gone_at: float | None = None
    while True:
        now = time.monotonic()
        master_up = master_pid is not None and _alive(master_pid)
        pids = set(_pids_in_dir(queue_dir))
        seen |= pids
        if not master_up and not pids:
            break
        if now > deadline:
            for pid in pids | ({master_pid} if master_pid else set()):
                _kill_quietly(pid, signal.SIGKILL)
            if now > deadline + 2.0:
                break
        elif not master_up:
            master_gone_at = master_gone_at or now
            late = now - master_gone_at > _ORPHAN_GRACE
            for pid in pids:
                _kill_quietly(pid, signal.SIGKILL if late else signal.SIGTERM)
        time.sleep(0.01)
    _reap(seen)


def _reap(pids: Iterable[int]) -> None:
    """Collect exit statuses of instance processes that became our children
    (see _subreaper) so no zombie ``master`` lingers."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Adopt processes orphaned meanwhile, instead of PID 1.

    Used while starting (the daemonized master becomes our child) and while
    stopping (daemons outliving the master): in containers PID 1 often reaps
    late, leaving ``[master] <defunct>`` around; as subreaper we reap them.
    Only for these windows, so other tests' orphans are not adopted as
    zombies.  Failing is harmless (zombies count as dead).
    """
    try:
        libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None
    before = ctypes.c_int(0)
    if libc is not None:
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        if libc is not None and not before.value:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


_CREATING_GRACE = 60.0  # seconds a lock-less instance dir may be "being created"


def _create_lock(base: str) -> int:
    """Create ``base/instance.lock`` already flocked (locked under a temporary
    name, then renamed), so a concurrent cleanup never sees it unlocked."""
    tmp = os.path.join(base, _LOCK_NAME + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, os.path.join(base, _LOCK_NAME))
    return fd


def _lock_if_stale(base: str) -> tuple[bool, int | None]:
    """(stale?, lock fd to hold while removing) for an instance dir."""
    try:
        fd = os.open(os.path.join(base, _LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            age = time.time() - os.stat(base).st_mtime
        except OSError:
            return False, None
        return age > _CREATING_GRACE, None  # died before locking, or being created
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False, None  # its owner is alive
    return True, fd


def cleanup_stale_instances(parent: str = BASE_PARENT) -> list[str]:
    """Remove instances left by killed test runs; returns the removed dirs.

    A live instance holds an flock on its ``instance.lock`` for its whole
    life, so instances of concurrently running test sessions are left alone.
    """
    removed = []
    for base in sorted(glob.glob(os.path.join(parent, BASE_PREFIX + "*"))):
        if not os.path.isdir(base) or os.path.islink(base):
            continue
        stale, fd = _lock_if_stale(base)
        if not stale:
            continue
        try:
            queue_dir = os.path.join(base, "queue")
            _terminate_instance(queue_dir, _read_pid(queue_dir), timeout=5.0)
            shutil.rmtree(base, ignore_errors=True)
            removed.append(base)
        finally:
            if fd is not None:
                os.close(fd)
    # Daemons whose directory is already gone (rm -rf of a running instance).
    prefix = os.path.join(parent, BASE_PREFIX)
    for pid in _live_pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd.startswith(prefix) and cwd.endswith(" (deleted)") and _is_postfix_process(pid):
            _kill_quietly(pid, signal.SIGKILL)
    return removed


def _read_pid(queue_dir: str) -> int | None:
    try:
        text = Path(queue_dir, "pid", "master.pid").read_text(encoding="ascii")
    except OSError:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None


def _listening(host: str, port: int) -> bool:
    """True if a TCP socket listens on host:port (IPv4), read from /proc so
    that probing does not open an SMTP session (which would reach milters)."""
    want = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _render_value(name: str, value: str | int | bool | Iterable[str]) -> str:
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (str, int)):
        text = str(value)
    else:
        text = ", ".join(value)
    if "\n" in text or "\r" in text or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"bad main.cf setting {name!r} = {text!r}")
    return text


ConfValue = str | int | bool | Sequence[str]

MASTER_CF_SERVICES = """\
pickup     unix  n  -  n  60    1  pickup
cleanup    unix  n  -  n  -     0  cleanup
qmgr       unix  n  -  n  300   1  qmgr
rewrite    unix  -  -  n  -     -  trivial-rewrite
bounce     unix  -  -  n  -     0  bounce
defer      unix  -  -  n  -     0  bounce
trace      unix  -  -  n  -     0  bounce
verify     unix  -  -  n  -     1  verify
flush      unix  n  -  n  1000? 0  flush
proxymap   unix  -  -  n  -     -  proxymap
proxywrite unix  -  -  n  -     1  proxymap
smtp       unix  -  -  n  -     -  smtp
relay      unix  -  -  n  -     -  smtp
showq      unix  n  -  n  -     -  showq
error      unix  -  -  n  -     -  error
retry      unix  -  -  n  -     -  error
discard    unix  -  -  n  -     -  discard
anvil      unix  -  -  n  -     1  anvil
scache     unix  -  -  n  -     1  scache
postlog    unix-dgram n  -  n  -  1  postlogd
"""


class PrivatePostfix:
    """A throw-away Postfix that relays everything to ``[relay_host]:relay_port``.

    Use as a context manager (or call start()/stop()).  ``milters`` becomes
    ``smtpd_milters``; the milter timeouts default far below Postfix's 30 s /
    300 s so a broken milter fails a test quickly.  ``main_cf`` adds or
    overrides any main.cf setting (None drops one, leaving Postfix's default).
    """

    def __init__(
        self,
        relay_port: int,
        milters: str | Sequence[str] = (),
        *,
        milter_default_action: str = "tempfail",
        milter_protocol: str | int = 6,
        milter_connect_timeout: str = "10s",
        milter_command_timeout: str = "10s",
        milter_content_timeout: str = "30s",
        main_cf: Mapping[str, ConfValue | None] | None = None,
        relay_host: str = "127.0.0.1",
        smtp_port: int | None = None,
        start_timeout: float = 20.0,
        keep_dir: bool | None = None,
    ) -> None:
        if not relay_host.startswith("127."):
            raise ValueError("private Postfix may relay to loopback only")
        self._relay = f"[{relay_host}]:{relay_port}"
        self._requested_port = smtp_port
        self._port = 0
        self._start_timeout = start_timeout
        self._keep_dir = (
            keep_dir if keep_dir is not None else bool(os.environ.get("E2E_KEEP_POSTFIX"))
        )
        self._milter_settings: dict[str, ConfValue] = {
            "smtpd_milters": [milters] if isinstance(milters, str) else list(milters),
            "milter_default_action": milter_default_action,
            "milter_protocol": milter_protocol,
            "milter_connect_timeout": milter_connect_timeout,
            "milter_command_timeout": milter_command_timeout,
            "milter_content_timeout": milter_content_timeout,
        }
        self._extra: dict[str, ConfValue | None] = dict(main_cf or {})
        self._base: str | None = None
        self._lock_fd: int | None = None
        self._master_pid: int | None = None
        self._log_mark = 0
        self._baseline: tuple[dict[str, ConfValue], dict[str, ConfValue | None]] = (
            dict(self._milter_settings),
            dict(self._extra),
        )
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    # -- paths -----------------------------------------------------------

    @property
    def base_dir(self) -> str:
        if self._base is None:
            raise RuntimeError("instance not started")
        return self._base

    @property
    def config_dir(self) -> str:
        return os.path.join(self.base_dir, "etc")

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.base_dir, "queue")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.base_dir, "data")

    @property
    def maillog_path(self) -> str:
        return os.path.join(self.base_dir, "maillog")

    @property
    def smtp_port(self) -> int:
        """TCP port of the smtpd listener on 127.0.0.1."""
        if not self._port:
            raise RuntimeError("instance not started")
        return self._port

    @property
    def master_pid(self) -> int | None:
        return self._master_pid

    @property
    def running(self) -> bool:
        return self._master_pid is not None and _alive(self._master_pid)

    # -- configuration ------------------------------------------------------

    def main_cf_settings(self) -> dict[str, str]:
        """The main.cf settings this instance is (or will be) started with."""
        base = self.base_dir
        settings: dict[str, ConfValue | None] = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "myhostname": HOSTNAME,
            "mydomain": "test.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "relayhost": self._relay,
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Keep Postfix from editing headers of 127.0.0.1 "local" clients.
            "local_header_rewrite_clients": "",
            "disable_mime_output_conversion": True,
            "smtp_line_length_limit": 0,
            "smtputf8_enable": True,
            # No DNS anywhere.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": False,
            # Logging: no syslog in containers.
            "maillog_file": os.path.join(base, "maillog"),
            "maillog_file_prefixes": base,
            # Nothing local.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": False,
            # Fast and predictable queueing.
            "in_flow_delay": "0s",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0h",
            "smtp_connect_timeout": "5s",
            "message_size_limit": 104857600,
            "smtpd_banner": "$myhostname ESMTP",
            **self._milter_settings,
            **self._extra,
        }
        return {k: _render_value(k, v) for k, v in settings.items() if v is not None}

    def _master_cf(self) -> str:
        smtpd = f"127.0.0.1:{self._port} inet n - n - - smtpd\n"
        return smtpd + MASTER_CF_SERVICES

    def _write_config(self) -> None:
        lines = [f"{k} = {v}\n" for k, v in self.main_cf_settings().items()]
        os.makedirs(self.config_dir, mode=0o755, exist_ok=True)
        past = time.time() - _BACKDATE
        for name, text in (("main.cf", "".join(lines)), ("master.cf", self._master_cf())):
            path = os.path.join(self.config_dir, name)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.utime(tmp, (past, past))
            os.replace(tmp, path)
        os.utime(self.config_dir, (past, past))

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> PrivatePostfix:
        """Create the instance dir, write config, start Postfix, wait for smtpd.

        Retries with a new port if the chosen one was taken meanwhile.
        """
        if self._base is not None:
            raise RuntimeError("already started")
        reason = postfix_missing_reason()
        if reason:
            raise PostfixError(reason)
        t0 = time.monotonic()
        cleanup_stale_instances()
        for attempt in range(3):
            try:
                self._start_once()
            except PostfixError as exc:
                in_use = "address already in use" in str(exc).lower()
                retry = in_use and not self._requested_port and attempt < 2
                self._teardown(keep=self._keep_dir and not retry)
                if not retry:
                    raise
            except BaseException:
                self._teardown(keep=False)
                raise
            else:
                self.start_seconds = time.monotonic() - t0
                return self
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        base = tempfile.mkdtemp(prefix=BASE_PREFIX, dir=BASE_PARENT)
        os.chmod(base, 0o755)  # user postfix must traverse it
        self._base = base
        self._log_mark = 0
        self._lock_fd = _create_lock(base)
        self._port = self._requested_port or free_port()
        os.makedirs(self.queue_dir, mode=0o755)
        os.makedirs(self.data_dir, mode=0o700)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self._write_config()
        deadline = time.monotonic() + self._start_timeout
        with _subreaper():
            proc = self._run(
                ["postfix", "-c", self.config_dir, "start"], timeout=self._start_timeout
            )
        if proc.returncode != 0:
            raise self._error(f"`postfix start` exited {proc.returncode}", proc)
        self._master_pid = _read_pid(self.queue_dir)
        if self._master_pid is None:
            raise self._error("no master.pid after `postfix start`", proc)
        while not _listening("127.0.0.1", self._port):
            if not self.running:
                raise self._error("master died during start-up", proc)
            if time.monotonic() > deadline:
                raise self._error("smtpd port never started listening", proc)
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop all processes of the instance and delete its directory."""
        t0 = time.monotonic()
        self._teardown(keep=self._keep_dir, timeout=timeout)
        self.stop_seconds = time.monotonic() - t0

    def _teardown(self, keep: bool, timeout: float = 10.0) -> None:
        if self._base is None:
            return
        pid = self._master_pid or _read_pid(self.queue_dir)
        _terminate_instance(self.queue_dir, pid, timeout)
        self._master_pid = None
        if not keep:
            shutil.rmtree(self._base, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._base = None
        self._port = 0

    def __enter__(self) -> PrivatePostfix:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- control ----------------------------------------------------------------

    def _run(self, argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv,
                env=_ENV,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise self._error(f"{argv!r} timed out after {timeout}s") from exc

    def _error(
        self, what: str, proc: subprocess.CompletedProcess[str] | None = None
    ) -> PostfixError:
        parts = [what]
        if proc is not None:
            parts.append(f"stdout: {proc.stdout.strip()!r}; stderr: {proc.stderr.strip()!r}")
        tail = "\n".join(self.log_text(0).splitlines()[-30:]) if self._base else ""
        parts.append("maillog tail:\n" + (tail or "(empty)"))
        return PostfixError("\n".join(parts))

    def _check(self, argv: list[str], timeout: float = 20.0) -> str:
        proc = self._run(argv, timeout)
        if proc.returncode != 0:
            raise self._error(f"{argv!r} exited {proc.returncode}", proc)
        return proc.stdout

    def reload(self, timeout: float = 10.0) -> None:
        """Make Postfix re-read its config (SIGHUP, ~20 ms); returns once no
        smtpd of the old configuration can serve a new connection.

        Postfix lets existing daemons finish at "their earliest convenience",
        so an idle old smtpd could otherwise accept the next connection with
        the previous milter settings: wait for them to exit (SIGTERM after
        2 s).  Call it between SMTP sessions, not while one is open.
        """
        if self._master_pid is None or not self.running:
            raise PostfixError("reload: instance is not running")
        old_smtpds = [p for p in self._children() if self._comm(p) == "smtpd"]
        mark = self.log_position()
        self._write_config()
        os.kill(self._master_pid, signal.SIGHUP)
        self.wait_for_log(r"reload -- version", timeout=timeout, since=mark)
        # They normally exit within milliseconds (the master closes their
        # status pipe); SIGTERM only stragglers, since a killed daemon that
        # never served can make the master throttle the service for 60 s.
        deadline = time.monotonic() + timeout
        nudge_at = time.monotonic() + 2.0
        while any(_alive(p) for p in old_smtpds):
            now = time.monotonic()
            if now > deadline:
                raise self._error("reload: old smtpd processes did not exit")
            if nudge_at and now > nudge_at:
                nudge_at = 0.0
                for pid in old_smtpds:
                    _kill_quietly(pid, signal.SIGTERM)
            time.sleep(0.005)

    def configure(self, settings: Mapping[str, ConfValue | None], reload: bool = True) -> None:
        """Change main.cf settings, then reload.  A value of None drops the
        setting from main.cf, so Postfix's built-in default applies."""
        self._extra.update(settings)
        if reload and self.running:
            self.reload()

    def set_milters(
        self,
        milters: str | Sequence[str],
        *,
        default_action: str | None = None,
        protocol: str | int | None = None,
        connect_timeout: str | None = None,
        command_timeout: str | None = None,
        content_timeout: str | None = None,
    ) -> None:
        """Point ``smtpd_milters`` elsewhere without a restart (reload only)."""
        m = self._milter_settings
        m["smtpd_milters"] = [milters] if isinstance(milters, str) else list(milters)
        for key, value in (
            ("milter_default_action", default_action),
            ("milter_protocol", protocol),
            ("milter_connect_timeout", connect_timeout),
            ("milter_command_timeout", command_timeout),
            ("milter_content_timeout", content_timeout),
        ):
            if value is not None:
                m[key] = value
        if self.running:
            self.reload()

    def reset_config(self) -> bool:
        """Restore the constructor's milter and main.cf settings (reloading
        only if something changed); returns whether a reload happened."""
        milters, extra = self._baseline
        if milters == self._milter_settings and extra == self._extra:
            return False
        self._milter_settings, self._extra = dict(milters), dict(extra)
        if self.running:
            self.reload()
        return True

    def _children(self) -> list[int]:
        """Live processes of this instance other than the master."""
        return [p for p in _pids_in_dir(self.queue_dir) if p != self._master_pid]

    @staticmethod
    def _comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
        except OSError:
            return ""

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c DIR ARGS`` (e.g. ``postconf("-h", "relayhost")``)."""
        return self._check(["postconf", "-c", self.config_dir, *args])

    def flush(self) -> None:
        """Ask Postfix to retry deferred mail now (``postqueue -f``)."""
        self._check(["postqueue", "-c", self.config_dir, "-f"])

    # -- queue ------------------------------------------------------------------

    def queue(self) -> list[QueueEntry]:
        """All queued messages (``postqueue -j``: needs the running showq)."""
        out = self._check(["postqueue", "-c", self.config_dir, "-j"])
        entries = []
        for line in out.splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            rcpts = obj.get("recipients", [])
            entries.append(
                QueueEntry(
                    queue_name=str(obj.get("queue_name", "")),
                    queue_id=str(obj.get("queue_id", "")),
                    sender=str(obj.get("sender", "")),
                    recipients=[str(r.get("address", "")) for r in rcpts],
                    delay_reasons=[str(r["delay_reason"]) for r in rcpts if "delay_reason" in r],
                    raw=obj,
                )
            )
        return entries

    def hold_queue(self) -> list[QueueEntry]:
        """Messages in the hold queue (e.g. after a milter quarantine)."""
        return [e for e in self.queue() if e.queue_name == "hold"]

    def queue_is_empty(self) -> bool:
        """True if no message is queued at all.  Reads the queue directories
        (no subprocess): incoming/active/deferred/hold/maildrop."""
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(os.path.join(self.queue_dir, name)):
                if files:
                    return False
        return True

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        """Wait until every message has left the queue (delivered/bounced)."""
        deadline = time.monotonic() + timeout
        while not self.queue_is_empty():
            if time.monotonic() > deadline:
                raise self._error(f"queue not empty after {timeout}s: {self.queue()!r}")
            time.sleep(0.02)

    def release_hold(self, flush: bool = True) -> None:
        """Release all held messages (``postsuper -H ALL``).  They go to the
        deferred queue, so by default also flush instead of waiting for the
        next queue run."""
        self._check(["postsuper", "-c", self.config_dir, "-H", "ALL"])
        if flush:
            self.flush()

    def delete_queue(self) -> None:
        """Delete every queued message (``postsuper -d ALL``)."""
        self._check(["postsuper", "-c", self.config_dir, "-d", "ALL"])

    # -- logs -----------------------------------------------------------------

    def log_position(self) -> int:
        """Current maillog size; pass as ``since`` to look only at newer lines."""
        try:
            return os.path.getsize(self.maillog_path)
        except OSError:
            return 0

    def mark_log(self) -> int:
        """Make log_text()/wait_for_log() ignore everything logged so far
        (by default); used when one instance serves several tests."""
        self._log_mark = self.log_position()
        return self._log_mark

    def log_text(self, since: int | None = None) -> str:
        """The maillog contents from byte offset ``since`` (default: the mark)."""
        try:
            with open(self.maillog_path, "rb") as f:
                f.seek(self._log_mark if since is None else since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_for_log(
        self, pattern: str, timeout: float = 10.0, since: int | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, MULTILINE) matches the maillog
        (from ``since``, default: the mark); returns the match."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(since))
            if match:
                return match
            if time.monotonic() > deadline:
                raise self._error(f"log pattern {pattern!r} not seen within {timeout}s")
            time.sleep(0.02)

    # -- client -----------------------------------------------------------------

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        """An smtplib client connected to the instance.  An explicit HELO name
        keeps smtplib from calling getfqdn() (a DNS lookup)."""
        return smtplib.SMTP("127.0.0.1", self.smtp_port, CLIENT_HELO, timeout=timeout)
