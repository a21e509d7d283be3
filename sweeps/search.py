"""How Ray Tune chooses a sweep's trials: a fixed list (grid and random search), Optuna's TPE over
one or several objectives, and ASHA early stopping.

Every trial's config is a whole :class:`sweeps.trial.TrialConfig` (dumped: Ray passes plain
dicts), made by ``SweepSpec.trial`` from the values the searcher chose of the spec's axes
(``backbone``, ``loss``, ``head``, ``seed``, ``train.{lr, weight_decay}``, the methods' options);
``param_space`` adds
only where to log. Optuna's own choices are named ``search/...`` in its study.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.method_options import integer_method_option
from sweeps.space import Range
from sweeps.settings import head_label, integer_option
from sweeps.spec import SweepSpec
from sweeps.trial import TrialConfig

__all__ = ["TrialList", "ObjectivesSearch", "OptunaSpace", "tune_config"]

STUDY_FILE = "optuna.db"  # beside Ray's experiment state, so that a resumed sweep continues the study


class TrialList(Searcher):
    """Hands out a fixed list of trial settings in order (grid and random search); its position is
    saved with the experiment, so a resumed sweep creates no trial twice."""

    def __init__(self, trials: list[TrialConfig]):
        super().__init__()
        self.trials, self.position = [t.model_dump() for t in trials], 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.position >= len(self.trials):
            return Searcher.FINISHED
        self.position += 1
        return copy.deepcopy(self.trials[self.position - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        # JSON, not a pickle: resuming reads this file, and reading must never run code from it
        Path(checkpoint_path).write_text(json.dumps({"trials": self.trials, "position": self.position}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.trials, self.position = state["trials"], int(state["position"])


class ObjectivesSearch(OptunaSearch):
    """Optuna's search, where a trial that ends without every objective (stopped early by ASHA
    before it was explained, or a score that could not be computed) counts as pruned in the
    study instead of failing ``study.tell``."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [(result or {}).get(m) for m in metrics]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            result = None
        super().on_trial_complete(trial_id, result, error)


def _suggest(trial, name: str, value: Any, integer: bool = False) -> Any:
    """One setting for an Optuna trial: a range or list is suggested under ``name``, a value kept."""
    if isinstance(value, Range):
        if integer:
            return trial.suggest_int(name, int(value.low), int(value.high), log=value.log)
        return trial.suggest_float(name, value.low, value.high, log=value.log)
    if isinstance(value, list):
        return trial.suggest_categorical(name, value) if len(value) > 1 else value[0]
    return value


def _labels(items: list, label) -> dict[str, Any]:
    """Distinct names for categorical choices (Optuna's choices must be plain values)."""
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        name = label(item)
        out[name if name not in out else f"{name}#{i}"] = item
    return out


class OptunaSpace:
    """Optuna's define-by-run space: lists become choices, ranges are sampled (the methods' options
    too), and a head's own settings (``bcos_b``, ``depth``, ...) are only suggested when that head
    is chosen.
    (A class, not a closure: Ray pickles the searcher with the experiment state.)"""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.backbones = _labels(spec.backbones, lambda b: b.name)
        self.heads = _labels(spec.probe.head, lambda h: head_label({k: v for k, v in h if not isinstance(v, Range)}))

    def __call__(self, trial) -> dict[str, Any]:
        spec = self.spec
        backbone = _suggest(trial, "search/backbone", list(self.backbones))
        head_name = _suggest(trial, "search/head", list(self.heads))
        head_spec = self.heads[head_name]
        head = {
            k: v if k == "type" else _suggest(trial, f"search/{head_name}.{k}", v, integer=integer_option(head_spec.type, k))
            for k, v in head_spec
            if v is not None
        }
        options = {
            method: {
                option: _suggest(trial, f"search/method.{method}.{option}", value, integer=integer_method_option(method, option))
                for option, value in chosen.items()
            }
            for method, chosen in spec.evaluate.method_options.items()
        }  # fmt: skip
        return spec.trial(
            self.backbones[backbone],
            _suggest(trial, "search/loss", spec.probe.loss),
            head,
            _suggest(trial, "search/seed", spec.train.seed),
            _suggest(trial, "search/lr", spec.train.lr),
            _suggest(trial, "search/weight_decay", spec.train.weight_decay),
            options,
        ).model_dump()


def tune_config(spec: SweepSpec, folder: Path, name: str):
    """The ``TuneConfig`` of a sweep: its searcher, trial count and scheduler.

    Metric and mode stay out of ``TuneConfig`` itself: a multi-objective ``OptunaSearch`` given
    them there would silently become single-objective (REFERENCE section 7).
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    search = spec.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines would bury the progress
    if search.algorithm == "optuna":
        metrics, modes = list(search.objectives), list(search.objectives.values())
        several = len(metrics) > 1
        searcher = ObjectivesSearch(
            space=OptunaSpace(spec),
            metric=metrics if several else metrics[0],
            mode=modes if several else modes[0],
            sampler=optuna.samplers.TPESampler(seed=search.seed),
            study_name=name,
            storage=optuna.storages.RDBStorage(f"sqlite:///{folder / STUDY_FILE}"),
        )
    else:
        searcher = TrialList(spec.trials())
    if search.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
    scheduler = None
    if search.scheduler:
        asha = search.scheduler
        scheduler = ASHAScheduler(
            time_attr="epoch", metric=asha.metric, mode=asha.mode, max_t=spec.train.epochs,
            grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
        )  # fmt: skip
    # reuse_actors: a trial starts in the process of the last one that ended (no new Python, torch
    # and Ray imports per trial: seconds each on a small CPU)
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.n_trials(), reuse_actors=True)
