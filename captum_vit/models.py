"""Model adapters: open_clip unwrapping, normalization and input size, [0, 1] image input.

Every public class of captum_vit takes RGB images in [0, 1]. :class:`ImageModel` wraps a
timm or open_clip vision model so that it accepts such images and normalizes them inside
with the model's own mean / std (timm ``pretrained_cfg``, open_clip ``preprocess_cfg``),
which the caller may override.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture import (
    _as_the_user_sees,
    _user_path,
    find_module,
    module_name,
    peel_wrappers,
    user_class_name,
)

__all__ = [
    "ImageModel",
    "InputConfig",
    "check_batch_shape",
    "check_images",
    "check_size",
    "check_value_range",
    "class_aliases",
    "class_names",
    "match_class_names",
    "fixed_input_size",
    "input_config",
    "model_device",
    "model_dtype",
    "unwrap_vision",
    "vision_layer",
]


def unwrap_vision(model: nn.Module) -> nn.Module:
    """The image tower of a model: ``model.visual`` for open_clip CLIP / CoCa models, the
    wrapped model for an :class:`ImageModel`, the model itself otherwise; inside
    ``torch.compile`` / ``DataParallel`` wrappers (see
    :func:`~captum_vit.capture.peel_wrappers`).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; create one first, "
            "e.g. timm.create_model(name) or captum_vit.zoo.load_model('vit')"
        )
    model = peel_wrappers(model)
    if isinstance(model, ImageModel):
        return model.model
    if type(model).__module__.startswith("transformers."):
        from .hf import vision_tower  # Hugging Face: pixel_values -> tensor, image tower only

        return vision_tower(model)
    return _clip_image_tower(model) or model


