"""Small random-weight configurations of every architecture family the package supports.

Each entry builds a model in eval mode that runs in well under a second on a CPU; sizes
follow the house rule (img_size 32..64, depth 1..3).
"""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch


def timm_model(name: str, **kwargs) -> torch.nn.Module:
    if not timm.is_model(name):  # families newer than the installed timm (Gemma 4, Qwen3-VL)
        pytest.skip(f"timm {timm.__version__} has no {name}")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


#: A small timm Gemma 4 vision encoder: 8-px patches, a 6x6 grid at 48 px (its attention
#: pooler wants multiples of 3 patches), one key head for the two query heads.
GEMMA4 = dict(
    img_size=48,
    patch_size=8,
    depth=2,
    embed_dim=32,
    num_heads=2,
    head_dim=16,
    num_kv_heads=1,
    intermediate_size=64,
)


def padded_vit(depth: int = 2) -> torch.nn.Module:
    """A small ViT that pads images to whole 8-px patches (timm ``dynamic_img_pad``)."""
    return timm_model(
        "vit_tiny_patch16_224",
        **dict(_VIT, depth=depth, dynamic_img_size=True, dynamic_img_pad=True),
    )


# name -> (factory, input size (H, W))
TIMM_ARCHS = {
    "vit": (lambda: timm_model("vit_tiny_patch16_224", **_VIT), (32, 32)),
    "vit_avg": (
        lambda: timm_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **_VIT),
        (32, 32),
    ),
    "vit_map": (
        lambda: timm_model("vit_tiny_patch16_224", class_token=False, global_pool="map", **_VIT),
        (32, 32),
    ),
    "vit_dynamic": (
        lambda: timm_model("vit_tiny_patch16_224", dynamic_img_size=True, **_VIT),
        (40, 64),
    ),
    "deit_distilled": (lambda: timm_model("deit_tiny_distilled_patch16_224", **_VIT), (32, 32)),
    "dinov2_reg": (
        lambda: timm_model(
            "vit_small_patch14_reg4_dinov2", img_size=56, depth=2, embed_dim=32, num_heads=2
        ),
        (56, 56),
    ),
    "deit3": (lambda: timm_model("deit3_small_patch16_224", **_VIT), (32, 32)),
    "beit": (lambda: timm_model("beit_base_patch16_224", **_VIT), (32, 32)),
    "eva02": (
        lambda: timm_model(
            "eva02_tiny_patch14_224", img_size=56, depth=2, embed_dim=32, num_heads=2
        ),
        (56, 56),
    ),
    "cait": (lambda: timm_model("cait_xxs24_224", depth_token_only=1, **_VIT), (32, 32)),
    "convit": (
        lambda: timm_model(
            "convit_tiny",
            img_size=32,
            patch_size=8,
            depth=3,
            local_up_to_layer=2,
            embed_dim=32,
            num_heads=2,
        ),
        (32, 32),
    ),
    "pit": (lambda: timm_model("pit_ti_224", img_size=64), (64, 64)),
    "swin": (
        lambda: timm_model(
            "swin_tiny_patch4_window7_224",
            img_size=(56, 84),
            depths=(2, 2),
            num_heads=(2, 4),
            embed_dim=32,
        ),
        (56, 84),
    ),
    "twins_pcpvt": (
        lambda: timm_model(
            "twins_pcpvt_small",
            img_size=64,
            depths=(2, 2, 2, 2),
            embed_dims=(16, 32, 48, 64),
            num_heads=(1, 2, 2, 4),
        ),
        (64, 64),
    ),
    "twins_svt": (
        lambda: timm_model(
            "twins_svt_small",
            img_size=64,
            depths=(2, 2, 2, 2),
            embed_dims=(16, 32, 48, 64),
            num_heads=(1, 2, 2, 4),
        ),
        (64, 64),
    ),
    "coat_lite": (lambda: timm_model("coat_lite_tiny", img_size=64), (64, 64)),
    "coat": (lambda: timm_model("coat_tiny", img_size=64), (64, 64)),
    "resnet": (lambda: timm_model("resnet18"), (32, 32)),
    # Qwen3-VL's vision encoder: a convolutional patch embedding, AttentionRope blocks.
    "qwen3": (lambda: timm_model("qwen3_vit_88m", num_classes=5, **_VIT), (32, 32)),
    # Gemma 4's: a linear patch embedding that returns its tokens' raster coordinates,
    # gated MLPs, its own rotary attention with key heads shared by the query heads.
    "gemma4": (lambda: timm_model("gemma4_vit_167m", num_classes=5, **GEMMA4), (48, 48)),
}


def open_clip_tower(batch_first: bool = True) -> torch.nn.Module:
    """A small open_clip vision tower; ``batch_first=False`` rebuilds its transformer in the
    sequence-first (N, B, C) convention of older open_clip, with the same weights."""
    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0, output_dim=16
    ).eval()
    if not batch_first:
        old = tower.transformer
        new = open_clip.transformer.Transformer(
            width=32, layers=2, heads=2, mlp_ratio=4.0, batch_first=False
        )
        new.load_state_dict(old.state_dict())
        tower.transformer = new.eval()
    return tower


def open_clip_coca_tower() -> torch.nn.Module:
    """A small open_clip tower as CoCa builds it: an attentional pooler, and a forward that
    returns ``(embedding, query tokens)``."""
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(
        image_size=32,
        patch_size=8,
        width=32,
        layers=2,
        heads=2,
        mlp_ratio=2.0,
        output_dim=16,
        attentional_pool=True,
        attn_pooler_queries=4,
        attn_pooler_heads=2,
        output_tokens=True,
    ).eval()


def open_clip_model() -> torch.nn.Module:
    """A small full open_clip CLIP model (image and text towers)."""
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    ).eval()


def open_clip_timm_trunk() -> torch.nn.Module:
    """An open_clip tower wrapping a timm trunk (as SigLIP models do)."""
    torch.manual_seed(0)
    tower = open_clip.timm_model.TimmModel("vit_tiny_patch16_224", embed_dim=16)
    tower.trunk = timm_model("vit_tiny_patch16_224", num_classes=0, **_VIT)
    tower.head = torch.nn.Sequential(torch.nn.Linear(32, 16))
    tower.image_size = (32, 32)
    return tower.eval()


def images(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator)


def hooked(model: torch.nn.Module, path: str, x: torch.Tensor, use_input: bool = False):
    """Independent capture for oracles: a plain hook on ``path``, full forward, no_grad."""
    module = dict(model.named_modules())[path]
    store = []
    if use_input:
        handle = module.register_forward_pre_hook(lambda m, a: store.append(a[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: store.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return store[0]


def hooks_left(model: torch.nn.Module) -> int:
    """Number of forward / backward hooks registered on any module of ``model``."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )
