"""SpatialLocalityProbe: how much of each token's input comes from its own patch, per layer
(Ghiasi et al. 2022, section 4; the paper's pooling experiments are
:func:`~captum_vit.locality.pooling.pooling_experiments`).

Receptive-field locality of a layer: for a token at grid cell ``(i, j)``, take a fixed
random projection ``r . t_ij`` of its features, its gradient with respect to the input
image, and the ``|.|`` mass of that gradient summed per input region of the layer's own
grid. Its share inside region ``(i, j)`` is 1 for a token that sees only its own patch and
about ``1 / (h*w)`` for uniform mixing. The locality of a layer is the mean share over
images and positions.

Every layer is measured at its own output (or, with ``attribute_to_layer_input=True``, at
its input). A token's receptive field does not depend on whether the model's output uses
it: the last block of a cls-pooled ViT mixes its patch tokens globally (the paper's "the
last layer acts as a global pooling", its Fig. 2b) even though its head reads only cls.
:attr:`LocalityReport.feeds_output` says, per layer, whether the model's output depends
on the layer's patch tokens at all.

How it is computed: the image is replicated along the batch, copy ``k`` probing one
position, and the gradient of ``sum_k r . t_k[pos_k]`` with respect to the copies gives
every copy's own field in one backward pass (copies never interact in eval mode). All
layers are captured in one forward stopped after the deepest one, then one backward per
layer runs on the retained graph; positions go in chunks of ``batch_size``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import LayerAttribution
from torch import nn

from .._base import check_count
from .._progress import progress, resolve_progress
from ..capture import (
    LayerTap,
    autograd,
    outside_inference_mode,
    preserved_state,
    user_class_name,
)
from ..layout import TokenLayout, resolve_layouts
from ..models import (
    ImageModel,
    check_images,
    fixed_input_size,
    model_device,
    user_layer_path,
    vision_layer,
)
from .plots import plot_locality
from .pooling import pooling_experiments
from .reports import Accuracy, LocalityReport, PoolingReport

__all__ = [
    "Accuracy",
    "LocalityReport",
    "PoolingReport",
    "SpatialLocalityProbe",
    "find_blocks",
    "find_stages",
    "plot_locality",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_BLOCK_WORDS = ("block", "bottleneck", "layer")


def find_blocks(model: nn.Module) -> list[str]:
    """Dotted paths of the model's blocks, in registration order.

    A block is a child of an ``nn.Sequential`` / ``nn.ModuleList`` whose children are all
    composite modules of one class named like a block (``Block``, ``ResidualAttentionBlock``,
    ``SwinTransformerBlock``, ``BasicBlock``, ``Bottleneck``...); when such containers nest
    (Swin stages of blocks) the innermost ones count.
    """
    containers = []
    for name, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or len(module) == 0:
            continue
        children = list(module.children())
        kinds = {type(child) for child in children}
        if len(kinds) != 1:
            continue
        kind = next(iter(kinds))
        if (
            issubclass(kind, _CONTAINERS)
            or not any(True for _ in children[0].children())
            or not any(word in kind.__name__.lower() for word in _BLOCK_WORDS)
        ):
            continue
        containers.append((name, module))
    blocks = []
    for name, module in containers:
        nested = any(
            other != name and other.startswith(f"{name}.") for other, _ in containers if name
        )
        if nested:
            continue
        prefix = f"{name}." if name else ""
        blocks += [prefix + child for child, _ in module.named_children()]
    return blocks


def find_stages(model: nn.Module) -> list[str]:
    """Dotted paths of a timm model's stages, as its ``feature_info`` lists them (the
    modules ``features_only`` taps: ``stages.0`` ..., MobileNet's ``blocks.2``), for models
    whose blocks :func:`find_blocks` does not find (blocks of mixed classes, as in
    MobileNet-V3 or StarNet); empty for a model without ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)):
        return []
    modules = dict(model.named_modules())
    names = [item.get("module") for item in info if isinstance(item, dict)]
    return [name for name in names if name and name in modules]


