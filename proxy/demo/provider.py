"""The demo provider's aiohttp application.

``create_app(config)`` builds it. Each request reads the mutable ``DemoConfig`` stored
under ``DEMO_CONFIG``, so a test can switch faults between requests while the server
runs, and each request updates the ``DemoState`` stored under ``DEMO_STATE``.

Serve the app through ``make_runner`` (or the ``serve_demo_provider`` context manager).
That runner cancels a handler when its client disconnects (``handler_cancellation``), so
``DemoState.client_gone`` also catches clients that leave before any write fails. It
closes idle keep-alive connections after ``DemoConfig.close_idle_after_s``.

Faults apply to the three completion endpoints (chat completions, completions,
embeddings), in this order: ``headers_delay_s``, ``reset_before_headers``, ``status``,
then the stream faults. With ``fail_next`` set only that many requests get them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.demo import chunks
from proxy.demo.faults import Faults
from proxy.demo.state import DEMO_CONFIG, DEMO_STATE, DemoConfig, DemoState

__all__ = [
    "DEMO_CONFIG",
    "DEMO_STATE",
    "DemoConfig",
    "DemoServer",
    "DemoState",
    "create_app",
    "make_runner",
    "serve_demo_provider",
]

logger = logging.getLogger(__name__)

_ERROR_FIRST_EVENT = (
    b'data: {"error":{"message":"The demo provider is overloaded.",'
    b'"type":"server_error","code":503}}\n\n'
)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _json(payload: object, status: int = 200) -> web.Response:
    return web.json_bytes_response(payload, dumps=orjson.dumps, status=status)


def _error(status: int, message: str, code: str | int | None = None) -> web.Response:
    body = chunks.error_body(status, message, code=code)
    return web.Response(body=body, status=status, content_type="application/json")


def _reset_connection(request: web.BaseRequest, state: DemoState) -> None:
    """Close the client connection with a TCP RST, dropping anything not yet sent."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    state.resets += 1
    logger.info("fault: reset the connection of %s %s", request.method, request.path)


