"""Captum's own layer methods through cv.patch_grid, and cv.patch_feature_mask, against hand
computations: the test's own hooks, prefix tokens dropped and tokens reshaped by hand."""

from __future__ import annotations

import pytest
import torch
from archs import TIMM_ARCHS, hooks_left, images, open_clip_tower
from captum.attr import (
    FeatureAblation,
    InternalInfluence,
    LayerActivation,
    LayerAttribution,
    LayerConductance,
    LayerDeepLift,
    LayerFeatureAblation,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Occlusion,
)

import captum_vit as cv


def tokens_to_grid(tokens, prefix, h, w):
    batch, _, channels = tokens.shape
    return tokens[:, prefix:].reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def build(arch):
    if arch == "open_clip":
        return open_clip_tower(), (32, 32)
    if arch == "open_clip_nbc":
        return open_clip_tower(batch_first=False), (32, 32)
    factory, size = TIMM_ARCHS[arch]
    return factory(), size


# arch -> (layer, raw layer output -> (B, C, h, w) by hand)
GRADCAM_CASES = {
    "vit_dynamic": ("blocks.0", lambda o: tokens_to_grid(o, 1, 5, 8)),  # 40x64, patch 8
    "deit_distilled": ("blocks.0", lambda o: tokens_to_grid(o, 2, 4, 4)),
    "dinov2_reg": ("blocks.0", lambda o: tokens_to_grid(o, 5, 4, 4)),
    "swin": ("layers.1.blocks.1", lambda o: o.permute(0, 3, 1, 2)),
    "open_clip": ("transformer.resblocks.0", lambda o: tokens_to_grid(o, 1, 4, 4)),
}


def hand_gradcam(model, layer, to_grid, x, target, relu=False):
    """Gradients of the target logit at the patch tokens, averaged over tokens per channel,
    times activations, summed over channels."""
    module = dict(model.named_modules())[layer]
    store = []
    handle = module.register_forward_hook(lambda m, a, o: store.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, target].sum(), store[0])
    acts, grads = to_grid(store[0]).detach(), to_grid(grad)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = (weights * acts).sum(dim=1, keepdim=True)
    return cam.relu() if relu else cam


