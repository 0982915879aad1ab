"""Pure functions of the gateway, tested without servers."""

from __future__ import annotations

import inspect
import ipaddress
import random
import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import errors, sse
from proxy.app import error_response
from proxy.config import ConfigError, Settings
from proxy.errors import GatewayError
from proxy.headers import (
    client_request_id,
    filter_response_headers,
    upstream_request_headers,
    validate_e2ee_headers,
)
from proxy.routing import Balancer, Target
from proxy.urlcheck import AddressPolicy, ForbiddenAddress, GuardedResolver, InvalidProviderUrl

KEY = "ab" * 32

# Headers.


def request_headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def upstream(
    *pairs: tuple[str, str],
    peer: str | None = "203.0.113.9",
    trusted: tuple[str, ...] = (),
    token: str | None = None,
) -> CIMultiDict[str]:
    return upstream_request_headers(
        request_headers(*pairs),
        peer=peer,
        scheme="http",
        request_id="rid-1",
        trusted_proxies=tuple(ipaddress.ip_network(cidr) for cidr in trusted),
        upstream_token=token,
    )


@pytest.mark.parametrize(
    "name",
    [
        "Connection", "connection", "Keep-Alive", "keep-alive", "TE", "te", "Trailer",
        "Transfer-Encoding", "transfer-encoding", "Upgrade", "Proxy-Connection",
        "Proxy-Authorization", "proxy-authorization", "Host", "host", "X-Model-Pub-Key",
        "x-model-pub-key", "Content-Length", "content-length",
    ],
)
def test_request_header_not_forwarded(name: str) -> None:
    headers = upstream((name, "value"), ("Content-Type", "application/json"))

    assert name not in headers
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("connection", ["close, X-Secret-Hop", "x-secret-hop", " X-SECRET-HOP ,"])
def test_request_header_named_in_connection_dropped(connection: str) -> None:
    headers = upstream(("Connection", connection), ("X-Secret-Hop", "1"), ("X-Kept", "2"))

    assert "X-Secret-Hop" not in headers
    assert "Connection" not in headers
    assert headers["X-Kept"] == "2"


def test_request_e2ee_headers_pass_unchanged() -> None:
    names = (
        "X-Client-Pub-Key", "X-Signing-Algo", "X-Encryption-Version",
        "X-Encrypt-All-Fields", "X-Request-Hash",
    )

    headers = upstream(*((name, f"v-{name}") for name in names))

    for name in names:
        assert headers[name] == f"v-{name}"


def test_request_accept_encoding_forced_to_identity() -> None:
    headers = upstream(("Accept-Encoding", "gzip, br"), ("accept-encoding", "zstd"))

    assert headers.getall("Accept-Encoding") == ["identity"]


@pytest.mark.parametrize("name", ["Authorization", "authorization"])
def test_request_authorization_replaced_by_upstream_token(name: str) -> None:
    headers = upstream((name, "Bearer client-secret"), token="upstream-secret")

    assert headers.getall("Authorization") == ["Bearer upstream-secret"]


def test_request_authorization_dropped_without_upstream_token() -> None:
    headers = upstream(("Authorization", "Bearer client-secret"))

    assert "Authorization" not in headers


def test_forwarded_for_replaced_for_untrusted_peer() -> None:
    headers = upstream(("X-Forwarded-For", "198.51.100.1"), ("x-forwarded-for", "198.51.100.2"))

    assert headers.getall("X-Forwarded-For") == ["203.0.113.9"]
    assert headers["X-Forwarded-Proto"] == "http"


def test_forwarded_for_appended_for_trusted_peer() -> None:
    headers = upstream(
        ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2"),
        trusted=("203.0.113.0/24",),
    )

    assert headers.getall("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 203.0.113.9"]


def test_forwarded_for_set_for_trusted_peer_without_header() -> None:
    headers = upstream(trusted=("203.0.113.0/24",))

    assert headers["X-Forwarded-For"] == "203.0.113.9"


def test_request_id_sent_upstream_once() -> None:
    headers = upstream(("X-Request-Id", "client-id"), ("x-request-id", "other"))

    assert headers.getall("X-Request-Id") == ["rid-1"]


