"""Handlers of the admin listener: provider heartbeats, deregistration, listing, metrics.

Heartbeats need a provider token; listing needs the admin token; deregistration accepts
either. Every heartbeat gets an answer, so the agent can retry what failed.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.app import EXCHANGE, GATEWAY, Gateway
from proxy.attestation import AttestationFailed
from proxy.auth import bearer_token
from proxy.errors import (
    Conflict,
    Forbidden,
    Gone,
    InvalidField,
    InvalidJson,
    NotFound,
    RegistryUnavailable,
    Unauthorized,
)
from proxy.urlcheck import InvalidProviderUrl
from registry import base as registry_base
from registry.types import (
    PUBKEY_HEX_LENGTH,
    SIGNING_ALGOS,
    Heartbeat,
    HeartbeatOutcome,
    InvalidPublicKey,
    normalize_pubkey,
)

__all__ = ["add_routes"]

logger = logging.getLogger(__name__)

_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_MAX_MODEL_LENGTH = 256


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/providers/heartbeat", handle_heartbeat)
    app.router.add_delete("/v1/providers/{pubkey}", handle_deregister)
    app.router.add_get("/v1/providers", handle_list_providers)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)


def _provider_identity(request: web.Request, gateway: Gateway) -> str:
    if not gateway.tokens.registration_enabled:
        raise Unauthorized(
            "Registration is disabled on this gateway: no provider tokens file is "
            "configured (GATEWAY_PROVIDER_TOKENS_FILE)."
        )
    gateway.auth_failures.check(request.remote)
    identity = gateway.tokens.provider_identity(bearer_token(request.headers))
    if identity is None:
        gateway.auth_failures.record_failure(request.remote)
        raise Unauthorized(
            "Missing or unknown provider token. Send 'Authorization: Bearer <token>'."
        )
    return identity


async def handle_heartbeat(request: web.Request) -> web.Response:
    """Register or renew one provider endpoint and return its lease."""
    gateway = request.app[GATEWAY]
    request[EXCHANGE].route = "heartbeat"
    identity = _provider_identity(request, gateway)
    beat = _parse_heartbeat(await request.read(), identity, gateway)
    if gateway.settings.require_attestation_match:
        await _check_attestation(gateway, beat)

    try:
        result = await gateway.registry.heartbeat(beat)
    except registry_base.RegistryUnavailable as exc:
        gateway.metrics.heartbeats.labels("registry_unavailable").inc()
        logger.warning("heartbeat from %s not stored, registry unavailable: %s", identity, exc)
        raise RegistryUnavailable() from exc
    gateway.metrics.heartbeats.labels(result.outcome.value).inc()

    match result.outcome:
        case HeartbeatOutcome.REGISTERED | HeartbeatOutcome.REFRESHED:
            if result.outcome is HeartbeatOutcome.REGISTERED:
                logger.info(
                    "provider joined: key %s... model %s url %s owner %s",
                    beat.pubkey[:16],
                    beat.model,
                    beat.url,
                    identity,
                )
            return web.json_bytes_response(
                {
                    "pubkey": beat.pubkey,
                    "model": beat.model,
                    "url": beat.url,
                    "expires_in_s": beat.ttl_s,
                    "heartbeat_interval_s": round(beat.ttl_s / 3, 3),
                },
                dumps=orjson.dumps,
            )
        case HeartbeatOutcome.OWNER_CONFLICT:
            raise Conflict(
                f"The endpoint {beat.url} of key {beat.pubkey[:16]}... is live and owned by "
                "another identity. Wait for its lease to end or ask that owner to deregister it."
            )
        case HeartbeatOutcome.MODEL_CONFLICT:
            raise Conflict(
                f"The key {beat.pubkey[:16]}... is live for model {result.bound_model!r}; "
                f"a key serves one model, so it cannot also serve {beat.model!r}.",
                param="model",
            )
        case HeartbeatOutcome.RETIRED:
            raise Gone(
                f"Agent instance {beat.instance_id!r} deregistered this endpoint; late "
                "heartbeats from it are rejected. A restarted agent uses a new instance_id."
            )


async def _check_attestation(gateway: Gateway, beat: Heartbeat) -> None:
    try:
        await gateway.attestation.check(beat.pubkey, beat.url, beat.model, beat.signing_algo)
    except AttestationFailed as exc:
        gateway.metrics.heartbeats.labels("attestation_failed").inc()
        logger.warning(
            "heartbeat from %s rejected: key %s... at %s not confirmed: %s",
            beat.owner,
            beat.pubkey[:16],
            beat.url,
            exc,
        )
        raise Conflict(
            f"The key could not be confirmed: {exc}. The provider must publish this key in "
            "GET /v1/attestation/report (GATEWAY_REQUIRE_ATTESTATION_MATCH is on).",
            param="pubkey",
            code="attestation_mismatch",
        ) from None


def _parse_heartbeat(raw: bytes, identity: str, gateway: Gateway) -> Heartbeat:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"The heartbeat body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidJson("The heartbeat body must be a JSON object.")

    pubkey_raw = _required_string(body, "pubkey")
    try:
        pubkey = normalize_pubkey(pubkey_raw)
    except InvalidPublicKey as exc:
        raise InvalidField("pubkey", f"Invalid pubkey: {exc}.") from None

    algo = _required_string(body, "signing_algo")
    if algo not in SIGNING_ALGOS:
        raise InvalidField(
            "signing_algo", f"signing_algo must be ed25519 or ecdsa, got {algo[:40]!r}."
        )
    if len(pubkey) != PUBKEY_HEX_LENGTH[algo]:
        raise InvalidField(
            "pubkey",
            f"A {algo} pubkey has {PUBKEY_HEX_LENGTH[algo]} hex characters, got {len(pubkey)}.",
        )

    model = _required_string(body, "model")
    if len(model) > _MAX_MODEL_LENGTH or not model.isprintable():
        raise InvalidField(
            "model", f"model must be printable and at most {_MAX_MODEL_LENGTH} characters."
        )

    try:
        url = gateway.policy.validate_url(_required_string(body, "url"))
    except InvalidProviderUrl as exc:
        raise InvalidField("url", f"Invalid url: {exc}.") from None

    ttl_raw = body.get("ttl_s")
    if ttl_raw is not None and (
        isinstance(ttl_raw, bool)
        or not isinstance(ttl_raw, int | float)
        or not math.isfinite(ttl_raw)
    ):
        raise InvalidField("ttl_s", "ttl_s must be a number of seconds.")

    instance_id = body.get("instance_id", "")
    if instance_id != "" and (
        not isinstance(instance_id, str) or not _INSTANCE_ID.fullmatch(instance_id)
    ):
        raise InvalidField("instance_id", "instance_id must be 1-128 characters of A-Za-z0-9._:-.")

    return Heartbeat(
        pubkey=pubkey,
        model=model,
        url=url,
        signing_algo=algo,
        owner=identity,
        ttl_s=gateway.settings.clamp_ttl(ttl_raw),
        instance_id=instance_id,
    )


def _required_string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidField(name, f"The heartbeat body has no '{name}' field.")
    if not isinstance(value, str) or not value:
        raise InvalidField(name, f"'{name}' must be a non-empty string.")
    return value


async def handle_deregister(request: web.Request) -> web.Response:
    """Remove endpoints of a key: the caller's own, or any with the admin token."""
    gateway = request.app[GATEWAY]
    request[EXCHANGE].route = "deregister"
    gateway.auth_failures.check(request.remote)
    token = bearer_token(request.headers)
    identity: str | None
    if gateway.tokens.is_admin(token):
        identity = None
    else:
        identity = _provider_identity(request, gateway)

    try:
        pubkey = normalize_pubkey(request.match_info["pubkey"])
    except InvalidPublicKey as exc:
        raise InvalidField("pubkey", f"Invalid pubkey: {exc}.") from None
    url = request.query.get("url")
    if url is not None:
        url = url.rstrip("/")

    try:
        removed = await gateway.registry.deregister(pubkey, url=url, identity=identity)
    except registry_base.KeyNotFound:
        raise NotFound(
            f"No endpoint of key {pubkey[:16]}... is registered.", code="key_not_found"
        ) from None
    except registry_base.DeregisterForbidden:
        raise Forbidden(
            "The caller owns none of the named endpoints; nothing was removed."
        ) from None
    except registry_base.RegistryUnavailable as exc:
        raise RegistryUnavailable() from exc
    gateway.attestation.forget(pubkey, url)
    logger.info(
        "provider left: key %s... urls %s removed by %s",
        pubkey[:16],
        ", ".join(removed),
        identity or "admin",
    )
    return web.Response(status=204)


