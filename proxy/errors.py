"""Errors the gateway responds with, each carrying its HTTP status and OpenAI error fields.

Every response the application produces for a failure is built from one of these
classes by ``error_middleware``, in the OpenAI envelope
``{"error":{"message","type","param","code"}}`` (fields in that order)::

    GatewayError
    ├── InvalidRequest              400 invalid_request_error
    │   ├── InvalidHeader           400 code=invalid_header, param=<header name>
    │   ├── InvalidJson             400 code=invalid_json
    │   ├── MissingModel            400 code=missing_model
    │   ├── InvalidField            400 code=invalid_field, param=<field>  (admin bodies)
    │   └── InvalidChatId           400 code=invalid_chat_id
    ├── Unauthorized                401 code=invalid_api_key
    ├── Forbidden                   403 code=forbidden
    ├── NotFound                    404 (model_not_found, chat_not_found, key_not_found, ...)
    ├── Conflict                    409 code=conflict
    ├── Gone                        410 code=instance_retired
    ├── RequestTimeout              408 code=request_timeout, Connection: close
    ├── RequestTooLarge             413 code=request_too_large
    ├── RateLimited                 429 rate_limit_exceeded, Retry-After
    │   ├── ConcurrencyLimited      429 code=concurrency_limit
    │   └── TooManyFailedAuth       429 code=too_many_failed_auth
    ├── StaleKey                    421 provider_error (exact message, code null)
    ├── ProviderUnavailable         502 bad_gateway (exact message, code null)
    ├── ServiceUnavailable          503 service_unavailable
    │   ├── NoLiveProvider          503 code=no_live_provider
    │   ├── RegistryUnavailable     503 code=registry_unavailable, Retry-After: 2
    │   └── ShuttingDown            503 code=shutting_down, Retry-After: 1, Connection: close
    └── UpstreamTimeout             504 gateway_timeout, code=upstream_timeout

The 421 and 502 bodies are fixed byte for byte, because E2EE clients match them to
decide between refreshing their attestation report and giving up.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

__all__ = [
    "STALE_KEY_MESSAGE",
    "UNAVAILABLE_MESSAGE",
    "ConcurrencyLimited",
    "Conflict",
    "Forbidden",
    "GatewayError",
    "Gone",
    "InvalidChatId",
    "InvalidField",
    "InvalidHeader",
    "InvalidJson",
    "InvalidRequest",
    "MissingModel",
    "NoLiveProvider",
    "NotFound",
    "ProviderUnavailable",
    "RateLimited",
    "RegistryUnavailable",
    "RequestTimeout",
    "RequestTooLarge",
    "ServiceUnavailable",
    "ShuttingDown",
    "StaleKey",
    "TooManyFailedAuth",
    "Unauthorized",
    "UpstreamTimeout",
    "error_body",
]

STALE_KEY_MESSAGE = (
    "The encryption key is no longer valid. Please refresh your attestation report and retry."
)
UNAVAILABLE_MESSAGE = "The model is currently unavailable. Please try again later."


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    """Encode the OpenAI error envelope with its fields in the documented order."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class GatewayError(Exception):
    """Base of every error that becomes an HTTP response in the OpenAI envelope."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    outcome: str = "error"
    """Outcome label for the access log and metrics."""
    close_connection: bool = False
    """Respond with ``Connection: close`` and close the client connection afterwards."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            # A code given here refines the class's outcome label (e.g. model_not_found).
            self.code = code
            self.outcome = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    outcome = "invalid_request"


class InvalidHeader(InvalidRequest):
    code = "invalid_header"

    def __init__(self, header: str, message: str) -> None:
        super().__init__(message, param=header)


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class MissingModel(InvalidRequest):
    code = "missing_model"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class InvalidField(InvalidRequest):
    code = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, param=field)


class InvalidChatId(InvalidRequest):
    code = "invalid_chat_id"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    outcome = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"
    outcome = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    outcome = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"
    outcome = "conflict"


class Gone(GatewayError):
    status = 410
    type = "invalid_request_error"
    code = "instance_retired"
    outcome = "retired"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    outcome = "client_body_timeout"
    close_connection = True


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    outcome = "request_too_large"
    close_connection = True


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    outcome = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ConcurrencyLimited(RateLimited):
    code = "concurrency_limit"
    outcome = "concurrency_limit"


class TooManyFailedAuth(RateLimited):
    code = "too_many_failed_auth"
    outcome = "too_many_failed_auth"


class StaleKey(GatewayError):
    """The pinned key matches no live provider of the model: the client must refresh."""

    status = 421
    type = "provider_error"
    outcome = "stale_pubkey"

    def __init__(self) -> None:
        super().__init__(STALE_KEY_MESSAGE)


class ProviderUnavailable(GatewayError):
    """The chosen providers failed or could not be reached after every allowed attempt."""

    status = 502
    type = "bad_gateway"
    outcome = "provider_unreachable"

    def __init__(self, outcome: str = "provider_unreachable") -> None:
        super().__init__(UNAVAILABLE_MESSAGE)
        self.outcome = outcome


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    outcome = "unavailable"


class NoLiveProvider(ServiceUnavailable):
    code = "no_live_provider"
    outcome = "no_live_provider"


class RegistryUnavailable(ServiceUnavailable):
    code = "registry_unavailable"
    outcome = "registry_unavailable"

    def __init__(
        self, message: str = "The provider registry is unavailable. Retry shortly."
    ) -> None:
        super().__init__(message, headers={"Retry-After": "2"})


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"
    outcome = "shutting_down"
    close_connection = True

    def __init__(self) -> None:
        super().__init__(
            "This gateway is shutting down. Retry the request; it will reach another replica.",
            headers={"Retry-After": "1"},
        )


class UpstreamTimeout(GatewayError):
    status = 504
    type = "gateway_timeout"
    code = "upstream_timeout"
    outcome = "upstream_timeout"
