"""Application factories, shared gateway state and the middlewares of both listeners.

``Gateway`` contains what both listeners share: settings, the registry, the upstream
connection pool and Forwarder, metrics and tokens. The public app opens and closes it in
its ``cleanup_ctx``; the admin app reads the same object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import BaseProtocol
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.attestation import AttestationChecker
from proxy.auth import TokenStore, bearer_token, load_admin_token, load_provider_tokens, load_secret
from proxy.clientauth import (
    ConcurrencyLimiter,
    FailedAuthLimiter,
    hash_client_key,
    load_client_keys,
)
from proxy.completions import CompletionRecorder
from proxy.config import Settings
from proxy.errors import (
    GatewayError,
    NotFound,
    RequestTooLarge,
    ShuttingDown,
    Unauthorized,
)
from proxy.forward import Exchange, Forwarder
from proxy.headers import client_request_id
from proxy.logs import ACCESS_LOGGER, printable
from proxy.metrics import Metrics
from proxy.routing import Balancer
from proxy.upstream import UpstreamPool
from proxy.urlcheck import AddressPolicy, GuardedResolver
from registry import Registry, open_registry, redact_url
from registry.base import RegistryUnavailable

__all__ = [
    "EXCHANGE",
    "GATEWAY",
    "Gateway",
    "cancel_and_wait",
    "create_admin_app",
    "create_public_app",
]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger(ACCESS_LOGGER)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """State shared by the public and admin listeners of one gateway process."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.policy = AddressPolicy.from_allow_list(settings.allowed_provider_hosts)
        self.tokens = TokenStore(
            provider_tokens=(
                load_provider_tokens(settings.provider_tokens_file)
                if settings.provider_tokens_file
                else {}
            ),
            admin_token=(
                load_admin_token(settings.admin_token_file) if settings.admin_token_file else None
            ),
        )
        self.client_keys = (
            load_client_keys(settings.client_keys_file) if settings.client_keys_file else None
        )
        self.client_limiter = (
            ConcurrencyLimiter(settings.client_concurrency)
            if settings.client_concurrency is not None
            else None
        )
        self.auth_failures = FailedAuthLimiter(
            settings.auth_failure_limit, settings.auth_failure_window_s
        )
        self.upstream_token = (
            load_secret(settings.upstream_token_file) if settings.upstream_token_file else None
        )
        self.balancer = Balancer(settings.eject_cooldown_s)
        self.draining = False
        """Set on SIGTERM: /readyz returns 503 so that load balancers stop sending."""
        self.refusing_requests = False
        """Set after the drain delay: new requests get 503 shutting_down."""
        self.requests_in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.busy_connections: set[BaseProtocol] = set()
        """Client connections with a request in progress, so that draining spares them."""
        self._injected_registry = registry
        self._registry = registry
        self._pool: UpstreamPool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._forwarder: Forwarder | None = None
        self._attestation: AttestationChecker | None = None
        self._recorder: CompletionRecorder | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the gateway is not open")
        return self._registry

    @property
    def attestation(self) -> AttestationChecker:
        if self._attestation is None:
            raise RuntimeError("the gateway is not open")
        return self._attestation

    @property
    def recorder(self) -> CompletionRecorder:
        if self._recorder is None:
            raise RuntimeError("the gateway is not open")
        return self._recorder

    @property
    def forwarder(self) -> Forwarder:
        if self._forwarder is None:
            raise RuntimeError("the gateway is not open")
        return self._forwarder

    async def open(self) -> None:
        """Open the registry (unless one was injected), the upstream session and the reaper."""
        settings = self.settings
        if self._registry is None:
            self._registry = open_registry(
                settings.registry_url,
                prefix=settings.redis_prefix,
                timeout_s=settings.redis_timeout_s,
                outage_grace_s=settings.registry_outage_grace_s,
            )
        # Loads the snapshot of a Redis registry; never raises while Redis is down, so
        # the gateway starts not ready and becomes ready when Redis replies.
        await self._registry.start()
        # One provider that accepts connections and never responds can keep at most
        # max_connections_per_provider of them; requests to other providers never queue.
        self._pool = UpstreamPool(
            self.policy,
            limit_per_origin=settings.max_connections_per_provider,
            keepalive_s=settings.upstream_keepalive_s,
            connect_timeout_s=settings.connect_timeout_s,
        )
        # aiohttp's client session serves the other provider requests (attestation
        # reports), with the same address policy and connection limit.
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=settings.max_connections_per_provider,
            keepalive_timeout=settings.upstream_keepalive_s,
            resolver=GuardedResolver(self.policy),
        )
        # The reports are parsed here, not relayed, so a compressed one is decompressed.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._recorder = CompletionRecorder(self._registry, self.metrics, settings.signature_ttl_s)
        self._forwarder = Forwarder(
            self._pool,
            self.balancer,
            first_byte_timeout_s=settings.first_byte_timeout_s,
            idle_timeout_s=settings.idle_timeout_s,
            request_timeout_s=settings.request_timeout_s,
            retry_backoff_s=settings.retry_backoff_s,
            metrics=self.metrics,
            on_completion=self._recorder.record,
        )
        self._attestation = AttestationChecker(
            self._session,
            verifier=settings.attestation_verifier,
            recheck_interval_s=settings.attestation_recheck_s,
        )
        self._reaper = asyncio.create_task(self._reap_forever(), name="registry-reaper")
        logger.info(
            "gateway open: registry %s, registration %s",
            redact_url(settings.registry_url),
            "enabled"
            if self.tokens.registration_enabled
            else "DISABLED (set GATEWAY_PROVIDER_TOKENS_FILE to enable it)",
        )

    async def aclose(self) -> None:
        """Stop the reaper and close the connections and the registry this object opened."""
        if self._reaper is not None:
            await cancel_and_wait(self._reaper, "gateway closing")
        if self._recorder is not None:
            await self._recorder.aclose()
        if self._pool is not None:
            await self._pool.aclose()
        if self._session is not None:
            await self._session.close()
        if self._registry is not None and self._injected_registry is None:
            await self._registry.aclose()

    async def _reap_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                removed = await self.registry.reap()
            except RegistryUnavailable as exc:
                if not failing:
                    logger.warning("reaper cannot reach the registry: %s", exc)
                failing = True
                continue
            if failing:
                logger.info("reaper reaches the registry again")
                failing = False
            if removed:
                logger.info("reaper removed %d expired endpoint(s)", removed)


