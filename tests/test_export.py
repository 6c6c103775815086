"""Models out: the weights each selection rule reports are kept as a run trains, and ``ltbench export`` /
``ltbench.load_model`` give back exactly the network whose numbers a table shows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

import ltbench
from ltbench import resolve, stages
from ltbench.cnn import Classifier
from ltbench.errors import UserError
from ltbench.export import check_reproduces, model_card, serialized
from ltbench.records import SELECTED_WEIGHTS
from ltbench.registry import METHODS
from ltbench.resolve import hparams_of
from ltbench.runtime import Runtime
from ltbench.weights import CARD, WEIGHTS
from tests.conftest import FAST_VIT

# 4 classes, 40 test images: a ResNet-8 learns something in 4 epochs, and one image is 2.5 points of top-1
DATA = ["data.num_classes=4", "data.n_max=40", "data.rho=4", "data.noise=0.3", "data.n_test=10", "data.n_val=10"]
CNN = [*DATA, "workers=0", "eval_every=1", "arch=resnet8", "batch_size=8", "lr=0.02"]
ONE_IMAGE = 100 / 40


def _runtime(results, **kw) -> Runtime:
    return Runtime(results=results, data_root=results, device="cpu", progress=False, echo=lambda *_: None, **kw)


def _cnn_config(epochs: int = 4):
    return resolve.make_config("erm_cnn", "synthetic", preset="tiny", epochs=epochs, sets=CNN)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("export") / "results"


@pytest.fixture(scope="module")
def cnn(results):
    return stages.ensure(_cnn_config(), _runtime(results, save_logits=True))  # eval --adjust reads its logits


def _test_top1(model, config, results) -> dict[str, float]:
    """Top-1 of every head of a loaded export on the run's test split, through its own preprocessing."""
    data = stages.load_data(config, _runtime(results))
    x = torch.stack([model.preprocess(Image.fromarray(image)) for image in data.test.images])
    with torch.no_grad():
        heads = model.heads(x)
    labels = torch.from_numpy(data.test.labels)
    return {head: 100 * (logits.argmax(1) == labels).float().mean().item() for head, logits in heads.items()}


def _export(cli, results, run, out, *extra):
    cli("export", run, "--results", str(results), "--data-root", str(results), "--out", str(out), *extra)
    return json.loads((out / CARD).read_text())


