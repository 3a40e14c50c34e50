"""How far bf16 moves a model's embeddings from fp32, measured on real inputs and recorded in its manifest.

`plan()` runs a tower in bf16 under IDIOS_PRECISION=auto only where this measurement held (min cosine
>= BF16_MIN_COSINE): it depends on the model (ViT-B/32 held 0.99994 on real photos here, EfficientNet-Lite0
0.998), not on the machine. `python -m idios fidelity MODEL_DIR --images DIR` and scripts/export_model.py
write it."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
import json
from pathlib import Path
from typing import Any

import numpy as np

from idios.decode import DecodeLimits, preprocess
from idios.engines.openvino import OpenVinoTower
from idios.models import MANIFEST, ModelSpec, load_manifest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
MIN_IMAGES = 8
# queries of the kind a collection is searched with: short and long, plain and odd
TEXTS = [
    "a photo of a cat", "two dogs playing in the snow", "portrait of a woman in a red dress, oil on canvas",
    "an old map of Europe", "black and white photograph of a steam locomotive", "a bowl of fruit on a table",
    "the Eiffel tower at night", "medieval manuscript with gold initials", "a city street in the rain",
    "close-up of a butterfly wing", "Mount Fuji", "a ship in a storm, engraving", "children at a school desk",
    "ceramic vase with blue flowers", "an astronaut", "a cup of coffee", "handwritten letter dated 1917",
    "aerial view of a harbour", "a crowd at a football match", "sunset over the sea", "a red car",
    "green fields under a blue sky", "a yellow taxi in New York",
]


def photos_in(folder: Path) -> list[bytes]:
    """The image files directly in `folder`, in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [p.read_bytes() for p in files]


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Cosines of unit rows; an fp32 row of zeros (a text the tower knows no word of) has no direction to keep."""
    cos = (a * b).sum(axis=1)[np.linalg.norm(a, axis=1) > 0.5]
    if not len(cos):
        raise ValueError("every fp32 embedding was zero: nothing to compare")
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6), "items": len(cos)}


def measure(spec: ModelSpec, images: list[bytes], threads: int = 0) -> dict[str, Any]:
    """bf16 against fp32 (both OpenVINO) per tower: `{"visual": {...}, "text": {...}}`, ready for the manifest."""
    import os

    import openvino as ov

    if len(images) < MIN_IMAGES:
        raise ValueError(f"measure on at least {MIN_IMAGES} real photos (got {len(images)})")
    threads = threads or os.cpu_count() or 1
    stamp = {"openvino": ov.get_version().split("-")[0], "measured": datetime.date.today().isoformat()}
    batch = np.stack([preprocess(data, spec, DecodeLimits()) for data in images])
    chunks = [(batch[i:i + 8],) for i in range(0, len(batch), 8)]
    out = {"visual": _compare(OpenVinoTower(spec.visual, threads, "fp32"), spec.visual, chunks, threads) | stamp}
    if spec.text is not None:
        from idios.embed import TextEncoder

        fp32 = OpenVinoTower(spec.text.file, threads, "fp32")
        tokens = TextEncoder(spec.text, fp32).inputs(TEXTS)
        out["text"] = _compare(fp32, spec.text.file, [tokens], threads) | stamp
    return out


def _compare(fp32: OpenVinoTower, path: Path, chunks: Sequence[tuple[np.ndarray, ...]], threads: int) -> dict[str, Any]:
    """The tower at `path` in bf16 against its fp32 run, over the same inputs (a batch, and its mask if any)."""
    bf16 = OpenVinoTower(path, threads, "bf16")
    return cosine_stats(np.concatenate([fp32.run(*c) for c in chunks]),
                        np.concatenate([bf16.run(*c) for c in chunks]))


def record(folder: Path, images: list[bytes]) -> dict[str, Any]:
    """Measure the model in `folder` and write the result into its manifest (`fidelity.bf16`)."""
    spec = load_manifest(folder)
    result = measure(spec, images)
    raw = json.loads((folder / MANIFEST).read_text())
    raw.setdefault("fidelity", {})["bf16"] = result
    (folder / MANIFEST).write_text(json.dumps(raw, indent=2) + "\n")
    return result
