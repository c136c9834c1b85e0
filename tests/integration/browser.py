"""Headless Chromium for the browser tests: Debian's package driven by Playwright (no browser download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.project import PROJECT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = PROJECT / "test-artifacts"


def sync_playwright_api():
    """Playwright's sync API, once the Python package and Chromium are known to be installed."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-integration.txt")
    assert CHROMIUM.exists(), "Chromium missing: run .ci/install-system-packages (make test does)"
    ARTIFACTS.mkdir(exist_ok=True)
    return sync_api
