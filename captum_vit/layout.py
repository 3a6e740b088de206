"""Token layouts: which tokens of a layer are prefix tokens (cls / dist / registers) and how
the others map onto the patch grid.

:func:`resolve_layout` runs one forward pass (stopped right after the layer) and decides
from evidence gathered in that same pass, never from declared attributes alone:

* **grid witnesses** -- every 4-D feature map produced before the layer (the patch
  embedding's convolution, PiT's pooling convolution, Swin's BHWC stages, CoaT's
  positional convolutions), every ``(tensor, (H, W))`` tuple (Twins' patch embeddings),
  the output of LeViT's token subsampling (when its token count fits the grid the
  subsampling keeps) and of TNT's pixel embedding (one row per patch) gives a candidate
  ``(h, w)`` grid for this input size;
* **the layer's own tensor** -- its rank, its batch axis, its token count ``N``.

For a token tensor the most recent witness grid with ``0 <= N - h*w <= 32`` (and fewer
prefix tokens than patch tokens) is the layer's grid, and ``N - h*w`` is its measured
prefix count. Prefix tokens always come first (checked for every timm / open_clip model
family); their names come from the parameters the model declares (``cls_token``,
``dist_token``, ``reg_token``, open_clip ``class_embedding``), and only when the declared
tokens add up to the measured count. When no grid can be established, or the layer is not
spatial (pooled features, class-attention or query tokens, windowed attention), a
``ValueError`` says what was seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import LayerTap, _user_path, find_module, peel_wrappers, preserved_state
from .models import ImageModel, check_batch_shape, model_device, unwrap_vision

__all__ = ["TokenLayout", "resolve_layout", "resolve_layouts", "MAX_PREFIX_TOKENS"]

#: Largest prefix (cls + dist + registers) the resolver accepts.
MAX_PREFIX_TOKENS = 32

#: Modules whose 4-D outputs are channels-first feature maps by construction.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.GroupNorm,
)

#: Attention modules that work on windows of tokens (B * num_windows, window_area, C):
#: their tensors are not in raster order of the image grid.
_WINDOWED = ("WindowAttention", "WindowAttentionGlobal", "LocallyGroupedAttn")


@dataclass(frozen=True)
class TokenLayout:
    """How one layer's output maps onto the patch grid.

    Attributes:
        kind: ``"BNC"`` (tokens, batch first), ``"NBC"`` (tokens, sequence first: older
            open_clip), ``"BHWC"`` (Swin) or ``"BCHW"`` (CNNs, PiT stages).
        grid: ``(h, w)`` of the patch grid for this layer and this input size.
        num_prefix_tokens: measured number of non-patch tokens at the start of the
            sequence (0 for BHWC / BCHW unless a separate prefix tensor comes with it).
        prefix_names: e.g. ``("cls",)``, ``("cls", "dist")``, ``("cls", "reg0", ...)``.
        num_channels: feature width of the layer.
        layer: dotted path of the layer.
        element: index of the spatial tensor when the layer returns a tuple, else None.
        prefix_element: index of a separate prefix-token tensor in that tuple (PiT stages
            return ``(x_BCHW, cls_tokens)``), else None.
        call: which call of the layer (modules run several times per forward) this
            layout describes.
        attribute_to_layer_input: whether it describes the layer's input.
        token_order: ``None`` when the patch tokens are in raster order of the grid (every
            model but Hiera); else, for each grid cell in raster order, the position of its
            token among the patch tokens (Hiera's blocks keep the tokens of each pooling
            window apart, in "unrolled" order). :meth:`split` and :meth:`split_tokens`
            always return patches in raster order.
    """

    kind: str
    grid: tuple[int, int]
    num_prefix_tokens: int
    prefix_names: tuple[str, ...]
    num_channels: int
    layer: str = ""
    element: int | None = None
    prefix_element: int | None = None
    call: int = 0
    attribute_to_layer_input: bool = False
    token_order: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """Tokens per image in the layer's sequence (prefix + patches)."""
        h, w = self.grid
        return h * w + (self.num_prefix_tokens if self.prefix_element is None else 0)

    def describe(self) -> str:
        """A few lines for a person: the layer, the tensor's shape and axis order, where
        the prefix tokens and the patches are, the channels.

        Examples::

            >>> print(cv.resolve_layout(model, "blocks.5").describe())
            layer     blocks.5 (its output)
            tensor    (B, 198, 192): a token sequence, batch first (BNC)
            tokens    2 prefix: cls at 0, dist at 1; then 14x14 patches in raster order from 2
            channels  192
        """
        h, w = self.grid
        c = self.num_channels
        side = "input" if self.attribute_to_layer_input else "output"
        call = f", call {self.call}" if self.call else ""
        shape, order = {
            "BNC": (f"(B, {self.num_tokens}, {c})", "a token sequence, batch first"),
            "NBC": (f"({self.num_tokens}, B, {c})", "a token sequence, sequence first"),
            "BHWC": (f"(B, {h}, {w}, {c})", "a feature map, channels last"),
            "BCHW": (f"(B, {c}, {h}, {w})", "a feature map, channels first"),
        }[self.kind]
        where = "" if self.element is None else f" at position {self.element} of a tuple"
        lines = [
            f"layer     {self.layer or '(the model itself)'} (its {side}{call})",
            f"tensor    {shape}{where}: {order} ({self.kind})",
        ]
        names = ", ".join(f"{n} at {i}" for i, n in enumerate(self.prefix_names))
        if self.kind in ("BNC", "NBC"):
            start = self.num_prefix_tokens
            order = "raster order" if self.token_order is None else "Hiera's unrolled order"
            tokens = (
                f"{start} prefix: {names}; then {h}x{w} patches in {order} from {start}"
                if start
                else f"no prefix tokens; {h}x{w} patches in {order}"
            )
        elif self.prefix_element is not None:
            tokens = (
                f"a {h}x{w} patch grid; {self.num_prefix_tokens} prefix ({', '.join(self.prefix_names)}) "
                f"apart, (B, {self.num_prefix_tokens}, C) at position {self.prefix_element} "
                "of the tuple"
            )
        else:
            tokens = f"a {h}x{w} patch grid; no prefix tokens"
        lines += [f"tokens    {tokens}", f"channels  {c}"]
        return "\n".join(lines)

    def select(self, output: Any) -> torch.Tensor:
        """The spatial tensor of a layer output (picks the tuple element if needed)."""
        if self.element is None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layout of {self.layer!r} expects a tensor, got {type(output).__name__}"
                )
            return output
        if not isinstance(output, (tuple, list)) or len(output) <= self.element:
            raise TypeError(
                f"layout of {self.layer!r} expects a tuple with a tensor at position "
                f"{self.element}, got {type(output).__name__}"
            )
        return output[self.element]

    def split(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a layer output into ``(spatial, prefix)``.

        Returns:
            spatial: ``(B, C, h, w)``; prefix: ``(B, P, C)`` or ``None`` when the layer
            has no prefix tokens.

        Raises:
            ValueError: the tensor does not have the shape this layout was resolved for
                (for example another input size); resolve the layout again.
        """
        x = self.select(output)
        h, w = self.grid
        prefix = None
        if self.kind in ("BNC", "NBC"):
            self._check(x, 3)
            if self.kind == "NBC":
                x = x.transpose(0, 1)
            prefix, patches = self.split_tokens(x)
            spatial = patches.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)
            return spatial, prefix if self.num_prefix_tokens else None
        self._check(x, 4)
        spatial = x.permute(0, 3, 1, 2) if self.kind == "BHWC" else x
        if tuple(spatial.shape[1:]) != (self.num_channels, h, w):
            raise self._mismatch(x)
        if self.prefix_element is not None:
            prefix = output[self.prefix_element]
        return spatial, prefix

    def split_tokens(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a batch-first token sequence of this layout into ``(prefix, patches)``.

        This is the one definition of token order: the ``num_prefix_tokens`` prefix tokens
        come first, then the ``h*w`` patch tokens, in raster order or, where the layout
        has a ``token_order``, in that order (put back in raster order here).

        Args:
            sequence: ``(B, N, C)`` with ``N = num_prefix_tokens + h*w`` (an ``NBC``
                layer's tensor transposed to batch first).

        Returns:
            prefix ``(B, P, C)`` (``P`` may be 0) and patches ``(B, h*w, C)``.

        Raises:
            ValueError: the layout has no token sequence (``BCHW`` / ``BHWC``) or the
                sequence does not have this layout's token count and width.
        """
        self._check_sequence(sequence)
        p = self.num_prefix_tokens
        patches = sequence[:, p:]
        if self.token_order is not None:
            patches = patches[:, self._order_index(patches.device)]
        return sequence[:, :p], patches

    def prefix_tokens(self, sequence: torch.Tensor) -> torch.Tensor:
        """The prefix ``(B, P, C)`` of a batch-first sequence that starts with this
        layout's prefix tokens; the rest may be any (or no) tokens, as in a sequence
        whose patch tokens were dropped."""
        self._check(sequence, 3)
        if sequence.shape[1] < self.num_prefix_tokens:
            raise self._mismatch(sequence)
        return sequence[:, : self.num_prefix_tokens]

    def join_tokens(self, prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The batch-first sequence ``(B, P + h*w, C)`` of this layout's token order from
        its parts (the inverse of :meth:`split_tokens`)."""
        if prefix.shape[1] != self.num_prefix_tokens:
            raise ValueError(
                f"layer {self.layer!r} has {self.num_prefix_tokens} prefix token(s), got "
                f"{prefix.shape[1]}"
            )
        sequence = torch.cat([prefix, patches], dim=1)
        self._check_sequence(sequence)  # the patch count and width
        if self.token_order is None:
            return sequence
        return torch.cat([prefix, patches[:, self._order_index(patches.device).argsort()]], dim=1)

    def tokens(self, output: Any) -> torch.Tensor:
        """The layer output as ``(B, h*w, C)`` patch tokens in raster order (prefix dropped)."""
        spatial, _ = self.split(output)
        return spatial.flatten(2).transpose(1, 2)

    def _check_sequence(self, sequence: torch.Tensor) -> None:
        """Raise unless ``sequence`` is a batch-first ``(B, N, C)`` sequence of this
        token layout's count and width."""
        if self.kind not in ("BNC", "NBC"):
            raise ValueError(
                f"layer {self.layer!r} is a {self.kind} feature map, not a token sequence; "
                "use split() for its (spatial, prefix) parts"
            )
        self._check(sequence, 3)
        _, tokens, channels = sequence.shape
        if tokens != self.num_tokens or channels != self.num_channels:
            raise self._mismatch(sequence)

    def _order_index(self, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(self.token_order, dtype=torch.long, device=device)

    def _check(self, x: torch.Tensor, ndim: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            raise self._mismatch(x)

    def _mismatch(self, x: Any) -> ValueError:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return ValueError(
            f"layer {self.layer!r} output {shape} does not match its resolved layout "
            f"({self.kind}, grid {self.grid[0]}x{self.grid[1]}, "
            f"{self.num_prefix_tokens} prefix token(s), {self.num_channels} channels); "
            "resolve the layout again for this input size"
        )


def upsample_to_image(
    maps: torch.Tensor,
    image_size: tuple[int, int],
    tiling: tuple[tuple[int, int], tuple[int, int]] | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Grid maps ``(B, C, h, w)`` upsampled onto the image's pixels ``(B, C, H, W)``.

    With the model's :func:`~captum_vit.models.patch_tiling`, a grid that is the patch
    grid or a downsampling of it (Swin's stages: cells of 2, 4, ... patches) is upsampled
    onto the pixels its cells cover, from the top left: where the model padded (timm
    ``dynamic_img_pad``, Swin's patch merging of an odd grid) the padding is cut off, and
    pixels it dropped (a remainder under one cell) take the nearest cell's values.
    Otherwise (no tiling, or a grid that is not made of whole patches, such as PiT's
    overlapping patches) the grid is stretched over the image, as Captum's
    ``LayerAttribution.interpolate`` does.
    """
    height, width = image_size
    extent = covered_extent(tuple(maps.shape[-2:]), tiling)
    if extent is None or extent == (height, width):
        return F.interpolate(maps, size=(height, width), mode=mode)
    covered = F.interpolate(maps, size=extent, mode=mode)[..., :height, :width]
    missing = (0, width - covered.shape[-1], 0, height - covered.shape[-2])
    return F.pad(covered, missing, mode="replicate") if any(missing) else covered


def covered_extent(
    grid: tuple[int, int], tiling: tuple[tuple[int, int], tuple[int, int]] | None
) -> tuple[int, int] | None:
    """The pixels ``(height, width)`` an ``(h, w)`` grid's cells cover from the top left,
    for a grid of whole patches of ``tiling`` (see :func:`upsample_to_image`); ``None``
    for any other grid."""
    cell = _cell_size(grid, tiling)
    return None if cell is None else (grid[0] * cell[0], grid[1] * cell[1])


def _cell_size(
    grid: tuple[int, int], tiling: tuple[tuple[int, int], tuple[int, int]] | None
) -> tuple[int, int] | None:
    """Pixels per cell of a grid made of ``k x k`` patches of ``tiling`` (a partial cell
    rounded either way), else ``None``."""
    if tiling is None:
        return None
    cells = []
    for size, patches, patch in zip(grid, *tiling, strict=True):
        merged = max(1, round(patches / size))
        if size not in (patches // merged, -(-patches // merged)):
            return None
        cells.append(merged * patch)
    return cells[0], cells[1]


# --------------------------------------------------------------------------- evidence


def stride_consistent(grid: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether an ``(h, w)`` grid can come from an ``(H, W)`` image with one stride on
    both axes, up to one cell of rounding or padding: true for 14x14 and PiT's 27x27 at
    224, and 10x14 at 160x224; false for (768, 7) or (64, 56) at 224."""
    h, w = grid
    height, width = image_size
    if h < 1 or w < 1 or h > height or w > width:
        return False
    for stride in (height / h, width / w):
        if abs(height / stride - h) <= 1 and abs(width / stride - w) <= 1:
            return True
    return False


def _declared_format(module_chain: Sequence[nn.Module]) -> str | None:
    """``"BHWC"`` / ``"BCHW"`` when the module or an ancestor declares ``output_fmt``."""
    for module in reversed(module_chain):
        fmt = getattr(module, "output_fmt", None)
        if fmt is None:
            continue
        fmt = str(getattr(fmt, "value", fmt)).upper()
        if fmt == "NHWC":
            return "BHWC"
        if fmt == "NCHW":
            return "BCHW"
    return None


def _orient_4d(
    shape: torch.Size,
    image_size: tuple[int, int],
    module_chain: Sequence[nn.Module],
    known_grids: Sequence[tuple[int, int]] = (),
) -> str | None:
    """``"BCHW"`` or ``"BHWC"`` for a 4-D tensor, or None if it cannot be decided."""
    chw = stride_consistent((shape[2], shape[3]), image_size)
    hwc = stride_consistent((shape[1], shape[2]), image_size)
    if isinstance(module_chain[-1], _CHANNELS_FIRST):
        return "BCHW" if chw else None
    if chw != hwc:
        return "BCHW" if chw else "BHWC"
    if not chw:
        return None
    declared = _declared_format(module_chain)
    if declared is not None:
        return declared
    in_chw = (shape[2], shape[3]) in known_grids
    in_hwc = (shape[1], shape[2]) in known_grids
    if in_chw != in_hwc:
        return "BCHW" if in_chw else "BHWC"
    return None


class _Witnesses:
    """Collects candidate patch grids from every module output, in forward order."""

    def __init__(self, model: nn.Module, batch: int, image_size: tuple[int, int]) -> None:
        self.batch = batch
        self.image_size = image_size
        self.grids: list[tuple[int, str, tuple[int, int]]] = []
        self.sequences: list[tuple[int, int]] = []  # (call, token count) of token tensors
        self._counts_so_far: set[int] = set()
        self.calls = 0
        self._chains = _ancestor_chains(model)
        self._unrolled_at: int | None = None
        #: (call, module name, shape, type name if it puts the channels first else None)
        #: of the 3-D outputs of leaf modules whose type fixes the channel axis
        #: (Conv1d / BatchNorm1d first, Linear / LayerNorm last).
        self._sequence_leaves: list[tuple[int, str, tuple[int, ...], str | None]] = []
        #: (call, module name, position in the output, shape, kind) of the square maps
        #: whose side is a token count seen before them: a feature map or a token-to-token
        #: matrix, which only another input size tells apart (:meth:`confirm_maps`).
        self.pending: list[tuple[int, str, int, tuple[int, ...], str]] = []

    def before(self, mark: int) -> list[tuple[str, tuple[int, int]]]:
        """Grids seen in the first ``mark`` module calls, as (module name, grid)."""
        return [(name, grid) for index, name, grid in self.grids if index <= mark]

    def unrolled_before(self, mark: int) -> bool:
        """Whether timm's Hiera ``Unroll`` reordered the tokens in the first ``mark``
        module calls."""
        return self._unrolled_at is not None and self._unrolled_at <= mark

    def token_counts_before(self, mark: int) -> set[int]:
        """Token counts of the token tensors seen in the first ``mark`` module calls."""
        return {count for index, count in self.sequences if index <= mark}

    def __call__(self, name: str, module: nn.Module, output: Any) -> None:
        self.calls += 1
        if self._unrolled_at is None and _is_hiera_unroll(module):
            self._unrolled_at = self.calls
        self._note_sequence_leaf(name, module, output)
        items = output if isinstance(output, (tuple, list)) else (output,)
        for position, item in enumerate(items):
            if isinstance(item, torch.Tensor) and item.dim() == 3:
                counts = [item.shape[1 - axis] for axis in (0, 1) if item.shape[axis] == self.batch]
                self.sequences += [(self.calls, count) for count in counts]
                self._counts_so_far.update(counts)
            elif isinstance(item, torch.Tensor) and item.dim() == 4 and item.shape[0] == self.batch:
                kind = _orient_4d(item.shape, self.image_size, self._chains[name])
                if kind is None or _per_head_owner(item.shape, kind, self._chains[name]):
                    continue
                if _attention_size(item.shape, kind, self._counts_so_far) is None:
                    self._add_grid(self.calls, name, _grid_of(item.shape, kind))
                else:
                    self.pending.append((self.calls, name, position, tuple(item.shape), kind))
            for stated in _stated_grids(item, self.batch):
                self.grids.append((self.calls, name, stated))
        declared = _subsampled_grid(module, output, self.batch) or _per_patch_grid(
            module, output, self.batch
        )
        if declared is not None:
            self._add_grid(self.calls, name, declared)

    def _note_sequence_leaf(self, name: str, module: nn.Module, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            return
        if isinstance(module, _CHANNELS_FIRST):
            first = type(module).__name__
        elif type(module) in (nn.Linear, nn.LayerNorm):
            first = None
        else:
            return
        self._sequence_leaves.append((self.calls, name, tuple(output.shape), first))

    def channels_first_maker(
        self, mark: int, layer: str, module: nn.Module, shape: tuple[int, ...]
    ) -> str | None:
        """The type of the module that made a 3-D output of ``layer`` (``module`` itself,
        or the last leaf inside it, in the first ``mark`` module calls, with an output of
        that shape) when that module puts the channels first, ``(B, C, L)`` rather than
        tokens ``(B, N, C)``; else ``None``."""
        if len(shape) != 3 or shape[1] == shape[2]:
            return None
        if isinstance(module, _CHANNELS_FIRST):
            return type(module).__name__
        makers = [
            first
            for index, leaf, leaf_shape, first in self._sequence_leaves
            if index <= mark
            and leaf_shape == shape
            and (not layer or leaf == layer or leaf.startswith(layer + "."))
        ]
        return makers[-1] if makers else None

    def _add_grid(self, call: int, name: str, grid: tuple[int, int]) -> None:
        """A map's grid; its cells are tokens too, for the attention a convolutional block
        computes over them without ever showing them as a sequence (EfficientFormer-V2's
        ``(B, heads, 49, 49)`` over a 7x7 map). One cell is no sequence."""
        self.grids.append((call, name, grid))
        cells = grid[0] * grid[1]
        if cells > 1:
            self.sequences.append((call, cells))
            self._counts_so_far.add(cells)

    def confirm_maps(self, larger: _ShapesByCall) -> None:
        """Add the pending square maps whose grid followed the image to ``larger``'s size
        (:func:`_grows_with_image`) to the grids seen: PVT-v2's 64x64 first stage at
        256 px, after the 8x8 = 64 key tokens of its spatial-reduction attention. A
        token-to-token matrix over the image's tokens grows with their count instead,
        one over a fixed number of tokens not at all. Where that forward shows nothing (a
        model that takes one size), :func:`_map_unless_in_attention` decides."""
        for call, name, position, shape, kind in self.pending:
            other = larger.shape_at(call, name, position)
            if other is None:
                grew = _map_unless_in_attention(self._chains[name])
            else:
                grew = _grows_with_image(shape, other, kind, self.image_size, larger.image_size)
            if grew:
                self._add_grid(call, name, _grid_of(shape, kind))
        self.grids.sort(key=lambda entry: entry[0])
        self.pending = []


class _ShapesByCall:
    """The 4-D output shapes of every module call of a forward at another input size, in
    call order (a ``watch`` for :class:`~captum_vit.capture.LayerTap`)."""

    def __init__(self, image_size: tuple[int, int]) -> None:
        self.image_size = image_size
        self.calls: list[tuple[str, list[tuple[int, ...] | None]]] = []

    def __call__(self, name: str, module: nn.Module, output: Any) -> None:
        items = output if isinstance(output, (tuple, list)) else (output,)
        shapes = [
            tuple(item.shape) if isinstance(item, torch.Tensor) and item.dim() == 4 else None
            for item in items
        ]
        self.calls.append((name, shapes))

    def shape_at(self, call: int, name: str, position: int) -> tuple[int, ...] | None:
        """The shape the same module call (1-based) output there, if it was 4-D."""
        if call > len(self.calls) or self.calls[call - 1][0] != name:
            return None
        shapes = self.calls[call - 1][1]
        return shapes[position] if position < len(shapes) else None


def _grid_of(shape: Sequence[int], kind: str) -> tuple[int, int]:
    return (shape[2], shape[3]) if kind == "BCHW" else (shape[1], shape[2])


def _grows_with_image(
    shape: Sequence[int],
    other: Sequence[int],
    kind: str,
    image_size: tuple[int, int],
    larger: tuple[int, int],
) -> bool:
    """Whether a 4-D tensor of ``shape`` at ``image_size`` became ``other`` at the
    ``larger`` input size the way a map of the image does: the same channels on a grid
    grown in proportion to the image, to a cell."""
    channel = 1 if kind == "BCHW" else 3
    if len(other) != 4 or other[0] != shape[0] or other[channel] != shape[channel]:
        return False
    (h, w), (h2, w2) = _grid_of(shape, kind), _grid_of(other, kind)
    return (h2, w2) != (h, w) and (
        abs(h2 - h * larger[0] / image_size[0]) <= 1
        and abs(w2 - w * larger[1] / image_size[1]) <= 1
    )


def _per_head_owner(
    shape: torch.Size, kind: str | None, chain: Sequence[nn.Module]
) -> nn.Module | None:
    """The attention module (an ancestor declaring ``num_heads``) when a channels-first
    4-D tensor inside it has one channel per head: a per-head tensor, such as XCiT's
    ``(B, heads, d, d)`` channel-to-channel attention, which fits a d x d map by shape
    alone. The attention module's own output is not inside it."""
    if kind != "BCHW":
        return None
    for module in chain[:-1]:
        if getattr(module, "num_heads", None) == shape[1]:
            return module
    return None


def _attention_size(shape: torch.Size, kind: str, token_counts: set[int]) -> int | None:
    """``N`` when a 4-D tensor is a token-to-token matrix ``(B, heads, N, N)`` over ``N``
    tokens seen before it (attention probabilities, relative position biases): its
    "grid" is tokens by tokens, not the image."""
    h, w = (shape[2], shape[3]) if kind == "BCHW" else (shape[1], shape[2])
    return h if h == w and h in token_counts else None


def _is_hiera_unroll(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__ == "timm.models.hiera" and kind.__name__ == "Unroll"


def _hiera_unrolled(chain: Sequence[nn.Module], unrolled: bool) -> bool:
    """Whether a token layer holds Hiera's tokens in their unrolled order: after timm's
    ``Unroll`` ran, or inside Hugging Face's ``HieraEncoder`` (its unroll is a function
    called before the encoder)."""
    return unrolled or any(
        type(module).__name__ == "HieraEncoder"
        and type(module).__module__.startswith("transformers.")
        for module in chain
    )


def _trailing_token_count(vision: nn.Module) -> int:
    """How many tokens the model appends after its patch tokens: Hugging Face YOLOS's
    ``detection_tokens`` parameter ``(1, n, C)``; 0 for every other model."""
    for name, param in vision.named_parameters():
        if name.rpartition(".")[2] == "detection_tokens" and param.dim() == 3:
            return int(param.shape[1])
    return 0


#: Per token count of an unrolled Hiera sequence: its grid and its ``token_order``.
_UnrolledOrders = dict[int, tuple[tuple[int, int], tuple[int, ...]]]


def _hiera_unroll_plan(
    model: nn.Module, image_size: tuple[int, int]
) -> tuple[tuple[int, int], list[tuple[int, int]]] | None:
    """The patch grid Hiera unrolls and its unroll strides, one ``(sy, sx)`` per query
    pooling it prepares: timm's ``Unroll`` module (``size``, ``schedule``), or Hugging
    Face's ``HieraModel`` (``unroll_schedule``; the grid is the image over
    ``config.patch_stride``). ``None`` for anything else, or a video (3-D) Hiera."""
    for module in model.modules():
        kind = type(module)
        if _is_hiera_unroll(module):
            grid, schedule = list(module.size), list(module.schedule)
        elif kind.__name__ == "HieraModel" and kind.__module__.startswith("transformers."):
            stride = module.config.patch_stride
            grid = [size // step for size, step in zip(image_size, stride, strict=True)]
            schedule = list(module.unroll_schedule)
        else:
            continue
        if len(grid) != 2 or any(len(strides) != 2 for strides in schedule):
            return None
        return (grid[0], grid[1]), [(int(sy), int(sx)) for sy, sx in schedule]
    return None


def _unrolled_orders(grid: tuple[int, int], schedule: Sequence[tuple[int, int]]) -> _UnrolledOrders:
    """Where Hiera keeps each patch of an ``h x w`` grid, per stage.

    Its unroll moves, for each ``(sy, sx)`` of ``schedule`` in turn, the position inside
    each ``sy x sx`` window to the front of the sequence, so that a query pooling is a max
    over ``sy*sx`` equal slices (``x.view(B, sy*sx, -1, C).amax(1)``); each pooling uses up
    the outermost stride. Following the cells through both gives, for the sequence of
    every stage (told apart by its token count), its grid and for each grid cell the
    position of its token. Empty when the grid does not divide by the strides."""
    h, w = grid
    cells = torch.arange(h * w).view(1, h, w)
    for sy, sx in schedule:
        windows, rows, cols = cells.shape
        if rows % sy or cols % sx:
            return {}
        cells = cells.view(windows, rows // sy, sy, cols // sx, sx).permute(0, 2, 4, 1, 3)
        cells = cells.reshape(windows * sy * sx, rows // sy, cols // sx)
    held = cells.reshape(-1)  # the grid cell each token holds, in sequence order
    orders: _UnrolledOrders = {}
    for level in range(len(schedule) + 1):
        orders[held.numel()] = ((h, w), tuple(held.argsort().tolist()))
        if level == len(schedule):
            break
        sy, sx = schedule[level]
        coarse = (held // w // sy) * (w // sx) + held % w // sx
        h, w = h // sy, w // sx
        pooled = coarse.view(sy * sx, -1)
        if not bool((pooled == pooled[0]).all()):
            break
        held = pooled[0]
    return orders


def _refuse_trailing_tokens(path: str, vision: nn.Module) -> None:
    """Refuse a token layer of a model with tokens after its patches (YOLOS's detection
    tokens): the layouts read extra tokens only before them."""
    trailing = _trailing_token_count(vision)
    if trailing:
        raise ValueError(
            f"{_layer_words(path)} is a token layer of a model that appends {trailing} "
            "detection tokens after its patch tokens (YOLOS): the package reads layouts "
            "whose extra tokens (cls, distillation, registers) come before the patches, so "
            "it cannot tell this layer's patches apart. Use the patch embedding's "
            "convolution, or a ViT backbone without detection tokens"
        )


def _refuse_unread_hiera_tokens(
    path: str, orders: _UnrolledOrders, value: Any, element: int | None
) -> None:
    """Refuse a layer after Hiera's unroll that holds none of its stages' token
    sequences (``orders``), or that ``element`` cannot pick from."""
    if element is not None and isinstance(value, torch.Tensor):
        raise ValueError(
            f"{_layer_words(path)} returns one tensor {tuple(value.shape)}, not a tuple: "
            f"element={element} picks a tensor of a tuple or list output; leave it out"
        )
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    stages = ", ".join(f"{count} ({h}x{w})" for count, ((h, w), _) in orders.items())
    raise ValueError(
        f"{_layer_words(path)} holds Hiera's tokens in their unrolled order (the tokens of "
        f"each query-pooling window stored apart, for its mask units), but its output "
        f"{shape} holds none of its stages' token sequences"
        + (f" (B, N, C) with N one of {stages}" if stages else "")
        + ": no patch map can be read from it. Use a block, its MLP or its norms, or the "
        "patch embedding"
    )


def _unrolled_element(
    value: Any, orders: _UnrolledOrders, element: int | None
) -> tuple[torch.Tensor, int | None] | None:
    """The ``(B, N, C)`` tensor of ``value`` whose ``N`` is one of the unrolled stages'
    token counts, with its position in a tuple output (``None`` for a tensor output;
    ``element`` picks the position); ``None`` if there is none."""

    def is_stage(item: Any) -> bool:
        return isinstance(item, torch.Tensor) and item.dim() == 3 and item.shape[1] in orders

    if isinstance(value, torch.Tensor):
        return (value, None) if element is None and is_stage(value) else None
    if not isinstance(value, (tuple, list)):
        return None
    positions = [element] if element is not None else range(len(value))
    for position in positions:
        if 0 <= position < len(value) and is_stage(value[position]):
            return value[position], position
    return None


def _unrolled_layout(
    found: tuple[torch.Tensor, int | None], orders: _UnrolledOrders, name: str, **common: Any
) -> TokenLayout:
    """The layout of one of Hiera's unrolled token sequences (no prefix tokens)."""
    tensor, element = found
    grid, order = orders[int(tensor.shape[1])]
    return TokenLayout(
        "BNC",
        grid,
        0,
        (),
        int(tensor.shape[2]),
        layer=name,
        element=element,
        token_order=order,
        **common,
    )


def _is_feature_map(value: Any) -> bool:
    """A 4-D tensor (a convolution's map), not a token sequence."""
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _raster_coordinate_grid(item: torch.Tensor, batch: int) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of a ``(B, N, 2)`` integer tensor of patch coordinates that
    lists every cell of an ``h x w`` grid in raster order, ``(row, col)`` or ``(x, y)``
    per token, the same for every image (timm Gemma 4's patch embedding returns its
    tokens' positions so; it has no convolution whose output shows the grid). Anything
    else, including coordinates out of raster order or with padding, witnesses nothing."""
    if item.shape[0] != batch or item.shape[2] != 2 or item.shape[1] < 2:
        return None
    if item.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8):
        return None
    coords = item[0]
    if not bool((item == coords).all()):
        return None
    tokens = coords.shape[0]
    position = torch.arange(tokens, device=coords.device)
    for row_axis, col_axis in ((0, 1), (1, 0)):
        width = int(coords[:, col_axis].max()) + 1
        if width < 1 or tokens % width:
            continue
        rows, cols = coords[:, row_axis], coords[:, col_axis]
        if bool((rows == position // width).all() and (cols == position % width).all()):
            return tokens // width, width
    return None


def _stated_grids(item: Any, batch: int) -> list[tuple[int, int]]:
    """The grids one element of a module output states outright, in forward order: an
    ``(h, w)`` size pair (Twins, timm NaFlexViT), a stage's ``(h, w, h_out, w_out)``
    input and output grids (Hugging Face Swin-V2's ``output_dimensions``) or raster patch
    coordinates (timm Gemma 4)."""
    if _is_size_pair(item):
        return [(int(item[0]), int(item[1]))]
    if _is_stage_dimensions(item):
        return [(item[0], item[1]), (item[2], item[3])]
    if isinstance(item, torch.Tensor) and item.dim() == 3:
        grid = _raster_coordinate_grid(item, batch)
        return [] if grid is None else [grid]
    return []


#: Token subsampling modules (LeViT's): ``(module, class)`` of timm's and Hugging Face's.
_TOKEN_SUBSAMPLERS = (
    ("timm.models.levit", "Downsample"),
    ("transformers.models.levit.modeling_levit", "LevitSubsample"),
)


def _subsampled_grid(module: nn.Module, output: Any, batch: int) -> tuple[int, int] | None:
    """The grid of the ``(B, N, C)`` tokens a LeViT subsampling outputs: it views its
    input as the ``resolution`` grid, keeps every ``stride``-th row and column (or
    average-pools with that stride) and flattens them again in raster order, so its
    output is on the ``ceil(resolution / stride)`` grid, which no map shows. Taken only
    when the measured token count is that grid's."""
    kind = type(module)
    if (kind.__module__, kind.__name__) not in _TOKEN_SUBSAMPLERS:
        return None
    resolution, stride = getattr(module, "resolution", None), getattr(module, "stride", None)
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if not _positive_ints(resolution, 2) or not isinstance(stride, int) or stride < 1:
        return None
    grid = ((resolution[0] - 1) // stride + 1, (resolution[1] - 1) // stride + 1)
    if not isinstance(output, torch.Tensor) or output.dim() != 3 or output.shape[0] != batch:
        return None
    return grid if output.shape[1] == grid[0] * grid[1] else None


def _per_patch_grid(module: nn.Module, output: Any, batch: int) -> tuple[int, int] | None:
    """The patch grid of TNT's pixel embedding (timm ``tnt.PixelEmbed``), which unfolds
    the image into its patches in raster order and embeds each patch's pixels apart: its
    output ``(B * h * w, pixels, C)`` shows the grid only through its first axis, so its
    ``grid_size`` is taken when that axis is the batch times its cells."""
    kind = type(module)
    if (kind.__module__, kind.__name__) != ("timm.models.tnt", "PixelEmbed"):
        return None
    grid = getattr(module, "grid_size", None)
    if not _positive_ints(grid, 2) or not isinstance(output, torch.Tensor) or output.dim() != 3:
        return None
    return tuple(grid) if output.shape[0] == batch * grid[0] * grid[1] else None


def _own_grids(value: Sequence[Any], name: str, batch: int) -> list[tuple[str, tuple[int, int]]]:
    """Grids stated by a tuple output's own elements (a patch embedding that returns its
    tokens with their grid): a layer's own output is not among the grids seen before
    it."""
    return [(name, grid) for item in value for grid in _stated_grids(item, batch)]


def _is_stage_dimensions(item: Any) -> bool:
    """``(h, w, h_out, w_out)`` of a stage that keeps its grid or halves it (rounding up,
    as a patch merging that pads an odd side does)."""
    if not _positive_ints(item, 4):
        return False
    h, w, h_out, w_out = item
    return h_out in (h, (h + 1) // 2) and w_out in (w, (w + 1) // 2)


def _is_size_pair(item: Any) -> bool:
    return _positive_ints(item, 2)


def _positive_ints(item: Any, count: int) -> bool:
    """Whether ``item`` is a tuple or list of ``count`` positive ints (not bools)."""
    return (
        isinstance(item, (tuple, list))
        and len(item) == count
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item)
    )


def _ancestor_chains(model: nn.Module) -> dict[str, list[nn.Module]]:
    """For every dotted path, the modules from the root down to it."""
    chains: dict[str, list[nn.Module]] = {"": [model]}
    for name, module in model.named_modules():
        if name:
            parent = name.rpartition(".")[0]
            chains[name] = chains[parent] + [module]
    return chains


# --------------------------------------------------------------------------- prefix names


def _declared_prefix_names(model: nn.Module) -> tuple[str, ...]:
    """Prefix token names in sequence order from the parameters the model declares."""
    params = dict(model.named_parameters())
    leaf = {}
    for name, param in params.items():
        leaf.setdefault(name.rpartition(".")[2], param)
    names: list[str] = []
    cls = next(
        (
            leaf[n]
            for n in ("cls_token", "class_embedding", "cls_token1", "class_token")
            if n in leaf
        ),
        None,
    )  # timm, open_clip, CoaT, torchvision
    if cls is not None:
        # PiT distilled keeps cls and dist in one (1, 2, C) parameter.
        count = cls.shape[1] if cls.dim() == 3 else 1
        names += ["cls", "dist"][:count] if count <= 2 else [f"cls{i}" for i in range(count)]
    if leaf.get("dist_token", leaf.get("distillation_token")) is not None:
        names.append("dist")
    reg = leaf.get("reg_token", leaf.get("register_tokens"))
    if reg is not None:
        names += [f"reg{i}" for i in range(reg.shape[1] if reg.dim() == 3 else 1)]
    return tuple(names)


def _prefix_names(model: nn.Module, count: int) -> tuple[str, ...]:
    if count == 0:
        return ()
    declared = _declared_prefix_names(model)
    if len(declared) == count:
        return declared
    if count == 1 and declared and declared[0] == "cls":
        return ("cls",)
    return tuple(f"prefix{i}" for i in range(count))


# --------------------------------------------------------------------------- resolver


def _default_inputs(model: nn.Module) -> torch.Tensor:
    wrapped = ImageModel(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, *wrapped.image_size, generator=generator)
    return wrapped.normalize(images).to(model_device(model))


def _batch_size(inputs: Any) -> int:
    check_batch_shape(inputs, "inputs")
    return inputs.shape[0]


def resolve_layout(
    model: nn.Module,
    layer: nn.Module | str,
    inputs: torch.Tensor | None = None,
    *,
    attribute_to_layer_input: bool = False,
    call: int = 0,
    element: int | None = None,
    additional_forward_args: tuple = (),
) -> TokenLayout:
    """Find how ``layer``'s tokens map onto the patch grid for these inputs.

    Args:
        model: a timm model, an open_clip CLIP model or vision tower, a CNN, or a
            :class:`~captum_vit.models.ImageModel`.
        layer: module or dotted path (``"blocks.5.mlp.fc1"``).
        inputs: a ``(B, 3, H, W)`` batch as the model takes it; ``None`` uses a random
            batch of 2 at the model's own input size. The layout depends on the input
            size (dynamic-size models, Swin padding), so resolve with inputs of the size
            you will use.
        attribute_to_layer_input: describe the layer's input instead of its output.
        call: for modules that run several times per forward (CoaT's shared ``cpe`` /
            ``crpe`` / ``mlp2``), which call (0-based; the default, the first call, lets
            the forward stop earliest). Each call may have its own grid.
        element: for layers that return tuples, the position of the spatial tensor;
            by default the first tensor that resolves.
        additional_forward_args: further positional arguments of the model's forward,
            passed after ``inputs``.

    Returns:
        The :class:`TokenLayout` of that layer.

    Raises:
        ValueError: unknown layer (close names listed), or the layer is not spatial
            (pooled features, class-attention / query tokens, windowed attention), or no
            patch grid could be established; the message says what was seen.

    Examples::

        >>> layout = resolve_layout(model, "blocks.3", images)
        >>> spatial, prefix = layout.split(block3_output)
    """
    (layout,) = resolve_layouts(
        model,
        [layer],
        inputs,
        attribute_to_layer_input=attribute_to_layer_input,
        call=call,
        element=element,
        additional_forward_args=additional_forward_args,
    )
    return layout


def resolve_layouts(
    model: nn.Module,
    layers: Sequence[nn.Module | str],
    inputs: torch.Tensor | None = None,
    *,
    attribute_to_layer_input: bool = False,
    call: int = 0,
    element: int | None = None,
    additional_forward_args: tuple = (),
    shown: Sequence[str] | None = None,
) -> list[TokenLayout]:
    """:func:`resolve_layout` for several layers of one model in one forward (stopped
    after the deepest layer); the arguments apply to every layer. ``shown``: how the
    layouts and error messages name the layers (the methods pass the paths in the user's
    model, e.g. a full CLIP model's ``"visual.<path>"`` for a layer of its image tower);
    by default their paths in ``model``.

    Raises:
        ValueError: as :func:`resolve_layout`, for the first layer that fails.
    """
    model = peel_wrappers(model)  # torch.compile / DataParallel: the module inside
    vision = unwrap_vision(model)
    if getattr(vision, "image_prefix", None) is not None:
        model = vision  # Hugging Face: run the image tower (CLIPModel needs no text)
    found = [find_module(model, layer) for layer in layers]
    if inputs is None:
        inputs = _default_inputs(model)
    if _batch_size(inputs) == 1 and not additional_forward_args:
        # With one image, a per-model tensor (a relative-position table, Swin-V2's
        # (1, 7, 7, C) position-bias MLP) has the batch's size and passes for an image's
        # map; with two, only per-image tensors do.
        inputs = torch.cat([inputs, inputs])
    batch = _batch_size(inputs)
    image_size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    witnesses = _Witnesses(model, batch, image_size)
    chains = witnesses._chains
    if shown is None:
        shown = [_user_path(model, name) for name, _ in found]
    for (name, _), path in zip(found, shown, strict=True):
        _refuse_windowed(path, chains[name], attribute_to_layer_input)
    with (
        preserved_state(model),
        torch.no_grad(),
        LayerTap(
            model,
            [module for _, module in found],
            attribute_to_layer_input=attribute_to_layer_input,
            call=call,
            watch=witnesses,
        ) as tap,
    ):
        values = tap.run(inputs, *additional_forward_args)
        layer_marks = [marks[call] for marks in tap.marks]
        unrolled = [witnesses.unrolled_before(mark) for mark in layer_marks]
        makers = [
            None
            if attribute_to_layer_input or not isinstance(value, torch.Tensor)
            else witnesses.channels_first_maker(marks[call], name, module, tuple(value.shape))
            for (name, module), value, marks in zip(found, values, tap.marks, strict=True)
        ]
    for path, value, maker in zip(shown, values, makers, strict=True):
        if maker is not None:
            _refuse_channels_first_sequence(path, value, maker, batch)
    plan = _hiera_unroll_plan(model, image_size)
    orders = _unrolled_orders(*plan) if plan is not None else {}
    unrolled_tokens = []
    for (name, module), path, value, flag in zip(found, shown, values, unrolled, strict=True):
        flag = flag or (_is_hiera_unroll(module) and not attribute_to_layer_input)
        hiera = _hiera_unrolled(chains[name], flag)
        tokens = _unrolled_element(value, orders, element) if hiera else None
        if not _is_feature_map(value):
            _refuse_trailing_tokens(path, vision)
            if hiera and tokens is None:
                _refuse_unread_hiera_tokens(path, orders, value, element)
        unrolled_tokens.append(tokens)
    needed = [
        _needs_second_size(
            value,
            batch,
            image_size,
            chains[name],
            witnesses.before(mark),
            witnesses.token_counts_before(mark),
        )
        for (name, _), value, mark in zip(found, values, layer_marks, strict=True)
    ]
    larger = _ShapesByCall(_probe_size(image_size))
    resized = _values_at_another_size(
        model,
        # every layer when pending maps need the forward up to them (it stops after them)
        [
            module if need or witnesses.pending else None
            for (_, module), need in zip(found, needed, strict=True)
        ],
        inputs,
        additional_forward_args,
        attribute_to_layer_input=attribute_to_layer_input,
        call=call,
        watch=larger if witnesses.pending else None,
    )
    witnesses.confirm_maps(larger)
    seen = [witnesses.before(mark) for mark in layer_marks]
    counts = [witnesses.token_counts_before(mark) for mark in layer_marks]
    common = dict(call=call, attribute_to_layer_input=attribute_to_layer_input)
    return [
        _unrolled_layout(tokens, orders, path, **common)
        if tokens is not None
        else _layout_from_value(
            value,
            name=path,
            chain=chains[name],
            vision=vision,
            seen=layer_seen,
            token_counts=layer_counts,
            batch=batch,
            image_size=image_size,
            element=element,
            call=call,
            attribute_to_layer_input=attribute_to_layer_input,
            resized=other_size,
        )
        for (name, _), path, value, layer_seen, layer_counts, other_size, tokens in zip(
            found, shown, values, seen, counts, resized, unrolled_tokens, strict=True
        )
    ]


#: How much larger (in pixels, each side) the second forward that tells a ``(B, n, n, n)``
#: map's channel axis from its grid axes is: a multiple of every usual total stride, so
#: the grid grows and the channels stay.
_PROBE_GROWTH = 32


def _probe_size(image_size: Sequence[int]) -> tuple[int, int]:
    """The input size of that second forward."""
    return (int(image_size[0]) + _PROBE_GROWTH, int(image_size[1]) + _PROBE_GROWTH)


def _needs_second_size(
    value: Any,
    batch: int,
    image_size: tuple[int, int],
    chain: Sequence[nn.Module],
    seen: list[tuple[str, tuple[int, int]]],
    token_counts: set[int],
) -> bool:
    """Whether ``value`` is, or holds, a 4-D tensor that only another input size reads:
    a ``(B, n, n, n)`` tensor, as many channels as grid rows and columns (ConvNeXt's
    first stage at 384 px: 96 channels on a 96x96 grid), that nothing else orients, or a
    square map whose side is a token count seen before it, which may be a token-to-token
    matrix (:func:`_grows_with_image`)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    grids = [grid for _, grid in seen]
    for item in items:
        if not (isinstance(item, torch.Tensor) and item.dim() == 4 and item.shape[0] == batch):
            continue
        kind = _orient_4d(item.shape, image_size, chain, grids)
        if kind is None and item.shape[1] == item.shape[2] == item.shape[3]:
            return True
        if kind is not None and _attention_size(item.shape, kind, token_counts) is not None:
            return True
    return False


def _values_at_another_size(
    model: nn.Module,
    modules: Sequence[nn.Module | None],
    inputs: torch.Tensor,
    additional_forward_args: tuple,
    *,
    attribute_to_layer_input: bool,
    call: int,
    watch: Callable[[str, nn.Module, Any], None] | None = None,
) -> list[Any]:
    """What each of ``modules`` (``None``: not needed) produces for ``inputs`` resized
    :data:`_PROBE_GROWTH` pixels larger: the channel axis is the 4-D axis whose length
    does not follow the image size, and a map's grid grows with it. ``None`` for a layer
    where that forward fails (a model that takes one input size only). ``watch`` sees
    every module call of that forward, as in :class:`~captum_vit.capture.LayerTap`."""
    needed = [module for module in modules if module is not None]
    if not needed:
        return [None] * len(modules)
    size = _probe_size(inputs.shape[-2:])
    try:
        with (
            preserved_state(model),
            torch.no_grad(),
            LayerTap(
                model,
                needed,
                attribute_to_layer_input=attribute_to_layer_input,
                call=call,
                watch=watch,
            ) as tap,
        ):
            larger = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False)
            values = iter(tap.run(larger, *additional_forward_args))
    except Exception:  # noqa: BLE001 - any failure means only "no evidence from this size"
        return [None] * len(modules)
    return [None if module is None else next(values) for module in modules]


def _resized_item(resized: Any, index: int | None) -> torch.Tensor | None:
    """The 4-D tensor at ``index`` of a layer's output at the larger input (``index``:
    its position in a tuple output; ``None``: the output itself)."""
    if index is not None:
        resized = (
            resized[index] if isinstance(resized, (tuple, list)) and index < len(resized) else None
        )
    return resized if isinstance(resized, torch.Tensor) and resized.dim() == 4 else None


def _grew_at_another_size(
    x: torch.Tensor,
    kind: str,
    resized: Any,
    index: int | None,
    image_size: tuple[int, int],
    chain: Sequence[nn.Module],
) -> bool:
    """:func:`_grows_with_image` for a layer's own output; where the forward at another
    size shows nothing (a model that takes one size), :func:`_map_unless_in_attention`."""
    other = _resized_item(resized, index)
    if other is None:
        return _map_unless_in_attention(chain)
    return _grows_with_image(x.shape, other.shape, kind, image_size, _probe_size(image_size))


def _map_unless_in_attention(chain: Sequence[nn.Module]) -> bool:
    """For a square map whose side is a token count seen before it, in a model that takes
    one size (so the size cannot tell): a map unless an attention module (one that
    declares ``num_heads`` / ``num_attention_heads``) made it or holds it, where it is
    read as a token-to-token matrix. EfficientFormer-V2's third stage at 64 px is a 4x4
    map after its 2x2 = 4 strided-attention tokens; its attention's talking heads are
    4x4 matrices."""
    return not any(
        isinstance(getattr(module, attr, None), int)
        for module in chain
        for attr in ("num_heads", "num_attention_heads")
    )


def _orient_by_size(x: torch.Tensor, resized: Any, index: int | None) -> str | None:
    """``"BCHW"`` / ``"BHWC"`` for a ``(B, n, n, n)`` tensor from the same layer's output
    at a larger input (``index``: its position in a tuple output): the axis that kept its
    length holds the channels."""
    resized = _resized_item(resized, index)
    if resized is None:
        return None
    kept = [axis for axis in (1, 2, 3) if resized.shape[axis] == x.shape[axis]]
    if kept == [1]:
        return "BCHW"
    if kept == [3]:
        return "BHWC"
    return None


def _refuse_channels_first_sequence(name: str, value: torch.Tensor, maker: str, batch: int) -> None:
    """A 1-D convolution or batch norm over the tokens outputs ``(B, C, L)``, channels
    first: read as ``(B, N, C)`` its channels would be taken for tokens (EfficientViM's
    ``BCdt_proj``: 75 channels over 7x7 = 49 tokens fitted 49 patches and 26 prefix
    tokens)."""
    if value.shape[0] != batch:
        return
    raise ValueError(
        f"{_layer_words(name)} outputs {tuple(value.shape)} from a {maker}: channels first, "
        f"(B, C, L) with {value.shape[1]} channels over {value.shape[2]} positions, not a "
        "(B, tokens, C) sequence, which is how the package reads 3-D layers. Map the "
        "layer its output goes to once it is a (B, C, h, w) map or a token sequence again"
    )


def _layer_words(name: str) -> str:
    """How messages name a layer: ``layer 'blocks.3'``, or the whole model for ``""``."""
    return f"layer {name!r}" if name else "the model itself (as the layer)"


def _refuse_windowed(name: str, chain: Sequence[nn.Module], attribute_to_layer_input: bool) -> None:
    for module in chain:
        if type(module).__name__ in _WINDOWED:
            raise ValueError(
                f"{_layer_words(name)} is inside {type(module).__name__}, which works on windows of "
                "tokens (batch * windows, window_area, C) after a cyclic shift and padding: "
                "its tensors are not on the image grid. Use the block output, its norm1 / "
                "norm2, or its mlp layers instead"
            )
    if _inside_torchvision_partition(chain, attribute_to_layer_input):
        raise ValueError(
            f"{_layer_words(name)} is inside torchvision's PartitionAttentionLayer (MaxViT), "
            "whose modules between its partition_op and departition_op work on "
            "(B, windows, window_area, C) tensors: windows or a dilated grid of the image, "
            "not its raster grid (one of them fits a grid of the wrong size by its shape). "
            "Use the attention layer itself (its output is back on the grid), or its "
            "departition_op"
        )


def _inside_torchvision_partition(chain: Sequence[nn.Module], read_input: bool) -> bool:
    """Whether the layer is one of the modules of torchvision MaxViT's
    ``PartitionAttentionLayer`` that see its partitioned tensors: all but the layer itself,
    the input of its ``partition_op`` and the output of its ``departition_op``."""
    for parent, module in pairwise(chain):
        kind = type(parent)
        if kind.__name__ == "PartitionAttentionLayer" and kind.__module__.startswith(
            "torchvision."
        ):
            if module is chain[-1]:
                on_grid = parent.partition_op if read_input else parent.departition_op
                return module is not on_grid
            return True
    return False


def _layout_from_value(
    value: Any,
    *,
    name: str,
    chain: Sequence[nn.Module],
    vision: nn.Module,
    seen: list[tuple[str, tuple[int, int]]],
    token_counts: set[int],
    batch: int,
    image_size: tuple[int, int],
    element: int | None,
    call: int,
    attribute_to_layer_input: bool,
    resized: Any = None,
) -> TokenLayout:
    """``resized``: the same layer's output at a larger input, where a ``(B, n, n, n)``
    tensor needs it (see :func:`_values_at_another_size`)."""
    common = dict(layer=name, call=call, attribute_to_layer_input=attribute_to_layer_input)

    def read(
        tensor: torch.Tensor, index: int | None, grids: list[tuple[str, tuple[int, int]]]
    ) -> TokenLayout:
        """The layout of the tensor at ``index`` of a tuple output (``None``: the output)."""
        return _layout_of_tensor(
            tensor,
            name,
            chain,
            vision,
            grids,
            batch,
            image_size,
            token_counts=token_counts,
            orient=lambda x: _orient_by_size(x, resized, index),
            grows=lambda x, kind: _grew_at_another_size(x, kind, resized, index, image_size, chain),
            **common,
        )

    if isinstance(value, (tuple, list)):
        positions = [element] if element is not None else range(len(value))
        errors = []
        seen = seen + _own_grids(value, name, batch)
        for index in positions:
            if index >= len(value) or not isinstance(value[index], torch.Tensor):
                errors.append(f"element {index} is not a tensor")
                continue
            try:
                layout = read(value[index], index, seen)
            except ValueError as error:
                errors.append(f"element {index}: {error}")
                continue
            return _with_tuple_prefix(layout, value, index, batch, vision)
        raise ValueError(
            f"{_layer_words(name)} returns a {type(value).__name__} of {len(value)} and no element "
            f"is a spatial map: " + "; ".join(errors)
        )
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{_layer_words(name)} returns {type(value).__name__}, not a tensor")
    if element is not None:
        raise ValueError(
            f"{_layer_words(name)} returns one tensor {tuple(value.shape)}, not a tuple: "
            f"element={element} picks a tensor of a tuple or list output; leave it out"
        )
    return read(value, None, seen)


def _with_tuple_prefix(
    layout: TokenLayout, value: Sequence[Any], index: int, batch: int, vision: nn.Module
) -> TokenLayout:
    """PiT stages return (x_BCHW, cls_tokens): attach the token tensor as the prefix."""
    fields = dict(layout.__dict__, element=index)
    if layout.kind in ("BCHW", "BHWC"):
        for other, item in enumerate(value):
            if (
                other != index
                and isinstance(item, torch.Tensor)
                and item.dim() == 3
                and item.shape[0] == batch
                and item.shape[2] == layout.num_channels
                and item.shape[1] <= MAX_PREFIX_TOKENS
            ):
                count = item.shape[1]
                fields.update(
                    prefix_element=other,
                    num_prefix_tokens=count,
                    prefix_names=_prefix_names(vision, count),
                )
                break
    return TokenLayout(**fields)


def _layout_of_tensor(
    x: torch.Tensor,
    name: str,
    chain: Sequence[nn.Module],
    vision: nn.Module,
    seen: list[tuple[str, tuple[int, int]]],
    batch: int,
    image_size: tuple[int, int],
    token_counts: set[int] = frozenset(),
    orient: Callable[[torch.Tensor], str | None] = lambda x: None,
    grows: Callable[[torch.Tensor, str], bool] = lambda x, kind: False,
    **common: Any,
) -> TokenLayout:
    """``orient``: the orientation of a 4-D tensor its shape leaves open, from other
    evidence (or ``None``); ``grows``: whether a 4-D tensor of that orientation grew
    with the image at another input size (a map, not a token-to-token matrix)."""
    grids = [grid for _, grid in seen]
    if x.dim() == 4:
        if x.shape[0] != batch:
            raise ValueError(
                f"{_layer_words(name)} outputs {tuple(x.shape)}: its first axis is not the batch "
                f"({batch}); it is not a per-image feature map"
            )
        kind = _orient_4d(x.shape, image_size, chain, grids) or orient(x)
        tokens = None if kind is None else _attention_size(x.shape, kind, token_counts)
        if tokens is not None and not grows(x, kind):
            raise ValueError(
                f"{_layer_words(name)} outputs {tuple(x.shape)}: a token-to-token matrix over the "
                f"{tokens} tokens (attention probabilities), not a feature map of the image. "
                "Read attention with AttentionRollout, or pick a layer of the tokens"
            )
        attention = _per_head_owner(x.shape, kind, chain)
        if attention is not None:
            raise ValueError(
                f"{_layer_words(name)} outputs {tuple(x.shape)} inside "
                f"{type(attention).__name__}, whose {x.shape[1]} heads are its second axis: a "
                "per-head tensor (attention weights, between tokens or, in XCiT, between "
                "channels), not a feature map of the image. Read attention with "
                "AttentionRollout, or pick a layer of the tokens"
            )
        if kind is None:
            raise ValueError(
                f"{_layer_words(name)} outputs a 4-D tensor {tuple(x.shape)} whose channel axis "
                f"cannot be told apart from its grid axes for a {image_size[0]}x"
                f"{image_size[1]} input (neither or both of (B, C, h, w) and (B, h, w, C) "
                "fit)" + _cube_hint(x, image_size)
            )
        grid = tuple(x.shape[2:4]) if kind == "BCHW" else tuple(x.shape[1:3])
        channels = x.shape[1] if kind == "BCHW" else x.shape[3]
        return TokenLayout(kind, grid, 0, (), channels, **common)
    if x.dim() == 2 and x.shape[0] != batch:
        raise ValueError(
            f"{_layer_words(name)} outputs {tuple(x.shape)}: its first axis is not the batch "
            f"({batch}), so it holds no features per image (computed once per forward, like "
            "a relative-position-bias MLP); pick a layer of the image's tokens"
        )
    if x.dim() != 3:
        raise ValueError(
            f"{_layer_words(name)} outputs a {x.dim()}-D tensor {tuple(x.shape)}: not spatial. "
            "Spatial methods need (B, N, C) tokens, (B, h, w, C) or (B, C, h, w) maps; "
            "pooled features and logits have no patch grid"
        )
    kind = _sequence_axis(x, batch, chain, name)
    tokens = x.shape[1] if kind == "BNC" else x.shape[0]
    for _, (h, w) in reversed(seen):
        prefix = tokens - h * w
        if 0 <= prefix <= MAX_PREFIX_TOKENS and prefix < h * w:
            return TokenLayout(
                kind, (h, w), prefix, _prefix_names(vision, prefix), x.shape[2], **common
            )
    if not seen:
        raise ValueError(
            f"{_layer_words(name)} outputs {tokens} token(s) per image {tuple(x.shape)}, which "
            "fits no patch grid: none was seen before it in this forward pass. The grid is "
            "read from what the patch embedding shows: a convolution's (B, C, h, w) output, "
            "a (tokens, (h, w)) tuple, or the tokens' raster coordinates. Either the layer "
            "comes before the patch embedding or holds no patch tokens, or the model embeds "
            "its patches in a way none of these shows (a linear projection of patches cut "
            "out by reshaping, for one), which the package does not read" + _masking_hint(vision)
        )
    described = ", ".join(f"{h}x{w} ({src or 'model'})" for src, (h, w) in seen[-6:])
    raise ValueError(
        f"{_layer_words(name)} outputs {tokens} token(s) per image {tuple(x.shape)}, which fits no "
        f"patch grid seen before it in this forward pass (last grids seen: {described}; "
        f"a spatial layer has h*w patch tokens plus at most {MAX_PREFIX_TOKENS} prefix "
        "tokens). It is not spatial: pooled, class-attention or query tokens "
        "(e.g. CaiT blocks_token_only, attention-pool latents) have no patch map"
        + _masking_hint(vision)
    )


def _cube_hint(x: torch.Tensor, image_size: tuple[int, int]) -> str:
    if x.shape[1] == x.shape[2] == x.shape[3]:
        height, width = _probe_size(image_size)
        return (
            f", and the model did not run at {height}x{width} to show which axis follows the "
            "image size. Use images of another size, where the grid and the channel count "
            "differ"
        )
    return "; it is not a feature map of this image"


def _masking_hint(vision: nn.Module) -> str:
    """Hugging Face ViT-MAE drops a random share of the patches in every forward, in eval
    mode too: its token layers then fit no grid."""
    for module in vision.modules():
        ratio = getattr(getattr(module, "config", None), "mask_ratio", 0) or 0
        if ratio > 0:
            return (
                f". This model drops {ratio:.0%} of the patch tokens in every forward "
                "(config.mask_ratio, in eval mode too; ViT-MAE): set "
                "model.config.mask_ratio = 0.0 to keep every patch"
            )
    return ""


def _sequence_axis(x: torch.Tensor, batch: int, chain: Sequence[nn.Module], name: str) -> str:
    """``"BNC"`` or ``"NBC"`` for a 3-D token tensor."""
    first, second = x.shape[0] == batch, x.shape[1] == batch
    if first and second:
        for module in reversed(chain):
            batch_first = getattr(module, "batch_first", None)
            if isinstance(batch_first, bool):
                return "BNC" if batch_first else "NBC"
        return "BNC"
    if first:
        return "BNC"
    if second:
        return "NBC"
    if x.shape[0] % batch == 0:
        raise ValueError(
            f"{_layer_words(name)} outputs {tuple(x.shape)}: its first axis is a multiple of the "
            f"batch ({batch}), as for windowed attention (batch * windows, tokens, C); "
            "its tokens are not on the image grid"
        )
    raise ValueError(
        f"{_layer_words(name)} outputs {tuple(x.shape)}: no axis matches the batch size {batch}"
    )