@pytest.mark.parametrize("given", ["abc", "A.b_c:d-9", "x" * 128])
def test_request_id_kept_when_well_formed(given: str) -> None:
    assert client_request_id({"X-Request-Id": given}) == given


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "semi;colon", "é"])
def test_request_id_minted_when_malformed(given: str) -> None:
    minted = client_request_id({"X-Request-Id": given})

    assert minted != given
    assert 1 <= len(minted) <= 128


def test_request_id_minted_when_absent() -> None:
    assert client_request_id({}) != client_request_id({})


def test_response_hop_by_hop_dropped() -> None:
    headers = filter_response_headers(
        request_headers(
            ("Connection", "keep-alive, X-Internal"),
            ("x-internal", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("trailer", "X-Checksum"),
            ("Transfer-Encoding", "chunked"),
            ("content-length", "12"),
            ("Proxy-Authenticate", "Basic"),
            ("Content-Type", "text/event-stream"),
            ("Content-Encoding", "gzip"),
            ("Retry-After", "7"),
        )
    )

    assert list(headers.items()) == [
        ("Content-Type", "text/event-stream"),
        ("Content-Encoding", "gzip"),
        ("Retry-After", "7"),
    ]


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (KEY.upper(), KEY),
        (" " + KEY + "\t", KEY),
        ("04" + "cd" * 64, "cd" * 64),
        ("cd" * 64, "cd" * 64),
    ],
    ids=["upper", "whitespace", "sec1-prefix", "ecdsa"],
)
def test_model_pub_key_normalised(raw: str, normalised: str) -> None:
    assert validate_e2ee_headers({"X-Model-Pub-Key": raw}).model_pubkey == normalised


def test_e2ee_headers_absent_mean_unpinned() -> None:
    assert validate_e2ee_headers({}).model_pubkey is None


# Server-sent events.


@pytest.mark.parametrize(
    ("buffer", "end"),
    [
        (b"data: 1\n\ndata: 2\n\n", 9),
        (b"data: 1\r\n\r\ndata: 2", 11),
        (b"data: 1\r\rdata: 2", 9),
        (b"data: 1\r\n\ndata: 2", 10),
        (b"event: x\ndata: 1\nid: 3\n\n", 24),
    ],
    ids=["lf", "crlf", "cr", "mixed", "fields"],
)
def test_first_event_found_with_any_line_ending(buffer: bytes, end: int) -> None:
    found = sse.find_first_event(buffer)

    assert found is not None
    assert found[0] == end
    assert b"data: 1" in found[1]


@pytest.mark.parametrize(
    "buffer", [b"", b"data: 1", b"data: 1\n", b"data: 1\r\n", b": ping\n\n", b": a\n\nevent: x\n\n"]
)
def test_first_event_incomplete_is_none(buffer: bytes) -> None:
    assert sse.find_first_event(buffer) is None


def test_first_event_skips_comment_blocks() -> None:
    buffer = b": keep-alive\n\n: again\r\n\r\ndata: real\n\n"

    found = sse.find_first_event(buffer)

    assert found == (len(buffer), b"data: real")


def test_first_event_accepts_bare_data_field() -> None:
    assert sse.find_first_event(b"data\n\n") == (6, b"data")


@pytest.mark.parametrize(
    ("block", "status"),
    [
        (b'data: {"error":{"message":"busy","code":429}}', 429),
        (b'data: {"error":{"message":"busy","code":"503"}}', 503),
        (b'data: {"error":{"message":"x","code":"rate_limited"}}', 502),
        (b'data: {"error":{"message":"x","code":200}}', 502),
        (b'data: {"error":{"message":"x","code":600}}', 502),
        (b'data: {"error":{"message":"x"}}', 502),
        (b'data:{"error":{"code":400}}', 400),
        (b'data: {"error":\ndata: {"code":500}}', 500),
    ],
    ids=["int", "digit-string", "word", "not-error-status", "out-of-range", "no-code",
         "no-space", "multi-line"],
)
def test_error_event_status(block: bytes, status: int) -> None:
    found = sse.upstream_error_in_event(block)

    assert found is not None
    assert found[0] == status
    assert orjson.loads(found[1])["error"]


