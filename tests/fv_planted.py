"""A planted ViT whose feature-visualization optimum is known (shared by the FV tests).

Tokens are local (attention outputs zeroed, no positional embedding, norms replaced by
identities), the patch embedding writes ``<P, patch>`` into channel 0 and unit ``UNIT`` of
``blocks.0.mlp.fc1`` reads channel 0, so ``fc1[UNIT]`` at each patch is a linear response to
the smooth colour pattern ``P`` (3 x 32 x 32): the images that maximize it carry ``P`` in
every patch (clamped to [0, 1]: its sign pattern). ``planted_vit(planted_colour())`` plants
a flat red-minus-blue unit instead, whose optimum no augmentation changes.
"""

from __future__ import annotations

import math

import timm
import torch

PATCH = 32
SIZE = 64
UNIT = 5


def planted_pattern() -> torch.Tensor:
    """(3, PATCH, PATCH) smooth, zero-mean colour pattern, unit norm."""
    y, x = torch.meshgrid(torch.arange(PATCH), torch.arange(PATCH), indexing="ij")
    angle = 2 * math.pi / PATCH
    pattern = torch.stack(
        [
            torch.cos(angle * y),
            torch.cos(angle * x),
            -torch.cos(angle * (x + y)),
        ]
    ).float()
    pattern = pattern - pattern.mean(dim=(1, 2), keepdim=True)
    return pattern / pattern.norm()


def planted_colour() -> torch.Tensor:
    """(3, PATCH, PATCH): red minus blue, flat; unit norm. Its optimum (red 1, blue 0 in
    every pixel) survives every augmentation: shift, scale, rotation, flip."""
    pattern = torch.tensor([1.0, 0.0, -1.0])[:, None, None].expand(3, PATCH, PATCH)
    return pattern / pattern.norm()


def planted_vit(pattern: torch.Tensor | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=SIZE,
        patch_size=PATCH,
        depth=1,
        embed_dim=8,
        num_heads=1,
        mlp_ratio=4.0,
    ).eval()
    block = model.blocks[0]
    block.norm1 = torch.nn.Identity()
    block.norm2 = torch.nn.Identity()
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        model.pos_embed.zero_()
        model.cls_token.zero_()
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.patch_embed.proj.weight[0] = planted_pattern() if pattern is None else pattern
        block.mlp.fc1.weight.zero_()
        block.mlp.fc1.bias.zero_()
        block.mlp.fc1.weight[UNIT, 0] = 4.0
    return model


def patch_correlations(image: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every PATCH x PATCH cell of ``image`` (3, H, W) with
    ``pattern``, as a flat tensor."""
    cells = image.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # 3, h, w, P, P
    cells = cells.permute(1, 2, 0, 3, 4).reshape(-1, 3 * PATCH * PATCH)
    cells = cells - cells.mean(dim=1, keepdim=True)
    ref = (pattern - pattern.mean()).reshape(1, -1)
    return (cells * ref).sum(1) / (cells.norm(dim=1) * ref.norm() + 1e-12)


def best_shift_correlation(image: torch.Tensor, pattern: torch.Tensor, limit: int) -> float:
    """Mean patch correlation, maximized over circular shifts of the image up to
    ``limit`` px (the roll jitter may leave the pattern shifted against the grid)."""
    best = -1.0
    for dy in range(-limit, limit + 1):
        for dx in range(-limit, limit + 1):
            shifted = torch.roll(image, (dy, dx), dims=(1, 2))
            best = max(best, float(patch_correlations(shifted, pattern).mean()))
    return best
