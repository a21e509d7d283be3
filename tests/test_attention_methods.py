"""Attention rollout and Chefer et al.'s gradient-weighted attention on a 2-block ViT, against the
formulas written out per image on the attention torch's own nn.MultiheadAttention returns."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from evaluation.attribution import create_method
from evaluation.attribution.attention import recorded_attention
from probing.heads import create_head
from probing.model import ProbedModel
from probing.zoo import staged_backbone


@pytest.fixture(scope="module")
def vit_model():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    with torch.no_grad():
        for p in vit.parameters():  # attention far from uniform
            p.add_(0.3 * torch.randn_like(p))
    backbone = staged_backbone("vit_small", vit)
    return ProbedModel(backbone, create_head("linear", backbone.out_channels, 5)).double().eval().requires_grad_(False)


def _torch_attention(model, x, targets=None):
    """Each block's attention probabilities (B, heads, T, T) from nn.MultiheadAttention itself
    (need_weights, per head), and with ``targets`` the target logits' gradients with respect to
    them: (dlogit / d attention output of head h) @ v_h^T, as attention output = A v."""
    records, queries, outputs, handles = [], [], [], []
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            def before(m, args, kwargs):
                queries.append(args[0])
                return args, kwargs | {"need_weights": True, "average_attn_weights": False}

            def after(m, args, out):
                records.append(out[1])
                outputs.append(out[0])

            handles += [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
            if targets is None:
                return [r.detach() for r in records], None
            output_grads = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), outputs)
    finally:
        for handle in handles:
            handle.remove()
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    gradients = []
    for module, query, grad in zip(blocks, queries, output_grads):
        b, t, d = query.shape
        heads = module.num_heads
        v = F.linear(query, module.in_proj_weight[2 * d :], module.in_proj_bias[2 * d :]).reshape(b, t, heads, d // heads).transpose(1, 2)
        per_head = (grad @ module.out_proj.weight).reshape(b, t, heads, d // heads).transpose(1, 2)  # d logit / d (A v)
        gradients.append((per_head @ v.transpose(-2, -1)).detach())
    return [r.detach() for r in records], gradients


def _patch_map(relevance, size):
    patches = relevance[1:, 1:].mean(dim=0)  # the patch tokens' rows: the probe pools the patch tokens
    return F.interpolate(patches.reshape(1, 1, 4, 4), size=size, mode="bilinear", align_corners=False)[0, 0]


def test_recorded_attention_equals_multihead_attention_and_puts_it_back(vit_model):
    x = vit_model.preprocess(torch.rand(3, 3, 32, 32, dtype=torch.float64))
    reference, _ = _torch_attention(vit_model, x)
    plain = vit_model(x)
    forwards = [m.forward for m in vit_model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    with recorded_attention(vit_model) as records:
        torch.testing.assert_close(vit_model(x), plain)  # the same output, computed by hand
    assert len(records) == 2 and all(torch.allclose(a, b) for a, b in zip(records, reference))
    assert [m.forward for m in vit_model.modules() if isinstance(m, torch.nn.MultiheadAttention)] == forwards
    assert not any("forward" in vars(m) for m in vit_model.modules())
    with pytest.raises(ValueError, match="no nn.MultiheadAttention"):
        with recorded_attention(torch.nn.Linear(2, 2)):
            pass


def test_rollout_equals_the_formula_per_image(vit_model):
    x = vit_model.preprocess(torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    targets = torch.tensor([0, 3, 1])
    maps = create_method("rollout")(vit_model, x, targets)
    attention, _ = _torch_attention(vit_model, x)
    for b in range(3):
        relevance = torch.eye(17, dtype=torch.float64)
        for probs in attention:
            a = (probs[b].mean(dim=0) + torch.eye(17, dtype=torch.float64)) / 2
            relevance = (a / a.sum(dim=-1, keepdim=True)) @ relevance
        torch.testing.assert_close(maps[b], _patch_map(relevance, (32, 32)))
    assert torch.equal(create_method("rollout")(vit_model, x, torch.tensor([4, 4, 4])), maps)  # class-agnostic


def test_gradient_weighted_attention_equals_chefers_rule_per_image(vit_model):
    x = vit_model.preprocess(torch.rand(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    targets = torch.tensor([0, 3, 1, 3])
    maps = create_method("attention_grad")(vit_model, x, targets)
    attention, gradients = _torch_attention(vit_model, x, targets)
    for b in range(4):
        relevance = torch.eye(17, dtype=torch.float64)
        for probs, grad in zip(attention, gradients):
            relevance = relevance + (grad[b] * probs[b]).clamp(min=0).mean(dim=0) @ relevance
        torch.testing.assert_close(maps[b], _patch_map(relevance, (32, 32)))
    other = create_method("attention_grad")(vit_model, x, torch.tensor([2, 2, 2, 2]))
    assert not torch.allclose(other, maps)  # class-specific, unlike rollout


def test_attention_methods_refuse_convolutional_models_and_other_layers(vit_model):
    from probing.embedded_backbones import tiny_resnet

    backbone = tiny_resnet()
    cnn = ProbedModel(backbone, create_head("linear", backbone.out_channels, 5)).eval()
    x = cnn.preprocess(torch.rand(1, 3, 32, 32))
    for method in ("rollout", "attention_grad", "cgw1"):
        with pytest.raises(ValueError, match=f"method '{method}' applies only to models with a vision transformer"):
            create_method(method)(cnn, x, torch.tensor([1]))
        with pytest.raises(ValueError, match="is not defined at layer 'final'"):
            create_method(method)(vit_model, vit_model.preprocess(torch.rand(1, 3, 32, 32, dtype=torch.float64)), torch.tensor([1]), layer="final")


def test_the_targets_of_one_image_share_its_forward_and_give_each_rows_own_map(vit_model):
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = vit_model.preprocess(images).repeat_interleave(3, dim=0)  # three targets per image, as a grid's
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    for method in ("rollout", "attention_grad", "cgw1"):
        shared = create_method(method)(vit_model, x, targets)
        alone = torch.cat([create_method(method)(vit_model, x[i : i + 1], targets[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(shared, alone, rtol=1e-9, atol=1e-12)


def test_gridpg_scores_the_attention_methods_on_grids_of_a_vit(vit_model):
    from evaluation.gridpg import evaluate_gridpg
    from evaluation.localization import grid_pointing_game

    generator = torch.Generator().manual_seed(6)
    colours = torch.rand(60, 3, 1, 1, dtype=torch.float64, generator=generator)  # varied images, varied classes
    images = (colours + 0.2 * torch.rand(60, 3, 32, 32, dtype=torch.float64, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        labels = vit_model(vit_model.preprocess(images)).argmax(dim=1)  # every image classified correctly
    rows, shown = {}, []
    scores = evaluate_gridpg(
        vit_model, images, labels, lambda z: z.softmax(dim=1), ["rollout", "attention_grad", "attnlrp"], ["input"], n_grids=3,
        confidence=0.0, smoothing={}, on_rows=lambda key, columns: rows.setdefault(key, columns), metrics=("gridpg", "difull"),
        on_maps=lambda key, maps, cells, values, grid_images, ids: shown.append((key, maps, cells, values)),
    )  # fmt: skip
    assert scores["grids/scored"] >= 1
    for key, maps, cells, values in shown:  # 64 px grids of 32 px images: positions interpolated
        assert maps.shape[-2:] == (64, 64)
        torch.testing.assert_close(values, grid_pointing_game(maps, 2, cells))
    assert all(0 <= scores[f"gridpg/{m}/input"] <= 1 for m in ("rollout", "attention_grad", "attnlrp"))
    # rollout and attention_grad read the plain model's attention: not scored on DiFull's grid model;
    # LRP is, and a cell alone through the network gets all the relevance
    assert "difull/rollout/input" not in scores and "difull/attention_grad/input" not in scores
    assert scores["difull/attnlrp/input"] == pytest.approx(1.0)


def _bias_free_vit_model():
    """A 2-block ViT and linear probe without any additive constant: no biases, zero position
    embeddings and class token. Under LRP's rules every part is input x (modified) gradient."""
    torch.manual_seed(3)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("bias") or name in ("class_token", "encoder.pos_embedding"):
                p.zero_()
            else:
                p.add_(0.3 * torch.randn_like(p))
    backbone = staged_backbone("vit_small", vit)
    head = create_head("linear", backbone.out_channels, 5)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "bias" in name:
                p.zero_()
    model = ProbedModel(backbone, head).double().eval().requires_grad_(False)
    assert all(float(b.abs().max()) == 0 for n, b in model.named_parameters() if n.endswith("bias"))
    return model


