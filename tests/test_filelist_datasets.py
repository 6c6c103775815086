"""ImageNet-LT, iNaturalist-2018 and Places-LT on tiny fake trees with the real list names and path prefixes:
parsing, errors that name file and line, frequency sorting, iNat JSON conversion, the resize cache,
`ltbench data verify`, and `ltbench run` end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ltbench.datasets.filelist_lt import INAT_MEAN, ImageNetLT, INat2018, PlacesLT, read_list
from PIL import Image

from ltbench import augment
from ltbench.data import IMAGENET_MEAN, DatasetInfo, FileListSplit
from ltbench.errors import UserError
from ltbench.registry import DATASETS
from tests.conftest import FAST_VIT, set_args

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")
TRAIN_COUNTS = (2, 7, 4, 3)  # not sorted, so frequency sorting has work to do
INAT_DIRS = ("Plantae/5004", "Insecta/1021", "Aves/3117", "Fungi/77")
SCENES = ("a/airfield", "b/bakery/shop", "c/campsite", "d/dam")


def _image(path: Path, colour: tuple[int, int, int], wide: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40) if wide else (40, 48), colour).save(path, quality=90)


def _write_tree(folder: Path, lists: dict[str, list[tuple[str, int]]]) -> Path:
    """Write the lists and one small JPEG (two shapes, a colour per class) for every path they name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, entries in lists.items():
        (folder / name).write_text("".join(f"{path} {label}\n" for path, label in entries))
        for k, (path, label) in enumerate(entries):
            if not (folder / path).exists():
                _image(folder / path, (60 * label, 255 - 50 * label, 30 * (k % 5)), wide=k % 2 == 0)
    return folder


def _per_class(counts, make) -> list[tuple[str, int]]:
    return [(make(c, k), c) for c, n in enumerate(counts) for k in range(n)]


def imagenet_lists(counts=TRAIN_COUNTS, n_val=2, n_test=3) -> dict[str, list[tuple[str, int]]]:
    syn = SYNSETS
    return {
        "ImageNet_LT_train.txt": _per_class(counts, lambda c, k: f"train/{syn[c]}/{syn[c]}_{k + 1}.JPEG"),
        "ImageNet_LT_val.txt": _per_class([n_val] * len(counts),
                                          lambda c, k: f"train/{syn[c]}/{syn[c]}_{900 + k}.JPEG"),
        "ImageNet_LT_test.txt": _per_class([n_test] * len(counts),
                                           lambda c, k: f"val/{syn[c]}/ILSVRC2012_val_{100 * c + k + 1:08d}.JPEG"),
    }


def inat_lists(counts=TRAIN_COUNTS, n_val=3) -> dict[str, list[tuple[str, int]]]:
    def path(c: int, k: int, split: str) -> str:
        return f"train_val2018/{INAT_DIRS[c]}/{hashlib.md5(f'{split}{c}-{k}'.encode()).hexdigest()}.jpg"

    return {"iNaturalist18_train.txt": _per_class(counts, lambda c, k: path(c, k, "train")),
            "iNaturalist18_val.txt": _per_class([n_val] * len(counts), lambda c, k: path(c, k, "val"))}


def places_lists(counts=TRAIN_COUNTS, n_val=2, n_test=3) -> dict[str, list[tuple[str, int]]]:
    return {
        "Places_LT_train.txt": _per_class(counts, lambda c, k: f"data_256/{SCENES[c]}/{k + 1:08d}.jpg"),
        "Places_LT_val.txt": _per_class([n_val] * len(counts), lambda c, k: f"data_256/{SCENES[c]}/{500 + k:08d}.jpg"),
        "Places_LT_test.txt": _per_class([n_test] * len(counts),
                                         lambda c, k: f"val_256/Places365_val_{100 * c + k + 1:08d}.jpg"),
    }


@pytest.fixture
def imagenet_root(tmp_path) -> Path:
    _write_tree(tmp_path / "imagenet_lt", imagenet_lists())
    return tmp_path


def _load(cls, root: Path, **options):
    return cls(cls.Options(**options), root).load()


# ----------------------------------------------------------------------------------------------
# Loading


