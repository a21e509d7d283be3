"""The sweep spec: one YAML file, validated into strict pydantic models before anything runs.

Lists are grid axes (``loss: [ce, bce]``); the trial space is their product. Every problem is
reported at once with its YAML path, e.g. ``probe.head[1].depth: mlp heads need depth >= 2``.
"""

from __future__ import annotations

import inspect
import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evaluation.attribution import METHODS
from evaluation.grid_models import GRID_SETTINGS
from evaluation.smoothing import REFERENCE_SMOOTHING, Smoothing
from probing.backbones import BACKBONES, LAYERS
from probing.zoo import WEIGHTS_TAG
from probing.datasets import DATASETS
from probing.heads import HEADS
from probing.losses import LOSSES
from probing.registry import Registry
from sweeps.spec_files import SpecError, check_name, expand_variables, problem_lines, read_spec_file
from sweeps.space import EPOCH_METRICS, Range, SearchSpec, axis_values, draw, range_paths, search_axis, searchable

__all__ = ["SpecError", "SweepSpec", "load_spec", "parse_spec", "DEMO_SPEC"]

DEMO_SPEC = Path(__file__).parent / "configs" / "demo.yaml"
METRICS = (*GRID_SETTINGS, "epg")  # gridpg, difull, dipart on grids of single-label images; epg on boxes


def _as_list(value: Any) -> Any:
    """A single value in YAML means a one-value axis."""
    return value if isinstance(value, list) else [value]


def _registered(registry: Registry):
    """A string type that must name an entry of ``registry`` (the error names the known ones)."""

    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(registry.unknown_message(name))
        return name

    return Annotated[str, AfterValidator(check)]


def _layer(name: str) -> str:
    if name not in LAYERS:
        raise ValueError(f"unknown layer {name!r}: known are {', '.join(LAYERS)}")
    return name


def _auto_or_number(value: Any) -> Any:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return value
    raise ValueError(f"must be 'auto' or a finite number, got {value!r}")


def at_most(limit: float, reason: str):
    """An upper bound whose message says why it is there."""

    def check(value):
        if value is not None and value > limit:
            raise ValueError(f"must be <= {limit:,} ({reason}), got {value!r}")
        return value

    return AfterValidator(check)


def _unique(values: list) -> list:
    shown = [v.model_dump(exclude_none=True) if isinstance(v, BaseModel) else v for v in values]
    if len(values) != len(set(map(str, shown))):
        raise ValueError(f"values repeat: {shown}")
    return values


