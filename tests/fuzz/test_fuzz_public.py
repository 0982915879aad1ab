"""Fuzzed client requests on the public listener: E2EE headers, request ids, bodies, routes.

Every example goes through a real socket to one gateway that serves the whole test, with
one scripted provider registered for ``MODEL`` under ``KEY``. Whatever the input, the
gateway answers without a 5xx, in the error envelope when it fails the request, with an
``X-Request-Id``, logs no traceback and still serves ``/healthz`` afterwards.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from fuzz_harness import (
    FUZZ_SETTINGS,
    assert_clean_logs,
    assert_healthy,
    build_request,
    check_reply,
    send_raw,
)
from gateway_harness import (
    MODEL,
    Admin,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    new_key,
)
from hypothesis import given
from hypothesis import strategies as st

from proxy.server import RunningGateway

KEY = new_key()
ECDSA_KEY = "ab" * 64
MAX_BODY_BYTES = 64 * 1024

_HEX = "0123456789abcdefABCDEF"


@pytest.fixture
async def served(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> RunningGateway:
    """A gateway with one scripted provider registered for MODEL under KEY."""
    gateway = await start_gateway_with(make_settings(max_body_bytes=MAX_BODY_BYTES))
    provider = await start_fake(Reply())
    await Admin(http, gateway.admin_url).register(KEY, provider.url)
    return gateway


# Strategies.


def hex_strings(min_size: int = 0, max_size: int = 200) -> st.SearchStrategy[bytes]:
    return st.text(_HEX, min_size=min_size, max_size=max_size).map(str.encode)


HOSTILE_VALUES: st.SearchStrategy[bytes] = st.one_of(
    st.text(max_size=80).map(lambda text: text.encode("utf-8")),
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"",
            b" ",
            b"\t",
            b"ab\r\nX-Injected: 1",
            b"ab\nX-Injected: 1",
            b"ab\rX-Injected: 1",
            b"ab\r\n\r\nGET /healthz HTTP/1.1",
            b"\x00",
            b"\xff\xfe",
            b"\xc3\xa9\xf0\x9f\x94\x91",
            b"%0d%0a",
        ]
    ),
    st.integers(1000, 9000).map(lambda size: b"a" * size),
    st.integers(8100, 9000).map(lambda size: b"0" * size),
)


def padded(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Surround values with the optional whitespace that header parsing strips."""
    spaces = st.sampled_from([b"", b" ", b"\t", b"  "])
    return st.tuples(spaces, values, spaces).map(lambda parts: b"".join(parts))


MODEL_KEYS: st.SearchStrategy[bytes] = st.one_of(
    padded(st.sampled_from([KEY.encode(), KEY.upper().encode(), ECDSA_KEY.encode()])),
    st.just(b"04" + ECDSA_KEY.encode()),
    hex_strings(),
    HOSTILE_VALUES,
)
CLIENT_KEYS: st.SearchStrategy[bytes] = st.one_of(
    hex_strings(64, 64), hex_strings(128, 128), hex_strings(130, 130), hex_strings(), HOSTILE_VALUES
)
SIGNING_ALGOS: st.SearchStrategy[bytes] = st.one_of(
    padded(st.sampled_from([b"ed25519", b"ecdsa", b"ED25519", b"Ecdsa"])), HOSTILE_VALUES
)
VERSIONS: st.SearchStrategy[bytes] = st.one_of(
    padded(st.sampled_from([b"1", b"2", b"0", b"3", b"1.0", b"\xd9\xa1"])), HOSTILE_VALUES
)
REQUEST_IDS: st.SearchStrategy[bytes] = st.one_of(
    st.from_regex(rb"[A-Za-z0-9._:\-]{1,128}", fullmatch=True),
    st.from_regex(rb"[A-Za-z0-9._:\-]{129,140}", fullmatch=True),
    HOSTILE_VALUES,
)
EXTRA_HEADERS: st.SearchStrategy[list[tuple[bytes, bytes]]] = st.lists(
    st.tuples(
        st.sampled_from(
            [b"X-Encrypt-All-Fields", b"X-Request-Hash", b"X-Custom", b"Authorization"]
        ),
        HOSTILE_VALUES,
    ),
    max_size=2,
)


