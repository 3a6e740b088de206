"""Rendering: heat-map overlays of activation maps on their images, and per-unit grids
"feature visualization | top-k images with their overlays", as PIL images / PNG files.

Conventions follow :mod:`captum.attr.visualization`: ``sign`` is one of ``"positive"``,
``"negative"``, ``"absolute_value"``, ``"all"``, and maps are scaled to [-1, 1] by the same
cumulative-sum threshold with ``outlier_perc`` (the largest values holding that percentage
of the total mass saturate). :func:`captum_arrays` gives the ``(H, W, 1)`` / ``(H, W, 3)``
numpy arrays that ``captum.attr.visualization.visualize_image_attr`` takes. Images in and
out are RGB in [0, 1], ``(3, H, W)`` tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ._batches import dict_images
from .layout import covered_extent, upsample_to_image
from .models import check_value_range

__all__ = [
    "captum_arrays",
    "example_grid",
    "heatmap",
    "image_grid",
    "normalize_map",
    "overlay",
    "save_png",
    "to_pil",
    "unit_grid",
]

_SIGNS = ("positive", "negative", "absolute_value", "all")
_DEFAULT_CMAP = {
    "positive": "inferno",
    "absolute_value": "inferno",
    "negative": "Blues",
    "all": "bwr",
}


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """A ``(3, H, W)`` tensor or ``(H, W, 3)`` array in [0, 1] as an RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = _check_image(image).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a (3, H, W) tensor or (H, W, 3) array, got {array.shape}")
    check_value_range(torch.from_numpy(array), "an image")
    return Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def save_png(image: Image.Image | torch.Tensor, path: str | PathLike) -> None:
    """Save a PIL image or a ``(3, H, W)`` tensor in [0, 1] as a PNG file."""
    (image if isinstance(image, Image.Image) else to_pil(image)).save(path, format="PNG")


def normalize_map(
    values: torch.Tensor,
    *,
    sign: str = "positive",
    outlier_perc: float = 2.0,
    vmax: float | None = None,
) -> torch.Tensor:
    """Scale a map to [-1, 1] the way Captum's visualization does.

    Values are first filtered by ``sign`` (``"positive"`` keeps ``max(v, 0)``,
    ``"negative"`` ``min(v, 0)``, ``"absolute_value"`` ``|v|``, ``"all"`` everything), then
    divided by a threshold and clipped: ``vmax`` when given (use one for several maps
    that must share a scale), else the smallest ``|v|`` at which the sorted cumulative
    sum of ``|v|`` reaches ``100 - outlier_perc`` percent of the total.

    Returns:
        A float tensor of the same shape in [-1, 1] for ``"all"``, else in [0, 1] (as in
        Captum, ``"negative"`` maps the most negative values to 1). An all-zero map
        stays zero.
    """
    if sign not in _SIGNS:
        raise ValueError(f"sign must be one of {_SIGNS}, got {sign!r}")
    values = _filter_sign(_as_map(values), sign)
    threshold = float(vmax) if vmax is not None else _threshold(values.abs(), outlier_perc)
    if threshold == 0 or not np.isfinite(threshold):
        return torch.zeros_like(values)
    threshold = -abs(threshold) if sign == "negative" else abs(threshold)
    return (values / threshold).clamp(-1, 1)


def _filter_sign(values: torch.Tensor, sign: str) -> torch.Tensor:
    if sign == "positive":
        return values.clamp(min=0)
    if sign == "negative":
        return values.clamp(max=0)
    if sign == "absolute_value":
        return values.abs()
    return values


def _threshold(magnitudes: torch.Tensor, outlier_perc: float) -> float:
    if not 0 <= outlier_perc <= 100:
        raise ValueError(f"outlier_perc must be in [0, 100], got {outlier_perc}")
    ordered = magnitudes.flatten().double().sort().values
    cumulative = ordered.cumsum(0)
    if cumulative.numel() == 0 or cumulative[-1] == 0:
        return 0.0
    reached = cumulative >= cumulative[-1] * 0.01 * (100.0 - outlier_perc)
    return float(ordered[int(reached.nonzero()[0, 0])])


