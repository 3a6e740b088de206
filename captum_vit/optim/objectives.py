"""Objectives for feature visualization: what an image should excite.

An objective scores every row of a batch of layer activations. The primitives:

* :func:`channel` -- one unit, averaged over tokens (``token="patches"``: the mean over
  patch tokens, prefix tokens excluded: the paper's objective);
* :func:`neuron` -- one unit at one patch position ``(row, col)`` or one token index;
* :func:`cls` -- one unit of the cls token;
* :func:`direction` -- a vector in channel space (dot product, or cosine similarity),
  at the patches, the cls token, a position, or on a non-spatial layer (logits, pooled
  features, a CLIP image embedding: a text embedding as the direction);
* :func:`diversity` -- dissimilarity between the images of one target (Lucid's Gram-matrix
  diversity), for several images per target.

Objectives combine with ``+``, ``-`` and scalar ``*``::

    >>> import captum_vit.optim.objectives as obj
    >>> goal = obj.channel(17) - 0.5 * obj.channel(3) + 1e-2 * obj.diversity()

They work on every layout of :class:`~captum_vit.layout.TokenLayout` (BNC, NBC, BHWC,
BCHW, so CNN channels too) and on non-spatial ``(B, C)`` layers. Whether a layer is
pre- or post-activation is the layer you choose: the paper maximizes the post-GELU hidden
units (``blocks.L.mlp.act``), not ``blocks.L.mlp.fc1``.

:func:`compile_objectives` turns one objective per target into a single vectorized scorer
for the whole batch: every linear primitive of every target is one row of a token-weight
matrix and a channel-weight matrix, so N targets cost one ``einsum``, not N Python calls.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layout import TokenLayout

__all__ = [
    "Objective",
    "channel",
    "neuron",
    "cls",
    "direction",
    "diversity",
    "as_objective",
    "compile_objectives",
    "layer_tokens",
    "total_variation",
]

#: token spec: "patches" | "cls" | "all" | int token index | (row, col) patch position
Token = str | int | tuple[int, int]


class Objective:
    """Base class: a weighted sum of primitive terms. Supports ``+``, ``-``, scalar ``*``."""

    def terms(self) -> list[tuple[float, _Primitive]]:
        """The objective as ``[(coefficient, primitive), ...]``."""
        raise NotImplementedError

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return _Sum(self.terms() + other.terms())

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return _Sum(self.terms() + [(-c, p) for c, p in other.terms()])

    def __mul__(self, scalar: float) -> Objective:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        return _Sum([(float(scalar) * c, p) for c, p in self.terms()])

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> Objective:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        return self * (1.0 / scalar)

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        parts = [f"{c:+g}*{p!r}" for c, p in self.terms()]
        return " ".join(parts) if parts else "Objective()"


class _Primitive(Objective):
    def terms(self) -> list[tuple[float, _Primitive]]:
        return [(1.0, self)]


@dataclass(frozen=True, repr=False, eq=False)
class _Linear(_Primitive):
    """Score = (token-weighted mean of the features) . w, or its cosine with w."""

    unit: int | None
    vector: Tensor | None
    token: Token | None
    cosine: bool = False

    def __repr__(self) -> str:
        what = f"unit={self.unit}" if self.unit is not None else f"direction({self.vector.numel()})"
        return f"{type(self).__name__.lstrip('_')}({what}, token={self.token!r})"


class _Channel(_Linear):
    pass


class _Direction(_Linear):
    pass


@dataclass(frozen=True, repr=False, eq=False)
class _Diversity(_Primitive):
    def __repr__(self) -> str:
        return "diversity()"


class _Sum(Objective):
    def __init__(self, terms: list[tuple[float, _Primitive]]) -> None:
        self._terms = terms

    def terms(self) -> list[tuple[float, _Primitive]]:
        return list(self._terms)


def _check_token(token: Any) -> Token | None:
    if token is None or token in ("patches", "cls", "all"):
        return token
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    if (
        isinstance(token, (tuple, list))
        and len(token) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in token)
    ):
        return (int(token[0]), int(token[1]))
    raise ValueError(
        f"token must be 'patches', 'cls', 'all', a token index or a (row, col) patch "
        f"position, got {token!r}"
    )


def _check_unit(unit: Any) -> int:
    if isinstance(unit, numbers.Integral) and not isinstance(unit, bool):
        return int(unit)  # numpy integers too
    if isinstance(unit, bool) or not isinstance(unit, int):
        if isinstance(unit, Tensor) and unit.numel() == 1 and not unit.is_floating_point():
            return int(unit)
        raise TypeError(f"unit must be an int, got {type(unit).__name__}")
    return unit


def channel(unit: int, token: Token | None = None) -> Objective:
    """Unit ``unit`` of the layer, averaged over tokens (the paper's objective).

    Args:
        unit: the channel index.
        token: ``"patches"`` (the mean over patch tokens, prefix excluded), ``"all"``
            (prefix included), ``"cls"``, a token index or a ``(row, col)`` patch
            position; ``None`` takes the ``token`` argument of
            ``FeatureVisualization.attribute``. On a non-spatial layer (logits, pooled or
            CLIP embeddings) the objective is the unit itself (class visualization).

    Returns:
        An :class:`Objective`; objectives add, subtract and scale (``channel(5) -
        0.5 * channel(3)``).

    Examples::

        >>> fv.attribute(target=[channel(5), channel(5, "cls"), channel(5, (3, 4))])
    """
    return _Channel(_check_unit(unit), None, _check_token(token))


def neuron(unit: int, position: tuple[int, int] | int) -> Objective:
    """Unit ``unit`` at one place of the layer.

    Args:
        unit: the channel index.
        position: a patch position ``(row, col)`` of the grid, or a token index.

    Returns:
        An :class:`Objective`.
    """
    if position is None or isinstance(position, str):
        raise ValueError(f"neuron needs a (row, col) position or a token index, got {position!r}")
    return _Channel(_check_unit(unit), None, _check_token(position))


def cls(unit: int) -> Objective:
    """Unit ``unit`` of the cls token.

    Args:
        unit: the channel index.

    Returns:
        An :class:`Objective`; on a layer without a cls token it raises when compiled.
    """
    return _Channel(_check_unit(unit), None, "cls")


def direction(
    vector: Tensor | Sequence[float], token: Token | None = None, *, cosine: bool = False
) -> Objective:
    """A direction in channel space: ``features . vector``.

    Args:
        vector: one weight per channel of the layer (finite).
        token: where the features are read, as in :func:`channel`. On a non-spatial layer
            the direction applies to the layer's vector itself, e.g. a CLIP text
            embedding as a direction of the CLIP image embedding.
        cosine: the cosine similarity instead of the dot product.

    Returns:
        An :class:`Objective`.

    Raises:
        ValueError: an empty or non-finite vector (its length is checked against the
            layer's channels when compiled).

    Examples::

        >>> text = clip.encode_text(tokenizer(["a photo of a dog"]))[0]
        >>> FeatureVisualization(clip, clip.visual).attribute(target=direction(text, cosine=True))
    """
    vector = torch.as_tensor(vector, dtype=torch.float32).detach().reshape(-1)
    if vector.numel() == 0 or not torch.isfinite(vector).all():
        raise ValueError("direction vector must be non-empty and finite")
    return _Direction(None, vector.cpu(), _check_token(token), cosine)


def diversity() -> Objective:
    """Dissimilarity between the images of one target (``images_per_target > 1``): minus
    the mean cosine similarity of each image's Gram matrix (channel x channel over
    tokens) with those of the target's other images, per augmented copy; so
    ``channel(5) + 0.1 * diversity()`` rewards diverse images."""
    return _Diversity()


def check_diversity(objectives: Sequence[Objective], images: int) -> None:
    """Refuse a :func:`diversity` term that cannot do what it is there for.

    Raises:
        ValueError: a target uses ``diversity()`` with one image per target (it compares a
            target's images, so it scores 0), or is ``diversity()`` alone (images that
            differ from each other and excite nothing; ``[5, diversity()]`` is two targets).
    """
    for index, objective in enumerate(objectives):
        terms = objective.terms()
        if not any(isinstance(p, _Diversity) for _, p in terms):
            continue
        if all(isinstance(p, _Diversity) for _, p in terms):
            raise ValueError(
                f"target {index} is diversity() alone, which rewards images that differ and "
                "excite nothing (in a list, each item is its own target); add it to a "
                "unit's objective: channel(5) + 0.1 * diversity()"
            )
        if images < 2:
            raise ValueError(
                f"target {index} uses diversity(), which compares the images of one target: "
                "pass images_per_target=2 or more (with one image it scores 0)"
            )


def as_objective(target: Any, token: Token = "patches") -> Objective:
    """An int unit becomes :func:`channel` at ``token``; objectives pass through."""
    if isinstance(target, Objective):
        return target
    return channel(_check_unit(target), token)


# --------------------------------------------------------------------------- evaluation


def flat_output(output: Any) -> Tensor | None:
    """A non-spatial layer's ``(B, C)`` vectors: the output itself, or the first element
    of a tuple that starts with them (open_clip's CoCa tower returns ``(embedding,
    tokens)``); ``None`` for anything else."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, Tensor) and output.dim() == 2 else None


