"""Backbones with published weights: torchvision ResNet-18/50, VGG-11/16, ViT-B/16, B-cos ResNet-50,
CLIP's ResNet-50 (without its attention pool) and DINO's ViT-S/16 and ViT-B/16.

Nothing is downloaded. Weights come from ``weights: PATH`` or, for torchvision's own files, from
the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file name of torchvision's URL>``): torchvision's
default weights, or a tag of its weights enum (``weights: IMAGENET1K_V1`` reads
``resnet50-0676ba61.pth``, the weights the SSL papers and How to Probe compare against; torchvision's
default for ResNet-50 is ``IMAGENET1K_V2``). The file a backbone was loaded from is kept as its
``weights_file``, so that a trial logs which one it used. The
``checkpoint_format`` option (or a name such as ``resnet50_dino``) says how the file is laid out:

- ``torchvision``: a plain state dict (torchvision's files; DINO's ``dino_resnet50_pretrain.pth``).
- ``dino``: also DINO's full training checkpoints (``teacher`` weights, ``module.backbone.`` prefix).
- ``mocov2``: MoCo v2's ``{"state_dict": {"module.encoder_q.<key>": ...}}``.
- ``byol``: BYOL ports to PyTorch that wrap the ResNet as ``online_backbone.``, ``backbone.`` or
  ``encoder.`` (optionally under ``module.`` and a ``state_dict`` entry).
- ``bcos``: the ``bcos`` package's ResNet-50 state dict.
- ``clip``: OpenAI's CLIP checkpoint (``RN50.pt``, a TorchScript archive, or its state dict): the
  ``visual.`` weights, less the attention pool (:mod:`probing.clip_resnet`).
- ``dino_vit``: DINO's ViT checkpoints (``dino_deitsmall16_pretrain.pth``,
  ``dino_vitbase16_pretrain.pth``, or a full training checkpoint's ``teacher``), whose keys
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.<i>.attn.qkv``, ``mlp.fc1``,
  ``norm``) are renamed to torchvision's ``VisionTransformer``; the DINO projection ``head.`` is dropped.

Loading is strict: every weight of the backbone must be in the file and nothing but the
classifier may be left over; a mismatch lists the missing and unexpected keys. Files load with
``weights_only=True``; the one class besides tensors allowed in them is ``argparse.Namespace``,
which DINO's full training checkpoints carry as ``args``. OpenAI's TorchScript archive is read with
``torch.jit.load`` (it holds code as well as tensors: load only the file OpenAI published).

ViTs are split for ML-Att after their middle block (6 of 12) and after the last, each as a map of
the patch tokens (see :class:`TokensToMap`); the probe pools the patch tokens of the last.
"""

from __future__ import annotations

import argparse
import re
import warnings

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from probing.backbones import BACKBONES, BackboneConfig, BackboneEntry, StagedBackbone, file_digest
from probing.clip_resnet import CLIP_MEAN, CLIP_STD, ClipResNet, clip_state_dict
from probing.registry import unknown_name

