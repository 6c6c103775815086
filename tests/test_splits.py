"""Validation splits (issue #22): disjoint from train and test for every dataset, fingerprinted by `ltbench data info`,
and the default CIFAR-LT training subset exactly the published one."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from ltbench.datasets.cifar_lt import CIFAR10LT, CIFARLTOptions
from ltbench.datasets.filelist_lt import ImageNetLT, INat2018

from ltbench.data import exp_profile_counts, indices_sha256, ldam_subsample
from ltbench.errors import UserError
from ltbench.resolve import make_config
from ltbench.splits import carve_val, spare_val
from tests.test_filelist_datasets import _load, _write_tree, imagenet_lists, inat_lists

# sha256 of the kept indices of CIFAR-10-LT rho=100, subsample_seed 0, as ltbench selected them before val splits
# existed (the LDAM-DRW subset every published CIFAR-10-LT number trains on)
PUBLISHED_CIFAR10_RHO100 = "4bf45bff8878d2786e47dccd702f96ff33b2b11d8c7da3b5015f10937290f866"


def _image_hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def test_real_cifar10_lt_val_train_and_test_are_disjoint(cifar_root):
    data = CIFAR10LT(CIFARLTOptions(rho=100), cifar_root).load()
    assert indices_sha256(data.train_indices) == PUBLISHED_CIFAR10_RHO100  # the default subset is unchanged
    assert data.info.train_counts == (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)
    # the head class keeps all 5000 of its images, so by default it has no val image (and says so)
    assert np.bincount(data.val.labels, minlength=10).tolist() == [0] + [100] * 9
    assert "class 0: 0" in data.info.extras["val_source"]
    assert not set(data.val_indices) & set(data.train_indices)
    train, val, test = (_image_hashes(s.images) for s in (data.train, data.val, data.test))
    assert len(val) == len(data.val) and not val & train and not val & test and not train & test


def test_real_cifar10_lt_val_fill_moves_head_images_out_of_training(cifar_root):
    data = CIFAR10LT(CIFARLTOptions(rho=100, val_fill_from_train=True), cifar_root).load()
    assert data.info.train_counts == (4900, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)
    assert np.bincount(data.val.labels).tolist() == [100] * 10
    assert not set(data.val_indices) & set(data.train_indices)
    published = CIFAR10LT(CIFARLTOptions(rho=100), cifar_root).load()
    assert set(data.train_indices) < set(published.train_indices)  # only the head's last 100 left training
    assert not _image_hashes(data.val.images) & _image_hashes(data.train.images)


def test_spare_val_keeps_the_published_subset_and_draws_from_unused_images():
    labels = np.repeat(np.arange(5), 40)
    counts = exp_profile_counts(40, 5, 10)
    published, _ = ldam_subsample(labels, counts, seed=3)
    kept, val = spare_val(labels, counts, 3, per_class=8, fill_from_train=False)
    assert np.array_equal(kept, published)  # same indices, same order
    assert not set(kept) & set(val)
    spare = 40 - np.asarray(counts)
    assert np.bincount(labels[val], minlength=5).tolist() == np.minimum(8, spare).tolist()
    filled, val_filled = spare_val(labels, counts, 3, per_class=8, fill_from_train=True)
    assert np.bincount(labels[val_filled]).tolist() == [8] * 5 and not set(filled) & set(val_filled)
    assert set(filled) <= set(published) and len(published) - len(filled) == 8  # the head gave its 8 last ones


def test_val_options_change_the_run_id_only_when_set():
    default = make_config("erm_cnn", "cifar10lt", rho=100)
    assert "val_per_class" not in default.data and "val_fill_from_train" not in default.data
    explicit_default = make_config("erm_cnn", "cifar10lt", rho=100, sets=["data.val_fill_from_train=false"])
    assert explicit_default.run_id == default.run_id
    filled = make_config("erm_cnn", "cifar10lt", rho=100, sets=["data.val_fill_from_train=true"])
    assert filled.run_id != default.run_id and filled.data["val_fill_from_train"] is True
    with pytest.raises(UserError, match="val_per_class"):
        make_config("erm_cnn", "cifar10lt", rho=100, sets=["data.val_per_class=5000"])


def test_carved_val_is_class_stratified_and_leaves_small_classes_whole():
    labels = np.repeat(np.arange(4), [40, 12, 5, 3])
    train, val = carve_val(labels, per_class=4)
    assert np.bincount(labels[val], minlength=4).tolist() == [4, 2, 1, 0]  # min(4, n_c // 5)
    assert sorted([*train, *val]) == list(range(len(labels))) and not set(train) & set(val)
    assert np.array_equal(carve_val(labels, per_class=4)[1], val)  # fixed seed


def test_imagenet_lt_uses_its_official_val_list(tmp_path):
    _write_tree(tmp_path / "imagenet_lt", imagenet_lists())
    data = _load(ImageNetLT, tmp_path)
    assert len(data.val) == 8 and "ImageNet_LT_val.txt" in data.info.extras["val_source"]
    assert not set(data.val.paths) & (set(data.train.paths) | set(data.test.paths))
    as_test = _load(ImageNetLT, tmp_path, eval_split="val")  # the val list reported as test: no val for selection
    assert as_test.val is None and "reported as test" in as_test.info.extras["val_source"]


def test_inat_val_is_carved_only_when_asked(tmp_path):
    _write_tree(tmp_path / "inat2018", inat_lists(counts=(10, 7, 4, 3)))
    plain = _load(INat2018, tmp_path)
    assert plain.val is None and "carve_val_per_class" in plain.info.extras["val_source"]
    carved = _load(INat2018, tmp_path, carve_val_per_class=1)
    assert carved.info.train_counts == (9, 6, 4, 3) and len(carved.val) == 2
    assert not set(carved.val.paths) & set(carved.train.paths)
    assert make_config("erm_cnn", "inat2018").run_id != make_config(
        "erm_cnn", "inat2018", sets=["data.carve_val_per_class=1"]).run_id


def test_data_info_fingerprints_every_split(cli, tmp_path):
    info = json.loads(cli("data", "info", "synthetic", "--json").output)
    splits = info["splits"]
    assert [splits[s]["images"] for s in ("train", "val", "test")] == [info["train_total"], 200, 200]
    assert len({splits[s]["fingerprint"] for s in splits}) == 3 and info["val_source"].startswith("20 generated")
    again = json.loads(cli("data", "info", "synthetic", "--json").output)
    assert again["splits"] == splits
    other = json.loads(cli("data", "info", "synthetic", "--set", "n_val=5", "--json").output)["splits"]
    assert other["val"]["fingerprint"] != splits["val"]["fingerprint"] and other["train"] == splits["train"]


def test_data_info_on_real_cifar_pins_the_training_subset(cli, cifar_root):
    info = json.loads(cli("data", "info", "cifar10lt", "--rho", "100", "--data-root", str(cifar_root),
                          "--json").output)
    assert info["train_indices_sha256"] == PUBLISHED_CIFAR10_RHO100 and info["val_total"] == 900
    assert info["splits"]["val"]["class_counts"] == [0] + [100] * 9 and info["splits"]["test"]["images"] == 10000