@pytest.mark.parametrize("rule,block", [("final", "final"), ("val", "val"), ("oracle", "best")])
def test_export_gives_the_network_of_the_epoch_each_rule_reports(cli, results, cnn, tmp_path, rule, block):
    result = cnn.result()
    card = _export(cli, results, cnn.run_id, tmp_path / rule, "--select", rule)
    assert card["epoch"] == result[block]["epoch"] and card["test"] == result[block] and card["select"] == rule
    assert card["run_id"] == cnn.run_id and card["config"] == result["config"] and card["seed"] == 0
    assert card["architecture_call"] == "ltbench.cnn.Classifier(arch='resnet8', num_classes=4, head='linear')"
    assert card["input_size"] == 32 and card["normalisation"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert card["class_names"] == [f"class_{c}" for c in range(4)] and list(card["heads"]) == ["main"]
    model = ltbench.load_model(tmp_path / rule)
    assert not model.training and model.class_names == tuple(card["class_names"])
    image = Image.fromarray(stages.load_data(cnn.config(), _runtime(results)).test.images[0])
    native = T.Normalize([0.5] * 3, [0.25] * 3)(T.ToTensor()(image))  # the run's own pipeline on 32 px images
    assert torch.equal(model.preprocess(image), native)
    assert model.preprocess(image.resize((50, 40))).shape == (3, 32, 32)  # any other size is resized and cropped
    assert abs(_test_top1(model, cnn.config(), results)["main"] - result[block]["heads"]["main"]["top1"]) <= ONE_IMAGE
    plain = Classifier(**card["architecture"]["kwargs"])  # the card's call loads the file strictly, without ltbench
    plain.load_state_dict(load_file(tmp_path / rule / WEIGHTS))


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


@pytest.fixture(scope="module")
def deit(results, cnn):
    sets = [*FAST_VIT, *DATA, "batch_size=16", "depth=1", "eval_every=1", f"teacher_run={cnn.path}"]
    config = resolve.make_config("deit", "synthetic", preset="tiny", epochs=2, sets=sets)
    return stages.ensure(config, _runtime(results))


def test_a_distilled_vit_exports_its_cls_dist_and_average_heads(cli, results, deit, tmp_path):
    import timm

    card = _export(cli, results, deit.run_id, tmp_path)
    assert set(card["heads"]) == {"main", "cls", "dist"} and card["default_head"] == "main"
    assert card["architecture_call"].startswith("timm.create_model('deit_base_distilled_patch16_224', pretrained=False")
    network = timm.create_model(card["architecture"]["name"], pretrained=False, **card["architecture"]["kwargs"])
    network.load_state_dict(load_file(tmp_path / WEIGHTS))
    model = ltbench.load_model(tmp_path)
    top1 = _test_top1(model, deit.config(), results)
    for head, metrics in card["test"]["heads"].items():
        assert abs(top1[head] - metrics["top1"]) <= ONE_IMAGE, head
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        heads = model.heads(x)
        assert torch.allclose(heads["main"], (heads["cls"] + heads["dist"]) / 2)
        assert torch.equal(model(x), heads["main"])
        assert torch.equal(ltbench.load_model(tmp_path, head="dist")(x), heads["dist"])
        assert torch.allclose(network.eval()(x), heads["main"], atol=1e-5)  # timm's own eval forward: the average
    with pytest.raises(UserError, match="no head 'avg'"):
        ltbench.load_model(tmp_path, head="avg")


@pytest.mark.parametrize("method", ["tau_norm", "lws", "crt"])
def test_a_decoupled_stage_2_exports_as_one_classifier_on_its_stage_1_backbone(cli, results, cnn, tmp_path, method):
    config = resolve.make_config(method, "synthetic", preset="tiny", epochs=None if method == "tau_norm" else 1,
                                 sets=[*DATA, "arch=resnet8", "eval_every=1", f"stage1_run={cnn.path}"])
    run = stages.ensure(config, _runtime(results))
    card = _export(cli, results, run.run_id, tmp_path)
    assert card["architecture"]["factory"] == "ltbench.cnn.Classifier" and card["method"] == method
    assert (card["logit_scale"] is not None) == (method == "lws")
    top1 = _test_top1(ltbench.load_model(tmp_path), config, results)["main"]
    assert abs(top1 - run.result()["final"]["heads"]["main"]["top1"]) <= ONE_IMAGE


def test_post_hoc_adjustment_is_exported_with_the_numbers_eval_computed(cli, results, cnn, tmp_path):
    common = ["--results", str(results), "--data-root", str(results), "--out", str(tmp_path)]
    refused = cli("export", cnn.run_id, *common, "--adjust", "0.5", expect=2)
    assert f"ltbench eval {cnn.run_id} --adjust 0.5" in refused.output  # no numbers for the card yet
    assert "needs --select final" in cli("export", cnn.run_id, *common, "--adjust", "1", "--select", "val",
                                         expect=2).output
    cli("eval", cnn.run_id, "--results", str(results), "--data-root", str(results), "--device", "cpu", "--adjust", "1")
    card = _export(cli, results, cnn.run_id, tmp_path, "--adjust", "1")
    posthoc = json.loads((cnn.path / "posthoc_la.json").read_text())["taus"]["1"]
    assert card["test"] == posthoc and card["posthoc"]["tau"] == 1 and len(card["logit_offset"]) == 4
    top1 = _test_top1(ltbench.load_model(tmp_path), cnn.config(), results)["main"]
    assert abs(top1 - posthoc["heads"]["main"]["top1"]) <= ONE_IMAGE


def test_exports_that_cannot_be_made_are_refused_with_the_reason(cli, results, cnn, tmp_path):
    common = ["--results", str(results), "--data-root", str(results)]
    out = cli("export", cnn.run_id, *common, "--out", str(tmp_path), "--select", "best", expect=2).output
    assert "--select best is now called --select oracle" in out  # as `report --select best` says
    (tmp_path / "file").write_text("")
    assert "is a file" in cli("export", cnn.run_id, *common, "--out", str(tmp_path / "file"), expect=2).output
    copy = tmp_path / "old" / "runs" / cnn.run_id
    copy.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(cnn.path), str(copy.parent)], check=True)
    epoch = cnn.result()["val"]["epoch"]
    (copy / SELECTED_WEIGHTS.format(rule="val", epoch=epoch)).unlink()  # as a run trained before weights were kept
    out = cli("export", str(copy), *common, "--out", str(tmp_path / "x"), "--select", "val", expect=2).output
    assert f"keeps no weights of epoch {epoch}" in out and "--select final" in out
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_load_model_refuses_a_damaged_or_foreign_export(cli, results, cnn, tmp_path):
    good = tmp_path / "good"
    _export(cli, results, cnn.run_id, good)
    with pytest.raises(UserError, match="not an ltbench export folder"):
        ltbench.load_model(tmp_path)
    torn = tmp_path / "torn"
    subprocess.run(["cp", "-r", str(good), str(torn)], check=True)
    (torn / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes()[:-10])
    with pytest.raises(UserError, match="not the file its model_card.json describes"):
        ltbench.load_model(torn)
    card = json.loads((good / CARD).read_text())
    for change, message in (({"architecture": {"factory": "os.system", "kwargs": {}}}, "ltbench builds only"),
                            ({"format_version": 2}, "damaged"), ({"heads": {}}, "damaged")):
        (torn / CARD).write_text(json.dumps({**card, **change}))
        (torn / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes())
        with pytest.raises(UserError, match=message):
            ltbench.load_model(torn)


