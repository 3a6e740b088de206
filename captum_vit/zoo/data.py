"""SyntheticScenes: a procedurally generated visual world with known ground truth.

Each image is 64x64 RGB in [0, 1]: one foreground shape (the class) with a random colour,
size, position and rotation, over a background texture (the background kind) with two
random colours. Every item is a pure function of ``(seed, index)``; drawing is vectorized
over the pixels and over a batch (:meth:`SyntheticScenes.batch`), fast enough to train from.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._base import check_count

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "SyntheticScenes",
    "fft_filter",
]

#: Foreground classes. Each pair that differs only by a hole (circle / ring, square / frame)
#: makes the models look at the shape's inside, not only its outline.
CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "frame",
)

#: Background textures. Class ``c`` has background ``c`` as its "own" background.
BACKGROUNDS: tuple[str, ...] = (
    "stripes_h",
    "stripes_v",
    "stripes_diag",
    "checks",
    "dots",
    "gradient",
    "noise",
    "waves",
)

_NOISE_CELLS = (4, 8, 16)


def fft_filter(images: torch.Tensor, cutoff: float, mode: str) -> torch.Tensor:
    """Low- or high-pass filter images with an ideal radial mask in the 2-D FFT.

    Args:
        images: ``(B, C, H, W)`` or ``(C, H, W)`` float tensor.
        cutoff: radius of the mask as a fraction of the Nyquist frequency (0.5 cycles per
            pixel), in ``(0, 1]``. ``"low"`` keeps frequencies with radius ``<= cutoff``;
            ``"high"`` keeps those with radius ``> cutoff`` plus the mean (DC term), so a
            high-passed image stays around the original mean brightness.
        mode: ``"low"`` or ``"high"``.

    Returns:
        The filtered images, same shape and dtype, clamped to [0, 1].
    """
    if mode not in ("low", "high"):
        raise ValueError(f"mode must be 'low' or 'high', got {mode!r}")
    if not 0.0 < float(cutoff) <= 1.0:
        raise ValueError(f"cutoff is a fraction of the Nyquist frequency in (0, 1], got {cutoff}")
    h, w = images.shape[-2:]
    fy = torch.fft.fftfreq(h, device=images.device).abs() / 0.5
    fx = torch.fft.fftfreq(w, device=images.device).abs() / 0.5
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    keep = radius <= cutoff if mode == "low" else radius > cutoff
    if mode == "high":
        keep[0, 0] = True
    spectrum = torch.fft.fft2(images.float())
    out = torch.fft.ifft2(spectrum * keep).real
    return out.clamp(0.0, 1.0).to(images.dtype)


class SyntheticScenes(Dataset):
    """A deterministic, on-the-fly dataset of shapes over textures.

    Item ``i`` is drawn from a random generator seeded by ``(seed, i)`` only, so any item can
    be regenerated alone and two datasets with different seeds are disjoint samples: train on
    one seed, hold out another.

    Args:
        length: number of items.
        seed: seed of the sample; items of different seeds are independent draws.
        image_size: side of the square images (default 64).
        background_bias: probability that an item's background is its class's own
            background (class ``c`` -> ``BACKGROUNDS[c]``); otherwise the background kind is
            uniform over all kinds. 0 makes the background useless for the label; 1 makes it
            a perfect shortcut. Default 0.5.
        filter: ``None``, or ``("low", cutoff)`` / ``("high", cutoff)`` to pass every image
            through :func:`fft_filter`.
        num_classes: use the first ``num_classes`` of :data:`CLASSES` (2 to 8).

    Each item is a dict: ``image`` (3, S, S) float in [0, 1], ``label`` (int), ``mask``
    (1, S, S) float, 1 on the foreground shape, ``background`` (int index into
    :data:`BACKGROUNDS`).

    Examples::

        >>> data = SyntheticScenes(1000, seed=1)
        >>> item = data[3]
        >>> item["image"].shape, data.class_names[item["label"]]
        (torch.Size([3, 64, 64]), 'star')
        >>> batch = data.batch(range(0, 256))   # vectorized, same items as data[i]
        >>> batch["image"].shape
        torch.Size([256, 3, 64, 64])
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        *,
        image_size: int = 64,
        background_bias: float = 0.5,
        filter: tuple[str, float] | None = None,
        num_classes: int = len(CLASSES),
    ) -> None:
        for name, value in (("length", length), ("seed", seed), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 0.0 <= background_bias <= 1.0:
            raise ValueError(f"background_bias is a probability in [0, 1], got {background_bias}")
        if not 2 <= num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        if filter is not None:
            mode, cutoff = filter
            fft_filter(torch.zeros(1, 1, 4, 4), cutoff, mode)  # validates the arguments
        self.length = int(length)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.background_bias = float(background_bias)
        self.filter = filter
        self.num_classes = int(num_classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASSES[: self.num_classes]

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        options = f", image_size={self.image_size}" if self.image_size != 64 else ""
        if self.background_bias != 0.5:
            options += f", background_bias={self.background_bias}"
        if self.filter is not None:
            options += f", filter={self.filter!r}"
        if self.num_classes != len(CLASSES):
            options += f", num_classes={self.num_classes}"
        return f"SyntheticScenes({self.length}, seed={self.seed}{options})"

    def _position(self, index: int) -> int:
        """``index`` as a position in ``0 .. len - 1`` (negative indices count from the end)."""
        if isinstance(index, slice):
            raise TypeError(
                "SyntheticScenes takes one int index; for several items use batch(indices), "
                f"e.g. batch(range{index.indices(self.length)}) for this slice"
            )
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(f"an index must be an int, got {type(index).__name__}") from None
        if not -self.length <= position < self.length:
            raise IndexError(f"index {position} out of range for {self.length} items")
        return position % self.length

    def __getitem__(self, index: int) -> dict:
        item = self.batch([index])
        return {
            "image": item["image"][0],
            "label": int(item["label"][0]),
            "mask": item["mask"][0],
            "background": int(item["background"][0]),
        }

    def batches(self, batch_size: int):
        """Iterate over the dataset in order, ``batch_size`` items at a time (dicts of
        stacked tensors, as :meth:`batch`)."""
        batch_size = check_count(batch_size, "batch_size", "scenes per batch")
        for start in range(0, self.length, batch_size):
            yield self.batch(range(start, min(start + batch_size, self.length)))

    # ---- drawing -----------------------------------------------------------------------
    def _params(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index), 0x5CE7E5])
        k = self.num_classes
        label = int(rng.integers(k))
        own = rng.random() < self.background_bias
        background = label if own else int(rng.integers(len(BACKGROUNDS)))
        colors = rng.random((2, 3))
        # Backgrounds have lower contrast than objects, as in most photographs: the second
        # colour lies part of the way from the first towards a random colour.
        colors[1] = colors[0] + rng.uniform(0.3, 0.7) * (colors[1] - colors[0])
        # The foreground colour is the candidate farthest from both background colours, so
        # the shape never vanishes into its background.
        candidates = rng.random((8, 3))
        dist = np.linalg.norm(candidates[:, None] - colors[None], axis=-1).min(1)
        fg = candidates[int(dist.argmax())]
        size = self.image_size
        radius = rng.uniform(0.2, 0.32) * size
        center = rng.uniform(radius, size - radius, 2)
        cells = _NOISE_CELLS[int(rng.integers(len(_NOISE_CELLS)))]
        return {
            "label": label,
            "background": background,
            "colors": colors,
            "fg": fg,
            "radius": radius,
            "center": center,
            "angle": rng.uniform(0, 2 * math.pi),
            "freq": rng.uniform(3.0, 8.0),
            "phase": rng.uniform(0, 2 * math.pi),
            "direction": rng.uniform(0, 2 * math.pi),
            "point": rng.uniform(0.0, 1.0, 2),
            "noise": np.kron(rng.random((cells, cells)), np.ones((size // cells + 1,) * 2))[
                :size, :size
            ],
        }

    def batch(self, indices: Sequence[int]) -> dict:
        """Draw the items at ``indices`` in one vectorized pass.

        Returns:
            dict with ``image`` (B, 3, S, S), ``label`` (B,) long, ``mask`` (B, 1, S, S),
            ``background`` (B,) long; item ``b`` equals ``self[indices[b]]``.

        Raises:
            IndexError: an index outside the dataset (negative ones count from the end).
        """
        params = [self._params(self._position(i)) for i in indices]
        if not params:
            raise ValueError("batch needs at least one index")

        def stack(key: str) -> torch.Tensor:
            return torch.as_tensor(np.array([p[key] for p in params]), dtype=torch.float32)

        size = self.image_size
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        y, x = y[None], x[None]  # (1, S, S), in [0, 1]

        label = torch.tensor([p["label"] for p in params])
        background = torch.tensor([p["background"] for p in params])
        t = _texture(
            background,
            x,
            y,
            freq=stack("freq")[:, None, None],
            phase=stack("phase")[:, None, None],
            direction=stack("direction")[:, None, None],
            point=stack("point")[:, :, None, None],
            noise=stack("noise"),
        )
        colors = stack("colors")[:, :, :, None, None]  # (B, 2, 3, 1, 1)
        image = colors[:, 0] * (1 - t[:, None]) + colors[:, 1] * t[:, None]

        center = stack("center")[:, :, None, None] / size
        radius = stack("radius")[:, None, None] / size
        angle = stack("angle")[:, None, None]
        dx, dy = x - center[:, 0], y - center[:, 1]
        u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / radius
        v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / radius
        mask = _shapes(label, u, v)[:, None].float()
        fg = stack("fg")[:, :, None, None]
        image = image * (1 - mask) + fg * mask
        if self.filter is not None:
            image = fft_filter(image, self.filter[1], self.filter[0])
        return {
            "image": image.clamp(0.0, 1.0),
            "label": label,
            "mask": mask,
            "background": background,
        }


def _polygon(u: torch.Tensor, v: torch.Tensor, n: int, inner: float) -> torch.Tensor:
    """Inside test of a star polygon with ``n`` outer vertices at radius 1 and inner vertices
    at radius ``inner`` (``inner = cos(pi / n)`` gives the regular n-gon)."""
    r = torch.sqrt(u**2 + v**2)
    sector = math.pi / n
    theta = torch.atan2(v, u)
    folded = (torch.remainder(theta + sector, 2 * sector) - sector).abs()  # in [0, sector]
    px, py = r * torch.cos(folded), r * torch.sin(folded)
    bx, by = inner * math.cos(sector), inner * math.sin(sector)
    # Inside when the point lies on the origin's side of the edge from (1, 0) to (bx, by).
    edge = (bx - 1) * py - by * (px - 1)
    return edge >= 0


def _shapes(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean masks (B, S, S) of each item's class shape in its own rotated, scaled
    coordinates ``u, v`` (the shape fits the unit disk)."""
    masks = {
        "circle": lambda u, v: u**2 + v**2 <= 1.0,
        "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.75,
        "triangle": lambda u, v: _polygon(u, v, 3, math.cos(math.pi / 3)),
        "star": lambda u, v: _polygon(u, v, 5, 0.42),
        "cross": lambda u, v: (
            ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
        ),
        "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2),
        "crescent": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + v**2 >= 0.8**2),
        "frame": lambda u, v: (
            (torch.maximum(u.abs(), v.abs()) <= 0.75) & (torch.maximum(u.abs(), v.abs()) >= 0.42)
        ),
    }
    out = torch.zeros_like(u, dtype=torch.bool)
    for c, name in enumerate(CLASSES):
        rows = label == c
        if rows.any():
            out[rows] = masks[name](u[rows], v[rows])
    return out


def _texture(kind, x, y, *, freq, phase, direction, point, noise) -> torch.Tensor:
    """Background mixing weights (B, S, S) in [0, 1] between the two background colours.

    ``x, y`` are (1, S, S) pixel centres in [0, 1]; the other arguments are per item."""

    def square(s: torch.Tensor) -> torch.Tensor:
        return (torch.sin(s) > 0).float()

    def stripes(p: dict) -> torch.Tensor:
        return square(2 * math.pi * p["freq"] * p["coord"] + p["phase"])

    def ramp(p: dict) -> torch.Tensor:
        along = x * torch.cos(p["direction"]) + y * torch.sin(p["direction"])
        low, high = along.amin((1, 2), keepdim=True), along.amax((1, 2), keepdim=True)
        return (along - low) / (high - low)

    def dots(p: dict) -> torch.Tensor:
        fx = torch.remainder(x * p["freq"] + p["point"][:, 0], 1.0) - 0.5
        fy = torch.remainder(y * p["freq"] + p["point"][:, 1], 1.0) - 0.5
        return (fx**2 + fy**2 <= 0.3**2).float()

    def waves(p: dict) -> torch.Tensor:
        r = torch.sqrt((x - p["point"][:, 0]) ** 2 + (y - p["point"][:, 1]) ** 2)
        return 0.5 + 0.5 * torch.sin(2 * math.pi * p["freq"] * r + p["phase"])

    def checks(p: dict) -> torch.Tensor:
        half = p["freq"] / 2
        return (square(2 * math.pi * half * x + p["phase"]) - square(2 * math.pi * half * y)).abs()

    diag_sign = torch.sign(torch.cos(direction))
    textures = {
        "stripes_h": lambda p: stripes({**p, "coord": y}),
        "stripes_v": lambda p: stripes({**p, "coord": x}),
        "stripes_diag": lambda p: stripes({**p, "coord": (x + y * p["sign"]) / math.sqrt(2)}),
        "checks": checks,
        "dots": dots,
        "gradient": ramp,
        "noise": lambda p: p["noise"],
        "waves": waves,
    }
    per_item = {
        "freq": freq,
        "phase": phase,
        "direction": direction,
        "point": point,
        "noise": noise,
        "sign": diag_sign,
    }
    out = torch.zeros(kind.shape[0], *x.shape[-2:])
    for k, name in enumerate(BACKGROUNDS):
        rows = kind == k
        if rows.any():
            subset = {key: value[rows] for key, value in per_item.items()}
            out[rows] = textures[name](subset).expand(int(rows.sum()), *x.shape[-2:])
    return out
