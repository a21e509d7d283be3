"""Probe training: reproducible, resumable mid-way, and loud when it diverges."""

import pytest
import torch

from probing.heads import create_head
from probing.losses import create_loss
from probing.train import DivergedError, ProbeTrainer, TrainConfig


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (96,), generator=generator)
    features = torch.randn(96, 8, 2, 2, generator=generator) + labels.view(-1, 1, 1, 1).float()
    return features[:64], labels[:64], features[64:], labels[64:]


def _trainer(loss="bce", lr=1e-2, epochs=4, head="mlp"):
    torch.manual_seed(0)
    options = {"depth": 2, "width": 16} if head == "mlp" else {}
    f_train, y_train, f_val, y_val = _data()
    return ProbeTrainer(
        create_head(head, 8, 4, **options),
        create_loss(loss),
        (f_train, y_train),
        (f_val, y_val),
        TrainConfig(epochs=epochs, batch_size=16, lr=lr, warmup_epochs=1, seed=0),
    )


def test_same_seed_same_metrics():
    a, b = _trainer(), _trainer()
    assert [a.run_epoch() for _ in range(3)] == [b.run_epoch() for _ in range(3)]


def test_training_learns():
    trainer = _trainer(loss="ce", head="linear", lr=5e-2, epochs=10)
    first = trainer.run_epoch()
    for _ in range(9):
        last = trainer.run_epoch()
    assert last["train/loss"] < first["train/loss"] and last["val/accuracy"] > 0.5


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    straight = _trainer()
    expected = [straight.run_epoch() for _ in range(4)]

    first = _trainer()
    first.run_epoch(), first.run_epoch()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = _trainer()  # a fresh process would rebuild the trainer from the config
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.epoch == 2
    assert [resumed.run_epoch(), resumed.run_epoch()] == expected[2:]


def test_nan_loss_raises_diverged():
    trainer = _trainer(loss="ce", head="linear")
    trainer.train_features = trainer.train_features.clone()
    trainer.train_features[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergedError, match="diverged: ce loss is nan in epoch 1"):
        trainer.run_epoch()
