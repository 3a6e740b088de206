"""FeatureVisualization: images that maximally excite chosen units of a layer.

N targets (units or objectives) are optimized together, one image each (or
``images_per_target`` each), in one forward/backward pass per step that stops at the
target layer; the model's parameters get no gradients. The recipe comes from a preset
(:mod:`~captum_vit.optim.presets`: ``"ghiasi2023"``, the paper's; ``"fast"``;
``"robust"``; ``"object"``; ``"shapes"``; ``"maco"``; ``"lucid"``; ``None`` for plain
gradient ascent) and any field of it can be overridden by keyword.

Targets do not interfere: each image's loss term depends only on its own rows, Adam works
per element, and every random draw (initial image, augmentations) is made per image slot
and shared by all targets (see :class:`~captum_vit.optim.transforms.RandomDraws`), so a unit
optimized alone with the same seed gives the same image as in a batch (up to the float
rounding of batched matrix products).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._base import _LayerMethod, from_numpy
from .._progress import resolve_progress
from ..capture import LayerTap, autograd, outside_inference_mode, preserved_state
from ..layout import TokenLayout
from ..models import _is_open_clip, _pair, check_images, check_size, model_dtype
from .objectives import (
    BatchScorer,
    Objective,
    Token,
    as_objective,
    check_diversity,
    compile_objectives,
    direction,
    flat_output,
    total_variation,
)
from .params import ImageParam, make_param
from .presets import Preset, resolve_recipe
from .transforms import RandomDraws, Transform, apply_transforms

__all__ = ["FeatureVisualization"]

logger = logging.getLogger("captum_vit")

#: a run whose first step, extrapolated, says it will take longer than this (seconds)
#: gets a one-line cost estimate (logged; also printed with the progress bar)
ESTIMATE_AFTER_SECONDS = 60.0


class FeatureVisualization(_LayerMethod):
    """Optimization-based feature visualization of a layer of a timm ViT (any token
    layout), an open_clip vision tower, or a CNN.

    Args:
        model: a timm model, an open_clip CLIP model (its image tower is used) or vision
            tower, or any image model.
        layer: module or dotted path, e.g. ``"blocks.5.mlp.act"`` (the paper's post-GELU
            hidden units), ``"head"`` (logits: class visualization), or the vision tower
            module itself (its output: a CLIP image embedding).
        attribute_to_layer_input: optimize the layer's input instead of its output (the
            SwiGLU hidden layer of EVA-02 is the input of ``mlp.fc2``).
        call: for modules run several times per forward, which call.
        mean, std, image_size: override the model's normalization and input size.
        element: for a layer that returns a tuple or list of maps (CrossViT's blocks),
            which one the objectives read; by default the first spatial one.

    Examples::

        >>> fv = FeatureVisualization(model, "blocks.5.mlp.act")
        >>> images = fv.attribute(target=[3, 17, 42], preset="ghiasi2023")  # (3, 3, H, W)
        >>> images = fv.attribute(target=7, preset="fast", copies=2, transforms=[])
        >>> logits = FeatureVisualization(model, "head").attribute(target=[0, 1])  # "robust"
    """

    def tap(self, *, call: int | None = None) -> LayerTap:
        """A :class:`LayerTap` on the layer module itself, so the whole vision tower also
        works as the layer (its output, e.g. a CLIP image embedding, has no dotted path)."""
        return LayerTap(
            self.vision,
            self.layer,
            attribute_to_layer_input=self.attribute_to_layer_input,
            call=self.call if call is None else call,
        )

    @outside_inference_mode
    def attribute(
        self,
        inputs: Tensor | None = None,
        target: int | Sequence[int | Objective] | Tensor | Objective = 0,
        token: Token = "patches",
        preset: str | Preset | None = "auto",
        steps: int | None = None,
        image_size: int | Sequence[int] | None = None,
        seed: int = 0,
        *,
        images_per_target: int = 1,
        show_progress: bool | None = None,
        return_trace: bool = False,
        autocast: bool = False,
        **recipe: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Optimize one image per target (all targets in one batch).

        Args:
            inputs: ``None`` (random start, drawn per image slot from ``seed``) or
                ``(B, 3, H, W)`` start images in [0, 1], ``B`` = 1 (shared) or the number
                of returned images.
            target: a unit (int), several units (list or 1-D integer tensor), an
                :class:`~captum_vit.optim.objectives.Objective`, or a list mixing both. Ints
                become ``objectives.channel(unit, token)``. A float tensor is a direction
                in channel space, ``(C,)`` for one image or ``(N, C)`` for N:
                ``objectives.direction(vector, token)`` (a CLIP text embedding on the
                image tower's output, a probe's weights).
            token: where int units are read: ``"patches"`` (mean over patch tokens, prefix
                excluded: the paper), ``"cls"``, ``"all"``, a token index or a
                ``(row, col)`` patch position. Non-spatial layers (logits, pooled or
                embedding vectors) take the unit directly.
            preset: ``"auto"`` (``"object"`` on a non-spatial layer such as class logits,
                else the paper's ``"ghiasi2023"``), ``"ghiasi2023"``, ``"fast"``,
                ``"robust"``, ``"object"``, ``"shapes"``, ``"maco"``, ``"lucid"``,
                ``None`` (plain gradient ascent: no augmentation, no regularizer) or a
                :class:`~captum_vit.optim.presets.Preset`.
            steps: optimization steps (default: the preset's).
            image_size: ``(H, W)`` of the optimized images; default the size of
                ``inputs``, else the model's. A fixed-size model sees the (augmented)
                images resized to its own size.
            seed: makes the run reproducible; image slot ``j`` of every target draws from
                the same stream, so results do not depend on the other targets.
            images_per_target: images per target (with ``objectives.diversity()`` for
                varied images); output rows are ordered target-major.
            show_progress: a progress bar (default: on when stderr is a terminal). A run
                whose first step says it will take over a minute also gets a one-line
                cost estimate (logged to the ``"captum_vit"`` logger; printed with the bar).
            return_trace: also return the objective of every image at every step
                (mean over its copies), ``(steps, N)``.
            autocast: run the model under bfloat16 autocast (CUDA only; ignored on CPU).
            **recipe: any field of :class:`~captum_vit.optim.presets.Preset` overrides the
                preset's, e.g. ``copies=2``, ``lr=0.05``, ``param="fourier"``,
                ``transforms=[]`` (no augmentation) or a list of transforms.

        Returns:
            ``(N, 3, H, W)`` images in [0, 1], N = targets x ``images_per_target``; with
            ``return_trace=True``, ``(images, trace)``.

        Raises:
            ValueError: bad images, sizes, token specs, presets or settings; a
                ``diversity()`` term alone or with one image per target.
            TypeError: a keyword that is no recipe setting.
            IndexError: a unit outside the layer's channels.
            FloatingPointError: the optimization diverged (NaN or inf images).
        """
        if images_per_target < 1:
            raise ValueError(f"images_per_target must be at least 1, got {images_per_target}")
        size = self._image_size(inputs, image_size)
        model_size = self._fixed_size or size
        device = self.device()
        layout, num_channels = self._layout(model_size, device)
        recipe = self.recipe(preset, spatial=layout is not None, steps=steps, **recipe)

        objectives = _as_objectives(target, token)
        check_diversity(objectives, images_per_target)
        rows = len(objectives) * images_per_target
        if inputs is not None:
            inputs = self._start_images(inputs, rows, size).to(device)
        scorer = compile_objectives(
            objectives,
            layout,
            num_channels,
            images=images_per_target,
            copies=recipe.copies,
            default_token=token,
            device=device,
        )
        draws = RandomDraws(seed, len(objectives), images_per_target, recipe.copies, device)
        image_param = _image_param(recipe, draws, size, inputs)
        trace = self._optimize(
            image_param,
            scorer,
            (recipe.warmup_transforms(size), recipe.transforms(size)),
            draws,
            recipe,
            model_size,
            autocast=autocast,
            show_progress=show_progress,
        )
        with torch.no_grad():
            images = image_param.images().detach().float()
        _check_finite(images, trace)
        images = images.clamp(0.0, 1.0)
        return (images, trace) if return_trace else images

    def recipe(
        self, preset: str | Preset | None = "auto", *, spatial: bool = True, **overrides: Any
    ) -> Preset:
        """The :class:`~captum_vit.optim.presets.Preset` a call would run: ``preset``
        (``"auto"``: ``"object"`` for a non-spatial layer, else ``"ghiasi2023"``) with the
        keyword overrides applied; the preset's ``clip_lr`` on an open_clip model."""
        if isinstance(preset, str) and preset == "auto":
            preset = "ghiasi2023" if spatial else "object"
        return resolve_recipe(preset, overrides, clip=_is_open_clip(self.vision))

    # ------------------------------------------------------------------ the loop

    def _optimize(
        self,
        image_param: ImageParam,
        scorer: BatchScorer,
        transforms: tuple[list[Transform], list[Transform]],
        draws: RandomDraws,
        recipe: Preset,
        model_size: tuple[int, int],
        *,
        autocast: bool,
        show_progress: bool | None,
    ) -> Tensor:
        optimizer = _make_optimizer(image_param.parameters(), recipe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe))
        step_fn = self._step_function(
            image_param, scorer, transforms, draws, recipe, model_size, autocast=autocast
        )
        show = resolve_progress(show_progress)
        trace = []
        bar = tqdm(
            range(recipe.steps), desc="feature visualization", disable=not show, file=sys.stderr
        )
        with preserved_state(self.vision), autograd(), self.tap() as tap:
            for step in bar:
                started = time.perf_counter()
                loss, per_image = step_fn(tap, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                image_param.after_step()
                trace.append(per_image.detach().float())
                if step == 0:
                    seconds = time.perf_counter() - started
                    _estimate_cost(seconds, recipe, draws, bar if show else None)
                if show:
                    bar.set_postfix(objective=f"{float(trace[-1].mean()):.4g}")
        return torch.stack(trace).cpu()

    def _step_function(
        self,
        image_param: ImageParam,
        scorer: BatchScorer,
        transforms: tuple[list[Transform], list[Transform]],
        draws: RandomDraws,
        recipe: Preset,
        model_size: tuple[int, int],
        *,
        autocast: bool,
    ) -> Callable[[LayerTap, int], tuple[Tensor, Tensor]]:
        """``(tap, step) -> (loss, objective per image)`` for one optimization step;
        ``transforms`` is ``(warm-up transforms, transforms)``."""
        steps, copies = recipe.steps, recipe.copies
        dtype = model_dtype(self.vision)
        device = self.device()
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if autocast and device.type == "cuda"
            else contextlib.nullcontext()
        )
        # the model's normalization (x - mean) / std as one fused multiply-add
        scale = (1 / self.wrapped.std).to(device)
        shift = (-self.wrapped.mean / self.wrapped.std).to(device)

        def step_fn(tap: LayerTap, step: int) -> tuple[Tensor, Tensor]:
            images = image_param.images()
            x = images.repeat_interleave(copies, dim=0) if copies > 1 else images
            augment = transforms[0] if step < recipe.warmup_steps else transforms[1]
            x = apply_transforms(x, augment, draws, step, steps)
            seen = x
            if tuple(x.shape[-2:]) != tuple(model_size):
                seen = F.interpolate(x, size=model_size, mode="bilinear", align_corners=False)
            seen = self.wrapped.in_model_channel_order(seen)
            with amp:
                output = tap.run(torch.addcmul(shift, seen, scale).to(dtype))[0]
                scores = scorer(output)
            per_image = scores.view(-1, copies).mean(dim=1)
            loss = -recipe.objective_scale * per_image.sum()
            if recipe.tv_weight:
                if recipe.tv_on_augmented:
                    tv = total_variation(x).view(-1, copies).mean(dim=1)
                else:
                    tv = total_variation(images)
                loss = loss + recipe.tv_weight * tv.sum()
            return loss, per_image

        return step_fn

    # ------------------------------------------------------------------ helpers

    def _image_size(
        self, inputs: Tensor | None, image_size: int | Sequence[int] | None
    ) -> tuple[int, int]:
        if image_size is not None:
            size = _pair(check_size(image_size))
            if inputs is not None and tuple(inputs.shape[-2:]) != size:
                raise ValueError(
                    f"inputs are {inputs.shape[-2]}x{inputs.shape[-1]} but image_size is "
                    f"{size[0]}x{size[1]}; resize the inputs or drop image_size"
                )
        elif inputs is not None:
            size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        else:
            size = self.image_size
        if min(size) < 2:
            raise ValueError(f"image_size must be at least 2x2, got {size}")
        return size

    def _start_images(self, inputs: Tensor, rows: int, size: tuple[int, int]) -> Tensor:
        check_images(inputs)
        if inputs.min() < 0 or inputs.max() > 1:
            raise ValueError("inputs must be RGB images in [0, 1]")
        if inputs.shape[0] == 1:
            return inputs.detach().float().expand(rows, 3, *size).clone()
        if inputs.shape[0] != rows:
            raise ValueError(
                f"got {inputs.shape[0]} start images for {rows} output images "
                "(targets x images_per_target); pass 1 or that many"
            )
        return inputs.detach().float().clone()

    def _layout(
        self, size: tuple[int, int], device: torch.device
    ) -> tuple[TokenLayout | None, int]:
        """The layer's layout at the model's input size, or ``None`` and the width for a
        non-spatial ``(B, C)`` layer (logits, pooled features, embeddings)."""
        flat = self.__dict__.setdefault("_flat_widths", {})
        if size in flat:
            return None, flat[size]
        probe = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
        try:
            layout = self.layout_for(probe)
        except ValueError:
            vectors = flat_output(self.forward_to_layer(probe))
            if vectors is not None and len(vectors) == len(probe):
                flat[size] = int(vectors.shape[1])
                return None, flat[size]
            raise
        return layout, layout.num_channels


