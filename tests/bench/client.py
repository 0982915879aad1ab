"""The benchmark's asyncio load client for streams (S3) and idle streams held open (S4).

It speaks HTTP/1.1 over raw asyncio protocols, because a full client library would
cost more CPU than the proxies it measures. Two commands, each printing JSON lines:

- ``streams``: C connections, each sending requests one after another for a fixed time;
  records time to first body byte (TTFB) and time to the end of each response.
- ``idle``: opens N streams at a fixed rate, each counted as open at its first body
  byte, prints ``{"phase": "ready"}``, holds them, then closes them and prints
  ``{"phase": "done"}`` with the errors.

Times are from just before the request is written. The client's own CPU time
(``getrusage``) is reported so that a saturated load generator is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import orjson

from tests.bench.stats import percentile

_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """Incremental HTTP/1.1 response parser: status, first body byte and end of response.

    Raises ValueError on a malformed head or chunk size line.
    """

    def __init__(self) -> None:
        self.status = 0
        self.got_body = False
        self._state = _HEAD
        self._buffer = bytearray()
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer and self._state != _DONE:
            if not self._step():
                return

    def eof(self) -> None:
        """Mark the end of a response framed by connection close."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE

    def _step(self) -> bool:
        """Consume what the current state can; return False when more bytes are needed."""
        buffer = self._buffer
        if self._state == _HEAD:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
        elif self._state in (_CHUNK_SIZE, _TRAILER):
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            line = bytes(buffer[:end])
            del buffer[: end + 2]
            if self._state == _TRAILER:
                self._state = _DONE if not line else _TRAILER
                return True
            self._remaining = int(line.split(b";")[0], 16)
            self._state = _CHUNK_DATA if self._remaining else _TRAILER
        elif self._state == _CHUNK_END:
            if len(buffer) < 2:
                return False
            del buffer[:2]
            self._state = _CHUNK_SIZE
        else:
            self._take_body()
        return True

    def _take_body(self) -> None:
        buffer = self._buffer
        if self._state == _UNTIL_CLOSE:
            self.got_body = True
            buffer.clear()
            return
        taken = min(self._remaining, len(buffer))
        if taken:
            self.got_body = True
        del buffer[:taken]
        self._remaining -= taken
        if self._remaining == 0:
            self._state = _CHUNK_END if self._state == _CHUNK_DATA else _DONE

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        chunked = False
        length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value)
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH if length else _DONE
        else:
            self._state = _UNTIL_CLOSE


class Connection(asyncio.Protocol):
    """One client connection that sends one request at a time and times its response."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.parser = ResponseParser()
        self.sent_at = 0.0
        self.first_at = 0.0
        self.done_at = 0.0
        self.first_body: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> None:
        """Write one request and reset the timers and waiters for its response."""
        assert self.transport is not None
        self.parser = ResponseParser()
        self.first_body = self._loop.create_future()
        self.finished = self._loop.create_future()
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        try:
            parser.feed(data)
        except ValueError as exc:
            self._fail(exc)
            self.close()
            return
        now = time.perf_counter()
        if parser.got_body and not self.first_body.done():
            self.first_at = now
            self.first_body.set_result(None)
        if parser.done and not self.finished.done():
            self.done_at = now
            self.finished.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.parser.eof()
        if self.parser.done and not self.finished.done():
            self.done_at = time.perf_counter()
            self.finished.set_result(None)
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        for waiter in (self.first_body, self.finished):
            if not waiter.done():
                waiter.set_exception(exc)
                # Retrieve it now, so that a waiter nobody awaits logs nothing at exit.
                waiter.exception()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def build_request(port: int, path: str, headers: Sequence[str], body: bytes) -> bytes:
    """Return the raw bytes of a POST request with a Content-Length body."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connect(port: int, timeout_s: float) -> Connection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, protocol = await loop.create_connection(Connection, "127.0.0.1", port)
    return protocol


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_streams(
    port: int, request: bytes, *, concurrency: int, duration_s: float, timeout_s: float
) -> dict[str, Any]:
    """Keep ``concurrency`` streams in flight for ``duration_s``; return timings and errors."""
    ttfb_s: list[float] = []
    total_s: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + duration_s

    async def worker() -> None:
        connection: Connection | None = None
        while time.monotonic() < deadline:
            try:
                if connection is None or connection.lost:
                    connection = await _connect(port, timeout_s)
                connection.send(request)
                async with asyncio.timeout(timeout_s):
                    await connection.finished
            except TimeoutError:
                errors["timeout"] += 1
            except OSError as exc:
                errors[type(exc).__name__] += 1
            else:
                if connection.parser.status == 200:
                    ttfb_s.append(connection.first_at - connection.sent_at)
                    total_s.append(connection.done_at - connection.sent_at)
                    continue
                errors[f"status_{connection.parser.status}"] += 1
            if connection is not None:
                connection.close()
                connection = None
            await asyncio.sleep(0.01)
        if connection is not None:
            connection.close()

    cpu_start = _cpu_s()
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "phase": "done",
        "completed": len(total_s),
        "errors": dict(errors),
        "elapsed_s": elapsed,
        "client_cpu_s": _cpu_s() - cpu_start,
        "ttfb_ms": _percentiles_ms(ttfb_s),
        "total_ms": _percentiles_ms(total_s),
    }


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50) * 1000,
        "p99": percentile(values, 99) * 1000,
    }


