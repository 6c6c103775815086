"""DeiT and DeiT-LT: losses by hand before and after K, Mixup off after K, a frozen teacher, teacher stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltbench import resolve, stages
from ltbench.models import distilled_heads
from ltbench.registry import METHODS
from ltbench.runtime import Runtime
from ltbench.stages import build_trainer
from tests.conftest import FAST_VIT

DATA = ["data.n_max=48", "data.n_test=4", "data.num_classes=4", "data.rho=8"]
TEACHER = "teacher_overrides=epochs=1,batch_size=32,workers=0"
STUDENT = [*FAST_VIT, *DATA, "batch_size=16", "mixup=0.8", "cutmix=1.0", "teacher=erm_cnn", TEACHER]


def _runtime(results, **options) -> Runtime:
    return Runtime(results=results, data_root=results, device="cpu", progress=False, echo=lambda *_: None, **options)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("deitlt")


def _trainer(results, method="deitlt", extra=(), **runtime_options):
    config = resolve.make_config(method, "synthetic", preset="tiny", epochs=3, sets=[*STUDENT, "drw_epoch=2", *extra]
                                if method == "deitlt" else [*STUDENT, *extra])
    runtime = _runtime(results, **runtime_options)
    upstream = stages.resolve_upstream(config, runtime, train=True)
    return build_trainer(config, runtime, upstream)


def _batch(method, n=8):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3])[:n]
    return method.prepare(x, y)


def _hand_ce(logits, targets, weights=None):
    """-sum w_t log softmax(z)_t / sum w_t, written out."""
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    picked = logp[torch.arange(len(targets)), targets]
    w = torch.ones(len(targets)) if weights is None else weights[targets]
    return -(w * picked).sum() / w.sum()


def test_loss_before_drw_is_soft_ce_plus_plain_distillation(results):
    method = _trainer(results).method
    method.on_epoch_start(0)
    x, soft, y, y_t = _batch(method)
    loss, parts = method.loss((x, soft, y, y_t))
    cls, dist = distilled_heads(method.model, x)
    soft_ce = -(soft * F.log_softmax(cls, dim=1)).sum(1).mean()
    expected = 0.5 * soft_ce + 0.5 * _hand_ce(dist, y_t)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(parts["loss_dist"], _hand_ce(dist, y_t), atol=1e-5)


def test_loss_after_drw_weights_distillation_by_teacher_label(results):
    method = _trainer(results).method
    method.on_epoch_start(2)
    x, soft, y, _ = _batch(method)
    y_t = torch.tensor([3, 3, 0, 1, 2, 3, 0, 0])  # deliberately not the true labels
    loss, parts = method.loss((x, soft, y, y_t))
    cls, dist = distilled_heads(method.model, x)
    counts = torch.tensor(method.info.train_counts, dtype=torch.float64)
    w = (1 - 0.9999) / (1 - 0.9999 ** counts)
    w = (w / w.sum() * len(counts)).float()
    expected_dist = _hand_ce(dist, y_t, w)  # indexed by y_t, weighted mean
    assert torch.allclose(parts["loss_dist"], expected_dist, atol=1e-5)
    assert torch.allclose(parts["loss_cls"], _hand_ce(cls, y), atol=1e-5)  # plain CE, no smoothing
    assert torch.allclose(loss, 0.5 * _hand_ce(cls, y) + 0.5 * expected_dist, atol=1e-5)
    assert not torch.allclose(expected_dist, _hand_ce(dist, y_t), atol=1e-4)  # the weights matter
    assert not torch.allclose(expected_dist, _hand_ce(dist, y_t, w.roll(1)), atol=1e-4)  # indexed by y_t


def test_mixup_is_off_after_drw_and_teacher_sees_the_student_batch(results):
    method = _trainer(results).method
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    method.on_epoch_start(0)
    mixed, soft, _, y_t = method.prepare(x.clone(), y)
    assert not torch.equal(mixed, x) and soft.max() < 1.0
    assert torch.equal(y_t, method.teacher.labels(mixed))
    method.on_epoch_start(2)
    plain, soft, _, y_t = method.prepare(x.clone(), y)
    assert torch.equal(plain, x)
    assert torch.equal(y_t, method.teacher.labels(x))


def test_teacher_is_frozen_in_eval_mode(results):
    trainer = _trainer(results)
    teacher_modules = trainer.method.teacher.modules()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in teacher_modules]
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 4
    trainer.method.trainable().train()
    trainer.step([(x, y)], epoch=0)
    for module, snapshot in zip(teacher_modules, before):
        assert not module.training
        assert all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())  # BN stats included
        assert not any(p.requires_grad for p in module.parameters())
    teacher_ids = {id(p) for m in teacher_modules for p in m.parameters()}
    assert not teacher_ids & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}


def test_teacher_stage_trains_once_and_is_reused(results):
    runtime = _runtime(results / "stage")
    first = resolve.make_config("deitlt", "synthetic", preset="tiny", epochs=2, sets=[*STUDENT, "drw_epoch=1"])
    second = resolve.make_config("deit", "synthetic", preset="tiny", epochs=1, sets=STUDENT)
    assert METHODS.get("deitlt").requires(first) == METHODS.get("deit").requires(second)
    record = stages.ensure(first, runtime)
    teacher_cfg = METHODS.get("deitlt").requires(first)["teacher"]
    teacher = stages.run_record(runtime.results, teacher_cfg)
    stamp = (teacher.path / "result.json").stat().st_mtime_ns
    student2 = stages.ensure(second, runtime)
    assert (teacher.path / "result.json").stat().st_mtime_ns == stamp  # not trained twice
    assert len(list((runtime.results / "runs").iterdir())) == 3
    for rec in (record, student2):
        result = rec.result()
        assert result["upstream"]["teacher"]["run_id"] == teacher.run_id
        assert result["upstream"]["teacher"]["top1"] == teacher.result()["final"]["heads"]["main"]["top1"]
        assert set(result["final"]["heads"]) == {"main", "cls", "dist"}
        for head in ("main", "cls", "dist"):
            assert set(result["final"]["heads"][head]["paper"]) == {"many", "medium", "few"}
    diagnostics = (record.path / "diagnostics.json").read_text()
    assert "mean_attention_distance_px" in diagnostics and "cls_dist_cosine" in diagnostics


def test_teacher_run_by_reference(results):
    runtime = _runtime(results / "stage")
    teacher_cfg = METHODS.get("deitlt").requires(
        resolve.make_config("deitlt", "synthetic", preset="tiny", epochs=2, sets=[*STUDENT, "drw_epoch=1"]))["teacher"]
    teacher = stages.ensure(teacher_cfg, runtime)
    cfg = resolve.make_config("deitlt", "synthetic", preset="tiny", epochs=2,
                             sets=[*STUDENT, "drw_epoch=1", f"teacher_run={teacher.run_id}"])
    upstream = stages.resolve_upstream(cfg, runtime, train=False)
    assert upstream["teacher"].record.path == teacher.path


def test_teacher_resize_follows_the_hparam(results):
    """The teacher resizes without antialiasing unless teacher_antialias=true (tests/test_fidelity.py)."""
    assert _trainer(results).method.teacher.antialias is False
    assert _trainer(results, extra=["teacher_antialias=true"]).method.teacher.antialias is True


def test_drw_epoch_must_be_inside_the_schedule():
    from ltbench.errors import UserError

    with pytest.raises(UserError, match="drw_epoch"):  # an explicit value is kept as given, then checked
        resolve.make_config("deitlt", "cifar10lt", rho=100, epochs=50, sets=["drw_epoch=60"])


@pytest.mark.parametrize(("student_preset", "dataset", "teacher_preset", "sam"), [
    ("paper", "cifar10lt", "sam", {"sam_rho": 0.8, "epochs": 200}),
    ("short", "cifar10lt", "short_sam", {"sam_rho": 0.8, "epochs": 50, "drw_epoch": 40}),
    ("short", "imagenetlt", "short_sam", {"sam_rho_steps": (0.05, 0.1, 0.5, 0.5), "sam_rho_epochs": (1, 16, 20)}),
    ("tiny", "cifar10lt", "tiny_sam", {"sam_rho": 0.8}),
])
def test_sam_teacher_is_the_cnn_methods_own_sam_preset(student_preset, dataset, teacher_preset, sam):
    """A student's SAM teacher is exactly `ltbench run --method ldam_drw --preset <SAM variant>` (same run id)."""
    rho = 100 if dataset == "cifar10lt" else None
    student = resolve.make_config("deitlt", dataset, rho=rho, preset=student_preset, sets=["teacher=ldam_drw_sam"])
    teacher = METHODS.get("deitlt").requires(student)["teacher"]
    direct = resolve.make_config("ldam_drw", dataset, rho=rho, preset=teacher_preset)
    assert (teacher.method, teacher.preset, teacher.run_id) == ("ldam_drw", teacher_preset, direct.run_id)
    assert {k: teacher.hparams[k] for k in sam} == {k: list(v) if isinstance(v, tuple) else v for k, v in sam.items()}


def test_compile_covers_both_heads(results):
    """--compile must reach forward_features: both heads come from it, not from the model's forward."""
    from torch._dynamo.utils import counters

    eager, compiled = _trainer(results).method, _trainer(results, compile=True).method  # same seeded init
    x = torch.randn(4, 3, 32, 32)
    counters.clear()
    with torch.no_grad():
        eager.model.eval(), compiled.model.eval()
        got, want = compiled.heads(x), eager.heads(x)
    assert counters["stats"]["unique_graphs"] >= 1
    assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want))
