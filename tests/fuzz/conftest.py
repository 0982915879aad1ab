"""Fixtures of the fuzz and security tests: the gateway fixtures of ``tests/proxy``,
loaded by ``proxy_fixtures``."""

from __future__ import annotations

from proxy_fixtures import load_proxy_fixtures

_proxy_fixtures = load_proxy_fixtures()

token_dir = _proxy_fixtures.token_dir
make_settings = _proxy_fixtures.make_settings
clock = _proxy_fixtures.clock
start_gateway_with = _proxy_fixtures.start_gateway_with
gateway = _proxy_fixtures.gateway
http = _proxy_fixtures.http
admin = _proxy_fixtures.admin
start_demo = _proxy_fixtures.start_demo
start_fake = _proxy_fixtures.start_fake
