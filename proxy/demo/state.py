"""Configuration and observed state of a demo provider, and the app keys that hold them."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from proxy.demo.faults import FAULT_FIELDS, Faults
from proxy.demo.keys import SIGNING_ALGOS, DemoKeys

__all__ = ["DEMO_CONFIG", "DEMO_STATE", "DemoConfig", "DemoState"]

_SIGNATURES_KEPT = 1024


@dataclass(slots=True)
class DemoConfig:
    """Settings of one demo provider. Mutable: every request reads the current values.

    Fault fields (see ``Faults`` for each one's effect): ``status``, ``retry_after``,
    ``headers_delay_s``, ``reset_before_headers``, ``reset_after_events``,
    ``truncate_after_events``, ``error_first_event``. ``fail_next=None`` applies them to
    every request; an int applies them to that many more requests, then serves normally.
    ``close_idle_after_s`` is read once, when ``make_runner`` builds the runner.
    """

    model: str = "demo-model"
    signing_algos: tuple[str, ...] = SIGNING_ALGOS
    keys: DemoKeys = field(default_factory=DemoKeys.generate)
    events: int = 8
    event_delay_s: float = 0.0
    healthy: bool = True
    status: int | None = None
    retry_after: int | None = None
    headers_delay_s: float = 0.0
    reset_before_headers: bool = False
    reset_after_events: int | None = None
    truncate_after_events: int | None = None
    error_first_event: bool = False
    fail_next: int | None = None
    close_idle_after_s: float | None = None

    def __post_init__(self) -> None:
        unknown = [algo for algo in self.signing_algos if algo not in SIGNING_ALGOS]
        if unknown or not self.signing_algos:
            raise ValueError(f"signing_algos must be a non-empty subset of {SIGNING_ALGOS}")
        if self.events < 0:
            raise ValueError(f"events must not be negative, got {self.events}")
        self._faults()

    def rotate_keys(self, keys: DemoKeys | None = None) -> DemoKeys:
        """Replace the signing keys (with fresh ones unless ``keys`` is given); return them."""
        self.keys = keys if keys is not None else DemoKeys.generate()
        return self.keys

    def clear_faults(self) -> None:
        """Switch every fault off."""
        none = Faults()
        for name in FAULT_FIELDS:
            setattr(self, name, getattr(none, name))
        self.fail_next = None

    def take_faults(self) -> Faults:
        """Return the faults for one request, counting it against ``fail_next``.

        Raises ValueError when a fault field has an invalid value.
        """
        faults = self._faults()
        if not faults.any() or self.fail_next is None:
            return faults
        if self.fail_next <= 0:
            return Faults()
        self.fail_next -= 1
        return faults

    def _faults(self) -> Faults:
        return Faults(**{name: getattr(self, name) for name in FAULT_FIELDS})


@dataclass(slots=True)
class DemoState:
    """Requests, headers and disconnects the demo provider observed, for tests to read.

    ``client_gone`` is set (and ``disconnects`` counted) when a client went away during a
    request: a write raised ConnectionResetError, or aiohttp cancelled the handler, which
    it also does when the server shuts down. Tests may clear the event.
    """

    requests: Counter[str] = field(default_factory=Counter)
    """Requests received per path."""
    last_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    """A copy of the last request's headers (case-insensitive, duplicates kept)."""
    last_body: bytes = b""
    """The last body a completion endpoint read."""
    peers: set[tuple[str, int]] = field(default_factory=set)
    """Client (address, port) pairs seen: one per TCP connection."""
    disconnects: int = 0
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    resets: int = 0
    """Connections the provider reset on purpose (the reset faults)."""
    completed: int = 0
    """Completion responses produced in full: a stream once its last event is written, a
    non-streamed body once it is handed to aiohttp."""
    signatures: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """Completion id to signed text ``<model>:<sha256 of request>:<sha256 of response>``."""

    def note_client_gone(self) -> None:
        self.disconnects += 1
        self.client_gone.set()

    def record_signature(
        self, completion_id: str, model: str, request_body: bytes, response: bytes
    ) -> None:
        request_hash = hashlib.sha256(request_body).hexdigest()
        text = f"{model}:{request_hash}:{hashlib.sha256(response).hexdigest()}"
        self.signatures[completion_id] = text
        while len(self.signatures) > _SIGNATURES_KEPT:
            self.signatures.popitem(last=False)


DEMO_CONFIG = web.AppKey("demo_config", DemoConfig)
DEMO_STATE = web.AppKey("demo_state", DemoState)
