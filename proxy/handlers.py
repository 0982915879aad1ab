"""Handlers of the public listener: routed completions, models, attestation reports, health."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.app import EXCHANGE, GATEWAY, Gateway
from proxy.errors import (
    InvalidHeader,
    InvalidJson,
    MissingModel,
    NoLiveProvider,
    NotFound,
    RegistryUnavailable,
    RequestTimeout,
    RequestTooLarge,
    StaleKey,
)
from proxy.headers import upstream_request_headers, validate_e2ee_headers
from proxy.logs import RateLimiter, printable
from proxy.routing import Target, targets_for_key, targets_for_model
from registry import base as registry_base

__all__ = ["add_routes"]

logger = logging.getLogger(__name__)

# A model whose provider was live within this window gets 503 no_live_provider rather
# than 404 model_not_found: its providers are presumably restarting.
RECENTLY_LIVE_S = 24 * 3600

_stale_key_log = RateLimiter(interval_s=10.0)

ROUTED_PATHS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


def add_routes(app: web.Application) -> None:
    for path in ROUTED_PATHS:
        app.router.add_post(path, handle_routed)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/attestation/report", handle_attestation_report)
    from proxy.signatures import handle_signature  # imports this module

    app.router.add_get("/v1/signature/{chat_id}", handle_signature)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)


async def handle_routed(request: web.Request) -> web.StreamResponse:
    """Route a completion or embedding request to a provider of its model (and key, if pinned)."""
    gateway = request.app[GATEWAY]
    exchange = request[EXCHANGE]
    exchange.route = ROUTED_PATHS[request.path]

    e2ee = validate_e2ee_headers(request.headers)
    settings = gateway.settings
    body = await _read_body(request, settings.max_body_bytes, settings.client_body_timeout_s)
    model, stream = _parse_body(body)
    exchange.model = model
    exchange.pinned = e2ee.model_pubkey is not None

    if e2ee.model_pubkey is not None:
        targets = await _pinned_targets(gateway, e2ee.model_pubkey, model)
    else:
        targets = await _model_targets(gateway, model, None)

    return await gateway.forwarder.forward(
        request,
        body=body,
        headers=upstream_headers(request, gateway),
        targets=targets,
        pinned=exchange.pinned,
        stream=stream,
        exchange=exchange,
        completion=exchange.route != "embeddings",
    )


async def _read_body(request: web.Request, limit: int, idle_timeout_s: float) -> bytes:
    """Read the whole body, allowing at most ``idle_timeout_s`` between two reads.

    Like nginx's client_body_timeout: a client that stops sending in the middle of its
    body (or whose chunked framing breaks, which aiohttp's parser may not report) gets
    408 instead of holding a handler and two sockets until it leaves.
    """
    # A declared length over the limit is rejected before reading a byte of the body.
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(
            f"The request body has {request.content_length} bytes; the limit is {limit} bytes."
        )
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        # Bytes already received are taken without arming a timer: a small body usually
        # arrives with the headers, and a timer per read showed up in profiles.
        chunk = content.read_nowait()
        if not chunk and not content.is_eof():
            try:
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await content.readany()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body stopped arriving: nothing was received for "
                    f"{idle_timeout_s:g} s (GATEWAY_CLIENT_BODY_TIMEOUT_S)."
                ) from None
        if not chunk:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is over the limit of {limit} bytes.")
        chunks.append(chunk)


def _parse_body(body: bytes) -> tuple[str, bool]:
    """Return (model, stream) of an OpenAI request body; only these fields are read."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        where = f" (at line {exc.lineno}, column {exc.colno})" if body else " (the body is empty)"
        raise InvalidJson(f"The request body is not valid JSON{where}.") from None
    if not isinstance(decoded, dict):
        raise InvalidJson("The request body must be a JSON object.")
    model = decoded.get("model")
    if model is None:
        raise MissingModel("The request body has no 'model' field.")
    if not isinstance(model, str) or not model:
        raise MissingModel("The 'model' field must be a non-empty string.")
    return model, decoded.get("stream") is True


async def _pinned_targets(gateway: Gateway, pubkey: str, model: str) -> list[Target]:
    try:
        entry = await gateway.registry.get(pubkey)
    except registry_base.RegistryUnavailable as exc:
        gateway.metrics.registry_errors.inc()
        logger.warning("registry unavailable for a pinned lookup: %s", exc)
        raise RegistryUnavailable() from exc

    targets = targets_for_key(entry, model)
    if not targets:
        prefix = pubkey[:16]
        allowed, suppressed = _stale_key_log.allow(prefix)
        if allowed:
            repeats = f" ({suppressed} more since the last line)" if suppressed else ""
            logger.warning(
                "stale key %s... for model %s: no live provider holds it%s",
                prefix,
                printable(model),
                repeats,
            )
        raise StaleKey()
    return targets


async def _model_targets(gateway: Gateway, model: str, signing_algo: str | None) -> list[Target]:
    try:
        targets = targets_for_model(await gateway.registry.by_model(model), signing_algo)
        if targets:
            return targets
        last_live = await gateway.registry.model_last_live(model)
        # last_live is on the registry's clock, so "recently" is measured on it too.
        now = await gateway.registry.now() if last_live is not None else 0.0
    except registry_base.RegistryUnavailable as exc:
        gateway.metrics.registry_errors.inc()
        logger.warning("registry unavailable for a model lookup: %s", exc)
        raise RegistryUnavailable() from exc

    if last_live is not None and now - last_live < RECENTLY_LIVE_S:
        raise NoLiveProvider(f"No provider of model {model!r} is live right now. Retry shortly.")
    raise NotFound(
        f"The model {model!r} does not exist or has no provider. "
        "GET /v1/models lists the models available.",
        code="model_not_found",
        param="model",
    )


def upstream_headers(request: web.Request, gateway: Gateway) -> CIMultiDict[str]:
    """Build the headers sent upstream for this request (see proxy.headers)."""
    return upstream_request_headers(
        request.headers,
        peer=request.remote,
        scheme=request.scheme,
        request_id=request[EXCHANGE].request_id,
        trusted_proxies=gateway.settings.trusted_proxies,
        upstream_token=gateway.upstream_token,
    )


async def handle_models(request: web.Request) -> web.Response:
    """List the models that have a live provider, in OpenAI's format."""
    gateway = request.app[GATEWAY]
    request[EXCHANGE].route = "models"
    try:
        models = await gateway.registry.live_models()
    except registry_base.RegistryUnavailable as exc:
        raise RegistryUnavailable() from exc
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "e2ee-gateway"} for m in models]
    return web.json_bytes_response({"object": "list", "data": data}, dumps=orjson.dumps)


