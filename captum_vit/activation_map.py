"""PatchActivationMap: where on the image a unit (or a direction) of a layer fires."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._base import _LayerMethod, as_unit_tensor, checks_unit_range, from_numpy
from .layout import TokenLayout, upsample_to_image
from .models import patch_tiling

__all__ = ["PatchActivationMap", "unit_maps"]

Target = int | Sequence[int] | torch.Tensor


class PatchActivationMap(_LayerMethod):
    """Activation of one unit (channel) or one direction of a layer at every patch token.

    Works on every token layout the package resolves: ViT-style token sequences with
    prefix tokens (``BNC``; cls / dist / registers are excluded from the map), older
    sequence-first open_clip (``NBC``), Swin's ``BHWC`` blocks and its ``(B, H*W, C)``
    MLP layers, PiT stages and CNN feature maps (``BCHW``). Layers without a patch grid
    (pooled features, CaiT class-attention blocks, attention-pool queries, windowed
    attention) raise a ``ValueError``.

    With ``target=None`` it is Captum's ``LayerActivation`` on a patch grid: the whole
    layer as ``(B, C, h, w)``, the shape of Captum's layer attributions for a conv layer,
    so :meth:`LayerAttribution.interpolate` and Captum's visualization take it as is.

    Examples::

        >>> pam = PatchActivationMap(model, "blocks.5.mlp.fc1")
        >>> maps = pam.attribute(images, target=17)                   # (B, h, w)
        >>> up = pam.attribute(images, target=17, interpolate=True)   # (B, H, W)
        >>> maps, cls = pam.attribute(images, target=17, return_prefix=True)
        >>> layer = pam.attribute(images)                             # (B, C, h, w)
        >>> smooth = NoiseTunnel(pam).attribute(images, nt_samples=8, stdevs=0.1, target=17)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | str,
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
            layer: the layer, as a module or a dotted path (``"blocks.5.mlp.fc1"``).
            attribute_to_layer_input: by default map the layer's input instead of its
                output (for example the input of ``mlp.fc2``, the post-activation hidden
                layer); :meth:`attribute` can override it per call.
            call: for modules run several times per forward (CoaT), which call to use.
            mean, std, image_size: override the model's own normalization / input size.
                Images passed to :meth:`attribute` are RGB in [0, 1].
            element: for a layer that returns a tuple or list of maps (CrossViT's
                blocks: one token tensor per branch), which one to map; by default the
                first spatial one.
        """
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

    @checks_unit_range
    def attribute(
        self,
        inputs: torch.Tensor,
        target: Target | None = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool | None = None,
        *,
        interpolate: bool = False,
        interpolate_mode: str = "bilinear",
        return_prefix: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Patch-wise activation maps of ``target`` for a batch of images.

        Args:
            inputs: ``(B, 3, H, W)`` RGB images in [0, 1].
            target: what to map:

                * ``None``: every channel of the layer, ``(B, C, h, w)`` (Captum's
                  ``LayerActivation`` on the patch grid);
                * an ``int``: that unit for every image;
                * a list of ``B`` ints or a 1-D integer tensor of length ``B``: one unit
                  per image;
                * a float tensor ``(C,)``: a direction in channel space (the map is the
                  dot product of every token with it; it is not normalized), or ``(B, C)``
                  one direction per image.
            additional_forward_args: further arguments of the model's forward, passed
                after the images (Captum's convention: a tuple, or one value).
            attribute_to_layer_input: map the layer's input (``True``) or output
                (``False``) for this call; ``None`` keeps the constructor's choice.
            interpolate: return the maps upsampled to the input size ``(B, H, W)``
                (as Captum's :meth:`LayerAttribution.interpolate`), instead of the patch
                grid ``(B, h, w)``. For an image that is not a whole number of patches,
                the maps lie on the pixels the patches cover: the part a model pads is
                cut off (timm ``dynamic_img_pad``), and the rest a model drops
                (Hugging Face ViT) takes the nearest patch's values.
            interpolate_mode: mode of ``torch.nn.functional.interpolate``.
            return_prefix: also return the prefix tokens' values of the same target.

        Returns:
            float32 tensors on the device of ``inputs``, detached, whatever the model's
            dtype: ``(B, h, w)`` maps for a unit or direction target, ``(B, C, h, w)``
            for ``target=None`` (``H, W`` instead of ``h, w`` with ``interpolate=True``).
            For Captum's single-channel layer-attribution shape ``(B, 1, h, w)`` use
            ``maps.unsqueeze(1)``. With ``return_prefix=True`` a tuple ``(maps,
            prefix)`` where ``prefix`` is ``(B, P)`` (``(B, P, C)`` for
            ``target=None``): the target's value at each prefix token in sequence order
            (names in ``self.layout_for(inputs).prefix_names``, e.g. ``("cls",
            "dist")``); ``P = 0`` for layers without prefix tokens.

        Raises:
            ValueError: invalid images (not in [0, 1], wrong shape or size), a non-spatial
                layer, a target whose length does not match the batch or whose direction
                does not match the layer width.
            IndexError: a unit outside the layer's channels.
            TypeError: images that are not a float tensor, a target of another type.
        """
        self.check_images(inputs, in_unit_range=False)  # checked by @checks_unit_range
        as_input = self._as_input(attribute_to_layer_input)
        images = inputs.to(self.device())
        layout = self.layout_for(
            images,
            attribute_to_layer_input=as_input,
            additional_forward_args=additional_forward_args,
        )
        selector = _target_selector(target, layout, images.shape[0])
        output = self.forward_to_layer(
            images,
            attribute_to_layer_input=as_input,
            additional_forward_args=additional_forward_args,
        )
        spatial, prefix = layout.split(output)
        maps = selector(spatial.float())
        if interpolate:
            grid = maps if target is None else maps.unsqueeze(1)
            size = tuple(images.shape[-2:])
            grid = upsample_to_image(grid, size, patch_tiling(self.vision, size), interpolate_mode)
            maps = grid if target is None else grid.squeeze(1)
        maps = maps.to(inputs.device)
        if not return_prefix:
            return maps
        if prefix is None:
            prefix_values = maps.new_zeros(images.shape[0], 0, *maps.shape[1:-2])
        elif target is None:
            prefix_values = prefix.float()
        else:
            prefix_values = selector(prefix.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1)
        return maps, prefix_values.to(inputs.device)