def test_imagenetlt_reads_the_standard_layout(imagenet_root):
    assert DATASETS.get("imagenetlt") is ImageNetLT
    data = _load(ImageNetLT, imagenet_root)
    info = data.info
    assert info.num_classes == 4 and info.train_counts == TRAIN_COUNTS
    assert info.class_names == SYNSETS
    assert info.image_size == 224 and info.variable_size and info.mean == IMAGENET_MEAN
    assert info.paper_split is None  # DeiT-LT's ranges only hold in the frequency-sorted space
    assert isinstance(data.train, FileListSplit) and data.train.root == imagenet_root / "imagenet_lt"
    assert len(data.train) == sum(TRAIN_COUNTS) and len(data.test) == 12  # reports on the test list
    assert all(p.startswith("val/") for p in data.test.paths)
    assert data.test.labels.dtype == np.int64 and np.bincount(data.test.labels).tolist() == [3, 3, 3, 3]
    assert set(info.extras["list_sha256"]) == {"train", "test"}

    val = _load(ImageNetLT, imagenet_root, eval_split="val")
    assert len(val.test) == 8 and all(p.startswith("train/") for p in val.test.paths)


def test_lists_directly_in_the_data_root_and_places_defaults(tmp_path):
    _write_tree(tmp_path, places_lists())
    data = _load(PlacesLT, tmp_path)
    assert data.train.root == tmp_path and data.info.class_names == SCENES
    assert len(data.test) == 12 and data.info.paper_split is None
    assert _load(PlacesLT, tmp_path, sort_by_frequency=True).info.paper_split is None  # none published


def test_missing_lists_name_the_paths_and_files(tmp_path):
    with pytest.raises(UserError) as err:
        _load(ImageNetLT, tmp_path)
    message = str(err.value)
    for expected in (str(tmp_path / "imagenet_lt"), "ImageNet_LT_train.txt", "ImageNet_LT_test.txt",
                     "docs/datasets.md", "ltbench data verify imagenetlt"):
        assert expected in message
    lists = imagenet_lists()
    del lists["ImageNet_LT_test.txt"]
    _write_tree(tmp_path / "imagenet_lt", lists)
    with pytest.raises(UserError, match="ImageNet_LT_test.txt was not found"):
        _load(ImageNetLT, tmp_path)
    assert len(_load(ImageNetLT, tmp_path, eval_split="val").test) == 8  # the val list alone is enough for val


@pytest.mark.parametrize("bad_line", ["train/n01440764/x.JPEG", "train/n01440764/x.JPEG one", ""])
def test_malformed_line_is_an_error_naming_file_and_line(imagenet_root, bad_line):
    path = imagenet_root / "imagenet_lt" / "ImageNet_LT_train.txt"
    lines = path.read_text().splitlines()
    lines[2] = bad_line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"ImageNet_LT_train\.txt:3: malformed line"):
        _load(ImageNetLT, imagenet_root)


def test_labels_out_of_range_name_file_and_line(imagenet_root):
    folder = imagenet_root / "imagenet_lt"
    test_list = folder / "ImageNet_LT_test.txt"
    lines = test_list.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 7"  # a class the 4-class train list does not have
    test_list.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"ImageNet_LT_test\.txt:5: label 7 is out of range 0\.\.3"):
        _load(ImageNetLT, imagenet_root)

    train_list = folder / "ImageNet_LT_train.txt"
    train_list.write_text(train_list.read_text() + "train/n01440764/extra.JPEG 1000\n")
    with pytest.raises(UserError, match=rf"ImageNet_LT_train\.txt:{sum(TRAIN_COUNTS) + 1}: label 1000 .*1000 classes"):
        _load(ImageNetLT, imagenet_root)


def test_a_class_without_training_images_is_refused(tmp_path):
    _write_tree(tmp_path / "places_lt", places_lists(counts=(3, 0, 2)))
    with pytest.raises(UserError, match="classes 1 have no training image"):
        _load(PlacesLT, tmp_path)


