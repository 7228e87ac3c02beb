"""Run a private, loopback-only Sendmail 8.17 for end-to-end milter tests.

The binary comes from ``.ci/install-sendmail.sh`` (``sendmail-bin`` unpacked
into /opt/sendmail-private: installing the package would remove Postfix).
Each instance lives in its own temp dir (``/tmp/smh-XXXX``) with an .mc
turned into a .cf by m4, its queue, its log and a few files for the
namespace below; it listens on 127.0.0.1 only, relays every address to the
capture server (``[127.0.0.1]:relay_port``) and never does DNS.

Why a namespace (``unshare --mount --uts --pid --fork``), see
shared/reference/sendmail-notes.md:

* Sendmail resolves its own host name before it reads the .cf; with an
  unqualified host name it asks DNS and then sleeps 60 s.  Inside, the host
  name is ``mta.test.invalid`` and /etc/hosts, /etc/resolv.conf and
  /etc/nsswitch.conf are the instance's (files only, no DNS).
* Sendmail logs only through syslog (/dev/log), and a container has none: the
  instance's ``dev/`` (bind mounts of the usual device nodes plus the
  datagram socket of this module's log receiver) is mounted on /dev.
* The daemon (``sendmail -bD``, in the foreground) is PID 1 of its own PID
  namespace.  Every other sendmail command of the instance (queue runs, which
  fork into the background and detach; mailq) is started inside that
  namespace with nsenter.  When the daemon dies, the kernel kills every
  process left in the namespace, so ``stop()`` cannot leave a detached queue
  runner behind.  (``unshare --kill-child`` does not cover a dead test run:
  Sendmail changes its credentials, which clears the parent-death signal.
  So the cleanup of stale instances finds their processes by their mounts,
  ``/proc/PID/mountinfo`` names the instance directory, and kills them.)

A milter is configured with ``INPUT_MAIL_FILTER`` (S=, F=, T=); changing it
rewrites the .cf and restarts the daemon (~0.1 s), keeping the queue, the
log and the SMTP port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "CLIENT_HELO",
    "DEFAULT_MACROS",
    "DEFAULT_TIMEOUTS",
    "HOSTNAME",
    "SENDMAIL_BIN",
    "SENDMAIL_MISSING_REASON",
    "PrivateSendmail",
    "QueuedMessage",
    "SendmailError",
    "cleanup_stale_instances",
    "sendmail_missing_reason",
    "sendmail_spec",
    "sendmail_version",
]

PREFIX = os.environ.get("SENDMAIL_PREFIX", "/opt/sendmail-private")
SENDMAIL_BIN = os.path.join(PREFIX, "usr/libexec/sendmail/sendmail")
CF_DIR = "/usr/share/sendmail/cf"
BASE_PREFIX = "smh-"
BASE_PARENT = "/tmp"
HOSTNAME = "mta.test.invalid"
CLIENT_HELO = "client.test.invalid"
_LOCK_NAME = "instance.lock"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_ETC_FILES = ("hosts", "resolv.conf", "nsswitch.conf")

SENDMAIL_MISSING_REASON = "sendmail is not installed (run .ci/install-sendmail.sh as root)"

# Sendmail's own default macro lists (cf/m4/cfhead.m4), with ``i`` added at
# end of message like Postfix's default, so a milter can name the queue id at
# EOM on both MTAs.  Keys are the .mc names: confMILTER_MACROS_<KEY>.
DEFAULT_MACROS: dict[str, str] = {
    "CONNECT": "j, _, {daemon_name}, {if_name}, {if_addr}",
    "HELO": "{tls_version}, {cipher}, {cipher_bits}, {cert_subject}, {cert_issuer}",
    "ENVFROM": "i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, "
    "{mail_mailer}, {mail_host}, {mail_addr}",
    "ENVRCPT": "{rcpt_mailer}, {rcpt_host}, {rcpt_addr}",
    "EOM": "{msg_id}, i",
}
# Connect, send, read (per reply), whole end of message: short enough that a
# wedged milter fails a test quickly, long enough for a 3 MiB body.
DEFAULT_TIMEOUTS = "C:10s;S:10s;R:10s;E:30s"


class SendmailError(RuntimeError):
    """Sendmail could not be started/controlled; the message has the log tail."""


@dataclasses.dataclass(frozen=True)
class QueuedMessage:
    """One message in the queue directory, read from its ``qf``/``hf`` file.

    ``quarantined`` means an ``hf`` file (Sendmail renames qf -> hf), with
    the milter's reason in ``quarantine_reason`` (the ``q`` line).
    ``recipients`` are the undelivered ``R`` lines (address only), with
    their flags and ESMTP parameters in ``recipient_records``.
    """

    queue_id: str
    quarantined: bool
    quarantine_reason: str | None
    sender: str
    recipients: list[str]
    recipient_records: list[str]
    status: str | None
    lines: list[str]

    @property
    def headers(self) -> list[str]:
        """Header lines as queued (``H`` records, continuation lines joined)."""
        return [line[1:] for line in self.lines if line.startswith("H")]


def sendmail_missing_reason() -> str | None:
    """Return why a private Sendmail cannot run here, or None if it can."""
    if not os.access(SENDMAIL_BIN, os.X_OK):
        return f"{SENDMAIL_BIN}: not found; {SENDMAIL_MISSING_REASON}"
    if not os.path.isfile(os.path.join(CF_DIR, "m4", "cf.m4")):
        return f"{CF_DIR}/m4/cf.m4: not found (sendmail-cf); {SENDMAIL_MISSING_REASON}"
    for tool in ("m4", "unshare", "nsenter", "mount", "hostname"):
        if shutil.which(tool, path=_ENV["PATH"]) is None:
            return f"{tool}: not found; {SENDMAIL_MISSING_REASON}"
    if os.geteuid() != 0:
        return "a private Sendmail instance must be started as root (namespaces, port binding)"
    return None


def sendmail_version() -> str:
    """The version of the private binary, read from the file: running it
    outside its namespace would start a host name lookup (see module doc)."""
    stamp = Path(PREFIX, ".sendmail-bin-version")
    with contextlib.suppress(OSError):
        return stamp.read_text(encoding="ascii").strip()
    data = Path(SENDMAIL_BIN).read_bytes()
    match = re.search(rb"\b(8\.\d+\.\d+(?:\.\d+)?)\b", data)
    return match.group(1).decode() if match else "unknown"


def sendmail_spec(port: int, host: str = "127.0.0.1") -> str:
    """Sendmail's (libmilter's) socket syntax for a milter on host:port."""
    return f"inet:{port}@{host}"


def listen_port(host: str = "127.0.0.1") -> int:
    """A free TCP port *below* the kernel's ephemeral range.

    The daemon's port must stay free while it restarts (a milter change).  A
    port from the ephemeral range (what binding port 0 gives) can meanwhile
    become the local port of any outgoing connection on the machine, e.g.
    Sendmail's own connections to the milter or the capture server, and then
    the daemon cannot bind it again.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low = max(low, 12000)
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError("no free port below the ephemeral range")


