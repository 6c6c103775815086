"""`--epochs N` rescales every epoch-valued point of a schedule; an explicit `--set` still wins."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from importlib.metadata import entry_points

import pytest

from ltbench import resolve
from ltbench.config import TrainHparams, rescale_epochs
from ltbench.registry import METHODS
from tests.conftest import FAST_VIT, set_args

SMALL_DATA = ["data.n_max=40", "data.n_test=4", "data.num_classes=4", "data.rho=8"]
BUILT_IN = sorted(ep.name for ep in entry_points(group="ltbench.methods") if ep.value.startswith("ltbench.methods."))


def test_points_scale_proportionally_rounded_half_up():
    hp = TrainHparams(epochs=200, warmup_epochs=5, milestones=(161, 181), sam_rho_steps=(0.1, 0.5),
                      sam_rho_epochs=(60,))
    short = rescale_epochs(hp, 50)
    # 5 * 0.25 = 1.25 -> 1; timm milestones m apply from epoch m - 1: 160 -> 40, 180 -> 45; 60 -> 15
    assert (short.epochs, short.warmup_epochs, short.milestones, short.sam_rho_epochs) == (50, 1, (41, 46), (15,))
    assert rescale_epochs(TrainHparams(epochs=10, warmup_epochs=1), 5).warmup_epochs == 1  # 0.5 rounds up
    assert rescale_epochs(hp, 50, keep={"milestones"}).milestones == (161, 181)


def test_exact_halves_round_up_as_documented():
    """floor(p * N / E + 1/2) in exact arithmetic: a float ratio would give 896, 508 and 27 here."""
    assert rescale_epochs(TrainHparams(epochs=1200, warmup_epochs=1100), 978).warmup_epochs == 897
    assert rescale_epochs(TrainHparams(epochs=1000, warmup_epochs=900), 565).warmup_epochs == 509
    assert rescale_epochs(TrainHparams(epochs=90, sam_rho_steps=(0.1, 0.2, 0.3), sam_rho_epochs=(5, 60, 75)),
                          33).sam_rho_epochs == (2, 22, 28)
    for old, new, point in itertools.product((90, 200, 1200), range(2, 400, 7), range(1, 90)):
        got = rescale_epochs(TrainHparams(epochs=old, warmup_epochs=point), new).warmup_epochs
        assert got == min(max(math.floor(Fraction(point * new, old) + Fraction(1, 2)), 1), new - 1)


def test_phases_survive_short_runs_and_switched_off_phases_stay_off():
    hp = resolve.make_config("deitlt", "cifar10lt", rho=100, preset="paper").hparams
    assert (hp["epochs"], hp["drw_epoch"]) == (1200, 1100)
    two = resolve.make_config("deitlt", "cifar10lt", rho=100, preset="paper", epochs=2).hparams
    assert (two["drw_epoch"], two["warmup_epochs"]) == (1, 1)  # both phases keep one epoch
    one = resolve.make_config("deitlt", "cifar10lt", rho=100, preset="paper", epochs=1).hparams
    assert (one["drw_epoch"], one["warmup_epochs"]) == (0, 0)
    off = resolve.make_config("ldam_drw", "cifar10lt", rho=100, epochs=100, sets=["drw_epoch=400"]).hparams
    assert off["drw_epoch"] == 400  # explicit: kept as given
    config = resolve.make_config("ldam_drw", "cifar10lt", rho=100, preset="tiny", sets=["drw_epoch=5", "epochs=4"])
    assert config.hparams["drw_epoch"] == 5  # past the end (DRW off) in the same layer: as given


def test_explicit_set_wins_and_set_epochs_rescales_like_the_option():
    by_option = resolve.make_config("deitlt", "cifar10lt", rho=100, preset="paper", epochs=120)
    by_set = resolve.make_config("deitlt", "cifar10lt", rho=100, preset="paper", sets=["epochs=120"])
    assert by_option.run_id == by_set.run_id and by_option.hparams["drw_epoch"] == 110
    pinned = resolve.make_config("deitlt", "cifar10lt", rho=100, preset="paper", epochs=120, sets=["drw_epoch=100"])
    assert (pinned.hparams["drw_epoch"], pinned.hparams["warmup_epochs"]) == (100, 1)


def test_short_presets_are_the_paper_recipes_at_fewer_epochs():
    for method in ("erm_cnn", "ldam_drw", "paco"):
        for dataset, rho in (("cifar10lt", 100), ("imagenetlt", None)):
            for paper, short in (("paper", "short"), ("sam", "short_sam")):
                got = resolve.make_config(method, dataset, rho=rho, preset=short).hparams
                want = resolve.make_config(method, dataset, rho=rho, preset=paper, epochs=got["epochs"],
                                          sets=[f"eval_every={got['eval_every']}", f"workers={got['workers']}"])
                assert got == want.hparams, (method, dataset, short)


@pytest.mark.parametrize("method", BUILT_IN)
def test_every_preset_of_every_method_resolves_at_one_and_two_epochs(method):
    """With no other option: the method's own config and its teacher's (a distilled student's upstream)."""
    cls = METHODS.get(method)
    if cls.Hparams().epochs == 0:
        pytest.skip(f"{method} trains nothing (epochs must be 0)")
    for preset in sorted(cls.presets):
        for epochs in (1, 2):
            config = resolve.make_config(method, "synthetic", preset=preset, epochs=epochs)
            assert config.hparams["epochs"] == epochs
            for upstream in cls.requires(config).values():
                assert upstream.hparams["epochs"] >= 1


@pytest.mark.parametrize(("method", "epochs", "extra"), [
    ("ldam_drw", 1, ["batch_size=16"]),
    # without drw_epoch: "drw_epoch (8) must be below epochs (2)" before the schedule scaled
    ("deitlt", 2, [*FAST_VIT, "batch_size=16", "teacher=erm_cnn", "teacher_overrides=batch_size=16,workers=0"]),
])
def test_short_runs_train_end_to_end(cli, tmp_path, method, epochs, extra):
    cli("run", "--method", method, "--dataset", "synthetic", "--preset", "tiny", "--epochs", str(epochs),
        "--results", str(tmp_path), "--quiet", *set_args(*SMALL_DATA, *extra))
    folders = [f for f in (tmp_path / "runs").iterdir()
               if json.loads((f / "config.json").read_text())["method"] == method]
    config = json.loads((folders[0] / "config.json").read_text())
    assert len(folders) == 1 and (folders[0] / "DONE").exists()
    assert config["hparams"]["epochs"] == epochs and config["hparams"]["drw_epoch"] == epochs - 1
    assert json.loads((folders[0] / "result.json").read_text())["final"]["epoch"] == epochs


# Upstream stages (teachers, stage 1, MGP) keep their preset's length; these keep them small and short too.
ONE_EPOCH_UPSTREAM = {
    "deit": ["teacher_overrides=epochs=1,batch_size=16,workers=0"],
    "deitlt": ["teacher_overrides=epochs=1,batch_size=16,workers=0"],
    "crt": ["stage1_overrides=epochs=1,batch_size=16"], "lws": ["stage1_overrides=epochs=1,batch_size=16"],
    "livt": ["pretrain_overrides=epochs=1,batch_size=16,decoder_dim=32,decoder_depth=1,decoder_heads=2"],
}
VIT_METHODS = {"erm_vit", "deit", "deitlt", "livt", "livt_mgp"}


def test_every_method_trains_a_one_epoch_run(cli, tmp_path):
    """`--epochs 1` on every built-in method that trains (tau_norm trains nothing); `--epochs 2` on every one is
    the smoke suite's own length, run end to end by tests/test_reproduce.py."""
    for method in BUILT_IN:
        if METHODS.get(method).Hparams().epochs == 0:
            continue
        vit = [s for s in FAST_VIT if s != "workers=0"] if method in VIT_METHODS else []
        cli("run", "--method", method, "--dataset", "synthetic", "--preset", "tiny", "--epochs", "1",
            "--results", str(tmp_path), "--quiet",
            *set_args(*SMALL_DATA, "data.n_max=16", "workers=0", "batch_size=16", *vit,
                      *ONE_EPOCH_UPSTREAM.get(method, [])))
    finished = {}
    for folder in (tmp_path / "runs").iterdir():
        config = json.loads((folder / "config.json").read_text())
        assert (folder / "DONE").exists(), folder
        finished.setdefault(config["method"], []).append(config["hparams"]["epochs"])
    trained = {m for m in BUILT_IN if METHODS.get(m).Hparams().epochs}
    assert set(finished) == trained and all(set(e) == {1} for e in finished.values()), finished
