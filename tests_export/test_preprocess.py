"""The service's decoder + preprocessing (Pillow, numpy) gives open_clip's eval transform, within a small bound.

The bound covers what the service does differently on purpose: JPEG draft-mode decoding (DCT scaling) at
>= 6x the input size. Reference: open_clip's transform on the fully decoded
picture the user sees (for 16-bit PNG, its 8-bit source: Pillow's own conversion clips it)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps

from idios.decode import DecodeLimits, preprocess
from idios.engines.onnxruntime import OrtTower
from idios.models import ModelSpec, load_manifest
from tests_export.conftest import Exported, encode, skimage_photo

COSINE_PREPROCESS = 0.999


def rgba(im: Image.Image) -> tuple[bytes, Image.Image]:
    alpha = Image.linear_gradient("L").resize(im.size)
    out = im.copy()
    out.putalpha(alpha)
    return encode(out, "PNG"), out.convert("RGB")


def grey16(im: Image.Image) -> tuple[bytes, Image.Image]:
    grey = np.asarray(im.convert("L"))
    return encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), Image.fromarray(grey).convert("RGB")


def exif_rotated(im: Image.Image) -> tuple[bytes, Image.Image]:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; "rotate 270 to view"
    data = encode(im.rotate(90, expand=True), "JPEG", quality=95, exif=exif.tobytes())
    return data, decoded(data)


def decoded(data: bytes) -> Image.Image:
    """A full decode, EXIF applied, as RGB: what the user sees."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def via_jpeg(mode: str) -> Callable[[Image.Image], tuple[bytes, Image.Image]]:
    def make(im: Image.Image) -> tuple[bytes, Image.Image]:
        data = encode(im.convert(mode), "JPEG", quality=95)
        return data, decoded(data)
    return make


def via_png(mode: str) -> Callable[[Image.Image], tuple[bytes, Image.Image]]:
    def make(im: Image.Image) -> tuple[bytes, Image.Image]:
        converted = im.convert(mode)
        return encode(converted, "PNG"), converted.convert("RGB")
    return make


CASES: dict[str, Callable[[Image.Image], tuple[bytes, Image.Image]]] = {
    "rgb-jpeg": via_jpeg("RGB"), "rgb-png": via_png("RGB"), "rgba-png": rgba, "l-png": via_png("L"),
    "p-png": via_png("P"), "cmyk-jpeg": via_jpeg("CMYK"), "16bit-png": grey16, "exif-jpeg": exif_rotated,
}
SIZES = {"native": None, "small": 200, "large": 3000}  # short side; "large" JPEGs decode at 1/2 (draft mode)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def sized(name: str, short: int | None) -> Image.Image:
    im = skimage_photo(name)
    if short is None:
        return im
    scale = short / min(im.size)
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)


def reference(spec: ModelSpec, im: Image.Image) -> np.ndarray:
    transform = open_clip.image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std)
    tensor: torch.Tensor = transform(im)
    return tensor.numpy()


@pytest.fixture(scope="module")
def models(vit_b32: Exported, effnet: Path) -> list[tuple[ModelSpec, OrtTower]]:
    """A CLIP tower (random weights) and a real-weights CNN, which is far more sensitive to pixels."""
    specs = [load_manifest(vit_b32.folder), load_manifest(effnet)]
    return [(s, OrtTower(s.visual, 2)) for s in specs]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES)
def test_runtime_preprocessing_matches_open_clip(
    models: list[tuple[ModelSpec, OrtTower]], case: str, size: str
) -> None:
    photos = PHOTOS[:2] if size == "large" else PHOTOS  # 3000 px photos are slow to encode on two cores
    pairs = [CASES[case](sized(p, SIZES[size])) for p in photos]
    for spec, tower in models:
        ours = np.stack([preprocess(data, spec, DecodeLimits()) for data, _ in pairs])
        theirs = np.stack([reference(spec, ref) for _, ref in pairs])
        got, want = tower.run(ours), tower.run(theirs)
        cos = (got * want).sum(axis=1)
        assert cos.min() >= COSINE_PREPROCESS, f"{spec.name}: {np.round(cos, 5)}"
        # the bound is far tighter than what separates different photos
        assert float(want[0] @ want[1]) < COSINE_PREPROCESS - 0.05
