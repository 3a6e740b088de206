"""AttentionRollout against a hand computation from explicitly computed attention
probabilities (timm with fused attention off, read at attn_drop; open_clip's own
nn.MultiheadAttention with need_weights=True)."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import _VIT, TIMM_ARCHS, hooks_left, open_clip_model, open_clip_tower, timm_model

import captum_vit as cv


def unit_images(size, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=generator)


def timm_probabilities(model, x):
    """Per block (B, heads, N, N), from a copy with fused attention off."""
    explicit = copy.deepcopy(model)
    store = []
    handles = []
    for module in explicit.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "attn_drop"):  # not a pool
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(lambda m, a, o: store.append(o)))
    with torch.no_grad():
        explicit(x)
    for handle in handles:
        handle.remove()
    return store


def open_clip_probabilities(tower, x):
    store = []

    def grab(module, args, kwargs):
        with torch.no_grad():
            _, weights = module.forward(*args[:3], need_weights=True, average_attn_weights=False)
        store.append(weights)

    handles = [
        block.attn.register_forward_pre_hook(grab, with_kwargs=True)
        for block in tower.transformer.resblocks
    ]
    with torch.no_grad():
        tower(x)
    for handle in handles:
        handle.remove()
    return store


def hand_rollout(probabilities, prefix, grid, row="cls", fusion="mean", discard=0.0):
    """Blocks that ran on fewer tokens than the last (ConViT's GPSA blocks, before its cls
    token joins) get an identity on the missing prefix tokens."""
    result = None
    final = probabilities[-1].shape[-1]
    for probs in probabilities:
        fused = {"mean": probs.mean(1), "max": probs.amax(1), "min": probs.amin(1)}[fusion]
        tokens = fused.shape[-1]
        if discard:
            fused = fused.clone()
            for b in range(fused.shape[0]):
                for i in range(tokens):
                    order = fused[b, i].argsort()
                    fused[b, i, order[: int(tokens * discard)]] = 0
        step = 0.5 * fused + 0.5 * torch.eye(tokens)
        step = step / step.sum(-1, keepdim=True)
        if tokens < final:
            missing = torch.eye(final - tokens)
            step = torch.stack([torch.block_diag(missing, s) for s in step])
        result = step if result is None else step @ result
    read = result[:, 0] if row == "cls" else result.mean(1)
    return read[:, prefix:].reshape(-1, *grid)


CASES = {
    # arch -> (prefix tokens, grid, row)
    "vit": (1, (4, 4), "cls"),
    "deit_distilled": (2, (4, 4), "cls"),
    "dinov2_reg": (5, (4, 4), "cls"),
    "vit_avg": (0, (4, 4), "mean"),
    "eva02": (1, (4, 4), "cls"),
    "qwen3": (0, (4, 4), "mean"),  # AttentionRope
    "gemma4": (0, (6, 6), "mean"),  # its own 2-D rotary attention, one key head
}


@pytest.mark.parametrize("arch", list(CASES))
def test_rollout_equals_hand_computation_from_explicit_probabilities(arch):
    factory, size = TIMM_ARCHS[arch]
    model = factory()
    prefix, grid, row = CASES[arch]
    x = unit_images(size)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    rollout = cv.AttentionRollout(model)
    maps = rollout.attribute(x)
    probs = timm_probabilities(model, cv.ImageModel(model).normalize(x))
    expected = hand_rollout(probs, prefix, grid, row)
    assert maps.shape == (2, *grid)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    assert hooks_left(model) == 0
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "name,options",
    [
        ("vit_pe_core_small_patch16_384", {}),  # AttentionRope, fused qkv, cls token
        ("vit_pe_core_small_patch16_384", {"qkv_fused": False}),
        ("vit_base_patch16_rope_mixed_224", {}),  # a learned rotary frequency per head
    ],
)
def test_rope_attention_rollout_equals_hand_computation(name, options):
    """timm's AttentionRope was refused as an attention type the rollout cannot read."""
    model = timm_model(name, **options, **_VIT)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "AttentionRope" in kinds or "EvaAttention" in kinds
    x = unit_images((32, 32))
    maps = cv.AttentionRollout(model).attribute(x)
    probs = timm_probabilities(model, cv.ImageModel(model).normalize(x))
    expected = hand_rollout(probs, model.num_prefix_tokens, (4, 4), "cls")
    assert torch.allclose(maps, expected, atol=1e-5)
    assert hooks_left(model) == 0


