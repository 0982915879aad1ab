"""The demo provider over real sockets: completions, stream format, report keys and faults."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.demo.keys import DemoKeys
from proxy.demo.provider import DemoServer, serve_demo_provider
from proxy.demo.state import DemoConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "alpha beta gamma"}]}
HEX = set("0123456789abcdef")


def split_events(raw: bytes) -> list[bytes]:
    """Return the data payloads of an SSE body framed as ``data: ...`` plus a blank line."""
    assert raw.endswith(b"\n\n")
    blocks = raw[:-2].split(b"\n\n")
    assert all(block.startswith(b"data: ") for block in blocks)
    return [block[len(b"data: ") :] for block in blocks]


async def post_chat(
    http: aiohttp.ClientSession, demo: DemoServer, **extra: Any
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(f"{demo.url}/v1/chat/completions", json={**CHAT, **extra}) as response:
        return response.status, dict(response.headers), await response.read()


async def read_until_error(response: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    """Read a body to its end; return the bytes read and the error that cut it, if any."""
    received = bytearray()
    try:
        async for piece in response.content.iter_any():
            received += piece
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        return bytes(received), exc
    return bytes(received), None


# Answers


async def test_chat_stream_format(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    status, headers, raw = await post_chat(http, demo, stream=True)
    events = split_events(raw)
    chunks = [orjson.loads(event) for event in events[:-1]]

    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert events[-1] == b"[DONE]"
    assert len(chunks) == 1 + 8 + 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_chat_stream_content_matches_nonstream(
    http: aiohttp.ClientSession, demo: DemoServer
) -> None:
    _, _, streamed = await post_chat(http, demo, stream=True)
    _, _, whole = await post_chat(http, demo)
    deltas = [orjson.loads(e)["choices"][0]["delta"] for e in split_events(streamed)[:-1]]
    text = "".join(delta.get("content", "") for delta in deltas)

    assert text == orjson.loads(whole)["choices"][0]["message"]["content"]
    assert text == "alpha beta gamma alpha beta gamma alpha beta"


async def test_chat_nonstream_fields(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    status, headers, raw = await post_chat(http, demo)
    body = orjson.loads(raw)

    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "demo-model"
    assert isinstance(body["created"], int)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


async def test_chat_stream_usage_chunk_when_requested(
    http: aiohttp.ClientSession, demo: DemoServer
) -> None:
    _, _, raw = await post_chat(http, demo, stream=True, stream_options={"include_usage": True})
    last = orjson.loads(split_events(raw)[-2])

    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 8


async def test_stream_events_follow_config(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.events = 3
    demo_config.event_delay_s = 0.05
    started = time.monotonic()
    _, _, raw = await post_chat(http, demo, stream=True)
    elapsed = time.monotonic() - started

    assert len(split_events(raw)) == 1 + 3 + 1 + 1
    # Five gaps between six events.
    assert elapsed >= 0.25


async def test_stream_events_arrive_separately(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.event_delay_s = 0.03
    pieces = []
    async with http.post(f"{demo.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        async for piece in r.content.iter_any():
            pieces.append(piece)

    assert len(pieces) == 1 + 8 + 1 + 1
    assert all(piece.startswith(b"data: ") for piece in pieces)
    assert all(piece.endswith(b"\n\n") for piece in pieces)


async def test_completions_stream_and_text(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    request = {"model": "demo-model", "prompt": "one two"}
    async with http.post(f"{demo.url}/v1/completions", json=request) as response:
        whole = orjson.loads(await response.read())
    async with http.post(
        f"{demo.url}/v1/completions", json={**request, "stream": True}
    ) as response:
        events = split_events(await response.read())
    chunks = [orjson.loads(event) for event in events[:-1]]

    assert whole["object"] == "text_completion"
    assert whole["id"].startswith("cmpl-")
    assert whole["choices"][0]["text"] == "one two one two one two one two"
    assert events[-1] == b"[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_embeddings_deterministic_in_both_encodings(
    http: aiohttp.ClientSession, demo: DemoServer
) -> None:
    request = {"model": "demo-model", "input": ["a", "b"]}
    async with http.post(f"{demo.url}/v1/embeddings", json=request) as response:
        floats = orjson.loads(await response.read())
    request["encoding_format"] = "base64"
    async with http.post(f"{demo.url}/v1/embeddings", json=request) as response:
        encoded = orjson.loads(await response.read())
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))

    assert floats["object"] == "list"
    assert len(floats["data"]) == 2
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]
    assert decoded == pytest.approx(floats["data"][0]["embedding"])


async def test_unknown_model_rejected(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    async with http.post(
        f"{demo.url}/v1/chat/completions", json={**CHAT, "model": "other"}
    ) as response:
        body = orjson.loads(await response.read())

    assert response.status == 404
    assert body["error"]["code"] == "model_not_found"


async def test_invalid_json_rejected(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    async with http.post(f"{demo.url}/v1/chat/completions", data=b"{not json") as response:
        body = orjson.loads(await response.read())

    assert response.status == 400
    assert body["error"]["code"] == "invalid_json"


async def test_models_lists_model(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    async with http.get(f"{demo.url}/v1/models") as response:
        body = orjson.loads(await response.read())

    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["demo-model"]


async def test_health_follows_config(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    async with http.get(f"{demo.url}/health") as response:
        healthy = (response.status, orjson.loads(await response.read()))
    demo_config.healthy = False
    async with http.get(f"{demo.url}/health") as response:
        unhealthy_status = response.status

    assert healthy == (200, {"status": "ok"})
    assert unhealthy_status == 503


async def test_state_records_requests(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    headers = {"X-Model-Pub-Key": "ab" * 32, "X-Request-Id": "req-1"}
    async with http.post(f"{demo.url}/v1/chat/completions", json=CHAT, headers=headers) as response:
        await response.read()
    async with http.get(f"{demo.url}/health") as response:
        await response.read()

    assert demo.state.requests["/v1/chat/completions"] == 1
    assert demo.state.requests["/health"] == 1
    assert orjson.loads(demo.state.last_body) == CHAT
    assert demo.state.completed == 1


async def test_state_keeps_last_headers(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    async with http.post(
        f"{demo.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-1"}
    ) as response:
        await response.read()

    assert demo.state.last_headers.get("x-request-id") == "req-1"


# Attestation report and signatures


async def get_report(http: aiohttp.ClientSession, demo: DemoServer, **query: str) -> Any:
    async with http.get(f"{demo.url}/v1/attestation/report", params=query) as response:
        return response.status, orjson.loads(await response.read())


async def test_report_keys_are_valid_hex(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    status, body = await get_report(http, demo, model="demo-model")
    by_algo = {e["signing_algo"]: e["signing_public_key"] for e in body["model_attestations"]}

    assert status == 200
    assert set(by_algo) == {"ed25519", "ecdsa"}
    assert len(by_algo["ed25519"]) == 64
    assert len(by_algo["ecdsa"]) == 128
    assert set(by_algo["ed25519"] + by_algo["ecdsa"]) <= HEX


async def test_report_ecdsa_key_is_curve_point(
    http: aiohttp.ClientSession, demo: DemoServer
) -> None:
    _, body = await get_report(http, demo, signing_algo="ecdsa")
    point = bytes.fromhex("04" + body["model_attestations"][0]["signing_public_key"])
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), point)

    assert key.curve.name == "secp256k1"


async def test_report_signature_verifies(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    _, body = await get_report(http, demo, signing_algo="ed25519", nonce="c0ffee")
    element = body["model_attestations"][0]
    public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(element["signing_public_key"]))

    assert element["nonce"] == "c0ffee"
    public_key.verify(bytes.fromhex(element["signature"]), b"c0ffee")
    with pytest.raises(InvalidSignature):
        public_key.verify(bytes.fromhex(element["signature"]), b"c0ffef")


async def test_report_without_nonce_gets_random_one(
    http: aiohttp.ClientSession, demo: DemoServer
) -> None:
    _, first = await get_report(http, demo, signing_algo="ed25519")
    _, second = await get_report(http, demo, signing_algo="ed25519")

    assert len(first["model_attestations"][0]["nonce"]) == 64
    assert first["model_attestations"][0]["nonce"] != second["model_attestations"][0]["nonce"]


async def test_report_single_algo(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    _, body = await get_report(http, demo, signing_algo="ecdsa")

    assert [e["signing_algo"] for e in body["model_attestations"]] == ["ecdsa"]
    assert "signature" not in body["model_attestations"][0]


async def test_report_rejects_unknown_algo(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    status, body = await get_report(http, demo, signing_algo="rsa")

    assert status == 400
    assert body["error"]["code"] == "invalid_signing_algo"


async def test_report_rejects_other_model(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    status, body = await get_report(http, demo, model="other")

    assert status == 404
    assert body["error"]["code"] == "model_not_found"


async def test_report_rejects_algo_not_offered(http: aiohttp.ClientSession) -> None:
    async with serve_demo_provider(DemoConfig(signing_algos=("ed25519",))) as demo:
        status, _ = await get_report(http, demo, signing_algo="ecdsa")
        _, body = await get_report(http, demo)

    assert status == 400
    assert [e["signing_algo"] for e in body["model_attestations"]] == ["ed25519"]


async def test_rotate_keys_changes_report(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    _, before = await get_report(http, demo, signing_algo="ed25519")
    new_keys = demo_config.rotate_keys()
    _, after = await get_report(http, demo, signing_algo="ed25519")
    key_after = after["model_attestations"][0]["signing_public_key"]

    assert key_after != before["model_attestations"][0]["signing_public_key"]
    assert key_after == new_keys.public_key_hex("ed25519")


def test_same_seed_gives_same_keys() -> None:
    first, second = DemoKeys.from_seed(b"replica"), DemoKeys.from_seed(b"replica")
    other = DemoKeys.from_seed(b"other")

    assert first.public_key_hex("ed25519") == second.public_key_hex("ed25519")
    assert first.public_key_hex("ecdsa") == second.public_key_hex("ecdsa")
    assert other.public_key_hex("ed25519") != first.public_key_hex("ed25519")


async def test_signature_covers_exact_bytes(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    request_body = orjson.dumps({**CHAT, "stream": True})
    async with http.post(f"{demo.url}/v1/chat/completions", data=request_body) as response:
        received = await response.read()
    chat_id = orjson.loads(split_events(received)[0])["id"]
    async with http.get(
        f"{demo.url}/v1/signature/{chat_id}", params={"signing_algo": "ecdsa"}
    ) as response:
        signed = orjson.loads(await response.read())
    request_hash = hashlib.sha256(request_body).hexdigest()
    expected = f"demo-model:{request_hash}:{hashlib.sha256(received).hexdigest()}"
    point = bytes.fromhex("04" + signed["signing_public_key"])
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), point)

    assert signed["text"] == expected
    key.verify(bytes.fromhex(signed["signature"]), expected.encode(), ec.ECDSA(hashes.SHA256()))


async def test_signature_unknown_id_not_found(
    http: aiohttp.ClientSession, demo: DemoServer
) -> None:
    async with http.get(f"{demo.url}/v1/signature/chatcmpl-unknown") as response:
        body = orjson.loads(await response.read())

    assert response.status == 404
    assert body["error"]["code"] == "chat_not_found"


# Faults


async def test_status_fault_with_retry_after(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.status = 429
    demo_config.retry_after = 7
    status, headers, raw = await post_chat(http, demo, stream=True)
    error = orjson.loads(raw)["error"]

    assert status == 429
    assert headers["Retry-After"] == "7"
    assert error["type"] == "rate_limit_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_fail_next_limits_fault(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.status = 500
    demo_config.fail_next = 2
    statuses = [(await post_chat(http, demo))[0] for _ in range(3)]

    assert statuses == [500, 500, 200]
    assert demo_config.fail_next == 0


async def test_clear_faults_restores_answers(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.status = 503
    demo_config.error_first_event = True
    demo_config.clear_faults()
    status, _, _ = await post_chat(http, demo)

    assert status == 200
    assert demo_config.status is None


async def test_headers_delay_fault(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.headers_delay_s = 0.3
    started = time.monotonic()
    async with http.post(f"{demo.url}/v1/chat/completions", json=CHAT) as response:
        headers_after = time.monotonic() - started
        await response.read()

    assert response.status == 200
    assert headers_after >= 0.3


async def test_reset_before_headers_fault(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.reset_before_headers = True
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await post_chat(http, demo, stream=True)

    assert demo.state.resets == 1


async def test_reset_after_events_fault(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.reset_after_events = 3
    demo_config.event_delay_s = 0.02
    async with http.post(f"{demo.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        received, error = await read_until_error(r)

    assert r.status == 200
    assert error is not None
    assert received.count(b"\n\n") == 3
    assert b"[DONE]" not in received
    assert demo.state.resets == 1


async def test_reset_fault_cuts_nonstream_body(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.reset_after_events = 0
    async with http.post(f"{demo.url}/v1/chat/completions", json=CHAT) as response:
        received, error = await read_until_error(response)

    assert response.status == 200
    assert error is not None
    assert len(received) < int(response.headers["Content-Length"])


async def test_truncate_fault_ends_without_done(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.truncate_after_events = 4
    status, _, raw = await post_chat(http, demo, stream=True)
    events = split_events(raw)

    assert status == 200
    assert len(events) == 4
    assert b"[DONE]" not in events


async def test_error_first_event_fault(
    http: aiohttp.ClientSession, demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.error_first_event = True
    status, headers, raw = await post_chat(http, demo, stream=True)
    events = split_events(raw)

    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert len(events) == 1
    assert orjson.loads(events[0])["error"]["code"] == 503


async def test_invalid_fault_rejected() -> None:
    with pytest.raises(ValueError, match="status"):
        DemoConfig(status=200)


async def test_close_idle_after_closes_connection(http: aiohttp.ClientSession) -> None:
    async with serve_demo_provider(DemoConfig(close_idle_after_s=0.1)) as demo:
        for _ in range(2):
            async with http.get(f"{demo.url}/health") as response:
                await response.read()
            await asyncio.sleep(0.3)

    assert len(demo.state.peers) == 2


async def test_keepalive_reuses_connection(http: aiohttp.ClientSession, demo: DemoServer) -> None:
    for _ in range(2):
        async with http.get(f"{demo.url}/health") as response:
            await response.read()

    assert len(demo.state.peers) == 1


# Client disconnects


async def test_client_gone_mid_stream_recorded(demo: DemoServer, demo_config: DemoConfig) -> None:
    demo_config.event_delay_s = 0.05
    demo_config.events = 100
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{demo.url}/v1/chat/completions", json={**CHAT, "stream": True}
        )
        await response.content.readuntil(b"\n\n")
        response.close()

    await asyncio.wait_for(demo.state.client_gone.wait(), timeout=1.0)
    assert demo.state.disconnects == 1
    assert demo.state.completed == 0


async def test_client_gone_before_headers_recorded(
    demo: DemoServer, demo_config: DemoConfig
) -> None:
    demo_config.headers_delay_s = 5.0
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            await session.post(
                f"{demo.url}/v1/chat/completions",
                json=CHAT,
                timeout=aiohttp.ClientTimeout(total=0.2),
            )

    await asyncio.wait_for(demo.state.client_gone.wait(), timeout=1.0)
    assert demo.state.disconnects == 1


# Command line


async def test_command_serves_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.demo",
        "--port",
        "0",
        "--key-seed",
        "cli-test",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        ed25519 = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        url = first.decode().split()[-1]
        async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
            status = response.status
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), timeout=10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert url.startswith("http://127.0.0.1:")
    assert ed25519.decode().split()[-1] == DemoKeys.from_seed(b"cli-test").public_key_hex("ed25519")
    assert status == 200
    assert returncode == 0
