"""Probe training: reproducible, resumable mid-way, and loud when it diverges."""

import math

import pytest
import torch

from probing.heads import create_head
from probing.losses import create_loss
from probing.train import DivergedError, ProbeTrainer, TrainConfig, correct_predictions


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
        TrainConfig(epochs=epochs, batch_size=16, lr=lr, warmup_epochs=1),
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


def _lr_per_epoch(trainer) -> list[float]:
    rates = []
    for _ in range(trainer.config.epochs):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.run_epoch()
    return rates


def test_sgd_steps_down_tenfold_at_60_and_80_percent():
    torch.manual_seed(0)
    f_train, y_train, f_val, y_val = _data()
    trainer = ProbeTrainer(
        create_head("linear", 8, 4), create_loss("ce"), (f_train, y_train), (f_val, y_val),
        TrainConfig(epochs=10, batch_size=16, lr=0.5, optimizer="sgd"),
    )  # fmt: skip
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.param_groups[0]["momentum"] == 0.9
    assert _lr_per_epoch(trainer) == pytest.approx([0.5] * 6 + [0.05] * 2 + [0.005] * 2)


def test_sgd_with_milestones_and_with_a_step_every_n_epochs_after_a_warm_up_from_1e_7():
    torch.manual_seed(0)
    f_train, y_train, f_val, y_val = _data()

    def rates(**options):
        trainer = ProbeTrainer(
            create_head("linear", 8, 4), create_loss("ce"), (f_train, y_train), (f_val, y_val),
            TrainConfig(batch_size=16, optimizer="sgd", **options),
        )  # fmt: skip
        return _lr_per_epoch(trainer)

    assert rates(epochs=10, lr=3.0, milestones=[3, 7], momentum=0.5) == pytest.approx([3.0] * 3 + [0.3] * 4 + [0.03] * 3)
    # VOC/COCO: one warm-up epoch from 1e-7 (a factor of lr), then x0.1 every 2 epochs
    voc = rates(epochs=6, lr=30.0, warmup_epochs=1, warmup_start=1e-7 / 30, step_every=2)
    assert voc == pytest.approx([1e-7, 30.0, 30.0, 3.0, 3.0, 0.3])


def test_adam_warms_up_linearly_then_decays_by_cosine():
    trainer = _trainer(lr=1.0, epochs=5)  # 4 steps per epoch, 1 warm-up epoch
    rates = _lr_per_epoch(trainer)
    assert rates[0] == pytest.approx(0.01) and rates[1] == pytest.approx(1.0)
    assert rates[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 16)))


def test_multilabel_training_counts_a_hit_when_the_top_class_is_a_positive():
    torch.manual_seed(0)
    features = torch.randn(32, 8, 2, 2)
    labels = torch.zeros(32, 4)
    labels[:, 0] = 1.0
    labels[::2, 3] = 1.0
    trainer = ProbeTrainer(
        create_head("linear", 8, 4), create_loss("bce_multilabel"), (features, labels), (features, labels),
        TrainConfig(epochs=20, batch_size=8, lr=5e-2),
    )  # fmt: skip
    for _ in range(20):
        metrics = trainer.run_epoch()
    assert metrics["val/accuracy"] == 1.0  # class 0 is in every image
    wrong = torch.zeros_like(labels)
    wrong[:, 1] = 1.0
    assert correct_predictions(trainer.head(features), wrong).sum() == 0


def test_augment_path_embeds_every_batch_through_the_given_function():
    f_train, y_train, f_val, y_val = _data()
    calls = []

    def embed(batch):
        calls.append(len(batch))
        return batch * 1.0

    torch.manual_seed(0)
    trainer = ProbeTrainer(
        create_head("linear", 8, 4), create_loss("ce"), (f_train, y_train), (f_val, y_val),
        TrainConfig(epochs=2, batch_size=16), embed=embed,
    )  # fmt: skip
    trainer.run_epoch()
    assert calls == [16, 16, 16, 16]


