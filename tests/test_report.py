"""`ltbench report` on committed fake run folders (tests/golden/runs, written by tests/golden/make_runs.py).

The fixture has: erm_vit under two presets (must never share a cell), deitlt with CLS/DIST heads, a
cell with 2 of 3 seeds plus an unfinished run (excluded and footnoted), a cell with one seed, a missing
cell (deitlt at rho=50) and CIFAR-10's empty few-shot group. After an intended change of the output,
regenerate the expected files with:

    LTBENCH_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_report.py
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ltbench import report as rp
from ltbench import runset
from ltbench.config import RunConfig
from ltbench.errors import UserError
from ltbench.render import latex_escape

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("LTBENCH_REGEN_GOLDEN") == "1"

CASES = {
    "report.md": ("markdown", {}),
    "report.tex": ("latex", {}),
    "report.csv": ("csv", {}),
    "report_heads_paper_compare.md": ("markdown", {"heads": True, "split": "paper", "compare": "paper"}),
    "report_oracle_se_compare.tex": ("latex", {"select": "oracle", "spread": "se", "metrics": ("top1", "ece"),
                                               "compare": "paper"}),
    "report_standalone.tex": ("latex", {"standalone": True}),
}


def render(fmt: str, **options) -> str:
    return rp.report(GOLDEN, fmt, runset.ReportOptions(**options))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_output_is_byte_identical(name):
    fmt, options = CASES[name]
    text = render(fmt, **options)
    expected = GOLDEN / "expected" / name
    if REGEN:
        expected.parent.mkdir(exist_ok=True)
        expected.write_text(text)
    assert text == expected.read_text()


def test_cli_writes_the_same_markdown(cli, tmp_path):
    out = tmp_path / "table.md"
    cli("report", "--results", str(GOLDEN), "--out", str(out))
    assert out.read_text() == (GOLDEN / "expected" / "report.md").read_text()
    shown = cli("report", "--results", str(GOLDEN), "--format", "csv", "--metric", "top1,few")
    assert set(pd.read_csv(io.StringIO(shown.output))["metric"]) == {"top1", "few"}


def _golden_results() -> list[tuple[dict, dict]]:
    out = []
    for folder in sorted((GOLDEN / "runs").iterdir()):
        if (folder / "DONE").exists():
            config, result = (json.loads((folder / name).read_text()) for name in ("config.json", "result.json"))
            out.append((config, result))
    return out


def test_cell_mean_and_spread_match_the_run_files():
    cells = pd.read_csv(io.StringIO(render("csv")))
    values = [r["final"]["heads"]["main"]["top1"] for c, r in _golden_results()
              if c["method"] == "deitlt" and c["dataset"] == "cifar100lt"]
    cell = cells[(cells["row"] == "deitlt") & (cells["dataset"] == "cifar100lt") & (cells["metric"] == "top1")].iloc[0]
    assert len(values) == 3 and cell["n"] == 3
    assert cell["mean"] == pytest.approx(np.mean(values))
    assert cell["std"] == pytest.approx(np.std(values, ddof=1))
    assert cell["se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))


def test_different_configurations_never_share_a_cell():
    cells = pd.read_csv(io.StringIO(render("csv")))
    c10 = cells[(cells["dataset"] == "cifar10lt") & (cells["rho"] == 100) & (cells["metric"] == "top1")]
    erm = c10[c10["method"] == "erm_vit"]
    assert sorted(erm["row"]) == ["erm_vit (preset=paper, epochs=1200)", "erm_vit (preset=short, epochs=100)"]
    assert list(erm["n"]) == [3, 3] and erm["experiment"].nunique() == 2


def test_a_method_version_bump_splits_the_row(tmp_path):
    """Records of two versions of a method are shown apart, never averaged (aesthetics.md L8)."""
    runs = tmp_path / "runs"
    for folder in (GOLDEN / "runs").iterdir():
        config = json.loads((folder / "config.json").read_text())
        if config["method"] == "deitlt" and config["dataset"] == "cifar100lt":
            shutil.copytree(folder, runs / folder.name)
    bumped = sorted(runs.iterdir())[0]
    config = json.loads((bumped / "config.json").read_text())
    config["versions"]["method"] = 2
    (bumped / "config.json").write_text(json.dumps(config))
    bumped.rename(runs / RunConfig.from_dict(config).run_id)  # another config is another run id
    cells = rp.aggregate(runset.load_runs(tmp_path), runset.ReportOptions(metrics=("top1",)))
    assert sorted(zip(cells["row"], cells["n"])) == [("deitlt (versions.method=1)", 2),
                                                     ("deitlt (versions.method=2)", 1)]


def test_incomplete_runs_are_excluded_and_counted():
    runs = runset.load_runs(GOLDEN)
    assert [(r["method"], r["rho"], r["seed"]) for r in runs.incomplete] == [("erm_vit", 50.0, 2)]
    assert runs.frame["run_id"].nunique() == 15
    markdown = render("markdown")
    assert "Excluded 1 incomplete run(s): erm_vit / cifar10lt ρ=50 (seed 2: unfinished (3 epoch(s) logged))" in markdown
    assert re.search(r"71\.36 ± 0\.16 \[7\d\.\d\d, 7\d\.\d\d\] \(n=2\)", markdown) and "unless marked (n=k)" in markdown


def test_bold_marks_the_best_mean_of_each_column_and_missing_cells_are_marked():
    options = runset.ReportOptions(heads=True)
    runs = runset.load_runs(GOLDEN, options)
    table = rp.build_table(rp.aggregate(runs, options), runs, options)
    for j in range(len(table.columns)):
        cells = [cells[j] for _, cells, _ in table.rows if not cells[j].missing and cells[j].text != "n/a"]
        if len(cells) < 2:
            assert not any(c.bold for c in cells)
            continue
        best = max(float(c.text) for c in cells)
        tie = all(float(c.text) == best for c in cells)  # a column of ties has no best
        assert [c.bold for c in cells] == [float(c.text) == best and not tie for c in cells]
    labels = [label for label, _, _ in table.rows]
    assert labels[:3] == ["deitlt [main]", "deitlt [cls]", "deitlt [dist]"]
    deitlt_rho50 = table.rows[0][1][4]  # columns: C10 rho=100 x 4 metrics, then C10 rho=50
    assert deitlt_rho50.missing and table.groups[1] == ("cifar10lt ρ=50", 4)
    assert table.rows[0][1][3].text == "n/a"  # CIFAR-10-LT has no class with < 20 images under the counts rule


def test_lower_ece_is_best():
    options = runset.ReportOptions(metrics=("ece",))
    runs = runset.load_runs(GOLDEN, options)
    table = rp.build_table(rp.aggregate(runs, options), runs, options)
    column = [cells[0] for _, cells, _ in table.rows if not cells[0].missing]
    assert [c.bold for c in column] == [float(c.text) == min(float(x.text) for x in column) for c in column]


def test_paper_comparison_uses_matching_reference_and_main_head_only():
    options = runset.ReportOptions(heads=True, compare="paper", split="paper")
    runs = runset.load_runs(GOLDEN, options)
    cells = rp.add_reference(rp.aggregate(runs, options), runs, options)
    main = cells[(cells["row"] == "deitlt") & (cells["head"] == "main") & (cells["dataset"] == "cifar10lt")]
    top1 = main[main["metric"] == "top1"].iloc[0]
    # DeiT-LT reports its best test epoch: Δ compares each run's best epoch (tests/test_report_compare.py)
    assert top1["paper"] == 87.5 and top1["delta"] == pytest.approx(top1["compared"] - 87.5)
    assert main[main["metric"] == "few"].iloc[0]["paper"] == 85.0  # DeiT-LT README, index split
    table = rp.build_table(cells, runs, options)
    kinds = [(label, kind) for label, _, kind in table.rows]
    assert kinds[:6] == [("deitlt [main]", "run"), ("↳ oracle (best test epoch)", "oracle"), ("↳ paper", "paper"),
                         ("↳ Δ vs paper", "delta"), ("deitlt [cls]", "run"), ("deitlt [dist]", "run")]


def test_reference_matching_follows_the_conditions():
    ref = rp.reference_numbers()
    paco = rp.match_reference(ref, "deitlt", "cifar100lt", 50.0, "top1", "counts", {"teacher": "paco_sam"})
    ldam = rp.match_reference(ref, "deitlt", "cifar10lt", 100.0, "top1", "counts", {"teacher": "ldam_drw_sam"})
    assert paco["value"] == 60.5 and ldam["value"] == 84.8
    assert rp.match_reference(ref, "deitlt", "cifar10lt", 100.0, "top1", "counts", {"teacher": "erm_cnn"}) is None
    assert rp.match_reference(ref, "ldam_drw", "cifar10lt", 100.0, "top1", "counts", {"sam": "true"})["value"] == 81.9
    assert rp.match_reference(ref, "ldam_drw", "cifar10lt", 100.0, "top1", "counts", {"sam": "false"})["value"] == 77.03
    # A group number is only compared under the split rule its source used.
    assert rp.match_reference(ref, "deitlt", "cifar10lt", 100.0, "many", "counts", {"teacher": "paco_sam"}) is None
    flat = {"sam": "true", "data.eval_split": "test", "data.sort_by_frequency": "true"}
    assert rp.match_reference(ref, "paco", "imagenetlt", math.nan, "few", "paper", flat)["value"] == 39.3


def test_reference_file_is_well_formed():
    ref = rp.reference_numbers()
    assert set(ref["metric"]) <= {"top1", "many", "medium", "few"}
    assert set(ref["split"]) <= {"", "paper", "counts", "unknown"}
    assert ((ref["split"] == "") == (ref["metric"] == "top1")).all()
    assert ref["value"].between(0, 100).all() and (ref["source"] != "").all() and set(ref["tag"]) <= {"V", "M"}
    key = ["method", "match", "dataset", "rho", "metric", "split"]
    assert not ref.duplicated(key).any()
    # deitlt.md 6.1: every CIFAR row is better at rho=50 than at rho=100 (the column-order check of the spec).
    cifar = ref[ref["dataset"].str.startswith("cifar") & (ref["metric"] == "top1")]
    wide = cifar.pivot_table(index=["method", "match", "dataset"], columns="rho", values="value").dropna()
    assert len(wide) >= 20 and (wide[50.0] > wide[100.0]).all()


def test_oracle_selection_says_so_in_the_caption_and_every_row():
    text = render("markdown", select="oracle", metrics=("top1",))
    assert "ORACLE: the best test epoch" in text and "final epoch" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    run_rows = [r for r in rows if not r.startswith("| ↳")]
    assert run_rows and all("(oracle)" in r for r in run_rows)
    assert any(r.startswith("| ↳ gap oracle - final") for r in rows)
    with pytest.raises(UserError, match="now called --select oracle"):
        runset.ReportOptions(select="best")


def test_latex_escaping_and_balance():
    assert latex_escape("erm_vit 5% & #1 {x}") == r"erm\_vit 5\% \& \#1 \{x\}"
    tex = render("latex", heads=True, compare="paper")
    assert tex.count("{") == tex.count("}") and tex.count(r"\begin{") == tex.count(r"\end{")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and "erm\\_vit" in tex
    typeset = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))  # comments stay verbatim
    assert "erm_vit" not in typeset.replace("erm\\_vit", "")


# The minimal document the fragment's header comment asks for: the default article (OT1 text font) with booktabs and
# graphicx. \resizebox is wrapped to say in the log when the table was scaled.
LATEX_DOCUMENT = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                  "\\let\\plainresizebox\\resizebox\\renewcommand\\resizebox{\\typeout{ltbench-resized}\\plainresizebox}\n"
                  "\\begin{document}\n%s\n\\end{document}\n")
# Every variant of the LaTeX output: each adds its own rows, symbols and notes. The last one is narrow.
LATEX_VARIANTS = {
    "default": {},
    "heads-paper-compare": {"heads": True, "split": "paper", "compare": "paper"},
    "oracle-se-ece-compare": {"select": "oracle", "spread": "se", "metrics": ("top1", "ece"), "compare": "paper"},
    "baseline": {"baseline": "erm_vit (preset=paper, epochs=1200)"},
    "one-dataset": {"datasets": ("cifar100lt",), "metrics": ("top1",), "ci": False},
}


def _text_outside_math_and_comments(tex: str) -> str:
    lines = [line for line in tex.splitlines() if not line.startswith(("%", "\\ifdim"))]  # \ifdim's > is TeX
    return re.sub(r"\$[^$]*\$", "", "\n".join(lines))


def test_latex_source_is_safe_in_the_default_font_and_keeps_run_warnings_out_of_the_float():
    for name, options in LATEX_VARIANTS.items():
        tex = render("latex", **options)
        assert not set("<>|") & set(_text_outside_math_and_comments(tex)), name  # OT1 prints them as ¡ ¿ —
        assert "$>$ 100" in tex or "split" in options or "metrics" in options
        float_ = tex[tex.index(r"\begin{table}"):tex.index(r"\end{table}")]
        after = tex.split(r"\end{table}")[1]
        assert "Excluded" not in float_ and ("% Excluded 1 incomplete run(s)" in after or "datasets" in options)
        assert r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\box0}" in tex  # scaled only when wider
    standalone = render("latex", standalone=True)
    assert r"\footnotesize Excluded 1 incomplete run(s)" in standalone.split(r"\end{table}")[1]  # shown below it


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (.ci/run installs it)")
def test_every_latex_variant_compiles_and_only_wide_tables_are_scaled(tmp_path):
    """All variants as fragments in one minimal article (one pdflatex call), and the --standalone document."""
    body = "\n".join(f"\\typeout{{ltbench-variant {name}}}\n" + render("latex", **options)
                     for name, options in LATEX_VARIANTS.items())
    (tmp_path / "fragments.tex").write_text(LATEX_DOCUMENT % body)
    (tmp_path / "standalone.tex").write_text(render("latex", heads=True, compare="paper", standalone=True))
    for stem in ("fragments", "standalone"):
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{stem}.tex"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]
        assert (tmp_path / f"{stem}.pdf").stat().st_size > 1000
    log = (tmp_path / "fragments.log").read_text(errors="replace")
    marks = re.findall(r"ltbench-(variant \S+|resized)", log)
    scaled = {marks[i - 1].split()[1] for i, mark in enumerate(marks) if mark == "resized"}
    assert scaled == set(LATEX_VARIANTS) - {"one-dataset"}


def test_json_and_html_keep_the_numbers():
    payload = json.loads(render("json"))
    assert len(payload["cells"]) == len(pd.read_csv(io.StringIO(render("csv"))))
    assert payload["incomplete"][0]["reason"].startswith("unfinished")
    assert len({r["run_id"] for r in payload["runs"]}) == 15 and len(payload["runs"]) == 15 + 6 * 2  # + CLS/DIST
    html = render("html")  # tests/test_html_report.py checks the page
    tables = re.findall(r'<table class="report sortable">(.*?)</table>', html, re.S)
    assert [t.count("<tr><td") for t in tables] == [3, 2] and "<b>" in html and 'colspan="4"' in html


def test_filters_and_bad_options(tmp_path):
    text = render("markdown", methods=("deitlt",), datasets=("cifar100lt",))
    assert "erm" not in text and "cifar10lt" not in text
    with pytest.raises(UserError, match="--metric"):
        runset.ReportOptions(metrics=("top5",))
    with pytest.raises(UserError, match="No run folders"):
        rp.report(tmp_path)
    with pytest.raises(UserError, match="nothing to tabulate"):
        render("markdown", methods=("paco",))


def test_plots_are_written_for_rows_and_distilled_heads(tmp_path):
    from ltbench.plots import write_plots

    files = write_plots(runset.load_runs(GOLDEN), tmp_path)
    names = sorted(p.name for p in files)
    assert "per_class_cifar10lt_rho100.png" in names and "per_class_cifar10lt_rho100.pdf" in names
    assert [n for n in names if n.startswith("cls_dist")] == [
        "cls_dist_deitlt_cifar100lt_rho100.pdf", "cls_dist_deitlt_cifar100lt_rho100.png",
        "cls_dist_deitlt_cifar10lt_rho100.pdf", "cls_dist_deitlt_cifar10lt_rho100.png"]
    for path in files:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")


def test_latex_is_a_table_to_paste_and_standalone_wraps_the_same_table_in_a_document():
    table = render("latex")
    document = render("latex", standalone=True)
    assert "\\documentclass" not in table and "\\begin{table}" in table and "\\toprule" in table
    assert document.startswith("\\documentclass") and document.endswith("\\end{document}\n")
    float_ = table[table.index("\\begin{table}"):]
    assert float_ in document and "\\usepackage{booktabs}" in document


def test_per_class_plot_marks_the_groups_bands_the_seeds_and_labels_ticks_plainly():
    from ltbench import plots

    runs = runset.load_runs(GOLDEN)
    frame = runs.frame.drop_duplicates("run_id")
    frame = frame.assign(row=frame["run_id"].map(rp.label_rows(runs)))
    cell = frame[(frame["dataset"] == "cifar100lt") & (frame["rho"] == 100)]  # deitlt: 3 seeds, erm_vit: 1
    axes = plots._per_class_figure(runs, cell, "cifar100lt").axes[0]
    assert sorted(line.get_xdata()[0] for line in axes.lines if line.get_linestyle() == ":") == [20, 100]
    assert [text.get_text() for text in axes.texts] == ["many", "medium", "few"]
    assert len(axes.collections) == 1  # a band for the row with several seeds only
    assert [axes.xaxis.get_major_formatter()(v, 0) for v in (5, 200, 5000)] == ["5", "200", "5,000"]


def _write_finished_run(results: Path, data: dict, seed: int, top1: float, epochs: int = 2,
                        preset: str = "tiny") -> None:
    """A minimal finished run folder named by its config's hash, as the report requires."""
    config = {"method": "erm_cnn", "dataset": "synthetic", "data": data, "hparams": {"epochs": epochs}, "seed": seed,
              "preset": preset, "versions": {"schema": 1, "method": 1, "dataset": 1}}
    folder = results / "runs" / RunConfig.from_dict(config).run_id
    folder.mkdir(parents=True)
    groups = {"many": None, "medium": top1, "few": top1}
    main = {"top1": top1, "ece": 5.0, "per_class": [top1] * 4, "counts": groups, "paper": groups}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "result.json").write_text(json.dumps({"run_id": folder.name, "config": config, "method": "erm_cnn",
                                                    "dataset": "synthetic", "class_counts": [40, 20, 10, 4],
                                                    "final": {"epoch": 2, "heads": {"main": main}}}))
    (folder / "DONE").write_text("")


