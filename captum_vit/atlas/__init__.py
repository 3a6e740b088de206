"""The atlas: what every unit of every layer of a model responds to, over your images, as a
static site (``captum-vit atlas``, or :func:`build_atlas`).

Modules: :mod:`.sources` (models and images), :mod:`.scan` (one pass for all layers:
top-k images and activation statistics), :mod:`.units` (unit selection, feature
visualizations, a unit's files), :mod:`.model_stats` (locality, Table 1), :mod:`.pages`
(the HTML), :mod:`.resume` (atomic files, manifest), :mod:`.shard` (several processes),
:mod:`.build` (the order of work).
"""

from .build import build_atlas, default_layers, default_preset
from .sources import ImageFiles, ImageTensor, LoadedModel, ZooScenes, load_model, open_images

__all__ = [
    "ImageFiles",
    "ImageTensor",
    "LoadedModel",
    "ZooScenes",
    "build_atlas",
    "default_layers",
    "default_preset",
    "load_model",
    "open_images",
]
