"""robust_activation and transfer_score against hand computations."""

from __future__ import annotations

import pytest
import torch
from archs import TIMM_ARCHS, hooked, hooks_left

import captum_vit as cv
import captum_vit.optim.objectives as obj


def hand_views(views, size, shift, color, seed):
    """The documented draws, re-implemented: dy, dx, then mu (3), then log sigma (3)."""
    g = torch.Generator().manual_seed(seed)
    lim_h, lim_w = round(shift * size[0]), round(shift * size[1])
    out = []
    for _ in range(views):
        dy = int(torch.randint(-lim_h, lim_h + 1, (), generator=g))
        dx = int(torch.randint(-lim_w, lim_w + 1, (), generator=g))
        mu = (torch.rand(3, generator=g) * 2 - 1) * color
        sigma = ((torch.rand(3, generator=g) * 2 - 1) * color).exp()
        out.append((dy, dx, mu, sigma))
    return out


def test_robust_activation_is_the_mean_over_shifted_colour_shifted_views():
    model = TIMM_ARCHS["vit"][0]()  # 32 px, patch 8, mean 0.5 std 0.5
    layer = "blocks.1.mlp.act"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    units = [3, 8, 3]
    got = cv.robust_activation(model, layer, x, units, views=5, seed=2)
    expected = torch.zeros(3)
    views = hand_views(5, (32, 32), 1 / 7, 1.0, 2)
    assert len({(dy, dx) for dy, dx, _, _ in views}) > 1  # the shifts do vary
    for dy, dx, mu, sigma in views:
        view = (torch.roll(x, (dy, dx), dims=(2, 3)) - mu.view(1, 3, 1, 1)) / sigma.view(1, 3, 1, 1)
        with torch.no_grad():
            out = hooked(model, layer, (view - 0.5) / 0.5)  # (3, 1 + 16, C)
        expected += out[:, 1:].mean(1)[torch.arange(3), torch.tensor(units)]
    torch.testing.assert_close(got, expected / 5, atol=1e-5, rtol=1e-5)
    # one target for all images; an objective; no views = the plain activation
    single = cv.robust_activation(model, layer, x, 3, views=5, seed=2)
    torch.testing.assert_close(single[[0, 2]], got[[0, 2]], atol=1e-6, rtol=0)
    plain = cv.robust_activation(model, layer, x, obj.channel(8), views=1, shift=0, color=0)
    with torch.no_grad():
        direct = hooked(model, layer, (x - 0.5) / 0.5)[:, 1:, 8].mean(1)
    torch.testing.assert_close(plain, direct, atol=1e-5, rtol=1e-5)
    assert hooks_left(model) == 0
    with pytest.raises(TypeError, match=r"views must be a positive int \(random views"):
        cv.robust_activation(model, layer, x, 3, views=2.5)  # was a bare range() TypeError
    with pytest.raises(ValueError, match=r"views must be a positive int .*got 0"):
        cv.robust_activation(model, layer, x, 3, views=0)


def test_robust_activation_rewards_shift_invariant_images():
    """A unit reading one patch position: an image with the pattern everywhere keeps its
    score under shifts; the same pattern in that patch only loses most of it."""
    model = TIMM_ARCHS["vit"][0]()
    layer = "blocks.0.mlp.fc1"
    goal = obj.neuron(5, (1, 1))
    fv = cv.FeatureVisualization(model, layer)
    local = fv.attribute(target=goal, preset=None, steps=30, show_progress=False)
    raw = cv.robust_activation(model, layer, local, goal, views=1, shift=0, color=0)
    robust = cv.robust_activation(model, layer, local, goal, views=16, color=0)
    assert robust < raw


class ColourJudge(torch.nn.Module):
    """Class c = the brightest channel c (0 red, 1 green, 2 blue)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_transfer_score_counts_top1_of_the_judge():
    images = torch.zeros(4, 3, 8, 8)
    images[0, 0] = 1  # red
    images[1, 1] = 1  # green
    images[2, 2] = 1  # blue
    images[3, 0] = 1  # red, labelled blue
    judge = ColourJudge().train()
    assert cv.transfer_score(images, [0, 1, 2, 2], judge) == 75.0
    assert cv.transfer_score(images, torch.tensor([0, 1, 2, 0]), judge) == 100.0
    assert judge.training  # left as found
    with pytest.raises(ValueError, match="labels"):
        cv.transfer_score(images, [0, 1], judge)
    with pytest.raises(ValueError, match="at least one image"):  # was nan
        cv.transfer_score(images[:0], [], judge)
    # A label the judge has no score for counted as a silent miss.
    with pytest.raises(ValueError, match=r"labels run 0..5: labels must index its classes"):
        cv.transfer_score(images, [0, 1, 2, 5], judge)
    # head= maps the judge's output to class scores: here it swaps red and blue.
    swapped = cv.transfer_score(images, [2, 1, 0, 0], judge, head=lambda s: s[:, [2, 1, 0]])
    assert swapped == 75.0


def test_transfer_score_with_a_clip_judge_needs_a_zero_shot_head():
    """A CLIP model outputs an embedding: its dimensions were read as class scores."""
    from archs import open_clip_model

    clip = open_clip_model()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="CLIP outputs image embeddings.*head="):
        cv.transfer_score(images, labels, clip)
    text = torch.nn.functional.normalize(
        torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1
    )

    def zero_shot(embedding):
        return torch.nn.functional.normalize(embedding, dim=-1) @ text.T

    with torch.no_grad():
        predicted = zero_shot(clip.encode_image(cv.ImageModel(clip).normalize(images)))
    expected = 100.0 * (predicted.argmax(1) == labels).float().mean().item()
    assert cv.transfer_score(images, labels, clip, head=zero_shot) == pytest.approx(expected)


def test_transfer_score_reads_the_embedding_of_a_coca_tower():
    """CoCa's image tower returns (embedding, query tokens): the head got the tuple."""
    from archs import open_clip_coca_tower

    tower = open_clip_coca_tower()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="image embeddings.*head="):
        cv.transfer_score(images, labels, tower)
    weights = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding, _ = tower(cv.ImageModel(tower).normalize(images))
    expected = 100.0 * ((embedding @ weights.T).argmax(1) == labels).float().mean().item()
    score = cv.transfer_score(images, labels, tower, head=lambda e: e @ weights.T)
    assert score == pytest.approx(expected)
