"""Per-unit results: which units to show, their feature visualizations (in fixed chunks,
so a unit's image does not depend on the process or on the run that computed it), and the
files of one unit (PNGs and ``unit.json``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..activation_map import PatchActivationMap
from ..optim import FeatureVisualization
from ..render import overlay, to_pil
from .resume import AtlasFiles
from .scan import LayerScan

__all__ = ["FVSettings", "select_units", "unit_folder", "visualize_units", "write_unit"]

#: Bins of a unit's activation histogram over the images.
HISTOGRAM_BINS = 24


@dataclass(frozen=True)
class FVSettings:
    """How feature visualizations are made (passed to ``FeatureVisualization.attribute``)."""

    preset: str
    steps: int | None
    seed: int
    image_size: tuple[int, int] | None = None  # default: the model's own


def select_units(scan: LayerScan, units: str | int | Sequence[int]) -> list[int]:
    """The units to show: ``"all"``, a list of unit ids, or an int ``N``, the ``N`` units
    whose best image activates them most (ties: the smaller id).

    Raises:
        ValueError: N < 1, an empty list, or a unit outside the layer's channels.
    """
    count = scan.num_channels
    if units == "all":
        return list(range(count))
    if isinstance(units, int) and not isinstance(units, bool):
        if units < 1:
            raise ValueError(f"the number of most active units must be >= 1, got {units}")
        best = scan.examples.scores[:, 0]
        order = sorted(range(count), key=lambda u: (-float(best[u]), u))
        return sorted(order[: min(units, count)])
    chosen = sorted({int(u) for u in units})
    if not chosen:
        raise ValueError("the list of units is empty")
    bad = [u for u in chosen if not 0 <= u < count]
    if bad:
        raise ValueError(
            f"unit {bad[0]} does not exist in layer {scan.examples.layer} "
            f"(it has units 0..{count - 1})"
        )
    return chosen


def unit_folder(layer: str, unit: int) -> str:
    return f"layers/{layer}/unit_{unit:04d}"


def visualize_units(
    model: torch.nn.Module, layer: str, units: list[int], settings: FVSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature visualizations of ``units`` (one batch) and each one's activation of its
    unit (mean over the patch tokens, as the top-k scores)."""
    fv = FeatureVisualization(model, layer)
    images = fv.attribute(
        target=list(units),
        preset=settings.preset,
        steps=settings.steps,
        image_size=settings.image_size,
        seed=settings.seed,
    )
    maps = PatchActivationMap(model, layer).attribute(images, target=list(units))
    return images, maps.mean((1, 2))


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _histogram(values: torch.Tensor) -> dict:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts = torch.histc(values.double(), bins=HISTOGRAM_BINS, min=low, max=high)
    return {"low": low, "high": high, "counts": [int(c) for c in counts.tolist()]}


def write_unit(
    files: AtlasFiles,
    scan: LayerScan,
    unit: int,
    visualization: torch.Tensor,
    visualization_score: float,
    images,
) -> None:
    """Write one unit's PNGs, then its ``unit.json`` (which marks the unit done)."""
    folder = unit_folder(scan.examples.layer, unit)
    scores, indices, maps = scan.examples.unit(unit)
    top_images = images.batch(indices.tolist())["image"]
    map_max = max(float(maps.max()), 0.0) if maps.numel() else 0.0
    files.write_bytes(f"{folder}/visualization.png", _png(visualization))
    top = []
    for rank, (image, activation_map) in enumerate(zip(top_images, maps, strict=True)):
        blended = overlay(image, activation_map, vmax=map_max or None)
        files.write_bytes(f"{folder}/top{rank}.png", _png(image))
        files.write_bytes(f"{folder}/top{rank}_map.png", _png(blended))
        index = int(indices[rank])
        prefix = scan.prefix[index, :, unit].tolist()
        top.append(
            {
                "index": index,
                "name": images.name(index),
                "score": float(scores[rank]),
                "peak": float(activation_map.max()),
                "prefix": prefix,
            }
        )
    values = scan.means[:, unit]
    record = {
        "layer": scan.examples.layer,
        "unit": unit,
        "visualization_score": float(visualization_score),
        "map_max": map_max,
        "top": top,
        "histogram": _histogram(values),
        "mean": float(values.mean()),
        "prefix_names": scan.prefix_names,
        "prefix_mean": scan.prefix[:, :, unit].mean(0).tolist(),
        "num_images": int(values.numel()),
    }
    files.write_json(f"{folder}/unit.json", record)