def optional(
    name: bytes, values: st.SearchStrategy[bytes]
) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """No header, or header ``name`` with a value from ``values``."""
    return st.one_of(st.just([]), values.map(lambda value: [(name, value)]))


ANY_E2EE_HEADERS: st.SearchStrategy[list[tuple[bytes, bytes]]] = st.tuples(
    optional(b"X-Model-Pub-Key", MODEL_KEYS),
    optional(b"X-Signing-Algo", SIGNING_ALGOS),
    optional(b"X-Client-Pub-Key", CLIENT_KEYS),
    optional(b"X-Encryption-Version", VERSIONS),
    EXTRA_HEADERS,
).map(lambda groups: [header for group in groups for header in group])

VALID_E2EE = {
    b"X-Model-Pub-Key": KEY.encode(),
    b"X-Signing-Algo": b"ed25519",
    b"X-Client-Pub-Key": b"cd" * 32,
    b"X-Encryption-Version": b"2",
}
FUZZED_E2EE = {
    b"X-Model-Pub-Key": MODEL_KEYS,
    b"X-Signing-Algo": SIGNING_ALGOS,
    b"X-Client-Pub-Key": CLIENT_KEYS,
    b"X-Encryption-Version": VERSIONS,
}


def one_header_fuzzed(name: bytes) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """The valid E2EE headers with header ``name`` fuzzed, plus random extra headers."""
    return st.tuples(FUZZED_E2EE[name], EXTRA_HEADERS).map(
        lambda pair: [*{**VALID_E2EE, name: pair[0]}.items(), *pair[1]]
    )


E2EE_HEADERS: st.SearchStrategy[list[tuple[bytes, bytes]]] = st.one_of(
    ANY_E2EE_HEADERS, *(one_header_fuzzed(name) for name in FUZZED_E2EE)
)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    # orjson encodes 64-bit integers only; longer numbers come as bytes in BODIES.
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int) -> bytes:
    return b'{"model":"' + MODEL.encode() + b'","x":' + b"[" * depth + b"]" * depth + b"}"


BODIES: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(lambda text: text.encode("utf-8")),
    JSON_VALUES.map(orjson.dumps),
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.one_of(st.just(MODEL), st.text(max_size=300), JSON_VALUES),
            "stream": JSON_VALUES,
            "messages": JSON_VALUES,
        },
    ).map(orjson.dumps),
    st.integers(1, 3000).map(nested),
    st.integers(20, 5000).map(
        lambda digits: b'{"model":"' + MODEL.encode() + b'","n":' + b"9" * digits + b"}"
    ),
    st.sampled_from(
        [
            b'{"model":"' + MODEL.encode() + b'"',
            b'{"model":"\xff\xfe"}',
            b'{"model":"\\ud800"}',
            b'{"model":"' + MODEL.encode() + b'"}\x00',
            b"\xef\xbb\xbf" + b'{"model":"' + MODEL.encode() + b'"}',
            b'{"model":"' + MODEL.encode() + b'","model":7}',
        ]
    ),
    st.integers(MAX_BODY_BYTES - 10, MAX_BODY_BYTES + 100).map(
        lambda size: b'{"model":"' + MODEL.encode() + b'","p":"' + b"a" * size + b'"}'
    ),
)

ROUTED_STATUSES = {200, 400, 404, 413, 421}

# Tests.