async def handle_attestation_report(request: web.Request) -> web.StreamResponse:
    """Forward an attestation report request to a live provider of the model and relay it."""
    gateway = request.app[GATEWAY]
    exchange = request[EXCHANGE]
    exchange.route = "attestation_report"

    model = request.query.get("model")
    if not model:
        raise MissingModel("The query parameter 'model' is required.")
    exchange.model = model
    algo = request.query.get("signing_algo")
    if algo is not None and algo not in ("ed25519", "ecdsa"):
        raise InvalidHeader(
            "signing_algo", f"signing_algo must be 'ed25519' or 'ecdsa', got {algo[:40]!r}."
        )

    targets = await _model_targets(gateway, model, algo)
    return await gateway.forwarder.forward(
        request,
        body=b"",
        headers=upstream_headers(request, gateway),
        targets=targets,
        pinned=False,
        stream=False,
        exchange=exchange,
    )


async def handle_healthz(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "healthz"
    return web.json_bytes_response({"status": "ok"}, dumps=orjson.dumps)


async def handle_readyz(request: web.Request) -> web.Response:
    """Return 200 unless the gateway is draining or the registry is past its outage grace.

    A registry unreachable for less than GATEWAY_REGISTRY_OUTAGE_GRACE_S keeps the
    replica ready: its snapshot still serves, and a shared Redis outage must not empty
    the load balancer.
    """
    gateway = request.app[GATEWAY]
    request[EXCHANGE].route = "readyz"
    if gateway.draining:
        return web.json_bytes_response({"status": "draining"}, status=503, dumps=orjson.dumps)
    if not gateway.registry.ready:
        return web.json_bytes_response(
            {"status": "registry_unavailable"}, status=503, dumps=orjson.dumps
        )
    return web.json_bytes_response({"status": "ready"}, dumps=orjson.dumps)
