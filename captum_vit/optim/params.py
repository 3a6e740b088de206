"""Image parameterizations for feature visualization, batched.

* :class:`PixelImage` -- plain RGB pixels in [0, 1], clamped after every step (the paper);
* :class:`PyramidImage` -- pixels as a sum of grids at full, 1/2, 1/4, ... resolution
  (each upsampled bilinearly), so a step moves large areas as easily as single pixels;
  the image is kept in [0, 1] like :class:`PixelImage`;
* :class:`FourierImage` -- Lucid's parameterization: a scaled Fourier spectrum (1/f
  weighting, so low frequencies learn faster) in a decorrelated colour space, squashed to
  [0, 1] by a sigmoid;
* :class:`MacoImage` -- MaCo (Fel et al. 2023): the Fourier magnitude is fixed to the mean
  magnitude spectrum of natural images (:func:`magnitude_spectrum`), only the phase is
  optimized, so every image keeps natural-image statistics;
* :class:`SplatImage` -- soft round blobs through a steep sigmoid: no pixel-level
  texture, so the image shows a few flat-coloured shapes.

All hold ``(B, ...)`` parameters, one image per row, and expose ``parameters()``,
``images()`` (the ``(B, 3, H, W)`` images in [0, 1]) and ``after_step()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .transforms import RandomDraws

__all__ = [
    "ImageParam",
    "PixelImage",
    "PyramidImage",
    "FourierImage",
    "MacoImage",
    "SplatImage",
    "magnitude_spectrum",
    "make_param",
]

#: Lucid's square root of the ImageNet colour correlation matrix (its SVD).
_COLOR_CORRELATION_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
)
_COLOR = _COLOR_CORRELATION_SQRT / _COLOR_CORRELATION_SQRT.norm(dim=0).max()


class ImageParam:
    """Base class of the parameterizations."""

    def parameters(self) -> list[Tensor]:
        raise NotImplementedError

    def images(self) -> Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Projection after an optimizer step (clamping for pixels)."""


class PixelImage(ImageParam):
    """RGB pixels in [0, 1].

    Args:
        init: ``(B, 3, H, W)`` starting images in [0, 1].
        clamp: clamp to [0, 1] after every step (the paper) -- otherwise the images are
            clamped only when returned.
    """

    def __init__(self, init: Tensor, clamp: bool = True) -> None:
        self.pixels = init.detach().clone().requires_grad_(True)
        self.clamp = clamp

    def parameters(self) -> list[Tensor]:
        return [self.pixels]

    def images(self) -> Tensor:
        return self.pixels

    @torch.no_grad()
    def after_step(self) -> None:
        if self.clamp:
            self.pixels.clamp_(0.0, 1.0)


