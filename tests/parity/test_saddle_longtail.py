"""Parity with val-iisc/Saddle-LongTail (LDAM-DRW+SAM, the flat teachers): the two-pass SAM step with BatchNorm, the
SAM radius of every epoch (CIFAR, ImageNet-LT, iNat) and the ImageNet-LT / iNat lr schedules, each with the
flags of the released ``run.sh``.

Released code used: ``sam.SAM`` and ``cifar_train_sam.train`` (the training loop: two forward/backward passes
per batch, both in train mode), ``adjust_rho`` of ``cifar_train_sam`` / ``imnet_train_sam`` / ``inat_train_sam``,
their argument parsers fed the ``run.sh`` lines, and the scheduler branch of ``imnet_train_sam.main_worker``.
Patched in memory: wandb, sklearn and scipy are stubbed when absent (logging, a confusion matrix and the
unused 'linear' radius schedule only); ``.cuda()``
is the identity (``cuda_as_cpu``).
"""

from __future__ import annotations

import copy
import io
import shlex
from types import SimpleNamespace

import pytest
import torch

from tests.parity import _ltbench_side as lt
from tests.parity._refcode import import_released, max_abs, record, released_block, repo, stub

REPO = repo("Saddle-LongTail")
STUBS = {"wandb": stub("wandb", log=lambda *a, **k: None, init=lambda *a, **k: None),
         "sklearn": stub("sklearn"), "sklearn.metrics": stub("sklearn.metrics", confusion_matrix=None),
         "sklearn.utils": stub("sklearn.utils"),
         "sklearn.utils.multiclass": stub("sklearn.utils.multiclass", unique_labels=None),
         "scipy": stub("scipy"), "scipy.interpolate": stub("scipy.interpolate", interp1d=None)}


def _script(name: str):
    return import_released(REPO, name, stubs=STUBS)


def _run_sh_args(script: str, must_contain: str, parser) -> object:
    """Their parser fed the run.sh line of ``script`` that contains ``must_contain``."""
    for line in (REPO / "run.sh").read_text().splitlines():
        words = shlex.split(line)
        if len(words) > 1 and words[0] == "python" and words[1] == script and must_contain in line:
            return parser.parse_args(words[2:])
    raise AssertionError(f"run.sh has no `python {script}` line with {must_contain!r}")


def test_sam_two_pass_step_with_batchnorm(tmp_path, cuda_as_cpu):
    """Two SAM steps of ltbench's engine (``Trainer.step`` with ``ltbench.sam.SAM``, LDAM loss with DRW weights)
    vs the released ``train()`` loop with its ``SAM(SGD)`` and ``LDAMLoss``, from the same weights and batches, on
    a ResNet-8 (BatchNorm everywhere). Compared: every parameter and BatchNorm buffer afterwards."""
    train_sam = _script("cifar_train_sam")
    sam_mod = import_released(REPO, "sam")
    losses = import_released(REPO, "losses")
    trainer = lt.trainer("ldam_drw", "synthetic", tmp_path, preset="tiny_sam", sets=("arch=resnet8",))
    method, hp = trainer.method, trainer.hp
    epoch = hp.drw_epoch  # DRW on: both passes see margins and class weights
    method.on_epoch_start(epoch)
    model = method.trainable().train()
    theirs_model = copy.deepcopy(model)
    counts = list(trainer.data.info.train_counts)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, len(counts), (16,), generator=gen))
               for _ in range(2)]

    lr = trainer.optimizer.param_groups[0]["lr"]
    for x, y in batches:
        trainer.step([(x, y)], epoch=epoch)

    optimizer = sam_mod.SAM(theirs_model.parameters(), torch.optim.SGD, rho=lt.sam_rho(hp, epoch), lr=lr,
                            momentum=hp.momentum, weight_decay=hp.weight_decay)
    criterion = losses.LDAMLoss(cls_num_list=counts, max_m=hp.max_m, s=hp.scale, weight=method.class_weights)
    args = SimpleNamespace(gpu=None, log_results=False, print_freq=10**9)
    writer = SimpleNamespace(add_scalar=lambda *a, **k: None)
    train_sam.train(batches, theirs_model, criterion, optimizer, epoch, args, io.StringIO(), writer)

    params = max_abs([p for p in model.parameters()], [p for p in theirs_model.parameters()])
    buffers = max_abs([b.double() for b in model.buffers()], [b.double() for b in theirs_model.buffers()])
    assert record("SAM step x2 (rho 0.8, LDAM+DRW, ResNet-8): parameters (float32)", params) <= 1e-5
    assert record("SAM step x2: BatchNorm running stats, both passes (float32)", buffers) <= 1e-5


