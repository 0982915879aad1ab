"""Prometheus metrics of one gateway process, kept in a registry owned by the app.

Label values are bounded: routes are the fixed route names, outcomes a fixed set of
words, statuses HTTP codes, and models either a model that had a live provider while
this process ran or ``other``. No label ever contains a public key, a request id, a model
name chosen by a client or a URL with credentials.

Some families are computed rather than counted in place: the streams in flight and the
draining flag (read from the gateway, see ``ComputedSources``), the live providers and
keys per model (refreshed from the registry by ``refresh_provider_gauges_forever``), and
the registry's own counters (for backends that keep a stats dataclass).

Multiprocess mode (``GATEWAY_WORKERS`` above 1, see ``proxy.workers``): prometheus_client
keeps every value in a file under ``PROMETHEUS_MULTIPROC_DIR``, and /metrics, served by
any one worker, merges the files of all workers. Counters and histograms are summed,
including the counts of workers that have exited. Gauges counted in place are summed over
live workers (``livesum``). Computed values are not in any file, so each worker copies
them into file-backed families every ``SAMPLE_INTERVAL_S`` and before it serves a scrape
(``sample_sources``). The live provider and key counts describe the shared registry, so
the worker that serves the scrape reports its own counts. They are not written to files,
because prometheus_client cannot remove a labelled series from them, and a model whose
providers left would keep its series.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from registry import Registry, RegistryUnavailable

__all__ = [
    "OTHER_MODEL",
    "SAMPLE_INTERVAL_S",
    "ComputedSources",
    "Metrics",
    "RegistryStatsCollector",
    "refresh_provider_gauges",
    "refresh_provider_gauges_forever",
    "sample_sources_forever",
]

logger = logging.getLogger(__name__)

OTHER_MODEL = "other"
"""Label value for every model that has had no live provider in this process."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Streams last from under a second to many minutes for long generations.
_STREAM_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

SAMPLE_INTERVAL_S = 1.0
"""Multiprocess mode: period of each worker's copy of its computed values into files."""

_LIVE_PROVIDERS_HELP = "Live provider endpoints per registered model, at the last refresh."
_LIVE_KEYS_HELP = "Public keys with at least one live endpoint per registered model."
_LOOKUPS_HELP = "Registry lookups by where the answer came from."


@dataclass(frozen=True, slots=True)
class ComputedSources:
    """The callables that the computed families read. Each must be cheap and synchronous."""

    streams_in_flight: Callable[[], int]
    draining: Callable[[], bool]
    registry_stats: Callable[[], object | None]
    """The registry backend's stats dataclass, or None for a backend without one."""


