"""Logging set-up: text or JSON lines, the access log and rate-limited warnings."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

__all__ = [
    "ACCESS_LOGGER",
    "HttpServerLogger",
    "RateLimiter",
    "WorkerFields",
    "configure_logging",
    "printable",
]

ACCESS_LOGGER = "proxy.access"

# Attributes every LogRecord has; anything else came in through ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the message, level, logger and ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """Formatter of text lines that formats the date and time once per second.

    ``logging.Formatter`` calls ``time.strftime`` for every record, and the access log
    writes a record per request.
    """

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._date_time = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._date_time = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._date_time},{int(record.msecs):03d}"


class WorkerFields(logging.Filter):
    """Log filter that adds ``worker`` (the slot index) and ``pid`` to every record."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self._worker = worker
        # Read once: a worker is started as a new interpreter, never forked.
        self._pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._worker
        record.pid = self._pid
        return True


def configure_logging(log_format: str, level: str, *, worker: int | None = None) -> None:
    """Send every log line to stderr in the chosen format.

    ``worker`` is the slot of a worker process started by the supervisor: its lines carry
    the slot and the process id (JSON fields ``worker`` and ``pid``), so that the lines of
    several workers sharing one stderr can be distinguished.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif worker is None:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            TextFormatter(
                "%(asctime)s %(levelname)s [worker %(worker)s pid %(pid)s] %(name)s: %(message)s"
            )
        )
    if worker is not None:
        handler.addFilter(WorkerFields(worker))
    # Neither format shows the source file, line or thread of a record, so they are not
    # collected: finding the caller walks the stack on every record.
    logging._srcfile = None
    logging.logThreads = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ACCESS_LOGGER's one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def printable(value: str | None, limit: int = 100) -> str | None:
    """Return a client-chosen string made safe for one log line: no control characters, bounded."""
    if value is None:
        return None
    if len(value) <= limit and value.isprintable():
        return value
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in value[:limit])
    return cleaned + ("..." if len(value) > limit else "")


class RateLimiter:
    """Allows one log line per key per interval and counts the lines it suppressed."""

    def __init__(self, interval_s: float, *, max_keys: int = 10_000) -> None:
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now: float | None = None) -> tuple[bool, int]:
        """Return (whether to log now, how many lines for this key were suppressed before)."""
        now = time.monotonic() if now is None else now
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last >= self._interval_s:
            if len(self._last) >= self._max_keys:
                self._last.clear()
            self._last[key] = (now, 0)
            return True, suppressed
        self._last[key] = (last, suppressed + 1)
        return False, suppressed + 1


class HttpServerLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's ``aiohttp.server`` logger, with malformed requests logged in one line.

    aiohttp 3.14 logs every request its HTTP parser rejects at ERROR with a traceback
    (``RequestHandler.handle_error``), and the traceback quotes the offending request
    bytes, which may hold a token. Such a request is the client's error: it gets one
    INFO line naming the parser error instead. Other records pass through unchanged.
    Give it to ``web.AppRunner(..., logger=HttpServerLogger())``.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))

    def exception(
        self,
        msg: object,
        *args: object,
        exc_info: Any = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else None
            self.logger.info(
                "rejected a malformed HTTP request from %s: %s (status %s)",
                peer,
                type(exc_info).__name__,
                exc_info.code,
            )
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)
