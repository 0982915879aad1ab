"""Loader of the gateway fixtures of ``tests/proxy`` for test folders outside it.

pytest scopes ``tests/proxy/conftest.py`` to its own folder, so a conftest elsewhere
loads that module once under another name and re-exports the fixtures it needs. Loading
also puts ``tests/proxy`` (``gateway_harness``, ``relay_harness``) and ``tests``
(``redis_processes``) on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_TESTS = Path(__file__).resolve().parent
_PROXY_TESTS = _TESTS / "proxy"
_FIXTURES_MODULE = "proxy_test_fixtures"


def load_proxy_fixtures() -> ModuleType:
    """Return ``tests/proxy/conftest.py`` as a module, loading it on the first call only."""
    for directory in (_TESTS, _PROXY_TESTS):
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))
    loaded = sys.modules.get(_FIXTURES_MODULE)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(_FIXTURES_MODULE, _PROXY_TESTS / "conftest.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_FIXTURES_MODULE] = module
    spec.loader.exec_module(module)
    return module
