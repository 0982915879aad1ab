"""Starting and stopping both listeners of one gateway process."""

from __future__ import annotations

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
        await self.admin_runner.cleanup()
        await self.public_runner.cleanup()


async def start_gateway(settings: Settings, *, registry: Registry | None = None) -> RunningGateway:
    """Open the gateway and bind both listeners; port 0 picks a free port.

    ``registry`` injects an already open registry that the caller keeps and closes.
    """
    gateway = Gateway(settings, registry=registry)

    # handler_cancellation: a client that disconnects cancels its handler, which closes
    # the upstream connection; aiohttp leaves it off by default since 3.9.
    public_runner = web.AppRunner(
        create_public_app(gateway), handler_cancellation=True, access_log=None
    )
    await public_runner.setup()
    public_site = web.TCPSite(public_runner, settings.host, settings.port)
    await public_site.start()

    admin_runner = web.AppRunner(create_admin_app(gateway), access_log=None)
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
