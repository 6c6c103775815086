"""``ltbench export RUN``: a run's network alone, in safetensors, beside its model card (``ltbench.load_model``).

The method is rebuilt from the run folder (config.json, the dataset's facts, its upstream runs found, never
trained) with the weights of the epoch the selection rule reports (``records.selected_modules``: the final
checkpoint, or the weights kept when the val or oracle rule chose their epoch). Its ``export`` hook gives the
network alone; the card records how to rebuild it, the run's own evaluation pipeline, the class names, the heads,
the run id, the config and the test numbers of that epoch. Before anything is written, the network rebuilt from
the card with the serialized weights must give the method's own ``predict`` logits on a probe batch, so an export
never differs silently from what the table shows. ``--adjust TAU|auto`` bakes post-hoc logit adjustment in as a
per-class logit offset, with the numbers ``ltbench eval RUN --adjust`` computed for it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import ltbench
from ltbench import schemas
from ltbench.config import RunConfig
from ltbench.data import DatasetInfo
from ltbench.errors import UserError
from ltbench.exported import ExportedModel, NetworkExport, architecture_call, build_network, describe_transform
from ltbench.losses import log_prior
from ltbench.method import Method
from ltbench.posthoc import RULE as POSTHOC_RULE
from ltbench.posthoc import adjust_logits
from ltbench.records import RESULT_FIX, RunRecord, atomic_write_bytes, atomic_write_json, tau_key
from ltbench.registry import METHODS
from ltbench.resolve import hparams_of
from ltbench.runtime import Runtime
from ltbench.selection import RULE_TEXT, rule_block, rule_named
from ltbench.stages import load_data, resolve_upstream
from ltbench.weights import CARD, WEIGHTS

PROBE_IMAGES = 2
TOLERANCE = 1e-4  # relative to the largest logit: the same operations on the same machine, in another order at most


def export_run(record: RunRecord, runtime: Runtime, out: Path, select: str = "final",
               adjust: str | None = None) -> dict[str, Any]:
    """Write ``out/model.safetensors`` and ``out/model_card.json`` for the epoch ``select`` reports; return the card."""
    rule = rule_named(select)
    result, why = record.finished_result(rule)
    if result is None:
        raise UserError(f"Run {record.run_id} cannot be exported with --select {rule}: {why}.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it is created if missing).")
    config = record.config()
    tested, tau = _tested(record, result, rule, adjust)
    method = rebuilt_method(record, config, runtime, rule, rule_block(result, rule)["epoch"], result)
    network = method.export()
    offset = None if tau is None else (-tau * log_prior(result["class_counts"])).tolist()
    card = model_card(config, method, network, rule, tested, result, tau, offset)
    payload = serialized(network, card)
    check_reproduces(method, card, payload, tau)
    atomic_write_bytes(out / WEIGHTS, payload)  # then the card, which names the weights' sha256: never a mixed pair
    atomic_write_json(out / CARD, card)
    return card


def rebuilt_method(record: RunRecord, config: RunConfig, runtime: Runtime, rule: str, epoch: int,
                   result: dict[str, Any]) -> Method:
    """The run's method on the CPU, in eval mode, with the weights of ``epoch`` (the one ``rule`` chose); built from
    the dataset facts result.json keeps, or, for older runs, from the dataset itself."""
    info = recorded_dataset_info(record, result) or load_data(config, runtime).info
    method = METHODS.get(config.method)(hparams_of(config), info, torch.device("cpu"),
                                         resolve_upstream(config, runtime, train=False))
    modules = record.selected_modules(rule, epoch)
    try:
        for name, module in method.state_modules().items():
            module.load_state_dict(modules[name])
            module.eval()
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"The weights of run {record.run_id}'s epoch {epoch} do not fit its method "
                        f"({' '.join(str(exc).split())[:300]}).") from exc
    return method


def recorded_dataset_info(record: RunRecord, result: dict[str, Any]) -> DatasetInfo | None:
    """The dataset facts the run's result.json recorded, validated; None for runs trained before it kept them."""
    if "dataset_info" not in result:
        return None
    block = schemas.validated(schemas.DatasetInfoBlock, result["dataset_info"],
                              f"result.json of run {record.run_id} (dataset_info)", RESULT_FIX)
    facts = block.model_dump()
    return DatasetInfo(**{**facts, **{key: tuple(facts[key]) for key in ("train_counts", "mean", "std", "class_names")},
                          "paper_split": tuple(block.paper_split) if block.paper_split else None})


