"""The OpenVINO engine: reads the same `.onnx` files (or OpenVINO IR) and runs them on the CPU's matrix units.

On a CPU with AMX or AVX-512 BF16, `bf16` runs the model's matrix products in bfloat16 (OpenVINO's own default
there; `fp32` asks for float32 explicitly). One compiled model and one infer request per tower, guarded by a
lock: a tower runs on one executor thread, and the lock keeps a caller from another thread safe too."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from idios.engines.common import l2_normalise

log = logging.getLogger(__name__)

HINTS = {"fp32": "f32", "bf16": "bf16"}


def cpu_capabilities() -> set[str] | None:
    """OpenVINO's view of this CPU (`BF16`, `INT8`, ...), or None when OpenVINO cannot be loaded here."""
    try:
        import openvino as ov

        return {str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}
    except Exception as exc:  # no wheel for this platform, a broken install: onnxruntime still runs
        log.warning("OpenVINO is not usable here (%s: %s): every model runs on onnxruntime",
                    exc.__class__.__name__, exc)
        return None


class OpenVinoTower:
    """One compiled OpenVINO model: first input in, first output out (L2-normalised), batch dimension dynamic."""

    engine = "openvino"
    device = "CPU"

    def __init__(self, path: Path, threads: int, precision: str = "fp32") -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        shape = model.inputs[0].get_partial_shape()
        self.dynamic_length = shape.rank.get_length() == 2 and shape[1].is_dynamic
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # decode threads share these cores: pinned model threads measured slower ingest (README, Benchmark)
            "ENABLE_CPU_PINNING": False,
        }
        if precision in HINTS:  # int8 models keep OpenVINO's default for their float parts
            config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision = precision
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # the request's output buffer is reused by the next run: normalise (copy) first
            out = self._request.infer({0: batch})
            return l2_normalise(np.asarray(out[0], dtype=np.float32))