@web.middleware
async def _observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record each request in DemoState and notice handlers cancelled by a disconnect."""
    state = request.app[DEMO_STATE]
    state.requests[request.path] += 1
    state.last_headers = CIMultiDict(request.headers)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple):
        state.peers.add((str(peer[0]), int(peer[1])))
    try:
        return await handler(request)
    except asyncio.CancelledError:
        state.note_client_gone()
        raise


async def _read_completion_request(
    request: web.Request, config: DemoConfig
) -> tuple[bytes, dict[str, Any]] | web.Response:
    """Return the raw and decoded body of a completion request, or the error to send."""
    raw = await request.read()
    request.app[DEMO_STATE].last_body = raw
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(400, "The request body is not valid JSON.", "invalid_json")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        return _error(400, "The request has no string 'model'.", "missing_model")
    if model != config.model:
        return _error(404, f"The model '{model}' does not exist.", "model_not_found")
    return raw, body


async def _apply_early_faults(
    request: web.Request, faults: Faults, state: DemoState
) -> web.StreamResponse | None:
    """Apply the faults that act before a response starts; return the response to send."""
    if faults.headers_delay_s > 0:
        await asyncio.sleep(faults.headers_delay_s)
    if faults.reset_before_headers:
        _reset_connection(request, state)
        return web.Response()
    if faults.status is not None:
        response = _error(faults.status, f"Demo fault: status {faults.status}.", faults.status)
        if faults.retry_after is not None:
            response.headers["Retry-After"] = str(faults.retry_after)
        return response
    return None


async def _send_json(
    request: web.Request, payload: dict[str, Any], faults: Faults
) -> tuple[web.StreamResponse, bytes | None]:
    """Send a JSON body; return the response and the bytes sent, None when it was cut."""
    state = request.app[DEMO_STATE]
    body = orjson.dumps(payload)
    if faults.reset_after_events is None:
        state.completed += 1
        return _json(payload), body

    # A non-streamed body has no events: send headers and half the body, then reset.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    _reset_connection(request, state)
    return response, None


async def _send_stream(
    request: web.Request, events: list[bytes], faults: Faults
) -> tuple[web.StreamResponse, bytes | None]:
    """Send SSE events then ``[DONE]``, one write per event; return the bytes sent in full.

    Returns None as the bytes when a fault or the client cut the stream.
    """
    config = request.app[DEMO_CONFIG]
    state = request.app[DEMO_STATE]
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    if faults.error_first_event:
        events = [_ERROR_FIRST_EVENT]
    else:
        events = [*events, chunks.DONE_EVENT]

    sent = bytearray()
    try:
        for index, event in enumerate(events):
            if index == faults.reset_after_events:
                _reset_connection(request, state)
                return response, None
            if index == faults.truncate_after_events:
                await response.write_eof()
                return response, None
            if index and config.event_delay_s > 0:
                await asyncio.sleep(config.event_delay_s)
            # StreamResponse.write hands each event to the transport at once and waits
            # only when the write buffer is over its limit (aiohttp 3.14).
            await response.write(event)
            sent += event
        await response.write_eof()
    except ConnectionResetError:
        logger.info("client disconnected during a stream of %s", request.path)
        state.note_client_gone()
        return response, None

    if faults.error_first_event:
        return response, None
    state.completed += 1
    return response, bytes(sent)


async def _completion(request: web.Request, kind: str) -> web.StreamResponse:
    """Serve a chat completion (``kind="chat"``) or a text completion (``"text"``)."""
    config = request.app[DEMO_CONFIG]
    state = request.app[DEMO_STATE]
    parsed = await _read_completion_request(request, config)
    if isinstance(parsed, web.Response):
        return parsed
    raw, body = parsed
    faults = config.take_faults()
    early = await _apply_early_faults(request, faults, state)
    if early is not None:
        return early

    # Build the answer from the prompt.
    prompt = chunks.chat_prompt(body) if kind == "chat" else chunks.text_prompt(body)
    tokens = chunks.answer_tokens(prompt, config.events)
    completion_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())

    # Send it, streamed or whole.
    sent: bytes | None
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if kind == "chat":
            events = chunks.chat_stream_events(
                completion_id, created, config.model, prompt, tokens, include_usage=include_usage
            )
        else:
            events = chunks.text_stream_events(completion_id, created, config.model, tokens)
        response, sent = await _send_stream(request, events, faults)
    else:
        build = chunks.chat_completion if kind == "chat" else chunks.text_completion
        payload = build(completion_id, created, config.model, prompt, tokens)
        response, sent = await _send_json(request, payload, faults)

    if sent is not None:
        state.record_signature(completion_id, config.model, raw, sent)
    return response


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "text")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    config = request.app[DEMO_CONFIG]
    parsed = await _read_completion_request(request, config)
    if isinstance(parsed, web.Response):
        return parsed
    _, body = parsed
    faults = config.take_faults()
    early = await _apply_early_faults(request, faults, request.app[DEMO_STATE])
    if early is not None:
        return early

    raw_input = body.get("input")
    inputs = [raw_input] if isinstance(raw_input, str) else raw_input
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        return _error(400, "'input' must be a string or a list of strings.", "invalid_input")
    as_base64 = body.get("encoding_format") == "base64"
    payload = chunks.embeddings_response(config.model, inputs, as_base64=as_base64)
    response, _ = await _send_json(request, payload, faults)
    return response


async def _models(request: web.Request) -> web.Response:
    model = request.app[DEMO_CONFIG].model
    entry = {"id": model, "object": "model", "created": 0, "owned_by": "e2ee-demo"}
    return _json({"object": "list", "data": [entry]})


async def _health(request: web.Request) -> web.Response:
    if request.app[DEMO_CONFIG].healthy:
        return _json({"status": "ok"})
    return _json({"status": "unhealthy"}, status=503)


def _requested_algos(request: web.Request, config: DemoConfig) -> list[str] | web.Response:
    """Return the algorithms a report or signature request names, or the error to send."""
    algo = request.query.get("signing_algo")
    if algo is None:
        return list(config.signing_algos)
    if algo not in config.signing_algos:
        offered = ", ".join(config.signing_algos)
        message = f"Invalid signing_algo '{algo}': this provider offers {offered}."
        return _error(400, message, "invalid_signing_algo")
    return [algo]


async def _attestation_report(request: web.Request) -> web.Response:
    """Return one model attestation per offered (or requested) algorithm.

    The ed25519 element carries ``signature``: the hex ed25519 signature of the nonce's
    UTF-8 bytes. Without a ``nonce`` parameter a random 32-byte hex nonce is used.
    """
    config = request.app[DEMO_CONFIG]
    model = request.query.get("model", config.model)
    if model != config.model:
        return _error(404, f"The model '{model}' does not exist.", "model_not_found")
    algos = _requested_algos(request, config)
    if isinstance(algos, web.Response):
        return algos
    nonce = request.query.get("nonce") or secrets.token_hex(32)

    keys = config.keys
    attestations: list[dict[str, str]] = []
    for algo in algos:
        element = {
            "model": model,
            "signing_algo": algo,
            "signing_public_key": keys.public_key_hex(algo),
            "nonce": nonce,
        }
        if algo == "ed25519":
            element["signature"] = keys.sign_hex(algo, nonce.encode())
        attestations.append(element)
    return _json({"model_attestations": attestations})


async def _signature(request: web.Request) -> web.Response:
    """Return the signed ``<model>:<request sha256>:<response sha256>`` text of a completion."""
    config = request.app[DEMO_CONFIG]
    chat_id = request.match_info["chat_id"]
    text = request.app[DEMO_STATE].signatures.get(chat_id)
    if text is None:
        return _error(404, f"No completion with id '{chat_id}'.", "chat_not_found")
    algos = _requested_algos(request, config)
    if isinstance(algos, web.Response):
        return algos
    algo = algos[0]
    return _json(
        {
            "text": text,
            "signature": config.keys.sign_hex(algo, text.encode()),
            "signing_public_key": config.keys.public_key_hex(algo),
            "signing_algo": algo,
        }
    )


def create_app(config: DemoConfig) -> web.Application:
    """Build the demo provider app around ``config``, which the caller may change later."""
    # aiohttp's default 1 MiB body limit would answer long conversations and images
    # with 413; the demo takes what the gateway forwards by default (32 MiB) and more.
    app = web.Application(middlewares=[_observe], client_max_size=64 * 1024 * 1024)
    app[DEMO_CONFIG] = config
    app[DEMO_STATE] = DemoState()
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/attestation/report", _attestation_report)
    app.router.add_get("/v1/signature/{chat_id}", _signature)
    app.router.add_get("/health", _health)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """Return a runner with handler cancellation and the config's keep-alive timeout."""
    config = app[DEMO_CONFIG]
    options: dict[str, Any] = {"handler_cancellation": True}
    if config.close_idle_after_s is not None:
        options["keepalive_timeout"] = config.close_idle_after_s
    return web.AppRunner(app, **options)


@dataclass(frozen=True, slots=True)
class DemoServer:
    """A running demo provider: its base URL and app."""

    url: str
    app: web.Application

    @property
    def config(self) -> DemoConfig:
        return self.app[DEMO_CONFIG]

    @property
    def state(self) -> DemoState:
        return self.app[DEMO_STATE]


@asynccontextmanager
async def serve_demo_provider(
    config: DemoConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[DemoServer]:
    """Serve a demo provider on ``host:port`` (0: a free port) until the block exits."""
    app = create_app(config)
    runner = make_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield DemoServer(f"http://{bound_host}:{bound_port}", app)
    finally:
        await runner.cleanup()