def _clip_image_tower(model: nn.Module) -> nn.Module | None:
    """``model.visual`` of an open_clip CLIP / CoCa model (which also has a text tower)."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and hasattr(model, "encode_image"):
        return visual
    return None


def vision_layer(model: nn.Module, layer: nn.Module | str) -> tuple[str, nn.Module]:
    """``(path inside the image tower, module)`` of a layer given against the user's model.

    For a full open_clip CLIP / CoCa model the layer must lie in its image tower
    ``visual``: ``"visual.transformer.resblocks.5"`` (or the tower-relative
    ``"conv1"``, which only the tower has). A name that also names a text-tower module
    (``"transformer.resblocks.5"`` is the text transformer's block) or a text-tower module
    raises instead of silently picking one tower.

    Raises:
        ValueError: unknown layer, an ambiguous name, or a layer outside the image tower;
            the message names the image-tower path to use.
        TypeError: ``layer`` is neither a string nor a module.
    """
    if isinstance(layer, str) and not layer.strip():
        raise ValueError(
            "layer is an empty path: name a module of the model by its dotted path, e.g. "
            "'blocks.3.mlp.act' (for the model's output, its last module, e.g. timm's 'head')"
        )
    vision = unwrap_vision(model)
    tower = None if isinstance(model, ImageModel) else _clip_image_tower(model)
    if tower is None:
        return find_module(vision, layer)
    name, module = find_module(model, layer)  # raises for names both towers have
    prefix = module_name(model, tower) + "."
    if module is tower:
        return "", module  # the whole tower as the layer (its output: the embedding)
    if module is peel_wrappers(model):
        raise ValueError(
            f"the whole {type(module).__name__} model is not a layer of its image tower "
            f"(its forward takes text too): for the image embedding pass {prefix[:-1]!r} "
            f"(model.{prefix[:-1]})"
        )
    if name.startswith(prefix):
        return name[len(prefix) :], module
    blocks = [n for n, _ in tower.named_modules() if n.endswith("resblocks.0")]
    example = f"{prefix}{blocks[0]}" if blocks else f"{prefix}<layer>"
    raise ValueError(
        f"layer {name!r} is outside the image tower of this {type(model).__name__} (it is "
        f"part of the text side): the image methods take layers of `model.{prefix[:-1]}`, "
        f"named with the {prefix!r} prefix, e.g. {example!r}"
    )


def user_layer_path(model: nn.Module, name: str) -> str:
    """The path in the user's ``model`` of an image-tower layer named as
    :func:`vision_layer` names it: ``"visual.<name>"`` for a full open_clip CLIP / CoCa
    model (the bare name may also name a text-tower module), the Hugging Face model's own
    path (``"vit.layers.3"``, not the wrapper's ``"model.vit.layers.3"``), else ``name``.
    Reports name layers this way, so their names work as ``layer=`` on the same model."""
    inner = peel_wrappers(model)
    tower = None if isinstance(inner, ImageModel) else _clip_image_tower(inner)
    if tower is not None:
        prefix = module_name(inner, tower)
        return f"{prefix}.{name}" if name else prefix
    return _user_path(unwrap_vision(inner), name)  # HFVisionModel: without its "model."


def class_names(model: nn.Module) -> list[str] | None:
    """The names of the model's output classes, by index, or ``None`` when the model does
    not name them.

    Sources, first found wins: ``model.class_names`` (the zoo's models); a Hugging Face
    config's ``id2label`` (unless it only holds the default ``LABEL_0``, ``LABEL_1``, ...);
    for timm models with an ImageNet head (``timm.data.infer_imagenet_subset``), the
    ImageNet descriptions (``"tench, Tinca tinca"``). Wrapped models (:class:`ImageModel`,
    open_clip towers, Hugging Face towers) are looked through.

    Examples::

        >>> class_names(zoo.load_model("vit"))[:2]
        ['circle', 'square']
        >>> class_names(timm.create_model("vit_base_patch16_224"))[0]
        'tench, Tinca tinca'
    """
    aliases = class_aliases(model)
    return [names[0] for names in aliases] if aliases is not None else None


def class_aliases(model: nn.Module) -> list[tuple[str, ...]] | None:
    """Every name each output class goes by: its name (as :func:`class_names`), then, for
    ImageNet heads, its WordNet synset (``"n01440764"``); ``None`` as :func:`class_names`."""
    for candidate in _class_sources(model):
        names = getattr(candidate, "class_names", None)
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return [(name,) for name in names]
        if type(candidate).__module__.startswith("transformers."):
            return _hf_labels(candidate)
        imagenet = _imagenet_aliases(candidate)
        if imagenet is not None:
            return imagenet
    return None


def match_class_names(model: nn.Module, names: Sequence[str]) -> list[int | None] | None:
    """The model's class index for each of ``names`` (folder names, say); ``None`` for a
    name that fits no class, or several. ``None`` altogether when the model does not name
    its classes (see :func:`class_names`).

    A name fits a class when it equals, ignoring case and with ``_`` read as a space, one
    of the class's :func:`class_aliases` (name or synset), else the first comma-separated
    part of its name (``"tench"`` for ``"tench, Tinca tinca"``) when only one class has it.

    Examples::

        >>> match_class_names(zoo.load_model("vit"), ["star", "Circle", "banana"])
        [3, 0, None]
    """
    aliases = class_aliases(model)
    if aliases is None:
        return None
    full: dict[str, set[int]] = {}
    first: dict[str, set[int]] = {}
    for index, names_of_class in enumerate(aliases):
        for alias in names_of_class:
            full.setdefault(_name_key(alias), set()).add(index)
            first.setdefault(_name_key(alias.split(",")[0]), set()).add(index)
    found: list[int | None] = []
    for name in names:
        key = _name_key(name)
        indices = full.get(key) or first.get(key) or set()
        found.append(next(iter(indices)) if len(indices) == 1 else None)
    return found


def _name_key(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def _class_sources(model: nn.Module) -> list[nn.Module]:
    """The model and what it wraps: an ImageModel's model, the image tower, a Hugging
    Face tower's model."""
    sources = [model]
    vision = unwrap_vision(model)
    sources.append(vision)
    inner = getattr(vision, "model", None)
    if isinstance(inner, nn.Module):
        sources.append(inner)
    return list({id(m): m for m in sources}.values())


def _hf_labels(model: nn.Module) -> list[tuple[str, ...]] | None:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    labels = {int(k): str(v) for k, v in id2label.items()}
    if not labels or sorted(labels) != list(range(len(labels))):
        return None
    if all(labels[i] == f"LABEL_{i}" for i in labels):  # transformers' placeholder names
        return None
    return [(labels[i],) for i in range(len(labels))]


def _imagenet_aliases(model: nn.Module) -> list[tuple[str, ...]] | None:
    """(description, synset) of each class of a timm model with an ImageNet head."""
    if not type(model).__module__.startswith("timm.") or not getattr(model, "pretrained_cfg", None):
        return None
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != getattr(model, "num_classes", None):
        return None  # a new head (num_classes=10) or no head (num_classes=0)
    return [
        (info.index_to_description(i), info.index_to_label_name(i))
        for i in range(info.num_classes())
    ]


@dataclass(frozen=True)
class InputConfig:
    """Normalization and input size of a model: ``mean``/``std`` per RGB channel (applied to
    [0, 1] images) and ``size`` ``(H, W)``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    value = tuple(int(v) for v in value)
    return value[-2:] if len(value) >= 2 else (value[0], value[0])


def check_size(image_size: Any, name: str = "image_size") -> int | Sequence[int]:
    """``image_size`` if it is a positive int or an ``(H, W)`` pair of them.

    Raises:
        TypeError: neither (a float, a string: ``"64"`` would read as ``(6, 4)``).
        ValueError: a size below 1.
    """
    values = image_size if isinstance(image_size, Sequence) else [image_size]
    integral = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    if not integral or len(values) not in (1, 2) or isinstance(image_size, str):
        raise TypeError(f"{name} must be an int or an (H, W) pair of ints, got {image_size!r}")
    if min(int(v) for v in values) < 1:
        raise ValueError(f"{name} must be at least 1 pixel, got {image_size!r}")
    return image_size


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) == 1:
        return value * 3
    if len(value) != 3:
        raise ValueError(f"mean / std must have 1 or 3 values (RGB), got {len(value)}")
    return value


def _current_size(vision: nn.Module) -> tuple[int, int] | None:
    """The size the model is built for now (timm ``patch_embed.img_size``, also Twins'
    ``patch_embeds.0``, CoaT's ``patch_embed1``, MLP-Mixer's ``stem``, TNT's
    ``pixel_embed``; open_clip ``image_size``), which wins over ``pretrained_cfg`` (timm
    keeps 224 there even for a model built with another ``img_size``)."""
    for name, module in vision.named_modules():
        if getattr(module, "img_size", None) is None:
            continue
        if "patch_embed" in name or _convolves_the_image(module):
            if _embeds_a_stems_output(module):
                continue
            return _pair(module.img_size)
    if (built := _timm_built_size(vision)) is not None:
        return built
    for module in (vision, getattr(vision, "trunk", None)):
        if module is None:
            continue
        for attr in ("img_size", "image_size"):
            value = getattr(module, attr, None)
            if isinstance(value, (int, tuple, list)):
                return _pair(value)
    return None


def _convolves_the_image(module: nn.Module) -> bool:
    """Whether a module embeds the RGB image's patches with a convolution ``proj``."""
    proj = getattr(module, "proj", None)
    return isinstance(proj, nn.Conv2d) and proj.in_channels == 3


#: timm families whose stages are built for one feature-map size (``feat_size``): their
#: relative-position tables and pooling follow it, so they take that input size only.
_FIXED_FEATURE_SIZE_FAMILIES = ("timm.models.gcvit", "timm.models.mvitv2")


def _timm_built_size(vision: nn.Module) -> tuple[int, int] | None:
    """The one size a timm Hiera, LeViT, GC ViT, MViT-v2, EfficientFormer-V2 or VOLO
    takes, which it keeps as no ``img_size``: Hiera's token grid times its patch stride (its
    unroll and position embedding are built for it), LeViT's first attention's resolution
    times its stem's reduction (its attention biases are built for it), GC ViT's and
    MViT-v2's first stage's ``feat_size`` times that stage's reduction, VOLO's position
    embedding grid times its reduction there, and EfficientFormer-V2's as
    :func:`_efficientformer_v2_size` reads it."""
    kind = type(vision)
    if kind.__module__ in _FIXED_FEATURE_SIZE_FAMILIES and getattr(vision, "feature_info", None):
        feat_size = getattr(vision.stages[0], "feat_size", None)
        reduction = vision.feature_info[0]["reduction"]
        if isinstance(feat_size, (tuple, list)) and len(feat_size) == 2:
            return feat_size[0] * reduction, feat_size[1] * reduction
        return None
    if kind.__module__ == "timm.models.efficientformer_v2":
        return _efficientformer_v2_size(vision)
    if kind.__module__ == "timm.models.volo" and getattr(vision, "feature_info", None):
        # its position embedding is built for the grid after the first pooling
        grid, scale = vision.pos_embed.shape[1:3], vision.pooling_scale
        reduction = vision.feature_info[0]["reduction"] * scale
        return grid[0] * reduction, grid[1] * reduction
    if kind.__module__ == "timm.models.hiera":
        grid, stride = vision.tokens_spatial_shape, vision.patch_stride
        return (grid[0] * stride[0], grid[1] * stride[1]) if len(grid) == 2 else None
    if kind.__module__ == "timm.models.levit" and getattr(vision, "feature_info", None):
        reduction = vision.feature_info[0]["reduction"]
        for module in vision.stages[0].modules():
            resolution = getattr(module, "resolution", None)
            if isinstance(resolution, tuple) and len(resolution) == 2:
                return resolution[0] * reduction, resolution[1] * reduction
    return None


def _efficientformer_v2_size(vision: nn.Module) -> tuple[int, int] | None:
    """EfficientFormer-V2's input size: its first attention's resolution (built for its
    stage's map, after its own strided convolution) times that stride and the stage's
    reduction."""
    for index, stage in enumerate(vision.stages):
        for module in stage.modules():
            resolution = getattr(module, "resolution", None)
            if type(module).__name__ != "Attention2d" or not isinstance(resolution, tuple):
                continue
            stride_conv = getattr(module, "stride_conv", None)
            conv = getattr(stride_conv, "conv", None)
            stride = conv.stride if isinstance(conv, nn.Conv2d) else (1, 1)
            reduction = vision.feature_info[index]["reduction"]
            return (
                resolution[0] * stride[0] * reduction,
                resolution[1] * stride[1] * reduction,
            )
    return None


def _embeds_a_stems_output(patch_embed: nn.Module) -> bool:
    """Whether a patch embedding works on a stem's feature map, not on the RGB image
    (Visformer's ``patch_embed1``, 16 channels at 112 px for 224 px images): its
    ``img_size`` is not the model's. A hybrid's embedding (``backbone``) sees the image."""
    proj = getattr(patch_embed, "proj", None)
    return (
        isinstance(proj, nn.Conv2d)
        and proj.in_channels != 3
        and getattr(patch_embed, "backbone", None) is None
    )


def _declared_config(vision: nn.Module) -> dict:
    """mean / std / size declared by timm (``pretrained_cfg``) or open_clip
    (``preprocess_cfg``, legacy ``image_mean`` / ``image_std``) or a Hugging Face tower
    (``declared_input_config``, see :mod:`captum_vit.hf`)."""
    if getattr(vision, "declared_input_config", None):
        return dict(vision.declared_input_config)
    for module in (vision, getattr(vision, "trunk", None)):
        if module is None:
            continue
        cfg = getattr(module, "preprocess_cfg", None)
        if cfg:
            return {k: cfg[k] for k in ("mean", "std", "size") if k in cfg}
        if getattr(module, "image_mean", None) is not None:
            return {"mean": module.image_mean, "std": module.image_std}
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if cfg:
            found = {k: cfg[k] for k in ("mean", "std") if k in cfg}
            if "input_size" in cfg:
                found["size"] = cfg["input_size"][-2:]
            return found
    return {}


#: open_clip's defaults (OPENAI_DATASET_MEAN / STD), used for open_clip towers that carry
#: no preprocess config (built directly rather than through ``create_model``).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def input_config(
    model: nn.Module,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | Sequence[int] | None = None,
) -> InputConfig:
    """Normalization and input size for ``model``; explicit arguments win.

    Input size: ``image_size`` if given; then the model's own current size; then
    ``pretrained_cfg`` / ``preprocess_cfg``. Mean / std: explicit; then the declared
    config; open_clip towers without a config get open_clip's OpenAI defaults,
    torchvision models ImageNet's (what torchvision's weights are trained with); other
    models without a config get mean 0, std 1 (no normalization), with a warning when a
    submodule declares a normalization (a user's module around a timm backbone). For an
    :class:`ImageModel`, the settings it was built with come before all of these.

    Raises:
        ValueError: no input size can be found and none is given.
    """
    mean, std, size = _resolve_input(model, mean, std, image_size)
    if size is None:
        raise _unknown_size(model)
    return InputConfig(mean=mean, std=std, size=size)


def _resolve_input(
    model: nn.Module,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    image_size: int | Sequence[int] | None,
) -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[int, int] | None]:
    """:func:`input_config`'s ``(mean, std, size)``, with ``None`` for a size it cannot
    find (a torchvision CNN records none: it takes any size). An :class:`ImageModel`'s
    settings are the defaults for what is not given: they are the user's choice."""
    outer = peel_wrappers(model) if isinstance(model, nn.Module) else model
    if isinstance(outer, ImageModel):
        chosen = outer._mean_std_size
        given = (
            chosen[0] if mean is None else _triple(mean),
            chosen[1] if std is None else _triple(std),
            chosen[2] if image_size is None else _pair(check_size(image_size)),
        )
        _check_std(given[1])
        return given
    vision = unwrap_vision(model)
    declared = _declared_config(vision)
    default_mean, default_std = _library_default(vision)
    if mean is None and std is None and not declared and default_std == _NO_STD:
        _warn_inner_normalization(vision)
    if mean is None:
        mean = declared.get("mean") or default_mean
    if std is None:
        std = declared.get("std") or default_std
    if image_size is not None:
        size = _pair(check_size(image_size))
    else:
        size = _current_size(vision) or (_pair(declared["size"]) if "size" in declared else None)
    std = _triple(std)
    _check_std(std)
    return _triple(mean), std, size


def _refuse_other_channels(vision: nn.Module) -> None:
    """Refuse a model declared to take other than 3 input channels (timm's ``in_chans=1``
    for grey images, a Hugging Face config's ``num_channels``): the package feeds RGB."""
    found = _declared_input_channels(vision)
    if found is None or found[1] == 3:
        return
    where, channels = found
    name = _as_the_user_sees(vision)[0]
    raise ValueError(
        f"{name} takes {channels}-channel images ({where}); captum_vit feeds RGB images "
        "(B, 3, H, W). Use a model built for 3 channels (timm: in_chans=3), or wrap yours "
        "in a module that maps RGB to its channels (for grey: the mean of the three) and "
        "pass that"
    )


def _declared_input_channels(vision: nn.Module) -> tuple[str, int] | None:
    """``(where it is declared, channels)`` of the model's input, where the model says:
    timm's ``pretrained_cfg["first_conv"]`` (also of an open_clip tower's timm trunk), a
    Hugging Face config's ``num_channels``; else ``None``."""
    for owner, prefix in ((vision, ""), (getattr(vision, "trunk", None), "trunk.")):
        first = timm_first_conv(owner)
        if first is None:
            continue
        conv = dict(owner.named_modules()).get(first)
        if isinstance(conv, nn.Conv2d):
            where = f"its first convolution {prefix}{first} has in_channels={conv.in_channels}"
            block = _space_to_depth_block(owner)
            if block > 1 and conv.in_channels % (block * block) == 0:
                # TResNet: a space-to-depth stem stacks each block x block pixels' channels
                where += f" after a {block}x{block} space-to-depth"
                return where, conv.in_channels // (block * block)
            return where, conv.in_channels
        linear = linear_patch_embedding(owner)
        if linear is not None:
            _, (patch_h, patch_w), channels = linear
            return (
                f"its linear patch embedding {prefix}{first} takes {channels} x {patch_h} x "
                f"{patch_w} values per patch",
                channels,
            )
    for inner in (getattr(vision, "model", None), getattr(vision, "vision_model", None)):
        channels = getattr(getattr(inner, "config", None), "num_channels", None)
        if type(inner).__module__.startswith("transformers.") and isinstance(channels, int):
            return f"its config has num_channels={channels}", channels
    return None


def _space_to_depth_block(owner: nn.Module) -> int:
    """The block size of timm's ``SpaceToDepth`` stem (TResNet's ``body.s2d``: 4, so its
    first convolution takes 16 times the image's channels), else 1."""
    for module in owner.modules():
        kind = type(module)
        if kind.__module__.startswith("timm.layers") and kind.__name__ == "SpaceToDepth":
            block = getattr(module, "bs", 1)
            return block if isinstance(block, int) and block > 0 else 1
    return 1


def timm_first_conv(module: nn.Module) -> str | None:
    """The path of the input layer that timm's ``pretrained_cfg["first_conv"]`` names
    for ``module`` (the first, where it lists several), or ``None``."""
    cfg = getattr(module, "pretrained_cfg", None)
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    return first if isinstance(first, str) else None


def linear_patch_embedding(owner: nn.Module) -> tuple[str, tuple[int, int], int] | None:
    """``(path, (p_h, p_w), input channels)`` of a patch embedding that projects flattened
    patches with an ``nn.Linear`` (timm Gemma 4, NaFlexViT), where timm declares it: the
    ``first_conv`` of ``owner`` is that ``nn.Linear``, of ``channels * p_h * p_w`` inputs,
    and its parent module has that ``patch_size``; else ``None``."""
    first = timm_first_conv(owner)
    if first is None or "." not in first:
        return None
    modules = dict(owner.named_modules())  # first_conv may name no module of this build
    path = first.rpartition(".")[0]
    proj, size = modules.get(first), getattr(modules.get(path), "patch_size", None)
    size = (size, size) if isinstance(size, int) else size
    if not isinstance(proj, nn.Linear) or not (isinstance(size, (tuple, list)) and len(size) == 2):
        return None
    area = int(size[0]) * int(size[1])
    if area <= 0 or proj.in_features % area:
        return None
    return path, (int(size[0]), int(size[1])), proj.in_features // area


def _check_std(std: tuple[float, float, float]) -> None:
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")


def _unknown_size(model: nn.Module) -> ValueError:
    vision = unwrap_vision(model)
    if getattr(vision, "declared_input_config", None) is not None:  # HFVisionModel
        missing = "its config has no image_size (it takes any size)"
    else:
        missing = "it has no patch_embed.img_size, image_size or pretrained_cfg"
    return ValueError(
        f"cannot tell the input size of {user_class_name(vision)}: {missing}; pass "
        "image_size=(H, W) "
        "(on the command line: --image-size)"
    )


def _warn_inner_normalization(vision: nn.Module) -> None:
    """A model without a normalization of its own that holds one that declares it (a
    Lightning module or a wrapper around a timm model) gets images unnormalized: right if
    it normalizes inside, wrong if its data pipeline normalized them. Only the user
    knows, so say which was assumed and how to choose."""
    for name, module in vision.named_modules():
        inner = _declared_config(module) if name else {}
        if inner.get("mean") is None or inner.get("std") is None:
            continue
        mean, std = _triple(inner["mean"]), _triple(inner["std"])
        if (mean, std) == (_NO_MEAN, _NO_STD):
            return
        expects = f"mean={_short(mean)}, std={_short(std)}"
        warnings.warn(
            f"{user_class_name(vision)} declares no input normalization, but its submodule "
            f"{name!r} ({type(module).__name__}) expects {expects}: images are passed to "
            "the model as they are ([0, 1], unnormalized). If the model expects normalized "
            f"images (your data pipeline normalizes them), pass {expects}; if it "
            "normalizes inside, pass mean=(0, 0, 0), std=(1, 1, 1) to say so (for the "
            "command line: set model.pretrained_cfg = {'mean': ..., 'std': ...})",
            UserWarning,
            stacklevel=_first_frame_outside_package(),
        )
        return


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _first_frame_outside_package() -> int:
    """The ``stacklevel`` of the user's call that led here (the first frame outside
    this package), for a warning raised by its caller."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


_NO_MEAN, _NO_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
#: torchvision's ImageNet normalization (every torchvision classification weight uses it).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _library_default(vision: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalization a model without a declared config gets: open_clip's OpenAI
    defaults for open_clip towers, ImageNet's for torchvision models (whose weights carry
    it in their transforms, not on the model), else none (mean 0, std 1)."""
    if _is_open_clip(vision):
        return _OPENAI_MEAN, _OPENAI_STD
    if type(vision).__module__.startswith("torchvision.models"):
        return _IMAGENET_MEAN, _IMAGENET_STD
    return _NO_MEAN, _NO_STD


def _is_open_clip(module: nn.Module) -> bool:
    return type(module).__module__.startswith("open_clip")


def outputs_embeddings(model: nn.Module) -> bool:
    """Whether the model's image output is an image-text embedding (open_clip models and
    towers, Hugging Face CLIP image features), not class scores."""
    vision = unwrap_vision(model)
    return _is_open_clip(vision) or bool(getattr(vision, "_clip_pair", False))


def check_embedding_head(head: Any, vision: nn.Module) -> None:
    """Refuse a missing or non-callable ``head`` for a model that outputs embeddings."""
    if head is None:
        raise ValueError(
            f"{user_class_name(vision)} outputs image embeddings, not class logits: pass "
            "head=... (a classifier or a zero-shot head mapping embeddings to logits, e.g. "
            "lambda e: F.normalize(e, dim=-1) @ text_features.T)"
        )
    check_head_callable(head)


def check_head_callable(head: Any) -> None:
    """Refuse a ``head`` that is given but cannot be called."""
    if head is not None and not callable(head):
        raise TypeError(f"head must be callable, got {type(head).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's parameters (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's parameters (``float32`` for a model without floating
    parameters): the dtype :meth:`ImageModel.normalize` casts images to."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The only input size the model accepts, or ``None`` if it accepts several.

    timm ViT-style models with ``strict_img_size`` and no dynamic size, open_clip towers
    (fixed positional embedding), torchvision's ViT and Hugging Face ViT / DeiT / CLIP configured for a
    non-square patch grid (see :class:`~captum_vit.hf.HFVisionModel`) take one size only.
    """
    vision = unwrap_vision(model)
    if getattr(vision, "fixed_size", None) is not None:  # HFVisionModel
        return vision.fixed_size
    for module in (vision, getattr(vision, "trunk", None)):
        if module is None:
            continue
        # timm's patch embedding (MLP-Mixer's "stem"); TNT's pixel embedding asserts its size
        for attr in ("patch_embed", "stem", "pixel_embed"):
            embed = getattr(module, attr, None)
            if embed is None or getattr(embed, "img_size", None) is None:
                continue
            dynamic = getattr(module, "dynamic_img_size", False) or getattr(
                embed, "dynamic_img_pad", False
            )
            strict = getattr(embed, "strict_img_size", False) or attr == "pixel_embed"
            if strict and not dynamic:
                return _pair(embed.img_size)
        if _is_open_clip(module) and getattr(module, "image_size", None) is not None:
            if hasattr(module, "positional_embedding"):
                return _pair(module.image_size)
    if _is_torchvision_vit(vision):  # its forward asserts its own size
        return _pair(vision.image_size)
    return _timm_built_size(vision)


def _is_torchvision_vit(module: nn.Module) -> bool:
    return type(module).__module__ == "torchvision.models.vision_transformer" and isinstance(
        getattr(module, "image_size", None), int
    )


def patch_tiling(
    model: nn.Module, image_size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """How the model's patch embedding tiles an ``(H, W)`` image: ``((rows, cols),
    (patch_h, patch_w))``, the patch grid covering ``rows * patch_h`` x ``cols *
    patch_w`` pixels from the top left. On an image that is not a whole number of
    patches that is more than the image where the model pads it to whole patches (timm
    ``dynamic_img_pad``, Hugging Face Swin) and less where it drops the remainder
    (Hugging Face ViT, DeiT, DINOv2, CLIP, BEiT). ``None`` where the model's patching is
    unknown or its patches overlap (no ``patch_embed``, PiT, a hybrid's CNN stem,
    open_clip's fixed size).
    """
    vision = unwrap_vision(model)
    tiling = getattr(vision, "patch_tiling", None)
    if callable(tiling):  # HFVisionModel
        return tiling(image_size)
    for module in (vision, getattr(vision, "trunk", None)):
        patch_embed = getattr(module, "patch_embed", None) if module is not None else None
        if _tiles_in_patches(patch_embed):
            pads = bool(getattr(patch_embed, "dynamic_img_pad", False))
            return whole_patches(image_size, _pair(patch_embed.patch_size), pads=pads)
    return None


def _tiles_in_patches(patch_embed: Any) -> bool:
    """Whether a timm patch embedding cuts the image into non-overlapping patches: a
    ``proj`` convolution whose kernel and stride are its ``patch_size`` (not PiT's
    overlapping patches, nor a hybrid's CNN stem)."""
    proj = getattr(patch_embed, "proj", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    if not isinstance(proj, nn.Conv2d) or patch_size is None:
        return False
    if hasattr(patch_embed, "backbone"):
        return False
    size = _pair(patch_size)
    return tuple(proj.kernel_size) == size and tuple(proj.stride) == size


def whole_patches(
    image_size: tuple[int, int], patch_size: tuple[int, int], *, pads: bool
) -> tuple[tuple[int, int], tuple[int, int]]:
    """:func:`patch_tiling` of a model that pads the image to whole patches
    (``pads=True``) or drops the remainder."""
    rounding = math.ceil if pads else math.floor
    rows, cols = (int(rounding(s / p)) for s, p in zip(image_size, patch_size, strict=True))
    return (rows, cols), patch_size


#: How far outside [0, 1] image values may stray (float rounding of resizing, colour
#: conversion) before :func:`check_images` refuses them.
IMAGE_RANGE_TOLERANCE = 1e-3


def check_images(
    images: torch.Tensor, *, size: tuple[int, int] | None = None, in_unit_range: bool = True
) -> None:
    """Raise a ValueError / TypeError naming the problem if ``images`` is not a valid
    ``(B, 3, H, W)`` float batch of RGB values in [0, 1] (finite, within
    ``IMAGE_RANGE_TOLERANCE`` of the range unless ``in_unit_range=False``, the right size
    for a fixed-size model)."""
    check_batch_shape(images)
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a float tensor in [0, 1], got dtype {images.dtype}; "
            "convert with images.float() / 255"
        )
    if in_unit_range:
        check_value_range(images)
    elif images.numel():
        _finite_bounds(images, "images")
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(
            f"this model takes {size[0]}x{size[1]} images only, got "
            f"{images.shape[-2]}x{images.shape[-1]}; resize the images (or build a timm "
            "model with img_size / dynamic_img_size=True)"
        )


def check_value_range(images: torch.Tensor, name: str = "images") -> None:
    """Raise a ValueError with the usual fix unless every value of ``images`` is finite
    and within ``IMAGE_RANGE_TOLERANCE`` of [0, 1]."""
    if not images.numel():
        return
    low, high = _finite_bounds(images, name)
    if low < -IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must hold RGB values in [0, 1], got values in [{low:.4g}, {high:.4g}]: "
            "divide 0-255 images by 255; pass images before mean / std normalization "
            "(the model normalizes inside); clamp small overshoots with images.clamp(0, 1)"
        )


def _finite_bounds(images: torch.Tensor, name: str) -> tuple[float, float]:
    """``(min, max)`` of a non-empty tensor; a ValueError if any value is NaN or inf."""
    # min and max are NaN / inf exactly when some value is; aminmax reads the batch once
    # without the full-size bool tensor of isfinite (5x faster on CPU).
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"NaN or inf values in {name}")
    return low, high