def heatmap(
    values: torch.Tensor,
    *,
    cmap: str | None = None,
    sign: str = "positive",
    outlier_perc: float = 2.0,
    vmax: float | None = None,
) -> torch.Tensor:
    """A ``(h, w)`` map as a colour image through a matplotlib colormap.

    Args:
        values: the ``(h, w)`` map.
        cmap: a matplotlib colormap name (default ``"inferno"``, ``"bwr"`` for
            ``sign="all"``).
        sign, outlier_perc, vmax: how the map is scaled (see :func:`normalize_map`).

    Returns:
        A ``(3, h, w)`` float tensor in [0, 1].
    """
    values = _as_map(values)
    if values.dim() != 2:
        raise ValueError(f"a map must be 2-D (h, w), got shape {tuple(values.shape)}")
    scaled = normalize_map(values, sign=sign, outlier_perc=outlier_perc, vmax=vmax)
    # Colormap input in [0, 1]: signed maps put zero at the middle.
    position = (scaled + 1) / 2 if sign == "all" else scaled.abs()
    colormap = matplotlib.colormaps[cmap or _DEFAULT_CMAP[sign]]
    rgb = colormap(position.cpu().numpy())[..., :3]
    return torch.from_numpy(rgb).float().permute(2, 0, 1)


def overlay(
    image: torch.Tensor,
    activation_map: torch.Tensor,
    *,
    alpha: float = 0.6,
    cmap: str | None = None,
    sign: str = "positive",
    outlier_perc: float = 2.0,
    vmax: float | None = None,
) -> torch.Tensor:
    """Blend the heat map of ``activation_map`` over ``image``.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        activation_map: ``(h, w)`` patch map (stretched bilinearly over ``H x W``) or
            ``(H, W)``. For an image that is not a whole number of patches, pass the
            ``(H, W)`` map of ``PatchActivationMap(..., interpolate=True)``, which lies
            on the pixels the patches cover.
        alpha: weight of the heat map (0: the image only; 1: the heat map only).
        cmap, sign, outlier_perc, vmax: see :func:`heatmap` / :func:`normalize_map`.

    Returns:
        ``(3, H, W)`` float in [0, 1]: ``(1 - alpha) * image + alpha * heat``.

    Examples::

        >>> maps = PatchActivationMap(model, "blocks.6.mlp.fc1").attribute(images, target=17)
        >>> to_pil(overlay(images[0], maps[0])).save("unit17.png")
    """
    image = _check_image(image)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    upsampled = _resize_map(activation_map, tuple(image.shape[-2:]))
    heat = heatmap(upsampled, cmap=cmap, sign=sign, outlier_perc=outlier_perc, vmax=vmax)
    return ((1 - alpha) * image.detach().float().cpu() + alpha * heat).clamp(0, 1)