def test_import_ltbench_and_export_help_do_not_import_torch():
    code = ("import sys, ltbench; from ltbench.cli import main\n"
            "try:\n    main(['export', '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'timm'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]" and "ltbench.load_model(DIR)" in done.stdout
    from ltbench.exported import load_model

    assert ltbench.load_model is load_model  # the lazy attribute
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        ltbench.load_modle  # noqa: B018


def test_every_built_in_method_exports_what_its_predict_gives_or_says_why_not(results, cnn):
    """Built from its config (weights as initialised), each method's export reproduces its predict() on a probe
    batch, every head; the pretraining stage of LiVT refuses. (livt itself, ERMViT's export and predict on an
    MAE-initialised encoder, needs a pretraining run: too slow to train here.)"""
    rt = _runtime(results)
    upstream = {"deit": "teacher_run", "deitlt": "teacher_run", "crt": "stage1_run", "lws": "stage1_run",
                "tau_norm": "stage1_run"}
    for name in [n for n in METHODS.names() if METHODS.source(n) == "built-in" and n != "livt"]:
        sets = [*DATA, *(["arch=resnet8"] if "arch" in METHODS.get(name).Hparams.__dataclass_fields__ else [])]
        if name in upstream:
            sets.append(f"{upstream[name]}={cnn.path}")
        config = resolve.make_config(name, "synthetic", preset="tiny", sets=sets)
        info = stages.load_data(config, rt).info
        method = METHODS.get(name)(hparams_of(config), info, torch.device("cpu"),
                                   stages.resolve_upstream(config, rt, train=False))
        for module in method.state_modules().values():
            module.eval()
        if name == "livt_mgp":
            with pytest.raises(UserError, match="pretraining stage"):
                method.export()
            continue
        network = method.export()
        card = model_card(config, method, network, "final", {"epoch": 0}, {"class_counts": list(info.train_counts)},
                          None, None)
        check_reproduces(method, card, serialized(network, card))  # raises when the export differs
        assert set(card["heads"]) == ({"main", "cls", "dist"} if name in ("deit", "deitlt") else {"main"}), name


def test_export_needs_no_dataset_and_refuses_damaged_dataset_facts(results, cnn, tmp_path, monkeypatch):
    from ltbench import export

    def no_data(*args):
        raise AssertionError("export loaded the dataset")

    monkeypatch.setattr(export, "load_data", no_data)  # result.json's dataset_info is enough
    card = export.export_run(cnn, _runtime(results), tmp_path / "out")
    assert card["class_counts"] == cnn.result()["class_counts"] and (tmp_path / "out" / WEIGHTS).is_file()
    damaged = {**cnn.result(), "dataset_info": {**cnn.result()["dataset_info"], "train_counts": [1, 2]}}
    with pytest.raises(UserError, match="dataset_info.*damaged|damaged.*train counts"):
        export.recorded_dataset_info(cnn, damaged)