def _axis(item_type):
    """A sweep axis: one value or a list of distinct values, at least one."""
    return Annotated[list[item_type], BeforeValidator(_as_list), Field(min_length=1), AfterValidator(_unique)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


MULTILABEL_DATASETS = ("voc2007", "coco2014")  # multi-hot labels with boxes


class DataSpec(Strict):
    """``{dataset: voc2007, root: /data/VOCdevkit, size: 224}``; ``root`` for the data sets on disk."""

    dataset: _registered(DATASETS) = "digits"
    root: str | None = None
    # default: the data set's own (digits 32, VOC 224, COCO 448)
    size: Annotated[int, Field(ge=8), at_most(4096, "images are resized to this side")] | None = None
    skip_corrupt: bool = False  # leave unreadable images out (and report how many) instead of failing
    # train.augment's RandomResizedCrop area range; default (0.08, 1) for class folders, (0.7, 1) for
    # VOC/COCO (How to Probe: smaller crops drop labelled objects while keeping their labels)
    crop_scale: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)] | None = None

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, v):
        if v is not None and v[0] > v[1]:
            raise ValueError(f"low must be <= high, got [{v[0]}, {v[1]}]")
        return v

    @model_validator(mode="after")
    def _root_fits_dataset(self) -> "DataSpec":
        if self.dataset == "digits":
            if self.root is not None or self.skip_corrupt or self.crop_scale is not None:
                raise ValueError("the embedded digits take no root, skip_corrupt or crop_scale (they augment by shifts)")
        elif self.root is None:
            raise ValueError(f"data set {self.dataset!r} needs root: the folder it is in")
        elif not Path(self.root).expanduser().exists():
            raise ValueError(f"root not found: {self.root}")
        return self

    @property
    def multilabel(self) -> bool:
        return self.dataset in MULTILABEL_DATASETS

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``probing.datasets.create_dataset``."""
        return self.model_dump(exclude={"dataset"}, exclude_none=True, exclude_defaults=True)


class HeadSpec(Strict):
    """One point on the head axis: ``{type: mlp, depth: 2, width: 256}``, ``{type: bcos, depth: 2, bcos_b: 2.5}``."""

    type: _registered(HEADS)
    depth: searchable(int, le=32) | None = None
    width: searchable(int, ge=1, le=65536) | None = None
    bcos_b: searchable(float, ge=1) | None = None
    max_out: searchable(int, ge=1) | None = None
    input: Literal["spatial", "pooled"] | None = None  # default spatial: pool after the head

    @field_validator("depth", "width", "bcos_b", "max_out")
    @classmethod
    def _options_fit_type(cls, v, info: ValidationInfo):
        head_type = info.data.get("type")
        allowed = {"depth": ("mlp", "bcos"), "width": ("mlp", "bcos"), "bcos_b": ("bcos",), "max_out": ("bcos",)}
        if v is not None and head_type not in allowed[info.field_name]:
            raise ValueError(f"applies to {' and '.join(allowed[info.field_name])} heads only, not to {head_type!r}")
        minimum = {"mlp": 2, "bcos": 1}.get(head_type)
        lowest = v.low if isinstance(v, Range) else v
        if info.field_name == "depth" and v is not None and lowest < minimum:
            raise ValueError(f"{head_type} heads need depth >= {minimum}, got {lowest:g}")
        return v

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``probing.heads.create_head``."""
        return head_options(self.model_dump(exclude_none=True))

    def label(self) -> str:
        """Short name for tables: ``linear``, ``mlp-d2-w256``, ``bcos-d2-b2.5-pooled``."""
        return head_label(self.model_dump(exclude_none=True))


def head_options(head: dict[str, Any]) -> dict[str, Any]:
    """A trial's head config -> keyword arguments for ``probing.heads.create_head`` (``bcos_b`` is ``b``)."""
    return {{"bcos_b": "b"}.get(k, k): v for k, v in head.items() if k != "type"}


def head_label(head: dict[str, Any]) -> str:
    """``{type: mlp, depth: 2, width: 256}`` -> ``mlp-d2-w256`` (tables and progress lines)."""
    marks = {"depth": "d", "width": "w", "bcos_b": "b", "max_out": "m"}

    def shown(value: Any) -> str:  # a range in a spec's head: b1..3; a drawn value: b1.23
        if isinstance(value, dict):
            return f"{value['low']:g}..{value['high']:g}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    parts = [str(head.get("type", "?"))] + [f"{m}{shown(head[k])}" for k, m in marks.items() if head.get(k) is not None]
    return "-".join(parts + ([head["input"]] if head.get("input") == "pooled" else []))


