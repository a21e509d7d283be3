"""Where a trial computes (``train.device``), feature extraction's precision (``features.precision``),
and the spec checks that keep a GPU from idling. The CUDA tests run where a GPU is visible (the
``device`` machines) and skip elsewhere; the rest run everywhere."""

import copy

import pytest
import torch
from torch import nn

from evaluation.attribution import create_method, list_methods
from evaluation.attribution.common import model_traits
from probing.devices import check_placement, exact_float32, extraction_autocast, trial_device
from probing.embedded_backbones import tiny_bcos_resnet, tiny_resnet
from probing.features import compute_features, feature_cache_path
from probing.heads import create_head
from probing.model import ProbedModel
from sweeps.spec import SpecError, parse_spec

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a device machine)")


def _spec(**sections) -> dict:
    return {"name": "devices", "backbones": ["tiny_resnet_sup"], **sections}


def test_auto_is_the_cpu_where_no_gpu_is_visible_and_cuda_then_is_an_error_naming_what_is_seen(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray sets for a trial without GPUs
    assert trial_device("auto") == torch.device("cpu") and trial_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"train.device is cuda but this trial sees no GPU \(CUDA_VISIBLE_DEVICES=''; "):
        trial_device("cuda")
    with pytest.raises(ValueError, match="train.device: 'gpu' is not one of auto, cpu, cuda"):
        trial_device("gpu")


def test_a_module_on_two_devices_is_refused_naming_the_tensor_elsewhere():
    layer = nn.Linear(2, 2)
    check_placement(layer, torch.device("cpu"), "head")  # all on the CPU: no error
    layer.bias = nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(RuntimeError, match="head is on cpu except bias, on meta: a model must be on one device"):
        check_placement(layer, torch.device("cpu"), "head")


@pytest.mark.parametrize(
    "sections, problem",
    [
        ({"train": {"device": "cuda"}}, "train.device: cuda needs resources.gpu > 0"),
        ({"resources": {"gpu": 0.5}, "train": {"device": "cpu"}}, "resources.gpu: each trial reserves 0.5 GPU that train.device: cpu leaves idle"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu: more than one GPU must be a whole number (a fraction shares one GPU), got 1.5"),
        ({"train": {"device": "tpu"}}, "train.device: must be one of 'auto', 'cpu' or 'cuda', got 'tpu'"),
        ({"features": {"precision": "int8"}}, "features.precision: must be one of 'float32', 'bfloat16' or 'float16', got 'int8'"),
    ],
)
def test_a_placement_that_would_idle_or_miss_a_gpu_is_refused_before_anything_runs(sections, problem):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(**sections))
    assert problem in str(err.value)


def test_fractional_gpus_are_accepted_and_a_trial_reserving_several_is_warned_it_uses_one():
    shared = parse_spec(_spec(resources={"gpu": 0.25}))
    assert not any("resources.gpu" in w for w in shared.warnings())
    several = parse_spec(_spec(resources={"gpu": 2}))
    assert "resources.gpu: a trial computes on one device; the other 1 GPUs it reserves stay idle" in several.warnings()
    trial = several.trials()[0]
    assert trial.train.device == "auto" and trial.features.precision == "float32"


def test_bfloat16_extraction_is_close_to_float32_and_cached_apart_from_it():
    torch.manual_seed(0)
    backbone = tiny_resnet().eval().requires_grad_(False)
    images = torch.rand(6, 3, 32, 32)
    full = compute_features(backbone, images)
    half = compute_features(backbone, images, precision="bfloat16")
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    # autocast ran: bfloat16 rounds (8 bits of mantissa), but the features are the same up to that
    assert not torch.equal(half.float(), full)
    assert torch.allclose(half.float(), full, rtol=0.05, atol=0.05 * full.abs().max().item())
    with extraction_autocast(torch.device("cpu"), "float32"):  # float32: no autocast at all
        channels_last = backbone.preprocess(images).contiguous(memory_format=torch.channels_last)
        assert torch.equal(backbone(channels_last), full)
    # the channels-last batches give the default layout's features up to float rounding
    plain = backbone(backbone.preprocess(images))
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-6 * plain.abs().max().item())
    assert full.is_contiguous()

    class FakeSplit:
        transform, fingerprint = "center", "abc"

    paths = {p: feature_cache_path(backbone, FakeSplit(), "digits", "val", torch.float32, p) for p in ("float32", "bfloat16")}
    assert paths["float32"].name == "digits-val-center-float32-abc"  # float32 caches keep their names
    assert paths["bfloat16"].name == "digits-val-center-float32-autocast_bfloat16-abc"


