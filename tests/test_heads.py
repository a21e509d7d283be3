"""Heads: B-cos MLPs (formula, explanation identity, B-cos backbone), spatial vs pooled input, logit bias."""

import math

import pytest
import torch

from probing.embedded_backbones import tiny_bcos_resnet
from probing.heads import create_head, default_logit_bias, explanation_mode
from probing.losses import create_loss


def _bcos_by_hand(x: torch.Tensor, weight: torch.Tensor, b: float, max_out: int = 1) -> torch.Tensor:
    """REFERENCE section 1 for a 1x1 B-cos layer, one position at a time: x (C,), weight (O*M, C)."""
    w_hat = weight / weight.norm(dim=1, keepdim=True)
    lin = w_hat @ x
    lin = lin.view(-1, max_out).max(dim=1).values
    norm = math.sqrt(float((x**2).sum()) + 1e-6)
    if b == 1:
        return lin
    if b == 2:
        return lin * lin.abs() / norm
    return (lin / norm).abs().add(1e-6).pow(b - 1) * lin


@pytest.mark.parametrize("b, max_out", [(1.0, 1), (2.0, 1), (2.5, 1), (3.0, 2)])
def test_bcos_head_layer_follows_the_reference_formula(b, max_out):
    torch.manual_seed(0)
    head = create_head("bcos", 6, 4, depth=1, bcos_b=b, max_out=max_out).double().eval()
    features = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    weight = head.body[0].linear.weight.view(4 * max_out, 6)
    expected = torch.stack(
        [torch.stack([_bcos_by_hand(features[n, :, i, j], weight, b, max_out) for i in range(3) for j in range(3)]) for n in range(2)]
    ).mean(dim=1)
    assert torch.allclose(head(features), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("depth, b, head_input", [(1, 2.0, "spatial"), (2, 2.5, "spatial"), (3, 1.5, "pooled")])
def test_bcos_head_explanation_sums_exactly_to_the_logit(depth, b, head_input):
    torch.manual_seed(1)
    head = create_head("bcos", 16, 5, depth=depth, width=12, bcos_b=b, logit_bias=-1.5, input=head_input)
    head.train()
    head(torch.randn(64, 16, 4, 4))  # BatchNorm statistics that are not the defaults
    head.eval().double()
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    with explanation_mode(head):
        logits = head(x)
        grad, = torch.autograd.grad(logits[:, 2].sum(), x)
    contributions = x * grad
    assert torch.allclose(contributions.sum(dim=(1, 2, 3)), logits[:, 2] + 1.5, rtol=1e-9, atol=1e-9)
    # outside explanation mode the dynamic scaling is differentiated too: other contributions
    logits = head(x)
    plain, = torch.autograd.grad(logits[:, 2].sum(), x)
    assert all(m.detach is False for m in head.modules() if hasattr(m, "set_explanation_mode"))
    if b != 1:
        assert not torch.allclose(x * plain, contributions, rtol=1e-3)


def test_bcos_backbone_and_head_explain_the_6_channel_input_exactly():
    torch.manual_seed(2)
    backbone = tiny_bcos_resnet()
    head = create_head("bcos", backbone.out_channels, 10, depth=2, width=32, logit_bias=-math.log(9))
    model = torch.nn.Sequential(backbone, head).double().eval()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    x = backbone.preprocess(images).detach().requires_grad_(True)
    assert x.shape == (2, 6, 32, 32) and torch.allclose(x[:, 3:], 1 - images)
    with explanation_mode(model):
        logits = model(x)
        grad, = torch.autograd.grad(logits[:, 7].sum(), x)
    assert torch.allclose((x * grad).sum(dim=(1, 2, 3)), logits[:, 7] + math.log(9), rtol=1e-7, atol=1e-9)


def test_pooled_input_equals_spatial_for_a_linear_head_but_not_for_an_mlp():
    torch.manual_seed(3)
    features = torch.randn(4, 8, 5, 5)
    spatial, pooled = create_head("linear", 8, 3), create_head("linear", 8, 3, input="pooled")
    pooled.load_state_dict(spatial.state_dict())
    assert torch.allclose(spatial(features), pooled(features), atol=1e-6)
    spatial, pooled = (create_head("mlp", 8, 3, depth=2, width=16, input=i).eval() for i in ("spatial", "pooled"))
    pooled.load_state_dict(spatial.state_dict())
    assert not torch.allclose(spatial(features), pooled(features), atol=1e-3)
    with pytest.raises(ValueError, match="unknown head input 'flat': known are spatial, pooled"):
        create_head("linear", 8, 3, input="flat")


def test_bcos_head_has_no_bias_and_checks_its_options():
    head = create_head("bcos", 8, 3, depth=3, width=4)
    assert not any("bias" in name for name, _ in head.named_parameters())
    # the bounds are the builders' signatures (probing.heads.head_options), checked by create_head
    with pytest.raises(ValueError, match="bcos heads need bcos_b >= 1, got 0.5"):
        create_head("bcos", 8, 3, bcos_b=0.5)
    with pytest.raises(ValueError, match="bcos heads need depth >= 1, got 0"):
        create_head("bcos", 8, 3, depth=0)
    with pytest.raises(ValueError, match="mlp heads need depth >= 2, got 1"):
        create_head("mlp", 8, 3, depth=1)
    with pytest.raises(ValueError, match="mlp heads need width <= 65536, got 100000"):
        create_head("mlp", 8, 3, width=100_000)


def test_the_spec_takes_each_head_option_from_the_builders_signatures(monkeypatch):
    """HeadSpec's fields are the builders' parameters: a new head's option is a spec key, checked
    against that head's own bounds, with no second definition."""
    from typing import Annotated

    from annotated_types import Interval

    from probing.heads import HEADS, head_options
    from sweeps.settings import HeadSpec

    assert set(HeadSpec.model_fields) == {"type"} | {o for h in HEADS.names() for o in head_options(h)}
    assert head_options("bcos")["bcos_b"].ge == 1 and head_options("mlp")["depth"].ge == 2
    assert head_options("bcos")["max_out"].type is int and head_options("linear")["input"].choices == ("spatial", "pooled")

    def wide(in_channels, num_classes, logit_bias: float = 0.0, width: Annotated[int, Interval(ge=16)] = 32):
        return create_head("linear", in_channels, num_classes, logit_bias=logit_bias)

    monkeypatch.setitem(HEADS._entries, "wide", wide)
    with pytest.raises(ValueError, match="wide heads need width >= 16, got 8"):
        create_head("wide", 8, 3, width=8)
    # an option's bound that other heads do not share is named with the head type in the spec too
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="wide heads need width >= 16, got 8"):
        HeadSpec(type="wide", width=8)


