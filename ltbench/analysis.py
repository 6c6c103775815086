"""Diagnostics of trained ViTs beyond the paper's code: attention locality and CLS/DIST agreement."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def mean_attention_distance(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per block, the attention-weighted mean distance (in pixels) between query and key patches.

    Prefix tokens (CLS, DIST) are left out as queries and keys; the attention of each patch query is
    renormalised over patch keys. Small distances in early blocks mean CNN-like local attention,
    the locality argument of DeiT-LT.
    """
    captured: list[torch.Tensor] = []
    hooks = [blk.attn.register_forward_hook(lambda mod, inp, out: captured.append(_attention(mod, inp[0])))
             for blk in model.blocks]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    prefix = model.num_prefix_tokens
    grid = int(math.isqrt(captured[0].shape[-1] - prefix))
    patch = model.patch_embed.patch_size[0]
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    dist = torch.cdist(coords.float(), coords.float()).to(x.device) * patch
    out = []
    for attn in captured:
        a = attn[:, :, prefix:, prefix:]
        a = a / a.sum(dim=-1, keepdim=True)
        out.append(float((a * dist).sum(-1).mean()))
    return out


def _attention(attn_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute a timm Attention block's probabilities (its fused kernel does not return them)."""
    b, n, c = x.shape
    heads = attn_module.num_heads
    qkv = attn_module.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = attn_module.q_norm(qkv[0]), attn_module.k_norm(qkv[1])
    return (q @ k.transpose(-2, -1) * attn_module.scale).softmax(dim=-1)


@torch.no_grad()
def cls_dist_cosine(model: nn.Module, x: torch.Tensor) -> float:
    """Mean cosine similarity between the final CLS and DIST token embeddings."""
    tokens = model.forward_features(x)
    return float(F.cosine_similarity(tokens[:, 0], tokens[:, 1], dim=-1).mean())
