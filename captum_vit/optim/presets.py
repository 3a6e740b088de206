"""Named recipes for feature visualization.

A :class:`Preset` holds every knob of a run; ``FeatureVisualization.attribute`` takes a
preset by name (or a ``Preset``) and any of its fields as a keyword override, checked here
in one place (:func:`resolve_recipe`). A new knob is one new field.

* ``"ghiasi2023"`` -- the paper's recipe as its reference code runs it: pixels initialized
  uniform in [0, 1] and clamped after every step; 8 augmented copies per image and step
  with the colour shift ``(x - mu) / sigma``, a per-channel Gaussian offset whose std fades
  linearly from 0.5 to 0 and a circular roll of up to 32 px at 224 (scaled with the size,
  one shift per image and step); total variation (4 directions, L2 norm) on the augmented
  batch with weight 5e-5; the objective scaled by 1/8 (the code's ``diag().mean()``); Adam,
  lr 0.1 (1.0 for CLIP), betas (0.5, 0.99), cosine decay to 0 over 400 steps.

  Why it gives weak images on small models such as the zoo ViT (64 px, 8-px patches,
  trained on flat-coloured synthetic scenes): the recipe optimizes free pixels, and what
  it is robust to -- a roll of 9 px (about one patch at 64 px) and the colour shift --
  leaves the pixels free to form high-frequency, saturated patterns locked to the patch
  grid. The zoo ViT reads them as its class (it calls all of its own class
  visualizations right) but another model does not: the zoo CNN recognizes 43.8% of them
  (chance 12.5%), because they show the class's *background* texture (stripes, checks),
  which the training data correlate with the class, drawn in per-pixel noise. Scaling the
  augmentations to the model (colour shift and noise divided by 4, as its normalization
  std 0.25 is about that of ImageNet; roll 4 px) did not fix it (measured on the previous,
  92% zoo ViT at 100 steps: the CNN 37.5%, the ViT itself 25%), so no scaled variant is
  offered; what helps is robustness to scale, rotation and flip with a smooth
  parameterization (``"robust"``) and, for a class, one object on a random background
  (``"object"``).
* ``"fast"`` -- the paper's augmentations on a better parameterization, in a fifth of its
  image-steps (see :data:`FAST`): the image is a pyramid of pixel grids at full, 1/2, 1/4
  and 1/8 resolution (``param="pyramid"``), so one Adam step moves whole regions as easily
  as single pixels, starting grey; 4 copies each with its own roll (the paper rolls all
  copies of an image alike), 160 steps at lr 0.05, cosine decay. Measured by
  ``cv.robust_activation`` (``benchmarks/fv_quality.py``, 4 units per layer, 1 thread):
  on a random-weight ViT-Ti/16 at 112 px (units 0-3) 0.185 / 0.253 / 0.168 at blocks
  1 / 5 / 11 in 68 s against the paper preset's 0.161 / 0.217 / 0.150 in 333 s; on the
  zoo ViT (the 4 units of each layer most active on held-out scenes) 1.012 / 1.096 /
  3.446 at blocks 0 / 3 / 5 in 19 s against the paper preset's 0.930 / 1.097 / 3.469 in
  90 s: above it on block 0, level on block 3, 0.7% under it on the last block (another
  environment's float rounding gave 1.106 and 3.443). The pixel version (6 copies x 112
  steps, lr 0.15) gave 0.909 / 1.009 / 3.363 there; every variant tried within a quarter
  of the paper's time (copies 2-8, lr 0.03-0.2, total variation, a shared roll, no fading
  noise, 3-6 grids, the Fourier parameterization) stayed at or under 3.46 on the last
  block. Averaged over seeds 0-2 (``--seeds 3``): zoo ViT 0.982 / 1.118 / 3.409 against
  0.958 / 1.119 / 3.520 in 0.20 of the time (3.2% under on the last block), random ViT-Ti
  ``blocks.3.mlp.act`` 0.215 against 0.189 in 0.21. The last-block gap is the same on
  each of its 4 units (3.349 / 3.809 / 3.190 / 3.289 against 3.441 / 3.962 / 3.297 /
  3.381). It shrinks with more views per step, not with more steps (seeds 0-2): 8 copies
  reach 3.511 in 0.41 of the paper's time (8 x 320: 3.544), 5 copies 3.456 in 0.28, 4 x
  320 3.467, paired (antithetic) colour shifts 3.426. Within the budget nothing else
  moved it: per-grid learning rates, iterate averaging, 2 or 5 grids and 8 x 100 or 2 x
  320 image-steps gave 3.37-3.42 (seeds 0-1, where fast gives 3.414); Adam beta1 from 0
  to 0.9 3.37-3.42, stratified (Latin-hypercube) colour, noise and roll draws across the
  copies 3.424, the pyramid in Lucid's decorrelated colour space 3.13-3.41, plain SGD
  (lr 3-100) 3.07-3.35, a uniform-noise start instead of grey 3.413 (seeds 0-2).
  Nor did spending the views unevenly (seeds 0-2, where fast gives 3.411 and the paper
  preset 3.520 in the same runs): 2 copies for the first 100 steps and 8 for the last 60
  (680 image-steps) gave 3.352, 8 for the first 60 and 2 for the last 100 3.316; nor
  cheaper views: 8 copies that each pass a random half of the patch tokens through the
  blocks (patch dropout, about the cost of 4 full copies) gave 3.419.
  Nor did a better start: each image started from the most exciting of 256 zoo scenes,
  or of 256 crops of the ``skimage.data`` photographs (``inputs=``), gave 3.397 and 3.412.
* ``"robust"`` -- strong transformation robustness for late layers (see :data:`ROBUST`):
  Lucid's Fourier parameterization, per-pixel Gaussian noise whose std fades from 0.5 to
  0, pad, jitter, scale 0.6-1.3, rotation up to 30 degrees, horizontal flip, 8 copies,
  256 steps. An image must excite the unit at every scale, angle and position, so what it
  shows is not a texture locked to the patch grid. The noise is there for the start: the
  Fourier image starts nearly flat grey (pixel std about 0.003), where a ReLU unit can be
  exactly 0 with no gradient, and a GELU unit nearly so; without it, 3 of the 4 most
  active units of each of the zoo CNN's ``layer1.0``-``layer3.0`` and of the zoo ViT's
  last block stayed grey for all 256 steps. With it, robust activation
  (``benchmarks/fv_quality.py``) rose from 0.640 / 0.668 / 1.070 to 0.672 / 0.747 / 2.550
  on the zoo ViT's blocks 0 / 3 / 5 and from 0.086 / 0.130 / 0.072 to 0.111 / 0.145 /
  0.082 on the random ViT-Ti's blocks 1 / 5 / 11.
* ``"object"`` -- one object for a class (see :data:`OBJECT`): ``"robust"`` with
  :class:`~captum_vit.optim.transforms.RandomBackground` first (the model sees the image
  only inside a central disc, on a new random flat colour every copy and step) and total
  variation 0.05. The image cannot lean on a background texture that the training data
  pair with the class, so the class shows as one object on a plain ground; the random
  background also moves the start off the flat grey image, where the zoo ViT's *circle*
  logit has no useful gradient under the geometric augmentations alone (it stayed grey).
  It leaves out ``"robust"``'s fading noise: with the noise, the CNN recognized 62.5%
  of the ViT's class images instead of 75.0% (and the ViT 50.0% of the CNN's instead of
  43.8%). The default when the layer is non-spatial (class logits). Measured
  (``benchmarks/fv_quality.py``, two images per class, 1 thread): the zoo CNN recognizes
  75.0% of the zoo ViT's class visualizations and the ViT 50.0% of the CNN's (chance
  12.5%; each model calls its own 100% right), against 62.5% / 43.8% with ``"robust"``,
  43.8% / 12.5% with the paper's preset and 56.2% / 18.8% with ``"fast"`` (another
  environment's float rounding gave 43.8% for ``"object"``'s CNN images and 43.8% /
  25.0% for ``"fast"``: one image is 6.25 points). The
  CNN's class images show a person their shapes (a white disc, a ring, a star), with
  coloured high-frequency fringes along their edges, and the ViT calls most of the
  hollow and spiky ones *frame*: *frame* is its answer to high-frequency clutter (it
  calls 200 of 200 uniform-noise images *frame*), not a background shortcut (on held-out
  scenes with random backgrounds it calls 95% of rings on *frame*'s own wave background
  right). Made grey, the same CNN images are recognized 62.5% of the time, but colour is
  not what fails: optimized in grey (luminance only) they were recognized 50.0% (two
  per class), with a random blur of up to 3 px as an augmentation 40.6% (four per
  class), and the ViT called 17 of their 18 stars, rings and crescents *frame*. The
  CNN's class evidence is in high frequencies (high-pass-filtered scenes: 80.2% top-1
  for the CNN, 29.8% for the ViT), so its class images are edge patterns (a star is a
  ring of 8-10 short rays round a dark centre) that the ViT does not read as shapes.
  Nor do priors on the CNN's own features fix it: a DeepInversion-style term (Yin et al.
  2020; the Gaussian KL between each batch-norm layer's input statistics over the batch
  of class images and its running statistics, weight 5) gave 56.2% against 50.0%
  without it (four images per class, same seeds); the same term per image, or a margin
  against the other logits, gave 12.5-50.0% (two per class). Keeping the images the
  source model itself finds most robust does not help either: of 8 per class, the 2 with
  the highest robust logit were recognized 50.0% (CNN -> ViT) and 68.8% (ViT -> CNN)
  against 50.0% and 75.0% for all 8. With 8 images per class (``--per-class 8``, 64 per
  direction) ``"object"`` gives 75.0% / 43.8% (75.0% / 50.0% in a fresh environment) and
  ``"robust"`` 59.4% / 37.5%: the two-per-class figures are within one or two images of
  these. More steps overfit the model that is optimized (on the previous 92% zoo ViT,
  ``"robust"`` at 512 steps: 62.5% / 50% against 75% / 62.5%).
  Smaller scales help one direction only (four per class, seed 0, against 81.2% /
  40.6% at 0.6-1.3): at 0.45-1.15 and at 0.35-1.0 alike, the CNN's images are discs,
  rayed stars and arcs that the ViT recognizes 56.2% of, but the CNN recognizes 75.0% of
  the ViT's; at 0.2-0.7 the ViT recognizes 46.9% and the CNN itself only 59.4% of
  its own (made for small sizes, they do not read at full size); on ``"shapes"``,
  0.35-1.0 gave CNN -> ViT 50.0% against 62.5%.
  Nor do judges trained differently (fine-tuned from the bundled weights; four per class,
  seed 0). Adversarially robust CNNs (L2 PGD in [0, 1] pixels, 3 attack steps, 400 steps
  of 64 scenes) at eps 0.5 / 1 / 2 draw stars, rings and crescents a person reads better
  as eps grows, but the ViT recognizes 56.2% / 46.9% / 40.6% of their ``"object"``
  class images (it calls their rings *frame* and, at eps 2, their crescents *ring*), and
  they recognize 84.4% / 81.2% / 75.0% of the ViT's. A ViT fine-tuned with half of its
  scenes high-pass filtered, or without the background bias, or adversarially (eps 0.1
  / 0.25 / 1) recognizes at most 56.2% of the CNN's ``"object"`` class images (the
  bundled ViT 40.6%) and at most the bundled ViT's 62.5% of its ``"shapes"`` ones.
* ``"shapes"`` -- a class as a few flat-coloured shapes (see :data:`SHAPES`):
  ``"object"``'s random background and geometric transforms on an image painted with 48
  soft round blobs through a steep sigmoid (``param="splats"``,
  :class:`~captum_vit.optim.params.SplatImage`), lr 0.03, no total variation. No
  parameter reaches single pixels, so the image cannot hold the edge patterns and
  per-pixel clutter of the Fourier presets; overlapping blobs merge into flat regions with
  clean edges. It is made for the direction where ``"object"`` fails: the zoo CNN's class
  images, which the zoo ViT reads as clutter (*frame*) when they are drawn as edges.
  Measured (``benchmarks/fv_quality.py --presets object,shapes --skip tiny,zoo
  --per-class 4``, 1 thread): the ViT recognizes 62.5% of the CNN's class images
  against 40.6% with ``"object"``, and the CNN 62.5% of the ViT's against 81.2%;
  with two per class 62.5% and 68.8% (``"object"``: 50.0% and 75.0%). So neither preset
  reaches 80% both ways: ``"shapes"`` has the better weak direction, ``"object"`` the
  better strong one and stays the default for classes. A person sees the CNN's shapes
  best (a disc, a triangle, rings and arcs); the ViT's class images are soft blobs of
  colour. In a prototype (two per class, its own random draws), a gentler sigmoid gave
  CNN -> ViT 75.0% / 68.8% (gain 1, seeds 0 / 1) and 43.8% (gain 2) but ViT -> CNN
  50.0% for both, against 68.8% / 68.8% at gain 4; a 16 x 16 logit field upsampled
  bicubically instead of blobs gave CNN -> ViT 50.0-56.2%. With four per class (seed 0;
  ``splat_gain`` overridden, the other blob shapes probes, not options), against 62.5% / 62.5%
  (ViT -> CNN / CNN -> ViT) at gain 4: gain 1 gave 43.8% / 59.4% (the prototype's 75.0%
  was two lucky images per class), gain 8 65.6% / 37.5%; elongated, rotated blobs
  65.6% / 50.0% (the CNN's stars become rayed stars a person reads, the ViT calls them
  *frame*), and with a square-ish (superellipse) profile 59.4% / 40.6%; one mask of
  blobs with one foreground and one background colour per image (a two-tone silhouette,
  like a scene's shape on its ground) 53.1% / 43.8%; blobs at least 4 px wide 53.1% /
  50.0%; 16 blobs 46.9% / 62.5%; and ``"object"`` run for 64 or 128 more steps from
  these images 53.1-56.2% / 56.2%. Round blobs in free colours stay the best of these.
  A learned image prior (Nguyen et al. 2016: optimize the code of a generator trained on
  the data, kept inside the 1st-99th percentile box of the codes of encoded scenes) was
  out of reach on two CPU cores: a convolutional autoencoder with a 256-d code, trained
  12 minutes on 2 threads, decodes scenes as blurred discs (the zoo ViT and CNN
  recognize 20.7% / 20.3% of its reconstructions of held-out scenes), and through it the
  class images are soft discs, rings and crescents, recognized 43.8% CNN -> ViT and
  31.2% ViT -> CNN (two per class); squares, stars and crosses cannot be drawn. Longer
  training (a smaller net, 2,500 steps: 23.0% / 25.0% of reconstructions; the shape's
  pixels weighted 10x in the loss, 3,000 steps: 11.7% / 16.0%) still decoded blobs.
  Start images are not supported (an image is not a sum of blobs).
  On the zoo ViT's hidden units (blocks 0 / 3 / 5) its robust activation is 0.793 /
  0.798 / 2.224 (``--presets object,shapes --skip tiny,transfer``), against
  ``"robust"``'s 0.672 / 0.747 / 2.550 and ``"maco"``'s 0.771 / 0.731 / 2.101; it costs
  what ``"object"`` costs (123 s against 126 s in that run).
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
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("transforms", "warmup_transforms"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a list of transforms or a function size -> list")


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
