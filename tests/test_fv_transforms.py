"""Batched augmentations, per-image-slot randomness, image parameterizations, presets."""

from __future__ import annotations

import pytest
import torch

from captum_vit.optim.params import FourierImage, PixelImage, PyramidImage, make_param
from captum_vit.optim.presets import PRESETS, Preset, get_preset
from captum_vit.optim.transforms import (
    ColorShift,
    FadingNoise,
    Flip,
    Jitter,
    Pad,
    RandomBackground,
    RandomDraws,
    RandomRotate,
    RandomScale,
    RollJitter,
    apply_transforms,
    batched_roll,
)


def test_draws_do_not_depend_on_the_other_targets():
    one = RandomDraws(3, targets=1, images=2, copies=4)
    many = RandomDraws(3, targets=5, images=2, copies=4)
    a, b = one.uniform((3,)), many.uniform((3,))
    assert b.shape == (40, 3)
    for target in range(5):
        torch.testing.assert_close(b[target * 8 : (target + 1) * 8], a, atol=0, rtol=0)
    assert not torch.equal(a[0], a[1])  # copies differ
    assert not torch.equal(a[0], a[4])  # image slots differ
    shared = RandomDraws(3, 2, 1, 4).integers(-5, 5, per_copy=False)
    assert (shared == shared[0]).all()
    init = RandomDraws(3, 3, 2, 1).per_image((3, 4, 4), torch.rand)
    torch.testing.assert_close(init[0:2], init[2:4], atol=0, rtol=0)


def test_batched_roll_equals_torch_roll_per_row():
    x = torch.rand(4, 3, 6, 7)
    sh, sw = torch.tensor([0, 2, -3, 5]), torch.tensor([1, -1, 6, 0])
    expected = torch.stack(
        [torch.roll(x[b], (int(sh[b]), int(sw[b])), dims=(-2, -1)) for b in range(4)]
    )
    torch.testing.assert_close(batched_roll(x, sh, sw), expected, atol=0, rtol=0)
    same = batched_roll(x, torch.full((4,), 2), torch.full((4,), -1))
    torch.testing.assert_close(same, torch.roll(x, (2, -1), dims=(-2, -1)), atol=0, rtol=0)


def test_paper_transforms_follow_their_formulas():
    x = torch.rand(8, 3, 16, 16)
    draws = RandomDraws(0, 1, 1, 8)
    shifted = ColorShift()(x, draws, 0, 10)
    # recover (mu, sigma) per row and channel: the map is affine per channel
    sigma = x.flatten(2).std(2) / shifted.flatten(2).std(2)
    mu = (x - shifted * sigma[..., None, None]).flatten(2).mean(2)
    assert ((sigma > torch.e**-1 - 1e-4) & (sigma < torch.e + 1e-4)).all()
    assert ((mu > -1 - 1e-4) & (mu < 1 + 1e-4)).all()
    assert sigma.std() > 0.1  # per row and channel, not one value
    noise = FadingNoise(0.5)
    first = noise(x, RandomDraws(0, 1, 1, 8), 0, 10) - x
    last = noise(x, RandomDraws(0, 1, 1, 8), 9, 10) - x
    assert first.flatten(2).std(2).max() < 1e-6  # one offset per row and channel
    assert first.abs().max() > 0.05 and last.abs().max() == 0
    pixel_noise = FadingNoise(0.5, per_pixel=True)(x, RandomDraws(0, 1, 1, 8), 0, 10) - x
    assert pixel_noise.flatten(2).std(2).min() > 0.3
    roll = RollJitter()  # 32/224 of 16 px: 2
    assert roll.limit(16) == 2 and roll.limit(224) == 32
    rolled = roll(x, RandomDraws(1, 1, 1, 8), 0, 10)
    candidates = [
        torch.roll(x, (dy, dx), dims=(-2, -1)) for dy in range(-2, 3) for dx in range(-2, 3)
    ]
    assert any(torch.equal(rolled, c) for c in candidates)  # one shift for all copies


