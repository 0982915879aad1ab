"""A demo provider: a small OpenAI-compatible server for trials and tests of the gateway.

It imitates a TEE-hosted inference server. It publishes signing keys in an attestation
report and answers completions with text derived from the prompt. On demand it injects
faults (error statuses, slow headers, resets, truncated streams), so tests can drive the
gateway's error paths over real sockets.

Modules:
- ``provider``: the aiohttp app (``create_app``), its runner and ``serve_demo_provider``.
- ``state``: ``DemoConfig`` (mutable settings and faults) and ``DemoState`` (what it saw).
- ``faults``: the ``Faults`` applied to one request.
- ``chunks``: response bodies and SSE events, built without I/O.
- ``keys``: ``DemoKeys``, the ed25519 and secp256k1 key pairs.
- ``__main__``: the ``e2ee-demo-provider`` command.
- ``run``: ``make run``, which starts a gateway, a demo provider and its heartbeat agent.

Terms:
- event: one SSE event, ``data: <payload>`` followed by a blank line.
- fault: a deliberate misbehaviour that a test switches on in ``DemoConfig``.
- model public key: a key as published in ``model_attestations[].signing_public_key``.
"""
