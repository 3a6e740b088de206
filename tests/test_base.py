"""Shared plumbing of the public methods: wrapping, layouts per size, unit checks."""

from __future__ import annotations

import inspect
import pydoc

import numpy as np
import pytest
import torch
from archs import TIMM_ARCHS, open_clip_model

import captum_vit as cv
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


@pytest.mark.parametrize(
    "name",
    ["FeatureVisualization", "PatchActivationMap", "TopActivatingExamples", "SpatialLocalityProbe"],
)
def test_help_shows_our_constructor_and_attribute_docs(name):
    cls = getattr(cv, name)
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "device_ids" not in text and "forward_func" not in text
    init = inspect.getdoc(cls.__init__)
    for words in ("model:", "image_size", "mean, std"):
        assert words in init, (name, words)
    assert "inputs" in inspect.getdoc(cls.attribute)
    parameters = inspect.signature(cls.__init__).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    first = list(inspect.signature(cls.attribute).parameters)[1]
    assert first == "inputs", (name, first)


def test_types_and_values_are_refused_consistently():
    model, size = TIMM_ARCHS["vit"]
    model = model()
    with pytest.raises(TypeError, match="k must be a positive int"):
        cv.TopActivatingExamples(model, "blocks.0", k=2.0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        cv.TopActivatingExamples(model, "blocks.0", k=0)
    top = cv.TopActivatingExamples(model, "blocks.0", k=np.int64(3))  # e.g. from an array
    assert type(top.k) is int and top.k == 3
    with pytest.raises(TypeError, match="attribute_to_layer_input"):
        cv.PatchActivationMap(model, "blocks.0", attribute_to_layer_input=1)
    with pytest.raises(TypeError, match="call"):
        cv.PatchActivationMap(model, "blocks.0", call="first")
    with pytest.raises(TypeError, match="layer must be"):
        cv.PatchActivationMap(model, 3)
    with pytest.raises(ValueError, match="unknown layer"):
        cv.PatchActivationMap(model, "blocks.7")
    pam = cv.PatchActivationMap(model, "blocks.0")
    with pytest.raises(TypeError, match="attribute_to_layer_input"):
        pam.attribute(torch.rand(1, 3, *size), target=0, attribute_to_layer_input="yes")
    with pytest.raises(TypeError, match="float"):
        pam.attribute(torch.zeros(1, 3, *size, dtype=torch.uint8), target=0)
    with pytest.raises(ValueError, match="255"):
        pam.attribute(torch.full((1, 3, *size), 128.0), target=0)


def test_units_from_numpy_are_accepted_everywhere():
    """Units often come from numpy (``np.argsort(scores)[-2:]``); they were refused as
    'got ndarray' / 'got int64' by FeatureVisualization and made PatchActivationMap ask
    for one unit per image."""
    model = TIMM_ARCHS["vit"][0]()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layer = "blocks.1.mlp.act"
    pam = cv.PatchActivationMap(model, layer)
    torch.testing.assert_close(pam.attribute(x, target=np.int64(5)), pam.attribute(x, target=5))
    torch.testing.assert_close(
        pam.attribute(x, target=np.array([5, 7])), pam.attribute(x, target=[5, 7])
    )
    direction = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    torch.testing.assert_close(
        pam.attribute(x, target=direction), pam.attribute(x, target=torch.from_numpy(direction))
    )
    top = cv.TopActivatingExamples(model, layer, k=1)
    assert top.attribute(x, target=np.array([3, 4])).channels.tolist() == [3, 4]
    fv = cv.FeatureVisualization(model, layer)
    expected = fv.attribute(target=[1, 2], steps=2, preset="fast")
    for units in (np.array([1, 2]), [np.int64(1), np.int64(2)]):
        torch.testing.assert_close(fv.attribute(target=units, steps=2, preset="fast"), expected)
    assert cv.objectives.channel(np.int64(3)).terms()[0][1].unit == 3


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_methods_work_inside_no_grad_and_inference_mode(context):
    """Users wrap evaluation code in torch.no_grad() / torch.inference_mode(): the probe
    failed there ('does not require grad', 'Inference tensors cannot be saved for
    backward') and feature visualization under inference mode; both now give the results
    they give outside, built and called inside the block."""
    model = TIMM_ARCHS["vit"][0]()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    locality = cv.SpatialLocalityProbe(model).attribute(x).locality
    images = cv.FeatureVisualization(model, "blocks.1").attribute(target=[3], steps=3)
    with context():
        inside = cv.SpatialLocalityProbe(model).attribute(x).locality
        optimized = cv.FeatureVisualization(model, "blocks.1").attribute(target=[3], steps=3)
    torch.testing.assert_close(inside, locality)
    torch.testing.assert_close(optimized, images)
