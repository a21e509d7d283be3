"""One trial, without Ray: its config (:class:`TrialConfig`) and :func:`run_trial`, which trains
a probe, explains it, scores the explanations and logs everything to a tracker.

The spec's expansion and the searchers produce a ``TrialConfig`` for each trial; the Ray trainable
(:mod:`sweeps.trainable`), the benchmark's plain loop and the tests call :func:`run_trial` with it.
The tracker is the trial's MLflow run (``sweeps.tracking.TrialRun``) or a folder
(``sweeps.folder_tracker.FolderTracker``); the session says where results and checkpoints go
(Ray Tune's, or none).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from pydantic import field_serializer, model_validator

from evaluation.aggatt import aggatt_bins, aggatt_figure, heatmap_gallery, save_aggatt, save_examples
from evaluation.attribution import create_method
from evaluation.attribution.common import model_traits
from evaluation.epg import evaluate_epg
from evaluation.gridpg import evaluate_gridpg
from evaluation.metrics import GRID_EVALUATED, METRICS, grid_metrics
from evaluation.score_rows import ScoreRows
from sweeps.method_options import PARAM_PREFIX
from probing.backbones import create_backbone
from probing.datasets import create_dataset
from probing.devices import check_placement, extraction_autocast, trial_device
from probing.features import cached_features
from probing.heads import create_head, default_logit_bias
from probing.losses import LOSSES, probe_loss
from probing.model import ProbedModel
from probing.settings import Strict
from probing.train import ProbeTrainer, TrainConfig
from sweeps.settings import (
    BackboneSpec,
    DataSpec,
    EvaluateSpec,
    FeaturesSpec,
    HeadSpec,
    LogitBias,
    TrialTrain,
    check_schedule,
    head_label,
    registered,
)
from sweeps.space import Range

__all__ = ["TrialConfig", "TrialSession", "run_trial", "trial_params"]

GALLERY = 8  # example explanations per (metric, method, layer)


class TrialConfig(Strict):
    """Everything one trial trains, explains and scores: the only thing a trial receives (besides
    where to log). :func:`trial_params` names its MLflow params (``probe.head.depth``, ``train.lr``, ...)."""

    backbone: BackboneSpec
    loss: registered(LOSSES)
    head: HeadSpec
    seed: int = 0  # of the head's initial weights and the order of the train samples
    logit_bias: LogitBias = "auto"
    data: DataSpec = DataSpec()
    features: FeaturesSpec = FeaturesSpec()
    train: TrialTrain = TrialTrain()
    evaluate: EvaluateSpec = EvaluateSpec()

    @field_serializer("backbone", "head")
    def _set_only(self, value: Strict) -> dict[str, Any]:
        return value.model_dump(exclude_none=True)

    @model_validator(mode="after")
    def _concrete(self) -> "TrialConfig":
        ranges = [k for k, v in self.head if isinstance(v, Range)]
        if ranges:
            raise ValueError(f"head.{ranges[0]}: a trial takes one value, not a range")
        check_schedule(self.train, self.train.epochs, "train.")
        return self


class TrialSession:
    """Where a trial's results and checkpoints go. This one: nowhere (a plain run in this
    process); ``sweeps.trainable`` has Ray Tune's."""

    report_every_epoch = False  # True when an early-stopping scheduler reads every epoch

    def restore(self) -> dict | None:
        """The trainer state a resumed trial continues from, or None."""
        return None

    def report(self, results: dict[str, float], state: dict | None) -> None:
        """Results of an epoch, with the trainer's state when a checkpoint is due."""


class Tracker(Protocol):
    """What a trial logs to (``sweeps.tracking.TrialRun``, ``sweeps.folder_tracker.FolderTracker``)."""

    previous_status: str | None  # of the same trial's run in an earlier session, or None
    seconds: float  # spent logging
    complete: bool  # set once the trial has logged all it logs

    def latest_metrics(self) -> dict[str, float]: ...
    def last_step(self, metric: str) -> int: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int, later: bool = False) -> None: ...
    def flush(self) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_figure(self, figure, artifact_file: str, key: str | None = None) -> bool: ...
    def log_text(self, text: str, artifact_file: str) -> bool: ...
    def log_artifact(self, local_path, artifact_path: str | None = None) -> bool: ...