def unit_maps(spatial: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``spatial[b, units[b]]`` for every image: ``(B, C, h, w)`` -> ``(B, h, w)``."""
    batch = torch.arange(spatial.shape[0], device=spatial.device)
    return spatial[batch, units.to(spatial.device)]


def _target_selector(target: Target | None, layout: TokenLayout, batch: int):
    """A function ``(B, C, h, w) -> (B, h, w)`` picking the target from feature maps
    (``target=None``: every channel, unchanged)."""
    if target is None:
        return lambda spatial: spatial
    target = from_numpy(target)
    channels = layout.num_channels
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return _direction_selector(target, channels, batch)
    units = as_unit_tensor(target, channels)
    if isinstance(target, int) or _is_scalar(target):
        units = units.expand(batch)
    if units.numel() != batch:
        raise ValueError(
            f"target has {units.numel()} units for {batch} images: give one int for all "
            "images or exactly one unit per image"
        )
    return lambda spatial: unit_maps(spatial, units)


def _is_scalar(target: Target) -> bool:
    return isinstance(target, torch.Tensor) and target.dim() == 0


def _direction_selector(direction: torch.Tensor, channels: int, batch: int):
    if direction.dim() == 1:
        direction = direction.unsqueeze(0).expand(batch, -1)
    if direction.dim() != 2 or direction.shape != (batch, channels):
        raise ValueError(
            f"a direction target must have shape ({channels},) or ({batch}, {channels}) "
            f"(the layer has {channels} channels, the batch {batch} images), got "
            f"{tuple(direction.shape)}"
        )
    if not torch.isfinite(direction).all():
        raise ValueError("the direction target contains NaN or inf values")

    def select(spatial: torch.Tensor) -> torch.Tensor:
        weights = direction.to(spatial.device, spatial.dtype)
        return torch.einsum("bchw,bc->bhw", spatial, weights)

    return select
