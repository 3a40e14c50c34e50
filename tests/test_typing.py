"""The service's code stays type-clean: mypy --strict over idios/ (pyproject.toml sets strict)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(300)
def test_mypy_is_clean_on_the_service() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "idios"], cwd=ROOT, capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
