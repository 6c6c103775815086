"""SAM: the perturbation has norm rho along the gradient, the second gradient is taken at w + eps, the weights are
restored before the base SGD step, and BatchNorm statistics are updated by both passes (the reference behaviour)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltbench import resolve, stages
from ltbench.records import run_record
from ltbench.runtime import Runtime
from ltbench.sam import SAM
from ltbench.stages import build_trainer


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_perturbation_norm_equals_rho_along_the_gradient_and_descend_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    F.cross_entropy(model(torch.randn(6, 3)), torch.tensor([0, 1, 1, 0, 1, 0])).backward()
    params = list(model.parameters())
    before, grad = _flat(p.detach().clone() for p in params), _flat(p.grad.clone() for p in params)
    sam = SAM(model)
    returned = sam.ascend(0.3)
    eps = _flat(p.detach() for p in params) - before
    assert returned.item() == pytest.approx(0.3, rel=1e-6)
    assert eps.norm().item() == pytest.approx(0.3, rel=1e-5)
    torch.testing.assert_close(eps, 0.3 * grad / grad.norm(), rtol=1e-4, atol=1e-6)
    sam.descend()
    torch.testing.assert_close(_flat(p.detach() for p in params), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(_flat(p.grad for p in params), grad)  # gradients are left for the optimizer


def _grads_at(model: nn.Module, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(probe.parameters(), weights):
            p.copy_(w)
    probe.train()
    F.cross_entropy(probe(x), y).backward()
    return [p.grad for p in probe.parameters()]


def test_engine_step_takes_the_second_gradient_at_the_perturbed_point(tmp_path):
    rho, wd = 0.5, 1e-3
    config = resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=[f"sam_rho={rho}", f"weight_decay={wd}"])
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", progress=False, echo=lambda *_: None)
    data = stages.load_data(config, runtime)
    trainer = build_trainer(config, runtime, {}, data=data, record=run_record(tmp_path, config))
    method = trainer.method
    model = method.trainable().train()
    bn = model.backbone.bn1

    seen: list[tuple[list[torch.Tensor], int]] = []
    original_loss = method.loss

    def recording_loss(batch):
        seen.append(([p.detach().clone() for p in model.parameters()], int(bn.num_batches_tracked)))
        return original_loss(batch)

    method.loss = recording_loss
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    w0 = [p.detach().clone() for p in model.parameters()]
    g1 = _grads_at(model, w0, x, y)
    eps = [rho * g / _flat(g1).norm() for g in g1]
    lr = trainer.optimizer.param_groups[0]["lr"]
    tracked = int(bn.num_batches_tracked)

    trainer.step([(x, y)], epoch=0)

    assert len(seen) == 2
    torch.testing.assert_close(_flat(seen[0][0]), _flat(w0))
    torch.testing.assert_close(_flat(seen[1][0]), _flat(w0) + _flat(eps), rtol=1e-4, atol=1e-6)
    # BatchNorm statistics move in both passes (train mode), as in Saddle-LongTail's SAM
    assert seen[1][1] == tracked + 1 and int(bn.num_batches_tracked) == tracked + 2
    # restored, then one classical-momentum SGD step with the gradient at the perturbed point (first step: the
    # momentum buffer is the gradient). The gradient is taken at the recorded point: at rho = 0.5 a 1e-7 change of
    # the point moves this small network's gradient by ~0.2%.
    g2 = _grads_at(model, seen[1][0], x, y)
    expected = [w - lr * (g + wd * w) for w, g in zip(w0, g2)]
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()), _flat(expected), rtol=1e-4, atol=1e-6)


def test_step_schedule_of_the_radius_follows_zero_based_epochs(tmp_path):
    """Saddle's ImageNet-LT / iNat steps: 1-based epochs 1-5, 6-60, 61-75, 76-90 = 0-based starts 5, 60, 75."""
    config = resolve.make_config("ldam_drw", "synthetic", preset="tiny", epochs=90,
                                sets=["sam_rho_steps=0.05,0.1,0.5,0.5", "sam_rho_epochs=5,60,75"])
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", progress=False, echo=lambda *_: None)
    trainer = build_trainer(config, runtime, {}, record=run_record(tmp_path, config))
    radii = {epoch: trainer._sam_rho(epoch) for epoch in (0, 4, 5, 59, 60, 74, 75, 89)}
    assert radii == {0: 0.05, 4: 0.05, 5: 0.1, 59: 0.1, 60: 0.5, 74: 0.5, 75: 0.5, 89: 0.5}
    assert trainer.sam is not None
