"""Security fixtures: the integration planes with tenant keys, an admin key and auth on
/metrics, plus secret strings that must never show up in logs or responses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sage.common.config.settings import SageSettings
from tests.conftest import integration_fixtures

TENANT_KEY = "sk-tenant-a-SECRET-7f3c9e1d2b"
OTHER_TENANT_KEY = "sk-tenant-b-SECRET-0a9b8c7d6e"
ADMIN_KEY = "sk-admin-SECRET-5e4d3c2b1a"
PROVIDER_KEY = "sk-openai-provider-SECRET-99aa88bb"
SECRETS = (TENANT_KEY, OTHER_TENANT_KEY, ADMIN_KEY, PROVIDER_KEY)


_integration = integration_fixtures()
full_plane = _integration.full_plane
control_plane = _integration.control_plane


def assert_no_secret(text: str, where: str) -> None:
    """None of the configured secrets (nor their long prefixes) appear in `text`."""
    for secret in SECRETS:
        assert secret not in text, f"secret {secret[:6]}… leaked into {where}"
        assert secret[:-4] not in text, f"most of secret {secret[:6]}… leaked into {where}"


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """The shared `settings`, with two tenant keys, an admin key and /metrics auth on."""
    return SageSettings(
        home=tmp_path / "sage",
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=not Path("/dev/nvidia0").exists(),
        # test engines are sims on loopback, registered as external engines
        external_engine_allow="127.0.0.1",
        api_keys=f"{TENANT_KEY}:tenant-a,{OTHER_TENANT_KEY}:tenant-b",
        admin_api_key=ADMIN_KEY,
        metrics_require_auth=True,
    )


@pytest.fixture
async def secure_plane(full_plane: Any) -> AsyncIterator[Any]:
    """`full_plane` whose client holds no key; teardown gets the admin key back so the
    plane can stop the engines a test started."""
    yield full_plane
    full_plane.client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"


def admin() -> dict[str, str]:
    """Headers carrying the admin key."""
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def tenant() -> dict[str, str]:
    """Headers carrying a tenant's API key."""
    return {"Authorization": f"Bearer {TENANT_KEY}"}
