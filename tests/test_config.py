"""Typed hyperparameters, --set parsing, presets and run ids; the registries."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltbench import resolve, stages
from ltbench.config import TrainHparams, apply_overrides, parse_set_options
from ltbench.errors import UserError
from ltbench.registry import DATASETS, METHODS, Registry
from ltbench.runtime import Runtime


def test_set_values_are_coerced_to_field_types():
    hp = apply_overrides(TrainHparams(), {"epochs": "7", "lr": "0.5", "milestones": "3,5", "eval_ema": "true"}, "hp")
    assert (hp.epochs, hp.lr, hp.milestones, hp.eval_ema) == (7, 0.5, (3, 5), True)


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(UserError) as err:
        apply_overrides(TrainHparams(), {"learning_rate": "1"}, "hyperparameter")
    assert "learning_rate" in str(err.value) and "lr" in str(err.value) and "weight_decay" in str(err.value)


def test_mistyped_value_is_an_error():
    with pytest.raises(UserError, match="not a valid int"):
        apply_overrides(TrainHparams(), {"epochs": "ten"}, "hp")
    with pytest.raises(UserError, match="key=value"):
        parse_set_options(["epochs"])


def test_preset_resolution_order_and_run_id():
    base = resolve.make_config("erm_vit", "synthetic", preset="tiny")
    assert base.hparams["embed_dim"] == 64 and base.hparams["epochs"] == 10
    cfg = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=3, sets=["epochs=4", "data.num_classes=5"])
    assert cfg.hparams["epochs"] == 4 and cfg.data["num_classes"] == 5
    again = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=3,
                                sets=["epochs=4", "data.num_classes=5"])
    assert cfg.run_id == again.run_id and cfg.run_id != base.run_id
    assert resolve.make_config("erm_vit", "synthetic", preset="tiny", seed=1).run_id != base.run_id


def test_paper_preset_matches_deitlt_recipe():
    cfg = resolve.make_config("erm_vit", "cifar10lt", rho=100)
    hp = resolve.hparams_of(cfg)
    assert (hp.img_size, hp.patch_size, hp.embed_dim, hp.depth, hp.num_heads) == (224, 16, 768, 12, 12)
    assert (hp.batch_size, hp.epochs, hp.repeated_aug, hp.warmup_epochs) == (1024, 1200, 3, 5)
    assert hp.effective_lr() == pytest.approx(2.5e-4)  # 5e-4 x 256 / 512, accumulation excluded (deitlt.md §4.1)
    assert (hp.mixup, hp.cutmix, hp.smoothing, hp.re_prob) == (0.8, 1.0, 0.1, 0.25)
    assert hp.auto_augment == "rand-m9-mstd0.5-inc1" and hp.weight_decay == 0.05


def test_bad_rho_and_preset_and_names():
    with pytest.raises(UserError, match="rho must be >= 1"):
        resolve.make_config("erm_vit", "cifar10lt", rho=0.5)
    with pytest.raises(UserError, match="no preset 'huge'"):
        resolve.make_config("erm_vit", "cifar10lt", preset="huge")
    with pytest.raises(UserError, match="Did you mean 'erm_vit'"):
        METHODS.get("erm_vti")
    with pytest.raises(UserError, match="Unknown dataset"):
        DATASETS.get("cifar1000lt")


def test_registry_rejects_two_classes_under_one_name():
    reg: Registry = Registry("thing", "ltbench.test-things")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(ValueError, match="registered twice"):

        @reg.register("a")
        class B:
            pass

    assert reg.get("a") is A and reg.names() == ["a"]


def test_every_plugin_file_is_registered():
    """Nothing in methods/ or datasets/ is silently left out of the entry points. Only ltbench's own modules are
    counted: a user's plugin may live in any module (a top-level one included) and must not break the check."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def built_in(registry, package: str) -> set[str]:
        return {cls.__module__.removeprefix(package) for _, cls in registry if cls.__module__.startswith(package)}

    modules = {p.stem for p in (repo / "methods").glob("*.py") if p.stem != "__init__"}
    assert modules <= built_in(METHODS, "ltbench.methods.") | {"_vit_common"}
    dataset_modules = {p.stem for p in (repo / "datasets").glob("*.py") if p.stem != "__init__"}
    assert dataset_modules <= built_in(DATASETS, "ltbench.datasets.")


