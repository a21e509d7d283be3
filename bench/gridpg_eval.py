"""GridPG evaluation: the batched evaluator versus the naive loop the reference code runs.

A ResNet-50 (random weights, BatchNorm statistics measured on random images so that activations
keep their scale through the 50 layers as in a trained network, and so that Integrated Gradients
is not Input x Gradient; REFERENCE section 7) with a spatial linear probe explains 2x2 grids of
224 px cells. The naive loop calls captum / zennit once per image and target; the batched path
is what ``evaluation.gridpg.evaluate_gridpg`` does per batch of grids: one backbone forward per
layer shared by the methods (charged to every method here), all targets of a grid in one call.
Both must give the same maps; the table shows the largest difference, and how far each is from
the naive loop in float64 (ReLU networks' gradients are discontinuous, so float32 rounding alone
moves single pixels of a map by a few percent of its maximum on this network).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295 \\
        .venv/bin/python bench/gridpg_eval.py [--grids 2] [--intgrad-steps 10]   # the full setting: 50

Last line: the ratio of the method that is slowest in the naive loop (Integrated Gradients).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import torchvision

from evaluation.attribution import create_method
from evaluation.attribution.folding import merged_batchnorm
from probing.heads import create_head
from probing.model import ProbedModel
from probing.zoo import IMAGENET_MEAN, IMAGENET_STD, staged_backbone

LAYERS = {
    "ixg": "input", "gradcam": "final", "lrp": "input", "intgrad": "input", "gradcampp": "final", "layercam": "final",
    "ablationcam": "final", "rise": "input",
}  # fmt: skip
# the grad-cam package's classes, the naive reference of these methods; it min-max normalises each map
GRAD_CAM_PACKAGE = {"gradcampp": "GradCAMPlusPlus", "layercam": "LayerCAM", "ablationcam": "AblationCAM"}


def _model() -> ProbedModel:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    # A random network with unit BatchNorm statistics blows its activations up layer by layer,
    # which makes float32 gradients chaotic (1% apart from float64): measure the statistics.
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        resnet.train()(torchvision.transforms.functional.normalize(torch.rand(8, 3, 224, 224), IMAGENET_MEAN, IMAGENET_STD))
    backbone = staged_backbone("resnet50", resnet.eval())
    head = create_head("linear", backbone.out_channels, 10)
    model = ProbedModel(backbone, head).eval().requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1], as the grad-cam package returns them."""
    low = maps.flatten(1).min(dim=1).values[:, None, None]
    high = maps.flatten(1).max(dim=1).values[:, None, None]
    return (maps - low) / (high - low + 1e-7)


def _naive(method: str, model: ProbedModel, x: torch.Tensor, target: int, steps: int) -> torch.Tensor:
    """One image, one target, the library called the plain way (as the reference code does);
    ``steps``: Integrated Gradients' steps, RISE's masks."""
    from captum.attr import InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam

    if method in GRAD_CAM_PACKAGE:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = getattr(pytorch_grad_cam, GRAD_CAM_PACKAGE[method])(model, [model.backbone.stages[4]])
        try:
            return torch.from_numpy(cam(x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(target)])).to(x.dtype)
        finally:
            cam.activations_and_grads.release()
    if method == "rise":  # its formula, masked images in batches of 16, one target
        from evaluation.attribution import rise_masks

        masks, total = rise_masks(steps, x.shape[-2:], dtype=x.dtype), torch.zeros(x.shape[-2:], dtype=x.dtype)
        with torch.no_grad():
            for first in range(0, steps, 16):
                chunk = masks[first : first + 16]
                total += torch.einsum("m,mhw->hw", model(x * chunk).softmax(dim=1)[:, target], chunk[:, 0])
        return (total / (steps * 0.5))[None]
    if method == "ixg":
        return InputXGradient(model).attribute(x, target=target).sum(dim=1)
    if method == "intgrad":
        ig = IntegratedGradients(model)
        return ig.attribute(x, target=target, n_steps=steps, internal_batch_size=8).sum(dim=1)
    if method == "gradcam":
        cam = LayerGradCam(model, model.backbone.stages[4]).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, x.shape[-2:], "bilinear")[:, 0]
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer

    from probing.heads import Pointwise

    low, high = model.preprocess(torch.zeros_like(x)), model.preprocess(torch.ones_like(x))
    # the probe's layers are fully connected (Epsilon, as torchvision's fc); relevance starts at the logit
    composite = EpsilonGammaBox(low=low, high=high, canonizers=[ResNetCanonizer()], layer_map=[(Pointwise, Epsilon())])
    with Gradient(model, composite) as attributor:
        one_hot = F.one_hot(torch.tensor([target]), 10).to(x.dtype)
        _, relevance = attributor(x.clone().requires_grad_(True), lambda out: out * one_hot)
    return relevance.sum(dim=1)


