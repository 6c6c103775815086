"""`ltbench report --format html`: a self-contained page (a section per dataset, every number of the table, its ↳
rows, the figures, links to the run folders), checked as source and, where Debian's chromium is installed (.ci/run
installs it), in a real headless browser: no console message, every table drawn and made sortable, sorting works."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ltbench import plots, runset
from ltbench import report as rp
from ltbench.config import RunConfig

GOLDEN = Path(__file__).resolve().parent / "golden"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _page(tmp_path: Path, figures: bool = False, **options) -> str:
    return rp.report(GOLDEN, "html", runset.ReportOptions(**options), page_dir=tmp_path,
                     figures=plots.page_figures if figures else None)


def test_the_page_is_self_contained_with_a_section_per_dataset_and_every_number(tmp_path):
    page = _page(tmp_path)
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page and "<style>" in page
    assert not re.search(r"(src|href)=\"(https?:)?//|@import|url\(", page)  # nothing fetched from a network
    assert re.findall(r'<section id="([^"]+)"', page) == ["cifar10lt", "cifar100lt"]
    table = [line for line in rp.report(GOLDEN, "markdown").splitlines() if line.startswith("| ")][1:]
    for line in table:  # each Markdown cell's mean, spread and interval, in the same words
        for number in re.findall(r"(?:\*\*)?(\d+\.\d\d)(?:\*\*)?( ± \d+\.\d\d)?( \[[^]]+\])?", line):
            shown = f"<b>{number[0]}</b>" if f"**{number[0]}**" in line else number[0]
            spread = f' <span class="sd">{number[1].strip()}</span>' if number[1] else ""
            interval = f' <span class="ci">{number[2].strip()}</span>' if number[2] else ""
            assert shown + spread + interval in page, number
    assert "[84.77, 87.31]" in page and "(n=2)" in page and "<b>86.00</b>" in page  # intervals, counts, bold
    assert "Accuracy (%) on the balanced test set at the final epoch" in page  # the caption, once, as a paragraph


def test_rows_keep_their_arrow_rows_for_sorting_and_every_option_stays_visible(tmp_path):
    page = _page(tmp_path, select="oracle", compare="paper", baseline="erm_vit (preset=paper, epochs=1200)")
    bodies = re.findall(r"<tbody>(.*?)</tbody>", page.split('class="runs')[0], re.S)
    assert bodies and all(body.startswith("<tr><td") for body in bodies)  # a run row first, then its ↳ rows
    deitlt = next(b for b in bodies if 'data-v="deitlt (oracle)"' in b)
    assert "↳ final" in deitlt and "↳ gap oracle - final" in deitlt and "↳ paper" in deitlt
    assert "↳ Δ vs erm_vit (preset=paper, epochs=1200) (paired)" in deitlt and "P(better)" in deitlt
    assert "ORACLE: the best test epoch" in page and "Paper numbers:" in page


def test_run_folders_are_linked_relative_to_the_page_and_left_out_runs_are_listed(tmp_path):
    page = _page(tmp_path)
    links = re.findall(r'<a href="([^"#]+)/">([0-9a-f]{12})</a>', page)
    finished = {p.name for p in (GOLDEN / "runs").iterdir() if (p / "DONE").is_file()}
    assert {rid for _, rid in links} == {p.name for p in (GOLDEN / "runs").iterdir()}  # the unfinished one too
    assert all((tmp_path / href).resolve() == GOLDEN / "runs" / rid for href, rid in links) and len(finished) == 15
    left_out = page.split("<h2>Left out</h2>")[1]
    assert "unfinished (3 epoch(s) logged)" in left_out and "Excluded 1 incomplete run(s)" in left_out


def test_the_figures_are_embedded_in_their_datasets_sections(tmp_path):
    page = _page(tmp_path, figures=True, methods=("deitlt",))
    sections = dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, re.S))
    for dataset, expected in (("cifar10lt", 2), ("cifar100lt", 2)):  # the per-class and the CLS-vs-DIST figure
        images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)"', sections[dataset])
        assert len(images) == expected and all(base64.b64decode(data)[:4] == b"\x89PNG" for data, _ in images)
    assert "DeiT-LT on CIFAR-10-LT ρ=100: CLS vs DIST head per class" in sections["cifar10lt"]


# The browser test clicks the first metric header of the first table and records the rows' order and whether every
# image decoded, as attributes that --dump-dom shows.
PROBE = """<script>window.addEventListener("load", function () {
  var table = document.querySelector("table.report");
  table.querySelector("th[data-col='1']").click();
  document.body.setAttribute("data-sorted", Array.prototype.map.call(table.tBodies, function (b) {
    return b.rows[0].cells[1].getAttribute("data-v"); }).join(","));
  document.body.setAttribute("data-images", String(Array.prototype.every.call(document.images, function (i) {
    return i.complete && i.naturalWidth > 0; })));
});</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_page_in_a_headless_browser(tmp_path, cli):
    page = tmp_path / "report.html"
    cli("report", "--results", str(GOLDEN), "--format", "html", "--out", str(page))  # with its figures
    shot = _chromium("--window-size=1400,1800", f"--screenshot={tmp_path / 'shot.png'}", page.as_uri())
    assert (tmp_path / "shot.png").stat().st_size > 20_000, shot.stderr[-2000:]
    assert ":CONSOLE" not in shot.stderr, [line for line in shot.stderr.splitlines() if ":CONSOLE" in line]
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert ":CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert dom.stdout.count('data-ready="sortable"') == 4  # two sections, each with its table and its run folders
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-images="true"' in body and len(re.findall(r"<img ", dom.stdout)) == 5
    sorted_top1 = [float(v) for v in re.search(r'data-sorted="([^"]*)"', body).group(1).split(",")]
    assert sorted_top1 == sorted(sorted_top1) and len(sorted_top1) == 3  # CIFAR-10-LT's three rows, ascending


def test_config_values_are_escaped_in_the_page(tmp_path):
    nasty = '<script>alert(1)</script> "q" & <b>'
    for folder in sorted((GOLDEN / "runs").iterdir()):
        config = json.loads((folder / "config.json").read_text())
        if config["method"] == "deitlt" and config["dataset"] == "cifar100lt":
            config["hparams"]["auto_augment"] = nasty if config["seed"] == 0 else "rand"
            target = tmp_path / "runs" / RunConfig.from_dict(config).run_id
            shutil.copytree(folder, target)
            (target / "config.json").write_text(json.dumps(config))
    page = rp.report(tmp_path, "html")
    assert "<script>alert" not in page and "auto_augment=&lt;script&gt;alert(1)&lt;/script&gt; &quot;q&quot;" in page
    assert page.count("<script>") == 1  # the page's own sort script only
