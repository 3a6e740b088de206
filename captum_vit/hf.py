"""Hugging Face ``transformers`` vision models as a model source (optional extra ``[hf]``).

Supported: ``ViTModel`` / ``ViTForImageClassification``, DeiT (also
``DeiTForImageClassificationWithTeacher``: cls + distillation token), DINOv2 (also with
registers), ``CLIPVisionModel`` / ``CLIPModel`` (its image tower) and Swin; BEiT,
SigLIP's vision model and ViT-MAE (with ``config.mask_ratio = 0.0``) as well; models
whose config records no input size (ResNet, RegNet, PoolFormer, SegFormer) take images
of any size, and ``image_size=`` where a method needs one without images. Every
public class of captum_vit takes these models directly; internally they are seen through
:class:`HFVisionModel`, which

* returns a tensor instead of a ``ModelOutput``: ``logits`` for classifiers, the projected
  image embedding for ``CLIPModel``, ``pooler_output`` (else the first token of
  ``last_hidden_state``, or a feature map's mean) for backbones;
* runs only the image tower of ``CLIPModel`` (``get_image_features``);
* takes images of other sizes than the config's where the model can interpolate its
  position embeddings (``interpolate_pos_encoding``, as DINOv2 does by itself);
* keeps ViT-MAE's patch tokens in image order (it shuffles them with random noise in
  every forward, also with ``mask_ratio=0``: the wrapper passes increasing noise);
* declares the input size from the model's config (where it has one) and the
  normalization the checkpoint was trained with: ``config.image_mean`` / ``image_std``
  when the config has them, else its saved ``preprocessor_config.json`` (next to the
  weights or in the Hugging Face cache; never downloaded), else timm's ``pretrained_cfg``
  for a ``TimmWrapper`` model, else the family's usual values (ViT, BEiT, SigLIP,
  MobileNet 0.5 / 0.5, CLIP OpenAI mean / std, the others ImageNet mean / std), in the
  channel order it was trained with (BGR where the processor flips the channels, as
  MobileViT's does). Pass ``mean=`` / ``std=`` to override, as for any model.

Layer paths are those of the Hugging Face model (``"vit.layers.3"``,
``"vision_model.encoder.layers.3"``, ``"encoder.layers.0.blocks.1"``).

To give a Hugging Face model to Captum directly (it returns ``ModelOutput`` objects,
which Captum cannot index), use :func:`vision_tower`::

    >>> forward = cv.hf.vision_tower(model)           # pixel_values -> logits tensor
    >>> with cv.patch_grid(model, "vit.layers.3", pixel_values) as grid:
    ...     cam = LayerGradCam(forward, grid).attribute(pixel_values, target=3)
"""

from __future__ import annotations

import inspect
import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import whole_patches

