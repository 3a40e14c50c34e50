"""Model repos for the stand-in hub, built by the suite: Immich's layout (with the input names, element types and
fixed shapes of Immich's real exports) and ours.

The towers are thumb_grid's (scripts/make_thumb_model.py: an 8x8 colour grid, colour words for text), so that a
pulled model's search results can be checked by eye as well as against the ONNX files' own outputs."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from scripts import make_thumb_model as thumb

CONTEXT = 77
# OpenAI CLIP's preprocessing, as open_clip writes it into visual/preprocess_cfg.json
PREPROCESS = {"size": 224, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest",
              "fill_color": 0}


def _save(model: onnx.ModelProto) -> bytes:
    buf = io.BytesIO()
    onnx.save(model, buf)
    return buf.getvalue()


def visual(batch: int | str = 1) -> bytes:
    """thumb_grid's visual tower as Immich exports one: `image` float32 [1, 3, 224, 224] -> `embedding`."""
    model = thumb.visual_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    onnx.checker.check_model(model)
    return _save(model)


def visual_uint8() -> bytes:
    """Immich's newer visual export (immich-app/ml-models): `image` uint8 [batch, 224, 224, 3] RGB bytes, cast and
    transposed in the graph (the normalisation folded in), -> `image_embedding`."""
    k = thumb.SIZE // thumb.GRID
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["image_f32"], ["image_chw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["image_chw"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        *thumb._normalise_nodes("flat", "image_embedding"),
    ]
    graph = helper.make_graph(
        nodes, "uint8_visual",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", thumb.SIZE, thumb.SIZE, 3])],
        [helper.make_tensor_value_info("image_embedding", TensorProto.FLOAT, ["batch", thumb.DIM])],
        initializer=thumb._consts(),
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", thumb.OPSET)],
                                   ir_version=thumb.IR_VERSION))


def external(model_bytes: bytes, folder: str) -> dict[str, bytes]:
    """The model saved as a file past protobuf's 2 GiB is: the graph in model.onnx, each weight in a file of
    its own beside it (as Immich's large text towers, e.g. XLM-RoBERTa-Large)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load_from_string(model_bytes)
        onnx.save(model, f"{tmp}/model.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                  size_threshold=1024)  # small constants stay in the graph, as in real exports
        return {f"{folder}/{p.name}": p.read_bytes() for p in Path(tmp).iterdir()}


def vocab(case: bool = False) -> dict[str, int]:
    """A word-level vocabulary whose pad token is not id 0, as in CLIP's Hugging Face tokenizer."""
    words = ["!", "<|endoftext|>", "[UNK]", *thumb.COLOURS]
    if case:
        words += [w.capitalize() for w in thumb.COLOURS]
    return {w: i for i, w in enumerate(words)}


def table(words: dict[str, int]) -> np.ndarray:
    """Colour words point at their colour; `Red` (capitalised) at green, so that lower-casing shows; the other
    tokens get small vectors of their own, so that a wrong pad id or a missing mask shows too."""
    rows = np.zeros((len(words), thumb.DIM), dtype=np.float32)
    rng = np.random.default_rng(4213)
    for word, i in words.items():
        key = word.lower()
        if key in thumb.COLOURS:
            colour = thumb.COLOURS["green" if word != key and key == "red" else key]
            rows[i] = thumb.colour_embedding(colour)
        else:
            rows[i] = rng.normal(0, 0.003, thumb.DIM)  # 70 pads of these stay below one colour word
    return rows


def text_clip(words: dict[str, int], context: int = CONTEXT) -> bytes:
    """An open_clip text tower as Immich exports one: `text` int32 [1, 77] -> `embedding`."""
    nodes = [
        helper.make_node("Gather", ["table", "text"], ["vectors"], axis=0),
        helper.make_node("ReduceSum", ["vectors", "axes1"], ["summed"], keepdims=0),
        *thumb._normalise_nodes("summed", "embedding"),
    ]
    graph = helper.make_graph(
        nodes, "clip_text",
        [helper.make_tensor_value_info("text", TensorProto.INT32, [1, context])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, thumb.DIM])],
        initializer=[numpy_helper.from_array(table(words), "table"), *thumb._consts()],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", thumb.OPSET)],
                                   ir_version=thumb.IR_VERSION))


