"""systemd: socket activation with the real systemd-socket-activate, and the notify protocol.

The notify side is checked by a datagram socket the test owns as
``NOTIFY_SOCKET``, receiving what the milter sends, in order.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket as stdsocket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from triomilter.protocol import Continue

from ._mta import RawMta
from ._support import REPO, TIMEOUT, Spawner, free_port

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
# Skipped where systemd's tools are missing, but never under CI (.ci/run installs them).
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None and not os.environ.get("CI"),
    reason="systemd-socket-activate is not installed (Debian: systemd)",
)
MILTER = "tests/server/sample_milters.py"


class NotifySocket:
    """What systemd would receive on ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_DGRAM)
        self.messages: list[list[str]] = []

    async def bind(self) -> NotifySocket:
        await self.sock.bind(str(self.path))
        return self

    def drain(self) -> list[str]:
        """Take every notification already queued (without waiting); their lines."""
        lines: list[str] = []
        while True:
            try:
                data = os.read(self.sock.fileno(), 4096)  # one datagram; trio's is non-blocking
            except BlockingIOError:
                return lines
            lines += data.decode().split("\n")

    async def until(self, line: str) -> list[str]:
        """Receive notifications until one carries ``line``; all lines so far."""
        with trio.fail_after(TIMEOUT):
            while not any(line in entry for message in self.messages for entry in message):
                data = await self.sock.recv(4096)
                self.messages.append(data.decode().split("\n"))
        return [entry for message in self.messages for entry in message]


async def transaction(address: object) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(address)
        replies = await client.transaction()
        assert replies[-1] == Continue()


@needs_socket_activate
@pytest.mark.parametrize("workers", [1, 2])
async def test_socket_activation_over_tcp(spawn: Spawner, workers: int) -> None:
    port = free_port()
    assert SOCKET_ACTIVATE is not None
    proc = spawn.program(
        SOCKET_ACTIVATE,
        "--listen", f"127.0.0.1:{port}",
        "--fdname", "milter",
        "-E", f"PYTHONPATH={REPO}",
        sys.executable, "-m", "triomilter", "serve", MILTER,
        "--socket", "systemd", "--workers", str(workers),
    )  # fmt: skip
    await proc.wait_for_output("Listening on")
    # The first connection makes systemd-socket-activate start the milter on its socket.
    for _ in range(4):
        await transaction(("127.0.0.1", port))
    out = await proc.wait_for_output("milter 'pid-tagger' serving on inet:", workers)
    assert f"serving on inet:{port}@127.0.0.1" in out
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output()


@needs_socket_activate
async def test_socket_activation_of_a_unix_socket(spawn: Spawner, sock_dir: Path) -> None:
    path = sock_dir / "activated.sock"
    assert SOCKET_ACTIVATE is not None
    proc = spawn.program(
        SOCKET_ACTIVATE,
        "--listen", str(path),
        "-E", f"PYTHONPATH={REPO}",
        sys.executable, "-m", "triomilter", "serve", MILTER, "--socket", "systemd",
    )  # fmt: skip
    await proc.wait_for_output("Listening on")
    await transaction(str(path))
    await transaction(str(path))
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output()


async def test_socket_systemd_without_sockets_is_a_usage_error(spawn: Spawner) -> None:
    proc = spawn("-m", "triomilter", "serve", MILTER, "--socket", "systemd")
    assert await proc.wait() == 2
    assert "no sockets from systemd" in proc.output()


@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_status_watchdog_stopping_in_order(
    spawn: Spawner, sock_dir: Path, workers: int
) -> None:
    notify = await NotifySocket(sock_dir / "notify").bind()
    port = free_port()
    proc = spawn(
        "-m", "triomilter", "serve", MILTER, "--socket", f"inet:{port}@127.0.0.1",
        "--workers", str(workers),
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"},
    )  # fmt: skip
    lines = await notify.until("READY=1")
    assert lines[0] == "READY=1"
    await proc.wait_for_output("milter 'pid-tagger' serving on", workers)
    await transaction(("127.0.0.1", port))
    await notify.until("WATCHDOG=1")  # every 0.1 s: half the watchdog period
    if workers == 1:
        await notify.until("connection(s)")  # the status counts connections
    proc.signal(signal.SIGTERM)
    lines = await notify.until("STOPPING=1")
    assert await proc.wait() == 0, proc.output()
    assert lines.index("READY=1") < lines.index("WATCHDOG=1") < lines.index("STOPPING=1")
    assert any(line.startswith("STATUS=") for line in lines)