PROBE_SETTINGS = ("loss", "head", "seed", "logit_bias")  # the probe's own: params probe.loss, probe.head.type, ...


def trial_params(config: TrialConfig) -> dict[str, str]:
    """A trial's MLflow params: the probe's own settings under ``probe.`` (``probe.loss``,
    ``probe.head.depth``: apart from the metric ``train/loss``), the others under their section
    (``train.lr``, ``backbone.name``), a method's options as ``method.<name>.<option>``."""
    dumped = config.model_dump()
    return flatten({"probe": {k: dumped.pop(k) for k in PROBE_SETTINGS}} | dumped)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"head.depth": "2", ...}`` for MLflow params; a method's options are
    ``method.<name>.<option>`` (``evaluate.method_options`` nests them)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name == "evaluate.method_options":
            name = PARAM_PREFIX.rstrip(".")
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def trial_inputs(config: TrialConfig, log=print):
    """Backbone and head on the trial's device (``train.device``), validation split, loss and a
    trainer holding the head and the train inputs (memory-mapped feature shards: a batch at a time
    is read and goes to the device)."""
    data, train, precision = config.data, config.train, config.features.precision
    device = trial_device(train.device)
    backbone = create_backbone(config.backbone.name, log=log, **config.backbone.options()).to(device)
    check_placement(backbone, device, f"backbone {config.backbone.name}")
    train_split, val = (create_dataset(data.dataset, split, **data.options()) for split in ("train", "val"))
    dtype = getattr(torch, train.feature_dtype)
    # read from the cache the sweep's driver built and verified (sizes checked here, not every checksum)
    cached = {"log": log, "dtype": dtype, "precision": precision, "verify": False, "shard_rows": config.features.shard_rows}
    val_features = cached_features(backbone, val, data.dataset, "val", **cached)
    if train.augment:  # the faithful, slow path: augmented images through the frozen backbone every epoch
        train_inputs = train_split.augmented

        def embed(images):
            with torch.no_grad(), extraction_autocast(device, precision):
                return backbone(backbone.preprocess(images.to(device)))
    else:
        train_inputs, embed = cached_features(backbone, train_split, data.dataset, "train", **cached), None
    head_type, classes = config.head.type, train_split.num_classes
    loss = probe_loss(config.loss, head_type)
    bias = default_logit_bias(config.loss, classes, head_type) if config.logit_bias == "auto" else float(config.logit_bias)
    torch.manual_seed(config.seed)  # the head's initial weights
    head = create_head(head_type, backbone.out_channels, classes, logit_bias=bias, **config.head.options()).to(device)
    schedule = TrainConfig(**train.model_dump(include=set(TrainConfig.model_fields)))
    trainer = ProbeTrainer(head, loss, (train_inputs, train_split.labels), (val_features, val.labels), schedule, embed, config.seed)
    return backbone, val, loss, trainer


