"""The sweep spec: the shipped demo is valid; every bad spec is refused with its YAML path."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps.spec import DEMO_SPEC, SpecError, load_spec, parse_spec

DEMO = yaml.safe_load(DEMO_SPEC.read_text())
PROBESWEEP = [sys.executable, "-m", "sweeps.cli"]


def test_demo_spec_expands_to_its_grid():
    spec = load_spec(DEMO_SPEC)
    trials = spec.trials()
    assert len(trials) == 12
    assert {(t.backbone.name, t.loss, t.head.type) for t in trials} == {
        (b, loss, head)
        for b in ("tiny_resnet_sup", "tiny_resnet_ssl", "tiny_bcos_resnet")
        for loss in ("ce", "bce")
        for head in ("linear", "bcos")
    }
    assert spec.train.seed == [0] and spec.probe.logit_bias == "auto"


def test_single_values_are_one_value_axes():
    spec = parse_spec({"name": "x", "backbones": "tiny_resnet_sup", "probe": {"loss": "bce", "head": {"type": "linear"}}})
    assert [b.name for b in spec.backbones] == ["tiny_resnet_sup"] and spec.probe.loss == ["bce"] and len(spec.trials()) == 1


def _with(path: str, value):
    """The demo spec with the value at a dotted path replaced (``None`` deletes the key)."""
    data = copy.deepcopy(DEMO)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


BAD_SPECS = [
    ("name", "my sweep", "name: 'my sweep' is not a sweep name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ("backbones", None, "backbones: required"),
    (
        "backbones",
        ["resnet5"],
        "backbones[0].name: unknown backbone 'resnet5': known are bcos_resnet50, clip_resnet50, resnet18, resnet50, resnet50_byol, "
        "resnet50_dino, resnet50_mocov2, tiny_bcos_resnet, tiny_resnet_ssl, tiny_resnet_sup, tiny_vit_sup, vgg11, vgg16, "
        "vit_b_16, vit_b_16_dino, vit_s_16_dino; "
        "did you mean 'resnet50'?",
    ),
    ("backbones", [{"name": "resnet50", "weights": "/no/such.pth"}], "backbones[0]: weights file not found: /no/such.pth (a path, or a torchvision weights tag such as IMAGENET1K_V1)"),
    (
        "backbones",
        [{"name": "tiny_resnet_sup", "checkpoint_format": "dino"}],
        "backbones[0]: 'tiny_resnet_sup' is embedded (pre-trained at first use): it takes no weights",
    ),
    (
        "backbones",
        [{"name": "resnet50", "checkpoint_format": "simclr"}],
        "backbones[0].checkpoint_format: must be one of 'torchvision', 'dino', 'mocov2', 'byol', 'bcos', 'clip' or 'dino_vit', got 'simclr'",
    ),
    (
        "data.dataset",
        "imagenet",
        "data.dataset: unknown dataset 'imagenet': known are coco2014, digits, imagefolder, voc2007; "
        "did you mean 'imagefolder'?",
    ),
    ("data", {"dataset": "voc2007"}, "data: data set 'voc2007' needs root: the folder it is in"),
    ("data", {"dataset": "voc2007", "root": "/no/voc"}, "data: root not found: /no/voc"),
    ("data", {"dataset": "digits", "skip_corrupt": True}, "data: the embedded digits take no root, skip_corrupt or crop_scale (they augment by shifts)"),
    ("probe.loss", ["ce", "focal"], "probe.loss[1]: unknown loss 'focal': known are bce, bce_multilabel, bce_multilabel_uniform, ce"),
    ("probe.loss", ["bce_multilabel"], "probe.loss: 'bce_multilabel' does not fit the single-label data set 'digits'"),
    ("probe.loss", ["ce", "ce"], "probe.loss: values repeat: ['ce', 'ce']"),
    ("probe.loss", [], "probe.loss: must not be empty"),
    (
        "probe.head",
        [{"type": "linear"}, {"type": "lin"}],
        "probe.head[1].type: unknown head 'lin': known are bcos, linear, mlp; did you mean 'linear'?",
    ),
    ("probe.head", [{"type": "bcos", "depth": 0}], "probe.head[0].depth: bcos heads need depth >= 1, got 0"),
    ("probe.head", [{"type": "bcos", "bcos_b": 0.5}], "probe.head[0].bcos_b: must be >= 1, got 0.5"),
    ("probe.head", [{"type": "mlp", "bcos_b": 2}], "probe.head[0].bcos_b: applies to bcos heads only, not to 'mlp'"),
    ("probe.head", [{"type": "linear", "input": "flat"}], "probe.head[0].input: must be one of 'spatial' or 'pooled', got 'flat'"),
    ("train.optimizer", "lamb", "train.optimizer: must be one of 'adam' or 'sgd', got 'lamb'"),
    ("probe.head", [{"type": "mlp", "depth": 1}], "probe.head[0].depth: mlp heads need depth >= 2, got 1"),
    ("probe.head", [{"type": "linear", "width": 8}], "probe.head[0].width: applies to bcos and mlp heads only, not to 'linear'"),
    ("probe.head", [{"type": "mlp", "width": 0}], "probe.head[0].width: must be >= 1, got 0"),
    ("probe.head", [{"type": "mlp", "dept": 2}], "probe.head[0].dept: unknown key"),
    ("probe.logit_bias", "big", "probe.logit_bias: must be 'auto' or a finite number, got 'big'"),
    ("train.lr", -1, "train.lr: must be > 0, got -1"),
    ("train.epochs", "ten", "train.epochs: must be an integer, got 'ten'"),
    ("train.epoch", 3, "train.epoch: unknown key"),
    ("train.warmup_epochs", 30, "train.warmup_epochs: must be < epochs (30), got 30"),
    ("train.seed", [0, 1.5], "train.seed[1]: must be an integer, got 1.5"),
    ("evaluate.layers", ["input", "fc"], "evaluate.layers[1]: unknown layer 'fc': known are input, middle, final"),
    (
        "evaluate.methods",
        ["ixg", "shap"],
        "evaluate.methods[1]: unknown attribution method 'shap': known are ablationcam, attention_grad, attnlrp, bcos, cgw1, gbp, grad, "
        "gradcam, gradcampp, intgrad, ixg, layercam, lime, lrp, occlusion, rise, rollout, scorecam, vitcx",
    ),
    ("evaluate.grid", 1, "evaluate.grid: must be >= 2, got 1"),
    ("evaluate.confidence", 1.5, "evaluate.confidence: must be <= 1, got 1.5"),
    ("evaluate.metrics", ["pg"], "evaluate.metrics[0]: unknown metric 'pg': known are compactness, complexity, deletion, difull, dipart, epg, gridpg, insertion, pointing_game; did you mean 'epg'?"),
    (
        "evaluate.metrics",
        ["epg"],
        "evaluate.metrics: 'epg' needs a data set with boxes (voc2007, coco2014), not 'digits'",
    ),
    ("evaluate.smoothing", "ref", "evaluate.smoothing: must be one of 'none' or 'reference', got 'ref'"),
    (
        "evaluate.smoothing",
        {"igx": {"kind": "avgpool"}},
        "evaluate.smoothing: unknown attribution method 'igx': known are ablationcam, attention_grad, attnlrp, bcos, cgw1, gbp, grad, gradcam, gradcampp, intgrad, ixg, layercam, lime, lrp, occlusion, rise, rollout, scorecam, vitcx; did you mean 'ixg'?",
    ),
    ("evaluate.smoothing", {"ixg": {"kind": "avgpool", "kernel": 4}}, "evaluate.smoothing.ixg.kernel: must be odd, got 4"),
    ("search.algorithm", "bayes", "search.algorithm: must be one of 'grid', 'random' or 'optuna', got 'bayes'"),
    ("search.algorithm", "optuna", "search.num_samples: required for optuna search"),
    ("search.num_samples", 4, "search.num_samples: grid search runs every combination once; leave it out"),
    (
        "search",
        {"algorithm": "random", "num_samples": 2},
        "search.algorithm: random search needs a {low, high} range to draw (lists are a grid)",
    ),
    (
        "train.lr",
        {"low": 1.0e-3, "high": 0.1},
        "train.lr: a range needs search.algorithm random or optuna (grid search takes lists)",
    ),
    ("train.lr", {"low": 0.1, "high": 0.01}, "train.lr: low must be < high, got low 0.1 and high 0.01"),
    ("train.lr", {"low": 0, "high": 0.1, "log": True}, "train.lr: a log range needs low > 0, got 0"),
    ("train.lr", {"low": -1, "high": 0.1}, "train.lr: low must be > 0, got -1"),
    ("train.lr", [0.01, 0.01], "train.lr: values repeat: [0.01, 0.01]"),
    ("train.weight_decay", [0.0, -1.0], "train.weight_decay[1]: must be >= 0, got -1.0"),
    (
        "probe.head",
        [{"type": "mlp", "depth": 2, "width": {"low": 16.5, "high": 64}}],
        "probe.head[0].width: needs integer ends, got low 16.5 and high 64",
    ),
    ("probe.head", [{"type": "bcos", "bcos_b": {"low": 0.5, "high": 2}}], "probe.head[0].bcos_b: low must be >= 1, got 0.5"),
    (
        "probe.head",
        [{"type": "mlp", "depth": {"low": 1, "high": 3}}],
        "probe.head[0].depth: mlp heads need depth >= 2, got 1",
    ),
    (
        "search.objectives",
        {"gridpg/ixg/middle": "max"},
        "search.objectives: 'gridpg/ixg/middle' is not logged by this sweep: known are val/accuracy, val/loss, "
        "train/accuracy, train/loss, gridpg/ixg/input, gridpg/ixg/final, gridpg/bcos/input, gridpg/bcos/final, "
        "gridpg/gradcam/final (and each score's interval bounds, <score>/ci_low and <score>/ci_high)",
    ),
    (
        "search.objectives",
        {"val/accuracy": "maximise"},
        "search.objectives.val/accuracy: must be one of 'max' or 'min', got 'maximise'",
    ),
    ("search.objectives", {}, "search.objectives: must not be empty"),
    ("search.scheduler", {"grace_period": 30}, "search.scheduler.grace_period: must be < train.epochs (30), got 30"),
    (
        "search.scheduler",
        {"metric": "gridpg/ixg/input"},
        "search.scheduler.metric: must be one of 'val/accuracy', 'val/loss', 'train/accuracy' or 'train/loss', "
        "got 'gridpg/ixg/input'",
    ),
    ("search.max_concurrent", 0, "search.max_concurrent: must be >= 1, got 0"),
    ("resources.gpu", -1, "resources.gpu: must be >= 0, got -1"),
]


@pytest.mark.parametrize("path, value, message", BAD_SPECS, ids=[f"{p}={v}" for p, v, _ in BAD_SPECS])
def test_bad_spec_is_refused_with_its_path(path, value, message):
    with pytest.raises(SpecError) as err:
        parse_spec(_with(path, value), "bad.yaml")
    assert err.value.problems == [message]


def test_smoothing_settings_resolve_per_method():
    from evaluation.smoothing import Smoothing

    reference = parse_spec(_with("evaluate.smoothing", "reference")).evaluate
    assert reference.smoothing_per_method() == {
        "ixg": Smoothing("gaussian", 129, 129 / 4), "bcos": Smoothing("avgpool", 5), "gradcam": Smoothing("avgpool", 5)
    }
    custom = parse_spec(_with("evaluate.smoothing", {"gradcam": {"kind": "gaussian", "kernel": 9, "sigma": 2}}))
    assert custom.evaluate.smoothing_per_method() == {"gradcam": Smoothing("gaussian", 9, 2.0)}
    assert parse_spec(DEMO).evaluate.smoothing_per_method() == {}


def test_method_without_any_valid_layer():
    data = _with("evaluate.methods", ["gradcam"])
    data["evaluate"]["layers"] = ["input"]
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.problems == ["evaluate: none of the methods ['gradcam'] is defined at the layers ['input']"]


def test_every_problem_is_reported_at_once():
    data = _with("backbones", None)
    data["train"]["lr"] = 0
    data["probe"]["head"] = [{"type": "mlp", "depth": 0}]
    with pytest.raises(SpecError) as err:
        parse_spec(data, "three.yaml")
    assert err.value.problems == [
        "backbones: required",
        "probe.head[0].depth: mlp heads need depth >= 2, got 0",
        "train.lr: must be > 0, got 0",
    ]
    assert str(err.value).startswith("three.yaml: 3 problem(s)\n")


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml: 1 problem"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: 1 problem\\(s\\)\n  not valid YAML"):
        load_spec(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping of keys, got list"):
        load_spec(listing)


def _cli(*args, cwd):
    return subprocess.run([*PROBESWEEP, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_validate_reports_trials_or_problems(tmp_path):
    ok = _cli("validate", str(DEMO_SPEC), cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{DEMO_SPEC}: ok, 12 trials (grid search)"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("probe.loss", ["ce", "focal"])))
    result = _cli("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "probe.loss[1]: unknown loss 'focal': known are bce, bce_multilabel, bce_multilabel_uniform, ce" in result.stderr


def test_cli_run_with_a_bad_spec_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("train.lr", 0)))
    result = _cli("run", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "train.lr: must be > 0, got 0" in result.stderr
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["bad.yaml"]  # no mlflow.db, no ray_results


def test_random_search_draws_ranges_per_grid_point():
    data = _with("search", {"algorithm": "random", "num_samples": 3, "seed": 7})
    data["train"]["lr"] = {"low": 1.0e-4, "high": 1.0e-1, "log": True}
    data["probe"]["head"] = [{"type": "linear"}, {"type": "mlp", "depth": {"low": 2, "high": 4}, "width": 64}]
    spec = parse_spec(data)
    trials = spec.trials()
    assert spec.n_trials() == len(trials) == 3 * 2 * 2 * 3  # backbones x losses x heads x draws
    lrs = [t.train.lr for t in trials]
    assert all(1.0e-4 <= lr <= 1.0e-1 for lr in lrs) and len(set(lrs)) == len(lrs)
    depths = {t.head.depth for t in trials if t.head.type == "mlp"}
    assert depths <= {2, 3, 4} and all(isinstance(d, int) for d in depths)
    assert trials == parse_spec(data).trials()  # seeded: the same sweep twice
    assert trials != parse_spec({**data, "search": {**data["search"], "seed": 8}}).trials()


def test_optuna_search_counts_its_samples_and_lists_no_trials():
    data = _with("search", {"algorithm": "optuna", "num_samples": 20, "objectives": {"val/accuracy": "max", "gridpg/ixg/input": "max"}})
    data["train"]["lr"] = {"low": 1.0e-4, "high": 1.0e-1, "log": True}
    spec = parse_spec(data)
    assert spec.n_trials() == 20 and list(spec.search.objectives) == ["val/accuracy", "gridpg/ixg/input"]
    with pytest.raises(ValueError, match="chooses its trials as it runs"):
        spec.trials()


def test_environment_variables_in_a_spec(tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(
        {"name": "x", "backbones": ["tiny_resnet_sup"], "data": {"dataset": "imagefolder", "root": "${DATA_ROOT}"}}
    ))  # fmt: skip
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(SpecError) as err:
        load_spec(spec_file)
    assert err.value.problems == ["data.root: environment variable DATA_ROOT is not set"]
    monkeypatch.setenv("DATA_ROOT", str(root))
    assert load_spec(spec_file).data.root == str(root)


SHIPPED = {  # spec file -> trials it expands to
    "demo.yaml": 12,
    "imagenet_how_to_probe.yaml": 60,
    "voc2007_epg.yaml": 8,
    "coco2014_epg.yaml": 6,
    "optuna_best_explained.yaml": 24,
    "vit_methods.yaml": 18,
}


@pytest.fixture()
def shipped_environment(tmp_path, monkeypatch):
    """The environment the shipped specs name: data roots and the checkpoints' folder."""
    for name in ("IMAGENET_ROOT", "VOC_ROOT", "COCO_ROOT", "WEIGHTS_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    checkpoints = ("dino_resnet50_pretrain.pth", "moco_v2_800ep_pretrain.pth.tar", "byol_r50.pth", "RN50.pt", "bcos_resnet_50.pth")
    for checkpoint in (*checkpoints, "dino_deitsmall16_pretrain.pth", "dino_vitbase16_pretrain.pth"):
        (tmp_path / "WEIGHTS_DIR" / checkpoint).write_bytes(b"")
    return tmp_path


def test_every_shipped_spec_is_valid(shipped_environment):
    assert sorted(p.name for p in DEMO_SPEC.parent.glob("*.yaml")) == sorted(SHIPPED)
    for name, n_trials in SHIPPED.items():
        spec = load_spec(DEMO_SPEC.parent / name)
        assert spec.n_trials() == n_trials, name
    imagenet = load_spec(DEMO_SPEC.parent / "imagenet_how_to_probe.yaml")
    assert [b.name for b in imagenet.backbones] == [
        "resnet50", "resnet50_dino", "resnet50_mocov2", "resnet50_byol", "clip_resnet50", "bcos_resnet50"
    ]  # fmt: skip
    assert {"compactness", "complexity"} <= set(imagenet.evaluate.metrics)
    vit = load_spec(DEMO_SPEC.parent / "vit_methods.yaml")
    assert [b.name for b in vit.backbones] == ["vit_b_16", "vit_s_16_dino", "vit_b_16_dino"]
    assert {"rollout", "attention_grad"} <= set(vit.evaluate.methods) and {"deletion", "insertion"} <= set(vit.evaluate.metrics)
    assert imagenet.backbones[1].weights == str(shipped_environment / "WEIGHTS_DIR" / "dino_resnet50_pretrain.pth")
    assert {h.type for h in imagenet.probe.head} == {"linear", "mlp", "bcos"} and imagenet.probe.loss == ["ce", "bce"]


def test_shipped_spec_names_each_unset_variable(monkeypatch):
    for name in ("IMAGENET_ROOT", "WEIGHTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SpecError) as err:
        load_spec(DEMO_SPEC.parent / "imagenet_how_to_probe.yaml")
    assert err.value.problems == [
        "data.root: environment variable IMAGENET_ROOT is not set",
        "backbones[1].weights: environment variable WEIGHTS_DIR is not set",
        "backbones[2].weights: environment variable WEIGHTS_DIR is not set",
        "backbones[3].weights: environment variable WEIGHTS_DIR is not set",
        "backbones[4].weights: environment variable WEIGHTS_DIR is not set",
        "backbones[5].weights: environment variable WEIGHTS_DIR is not set",
    ]


BAD_SCHEDULES = [
    ("train", {"epochs": 30, "optimizer": "adam", "milestones": [10]}, "train.optimizer: milestones and step_every schedule sgd; adam decays by cosine"),
    ("train", {"epochs": 30, "optimizer": "sgd", "milestones": [10, 5]}, "train.milestones: must increase, got [10, 5]"),
    ("train", {"epochs": 30, "optimizer": "sgd", "milestones": [30]}, "train.milestones: must be < epochs (30), got [30]"),
    ("train", {"epochs": 30, "optimizer": "sgd", "milestones": [10], "step_every": 3}, "train.milestones: give milestones or step_every, not both"),
    ("train", {"epochs": 10, "warmup_epochs": 10}, "train.warmup_epochs: must be < epochs (10), got 10"),
    ("train.warmup_start", 0, "train.warmup_start: must be > 0, got 0"),
    ("recipes", [{"heads": ["bcos"], "train": {"milestones": [5]}}], "recipes[0].train.optimizer: milestones and step_every schedule sgd; adam decays by cosine"),
    ("recipes", [{"heads": ["mlpp"], "train": {"lr": 1}}], "recipes[0].heads[0]: unknown head 'mlpp': known are bcos, linear, mlp; did you mean 'mlp'?"),
    ("recipes", [{"heads": ["bcos"], "train": {"optimizer": "sgd", "milestones": [40]}}], "recipes[0].train.milestones: must be < epochs (30), got [40]"),
    ("recipes", [{"heads": ["bcos"], "train": {"lrr": 1}}], "recipes[0].train.lrr: unknown key"),
    ("data.crop_scale", [0.9, 0.5], "data.crop_scale: low must be <= high, got [0.9, 0.5]"),
    ("evaluate.di_cells", "some", "evaluate.di_cells: must be one of 'corners' or 'all', got 'some'"),
    (
        "evaluate.methods",
        ["ixg", "lrp"],
        "evaluate.methods: method 'lrp' does not apply to models with B-cos layers: zennit has no LRP rule for B-cos "
        "layers; use 'bcos' (their exact explanation) or a gradient method (backbone tiny_resnet_sup, head bcos); "
        "drop it, or set evaluate.refused: skip to leave it out of those trials only",
    ),
]


@pytest.mark.parametrize("path, value, message", BAD_SCHEDULES, ids=[f"{p}={v}" for p, v, _ in BAD_SCHEDULES])
def test_bad_schedules_recipes_and_refused_methods_are_named(path, value, message):
    with pytest.raises(SpecError) as err:
        parse_spec(_with(path, value), "bad.yaml")
    assert err.value.problems == [message]


def test_skip_leaves_a_refused_method_to_the_trials_it_applies_to():
    spec = parse_spec(_with("evaluate", {"methods": ["ixg", "lrp"], "refused": "skip", "smoothing": "none"}))
    assert spec.evaluate.methods == ["ixg", "lrp"]  # the trials leave lrp out where it is refused


def test_the_shipped_specs_train_each_probe_with_the_references_recipe(shipped_environment):
    imagenet = load_spec(DEMO_SPEC.parent / "imagenet_how_to_probe.yaml")
    assert imagenet.backbones[0].weights == "IMAGENET1K_V1"  # torchvision's V1, as the paper
    keys = ("lr", "weight_decay", "optimizer", "momentum", "warmup_epochs", "milestones")
    train = {(t.backbone.name, t.head.type, t.head.depth): t.train.model_dump(include=set(keys)) for t in imagenet.trials()}
    sgd = {"lr": 30.0, "weight_decay": 0.0, "optimizer": "sgd", "momentum": 0.9, "warmup_epochs": 0, "milestones": [60, 80]}
    adam = {"lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam", "momentum": 0.9, "warmup_epochs": 5, "milestones": None}
    for backbone in ("resnet50", "resnet50_dino", "resnet50_mocov2", "resnet50_byol", "clip_resnet50"):
        assert train[(backbone, "mlp", 2)] == train[(backbone, "bcos", 3)] == sgd
        assert train[(backbone, "linear", None)] == adam  # Adam + cosine from train:
    assert train[("bcos_resnet50", "mlp", 3)] == adam  # MLPs on the B-cos backbone: Adam
    assert imagenet.train.optimizer == "adam" and imagenet.train.warmup_epochs == 5 and imagenet.train.batch_size == 128
    for name in ("voc2007_epg.yaml", "coco2014_epg.yaml"):
        spec = load_spec(DEMO_SPEC.parent / name)
        t = spec.train
        assert (t.optimizer, t.lr, t.step_every, t.warmup_epochs, t.augment) == ("sgd", 30.0, 6, 1, True), name
        assert t.lr * t.warmup_start == pytest.approx(1e-7), name  # warm-up from 1e-7
        assert "lrp" not in spec.evaluate.methods, name


NAMES_THAT_LEAVE_THE_FOLDER = [
    (["run", "--name", "../../x"], "'../../x' is not a sweep name"),
    (["run", "--name", "a/b"], "'a/b' is not a sweep name"),
    (["resume", "../x"], "'../x' is not a sweep name"),
    (["report", "../../x"], "'../../x' is not a sweep name"),
    (["report", "it's"], "\"it's\" is not a sweep name"),
]


@pytest.mark.parametrize("args, message", NAMES_THAT_LEAVE_THE_FOLDER, ids=[" ".join(a) for a, _ in NAMES_THAT_LEAVE_THE_FOLDER])
def test_a_name_that_would_leave_the_folder_is_refused_before_anything_is_written(tmp_path, args, message):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    result = _cli(*args, cwd=work)
    rule = ": use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"
    assert result.returncode == 2 and result.stderr.strip() == message + rule
    assert "Traceback" not in result.stderr
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("a"), Path("a/b")]  # nothing written


def test_an_experiment_name_that_would_leave_the_folder_is_refused():
    with pytest.raises(SpecError) as err:
        parse_spec(_with("tracking.experiment", "../../../x"), "bad.yaml")
    assert err.value.problems == [
        "tracking.experiment: '../../../x' is not an experiment name: use up to 64 letters, digits, '_', '.', '-', "
        "starting with a letter or digit"
    ]


@pytest.mark.parametrize("args", [["report", "mini"], ["results", "mini"], ["ls"]])
def test_a_command_on_a_missing_store_creates_none_and_says_so_before_importing_mlflow(tmp_path, args):
    # the modules loaded when the CLI exits, printed by an exit handler (the CLI's exit runs them)
    code = (
        "import atexit, sys; "
        "atexit.register(lambda: print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'torch'}))); "
        "from sweeps.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "there is no MLflow store here" in result.stderr
    assert result.stdout.strip() == "[]"  # an answer in a second or two, not after MLflow's import
    assert list(tmp_path.iterdir()) == []


def test_the_searchers_saved_state_is_data_not_a_pickle(tmp_path):
    from sweeps.search import TrialList

    trials = load_spec(DEMO_SPEC).trials()
    searcher = TrialList(trials)
    searcher.suggest("t1"), searcher.suggest("t2")
    searcher.save(str(tmp_path / "state"))
    text = (tmp_path / "state").read_text()  # JSON text: loading it runs nothing
    restored = TrialList([])
    restored.restore(str(tmp_path / "state"))
    assert restored.trials == [t.model_dump() for t in trials] and restored.position == 2 and text.startswith("{")


def test_resume_refuses_a_storage_folder_others_can_write_to(tmp_path):
    from sweeps.preflight import check_private

    folder = tmp_path / "ray_results" / "sweep"
    folder.mkdir(parents=True)
    tmp_path.joinpath("ray_results").chmod(0o755)
    folder.chmod(0o700)
    check_private(folder)  # the owner's alone: fine
    folder.chmod(0o770)
    with pytest.raises(PermissionError, match=f"{folder} is writable by its group or by everyone .*chmod go-w {folder}"):
        check_private(folder)


REDACTED = [
    ("http://alice:s3cret@host:5000", "http://alice:****@host:5000"),
    ("postgresql+psycopg://ps:pw@127.0.0.1:5432/mlflow", "postgresql+psycopg://ps:****@127.0.0.1:5432/mlflow"),
    ("https://tok123@host/x", "https://****@host/x"),
    ("http://host:5000?token=abc&x=1", "http://host:5000?token=****&x=1"),
    ("https://store.example/api?Signature=zz", "https://store.example/api?Signature=****"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
]


@pytest.mark.parametrize("uri, shown", REDACTED)
def test_tracking_uris_are_shown_without_their_secrets(uri, shown):
    from sweeps.spec_files import redact_uri

    assert redact_uri(uri) == shown


def test_the_real_uri_of_a_redacted_one_comes_from_the_environment(monkeypatch):
    from sweeps.spec_files import secret_uri

    assert secret_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.delenv("PROBESWEEP_TRACKING_URI", raising=False)
    with pytest.raises(PermissionError, match=r"http://alice:\*\*\*\*@h:1 holds a secret that is never stored: set PROBESWEEP_TRACKING_URI"):
        secret_uri("http://alice:****@h:1")
    monkeypatch.setenv("PROBESWEEP_TRACKING_URI", "http://bob:x@h:1")  # another user's: refused too
    with pytest.raises(PermissionError):
        secret_uri("http://alice:****@h:1")
    monkeypatch.setenv("PROBESWEEP_TRACKING_URI", "http://alice:pw@h:1")
    assert secret_uri("http://alice:****@h:1") == "http://alice:pw@h:1"


def test_reference_smoothing_on_maps_smaller_than_its_kernel_is_warned_about():
    assert parse_spec(DEMO).warnings() == []  # the demo says smoothing: none
    small = parse_spec(_with("evaluate.smoothing", "reference"))
    assert small.warnings() == [
        "evaluate.smoothing: the reference's 129 px Gaussian is sized for 224-448 px images; on these 64 px maps it "
        "spreads attribution over the whole map: consider smoothing: none or a smaller kernel"
    ]
    data = _with("evaluate.smoothing", "reference")
    data["data"]["size"] = 128  # 2x2 grids of 128 px: 256 px maps
    assert parse_spec(data).warnings() == []


def test_an_objective_may_name_a_scores_interval_bound():
    data = copy.deepcopy(DEMO) | {"search": {"algorithm": "grid", "objectives": {"gridpg/ixg/input/ci_low": "max"}}}
    assert parse_spec(data).search.objectives == {"gridpg/ixg/input/ci_low": "max"}
    data["search"]["objectives"] = {"gridpg/ixg/input/ci_mid": "max"}
    with pytest.raises(SpecError, match="'gridpg/ixg/input/ci_mid' is not logged"):
        parse_spec(data)
