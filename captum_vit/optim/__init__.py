"""Feature visualization: optimize images that excite a unit of a layer.

``feature_viz`` holds :class:`FeatureVisualization`; ``objectives`` what is maximized;
``params`` how an image is parameterized; ``transforms`` the augmentations applied at each
step; ``presets`` the named recipes (the paper's ``"ghiasi2023"`` and others).
"""

from .feature_viz import FeatureVisualization

__all__ = ["FeatureVisualization"]
