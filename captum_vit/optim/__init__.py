"""Feature visualization: optimize images that excite a unit of a layer.

``feature_viz`` holds :class:`FeatureVisualization`; ``objectives`` what is maximized;
``params`` how an image is parameterized; ``transforms`` the augmentations applied at each
step; ``presets`` the named recipes (the paper's ``"ghiasi2023"`` and others);
``quality`` how good a visualization is (``robust_activation``, ``transfer_score``).
"""

from .feature_viz import FeatureVisualization
from .quality import robust_activation, transfer_score

__all__ = ["FeatureVisualization", "robust_activation", "transfer_score"]
