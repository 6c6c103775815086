"""logit_adjust, balanced_softmax and cb_focal on the shared engine: registered, the published recipes, and they fit
a fixed batch through the engine's own step; Balanced Softmax trains exactly as logit adjustment at tau = 1."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from ltbench import resolve
from ltbench.engine import Trainer
from ltbench.losses import effective_number_weights
from ltbench.records import run_record
from ltbench.registry import METHODS
from ltbench.runtime import Runtime
from ltbench.stages import build_trainer

SMALL = ["data.num_classes=4", "data.n_max=64", "data.rho=4", "data.n_test=2", "data.image_size=16", "lr=0.05"]


def _runtime(path) -> Runtime:
    return Runtime(results=path, data_root=path, device="cpu", progress=False, echo=lambda *_: None)


def _trainer(method: str, tmp_path, sets=()) -> Trainer:
    config = resolve.make_config(method, "synthetic", preset="tiny", sets=[*SMALL, *sets])
    runtime = _runtime(tmp_path)
    return build_trainer(config, runtime, {}, record=run_record(tmp_path, config))


def _fixed_batch(trainer: Trainer, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    train, transform = trainer.data.train, trainer.method.eval_transform()
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].tolist()
    x = torch.stack([transform(Image.fromarray(train.images[i])) for i in index])
    return x, torch.as_tensor(train.labels[index]).long()


def _fit(trainer: Trainer, steps: int = 12) -> list[float]:
    """Losses of ``steps`` engine steps on one fixed batch."""
    x, y = _fixed_batch(trainer)
    return [float(trainer.step([(x, y)], epoch=0)["loss"]) for _ in range(steps)]


@pytest.mark.parametrize("method", ["logit_adjust", "cb_focal"])
def test_fits_a_fixed_batch_through_the_engine(method, tmp_path):
    """The method learns: a property of any CPU (as test_cnn_methods' fixed-batch test), not a seeded trajectory."""
    losses = _fit(_trainer(method, tmp_path))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses  # the mean of the last three steps: a wide margin


def test_balanced_softmax_trains_exactly_as_logit_adjustment_at_tau_one(tmp_path):
    adjusted = _fit(_trainer("logit_adjust", tmp_path / "la", sets=["tau=1"]), steps=2)
    balanced = _fit(_trainer("balanced_softmax", tmp_path / "bs"), steps=2)
    assert adjusted == balanced


def test_cb_focal_weights_and_prior_initialised_bias(tmp_path):
    method = _trainer("cb_focal", tmp_path).method
    torch.testing.assert_close(method.class_weights, effective_number_weights(method.info.train_counts, 0.9999))
    bias = method.model.fc.bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(9.0)))  # sigmoid(b) = pi = 0.1
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.1))


def _hp(method: str, preset: str, dataset: str):
    return resolve.resolve_hparams(METHODS.get(method), preset, dataset, None, {})


@pytest.mark.parametrize("method", ["logit_adjust", "balanced_softmax", "cb_focal"])
def test_presets_are_the_cnn_baseline_recipes(method):
    for preset in ("paper", "short", "tiny"):
        for dataset in ("cifar10lt", "imagenetlt"):
            mine, erm = _hp(method, preset, dataset), _hp("erm_cnn", preset, dataset)
            shared = ("arch", "img_size", "epochs", "batch_size", "lr", "weight_decay", "sched", "milestones")
            assert [getattr(mine, k) for k in shared] == [getattr(erm, k) for k in shared], (preset, dataset)
    assert _hp(method, "paper", "cifar100lt").arch == "resnet32" and _hp(method, "paper", "inat2018").arch == "resnet50"
    if method == "cb_focal":
        hp = _hp(method, "paper", "cifar10lt")
        assert (hp.cb_beta, hp.focal_gamma, hp.prior_init) == (0.9999, 1.0, 0.1)
    if method == "logit_adjust":
        assert _hp(method, "paper", "cifar10lt").tau == 1.0


def test_every_compared_method_is_registered_by_entry_point():
    names = {"logit_adjust", "balanced_softmax", "cb_focal", "crt", "tau_norm", "lws"}
    assert names <= set(METHODS.names())
    assert all(METHODS.source(name) == "built-in" for name in names)
