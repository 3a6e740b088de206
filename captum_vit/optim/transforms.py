"""Batched, differentiable augmentations for feature visualization.

Every transform works on the whole batch at once, on the model's device, with one set of
random parameters per row (no per-image Python loops). The batch is laid out as
``targets x images x copies`` (row-major): each target's images, each image's augmented
copies. Randomness comes from :class:`RandomDraws`, which draws per *image slot* (the
index of an image within its target) and copy, and broadcasts over targets: image ``j`` of
every target sees the same augmentations, whatever the other targets are, so a target
optimized alone gives the same image as in a batch.

The paper's pipeline (Ghiasi et al. 2022, reference code): :class:`ColorShift`,
:class:`FadingNoise`, :class:`RollJitter`. Others for the Lucid-style presets:
:class:`Pad`, :class:`Jitter` (random crop), :class:`RandomScale`,
:class:`RandomRotate`, :class:`Flip`, :class:`RandomBackground` (one object on a random
background).

A transform is any callable ``t(x, draws, step, steps) -> x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RandomDraws",
    "Transform",
    "ColorShift",
    "FadingNoise",
    "RollJitter",
    "Pad",
    "Jitter",
    "RandomScale",
    "RandomRotate",
    "Flip",
    "RandomBackground",
    "apply_transforms",
    "batched_roll",
]


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """A CPU generator for image slot ``slot`` of a run seeded with ``seed`` (independent
    streams per slot; CPU so results do not depend on the device)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(slot)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class RandomDraws:
    """Random numbers for a batch of ``targets x images x copies`` rows.

    Each image slot has its own generator; a draw takes ``(copies or 1, *shape)`` numbers
    from each slot's generator and broadcasts them over the targets. With
    ``per_copy=False`` a value is shared by the copies of an image (the paper's jitter).

    Args:
        seed: the run's seed.
        targets, images, copies: the batch layout.
        device: where drawn tensors go.
    """

    def __init__(
        self,
        seed: int,
        targets: int,
        images: int,
        copies: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.targets, self.images, self.copies = targets, images, copies
        self.device = torch.device(device)
        self.generators = [slot_generator(seed, slot) for slot in range(images)]

    @property
    def rows(self) -> int:
        return self.targets * self.images * self.copies

    def _expand(self, draws: list[Tensor], per_copy: bool) -> Tensor:
        x = torch.stack(draws)  # (images, copies or 1, *shape)
        shape = x.shape[2:]
        x = x.expand(self.targets, self.images, self.copies, *shape)
        return x.reshape(self.rows, *shape).to(self.device)

    def uniform(
        self, shape: Sequence[int] = (), low: float = 0.0, high: float = 1.0, per_copy: bool = True
    ) -> Tensor:
        n = self.copies if per_copy else 1
        draws = [torch.rand((n, *shape), generator=g) * (high - low) + low for g in self.generators]
        return self._expand(draws, per_copy)

    def normal(self, shape: Sequence[int] = (), per_copy: bool = True) -> Tensor:
        n = self.copies if per_copy else 1
        draws = [torch.randn((n, *shape), generator=g) for g in self.generators]
        return self._expand(draws, per_copy)

    def integers(
        self, low: int, high: int, shape: Sequence[int] = (), per_copy: bool = True
    ) -> Tensor:
        """Integers in ``[low, high]`` (inclusive)."""
        n = self.copies if per_copy else 1
        draws = [torch.randint(low, high + 1, (n, *shape), generator=g) for g in self.generators]
        return self._expand(draws, per_copy)

    def per_image(self, shape: Sequence[int], make: Callable[..., Tensor]) -> Tensor:
        """``make(shape, generator=g)`` once per image slot, broadcast over targets (one
        value per image; used for initial images)."""
        draws = [make(tuple(shape), generator=g) for g in self.generators]
        x = torch.stack(draws).expand(self.targets, self.images, *shape)
        return x.reshape(self.targets * self.images, *shape).to(self.device)


Transform = Callable[[Tensor, RandomDraws, int, int], Tensor]


def apply_transforms(
    x: Tensor, transforms: Sequence[Transform], draws: RandomDraws, step: int, steps: int
) -> Tensor:
    for transform in transforms:
        x = transform(x, draws, step, steps)
    return x


class ColorShift:
    """The paper's colour shift as its code applies it: ``(x - mu) / sigma`` per row and
    channel with ``mu ~ U(-mean, mean)`` and ``sigma = exp(U(-std, std))``."""

    def __init__(self, mean: float = 1.0, std: float = 1.0) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        mu = draws.uniform((x.shape[1], 1, 1), -self.mean, self.mean)
        sigma = draws.uniform((x.shape[1], 1, 1), -self.std, self.std).exp()
        # (x - mu) / sigma in one pass over the batch
        return torch.addcmul((-mu / sigma).to(x.dtype), x, (1 / sigma).to(x.dtype))

    def __repr__(self) -> str:
        return f"ColorShift(mean={self.mean}, std={self.std})"


class FadingNoise:
    """Gaussian noise whose std falls linearly from ``std`` at the first step to 0 at the
    last. ``per_pixel=False`` (the paper's code): one offset per row and channel;
    ``per_pixel=True`` (the paper's text): independent per pixel."""

    def __init__(self, std: float = 0.5, per_pixel: bool = False) -> None:
        self.std, self.per_pixel = std, per_pixel

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        scale = self.std * (1.0 - step / max(steps - 1, 1))
        if scale <= 0:
            return x
        shape = x.shape[1:] if self.per_pixel else (x.shape[1], 1, 1)
        return x + draws.normal(shape).to(x.dtype) * scale

    def __repr__(self) -> str:
        return f"FadingNoise(std={self.std}, per_pixel={self.per_pixel})"


def batched_roll(x: Tensor, shifts_h: Tensor, shifts_w: Tensor) -> Tensor:
    """``torch.roll`` of each row by its own ``(shifts_h[b], shifts_w[b])`` (circular)."""
    if bool((shifts_h == shifts_h[0]).all() and (shifts_w == shifts_w[0]).all()):
        return torch.roll(x, (int(shifts_h[0]), int(shifts_w[0])), dims=(-2, -1))
    b, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - shifts_h[:, None].to(x.device)) % h
    cols = (torch.arange(w, device=x.device) - shifts_w[:, None].to(x.device)) % w
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class RollJitter:
    """Circular shift by up to ``pixels`` in each direction (the paper: 32 at 224 px).
    ``pixels=None`` scales the paper's 32/224 with the image size. ``per_copy=False``
    (the paper): one shift per image and step, shared by its copies."""

    def __init__(self, pixels: int | None = None, per_copy: bool = False) -> None:
        self.pixels, self.per_copy = pixels, per_copy

    def limit(self, size: int) -> int:
        return self.pixels if self.pixels is not None else round(32 * size / 224)

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        lim_h, lim_w = self.limit(x.shape[-2]), self.limit(x.shape[-1])
        shifts_h = draws.integers(-lim_h, lim_h, per_copy=self.per_copy)
        shifts_w = draws.integers(-lim_w, lim_w, per_copy=self.per_copy)
        return batched_roll(x, shifts_h, shifts_w)

    def __repr__(self) -> str:
        return f"RollJitter(pixels={self.pixels}, per_copy={self.per_copy})"


