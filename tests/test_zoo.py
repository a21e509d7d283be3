"""Backbones with published weights, loaded from files in the formats their authors publish
(random weights written here), strictly, with their ML-Att layers."""

import pytest
import torch
import torchvision

from probing.backbones import create_backbone
from probing.zoo import remap_checkpoint


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights and BatchNorm statistics that are not the defaults (so that a skipped load shows)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def _resnet18_features(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _formats(state):
    """The same weights as torchvision, DINO (teacher), MoCo v2 and BYOL files lay them out."""
    no_fc = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return {
        "torchvision": state,
        "dino": {"teacher": {f"module.backbone.{k}": v for k, v in no_fc.items()} | {"module.head.mlp.0.weight": torch.ones(2)}},
        "mocov2": {
            "epoch": 200,
            "state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}
            | {f"module.encoder_k.{k}": v + 1 for k, v in no_fc.items()}
            | {"module.queue": torch.zeros(3)},
        },
        "byol": {"state_dict": {f"module.online_backbone.{k}": v for k, v in no_fc.items()}},
    }


@pytest.mark.parametrize("checkpoint_format", ["torchvision", "dino", "mocov2", "byol"])
def test_resnet18_loads_each_checkpoint_format(tmp_path, checkpoint_format):
    reference = _perturbed(torchvision.models.resnet18())
    path = tmp_path / "weights.pth"
    torch.save(_formats(reference.state_dict())[checkpoint_format], path)
    backbone = create_backbone("resnet18", weights=str(path), checkpoint_format=checkpoint_format)
    images = torch.rand(2, 3, 64, 64)
    x = backbone.preprocess(images)
    assert torch.allclose(backbone(x), _resnet18_features(reference, x), atol=1e-5)
    assert backbone.forward_to(x, "middle").shape == (2, 128, 8, 8)  # after layer2
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert len(backbone.digest) == 12


def test_a_key_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer3.0.conv1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: layer3\.0\.conv1\.weight; unexpected keys: layer9\.weight"):
        create_backbone("resnet18", weights=str(path))
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="not a MoCo v2 checkpoint"):
        create_backbone("resnet18", weights=str(path), checkpoint_format="mocov2")


def test_weights_come_from_the_torch_hub_cache_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="ResNet18_Weights.DEFAULT\\): put resnet18-f37072fd.pth in .*torch/hub/checkpoints, or set weights: PATH"):
        create_backbone("resnet18")
    reference = _perturbed(torchvision.models.resnet18())
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    backbone = create_backbone("resnet18")
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(backbone(x), _resnet18_features(reference, x), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="'resnet50_dino' needs its weights file: set weights: PATH"):
        create_backbone("resnet50_dino")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": torchvision.models.resnet18()}, path)  # a module object, not tensors
    with pytest.raises(ValueError, match=f"cannot load checkpoint {path}"):
        create_backbone("resnet18", weights=str(path))


@pytest.mark.full_size
def test_vgg11_layers_follow_ml_att(tmp_path):
    reference = _perturbed(torchvision.models.vgg11())
    path = tmp_path / "vgg11.pth"
    # the classifier (102M of its 133M weights) is never loaded: left out of the file, which saves its writing
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("classifier.")}, path)
    backbone = create_backbone("vgg11", weights=str(path))
    x = torch.rand(1, 3, 64, 64)
    assert backbone.forward_to(x, "middle").shape == (1, 512, 8, 8)  # after conv5 (and its ReLU)
    assert backbone.forward_to(x, "final").shape == (1, 512, 4, 4)  # last conv, before the last max-pool
    assert torch.allclose(backbone(x), reference.features(x), atol=1e-5) and backbone.out_channels == 512


@pytest.mark.full_size
def test_vgg16_middle_layer_is_at_stride_8_like_vgg11s():
    from probing.backbones import BACKBONES

    backbone = BACKBONES.get("vgg16").build().eval()
    x = torch.rand(1, 3, 64, 64)
    middle = backbone.forward_to(x, "middle")
    assert middle.shape == (1, 512, 8, 8)  # conv4_1 and its ReLU, not conv3_1 (256 channels at stride 4)
    assert isinstance(backbone.stages[0][-1], torch.nn.ReLU) and isinstance(backbone.stages[0][-2], torch.nn.Conv2d)


