"""bfloat16 / float16 models on the CPU: every public method takes float32 [0, 1] images,
casts them once where they enter the model, and returns float32 results that agree with
the same model in float32 (up to half-precision rounding)."""

from __future__ import annotations

import pytest
import torch
from archs import TIMM_ARCHS

import captum_vit as cv

HALF = [torch.bfloat16, torch.float16]


def vit_pair(dtype):
    """The same small ViT in float32 and in ``dtype``."""
    full = TIMM_ARCHS["vit"][0]()
    half = TIMM_ARCHS["vit"][0]().to(dtype)
    return full, half


def images(batch=3, seed=0):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def scale(t):
    return float(t.abs().max())


@pytest.mark.parametrize("dtype", HALF)
def test_patch_activation_map(dtype):
    full, half = vit_pair(dtype)
    x = images()
    expected = cv.PatchActivationMap(full, "blocks.1.mlp.fc1").attribute(x, target=5)
    maps = cv.PatchActivationMap(half, "blocks.1.mlp.fc1").attribute(x, target=5)
    assert maps.dtype == torch.float32 and maps.device == x.device
    torch.testing.assert_close(maps, expected, atol=0.05 * scale(expected), rtol=0)
    direction = torch.randn(128, generator=torch.Generator().manual_seed(1))
    projected = cv.PatchActivationMap(half, "blocks.1").attribute(x, target=direction[:32])
    assert projected.dtype == torch.float32
    assert x.dtype == torch.float32  # the caller's images are not cast in place


@pytest.mark.parametrize("dtype", HALF)
def test_top_activating_examples(dtype):
    full, half = vit_pair(dtype)
    x = images(batch=6)
    expected = cv.TopActivatingExamples(full, "blocks.1", k=6).attribute(x, target=[0, 1, 2])
    result = cv.TopActivatingExamples(half, "blocks.1", k=6).attribute(x, target=[0, 1, 2])
    assert result.scores.dtype == torch.float32 and result.maps.dtype == torch.float32
    # Keep every image (k = batch): compare the scores image by image.
    by_image = lambda r: r.scores.gather(1, r.indices.argsort(1))  # noqa: E731
    torch.testing.assert_close(
        by_image(result), by_image(expected), atol=0.05 * scale(expected.scores), rtol=0
    )


@pytest.mark.parametrize("dtype", HALF)
def test_spatial_locality_probe(dtype):
    full, half = vit_pair(dtype)
    x = images(batch=1)
    expected = cv.SpatialLocalityProbe(full).attribute(x, positions=4)
    report = cv.SpatialLocalityProbe(half).attribute(x, positions=4)
    assert report.locality.dtype == torch.float32 and report.fields.dtype == torch.float32
    torch.testing.assert_close(report.locality, expected.locality, atol=0.03, rtol=0)
    assert report.feeds_output == expected.feeds_output == [True, False]


@pytest.mark.parametrize("dtype", HALF)
def test_feature_visualization(dtype):
    _, half = vit_pair(dtype)
    fv = cv.FeatureVisualization(half, "blocks.1.mlp.fc1")
    start = images(batch=1)
    result = fv.attribute(start, target=[3, 4], preset=None, steps=3)
    assert result.dtype == torch.float32 and result.shape == (2, 3, 32, 32)
    assert torch.isfinite(result).all() and 0 <= result.min() and result.max() <= 1
    assert not torch.equal(result[0], start[0])  # the optimization moved the pixels
    assert next(half.parameters()).dtype == dtype


def test_image_model_casts_once_where_images_enter():
    _, half = vit_pair(torch.bfloat16)
    wrapped = cv.ImageModel(half)
    x = images(batch=2).requires_grad_(True)
    normalized = wrapped.normalize(x)
    assert normalized.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(wrapped(x).float().sum(), x)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
