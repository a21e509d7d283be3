"""The Ray Tune function trainable: one trial = train a probe, explain it, score it, log it.

A trial reads its config, continues its MLflow run if one exists (tag ``trial_id``), resumes from
``tune.get_checkpoint()`` if there is one, and reports to Ray Tune with a checkpoint of the
trainer state no more often than every ``train.checkpoint_every_s`` and after the last epoch (and
every epoch when an early-stopping scheduler reads the results); the epochs' metrics are written
to MLflow with each checkpoint. The last epoch adds the localisation scores, the AggAtt figures,
the probe and the trial's timings, all logged before its report: ASHA stops a trial at that report.
An epoch that ended after the last checkpoint Ray saved is trained again when the trial resumes,
but logged once: the run's metric history holds each epoch one time.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from evaluation.aggatt import aggatt_bins, aggatt_figure, heatmap_gallery
from evaluation.attribution import create_method
from evaluation.attribution.common import model_traits
from evaluation.epg import evaluate_epg
from evaluation.gridpg import evaluate_gridpg
from probing.backbones import create_backbone
from probing.datasets import create_dataset
from probing.features import cached_features
from probing.heads import create_head, default_logit_bias
from probing.losses import probe_loss
from probing.model import ProbedModel
from probing.train import ProbeTrainer, TrainConfig
from sweeps.spec import DataSpec, EvaluateSpec, head_options
from sweeps.spec_files import secret_uri

if TYPE_CHECKING:  # Ray and MLflow load in probe_trial: the parts above also run in a plain loop
    from sweeps.tracking import TrialRun

__all__ = ["probe_trial", "RUNTIME_KEY"]

RUNTIME_KEY = "runtime"  # config entries that say where to log, not what to train
STATE_FILE = "trainer.pt"
GALLERY = 8  # example explanations per (setting, method, layer)


def _trial_inputs(config: dict[str, Any]):
    """Backbone, train/val splits and their cached features, head, loss: all from the config."""
    data, train_spec = DataSpec.model_validate(config["data"]), dict(config["train"])
    dataset, data_options = data.dataset, data.options()
    backbone_options = {k: v for k, v in config["backbone"].items() if k != "name"}
    backbone = create_backbone(config["backbone"]["name"], **backbone_options)
    train, val = (create_dataset(dataset, split, **data_options) for split in ("train", "val"))
    dtype = getattr(torch, train_spec.pop("feature_dtype"))
    augment = train_spec.pop("augment")
    train_spec.pop("checkpoint_every_s")  # the trial's, not the trainer's
    val_features = cached_features(backbone, val, dataset, "val", dtype=dtype)
    if augment:  # the faithful, slow path: augmented images through the frozen backbone every epoch
        train_inputs = train.augmented

        def embed(images):
            with torch.no_grad():
                return backbone(backbone.preprocess(images))
    else:
        train_inputs, embed = cached_features(backbone, train, dataset, "train", dtype=dtype), None
    head_type, bias = config["head"]["type"], config["logit_bias"]
    loss = probe_loss(config["loss"], head_type)
    bias = default_logit_bias(config["loss"], train.num_classes, head_type) if bias == "auto" else float(bias)
    torch.manual_seed(config["seed"])  # the head's initial weights
    head = create_head(head_type, backbone.out_channels, train.num_classes, logit_bias=bias, **head_options(config["head"]))
    trainer = ProbeTrainer(
        head,
        loss,
        (train_inputs, train.labels),
        (val_features, val.labels),
        TrainConfig(seed=config["seed"], **train_spec),
        embed=embed,
    )
    return backbone, val, loss, trainer


def _evaluate(model: ProbedModel, val, loss, evaluate: dict[str, Any], run: TrialRun) -> dict[str, float]:
    """Localisation scores of the trained probe, logged with figures: the AggAtt of each
    (setting, method, layer) over its rows (grids: the top-left cell's), and a gallery of the
    first batch's explanations over their images."""
    spec = EvaluateSpec.model_validate(evaluate)
    collected: dict[tuple[str, str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    examples: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def keep(key, maps, rows, scores, images):
        # EPG: every (image, class) row; grids: the top-left cell's row of each grid, as many as images
        chosen = torch.ones_like(rows, dtype=torch.bool) if key[0] == "epg" else rows == 0
        collected.setdefault(key, []).append((maps[chosen].cpu(), scores[chosen].cpu()))
        examples.setdefault(key, (images[:GALLERY].cpu(), maps[chosen][:GALLERY].cpu(), scores[chosen][:GALLERY].cpu()))

    metrics: dict[str, float] = {}
    traits = model_traits(model)
    methods = [m for m in spec.methods if not create_method(m).refusal(traits)]  # validate refused the rest unless skip
    if len(methods) < len(spec.methods):
        run.set_tags({"methods_left_out": ", ".join(m for m in spec.methods if m not in methods)})
    options = {"methods": methods, "layers": spec.layers, "seed": spec.seed, "smoothing": spec.smoothing_per_method()}
    if "epg" in spec.metrics:
        metrics |= evaluate_epg(model, val.images, val.boxes, loss.probabilities, n_images=spec.n_images, on_maps=keep, **options)
    grid_settings = tuple(m for m in spec.metrics if m != "epg")
    if grid_settings:
        metrics |= evaluate_gridpg(
            model, val.images, val.labels, loss.probabilities, grid=spec.grid, n_grids=spec.n_grids,
            confidence=spec.confidence, settings=grid_settings, on_maps=keep, di_cells=spec.di_cells, **options,
        )  # fmt: skip
    for (setting, method, layer), parts in collected.items():
        maps, scores = (torch.cat(p) for p in zip(*parts))
        rows = "(image, class) rows" if setting == "epg" else "top-left cell"
        title = f"{setting}/{method}/{layer}: AggAtt, {rows}, best to worst"
        run.log_figure(aggatt_figure(aggatt_bins(maps, scores), title), f"aggatt/{setting}-{method}-{layer}.png")
        images, maps, scores = examples[(setting, method, layer)]
        title = f"{setting}/{method}/{layer}: examples" + ("" if setting == "epg" else " (top-left cell explained)")
        run.log_figure(heatmap_gallery(images, maps, scores, title), f"examples/{setting}-{method}-{layer}.png")
    return metrics


def probe_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable; see the module docstring."""
    import ray
    from ray import tune

    from sweeps.tracking import TrialRun, flatten

    runtime = config[RUNTIME_KEY]
    os.environ["PROBESWEEP_CACHE"] = runtime["cache_dir"]
    torch.set_num_threads(runtime["threads"])
    context = tune.get_context()
    with TrialRun(
        secret_uri(runtime["tracking_uri"]),  # a URI with a secret comes from the environment
        runtime["experiment_id"],
        runtime["parent_run_id"],
        context.get_trial_id(),
        context.get_trial_name(),
    ) as run:
        # Ray checks that every result holds the searcher's metrics: the objectives are NaN until
        # the probe is explained (and stay NaN for a trial that ASHA stops before that)
        pending = {metric: float("nan") for metric in runtime["objectives"]}
        epochs = config["train"]["epochs"]

        def report_logged() -> None:
            # the trial had ended and logged everything before the driver died, but Ray's experiment
            # state had not caught up: report its results from MLflow instead of training again
            run.complete = True
            tune.report({**pending, **run.latest_metrics(), "epoch": epochs})

        if run.previous_status == "FINISHED":
            return report_logged()
        run.log_params(flatten({k: v for k, v in config.items() if k != RUNTIME_KEY}))
        node_id = ray.get_runtime_context().get_node_id()
        # the address the node joined the cluster with (several nodes may share a host)
        node_ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), ray.util.get_node_ip_address())
        run.set_tags({"node_ip": node_ip, "node_id": node_id, "hostname": socket.gethostname()})
        backbone, val, loss, trainer = _trial_inputs(config)
        # which weights the trial used (torchvision's V1 and V2 ResNet-50 files differ)
        run.set_tags({"backbone.weights_file": backbone.weights_file, "backbone.digest": backbone.digest})

        checkpoint = tune.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                state = kept_state(Path(folder))
                if state is not None:
                    trainer.load_state_dict(torch.load(state, weights_only=True))
        # a resumed trial repeats the epochs after its checkpoint; MLflow may have them already
        in_mlflow = run.last_step("train/loss") if run.previous_status else 0
        if run.previous_status:
            run.set_tags({"resumed_at_epoch": str(trainer.epoch)})
        if trainer.epoch == epochs:  # its last checkpoint: saved after all was logged
            return report_logged()

        seconds = {"train": 0.0, "evaluate": 0.0, "checkpoint": 0.0}
        every, last_checkpoint = config["train"]["checkpoint_every_s"], time.monotonic()
        while trainer.epoch < epochs:
            with _timer(seconds, "train"):
                metrics = trainer.run_epoch()
            last = trainer.epoch == epochs
            if last:
                with _timer(seconds, "evaluate"):
                    logged = run.seconds
                    metrics |= _evaluate(ProbedModel(backbone, trainer.head.eval()), val, loss, config["evaluate"], run)
                    seconds["evaluate"] -= run.seconds - logged  # its figures' upload counts as tracking
            if trainer.epoch > in_mlflow:
                run.log_metrics(metrics, step=trainer.epoch, later=True)
            report = {**pending, **metrics, "epoch": trainer.epoch}
            if not last and time.monotonic() - last_checkpoint < every:
                if runtime.get("report_every_epoch", True):  # an early-stopping scheduler reads every epoch
                    with _timer(seconds, "checkpoint"):
                        tune.report(report)
                continue
            if last:  # all logged before the last report: ASHA stops a trial there (at its max_t)
                _log_probe(run, trainer, config)
                # where this session of the trial spent its time (a resumed trial counts from its resume;
                # the last checkpoint and metrics write are not counted)
                times = {f"time/{k}_s": v for k, v in seconds.items()} | {"time/tracking_s": run.seconds}
                run.log_metrics(times, step=epochs, later=True)
                run.complete = True
            run.flush()  # first: the epochs a checkpoint holds are in MLflow, and a resume logs only later ones
            with _timer(seconds, "checkpoint"), tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state_dict(), Path(folder) / STATE_FILE)
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
            last_checkpoint = time.monotonic()


def kept_state(folder: Path) -> Path | None:
    """The trainer state in Ray's checkpoint ``folder``. Ray's experiment snapshot lags by seconds
    and may name a checkpoint that was since deleted (it keeps the newest two): then the newest
    checkpoint beside it, whose epochs MLflow holds too (it is saved after their write); None if
    the trial has none left."""
    if (folder / STATE_FILE).is_file():
        return folder / STATE_FILE
    kept = sorted(folder.parent.glob(f"checkpoint_*/{STATE_FILE}"))  # checkpoint_000012: zero-padded
    return kept[-1] if kept else None


@contextmanager
def _timer(seconds: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] += time.perf_counter() - start


def _log_probe(run: TrialRun, trainer: ProbeTrainer, config: dict[str, Any]) -> None:
    """The trained probe (its head's state dict) and the trial's resolved config, as artifacts."""
    run.log_text(yaml.safe_dump({k: v for k, v in config.items() if k != RUNTIME_KEY}, sort_keys=False), "trial_config.yaml")
    with tempfile.TemporaryDirectory() as folder:
        torch.save(trainer.head.state_dict(), Path(folder) / "probe.pt")
        run.log_artifact(Path(folder) / "probe.pt")