def test_runtime_options_never_change_the_run_id(tmp_path):
    from ltbench.records import RunRecord

    def run_id(*sets: str, method: str = "erm_cnn") -> str:
        return resolve.make_config(method, "synthetic", preset="tiny", sets=list(sets)).run_id

    base = run_id()
    assert run_id("workers=3") == run_id("workers=0") == base != run_id("lr=0.5")
    # a student's teacher_overrides are resolved by the same rule
    assert run_id("teacher_overrides=workers=0", method="deitlt") == run_id(method="deitlt")
    # a partial run started with other workers resumes: its config.json still matches the run id
    first = resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=["workers=0"])
    record = RunRecord(tmp_path / first.run_id)
    stages._write_metadata(first, record, Runtime(results=tmp_path, data_root=tmp_path))
    stages._write_metadata(resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=["workers=3"]), record,
                           Runtime(results=tmp_path, data_root=tmp_path))


@pytest.mark.parametrize("key", ["device", "micro_batch", "compile"])
def test_runtime_option_given_with_set_names_its_option(key):
    with pytest.raises(UserError, match=f"runtime option.*--{key.replace('_', '-')}"):
        resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=[f"{key}=1"])


def test_engine_hooks_are_declared_and_recorded_only_when_set():
    from ltbench.config import hparams_dict

    base = resolve.make_config("erm_cnn", "synthetic", preset="tiny")
    assert "nesterov" not in base.hparams and "sampler" not in base.hparams  # ids of schema-1 runs are kept
    nesterov = resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=["nesterov=true"])
    assert nesterov.hparams["nesterov"] is True and nesterov.run_id != base.run_id
    assert resolve.hparams_of(nesterov).nesterov is True
    assert resolve.make_config("crt", "synthetic", preset="tiny").hparams["sampler"] == "class_balanced"
    assert "drop_last" in resolve.make_config("erm_vit", "synthetic", preset="tiny").hparams  # its own field
    assert set(hparams_dict(TrainHparams())) <= {f for f in TrainHparams.__dataclass_fields__}
    with pytest.raises(UserError, match="sampler must be one of"):
        resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=["sampler=oversample"])


def test_nesterov_reaches_the_optimizer(tmp_path):
    from ltbench.stages import build_trainer

    config = resolve.make_config("erm_cnn", "synthetic", preset="tiny", sets=["nesterov=true", "arch=resnet8",
                                                                             "data.n_max=20", "data.n_test=2"])
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", progress=False, echo=lambda *_: None)
    trainer = build_trainer(config, runtime)
    assert all(group["nesterov"] for group in trainer.optimizer.param_groups)


@pytest.mark.parametrize("options", [{"augment_on": "gpu"}, {"compile_mode": "fastest"}, {"log": ("neptune",)},
                                     {"micro_batch": -1}, {"threads": 0}])
def test_impossible_runtime_options_are_refused_when_the_runtime_is_made(tmp_path, options):
    with pytest.raises(UserError):
        Runtime(results=tmp_path, data_root=tmp_path, **options)


def test_runtime_options_have_one_source():
    from ltbench.runtime import RUNTIME_OPTIONS, suite_keys

    assert {"workers", "threads", "device", "compile", "compile_mode", "micro_batch", "augment_on", "log"} <= \
        RUNTIME_OPTIONS
    assert set(suite_keys()) <= RUNTIME_OPTIONS
    runtime = Runtime(results=Path("r"), data_root=Path("d"), compile_mode="reduce-overhead", workers=3)
    again = Runtime.from_portable(runtime.portable())
    assert again.compile and again.workers == 3 and again.compile_mode == "reduce-overhead"
