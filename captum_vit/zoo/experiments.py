"""The paper's foreground / background and frequency experiments, on any image classifier.

* :func:`foreground_background` (Ghiasi et al. 2022, Sec. 5 and Table 2): accuracy on full
  images, on foreground-only images (background set to black) and on background-only images
  (foreground set to black), and the paper's normalized values (top-5 divided by full-image
  top-5, times 100).
* :func:`frequency_sensitivity` (Sec. 5, "low-pass filtering"): accuracy when the images are
  low-passed or high-passed in the 2-D FFT at several cut-offs.

Both take a model (timm / open_clip / any classifier; images in [0, 1] are normalized with the
model's own configuration through :class:`captum_vit.models.ImageModel`) and data: a
:class:`~captum_vit.zoo.SyntheticScenes`, a map-style dataset of items, or an iterable of
batches; items / batches are dicts (``image``, ``label``, ``mask``) or tuples
``(images, labels[, masks])``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._accuracy import TopKCounter
from .._batches import unpack_batch
from ..capture import preserved_state
from ..models import ImageModel, check_images
from .data import fft_filter

__all__ = [
    "ForegroundBackground",
    "FrequencySensitivity",
    "foreground_background",
    "frequency_sensitivity",
    "plot_foreground_background",
    "plot_frequency_sensitivity",
]


@dataclass(frozen=True)
class ForegroundBackground:
    """Accuracies (in %, top-1 and top-k with k = min(5, classes)) on full, foreground-only
    and background-only images. ``region`` is how the foreground was cut: ``"box"`` (its
    bounding box, as the paper's ImageNet boxes) or ``"mask"`` (the exact mask)."""

    full_top1: float
    full_top5: float
    foreground_top1: float
    foreground_top5: float
    background_top1: float
    background_top5: float
    num_images: int
    region: str

    @property
    def normalized_foreground(self) -> float:
        """The paper's Table 2 value: foreground top-5 / full top-5 * 100."""
        return _ratio(self.foreground_top5, self.full_top5)

    @property
    def normalized_background(self) -> float:
        """The paper's Table 2 value: background top-5 / full top-5 * 100."""
        return _ratio(self.background_top5, self.full_top5)

    @property
    def normalized_foreground_top1(self) -> float:
        return _ratio(self.foreground_top1, self.full_top1)

    @property
    def normalized_background_top1(self) -> float:
        return _ratio(self.background_top1, self.full_top1)


@dataclass(frozen=True)
class FrequencySensitivity:
    """Top-1 accuracy (%) on clean images and under FFT low-pass / high-pass filtering at each
    cut-off (fraction of the Nyquist frequency; see :func:`~captum_vit.zoo.fft_filter`)."""

    cutoffs: tuple[float, ...]
    clean_top1: float
    low_pass_top1: tuple[float, ...]
    high_pass_top1: tuple[float, ...]
    num_images: int


def _ratio(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else float("nan")


def _batches(data, batch_size: int, need_mask: bool) -> Iterator[tuple]:
    """Yield ``(images, labels, masks or None)`` batches from the supported data forms."""
    if isinstance(data, torch.Tensor):
        needs = "labels and foreground masks" if need_mask else "labels"
        raise TypeError(
            f"this experiment needs {needs}, which a tensor of images does not carry: pass "
            "zoo.SyntheticScenes, a dataset of dict items or batches of (images, labels"
            + (", masks)" if need_mask else ")")
        )
    if hasattr(data, "batches") and callable(data.batches):
        source: Iterable = data.batches(batch_size)
    elif isinstance(data, Dataset) and not isinstance(data, DataLoader):
        source = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        source = data
    for position, item in enumerate(source):
        batch = unpack_batch(item, position, labels=True, purpose="this experiment")
        if need_mask and batch.masks is None:
            raise ValueError(
                "foreground_background needs foreground masks: give batches with a 'mask' "
                "entry or (images, labels, masks) tuples"
            )
        yield batch.images, batch.labels, batch.masks


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """The bounding box of each mask's nonzero pixels, as a filled (B, 1, H, W) mask."""
    fg = masks.flatten(1, -3).amax(1) > 0  # (B, H, W)
    rows, cols = fg.any(2), fg.any(1)
    return (rows[:, :, None] & cols[:, None, :])[:, None].to(masks.dtype)


def _classifier(model: nn.Module, mean, std, image_size) -> ImageModel:
    return (
        model
        if isinstance(model, ImageModel)
        else ImageModel(model, mean=mean, std=std, image_size=image_size)
    )


@torch.no_grad()
def foreground_background(
    model: nn.Module,
    data,
    *,
    region: str = "box",
    batch_size: int = 100,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | Sequence[int] | None = None,
) -> ForegroundBackground:
    """Accuracy on full, foreground-only and background-only images (paper Table 2).

    The foreground-only image keeps the foreground region and sets everything else to 0
    (black); the background-only image sets the foreground region to 0.

    Args:
        model: an image classifier (timm, open_clip tower with a head, any ``nn.Module``
            returning logits); normalized internally, see :class:`~captum_vit.models.ImageModel`.
        data: images in [0, 1] with labels and foreground masks (``(B, 1, H, W)``, 1 on the
            foreground): a :class:`~captum_vit.zoo.SyntheticScenes`, a dataset of dict items,
            or an iterable of batches (dicts or ``(images, labels, masks)`` tuples).
        region: ``"box"`` (default) cuts the foreground's bounding box, as the paper's
            ImageNet boxes do, so a background-only image shows no silhouette of the
            object; ``"mask"`` cuts the exact mask.
        batch_size: batch size when ``data`` is a dataset.
        mean, std, image_size: override the model's normalization / input size.

    Returns:
        :class:`ForegroundBackground`; ``.normalized_foreground`` and
        ``.normalized_background`` are the paper's normalized top-5 values.

    Examples::

        >>> from captum_vit.zoo import SyntheticScenes, load_model, foreground_background
        >>> fb = foreground_background(load_model("vit"), SyntheticScenes(500, seed=1))
        >>> fb.foreground_top1, fb.background_top1, fb.normalized_background
    """
    if region not in ("box", "mask"):
        raise ValueError(f"region must be 'box' or 'mask', got {region!r}")
    classifier = _classifier(model, mean, std, image_size)
    counters = [TopKCounter() for _ in range(3)]  # full, foreground, background
    with preserved_state(classifier):
        for images, labels, masks in _batches(data, batch_size, need_mask=True):
            check_images(images)
            masks = masks.to(images)
            if masks.dim() == 3:
                masks = masks[:, None]
            if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
                raise ValueError(
                    f"masks of shape {tuple(masks.shape)} do not match images of shape "
                    f"{tuple(images.shape)}; give one (1, H, W) mask per image"
                )
            keep = _boxes(masks) if region == "box" else (masks > 0).to(images)
            variants = (images, images * keep, images * (1 - keep))
            for counter, variant in zip(counters, variants, strict=True):
                counter.add(classifier(variant), labels)
    total = counters[0].total
    if total == 0:
        raise ValueError("data holds no images")
    (full1, full5), (fg1, fg5), (bg1, bg5) = (
        (float(c.top1_percent()), float(c.topk_percent())) for c in counters
    )
    return ForegroundBackground(
        full_top1=full1,
        full_top5=full5,
        foreground_top1=fg1,
        foreground_top5=fg5,
        background_top1=bg1,
        background_top5=bg5,
        num_images=total,
        region=region,
    )


@torch.no_grad()
def frequency_sensitivity(
    model: nn.Module,
    data,
    cutoffs: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7),
    *,
    batch_size: int = 100,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | Sequence[int] | None = None,
) -> FrequencySensitivity:
    """Top-1 accuracy under FFT low-pass and high-pass filtering at several cut-offs.

    Args:
        model: an image classifier (normalized internally, see
            :class:`~captum_vit.models.ImageModel`).
        data: images in [0, 1] with labels (masks not needed): a
            :class:`~captum_vit.zoo.SyntheticScenes`, a dataset, or an iterable of batches.
        cutoffs: filter radii as fractions of the Nyquist frequency, each in (0, 1]. Low-pass
            keeps the frequencies below the cut-off; high-pass keeps those above it plus the
            image mean (see :func:`~captum_vit.zoo.fft_filter`).
        batch_size, mean, std, image_size: as in :func:`foreground_background`.

    Returns:
        :class:`FrequencySensitivity` with one low-pass and one high-pass accuracy per cut-off.

    Examples::

        >>> fs = frequency_sensitivity(load_model("cnn"), SyntheticScenes(500, seed=1))
        >>> dict(zip(fs.cutoffs, fs.low_pass_top1))
    """
    cutoffs = tuple(float(c) for c in cutoffs)
    if not cutoffs:
        raise ValueError("give at least one cut-off")
    for c in cutoffs:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"cut-offs are fractions of the Nyquist frequency in (0, 1], got {c}")
    classifier = _classifier(model, mean, std, image_size)
    clean = TopKCounter(k=1)
    low = [TopKCounter(k=1) for _ in cutoffs]
    high = [TopKCounter(k=1) for _ in cutoffs]
    with preserved_state(classifier):
        for images, labels, _ in _batches(data, batch_size, need_mask=False):
            check_images(images)
            clean.add(classifier(images), labels)
            for c, low_pass, high_pass in zip(cutoffs, low, high, strict=True):
                low_pass.add(classifier(fft_filter(images, c, "low")), labels)
                high_pass.add(classifier(fft_filter(images, c, "high")), labels)
    if clean.total == 0:
        raise ValueError("data holds no images")
    return FrequencySensitivity(
        cutoffs=cutoffs,
        clean_top1=float(clean.top1_percent()),
        low_pass_top1=tuple(float(n.top1_percent()) for n in low),
        high_pass_top1=tuple(float(n.top1_percent()) for n in high),
        num_images=clean.total,
    )