__all__ = ["HFVisionModel", "is_hf_model", "model_output_tensor", "vision_tower"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
_OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

#: Normalization of each model family's image processor (``model_type`` of the config).
_FAMILY_NORMALIZATION = {
    "vit": _HALF,
    "beit": _HALF,
    "data2vec-vision": _HALF,
    "siglip": _HALF,
    "siglip_vision_model": _HALF,
    "clip": _OPENAI,
    "clip_vision_model": _OPENAI,
    "metaclip_2": _OPENAI,
    "metaclip_2_vision_model": _OPENAI,
    "mobilenet_v1": _HALF,  # TF-slim MobileNets take [-1, 1]
    "mobilenet_v2": _HALF,
    "mobilevit": _NONE,
    "mobilevitv2": _NONE,
}

_TOWERS: weakref.WeakKeyDictionary[nn.Module, HFVisionModel] = weakref.WeakKeyDictionary()


def is_hf_model(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``transformers`` model."""
    return type(module).__module__.startswith("transformers.")


def model_output_tensor(output: Any) -> torch.Tensor:
    """The tensor a ``ModelOutput`` stands for, one vector per image: ``logits``, else
    ``image_embeds``, else ``pooler_output``, else ``last_hidden_state``.

    A ``(B, N, C)`` token output stands for its first token (the cls token of ViT-style
    backbones without a pooler); a ``(B, C, H, W)`` map (PoolFormer, SegFormer, PVT-v2,
    SwiftFormer backbones) for its mean over the grid, the global average pooling their
    classification heads apply; a ``(B, C)`` tensor for itself (PP-LCNet's classifier
    returns its logits as ``last_hidden_state``).
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        value = output.get(key) if hasattr(output, "get") else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return _one_vector_per_image(value, key)
    raise TypeError(
        f"cannot find a tensor output in {type(output).__name__} (no logits, image_embeds, "
        "pooler_output or last_hidden_state)"
    )


def _one_vector_per_image(value: torch.Tensor, key: str) -> torch.Tensor:
    if value.ndim == 2:
        return value
    if value.ndim == 3:
        return value[:, 0]
    if value.ndim == 4:
        return value.mean(dim=(-2, -1))
    raise TypeError(
        f"the model's {key} has shape {tuple(value.shape)}: expected (B, C), (B, N, C) "
        "tokens or a (B, C, H, W) map"
    )


class HFVisionModel(nn.Module):
    """A Hugging Face vision model seen as ``pixel_values -> tensor``.

    The wrapped model is a submodule (``.model``; for ``CLIPModel`` its ``vision_model``
    and ``visual_projection``, under the same paths), shared, not copied: hooks on its
    modules fire as usual and it is never modified.

    Args:
        model: a supported ``transformers`` vision model (see the module docstring).

    Attributes:
        image_size: ``(H, W)`` from the model's (vision) config, or ``None`` where it
            records none (ResNet, RegNet, PoolFormer, SegFormer take any size).
        fixed_size: the only input size the model takes, or ``None``: ViT / DeiT / CLIP
            interpolate their position embeddings to other sizes only from a square grid.
        declared_input_config: ``mean`` / ``std`` / ``size`` for
            :func:`captum_vit.models.input_config`, and ``channel_order: "BGR"`` for a
            checkpoint whose image processor flips the channels.
        image_prefix: dotted path prefix of the image tower inside this wrapper
            (``"vision_model."`` for ``CLIPModel``, ``"model."`` otherwise).

    Examples::

        >>> tower = HFVisionModel(transformers.ViTForImageClassification(config))
        >>> logits = tower(pixel_values)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not is_hf_model(model):
            raise TypeError(f"expected a transformers model, got {type(model).__name__}")
        if "pixel_values" not in inspect.signature(model.forward).parameters:
            raise TypeError(
                f"{type(model).__name__} is not an image model (its forward takes no "
                "pixel_values): captum_vit's methods take vision models such as ViT, DeiT, "
                "DINOv2, Swin or CLIP"
            )
        if "spatial_shapes" in inspect.signature(model.forward).parameters:
            raise TypeError(
                f"{type(model).__name__} takes patchified pixels with an attention mask and "
                "per-image patch grids (NaFlex: pixel_attention_mask, spatial_shapes), not "
                "(B, 3, H, W) images, which captum_vit's methods feed. For SigLIP 2 use a "
                "fixed-resolution model: open_clip's ViT-B-16-SigLIP2 or timm's "
                "vit_base_patch16_siglip_224.v2_webli"
            )
        self._clip_pair = hasattr(model, "get_image_features") and hasattr(model, "text_model")
        #: the class messages name (a CLIP pair's tower has no "model." to look inside)
        self.wrapped_class_name = type(model).__name__
        if self._clip_pair:
            # The image tower only: the same modules, under the same paths as in CLIPModel.
            self.vision_model = model.vision_model
            self.visual_projection = model.visual_projection
        else:
            self.model = model
        # CLIP-style classifiers (CLIPForImageClassification) keep the image tower's
        # settings under vision_config too, without being a CLIP pair.
        config = getattr(model.config, "vision_config", None) or model.config
        # CNN-style configs (ResNet, RegNet, PoolFormer, SegFormer) record no size: they
        # take any, and what needs one without images asks the user for it.
        size = getattr(config, "image_size", None)
        self.image_size = None if size is None else _pair(size)
        processor = _checkpoint_processor(model.config)
        mean, std = _normalization(config, model, processor)
        self.declared_input_config = {"mean": mean, "std": std}
        if processor is not None and processor.get("do_flip_channel_order"):
            self.declared_input_config["channel_order"] = "BGR"
        if self.image_size is not None:
            self.declared_input_config["size"] = self.image_size
        self.image_prefix = "vision_model." if self._clip_pair else "model."
        # The user's paths: CLIPModel's are this wrapper's; a wrapped model's lack "model.".
        self.wrapped_prefix = "" if self._clip_pair else "model."
        called = self.vision_model if self._clip_pair else model
        parameters = inspect.signature(called.forward).parameters
        self._shuffles = "noise" in parameters
        self._interpolates = "interpolate_pos_encoding" in parameters
        self._patch_size = _pair(getattr(config, "patch_size", 1))
        # Swin pads the image to whole patches; the others' convolution drops the rest.
        self._pads = "swin" in getattr(config, "model_type", "")
        # transformers interpolates position embeddings from a square grid only: a model
        # configured for a non-square one takes that size and no other (Swin without
        # absolute position embeddings takes any size).
        self.fixed_size = None
        if self.image_size is not None:
            (rows, cols), _ = self.patch_tiling(self.image_size)
            interpolated = self._interpolates and getattr(config, "use_absolute_embeddings", True)
            self.fixed_size = self.image_size if interpolated and rows != cols else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self._interpolates and tuple(pixel_values.shape[-2:]) != self.image_size:
            # ViT / DeiT / CLIP refuse another size unless asked to interpolate their
            # position embeddings, as DINOv2 always does and timm's dynamic_img_size does.
            kwargs["interpolate_pos_encoding"] = True
        if self._clip_pair:  # as CLIPModel.get_image_features
            pooled = self.vision_model(pixel_values=pixel_values, **kwargs).pooler_output
            return self.visual_projection(pooled)
        if self._shuffles:
            kwargs["noise"] = self._in_order(pixel_values)
        return model_output_tensor(self.model(pixel_values=pixel_values, **kwargs))

    def patch_tiling(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """See :func:`captum_vit.models.patch_tiling`."""
        return whole_patches(tuple(image_size), self._patch_size, pads=self._pads)

    def _in_order(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT-MAE orders the patch tokens by ``argsort(noise)``, random when no noise is
        given, even with ``mask_ratio=0``: increasing noise keeps them in image order (and
        keeps the first ones if it masks)."""
        (rows, cols), _ = self.patch_tiling(tuple(pixel_values.shape[-2:]))
        order = torch.arange(rows * cols, device=pixel_values.device, dtype=torch.float32)
        return order.expand(pixel_values.shape[0], -1)


def vision_tower(model: nn.Module) -> HFVisionModel:
    """The :class:`HFVisionModel` of a Hugging Face model (one per model, reused)."""
    if isinstance(model, HFVisionModel):
        return model
    tower = _TOWERS.get(model)
    if tower is None:
        tower = HFVisionModel(model)
        _TOWERS[model] = tower
    return tower


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    return (value[0], value[-1])


def _normalization(
    config: Any, model: nn.Module, processor: dict | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean / std for [0, 1] images: the config's own ``image_mean`` / ``image_std``, else
    the checkpoint's image ``processor`` settings, else, for a timm model in
    ``TimmWrapper``, timm's ``pretrained_cfg``, else the family's usual one."""
    mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    if mean is not None and std is not None:
        return _three(mean), _three(std)
    if processor is not None:
        return _processor_normalization(processor)
    for timm_cfg in _timm_configs(model):
        if timm_cfg.get("mean") is not None and timm_cfg.get("std") is not None:
            return _three(timm_cfg["mean"]), _three(timm_cfg["std"])
    return _FAMILY_NORMALIZATION.get(getattr(config, "model_type", ""), _IMAGENET)


def _timm_configs(model: nn.Module) -> list[dict]:
    """A ``TimmWrapper`` model's timm settings: the ``pretrained_cfg`` its config.json
    carries (timm's Hugging Face hub checkpoints), then the timm model's own."""
    found = [getattr(model.config, "pretrained_cfg", None)]
    found.append(getattr(getattr(model, "timm_model", None), "pretrained_cfg", None))
    return [cfg for cfg in found if isinstance(cfg, dict)]


def _checkpoint_processor(config: Any) -> dict | None:
    """The ``preprocessor_config.json`` saved with the checkpoint: in its folder, or in the
    Hugging Face cache for a hub id (``config._name_or_path``). Never downloads."""
    source = str(getattr(config, "_name_or_path", "") or "")
    if not source:
        return None
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(
                source,
                "preprocessor_config.json",
                local_files_only=True,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:  # not a hub id, no cache: the family's defaults apply
            return None
        if not found:
            return None
        path = Path(found)
    try:
        processor = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(processor, dict):
        return None
    return {**_processor_class_defaults(processor), **processor}


#: Steps a processor class may leave out of its saved config: whether it normalizes at
#: all (MobileViT's does not: its class has ``do_normalize = None``) and flips channels.
_PROCESSOR_STEPS = ("do_normalize", "do_flip_channel_order")


def _processor_class_defaults(processor: dict) -> dict:
    """The processor class's own choice of the :data:`_PROCESSOR_STEPS` a saved config
    leaves out: MobileViT's saves an ``image_mean`` but no ``do_normalize``, and does not
    normalize. Old configs name a ``...FeatureExtractor``."""
    name = processor.get("image_processor_type") or processor.get("feature_extractor_type")
    if not isinstance(name, str):
        return {}
    try:
        from transformers.models.auto.image_processing_auto import (
            get_image_processor_class_from_name,
        )

        kind = get_image_processor_class_from_name(
            name.replace("FeatureExtractor", "ImageProcessor")
        )
    except Exception:  # another transformers version: the saved settings alone
        return {}
    if kind is None:
        return {}
    return {key: bool(getattr(kind, key)) for key in _PROCESSOR_STEPS if hasattr(kind, key)}


def _processor_normalization(processor: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What an image processor does to 8-bit pixels, as mean / std on [0, 1] images: it
    rescales them by ``rescale_factor`` (less 1 with ``rescale_offset``, EfficientNet's
    [-1, 1]), then normalizes them with ``image_mean`` / ``image_std``."""
    scale = 255.0
    offset = 0.0
    if processor.get("do_rescale", True):
        scale *= float(processor.get("rescale_factor") or 1 / 255)
        offset = 1.0 if processor.get("rescale_offset") else 0.0
    mean, std = (0.0, 1.0)
    if processor.get("do_normalize", True) and processor.get("image_mean") is not None:
        mean, std = processor["image_mean"], processor.get("image_std") or 1.0
    mean, std = _three(mean), _three(std)
    return (
        tuple((m + offset) / scale for m in mean),
        tuple(s / scale for s in std),
    )


def _three(value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)