@pytest.mark.full_size
def test_vit_b_16_gives_a_patch_map_a_middle_layer_that_keeps_the_class_token_and_reads_grids(tmp_path):
    reference = torchvision.models.vit_b_16().eval()
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("vit_b_16", weights=str(path))
    x = torch.rand(1, 3, 224, 224)
    features = backbone(x)
    assert features.shape == (1, 768, 14, 14)
    tokens = reference.encoder(torch.cat([reference.class_token, reference._process_input(x)], dim=1))
    assert torch.allclose(features.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-4)
    middle = backbone.forward_to(x, "middle")
    assert middle.shape == (1, 1536, 14, 14)  # patch tokens, then the class token spread over positions
    torch.testing.assert_close(backbone.forward_from(middle, "middle"), features, rtol=1e-4, atol=1e-4)
    # attribution at the middle layer is complete: x * grad sums to what a linear readout gives
    middle = middle.detach().requires_grad_(True)
    readout = backbone.forward_from(middle, "middle").mean()
    (grad,) = torch.autograd.grad(readout, middle)
    assert grad[:, 768:].std(dim=(2, 3)).max() < 1e-6  # the class token's gradient is the same everywhere
    # a 2x2 grid of 224 px images: the 14x14 patch positions resized bicubically to 28x28 (by hand)
    import torch.nn.functional as F

    grid_features = backbone(backbone.preprocess(torch.rand(1, 3, 448, 448)))
    assert grid_features.shape == (1, 768, 28, 28) and torch.isfinite(grid_features).all()
    positions = reference.encoder.pos_embedding
    patches = F.interpolate(positions[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2), size=(28, 28), mode="bicubic")
    expected = torch.cat([positions[:, :1], patches.permute(0, 2, 3, 1).reshape(1, 784, 768)], dim=1)
    torch.testing.assert_close(backbone.stages[0]._positions(28), expected)
    with pytest.raises(ValueError, match="square images whose side is a multiple of 16 px, got 224x200"):
        backbone(torch.rand(1, 3, 224, 200))


@pytest.mark.full_size
def test_bcos_resnet50_checkpoint_loads_with_its_6_channel_input(tmp_path):
    from bcos.models.pretrained import resnet50

    reference = resnet50(pretrained=False).eval()
    path = tmp_path / "resnet_50-ead259efe4.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("bcos_resnet50", weights=str(path))
    images = torch.rand(1, 3, 64, 64)
    x = backbone.preprocess(images)
    assert x.shape == (1, 6, 64, 64)
    assert torch.allclose(backbone(x), reference.forward_features(x), atol=1e-4)


def test_remap_names_unknown_formats():
    with pytest.raises(ValueError, match="unknown checkpoint_format 'swav': known are torchvision, dino, mocov2, byol, bcos, clip, dino_vit"):
        remap_checkpoint({}, "swav")


def test_a_full_dino_training_checkpoint_with_its_argparse_args_loads(tmp_path):
    import argparse

    reference = _perturbed(torchvision.models.resnet18())
    full = _formats(reference.state_dict())["dino"] | {"args": argparse.Namespace(arch="resnet50", lr=0.3), "epoch": 800}
    torch.save(full, tmp_path / "checkpoint.pth")  # as DINO's main_dino.py saves it
    backbone = create_backbone("resnet18", weights=str(tmp_path / "checkpoint.pth"), checkpoint_format="dino")
    x = backbone.preprocess(torch.rand(1, 3, 64, 64))
    assert torch.allclose(backbone(x), _resnet18_features(reference, x), atol=1e-5)


@pytest.mark.full_size
@pytest.mark.parametrize("tag, file", [("IMAGENET1K_V1", "resnet50-0676ba61.pth"), ("IMAGENET1K_V2", "resnet50-11ad3fa6.pth")])
def test_a_torchvision_weights_tag_reads_that_file_from_the_hub_cache_and_names_it(tmp_path, monkeypatch, tag, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    reference = _perturbed(torchvision.models.resnet50())
    torch.save(reference.state_dict(), checkpoints / file)
    backbone = create_backbone("resnet50", weights=tag)
    assert backbone.weights_file == file
    x = backbone.preprocess(torch.rand(1, 3, 64, 64))
    features = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
        reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))  # fmt: skip
    assert torch.allclose(backbone(x), features, atol=1e-4)
    other = "IMAGENET1K_V2" if tag == "IMAGENET1K_V1" else "IMAGENET1K_V1"
    with pytest.raises(FileNotFoundError, match=f"ResNet50_Weights.{other}\\): put resnet50-"):
        create_backbone("resnet50", weights=other)
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K' for backbone 'resnet50': use a file path or one of IMAGENET1K_V1, IMAGENET1K_V2"):
        create_backbone("resnet50", weights="IMAGENET9K")


def _clip_state(seed: int = 1) -> dict:
    """Random weights in OpenAI's CLIP RN50 layout: ``visual.`` trunk and attention pool, text model."""
    from probing.clip_resnet import ClipResNet

    trunk = _perturbed(ClipResNet())
    generator = torch.Generator().manual_seed(seed)
    state = {f"visual.{k}": (v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() and "running" not in k else v)
             for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}  # fmt: skip
    state |= {"visual.attnpool.positional_embedding": torch.zeros(50, 2048), "visual.attnpool.k_proj.weight": torch.zeros(2048, 2048)}
    state |= {"token_embedding.weight": torch.zeros(49408, 8), "ln_final.weight": torch.ones(512), "logit_scale": torch.tensor(4.6)}
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}  # OpenAI's file is float16