# --------------------------------------------------------------------------
# processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _kill_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in Path(task).read_text().split()]
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _listening_inode(host: str, port: int) -> str | None:
    """Inode of the TCP socket listening on host:port (IPv4), from /proc."""
    want = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    with contextlib.suppress(OSError), open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return fields[9]
    return None


# --------------------------------------------------------------------------
# stale instances (a killed test run)


def _create_lock(base: str) -> int:
    tmp = os.path.join(base, _LOCK_NAME + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, os.path.join(base, _LOCK_NAME))
    return fd


# A mountinfo line of the namespace's bind mount of DIR/etc/hosts; the path
# is relative to the file system holding DIR (/tmp may be a mount of its own).
_MOUNTED_BASE = re.compile(rf" \S*/({re.escape(BASE_PREFIX)}[^/ ]+)/etc/hosts(?://deleted)? ")


def _instance_processes() -> dict[str, list[int]]:
    """Processes inside an instance's namespace, by instance directory: the
    namespace's bind mount of DIR/etc/hosts shows in their mountinfo (also
    after DIR was deleted), which no process outside it has."""
    found: dict[str, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/mountinfo").read_text(errors="replace")
        except OSError:
            continue
        match = _MOUNTED_BASE.search(text)
        if match:
            base = os.path.join(BASE_PARENT, match.group(1))
            found.setdefault(base, []).append(int(name))
    return found


def cleanup_stale_instances(parent: str = BASE_PARENT) -> list[str]:
    """Kill and remove instances whose owner died (their lock is free), and
    kill processes of instances whose directory is gone."""
    removed = []
    members = _instance_processes()
    for base in sorted(glob.glob(os.path.join(parent, BASE_PREFIX + "*"))):
        if not os.path.isdir(base) or os.path.islink(base):
            continue
        try:
            fd = os.open(os.path.join(base, _LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(base).st_mtime > 60:
                    shutil.rmtree(base, ignore_errors=True)
                    removed.append(base)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        try:
            # The namespace's init first: its death kills the rest.
            init = _read_int(os.path.join(base, "ns.pid"))
            for pid in [init or 0, *members.get(base, [])]:
                if pid and _alive(pid):
                    _kill_quietly(pid, signal.SIGKILL)
            shutil.rmtree(base, ignore_errors=True)
            removed.append(base)
        finally:
            os.close(fd)
    # Processes of an instance directory deleted under them (rm -rf).
    for base, pids in members.items():
        if not os.path.isdir(base):
            for pid in pids:
                _kill_quietly(pid, signal.SIGKILL)
    return removed


def _read_int(path: str) -> int | None:
    # IndexError: the file exists but is still empty (being written).
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(path).read_text(encoding="ascii").split()[0])
    return None


# --------------------------------------------------------------------------
# the log receiver


class _SyslogReceiver:
    """Datagram socket at DIR/dev/log (Sendmail's /dev/log in its namespace);
    appends each message, without its ``<priority>``, as a line to a file."""

    def __init__(self, socket_path: str, log_path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(socket_path)
        os.chmod(socket_path, 0o666)
        self._sock.settimeout(0.2)
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (closed in stop)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sendmail-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._log.write(re.sub(rb"^<\d+>", b"", data).rstrip(b"\n") + b"\n")

    def drain(self, timeout: float = 0.5) -> None:
        """Give datagrams already sent a chance to be written (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pending = fcntl.ioctl(self._sock.fileno(), 0x541B, b"\0\0\0\0")  # FIONREAD
            except OSError:
                return
            if int.from_bytes(pending, "little") == 0:
                return
            time.sleep(0.005)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(2.0)
        self._sock.close()
        self._log.close()


# --------------------------------------------------------------------------
# the instance


class PrivateSendmail:
    """A private Sendmail instance relaying everything to ``relay_port``.

    ``milter`` is the ``S=`` socket spec of the milter under test (e.g.
    ``sendmail_spec(port)``) or None for no milter; ``milter_flags`` the
    ``F=`` value (``T``: tempfail when the milter is unreachable) and
    ``milter_timeouts`` the ``T=`` value.  ``macros`` overrides macro lists
    (keys CONNECT, HELO, ENVFROM, ENVRCPT, EOM, EOH, DATA; a value of None
    drops the setting so Sendmail's built-in default applies).
    ``mc_extra`` are further .mc lines (before the MAILER lines).
    """

    def __init__(
        self,
        relay_port: int,
        milter: str | None = None,
        *,
        milter_flags: str = "T",
        milter_timeouts: str = DEFAULT_TIMEOUTS,
        macros: Mapping[str, str | None] | None = None,
        mc_extra: Sequence[str] = (),
        smtp_port: int = 0,
        start_timeout: float = 20.0,
        keep_dir: bool = False,
    ) -> None:
        self._relay_port = relay_port
        self._requested_port = smtp_port
        self._start_timeout = start_timeout
        self._keep_dir = keep_dir
        self._milter: dict[str, object] = {}
        self._set(milter, milter_flags, milter_timeouts, macros, mc_extra)
        self._baseline = dict(self._milter)
        self._base: str | None = None
        self._port = 0
        self._lock_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._init_pid: int | None = None
        self._syslog: _SyslogReceiver | None = None
        self._log_mark = 0
        self.start_seconds = 0.0
        self.restart_seconds = 0.0
        self.stop_seconds = 0.0

    def _set(
        self,
        milter: str | None,
        flags: str,
        timeouts: str,
        macros: Mapping[str, str | None] | None,
        mc_extra: Sequence[str],
    ) -> None:
        merged: dict[str, str | None] = {
            **DEFAULT_MACROS,
            **{k.upper(): v for k, v in (macros or {}).items()},
        }
        for key, value in [("milter", milter), ("flags", flags), ("timeouts", timeouts)]:
            if value is not None and ("'" in value or "`" in value or "\n" in value):
                raise ValueError(f"bad {key} {value!r}")
        self._milter = {
            "milter": milter,
            "flags": flags,
            "timeouts": timeouts,
            "macros": merged,
            "mc_extra": tuple(mc_extra),
        }

    # -- paths ---------------------------------------------------------------

    @property
    def base_dir(self) -> str:
        if self._base is None:
            raise RuntimeError("instance not started")
        return self._base

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.base_dir, "mqueue")

    @property
    def cf_path(self) -> str:
        return os.path.join(self.base_dir, "sendmail.cf")

    @property
    def mc_path(self) -> str:
        return os.path.join(self.base_dir, "sendmail.mc")

    @property
    def maillog_path(self) -> str:
        return os.path.join(self.base_dir, "maillog")

    @property
    def smtp_port(self) -> int:
        if not self._port:
            raise RuntimeError("instance not started")
        return self._port

    @property
    def daemon_pid(self) -> int | None:
        """The daemon's PID (seen from here; it is PID 1 in its namespace)."""
        return self._init_pid

    @property
    def running(self) -> bool:
        return self._init_pid is not None and _alive(self._init_pid)

    @property
    def milter(self) -> str | None:
        value = self._milter["milter"]
        return value if isinstance(value, str) else None

    # -- configuration -------------------------------------------------------

    def mc_text(self) -> str:
        """The .mc this instance is (or will be) built from."""
        base = self.base_dir
        relay = f"TCP $h {self._relay_port}"
        lines = [
            "divert(-1)",
            "# private loopback-only Sendmail for triomilter's e2e tests",
            "divert(0)dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{HOSTNAME}')dnl",
            f"define(`QUEUE_DIR', `{base}/mqueue')dnl",
            f"define(`confPID_FILE', `{base}/sendmail.pid')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{base}/etc/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{base}/etc/hosts')dnl",
            "define(`ALIAS_FILE', `')dnl",
            # An existing statistics file, else every delivery logs an error.
            f"define(`STATUS_FILE', `{base}/statistics')dnl",
            "define(`HELP_FILE', `')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            # Everything, local addresses included, goes to the capture server.
            "define(`SMART_HOST', `relay:[127.0.0.1]')dnl",
            "define(`MAIL_HUB', `relay:[127.0.0.1]')dnl",
            "define(`LOCAL_RELAY', `relay:[127.0.0.1]')dnl",
            *(
                f"define(`{m}_MAILER_ARGS', `{relay}')dnl"
                for m in ("SMTP", "ESMTP", "SMTP8", "DSMTP", "RELAY")
            ),
            "define(`LOCAL_MAILER_PATH', `/bin/false')dnl",
            # Byte fidelity: no line breaking, no Date:/From:/Message-Id: added.
            "define(`RELAY_MAILER_LL', `0')dnl",
            "define(`SMTP_MAILER_LL', `0')dnl",
            *(
                f"MODIFY_MAILER_FLAGS(`{m}', `-DFM')dnl"
                for m in ("SMTP", "ESMTP", "SMTP8", "DSMTP", "RELAY")
            ),
            # No alias lookup (no alias file: it would tempfail local addresses).
            "MODIFY_MAILER_FLAGS(`LOCAL', `-Aw')dnl",
            # Also drops the default "authwarnings" (X-Authentication-Warning:).
            "define(`confPRIVACY_FLAGS', `noexpn,novrfy')dnl",
            # A shared machine's load average must not make it queue or refuse.
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            "define(`confDELAY_LA', `0')dnl",
            "define(`confMAX_DAEMON_CHILDREN', `0')dnl",
            "define(`confCONNECTION_RATE_THROTTLE', `0')dnl",
            "define(`confTO_IDENT', `0')dnl",
            "define(`confAUTH_MECHANISMS', `')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confMILTER_LOG_LEVEL', `14')dnl",
            # The banner names the instance: a test cannot mistake another server.
            f"define(`confSMTP_LOGIN_MSG', `$j {os.path.basename(base)}')dnl",
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`accept_unqualified_senders')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Addr=127.0.0.1, Port={self._port}, Name=MTA')dnl",
            "CLIENT_OPTIONS(`Family=inet, Addr=127.0.0.1')dnl",
        ]
        macros = self._milter["macros"]
        assert isinstance(macros, dict)
        for key, value in macros.items():
            if value is not None:
                lines.append(f"define(`confMILTER_MACROS_{key}', `{value}')dnl")
        milter = self._milter["milter"]
        if milter is not None:
            equates = [f"S={milter}"]
            if self._milter["flags"]:
                equates.append(f"F={self._milter['flags']}")
            if self._milter["timeouts"]:
                equates.append(f"T={self._milter['timeouts']}")
            lines.append(f"INPUT_MAIL_FILTER(`myfilter', `{', '.join(equates)}')dnl")
        extra = self._milter["mc_extra"]
        assert isinstance(extra, tuple)
        lines += [str(line) for line in extra]
        lines += ["MAILER(`local')dnl", "MAILER(`smtp')dnl", ""]
        return "\n".join(lines)

    def _write_config(self) -> None:
        Path(self.mc_path).write_text(self.mc_text(), encoding="utf-8")
        proc = self._run(
            ["m4", f"-D_CF_DIR_={CF_DIR}/", f"{CF_DIR}/m4/cf.m4", self.mc_path], namespace=False
        )
        if proc.returncode != 0 or not proc.stdout:
            raise self._error(f"m4 failed ({proc.returncode})", proc)
        tmp = self.cf_path + ".new"
        Path(tmp).write_text(proc.stdout, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.cf_path)

    def _write_namespace_files(self) -> None:
        base = self.base_dir
        etc = os.path.join(base, "etc")
        os.makedirs(etc, mode=0o755)
        files = {
            "hosts": f"127.0.0.1 localhost {HOSTNAME}\n",
            # Nothing listens on 127.0.0.1:53: a stray lookup fails at once.
            "resolv.conf": "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n",
            "nsswitch.conf": "hosts: files\npasswd: files\ngroup: files\n",
            "service.switch": "hosts files\naliases files\n",
        }
        for name, text in files.items():
            Path(etc, name).write_text(text, encoding="ascii")
        dev = os.path.join(base, "dev")
        os.makedirs(dev, mode=0o755)
        for name in _DEVICES:
            Path(dev, name).touch()
        mounts = "\n".join(
            [
                f'mount --bind "$D/etc/{n}" /etc/{n}'
                for n in ("hosts", "resolv.conf", "nsswitch.conf")
            ]
            + [f'mount --bind /dev/{n} "$D/dev/{n}"' for n in _DEVICES]
        )
        # The namespace's PID 1: mounts, host name, then the daemon.
        launcher = (
            "#!/bin/sh\n"
            "set -e\n"
            f'D="{base}"\n'
            f"hostname {HOSTNAME}\n"
            f"{mounts}\n"
            # --rbind: a plain --bind would drop the device bind mounts inside.
            'mount --rbind "$D/dev" /dev\n'
            f'exec {SENDMAIL_BIN} -C "$D/sendmail.cf" "$@"\n'
        )
        path = os.path.join(base, "sm")
        Path(path).write_text(launcher, encoding="ascii")
        os.chmod(path, 0o755)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> PrivateSendmail:
        """Create the instance dir, build the .cf, start the daemon."""
        if self._base is not None:
            raise RuntimeError("already started")
        reason = sendmail_missing_reason()
        if reason:
            raise SendmailError(reason)
        t0 = time.monotonic()
        cleanup_stale_instances()
        base = tempfile.mkdtemp(prefix=BASE_PREFIX, dir=BASE_PARENT)
        self._base = base
        try:
            os.chmod(base, 0o755)
            self._lock_fd = _create_lock(base)
            os.makedirs(self.queue_dir, mode=0o700)
            Path(base, "statistics").touch(mode=0o600)
            self._write_namespace_files()
            self._syslog = _SyslogReceiver(os.path.join(base, "dev", "log"), self.maillog_path)
            self._start_daemon()
        except BaseException:
            self._teardown(keep=self._keep_dir)
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_daemon(self, port: int = 0) -> None:
        """Start the daemon on ``port``, else the requested or a free port;
        retried with another free port when the chosen one is taken (unless
        the constructor asked for that port)."""
        for attempt in range(4):
            self._port = port or self._requested_port or listen_port()
            self._write_config()
            mark = self.log_position()
            try:
                self._spawn_daemon(mark)
            except SendmailError as exc:
                self._kill_daemon(timeout=5.0)
                if "cannot bind" in str(exc) and not self._requested_port and attempt < 3:
                    port = 0
                    continue
                raise
            except BaseException:
                self._kill_daemon(timeout=5.0)  # no half-started daemon left behind
                raise
            return

    def _spawn_daemon(self, mark: int) -> None:
        base = self.base_dir
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(base, "ns.pid"))
        out = open(os.path.join(base, "daemon.out"), "ab")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--uts",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    os.path.join(base, "sm"),
                    "-bD",
                ],
                env=_ENV,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=base,
                start_new_session=True,  # a terminal's Ctrl-C is not for it
            )
        finally:
            out.close()
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._init_pid is None:
                # unshare's forked child: the launcher, then (exec) the daemon.
                kids = _children(self._proc.pid)
                if kids:
                    self._init_pid = kids[0]
                    # For the cleanup, should this test run die.
                    Path(base, "ns.pid").write_text(f"{self._init_pid}\n", encoding="ascii")
            if self._init_pid is not None:
                inode = _listening_inode("127.0.0.1", self._port)
                if inode is not None and inode in _socket_inodes(self._init_pid):
                    return
            if self._proc.poll() is not None:
                raise self._error(f"daemon exited {self._proc.returncode} during start-up")
            text = self.log_text(mark)
            if "cannot bind" in text:
                raise self._error("daemon cannot bind its port")
            if time.monotonic() > deadline:
                raise self._error(
                    f"daemon not listening on {self._port} within {self._start_timeout}s"
                )
            time.sleep(0.005)

    def _kill_daemon(self, timeout: float) -> None:
        """SIGTERM the daemon, SIGKILL after ``timeout``; once it is gone the
        kernel has killed every other process of its namespace."""
        proc, init = self._proc, self._init_pid
        if init is not None and _alive(init):
            _kill_quietly(init, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(init) and time.monotonic() < deadline:
                time.sleep(0.005)
            if _alive(init):
                _kill_quietly(init, signal.SIGKILL)
        if proc is not None:
            if proc.poll() is None and init is None:
                # Never got as far as knowing the daemon: its forked child
                # (the namespace's init) first, since --kill-child is not
                # reliable once Sendmail runs (see the module doc).
                for child in _children(proc.pid):
                    _kill_quietly(child, signal.SIGKILL)
                proc.kill()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        self._proc = None
        self._init_pid = None

    def restart(self) -> None:
        """Rebuild the .cf and restart the daemon, on the same port unless it
        was taken meanwhile (read ``smtp_port`` afterwards); the queue and the
        log stay.  Call it between SMTP sessions."""
        t0 = time.monotonic()
        port = self._port
        self._kill_daemon(timeout=5.0)
        self._start_daemon(port)  # another port if that one was taken meanwhile
        self.restart_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process of the instance and delete its directory."""
        t0 = time.monotonic()
        self._teardown(keep=self._keep_dir, timeout=timeout)
        self.stop_seconds = time.monotonic() - t0

    def _teardown(self, keep: bool, timeout: float = 10.0) -> None:
        if self._base is None:
            return
        self._kill_daemon(timeout=min(timeout, 2.0))
        if self._syslog is not None:
            self._syslog.stop()
            self._syslog = None
        if not keep:
            shutil.rmtree(self._base, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._base = None
        self._port = 0

    def __enter__(self) -> PrivateSendmail:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- milter -----------------------------------------------------------------

    def set_milter(
        self,
        milter: str | None,
        *,
        flags: str = "T",
        timeouts: str = DEFAULT_TIMEOUTS,
        macros: Mapping[str, str | None] | None = None,
        mc_extra: Sequence[str] = (),
    ) -> bool:
        """Put ``milter`` (an ``S=`` spec, None: no milter) in front; restarts
        the daemon if the configuration changed (or starts it if it is not
        running, e.g. after a configuration it refused).  Returns whether it
        (re)started the daemon."""
        before = dict(self._milter)
        self._set(milter, flags, timeouts, macros, mc_extra)
        if self._base is None or (self._milter == before and self.running):
            return False
        self.restart()
        return True

    def reset_config(self) -> bool:
        """Back to the constructor's milter settings; restarts the daemon if
        they changed or it is not running.  Returns whether it restarted."""
        if self._milter == self._baseline and (self._base is None or self.running):
            return False
        self._milter = dict(self._baseline)
        if self._base is not None:
            self.restart()  # also after a daemon a test killed or misconfigured
        return True

    # -- commands in the namespace ------------------------------------------------

    def _run(
        self, argv: list[str], timeout: float = 20.0, *, namespace: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if namespace:
            if self._init_pid is None or not self.running:
                raise SendmailError(f"{argv!r}: the daemon is not running")
            argv = [
                "nsenter",
                f"--target={self._init_pid}",
                "--mount",
                "--uts",
                "--pid",
                "--",
                SENDMAIL_BIN,
                "-C",
                self.cf_path,
                *argv,
            ]
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
                cwd=self._base or "/",
            )
        except subprocess.TimeoutExpired as exc:
            raise self._error(f"{argv!r} timed out after {timeout}s") from exc

    def command(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``sendmail -C CF ARGS`` inside the instance's namespace."""
        return self._run(list(args), timeout)

    def _check(self, *args: str, timeout: float = 20.0) -> str:
        proc = self.command(*args, timeout=timeout)
        if proc.returncode != 0:
            raise self._error(f"sendmail {' '.join(args)} exited {proc.returncode}", proc)
        return proc.stdout

    def processes(self) -> list[int]:
        """Live processes of the instance's namespace (daemon included)."""
        if self._init_pid is None:
            return []
        ns = _pid_ns(self._init_pid)
        if ns is None:
            return []
        return [
            int(name)
            for name in os.listdir("/proc")
            if name.isdigit() and _pid_ns(int(name)) == ns and _alive(int(name))
        ]

    def flush(self, queue_id: str | None = None, timeout: float = 30.0) -> str:
        """Run the queue now (``sendmail -v -q``, or ``-qI<id>``), in the
        foreground (-v), and return its transcript."""
        selector = ["-qI" + queue_id] if queue_id else ["-q"]
        return self._check("-v", *selector, timeout=timeout)

    def mailq(self, quarantined: bool = False) -> str:
        """``mailq`` output (``-qQ``: the quarantined messages only)."""
        return self._check("-bp", *(["-qQ"] if quarantined else []))

    def release_quarantine(self, queue_id: str, flush: bool = True) -> None:
        """Unquarantine (hf -> qf, ``sendmail -qQ -Q -qI<id>``), then deliver."""
        self._check("-qQ", "-Q", "-qI" + queue_id, "-v")
        if flush:
            self.flush(queue_id)

    # -- queue ------------------------------------------------------------------

    def queue(self) -> list[QueuedMessage]:
        """Every message in the queue directory (qf and hf files)."""
        found = []
        for path in sorted(glob.glob(os.path.join(self.queue_dir, "[qh]f*"))):
            name = os.path.basename(path)
            try:
                raw = Path(path).read_bytes()
            except FileNotFoundError:
                continue  # delivered meanwhile
            lines: list[str] = []
            for line in raw.decode("utf-8", "surrogateescape").split("\n"):
                if line.startswith("\t") and lines:
                    lines[-1] += "\n" + line
                elif line:
                    lines.append(line)
            rcpt_lines = [line[1:] for line in lines if line.startswith("R")]
            reason = next((line[1:] for line in lines if line.startswith("q")), None)
            found.append(
                QueuedMessage(
                    queue_id=name[2:],
                    quarantined=name.startswith("hf"),
                    quarantine_reason=reason,
                    sender=next((line[1:] for line in lines if line.startswith("S")), ""),
                    recipients=[r.split(":", 1)[-1] for r in rcpt_lines],
                    recipient_records=rcpt_lines,
                    status=next((line[1:] for line in lines if line.startswith("M")), None),
                    lines=lines,
                )
            )
        return found

    def quarantined(self) -> list[QueuedMessage]:
        return [m for m in self.queue() if m.quarantined]

    def queue_is_empty(self) -> bool:
        return not glob.glob(os.path.join(self.queue_dir, "[qhdt]f*"))

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        """Wait until every message left the queue (delivered, bounced)."""
        deadline = time.monotonic() + timeout
        while not self.queue_is_empty():
            if time.monotonic() > deadline:
                raise self._error(f"queue not empty after {timeout}s: {self.queue()!r}")
            time.sleep(0.01)

    def wait_queued(self, count: int = 1, timeout: float = 10.0) -> list[QueuedMessage]:
        """Wait until ``count`` messages are in the queue (qf or hf)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.queue()
            if len(entries) >= count:
                return entries
            if time.monotonic() > deadline:
                raise self._error(f"{len(entries)} queued after {timeout}s, expected {count}")
            time.sleep(0.01)

    def delete_queue(self) -> None:
        """Delete every queued file (between tests; no process is using them
        after a restart, and a live delivery just loses its file)."""
        for path in glob.glob(os.path.join(self.queue_dir, "*")):
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- logs ---------------------------------------------------------------------

    def log_position(self) -> int:
        if self._syslog is not None:
            self._syslog.drain()
        try:
            return os.path.getsize(self.maillog_path)
        except OSError:
            return 0

    def mark_log(self) -> int:
        """Make log_text()/wait_for_log() ignore everything logged so far."""
        self._log_mark = self.log_position()
        return self._log_mark

    def log_text(self, since: int | None = None) -> str:
        """The log from byte offset ``since`` (default: the mark)."""
        if self._base is None:
            return ""
        try:
            with open(self.maillog_path, "rb") as f:
                f.seek(self._log_mark if since is None else since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_for_log(
        self, pattern: str, timeout: float = 10.0, since: int | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, MULTILINE) matches the log."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(since))
            if match:
                return match
            if time.monotonic() > deadline:
                raise self._error(f"log pattern {pattern!r} not seen within {timeout}s")
            time.sleep(0.01)

    def _error(
        self, what: str, proc: subprocess.CompletedProcess[str] | None = None
    ) -> SendmailError:
        parts = [what]
        if proc is not None:
            parts.append(f"stdout: {proc.stdout.strip()!r}; stderr: {proc.stderr.strip()!r}")
        tail = "\n".join(self.log_text(0).splitlines()[-30:]) if self._base else ""
        parts.append("sendmail log tail:\n" + (tail or "(empty)"))
        if self._base:
            with contextlib.suppress(OSError):
                out = Path(self._base, "daemon.out").read_text(errors="replace").strip()
                if out:
                    parts.append("daemon output:\n" + out[-2000:])
        return SendmailError("\n".join(parts))

    # -- client -------------------------------------------------------------------

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        """An smtplib client connected to the instance (explicit HELO name:
        smtplib would otherwise call getfqdn(), a DNS lookup)."""
        return smtplib.SMTP("127.0.0.1", self.smtp_port, CLIENT_HELO, timeout=timeout)
