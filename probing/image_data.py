"""Data sets on disk: ImageNet-style class folders, PASCAL VOC 2007 and COCO 2014.

Images load on demand through :class:`ImageFiles`, so a split of any size costs only its file
list; the feature cache reads each image once. Transforms follow the reference code: class
folders are resized to 256/224 of the size and centre-cropped (train augmentation:
RandomResizedCrop + flip); VOC (224 px) and COCO (448 px) are resized to a square, and their boxes
with them. A missing path or an empty split fails with the path; an unreadable image fails with
its file when read, unless ``skip_corrupt`` left it out up front (the count is in ``Split.skipped``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Sequence

import torch

from probing.datasets import DATASETS, Split

__all__ = ["ImageLoadError", "ImageFiles", "load_image", "VOC_CLASSES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class ImageLoadError(OSError):
    """An image file could not be read or decoded; the message names the file."""


def load_image(path: Path):
    """The image at ``path`` as an RGB PIL image, fully decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


def _to_tensor() -> list:
    from torchvision.transforms import v2  # here, not at import: torchvision takes ~2 s to import

    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]


def _eval_transform(resize: str, size: int):
    from torchvision.transforms import v2

    if resize == "square":
        return v2.Compose([v2.Resize((size, size), antialias=True), *_to_tensor()])
    return v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size), *_to_tensor()])


#: RandomResizedCrop's area range: torchvision's default for class folders; (0.7, 1) for multi-label
#: data (VOC, COCO), as the How to Probe configs, so that crops keep the labelled objects
CROP_SCALE = {"single": (0.08, 1.0), "multilabel": (0.7, 1.0)}


def _train_transform(size: int, scale: tuple[float, float]):
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip(), *_to_tensor()])


