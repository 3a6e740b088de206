"""Per-model figures of an atlas: how local each layer is (SpatialLocalityProbe) and the
paper's Table-1 pooling experiments when the model pools with its cls token and names the
classes of the images (their folders are matched to the model's class names)."""

from __future__ import annotations

import torch

from ..locality import SpatialLocalityProbe, pooling_experiments
from ..models import _is_open_clip, class_aliases, match_class_names, unwrap_vision
from .shard import fixed_batches
from .sources import ZooScenes

__all__ = ["layer_locality", "pooling_table"]


def layer_locality(
    model: torch.nn.Module, layers: list[str], images, *, count: int = 2, positions: int = 16
) -> dict[str, float]:
    """Receptive-field locality of each layer (share of a token's input gradient inside
    its own patch), over the first ``count`` images and ``positions`` probed patches."""
    probe = SpatialLocalityProbe(model, layers, batch_size=32)
    first = images.batch(range(min(count, len(images))))["image"]
    report = probe.attribute(first, positions, show_progress=False)
    return {
        name: float(value)
        for name, value in zip(report.layers, report.locality.tolist(), strict=True)
    }


def pooling_table(
    model: torch.nn.Module, images, *, count: int = 256, batch_size: int = 64
) -> dict:
    """The paper's Table 1 on the first ``count`` labelled images: natural accuracy, cls
    isolated for ``L`` blocks, patch average / best patch, and the tear sweep.

    The images' classes (``ImageFolder`` sub-folders, zoo scene classes) are matched by
    name to the model's classes (:func:`~captum_vit.models.match_class_names`), so a
    folder tree with any subset of the classes, in any order, scores against the right
    logits. Returns ``{"skipped": reason}`` when the images have no labels, the model does
    not name its classes, a class of the images matches none of the model's, or the model
    does not pool with its cls token."""
    names = getattr(images, "class_names", None)
    if not names:
        return {"skipped": "the images have no labels (use an ImageFolder tree or zoo scenes)"}
    indices = match_class_names(model, names)
    if indices is None:
        return {"skipped": _unnamed_reason(model, isinstance(images, ZooScenes))}
    unmatched = [name for name, index in zip(names, indices, strict=True) if index is None]
    if unmatched:
        return {"skipped": _unmatched_reason(model, unmatched, isinstance(images, ZooScenes))}
    to_model = torch.tensor(indices)
    batches = fixed_batches(min(count, len(images)), batch_size)

    def loader():
        for batch_indices in batches:
            batch = images.batch(batch_indices)
            yield batch["image"], to_model[batch["label"]]

    try:
        report = pooling_experiments(model, loader(), show_progress=False)
    except ValueError as error:
        return {"skipped": str(error)}
    return {
        "natural": report.natural.top1,
        "isolated_cls": {str(k): v.top1 for k, v in sorted(report.isolated_cls.items())},
        "tear": {str(k): v.top1 for k, v in sorted(report.tear.items())},
        "patch_average": report.patch_average.top1,
        "patch_max": report.patch_max.top1,
        "patch_max_position": list(report.patch_max_position),
        "depth": report.depth,
        "num_images": report.num_images,
    }


#: How many unmatched folder names a skip reason lists.
_LISTED = 5


def _unmatched_reason(model: torch.nn.Module, unmatched: list[str], scenes: bool) -> str:
    listed = ", ".join(repr(name) for name in unmatched[:_LISTED])
    more = f" and {len(unmatched) - _LISTED} more" if len(unmatched) > _LISTED else ""
    naming = _how_to_name_classes(model)
    if scenes:
        return (
            f"the images are zoo scenes, whose classes ({listed}{more}) are not the model's. "
            "Table 1 needs labelled images of the model's own classes: pass --images DIR "
            "(images=DIR), an ImageFolder tree whose class folders are named after the "
            f"model's classes (case does not matter, _ reads as a space): {naming}."
        )
    return (
        f"{len(unmatched)} image class folder(s) match no single class of the model: "
        f"{listed}{more}. Name each class folder after one of the model's classes (case "
        f"does not matter, _ reads as a space): {naming}."
    )


def _unnamed_reason(model: torch.nn.Module, scenes: bool) -> str:
    if _is_open_clip(unwrap_vision(model)):
        return (
            "the model is an image-text (CLIP) model: its image tower outputs an embedding, "
            "not class scores, so there are no predictions to measure; Table 1 needs a "
            "classifier"
        )
    images = "the zoo scenes' classes" if scenes else "the image folders"
    return (
        "the model does not name its classes (no class_names list on the model, Hugging "
        f"Face id2label or ImageNet-1k head), so {images} cannot be matched to its outputs. "
        "Name them with a list, one name per output: model.class_names = ['cat', 'dog', ...]"
    )


def _how_to_name_classes(model: torch.nn.Module) -> str:
    """The model's first class names and the other ways a folder may name a class."""
    aliases = class_aliases(model)
    names = [alias[0] for alias in aliases]
    shown = ", ".join(repr(name) for name in names[:_LISTED])
    shown += f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    ways = ""
    if any("," in name for name in names):
        ways += ", or the part of a name before its first comma"
    if len(aliases[0]) > 1:
        ways += f", or a class's synset such as {aliases[0][1]!r}"
    return shown + ways
