"""The paper's spatial-information experiments (Ghiasi et al. 2022, section 4, Table 1):
:func:`pooling_experiments`.

The experiments re-run the model's own modules in another order -- never editing the
model -- through a small adapter per model family (:class:`_TokenPipeline`):

* ``embed(images)``: normalized images -> ``(B, N, C)`` tokens, prefix tokens first;
* ``block(i, x)``: block ``i`` on a batch-first token sequence of any length;
* ``logits(x)``: the model's final norm, token pooling and head on a sequence that starts
  with the prefix tokens (the other tokens are never read);
* ``token_logits(t, p)``: the same head applied to single ``(B, C)`` token features.

Which tokens are the prefix and how the patches lie on the grid comes from the last
block's measured :class:`~captum_vit.layout.TokenLayout`, the package's one definition of
token order.

Supported: timm ``VisionTransformer`` (and DeiT-distilled) with a cls token and token
pooling, torchvision ``VisionTransformer``, Hugging Face ViT / DeiT classifiers, open_clip ``VisionTransformer`` towers with ``'tok'`` pooling and an open_clip
tower around such a timm trunk; the last two output embeddings, so a classifier or
zero-shot head must be passed. Other architectures raise ``ValueError``: the experiments
need a cls token that alone feeds the head and a plain stack of blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .._accuracy import TopKCounter
from .._batches import as_batch_stream, unpack_batch
from .._progress import progress, resolve_progress
from ..capture import module_name, preserved_state, user_class_name
from ..layout import TokenLayout, resolve_layout
from ..models import (
    ImageModel,
    _is_torchvision_vit,
    check_embedding_head,
    check_head_callable,
    check_images,
    fixed_input_size,
    model_device,
)
from .reports import Accuracy, PoolingReport

__all__ = ["pooling_experiments", "token_pipeline"]

Head = Callable[[torch.Tensor], torch.Tensor]


class _TokenPipeline:
    blocks: Sequence[nn.Module]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[index](x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_logits(self, tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """Head applied to ``(B, C)`` token features: each fills every one of the
        ``num_prefix`` prefix slots, so the token pooling (which reads only the prefix)
        sees it alone."""
        return self.logits(tokens[:, None].expand(-1, num_prefix, -1))


class _TimmViT(_TokenPipeline):
    def __init__(self, model: nn.Module, head: Head | None) -> None:
        self.model = model
        self.head = head
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


class _HFViT(_TokenPipeline):
    """A Hugging Face ViT / DeiT image classifier: its head reads the final layer norm's
    cls token (and, for DeiT with a teacher head, the distillation token, averaged)."""

    def __init__(self, model: nn.Module, head: Head | None, image_size: tuple[int, int]) -> None:
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.head = head
        self.blocks = list(_hf_layers(self.base))
        self.image_size = image_size  # the config's: another size interpolates

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        other_size = tuple(x.shape[-2:]) != self.image_size
        return self.base.embeddings(x, interpolate_pos_encoding=other_size)

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks[index](x)
        return out[0] if isinstance(out, tuple) else out  # older transformers: a tuple

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base.layernorm(x)
        if self.head is not None:
            return self.head(x[:, 0])
        if hasattr(self.model, "cls_classifier"):  # DeiTForImageClassificationWithTeacher
            cls = self.model.cls_classifier(x[:, 0])
            return (cls + self.model.distillation_classifier(x[:, 1])) / 2
        return self.model.classifier(x[:, 0])


class _TorchvisionViT(_TokenPipeline):
    """torchvision's ``VisionTransformer``: a class token, a plain stack of encoder blocks,
    the final layer norm and ``heads`` reading the class token."""

    def __init__(self, model: nn.Module, head: Head | None) -> None:
        self.model = model
        self.head = head
        self.blocks = list(model.encoder.layers)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        patches = m._process_input(x)
        tokens = torch.cat([m.class_token.expand(len(patches), -1, -1), patches], dim=1)
        return m.encoder.dropout(tokens + m.encoder.pos_embedding)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.model.encoder.ln(x)[:, 0]
        if self.head is None:
            return self.model.heads(cls)
        # the head replaces the last linear layer (after the optional pre-logits layer)
        return self.head(self.model.heads[:-1](cls))


#: Hugging Face classifiers whose head reads the cls token (and DeiT's distillation token).
_HF_CLS_CLASSIFIERS = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


def _hf_layers(base: nn.Module) -> nn.ModuleList:
    layers = getattr(base, "layers", None)
    return layers if layers is not None else base.encoder.layer


def _hf_pipeline(vision: nn.Module, head: Head | None) -> _TokenPipeline:
    model = getattr(vision, "model", None)
    name = type(model).__name__ if model is not None else "CLIPModel"  # its image tower
    if name not in _HF_CLS_CLASSIFIERS:
        raise ValueError(
            f"the cls/patch pooling experiments support Hugging Face {', '.join(_HF_CLS_CLASSIFIERS)} "
            f"(a head reading the cls token), not {name}: other heads pool differently "
            "(DINOv2's reads cls and the mean patch) or output embeddings (CLIP); load the "
            "weights into a timm VisionTransformer to run them"
        )
    check_head_callable(head)
    return _HFViT(model, head, vision.image_size)


def token_pipeline(vision: nn.Module, head: Head | None = None) -> _TokenPipeline:
    """The adapter for ``vision`` (an unwrapped vision model).

    Raises:
        ValueError: the model has no cls token feeding the head alone, or is not a plain
            stack of blocks (Swin, PiT, CaiT, ConViT, CNNs, average / attention pooling),
            or it outputs embeddings and no ``head`` was given.
    """
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    if getattr(vision, "image_prefix", None) is not None:  # a Hugging Face model
        return _hf_pipeline(vision, head)
    trunk = getattr(vision, "trunk", None)
    if isinstance(trunk, TimmVisionTransformer) and hasattr(vision, "head"):
        check_embedding_head(head, vision)
        tower_head = vision.head
        _check_timm(trunk)
        return _TimmViT(trunk, lambda features: head(tower_head(features)))
    if isinstance(vision, TimmVisionTransformer):
        _check_timm(vision)
        return _TimmViT(vision, head)
    if _is_torchvision_vit(vision):
        check_head_callable(head)
        return _TorchvisionViT(vision, head)
    if type(vision).__module__.startswith("open_clip") and hasattr(vision, "transformer"):
        if getattr(vision, "attn_pool", None) is not None:
            raise ValueError(
                "the open_clip tower pools through an attention pooler (learned queries "
                "over all tokens, as CoCa does): the cls/patch experiments need a head that "
                "reads the cls token alone (pool_type 'tok', no attentional pool)"
            )
        if getattr(vision, "pool_type", "") != "tok":
            raise ValueError(
                f"the open_clip tower pools with {getattr(vision, 'pool_type', '?')!r}: the "
                "cls/patch experiments need 'tok' (cls token) pooling"
            )
        if not (hasattr(vision, "_embeds") and hasattr(vision, "_pool")):
            raise ValueError(
                "this open_clip version's VisionTransformer has no _embeds/_pool methods; "
                "the pooling experiments need open_clip >= 2.24"
            )
        check_embedding_head(head, vision)
        return _OpenClipViT(vision, head)
    raise ValueError(
        f"the cls/patch pooling experiments are undefined for {user_class_name(vision)}: they "
        "need a plain stack of blocks over [cls, patches] with the head reading cls alone "
        "(timm VisionTransformer / DeiT with global_pool='token', open_clip ViT towers, "
        "Hugging Face ViT / DeiT classifiers, torchvision VisionTransformer). "
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


def pooling_experiments(
    model: nn.Module,
    dataloader: Iterable,
    *,
    isolate: Iterable[int] | int | None = None,
    tear: Iterable[int] | int | None = None,
    head: Head | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | Sequence[int] | None = None,
    show_progress: bool | None = None,
) -> PoolingReport:
    """The paper's Table 1 experiments (and the "tear" sweep) on labelled images.

    How much of the prediction rides on the cls token, and where the spatial information
    is: the natural accuracy; the cls token isolated from the patches for the first ``L``
    blocks; every patch token fed alone to the head (per position, their average and the
    best position); all patch tokens dropped after ``L`` blocks. The model's own modules
    are re-run in the needed order; the model is not edited and is left as it was found.

    Args:
        model: a timm ``VisionTransformer`` / DeiT with a cls token and token pooling, a
            torchvision ``VisionTransformer``, an open_clip ViT tower (or CLIP model) with ``'tok'`` pooling, a Hugging Face
            ``ViTForImageClassification`` / ``DeiTForImageClassification(WithTeacher)``,
            or an :class:`~captum_vit.models.ImageModel` around one.
        dataloader: iterable of ``(images, labels)`` batches or dicts with ``"image"`` and
            ``"label"``; images ``(B, 3, H, W)`` in ``[0, 1]`` of one size, labels ``(B,)``
            class indices.
        isolate: numbers of blocks ``L`` the cls token runs alone (``None``: every
            ``L`` in ``0..depth``; ``[]``: skip).
        tear: numbers of blocks ``L`` after which all patch tokens are dropped
            (``None``: every ``L`` in ``0..depth``; ``[]``: skip).
        head: maps the model's pooled features to logits. Needed for open_clip towers
            (a linear classifier or a zero-shot head on the image embedding); for timm,
            torchvision and Hugging Face classifiers it replaces the model's own head and
            gets the pre-logits features (the final norm's cls token; for torchvision
            after its optional pre-logits layer).
        mean, std, image_size: override the model's own normalization / input size.
        show_progress: a progress bar over batches; ``None`` (default): when stderr is a
            terminal.

    Returns:
        :class:`~captum_vit.locality.PoolingReport`, accuracies as top-1 / top-5
        percentages.

    Raises:
        ValueError: the experiment is undefined for this architecture (no cls token,
            average / attention pooling, Swin, PiT, CaiT...), an ``L`` out of range,
            bad images or labels, an empty dataloader.
        TypeError: batches without labels, non-integer ``L`` or labels.

    Examples::

        >>> report = captum_vit.pooling_experiments(model, loader, isolate=[0, 11], tear=[])
        >>> report.natural, report.isolated_cls[11], report.patch_average
    """
    wrapped = _image_model(model, mean, std, image_size)
    vision = wrapped.model
    pipeline = token_pipeline(vision, head)
    depth = len(pipeline.blocks)
    counts = _PoolingCounts(
        _check_sweep(isolate, depth, "isolate"), _check_sweep(tear, depth, "tear"), depth
    )
    batches = progress(
        as_batch_stream(dataloader),
        desc="pooling experiments",
        enabled=resolve_progress(show_progress),
        unit="batch",
    )
    layouts = _LastBlockLayouts(vision, module_name(vision, pipeline.blocks[-1]))
    fixed_size = fixed_input_size(vision)
    device = model_device(vision)
    with preserved_state(vision), torch.no_grad():
        for position, item in enumerate(batches):
            batch = unpack_batch(item, position, labels=True, purpose="pooling_experiments")
            check_images(batch.images, size=fixed_size)
            x = wrapped.normalize(batch.images.detach().to(device, torch.float32))
            counts.add(pipeline, layouts.of(x), x, batch.labels.to(device))
    return counts.report()


def _image_model(
    model: nn.Module,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    image_size: int | Sequence[int] | None,
) -> ImageModel:
    if isinstance(model, ImageModel) and mean is None and std is None and image_size is None:
        return model
    return ImageModel(model, mean=mean, std=std, image_size=image_size)


class _LastBlockLayouts:
    """The last block's token layout per input size (resolved once per size)."""

    def __init__(self, vision: nn.Module, last_block: str) -> None:
        self.vision = vision
        self.last_block = last_block
        self.layouts: dict[tuple[int, int], TokenLayout] = {}

    def of(self, normalized: torch.Tensor) -> TokenLayout:
        size = (int(normalized.shape[-2]), int(normalized.shape[-1]))
        if size not in self.layouts:
            self.layouts[size] = resolve_layout(self.vision, self.last_block, normalized[:1])
        return self.layouts[size]


