"""Completion ids: reading them from answers and validating them in signature fetches.

The gateway records which provider served each completion so that
``GET /v1/signature/{id}`` reaches that provider, on any replica. The id is read from
the JSON body of a non-streaming answer, or from the first event of a stream, on a copy
of the bytes; the relayed bytes are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import re

import orjson

from proxy.logs import RateLimiter
from proxy.metrics import Metrics
from proxy.routing import Target
from proxy.sse import event_data
from registry import CompletionRecord, Registry
from registry import base as registry_base

__all__ = [
    "CompletionRecorder",
    "completion_id_from_body",
    "completion_id_from_event",
    "is_valid_chat_id",
]

logger = logging.getLogger(__name__)

# OpenAI ids look like chatcmpl-<alphanumerics>; providers add dots, colons and dashes.
_CHAT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,256}")


def is_valid_chat_id(chat_id: str) -> bool:
    return _CHAT_ID.fullmatch(chat_id) is not None


def _id_of(document: bytes) -> str | None:
    try:
        decoded = orjson.loads(document)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(decoded, dict):
        return None
    chat_id = decoded.get("id")
    if isinstance(chat_id, str) and is_valid_chat_id(chat_id):
        return chat_id
    return None


def completion_id_from_body(body: bytes) -> str | None:
    """Return the ``id`` of a JSON completion body, or None."""
    return _id_of(body)


def completion_id_from_event(block: bytes) -> str | None:
    """Return the ``id`` in the data of one SSE event block, or None."""
    return _id_of(event_data(block))


class CompletionRecorder:
    """Writes completion records in the background, off the relay's path.

    A failed write is logged (rate-limited) and counted, never turned into a client
    error: the completion itself has succeeded.
    """

    def __init__(self, registry: Registry, metrics: Metrics, ttl_s: float) -> None:
        self._registry = registry
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._pending: set[asyncio.Task[None]] = set()
        self._failure_log = RateLimiter(interval_s=10.0)

    def record(self, chat_id: str, target: Target, model: str) -> None:
        record = CompletionRecord(target.url, target.pubkey, model)
        task = asyncio.create_task(self._write(chat_id, record), name="record-completion")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, chat_id: str, record: CompletionRecord) -> None:
        try:
            await self._registry.record_completion(chat_id, record, self._ttl_s)
        except registry_base.RegistryError as exc:
            self._metrics.completion_records.labels("failed").inc()
            allowed, suppressed = self._failure_log.allow("write")
            if allowed:
                logger.warning(
                    "could not record completion %s for signature fetches: %s%s",
                    chat_id[:64],
                    exc,
                    f" ({suppressed} more since the last line)" if suppressed else "",
                )
            return
        self._metrics.completion_records.labels("ok").inc()

    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Let pending writes finish for up to ``timeout_s``, then cancel the rest."""
        if not self._pending:
            return
        _, late = await asyncio.wait(set(self._pending), timeout=timeout_s)
        for task in late:
            task.cancel("gateway closing")
        if late:
            await asyncio.wait(late)