class PyramidImage(ImageParam):
    """Pixels as a sum of ``levels`` grids: ``images = sum_k upsample(P_k)``, ``P_k`` at
    ``1 / 2**k`` of the size (bilinear upsampling). With Adam every grid moves at the same
    rate per element, so coarse structure forms in a few steps while the finest grid keeps
    per-pixel freedom. After every step the image is projected back to [0, 1] by taking the
    excess off the finest grid (the paper's clamp, applied to the sum).

    Args:
        init: ``(B, 3, H, W)`` starting images in [0, 1] (the finest grid; the coarser
            ones start at 0).
        levels: number of grids (1: plain pixels); grids stop halving at 1 pixel.
        clamp: project to [0, 1] after every step -- otherwise the images are clamped
            only when returned.
    """

    def __init__(self, init: Tensor, levels: int = 4, clamp: bool = True) -> None:
        if levels < 1:
            raise ValueError(f"pyramid_levels must be at least 1, got {levels}")
        self.size = (int(init.shape[-2]), int(init.shape[-1]))
        finest = init.detach().float().clone().requires_grad_(True)
        coarse = [
            init.new_zeros(init.shape[0], 3, max(1, self.size[0] >> k), max(1, self.size[1] >> k))
            .float()
            .requires_grad_(True)
            for k in range(1, levels)
        ]
        self.grids = [finest, *coarse]
        self.clamp = clamp

    def parameters(self) -> list[Tensor]:
        return list(self.grids)

    def images(self) -> Tensor:
        x = self.grids[0]
        for grid in self.grids[1:]:
            x = x + F.interpolate(grid, size=self.size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def after_step(self) -> None:
        if self.clamp:
            x = self.images()
            self.grids[0].sub_(x - x.clamp(0.0, 1.0))


def _frequency_scale(height: int, width: int, decay_power: float) -> Tensor:
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    freqs = (fx**2 + fy**2).sqrt()
    return 1.0 / freqs.clamp(min=1.0 / max(height, width)) ** decay_power


class FourierImage(ImageParam):
    """Lucid's Fourier parameterization with decorrelated colour.

    ``images = sigmoid(C @ irfft2(scale * spectrum) / 4)`` with ``scale = 1/f^decay``
    and ``C`` Lucid's colour-correlation square root.

    Args:
        spectrum: ``(B, 3, H, W // 2 + 1)`` complex starting spectrum (see
            :meth:`random` and :meth:`from_images`).
        size: ``(H, W)``.
        decay_power: exponent of the 1/f weighting (Lucid: 1).
        decorrelate: use the decorrelated colour space.
    """

    def __init__(
        self,
        spectrum: Tensor,
        size: tuple[int, int],
        decay_power: float = 1.0,
        decorrelate: bool = True,
    ) -> None:
        self.size = size
        self.decorrelate = decorrelate
        self.scale = _frequency_scale(*size, decay_power).to(spectrum.device)
        self.spectrum = torch.view_as_real(spectrum).detach().clone().requires_grad_(True)

    @classmethod
    def random(
        cls,
        draws: RandomDraws,
        size: tuple[int, int],
        sd: float = 0.01,
        decay_power: float = 1.0,
        decorrelate: bool = True,
    ) -> FourierImage:
        h, w = size
        real = draws.per_image((3, h, w // 2 + 1, 2), torch.randn) * sd
        return cls(torch.view_as_complex(real.contiguous()), size, decay_power, decorrelate)

    @classmethod
    def from_images(
        cls, images: Tensor, decay_power: float = 1.0, decorrelate: bool = True
    ) -> FourierImage:
        """The spectrum whose image is ``images`` (up to clamping away from 0 and 1)."""
        size = (images.shape[-2], images.shape[-1])
        x = torch.logit(images.detach().float().clamp(1e-3, 1 - 1e-3))
        if decorrelate:
            x = torch.einsum("cd,bdhw->bchw", torch.linalg.inv(_COLOR).to(x), x)
        spectrum = torch.fft.rfft2(x * 4.0, norm="ortho")
        scale = _frequency_scale(*size, decay_power).to(x.device)
        return cls(spectrum / scale, size, decay_power, decorrelate)

    def parameters(self) -> list[Tensor]:
        return [self.spectrum]

    def images(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        x = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / 4.0
        if self.decorrelate:
            x = torch.einsum("cd,bdhw->bchw", _COLOR.to(x), x)
        return torch.sigmoid(x)


class MacoImage(ImageParam):
    """Magnitude-constrained phase: ``images = sigmoid(standardize(irfft2(M * exp(i phase)))
    + colour)`` with the magnitude ``M`` fixed (a natural-image spectrum) and the phase
    optimized (MaCo, Fel et al. 2023). Standardization is per image over its pixels and
    channels.

    The zero-frequency term is not taken from ``M``: with a fixed magnitude and a free
    phase, each channel's mean would be pinned at plus or minus the spectrum's mean colour
    offset, a colour cast the optimization cannot remove. Instead each image has a free
    mean ``colour`` per channel (in logit units), starting at grey (0).

    Args:
        phase: ``(B, 3, H, W // 2 + 1)`` starting phase in radians.
        magnitude: ``(3, H, W // 2 + 1)`` magnitude spectrum.
        colour: ``(B, 3, 1, 1)`` starting mean colour in logit units (default 0, grey).
    """

    def __init__(
        self,
        phase: Tensor,
        magnitude: Tensor,
        size: tuple[int, int],
        colour: Tensor | None = None,
    ) -> None:
        if tuple(phase.shape[1:]) != tuple(magnitude.shape):
            raise ValueError("phase and magnitude spectra must have the same shape")
        self.magnitude = magnitude.to(phase.device, torch.float32).clone()
        self.magnitude[:, 0, 0] = 0  # the mean colour is the free ``colour`` instead
        self.size = size
        self.phase = phase.detach().float().clone().requires_grad_(True)
        if colour is None:
            colour = phase.new_zeros(phase.shape[0], 3, 1, 1)
        self.colour = colour.detach().float().clone().requires_grad_(True)

    @classmethod
    def random(cls, draws: RandomDraws, magnitude: Tensor, size: tuple[int, int]) -> MacoImage:
        phase = draws.per_image(tuple(magnitude.shape), torch.rand) * (2 * math.pi) - math.pi
        return cls(phase, magnitude, size)

    @classmethod
    def from_images(cls, images: Tensor, magnitude: Tensor) -> MacoImage:
        """Start from the phase and the mean colour of ``images`` (their magnitude is
        replaced by ``M``)."""
        x = torch.logit(images.detach().float().clamp(1e-3, 1 - 1e-3))
        colour = x.mean(dim=(-2, -1), keepdim=True)
        phase = torch.angle(torch.fft.rfft2(x - colour, norm="ortho"))
        return cls(phase, magnitude, (images.shape[-2], images.shape[-1]), colour)

    def parameters(self) -> list[Tensor]:
        return [self.phase, self.colour]

    def images(self) -> Tensor:
        spectrum = torch.polar(self.magnitude.expand_as(self.phase), self.phase)
        x = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        x = x - x.mean(dim=(1, 2, 3), keepdim=True)
        x = x / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-4)
        return torch.sigmoid(x + self.colour)


class SplatImage(ImageParam):
    """An image painted with ``count`` soft round blobs (Gaussian splats):
    ``images = sigmoid(gain * (base + sum_k colour_k * g_k))`` with ``g_k`` a round Gaussian
    of centre ``centre_k`` and width ``exp(log_scale_k)`` (at least one pixel), in image
    coordinates from -1 to 1.

    No parameter reaches single pixels, so the image cannot hold pixel-level texture:
    whatever excites the target has to be drawn as a few shapes, and through the steep
    sigmoid overlapping blobs merge into flat-coloured regions with clean edges.

    Args:
        centres: ``(B, K, 2)`` blob centres ``(y, x)``.
        log_scales: ``(B, K)`` log blob widths (a width of 1 is half the image).
        colours: ``(B, K, 3)`` blob colours before the sigmoid and its gain (added
            where blobs overlap).
        base: ``(B, 3, 1, 1)`` background colour, likewise (0: grey).
        size: ``(H, W)``.
        gain: the sigmoid's steepness.
    """

    def __init__(
        self,
        centres: Tensor,
        log_scales: Tensor,
        colours: Tensor,
        base: Tensor,
        size: tuple[int, int],
        gain: float = 4.0,
    ) -> None:
        self.size, self.gain = size, gain
        self.centres = centres.detach().float().clone().requires_grad_(True)
        self.log_scales = log_scales.detach().float().clone().requires_grad_(True)
        self.colours = colours.detach().float().clone().requires_grad_(True)
        self.base = base.detach().float().clone().requires_grad_(True)
        h, w = size
        device = centres.device
        self.grid_y = (torch.arange(h, device=device) + 0.5) / h * 2 - 1
        self.grid_x = (torch.arange(w, device=device) + 0.5) / w * 2 - 1
        self.min_scale = 2.0 / max(h, w)  # one pixel

    @classmethod
    def random(
        cls, draws: RandomDraws, size: tuple[int, int], count: int = 48, gain: float = 4.0
    ) -> SplatImage:
        """``count`` small blobs (width about 7% of the image) scattered over the middle
        60% of the image, with faint random colours, on grey."""
        centres = (draws.per_image((count, 2), torch.rand) * 2 - 1) * 0.6
        log_scales = -2.0 + 0.2 * draws.per_image((count,), torch.randn)
        colours = 0.5 * draws.per_image((count, 3), torch.randn)
        base = centres.new_zeros(centres.shape[0], 3, 1, 1)
        return cls(centres, log_scales, colours, base, size, gain)

    def parameters(self) -> list[Tensor]:
        return [self.centres, self.log_scales, self.colours, self.base]

    def images(self) -> Tensor:
        # a round Gaussian is separable: the field is one batched matrix product
        width = self.log_scales.exp().clamp(min=self.min_scale)[..., None]  # (B, K, 1)
        along_y = torch.exp(-0.5 * ((self.grid_y - self.centres[..., 0:1]) / width) ** 2)
        along_x = torch.exp(-0.5 * ((self.grid_x - self.centres[..., 1:2]) / width) ** 2)
        coloured_y = (
            self.colours.transpose(1, 2)[..., None, :] * along_y.transpose(1, 2)[:, None]
        )  # (B, 3, H, K)
        field = coloured_y @ along_x[:, None]  # (B, 3, H, W)
        return torch.sigmoid(self.gain * (self.base + field))


_SPECTRA: dict[tuple, Tensor] = {}


def _photographs() -> list[Tensor]:
    """Square crops of the colour photographs bundled with ``skimage.data``."""
    try:
        from skimage import data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError(
            "magnitude='photos' needs scikit-image (pip install scikit-image); or pass "
            "magnitude='scenes' or your own (B, 3, H, W) images"
        ) from error
    crops = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        photo = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        h, w = photo.shape[-2:]
        side = min(h, w) * 2 // 3
        for top, left in ((0, 0), (0, w - side), (h - side, 0), (h - side, w - side)):
            crops.append(photo[:, top : top + side, left : left + side])
        c = (h - side) // 2, (w - side) // 2
        crops.append(photo[:, c[0] : c[0] + side, c[1] : c[1] + side])
    return crops


def _scenes() -> list[Tensor]:
    from ..zoo import SyntheticScenes

    return list(SyntheticScenes(64, seed=1).batch(range(64))["image"])


def magnitude_spectrum(source: str | Tensor, size: tuple[int, int]) -> Tensor:
    """Mean Fourier magnitude ``(3, H, W // 2 + 1)`` (orthonormal ``rfft2`` per channel of
    ``image - 0.5``, so the DC term says how far colours stray from grey) of images resized
    to ``size``; computed on first use and kept in memory.

    Args:
        source: ``"photos"`` (square crops of the ``skimage.data`` colour photographs),
            ``"scenes"`` (64 of the zoo's synthetic scenes) or ``(B, 3, H, W)`` images in
            [0, 1].
        size: ``(H, W)``.
    """
    size = (int(size[0]), int(size[1]))
    if isinstance(source, Tensor):
        if source.dim() != 4 or source.shape[1] != 3:
            raise ValueError(
                f"magnitude images must be (B, 3, H, W), got shape {tuple(source.shape)}"
            )
        return _mean_magnitude(list(source.detach().float().cpu()), size)
    key = (source, size)
    if key not in _SPECTRA:
        if source == "photos":
            _SPECTRA[key] = _mean_magnitude(_photographs(), size)
        elif source == "scenes":
            _SPECTRA[key] = _mean_magnitude(_scenes(), size)
        else:
            raise ValueError(f"magnitude must be 'photos', 'scenes' or images, got {source!r}")
    return _SPECTRA[key]


def _mean_magnitude(images: list[Tensor], size: tuple[int, int]) -> Tensor:
    total = torch.zeros(3, size[0], size[1] // 2 + 1)
    for image in images:
        x = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        total += torch.fft.rfft2(x - 0.5, norm="ortho").abs()
    return total / len(images)


def make_param(
    kind: str,
    draws: RandomDraws,
    size: tuple[int, int],
    inputs: Tensor | None,
    *,
    init: str = "uniform",
    clamp: bool = True,
    fourier_sd: float = 0.01,
    decay_power: float = 1.0,
    decorrelate: bool = True,
    magnitude: str | Tensor = "photos",
    pyramid_levels: int = 4,
    splats: int = 48,
    splat_gain: float = 4.0,
) -> ImageParam:
    """Build a parameterization for ``draws.targets * draws.images`` images.

    Args:
        kind: ``"pixel"``, ``"pyramid"``, ``"fourier"``, ``"maco"`` or ``"splats"``.
        draws: the run's random source (initial images are drawn per image slot).
        size: ``(H, W)``.
        inputs: starting images ``(targets * images, 3, H, W)`` in [0, 1], or None.
        init: for pixels without inputs: ``"uniform"`` (the paper) or ``"gray"`` (0.5 plus
            small noise).
        magnitude: for ``"maco"``: see :func:`magnitude_spectrum`.
        pyramid_levels: for ``"pyramid"``: the number of grids.
        splats, splat_gain: for ``"splats"``: the number of blobs and the sigmoid's
            steepness (see :class:`SplatImage`).
    """
    h, w = size
    if kind in ("pixel", "pyramid"):
        if inputs is not None:
            start = inputs
        elif init == "uniform":
            start = draws.per_image((3, h, w), torch.rand)
        elif init == "gray":
            start = 0.5 + 0.01 * draws.per_image((3, h, w), torch.randn)
        else:
            raise ValueError(f"init must be 'uniform' or 'gray', got {init!r}")
        if kind == "pyramid":
            return PyramidImage(start, pyramid_levels, clamp=clamp)
        return PixelImage(start, clamp=clamp)
    if kind == "fourier":
        if inputs is not None:
            return FourierImage.from_images(inputs, decay_power, decorrelate)
        return FourierImage.random(draws, size, fourier_sd, decay_power, decorrelate)
    if kind == "maco":
        spectrum = magnitude_spectrum(magnitude, size).to(draws.device)
        if inputs is not None:
            return MacoImage.from_images(inputs, spectrum)
        return MacoImage.random(draws, spectrum, size)
    if kind == "splats":
        if inputs is not None:
            raise ValueError(
                "param='splats' cannot start from given images (an image is not a sum of "
                "blobs); drop inputs or use param='fourier' or 'pixel'"
            )
        return SplatImage.random(draws, size, splats, splat_gain)
    raise ValueError(
        f"param must be 'pixel', 'pyramid', 'fourier', 'maco' or 'splats', got {kind!r}"
    )
