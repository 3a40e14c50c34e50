"""The OpenVINO engine: reads the same `.onnx` files (or OpenVINO IR) and runs them on the CPU's matrix units.

On a CPU with AMX or AVX-512 BF16, `bf16` runs the model's matrix products in bfloat16 (OpenVINO's own default
there; `fp32` asks for float32 explicitly). One compiled model and one infer request per tower, guarded by a
lock: a tower runs on one executor thread, and the lock keeps a caller from another thread safe too."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from idios.engines.common import Feed, l2_normalise

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


def compile_cached(core: Any, path: Path, config: dict[str, Any], cache: Path | None) -> Any:
    """Compile `path`, through OpenVINO's model cache in `cache` when given.

    A cached compile is read back memory-mapped: ViT-B/32 bf16 measured 513 MB of private memory after its
    first runs against 858 MB compiled from the ONNX file (whose fp32 weights stay in private memory), its
    weights then in shared page cache that several workers on one machine share. The folder is keyed by the
    file's path, size and time, so a replaced file is never served from a stale entry; a cache that cannot be
    written is skipped with a warning."""
    if cache is None:
        return core.compile_model(str(path), "CPU", config)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache / f"{path.stem}-{key}"
    try:
        if not any(folder.glob("*.blob")):
            _fill(core, path, config, cache, folder)
        return core.compile_model(str(path), "CPU", config | {"CACHE_DIR": str(folder)})
    except Exception as exc:  # a read-only or full disk: uncached
        compiled = core.compile_model(str(path), "CPU", config)  # a file OpenVINO cannot run raises here
        log.warning("OpenVINO cache %s unusable (%s: %s): compiled %s without it", cache,
                    exc.__class__.__name__, exc, path.name)
        return compiled


def _fill(core: Any, path: Path, config: dict[str, Any], cache: Path, folder: Path) -> None:
    """Compile into a folder of this process's own, then move the blob into the shared one in one rename.

    OpenVINO writes a blob in place, and a process that starts beside another one (two workers on a machine)
    read a half-written blob as a model that failed at its first run. A rename shows the others a whole blob or
    none. The compiled model is dropped: the caller reads the blob back, memory-mapped, so that a first start
    holds no more than the next ones (ViT-B/32 bf16 after its first runs: 836 -> 491 MB private)."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".compiling-") as own:
        core.compile_model(str(path), "CPU", config | {"CACHE_DIR": own})
        folder.mkdir(exist_ok=True)
        for blob in Path(own).glob("*.blob"):
            os.replace(blob, folder / blob.name)


class OpenVinoTower:
    """One compiled OpenVINO model: inputs as `Feed` reads them from the file, first output out (L2-normalised)."""

    engine = "openvino"
    device = "CPU"

    def __init__(self, path: Path, threads: int, precision: str = "fp32", cache: Path | None = None) -> None:
        import openvino as ov

        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # decode threads share these cores; pinning measured no faster bare (ViT-B/32 bf16 batch 16: 50.1
            # pinned, 50.8 img/s not, one interleaved run) and would pin the model against them
            "ENABLE_CPU_PINNING": False,
        }
        if precision in HINTS:  # int8 models keep OpenVINO's default for their float parts
            config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
        self.compiled = compile_cached(ov.Core(), path, config, cache)
        self.feed = Feed.read([(i.get_any_name(), i.get_element_type().get_type_name(), _dims(i.get_partial_shape()))
                               for i in self.compiled.inputs], path.name)
        self.precision = precision
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def _call(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        out = self._request.infer(inputs)
        return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its output buffer

    def run(self, batch: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        with self._lock:
            return l2_normalise(self.feed.run(self._call, batch, mask))


def _dims(shape: Any) -> list[object]:
    """An OpenVINO partial shape as onnxruntime reports one: ints where fixed, a name where dynamic."""
    return [d.get_length() if d.is_static else "?" for d in shape]
