"""Objectives: values against a plain hook + reshape, on every layout; algebra; errors."""

from __future__ import annotations

import pytest
import torch
from archs import TIMM_ARCHS, hooked, images, open_clip_tower

import captum_vit.optim.objectives as obj
from captum_vit.capture import capture_layers
from captum_vit.layout import resolve_layout


def score(objective, model, layer, x, **kwargs):
    layout = resolve_layout(model, layer, x)
    scorer = obj.compile_objectives([objective], layout, layout.num_channels, **kwargs)
    with torch.no_grad():
        return scorer(capture_layers(model, layer, x))


def test_channel_neuron_cls_on_bnc_with_two_prefix_tokens():
    model = TIMM_ARCHS["deit_distilled"][0]()
    x = images((32, 32))
    out = hooked(model, "blocks.1.mlp.fc1", x)  # (2, 2 + 16, 128): cls, dist, 4x4 patches
    torch.testing.assert_close(
        score(obj.channel(7), model, "blocks.1.mlp.fc1", x), out[:, 2:, 7].mean(1)
    )
    torch.testing.assert_close(
        score(obj.channel(7, "all"), model, "blocks.1.mlp.fc1", x), out[:, :, 7].mean(1)
    )
    torch.testing.assert_close(
        score(obj.neuron(7, (1, 2)), model, "blocks.1.mlp.fc1", x), out[:, 2 + 1 * 4 + 2, 7]
    )
    torch.testing.assert_close(score(obj.neuron(7, 1), model, "blocks.1.mlp.fc1", x), out[:, 1, 7])
    torch.testing.assert_close(score(obj.cls(7), model, "blocks.1.mlp.fc1", x), out[:, 0, 7])


def test_algebra_matches_the_same_combination_by_hand():
    model = TIMM_ARCHS["vit"][0]()
    x = images((32, 32))
    out = hooked(model, "blocks.0", x)  # (2, 17, 32)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    combo = 2 * obj.channel(3) - obj.neuron(5, (0, 1)) * 0.5 + obj.direction(v) / 4 - obj.cls(1)
    expected = (
        2 * out[:, 1:, 3].mean(1)
        - 0.5 * out[:, 1 + 1, 5]
        + (out[:, 1:].mean(1) @ v) / 4
        - out[:, 0, 1]
    )
    torch.testing.assert_close(score(combo, model, "blocks.0", x), expected)
    cos = score(obj.direction(v, cosine=True), model, "blocks.0", x)
    pooled = out[:, 1:].mean(1)
    torch.testing.assert_close(cos, torch.cosine_similarity(pooled, v[None], dim=1))
    assert "channel" in repr(combo).lower()


@pytest.mark.parametrize(
    "arch, layer",
    [
        ("swin", "layers.0.blocks.1"),  # BHWC
        ("resnet", "layer2"),  # BCHW (CNN channels)
        ("pit", "transformers.1"),  # (BCHW, cls) tuple
    ],
)
def test_channel_on_grid_layouts(arch, layer):
    factory, size = TIMM_ARCHS[arch]
    model = factory()
    x = images(size)
    out = hooked(model, layer, x)
    layout = resolve_layout(model, layer, x)
    spatial = out[0] if isinstance(out, tuple) else out
    if layout.kind == "BHWC":
        expected = spatial[..., 3].mean(dim=(1, 2))
        cell = spatial[:, 1, 2, 3]
    else:
        expected = spatial[:, 3].mean(dim=(1, 2))
        cell = spatial[:, 3, 1, 2]
    torch.testing.assert_close(score(obj.channel(3), model, layer, x), expected)
    torch.testing.assert_close(score(obj.neuron(3, (1, 2)), model, layer, x), cell)
    if arch == "pit":  # the cls token travels as the tuple's second element
        torch.testing.assert_close(score(obj.cls(3), model, layer, x), out[1][:, 0, 3])


def test_channel_on_sequence_first_open_clip():
    tower = open_clip_tower(batch_first=False)
    x = images((32, 32))
    out = hooked(tower, "transformer.resblocks.1", x)  # (N, B, C)
    assert out.shape[1] == 2
    torch.testing.assert_close(
        score(obj.channel(4), tower, "transformer.resblocks.1", x), out[1:, :, 4].mean(0)
    )


def test_non_spatial_layers_take_the_unit_or_direction_directly():
    model = TIMM_ARCHS["vit"][0]()
    x = images((32, 32))
    with torch.no_grad():
        logits = model(x)
    scorer = obj.compile_objectives([obj.channel(5)], None, logits.shape[1])
    torch.testing.assert_close(scorer(logits), logits[:, 5])
    v = torch.randn(logits.shape[1])
    scorer = obj.compile_objectives([obj.direction(v, cosine=True)], None, logits.shape[1])
    torch.testing.assert_close(scorer(logits), torch.cosine_similarity(logits, v[None], dim=1))
    with pytest.raises(ValueError, match="spatial layer"):
        obj.compile_objectives([obj.neuron(1, (0, 0))], None, logits.shape[1])


