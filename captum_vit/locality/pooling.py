"""The paper's spatial-information experiments (Ghiasi et al. 2022, section 4, Table 1).

The experiments re-run the model's own modules in another order -- never editing the
model -- through a small adapter per model family (:class:`_TokenPipeline`):

* ``embed(images)``: normalized images -> ``(B, N, C)`` tokens, prefix tokens first;
* ``block(i, x)``: block ``i`` on a batch-first token sequence of any length;
* ``logits(x)``: the model's final norm, token pooling and head on a sequence whose first
  ``num_prefix`` tokens are the prefix (the other tokens are never read);
* ``token_logits(t)``: the same head applied to single ``(B, C)`` token features.

Supported: timm ``VisionTransformer`` (and DeiT-distilled) with a cls token and token
pooling, open_clip ``VisionTransformer`` towers with ``'tok'`` pooling and an open_clip
tower around such a timm trunk; the last two output embeddings, so a classifier or
zero-shot head must be passed. Other architectures raise ``ValueError``: the experiments
need a cls token that alone feeds the head and a plain stack of blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .reports import Accuracy, PoolingReport

__all__ = ["token_pipeline", "run_pooling_experiments"]

Head = Callable[[torch.Tensor], torch.Tensor]


class _TokenPipeline:
    num_prefix: int
    blocks: Sequence[nn.Module]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[index](x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head applied to ``(B, C)`` token features: each fills every prefix slot, so the
        token pooling (which reads only the prefix) sees it alone."""
        return self.logits(tokens[:, None].expand(-1, self.num_prefix, -1))


class _TimmViT(_TokenPipeline):
    def __init__(self, model: nn.Module, head: Head | None) -> None:
        self.model = model
        self.head = head
        self.num_prefix = int(model.num_prefix_tokens)
        self.blocks = list(model.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x)
        if self.head is None:
            return self.model.forward_head(x)
        return self.head(self.model.forward_head(x, pre_logits=True))


