"""The sweep spec: one YAML file, validated into strict pydantic models before anything runs.

Lists are grid axes (``loss: [ce, bce]``); the trial space is their product. Every problem is
reported at once with its YAML path, e.g. ``probe.head[1].depth: mlp heads need depth >= 2``.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

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
from probing.datasets import DATASETS
from probing.heads import HEADS
from probing.losses import LOSSES
from probing.registry import Registry

__all__ = ["SpecError", "SweepSpec", "load_spec", "parse_spec", "DEMO_SPEC"]

DEMO_SPEC = Path(__file__).parent / "configs" / "demo.yaml"
METRICS = GRID_SETTINGS  # gridpg, difull, dipart


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
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError(f"must be 'auto' or a number, got {value!r}")


def _unique(values: list) -> list:
    if len(values) != len(set(map(str, values))):
        raise ValueError(f"values repeat: {values}")
    return values


def _axis(item_type):
    """A sweep axis: one value or a list of distinct values, at least one."""
    return Annotated[list[item_type], BeforeValidator(_as_list), Field(min_length=1), AfterValidator(_unique)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    dataset: _registered(DATASETS) = "digits"


class HeadSpec(Strict):
    """One point on the head axis: ``{type: mlp, depth: 2, width: 256}``."""

    type: _registered(HEADS)
    depth: int | None = None
    width: Annotated[int, Field(ge=1)] | None = None

    @field_validator("depth", "width")
    @classmethod
    def _options_fit_type(cls, v: int | None, info: ValidationInfo) -> int | None:
        head_type = info.data.get("type")
        if v is not None and head_type != "mlp":
            raise ValueError(f"applies to mlp heads only, not to {head_type!r}")
        if info.field_name == "depth" and v is not None and v < 2:
            raise ValueError(f"mlp heads need depth >= 2, got {v}")
        return v

    def options(self) -> dict[str, int]:
        """Keyword arguments for ``probing.heads.create_head``."""
        return {k: v for k, v in (("depth", self.depth), ("width", self.width)) if v is not None}

    def label(self) -> str:
        """Short name for tables: ``linear``, ``mlp-d2-w256``."""
        parts = [self.type] + [f"{k[0]}{v}" for k, v in self.options().items()]
        return "-".join(parts)


class ProbeSpec(Strict):
    loss: _axis(_registered(LOSSES)) = ["ce"]
    head: _axis(HeadSpec) = [HeadSpec(type="linear")]
    # "auto": -log(C-1) for BCE probes, 0 for CE probes (REFERENCE section 2); a number is used as is.
    logit_bias: Annotated[str | float, BeforeValidator(_auto_or_number)] = "auto"


class TrainSpec(Strict):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 256
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    seed: _axis(int) = [0]

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_fits(cls, v: int, info: ValidationInfo) -> int:
        epochs = info.data.get("epochs")
        if epochs is not None and v >= epochs:
            raise ValueError(f"must be < epochs ({epochs}), got {v}")
        return v


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
    n_grids: Annotated[int, Field(ge=1)] = 32
    confidence: Annotated[float, Field(gt=0, le=1)] = 0.95
    seed: int = 0
    # none; reference (Rao et al.: Gaussian 129 for ixg/intgrad, 5x5 average pooling otherwise);
    # or per method name, e.g. {ixg: {kind: gaussian, kernel: 9}} (unnamed methods: none)
    smoothing: Annotated[
        Annotated[Literal["none", "reference"], Tag(_NAMED)] | Annotated[dict[str, SmoothingSpec], Tag(_PER_METHOD)],
        Discriminator(lambda v: _NAMED if isinstance(v, str) else _PER_METHOD),
    ] = "none"

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


class SearchSpec(Strict):
    algorithm: Literal["grid"] = "grid"


class ResourcesSpec(Strict):
    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0


class TrackingSpec(Strict):
    uri: str | None = None  # default: sqlite:///<working directory>/mlflow.db
    experiment: str | None = None  # default: the sweep name


class SweepSpec(Strict):
    name: str
    data: DataSpec = DataSpec()
    backbones: _axis(_registered(BACKBONES))
    probe: ProbeSpec = ProbeSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str | None = None  # Ray results folder; default: ./ray_results

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError(f"{v!r} is not a sweep name: use up to 64 letters, digits, '_', '.', '-'")
        return v

    def trials(self) -> list[dict[str, Any]]:
        """The grid: one dict per trial over backbone x loss x head x seed."""
        axes = itertools.product(self.backbones, self.probe.loss, self.probe.head, self.train.seed)
        return [
            {"backbone": b, "loss": loss, "head": head.model_dump(exclude_none=True), "seed": seed}
            for b, loss, head, seed in axes
        ]


class SpecError(ValueError):
    """A spec failed to load or validate; ``problems`` lists ``path: message`` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        listing = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{listing}")


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "list[", "literal[", "<")):  # pydantic's internal steps
            out += f".{part}" if out else str(part)
    return out or "(top level)"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(error: dict) -> str:
    """pydantic's message in the spec's words: ``must be >= 1, got 0`` rather than ``Input should ...``."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {value!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer, got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number, got {value!r}"
    if kind == "too_short":
        return "must not be empty"
    return error["msg"].removeprefix("Value error, ")


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate already-loaded YAML; raises :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): expected a mapping of keys, got {type(data).__name__}"])
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, [f"{_yaml_path(e['loc'])}: {_message(e)}" for e in err.errors()]) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except yaml.YAMLError as err:
        raise SpecError(str(path), [f"not valid YAML: {err}"]) from None
    return parse_spec(data, str(path))