__all__ = ["CHECKPOINT_FORMATS", "WEIGHTS_TAG", "load_checkpoint", "remap_checkpoint", "staged_backbone"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHECKPOINT_FORMATS = ("torchvision", "dino", "mocov2", "byol", "bcos", "clip", "dino_vit")
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "heads.")  # never part of a backbone
BYOL_PREFIXES = ("online_backbone.", "backbone.", "encoder.", "online_network.encoder.", "net.")
WEIGHTS_TAG = re.compile(r"[A-Z][A-Z0-9_]*")  # a member of torchvision's weights enum, e.g. IMAGENET1K_V1


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _unwrap(obj, *keys: str) -> dict:
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def remap_checkpoint(obj: dict, checkpoint_format: str) -> dict:
    """A loaded checkpoint in ``checkpoint_format`` -> a torchvision-style state dict."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(unknown_name("checkpoint_format", checkpoint_format, CHECKPOINT_FORMATS))
    if checkpoint_format == "clip":
        return clip_state_dict(obj)
    if checkpoint_format == "mocov2":
        state = _strip(_unwrap(obj, "state_dict"), "module.encoder_q.")
        if not state:
            raise ValueError("no 'module.encoder_q.' weights: not a MoCo v2 checkpoint")
        return state
    state = _unwrap(obj, "teacher", "state_dict", "model") if checkpoint_format == "dino" else _unwrap(obj, "state_dict", "model")
    state = _strip(state, "module.") or state
    if checkpoint_format == "dino":
        state = _strip(state, "backbone.") or state
    if checkpoint_format == "byol":
        prefix = next((p for p in BYOL_PREFIXES if any(k.startswith(p) for k in state)), "")
        state = _strip(state, prefix)
    if checkpoint_format == "dino_vit":
        state = _dino_vit_names(_strip(_unwrap(obj, "teacher", "state_dict", "model"), "module.") or _unwrap(obj, "teacher", "state_dict", "model"))
    return state


DINO_VIT_NAMES = (  # DINO's ViT key -> torchvision's VisionTransformer key (block-level parts after "blocks.<i>.")
    ("norm1.", "ln_1."), ("attn.qkv.weight", "self_attention.in_proj_weight"), ("attn.qkv.bias", "self_attention.in_proj_bias"),
    ("attn.proj.", "self_attention.out_proj."), ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.3."),
)
DINO_VIT_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj.weight": "conv_proj.weight",
                "patch_embed.proj.bias": "conv_proj.bias", "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}  # fmt: skip


def _dino_vit_names(state: dict) -> dict:
    """DINO's ViT state dict (``backbone.`` prefix allowed, ``head.`` dropped) in torchvision's names;
    a key of neither layout is kept as it is, for the strict check to name it."""
    state = _strip(state, "backbone.") or state
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            part = match.group(2)
            for old, new in DINO_VIT_NAMES:
                if part.startswith(old):
                    part = new + part[len(old) :]
                    break
            key = f"encoder.layers.encoder_layer_{match.group(1)}.{part}"
        out[DINO_VIT_TOP.get(key, key)] = value
    return out


def load_checkpoint(model: nn.Module, path: Path, checkpoint_format: str) -> None:
    """Load ``path`` into ``model`` strictly (classifier weights aside); raises naming the keys that differ."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:  # torch.load aborts the process on an empty file
        raise ValueError(f"cannot load checkpoint {path}: the file is empty")
    try:
        if checkpoint_format == "clip" and _is_torchscript(path):  # OpenAI's RN50.pt
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's file is one
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # DINO's full checkpoints hold their args
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {path}: {err}") from err
    state = {k: v for k, v in remap_checkpoint(obj, checkpoint_format).items() if not k.startswith(CLASSIFIER_PREFIXES)}
    expected = {k for k in model.state_dict() if not k.startswith(CLASSIFIER_PREFIXES)}
    missing = sorted(k for k in expected - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        def listing(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"

        raise ValueError(
            f"checkpoint {path} ({checkpoint_format} format) does not fit the backbone: "
            f"missing keys: {listing(missing)}; unexpected keys: {listing(unexpected)}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # the keys fit, their shapes do not: another architecture's file
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise ValueError(f"checkpoint {path} ({checkpoint_format} format) does not fit the backbone: {first}") from None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip file with the model's code beside its tensors."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in archive.namelist())


def _weights_file(name: str, weights: str | None, weights_enum: str | None) -> Path:
    """The file to load: ``weights`` as a path, or torchvision's file for a weights tag (``DEFAULT`` when
    ``weights`` is None) in the torch hub cache."""
    if weights is not None and not (weights_enum and WEIGHTS_TAG.fullmatch(weights)):
        return Path(weights).expanduser()
    if weights_enum is None:
        raise FileNotFoundError(f"backbone {name!r} needs its weights file: set weights: PATH")
    import torchvision

    enum = getattr(torchvision.models, weights_enum)
    tag = weights or "DEFAULT"
    if tag not in enum.__members__:
        known = ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        raise ValueError(f"unknown weights {tag!r} for backbone {name!r}: use a file path or one of {known}")
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / enum[tag].url.rsplit("/", 1)[-1]
    if not hub_file.is_file():
        raise FileNotFoundError(
            f"no weights for backbone {name!r} ({enum.__name__}.{tag}): put {hub_file.name} in {hub_file.parent}, "
            "or set weights: PATH"
        )
    return hub_file


class ViTEmbed(nn.Module):
    """Patch projection, class token and position embedding: images -> tokens (B, 1 + N, D).

    Square images of any multiple of the patch size: at another size than the one the ViT was
    trained at, the patch tokens' position embeddings are interpolated bicubically to the new
    patch grid (as DINO and timm do), so that a 2x2 grid of training-size images is explained
    by the same network."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        patch = self.vit.patch_size
        if height != width or height % patch:
            raise ValueError(f"a ViT takes square images whose side is a multiple of {patch} px, got {height}x{width}")
        tokens = self.vit.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.vit.class_token.expand(len(tokens), -1, -1)
        return self.vit.encoder.dropout(torch.cat([cls, tokens], dim=1) + self._positions(height // patch))

    def _positions(self, side: int) -> torch.Tensor:
        positions = self.vit.encoder.pos_embedding
        trained = int(round((positions.shape[1] - 1) ** 0.5))
        if side == trained:
            return positions
        grid = positions[:, 1:].reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return torch.cat([positions[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)


class TokensToMap(nn.Module):
    """Tokens (B, 1 + h*w, D) -> a spatial map (B, 2D, h, w) that ML-Att methods can treat as an
    activation: channels [0, D) are the patch tokens; channels [D, 2D) hold the class token divided
    by h*w at every position, so its share of any attribution is spread evenly over the patches
    and :class:`MapToTokens` recovers it exactly (as the sum over positions)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls, patches = tokens[:, 0], tokens[:, 1:]
        side = int(patches.shape[1] ** 0.5)
        patch_map = patches.transpose(1, 2).reshape(len(tokens), -1, side, side)
        cls_map = (cls / side**2)[:, :, None, None].expand(-1, -1, side, side)
        return torch.cat([patch_map, cls_map], dim=1)


class MapToTokens(nn.Module):
    """The inverse of :class:`TokensToMap`."""

    def forward(self, spatial: torch.Tensor) -> torch.Tensor:
        patch_map, cls_map = spatial.chunk(2, dim=1)
        cls = cls_map.sum(dim=(2, 3))
        return torch.cat([cls[:, None], patch_map.flatten(2).transpose(1, 2)], dim=1)


class ViTPatchMap(nn.Module):
    """Final LayerNorm, then the patch tokens as a spatial map (B, D, h, w); the class token is dropped."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = self.norm(tokens)[:, 1:]
        side = int(len(patches[0]) ** 0.5)
        return patches.transpose(1, 2).reshape(len(patches), -1, side, side)


def staged_backbone(arch: str, model: nn.Module) -> StagedBackbone:
    """The torchvision or B-cos ``model`` as stages with its ML-Att layers (REFERENCE section 4)."""
    if arch.startswith("vgg"):
        convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        # after the first convolution behind the third max-pool, and its ReLU: stride 8 in every VGG
        # (VGG11: conv5, as ML-Att; VGG16: conv4_1, where the fifth convolution would be stride 4)
        middle = next(i for i in convs if i > pools[2]) + 2
        f = model.features
        stages = nn.Sequential(f[:middle], f[middle : pools[-1]], f[pools[-1] :])
        config = BackboneConfig(IMAGENET_MEAN, IMAGENET_STD, {"input": 0, "middle": 1, "final": 2})
        return StagedBackbone(stages, config, out_channels=512)
    if arch.startswith("vit"):
        blocks = list(model.encoder.layers)
        half = len(blocks) // 2  # middle: after block 6 of 12, as a spatial map (see TokensToMap)
        stages = nn.Sequential(
            ViTEmbed(model), *blocks[:half], TokensToMap(), MapToTokens(), *blocks[half:], ViTPatchMap(model.encoder.ln)
        )
        config = BackboneConfig(IMAGENET_MEAN, IMAGENET_STD, {"input": 0, "middle": half + 2, "final": len(stages)})
        return StagedBackbone(stages, config, out_channels=model.hidden_dim)
    if arch.startswith("clip"):
        config = BackboneConfig(CLIP_MEAN, CLIP_STD, {"input": 0, "middle": 3, "final": 5})
        return StagedBackbone(nn.Sequential(model.stem(), model.layer1, model.layer2, model.layer3, model.layer4), config, model.num_features)
    if arch.startswith("bcos"):
        stem = nn.Sequential(model.conv1, model.bn1, *([model.pool] if model.pool is not None else []))
        config = BackboneConfig((0.0,) * 6, (1.0,) * 6, {"input": 0, "middle": 3, "final": 5}, bcos_input=True)
        out = model.num_features
    else:
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        config = BackboneConfig(IMAGENET_MEAN, IMAGENET_STD, {"input": 0, "middle": 3, "final": 5})
        out = model.fc.in_features
    return StagedBackbone(nn.Sequential(stem, model.layer1, model.layer2, model.layer3, model.layer4), config, out)


def _register(name: str, arch: str, make, weights_enum: str | None, checkpoint_format: str, description: str) -> None:
    traits = frozenset({"bcos"} if arch.startswith("bcos") else {"vit"} if arch.startswith("vit") else ())
    """``make`` builds the model; ``weights_enum`` names torchvision's weights enum, whose default URL
    names the file in the torch hub cache. Both are looked up on use: importing torchvision costs
    every process that imports the registry (each Ray trial among them) about 2 s."""

    def build() -> StagedBackbone:
        return staged_backbone(arch, make())

    def load(backbone: StagedBackbone, weights: str | None = None, checkpoint_format: str = checkpoint_format) -> str:
        path = _weights_file(name, weights, weights_enum if checkpoint_format == "torchvision" else None)
        model = make()
        load_checkpoint(model, path, checkpoint_format)  # checked against the original key names
        backbone.load_state_dict(staged_backbone(arch, model).state_dict(), strict=True)
        backbone.weights_file = path.name
        return file_digest(path)

    BACKBONES.register(name)(BackboneEntry(build=build, load=load, description=description, traits=traits))


def _torchvision_model(arch: str):
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)()

    return make


def _dino_vit(heads: int, dim: int):
    def make() -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=heads, hidden_dim=dim, mlp_dim=4 * dim)

    return make


def _bcos_resnet50() -> nn.Module:
    from bcos.models.pretrained import resnet50

    return resnet50(pretrained=False)  # the architecture of the package's published checkpoint


for _name, _weights in (
    ("resnet18", "ResNet18_Weights"),
    ("resnet50", "ResNet50_Weights"),
    ("vgg11", "VGG11_Weights"),
    ("vgg16", "VGG16_Weights"),
    ("vit_b_16", "ViT_B_16_Weights"),
):
    _register(_name, _name, _torchvision_model(_name), _weights, "torchvision", f"torchvision {_name}, supervised ImageNet weights")
for _scheme in ("dino", "mocov2", "byol"):
    _register(f"resnet50_{_scheme}", "resnet50", _torchvision_model("resnet50"), None, _scheme, f"ResNet-50, self-supervised {_scheme} checkpoint")
_register("bcos_resnet50", "bcos_resnet50", _bcos_resnet50, None, "bcos", "B-cos ResNet-50 (bcos package checkpoint)")
_register("clip_resnet50", "clip_resnet50", ClipResNet, None, "clip", "CLIP ResNet-50 image trunk, attention pool removed (OpenAI's RN50.pt)")
for _name, _heads, _dim in (("vit_s_16_dino", 6, 384), ("vit_b_16_dino", 12, 768)):
    _register(_name, "vit", _dino_vit(_heads, _dim), None, "dino_vit", f"ViT-{_name[4].upper()}/16, self-supervised DINO checkpoint")
