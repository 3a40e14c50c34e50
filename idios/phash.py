"""A 64-bit perceptual hash (pHash) of a decoded image, stored beside its embedding to tell copies from near
duplicates. It is the `imagehash` library's `phash`, bit for bit (tests/test_phash.py), in numpy alone: greyscale,
resize to 32x32 (Lanczos), 2-D DCT-II, the top-left 8x8 coefficients, each bit = coefficient > their median.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
IMG_SIZE = 4 * HASH_SIZE  # imagehash's highfreq_factor 4
HEX_CHARS = HASH_SIZE * HASH_SIZE // 4

# Two images whose hashes differ in at most this many of 64 bits count as exact copies. Measured on 20 real
# photos (scripts/measure_phash.py; hashes have 32 bits set, so distances are even): of 300 copies (JPEG q30-95,
# PNG, WebP, 25-200% resizes, EXIF rotations) 297 are within 2 bits and 3 at 4 (JPEG q30, a 50% resize at q75);
# of 160 crops (85-95%), rotations (2-5 degrees) and rescans 6 are within 2 bits, 25 within 4; other photos
# differ in 20-40. 2 makes the fewest mistakes (9 of 460; 4 would make 25). pHash reads luma at 32x32, so it
# cannot tell a brightness or contrast change (95% within 2 bits) or a greyscale copy from the original.
EXACT_BITS = 2

# Rows 0..7 of the 32-point DCT-II matrix, unnormalised as scipy.fftpack.dct computes it (2 cos(...)): the
# scale changes no comparison with the median, and matching it keeps the float arithmetic close to imagehash's.
_n = np.arange(IMG_SIZE)
_DCT = 2.0 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * _n[None, :] + 1) / (2 * IMG_SIZE))


def phash(image: Image.Image) -> str:
    """The image's pHash as 16 lowercase hex digits, bits in imagehash's order (row by row, first bit highest)."""
    small = image.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T  # the 8x8 lowest frequencies of the 2-D DCT-II, vertical frequency first
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{HEX_CHARS}x}"


def distance(a: str, b: str) -> int:
    """How many of the 64 bits two hashes differ in."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def valid(value: str) -> bool:
    """Whether `value` is a hash as stored: 16 lowercase hex digits."""
    return len(value) == HEX_CHARS and all(c in "0123456789abcdef" for c in value)
