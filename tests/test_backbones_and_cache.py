"""Embedded data, the pre-trained backbone cache and the feature cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probing.backbones import BACKBONES, cache_dir, create_backbone, pretrained_weights_file
from probing.embedded_backbones import tiny_resnet
from probing.datasets import Split, create_dataset
from probing.features import feature_cache_path, cached_features, compute_features


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    assert (len(train), len(val)) == (1438, 359)  # sklearn ships 1797 digits
    assert train.images.shape[1:] == (3, 32, 32) and 0.0 <= float(train.images.min()) <= float(train.images.max()) <= 1.0
    assert torch.bincount(val.labels, minlength=10).min() >= 35  # every class about 20 %
    again = create_dataset("digits", "val")
    assert torch.equal(again.images, val.images)
    flat_train = {tuple(x.flatten().tolist()) for x in train.images[:, 0, ::4, ::4]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in val.images[:20, 0, ::4, ::4])


def test_digits_are_sklearns_digits_read_without_importing_sklearn():
    from sklearn.datasets import load_digits

    from probing.datasets import _digits_file

    pixels, labels = _digits_file()
    raw = load_digits()
    assert pixels.shape == (1797, 64) and (pixels == raw.data).all() and (labels == raw.target).all()


def test_a_trial_process_on_embedded_data_imports_neither_sklearn_nor_torchvision():
    """Each costs every Ray trial process 1-2 s at start (bench/sweep_overhead.py)."""
    code = (
        "import sys, sweeps.runner, sweeps.trainable; from probing.backbones import create_backbone; "
        "from probing.datasets import create_dataset; create_dataset('digits', 'val'); create_backbone('tiny_resnet_sup'); "
        "print(sorted(m for m in ('sklearn', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_dataset_and_split_are_named():
    with pytest.raises(ValueError, match="unknown dataset 'digit': known are coco2014, digits, imagefolder, voc2007; did you mean 'digits'"):
        create_dataset("digit", "train")
    with pytest.raises(ValueError, match="unknown split 'test': known are train, val"):
        create_dataset("digits", "test")


def test_backbone_is_pretrained_once_then_read_from_the_cache():
    messages = []
    first = create_backbone("tiny_resnet_sup", log=messages.append)
    second_messages = []
    second = create_backbone("tiny_resnet_sup", log=second_messages.append)
    assert pretrained_weights_file("tiny_resnet_sup").is_file() and pretrained_weights_file("tiny_resnet_sup").parent == cache_dir() / "backbones"
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


def test_feature_cache_computes_once_and_rebuilds_a_truncated_or_corrupted_shard_alone():
    backbone, split = _untrained_backbone(), _tiny_split(10)
    log = []
    features = cached_features(backbone, split, "tiny", "train", log=log.append, shard_rows=4)
    assert features.shape == (10, 64, 8, 8) and any("computing" in m and "3 of 3 shards" in m for m in log)
    folder = feature_cache_path(backbone, split, "tiny", "train", torch.float32)
    assert "test_resnet-abc123" in str(folder) and sorted(p.name for p in folder.glob("*.npy")) == [f"shard-0000{i}.npy" for i in range(3)]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backbone_digest"] == "abc123" and manifest["dtype"] == "float32" and manifest["layer"] == "final"
    assert [s["rows"] for s in manifest["shards"]] == [[0, 4], [4, 8], [8, 10]] and manifest["row_shape"] == [64, 8, 8]
    expected = compute_features(backbone, split.images)
    assert torch.equal(features[:], expected)

    log.clear()
    again = cached_features(backbone, split, "tiny", "train", log=log.append)
    assert log == [] and torch.equal(again[:], expected)
    shard = folder / "shard-00001.npy"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # truncate: a crash mid-write on a non-atomic store
        f.truncate(size // 2)
    log.clear()
    rebuilt = cached_features(backbone, split, "tiny", "train", log=log.append, verify=False)  # a reader: sizes only
    assert any("1 of 3 shards" in m for m in log) and torch.equal(rebuilt[:], expected)
    assert shard.stat().st_size == size and not list(folder.glob("*.tmp*"))

    raw = bytearray(shard.read_bytes())  # flip bytes inside the data: the shard still loads, at its size
    where = raw.find(expected[5].numpy().tobytes()[:64])
    assert where > 0
    raw[where : where + 8] = b"\xff" * 8  # (post-ReLU features are often exactly 0)
    shard.write_bytes(bytes(raw))
    untouched = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.npy") if p != shard}
    log.clear()
    rebuilt = cached_features(backbone, split, "tiny", "train", log=log.append)  # verify: every checksum
    assert any("fails its checksum" in m for m in log) and any("1 of 3 shards" in m for m in log)
    assert torch.equal(rebuilt[:], expected)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.npy") if p != shard} == untouched  # rebuilt alone


def test_sharded_features_index_like_the_tensor_they_hold():
    backbone, split = _untrained_backbone(), _tiny_split(10)
    features = cached_features(backbone, split, "tiny", "train", log=lambda m: None, shard_rows=3)
    expected = compute_features(backbone, split.images)
    order = torch.tensor([9, 0, 4, 3, 3, 7])  # across shards, unsorted, repeated: as a shuffled batch
    assert torch.equal(features[order], expected[order]) and torch.equal(features[2:8], expected[2:8])
    assert torch.equal(features[5], expected[5]) and len(features) == 10 and features.dtype == torch.float32
    assert torch.equal(features[-1], expected[-1]) and torch.equal(features[torch.tensor([-2, 1])], expected[[-2, 1]])


def test_feature_cache_in_float16_is_a_separate_half_size_cache():
    backbone, split = _untrained_backbone(), _tiny_split()
    full = cached_features(backbone, split, "tiny", "train", log=lambda m: None)
    half = cached_features(backbone, split, "tiny", "train", log=lambda m: None, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half[:].float(), full[:], rtol=1e-3, atol=1e-3)
    folders = [feature_cache_path(backbone, split, "tiny", "train", d) for d in (torch.float32, torch.float16)]
    sizes = [sum(f.stat().st_size for f in folder.glob("*.npy")) for folder in folders]
    assert sizes[1] < 0.6 * sizes[0]


def test_feature_cache_keeps_splits_of_one_name_apart():
    backbone = _untrained_backbone()
    six, four = _tiny_split(6), _tiny_split(4)
    assert len(cached_features(backbone, six, "tiny", "val", log=lambda m: None)) == 6
    log = []
    assert len(cached_features(backbone, four, "tiny", "val", log=log.append)) == 4
    assert any("computing" in m for m in log)  # its own cache, not the other split's
    folders = {feature_cache_path(backbone, s, "tiny", "val", torch.float32) for s in (six, four)}
    assert len(folders) == 2 and all((f / "manifest.json").is_file() for f in folders)


CACHE_WORKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_backbones_and_cache import _tiny_split, _untrained_backbone
from probing.features import cached_features
barrier = Path({barrier!r})
(barrier / sys.argv[1]).touch()
while len(list(barrier.iterdir())) < 2:  # both ask at the same moment, once both have imported
    time.sleep(0.001)
log = []
cached_features(_untrained_backbone(), _tiny_split(), "tiny", "train", log=log.append)
print("\\n".join(log))
"""