def test_logit_bias_defaults_and_an_explicit_zero():
    assert default_logit_bias("bce", 10) == pytest.approx(-math.log(9))
    assert default_logit_bias("bce_multilabel", 20) == 0.0  # How to Probe: no logit bias on VOC/COCO
    assert default_logit_bias("ce", 10, "bcos") == pytest.approx(-math.log(9))
    assert default_logit_bias("ce", 10, "mlp") == 0.0
    # a configured 0.0 stays 0.0 (the reference code drops it for B-cos heads because 0.0 is falsy)
    assert create_head("bcos", 8, 3, logit_bias=0.0).logit_bias == 0.0


def test_multilabel_bce_is_plain_bce_on_multi_hot_targets():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    by_hand = -sum(
        t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z)))
        for z, t in zip(logits.flatten().tolist(), targets.flatten().tolist())
    ) / 6
    loss = create_loss("bce_multilabel")
    assert loss.multilabel and loss(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("name, options", [("linear", {}), ("mlp", {"width": 8}), ("bcos", {"width": 8})])
def test_a_probe_reloaded_from_its_state_dict_gives_the_same_logits(name, options, tmp_path):
    torch.manual_seed(0)
    head = create_head(name, 16, 5, logit_bias=-1.25, **options).eval()
    torch.save(head.state_dict(), tmp_path / "probe.pt")
    torch.manual_seed(1)
    reloaded = create_head(name, 16, 5, **options).eval()  # default bias 0: the file must carry it
    reloaded.load_state_dict(torch.load(tmp_path / "probe.pt", weights_only=True))
    features = torch.randn(3, 16, 4, 4)
    assert "logit_bias" in reloaded.state_dict()
    torch.testing.assert_close(reloaded(features), head(features))
