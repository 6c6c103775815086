"""The one training loop every method runs through.

The engine knows nothing about any loss. Per optimizer step it: prepares each micro-batch once
(without gradients), accumulates gradients over the micro-batches that make up the global batch,
optionally applies SAM's ascent step and second pass on the same prepared batches, steps the
optimizer and schedule, and lets the method update non-gradient state. Per epoch it evaluates
when due, appends a metrics line and writes a full checkpoint atomically, so an interrupted run
resumes by running the same command and loses at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any

import numpy as np
import torch

from ltbench import augment, distributed
from ltbench.augment import group_steps, to_device
from ltbench.config import RunConfig, TrainHparams, eval_interval, update_offsets
from ltbench.data import InMemorySplit, LTData, Split
from ltbench.errors import UserError
from ltbench.evaluate import Evaluator, predict_split
from ltbench.gpu_augment import AugRecipe, DeviceBatches
from ltbench.method import BatchPosition, Method, Upstream, compute_loss
from ltbench.models import count_parameters
from ltbench.progress import RunMonitor
from ltbench.records import EPOCH_NUMBERING, RunRecord, atomic_write_json
from ltbench.runtime import COMPILE_MODES, Runtime
from ltbench.sam import SAM
from ltbench.seeding import seed_everything, seed_hash
from ltbench.selection import pick_oracle, pick_val, selection_fields, summary
from ltbench.weights import read_init


def autocast_dtype(device: torch.device, precision: str = "bf16") -> torch.dtype | None:
    """The autocast dtype of ``precision`` (bf16 | fp16 | fp32) on ``device``; None (fp32) off the GPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------------------------