def model_card(config: RunConfig, method: Method, network: NetworkExport, rule: str, tested: dict[str, Any],
               result: dict[str, Any], tau: float | None, offset: list[float] | None) -> dict[str, Any]:
    """Everything :func:`ltbench.load_model` needs, and what a reader wants to know about the network."""
    steps = describe_transform(method.eval_transform(), network.input_size)
    normalize = next((s for s in steps if s["op"] == "normalize"), {"mean": None, "std": None})
    names = list(method.info.class_names) or [str(c) for c in range(method.info.num_classes)]
    return {
        "format": "ltbench-export", "format_version": 1, "ltbench_version": ltbench.__version__,
        "run_id": config.run_id, "method": config.method, "dataset": config.dataset, "seed": config.seed,
        "select": rule, "selection": RULE_TEXT[rule], "epoch": tested["epoch"],
        "architecture": network.architecture, "architecture_call": architecture_call(network.architecture),
        "input_size": network.input_size, "normalisation": {"mean": normalize["mean"], "std": normalize["std"]},
        "preprocessing": steps, "class_names": names, "class_counts": result["class_counts"],
        "heads": network.heads, "default_head": "main", "outputs": network.outputs,
        "logit_scale": network.logit_scale, "logit_offset": offset,
        "posthoc": None if tau is None else {"tau": tau, "rule": POSTHOC_RULE},
        "config": config.to_dict(), "test": tested, "weights_file": WEIGHTS,
    }


def serialized(network: NetworkExport, card: dict[str, Any]) -> bytes:
    """The network's state dict as safetensors bytes; their sha256 goes into the card."""
    payload = save_safetensors({k: v.detach().cpu().contiguous() for k, v in network.module.state_dict().items()},
                               metadata={"format": "pt", "ltbench_run_id": card["run_id"], "select": card["select"]})
    card["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    return payload


def _tested(record: RunRecord, result: dict[str, Any], rule: str,
            adjust: str | None) -> tuple[dict[str, Any], float | None]:
    """(the test numbers of what is exported, the post-hoc tau or None)."""
    if adjust is None:
        return rule_block(result, rule), None
    if rule != "final":
        raise UserError("--adjust needs --select final: post-hoc adjustment is computed on the final epoch's logits.")
    posthoc = record.posthoc() or {"taus": {}}
    if adjust == "auto":
        if "auto" not in posthoc:
            raise UserError(f"Run {record.run_id} has no tau chosen on val yet: run `ltbench eval {record.run_id} "
                            f"--adjust auto` first.")
        tau = float(posthoc["auto"]["tau"])
    else:
        try:
            tau = float(adjust)
        except ValueError as exc:
            raise UserError(f"--adjust takes a number (tau) or auto, not {adjust!r}.") from exc
    if not (math.isfinite(tau) and tau >= 0):
        raise UserError(f"--adjust takes tau >= 0, got {adjust}.")
    block = posthoc["taus"].get(tau_key(tau))
    if block is None:
        raise UserError(f"Run {record.run_id} has no post-hoc result at tau={tau_key(tau)}: run `ltbench eval "
                        f"{record.run_id} --adjust {tau_key(tau)}` first, so that the card holds its test numbers.")
    return block, tau


def check_reproduces(method: Method, card: dict[str, Any], payload: bytes, tau: float | None = None) -> None:
    """The network the card rebuilds, with the serialized weights, gives ``method.predict``'s logits (adjusted by
    ``tau``) on a probe batch, every head; else nothing is written."""
    network = build_network(card["architecture"])
    try:
        network.load_state_dict(load_safetensors(payload))
    except RuntimeError as exc:
        raise UserError(f"{card['method']}'s export hook describes another network than it exports "
                        f"({' '.join(str(exc).split())[:300]}); nothing was written.") from exc
    model = ExportedModel(network, card).eval()
    size = card["input_size"]
    x = torch.randn(PROBE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method.predict(x)
        expected = adjust_logits(expected, card["class_counts"], tau) if tau is not None else expected
        got = model.heads(x)
    wrong = sorted(set(expected) ^ set(got)) or [
        head for head, logits in expected.items()
        if not torch.allclose(got[head], logits.float(), rtol=0, atol=TOLERANCE * (1 + logits.abs().max().item()))]
    if wrong:
        raise UserError(f"{card['method']}'s exported network does not reproduce its predict() on the heads "
                        f"{', '.join(wrong)} (export hook: {type(method).__name__}.export); nothing was written.")
