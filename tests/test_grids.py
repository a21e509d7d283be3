"""GridPG grid building: distinct confident classes, seeded, and honest about what it could not build."""

import torch

from evaluation.grids import build_grids, confident_mask


def _tiles(n_per_class=3, classes=6, size=4):
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    # every image is constant, with a value that encodes its index, so tiles can be traced back
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, size, size).clone()
    return images, labels


def test_confident_mask_needs_correct_and_confident():
    probabilities = torch.tensor([[0.96, 0.04], [0.90, 0.10], [0.02, 0.98]])
    mask = confident_mask(probabilities, torch.tensor([0, 0, 0]), threshold=0.95)
    assert mask.tolist() == [True, False, False]


def test_grids_hold_distinct_confident_classes_in_their_cells():
    images, labels = _tiles()
    confident = torch.ones(len(labels), dtype=torch.bool)
    confident[labels == 5] = False  # class 5 must never appear
    grids = build_grids(images, labels, confident, grid=2, n_grids=20, seed=3)
    assert len(grids) == 20 and grids.images.shape == (20, 1, 8, 8)
    for image, classes in zip(grids.images, grids.classes):
        assert len(set(classes.tolist())) == 4 and 5 not in classes.tolist()
        for cell, cls in enumerate(classes.tolist()):
            row, col = divmod(cell, 2)
            index = int(image[0, row * 4, col * 4])
            assert labels[index] == cls  # the tile in this cell is an image of that class
            assert (image[0, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] == index).all()


def test_same_seed_same_grids_other_seed_other_grids():
    images, labels = _tiles()
    confident = torch.ones(len(labels), dtype=torch.bool)
    a = build_grids(images, labels, confident, 2, 10, seed=0)
    b = build_grids(images, labels, confident, 2, 10, seed=0)
    c = build_grids(images, labels, confident, 2, 10, seed=1)
    assert torch.equal(a.images[:], b.images[:]) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.classes, c.classes)


def test_too_few_confident_classes_gives_no_grid_and_says_so():
    images, labels = _tiles()
    confident = labels < 3  # only 3 classes for 4 cells
    grids = build_grids(images, labels, confident, 2, 7)
    assert len(grids) == 0 and grids.n_requested == 7 and grids.n_confident == 9


def test_grid_images_are_composed_when_indexed_from_only_the_images_they_show():
    """A batch of grids reads its own tiles and nothing else: the split is never held whole."""
    images, labels = _tiles()

    class Counted:
        shape = images.shape

        def __init__(self):
            self.read = set()

        def __getitem__(self, index):
            self.read |= set(index.tolist())
            return images[index]

    source = Counted()
    grids = build_grids(source, labels, torch.ones(len(labels), dtype=torch.bool), grid=2, n_grids=10, seed=4)
    assert source.read == set()  # building draws indices only
    batch = grids.images[2:5]
    assert batch.shape == (3, 1, 8, 8) and source.read == set(grids.images.picks[2:5].flatten().tolist())
    assert torch.equal(grids.images[3], batch[1])
    eager = build_grids(images, labels, torch.ones(len(labels), dtype=torch.bool), grid=2, n_grids=10, seed=4)
    assert torch.equal(eager.images[:], torch.stack(list(grids.images)))
