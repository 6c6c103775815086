"""Models in: the ``init`` hyperparameter starts a run from a local weights file (a timm or torchvision checkpoint, a
safetensors file, another run's export), and the run id hashes the file's content, never its path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ltbench import resolve, stages
from ltbench.cnn import Classifier
from ltbench.errors import UserError
from ltbench.export import export_run
from ltbench.models import vit
from ltbench.runtime import Runtime
from tests.conftest import FAST_VIT

DATA = ["data.num_classes=4", "data.n_max=20", "data.n_test=4", "data.n_val=0"]
CNN = [*DATA, "workers=0", "arch=resnet8", "batch_size=8"]
TINY_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}  # erm_vit's tiny preset


def _runtime(tmp_path, notes=None, **kw) -> Runtime:
    return Runtime(results=tmp_path / "results", data_root=tmp_path, device="cpu", progress=False,
                   echo=(notes.append if notes is not None else lambda *_: None), **kw)


def _config(method="erm_cnn", init=None, sets=CNN, epochs=1):
    return resolve.make_config(method, "synthetic", preset="tiny", epochs=epochs,
                               sets=[*sets, *([f"init={init}"] if init else [])])


def _trainable(config, tmp_path, notes=None):
    """The method's trainable module as training starts (after init, before any step)."""
    return stages.build_trainer(config, _runtime(tmp_path, notes), upstream={}).method.trainable()


def _cnn_file(path, num_classes=10, layout="ltbench"):
    """A checkpoint as a training script saves it: ltbench's Classifier keys, or torchvision's (no backbone. prefix)
    under DistributedDataParallel's module. prefix, nested under 'state_dict'."""
    torch.manual_seed(7)
    state = Classifier("resnet8", num_classes).state_dict()
    if layout == "torchvision":
        state = {"module." + k.removeprefix("backbone."): v for k, v in state.items()}
    torch.save({"state_dict": state, "epoch": 90, "arch": "resnet8"}, path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def test_init_enters_the_run_id_by_its_sha256_not_its_path(tmp_path):
    first = tmp_path / "a" / "weights.pth"
    first.parent.mkdir()
    _cnn_file(first)
    second = tmp_path / "elsewhere.pth"
    shutil.copy(first, second)
    config = _config(init=first)
    assert config.run_id == _config(init=second).run_id != _config().run_id
    assert config.hparams["init"] == str(first.resolve()) and len(config.hparams["init_sha256"]) == 64
    assert "init" not in config.identity()["hparams"] and "init" not in _config().hparams  # default: ids unchanged
    _cnn_file(second, num_classes=5)  # another file at the same path: another run
    assert _config(init=second).run_id != config.run_id


@pytest.mark.parametrize("layout", ["ltbench", "torchvision"])
def test_init_loads_what_fits_and_keeps_another_classifier_fresh(tmp_path, layout):
    saved = _cnn_file(tmp_path / "w.pth", num_classes=10, layout=layout)
    notes: list[str] = []
    model = _trainable(_config(init=tmp_path / "w.pth"), tmp_path, notes).state_dict()
    fresh = _trainable(_config(), tmp_path).state_dict()  # the same seed without init
    for name, tensor in model.items():
        source = saved.get(name.removeprefix("backbone.") if layout == "torchvision" else name)
        if name.startswith("fc."):
            assert torch.equal(tensor, fresh[name]) and source.shape[0] == 10  # 10 classes there, 4 here: skipped
        else:
            assert torch.equal(tensor, source), name
    (note,) = [n for n in notes if n.startswith("init:")]
    assert f"loaded {len(model) - 2} of this model's {len(model)} tensors" in note
    assert "kept the classifier freshly initialised (fc.weight, fc.bias" in note


def test_init_from_a_timm_vit_safetensors_file(tmp_path):
    torch.manual_seed(3)
    state = vit(num_classes=1000, **TINY_VIT).state_dict()
    save_file(state, tmp_path / "vit.safetensors")
    sets = [*FAST_VIT, *DATA, "batch_size=8"]
    notes: list[str] = []
    model = _trainable(_config("erm_vit", tmp_path / "vit.safetensors", sets), tmp_path, notes).state_dict()
    assert all(torch.equal(model[k], v) for k, v in state.items() if not k.startswith("head."))
    assert model["head.weight"].shape[0] == 4 and "head.weight, head.bias" in notes[-1]
    smaller = _config("erm_vit", tmp_path / "vit.safetensors", [*sets, "img_size=16"])
    with pytest.raises(UserError, match="pos_embed is"):  # another architecture is refused, not half loaded
        _trainable(smaller, tmp_path)


def test_init_from_another_runs_export_and_paco_copies_it_into_its_key_encoder(tmp_path):
    rt = _runtime(tmp_path)
    source = stages.ensure(_config(), rt)
    export_run(source, rt, tmp_path / "export")
    exported = source.load_checkpoint()["modules"]["model"]
    model = _trainable(_config(init=tmp_path / "export"), tmp_path).state_dict()
    assert set(model) == set(exported) and all(torch.equal(model[k], exported[k]) for k in model)
    paco = stages.build_trainer(_config("paco", tmp_path / "export", [*CNN, "moco_k=64"]), rt, upstream={}).method
    query, key = paco.model.backbone.state_dict(), paco.key.backbone.state_dict()
    assert all(torch.equal(query[k], exported[f"backbone.{k}"]) and torch.equal(key[k], query[k]) for k in query)


def test_init_refuses_what_is_not_a_weights_file_with_a_clear_reason(tmp_path):
    def refused(path, message):
        with pytest.raises(UserError, match=message):
            _config(init=path)

    refused(tmp_path / "missing.pth", "no such file or folder")
    refused(tmp_path, "holds no model_card.json")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"state_dict": {"w": torch.ones(1), "step": 3}}, tmp_path / "mixed.pt")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for name, message in (("list.pt", "holds list, not a mapping"), ("mixed.pt", "step are not named tensors"),
                          ("text.pth", "not a readable weights file")):
        with pytest.raises(UserError, match=message):
            _trainable(_config(init=tmp_path / name), tmp_path)
    torch.save({"unrelated.weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="none of its 1 tensors fits this model"):
        _trainable(_config(init=tmp_path / "other.pt"), tmp_path)
    _cnn_file(tmp_path / "w.pth")
    config = _config(init=tmp_path / "w.pth")
    _cnn_file(tmp_path / "w.pth", num_classes=7)  # changed after the run id was computed from it
    with pytest.raises(UserError, match="changed after this run's id was computed"):
        _trainable(config, tmp_path)
    with pytest.raises(UserError, match="init_sha256 is computed from the file init names"):
        resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=["init_sha256=" + "0" * 64])


def test_a_run_started_from_init_trains_resumes_and_records_the_file(tmp_path):
    _cnn_file(tmp_path / "w.pth")
    config = _config(init=tmp_path / "w.pth", epochs=2)
    notes: list[str] = []
    stages.ensure(config, _runtime(tmp_path, notes, stop_after_epochs=1))
    (tmp_path / "w.pth").unlink()  # resuming restores the checkpoint: the file is no longer needed
    record = stages.ensure(config, _runtime(tmp_path, notes))
    assert record.done and sum(n.startswith("init:") for n in notes) == 1
    assert json.loads((record.path / "config.json").read_text())["hparams"]["init_sha256"] == \
        config.hparams["init_sha256"]