class _OpenClipViT(_TokenPipeline):
    def __init__(self, visual: nn.Module, head: Head) -> None:
        self.visual = visual
        self.head = head
        self.num_prefix = 1
        self.blocks = list(visual.transformer.resblocks)
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(x)

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return self.blocks[index](x)
        return self.blocks[index](x.transpose(0, 1)).transpose(0, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return self.head(pooled)


def token_pipeline(vision: nn.Module, head: Head | None = None) -> _TokenPipeline:
    """The adapter for ``vision`` (an unwrapped vision model).

    Raises:
        ValueError: the model has no cls token feeding the head alone, or is not a plain
            stack of blocks (Swin, PiT, CaiT, ConViT, CNNs, average / attention pooling),
            or it outputs embeddings and no ``head`` was given.
    """
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    trunk = getattr(vision, "trunk", None)
    if isinstance(trunk, TimmVisionTransformer) and hasattr(vision, "head"):
        _need_head(head, vision)
        tower_head = vision.head
        _check_timm(trunk)
        return _TimmViT(trunk, lambda features: head(tower_head(features)))
    if isinstance(vision, TimmVisionTransformer):
        _check_timm(vision)
        return _TimmViT(vision, head)
    if type(vision).__module__.startswith("open_clip") and hasattr(vision, "transformer"):
        if (
            getattr(vision, "attn_pool", None) is not None
            or getattr(vision, "pool_type", "") != "tok"
        ):
            raise ValueError(
                f"the open_clip tower pools with {getattr(vision, 'pool_type', '?')!r}"
                f"{' and an attention pooler' if getattr(vision, 'attn_pool', None) else ''}: "
                "the cls/patch experiments need 'tok' (cls token) pooling"
            )
        if not (hasattr(vision, "_embeds") and hasattr(vision, "_pool")):
            raise ValueError(
                "this open_clip version's VisionTransformer has no _embeds/_pool methods; "
                "the pooling experiments need open_clip >= 2.24"
            )
        _need_head(head, vision)
        return _OpenClipViT(vision, head)
    raise ValueError(
        f"the cls/patch pooling experiments are undefined for {type(vision).__name__}: they "
        "need a plain stack of blocks over [cls, patches] with the head reading cls alone "
        "(timm VisionTransformer / DeiT with global_pool='token', open_clip ViT towers). "
        "Swin, PiT, CaiT, ConViT, CoaT, Twins and CNNs are not supported"
    )


def _check_timm(model: nn.Module) -> None:
    name = type(model).__name__
    if getattr(model, "cls_token", None) is None:
        raise ValueError(
            f"this {name} has no cls token (class_token=False): isolating cls and the patch "
            "head are undefined without one"
        )
    if getattr(model, "attn_pool", None) is not None or model.global_pool != "token":
        raise ValueError(
            f"this {name} pools with global_pool={model.global_pool!r}: the experiments "
            "need token (cls) pooling, global_pool='token'"
        )


def _need_head(head: Head | None, vision: nn.Module) -> None:
    if head is None:
        raise ValueError(
            f"{type(vision).__name__} outputs image embeddings, not class logits: pass "
            "head=... (a classifier or a zero-shot head mapping embeddings to logits, e.g. "
            "lambda e: F.normalize(e, dim=-1) @ text_features.T)"
        )
    if not callable(head):
        raise TypeError(f"head must be callable, got {type(head).__name__}")


class _Counts:
    """Top-1 / top-5 hit counts, optionally per position."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.top1 = torch.zeros(shape, dtype=torch.long)
        self.top5 = torch.zeros(shape, dtype=torch.long)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits`` (B, ..., K) against ``labels`` (B,)."""
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        target = labels.view(-1, *([1] * (top.dim() - 1)))
        self.top1 += (top[..., 0] == target[..., 0]).sum(0).cpu()
        self.top5 += (top == target).any(-1).sum(0).cpu()

    def accuracy(self, total: int) -> Accuracy:
        return Accuracy(100.0 * int(self.top1) / total, 100.0 * int(self.top5) / total)


def _check_sweep(values: Iterable[int] | None, depth: int, name: str) -> list[int]:
    if values is None:
        return list(range(depth + 1))
    if isinstance(values, int):
        values = [values]
    values = list(values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be ints (numbers of blocks), got {value!r}")
        if not 0 <= value <= depth:
            raise ValueError(
                f"{name}={value} is out of range: the model has {depth} blocks (0..{depth})"
            )
    return sorted(set(values))


def _batch(item: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from a ``(images, labels, ...)`` sequence or a mapping with
    ``image(s)`` / ``label(s)`` keys (as the zoo's SyntheticScenes batches)."""
    if isinstance(item, Mapping):
        images = item.get("image", item.get("images"))
        labels = item.get("label", item.get("labels"))
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        images, labels = item[0], item[1]
    else:
        images = labels = None
    if images is None or labels is None:
        raise TypeError(
            "accuracy_experiments needs batches of (images, labels) or dicts with 'image' "
            f"and 'label' keys; got {type(item).__name__}"
        )
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise TypeError("labels must be an integer tensor (B,) of class indices")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must have shape ({images.shape[0]},) for {images.shape[0]} images, "
            f"got {tuple(labels.shape)}"
        )
    return images, labels


@torch.no_grad()
def run_pooling_experiments(
    pipeline: _TokenPipeline,
    dataloader: Iterable,
    *,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    grid: Callable[[torch.Tensor], tuple[int, int]],
    isolate: Iterable[int] | None,
    tear: Iterable[int] | None,
) -> PoolingReport:
    """Run every experiment on every batch. ``prepare`` checks, moves and normalizes a
    [0, 1] image batch; ``grid`` gives the patch grid for that batch."""
    depth = len(pipeline.blocks)
    isolate = _check_sweep(isolate, depth, "isolate")
    tear = _check_sweep(tear, depth, "tear")
    natural = _Counts()
    isolated = {n: _Counts() for n in isolate}
    torn = {n: _Counts() for n in tear}
    patches: _Counts | None = None
    patch_grid: tuple[int, int] | None = None
    total = 0
    p = pipeline.num_prefix
    for item in dataloader:
        images, labels = _batch(item)
        x = prepare(images)
        labels = labels.to(x.device)
        h, w = grid(images)
        if patch_grid is None:
            patch_grid, patches = (h, w), _Counts((h * w,))
        elif (h, w) != patch_grid:
            raise ValueError(
                f"all batches must have one image size (patch grid {patch_grid}), got a "
                f"batch with grid {(h, w)}"
            )
        tokens = pipeline.embed(x)
        if tokens.shape[1] != p + h * w:
            raise ValueError(
                f"expected {p} prefix + {h * w} patch tokens, got {tokens.shape[1]} tokens"
            )
        # Natural pass, keeping the prefix after each block for the tear sweep.
        state, prefixes = tokens, {0: tokens[:, :p]}
        for index in range(depth):
            state = pipeline.block(index, state)
            prefixes[index + 1] = state[:, :p]
        logits = pipeline.logits(state)
        _check_labels(labels, logits.shape[-1])
        natural.add(logits, labels)
        patch_logits = pipeline.token_logits(state[:, p:].reshape(-1, state.shape[-1]))
        patches.add(patch_logits.view(x.shape[0], h * w, -1), labels)
        for n in tear:
            torn[n].add(pipeline.logits(_run(pipeline, prefixes[n], n, depth)), labels)
        # Isolation: prefix and patches each alone through the first n blocks.
        alone_prefix, alone_patches = tokens[:, :p], tokens[:, p:]
        for n in range(max(isolate, default=-1) + 1):
            if n in isolated:
                merged = torch.cat([alone_prefix, alone_patches], dim=1)
                isolated[n].add(pipeline.logits(_run(pipeline, merged, n, depth)), labels)
            if n < depth:
                alone_prefix = pipeline.block(n, alone_prefix)
                alone_patches = pipeline.block(n, alone_patches)
        total += x.shape[0]
    if total == 0:
        raise ValueError("the dataloader yielded no images")
    return _report(natural, isolated, torn, patches, patch_grid, depth, total)


def _run(pipeline: _TokenPipeline, x: torch.Tensor, start: int, depth: int) -> torch.Tensor:
    for index in range(start, depth):
        x = pipeline.block(index, x)
    return x


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) for a head with "
            f"{num_classes} outputs, got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def _report(
    natural: _Counts,
    isolated: dict[int, _Counts],
    torn: dict[int, _Counts],
    patches: _Counts,
    grid: tuple[int, int],
    depth: int,
    total: int,
) -> PoolingReport:
    top1 = 100.0 * patches.top1.double() / total
    top5 = 100.0 * patches.top5.double() / total
    # Best position by top-1, ties broken by top-5.
    best = int(torch.argmax(patches.top1 * (total + 1) + patches.top5))
    h, w = grid
    return PoolingReport(
        natural=natural.accuracy(total),
        isolated_cls={n: c.accuracy(total) for n, c in isolated.items()},
        patch_average=Accuracy(float(top1.mean()), float(top5.mean())),
        patch_max=Accuracy(float(top1[best]), float(top5[best])),
        patch_max_position=(best // w, best % w),
        patch_accuracy=top1.float().view(h, w),
        patch_accuracy_top5=top5.float().view(h, w),
        tear={n: c.accuracy(total) for n, c in torn.items()},
        depth=depth,
        num_images=total,
    )
