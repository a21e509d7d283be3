"""Properties of the maps themselves, scored on the GridPG grids beside GridPG ("How to Probe"
reports them): pure tensor functions of (B, H, W) maps, each registered as a ``maps`` metric.

Both take the map's magnitudes ``|A|`` and follow Quantus 0.6.0 (``Sparseness``, ``Complexity``
with ``abs=True, normalise=False``) to the formula, so that numbers compare with theirs:

- compactness: the Gini index of ``|A| + 1e-7`` (Chalasani et al.); 0 for a uniform map, towards 1
  when one pixel holds everything. Higher is more compact.
- complexity: the Shannon entropy (natural log) of ``|A| / sum |A|`` (Bhatt et al.); ``log(H W)``
  for a uniform map, 0 for one pixel. Lower is simpler.
"""

from __future__ import annotations

import torch

from evaluation.metrics import localisation_metric

__all__ = ["compactness", "complexity"]


@localisation_metric("compactness", "maps", "Gini index of |A| on the GridPG maps (Quantus Sparseness); higher is more compact")
def compactness(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,) Gini index of each map's magnitudes."""
    a = torch.sort(maps.flatten(1).abs() + 1e-7, dim=1).values
    n = a.shape[1]
    rank = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    return ((2 * rank - n - 1) * a).sum(dim=1) / (n * a.sum(dim=1))


@localisation_metric("complexity", "maps", "Shannon entropy of |A| on the GridPG maps (Quantus Complexity); lower is simpler")
def complexity(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,) entropy of each map's normalised magnitudes (0 for an all-zero map)."""
    a = maps.flatten(1).abs()
    p = a / a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return -(p * torch.log(p + 1e-12)).sum(dim=1)