class BackboneSpec(Strict):
    """One point on the backbone axis: a registered name, or ``{name, weights, checkpoint_format}``."""

    name: _registered(BACKBONES)
    weights: str | None = None
    checkpoint_format: Literal["torchvision", "dino", "mocov2", "byol", "bcos"] | None = None

    @model_validator(mode="after")
    def _weights_exist(self) -> "BackboneSpec":
        tag = self.weights is not None and WEIGHTS_TAG.fullmatch(self.weights) and self.checkpoint_format in (None, "torchvision")
        if self.weights is not None and not tag and not Path(self.weights).expanduser().is_file():
            raise ValueError(f"weights file not found: {self.weights} (a path, or a torchvision weights tag such as IMAGENET1K_V1)")
        if (self.weights or self.checkpoint_format) and BACKBONES.get(self.name).load is None:
            raise ValueError(f"{self.name!r} is embedded (pre-trained at first use): it takes no weights")
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``probing.backbones.create_backbone``."""
        return self.model_dump(exclude={"name"}, exclude_none=True)


def _backbone_item(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class ProbeSpec(Strict):
    loss: _axis(_registered(LOSSES)) = ["ce"]
    head: _axis(HeadSpec) = [HeadSpec(type="linear")]
    # "auto": -log(C-1) for BCE probes, 0 for CE probes (REFERENCE section 2); a number is used as is.
    logit_bias: Annotated[str | float, BeforeValidator(_auto_or_number)] = "auto"


class ScheduleSpec(Strict):
    """Optimiser and schedule settings, shared by ``train`` and a recipe's ``train``."""

    batch_size: Annotated[int, Field(ge=1), at_most(65536, "one batch must fit in memory")] = 256
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    warmup_start: Annotated[float, Field(gt=0, le=1)] = 0.01  # the warm-up's first lr, as a factor of lr
    optimizer: Literal["adam", "sgd"] = "adam"  # adam: warm-up + cosine; sgd: momentum, step decay
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd
    # sgd: x0.1 at these epochs (default 60% and 80% of the epochs), or every step_every epochs (StepLR)
    milestones: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] | None = None
    step_every: Annotated[int, Field(ge=1)] | None = None


class TrainSpec(ScheduleSpec):
    epochs: Annotated[int, Field(ge=1), at_most(10_000, "the papers train 50-100; more would take days per trial")] = 10
    lr: search_axis(float, gt=0, le=1000) = 1e-3  # a value, grid values [..] or a range {low, high, log}
    weight_decay: search_axis(float, ge=0, le=1) = 0.0
    seed: _axis(int) = [0]
    augment: bool = False  # train through the backbone with augmentation each epoch (slow) instead of the cache
    feature_dtype: Literal["float32", "float16"] = "float32"  # of the feature cache
    # a checkpoint (and the MLflow write of the epochs since the last one) at most this often, and
    # after the last epoch; 0: every epoch. A resumed trial repeats at most this much training.
    checkpoint_every_s: Annotated[float, Field(ge=0)] = 5.0



def check_schedule(schedule: ScheduleSpec, epochs: int, where: str) -> None:
    """The schedule fits its optimiser, and warm-up and milestones end before the last epoch."""
    if schedule.optimizer != "sgd" and (schedule.milestones or schedule.step_every):
        raise ValueError(f"{where}optimizer: milestones and step_every schedule sgd; adam decays by cosine")
    if schedule.milestones and schedule.step_every:
        raise ValueError(f"{where}milestones: give milestones or step_every, not both")
    if schedule.milestones and sorted(set(schedule.milestones)) != schedule.milestones:
        raise ValueError(f"{where}milestones: must increase, got {schedule.milestones}")
    if schedule.warmup_epochs >= epochs:
        raise ValueError(f"{where}warmup_epochs: must be < epochs ({epochs}), got {schedule.warmup_epochs}")
    if schedule.milestones and schedule.milestones[-1] >= epochs:
        raise ValueError(f"{where}milestones: must be < epochs ({epochs}), got {schedule.milestones}")


class RecipeTrainSpec(ScheduleSpec):
    """What a recipe overrides: the schedule, and lr / weight_decay as single values."""

    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class RecipeSpec(Strict):
    """Training settings for some head types (and backbones), where the reference trains them
    differently from the rest: ``{heads: [mlp, bcos], backbones: [resnet50], train: {optimizer: sgd, lr: 30}}``.
    The first recipe that matches a trial's head type and backbone name overrides ``train`` with the
    keys it sets; a recipe without ``heads`` (``backbones``) matches every head (backbone)."""

    heads: _axis(_registered(HEADS)) | None = None
    backbones: _axis(_registered(BACKBONES)) | None = None
    train: RecipeTrainSpec

    def matches(self, head_type: str, backbone: str) -> bool:
        return (self.heads is None or head_type in self.heads) and (self.backbones is None or backbone in self.backbones)

    def overrides(self) -> dict[str, Any]:
        return self.train.model_dump(exclude_unset=True)