def test_error_event_body_is_event_data_verbatim() -> None:
    data = b'{"error": {"message": "busy",  "code": 503}}'

    assert sse.upstream_error_in_event(b"data: " + data) == (503, data)


@pytest.mark.parametrize(
    "block",
    [
        b"data: [DONE]",
        b'data: {"choices":[]}',
        b'data: {"error":"text"}',
        b'data: ["error"]',
        b'data: {"error":{',
        b": comment",
    ],
    ids=["done", "chunk", "error-string", "array", "truncated", "comment"],
)
def test_non_error_event_is_none(block: bytes) -> None:
    assert sse.upstream_error_in_event(block) is None


def test_error_frame_is_one_event() -> None:
    frame = sse.error_frame("The provider went away.", "upstream_reset")

    payload = orjson.loads(frame.removeprefix(b"data: ").removesuffix(b"\n\n"))
    assert frame.startswith(b"data: {")
    assert frame.endswith(b"}\n\n")
    assert frame.count(b"\n") == 2
    assert payload == {
        "error": {
            "message": "The provider went away.",
            "type": "server_error",
            "param": None,
            "code": "upstream_reset",
        }
    }


@pytest.mark.parametrize(
    ("tail", "boundary"),
    [(b"", True), (b"1\n\n", True), (b"\r\n\r\n", True), (b"x\r\r", True),
     (b"1\n", False), (b"ta: x", False), (b"\r\n", False)],
)
def test_event_boundary_detected(tail: bytes, boundary: bool) -> None:
    assert sse.ends_at_event_boundary(tail) is boundary


# Routing.


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


A = Target("http://a", KEY)
B = Target("http://b", KEY)
C = Target("http://c", KEY)


def balancer(clock: Clock | None = None, cooldown_s: float = 10.0) -> Balancer:
    return Balancer(cooldown_s, clock=clock or Clock(), rng=random.Random(7))


def test_balancer_picks_least_outstanding() -> None:
    chooser = balancer()
    chooser.started(A)
    chooser.started(A)
    chooser.started(B)

    assert chooser.choose([A, B, C]) == C


def test_balancer_counts_finished_requests() -> None:
    chooser = balancer()
    chooser.started(A)
    chooser.started(B)
    chooser.finished(A)

    assert chooser.in_flight("http://a") == 0
    assert chooser.choose([A, B]) == A


def test_balancer_breaks_ties_at_random() -> None:
    chooser = balancer()

    chosen = {chooser.choose([A, B, C]) for _ in range(200)}

    assert chosen == {A, B, C}


def test_balancer_skips_ejected_target() -> None:
    chooser = balancer()
    chooser.started(B)
    chooser.failed(A)

    assert chooser.is_ejected("http://a")
    assert chooser.choose([A, B]) == B


def test_balancer_readmits_after_cooldown() -> None:
    clock = Clock()
    chooser = balancer(clock, cooldown_s=10.0)
    chooser.started(B)
    chooser.failed(A)
    clock.now += 10.0

    assert not chooser.is_ejected("http://a")
    assert chooser.choose([A, B]) == A


def test_balancer_prefers_untried_target() -> None:
    chooser = balancer()
    chooser.started(B)

    assert chooser.choose([A, B], tried=[A]) == B


def test_balancer_falls_back_to_tried_target() -> None:
    chooser = balancer()

    assert chooser.choose([A], tried=[A]) == A


def test_balancer_falls_back_to_ejected_target() -> None:
    chooser = balancer()
    chooser.failed(A)
    chooser.failed(B)

    assert chooser.choose([A, B], tried=[A]) == B
    assert chooser.choose([A]) == A


def test_balancer_rejects_empty_targets() -> None:
    with pytest.raises(ValueError, match="no targets"):
        balancer().choose([])


# Provider URL policy.


DEFAULT_POLICY = AddressPolicy.from_allow_list(())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.8.9.10",
        "http://[::1]:8000",
        "http://[::ffff:127.0.0.1]:8000",
        "http://169.254.169.254/latest",
        "http://169.254.1.1",
        "http://[fe80::1]",
        "http://0.0.0.0:80",
        "http://[::]:80",
        "http://224.0.0.1",
        "http://localhost:8000",
        "http://LOCALHOST.:8000",
        "http://api.localhost",
    ],
)
def test_default_policy_denies_local_address(url: str) -> None:
    with pytest.raises(InvalidProviderUrl, match="GATEWAY_ALLOWED_PROVIDER_HOSTS"):
        DEFAULT_POLICY.validate_url(url)


