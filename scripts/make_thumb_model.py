#!/usr/bin/env python3
"""Build `thumb_grid`: a tiny, deterministic ONNX image model for near-duplicate search, with no weights to download.

The image is average-pooled to an 8×8 RGB grid, centred and L2-normalised (192 values): close to a perceptual
hash. It finds copies, crops-free resizes and re-encodings of the same picture; it knows nothing of meaning —
export a CLIP model (scripts/export_model.py) for that. Its contract is the exported models' one: input
`image` [N, 3, 224, 224] float32 normalised, output `embedding` [N, 192] L2-normalised.

With --text it also writes a toy text tower (colour words → the grid of a plain image of that colour) and a
tokenizer.json, which the test suite uses to exercise text search without torch.

    python scripts/make_thumb_model.py [OUT_DIR] [--name NAME] [--text]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 224
GRID = 8
DIM = 3 * GRID * GRID
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
OPSET = 18
IR_VERSION = 9
# Grey levels centre to zero in this model, so only chromatic words get a direction.
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}


def _normalise_nodes(src: str, out: str) -> list[onnx.NodeProto]:
    """out = centred(src) / ||centred(src)||, row-wise."""
    return [
        helper.make_node("ReduceMean", [src, "axes1"], ["mean"], keepdims=1),
        helper.make_node("Sub", [src, "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes1"], ["sumsq"], keepdims=1),
        helper.make_node("Add", ["sumsq", "eps"], ["sumsq_eps"]),
        helper.make_node("Sqrt", ["sumsq_eps"], ["norm"]),
        helper.make_node("Div", ["centred", "norm"], [out]),
    ]


def _consts(dim: int = DIM) -> list[onnx.TensorProto]:
    consts = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
    ]
    if dim != DIM:
        consts.append(numpy_helper.from_array(np.array([0, 0, 0, dim - DIM], dtype=np.int64), "pads"))
    return consts


def _padded(nodes: list[onnx.NodeProto], dim: int) -> list[onnx.NodeProto]:
    """The same unit vector in `dim` values, zeros after the first 192 (a wider collection for benchmarks)."""
    if dim == DIM:
        return nodes
    nodes[-1].output[0] = "unpadded"
    return [*nodes, helper.make_node("Pad", ["unpadded", "pads"], ["embedding"])]


def visual_model(dim: int = DIM) -> onnx.ModelProto:
    k = SIZE // GRID
    nodes = _padded([
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        *_normalise_nodes("flat", "embedding"),
    ], dim)
    graph = helper.make_graph(
        nodes, "thumb_grid_visual",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=_consts(dim),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def colour_embedding(rgb: tuple[float, float, float]) -> np.ndarray:
    """What the visual tower computes for a plain image of colour `rgb` (before centring)."""
    chans = [(c - m) / s for c, m, s in zip(rgb, MEAN, STD, strict=True)]
    return np.repeat(np.asarray(chans, dtype=np.float32), GRID * GRID)


def text_model(vocab: dict[str, int], dim: int = DIM) -> onnx.ModelProto:
    table = np.zeros((len(vocab), DIM), dtype=np.float32)
    for word, rgb in COLOURS.items():
        table[vocab[word]] = colour_embedding(rgb)
    nodes = _padded([
        helper.make_node("Gather", ["table", "text"], ["vectors"], axis=0),
        helper.make_node("ReduceSum", ["vectors", "axes1"], ["summed"], keepdims=0),
        *_normalise_nodes("summed", "embedding"),
    ], dim)
    graph = helper.make_graph(
        nodes, "thumb_grid_text",
        [helper.make_tensor_value_info("text", TensorProto.INT64, ["batch", "context"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(table, "table"), *_consts(dim)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def tokenizer_json(vocab: dict[str, int]) -> str:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


DUPLICATES = {"min_similarity": 80, "measured": "2026-12-02", "precision": 0.991, "recall": 0.879}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, name: str = "thumb_grid", text: bool = False, dim: int = DIM) -> Path:
    """Write the model folder `out` (created) and return it; `dim` > 192 pads the vectors with zeros."""
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(visual_model(dim), out / "visual.onnx")
    manifest: dict[str, object] = {
        "name": name,
        "description": "8x8 RGB grid, centred and L2-normalised: near-duplicate search, no semantics",
        "dim": dim,
        "image_size": SIZE,
        "resize": "squash",
        "mean": list(MEAN),
        "std": list(STD),
        "visual": {"file": "visual.onnx"},
        "precision": "fp32",
        "random_weights": False,
        # measured by scripts/duplicate_quality.py on real photos (README "Duplicates"); the padding of a wider
        # copy changes no cosine
        "duplicates": dict(DUPLICATES),
    }
    if text:
        vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(COLOURS)}}
        onnx.save(text_model(vocab, dim), out / "text.onnx")
        (out / "tokenizer.json").write_text(tokenizer_json(vocab))
        manifest["text"] = {"file": "text.onnx", "tokenizer": "tokenizer.json", "context_length": 16}
    files = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    manifest["sha256"] = {f: _sha256(out / f) for f in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=Path("models/thumb_grid"), help="model folder to write")
    parser.add_argument("--name", default="thumb_grid", help="model name (also its collection's suffix)")
    parser.add_argument("--text", action="store_true", help="add the toy colour-word text tower")
    args = parser.parse_args()
    print(build(args.out, args.name, args.text))


if __name__ == "__main__":
    main()
