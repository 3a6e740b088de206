"""FeatureVisualization: known answers on a planted ViT, activation far above random images
and photographs (random ViT and CNN), batched == separate, presets, hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from archs import (
    TIMM_ARCHS,
    hooks_left,
    open_clip_coca_tower,
    open_clip_model,
    open_clip_timm_trunk,
)
from fv_planted import (
    PATCH,
    SIZE,
    UNIT,
    best_shift_correlation,
    patch_correlations,
    planted_colour,
    planted_pattern,
    planted_vit,
)

import captum_vit as cv
import captum_vit.optim.objectives as obj
from captum_vit.optim.presets import Preset, get_preset
from captum_vit.optim.transforms import ColorShift, FadingNoise, slot_generator


def unit_activation(fv, images, units):
    """Patch mean of each image's own unit, through a plain hook (not the package)."""
    layout = fv.layout_for(images)
    out = fv.forward_to_layer(images)
    spatial, _ = layout.split(out)
    return spatial.mean(dim=(2, 3))[torch.arange(len(units)), torch.tensor(units)]


def photographs(size):
    from skimage import data, transform

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.hubble_deep_field(),
    ]
    out = [
        torch.from_numpy(transform.resize(p, size, anti_aliasing=True).astype(np.float32))
        for p in photos
    ]
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- known answers


def test_planted_unit_recovers_its_pattern_with_the_paper_recipe():
    model = planted_vit()
    pattern = planted_pattern()
    fv = cv.FeatureVisualization(model, "blocks.0.mlp.fc1")
    image = fv.attribute(target=UNIT, preset="ghiasi2023", steps=40)[0]
    # the roll jitter (up to 9 px here) may leave the pattern shifted against the grid
    assert best_shift_correlation(image, pattern, limit=9) > 0.8
    clean = fv.attribute(target=UNIT, preset="ghiasi2023", steps=30, transforms=[], copies=1)[0]
    correlations = patch_correlations(clean, pattern)
    assert correlations.shape == ((SIZE // PATCH) ** 2,)
    assert correlations.min() > 0.85
    other = fv.attribute(target=UNIT + 1, preset=None, steps=5)[0]  # a dead unit: no signal
    assert patch_correlations(other, pattern).abs().max() < 0.3


def test_fast_preset_recovers_the_planted_pattern():
    fv = cv.FeatureVisualization(planted_vit(), "blocks.0.mlp.fc1")
    image = fv.attribute(target=UNIT, preset="fast", steps=30, show_progress=False)[0]
    assert best_shift_correlation(image, planted_pattern(), limit=9) > 0.8


@pytest.mark.parametrize("preset", ["robust", "object", "shapes", "maco", "lucid"])
def test_transform_robust_presets_find_the_planted_answers(preset):
    """Scale, rotation and flip move the patch-locked pattern against the grid, so these
    presets find it only in part (a dead unit: about 0.06, 0.23 for the blobs that
    ``"shapes"`` starts from); the flat red-minus-blue unit, which no augmentation changes,
    they find (a larger step keeps the test short)."""
    fv = cv.FeatureVisualization(planted_vit(), "blocks.0.mlp.fc1")
    image, dead = fv.attribute(
        target=[UNIT, UNIT + 1], preset=preset, steps=30, show_progress=False
    )
    found = best_shift_correlation(image, planted_pattern(), limit=9)
    assert found > 0.18
    assert found > best_shift_correlation(dead, planted_pattern(), limit=9) + 0.1
    colour = cv.FeatureVisualization(planted_vit(planted_colour()), "blocks.0.mlp.fc1")
    image, dead = colour.attribute(
        target=[UNIT, UNIT + 1], preset=preset, steps=20, lr=0.5, show_progress=False
    )
    red_minus_blue = image[0].mean() - image[2].mean()
    assert red_minus_blue > 0.2
    assert red_minus_blue > dead[0].mean() - dead[2].mean() + 0.2  # dead: its start


def red_minus_blue_relu_model(threshold: float = 0.05) -> torch.nn.Module:
    """A ReLU unit ``relu(red - blue - threshold)`` per pixel: exactly 0, with zero
    gradient, on any nearly grey image."""
    conv = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1))
        conv.bias.fill_(-threshold)
    return torch.nn.Sequential(conv, torch.nn.ReLU()).eval()


