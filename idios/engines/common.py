"""What every engine shares: the output contract (unit vectors) and reading an input's shape."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return out


def second_dim_dynamic(shape: Sequence[object]) -> bool:
    """A `[N, L]` input whose L is not fixed: a text tower exported with a dynamic sequence length."""
    return len(shape) == 2 and not isinstance(shape[1], int)
