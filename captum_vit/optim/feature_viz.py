"""FeatureVisualization: images that maximally excite chosen units of a layer.

N targets (units or objectives) are optimized together, one image each (or
``images_per_target`` each), in one forward/backward pass per step that stops at the
target layer; the model's parameters get no gradients. The recipe comes from a preset
(``"ghiasi2023"``, the paper's; ``"lucid"``; ``"fast"``; ``None`` for plain gradient
ascent) and every knob of it is an argument.

Targets do not interfere: each image's loss term depends only on its own rows, Adam works
per element, and every random draw (initial image, augmentations) is made per image slot
and shared by all targets (see :class:`~captum_vit.optim.transforms.RandomDraws`), so a unit
optimized alone with the same seed gives the same image as in a batch (up to the float
rounding of batched matrix products).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._base import _LayerMethod
from ..capture import LayerTap, preserved_state
from ..layout import TokenLayout
from ..models import _is_open_clip, _pair, check_images
from .objectives import (
    BatchScorer,
    Objective,
    Token,
    as_objective,
    compile_objectives,
    total_variation,
)
from .params import make_param
from .presets import Preset, get_preset
from .transforms import RandomDraws, Transform, apply_transforms

__all__ = ["FeatureVisualization"]


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

    Examples::

        >>> fv = FeatureVisualization(model, "blocks.5.mlp.act")
        >>> images = fv.attribute(target=[3, 17, 42], preset="ghiasi2023")  # (3, 3, H, W)
        >>> images, trace = fv.attribute(target=7, preset="fast", return_trace=True)
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

    def attribute(
        self,
        inputs: Tensor | None = None,
        target: int | Sequence[int | Objective] | Tensor | Objective = 0,
        token: Token = "patches",
        preset: str | Preset | None = "ghiasi2023",
        steps: int | None = None,
        image_size: int | Sequence[int] | None = None,
        seed: int = 0,
        *,
        images_per_target: int = 1,
        param: str | None = None,
        init: str | None = None,
        copies: int | None = None,
        transforms: Sequence[Transform] | Callable | None = None,
        tv_weight: float | None = None,
        tv_on_augmented: bool | None = None,
        objective_scale: float | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        schedule: str | None = None,
        clamp: bool | None = None,
        fourier_sd: float | None = None,
        decay_power: float | None = None,
        decorrelate: bool | None = None,
        autocast: bool = False,
        show_progress: bool = False,
        return_trace: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Optimize one image per target (all targets in one batch).

        Args:
            inputs: ``None`` (random start, drawn per image slot from ``seed``) or
                ``(B, 3, H, W)`` start images in [0, 1], ``B`` = 1 (shared) or the number
                of returned images.
            target: a unit (int), several units (list or 1-D tensor), an
                :class:`~captum_vit.optim.objectives.Objective`, or a list mixing both. Ints
                become ``objectives.channel(unit, token)``.
            token: where int units are read: ``"patches"`` (mean over patch tokens, prefix
                excluded: the paper), ``"cls"``, ``"all"``, a token index or a
                ``(row, col)`` patch position. Non-spatial layers (logits, pooled or
                embedding vectors) take the unit directly.
            preset: ``"ghiasi2023"``, ``"lucid"``, ``"fast"``, ``None`` (plain gradient
                ascent: no augmentation, no regularizer) or a
                :class:`~captum_vit.optim.presets.Preset`. Every field below overrides it.
            steps: optimization steps.
            image_size: ``(H, W)`` of the optimized images; default the size of
                ``inputs``, else the model's. A fixed-size model sees the (augmented)
                images resized to its own size.
            seed: makes the run reproducible; image slot ``j`` of every target draws from
                the same stream, so results do not depend on the other targets.
            images_per_target: images per target (with ``objectives.diversity()`` for
                varied images); output rows are ordered target-major.
            param: ``"pixel"`` or ``"fourier"``. init: ``"uniform"`` or ``"gray"``.
            copies: augmented copies per image and step (the paper: 8).
            transforms: a list of transforms (``[]``: no augmentation) or a function
                ``size -> list``.
            tv_weight, tv_on_augmented: total-variation weight and where it is taken.
            objective_scale: factor on the objective (the paper's code: 1/8).
            optimizer, lr, betas, eps, schedule, clamp: the optimization; ``lr`` wins over
                the preset's (CLIP models use the preset's ``clip_lr`` otherwise).
            fourier_sd, decay_power, decorrelate: Fourier parameterization.
            autocast: run the model under bfloat16 autocast (CUDA only; ignored on CPU).
            show_progress: a tqdm progress bar.
            return_trace: also return the objective of every image at every step
                (mean over its copies), ``(steps, N)``.

        Returns:
            ``(N, 3, H, W)`` images in [0, 1], N = targets x ``images_per_target``; with
            ``return_trace=True``, ``(images, trace)``.

        Raises:
            ValueError: bad images, sizes, token specs, presets or settings.
            IndexError: a unit outside the layer's channels.
        """
        overrides = {
            name: value
            for name, value in dict(
                steps=steps,
                param=param,
                init=init,
                copies=copies,
                tv_weight=tv_weight,
                tv_on_augmented=tv_on_augmented,
                objective_scale=objective_scale,
                optimizer=optimizer,
                lr=lr,
                betas=betas,
                eps=eps,
                schedule=schedule,
                clamp=clamp,
                fourier_sd=fourier_sd,
                decay_power=decay_power,
                decorrelate=decorrelate,
            ).items()
            if value is not None
        }
        recipe = replace(get_preset(preset), **overrides)
        if lr is None and recipe.clip_lr is not None and _is_open_clip(self.vision):
            recipe = replace(recipe, lr=recipe.clip_lr)
        _check_recipe(recipe, images_per_target)

        objectives = _as_objectives(target, token)
        n_targets = len(objectives)
        rows = n_targets * images_per_target
        size = self._image_size(inputs, image_size)
        model_size = self._fixed_size or size
        device = self.device()
        if inputs is not None:
            inputs = self._start_images(inputs, rows, size).to(device)

        layout, num_channels = self._layout(model_size, device)
        scorer = compile_objectives(
            objectives,
            layout,
            num_channels,
            images=images_per_target,
            copies=recipe.copies,
            default_token=token,
            device=device,
        )
        if transforms is None:
            transforms = recipe.transforms(size)
        elif callable(transforms):
            transforms = transforms(size)
        draws = RandomDraws(seed, n_targets, images_per_target, recipe.copies, device)
        image_param = make_param(
            recipe.param,
            draws,
            size,
            inputs,
            init=recipe.init,
            clamp=recipe.clamp,
            fourier_sd=recipe.fourier_sd,
            decay_power=recipe.decay_power,
            decorrelate=recipe.decorrelate,
        )
        trace = self._optimize(
            image_param,
            scorer,
            list(transforms),
            draws,
            recipe,
            model_size,
            autocast=autocast,
            show_progress=show_progress,
        )
        with torch.no_grad():
            images = image_param.images().detach().float().clamp(0.0, 1.0)
        return (images, trace) if return_trace else images

    # ------------------------------------------------------------------ the loop

    def _optimize(
        self,
        image_param: Any,
        scorer: BatchScorer,
        transforms: list[Transform],
        draws: RandomDraws,
        recipe: Preset,
        model_size: tuple[int, int],
        *,
        autocast: bool,
        show_progress: bool,
    ) -> Tensor:
        steps, copies = recipe.steps, recipe.copies
        optimizer = _make_optimizer(image_param.parameters(), recipe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe))
        device = self.device()
        dtype = _model_dtype(self.vision)
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if autocast and device.type == "cuda"
            else contextlib.nullcontext()
        )
        # the model's normalization (x - mean) / std as one fused multiply-add
        scale = (1 / self.wrapped.std).to(device)
        shift = (-self.wrapped.mean / self.wrapped.std).to(device)
        trace = []
        bar = tqdm(range(steps), disable=not show_progress, desc="feature visualization")
        with preserved_state(self.vision), torch.enable_grad(), self.tap() as tap:
            for step in bar:
                images = image_param.images()
                x = images.repeat_interleave(copies, dim=0) if copies > 1 else images
                x = apply_transforms(x, transforms, draws, step, steps)
                seen = x
                if tuple(x.shape[-2:]) != tuple(model_size):
                    seen = F.interpolate(x, size=model_size, mode="bilinear", align_corners=False)
                with amp:
                    output = tap.run(torch.addcmul(shift, seen, scale).to(dtype))[0]
                    scores = scorer(output)
                per_image = scores.view(-1, copies).mean(dim=1)
                loss = -recipe.objective_scale * per_image.sum()
                if recipe.tv_weight:
                    tv = total_variation(x if recipe.tv_on_augmented else images)
                    tv = tv.view(-1, copies).mean(dim=1) if recipe.tv_on_augmented else tv
                    loss = loss + recipe.tv_weight * tv.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                image_param.after_step()
                trace.append(per_image.detach().float())
                if show_progress:
                    bar.set_postfix(objective=f"{float(trace[-1].mean()):.4g}")
        return torch.stack(trace).cpu() if trace else torch.empty(0, draws.targets)

    # ------------------------------------------------------------------ helpers

    def _image_size(
        self, inputs: Tensor | None, image_size: int | Sequence[int] | None
    ) -> tuple[int, int]:
        if image_size is not None:
            size = _pair(image_size)
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
            output = self.forward_to_layer(probe)
            if isinstance(output, Tensor) and output.dim() == 2:
                flat[size] = int(output.shape[1])
                return None, flat[size]
            raise
        return layout, layout.num_channels


