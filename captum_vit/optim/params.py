"""Image parameterizations for feature visualization, batched.

* :class:`PixelImage` -- plain RGB pixels in [0, 1], clamped after every step (the paper);
* :class:`FourierImage` -- Lucid's parameterization: a scaled Fourier spectrum (1/f
  weighting, so low frequencies learn faster) in a decorrelated colour space, squashed to
  [0, 1] by a sigmoid.

Both hold ``(B, ...)`` parameters, one image per row, and expose ``parameters()``,
``images()`` (the ``(B, 3, H, W)`` images in [0, 1]) and ``after_step()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .transforms import RandomDraws

__all__ = ["ImageParam", "PixelImage", "FourierImage", "make_param"]

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
) -> ImageParam:
    """Build a parameterization for ``draws.targets * draws.images`` images.

    Args:
        kind: ``"pixel"`` or ``"fourier"``.
        draws: the run's random source (initial images are drawn per image slot).
        size: ``(H, W)``.
        inputs: starting images ``(targets * images, 3, H, W)`` in [0, 1], or None.
        init: for pixels without inputs: ``"uniform"`` (the paper) or ``"gray"`` (0.5 plus
            small noise).
    """
    h, w = size
    if kind == "pixel":
        if inputs is not None:
            return PixelImage(inputs, clamp=clamp)
        if init == "uniform":
            start = draws.per_image((3, h, w), torch.rand)
        elif init == "gray":
            start = 0.5 + 0.01 * draws.per_image((3, h, w), torch.randn)
        else:
            raise ValueError(f"init must be 'uniform' or 'gray', got {init!r}")
        return PixelImage(start, clamp=clamp)
    if kind == "fourier":
        if inputs is not None:
            return FourierImage.from_images(inputs, decay_power, decorrelate)
        return FourierImage.random(draws, size, fourier_sd, decay_power, decorrelate)
    raise ValueError(f"param must be 'pixel' or 'fourier', got {kind!r}")
