"""An out-of-tree method plugin (README's "Adding a method" example) discovered through its entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _install_readme_plugin(site: Path) -> None:
    """What `pip install` of the plugin leaves behind: the module and a dist-info with entry_points.txt."""
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(# ltbench_logit_adjust/__init__.py\n.*?)```", readme, re.S).group(1)
    toml = re.search(r'```toml\n\[project.entry-points."ltbench.methods"\]\n(.*?)```', readme, re.S).group(1)
    (site / "ltbench_logit_adjust").mkdir(parents=True)
    (site / "ltbench_logit_adjust" / "__init__.py").write_text(code)
    dist = site / "ltbench_logit_adjust-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ltbench-logit-adjust\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[ltbench.methods]\n{toml.strip().replace(chr(34), '')}\n")


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
