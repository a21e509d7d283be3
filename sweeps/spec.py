"""The sweep spec: one YAML file, validated into strict pydantic models before anything runs.

Lists are grid axes (``loss: [ce, bce]``); the trial space is their product, expanded into one
:class:`sweeps.trial.TrialConfig` per trial. Every problem is reported at once with its YAML path,
e.g. ``probe.head[1].depth: mlp heads need depth >= 2``. The sections are in :mod:`sweeps.settings`.
"""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator, ValidationError, field_validator, model_validator

from evaluation.attribution import METHODS
from evaluation.metrics import METRICS
from evaluation.smoothing import REFERENCE_SMOOTHING
from probing.backbones import BACKBONES
from probing.datasets import DATASETS
from probing.losses import LOSSES
from probing.train import Schedule
from sweeps.settings import (
    BackboneSpec,
    DataSpec,
    EvaluateSpec,
    FeaturesSpec,
    ProbeSpec,
    RecipeSpec,
    ResourcesSpec,
    Strict,
    TrackingSpec,
    TrainSpec,
    axis,
    backbone_item,
    check_schedule,
)
from sweeps.spec_files import SpecError, check_name, expand_variables, problem_lines, read_spec_file
from sweeps.method_options import method_option_choices, option_axes
from sweeps.space import EPOCH_METRICS, Range, SearchSpec, axis_values, draw, range_paths
from sweeps.trial import TrialConfig, trial_params

__all__ = ["SpecError", "SweepSpec", "load_spec", "parse_spec", "DEMO_SPEC"]

DEMO_SPEC = Path(__file__).parent / "configs" / "demo.yaml"


