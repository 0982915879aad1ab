"""Starting and stopping both listeners of one gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.app import GATEWAY, Gateway, cancel_and_wait, create_admin_app, create_public_app
from proxy.config import Settings, describe
from proxy.logs import HttpServerLogger
from proxy.metrics import (
    ComputedSources,
    Metrics,
    refresh_provider_gauges_forever,
    sample_sources_forever,
)
from registry import Registry, redact_url

__all__ = ["RunningGateway", "start_gateway"]

logger = logging.getLogger(__name__)

PROVIDER_GAUGES_INTERVAL_S = 5.0
"""Default period of the live provider and key gauges' refresh from the registry."""

DRAIN_PROGRESS_INTERVAL_S = 5.0
"""While requests finish after SIGTERM, one progress line is logged this often."""

_SERVER_OPTIONS: dict[str, Any] = {
    # Request bodies are relayed byte for byte: a Content-Encoding the client sent
    # must still describe the bytes the provider receives, so aiohttp must not
    # decompress them (a compressed body then has no readable model: 400).
    "auto_decompress": False,
    # Requests that aiohttp's parser rejects are logged in one line, not a traceback.
    "logger": HttpServerLogger(),
    # After an early response such as 413, aiohttp reads and discards the unread body for
    # lingering_time (10 s by default) before it closes the connection.
    "lingering_time": 0.5,
}
# Listen backlog: aiohttp's default of 128 overflows when hundreds of clients connect
# at once, and the kernel then drops SYNs that the clients resend only after 1 s.
_LISTEN_BACKLOG = 1024


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

        # 1. Readiness off: /readyz returns 503 so that load balancers stop sending.
        gateway.draining = True
        logger.info(
            "draining: /readyz is 503, serving normally for %.1f s (GATEWAY_DRAIN_DELAY_S)",
            settings.drain_delay_s,
        )

        # 2. Keep serving while the load balancers notice.
        await asyncio.sleep(settings.drain_delay_s)

        # 3. Stop accepting connections and close idle keep-alive ones; busy ones close
        #    after their response, which carries Connection: close if not yet sent. A
        #    request that races the close still gets 503 shutting_down.
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
                await _wait_idle_logging_progress(gateway)
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
        if connection in busy or _is_writing(connection):
            connection.close()
        else:
            connection.force_close()


def _is_writing(connection: web.RequestHandler) -> bool:
    # A Response body is written after the middlewares have returned, so the request
    # has left ``busy`` while its bytes may still wait in the transport's buffer.
    transport = connection.transport
    return transport is not None and transport.get_write_buffer_size() > 0


async def _wait_idle_logging_progress(gateway: Gateway) -> None:
    """Return when no request is in flight, logging the count every few seconds."""
    while True:
        try:
            async with asyncio.timeout(DRAIN_PROGRESS_INTERVAL_S):
                await gateway.idle.wait()
        except TimeoutError:
            logger.info(
                "draining: %d request(s) still in flight, %d of them streams",
                gateway.requests_in_flight,
                gateway.forwarder.streams_in_flight,
            )
        else:
            return


async def start_gateway(
    settings: Settings,
    *,
    registry: Registry | None = None,
    provider_gauges_interval_s: float = PROVIDER_GAUGES_INTERVAL_S,
    metrics: Metrics | None = None,
    reuse_port: bool = False,
) -> RunningGateway:
    """Open the gateway and bind both listeners; port 0 picks a free port.

    ``registry`` injects an already open registry that the caller keeps and closes.
    ``provider_gauges_interval_s`` is the period of the live provider gauges' refresh.
    ``metrics`` replaces the default single-process Metrics (a worker passes multiprocess
    ones). ``reuse_port`` sets SO_REUSEPORT on both listeners, so that the workers of
    ``proxy.workers`` share the ports.
    """
    logger.info(
        "starting with %s", _settings_line(settings), extra={"settings": _loggable(settings)}
    )
    gateway = Gateway(settings, registry=registry, metrics=metrics)
    public_app = create_public_app(gateway)
    _add_telemetry(public_app, provider_gauges_interval_s)
    public_app.on_response_prepare.append(_close_after_drain_delay)

    # handler_cancellation: a client that disconnects cancels its handler, which closes
    # the upstream connection; aiohttp leaves it off by default since 3.9.
    # shutdown_timeout: drain_and_stop() has already waited for requests in flight,
    # so cleanup() gives the rest one second before cancelling them.
    public_runner = web.AppRunner(
        public_app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
        **_SERVER_OPTIONS,
    )
    await public_runner.setup()
    public_site = web.TCPSite(
        public_runner,
        settings.host,
        settings.port,
        backlog=_LISTEN_BACKLOG,
        reuse_port=reuse_port,
    )
    try:
        await public_site.start()
    except OSError:
        await public_runner.cleanup()  # closes the registry and session it opened
        raise

    admin_runner = web.AppRunner(
        create_admin_app(gateway), access_log=None, shutdown_timeout=1.0, **_SERVER_OPTIONS
    )
    await admin_runner.setup()
    admin_site = web.TCPSite(
        admin_runner, settings.admin_host, settings.admin_port, reuse_port=reuse_port
    )
    try:
        await admin_site.start()
    except OSError:
        await admin_runner.cleanup()
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


def _add_telemetry(app: web.Application, gauges_interval_s: float) -> None:
    """Connect the computed metrics to the gateway once its cleanup_ctx has opened it."""

    async def telemetry(app: web.Application) -> AsyncIterator[None]:
        gateway = app[GATEWAY]
        metrics = gateway.metrics
        sources = ComputedSources(
            streams_in_flight=lambda: gateway.forwarder.streams_in_flight,
            draining=lambda: gateway.draining,
            # Backends without a ``stats`` attribute export nothing here.
            registry_stats=lambda: getattr(gateway.registry, "stats", None),
        )
        metrics.connect_sources(sources)
        refresher = asyncio.create_task(
            refresh_provider_gauges_forever(metrics, lambda: gateway.registry, gauges_interval_s),
            name="provider-gauges",
        )
        sampler = None
        if metrics.multiprocess_dir is not None:
            sampler = asyncio.create_task(sample_sources_forever(metrics), name="metrics-sampler")
        yield
        await cancel_and_wait(refresher, "gateway closing")
        if sampler is not None:
            await cancel_and_wait(sampler, "gateway closing")
            # Registry counts gained since the last sample would be lost with this worker.
            metrics.sample_sources()

    app.cleanup_ctx.append(telemetry)


async def _close_after_drain_delay(request: web.Request, response: web.StreamResponse) -> None:
    # Once the drain delay is over, every response carries Connection: close, so the
    # client (or the load balancer) sends its next request on a new connection, which
    # reaches another replica.
    if request.app[GATEWAY].refusing_requests:
        response.headers["Connection"] = "close"
        response.force_close()


def _loggable(settings: Settings) -> dict[str, Any]:
    """Return the effective settings as JSON-friendly values, the registry URL redacted.

    Token and key files appear by path only: their contents are never read here.
    """
    values: dict[str, Any] = {}
    for name, value in describe(settings).items():
        if name == "registry_url":
            value = redact_url(value)
        elif isinstance(value, tuple):
            value = [str(item) for item in value]
        elif isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            value = str(value)
        values[name] = value
    return values


def _settings_line(settings: Settings) -> str:
    parts = []
    for name, value in _loggable(settings).items():
        shown = ",".join(value) if isinstance(value, list) else value
        parts.append(f"{name}={shown}")
    return " ".join(parts)
