"""``livt``: LiVT (Xu et al., "Learning Imbalanced Data with Vision Transformers", CVPR 2023), and its first stage
``livt_mgp``.

Stage 1, Masked Generative Pretraining (``livt_mgp``): an MAE (He et al. 2022) trained on the long-tailed
training set only. 75 % of the patches are hidden at random per image; the ViT encoder sees the visible ones,
a light transformer decoder (8 blocks of width 512 with learned position embeddings) reconstructs the hidden
patches' pixels, normalised per patch (``norm_pix_loss``); the loss is the mean squared error on hidden patches.
No labels reach the encoder. So that the run reports a number, a linear probe on the detached, average-pooled
visible features learns the classes alongside (an online monitor, not part of MAE); its logits are the run's
"main" head. It is declared in ``livt``'s ``requires`` like DeiT-LT's teacher, so it runs once per dataset, rho,
seed and preset and every fine-tuning run with those settings reuses it.

Stage 2, Balanced Fine-Tuning (``livt``): the same ViT, initialised from the stage-1 encoder (every weight but
the classifier), fine-tuned with DeiT's augmentation (RandAugment, Mixup 0.8 / CutMix 1.0, smoothing 0.1,
erasing 0.25) and the Balanced BCE loss (:func:`ltbench.losses.balanced_bce_loss`): sigmoid BCE on
z + tau (log(pi) - log(1 - pi)) against the soft targets, pi the training prior, as LiVT's released util/loss.py adds
it (``bal_bias=log_odds``; ``bal_bias=log_prior`` adds tau log(pi), the logit-adjustment offset, which ltbench used
before VERSION 2); prediction uses the raw logits. AdamW with layer-wise lr decay 0.75,
weight decay 0.05, lr 1e-3 per 256 images (MAE's rule), 5 warm-up epochs, cosine to 1e-6, drop path 0.1.

Recipes (LiVT's README, released ImageNet-LT log and MAE's defaults; peers.md §2.5): MGP 800 epochs, batch 4096,
lr 1.5e-4 per 256, AdamW betas 0.9 / 0.95, wd 0.05, 40 warm-up epochs, crop 0.2-1 + flip; BFT 100 epochs at an
effective batch 2048 (ImageNet-LT / iNat) or 1024 (CIFAR). The MGP epochs, the BFT epochs off ImageNet-LT, the
Bal-BCE reduction and its tau = 1 are unconfirmed (not re-read); LiVT's CIFAR numbers fine-tune from ImageNet-LT
MGP weights, while here every dataset pretrains on its own LT set, as the method is defined. ``short`` and
``tiny`` use the ViT family's small encoders. Differences from the released code: docs/fidelity.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from ltbench.methods.erm_vit import VIT_PRESETS, ERMViT, ViTHparams
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ltbench import augment
from ltbench.config import RunConfig, check
from ltbench.errors import UserError
from ltbench.losses import balanced_bce_loss, log_prior, prior_log_odds
from ltbench.method import upstream_reference
from ltbench.models import vit
from ltbench.resolve import make_config

# MAE pretraining on top of each ViT preset's encoder: no label mixing, no RandAugment, no drop path or EMA
_MGP_COMMON = {"optimizer": "adamw", "lr_base_batch": 256, "lr_scale_batch": 0, "weight_decay": 0.05,
               "opt_betas": [0.9, 0.95], "min_lr": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0,
               "drop_path": 0.0, "repeated_aug": 1, "ema_decay": 0.0, "crop_scale_min": 0.2}
MGP_PRESETS = {
    "paper": [VIT_PRESETS["paper"], {"*": {**_MGP_COMMON, "epochs": 800, "batch_size": 4096, "lr": 1.5e-4,
                                           "warmup_epochs": 40},
                                     "imagenetlt": {"epochs": 800, "batch_size": 4096},
                                     "inat2018": {"epochs": 800, "batch_size": 4096}}],
    "short": [VIT_PRESETS["short"], {"*": {**_MGP_COMMON, "epochs": 100, "batch_size": 256, "lr": 1.5e-4,
                                           "warmup_epochs": 5}}],
    # CPU: the mechanism, not a representation; a high lr so two epochs move the loss
    "tiny": [VIT_PRESETS["tiny"], {"*": {**_MGP_COMMON, "epochs": 2, "batch_size": 64, "lr": 1e-3,
                                         "warmup_epochs": 0, "workers": 0}}],
}
_BFT_COMMON = {"optimizer": "adamw", "lr": 1e-3, "lr_base_batch": 256, "lr_scale_batch": 0, "weight_decay": 0.05,
               "layer_decay": 0.75, "drop_path": 0.1, "min_lr": 1e-6, "warmup_epochs": 5, "repeated_aug": 1,
               "ema_decay": 0.0}
BFT_PRESETS = {
    "paper": [VIT_PRESETS["paper"], {"*": {**_BFT_COMMON, "epochs": 100, "batch_size": 1024},
                                     "imagenetlt": {"epochs": 100, "batch_size": 2048},
                                     "inat2018": {"epochs": 100, "batch_size": 2048}}],
    "short": [VIT_PRESETS["short"], {"*": {**_BFT_COMMON, "epochs": 50, "batch_size": 256}}],
    "tiny": [VIT_PRESETS["tiny"], {"*": {**_BFT_COMMON, "epochs": 2, "batch_size": 64, "drop_path": 0.0,
                                         "warmup_epochs": 0, "workers": 0}}],
}


@dataclass
class MGPHparams(ViTHparams):
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    opt_betas: tuple[float, ...] = (0.9, 0.95)  # the engine's AdamW-betas hook

    def validate(self) -> None:
        super().validate()
        check(0.0 < self.mask_ratio < 1.0, "mask_ratio must be in (0, 1)")
        check(self.decoder_dim % self.decoder_heads == 0, "decoder_dim must be a multiple of decoder_heads")


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder on the visible patches, a small decoder for the hidden ones, and an online linear probe."""

    def __init__(self, hp: MGPHparams, num_classes: int) -> None:
        super().__init__()
        self.encoder = vit(num_classes=0, img_size=hp.img_size, patch_size=hp.patch_size, embed_dim=hp.embed_dim,
                           depth=hp.depth, num_heads=hp.num_heads)
        patches, self.patch_size = self.encoder.patch_embed.num_patches, hp.patch_size
        self.decoder_embed = nn.Linear(hp.embed_dim, hp.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hp.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, patches + 1, hp.decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(hp.decoder_dim, hp.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(hp.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(hp.decoder_dim)
        self.decoder_pred = nn.Linear(hp.decoder_dim, hp.patch_size ** 2 * 3)
        self.probe = nn.Linear(hp.embed_dim, num_classes)
        trunc_normal_(self.decoder_pos, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode_visible(self, x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoded [CLS, visible patches], the mask (1 = hidden) in patch order, and the unshuffling index."""
        enc = self.encoder
        tokens = enc._pos_embed(enc.patch_embed(x))
        cls, patches = tokens[:, :1], tokens[:, 1:]
        batch, count, width = patches.shape
        keep = max(1, int(count * (1 - mask_ratio)))
        shuffle = torch.rand(batch, count, device=x.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = patches.gather(1, shuffle[:, :keep, None].expand(-1, -1, width))
        encoded = enc.norm(enc.blocks(enc.norm_pre(torch.cat([cls, visible], dim=1))))
        mask = torch.ones(batch, count, device=x.device)
        mask[:, :keep] = 0
        return encoded, mask.gather(1, restore), restore

    def decode(self, encoded: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, N, patch * patch * 3), in patch order."""
        h = self.decoder_embed(encoded)
        batch, _, width = h.shape
        hidden = self.mask_token.expand(batch, restore.shape[1] + 1 - h.shape[1], width)
        patches = torch.cat([h[:, 1:], hidden], dim=1).gather(1, restore[..., None].expand(-1, -1, width))
        h = torch.cat([h[:, :1], patches], dim=1) + self.decoder_pos
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(h)))[:, 1:]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, p * p * 3), MAE's layout (row-major patches, pixels then channels)."""
        p = self.patch_size
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probe logits on the average-pooled patch features of the whole image (evaluation)."""
        return self.probe(self.encoder.forward_features(x)[:, 1:].mean(dim=1))


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MAE's loss: per-patch MSE (targets normalised per patch with ``norm_pix``), averaged over hidden patches."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class LiVTPretrain(ERMViT):
    """LiVT stage 1: masked generative pretraining (MAE) on the long-tailed training set; reused by ``livt``."""

    display_name = "LiVT MGP"  # how papers write it (figure titles, legends)

    Hparams = MGPHparams
    presets = MGP_PRESETS
    batch_structure = "(x, y)"

    def __init__(self, hp: MGPHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.model = MaskedAutoencoder(hp, info.num_classes)

    def train_transform(self) -> Callable:
        return augment.mae_train(self.input_info(), self.hp.img_size, self.hp.crop_scale_min)

    def prepare(self, x: torch.Tensor, y: torch.Tensor):
        return x, y

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        encoded, mask, restore = self.model.encode_visible(x, self.hp.mask_ratio)
        reconstruction = reconstruction_loss(self.model.decode(encoded, restore), self.model.patchify(x), mask,
                                             self.hp.norm_pix_loss)
        probe = F.cross_entropy(self.model.probe(encoded[:, 1:].mean(dim=1).detach()).float(), y)
        return reconstruction + probe, {"reconstruction": reconstruction.detach(), "probe": probe.detach()}

    def describe(self) -> dict[str, Any]:
        return {"heads": {"main": "online linear probe on the detached pooled encoder features (a monitor)"}}

    def export(self):
        raise UserError("A livt_mgp run is a pretraining stage: its network is a masked autoencoder and its only head "
                        "a monitoring probe, not a classifier to deploy. Export the livt run fine-tuned from it.")


@dataclass
class LiVTHparams(ViTHparams):
    bal_tau: float = 1.0  # strength of Balanced BCE's prior offset
    bal_bias: str = "log_odds"  # the offset: log_odds = log(pi) - log(1 - pi) (released code), log_prior = log(pi)
    layer_decay: float = 0.75  # the engine's layer-wise lr decay hook
    pretrain_run: str = ""  # an existing finished livt_mgp run instead of a trained-on-demand one
    pretrain_preset: str = ""  # the MGP run's preset; "" = this run's
    pretrain_overrides: tuple[str, ...] = ()  # KEY=VALUE hyperparameters of the MGP run

    def validate(self) -> None:
        super().validate()
        check(self.bal_tau >= 0, "bal_tau must be >= 0")
        check(self.bal_bias in BAL_BIASES, f"bal_bias must be one of {', '.join(BAL_BIASES)}")
        check(0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]")


BAL_BIASES = {"log_odds": prior_log_odds, "log_prior": log_prior}  # bal_bias: the per-class offset from the counts

# the encoder settings a fine-tuning run must share with its MGP run
_ENCODER_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "normalize")


class LiVT(ERMViT):
    """LiVT: an MAE-pretrained ViT (stage ``livt_mgp`` on the LT set) fine-tuned with Balanced BCE."""

    display_name = "LiVT"  # how papers write it (figure titles, legends)

    Hparams = LiVTHparams
    presets = BFT_PRESETS
    VERSION = 2  # 2: Bal-BCE's offset is the released log(pi) - log(1 - pi) (was log(pi), now bal_bias=log_prior)

    @classmethod
    def requires(cls, config: RunConfig) -> dict[str, RunConfig | str]:
        encoder = [f"{key}={config.hparams[key]}" for key in _ENCODER_FIELDS]
        return upstream_reference(config, "pretrain", lambda preset, overrides: make_config(
            "livt_mgp", config.dataset, seed=config.seed, preset=preset, data_options=config.data,
            sets=[*encoder, *overrides]))

    def __init__(self, hp: LiVTHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.load_pretrained(upstream["pretrain"])
        self.bal_offset = BAL_BIASES[hp.bal_bias](info.train_counts).to(device)

    def load_pretrained(self, pretrain) -> None:
        """Every encoder weight from the MGP run's checkpoint; the classifier stays freshly initialised."""
        theirs = pretrain.config.hparams
        different = [k for k in _ENCODER_FIELDS if theirs.get(k) != getattr(self.hp, k)]
        if different:
            raise UserError(f"The pretraining run {pretrain.record.run_id} has another encoder ("
                            f"{', '.join(f'{k}={theirs.get(k)}' for k in different)}); fine-tune with the same "
                            f"settings or pretrain again.")
        state = pretrain.record.load_checkpoint()["modules"]["model"]
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        missing, unexpected = self.model.load_state_dict(encoder, strict=False)
        if unexpected or set(missing) - {"head.weight", "head.bias"}:
            raise UserError(f"The pretraining checkpoint of {pretrain.record.run_id} does not fit this ViT "
                            f"(missing {missing}, unexpected {unexpected}).")

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, soft, _ = batch
        return balanced_bce_loss(self.model(x).float(), soft, self.bal_offset, self.hp.bal_tau), {}
