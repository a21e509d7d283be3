"""Hostile input, as a user (or a fault) would give it: every case is refused with its exact
one-line message and exit code 2, before anything starts or is written (no Ray, no mlflow.db, no
ray_results), and never with a traceback. The CLI runs in-process (``sweeps.cli.run_cli``)."""

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sweeps.cli import run_cli
from sweeps.spec import DEMO_SPEC

DEMO = yaml.safe_load(DEMO_SPEC.read_text())
INF, NAN = float("inf"), float("nan")


def _with(path: str, value):
    data = copy.deepcopy(DEMO)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def _refused(args, workdir: Path, capsys, writes: bool = False) -> str:
    """Run the CLI in ``workdir``; assert exit 2, no traceback, nothing started, nothing written
    (unless ``writes``: then no trial ran); its stderr."""
    before = sorted(workdir.rglob("*"))
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        code = run_cli([str(a) for a in args])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    if writes:  # the sweep's own run exists, FAILED, and no trial ran
        from mlflow import MlflowClient

        runs = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_runs(["1"])
        assert [r.info.status for r in runs] == ["FAILED"] and "mlflow.parentRunId" not in runs[0].data.tags
    else:
        assert sorted(workdir.rglob("*")) == before  # no mlflow.db, no ray_results, no reports
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    return err


