"""The sections of a sweep spec, each validated on its own: ``data``, ``backbones``, ``probe``,
``train``, ``recipes``, ``evaluate``, ``resources`` and ``tracking``.

A trial's config (:class:`sweeps.trial.TrialConfig`) is built from the same models, so every
setting has one definition from YAML to the code that uses it: the training schedule is
``probing.train.TrainConfig``, a smoothing ``evaluation.smoothing.Smoothing``, a head's options
are its builder's parameters (``probing.heads.head_options``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from evaluation.attribution import METHODS
from evaluation.metrics import METRICS
from evaluation.smoothing import REFERENCE_SMOOTHING, Smoothing
from probing.backbones import BACKBONES, LAYERS
from probing.datasets import DATASETS
from probing.devices import DEVICE_SETTINGS, Precision
from probing.features import SHARD_ROWS
from probing.heads import HEADS, head_options, shown
from probing.losses import LOSSES
from probing.registry import Registry, unknown_name
from probing.settings import Strict, at_most
from probing.train import Schedule, TrainConfig
from probing.zoo import CHECKPOINT_FORMATS, WEIGHTS_TAG
from sweeps.method_options import check_method_options
from sweeps.space import Range, draw, search_axis, searchable
from sweeps.spec_files import check_name

__all__ = [
    "BackboneSpec", "DataSpec", "EvaluateSpec", "FeaturesSpec", "HeadSpec", "ProbeSpec", "RecipeSpec", "ResourcesSpec",
    "TrackingSpec", "TrainSpec", "TrialTrain", "LogitBias", "Strict", "at_most", "check_schedule", "head_label", "integer_option", "registered",
]  # fmt: skip

def _as_list(value: Any) -> Any:
    """A single value in YAML means a one-value axis."""
    return value if isinstance(value, list) else [value]


def registered(registry: Registry):
    """A string type that must name an entry of ``registry`` (the error names the known ones)."""

    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(registry.unknown_message(name))
        return name

    return Annotated[str, AfterValidator(check)]


def _layer(name: str) -> str:
    if name not in LAYERS:
        raise ValueError(unknown_name("layer", name, LAYERS))
    return name


def _auto_or_number(value: Any) -> Any:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return value
    raise ValueError(f"must be 'auto' or a finite number, got {value!r}")


def _unique(values: list) -> list:
    shown = [v.model_dump(exclude_none=True) if isinstance(v, BaseModel) else v for v in values]
    if len(values) != len(set(map(str, shown))):
        raise ValueError(f"values repeat: {shown}")
    return values


def axis(item_type):
    """A sweep axis: one value or a list of distinct values, at least one."""
    return Annotated[list[item_type], BeforeValidator(_as_list), Field(min_length=1), AfterValidator(_unique)]


MULTILABEL_DATASETS = ("voc2007", "coco2014")  # multi-hot labels with boxes


class DataSpec(Strict):
    """``{dataset: voc2007, root: /data/VOCdevkit, size: 224}``; ``root`` for the data sets on disk."""

    dataset: registered(DATASETS) = "digits"
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


class _Head(Strict):
    """One point on the head axis: ``{type: mlp, depth: 2, width: 256}``, ``{type: bcos, depth: 2, bcos_b: 2.5}``.
    Its options are the head builders' parameters (:data:`HeadSpec` is made from their signatures)."""

    type: registered(HEADS)

    @field_validator("*")
    @classmethod
    def _options_fit_type(cls, v, info: ValidationInfo):
        head_type = info.data.get("type")
        if info.field_name == "type" or v is None or head_type is None:
            return v
        options = head_options(head_type)
        if info.field_name not in options:
            takes = [h for h in HEADS.names() if info.field_name in head_options(h)]
            raise ValueError(f"applies to {' and '.join(takes)} heads only, not to {head_type!r}")
        name = info.field_name
        # a bound that other heads taking the option do not share is named with the head type
        ends = {"low ": v.low, "high ": v.high} if isinstance(v, Range) else {"": v}
        for end, value in ends.items():
            broken = options[name].violated(value)
            bound = "ge" if broken and broken[0] == ">=" else "le"
            if broken and len({getattr(o, bound) for h in HEADS.names() for k, o in head_options(h).items() if k == name}) > 1:
                raise ValueError(f"{head_type} heads need {name} {broken[0]} {shown(broken[1])}, got {shown(value)}")
            if broken:
                raise ValueError(f"{end}must be {broken[0]} {shown(broken[1])}, got {shown(value)}")
        return v

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``probing.heads.create_head``: the head builder's own parameters."""
        return self.model_dump(exclude={"type"}, exclude_none=True)

    def drawn(self, rng) -> dict[str, Any]:
        """This head with its ranges drawn by ``rng`` (integers for its builder's integer options)."""
        return {k: v if k == "type" else draw(v, rng, integer=integer_option(self.type, k)) for k, v in self if v is not None}

    def label(self) -> str:
        """Short name for tables: ``linear``, ``mlp-d2-w256``, ``bcos-d2-b2.5-pooled``."""
        return head_label(self.model_dump(exclude_none=True))


