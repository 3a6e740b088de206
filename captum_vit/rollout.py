"""AttentionRollout: how much each patch flows into the output token through all blocks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from ._base import checks_unit_range
from .capture import HookSet, _as_the_user_sees, _StopForward, find_module, preserved_state
from .layout import TokenLayout, resolve_layout, upsample_to_image
from .models import (
    ImageModel,
    check_images,
    fixed_input_size,
    model_device,
    patch_tiling,
    user_layer_path,
)

__all__ = ["AttentionRollout"]

HEAD_FUSIONS = ("mean", "max", "min")

#: Attention over windows of tokens: its matrices are not over the image's token sequence.
_WINDOWED = {
    "WindowAttention",
    "WindowAttentionGlobal",
    "LocallyGroupedAttn",
    "SwinSelfAttention",
    "SwinAttention",
    "Swinv2SelfAttention",
    "Swinv2Attention",
}
#: Attention whose queries are pooled / learned / class tokens, not the token sequence.
_POOLED = {
    "AttentionPoolLatent",
    "AttentionPool2d",
    "AttentionalPooler",
    "ClassAttn",
    "MultiheadAttentionPoolingHead",
}
_ATTENTION_NAME = re.compile(r"Attention|Attn|^(GPSA|MHSA)$")
#: Modules defining timm's plain ``Attention`` (``vision_transformer`` in older timm).
#: Other timm modules define classes of the same name with a different computation
#: (BEiT's relative position bias, SAM's decomposed relative positions), so the name alone
#: does not tell.
_TIMM_PLAIN_ATTENTION = ("timm.layers.attention", "timm.models.vision_transformer")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * d)`` -> ``(B, heads, N, d)``."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _fused_qk(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ``(B, heads, N, d)`` from the first two thirds of a fused qkv projection
    (``bias``: of the whole projection, or of q and k only)."""
    width = weight.shape[0] // 3
    qk = F.linear(x, weight[: 2 * width], None if bias is None else bias[: 2 * width])
    q, k = (_split_heads(t, heads) for t in qk.split(width, dim=-1))
    return q, k


def _q_k_biases(module: nn.Module) -> torch.Tensor | None:
    """BEiT / EVA keep q and k biases apart from their bias-free ``qkv`` (k's is zero)."""
    return None if module.q_bias is None else torch.cat((module.q_bias, module.k_bias))


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention probabilities ``(B, heads, N, N)`` from ``(B, heads, N, d)``, with
    an additive bias on the logits (relative position bias) if given."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits, dim=-1)


def _refuse_mask(name: str, kwargs: dict, args: tuple, position: int) -> None:
    mask = kwargs.get("attn_mask", args[position] if len(args) > position else None)
    if mask is not None:
        raise ValueError(
            f"attention {name!r} runs with an attention mask: rollout needs plain self-attention"
        )


