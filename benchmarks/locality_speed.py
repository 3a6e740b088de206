"""Full-grid SpatialLocalityProbe vs the naive one-backward-per-position loop.

ViT-Ti/16 at 224 (random weights), one image, all 12 blocks, all 196 positions. The probe
(batched: one forward stopped after the deepest block for a chunk of image copies, one
backward per layer) is timed end to end once, layout resolution included. The naive loop
does, for every (layer, position): one forward of the single image stopped at the layer
(early exit, which is generous to it), one backward of the projected token, |grad| summed
per patch; its cost per position does not depend on the position, so it is timed on a few
positions per layer and extrapolated linearly to 196 (the output says so).

The machine is shared, so a single pair of timings is noisy. The robust figure comes from
interleaved rounds: each round times the probe on one chunk of ``--batch-size`` positions
(28 = 196 / 7, so the full grid is exactly 7 such chunks; layouts cached) and the naive loop
on one position of every layer; medians are extrapolated to the full grid. Wall and CPU
(process) times are both printed. The naive fields are checked against the probe's.

Where the gain comes from: the probe runs ~1.7x fewer block passes (one shared forward per
chunk instead of one forward per position and layer: 12 + 78 vs 156 block passes per
position for ViT-Ti); the rest is batching away the per-operator threading overhead of
batch-1 passes, which is large with 2 threads on a busy machine and small with
``--threads 1``. On the shared 2-core machine the 2-thread ratio moved between 5x and 16x
with the load; at 1 thread it was 1.1x wall / 1.6x CPU (before the pooled last block
shared the forward of the others).

    python benchmarks/locality_speed.py [--threads 2] [--rounds 5] [--batch-size 28]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import timm
import torch

from captum_vit import SpatialLocalityProbe, capture_layers
from captum_vit.layout import resolve_layout
from captum_vit.locality.probe import _region_shares


def naive_fields(model, probe, image, report, layouts, positions_per_layer):
    """One forward + one backward per (layer, position); per-layer shares of the given
    positions. ``layouts`` are resolved beforehand (not timed)."""
    rows = []
    for index, (name, site) in enumerate(zip(report.layers, report.sites, strict=True)):
        shares = []
        for cell in positions_per_layer[index].tolist():
            x = image.clone().requires_grad_(True)
            out = capture_layers(
                model, name, probe.normalize(x), grad=True, attribute_to_layer_input=site == "input"
            )
            score = layouts[index].tokens(out)[0, cell] @ report.projections[index]
            (grad,) = torch.autograd.grad(score, x)
            shares.append(_region_shares(grad, layouts[index].grid)[0])
        rows.append(torch.stack(shares))
    return rows


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    probe = SpatialLocalityProbe(model, batch_size=args.batch_size)
    report, full_wall, full_cpu = timed(lambda: probe.attribute(image))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    layers = len(report.layers)

    layouts = [
        resolve_layout(
            model, name, probe.normalize(image), attribute_to_layer_input=site == "input"
        )
        for name, site in zip(report.layers, report.sites, strict=True)
    ]
    generator = torch.Generator().manual_seed(1)
    probe_times, naive_times, worst = [], [], 0.0
    for _ in range(args.rounds):
        _, wall, cpu = timed(lambda: probe.attribute(image, positions=args.batch_size))
        probe_times.append((wall, cpu))
        cells = [torch.randint(196, (1,), generator=generator) for _ in range(layers)]
        rows, wall, cpu = timed(
            lambda c=cells: naive_fields(model, probe, image, report, layouts, c)
        )
        naive_times.append((wall, cpu))
        for i in range(layers):
            full_rows = report.fields[i].reshape(196, 196)[cells[i]]
            worst = max(worst, float((full_rows - rows[i]).abs().max()))
    chunks = 196 / args.batch_size
    probe_wall = statistics.median(w for w, _ in probe_times) * chunks
    probe_cpu = statistics.median(c for _, c in probe_times) * chunks
    naive_wall = statistics.median(w for w, _ in naive_times) * 196
    naive_cpu = statistics.median(c for _, c in naive_times) * 196

    print(
        f"vit_tiny_patch16_224, 224 px, 1 image, {layers} layers x 196 positions, "
        f"{args.threads} threads, batch_size {args.batch_size}, {args.rounds} interleaved rounds"
    )
    print(
        f"  full-grid probe, one run            wall {full_wall:7.1f} s  cpu {full_cpu:7.1f} s"
        f"  peak RSS {peak:.0f} MiB"
    )
    print(
        f"  probe, median chunk x {chunks:.0f}            wall {probe_wall:7.1f} s  "
        f"cpu {probe_cpu:7.1f} s"
    )
    print(
        f"  naive loop, median 1 pos x 196      wall {naive_wall:7.1f} s  cpu {naive_cpu:7.1f} s"
        f"  (measured on 1 position per layer per round, extrapolated linearly x 196)"
    )
    print(
        f"  speed-up (interleaved medians)      wall {naive_wall / probe_wall:7.2f} x  "
        f"cpu {naive_cpu / probe_cpu:7.2f} x"
    )
    print(
        f"  speed-up (one full-grid run)        wall {naive_wall / full_wall:7.2f} x  "
        f"cpu {naive_cpu / full_cpu:7.2f} x"
    )
    print(f"  max |naive - probe| field share     {worst:.2e}")
    sites = [f"{n}:{s}" for n, s in zip(report.layers, report.sites, strict=True) if s != "output"]
    print("  read at the input:", ", ".join(sites) or "none")
    print("  locality:", " ".join(f"{v:.3f}" for v in report.locality.tolist()))


if __name__ == "__main__":
    main()
