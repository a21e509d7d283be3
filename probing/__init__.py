"""Frozen backbones, data sets, probe heads, losses and probe training.

Each family has one registry (``probing.registry.Registry``); the modules that hold its entries
register them with a decorator beside their code, when this package is imported (as timm does), so
that no module imports back the one that imports it.
"""

from probing import embedded_backbones, embedded_vit, image_data, zoo  # noqa: F401  (registration)