def test_attnlrp_conserves_the_logit_where_plain_input_x_gradient_does_not():
    model = _bias_free_vit_model()
    x = model.preprocess(torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7)))
    targets = torch.tensor([0, 2, 4])
    logits = model(x)[torch.arange(3), targets]
    maps = create_method("attnlrp")(model, x, targets)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), logits, rtol=1e-9, atol=1e-12)
    plain = create_method("ixg")(model, x, targets)  # LayerNorm, GELU and softmax are not linear: not conservative
    assert (plain.sum(dim=(1, 2)) - logits).abs().max() > 1e-3 * logits.abs().max()
    assert not any("forward" in vars(m) for m in model.modules())  # the rules are gone after the call
    torch.testing.assert_close(model(x)[torch.arange(3), targets], logits)


def _logit_under_lrp_rules(model, xi, target, probabilities=lambda p: p.detach()):
    """The network evaluated by hand with each LRP rule as a formula (one image): the standard
    deviation held constant, GELU's gradient gelu(x) / x, the attention probabilities constant
    (``probabilities``: what each block's attention product uses in their place)."""
    vit_blocks = [m for m in model.modules() if type(m).__name__ == "EncoderBlock"]
    embed, final = model.backbone.stages[0], model.backbone.stages[-1]

    def norm(ln, t):  # the standard deviation held constant
        c = t - t.mean(-1, keepdim=True)
        return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + ln.eps).detach() * ln.weight + ln.bias

    def attention(mha, t):
        q, k, v = F.linear(t, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        split = lambda z: z.reshape(1, 17, 2, 8).transpose(1, 2)  # noqa: E731
        probs = probabilities(torch.softmax(split(q) @ split(k).transpose(-2, -1) / 8**0.5, dim=-1))
        return mha.out_proj((probs @ split(v)).transpose(1, 2).reshape(1, 17, 16))

    tokens = embed(xi)
    for block in vit_blocks:
        tokens = tokens + attention(block.self_attention, norm(block.ln_1, tokens))
        hidden = block.mlp[0](norm(block.ln_2, tokens))
        gelu = F.gelu(hidden)
        tokens = tokens + block.mlp[3](hidden * (gelu / hidden).detach())
    patches = norm(final.norm, tokens)[:, 1:].transpose(1, 2).reshape(1, 16, 4, 4)
    return model.head(patches)[0, target]


def test_attnlrp_equals_its_rules_written_out_per_image():
    """The same network evaluated by hand with each rule as a formula, per image and target."""
    model = _bias_free_vit_model()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x = model.preprocess(images)
    targets = torch.tensor([1, 3])
    maps = create_method("attnlrp")(model, x, targets)
    for b in range(2):
        xi = x[b : b + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_logit_under_lrp_rules(model, xi, targets[b]), xi)
        torch.testing.assert_close(maps[b], (xi * grad).sum(dim=1)[0], rtol=1e-9, atol=1e-12)


def test_cgw1_weights_the_attentions_lrp_relevance_by_its_gradient_per_image(vit_model):
    """Chefer et al. 2021a per image and target: R_A = 0.5 A * dz/dA / z under the LRP rules (the
    network by hand; relevance 1 at the logit z), the plain gradient from nn.MultiheadAttention's own attention, then
    I + mean_h (grad * R_A)+ with rows normalised, multiplied over the blocks."""
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = vit_model.preprocess(images).repeat_interleave(2, dim=0)  # two targets per image, as a grid's
    targets = torch.tensor([0, 3, 2, 2])
    maps = create_method("cgw1")(vit_model, x, targets)
    attention, gradients = _torch_attention(vit_model, x, targets)
    eye = torch.eye(17, dtype=torch.float64)
    for b in range(4):
        leaves = []

        def leaf(p):
            leaves.append(p.detach().requires_grad_(True))
            return leaves[-1]

        logit = _logit_under_lrp_rules(vit_model, x[b : b + 1], targets[b], leaf)
        lrp_gradients = torch.autograd.grad(logit, leaves)
        relevance = eye
        for probs, grad, leaf_probs, lrp_grad in zip(attention, gradients, leaves, lrp_gradients):
            torch.testing.assert_close(leaf_probs[0], probs[b])
            relevance_of_attention = 0.5 * probs[b] * lrp_grad[0] / logit  # relevance 1 at the logit
            a = eye + (grad[b] * relevance_of_attention).clamp(min=0).mean(dim=0)
            relevance = (a / a.sum(dim=-1, keepdim=True)) @ relevance
        torch.testing.assert_close(maps[b], _patch_map(relevance, (32, 32)))
    assert not torch.equal(maps[0], maps[1])  # class-specific
    assert not any("forward" in vars(m) for m in vit_model.modules())  # rules and records gone


def test_methods_of_the_plain_model_refuse_a_grid_model(vit_model):
    from evaluation.grid_models import grid_model

    x = vit_model.preprocess(torch.rand(1, 3, 64, 64, dtype=torch.float64))
    difull = grid_model("difull", vit_model, 2, torch.tensor([0]))
    for method in ("rollout", "attention_grad", "cgw1"):
        with pytest.raises(ValueError, match=f"method '{method}' explains the plain model: score it with gridpg or epg"):
            create_method(method)(difull, x, torch.tensor([1]))
    assert create_method("attnlrp")(difull, x, torch.tensor([1])).shape == (1, 64, 64)  # LRP explains grid models


def _vit_cx_reference(model, image, target, threshold=0.1, noise=0.1, seed=0):
    """ViT-CX for one image and target as the reference code computes it (ViT_CX.py and
    causal_score.py of vaynexie/CausalX-ViT), a mask at a time, with scipy's complete linkage in
    place of sklearn's, and softmax probabilities."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    seen = []
    last = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)][-1]
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        class_p = model(image[None]).softmax(dim=1)[0, target]
    handle.remove()
    feature_map = seen[0][0, 1:].T.reshape(-1, 4, 4)  # reshape_function_vit: patch tokens, (D, h, w)
    feature_map = F.interpolate(feature_map[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    rows = feature_map.reshape(len(feature_map), -1)
    mask = (rows - rows.min(1).values[:, None]) / (rows.max(1).values - rows.min(1).values)[:, None]  # norm_matrix
    similarity = (mask @ mask.T) / (mask.norm(dim=1)[:, None] * mask.norm(dim=1)[None])
    distance = (1 - similarity).numpy()
    np.fill_diagonal(distance, 0)
    labels = fcluster(linkage(squareform(distance, checks=False), method="complete"), t=threshold, criterion="distance")
    first_seen = list(dict.fromkeys(labels.tolist()))  # clusters in the order of their first map
    clusters = torch.stack([mask[torch.as_tensor(labels == c)].sum(dim=0) for c in first_seen])
    clusters = (clusters - clusters.min(1).values[:, None]) / (clusters.max(1).values - clusters.min(1).values)[:, None]
    masks = clusters.reshape(-1, 1, 32, 32)
    n = len(masks)
    sal = torch.zeros(32, 32, dtype=torch.float64)
    for i in range(n):
        noise_i = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed * 1_000_003 + i), dtype=torch.float64) * noise
        noise_to_add = noise_i * (1 - masks[i])
        with torch.no_grad():
            p_mask = model((image * masks[i] + noise_to_add)[None]).softmax(dim=1)[0, target]
            p_orig = model((image + noise_to_add)[None]).softmax(dim=1)[0, target]
        sal += (p_mask - p_orig + class_p) * (masks[i, 0] / masks[:, 0].sum(dim=0))
    return sal / n, n


def test_vit_cx_equals_the_reference_computed_a_mask_at_a_time(vit_model):
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    x = vit_model.preprocess(images).repeat_interleave(2, dim=0)  # two targets per image, as a grid's
    targets = torch.tensor([0, 3, 2, 2])
    maps = create_method("vitcx")(vit_model, x, targets, probabilities=lambda z: z.softmax(dim=1), internal_batch_size=3)
    for b in range(4):
        expected, n_masks = _vit_cx_reference(vit_model, x[b], int(targets[b]))
        assert 1 < n_masks < 16  # the 16 maps were clustered, not all alone nor all in one
        torch.testing.assert_close(maps[b], expected, rtol=1e-7, atol=1e-10)
    alone = create_method("vitcx")(vit_model, x[1:2], targets[1:2], probabilities=lambda z: z.softmax(dim=1))
    torch.testing.assert_close(alone[0], maps[1], rtol=1e-9, atol=1e-12)  # batch size and neighbours change nothing
    with pytest.raises(ValueError, match="distance_threshold"):
        create_method("vitcx")(vit_model, x[:1], targets[:1], distance_threshold=-1.0)
