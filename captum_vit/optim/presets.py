"""Named recipes for feature visualization. A preset only supplies defaults: every field
is also an argument of ``FeatureVisualization.attribute`` and an explicit argument wins.

* ``"ghiasi2023"`` -- the paper's recipe as its reference code runs it: pixels
  initialized uniform in [0, 1] and clamped after every step; 8 augmented copies per image and step with the colour shift ``(x - mu) / sigma``, a
  per-channel Gaussian offset whose std fades linearly from 0.5 to 0 and a circular roll of
  up to 32 px at 224 (scaled with the size, one shift per image and step); total variation
  (4 directions, L2 norm) on the augmented batch with weight 5e-5; the objective scaled by
  1/8 (the code's ``diag().mean()``); Adam, lr 0.1 (1.0 for CLIP), betas (0.5, 0.99),
  cosine decay to 0 over 400 steps.
* ``"lucid"`` -- Lucid's defaults: Fourier parameterization with decorrelated colour,
  one copy per step with pad / jitter / scale / rotate / jitter, Adam lr 0.05, 512 steps.
* ``"fast"`` -- our recipe for speed: the paper's pixels, TV, objective scale, lr (1.0 for
  CLIP), Adam betas and cosine decay, but 2 copies instead of 8, the colour shift halved,
  no fading noise, no roll jitter and 32 steps instead of 400: 1/50 of the paper's
  image-steps. Measured on random-weight ViT-Ti/16 (``benchmarks/feature_viz_speed.py``),
  a roll jitter against the patch grid, or 2 copies with the paper's jitter, kept the
  activation far below the paper preset's, while this recipe passes it within 32 steps.
  For trained models, where jitter suppresses high-frequency patterns, add
  ``transforms=[ColorShift(0.5, 0.5), RollJitter()]``.
* ``None`` -- plain gradient ascent on the pixels: one copy, no augmentation, no
  regularizer, Adam with a constant lr, clamped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from .transforms import (
    ColorShift,
    FadingNoise,
    Jitter,
    Pad,
    RandomRotate,
    RandomScale,
    RollJitter,
    Transform,
)

__all__ = ["Preset", "PRESETS", "get_preset", "preset_fields"]


def _paper_transforms(size: tuple[int, int]) -> list[Transform]:
    return [ColorShift(1.0, 1.0), FadingNoise(0.5), RollJitter()]


def _lucid_transforms(size: tuple[int, int]) -> list[Transform]:
    def px(value: int) -> int:
        return max(1, round(value * min(size) / 224))

    return [Pad(px(12)), Jitter(px(8)), RandomScale(), RandomRotate(10), Jitter(px(4))]


def _fast_transforms(size: tuple[int, int]) -> list[Transform]:
    # no roll jitter: measured on random-weight ViT-Ti (benchmarks/feature_viz_speed.py),
    # any shift against the patch grid averages a unit's objective out with 2 copies
    return [ColorShift(0.5, 0.5)]


def _no_transforms(size: tuple[int, int]) -> list[Transform]:
    return []


@dataclass(frozen=True)
class Preset:
    """Defaults of a feature-visualization run (see the module docstring).

    Attributes:
        param: ``"pixel"`` or ``"fourier"``.
        init: pixel initialization without start images: ``"uniform"`` or ``"gray"``.
        copies: augmented copies of each image per step.
        transforms: ``size -> list of transforms`` (sizes scale with the image).
        tv_weight: weight of :func:`~captum_vit.optim.objectives.total_variation`.
        tv_on_augmented: take TV on the augmented copies (the paper) or on the images.
        objective_scale: factor on the objective (the paper's code: 1/8).
        optimizer: ``"adam"`` or ``"sgd"``.
        lr, clip_lr: learning rate; ``clip_lr`` for open_clip (CLIP) models.
        betas, eps: Adam's.
        schedule: ``"cosine"`` (decay to 0) or ``"constant"``.
        steps: optimization steps.
        clamp: clamp pixels to [0, 1] after each step.
        fourier_sd, decay_power, decorrelate: Fourier parameterization settings.
    """

    param: str = "pixel"
    init: str = "uniform"
    copies: int = 1
    transforms: Callable[[tuple[int, int]], list[Transform]] = _no_transforms
    tv_weight: float = 0.0
    tv_on_augmented: bool = True
    objective_scale: float = 1.0
    optimizer: str = "adam"
    lr: float = 0.05
    clip_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    steps: int = 400
    clamp: bool = True
    fourier_sd: float = 0.01
    decay_power: float = 1.0
    decorrelate: bool = True


PRESETS: dict[str | None, Preset] = {
    None: Preset(),
    "ghiasi2023": Preset(
        param="pixel",
        init="uniform",
        copies=8,
        transforms=_paper_transforms,
        tv_weight=5e-5,
        tv_on_augmented=True,
        objective_scale=1 / 8,
        lr=0.1,
        clip_lr=1.0,
        betas=(0.5, 0.99),
        schedule="cosine",
        steps=400,
        clamp=True,
    ),
    "lucid": Preset(
        param="fourier",
        copies=1,
        transforms=_lucid_transforms,
        lr=0.05,
        schedule="constant",
        steps=512,
    ),
    "fast": Preset(
        param="pixel",
        init="uniform",
        copies=2,
        transforms=_fast_transforms,
        tv_weight=5e-5,
        objective_scale=1 / 8,
        lr=0.1,
        clip_lr=1.0,
        betas=(0.5, 0.99),
        schedule="cosine",
        steps=32,
    ),
}


def preset_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Preset))


def get_preset(preset: str | Preset | None) -> Preset:
    """The named preset (``None``: plain gradient ascent), or a :class:`Preset` as is.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        names = ", ".join(repr(name) for name in PRESETS)
        raise ValueError(f"unknown preset {preset!r}; choose one of {names} or a Preset")
    return PRESETS[preset]