def _check_sweep(values: Iterable[int] | int | None, depth: int, name: str) -> list[int]:
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


class _PoolingCounts:
    """Hit counts of every experiment, accumulated batch by batch."""

    def __init__(self, isolate: list[int], tear: list[int], depth: int) -> None:
        self.depth = depth
        self.natural = TopKCounter()
        self.isolated = {n: TopKCounter() for n in isolate}
        self.torn = {n: TopKCounter() for n in tear}
        self.patches: TopKCounter | None = None
        self.grid: tuple[int, int] | None = None

    def add(
        self,
        pipeline: _TokenPipeline,
        layout: TokenLayout,
        x: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """Run every experiment on one normalized batch ``x`` with its ``labels``."""
        self._check_grid(layout.grid)
        tokens = pipeline.embed(x)
        prefix, patches = layout.split_tokens(tokens)
        final, prefixes = _natural_pass(pipeline, layout, tokens)
        self.natural.add(pipeline.logits(final), labels)
        self._patch_head(pipeline, layout, final, labels)
        self._tear_sweep(pipeline, prefixes, labels)
        self._isolation_sweep(pipeline, layout, prefix, patches, labels)

    def _check_grid(self, grid: tuple[int, int]) -> None:
        if self.grid is None:
            self.grid = grid
            self.patches = TopKCounter(shape=(grid[0] * grid[1],))
        elif grid != self.grid:
            raise ValueError(
                f"all batches must have one image size (patch grid {self.grid}), got a "
                f"batch with grid {grid}"
            )

    def _patch_head(
        self,
        pipeline: _TokenPipeline,
        layout: TokenLayout,
        final: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """Every final patch token alone through the head, counted per position."""
        _, patches = layout.split_tokens(final)
        logits = pipeline.token_logits(patches.flatten(0, 1), layout.num_prefix_tokens)
        self.patches.add(logits.view(*patches.shape[:2], -1), labels)

    def _tear_sweep(
        self, pipeline: _TokenPipeline, prefixes: list[torch.Tensor], labels: torch.Tensor
    ) -> None:
        """All patch tokens dropped after ``n`` blocks: the prefix alone goes on."""
        for n, counter in self.torn.items():
            counter.add(pipeline.logits(_run_blocks(pipeline, prefixes[n], n)), labels)

    def _isolation_sweep(
        self,
        pipeline: _TokenPipeline,
        layout: TokenLayout,
        prefix: torch.Tensor,
        patches: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """Prefix and patches each alone through the first ``n`` blocks, then together."""
        for n in range(max(self.isolated, default=-1) + 1):
            if n in self.isolated:
                merged = layout.join_tokens(prefix, patches)
                self.isolated[n].add(pipeline.logits(_run_blocks(pipeline, merged, n)), labels)
            if n < self.depth:
                prefix = pipeline.block(n, prefix)
                patches = pipeline.block(n, patches)

    def report(self) -> PoolingReport:
        total = self.natural.total
        if total == 0:
            raise ValueError("the dataloader yielded no images")
        top1 = self.patches.top1_percent()
        top5 = self.patches.topk_percent()
        h, w = self.grid
        best = _best_position(self.patches)
        return PoolingReport(
            natural=_accuracy(self.natural),
            isolated_cls={n: _accuracy(c) for n, c in self.isolated.items()},
            patch_average=Accuracy(float(top1.mean()), float(top5.mean())),
            patch_max=Accuracy(float(top1[best]), float(top5[best])),
            patch_max_position=(best // w, best % w),
            patch_accuracy=top1.float().view(h, w),
            patch_accuracy_top5=top5.float().view(h, w),
            tear={n: _accuracy(c) for n, c in self.torn.items()},
            depth=self.depth,
            num_images=total,
        )


def _natural_pass(
    pipeline: _TokenPipeline, layout: TokenLayout, tokens: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's own forward over the blocks: the final tokens, and the prefix tokens
    before block 0 and after every block (``prefixes[n]``: after ``n`` blocks)."""
    state, prefixes = tokens, [layout.prefix_tokens(tokens)]
    for index in range(len(pipeline.blocks)):
        state = pipeline.block(index, state)
        prefixes.append(layout.prefix_tokens(state))
    return state, prefixes


def _run_blocks(pipeline: _TokenPipeline, x: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks ``start..depth-1`` on ``x``."""
    for index in range(start, len(pipeline.blocks)):
        x = pipeline.block(index, x)
    return x


def _accuracy(counter: TopKCounter) -> Accuracy:
    return Accuracy(float(counter.top1_percent()), float(counter.topk_percent()))


def _best_position(patches: TopKCounter) -> int:
    """The position with the best top-1, ties broken by top-5."""
    return int(torch.argmax(patches.top1 * (patches.total + 1) + patches.topk))
