"""Spatial information in a ViT: how local each layer's tokens are, and the paper's
pooling experiments (natural, isolated cls, patch-token heads, tearing off the patches).

``probe`` holds :class:`SpatialLocalityProbe`; ``pooling`` the Table-1 experiments
(:func:`pooling_experiments`);
``reports`` the result types; ``plots`` their figure.
"""

from .plots import plot_locality
from .pooling import pooling_experiments
from .probe import SpatialLocalityProbe, find_blocks, find_stages
from .reports import Accuracy, LocalityReport, PoolingReport

__all__ = [
    "Accuracy",
    "LocalityReport",
    "PoolingReport",
    "SpatialLocalityProbe",
    "find_blocks",
    "find_stages",
    "plot_locality",
    "pooling_experiments",
]
