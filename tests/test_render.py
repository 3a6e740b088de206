"""Rendering: Captum's scaling conventions (checked against Captum's own code), overlays,
grids, and a real-photograph end-to-end check with a planted unit."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from archs import TIMM_ARCHS  # noqa: E402
from captum.attr import visualization as viz  # noqa: E402
from captum.attr._utils.visualization import (  # noqa: E402
    _cumulative_sum_threshold,
    _normalize_attr,
)
from PIL import Image  # noqa: E402

import captum_vit as cv  # noqa: E402
from captum_vit import render  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "colorwheel")


def photos(size):
    """Centre squares of scikit-image's photographs, resized to size x size, in [0, 1]."""
    out = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()[..., :3]
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = torch.from_numpy(array[top : top + side, left : left + side].copy())
        image = square.permute(2, 0, 1).float()[None] / 255
        out.append(F.interpolate(image, size=(size, size), mode="area")[0])
    return torch.stack(out)


@pytest.mark.parametrize("sign", ["positive", "negative", "absolute_value", "all"])
def test_normalize_map_equals_captum(sign):
    values = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    for outlier in (0, 2, 30):
        ours = render.normalize_map(values, sign=sign, outlier_perc=outlier)
        theirs = _normalize_attr(values.double().numpy(), sign, outlier)
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-6)


