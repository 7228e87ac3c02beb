"""Log formats of the command line: text for people, JSON lines for log pipelines.

Every record about an MTA connection carries, besides its text, the fields
``connection_id``, ``queue_id`` (once the MTA sent macro ``i``), ``stage``
and ``event`` (a short name for what happened: ``handler_timeout``,
``protocol_error``...). The text format puts the first two in front of the
message (``[#12] 4XyZ1: ...``, what ``grep`` wants); the JSON format gives
each its own key.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# Record attributes the dispatcher sets (logging's `extra`).
FIELDS = ("connection_id", "queue_id", "stage", "event")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, the fields above.

    ``message`` is the text without the connection prefix (it is in the
    fields); an exception comes as ``exception``, its traceback as text.
    Anything a caller passed in ``extra`` that is JSON-able is kept too.
    """

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "detail"}

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": getattr(record, "detail", None) or record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in self._STANDARD or value is None:
                continue
            document[key] = value if _jsonable(value) else repr(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def _jsonable(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def configure(level: int, log_format: str) -> None:
    """Set up the root logger for the command line (standard error)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
