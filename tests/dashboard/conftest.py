"""The dashboard's fixtures: `full_plane` (every service real, sim engines started through
lifecycle) with an admin key and two simulated GPUs, and a headless Debian chromium driven
by playwright (it never downloads a browser here; the tests skip when chromium is absent).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sage.common.config.settings import SageSettings
from tests.conftest import integration_fixtures

ADMIN_KEY = "sk-admin-dashboard-0123456789abcdef"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_integration = integration_fixtures()
full_plane = _integration.full_plane


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SageSettings:
    """The shared settings plus an admin key; gpu_manager simulates two 80 GiB GPUs (its
    NVML stand-in, the boundary a GPU-less host fakes), so the GPU table has rows."""
    monkeypatch.setenv("SAGE_GPU_SIMULATE", "2x80")
    return SageSettings(
        home=tmp_path / "sage",
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=True,
        external_engine_allow="127.0.0.1",
        admin_api_key=ADMIN_KEY,
    )


@pytest.fixture
async def plane(full_plane: Any) -> AsyncIterator[Any]:
    """`full_plane` whose client sends the admin key on every request."""
    full_plane.client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    yield full_plane


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh headless chromium (own user-data dir) as a playwright browser context."""
    if not HAVE_CHROMIUM:
        pytest.skip(
            "Debian chromium is not installed (/usr/bin/chromium): "
            "scripts/install_system_tools.sh installs it"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1440, "height": 1000},
        )
        try:
            yield context
        finally:
            await context.close()
