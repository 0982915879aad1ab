"""A naive aiohttp pass-through, the reference for what Python proxies usually cost.

It does what the simplest aiohttp proxy of this product would do and nothing more: one
Redis ``HGET`` of the provider entry per request (``X-Model-Pub-Key``), then the request
forwarded with one shared ClientSession and the response relayed read by read. It has no
access log, metrics, retries, timeouts, header filtering or completion records, so the
gateway's cost above it is the price of those features and of its own code.

Run as ``python -m tests.bench.naive --port P --redis-port R``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import aiohttp
import orjson
import redis.asyncio
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
REDIS = web.AppKey("redis", redis.asyncio.Redis)
REDIS_PORT = web.AppKey("redis_port", int)

_FORWARDED = ("Content-Type", "Accept")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    raw = await request.app[REDIS].hget("e2ee:providers", request.headers["X-Model-Pub-Key"])
    if raw is None:
        return web.Response(status=421, text="stale key")
    url = next(iter(orjson.loads(raw)["endpoints"]))
    headers = {name: request.headers[name] for name in _FORWARDED if name in request.headers}
    session = request.app[SESSION]
    async with session.post(url + request.path_qs, data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _clients(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)
    app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    app[REDIS] = redis.asyncio.Redis(host="127.0.0.1", port=app[REDIS_PORT])
    yield
    await app[SESSION].close()
    await app[REDIS].aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Naive aiohttp pass-through for the benchmark.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    args = parser.parse_args(argv)

    app = web.Application()
    app[REDIS_PORT] = args.redis_port
    app.cleanup_ctx.append(_clients)
    app.router.add_post("/{path:.*}", relay)
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