def test_concurrent_requests_compute_the_features_once(tmp_path):
    """Two processes ask for the same features at once: one computes, the other waits and reads."""
    (tmp_path / "ready").mkdir()
    code = CACHE_WORKER.format(tests=str(Path(__file__).parent), barrier=str(tmp_path / "ready"))
    env = {**os.environ, "PROBESWEEP_CACHE": str(tmp_path / "cache")}
    workers = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0]
    assert sum("computing" in out for out in outputs) == 1


def _linear_probe_accuracy(backbone) -> float:
    from sklearn.linear_model import LogisticRegression

    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    train_x, val_x = (compute_features(backbone, s.images).mean(dim=(2, 3)).numpy() for s in (train, val))
    return LogisticRegression(max_iter=2000).fit(train_x, train.labels.numpy()).score(val_x, val.labels.numpy())


@pytest.mark.parametrize("name, gain", [("tiny_resnet_ssl", 0.3), ("tiny_bcos_resnet", 0.05)])
def test_embedded_pretraining_schemes_learn_features(name, gain):
    """The self-supervised (SimSiam) and B-cos backbones, pre-trained at first use: a linear probe
    on their pooled features classifies the digits far better than on the same network untrained
    (measured: SimSiam 0.92 vs 0.22; B-cos 0.99 vs 0.88, random B-cos features are already good)."""
    backbone = create_backbone(name)
    untrained = BACKBONES.get(name).build().eval()
    trained_accuracy, untrained_accuracy = _linear_probe_accuracy(backbone), _linear_probe_accuracy(untrained)
    assert trained_accuracy > 0.85 and trained_accuracy > untrained_accuracy + gain


