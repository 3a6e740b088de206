"""One pass over the images for all layers: every unit's top-k images with their patch
maps (:class:`~captum_vit.TopActivatingExamples`, merged exactly across processes), and
every image's mean activation of every unit and its activation at the prefix tokens (cls,
registers), for the histograms."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._base import layouts_for
from ..top_examples import ExampleSet, TopActivatingExamples, scan_top_examples
from .shard import Shard, fixed_batches

__all__ = ["LayerScan", "scan_layers"]


@dataclass
class LayerScan:
    """What one layer does over the images.

    Attributes:
        examples: every unit's top-k images (scores = mean over the patch tokens).
        means: ``(N, C)`` each image's mean activation of each unit over the patch tokens.
        prefix: ``(N, P, C)`` the activation at each prefix token (``P = 0`` without).
        prefix_names: names of the prefix tokens (``"cls"``, ``"reg0"`` ...).
        grid: ``(h, w)`` patch grid.
    """

    examples: ExampleSet
    means: torch.Tensor
    prefix: torch.Tensor
    prefix_names: list[str]
    grid: tuple[int, int]

    @property
    def num_channels(self) -> int:
        return self.means.shape[1]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        e = self.examples
        torch.save(
            {
                "channels": e.channels,
                "scores": e.scores,
                "indices": e.indices,
                "maps": e.maps,
                "layer": e.layer,
                "num_images": e.num_images,
                "means": self.means,
                "prefix": self.prefix,
                "prefix_names": list(self.prefix_names),
                "grid": list(self.grid),
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_file(cls, path) -> LayerScan:
        data = torch.load(path, map_location="cpu", weights_only=True)
        examples = ExampleSet(
            channels=data["channels"],
            scores=data["scores"],
            indices=data["indices"],
            maps=data["maps"],
            layer=data["layer"],
            num_images=data["num_images"],
        )
        return cls(
            examples, data["means"], data["prefix"], data["prefix_names"], tuple(data["grid"])
        )


class _ActivationRecorder:
    """Keeps, per layer and batch, every image's mean activation of every unit (the scan's
    own scores) and its activation at the prefix tokens."""

    def __init__(self, layers: int) -> None:
        self.means: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self.prefix: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def __call__(self, position: int, spatial, prefix, scores: torch.Tensor) -> None:
        batch, channels = spatial.shape[:2]
        if prefix is None or prefix.shape[-1] != channels:
            prefix = spatial.new_zeros(batch, 0, channels)
        self.means[position].append(scores.t().cpu())
        # always a copy (one): a view would keep the layer's whole output alive for the
        # entire scan
        self.prefix[position].append(prefix.detach().to("cpu", torch.float32, copy=True))


class _Batches:
    """This process's batches as dicts with the images' global indices (sized, so that
    the progress bar shows an ETA)."""

    def __init__(self, images, batches: list[list[int]]) -> None:
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for indices in self.batches:
            yield {"image": self.images.batch(indices)["image"], "index": torch.tensor(indices)}


def scan_layers(
    model: torch.nn.Module,
    layers: Sequence[str],
    images,
    *,
    k: int,
    batch_size: int,
    shard: Shard,
    show_progress: bool = False,
) -> dict[str, LayerScan]:
    """Scan ``images`` (an atlas image source) at every one of ``layers`` in one pass (one
    forward per batch, stopped after the deepest layer); this process takes its share of
    the fixed batches and every process gets the same, merged result.

    Raises:
        ValueError: a layer has no patch grid (a non-spatial layer).
    """
    methods = [TopActivatingExamples(model, layer, k=k) for layer in layers]
    batches = fixed_batches(len(images), batch_size)
    mine = shard.mine(batches)
    probe = images.batch(batches[0][:1])["image"].to(methods[0].device())
    layouts = layouts_for(methods, probe)
    recorder = _ActivationRecorder(len(methods))
    examples = scan_top_examples(
        methods, _Batches(images, mine), show_progress=show_progress, on_batch=recorder
    )
    local = [
        (indices, [means[b] for means in recorder.means], [p[b] for p in recorder.prefix])
        for b, indices in enumerate(mine)
    ]
    parts = sorted((item for part in shard.gather(local) for item in part), key=lambda p: p[0][0])
    scans = {}
    for position, (layer, layout) in enumerate(zip(layers, layouts, strict=True)):
        means = torch.cat([p[1][position] for p in parts])
        prefix = torch.cat([p[2][position] for p in parts])
        names = list(layout.prefix_names)[: prefix.shape[1]]
        scans[layer] = LayerScan(examples[position], means, prefix, names, tuple(layout.grid))
    return scans