def text_mclip(words: dict[str, int]) -> bytes:
    """M-CLIP's text tower as Immich exports it: `input_ids`, `attention_mask` int32 [1, 77], mean-pooled over
    the mask -> `embedding`."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["vectors"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes2"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axes1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        *thumb._normalise_nodes("pooled", "embedding"),
    ]
    graph = helper.make_graph(
        nodes, "mclip_text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, CONTEXT]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT32, [1, CONTEXT])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, thumb.DIM])],
        initializer=[numpy_helper.from_array(table(words), "table"),
                     numpy_helper.from_array(np.array([2], dtype=np.int64), "axes2"), *thumb._consts()],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", thumb.OPSET)],
                                   ir_version=thumb.IR_VERSION))


def tokenizer(words: dict[str, int], lowercase: bool) -> bytes:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def immich_clip(preprocess: dict[str, object] | None = None, dim: int = thumb.DIM,
                pad_token: str = "<|endoftext|>") -> dict[str, bytes]:
    """An Immich-layout open_clip repo (as immich-app/ViT-B-32__openai), with the files Immich's repos also
    carry that the service must not download (an ARM NN copy, a README)."""
    words = vocab()
    config = {"embed_dim": dim, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
              "text_cfg": {"context_length": CONTEXT, "vocab_size": len(words), "width": 512}}
    return {
        "config.json": json.dumps(config).encode(),
        "visual/model.onnx": visual(1),
        "visual/preprocess_cfg.json": json.dumps(preprocess or PREPROCESS).encode(),
        "visual/fp16/model.armnn": b"\0" * 4096,
        "textual/model.onnx": text_clip(words),
        "textual/tokenizer.json": tokenizer(words, lowercase=True),
        "textual/tokenizer_config.json": json.dumps({"pad_token": pad_token, "model_max_length": CONTEXT,
                                                     "tokenizer_class": "CLIPTokenizer"}).encode(),
        "textual/special_tokens_map.json": json.dumps({"pad_token": "<|endoftext|>"}).encode(),
        "README.md": b"---\ntags:\n - immich\n - clip\n---\n",
    }


def immich_mclip() -> dict[str, bytes]:
    """An Immich-layout M-CLIP repo (as immich-app/XLM-Roberta-Large-Vit-B-32): a case-keeping tokenizer,
    `input_ids` + `attention_mask`, the visual tower at a dynamic batch size (as Immich's older exports)."""
    words = {"<pad>": 1, **{w: i for w, i in vocab(case=True).items() if w != "<|endoftext|>"}}
    config = {"embed_dim": thumb.DIM, "vision_cfg": {"image_size": 224}, "text_cfg": {"context_length": CONTEXT}}
    return {
        "config.json": json.dumps(config).encode(),
        "visual/model.onnx": visual("batch_size"),
        "visual/preprocess_cfg.json": json.dumps(PREPROCESS).encode(),
        **external(text_mclip(words), "textual"),
        "textual/tokenizer.json": tokenizer(words, lowercase=False),
        "textual/sentencepiece.bpe.model": b"not weights: the tokenizer's other form",
        "textual/tokenizer_config.json": json.dumps({"pad_token": {"content": "<pad>"},
                                                     "tokenizer_class": "XLMRobertaTokenizer"}).encode(),
    }



def immich_siglip(clean: str | None = "canonicalize") -> dict[str, bytes]:
    """A SigLIP-like repo as Immich's newest exports: uint8 pixels at a dynamic batch, squash resize, a Hugging
    Face tokenizer that keeps case (open_clip's `hf_tokenizer_name`) with its clean-up in `tokenizer_kwargs`."""
    words = {"<pad>": 1, **{w: i for w, i in vocab(case=True).items() if w != "<|endoftext|>"}}
    text_cfg: dict[str, object] = {"context_length": 64, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}
    if clean:
        text_cfg["tokenizer_kwargs"] = {"clean": clean}
    return {
        "config.json": json.dumps({"embed_dim": thumb.DIM, "vision_cfg": {"image_size": 224},
                                   "text_cfg": text_cfg}).encode(),
        "visual/model.onnx": visual_uint8(),
        "visual/preprocess_cfg.json": json.dumps({**PREPROCESS, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                  "resize_mode": "squash"}).encode(),
        "textual/model.onnx": text_clip(words, context=64),
        "textual/tokenizer.json": tokenizer(words, lowercase=False),
        "textual/tokenizer_config.json": json.dumps({"pad_token": "<pad>"}).encode(),
    }
