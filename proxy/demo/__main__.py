"""The ``e2ee-demo-provider`` command: serve a demo provider until SIGTERM or SIGINT.

At start it prints its URL and full public keys to stdout, because a client needs a key
for ``X-Model-Pub-Key`` and public keys are not secret. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.demo.keys import SIGNING_ALGOS, DemoKeys
from proxy.demo.provider import create_app, make_runner
from proxy.demo.state import DemoConfig

logger = logging.getLogger("proxy.demo")


def _algos(value: str) -> tuple[str, ...]:
    algos = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [algo for algo in algos if algo not in SIGNING_ALGOS]
    if unknown or not algos:
        raise argparse.ArgumentTypeError(
            f"invalid --signing-algo {value!r}: use a comma-separated subset of "
            + ",".join(SIGNING_ALGOS)
        )
    return algos


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2ee-demo-provider",
        description="Serve a demo OpenAI-compatible provider with an attestation report.",
    )

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    parser.add_argument("--model", default="demo-model", help="the one model it serves")
    parser.add_argument(
        "--signing-algo",
        type=_algos,
        default=SIGNING_ALGOS,
        metavar="ALGOS",
        help="comma-separated signing algorithms to offer (default: ed25519,ecdsa)",
    )
    parser.add_argument(
        "--key-seed",
        default=None,
        help="derive the keys from this string, so replicas given one seed share keys "
        "(default: random keys)",
    )
    parser.add_argument("--events", type=int, default=8, help="content events per stream")
    parser.add_argument(
        "--event-delay-s", type=float, default=0.0, help="seconds between stream events"
    )
    parser.add_argument(
        "--close-idle-after-s",
        type=float,
        default=None,
        help="close idle keep-alive connections after this many seconds (default: aiohttp's)",
    )
    parser.add_argument(
        "--unhealthy", action="store_true", help="start with GET /health returning 503"
    )

    faults = parser.add_argument_group("faults (applied to completion requests)")
    faults.add_argument("--status", type=int, default=None, help="respond with this status")
    faults.add_argument(
        "--retry-after", type=int, default=None, help="Retry-After seconds sent with --status"
    )
    faults.add_argument(
        "--headers-delay-s", type=float, default=0.0, help="sleep before sending headers"
    )
    faults.add_argument(
        "--reset-before-headers", action="store_true", help="reset the connection at once"
    )
    faults.add_argument(
        "--reset-after-events",
        type=int,
        default=None,
        metavar="N",
        help="reset the connection after N stream events",
    )
    faults.add_argument(
        "--truncate-after-events",
        type=int,
        default=None,
        metavar="N",
        help="end streams after N events without [DONE]",
    )
    faults.add_argument(
        "--error-first-event",
        action="store_true",
        help="respond to streams with 200 and an error object as the first event",
    )
    faults.add_argument(
        "--fail-next",
        type=int,
        default=None,
        metavar="N",
        help="apply the faults to the next N requests only (default: to every request)",
    )
    return parser


def _config(args: argparse.Namespace) -> DemoConfig:
    keys = DemoKeys.from_seed(args.key_seed.encode()) if args.key_seed else DemoKeys.generate()
    return DemoConfig(
        model=args.model,
        signing_algos=args.signing_algo,
        keys=keys,
        events=args.events,
        event_delay_s=args.event_delay_s,
        healthy=not args.unhealthy,
        status=args.status,
        retry_after=args.retry_after,
        headers_delay_s=args.headers_delay_s,
        reset_before_headers=args.reset_before_headers,
        reset_after_events=args.reset_after_events,
        truncate_after_events=args.truncate_after_events,
        error_first_event=args.error_first_event,
        fail_next=args.fail_next,
        close_idle_after_s=args.close_idle_after_s,
    )


async def _serve(config: DemoConfig, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then close the listener and the open connections."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    runner = make_runner(create_app(config))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"demo provider for model {config.model} at http://{bound_host}:{bound_port}")
        for algo in config.signing_algos:
            print(f"{algo} public key: {config.keys.public_key_hex(algo)}")
        sys.stdout.flush()
        logger.info("demo provider started on %s:%s", bound_host, bound_port)
        await stop.wait()
        logger.info("demo provider stopping")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo provider; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"e2ee-demo-provider: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
