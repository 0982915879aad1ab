"""Prometheus metrics of one gateway process, kept in a registry owned by the app.

Label values are bounded: routes are the fixed route names, outcomes a fixed set of
words, statuses HTTP codes. No label ever holds a public key, a request id, a model name
chosen by a client or a URL with credentials.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The gateway's metric families, registered in their own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "e2ee_gateway_requests",
            "Client requests by route, HTTP status and outcome.",
            ["route", "status", "outcome"],
            registry=self.registry,
        )
        self.upstream_attempts = Counter(
            "e2ee_gateway_upstream_attempts",
            "Attempts to reach a provider, by result (ok or the failure reason class).",
            ["result"],
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
            "Routed client requests being served.",
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "e2ee_gateway_time_to_first_byte_seconds",
            "Time from a routed request's arrival to its first byte sent to the client.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry_errors = Counter(
            "e2ee_gateway_registry_errors",
            "Registry calls that failed because the registry was unreachable.",
            registry=self.registry,
        )