def test_robust_preset_wakes_a_unit_that_is_dead_on_its_grey_start():
    """The Fourier start is nearly grey (pixel std about 0.003), where the planted unit is
    0 with no gradient: without the fading per-pixel noise the image stays grey; with it
    (the preset) the unit gets a gradient and the image turns red."""
    fv = cv.FeatureVisualization(red_minus_blue_relu_model(), "1", image_size=SIZE)
    image = fv.attribute(target=0, preset="robust", steps=24, lr=0.5, show_progress=False)[0]
    assert image[0].mean() - image[2].mean() > 0.3
    geometric = get_preset("robust").transforms((SIZE, SIZE))[1:]
    assert not any(isinstance(t, FadingNoise) for t in geometric)
    grey = fv.attribute(
        target=0,
        preset="robust",
        steps=24,
        lr=0.5,
        transforms=geometric,
        show_progress=False,
    )[0]
    assert (grey - 0.5).abs().max() < 0.02


def test_neuron_objective_changes_only_its_own_patch():
    model = planted_vit()
    fv = cv.FeatureVisualization(model, "blocks.0.mlp.fc1")
    start = torch.full((1, 3, SIZE, SIZE), 0.5)
    image = fv.attribute(start, target=obj.neuron(UNIT, (0, 1)), preset=None, steps=20)[0]
    change = (image - start[0]).abs()
    outside = change.clone()
    outside[:, :PATCH, PATCH:] = 0
    assert change[:, :PATCH, PATCH:].sum() > 10
    assert outside.max() == 0  # no gradient reaches the other patches
    assert patch_correlations(image, planted_pattern())[1] > 0.85
    # with the paper's TV (augmentations off) the change stays mostly in the patch (a
    # quarter of the image); TV's small gradients at its border become full Adam steps
    image = fv.attribute(
        start,
        target=obj.neuron(UNIT, (0, 1)),
        preset="ghiasi2023",
        transforms=[],
        copies=1,  # without augmentation the copies are identical
        steps=20,
    )[0]
    change = (image - start[0]).abs()
    assert change[:, :PATCH, PATCH:].sum() > 0.7 * change.sum()


