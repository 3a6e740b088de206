"""Feature-visualization quality per preset: wall time, robust activation, transfer.

For every preset:

* **wall time** and **robust activation** (``cv.robust_activation``: the unit's objective
  averaged over 32 shifted / colour-shifted views, the same views for every preset) of
  ``--units`` hidden units (``mlp.act``) of an early, a middle and the last block of
  (a) a random-weight ViT-Ti/16 at 112 px and (b) the zoo ViT (64 px); the zoo units are
  those most active on held-out scenes;
* **transfer** (``cv.transfer_score``): the zoo ViT's class-logit visualizations
  (``--per-class`` images per class) judged by the zoo CNN, and the CNN's judged by the ViT
  (chance 12.5%).

With ``--grids`` it saves, from the same zoo images, ``docs/images/fv_zoo_units_<preset>.png``
(rows: units of the early, middle and last block), ``fv_zoo_logits_<preset>.png`` (the
ViT's class logits, ``--per-class`` images each) and ``fv_zoo_cnn_logits_<preset>.png``
(the CNN's); with ``--overview PRESET`` also the
figures the docs show, from that preset's images of this run:
``zoo_vit_feature_viz.png`` (the units' rows and the class logits),
``zoo_vit_class_viz.png`` and ``zoo_cnn_class_viz.png`` (each model's class logits);
``--overview-classes PRESET`` takes the class logits from another preset.

``--seeds N`` averages each robust-activation cell over seeds 0 ... N - 1 (one seed moves
the zoo ViT's last-block score by about 2%), e.g. ``--presets ghiasi2023,fast --skip
tiny,transfer --seeds 3``.

The machine may be shared: timings are wall times of this run; compare presets within one
run. Reduced settings for a loaded machine, e.g.::

    python benchmarks/fv_quality.py --units 2 --steps-scale 0.25 --tiny-layers blocks.3.mlp.act
    python benchmarks/fv_quality.py                      # full (hours on 2 busy cores)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import captum_vit as cv
from captum_vit import zoo
from captum_vit.capture import capture_layers
from captum_vit.models import ImageModel
from captum_vit.optim.presets import get_preset
from captum_vit.render import image_grid

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
HEADS = {"vit": "head", "cnn": "fc"}


def parse_preset(name: str) -> str | None:
    return None if name == "none" else name


def run(model, layer, units, preset, scale, per_target=1, seed=0):
    """(images, seconds) of one FeatureVisualization call with the preset's steps scaled."""
    steps = max(1, round(get_preset(preset).steps * scale))
    fv = cv.FeatureVisualization(model, layer)
    start = time.perf_counter()
    images = fv.attribute(
        target=units,
        preset=preset,
        steps=steps,
        seed=seed,
        images_per_target=per_target,
        show_progress=False,
    )
    return images, time.perf_counter() - start


def active_units(model, layer: str, count: int) -> list[int]:
    """The ``count`` units of ``layer`` most active (patch mean) on held-out scenes."""
    images = zoo.SyntheticScenes(200, seed=1).batch(range(200))["image"]
    acts = capture_layers(ImageModel(model), f"model.{layer}", images)
    return acts[:, 1:].mean((0, 1)).topk(count).indices.tolist()


def robust_rows(name, model, layers, units_of, presets, scale, zoo_images, seeds=1):
    """One row per preset; with ``seeds`` > 1 each cell is the mean over seeds 0 ...
    seeds - 1 (the time is the total) and only seed 0's images go to the grids."""
    over = f"; mean over {seeds} seeds" if seeds > 1 else ""
    print(f"\n{name}: robust activation (mean over units; 32 views{over}), wall time")
    print("| preset | " + " | ".join(layers) + " | time (s) |")
    print("|---|" + "---|" * (len(layers) + 1))
    for preset in presets:
        cells, total = [], 0.0
        for layer in layers:
            units, scores = units_of(layer), []
            for seed in range(seeds):
                images, seconds = run(model, layer, units, preset, scale, seed=seed)
                total += seconds
                scores.append(cv.robust_activation(model, layer, images, units).mean())
                if seed == 0 and zoo_images is not None:
                    zoo_images.setdefault(preset, []).append((layer, units, images))
            cells.append(f"{sum(scores) / seeds:.3f}")
        print(f"| {preset} | " + " | ".join(cells) + f" | {total:.0f} |", flush=True)


def transfer_rows(models, presets, scale, per_class, zoo_images):
    k = len(models["vit"].class_names)
    print(f"\ntransfer: top-1 % of the other model on class visualizations (chance {100 / k:.1f})")
    print("| preset | ViT viz -> CNN | CNN viz -> ViT | ViT self | CNN self | time (s) |")
    print("|---|---|---|---|---|---|")
    labels = torch.arange(k).repeat_interleave(per_class)
    for preset in presets:
        scores, total = {}, 0.0
        for source, judge in (("vit", "cnn"), ("cnn", "vit")):
            images, seconds = run(
                models[source], HEADS[source], list(range(k)), preset, scale, per_class
            )
            total += seconds
            scores[source, judge] = cv.transfer_score(images, labels, models[judge])
            scores[source, source] = cv.transfer_score(images, labels, models[source])
            if zoo_images is not None:
                kind = "head" if source == "vit" else "cnn head"
                zoo_images.setdefault(preset, []).append((kind, labels.tolist(), images))
        print(
            f"| {preset} | {scores['vit', 'cnn']:.1f} | {scores['cnn', 'vit']:.1f} | "
            f"{scores['vit', 'vit']:.1f} | {scores['cnn', 'cnn']:.1f} | {total:.0f} |",
            flush=True,
        )