def _batched(method: str, model: ProbedModel, grid_inputs: torch.Tensor, targets: torch.Tensor, steps: int):
    layer, cells = LAYERS[method], len(targets) // len(grid_inputs)
    with torch.no_grad():
        with merged_batchnorm(model):
            shared = model.forward_to(grid_inputs, layer).repeat_interleave(cells, dim=0)
    inputs = grid_inputs.repeat_interleave(cells, dim=0)
    options = {"intgrad": {"n_steps": steps, "internal_batch_size": 8}, "rise": {"n_masks": steps, "internal_batch_size": 64}}
    maps = create_method(method)(model, inputs, targets, layer=layer, activation=shared, **options.get(method, {}))
    return _minmax(maps) if method in GRAD_CAM_PACKAGE else maps  # compared as the package returns them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", type=int, default=2, help="2x2 grids of 224 px cells to explain")
    parser.add_argument("--intgrad-steps", type=int, default=10, help="Integrated Gradients steps (reference: 50)")
    parser.add_argument("--rise-masks", type=int, default=64, help="RISE masks (reference: 4000)")
    parser.add_argument("--methods", default="ixg,gradcam,lrp,intgrad", help="also: gradcampp,layercam,ablationcam,rise")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, model64 = _model(), _model().double()
    generator = torch.Generator().manual_seed(1)
    grids = torch.rand(args.grids, 3, 448, 448, generator=generator).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (args.grids, 4), generator=generator)
    grid_inputs = model.preprocess(grids)
    _batched("ixg", model, grid_inputs[:1], targets[0], 1)  # warm-up (allocations, oneDNN kernels)

    steps = {"intgrad": args.intgrad_steps, "rise": args.rise_masks}
    steps = {m: steps.get(m, 1) for m in args.methods.split(",")}
    rows = []
    for method in args.methods.split(","):
        start = time.perf_counter()
        naive = torch.cat([
            _naive(method, model, grid_inputs[g : g + 1], int(t), steps[method])
            for g in range(args.grids) for t in targets[g]
        ])  # fmt: skip
        naive_s = (time.perf_counter() - start) / args.grids
        start = time.perf_counter()
        ours = _batched(method, model, grid_inputs, targets.flatten(), steps[method])
        ours_s = (time.perf_counter() - start) / args.grids
        difference = float((ours - naive).abs().max() / naive.abs().max())
        # float32's own noise on this network: both against the naive loop in float64 (first map)
        exact = _naive(method, model64, grid_inputs[:1].double(), int(targets[0, 0]), steps[method])[0]
        noise = [float((maps[0].double() - exact).abs().max() / exact.abs().max()) for maps in (naive, ours)]
        rows.append((method, naive_s, ours_s, naive_s / ours_s, difference, *noise))
        print(f"  {method}: naive {naive_s:.2f} s/grid, batched {ours_s:.2f} s/grid", flush=True)

    print(f"\nGridPG evaluation per 2x2 grid (4 targets), ResNet-50, 448 px, {args.grids} grids, "
          f"IntGrad {args.intgrad_steps} steps, RISE {args.rise_masks} masks, {torch.get_num_threads()} threads; "
          "baseline: the naive loop (grad-cam package methods: maps min-max normalised, as it returns them)")  # fmt: skip
    print("max |diff| / max |map|: batched vs naive; then each against the naive loop in float64 (one map)")
    print(f"{'method':10} {'naive s/grid':>12} {'batched s/grid':>14} {'ratio':>7} {'vs naive':>9} {'naive vs f64':>12} {'ours vs f64':>11}")
    for method, naive_s, ours_s, ratio, difference, naive_noise, ours_noise in rows:
        print(f"{method:10} {naive_s:>12.2f} {ours_s:>14.2f} {ratio:>6.2f}x {difference:>9.1e} {naive_noise:>12.1e} {ours_noise:>11.1e}")
    slowest = max(rows, key=lambda r: r[1])
    print(f"GridPG evaluation, batched vs naive (slowest method): {slowest[3]:.2f}x")


if __name__ == "__main__":
    main()