def test_lucid_transforms_batched_and_differentiable():
    x = torch.rand(6, 3, 20, 20, requires_grad=True)
    draws = RandomDraws(0, 2, 1, 3)
    out = apply_transforms(
        x, [Pad(3), Jitter(4), RandomScale(), RandomRotate(10), Flip(), Jitter(2)], draws, 0, 5
    )
    assert out.shape == (6, 3, 20, 20)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    crop = Jitter(3)(x, RandomDraws(2, 1, 1, 6), 0, 1)
    matches = [
        any(
            torch.equal(crop[b], x[b, :, i : i + 17, j : j + 17])
            for i in range(4)
            for j in range(4)
        )
        for b in range(6)
    ]
    assert all(matches)
    flipped = Flip(1.0)(x, draws, 0, 1)
    torch.testing.assert_close(flipped, x.flip(-1))
    same = RandomRotate(0)(x, draws, 0, 1)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def test_random_background_keeps_the_centre_and_paints_the_rest_per_row():
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(1), requires_grad=True)
    draws = RandomDraws(0, 1, 3, 1)  # three image slots: three rows, own draws each
    out = RandomBackground(radius=(0.3, 0.3), softness=0.01)(x, draws, 0, 1)
    # the row's colour, as drawn: radius first (fixed here), then 3 colour values per slot
    replay = RandomDraws(0, 1, 3, 1)
    replay.uniform((1, 1, 1), 0.3, 0.3)
    colour = replay.uniform((3, 1, 1))
    # pixel (10, 10) lies 0.035 image sizes from the centre, (0, 0) 0.67: kept / painted
    torch.testing.assert_close(out[:, :, 10, 10], x[:, :, 10, 10], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :, 0, 0], colour[:, :, 0, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(colour[0], colour[1])  # each row its own background
    # hand computation at one pixel on the edge's slope: d = sqrt(2) * 5.5 / 20
    d = (2 * (5.5 / 20) ** 2) ** 0.5
    m = torch.sigmoid(torch.tensor((0.3 - d) / 0.01))
    torch.testing.assert_close(
        out[0, :, 15, 15], x[0, :, 15, 15] * m + colour[0, :, 0, 0] * (1 - m)
    )
    out.sum().backward()
    assert x.grad[:, :, 10, 10].abs().min() > 0.99 and x.grad[:, :, 0, 0].abs().max() < 1e-6
    with pytest.raises(ValueError, match="radius"):
        RandomBackground(radius=(0.5, 0.3))


def test_fourier_image_round_trip_and_range():
    images = torch.rand(2, 3, 12, 10) * 0.9 + 0.05
    param = FourierImage.from_images(images)
    torch.testing.assert_close(param.images(), images, atol=1e-5, rtol=0)
    assert param.spectrum.shape == (2, 3, 12, 6, 2) and param.spectrum.requires_grad
    plain = FourierImage.from_images(images, decorrelate=False)
    torch.testing.assert_close(plain.images(), images, atol=1e-5, rtol=0)
    random = make_param("fourier", RandomDraws(0, 2, 1, 1), (12, 10), None)
    x = random.images()
    assert x.shape == (2, 3, 12, 10) and 0 < x.min() and x.max() < 1
    torch.testing.assert_close(x[0], x[1])  # one start per image slot, shared by targets


def test_pixel_image_clamps_after_steps():
    param = PixelImage(torch.rand(1, 3, 4, 4))
    with torch.no_grad():
        param.pixels += 2
    param.after_step()
    assert param.images().max() == 1
    with pytest.raises(ValueError, match="param must be"):
        make_param("wavelet", RandomDraws(0, 1, 1, 1), (4, 4), None)
    with pytest.raises(ValueError, match="init must be"):
        make_param("pixel", RandomDraws(0, 1, 1, 1), (4, 4), None, init="zeros")


def test_pyramid_image_is_the_sum_of_its_upsampled_grids_kept_in_range():
    start = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    param = PyramidImage(start, levels=3)
    shapes = [tuple(g.shape) for g in param.parameters()]
    assert shapes == [(2, 3, 16, 12), (2, 3, 8, 6), (2, 3, 4, 3)]
    torch.testing.assert_close(param.images(), start)  # coarse grids start at 0
    with torch.no_grad():
        for grid in param.parameters():
            grid.add_(torch.randn_like(grid))
    # oracle: each grid resized to the image size (bilinear), summed
    up = [torch.nn.functional.interpolate(g, size=(16, 12), mode="bilinear") for g in param.grids]
    torch.testing.assert_close(param.images(), sum(up))
    coarse = [g.detach().clone() for g in param.grids[1:]]
    param.after_step()
    x = param.images()
    assert -1e-6 <= x.min() and x.max() <= 1 + 1e-6  # up to rounding
    torch.testing.assert_close(x, sum(up).clamp(0, 1))  # the paper's clamp, on the sum
    assert all(
        torch.equal(a, b) for a, b in zip(coarse, param.grids[1:], strict=True)
    )  # finest grid only
    # one step on a coarse grid moves a block of pixels; the finest grid, single pixels
    param = PyramidImage(torch.full((1, 3, 16, 12), 0.5), levels=3)
    param.images()[0, 0, 8, 6].backward()
    assert (param.grids[0].grad != 0).sum() == 1 and (param.grids[2].grad != 0).sum() > 1
    single = make_param("pyramid", RandomDraws(0, 1, 1, 1), (8, 8), None, pyramid_levels=1)
    pixels = make_param("pixel", RandomDraws(0, 1, 1, 1), (8, 8), None)
    assert len(single.parameters()) == 1
    torch.testing.assert_close(single.images(), pixels.images())  # same start draws
    with pytest.raises(ValueError, match="pyramid_levels"):
        Preset(pyramid_levels=0)


def test_presets():
    paper = get_preset("ghiasi2023")
    assert (paper.copies, paper.steps, paper.lr, paper.clip_lr) == (8, 400, 0.1, 1.0)
    assert paper.betas == (0.5, 0.99) and paper.schedule == "cosine" and paper.tv_weight == 5e-5
    names = [type(t).__name__ for t in paper.transforms((224, 224))]
    assert names == ["ColorShift", "FadingNoise", "RollJitter"]
    plain = get_preset(None)
    assert plain.copies == 1 and plain.transforms((32, 32)) == [] and plain.tv_weight == 0
    assert set(PRESETS) == {
        None,
        "ghiasi2023",
        "lucid",
        "fast",
        "robust",
        "object",
        "shapes",
        "maco",
    }
    custom = Preset(copies=3)
    assert get_preset(custom) is custom
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("paper")


def test_maco_keeps_the_magnitude_and_optimizes_the_phase():
    from captum_vit.optim.params import MacoImage, magnitude_spectrum

    size = (16, 12)
    scene = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    magnitude = magnitude_spectrum(scene, size)
    # oracle: the one image's own spectrum at that size, around grey
    small = torch.nn.functional.interpolate(scene, size=size, mode="bilinear", antialias=True)
    torch.testing.assert_close(magnitude, torch.fft.rfft2(small[0] - 0.5, norm="ortho").abs())
    param = make_param("maco", RandomDraws(0, 2, 1, 1), size, None, magnitude=scene)
    assert isinstance(param, MacoImage) and param.parameters()[0].shape == (2, 3, 16, 7)
    x = param.images()
    assert x.shape == (2, 3, 16, 12) and 0 < x.min() and x.max() < 1
    # the image's own spectrum (before the sigmoid) is the fixed magnitude up to one scale
    # per image (the standardization), on every bin not forced real by irfft2
    spectrum = torch.fft.rfft2(torch.logit(x.double()), norm="ortho").abs()[..., 1:-1]
    ratio = spectrum / magnitude[..., 1:-1].double()
    spread = ratio.flatten(1).std(1) / ratio.flatten(1).mean(1)
    assert (spread < 1e-3).all(), spread
    # no colour cast: the mean colour is its own parameter, grey at the start ...
    channel_means = torch.logit(x.double()).mean((2, 3))
    torch.testing.assert_close(
        channel_means, torch.zeros(2, 3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert param.parameters()[1].shape == (2, 3, 1, 1)
    # ... and, from start images, their own mean colour (in logit units)
    start = torch.full((1, 3, 16, 12), 0.5)
    start[:, 0] = 0.8  # reddish
    began = MacoImage.from_images(start, magnitude)
    torch.testing.assert_close(
        torch.logit(began.images().double()).mean((2, 3)),
        torch.logit(torch.tensor([[0.8, 0.5, 0.5]], dtype=torch.float64)),
        atol=1e-3,
        rtol=0,
    )
    photos = magnitude_spectrum("photos", size)
    assert photos.shape == (3, 16, 7) and magnitude_spectrum("photos", size) is photos  # cached
    # natural images: most energy in low frequencies
    assert photos[:, 1, 1].mean() > 5 * photos[:, 8, 6].mean()
    with pytest.raises(ValueError, match="magnitude must be"):
        magnitude_spectrum("imagenet", size)


def test_fast_is_the_paper_preset_plus_its_differences():
    from dataclasses import fields

    paper, fast = get_preset("ghiasi2023"), get_preset("fast")
    differ = {f.name for f in fields(Preset) if getattr(paper, f.name) != getattr(fast, f.name)}
    assert differ <= {"copies", "steps", "lr", "transforms", "param", "init"}
    assert fast.steps * fast.copies * 4 <= paper.steps * paper.copies  # 1/4 of the work


def test_splats_are_a_sigmoid_of_round_gaussians():
    from captum_vit.optim.params import SplatImage

    size = (20, 24)
    param = make_param("splats", RandomDraws(0, 2, 3, 1), size, None, splats=5, splat_gain=3.0)
    assert isinstance(param, SplatImage)
    centres, log_scales, colours, base = param.parameters()
    assert centres.shape == (6, 5, 2) and colours.shape == (6, 5, 3) and base.shape == (6, 3, 1, 1)
    with torch.no_grad():
        log_scales[0, 0] = -20.0  # narrower than a pixel: held at one pixel (2 / 24)
    # oracle: every blob evaluated on every pixel centre, in coordinates from -1 to 1
    ys = (torch.arange(20) + 0.5) / 20 * 2 - 1
    xs = (torch.arange(24) + 0.5) / 24 * 2 - 1
    width = log_scales.detach().exp().clamp(min=2 / 24)
    assert width[0, 0] == 2 / 24
    dy = ys[None, None, :, None] - centres.detach()[..., 0, None, None]
    dx = xs[None, None, None, :] - centres.detach()[..., 1, None, None]
    blobs = torch.exp(-(dy**2 + dx**2) / (2 * width[..., None, None] ** 2))
    field = torch.einsum("bkhw,bkc->bchw", blobs, colours.detach()) + base.detach()
    torch.testing.assert_close(param.images(), torch.sigmoid(3.0 * field))
    # image slot j of every target starts alike (the draws broadcast over targets)
    torch.testing.assert_close(centres[:3], centres[3:])
    # every parameter of the image gets a gradient; other images' do not
    param.images()[0].sum().backward()
    for grad in (centres.grad, log_scales.grad, colours.grad, base.grad):
        assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    with pytest.raises(ValueError, match="cannot start from given images"):
        make_param("splats", RandomDraws(0, 1, 1, 1), size, torch.rand(1, 3, *size))
    with pytest.raises(ValueError, match="splats must be at least 1"):
        Preset(splats=0)
    with pytest.raises(ValueError, match="splat_gain must be positive"):
        Preset(splat_gain=0)
