"""Named recipes for feature visualization.

A :class:`Preset` holds every knob of a run; ``FeatureVisualization.attribute`` takes a
preset by name (or a ``Preset``) and any of its fields as a keyword override, checked here
in one place (:func:`resolve_recipe`). A new knob is one new field.

The figures below come from ``benchmarks/fv_quality.py`` (1 thread):
``cv.robust_activation`` (4 units per layer) and ``cv.transfer_score`` (the zoo CNN
judging the zoo ViT's class visualizations, "ViT -> CNN", and the other way round; chance
12.5%). The user guide's page "Why the presets are built as they are" lists the
alternatives measured against each preset.

* ``"ghiasi2023"`` -- the paper's recipe as its reference code runs it: pixels initialized
  uniform in [0, 1] and clamped after every step; 8 augmented copies per image and step
  with the colour shift ``(x - mu) / sigma``, a per-channel Gaussian offset whose std fades
  linearly from 0.5 to 0 and a circular roll of up to 32 px at 224 (scaled with the size,
  one shift per image and step); total variation (4 directions, L2 norm) on the augmented
  batch with weight 5e-5; the objective scaled by 1/8 (the code's ``diag().mean()``); Adam,
  lr 0.1 (1.0 for CLIP), betas (0.5, 0.99), cosine decay to 0 over 400 steps.
  On small models such as the zoo ViT (64 px, 8-px patches) it gives weak images: its
  roll (about one patch) and colour shift leave free pixels to form high-frequency
  patterns locked to the patch grid, which the model reads as its class and another
  model does not (ViT -> CNN 43.8%, two per class). Scaling the augmentations to the
  model did not fix it, so no scaled variant is offered; what helps is robustness to
  scale, rotation and flip on a smooth parameterization (``"robust"``, ``"object"``).
* ``"fast"`` -- the paper's augmentations on a better parameterization, in a fifth of its
  image-steps (see :data:`FAST`): the image is a pyramid of pixel grids at full, 1/2, 1/4
  and 1/8 resolution (``param="pyramid"``), so one Adam step moves whole regions as easily
  as single pixels, starting grey; 4 copies each with its own roll (the paper rolls all
  copies of an image alike), 160 steps at lr 0.05, cosine decay. Robust activation on a
  random-weight ViT-Ti/16 at 112 px (units 0-3): 0.185 / 0.253 / 0.168 at blocks 1 / 5 /
  11 in 68 s, against the paper preset's 0.161 / 0.217 / 0.150 in 333 s; on the zoo ViT:
  1.012 / 1.096 / 3.446 at blocks 0 / 3 / 5 in 19 s against 0.930 / 1.097 / 3.469 in 90
  s. Over seeds 0-2 the zoo ViT's last block gives 3.409 against 3.520, 3% under: that
  gap closes only with more views per step (``copies=8``: 3.511 in 0.41 of the paper's
  time).
* ``"robust"`` -- strong transformation robustness for late layers (see :data:`ROBUST`):
  Lucid's Fourier parameterization, per-pixel Gaussian noise whose std fades from 0.5 to
  0, pad, jitter, scale 0.6-1.3, rotation up to 30 degrees, horizontal flip, 8 copies,
  256 steps. An image must excite the unit at every scale, angle and position, so what it
  shows is not a texture locked to the patch grid. The noise is there for the start: the
  Fourier image starts nearly flat grey, where a ReLU unit can be exactly 0 with no
  gradient (without it, 3 of the 4 most active units of several zoo layers stayed grey).
  Robust activation on the zoo ViT's blocks 0 / 3 / 5: 0.672 / 0.747 / 2.550.
* ``"object"`` -- one object for a class (see :data:`OBJECT`): ``"robust"`` with
  :class:`~captum_vit.optim.transforms.RandomBackground` first (the model sees the image
  only inside a central disc, on a new random flat colour every copy and step), total
  variation 0.05 and no fading noise. The image cannot lean on a background texture that
  the training data pair with the class, so the class shows as one object on a plain
  ground; the random background also moves the start off flat grey. The default when the
  layer is non-spatial (class logits). Transfer (four per class): ViT -> CNN 81.2%, CNN
  -> ViT 40.6% (two per class: 75.0% / 50.0%, against ``"robust"``'s 62.5% / 43.8%, the
  paper's 43.8% / 12.5% and ``"fast"``'s 56.2% / 18.8%). The weak direction comes from
  what the CNN draws: its classes as edge patterns (a star is a ring of short rays round
  a dark centre), which the zoo ViT reads as clutter (*frame*), although it reads shapes
  drawn as the data draw them, on any flat ground.
* ``"shapes"`` -- a class as a few flat-coloured shapes (see :data:`SHAPES`):
  ``"object"``'s random background and geometric transforms on an image painted with 48
  soft round blobs through a steep sigmoid (``param="splats"``,
  :class:`~captum_vit.optim.params.SplatImage`), lr 0.03, no total variation. No
  parameter reaches single pixels, so the image cannot hold edge patterns or per-pixel
  clutter; overlapping blobs merge into flat regions with clean edges. Transfer (four
  per class): 62.5% both ways, so it is the better choice for a model that draws its
  classes as edges (the zoo CNN), ``"object"`` for one that draws shapes (the zoo ViT).
  Start images are not supported (an image is not a sum of blobs). Robust activation on
  the zoo ViT's blocks 0 / 3 / 5: 0.793 / 0.798 / 2.224, at ``"object"``'s cost.
* ``"maco"`` -- magnitude-constrained phase optimization (Fel et al. 2023, "Unlocking
  Feature Visualization for Deeper Networks with MAgnitude Constrained Optimization"): the
  image's Fourier magnitude is fixed to the mean magnitude spectrum of natural images
  (``magnitude="photos"``: the ``skimage.data`` photographs; ``"scenes"``: the zoo's
  synthetic scenes; or images you pass), computed on first use and kept in memory; only the
  phase is optimized, with jitter, scale 0.7-1.2, rotation and flip (see :data:`MACO`).
  Every image keeps natural-image statistics (no high-frequency noise) by construction.
  The mean colour (the zero-frequency term) is a free parameter per image and channel,
  starting at grey: a fixed mean-colour magnitude would give every image a colour cast.
* ``"lucid"`` -- Lucid's defaults: Fourier parameterization with decorrelated colour,
  one copy per step with pad / jitter / scale / rotate / jitter, Adam lr 0.05, 512 steps.
* ``None`` -- plain gradient ascent on the pixels: one copy, no augmentation, no
  regularizer, Adam with a constant lr, clamped to [0, 1].
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import Tensor

from .transforms import (
    ColorShift,
    FadingNoise,
    Flip,
    Jitter,
    Pad,
    RandomBackground,
    RandomRotate,
    RandomScale,
    RollJitter,
    Transform,
)

__all__ = ["Preset", "PRESETS", "get_preset", "resolve_recipe"]

TransformsSpec = Callable[[tuple[int, int]], list[Transform]]


def _px(value: float, size: tuple[int, int], at: int = 224) -> int:
    """``value`` pixels at ``at`` px, scaled to ``size`` (at least 1)."""
    return max(1, round(value * min(size) / at))


def _paper_transforms(size: tuple[int, int]) -> list[Transform]:
    return [ColorShift(1.0, 1.0), FadingNoise(0.5), RollJitter()]


def _fast_transforms(size: tuple[int, int]) -> list[Transform]:
    # the paper's, but each copy gets its own roll: 6 shifts per step instead of 1
    return [ColorShift(1.0, 1.0), FadingNoise(0.5), RollJitter(per_copy=True)]


def _lucid_transforms(size: tuple[int, int]) -> list[Transform]:
    return [
        Pad(_px(12, size)),
        Jitter(_px(8, size)),
        RandomScale(),
        RandomRotate(10),
        Jitter(_px(4, size)),
    ]


def _robust_transforms(size: tuple[int, int]) -> list[Transform]:
    # fading per-pixel noise gives units that are dead on the near-grey start a gradient
    return [FadingNoise(0.5, per_pixel=True), *_geometric_transforms(size)]


def _geometric_transforms(size: tuple[int, int]) -> list[Transform]:
    # pad, jitter by 1/16 of the size, scale 0.6-1.3, rotate up to 30 degrees, flip
    return [
        Pad(_px(16, size)),
        Jitter(_px(14, size)),
        RandomScale(tuple(0.6 + 0.05 * i for i in range(15))),
        RandomRotate(30),
        Flip(),
        Jitter(_px(6, size)),
    ]


def _object_transforms(size: tuple[int, int]) -> list[Transform]:
    # one object on a random background (which already moves the start off flat grey),
    # then the robust preset's geometric transforms
    return [RandomBackground(), *_geometric_transforms(size)]


def _maco_transforms(size: tuple[int, int]) -> list[Transform]:
    return [
        Jitter(_px(16, size)),
        RandomScale(tuple(0.7 + 0.05 * i for i in range(11))),
        RandomRotate(15),
        Flip(),
    ]


def _no_transforms(size: tuple[int, int]) -> list[Transform]:
    return []


_PARAMS = ("pixel", "pyramid", "fourier", "maco", "splats")


@dataclass(frozen=True)
class Preset:
    """Every knob of a feature-visualization run (see the module docstring).

    Attributes:
        param: ``"pixel"``, ``"pyramid"`` (pixels as a sum of grids at full, 1/2, 1/4,
            ... resolution), ``"fourier"`` (Lucid), ``"maco"`` (phase only, magnitude
            fixed to a natural-image spectrum) or ``"splats"`` (soft round blobs).
        init: pixel initialization without start images: ``"uniform"`` or ``"gray"``.
        copies: augmented copies of each image per step.
        transforms: ``size -> list of transforms`` (sizes scale with the image); as an
            override also a plain list (``[]``: no augmentation).
        warmup_steps: the first ``warmup_steps`` steps use ``warmup_transforms``
            instead of ``transforms`` (0: no warm-up).
        warmup_transforms: as ``transforms``, for the warm-up steps.
        tv_weight: weight of :func:`~captum_vit.optim.objectives.total_variation`.
        tv_on_augmented: take TV on the augmented copies (the paper) or on the images.
        objective_scale: factor on the objective (the paper's code: 1/8).
        optimizer: ``"adam"`` or ``"sgd"``.
        lr, clip_lr: learning rate; ``clip_lr`` for open_clip (CLIP) models unless ``lr``
            is given explicitly.
        betas, eps: Adam's.
        schedule: ``"cosine"`` (decay to 0) or ``"constant"``.
        steps: optimization steps.
        clamp: clamp pixels to [0, 1] after each step.
        fourier_sd, decay_power, decorrelate: Fourier parameterization settings.
        pyramid_levels: grids of the ``"pyramid"`` parameterization (1: plain pixels).
        magnitude: MaCo's magnitude spectrum: ``"photos"`` (``skimage.data``
            photographs), ``"scenes"`` (the zoo's synthetic scenes) or ``(B, 3, H, W)``
            images in [0, 1] whose mean Fourier magnitude is used.
        splats, splat_gain: the ``"splats"`` parameterization's number of blobs per
            image and sigmoid steepness.
    """

    param: str = "pixel"
    init: str = "uniform"
    copies: int = 1
    transforms: TransformsSpec = _no_transforms
    warmup_steps: int = 0
    warmup_transforms: TransformsSpec = _no_transforms
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
    pyramid_levels: int = 4
    magnitude: str | Tensor = field(default="photos", compare=False)
    splats: int = 48
    splat_gain: float = 4.0

    def __post_init__(self) -> None:
        _check_choice("param", self.param, _PARAMS)
        _check_choice("init", self.init, ("uniform", "gray"))
        _check_choice("optimizer", self.optimizer, ("adam", "sgd"))
        _check_choice("schedule", self.schedule, ("cosine", "constant"))
        if isinstance(self.magnitude, str):
            _check_choice("magnitude", self.magnitude, ("photos", "scenes"))
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps must be between 0 and steps ({self.steps}), got {self.warmup_steps}"
            )
        if self.pyramid_levels < 1:
            raise ValueError(f"pyramid_levels must be at least 1, got {self.pyramid_levels}")
        if self.splats < 1:
            raise ValueError(f"splats must be at least 1, got {self.splats}")
        if self.splat_gain <= 0:
            raise ValueError(f"splat_gain must be positive, got {self.splat_gain}")
        if self.copies < 1:
            raise ValueError(f"copies must be at least 1, got {self.copies}")
        numbers = {name: getattr(self, name) for name in _FLOAT_FIELDS}
        numbers.update({f"betas[{i}]": beta for i, beta in enumerate(self.betas)})
        for name, value in numbers.items():
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("transforms", "warmup_transforms"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a list of transforms or a function size -> list")


#: The float settings of a :class:`Preset` (besides ``betas``), all required finite.
_FLOAT_FIELDS = (
    "tv_weight",
    "objective_scale",
    "lr",
    "clip_lr",
    "eps",
    "fourier_sd",
    "decay_power",
    "splat_gain",
)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be {options}, got {value!r}")


#: The paper's recipe (Ghiasi et al. 2022, reference code).
GHIASI2023 = Preset(
    copies=8,
    transforms=_paper_transforms,
    tv_weight=5e-5,
    objective_scale=1 / 8,
    lr=0.1,
    clip_lr=1.0,
    betas=(0.5, 0.99),
    schedule="cosine",
    steps=400,
)

#: The paper's recipe in a fifth of its image-steps: the pixels as a pyramid of grids
#: (full, 1/2, 1/4, 1/8 resolution) starting grey, 4 copies each with its own roll, 160
#: steps instead of 400 at lr 0.05.
FAST = replace(
    GHIASI2023,
    param="pyramid",
    init="gray",
    copies=4,
    steps=160,
    lr=0.05,
    transforms=_fast_transforms,
)

#: Strong transformation robustness for late layers: Fourier parameterization, fading
#: per-pixel noise, pad, jitter, scale 0.6-1.3, rotation up to 30 degrees, flip, 8 copies.
ROBUST = Preset(
    param="fourier",
    copies=8,
    transforms=_robust_transforms,
    lr=0.05,
    schedule="constant",
    steps=256,
)

#: One object for a class: ``ROBUST`` with a random background around a central disc
#: and total variation 0.05; the default for class logits.
OBJECT = replace(ROBUST, transforms=_object_transforms, tv_weight=0.05)

#: A class as a few flat-coloured shapes: ``OBJECT``'s random background and geometric
#: transforms on an image made of 48 soft blobs (``param="splats"``), lr 0.03.
SHAPES = replace(OBJECT, param="splats", lr=0.03, tv_weight=0.0)

#: Magnitude-constrained phase optimization (Fel et al. 2023).
MACO = Preset(
    param="maco",
    copies=8,
    transforms=_maco_transforms,
    lr=0.1,
    schedule="constant",
    steps=256,
)

PRESETS: dict[str | None, Preset] = {
    None: Preset(),
    "ghiasi2023": GHIASI2023,
    "fast": FAST,
    "robust": ROBUST,
    "object": OBJECT,
    "shapes": SHAPES,
    "maco": MACO,
    "lucid": Preset(
        param="fourier",
        transforms=_lucid_transforms,
        lr=0.05,
        schedule="constant",
        steps=512,
    ),
}

_FIELDS = tuple(f.name for f in fields(Preset))


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


def _fixed_transforms(transforms: list[Transform]) -> TransformsSpec:
    return lambda size: list(transforms)


def resolve_recipe(
    preset: str | Preset | None, overrides: Mapping[str, Any], *, clip: bool = False
) -> Preset:
    """The preset with ``overrides`` (``None`` values ignored) applied: the one place
    where recipe keywords are checked.

    Args:
        preset: a name, ``None`` or a :class:`Preset`.
        overrides: field name -> value; ``transforms`` may be a list.
        clip: the model is an open_clip model: its ``clip_lr`` applies unless ``lr`` is
            overridden.

    Raises:
        TypeError: a keyword that is no field of :class:`Preset` (with the closest).
        ValueError: a bad value.
    """
    overrides = {name: value for name, value in overrides.items() if value is not None}
    for name in overrides:
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, _FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"unknown feature-visualization setting {name!r}{hint} (settings: "
                f"{', '.join(_FIELDS)})"
            )
    for name in ("transforms", "warmup_transforms"):
        transforms = overrides.get(name)
        if transforms is not None and not callable(transforms):
            overrides[name] = _fixed_transforms(list(transforms))
    recipe = replace(get_preset(preset), **overrides)
    if clip and "lr" not in overrides and recipe.clip_lr is not None:
        recipe = replace(recipe, lr=recipe.clip_lr)
    return recipe
