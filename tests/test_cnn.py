"""CNN backbones: ResNet-32's structure and parameter count, the cosine classifier, ResNet-50 feature access."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltbench.cnn import BasicBlockA, Classifier, NormedLinear, resnet32
from ltbench.errors import UserError


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_parameter_count():
    # stem 432 + 32, stage 1: 5 x (2 x 2304 + 64), stage 2: 13952 + 4 x 18560, stage 3: 55552 + 4 x 73984,
    # classifier 64 x 10 + 10 = 464,154 (~0.46M); the cosine head has no bias: 464,144.
    assert _params(Classifier("resnet32", 10, "linear")) == 464_154
    assert _params(Classifier("resnet32", 10, "normed")) == 464_144
    assert _params(Classifier("resnet32", 100, "linear")) == 464_154 + 90 * 65


def test_resnet32_structure_option_a_shortcuts():
    trunk = resnet32()
    stages = [trunk.layer1, trunk.layer2, trunk.layer3]
    assert [len(s) for s in stages] == [5, 5, 5]
    assert [s[0].conv1.out_channels for s in stages] == [16, 32, 64]
    assert [s[0].conv1.stride[0] for s in stages] == [1, 2, 2]
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in trunk.modules())  # no projection
    assert sum(isinstance(m, nn.Conv2d) for m in trunk.modules()) == 31  # + the linear layer = 32 layers
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = BasicBlockA(16, 32, stride=2)
    x = torch.randn(1, 16, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (1, 32, 4, 4)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0


def test_normed_linear_gives_cosines():
    head = NormedLinear(4, 3)
    x = torch.randn(5, 4)
    expected = torch.nn.functional.cosine_similarity(x.unsqueeze(1), head.weight.unsqueeze(0), dim=2)
    torch.testing.assert_close(head(x), expected)
    assert head(10 * x).abs().max() <= 1 + 1e-6  # scale-invariant, bounded
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x.bfloat16()).dtype == torch.float32  # LDAM multiplies these by 30


def test_resnet50_from_torchvision_exposes_the_pooled_feature():
    model = Classifier("resnet50", 7, "linear")
    assert model.feat_dim == 2048 and model.fc.out_features == 7
    model.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        feature = model.forward_features(x)
        assert feature.shape == (1, 2048)
        torch.testing.assert_close(model(x), model.fc(feature))
    assert 23_000_000 < _params(model.backbone) < 24_000_000  # ResNet-50 without its fc: 23.5M


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="resnet32"):
        Classifier("resnet18", 10)