def _clip_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """CLIP's ModifiedResNet forward up to layer4, written from OpenAI's code on the raw named weights."""
    import torch.nn.functional as F

    def conv(x, key, **kw):
        return F.conv2d(x, state[key].float(), **kw)

    def bn(x, key):
        return F.batch_norm(x, *(state[f"{key}.{n}"].float() for n in ("running_mean", "running_var", "weight", "bias")), eps=1e-5)

    for i, stride in ((1, 2), (2, 1), (3, 1)):  # the stem: three 3x3 convolutions, then a 2x2 average pool
        x = F.relu(bn(conv(x, f"visual.conv{i}.weight", stride=stride, padding=1), f"visual.bn{i}"))
    x = F.avg_pool2d(x, 2)
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p, stride = f"visual.layer{layer}.{b}.", 2 if layer > 1 and b == 0 else 1
            out = F.relu(bn(conv(x, p + "conv1.weight"), p + "bn1"))
            out = F.relu(bn(conv(out, p + "conv2.weight", padding=1), p + "bn2"))
            out = bn(conv(F.avg_pool2d(out, stride), p + "conv3.weight"), p + "bn3")
            if p + "downsample.0.weight" in state:  # an average pool, then a stride-1 1x1 convolution
                x = bn(conv(F.avg_pool2d(x, stride), p + "downsample.0.weight"), p + "downsample.1")
            x = F.relu(out + x)
    return x


@pytest.mark.full_size
def test_clip_resnet50_loads_openais_layout_without_its_attention_pool(tmp_path):
    state = _clip_state()
    torch.save(state, tmp_path / "RN50-state.pt")
    backbone = create_backbone("clip_resnet50", weights=str(tmp_path / "RN50-state.pt"))
    images = torch.rand(2, 3, 64, 64)
    x = backbone.preprocess(images)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    torch.testing.assert_close(x, (images - mean) / std)  # CLIP's own normalisation
    torch.testing.assert_close(backbone(x), _clip_reference(state, x), rtol=1e-4, atol=1e-4)
    assert backbone.forward_to(x, "middle").shape == (2, 512, 8, 8)  # after layer2, stride 8
    assert backbone(x).shape == (2, 2048, 2, 2)


@pytest.mark.full_size
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates tracing and saving TorchScript: OpenAI's format
def test_clip_resnet50_reads_openais_torchscript_archive(tmp_path):
    from probing.clip_resnet import ClipResNet

    class Clip(torch.nn.Module):  # what OpenAI's RN50.pt holds, as far as its state dict goes
        def __init__(self):
            super().__init__()
            self.visual = _perturbed(ClipResNet())
            self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

        def forward(self, x):
            return self.visual(x) * self.logit_scale

    model = Clip().eval()
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 64, 64)), str(tmp_path / "RN50.pt"))
    backbone = create_backbone("clip_resnet50", weights=str(tmp_path / "RN50.pt"))
    x = backbone.preprocess(torch.rand(1, 3, 64, 64))
    torch.testing.assert_close(backbone(x), model.visual(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no 'visual.' weights"):
        remap_checkpoint({"conv1.weight": torch.zeros(1)}, "clip")


class _DinoBlock(torch.nn.Module):
    """DINO's vision_transformer.Block, by its names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = torch.nn.Module()
        self.attn.qkv, self.attn.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Module()
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _DinoViT(torch.nn.Module):
    def __init__(self, dim, heads, depth=12):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, 16, 16)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 197, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(_DinoBlock(dim, heads) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):  # the normalised tokens (DINO's linear probe reads token 0)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.mark.parametrize("name, dim, heads", [("vit_s_16_dino", 384, 6), pytest.param("vit_b_16_dino", 768, 12, marks=pytest.mark.full_size)])
def test_dino_vits_load_dinos_key_layout(tmp_path, name, dim, heads):
    torch.manual_seed(0)
    reference = _DinoViT(dim, heads).eval()
    for p in reference.parameters():  # away from the default LayerNorm weights
        p.data.add_(0.01 * torch.randn_like(p))
    state = {f"module.backbone.{k}": v for k, v in reference.state_dict().items()} | {"module.head.mlp.0.weight": torch.zeros(2, dim)}
    torch.save(reference.state_dict(), tmp_path / "pretrain.pth")  # the released backbone file
    files = ["pretrain.pth"]
    if name == "vit_s_16_dino":  # a full training checkpoint too (the same renaming: ViT-S only, ViT-B is 4x the bytes)
        torch.save({"teacher": state, "epoch": 100}, tmp_path / "checkpoint.pth")
        files.append("checkpoint.pth")
    images = torch.rand(2, 3, 224, 224)
    for file in files:
        backbone = create_backbone(name, weights=str(tmp_path / file))
        x = backbone.preprocess(images)
        with torch.no_grad():
            tokens = reference(x)
            features = backbone(x)
        assert features.shape == (2, dim, 14, 14)
        torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens[:, 1:], rtol=1e-4, atol=1e-4)
        assert backbone.forward_to(x, "middle").shape == (2, 2 * dim, 14, 14)  # after block 6