def _require_admin(request: web.Request, gateway: Gateway) -> None:
    if gateway.tokens.admin_token is None:
        raise Unauthorized("The admin API is disabled: set GATEWAY_ADMIN_TOKEN_FILE.")
    gateway.auth_failures.check(request.remote)
    if not gateway.tokens.is_admin(bearer_token(request.headers)):
        gateway.auth_failures.record_failure(request.remote)
        raise Unauthorized("Missing or wrong admin token. Send 'Authorization: Bearer <token>'.")


async def handle_list_providers(request: web.Request) -> web.Response:
    """Return every stored entry with its endpoints and the seconds left on each lease."""
    gateway = request.app[GATEWAY]
    request[EXCHANGE].route = "list_providers"
    _require_admin(request, gateway)
    try:
        entries = await gateway.registry.entries()
        now = await gateway.registry.now()
    except registry_base.RegistryUnavailable as exc:
        raise RegistryUnavailable() from exc
    data = [
        {
            "pubkey": entry.pubkey,
            "model": entry.model,
            "signing_algo": entry.signing_algo,
            "endpoints": [
                {
                    "url": e.url,
                    "owner": e.owner,
                    "instance_id": e.instance_id,
                    "registered_at": e.registered_at,
                    "last_heartbeat": e.last_heartbeat,
                    "expires_at": e.expires_at,
                    "seconds_left": round(e.expires_at - now, 3),
                }
                for e in entry.endpoints
            ],
        }
        for entry in entries
    ]
    return web.json_bytes_response({"object": "list", "now": now, "data": data}, dumps=orjson.dumps)


async def handle_metrics(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "metrics"
    body = request.app[GATEWAY].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_healthz(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "healthz"
    return web.json_bytes_response({"status": "ok"}, dumps=orjson.dumps)