def test_overlay_blends_image_and_colormap():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    activation = torch.zeros(16, 16)
    activation[:, 8:] = 5.0
    assert torch.allclose(render.overlay(image, activation, alpha=0.0), image)
    heat = render.overlay(image, activation, alpha=1.0, cmap="inferno")
    inferno = matplotlib.colormaps["inferno"]
    assert torch.allclose(heat[:, 3, 12], torch.tensor(inferno(1.0)[:3]).float(), atol=1e-6)
    assert torch.allclose(heat[:, 3, 2], torch.tensor(inferno(0.0)[:3]).float(), atol=1e-6)
    half = render.overlay(image, activation, alpha=0.5)
    torch.testing.assert_close(half, 0.5 * image + 0.5 * heat)
    # A patch map (2 x 2) is upsampled to the image, bilinearly.
    coarse = render.overlay(image, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), alpha=1.0)
    assert coarse.shape == (3, 16, 16)
    assert torch.allclose(coarse[:, 0, 15], heat[:, 0, 15], atol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        render.overlay(image, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="sign"):
        render.overlay(image, activation, sign="pos")
    # Maps as numpy arrays (as Captum's visualization takes them) draw the same.
    torch.testing.assert_close(render.overlay(image, activation.numpy(), alpha=0.5), half)
    torch.testing.assert_close(
        render.heatmap(activation.numpy()[:8, 4:12]), render.heatmap(activation[:8, 4:12])
    )
    with pytest.raises(TypeError, match="a map must be a tensor or numpy array, got list"):
        render.overlay(image, activation.tolist())
    with pytest.raises(TypeError, match="to_tensor"):
        render.overlay(render.to_pil(image), activation)


def test_captum_arrays_work_with_captum_visualization():
    image = torch.rand(3, 24, 24)
    attr, original = render.captum_arrays(torch.rand(3, 3), image)
    assert attr.shape == (24, 24, 1) and original.shape == (24, 24, 3)
    figure, _ = viz.visualize_image_attr(
        attr, original, method="blended_heat_map", sign="positive", use_pyplot=False
    )
    assert figure is not None


def test_captum_arrays_are_drawable_by_captum_or_refused():
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    signed = torch.linspace(-1, 1, 9).view(3, 3)
    attr, original = render.captum_arrays(signed, image, sign=["positive", "negative", "all"])
    assert attr.dtype == np.float32 and original.dtype == np.float32
    figure, _ = viz.visualize_image_attr_multiple(
        attr,
        original,
        methods=["original_image", "blended_heat_map", "heat_map"],
        signs=["all", "positive", "negative"],
        use_pyplot=False,
    )
    assert len(figure.axes) >= 3
    # Captum itself cannot draw an all-zero map or a map without the asked-for sign ...
    zeros, negative = torch.zeros(3, 3), -torch.rand(3, 3) - 0.1
    for values, sign in ((zeros, "positive"), (negative, "positive"), (zeros, "all")):
        raw = render._resize_map(values, (24, 24)).numpy()[..., None]
        with pytest.raises(AssertionError, match="scale factor = 0"):
            viz.visualize_image_attr(raw, original, sign=sign, use_pyplot=False)
        # ... so our helper says why, naming the sign, instead of handing it over.
        with pytest.raises(ValueError, match=f"sign='{sign}'.*scale factor = 0"):
            render.captum_arrays(values, image, sign=sign)
    # The same maps with a sign that keeps their values are drawn.
    attr, original = render.captum_arrays(negative, image, sign="negative")
    figure, _ = viz.visualize_image_attr(
        attr, original, method="blended_heat_map", sign="negative", use_pyplot=False
    )
    assert figure is not None
    with pytest.raises(ValueError, match="NaN"):
        render.captum_arrays(torch.full((3, 3), float("nan")), image)


def test_unit_grid_layout_and_png(tmp_path):
    images = torch.rand(3, 3, 20, 20)
    maps = torch.rand(3, 4, 4)
    grid = render.unit_grid(images, maps, visualization=torch.rand(3, 40, 40))
    assert grid.size == (4 * (20 + 2) + 2, 20 + 4)
    with_scores = render.unit_grid(images, maps, scores=[3.0, 2.0, 1.0], originals=True)
    assert with_scores.width == 3 * 22 + 2 and with_scores.height > 2 * 22
    render.save_png(with_scores, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == with_scores.size
    with pytest.raises(ValueError, match="one per image"):
        render.unit_grid(images, maps[:2])
    with pytest.raises(ValueError, match="cell_size must be a positive number"):
        render.unit_grid(images, maps, cell_size=0)  # was the default size, silently


def test_example_grid_says_when_the_dataset_is_not_the_scanned_one():
    model = TIMM_ARCHS["vit"][0]()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    examples = cv.TopActivatingExamples(model, "blocks.1.mlp.act", k=2).attribute([images])
    unit = int(examples.channels[0])
    assert render.example_grid(examples, unit, images).size[1] > 0
    last = int(examples.unit(unit)[1].max())  # two distinct images: at least index 1
    with pytest.raises(IndexError, match=f"point at image {last}, but the dataset holds 1"):
        render.example_grid(examples, unit, images[:1])


def planted_blue_detector():
    """The tiny ViT with patch-embedding channel 0 set to 'mean blue minus mean red and
    green' of its 8x8 patch: the ground truth of that unit is an average pool."""
    factory, size = TIMM_ARCHS["vit"]
    model = factory()
    with torch.no_grad():
        proj = model.patch_embed.proj
        proj.weight[0] = 0
        proj.weight[0, 2] = 1 / 64
        proj.weight[0, :2] = -0.5 / 64
        proj.bias[0] = 0
    return model, size


def test_photographs_top_examples_and_grid_match_planted_blueness():
    model, size = planted_blue_detector()
    images = photos(size[0])
    blueness = images[:, 2] - images[:, :2].mean(1)
    truth = F.avg_pool2d(blueness[:, None], 8)[:, 0]  # (N, 4, 4)
    ex = cv.TopActivatingExamples(model, "patch_embed.proj", k=3, mean=(0,) * 3, std=(1,) * 3)
    result = ex.attribute(images.split(4), target=[0])
    order = truth.flatten(1).mean(1).argsort(descending=True)[:3]
    assert torch.equal(result.indices[0], order)
    torch.testing.assert_close(result.maps[0], truth[order], atol=1e-5, rtol=1e-5)
    pam = cv.PatchActivationMap(model, "patch_embed.proj", mean=(0,) * 3, std=(1,) * 3)
    torch.testing.assert_close(pam.attribute(images, target=0), truth, atol=1e-5, rtol=1e-5)

    # A gray heat map alone (alpha 1) on one shared scale: each cell's grey level is the
    # truth upsampled bilinearly, scaled as Captum scales the three maps together.
    grid = render.example_grid(result, 0, images, alpha=1.0, cmap="gray")
    pixels = np.asarray(grid).astype(float).mean(2) / 255  # one row of 3 cells, pad 2
    kept = truth[order].numpy().astype(np.float64)
    threshold = _cumulative_sum_threshold(np.maximum(kept, 0), 98)  # Captum's, outlier 2%
    up = F.interpolate(truth[order][:, None], size=size, mode="bilinear")[:, 0]
    expected = (up / threshold).clamp(0, 1).numpy()
    for cell in range(3):
        left = 2 + cell * 34
        np.testing.assert_allclose(pixels[2:34, left : left + 32], expected[cell], atol=2 / 255)
    with pytest.raises(IndexError, match="not in this ExampleSet"):
        render.example_grid(result, 5, images)


def test_images_outside_the_unit_range_are_refused_not_drawn_white():
    """Before, to_pil clipped 0-255 values to 1: a photograph came out all white."""
    photo = skimage.data.astronaut()[:32, :32]  # (H, W, 3) uint8
    with pytest.raises(ValueError, match=r"got values in \[.*\]: divide 0-255 images by 255"):
        render.to_pil(photo)
    tensor = torch.from_numpy(photo).permute(2, 0, 1).float()
    with pytest.raises(ValueError, match="an image must hold RGB values in"):
        render.to_pil(tensor)
    with pytest.raises(ValueError, match="divide 0-255"):
        render.image_grid([tensor])
    with pytest.raises(ValueError, match="NaN or inf values in an image"):
        render.to_pil(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"one image of a batch take images\[i\]"):
        render.overlay(tensor[None] / 255, torch.rand(1, 4, 4))
    drawn = np.asarray(render.to_pil(tensor / 255))
    assert np.abs(drawn.astype(int) - photo).max() <= 1  # what is in range round-trips
