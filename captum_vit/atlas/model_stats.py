"""Per-model figures of an atlas: how local each layer is (SpatialLocalityProbe) and the
paper's Table-1 pooling experiments when the model pools with its cls token."""

from __future__ import annotations

import torch

from ..locality import SpatialLocalityProbe, pooling_experiments
from .shard import fixed_batches

__all__ = ["layer_locality", "pooling_table"]


def layer_locality(
    model: torch.nn.Module, layers: list[str], images, *, count: int = 2, positions: int = 16
) -> dict[str, float]:
    """Receptive-field locality of each layer (share of a token's input gradient inside
    its own patch), over the first ``count`` images and ``positions`` probed patches."""
    probe = SpatialLocalityProbe(model, layers, batch_size=32)
    first = images.batch(range(min(count, len(images))))["image"]
    report = probe.attribute(first, positions, show_progress=False)
    return {
        name: float(value)
        for name, value in zip(report.layers, report.locality.tolist(), strict=True)
    }


def pooling_table(
    model: torch.nn.Module, images, *, count: int = 256, batch_size: int = 64
) -> dict:
    """The paper's Table 1 on the first ``count`` labelled images: natural accuracy, cls
    isolated for ``L`` blocks, patch average / best patch, and the tear sweep. Returns
    ``{"skipped": reason}`` when the images have no labels or the model does not pool with
    its cls token."""
    names = getattr(images, "class_names", None)
    if not names:
        return {"skipped": "the images have no labels (use an ImageFolder tree or zoo scenes)"}
    batches = fixed_batches(min(count, len(images)), batch_size)

    def loader():
        for indices in batches:
            batch = images.batch(indices)
            yield batch["image"], batch["label"]

    try:
        report = pooling_experiments(model, loader(), show_progress=False)
    except ValueError as error:
        return {"skipped": str(error)}
    return {
        "natural": report.natural.top1,
        "isolated_cls": {str(k): v.top1 for k, v in sorted(report.isolated_cls.items())},
        "tear": {str(k): v.top1 for k, v in sorted(report.tear.items())},
        "patch_average": report.patch_average.top1,
        "patch_max": report.patch_max.top1,
        "patch_max_position": list(report.patch_max_position),
        "depth": report.depth,
        "num_images": report.num_images,
    }
