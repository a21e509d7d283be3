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


def test_vgg11_layers_follow_ml_att(tmp_path):
    reference = _perturbed(torchvision.models.vgg11())
    path = tmp_path / "vgg11.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("vgg11", weights=str(path))
    x = torch.rand(1, 3, 64, 64)
    assert backbone.forward_to(x, "middle").shape == (1, 512, 8, 8)  # after conv5 (and its ReLU)
    assert backbone.forward_to(x, "final").shape == (1, 512, 4, 4)  # last conv, before the last max-pool
    assert torch.allclose(backbone(x), reference.features(x), atol=1e-5) and backbone.out_channels == 512


def test_vgg16_middle_layer_is_at_stride_8_like_vgg11s():
    from probing.backbones import BACKBONES

    backbone = BACKBONES.get("vgg16").build().eval()
    x = torch.rand(1, 3, 64, 64)
    middle = backbone.forward_to(x, "middle")
    assert middle.shape == (1, 512, 8, 8)  # conv4_1 and its ReLU, not conv3_1 (256 channels at stride 4)
    assert isinstance(backbone.stages[0][-1], torch.nn.ReLU) and isinstance(backbone.stages[0][-2], torch.nn.Conv2d)


def test_vit_b_16_gives_a_patch_map_and_a_middle_layer_that_keeps_the_class_token(tmp_path):
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
    with pytest.raises(ValueError, match="unknown checkpoint_format 'swav': known are torchvision, dino, mocov2, byol, bcos"):
        remap_checkpoint({}, "swav")


def test_a_full_dino_training_checkpoint_with_its_argparse_args_loads(tmp_path):
    import argparse

    reference = _perturbed(torchvision.models.resnet18())
    full = _formats(reference.state_dict())["dino"] | {"args": argparse.Namespace(arch="resnet50", lr=0.3), "epoch": 800}
    torch.save(full, tmp_path / "checkpoint.pth")  # as DINO's main_dino.py saves it
    backbone = create_backbone("resnet18", weights=str(tmp_path / "checkpoint.pth"), checkpoint_format="dino")
    x = backbone.preprocess(torch.rand(1, 3, 64, 64))
    assert torch.allclose(backbone(x), _resnet18_features(reference, x), atol=1e-5)


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
