"""Prometheus exposition of `Metrics` over HTTP (``--metrics``; extra ``triomilter[prometheus]``).

The numbers are read from `Metrics` when Prometheus scrapes (a custom
collector): nothing is added to the per-command path beyond what `Metrics`
itself costs. The endpoint is a small HTTP/1.0 server on the milter's own
event loop, bounded like everything else: a request head of at most 8 KiB
within 5 s, at most 16 scrapes at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import trio

from ._metrics import Metrics

REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 5.0
SCRAPES_AT_ONCE = 16

try:  # the optional extra
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - reported by exposition() when used
    Collector = object  # type: ignore[assignment,misc]


class MetricsCollector(Collector):
    """Turns a `Metrics` into Prometheus metric families, at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        yield GaugeMetricFamily(
            "triomilter_connections_open", "MTA connections open now", value=m.connections_open
        )
        yield CounterMetricFamily(
            "triomilter_connections", "MTA connections since the start", value=m.connections_total
        )
        commands = CounterMetricFamily(
            "triomilter_commands", "Commands received, by stage", labels=["stage"]
        )
        for stage, count in sorted(m.commands.items(), key=lambda item: item[0].value):
            commands.add_metric([stage.value], count)
        yield commands
        replies = CounterMetricFamily(
            "triomilter_replies", "Replies sent, by stage and status", labels=["stage", "status"]
        )
        for (stage, status), count in sorted(
            m.replies.items(), key=lambda item: (item[0][0].value, item[0][1].value)
        ):
            replies.add_metric([stage.value, status.value], count)
        yield replies
        messages = CounterMetricFamily(
            "triomilter_messages", "Messages, by how they ended", labels=["verdict"]
        )
        for verdict, count in sorted(m.messages.items()):
            messages.add_metric([verdict], count)
        yield messages
        yield from self._handler_metrics()
        for name, help_text, value in (
            ("triomilter_panics", "Handler panics", m.panics),
            (
                "triomilter_protocol_errors",
                "Connections closed for a protocol error",
                m.protocol_errors,
            ),
            (
                "triomilter_connection_limit_hits",
                "Connections answered TEMPFAIL at the connection limit",
                m.connection_limit_hits,
            ),
            (
                "triomilter_event_loop_stalls",
                "Handler calls that held the event loop past the stall threshold",
                m.loop_stalls,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)

    def _handler_metrics(self) -> Iterator[Any]:
        m = self.metrics
        durations = HistogramMetricFamily(
            "triomilter_handler_duration_seconds",
            "Handler running time, by stage",
            labels=["stage"],
        )
        for stage, histogram in sorted(m.handler_seconds.items(), key=lambda item: item[0].value):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(histogram.buckets, histogram.counts, strict=False):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", cumulative + histogram.counts[-1]))
            durations.add_metric([stage.value], buckets, histogram.sum)
        yield durations
        timeouts = CounterMetricFamily(
            "triomilter_handler_timeouts",
            "Handler calls cancelled at their deadline",
            labels=["stage"],
        )
        for stage, count in sorted(m.handler_timeouts.items(), key=lambda item: item[0].value):
            timeouts.add_metric([stage.value], count)
        yield timeouts


def exposition(metrics: Metrics) -> Any:
    """A registry with ``metrics`` and the process's own (memory, CPU, descriptors)."""
    try:
        registry = CollectorRegistry()
    except NameError:
        raise RuntimeError(
            "--metrics needs prometheus_client: pip install 'triomilter[prometheus]'"
        ) from None
    registry.register(MetricsCollector(metrics))
    ProcessCollector(registry=registry)
    return registry


async def serve_metrics(
    metrics: Metrics,
    listener: trio.SocketListener,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` on ``listener`` until cancelled."""
    registry = exposition(metrics)
    scrapes = trio.Semaphore(SCRAPES_AT_ONCE)

    async def handle(stream: trio.SocketStream) -> None:
        async with scrapes:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _answer(stream, registry)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, [listener])
        task_status.started()


async def _answer(stream: trio.SocketStream, registry: Any) -> None:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        data = await stream.receive_some(REQUEST_LIMIT)
        if not data:
            return
        head += data
        if len(head) > REQUEST_LIMIT:
            await stream.send_all(_response(431, b"request head too large\n"))
            return
    method, _, rest = head.partition(b" ")
    path = rest.partition(b" ")[0].partition(b"?")[0]
    if method not in (b"GET", b"HEAD"):
        await stream.send_all(_response(405, b"GET only\n"))
    elif path not in (b"/metrics", b"/"):
        await stream.send_all(_response(404, b"try /metrics\n"))
    else:
        response = _response(200, generate_latest(registry), b"text/plain; version=0.0.4")
        if method == b"HEAD":
            response = response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        await stream.send_all(response)


_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 431: b"Too Large"}


def _response(code: int, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (
        b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (code, _REASONS[code], content_type, len(body))
        + body
    )