def layer_tokens(output: Any, layout: TokenLayout | None) -> Tensor:
    """The layer output as ``(B, T, C)`` tokens: prefix tokens first, then the patch grid
    in raster order; a non-spatial ``(B, C)`` layer gives ``T = 1``."""
    if layout is None:
        flat = flat_output(output)
        if flat is None:
            raise ValueError("a non-spatial layer must output a (B, C) tensor")
        return flat[:, None, :]
    if layout.kind == "BNC" and layout.element is None and layout.token_order is None:
        return output
    if layout.kind == "NBC" and layout.element is None and layout.token_order is None:
        return output.transpose(0, 1)
    spatial, prefix = layout.split(output)
    patches = spatial.flatten(2).transpose(1, 2)
    return patches if prefix is None else torch.cat([prefix, patches], dim=1)


def _token_weights(token: Token, layout: TokenLayout | None) -> Tensor:
    """Weights over the ``T`` tokens of :func:`layer_tokens` that average the spec."""
    if layout is None:
        if token not in ("patches", "all"):
            raise ValueError(
                f"token={token!r} needs a spatial layer; this layer outputs one vector per "
                "image (logits, pooled or embedding features): use token='patches'"
            )
        return torch.ones(1)
    h, w = layout.grid
    prefix = layout.num_prefix_tokens
    weights = torch.zeros(prefix + h * w)
    if token == "patches":
        weights[prefix:] = 1.0 / (h * w)
    elif token == "all":
        weights[:] = 1.0 / weights.numel()
    elif token == "cls":
        if "cls" not in layout.prefix_names:
            raise ValueError(
                f"layer {layout.layer!r} has no cls token (prefix tokens: "
                f"{layout.prefix_names or 'none'}); use token='patches' or a position"
            )
        weights[layout.prefix_names.index("cls")] = 1.0
    elif isinstance(token, tuple):
        row, col = token
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(
                f"patch position {token} is outside the {h}x{w} grid of {layout.layer!r}"
            )
        weights[prefix + row * w + col] = 1.0
    else:
        if not -weights.numel() <= token < weights.numel():
            raise ValueError(
                f"token index {token} is out of range: {layout.layer!r} has "
                f"{weights.numel()} tokens ({prefix} prefix + {h}x{w} patches)"
            )
        weights[token] = 1.0
    return weights


