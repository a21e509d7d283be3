"""Probe training on cached features: Adam with linear warm-up and cosine decay (How to Probe), or
SGD with momentum and step decay (x0.1 at milestone epochs, 60% and 80% of the epochs by default, or
every ``step_every`` epochs as a StepLR; the reference's MLP and B-cos probes and its VOC/COCO probes).

:class:`ProbeTrainer` runs one epoch at a time and its whole state (head, optimiser, schedule,
epoch, shuffling RNG) round-trips through ``state_dict``, so a trial can checkpoint after any
epoch and resume with the same result as an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Annotated, Callable, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from probing.losses import Loss
from probing.settings import Strict, at_most

__all__ = ["Schedule", "TrainConfig", "ProbeTrainer", "DivergedError", "batch_bounds", "correct_predictions"]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class Schedule(Strict):
    """Optimiser and schedule settings (shared by a sweep's ``train`` and its recipes' ``train``).

    Attributes:
        optimizer: ``adam`` (cosine schedule) or ``sgd`` (step schedule, momentum ``momentum``).
        warmup_epochs: linear warm-up from ``warmup_start`` x lr before either schedule (per step).
        milestones: sgd: epochs at which the lr drops x0.1. Default: 60% and 80% of the epochs.
        step_every: sgd: drop x0.1 every this many epochs instead (StepLR), counted after warm-up.
    """

    batch_size: Annotated[int, Field(ge=1), at_most(65536, "one batch must fit in memory")] = 256
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    warmup_start: Annotated[float, Field(gt=0, le=1)] = 0.01  # the warm-up's first lr, as a factor of lr
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd
    milestones: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] | None = None
    step_every: Annotated[int, Field(ge=1)] | None = None


class TrainConfig(Schedule):
    """Probe training settings (How to Probe trains ImageNet probes with Adam, lr 1e-3, batch 256):
    the one definition, from the sweep spec's ``train`` to :class:`ProbeTrainer`."""

    epochs: Annotated[int, Field(ge=1), at_most(10_000, "the papers train 50-100; more would take days per trial")] = 10
    lr: Annotated[float, Field(gt=0, le=1000)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    # with augment: worker processes that read and augment the next batches while the backbone runs
    # (0: in the trial's own process); pinned memory when the trial is on a GPU
    loader_workers: Annotated[int, Field(ge=0), at_most(64, "worker processes of one trial")] = 0

class _Rows(torch.utils.data.Dataset):
    """Train inputs (an augmented image list) one row at a time, for a DataLoader's workers."""

    def __init__(self, inputs):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.inputs[index]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch of an epoch of ``n`` samples. A last batch of a single sample is
    folded into the one before it: BatchNorm cannot train on one sample (pooled MLP heads fail,
    B-cos heads' uncentred norms divide by sqrt(eps))."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(start, end) for start, end in zip(starts, starts[1:] + [n])]


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether the top-1 class is right: equal to the label, or one of the positives of a multi-hot label."""
    top = logits.argmax(1)
    if labels.dim() == 2:
        return labels.gather(1, top[:, None]).squeeze(1) > 0
    return top == labels


class ProbeTrainer:
    """Trains ``head`` on fixed features with ``loss``.

    Args:
        head (nn.Module): (B, C, h, w) -> logits (B, K).
        loss (Loss): the probe loss.
        train (tuple): inputs and labels (N,) or multi-hot (N, K). Inputs are features
            (N, C, h, w), or anything indexable that ``embed`` turns into features batch by batch.
        val (tuple[Tensor, Tensor]): features and labels for validation.
        config (TrainConfig): settings.
        embed (callable): optional, a batch of train inputs -> features (e.g. augment, then
            the frozen backbone: the slow path that does not use the feature cache).
        seed (int): seeds the order of the train samples in each epoch.
    """

    def __init__(
        self,
        head: nn.Module,
        loss: Loss,
        train,
        val,
        config: TrainConfig,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
    ):
        self.head, self.loss, self.config, self.embed = head, loss, config, embed
        self.train_features, self.train_labels = train
        self.val_features, self.val_labels = val
        self.device = next(head.parameters()).device
        self.epoch, self.seed = 0, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = len(batch_bounds(len(self.train_labels), config.batch_size))
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                head.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        config = self.config
        warmup = config.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return config.warmup_start + (1.0 - config.warmup_start) * step / warmup
        if config.optimizer == "sgd":
            epoch = step // self.steps_per_epoch
            if config.step_every:
                return 0.1 ** ((epoch - config.warmup_epochs) // config.step_every)
            milestones = config.milestones or tuple(round(f * config.epochs) for f in (0.6, 0.8))
            return 0.1 ** sum(epoch >= m for m in milestones)
        total = max(1, self.config.epochs * self.steps_per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))

    def _inputs(self, order: torch.Tensor, bounds: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """Each batch's train inputs: read here, or by ``loader_workers`` processes (augment path)."""
        workers = self.config.loader_workers if self.embed is not None else 0
        if not workers:
            yield from (self.train_features[order[start:end]] for start, end in bounds)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _Rows(self.train_features), batch_sampler=[order[start:end].tolist() for start, end in bounds],
            num_workers=workers, pin_memory=self.device.type == "cuda", multiprocessing_context="spawn",  # safe in a threaded Ray worker
            # each worker's augmentations seeded by the trainer's seed and the epoch: a resumed epoch draws the same
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch),
        )  # fmt: skip
        yield from loader

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch; returns ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy``."""
        self.head.train()
        order = torch.randperm(len(self.train_labels), generator=self.generator)
        total_loss, correct = 0.0, 0
        bounds = batch_bounds(len(order), self.config.batch_size)
        for (start, end), features in zip(bounds, self._inputs(order, bounds)):
            idx = order[start:end]
            if self.embed is not None:
                features = self.embed(features)
            features = features.to(self.device, torch.float32)  # a float16 cache trains in float32
            labels = self.train_labels[idx].to(self.device)
            logits = self.head(features)
            loss = self.loss(logits, labels)
            if not torch.isfinite(loss):
                raise DivergedError(
                    f"diverged: {self.loss.name} loss is {loss.item()} in epoch {self.epoch + 1} "
                    f"(lr {self.schedule.get_last_lr()[0]:.3g}); lower the learning rate"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            total_loss += loss.item() * len(idx)
            correct += correct_predictions(logits, labels).sum().item()
        self.epoch += 1
        n = len(self.train_labels)
        return {"train/loss": total_loss / n, "train/accuracy": correct / n, **self.validate()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.head.eval()
        logits = torch.cat(
            [self.head(self.val_features[i : i + 1024].to(self.device, torch.float32)) for i in range(0, len(self.val_labels), 1024)]
        )
        labels = self.val_labels.to(self.device)
        return {
            "val/loss": self.loss(logits, labels).item(),
            "val/accuracy": correct_predictions(logits, labels).float().mean().item(),
        }

    def state_dict(self) -> dict:
        return {
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = state["epoch"]
        self.generator.set_state(state["generator"])
