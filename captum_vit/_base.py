"""Shared plumbing of the public layer methods (FeatureVisualization, PatchActivationMap,
TopActivatingExamples, SpatialLocalityProbe): model wrapping, image checks, layout
resolution per input size, unit checks, and the truncated forward to the layer.

Subclasses get, with ``_LayerMethod.__init__(self, model, layer, ...)``:

* ``self.wrapped``: :class:`~captum_vit.models.ImageModel` (takes [0, 1] images);
* ``self.vision``: the user's (unwrapped) vision model; layer paths are relative to it;
* ``self.layer_name`` / ``self.layer``: dotted path (in ``self.vision``) and module of the
  layer; ``self.layer_path``: its path in the user's model, which results show;
* ``self.normalize(images)``; ``self.check_images(images)``;
* ``self.layout_for(images)``: the :class:`~captum_vit.layout.TokenLayout` for that input
  size (cached per size);
* ``self.forward_to_layer(images, grad=...)``: the layer's raw output (early exit), with
  the model in eval mode and parameter gradients off, restored afterwards.

Dtype and device: images enter the model through :meth:`ImageModel.normalize`, which
casts them once to the model's dtype (bfloat16 / float16 models take float32 images);
the methods compute their scores and maps in float32 and return float32.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from captum.attr import LayerAttribution
from torch import nn

from .capture import LayerTap, autograd, preserved_state
from .layout import TokenLayout, resolve_layouts
from .models import (
    ImageModel,
    check_images,
    fixed_input_size,
    model_device,
    user_layer_path,
    vision_layer,
)

__all__ = [
    "_LayerMethod",
    "as_unit_tensor",
    "check_count",
    "checks_unit_range",
    "forward_args",
    "layouts_for",
]


class _LayerMethod(LayerAttribution):
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
                image tower), a CNN, or any image model; it is never modified.
            layer: the layer, as a module or a dotted path (``"blocks.5.mlp.fc1"``); on a
                full CLIP model, a path of its image tower (``"visual.transformer..."``).
            attribute_to_layer_input: use the layer's input instead of its output.
            call: for modules run several times per forward (CoaT), which call (0-based).
            mean, std, image_size: override the model's own normalization / input size.
                Images are RGB in [0, 1]; the model normalizes them inside.
            element: for a layer that returns a tuple or list of maps (CrossViT's
                blocks: one token tensor per branch), which one; by default the first
                spatial one.
        """
        if not isinstance(attribute_to_layer_input, bool):
            raise TypeError(
                "attribute_to_layer_input must be a bool, got "
                f"{type(attribute_to_layer_input).__name__}"
            )
        if isinstance(call, bool) or not isinstance(call, int):
            raise TypeError(f"call must be an int, got {type(call).__name__}")
        if element is not None and (isinstance(element, bool) or not isinstance(element, int)):
            raise TypeError(f"element must be None or an int, got {type(element).__name__}")
        if element is not None and element < 0:
            raise ValueError(f"element must be >= 0 (a position in the tuple), got {element}")
        wrapped = ImageModel(model, mean=mean, std=std, image_size=image_size)
        self.wrapped = wrapped
        self.vision = wrapped.model
        self.layer_name, module = vision_layer(model, layer)
        #: the layer's path in the user's model, as results name it
        self.layer_path = user_layer_path(model, self.layer_name)
        LayerAttribution.__init__(self, wrapped, module)
        self.attribute_to_layer_input = attribute_to_layer_input
        self.call = call
        self.element = element
        self._fixed_size = fixed_input_size(self.vision)
        self._layouts: dict[tuple[int, int, bool], TokenLayout] = {}

    @property
    def image_size(self) -> tuple[int, int]:
        return self.wrapped.image_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped.normalize(images)

    def check_images(self, images: torch.Tensor, *, in_unit_range: bool = True) -> None:
        check_images(images, size=self._fixed_size, in_unit_range=in_unit_range)

    def device(self) -> torch.device:
        return model_device(self.vision)

    def _as_input(self, attribute_to_layer_input: bool | None) -> bool:
        """The per-call choice, else the constructor's."""
        if attribute_to_layer_input is None:
            return self.attribute_to_layer_input
        if not isinstance(attribute_to_layer_input, bool):
            raise TypeError(
                "attribute_to_layer_input must be a bool or None, got "
                f"{type(attribute_to_layer_input).__name__}"
            )
        return attribute_to_layer_input

    def layout_for(
        self,
        images: torch.Tensor,
        *,
        attribute_to_layer_input: bool | None = None,
        additional_forward_args: Any = None,
    ) -> TokenLayout:
        """Layout of the layer for images of this size (resolved once per size)."""
        as_input = self._as_input(attribute_to_layer_input)
        size = self._layout_key(images, as_input)
        if size not in self._layouts:
            extra = forward_args(additional_forward_args)
            # Extra forward arguments may be batched like the images: resolve on the batch.
            probe = self.normalize((images if extra else images[:2]).detach())
            (self._layouts[size],) = resolve_layouts(
                self.vision,
                [self.layer_name],
                probe,
                attribute_to_layer_input=as_input,
                call=self.call,
                element=self.element,
                additional_forward_args=extra,
                shown=[self.layer_path],
            )
        return self._layouts[size]

    def _layout_key(self, images: torch.Tensor, as_input: bool) -> tuple[int, int, bool]:
        return (int(images.shape[-2]), int(images.shape[-1]), as_input)

    def tap(
        self, *, call: int | None = None, attribute_to_layer_input: bool | None = None
    ) -> LayerTap:
        """A :class:`LayerTap` on this layer of the unwrapped model (early exit)."""
        return LayerTap(
            self.vision,
            self.layer_name,
            attribute_to_layer_input=self._as_input(attribute_to_layer_input),
            call=self.call if call is None else call,
        )

    def forward_to_layer(
        self,
        images: torch.Tensor,
        *,
        grad: bool = False,
        attribute_to_layer_input: bool | None = None,
        additional_forward_args: Any = None,
    ) -> Any:
        """The layer's raw output for [0, 1] images; the forward stops at the layer."""
        extra = forward_args(additional_forward_args)
        if attribute_to_layer_input is None:
            tap = self.tap()  # subclasses may tap another way (the whole tower as layer)
        else:
            tap = self.tap(attribute_to_layer_input=attribute_to_layer_input)
        with preserved_state(self.vision), autograd(grad), tap:
            return tap.run(self.normalize(images), *extra)[0]


