"""Backbones: timm Vision Transformers (plain and distilled). CNN backbones live in ``ltbench.cnn``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TIMM_FACTORY = "timm.create_model"
FIXED = {"mlp_ratio": 4.0, "qkv_bias": True}  # what every ltbench ViT shares


def vit(*, num_classes: int, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
        drop_path: float = 0.0, distilled: bool = False) -> nn.Module:
    """A from-scratch timm ViT; ``distilled`` adds DeiT's DIST token and second head."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
               num_classes=num_classes, drop_path_rate=drop_path, **FIXED)


def vit_architecture(*, num_classes: int, img_size: int, patch_size: int, embed_dim: int, depth: int,
                     num_heads: int, distilled: bool = False) -> dict[str, Any]:
    """The ``timm.create_model`` call that builds the network :func:`vit` builds (an export's card): the kwargs
    override every default of the named entry point."""
    name = "deit_base_distilled_patch16_224" if distilled else "vit_base_patch16_224"
    kwargs = {"num_classes": num_classes, "img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
              "depth": depth, "num_heads": num_heads, **FIXED}
    return {"factory": TIMM_FACTORY, "name": name, "kwargs": kwargs}


def distilled_heads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-head and DIST-head logits of a timm distilled ViT, in train and eval mode alike."""
    tokens = model.forward_features(x)
    return model.head(model.head_drop(tokens[:, 0])), model.head_dist(model.head_drop(tokens[:, 1]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
