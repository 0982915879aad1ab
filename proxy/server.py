"""Starting and stopping both listeners of one gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiohttp import web

from proxy.app import Gateway, create_admin_app, create_public_app
from proxy.config import Settings
from registry import Registry

__all__ = ["RunningGateway", "start_gateway"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunningGateway:
    """A started gateway: its state, both runners and the ports they listen on."""

    gateway: Gateway
    public_runner: web.AppRunner
    admin_runner: web.AppRunner
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://{self.gateway.settings.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.gateway.settings.admin_host}:{self.admin_port}"

    async def stop(self) -> None:
        """Close both listeners at once; requests still running get one second."""
        await self.admin_runner.cleanup()
        await self.public_runner.cleanup()

    async def drain_and_stop(self) -> None:
        """Shut down without breaking requests in flight, then close everything.

        Cancel this coroutine (a second SIGTERM or SIGINT) to skip the waiting; the
        listeners are still closed by the caller's ``stop()``.
        """
        gateway = self.gateway
        settings = gateway.settings

        # 1. Readiness off: /readyz answers 503 so that load balancers stop sending.
        gateway.draining = True
        logger.info(
            "draining: /readyz is 503, serving normally for %.1f s (GATEWAY_DRAIN_DELAY_S)",
            settings.drain_delay_s,
        )

        # 2. Keep serving while the load balancers notice.
        await asyncio.sleep(settings.drain_delay_s)

        # 3. Stop accepting connections and close idle keep-alive ones. A request that
        #    still arrives on an open connection gets 503 shutting_down.
        gateway.refusing_requests = True
        for runner in (self.public_runner, self.admin_runner):
            for site in list(runner.sites):
                await site.stop()
            if runner.server is not None:
                _close_idle_connections(runner.server, gateway.busy_connections)
        in_flight = gateway.requests_in_flight
        streams = gateway.forwarder.streams_in_flight
        logger.info(
            "stopped accepting connections; waiting up to %.1f s for %d request(s), "
            "%d of them streams (GATEWAY_SHUTDOWN_GRACE_S)",
            settings.shutdown_grace_s,
            in_flight,
            streams,
        )

        # 4. Let requests in flight finish, up to the grace period.
        try:
            async with asyncio.timeout(settings.shutdown_grace_s):
                await gateway.idle.wait()
        except TimeoutError:
            # 5. End the streams still open with the shutting_down error event.
            aborted = gateway.forwarder.abort_streams()
            logger.warning(
                "shutdown grace period over: ended %d stream(s) with a shutting_down event, "
                "%d request(s) still running",
                aborted,
                gateway.requests_in_flight - aborted,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await gateway.idle.wait()
        else:
            logger.info("all %d request(s) in flight finished", in_flight)


def _close_idle_connections(server: web.Server, busy: set[asyncio.BaseProtocol]) -> None:
    """Close idle keep-alive connections now and busy ones after their current response.

    aiohttp's own ``Server.pre_shutdown()`` is not used: it leaves an idle connection
    open but unread until ``shutdown()``, so a request sent on it would hang.
    """
    for connection in server.connections:
        if connection in busy:
            connection.close()
        else:
            connection.force_close()


async def start_gateway(settings: Settings, *, registry: Registry | None = None) -> RunningGateway:
    """Open the gateway and bind both listeners; port 0 picks a free port.

    ``registry`` injects an already open registry that the caller keeps and closes.
    """
    gateway = Gateway(settings, registry=registry)

    # handler_cancellation: a client that disconnects cancels its handler, which closes
    # the upstream connection; aiohttp leaves it off by default since 3.9.
    # shutdown_timeout: drain_and_stop() has already waited for requests in flight,
    # so cleanup() gives the rest one second before cancelling them.
    public_runner = web.AppRunner(
        create_public_app(gateway),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await public_runner.setup()
    public_site = web.TCPSite(public_runner, settings.host, settings.port)
    await public_site.start()

    admin_runner = web.AppRunner(create_admin_app(gateway), access_log=None, shutdown_timeout=1.0)
    await admin_runner.setup()
    admin_site = web.TCPSite(admin_runner, settings.admin_host, settings.admin_port)
    try:
        await admin_site.start()
    except OSError:
        await public_runner.cleanup()
        raise

    port = _bound_port(public_runner)
    admin_port = _bound_port(admin_runner)
    logger.info(
        "listening: public %s:%d, admin %s:%d",
        settings.host,
        port,
        settings.admin_host,
        admin_port,
    )
    return RunningGateway(gateway, public_runner, admin_runner, port, admin_port)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the listener has no TCP address")
