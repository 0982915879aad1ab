"""HTTP/1.1 messages of the upstream client: the request head and response parsing.

``request_head`` serializes a request line and header block. ``ResponseParser`` stores
the response in progress on one connection, and its httptools callbacks fill it in
without I/O. httptools wraps llhttp, the parser of Node.js, used in its strict default
mode. The exceptions of the upstream client are drawn here and exported by
``proxy.upstream``.

Exceptions::

    UpstreamError                    any failure of an upstream exchange
    ├── ConnectError (OSError)       no connection: name resolution, a forbidden address,
    │                                refused, connect timeout, TLS handshake
    ├── ConnectionLost (ConnectionError)
    │                                the connection closed or was reset before the
    │                                response head was complete
    ├── BadResponse                  a malformed or ambiguously framed response head
    └── PayloadError                 the body ended early or its chunked framing broke
"""

from __future__ import annotations

import httptools
from multidict import CIMultiDict

__all__ = [
    "MAX_HEAD_BYTES",
    "BadResponse",
    "ConnectError",
    "ConnectionLost",
    "PayloadError",
    "ResponseParser",
    "StopParsing",
    "UpstreamError",
    "request_head",
]

# A response head (with any 1xx heads before it) larger than this is rejected.
MAX_HEAD_BYTES = 64 * 1024

# Methods whose request without a body gets no Content-Length (RFC 9110 §8.6).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class UpstreamError(Exception):
    """An upstream exchange failed; the message is safe to log."""


class ConnectError(UpstreamError, OSError):
    """No connection could be opened to the provider."""


class ConnectionLost(UpstreamError, ConnectionError):
    """The connection closed or was reset before the response head was complete."""

    def __init__(self, message: str, *, reused: bool, response_started: bool) -> None:
        super().__init__(message)
        self.reused = reused
        """The connection had served an earlier response: the provider may have closed it
        as idle while this request was on its way."""
        self.response_started = response_started
        """Some bytes of a response head had arrived."""


class BadResponse(UpstreamError):
    """The response head is malformed or its framing is ambiguous."""


class PayloadError(UpstreamError):
    """The response body ended before its declared end, or its chunked framing is invalid."""


class StopParsing(Exception):
    """Raised in a parser callback to stop parsing bytes that follow a complete response."""


class ResponseParser:
    """The response in progress on one connection, parsed by httptools callbacks.

    The connection feeds socket reads to ``_parser``, which calls the ``on_*`` methods.
    They check the head, raising BadResponse or StopParsing, and buffer the body bytes
    in ``_chunks``. ``_begin_response`` resets the state for the next exchange.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)

    def _begin_response(self, method: str) -> None:
        self.head_request = method == "HEAD"
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self._head_size = 0
        self._interim = False
        self._framed = False
        self._chunks: list[bytes] = []
        self.buffered = 0

    def _parse_error(self, exc: Exception) -> UpstreamError:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if isinstance(exc, httptools.HttpParserUpgrade):
            reason = "unexpected protocol upgrade"
        if self.head_done:
            return PayloadError(f"invalid HTTP response body from the provider: {reason}")
        return BadResponse(f"invalid HTTP response from the provider: {reason}")

    def on_message_begin(self) -> None:
        if self.complete:
            raise StopParsing()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailer fields come after the head and are dropped
            self.raw_headers.append((name, value))
            self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if self._head_size > MAX_HEAD_BYTES:
            raise BadResponse(f"response head over {MAX_HEAD_BYTES} bytes")
        if not 100 <= status <= 599:
            raise BadResponse(f"invalid HTTP response from the provider: status {status}")
        if status == 101:
            raise BadResponse("provider switched protocols (101) although no upgrade was asked")
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            self._interim = True
            self.raw_headers = []
            return

        self.status = status
        framed = _has_framing(self.raw_headers)
        self._framed = framed or status in (204, 304) or self.head_request
        self.keep_alive = self._parser.should_keep_alive()
        self.head_done = True
        if self.head_request:
            # httptools offers no way to tell llhttp that a HEAD response has no body,
            # so the exchange ends here and the connection is not reused.
            self.complete = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self.head_request:
            self._chunks.append(body)
            self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.keep_alive = self.keep_alive and self._parser.should_keep_alive()
        self.complete = True


def _has_framing(raw_headers: list[tuple[bytes, bytes]]) -> bool:
    """Return whether Content-Length or chunked coding frames the body; raise BadResponse
    for a Transfer-Encoding other than chunked."""
    framed = False
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            # Only chunked may be applied, as no TE header is sent (RFC 9112 §6.1).
            # llhttp already rejects Transfer-Encoding together with Content-Length.
            if value.strip().lower() != b"chunked":
                raise BadResponse(
                    f"invalid HTTP response from the provider: Transfer-Encoding {value[:40]!r}"
                )
            framed = True
        elif lowered == b"content-length":
            framed = True
    return framed


def request_head(
    method: str, target: str, host_header: str, headers: CIMultiDict[str], body_length: int
) -> bytes:
    """Serialize a request line and header block; raise ValueError on CR, LF or NUL in them."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
    lines.extend([f"{name}: {value}\r\n" for name, value in headers.items()])
    if body_length or method not in _NO_BODY_METHODS:
        lines.append(f"Content-Length: {body_length}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Each line ends with exactly one CRLF, so any other CR or LF came from a value.
    line_count = len(lines) + 1
    if text.count("\n") != line_count or text.count("\r") != line_count or "\x00" in text:
        raise ValueError("CR, LF or NUL character in an upstream request line or header")
    return text.encode("utf-8", "surrogateescape")