@pytest.mark.parametrize(
    ("url", "validated"),
    [
        ("http://192.0.2.1:8000/", "http://192.0.2.1:8000"),
        ("https://provider.example.invalid/prefix/", "https://provider.example.invalid/prefix"),
        ("http://[2001:db8::1]:8000", "http://[2001:db8::1]:8000"),
    ],
)
def test_default_policy_accepts_public_host(url: str, validated: str) -> None:
    assert DEFAULT_POLICY.validate_url(url) == validated


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://192.0.2.1", "http or https"),
        ("192.0.2.1:8000", "http or https"),
        ("http://", "no host"),
        ("http://user:pw@192.0.2.1", "credentials"),
        ("http://user@192.0.2.1", "credentials"),
        ("http://192.0.2.1/?x=1", "query"),
        ("http://192.0.2.1/#frag", "query or fragment"),
    ],
)
def test_malformed_url_rejected(url: str, message: str) -> None:
    with pytest.raises(InvalidProviderUrl, match=message):
        DEFAULT_POLICY.validate_url(url)


ALLOW_LIST = AddressPolicy.from_allow_list(
    ("127.0.0.1/32", "10.1.0.0/16", "Provider.Example.Invalid.")
)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://10.1.200.3", "http://provider.example.invalid:8000"],
)
def test_allow_list_accepts_listed_host(url: str) -> None:
    assert ALLOW_LIST.validate_url(url) == url


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.2", "http://192.0.2.1", "http://10.2.0.1", "http://other.example.invalid",
     "http://localhost"],
)
def test_allow_list_rejects_unlisted_host(url: str) -> None:
    with pytest.raises(InvalidProviderUrl, match="not in GATEWAY_ALLOWED_PROVIDER_HOSTS"):
        ALLOW_LIST.validate_url(url)


