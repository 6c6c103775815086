"""Teachers: the catalogue of CNN teacher runs a student can ask for, and a finished run used as a frozen teacher.

``TEACHERS`` names each teacher a distilled ViT (``deit``, ``deitlt``) or a decoupled classifier (``crt``) can
request, and :func:`teacher_config` resolves the run it needs. :class:`FrozenTeacher` rebuilds a finished run from
its folder, nothing typed by hand.

The teacher's method class comes from the registry by the name in its ``config.json``, its
hyperparameters from the same file, its weights from ``checkpoint.pt`` and its input size from the
``teacher_spec`` its method wrote into ``result.json``. It runs in eval mode (BatchNorm running
statistics, no dropout) without gradients and never appears in the student's optimizer or checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ltbench.config import RunConfig
from ltbench.data import DatasetInfo
from ltbench.errors import UserError
from ltbench.method import Upstream
from ltbench.registry import METHODS
from ltbench.resolve import hparams_of, make_config

# Teacher names -> (CNN method, trained with SAM). A SAM teacher runs its method's SAM variant of the student's
# preset (paper -> sam, short -> short_sam, tiny -> tiny_sam), so the radii live in one place, next to each method:
# LDAM-DRW+SAM as Saddle-LongTail (methods/ldam_drw.py), PaCo+SAM's unpublished radius as methods/paco.py chose.
TEACHERS: dict[str, tuple[str, bool]] = {
    "erm_cnn": ("erm_cnn", False),
    "ldam_drw": ("ldam_drw", False),
    "ldam_drw_sam": ("ldam_drw", True),
    "paco": ("paco", False),
    "paco_sam": ("paco", True),
}
def sam_preset(preset: str) -> str:
    """The SAM variant of a CNN preset name (already-SAM names are kept)."""
    if preset == "sam" or preset.endswith("_sam"):
        return preset
    return "sam" if preset == "paper" else f"{preset}_sam"


def teacher_config(student: RunConfig, teacher: str, preset: str, overrides: tuple[str, ...] = ()) -> RunConfig:
    """The teacher run a student needs: same dataset, rho and seed, original label order."""
    method, with_sam = TEACHERS[teacher]
    preset = sam_preset(preset) if with_sam else preset
    data = {k: v for k, v in student.data.items() if k != "sort_by_frequency"}
    if preset not in METHODS.get(method).presets:
        raise UserError(f"The teacher method {method!r} has no preset {preset!r}; set teacher_preset=NAME.")
    if any(item.startswith("data.") for item in overrides):
        raise UserError("teacher_overrides cannot change dataset options: a teacher sees the student's data.")
    return make_config(method, student.dataset, seed=student.seed, preset=preset, data_options=data,
                              sets=overrides)



class FrozenTeacher:
    def __init__(self, upstream: Upstream, student_info: DatasetInfo, device: torch.device,
                 antialias: bool = False) -> None:
        config, record = upstream.config, upstream.record
        result = record.result(trained=False)  # the bench's stand-in teachers have only class counts
        counts = tuple(result["class_counts"])
        if len(counts) != student_info.num_classes:
            raise UserError(f"Teacher run {record.run_id} has {len(counts)} classes, the student's data has "
                            f"{student_info.num_classes}: a teacher must be trained on the same dataset.")
        info = dataclasses.replace(student_info, train_counts=counts, extras={})
        self.method = METHODS.get(config.method)(hparams_of(config), info, device, {})
        checkpoint = record.load_checkpoint(device)
        for name, module in self.method.state_modules().items():
            module.load_state_dict(checkpoint["modules"][name])
            module.to(device).eval().requires_grad_(False)
        spec = result.get("teacher_spec", {})
        self.input_size = int(spec.get("input_size", student_info.image_size))
        self.run_id = record.run_id
        self.antialias = antialias
        self.label_map = _label_map(config, student_info, device)

    def modules(self) -> list[torch.nn.Module]:
        return list(self.method.state_modules().values())

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Hard teacher labels y_t = argmax g(x) in the student's label space, for the student's (augmented,
        mixed) batch resized to the teacher's input size (:func:`teacher_input`)."""
        y_t = self.method.predict(teacher_input(x, self.input_size, self.antialias))["main"].argmax(dim=1)
        return self.label_map[y_t] if self.label_map is not None else y_t


def teacher_input(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """The batch at the teacher's input size: bicubic, by default *without* antialiasing, as DeiT-LT's
    ``transforms.Resize(size, bicubic)`` on a tensor batch under torchvision 0.15 (224 -> 32 on CIFAR aliases
    high frequencies; that is part of the out-of-distribution signal the released student learned from)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=antialias, align_corners=False)


def _label_map(config, student_info: DatasetInfo, device: torch.device) -> torch.Tensor | None:
    """Original -> frequency-sorted labels when the student sorts and the teacher did not (``--map-targets``)."""
    label_map = student_info.extras.get("label_map")
    if label_map is None or config.data.get("sort_by_frequency", False):
        return None
    return torch.as_tensor(np.asarray(label_map), dtype=torch.long, device=device)
