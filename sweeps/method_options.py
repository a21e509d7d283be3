"""``evaluate.method_options``: keyword arguments of attribution methods, set in a spec and swept.

``{intgrad: {n_steps: 50}, lrp: {gamma: [0.1, 0.25, 0.5]}, rise: {n_masks: 2000}}``. Each option
is a parameter of the method's own function (unknown ones get the closest name), of the type of
its default. A value is one value, a list (grid values: grid and random search run each) or a
range ``{low, high, log}`` (random search draws it; Optuna searches both). A trial logs its values as the params
``method.<name>.<option>``.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Iterator

import numpy as np

from evaluation.attribution import METHODS
from probing.registry import unknown_name
from sweeps.space import Range, draw

__all__ = ["PARAM_PREFIX", "check_method_options", "integer_method_option", "method_option_choices", "option_axes", "tunable_options"]

PARAM_PREFIX = "method."  # MLflow params: method.<name>.<option>
# what the evaluator passes itself: not options
_CALL_SHAPE = ("model", "images", "targets", "layer", "activation", "probabilities")


def tunable_options(method: str) -> dict[str, Any]:
    """The options of a registered method and their defaults."""
    parameters = inspect.signature(METHODS.get(method).fn).parameters
    return {name: p.default for name, p in parameters.items() if name not in _CALL_SHAPE and p.default is not inspect.Parameter.empty}


def _check_value(where: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if isinstance(value, dict):
        try:
            value = Range.model_validate(value)
        except ValueError as err:
            raise ValueError(f"{where}: a range is {{low, high, log}} ({err.errors()[0]['msg']})") from None
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: a list of grid values needs at least one value")
        return [_check_value(f"{where}[{i}]", v, default) for i, v in enumerate(value)]
    if isinstance(value, Range):
        if kind not in (int, float):  # type(True) is bool: refused too
            raise ValueError(f"{where}: a range needs a number option, this one is {kind.__name__}")
        if kind is int and not (float(value.low).is_integer() and float(value.high).is_integer()):
            raise ValueError(f"{where}: needs integer ends, got low {value.low:g} and high {value.high:g}")
        return value
    if kind is float and type(value) is int:
        return float(value)
    if default is not None and type(value) is not kind:
        raise ValueError(f"{where}: must be {kind.__name__} (its default is {default!r}), got {value!r}")
    return value


def check_method_options(options: dict[str, dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """The options, checked against each evaluated method's signature: a one-line error naming
    ``<method>.<option>`` and the closest name otherwise (the caller adds the YAML path)."""
    for method, chosen in options.items():
        if method not in METHODS:
            raise ValueError(METHODS.unknown_message(method))
        if method not in methods:
            raise ValueError(f"{method}: not in evaluate.methods {methods}")
        known = tunable_options(method)
        for option, value in chosen.items():
            if option not in known:
                raise ValueError(unknown_name(f"option of {method}", option, known))
            chosen[option] = _check_value(f"{method}.{option}", value, known[option])
    return options


def integer_method_option(method: str, option: str) -> bool:
    """The option takes integers (its default is an int, not a bool): ranges draw integers."""
    default = tunable_options(method)[option]
    return isinstance(default, int) and not isinstance(default, bool)


def method_option_choices(options: dict[str, dict[str, Any]], rng: np.random.Generator) -> Iterator[dict[str, dict[str, Any]]]:
    """Every combination of the options' grid values (lists), ranges drawn with ``rng``: the
    concrete options of the trials of one point of the rest of the grid."""
    keys = [(m, o) for m, chosen in options.items() for o in chosen]
    axes = [v if isinstance(v, list) else [v] for v in (options[m][o] for m, o in keys)]
    for values in itertools.product(*axes):
        out: dict[str, dict[str, Any]] = {m: {} for m in options}
        for (method, option), value in zip(keys, values):
            out[method][option] = draw(value, rng, integer=integer_method_option(method, option))
        yield out


def option_axes(options: dict[str, dict[str, Any]], kinds: tuple[type, ...] = (list, Range)) -> list[str]:
    """``evaluate.method_options.<method>.<option>`` of every option given as one of ``kinds``
    (default: grid values or a range)."""
    return [f"evaluate.method_options.{m}.{o}" for m, chosen in options.items() for o, v in chosen.items() if isinstance(v, kinds)]
