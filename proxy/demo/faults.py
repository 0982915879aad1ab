"""Faults the demo provider can inject into a completion request."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["FAULT_FIELDS", "Faults"]


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults applied to one request; the defaults inject none.

    ``reset_after_events`` and ``truncate_after_events`` count SSE events written,
    including the first chunk (the one with the role) and ``[DONE]``.
    """

    status: int | None = None
    """Respond with this status and an OpenAI-style error body instead of a completion."""
    retry_after: int | None = None
    """With ``status``: the ``Retry-After`` header in seconds."""
    headers_delay_s: float = 0.0
    """Sleep this long before anything else, so the response headers come late."""
    reset_before_headers: bool = False
    """Reset the TCP connection (RST) before sending response headers."""
    reset_after_events: int | None = None
    """Streams: send headers and this many events, then reset the connection with no
    final chunk. Non-streamed responses: send headers and half the body, then reset."""
    truncate_after_events: int | None = None
    """Streams: send this many events, then end the response cleanly without ``[DONE]``."""
    error_first_event: bool = False
    """Streams: status 200, a first event that is an error object with code 503, then end."""

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"status must be 400-599, got {self.status}")
        for name in ("reset_after_events", "truncate_after_events", "retry_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.headers_delay_s < 0:
            raise ValueError(f"headers_delay_s must not be negative, got {self.headers_delay_s}")

    def any(self) -> bool:
        """Return whether at least one fault is set."""
        return self != Faults()


FAULT_FIELDS = tuple(f.name for f in fields(Faults))
