"""CNN backbones of the LT baselines and teachers: CIFAR ResNet-32 and torchvision's ResNet-50.

Every backbone returns the globally pooled feature (``feat_dim`` wide); a :class:`Classifier`
puts a plain linear or a cosine ("normed") layer on top. Methods that need the feature itself
(PaCo's projection head, a teacher's hook) call ``forward_features``.

ResNet-32 follows the CIFAR ResNet of He et al. as LDAM-DRW builds it (baselines.md §1.5): a 3x3
stem of 16 channels, 3 stages x 5 BasicBlocks of widths 16/32/64, "option A" shortcuts (stride-2
subsampling plus zero-padded channels, no projection), Kaiming-normal conv and linear weights,
about 0.46M parameters. ResNet-50 is torchvision's, trained from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import UserError

CLASSIFIERS = ("linear", "normed")


class NormedLinear(nn.Module):
    """Cosine classifier: logit_c = cos(x, w_c), no bias (LDAM's final layer)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Unit-norm class vectors from a uniform draw, as LDAM's init; only their direction matters.
        self.weight = nn.Parameter(F.normalize(torch.empty(out_features, in_features).uniform_(-1, 1), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: LDAM scales these cosines by s = 30, which would amplify bf16 rounding
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BasicBlockA(nn.Module):
    """3x3-3x3 residual block whose shortcut, when the shape changes, subsamples and zero-pads channels."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.reshape = stride != 1 or in_planes != planes
        self.pad = planes // 4  # channels added on each side: 16 -> 32 and 32 -> 64 both double the width

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reshape:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet trunk (6n+2 layers with n = blocks per stage); returns the pooled feature."""

    def __init__(self, blocks_per_stage: int = 5, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlockA(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.feat_dim = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def resnet32() -> ResNetCIFAR:
    return ResNetCIFAR(blocks_per_stage=5)


def resnet8() -> ResNetCIFAR:
    """The smallest of He et al.'s CIFAR family (n = 1): for CPU demos and tests that compile the network."""
    return ResNetCIFAR(blocks_per_stage=1)


def resnet50() -> nn.Module:
    """torchvision's ResNet-50 from scratch with its fc removed, so it returns the 2048-d pooled feature."""
    from torchvision.models import resnet50 as tv_resnet50

    model = tv_resnet50(weights=None)
    model.feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


BACKBONES: dict[str, Callable[[], nn.Module]] = {"resnet32": resnet32, "resnet8": resnet8, "resnet50": resnet50}


def backbone(arch: str) -> nn.Module:
    if arch not in BACKBONES:
        raise UserError(f"Unknown CNN architecture {arch!r}. Choose one of: {', '.join(BACKBONES)}.")
    return BACKBONES[arch]()


def classifier_head(kind: str, in_features: int, num_classes: int, kaiming: bool = False) -> nn.Module:
    """``kaiming``: Kaiming-normal linear weights, as LDAM-DRW's CIFAR ResNet (torchvision's default otherwise)."""
    if kind == "normed":
        return NormedLinear(in_features, num_classes)
    if kind == "linear":
        head = nn.Linear(in_features, num_classes)
        if kaiming:
            nn.init.kaiming_normal_(head.weight)
        return head
    raise UserError(f"Unknown classifier {kind!r}. Choose one of: {', '.join(CLASSIFIERS)}.")


CLASSIFIER_FACTORY = "ltbench.cnn.Classifier"


def classifier_architecture(arch: str, num_classes: int, head: str = "linear") -> dict[str, Any]:
    """How an export's card names a :class:`Classifier` (the call that rebuilds it)."""
    return {"factory": CLASSIFIER_FACTORY, "kwargs": {"arch": arch, "num_classes": num_classes, "head": head}}


class Classifier(nn.Module):
    """A backbone and a classifier on its pooled feature."""

    def __init__(self, arch: str, num_classes: int, head: str = "linear") -> None:
        super().__init__()
        self.backbone = backbone(arch)
        self.fc = classifier_head(head, self.backbone.feat_dim, num_classes, kaiming=arch == "resnet32")

    @property
    def feat_dim(self) -> int:
        return self.backbone.feat_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def assembled_classifier(arch: str, backbone_module: nn.Module, fc: nn.Module, num_classes: int,
                         head: str = "linear") -> Classifier:
    """A :class:`Classifier` holding existing modules: what ``Classifier(arch, num_classes, head)`` loads, e.g. PaCo's
    query network without its projection, or a stage 2 on its frozen stage-1 backbone (for an export)."""
    model = Classifier(arch, num_classes, head)
    model.backbone, model.fc = backbone_module, fc
    return model