def random_relative_bias(model):
    """BEiT initializes its relative position bias tables to zero; random tables make a
    rollout that ignores them wrong."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(torch.randn(param.shape, generator=generator) * 2)
    return model


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}],
    ids=["per_block_bias", "shared_bias"],
)
def test_beit_rollout_includes_its_relative_position_bias(options):
    model = random_relative_bias(timm_model("beit_base_patch16_224", **options, **_VIT))
    x = unit_images((32, 32))
    maps = cv.AttentionRollout(model).attribute(x)
    probs = timm_probabilities(model, cv.ImageModel(model).normalize(x))
    assert torch.allclose(maps, hand_rollout(probs, 1, (4, 4)), atol=1e-5)
    assert hooks_left(model) == 0


def convit_probabilities(model, x):
    """Per block, the attention ConViT's own GPSA / MHSA computed (read at attn_drop)."""
    store = []
    handles = [
        block.attn.attn_drop.register_forward_hook(lambda m, a, o: store.append(o))
        for block in model.blocks
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return store


def test_convit_rollout_passes_the_late_cls_token_through_the_gpsa_blocks():
    factory, size = TIMM_ARCHS["convit"]
    model = factory()
    with torch.no_grad():  # gates away from their init, so both attentions count
        for block in model.blocks[: model.local_up_to_layer]:
            block.attn.gating_param.copy_(torch.tensor([-1.0, 0.5]))
    x = unit_images(size)
    maps = cv.AttentionRollout(model).attribute(x)
    probs = convit_probabilities(model, cv.ImageModel(model).normalize(x))
    assert [p.shape[-1] for p in probs] == [16, 16, 17]
    assert torch.allclose(maps, hand_rollout(probs, 1, (4, 4)), atol=1e-5)
    gpsa_only = cv.AttentionRollout(model, layers=["blocks.0.attn", "blocks.1.attn"])
    assert torch.allclose(gpsa_only.attribute(x), hand_rollout(probs[:2], 0, (4, 4), "mean"))


def test_attention_of_the_same_name_but_another_computation_is_refused():
    """SAM's ViT names its attention ``Attention`` too, but adds decomposed relative
    positions: reading it as timm's plain attention would be a silent wrong map."""
    model = timm_model(
        "samvit_base_patch16",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=2,
        num_classes=0,
    )
    with pytest.raises(ValueError, match="vision_transformer_sam.Attention.*cannot read"):
        cv.AttentionRollout(model, layers=["blocks.1.attn"])


@pytest.mark.parametrize("fusion,discard", [("max", 0.0), ("min", 0.0), ("mean", 0.5)])
def test_head_fusion_and_discard_ratio(fusion, discard):
    factory, size = TIMM_ARCHS["vit"]
    model = factory()
    x = unit_images(size)
    maps = cv.AttentionRollout(model, head_fusion=fusion, discard_ratio=discard).attribute(x)
    probs = timm_probabilities(model, cv.ImageModel(model).normalize(x))
    expected = hand_rollout(probs, 1, (4, 4), fusion=fusion, discard=discard)
    assert torch.allclose(maps, expected, atol=1e-5)


def test_open_clip_tower_rollout_equals_hand_computation():
    tower = open_clip_tower()
    x = unit_images((32, 32))
    maps = cv.AttentionRollout(tower).attribute(x, interpolate=False)
    probs = open_clip_probabilities(tower, cv.ImageModel(tower).normalize(x))
    assert torch.allclose(maps, hand_rollout(probs, 1, (4, 4)), atol=1e-5)
    up = cv.AttentionRollout(tower).attribute(x, interpolate=True)
    assert up.shape == (2, 32, 32)


def test_exactly_uniform_attention_gives_a_uniform_map():
    factory, size = TIMM_ARCHS["vit"]
    model = factory()
    with torch.no_grad():
        for block in model.blocks:
            width = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * width] = 0  # q = k = 0: every row is uniform
            block.attn.qkv.bias[: 2 * width] = 0
    maps = cv.AttentionRollout(model).attribute(unit_images(size))
    assert torch.allclose(maps, maps.flatten()[0].expand_as(maps), atol=1e-7)
    # cls row of 0.5^L I + (1 - 0.5^L) U over 17 tokens, two blocks
    assert torch.allclose(maps, torch.full_like(maps, (1 - 0.25) / 17), atol=1e-6)