# (YAML path, value, the problem line): types, bounds, names, registries, paths, combinations
SPEC_CASES = [
    ('train.epochs', True, 'train.epochs: must be an integer, got True'),
    ('train.epochs', '10', "train.epochs: must be an integer, got '10'"),
    ('train.epochs', 10.5, 'train.epochs: must be an integer, got 10.5'),
    ('train.epochs', 0, 'train.epochs: must be >= 1, got 0'),
    ('train.epochs', -3, 'train.epochs: must be >= 1, got -3'),
    ('train.epochs', 1000000000000, 'train.epochs: must be <= 10,000 (the papers train 50-100; more would take days per trial), got 1000000000000'),
    ('train.epochs', None, 'train.epochs: must be an integer, got None'),
    ('train.lr', INF, 'train.lr: must be a finite number, got inf'),
    ('train.lr', NAN, 'train.lr: must be a finite number, got nan'),
    ('train.lr', 1e+300, 'train.lr: must be <= 1000, got 1e+300'),
    ('train.lr', True, 'train.lr: must be a number, got True'),
    ('train.lr', 'fast', "train.lr: must be a number, got 'fast'"),
    ('train.lr', [0.1, INF], 'train.lr[1]: must be a finite number, got inf'),
    ('train.lr', {'low': 0.001, 'high': INF}, 'train.lr.high: must be a finite number, got inf'),
    ('train.lr', {'low': 0.001, 'high': 100000.0}, 'train.lr: high must be <= 1000, got 100000'),
    ('train.weight_decay', 2.0, 'train.weight_decay: must be <= 1, got 2.0'),
    ('train.weight_decay', -0.1, 'train.weight_decay: must be >= 0, got -0.1'),
    ('train.batch_size', 0, 'train.batch_size: must be >= 1, got 0'),
    ('train.batch_size', 1000000000, 'train.batch_size: must be <= 65,536 (one batch must fit in memory), got 1000000000'),
    ('train.batch_size', False, 'train.batch_size: must be an integer, got False'),
    ('train.warmup_epochs', -1, 'train.warmup_epochs: must be >= 0, got -1'),
    ('train.optimizer', 'rmsprop', "train.optimizer: must be one of 'adam' or 'sgd', got 'rmsprop'"),
    ('train.momentum', 1.0, 'train.momentum: must be < 1, got 1.0'),
    ('train.momentum', -0.5, 'train.momentum: must be >= 0, got -0.5'),
    ('train.seed', 'zero', "train.seed[0]: must be an integer, got 'zero'"),
    ('train.seed', [1, 1], 'train.seed: values repeat: [1, 1]'),
    ('train.seed', [], 'train.seed: must not be empty'),
    ('train.augment', 'yes', "train.augment: must be true or false, got 'yes'"),
    ('train.feature_dtype', 'int8', "train.feature_dtype: must be one of 'float32' or 'float16', got 'int8'"),
    ('train.checkpoint_every_s', -1, 'train.checkpoint_every_s: must be >= 0, got -1'),
    ('train.checkpoint_every_s', INF, 'train.checkpoint_every_s: must be a finite number, got inf'),
    ('train.step_every', 0, 'train.step_every: must be >= 1, got 0'),
    ('train.milestones', [], 'train.milestones: must not be empty'),
    ('evaluate.n_grids', 0, 'evaluate.n_grids: must be >= 1, got 0'),
    ('evaluate.n_grids', 1000000000, 'evaluate.n_grids: must be <= 100,000 (the reference scores 500; 100,000 grids take days per trial), got 1000000000'),
    ('evaluate.n_grids', 1000000000.0, 'evaluate.n_grids: must be an integer, got 1000000000.0'),
    ('evaluate.n_images', 0, 'evaluate.n_images: must be >= 1, got 0'),
    ('evaluate.grid', 1, 'evaluate.grid: must be >= 2, got 1'),
    ('evaluate.grid', 9, 'evaluate.grid: must be <= 4, got 9'),
    ('evaluate.confidence', 0, 'evaluate.confidence: must be > 0, got 0'),
    ('evaluate.confidence', 1.5, 'evaluate.confidence: must be <= 1, got 1.5'),
    ('evaluate.confidence', NAN, 'evaluate.confidence: must be a finite number, got nan'),
    ('evaluate.methods', [], 'evaluate.methods: must not be empty'),
    ('evaluate.methods', ['ixg', 'ixg'], "evaluate.methods: values repeat: ['ixg', 'ixg']"),
    ('evaluate.methods', ['shap'], "evaluate.methods[0]: unknown attribution method 'shap': known are ablationcam, attention_grad, attnlrp, bcos, cgw1, gbp, grad, gradcam, gradcampp, intgrad, ixg, layercam, lime, lrp, occlusion, rise, rollout, scorecam, vitcx"),
    ('evaluate.layers', ['top'], "evaluate.layers[0]: unknown layer 'top': known are input, middle, final"),
    ('evaluate.metrics', ['auc'], "evaluate.metrics[0]: unknown metric 'auc': known are compactness, complexity, deletion, difull, dipart, epg, gridpg, insertion, pointing_game"),
    ('evaluate.metrics', ['epg'], "evaluate.metrics: 'epg' needs a data set with boxes (voc2007, coco2014), not 'digits'"),
    ('evaluate.seed', 1.5, 'evaluate.seed: must be an integer, got 1.5'),
    ('evaluate.smoothing', {'ixg': {'kind': 'gaussian', 'sigma': -1}}, 'evaluate.smoothing.ixg.sigma: must be > 0, got -1'),
    ('evaluate.smoothing', {'ixg': {'kind': 'gaussian', 'kernel': 0}}, 'evaluate.smoothing.ixg.kernel: must be >= 1, got 0'),
    ('evaluate.refused', 'ignore', "evaluate.refused: must be one of 'error' or 'skip', got 'ignore'"),
    ('probe.loss', [], 'probe.loss: must not be empty'),
    ('probe.loss', ['bce_multilabel'], "probe.loss: 'bce_multilabel' does not fit the single-label data set 'digits'"),
    ('probe.logit_bias', INF, "probe.logit_bias: must be 'auto' or a finite number, got inf"),
    ('probe.logit_bias', True, "probe.logit_bias: must be 'auto' or a finite number, got True"),
    ('probe.head', [{'type': 'mlp', 'depth': 1}], 'probe.head[0].depth: mlp heads need depth >= 2, got 1'),
    ('probe.head', [{'type': 'mlp', 'depth': 100}], 'probe.head[0].depth: must be <= 32, got 100'),
    ('probe.head', [{'type': 'mlp', 'width': 0}], 'probe.head[0].width: must be >= 1, got 0'),
    ('probe.head', [{'type': 'mlp', 'width': 10000000}], 'probe.head[0].width: must be <= 65536, got 10000000'),
    ('probe.head', [{'type': 'linear', 'depth': 2}], "probe.head[0].depth: applies to bcos and mlp heads only, not to 'linear'"),
    ('probe.head', [{'type': 'bcos', 'bcos_b': 0.5}], 'probe.head[0].bcos_b: must be >= 1, got 0.5'),
    ('probe.head', [{'type': 'bcos', 'max_out': 0}], 'probe.head[0].max_out: must be >= 1, got 0'),
    ('probe.head', [{'type': 'bcos', 'input': 'flat'}], "probe.head[0].input: must be one of 'spatial' or 'pooled', got 'flat'"),
    ('probe.head', [{'type': 'cnn'}], "probe.head[0].type: unknown head 'cnn': known are bcos, linear, mlp"),
    ('probe.head', [{}], 'probe.head[0].type: required'),
    ('probe.head', ['linear'], "probe.head[0]: must be a mapping of keys, got 'linear'"),
    ('probe.head', [{'type': 'mlp', 'dropout': 0.1}], 'probe.head[0].dropout: unknown key'),
    ('probe', ['ce'], "probe: must be a mapping of keys, got ['ce']"),
    ('probe.extra', 1, 'probe.extra: unknown key'),
    ('name', '', "name: '' is not a sweep name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('name', '../x', "name: '../x' is not a sweep name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('name', 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx', "name: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' is not a sweep name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('name', 42, 'name: must be text, got 42'),
    ('name', 'sweep/1', "name: 'sweep/1' is not a sweep name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('name', '.hidden', "name: '.hidden' is not a sweep name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('backbones', [], 'backbones: must not be empty'),
    ('backbones', [{'weights': '/x.pth'}], 'backbones[0].name: required'),
    ('backbones', [{'name': 'resnet50', 'checkpoint_format': 'onnx'}], "backbones[0].checkpoint_format: must be one of 'torchvision', 'dino', 'mocov2', 'byol', 'bcos', 'clip' or 'dino_vit', got 'onnx'"),
    ('backbones', [{'name': 'resnet50', 'weights': 5}], 'backbones[0].weights: must be text, got 5'),
    ('backbones', [42], 'backbones[0]: must be a mapping of keys, got 42'),
    ('backbones', ['tiny_resnet_sup', 'tiny_resnet_sup'], "backbones: values repeat: [{'name': 'tiny_resnet_sup'}, {'name': 'tiny_resnet_sup'}]"),
    ('data.dataset', 'mnist', "data.dataset: unknown dataset 'mnist': known are coco2014, digits, imagefolder, voc2007"),
    ('data.root', '/data', 'data: the embedded digits take no root, skip_corrupt or crop_scale (they augment by shifts)'),
    ('data', {'dataset': 'imagefolder'}, "data: data set 'imagefolder' needs root: the folder it is in"),
    ('data', {'dataset': 'imagefolder', 'root': '/no/such/folder'}, 'data: root not found: /no/such/folder'),
    ('data.size', 4, 'data.size: must be >= 8, got 4'),
    ('data.size', 1000000, 'data.size: must be <= 4,096 (images are resized to this side), got 1000000'),
    ('data.size', 'big', "data.size: must be an integer, got 'big'"),
    ('data.skip_corrupt', 'no', "data.skip_corrupt: must be true or false, got 'no'"),
    ('data.crop_scale', [0.5], 'data.crop_scale: must have 2 items, got 1'),
    ('data.crop_scale', [0, 1], 'data.crop_scale[0]: must be > 0, got 0'),
    ('data.crop_scale', [0.5, 2], 'data.crop_scale[1]: must be <= 1, got 2'),
    ('search.num_samples', 0, 'search.num_samples: must be >= 1, got 0'),
    ('search.objectives', {'val/acc': 'max'}, "search.objectives: 'val/acc' is not logged by this sweep: known are val/accuracy, val/loss, train/accuracy, train/loss, gridpg/ixg/input, gridpg/ixg/final, gridpg/bcos/input, gridpg/bcos/final, gridpg/gradcam/final (and each score's interval bounds, <score>/ci_low and <score>/ci_high)"),
    ('search.objectives', ['val/accuracy'], "search.objectives: must be a mapping of keys, got ['val/accuracy']"),
    ('search.max_concurrent', -1, 'search.max_concurrent: must be >= 1, got -1'),
    ('search.seed', 'x', "search.seed: must be an integer, got 'x'"),
    ('search.scheduler', {'grace_period': 0}, 'search.scheduler.grace_period: must be >= 1, got 0'),
    ('resources.cpu', 0, 'resources.cpu: must be > 0, got 0'),
    ('resources.cpu', 1000000.0, 'resources.cpu: must be <= 1,024 (CPUs of one trial), got 1000000.0'),
    ('resources.cpu', INF, 'resources.cpu: must be a finite number, got inf'),
    ('resources.gpu', 1000, 'resources.gpu: must be <= 64 (GPUs of one trial), got 1000.0'),
    ('resources.max_failures', -1, 'resources.max_failures: must be >= 0, got -1'),
    ('resources.memory', 4, 'resources.memory: unknown key'),
    ('tracking.experiment', '../../x', "tracking.experiment: '../../x' is not an experiment name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('tracking.experiment', 'a b', "tracking.experiment: 'a b' is not an experiment name: use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"),
    ('tracking.uri', 5, 'tracking.uri: must be text, got 5'),
    ('storage', ['a'], "storage: must be text, got ['a']"),
    ('recipes', {'heads': ['mlp']}, "recipes: must be a list, got {'heads': ['mlp']}"),
    ('recipes', [{'train': {'lr': INF}}], 'recipes[0].train.lr: must be a finite number, got inf'),
    ('recipes', [{'backbones': ['resnet5'], 'train': {}}], "recipes[0].backbones[0]: unknown backbone 'resnet5': known are bcos_resnet50, clip_resnet50, resnet18, resnet50, resnet50_byol, resnet50_dino, resnet50_mocov2, tiny_bcos_resnet, tiny_resnet_ssl, tiny_resnet_sup, tiny_vit_sup, vgg11, vgg16, vit_b_16, vit_b_16_dino, vit_s_16_dino; did you mean 'resnet50'?"),
    ('recipes', [{'heads': ['mlp']}], 'recipes[0].train: required'),
]


@pytest.mark.parametrize("path, value, problem", SPEC_CASES, ids=[f"{p}={v!r}"[:60] for p, v, _ in SPEC_CASES])
def test_a_bad_spec_value_is_one_line_and_starts_nothing(tmp_path, capsys, path, value, problem):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(_with(path, value)))
    assert _refused(["run", spec], tmp_path, capsys) == f"{spec}: 1 problem(s)\n  {problem}\n"


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)
SPEC_FILES = [
    ("duplicate key", "name: x\nbackbones: [tiny_resnet_sup]\ntrain:\n  lr: 0.1\n  lr: 0.2\n",
     "not valid YAML: key 'lr' is given twice, on lines 4 and 5"),
    ("alias bomb", ALIAS_BOMB, "the spec holds more than 100,000 values (YAML aliases repeat what they point to): simplify it"),
    ("nested 5,000 deep", "a: " + "[" * 5000 + "]" * 5000 + "\n", "the spec is nested deeper than 64 levels"),
    ("nested 65 deep", "a: " + "[" * 65 + "]" * 65 + "\n", "the spec is nested deeper than 64 levels"),
    ("not UTF-8", b"name: caf\xe9\n", "not UTF-8 text (byte 9): save the spec as UTF-8"),
    ("binary", b"\x00\xff\xfe\x01", "not UTF-8 text (byte 1): save the spec as UTF-8"),
    ("empty", "", "(top level): expected a mapping of keys, got NoneType"),
    ("a list", "- a\n- b\n", "(top level): expected a mapping of keys, got list"),
    ("a scalar", "just words\n", "(top level): expected a mapping of keys, got str"),
    ("a tab", "name: x\n\tbackbones: []\n", None),  # YAML's own words, with the line
    ("unclosed", "name: [x\n", None),
    ("unset variable", "name: x\nbackbones: [tiny_resnet_sup]\ndata: {dataset: imagefolder, root: \"${PROBESWEEP_NO_SUCH_VAR}\"}\n",
     "data.root: environment variable PROBESWEEP_NO_SUCH_VAR is not set"),
]


@pytest.mark.parametrize("kind, content, problem", SPEC_FILES, ids=[k for k, _, _ in SPEC_FILES])
def test_a_broken_spec_file_is_one_line_and_starts_nothing(tmp_path, capsys, kind, content, problem):
    spec = tmp_path / "bad.yaml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = _refused(["run", spec], tmp_path, capsys)
    if problem is None:
        assert err.startswith(f"{spec}: 1 problem(s)\n  not valid YAML: line ") and err.count("\n") == 2
    else:
        assert err == f"{spec}: 1 problem(s)\n  {problem}\n"


def test_a_folder_or_a_missing_file_as_spec(tmp_path, capsys):
    (tmp_path / "specs").mkdir()
    err = _refused(["validate", tmp_path / "specs"], tmp_path, capsys)
    assert err == f"{tmp_path / 'specs'}: 1 problem(s)\n  is a folder, not a spec file\n"
    assert _refused(["run", tmp_path / "no.yaml"], tmp_path, capsys) == f"{tmp_path / 'no.yaml'}: 1 problem(s)\n  file not found\n"


NAME_RULE = ": use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"
CLI_CASES = [
    (["run", "--name", "../../x"], "'../../x' is not a sweep name" + NAME_RULE),
    (["run", "--name", "a/b"], "'a/b' is not a sweep name" + NAME_RULE),
    (["run", "--name", ""], "'' is not a sweep name" + NAME_RULE),
    (["resume", "../x"], "'../x' is not a sweep name" + NAME_RULE),
    (["report", "../../x"], "'../../x' is not a sweep name" + NAME_RULE),
    (["report", "it's"], "\"it's\" is not a sweep name" + NAME_RULE),
    (["report", "mini"], "no sweep named 'mini': there is no MLflow store here ({cwd}/mlflow.db); give --tracking-uri"),
    (["resume", "gone"], "no sweep 'gone' to resume: {cwd}/ray_results/gone/probesweep.yaml does not exist"),
    (["run", "--name", "s", "--storage", "/dev/null/results"],
     "probesweep: --storage (the Ray results folder): /dev/null/results/s cannot be made, /dev/null is not a folder"),
    (["run", "--tracking-uri", "sqlite:////dev/null/db/mlflow.db"],
     "probesweep: the MLflow store's folder: /dev/null/db cannot be made, /dev/null is not a folder"),
    (["run", "--tracking-uri", "ftp://host/x"],
     "probesweep: tracking URI ftp://host/x: unknown scheme 'ftp'; use one of sqlite, file, http, https, postgresql, "
     "mysql, mssql, databricks"),
    (["run", "--tracking-uri", "mlruns"],
     "probesweep: tracking URI mlruns: unknown scheme ''; use one of sqlite, file, http, https, postgresql, mysql, "
     "mssql, databricks"),
    (["report", "s", "--tracking-uri", "http://127.0.0.1:9"],
     "probesweep: the tracking server at http://127.0.0.1:9 does not answer ([Errno 111] Connection refused) within "
     "5 s: is it running?"),
    (["run", "--tracking-uri", "http://alice:pw@127.0.0.1:9"],
     "probesweep: the tracking server at http://alice:****@127.0.0.1:9 does not answer ([Errno 111] Connection "
     "refused) within 5 s: is it running?"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_command_line_input_is_one_line_and_starts_nothing(tmp_path, capsys, args, message):
    assert _refused(args, tmp_path, capsys).strip() == message.format(cwd=tmp_path)


def test_typer_refuses_an_out_of_range_port_and_an_unknown_command(tmp_path, capsys):
    assert "Invalid value for '--port'" in _refused(["ui", "--port", "70000"], tmp_path, capsys)
    assert "No such command 'fly'" in _refused(["fly"], tmp_path, capsys)


def test_resources_this_machine_cannot_give_are_refused_before_ray_starts(tmp_path, capsys):
    spec = tmp_path / "big.yaml"
    cpus, gpus = os.cpu_count(), torch.cuda.device_count()
    spec.write_text(yaml.safe_dump(_with("resources", {"cpu": cpus + 1})))
    assert _refused(["run", spec], tmp_path, capsys).strip() == (
        f"probesweep: resources.cpu: a trial asks for {cpus + 1} CPUs; this machine has {cpus}"
    )
    spec.write_text(yaml.safe_dump(_with("resources", {"gpu": gpus + 1})))
    assert _refused(["run", spec], tmp_path, capsys).strip() == (
        f"probesweep: resources.gpu: a trial asks for {gpus + 1} GPUs; this machine has {gpus}"
    )


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROBESWEEP_DEBUG", raising=False)
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        code = run_cli(["--debug", "run", "--tracking-uri", "ftp://host/x"])
    finally:
        os.chdir(cwd)
        os.environ.pop("PROBESWEEP_DEBUG", None)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().endswith("unknown scheme 'ftp'; use one of sqlite, file, "
                                                                     "http, https, postgresql, mysql, mssql, databricks")


def _image(path: Path, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (24, 24, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


def _folder(root: Path, classes=("cat", "dog"), val_classes=None) -> Path:
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c, name in enumerate(names):
            for i in range(2):
                _image(root / split / name / f"{i}.png", seed=10 * c + i)
    return root


VOC_XML = {
    "not XML": "<annotation><size>",
    "no size": "<annotation><object><name>dog</name></object></annotation>",
    "no box": "<annotation><size><width>9</width><height>9</height></size><object><name>dog</name></object></annotation>",
}


def _voc(root: Path, xml: str) -> Path:
    voc = root / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations" / "000001.xml").write_text(xml)
    for name in ("trainval", "test"):
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("000001\n")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """resnet18 weights files: right, empty, truncated, of another architecture, one tensor of the wrong shape."""
    import torchvision

    folder = tmp_path_factory.mktemp("weights")
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, folder / "resnet18.pth")
    (folder / "empty.pth").write_bytes(b"")
    (folder / "truncated.pth").write_bytes((folder / "resnet18.pth").read_bytes()[:5000])
    torch.save(torchvision.models.squeezenet1_0().state_dict(), folder / "squeezenet.pth")  # small: 5 MB
    torch.save(state | {"layer1.0.conv1.weight": torch.zeros(64, 64, 5, 5)}, folder / "shape.pth")
    return folder


def _data_case(case: str, root: Path, weights: Path):
    """(data spec, weights file) for a case."""
    backbone = "resnet18.pth"
    if case == "one class":
        data = {"dataset": "imagefolder", "root": str(_folder(root, classes=("cat",)))}
    elif case == "a val class missing in train":
        data = {"dataset": "imagefolder", "root": str(_folder(root, val_classes=("cat", "dog", "emu")))}
    elif case == "a corrupt image":
        folder = _folder(root)
        (folder / "train" / "dog" / "1.png").write_bytes(b"\x89PNG not really")
        data = {"dataset": "imagefolder", "root": str(folder)}
    elif case == "root is a file":
        (root / "data").mkdir(parents=True)
        (root / "data" / "train").write_text("a file")
        data = {"dataset": "imagefolder", "root": str(root / "data")}
    elif case.startswith("voc: "):
        data = {"dataset": "voc2007", "root": str(_voc(root, VOC_XML[case.removeprefix("voc: ")]))}
    else:  # a weights file
        data = {"dataset": "imagefolder", "root": str(_folder(root))}
        backbone = case.removeprefix("weights: ")
    return data | {"size": 32}, weights / backbone


DATA_CASES = [
    ("one class", "data set 'imagefolder' has 1 class: a probe needs at least 2"),
    ("a val class missing in train", "{root}/val has class folders that {root}/train lacks: emu"),
    ("a corrupt image", "cannot read image {root}/train/dog/1.png: cannot identify image file '{root}/train/dog/1.png'"),
    ("root is a file", "[Errno 20] Not a directory: '{root}/data/train'"),
    ("voc: not XML", "{root}/VOC2007/Annotations/000001.xml: not valid XML (no element found: line 1, column 18)"),
    ("voc: no size", "{root}/VOC2007/Annotations/000001.xml: no <size> with <width> and <height>"),
    ("voc: no box", "{root}/VOC2007/Annotations/000001.xml: a dog object without a numeric <bndbox>"),
    ("weights: empty.pth", "cannot load checkpoint {weights}/empty.pth: the file is empty"),
    ("weights: truncated.pth", None),  # torch's own words after the file's name
    ("weights: squeezenet.pth", None),
    ("weights: shape.pth", None),
]


# an image only a decode finds is found by the extraction on Ray: a slow case
CASES = [pytest.param(c, m, id=c, marks=[pytest.mark.slow] if c == "a corrupt image" else []) for c, m in DATA_CASES]


@pytest.mark.parametrize("case, message", CASES)
def test_bad_data_and_weights_files_are_one_line_before_ray_starts(tmp_path, capsys, weights, case, message):
    work, root = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    data, weights_file = _data_case(case, root, weights)
    multilabel = data["dataset"] == "voc2007"
    spec = {
        "name": "hostile", "data": data, "backbones": [{"name": "resnet18", "weights": str(weights_file)}],
        "probe": {"loss": ["bce_multilabel" if multilabel else "ce"], "head": [{"type": "linear"}]},
        "train": {"epochs": 1},
        "evaluate": {"methods": ["ixg"], "layers": ["input"], "metrics": ["epg" if multilabel else "gridpg"]},
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # an image only a decode finds: the error comes from the extraction on the cluster, before any trial
    on_cluster = case == "a corrupt image"
    *progress, err = _refused(["run", tmp_path / "spec.yaml"], work, capsys, writes=on_cluster).strip().splitlines()
    if not on_cluster:  # before the error: only warnings and the backbones' pre-training
        assert all(line.startswith(("warning: ", "computing ", "  features")) for line in progress), progress
    if message is None:
        assert err.startswith(f"probesweep: cannot load checkpoint {weights_file}") or err.startswith(
            f"probesweep: checkpoint {weights_file} (torchvision format) does not fit the backbone: "
        )
    else:
        assert err == "probesweep: " + message.format(root=root, weights=weights)


def test_a_cluster_without_the_resources_a_trial_asks_for_is_named_at_once(monkeypatch):
    import ray

    from sweeps.preflight import check_cluster_resources
    from sweeps.spec import parse_spec

    spec = parse_spec(_with("resources", {"cpu": 8, "gpu": 1}))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # what a 2-core head reports
    lines = []
    check_cluster_resources(spec, lines.append)
    assert lines == [
        "warning: a trial asks for 8 CPUs; the cluster has 2 now: trials wait until an autoscaler adds nodes "
        "(Ctrl-C stops the sweep; resources in the spec)",
        "warning: a trial asks for 1 GPUs; the cluster has 0 now: trials wait until an autoscaler adds nodes "
        "(Ctrl-C stops the sweep; resources in the spec)",
    ]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    lines.clear()
    check_cluster_resources(spec, lines.append)
    assert lines == []
