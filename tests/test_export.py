"""Models out: the weights each selection rule reports are kept as a run trains."""

from __future__ import annotations

import pytest
import torch

from ltbench import resolve, stages
from ltbench.records import SELECTED_WEIGHTS
from ltbench.runtime import Runtime

# 4 classes, 40 test images: a ResNet-8 learns something in 4 epochs, and one image is 2.5 points of top-1
DATA = ["data.num_classes=4", "data.n_max=40", "data.rho=4", "data.noise=0.3", "data.n_test=10", "data.n_val=10"]
CNN = [*DATA, "workers=0", "eval_every=1", "arch=resnet8", "batch_size=8", "lr=0.02"]


def _runtime(results, **kw) -> Runtime:
    return Runtime(results=results, data_root=results, device="cpu", progress=False, echo=lambda *_: None, **kw)


def _cnn_config(epochs: int = 4):
    return resolve.make_config("erm_cnn", "synthetic", preset="tiny", epochs=epochs, sets=CNN)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("export") / "results"


@pytest.fixture(scope="module")
def cnn(results):
    return stages.ensure(_cnn_config(), _runtime(results))


def test_the_kept_weights_are_those_of_the_chosen_epoch(results, cnn, tmp_path):
    """The val and oracle files equal the checkpoint of a run of the same config stopped after that epoch."""
    result = cnn.result()
    kept = sorted(p.name for p in cnn.path.glob("*_weights_epoch*.pt"))
    chosen = {"val": result["val"]["epoch"], "oracle": result["best"]["epoch"]}
    assert kept == sorted(SELECTED_WEIGHTS.format(rule=r, epoch=e) for r, e in chosen.items())
    for rule, epoch in chosen.items():
        stopped = stages.ensure(_cnn_config(), _runtime(tmp_path / rule, stop_after_epochs=epoch))
        reference = stopped.load_checkpoint()["modules"]["model"]
        saved = cnn.selected_modules(rule, epoch)["model"]
        assert set(saved) == set(reference) and all(torch.equal(saved[k], reference[k]) for k in saved)


def test_a_resumed_run_ends_with_the_selected_weights_of_an_uninterrupted_one(results, cnn, tmp_path):
    partial = stages.ensure(_cnn_config(), _runtime(tmp_path, stop_after_epochs=2))
    torch.save({"epoch": 3}, partial.path / SELECTED_WEIGHTS.format(rule="val", epoch=3))  # weights of no checkpoint
    for path in partial.path.glob("*_weights_epoch2.pt"):  # a crash after epoch 2's checkpoint, before its weights
        path.unlink()
    resumed = stages.ensure(_cnn_config(), _runtime(tmp_path))
    names = sorted(p.name for p in resumed.path.glob("*_weights_epoch*.pt"))
    assert names == sorted(p.name for p in cnn.path.glob("*_weights_epoch*.pt"))
    for name in names:
        a, b = torch.load(cnn.path / name), torch.load(resumed.path / name)
        assert a["epoch"] == b["epoch"] and a["origin"] == b["origin"]
        assert all(torch.equal(a["modules"]["model"][k], v) for k, v in b["modules"]["model"].items())
    ckpt = resumed.load_checkpoint()  # a checkpoint whose val rule chose its own epoch: the weights come from it
    ckpt["best_val"] = {**ckpt["best_val"], "epoch": ckpt["epoch"]}
    resumed.sync_selected(ckpt, resumed.config())
    assert [p.name for p in resumed.path.glob("val_*")] == [SELECTED_WEIGHTS.format(rule="val", epoch=ckpt["epoch"])]
    saved = resumed.selected_modules("val", ckpt["epoch"])["model"]
    assert all(torch.equal(saved[k], v) for k, v in ckpt["modules"]["model"].items())