# union branches chosen by the value's type, so that an error names only the branch meant; the
# branch tags are left out of the YAML path
_NAMED, _PER_METHOD = "<named>", "<per method>"


class SmoothingSpec(Strict):
    """``{kind: avgpool, kernel: 5}`` or ``{kind: gaussian, kernel: 129, sigma: 32.25}``."""

    kind: Literal["none", "avgpool", "gaussian"]
    kernel: Annotated[int, Field(ge=1)] = 5
    sigma: Annotated[float, Field(gt=0)] | None = None

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd, got {v}")
        return v


class EvaluateSpec(Strict):
    methods: _axis(_registered(METHODS)) = ["ixg", "gradcam"]
    layers: _axis(Annotated[str, AfterValidator(_layer)]) = ["input", "final"]
    metrics: _axis(Literal[METRICS]) = ["gridpg"]
    grid: Annotated[int, Field(ge=2, le=4)] = 2
    n_grids: Annotated[int, Field(ge=1), at_most(100_000, "the reference scores 500; 100,000 grids take days per trial")] = 32
    # images (each with its box classes) scored by EPG
    n_images: Annotated[int, Field(ge=1), at_most(1_000_000, "more than any data set here has")] = 64
    confidence: Annotated[float, Field(gt=0, le=1)] = 0.95
    seed: int = 0
    # DiFull and DiPart explain the top-left and bottom-right cells (Rao et al.) or all cells
    di_cells: Literal["corners", "all"] = "corners"
    # a method that does not apply to a trial's model (LRP on B-cos layers): refuse the spec (error),
    # or leave the method out of those trials only (skip; the trial tags what it left out)
    refused: Literal["error", "skip"] = "error"
    # reference (the default, as How to Probe always smooths: Gaussian 129 for ixg/intgrad, 5x5
    # average pooling otherwise); none; or per method name, e.g. {ixg: {kind: gaussian, kernel: 9}}
    # (unnamed methods: none)
    smoothing: Annotated[
        Annotated[Literal["none", "reference"], Tag(_NAMED)] | Annotated[dict[str, SmoothingSpec], Tag(_PER_METHOD)],
        Discriminator(lambda v: _NAMED if isinstance(v, str) else _PER_METHOD),
    ] = "reference"

    @field_validator("smoothing")
    @classmethod
    def _smoothed_methods_exist(cls, v):
        if isinstance(v, dict):
            for name in v:
                if name not in METHODS:
                    raise ValueError(METHODS.unknown_message(name))
        return v

    def smoothing_per_method(self) -> dict[str, Smoothing]:
        """The smoothing of each evaluated method, for ``evaluation.gridpg.evaluate_gridpg``."""
        if self.smoothing == "none":
            return {}
        if self.smoothing == "reference":
            return {m: REFERENCE_SMOOTHING.get(m, REFERENCE_SMOOTHING["default"]) for m in self.methods}
        return {m: Smoothing(**s.model_dump()) for m, s in self.smoothing.items()}

    @model_validator(mode="after")
    def _some_pair(self) -> "EvaluateSpec":
        if not any(layer in METHODS.get(m).layers for m in self.methods for layer in self.layers):
            raise ValueError(f"none of the methods {self.methods} is defined at the layers {self.layers}")
        return self


class ResourcesSpec(Strict):
    cpu: Annotated[float, Field(gt=0), at_most(1024, "CPUs of one trial")] = 1.0
    gpu: Annotated[float, Field(ge=0), at_most(64, "GPUs of one trial")] = 0.0
    # times Ray restarts a failed trial from its last checkpoint (a lost node, a killed worker)
    max_failures: Annotated[int, Field(ge=0)] = 1


