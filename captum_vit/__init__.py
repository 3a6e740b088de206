"""captum_vit: what Vision Transformers learn, as a Captum extension."""

from .capture import LayerTap, capture_layers
from .layout import TokenLayout, resolve_layout
from .models import ImageModel, input_config

__all__ = [
    "ImageModel",
    "LayerTap",
    "TokenLayout",
    "capture_layers",
    "input_config",
    "resolve_layout",
]

__version__ = "0.1.0"
