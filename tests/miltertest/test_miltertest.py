"""Drive triomilter milters with OpenDKIM's ``miltertest`` (an independent
MTA-side implementation of the protocol, Lua-scripted).

Each ``NAME.lua`` here runs against ``examples/NAME.py`` (or ``NAME.py`` in
this directory), served by ``python -m triomilter serve`` on a free loopback
port that the script gets as ``-D port=PORT``.  miltertest exits non-zero if
a check fails; the scripts then print ``FAIL: <what>``.  Without miltertest
(Debian package ``miltertest``) the tests are skipped, or fail under CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPTS = sorted(p.stem for p in HERE.glob("*.lua") if p.stem != "common")
PASSED = "miltertest: all checks passed"


@pytest.fixture(scope="module")
def miltertest() -> str:
    path = shutil.which("miltertest")
    if path is None:
        reason = "miltertest is not installed (Debian package miltertest)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the miltertest scripts: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _target(name: str) -> str:
    example = REPO / "examples" / f"{name}.py"
    return str(example if example.exists() else HERE / f"{name}.py")


class Served:
    """``triomilter serve TARGET`` on a free port, output in a log file."""

    def __init__(self, target: str, log_path: Path) -> None:
        self.log_path = log_path
        self.port = _free_port()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "triomilter",
                    "serve",
                    target,
                    "--socket",
                    f"inet:{self.port}@127.0.0.1",
                    "--log-level",
                    "DEBUG",
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while "serving on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{target} did not start:\n{self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], Served]]:
    started: list[Served] = []

    def start(name: str) -> Served:
        served = Served(_target(name), tmp_path / f"{name}.log")
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def run_script(miltertest: str, script: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [miltertest, "-D", f"port={port}", "-s", str(script)],
        cwd=HERE,  # the scripts dofile("common.lua")
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_miltertest_script(miltertest: str, serve: Callable[[str], Served], name: str) -> None:
    served = serve(name)
    result = run_script(miltertest, HERE / f"{name}.lua", served.port)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nmilter log:\n{served.log()}"
    assert result.returncode == 0, report
    assert PASSED in result.stdout, report
    assert served.stop() == 0, report
    assert "Traceback" not in served.log(), report


def test_scripts_exist() -> None:
    """Every example has a script."""
    examples = {path.stem for path in (REPO / "examples").glob("*.py")}
    assert "attachment_filter" in examples
    assert examples <= set(SCRIPTS)


def test_a_failing_check_fails(
    miltertest: str, serve: Callable[[str], Served], tmp_path: Path
) -> None:
    """The harness notices a wrong expectation (so a green run means something)."""
    served = serve("header_tagger")
    script = tmp_path / "wrong.lua"
    script.write_text(
        'dofile("common.lua")\n'
        "run(function()\n"
        "    local conn = open()\n"
        '    ok(mt.conninfo(conn, "client.example", "192.0.2.7"), "mt.conninfo()")\n'
        '    ok(mt.eom(conn), "mt.eom()")\n'
        '    check(mt.eom_check(conn, MT_HDRADD, "X-Triomilter-Tagged", "wrong"), "wrong tag")\n'
        "end)\n"
    )
    result = run_script(miltertest, script, served.port)
    assert result.returncode != 0
    assert "FAIL:" in result.stdout and "wrong tag" in result.stdout
    assert PASSED not in result.stdout
