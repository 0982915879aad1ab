"""Fuzzed calls to the admin listener: heartbeat bodies, deregistrations, tokens, routes.

The invariants are those of the public listener: no 5xx, the error envelope on every
failure, an ``X-Request-Id`` on every response, no traceback logged, and the listener
still serving ``/healthz`` afterwards. A heartbeat either registers (200) or is
rejected with a 4xx that names the field.
"""

from __future__ import annotations

import orjson
import pytest
from fuzz_harness import (
    FUZZ_SETTINGS,
    assert_clean_logs,
    assert_envelope,
    assert_healthy,
    build_request,
    check_reply,
    send_raw,
)
from gateway_harness import ADMIN_TOKEN, MODEL, PROVIDER_TOKEN, GatewayStarter, SettingsFactory
from hypothesis import given
from hypothesis import strategies as st

from proxy.server import RunningGateway

HEARTBEAT = b"/v1/providers/heartbeat"
PROVIDER_AUTH = (b"Authorization", b"Bearer " + PROVIDER_TOKEN.encode())
ADMIN_AUTH = (b"Authorization", b"Bearer " + ADMIN_TOKEN.encode())
HEARTBEAT_FIELDS = ("pubkey", "model", "url", "signing_algo", "ttl_s", "instance_id")
ADMIN_STATUSES = {200, 204, 400, 401, 403, 404, 405, 409, 410, 413, 429}


@pytest.fixture
async def admin_gateway(
    make_settings: SettingsFactory, start_gateway_with: GatewayStarter
) -> RunningGateway:
    """A gateway whose failed-token limit never trips, so one test can send many bad tokens."""
    return await start_gateway_with(make_settings(auth_failure_limit=1_000_000))


# Strategies.

HEX = "0123456789abcdefABCDEF"
# orjson encodes 64-bit integers only; longer numbers come as bytes in RAW_BODIES.
INTS = st.integers(-(2**63), 2**64 - 1)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.lists(INTS, max_size=2),
    st.dictionaries(st.text(max_size=5), INTS, max_size=2),
)
PUBKEYS = st.one_of(
    st.text(HEX, min_size=64, max_size=64),
    st.text(HEX, min_size=128, max_size=128),
    st.text(HEX, min_size=128, max_size=128).map(lambda key: "04" + key),
    st.text(HEX, max_size=140).map(lambda key: f" {key}\t"),
    st.text(max_size=140),
    SCALARS,
)
MODELS = st.one_of(
    st.just(MODEL),
    st.text(max_size=300),
    st.text(st.characters(codec="utf-8"), min_size=250, max_size=260),
    SCALARS,
)
URLS = st.one_of(
    st.sampled_from(
        [
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/",
            "https://127.0.0.1:9/prefix",
            "http://127.0.0.1:9?x=1",
            "http://user:pw@127.0.0.1:9",
            "http://[::1]:9",
            "http://localhost:1/",
            "http://169.254.169.254/",
            "ftp://127.0.0.1",
            "http://",
            "http:///path",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:-1",
            "http://[zz]/",
            "http://[::1]@",
            "//[]@",
            "http://a[b]c@/",
            "http://[::1]@127.0.0.1:9",
            "http://127.0.0.1:9#frag",
            "//127.0.0.1:9",
            "http://" + "a" * 300 + ".example.invalid",
            "http://127.0.0.1:9/" + "%ff" * 50,
            "http://\u0661\u0662\u0667.0.0.1/",
            "http://127.0.0.1\x00.example.invalid/",
        ]
    ),
    st.text(max_size=100),
    st.text(max_size=60).map(lambda path: "http://127.0.0.1:9/" + path),
    # Authorities built from the characters URL parsers split on.
    st.text("[]@:/.%?#a1", max_size=20).map(lambda authority: "http://" + authority),
    SCALARS,
)
ALGOS = st.one_of(st.sampled_from(["ed25519", "ecdsa", "ED25519", " ecdsa"]), SCALARS)
TTLS = st.one_of(
    st.floats(allow_nan=False),
    INTS,
    st.sampled_from([0, -1, 5, 300, 1e308, -1e308, 1e-320]),
    SCALARS,
)
INSTANCE_IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9._:\-]{1,128}", fullmatch=True), st.text(max_size=140), SCALARS
)

FIELD_VALUES = {
    "pubkey": PUBKEYS,
    "model": MODELS,
    "url": URLS,
    "signing_algo": ALGOS,
    "ttl_s": TTLS,
    "instance_id": INSTANCE_IDS,
    "extra": SCALARS,
}
VALID_HEARTBEATS = st.fixed_dictionaries(
    {
        "pubkey": st.text(HEX, min_size=64, max_size=64),
        "model": st.one_of(
            st.just(MODEL), st.text(st.characters(categories=["L", "N"]), min_size=1)
        ),
        "url": st.integers(1, 65535).map(lambda port: f"http://127.0.0.1:{port}"),
        "signing_algo": st.just("ed25519"),
    },
    optional={
        "ttl_s": st.floats(1, 400),
        "instance_id": st.from_regex(r"[a-z0-9]{8}", fullmatch=True),
    },
)