def test_preset_none_is_plain_gradient_ascent():
    """Oracle: Adam on the pixels by hand, with the same start image, hooked layer."""
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    images = fv.attribute(target=[3, 8], preset=None, steps=6, seed=4)
    start = torch.rand((1, 3, 32, 32), generator=slot_generator(4, 0)).expand(2, -1, -1, -1)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    module = dict(model.named_modules())["blocks.1.mlp.act"]
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    try:
        for _ in range(6):
            model((x - 0.5) / 0.5)
            out = seen["out"][:, 1:].mean(1)
            loss = -(out[0, 3] + out[1, 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    finally:
        handle.remove()
    torch.testing.assert_close(images, x.detach(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- far above


def test_random_vit_units_far_above_random_images_and_photographs():
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    units = [0, 5, 9]
    baseline = torch.cat([torch.rand(16, 3, 32, 32), photographs((32, 32))])
    with torch.no_grad():
        layout = fv.layout_for(baseline)
        base = layout.split(fv.forward_to_layer(baseline))[0].mean(dim=(2, 3))[:, units]
    # with random weights the paper's roll jitter (5 px against 8 px patches) averages the
    # objective out: random patch embeddings are not shift-invariant; without it:
    images = fv.attribute(
        target=units,
        preset="ghiasi2023",
        transforms=[ColorShift(), FadingNoise()],
        steps=40,
    )
    reached = unit_activation(fv, images, units)
    assert (reached > base.max(0).values + 3 * base.std(0) + 0.05).all(), (reached, base)
    plain = unit_activation(fv, fv.attribute(target=units, preset=None, steps=30), units)
    assert (plain > 5 * base.max(0).values).all()


def test_random_cnn_units_far_above_random_images_and_photographs():
    model = TIMM_ARCHS["resnet"][0]()
    fv = cv.FeatureVisualization(model, "layer2", image_size=32)
    units = [5, 9]
    baseline = torch.cat([torch.rand(16, 3, 32, 32), photographs((32, 32))])
    with torch.no_grad():
        base = fv.forward_to_layer(baseline).mean(dim=(2, 3))[:, units]
    images = fv.attribute(target=units, preset="ghiasi2023", steps=30)  # the full recipe
    assert images.shape == (2, 3, 32, 32)
    reached = unit_activation(fv, images, units)
    assert (reached > 3 * base.max(0).values).all(), (reached, base)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("preset", ["ghiasi2023", "fast"])
def test_batched_equals_separate(preset):
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    both = fv.attribute(target=[3, 17], preset=preset, steps=12, seed=7)
    alone = [fv.attribute(target=u, preset=preset, steps=12, seed=7)[0] for u in (3, 17)]
    torch.testing.assert_close(both, torch.stack(alone), atol=1e-4, rtol=0)
    assert (both[0] - both[1]).abs().max() > 0.05  # different units, different images
    other_seed = fv.attribute(target=3, preset=preset, steps=12, seed=8)[0]
    assert (other_seed - alone[0]).abs().max() > 0.05
    again = fv.attribute(target=[3, 17], preset=preset, steps=12, seed=7)
    torch.testing.assert_close(again, both, atol=0, rtol=0)


def test_images_per_target_and_diversity():
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    goal = obj.channel(3) + 0.5 * obj.diversity()
    images, trace = fv.attribute(
        target=[goal, obj.channel(9)],
        images_per_target=2,
        preset="fast",
        steps=8,
        return_trace=True,
    )
    assert images.shape == (4, 3, 32, 32) and trace.shape == (8, 4)
    assert (images[0] - images[1]).abs().max() > 0.05  # image slots start apart
    alone = fv.attribute(target=obj.channel(9), images_per_target=2, preset="fast", steps=8)
    torch.testing.assert_close(images[2:], alone, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- options


def test_transforms_off_makes_copies_identical():
    """With transforms=[] the 8 copies are the same image, so 8 copies == 1 copy."""
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    eight = fv.attribute(target=[2, 4], preset="ghiasi2023", transforms=[], steps=6)
    one = fv.attribute(target=[2, 4], preset="ghiasi2023", transforms=[], copies=1, steps=6)
    torch.testing.assert_close(eight, one, atol=1e-5, rtol=0)


def test_trace_inputs_sizes_and_every_preset():
    model = TIMM_ARCHS["vit_dynamic"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.fc1")
    for preset in ("ghiasi2023", "lucid", "fast", None):
        images, trace = fv.attribute(
            target=torch.tensor([1, 2]),
            preset=preset,
            steps=3,
            image_size=(40, 64),
            return_trace=True,
        )
        assert images.shape == (2, 3, 40, 64) and trace.shape == (3, 2)
        assert images.min() >= 0 and images.max() <= 1
    start = torch.rand(1, 3, 48, 48)
    kept = start.clone()
    images = fv.attribute(start, target=[1, 2], preset="fast", steps=2, show_progress=True)
    assert images.shape == (2, 3, 48, 48)
    torch.testing.assert_close(start, kept, atol=0, rtol=0)  # inputs not modified
    # start images are where the optimization starts, in both parameterizations (Fourier:
    # up to its clamp away from 0 and 1)
    same = fv.attribute(start, target=1, preset="fast", lr=1e-9, steps=1)
    torch.testing.assert_close(same[0], start[0], atol=1e-6, rtol=0)
    same = fv.attribute(start, target=1, preset="lucid", lr=1e-9, steps=1)
    torch.testing.assert_close(same[0], start[0].clamp(1e-3, 1 - 1e-3), atol=1e-4, rtol=0)


def test_fixed_size_model_sees_resized_images():
    model = TIMM_ARCHS["vit"][0]()  # takes 32x32 only
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    images = fv.attribute(target=5, preset="fast", image_size=48, steps=3)
    assert images.shape == (1, 3, 48, 48)


def test_class_logits_token_variants_and_cnn_layout():
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "head")  # logits: class visualization
    images = fv.attribute(target=[7, 9], preset=None, steps=10)
    with torch.no_grad():
        logits = model((images - 0.5) / 0.5)
    assert logits[0, 7] > logits[1, 7] and logits[1, 9] > logits[0, 9]
    fv = cv.FeatureVisualization(model, "blocks.1")
    for token in ("cls", "all", 0, (1, 2)):
        assert fv.attribute(target=3, token=token, preset=None, steps=2).shape == (1, 3, 32, 32)
    swin_factory, size = TIMM_ARCHS["swin"]
    fv = cv.FeatureVisualization(swin_factory(), "layers.1.blocks.0")  # BHWC
    assert fv.attribute(target=[1, 2], preset="fast", steps=2).shape == (2, 3, *size)


def test_clip_text_direction_through_the_image_tower():
    model = open_clip_model()
    text = model.encode_text(
        torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    )
    text = text[0].detach()
    fv = cv.FeatureVisualization(model, model.visual)  # the tower's output: the embedding
    images = fv.attribute(target=obj.direction(text, cosine=True), preset=None, steps=40)
    with torch.no_grad():
        reached = torch.cosine_similarity(model.encode_image(fv.normalize(images)), text[None])
        random = torch.cosine_similarity(
            model.encode_image(fv.normalize(torch.rand(16, 3, 32, 32))), text[None]
        )
    assert reached > random.max() + 0.2
    tower = open_clip_timm_trunk()
    fv = cv.FeatureVisualization(tower, "head")  # a projected CLIP embedding (B, 16)
    assert fv.attribute(target=[0, 3], preset=None, steps=2).shape == (2, 3, 32, 32)


def test_a_coca_tower_embedding_is_a_direction_target():
    """open_clip's CoCa tower returns (embedding, query tokens): a text direction on its
    embedding was refused ('no element is a spatial map')."""
    tower = open_clip_coca_tower()
    text = torch.randn(16, generator=torch.Generator().manual_seed(1))
    fv = cv.FeatureVisualization(tower, tower)  # the tower's own output
    images = fv.attribute(target=obj.direction(text, cosine=True), preset=None, steps=40)
    with torch.no_grad():
        embedding, _ = tower(fv.normalize(images))
        reached = torch.cosine_similarity(embedding, text[None])
        random = torch.cosine_similarity(tower(fv.normalize(torch.rand(16, 3, 32, 32)))[0], text)
    assert reached > random.max() + 0.2


def test_clip_gets_the_presets_clip_learning_rate():
    model = open_clip_model()
    fv = cv.FeatureVisualization(model, "transformer.resblocks.1")
    seen = []
    original = torch.optim.Adam.__init__

    def spy(self, params, lr=1e-3, **kwargs):
        seen.append(lr)
        original(self, params, lr=lr, **kwargs)

    torch.optim.Adam.__init__ = spy
    try:
        fv.attribute(target=1, preset="ghiasi2023", steps=1)
        fv.attribute(target=1, preset="ghiasi2023", steps=1, lr=0.3)
        vit = cv.FeatureVisualization(TIMM_ARCHS["vit"][0](), "blocks.0")
        vit.attribute(target=1, preset="ghiasi2023", steps=1)
    finally:
        torch.optim.Adam.__init__ = original
    assert seen == [1.0, 0.3, 0.1]


# --------------------------------------------------------------------------- hygiene, errors


def test_model_left_as_found_also_after_errors():
    model = TIMM_ARCHS["vit"][0]().train()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    fv.attribute(target=[1, 2], preset="ghiasi2023", steps=2)
    assert all(p.grad is None for p in model.parameters())

    def broken(x, draws, step, steps):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fv.attribute(target=1, transforms=[broken], steps=2)
    assert hooks_left(model) == 0
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_arguments_raise():
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    with pytest.raises(IndexError, match="128 channels"):
        fv.attribute(target=[1, 128], steps=1)
    with pytest.raises(ValueError, match="unknown preset"):
        fv.attribute(target=1, preset="nope", steps=1)
    with pytest.raises(ValueError, match="start images"):
        fv.attribute(torch.rand(3, 3, 32, 32), target=[1, 2], steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fv.attribute(torch.rand(1, 3, 32, 32) * 2, target=1, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        fv.attribute(torch.full((1, 3, 32, 32), float("nan")), target=1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        fv.attribute(target=1, steps=0)
    with pytest.raises(ValueError, match="empty"):
        fv.attribute(target=[], steps=1)
    with pytest.raises(ValueError, match="direction has 1 values but the layer has 128"):
        fv.attribute(target=torch.tensor([0.5]), steps=1)  # a float target is a direction
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        fv.attribute(target=1, token=(4, 4), steps=1)
    with pytest.raises(ValueError, match="unknown layer"):
        cv.FeatureVisualization(model, "blocks.9")


# --------------------------------------------------------------------------- recipe, cost


def test_warmup_transforms_run_for_the_first_steps_then_the_transforms():
    seen = []

    def recorder(name):
        def transform(x, draws, step, steps):
            seen.append((name, step, steps))
            return x

        return transform

    fv = cv.FeatureVisualization(planted_vit(), "blocks.0.mlp.fc1")
    fv.attribute(
        target=UNIT,
        preset=None,
        steps=5,
        transforms=[recorder("main")],
        warmup_steps=2,
        warmup_transforms=[recorder("warm-up")],
    )
    assert seen == [("warm-up", 0, 5), ("warm-up", 1, 5)] + [("main", i, 5) for i in (2, 3, 4)]
    with pytest.raises(ValueError, match="warmup_steps must be between 0 and steps"):
        fv.attribute(target=UNIT, preset=None, steps=5, warmup_steps=6)
    with pytest.raises(TypeError, match="warmup_transforms must be"):
        Preset(warmup_transforms=3)


def test_recipe_keywords_are_checked_in_one_place():
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    with pytest.raises(TypeError, match="did you mean 'copies'"):
        fv.attribute(target=1, steps=1, copie=2)
    with pytest.raises(ValueError, match="schedule must be"):
        fv.attribute(target=1, steps=1, schedule="linear")
    with pytest.raises(ValueError, match="images_per_target"):
        fv.attribute(target=1, steps=1, images_per_target=0)
    recipe = fv.recipe("fast", copies=3, transforms=[])
    assert recipe.copies == 3 and recipe.transforms((32, 32)) == []
    assert recipe.steps == get_preset("fast").steps
    assert fv.recipe() == get_preset("ghiasi2023")  # a hidden layer: the paper's
    logits = cv.FeatureVisualization(model, "head")
    assert logits.recipe(spatial=False) == get_preset("object")
    images, trace = logits.attribute(target=[1, 2], steps=2, return_trace=True)
    assert images.shape == (2, 3, 32, 32) and trace.shape == (2, 2)


def test_a_long_run_says_what_it_will_cost(monkeypatch, caplog, capsys):
    import captum_vit.optim.feature_viz as feature_viz

    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    with caplog.at_level("INFO", logger="captum_vit"):
        fv.attribute(target=[1, 2], preset="fast", steps=2, show_progress=False)
    assert not caplog.records  # short: nothing to say
    monkeypatch.setattr(feature_viz, "ESTIMATE_AFTER_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="captum_vit"):
        fv.attribute(target=[1, 2], preset="fast", steps=3, show_progress=True)
    message = caplog.records[-1].getMessage()
    copies = get_preset("fast").copies
    assert f"3 steps x 2 images x {copies} copies, about" in message
    assert "about" in capsys.readouterr().err  # printed with the progress bar


def test_progress_bar_on_by_default_when_stderr_is_a_terminal(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    fv = cv.FeatureVisualization(TIMM_ARCHS["vit"][0](), "blocks.1.mlp.act")
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    fv.attribute(target=1, preset="fast", steps=2)
    assert quiet.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    fv.attribute(target=1, preset="fast", steps=2)
    assert "feature visualization" in terminal.getvalue()


def test_diversity_that_cannot_work_and_odd_image_sizes_are_refused():
    model = TIMM_ARCHS["vit"][0]()
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    # [3, diversity()] is two targets, the second optimizing only dissimilarity.
    with pytest.raises(ValueError, match="target 1 is diversity\\(\\) alone"):
        fv.attribute(target=[3, obj.diversity()], images_per_target=2, steps=1)
    # With one image per target the term scores 0: it was silently ignored.
    with pytest.raises(ValueError, match="pass images_per_target=2 or more"):
        fv.attribute(target=obj.channel(3) + 0.5 * obj.diversity(), steps=1)
    with pytest.raises(TypeError, match="an int or an \\(H, W\\) pair of ints, got 32.0"):
        fv.attribute(target=3, image_size=32.0, steps=1)
    with pytest.raises(TypeError, match="got '32'"):
        fv.attribute(target=3, image_size="32", steps=1)
    shaped = fv.attribute(target=3, image_size=np.int64(24), preset="fast", steps=1)
    assert shaped.shape == (1, 3, 24, 24)


def test_a_diverged_optimization_raises_instead_of_returning_nan_images():
    model = TIMM_ARCHS["vit"][0]()
    with torch.no_grad():  # unit 5's pre-activation overflows float32 on every input
        model.blocks[1].mlp.fc1.weight[5] = 1e38
        model.blocks[1].mlp.fc1.bias[5] = 1e38
    fv = cv.FeatureVisualization(model, "blocks.1.mlp.act")
    with pytest.raises(
        FloatingPointError, match=r"diverged: 1 of 1 image\(s\) \(0\).*at step 0 of 2"
    ):
        fv.attribute(target=5, preset="fast", steps=2)
    with pytest.raises(ValueError, match="objective_scale must be a finite number, got nan"):
        fv.attribute(target=3, steps=1, objective_scale=float("nan"))
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number"):
        fv.attribute(target=3, steps=1, betas=(0.9, float("inf")))


def test_a_float_tensor_target_is_a_direction():
    """A float target was refused ('must be 1-D integer units') while PatchActivationMap
    reads it as a direction; a (C,) vector is one image, (N, C) one image per row."""
    model = open_clip_model()
    text = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    fv = cv.FeatureVisualization(model, "visual")
    one = fv.attribute(target=text[0], steps=3, preset="fast")
    torch.testing.assert_close(
        one, fv.attribute(target=cv.objectives.direction(text[0]), steps=3, preset="fast")
    )
    both = fv.attribute(target=text.numpy(), steps=3, preset="fast")
    expected = [cv.objectives.direction(row) for row in text]
    torch.testing.assert_close(both, fv.attribute(target=expected, steps=3, preset="fast"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        cv.robust_activation(model, "visual", images, text[1]),
        cv.robust_activation(model, "visual", images, cv.objectives.direction(text[1])),
    )
    with pytest.raises(ValueError, match=r"a float target is a direction \(C,\)"):
        fv.attribute(target=torch.zeros(1, 2, 16), steps=1)


def test_the_whole_model_as_the_layer():
    """A full CLIP model named itself as its image layer ('part of the text side'); a
    spatial method on a model's own output said 'layer is an empty path'."""
    clip = open_clip_model()
    with pytest.raises(ValueError, match="not a layer of its image tower.*pass 'visual'"):
        cv.FeatureVisualization(clip, clip)
    vit = TIMM_ARCHS["vit"][0]()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"the model itself \(as the layer\) outputs a 2-D"):
        cv.PatchActivationMap(vit, vit).attribute(x, target=0)
    logits = cv.FeatureVisualization(vit, vit).attribute(target=1, steps=2, preset=None)
    assert logits.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="empty path"):
        cv.PatchActivationMap(vit, " ")
    # The image tower of a full CLIP model is the user's 'visual', not "the model itself".
    for method in (cv.PatchActivationMap, cv.TopActivatingExamples):
        with pytest.raises(ValueError, match=r"^layer 'visual' outputs a 2-D tensor"):
            method(clip, "visual").attribute(x, target=0)
    block = cv.PatchActivationMap(clip, "visual.transformer.resblocks.0")
    assert block.layout_for(x).layer == "visual.transformer.resblocks.0"


def test_a_model_that_takes_bgr_gets_its_channels_reversed_in_the_optimization():
    """A model declaring BGR input (a Hugging Face checkpoint whose image processor flips
    the channels, as MobileViT's does): the planted red-minus-blue unit then reads the
    image's blue minus red, so its visualization must turn blue, through the fused
    normalization of the optimization as through ``normalize``."""
    model = planted_vit(planted_colour())
    model.declared_input_config = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "channel_order": "BGR"}
    fv = cv.FeatureVisualization(model, "blocks.0.mlp.fc1")
    image = fv.attribute(target=UNIT, preset="fast", steps=20, lr=0.5, show_progress=False)[0]
    assert image[2].mean() - image[0].mean() > 0.2
    x = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(fv.normalize(x), (x.flip(1) - 0.5) / 0.5)