class Metrics:
    """The gateway's metric families, registered in their own CollectorRegistry.

    With ``multiprocess_dir`` (a worker of ``proxy.workers``), values live in files in
    that directory and ``exposition()`` merges the files of every worker. prometheus_client
    must then have been imported with ``PROMETHEUS_MULTIPROC_DIR`` set to the same
    directory; RuntimeError is raised otherwise.
    """

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is not None and prometheus_values.ValueClass is (
            prometheus_values.MutexValue
        ):
            raise RuntimeError(
                "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR in the environment "
                "before prometheus_client is imported"
            )
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        self.live_models: frozenset[str] = frozenset()
        """Models with a live provider at the last refresh; other names fold to ``other``."""
        self._live_counts: dict[str, tuple[int, int]] = {}
        self._sources: ComputedSources | None = None
        self._stats_counters: dict[str, Counter] = {}
        self._stats_seen: dict[tuple[str, str | None], int] = {}

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
        # multiprocess_mode matters only in multiprocess mode: livesum adds up the workers
        # that are alive, livemax is 1 while any of them drains.
        self.in_flight = Gauge(
            "e2ee_gateway_requests_in_flight",
            "Requests being served on both listeners, health probes and /metrics excluded.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.streams_in_flight = Gauge(
            "e2ee_gateway_streams_in_flight",
            "SSE streams being relayed to clients.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.draining = Gauge(
            "e2ee_gateway_draining",
            "1 from the shutdown signal on (/readyz answers 503), else 0.",
            registry=self.registry,
            multiprocess_mode="livemax",
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
        live_providers = LiveProvidersCollector(lambda: self._live_counts)
        self.registry.register(live_providers)

        # What /metrics exposes: this registry, or in multiprocess mode the files of every
        # worker plus this worker's live provider counts.
        self._exposed = self.registry
        if multiprocess_dir is not None:
            self._exposed = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self._exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self._exposed.register(live_providers)

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
        self._child(self.requests, route, str(status), outcome).inc()
        if model is not None:
            self._child(self.model_requests, self.model_label(model, routed=routed), outcome).inc()
        if ttft_s is not None:
            self.time_to_first_byte.observe(ttft_s)
            self.stream_duration.observe(duration_s)
        if stream_failure is not None:
            self._child(self.stream_failures, stream_failure).inc()

    def _child(self, family: Counter, *values: str) -> Counter:
        """Return the child of ``family`` for these label values, created once.

        labels() validates and locks on every call, and record_request() runs once per
        request. The label values are bounded, so the cache is too.
        """
        key = (family, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    def set_live_providers(self, counts: dict[str, tuple[int, int]]) -> None:
        """Replace the per-model gauges with ``{model: (keys, endpoints)}``.

        Models absent from ``counts`` lose their series, so a model whose providers all
        left does not keep one for the life of the process.
        """
        self._live_counts = dict(counts)
        self.live_models = frozenset(counts)

    def connect_sources(self, sources: ComputedSources) -> None:
        """Read the computed families from ``sources``: at each scrape, or by sampling.

        In one process the gauges call the sources when scraped. In multiprocess mode
        ``sample_sources()`` copies their values into file-backed families instead.
        """
        if self.multiprocess_dir is not None:
            self._sources = sources
            self.sample_sources()
            return
        self.streams_in_flight.set_function(sources.streams_in_flight)
        self.draining.set_function(lambda: int(sources.draining()))
        self.registry.register(RegistryStatsCollector(sources.registry_stats))

    def sample_sources(self) -> None:
        """Multiprocess mode: copy the computed values of this worker into its files.

        The registry counters grow by what they gained since the last sample, so the
        merged totals keep the counts of workers that have exited.
        """
        sources = self._sources
        if sources is None:
            return
        self.streams_in_flight.set(sources.streams_in_flight())
        self.draining.set(int(sources.draining()))
        for stat in registry_stat_samples(sources.registry_stats()):
            key = (stat.family, stat.source)
            gained = stat.value - self._stats_seen.get(key, 0)
            self._stats_seen[key] = stat.value
            counter = self._stats_counter(stat)
            child = counter if stat.source is None else counter.labels(stat.source)
            # A counter that went down was reset (a new stats object): count it again.
            child.inc(gained if gained >= 0 else stat.value)

    def _stats_counter(self, stat: RegistryStat) -> Counter:
        counter = self._stats_counters.get(stat.family)
        if counter is None:
            counter = self._stats_counters[stat.family] = Counter(
                stat.family,
                stat.help,
                [] if stat.source is None else ["source"],
                registry=self.registry,
            )
        return counter

    def exposition(self) -> bytes:
        """Return the /metrics body in the Prometheus text format."""
        self.sample_sources()
        return generate_latest(self._exposed)


@dataclass(frozen=True, slots=True)
class RegistryStat:
    """One integer field of a registry stats dataclass, as a counter family and label."""

    family: str
    help: str
    source: str | None
    value: int


def registry_stat_samples(stats: object | None) -> list[RegistryStat]:
    """Map the integer fields of a stats dataclass to counter samples, and None to none.

    Fields named ``lookups_<source>`` become one family, ``e2ee_gateway_registry_lookups``
    with a ``source`` label; every other field ``f`` becomes ``e2ee_gateway_registry_f``.
    """
    if stats is None or not dataclasses.is_dataclass(stats) or isinstance(stats, type):
        return []
    samples = []
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if field.name.startswith("lookups_"):
            source = field.name.removeprefix("lookups_")
            samples.append(
                RegistryStat("e2ee_gateway_registry_lookups", _LOOKUPS_HELP, source, value)
            )
        else:
            family = f"e2ee_gateway_registry_{field.name}"
            samples.append(RegistryStat(family, f"Registry counter {field.name}.", None, value))
    return samples


class RegistryStatsCollector(Collector):
    """Exports the integer fields of a registry's stats dataclass as counters.

    The families are those of ``registry_stat_samples``. ``source`` may return None (a
    backend without stats): nothing is exported then. The values must only grow, as
    Prometheus counters do.
    """

    def __init__(self, source: Callable[[], object | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "e2ee_gateway_registry_lookups", _LOOKUPS_HELP, labels=["source"]
        )
        others: list[Metric] = []
        for stat in registry_stat_samples(self._source()):
            if stat.source is not None:
                lookups.add_metric([stat.source], stat.value)
            else:
                others.append(CounterMetricFamily(stat.family, stat.help, value=stat.value))
        if lookups.samples:
            yield lookups
        yield from others


class LiveProvidersCollector(Collector):
    """Collector of the live endpoints and keys per model, from ``{model: (keys, endpoints)}``."""

    def __init__(self, counts: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        providers = GaugeMetricFamily(
            "e2ee_gateway_live_providers", _LIVE_PROVIDERS_HELP, labels=["model"]
        )
        keys = GaugeMetricFamily("e2ee_gateway_live_keys", _LIVE_KEYS_HELP, labels=["model"])
        for model, (key_count, endpoint_count) in self._counts().items():
            providers.add_metric([model], endpoint_count)
            keys.add_metric([model], key_count)
        yield providers
        yield keys


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


async def sample_sources_forever(metrics: Metrics, interval_s: float = SAMPLE_INTERVAL_S) -> None:
    """Multiprocess mode: call ``metrics.sample_sources()`` every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        metrics.sample_sources()
