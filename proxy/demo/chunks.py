"""Response bodies and SSE events of the demo provider, built without I/O.

The answer is derived from the prompt only: its words repeated up to the requested number
of tokens. So a test can predict the text, and the concatenated content of a stream
equals the content of the same request without streaming.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import orjson

__all__ = [
    "DONE_EVENT",
    "EMBEDDING_DIMENSIONS",
    "answer_tokens",
    "chat_completion",
    "chat_prompt",
    "chat_stream_events",
    "embeddings_response",
    "error_body",
    "sse_event",
    "text_completion",
    "text_prompt",
    "text_stream_events",
]

DONE_EVENT = b"data: [DONE]\n\n"
EMBEDDING_DIMENSIONS = 8

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def sse_event(payload: dict[str, Any]) -> bytes:
    """Frame one JSON payload as an SSE event: ``data: {json}`` and a blank line."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_body(status: int, message: str, *, code: str | int | None = None) -> bytes:
    """Return an OpenAI-style error envelope for ``status``."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    error_type = _ERROR_TYPES.get(status, default_type)
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return orjson.dumps({"error": error})


def answer_tokens(prompt: str, count: int) -> list[str]:
    """Return ``count`` tokens that repeat the prompt's words; ``demo`` for an empty prompt.

    Every token after the first starts with a space, so ``"".join(tokens)`` is the text.
    """
    words = prompt.split() or ["demo"]
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def chat_prompt(body: dict[str, Any]) -> str:
    """Return the text of the last user message (text parts joined), or ``""``."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            return " ".join(p for p in parts if isinstance(p, str))
        return ""
    return ""


def text_prompt(body: dict[str, Any]) -> str:
    """Return the prompt of a completions request: a string, or the first of a list."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return prompt if isinstance(prompt, str) else ""


def _usage(prompt: str, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(prompt.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    completion_id: str, created: int, model: str, prompt: str, tokens: list[str]
) -> dict[str, Any]:
    """Return a ``chat.completion`` object whose message content is the joined tokens."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens)},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt, len(tokens)),
    }


def chat_stream_events(
    completion_id: str,
    created: int,
    model: str,
    prompt: str,
    tokens: list[str],
    *,
    include_usage: bool,
) -> list[bytes]:
    """Return the SSE events of a chat stream, without the final ``[DONE]``.

    Order: a chunk with the assistant role, one chunk per token, a chunk with
    finish_reason ``stop``, and with ``include_usage`` a chunk with no choices and the
    usage, as OpenAI sends for ``stream_options.include_usage``.
    """

    def chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse_event(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [choice],
            }
        )

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": token}, None) for token in tokens)
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(
            sse_event(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": _usage(prompt, len(tokens)),
                }
            )
        )
    return events


def text_completion(
    completion_id: str, created: int, model: str, prompt: str, tokens: list[str]
) -> dict[str, Any]:
    """Return a ``text_completion`` object whose text is the joined tokens."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "text": "".join(tokens), "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": _usage(prompt, len(tokens)),
    }


def text_stream_events(
    completion_id: str, created: int, model: str, tokens: list[str]
) -> list[bytes]:
    """Return the SSE events of a completions stream: one per token, then ``stop``."""

    def chunk(text: str, finish_reason: str | None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return sse_event(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [choice],
            }
        )

    return [chunk(token, None) for token in tokens] + [chunk("", "stop")]


def _embedding(text: str) -> list[float]:
    # Values in [-1, 1) from the text's SHA-256, so equal inputs give equal vectors.
    digest = hashlib.sha256(text.encode()).digest()
    return [(byte - 128) / 128 for byte in digest[:EMBEDDING_DIMENSIONS]]


def embeddings_response(model: str, inputs: list[str], *, as_base64: bool) -> dict[str, Any]:
    """Return an embeddings list with one deterministic vector per input.

    With ``as_base64`` each vector is little-endian float32 bytes in base64, the
    encoding the ``openai`` Python SDK requests by default.
    """
    data: list[dict[str, Any]] = []
    for index, text in enumerate(inputs):
        vector = _embedding(text)
        encoded: list[float] | str = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(text.split()) for text in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
