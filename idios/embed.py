"""The embed actor: onnxruntime sessions per model, fed by a micro-batcher, run off the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort

from idios import errors
from idios.batcher import MicroBatcher
from idios.metrics import Metrics
from idios.models import ModelSpec, TextTower
from idios.settings import Settings
from idios.textclean import CLEANERS

log = logging.getLogger(__name__)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class OnnxTower:
    """One onnxruntime session: first input in, first output out, batch dimension dynamic."""

    def __init__(self, path: Path, threads: int, providers: list[str] | None = None) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output], {self.input: batch})
        return l2_normalise(np.asarray(out, dtype=np.float32))


class TextEncoder:
    """Tokenise with the model's tokenizer.json (Hugging Face `tokenizers`) and run the text tower.

    Truncation leaves room for the tokens the post-processor adds, so CLIP's end token survives long texts."""

    def __init__(self, tower: TextTower, threads: int) -> None:
        from tokenizers import Tokenizer

        self.context_length = tower.context_length
        self.clean = CLEANERS[tower.clean]
        self.tokenizer = Tokenizer.from_file(str(tower.tokenizer))
        self.tokenizer.enable_truncation(max_length=tower.context_length)
        self.tokenizer.enable_padding(length=tower.context_length, pad_id=0)
        self.tower = OnnxTower(tower.file, threads)

    def tokens(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch([self.clean(t) for t in texts])
        return np.asarray([e.ids for e in encoded], dtype=np.int64)

    def run(self, texts: list[str]) -> np.ndarray:
        return self.tower.run(self.tokens(texts))


class ModelRuntime:
    """A loaded model: its towers and the batcher that groups images from many jobs into one run."""

    def __init__(self, spec: ModelSpec, settings: Settings, executor: ThreadPoolExecutor, metrics: Metrics) -> None:
        threads = settings.onnx_threads or os.cpu_count() or 1
        self.spec = spec
        self.visual = OnnxTower(spec.visual, threads)
        self.text = TextEncoder(spec.text, threads) if spec.text else None
        self._executor = executor
        self.images: MicroBatcher[np.ndarray, np.ndarray] = MicroBatcher(
            f"embed-{spec.name}", self._run_images, settings.max_batch, settings.max_wait_ms / 1000,
            observe=metrics.batch_observer("embed", spec.name),
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

    async def embed_text(self, text: str) -> np.ndarray:
        if self.text is None:
            raise errors.TextNotSupported(f"Model {self.spec.name} has no text tower; search by image instead")
        out = await asyncio.get_running_loop().run_in_executor(self._executor, self.text.run, [text])
        return out[0]


async def load_runtimes(
    specs: dict[str, ModelSpec],
    settings: Settings,
    executor: ThreadPoolExecutor,
    stack: AsyncExitStack,
    metrics: Metrics,
) -> dict[str, ModelRuntime]:
    """Load every model's sessions and start its batcher; the stack closes them."""
    runtimes = {}
    for name, spec in specs.items():
        runtimes[name] = await stack.enter_async_context(ModelRuntime(spec, settings, executor, metrics))
        log.info("model %s loaded (dim %d, text tower: %s)", name, spec.dim, spec.has_text)
    return runtimes