def checks_unit_range(attribute: Callable) -> Callable:
    """Decorate an ``attribute(self, inputs, ...)`` whose body checks its images with
    ``in_unit_range=False``: the decorated method checks that ``inputs`` are in [0, 1]
    first. Captum's wrappers of an attribution method (``NoiseTunnel``) call
    ``attribute.__wrapped__``, as for Captum's own methods, on noisy copies of the images
    that leave [0, 1] by design."""

    @functools.wraps(attribute)
    def in_unit_range(self, inputs, *args, **kwargs):
        check_images(inputs)
        return attribute(self, inputs, *args, **kwargs)

    return in_unit_range


def forward_args(additional_forward_args: Any) -> tuple:
    """Captum's convention: ``None`` -> ``()``, a tuple as is, anything else -> ``(arg,)``;
    passed to the model after the images."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def check_count(value: Any, name: str, meaning: str) -> int:
    """A positive int argument (numpy integers too): TypeError for another type,
    ValueError below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int ({meaning}), got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int ({meaning}), got {value}")
    return int(value)


def from_numpy(target: Any) -> Any:
    """Units as numpy gives them (``np.argsort(...)[-5:]``, ``np.int64(3)``, a list of
    numpy ints) as a tensor / Python ints; anything else unchanged."""
    if isinstance(target, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(target))
    if isinstance(target, np.integer):
        return int(target)
    if isinstance(target, (list, tuple)) and any(isinstance(u, np.integer) for u in target):
        return [int(u) if isinstance(u, np.integer) else u for u in target]
    return target


def as_unit_tensor(
    target: int | Sequence[int] | torch.Tensor, num_channels: int, *, name: str = "target"
) -> torch.Tensor:
    """Units as a 1-D long tensor, checked against the layer width.

    Raises:
        TypeError: not an int, a sequence of ints or an integer tensor (numpy integers
            and integer arrays count as ints and tensors).
        IndexError: a unit is outside ``[0, num_channels)``.
    """
    target = from_numpy(target)
    if isinstance(target, bool):
        raise TypeError(f"{name} must be an int, a list of ints or a 1-D tensor, got bool")
    if isinstance(target, int):
        units = torch.tensor([target])
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dim() > 1:
            raise TypeError(
                f"{name} as a tensor must be 1-D integer, got {target.dtype} "
                f"with shape {tuple(target.shape)}"
            )
        units = target.reshape(-1).long().cpu()
    elif isinstance(target, Sequence) and all(
        isinstance(u, int) and not isinstance(u, bool) for u in target
    ):
        units = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TypeError(
            f"{name} must be an int, a list of ints or a 1-D tensor, got {type(target).__name__}"
        )
    if units.numel() == 0:
        raise ValueError(f"{name} is empty")
    bad = units[(units < 0) | (units >= num_channels)]
    if bad.numel():
        raise IndexError(
            f"{name} unit {int(bad[0])} is out of range: the layer has {num_channels} "
            f"channels (valid 0..{num_channels - 1})"
        )
    return units


def layouts_for(methods: Sequence[_LayerMethod], images: torch.Tensor) -> list[TokenLayout]:
    """Each method's layout for images of this size, as its ``layout_for`` gives it; the
    layouts not cached yet are resolved together in one forward. The methods share one
    model, normalization, ``call`` and ``attribute_to_layer_input``; methods that pick
    different ``element``s of tuple outputs are resolved in one forward per element."""
    first = methods[0]
    key = first._layout_key(images, first.attribute_to_layer_input)
    missing = [method for method in methods if key not in method._layouts]
    probe = first.normalize(images[:2].detach()) if missing else None
    for element in dict.fromkeys(method.element for method in missing):
        group = [method for method in missing if method.element == element]
        resolved = resolve_layouts(
            first.vision,
            [method.layer_name for method in group],
            probe,
            attribute_to_layer_input=first.attribute_to_layer_input,
            call=first.call,
            element=element,
            shown=[method.layer_path for method in group],
        )
        for method, layout in zip(group, resolved, strict=True):
            method._layouts[key] = layout
    return [method._layouts[key] for method in methods]
