"""PatchActivationMap against an independent oracle: the test's own hook on the layer, the
prefix tokens dropped by hand, the tokens reshaped to the grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from archs import (
    TIMM_ARCHS,
    hooked,
    hooks_left,
    open_clip_model,
    open_clip_tower,
    padded_vit,
)
from captum.attr import LayerAttribution

import captum_vit as cv


def tokens_to_grid(tokens, prefix, h, w):
    """(B, N, C) with `prefix` leading tokens -> (B, C, h, w), (B, prefix, C)."""
    batch, _, channels = tokens.shape
    grid = tokens[:, prefix:].reshape(batch, h, w, channels).permute(0, 3, 1, 2)
    return grid, tokens[:, :prefix]


# (arch, layer, how to turn the raw output into (B, C, h, w) + prefix (B, P, C))
CASES = {
    "vit": ("blocks.1.mlp.fc1", lambda o: tokens_to_grid(o, 1, 4, 4)),
    "deit_distilled": ("blocks.1", lambda o: tokens_to_grid(o, 2, 4, 4)),
    "dinov2_reg": ("blocks.0.mlp.fc1", lambda o: tokens_to_grid(o, 5, 4, 4)),
    # Swin at 56x84: stage 0 grid 14x21, stage 1 grid 7x11 (padded merge).
    "swin": ("layers.1.blocks.1", lambda o: (o.permute(0, 3, 1, 2), None)),
    "swin-mlp": ("layers.0.blocks.1.mlp.fc1", lambda o: tokens_to_grid(o, 0, 14, 21)),
    "pit": ("transformers.1.blocks.0.mlp.fc1", lambda o: tokens_to_grid(o, 1, 4, 4)),
    "pit-stage": ("transformers.1", lambda o: (o[0], o[1])),
    "resnet": ("layer2", lambda o: (o, None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_maps_equal_manual_hook_reshape(case):
    arch = case.split("-")[0]
    factory, size = TIMM_ARCHS[arch]
    model = factory()
    layer, to_grid = CASES[case]
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1))
    pam = cv.PatchActivationMap(model, layer)
    grid, prefix = to_grid(hooked(model, layer, pam.normalize(x)))
    units = [0, 3, grid.shape[1] - 1]
    maps, prefix_values = pam.attribute(x, target=units, return_prefix=True)
    expected = grid[torch.arange(3), torch.tensor(units)]
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)
    if prefix is None:
        assert prefix_values.shape == (3, 0)
    else:
        torch.testing.assert_close(prefix_values, prefix[torch.arange(3), :, torch.tensor(units)])
    single = pam.attribute(x, target=2)
    torch.testing.assert_close(single, grid[:, 2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_tower_both_sequence_conventions(batch_first):
    tower = open_clip_tower(batch_first=batch_first)
    x = torch.rand(2, 3, 32, 32)
    layer = "transformer.resblocks.1.mlp.c_fc"
    pam = cv.PatchActivationMap(tower, layer)
    assert pam.layout_for(x).kind == ("BNC" if batch_first else "NBC")
    out = hooked(tower, layer, pam.normalize(x))
    if not batch_first:
        out = out.transpose(0, 1)
    grid, prefix = tokens_to_grid(out, 1, 4, 4)
    maps, cls = pam.attribute(x, target=torch.tensor([5, 7]), return_prefix=True)
    torch.testing.assert_close(maps, grid[torch.arange(2), torch.tensor([5, 7])])
    torch.testing.assert_close(cls[:, 0], prefix[torch.arange(2), 0, torch.tensor([5, 7])])


def test_full_clip_model_uses_its_vision_tower():
    clip = open_clip_model()
    x = torch.rand(2, 3, 32, 32)
    pam = cv.PatchActivationMap(clip, "visual.transformer.resblocks.0")
    out = hooked(clip.visual, "transformer.resblocks.0", pam.normalize(x))
    grid, _ = tokens_to_grid(out, 1, 4, 4)
    torch.testing.assert_close(pam.attribute(x, target=9), grid[:, 9])


def test_direction_targets_and_layer_input():
    factory, size = TIMM_ARCHS["vit"]
    model = factory()
    x = torch.rand(2, 3, *size)
    pam = cv.PatchActivationMap(model, "blocks.1.mlp.fc1")
    grid, prefix = tokens_to_grid(hooked(model, "blocks.1.mlp.fc1", pam.normalize(x)), 1, 4, 4)
    direction = torch.randn(grid.shape[1], generator=torch.Generator().manual_seed(0))
    maps, cls = pam.attribute(x, target=direction, return_prefix=True)
    torch.testing.assert_close(
        maps, (grid * direction.view(1, -1, 1, 1)).sum(1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(cls[:, 0], prefix[:, 0] @ direction, atol=1e-5, rtol=1e-5)
    per_image = torch.randn(2, grid.shape[1])
    torch.testing.assert_close(
        pam.attribute(x, target=per_image),
        (grid * per_image.view(2, -1, 1, 1)).sum(1),
        atol=1e-5,
        rtol=1e-5,
    )
    hidden = cv.PatchActivationMap(model, "blocks.1.mlp.fc2", attribute_to_layer_input=True)
    torch.testing.assert_close(
        hidden.attribute(x, target=4), F.gelu(grid[:, 4]), atol=1e-6, rtol=1e-6
    )


def test_interpolate_matches_bilinear_and_captum_interpolate():
    factory, size = TIMM_ARCHS["vit_dynamic"]  # 40x64 input, 5x8 grid: non-square
    model = factory()
    x = torch.rand(2, 3, *size)
    pam = cv.PatchActivationMap(model, "blocks.0")
    maps = pam.attribute(x, target=1)
    assert maps.shape == (2, 5, 8)
    up = pam.attribute(x, target=1, interpolate=True)
    assert up.shape == (2, *size)
    expected = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, expected[:, 0])
    torch.testing.assert_close(
        LayerAttribution.interpolate(maps[:, None], size, "bilinear")[:, 0], up
    )


@pytest.mark.parametrize(
    "arch, layer, words",
    [
        ("cait", "blocks_token_only.0", "not spatial"),
        ("vit_map", "attn_pool", "not spatial"),
        ("vit", "head", "not spatial"),
        ("swin", "layers.0.blocks.1.attn", "windows"),
    ],
)
def test_non_spatial_layers_are_refused(arch, layer, words):
    factory, size = TIMM_ARCHS[arch]
    model = factory()
    pam = cv.PatchActivationMap(model, layer)
    with pytest.raises(ValueError, match=words):
        pam.attribute(torch.rand(2, 3, *size), target=0)
    assert hooks_left(model) == 0


def test_bad_targets_and_images_give_clear_errors():
    factory, size = TIMM_ARCHS["vit"]
    model = factory()
    pam = cv.PatchActivationMap(model, "blocks.1.mlp.fc1")  # 128 channels
    x = torch.rand(2, 3, *size)
    with pytest.raises(IndexError, match="out of range"):
        pam.attribute(x, target=128)
    with pytest.raises(ValueError, match="one unit per image"):
        pam.attribute(x, target=[1, 2, 3])
    with pytest.raises(ValueError, match=r"shape \(128,\)"):
        pam.attribute(x, target=torch.randn(64))
    with pytest.raises(TypeError):
        pam.attribute(x, target="cls")
    with pytest.raises(ValueError, match="NaN"):
        pam.attribute(torch.full((1, 3, *size), float("nan")), target=0)
    with pytest.raises(ValueError, match="takes 32x32"):
        pam.attribute(torch.rand(1, 3, 48, 48), target=0)


def test_model_left_as_found_also_after_an_exception():
    factory, size = TIMM_ARCHS["vit"]
    model = factory().train()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.rand(2, 3, *size)
    copy = x.clone()
    pam = cv.PatchActivationMap(model, "blocks.1")
    pam.attribute(x, target=0, interpolate=True, return_prefix=True)
    assert torch.equal(x, copy)
    assert hooks_left(model) == 0 and model.training and model.blocks[1].training
    assert [p.requires_grad for p in model.parameters()] == flags

    calls = []

    def fail_on_second_call(module, args, output):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("user hook failure")

    fresh = cv.PatchActivationMap(model, "blocks.1")
    handle = model.patch_embed.register_forward_hook(fail_on_second_call)
    try:
        with pytest.raises(RuntimeError, match="user hook failure"):
            fresh.attribute(x, target=0)  # layout forward succeeds, the map forward fails
    finally:
        handle.remove()
    assert hooks_left(model) == 0 and model.training
    assert [p.requires_grad for p in model.parameters()] == flags


class ShiftedConv(torch.nn.Module):
    """A model whose forward takes a second argument (a per-image, per-channel shift)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)
        self.act = torch.nn.ReLU()

    def forward(self, x, shift):
        return self.act(self.conv(x) + shift).mean((2, 3))


