"""Do feature visualizations of the zoo models show the classes? A transfer check.

Each class logit of the zoo ViT is visualized with ``cv.FeatureVisualization`` and the
images are classified by the independently trained zoo CNN; then the other way round
(CNN logits, classified by the ViT). Chance is 1 / K. The same model's own top-1 on its
visualizations is printed as a sanity reference (it is optimized for, so it should be high).

With ``--grid`` it also saves ``docs/images/zoo_vit_feature_viz.png``: the ViT's most active
hidden units (``mlp.act``, the paper's layer) of an early, a middle and the last block, and
its class logits.

    python benchmarks/fv_transfer.py [--preset lucid] [--per-class 2] [--grid]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import captum_vit as cv
from captum_vit import zoo
from captum_vit._accuracy import TopKCounter
from captum_vit.capture import capture_layers
from captum_vit.models import ImageModel
from captum_vit.render import image_grid

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
HEADS = {"vit": "head", "cnn": "fc"}


def visualize_classes(model, name: str, per_class: int, preset: str, steps: int | None, seed: int):
    k = len(model.class_names)
    fv = cv.FeatureVisualization(model, HEADS[name])
    images = fv.attribute(
        target=list(range(k)), preset=preset, steps=steps, seed=seed, images_per_target=per_class
    )
    labels = torch.arange(k).repeat_interleave(per_class)  # rows are target-major
    return images, labels


@torch.no_grad()
def top1(model, images, labels) -> float:
    counter = TopKCounter(k=1)
    counter.add(ImageModel(model).eval()(images), labels)
    return float(counter.top1_percent())


def active_units(model, layer: str, count: int) -> list[int]:
    """The ``count`` hidden units of ``layer`` with the highest mean activation over patch
    tokens on held-out scenes."""
    images = zoo.SyntheticScenes(200, seed=1).batch(range(200))["image"]
    wrapped = ImageModel(model)
    acts = capture_layers(wrapped, f"model.{layer}", images)  # (B, N, C)
    layout = cv.resolve_layout(wrapped, f"model.{layer}", images[:2])
    return layout.tokens(acts).mean((0, 1)).topk(count).indices.tolist()


def save_grid(vit, preset: str, steps: int | None, seed: int) -> Path:
    depth = len(vit.blocks)
    rows, captions = [], []
    for block in (0, depth // 2, depth - 1):
        layer = f"blocks.{block}.mlp.act"
        units = active_units(vit, layer, 8)
        images = cv.FeatureVisualization(vit, layer).attribute(
            target=units, preset=preset, steps=steps, seed=seed
        )
        rows.append(images)
        captions += [f"b{block} u{u}" for u in units]
    logits = cv.FeatureVisualization(vit, "head").attribute(
        target=list(range(len(vit.class_names))), preset=preset, steps=steps, seed=seed
    )
    rows.append(logits)
    captions += list(vit.class_names)
    cells = F.interpolate(torch.cat(rows), scale_factor=2, mode="nearest")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "zoo_vit_feature_viz.png"
    image_grid(cells, ncols=8, labels=captions).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="lucid")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", action="store_true", help="also save the ViT FV grid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {name: zoo.load_model(name) for name in ("vit", "cnn")}
    k = len(models["vit"].class_names)
    print(
        f"preset {args.preset}, steps {args.steps or 'preset default'}, "
        f"{args.per_class} images per class, K = {k}, chance {100 / k:.1f}%"
    )
    print("| visualized | classified by | top-1 % | x chance |")
    print("|---|---|---|---|")
    for source, judge in (("vit", "cnn"), ("cnn", "vit")):
        start = time.perf_counter()
        images, labels = visualize_classes(
            models[source], source, args.per_class, args.preset, args.steps, args.seed
        )
        seconds = time.perf_counter() - start
        for by in (judge, source):
            acc = top1(models[by], images, labels)
            note = " (self, optimized for)" if by == source else ""
            print(f"| {source} logits | {by}{note} | {acc:.1f} | {acc / (100 / k):.1f} |")
        print(f"  ({source}: {len(images)} visualizations in {seconds:.0f}s)")
        save = OUT / f"zoo_{source}_class_viz.png"
        OUT.mkdir(parents=True, exist_ok=True)
        cells = F.interpolate(images, scale_factor=2, mode="nearest")
        names = [models[source].class_names[i] for i in labels.tolist()]
        image_grid(cells, ncols=args.per_class * 2, labels=names).save(save)
    if args.grid:
        print(f"saved {save_grid(models['vit'], args.preset, args.steps, args.seed)}")


if __name__ == "__main__":
    main()