def test_the_pretraining_key_changes_with_the_recipe_and_the_code(monkeypatch):
    """The embedded backbones' cache files (and the tests' per-machine copies of them) are named by
    a hash of the pre-training recipe and code: a change to either pre-trains again."""
    from probing.backbones import BackboneEntry, pretraining_key
    from probing.embedded_backbones import _pretrain

    keys = {name: pretraining_key(name) for name in ("tiny_resnet_sup", "tiny_resnet_ssl", "tiny_bcos_resnet", "tiny_vit_sup")}
    assert len(set(keys.values())) == 4 and keys["tiny_resnet_sup"] == pretraining_key("tiny_resnet_sup")
    for name, pretrain in [("fewer_epochs", _pretrain("supervised", 14)), ("other_scheme", _pretrain("simsiam", 15))]:
        monkeypatch.setitem(BACKBONES._entries, name, BackboneEntry(build=tiny_resnet, pretrain=pretrain))
    monkeypatch.setitem(BACKBONES._entries, "same", BackboneEntry(build=tiny_resnet, pretrain=_pretrain("supervised", 15)))
    renamed = {n: pretraining_key(n) for n in ("fewer_epochs", "other_scheme", "same")}
    assert len(set(renamed.values())) == 3 and keys["tiny_resnet_sup"] not in renamed.values()  # the name counts too
    assert pretraining_key("same") != pretraining_key("fewer_epochs")
    # the same recipe under the same name gives the same key; other code gives another
    monkeypatch.setitem(BACKBONES._entries, "tiny_resnet_sup", BackboneEntry(build=tiny_resnet, pretrain=_pretrain("supervised", 15)))
    assert pretraining_key("tiny_resnet_sup") == keys["tiny_resnet_sup"]
    monkeypatch.setattr("inspect.getsource", lambda module: "changed code " + module.__name__)
    assert pretraining_key("tiny_resnet_sup") != keys["tiny_resnet_sup"]


@pytest.mark.parametrize("damage", ["overwritten bytes", "truncated", "empty", "no checksum"])
def test_a_damaged_backbone_cache_is_rebuilt_never_used(tmp_path, monkeypatch, damage):
    from probing.backbones import BACKBONES, BackboneEntry, create_backbone
    from probing.embedded_backbones import tiny_resnet

    monkeypatch.setenv("PROBESWEEP_CACHE", str(tmp_path))
    trained = []

    def pretrain(backbone, log):  # cheap and recognisable: every weight 0.5
        trained.append(1)
        with torch.no_grad():
            for p in backbone.parameters():
                p.fill_(0.5)

    monkeypatch.setitem(BACKBONES._entries, "test_cached", BackboneEntry(build=lambda: tiny_resnet((4, 8, 16)), pretrain=pretrain))
    log = []
    first = create_backbone("test_cached", log=log.append)
    assert trained == [1] and create_backbone("test_cached", log=log.append).digest == first.digest and trained == [1]
    weights = pretrained_weights_file("test_cached")
    assert weights.parent == tmp_path / "backbones"
    data = weights.read_bytes()
    if damage == "overwritten bytes":
        weights.write_bytes(data[:400] + bytes(64) + data[464:])  # loads without error, other weights
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.with_suffix(".sha256").unlink()
    log.clear()
    again = create_backbone("test_cached", log=log.append)
    assert trained == [1, 1] and any(f"backbone cache {weights}" in m for m in log)
    assert all((p == 0.5).all() for p in again.parameters()) and again.digest == first.digest


def test_the_tests_ship_each_embedded_backbone_as_the_current_code_pre_trains_it():
    """tests/data/backbones holds every embedded backbone under its current pre-training key, so
    that a fresh clone's tests (CI) do not pre-train them. After a change to a recipe or to the
    pre-training code, a test session pre-trains again and leaves the new files in
    .test-cache/backbones: copy them there."""
    import hashlib

    from conftest import SHIPPED_BACKBONES

    embedded = [name for name in BACKBONES.names() if BACKBONES.get(name).pretrain is not None]
    assert len(embedded) == 4  # tiny_resnet_sup, tiny_resnet_ssl, tiny_bcos_resnet, tiny_vit_sup
    for name in embedded:
        shipped = SHIPPED_BACKBONES / pretrained_weights_file(name).name
        assert shipped.is_file(), f"{shipped.name} is not in {SHIPPED_BACKBONES}: copy it from .test-cache/backbones"
        assert shipped.with_suffix(".sha256").read_text().strip() == hashlib.sha256(shipped.read_bytes()).hexdigest()
