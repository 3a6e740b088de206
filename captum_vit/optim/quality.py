"""How good is a feature visualization? Two measures used by the benchmarks and the atlas.

* :func:`robust_activation` -- the target's objective averaged over many random views of
  each image (circular shifts up to 1/7 of the size, the paper's per-channel colour shift):
  high when the image excites the unit for its content, not for its exact pixels. A
  visualization that only works at one alignment against the patch grid scores low.
* :func:`transfer_score` -- top-1 accuracy (%) of an independent classifier on class
  visualizations: does another model see the class too?
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._accuracy import TopKCounter
from .._base import check_count
from ..capture import preserved_state
from ..models import (
    ImageModel,
    check_embedding_head,
    check_images,
    model_device,
    outputs_embeddings,
)
from .objectives import Objective, Token, compile_objectives, flat_output

__all__ = ["robust_activation", "transfer_score", "random_views"]


def random_views(
    views: int, size: tuple[int, int], *, shift: float = 1 / 7, color: float = 1.0, seed: int = 0
) -> list[tuple[int, int, Tensor, Tensor]]:
    """The views of :func:`robust_activation`: ``(dy, dx, mu, sigma)`` per view, drawn in
    this order from ``torch.Generator().manual_seed(seed)``: ``dy`` and ``dx`` uniform
    integers in ``[-round(shift * H), round(shift * H)]`` (and ``W``), then ``mu`` = 3
    uniform values in ``[-color, color]``, then ``sigma = exp`` of 3 uniform values in
    ``[-color, color]``. A view of ``x`` is ``(roll(x, (dy, dx)) - mu) / sigma`` per
    channel (the paper's colour shift at ``color=1``)."""
    generator = torch.Generator().manual_seed(seed)
    lim_h, lim_w = round(shift * size[0]), round(shift * size[1])
    out = []
    for _ in range(views):
        dy = int(torch.randint(-lim_h, lim_h + 1, (), generator=generator))
        dx = int(torch.randint(-lim_w, lim_w + 1, (), generator=generator))
        mu = (torch.rand(3, generator=generator) * 2 - 1) * color
        sigma = ((torch.rand(3, generator=generator) * 2 - 1) * color).exp()
        out.append((dy, dx, mu.view(1, 3, 1, 1), sigma.view(1, 3, 1, 1)))
    return out


@torch.no_grad()
def robust_activation(
    model: nn.Module,
    layer: nn.Module | str,
    images: Tensor,
    target: int | Sequence[int | Objective] | Tensor | Objective,
    *,
    token: Token = "patches",
    views: int = 32,
    shift: float = 1 / 7,
    color: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """The target's objective averaged over ``views`` random views of each image.

    The views (:func:`random_views`: circular shifts up to ``shift`` of the size and the
    paper's per-channel colour shift) are drawn once from ``seed`` and shared by all images,
    so scores of different images (and presets) are comparable.

    Args:
        model: the model (as for :class:`~captum_vit.FeatureVisualization`).
        layer: module or dotted path.
        images: ``(N, 3, H, W)`` in [0, 1].
        target: one target for every image, or one per image (a list or 1-D tensor of
            ``N`` units or objectives), as in ``FeatureVisualization.attribute``.
        token: where int units are read (see ``FeatureVisualization.attribute``).
        views, shift, color, seed: the views.
        batch_size: images per forward pass.

    Returns:
        ``(N,)`` float32 on the CPU.

    Examples::

        >>> images = cv.FeatureVisualization(model, "blocks.3.mlp.act").attribute(target=[1, 2])
        >>> cv.robust_activation(model, "blocks.3.mlp.act", images, [1, 2])  # (2,)
    """
    from .feature_viz import FeatureVisualization, _as_objectives

    check_images(images)
    views = check_count(views, "views", "random views of each image")
    fv = FeatureVisualization(model, layer)
    objectives = _as_objectives(target, token)
    n = images.shape[0]
    if len(objectives) == 1:
        objectives = objectives * n
    if len(objectives) != n:
        raise ValueError(f"got {len(objectives)} targets for {n} images; pass 1 or {n}")
    size = (int(images.shape[-2]), int(images.shape[-1]))
    model_size = fv._fixed_size or size
    device = fv.device()
    layout, num_channels = fv._layout(model_size, device)
    total = torch.zeros(n)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size].float().to(device)
        goals = objectives[start : start + batch_size]
        scorer = compile_objectives(goals, layout, num_channels, default_token=token, device=device)
        for dy, dx, mu, sigma in random_views(views, size, shift=shift, color=color, seed=seed):
            view = (torch.roll(chunk, (dy, dx), dims=(-2, -1)) - mu.to(device)) / sigma.to(device)
            if size != tuple(model_size):
                view = F.interpolate(view, size=model_size, mode="bilinear", align_corners=False)
            total[start : start + len(chunk)] += scorer(fv.forward_to_layer(view)).float().cpu()
    return total / views


@torch.no_grad()
def transfer_score(
    images: Tensor,
    labels: Tensor | Sequence[int],
    judge_model: nn.Module,
    *,
    batch_size: int = 64,
    head: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Top-1 accuracy (%) of ``judge_model`` on ``images`` against ``labels``: how often an
    independent classifier sees the class a visualization was made for.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1], resized to the judge's input size (its
            declared one, if any).
        labels: ``N`` class indices.
        judge_model: a classifier (its own normalization is applied, see
            :class:`~captum_vit.ImageModel`); left as found (eval mode inside).
        head: maps the judge's output to class scores; needed for a judge that outputs
            image embeddings (open_clip / CLIP models: a zero-shot head such as
            ``lambda e: F.normalize(e, dim=-1) @ text_features.T``).

    Returns:
        a float in [0, 100].

    Examples::

        >>> images = cv.FeatureVisualization(vit, "head").attribute(target=list(range(8)))
        >>> cv.transfer_score(images, list(range(8)), cnn)

    Raises:
        ValueError: no images, a label count that differs from the images', a judge
            that outputs embeddings without ``head``, a label outside the judge's classes.
    """
    check_images(images)
    if len(images) == 0:
        raise ValueError(
            "transfer_score needs at least one image (an accuracy of none is undefined)"
        )
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"got {labels.numel()} labels for {images.shape[0]} images")
    if head is not None or outputs_embeddings(judge_model):
        check_embedding_head(head, judge_model)
    judge = ImageModel(judge_model)
    try:
        size = judge.image_size
    except ValueError:  # no declared input size: the images' own
        size = tuple(images.shape[-2:])
    device = model_device(judge.model)
    counter = TopKCounter(k=1)
    with preserved_state(judge.model):
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].float().to(device)
            if tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            scores = _vectors(judge(x))
            scores = scores if head is None else head(scores)
            _check_labels_fit(labels, scores)
            counter.add(scores.float(), labels[start : start + batch_size])
    return float(counter.top1_percent())


def _vectors(output: Any) -> Any:
    """The judge's ``(B, C)`` output; of a tuple that starts with it (open_clip's CoCa
    tower: ``(embedding, tokens)``), that first element."""
    vectors = flat_output(output)
    return output if vectors is None else vectors


def _check_labels_fit(labels: Tensor, scores: Tensor) -> None:
    """A label outside the judge's classes would count as a silent miss."""
    classes = scores.shape[-1]
    if scores.dim() != 2 or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(
            f"the judge outputs {tuple(scores.shape)} scores but the labels run "
            f"{int(labels.min())}..{int(labels.max())}: labels must index its classes "
            "(0..C-1 of a (B, C) output); for a model that outputs features, pass head=..."
        )
