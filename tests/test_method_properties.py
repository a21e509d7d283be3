"""Properties every attribution method has, generated from the registry (a new method gets them
for free): on a standard, a B-cos and a (2-block) ViT backbone, each with a linear and a B-cos head,

- its map does not depend on what ran before it on the same model (float64, 1e-6 relative);
- it leaves the model as it found it (state dict, structure, hooks, flags), also when it raises;
- a model it does not apply to is refused with a clear message;
- the B-cos explanation is x * d(logit)/dx taken in explanation mode, after any other method.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from evaluation.attribution import create_method, list_methods
from evaluation.attribution.common import model_traits
from probing.embedded_backbones import tiny_bcos_resnet, tiny_resnet
from probing.heads import create_head
from probing.model import ProbedModel
from probing.zoo import staged_backbone

# cheap settings for the expensive methods (their defaults are tested against references elsewhere)
CHEAP = {"intgrad": {"n_steps": 4}, "lime": {"num_samples": 16, "batch_size": 16}, "scorecam": {"internal_batch_size": 64}, "rise": {"n_masks": 16}}
def _small_vit():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    return staged_backbone("vit_small", vit)


BACKBONES = {"cnn": tiny_resnet, "bcos": tiny_bcos_resnet, "vit": _small_vit}
HEADS = {"linear": {}, "bcos": {"depth": 2, "width": 8}}
MODELS = [f"{b}+{h}" for b in BACKBONES for h in HEADS]
PAIRS = [(m, layer) for m in list_methods() for layer in create_method(m).layers]


def _model(name: str) -> ProbedModel:
    backbone_name, head_name = name.split("+")
    torch.manual_seed(0)
    backbone = BACKBONES[backbone_name]()
    with torch.no_grad():
        for module in backbone.modules():  # statistics as after training, so that merging BatchNorm matters
            if isinstance(module, nn.BatchNorm2d) and module.running_var is not None:
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    head = create_head(head_name, backbone.out_channels, 10, logit_bias=-0.5, **HEADS[head_name])
    return ProbedModel(backbone, head).double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return images.repeat_interleave(2, dim=0), torch.tensor([1, 4, 7, 2])  # two targets per image, as grids


def _run(model, pair, inputs, **extra):
    method, layer = pair
    images, targets = inputs
    options = CHEAP.get(method, {}) | extra
    if create_method(method).uses_probabilities:
        options["probabilities"] = lambda z: z.softmax(dim=1)
    return create_method(method)(model, model.preprocess(images), targets, layer=layer, **options)


def _fingerprint(model):
    """Everything a method could leave changed: values, parameter objects, structure, hooks, flags."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(d) for m in model.modules() for k, d in vars(m).items() if k.endswith("hooks") and isinstance(d, dict))
    flags = [(getattr(m, "inplace", None), getattr(m, "detach", None), m.training) for m in model.modules()]
    return state, [id(p) for p in model.parameters()], repr(model), hooks, flags


def _assert_unchanged(model, before):
    state, ids, structure, hooks, flags = _fingerprint(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], v) for k, v in before[0].items())
    assert (ids, structure, hooks, flags) == before[1:]


@pytest.mark.parametrize("name", MODELS)
def test_maps_do_not_depend_on_what_ran_before_and_the_model_is_left_as_found(name, inputs):
    model = _model(name)
    traits = model_traits(model)
    applicable = [p for p in PAIRS if not create_method(p[0]).refusal(traits)]
    before = _fingerprint(model)
    # every pair in one order on one copy, then in the reverse order on the model: a pair runs after
    # the pairs before it once and after those behind it once (the first of each order on a fresh
    # model), so whatever one pair left behind for another makes its two maps differ
    copied = copy.deepcopy(model)
    copied_before = _fingerprint(copied)
    forward = {pair: _run(copied, pair, inputs) for pair in applicable}
    for pair in applicable[::-1]:
        maps = _run(model, pair, inputs)
        scale = float(forward[pair].abs().max()) or 1.0
        torch.testing.assert_close(maps, forward[pair], rtol=1e-6, atol=1e-9 * scale, msg=f"{pair} on {name}")
        _assert_unchanged(model, before)
    _assert_unchanged(copied, copied_before)
    for pair in (p for p in PAIRS if p not in applicable):
        with pytest.raises(ValueError, match=f"method '{pair[0]}' (does not apply to models with|applies only to models with a vision transformer)"):
            _run(model, pair, inputs)
        _assert_unchanged(model, before)


def _traits(name: str) -> set[str]:
    # a B-cos backbone or head; a ViT backbone (checked by the test above)
    return ({"bcos"} if "bcos" in name else set()) | ({"vit"} if name.startswith("vit") else set())


@pytest.mark.parametrize(
    "name, method", [(n, m) for n in MODELS for m in list_methods() if not create_method(m).refusal(_traits(n))]
)
def test_a_call_that_raises_leaves_the_model_as_found(name, method, inputs):
    model = _model(name)
    assert model_traits(model) == _traits(name)
    before = _fingerprint(model)
    images, _ = inputs
    for layer in create_method(method).layers:
        with pytest.raises((RuntimeError, IndexError, ValueError)):  # class 99 of 10: fails inside the method
            _run(model, (method, layer), (images, torch.tensor([99, 99, 99, 99])))
        _assert_unchanged(model, before)


def _explanation_mode_reference(model, x, targets):
    """x * d(logit)/dx with every B-cos module's dynamic scaling detached, set by hand on a copy."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "set_explanation_mode"):
            module.set_explanation_mode(True)
    x = x.clone().requires_grad_(True)
    logits = reference(x)[torch.arange(len(x)), targets]
    return (x * torch.autograd.grad(logits.sum(), x)[0]).sum(dim=1), logits


@pytest.mark.parametrize("name", [m for m in MODELS if "bcos" in m])
def test_the_bcos_explanation_is_taken_in_explanation_mode_after_any_other_method(name, inputs):
    model = _model(name)
    images, targets = inputs
    x = model.preprocess(images)
    expected, logits = _explanation_mode_reference(model, x, targets)
    plain = create_method("ixg")(model, x, targets)  # outside explanation mode: other gradients
    assert (plain - expected).abs().max() > 1e-3 * expected.abs().max()
    for pair in PAIRS:  # everything else first, then the B-cos explanation
        if not create_method(pair[0]).refusal(model_traits(model)):
            _run(model, pair, inputs)
    maps = create_method("bcos")(model, x, targets)
    torch.testing.assert_close(maps, expected, rtol=1e-9, atol=1e-12)
    if name == "bcos+bcos":  # no bias anywhere: the contributions sum to the logit minus its bias
        torch.testing.assert_close(maps.sum(dim=(1, 2)), logits.detach() + 0.5, rtol=1e-7, atol=1e-10)
