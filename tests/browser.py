"""Headless Chromium (the distribution's chromium + chromium-driver) driven by selenium, for end-to-end page tests.

IDIOS_CHROMIUM / IDIOS_CHROMEDRIVER name other binaries. Where Chromium is missing the browser tests skip,
saying how to install it; under CI=true they fail instead, so a CI machine without a browser cannot pass by
skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

INSTALL_HINT = "install them with: apt-get install -y chromium chromium-driver (scripts/ci_setup.sh does)"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,1000",
]


def find_chromium() -> tuple[str, str]:
    """Paths of the browser and its driver, or skip (fail under CI) with the reason."""
    browser = shutil.which(os.environ.get("IDIOS_CHROMIUM") or "chromium") or shutil.which("chromium-browser")
    driver = shutil.which(os.environ.get("IDIOS_CHROMEDRIVER") or "chromedriver")
    if browser and driver:
        return browser, driver
    missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
    reason = f"browser test needs {missing}; {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[object]:
    """A selenium Chrome driver on a fresh profile; quit on exit."""
    browser, driver_path = find_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="idios-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