class FixedResolver(AbstractResolver):
    """Resolves every name to the given addresses, without any I/O."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=family, proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_resolver_drops_forbidden_addresses() -> None:
    resolver = GuardedResolver(DEFAULT_POLICY, FixedResolver("127.0.0.1", "192.0.2.1"))

    results = await resolver.resolve("provider.example.invalid", 443)

    assert [result["host"] for result in results] == ["192.0.2.1"]


async def test_resolver_rejects_name_with_only_forbidden_addresses() -> None:
    resolver = GuardedResolver(DEFAULT_POLICY, FixedResolver("169.254.169.254", "::1"))

    with pytest.raises(ForbiddenAddress):
        await resolver.resolve("provider.example.invalid", 80)


async def test_resolver_applies_allow_list() -> None:
    resolver = GuardedResolver(ALLOW_LIST, FixedResolver("127.0.0.1", "192.0.2.1"))

    results = await resolver.resolve("provider.example.invalid", 80)

    assert [result["host"] for result in results] == ["127.0.0.1"]


# Configuration.


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_PORT", "http"),
        ("GATEWAY_PORT", "70000"),
        ("GATEWAY_CONNECT_TIMEOUT_S", "0"),
        ("GATEWAY_FIRST_BYTE_TIMEOUT_S", "-1"),
        ("GATEWAY_IDLE_TIMEOUT_S", "soon"),
        ("GATEWAY_MAX_BODY_BYTES", "1.5"),
        ("GATEWAY_LOG_FORMAT", "xml"),
        ("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8,nonsense"),
        ("GATEWAY_REQUIRE_ATTESTATION_MATCH", "maybe"),
        ("GATEWAY_CLIENT_CONCURRENCY", "0"),
    ],
)
def test_config_error_names_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"GATEWAY_HEARTBEAT_TTL_S": "2"}, "GATEWAY_HEARTBEAT_TTL_S"),
        ({"GATEWAY_HEARTBEAT_TTL_MIN_S": "400"}, "GATEWAY_HEARTBEAT_TTL_MIN_S"),
        ({"GATEWAY_WORKERS": "2"}, "GATEWAY_WORKERS"),
    ],
)
def test_config_inconsistent_values_name_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_config_reads_values() -> None:
    settings = Settings.from_env(
        {
            "GATEWAY_PORT": "8081",
            "GATEWAY_CONNECT_TIMEOUT_S": "2.5",
            "GATEWAY_ALLOWED_PROVIDER_HOSTS": "127.0.0.1/32, provider.example.invalid,",
            "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8",
            "GATEWAY_CLIENT_CONCURRENCY": "",
            "GATEWAY_LOG_FORMAT": "JSON",
            "GATEWAY_REQUIRE_ATTESTATION_MATCH": "off",
            "UNRELATED": "x",
        }
    )

    assert settings.port == 8081
    assert settings.connect_timeout_s == 2.5
    assert settings.allowed_provider_hosts == ("127.0.0.1/32", "provider.example.invalid")
    assert settings.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert settings.client_concurrency is None
    assert settings.log_format == "json"
    assert settings.require_attestation_match is False


def test_config_defaults_match_contract() -> None:
    settings = Settings.from_env({})

    assert settings.registry_url == "memory://"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert (settings.admin_host, settings.admin_port) == ("127.0.0.1", 9090)
    assert settings.heartbeat_ttl_s == 30
    assert settings.max_body_bytes == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("requested", "lease"), [(None, 30.0), (0.1, 5.0), (5, 5.0), (42.5, 42.5), (300, 300.0),
                             (10_000, 300.0), (-1, 5.0)],
)
def test_ttl_clamped_to_limits(requested: float | None, lease: float) -> None:
    assert Settings().clamp_ttl(requested) == lease


def test_ttl_clamp_follows_configured_limits() -> None:
    settings = Settings(heartbeat_ttl_min_s=0.5, heartbeat_ttl_max_s=10, heartbeat_ttl_s=2)

    assert settings.clamp_ttl(0.1) == 0.5
    assert settings.clamp_ttl(60) == 10
    assert settings.clamp_ttl(None) == 2


# Errors.


def all_error_classes() -> Iterator[type[GatewayError]]:
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        cls = pending.pop()
        yield cls
        pending.extend(cls.__subclasses__())


def make_error(cls: type[GatewayError]) -> GatewayError:
    """Build an instance, giving each required argument a placeholder string."""
    arguments: dict[str, Any] = {
        name: f"<{name}>"
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self"
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    return cls(**arguments)


ERROR_CLASSES = sorted(
    (cls for cls in all_error_classes() if cls.__module__ == errors.__name__),
    key=lambda cls: cls.__name__,
)


def test_error_tree_enumerated() -> None:
    names = {cls.__name__ for cls in ERROR_CLASSES}

    assert {"StaleKey", "ProviderUnavailable", "InvalidHeader", "UpstreamTimeout"} <= names
    assert names <= set(errors.__all__)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_error_class_produces_envelope(cls: type[GatewayError]) -> None:
    error = make_error(cls)

    body = orjson.loads(error.body())
    fields = body["error"]
    response = error_response(error)
    assert list(body) == ["error"]
    assert list(fields) == ["message", "type", "param", "code"]
    assert fields["message"] == error.message
    assert fields["type"] == cls.type
    assert fields["code"] == cls.code
    assert fields["param"] is None or isinstance(fields["param"], str)
    assert 400 <= cls.status <= 599
    assert response.status == cls.status
    assert response.content_type == "application/json"
    assert response.body == error.body()


def test_error_param_names_header() -> None:
    error = errors.InvalidHeader("X-Signing-Algo", "bad algo")

    assert orjson.loads(error.body())["error"]["param"] == "X-Signing-Algo"


def test_error_code_given_refines_class_code() -> None:
    error = errors.NotFound("no such model", code="model_not_found", param="model")

    assert orjson.loads(error.body()) == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [(errors.RegistryUnavailable(), "2"), (errors.ShuttingDown(), "1")],
    ids=["registry-unavailable", "shutting-down"],
)
def test_error_response_carries_retry_after(error: GatewayError, retry_after: str) -> None:
    assert error_response(error).headers["Retry-After"] == retry_after


def test_shutting_down_response_closes_connection() -> None:
    assert error_response(errors.ShuttingDown()).keep_alive is False
