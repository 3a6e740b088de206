"""Rendered example: top-activating photographs and their patch activation maps.

Data: crops of the photographs that ship with scikit-image (astronaut, coffee, chelsea,
rocket, ...), 224 px. Model: ``vit_tiny_patch16_224`` with random weights (no network
here), in which one unit is planted so that its right answer is known:

* ``patch_embed.proj`` channel 0 computes "mean blue minus mean of red and green" of its
  16x16 patch; its top images must be the bluest crops and its map must light up blue
  regions (sky, blue clothing, the blue part of the colour wheel).

Next to it, a unit of a random-weight transformer block (``blocks.2.mlp.fc1``) shows what
the maps look like for an untrained unit: they follow low-level colour / texture only.

Writes ``docs/images/top_examples_blue_unit.png``,
``docs/images/top_examples_random_unit.png`` and ``docs/images/activation_maps.png``.

    .venv/bin/python docs/examples/render_top_examples.py
"""

from __future__ import annotations

from pathlib import Path

import skimage.data
import timm
import torch
import torch.nn.functional as F

import captum_vit as cv
from captum_vit import render

OUT = Path(__file__).resolve().parents[1] / "images"
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "retina",
)


def photo_crops(size: int = 224) -> torch.Tensor:
    """Every photograph's centre square and its four corner squares (of 2/3 the short
    side), resized to ``size``: 40 images in [0, 1]."""
    crops = []
    for name in PHOTOS:
        image = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy())
        image = image.permute(2, 0, 1).float() / 255
        height, width = image.shape[1:]
        side = min(height, width)
        small = 2 * side // 3
        boxes = [((height - side) // 2, (width - side) // 2, side)]
        boxes += [(top, left, small) for top in (0, height - small) for left in (0, width - small)]
        for top, left, extent in boxes:
            square = image[:, top : top + extent, left : left + extent]
            crops.append(F.interpolate(square[None], size=(size, size), mode="area")[0])
    return torch.stack(crops)


def planted_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        weight = model.patch_embed.proj.weight  # (192, 3, 16, 16)
        weight[0] = 0
        weight[0, 2] = 1 / 256
        weight[0, :2] = -0.5 / 256
        model.patch_embed.proj.bias[0] = 0
    return model


def visualize(model: torch.nn.Module, plain: dict) -> torch.Tensor | None:
    """The planted unit's feature visualization (its optimum is a pure blue image), when
    the FeatureVisualization module is available."""
    try:
        feature_viz = cv.FeatureVisualization(model, "patch_embed.proj", **plain)
    except AttributeError as error:
        print("no visualization cell:", error)
        return None
    return feature_viz.attribute(target=0, steps=60)[0]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    images = photo_crops()
    model = planted_model()
    plain = dict(mean=(0.0,) * 3, std=(1.0,) * 3)  # the planted unit reads raw [0, 1] pixels

    blue = cv.TopActivatingExamples(model, "patch_embed.proj", k=6, **plain)
    result = blue.attribute(images.split(8), target=[0], show_progress=True)
    print("blue unit: top images", result.indices[0].tolist(), "scores", result.scores[0])
    render.example_grid(
        result, 0, images, visualization=visualize(model, plain), originals=True, cell_size=160
    ).save(OUT / "top_examples_blue_unit.png")

    layer = "blocks.2.mlp.fc1"
    random_unit = cv.TopActivatingExamples(model, layer, k=6).attribute(images.split(8))
    unit = int(random_unit.scores[:, 0].argmax())  # the unit with the strongest top image
    print(f"{layer}: unit {unit}, top images {random_unit.indices[unit].tolist()}")
    render.example_grid(random_unit, unit, images, originals=True, cell_size=160).save(
        OUT / "top_examples_random_unit.png"
    )

    pam = cv.PatchActivationMap(model, "patch_embed.proj", **plain)
    chosen = images[[0, 15, 30]]  # astronaut, rocket, colour wheel (centre crops)
    maps = pam.attribute(chosen, target=0)
    cells = [render.overlay(image, m) for image, m in zip(chosen, maps, strict=True)]
    render.image_grid([*chosen, *cells], ncols=3).save(OUT / "activation_maps.png")
    print("wrote", *sorted(p.name for p in OUT.glob("*.png")))


if __name__ == "__main__":
    main()