def with_field(name: str) -> st.SearchStrategy[dict[str, object]]:
    """Valid heartbeats with the field ``name`` replaced by a fuzzed value."""
    return st.tuples(VALID_HEARTBEATS, FIELD_VALUES[name]).map(
        lambda pair: {**pair[0], name: pair[1]}
    )


HEARTBEAT_BODIES = st.one_of(
    VALID_HEARTBEATS,
    *(with_field(name) for name in FIELD_VALUES),
    st.fixed_dictionaries({}, optional=FIELD_VALUES),
).map(orjson.dumps)

RAW_BODIES = st.one_of(
    HEARTBEAT_BODIES,
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'{"ttl_s":' + b"9" * 400 + b"}",
            b'{"ttl_s":-' + b"9" * 400 + b"}",
            b'{"ttl_s":1e999}',
            b"[" * 2000,
            b'{"pubkey":"\\ud800"}',
        ]
    ),
)


# Tests.


@FUZZ_SETTINGS
@given(body=RAW_BODIES)
async def test_heartbeat_bodies_never_fail_gateway(
    admin_gateway: RunningGateway, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    request = build_request(b"POST", HEARTBEAT, [PROVIDER_AUTH], body)

    reply = await send_raw(admin_gateway.admin_port, request)

    check_reply(reply, allowed=ADMIN_STATUSES)
    if reply.status == 400:
        assert assert_envelope(reply)["param"] in (None, *HEARTBEAT_FIELDS)
    await assert_healthy(admin_gateway.admin_port)
    assert_clean_logs(caplog)


@FUZZ_SETTINGS
@given(
    pubkey=st.one_of(
        st.text(HEX, min_size=64, max_size=64),
        st.from_regex(r"[A-Za-z0-9%._~-]{1,140}", fullmatch=True),
    ),
    query=st.one_of(
        st.just(""),
        st.sampled_from(["?url=http://127.0.0.1:9", "?url=", "?url=%ff%fe", "?url=%00"]),
        st.text(max_size=40).map(lambda url: "?url=" + url),
    ),
    token=st.sampled_from([PROVIDER_AUTH, ADMIN_AUTH, (b"Authorization", b"Bearer x"), None]),
)
async def test_deregistrations_never_fail_gateway(
    admin_gateway: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    pubkey: str,
    query: str,
    token: tuple[bytes, bytes] | None,
) -> None:
    target = ("/v1/providers/" + pubkey + query).encode("utf-8")
    headers = [] if token is None else [token]
    request = build_request(b"DELETE", target, headers)

    reply = await send_raw(admin_gateway.admin_port, request)

    check_reply(reply, allowed=ADMIN_STATUSES)
    assert_clean_logs(caplog)


@FUZZ_SETTINGS
@given(
    authorization=st.one_of(
        st.binary(max_size=100),
        st.text(max_size=100).map(lambda text: b"Bearer " + text.encode("utf-8")),
        st.sampled_from([b"Bearer", b"Bearer ", b"bearer " + PROVIDER_TOKEN.encode(), b"Basic x"]),
    ),
    path=st.sampled_from([HEARTBEAT, b"/v1/providers"]),
)
async def test_tokens_never_fail_gateway(
    admin_gateway: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    authorization: bytes,
    path: bytes,
) -> None:
    method = b"POST" if path == HEARTBEAT else b"GET"
    body = orjson.dumps({"pubkey": "ab" * 32, "model": MODEL, "url": "http://127.0.0.1:9"})
    request = build_request(method, path, [(b"Authorization", authorization)], body)

    reply = await send_raw(admin_gateway.admin_port, request)

    check_reply(reply, allowed=ADMIN_STATUSES)
    assert_clean_logs(caplog)


@FUZZ_SETTINGS
@given(
    method=st.one_of(
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]),
        st.from_regex(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}", fullmatch=True),
    ),
    path=st.one_of(
        st.sampled_from(
            [b"/v1/providers", b"/v1/providers/", b"/metrics", b"/healthz", b"/v1/providers/x/y"]
        ),
        st.from_regex(rb"/[A-Za-z0-9%._~/-]{0,60}", fullmatch=True),
    ),
)
async def test_admin_routes_never_fail_gateway(
    admin_gateway: RunningGateway, caplog: pytest.LogCaptureFixture, method: bytes, path: bytes
) -> None:
    head_request = method == b"HEAD"
    request = build_request(method, path, [ADMIN_AUTH])

    reply = await send_raw(admin_gateway.admin_port, request, head_request=head_request)

    check_reply(reply, allowed=ADMIN_STATUSES, head_request=head_request)
    await assert_healthy(admin_gateway.admin_port)
    assert_clean_logs(caplog)
