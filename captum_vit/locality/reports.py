"""Result types of :class:`~captum_vit.locality.SpatialLocalityProbe`.

:class:`LocalityReport` holds the receptive-field locality of each probed layer;
:class:`PoolingReport` the paper's Table 1 accuracy experiments (Ghiasi et al. 2022,
section 4). Both are plain dataclasses of tensors and floats, re-exported by
``captum_vit.locality`` and ``captum_vit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Accuracy", "LocalityReport", "PoolingReport"]


class Accuracy(NamedTuple):
    """Top-1 and top-5 accuracy in percent (``[0, 100]``). With fewer than five classes,
    top-5 counts the top ``num_classes`` predictions (so it is 100)."""

    top1: float
    top5: float

    def __str__(self) -> str:
        return f"{self.top1:.2f} / {self.top5:.2f}"


@dataclass
class LocalityReport:
    """Receptive-field locality per layer.

    Attributes:
        layers: dotted module paths of the probed layers, in forward order.
        locality: ``(L,)`` float in ``[0, 1]``: mean over images and probed positions of
            the share of ``|d token(i, j) / d image|`` mass (a fixed random projection of
            the token's features) that lies inside cell ``(i, j)``'s own pixels. 1.0 means
            every token sees only its own patch; uniform mixing gives about ``1 / (h*w)``.
        fields: ``(L, h, w, h, w)`` when every layer has the same grid, else a list of
            ``(h_l, w_l, h_l, w_l)`` tensors: ``fields[l][i, j]`` is the mean share of
            token ``(i, j)``'s mass drawn from each input region of the layer's own grid
            (sums to 1). Rows of positions that were not probed (``positions=n``) are NaN.
        grids: ``(h, w)`` of each layer's grid; input region ``(a, b)`` of an ``H x W``
            image holds the pixel rows ``y`` with ``a*H/h <= y < (a+1)*H/h`` (and the same for
            columns), i.e. ``floor(y*h/H) == a``.
        sites: ``"output"`` or ``"input"`` per layer: where the tokens were read
            (``"output"`` unless the probe was built with ``attribute_to_layer_input``).
        feeds_output: per layer, whether the model's output depends on the layer's patch
            tokens (a non-zero gradient of the output on them). ``False`` for the last
            block of a cls-pooled model (its head reads only cls): those patch tokens are
            still computed from the image, and their locality shows the block's own
            mixing, but no prediction uses them. ``None`` where it could not be measured
            (an output that is not a tensor).
        positions: per layer, the flat indices (raster order) of the probed positions.
        projections: per layer, the fixed random ``(C,)`` projection of the features.
        image_size: ``(H, W)`` of the probed images.
        num_images: how many images the means run over.
    """

    layers: list[str]
    locality: torch.Tensor
    fields: torch.Tensor | list[torch.Tensor]
    grids: list[tuple[int, int]]
    sites: list[str]
    feeds_output: list[bool | None]
    positions: list[torch.Tensor]
    projections: list[torch.Tensor]
    image_size: tuple[int, int]
    num_images: int

    def field(self, layer: int | str) -> torch.Tensor:
        """``(h, w, h, w)`` fields of one layer, by index or dotted name."""
        if isinstance(layer, str):
            if layer not in self.layers:
                raise ValueError(
                    f"layer {layer!r} is not in this report; its layers: {self.layers}"
                )
            layer = self.layers.index(layer)
        return self.fields[layer]

    def __str__(self) -> str:
        lines = [f"LocalityReport ({self.num_images} image(s), {self.image_size} px)"]
        for name, value, grid, site, feeds in zip(
            self.layers,
            self.locality.tolist(),
            self.grids,
            self.sites,
            self.feeds_output,
            strict=True,
        ):
            note = "" if site == "output" else f" ({site})"
            unused = "  (patch tokens unused by the output)" if feeds is False else ""
            lines.append(
                f"  {name + note:32s} grid {grid[0]}x{grid[1]}  locality {value:.3f}{unused}"
            )
        return "\n".join(lines)

    # The dataclass default would print every field tensor in full.
    __repr__ = __str__


@dataclass
class PoolingReport:
    """The paper's spatial-information experiments (Table 1 and the "tear" log).

    Attributes:
        natural: accuracy of the unchanged model.
        isolated_cls: ``L -> accuracy`` when the prefix tokens (cls, and dist / registers
            where the model has them) run alone through the first ``L`` blocks and the
            patch tokens run without them; they meet from block ``L + 1`` on. ``L = 0`` is
            the natural model; ``L = depth`` means cls never sees the patches.
        patch_average: the model's head applied, unchanged, to each patch token's final
            features; per-position accuracy averaged over positions (the paper's
            "Patch Average").
        patch_max: the accuracy of the best single position (by top-1, then top-5).
        patch_max_position: ``(row, col)`` of that position.
        patch_accuracy: ``(h, w)`` top-1 accuracy of the head at each position.
        patch_accuracy_top5: ``(h, w)`` top-5 accuracy at each position.
        tear: ``L -> accuracy`` when every patch token is dropped after block ``L`` and only
            the prefix tokens go on (``L = depth`` is the natural model).
        depth: number of blocks of the model.
        num_images: how many images were evaluated.
    """

    natural: Accuracy
    isolated_cls: dict[int, Accuracy]
    patch_average: Accuracy
    patch_max: Accuracy
    patch_max_position: tuple[int, int]
    patch_accuracy: torch.Tensor
    patch_accuracy_top5: torch.Tensor
    tear: dict[int, Accuracy]
    depth: int
    num_images: int

    def __str__(self) -> str:
        lines = [
            f"PoolingReport ({self.num_images} images, {self.depth} blocks), top-1 / top-5:",
            f"  natural            {self.natural}",
            f"  patch average      {self.patch_average}",
            f"  patch max          {self.patch_max} at {self.patch_max_position}",
        ]
        lines += [f"  isolated cls L={k:<3d} {v}" for k, v in sorted(self.isolated_cls.items())]
        lines += [f"  tear after L={k:<4d} {v}" for k, v in sorted(self.tear.items())]
        return "\n".join(lines)

    __repr__ = __str__
