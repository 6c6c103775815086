"""``paco``: Parametric Contrastive Learning (Cui et al., ICCV 2021); with SAM, DeiT-LT's headline teacher.

Model (baselines.md §5.1): a query network (backbone, projection MLP Linear-BN-ReLU-Linear to
``moco_dim``, and a linear classifier with bias on the pooled feature: the parametric class centres)
and a key encoder, a momentum copy (m = 0.999) of backbone and MLP, with a queue of ``moco_k``
keys and their labels (random at start: normalised over the K entries as the released code does, so the
first K / batch steps contrast against short keys; ``queue_init=unit`` starts from unit keys). Per step
the key encoder embeds the second view, the contrast set is [queries, keys, queue] and then the keys
are enqueued. The loss (§5.2, :func:`ltbench.losses.paco_loss`) adds log(n_c / N) to the centre logits in
training only; inference (and the teacher logits, deitlt.md §2.1) is the linear classifier on the pooled feature.

Engine mapping: the key encoder runs once per step in ``prepare`` (train-mode BatchNorm, no gradient),
so SAM's second pass sees the same keys and queue; the momentum update is in ``after_step``; key
encoder and queue are a checkpointed state module. Differences from the reference code: one device,
so no shuffled BatchNorm across GPUs for the keys (the key encoder sees the whole batch, as MoCo on one
GPU); with micro-batches each micro-batch enqueues in turn; the momentum copy of the classifier, which
the reference keeps but never uses, is not kept; AutoAugment is torchvision's CIFAR-10 policy.

Recipes (§5.3). CIFAR: ResNet-32, moco_dim 32, K 1024, temperature 0.05, alpha 0.01, beta = gamma = 1,
SGD lr 0.05, wd 5e-4, batch 128, drop_last, 400 epochs; views: crop, flip, AutoAugment, Cutout 16
(queries) and a SimCLR view (keys). The reference lr is lr*(e+1)/10 for 0-based e <= 10, x0.1 after 320,
x0.01 after 360; timm's ``warmup_epochs=9, warmup_lr=lr/10, milestones=(322, 362)`` gives exactly that
except at e = 10, where the reference's quirk gives 1.1*lr for one epoch and timm gives lr. No official
CIFAR-10-LT script exists: it uses the CIFAR-100 settings, as DeiT-LT's teacher flags do.
ImageNet-LT / iNat: ResNet-50, moco_dim 128, K 8192, temperature 0.2, alpha 0.05, lr 0.02, batch 128,
wd 5e-4 / 1e-4, 400 epochs, 10 warm-up epochs then cosine, reproduced exactly by ``warmup_epochs=9,
warmup_lr=lr/10, warmup_prefix=True``; RandAugment rand-n2-m10-mstd0.5 queries, SimCLR keys.

PaCo+SAM radius: **unpublished** (baselines.md §6.3). Our documented default (the ``sam`` preset) is a
constant rho = 0.1 on CIFAR-10/100-LT for all 400 epochs and rho = 0.05 on ImageNet-LT / iNat, SAM
perturbing along the gradient of the full PaCo loss. This is a reproduction choice, not the authors'
value: 0.05-0.1 is the radius range Foret et al. and Saddle-LongTail use for losses without margins.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ltbench.methods.erm_cnn import ERMCNN, LARGE_DATASETS, TINY, CNNHparams
from torch import nn

from ltbench import augment
from ltbench.cnn import assembled_classifier, backbone
from ltbench.config import check
from ltbench.exported import NetworkExport
from ltbench.losses import paco_loss
from ltbench.resolve import layered

QUEUE_INIT_DIMS = {"released": 0, "unit": 1}  # queue_init: the dimension the random initial queue is normalised over


@dataclass
class PaCoHparams(CNNHparams):
    moco_dim: int = 32
    moco_k: int = 1024  # queue length
    moco_m: float = 0.999  # key-encoder momentum
    temperature: float = 0.05
    alpha: float = 0.01  # weight of same-class contrast samples
    beta: float = 1.0  # weight of the own-class centre
    gamma: float = 1.0  # weight of the contrast samples in the denominator
    cutout: int = 16
    # the random initial queue: released = normalised over the K entries (MoCo's dim-0 line, kept by PaCo's (K, dim)
    # queue, so a key has norm ~sqrt(dim / K)); unit = every key of norm 1 (ltbench before VERSION 2)
    queue_init: str = "released"
    drop_last: bool = True  # full batches only, as the reference (the queue advances by whole batches)
    warmup_prefix: bool = False  # True: a cosine schedule spans the epochs after the warm-up (ImageNet-LT / iNat)
    # the CIFAR recipe
    epochs: int = 400
    lr: float = 0.05
    weight_decay: float = 5e-4
    warmup_epochs: int = 9
    warmup_lr: float = 0.005
    milestones: tuple[int, ...] = (322, 362)
    decay_rate: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(self.classifier == "linear", "paco's class centres are a linear classifier (classifier=linear)")
        check(self.moco_dim >= 1, "moco_dim must be >= 1")
        check(self.moco_k >= self.batch_size, "moco_k (the queue length) must be >= batch_size")
        check(0 <= self.moco_m < 1, "moco_m must be in [0, 1)")
        check(self.queue_init in QUEUE_INIT_DIMS, f"queue_init must be one of {', '.join(QUEUE_INIT_DIMS)}")
        check(self.temperature > 0, "temperature must be > 0")
        check(min(self.alpha, self.beta, self.gamma) >= 0 and self.alpha + self.beta > 0,
               "alpha, beta and gamma must be >= 0, and alpha + beta > 0")


_PACO_LARGE = {"arch": "resnet50", "img_size": 224, "augment": "imagenet", "moco_dim": 128, "moco_k": 8192,
               "temperature": 0.2, "alpha": 0.05, "lr": 0.02, "warmup_lr": 0.002, "sched": "cosine",
               "warmup_prefix": True, "milestones": [], "workers": 16}
PACO_PAPER = {"*": {"workers": 8}, "imagenetlt": {**_PACO_LARGE, "weight_decay": 5e-4},
              "inat2018": {**_PACO_LARGE, "weight_decay": 1e-4}}
PACO_SAM = {"*": {"sam_rho": 0.1}, **{name: {"sam_rho": 0.05} for name in LARGE_DATASETS}}
# The paper recipe at a quarter of the epochs (a second table, so the schedule scales): decays at 0-based 80 and 90
# of 100, warm-up 2 epochs; cosine for the large ones. Two augmented views per image on the CPU loader: more
# workers than the one-view methods.
PACO_SHORT = {"*": {"epochs": 100, "eval_every": 5, "workers": 12},
              **{name: {"epochs": 100, "workers": 16} for name in LARGE_DATASETS}}
# CPU: a short queue, lr 0.05 and Cutout 8, so that two epochs on 32 px `synthetic` (8 px template cells) learn
# reliably under AutoAugment (over seeds 0-3: 55-62 % after two epochs).
PACO_TINY = layered(TINY, {"*": {"lr": 0.05, "moco_k": 256, "cutout": 8},
                           **{name: {"moco_dim": 32} for name in LARGE_DATASETS}})


class PaCoNet(nn.Module):
    """Backbone, projection MLP and linear class centres; ``forward`` gives the classifier's logits."""

    def __init__(self, arch: str, num_classes: int, moco_dim: int) -> None:
        super().__init__()
        self.backbone = backbone(arch)
        width = self.backbone.feat_dim
        self.projector = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                       nn.Linear(width, moco_dim))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, project: bool = False):
        """Logits; with ``project`` also the normalised projection (float32)."""
        feature = self.backbone(x)
        logits = self.fc(feature)
        if not project:
            return logits
        return logits, F.normalize(self.projector(feature).float(), dim=1)