@CUDA
@pytest.mark.parametrize("backbone_name", ["cnn", "bcos"])
def test_every_method_at_every_layer_gives_on_cuda_the_cpus_float64_maps(backbone_name):
    """Batched attributions on the GPU (several images and targets per call, float32, no TF32)
    equal the CPU's float64 reference within 1e-4 of the map's scale."""
    torch.manual_seed(0)
    backbone = {"cnn": tiny_resnet, "bcos": tiny_bcos_resnet}[backbone_name]()
    reference = ProbedModel(backbone, create_head("linear", backbone.out_channels, 10)).eval().requires_grad_(False).double()
    cuda = torch.device("cuda")
    on_gpu = copy.deepcopy(reference).float().to(cuda)
    images, targets = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3, 5, 7])
    cheap = {"intgrad": {"n_steps": 4}, "lime": {"num_samples": 16, "batch_size": 16}}
    for method in list_methods():
        attribution = create_method(method)
        if attribution.refusal(model_traits(reference)):
            continue
        for layer in attribution.layers:
            options = cheap.get(method, {}) | ({"probabilities": torch.sigmoid} if attribution.uses_probabilities else {})
            expected = attribution(reference, reference.preprocess(images), targets, layer=layer, **options)
            with exact_float32():
                maps = attribution(on_gpu, on_gpu.preprocess(images.float().to(cuda)), targets.to(cuda), layer=layer, **options)
            assert maps.device.type == "cuda", (method, layer)
            scale = expected.abs().max().item() + 1e-12
            assert torch.allclose(maps.double().cpu(), expected, atol=1e-4 * scale, rtol=0), (method, layer)


@CUDA
def test_a_trial_trains_explains_and_scores_on_the_gpu_as_on_the_cpu(tmp_path, monkeypatch):
    """A short demo trial on ``train.device: cuda``: every activation of the backbone and the head
    is on the GPU, and accuracy and scores are those of the same trial on the CPU up to rounding."""
    import sweeps.trial
    from sweeps.folder_tracker import FolderTracker
    from sweeps.spec import DEMO_SPEC, load_spec
    from sweeps.trial import run_trial

    devices, trial_inputs = set(), sweeps.trial.trial_inputs

    def watched(config, log=print):  # record the device of every module's output
        backbone, val, loss, trainer = trial_inputs(config, log)
        for module in [*backbone.modules(), *trainer.head.modules()]:
            module.register_forward_hook(lambda m, args, out: devices.add(out.device.type) if torch.is_tensor(out) else None)
        return backbone, val, loss, trainer

    monkeypatch.setattr(sweeps.trial, "trial_inputs", watched)
    base = load_spec(DEMO_SPEC).trials()[0]
    results = {}
    for device in ("cpu", "cuda"):
        devices.clear()
        trial = base.model_copy(update={"train": base.train.model_copy(update={"device": device, "epochs": 5})})
        tracker = FolderTracker(tmp_path / device)
        results[device] = run_trial(trial, tracker)
        assert tracker.tags["device"].startswith(device) and devices == {device}
    scores = [k for k in results["cpu"] if k.startswith("gridpg/") or k.startswith("val/")]
    assert scores and {k: results["cuda"][k] for k in scores} == pytest.approx({k: results["cpu"][k] for k in scores}, abs=0.02)


def test_attribution_batches_run_without_tf32_and_the_flags_are_put_back_also_after_an_error():
    from evaluation.batching import halving_batches

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        seen = list(halving_batches(3, 2, lambda start, stop: (start, stop, flags()), "test"))
        assert seen == [(0, 2, (False, False)), (2, 3, (False, False))] and flags() == (True, True)
        with pytest.raises(KeyError):
            with exact_float32():
                raise KeyError("inside")
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
