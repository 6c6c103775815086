"""`ltbench report --plots` figures for papers: TrueType fonts in PDFs, display names, bands only where drawn,
a line style and marker per row, class names where they fit, and a training-curve figure per run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

from ltbench import plots, runset
from ltbench.registry import Registry

GOLDEN = Path(__file__).resolve().parent / "golden"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _by_stem(results: Path, options: runset.ReportOptions | None = None) -> dict[str, plots.Plot]:
    return {p.stem: p for p in plots.make_plots(runset.load_runs(results, options), options)}


def _data_lines(axes):
    return [line for line in axes.lines if line.get_linestyle() != ":"]  # dotted: the group boundaries


@pytest.fixture(scope="module")
def golden_copy(tmp_path_factory):
    """The golden runs, the CIFAR-10 ones with class names, one deitlt run with a logged training curve."""
    folder = tmp_path_factory.mktemp("golden") / "results"
    shutil.copytree(GOLDEN / "runs", folder / "runs")
    for path in (folder / "runs").glob("*/result.json"):
        result = json.loads(path.read_text())
        if result["dataset"] == "cifar10lt":
            path.write_text(json.dumps({**result, "class_names": CIFAR10_NAMES}))
    curve = folder / "runs" / "0ca18fa26eb5" / "metrics.jsonl"  # deitlt, cifar10lt rho 100, seed 0
    heads = {"main": 60.0, "cls": 55.0, "dist": 58.0}
    rows = [{"epoch": e, "train": {"loss": 3.0 - e / 2}, "lr": 0.1,
             **({"eval": {h: {"top1": v + e} for h, v in heads.items()}, "val": {"main": {"top1": 50.0 + e}}}
                if e % 2 == 0 else {})} for e in (1, 2, 3, 4)]
    curve.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_pdfs_embed_truetype_fonts_and_leave_the_callers_matplotlib_settings_alone(tmp_path):
    before = matplotlib.rcParams["pdf.fonttype"]
    options = runset.ReportOptions(methods=("deitlt",))  # a per-class and a CLS-vs-DIST figure per column
    files = plots.write_plots(runset.load_runs(GOLDEN, options), tmp_path, options)
    pdfs = [p for p in files if p.suffix == ".pdf"]
    assert pdfs and len(pdfs) == len(files) / 2
    for pdf in pdfs:
        data = pdf.read_bytes()
        assert b"/Type3" not in data and (b"/TrueType" in data or b"/CIDFontType2" in data), pdf.name
    assert matplotlib.rcParams["pdf.fonttype"] == before


def test_titles_and_legends_use_display_names_and_name_a_band_only_where_one_is_drawn():
    found = _by_stem(GOLDEN)
    axes = found["per_class_cifar100lt_rho100"].figure.axes[0]  # deitlt: 3 seeds (a band), erm_vit: 1 (none)
    assert axes.get_title() == "CIFAR-100-LT ρ=100: per-class test accuracy (band: ± 1 std over seeds)"
    legend = [t.get_text() for t in found["per_class_cifar100lt_rho100"].figure.legends[0].get_texts()]
    assert legend == ["DeiT-LT (n=3)", "ERM-ViT (preset=paper, epochs=1200) (n=1)"]
    single = _by_stem(GOLDEN, runset.ReportOptions(methods=("erm_vit",), datasets=("cifar100lt",)))
    title = single["per_class_cifar100lt_rho100"].figure.axes[0].get_title()
    assert title == "CIFAR-100-LT ρ=100: per-class test accuracy" and not single[
        "per_class_cifar100lt_rho100"].figure.axes[0].collections  # n = 1: no band drawn, none named
    heads = found["cls_dist_deitlt_cifar10lt_rho100"].figure.axes[0].get_title()
    assert heads == "DeiT-LT on CIFAR-10-LT ρ=100: CLS vs DIST head per class (mean over n=3)"


def test_every_curve_of_a_figure_has_its_own_line_style_and_hollow_marker():
    found = _by_stem(GOLDEN)
    for stem in ("per_class_cifar10lt_rho100", "cls_dist_deitlt_cifar10lt_rho100"):
        lines = _data_lines(found[stem].figure.axes[0])
        assert len(lines) == 3
        styles = {(str(line.get_linestyle()), line.get_marker()) for line in lines}
        assert len(styles) == 3 and {s for s, _ in styles}.isdisjoint({":"}), stem
        assert len({m for _, m in styles}) == 3 and all(line.get_markerfacecolor() == "none" for line in lines)


def test_class_names_label_the_top_axis_where_they_fit(golden_copy):
    found = _by_stem(golden_copy)
    for stem in ("per_class_cifar10lt_rho100", "cls_dist_deitlt_cifar10lt_rho100"):
        figure = found[stem].figure
        [top] = figure.axes[0].child_axes  # the secondary x axis
        assert [t.get_text() for t in top.get_xticklabels()] == CIFAR10_NAMES  # counts fall with the index
    assert not found["per_class_cifar100lt_rho100"].figure.axes[0].child_axes  # recorded no names: no name axis


def test_a_training_curve_figure_per_run_that_logged_one(golden_copy):
    found = _by_stem(golden_copy)
    assert [s for s in found if s.startswith("curves_")] == ["curves_0ca18fa26eb5"]  # the others logged epochs only
    figure = found["curves_0ca18fa26eb5"].figure
    loss, accuracy = figure.axes
    assert list(loss.lines[0].get_ydata()) == [2.5, 2.0, 1.5, 1.0]
    labels = [line.get_label() for line in accuracy.lines]
    assert labels == ["test, CLS head", "test, DIST head", "test, average (main)", "val, main"]
    assert list(accuracy.lines[0].get_xdata()) == [2, 4] and list(accuracy.lines[3].get_ydata()) == [52.0, 54.0]
    assert figure.get_suptitle() == "DeiT-LT\non CIFAR-10-LT ρ=100: run 0ca18fa26eb5, seed 0"


def test_display_names_come_from_the_plugin_classes_without_importing_the_training_stack():
    code = ("import sys; from ltbench.registry import DATASETS, METHODS; "
            "print(METHODS.display_name('ldam_drw'), DATASETS.display_name('cifar100lt'), "
            "METHODS.display_name('not_installed'), 'torch' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["LDAM-DRW", "CIFAR-100-LT", "not_installed", "False"]
    registry = Registry("method", "ltbench.test_no_such_group")

    @registry.register("mine")
    class Mine:
        pass

    assert registry.display_name("mine") == "mine"  # a plugin that sets none keeps its name
