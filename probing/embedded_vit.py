"""An embedded vision transformer: a 4-block ViT for 32 px images (4 px patches, 64 tokens and the
class token), pre-trained at first use on the embedded digits train split and cached, so that the
attention methods (rollout, attention_grad) run in a sweep on the embedded data.

It is torchvision's ``VisionTransformer``, staged for ML-Att as the zoo's ViTs are
(``probing.zoo.staged_backbone``: middle after block 2 of 4, final the patch tokens), normalised
with the digits' statistics. Its own module, so that its pre-training key leaves those of the
embedded ResNets as they are.
"""

from __future__ import annotations

from probing.backbones import BACKBONES, BackboneConfig, BackboneEntry, StagedBackbone
from probing.embedded_backbones import DIGITS_MEAN, DIGITS_STD, _pretrain  # (not edited there: its source keys the ResNets' caches)

__all__ = ["tiny_vit"]


def tiny_vit(width: int = 64, depth: int = 4, heads: int = 4) -> StagedBackbone:
    """A ``depth``-block ViT of ``width`` channels for 32 px images (4 px patches)."""
    from torchvision.models.vision_transformer import VisionTransformer

    from probing.zoo import staged_backbone

    vit = VisionTransformer(image_size=32, patch_size=4, num_layers=depth, num_heads=heads, hidden_dim=width, mlp_dim=2 * width)
    staged = staged_backbone("vit", vit)
    config = BackboneConfig(DIGITS_MEAN, DIGITS_STD, staged.config.layer_stages)
    return StagedBackbone(staged.stages, config, staged.out_channels)


_supervised = _pretrain("supervised", 15)
_supervised.code += ("probing.zoo",)  # the staging code decides the weights too

BACKBONES.register("tiny_vit_sup")(
    BackboneEntry(
        build=tiny_vit,
        pretrain=_supervised,
        description="4-block ViT (64 channels, 4 px patches), supervised pre-training on the digits train split",
        traits=frozenset({"vit"}),
    )
)
