"""Data sets on disk, built here in their real formats (JPEG/PNG files, VOC XML, COCO JSON) and
loaded through the same code a user runs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from probing.datasets import create_dataset
from probing.embedded_backbones import tiny_resnet
from probing.features import cached_features
from probing.image_data import VOC_CLASSES, ImageLoadError


def _image(path, size=(40, 30), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path, format=fmt)


def _imagefolder(root):
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                _image(root / split / name / f"{i}.jpg", seed=10 * c + i)
    _image(root / "val" / "dog" / "extra.png", size=(25, 50), seed=99)
    return root


def test_imagefolder_reads_class_folders_with_the_reference_transform(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    train = create_dataset("imagefolder", "train", root=str(root), size=32)
    val = create_dataset("imagefolder", "val", root=str(root), size=32)
    assert train.classes == ("cat", "dog") and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert val.labels.tolist() == [0, 0, 1, 1, 1] and val.transform == "center32"
    batch = val.images[torch.tensor([0, 4])]
    assert batch.shape == (2, 3, 32, 32) and val.images.shape == (5, 3, 32, 32)
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    # resize the short side to 32 * 256/224 = 37 px, then the central 32 x 32 crop
    with Image.open(root / "val" / "cat" / "0.jpg") as img:
        resized = img.convert("RGB").resize((49, 37), Image.BILINEAR)
    expected = torch.from_numpy(np.array(resized)).float().permute(2, 0, 1)[:, 2:34, 8:40] / 255
    assert (val.images[0] - expected).abs().mean() < 0.03  # antialiasing differs slightly from PIL's
    views = train.augmented[0:2]
    assert views.shape == (2, 3, 32, 32) and not torch.equal(views, train.augmented[0:2])  # random each read
    backbone = tiny_resnet().eval()
    backbone.name, backbone.digest = "t", "0"
    assert cached_features(backbone, val, "imgs", "val", log=lambda m: None).shape == (5, 64, 8, 8)


def test_missing_paths_empty_splits_and_unreadable_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data set folder not found: {tmp_path / 'nope'}"):
        create_dataset("imagefolder", "train", root=str(tmp_path / "nope"))
    root = _imagefolder(tmp_path / "imgs")
    for f in (root / "val").rglob("*.*"):
        f.unlink()
    with pytest.raises(ValueError, match=f"no images .* under {root / 'val'}"):
        create_dataset("imagefolder", "val", root=str(root))

    root = _imagefolder(tmp_path / "imgs2")
    broken = root / "val" / "cat" / "1.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    val = create_dataset("imagefolder", "val", root=str(root), size=32)
    with pytest.raises(ImageLoadError, match=f"cannot read image {broken}"):
        val.images[0:3]
    skipping = create_dataset("imagefolder", "val", root=str(root), size=32, skip_corrupt=True)
    assert skipping.skipped == 1 and len(skipping) == 4 and skipping.images[0:4].shape == (4, 3, 32, 32)


VOC_OBJECT = "<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def _voc(root):
    voc = root / "VOCdevkit" / "VOC2007"
    images = {
        "000001": [("dog", 0, 11, 6, 60, 30), ("person", 1, 1, 1, 20, 20)],
        "000002": [("cat", 0, 1, 1, 100, 50), ("cat", 0, 50, 10, 90, 40)],
        "000003": [("car", 0, 5, 5, 50, 25)],
    }
    for image_id, objects in images.items():
        _image(voc / "JPEGImages" / f"{image_id}.jpg", size=(100, 50))
        xml = "".join(VOC_OBJECT.format(*o) for o in objects)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>100</width><height>50</height><depth>3</depth></size>{xml}</annotation>"
        )
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000003\n")
    return root


def test_voc2007_is_multi_label_with_scaled_boxes_and_difficult_flags(tmp_path):
    root = _voc(tmp_path)
    train = create_dataset("voc2007", "train", root=str(root))
    assert train.multilabel and train.classes == VOC_CLASSES and train.images.shape == (2, 3, 224, 224)
    dog, person, cat = (VOC_CLASSES.index(c) for c in ("dog", "person", "cat"))
    assert train.labels[0].nonzero().flatten().tolist() == [dog]  # the difficult person is not a positive
    assert train.labels[1].nonzero().flatten().tolist() == [cat]
    # 1-based VOC pixels (11, 6)-(60, 30) on 100 x 50 -> 0-based, scaled by 2.24 and 4.48
    assert train.boxes[0].tolist()[0] == pytest.approx([dog, 10 * 2.24, 5 * 4.48, 60 * 2.24, 30 * 4.48, 0.0])
    assert train.boxes[0][1, 0].item() == person and train.boxes[0][1, 5].item() == 1.0
    assert len(create_dataset("voc2007", "val", root=str(root / "VOCdevkit" / "VOC2007"))) == 1
    (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty image set: .*test.txt"):
        create_dataset("voc2007", "val", root=str(root))


def test_coco2014_maps_category_ids_and_flags_crowds(tmp_path):
    for i, name in enumerate(("a.jpg", "b.jpg")):
        _image(tmp_path / "val2014" / name, size=(80, 40), seed=i)
    instances = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 80, "height": 40}, {"id": 9, "file_name": "b.jpg", "width": 80, "height": 40}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"image_id": 7, "category_id": 18, "bbox": [8, 4, 40, 20], "iscrowd": 0},
            {"image_id": 7, "category_id": 1, "bbox": [0, 0, 80, 40], "iscrowd": 1},
            {"image_id": 9, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(instances))
    val = create_dataset("coco2014", "val", root=str(tmp_path), size=64)
    assert val.classes == ("person", "car", "dog") and val.images.shape == (2, 3, 64, 64)
    assert val.labels.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # the crowd person is not a positive
    expected = torch.tensor([[2, 6.4, 6.4, 38.4, 38.4, 0.0], [0, 0.0, 0.0, 64.0, 64.0, 1.0]])
    assert torch.allclose(val.boxes[0], expected)
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*instances_train2014.json"):
        create_dataset("coco2014", "train", root=str(tmp_path))


def _tiny_model(num_classes=2):
    from probing.heads import create_head
    from probing.model import ProbedModel

    torch.manual_seed(0)
    backbone = tiny_resnet().eval()
    backbone.name, backbone.digest = "t", "0"
    return ProbedModel(backbone, create_head("linear", backbone.out_channels, num_classes)).eval()


def test_feature_cache_keys_on_the_files_not_just_the_name_and_size(tmp_path):
    import os

    first, second = _imagefolder(tmp_path / "a"), _imagefolder(tmp_path / "b")
    for f in sorted((second / "val").rglob("*.*")):  # same names, same count, other pixels
        _image(f, seed=hash(f.name) % 1000 + 500, fmt="JPEG" if f.suffix == ".jpg" else "PNG")
    backbone = _tiny_model().backbone
    splits = [create_dataset("imagefolder", "val", root=str(r), size=32) for r in (first, second)]
    features = [cached_features(backbone, s, "imgs", "val", log=lambda m: None)[:] for s in splits]
    fresh = [backbone(backbone.preprocess(s.images[0 : len(s)])).detach() for s in splits]
    assert not torch.allclose(features[0], features[1])
    for cached, expected in zip(features, fresh):
        torch.testing.assert_close(cached, expected)
    # an image rewritten in place (new pixels, new modification time) gets fresh features
    target = first / "val" / "cat" / "0.jpg"
    _image(target, seed=777)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    changed = create_dataset("imagefolder", "val", root=str(first), size=32)
    log = []
    again = cached_features(backbone, changed, "imgs", "val", log=log.append)
    assert any("computing" in m for m in log)
    torch.testing.assert_close(again[:], backbone(backbone.preprocess(changed.images[0:5])).detach())


def test_too_few_confident_classes_on_files_give_zero_grids_not_a_crash(tmp_path):
    from evaluation.gridpg import evaluate_gridpg

    val = create_dataset("imagefolder", "val", root=str(_imagefolder(tmp_path / "imgs")), size=32)
    metrics = evaluate_gridpg(  # 2 classes cannot fill a 2x2 grid
        _tiny_model(), val.images, val.labels, lambda z: z.softmax(dim=1), ["ixg"], ["input"], confidence=0.0
    )
    assert metrics.keys() == {"grids/count", "grids/scored", "grids/candidates", "grids/threshold", "grids/confident_images"}
    assert metrics["grids/count"] == 0.0


@pytest.mark.parametrize("dataset, expected", [("imagefolder", (0.08, 1.0)), ("voc2007", (0.7, 1.0))])
def test_training_crops_keep_most_of_a_multi_label_image(tmp_path, dataset, expected):
    root = _imagefolder(tmp_path / "imgs") if dataset == "imagefolder" else _voc(tmp_path)

    def scale(split):
        crop = next(t for t in split.augmented.transform.transforms if type(t).__name__ == "RandomResizedCrop")
        return tuple(crop.scale)

    assert scale(create_dataset(dataset, "train", root=str(root))) == expected
    assert scale(create_dataset(dataset, "train", root=str(root), crop_scale=(0.5, 0.9))) == (0.5, 0.9)
