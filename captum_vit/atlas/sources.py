"""Where an atlas's model and images come from.

Models: a bundled zoo model, a timm name (``pretrained=True`` with a network, or a local
``weights`` file), an open_clip name with a local ``weights`` file, a Hugging Face model
directory (``save_pretrained``; needs the ``[hf]`` extra), or ``module:function`` returning
a model. Images: a folder of image files (recursive, any format Pillow reads,
prepared with the model's own preprocessing; an ``ImageFolder`` tree gives labels), the
zoo's synthetic scenes, or a tensor of images. Every image source has ``len()``, ``batch(indices)`` (a dict with
``"image"`` in [0, 1] and ``"label"``), a ``description`` and a ``fingerprint``.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from .. import zoo
from ..models import check_images, fixed_input_size, input_config, unwrap_vision

__all__ = [
    "ImageFiles",
    "ImageTensor",
    "LoadedModel",
    "ZooScenes",
    "create_timm",
    "load_model",
    "open_images",
]

#: A Pillow decoding failure, whatever the file's problem.
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


@dataclass
class LoadedModel:
    """A model in eval mode, how it was named, and a hash of its weights.
    ``random_weights``: a timm architecture with its random initialization (named without
    ``pretrained`` or ``weights``)."""

    model: nn.Module
    description: str
    fingerprint: str
    random_weights: bool = False


def load_model(
    name: str | None = None,
    *,
    zoo_name: str | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    image_size: tuple[int, int] | None = None,
) -> LoadedModel:
    """Load the atlas's model.

    Args:
        name: a timm model name, an open_clip model name (needs ``weights``), a Hugging
            Face model directory (holding the ``config.json`` and weights written by
            ``save_pretrained``; loaded offline with ``transformers``), or
            ``"module:function"`` (the function returns the model).
        zoo_name: ``"vit"`` or ``"cnn"``, a bundled zoo model (instead of ``name``).
        weights: a local checkpoint (``.safetensors`` or a ``torch.save`` state dict) for
            a timm, open_clip or zoo model.
        pretrained: download timm's pretrained weights (needs a network).
        image_size: ``(H, W)`` to build a timm or open_clip model for (a ViT's position
            embedding and patch grid follow it; its weights, pretrained or ``weights``,
            are resampled to it as timm / open_clip resample them). An architecture that
            takes any size (a CNN) is built as it is.

    Returns:
        The model in eval mode, with its description and weights fingerprint. A timm name
        without ``weights`` or ``pretrained`` is the untrained architecture, initialized
        under seed 0 (the same weights every time; your random state is left as it was):
        its description says "(random weights, seed 0)".

    Raises:
        ValueError: no model or two models named, an unknown name, weights that do not
            match the architecture, a directory without ``config.json``, pretrained
            weights that cannot be downloaded.
        FileNotFoundError: the weights file does not exist.
        ImportError: a Hugging Face directory without ``transformers`` installed.

    Examples::

        >>> load_model("vit_base_patch16_224", weights="vit_b16.safetensors")
        >>> load_model("ViT-B-32", weights="open_clip_vit_b32.bin")
        >>> load_model("checkpoints/my-hf-vit")             # a save_pretrained directory
    """
    if (name is None) == (zoo_name is None):
        raise ValueError(
            "name exactly one model: a timm / open_clip name, module:function, or --zoo"
        )
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    random_weights = False
    if zoo_name is not None:
        model, description = zoo.load_model(zoo_name), f"zoo {zoo_name}"
    elif ":" in name and not Path(name).exists():
        model, description = _from_function(name), name
    else:
        (model, random_weights) = _from_library(name, weights, pretrained, image_size)
        description = name
    if weights is not None and zoo_name is not None:
        _load_weights(model, weights, f"zoo {zoo_name}")
    if weights is not None:
        description += f" with weights {Path(weights).name}"
    if random_weights:
        description += " (random weights, seed 0)"
    model.eval()
    return LoadedModel(model, description, weights_fingerprint(model), random_weights)


def _from_function(spec: str) -> nn.Module:
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} of {spec!r}: {error}") from error
    if not callable(getattr(module, function, None)):
        raise ValueError(f"{module_name} has no function {function!r} (from {spec!r})")
    model = getattr(module, function)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_library(
    name: str,
    weights: str | Path | None,
    pretrained: bool,
    image_size: tuple[int, int] | None = None,
) -> tuple[nn.Module, bool]:
    """The model, and whether it is a timm architecture with its random initialization."""
    import open_clip
    import timm

    if Path(name).is_dir():
        if weights is not None or pretrained:
            raise ValueError(
                f"{name} is a model directory, which holds its own weights: drop "
                "--weights / --pretrained"
            )
        return _from_hf_directory(Path(name)), False
    if timm.is_model(name):
        model = create_timm_at(name, pretrained, image_size)
        if weights is not None:
            _load_weights(model, weights, name)
        return model, weights is None and not pretrained
    if name in open_clip.list_models():
        if weights is None:
            raise ValueError(
                f"open_clip model {name} needs --weights FILE (a local checkpoint; "
                "--pretrained is for timm names)"
            )
        sized = {"force_image_size": image_size} if image_size is not None else {}
        try:
            return open_clip.create_model(name, pretrained=str(weights), **sized), False
        except RuntimeError as error:  # load_state_dict(strict=True)
            raise ValueError(_mismatch(weights, name, error)) from error
        except Exception as error:  # an unreadable file, or one that holds no state dict
            detail = " ".join(str(error).split())[:300]
            raise ValueError(
                f"cannot load weights file {weights} into open_clip model {name}: "
                f"{type(error).__name__}: {detail}"
            ) from error
    raise ValueError(
        f"unknown model {name!r}: not a timm or open_clip name, and not "
        f"module:function.{_close_names(name)} Use --zoo vit for the bundled model"
    )


def _close_names(name: str) -> str:
    """`` Closest names: ...`` among timm's and open_clip's models (case ignored), or ``""``."""
    import open_clip
    import timm

    by_key = {known.lower(): known for known in timm.list_models() + open_clip.list_models()}
    close = difflib.get_close_matches(name.lower(), list(by_key), n=5, cutoff=0.6)
    return f" Closest names: {', '.join(by_key[key] for key in close)}." if close else ""


def create_timm(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` with the errors a user can act on.

    Without ``pretrained`` the random initialization is drawn under seed 0, so the same
    name gives the same untrained network every time (an atlas of it can be resumed, and
    every torchrun process holds the same weights); the caller's random state is kept.

    Raises:
        ValueError: ``name`` is not a timm model (the message lists close names), or the
            pretrained weights cannot be downloaded.
    """
    import timm

    if not timm.is_model(name):
        import open_clip

        if name in open_clip.list_models():
            raise ValueError(f"{name!r} is an open_clip model name, not a timm one")
        raise ValueError(f"unknown timm model {name!r}.{_close_names(name)}")
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except TypeError:  # an argument the architecture does not take, not a download error
        raise
    except Exception as error:  # no network, no cached file, a hub error: all say the same
        detail = " ".join(str(error).split())[:300]
        raise ValueError(
            f"cannot get timm's pretrained weights for {name} (--pretrained downloads them "
            f"and needs a network): {type(error).__name__}: {detail}. Without a network, leave "
            "out --pretrained (the atlas takes a local checkpoint with --weights FILE)"
        ) from error


