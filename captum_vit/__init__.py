"""captum_vit: what Vision Transformers learn, as a Captum extension.

Public names are imported lazily (PEP 562): ``import captum_vit`` stays cheap and each
submodule loads on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .capture import LayerTap, capture_layers
from .layout import TokenLayout, resolve_layout
from .models import ImageModel, input_config

_LAZY = {
    "FeatureVisualization": ".optim.feature_viz",
    "PatchActivationMap": ".activation_map",
    "TopActivatingExamples": ".top_examples",
    "ExampleSet": ".top_examples",
    "SpatialLocalityProbe": ".locality.probe",
    "LocalityReport": ".locality.reports",
    "PoolingReport": ".locality.reports",
    "pooling_experiments": ".locality.pooling",
    "objectives": ".optim.objectives",
    "robust_activation": ".optim.quality",
    "transfer_score": ".optim.quality",
    "zoo": ".zoo",
    "render": ".render",
    "atlas": ".atlas",
    "build_atlas": ".atlas.build",
    "patch_grid": ".interop",
    "patch_feature_mask": ".interop",
    "AttentionRollout": ".rollout",
    "hf": ".hf",
}

__all__ = [
    "ImageModel",
    "LayerTap",
    "TokenLayout",
    "capture_layers",
    "input_config",
    "resolve_layout",
    *_LAZY,
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name], __name__)
        except ModuleNotFoundError as error:
            if error.name != __name__ + _LAZY[name]:
                raise
            raise AttributeError(f"captum_vit.{name} is not available yet") from error
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'captum_vit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names and the package's submodules loaded so far (not the helpers this
    file imports, such as ``importlib`` and ``Any``)."""
    submodules = {
        name
        for name, value in globals().items()
        if isinstance(value, ModuleType)
        and value.__name__.startswith(__name__ + ".")
        and not name.startswith("_")
    }
    return sorted(set(__all__) | submodules | {"__version__"})
