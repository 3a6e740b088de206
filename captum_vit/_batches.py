"""One reader for the batch formats every data-consuming method accepts.

A batch is one of:

* a ``(B, 3, H, W)`` image tensor;
* a tuple / list ``(images, labels[, masks])`` (what a ``DataLoader`` over a labelled
  dataset yields; only ``images`` is needed where labels are not);
* a dict with an ``"image"`` tensor and optional ``"label"``, ``"index"`` (the images'
  global indices) and ``"mask"`` entries (the zoo's ``SyntheticScenes`` batches); Hugging
  Face's names ``"pixel_values"`` and ``"labels"`` are read as well (the images still in
  [0, 1]: an image processor without ``do_normalize=False`` normalizes them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "as_batch_stream", "dict_images", "unpack_batch"]

_FORMATS = (
    "(B, 3, H, W) image tensors, (images, labels) tuples or dicts with 'image' (or "
    "'pixel_values') and optional 'label' (or 'labels') / 'index' / 'mask' keys"
)

#: Dict keys read as a batch's images and labels, in order of preference.
_IMAGE_KEYS = ("image", "pixel_values")
_LABEL_KEYS = ("label", "labels")


@dataclass(frozen=True)
class Batch:
    """One batch, unpacked: ``images`` ``(B, 3, H, W)``; ``labels`` ``(B,)`` long,
    ``index`` ``(B,)`` and ``masks`` or ``None`` where the batch has none."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    index: Any = None
    masks: torch.Tensor | None = None


def as_batch_stream(data: Any) -> Iterable[Any]:
    """``data`` as an iterable of batches: a single 4-D tensor is one batch."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of batches (a DataLoader, a list...), got "
            f"{type(data).__name__}; batches are {_FORMATS}"
        )
    return data


def unpack_batch(
    batch: Any, position: int | None = None, *, labels: bool = False, purpose: str = ""
) -> Batch:
    """Read one batch (see the module doc for the formats).

    Args:
        batch: the batch.
        position: its position in the stream, for error messages.
        labels: whether labels are required (then checked: integer ``(B,)``).
        purpose: what needs the labels, for error messages (e.g. ``"pooling_experiments"``).

    Raises:
        TypeError: the batch is none of the formats, its images are not a tensor, or its
            labels are not integers (or absent from a plain tensor batch when required).
        ValueError: a dict without ``"image"`` (or ``"label"`` when required), a single
            ``(3, H, W)`` image instead of a batch, labels or index of the wrong length.
    """
    where = "batch" if position is None else f"batch {position}"
    found_labels = index = masks = None
    if isinstance(batch, torch.Tensor):
        images = batch
    elif isinstance(batch, Mapping):
        images = dict_images(batch, where)
        label_key = _first_key(batch, _LABEL_KEYS)
        found_labels = None if label_key is None else batch[label_key]
        index, masks = batch.get("index"), batch.get("mask")
        if labels and found_labels is None:
            raise ValueError(
                f"{where} is a dict without a 'label' or 'labels' key (keys: "
                f"{sorted(map(str, batch))}); {purpose or 'this method'} needs labels"
            )
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        found_labels = batch[1] if len(batch) > 1 else None
        masks = batch[2] if len(batch) > 2 else None
    else:
        raise TypeError(f"{where} is a {type(batch).__name__}: yield {_FORMATS}")
    _check_images(images, where)
    if labels:
        if found_labels is None:
            raise TypeError(
                f"{where} has no labels: {purpose or 'this method'} needs (images, labels) "
                "batches or dicts with 'image' and 'label' keys"
            )
        found_labels = _check_labels(found_labels, images.shape[0], where)
    if index is not None:
        index = _check_index(index, images.shape[0], where)
    return Batch(images, found_labels, index, masks)


def dict_images(batch: Mapping, where: str) -> Any:
    """The images of a dict batch (or dataset item): its ``"image"``, else its
    ``"pixel_values"``; a ValueError naming ``where`` if it has neither."""
    key = _first_key(batch, _IMAGE_KEYS)
    if key is None:
        raise ValueError(
            f"{where} is a dict without an 'image' or 'pixel_values' key (keys: "
            f"{sorted(map(str, batch))}); use {{'image': tensor, 'label': tensor, ...}}"
        )
    return batch[key]


def _first_key(batch: Mapping, keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in batch), None)


def _check_images(images: Any, where: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"the images of {where} must be a tensor, got {type(images).__name__}")
    if images.dim() == 3:
        raise ValueError(
            f"{where} is a single image {tuple(images.shape)}: the data must yield batches "
            "(B, 3, H, W); iterating a tensor of images yields single images, so pass the "
            "tensor itself or a DataLoader"
        )


def _check_labels(labels: Any, count: int, where: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"the labels of {where} must be an integer tensor (B,) of class indices, got "
                f"{type(labels).__name__}"
            ) from error
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"the labels of {where} must be an integer tensor (B,) of class indices, got "
            f"{labels.dtype}"
        )
    if labels.dim() != 1 or labels.shape[0] != count:
        raise ValueError(
            f"the labels of {where} must have shape ({count},) for {count} images, got "
            f"{tuple(labels.shape)}"
        )
    return labels.long()


def _check_index(index: Any, count: int, where: str) -> torch.Tensor:
    index = torch.as_tensor(index)
    if index.is_floating_point() or index.shape != (count,):
        raise ValueError(
            f"the 'index' of {where} must be {count} integers (one per image), got "
            f"{index.dtype} of shape {tuple(index.shape)}"
        )
    if (index < 0).any():
        raise ValueError(f"the image indices of {where} must be >= 0")
    return index.long()
