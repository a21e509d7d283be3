"""GridPG grid building: shared seeded candidates of distinct classes, the ones a probe is confident
on, and honest about what it could not build."""

import torch

from evaluation.grids import build_grids, candidate_grids, confident_mask


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
    picks, classes = candidate_grids(labels, 2, 20, seed=3)
    # the candidates without class 5, and only those
    assert grids.ids.tolist() == [i for i in range(20) if 5 not in classes[i].tolist()] and 0 < len(grids) < 20
    assert grids.images.shape == (len(grids), 1, 8, 8) and grids.n_requested == 20
    assert torch.equal(grids.classes, classes[grids.ids]) and torch.equal(grids.images.picks, picks[grids.ids])
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
    few = build_grids(images[:9], labels[:9], torch.ones(9, dtype=torch.bool), 2, 7)  # 3 classes in all
    assert len(few) == 0 and few.ids.tolist() == []


def test_two_probes_draw_the_same_candidates_and_score_those_they_are_confident_on():
    """The candidates depend on the labels and the seed, not on the probe: two probes' grids are
    the same grids wherever both are confident (same ids, same images, same classes)."""
    images, labels = _tiles(n_per_class=5, classes=8)
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.rand(len(labels), generator=generator) < 0.85 for _ in range(2))
    a = build_grids(images, labels, first, 2, 40, seed=2)
    b = build_grids(images, labels, second, 2, 40, seed=2)
    assert not torch.equal(a.ids, b.ids) and len(a) and len(b)
    both = sorted(set(a.ids.tolist()) & set(b.ids.tolist()))
    assert both, "the two probes share no grid: pick other masks"
    for grid in both:
        i, j = a.ids.tolist().index(grid), b.ids.tolist().index(grid)
        assert torch.equal(a.images[i], b.images[j]) and torch.equal(a.classes[i], b.classes[j])
    for grids, confident in ((a, first), (b, second)):
        assert bool(confident[grids.images.picks].all())  # every cell confident


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
