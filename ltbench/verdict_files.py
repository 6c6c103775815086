"""A reproduction suite's verdict as files: ``verdict.md`` and ``verdict.json`` under ``RESULTS/reproduce/SUITE/``,
with the runs they judged and how they were trained."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ltbench import sweep as sw
from ltbench.records import RunRecord, atomic_write_bytes, atomic_write_json, runs_dir
from ltbench.reproduce import PASS, Suite, Verdict, exit_code


def verdict_markdown(suite: Suite, verdicts: Sequence[Verdict], plan: sw.SweepPlan, header: Mapping[str, Any]) -> str:
    passed = sum(v.status == PASS for v in verdicts)
    lines = [f"## `ltbench reproduce {suite.name}`: {passed}/{len(verdicts)} expectation(s) pass", "",
             *(f"- {k}: {v}" for k, v in header.items()), "",
             "| expectation | source | measured | expected | tolerance | verdict |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        note = f" ({'; '.join(v.notes)})" if v.notes else ""
        lines.append(f"| {_md(v.expectation.name)}{_md(note)} | {_md(v.expectation.source)} | {v.measured} | "
                     f"{v.expected} | {v.tolerance} | **{v.status}** |")
    lines += ["", "| run | method | preset | dataset | device | wall time | img/s |", "|---|---|---|---|---|---:|---:|"]
    for row in run_rows(plan):
        lines.append("| " + " | ".join(str(row[k]) for k in ("run", "method", "preset", "dataset", "device",
                                                                 "wall time", "img/s")) + " |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def run_rows(plan: sw.SweepPlan) -> list[dict[str, str]]:
    """Each run of the plan with where and how fast it trained (from its result.json)."""
    rows = []
    for job in plan.jobs.values():
        record = RunRecord(runs_dir(plan.results) / job.run_id)
        result = (record.finished_result()[0] if job.status == "done" else None) or {}  # validated, or left out
        rho = job.config.data.get("rho")
        rows.append({"run": job.run_id, "method": job.config.method, "preset": job.config.preset,
                     "dataset": job.config.dataset + ("" if rho is None else f" ρ={rho:g}"),
                     "device": result.get("device", job.status),
                     "wall time": f"{result['wall_time_s'] / 60:.1f} min" if "wall_time_s" in result else "–",
                     "img/s": f"{result['images_per_s']:,.0f}" if "images_per_s" in result else "–"})
    return rows


def write_verdicts(suite: Suite, verdicts: Sequence[Verdict], plan: sw.SweepPlan, header: dict[str, Any]) -> Path:
    """``<results>/reproduce/<suite>/verdict.md`` and ``verdict.json``, next to the runs; returns the folder."""
    folder = plan.results / "reproduce" / suite.name
    atomic_write_bytes(folder / "verdict.md", verdict_markdown(suite, verdicts, plan, header).encode())
    atomic_write_json(folder / "verdict.json", {"suite": suite.name, "file": str(suite.path), **header,
                                                "exit_code": exit_code(verdicts),
                                                "verdicts": [v.row() for v in verdicts], "runs": run_rows(plan)})
    return folder


def run_header(plan: sw.SweepPlan, trained_s: float | None, device: str) -> dict[str, Any]:
    """``trained_s``: wall time of this call's training (planning and Ray start included); None = trained nothing."""
    trained = "nothing" if trained_s is None else f"{trained_s / 60:.1f} min of wall time"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
            "this call trained": trained, "results": str(plan.results), "runs": sw.summarize(plan.jobs.values())}

