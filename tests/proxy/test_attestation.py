"""Registration checks the key against the provider's own attestation report."""

from __future__ import annotations

import asyncio
import gzip
import sys
from pathlib import Path

import aiohttp
import orjson
from gateway_harness import (
    ADMIN_TOKEN,
    MODEL,
    Admin,
    DemoStarter,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    closed_port_url,
    new_key,
)

from proxy.demo.keys import DemoKeys
from proxy.demo.provider import DemoConfig
from proxy.server import RunningGateway

JSON_HEADERS = (("Content-Type", "application/json"),)


async def _checking_gateway(
    start_gateway_with: GatewayStarter, make_settings: SettingsFactory, **overrides: object
) -> RunningGateway:
    return await start_gateway_with(make_settings(require_attestation_match=True, **overrides))


def _body(pubkey: str, url: str, algo: str = "ed25519") -> dict[str, object]:
    return {"pubkey": pubkey, "model": MODEL, "url": url, "signing_algo": algo}


async def test_published_keys_register(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _checking_gateway(start_gateway_with, make_settings)
    demo = await start_demo()
    admin = Admin(http, gateway.admin_url)

    for algo in ("ed25519", "ecdsa"):
        answer = await admin.heartbeat(_body(demo.config.keys.public_key_hex(algo), demo.url, algo))
        assert answer.status == 200, answer.body


async def test_unpublished_key_rejected_with_409(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _checking_gateway(start_gateway_with, make_settings)
    demo = await start_demo()
    admin = Admin(http, gateway.admin_url)

    answer = await admin.heartbeat(_body(new_key(), demo.url))

    assert answer.status == 409
    error = answer.json()["error"]
    assert error["code"] == "attestation_mismatch"
    assert error["param"] == "pubkey"
    assert "does not list key" in error["message"]
    listing = await http.get(
        gateway.admin_url + "/v1/providers", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert listing.status == 200
    assert (await listing.json())["data"] == []


async def test_unreachable_provider_rejected(
    start_gateway_with: GatewayStarter, make_settings: SettingsFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await _checking_gateway(start_gateway_with, make_settings)
    admin = Admin(http, gateway.admin_url)

    answer = await admin.heartbeat(_body(new_key(), closed_port_url()))

    assert answer.status == 409
    assert "cannot fetch the attestation report" in answer.json()["error"]["message"]


async def test_bad_nonce_signature_rejected(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    keys = DemoKeys.generate()
    key = keys.public_key_hex("ed25519")
    forged = {
        "model_attestations": [
            {
                "signing_algo": "ed25519",
                "signing_public_key": key,
                "signature": keys.sign_hex("ed25519", b"some other nonce"),
            }
        ]
    }
    fake = await start_fake(Reply(headers=JSON_HEADERS, chunks=(orjson.dumps(forged),)))
    gateway = await _checking_gateway(start_gateway_with, make_settings)

    answer = await Admin(http, gateway.admin_url).heartbeat(_body(key, fake.url))

    assert answer.status == 409
    assert "does not verify" in answer.json()["error"]["message"]


async def test_replayed_nonce_rejected(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    keys = DemoKeys.generate()
    key = keys.public_key_hex("ed25519")
    replayed = {
        "model_attestations": [
            {
                "signing_algo": "ed25519",
                "signing_public_key": key,
                "nonce": "00" * 32,
                "signature": keys.sign_hex("ed25519", ("00" * 32).encode()),
            }
        ]
    }
    fake = await start_fake(Reply(headers=JSON_HEADERS, chunks=(orjson.dumps(replayed),)))
    gateway = await _checking_gateway(start_gateway_with, make_settings)

    answer = await Admin(http, gateway.admin_url).heartbeat(_body(key, fake.url))

    assert answer.status == 409
    assert "another nonce" in answer.json()["error"]["message"]


async def test_report_request_carries_fresh_nonce(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    key = new_key()
    report = {"model_attestations": [{"signing_algo": "ed25519", "signing_public_key": key}]}
    fake = await start_fake(Reply(headers=JSON_HEADERS, chunks=(orjson.dumps(report),)))
    gateway = await _checking_gateway(start_gateway_with, make_settings)

    answer = await Admin(http, gateway.admin_url).heartbeat(_body(key, fake.url))

    assert answer.status == 200, answer.body
    served = fake.served[0]
    assert served.path == "/v1/attestation/report"
    assert "nonce=" in served.query
    assert f"model={MODEL}" in served.query
    assert "signing_algo=ed25519" in served.query


async def test_gzipped_report_accepted(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    # The gateway accepts compressed reports, so a provider may compress its report.
    key = new_key()
    report = {"model_attestations": [{"signing_algo": "ed25519", "signing_public_key": key}]}
    headers = (*JSON_HEADERS, ("Content-Encoding", "gzip"))
    fake = await start_fake(Reply(headers=headers, chunks=(gzip.compress(orjson.dumps(report)),)))
    gateway = await _checking_gateway(start_gateway_with, make_settings)

    answer = await Admin(http, gateway.admin_url).heartbeat(_body(key, fake.url))

    assert answer.status == 200, answer.body
    assert "gzip" in fake.served[0].headers.get("Accept-Encoding", "")


async def test_verifier_command_decides(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    verifier = tmp_path / "verify.py"
    seen = tmp_path / "seen"
    verifier.write_text(
        "import sys, json\n"
        "report = json.load(sys.stdin)\n"
        f"open({str(seen)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        "if sys.argv[4] == 'ecdsa':\n"
        "    sys.exit('quote does not verify')\n",
        encoding="utf-8",
    )
    gateway = await _checking_gateway(
        start_gateway_with,
        make_settings,
        attestation_verifier=f"{sys.executable} {verifier}",
    )
    demo = await start_demo(DemoConfig())
    admin = Admin(http, gateway.admin_url)
    ed_key = demo.config.keys.public_key_hex("ed25519")

    accepted = await admin.heartbeat(_body(ed_key, demo.url))
    arguments = seen.read_text().split()
    rejected = await admin.heartbeat(
        _body(demo.config.keys.public_key_hex("ecdsa"), demo.url, "ecdsa")
    )

    assert accepted.status == 200, accepted.body
    assert len(arguments[0]) == 64
    assert arguments[1:] == [ed_key, MODEL, "ed25519"]
    assert rejected.status == 409
    assert "quote does not verify" in rejected.json()["error"]["message"]


async def test_rotated_key_fails_recheck(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _checking_gateway(start_gateway_with, make_settings, attestation_recheck_s=0.01)
    demo = await start_demo()
    admin = Admin(http, gateway.admin_url)
    old_key = demo.config.keys.public_key_hex("ed25519")
    assert (await admin.heartbeat(_body(old_key, demo.url))).status == 200

    demo.config.rotate_keys()
    await asyncio.sleep(0.02)
    answer = await admin.heartbeat(_body(old_key, demo.url))

    assert answer.status == 409
    assert answer.json()["error"]["code"] == "attestation_mismatch"


async def test_recheck_keeps_key_while_report_unreachable(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    key = new_key()
    report = {"model_attestations": [{"signing_algo": "ed25519", "signing_public_key": key}]}
    fake = await start_fake(Reply(headers=JSON_HEADERS, chunks=(orjson.dumps(report),)))
    gateway = await _checking_gateway(start_gateway_with, make_settings, attestation_recheck_s=0.01)
    admin = Admin(http, gateway.admin_url)
    assert (await admin.heartbeat(_body(key, fake.url))).status == 200

    fake.then(Reply(status=500, headers=JSON_HEADERS, chunks=(b"{}",)))
    await asyncio.sleep(0.02)
    answer = await admin.heartbeat(_body(key, fake.url))

    assert answer.status == 200, answer.body
    assert len(fake.served) == 2
