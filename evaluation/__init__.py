"""Explaining probed models and scoring the explanations.

Importing the package registers every attribution method (:mod:`evaluation.attribution`) and
every localisation metric (:mod:`evaluation.metrics`) beside its code.
"""

from evaluation import attribution, deletion, epg, grid_models, gridpg, map_metrics  # noqa: F401  (registration)
