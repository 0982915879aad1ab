"""nginx with deploy/nginx.conf in front of two replicas: unbuffered streams, a drain."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time

import aiohttp
import orjson
from deploy_harness import (
    DONE,
    MODEL,
    ClusterStarter,
    LoadBalancerStarter,
    LoadResult,
    Replica,
    poll_until,
    stream_once,
)

EVENTS = 10
EVENT_DELAY_S = 0.1
DRAIN_DELAY_S = 1.0
FAIL_TIMEOUT_S = 10.0


async def timed_stream(http: aiohttp.ClientSession, url: str) -> tuple[list[float], bytes]:
    """Stream one completion; return the arrival time of each event and the whole body."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    arrivals: list[float] = []
    received = b""
    async with http.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            now = time.monotonic()
            received += chunk
            arrivals += [now] * (received.count(b"\n\n") - len(arrivals))
    return arrivals, received


async def test_nginx_relays_events_unbuffered(
    start_cluster: ClusterStarter, start_nginx: LoadBalancerStarter, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(events=EVENTS, event_delay_s=EVENT_DELAY_S)
    _, url = await start_nginx(cluster)

    arrivals, body = await timed_stream(http, url)
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]

    assert body.endswith(DONE)
    # The content events and [DONE]; the demo provider may send a final chunk too.
    assert len(arrivals) >= EVENTS + 1
    # A buffering proxy would deliver the events together at the end.
    assert arrivals[EVENTS - 1] - arrivals[0] >= (EVENTS - 1) * EVENT_DELAY_S * 0.7
    assert sorted(gaps)[len(gaps) // 2] >= EVENT_DELAY_S * 0.5


async def send_marked(http: aiohttp.ClientSession, url: str, request_id: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(
        url + "/v1/chat/completions",
        data=orjson.dumps(body),
        headers={"X-Request-Id": request_id},
    ) as response:
        await response.read()
        return response.status


async def streams_in_flight(replica: Replica, http: aiohttp.ClientSession) -> float:
    return await replica.metric(http, "e2ee_gateway_streams_in_flight")


async def test_nginx_drain_moves_new_requests(
    start_cluster: ClusterStarter, start_nginx: LoadBalancerStarter, http: aiohttp.ClientSession
) -> None:
    # Streams of 2.5 s outlast the 1 s drain delay, so they finish during the grace period.
    cluster = await start_cluster(events=25, event_delay_s=EVENT_DELAY_S)
    nginx, url = await start_nginx(cluster)
    draining, other = cluster.replicas
    result = LoadResult()
    async with aiohttp.ClientSession() as clients:
        streams = [asyncio.create_task(stream_once(clients, url, result)) for _ in range(4)]

        async def both_streaming() -> bool:
            counts = [await streams_in_flight(replica, http) for replica in cluster.replicas]
            return min(counts) >= 1

        await poll_until(both_streaming, timeout_s=5)

        # Stop one replica; once its drain delay is over it accepts no connection.
        draining.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(DRAIN_DELAY_S + 0.3)
        after_delay = [await send_marked(clients, url, f"after-drain-{i}") for i in range(10)]
        await asyncio.gather(*streams)
        exit_code = await draining.process.wait_exit(10)
        drained_in_s = time.monotonic() - signalled

        # Bring it back; nginx tries it again once fail_timeout has passed.
        await draining.start(http)
        restarted = time.monotonic()
        back_statuses: list[int] = []

        async def rejoined() -> bool:
            back_statuses.append(await send_marked(clients, url, f"rejoin-{len(back_statuses)}"))
            served = await draining.metric(
                http,
                "e2ee_gateway_requests_total",
                route="chat_completions",
                status="200",
                outcome="ok",
            )
            return served > 0

        await poll_until(rejoined, timeout_s=FAIL_TIMEOUT_S + 5, interval_s=0.2)
        rejoin_s = time.monotonic() - restarted

    access_log = (cluster.directory / "nginx" / "access.log").read_text()
    retried = len(re.findall(r"upstream=\S+, \S+", access_log))
    print(
        f"\nnginx drain: {result.summary()}; after the delay {after_delay.count(200)}/10 "
        f"answered 200, {retried} request(s) tried a second replica, replica drained in "
        f"{drained_in_s:.1f} s, used again {rejoin_s:.1f} s after its restart"
    )
    assert result.completed == 4
    assert result.failed == 0
    assert after_delay == [200] * 10
    assert exit_code == 0
    assert "after-drain-" not in draining.process.log()
    assert other.process.log().count("request_id=after-drain-") == 10
    assert set(back_statuses) <= {200}
    assert nginx.running