async def run_idle(
    port: int, request: bytes, *, streams: int, rate: float, hold_s: float, timeout_s: float
) -> dict[str, Any]:
    """Open ``streams`` streams at ``rate`` per second, hold them ``hold_s``, close them."""
    loop = asyncio.get_running_loop()
    opened: list[Connection] = []
    ttfb_s: list[float] = []
    errors: Counter[str] = Counter()

    async def open_one() -> None:
        try:
            connection = await _connect(port, timeout_s)
        except (OSError, TimeoutError) as exc:
            errors[f"connect_{type(exc).__name__}"] += 1
            return
        connection.send(request)
        try:
            async with asyncio.timeout(timeout_s):
                await connection.first_body
        except TimeoutError:
            errors["no_first_event"] += 1
            connection.close()
            return
        except OSError as exc:
            errors[f"before_first_event_{type(exc).__name__}"] += 1
            return
        if connection.parser.status != 200:
            errors[f"status_{connection.parser.status}"] += 1
            connection.close()
            return
        ttfb_s.append(connection.first_at - connection.sent_at)
        opened.append(connection)

    # Open at a steady rate rather than all at once, as clients arrive in practice.
    cpu_start = _cpu_s()
    started = loop.time()
    openers = []
    for index in range(streams):
        delay = started + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        openers.append(asyncio.create_task(open_one(), name=f"open-{index}"))
    await asyncio.gather(*openers)
    open_s = loop.time() - started
    _emit({"phase": "ready", "opened": len(opened), "errors": dict(errors), "open_s": open_s})

    await asyncio.sleep(hold_s)
    ended_early = sum(1 for c in opened if c.lost or c.parser.done)
    if ended_early:
        errors["ended_during_hold"] += ended_early
    for connection in opened:
        connection.close()
    return {
        "phase": "done",
        "opened": len(opened),
        "errors": dict(errors),
        "open_s": open_s,
        "client_cpu_s": _cpu_s() - cpu_start,
        "ttfb_ms": _percentiles_ms(ttfb_s),
    }


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Load client for the benchmark's streams.")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--path", required=True, help="request path with its query")
    parser.add_argument("--body", required=True, help="JSON request body")
    parser.add_argument(
        "--header", action="append", default=[], help="extra 'Name: value' header (repeatable)"
    )
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    commands = parser.add_subparsers(dest="command", required=True)
    streams = commands.add_parser("streams", help="streams one after another per connection")
    streams.add_argument("--concurrency", type=int, required=True)
    streams.add_argument("--duration-s", type=float, required=True)
    idle = commands.add_parser("idle", help="open streams and hold them")
    idle.add_argument("--streams", type=int, required=True)
    idle.add_argument("--rate", type=float, required=True, help="streams opened per second")
    idle.add_argument("--hold-s", type=float, required=True)
    return parser


async def _main(args: argparse.Namespace) -> None:
    request = build_request(args.port, args.path, args.header, args.body.encode())
    if args.command == "streams":
        result = await run_streams(
            args.port,
            request,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            timeout_s=args.timeout_s,
        )
    else:
        result = await run_idle(
            args.port,
            request,
            streams=args.streams,
            rate=args.rate,
            hold_s=args.hold_s,
            timeout_s=args.timeout_s,
        )
    _emit(result)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # Thousands of held streams need thousands of descriptors: use the whole hard limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))


if __name__ == "__main__":
    main()
