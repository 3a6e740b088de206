"""Shared plumbing of the public methods: wrapping, layouts per size, unit checks."""

from __future__ import annotations

import pytest
import torch
from archs import TIMM_ARCHS, open_clip_model

from captum_vit._base import _LayerMethod, as_unit_tensor
from captum_vit.capture import capture_layers


def test_layer_method_layout_and_forward_match_direct_capture():
    factory, size = TIMM_ARCHS["vit_dynamic"]
    model = factory()
    method = _LayerMethod(model, "blocks.1.mlp.fc1")
    images = torch.rand(2, 3, *size)
    layout = method.layout_for(images)
    assert (layout.grid, layout.num_prefix_tokens) == ((5, 8), 1)
    assert method.layout_for(torch.rand(2, 3, 32, 32)).grid == (4, 4)
    out = method.forward_to_layer(images)
    expected = capture_layers(model, "blocks.1.mlp.fc1", method.normalize(images))
    torch.testing.assert_close(out, expected)


def test_layer_method_on_clip_uses_the_vision_tower():
    model = open_clip_model()
    method = _LayerMethod(model, "visual.transformer.resblocks.0")
    assert method.layer_name == "transformer.resblocks.0"
    assert method.vision is model.visual
    with pytest.raises(ValueError, match="32x32 images only"):
        method.check_images(torch.rand(1, 3, 48, 48))


def test_as_unit_tensor():
    assert as_unit_tensor(3, 8).tolist() == [3]
    assert as_unit_tensor([1, 2], 8).tolist() == [1, 2]
    assert as_unit_tensor(torch.tensor([7]), 8).tolist() == [7]
    with pytest.raises(IndexError, match="8 channels"):
        as_unit_tensor([1, 8], 8)
    with pytest.raises(TypeError):
        as_unit_tensor(1.5, 8)
    with pytest.raises(ValueError, match="empty"):
        as_unit_tensor([], 8)
