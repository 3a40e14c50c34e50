"""Decode and preprocess: image bytes → the model's normalised CHW float32 input (and, for an image to store, its
perceptual hash, from the same decode). Runs in a thread pool."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from idios import errors
from idios.models import ModelSpec
from idios.phash import phash


@dataclass(frozen=True)
class DecodeLimits:
    min_side: int = 150
    max_pixels: int = 100_000_000


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise errors.NotAnImage("The image is empty")
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        raise errors.NotAnImage("SVG images are not supported; send a raster image (JPEG, PNG, WebP, GIF...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise errors.ImageTooLarge("The image declares too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise errors.NotAnImage("The data is not an image Idios can decode") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise errors.ImageTooLarge(f"The image declares {w}x{h} pixels; the limit is {limits.max_pixels} pixels")
    if min(w, h) < limits.min_side:
        raise errors.ImageTooSmall(f"The image is {w}x{h}; each side must be at least {limits.min_side} pixels")
    return im


# 16-bit greyscale (PNG, TIFF) opens in these modes; Pillow's convert("RGB") clips them at 255 instead of scaling.
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _grey16_to_l(im: Image.Image) -> Image.Image:
    """16-bit greyscale → 8-bit by dropping the low byte (values above 16 bits are clipped)."""
    arr = np.asarray(im).astype(np.int64)
    return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")


# At 2x, DCT-scaled decoding moved a real-weights CNN's embedding to cosine 0.98 of open_clip's full decode;
# at 6x it stays above 0.999 (tests_export/test_preprocess.py) and still skips most of a large JPEG's work.
DRAFT_FACTOR = 6


def load_rgb(data: bytes, target: int, limits: DecodeLimits) -> Image.Image:
    """Open, check, decode (JPEG near the target size), EXIF-rotate and convert to RGB."""
    im = _open(data, limits)
    try:
        if im.format == "JPEG":
            # DCT scaling decodes at 1/2, 1/4 or 1/8 size, never below DRAFT_FACTOR x the model's input
            im.draft("RGB", (DRAFT_FACTOR * target, DRAFT_FACTOR * target))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in WIDE_GREY:
                im = _grey16_to_l(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode != "RGB":
                im = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise errors.NotAnImage(f"The image could not be decoded: {exc}") from None
    return im


def to_tensor(im: Image.Image, spec: ModelSpec) -> np.ndarray:
    """Resize and crop as open_clip's eval transform does, then normalise to a CHW float32 array (or, for a model
    that takes bytes, `pixels: uint8`, the HWC RGB bytes themselves)."""
    size = spec.image_size
    w, h = im.size
    filt = Image.Resampling[spec.interpolation.upper()]
    if spec.resize == "squash":
        im = im.resize((size, size), filt)
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        if (new_w, new_h) == (w, h):
            im = im.crop((left, top, left + size, top + size))
        else:
            # open_clip resizes the whole image, then crops its centre; resizing only the source box that
            # becomes the crop, at the same scale, computes the same filter over the same pixels (Pillow's
            # filter reaches outside the box) with less work: resize + crop + normalise 11.5 -> 8.9 ms of CPU
            # per 1000x750 photo here (six interleaved rounds).
            # Float rounding of the coefficients moves a pixel by at most 1 of 255 (tests/test_decode.py).
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            im = im.resize((size, size), filt, box=box)
    if spec.pixels == "uint8":  # the model normalises the bytes itself
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    arr: np.ndarray = np.asarray(im, dtype=np.float32) * np.float32(1 / 255)
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(data: bytes, spec: ModelSpec, limits: DecodeLimits) -> np.ndarray:
    """Image bytes → model input for one image."""
    return to_tensor(load_rgb(data, spec.image_size, limits), spec)


@dataclass(frozen=True)
class Prepared:
    tensor: np.ndarray  # the model's input (preprocess)
    phash: str  # idios.phash of the decoded image; "" when not asked for


def prepare(data: bytes, spec: ModelSpec, limits: DecodeLimits, hashed: bool) -> Prepared:
    """preprocess, and with `hashed` the pHash of the same decoded RGB image (before the model's resize): ~6 ms
    of CPU for a 1344x1008 decode here (its Lanczos resize), so only images to be stored pay it. A JPEG's draft
    decode moved the hash of 20 real photos by 0 bits (19) or 2 (1) from a full decode's (scripts/measure_phash.py)."""
    im = load_rgb(data, spec.image_size, limits)
    return Prepared(to_tensor(im, spec), phash(im) if hashed else "")