#: Words that end the architecture name of a Hugging Face image classifier.
_HF_CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")


def _from_hf_directory(folder: Path) -> nn.Module:
    """A ``save_pretrained`` directory, loaded offline: ``AutoModelForImageClassification``
    when its config names an image-classification architecture, else ``AutoModel``."""
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is a directory without config.json: the atlas takes a Hugging Face "
            "model directory written by save_pretrained (config.json and weights), a timm "
            "or open_clip name with --weights FILE, or module:function"
        )
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"{folder} is a Hugging Face model directory: loading it needs transformers; "
            "pip install captum-vit[hf]"
        ) from error
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        architectures = getattr(config, "architectures", None) or []
        classifier = any(a.endswith(_HF_CLASSIFIER_SUFFIXES) for a in architectures)
        auto = (
            transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
        )
        model, info = auto.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())[:300]
        raise ValueError(f"cannot load the Hugging Face model in {folder}: {detail}") from error
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"the weights in {folder} do not match the architecture {type(model).__name__} "
            f"(its config): missing {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return model


def create_timm_at(
    name: str, pretrained: bool = False, image_size: tuple[int, int] | None = None
) -> nn.Module:
    """:func:`create_timm` built for ``image_size`` where the architecture takes an
    ``img_size`` (a ViT's position embedding and patch grid follow it; timm resamples
    pretrained weights to it); one that takes any size and no ``img_size`` (a CNN) is
    built as it is."""
    if image_size is None:
        return create_timm(name, pretrained)
    try:
        return create_timm(name, pretrained, img_size=image_size)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return create_timm(name, pretrained)


