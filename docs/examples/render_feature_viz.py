"""Rendered example: feature visualizations of a random-weight ViT-Ti/16 and ResNet-18.

For each of an early, a middle and a late block of ``vit_tiny_patch16_224`` (random
weights, no network here; 112 px) the post-GELU hidden units (``blocks.L.mlp.act``, the
paper's objective: mean over patch tokens, cls excluded) of a few units are optimized in
one batch per layer. The late layer is the last block's own MLP: FV of a block's own
activations is fine even though, with cls pooling, the head sends no gradient to the last
block's patch tokens. A ResNet-18 row (``layer1`` / ``layer3`` / ``layer4``) shows the
CNN side of the paper's comparison.

Writes ``docs/images/fv_random_vit_<preset>.png`` (rows: layers, columns: units) and
``docs/images/fv_random_resnet_<preset>.png``.

    .venv/bin/python docs/examples/render_feature_viz.py [--preset fast] [--steps N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from PIL import Image, ImageDraw

import captum_vit as cv
from captum_vit.render import to_pil

OUT = Path(__file__).resolve().parents[1] / "images"
UNITS = [0, 1, 2, 3, 4, 5]


def grid(rows: list[tuple[str, torch.Tensor]], scale: int = 1) -> Image.Image:
    """Rows of images with a label above each row."""
    size = rows[0][1].shape[-1] * scale
    pad, label_h = 4, 16
    width = len(rows[0][1]) * (size + pad) + pad
    height = len(rows) * (size + label_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = pad + r * (size + label_h + pad)
        draw.text((pad, top), label, fill="black")
        for c, image in enumerate(images):
            tile = to_pil(image).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (pad + c * (size + pad), top + label_h))
    return canvas


def render(model, layers, preset, steps, size, name) -> None:
    rows = []
    for layer in layers:
        start = time.perf_counter()
        fv = cv.FeatureVisualization(model, layer)
        images = fv.attribute(target=UNITS, preset=preset, steps=steps, image_size=size, seed=0)
        seconds = time.perf_counter() - start
        rows.append((f"{layer}  units {UNITS}", images))
        print(f"{name} {layer}: {len(UNITS)} units, {seconds:.0f} s")
    path = OUT / f"{name}_{preset}.png"
    grid(rows, scale=2 if size < 100 else 1).save(path)
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--only", choices=["vit", "resnet"], default=None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.only in (None, "vit"):
        vit = timm.create_model("vit_tiny_patch16_224", img_size=args.size).eval()
        layers = ["blocks.1.mlp.act", "blocks.5.mlp.act", "blocks.11.mlp.act"]
        render(vit, layers, args.preset, args.steps, args.size, "fv_random_vit")
    if args.only in (None, "resnet"):
        resnet = timm.create_model("resnet18").eval()
        render(
            resnet,
            ["layer1", "layer3", "layer4"],
            args.preset,
            args.steps,
            args.size,
            "fv_random_resnet",
        )


if __name__ == "__main__":
    main()
