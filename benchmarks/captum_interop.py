"""Captum interop: the cost of patch_grid, and of attention rollout.

1. ``patch_grid`` overhead: Captum's ``LayerIntegratedGradients`` and
   ``LayerGradientXActivation`` on ``blocks.6`` of ViT-Ti/16 (224 px, random weights)
   through ``cv.patch_grid``, against the same Captum call on the raw token layer with the
   attributions reshaped to the grid by hand afterwards (prefix dropped; for these
   token-wise methods both give the same numbers, which is checked). Goal: under 5%.
2. ``AttentionRollout`` time as a multiple of one forward pass of the same model on the
   same batch (``no_grad``). Goal: under 1.5x.

Configurations are interleaved in every repetition; the median wall time and the least
process CPU time are reported (on a shared machine the CPU-time figures, with one thread,
are the steadier ones).

    python benchmarks/captum_interop.py [--threads 1] [--reps 5] [--batch 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

import captum_vit as cv


def hand_grid(attr: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) token attributions -> (B, C, h, w), cls dropped."""
    batch, _, channels = attr.shape
    return attr[:, 1:].reshape(batch, *grid, channels).permute(0, 3, 1, 2)


def medians(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time (key ``name``) and the least process CPU time over the repetitions
    (key ``name + " cpu"``: contention from other processes only ever adds to it)."""
    times: dict[str, list[float]] = {}
    for run in runs.values():  # warm-up
        run()
    for _ in range(reps):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times.setdefault(name, []).append(time.perf_counter() - start)
            times.setdefault(name + " cpu", []).append(time.process_time() - start_cpu)
    return {
        name: min(values) if name.endswith(" cpu") else statistics.median(values)
        for name, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.rand(args.batch, 3, 224, 224)
    layer = model.blocks[6]
    print(
        f"vit_tiny_patch16_224, batch {args.batch}, 224 px, {args.threads} threads, "
        f"{args.reps} reps"
    )

    gxa_hand = LayerGradientXActivation(model, layer)
    lig_hand = LayerIntegratedGradients(model, layer)
    print("1. patch_grid vs the same Captum call on the raw layer, reshaped by hand")
    with (
        cv.patch_grid(model, "blocks.6", x) as grid,
        cv.patch_grid(model, "blocks.6", x, with_prefix=True) as grid_prefix,
    ):
        # Integrated gradients on the raw layer move the cls token from its baseline too:
        # the same path as a grid with the prefix attributed (with_prefix=True).
        gxa_grid = LayerGradientXActivation(model, grid)
        lig_grid = LayerIntegratedGradients(model, grid_prefix)
        methods = {
            "LayerGradientXActivation": (
                lambda: hand_grid(gxa_hand.attribute(x, target=1), (14, 14)),
                lambda: gxa_grid.attribute(x, target=1),
            ),
            f"LayerIntegratedGradients ({args.steps} steps)": (
                lambda: hand_grid(lig_hand.attribute(x, target=1, n_steps=args.steps), (14, 14)),
                lambda: lig_grid.attribute(x, target=1, n_steps=args.steps)[0],
            ),
        }
        for name, (by_hand, through_grid) in methods.items():
            same = torch.allclose(by_hand(), through_grid(), atol=1e-5, rtol=1e-3)
            result = medians({"hand": by_hand, "grid": through_grid}, args.reps)
            print(f"  {name} (same result: {same})")
            for kind in ("", " cpu"):
                hand, through = result["hand" + kind], result["grid" + kind]
                print(
                    f"    {'CPU (min)' if kind else 'wall (median)':13s} hand {hand * 1e3:8.1f} ms   "
                    f"patch_grid {through * 1e3:8.1f} ms   overhead {(through / hand - 1) * 100:+5.1f}%"
                )

    rollout = cv.AttentionRollout(model, mean=(0.0,) * 3, std=(1.0,) * 3)
    rollout.attribute(x)  # resolves the layout once per size
    with torch.no_grad():
        result = medians(
            {"forward": lambda: model(x), "rollout": lambda: rollout.attribute(x)}, args.reps
        )
    print("2. AttentionRollout vs one forward (no_grad)")
    for kind in ("", " cpu"):
        forward, rolled = result["forward" + kind], result["rollout" + kind]
        print(
            f"    {'CPU (min)' if kind else 'wall (median)':13s} forward {forward * 1e3:8.1f} ms   "
            f"rollout {rolled * 1e3:8.1f} ms   ratio {rolled / forward:.2f}x"
        )


if __name__ == "__main__":
    main()