def _load_weights(model: nn.Module, weights: str | Path, name: str) -> None:
    path = Path(weights)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # timm's train.py keeps its argparse.Namespace of settings next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(isinstance(key, str) and key.startswith("module.") for key in state):
        # saved from a DistributedDataParallel model (open_clip's training checkpoints)
        state = {key[len("module.") :]: value for key, value in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        adapted = _timm_adapted(state, model)
        if adapted is None:
            raise ValueError(_mismatch(path, name, error)) from error
        try:
            model.load_state_dict(adapted, strict=True)
        except RuntimeError:
            raise ValueError(_mismatch(path, name, error)) from error


def _timm_adapted(state: dict, model: nn.Module) -> dict | None:
    """``state`` through the checkpoint filter of the model's timm module, which resamples
    what depends on the input size (a ViT's position embedding, Swin's relative-position
    tables) as timm does for its pretrained weights at another ``img_size``; ``None``
    for a model without one, or where it fails."""
    module = sys.modules.get(type(model).__module__)
    if module is None or not module.__name__.startswith("timm.models."):
        return None
    adapt = getattr(module, "checkpoint_filter_fn", None)
    if adapt is None:
        return None
    try:
        return adapt(dict(state), model)
    except Exception:  # a filter for another checkpoint format: the plain mismatch stands
        return None


def _mismatch(path: str | Path, name: str, error: Exception) -> str:
    detail = " ".join(str(error).split())[:300]
    return f"weights file {path} does not match the architecture {name}: {detail}"


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- images


#: The zoo scenes' own size (that of the zoo models).
_SCENE_SIZE = 64


class ZooScenes:
    """The zoo's synthetic scenes (labelled) as an atlas image source, ``image_size``
    pixels square (default 64, the zoo models' size); :meth:`of` wraps scenes of your own
    (``zoo.SyntheticScenes`` with any options)."""

    def __init__(self, count: int = 256, seed: int = 1, image_size: int = _SCENE_SIZE) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"the number of scenes must be a positive int, got {count!r}")
        self._hold(zoo.SyntheticScenes(count, seed=seed, image_size=image_size))

    @classmethod
    def of(cls, scenes: zoo.SyntheticScenes) -> ZooScenes:
        """These scenes as an image source."""
        if len(scenes) < 1:
            raise ValueError("the scenes are empty: pass zoo.SyntheticScenes(N) with N >= 1")
        source = cls.__new__(cls)
        source._hold(scenes)
        return source

    def _hold(self, scenes: zoo.SyntheticScenes) -> None:
        self.scenes = scenes
        self.class_names = list(scenes.class_names)
        count, seed, image_size = len(scenes), scenes.seed, scenes.image_size
        size = f", {image_size} px" if image_size != _SCENE_SIZE else ""
        self.description = f"{count} zoo scenes (seed {seed}{size})"
        self.fingerprint = f"zoo-scenes:{count}:{seed}" + (
            f":{image_size}" if image_size != _SCENE_SIZE else ""
        )
        plain = zoo.SyntheticScenes(count, seed=seed, image_size=image_size)
        if repr(scenes) != repr(plain):  # other options: background bias, filter, classes
            self.description = f"{count} zoo scenes, {repr(scenes)}"
            self.fingerprint += f":{repr(scenes)}"
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, indices: Sequence[int]) -> dict:
        item = self.scenes.batch(list(indices))
        return {"image": item["image"], "label": item["label"]}

    def name(self, index: int) -> str:
        return f"scene {index}: {self.class_names[int(self.scenes[index]['label'])]}"