async def cancel_and_wait(task: asyncio.Task[Any], reason: str) -> None:
    """Cancel ``task`` and return once it is done, cancelling it again while it goes on.

    A registry call can complete normally although its task was cancelled (seen with
    redis-py 8.2.0 on CPython 3.11), so a loop around it would outlive one cancel. The
    caller's own cancellation propagates: ``asyncio.wait`` never suppresses it.
    """
    while not task.done():
        task.cancel(reason)
        await asyncio.wait([task], timeout=0.05)


GATEWAY = web.AppKey("gateway", Gateway)
EXCHANGE = web.RequestKey("exchange", Exchange)


async def _gateway_lifetime(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.open()
    yield
    await gateway.aclose()


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id and an Exchange, and write one access line when it ends."""
    exchange = Exchange(request_id=client_request_id(request.headers))
    request[EXCHANGE] = exchange
    gateway = request.app[GATEWAY]
    gateway.requests_in_flight += 1
    gateway.busy_connections.add(request.protocol)
    gateway.idle.clear()
    # Probes and scrapes stay out of the gauge, so that it reads 0 on an idle gateway.
    gauged = request.path not in _ALWAYS_SERVED
    if gauged:
        gateway.metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not exchange.bytes_out and isinstance(response, web.Response):
            exchange.bytes_out = len(response.body) if isinstance(response.body, bytes) else 0
        return response
    except asyncio.CancelledError:
        if exchange.outcome == "ok":
            exchange.outcome = "client_disconnect"
        # 499 as in nginx's logs: the client closed the connection before the response.
        status = 499
        raise
    finally:
        gateway.requests_in_flight -= 1
        gateway.busy_connections.discard(request.protocol)
        if gauged:
            gateway.metrics.in_flight.dec()
        if gateway.requests_in_flight == 0:
            gateway.idle.set()
        _record(request, exchange, status)


def _loggable_path(request: web.Request) -> str | None:
    # Deregistration paths carry a full public key; logs keep its first 16 hex characters.
    pubkey = request.match_info.get("pubkey")
    if pubkey is not None:
        return request.path.replace(pubkey, pubkey[:16] + "...")
    # The raw (percent-encoded) path has no spaces, so it cannot fake key=value fields.
    return printable(request.rel_url.raw_path, 200)


_ACCESS_FIELDS = (
    "request_id",
    "method",
    "path",
    "model",
    "provider",
    "status",
    "outcome",
    "attempts",
    "duration_ms",
    "ttft_ms",
    "bytes_out",
    "client",
)
_ACCESS_FORMAT = " ".join(f"{key}=%s" for key in _ACCESS_FIELDS)


def _record(request: web.Request, exchange: Exchange, status: int) -> None:
    duration_ms = (time.monotonic() - exchange.started) * 1000
    route = exchange.route or "unmatched"
    request.app[GATEWAY].metrics.record_request(
        route=route,
        status=status,
        outcome=exchange.outcome,
        model=exchange.model,
        routed=exchange.provider is not None,
        duration_s=duration_ms / 1000,
        # Only a relayed stream sets ttft_ms, so it also marks the request as a stream.
        ttft_s=None if exchange.ttft_ms is None else exchange.ttft_ms / 1000,
        stream_failure=exchange.stream_failure,
    )
    values = (
        exchange.request_id,
        request.method,
        _loggable_path(request),
        printable(exchange.model),
        exchange.provider,
        status,
        exchange.outcome,
        exchange.attempts,
        round(duration_ms, 1),
        None if exchange.ttft_ms is None else round(exchange.ttft_ms, 1),
        exchange.bytes_out,
        request.remote,
    )
    # The same fields go into the text line and, through ``extra``, into JSON lines.
    access_logger.info(
        _ACCESS_FORMAT, *values, extra=dict(zip(_ACCESS_FIELDS, values, strict=True))
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into the OpenAI envelope; an unexpected one is a logged 500."""
    exchange = request.get(EXCHANGE)
    try:
        return await handler(request)
    except GatewayError as exc:
        error: GatewayError = exc
    except web.HTTPException as exc:
        error = _from_http_exception(request, exc)
    except Exception as exc:
        if isinstance(exc, OSError) and request.transport is None:
            return _client_gone(request, exc)
        logger.exception("unexpected error in %s %s", request.method, request.path)
        error = GatewayError("The gateway failed to process the request.", code="internal_error")
    response = error_response(error)
    if exchange is not None:
        exchange.outcome = error.outcome
        exchange.bytes_out = len(response.body) if isinstance(response.body, bytes) else 0
    return response


def _client_gone(request: web.Request, exc: OSError) -> web.Response:
    # The admin listener does not cancel handlers, so a client that closes the
    # connection while its body is read shows up as the OSError of request.read().
    # No client is left to read a response, so this is a disconnect, not an error.
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        exchange.outcome = "client_disconnect"
    logger.info(
        "client disconnected during %s %s: %s",
        request.method,
        printable(request.path, 200),
        exc,
    )
    # 499 as in nginx's logs; the response is never sent.
    return web.Response(status=499)


_ALWAYS_SERVED = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reject requests with 503 shutting_down after the drain delay; health checks still work."""
    if request.app[GATEWAY].refusing_requests and request.path not in _ALWAYS_SERVED:
        raise ShuttingDown()
    return await handler(request)


@web.middleware
async def client_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a client API key on /v1/ when client keys are configured, and cap concurrency."""
    gateway = request.app[GATEWAY]
    if gateway.client_keys is None or not request.path.startswith("/v1/"):
        return await handler(request)

    gateway.auth_failures.check(request.remote)
    token = bearer_token(request.headers)
    client = gateway.client_keys.get(hash_client_key(token)) if token else None
    if client is None:
        gateway.auth_failures.record_failure(request.remote)
        raise Unauthorized("Missing or invalid API key. Send 'Authorization: Bearer <key>'.")
    if gateway.client_limiter is None:
        return await handler(request)
    with gateway.client_limiter.slot(client):
        return await handler(request)


def error_response(error: GatewayError) -> web.Response:
    response = web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers,
    )
    if error.close_connection:
        # aiohttp then sends Connection: close and closes the connection after the
        # response, rather than keeping it alive.
        response.force_close()
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge(
            "The request body is larger than the gateway's limit "
            f"({request.app[GATEWAY].settings.max_body_bytes} bytes)."
        )
    if exc.status == 404:
        return NotFound(f"No route for {request.method} {printable(request.path, 200)}.")
    wrapped = GatewayError(exc.reason, code=None)
    wrapped.status = exc.status
    wrapped.type = "invalid_request_error" if exc.status < 500 else "server_error"
    wrapped.headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return wrapped


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        response.headers["X-Request-Id"] = exchange.request_id


def _base_app(gateway: Gateway, *extra_middlewares: Middleware) -> web.Application:
    app = web.Application(
        middlewares=[access_middleware, error_middleware, drain_middleware, *extra_middlewares],
        client_max_size=gateway.settings.max_body_bytes,
    )
    app[GATEWAY] = gateway
    app.on_response_prepare.append(_add_request_id)
    return app


def create_public_app(gateway: Gateway) -> web.Application:
    """Build the client-facing app; it opens and closes ``gateway``."""
    from proxy import handlers

    app = _base_app(gateway, client_auth_middleware)
    app.cleanup_ctx.append(_gateway_lifetime)
    handlers.add_routes(app)
    return app


def create_admin_app(gateway: Gateway) -> web.Application:
    """Build the registration and admin app on the same, already shared, ``gateway``."""
    from proxy import admin

    app = _base_app(gateway)
    admin.add_routes(app)
    return app
