"""Signature fetches: which provider served a completion, on every replica.

Providers sign ``<model>:<sha256(request body)>:<sha256(response bytes)>`` and keep the
signature under the completion's id. Several providers may share one key, so the key
cannot say which one holds a given signature: the gateway records completion id →
(provider URL, key, model) in the registry as soon as it sees the id, and
``GET /v1/signature/{id}`` is forwarded to that provider.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.app import EXCHANGE, GATEWAY
from proxy.completions import is_valid_chat_id
from proxy.errors import InvalidChatId, NotFound, RegistryUnavailable
from proxy.handlers import upstream_headers
from proxy.routing import Target
from registry import CompletionRecord, Registry
from registry import base as registry_base

__all__ = ["handle_signature"]

logger = logging.getLogger(__name__)

# A fetch made right after the answer, through another replica, may arrive before the
# record's write lands: the lookup is repeated for this long before a 404.
LOOKUP_PATIENCE_S = 0.5
_LOOKUP_INTERVAL_S = 0.05


async def handle_signature(request: web.Request) -> web.StreamResponse:
    """Forward a signature fetch, query string unchanged, to the provider that served it."""
    gateway = request.app[GATEWAY]
    exchange = request[EXCHANGE]
    exchange.route = "signature"

    chat_id = request.match_info["chat_id"]
    if not is_valid_chat_id(chat_id):
        raise InvalidChatId(
            "The chat id must be 1-256 characters of A-Za-z0-9._:- as returned in the "
            "completion's 'id' field.",
            param="chat_id",
        )
    # A record this replica has not written yet is found without a registry lookup.
    record = gateway.recorder.pending(chat_id) or await _find_record(gateway.registry, chat_id)
    if record is None:
        raise NotFound(
            f"No completion {chat_id!r} is known: the id is wrong, or its record expired "
            "(GATEWAY_SIGNATURE_TTL_S after the answer).",
            code="chat_not_found",
            param="chat_id",
        )
    exchange.model = record.model
    return await gateway.forwarder.forward(
        request,
        body=b"",
        headers=upstream_headers(request, gateway),
        targets=[Target(record.url, record.pubkey)],
        pinned=True,
        stream=False,
        exchange=exchange,
    )


async def _find_record(registry: Registry, chat_id: str) -> CompletionRecord | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOOKUP_PATIENCE_S
    while True:
        try:
            record = await registry.find_completion(chat_id)
        except registry_base.RegistryUnavailable as exc:
            raise RegistryUnavailable() from exc
        if record is not None or loop.time() >= deadline:
            return record
        await asyncio.sleep(_LOOKUP_INTERVAL_S)
