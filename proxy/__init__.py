"""The e2ee-gateway HTTP proxy.

Map of the package::

    __main__   command line: e2ee-gateway / python -m proxy
    workers    pre-fork supervisor for GATEWAY_WORKERS > 1: starts, restarts, stops workers
    server     starts the public and admin listeners
    app        Gateway (shared state), app factories, middlewares
    handlers   public listener: routed requests, /v1/models, attestation reports, health
    admin      admin listener: heartbeats, deregistration, provider list, /metrics
    forward    one request to a provider: attempts, retries, held responses, whole bodies
    relay      streams to the client after the status line: relay, error event, shutdown
    upstream   the HTTP/1.1 client of forward: connection pool per provider origin
    upstream_connection
               one provider connection: request writing, flow control, timeouts
    upstream_http
               request heads, response parsing with httptools, the client's exceptions
    routing    provider choice (least outstanding requests) and passive ejection
    headers    E2EE header validation and the headers that cross the gateway
    sse        event framing checks on a reassembly buffer
    errors     the exception tree and the OpenAI error envelope
    urlcheck   provider URL and address policy
    auth       provider and admin tokens
    config     Settings from GATEWAY_* variables
    metrics    Prometheus metrics
    logs       log format, access log, rate-limited warnings
    demo/      a demo provider for trials and tests

Glossary:
    client      the caller of the public listener (downstream)
    provider    an OpenAI-compatible inference server in a TEE (upstream)
    endpoint    one provider base URL registered for a public key
    pinned      a request carrying X-Model-Pub-Key: only that key's endpoints may serve it
    stale key   a pinned key that no live endpoint of the model holds: answered with 421
    attempt     one try to get an answer from one endpoint
    worker      one of the gateway processes that share a host's ports (GATEWAY_WORKERS)
"""
