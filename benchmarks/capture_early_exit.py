"""Early-exit capture vs a full forward.

ViT-Ti/16 at 224, batch 8, random weights, CPU: time of ``capture_layers(model,
"blocks.3", x)`` (the forward stops after block 3 of 12) against a full ``model(x)``, both
under ``no_grad``; also timm's own ``forward_intermediates(stop_early=True)`` for
reference. Configurations are interleaved in every repetition; medians are reported.

    python benchmarks/capture_early_exit.py [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from captum_vit import capture_layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--layer", default="blocks.3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.rand(8, 3, 224, 224)
    index = int(args.layer.split(".")[1])
    runs = {
        "full forward": lambda: model(x),
        f"capture_layers({args.layer})": lambda: capture_layers(model, args.layer, x),
        "timm forward_intermediates(stop_early)": lambda: model.forward_intermediates(
            x, indices=[index], stop_early=True, intermediates_only=True
        ),
    }
    times = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(2):
            for run in runs.values():
                run()
        for _ in range(args.reps):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    full = medians["full forward"]
    print(f"vit_tiny_patch16_224, batch 8, 224 px, {args.threads} threads, {args.reps} reps")
    for name, value in medians.items():
        print(f"  {name:42s} {value * 1e3:8.1f} ms   ratio to full {value / full:.2f}")


if __name__ == "__main__":
    main()
