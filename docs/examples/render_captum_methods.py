"""Rendered example: four ways to ask the zoo ViT where it looks, side by side.

Model: the bundled zoo ViT (``captum_vit.zoo.load_model("vit")``: 64 px, patch 8, 6
blocks, trained on the package's synthetic scenes). Images: three held-out synthetic
scenes (the object's position is known) and three ``skimage.data`` photographs (astronaut,
chelsea, coffee) resized to 64 px, which the model never saw and can only describe with
its eight shape classes.

Columns, each a positive heat map over the image:

* **PatchActivationMap** of the unit of ``blocks.3.mlp.fc1`` that fires most on that image
  (mean over patches);
* **Grad-CAM**: Captum's own ``LayerGradCam`` on ``blocks.4`` through ``cv.patch_grid``,
  target = the predicted class, ReLU on (the last block's patch tokens get no gradient
  from a cls-pooled head, so the block before it is used);
* **Integrated Gradients**: Captum's ``LayerIntegratedGradients`` on ``blocks.4``
  through ``cv.patch_grid`` (32 steps, baseline: the black image; prefix kept),
  attributions summed over channels;
* **attention rollout**: ``cv.AttentionRollout`` (mean over heads, cls row).

Each row's first cell names the image (a scene's true class in brackets) and the
model's prediction after the arrow. Writes ``docs/images/captum_methods.png``.

    .venv/bin/python docs/examples/render_captum_methods.py
"""

from __future__ import annotations

from pathlib import Path

import skimage.data
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerIntegratedGradients

import captum_vit as cv
from captum_vit import render, zoo

OUT = Path(__file__).resolve().parents[1] / "images"
PHOTOS = ("astronaut", "chelsea", "coffee")
CELL = 160
LAYER = "blocks.4"


def photographs(size: int) -> torch.Tensor:
    """Centre squares of the photographs, resized to ``size``, RGB in [0, 1]."""
    images = []
    for name in PHOTOS:
        array = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy())
        image = array.permute(2, 0, 1).float() / 255
        side = min(image.shape[-2:])
        top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
        square = image[:, top : top + side, left : left + side]
        images.append(F.interpolate(square[None], size=(size, size), mode="area")[0])
    return torch.stack(images)


def main() -> None:
    torch.set_num_threads(2)
    model = zoo.load_model("vit")
    wrapped = cv.ImageModel(model)
    batch = zoo.SyntheticScenes(3, seed=12345).batch(range(3))
    scenes = batch["image"]
    images = torch.cat([scenes, photographs(64)])
    with torch.no_grad():
        predicted = wrapped(images).argmax(dim=1)

    # PatchActivationMap: the most active unit of blocks.3.mlp.fc1 on each image.
    fc1 = cv.capture_layers(model, "blocks.3.mlp.fc1", wrapped.normalize(images))
    units = fc1[:, 1:].mean(dim=1).argmax(dim=1)
    pam = cv.PatchActivationMap(model, "blocks.3.mlp.fc1").attribute(images, target=units)

    # Captum's own layer methods through the patch grid (inputs as the wrapped model takes
    # them: [0, 1] images, normalized inside).
    baseline = torch.zeros_like(images)
    with cv.patch_grid(wrapped, LAYER, images) as grid:
        cam = LayerGradCam(wrapped, grid).attribute(
            images, target=predicted, relu_attributions=True
        )[:, 0]
        ig = LayerIntegratedGradients(wrapped, grid).attribute(
            images, baselines=baseline, target=predicted, n_steps=32
        )
    ig = ig.sum(dim=1)
    rollout = cv.AttentionRollout(model).attribute(images)

    cells, labels = [], []
    names = list(model.class_names)
    sources = [f"scene ({names[int(label)]})" for label in batch["label"]] + list(PHOTOS)
    for index, image in enumerate(images):
        big = F.interpolate(image[None], size=(CELL, CELL), mode="nearest")[0]
        cells.append(big)
        labels.append(f"{sources[index]} -> {names[predicted[index]]}")
        for title, maps in (
            (f"PAM unit {int(units[index])}", pam),
            ("Grad-CAM", cam),
            ("Integrated Gradients", ig),
            ("rollout", rollout),
        ):
            cells.append(render.overlay(big, maps[index], alpha=0.6))
            labels.append(title)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "captum_methods.png"
    render.image_grid(cells, ncols=5, labels=labels).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
