"""Search axes of a sweep spec (values, lists of values as grid axes, ``{low, high, log}`` ranges)
and its ``search:`` section.

A range is sampled by random search (uniformly, or log-uniformly with ``log: true``) and by
Optuna; grid search refuses it. Integer settings (``depth``, ``width``) take integer ends and
draw integers.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

__all__ = [
    "EPOCH_METRICS", "Range", "SchedulerSpec", "SearchSpec", "axis_values", "draw", "range_paths", "searchable", "search_axis",
]


class Range(BaseModel):
    """``{low: 1.0e-4, high: 1.0e-1, log: true}``: both ends included."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low {self.low:g} and high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}")
        return self


# union branches chosen by the value's type; tags starting with "<" are left out of YAML paths
_VALUE, _LIST, _RANGE = "<value>", "<list>", "<range>"


def _kind(value: Any) -> str:
    if isinstance(value, (dict, Range)):
        return _RANGE
    return _LIST if isinstance(value, list) else _VALUE


def _range_within(value_type: type, bounds: dict[str, float]):
    """The value bounds applied to a range: ``gt``/``ge`` to its low end, ``le`` to its high end;
    integer settings need integer ends."""

    def check(r: Range) -> Range:
        if value_type is int and not (float(r.low).is_integer() and float(r.high).is_integer()):
            raise ValueError(f"needs integer ends, got low {r.low:g} and high {r.high:g}")
        for kind, bound in bounds.items():
            if kind == "le" and r.high > bound:
                raise ValueError(f"high must be <= {bound:g}, got {r.high:g}")
            if (kind == "gt" and r.low <= bound) or (kind == "ge" and r.low < bound):
                raise ValueError(f"low must be {'>' if kind == 'gt' else '>='} {bound:g}, got {r.low:g}")
        return r

    return check


def _distinct(values: list) -> list:
    if len(values) != len(set(map(str, values))):
        raise ValueError(f"values repeat: {values}")
    return values


def searchable(value_type: type, **bounds: float):
    """A setting that takes one value or a range: ``width: 256`` or ``width: {low: 64, high: 1024}``."""
    value = Annotated[value_type, Field(**bounds)]
    return Annotated[
        Annotated[value, Tag(_VALUE)] | Annotated[Range, AfterValidator(_range_within(value_type, bounds)), Tag(_RANGE)],
        Discriminator(_kind),
    ]


def search_axis(value_type: type, **bounds: float):
    """A setting that takes one value, a list (grid values) or a range: ``lr: [1.0e-3, 1.0e-2]``."""
    value = Annotated[value_type, Field(**bounds)]
    return Annotated[
        Annotated[value, Tag(_VALUE)]
        | Annotated[list[value], Field(min_length=1), AfterValidator(_distinct), Tag(_LIST)]
        | Annotated[Range, AfterValidator(_range_within(value_type, bounds)), Tag(_RANGE)],
        Discriminator(_kind),
    ]


def axis_values(value: Any) -> list:
    """The grid values of an axis: ``x`` -> ``[x]``, a list as is, a range as one value."""
    return value if isinstance(value, list) else [value]


def draw(value: Any, rng: np.random.Generator, integer: bool = False) -> Any:
    """A concrete value: ranges are sampled (log-uniformly with ``log``), other values kept."""
    if not isinstance(value, Range):
        return value
    low, high = (math.log(value.low), math.log(value.high)) if value.log else (value.low, value.high)
    x = float(rng.uniform(low, high))
    x = math.exp(x) if value.log else x
    return int(min(max(round(x), value.low), value.high)) if integer else x


def range_paths(node: Any, path: str = "") -> list[str]:
    """YAML paths of every range inside a validated spec (or part of one)."""
    if isinstance(node, Range):
        return [path]
    if isinstance(node, BaseModel):
        return [p for name in type(node).model_fields for p in range_paths(getattr(node, name), f"{path}.{name}".lstrip("."))]
    if isinstance(node, (list, tuple)):
        return [p for i, item in enumerate(node) for p in range_paths(item, f"{path}[{i}]")]
    return []


EPOCH_METRICS = ("val/accuracy", "val/loss", "train/accuracy", "train/loss")  # reported every epoch


class SchedulerSpec(BaseModel):
    """ASHA early stopping on one metric that every epoch reports."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    type: Literal["asha"] = "asha"
    metric: Literal[EPOCH_METRICS] = "val/accuracy"
    mode: Literal["max", "min"] = "max"
    grace_period: Annotated[int, Field(ge=1)] = 1  # epochs every trial runs before it can be stopped
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0


class SearchSpec(BaseModel):
    """How trials are chosen. grid: every combination of the lists; random: ``num_samples`` draws
    of the ranges per combination of the lists; optuna: ``num_samples`` trials chosen by TPE over
    lists (as choices) and ranges, towards the objectives (several: a Pareto front)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    # what "best" means: for the report's order and Pareto front, and what Optuna optimises
    objectives: Annotated[dict[str, Literal["max", "min"]], Field(min_length=1)] = {"val/accuracy": "max"}
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # default: as many as the resources allow
    scheduler: SchedulerSpec | None = None
