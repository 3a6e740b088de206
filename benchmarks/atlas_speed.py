"""Speed of the atlas on ViT-Ti/16 at 224 px (random weights; speed does not depend on
them), one CPU process, ``fast`` preset:

* units per minute: feature visualization of ``--units`` units in one chunk and writing
  each unit's files (PNGs, ``unit.json``), as ``captum-vit atlas`` does;
* images per second of the top-k pass over the atlas's default layers (every block's MLP
  hidden layer, ``blocks.0.mlp.act`` ... ``blocks.11.mlp.act``: top-k images, patch maps and
  histogram statistics of all 12 x 768 hidden units, in one pass of forwards stopped after
  the last of them);
* the share of time outside the model's forward / backward: each step is measured against
  a bare loop doing only the model work it needs, in the same run (a forward per batch
  stopped after the deepest layer, for the scan; forward to the layer + backward on the same batch of augmented
  copies, ``steps`` times, for the feature visualizations). Goal: under 15%.

Rounds alternate atlas step and baseline; medians are reported (the machine may be shared).
The defaults are the atlas command's own (256 images in batches of 64); the process keeps
freed memory for reuse as ``captum-vit`` does (``--default-malloc`` leaves glibc as it is).
With fewer images the top-k is still filling and merges more per image: 128 images in
batches of 32 put more of the time outside the model.

    .venv/bin/python benchmarks/atlas_speed.py [--images 256] [--batch-size 64] [--units 8]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import timm
import torch

from captum_vit._memory import keep_freed_memory
from captum_vit.atlas import ZooScenes
from captum_vit.atlas.resume import AtlasFiles
from captum_vit.atlas.scan import scan_layers
from captum_vit.atlas.shard import Shard, fixed_batches
from captum_vit.atlas.units import FVSettings, visualize_units, write_unit
from captum_vit.capture import LayerTap, preserved_state
from captum_vit.models import ImageModel
from captum_vit.optim.presets import get_preset

LAYER = "blocks.6.mlp.act"  # the layer of the feature visualizations
SCAN_LAYERS = [f"blocks.{i}.mlp.act" for i in range(12)]


class Scenes224(ZooScenes):
    """Zoo scenes drawn at 224 px (the model's size)."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        from captum_vit import zoo

        self.scenes = zoo.SyntheticScenes(count, seed=1, image_size=224)


def _cached(batch):
    store: dict[tuple[int, ...], dict] = {}

    def cached(indices):
        key = tuple(indices)
        if key not in store:
            store[key] = batch(key)
        return store[key]

    return cached


def bare_scan(model, images, batch_size: int) -> None:
    wrapped = ImageModel(model)
    with torch.no_grad(), LayerTap(model, SCAN_LAYERS[-1]) as tap:
        for indices in fixed_batches(len(images), batch_size):
            tap.run(wrapped.normalize(images.batch(indices)["image"]))


def bare_optimization(model, units: int, steps: int, copies: int) -> None:
    """Forward to the layer and backward to the pixels only (parameters frozen, as the
    feature visualization runs)."""
    wrapped = ImageModel(model)
    pixels = torch.rand(units * copies, 3, 224, 224, requires_grad=True)
    with preserved_state(model), LayerTap(model, LAYER) as tap:
        for _ in range(steps):
            out = tap.run(wrapped.normalize(pixels))[0]
            out[:, 1:, :units].mean().backward()


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also time one pass per layer (how the atlas scanned before), once",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds as they are (the CLI raises them)",
    )
    args = parser.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    images = Scenes224(args.images)
    images.batch = _cached(images.batch)  # draw each scene once: time the atlas, not the data
    for indices in fixed_batches(len(images), args.batch_size):
        images.batch(indices)
    preset = get_preset("fast")
    fv = FVSettings("fast", None, 0)
    units = list(range(args.units))
    scan_times, bare_scan_times, fv_times, bare_fv_times, fv_cpu = [], [], [], [], []
    scan_faults, bare_faults = [], []
    with tempfile.TemporaryDirectory() as folder:
        files = AtlasFiles(folder)
        for _ in range(args.rounds):
            faults, start = _page_faults(), time.perf_counter()
            scans = scan_layers(
                model, SCAN_LAYERS, images, k=8, batch_size=args.batch_size, shard=Shard()
            )
            scan = scans[LAYER]
            scan_times.append(time.perf_counter() - start)
            scan_faults.append(_page_faults() - faults)
            faults = _page_faults()
            bare_scan_times.append(timed(bare_scan, model, images, args.batch_size))
            bare_faults.append(_page_faults() - faults)
            start, cpu = time.perf_counter(), time.process_time()
            pictures, scores = visualize_units(model, LAYER, units, fv)
            for unit, picture, score in zip(units, pictures, scores.tolist(), strict=True):
                write_unit(files, scan, unit, picture, score, images)
            fv_times.append(time.perf_counter() - start)
            fv_cpu.append(time.process_time() - cpu)
            bare_fv_times.append(
                timed(bare_optimization, model, len(units), preset.steps, preset.copies)
            )
    scan_s, bare_s = statistics.median(scan_times), statistics.median(bare_scan_times)
    fv_s, bare_fv_s = statistics.median(fv_times), statistics.median(bare_fv_times)
    print(
        f"ViT-Ti/16 at 224, {LAYER}, {args.threads} thread(s), medians of {args.rounds} "
        f"rounds, batches of {args.batch_size}; freed memory kept as the CLI does: {kept}; "
        f"page faults: scan {statistics.median(scan_faults):.0f}, "
        f"bare {statistics.median(bare_faults):.0f} per pass"
    )
    print(
        f"top-k pass, {len(SCAN_LAYERS)} layers in one pass: {args.images / scan_s:.1f} "
        f"images/s ({scan_s:.2f} s for {args.images}); "
        f"bare truncated forward {args.images / bare_s:.1f} images/s; "
        f"share outside the model {100 * (1 - bare_s / scan_s):.1f}%"
    )
    print(
        f"units: {60 * len(units) / fv_s:.1f} units/min ({fv_s:.2f} s for {len(units)} units, "
        f"fast preset, {preset.steps} steps x {preset.copies} copies, files included); bare "
        f"forward+backward {bare_fv_s:.2f} s; share outside the model "
        f"{100 * (1 - bare_fv_s / fv_s):.1f}%"
    )
    if args.per_layer:
        start = time.perf_counter()
        for layer in SCAN_LAYERS:
            scan_layers(model, [layer], images, k=8, batch_size=args.batch_size, shard=Shard())
        per_layer_s = time.perf_counter() - start
        print(
            f"one pass per layer instead: {per_layer_s:.2f} s "
            f"({per_layer_s / scan_s:.1f}x the one-pass scan)"
        )
    cpu_s = statistics.median(fv_cpu)
    print(
        f"units per CPU-minute (process time, less sensitive to other load): "
        f"{60 * len(units) / cpu_s:.1f} ({cpu_s:.2f} CPU-s for {len(units)} units)"
    )


if __name__ == "__main__":
    main()