def _resize_map(activation_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    activation_map = _as_map(activation_map)
    if activation_map.dim() != 2:
        raise ValueError(
            f"a map must be 2-D (h, w), got shape {tuple(activation_map.shape)}; "
            "pass one image's map"
        )
    values = activation_map.cpu()
    if tuple(values.shape) == size:
        return values
    return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _as_map(values: Any, name: str = "a map") -> torch.Tensor:
    """A map as a detached float tensor (numpy arrays too, as Captum's visualization
    takes them)."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array, got {type(values).__name__}")
    return values.detach().float()


def _check_image(image: Any) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        hint = (
            "; convert a PIL image with torchvision.transforms.functional.to_tensor(image)"
            if isinstance(image, Image.Image)
            else ""
        )
        raise TypeError(f"an image must be a (3, H, W) tensor, got {type(image).__name__}{hint}")
    if image.dim() != 3 or image.shape[0] != 3:
        batch = "; for one image of a batch take images[i]" if image.dim() == 4 else ""
        raise ValueError(
            f"an image must be (3, H, W) RGB in [0, 1], got {tuple(image.shape)}{batch}"
        )
    image = image.detach().float().cpu()
    check_value_range(image, "an image")
    return image


def captum_arrays(
    activation_map: torch.Tensor,
    image: torch.Tensor,
    *,
    sign: str | Sequence[str] = "absolute_value",
    outlier_perc: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(attr (H, W, 1), original_image (H, W, 3))`` float32 numpy arrays for
    ``captum.attr.visualization.visualize_image_attr`` and
    ``visualize_image_attr_multiple`` (the map upsampled bilinearly to the image).

    Captum scales a map by a threshold of its sign-filtered values and fails with
    "Cannot normalize by scale factor = 0" when nothing is left to draw (an all-zero map,
    or ``sign="positive"`` on a map without positive values). This function checks the
    map against the ``sign`` (or list of signs) and ``outlier_perc`` you will give Captum,
    and raises a ValueError that says why instead.

    Args:
        activation_map: ``(h, w)`` or ``(H, W)`` map of one image.
        image: ``(3, H, W)`` RGB in [0, 1].
        sign: the sign(s) you will pass to Captum (its default is ``"absolute_value"``).
        outlier_perc: the ``outlier_perc`` you will pass to Captum (its default is 2).

    Raises:
        ValueError: the map has NaN / inf values, or nothing Captum can scale for one of
            the signs (the message names the sign and what the map holds).

    Examples::

        >>> from captum.attr import visualization as viz
        >>> attr, img = captum_arrays(maps[0], images[0], sign="positive")
        >>> viz.visualize_image_attr(attr, img, method="blended_heat_map", sign="positive")
    """
    image = _check_image(image)
    upsampled = _resize_map(activation_map, tuple(image.shape[-2:]))
    signs = [sign] if isinstance(sign, str) else list(sign)
    for one in signs:
        _check_drawable(upsampled, one, outlier_perc)
    return upsampled.numpy()[..., None], image.permute(1, 2, 0).contiguous().numpy()


def _check_drawable(values: torch.Tensor, sign: str, outlier_perc: float) -> None:
    """Raise if Captum's visualization cannot scale ``values`` with this sign."""
    if sign not in _SIGNS:
        raise ValueError(f"sign must be one of {_SIGNS}, got {sign!r}")
    if not torch.isfinite(values).all():
        raise ValueError("the map contains NaN or inf values; Captum cannot draw it")
    if _threshold(_filter_sign(values, sign).abs(), outlier_perc) > 0:
        return
    if not values.ne(0).any():
        held = "is all zero"
    else:
        held = f"holds values in [{float(values.min()):.4g}, {float(values.max()):.4g}]"
    raise ValueError(
        f"the map {held}: with sign={sign!r} (outlier_perc={outlier_perc}) Captum's "
        "visualize_image_attr has nothing to scale and fails with 'Cannot normalize by "
        "scale factor = 0'. Use a sign that keeps its values ('all' for signed maps), a "
        "lower outlier_perc, or render.overlay / heatmap, which draw such a map as zero"
    )


def image_grid(
    cells: Sequence[torch.Tensor | Image.Image] | torch.Tensor,
    *,
    ncols: int | None = None,
    pad: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """Tile images in rows, each optionally with a caption underneath.

    Args:
        cells: ``(3, H, W)`` tensors in [0, 1] or PIL images, or an ``(N, 3, H, W)``
            batch.
        ncols: images per row (default: all in one row).
        pad: pixels between the cells.
        background: RGB colour of the padding.
        labels: one caption per image.

    Returns:
        A PIL image (``.save("grid.png")``; a notebook shows it inline).

    Examples::

        >>> image_grid(viz, ncols=4, labels=[f"unit {u}" for u in units]).save("grid.png")
    """
    pictures = [c if isinstance(c, Image.Image) else to_pil(c) for c in cells]
    if not pictures:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(pictures):
        raise ValueError(f"{len(labels)} labels for {len(pictures)} images")
    ncols = ncols or len(pictures)
    width = max(p.width for p in pictures)
    height = max(p.height for p in pictures)
    font = ImageFont.load_default()
    caption = _text_height(font) + 4 if labels is not None else 0
    rows = -(-len(pictures) // ncols)
    grid = Image.new(
        "RGB",
        (ncols * (width + pad) + pad, rows * (height + caption + pad) + pad),
        background,
    )
    draw = ImageDraw.Draw(grid)
    for position, picture in enumerate(pictures):
        row, col = divmod(position, ncols)
        x, y = pad + col * (width + pad), pad + row * (height + caption + pad)
        grid.paste(picture, (x, y))
        if labels is not None:
            draw.text((x + 2, y + height + 2), labels[position], fill=(0, 0, 0), font=font)
    return grid


def _text_height(font: Any) -> int:
    box = font.getbbox("Ag0.9")
    return int(box[3] - box[1])


def unit_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    visualization: torch.Tensor | None = None,
    scores: torch.Tensor | Sequence[float] | None = None,
    originals: bool = False,
    cell_size: int | None = None,
    alpha: float = 0.6,
    cmap: str | None = None,
    sign: str = "positive",
    outlier_perc: float = 2.0,
    shared_scale: bool = True,
) -> Image.Image:
    """One unit's row: its feature visualization, then its top images with overlays.

    Args:
        images: ``(k, 3, H, W)`` the unit's top images, RGB in [0, 1].
        maps: ``(k, h, w)`` (or ``(k, H, W)``) their activation maps.
        visualization: optional ``(3, H', W')`` image for the first cell (for example
            ``FeatureVisualization(...).attribute(target=unit)[0]``).
        scores: optional ``k`` scores written under the overlays.
        originals: add a row with the plain images above the overlays.
        cell_size: side of every cell in pixels (default: the images' height).
        alpha, cmap, sign, outlier_perc: see :func:`overlay`.
        shared_scale: one colour scale for all ``k`` maps (threshold over all of them),
            so that brightness compares across images; else one per map.

    Returns:
        A PIL image: ``[visualization] | overlay_1 | ... | overlay_k`` (one row, or two
        with ``originals``).
    """
    maps = _as_map(maps, "maps")
    _check_unit_row(images, maps, scores)
    if cell_size is not None and (isinstance(cell_size, bool) or cell_size < 1):
        raise ValueError(f"cell_size must be a positive number of pixels, got {cell_size!r}")
    size = cell_size or int(images.shape[-2])
    vmax = _shared_vmax(maps, sign, outlier_perc) if shared_scale else None
    options = dict(alpha=alpha, cmap=cmap, sign=sign, outlier_perc=outlier_perc, vmax=vmax)
    cells = [
        _resize_image(overlay(i, m, **options), size) for i, m in zip(images, maps, strict=True)
    ]
    labels = None if scores is None else [f"{float(score):.3g}" for score in scores]
    if visualization is not None:
        cells.insert(0, _resize_image(_check_image(visualization), size))
        labels = None if labels is None else ["visualization", *labels]
    picture = image_grid(cells, labels=labels)
    if not originals:
        return picture
    return _stack_rows(_originals_row(images, size, visualization is not None), picture)


def _check_unit_row(
    images: torch.Tensor, maps: torch.Tensor, scores: torch.Tensor | Sequence[float] | None
) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (k, 3, H, W), got {tuple(images.shape)}")
    if maps.dim() != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"maps must be (k, h, w) with k = {images.shape[0]} (one per image), "
            f"got {tuple(maps.shape)}"
        )
    if scores is not None and len(scores) != len(images):
        raise ValueError(f"{len(scores)} scores for {len(images)} images")


def _shared_vmax(maps: torch.Tensor, sign: str, outlier_perc: float) -> float | None:
    """One colour-scale maximum for all ``maps`` (None: each map scales itself)."""
    filtered = _filter_sign(maps.detach().float().cpu(), sign)
    return _threshold(filtered.abs(), outlier_perc) or None


def _originals_row(images: torch.Tensor, size: int, blank_first: bool) -> Image.Image:
    """The plain images as a grid row, after a blank cell above a visualization."""
    cells = [_resize_image(_check_image(image), size) for image in images]
    if blank_first:
        cells.insert(0, torch.ones(3, size, size))
    return image_grid(cells)


def _stack_rows(top: Image.Image, bottom: Image.Image) -> Image.Image:
    both = Image.new("RGB", (bottom.width, top.height + bottom.height), (255, 255, 255))
    both.paste(top, (0, 0))
    both.paste(bottom, (0, top.height))
    return both


def _resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0].clamp(
        0, 1
    )