def test_an_overflow_in_another_channel_leaves_a_unit_finite():
    """float16 activations overflow to inf: a unit's score was NaN (0 * inf) when any other
    channel of its tokens overflowed, though its own channel was finite."""
    model = TIMM_ARCHS["vit"][0]()
    layer = "blocks.1.mlp.fc1"
    x = images((32, 32), batch=2)
    out = hooked(model, layer, x).half()
    out[0, 3, 7] = float("inf")  # channel 7 of one patch token of the first image
    layout = resolve_layout(model, layer, x)
    scorer = obj.compile_objectives([obj.channel(1), obj.channel(7)], layout, 128)
    scores = scorer(out[[0, 0]])  # one row per target
    torch.testing.assert_close(scores[0], out[0, 1:, 1].float().mean())
    assert scores[1] == float("inf")  # its own channel overflowed: inf, as it is


def test_batched_rows_follow_targets_images_copies():
    """Rows are ordered target, image, copy; each row is scored by its target's objective."""
    model = TIMM_ARCHS["vit"][0]()
    layer = "blocks.1.mlp.fc1"
    x = images((32, 32), batch=12, seed=3)
    out = hooked(model, layer, x)
    layout = resolve_layout(model, layer, x)
    goals = [obj.channel(1), obj.neuron(9, (3, 3)) - obj.cls(2)]
    scorer = obj.compile_objectives(goals, layout, layout.num_channels, images=2, copies=3)
    scores = scorer(out)
    first = out[:6, 1:, 1].mean(1)
    second = out[6:, 1 + 15, 9] - out[6:, 0, 2]
    torch.testing.assert_close(scores, torch.cat([first, second]))


def test_diversity_is_minus_the_gram_similarity_between_images_of_a_target():
    tokens = torch.randn(2 * 3 * 2, 5, 4, generator=torch.Generator().manual_seed(0))
    tokens[6:] = tokens[6:8].repeat(3, 1, 1)  # second target: three identical images
    scorer = obj.compile_objectives([obj.diversity()] * 2, None, 4, images=3, copies=2)
    scores = scorer.score_tokens(tokens)
    torch.testing.assert_close(scores[6:], torch.full((6,), -1.0))
    # brute force for the first target, copy 0: rows 0, 2, 4
    gram = [torch.nn.functional.normalize((t.T @ t).flatten(), dim=0) for t in tokens[[0, 2, 4]]]
    expected = -(gram[0] @ gram[1] + gram[0] @ gram[2]) / 2
    torch.testing.assert_close(scores[0], expected)
    single = obj.compile_objectives([obj.diversity()], None, 4, images=1, copies=2)
    assert single.score_tokens(tokens[:2]).abs().max() == 0


def test_errors_name_the_problem():
    model = TIMM_ARCHS["vit_avg"][0]()  # no cls token
    x = images((32, 32))
    layout = resolve_layout(model, "blocks.0", x)
    with pytest.raises(IndexError, match="32 channels"):
        obj.compile_objectives([obj.channel(32)], layout, 32)
    with pytest.raises(ValueError, match="no cls token"):
        obj.compile_objectives([obj.cls(0)], layout, 32)
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        obj.compile_objectives([obj.neuron(0, (4, 0))], layout, 32)
    with pytest.raises(ValueError, match="out of range"):
        obj.compile_objectives([obj.neuron(0, 16)], layout, 32)
    with pytest.raises(ValueError, match="5 values"):
        obj.compile_objectives([obj.direction(torch.ones(5))], layout, 32)
    with pytest.raises(ValueError, match="token must be"):
        obj.channel(0, "middle")
    with pytest.raises(TypeError):
        obj.channel(1.5)
    with pytest.raises(TypeError):
        obj.channel(1) + 3


def test_total_variation_matches_a_loop():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(2)
    for b in range(2):
        for c in range(3):
            img = x[b, c]
            right = sum((img[i, j + 1] - img[i, j]) ** 2 for i in range(5) for j in range(5))
            down = sum((img[i + 1, j] - img[i, j]) ** 2 for i in range(4) for j in range(6))
            diag = sum((img[i + 1, j + 1] - img[i, j]) ** 2 for i in range(4) for j in range(5))
            anti = sum((img[i + 1, j] - img[i, j + 1]) ** 2 for i in range(4) for j in range(5))
            expected[b] += (right.sqrt() + down.sqrt() + diag.sqrt() + anti.sqrt()) / 3
    torch.testing.assert_close(obj.total_variation(x), expected)


def test_total_variation_gradient():
    x = torch.rand(2, 3, 5, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(obj.total_variation, (x,))
