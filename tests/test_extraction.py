"""Feature extraction through Ray Data into the sharded cache, on a synthetic ImageFolder of 2,000
small JPEGs. An extraction killed with SIGKILL leaves its finished shards; then two sweeps need the
features at once: one resumes the extraction and computes only the missing shards and a finished
one corrupted meanwhile (a corrupt shard of a complete cache: tests/test_backbones_and_cache.py),
the other waits for it and computes none; the shards equal the features computed in one process.
Each extraction runs in a driver process with a real local Ray."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from probing.backbones import create_backbone
from probing.datasets import create_dataset
from probing.features import compute_features, feature_cache_path
from probing.shards import ShardedFeatures, read_manifest

pytestmark = pytest.mark.slow
CLASSES, PER_CLASS = 10, 200  # 2,000 images: 1,600 train, 400 val
SHARD_ROWS = 50


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of 2,000 16 px JPEGs: a colour per class, noise per image."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for c in range(CLASSES):
        colour = torch.randint(0, 256, (3,), generator=generator)
        for i in range(PER_CLASS):
            split = "val" if i % 5 == 0 else "train"
            noise = torch.randint(-40, 40, (16, 16, 3), generator=generator)
            pixels = (colour + noise).clamp(0, 255).to(torch.uint8).numpy()
            path = root / split / f"class{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
    return root


def _spec(root: Path, name: str = "extract") -> dict:
    return {
        "name": name, "backbones": ["tiny_resnet_sup"],
        "data": {"dataset": "imagefolder", "root": str(root), "size": 32},
        "evaluate": {"methods": ["ixg"], "layers": ["input"], "smoothing": "none"},
    }  # fmt: skip


DRIVER = """
import json, sys
import ray
from sweeps.extraction import extract_features
from sweeps.spec import parse_spec
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
lines = []
def log(line):
    lines.append(line)
    print(line, flush=True)
try:
    computed = extract_features(parse_spec(json.loads(sys.argv[1])), log, shard_rows={shard_rows})
finally:
    ray.shutdown()
print("COMPUTED", computed, flush=True)
"""


def _ray_tmp() -> Path:
    """A RAY_TMPDIR of a driver's own, short (Ray's socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="x", dir=os.environ["RAY_TMPDIR"]))


def _driver(spec: dict, cache: Path, ray_tmp: Path) -> subprocess.Popen:
    """``extract_features`` in a driver process of its own, with a local Ray of its own."""
    env = {**os.environ, "PROBESWEEP_CACHE": str(cache), "RAY_TMPDIR": str(ray_tmp)}
    code = DRIVER.format(shard_rows=SHARD_ROWS)
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def _stop_ray_of(ray_tmp: Path) -> None:
    """Kill what a killed driver's Ray left (its processes carry the driver's RAY_TMPDIR)."""
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == str(ray_tmp):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _computed(output: str) -> int:
    return int(next(line for line in output.splitlines() if line.startswith("COMPUTED")).split()[1])


def _seed_backbone_cache(cache: Path) -> None:
    """The session's pre-trained embedded backbones, so that the drivers do not pre-train again."""
    from probing.backbones import cache_dir

    (cache / "backbones").mkdir(parents=True, exist_ok=True)
    for source in (cache_dir() / "backbones").glob("tiny_resnet_sup-*"):
        if source.suffix in (".pt", ".sha256"):
            (cache / "backbones" / source.name).write_bytes(source.read_bytes())


def _folders(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("features/*/*/layout.json"))


def test_a_killed_extraction_resumes_once_for_two_sweeps_into_the_features_of_one_process(
    folder, tmp_path, monkeypatch
):
    create_backbone("tiny_resnet_sup", log=lambda m: None)  # pre-trained once for the session
    cache = tmp_path / "cache"
    _seed_backbone_cache(cache)
    monkeypatch.setenv("PROBESWEEP_CACHE", str(cache))  # this test's own cache, the drivers' too
    ray_tmps = [_ray_tmp() for _ in range(3)]
    first = _driver(_spec(folder), cache, ray_tmps[0])
    try:
        deadline = time.monotonic() + 300
        while sum(len(list(f.glob("shard-*.npy"))) for f in _folders(cache)) < 3:  # some shards, not all
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:] if first.poll() is not None else "slow"
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        _stop_ray_of(ray_tmps[0])
    kept = {f: sorted(p.name for p in f.glob("shard-*.npy")) for f in _folders(cache)}
    total = -(-1600 // SHARD_ROWS) + -(-400 // SHARD_ROWS)
    assert 3 <= sum(map(len, kept.values())) < total and not any((f / "manifest.json").exists() for f in kept)
    # and one finished shard corrupt: the rerun rebuilds it with the missing ones
    corrupt = next(f / names[0] for f, names in kept.items() if names)
    raw = bytearray(corrupt.read_bytes())
    raw[-8:] = b"\x7f" * 8
    corrupt.write_bytes(bytes(raw))
    # two sweeps that need these features now: one resumes the extraction, the other waits for it
    drivers = [_driver(_spec(folder, f"sweep{i}"), cache, ray_tmps[1 + i]) for i in range(2)]
    try:
        outputs = [d.communicate(timeout=600)[0] for d in drivers]
    finally:
        for i, d in enumerate(drivers):
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)
            _stop_ray_of(ray_tmps[1 + i])
    assert [d.returncode for d in drivers] == [0, 0], [o[-2000:] for o in outputs]
    computed = [_computed(o) for o in outputs]
    # the resuming one computes only the missing shards and the corrupt one; the other none
    assert sorted(computed) == [0, total - sum(map(len, kept.values())) + 1], outputs
    resumed, waited = outputs[computed.index(max(computed))], outputs[computed.index(0)]
    assert "extracting features on the cluster" in resumed, resumed[-3000:]
    assert f"{corrupt.name} fails its checksum" in resumed, resumed[-3000:]
    assert "waiting for another process's extraction" in waited, waited[-3000:]

    # the shards hold what one process computes, and say which node computed them
    backbone = create_backbone("tiny_resnet_sup", log=lambda m: None)
    for split, n_rows in (("train", 1600), ("val", 400)):
        data = create_dataset("imagefolder", split, root=str(folder), size=32)
        shard_folder = feature_cache_path(backbone, data, "imagefolder", split, torch.float32)
        manifest = read_manifest(shard_folder)
        facts = (manifest["n_rows"], manifest["shard_rows"], manifest["backbone_digest"])
        assert facts == (n_rows, SHARD_ROWS, backbone.digest)
        assert all(len(s["node"]) > 8 for s in manifest["shards"])
        torch.testing.assert_close(
            ShardedFeatures(shard_folder, manifest)[:], compute_features(backbone, data.images), rtol=1e-5, atol=1e-6
        )
