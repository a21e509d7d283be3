"""DiFull and DiPart: grid models whose correct attribution is known (Rao et al., CVPR 2022).

Both wrap a probed model for n x n grid images and give, for row b, the logits of the cell
``cells[b]`` (the cell being explained), with the layer interface attribution methods use.

- DiFull: every cell passes through backbone and head on its own, so the target cell's logit
  depends on that cell only; attribution anywhere else is provably wrong (a gradient method at the
  input must score 1.0).
- DiPart: the whole grid passes through the backbone; the final feature map is cropped to the
  target cell's part before the head, so other cells still reach it through receptive fields.
"""

from __future__ import annotations

import torch
from torch import nn

from evaluation.metrics import METRICS, grid_metrics, localisation_metric
from probing.registry import unknown_name

__all__ = ["DiFullModel", "DiPartModel", "check_setting", "crop_cells", "grid_model", "join_cells", "split_cells"]



def split_cells(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, n*h, n*w) -> (B*n*n, C, h, w), cells row-major within each grid."""
    batch, channels, height, width = x.shape
    h, w = height // grid, width // grid
    cells = x.reshape(batch, channels, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(batch * grid * grid, channels, h, w)


def join_cells(cells: torch.Tensor, grid: int) -> torch.Tensor:
    """The inverse of :func:`split_cells`."""
    n_cells, channels, h, w = cells.shape
    batch = n_cells // (grid * grid)
    x = cells.reshape(batch, grid, grid, channels, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, grid * h, grid * w)


def crop_cells(x: torch.Tensor, grid: int, cells: torch.Tensor) -> torch.Tensor:
    """(B, C, n*h, n*w) -> (B, C, h, w): row b's part of the map at cell ``cells[b]``."""
    parts = split_cells(x, grid).unflatten(0, (len(x), grid * grid))
    return parts[torch.arange(len(x), device=x.device), cells.to(x.device)]


class _GridModel(nn.Module):
    def __init__(self, model: nn.Module, grid: int, cells: torch.Tensor):
        super().__init__()
        self.model, self.grid = model, grid
        self.cells = torch.as_tensor(cells).long()

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """The cell of each row of ``x``; a batch of k*B rows (Integrated Gradients stacks its
        steps that way) repeats the B cells k times."""
        if len(x) % len(self.cells):
            raise ValueError(f"{type(self).__name__} explains {len(self.cells)} rows, got a batch of {len(x)}")
        if x.shape[-2] % self.grid or x.shape[-1] % self.grid:
            raise ValueError(f"map size {tuple(x.shape[-2:])} is not divisible by grid {self.grid}")
        return self.cells.repeat(len(x) // len(self.cells))

    @property
    def bcos_input(self) -> bool:
        return getattr(self.model, "bcos_input", False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess(images)

    def rows(self, index) -> "_GridModel":
        """The same model for the rows ``index`` only (perturbation methods run one row's samples)."""
        return type(self)(self.model, self.grid, self.cells[torch.as_tensor(index).long()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.forward_to(x, "input"), "input")


@localisation_metric("difull", "grids", "DiFull: each cell through backbone and head alone; attribution outside the target cell is provably wrong")
class DiFullModel(_GridModel):
    """Each cell on its own through backbone and head; row b's logits are those of ``cells[b]``."""

    def forward_to(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        self._check(x)
        return join_cells(self.model.forward_to(split_cells(x, self.grid), layer), self.grid)

    def forward_from(self, activation: torch.Tensor, layer: str) -> torch.Tensor:
        cells = self._check(activation)
        return self.model.forward_from(crop_cells(activation, self.grid, cells), layer)


@localisation_metric("dipart", "grids", "DiPart: the grid through the backbone, the final map cropped to the target cell before the head")
class DiPartModel(_GridModel):
    """The whole grid through the backbone; the final map cropped to ``cells[b]`` before the head."""

    def forward_to(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        self._check(x)
        return self.model.forward_to(x, layer)

    def forward_from(self, activation: torch.Tensor, layer: str) -> torch.Tensor:
        cells = self._check(activation)
        features = self.model.backbone.forward_from(activation, layer)
        return self.model.head(crop_cells(features, self.grid, cells))


@localisation_metric("gridpg", "grids", "Grid Pointing Game: the share of positive attribution in the target cell of a grid")
def plain_model(model: nn.Module, grid: int, cells: torch.Tensor) -> nn.Module:
    """GridPG explains the model itself."""
    return model


def check_setting(setting: str) -> str:
    """``setting`` if it names a grid metric (gridpg, difull, dipart)."""
    if setting not in grid_metrics():
        raise ValueError(unknown_name("localisation setting", setting, grid_metrics()))
    return setting


def grid_model(setting: str, model: nn.Module, grid: int, cells: torch.Tensor) -> nn.Module:
    """The model to explain for a grid metric: the plain model for GridPG."""
    return METRICS.get(check_setting(setting)).grid_model(model, grid, cells)