class ImageFiles:
    """Image files read and transformed on demand; indexes like an (N, 3, size, size) tensor."""

    def __init__(self, paths: Sequence[Path], transform: Callable, size: int):
        self.paths, self.transform = list(paths), transform
        self.shape = (len(self.paths), 3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint_parts(self):
        """Per file: its resolved path, size and modification time (``Split.fingerprint``)."""
        for path in self.paths:
            stat = path.stat()
            yield f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.transform(load_image(self.paths[index]))
        if isinstance(index, slice):
            index = range(*index.indices(len(self.paths)))
        elif isinstance(index, torch.Tensor):
            index = index.flatten().tolist()
        return torch.stack([self.transform(load_image(self.paths[i])) for i in index])


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _drop_unreadable(paths: list[Path], skip_corrupt: bool) -> tuple[list[int], int]:
    """Indices of the readable paths (all of them unless ``skip_corrupt``) and how many were skipped."""
    if not skip_corrupt:
        return list(range(len(paths))), 0
    keep = []
    for i, path in enumerate(paths):
        try:
            load_image(path)
            keep.append(i)
        except ImageLoadError:
            pass
    return keep, len(paths) - len(keep)


def _split(paths, labels, classes, resize, size, skip_corrupt, crop_scale, boxes=None) -> Split:
    keep, skipped = _drop_unreadable(paths, skip_corrupt)
    paths = [paths[i] for i in keep]
    boxes = tuple(boxes[i] for i in keep) if boxes is not None else None
    return Split(
        ImageFiles(paths, _eval_transform(resize, size), size),
        labels[keep],
        tuple(classes),
        f"{resize}{size}",
        boxes=boxes,
        skipped=skipped,
        augmented=ImageFiles(paths, _train_transform(size, crop_scale), size),
    )


@DATASETS.register("imagefolder")
def imagefolder(
    split: str, root: str, size: int = 224, skip_corrupt: bool = False, crop_scale: tuple[float, float] | None = None
) -> Split:
    """ImageNet-style folders ``root/{train,val}/<class>/<image>``; classes are the train folder names, sorted.
    ``crop_scale``: the training crop's area range. Default: (0.08, 1), torchvision's."""
    root = _existing(Path(root).expanduser(), "data set folder")
    class_dirs = sorted(p for p in _existing(root / "train", "train folder").iterdir() if p.is_dir())
    classes = [p.name for p in class_dirs]
    folder = _existing(root / split, f"{split} folder")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    unknown = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders that {root / 'train'} lacks: {', '.join(unknown)}")
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return _split(paths, torch.tensor(labels), classes, "center", size, skip_corrupt, crop_scale or CROP_SCALE["single"])


def _square_box(x0, y0, x1, y1, width, height, size) -> list[float]:
    sx, sy = size / width, size / height
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


def _multi_hot(boxes: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Positive for every class with a box that is not flagged (difficult / crowd)."""
    labels = torch.zeros(len(boxes), num_classes)
    for i, b in enumerate(boxes):
        labels[i, b[b[:, 5] == 0, 0].long()] = 1.0
    return labels


def _voc_root(root: Path) -> Path:
    for candidate in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (candidate / "Annotations").is_dir():
            return candidate
    raise FileNotFoundError(f"no VOC 2007 layout (Annotations, JPEGImages, ImageSets/Main) under {root}")


@DATASETS.register("voc2007")
def voc2007(
    split: str,
    root: str,
    size: int = 224,
    skip_corrupt: bool = False,
    image_sets: dict[str, str] | None = None,
    crop_scale: tuple[float, float] | None = None,
) -> Split:
    """PASCAL VOC 2007 as multi-label data with boxes (VOCdevkit layout); ``crop_scale`` default (0.7, 1).

    ``train`` reads ``ImageSets/Main/trainval.txt`` and ``val`` reads ``test.txt`` (as in How to
    Probe); ``image_sets`` maps them otherwise. A class is positive when the image has a box of it
    that is not marked difficult; difficult boxes are kept with their flag set.
    """
    voc = _voc_root(_existing(Path(root).expanduser(), "VOC folder"))
    listing = _existing(voc / "ImageSets" / "Main" / f"{(image_sets or {'train': 'trainval', 'val': 'test'})[split]}.txt", "image set")
    ids = listing.read_text().split()
    if not ids:
        raise ValueError(f"empty image set: {listing}")
    paths, boxes = [], []
    for image_id in ids:
        xml_path = _existing(voc / "Annotations" / f"{image_id}.xml", "annotation")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            raise ValueError(f"{xml_path}: not valid XML ({err})") from None
        try:
            width, height = (float(tree.findtext(f"size/{k}")) for k in ("width", "height"))
        except (TypeError, ValueError):
            raise ValueError(f"{xml_path}: no <size> with <width> and <height>") from None
        rows = []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in VOC_CLASSES:
                raise ValueError(f"{xml_path}: unknown VOC class {name!r}")
            try:
                box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise ValueError(f"{xml_path}: a {name} object without a numeric <bndbox>") from None
            box[0] -= 1  # VOC pixel coordinates are 1-based and inclusive
            box[1] -= 1
            difficult = float(obj.findtext("difficult", "0").strip() == "1")
            rows.append([VOC_CLASSES.index(name), *_square_box(*box, width, height, size), difficult])
        paths.append(voc / "JPEGImages" / f"{image_id}.jpg")
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 6))
    labels, scale = _multi_hot(boxes, len(VOC_CLASSES)), crop_scale or CROP_SCALE["multilabel"]
    return _split(paths, labels, VOC_CLASSES, "square", size, skip_corrupt, scale, boxes)


@DATASETS.register("coco2014")
def coco2014(
    split: str, root: str, size: int = 448, skip_corrupt: bool = False, crop_scale: tuple[float, float] | None = None
) -> Split:
    """COCO 2014 instances as multi-label data with boxes (``crop_scale`` default (0.7, 1)): ``root/annotations/instances_{train,val}2014.json``
    and images in ``root/{train,val}2014``. Classes are the categories sorted by id; crowd boxes are flagged."""
    root = _existing(Path(root).expanduser(), "COCO folder")
    ann_file = _existing(root / "annotations" / f"instances_{split}2014.json", "annotation file")
    try:
        data = json.loads(ann_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images, annotations = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{ann_file}: not a COCO instances file ({err})") from err
    if not images:
        raise ValueError(f"no images in {ann_file}")
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    rows: dict[int, list] = {img["id"]: [] for img in images}
    sizes = {img["id"]: (img["width"], img["height"]) for img in images}
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        box = _square_box(x, y, x + w, y + h, *sizes[ann["image_id"]], size)
        rows[ann["image_id"]].append([class_of[ann["category_id"]], *box, float(ann.get("iscrowd", 0))])
    paths = [root / f"{split}2014" / img["file_name"] for img in images]
    boxes = [torch.tensor(rows[img["id"]], dtype=torch.float32).reshape(-1, 6) for img in images]
    labels, names = _multi_hot(boxes, len(categories)), [c["name"] for c in categories]
    return _split(paths, labels, names, "square", size, skip_corrupt, crop_scale or CROP_SCALE["multilabel"], boxes)