def _channel_weights(primitive: _Linear, num_channels: int) -> Tensor:
    if primitive.unit is not None:
        if not 0 <= primitive.unit < num_channels:
            raise IndexError(
                f"unit {primitive.unit} is out of range: the layer has {num_channels} "
                f"channels (valid 0..{num_channels - 1})"
            )
        weights = torch.zeros(num_channels)
        weights[primitive.unit] = 1.0
        return weights
    if primitive.vector.numel() != num_channels:
        raise ValueError(
            f"direction has {primitive.vector.numel()} values but the layer has "
            f"{num_channels} channels"
        )
    return primitive.vector.float()


@dataclass
class BatchScorer:
    """Scores a batch laid out as targets x images x copies (row-major), one objective per
    target. Call it on the layer's raw output; it returns one score per row.

    Attributes:
        token_weights: ``(J, B, T)`` per term slot, row and token.
        channel_weights: ``(J, B, C)``.
        coefficients: ``(J, B)``; ``cosine``: ``(J, B)`` bool.
        diversity: ``(B,)`` coefficient of the diversity term per row (zeros if none).
    """

    layout: TokenLayout | None
    token_weights: Tensor
    channel_weights: Tensor
    coefficients: Tensor
    cosine: Tensor
    diversity: Tensor
    images: int
    copies: int

    def __call__(self, output: Any) -> Tensor:
        tokens = layer_tokens(output, self.layout)
        return self.score_tokens(tokens)

    def score_tokens(self, tokens: Tensor) -> Tensor:
        dtype = tokens.dtype
        score = tokens.new_zeros(tokens.shape[0], dtype=torch.float32)
        for slot in range(self.token_weights.shape[0]):
            pooled = torch.einsum("btc,bt->bc", tokens, self.token_weights[slot].to(dtype))
            pooled = pooled.float()
            weights = self.channel_weights[slot]
            # only the weighted channels: an overflow to inf elsewhere (float16) is no NaN
            dot = torch.where(weights != 0, pooled * weights, 0.0).sum(-1)
            if bool(self.cosine[slot].any()):
                norms = pooled.norm(dim=-1) * weights.norm(dim=-1) + 1e-8
                dot = torch.where(self.cosine[slot], dot / norms, dot)
            score = score + self.coefficients[slot] * dot
        if bool(self.diversity.any()):
            score = score + self.diversity * _diversity_scores(tokens, self.images, self.copies)
        return score