def check_batch_shape(images: torch.Tensor, name: str = "images") -> None:
    """Raise a TypeError / ValueError with the usual fix unless ``images`` is a
    ``(B, 3, H, W)`` tensor (any dtype or range: normalized inputs pass too)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(images).__name__}{_tensor_hint(images)}"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape (B, 3, H, W) (RGB), got {tuple(images.shape)}"
            f"{_shape_hint(images.shape)}"
        )


def _tensor_hint(images: object) -> str:
    """How to make a tensor of what check_images was given, where there is a usual way."""
    if isinstance(images, np.ndarray):
        return (
            "; convert with torch.from_numpy(array), then .permute(0, 3, 1, 2) for "
            "(B, H, W, 3) arrays and .float() / 255 for uint8 ones"
        )
    if type(images).__module__.startswith("PIL."):  # a Pillow image, without importing it
        return "; convert with torchvision.transforms.functional.to_tensor(image)[None]"
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
        return "; stack a list of (3, H, W) images with torch.stack(images)"
    if isinstance(images, nn.Module):
        return "; a model was passed where the images go: check the order of the arguments"
    return ""


def _shape_hint(shape: torch.Size) -> str:
    """The usual fix for a wrongly shaped image batch, where the shape suggests one."""
    if len(shape) == 3 and shape[0] == 3:
        return "; for one image add the batch dimension: images[None]"
    if len(shape) == 4 and shape[-1] == 3:
        return "; channels last? use images.permute(0, 3, 1, 2)"
    if len(shape) == 4 and shape[1] == 1:
        return "; for grey images repeat the channel: images.expand(-1, 3, -1, -1)"
    if len(shape) == 4 and shape[1] == 4:
        return "; for RGBA images drop the alpha channel: images[:, :3]"
    return ""


class ImageModel(nn.Module):
    """Wraps a vision model so that it takes RGB images in [0, 1] and normalizes inside.

    Hooks set on the wrapped model's modules fire as usual; layer paths are those of the
    wrapped model (also for an open_clip CLIP model, whose image tower is used). Images are
    cast to the model's dtype where they enter it (:meth:`normalize`), so bfloat16 and
    float16 models take float32 images.

    Args:
        model: a timm model, an open_clip CLIP model or vision tower, or any image model.
        mean, std, image_size: override the model's own configuration.

    Examples::

        >>> wrapped = ImageModel(timm.create_model("vit_tiny_patch16_224"))
        >>> logits = wrapped(torch.rand(2, 3, 224, 224))
    """

    #: Where the wrapped model sits: its paths, less this prefix, are the user's.
    wrapped_prefix = "model."

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.model = unwrap_vision(model)
        _refuse_other_channels(self.model)
        self._mean_std_size = _resolve_input(model, mean, std, image_size)
        # Not inference tensors, even when built inside torch.inference_mode(): the
        # methods that take gradients through normalize() need autograd to save them.
        with torch.inference_mode(False):
            mean, std = (torch.tensor(v) for v in self._mean_std_size[:2])
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        #: the model takes BGR (a Hugging Face checkpoint whose image processor flips
        #: the channels, such as MobileViT's): the images' channels are reversed first
        self.reversed_channels = _declared_config(self.model).get("channel_order") == "BGR"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std``: [0, 1] RGB images as the wrapped model takes them
        (in BGR order, for the model's mean / std, where it takes BGR).

        The only place where images enter the model: normalized in float32 (or the images'
        own float dtype, if wider) on the images' device, then cast once to the model's
        dtype (a bfloat16 / float16 model gets bfloat16 / float16 inputs). Gradients flow
        back through the cast to the float32 images.
        """
        compute = torch.promote_types(images.dtype, torch.float32)
        mean = self.mean.to(images.device, compute)
        std = self.std.to(images.device, compute)
        images = self.in_model_channel_order(images)
        return ((images.to(compute) - mean) / std).to(model_dtype(self.model))

    def in_model_channel_order(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images with their channels in the order the model takes (reversed for a
        BGR model, see :attr:`reversed_channels`)."""
        return images.flip(-3) if self.reversed_channels else images

    def forward(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model on the normalized images; further arguments go to it as
        given (Captum's ``additional_forward_args``)."""
        return self.model(self.normalize(images), *args, **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        """The input size: the one given, else the model's own.

        Raises:
            ValueError: neither is known (a torchvision CNN takes any size and records
                none); only what needs a size without images asks for it.
        """
        size = self._mean_std_size[2]
        if size is None:
            raise _unknown_size(self.model)
        return size

    @property
    def config(self) -> InputConfig:
        """Normalization and input size (:func:`input_config`)."""
        mean, std, _ = self._mean_std_size
        return InputConfig(mean=mean, std=std, size=self.image_size)
