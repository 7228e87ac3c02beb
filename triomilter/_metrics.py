"""`Metrics`: what a server counts, cheap enough for the per-command path.

The dispatcher and the server call the methods below as things happen;
they only add to plain Python numbers (no locks: everything runs on one
event loop), so counting costs a few hundred nanoseconds per command, and
nothing at all when no `Metrics` is given. Exporters read the numbers when
asked: the Prometheus exposition (``--metrics``) at each scrape; your own
code whenever it likes (a task that pushes to statsd, say), or by
overriding the methods to forward each event as it happens.
"""

from __future__ import annotations

import bisect
from collections import Counter

from ._stage import Stage
from ._status import Status

HANDLER_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the handler-duration histogram buckets."""

VERDICTS = ("accepted", "rejected", "tempfailed", "discarded", "aborted")
"""How a message can end, as `Metrics.messages` counts them."""

_VERDICT_OF_STATUS = {
    Status.CONTINUE: "accepted",
    Status.ACCEPT: "accepted",
    Status.REJECT: "rejected",
    Status.TEMPFAIL: "tempfailed",
    Status.DISCARD: "discarded",
}


class Histogram:
    """Counts of observations per bucket (cumulative only when exported), and their sum."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = HANDLER_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Metrics:
    """Counters of one server (one process), updated as MTA connections are served.

    Give one to `serve`/`serve_listener` (``metrics=``) and read it any
    time; subclass it and extend the methods to forward events elsewhere.
    The attributes:

    - ``connections_open``, ``connections_total``: MTA connections now, and
      since the start;
    - ``commands``: commands received, by stage (every command that runs a
      handler stage, whether or not the milter has a handler for it);
    - ``replies``: replies sent, by ``(stage, status)`` (NOREPLY stages
      count as ``Status.NOREPLY``);
    - ``messages``: messages by how they ended (`VERDICTS`);
    - ``handler_seconds``: a `Histogram` per stage of handler running times;
    - ``handler_timeouts``: handler calls cancelled at their deadline, by stage;
    - ``panics``, ``protocol_errors``, ``connection_limit_hits``,
      ``loop_stalls``: counts of those events.
    """

    def __init__(self) -> None:
        self.connections_open = 0
        self.connections_total = 0
        self.replies: Counter[tuple[Stage, Status]] = Counter()
        self.messages: Counter[str] = Counter()
        self.handler_seconds: dict[Stage, Histogram] = {}
        self.handler_timeouts: Counter[Stage] = Counter()
        self.panics = 0
        self.protocol_errors = 0
        self.connection_limit_hits = 0
        self.loop_stalls = 0

    # --- called by the server and the dispatcher --------------------------------

    def connection_opened(self) -> None:
        """An MTA connection was accepted and is now served."""
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self) -> None:
        """An MTA connection ended."""
        self.connections_open -= 1

    def replied(self, stage: Stage, status: Status, ends_message: bool) -> None:
        """A command of ``stage`` was answered with ``status`` (or not: NOREPLY)."""
        self.replies[stage, status] += 1
        if ends_message:
            self.messages[_VERDICT_OF_STATUS.get(status, "tempfailed")] += 1

    def handler_ran(self, stage: Stage, seconds: float) -> None:
        """A handler of ``stage`` ran for ``seconds`` (into ``handler_seconds``)."""
        histogram = self.handler_seconds.get(stage)
        if histogram is None:
            histogram = self.handler_seconds[stage] = Histogram()
        # Histogram.observe, inline: this runs for every handler call.
        histogram.counts[bisect.bisect_left(histogram.buckets, seconds)] += 1
        histogram.sum += seconds

    def message_aborted(self) -> None:
        """An open message was abandoned: ABORT, or the connection ended mid-message."""
        self.messages["aborted"] += 1

    def handler_timed_out(self, stage: Stage) -> None:
        """A handler of ``stage`` was cancelled at its deadline."""
        self.handler_timeouts[stage] += 1

    def panicked(self) -> None:
        """A handler or a background task panicked."""
        self.panics += 1

    def protocol_error(self) -> None:
        """A connection was closed for a protocol error."""
        self.protocol_errors += 1

    def connection_limit_hit(self) -> None:
        """A connection over ``max_connections`` was answered TEMPFAIL at once."""
        self.connection_limit_hits += 1

    def loop_stalled(self) -> None:
        """A handler call held the event loop longer than ``stall_warning``."""
        self.loop_stalls += 1

    # --- reading -----------------------------------------------------------------------

    @property
    def commands(self) -> Counter[Stage]:
        """Commands received, by stage (each one got a reply, or none: NOREPLY)."""
        counts: Counter[Stage] = Counter()
        for (stage, _), count in self.replies.items():
            counts[stage] += count
        return counts

    @property
    def messages_total(self) -> int:
        """Messages ended so far, however they ended."""
        return sum(self.messages.values())