def test_sort_by_frequency_remaps_every_split_and_records_the_map(imagenet_root):
    plain = _load(ImageNetLT, imagenet_root)
    data = _load(ImageNetLT, imagenet_root, sort_by_frequency=True)
    info = data.info
    assert info.train_counts == (7, 4, 3, 2)
    assert info.extras["label_map"] == [3, 0, 1, 2]  # original -> rank (stable argsort of -count)
    assert info.class_names == (SYNSETS[1], SYNSETS[2], SYNSETS[3], SYNSETS[0])
    assert info.paper_split is None  # DeiT-LT's ranges are defined on all 1000 classes, not on a subset
    label_map = np.asarray(info.extras["label_map"])
    for sorted_split, original in ((data.train, plain.train), (data.test, plain.test)):
        assert sorted_split.paths == original.paths
        assert np.array_equal(sorted_split.labels, label_map[original.labels])
        for path, label in zip(sorted_split.paths, sorted_split.labels):  # the synset in the path names the class
            assert path.split("/")[1] == info.class_names[label]


def test_paper_split_on_the_full_sorted_label_space(tmp_path):
    # Lists alone (no images are read without the cache): class c gets 1 + (c * 7) % 50 images.
    folder = tmp_path / "imagenet_lt"
    folder.mkdir()
    counts = [1 + (c * 7) % 50 for c in range(1000)]
    train = "".join(f"train/n{c:08d}/{k}.JPEG {c}\n" for c in range(1000) for k in range(counts[c]))
    (folder / "ImageNet_LT_train.txt").write_text(train)
    (folder / "ImageNet_LT_test.txt").write_text("".join(f"val/n{c:08d}/v.JPEG {c}\n" for c in range(1000)))
    data = _load(ImageNetLT, tmp_path, sort_by_frequency=True)
    assert data.info.paper_split == (390, 835) and data.info.num_classes == 1000
    assert list(data.info.train_counts) == sorted(counts, reverse=True)
    assert _load(ImageNetLT, tmp_path).info.paper_split is None  # original label order: ranges meaningless


def test_parsing_a_list_of_inat_size(tmp_path):
    """A list as long as iNat's parses exactly (its speed is a benchmark matter, not asserted here)."""
    n = 437_513
    labels = np.random.RandomState(0).randint(0, 8142, n)
    path = tmp_path / "iNaturalist18_train.txt"
    path.write_text("".join(f"train_val2018/Plantae/{c}/{i:032x}.jpg {c}\n" for i, c in enumerate(labels.tolist())))
    listing = read_list(path)
    assert len(listing.paths) == n and np.array_equal(listing.labels, labels)
    assert listing.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# iNaturalist JSON


def _inat_json(entries: list[tuple[str, int]], first_id: int) -> dict:
    images = [{"id": first_id + i, "file_name": p, "width": 40, "height": 48, "license": 0}
              for i, (p, _) in enumerate(entries)]
    annotations = [{"id": first_id + i, "image_id": first_id + i, "category_id": c} for i, (_, c) in enumerate(entries)]
    annotations.reverse()  # matched by image_id, not by position
    return {"info": {}, "images": images, "annotations": annotations, "licenses": [],
            "categories": [{"id": c, "name": d} for c, d in enumerate(INAT_DIRS)]}


def test_inat_json_is_converted_to_the_standard_lists(tmp_path):
    lists = inat_lists()
    folder = _write_tree(tmp_path / "inat2018", lists)
    expected = {name: (folder / name).read_text() for name in lists}
    for name in lists:
        (folder / name).unlink()
    (folder / "train2018.json").write_text(json.dumps(_inat_json(lists["iNaturalist18_train.txt"], 0)))
    (folder / "val2018.json").write_text(json.dumps(_inat_json(lists["iNaturalist18_val.txt"], 10_000)))

    data = _load(INat2018, tmp_path)
    for name, text in expected.items():
        assert (folder / name).read_text() == text
    assert data.info.train_counts == TRAIN_COUNTS and data.info.mean == INAT_MEAN
    assert len(data.test) == 12 and data.info.class_names == INAT_DIRS  # iNat reports on val
    assert INat2018.paper_split == (842, 4543) and INat2018.num_classes == 8142


