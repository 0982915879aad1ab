"""Malformed HTTP/1.1 on raw sockets, so that aiohttp's own request parser is exercised.

Request lines, header lines and bodies are assembled from pieces that parsers get
wrong: header lines without a colon, obs-fold, NUL bytes, bare LF or CR line ends,
both Content-Length and Transfer-Encoding, oversized lines and header sections. On
both listeners the answer is a response below 500 or a closed connection, within the
client's timeouts; the log holds no traceback, and the listener keeps serving.
"""

from __future__ import annotations

import pytest
from fuzz_harness import (
    FUZZ_SETTINGS,
    assert_clean_logs,
    assert_envelope,
    assert_healthy,
    send_raw,
)
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.server import RunningGateway

METHODS = st.one_of(
    st.sampled_from(
        [b"GET", b"POST", b"HEAD", b"DELETE", b"get", b"G ET", b"", b"GET\x00", b"PRI", b"\x16\x03"]
    ),
    st.binary(min_size=1, max_size=8),
)
TARGETS = st.one_of(
    st.sampled_from(
        [
            b"/healthz",
            b"/v1/chat/completions",
            b"/v1/providers/heartbeat",
            b"*",
            b"http://127.0.0.1/healthz",
            b"healthz",
            b"/%00",
            b"/\x00",
            b"/healthz?\xff",
            b"/healthz#frag",
            b"//healthz",
            b"",
        ]
    ),
    st.integers(8000, 9000).map(lambda size: b"/" + b"a" * size),
    st.binary(max_size=30),
)
ROUTES = st.sampled_from(
    [b"/healthz", b"/v1/models", b"/v1/chat/completions", b"/v1/providers/heartbeat"]
)
VERSIONS = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.10", b"http/1.1", b""]
)
SPACES = st.sampled_from([b" ", b"  ", b"\t"])
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r"])

HEADER_LINES = st.one_of(
    st.sampled_from(
        [
            b"Host: 127.0.0.1",
            b"NoColonHere",
            b"Name : value",
            b" folded continuation",
            b"\tfolded continuation",
            b"X-Nul: a\x00b",
            b"X-N\x00ul: a",
            b": empty name",
            b"X-Empty:",
            b"Content-Length: 5",
            b"Content-Length: 0",
            b"Content-Length: -1",
            b"Content-Length: 5, 5",
            b"Content-Length: 5,6",
            b"Content-Length: +5",
            b"Content-Length: 0x5",
            b"Content-Length: 99999999999999999999999",
            b"Content-Length : 5",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: gzip, chunked",
            b"Transfer-Encoding: chunked, gzip",
            b"Transfer-Encoding: xchunked",
            b"Transfer-Encoding: Chunked",
            b"Transfer-Encoding: identity",
            b"Transfer-Encoding:\tchunked",
            b"Expect: 100-continue",
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Upgrade: h2c",
            b"Content-Encoding: gzip",
            b"Content-Encoding: br",
            b"X-Model-Pub-Key: " + b"ab" * 32,
        ]
    ),
    st.integers(8100, 9000).map(lambda size: b"X-Huge: " + b"v" * size),
    st.binary(max_size=40),
)
HEADER_SECTIONS = st.one_of(
    st.lists(HEADER_LINES, max_size=3),
    st.integers(100, 200).map(lambda count: [b"X-H%d: v" % i for i in range(count)]),
)
BODIES = st.one_of(
    st.sampled_from(
        [
            b"",
            b"hello",
            b'{"model":"demo-model"}',
            b"5\r\nhello\r\n0\r\n\r\n",
            b"ZZ\r\nhello\r\n0\r\n\r\n",
            b"4\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n",
            b"5;ext=1\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"hello" + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
    ),
    st.binary(max_size=200),
)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Return a raw request and whether it carries both Content-Length and Transfer-Encoding.

    Half of the requests are well formed but for their header lines and body; the
    others also get a fuzzed request line and line ends.
    """
    if draw(st.booleans()):
        method = draw(st.sampled_from([b"GET", b"POST", b"DELETE"]))
        line = method + b" " + draw(ROUTES) + b" HTTP/1.1"
        end = b"\r\n"
    else:
        line = draw(METHODS) + draw(SPACES) + draw(TARGETS) + draw(SPACES) + draw(VERSIONS)
        end = draw(LINE_ENDS)
    headers = [b"Host: 127.0.0.1", *draw(HEADER_SECTIONS)]
    request = end.join([line, *headers]) + end + end + draw(BODIES)
    names = [header.partition(b":")[0].strip().lower() for header in headers]
    ambiguous = b"content-length" in names and b"transfer-encoding" in names
    return request, ambiguous


@FUZZ_SETTINGS
@given(case=raw_requests(), listener=st.sampled_from(["public", "admin"]))
async def test_malformed_http_gets_4xx_or_close(
    gateway: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    case: tuple[bytes, bool],
    listener: str,
) -> None:
    request, ambiguous = case
    port = gateway.port if listener == "public" else gateway.admin_port

    reply = await send_raw(port, request, answer_wait_s=0.5)

    origin = "application" if "X-Request-Id" in reply.headers else "aiohttp"
    event("closed" if reply.status is None else f"status {reply.status} from {origin}")
    if reply.status is not None:
        assert reply.status < 500, reply
        if "X-Request-Id" in reply.headers and reply.status >= 400 and reply.body:
            assert_envelope(reply)
        if ambiguous:
            # Both framings at once is how requests are smuggled past a proxy.
            assert reply.status == 400, reply
    await assert_healthy(port)
    assert_clean_logs(caplog)


async def test_many_malformed_connections_leave_listener_serving(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = [b"\x16\x03\x01\x02\x00\x01\x00", b"GET\r\n\r\n", b"\r\n" * 100, b"\x00" * 64]

    for port in (gateway.port, gateway.admin_port):
        for request in garbage * 3:
            reply = await send_raw(port, request, answer_wait_s=0.3)
            assert reply.status is None or 400 <= reply.status < 500, reply

    await assert_healthy(gateway.port)
    await assert_healthy(gateway.admin_port)
    assert_clean_logs(caplog)