class KeyEncoder(nn.Module):
    """Momentum copy of backbone and projection MLP, plus the queue of keys and labels (all checkpointed)."""

    def __init__(self, query_net: PaCoNet, size: int, num_classes: int, init: str = "released") -> None:
        super().__init__()
        self.backbone = copy.deepcopy(query_net.backbone)
        self.projector = copy.deepcopy(query_net.projector)
        for param in self.parameters():
            param.requires_grad_(False)
        dim = self.projector[-1].out_features
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=QUEUE_INIT_DIMS[init]))
        self.register_buffer("queue_labels", torch.randint(0, num_classes, (size,)))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    def _pairs(self, query_net: PaCoNet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine = [*self.backbone.parameters(), *self.projector.parameters()]
        theirs = [*query_net.backbone.parameters(), *query_net.projector.parameters()]
        return mine, theirs

    @torch.no_grad()
    def momentum_update(self, query_net: PaCoNet, momentum: float) -> None:
        mine, theirs = self._pairs(query_net)
        torch._foreach_mul_(mine, momentum)
        torch._foreach_add_(mine, [p.detach() for p in theirs], alpha=1.0 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Overwrite the oldest entries (a ring buffer, so any batch size up to the queue length works)."""
        size = self.queue.shape[0]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_labels[index] = labels
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)


class PaCo(ERMCNN):
    """Parametric contrastive learning: momentum keys, a queue and learnable class centres (logit-adjusted)."""

    display_name = "PaCo"  # how papers write it (figure titles, legends)

    Hparams = PaCoHparams
    VERSION = 2  # 2: the initial queue is normalised as the released code does (was per key: queue_init=unit)
    batch_structure = "(query_view, y, keys, queue, queue_labels)"
    presets = {
        "paper": PACO_PAPER,
        "sam": layered(PACO_PAPER, PACO_SAM),
        "short": [PACO_PAPER, PACO_SHORT],
        "short_sam": [layered(PACO_PAPER, PACO_SAM), PACO_SHORT],
        "tiny": PACO_TINY,
        "tiny_sam": layered(PACO_TINY, PACO_SAM),
    }
    teacher_logits = "the linear classifier W h + b on the pooled backbone feature (no prior correction)"

    def __init__(self, hp: PaCoHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.key = KeyEncoder(self.model, hp.moco_k, info.num_classes, hp.queue_init)
        counts = torch.tensor(info.train_counts, dtype=torch.float64)
        self.log_prior = (counts / counts.sum()).log().float().to(device)

    def build_model(self) -> nn.Module:
        return PaCoNet(self.hp.arch, self.info.num_classes, self.hp.moco_dim)

    def state_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "key": self.key}

    def export(self) -> NetworkExport:
        """The query network's backbone and class centres as a plain Classifier (projection and keys only train)."""
        network = assembled_classifier(self.hp.arch, self.model.backbone, self.model.fc, self.info.num_classes)
        return dataclasses.replace(super().export(), module=network)

    def load_init(self, state, note) -> None:
        """The query network from ``init``; the momentum encoder starts as its copy, as at the start of MoCo."""
        super().load_init(state, note)
        self.key.backbone.load_state_dict(self.model.backbone.state_dict())
        self.key.projector.load_state_dict(self.model.projector.state_dict())

    def train_transform(self) -> Callable:
        if self.hp.augment == "imagenet":
            return augment.paco_imagenet_views(self.info, self.hp.img_size)
        return augment.paco_cifar_views(self.info, self.hp.img_size, self.hp.cutout)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.key.train()  # evaluation puts every state module in eval mode; MoCo's keys use batch statistics

    def prepare(self, x, y: torch.Tensor):
        """Embed the key view, snapshot the queue for this batch, then enqueue the new keys."""
        query_view, key_view = x
        keys = self.key(key_view)
        queue, queue_labels = self.key.queue.clone(), self.key.queue_labels.clone()
        self.key.enqueue(keys, y)
        return query_view, y, keys, queue, queue_labels

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query_view, y, keys, queue, queue_labels = batch
        logits, query = self.model(query_view, project=True)
        contrast = torch.cat([query, keys, queue])
        contrast_labels = torch.cat([y, y, queue_labels])
        hp = self.hp
        loss = paco_loss(logits.float(), self.log_prior, query, contrast, contrast_labels, y, alpha=hp.alpha,
                         beta=hp.beta, gamma=hp.gamma, temperature=hp.temperature)
        return loss, {}

    def after_step(self) -> None:
        self.key.momentum_update(self.model, self.hp.moco_m)
