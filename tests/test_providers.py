"""IDIOS_EXECUTION_PROVIDER: GPUs when onnxruntime has them, the CPU otherwise, and a clear error for a typo.

No test needs a GPU: these machines have the CPU-only onnxruntime, which is exactly the fallback case."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from idios.engines.onnxruntime import resolve_providers
from idios.settings import Settings
from tests.conftest import ROOT, running_service

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def test_short_names_in_order_cpu_last() -> None:
    assert resolve_providers("cpu", [CPU]) == [CPU]
    assert resolve_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers("tensorrt, cuda", ["TensorrtExecutionProvider", CUDA, CPU]) == [
        "TensorrtExecutionProvider", CUDA, CPU]
    assert resolve_providers("CUDAExecutionProvider,cuda,cpu", [CUDA, CPU]) == [CUDA, CPU]


def test_a_missing_gpu_provider_falls_back_to_the_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="idios.engines.onnxruntime"):
        assert resolve_providers("cuda", [CPU]) == [CPU]
    assert "CUDAExecutionProvider is not available" in caplog.text


def test_a_name_that_is_no_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown execution provider 'gpu'"):
        resolve_providers("gpu", [CPU])


async def test_the_service_asked_for_cuda_runs_on_this_cpu(tmp_path: Path, models_dir: Path, images: str) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the fallback cannot be shown here")
    settings = Settings.from_env({}, data_dir=tmp_path, models_dir=models_dir, allow_private_urls=True,
                                 execution_provider="cuda", engine="onnxruntime")
    async with running_service(settings) as svc:
        async with svc.http.get(svc.url + "/models") as resp:  # the session really runs on the CPU provider
            engines = {m["name"]: m["engines"] for m in await resp.json()}
        assert engines["thumb_grid"]["visual"] == {"engine": "onnxruntime", "precision": "fp32", "device": CPU}
        assert engines["thumb_text"]["text"]["device"] == CPU
        url = f"{images}/img/provider/a.jpg"
        async with svc.http.post(svc.model("thumb_grid") + "/add", json={"url": url}) as resp:
            assert resp.status == 204, await resp.text()
        async with svc.http.post(svc.model("thumb_text") + "/search", json={"text": "red", "limit": 1}) as resp:
            assert resp.status == 200
        async with svc.http.post(svc.model("thumb_grid") + "/search", json={"url": url, "limit": 1}) as resp:
            assert resp.status == 200 and (await resp.json())[0]["url"] == url


def test_the_cli_refuses_an_unknown_provider_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "idios", "serve", "--execution-provider", "gpu", "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "IDIOS_EXECUTION_PROVIDER: unknown execution provider 'gpu'" in proc.stderr
    assert "Traceback" not in proc.stderr
