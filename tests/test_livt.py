"""LiVT: the MAE stage (hidden patches only, MAE's patch layout) runs once and is reused by every fine-tuning run
with the same settings; fine-tuning starts from its encoder and trains with Balanced BCE."""

from __future__ import annotations

import pytest
import torch
from ltbench.methods.livt import MaskedAutoencoder, reconstruction_loss

from ltbench import resolve, stages
from ltbench.engine import Trainer
from ltbench.errors import UserError
from ltbench.losses import balanced_bce_loss, prior_log_odds
from ltbench.records import run_record
from ltbench.registry import METHODS
from ltbench.runtime import Runtime
from ltbench.stages import build_trainer
from tests.conftest import FAST_VIT

DATA = ["data.n_max=32", "data.n_test=2", "data.num_classes=4", "data.rho=4"]
PRETRAIN = "pretrain_overrides=epochs=1,batch_size=32,decoder_dim=32,decoder_depth=1,decoder_heads=2"


def _runtime(results) -> Runtime:
    return Runtime(results=results, data_root=results, device="cpu", progress=False, echo=lambda *_: None)


def _trainer(results, *extra: str) -> Trainer:
    config = resolve.make_config("livt", "synthetic", preset="tiny", epochs=1,
                                sets=[*FAST_VIT, *DATA, PRETRAIN, "batch_size=16", *extra])
    runtime = _runtime(results)
    upstream = stages.resolve_upstream(config, runtime, train=True)
    return build_trainer(config, runtime, upstream, record=run_record(results, config))


def test_pretraining_runs_once_and_fine_tuning_starts_from_its_encoder(tmp_path):
    first = _trainer(tmp_path)
    second = _trainer(tmp_path, "bal_tau=0.5")  # another fine-tuning recipe, the same pretraining
    assert first.config.run_id != second.config.run_id
    pretrain = first.method.upstream["pretrain"]
    assert pretrain.record.done and second.method.upstream["pretrain"].record.run_id == pretrain.record.run_id
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [pretrain.record.run_id]  # trained once
    encoder = pretrain.record.load_checkpoint()["modules"]["model"]
    for name, value in first.method.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, encoder[f"encoder.{name}"]), name
    assert pretrain.record.result()["final"]["heads"]["main"]["top1"] >= 0  # the probe gives the MGP run a number
    batch = first.method.prepare(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss, _ = first.method.loss(batch)
    offset = prior_log_odds(first.method.info.train_counts)  # LiVT's released Bal-BCE offset, the default
    expected = balanced_bce_loss(first.method.model(batch[0]), batch[1], offset, 1.0)
    assert torch.allclose(loss, expected)
    with pytest.raises(UserError, match="another encoder"):
        _trainer(tmp_path, f"pretrain_run={pretrain.record.run_id}", "embed_dim=32")


def _autoencoder() -> MaskedAutoencoder:
    hp = resolve.resolve_hparams(METHODS.get("livt_mgp"), "tiny", "synthetic", None,
                                {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2})
    return MaskedAutoencoder(hp, num_classes=4)


def test_masking_hides_three_quarters_and_the_decoder_restores_patch_order():
    model = _autoencoder()
    x = torch.randn(2, 3, 32, 32)
    encoded, mask, restore = model.encode_visible(x, 0.75)
    assert encoded.shape == (2, 1 + 16, 64) and mask.shape == (2, 64) and mask.sum(1).tolist() == [48.0, 48.0]
    assert model.decode(encoded, restore).shape == (2, 64, 4 * 4 * 3)
    # MAE's layout: patch (row 0, col 1) holds pixels [0:4, 4:8], pixel-major then channel
    patches = model.patchify(x)
    assert torch.equal(patches[0, 1].reshape(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))


def test_reconstruction_loss_counts_hidden_patches_only():
    target = torch.zeros(1, 4, 3)
    pred = torch.tensor([[[1.0] * 3, [2.0] * 3, [0.0] * 3, [0.0] * 3]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # patch 0 is visible: its error of 1 does not count
    assert reconstruction_loss(pred, target, mask, norm_pix=False).item() == pytest.approx((4.0 + 0.0) / 2)
