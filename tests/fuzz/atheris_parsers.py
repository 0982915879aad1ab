"""Coverage-guided fuzzing (atheris) of the gateway's pure parsers; run by hand, not in CI.

Each input is split into the pieces that one request or provider response carries: the E2EE
headers and ``X-Request-Id``, a request body, a provider URL, an ``Authorization``
value and an SSE buffer. Every parser must either return or raise the one error it
documents; any other exception is a crash that atheris reports with the input.

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_parsers.py -runs=200000
    .venv/bin/python tests/fuzz/atheris_parsers.py -max_total_time=300 corpus_dir/

Arguments after the script name go to libFuzzer. A crash is turned into a named case
in ``test_fuzz_regressions.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # ships no type information

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from multidict import CIMultiDict

    from proxy import sse
    from proxy.auth import bearer_token
    from proxy.errors import InvalidHeader, InvalidJson, MissingModel
    from proxy.handlers import _parse_body
    from proxy.headers import client_request_id, validate_e2ee_headers
    from proxy.urlcheck import AddressPolicy, InvalidProviderUrl

POLICIES = (AddressPolicy.from_allow_list(()), AddressPolicy.from_allow_list(("127.0.0.1/32",)))
HEADER_NAMES = ("X-Model-Pub-Key", "X-Signing-Algo", "X-Client-Pub-Key", "X-Encryption-Version")


def check_headers(data: atheris.FuzzedDataProvider) -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in HEADER_NAMES:
        if data.ConsumeBool():
            headers[name] = data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 200))
    try:
        result = validate_e2ee_headers(headers)
    except InvalidHeader as exc:
        assert exc.param in HEADER_NAMES, exc.param
    else:
        key = result.model_pubkey
        assert key is None or (len(key) in (64, 128) and key == key.lower()), key

    request_id = client_request_id({"X-Request-Id": data.ConsumeUnicode(140)})
    assert 1 <= len(request_id) <= 128, request_id
    assert request_id.isascii(), request_id
    assert request_id.isprintable(), request_id


def check_body(data: atheris.FuzzedDataProvider) -> None:
    body = data.ConsumeBytes(data.ConsumeIntInRange(0, 2000))
    try:
        model, stream = _parse_body(body)
    except (InvalidJson, MissingModel):
        return
    assert isinstance(model, str) and model, model
    assert isinstance(stream, bool)


def check_url(data: atheris.FuzzedDataProvider) -> None:
    raw = data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 300))
    for policy in POLICIES:
        try:
            url = policy.validate_url(raw)
        except InvalidProviderUrl:
            continue
        assert url.startswith(("http://", "https://")), url


def check_bearer(data: atheris.FuzzedDataProvider) -> None:
    token = bearer_token({"Authorization": data.ConsumeUnicode(100)})
    assert token is None or (token and token == token.strip()), token


def check_sse(data: atheris.FuzzedDataProvider) -> None:
    buffer = data.ConsumeBytes(data.ConsumeIntInRange(0, 3000))
    found = sse.find_first_event(buffer)
    if found is None:
        return
    end, block = found
    assert 0 < end <= len(buffer)
    error = sse.upstream_error_in_event(block)
    if error is not None:
        status, body = error
        assert 400 <= status <= 599, status
        assert body, body


CHECKS = (check_headers, check_body, check_url, check_bearer, check_sse)


def test_one_input(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    for check in CHECKS:
        check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