class ImageTensor:
    """An ``(N, 3, H, W)`` tensor of RGB images in [0, 1] as an atlas image source
    (unlabelled: Table 1 needs an ``ImageFolder`` tree or zoo scenes). The images are
    used as they are, so they must have a size the model takes: ``size``, the only size
    of a fixed-size model, is checked when given.

    Raises:
        TypeError / ValueError: not a batch of RGB images in [0, 1] of that size (see
            :func:`~captum_vit.models.check_images`).
    """

    def __init__(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> None:
        check_images(images, size=size)
        if len(images) == 0:
            raise ValueError("the image tensor is empty")
        self.images = images.detach().float().cpu()
        self.class_names = None
        self.skipped: list[str] = []
        height, width = self.images.shape[-2:]
        self.description = f"{len(self.images)} images ({height}x{width} px, from a tensor)"
        digest = hashlib.sha256(str(tuple(self.images.shape)).encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        self.fingerprint = f"tensor:{digest.hexdigest()[:16]}"

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Sequence[int]) -> dict:
        positions = torch.as_tensor(list(indices), dtype=torch.long)
        return {"image": self.images[positions], "label": torch.full((len(positions),), -1)}

    def name(self, index: int) -> str:
        return f"image {index}"


class ImageFiles:
    """Every image file under a folder (recursive, sorted by path), prepared for a model.

    A file is prepared as the model's preprocessing does: RGB, the shorter side resized to
    ``size / crop_pct`` (bicubic), the centre ``size`` cropped, values in [0, 1].
    Unreadable files are skipped with a warning and listed in :attr:`skipped`. When every
    image lies in a first-level subfolder (an ``ImageFolder`` tree), the subfolders are the
    classes (sorted) and :attr:`class_names` lists them; the atlas's Table 1 matches them
    by name to the model's classes (name them as the model does, see
    :func:`~captum_vit.models.class_names`).

    Raises:
        ValueError: the folder does not exist or holds no readable image.
    """

    def __init__(self, root: str | Path, size: tuple[int, int], crop_pct: float = 1.0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a folder")
        self.size = (int(size[0]), int(size[1]))
        self.crop_pct = float(crop_pct)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not _hidden(p, self.root))
        self.files: list[Path] = []
        self.skipped: list[str] = []
        for path in files:
            if _readable(path):
                self.files.append(path)
            else:
                self.skipped.append(str(path.relative_to(self.root)))
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable file(s) in {root}: "
                + ", ".join(self.skipped[:5])
                + (" ..." if len(self.skipped) > 5 else ""),
                stacklevel=2,
            )
        if not self.files:
            raise ValueError(
                f"image folder {root} holds no readable image (skipped {len(self.skipped)} "
                "file(s)); point --images at a folder of image files"
            )
        folders = {p.relative_to(self.root).parts[0] for p in self.files}
        nested = all(len(p.relative_to(self.root).parts) >= 2 for p in self.files)
        self.class_names = sorted(folders) if nested else None
        self.description = f"{len(self.files)} images from {self.root.name}/"
        self.fingerprint = _files_fingerprint(self.root, self.files, self.size, self.crop_pct)

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Sequence[int]) -> dict:
        images = torch.stack([self._load(self.files[i]) for i in indices])
        labels = [self._label(self.files[i]) for i in indices]
        return {"image": images, "label": torch.tensor(labels)}

    def name(self, index: int) -> str:
        return str(self.files[index].relative_to(self.root))

    def _label(self, path: Path) -> int:
        if self.class_names is None:
            return -1
        return self.class_names.index(path.relative_to(self.root).parts[0])

    def _load(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            image = image.convert("RGB")
            height, width = self.size
            scale = max(height, width) / self.crop_pct / min(image.size)
            resized = (
                max(width, round(image.width * scale)),
                max(height, round(image.height * scale)),
            )
            image = image.resize(resized, Image.Resampling.BICUBIC)
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
            array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except _UNREADABLE:
        return False


def _files_fingerprint(root: Path, files: list[Path], size: tuple, crop_pct: float) -> str:
    digest = hashlib.sha256(f"{size}:{crop_pct}".encode())
    for path in files:
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def crop_fraction(model: nn.Module) -> float:
    """The model's declared centre-crop fraction (timm's ``crop_pct``), else 1."""
    cfg = getattr(unwrap_vision(model), "pretrained_cfg", None) or {}
    value = cfg.get("crop_pct") if isinstance(cfg, dict) else None
    return float(value) if value else 1.0


def open_images(
    model: nn.Module, images: Any = None, *, scenes: int = 256
) -> ImageFiles | ZooScenes | ImageTensor:
    """The atlas's images as an image source.

    Args:
        model: the model (its input size and preprocessing prepare image files).
        images: ``None`` (``scenes`` zoo scenes, drawn at the model's input size when it
            is square: the zoo models' 64 px), a folder of image files (recursive;
            prepared as the model's preprocessing does), ``zoo.SyntheticScenes``, an
            ``(N, 3, H, W)`` tensor in [0, 1] at a size the model takes, or an image
            source (returned as it is).

    Raises:
        TypeError: anything else, such as a ``DataLoader`` (the atlas reads images by
            index, to show each unit's top images and to resume).
        ValueError: an empty or missing folder, bad images.
    """
    if images is None:
        size = input_config(model).size
        side = size[0] if size[0] == size[1] else _SCENE_SIZE
        return ZooScenes(scenes, image_size=max(side, 16))
    if isinstance(images, (str, Path)):
        return ImageFiles(images, input_config(model).size, crop_fraction(model))
    if isinstance(images, zoo.SyntheticScenes):
        return ZooScenes.of(images)
    if isinstance(images, torch.Tensor):
        return ImageTensor(images, fixed_input_size(model))
    if all(hasattr(images, name) for name in _SOURCE_ATTRIBUTES):
        return images
    raise TypeError(
        f"the atlas's images cannot be of type {type(images).__name__}: it reads images by "
        "index (to show each unit's top images, and to resume). Pass a folder of image files, "
        "zoo.SyntheticScenes, an (N, 3, H, W) tensor in [0, 1] (for a DataLoader: "
        "torch.cat of its image batches) or None for the zoo scenes"
    )


#: What an image source offers (ImageFiles, ZooScenes, ImageTensor, or one of your own).
_SOURCE_ATTRIBUTES = ("__len__", "batch", "name", "description", "fingerprint", "skipped")