def test_runs_on_different_dataset_options_get_their_own_columns(tmp_path):
    for seed in (0, 1):
        _write_finished_run(tmp_path, {"rho": 10.0, "n_max": 40}, seed, 30.0 + seed)
        _write_finished_run(tmp_path, {"rho": 10.0, "n_max": 80}, seed, 60.0 + seed)
    table = rp.build_table(rp.aggregate(runset.load_runs(tmp_path)), runset.load_runs(tmp_path), runset.ReportOptions())
    assert [label for label, _ in table.groups] == ["synthetic ρ=10 n_max=40", "synthetic ρ=10 n_max=80"]
    [(label, cells, _)] = table.rows  # one row: the data options label columns, not rows
    assert label == "erm_cnn" and not any(cell.bold for cell in cells)  # nothing to compete with in a column
    assert [cells[0].text, cells[4].text] == ["30.50", "60.50"]


def test_columns_that_ran_other_presets_or_epochs_say_so_in_the_caption(tmp_path):
    _write_finished_run(tmp_path, {"rho": 10.0}, 0, 30.0)
    _write_finished_run(tmp_path, {"rho": 100.0}, 0, 20.0, epochs=5, preset="short")
    text = rp.report(tmp_path, "markdown")
    assert "Columns ran different settings: erm_cnn: preset short, 5 epochs in synthetic ρ=100; preset tiny, " \
           "2 epochs in synthetic ρ=10." in text
    assert "| erm\\_cnn |" in text  # still one row: the caption, not the label, says it
    assert "Columns ran different settings" not in render("markdown")  # the golden rows run one recipe each
