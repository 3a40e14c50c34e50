"""The embed actor: onnxruntime sessions per model, fed by a micro-batcher, run off the event loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort

from idios.batcher import MicroBatcher
from idios.metrics import Metrics
from idios.models import ModelSpec, TextTower
from idios.settings import Settings
from idios.textclean import CLEANERS

log = logging.getLogger(__name__)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


@functools.lru_cache(maxsize=8)
def _providers_for(setting: str) -> tuple[str, ...]:
    return tuple(resolve_providers(setting, ort.get_available_providers()))


def providers_for(settings: Settings) -> list[str]:
    """The providers for this service's sessions (resolved, and warned about, once)."""
    return list(_providers_for(settings.execution_provider))


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
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxTower:
    """One onnxruntime session: first input in, first output out, batch dimension dynamic."""

    def __init__(self, path: Path, threads: int, providers: list[str] | None = None, spin: bool = True) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if not spin:  # idle pool threads sleep at once instead of spinning (measured: ~15% slower ingest here)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        wanted = providers[0]
        if self.session.get_providers()[0] != wanted:  # e.g. CUDA present but no usable GPU/driver
            log.warning("%s: asked for %s, running on %s", path.name, wanted, self.session.get_providers()[0])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output], {self.input: batch})
        return l2_normalise(np.asarray(out, dtype=np.float32))


class TextEncoder:
    """Tokenise with the model's tokenizer.json (Hugging Face `tokenizers`) and run the text tower.

    Truncation leaves room for the tokens the post-processor adds, so CLIP's end token survives long texts.
    A tower exported with a dynamic sequence length (scripts/export_clip.py `TrimmedTextTower`) gets the batch
    padded to its longest text only: a short query costs a few tokens of compute instead of the whole context."""

    def __init__(self, tower: TextTower, threads: int, providers: list[str] | None = None) -> None:
        from tokenizers import Tokenizer

        self.context_length = tower.context_length
        self.clean = CLEANERS[tower.clean]
        self.tower = OnnxTower(tower.file, threads, providers)
        shape = self.tower.session.get_inputs()[0].shape
        self.trimmed = len(shape) == 2 and not isinstance(shape[1], int)
        self.tokenizer = Tokenizer.from_file(str(tower.tokenizer))
        self.tokenizer.enable_truncation(max_length=tower.context_length)
        if self.trimmed:
            self.tokenizer.enable_padding(pad_id=0)  # to the longest in the batch
        else:
            self.tokenizer.enable_padding(length=tower.context_length, pad_id=0)

    def tokens(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch([self.clean(t) for t in texts])
        return np.asarray([e.ids for e in encoded], dtype=np.int64)

    def run(self, texts: list[str]) -> np.ndarray:
        return self.tower.run(self.tokens(texts))


class ModelRuntime:
    """A loaded model's visual tower and the batcher that groups images from many jobs into one run."""

    def __init__(self, spec: ModelSpec, settings: Settings, executor: ThreadPoolExecutor, metrics: Metrics) -> None:
        self.spec = spec
        self.visual = OnnxTower(spec.visual, onnx_threads(settings), providers_for(settings), spin=settings.onnx_spin)
        self._executor = executor
        self.preparing = 0  # images of this model still being fetched or decoded: the batcher waits for them
        self.images: MicroBatcher[np.ndarray, np.ndarray] = MicroBatcher(
            f"embed-{spec.name}", self._run_images, settings.max_batch, settings.max_wait_ms / 1000,
            observe=metrics.batch_observer("embed", spec.name), coming=lambda: self.preparing,
        )

    async def __aenter__(self) -> ModelRuntime:
        await self.images.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.images.close()

    async def _run_images(self, items: list[np.ndarray]) -> list[np.ndarray]:
        batch = np.stack(items)
        out = await asyncio.get_running_loop().run_in_executor(self._executor, self.visual.run, batch)
        return list(out)

    async def embed_image(self, tensor: np.ndarray) -> np.ndarray:
        return await self.images.submit(tensor)


class TextRuntime:
    """A model's text tower, run by the API process itself: a query text is a few milliseconds of compute, less
    than a trip through the job bus, and workers then hold only the visual towers they batch. Texts arriving
    together share one run on a thread of its own, so text search does not queue behind image batches."""

    MAX_BATCH = 32

    def __init__(self, spec: ModelSpec, settings: Settings, metrics: Metrics) -> None:
        assert spec.text is not None
        self.spec = spec
        self.encoder = TextEncoder(spec.text, onnx_threads(settings), providers_for(settings))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"idios-text-{spec.name}")
        self.texts: MicroBatcher[str, np.ndarray] = MicroBatcher(
            f"text-{spec.name}", self._run, self.MAX_BATCH, settings.max_wait_ms / 1000,
            observe=metrics.batch_observer("text", spec.name),
        )

    async def __aenter__(self) -> TextRuntime:
        await self.texts.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.texts.close()
        self._executor.shutdown(wait=True)

    async def _run(self, texts: list[str]) -> list[np.ndarray]:
        return list(await asyncio.get_running_loop().run_in_executor(self._executor, self.encoder.run, texts))

    async def embed(self, text: str) -> np.ndarray:
        return await self.texts.submit(text)


def onnx_threads(settings: Settings) -> int:
    return settings.onnx_threads or os.cpu_count() or 1


async def load_runtimes(
    specs: dict[str, ModelSpec],
    settings: Settings,
    executor: ThreadPoolExecutor,
    stack: AsyncExitStack,
    metrics: Metrics,
) -> dict[str, ModelRuntime]:
    """Load every model's visual tower and start its batcher; the stack closes them."""
    runtimes = {}
    for name, spec in specs.items():
        runtimes[name] = await stack.enter_async_context(ModelRuntime(spec, settings, executor, metrics))
        log.info("model %s loaded (dim %d)", name, spec.dim)
    return runtimes


async def load_text_runtimes(
    specs: dict[str, ModelSpec], settings: Settings, stack: AsyncExitStack, metrics: Metrics
) -> dict[str, TextRuntime]:
    """Load the text tower of every model that has one (the API's part of the models), unless text search is off."""
    out: dict[str, TextRuntime] = {}
    if not settings.text_search:
        log.info("text search is off (IDIOS_TEXT_SEARCH): no text tower loaded")
        return out
    for name, spec in specs.items():
        if spec.has_text:
            out[name] = await stack.enter_async_context(TextRuntime(spec, settings, metrics))
            log.info("text tower of %s loaded", name)
    return out