@pytest.mark.parametrize("dataset,dataset_flag", [("cifar10lt", "cifar10"), ("cifar100lt", "cifar100")])
def test_cifar_radius_every_epoch(dataset, dataset_flag):
    train_sam = _script("cifar_train_sam")
    args = _run_sh_args("cifar_train_sam.py", f"--loss_type LDAM --train_rule DRW --rho 0.8 --rho_schedule none "
                                              f"--log_results --dataset {dataset_flag}", train_sam.parser)
    hp = lt.preset_hparams("ldam_drw", dataset, "sam")
    worst = 0.0
    for epoch in range(args.epochs):
        optimizer = SimpleNamespace(param_groups=[{}])
        train_sam.adjust_rho(optimizer, epoch, args)
        worst = max(worst, abs(lt.sam_rho(hp, epoch) - optimizer.param_groups[0]["rho"]))
    assert record(f"SAM radius, LDAM-DRW+SAM {dataset}, 200 epochs", worst) == 0


@pytest.mark.parametrize("dataset,script", [("imagenetlt", "imnet_train_sam"), ("inat2018", "inat_train_sam")])
def test_large_dataset_radius_and_lr_every_epoch(dataset, script):
    module = _script(script)
    args = _run_sh_args(f"{script}.py", "--loss_type LDAM", module.parser)
    hp = lt.preset_hparams("ldam_drw", dataset, "sam")
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay, args.margin) == (
        hp.epochs, hp.batch_size, hp.lr, hp.weight_decay, hp.max_m)
    rho_worst = 0.0
    for epoch in range(args.epochs):
        optimizer = SimpleNamespace(param_groups=[{}])
        module.adjust_rho(optimizer, epoch, args)
        rho_worst = max(rho_worst, abs(lt.sam_rho(hp, epoch) - optimizer.param_groups[0]["rho"]))
    assert record(f"SAM radius step schedule, LDAM-DRW+SAM {dataset}, 90 epochs", rho_worst) == 0

    # the lr: their SAM(SGD) optimizer and the CosineAnnealingLR of main_worker's `if args.cos_lr == True:` branch,
    # stepped once per epoch after training, as their loop does
    param = torch.nn.Parameter(torch.zeros(1))
    sam_mod = import_released(REPO, "sam")
    optimizer = sam_mod.SAM(base_optimizer=torch.optim.SGD, rho=args.rho, params=[param], lr=args.lr,
                            momentum=args.momentum, weight_decay=args.weight_decay)
    space = released_block(REPO / f"{script}.py", "main_worker", "args.cos_lr == True",
                           {"torch": torch, "args": args, "optimizer": optimizer, "print": lambda *a: None})
    theirs = []
    for _ in range(args.epochs):
        theirs.append(optimizer.param_groups[0]["lr"])
        space["scheduler"].step()
    ours = lt.lr_per_step(hp, torch.optim.SGD([param], lr=hp.effective_lr()), steps=1, epochs=range(hp.epochs))
    assert record(f"lr (cosine), LDAM-DRW {dataset}, 90 epochs", max_abs(ours, theirs)) <= 1e-12
