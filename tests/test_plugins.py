"""Out-of-tree method plugins (the README's example and both of docs/plugins.md) discovered through entry points."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ltbench.methods.erm_cnn import ERMCNN

from ltbench.registry import METHODS
from tests.conftest import FAST_VIT, set_args

REPO = Path(__file__).resolve().parents[1]


def _install_plugin(site: Path, markdown: Path, package: str) -> None:
    """What `pip install` of a plugin documented in ``markdown`` leaves behind: the module (the ```python block
    headed ``# <package>/__init__.py``) and a dist-info whose entry_points.txt holds the page's
    ``ltbench.methods`` entries that point into the package."""
    text = markdown.read_text()
    code = re.search(rf"```python\n(# {package}/__init__.py\n.*?)```", text, re.S).group(1)
    tomls = re.findall(r'```toml\n\[project.entry-points."ltbench.methods"\]\n(.*?)```', text, re.S)
    entries = [line.replace('"', "") for toml in tomls for line in toml.splitlines() if f'"{package}:' in line]
    assert entries, f"no entry point of {package} in {markdown}"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(code)
    dist = site / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ltbench.methods]\n" + "\n".join(entries) + "\n")


def _install_readme_plugin(site: Path) -> None:
    _install_plugin(site, REPO / "README.md", "ltbench_logit_adjust")


def _ltbench(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "ltbench", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_readme_plugin_is_discovered_and_runs(tmp_path):
    site = tmp_path / "site"
    _install_readme_plugin(site)
    listed = _ltbench(site, "list", "methods")
    assert listed.returncode == 0 and "logit_adjusted_vit" in listed.stdout, listed.stderr
    run = _ltbench(site, "run", "--method", "logit_adjusted_vit", "--dataset", "synthetic", "--preset", "tiny",
                   "--epochs", "1", "--results", str(tmp_path / "res"), "--quiet", "--set", "tau=1.5",
                   "--set", "workers=0", "--set", "batch_size=32", "--set", "data.n_max=60")
    assert run.returncode == 0, run.stderr
    result_file = next((tmp_path / "res" / "runs").glob("*/result.json"))
    result = json.loads(result_file.read_text())
    assert result["method"] == "logit_adjusted_vit" and result["config"]["hparams"]["tau"] == 1.5
    bad = _ltbench(site, "run", "--method", "logit_adjusted_vit", "--dataset", "synthetic", "--set", "tau=x")
    assert bad.returncode == 2 and "tau" in bad.stderr


DOC_PLUGINS = {"ltbench_cb_vit": "cb_vit", "ltbench_focal": "focal_cnn"}
# One epoch on a few hundred synthetic images: enough to show that each documented plugin trains and evaluates.
SMALL_RUN = ["--dataset", "synthetic", "--preset", "tiny", "--epochs", "1", "--quiet",
             *set_args("workers=0", "batch_size=32", "data.n_max=40", "data.n_test=4", "data.num_classes=4")]


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """Installs docs/plugins.md's packages on sys.path for this test; the registry is restored afterwards."""
    site = tmp_path / "site"
    for package in DOC_PLUGINS:
        _install_plugin(site, REPO / "docs" / "plugins.md", package)
    METHODS.names()  # discover the installed plugins first, so that the restored registry is complete
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(METHODS, "_distributions", dict(METHODS._distributions))
    monkeypatch.setattr(METHODS, "_discovered", False)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for package in DOC_PLUGINS:
        sys.modules.pop(package, None)


def test_docs_plugins_are_listed_and_train(plugin_site, cli, tmp_path):
    # piped (not a terminal): one unwrapped line per entry, its source, no RST markup
    lines = {line.split()[0]: line for line in cli("list", "methods").output.splitlines()}
    assert set(DOC_PLUGINS.values()) | {"erm_cnn", "deitlt"} <= set(lines)
    assert lines["focal_cnn"].split()[1:3] == ["plugin", "ltbench-focal"]
    assert lines["erm_cnn"].split()[1] == "built-in" and "``" not in "".join(lines.values())
    results = tmp_path / "res"
    cli("run", "--method", "focal_cnn", *SMALL_RUN, *set_args("gamma=2"), "--results", str(results))
    cli("run", "--method", "cb_vit", *SMALL_RUN, *set_args(*FAST_VIT, "beta=0.9"), "--results", str(results))
    by_method = {}
    for path in (results / "runs").glob("*/result.json"):
        result = json.loads(path.read_text())
        by_method[result["method"]] = result
    assert by_method["focal_cnn"]["config"]["hparams"]["gamma"] == 2.0
    assert by_method["cb_vit"]["config"]["hparams"]["beta"] == 0.9
    assert cli("run", "--method", "focal_cnn", *SMALL_RUN, *set_args("gamma=-1"), expect=2).output.count("gamma")


class WrongBatchCNN(ERMCNN):
    """A CNN plugin that unpacks a ViT batch."""

    def loss(self, batch):
        x, soft_targets, y = batch
        return self.model(x).sum(), {}


def test_loss_that_unpacks_the_wrong_batch_names_the_method_and_the_structure(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS))
    METHODS.add("wrong_batch_cnn", WrongBatchCNN)
    out = cli("run", "--method", "wrong_batch_cnn", *SMALL_RUN, "--results", str(tmp_path), expect=2).output
    assert "'wrong_batch_cnn'" in out and "(x, y)" in out and "Traceback" not in out
    assert "a tuple of 2: (Tensor[" in " ".join(out.split())
