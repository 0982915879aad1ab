"""Pure rules of the heartbeat agent: delays, report parsing, key changes, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.agent_logic import (
    AgentConfig,
    BeatOutcome,
    KeyChange,
    ReportError,
    backoff_cap_s,
    backoff_s,
    classify_beat_status,
    config_from_args,
    diff_keys,
    error_message,
    jittered_s,
    key_prefix,
    parse_args,
    parse_report_key,
)
from registry.types import InvalidPublicKey

ED = "ab" * 32
EC = "cd" * 64


def config(**overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "gateway_url": "http://127.0.0.1:9090",
        "token": "secret-token",
        "model": "m",
        "provider_url": "http://127.0.0.1:8000/",
    }
    values.update(overrides)
    return AgentConfig(**values)  # type: ignore[arg-type]


def report(*elements: dict[str, str]) -> dict[str, object]:
    return {"model_attestations": list(elements)}


# Delays


def test_backoff_doubles_from_base() -> None:
    delays = [backoff_s(n, base_s=0.5, cap_s=100, rand=lambda: 1.0) for n in (1, 2, 3, 4)]

    assert delays == [0.5, 1.0, 2.0, 4.0]


def test_backoff_stops_at_cap() -> None:
    assert backoff_s(50, base_s=0.5, cap_s=3.0, rand=lambda: 1.0) == 3.0


def test_backoff_full_jitter_reaches_zero() -> None:
    assert backoff_s(3, base_s=0.5, cap_s=10, rand=lambda: 0.0) == 0.0


def test_backoff_cap_never_exceeds_third_of_ttl() -> None:
    assert backoff_cap_s(interval_s=20, ttl_s=30) == 10
    assert backoff_cap_s(interval_s=5, ttl_s=30) == 5


def test_jitter_stays_within_ten_percent() -> None:
    assert jittered_s(10, lambda: 0.0) == pytest.approx(9.0)
    assert jittered_s(10, lambda: 0.5) == pytest.approx(10.0)
    assert jittered_s(10, lambda: 0.999999) == pytest.approx(11.0)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, BeatOutcome.OK),
        (400, BeatOutcome.REJECTED),
        (401, BeatOutcome.REJECTED),
        (409, BeatOutcome.REJECTED),
        (410, BeatOutcome.RETIRED),
        (429, BeatOutcome.TRANSIENT),
        (500, BeatOutcome.TRANSIENT),
        (503, BeatOutcome.TRANSIENT),
    ],
)
def test_classify_beat_status(status: int, outcome: BeatOutcome) -> None:
    assert classify_beat_status(status) is outcome


# Report parsing


def test_parse_report_picks_algo() -> None:
    body = report(
        {"model": "m", "signing_algo": "ed25519", "signing_public_key": ED},
        {"model": "m", "signing_algo": "ecdsa", "signing_public_key": EC},
    )

    assert parse_report_key(body, "m", "ed25519") == ED
    assert parse_report_key(body, "m", "ecdsa") == EC


def test_parse_report_normalises_key() -> None:
    body = report({"signing_algo": "ecdsa", "signing_public_key": "04" + EC.upper()})

    assert parse_report_key(body, "m", "ecdsa") == EC


def test_parse_report_missing_algo_is_none() -> None:
    body = report({"model": "m", "signing_algo": "ed25519", "signing_public_key": ED})

    assert parse_report_key(body, "m", "ecdsa") is None


def test_parse_report_skips_other_model() -> None:
    body = report({"model": "other", "signing_algo": "ed25519", "signing_public_key": ED})

    assert parse_report_key(body, "m", "ed25519") is None


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"model_attestations": "x"},
        report({"signing_algo": "ed25519"}),
        report({"signing_algo": "ed25519", "signing_public_key": "zz" * 32}),
        report({"signing_algo": "ed25519", "signing_public_key": EC}),
    ],
    ids=["not-object", "not-list", "no-key", "not-hex", "wrong-length"],
)
def test_parse_report_rejects_malformed(body: object) -> None:
    with pytest.raises(ReportError):
        parse_report_key(body, "m", "ed25519")


# Key changes


def test_diff_keys_unchanged_is_empty() -> None:
    assert diff_keys({"ed25519": ED}, {"ed25519": ED}) == []


def test_diff_keys_replaced() -> None:
    new = "ef" * 32

    assert diff_keys({"ed25519": ED}, {"ed25519": new}) == [KeyChange("ed25519", ED, new)]


def test_diff_keys_added_and_removed() -> None:
    changes = diff_keys({"ed25519": ED}, {"ecdsa": EC})

    assert changes == [KeyChange("ecdsa", None, EC), KeyChange("ed25519", ED, None)]


# Messages


def test_error_message_from_envelope() -> None:
    body = b'{"error":{"message":"owned by another","type":"x","param":null,"code":null}}'

    assert error_message(body) == "owned by another"


def test_error_message_hides_other_bodies() -> None:
    assert error_message(b"<html>secret</html>") == "(no error message)"
    assert error_message(b'{"detail":"x"}') == "(no error message)"


def test_error_message_is_cut() -> None:
    body = b'{"error":{"message":"' + b"x" * 500 + b'"}}'

    assert len(error_message(body)) == 200


def test_key_prefix_is_sixteen_chars() -> None:
    assert key_prefix(EC) == EC[:16]


# Settings


def test_config_infers_algo_from_pubkey() -> None:
    assert config(pubkey=EC).signing_algos == ("ecdsa",)
    assert config(pubkey=ED.upper()).pubkey == ED


def test_config_rejects_pubkey_algo_mismatch() -> None:
    with pytest.raises(InvalidPublicKey):
        config(pubkey=ED, signing_algos=("ecdsa",))


def test_config_rejects_non_http_url() -> None:
    with pytest.raises(ValueError, match="gateway_url"):
        config(gateway_url="ftp://example.invalid")


def test_config_hides_token_in_repr() -> None:
    assert "secret-token" not in repr(config())


def test_config_urls() -> None:
    cfg = config()

    assert cfg.endpoint == "http://127.0.0.1:8000"
    assert cfg.heartbeat_url == "http://127.0.0.1:9090/v1/providers/heartbeat"
    assert cfg.deregister_url(ED) == (
        f"http://127.0.0.1:9090/v1/providers/{ED}?url=http%3A%2F%2F127.0.0.1%3A8000"
    )
    assert cfg.health_url == "http://127.0.0.1:8000/health"
    assert cfg.report_request_url("ecdsa") == (
        "http://127.0.0.1:8000/v1/attestation/report?model=m&signing_algo=ecdsa"
    )


def test_config_report_url_overrides_provider() -> None:
    cfg = config(report_url="http://127.0.0.1:7000")

    assert cfg.health_url == "http://127.0.0.1:7000/health"
    assert cfg.endpoint == "http://127.0.0.1:8000"


def test_instance_id_differs_per_config() -> None:
    assert config().instance_id != config().instance_id
    assert len(config().instance_id) == 32


def args_for(token_file: Path, *extra: str) -> list[str]:
    return [
        "--gateway",
        "http://127.0.0.1:9090",
        "--token-file",
        str(token_file),
        "--model",
        "m",
        "--provider-url",
        "http://127.0.0.1:8000",
        *extra,
    ]


def test_config_from_args_reads_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n  the-token \n")

    cfg = config_from_args(parse_args(args_for(token_file, "--ttl-s", "9")))

    assert cfg.token == "the-token"
    assert cfg.ttl_s == 9
    assert cfg.signing_algos == ("ed25519", "ecdsa")


def test_config_from_args_rejects_two_line_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("one\ntwo\n")

    with pytest.raises(ValueError, match="one non-empty line"):
        config_from_args(parse_args(args_for(token_file)))


def test_config_from_args_pubkey_takes_one_algo(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t\n")
    argv = args_for(token_file, "--pubkey", ED, "--signing-algo", "ed25519,ecdsa")

    with pytest.raises(ValueError, match="single"):
        config_from_args(parse_args(argv))