@needs_socket_activate
async def test_workers_watchdog_stops_while_one_worker_is_blocked(
    spawn: Spawner, sock_dir: Path, tmp_path: Path
) -> None:
    """With --workers, systemd is pinged only while every worker's loop pings the parent."""
    notify = await NotifySocket(sock_dir / "notify").bind()
    port = free_port()
    proc = spawn(
        "-m", "triomilter", "serve", f"{MILTER}:blocker", "--socket", f"inet:{port}@127.0.0.1",
        "--workers", "2",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
    )  # fmt: skip
    await proc.wait_for_output("milter 'blocker' serving on", 2)
    lines = await notify.until("WATCHDOG=1")
    assert lines[0] == "READY=1"  # sent once both workers said they serve
    release = tmp_path / "release"
    async with trio.open_nursery() as nursery:
        client = await RawMta.to(("127.0.0.1", port))
        await client.negotiate()
        await client.connect()
        nursery.start_soon(client.helo, f"block:{release}")
        await proc.wait_for_output("did not ping their watchdog")
        # What was sent before the warning; after it, nothing while the worker is blocked.
        notify.drain()
        assert await trio.Path(f"{release}.blocked").exists()  # the worker is in the handler
        await trio.sleep(1)  # five rounds of the parent's: none may ping
        assert "WATCHDOG=1" not in notify.drain()
        release.touch()
    notify.messages.clear()
    await notify.until("WATCHDOG=1")
    await proc.wait_for_output("every worker pings its watchdog again")
    await client.aclose()
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output()


async def test_no_notify_socket_sends_nothing(spawn: Spawner, sock_dir: Path) -> None:
    """Without NOTIFY_SOCKET, as sd_notify: nothing, and nothing breaks."""
    port = free_port()
    proc = spawn("-m", "triomilter", "serve", MILTER, "--socket", f"inet:{port}@127.0.0.1")
    await proc.wait_for_output("serving on")
    await transaction(("127.0.0.1", port))
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None and not os.environ.get("CI"), reason="systemd-analyze is missing"
)
def test_the_documented_units_verify(tmp_path: Path) -> None:
    """docs/systemd/ as deploying.md shows them, checked by systemd itself."""
    assert SYSTEMD_ANALYZE is not None
    units = REPO / "docs" / "systemd"
    deploying = (REPO / "docs" / "deploying.md").read_text()
    for unit in ("triomilter.socket", "triomilter.service"):
        text = (units / unit).read_text()
        assert f"```ini\n{text}```" in deploying, f"deploying.md shows another {unit}"
        # The ExecStart of this checkout, since systemd checks that it exists.
        (tmp_path / unit).write_text(
            text.replace(
                "/opt/triomilter/bin/triomilter", str(Path(sys.executable).parent / "triomilter")
            )
        )
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "triomilter.socket", "triomilter.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    service = (units / "triomilter.service").read_text()
    socket_unit = (units / "triomilter.socket").read_text()
    assert "Type=notify" in service and "--socket systemd" in service
    assert "SocketGroup=postfix" in socket_unit and "SocketMode=0660" in socket_unit
    # systemd makes the socket's directory root:root with DirectoryMode: Postfix
    # (neither root nor in root's group) reaches the socket only if others may
    # search it.
    directory_mode = re.search(r"^DirectoryMode=([0-7]+)$", socket_unit, re.MULTILINE)
    assert directory_mode is not None and int(directory_mode[1], 8) & 0o001
