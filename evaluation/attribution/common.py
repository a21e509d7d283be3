"""What every attribution method shares: the method record, target logits at a layer, upsampling."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from evaluation.attribution.folding import merged_batchnorm
from probing.registry import Registry

__all__ = [
    "ALL_LAYERS",
    "METHODS",
    "AttributionMethod",
    "attribution_method",
    "LayeredModel",
    "encoded_perturbation",
    "layer_activation",
    "model_traits",
    "restored_afterwards",
    "model_rows",
    "repeated_rows",
    "select_targets",
    "shared_forward_gradients",
    "target_gradients",
    "to_image_size",
]


class LayeredModel(Protocol):
    """What a method needs of a model: split at a named layer (see ``probing.model.ProbedModel``)."""

    def forward_to(self, x: torch.Tensor, layer: str) -> torch.Tensor: ...

    def forward_from(self, activation: torch.Tensor, layer: str) -> torch.Tensor: ...


#: what a model is built of, as far as methods care: ``bcos`` (B-cos layers, whose dynamic weights
#: no LRP rule covers) and ``vit`` (attention and GELU: no LRP rule, no ReLU to guide)
TRAITS = {"bcos": "B-cos layers", "vit": "a vision transformer"}


def model_traits(model: torch.nn.Module) -> frozenset[str]:
    """The :data:`TRAITS` of ``model``, read from its modules."""
    traits = set()
    for module in model.modules():
        if hasattr(module, "set_explanation_mode"):
            traits.add("bcos")
        if type(module).__name__ in ("EncoderBlock", "MultiheadAttention"):
            traits.add("vit")
    return frozenset(traits)


@dataclass(frozen=True)
class AttributionMethod:
    """A registered method: ``fn(model, images, targets, layer) -> maps (B, H, W)``.

    Attributes:
        layers: the ML-Att layers at which the method is defined.
        uses_probabilities: ``fn`` takes ``probabilities`` (logits -> probabilities: sigmoid for
            BCE probes, softmax for CE probes; REFERENCE section 4).
        refuses: model :data:`TRAITS` the method does not apply to, each with the reason.
        requires: model :data:`TRAITS` the method needs, each with the reason.
        grid_models: whether the method explains the DiFull / DiPart grid models too (False: it
            reads the plain model's own structure, as attention rollout does).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    layers: tuple[str, ...]
    description: str = ""
    uses_probabilities: bool = False
    refuses: tuple[tuple[str, str], ...] = ()
    requires: tuple[tuple[str, str], ...] = ()
    grid_models: bool = True

    def refusal(self, traits) -> str | None:
        """Why the method does not apply to a model with ``traits``, or None if it does."""
        for trait, reason in self.refuses:
            if trait in traits:
                return f"method {self.name!r} does not apply to models with {TRAITS[trait]}: {reason}"
        for trait, reason in self.requires:
            if trait not in traits:
                return f"method {self.name!r} applies only to models with {TRAITS[trait]}: {reason}"
        return None

    def __call__(self, model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", **opts):
        if layer not in self.layers:
            raise ValueError(f"method {self.name!r} is not defined at layer {layer!r}: use one of {', '.join(self.layers)}")
        refused = self.refusal(model_traits(model))
        if refused:
            raise ValueError(refused)
        if not self.grid_models and hasattr(model, "rows"):  # DiFull / DiPart run the backbone per cell or crop it
            raise ValueError(f"method {self.name!r} explains the plain model: score it with gridpg or epg, not difull or dipart")
        return self.fn(model, images, targets, layer=layer, **opts)


ALL_LAYERS = ("input", "middle", "final")

METHODS: Registry[AttributionMethod] = Registry("attribution method")


def attribution_method(
    name: str,
    layers: tuple[str, ...],
    description: str,
    uses_probabilities: bool = False,
    refuses: tuple[tuple[str, str], ...] = (),
    requires: tuple[tuple[str, str], ...] = (),
    grid_models: bool = True,
):
    """Decorator that registers ``fn(model, images, targets, layer, activation=None, ...)`` as the
    attribution method ``name``, beside its code (see :class:`AttributionMethod` for the rest)."""

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS.register(name)(AttributionMethod(name, fn, layers, description, uses_probabilities, refuses, requires, grid_models))
        return fn

    return add


@contextmanager
def restored_afterwards(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Whatever happens inside the block, every module of ``model`` leaves it with the attributes,
    parameters, buffers, submodules and hooks it had before, and its parameters and buffers with
    their data. References are kept, nothing is copied. Guards rewrites done by other libraries
    (zennit's canonizers) that cannot undo a half-done change."""
    saved = []
    for module in model.modules():
        state = vars(module)
        # the module's own dicts (_parameters, _buffers, _modules, hook dicts) are kept as copies
        inner = {k: dict(v) for k, v in state.items() if isinstance(v, dict)}
        tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        saved.append((module, dict(state), inner, [(t, t.data) for t in tensors]))
    try:
        yield model
    finally:
        for module, state, inner, data in saved:
            vars(module).clear()
            vars(module).update(state)
            for name, contents in inner.items():
                state[name].clear()
                state[name].update(contents)
            for tensor, original in data:
                tensor.data = original


def encoded_perturbation(model, inputs: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``inputs`` where ``keep`` (broadcast over channels) is 1, else ``fill``, blended as
    ``keep * inputs + (1 - keep) * fill``. On B-cos models (6-channel ``[x, 1 - x]`` input) the
    image x is perturbed and re-encoded, never the encoding itself (REFERENCE section 4); a tensor
    ``fill`` is then given in the same encoding, and only its first half is used."""
    if not getattr(model, "bcos_input", False):
        return keep * inputs + (1 - keep) * fill
    half = inputs.shape[1] // 2
    x_fill = fill[:, :half] if isinstance(fill, torch.Tensor) else fill
    x = keep * inputs[:, :half] + (1 - keep) * x_fill
    return torch.cat([x, 1.0 - x], dim=1)


def model_rows(model, index):
    """``model`` restricted to the rows ``index`` of the batch it explains (grid models tie each
    row to a cell); a plain model serves every row as it is."""
    return model.rows(index) if hasattr(model, "rows") else model


def select_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) logit of each row's target class; refuses targets that do not fit the batch."""
    if targets.dtype != torch.int64 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"targets must be an int64 tensor of shape ({len(logits)},), got {targets.dtype} {tuple(targets.shape)}"
        )
    return logits.gather(1, targets.to(logits.device)[:, None])[:, 0]


def layer_activation(model, images: torch.Tensor, layer: str, activation: torch.Tensor | None = None) -> torch.Tensor:
    """The activation at ``layer``: ``activation`` when the caller shares one forward among
    methods (it must be ``model.forward_to(images, layer)``), else computed here."""
    if activation is not None:
        return activation.detach()
    with torch.no_grad():
        return model.forward_to(images, layer)


def repeated_rows(x: torch.Tensor) -> int:
    """k when the rows of ``x`` come in runs of k equal rows (several targets of one image, as the
    grid evaluation lays them out), else 1."""
    k = 1
    while k < len(x) and torch.equal(x[k], x[0]):
        k += 1
    if k == 1 or len(x) % k or not torch.equal(x[::k].repeat_interleave(k, dim=0), x):
        return 1
    return k


def shared_forward_gradients(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    vectorised: bool = False,
    from_logit: bool = False,
) -> torch.Tensor:
    """Gradients of each row's target logit, for rows that are ``inputs.repeat_interleave(k)``:
    one forward pass of ``inputs`` serves the k targets of each (rows are independent in eval
    mode), then one backward pass per target position, or a single one vectorised over them.

    Args:
        forward: rows -> logits. inputs: (U, ...) the distinct rows. targets: (U * k,).
        vectorised: ``torch.autograd.grad(..., is_grads_batched=True)``. Measured on ResNet-50
            (bench/gridpg_eval.py): faster for LRP, whose rules recompute each layer in the
            backward pass, slower for plain gradients.
        from_logit: the backward pass starts at each row's target logit instead of at 1 (LRP's
            relevance starts as the output times the one-hot target, REFERENCE section 4).

    Returns:
        Tensor: (U * k, ...) gradients, in the rows' order.
    """
    def start(selected: torch.Tensor) -> torch.Tensor:  # d start / d logit: 1, or the logit itself
        return (selected * selected.detach()).sum() if from_logit else selected.sum()

    with torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        logits = forward(x)
        if k == 1:
            return torch.autograd.grad(start(select_targets(logits, targets)), x)[0]
        if not vectorised:
            gradients = [
                torch.autograd.grad(start(select_targets(logits, targets[r::k])), x, retain_graph=r < k - 1)[0]
                for r in range(k)
            ]
            return torch.stack(gradients, dim=1).flatten(0, 1)
        # one backward pass, vectorised over the k target positions (torch.vmap over grad_outputs)
        one_hot = torch.zeros(k, *logits.shape, dtype=logits.dtype, device=logits.device)
        rows = torch.arange(len(logits), device=logits.device)
        for r in range(k):
            select_targets(logits.detach(), targets[r::k])  # checks the targets' type and shape
            chosen = targets[r::k].to(logits.device)
            one_hot[r, rows, chosen] = logits.detach()[rows, chosen] if from_logit else 1.0
        (gradients,) = torch.autograd.grad(logits, x, grad_outputs=one_hot, is_grads_batched=True)
    return gradients.transpose(0, 1).flatten(0, 1)  # (k, U, ...) -> rows in (U, k) order


def target_gradients(
    model: LayeredModel, images: torch.Tensor, targets: torch.Tensor, layer: str, activation: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation at ``layer`` and the gradient of each row's target logit with respect to it.

    Rows are independent (the model is in eval mode), so the gradient of the sum of the selected
    logits gives every row's own gradient in one backward pass. Rows that repeat one activation
    (the targets of one grid) share its forward pass, on models that treat all rows alike.

    Args:
        images (Tensor): preprocessed inputs (B, C, H, W).
        targets (Tensor): (B,) int64 class per row.
        activation (Tensor): optional, the activation at ``layer`` if already computed.

    Returns:
        (activation, gradient), both (B, C_l, H_l, W_l), detached.
    """
    activation = layer_activation(model, images, layer, activation)
    k = 1 if hasattr(model, "rows") else repeated_rows(activation)  # grid models tie rows to cells
    with merged_batchnorm(model):  # BatchNorm merged into the convolutions: same gradients, less work
        gradient = shared_forward_gradients(lambda a: model.forward_from(a, layer), activation[::k], targets, k)
    return activation, gradient


def to_image_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) by bilinear upsampling (a no-op at the input layer)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