class Pad:
    """Constant padding by ``pixels`` on every side (Lucid pads with 0.5 grey)."""

    def __init__(self, pixels: int, value: float = 0.5) -> None:
        self.pixels, self.value = pixels, value

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        p = self.pixels
        return F.pad(x, (p, p, p, p), value=self.value)

    def __repr__(self) -> str:
        return f"Pad({self.pixels}, value={self.value})"


class Jitter:
    """Random crop that removes ``pixels`` rows and columns (Lucid's jitter), with its own
    offset per row."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        b, c, h, w = x.shape
        p = self.pixels
        dy = draws.integers(0, p).to(x.device)
        dx = draws.integers(0, p).to(x.device)
        rows = dy[:, None] + torch.arange(h - p, device=x.device)
        cols = dx[:, None] + torch.arange(w - p, device=x.device)
        x = x.gather(2, rows[:, None, :, None].expand(b, c, h - p, w))
        return x.gather(3, cols[:, None, None, :].expand(b, c, h - p, w - p))

    def __repr__(self) -> str:
        return f"Jitter({self.pixels})"


def _affine(x: Tensor, scale: Tensor, angle: Tensor) -> Tensor:
    """Rotate by ``angle`` (radians) and zoom by ``scale`` about the centre, per row."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class RandomScale:
    """Zoom by a factor drawn uniformly from ``scales`` per row."""

    def __init__(self, scales: Sequence[float] = tuple(1 + (i - 5) / 50 for i in range(11))):
        self.scales = torch.tensor(list(scales), dtype=torch.float32)

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        index = draws.integers(0, len(self.scales) - 1).cpu()
        scale = self.scales[index].to(x.device)
        return _affine(x, scale, torch.zeros_like(scale))

    def __repr__(self) -> str:
        return f"RandomScale({self.scales.tolist()})"


class RandomRotate:
    """Rotation by an integer number of degrees in ``[-degrees, degrees]`` per row."""

    def __init__(self, degrees: int = 10) -> None:
        self.degrees = degrees

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        angle = draws.integers(-self.degrees, self.degrees).float().to(x.device) * math.pi / 180
        return _affine(x, torch.ones_like(angle), angle)

    def __repr__(self) -> str:
        return f"RandomRotate({self.degrees})"


class Flip:
    """Horizontal flip of each row with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        flip = (draws.uniform() < self.p).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"Flip(p={self.p})"


class RandomBackground:
    """Keep a soft disc around the image's centre and paint the rest one random flat
    colour per row: ``x * m + colour * (1 - m)`` with ``m = sigmoid((r - d) / softness)``,
    ``d`` the distance from the centre in image sizes, ``r ~ U(*radius)`` and ``colour``
    uniform in [0, 1]^3, drawn per row.

    The model sees the image only inside the disc, and on a different background every
    time, so a visualization must be one object that excites the target by itself: it
    cannot fill the frame with a background texture that happens to go with the class in
    the training data. The part of the image outside the disc gets no gradient and keeps
    its start (grey for the Fourier parameterization).
    """

    def __init__(self, radius: tuple[float, float] = (0.35, 0.5), softness: float = 0.015):
        if not 0 < radius[0] <= radius[1]:
            raise ValueError(f"radius must be (low, high) with 0 < low <= high, got {radius}")
        if softness <= 0:
            raise ValueError(f"softness must be positive, got {softness}")
        self.radius, self.softness = radius, softness

    def __call__(self, x: Tensor, draws: RandomDraws, step: int, steps: int) -> Tensor:
        h, w = x.shape[-2:]
        r = draws.uniform((1, 1, 1), *self.radius).to(x.dtype)
        colour = draws.uniform((x.shape[1], 1, 1)).to(x.dtype)
        yy = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h - 0.5
        xx = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w - 0.5
        distance = (yy[:, None] ** 2 + xx[None, :] ** 2).sqrt()
        keep = torch.sigmoid((r - distance) / self.softness)
        return torch.lerp(colour, x, keep)

    def __repr__(self) -> str:
        return f"RandomBackground(radius={self.radius}, softness={self.softness})"