class Trainer:
    """Trains one method on one dataset into one run folder."""

    def __init__(self, config: RunConfig, hp: TrainHparams, method_cls: type[Method], data: LTData,
                 evaluator: Evaluator, record: RunRecord, runtime: Runtime, upstream: dict[str, Upstream]) -> None:
        self.config, self.hp, self.data, self.evaluator = config, hp, data, evaluator
        self.record, self.runtime = record, runtime
        self.dist = distributed.context()
        self.device = runtime.torch_device()
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.amp = autocast_dtype(self.device, hp.precision)
        # fp16 overflows without loss scaling (DeiT's released recipe: autocast + GradScaler)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        torch.set_num_threads(runtime.cpu_threads())
        seed_everything(seed_hash(config.seed, "init"))
        self.method = method_cls(hp, data.info, self.device, upstream)
        for module in self.method.state_modules().values():
            module.to(self.device)
        if hp.init and not record.checkpoint_path.exists():  # before the optimizer and EMA; a resumed run restores
            self.method.load_init(read_init(hp.init, hp.init_sha256), runtime.echo)
        # CUDA graphs replay only on a GPU; elsewhere the cudagraph modes compile like the others
        self.cuda_graphs = runtime.compile and COMPILE_MODES[runtime.compile_mode] and self.device.type == "cuda"
        self.optimizer = self._build_optimizer()
        if hp.batch_size % self.dist.world:
            raise UserError(f"The global batch {hp.batch_size} does not split evenly over {self.dist.world} "
                            f"processes; choose a batch_size divisible by the number of processes.")
        per_rank = hp.batch_size // self.dist.world
        self.micro = min(runtime.micro_batch or per_rank, per_rank)
        if hp.drop_last and len(data.train) < hp.batch_size:
            raise UserError(f"The training split has {len(data.train)} images, fewer than one batch of "
                            f"{hp.batch_size} with drop_last: lower batch_size with --set batch_size=N.")
        self.steps_per_epoch = self._steps_per_epoch()
        self.update_offsets = update_offsets(hp, self.steps_per_epoch, self.epoch_images)
        self.scheduler = self._build_scheduler()
        self.sam = SAM(self.method.trainable()) if hp.uses_sam else None
        self.ema = self._build_ema()  # before compiling: the EMA copy must not share the compiled forward
        if runtime.compile:
            self.method.compile(**({} if runtime.compile_mode == "default" else {"mode": runtime.compile_mode}))
        self.start_epoch, self.best, self.best_val, self.train_time, self.train_images = 0, None, None, 0.0, 0
        self.device_inputs = self._device_inputs()
        self.eval_every = eval_interval(hp, self.steps_per_epoch * hp.batch_size, len(data.test))

    # --- construction ------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        hp = self.hp
        # timm's "sgd" is Nesterov SGD; the CNN recipes (LDAM-DRW, PaCo, Saddle) use classical momentum
        kwargs: dict[str, Any] = {}
        if hp.optimizer == "sgd":
            kwargs = {"momentum": hp.momentum, "nesterov": hp.nesterov}
        if self.device.type == "cuda" and hp.optimizer == "adamw":
            kwargs["fused"] = True
        # hooks (TrainHparams fields, set by LiVT): AdamW betas (MAE's 0.9 / 0.95) and timm's layer-wise lr decay
        if hp.opt_betas:
            kwargs["betas"] = tuple(hp.opt_betas)
        if hp.layer_decay:
            kwargs["layer_decay"] = hp.layer_decay
        return create_optimizer_v2(self.method.trainable(), opt=hp.optimizer, lr=hp.effective_lr(),
                                   weight_decay=hp.weight_decay, filter_bias_and_bn=self.method.filter_bias_and_bn,
                                   **kwargs)

    def _build_scheduler(self):
        from timm.scheduler import create_scheduler_v2

        hp = self.hp
        # warmup_prefix (PaCo's): the schedule after the warm-up spans the remaining epochs
        prefix = hp.warmup_prefix
        scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=hp.sched, num_epochs=hp.epochs - (hp.warmup_epochs if prefix else 0),
            decay_milestones=list(hp.milestones), decay_rate=hp.decay_rate, min_lr=hp.min_lr,
            warmup_lr=hp.warmup_lr or hp.effective_lr(), warmup_epochs=hp.warmup_epochs, warmup_prefix=prefix,
            step_on_epochs=not hp.sched_per_step, updates_per_epoch=self.steps_per_epoch,
        )
        return scheduler

    def _build_ema(self):
        if self.hp.ema_decay <= 0:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.method.trainable(), decay=self.hp.ema_decay)

    def _device_inputs(self):
        """uint8 train images on the device plus the device recipe, when augmentation can run there."""
        mode = self.runtime.augment_on
        wanted = mode == "device" or (mode == "auto" and self.device.type == "cuda")
        if not wanted or not isinstance(self.data.train, InMemorySplit):
            return None
        recipe = AugRecipe.from_transform(self.method.train_transform())
        if recipe is None:
            if mode == "device":
                raise UserError(f"{self.config.method}'s training transform has no device equivalent; "
                                f"use --augment-on cpu.")
            return None
        images = torch.from_numpy(self.data.train.images).to(self.device)
        labels = torch.from_numpy(self.data.train.labels).to(self.device)
        return images, labels, recipe

    def _train_batches(self, epoch: int):
        """This epoch's micro-batches: augmented on the device for in-memory data, else by loader workers."""
        seed = seed_hash(self.config.seed, "data", epoch)
        drop_last = self.hp.drop_last
        if self.device_inputs is not None:
            images, labels, recipe = self.device_inputs
            return DeviceBatches(images, labels, recipe, self.hp.batch_size, seed=seed, drop_last=drop_last,
                                 repeated_aug=self.hp.repeated_aug, micro_batch=self.micro, rank=self.dist.rank,
                                 world=self.dist.world, sampler=self._sampler())
        return augment.train_loader(
            self.data.train, self.method.train_transform(), self.hp.batch_size, self.micro, seed=seed,
            workers=self._workers(), drop_last=drop_last, repeated_aug=self.hp.repeated_aug,
            pin_memory=self.device.type == "cuda", rank=self.dist.rank, world=self.dist.world,
            sampler=self._sampler(),
        )

    def _sampler(self) -> str:
        """The ``sampler`` hook (``config.SAMPLERS``: instance | class_balanced): how the training epochs draw,
        on the CPU loader and on the device alike."""
        return self.hp.sampler

    def _steps_per_epoch(self) -> int:
        # the loaders' own rules (the epoch's length per sampler, then incomplete batches and a last one smaller than
        # the world), so that the schedule has exactly the updates an epoch makes
        order = augment.epoch_order(len(self.data.train), self.data.train.labels, torch.Generator(), self._sampler(),
                                    self.hp.repeated_aug)
        self.epoch_images = len(order)
        batches = augment.MicroBatchSampler(order, self.hp.batch_size, self.hp.batch_size,
                                            self.hp.drop_last, world=self.dist.world)
        return max(1, len(batches.steps))

    # --- checkpoint ----------------------------------------------------------------------------
    def state(self, next_epoch: int) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "epoch": next_epoch,
            "modules": {k: m.state_dict() for k, m in self.method.state_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                              *np_state[2:]], "python": list(random.getstate()[1])},
            "best": self.best,
            "best_val": self.best_val,
            "train_time": self.train_time,
            "train_images": self.train_images,
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        try:
            for name, module in self.method.state_modules().items():
                module.load_state_dict(ckpt["modules"][name])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.ema and ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            if self.scaler and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.start_epoch, self.best = ckpt["epoch"], ckpt["best"]
            self.best_val = ckpt.get("best_val")  # checkpoints made before val splits have none
            self.train_time, self.train_images = ckpt["train_time"], ckpt["train_images"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # missing entries, tensor shape mismatch
            reason = " ".join(str(exc).split())[:400] or type(exc).__name__  # torch's first line names no tensor
            raise self.record.checkpoint_error(f"it does not match this run's configuration: {reason}") from exc

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        ckpt = self.record.load_checkpoint(self.device)
        if ckpt is not None:
            self.restore(ckpt)
            self.runtime.echo(f"Resuming {self.record.run_id} after epoch {self.start_epoch}/{self.hp.epochs}.")
        rows = [r for r in self.record.metrics(note=self.runtime.echo) if r["epoch"] <= self.start_epoch]
        if self.dist.is_main:
            self.record.write_metrics(rows)
            self.record.sync_selected(ckpt, self.config)  # the selected weights a crash left out of step
        eval_loader, final = self._eval_loader(), None
        monitor = RunMonitor(rows, epochs=self.hp.epochs, steps_per_epoch=self.steps_per_epoch,
                             lr=lambda: self.optimizer.param_groups[0]["lr"], record=self.record, config=self.config,
                             main=self.dist.is_main, progress=self.runtime.progress, echo=self.runtime.echo,
                             log=self.runtime.log)
        with monitor as self.monitor:
            for epochs_this_call, epoch in enumerate(range(self.start_epoch, self.hp.epochs)):
                if self.runtime.stop_after_epochs is not None and epochs_this_call >= self.runtime.stop_after_epochs:
                    return {}
                row = self.train_epoch(epoch)
                self._refuse_divergence(row)
                last = epoch + 1 == self.hp.epochs
                if self.evaluates_after(epoch):
                    metrics, val = self.evaluate(eval_loader, epoch, keep_logits=last and self.runtime.save_logits)
                    row["eval"] = summary(metrics)
                    row.update({"val": summary(val)} if val is not None else {})
                    final = (metrics, val) if last else None  # the last epoch's evaluation is the final one: once
                rows.append(row)
                if self.dist.is_main:
                    self.record.write_metrics(rows)
                    self.record.write_checkpoint(self.state(epoch + 1), self.config)
                self.monitor.epoch_done(row)
        if self.hp.epochs == 0 and self.dist.is_main:  # a method that trains nothing: its checkpoint is the model built
            self.record.write_checkpoint(self.state(0), self.config)
        return self.finish(eval_loader, rows, final)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        seed_everything(seed_hash(self.config.seed, "epoch", epoch))
        self.method.on_epoch_start(epoch)
        if not self.hp.sched_per_step:
            self.scheduler.step(epoch)
        loader = self._train_batches(epoch)
        self.method.trainable().train()
        sums: dict[str, torch.Tensor] = {}
        images, start = 0, time.perf_counter()
        with self._progress(epoch) as progress:
            steps = loader.batch_sampler.steps
            for step, micro_batches in enumerate(group_steps(loader, loader.batch_sampler.group_sizes)):
                if self.hp.sched_per_step:
                    self.scheduler.step_update(epoch * self.steps_per_epoch + self.update_offsets[step])
                logs = self.step(micro_batches, epoch, global_size=steps[step][1], index=step)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0) + v
                images += sum(len(y) for _, y in micro_batches)
                progress(step, sums, images, time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        self.train_images += images
        n_steps = max(1, step + 1)
        return {
            "epoch": epoch + 1,  # 1-based in every file (records.EPOCH_NUMBERING)
            "lr": self.optimizer.param_groups[0]["lr"],
            "train": {k: float(v) / n_steps for k, v in sums.items()},  # one host sync per epoch
            "epoch_time_s": elapsed,
            "images_per_s": images / max(elapsed, 1e-9),
        }

    def _refuse_divergence(self, row: dict[str, Any]) -> None:
        """Stop, before this epoch's checkpoint, when its mean training loss is not finite (as the released DeiT
        code stops at the first non-finite loss): the weights are then nan or inf, and a run evaluated and marked
        finished with them would be a silently wrong result under the run id of a healthy one."""
        loss = row["train"].get("loss", math.nan)
        diverged = not math.isfinite(loss)
        if self.dist.enabled:  # every process stops, or none does
            diverged = any(distributed.gather(diverged))
        if diverged:
            raise UserError(
                f"Training diverged: the mean training loss of epoch {row['epoch']} is {loss} (lr "
                f"{row['lr']:.3g}). The run {self.record.run_id} is not finished and keeps the checkpoint of the "
                f"epoch before; the same settings would diverge again, so change them (e.g. a lower lr, "
                f"precision=fp32) rather than resume.")

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], epoch: int,
             global_size: int | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """One optimizer step (the ``index``-th of the epoch) over this process's micro-batches of one global batch."""
        if self.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        prepared = []
        # No hashing here: a method that keys randomness by the position (ViT Mixup) derives its seed when it mixes.
        distributed_step = global_size and self.dist.enabled
        offset = distributed.shard(global_size, self.dist.rank, self.dist.world).start if distributed_step else 0
        with torch.no_grad(), self._autocast():
            for x, y in micro_batches:
                self.method.batch_position = BatchPosition(self.config.seed, epoch, index, offset)
                prepared.append((self.method.prepare(to_device(x, self.device), to_device(y, self.device)), len(y)))
                offset += len(y)
        # Each micro-batch loss is weighted by its share of the global batch; ranks' gradients are averaged.
        scale = self.dist.world / (global_size or self.dist.world * sum(n for _, n in prepared))
        logs = self._accumulate(prepared, scale)
        if self.sam is not None:
            self.sam.ascend(self._sam_rho(epoch))
            self._accumulate(prepared, scale)
            self.sam.descend()
        if self.scaler is not None:  # unscales, skips the step on inf/nan gradients, adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.method.after_step()
        if self.ema is not None:
            self.ema.update(self.method.trainable())
        return logs

    def _accumulate(self, prepared: list[tuple[Any, int]], scale: float) -> dict[str, torch.Tensor]:
        """Gradients of the size-weighted mean of the micro-batch losses (= the loss of one big batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        local = sum(n for _, n in prepared)
        logs: dict[str, torch.Tensor] = {}
        for batch, n in prepared:
            with self._autocast():
                loss, parts = compute_loss(self.method, batch)
            weighted = loss * (n * scale)
            (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            for k, v in {"loss": loss, **parts}.items():
                logs[k] = logs.get(k, 0) + v.detach().float() * (n / local)
        if self.dist.enabled:
            distributed.average_gradients(list(self.method.trainable().parameters()), self.dist.world)
        return logs

    def _sam_rho(self, epoch: int) -> float:
        hp = self.hp
        if not hp.sam_rho_steps:
            return hp.sam_rho
        index = sum(1 for start in hp.sam_rho_epochs if epoch >= start)
        return hp.sam_rho_steps[index]

    # --- evaluation and results ----------------------------------------------------------------
    def evaluates_after(self, epoch: int) -> bool:
        """Whether test and val are evaluated after this 0-based epoch: every ``eval_every`` and the last."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.hp.epochs

    def evaluate(self, loader, epoch: int, keep_logits: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Full metrics of the current weights on test and on val (None without a val split); the oracle and val
        selections so far are updated (ltbench.selection)."""
        metrics, val = self._evaluate_full(loader, keep_logits=keep_logits), self.evaluate_val()
        self.best = pick_oracle(self.best, epoch + 1, metrics)
        self.best_val = pick_val(self.best_val, epoch + 1, metrics, val)
        return metrics, val

    def evaluate_val(self) -> dict[str, Any] | None:
        """Full metrics of the current weights on the val split, or None when the dataset has none."""
        if self.data.val is None or not len(self.data.val):
            return None
        return self._evaluate_full(self._eval_loader(self.data.val))

    def predict(self, loader, predict_fn=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits of every head (of ``predict_fn``, default the method's) over a loader, in evaluation precision."""
        # Eagerly under CUDA-graph modes: evaluation is rare (eval_interval), and graph outputs are overwritten
        # by the next replay while predict_split still holds them.
        eager = torch.compiler.set_stance("force_eager") if self.cuda_graphs else contextlib.nullcontext()
        with eager:
            return predict_split(predict_fn or self.method.predict, loader, self.device, self.amp)

    def _evaluate_full(self, loader, keep_logits: bool = False) -> dict[str, Any]:
        for module in self.method.state_modules().values():
            module.eval()
        logits, labels = self.predict(loader)
        if self.ema is not None and self.hp.eval_ema:
            ema_logits, _ = self.predict(loader, lambda x: {"main": self.ema.module(x)})
            logits["ema"] = ema_logits["main"]
        if self.dist.enabled:  # every prediction of every rank, in test-set order, before any metric
            parts = distributed.gather((logits, labels))
            logits = {k: torch.cat([p[0][k] for p in parts]) for k in logits}
            labels = torch.cat([p[1] for p in parts])
        metrics = self.evaluator.evaluate(logits, labels, self.data.info)
        if keep_logits:
            metrics["_logits"], metrics["_labels"] = logits, labels
        return metrics

    def finish(self, eval_loader, rows: list[dict[str, Any]],
               evaluated: tuple[dict[str, Any], dict[str, Any] | None] | None = None) -> dict[str, Any]:
        if evaluated is None:  # resumed after the last epoch's checkpoint: evaluate the saved final weights
            evaluated = self._evaluate_full(eval_loader, keep_logits=self.runtime.save_logits), self.evaluate_val()
        final, final_val = evaluated
        if not self.dist.is_main:
            return {"rank": self.dist.rank}
        if self.runtime.save_logits:
            self.record.write_logits({k: v.numpy() for k, v in final.pop("_logits").items()},
                                     final.pop("_labels").numpy(), self.config)
        model = self.method.trainable()
        result = {
            "run_id": self.record.run_id,
            "config": self.config.to_dict(),
            "method": self.config.method,
            "dataset": self.config.dataset,
            "class_counts": list(self.data.info.train_counts),
            "class_names": list(self.data.info.class_names),  # figures label classes with them where they fit
            "dataset_info": self.data.info.portable(),  # so that `ltbench export` needs no dataset
            **selection_fields(self.hp.epochs, final, final_val, self.best, self.best_val, self.data),
            "epoch_numbering": EPOCH_NUMBERING,
            "eval_every": self.eval_every,
            "wall_time_s": self.train_time,
            "device_hours": self.train_time * self.dist.world / 3600,
            "processes": self.dist.world,
            "images_per_s": self.train_images / max(self.train_time, 1e-9),
            "parameters": count_parameters(model),
            "device": str(self.device),
            "input_pipeline": "device" if self.device_inputs is not None else "cpu-workers",
            "upstream": {role: {"run_id": up.record.run_id, "method": up.config.method,
                                "top1": up.record.result()["final"]["heads"]["main"]["top1"]}
                         for role, up in self.method.upstream.items()},
            **self.method.describe(),
        }
        diagnostics = self._diagnostics()
        if diagnostics:
            atomic_write_json(self.record.path / "diagnostics.json", diagnostics)
        atomic_write_json(self.record.path / "result.json", result)
        return result

    def _diagnostics(self) -> dict[str, Any]:
        n = min(256, len(self.data.test))
        indices = np.random.RandomState(0).choice(len(self.data.test), size=n, replace=False)
        loader = augment.eval_loader(self.data.test, self.method.eval_transform(), n, 0, indices=sorted(indices))
        x, _ = next(iter(loader))
        with torch.no_grad():
            return self.method.diagnostics(x.to(self.device))

    # --- small helpers -------------------------------------------------------------------------
    def _eval_loader(self, split: Split | None = None):
        """A loader over ``split`` (default: test), sharded over the processes of a distributed run."""
        split = self.data.test if split is None else split
        indices = distributed.shard(len(split), self.dist.rank, self.dist.world) if self.dist.enabled else None
        return augment.eval_loader(split, self.method.eval_transform(), self._eval_batch(), self._workers(),
                                   indices=indices, pin_memory=self.device.type == "cuda")

    def _workers(self) -> int:
        return self.runtime.workers if self.runtime.workers is not None else self.hp.workers

    def _eval_batch(self) -> int:
        return max(self.micro, 256)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _progress(self, epoch: int):
        return self.monitor.epoch_bar(epoch)
