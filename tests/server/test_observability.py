"""Metrics over HTTP (Prometheus) and JSON logs, from a real `triomilter serve`."""

from __future__ import annotations

import json
import signal

import pytest
import trio

from triomilter import Metrics, Stage, Status
from triomilter.protocol import AddHeader, Continue, Reject, Tempfail

from ._mta import RawMta, frame
from ._support import TIMEOUT, Proc, Spawner, free_port, served

prometheus_parser = pytest.importorskip("prometheus_client.parser")

MILTER = "tests/server/observed_milter.py"


async def traffic(port: int) -> None:
    """Two accepted messages, one rejected, one aborted, one timed out, one protocol error."""
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(("127.0.0.1", port))
        await client.negotiate()
        await client.connect()
        for queue_id in ("4AAA1", "4AAA2"):
            replies = await client.message(queue_id)
            assert replies == [AddHeader(b"X-Observed", b"yes"), Continue()]
            await client.abort()
        assert await client.mail("<spammer@example.org>") == Reject()
        await client.macros("M", i="4AAA3")
        await client.mail()
        await client.rcpt()
        await client.abort()  # aborted mid-message
        await client.macros("M", i="4AAA4")
        assert await client.mail("<slow@example.org>") == Tempfail()  # its deadline
        await client.quit()
        broken = await RawMta.to(("127.0.0.1", port))
        await broken.send_raw(frame("X", b"junk"))  # not a milter command
        assert await broken.read_until_closed() == b""


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        response = b""
        while data := await stream.receive_some():
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def start(spawn: Spawner, *options: str) -> tuple[Proc, int, int]:
    port, metrics_port = free_port(), free_port()
    proc = spawn(
        "-m", "triomilter", "serve", MILTER, "--socket", f"inet:{port}@127.0.0.1",
        "--metrics", f"inet:{metrics_port}@127.0.0.1", "--handler-timeout", "0.2", *options,
    )  # fmt: skip
    await proc.wait_for_output("serving on")
    await proc.wait_for_output("metrics at http://127.0.0.1:")
    return proc, port, metrics_port


async def test_prometheus_endpoint_counts_real_traffic(spawn: Spawner) -> None:
    proc, port, metrics_port = await start(spawn)
    await traffic(port)
    samples = await scrape(metrics_port)
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0

    def value(name: str, **labels: str) -> float:
        return samples[name, tuple(sorted(labels.items()))]

    assert value("triomilter_connections_total") == 2
    assert value("triomilter_connections_open") == 0
    assert value("triomilter_commands_total", stage="mail") == 5
    assert value("triomilter_replies_total", stage="mail", status="reject") == 1
    assert value("triomilter_replies_total", stage="mail", status="tempfail") == 1
    assert value("triomilter_replies_total", stage="eom", status="continue") == 2
    assert value("triomilter_messages_total", verdict="accepted") == 2
    assert value("triomilter_messages_total", verdict="rejected") == 1
    assert value("triomilter_messages_total", verdict="aborted") == 1
    assert value("triomilter_messages_total", verdict="tempfailed") == 1
    assert value("triomilter_handler_timeouts_total", stage="mail") == 1
    assert value("triomilter_protocol_errors_total") == 1
    assert value("triomilter_panics_total") == 0
    assert value("triomilter_handler_duration_seconds_count", stage="eom") == 2
    assert value("triomilter_handler_duration_seconds_bucket", stage="mail", le="+Inf") == 5
    assert value("process_resident_memory_bytes") > 0  # the process's own, too


async def test_json_logs_one_object_per_line(spawn: Spawner) -> None:
    proc, port, _ = await start(spawn, "--log-format", "json", "--log-level", "DEBUG")
    await traffic(port)
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    records = [json.loads(line) for line in proc.output().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "pid", "message"} <= set(r) for r in records)
    timeout = next(r for r in records if r.get("event") == "handler_timeout")
    assert timeout["level"] == "WARNING"
    assert timeout["connection_id"] == "#1" and timeout["stage"] == "mail"
    assert timeout["message"].startswith("mail: handler mail did not return within 0.2 s")
    error = next(r for r in records if r.get("event") == "protocol_error")
    assert error["level"] == "ERROR" and error["connection_id"] == "#2"
    assert timeout["queue_id"] == "4AAA4"  # once the MTA sent macro i
    assert records[-1]["time"].endswith("Z")


async def test_the_metrics_object_from_python() -> None:
    """The hook for other exporters: a `Metrics` given to serve(), read any time."""
    from .observed_milter import milter

    metrics = Metrics()
    async with served(milter, metrics=metrics, handler_timeout=0.2) as srv:
        await traffic(srv.address[1])
    assert metrics.connections_total == 2 and metrics.connections_open == 0
    assert metrics.messages["accepted"] == 2
    assert metrics.replies[Stage.MAIL, Status.REJECT] == 1
    assert metrics.handler_seconds[Stage.EOM].count == 2
