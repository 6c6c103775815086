"""A reproduction suite's verdict as files: ``verdict.md`` and ``verdict.json`` under ``RESULTS/reproduce/SUITE/``,
with the runs they judged, how they were trained and which ltbench judged them; and the last verdict of a suite.

``verdict.json`` holds numbers (means, standard deviations, seeds, tolerances, seconds); ``verdict.md`` and the
console format them."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ltbench
from ltbench import schemas
from ltbench import sweep as sw
from ltbench.errors import UserError
from ltbench.records import RunRecord, atomic_write_bytes, atomic_write_json, runs_dir
from ltbench.reproduce import PASS, Suite, Verdict, exit_code

VERDICT_JSON = "verdict.json"


def verdict_markdown(suite: Suite, verdicts: Sequence[Verdict], plan: sw.SweepPlan, header: Mapping[str, Any]) -> str:
    passed = sum(v.status == PASS for v in verdicts)
    lines = [f"## `ltbench reproduce {suite.name}`: {passed}/{len(verdicts)} expectation(s) pass", "",
             *(f"- {k}: {v}" for k, v in _header_text(header).items()), "",
             "| expectation | source | measured (mean ± std over seeds) | seeds | expected | tolerance | verdict |",
             "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        note = f" ({'; '.join(v.notes)})" if v.notes else ""
        seeds = " vs ".join(",".join(map(str, r.seeds)) or "–" for r in v.readings)
        lines.append(f"| {_md(v.expectation.name)}{_md(note)} | {_md(v.expectation.source)} | {v.measured} | "
                     f"{seeds} | {v.expected} | {v.tolerance} | **{v.status}** |")
    columns = ("run", "method", "preset", "epochs", "dataset", "seed", "device", "wall time", "img/s")
    lines += ["", "| " + " | ".join(columns) + " |", "|---|---|---|---:|---|---:|---|---:|---:|"]
    for row in run_rows(plan):
        rho = "" if row["rho"] is None else f" ρ={row['rho']:g}"
        wall = "–" if row["wall_time_s"] is None else f"{row['wall_time_s'] / 60:.1f} min"
        rate = "–" if row["images_per_s"] is None else f"{row['images_per_s']:,.0f}"
        cells = (row["run"], row["method"], row["preset"], row["epochs"], row["dataset"] + rho, row["seed"],
                 row["device"] or row["status"], wall, rate)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _header_text(header: Mapping[str, Any]) -> dict[str, str]:
    trained = header["trained_s"]
    return {"date": header["date"], "ltbench": f"{header['ltbench']} (commit {header['commit'] or 'unknown'})",
            "device": header["device"],
            "this call trained": "nothing" if trained is None else f"{trained / 60:.1f} min of wall time",
            "results": header["results"], "runs": header["run_summary"]}


def verdict_record(verdict: Verdict) -> dict[str, Any]:
    """One expectation in verdict.json: numbers, not text."""
    e = verdict.expectation
    return {"expectation": e.name, "kind": e.kind, "source": e.source, "verdict": verdict.status,
            "value": verdict.value,  # value: the cell's mean; order: better - worse; finished: None
            "expected": e.expected, "tolerance": e.tolerance if e.kind == "value" else None,
            "margin": e.margin if e.kind == "order" else None, "heads": list(e.heads) if e.heads else None,
            "readings": [{"cell": r.cell.label(), "mean": r.mean, "std": r.std, "n": len(r.run_ids),
                          "seeds": list(r.seeds), "run_ids": list(r.run_ids), "planned_runs": r.planned}
                         for r in verdict.readings],
            "notes": list(verdict.notes)}


def run_rows(plan: sw.SweepPlan) -> list[dict[str, Any]]:
    """Each run of the plan with its recipe and where and how fast it trained (from its result.json)."""
    rows = []
    for job in plan.jobs.values():
        record = RunRecord(runs_dir(plan.results) / job.run_id)
        result = (record.finished_result()[0] if job.status == "done" else None) or {}  # validated, or left out
        rho = job.config.data.get("rho")
        rows.append({"run": job.run_id, "method": job.config.method, "preset": job.config.preset,
                     "epochs": job.epochs, "dataset": job.config.dataset, "rho": None if rho is None else float(rho),
                     "seed": job.config.seed, "status": job.status, "device": result.get("device"),
                     "wall_time_s": result.get("wall_time_s"), "images_per_s": result.get("images_per_s")})
    return rows


def write_verdicts(suite: Suite, verdicts: Sequence[Verdict], plan: sw.SweepPlan, header: dict[str, Any]) -> Path:
    """``<results>/reproduce/<suite>/verdict.md`` and ``verdict.json``, next to the runs; returns the folder."""
    folder = verdict_folder(plan.results, suite.name)
    atomic_write_bytes(folder / "verdict.md", verdict_markdown(suite, verdicts, plan, header).encode())
    atomic_write_json(folder / VERDICT_JSON, {"suite": suite.name, "file": str(suite.path), **header,
                                              "exit_code": exit_code(verdicts),
                                              "verdicts": [verdict_record(v) for v in verdicts],
                                              "runs": run_rows(plan)})
    return folder


def verdict_folder(results: Path, suite_name: str) -> Path:
    return Path(results) / "reproduce" / suite_name


def run_header(plan: sw.SweepPlan, trained_s: float | None, device: str) -> dict[str, Any]:
    """``trained_s``: wall time of this call's training (planning and Ray start included); None = trained nothing."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ltbench": ltbench.__version__,
            "commit": source_commit(), "device": device, "trained_s": trained_s, "results": str(plan.results),
            "run_summary": sw.summarize(plan.jobs.values())}


def source_commit() -> str | None:
    """The git commit of the ltbench source that runs, or None (an installed copy outside a checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(ltbench.__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def last_verdict(results: Path, suite_name: str) -> str:
    """What ``reproduce --list`` says of a suite: its last verdict in ``results``, or that it is only projected."""
    path = verdict_folder(results, suite_name) / VERDICT_JSON
    if not path.is_file():
        return "never run: projected only"
    fix = f"Run `ltbench reproduce {suite_name}` again to rewrite it, or delete it."
    try:
        found = schemas.validated(schemas.VerdictFile, schemas.read_json(path, fix), path, fix)
    except UserError:
        return f"unreadable {path.name} ({fix})"
    passed = sum(v.verdict == PASS for v in found.verdicts)
    return f"{passed}/{len(found.verdicts)} pass, {found.date}"