def test_additional_forward_args_and_per_call_layer_input_match_captum():
    from captum.attr import LayerActivation

    model = ShiftedConv().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shift = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    pam = cv.PatchActivationMap(model, "act", image_size=32)  # no normalization config
    ours = pam.attribute(x, additional_forward_args=shift)  # target=None: the whole layer
    captum = LayerActivation(model, model.act).attribute(x, additional_forward_args=shift)
    assert ours.shape == captum.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, captum)
    torch.testing.assert_close(pam.attribute(x, 2, (shift,)), captum[:, 2])
    before = pam.attribute(x, additional_forward_args=shift, attribute_to_layer_input=True)
    captum_in = LayerActivation(model, model.act).attribute(
        x, additional_forward_args=shift, attribute_to_layer_input=True
    )
    torch.testing.assert_close(before, captum_in)
    assert (before < 0).any() and not (ours < 0).any()
    assert not pam.attribute_to_layer_input  # the per-call choice does not stick
    up = pam.attribute(x, additional_forward_args=shift, interpolate=True)
    assert up.shape == (2, 4, 32, 32)


def test_whole_layer_target_none_matches_unit_maps():
    factory, size = TIMM_ARCHS["deit_distilled"]
    pam = cv.PatchActivationMap(factory(), "blocks.1.mlp.fc1")
    x = torch.rand(2, 3, *size)
    layer, prefix = pam.attribute(x, return_prefix=True)
    maps, cls = pam.attribute(x, target=5, return_prefix=True)
    assert layer.shape == (2, 128, 4, 4) and prefix.shape == (2, 2, 128)
    torch.testing.assert_close(layer[:, 5], maps)
    torch.testing.assert_close(prefix[:, :, 5], cls)