def _timm_attention(module: nn.Module, name: str, qkv: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` (ViT, DeiT, DINOv2, ...): q and k read from the output of its own
    fused ``qkv`` projection (a forward hook on ``attn.qkv``: nothing is recomputed)."""
    width = module.num_heads * module.head_dim
    q, k, _ = (_split_heads(t, module.num_heads) for t in qkv.split(width, dim=-1))
    return _probabilities(module.q_norm(q), module.k_norm(k), module.scale)


def _eva_attention(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """timm ``EvaAttention`` (EVA-02, DINOv3) and ``AttentionRope`` (Perception Encoder,
    the RoPE ViTs): q and k from a fused ``qkv`` (EVA keeps the q / k biases apart) or
    separate projections, their norms, the rotary embedding its block passes (``rope``,
    the second argument) on the patch tokens, and key heads shared by groups of query heads
    (``AttentionRope``'s ``num_kv_heads``)."""
    from timm.layers import apply_rot_embed_cat

    _refuse_mask(name, kwargs, args, 2)
    x = args[0]
    heads = module.num_heads
    if module.qkv is not None:
        bias = _q_k_biases(module) if hasattr(module, "q_bias") else module.qkv.bias
        q, k = _fused_qk(x, module.qkv.weight, bias, heads)
    else:
        q = _split_heads(module.q_proj(x), heads)
        k = _split_heads(module.k_proj(x), getattr(module, "num_kv_heads", heads))
    q, k = module.q_norm(q), module.k_norm(k)
    rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
    if rope is not None:
        npt = module.num_prefix_tokens
        half = getattr(module, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2)
    k = k.repeat_interleave(getattr(module, "num_kv_groups", 1), dim=1)
    return _probabilities(q, k, module.scale)


def _gemma4_attention(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """timm Gemma 4's ``Gemma4Attention``: separate q / k projections, their RMS norms, the
    2-D rotary embedding its block passes (``rope_cos``, ``rope_sin``), key heads shared by
    groups of query heads, and no logit scaling (the norms set the scale)."""
    from timm.models.gemma4_vit import apply_multidimensional_rope

    _refuse_mask(name, kwargs, args, 3)
    x = args[0]
    cos = kwargs.get("rope_cos", args[1] if len(args) > 1 else None)
    sin = kwargs.get("rope_sin", args[2] if len(args) > 2 else None)
    batch, tokens, _ = x.shape

    def rotated(proj: nn.Module, norm: nn.Module, heads: int) -> torch.Tensor:
        projected = norm(proj(x).view(batch, tokens, heads, module.head_dim))
        return apply_multidimensional_rope(projected, cos, sin, ndim=2, unsqueeze_dim=2)

    q = rotated(module.q_proj, module.q_norm, module.num_heads).transpose(1, 2)
    k = rotated(module.k_proj, module.k_norm, module.num_kv_heads).transpose(1, 2)
    return _probabilities(q, k.repeat_interleave(module.num_kv_groups, dim=1), 1.0)


def _beit_attention(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """timm BEiT ``Attention``: q / k biases, its own relative position bias and the one
    its model shares across blocks (``use_shared_rel_pos_bias``), both added to the
    logits."""
    q, k = _fused_qk(args[0], module.qkv.weight, _q_k_biases(module), module.num_heads)
    logit_bias = None
    if module.relative_position_bias_table is not None:
        logit_bias = module._get_rel_pos_bias()
    shared = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)
    if shared is not None:
        logit_bias = shared if logit_bias is None else logit_bias + shared
    return _probabilities(q, k, module.scale, logit_bias)


def _convit_gpsa(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """timm ConViT ``GPSA``: per head, a learned gate mixes content attention with
    attention over relative positions; rows renormalized (``GPSA.get_attention`` without
    its dropout)."""
    x = args[0]
    batch, tokens, width = x.shape
    heads = module.num_heads
    q, k = (_split_heads(t, heads) for t in module.qk(x).split(width, dim=-1))
    content = _probabilities(q, k, module.scale)
    relative = module.rel_indices
    if relative.shape[1] != tokens:  # GPSA computes them in its own forward, after this
        relative = module.get_rel_indices(tokens)
    positional = module.pos_proj(relative.expand(batch, -1, -1, -1)).permute(0, 3, 1, 2)
    gate = torch.sigmoid(module.gating_param.float()).view(1, -1, 1, 1)
    mixed = (1.0 - gate) * content + gate * torch.softmax(positional.float(), dim=-1)
    return mixed / mixed.sum(dim=-1, keepdim=True)


def _convit_mhsa(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """timm ConViT ``MHSA``: plain self-attention from a fused ``qkv`` projection."""
    q, k = _fused_qk(args[0], module.qkv.weight, module.qkv.bias, module.num_heads)
    return _probabilities(q, k, module.scale)


def _torch_multihead(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """``nn.MultiheadAttention`` as open_clip's towers use it (self-attention)."""
    _refuse_mask(name, kwargs, args, 4)
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if key is not query:
        raise ValueError(f"attention {name!r} is cross-attention: rollout needs self-attention")
    x = query if module.batch_first else query.transpose(0, 1)
    q, k = _fused_qk(x, module.in_proj_weight, module.in_proj_bias, module.num_heads)
    return _probabilities(q, k, module.head_dim**-0.5)


def _hf_attention(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Hugging Face self-attention with ``q_proj`` / ``k_proj`` (ViT, DeiT, DINOv2, CLIP,
    SigLIP, BEiT). Its ``attention_mask`` is an additive bias on the logits, as the
    models' own attention functions add it (BEiT passes its relative position bias
    there)."""
    x = args[0] if args else kwargs["hidden_states"]
    bias = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.is_floating_point()):
        raise ValueError(
            f"attention {name!r} runs with a {type(bias).__name__} attention mask, not an "
            "additive bias: rollout needs every token to attend to every token"
        )
    if bias is not None:
        bias = bias[..., : x.shape[-2]]  # as the attention functions slice it to the keys
    head_dim = module.head_dim
    q, k = module.q_proj, module.k_proj
    heads = q.weight.shape[0] // head_dim
    q = _split_heads(F.linear(x, q.weight, q.bias), heads)
    k = _split_heads(F.linear(x, k.weight, k.bias), heads)
    scale = getattr(module, "scaling", getattr(module, "scale", head_dim**-0.5))
    return _probabilities(q, k, scale, bias)


def _register(
    hooks: HookSet,
    module: nn.Module,
    name: str,
    reader: Callable[..., torch.Tensor],
    on_probs: Callable,
) -> None:
    """Hook ``module`` so that ``on_probs(probabilities)`` runs when its attention runs."""
    if reader is _timm_attention:

        def qkv_hook(_linear: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            on_probs(reader(module, name, output))

        hooks.forward(module.qkv, qkv_hook)
        return

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        on_probs(reader(module, name, args, kwargs))

    hooks.pre_forward(module, pre_hook, with_kwargs=True)


def _reader(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The function computing this module's attention probabilities, if it has one."""
    kind = type(module)
    if isinstance(module, nn.MultiheadAttention):
        return _torch_multihead
    if kind.__module__ in _TIMM_PLAIN_ATTENTION and kind.__name__ == "Attention":
        if hasattr(module, "qkv") and hasattr(module, "q_norm"):
            return _timm_attention
    if kind.__module__ == "timm.models.beit" and kind.__name__ == "Attention":
        return _beit_attention
    if kind.__module__ == "timm.models.convit":
        return {"GPSA": _convit_gpsa, "MHSA": _convit_mhsa}.get(kind.__name__)
    if kind.__name__ == "EvaAttention":
        return _eva_attention
    if kind.__module__ == "timm.models.gemma4_vit" and kind.__name__ == "Gemma4Attention":
        return _gemma4_attention
    if kind.__module__ in _TIMM_PLAIN_ATTENTION and kind.__name__ == "AttentionRope":
        return _eva_attention
    if kind.__module__.startswith("transformers.") and all(
        isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj")
    ):
        if hasattr(module, "head_dim"):
            return _hf_attention
    return None


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or bool(
        _ATTENTION_NAME.search(type(module).__name__)
    )


def _attention_modules(vision: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules in definition order: the innermost ones, except that a pooling or
    windowed attention stands for everything inside it (open_clip's attention pooler wraps
    an ``nn.MultiheadAttention``)."""
    found = [(name, module) for name, module in vision.named_modules() if _is_attention(module)]
    kept = []
    for name, module in found:
        inside = [other for other, _ in found if name.startswith(other + ".")]
        if any(_pooled_or_windowed(other, dict(found)[other]) for other in inside):
            continue
        contains = any(other.startswith(name + ".") for other, _ in found)
        if contains and not _pooled_or_windowed(name, module):
            continue
        kept.append((name, module))
    return kept


def _pooled(name: str, module: nn.Module) -> bool:
    kind = type(module).__name__
    # "pool" in the class name: SigLIP's SiglipMultiheadAttentionPoolingHead and the like
    return kind in _POOLED or "pool" in kind.lower() or "pool" in name.rsplit(".", 1)[-1].lower()


def _pooled_or_windowed(name: str, module: nn.Module) -> bool:
    return _pooled(name, module) or type(module).__name__ in _WINDOWED


def _refusal(name: str, module: nn.Module) -> str | None:
    """Why this attention module cannot be rolled out (None if it can); ``name`` is the
    module's path as the user names it."""
    kind = type(module).__name__
    if kind in _WINDOWED:
        return (
            f"{name!r} ({kind}) attends within windows of tokens (shifted and padded in Swin): "
            "its attention matrices are not over the image's token sequence, so they cannot "
            "be multiplied across blocks"
        )
    if _pooled(name, module):
        return (
            f"{name!r} ({kind}) is a pooling attention whose queries are learned or class "
            "tokens, not the token sequence: it has no token-to-token matrix to roll out"
        )
    if _reader(module) is None:
        inside = [
            f"{name}.{inner}" if name else inner
            for inner, attention in _attention_modules(module)
            if inner and _reader(attention) is not None
        ]
        if inside:
            return f"{name!r} ({kind}) is not an attention module but holds one: pass " + ", ".join(
                repr(path) for path in inside
            )
        if not _is_attention(module):
            return (
                f"{name!r} ({kind}) is not an attention module: pass the blocks' attention "
                "modules (layers=None rolls out all of them)"
            )
        return (
            f"{name!r} ({type(module).__module__}.{kind}) is an attention type "
            "AttentionRollout cannot read (supported: timm Attention (ViT, DeiT, DINOv2), "
            "EvaAttention, AttentionRope (Perception Encoder, Qwen3-VL, DeepSeek), Gemma 4's "
            "Gemma4Attention, BEiT's Attention, ConViT's GPSA / MHSA, nn.MultiheadAttention "
            "as in open_clip, Hugging Face ViT / DeiT / DINOv2 / CLIP self-attention)"
        )
    return None


class AttentionRollout(Attribution):
    """Attention rollout (Abnar and Zuidema, 2020): how much each patch token flows into
    the output token through the attention of every block.

    Per block the heads' attention probabilities are fused (mean by default, or max /
    min), optionally the weakest links are discarded, the residual connection is added
    as ``0.5 * A + 0.5 * I`` and the rows are renormalized; the rollout is the product of
    these matrices from the first block to the last. The map is the rollout's row of the
    cls token (the mean over rows for models without a cls token), with the prefix
    columns (cls / dist / registers) dropped, on the patch grid.

    Attention probabilities are computed from each block's own queries and keys (read
    from the attention module's input, with its own projections, norms and rotary
    embedding), so it works under timm's fused attention without touching ``fused_attn``.
    Supported: timm ViT / DeiT / DINOv2 (registers) / EVA / Perception Encoder, the RoPE
    ViTs and the Qwen3-VL, DeepSeek and Gemma 4 vision encoders (rotary embedding
    included) / BEiT (relative position bias included) / ConViT (gated positional
    attention; the cls token, which joins after the GPSA blocks, passes through them
    unchanged), open_clip towers, Hugging Face ViT / DeiT / DINOv2 / CLIP. Windowed attention (Swin), pooling attention (attention
    pool, CaiT class attention) and unknown attention types raise a ``ValueError``.

    Args:
        model: the image model (an open_clip CLIP model is reduced to its vision tower).
        layers: the attention modules to roll out (modules or dotted paths, in forward
            order); ``None`` uses every self-attention module of the model.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: share in [0, 1) of each row's fused attention weights, the
            smallest ones, set to zero before the identity is added.
        mean, std, image_size: override the model's own normalization / input size.
            Images passed to :meth:`attribute` are RGB in [0, 1].

    Examples::

        >>> rollout = AttentionRollout(model)
        >>> maps = rollout.attribute(images)                    # (B, h, w)
        >>> up = rollout.attribute(images, interpolate=True)    # (B, H, W)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module | str] | None = None,
        *,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        self.wrapped = ImageModel(model, mean=mean, std=std, image_size=image_size)
        Attribution.__init__(self, self.wrapped)
        self.vision = self.wrapped.model
        self._given = model
        self.head_fusion = _check_fusion(head_fusion)
        self.discard_ratio = _check_discard(discard_ratio)
        self.layers = self._select_layers(layers)
        self._fixed_size = fixed_input_size(self.vision)
        self._layouts: dict[tuple[int, int], TokenLayout] = {}

    def _select_layers(
        self, layers: Sequence[nn.Module | str] | None
    ) -> list[tuple[str, nn.Module, Callable[..., torch.Tensor]]]:
        if layers is None:
            prefix = getattr(self.vision, "image_prefix", "")  # CLIPModel: skip its text tower
            candidates = [
                (n, m) for n, m in _attention_modules(self.vision) if n.startswith(prefix)
            ]
            refusals = {n: _refusal(self._user_path(n), m) for n, m in candidates}
            usable = [(n, m) for n, m in candidates if refusals[n] is None]
            blocking = [refusals[n] for n, m in candidates if refusals[n] and not _pooled(n, m)]
            if blocking or not usable:
                raise ValueError(
                    f"cannot roll out the attention of {_as_the_user_sees(self.vision)[0]}: "
                    + ("; ".join(blocking) if blocking else "no self-attention modules found")
                )
        else:
            if isinstance(layers, (str, nn.Module)):
                layers = [layers]
            usable = [find_module(self.vision, layer) for layer in layers]
            for name, module in usable:
                problem = _refusal(self._user_path(name), module)
                if problem:
                    raise ValueError(f"cannot roll out the given layers: {problem}")
            if not usable:
                raise ValueError("layers is empty: give at least one attention module")
        return [(name, module, _reader(module)) for name, module in usable]

    def _user_path(self, name: str) -> str:
        """A path in ``self.vision`` as the user names it in the model they passed."""
        return user_layer_path(self._given, name)

    def layout_for(self, images: torch.Tensor) -> TokenLayout:
        """Token layout at the last rolled-out attention's input, for this image size: the
        token sequence the maps are read from."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size not in self._layouts:
            probe = self.wrapped.normalize(images[:2].detach())
            self._layouts[size] = resolve_layout(
                self.vision, self.layers[-1][0], probe, attribute_to_layer_input=True
            )
        return self._layouts[size]

    @checks_unit_range
    def attribute(
        self,
        inputs: torch.Tensor,
        *,
        head_fusion: str | None = None,
        discard_ratio: float | None = None,
        row: str | int | None = None,
        interpolate: bool = False,
        interpolate_mode: str = "bilinear",
    ) -> torch.Tensor:
        """Attention-rollout maps for a batch of images.

        Args:
            inputs: ``(B, 3, H, W)`` RGB images in [0, 1].
            head_fusion: override the fusion given at construction.
            discard_ratio: override the discard ratio given at construction.
            row: which row of the rollout to read: ``"cls"`` (default when the model has
                a cls token), ``"mean"`` (mean over all rows; default otherwise) or a token
                index (``1`` is DeiT's distillation token).
            interpolate: upsample the maps to the input size ``(B, H, W)``, as
                ``LayerAttribution.interpolate`` does (on an image that is not a whole
                number of patches, onto the pixels the patches cover; see
                :meth:`PatchActivationMap.attribute`).
            interpolate_mode: mode of ``torch.nn.functional.interpolate``.

        Returns:
            ``(B, h, w)`` maps (``(B, H, W)`` with ``interpolate=True``), float, detached,
            on the model's device. Every row of the rollout sums to 1, so a map sums to at
            most 1 (the rest flows from the prefix tokens).

        Raises:
            ValueError: invalid images, an unknown fusion, a discard ratio outside [0, 1),
                an invalid row, or blocks whose token count differs (pooling between
                blocks).
        """
        fusion = _check_fusion(self.head_fusion if head_fusion is None else head_fusion)
        discard = _check_discard(self.discard_ratio if discard_ratio is None else discard_ratio)
        check_images(inputs, size=self._fixed_size, in_unit_range=False)  # @checks_unit_range
        images = inputs.to(model_device(self.vision))
        layout = self.layout_for(images)
        steps = self._steps(self.wrapped.normalize(images), fusion, discard)
        steps = _on_one_sequence(steps, [name for name, _, _ in self.layers], layout)
        weights = _row_weights(row, layout, steps[0])
        h, w = layout.grid
        maps = _read_rollout(steps, weights)[:, layout.num_prefix_tokens :].reshape(-1, h, w)
        if interpolate:
            size = tuple(images.shape[-2:])
            tiling = patch_tiling(self.vision, size)
            maps = upsample_to_image(maps.unsqueeze(1), size, tiling, interpolate_mode)[:, 0]
        return maps

    def _steps(self, normalized: torch.Tensor, fusion: str, discard: float) -> list[torch.Tensor]:
        """One ``(B, N, N)`` rollout step per rolled-out block, in forward order."""
        steps: list[torch.Tensor] = []
        last = len(self.layers) - 1

        def collector(name: str):
            def on_probs(probs: torch.Tensor) -> None:
                steps.append(_residual_step(_fuse(probs, fusion), discard))
                if len(steps) > last:
                    raise _StopForward

            return on_probs

        with preserved_state(self.vision), torch.no_grad(), HookSet() as hooks:
            for name, module, reader in self.layers:
                _register(hooks, module, name, reader, collector(name))
            try:
                self.vision(normalized)
            except _StopForward:
                pass
        if len(steps) != len(self.layers):
            raise RuntimeError(
                f"only {len(steps)} of {len(self.layers)} attention modules ran in the forward"
            )
        return steps


def _on_one_sequence(
    steps: list[torch.Tensor], names: list[str], layout: TokenLayout
) -> list[torch.Tensor]:
    """The steps over the token sequence of the last rolled-out block (``layout``).

    A block that ran before the model added its prefix tokens (ConViT concatenates its
    cls token after the GPSA blocks) attends over the patch tokens only: in the product
    the prefix tokens pass through it unchanged. Any other change of token count between
    blocks is pooling, which rollout cannot follow.
    """
    tokens = steps[-1].shape[-1]
    prefix = layout.num_prefix_tokens
    patches_only = True
    aligned = []
    for name, step in zip(names, steps, strict=True):
        count = step.shape[-1]
        if count == tokens:
            patches_only = False
            aligned.append(step)
        elif patches_only and prefix and count == tokens - prefix:
            aligned.append(_pass_prefix_through(step, prefix))
        else:
            raise ValueError(
                f"attention {name!r} works on {count} tokens but {names[-1]!r} on {tokens}: "
                "rollout needs one token sequence through all rolled-out blocks (no pooling "
                "between them); roll out the blocks of one stage with layers=[...]"
            )
    return aligned


def _pass_prefix_through(step: torch.Tensor, prefix: int) -> torch.Tensor:
    """``(B, n, n)`` -> ``(B, prefix + n, prefix + n)``: identity on the new first
    ``prefix`` tokens, ``step`` on the rest."""
    batch, count, _ = step.shape
    full = step.new_zeros(batch, prefix + count, prefix + count)
    full[:, :prefix, :prefix] = torch.eye(prefix, dtype=step.dtype, device=step.device)
    full[:, prefix:, prefix:] = step
    return full


def _read_rollout(steps: list[torch.Tensor], row: torch.Tensor) -> torch.Tensor:
    """``row @ A_L @ ... @ A_1`` for ``(B, N)`` row weights: the chosen row of the rollout
    ``A_L ... A_1`` without forming the ``N x N`` product (``L N^2`` instead of ``L N^3``)."""
    vector = row.unsqueeze(1)
    for step in reversed(steps):
        vector = vector @ step
    return vector.squeeze(1)


def _check_fusion(head_fusion: str) -> str:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    return head_fusion


def _check_discard(discard_ratio: float) -> float:
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)):
        raise TypeError(f"discard_ratio must be a float, got {type(discard_ratio).__name__}")
    if not 0.0 <= discard_ratio < 1.0 or math.isnan(discard_ratio):
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    return float(discard_ratio)


def _fuse(probs: torch.Tensor, fusion: str) -> torch.Tensor:
    """``(B, heads, N, N)`` -> ``(B, N, N)``."""
    if fusion == "mean":
        return probs.mean(dim=1)
    if fusion == "max":
        return probs.amax(dim=1)
    return probs.amin(dim=1)


def _residual_step(fused: torch.Tensor, discard: float) -> torch.Tensor:
    """Discard the weakest links, add the residual path, renormalize the rows."""
    tokens = fused.shape[-1]
    count = int(tokens * discard)
    if count:
        weakest = fused.topk(count, dim=-1, largest=False).indices
        fused = fused.scatter(-1, weakest, 0.0)
    step = 0.5 * fused
    step.diagonal(dim1=-2, dim2=-1).add_(0.5)  # + 0.5 * I, without building I
    return step / step.sum(dim=-1, keepdim=True)


def _row_weights(row: str | int | None, layout: TokenLayout, step: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` weights of the rollout rows to read: one-hot, or uniform for ``"mean"``."""
    batch, tokens = step.shape[0], step.shape[-1]
    if row is None:
        row = "cls" if "cls" in layout.prefix_names else "mean"
    if row == "mean":
        return step.new_full((batch, tokens), 1.0 / tokens)
    if row == "cls":
        if "cls" not in layout.prefix_names:
            raise ValueError(
                "this model has no cls token at the rolled-out blocks "
                f"(prefix tokens: {layout.prefix_names or 'none'}): use row='mean' or an index"
            )
        row = layout.prefix_names.index("cls")
    if isinstance(row, bool) or not isinstance(row, int):
        raise TypeError(f"row must be 'cls', 'mean' or an int, got {type(row).__name__}")
    if not -tokens <= row < tokens:
        raise ValueError(f"row {row} is out of range for {tokens} tokens")
    weights = step.new_zeros(batch, tokens)
    weights[:, row] = 1.0
    return weights
