"""Prometheus metrics of one gateway process, kept in a registry owned by the app.

Label values are bounded: routes are the fixed route names, outcomes a fixed set of
words, statuses HTTP codes, and models either a model that had a live provider while
this process ran or ``other``. No label ever contains a public key, a request id, a model
name chosen by a client or a URL with credentials.

Three families are computed rather than counted in place: the streams in flight
(``Gauge.set_function`` on the forwarder), the live providers and keys per model
(refreshed from the registry by ``refresh_provider_gauges_forever``), and the registry's
own counters (``export_registry_stats``, for backends that keep a stats dataclass).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from registry import Registry, RegistryUnavailable

__all__ = [
    "OTHER_MODEL",
    "Metrics",
    "RegistryStatsCollector",
    "refresh_provider_gauges",
    "refresh_provider_gauges_forever",
]

logger = logging.getLogger(__name__)

OTHER_MODEL = "other"
"""Label value for every model that has had no live provider in this process."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Streams last from under a second to many minutes for long generations.
_STREAM_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The gateway's metric families, registered in their own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, int, str], Counter] = {}
        self.live_models: frozenset[str] = frozenset()
        """Models with a live provider at the last refresh; other names fold to ``other``."""

        self.requests = Counter(
            "e2ee_gateway_requests",
            "Client requests by route, HTTP status and outcome.",
            ["route", "status", "outcome"],
            registry=self.registry,
        )
        self.model_requests = Counter(
            "e2ee_gateway_model_requests",
            "Routed client requests by model (registered models only, else 'other') and outcome.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.upstream_attempts = Counter(
            "e2ee_gateway_upstream_attempts",
            "Attempts to reach a provider, by result (ok or the failure reason class).",
            ["result"],
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "e2ee_gateway_upstream_retries",
            "Requests sent again after a failed attempt, by the failure that caused it; "
            "stale_connection is the free retry that replaces a pooled connection.",
            ["reason"],
            registry=self.registry,
        )
        self.stream_failures = Counter(
            "e2ee_gateway_stream_failures",
            "Streams that ended with the gateway's error event, by code.",
            ["code"],
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "e2ee_gateway_heartbeats",
            "Heartbeats received on the admin listener, by result.",
            ["result"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "e2ee_gateway_requests_in_flight",
            "Requests being served on both listeners, health probes and /metrics excluded.",
            registry=self.registry,
        )
        self.streams_in_flight = Gauge(
            "e2ee_gateway_streams_in_flight",
            "SSE streams being relayed to clients.",
            registry=self.registry,
        )
        self.draining = Gauge(
            "e2ee_gateway_draining",
            "1 from the shutdown signal on (/readyz answers 503), else 0.",
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "e2ee_gateway_time_to_first_byte_seconds",
            "Time from a routed request's arrival to its first byte sent to the client.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stream_duration = Histogram(
            "e2ee_gateway_stream_duration_seconds",
            "Time from a streamed request's arrival to the end of its stream, any outcome.",
            buckets=_STREAM_BUCKETS,
            registry=self.registry,
        )
        self.completion_records = Counter(
            "e2ee_gateway_completion_records",
            "Completion id to provider records written for signature fetches, by result.",
            ["result"],
            registry=self.registry,
        )
        self.registry_errors = Counter(
            "e2ee_gateway_registry_errors",
            "Registry calls that failed because the registry was unreachable.",
            registry=self.registry,
        )
        self.live_providers = Gauge(
            "e2ee_gateway_live_providers",
            "Live provider endpoints per registered model, at the last refresh.",
            ["model"],
            registry=self.registry,
        )
        self.live_keys = Gauge(
            "e2ee_gateway_live_keys",
            "Public keys with at least one live endpoint per registered model.",
            ["model"],
            registry=self.registry,
        )

    def model_label(self, model: str | None, *, routed: bool) -> str:
        """Return the label value for a client's model string.

        ``routed`` means that a provider of the model was found for this request, which
        proves the model is registered even before the next gauge refresh.
        """
        if model is not None and (routed or model in self.live_models):
            return model
        return OTHER_MODEL

    def record_request(
        self,
        *,
        route: str,
        status: int,
        outcome: str,
        model: str | None,
        routed: bool,
        duration_s: float,
        ttft_s: float | None,
        stream_failure: str | None,
    ) -> None:
        """Count one finished request; ``ttft_s`` is set only for relayed streams."""
        # Label children are cached: labels() validates and locks on every call, and
        # this runs once per request. The label values are bounded, so is the cache.
        key = (route, status, outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, str(status), outcome)
        child.inc()
        if model is not None:
            self.model_requests.labels(self.model_label(model, routed=routed), outcome).inc()
        if ttft_s is not None:
            self.time_to_first_byte.observe(ttft_s)
            self.stream_duration.observe(duration_s)
        if stream_failure is not None:
            self.stream_failures.labels(stream_failure).inc()

    def set_live_providers(self, counts: dict[str, tuple[int, int]]) -> None:
        """Replace the per-model gauges with ``{model: (keys, endpoints)}``.

        Models absent from ``counts`` lose their series, so a model whose providers all
        left does not keep one for the life of the process.
        """
        for model in self.live_models - counts.keys():
            self.live_keys.remove(model)
            self.live_providers.remove(model)
        for model, (keys, endpoints) in counts.items():
            self.live_keys.labels(model).set(keys)
            self.live_providers.labels(model).set(endpoints)
        self.live_models = frozenset(counts)

    def export_registry_stats(self, source: Callable[[], object | None]) -> None:
        """Export the counters of the stats dataclass that ``source`` returns at each scrape."""
        self.registry.register(RegistryStatsCollector(source))


class RegistryStatsCollector(Collector):
    """Exports the integer fields of a registry's stats dataclass as counters.

    Fields named ``lookups_<source>`` become one family, ``e2ee_gateway_registry_lookups``
    with a ``source`` label; every other field ``f`` becomes ``e2ee_gateway_registry_f``.
    ``source`` may return None (a backend without stats): nothing is exported then. The
    values must only grow, as Prometheus counters do.
    """

    def __init__(self, source: Callable[[], object | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        if stats is None or not dataclasses.is_dataclass(stats) or isinstance(stats, type):
            return
        lookups = CounterMetricFamily(
            "e2ee_gateway_registry_lookups",
            "Registry lookups by where the answer came from.",
            labels=["source"],
        )
        others: list[Metric] = []
        for field in dataclasses.fields(stats):
            value = getattr(stats, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if field.name.startswith("lookups_"):
                lookups.add_metric([field.name.removeprefix("lookups_")], value)
            else:
                others.append(
                    CounterMetricFamily(
                        f"e2ee_gateway_registry_{field.name}",
                        f"Registry counter {field.name}.",
                        value=value,
                    )
                )
        if lookups.samples:
            yield lookups
        yield from others


async def refresh_provider_gauges(metrics: Metrics, registry: Registry) -> None:
    """Count the live keys and endpoints of each model with two registry calls."""
    now = await registry.now()
    counts: dict[str, tuple[int, int]] = {}
    for entry in await registry.entries():
        endpoints = len(entry.live(now).endpoints)
        if endpoints == 0:
            continue
        keys, total = counts.get(entry.model, (0, 0))
        counts[entry.model] = (keys + 1, total + endpoints)
    metrics.set_live_providers(counts)


async def refresh_provider_gauges_forever(
    metrics: Metrics, registry: Callable[[], Registry], interval_s: float
) -> None:
    """Refresh the provider gauges every ``interval_s`` until cancelled.

    While the registry is unreachable the gauges keep their last values; the reaper
    already logs the outage, so this loop logs only at DEBUG.
    """
    while True:
        try:
            await refresh_provider_gauges(metrics, registry())
        except RegistryUnavailable as exc:
            logger.debug("provider gauges not refreshed: %s", exc)
        await asyncio.sleep(interval_s)
