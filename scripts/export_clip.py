"""open_clip → ONNX: both towers with L2-normalised outputs and a dynamic batch, plus a torch-free tokenizer.json."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OPSET = 18


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be downloaded or read."""


class UnknownArch(ValueError):
    """The architecture is not one open_clip knows."""


class ImageTower(nn.Module):
    """The visual tower with a unit-length output, as the runtime stores it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(image), dim=-1)


class TextTower(nn.Module):
    """The text tower with a unit-length output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(text), dim=-1)


@dataclass
class ClipModel:
    """A loaded open_clip model and what the runtime needs to feed it."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    context_length: int
    quick_gelu: bool


def load(arch: str, pretrained: str | None, random_weights: bool = False) -> ClipModel:
    """Build `arch` with `pretrained` weights (a tag or a checkpoint file), or seeded random weights.

    The activation follows the tag (OpenAI's weights were trained with QuickGELU), random weights included, so a
    random export has exactly the graph of the real one."""
    import open_clip

    if arch not in open_clip.list_models():
        raise UnknownArch(f"open_clip has no architecture {arch!r} (open_clip.list_models() lists them)")
    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
    torch.manual_seed(0)
    try:
        model = open_clip.create_model(
            arch, pretrained=None if random_weights else pretrained, force_quick_gelu=quick_gelu
        )
    except Exception as exc:  # the hub client raises many types; the user needs one line, not a trace
        if random_weights or not pretrained:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(f"could not load pretrained weights {pretrained!r} for {arch}: {first}") from None
    model.eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    if cfg.get("interpolation", "bicubic") != "bicubic" or cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise ValueError(f"{arch}: the runtime reproduces bicubic shortest/squash resizing only, not {cfg}")
    size = cfg["size"]
    size = size if isinstance(size, int) else size[0]
    return ClipModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        image_size=int(size),
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        resize=str(cfg.get("resize_mode", "shortest")),
        context_length=int(model.context_length),
        quick_gelu=quick_gelu,
    )


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str) -> None:
    """Trace `module` to ONNX with a dynamic batch dimension on input and output.

    Traced with grad enabled: under no_grad, nn.MultiheadAttention takes a fused fast path ONNX cannot express.
    The TorchScript exporter is the one whose output the export tests hold to open_clip's forward pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)  # indices are argmax >= 0
        # shape checks traced as constants; the tests run other batch sizes than the traced one to catch a real one
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=["embedding"],
            dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )


def tokenizer_json(tok: Any) -> str:
    """open_clip's SimpleTokenizer as a Hugging Face tokenizer: same regex split, byte map, BPE merges and ids.

    The text clean-up (ftfy, HTML entities, whitespace, lower case) is done by the runtime (idios.textclean)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    bpe = BPE(vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
    out = Tokenizer(bpe)
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pat.pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    out.decoder = decoders.ByteLevel()
    sot, eot = tok.sot_token_id, tok.eot_token_id
    sot_s, eot_s = tok.decoder[sot], tok.decoder[eot]
    out.add_special_tokens([AddedToken(tok.decoder[i], normalized=False) for i in tok.all_special_ids])
    # Truncation keeps room for these two, so a long text ends in eot as open_clip's does.
    out.post_processor = processors.TemplateProcessing(
        single=f"{sot_s} $A {eot_s}", special_tokens=[(sot_s, sot), (eot_s, eot)]
    )
    return out.to_str()
