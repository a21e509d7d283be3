"""What a trial run's MLflow params say: its head, its factors, its name.

A trial run holds the params that set it apart (:func:`sweeps.trial.trial_params` names them:
``probe.loss``, ``probe.head.depth``, ``train.lr``, ...); those every trial of the sweep has alike
are on the sweep's parent run, once (``SweepSpec.shared_params``). :func:`run_params` puts the two
together again.
"""

from __future__ import annotations

from sweeps.settings import head_label

__all__ = ["PARENT_ONLY", "factors_of", "head_of", "run_params", "trial_run_name"]

HEAD = "probe.head."
PARENT_ONLY = ("n_trials", "objectives")  # the parent's params that describe the sweep, not a trial
# factor names of params (the rest keep their param name)
FACTOR_NAMES = {"backbone.name": "backbone", "probe.loss": "loss", "probe.seed": "seed", "evaluate.smoothing": "smoothing"}


def run_params(params: dict[str, str], shared: dict[str, str]) -> dict[str, str]:
    """A trial run's ``params`` with the sweep's ``shared`` ones (its parent run's params)."""
    return {k: v for k, v in shared.items() if k not in PARENT_ONLY} | params


def head_of(params: dict[str, str]) -> str:
    """The head label (``bcos-d2-w256``, a drawn ``bcos_b`` as ``b1.08``) of a run's ``probe.head.*`` params."""
    return head_label({k.removeprefix(HEAD): _short(v) for k, v in params.items() if k.startswith(HEAD)})


def factors_of(params: dict[str, str]) -> dict[str, str]:
    """A run's parameters as factors: ``backbone.name`` -> ``backbone``, ``probe.loss`` ->
    ``loss``, every ``probe.head.*`` -> one ``head`` (its label, ``bcos-d2-w256``),
    ``evaluate.smoothing`` -> ``smoothing``; the rest as logged."""
    return {"head": head_of(params)} | {FACTOR_NAMES.get(k, k): v for k, v in params.items() if not k.startswith(HEAD)}


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}" if any(c in value for c in ".e") else value
    except ValueError:
        return value


def trial_run_name(params: dict[str, str], shared: dict[str, str]) -> str:
    """What sets a trial apart from the sweep's others, as its run's name (``tiny_resnet_sup-bce-
    bcos-d2-w256-seed1``): backbone, loss and head label where they vary, then each other varied
    param as ``<last part of its name><value>`` (``lr0.003``); empty when nothing varies."""
    varied = {k: v for k, v in params.items() if shared.get(k) != v}
    parts = [varied[k] for k in ("backbone.name", "probe.loss") if k in varied]
    if any(k.startswith(HEAD) for k in varied):
        parts.append(head_of(params))
    parts += [
        f"{k.rsplit('.', 1)[-1]}{_short(v)}" for k, v in varied.items()
        if k not in ("backbone.name", "probe.loss") and not k.startswith(HEAD)
    ]  # fmt: skip
    return "-".join(parts)[:250]  # MLflow's limit for a run name
