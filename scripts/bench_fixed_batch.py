#!/usr/bin/env python3
"""What a batch size fixed at export costs: ViT-B/32's visual tower (random weights) exported as Immich's exporter
does (batch 1) and with a dynamic batch, both run over the same images in batches of 16 (the fixed one in pieces
of 1, as the service runs it), interleaved rounds, onnxruntime fp32 and OpenVINO bf16. Prints img/s per tower.

Needs the export environment (torch, open_clip):  .venv-export/bin/python scripts/bench_fixed_batch.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import export_clip as ec  # noqa: E402
from idios.engines.onnxruntime import OrtTower  # noqa: E402
from idios.engines.openvino import OpenVinoTower  # noqa: E402


class Visual(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.encode_image(x, normalize=True)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    clip = ec.load("ViT-B-32", "openai", random_weights=True)
    tmp = Path(tempfile.mkdtemp())
    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, axes in (("fixed", None), ("dynamic", {"image": {0: "b"}, "embedding": {0: "b"}})):
            torch.onnx.export(Visual(clip.model), (torch.randn(1, 3, 224, 224),), str(tmp / f"{name}.onnx"),
                              input_names=["image"], output_names=["embedding"], opset_version=17, dynamo=False,
                              dynamic_axes=axes)
    x = np.random.default_rng(0).normal(size=(args.images, 3, 224, 224)).astype(np.float32)
    towers = {}
    for name in ("fixed", "dynamic"):
        towers[f"onnxruntime fp32 {name}"] = OrtTower(tmp / f"{name}.onnx", args.threads)
        towers[f"openvino bf16 {name}"] = OpenVinoTower(tmp / f"{name}.onnx", args.threads, "bf16")

    def run(tower: OrtTower | OpenVinoTower) -> np.ndarray:
        return np.concatenate([tower.run(x[i:i + 16]) for i in range(0, len(x), 16)])

    for tower in towers.values():
        run(tower)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in towers}
    for _ in range(args.rounds):
        for key, tower in towers.items():
            start = time.perf_counter()
            run(tower)
            rates[key].append(len(x) / (time.perf_counter() - start))
    for key, r in rates.items():
        print(f"{key:26s} batch {towers[key].feed.batch or 'any':>3}  img/s median {np.median(r):.1f}  "
              f"(rounds {', '.join(f'{v:.1f}' for v in r)})")
    a, b = run(towers["onnxruntime fp32 fixed"]), run(towers["onnxruntime fp32 dynamic"])
    print(f"fixed vs dynamic: min cosine {float((a * b).sum(1).min()):.7f}")


if __name__ == "__main__":
    main()