def evaluate_probe(model: ProbedModel, val, loss, evaluate: EvaluateSpec, tracker: Tracker, probe: str = "") -> dict[str, float]:
    """Localisation scores of the trained probe with their 95% bootstrap intervals
    (``<score>/ci_low``, ``<score>/ci_high``), logged with the per-row scores
    (``scores/<metric>.csv.gz``) and figures titled with the ``probe``'s name: the AggAtt of each
    (metric, method, layer) over its rows (grids: the top-left cell's), and a gallery of the first
    batch's explanations over their images; the bins and the gallery's maps also as ``.npz``,
    for the sweep's side-by-side figures."""
    collected: dict[tuple[str, str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    examples: dict[tuple[str, str, str], tuple[torch.Tensor, ...]] = {}
    on_boxes = tuple(m for m in evaluate.metrics if METRICS.get(m).protocol == "boxes")

    def keep(key, maps, rows, scores, images, ids):
        # boxes: every (image, class) row; grids: the top-left cell's row of each grid, as many as images
        chosen = torch.ones_like(rows, dtype=torch.bool) if key[0] in on_boxes else rows == 0
        collected.setdefault(key, []).append((maps[chosen].cpu(), scores[chosen].cpu()))
        examples.setdefault(key, (images[:GALLERY].cpu(), maps[chosen][:GALLERY].cpu(), scores[chosen][:GALLERY].cpu(), ids[chosen.cpu()][:GALLERY]))

    scores: dict[str, float] = {}
    traits = model_traits(model)
    methods = [m for m in evaluate.methods if not create_method(m).refusal(traits)]  # validate refused the rest unless skip
    if len(methods) < len(evaluate.methods):
        tracker.set_tags({"methods_left_out": ", ".join(m for m in evaluate.methods if m not in methods)})
    score_rows = ScoreRows()
    options = {
        "methods": methods, "layers": evaluate.layers, "seed": evaluate.seed, "smoothing": evaluate.smoothing_per_method(),
        "on_rows": score_rows.add, "method_options": evaluate.method_options,
    }  # fmt: skip
    if on_boxes:
        scores |= evaluate_epg(model, val.images, val.boxes, loss.probabilities, n_images=evaluate.n_images, metrics=on_boxes, on_maps=keep, **options)
    on_grids = grid_metrics(evaluate.metrics, protocols=GRID_EVALUATED)
    if on_grids:
        scores |= evaluate_gridpg(
            model, val.images, val.labels, loss.probabilities, grid=evaluate.grid, n_grids=evaluate.n_grids,
            confidence=evaluate.confidence, metrics=on_grids, on_maps=keep, di_cells=evaluate.di_cells, **options,
        )  # fmt: skip
    scores |= score_rows.intervals(seed=evaluate.seed)
    named = f"{probe}: " if probe else ""
    with tempfile.TemporaryDirectory() as folder:
        for path in score_rows.write(Path(folder)):
            tracker.log_artifact(path, "scores")
        for (metric, method, layer), parts in collected.items():
            maps, values = (torch.cat(p) for p in zip(*parts))
            rows = "(image, class) rows" if metric in on_boxes else "top-left cell"
            grid = None if metric in on_boxes else evaluate.grid
            bins = aggatt_bins(maps, values)
            title = f"{named}{metric}/{method}/{layer}: AggAtt, {rows}, best to worst"
            tracker.log_figure(aggatt_figure(bins, title, grid), f"aggatt/{metric}-{method}-{layer}.png", key=f"aggatt/{metric}/{method}/{layer}")
            save_aggatt(bins, Path(folder) / f"{metric}-{method}-{layer}.npz")
            tracker.log_artifact(Path(folder) / f"{metric}-{method}-{layer}.npz", "aggatt")
            images, maps, values, ids = examples[(metric, method, layer)]
            title = f"{named}{metric}/{method}/{layer}: examples" + ("" if metric in on_boxes else " (top-left cell explained)")
            tracker.log_figure(heatmap_gallery(images, maps, values, title), f"examples/{metric}-{method}-{layer}.png")
            save_examples(images, maps, values, ids, Path(folder) / f"{metric}-{method}-{layer}.npz")
            tracker.log_artifact(Path(folder) / f"{metric}-{method}-{layer}.npz", "examples")
    return scores


def run_trial(config: TrialConfig, tracker: Tracker, session: TrialSession | None = None, log=print) -> dict[str, float]:
    """Train the probe of ``config``, explain it, score it, and log all of it to ``tracker``.

    ``session`` receives a report per epoch and the trainer's state at most every
    ``train.checkpoint_every_s`` and after the last epoch; a trial it restores continues from that
    state, and logs only the epochs its tracker does not have yet. A trial whose tracker says it
    finished reports what it logged instead of training again.

    Returns:
        the last epoch's metrics and the localisation scores (``<metric>/<method>/<layer>``).
    """
    session = session or TrialSession()
    epochs = config.train.epochs

    def report_logged() -> dict[str, float]:
        # everything was logged in an earlier session, which ended before its last report arrived
        tracker.complete = True
        results = {**tracker.latest_metrics(), "epoch": epochs}
        session.report(results, None)
        return results

    if tracker.previous_status == "FINISHED":
        return report_logged()
    tracker.log_params(trial_params(config))
    backbone, val, loss, trainer = trial_inputs(config, log)
    # which weights the trial used (torchvision's V1 and V2 ResNet-50 files differ)
    device = next(backbone.parameters()).device
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tracker.set_tags({"backbone.weights_file": backbone.weights_file, "backbone.digest": backbone.digest, "device": f"{device} ({on})"})
    state = session.restore()
    if state is not None:
        trainer.load_state_dict(state)
    # a resumed trial repeats the epochs after its checkpoint; the tracker may have them already
    in_tracker = tracker.last_step("train/loss") if tracker.previous_status else 0
    if tracker.previous_status:
        tracker.set_tags({"resumed_at_epoch": str(trainer.epoch)})
    if trainer.epoch == epochs:  # its last checkpoint: saved after all was logged
        return report_logged()

    seconds = {"train": 0.0, "evaluate": 0.0, "checkpoint": 0.0}
    every, last_checkpoint = config.train.checkpoint_every_s, time.monotonic()
    while True:
        with _timer(seconds, "train"):
            metrics = trainer.run_epoch()
        last = trainer.epoch == epochs
        if last:
            with _timer(seconds, "evaluate"):
                logged = tracker.seconds
                probe = f"{config.backbone.name} {config.loss} {head_label(config.head.model_dump(exclude_none=True))}"
                metrics |= evaluate_probe(ProbedModel(backbone, trainer.head.eval()), val, loss, config.evaluate, tracker, probe)
                seconds["evaluate"] -= tracker.seconds - logged  # its figures' upload counts as tracking
        if trainer.epoch > in_tracker:
            tracker.log_metrics(metrics, step=trainer.epoch, later=True)
        results = {**metrics, "epoch": trainer.epoch}
        if not last and time.monotonic() - last_checkpoint < every:
            if session.report_every_epoch:  # an early-stopping scheduler reads every epoch
                with _timer(seconds, "checkpoint"):
                    session.report(results, None)
            continue
        if last:  # all logged before the last report: ASHA stops a trial there (at its max_t)
            _log_probe(tracker, trainer, config)
            # where this session of the trial spent its time (a resumed trial counts from its resume;
            # the last checkpoint and metrics write are not counted)
            times = {f"time/{k}_s": v for k, v in seconds.items()} | {"time/tracking_s": tracker.seconds}
            tracker.log_metrics(times, step=epochs, later=True)
            tracker.complete = True
        tracker.flush()  # first: the epochs a checkpoint holds are logged, and a resume logs only later ones
        with _timer(seconds, "checkpoint"):
            session.report(results, trainer.state_dict())
        last_checkpoint = time.monotonic()
        if last:
            return results


@contextmanager
def _timer(seconds: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] += time.perf_counter() - start


def _log_probe(tracker: Tracker, trainer: ProbeTrainer, config: TrialConfig) -> None:
    """The trained probe (its head's state dict) and the trial's config, as artifacts."""
    tracker.log_text(yaml.safe_dump(config.model_dump(), sort_keys=False), "trial_config.yaml")
    with tempfile.TemporaryDirectory() as folder:
        torch.save(trainer.head.state_dict(), Path(folder) / "probe.pt")
        tracker.log_artifact(Path(folder) / "probe.pt")
