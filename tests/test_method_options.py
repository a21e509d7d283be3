"""Method options from a spec (evaluate.method_options): checked against each method's own
signature, swept as grid values and ranges, logged as method.<name>.<option>, and used by a trial."""

import copy
import json

import pytest
import yaml

from sweeps.folder_tracker import FolderTracker
from sweeps.method_options import tunable_options
from sweeps.spec import DEMO_SPEC, SpecError, parse_spec
from sweeps.trial import run_trial, trial_params

DEMO = yaml.safe_load(DEMO_SPEC.read_text())


def _spec(options, methods=("ixg", "intgrad", "gradcam"), **search):
    data = copy.deepcopy(DEMO)
    data["evaluate"] |= {"methods": list(methods), "method_options": options}
    data["search"]["objectives"] = {"val/accuracy": "max", f"gridpg/{methods[-1]}/final": "max"}
    if search:
        data["search"] = data["search"] | search
    return parse_spec(data)


def test_the_options_of_a_method_are_its_own_keyword_arguments():
    assert tunable_options("intgrad")["n_steps"] == 50 and tunable_options("gradcam") == {"relu": True}
    assert "probabilities" not in tunable_options("lime") and "activation" not in tunable_options("ixg")


@pytest.mark.parametrize("options, message", [
    ({"intgrad": {"n_step": 8}}, "evaluate.method_options: unknown option of intgrad 'n_step': known are n_steps, "
                                  "internal_batch_size; did you mean 'n_steps'?"),
    ({"intgrd": {"n_steps": 8}}, "evaluate.method_options: unknown attribution method 'intgrd'"),
    ({"lime": {"num_samples": 8}}, "evaluate.method_options: lime: not in evaluate.methods ['ixg', 'intgrad', 'gradcam']"),
    ({"intgrad": {"n_steps": "many"}}, "evaluate.method_options: intgrad.n_steps: must be int (its default is 50), got 'many'"),
    ({"gradcam": {"relu": {"low": 0, "high": 1}}}, "evaluate.method_options: gradcam.relu: a range needs a number option, this one is bool"),
    ({"intgrad": {"n_steps": {"low": 4, "high": 8.5}}}, "evaluate.method_options: intgrad.n_steps: needs integer ends, got low 4 and high 8.5"),
])  # fmt: skip
def test_a_bad_option_is_one_line_with_its_path_and_the_closest_name(options, message):
    with pytest.raises(SpecError) as err:
        _spec(options)
    (problem,) = err.value.problems
    assert problem.startswith(message), problem


def test_grid_values_are_an_axis_of_the_sweep_and_logged_as_method_params():
    plain = _spec({})
    spec = _spec({"intgrad": {"n_steps": [8, 16]}, "gradcam": {"relu": False}})
    trials = spec.trials()
    assert len(trials) == 2 * len(plain.trials())
    assert [t.evaluate.method_options for t in trials[:2]] == [
        {"intgrad": {"n_steps": 8}, "gradcam": {"relu": False}}, {"intgrad": {"n_steps": 16}, "gradcam": {"relu": False}}
    ]  # fmt: skip
    params = trial_params(trials[1])
    assert params["method.intgrad.n_steps"] == "16" and params["method.gradcam.relu"] == "False"
    assert not any(k.startswith("evaluate.method_options") for k in params)
    assert not any(k.startswith("method.") for k in trial_params(plain.trials()[0]))  # none given: no param


def test_a_range_is_drawn_by_random_search_and_refused_by_grid_search():
    with pytest.raises(SpecError, match="evaluate.method_options.intgrad.n_steps: a range needs search.algorithm random or optuna"):
        _spec({"intgrad": {"n_steps": {"low": 4, "high": 64, "log": True}}})
    spec = _spec({"intgrad": {"n_steps": {"low": 4, "high": 64, "log": True}}}, algorithm="random", num_samples=3)
    drawn = [t.evaluate.method_options["intgrad"]["n_steps"] for t in spec.trials()]
    assert len(drawn) == 3 * 12 and all(isinstance(n, int) and 4 <= n <= 64 for n in drawn) and len(set(drawn)) > 3



def test_optuna_searches_the_options_lists_as_choices_and_ranges_drawn():
    import optuna

    from sweeps.search import OptunaSpace
    from sweeps.trainable import RUNTIME_KEY, SEARCH_KEY
    from sweeps.trial import TrialConfig

    spec = _spec({"intgrad": {"n_steps": {"low": 4, "high": 64, "log": True}}, "gradcam": {"relu": [True, False]}},
                 algorithm="optuna", num_samples=6)  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(6):
        ask = study.ask()
        config = OptunaSpace(spec)(ask)
        trial = TrialConfig.model_validate({k: v for k, v in config.items() if k not in (RUNTIME_KEY, SEARCH_KEY)})
        options = trial.evaluate.method_options
        assert options["intgrad"]["n_steps"] == ask.params["search/method.intgrad.n_steps"] and 4 <= options["intgrad"]["n_steps"] <= 64
        assert isinstance(options["intgrad"]["n_steps"], int) and options["gradcam"]["relu"] == ask.params["search/method.gradcam.relu"]
        seen.add(options["gradcam"]["relu"])
    assert seen == {True, False}


def test_a_trial_explains_with_its_options(tmp_path):
    """Grad-CAM without its ReLU keeps negative evidence: a different GridPG score, the same probe."""
    spec = _spec({"gradcam": {"relu": [True, False]}}, methods=("gradcam",))
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 3})})
    first, second = spec.trials()[:2]
    assert first.evaluate.method_options == {"gradcam": {"relu": True}} and second.evaluate.method_options == {"gradcam": {"relu": False}}
    with_relu = run_trial(first, FolderTracker(tmp_path / "relu"))
    without = run_trial(second, FolderTracker(tmp_path / "no-relu"))
    assert with_relu["val/accuracy"] == without["val/accuracy"]
    assert with_relu["gridpg/gradcam/final"] != pytest.approx(without["gridpg/gradcam/final"], abs=1e-4)
    params = json.loads((tmp_path / "no-relu" / "run.json").read_text())["params"]
    assert params["method.gradcam.relu"] == "False"
