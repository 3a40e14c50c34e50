"""The embed actor: each model's towers (on the engine `idios.engines` picks), fed by a micro-batcher, run off the
event loop."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack

import numpy as np

from idios.batcher import MicroBatcher
from idios.engines import EnginePlan, Machine, Tower, detect_machine, open_tower, plan
from idios.metrics import Metrics
from idios.models import ModelSpec, TextTower
from idios.settings import Settings
from idios.textclean import CLEANERS

log = logging.getLogger(__name__)


class TextEncoder:
    """Tokenise with the model's tokenizer.json (Hugging Face `tokenizers`) and run the text tower.

    Truncation leaves room for the tokens the post-processor adds, so CLIP's end token survives long texts.
    Padding uses the model's own pad id (a manifest's `text.pad_id`), and a tower that takes an attention mask
    gets the tokenizer's. A tower exported with a dynamic sequence length (scripts/export_clip.py
    `TrimmedTextTower`) gets the batch padded to its longest text only: a short query costs a few tokens of
    compute instead of the whole context."""

    def __init__(self, tower: TextTower, model: Tower) -> None:
        from tokenizers import Tokenizer

        self.context_length = tower.context_length
        self.clean = CLEANERS[tower.clean]
        self.tower = model
        self.trimmed = model.feed.dynamic_length and tower.trim
        self.tokenizer = Tokenizer.from_file(str(tower.tokenizer))
        self.tokenizer.enable_truncation(max_length=tower.context_length)
        pad_token = self.tokenizer.id_to_token(tower.pad_id) or "[PAD]"
        if self.trimmed:
            self.tokenizer.enable_padding(pad_id=tower.pad_id, pad_token=pad_token)  # to the longest in the batch
        else:
            self.tokenizer.enable_padding(length=tower.context_length, pad_id=tower.pad_id, pad_token=pad_token)

    def inputs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, `[N, L]` int64 each."""
        encoded = self.tokenizer.encode_batch([self.clean(t) for t in texts])
        return (np.asarray([e.ids for e in encoded], dtype=np.int64),
                np.asarray([e.attention_mask for e in encoded], dtype=np.int64))

    def tokens(self, texts: list[str]) -> np.ndarray:
        """Token ids, `[N, L]` int64."""
        return self.inputs(texts)[0]

    def run(self, texts: list[str]) -> np.ndarray:
        return self.tower.run(*self.inputs(texts))


class ModelRuntime:
    """A loaded model's visual tower and the batcher that groups images from many jobs into one run."""

    def __init__(self, spec: ModelSpec, settings: Settings, executor: ThreadPoolExecutor, metrics: Metrics,
                 machine: Machine) -> None:
        self.spec = spec
        self.visual = load_tower(spec, "visual", settings, machine, metrics)
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
        # stacking copies the whole batch (16 x 0.6 MB at 224 px): in the model's thread, not on the event loop
        out = await asyncio.get_running_loop().run_in_executor(self._executor, self._stack_and_run, items)
        return list(out)

    def _stack_and_run(self, items: list[np.ndarray]) -> np.ndarray:
        return self.visual.run(np.stack(items))

    async def embed_image(self, tensor: np.ndarray) -> np.ndarray:
        return await self.images.submit(tensor)


class TextRuntime:
    """A model's text tower, run by the API process itself: a query text is a few milliseconds of compute, less
    than a trip through the job bus, and workers then hold only the visual towers they batch. Texts arriving
    together share one run on a thread of its own, so text search does not queue behind image batches."""

    MAX_BATCH = 32

    def __init__(self, spec: ModelSpec, settings: Settings, metrics: Metrics, machine: Machine) -> None:
        assert spec.text is not None
        self.spec = spec
        self.encoder = TextEncoder(spec.text, load_tower(spec, "text", settings, machine, metrics))
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
        await asyncio.to_thread(self._executor.shutdown, wait=True)  # a running batch finishes off the loop

    async def _run(self, texts: list[str]) -> list[np.ndarray]:
        return list(await asyncio.get_running_loop().run_in_executor(self._executor, self.encoder.run, texts))

    async def embed(self, text: str) -> np.ndarray:
        return await self.texts.submit(text)


def model_threads(settings: Settings) -> int:
    return settings.onnx_threads or os.cpu_count() or 1


def load_tower(spec: ModelSpec, kind: str, settings: Settings, machine: Machine, metrics: Metrics) -> Tower:
    """Open one tower on the engine and precision `plan()` picks, and say which and why."""
    weights = spec.tower_weights(kind)
    chosen = plan(weights, settings.engine, settings.precision, machine)
    if chosen.warning:
        log.warning("%s %s tower: %s", spec.name, kind, chosen.warning)
    try:
        tower = open_tower(weights, chosen, machine, model_threads(settings), settings.onnx_spin,
                           settings.openvino_cache_dir)
    except Exception as exc:
        # an operator OpenVINO cannot convert: under auto the file still runs on onnxruntime
        if chosen.engine != "openvino" or settings.engine != "auto" or weights.path.suffix != ".onnx":
            raise
        log.warning("%s %s tower: OpenVINO cannot run it (%s), running onnxruntime fp32", spec.name, kind,
                    str(exc).strip().splitlines()[-1][:300])
        chosen = EnginePlan("onnxruntime", "fp32", "OpenVINO could not compile it")
        tower = open_tower(weights, chosen, machine, model_threads(settings), settings.onnx_spin)
    log.info("%s %s tower on %s %s (%s)", spec.name, kind, tower.engine, tower.precision, chosen.reason)
    metrics.engine.labels(spec.name, kind, tower.engine, tower.precision, tower.device).set(1)
    return tower


async def load_runtimes(
    specs: dict[str, ModelSpec],
    settings: Settings,
    executor: ThreadPoolExecutor,
    stack: AsyncExitStack,
    metrics: Metrics,
) -> dict[str, ModelRuntime]:
    """Load every model's visual tower and start its batcher; the stack closes them."""
    runtimes = {}
    machine = detect_machine(settings.execution_provider)
    for name, spec in specs.items():
        runtimes[name] = await stack.enter_async_context(ModelRuntime(spec, settings, executor, metrics, machine))
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
    machine = detect_machine(settings.execution_provider)
    for name, spec in specs.items():
        if spec.has_text:
            out[name] = await stack.enter_async_context(TextRuntime(spec, settings, metrics, machine))
            log.info("text tower of %s loaded", name)
    return out