def test_inat_json_problems_are_user_errors(tmp_path):
    folder = tmp_path / "inat2018"
    folder.mkdir()
    payload = _inat_json([("train_val2018/Aves/3117/a.jpg", 0), ("train_val2018/Aves/3117/b.jpg", 0)], 0)
    payload["annotations"] = payload["annotations"][:1]  # the second image has no annotation
    (folder / "train2018.json").write_text(json.dumps(payload))
    with pytest.raises(UserError, match=r"train2018\.json: images\[0\].*no file_name, id or matching annotation"):
        _load(INat2018, tmp_path)
    (folder / "train2018.json").write_text("{not json")
    with pytest.raises(UserError, match="is not an iNaturalist-2018 annotation file"):
        _load(INat2018, tmp_path)


def test_eval_split_is_validated(cli, tmp_path):
    result = cli("run", "--method", "erm_vit", "--dataset", "inat2018", "--data-root", str(tmp_path),
                 "--set", "data.eval_split=test", expect=2)
    assert "eval_split must be val, not 'test'" in result.output


# ----------------------------------------------------------------------------------------------
# Input pipeline and cache


def test_evaluation_resizes_and_crops_variable_size_images():
    info = DatasetInfo("x", 2, (3, 1), 224, IMAGENET_MEAN, (0.2, 0.2, 0.2), variable_size=True)
    img = Image.new("RGB", (40, 48))
    assert augment.resize_eval(info, 224)(img).shape == (3, 224, 224)
    assert augment.resize_eval(info, 32)(img).shape == (3, 32, 32)
    fixed = DatasetInfo("x", 2, (3, 1), 224, IMAGENET_MEAN, (0.2, 0.2, 0.2))
    assert augment.resize_eval(fixed, 224)(img).shape == (3, 48, 40)  # fixed-size data is fed as stored


def test_eval_loader_on_files_keeps_workers_between_passes(imagenet_root):
    data = _load(ImageNetLT, imagenet_root)
    loader = augment.eval_loader(data.test, augment.resize_eval(data.info, 32), batch_size=5, workers=1)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    first = [y for _, y in loader]
    second = torch.cat([y for _, y in loader])
    assert torch.equal(torch.cat(first), second) and second.tolist() == data.test.labels.tolist()


def test_resize_cache_is_built_once_and_used(tmp_path):
    folder = _write_tree(tmp_path / "places_lt", places_lists())
    small = _load(PlacesLT, tmp_path, cache_resized=64, eval_split="val")  # never upsample: bytes copied
    path = small.test.paths[0]
    assert (small.test.root / path).read_bytes() == (folder / path).read_bytes()

    data = _load(PlacesLT, tmp_path, cache_resized=32)
    cache = tmp_path / ".ltbench-cache" / "placeslt" / "short32"
    assert data.train.root == cache and data.test.root == cache and data.val.root == cache
    for path in data.train.paths + data.test.paths + data.val.paths:
        with Image.open(cache / path) as img:
            assert min(img.size) == 32 and max(img.size) == 38  # 40x48 -> shorter side 32, aspect kept
    assert len(list(cache.glob(".complete-*"))) == 3  # train, test and the val list
    stamp = (cache / data.train.paths[0]).stat().st_mtime_ns
    (folder / data.train.paths[0]).unlink()  # the cache is complete: the original is not read again
    again = _load(PlacesLT, tmp_path, cache_resized=32)
    assert (cache / again.train.paths[0]).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"Places_LT_train\.txt:1: image .* is missing"):
        _load(PlacesLT, tmp_path, cache_resized=48)


# ----------------------------------------------------------------------------------------------
# ltbench data verify / data info


def test_verify_a_clean_tree(cli, imagenet_root):
    folder = imagenet_root / "imagenet_lt"
    result = cli("data", "verify", "imagenetlt", "--data-root", str(imagenet_root), "--no-expect-standard", "--quiet")
    assert "imagenetlt: OK" in result.output
    for name in ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() in result.output
    report = json.loads(cli("data", "verify", "imagenetlt", "--data-root", str(imagenet_root), "--json",
                            "--no-expect-standard").output)
    assert report["ok"] and report["images_checked"] == 16 + 8 + 12
    train = report["splits"][0]
    assert (train["lines"], train["classes"], train["max_per_class"], train["min_per_class"]) == (16, 4, 7, 2)
    assert train["expected_lines"] == 115_846 and train["expected_sha256"] is None

    standard = cli("data", "verify", "imagenetlt", "--data-root", str(imagenet_root), "--json", expect=1)
    problems = json.loads(standard.output)["problems"]
    assert any("ImageNet_LT_train.txt: lines: 16, the published list has 115,846" in p for p in problems)


