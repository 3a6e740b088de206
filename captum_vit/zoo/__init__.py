"""The bundled zoo: a synthetic visual world with known ground truth, small ViT and CNN
models trained on it (shipped as package data, loadable offline), and the paper's
foreground / background and frequency experiments.

Examples::

    >>> from captum_vit import zoo
    >>> vit = zoo.load_model("vit")                      # eval mode, class names attached
    >>> data = zoo.SyntheticScenes(500, seed=1)          # held-out seed
    >>> zoo.foreground_background(vit, data).normalized_background
    >>> zoo.frequency_sensitivity(vit, data, cutoffs=(0.1, 0.3, 0.5))
"""

from .data import BACKGROUNDS, CLASSES, SyntheticScenes, fft_filter
from .experiments import (
    ForegroundBackground,
    FrequencySensitivity,
    foreground_background,
    frequency_sensitivity,
    plot_foreground_background,
    plot_frequency_sensitivity,
)
from .registry import MODEL_NAMES, WEIGHTS_DIR, build_model, load_model, save_model

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "MODEL_NAMES",
    "WEIGHTS_DIR",
    "ForegroundBackground",
    "FrequencySensitivity",
    "SyntheticScenes",
    "build_model",
    "fft_filter",
    "foreground_background",
    "frequency_sensitivity",
    "load_model",
    "plot_foreground_background",
    "plot_frequency_sensitivity",
    "save_model",
]
