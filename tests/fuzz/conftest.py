"""Fixtures of the fuzz and security tests: the gateway fixtures of ``tests/proxy``.

Those fixtures live in ``tests/proxy/conftest.py``, which pytest scopes to its own
directory, so this file loads that module once under another name and re-exports the
fixtures it needs. ``gateway_harness`` and ``relay_harness`` become importable too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PROXY_TESTS = Path(__file__).resolve().parent.parent / "proxy"
_FIXTURES_MODULE = "proxy_test_fixtures"


def _load_proxy_fixtures() -> ModuleType:
    if str(_PROXY_TESTS) not in sys.path:
        sys.path.insert(0, str(_PROXY_TESTS))
    loaded = sys.modules.get(_FIXTURES_MODULE)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(_FIXTURES_MODULE, _PROXY_TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_FIXTURES_MODULE] = module
    spec.loader.exec_module(module)
    return module


_proxy_fixtures = _load_proxy_fixtures()

token_dir = _proxy_fixtures.token_dir
make_settings = _proxy_fixtures.make_settings
clock = _proxy_fixtures.clock
start_gateway_with = _proxy_fixtures.start_gateway_with
gateway = _proxy_fixtures.gateway
http = _proxy_fixtures.http
admin = _proxy_fixtures.admin
start_demo = _proxy_fixtures.start_demo
start_fake = _proxy_fixtures.start_fake