@pytest.mark.parametrize("arch", list(GRADCAM_CASES))
def test_layer_gradcam_through_patch_grid_equals_hand_computation(arch):
    model, size = build(arch)
    with torch.no_grad():  # DINOv2's LayerScale starts at 1e-5: make the gradients visible
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.fill_(1.0)
    layer, to_grid = GRADCAM_CASES[arch]
    x = images(size)
    expected = hand_gradcam(model, layer, to_grid, x, target=3)
    with cv.patch_grid(model, layer, x) as grid:
        cam = LayerGradCam(model, grid).attribute(x, target=3)
        relu_cam = LayerGradCam(model, grid).attribute(x, target=3, relu_attributions=True)
    assert cam.shape == expected.shape == (2, 1, *grid.layout.grid)
    assert torch.allclose(cam, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(relu_cam, expected.relu(), atol=1e-5, rtol=1e-4)
    assert expected.abs().max() > 1e-4  # the check is not vacuous
    assert hooks_left(model) == 0


def test_every_captum_layer_method_returns_the_patch_grid():
    model, size = build("vit")
    x = images(size)
    layer_mask = torch.arange(16).view(1, 1, 4, 4)
    with cv.patch_grid(model, "blocks.0", x) as grid:
        shapes = {
            "activation": LayerActivation(model, grid).attribute(x).shape,
            "gradxact": LayerGradientXActivation(model, grid).attribute(x, target=1).shape,
            "ig": LayerIntegratedGradients(model, grid).attribute(x, target=1, n_steps=4).shape,
            "conductance": LayerConductance(model, grid).attribute(x, target=1, n_steps=4).shape,
            "deeplift": LayerDeepLift(model, grid).attribute(x, target=1).shape,
            "ablation": LayerFeatureAblation(model, grid)
            .attribute(x, target=1, layer_mask=layer_mask)
            .shape,
            "influence": InternalInfluence(model, grid).attribute(x, target=1, n_steps=4).shape,
        }
        activation = LayerActivation(model, grid).attribute(x)
    assert set(shapes.values()) == {torch.Size([2, 32, 4, 4])}
    out = {}
    handle = model.blocks[0].register_forward_hook(lambda m, a, o: out.setdefault("o", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert torch.equal(activation, tokens_to_grid(out["o"], 1, 4, 4))
    up = LayerAttribution.interpolate(activation, (32, 32))
    assert up.shape == (2, 32, 32, 32)


SPLICE_CASES = [
    ("vit", "blocks.1.mlp.fc1", {}),
    ("deit_distilled", "blocks.0", {}),
    ("swin", "layers.0.blocks.1", {}),
    ("swin", "layers.0.blocks.1.mlp.fc1", {}),
    ("pit", "transformers.1", {}),
    ("coat_lite", "cpe2", {"call": 1}),
    ("open_clip_nbc", "transformer.resblocks.0", {}),
    ("vit", "blocks.1.mlp.fc2", {"attribute_to_layer_input": True}),
]


@pytest.mark.parametrize("arch,layer,kwargs", SPLICE_CASES, ids=lambda v: str(v))
def test_splice_computes_exactly_what_the_model_computed(arch, layer, kwargs):
    model, size = build(arch)
    x = images(size)
    with torch.no_grad():
        before = model(x)
    flags = [p.requires_grad for p in model.parameters()]
    with cv.patch_grid(model, layer, x, **kwargs) as grid, torch.no_grad():
        seen = []
        handle = grid.register_forward_hook(lambda m, a, o: seen.append(o))
        during = model(x)
        handle.remove()
    assert torch.equal(during, before)
    assert len(seen) == 1 and seen[0].shape[-2:] == grid.layout.grid
    assert seen[0].shape[1] == grid.layout.num_channels
    assert hooks_left(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags


def test_model_left_as_found_after_an_exception():
    model, size = build("vit")
    x = images(size)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with cv.patch_grid(model, "blocks.0", x) as grid:
            LayerGradCam(model, grid).attribute(x, target=0)
            raise RuntimeError("boom")
    assert hooks_left(model) == 0
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_wrong_input_size_inside_the_block_names_the_fix():
    model, _ = build("vit_dynamic")
    with cv.patch_grid(model, "blocks.0", images((40, 64))) as grid:
        with pytest.raises(ValueError, match="pass inputs= of the size"):
            LayerActivation(model, grid).attribute(images((32, 32)))
    assert hooks_left(model) == 0


@pytest.mark.parametrize("arch,layer", [("cait", "blocks_token_only.0"), ("vit", "head")])
def test_non_spatial_layer_raises(arch, layer):
    model, size = build(arch)
    with pytest.raises(ValueError, match="not spatial|no patch"):
        with cv.patch_grid(model, layer, images(size)):
            pass
    assert hooks_left(model) == 0


def test_integrated_gradients_add_up_to_the_patch_token_swap():
    model, size = build("vit")
    x, baseline = images(size, seed=1), images(size, seed=2) * 0.1
    target = 2
    with cv.patch_grid(model, "blocks.0", x) as grid:
        attr = LayerIntegratedGradients(model, grid).attribute(
            x, baselines=baseline, target=target, n_steps=64
        )
    assert attr.shape == (2, 32, 4, 4)
    # Oracle: the target logit with the layer's patch tokens taken from the baseline input.
    block = model.blocks[0]
    with torch.no_grad():
        base_tokens = []
        h = block.register_forward_hook(lambda m, a, o: base_tokens.append(o))
        model(baseline)
        h.remove()
        swap = block.register_forward_hook(
            lambda m, a, o: torch.cat([o[:, :1], base_tokens[0][:, 1:]], dim=1)
        )
        swapped = model(x)[:, target]
        swap.remove()
        full = model(x)[:, target]
    change = full - swapped
    total = attr.sum(dim=(1, 2, 3))
    assert torch.allclose(total, change, rtol=0.05, atol=1e-3 * change.abs().max())
    assert change.abs().min() > 1e-3
    # with_prefix=True attributes the prefix tokens too: Captum's delta becomes small.
    with cv.patch_grid(model, "blocks.0", x, with_prefix=True) as grid:
        (patches, prefix), delta = LayerIntegratedGradients(model, grid).attribute(
            x, baselines=baseline, target=target, n_steps=64, return_convergence_delta=True
        )
    with torch.no_grad():
        expected = full - model(baseline)[:, target]
    assert patches.shape == (2, 32, 4, 4) and prefix.shape == (2, 1, 32)
    assert torch.allclose(
        patches.sum(dim=(1, 2, 3)) + prefix.sum(dim=(1, 2)), expected, rtol=0.05, atol=1e-3
    )
    assert delta.abs().max() < 0.05 * expected.abs().max()
    assert hooks_left(model) == 0


def test_feature_ablation_with_patch_mask_equals_ablating_each_patch_by_hand():
    model, size = build("vit")  # 32x32, patch 8 -> 4x4 patches
    x = images(size)
    target = 4
    mask = cv.patch_feature_mask(model, x)
    assert mask.shape == (1, 1, 32, 32) and mask.grid == (4, 4)
    assert mask.sliding_window_shapes == (3, 8, 8) and mask.strides == (3, 8, 8)
    with torch.no_grad():
        attr = FeatureAblation(model).attribute(x, target=target, feature_mask=mask)
        occlusion = Occlusion(model).attribute(
            x, target=target, sliding_window_shapes=mask.sliding_window_shapes, strides=mask.strides
        )
        full = model(x)[:, target]
        expected = torch.zeros_like(x)
        for row in range(4):
            for col in range(4):
                ablated = x.clone()
                ablated[:, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 0
                drop = full - model(ablated)[:, target]
                expected[:, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = drop.view(2, 1, 1, 1)
    assert torch.allclose(attr, expected, atol=1e-5)
    assert torch.allclose(occlusion, expected, atol=1e-5)


def test_patch_feature_mask_follows_padded_border_patches():
    from archs import padded_vit

    model = padded_vit(depth=1)
    x = images((44, 64))  # 44 = 5 * 8 + 4: timm pads a sixth row of patches
    mask = cv.patch_feature_mask(model, x)
    assert mask.grid == (6, 8)
    assert torch.equal(mask[0, 0, :, 0].unique(), torch.arange(6) * 8)
    assert torch.equal(mask[0, 0, 40:44, 0], torch.full((4,), 40))


@pytest.mark.parametrize("arch", ["gemma4", "naflex"])
def test_patch_feature_mask_on_a_linear_patch_embedding(arch):
    """Gemma 4 and NaFlexViT project flattened patches with an nn.Linear: there is no
    patch convolution, and their patch embedding returns the grid (raster coordinates /
    its size) beside the tokens. Both were refused as having no patch embedding."""
    from archs import _VIT, timm_model

    if arch == "gemma4":
        model, size = build("gemma4")
    else:
        model, size = timm_model("naflexvit_base_patch16_gap", **dict(_VIT, depth=1)), (32, 32)
    x = images(size)
    mask = cv.patch_feature_mask(model, x)
    rows, cols = size[0] // 8, size[1] // 8
    expected = torch.arange(rows * cols).view(rows, cols)
    expected = expected.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert mask.grid == (rows, cols) and mask.patch_size == (8, 8)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(cv.patch_feature_mask(cv.ImageModel(model), x), mask)
    assert hooks_left(model) == 0


def test_patch_feature_mask_refuses_overlapping_patches():
    model, size = build("pit")
    with pytest.raises(ValueError, match="overlapping"):
        cv.patch_feature_mask(model, images(size))


def test_patch_feature_mask_refuses_what_is_not_an_image_batch():
    model, size = build("vit")
    x = images(size)
    with pytest.raises(ValueError, match=r"got \(3, .*images\[None\]"):
        cv.patch_feature_mask(model, x[0])
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor, got ndarray; convert"):
        cv.patch_feature_mask(model, x.numpy())
    with pytest.raises(TypeError, match="a model was passed where the images go"):
        cv.patch_feature_mask(x, model)


def noisy_copies(x, samples, stdev, seed):
    """The images NoiseTunnel draws after ``torch.manual_seed(seed)``: each image repeated
    ``samples`` times plus N(0, stdev) noise."""
    torch.manual_seed(seed)
    expanded = x.repeat_interleave(samples, dim=0)
    return expanded + torch.normal(0, torch.full(expanded.shape, stdev))


def test_noise_tunnel_smooths_patch_activation_maps_and_rollout():
    """Captum's NoiseTunnel calls ``attribute.__wrapped__`` on noisy images outside [0, 1];
    the maps are the mean of the block's own activations over those images."""
    from captum.attr import NoiseTunnel

    model, size = build("vit")
    x = images(size)
    samples, stdev = 4, 0.2
    noisy = noisy_copies(x, samples, stdev, seed=3)
    assert noisy.min() < -0.1 and noisy.max() > 1.1  # the public call would refuse these

    torch.manual_seed(3)
    pam = cv.PatchActivationMap(model, "blocks.1")
    smooth = NoiseTunnel(pam).attribute(x, nt_samples=samples, stdevs=stdev, target=5)
    normalized = cv.ImageModel(model).normalize(noisy)
    (blocks,) = model.forward_intermediates(normalized, indices=[1], intermediates_only=True)
    expected = blocks[:, 5].reshape(len(x), samples, *blocks.shape[-2:]).mean(1)
    torch.testing.assert_close(smooth, expected, atol=1e-5, rtol=1e-5)

    rollout = cv.AttentionRollout(model)
    torch.manual_seed(3)
    smooth = NoiseTunnel(rollout).attribute(x, nt_samples=samples, stdevs=stdev)
    each = type(rollout).attribute.__wrapped__(rollout, noisy)
    torch.testing.assert_close(smooth, each.reshape(len(x), samples, *each.shape[1:]).mean(1))
    assert not hooks_left(model)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):  # the user's own images still are
        pam.attribute(noisy, target=5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        rollout.attribute(noisy)


def test_grid_interpolate_puts_captum_attributions_on_the_covered_pixels():
    """Grad-CAM through the grid of a padding ViT on 36x44 images (5x6 patches over
    40x48): grid.interpolate places each cell on its patch's pixels, which
    LayerAttribution.interpolate's stretch does not; on whole patches the two agree."""
    from archs import padded_vit
    from test_activation_map import nearest_cell

    model = padded_vit()
    for size in [(36, 44), (40, 48)]:
        x = images(size)
        with cv.patch_grid(model, "blocks.0", x) as grid:  # the last block's is 0 (cls)
            cam = LayerGradCam(model, grid).attribute(x, target=1).detach()
        assert cam.shape == (len(x), 1, 5, 6) and cam.abs().amin() > 0
        up = grid.interpolate(cam, mode="nearest")
        torch.testing.assert_close(up, nearest_cell(cam, size, 8))
        stretched = LayerAttribution.interpolate(cam, size, "bilinear")
        assert torch.allclose(grid.interpolate(cam), stretched) == (size == (40, 48))
    with pytest.raises(ValueError, match="not on this 5x6 patch grid"):
        grid.interpolate(cam[..., :4])
