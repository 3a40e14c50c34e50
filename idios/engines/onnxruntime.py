"""The onnxruntime engine: one InferenceSession per tower, on the CPU or on the execution providers asked for."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from idios.engines.common import Feed, l2_normalise

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
CPU = "CPUExecutionProvider"


@functools.lru_cache(maxsize=8)
def providers_for(setting: str) -> tuple[str, ...]:
    """The providers for this process's sessions, resolved (and warned about) once per setting."""
    return tuple(resolve_providers(setting, ort.get_available_providers()))


def resolve_providers(setting: str, available: list[str]) -> list[str]:
    """`IDIOS_EXECUTION_PROVIDER` → the onnxruntime providers to ask for, CPU last.

    A provider this onnxruntime build lacks (say `cuda` with the plain `onnxruntime` package rather than
    `onnxruntime-gpu`) is dropped with a warning, so the service still starts, on the CPU. A name that is no
    provider at all is a configuration error."""
    known = set(PROVIDER_NAMES.values()) | set(available)
    chosen: list[str] = []
    for raw in (part.strip() for part in setting.split(",")):
        if not raw:
            continue
        name = PROVIDER_NAMES.get(raw.lower(), raw)
        if name not in known and not name.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {raw!r}: use one of {', '.join(PROVIDER_NAMES)} "
                             "or a full onnxruntime provider name")
        if name not in available:
            log.warning("execution provider %s is not available in this onnxruntime (available: %s); "
                        "falling back to the next one, CPU at the latest", name, ", ".join(available))
        elif name not in chosen:
            chosen.append(name)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


class OrtTower:
    """One onnxruntime session: inputs as `Feed` reads them from the file, first output out (L2-normalised)."""

    engine = "onnxruntime"

    def __init__(self, path: Path, threads: int, providers: list[str] | None = None, spin: bool = True,
                 precision: str = "fp32") -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if not spin:  # idle pool threads sleep at once instead of spinning (measured: ~15% slower ingest here)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = providers or [CPU]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        wanted = providers[0]
        if self.session.get_providers()[0] != wanted:  # e.g. CUDA present but no usable GPU/driver
            log.warning("%s: asked for %s, running on %s", path.name, wanted, self.session.get_providers()[0])
        self.precision = precision
        self.device = self.session.get_providers()[0]
        self.feed = Feed.read([(i.name, i.type, i.shape) for i in self.session.get_inputs()], path.name)
        self.output = self.session.get_outputs()[0].name

    def _call(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        (out,) = self.session.run([self.output], inputs)
        return np.asarray(out, dtype=np.float32)

    def run(self, batch: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return l2_normalise(self.feed.run(self._call, batch, mask))