def example_grid(
    examples: Any,
    unit: int,
    dataset: torch.Tensor | Sequence[Any],
    *,
    visualization: torch.Tensor | None = None,
    **options: Any,
) -> Image.Image:
    """:func:`unit_grid` for one unit of an :class:`~captum_vit.ExampleSet`.

    Each map is drawn on the pixels its patches covered (``examples.tiling``): on images
    that are not a whole number of patches, a padded or cut grid is not stretched.

    Args:
        examples: the ``ExampleSet`` from ``TopActivatingExamples.attribute``.
        unit: the unit (channel index of the layer, one of ``examples.channels``).
        dataset: the images the set's indices point into: an ``(N, 3, H, W)`` tensor, or
            anything indexable by int giving an image tensor, an ``(image, label)``
            tuple or a dict with an ``"image"`` (or ``"pixel_values"``) key (a map-style
            dataset).
        visualization: optional ``(3, H, W)`` image for the first cell.
        **options: passed on to :func:`unit_grid` (``originals``, ``cell_size``, ...).

    Examples::

        >>> result = TopActivatingExamples(model, layer, k=8).attribute(loader)
        >>> example_grid(result, 17, dataset, visualization=viz[0]).save("unit17.png")
    """
    scores, indices, maps = examples.unit(unit)
    if len(indices) == 0:
        raise ValueError(f"unit {unit} has no kept examples (the scan saw no images)")
    images = torch.stack([_image_at(dataset, int(i)) for i in indices])
    size = tuple(images.shape[-2:])
    if _stretch_misplaces(examples.tiling, tuple(maps.shape[-2:]), size):
        # Draw each map on the pixels its patches covered (a padded or cut grid).
        maps = upsample_to_image(maps[:, None].float(), size, examples.tiling)[:, 0]
    return unit_grid(images, maps, visualization=visualization, scores=scores, **options)


def _stretch_misplaces(tiling: Any, grid: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether stretching a ``grid`` map over images of ``size`` misplaces it: the grid's
    cells cover other pixels than the image, by less than a cell (so ``tiling``, of the
    scanned images, is that of these images too)."""
    extent = covered_extent(grid, tiling)
    if extent is None or extent == size:
        return False
    cells = (extent[0] / grid[0], extent[1] / grid[1])
    return all(abs(e - s) < c for e, s, c in zip(extent, size, cells, strict=True))


def _image_at(dataset: Any, index: int) -> torch.Tensor:
    if hasattr(dataset, "__len__") and index >= len(dataset):
        raise IndexError(
            f"the examples point at image {index}, but the dataset holds {len(dataset)}: pass "
            "the images the ExampleSet was built from (the whole stream, in order)"
        )
    item = dataset[index]
    if isinstance(item, Mapping):
        item = dict_images(item, f"dataset item {index}")
    elif isinstance(item, (tuple, list)):
        item = item[0]
    return _check_image(item)