class TrackingSpec(Strict):
    uri: str | None = None  # default: sqlite:///<working directory>/mlflow.db
    experiment: str | None = None  # default: the sweep name

    @field_validator("experiment")
    @classmethod
    def _experiment_is_a_folder_name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "experiment name")


INTEGER_HEAD_OPTIONS = ("depth", "width", "max_out")


class SweepSpec(Strict):
    name: str
    data: DataSpec = DataSpec()
    backbones: _axis(Annotated[BackboneSpec, BeforeValidator(_backbone_item)])
    probe: ProbeSpec = ProbeSpec()
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
        if self.evaluate.smoothing == "reference" and side < kernel:
            return [
                f"evaluate.smoothing: the reference's {kernel} px Gaussian is sized for 224-448 px images; on these "
                f"{side} px maps it spreads attribution over the whole map: consider smoothing: none or a smaller kernel"
            ]
        return []

    def n_trials(self) -> int:
        """How many trials the sweep runs."""
        if self.search.algorithm == "optuna":
            return self.search.num_samples
        return len(self.trials())

    def trials(self) -> list[dict[str, Any]]:
        """The trials of grid or random search, each a dict of what varies between trials.

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
            self.trial(backbone, loss, head, seed, lr, weight_decay, rng)
            for backbone, loss, head, seed, lr, weight_decay in axes
            for _ in range(repeats)
        ]

    def trial(self, backbone, loss, head, seed, lr, weight_decay, rng: np.random.Generator) -> dict[str, Any]:
        """One trial's varying settings, ranges drawn with ``rng``."""
        head_config = {
            k: draw(v, rng, integer=k in INTEGER_HEAD_OPTIONS) for k, v in head if v is not None
        }
        train = {"lr": draw(lr, rng), "weight_decay": draw(weight_decay, rng)}
        return {
            "backbone": backbone.model_dump(exclude_none=True),
            "loss": loss,
            "head": head_config,
            "seed": seed,
            "train": train | self.recipe_overrides(head.type, backbone.name),
        }

    def recipe_overrides(self, head_type: str, backbone: str) -> dict[str, Any]:
        """The ``train`` settings of the first recipe matching the trial, or none."""
        recipe = next((r for r in self.recipes if r.matches(head_type, backbone)), None)
        return recipe.overrides() if recipe is not None else {}

    def known_metrics(self) -> list[str]:
        """The metrics every trial logs last: per-epoch ones and ``<metric>/<method>/<layer>``."""
        scores = [
            f"{metric}/{method}/{layer}"
            for metric in self.evaluate.metrics
            for method in self.evaluate.methods
            for layer in self.evaluate.layers
            if layer in METHODS.get(method).layers
        ]
        return [*EPOCH_METRICS, *scores]

    @model_validator(mode="after")
    def _schedules_fit(self) -> "SweepSpec":
        check_schedule(self.train, self.train.epochs, "train.")
        for i, recipe in enumerate(self.recipes):
            schedule = self.train.model_dump(include=set(ScheduleSpec.model_fields)) | recipe.overrides()
            check_schedule(ScheduleSpec.model_construct(**schedule), self.train.epochs, f"recipes[{i}].train.")
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
            if (metric == "epg") != multilabel:
                needs = "a data set with boxes (voc2007, coco2014)" if metric == "epg" else "single-label images for its grids"
                raise ValueError(f"evaluate.metrics: {metric!r} needs {needs}, not {self.data.dataset!r}")
        return self

    @model_validator(mode="after")
    def _search_fits(self) -> "SweepSpec":
        search, ranges = self.search, range_paths(self)
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
                raise ValueError(f"search.objectives: {metric!r} is not logged by this sweep: known are {', '.join(known)}")
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