def _diversity_scores(tokens: Tensor, images: int, copies: int) -> Tensor:
    """Per row: minus the mean cosine similarity of its Gram matrix with the Gram matrices
    of the other images of its target at the same augmented copy."""
    rows = tokens.shape[0]
    if images < 2:
        return tokens.new_zeros(rows, dtype=torch.float32)
    x = tokens.float()
    gram = torch.einsum("btc,btd->bcd", x, x).flatten(1)
    gram = torch.nn.functional.normalize(gram, dim=1)
    gram = gram.view(rows // (images * copies), images, copies, -1)
    sim = torch.einsum("ngkd,nhkd->nkgh", gram, gram)
    others = (sim.sum(-1) - sim.diagonal(dim1=-2, dim2=-1)) / (images - 1)
    return -others.permute(0, 2, 1).reshape(rows)


def compile_objectives(
    objectives: Sequence[Objective],
    layout: TokenLayout | None,
    num_channels: int,
    *,
    images: int = 1,
    copies: int = 1,
    default_token: Token = "patches",
    device: torch.device | str = "cpu",
) -> BatchScorer:
    """One vectorized scorer for N targets, each with ``images`` images of ``copies``
    augmented copies (rows ordered target, image, copy).

    Raises:
        IndexError: a unit is outside the layer's channels.
        ValueError: a token spec does not fit the layer (no cls token, position outside
            the grid, a position on a non-spatial layer) or a direction has the wrong size.
    """
    default_token = _check_token(default_token)
    per_target = [obj.terms() for obj in objectives]
    linear = [[(c, p) for c, p in terms if isinstance(p, _Linear)] for terms in per_target]
    diversity = torch.tensor(
        [sum(c for c, p in terms if isinstance(p, _Diversity)) for terms in per_target],
        dtype=torch.float32,
    )
    token_w, channel_w, coef, cosine = _term_matrices(linear, layout, num_channels, default_token)
    repeat = images * copies

    def rows(t: Tensor) -> Tensor:
        return t.repeat_interleave(repeat, dim=1).to(device)

    return BatchScorer(
        layout=layout,
        token_weights=rows(token_w),
        channel_weights=rows(channel_w),
        coefficients=rows(coef),
        cosine=rows(cosine),
        diversity=diversity.repeat_interleave(repeat).to(device),
        images=images,
        copies=copies,
    )


def _term_matrices(
    linear: list[list[tuple[float, _Linear]]],
    layout: TokenLayout | None,
    num_channels: int,
    default_token: Token,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token weights ``(J, N, T)``, channel weights ``(J, N, C)``, coefficients and cosine
    flags ``(J, N)`` of the linear terms, term slot ``j`` of target ``n``."""
    slots = max(1, max(len(terms) for terms in linear))
    num_tokens = 1 if layout is None else layout.num_tokens
    if layout is not None and layout.prefix_element is not None:
        num_tokens += layout.num_prefix_tokens
    n = len(linear)
    token_w = torch.zeros(slots, n, num_tokens)
    channel_w = torch.zeros(slots, n, num_channels)
    coef = torch.zeros(slots, n)
    cosine = torch.zeros(slots, n, dtype=torch.bool)
    cache: dict[Token, Tensor] = {}
    for index, terms in enumerate(linear):
        for slot, (coefficient, primitive) in enumerate(terms):
            token = default_token if primitive.token is None else primitive.token
            if token not in cache:
                cache[token] = _token_weights(token, layout)
            token_w[slot, index] = cache[token]
            channel_w[slot, index] = _channel_weights(primitive, num_channels)
            coef[slot, index] = coefficient
            cosine[slot, index] = primitive.cosine
    return token_w, channel_w, coef, cosine


# --------------------------------------------------------------------------- regularizers


#: The four pixel-difference directions of the paper's TV as (plus, minus) slices of the
#: last two axes: right, down, down-right, down-left.
_TV_DIRECTIONS = (
    ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
    ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
    ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),
    ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
)


class _TotalVariation(torch.autograd.Function):
    """TV with a hand-written backward: autograd's version of the four slice differences
    and norms costs several full-batch temporaries per direction and was the largest
    overhead of a feature-visualization step (it runs on all augmented copies)."""

    @staticmethod
    def forward(ctx: Any, images: Tensor) -> Tensor:
        diffs = [images[(..., *plus)] - images[(..., *minus)] for plus, minus in _TV_DIRECTIONS]
        norms = [torch.linalg.vector_norm(d, dim=(-2, -1)) for d in diffs]
        ctx.save_for_backward(*diffs, *norms)
        ctx.shape = images.shape
        return torch.stack(norms).sum(0).mean(dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        saved = ctx.saved_tensors
        diffs, norms = saved[:4], saved[4:]
        channels = ctx.shape[1]
        out = grad.new_zeros(ctx.shape)
        for (plus, minus), d, norm in zip(_TV_DIRECTIONS, diffs, norms, strict=True):
            weight = (grad[:, None] / channels / norm.clamp_min(1e-12))[..., None, None]
            out[(..., *plus)].addcmul_(d, weight)
            out[(..., *minus)].addcmul_(d, weight, value=-1)
        return out


def total_variation(images: Tensor) -> Tensor:
    """The paper's total variation, one value per image: for each channel the L2 norm (not
    squared) of the pixel differences in 4 directions (right, down and both diagonals),
    summed over directions and averaged over channels.

    Args:
        images: ``(B, C, H, W)``.

    Returns:
        ``(B,)``.
    """
    return _TotalVariation.apply(images)
