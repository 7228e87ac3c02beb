"""systemd integration without libsystemd: socket activation and the notify protocol.

- Socket activation (``--socket systemd``): systemd opens the listening
  sockets and passes them as descriptors 3, 4, ... with ``LISTEN_PID``,
  ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` in the environment (sd_listen_fds(3)).
- Notify (``Type=notify``): state changes are datagrams of ``KEY=value``
  lines to the socket named by ``NOTIFY_SOCKET`` (sd_notify(3)): ``READY=1``
  once listening, ``STATUS=...`` now and then, ``STOPPING=1`` when draining,
  and ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, sent from the event loop
  so that a blocked loop misses them and systemd restarts the service.

Like sd_notify, everything here does nothing when the variables are not set.
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
from collections.abc import MutableMapping

log = logging.getLogger("triomilter")

LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdError(Exception):
    """The environment promised sockets that are not there."""


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The sockets systemd passed to this process: ``(descriptor, name)``, in order.

    Removes the ``LISTEN_*`` variables (sd_listen_fds(unset_environment=1)),
    so that child processes do not take the sockets for theirs. Raises
    `SystemdError` when none were passed to this process.
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(name, None) for name in _LISTEN_VARIABLES)
    if pid is None or count is None:
        raise SystemdError(
            "--socket systemd: no sockets from systemd (LISTEN_PID/LISTEN_FDS are not set); "
            "start it from a .socket unit or systemd-socket-activate"
        )
    if not pid.isdigit() or int(pid) != os.getpid():
        raise SystemdError(f"--socket systemd: the sockets are for process {pid}, not this one")
    if not count.isdigit() or int(count) < 1:
        raise SystemdError(f"--socket systemd: LISTEN_FDS={count!r}: no socket passed")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    labels += ["unknown"] * (len(fds) - len(labels))
    return list(zip(fds, labels, strict=False))


def child_environment() -> dict[str, str]:
    """This process's environment without systemd's per-process variables (for workers)."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _LISTEN_VARIABLES and key not in _NOTIFY_VARIABLES
    }


class Notifier:
    """Sends state changes to systemd (``NOTIFY_SOCKET``); see the module docstring."""

    __slots__ = ("_address", "_sock", "watchdog_interval")

    def __init__(self, address: str, watchdog_interval: float | None) -> None:
        # "@name" is an abstract socket (a leading NUL byte on the wire).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.watchdog_interval = watchdog_interval
        """Half of ``WATCHDOG_USEC`` in seconds, or None without a watchdog."""

    @classmethod
    def from_environment(cls) -> Notifier | None:
        """A notifier if systemd asked for notifications, else None."""
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        interval = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            interval = int(usec) / 2_000_000
        return cls(address, interval)

    def send(self, *lines: str) -> None:
        """Send one notification; a full or missing socket is logged, never raised."""
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("systemd notification %r not sent: %s", lines, exc)

    def close(self) -> None:
        self._sock.close()
