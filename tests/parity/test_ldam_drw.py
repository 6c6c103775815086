"""Parity with kaidic/LDAM-DRW: CIFAR-LT subsets, LDAM margins, the s = 30 loss and its gradient, the DRW weights and
the lr of every epoch of the 200-epoch recipe, ResNet-32 (parameters, forward pass with shared weights), crop+flip.

Released modules used: ``losses.LDAMLoss``, ``models.resnet_cifar.resnet32``, ``imbalance_cifar.IMBALANCECIFAR10/100``,
``cifar_train.adjust_learning_rate``; the DRW weights and ``transform_train`` are inline in
``cifar_train.main_worker`` and are run from that file's source (``_refcode.released_block`` /
``released_assignment``). ``cifar_train`` imports sklearn only for its confusion matrix: stubbed when absent.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.parity import _ltbench_side as lt
from tests.parity._refcode import import_released, max_abs, record, released_assignment, released_block, repo, stub

REPO = repo("LDAM-DRW")
SKLEARN = {"sklearn": stub("sklearn"), "sklearn.metrics": stub("sklearn.metrics", confusion_matrix=None),
           "sklearn.utils": stub("sklearn.utils"),
           "sklearn.utils.multiclass": stub("sklearn.utils.multiclass", unique_labels=None)}

C10_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _counts(dataset: str) -> list[int]:
    from ltbench.datasets.cifar_lt import CIFAR10LT, CIFAR100LT

    cls = {"cifar10lt": CIFAR10LT, "cifar100lt": CIFAR100LT}[dataset]
    return list(cls.train_counts(cls.Options(rho=100.0)))


@pytest.mark.parametrize("dataset,classes", [("cifar10lt", 10), ("cifar100lt", 100)])
@pytest.mark.parametrize("rho", [100, 50, 10])
def test_class_counts_of_the_exp_profile(dataset, classes, rho):
    imbalance = import_released(REPO, "imbalance_cifar")
    fake = SimpleNamespace(data=np.zeros((50000, 1)))  # get_img_num_per_cls reads len(self.data) only
    theirs = imbalance.IMBALANCECIFAR10.get_img_num_per_cls(fake, classes, "exp", 1.0 / rho)
    from ltbench.datasets.cifar_lt import CIFAR10LT, CIFAR100LT

    cls = {"cifar10lt": CIFAR10LT, "cifar100lt": CIFAR100LT}[dataset]
    ours = list(cls.train_counts(cls.Options(rho=float(rho))))
    assert record(f"LDAM-DRW CIFAR-LT counts {dataset} rho={rho}", max_abs(ours, theirs)) == 0


def test_kept_cifar10lt_images_are_the_released_subset(monkeypatch):
    """IMBALANCECIFAR10 on the real CIFAR-10 batches. The shared copy lacks the batches' ``filenames`` key, so
    torchvision's md5 check rejects it: ``_check_integrity`` is patched to accept it (the pixels are the originals,
    /work/shared/data/README.md)."""
    import torchvision

    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 not found under {SHARED_DATA}")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    imbalance = import_released(REPO, "imbalance_cifar")
    theirs = imbalance.IMBALANCECIFAR10(str(SHARED_DATA), imb_factor=0.01, rand_number=0, train=True, download=False)
    from ltbench.datasets.cifar_lt import CIFAR10LT

    data = CIFAR10LT(CIFAR10LT.Options(rho=100.0), SHARED_DATA).load()
    assert theirs.get_cls_num_list() == list(data.info.train_counts)
    diff = max(max_abs(data.train.images, theirs.data), max_abs(data.train.labels, theirs.targets))
    assert record("LDAM-DRW CIFAR-10-LT rho=100 kept images and labels", diff) == 0


@pytest.mark.parametrize("dataset", ["cifar10lt", "cifar100lt"])
def test_ldam_margins(dataset, cuda_as_cpu):
    from ltbench.losses import ldam_margins

    losses = import_released(REPO, "losses")
    counts = _counts(dataset)
    theirs = losses.LDAMLoss(counts, max_m=0.5, s=30).m_list
    diff = max_abs(ldam_margins(counts, 0.5), theirs)
    assert record(f"LDAM margins {dataset} rho=100 (float32)", diff) <= 1e-7


@pytest.mark.parametrize("drw", [False, True])
def test_ldam_loss_and_gradient_float64(drw, cuda_as_cpu):
    """LDAMLoss.forward vs ltbench.losses.ldam_loss on the same cosines in float64, with and without DRW weights
    (margins and weights are float32 tensors on both sides, as both build them)."""
    from ltbench.losses import effective_number_weights, ldam_loss, ldam_margins

    losses = import_released(REPO, "losses")
    counts = C10_100
    weight = effective_number_weights(counts, 0.9999).double() if drw else None
    gen = torch.Generator().manual_seed(0)
    cosine = (torch.rand(64, 10, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    target = torch.randint(0, 10, (64,), generator=gen)
    theirs_fn = losses.LDAMLoss(counts, max_m=0.5, s=30, weight=weight)
    theirs = theirs_fn(cosine, target)
    (g_theirs,) = torch.autograd.grad(theirs, cosine)
    ours = ldam_loss(cosine, target, ldam_margins(counts, 0.5), 30.0, weight)
    (g_ours,) = torch.autograd.grad(ours, cosine)
    name = "with DRW weights" if drw else "unweighted"
    assert record(f"LDAM s=30 loss, {name} (float64)", max_abs(ours, theirs)) <= 1e-12
    assert record(f"LDAM s=30 loss gradient, {name} (float64)", max_abs(g_ours, g_theirs)) <= 1e-12


def test_drw_weights_every_epoch_of_the_200_epoch_schedule(cuda_as_cpu):
    from ltbench.methods.ldam_drw import LDAMDRW

    hp = lt.preset_hparams("ldam_drw", "cifar10lt", "paper")
    me = SimpleNamespace(hp=hp, info=SimpleNamespace(train_counts=tuple(C10_100)), device=torch.device("cpu"))
    worst = 0.0
    for epoch in range(200):
        space = released_block(REPO / "cifar_train.py", "main_worker", "args.train_rule == 'DRW'",
                               {"np": np, "torch": torch, "epoch": epoch, "cls_num_list": C10_100,
                                "args": argparse.Namespace(gpu=None)})
        worst = max(worst, max_abs(LDAMDRW.drw_weights(me, epoch), space["per_cls_weights"]))
    assert record("DRW effective-number weights, epochs 0-199 (float32)", worst) <= 1e-6


def test_lr_at_every_epoch_of_the_200_epoch_recipe():
    train = import_released(REPO, "cifar_train", stubs=SKLEARN)
    hp = lt.preset_hparams("ldam_drw", "cifar10lt", "paper")
    args = train.parser.parse_args([])
    assert (args.lr, args.momentum, args.weight_decay, args.epochs, args.batch_size) == (
        hp.lr, hp.momentum, hp.weight_decay, hp.epochs, hp.batch_size)
    param = torch.nn.Parameter(torch.zeros(1))
    theirs_opt = torch.optim.SGD([param], lr=args.lr)
    theirs = []
    for epoch in range(args.epochs):
        train.adjust_learning_rate(theirs_opt, epoch, args)
        theirs.append(theirs_opt.param_groups[0]["lr"])
    ours = lt.lr_per_step(hp, torch.optim.SGD([param], lr=hp.effective_lr()), steps=1, epochs=range(hp.epochs))
    assert record("LDAM-DRW lr at each of the 200 epochs", max_abs(ours, theirs)) <= 1e-15


def _ldam_to_ltbench(state: dict[str, torch.Tensor], normed: bool) -> dict[str, torch.Tensor]:
    """Their ResNet_s state dict in ltbench's Classifier names (``linear`` -> ``fc``; NormedLinear stores the
    transposed matrix, in x out)."""
    out = {}
    for key, value in state.items():
        if key.startswith("linear."):
            out["fc." + key[len("linear."):]] = value.t() if normed and key == "linear.weight" else value
        else:
            out["backbone." + key] = value
    return out


@pytest.mark.parametrize("normed", [True, False])
def test_resnet32_parameters_and_forward_with_shared_weights(normed):
    from ltbench.cnn import Classifier

    resnet = import_released(REPO, "models.resnet_cifar")
    torch.manual_seed(0)
    theirs = resnet.resnet32(num_classes=10, use_norm=normed).double()
    ours = Classifier("resnet32", 10, "normed" if normed else "linear").double()
    n_theirs, n_ours = (sum(p.numel() for p in m.parameters()) for m in (theirs, ours))
    assert record(f"ResNet-32 parameter count ({'normed' if normed else 'linear'} head)", abs(n_ours - n_theirs)) == 0
    ours.load_state_dict(_ldam_to_ltbench(theirs.state_dict(), normed))
    features = {}
    theirs.linear.register_forward_hook(lambda _m, inputs, _o: features.__setitem__("theirs", inputs[0]))
    ours.fc.register_forward_hook(lambda _m, inputs, _o: features.__setitem__("ours", inputs[0]))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for mode in ("train", "eval"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        with torch.no_grad():
            logits_theirs, logits_ours = theirs(x), ours(x)  # one pass each: train mode updates BN statistics
        head = "normed" if normed else "linear"
        feature_diff = max_abs(features["ours"], features["theirs"])
        assert record(f"ResNet-32 pooled feature, {head} model, {mode} mode (float64)", feature_diff) <= 1e-12
        # ltbench's NormedLinear computes the cosines in float32 on purpose (bf16 autocast safety, cnn.py)
        tol = 1e-6 if normed else 1e-12
        assert record(f"ResNet-32 logits, {head} head, {mode} mode", max_abs(logits_ours, logits_theirs)) <= tol


def test_crop_flip_gives_the_released_transform_outputs_under_the_same_seed():
    """``transform_train`` of ``cifar_train.main_worker`` vs ``ltbench.augment.crop_flip``: 200 draws on one image,
    each side seeded identically (both are torchvision RandomCrop + flip)."""
    import torchvision.transforms as transforms
    from ltbench.datasets import cifar_lt
    from PIL import Image

    from ltbench import augment

    theirs = released_assignment(REPO / "cifar_train.py", "main_worker", "transform_train",
                                 {"transforms": transforms})
    info = SimpleNamespace(image_size=32, mean=cifar_lt.CIFAR_MEAN, std=cifar_lt.CIFAR_STD)
    ours = augment.crop_flip(info)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    worst = 0.0
    for draw in range(200):
        torch.manual_seed(draw)
        a = theirs(image)
        torch.manual_seed(draw)
        worst = max(worst, max_abs(ours(image), a))
    assert record("CIFAR crop+flip+normalise, 200 seeded draws", worst) <= 1e-6
