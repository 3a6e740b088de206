"""Model adapters: unwrapping, normalization, input size, image checks."""

from __future__ import annotations

import pytest
import timm
import torch
from archs import open_clip_model, open_clip_tower

from captum_vit.models import ImageModel, check_images, fixed_input_size, input_config


def test_timm_config_and_size_precedence():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    config = input_config(model)
    assert config.size == (32, 32)  # the model's own size wins over pretrained_cfg's 224
    assert config.mean == pytest.approx(model.pretrained_cfg["mean"])
    assert config.std == pytest.approx(model.pretrained_cfg["std"])
    assert input_config(model, image_size=48).size == (48, 48)
    assert input_config(model, mean=0.5, std=(0.25,)).std == (0.25, 0.25, 0.25)
    cnn = timm.create_model("resnet18")
    assert input_config(cnn).size == (224, 224)  # from pretrained_cfg
    with pytest.raises(ValueError, match="std must be positive"):
        input_config(model, std=0)


def test_open_clip_unwraps_and_reads_preprocess_cfg():
    model = open_clip_model()
    wrapped = ImageModel(model)
    assert wrapped.model is model.visual
    assert wrapped.image_size == (32, 32)
    model.visual.preprocess_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "size": 32}
    assert input_config(model).mean == (0.1, 0.2, 0.3)
    bare = input_config(open_clip_tower())  # no config: open_clip's OpenAI defaults
    assert bare.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_image_model_normalizes_inside():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    wrapped = ImageModel(model, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model((x - mean) / std))
    assert ImageModel(wrapped).model is model


def test_fixed_input_size():
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    dynamic = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, dynamic_img_size=True
    )
    assert fixed_input_size(fixed) == (32, 32)
    assert fixed_input_size(dynamic) is None
    assert fixed_input_size(timm.create_model("resnet18")) is None
    assert fixed_input_size(open_clip_model()) == (32, 32)


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.rand(2, 1, 32, 32), ValueError, "RGB"),
        (torch.rand(3, 32, 32), ValueError, r"\(B, 3, H, W\)"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
        (torch.rand(1, 3, 16, 32), ValueError, "32x32 images only"),
        ([1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_check_images(images, error, match):
    with pytest.raises(error, match=match):
        check_images(images, size=(32, 32))
