"""The command line (``python -m triomilter``), always in a subprocess on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket as stdsocket
import stat
from pathlib import Path

import pytest
import trio

from triomilter.protocol import AddHeader, Continue, Tempfail

from ._mta import RawMta
from ._support import REPO, TIMEOUT, Proc, Spawner, free_port
from .test_shutdown import finish_message, open_session, start_message

PID_MILTER = "tests/server/sample_milters.py"


async def serve_cli(
    spawn: Spawner, target: str, *options: str, ready: str = "serving on", count: int = 1
) -> tuple[Proc, tuple[str, int]]:
    port = free_port()
    proc = spawn(
        "-m", "triomilter", "serve", target, "--socket", f"inet:{port}@127.0.0.1", *options
    )
    await proc.wait_for_output(ready, count)
    return proc, ("127.0.0.1", port)


async def tagged_pid(address: tuple[str, int], hostname: str = "mx.example") -> int:
    """One whole transaction; the pid of the process that tagged the message."""
    client = await RawMta.to(address)
    await client.negotiate()
    assert await client.connect(hostname) == Continue()
    replies = await client.message()
    await client.quit()
    assert replies[-1] == Continue()
    assert replies[1] == AddHeader(b"X-Client", hostname.encode())
    pid_header = replies[0]
    assert isinstance(pid_header, AddHeader) and pid_header.name == b"X-Pid"
    return int(pid_header.value)


async def test_serve_the_header_tagger_example(spawn: Spawner) -> None:
    proc, address = await serve_cli(spawn, "examples/header_tagger.py")
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(address)
        replies = await client.transaction()
        assert replies == [
            AddHeader(b"X-Triomilter-Tagged", b"mx.example [192.0.2.1]"),
            Continue(),
        ]
        assert await client.read_until_closed() == b""
    assert "milter 'header-tagger' serving on inet:" in proc.output()
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


@pytest.mark.parametrize(
    ("target", "cwd"),
    [
        ("tests/server/sample_milters.py:milter", REPO),  # a file and an attribute
        ("sample_milters:milter", REPO / "tests" / "server"),  # a module beside us
        ("sample_milters", REPO / "tests" / "server"),  # its `milter` attribute
    ],
)
async def test_serve_module_and_attribute(spawn: Spawner, target: str, cwd: Path) -> None:
    port = free_port()
    proc = spawn(
        "-m",
        "triomilter",
        "serve",
        target,
        "--socket",
        f"inet:{port}@127.0.0.1",
        cwd=cwd,
        env={"PYTHONPATH": str(REPO)},
    )
    await proc.wait_for_output("milter 'pid-tagger' serving on")
    with trio.fail_after(TIMEOUT):
        assert await tagged_pid(("127.0.0.1", port)) == proc.pid
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


async def test_serve_a_typed_handler_module(spawn: Spawner) -> None:
    proc, address = await serve_cli(spawn, "tests/server/handler_module.py")
    assert "milter 'typed-handlers' serving on" in proc.output()
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(address)
        assert await client.transaction() == [AddHeader(b"X-Typed", b"yes"), Continue()]
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


async def test_serve_on_a_unix_socket_with_a_mode(spawn: Spawner, sock_dir: Path) -> None:
    path = sock_dir / "cli.sock"
    proc = spawn(
        "-m", "triomilter", "serve", PID_MILTER, "--socket", f"local:{path}", "--socket-mode", "640"
    )
    await proc.wait_for_output("serving on unix:")
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
    with trio.fail_after(TIMEOUT):
        client = await RawMta.unix(str(path))
        replies = await client.transaction()
        assert replies[0] == AddHeader(b"X-Pid", str(proc.pid).encode())
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert not path.exists()


async def run_cli(spawn: Spawner, *args: str) -> tuple[int, str]:
    proc = spawn("-m", "triomilter", *args)
    code = await proc.wait()
    return code, proc.output()


async def test_check_shows_the_negotiation(spawn: Spawner) -> None:
    # Without a message, check negotiates and connects (tests/tools covers messages).
    code, out = await run_cli(spawn, "check", "examples/header_tagger.py")
    assert code == 0, out
    assert "milter 'header-tagger' (in memory), as Postfix" in out
    assert "reply: version 6, actions ADD_HEADER, protocol NO_HELO|" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
        (["serve", "no/such/file.py"], "no such file: no/such/file.py"),
        (["serve", "examples/header_tagger.py:nope"], "has no attribute 'nope'"),
        (["serve", "examples/header_tagger.py:Client"], "not a triomilter.Milter"),
        (["serve", "a:b:c"], "expected MODULE[:ATTR]"),
        (["serve", "examples/header_tagger.py:attrs"], "module 'attrs' has no decorated handlers"),
        (["serve", "tests/server/__init__.py"], "has no Milter and no decorated handlers"),
        (["check", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
    ],
)
async def test_bad_target_exits_2_with_a_message(
    spawn: Spawner, args: list[str], message: str
) -> None:
    if args[0] == "serve":
        args = [*args, "--socket", "inet:0@127.0.0.1"]
    code, out = await run_cli(spawn, *args)
    assert code == 2, out
    assert out.startswith("triomilter: ")
    assert message in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus:1@127.0.0.1", "unknown protocol 'bogus'"),
        ("inet:99999@127.0.0.1", "out of range"),
        ("unix:", "no path"),
    ],
)
async def test_bad_socket_exits_2(spawn: Spawner, spec: str, message: str) -> None:
    code, out = await run_cli(spawn, "serve", PID_MILTER, "--socket", spec)
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out


async def test_address_in_use_exits_1(spawn: Spawner) -> None:
    with stdsocket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = await run_cli(spawn, "serve", PID_MILTER, "--socket", f"inet:{port}@127.0.0.1")
    assert code == 1, out
    assert "cannot serve" in out
    assert "Traceback" not in out


async def test_panic_exits_70(spawn: Spawner) -> None:
    proc, address = await serve_cli(spawn, PID_MILTER)
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(address)
        await client.negotiate()
        assert await client.connect() == Continue()
        assert await client.helo("panic") == Tempfail()
        assert await client.read_until_closed() == b""
    assert await proc.wait() == 70, proc.output()
    assert "RuntimeError('boom')" in proc.output()


# --- several workers on one port -------------------------------------------------------

WORKER_READY = "milter 'pid-tagger' serving on"


def worker_pids(output: str) -> set[int]:
    match = re.search(r"with 2 workers \(pids (\d+) (\d+)\)", output)
    assert match, output
    return {int(match.group(1)), int(match.group(2))}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_workers_share_one_port_and_sigterm_drains_all(spawn: Spawner) -> None:
    proc, address = await serve_cli(
        spawn, PID_MILTER, "--workers", "2", ready=WORKER_READY, count=2
    )
    pids = worker_pids(proc.output())
    assert proc.pid not in pids
    with trio.fail_after(TIMEOUT):
        # Sixteen connections (SO_REUSEPORT spreads them by source port), each
        # in the middle of a message when the shutdown begins.
        clients = [await open_session(address, f"client{n}") for n in range(16)]
        for client in clients:
            await start_message(client)
        proc.signal(signal.SIGTERM)
        await proc.wait_for_output("shutting down", count=2)  # both workers drain
        served_by = set()
        for n, client in enumerate(clients):
            replies = await finish_message(client)
            assert replies[-1] == Continue()
            assert replies[1] == AddHeader(b"X-Client", f"client{n}".encode())
            served_by.add(int(replies[0].value))  # type: ignore[attr-defined]
        # Both workers answered on the one port.
        assert served_by == pids
        assert await proc.wait() == 0, proc.output()
    assert all(gone(pid) for pid in pids)


async def test_workers_on_a_unix_socket(spawn: Spawner, sock_dir: Path) -> None:
    """The parent opens the socket once and hands it over: any spec works."""
    path = sock_dir / "workers.sock"
    proc = spawn(
        "-m", "triomilter", "serve", PID_MILTER, "--socket", f"unix:{path}", "--workers", "2"
    )
    await proc.wait_for_output(WORKER_READY, 2)
    pids = worker_pids(proc.output())
    # A shared socket goes to whichever worker wakes first (the same one, often,
    # many times over): to see that each accepts on it, stop the other meanwhile.
    for pid in pids:
        (other,) = pids - {pid}
        os.kill(other, signal.SIGSTOP)
        try:
            with trio.fail_after(TIMEOUT):
                client = await RawMta.unix(str(path))
                replies = await client.transaction()
        finally:
            os.kill(other, signal.SIGCONT)
        assert int(replies[0].value) == pid  # type: ignore[union-attr]
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output()
    assert not path.exists()  # the parent's socket file, removed by the parent
    assert all(gone(pid) for pid in pids)


async def test_workers_on_port_zero(spawn: Spawner) -> None:
    proc = spawn(
        "-m", "triomilter", "serve", PID_MILTER, "--socket", "inet:0@127.0.0.1", "--workers", "2"
    )
    out = await proc.wait_for_output(WORKER_READY, 2)
    match = re.search(r"serving on inet:(\d+)@127\.0\.0\.1 with 2 workers", out)
    assert match, out
    port = int(match.group(1))
    assert port != 0
    with trio.fail_after(TIMEOUT):
        assert await tagged_pid(("127.0.0.1", port)) in worker_pids(out)
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output()


async def test_workers_get_the_parents_options(spawn: Spawner) -> None:
    proc, address = await serve_cli(
        spawn, PID_MILTER, "--workers", "2", "--io-timeout", "0.5", ready=WORKER_READY, count=2
    )
    with trio.fail_after(TIMEOUT):
        idle = await RawMta.to(address)
        await idle.negotiate()
        # Closed by whichever worker took it, after the I/O timeout given to the parent.
        assert await idle.read_until_closed() == b""
    await proc.wait_for_output("no I/O with the MTA for 0.5 s")
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output()


async def test_a_panic_in_one_worker_stops_all_with_70(spawn: Spawner) -> None:
    proc, address = await serve_cli(
        spawn, PID_MILTER, "--workers", "2", ready=WORKER_READY, count=2
    )
    pids = worker_pids(proc.output())
    with trio.fail_after(TIMEOUT):
        assert await tagged_pid(address) in pids  # served before the panic
        client = await RawMta.to(address)
        await client.negotiate()
        assert await client.connect() == Continue()
        assert await client.helo("panic") == Tempfail()
    assert await proc.wait() == 70, proc.output()
    assert all(gone(pid) for pid in pids)
    assert "exited with status 70: stopping all" in proc.output()


# --- serve FILE behaves like `python FILE` ------------------------------------------------

SIBLING_MILTER = """
from triomilter import Actions, Context, Milter, Status, on_eom