def save_grids(zoo_images, class_names, overview=None, overview_classes=None):
    OUT.mkdir(parents=True, exist_ok=True)
    for preset, all_rows in zoo_images.items():
        units = [r for r in all_rows if not r[0].endswith("head")]
        vit_logits = [r for r in all_rows if r[0] == "head"]
        cnn_logits = [r for r in all_rows if r[0] == "cnn head"]
        name = preset or "none"
        figures = {
            f"fv_zoo_units_{name}.png": units,
            f"fv_zoo_logits_{name}.png": vit_logits,
            f"fv_zoo_cnn_logits_{name}.png": cnn_logits,
        }
        if preset == overview:
            figures["zoo_vit_feature_viz.png"] = units + _vit_class_rows(
                zoo_images, overview_classes, vit_logits
            )
        if preset == (overview_classes or overview):
            figures["zoo_vit_class_viz.png"] = vit_logits
            figures["zoo_cnn_class_viz.png"] = cnn_logits
        for filename, rows in figures.items():
            if rows:
                save_grid(rows, class_names, OUT / filename)


def _vit_class_rows(zoo_images, preset, default):
    """The zoo ViT's class-logit rows of ``preset`` (``default`` when no preset is given)."""
    if preset is None:
        return default
    return [r for r in zoo_images.get(parse_preset(preset), []) if r[0] == "head"]


def save_grid(rows, class_names, path, ncols=8):
    """One grid row per ``ncols`` images; each row of ``rows`` starts a new grid row (the
    last one padded with white cells)."""
    cells, captions = [], []
    for layer, units, images in rows:
        if layer.endswith("head"):
            names = [class_names[u] for u in units]
        else:
            block = layer.split(".")[1]
            names = [f"b{block} u{u}" for u in units]
        pad = -len(images) % ncols
        cells += [images, torch.ones(pad, *images.shape[1:])]
        captions += names + [""] * pad
    big = F.interpolate(torch.cat(cells), scale_factor=2, mode="nearest")
    image_grid(big, ncols=ncols, labels=captions).save(path)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="ghiasi2023,fast,robust,object,shapes,maco,lucid")
    parser.add_argument("--units", type=int, default=4, help="hidden units per layer")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="x each preset's steps")
    parser.add_argument(
        "--tiny-layers", default="blocks.1.mlp.act,blocks.5.mlp.act,blocks.11.mlp.act"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--seeds", type=int, default=1, help="robust-activation cells: mean over this many seeds"
    )
    parser.add_argument("--skip", default="", help="comma list of: tiny, zoo, transfer")
    parser.add_argument("--grids", action="store_true", help="save docs/images/fv_zoo_*.png")
    parser.add_argument(
        "--overview",
        default=None,
        help="with --grids: also save the docs' zoo_*_viz.png figures from this preset",
    )
    parser.add_argument(
        "--overview-classes",
        default=None,
        help="with --overview: take the class visualizations from this preset instead",
    )
    parser.add_argument(
        "--transfer-presets", default=None, help="presets of the transfer table (default: all)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    presets = [parse_preset(p) for p in args.presets.split(",")]
    skip = set(args.skip.split(",")) - {""}
    print(
        f"presets {args.presets}; steps x {args.steps_scale} of each preset's; {args.units} "
        f"units per layer; {args.per_class} images per class; {args.threads} threads, CPU"
    )
    zoo_images = {} if args.grids else None
    if "tiny" not in skip:
        torch.manual_seed(0)
        tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=112).eval()
        units = list(range(args.units))
        robust_rows(
            "random ViT-Ti/16, 112 px",
            tiny,
            args.tiny_layers.split(","),
            lambda layer: units,
            presets,
            args.steps_scale,
            None,
            args.seeds,
        )
    models = {name: zoo.load_model(name) for name in ("vit", "cnn")}
    if "zoo" not in skip:
        depth = len(models["vit"].blocks)
        layers = [f"blocks.{b}.mlp.act" for b in (0, depth // 2, depth - 1)]
        top = {layer: active_units(models["vit"], layer, args.units) for layer in layers}
        robust_rows(
            "zoo ViT, 64 px",
            models["vit"],
            layers,
            top.__getitem__,
            presets,
            args.steps_scale,
            zoo_images,
            args.seeds,
        )
    if "transfer" not in skip:
        chosen = presets
        if args.transfer_presets:
            chosen = [parse_preset(p) for p in args.transfer_presets.split(",")]
        transfer_rows(models, chosen, args.steps_scale, args.per_class, zoo_images)
    if zoo_images:
        save_grids(
            zoo_images,
            models["vit"].class_names,
            parse_preset(args.overview or ""),
            args.overview_classes,
        )


if __name__ == "__main__":
    main()
