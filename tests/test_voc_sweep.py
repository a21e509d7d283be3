"""A sweep on a small PASCAL VOC 2007 data set written here in its real layout: multi-label BCE
probes on the embedded ResNet and ViT, EPG and the pointing game against the boxes (the ViT's
attention methods too), everything read back from MLflow."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from probing.image_data import VOC_CLASSES

pytestmark = pytest.mark.slow
PROBESWEEP = str(Path(sys.executable).with_name("probesweep"))
OBJECT = "<object><name>{}</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def _voc(root: Path, n: int = 24) -> Path:
    """Images with a bright square where the object is; the class follows the square's colour."""
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    colours = {"dog": (250, 30, 30), "cat": (30, 250, 30), "car": (30, 30, 250)}
    ids = []
    for i in range(n):
        name = list(colours)[i % 3]
        x0, y0 = (int(v) for v in torch.randint(0, 30, (2,), generator=generator))
        pixels = torch.full((64, 64, 3), 40, dtype=torch.uint8)
        pixels[y0 : y0 + 30, x0 : x0 + 30] = torch.tensor(colours[name], dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(voc / "JPEGImages" / f"{i:06d}.jpg", quality=95)
        (voc / "Annotations" / f"{i:06d}.xml").write_text(
            "<annotation><size><width>64</width><height>64</height></size>"
            + OBJECT.format(name, x0 + 1, y0 + 1, x0 + 30, y0 + 30) + "</annotation>"
        )  # fmt: skip
        ids.append(f"{i:06d}")
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids[: n * 2 // 3]))
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids[n * 2 // 3 :]))
    return root


def test_voc_sweep_scores_epg_and_the_pointing_game_against_the_boxes(tmp_path):
    root = _voc(tmp_path / "voc")
    spec = {
        "name": "voc",
        "data": {"dataset": "voc2007", "root": str(root), "size": 32},
        "backbones": ["tiny_resnet_sup", "tiny_vit_sup"],
        "probe": {"loss": "bce_multilabel", "head": {"type": "linear"}},
        # 10 epochs of one batch: without a logit bias (the reference's multi-label setting) 3 steps
        # left the probe at 0.6 val accuracy, and its maps diffuse (measured: EPG 0.26 vs 0.36 at 10)
        "train": {"epochs": 10, "lr": 0.05},
        # raw maps (smoothing none): the reference's 129 px Gaussian would spread them over these 32 px images
        # every method of issue 19 in a sweep; the attention methods explain the ViT only: left
        # out of the ResNet's trial (refused: skip)
        "evaluate": {"methods": ["ixg", "gradcam", "grad", "gradcampp", "layercam", "ablationcam", "rise", "rollout",
                                 "attention_grad", "attnlrp", "cgw1", "vitcx"],
                     "layers": ["input", "final"], "method_options": {"rise": {"n_masks": 64}},
                     "metrics": ["epg", "pointing_game"], "n_images": 8, "smoothing": "none", "refused": "skip"},
        "tracking": {"experiment": "voc"},
    }
    (tmp_path / "voc.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run([PROBESWEEP, "run", "voc.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("voc").experiment_id])
    children = {r.data.params["backbone.name"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    child, vit = children["tiny_resnet_sup"], children["tiny_vit_sup"]
    assert child.data.tags["methods_left_out"] == "rollout, attention_grad, attnlrp, cgw1, vitcx" and "methods_left_out" not in vit.data.tags
    for key in ("rollout/input", "attention_grad/input", "attnlrp/input", "cgw1/input", "vitcx/input", "ixg/input", "gradcam/final"):
        for metric in ("epg", "pointing_game"):
            assert vit.info.status == "FINISHED" and 0.0 <= vit.data.metrics[f"{metric}/{key}"] <= 1.0
    for key in ("grad/input", "grad/final", "gradcampp/final", "layercam/final", "ablationcam/final", "rise/input"):
        assert 0.0 <= child.data.metrics[f"epg/{key}"] <= 1.0 and 0.0 <= child.data.metrics[f"pointing_game/{key}"] <= 1.0
    metrics = child.data.metrics
    assert child.info.status == "FINISHED" and metrics["epg/rows"] == 8.0 and metrics["val/accuracy"] > 0.9
    for key in ("epg/ixg/input", "epg/ixg/final", "epg/gradcam/final"):
        assert 0.0 <= metrics[key] <= 1.0
        hits = metrics[key.replace("epg/", "pointing_game/")] * 8  # a hit rate over the 8 rows
        assert hits == pytest.approx(round(hits)) and metrics[key.replace("epg/", "pointing_game/") + "/ci_low"] <= hits / 8
    # a box covers about 22% of the image: attribution concentrated on the objects beats that
    assert metrics["epg/ixg/input"] > 0.3
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "examples")}
    assert "examples/epg-ixg-input.png" in artifacts
    assert len(VOC_CLASSES) == 20 and "epg/gradcam/final" in result.stdout


def test_grid_metrics_are_refused_on_voc(tmp_path):
    from sweeps.spec import SpecError, parse_spec

    root = _voc(tmp_path / "voc", n=3)
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "data": {"dataset": "voc2007", "root": str(root)}, "backbones": "tiny_resnet_sup",
                    "probe": {"loss": "bce_multilabel"}, "evaluate": {"metrics": ["gridpg"]}})  # fmt: skip
    assert err.value.problems == [
        "evaluate.metrics: 'gridpg' needs single-label images for its grids, not 'voc2007'"
    ]