import policy_rules  # a module beside this file, as `python milter.py` would find it


@on_eom
async def eom(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-Rule", policy_rules.RULE)
    return Status.CONTINUE


milter = Milter("sibling", handlers=[eom], actions=Actions.ADD_HEADER)
"""


async def test_serve_a_file_that_imports_a_module_beside_it(spawn: Spawner, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "milter.py").write_text(SIBLING_MILTER)
    (project / "policy_rules.py").write_text('RULE = "from-a-sibling"\n')
    port = free_port()
    proc = spawn(
        "-m",
        "triomilter",
        "serve",
        str(project / "milter.py"),
        "--socket",
        f"inet:{port}@127.0.0.1",
        cwd=tmp_path,  # not the file's directory
    )
    await proc.wait_for_output("milter 'sibling' serving on")
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(("127.0.0.1", port))
        replies = await client.transaction()
    assert replies == [AddHeader(b"X-Rule", b"from-a-sibling"), Continue()]
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "import no_such_module_here\n",
            "ModuleNotFoundError: No module named 'no_such_module_here'",
        ),
        ("x = 1\ndef broken(:\n", "SyntaxError"),
        (
            "raise RuntimeError('config missing')\n",
            "RuntimeError: config missing (broken.py, line 1)",
        ),
        (
            "from triomilter import Context, Status, on_helo\n\n"
            "@on_helo\nasync def helo(ctx: Context[None], hostname: int) -> Status: ...\n",
            "TypeError: @on_helo handler helo(): parameter 'hostname'",
        ),
    ],
    ids=["import", "syntax", "raises", "bad-handler"],
)
async def test_a_file_that_cannot_load_is_one_line_and_exit_2(
    spawn: Spawner, tmp_path: Path, source: str, message: str
) -> None:
    path = tmp_path / "broken.py"
    path.write_text(source)
    code, out = await run_cli(spawn, "serve", str(path), "--socket", "inet:0@127.0.0.1")
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(f"triomilter: cannot load {path}: "), out
    assert message in lines[0]
    # The traceback is there for whoever asks for it.
    code, out = await run_cli(
        spawn, "serve", str(path), "--socket", "inet:0@127.0.0.1", "--log-level", "DEBUG"
    )
    assert code == 2
    assert "Traceback (most recent call last)" in out
