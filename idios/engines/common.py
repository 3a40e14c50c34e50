"""What every engine shares: the output contract (unit vectors) and how a file takes its inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return out


def second_dim_dynamic(shape: Sequence[object]) -> bool:
    """A `[N, L]` input whose L is not fixed: a text tower exported with a dynamic sequence length."""
    return len(shape) == 2 and not isinstance(shape[1], int)


DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
          "tensor(uint8)": np.uint8, "f32": np.float32, "i32": np.int32, "i64": np.int64, "u8": np.uint8}


@dataclass(frozen=True)
class Feed:
    """How a tower's file takes its inputs, read from the file itself: the main input (images, or token ids),
    then an attention mask when it has one (M-CLIP's text towers); their element types (Immich's text towers
    take int32 ids, open_clip's own exports int64; Immich's newest visual towers RGB bytes); and a batch size
    fixed at export (Immich's exporter fixes it at 1), which `run` meets by running the batch in pieces."""

    names: tuple[str, ...]
    dtypes: tuple[type, ...]
    batch: int | None  # None: any batch size
    dynamic_length: bool  # a `[N, L]` text input whose L is not fixed

    @classmethod
    def read(cls, inputs: Sequence[tuple[str, str, Sequence[object]]], file: str) -> Feed:
        """From `(name, element type, shape)` per input, as the engine reports them."""
        if not inputs or len(inputs) > 2 or (len(inputs) == 2 and "mask" not in inputs[1][0].lower()):
            names = ", ".join(name for name, _, _ in inputs) or "none"
            raise ValueError(f"{file}: takes inputs {names}; a tower takes one input, or token ids and an "
                             "attention mask")
        dtypes = []
        for name, kind, _ in inputs:
            if kind not in DTYPES:
                raise ValueError(f"{file}: input {name} is {kind}; a tower takes float32, uint8, int32 or int64")
            dtypes.append(DTYPES[kind])
        shape = list(inputs[0][2])
        batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        return cls(tuple(n for n, _, _ in inputs), tuple(dtypes), batch, second_dim_dynamic(shape))

    def run(self, call: Callable[[dict[str, np.ndarray]], np.ndarray], batch: np.ndarray,
            mask: np.ndarray | None = None) -> np.ndarray:
        """`call` (one run of the engine, returning a copy of its first output) over the whole batch."""
        arrays = [batch]
        if len(self.names) == 2:
            arrays.append(mask if mask is not None else np.ones(batch.shape, dtype=self.dtypes[1]))
        arrays = [np.ascontiguousarray(a, dtype=t) for a, t in zip(arrays, self.dtypes)]
        if self.batch is None or len(batch) == self.batch:
            return call(dict(zip(self.names, arrays)))
        out = []
        for start in range(0, len(batch), self.batch):
            piece = [a[start:start + self.batch] for a in arrays]
            short = self.batch - len(piece[0])
            if short:  # the last piece is filled up with copies of its last row, whose outputs are dropped
                piece = [np.concatenate([p, np.repeat(p[-1:], short, axis=0)]) for p in piece]
            out.append(call(dict(zip(self.names, piece)))[:self.batch - short])
        return np.concatenate(out)