class Augmented:
    """Train inputs that say who read them: (index, process id, a random draw) per row, as (3, 1, 1)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        import os

        return torch.tensor([float(index), float(os.getpid()), torch.rand(()).item()]).view(3, 1, 1)


def test_augment_path_reads_its_batches_in_worker_processes_reproducibly():
    """``loader_workers``: the batches (in the epoch's order) come from worker processes; the
    workers' random draws are seeded by the trainer's seed and the epoch, so a rerun draws the same."""
    import os

    labels = torch.arange(40) % 4
    runs = []
    for _ in range(2):
        seen = []

        def embed(batch):
            seen.append(batch.clone())
            return batch

        torch.manual_seed(0)
        trainer = ProbeTrainer(
            create_head("linear", 3, 4), create_loss("ce"), (Augmented(40), labels), (torch.rand(8, 3, 1, 1), labels[:8]),
            TrainConfig(epochs=2, batch_size=16, loader_workers=2), embed=embed, seed=5,
        )  # fmt: skip
        order = torch.randperm(40, generator=torch.Generator().manual_seed(5))
        trainer.run_epoch()
        rows = torch.cat(seen).flatten(1)
        assert torch.equal(rows[:, 0].long(), order)  # every row once, in the epoch's order
        assert os.getpid() not in rows[:, 1].long().tolist() and len(set(rows[:, 1].tolist())) == 2  # read by 2 workers
        runs.append(rows[:, 2])
    assert torch.equal(runs[0], runs[1]) and len(set(runs[0].tolist())) > 30  # seeded, and not one draw repeated


def test_a_trial_with_augment_trains_through_the_backbone_on_augmented_images():
    """``train.augment: true``: the trial's trainer embeds augmented train images every batch
    (no train feature cache) and still learns; validation uses the cached val features."""
    from sweeps.spec import parse_spec
    from sweeps.trial import trial_inputs

    spec = parse_spec({"name": "aug", "backbones": "tiny_resnet_sup", "train": {"epochs": 2, "lr": 0.05, "augment": True}})
    (trial,) = spec.trials()
    backbone, val, loss, trainer = trial_inputs(trial)
    assert trainer.embed is not None and trainer.train_features is not None
    first = trainer.train_features[0:4]
    assert first.shape == (4, 3, 32, 32) and not torch.equal(first, trainer.train_features[0:4])  # random shifts
    metrics = [trainer.run_epoch() for _ in range(2)]
    assert metrics[-1]["val/accuracy"] > 0.5


@pytest.mark.parametrize("head_name", ["mlp", "bcos"])
def test_a_last_batch_of_one_sample_is_folded_into_the_one_before(head_name):
    from probing.heads import create_head
    from probing.train import batch_bounds

    assert batch_bounds(9, 4) == [(0, 4), (4, 9)] and batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(1, 4) == [(0, 1)] and batch_bounds(8, 4) == [(0, 4), (4, 8)]
    torch.manual_seed(0)
    features, labels = torch.randn(9, 8, 1, 1), torch.arange(9) % 3
    head = create_head(head_name, 8, 3, width=6, input="pooled")
    trainer = ProbeTrainer(head, create_loss("ce"), (features, labels), (features, labels), TrainConfig(epochs=2, batch_size=4))
    for _ in range(2):
        metrics = trainer.run_epoch()  # a batch of one would fail (mlp) or divide by sqrt(eps) (bcos)
    assert all(math.isfinite(v) for v in metrics.values()) and trainer.steps_per_epoch == 2


def test_training_from_the_memory_mapped_shards_equals_training_from_the_tensor():
    """Shuffled batches gathered across shards give the probe what the in-memory tensor gives."""
    from probing.backbones import create_backbone
    from probing.datasets import create_dataset
    from probing.features import cached_features

    backbone = create_backbone("tiny_resnet_sup", log=lambda m: None)
    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    sharded = {s: cached_features(backbone, d, "digits", s, log=lambda m: None, shard_rows=100) for s, d in (("train", train), ("val", val))}
    results = []
    for source in ("shards", "tensor"):
        features = sharded if source == "shards" else {s: f[:] for s, f in sharded.items()}
        torch.manual_seed(0)
        head = create_head("mlp", backbone.out_channels, 10, depth=2, width=32)
        trainer = ProbeTrainer(head, create_loss("ce"), (features["train"], train.labels), (features["val"], val.labels),
                               TrainConfig(epochs=3, lr=1e-2, batch_size=64), seed=3)  # fmt: skip
        results.append([trainer.run_epoch() for _ in range(3)])
    for from_shards, from_tensor in zip(*results):
        assert from_shards == pytest.approx(from_tensor, rel=1e-6, abs=1e-6)
