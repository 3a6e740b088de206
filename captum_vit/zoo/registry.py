"""The zoo's model definitions, and saving / loading their weights offline.

Weights are fp16 safetensors files under ``captum_vit/zoo/weights/``; their metadata holds
the class names, normalization, input size, architecture and how they were trained, so a
loaded model carries everything :mod:`captum_vit` needs (``model.pretrained_cfg`` and
``model.class_names``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .data import CLASSES

__all__ = ["MODEL_NAMES", "WEIGHTS_DIR", "build_model", "load_model", "save_model"]

WEIGHTS_DIR = Path(__file__).parent / "weights"

#: Input normalization of every zoo model (applied to [0, 1] images).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
IMAGE_SIZE = 64

#: Architecture of each zoo model: timm class and keyword arguments.
ARCHS: dict[str, dict] = {
    "vit": {
        "img_size": IMAGE_SIZE,
        "patch_size": 8,
        "embed_dim": 128,
        "depth": 6,
        "num_heads": 4,
        "mlp_ratio": 2.0,
        "global_pool": "token",
        "class_token": True,
    },
    "cnn": {
        "layers": (1, 1, 1, 1),
        "channels": (32, 64, 128, 256),
        "stem_width": 32,
    },
}

MODEL_NAMES: tuple[str, ...] = tuple(ARCHS)


def _check_name(name: str) -> None:
    if name not in ARCHS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, num_classes: int = len(CLASSES)) -> nn.Module:
    """A freshly initialized zoo model (random weights): ``"vit"`` is a timm
    ``VisionTransformer`` (64 px, patch 8, 6 blocks, width 128, 4 heads, MLP ratio 2, cls-token pooling), ``"cnn"``
    a timm ``ResNet`` with one basic block per stage (widths 32-256)."""
    _check_name(name)
    if name == "vit":
        model = VisionTransformer(num_classes=num_classes, **ARCHS[name])
    else:
        model = ResNet(BasicBlock, num_classes=num_classes, **ARCHS[name])
    _attach(model, name, list(CLASSES[:num_classes]))
    return model


def _attach(model: nn.Module, name: str, class_names: list[str]) -> None:
    """Record the normalization and input size where :func:`captum_vit.models.input_config`
    reads them, and the class names."""
    model.pretrained_cfg = {
        **(getattr(model, "pretrained_cfg", None) or {}),
        "architecture": f"captum_vit_zoo_{name}",
        "mean": MEAN,
        "std": STD,
        "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
        "num_classes": len(class_names),
    }
    model.class_names = list(class_names)


def save_model(model: nn.Module, name: str, path: str | Path, info: dict | None = None) -> Path:
    """Save a zoo model's weights as fp16 safetensors with its metadata (class names,
    normalization, input size, architecture, and ``info`` such as how it was trained)."""
    _check_name(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {
        "name": name,
        "class_names": list(model.class_names),
        "mean": list(MEAN),
        "std": list(STD),
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCHS[name].items()},
        "info": info or {},
    }
    save_file(tensors, str(path), metadata={"captum_vit": json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata stored by :func:`save_model` in a weights file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["captum_vit"])


def load_model(name: str, path: str | Path | None = None) -> nn.Module:
    """Load a bundled zoo model, offline.

    Args:
        name: ``"vit"`` or ``"cnn"``.
        path: a weights file written by ``python -m captum_vit.zoo.train`` (default: the
            bundled ``captum_vit/zoo/weights/{name}.safetensors``).

    Returns:
        The model in eval mode, float32, with ``model.class_names`` (list of str),
        ``model.pretrained_cfg`` holding ``mean`` / ``std`` / ``input_size`` (read by
        :func:`captum_vit.models.input_config`), and ``model.zoo_info`` (training record).
        It takes normalized images; wrap it in :class:`captum_vit.models.ImageModel` to feed
        [0, 1] images.

    Examples::

        >>> from captum_vit.zoo import load_model
        >>> vit = load_model("vit")
        >>> vit.class_names[:3]
        ['circle', 'square', 'triangle']
    """
    _check_name(name)
    path = Path(path) if path is not None else WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights for zoo model {name!r} at {path}; train them with "
            f"`python -m captum_vit.zoo.train {name}`"
        )
    meta = read_metadata(path)
    if meta["name"] != name:
        raise ValueError(f"{path} holds zoo model {meta['name']!r}, not {name!r}")
    model = build_model(name, num_classes=len(meta["class_names"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    _attach(model, name, meta["class_names"])
    model.zoo_info = meta["info"]
    return model.eval()