def nearest_cell(maps, size, cell):
    """Oracle: pixel (y, x) shows the cell that covers it, ``(y // cell, x // cell)``;
    pixels past the last cell (a remainder the model dropped) the last cell."""
    rows = (torch.arange(size[0]) // cell).clamp(max=maps.shape[-2] - 1)
    cols = (torch.arange(size[1]) // cell).clamp(max=maps.shape[-1] - 1)
    return maps[..., rows[:, None], cols[None, :]]


@pytest.mark.parametrize(
    "case",
    [
        # timm pads 36x44 to 40x48: a 5x6 grid of 8-px patches, the last ones cut short.
        ("padded", padded_vit, "blocks.1", (36, 44), (5, 6), 8),
        # Swin at 56x84: stage 1 merges 14x21 patches of 4 px (padded to 14x22) into 7x11
        # cells of 8 px; the last column of cells covers 4 px of the image.
        ("swin", lambda: TIMM_ARCHS["swin"][0](), "layers.1", (56, 84), (7, 11), 8),
    ],
    ids=lambda case: case[0],
)
def test_interpolated_maps_lie_on_the_pixels_their_patches_cover(case):
    """Stretching a padded grid over the image put the map up to half a patch off."""
    _, factory, layer, size, grid, cell = case
    model = factory()
    x = torch.rand(2, 3, *size)
    pam = cv.PatchActivationMap(model, layer)
    maps = pam.attribute(x, target=1)
    assert maps.shape == (2, *grid)
    up = pam.attribute(x, target=1, interpolate=True, interpolate_mode="nearest")
    torch.testing.assert_close(up, nearest_cell(maps, size, cell))
    every = pam.attribute(x, interpolate=True, interpolate_mode="nearest")
    torch.testing.assert_close(every[:, 1], up)
    smooth = pam.attribute(x, target=1, interpolate=True)  # bilinear: inside the cells' range
    assert smooth.shape == (2, *size)
    assert maps.amin() - 1e-6 <= smooth.amin() and smooth.amax() <= maps.amax() + 1e-6


def test_rollout_interpolates_onto_the_covered_pixels():
    x = torch.rand(1, 3, 36, 44)
    rollout = cv.AttentionRollout(padded_vit())
    maps = rollout.attribute(x)
    assert maps.shape == (1, 5, 6)
    up = rollout.attribute(x, interpolate=True, interpolate_mode="nearest")
    torch.testing.assert_close(up, nearest_cell(maps, (36, 44), 8))


def test_overlapping_patches_are_stretched_as_captum_does():
    """PiT's 16-px patches overlap (stride 8): no cell tiles the image, so the map is
    stretched over it, as LayerAttribution.interpolate does."""
    from captum_vit.models import patch_tiling

    factory, size = TIMM_ARCHS["pit"]
    model = factory()
    assert patch_tiling(model, size) is None
    x = torch.rand(1, 3, *size)
    pam = cv.PatchActivationMap(model, "transformers.1")
    maps = pam.attribute(x, target=0)
    up = pam.attribute(x, target=0, interpolate=True)
    expected = LayerAttribution.interpolate(maps[:, None], size, "bilinear")[:, 0]
    torch.testing.assert_close(up, expected)


def test_element_picks_a_branch_of_a_layer_that_returns_several_maps():
    """CrossViT's blocks return one token tensor per branch; the methods always took the
    first (the small-patch branch), with no way to reach the other."""
    torch.manual_seed(0)
    import timm

    model = timm.create_model(
        "crossvit_tiny_240",
        img_size=64,
        img_scale=(1.0, 1.0),
        patch_size=[8, 16],
        embed_dim=[32, 48],
        depth=[[1, 1, 0]],
        num_heads=[2, 2],
        mlp_ratio=[2, 2, 1],
    ).eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pam = cv.PatchActivationMap(model, "blocks.0", element=1)
    small, large = hooked(model, "blocks.0", pam.normalize(x))
    assert small.shape == (3, 65, 32) and large.shape == (3, 17, 48)
    oracle, _ = tokens_to_grid(large, 1, 4, 4)
    units = torch.tensor([2, 40, 47])
    torch.testing.assert_close(pam.attribute(x, target=units), oracle[torch.arange(3), units])
    default, _ = tokens_to_grid(small, 1, 8, 8)
    first = torch.tensor([2, 20, 31])  # the small branch has 32 channels
    torch.testing.assert_close(
        cv.PatchActivationMap(model, "blocks.0").attribute(x, target=first),
        default[torch.arange(3), first],
    )
    top = cv.TopActivatingExamples(model, "blocks.0", k=3, element=1).attribute(x, target=[40])
    torch.testing.assert_close(top.scores[0], oracle[:, 40].mean((-2, -1)).sort(descending=True)[0])
    fv = cv.FeatureVisualization(model, "blocks.0", element=1)
    assert fv.layout_for(x).grid == (4, 4)
    with pytest.raises(ValueError, match="returns one tensor .* not a tuple: element=1"):
        cv.PatchActivationMap(model, "blocks.0.blocks.0", element=1).attribute(x, target=0)
    with pytest.raises(TypeError, match="element must be None or an int, got str"):
        cv.PatchActivationMap(model, "blocks.0", element="1")
    with pytest.raises(ValueError, match="element must be >= 0"):
        cv.PatchActivationMap(model, "blocks.0", element=-1)
    assert hooks_left(model) == 0