def _check_finite(images: Tensor, trace: Tensor) -> None:
    """Raise if the optimization diverged (NaN / inf images), naming the first step whose
    objective was not finite, instead of returning images that render as black."""
    broken = ~torch.isfinite(images.flatten(1)).all(dim=1)
    if not bool(broken.any()):
        return
    bad_steps = (~torch.isfinite(trace)).any(dim=1).nonzero()
    when = f"at step {int(bad_steps[0])}" if len(bad_steps) else "in the last step"
    rows = broken.nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
    raise FloatingPointError(
        f"feature visualization diverged: {len(rows)} of {len(images)} image(s) ({shown}) "
        f"hold NaN or inf; the objective was first not finite {when} of {len(trace)}. A float16 "
        "model can overflow: try float32 or bfloat16; otherwise lower lr or objective_scale"
    )


def _as_objectives(target: Any, token: Token) -> list[Objective]:
    target = from_numpy(target)
    if isinstance(target, Objective) or (isinstance(target, int) and not isinstance(target, bool)):
        return [as_objective(target, token)]
    if isinstance(target, Tensor) and target.is_floating_point():
        return _directions(target, token)
    if isinstance(target, Tensor):
        if target.dim() > 1:
            raise TypeError(
                f"target as an integer tensor must be 1-D units, got shape {tuple(target.shape)}"
            )
        target = target.reshape(-1).tolist()
    if isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) == 0:
            raise ValueError("target is empty")
        return [as_objective(t, token) for t in target]
    raise TypeError(
        "target must be an int, a list of ints / objectives, a 1-D tensor or an Objective, "
        f"got {type(target).__name__}"
    )