@FUZZ_SETTINGS
@given(headers=E2EE_HEADERS, stream=st.booleans())
async def test_e2ee_headers_never_fail_gateway(
    served: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    headers: list[tuple[bytes, bytes]],
    stream: bool,
) -> None:
    body = orjson.dumps({"model": MODEL, "stream": stream})
    request = build_request(b"POST", b"/v1/chat/completions", headers, body)

    reply = await send_raw(served.port, request)

    check_reply(reply, sent_request_id=None, allowed=ROUTED_STATUSES)
    await assert_healthy(served.port)
    assert_clean_logs(caplog)


@FUZZ_SETTINGS
@given(request_id=REQUEST_IDS, path=st.sampled_from([b"/v1/chat/completions", b"/nowhere"]))
async def test_request_id_echoed_or_minted(
    served: RunningGateway, caplog: pytest.LogCaptureFixture, request_id: bytes, path: bytes
) -> None:
    body = orjson.dumps({"model": MODEL})
    request = build_request(b"POST", path, [(b"X-Request-Id", request_id)], body)

    reply = await send_raw(served.port, request)

    check_reply(reply, sent_request_id=request_id, allowed=ROUTED_STATUSES)
    assert_clean_logs(caplog)


@FUZZ_SETTINGS
@given(
    body=BODIES,
    path=st.sampled_from([b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"]),
    pinned=st.booleans(),
)
async def test_bodies_never_fail_gateway(
    served: RunningGateway, caplog: pytest.LogCaptureFixture, body: bytes, path: bytes, pinned: bool
) -> None:
    headers = [(b"X-Model-Pub-Key", KEY.encode())] if pinned else []
    request = build_request(b"POST", path, headers, body)

    reply = await send_raw(served.port, request)

    check_reply(reply, sent_request_id=None, allowed=ROUTED_STATUSES)
    await assert_healthy(served.port)
    assert_clean_logs(caplog)


METHODS: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(
        [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE", b"PRI"]
    ),
    st.from_regex(rb"[A-Z]{1,12}", fullmatch=True),
    st.from_regex(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}", fullmatch=True),
)
PATH_SEGMENTS: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(
        [
            b"v1",
            b"chat",
            b"completions",
            b"embeddings",
            b"models",
            b"attestation",
            b"report",
            b"signature",
            b"healthz",
            b"readyz",
            b"metrics",
            b"providers",
            b"heartbeat",
            b"..",
            b".",
            b"",
            b"%2e%2e",
            b"%2F",
            b"%00",
            b"%ff%fe",
            b"%c3%a9",
            b"%",
            b"%zz",
        ]
    ),
    st.from_regex(rb"[A-Za-z0-9._~!$&'()*+,;=:@-]{1,30}", fullmatch=True),
)
QUERIES: st.SearchStrategy[bytes] = st.one_of(
    st.just(b""),
    st.sampled_from(
        [
            b"?model=" + MODEL.encode(),
            b"?model=" + MODEL.encode() + b"&signing_algo=ecdsa",
            b"?model=%ff&signing_algo=%ff",
            b"?model=&nonce=",
            b"?url=http://127.0.0.1:9",
            b"?" + b"a" * 5000,
        ]
    ),
    st.from_regex(rb"\?[A-Za-z0-9=&%._-]{0,60}", fullmatch=True),
)
TARGETS: st.SearchStrategy[bytes] = st.tuples(
    st.lists(PATH_SEGMENTS, min_size=1, max_size=5), QUERIES
).map(lambda parts: b"/" + b"/".join(parts[0]) + parts[1])


@FUZZ_SETTINGS
@given(method=METHODS, target=TARGETS, body=st.sampled_from([b"", b'{"model":"demo-model"}']))
async def test_public_routes_never_fail_gateway(
    served: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    method: bytes,
    target: bytes,
    body: bytes,
) -> None:
    request = build_request(method, target, [], body)

    head_request = method == b"HEAD"

    reply = await send_raw(served.port, request, head_request=head_request)

    check_reply(
        reply,
        sent_request_id=None,
        allowed={200, 400, 404, 405, 413, 421, 503},
        head_request=head_request,
    )
    await assert_healthy(served.port)
    assert_clean_logs(caplog)
