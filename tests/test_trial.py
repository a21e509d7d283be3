"""One trial without Ray: its config, ``run_trial`` and the folder tracker; what the refactor to
them kept (the same MLflow params), and a demo trial's scores on fixed weights and a fixed seed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sweeps.folder_tracker import FolderTracker
from sweeps.spec import DEMO_SPEC, load_spec
from sweeps.trial import PROBE_SETTINGS, TrialConfig, run_trial, trial_params

DATA = Path(__file__).parent / "data"
# params: logged by the code before TrialConfig (8937cd7); metrics: run_trial on the weights it
# names in data/backbones/, whatever the pre-training code is now (``made_by`` says where and how)
REFERENCE = json.loads((DATA / "demo_trial_reference.json").read_text())
# the settings added since the reference was recorded, at their defaults (the trial's device, the extraction's precision)
ADDED_PARAMS = {"train.device": "auto", "features.precision": "float32", "features.shard_rows": "1024", "train.loader_workers": "0"}


def weights_fingerprint(module) -> str:
    """SHA-256 of a module's parameters and buffers (their values, not a file's bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def test_the_trial_path_imports_neither_ray_nor_mlflow():
    code = (
        "import sys; import sweeps.spec, sweeps.trial, sweeps.folder_tracker; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'optuna'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_trial_config_is_strict_and_round_trips_through_its_dump():
    trial = load_spec(DEMO_SPEC).trials()[11]
    dumped = trial.model_dump()
    assert TrialConfig.model_validate(dumped) == trial
    assert dumped["head"] == {"type": "bcos", "depth": 2, "width": 256}  # unset options are left out
    with pytest.raises(ValidationError, match="train.lrr\n  Extra inputs are not permitted"):
        TrialConfig.model_validate({**dumped, "train": {**dumped["train"], "lrr": 0.1}})
    with pytest.raises(ValidationError, match="head.depth: a trial takes one value, not a range"):
        TrialConfig.model_validate({**dumped, "head": {**dumped["head"], "depth": {"low": 2, "high": 3}}})
    with pytest.raises(ValidationError, match="applies to bcos heads only, not to 'linear'"):
        TrialConfig.model_validate({**dumped, "head": {"type": "linear", "bcos_b": 2.0}})


def test_the_demo_trials_log_the_params_they_logged_before():
    """The MLflow param values of every demo trial are those of the code before TrialConfig (and
    the settings added since, at their defaults); the probe's own settings are now ``probe.*``."""
    trials = load_spec(DEMO_SPEC).trials()
    for index, before in REFERENCE["trials"].items():
        assert trial_params(trials[int(index)]) == _renamed(before["params"]) | ADDED_PARAMS


def _renamed(params: dict[str, str]) -> dict[str, str]:
    """The recorded params under today's names: the probe's own settings as ``probe.*``."""
    return {f"probe.{k}" if k.split(".")[0] in PROBE_SETTINGS else k: v for k, v in params.items()}


@pytest.fixture()
def trial_threads():
    """Two torch threads for the test, and the process's own count back after it: the count is
    process-wide, and a test that leaves one thread slows every test after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("index", sorted(REFERENCE["trials"]))
def test_a_demo_trial_scores_as_recorded_on_fixed_weights_and_seed(index, tmp_path, monkeypatch, trial_threads):
    """``run_trial`` with a folder tracker gives the recorded metrics (sup + CE + linear and B-cos
    backbone + BCE + B-cos MLP: 30 epochs, IxG, B-cos, Grad-CAM). The backbone's weights are the
    recorded ones, not pre-trained here: pre-training on another machine can give other weights
    (two sessions' machines pre-trained different ones), while the trial itself moved by at most
    1.8e-7 with torch's and oneDNN's vector code forced down to SSE4.1. The trial runs on two threads
    (a sweep's ``resources.cpu: 2``): the metrics were recorded on one, and two moved them by at most
    1e-7 relative (measured on both trials), at half the time."""
    from probing.backbones import create_backbone, file_digest, pretrained_weights_file

    trial = load_spec(DEMO_SPEC).trials()[int(index)]
    monkeypatch.setenv("PROBESWEEP_CACHE", str(tmp_path / "cache"))
    cached = pretrained_weights_file(trial.backbone.name)
    cached.parent.mkdir(parents=True)
    shutil.copyfile(DATA / "backbones" / REFERENCE["backbone_files"][trial.backbone.name], cached)
    cached.with_suffix(".sha256").write_text(file_digest(cached, full=True))
    recorded = REFERENCE["backbone_weights"][trial.backbone.name]
    assert weights_fingerprint(create_backbone(trial.backbone.name)) == recorded  # read, not pre-trained again
    tracker = FolderTracker(tmp_path / "run")
    results = run_trial(trial, tracker)
    recorded = REFERENCE["trials"][index]["metrics"]
    assert {k: results[k] for k in recorded} == pytest.approx(recorded, rel=1e-4, abs=1e-5)
    # what was logged: the last epoch's metrics and scores at step 30, the figures, the probe, the config
    assert {k: tracker.metrics[k][30] for k in recorded} == pytest.approx(recorded, rel=1e-4, abs=1e-5)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "trial_config.yaml").read_text()) == trial.model_dump()
    assert (run / "probe.pt").is_file() and (run / "aggatt" / "gridpg-ixg-input.png").is_file()
    assert tracker.tags["device"] == "cpu (cpu)"
    assert json.loads((run / "run.json").read_text())["params"] == _renamed(REFERENCE["trials"][index]["params"]) | ADDED_PARAMS


def test_probesweep_list_prints_every_registry_with_its_descriptions(capsys):
    from evaluation.attribution import METHODS, list_methods
    from evaluation.metrics import METRICS, list_metrics
    from probing.backbones import BACKBONES, list_backbones
    from sweeps.cli import run_cli

    assert run_cli(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {"datasets:", "backbones:", "heads:", "losses:", "attribution methods:", "metrics:"} <= set(lines)
    for registry, section, names in (
        (METHODS, "attribution methods:", list_methods()), (METRICS, "metrics:", list_metrics()),
        (BACKBONES, "backbones:", list_backbones()),
    ):  # fmt: skip
        start = lines.index(section) + 1
        entries = lines[start : start + len(names)]
        assert [line.split(None, 1)[0] for line in entries] == names
        for name, line in zip(names, entries):
            assert line.split(None, 1)[1] == registry.description(name) != "", name
    assert list_metrics() == ["compactness", "complexity", "deletion", "difull", "dipart", "epg", "gridpg", "insertion", "pointing_game"] and "tiny_resnet_sup" in list_backbones()


def test_an_optuna_trial_is_a_trial_config_with_values_drawn_from_the_ranges():
    """Optuna's define-by-run space (with a range inside a head) gives a whole TrialConfig, and the
    trainable reads it back with Optuna's own ``search`` record beside it."""
    import optuna

    from sweeps.search import OptunaSpace
    from sweeps.spec import parse_spec
    from sweeps.trainable import RUNTIME_KEY, SEARCH_KEY

    spec = parse_spec({
        "name": "o", "backbones": ["tiny_resnet_sup"],
        "probe": {"loss": ["ce", "bce"], "head": [{"type": "bcos", "depth": 1, "bcos_b": {"low": 1.0, "high": 2.5}}]},
        "train": {"lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True}},
        "search": {"algorithm": "optuna", "num_samples": 3, "objectives": {"val/accuracy": "max"}},
    })  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        ask = study.ask()
        config = OptunaSpace(spec)(ask)
        trial = TrialConfig.model_validate({k: v for k, v in config.items() if k not in (RUNTIME_KEY, SEARCH_KEY)})
        assert 1.0 <= trial.head.bcos_b <= 2.5 and 1.0e-3 <= trial.train.lr <= 3.0e-2 and trial.loss in ("ce", "bce")
        assert trial.head.bcos_b == ask.params["search/bcos-d1.bcos_b"] and trial.train.lr == ask.params["search/lr"]