def plot_foreground_background(
    results: Mapping[str, ForegroundBackground],
    *,
    top: int = 1,
    ax=None,
    chance: float | None = None,
):
    """Grouped bars of full / foreground-only / background-only accuracy per model.

    Args:
        results: model name -> :class:`ForegroundBackground`.
        top: 1 or 5 (which accuracy to show).
        ax: a matplotlib axes to draw into (a new figure if None).
        chance: draw a dashed line at this accuracy (e.g. 100 / K).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if top not in (1, 5):
        raise ValueError(f"top must be 1 or 5, got {top}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    parts = ("full", "foreground", "background")
    width = 0.8 / max(len(results), 1)
    for m, (name, r) in enumerate(results.items()):
        values = [getattr(r, f"{p}_top{top}") for p in parts]
        xs = [i + (m - (len(results) - 1) / 2) * width for i in range(len(parts))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(parts)), [f"{p}\nonly" if p != "full" else p for p in parts])
    ax.set_ylabel(f"top-{top} accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    return ax.figure


def plot_frequency_sensitivity(
    results: Mapping[str, FrequencySensitivity], *, ax=None, chance: float | None = None
):
    """Top-1 accuracy against the cut-off, low-pass (solid) and high-pass (dashed), per model.

    Args:
        results: model name -> :class:`FrequencySensitivity`.
        ax: a matplotlib axes to draw into (a new figure if None).
        chance: draw a dotted line at this accuracy (e.g. 100 / K).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    for name, r in results.items():
        (line,) = ax.plot(r.cutoffs, r.low_pass_top1, marker="o", label=f"{name} low-pass")
        ax.plot(
            r.cutoffs,
            r.high_pass_top1,
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"{name} high-pass",
        )
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("cut-off (fraction of Nyquist)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="center right")
    return ax.figure
