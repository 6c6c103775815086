"""What a person sees: the shared consoles, the live sweep view and every rich table the commands print.

Library modules return data; this module draws it. Status lines go to stderr (:func:`say`), tables to stdout.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ltbench import projection, verdict_files
from ltbench import reproduce as rpd
from ltbench.compare import params_text
from ltbench.launcher import SweepObserver
from ltbench.records import LOG, run_state, runs_dir
from ltbench.selection import RULE_TEXT, RULES, rule_block
from ltbench.sweep import Job, SweepPlan, describe_job, num_text
from ltbench.terminal import console, doc_summary, err_console, print_listing, say  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# The live view of a sweep


class LiveView(SweepObserver):
    """A rich live panel: runs done / running / failed / pending, per-trial epochs, and an ETA.

    The ETA divides the epochs still to train by the epochs trained per second so far in this
    call, so it is meaningful before the first trial finishes and with runs of unequal length.
    """

    def __init__(self, plan: SweepPlan, console: Any, refresh_s: float = 1.0) -> None:
        self.plan, self.refresh_s, self.console = plan, refresh_s, console
        self.running: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.retries: dict[str, int] = {}
        self.start_epochs = {j.run_id: j.epochs_done for j in plan.jobs.values()}
        self.started_at: float | None = None
        self.last_draw = 0.0
        self.wave_text = ""
        # In a log file (no terminal) a redrawn panel is noise: print one line per event instead.
        self.live = Live(self.render(), console=console, refresh_per_second=4) if console.is_terminal else None

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tick(force=True)
        if self.live:
            self.live.__exit__(*exc)

    # --- events ------------------------------------------------------------------------------
    def trial_started(self, run_id: str) -> None:
        self.started_at = self.started_at or time.time()
        self.running[run_id] = time.time()
        self._event("started", run_id)

    def trial_retried(self, run_id: str) -> None:
        self.retries[run_id] = self.retries.get(run_id, 0) + 1
        self.running.pop(run_id, None)
        self._event(f"retry {self.retries[run_id]}", run_id)

    def trial_finished(self, run_id: str, error: str | None) -> None:
        self.running.pop(run_id, None)
        self.plan.jobs[run_id].status, self.plan.jobs[run_id].epochs_done = run_state(self.plan.results, run_id)
        if error is not None:
            self.failed[run_id] = error
        self._event("failed: " + error if error else self.plan.jobs[run_id].status, run_id)

    def wave_started(self, wave: int, jobs: list[Job], resources: Mapping[str, float]) -> None:
        upstream = sum(not j.requested for j in jobs)
        what = f" ({upstream} upstream)" if upstream else ""
        self.wave_text = (f"wave {wave}: {len(jobs)} run(s){what}, each on {num_text(resources['cpu'])} CPU(s) and "
                          f"{num_text(resources['gpu'])} GPU(s)")
        if self.live:
            self.tick(force=True)
        else:
            self.console.print(self.wave_text, highlight=False, soft_wrap=True, markup=False)

    def _event(self, what: str, run_id: str) -> None:
        if self.live:
            self.tick(force=True)
            return
        done = sum(j.status == "done" for j in self.plan.jobs.values())
        self.console.print(f"[{done}/{len(self.plan.jobs)} done, ETA {self.eta()}] {run_id} "
                           f"({self.plan.jobs[run_id].label}): {what}", highlight=False, soft_wrap=True, markup=False)

    def tick(self, force: bool = False) -> None:
        if self.live and (force or time.time() - self.last_draw >= self.refresh_s):
            self.last_draw = time.time()
            for run_id in self.running:
                job = self.plan.jobs[run_id]
                job.status, job.epochs_done = run_state(self.plan.results, run_id)
            self.live.update(self.render())

    # --- drawing -----------------------------------------------------------------------------
    def eta(self) -> str:
        jobs = self.plan.jobs.values()
        trained = sum(max(0, j.epochs_done - self.start_epochs[j.run_id]) for j in jobs)
        left = sum(j.epochs - j.epochs_done for j in jobs if j.status != "done" and j.run_id not in self.failed)
        if not self.started_at or trained == 0 or left == 0:
            return "-"
        return _duration(left * (time.time() - self.started_at) / trained)

    def render(self) -> Any:
        jobs = list(self.plan.jobs.values())
        done = sum(j.status == "done" for j in jobs)
        pending = len(jobs) - done - len(self.running) - len(self.failed)
        elapsed = _duration(time.time() - self.started_at) if self.started_at else "0:00:00"
        head = Text.assemble(("sweep ", "bold"), (self.plan.sweep_id, "cyan"), f"  {done}/{len(jobs)} done  ",
                             (f"{len(self.running)} running", "yellow"), "  ",
                             (f"{len(self.failed)} failed", "red" if self.failed else ""),
                             f"  {max(0, pending)} pending  elapsed {elapsed}  ETA {self.eta()}")
        table = Table(box=None, pad_edge=False, header_style="dim")
        for col in ("run id", "run", "epochs", "time", "retries"):
            table.add_column(col)
        for run_id, since in sorted(self.running.items()):
            job = self.plan.jobs[run_id]
            table.add_row(run_id, job.label, f"{job.epochs_done}/{job.epochs}", _duration(time.time() - since),
                          str(self.retries.get(run_id, "")))
        parts: list[Any] = [head, Text(self.wave_text, style="dim")] + ([table] if self.running else [])
        parts += [Text(f"failed {run_id} ({self.plan.jobs[run_id].label}): {error}", style="red")
                  for run_id, error in sorted(self.failed.items())[-5:]]
        return Group(*parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"




# ----------------------------------------------------------------------------------------------
# Tables and status lines of the commands


def device_text(runtime) -> str:
    device = runtime.torch_device()
    if device.type != "cuda":
        return f"{device} ({os.cpu_count()} CPU cores)"
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"


def print_suite_plan(suite, plan) -> None:
    table = projection.throughput_table()
    hours = {j.run_id: projection.projected_hours(j, table) for j in plan.jobs.values()}
    extra = {rid: {"GPU h": "n/a" if h is None else f"{h:.2f}"} for rid, h in hours.items()}
    print_jobs(plan.jobs.values(), title=f"suite {suite.name} (dry run) -> {plan.results}", extra=extra)
    known = [h for h in hours.values() if h is not None]
    unknown = len(hours) - len(known)
    say(f"projected: {sum(known):.2f} GPU hours for what is not done" +
         (f" ({unknown} run(s) n/a)" if unknown else ""))
    say(projection.PROJECTION_TEXT, style="dim")
    for expectation in suite.expectations:
        say(escape(f"expects: {expectation.name}  [{expectation.source}]"), style="dim")


def list_suites(results: Path) -> None:
    rows = []
    throughput = projection.throughput_table()
    for name, path in sorted(rpd.shipped_suites().items()):
        suite = rpd.load_suite(str(path))
        plan, _ = rpd.plan_suite(suite, results)
        hours = [projection.projected_hours(j, throughput) for j in plan.jobs.values()]
        known = sum(h for h in hours if h is not None)
        cost = "n/a (CPU)" if all(h is None for h in hours) else f"{known:.2f}" + ("+" if None in hours else "")
        rows.append((name, str(len(plan.jobs)), str(len(suite.expectations)), cost,
                     verdict_files.last_verdict(results, name), suite.summary))
    numbers = ("runs", "expectations", "projected GPU h")
    print_listing(("suite", *numbers, f"last verdict in {results}", "description"), rows,
                  "reproduction suites (ltbench reproduce SUITE)", numbers)
    console.print(projection.PROJECTION_TEXT, style="dim", highlight=False)


def print_verdicts(suite, verdicts) -> None:
    style = {"PASS": "green", "FAIL": "red", "MISSING": "yellow"}
    passed = sum(v.status == "PASS" for v in verdicts)
    table = Table(title=f"ltbench reproduce {suite.name}: {passed}/{len(verdicts)} pass")
    for col in ("expectation", "source", "measured", "expected", "tolerance", "verdict"):
        table.add_column(col)
    for v in verdicts:
        note = f"\n({'; '.join(v.notes)})" if v.notes else ""
        table.add_row(escape(v.expectation.name + note), escape(v.expectation.source), v.measured, v.expected,
                      v.tolerance,
                      f"[{style[v.status]}]{v.status}[/]")
    console.print(table)


def print_jobs(jobs, title: str, extra: dict[str, dict[str, str]] | None = None) -> None:
    """An aligned plain-text table (it stays readable in logs and narrow terminals); ``extra`` adds columns
    per run id."""
    rows = [{**describe_job(j), **(extra or {}).get(j.run_id, {})} for j in jobs]
    if not rows:
        return
    # a sweep's "set" column: only swept cells have it (not their teachers, listed first)
    columns = list(dict.fromkeys(col for row in sorted(rows, key=len, reverse=True) for col in row))
    rows = [{col: row.get(col, "-") for col in columns} for row in rows]
    widths = {col: max(len(col), *(len(r[col]) for r in rows)) for col in columns}
    style = {"done": "green", "partial": "yellow", "failed": "red", "blocked": "red"}
    console.print(title, style="bold")
    console.print("  ".join(col.ljust(w) for col, w in widths.items()), style="dim")
    for row in rows:
        line = "  ".join(row[col].ljust(w) for col, w in widths.items())
        console.print(line, style=style.get(row["status"]))


def sweep_problems(outcome) -> int:
    """Print the runs a sweep left unfinished and why; the exit status that calls for (0: none)."""
    plan = outcome.plan
    shown = {**{run_id: {"status": "failed"} for run_id in outcome.failed},
             **{run_id: {"status": "blocked"} for run_id in outcome.blocked}}
    unfinished = [j for j in plan.jobs.values() if j.status != "done"]
    if unfinished:
        print_jobs(unfinished, title=f"sweep {plan.sweep_id}: runs not done", extra=shown)
    for run_id, error in outcome.failed.items():
        say(f"[red]failed[/] {run_id} ({plan.jobs[run_id].label}): {escape(error)}")
        say(f"  its log: {runs_dir(plan.results) / run_id / LOG}; traceback: "
            f"{outcome.tracebacks.get(run_id, 'see Ray logs')}", style="dim")
    for run_id, reason in outcome.blocked.items():
        say(f"[red]not started[/] {run_id} ({plan.jobs[run_id].label}): {escape(reason)}")
    for run_id, reason in outcome.waiting.items():
        say(f"waiting {run_id} ({plan.jobs[run_id].label}): {escape(reason)}")
    done = sum(j.status == "done" for j in plan.jobs.values())
    say(f"{done}/{len(plan.jobs)} run(s) done; each run's log: {plan.results}/runs/<run id>/{LOG}; Ray's files: "
        f"{plan.sweep_dir}")
    if outcome.failed or outcome.blocked:
        say("Fix the cause and run the same command again: finished runs are kept.")
        return 1
    if outcome.interrupted:
        say("Interrupted: run the same command again to resume the unfinished runs.")
        return 130
    if unfinished:
        say("Stopped by --stop-after-epochs: run the same command to continue.")
    return 0


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_result(result: dict[str, Any], all_heads: bool = False) -> None:
    """A many/medium/few table on test at the epochs the three selection rules pick (main head, or every head)."""
    table = Table(title=f"{result['method']} on {result['dataset']} {result['config']['data']} "
                        f"seed {result['config']['seed']} (run {result['run_id']})")
    for col in ("epoch", "head", "split", "top-1", "many", "medium", "few", "ECE"):
        table.add_column(col, justify="right" if col not in ("head", "split", "epoch") else "left")
    for rule in RULES:
        block, label = rule_block(result, rule), rule
        if not block:
            continue
        head_names = list(block["heads"]) if all_heads else ["main"]
        for head in head_names:
            m = block["heads"][head]
            for split in ("counts", "paper"):
                groups = m.get(split)
                if groups is None:
                    continue
                table.add_row(f"{label} ({block['epoch']})", head, split, _fmt(m["top1"]), _fmt(groups["many"]),
                              _fmt(groups["medium"]), _fmt(groups["few"]), _fmt(m["ece"]))
    console.print(table)
    console.print("counts split: many > 100, medium 20..100, few < 20 training images; paper split: DeiT-LT's "
                  "class-index ranges. n/a = no class in that group. " + "; ".join(RULE_TEXT.values()) + ".",
                  highlight=False, style="dim")


def print_tune(trials: list[dict[str, Any]], best: dict[str, Any] | None, objective: str) -> None:
    """The search's trials, best first: their val objective, how far they went (ASHA stops some early)."""
    table = Table(title=f"search trials ({objective} on val; the test split is never read)")
    for col in ("run", "hyperparameters", objective, "evaluations", "status"):
        table.add_column(col, justify="right" if col in (objective, "evaluations") else "left")
    ordered = sorted(trials, key=lambda t: -(t["objective"] if t["objective"] is not None else -math.inf))
    for trial in ordered:
        mark = " *" if best is not None and trial["run_id"] == best["run_id"] else ""
        table.add_row(trial["run_id"] + mark, params_text(trial["params"]), _fmt(trial["objective"]),
                      str(len(trial["history"])), trial["status"])
    console.print(table)
