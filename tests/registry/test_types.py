"""Key normalisation, heartbeat validation and URL handling; no I/O."""

from __future__ import annotations

import pytest

from registry import (
    Endpoint,
    Heartbeat,
    InvalidPublicKey,
    MemoryRegistry,
    ProviderEntry,
    RedisRegistry,
    normalize_pubkey,
    open_registry,
    redact_url,
    signing_algo_of,
)

ED25519_KEY = "ab" * 32
ECDSA_KEY = "cd" * 64


def test_normalize_pubkey_keeps_canonical_key() -> None:
    assert normalize_pubkey(ED25519_KEY) == ED25519_KEY


def test_normalize_pubkey_strips_whitespace() -> None:
    spaced = f"  {ED25519_KEY[:10]} \n{ED25519_KEY[10:40]}\t{ED25519_KEY[40:]} "
    assert normalize_pubkey(spaced) == ED25519_KEY


def test_normalize_pubkey_lowercases() -> None:
    assert normalize_pubkey(ED25519_KEY.upper()) == ED25519_KEY


def test_normalize_pubkey_drops_sec1_prefix() -> None:
    assert normalize_pubkey("04" + ECDSA_KEY) == ECDSA_KEY


def test_normalize_pubkey_prefix_after_uppercase_and_space() -> None:
    assert normalize_pubkey(" 04" + ECDSA_KEY.upper() + "\n") == ECDSA_KEY


def test_normalize_pubkey_keeps_128_char_key_starting_04() -> None:
    key = "04" + "ef" * 63
    assert normalize_pubkey(key) == key


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ab" * 31,
        "ab" * 33,
        "ab" * 65,
        "05" + "cd" * 64,
        "cd" * 64 + "04",
    ],
    ids=["empty", "62-chars", "66-chars", "130-chars-no-04", "130-chars-05", "04-at-end"],
)
def test_normalize_pubkey_rejects_wrong_length(raw: str) -> None:
    with pytest.raises(InvalidPublicKey):
        normalize_pubkey(raw)


@pytest.mark.parametrize(
    "raw",
    ["g" + "a" * 63, "0x" + "a" * 62, "a" * 63 + "é", "ab" * 31 + "-_"],
    ids=["letter-g", "0x-prefix", "non-ascii", "punctuation"],
)
def test_normalize_pubkey_rejects_non_hex(raw: str) -> None:
    with pytest.raises(InvalidPublicKey):
        normalize_pubkey(raw)


def test_invalid_public_key_is_value_error() -> None:
    assert issubclass(InvalidPublicKey, ValueError)


def test_signing_algo_of_key_length() -> None:
    assert signing_algo_of(ED25519_KEY) == "ed25519"
    assert signing_algo_of(ECDSA_KEY) == "ecdsa"


def heartbeat(**overrides: object) -> Heartbeat:
    fields: dict[str, object] = {
        "pubkey": ED25519_KEY,
        "model": "llama",
        "url": "http://192.0.2.1:8000",
        "signing_algo": "ed25519",
        "owner": "alice",
        "ttl_s": 30.0,
    }
    fields.update(overrides)
    return Heartbeat(**fields)  # type: ignore[arg-type]


def test_heartbeat_accepts_valid_fields() -> None:
    assert heartbeat().instance_id == ""


def test_heartbeat_accepts_ecdsa_key() -> None:
    assert heartbeat(pubkey=ECDSA_KEY, signing_algo="ecdsa").signing_algo == "ecdsa"


@pytest.mark.parametrize(
    "overrides",
    [
        {"signing_algo": "rsa"},
        {"signing_algo": "ecdsa"},
        {"pubkey": ECDSA_KEY},
        {"model": ""},
        {"ttl_s": 0.0},
        {"ttl_s": -1.0},
        {"url": "http://192.0.2.1:8000/a b"},
    ],
    ids=[
        "unknown-algo",
        "algo-contradicts-key",
        "key-contradicts-algo",
        "empty-model",
        "zero-ttl",
        "negative-ttl",
        "space-in-url",
    ],
)
def test_heartbeat_rejects_invalid_field(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        heartbeat(**overrides)


def test_provider_entry_live_drops_ended_leases() -> None:
    ended = Endpoint("http://192.0.2.1:8000", "alice", "", 0.0, 10.0, 20.0)
    live = Endpoint("http://192.0.2.2:8000", "alice", "", 0.0, 15.0, 25.0)
    entry = ProviderEntry(ED25519_KEY, "llama", "ed25519", (ended, live))

    assert entry.live(20.0).endpoints == (live,)
    assert entry.live(19.9) is entry


def test_redact_url_masks_userinfo() -> None:
    assert redact_url("redis://user:s3cret@192.0.2.1:6379/0") == "redis://***@192.0.2.1:6379/0"


def test_redact_url_masks_password_query() -> None:
    redacted = redact_url("rediss://192.0.2.1/0?password=s3cret&db=1")
    assert "s3cret" not in redacted
    assert redacted.endswith("?password=***&db=1")


def test_redact_url_keeps_plain_url() -> None:
    assert redact_url("redis://192.0.2.1:6379/0") == "redis://192.0.2.1:6379/0"


def test_redact_url_unparsable_hides_rest() -> None:
    assert redact_url("redis://:s3cret@[::1/0") == "redis://<unparsable>"


def test_open_registry_memory_scheme() -> None:
    assert isinstance(open_registry("memory://"), MemoryRegistry)


@pytest.mark.parametrize("url", ["redis://192.0.2.1:6379/0", "rediss://192.0.2.1:6380/0"])
async def test_open_registry_redis_schemes(url: str) -> None:
    registry = open_registry(url, snapshot=False)
    try:
        assert isinstance(registry, RedisRegistry)
    finally:
        await registry.aclose()


async def test_open_registry_uses_prefix() -> None:
    registry = open_registry("redis://192.0.2.1:6379/0", prefix="gw2", snapshot=False)
    try:
        assert isinstance(registry, RedisRegistry)
        assert registry.providers_key == "gw2:providers"
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    "url", ["http://user:s3cret@192.0.2.1/", "valkey://u:s3cret@192.0.2.1/m", "memory"]
)
def test_open_registry_unknown_scheme_names_accepted(url: str) -> None:
    with pytest.raises(ValueError, match="memory://, redis://, rediss://") as caught:
        open_registry(url)

    assert "s3cret" not in str(caught.value)


def test_open_registry_bad_redis_url_hides_password() -> None:
    with pytest.raises(ValueError, match="invalid registry URL") as caught:
        open_registry("redis://user:s3cret@192.0.2.1:notaport/0")

    assert "s3cret" not in str(caught.value)
