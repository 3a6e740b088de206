"""One top-k accuracy counter for every experiment that scores logits against labels."""

from __future__ import annotations

import torch

__all__ = ["TopKCounter"]


class TopKCounter:
    """Top-1 and top-``k`` hit counts, optionally per position.

    ``add(logits, labels)`` takes logits ``(B, *shape, K)`` and labels ``(B,)``; the counts
    have ``shape`` (``()`` for one count per run, ``(h*w,)`` for one per patch position).
    When a head has fewer than ``k`` classes, top-``k`` means top-``K``.

    Examples::

        >>> counter = TopKCounter()
        >>> for images, labels in loader:
        ...     counter.add(model(images), labels)
        >>> counter.top1_percent(), counter.topk_percent()
    """

    def __init__(self, k: int = 5, shape: tuple[int, ...] = ()) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.top1 = torch.zeros(shape, dtype=torch.long)
        self.topk = torch.zeros(shape, dtype=torch.long)
        self.total = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count the hits of ``logits`` ``(B, *shape, K)`` against ``labels`` ``(B,)``."""
        check_labels(labels, logits.shape[-1])
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} rows of logits")
        if bool(torch.isnan(logits).any()):  # topk ranks NaN first: a hit or miss by chance
            raise FloatingPointError(
                "the model's logits hold NaN, which have no rank, so accuracy cannot be "
                "counted: the model computes NaN (an overflow, as in a float16 model, or NaN "
                "weights). Run it in float32 or bfloat16, or check its weights"
            )
        top = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices
        target = labels.to(top.device).view(-1, *([1] * (top.dim() - 1)))
        self.top1 += (top[..., :1] == target).squeeze(-1).sum(0).cpu()
        self.topk += (top == target).any(-1).sum(0).cpu()
        self.total += int(logits.shape[0])

    def top1_percent(self) -> torch.Tensor:
        """Top-1 accuracy in percent (float64, ``shape``); NaN before any sample."""
        return 100.0 * self.top1.double() / self.total if self.total else self.top1 * torch.nan

    def topk_percent(self) -> torch.Tensor:
        """Top-``k`` accuracy in percent (float64, ``shape``); NaN before any sample."""
        return 100.0 * self.topk.double() / self.total if self.total else self.topk * torch.nan


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise unless ``labels`` are class indices in ``[0, num_classes)``."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise TypeError("labels must be an integer tensor (B,) of class indices")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) for a head with "
            f"{num_classes} outputs, got values in [{int(labels.min())}, {int(labels.max())}]"
        )
