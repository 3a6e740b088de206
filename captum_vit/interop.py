"""Captum's own attribution methods on ViT token layers.

Captum's layer methods (``LayerGradCam``, ``LayerIntegratedGradients``, ...) treat the
second axis of a layer output as channels. On a ViT token layer ``(B, N, C)`` that axis is
the token axis, so they return wrong shapes without an error. :func:`patch_grid` gives
them a module whose output *is* the patch grid ``(B, C, h, w)``, spliced into the forward
pass; :func:`patch_feature_mask` gives the perturbation methods a feature mask (and the
``Occlusion`` window / stride) aligned with the model's patches.

The token layout (prefix tokens, token order, Swin's ``BHWC``, older open_clip's
sequence-first tensors, PiT's tuples) comes from :func:`captum_vit.layout.resolve_layout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .capture import HookSet, find_module, peel_wrappers
from .layout import TokenLayout, resolve_layout, upsample_to_image
from .models import (
    ImageModel,
    check_batch_shape,
    linear_patch_embedding,
    patch_tiling,
    timm_first_conv,
    unwrap_vision,
)

__all__ = ["PatchGrid", "patch_grid", "patch_feature_mask"]


class PatchGrid(nn.Module):
    """The module :func:`patch_grid` yields: an identity whose input and output are the
    layer's patch tokens as ``(B, C, h, w)`` (with ``with_prefix=True``, the pair
    ``(patches (B, C, h, w), prefix (B, P, C))``).

    It runs inside the model's forward, every time the spliced layer runs, so Captum's
    forward hooks on it see (and may replace) the patch grid. It holds no parameters.

    Attributes:
        layout: the :class:`~captum_vit.layout.TokenLayout` of the spliced layer.
        with_prefix: whether the prefix tokens are a second output.
        image_size: ``(H, W)`` of the inputs the grid was resolved for.
        tiling: how the model's patches lie on those inputs
            (:func:`~captum_vit.models.patch_tiling`), used by :meth:`interpolate`.
    """

    def __init__(
        self,
        layout: TokenLayout,
        with_prefix: bool = False,
        *,
        image_size: tuple[int, int] | None = None,
        tiling: tuple[tuple[int, int], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.with_prefix = with_prefix
        self.image_size = image_size
        self.tiling = tiling

    def interpolate(self, attributions: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Upsample grid-shaped attributions ``(B, C', h, w)`` (what Captum's layer
        methods return through this grid) to the inputs' size ``(B, C', H, W)``.

        Captum's ``LayerAttribution.interpolate`` stretches the grid over the image. This
        puts each cell on the pixels its patches covered, which differs where the image
        is not a whole number of patches (a padded or cut grid); otherwise the two agree.

        Raises:
            ValueError: attributions that are not ``(B, C', h, w)`` on this grid.
        """
        if not isinstance(attributions, torch.Tensor) or attributions.dim() != 4:
            raise ValueError("attributions must be a (B, C, h, w) tensor on the patch grid")
        if tuple(attributions.shape[-2:]) != tuple(self.layout.grid):
            h, w = self.layout.grid
            raise ValueError(
                f"attributions of shape {tuple(attributions.shape)} are not on this {h}x{w} "
                "patch grid"
            )
        if self.image_size is None:
            raise ValueError("this grid does not know its input size: build it with patch_grid")
        return upsample_to_image(attributions, self.image_size, self.tiling, mode)

    def forward(
        self, patches: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.with_prefix:
            return patches, prefix
        return patches

    def extra_repr(self) -> str:
        h, w = self.layout.grid
        return (
            f"layer={self.layout.layer!r}, grid={h}x{w}, channels={self.layout.num_channels}, "
            f"prefix={self.layout.num_prefix_tokens}, with_prefix={self.with_prefix}"
        )


@contextlib.contextmanager
def patch_grid(
    model: nn.Module,
    layer: nn.Module | str,
    inputs: torch.Tensor | None = None,
    *,
    attribute_to_layer_input: bool = False,
    call: int = 0,
    with_prefix: bool = False,
) -> Iterator[PatchGrid]:
    """Expose a ViT token layer to Captum's layer methods as a ``(B, C, h, w)`` patch grid.

    Inside the ``with`` block every forward of ``model`` splits the layer's output into
    prefix tokens (cls / dist / registers) and patch tokens, passes the patch tokens
    through the yielded :class:`PatchGrid` module as ``(B, C, h, w)``, and puts the
    (possibly replaced) grid back in the layer's own layout, prefix tokens untouched. With
    nothing hooked on the grid module the model computes exactly what it computed before.
    Any Captum layer method given that module (``LayerActivation``, ``LayerGradCam``,
    ``LayerGradientXActivation``, ``LayerIntegratedGradients``, ``LayerConductance``,
    ``LayerDeepLift``, ``LayerFeatureAblation``, ``InternalInfluence``) then works with
    Captum's own hooks and returns grid-shaped attributions, which ``grid.interpolate``
    (or Captum's ``LayerAttribution.interpolate``) upsamples to the image.

    On exit, also after an exception, the splice hooks are removed: the model is left
    exactly as it was.

    What ``LayerIntegratedGradients`` integrates through the grid: the patch tokens go
    from those of the baseline input to those of the input while the prefix tokens stay
    those of the input. Its attributions therefore add up to
    ``F(input) - F(input with the layer's patch tokens taken from the baseline input)``,
    while Captum's ``return_convergence_delta=True`` compares them with
    ``F(input) - F(baseline input)``, where the prefix tokens change too. To attribute the
    prefix tokens as well (and make Captum's delta the right check), use
    ``with_prefix=True``: the module then outputs ``(patches, prefix)`` and Captum returns
    one attribution per element.

    Args:
        model: the model whose forward Captum runs (a timm model, an open_clip model or
            tower, a Hugging Face vision model, an :class:`~captum_vit.models.ImageModel`).
        layer: the token layer, as a module or dotted path (``"blocks.5"``,
            ``"blocks.5.mlp.fc1"``, ``"layers.1.blocks.0"``).
        inputs: a ``(B, 3, H, W)`` batch as ``model`` takes it, of the size you will
            attribute (the grid depends on the input size); ``None`` uses the model's own
            input size.
        attribute_to_layer_input: splice the layer's input instead of its output.
        call: for modules that run several times per forward (CoaT), which call
            (0-based) to splice; the others pass through.
        with_prefix: make the module's output the pair ``(patches, prefix)`` with
            ``prefix`` of shape ``(B, P, C)``, so Captum attributes the prefix tokens too.

    Yields:
        A :class:`PatchGrid` module; ``grid.layout`` is the layer's layout.

    Raises:
        ValueError: unknown or non-spatial layer (pooled features, class-attention or
            query tokens, windowed attention), ``with_prefix=True`` on a layer without
            prefix tokens, or, inside the block, inputs of another size than the one the
            grid was resolved for.

    Examples::

        >>> from captum.attr import LayerGradCam, LayerAttribution
        >>> with cv.patch_grid(model, "blocks.3", images) as grid:
        ...     cam = LayerGradCam(model, grid).attribute(images, target=labels)
        >>> cam.shape                                      # (B, 1, h, w)
        >>> up = grid.interpolate(cam)                      # (B, 1, H, W)
    """
    layout = resolve_layout(
        model, layer, inputs, attribute_to_layer_input=attribute_to_layer_input, call=call
    )
    if with_prefix and layout.num_prefix_tokens == 0:
        raise ValueError(
            f"layer {layout.layer!r} has no prefix tokens (cls / dist / registers): "
            "use with_prefix=False"
        )
    _, module = find_module(model, layout.layer)
    size = tuple(inputs.shape[-2:]) if inputs is not None else ImageModel(model).image_size
    grid = PatchGrid(layout, with_prefix, image_size=size, tiling=patch_tiling(model, size))
    splice = _Splice(layout, grid, call)
    with HookSet() as hooks:
        for root in _forward_roots(model):
            hooks.pre_forward(root, splice.reset)
        if attribute_to_layer_input:
            hooks.pre_forward(module, splice.input_hook, with_kwargs=True)
        else:
            hooks.forward(module, splice.output_hook)
        yield grid


def _forward_roots(model: nn.Module) -> list[nn.Module]:
    """Modules whose forward starts a pass through the layer, whichever the user calls
    (the model, its image tower: open_clip ``visual``, Hugging Face ``vision_model``)."""
    roots = [model, unwrap_vision(model), getattr(model, "vision_model", None)]
    unique = []
    for root in roots:
        if isinstance(root, nn.Module) and all(root is not other for other in unique):
            unique.append(root)
    return unique


class _Splice:
    """The hooks that route one layer's patch tokens through a :class:`PatchGrid`."""

    def __init__(self, layout: TokenLayout, grid: PatchGrid, call: int) -> None:
        self.layout = layout
        self.grid = grid
        self.call = call
        self.calls = 0

    def reset(self, *_: Any) -> None:
        self.calls = 0

    def _due(self) -> bool:
        due = self.calls == self.call
        self.calls += 1
        return due

    def output_hook(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        if not self._due():
            return None
        return self.route(output)

    def input_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not self._due():
            return None
        if args:
            return (self.route(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: self.route(kwargs[key])}

    def route(self, value: Any) -> Any:
        """Split ``value``, pass the patch grid through the module, reassemble."""
        try:
            patches, prefix = self.layout.split(value)
        except ValueError as error:
            raise ValueError(
                f"{error}. patch_grid resolved layer {self.layout.layer!r} for another input "
                "size: pass inputs= of the size you attribute"
            ) from None
        if self.grid.with_prefix:
            patches, prefix = self.grid(patches, prefix)
        else:
            patches = self.grid(patches)
        return _assemble(self.layout, value, patches, prefix)


def _assemble(
    layout: TokenLayout, original: Any, patches: torch.Tensor, prefix: torch.Tensor | None
) -> Any:
    """Put ``(B, C, h, w)`` patches (and prefix tokens) back in the layer's own layout."""
    source = layout.select(original)
    if layout.kind in ("BNC", "NBC"):
        tokens = patches.flatten(2).transpose(1, 2)
        prefix = tokens[:, :0] if prefix is None else prefix.to(tokens.dtype)
        tokens = layout.join_tokens(prefix, tokens)
        tensor = tokens.transpose(0, 1) if layout.kind == "NBC" else tokens
    elif layout.kind == "BHWC":
        tensor = patches.permute(0, 2, 3, 1)
    else:
        tensor = patches
    if source.is_contiguous() and not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if layout.element is None:
        return tensor
    items = list(original)
    items[layout.element] = tensor
    if layout.prefix_element is not None and prefix is not None:
        items[layout.prefix_element] = prefix
    return type(original)(items) if isinstance(original, tuple) else items


def patch_feature_mask(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A ``feature_mask`` with one id per patch, for Captum's perturbation methods.

    The mask has shape ``(1, 1, H, W)`` (long, ids ``0 .. h*w - 1`` in raster order) and
    broadcasts over the batch and the colour channels, as ``FeatureAblation``,
    ``ShapleyValueSampling``, ``Lime``, ``KernelShap`` and ``FeaturePermutation`` take it:
    every perturbation then removes whole patches, never part of one. Pixels the patch
    embedding leaves over at the bottom / right border (input size not a multiple of the
    patch size) join the last row / column of patches.

    The returned tensor also carries the matching ``Occlusion`` arguments as attributes:
    ``mask.sliding_window_shapes`` ``(3, p_h, p_w)`` and ``mask.strides``
    ``(3, p_h, p_w)``, plus ``mask.grid`` ``(h, w)`` and ``mask.patch_size``. (Attributes
    of a tensor do not survive ``.to()`` / arithmetic; read them first.)

    Args:
        model: a ViT-family model with a non-overlapping patch embedding (timm, open_clip,
            Hugging Face), convolutional or linear (timm Gemma 4, NaFlexViT).
        inputs: a ``(B, 3, H, W)`` batch as the model takes it.

    Returns:
        The ``(1, 1, H, W)`` long mask on the inputs' device.

    Raises:
        TypeError: ``inputs`` is not a tensor.
        ValueError: ``inputs`` is not a ``(B, 3, H, W)`` batch, the model has no patch
            embedding, or its patches overlap (kernel larger than stride, as
            in PiT or a CNN stem), so no mask can follow the patches.

    Examples::

        >>> mask = cv.patch_feature_mask(model, images)
        >>> attr = FeatureAblation(model).attribute(images, target=3, feature_mask=mask)
        >>> occ = Occlusion(model).attribute(
        ...     images, target=3, sliding_window_shapes=mask.sliding_window_shapes,
        ...     strides=mask.strides)
    """
    check_batch_shape(inputs, "inputs")
    model = peel_wrappers(model)
    name, (patch_h, patch_w) = _patch_embedding(model)
    layout = resolve_layout(model, name, inputs[:2])
    grid_h, grid_w = layout.grid
    height, width = inputs.shape[-2:]
    device = inputs.device
    rows = (torch.arange(height, device=device) // patch_h).clamp(max=grid_h - 1)
    cols = (torch.arange(width, device=device) // patch_w).clamp(max=grid_w - 1)
    mask = (rows[:, None] * grid_w + cols[None, :]).view(1, 1, height, width)
    mask.sliding_window_shapes = (3, patch_h, patch_w)
    mask.strides = (3, patch_h, patch_w)
    mask.grid = (grid_h, grid_w)
    mask.patch_size = (patch_h, patch_w)
    return mask


def _patch_embedding(model: nn.Module) -> tuple[str, tuple[int, int]]:
    """The model's patch embedding and its patch size: the first 2-D convolution taking
    RGB, or, where timm's ``pretrained_cfg["first_conv"]`` names an ``nn.Linear`` (timm
    Gemma 4, NaFlexViT), the module holding it, which cuts the image into its
    ``patch_size`` patches and projects each one flattened."""
    linear = _linear_patch_embedding(model)
    if linear is not None:
        return linear
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            if tuple(module.kernel_size) != tuple(module.stride) or any(module.padding):
                raise ValueError(
                    f"the model's first convolution {name!r} (kernel {tuple(module.kernel_size)}"
                    f", stride {tuple(module.stride)}, padding {tuple(module.padding)}) makes "
                    "overlapping or padded patches: no pixel mask follows its patches. Build a "
                    "feature mask by hand (for example square blocks of the stride)"
                )
            return name, tuple(module.stride)
    raise ValueError(
        f"{type(model).__name__} has no patch embedding (an nn.Conv2d taking 3 channels, or "
        "a linear projection of flattened patches named by timm's first_conv): "
        "patch_feature_mask needs a ViT-family model"
    )


def _linear_patch_embedding(model: nn.Module) -> tuple[str, tuple[int, int]] | None:
    """``(path, (p_h, p_w))`` of the linear RGB patch embedding that the first timm model
    in ``model`` (itself, or inside a wrapper or an open_clip tower) declares
    (:func:`~captum_vit.models.linear_patch_embedding`); else ``None``."""
    owner = next(
        ((prefix, module) for prefix, module in model.named_modules() if timm_first_conv(module)),
        None,
    )
    found = linear_patch_embedding(owner[1]) if owner is not None else None
    if found is None or found[2] != 3:
        return None
    prefix, (path, patch_size, _) = owner[0], found
    return (f"{prefix}.{path}" if prefix else path), patch_size
