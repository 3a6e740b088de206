"""TopActivatingExamples: a streaming top-k of the images that excite each unit most.

One pass over any iterable of batches keeps, for every unit at once, the ``k`` best
images' scores, stream indices and patch maps. Per batch: one forward that stops at the
layer, the per-image per-unit scores as one tensor reduction, and one vectorized merge of
``[kept, new]`` candidates; there is no Python loop over units or images, and memory is
``O(units * k * h * w)`` whatever the stream's length.

Ordering: candidates are ranked by score (descending), ties by the smaller global index,
so the result is deterministic and the same for one process and for any split of the data
over processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import nn

from ._base import _LayerMethod, as_unit_tensor, check_count, layouts_for
from ._batches import as_batch_stream, unpack_batch
from ._progress import progress, resolve_progress
from .capture import LayerTap, preserved_state
from .layout import TokenLayout
from .models import patch_tiling

__all__ = ["ExampleSet", "TopActivatingExamples", "scan_top_examples"]

_SCORES = ("mean", "max")


@dataclass
class ExampleSet:
    """The top-k images of a set of units.

    Attributes:
        channels: ``(C,)`` long, the units (channel indices of the layer).
        scores: ``(C, k)`` float, descending per unit. Slots that no image filled (fewer
            than ``k`` images seen) hold ``-inf``.
        indices: ``(C, k)`` long, global positions of the images in the data (counting
            images from 0 in iteration order, see
            :meth:`TopActivatingExamples.attribute`); ``-1`` in unfilled slots.
        maps: ``(C, k, h, w)`` float, the unit's activation at every patch of each kept
            image (zeros in unfilled slots).
        layer: dotted path of the layer.
        score: ``"mean"`` or ``"max"``, how a map was reduced to a score.
        num_images: how many images were scanned (all processes together).
        tiling: how the patch grid lay on the scanned images, ``((rows, cols),
            (patch_h, patch_w))`` (see :func:`captum_vit.models.patch_tiling`), so that
            a map is drawn on the pixels its patches covered; ``None`` when unknown (the
            map is stretched over its image).
    """

    channels: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    maps: torch.Tensor
    layer: str = ""
    score: str = "mean"
    num_images: int = 0
    tiling: tuple[tuple[int, int], tuple[int, int]] | None = None

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def unit(self, unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, indices, maps)`` of one unit (by channel index), unfilled slots
        dropped.

        Raises:
            IndexError: the unit is not among :attr:`channels`.
        """
        rows = (self.channels == unit).nonzero()
        if rows.numel() == 0:
            raise IndexError(
                f"unit {unit} is not in this ExampleSet (channels {self._describe_channels()})"
            )
        row = int(rows[0, 0])
        filled = self.indices[row] >= 0
        return self.scores[row, filled], self.indices[row, filled], self.maps[row, filled]

    def _describe_channels(self) -> str:
        values = self.channels.tolist()
        return str(values) if len(values) <= 8 else f"{values[:4]} ... {values[-2:]}"

    def __repr__(self) -> str:
        # The dataclass default would print every tensor in full (thousands of numbers).
        grid = "x".join(str(size) for size in self.maps.shape[2:])
        return (
            f"ExampleSet(layer={self.layer!r}, {len(self.channels)} unit(s) "
            f"{self._describe_channels()}, k={self.k}, score={self.score!r}, "
            f"maps {grid}, num_images={self.num_images})"
        )

    def save(self, path: str | PathLike) -> None:
        """Write the set to ``path`` (a ``torch.save`` file of tensors and plain values)."""
        torch.save(
            {
                "format": "captum_vit.ExampleSet/1",
                "channels": self.channels.cpu(),
                "scores": self.scores.cpu(),
                "indices": self.indices.cpu(),
                "maps": self.maps.cpu(),
                "layer": self.layer,
                "score": self.score,
                "num_images": self.num_images,
                "tiling": self.tiling,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | PathLike) -> ExampleSet:
        """Read a set written by :meth:`save` (tensors only; no code is unpickled).

        Raises:
            ValueError: the file is not a saved ExampleSet.
        """
        not_saved = f"{path} is not an ExampleSet saved by ExampleSet.save"
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # not a torch file, a truncated one, a pickle of objects
            raise ValueError(f"{not_saved} ({type(error).__name__})") from error
        if not isinstance(data, dict) or data.get("format") != "captum_vit.ExampleSet/1":
            raise ValueError(not_saved)
        data.pop("format")
        tiling = data.pop("tiling", None)  # absent from sets saved before it existed
        tiling = None if tiling is None else tuple(tuple(int(v) for v in p) for p in tiling)
        return cls(**data, tiling=tiling)


class TopActivatingExamples(_LayerMethod):
    """The k images of a data stream that excite each unit of a layer most.

    Examples::

        >>> ex = TopActivatingExamples(model, "blocks.6.mlp.fc1", k=10)
        >>> result = ex.attribute(dataloader)                # every unit of the layer
        >>> result.scores.shape, result.maps.shape           # (768, 10), (768, 10, 14, 14)
        >>> result.save("fc1_top10.pt")
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | str,
        k: int = 10,
        *,
        attribute_to_layer_input: bool = False,
        call: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | Sequence[int] | None = None,
        element: int | None = None,
    ) -> None:
        """
        Args:
            model: a timm / open_clip image model (a full CLIP model is reduced to its
                image tower; name its layers ``"visual.<path>"``), a CNN or any image
                model. It is never modified.
            layer: module or dotted path; any spatial layer
                :class:`~captum_vit.PatchActivationMap` takes.
            k: how many images to keep per unit.
            attribute_to_layer_input: rank by the layer's input instead of its output.
            call: for modules run several times per forward (CoaT), which call to use.
            mean, std, image_size: override the model's own normalization / input size.
            element: for a layer that returns a tuple or list of maps (CrossViT's
                blocks), which one; by default the first spatial one.

        Raises:
            TypeError: ``k`` is not an int. ValueError: ``k`` < 1.
        """
        self.k = check_count(k, "k", "images kept per unit")
        super().__init__(
            model,
            layer,
            attribute_to_layer_input=attribute_to_layer_input,
            call=call,
            mean=mean,
            std=std,
            image_size=image_size,
            element=element,
        )

    def attribute(
        self,
        inputs: Iterable[Any] | torch.Tensor,
        target: int | list[int] | torch.Tensor | None = None,
        *,
        score: str = "mean",
        show_progress: bool | None = None,
        offset: int | None = None,
    ) -> ExampleSet:
        """Scan ``inputs`` once and keep each unit's top-k images.

        Args:
            inputs: the images: an iterable of batches (a DataLoader), each one of: a ``(B, 3, H, W)`` tensor of RGB
                images in [0, 1]; a tuple / list whose first element is such a tensor
                (``(images, labels)``, as a DataLoader over a labelled dataset yields); a
                dict with an ``"image"`` tensor. A single 4-D tensor is one batch. A dict
                may carry ``"index"`` (``(B,)`` ints): the images' global indices, used
                instead of stream positions.
            target: ``None`` for every unit of the layer, or a unit / list / 1-D tensor
                of units.
            score: how a unit's patch map becomes one number per image: ``"mean"`` over
                the patch tokens (the paper's; prefix tokens excluded) or ``"max"``.
            show_progress: a progress bar over batches; ``None`` (default): when stderr
                is a terminal.
            offset: global index of this process's first image. Image ``i`` of the
                stream (counting from 0) gets index ``offset + i``. Default: 0 in one
                process; under ``torch.distributed`` each rank's shard is taken to be a
                contiguous block in rank order, so rank ``r`` gets the number of images
                all lower ranks scanned. With a ``DistributedSampler`` (interleaved
                shards) yield ``"index"`` in dict batches instead.

        Returns:
            :class:`ExampleSet` of float32 scores and maps on the CPU (whatever the model's
            dtype and device; a stream can be longer than a device holds); under
            ``torch.distributed`` every rank gets the same, exactly merged result (the one
            a single process would get over all data).
            Every rank must call ``attribute`` with the same layer, target and image
            size (a rank may have no batches); the merge is two ``all_gather`` calls of
            the kept candidates (gloo on CPU, NCCL on the current CUDA device).
            When fewer than ``k`` images were seen, the remaining slots have score
            ``-inf``, index ``-1`` and an all-zero map.

        Raises:
            ValueError: unknown score, a non-spatial layer, invalid images, batches of
                different patch grids, or an empty stream.
            IndexError: a unit outside the layer's channels.
            FloatingPointError: the model computes NaN activations for a unit asked for.
        """
        return scan_top_examples(
            [self], inputs, target, score=score, show_progress=show_progress, offset=offset
        )[0]

    def _units(self, target: Any, layout: TokenLayout) -> torch.Tensor:
        if target is None:
            return torch.arange(layout.num_channels)
        return as_unit_tensor(target, layout.num_channels)

    def _finish(
        self,
        top: _RunningTopK | None,
        seen: int,
        target: Any,
        score: str,
        offset: int | None,
        image_sizes: set[tuple[int, int]] = frozenset(),
    ) -> ExampleSet:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        size = next(iter(image_sizes)) if len(image_sizes) == 1 else None
        if distributed:
            top, seen, rank_offset, size = _share_shapes(top, seen, target, self.k, image_sizes)
            offset = rank_offset if offset is None else offset
        if top is None:
            raise ValueError("the data yielded no images: nothing to rank")
        result = top.result(offset or 0)
        if distributed:
            result = _gather_and_merge(result, self.k)
        return ExampleSet(
            channels=top.units.cpu(),
            scores=result[0].cpu(),
            indices=result[1].cpu(),
            maps=result[2].cpu(),
            layer=self.layer_path,
            score=score,
            num_images=seen,
            tiling=patch_tiling(self.vision, size) if size is not None else None,
        )


#: ``on_batch(position, spatial, prefix, scores)`` after each layer of each batch:
#: ``spatial`` (B, C, h, w) and ``prefix`` (B, P, C) or None as the layout splits the
#: layer, ``scores`` (units, B) float32 as ranked.
BatchCallback = Callable[[int, torch.Tensor, "torch.Tensor | None", torch.Tensor], None]


def scan_top_examples(
    methods: Sequence[TopActivatingExamples],
    inputs: Iterable[Any] | torch.Tensor,
    target: int | list[int] | torch.Tensor | None = None,
    *,
    score: str = "mean",
    show_progress: bool | None = None,
    offset: int | None = None,
    on_batch: BatchCallback | None = None,
) -> list[ExampleSet]:
    """:meth:`TopActivatingExamples.attribute` for several layers of one model in one
    pass: each batch runs one forward, stopped after the deepest of the layers, and every
    layer's top-k is merged from it. ``methods`` must share the model, the
    normalization, ``attribute_to_layer_input`` and ``call``; ``target`` applies to
    every layer. Returns one :class:`ExampleSet` per method, each what its own
    ``attribute`` would return.
    """
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    first = _check_compatible(methods)
    show_progress = resolve_progress(show_progress)
    tops: list[_RunningTopK | None] = [None] * len(methods)
    seen = 0
    indexed: bool | None = None  # whether the batches carry their own indices
    device = first.device()
    batch: dict[str, Any] = {}

    def merge(position: int, output: Any) -> None:
        spatial, prefix = batch["layouts"][position].split(output)
        scores = tops[position].add(spatial, batch["positions"], score)
        if on_batch is not None:
            on_batch(position, spatial, prefix, scores)

    # Each layer is merged as it is produced (no copy of its output); a negative call is
    # only known at the end of the forward: then the outputs are merged after it.
    as_produced = first.call >= 0
    tap = LayerTap(
        first.vision,
        [method.layer_name for method in methods],
        attribute_to_layer_input=first.attribute_to_layer_input,
        call=first.call,
        on_record=merge if as_produced else None,
    )
    unordered = _unordered_loader(inputs)
    image_sizes: set[tuple[int, int]] = set()
    with preserved_state(first.vision), torch.no_grad():
        for images, given_index in _batches(inputs, show_progress):
            first.check_images(images)
            images = images.to(device, non_blocking=True)
            layouts = layouts_for(methods, images)
            for position, (method, layout) in enumerate(zip(methods, layouts, strict=True)):
                tops[position] = _checked_top(tops[position], method, layout, target, images)
            if indexed is None and given_index is None and unordered:
                _warn_unordered(unordered)
            indexed = _check_indexed(indexed, given_index is not None, offset)
            if given_index is None:
                positions = torch.arange(seen, seen + images.shape[0], device=device)
            else:
                positions = given_index.to(device)
            batch.update(layouts=layouts, positions=positions)
            with tap:
                outputs = tap.run(first.normalize(images))
            if not as_produced:
                for position, output in enumerate(outputs):
                    merge(position, output)
            seen += images.shape[0]
            image_sizes.add((int(images.shape[-2]), int(images.shape[-1])))
    if indexed:
        offset = 0
    return [
        method._finish(top, seen, target, score, offset, image_sizes)
        for method, top in zip(methods, tops, strict=True)
    ]


def _check_compatible(methods: Sequence[TopActivatingExamples]) -> TopActivatingExamples:
    """The first method, once every method is known to share its model and settings."""
    if not methods:
        raise ValueError("scan_top_examples needs at least one TopActivatingExamples")
    first = methods[0]
    for method in methods[1:]:
        if method.vision is not first.vision or (
            method.attribute_to_layer_input,
            method.call,
            method.k,
        ) != (first.attribute_to_layer_input, first.call, first.k):
            raise ValueError(
                f"{method.layer_name!r} and {first.layer_name!r} do not share the model, "
                "k, attribute_to_layer_input and call: scan them separately"
            )
        if not (
            torch.equal(method.wrapped.mean, first.wrapped.mean)
            and torch.equal(method.wrapped.std, first.wrapped.std)
        ):
            raise ValueError(
                f"{method.layer_name!r} and {first.layer_name!r} normalize images "
                "differently: scan them separately"
            )
    return first


def _checked_top(
    top: _RunningTopK | None,
    method: TopActivatingExamples,
    layout: TokenLayout,
    target: Any,
    images: torch.Tensor,
) -> _RunningTopK:
    """The layer's running top-k (created on the first batch); later batches must give
    the same patch grid."""
    if top is None:
        return _RunningTopK(layout.grid, method._units(target, layout), method.k, images.device)
    if layout.grid != top.grid:
        raise ValueError(
            f"images of size {tuple(images.shape[-2:])} give a {layout.grid} "
            f"patch grid, but earlier batches gave {top.grid}: all images of "
            "one scan must share a patch grid"
        )
    return top


class _RunningTopK:
    """Kept candidates of every unit, merged batch by batch.

    Scores and indices are kept ranked; the maps live in a store of ``k`` slots per unit
    that a rank points into (``slots``), so a batch only writes the maps of the
    candidates that enter the top-k (few, once the scan is under way) instead of moving
    every kept map.
    """

    def __init__(
        self, grid: tuple[int, int], units: torch.Tensor, k: int, device: torch.device
    ) -> None:
        self.grid = tuple(grid)
        self.units = units.to(device)
        count, (h, w) = units.numel(), grid
        self.scores = torch.full((count, k), float("-inf"), device=device)
        self.indices = torch.full((count, k), -1, dtype=torch.long, device=device)
        self.slots = torch.arange(k, device=device).repeat(count, 1)
        self.store = torch.zeros(count, k, h * w, device=device)
        self.all_units = None
        self.max_index = -1  # the largest image index merged so far

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def add(self, spatial: torch.Tensor, positions: torch.Tensor, score: str) -> torch.Tensor:
        """Merge a batch: ``spatial`` (B, C, h, w) of the layer, ``positions`` (B,).
        Returns the batch's float32 scores, ``(units, B)``."""
        batch = spatial.shape[0]
        picked = spatial if self._all_units(spatial) else spatial[:, self.units]
        picked = picked.float()  # scores in float32 also for half-precision models
        new_scores = _reduce_maps(picked, score).t()  # (units, B)
        _check_no_nan(new_scores, self.units, positions)
        new_indices = positions.view(1, batch).expand(len(new_scores), batch)
        in_order = self._columns_in_tie_order(new_scores, positions)
        rows = self._rows_with_entrants(new_scores, new_indices, in_order)
        if rows is None:  # every unit: no row selection to copy in and out
            self._merge(None, new_scores, new_indices, spatial, in_order)
        elif len(rows):
            self._merge(rows, new_scores[rows], new_indices[rows], spatial, in_order)
        if batch:
            self.max_index = max(self.max_index, int(positions.max()))
        return new_scores

    def _columns_in_tie_order(self, new_scores: torch.Tensor, positions: torch.Tensor) -> bool:
        """Whether, among candidates of equal score, the columns of ``[kept, new]`` are
        already in the ranking's tie order: true for a stream read in order (every new
        image comes after every kept one, in ascending order) with no -inf or NaN score
        (those could tie with an empty slot, or have no order)."""
        if positions.numel() == 0 or int(positions[0]) <= self.max_index:
            return False
        if positions.numel() > 1 and not bool((positions[1:] >= positions[:-1]).all()):
            return False
        return bool((new_scores > float("-inf")).all())

    def _rows_with_entrants(
        self, new_scores: torch.Tensor, new_indices: torch.Tensor, in_tie_order: bool
    ) -> torch.Tensor | None:
        """Units with a new candidate that beats their k-th kept one (the others keep
        their top-k as it is: once a scan is under way, most units); ``None`` when that
        is every unit. In tie order a new candidate loses every tie, so only a higher
        score beats."""
        kth_score = self.scores[:, -1:]
        beats = new_scores > kth_score
        if not in_tie_order:
            kth_index = _tie_key(self.indices[:, -1:])
            beats |= (new_scores == kth_score) & (_tie_key(new_indices) < kth_index)
        entrants = beats.any(1)
        return None if bool(entrants.all()) else entrants.nonzero().squeeze(1)

    def _merge(
        self,
        rows: torch.Tensor | None,
        new_scores: torch.Tensor,
        new_indices: torch.Tensor,
        spatial: torch.Tensor,
        in_tie_order: bool = False,
    ) -> None:
        """Merge the batch's candidates into the top-k of units ``rows`` (``None``: all;
        ``in_tie_order``: see :meth:`_columns_in_tie_order`)."""
        k = self.k
        every = slice(None) if rows is None else rows
        scores = torch.cat([self.scores[every], new_scores], dim=1)
        indices = torch.cat([self.indices[every], new_indices], dim=1)
        if in_tie_order:
            best = _rank_ties_by_column(scores, k)
        else:
            best = rank_candidates(scores, indices, k)
        from_kept = best < k
        # Ranks kept from before keep their slots; each entering candidate takes the slot
        # of an evicted one. The ranking keeps the old order, so the kept old ranks are a
        # prefix of each row; evicted slots and entering candidates, both listed in
        # row-major order with equal counts per row, pair up within each unit.
        ranks_kept = from_kept.sum(1, keepdim=True)
        still_kept = torch.arange(k, device=best.device) < ranks_kept
        old_slots = self.slots[every]
        slots = old_slots.gather(1, best.clamp(max=k - 1))
        entering_rows, ranks = (~from_kept).nonzero(as_tuple=True)
        if len(entering_rows):
            free = old_slots[~still_kept]
            slots[entering_rows, ranks] = free
            images = best[entering_rows, ranks] - k
            units = entering_rows if rows is None else rows[entering_rows]
            channels = self.units[units]
            # Read the maps image by image, channels ascending: a map's values lie a
            # whole token apart, so this order reuses each image's cache lines (about
            # 1.7x faster for a ViT-Ti batch than reading unit by unit).
            order = torch.argsort(images * spatial.shape[1] + channels)
            images, channels, units, free = (
                images[order],
                channels[order],
                units[order],
                free[order],
            )
            entering = spatial[images, channels].flatten(1)
            self.store[units, free] = entering.to(self.store.dtype)
        self.scores[every] = scores.gather(1, best)
        self.indices[every] = indices.gather(1, best)
        self.slots[every] = slots

    def _all_units(self, spatial: torch.Tensor) -> bool:
        if self.all_units is None:
            count = spatial.shape[1]
            self.all_units = self.units.numel() == count and bool(
                (self.units == torch.arange(count, device=self.units.device)).all()
            )
        return self.all_units

    def result(self, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = torch.where(self.indices >= 0, self.indices + offset, self.indices)
        h, w = self.grid
        maps = self.store.gather(1, self.slots.unsqueeze(2).expand(-1, -1, h * w))
        return self.scores, indices, maps.view(len(maps), self.k, h, w)


def _reduce_maps(spatial: torch.Tensor, score: str) -> torch.Tensor:
    """``(B, C)``: each map of ``spatial`` (B, C, h, w) reduced to its mean or max. A
    token layer's maps are a channels-last view; reducing it in that memory order takes
    half the time of reducing dims (2, 3) of the view."""
    maps, dims = spatial, (2, 3)
    if spatial.stride(1) == 1 and spatial.shape[1] > 1:
        maps, dims = spatial.permute(0, 2, 3, 1), (1, 2)
    if score == "max":
        return maps.amax(dims)
    return maps.sum(dims) / (spatial.shape[2] * spatial.shape[3])


def rank_candidates(scores: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the best ``k`` candidates per row, best first: score descending, ties
    by the smaller index; empty slots (index -1) last among equal scores."""
    # Two stable sorts give the lexicographic order (score desc, index asc).
    order = torch.sort(_tie_key(indices), dim=1, stable=True).indices
    by_score = torch.sort(scores.gather(1, order), dim=1, descending=True, stable=True).indices
    return order.gather(1, by_score[:, :k])


def _rank_ties_by_column(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`rank_candidates` for candidates whose columns are in tie order (among equal
    scores, the left column has the smaller index) and whose scores are neither NaN nor
    -inf: one ``topk`` of an int64 key, the score's bits made monotone with the column as
    tie-breaker, instead of two full sorts."""
    n = scores.shape[1]
    bits = (scores.float() + 0.0).view(torch.int32).long()  # + 0.0 makes -0.0 equal 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float
    shift = 1 << max(1, (n - 1).bit_length())
    column_rank = n - 1 - torch.arange(n, device=scores.device)  # left column wins a tie
    return torch.topk(ordered * shift + column_rank, k, dim=1).indices


def _check_no_nan(scores: torch.Tensor, units: torch.Tensor, positions: torch.Tensor) -> None:
    """A NaN score has no rank: it would never enter the top-k, and a unit whose every
    activation is NaN would come back empty as if no image had been seen."""
    nan = torch.isnan(scores)
    if not bool(nan.any()):
        return
    rows, columns = nan.nonzero(as_tuple=True)
    bad_units = units[rows.unique()].tolist()
    bad_images = positions[columns.unique()].tolist()
    raise FloatingPointError(
        f"the layer's activations are NaN for unit(s) {_listed(bad_units)} on image(s) "
        f"{_listed(bad_images)}: the model computes NaN there (an overflow, as in a float16 "
        "model, or NaN weights), so these images cannot be ranked. Run the model in float32 "
        "or bfloat16, or check its weights"
    )


def _listed(values: list[int], shown: int = 8) -> str:
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return ", ".join(map(str, values[:shown])) + more


def _tie_key(indices: torch.Tensor) -> torch.Tensor:
    """Indices as tie-breakers: smaller first, empty slots (-1) last."""
    return torch.where(indices < 0, torch.iinfo(torch.long).max, indices)


def merge_top_k(
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``k`` of candidate sets ``(scores (U, n), indices (U, n), maps (U, n, ...))``
    per row, in :func:`rank_candidates` order."""
    scores, indices, maps = candidates
    best = rank_candidates(scores, indices, k)
    view = (*best.shape, *[1] * (maps.dim() - 2))
    picked = maps.gather(1, best.view(view).expand(-1, -1, *maps.shape[2:]))
    return scores.gather(1, best), indices.gather(1, best), picked


def _batches(data: Any, show_progress: bool | None) -> Iterable[tuple[torch.Tensor, Any]]:
    """``(images, index or None)`` of every batch of ``data``."""
    stream = progress(
        as_batch_stream(data), desc="top examples", enabled=show_progress, unit="batch"
    )
    for position, batch in enumerate(stream):
        unpacked = unpack_batch(batch, position)
        yield unpacked.images, unpacked.index


def _unordered_loader(data: Any) -> str | None:
    """The name of a ``DataLoader``'s sampler when it does not read the dataset in order
    (shuffling, ``DistributedSampler``, a random subset), else ``None``."""
    from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return None
    sampler = getattr(data.batch_sampler, "sampler", None) or data.sampler
    return None if isinstance(sampler, SequentialSampler) else type(sampler).__name__


def _warn_unordered(sampler: str) -> None:
    warnings.warn(
        f"the DataLoader reads its dataset through a {sampler}, and its batches carry no "
        "'index': the examples' indices count images in this run's order, so dataset[i] "
        "is not image i. Scan with shuffle=False, or yield dict batches with the images' "
        "'index' (see TopActivatingExamples.attribute)",
        stacklevel=4,
    )


def _check_indexed(indexed: bool | None, has_index: bool, offset: int | None) -> bool:
    if indexed is not None and indexed != has_index:
        raise ValueError(
            "some batches carry an 'index' and others do not: either every batch yields "
            "its images' global indices or none does"
        )
    if has_index and offset is not None:
        raise ValueError("offset applies to stream positions; batches with 'index' need none")
    return has_index


# --------------------------------------------------------------------------- distributed


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _share_shapes(
    top: _RunningTopK | None,
    seen: int,
    target: Any,
    k: int,
    image_sizes: set[tuple[int, int]],
) -> tuple[_RunningTopK | None, int, int, tuple[int, int] | None]:
    """Share every rank's image count, grid, units and image size; give ranks that saw no
    image an empty candidate set of the common shape. Returns (top, total images, rank
    offset, the one image size of all ranks or None)."""
    dist = torch.distributed
    device = _collective_device()
    h, w = top.grid if top is not None else (0, 0)
    units = top.units.numel() if top is not None else 0
    height, width = next(iter(image_sizes)) if len(image_sizes) == 1 else (-1, -1)
    meta = torch.tensor([seen, h, w, units, height, width], device=device)
    metas = [torch.empty_like(meta) for _ in range(dist.get_world_size())]
    dist.all_gather(metas, meta)
    metas = torch.stack(metas).cpu()
    rank = dist.get_rank()
    offset = int(metas[:rank, 0].sum())
    sizes = {tuple(m[4:].tolist()) for m in metas if m[0] > 0}  # (-1, -1): several
    size = sizes.pop() if len(sizes) == 1 else None
    size = None if size is None or size[0] < 0 else size
    shapes = {tuple(m[1:4].tolist()) for m in metas if m[0] > 0}
    if len(shapes) > 1:
        raise ValueError(
            f"ranks disagree on (h, w, units): {sorted(shapes)}; every rank must scan "
            "images of one size for the same target"
        )
    if not shapes:
        return None, 0, offset, None
    if top is None:
        h, w, count = shapes.pop()
        units = torch.arange(count) if target is None else as_unit_tensor(target, 2**62)
        top = _RunningTopK((h, w), units, k, device)
    return top, int(metas[:, 0].sum()), offset, size


def _gather_and_merge(
    result: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dist = torch.distributed
    device = _collective_device()
    gathered = []
    for tensor in result:
        local = tensor.contiguous().to(device)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        gathered.append(torch.cat(parts, dim=1))
    merged = merge_top_k(tuple(gathered), k)
    return tuple(t.to(result[0].device) for t in merged)