def test_a_block_or_another_module_as_layer_says_which_attention_to_pass():
    vit = timm_model("vit_tiny_patch16_224", **_VIT)
    with pytest.raises(ValueError, match=r"'blocks.1' \(Block\) .*holds one: pass 'blocks.1.attn'"):
        cv.AttentionRollout(vit, layers=["blocks.0.attn", "blocks.1"])
    with pytest.raises(ValueError, match=r"'blocks.0.mlp' \(Mlp\) is not an attention module"):
        cv.AttentionRollout(vit, layers=["blocks.0.mlp"])
    # a full CLIP model: its image tower's paths as the user gives them
    clip = open_clip_model()
    block = "visual.transformer.resblocks.0"
    with pytest.raises(ValueError, match=rf"'{block}' .*holds one: pass '{block}.attn'"):
        cv.AttentionRollout(clip, layers=[block])
    x = unit_images((32, 32))
    given = cv.AttentionRollout(clip, layers=[f"{block}.attn"]).attribute(x)
    assert torch.equal(
        given,
        cv.AttentionRollout(clip.visual, layers=["transformer.resblocks.0.attn"]).attribute(x),
    )


def test_windowed_and_pooled_attention_raise_clear_errors():
    swin = TIMM_ARCHS["swin"][0]()
    with pytest.raises(ValueError, match="windows"):
        cv.AttentionRollout(swin)
    vit_map = TIMM_ARCHS["vit_map"][0]()
    with pytest.raises(ValueError, match="pooling attention"):
        cv.AttentionRollout(vit_map, layers=["attn_pool"])
    maps = cv.AttentionRollout(vit_map).attribute(unit_images((32, 32)))  # blocks only
    assert maps.shape == (2, 4, 4)
    cait = TIMM_ARCHS["cait"][0]()
    with pytest.raises(ValueError, match="cannot roll out"):
        cv.AttentionRollout(cait)
    coat = TIMM_ARCHS["coat_lite"][0]()
    with pytest.raises(ValueError, match="FactorAttnConvRelPosEnc.*cannot read"):
        cv.AttentionRollout(coat)
    pit = TIMM_ARCHS["pit"][0]()
    with pytest.raises(ValueError, match="one stage with layers="):
        cv.AttentionRollout(pit).attribute(unit_images((64, 64)))
    stage = [f"transformers.1.blocks.{i}.attn" for i in range(2)]
    assert cv.AttentionRollout(pit, layers=stage).attribute(unit_images((64, 64))).shape == (
        2,
        4,
        4,
    )


def test_bad_arguments_raise():
    model = TIMM_ARCHS["vit"][0]()
    with pytest.raises(ValueError, match="head_fusion"):
        cv.AttentionRollout(model, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        cv.AttentionRollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="no cls token"):
        cv.AttentionRollout(TIMM_ARCHS["vit_avg"][0]()).attribute(unit_images((32, 32)), row="cls")