def test_verify_names_every_problem_by_file_and_line(cli, tmp_path):
    folder = _write_tree(tmp_path / "places_lt", places_lists())
    train = read_list(folder / "Places_LT_train.txt")
    (folder / train.paths[1]).unlink()  # line 2: missing
    (folder / train.paths[3]).write_bytes(b"not a jpeg")  # line 4: not an image
    truncated = folder / train.paths[5]  # line 6: truncated JPEG
    truncated.write_bytes(truncated.read_bytes()[:200])
    val = folder / "Places_LT_val.txt"
    lines = val.read_text().splitlines()
    lines[1] = "data_256/a/airfield/broken.jpg"  # line 2: malformed
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 365"  # line 4: outside Places-LT's 365 classes
    val.write_text("\n".join(lines) + "\n")

    result = cli("data", "verify", "placeslt", "--data-root", str(tmp_path), "--json", "--no-expect-standard",
                 "--workers", "2", expect=1)
    report = json.loads(result.output)
    problems = "\n".join(report["problems"])
    assert f"{folder / 'Places_LT_train.txt'}:2: image {folder / train.paths[1]} is missing" in problems
    assert f"{folder / 'Places_LT_train.txt'}:4: image" in problems and "cannot be decoded" in problems
    assert f"{folder / 'Places_LT_train.txt'}:6: image" in problems
    assert f"{folder / 'Places_LT_val.txt'}:2: malformed line" in problems
    assert f"{folder / 'Places_LT_val.txt'}:4: label 365 is out of range 0..364" in problems
    assert (report["images_missing"], report["images_undecodable"]) == (1, 2)
    text = cli("data", "verify", "placeslt", "--data-root", str(tmp_path), "--no-expect-standard", "--quiet",
               expect=1).output
    assert "5 problem(s)" in text and "Places_LT_val.txt:2: malformed line" in text


def test_verify_refuses_datasets_without_lists(cli, tmp_path):
    result = cli("data", "verify", "synthetic", "--data-root", str(tmp_path), expect=2)
    assert "checks datasets read from split lists" in result.output


def test_data_info_on_a_list_dataset(cli, tmp_path):
    _write_tree(tmp_path / "inat2018", inat_lists())
    summary = json.loads(cli("data", "info", "inat2018", "--data-root", str(tmp_path), "--json").output)
    assert summary["class_counts"] == list(TRAIN_COUNTS) and summary["test_total"] == 12
    assert summary["groups_counts_rule"] == {"many": 0, "medium": 0, "few": 4}


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("dataset,folder,lists", [
    ("imagenetlt", "imagenet_lt", imagenet_lists), ("inat2018", "inat2018", inat_lists),
    ("placeslt", "places_lt", places_lists)])
def test_ltbench_run_end_to_end(cli, tmp_path, dataset, folder, lists):
    _write_tree(tmp_path / "data" / folder, lists())
    results = tmp_path / "results"
    cli("run", "--method", "erm_vit", "--dataset", dataset, "--preset", "tiny", "--epochs", "1",
        "--data-root", str(tmp_path / "data"), "--results", str(results), "--quiet",
        *set_args(*FAST_VIT, "batch_size=8", "data.sort_by_frequency=true"))
    (result_file,) = results.glob("runs/*/result.json")
    result = json.loads(result_file.read_text())
    assert result["class_counts"] == sorted(TRAIN_COUNTS, reverse=True)
    main = result["final"]["heads"]["main"]
    assert 0 <= main["top1"] <= 100 and len(main["per_class"]) == 4
    assert main["paper"] is None  # a 4-class subset: DeiT-LT's index ranges do not apply
    assert set(main["counts"]) == {"many", "medium", "few"}
