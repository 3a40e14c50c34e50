"""Immich's published ONNX exports of CLIP (`immich-app/ViT-B-32__openai` and dozens more), read into our manifest.

Their layout, from Immich's own code (machine-learning/immich_ml/models/clip, its exporter, and the graphs of
immich-app/ml-models): open_clip's `config.json` at the top; `visual/model.onnx` with `visual/preprocess_cfg.json`
(open_clip's `get_model_preprocess_cfg`); `textual/model.onnx` with the Hugging Face tokenizer files. Their
visual towers take `image` float32 [N, 3, S, S], or RGB bytes [N, S, S, 3] in the newer exports (normalised in
the graph); their text towers `text` int32, or `input_ids` and `attention_mask` for M-CLIP's multilingual ones;
some at a batch size fixed to 1; large ones keep their weights in files beside model.onnx (external data)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from idios import errors
from idios.models import INTERPOLATIONS, RESIZES

# what says which layout a repo has, and how to read it (small files, fetched first)
SMALL = ["config.json", "visual/preprocess_cfg.json", "textual/tokenizer_config.json"]
# the towers' folders: their model.onnx, any external-data files beside it, the tokenizer; not the ARM NN, RKNN
# or other copies Immich keeps in sub-folders
FILES = ["visual/*", "textual/*"]
SKIP = ["visual/*/*", "textual/*/*", "*.armnn", "*.rknn"]
NOT_WEIGHTS = {".json", ".txt", ".model", ".md"}  # configs and the tokenizer's other forms (vocab, merges, spm)


class Unservable(ValueError):
    """An export the service cannot serve exactly: one line saying why."""


def read(snapshot: Path, work: Path, link: Callable[[Path, Path], None]) -> dict[str, Any]:
    """An Immich export → our manifest: preprocessing from visual/preprocess_cfg.json, sizes and the text
    clean-up from open_clip's config.json, the pad token from the tokenizer's config. The towers' files are
    placed in `work` with `link(source, destination)`; raises Unservable for what cannot be served exactly."""
    config = _json(snapshot / "config.json")
    if not (snapshot / "visual/model.onnx").is_file():
        raise Unservable("the repo has config.json but no visual/model.onnx: not an Immich CLIP export")
    pre = _json(snapshot / "visual/preprocess_cfg.json") if (snapshot / "visual/preprocess_cfg.json").is_file() else {}
    size = pre.get("size", (config.get("vision_cfg") or {}).get("image_size"))
    if isinstance(size, list):
        if len(set(size)) != 1:
            raise Unservable(f"images of {size[0]}x{size[1]}: only square model inputs are served")
        size = size[0]
    resize = str(pre.get("resize_mode", "shortest"))
    if resize not in RESIZES:
        raise Unservable(f"resize_mode {resize!r} (open_clip's letterbox): only {' and '.join(RESIZES)} are served")
    interpolation = str(pre.get("interpolation", "bicubic")).lower()
    if interpolation not in INTERPOLATIONS:
        raise Unservable(f"interpolation {interpolation!r}: only {' and '.join(INTERPOLATIONS)} are served")
    if not isinstance(size, int) or "embed_dim" not in config:
        raise Unservable("config.json has no embed_dim or no image size: not an open_clip model config")
    data: dict[str, list[str]] = {"visual": [], "textual": []}
    for rel in sorted(p.relative_to(snapshot).as_posix() for p in snapshot.glob("*/*") if p.is_file()):
        folder, file = rel.split("/", 1)
        if folder in data and (Path(file).suffix not in NOT_WEIGHTS or rel == "textual/tokenizer.json"):
            link(snapshot / rel, work / rel)
            if file not in ("model.onnx", "tokenizer.json"):
                data[folder].append(rel)  # external data: the weights of a file past protobuf's 2 GiB
    pixels = visual_pixels(work / "visual/model.onnx", size)
    manifest: dict[str, Any] = {
        "description": f"{(config.get('text_cfg') or {}).get('hf_tokenizer_name') or 'CLIP'} (Immich's ONNX export)",
        "dim": int(config["embed_dim"]), "image_size": size, "resize": resize, "interpolation": interpolation,
        "mean": pre.get("mean", [0.48145466, 0.4578275, 0.40821073]),
        "std": pre.get("std", [0.26862954, 0.26130258, 0.27577711]),
        "visual": {"file": "visual/model.onnx", "pixels": pixels, "data": data["visual"]},
        "precision": "fp32", "random_weights": False,
    }
    if (work / "textual/model.onnx").is_file():
        manifest["text"] = _text(snapshot, work, config) | {"data": data["textual"]}
    return manifest


def visual_pixels(path: Path, size: int) -> str:
    """What the visual file takes: `float` [N, 3, S, S] (normalised by the service) or `uint8` [N, S, S, 3]
    (Immich's newer exports fold the normalisation into the graph); anything else is refused."""
    (name, kind, shape), *_ = onnx_inputs(path)
    dims = [d if isinstance(d, int) else None for d in shape]
    if kind == "tensor(float)" and len(dims) == 4 and dims[1] == 3 and dims[2] in (size, None):
        return "float"
    if kind == "tensor(uint8)" and len(dims) == 4 and dims[3] == 3 and dims[1] in (size, None):
        return "uint8"
    raise Unservable(f"the visual tower takes {name} {kind} {shape}: the service feeds [N, 3, {size}, {size}] float "
                  f"or [N, {size}, {size}, 3] uint8 images")


def _text(snapshot: Path, work: Path, config: dict[str, Any]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    if not (work / "textual/tokenizer.json").is_file():
        raise Unservable("textual/model.onnx comes without textual/tokenizer.json")
    text_cfg = config.get("text_cfg") or {}
    tok_cfg = _json(snapshot / "textual/tokenizer_config.json") if (snapshot / "textual/tokenizer_config.json").is_file() else {}
    pad = tok_cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not isinstance(pad, str) or not pad:
        raise Unservable("textual/tokenizer_config.json names no pad_token: the padding id is unknown")
    pad_id = Tokenizer.from_file(str(work / "textual/tokenizer.json")).token_to_id(pad)
    if pad_id is None:
        raise Unservable(f"the pad token {pad!r} of textual/tokenizer_config.json is not in textual/tokenizer.json")
    inputs = [(name, shape) for name, _, shape in onnx_inputs(work / "textual/model.onnx")]
    if len(inputs) == 2:  # M-CLIP: the reference tokenises raw text, and padding is masked out
        clean = "none"
    else:  # open_clip: its SimpleTokenizer lower-cases, its Hugging Face tokenizers keep case
        kwargs = text_cfg.get("tokenizer_kwargs") or {}
        clean = str(kwargs.get("clean") or ("whitespace" if text_cfg.get("hf_tokenizer_name") else "lower"))
    context = inputs[0][1][1] if len(inputs[0][1]) == 2 and isinstance(inputs[0][1][1], int) else None
    # padded to the whole context: only our own causal CLIP exports may be trimmed to the longest text
    return {"file": "textual/model.onnx", "tokenizer": "textual/tokenizer.json",
            "context_length": int(context or text_cfg.get("context_length", 77)), "clean": clean,
            "pad_id": int(pad_id), "trim": False}


def _json(path: Path) -> dict[str, Any]:
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise Unservable(f"{path.name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Unservable(f"{path.name} is not a JSON object")
    return value


def onnx_inputs(path: Path) -> list[tuple[str, str, list[object]]]:
    """(name, element type, shape) of each input of an ONNX file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # a file onnxruntime cannot read: one line, not its traceback
        raise Unservable(f"{path.parent.name}/{path.name} cannot be loaded: {errors.brief(exc)}") from None
    return [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]

