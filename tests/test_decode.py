"""Decoding real image bytes of every common kind, and refusing what is not a usable image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from idios import errors
from idios.decode import DecodeLimits, load_rgb, preprocess
from idios.models import load_manifest
from tests.conftest import ROOT
from tests.imagekit import encode, picture

LIMITS = DecodeLimits()
SPEC = load_manifest(ROOT / "models" / "thumb_grid")


def embed_like(data: bytes) -> np.ndarray:
    x = preprocess(data, SPEC, LIMITS)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    return x


def close(a: np.ndarray, b: np.ndarray, tol: float = 0.05) -> bool:
    return float(np.abs(a - b).mean()) < tol


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA", "I;16"])
def test_modes_are_converted(mode: str) -> None:
    base = picture("modes")
    if mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
        data = encode(im, "PNG")
    elif mode == "CMYK":
        data = encode(base.convert("CMYK"), "JPEG", quality=95)
    else:
        data = encode(base.convert(mode), "PNG")
    x = embed_like(data)
    assert np.isfinite(x).all()


def test_palette_with_transparency() -> None:
    im = picture("pal").convert("P")
    im.info["transparency"] = 0
    embed_like(encode(im, "PNG", transparency=0))


def test_exif_rotation_is_applied() -> None:
    upright = picture("exif", (480, 640))
    stored = upright.rotate(90, expand=True)  # what a camera writes; orientation 6 says "rotate 270 to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert close(embed_like(rotated), embed_like(encode(upright, "JPEG", quality=95)))


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [picture("gif1").convert("P"), picture("gif2").convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = embed_like(encode(frames[0], "GIF"))
    assert close(embed_like(buf.getvalue()), first, tol=1e-3)


def test_jpeg_draft_decoding_stays_close_to_a_full_decode() -> None:
    data = encode(picture("big", (2400, 1800)), "JPEG", quality=92)
    fast = embed_like(data)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    from idios.decode import to_tensor

    assert close(fast, to_tensor(full, SPEC), tol=0.01)


def test_large_jpegs_decode_at_reduced_size_and_others_at_full_size() -> None:
    """DCT scaling skips work on big JPEGs; nothing else is resampled before the model's own resize."""
    assert load_rgb(encode(picture("huge", (4000, 3000)), "JPEG"), 224, LIMITS).size == (2000, 1500)
    assert load_rgb(encode(picture("huge", (3000, 1500)), "PNG"), 224, LIMITS).size == (3000, 1500)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height but carries almost no data: a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", errors.NotAnImage),
        (b"<html><body>hello</body></html>", errors.NotAnImage),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="500" height="500"></svg>',
         errors.NotAnImage),
        (encode(picture("t"), "JPEG")[:2000], errors.NotAnImage),
        (encode(picture("small", (149, 600)), "PNG"), errors.ImageTooSmall),
        (png_header(50_000, 50_000), errors.ImageTooLarge),
    ],
    ids=["empty", "html", "svg", "truncated-jpeg", "too-small", "bomb"],
)
def test_unusable_images_are_refused(data: bytes, error: type[errors.IdiosError]) -> None:
    with pytest.raises(error) as info:
        preprocess(data, SPEC, LIMITS)
    assert info.value.status == 422 and info.value.message


def test_16_bit_greyscale_keeps_its_tones() -> None:
    """Pillow's own convert("RGB") clips 16-bit values at 255, turning most of a photo white."""
    grey = np.asarray(picture("wide").convert("L"))
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    rgb = np.asarray(load_rgb(encode(wide, "PNG"), 224, LIMITS))
    assert np.array_equal(rgb[..., 0], grey) and np.array_equal(rgb[..., 2], grey)


@pytest.mark.parametrize("size", [(1000, 750), (750, 1000), (640, 480), (333, 1000), (1600, 300), (224, 500),
                                  (500, 224), (300, 301), (224, 224)])
def test_the_centre_crop_resize_is_open_clips_resize_then_crop(size: tuple[int, int]) -> None:
    """to_tensor resizes only the source box that becomes the centre crop: within 1 of 255 of resizing the
    whole image then cropping (open_clip's order), on every pixel."""
    import dataclasses

    from idios.decode import to_tensor

    spec = dataclasses.replace(SPEC, resize="shortest", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    im = picture(f"crop-{size}", size)
    w, h = im.size
    full = im.resize((224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224), Image.Resampling.BICUBIC)
    left, top = round((full.width - 224) / 2), round((full.height - 224) / 2)
    want = np.asarray(full.crop((left, top, left + 224, top + 224)), dtype=np.float32).transpose(2, 0, 1) / 255
    got = to_tensor(im, spec)
    assert got.shape == (3, 224, 224)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
