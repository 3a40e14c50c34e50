#!/usr/bin/env python3
"""Near-duplicate retrieval on real photographs that ship in scikit-image: recall@1 per edit, per model.

Images: each photo and its four corner tiles. Index: every original, plus every edited copy of the distractor
images. Query: each edited copy of the query images; a hit is the query's own original ranked first. Images go
through the service's own decoder and ONNX session.

    python scripts/neardup_recall.py MODEL_DIR [MODEL_DIR ...] [--engines=onnxruntime:fp32,openvino:bf16]
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idios.decode import DecodeLimits, preprocess  # noqa: E402
from idios.engines import EnginePlan, Tower, TowerWeights, detect_machine, open_tower  # noqa: E402
from idios.models import ModelSpec, load_manifest  # noqa: E402

# Photographs bundled with scikit-image (no download); "camera", "moon" etc. are grey.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "coins", "page", "clock", "horse",
          "grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "text")
TILE = 0.6  # each photo also yields its four corner tiles: look-alike neighbours that make the task harder


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    """The image as a file of format `fmt` (Pillow's name: JPEG, PNG, WEBP), RGB."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format=fmt, **options)
    return buf.getvalue()


def _jpeg(im: Image.Image, quality: int) -> bytes:
    return encode(im, "JPEG", quality=quality)


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    return im.crop((w // 10, h // 12, w - w // 20, h - h // 10))


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop 85%": _crop,
    "resize 50%": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "jpeg q30": lambda im: Image.open(io.BytesIO(_jpeg(im, 30))),
    "brightness +30%": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "rotate 5°": lambda im: im.rotate(5, resample=Image.Resampling.BICUBIC, expand=False),
    "grayscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "flip": ImageOps.mirror,
}


def photos() -> dict[str, Image.Image]:
    """The bundled photos as RGB, in a fixed order; those that fail to load or are too small are skipped."""
    from skimage import data

    out = {}
    for name in PHOTOS:
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception:  # a photo that would need a download
            continue
        im = as_photo(arr)
        if im is not None:
            out[name] = im
    return out


def as_photo(arr: np.ndarray) -> Image.Image | None:
    """A photo array (any dtype, grey or RGB) as RGB of at least 512 px a side; None when under 250 px."""
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
    im = Image.fromarray(arr).convert("RGB")
    if min(im.size) < 250:
        return None
    # at least 512 px a side, so that halved tiles stay above the service's 150 px minimum
    scale = max(1.0, 512 / min(im.size))
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)


def corner_tiles(name: str, im: Image.Image) -> dict[str, Image.Image]:
    """The photo's four corner tiles (60% of each side), named `NAME/nw` etc."""
    w, h = im.size
    tw, th = int(w * TILE), int(h * TILE)
    return {f"{name}/{corner}": im.crop((x, y, x + tw, y + th))
            for corner, (x, y) in {"nw": (0, 0), "ne": (w - tw, 0), "sw": (0, h - th), "se": (w - tw, h - th)}.items()}


def images() -> dict[str, Image.Image]:
    """Every photo and its four corner tiles, as distinct images."""
    out = {}
    for name, im in photos().items():
        out[name] = im
        out.update(corner_tiles(name, im))
    return out


def open_on(path: Path, runs: str) -> Tower:
    """A tower on `onnxruntime:fp32`, `openvino:fp32`, `openvino:bf16` or `openvino:int8`, as the service
    builds one."""
    engine, _, precision = runs.partition(":")
    chosen = EnginePlan(engine, precision or "fp32", f"--engines={runs}")
    return open_tower(TowerWeights(path), chosen, detect_machine("cpu"), 2)


def embed_all(tower: Tower, spec: ModelSpec, blobs: list[bytes], batch: int = 16, threads: int = 2) -> np.ndarray:
    """Unit embeddings [N, dim] of image files, decoded and preprocessed as the service does (in a thread pool, as
    there), run in batches."""
    rows = []
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(blobs), batch):
            inputs = list(pool.map(lambda b: preprocess(b, spec, DecodeLimits()), blobs[i:i + batch]))
            rows.append(tower.run(np.stack(inputs)))
    out: np.ndarray = np.concatenate(rows).astype(np.float64)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def recall_table(model_dirs: list[Path], engines: tuple[str, ...] = ("onnxruntime:fp32",)
                 ) -> dict[str, dict[str, float]]:
    """recall@1 for each model (by name, with the engine when several are measured) and edit."""
    pics = images()
    names = list(pics)
    queries, distractors = names[0::2], names[1::2]
    table: dict[str, dict[str, float]] = {}
    for folder, runs in ((f, r) for f in model_dirs for r in engines):
        spec = load_manifest(folder)
        tower = open_on(spec.visual, runs)

        def embed(im: Image.Image) -> np.ndarray:
            return tower.run(preprocess(_jpeg(im, 95), spec, DecodeLimits())[None])[0]

        index_ids = list(names) + [f"{d} ({e})" for d in distractors for e in EDITS]
        index = np.stack([embed(pics[n]) for n in names] + [embed(f(pics[d])) for d in distractors for f in EDITS.values()])
        row = {}
        for edit, fn in EDITS.items():
            hits = [index_ids[int(np.argmax(index @ embed(fn(pics[q]))))] == q for q in queries]
            row[edit] = sum(hits) / len(hits)
        table[spec.name if len(engines) == 1 else f"{spec.name} {runs.replace(':', ' ')}"] = row
    return table


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--engines=")]
    engines = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--engines=")), "onnxruntime:fp32")
    dirs = [Path(p) for p in args]
    if not dirs:
        raise SystemExit(__doc__)
    table = recall_table(dirs, tuple(engines.split(",")))
    models = list(table)
    n = len(images())
    print(f"recall@1 over {n} images ({len(photos())} photos and their corner tiles): queries are the edited copies "
          f"of every other image; the index holds all {n} originals and the edited copies of the rest")
    print("| edit | " + " | ".join(models) + " |")
    print("| --- |" + " --- |" * len(models))
    for edit in EDITS:
        print(f"| {edit} | " + " | ".join(f"{table[m][edit]:.2f}" for m in models) + " |")
    means = [sum(table[m].values()) / len(EDITS) for m in models]
    print("| mean | " + " | ".join(f"{v:.2f}" for v in means) + " |")


if __name__ == "__main__":
    main()
