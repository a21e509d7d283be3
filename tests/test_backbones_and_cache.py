"""Embedded data, the pre-trained backbone cache and the feature cache."""

import os

import pytest
import torch

from probing.backbones import cache_dir, create_backbone, tiny_resnet
from probing.datasets import Split, create_dataset
from probing.features import cached_features, compute_features


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    assert (len(train), len(val)) == (1438, 359)  # sklearn ships 1797 digits
    assert train.images.shape[1:] == (3, 32, 32) and 0.0 <= float(train.images.min()) <= float(train.images.max()) <= 1.0
    assert torch.bincount(val.labels, minlength=10).min() >= 35  # every class about 20 %
    again = create_dataset("digits", "val")
    assert torch.equal(again.images, val.images)
    flat_train = {tuple(x.flatten().tolist()) for x in train.images[:, 0, ::4, ::4]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in val.images[:20, 0, ::4, ::4])


def test_unknown_dataset_and_split_are_named():
    with pytest.raises(ValueError, match="unknown dataset 'digit': known are digits; did you mean 'digits'"):
        create_dataset("digit", "train")
    with pytest.raises(ValueError, match="unknown split 'test': known are train, val"):
        create_dataset("digits", "test")


def test_backbone_is_pretrained_once_then_read_from_the_cache():
    messages = []
    first = create_backbone("tiny_resnet_sup", log=messages.append)
    second_messages = []
    second = create_backbone("tiny_resnet_sup", log=second_messages.append)
    assert (cache_dir() / "backbones" / "tiny_resnet_sup.pt").is_file()
    assert second_messages == []  # no training the second time
    assert first.digest == second.digest
    assert not any(p.requires_grad for p in second.parameters()) and not second.training
    val = create_dataset("digits", "val")
    linear_readout = compute_features(second, val.images).mean(dim=(2, 3))
    # the pre-trained features separate the classes: nearest class mean classifies most images
    means = torch.stack([linear_readout[val.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(linear_readout, means).argmin(1) == val.labels).float().mean()
    assert accuracy > 0.8


def _tiny_split(n=6):
    return Split(torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 2, ("a", "b"))


def _untrained_backbone():
    torch.manual_seed(0)
    backbone = tiny_resnet().eval().requires_grad_(False)
    backbone.name, backbone.digest = "test_resnet", "abc123"
    return backbone


def test_feature_cache_computes_once_and_rebuilds_a_corrupt_file():
    backbone, split = _untrained_backbone(), _tiny_split()
    log = []
    features = cached_features(backbone, split, "tiny", "train", log=log.append)
    assert features.shape == (6, 64, 8, 8) and any("computing" in m for m in log)
    path = cache_dir() / "features" / "test_resnet-abc123" / "tiny-train.pt"

    log.clear()
    again = cached_features(backbone, split, "tiny", "train", log=log.append)
    assert log == [] and torch.equal(again, features)

    size = path.stat().st_size
    with open(path, "r+b") as f:  # truncate: a crash mid-write on a non-atomic store
        f.truncate(size // 2)
    log.clear()
    rebuilt = cached_features(backbone, split, "tiny", "train", log=log.append)
    assert any("unreadable" in m for m in log) and torch.equal(rebuilt, features)
    assert path.stat().st_size == size and not list(path.parent.glob("*.tmp"))


def test_feature_cache_rebuilds_on_a_split_mismatch():
    backbone = _untrained_backbone()
    cached_features(backbone, _tiny_split(6), "tiny", "val", log=lambda m: None)
    log = []
    features = cached_features(backbone, _tiny_split(4), "tiny", "val", log=log.append)
    assert len(features) == 4 and any("does not match" in m for m in log)
    assert os.path.exists(cache_dir() / "features" / "test_resnet-abc123" / "tiny-val.pt")
