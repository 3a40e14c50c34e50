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
    """The text tower with a unit-length output, for the full context length only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(text), dim=-1)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (batch first, no dropout, same weights) written so that tracing keeps
    the sequence length symbolic: torch's own `multi_head_attention_forward` bakes the traced length into its
    reshapes, so an export traced at 12 tokens fails on any other length."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        m = self.mha
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, E] -> [B, H, L, E/H]
            return t.unflatten(-1, (m.num_heads, m.head_dim)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
        return m.out_proj(out.transpose(1, 2).flatten(2))


class TrimmedTextTower(nn.Module):
    """CLIP's text tower for token sequences of any length up to the context length.

    `encode_text` adds all 77 positional embeddings, so it only takes 77 tokens. With a causal attention mask and
    end-token pooling, the pooled token never attends to the padding after it: running the first L tokens (L =
    the longest text in the batch) gives the same embedding for a fraction of the work ("a red car" is 5 tokens,
    not 77). `trims(model)` says whether a model has that structure; the blocks are run here, as open_clip's
    ResidualAttentionBlock runs them, with `SelfAttention` in place of nn.MultiheadAttention."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.attention = nn.ModuleList(SelfAttention(block.attn) for block in model.transformer.resblocks)

    @staticmethod
    def trims(model: nn.Module) -> bool:
        mask = getattr(model, "attn_mask", None)
        transformer = getattr(model, "transformer", None)
        blocks = list(getattr(transformer, "resblocks", []))
        return (
            mask is not None and hasattr(model, "token_embedding") and hasattr(model, "positional_embedding")
            and bool((torch.triu(torch.ones_like(mask), 1).bool() == torch.isinf(mask)).all())  # causal
            and getattr(model, "text_pool_type", None) in ("argmax", "eos")
            and getattr(transformer, "batch_first", False) and bool(blocks)
            and all(isinstance(b.attn, nn.MultiheadAttention) and b.attn.batch_first and b.attn.in_proj_weight is not None
                    and not hasattr(b, "ln_1_kv") for b in blocks)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        length = text.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:length].to(cast)
        mask = m.attn_mask[:length, :length].to(x.dtype)
        for block, attention in zip(m.transformer.resblocks, self.attention, strict=True):
            x = x + block.ls_1(attention(block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = m.ln_final(x)
        x = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1)


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


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamic_length: bool = False
) -> None:
    """Trace `module` to ONNX with a dynamic batch dimension on input and output (and a dynamic sequence length).

    Traced with grad enabled: under no_grad, nn.MultiheadAttention takes a fused fast path ONNX cannot express.
    The TorchScript exporter is the one whose output the export tests hold to open_clip's forward pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)  # indices are argmax >= 0
        # shape checks traced as constants; the tests run other batch sizes than the traced one to catch a real one
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=["embedding"],
            dynamic_axes={input_name: {0: "batch", **({1: "length"} if dynamic_length else {})}, "embedding": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
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
