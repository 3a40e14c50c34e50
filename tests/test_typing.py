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


def test_a_worker_process_imports_nothing_of_the_api() -> None:
    """The worker's composition (idios.workerproc, reached through `python -m idios worker`) stays below the HTTP
    API: a worker host needs none of it, and a rule about the API cannot leak into the worker by import."""
    code = ("import sys, idios.__main__, idios.workerproc; "
            "print(sorted(m for m in sys.modules if m == 'idios.api' or m.startswith(('idios.api.', 'idios.composition'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