class SpatialLocalityProbe(LayerAttribution):
    """Receptive-field locality per layer (the paper's pooling experiments are
    :func:`~captum_vit.pooling_experiments`).

    Every layer is read at its own output; :attr:`LocalityReport.feeds_output` flags the
    layers whose patch tokens the model's output does not use (the last block of a
    cls-pooled ViT, whose locality shows its global mixing).

    Examples::

        >>> probe = SpatialLocalityProbe(timm.create_model("vit_tiny_patch16_224"))
        >>> report = probe.attribute(images)               # every block, every position
        >>> report.locality                                 # (12,)
        >>> report.fields.shape                             # (12, 14, 14, 14, 14)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | str | Sequence[nn.Module | str] | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | Sequence[int] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        attribute_to_layer_input: bool = False,
    ) -> None:
        """
        Args:
            model: a timm or open_clip vision model (a full CLIP model is reduced to its
                image tower; name its layers ``"visual.<path>"``) or a CNN; it is never
                modified.
            layers: ``None`` for every block (see :func:`find_blocks`; blocks without a
                patch grid, such as CaiT's class-attention blocks, are skipped; a timm
                model whose blocks are not found, its stages: :func:`find_stages`), or a
                layer / list of layers (modules or dotted paths); reported in forward
                order.
            mean, std, image_size: override the model's own normalization / input size.
            seed: seed of the random feature projections.
            batch_size: image copies (one probed position each) per forward / backward.
            attribute_to_layer_input: read every layer at its input instead of its
                output (for example the input of ``mlp.fc2``, the hidden layer of a SwiGLU
                MLP). The input of a block is the previous block's output, so for blocks
                this shifts the rows by one.

        Raises:
            TypeError / ValueError: an argument of the wrong type / a bad value; unknown
                layers, an empty list, a model without blocks.
        """
        check_count(batch_size, "batch_size", "image copies per forward / backward")
        if not isinstance(attribute_to_layer_input, bool):
            raise TypeError(
                "attribute_to_layer_input must be a bool, got "
                f"{type(attribute_to_layer_input).__name__}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.wrapped = ImageModel(model, mean=mean, std=std, image_size=image_size)
        self.vision = self.wrapped.model
        self.blocks = find_blocks(self.vision)
        self.default_layers = layers is None
        if layers is None:
            names = self.blocks or find_stages(self.vision)
            if not names:
                raise ValueError(
                    f"found no blocks in {user_class_name(self.vision)}; pass layers=[...] "
                    "(dotted paths or modules)"
                )
        else:
            if isinstance(layers, (str, nn.Module)):
                layers = [layers]
            names = [vision_layer(model, layer)[0] for layer in layers]
            if not names:
                raise ValueError("layers is empty; pass None for every block")
        self.layer_names = list(dict.fromkeys(names))
        self._user_paths = {name: user_layer_path(model, name) for name in self.layer_names}
        modules = [self.vision.get_submodule(name) for name in self.layer_names]
        LayerAttribution.__init__(self, self.wrapped, modules)
        self.seed = seed
        self.batch_size = batch_size
        self.attribute_to_layer_input = attribute_to_layer_input
        self._fixed_size = fixed_input_size(self.vision)
        self._plans: dict[tuple[int, int], _Plan] = {}

    # ------------------------------------------------------------------ helpers

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped.normalize(images)

    def _device(self) -> torch.device:
        return model_device(self.vision)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, size=self._fixed_size)
        return images.detach().to(self._device(), torch.float32)

    def _plan(self, images: torch.Tensor) -> _Plan:
        """Layers, layouts, sites and projections for this input size (cached)."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size not in self._plans:
            self._plans[size] = self._make_plan(images[:1])
        return self._plans[size]

    def _make_plan(self, image: torch.Tensor) -> _Plan:
        probe = self.normalize(image)
        names = _forward_order(self.vision, self.layer_names, probe)
        as_input = self.attribute_to_layer_input
        site = "input" if as_input else "output"
        order = _forward_order(self.vision, self.blocks, probe) if as_input and self.blocks else []
        layouts, kept, taps = [], [], []
        for name in names:
            try:
                (layout,) = resolve_layouts(
                    self.vision,
                    [name],
                    probe,
                    attribute_to_layer_input=as_input,
                    shown=[self._user_paths[name]],
                )
            except ValueError:
                if self.default_layers:
                    continue  # blocks without a patch grid (CaiT class attention)
                raise
            kept.append(name)
            layouts.append(layout)
            taps.append(_input_tap(self.vision, order, name, probe) if as_input else (name, False))
        if not kept:
            raise ValueError(
                f"none of the blocks of {user_class_name(self.vision)} has a patch grid; pass "
                "spatial layers=[...]"
            )
        generator = torch.Generator().manual_seed(self.seed)
        projections = [torch.randn(layout.num_channels, generator=generator) for layout in layouts]
        feeds = _feeds_output(self.vision, kept, layouts, as_input, probe)
        return _Plan(kept, layouts, [site] * len(kept), projections, taps, feeds)

    # ------------------------------------------------------------------ locality

    @outside_inference_mode
    def attribute(
        self,
        inputs: torch.Tensor,
        positions: int | None = None,
        *,
        show_progress: bool | None = None,
    ) -> LocalityReport:
        """Receptive-field locality of every probed layer.

        Args:
            inputs: ``(B, 3, H, W)`` RGB images in ``[0, 1]``.
            positions: ``None`` probes every grid position; ``n`` probes a random sample
                of ``n`` positions per layer (the same for every image; seeded by
                ``seed``; layers with fewer cells probe them all).
            show_progress: a progress bar over chunks of ``batch_size`` probed positions
                (each one forward and one backward per layer); ``None`` (default): when
                stderr is a terminal.

        Returns:
            :class:`LocalityReport` of float32 CPU tensors (whatever the model's dtype and
            device): ``locality`` (L,), ``fields`` (L, h, w, h, w) (a list of per-layer
            tensors when grids differ), ``grids``, ``sites``, ``feeds_output``,
            ``positions``.

        Raises:
            ValueError / TypeError: invalid images, a requested layer without a patch grid,
                ``positions`` not a positive int.
        """
        images = self._prepare(inputs)
        if positions is not None:
            check_count(positions, "positions", "probed positions per layer, or None for all")
        show = resolve_progress(show_progress)
        with preserved_state(self.vision):
            plan = self._plan(images)
            probed = _choose_positions(plan.layouts, positions, self.seed)
            totals = [
                torch.zeros(len(p), layout.grid[0] * layout.grid[1])
                for p, layout in zip(probed, plan.layouts, strict=True)
            ]
            for as_input in (False, True):
                group = [i for i, tap in enumerate(plan.taps) if tap[1] == as_input]
                if group:
                    self._probe_group(images, plan, group, probed, totals, show)
        names = [self._user_paths[name] for name in plan.names]
        return _locality_report(plan, names, probed, totals, images)

    def _probe_group(
        self,
        images: torch.Tensor,
        plan: _Plan,
        group: list[int],
        probed: list[torch.Tensor],
        totals: list[torch.Tensor],
        show_progress: bool,
    ) -> None:
        """Accumulate field shares of the layers in ``group`` (all read at one site)."""
        slots = max(len(probed[i]) for i in group)
        jobs = [(b, s) for b in range(images.shape[0]) for s in range(slots)]
        device = images.device
        as_input = plan.taps[group[0]][1]
        starts = progress(
            range(0, len(jobs), self.batch_size),
            desc="locality (block inputs)" if as_input else "locality",
            enabled=show_progress,
            unit="chunk",
        )
        for start in starts:
            chunk = torch.tensor(jobs[start : start + self.batch_size])
            image_index, slot = chunk[:, 0], chunk[:, 1]
            active = [i for i in group if bool((slot < len(probed[i])).any())]
            copies = images[image_index.to(device)].clone().requires_grad_(True)
            as_input = plan.taps[active[0]][1]
            with (
                autograd(),
                LayerTap(
                    self.vision,
                    [plan.taps[i][0] for i in active],
                    attribute_to_layer_input=as_input,
                ) as tap,
            ):
                values = tap.run(self.normalize(copies))
                for order in reversed(range(len(active))):
                    i = active[order]
                    rows = (slot < len(probed[i])).nonzero().squeeze(1)
                    cells = probed[i][slot[rows]]
                    tokens = plan.layouts[i].tokens(values[order]).float()
                    score = tokens[rows.to(device), cells.to(device)] @ plan.projections[i].to(
                        tokens
                    )
                    if not score.requires_grad:
                        name = self._user_paths[plan.names[i]]
                        raise ValueError(f"the tokens of layer {name!r} do not depend on the image")
                    (grad,) = torch.autograd.grad(score.sum(), copies, retain_graph=order > 0)
                    shares = _region_shares(grad[rows.to(device)], plan.layouts[i].grid)
                    totals[i].index_add_(0, slot[rows], shares.cpu())

    # ------------------------------------------------------------------ pooling

    def accuracy_experiments(
        self,
        dataloader: Iterable,
        isolate: Iterable[int] | int | None = None,
        tear: Iterable[int] | int | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> PoolingReport:
        """Deprecated: use :func:`captum_vit.pooling_experiments` (same arguments, with the
        model first); this alias calls it with the probe's model and normalization."""
        warnings.warn(
            "SpatialLocalityProbe.accuracy_experiments is deprecated; use "
            "captum_vit.pooling_experiments(model, dataloader, isolate=..., tear=..., "
            "head=...)",
            DeprecationWarning,
            stacklevel=2,
        )
        return pooling_experiments(self.wrapped, dataloader, isolate=isolate, tear=tear, head=head)


@dataclass
class _Plan:
    """What the probe measures for one input size: layer names in forward order, their
    layouts, sites ("output" / "input"), random feature projections, and what to tap for
    each: ``(module path, as_input)``; whether each layer's patch tokens reach the model's
    output."""

    names: list[str]
    layouts: list[TokenLayout]
    sites: list[str]
    projections: list[torch.Tensor]
    taps: list[tuple[str, bool]]
    feeds_output: list[bool | None]


def _input_tap(
    model: nn.Module, order: Sequence[str], name: str, probe: torch.Tensor
) -> tuple[str, bool]:
    """Where to capture block ``name``'s input: the previous block's output when it is the
    very same tensor (plain stacks), so it joins the forward of the other layers instead of
    needing a forward of its own."""
    index = order.index(name) if name in order else 0
    if index == 0:
        return name, True
    previous = order[index - 1]
    with torch.no_grad(), LayerTap(model, previous) as tap:
        (before,) = tap.run(probe)
    with torch.no_grad(), LayerTap(model, name, attribute_to_layer_input=True) as tap:
        (given,) = tap.run(probe)
    if isinstance(before, torch.Tensor) and _same(before, given):
        return previous, False
    return name, True


def _same(a: torch.Tensor, b: object) -> bool:
    return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _forward_order(model: nn.Module, names: Sequence[str], probe: torch.Tensor) -> list[str]:
    """``names`` sorted by when each layer first runs (unrun layers raise)."""
    with torch.no_grad(), LayerTap(model, list(names), watch=lambda *_: None) as tap:
        tap.run(probe)
        marks = [calls[0] for calls in tap.marks]
    order = sorted(range(len(names)), key=lambda i: (marks[i], i))
    return [names[i] for i in order]


def _feeds_output(
    model: nn.Module,
    names: Sequence[str],
    layouts: Sequence[TokenLayout],
    as_input: bool,
    probe: torch.Tensor,
) -> list[bool | None]:
    """Per layer, whether the model's output has a non-zero gradient on the layer's patch
    tokens (a random projection of the output, one forward and backward). ``False`` for
    the last block of a cls-pooled model; ``None`` when the model's output is not a
    tensor that depends on the image."""
    outputs: list[Any] = []

    def keep_root(path: str, _module: nn.Module, output: object) -> None:
        if path == "":
            outputs.append(output)

    image = probe.clone().requires_grad_(True)
    tap = LayerTap(
        model,
        list(names),
        attribute_to_layer_input=as_input,
        early_exit=False,
        keep_graph=True,  # the recorded tensors lie on the path to the output
        watch=keep_root,
    )
    with autograd():  # the forward and the projection of its output
        with tap:
            values = tap.run(image)
        result = outputs[-1] if outputs else None
        if isinstance(result, (tuple, list)):
            result = next((r for r in result if isinstance(r, torch.Tensor)), None)
        if not isinstance(result, torch.Tensor) or not result.requires_grad:
            return [None] * len(names)
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(result.shape, generator=generator).to(result.device)
        selected = [layout.select(value) for layout, value in zip(layouts, values, strict=True)]
        projected = (result.float() * weights).sum()
    grads = torch.autograd.grad(projected, selected, allow_unused=True)
    return [
        _reaches_patches(layout, value, grad)
        for layout, value, grad in zip(layouts, values, grads, strict=True)
    ]


def _reaches_patches(layout: TokenLayout, value: Any, grad: torch.Tensor | None) -> bool:
    if grad is None:
        return False
    if layout.element is not None:  # tuple outputs: put the gradient where the map was
        grad = [grad if i == layout.element else item for i, item in enumerate(value)]
    return bool(layout.tokens(grad).ne(0).any())


def _choose_positions(
    layouts: Sequence[TokenLayout], positions: int | None, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    chosen = []
    for layout in layouts:
        cells = layout.grid[0] * layout.grid[1]
        if positions is None or positions >= cells:
            chosen.append(torch.arange(cells))
        else:
            chosen.append(torch.randperm(cells, generator=generator)[:positions].sort().values)
    return chosen


def _region_matrix(cells: int, pixels: int, device: torch.device) -> torch.Tensor:
    """``(cells, pixels)`` 0/1 matrix: pixel ``y`` belongs to cell ``floor(y*cells/pixels)``."""
    owner = torch.arange(pixels, device=device) * cells // pixels
    return (owner[None, :] == torch.arange(cells, device=device)[:, None]).float()


def _region_shares(grad: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(k, 3, H, W)`` gradients -> ``(k, h*w)`` shares of ``|grad|`` per input region."""
    mass = grad.abs().sum(1)
    rows = _region_matrix(grid[0], mass.shape[-2], mass.device)
    cols = _region_matrix(grid[1], mass.shape[-1], mass.device)
    regions = torch.einsum("ay,kyx,bx->kab", rows, mass, cols).flatten(1)
    return regions / regions.sum(1, keepdim=True)  # 0/0 -> NaN: no gradient at all


def _locality_report(
    plan: _Plan,
    names: list[str],
    probed: list[torch.Tensor],
    totals: list[torch.Tensor],
    images: torch.Tensor,
) -> LocalityReport:
    count = images.shape[0]
    fields, locality = [], []
    for name, layout, cells, total in zip(names, plan.layouts, probed, totals, strict=True):
        h, w = layout.grid
        field = torch.full((h * w, h * w), math.nan)
        field[cells] = total / count
        own = field[cells, cells]
        if torch.isnan(own).any():
            warnings.warn(
                f"some tokens of {name!r} have no gradient on the image; they are "
                "left out of its locality",
                stacklevel=3,
            )
        locality.append(own.nanmean())
        fields.append(field.view(h, w, h, w))
    grids = [layout.grid for layout in plan.layouts]
    same = len(set(grids)) == 1
    return LocalityReport(
        layers=names,
        locality=torch.stack(locality),
        fields=torch.stack(fields) if same else fields,
        grids=grids,
        sites=list(plan.sites),
        feeds_output=list(plan.feeds_output),
        positions=probed,
        projections=list(plan.projections),
        image_size=(int(images.shape[-2]), int(images.shape[-1])),
        num_images=count,
    )
