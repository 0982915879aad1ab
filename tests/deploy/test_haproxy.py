"""HAProxy with deploy/haproxy.cfg in front of two replicas: a rolling restart under load."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
from deploy_harness import (
    ClusterStarter,
    LoadBalancerStarter,
    LoadResult,
    Replica,
    poll_until,
    run_load,
)

SERVED_OK = {"route": "chat_completions", "status": "200", "outcome": "ok"}
CLIENTS = 6


async def wait_serving(replica: Replica, http: aiohttp.ClientSession, timeout_s: float) -> None:
    """Wait until the load balancer sends the replica streams that it completes."""

    async def served() -> bool:
        return await replica.metric(http, "e2ee_gateway_requests_total", **SERVED_OK) > 0

    await poll_until(served, timeout_s=timeout_s)


async def test_rolling_restart_loses_no_stream(
    start_cluster: ClusterStarter,
    start_haproxy: LoadBalancerStarter,
    http: aiohttp.ClientSession,
) -> None:
    # Replica 1 logs JSON and replica 2 text, so that both formats run a whole roll.
    cluster = await start_cluster(events=10, event_delay_s=0.1, log_formats=("json", "text"))
    haproxy, url = await start_haproxy(cluster)
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as clients:
        load = asyncio.create_task(run_load(clients, url, CLIENTS, stop))

        # Both replicas serve before the roll begins.
        for replica in cluster.replicas:
            await wait_serving(replica, http, timeout_s=5)

        # Roll: stop one replica, start it again on the same ports, wait until HAProxy
        # sends it streams, then the other.
        exit_codes = []
        for replica in cluster.replicas:
            replica.process.send_signal(signal.SIGTERM)
            exit_codes.append(await replica.process.wait_exit(15))
            await replica.start(http)
            await wait_serving(replica, http, timeout_s=5)
        stop.set()
        result: LoadResult = await load

    print(f"\nrolling restart behind HAProxy with {CLIENTS} clients: {result.summary()}")
    assert exit_codes == [0, 0]
    assert result.started > 30
    assert result.failed == 0, result.failures[:5]
    assert result.completed == result.started
    assert not [status for status in result.statuses if status >= 500]
    logs = [replica.process.log() for replica in cluster.replicas]
    for secret in cluster.secrets.values():
        assert all(secret not in log for log in logs)
    assert all(orjson.loads(line) for line in logs[0].splitlines())
    assert logs[0].count('"message":"stopped"') == 1
    assert logs[1].count(": stopped\n") == 1
    # HAProxy took each replica out because /readyz returned 503, not after a refused connect.
    for server in ("gateway1", "gateway2"):
        marked_down = f"e2ee_gateways/{server} is DOWN, reason: Layer7 wrong status, code: 503"
        assert marked_down in haproxy.log()
