"""Server-sent-event framing checks on a reassembly buffer, never on relayed bytes.

The relay copies upstream reads to the client unchanged; these helpers only look at a
separate copy to find where the first event ends and whether it reports an error.
Event boundaries follow the HTML living standard's SSE parser: a blank line, with
lines ended by CRLF, LF or CR.
"""

from __future__ import annotations

import re

import orjson

__all__ = ["error_frame", "find_first_event", "upstream_error_in_event"]

_BLANK_LINE = re.compile(rb"\r\n\r\n|\n\n|\r\r|\n\r\n|\r\n\n|\r\r\n")
_LINE = re.compile(rb"\r\n|\r|\n")

DONE_FRAME = b"data: [DONE]\n\n"


def find_first_event(buffer: bytes | bytearray) -> tuple[int, bytes] | None:
    """Return (end offset, event block) of the first event that carries data, or None.

    Blocks without a ``data`` field (comments such as ``: keep-alive``) are skipped, so
    the client's status is held until real content or an error arrives.
    """
    start = 0
    while True:
        match = _BLANK_LINE.search(buffer, start)
        if match is None:
            return None
        block = bytes(buffer[start : match.start()])
        if any(_is_data_line(line) for line in _LINE.split(block)):
            return match.end(), block
        start = match.end()


def _is_data_line(line: bytes) -> bool:
    return line == b"data" or line.startswith(b"data:")


def event_data(block: bytes) -> bytes:
    parts = []
    for line in _LINE.split(block):
        if _is_data_line(line):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


def upstream_error_in_event(block: bytes) -> tuple[int, bytes] | None:
    """Return (HTTP status, JSON body) when an event's data is an ``{"error": {...}}`` object.

    The status is the error's numeric ``code`` when it is 400-599, else 502. The body
    is the event's JSON exactly as the provider sent it.
    """
    data = event_data(block)
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("error"), dict):
        return None

    code = decoded["error"].get("code")
    # str.isdigit() also accepts digits that int() rejects ("²") or reads as another
    # number ("٥٠٣"), and int() rejects strings over 4300 digits: a status is 3 ASCII digits.
    if isinstance(code, str) and len(code) == 3 and code.isascii() and code.isdigit():
        code = int(code)
    status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    return status, data


def error_frame(message: str, code: str) -> bytes:
    """Encode the event that ends a stream the gateway could not finish."""
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def ends_at_event_boundary(tail: bytes) -> bool:
    """Return whether relayed bytes ending in ``tail`` close an event (or are empty)."""
    return tail == b"" or tail.endswith((b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n"))