def _directions(vectors: Tensor, token: Token) -> list[Objective]:
    """A float ``(C,)`` target is one direction in channel space, ``(N, C)`` one per image
    (as :class:`~captum_vit.PatchActivationMap` reads them)."""
    if vectors.dim() not in (1, 2) or vectors.shape[-1] == 0:
        raise ValueError(
            f"a float target is a direction (C,) or one per image (N, C), got shape "
            f"{tuple(vectors.shape)}"
        )
    return [direction(vector, token) for vector in vectors.reshape(-1, vectors.shape[-1])]


def _make_optimizer(params: list[Tensor], recipe: Preset) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
    return torch.optim.SGD(params, lr=recipe.lr)


def _schedule(recipe: Preset) -> Callable[[int], float]:
    if recipe.schedule == "constant":
        return lambda step: 1.0
    steps = recipe.steps
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def _image_param(
    recipe: Preset, draws: RandomDraws, size: tuple[int, int], inputs: Tensor | None
) -> ImageParam:
    return make_param(
        recipe.param,
        draws,
        size,
        inputs,
        init=recipe.init,
        clamp=recipe.clamp,
        fourier_sd=recipe.fourier_sd,
        decay_power=recipe.decay_power,
        decorrelate=recipe.decorrelate,
        magnitude=recipe.magnitude,
        pyramid_levels=recipe.pyramid_levels,
        splats=recipe.splats,
        splat_gain=recipe.splat_gain,
    )


def _estimate_cost(first_step: float, recipe: Preset, draws: RandomDraws, bar: Any) -> None:
    """Log (and print with the progress bar) what a long run will cost."""
    seconds = first_step * recipe.steps
    if seconds < ESTIMATE_AFTER_SECONDS:
        return
    message = (
        f"feature visualization: {recipe.steps} steps x {draws.targets * draws.images} "
        f"images x {recipe.copies} copies, about {_duration(seconds)} "
        f"(first step {first_step:.2f} s)"
    )
    logger.info(message)
    if bar is not None:
        bar.write(message, file=sys.stderr)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