def _head_fields() -> dict[str, Any]:
    """Every head builder's option as an optional spec field: a value or a range of it, or one of
    its choices. The bounds are the trial's head's own, checked by :class:`_Head`."""
    fields: dict[str, Any] = {}
    for name in HEADS.names():
        for option in head_options(name).values():
            kind = Literal[option.choices] if option.choices is not None else searchable(option.type)
            fields.setdefault(option.name, (kind | None, None))
    return dict(sorted(fields.items(), key=lambda item: _OPTION_ORDER.get(item[0], len(_OPTION_ORDER))))


_OPTION_ORDER = {"depth": 0, "width": 1, "bcos_b": 2, "max_out": 3, "input": 4}  # as specs write them
HeadSpec = create_model("HeadSpec", __base__=_Head, __module__=__name__, **_head_fields())


def integer_option(head_type: str, option: str) -> bool:
    """Whether the head builder's ``option`` is an integer (a range of it draws integers)."""
    return head_options(head_type)[option].type is int


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

    name: registered(BACKBONES)
    weights: str | None = None
    checkpoint_format: Literal[CHECKPOINT_FORMATS] | None = None

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


def backbone_item(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


# "auto": -log(C-1) for BCE probes, 0 for CE probes (REFERENCE section 2); a number is used as is.
LogitBias = Annotated[str | float, BeforeValidator(_auto_or_number)]


class ProbeSpec(Strict):
    loss: axis(registered(LOSSES)) = ["ce"]
    head: axis(HeadSpec) = [HeadSpec(type="linear")]
    logit_bias: LogitBias = "auto"


class TrialTrain(TrainConfig):
    """A trial's ``train``: the trainer's settings (``probing.train.TrainConfig``) and the trial's own."""

    augment: bool = False  # train through the backbone with augmentation each epoch (slow) instead of the cache
    # where the trial computes: auto is CUDA when Ray gave the trial a GPU (resources.gpu), else the CPU
    device: Literal[DEVICE_SETTINGS] = "auto"
    feature_dtype: Literal["float32", "float16"] = "float32"  # of the feature cache
    # a checkpoint (and the MLflow write of the epochs since the last one) at most this often, and
    # after the last epoch; 0: every epoch. A resumed trial repeats at most this much training.
    checkpoint_every_s: Annotated[float, Field(ge=0)] = 5.0


class FeaturesSpec(Strict):
    """How the frozen backbone computes features: autocast to ``precision`` (bfloat16 / float16
    halve a GPU's extraction time; the probe trains, and every attribution runs, in float32)."""

    precision: Precision = "float32"
    # images per cache shard: the unit an interrupted extraction loses and one cluster task computes
    shard_rows: Annotated[int, Field(ge=16), at_most(1_000_000, "a shard is read into memory by one actor")] = SHARD_ROWS


class TrainSpec(TrialTrain):
    """The spec's ``train``: a trial's, where lr and weight_decay may be axes or ranges and seed an axis."""

    lr: search_axis(float, gt=0, le=1000) = 1e-3  # a value, grid values [..] or a range {low, high, log}
    weight_decay: search_axis(float, ge=0, le=1) = 0.0
    seed: axis(int) = [0]


def check_schedule(schedule: Schedule, epochs: int, where: str) -> None:
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


class RecipeTrainSpec(Schedule):
    """What a recipe overrides: the schedule, and lr / weight_decay as single values."""

    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class RecipeSpec(Strict):
    """Training settings for some head types (and backbones), where the reference trains them
    differently from the rest: ``{heads: [mlp, bcos], backbones: [resnet50], train: {optimizer: sgd, lr: 30}}``.
    The first recipe that matches a trial's head type and backbone name overrides ``train`` with the
    keys it sets; a recipe without ``heads`` (``backbones``) matches every head (backbone)."""

    heads: axis(registered(HEADS)) | None = None
    backbones: axis(registered(BACKBONES)) | None = None
    train: RecipeTrainSpec

    def matches(self, head_type: str, backbone: str) -> bool:
        return (self.heads is None or head_type in self.heads) and (self.backbones is None or backbone in self.backbones)

    def overrides(self) -> dict[str, Any]:
        return self.train.model_dump(exclude_unset=True)


# union branches chosen by the value's type, so that an error names only the branch meant; the
# branch tags are left out of the YAML path
_NAMED, _PER_METHOD = "<named>", "<per method>"


class EvaluateSpec(Strict):
    methods: axis(registered(METHODS)) = ["ixg", "gradcam"]
    layers: axis(Annotated[str, AfterValidator(_layer)]) = ["input", "final"]
    metrics: axis(registered(METRICS)) = ["gridpg"]
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
    # keyword arguments per method, one value, grid values or a range each, e.g.
    # {intgrad: {n_steps: 50}, lrp: {gamma: [0.1, 0.25]}} (sweeps.method_options)
    method_options: dict[str, dict[str, Any]] = {}
    # reference (the default, as How to Probe always smooths: Gaussian 129 for ixg/intgrad, 5x5
    # average pooling otherwise); none; or per method name, e.g. {ixg: {kind: gaussian, kernel: 9}}
    # (unnamed methods: none)
    smoothing: Annotated[
        Annotated[Literal["none", "reference"], Tag(_NAMED)] | Annotated[dict[str, Smoothing], Tag(_PER_METHOD)],
        Discriminator(lambda v: _NAMED if isinstance(v, str) else _PER_METHOD),
    ] = "reference"

    @field_validator("method_options")
    @classmethod
    def _options_of_evaluated_methods(cls, v, info: ValidationInfo):
        return check_method_options(v, info.data.get("methods", []))

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
        return dict(self.smoothing)

    @model_validator(mode="after")
    def _some_pair(self) -> "EvaluateSpec":
        if not any(layer in METHODS.get(m).layers for m in self.methods for layer in self.layers):
            raise ValueError(f"none of the methods {self.methods} is defined at the layers {self.layers}")
        return self


class ResourcesSpec(Strict):
    cpu: Annotated[float, Field(gt=0), at_most(1024, "CPUs of one trial")] = 1.0
    # a fraction (0.25) shares one GPU among trials; more than one must be whole (Ray's rule)
    gpu: Annotated[float, Field(ge=0), at_most(64, "GPUs of one trial")] = 0.0
    # times Ray restarts a failed trial from its last checkpoint (a lost node, a killed worker)
    max_failures: Annotated[int, Field(ge=0)] = 1

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"more than one GPU must be a whole number (a fraction shares one GPU), got {v:g}")
        return v


class TrackingSpec(Strict):
    uri: str | None = None  # default: sqlite:///<working directory>/mlflow.db
    experiment: str | None = None  # default: the sweep name

    @field_validator("experiment")
    @classmethod
    def _experiment_is_a_folder_name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "experiment name")