def _as_objectives(target: Any, token: Token) -> list[Objective]:
    if isinstance(target, Objective) or (isinstance(target, int) and not isinstance(target, bool)):
        return [as_objective(target, token)]
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.dim() > 1:
            raise TypeError(
                f"target as a tensor must be 1-D integer units, got {target.dtype} with "
                f"shape {tuple(target.shape)}"
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


def _check_recipe(recipe: Preset, images_per_target: int) -> None:
    if recipe.steps < 1:
        raise ValueError(f"steps must be at least 1, got {recipe.steps}")
    if recipe.copies < 1:
        raise ValueError(f"copies must be at least 1, got {recipe.copies}")
    if images_per_target < 1:
        raise ValueError(f"images_per_target must be at least 1, got {images_per_target}")
    if recipe.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {recipe.schedule!r}")
    if recipe.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {recipe.optimizer!r}")
    if recipe.lr <= 0:
        raise ValueError(f"lr must be positive, got {recipe.lr}")


def _make_optimizer(params: list[Tensor], recipe: Preset) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
    return torch.optim.SGD(params, lr=recipe.lr)


def _schedule(recipe: Preset) -> Callable[[int], float]:
    if recipe.schedule == "constant":
        return lambda step: 1.0
    steps = recipe.steps
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def _model_dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32
