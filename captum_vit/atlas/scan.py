"""One pass over the images per layer: every unit's top-k images with their patch maps
(:class:`~captum_vit.TopActivatingExamples`, merged exactly across processes), and every
image's mean activation of every unit and its activation at the prefix tokens (cls,
registers), for the histograms."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..top_examples import ExampleSet, TopActivatingExamples
from .shard import Shard, fixed_batches

__all__ = ["LayerScan", "scan_layer"]


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
    """A forward hook on the layer that keeps, per batch, the mean over the patch tokens
    and the prefix tokens (it fires before the early-exit tap of the scan)."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        self.means: list[torch.Tensor] = []
        self.prefix: list[torch.Tensor] = []

    def __call__(self, _module, _args, output) -> None:
        spatial, prefix = self.layout.split(output)
        batch, channels = spatial.shape[:2]
        if prefix is None or prefix.shape[-1] != channels:
            prefix = spatial.new_zeros(batch, 0, channels)
        self.means.append(spatial.detach().float().mean((2, 3)).cpu())
        self.prefix.append(prefix.detach().float().cpu())


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


def scan_layer(
    model: torch.nn.Module,
    layer: str,
    images,
    *,
    k: int,
    batch_size: int,
    shard: Shard,
    show_progress: bool = False,
) -> LayerScan:
    """Scan ``images`` (an atlas image source) at ``layer``; this process takes its share
    of the fixed batches and every process gets the same, merged result.

    Raises:
        ValueError: the layer has no patch grid (a non-spatial layer).
    """
    method = TopActivatingExamples(model, layer, k=k)
    batches = fixed_batches(len(images), batch_size)
    mine = shard.mine(batches)
    probe = images.batch(batches[0][:2])["image"].to(method.device())
    layout = method.layout_for(probe)  # resolved before the hook is set: no extra records
    recorder = _ActivationRecorder(layout)

    handle = method.layer.register_forward_hook(recorder)
    try:
        examples = method.attribute(_Batches(images, mine), show_progress=show_progress)
    finally:
        handle.remove()
    local = [
        (indices, means, prefix)
        for indices, means, prefix in zip(mine, recorder.means, recorder.prefix, strict=True)
    ]
    parts = sorted((item for part in shard.gather(local) for item in part), key=lambda p: p[0][0])
    means = torch.cat([p[1] for p in parts])
    prefix = torch.cat([p[2] for p in parts])
    names = list(layout.prefix_names)[: prefix.shape[1]]
    return LayerScan(examples, means, prefix, names, tuple(layout.grid))