class SweepSpec(Strict):
    name: str
    data: DataSpec = DataSpec()
    backbones: axis(Annotated[BackboneSpec, BeforeValidator(backbone_item)])
    probe: ProbeSpec = ProbeSpec()
    features: FeaturesSpec = FeaturesSpec()
    train: TrainSpec = TrainSpec()
    recipes: list[RecipeSpec] = []
    evaluate: EvaluateSpec = EvaluateSpec()
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str | None = None  # Ray results folder; default: ./ray_results

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return check_name(v)

    def warnings(self) -> list[str]:
        """What is valid but probably not meant (printed by ``validate`` and ``run``)."""
        own_size = inspect.signature(DATASETS.get(self.data.dataset)).parameters["size"].default
        side = (self.data.size or own_size) * (
            1 if self.data.multilabel else self.evaluate.grid
        )  # the maps' side: an image, or a grid of them
        kernel = max(s.kernel for s in REFERENCE_SMOOTHING.values())
        warnings = []
        if self.resources.gpu > 1:
            warnings.append(
                f"resources.gpu: a trial computes on one device; the other {self.resources.gpu - 1:g} GPUs it reserves stay idle"
            )
        if self.train.loader_workers and not self.train.augment:
            warnings.append("train.loader_workers: only the augment path reads images while training; without augment it is unused")
        if self.evaluate.smoothing == "reference" and side < kernel:
            warnings.append(
                f"evaluate.smoothing: the reference's {kernel} px Gaussian is sized for 224-448 px images; on these "
                f"{side} px maps it spreads attribution over the whole map: consider smoothing: none or a smaller kernel"
            )
        return warnings

    def n_trials(self) -> int:
        """How many trials the sweep runs."""
        if self.search.algorithm == "optuna":
            return self.search.num_samples
        return len(self.trials())

    def trials(self) -> list[TrialConfig]:
        """The trials of grid or random search.

        Grid: every combination of backbone x loss x head x seed x lr x weight_decay. Random: that
        grid with ``search.num_samples`` draws of the ranges per point, seeded by ``search.seed``.
        """
        if self.search.algorithm == "optuna":
            raise ValueError("an Optuna search chooses its trials as it runs: they cannot be listed in advance")
        rng = np.random.default_rng(self.search.seed)
        repeats = self.search.num_samples if self.search.algorithm == "random" else 1
        axes = itertools.product(
            self.backbones, self.probe.loss, self.probe.head, self.train.seed,
            axis_values(self.train.lr), axis_values(self.train.weight_decay),
        )  # fmt: skip
        return [
            self.trial(backbone, loss, head.drawn(rng), seed, draw(lr, rng), draw(weight_decay, rng), options)
            for backbone, loss, head, seed, lr, weight_decay in axes
            for _ in range(repeats)
            for options in method_option_choices(self.evaluate.method_options, rng)
        ]

    def shared_params(self) -> dict[str, str]:
        """The MLflow params every trial of the sweep has alike (:func:`sweeps.trial.trial_params`):
        logged once, on the sweep's parent run; a trial run logs those it has otherwise. For an
        Optuna search: those alike in every choice of its lists and four draws of its ranges."""
        spec = self
        if self.search.algorithm == "optuna":
            spec = self.model_copy(update={"search": self.search.model_copy(update={"algorithm": "random", "num_samples": 4})})
        trials = [trial_params(t) for t in spec.trials()]
        return {k: v for k, v in trials[0].items() if all(t.get(k) == v for t in trials[1:])}

    def trial(
        self, backbone: BackboneSpec, loss: str, head: dict[str, Any], seed: int, lr: float, weight_decay: float,
        method_options: dict[str, dict[str, Any]] | None = None,
    ) -> TrialConfig:  # fmt: skip
        """One trial: the spec's constant sections and these values of its axes (a head's ranges
        drawn; ``method_options``: the evaluated methods' options, one value each), with the
        ``train`` settings of the first recipe that matches."""
        train = self.train.model_dump(exclude={"seed", "lr", "weight_decay"}) | {"lr": lr, "weight_decay": weight_decay}
        evaluate = self.evaluate if method_options is None else self.evaluate.model_copy(update={"method_options": method_options})
        return TrialConfig.model_validate({
            "backbone": backbone, "loss": loss, "head": head, "seed": seed, "logit_bias": self.probe.logit_bias,
            "data": self.data, "features": self.features, "train": train | self.recipe_overrides(head["type"], backbone.name),
            "evaluate": evaluate,
        })  # fmt: skip

    def recipe_overrides(self, head_type: str, backbone: str) -> dict[str, Any]:
        """The ``train`` settings of the first recipe matching the trial, or none."""
        recipe = next((r for r in self.recipes if r.matches(head_type, backbone)), None)
        return recipe.overrides() if recipe is not None else {}

    def known_metrics(self) -> list[str]:
        """The metrics every trial logs last: per-epoch ones, ``<metric>/<method>/<layer>`` and
        each score's 95% interval bounds (``.../ci_low``, an objective for the pessimistic score)."""
        scores = [
            f"{metric}/{method}/{layer}{bound}"
            for metric in self.evaluate.metrics
            for method in self.evaluate.methods
            for layer in self.evaluate.layers
            if layer in METHODS.get(method).layers
            for bound in ("", "/ci_low", "/ci_high")
        ]
        return [*EPOCH_METRICS, *scores]

    @model_validator(mode="after")
    def _schedules_fit(self) -> "SweepSpec":
        check_schedule(self.train, self.train.epochs, "train.")
        for i, recipe in enumerate(self.recipes):
            schedule = self.train.model_dump(include=set(Schedule.model_fields)) | recipe.overrides()
            check_schedule(Schedule.model_construct(**schedule), self.train.epochs, f"recipes[{i}].train.")
        return self

    @model_validator(mode="after")
    def _device_fits_resources(self) -> "SweepSpec":
        device, gpu = self.train.device, self.resources.gpu
        if device == "cuda" and gpu == 0:
            raise ValueError("train.device: cuda needs resources.gpu > 0 (Ray shows a trial without GPUs none)")
        if device == "cpu" and gpu > 0:
            raise ValueError(
                f"resources.gpu: each trial reserves {gpu:g} GPU that train.device: cpu leaves idle; set train.device: auto, or gpu: 0"
            )
        return self

    @model_validator(mode="after")
    def _methods_apply(self) -> "SweepSpec":
        for backbone in self.backbones:
            for head in self.probe.head:
                traits = BACKBONES.get(backbone.name).traits | ({"bcos"} if head.type == "bcos" else set())
                for method in self.evaluate.methods:
                    refusal = METHODS.get(method).refusal(traits)
                    if refusal and self.evaluate.refused == "error":
                        raise ValueError(
                            f"evaluate.methods: {refusal} (backbone {backbone.name}, head {head.type}); drop it, "
                            "or set evaluate.refused: skip to leave it out of those trials only"
                        )
        return self

    @model_validator(mode="after")
    def _losses_fit_labels(self) -> "SweepSpec":
        multilabel = self.data.multilabel
        for loss in self.probe.loss:
            if LOSSES.get(loss).multilabel != multilabel:
                kind = "multi-label" if multilabel else "single-label"
                raise ValueError(f"probe.loss: {loss!r} does not fit the {kind} data set {self.data.dataset!r}")
        for metric in self.evaluate.metrics:
            entry = METRICS.get(metric)
            if (entry.protocol == "boxes") != multilabel:
                raise ValueError(f"evaluate.metrics: {metric!r} needs {entry.needs}, not {self.data.dataset!r}")
        return self

    @model_validator(mode="after")
    def _search_fits(self) -> "SweepSpec":
        search, ranges = self.search, range_paths(self) + option_axes(self.evaluate.method_options, (Range,))
        if search.algorithm == "grid":
            if ranges:
                raise ValueError(f"{ranges[0]}: a range needs search.algorithm random or optuna (grid search takes lists)")
            if search.num_samples is not None:
                raise ValueError("search.num_samples: grid search runs every combination once; leave it out")
        elif search.num_samples is None:
            raise ValueError(f"search.num_samples: required for {search.algorithm} search")
        elif search.algorithm == "random" and not ranges:
            raise ValueError("search.algorithm: random search needs a {low, high} range to draw (lists are a grid)")
        known = self.known_metrics()
        for metric in search.objectives:
            if metric not in known:
                listed = ", ".join(m for m in known if not m.endswith(("/ci_low", "/ci_high")))
                raise ValueError(
                    f"search.objectives: {metric!r} is not logged by this sweep: known are {listed} "
                    "(and each score's interval bounds, <score>/ci_low and <score>/ci_high)"
                )
        if search.scheduler and search.scheduler.grace_period >= self.train.epochs:
            raise ValueError(
                f"search.scheduler.grace_period: must be < train.epochs ({self.train.epochs}), got {search.scheduler.grace_period}"
            )
        return self


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate already-loaded YAML; raises :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): expected a mapping of keys, got {type(data).__name__}"])
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, problem_lines(err.errors())) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep spec file, expand its ``${VARIABLES}`` and validate it."""
    path = Path(path)
    data = read_spec_file(path)
    problems: list[str] = []
    data = expand_variables(data, problems=problems)
    if problems:
        raise SpecError(str(path), problems)
    return parse_spec(data, str(path))
