"""The launcher sweep trials use on several GPUs: N local processes = torchrun --nproc_per_node N."""

from __future__ import annotations

import json

from ltbench import resolve, stages
from ltbench.launcher import ensure_data_parallel
from ltbench.runtime import Runtime

SETS = ["augment=none", "mixup=0", "cutmix=0", "workers=0", "batch_size=16", "data.n_max=40", "data.n_test=6",
        "data.num_classes=4", "optimizer=sgd"]


def test_local_data_parallel_launch_matches_one_process(tmp_path):
    config = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=1, sets=SETS)
    one = stages.ensure(config, Runtime(results=tmp_path / "one", data_root=tmp_path, device="cpu", progress=False,
                                        echo=lambda *_: None))
    fields = Runtime(results=tmp_path / "two", data_root=tmp_path, device="cpu").portable()
    ensure_data_parallel(config.to_dict(), fields, nprocs=2, backend="gloo")
    two = json.loads((tmp_path / "two" / "runs" / config.run_id / "result.json").read_text())
    assert two["processes"] == 2 and (tmp_path / "two" / "runs" / config.run_id / "DONE").is_file()
    expected = one.result()["final"]["heads"]["main"]["per_class"]
    assert two["final"]["heads"]["main"]["per_class"] == expected
