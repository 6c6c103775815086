"""torchrun data parallelism on CPU (gloo): 2 processes = 1 process with the same global batch, after a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# Deterministic per-image pipeline (no random augmentation) so both layouts see identical batches.
ARGS = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--quiet",
        "--set", "augment=none", "--set", "mixup=0", "--set", "cutmix=0", "--set", "workers=0",
        "--set", "batch_size=16", "--set", "data.n_max=40", "--set", "data.n_test=6", "--set", "data.num_classes=4",
        "--set", "optimizer=sgd"]


def _run(results, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LTBENCH_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "ltbench", "run"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "ltbench", "run"]
    out = subprocess.run([*cmd, *ARGS, "--results", str(results), *extra], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _result(results):
    run = next((results / "runs").iterdir())
    return run, json.loads((run / "result.json").read_text())


def _assert_same(a, b):
    (dir_a, res_a), (dir_b, res_b) = _result(a), _result(b)
    assert dir_a.name == dir_b.name  # the process count is not part of the run id
    for head, metrics in res_a["final"]["heads"].items():
        assert metrics["per_class"] == pytest.approx(res_b["final"]["heads"][head]["per_class"], abs=1e-6)
    wa = torch.load(dir_a / "checkpoint.pt", weights_only=True)["modules"]["model"]
    wb = torch.load(dir_b / "checkpoint.pt", weights_only=True)["modules"]["model"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    return res_a, res_b


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The one-process run both layouts are compared with, trained once for the module."""
    results = tmp_path_factory.mktemp("one-process")
    _run(results, 1, "--epochs", "2")
    return results


def test_two_processes_resume_a_one_process_run_and_match_one_process(one, tmp_path):
    """An interrupted run resumes under torchrun on another number of processes (the checkpoint does not depend on
    the layout) and ends where one uninterrupted process ends; rank 0 alone reports and logs."""
    _run(tmp_path / "two", 1, "--epochs", "2", "--stop-after-epochs", "1")
    assert not any((tmp_path / "two" / "runs").glob("*/DONE"))
    finished = _run(tmp_path / "two", 2, "--epochs", "2")
    single, two = _assert_same(one, tmp_path / "two")
    assert (single["processes"], two["processes"]) == (1, 2)
    assert finished.stdout.count("run folder:") == 1  # the final table once, not once per rank
    log = (_result(tmp_path / "two")[0] / "log.txt").read_text()
    assert log.count("training session of run") == 2  # one header per session, written by rank 0 alone
    assert "epoch 1/2" in log and "epoch 2/2" in log and log.count("epoch 2/2") == 1
